//! Map definitions only. Layouts and purposes are documented on the types in `lb-common`.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap},
    macros::btf_map,
};
use lb_common::{
    backend::{Backend, BackendKey},
    config::NodeConfig,
    conntrack::{CtEntry, CtKey},
    maps::{BACKENDS_MAX, CONNTRACK_MAX, SERVICES_MAX},
    nat::NatEntry,
    service::{ServiceKey, ServiceValue},
};

/// Frontends: (address, port, protocol) → backend group.
#[btf_map]
pub static XLB_SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX as usize }> = HashMap::new();

/// Backend slots: (group, slot) → endpoint.
#[btf_map]
pub static XLB_BACKENDS: HashMap<BackendKey, Backend, { BACKENDS_MAX as usize }> = HashMap::new();

/// Connection tracking; resized by the agent's `--conntrack-size`.
#[btf_map]
pub static XLB_CONNTRACK: LruHashMap<CtKey, CtEntry, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// SNAT bindings; sized like the conntrack table.
#[btf_map]
pub static XLB_NAT: LruHashMap<CtKey, NatEntry, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// Node settings, slot 0.
#[btf_map]
pub static XLB_CONFIG: Array<NodeConfig, 1> = Array::new();
