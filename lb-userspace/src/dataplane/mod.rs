//! The kernel side as the agent sees it: the embedded object, loading and attaching it with
//! pinned maps and links (`loader`), writing desired state into the maps (`writer`, which
//! numbers groups and counter slots with `ids`), and reading counters and table fill back
//! (`stats`). Which maps pinned by an earlier agent the programs can use as they are is
//! `layout`'s decision; which hook takes an external interface's traffic, `external`'s. UDP
//! flows to endpoints that stopped serving are removed by `stale_flows`.
pub mod external;
mod ids;
pub mod layout;
pub mod loader;
pub mod stale_flows;
pub mod stats;
pub mod writer;

pub use external::{ExternalHook, ExternalHookMode};
pub use loader::{attached_hooks, cleanup, Dataplane, DataplaneError, Hook, MapSizes};
pub use stale_flows::FlowTables;
pub use writer::{MapWriter, SyncReport};

/// The compiled lb-ebpf object, built by build.rs through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
