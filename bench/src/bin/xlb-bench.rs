//! `xlb-bench [--quick] [--out DIR]`: runs the benchmark (root; `cargo xtask bench` builds
//! and starts it) and writes report.md, report.json and the plots into DIR.
use std::{path::PathBuf, process::Command};

use anyhow::Context as _;
use clap::Parser;
use xlb_bench::{
    report,
    results::Machine,
    run::{self, Plan},
};

#[derive(Parser)]
struct Cli {
    /// The short smoke run (CI): fewer Services, fewer repeats, shorter measurements.
    #[arg(long)]
    quick: bool,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let plan = if cli.quick { Plan::quick() } else { Plan::full() };
    let mut report = run::run(&plan, machine())?;
    report.goals = report::goals(&report);
    let written =
        report::write(&report, &cli.out).with_context(|| format!("writing {}", cli.out.display()))?;
    println!("{}", report::headline(&report));
    for goal in &report.goals {
        let verdict = match goal.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        println!("- {}: {verdict} ({})", goal.goal, goal.measured);
    }
    for path in written {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The machine and the commit, as the report states them.
fn machine() -> Machine {
    let first_line = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_string())
            .unwrap_or_default()
    };
    let dirty = !first_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let commit = first_line("git", &["rev-parse", "--short", "HEAD"]);
    Machine {
        cores: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model: std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|v| v.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        commit: if dirty { format!("{commit} (with uncommitted changes)") } else { commit },
        date: first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        iptables: first_line("iptables", &["-V"]),
        nft: first_line("nft", &["-v"]),
    }
}
