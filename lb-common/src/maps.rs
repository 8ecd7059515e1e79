//! Map names (the names they are pinned under) and default sizes, in one place.

/// `ServiceKey` → `ServiceValue`, hash.
pub const SERVICES: &str = "XLB_SERVICES";
/// `BackendKey` → `Backend`, hash.
pub const BACKENDS: &str = "XLB_BACKENDS";
/// `CtKey` (client → frontend) → `CtBackend`, LRU hash.
pub const CT_SERVICE: &str = "XLB_CT_SERVICE";
/// `CtKey` (client → backend) → `CtEntry`, LRU hash.
pub const CONNTRACK: &str = "XLB_CONNTRACK";
/// `CtKey` (backend → SNAT address) → `NatEntry`, LRU hash.
pub const NAT: &str = "XLB_NAT";
/// `AffinityKey` → `AffinityEntry`, LRU hash.
pub const AFFINITY: &str = "XLB_AFFINITY";
/// `Key<SourceRangeKey>` → `u8`, LPM trie.
pub const SOURCE_RANGES: &str = "XLB_SOURCE_RANGES";
/// `SockRevNatKey` → `SockRevNatValue`, LRU hash.
pub const SOCK_REVNAT: &str = "XLB_SOCK_REVNAT";
/// `u32` (always 0) → `NodeConfig`, array of 1.
pub const CONFIG: &str = "XLB_CONFIG";
/// `u32` (`ServiceValue::stats_index`) → `ServiceStats`, per-CPU array.
pub const SERVICE_STATS: &str = "XLB_SERVICE_STATS";

/// Every map, in the order they are pinned and removed.
pub const ALL: [&str; 10] = [
    SERVICES,
    BACKENDS,
    CT_SERVICE,
    CONNTRACK,
    NAT,
    AFFINITY,
    SOURCE_RANGES,
    SOCK_REVNAT,
    CONFIG,
    SERVICE_STATS,
];

/// Frontends (`--max-services`): 10,000 Services with a few ports, each on a ClusterIP and
/// on the node's addresses.
pub const SERVICES_MAX: u32 = 65_536;
/// Backend slots over all groups (`--max-backends`).
pub const BACKENDS_MAX: u32 = 262_144;
/// Tracked connections (`--conntrack-size`); sizes `XLB_CT_SERVICE` and `XLB_NAT` alike.
/// LRU: a full table evicts the least recently used entry.
pub const CONNTRACK_MAX: u32 = 524_288;
/// Clients with session affinity, over all Services. LRU.
pub const AFFINITY_MAX: u32 = 65_536;
/// Allowed source prefixes over all LoadBalancer frontends.
pub const SOURCE_RANGES_MAX: u32 = 16_384;
/// Sockets of the node's processes connected to a frontend. LRU.
pub const SOCK_REVNAT_MAX: u32 = 65_536;
