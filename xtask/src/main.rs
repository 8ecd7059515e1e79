//! `cargo xtask`: set-up, build, the namespace testbed, the demo and the test suite.
//!
//! Every command first checks the machine and installs what is missing (idempotent, each
//! step printed), so a fresh machine needs nothing but `cargo xtask demo` or `cargo xtask test`.
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker, Debian packages, bpffs.
    Setup,
    /// Build the agent (`xlb`, with the eBPF programs) and the test tools, release mode.
    Build,
    /// Bring the namespace cluster up or down, or show what exists.
    Testbed {
        #[command(subcommand)]
        action: TestbedAction,
    },
    /// Run the kiada NodePort demo on the namespace cluster, then tear it down.
    Demo {
        /// Leave the cluster up (remove it with `cargo xtask testbed down`).
        #[arg(long)]
        keep: bool,
    },
    /// Run every test: unit, eBPF packet fixtures and fuzzing, namespace integration tests on
    /// production-like nodes; then the integration tests again on filtering nodes
    /// (`XLB_REALISTIC_NODE=1`) and on kind-style nodes (`XLB_KIND_NODE=1`).
    Test {
        /// Fuzz the packet path with 10,000,000 frames instead of 1,000,000 (about 30 s more).
        #[arg(long)]
        long: bool,
    },
    /// Benchmark xlb against kube-proxy's iptables and nftables modes and the routing floor;
    /// writes target/bench/report.md, report.json and PNG plots.
    Bench {
        /// The short smoke run (CI, under 3 minutes) instead of the full one.
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Subcommand)]
enum TestbedAction {
    /// Build the kiada cluster with an agent on every node and leave it running.
    Up,
    /// Remove every testbed: namespaces, processes, pins.
    Down,
    /// List testbed namespaces and pins.
    Status,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Cmd::Setup => setup::ensure(),
        Cmd::Build => {
            setup::ensure()?;
            build(&root)
        }
        Cmd::Testbed { action } => {
            setup::ensure()?;
            build(&root)?;
            let arg = match action {
                TestbedAction::Up => "up",
                TestbedAction::Down => "down",
                TestbedAction::Status => "status",
            };
            testbed(&root, &[arg])
        }
        Cmd::Demo { keep } => {
            setup::ensure()?;
            build(&root)?;
            testbed(&root, if keep { &["demo", "--keep"] } else { &["demo"] })
        }
        Cmd::Test { long } => {
            setup::ensure()?;
            build(&root)?;
            step("running every test (unit, packet fixtures and fuzzing, namespace integration)");
            let mut all = Command::new(env!("CARGO"));
            all.current_dir(&root).args(["test", "--release", "--locked"]);
            if long {
                all.env("XLB_FUZZ_FRAMES", LONG_FUZZ_FRAMES);
            }
            run(&mut all)?;
            for (env, what) in NODE_VARIANTS {
                step(&format!("running the integration tests again with {env}=1 ({what})"));
                run(Command::new(env!("CARGO"))
                    .current_dir(&root)
                    .args(["test", "--release", "--locked", "-p", "xlb-tests", "--tests"])
                    .env(env, "1"))?;
            }
            Ok(())
        }
        Cmd::Bench { quick } => {
            setup::ensure()?;
            build(&root)?;
            step(if quick { "benchmark, quick smoke run" } else { "benchmark, full run (under 30 minutes)" });
            let mut cmd = Command::new(root.join("target/release/xlb-bench"));
            cmd.current_dir(&root).args(["--out", "target/bench"]);
            if quick {
                cmd.arg("--quick");
            }
            run(&mut cmd)
        }
    }
}

/// The node variants the namespace tests run on besides the production-like default
/// (tests/src/testbed.rs): the environment variable that selects each, and what it changes.
const NODE_VARIANTS: [(&str, &str); 2] = [
    ("XLB_REALISTIC_NODE", "rp_filter, INVALID dropped"),
    ("XLB_KIND_NODE", "kind-style nodes: no XDP program on eth0's peer, --external-hook auto"),
];

/// Frames `cargo xtask test --long` fuzzes the packet path with (tests/tests/fuzz.rs).
const LONG_FUZZ_FRAMES: &str = "10000000";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn step(what: &str) {
    println!("[xtask] {what}");
}

/// Runs `cmd`, failing with its rendering when it does not succeed.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root).args(args))
}

fn build(root: &Path) -> anyhow::Result<()> {
    step("building xlb (with the eBPF programs), kiada, xlb-testbed and xlb-bench (release)");
    cargo(
        root,
        &["build", "--release", "--locked", "-p", "lb-userspace", "-p", "xlb-tests", "-p", "xlb-bench"],
    )
}

fn testbed(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(root.join("target/release/xlb-testbed")).args(args))
}
