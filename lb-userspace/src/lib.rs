//! The xlb agent: Kubernetes objects → per-node desired state → diff → BPF maps.
//!
//! - `model`: validated Service, EndpointSlice and Node records, and the `Store` every source
//!   feeds: one path from objects to maps.
//! - `manifests`: the directory source (multi-document YAML, `kind: List`).
//! - `kubernetes`: the API source (watches of Services, EndpointSlices and the Node).
//! - `sources`: the store the sources share with the sync loop, and their state.
//! - `desired`: the frontends and backend groups of a node, from the store: computed per
//!   Service and kept up to date by recomputing only the Services that changed.
//! - `dataplane`: loading, attaching and pinning the programs (`loader`), and the one map
//!   writer that diffs desired state, or only what changed in it, against the maps
//!   (`writer`, with its `ids`), counters read back (`stats`), which hook takes an external
//!   interface (`external`), and UDP flows and sockets left on removed endpoints
//!   (`stale_flows`).
//! - `inspect`: `xlb inspect`: services, backends, connections, affinity and counters read
//!   back from the pinned maps as typed rows, printed as a table or JSON.
//! - `netif`: the node's interfaces and addresses, read in the agent's network namespace.
//! - `sock_diag`: the node's connected UDP sockets, listed and destroyed through netlink.
//! - `health`: kube-proxy's health answers: `/healthz` and `/livez`, and one
//!   healthCheckNodePort server per Service with externalTrafficPolicy Local.
//! - `metrics`: Prometheus `/metrics`: kube-proxy's sync metrics, object counters, and
//!   per-Service traffic and BPF map fill read from the dataplane at each scrape.
pub mod dataplane;
pub mod desired;
pub mod health;
pub mod inspect;
pub mod kubernetes;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod netif;
pub mod sock_diag;
pub mod sources;
