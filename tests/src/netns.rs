//! Running commands and code inside a named network namespace.
use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Command, Output},
};

use anyhow::{bail, Context as _};

/// Path of a named namespace as `ip netns` makes it.
pub fn path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

/// A command run in `ns` through `nsenter --net` (not `ip netns exec`, which remounts /sys
/// and hides bpffs).
pub fn command(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", path(ns))).arg(program);
    cmd
}

fn check(mut cmd: Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// Runs `program args` in `ns` and returns its stdout; fails on a non-zero exit.
pub fn run(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = command(ns, program);
    cmd.args(args);
    Ok(String::from_utf8_lossy(&check(cmd)?.stdout).into_owned())
}

/// Runs `ip args` (in the root namespace's view: use `-n NS` to act inside one).
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    check(cmd).map(drop)
}

/// Runs `f` on a thread that has entered `ns`: sockets it opens live in that namespace.
pub fn within<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    match spawn(ns, f)?.join() {
        Ok(result) => Ok(result.with_context(|| format!("entering {ns}"))?),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Starts `f` on a thread that enters `ns` first (threads it starts inherit the namespace, not
/// the pod's sockets: `crate::sockets`); `Err` from the handle when entering failed.
pub fn spawn<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<std::io::Result<T>>> {
    let file = File::open(path(ns)).with_context(|| format!("opening {}", path(ns)))?;
    let ns = ns.to_string();
    Ok(std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd affects only this thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        crate::sockets::entered(&ns);
        Ok(f())
    }))
}

/// Names of every network namespace.
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}
