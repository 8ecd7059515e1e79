//! The xlb benchmark: xlb against kube-proxy's iptables and nftables modes and the routing
//! floor, on the namespace cluster (`xlb_tests::testbed`).
//!
//! - `workload`: the N Services every mode serves, and the per-port view of them.
//! - `cluster`: the benchmark cluster and the four modes serving its Services.
//! - `load`: the backends' server, short connections, one long stream, probes.
//! - `run`: the measurement plan (full or quick) and its loop over sizes, repeats, modes.
//! - `iptables`, `nftables`: kube-proxy's rulesets for those Services, as its proxiers write them.
//! - `micro`: the per-packet cost of each program path (BPF_PROG_TEST_RUN).
//! - `results`: figures, samples and goals.
//! - `report`: the goals evaluated, and the report as Markdown, JSON and PNG plots.
pub mod cluster;
pub mod iptables;
pub mod load;
pub mod micro;
pub mod nftables;
pub mod report;
pub mod results;
pub mod run;
pub mod workload;
