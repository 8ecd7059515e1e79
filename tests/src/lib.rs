//! Test support for xlb: a small Kubernetes-like cluster made of network namespaces
//! (`testbed`), code that runs inside a namespace (`netns`), the kiada client (`kiada`),
//! packet builders for BPF_PROG_TEST_RUN fixtures (`frame`), the programs under
//! BPF_PROG_TEST_RUN with the fixture cluster (`harness`), the kiada scenario shared by
//! the demo and the tests (`scenario`), requests from any of the cluster's namespaces
//! (`traffic`), a small Kubernetes API server for the agent to follow (`apiserver`), the
//! integration tests' shared checks (`checks`), Services on a testbed (`services`), the sockets
//! of pods' processes (`sockets`) and what the Kubernetes e2e tests share (`e2e`).
//!
//! Everything but `apiserver` needs root; all addresses come from 198.18.0.0/15 and nothing
//! is created in the root network namespace.
pub mod apiserver;
pub mod checks;
pub mod e2e;
pub mod frame;
pub mod harness;
pub mod kiada;
pub mod netns;
pub mod raw;
pub mod scenario;
pub mod services;
pub mod sockets;
pub mod testbed;
pub mod traffic;

use std::path::PathBuf;

/// Directory of the release binaries (`xlb`, `kiada`): next to the running executable's
/// target directory, or `XLB_TARGET_DIR`.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("XLB_TARGET_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/release/xlb-testbed or target/release/deps/test-binary
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}
