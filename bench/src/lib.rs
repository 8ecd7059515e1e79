//! The xlb benchmark: xlb against kube-proxy's iptables and nftables modes and the routing
//! floor, on the namespace cluster (`xlb_tests::testbed`).
//!
//! - `workload`: the N Services every mode serves, and the per-port view of them.
//! - `iptables`, `nftables`: kube-proxy's rulesets for those Services, as its proxiers write them.
//! - `results`: figures, samples and goals; `report` renders them (Markdown, JSON, PNG).
pub mod iptables;
pub mod nftables;
pub mod results;
pub mod workload;
