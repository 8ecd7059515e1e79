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
/// `FragmentKey` → `FragmentPorts`, LRU hash.
pub const FRAGMENTS: &str = "XLB_FRAGMENTS";
/// `u32` (always 0) → `NodeConfig`, array of 1.
pub const CONFIG: &str = "XLB_CONFIG";
/// `u32` (`ServiceValue::stats_index`) → `ServiceStats`, per-CPU array.
pub const SERVICE_STATS: &str = "XLB_SERVICE_STATS";
/// `u32` (`ServiceValue::stats_index`) → `ServicePortName`, hash (not preallocated): the
/// Service port each counter slot counts, for `xlb inspect`; the programs never read it.
pub const SERVICE_NAMES: &str = "XLB_SERVICE_NAMES";

/// Every map, in the order they are pinned and removed.
pub const ALL: [&str; 12] = [
    SERVICES,
    BACKENDS,
    CT_SERVICE,
    CONNTRACK,
    NAT,
    AFFINITY,
    SOURCE_RANGES,
    SOCK_REVNAT,
    FRAGMENTS,
    CONFIG,
    SERVICE_STATS,
    SERVICE_NAMES,
];

/// The version of the maps' layouts. Bump it with every incompatible change to a map: its
/// type or flags, or what its key or value holds (a field added, removed, resized, moved or
/// read differently, e.g. in another byte order), and set that map's entry in
/// `LAYOUT_CHANGED` to the new version. The agent records the version in
/// `NodeConfig::layout_version` (`XLB_CONFIG`); a restarted agent reuses a pinned map only if
/// its layout has not changed since the version recorded there and its type, key size, value
/// size and flags are the ones the programs expect. Any other map is recreated (see "Upgrades"
/// in docs/ARCHITECTURE.md).
pub const LAYOUT_VERSION: u32 = 3;

/// Per map, the layout version in which its layout last changed (a new map: the version
/// that added it).
pub const LAYOUT_CHANGED: [(&str, u32); 12] = [
    (SERVICES, 1),
    (BACKENDS, 1),
    (CT_SERVICE, 1),
    (CONNTRACK, 1),
    (NAT, 1),
    // Version 3: keyed by network namespace too (socket balancing, per pod).
    (AFFINITY, 3),
    (SOURCE_RANGES, 1),
    (SOCK_REVNAT, 1),
    // Version 3: added.
    (FRAGMENTS, 3),
    // Version 3: the node's network namespace cookie.
    (CONFIG, 3),
    (SERVICE_STATS, 1),
    // Version 2: added.
    (SERVICE_NAMES, 2),
];

/// The layout version in which map `name`'s layout last changed (`LAYOUT_VERSION` for a
/// name not listed: treated as just changed).
pub fn layout_changed(name: &str) -> u32 {
    LAYOUT_CHANGED.iter().find(|(n, _)| *n == name).map_or(LAYOUT_VERSION, |(_, v)| *v)
}

/// The maps the agent fills from desired state: recreating one loses nothing, the agent
/// writes it again. The others (conntrack, SNAT, affinity, socket reverse NAT) hold the state
/// of live connections, which a recreated map loses.
pub const DESIRED_STATE: [&str; 6] =
    [SERVICES, BACKENDS, SOURCE_RANGES, CONFIG, SERVICE_STATS, SERVICE_NAMES];

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
/// Fragmented datagrams in flight whose later fragments are still to come. LRU: an evicted
/// datagram's later fragments pass untranslated, as those of an unknown one.
pub const FRAGMENTS_MAX: u32 = 8_192;
