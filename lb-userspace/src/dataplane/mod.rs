//! The kernel side as the agent sees it: the embedded object, loading and attaching it with
//! pinned maps and links (`loader`), writing desired state into the maps (`writer`, which
//! numbers groups and counter slots with `ids`), and reading counters and table fill back
//! (`stats`). Which maps pinned by an earlier agent the programs can use as they are is
//! `layout`'s decision.
mod ids;
pub mod layout;
pub mod loader;
pub mod stats;
pub mod writer;

pub use loader::{cleanup, Dataplane, DataplaneError, Hook, MapSizes};
pub use writer::{MapWriter, SyncReport};

/// The compiled lb-ebpf object, built by build.rs through aya-build.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
