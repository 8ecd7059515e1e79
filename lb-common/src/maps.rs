//! Map names (the names they are pinned under) and default sizes, in one place.

/// `ServiceKey` → `ServiceValue`, hash.
pub const SERVICES: &str = "XLB_SERVICES";
/// `BackendKey` → `Backend`, hash.
pub const BACKENDS: &str = "XLB_BACKENDS";
/// `CtKey` → `CtEntry`, LRU hash.
pub const CONNTRACK: &str = "XLB_CONNTRACK";
/// `CtKey` → `NatEntry`, LRU hash.
pub const NAT: &str = "XLB_NAT";
/// `u32` (always 0) → `NodeConfig`, array of 1.
pub const CONFIG: &str = "XLB_CONFIG";

/// Every map, in the order they are pinned and removed.
pub const ALL: [&str; 5] = [SERVICES, BACKENDS, CONNTRACK, NAT, CONFIG];

/// Frontends: 10,000 Services with a few ports, each on a ClusterIP and a couple of node addresses.
pub const SERVICES_MAX: u32 = 65_536;
/// Backend slots over all groups.
pub const BACKENDS_MAX: u32 = 131_072;
/// Tracked connections (two entries each); the agent's `--conntrack-size` overrides it and
/// sizes `XLB_NAT` alike. LRU: a full table evicts the least recently used entry.
pub const CONNTRACK_MAX: u32 = 262_144;
