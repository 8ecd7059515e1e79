//! The xlb agent: Kubernetes objects → per-node desired state → diff → BPF maps.
//!
//! - `model`: validated Service, EndpointSlice and Node records, and the `Store` every source
//!   feeds (manifests now, the API watcher later): one path from objects to maps.
//! - `manifests`: the directory source (multi-document YAML, `kind: List`).
//! - `desired`: pure functions from the store to the frontends and backend groups of a node.
//! - `dataplane`: loading, attaching and pinning the programs (`loader`), and the one map
//!   writer that diffs desired state against the maps (`writer`).
//! - `netif`: the node's interfaces and addresses, read in the agent's network namespace.
pub mod dataplane;
pub mod desired;
pub mod manifests;
pub mod model;
pub mod netif;
