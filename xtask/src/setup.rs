//! Machine set-up. Each step checks first and only acts when something is missing.
use std::process::Command;

use anyhow::{bail, Context as _};

use crate::{run, step};

/// Pinned: 0.11+ needs a system LLVM 21-23 this machine does not have.
const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the testbed, the demo and the tests use.
/// (conntrack and the DejaVu font: the benchmark's conntrack flush and its plots.)
const PACKAGES: [&str; 8] =
    ["iproute2", "bpftool", "iptables", "nftables", "ethtool", "curl", "conntrack", "fonts-dejavu-core"];

pub fn ensure() -> anyhow::Result<()> {
    require_root()?;
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    bpffs()
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("xlb's set-up, testbed and tests need root (network namespaces, BPF)");
    }
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]));
    match installed {
        None => {
            step("installing the nightly toolchain with rust-src (eBPF builds need -Z build-std)");
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
        Some(list) if !list.lines().any(|l| l.starts_with("rust-src")) => {
            step("adding rust-src to the nightly toolchain");
            run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        }
        Some(_) => {
            step("nightly + rust-src: present");
            Ok(())
        }
    }
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
        return Ok(());
    }
    step(&format!("installing bpf-linker {BPF_LINKER_VERSION} (cargo install, about a minute)"));
    run(Command::new(env!("CARGO")).args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let status =
                output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])).unwrap_or_default();
            !status.contains("install ok installed")
        })
        .collect();
    if missing.is_empty() {
        step(&format!("Debian packages {}: present", PACKAGES.join(", ")));
        return Ok(());
    }
    step(&format!("installing Debian packages: {}", missing.join(" ")));
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

fn bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf ")) {
        step("bpffs on /sys/fs/bpf: mounted");
        return Ok(());
    }
    step("mounting bpffs on /sys/fs/bpf (pinned maps and links live there)");
    std::fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
