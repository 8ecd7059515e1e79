//! Map definitions only. Layouts and purposes are documented on the types in `lb-common`.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    backend::{Backend, BackendKey},
    config::NodeConfig,
    conntrack::{CtBackend, CtEntry, CtKey},
    fragment::{FragmentKey, FragmentPorts},
    maps::{
        AFFINITY_MAX, BACKENDS_MAX, CONNTRACK_MAX, FRAGMENTS_MAX, SERVICES_MAX, SOCK_REVNAT_MAX,
        SOURCE_RANGES_MAX,
    },
    nat::NatEntry,
    service::{ServiceKey, ServiceValue},
    socket::{SockRevNatKey, SockRevNatValue},
    source_range::SourceRangeKey,
    stats::{ServicePortName, ServiceStats, SERVICE_STATS_MAX},
};

/// Frontends: (address, port, protocol) → backend groups; resized by `--max-services`.
#[btf_map]
pub static XLB_SERVICES: HashMap<ServiceKey, ServiceValue, { SERVICES_MAX as usize }> = HashMap::new();

/// Backend slots: (group, slot) → endpoint; resized by `--max-backends`.
#[btf_map]
pub static XLB_BACKENDS: HashMap<BackendKey, Backend, { BACKENDS_MAX as usize }> = HashMap::new();

/// Client → frontend tuple → backend; sized like the conntrack table.
#[btf_map]
pub static XLB_CT_SERVICE: LruHashMap<CtKey, CtBackend, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// Connections by client → backend tuple; resized by `--conntrack-size`.
#[btf_map]
pub static XLB_CONNTRACK: LruHashMap<CtKey, CtEntry, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// SNAT bindings by reply tuple; sized like the conntrack table.
#[btf_map]
pub static XLB_NAT: LruHashMap<CtKey, NatEntry, { CONNTRACK_MAX as usize }> = LruHashMap::new();

/// Session affinity: (client, group) → backend.
#[btf_map]
pub static XLB_AFFINITY: LruHashMap<AffinityKey, AffinityEntry, { AFFINITY_MAX as usize }> =
    LruHashMap::new();

/// `loadBalancerSourceRanges`: (frontend, client prefix) → 1.
#[btf_map]
pub static XLB_SOURCE_RANGES: LpmTrie<SourceRangeKey, u8, { SOURCE_RANGES_MAX as usize }> = LpmTrie::new();

/// The frontend each socket of the node's processes addressed, by (socket, backend).
#[btf_map]
pub static XLB_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue, { SOCK_REVNAT_MAX as usize }> =
    LruHashMap::new();

/// The ports of fragmented datagrams, for their later fragments.
#[btf_map]
pub static XLB_FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts, { FRAGMENTS_MAX as usize }> =
    LruHashMap::new();

/// Node settings, slot 0.
#[btf_map]
pub static XLB_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Per-CPU packet and byte counters of each Service port, by `ServiceValue::stats_index`;
/// sized down with `--max-services`.
#[btf_map]
pub static XLB_SERVICE_STATS: PerCpuArray<ServiceStats, { SERVICE_STATS_MAX as usize }> = PerCpuArray::new();

/// The Service port each counter slot counts, by `ServiceValue::stats_index`: for `xlb
/// inspect` and bpftool; the programs never read it. Not preallocated: memory for the slots in
/// use only; sized like `XLB_SERVICE_STATS`.
#[btf_map]
pub static XLB_SERVICE_NAMES: HashMap<
    u32,
    ServicePortName,
    { SERVICE_STATS_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

pub type SourceRangeLookup = Key<SourceRangeKey>;
