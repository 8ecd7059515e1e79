//! Per-node settings the agent hands to the programs (`XLB_CONFIG`, one array slot).

/// Value of `XLB_CONFIG[0]`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// Address connections are SNATed to when they leave for a backend on another node
    /// (the node's primary IPv4 address), network byte order. 0 disables SNAT: such
    /// connections are then dropped rather than sent out with a source the reply cannot reach.
    pub snat_addr: u32,
    /// `maps::LAYOUT_VERSION` of the agent that filled the maps, host byte order; 0 from
    /// agents before layouts were versioned, whose layouts are those of version 1. The
    /// programs never read it. It stays at bytes 4..8 in every future layout of this value,
    /// so any later agent can read it from the pinned map.
    pub layout_version: u32,
    /// Cookie of the node's own network namespace (the agent's), host byte order: sockets
    /// elsewhere belong to pods, whose UDP the packet path balances (see `lb-ebpf/src/socket.rs`).
    pub host_netns_cookie: u64,
}

/// SNAT source ports. Above Linux's default ephemeral range (32768-60999) so a translated
/// connection never takes the tuple of a socket the node itself opened to the same backend.
pub const SNAT_PORT_MIN: u16 = 61000;
pub const SNAT_PORT_MAX: u16 = 65535;
/// Random ports tried before a new connection needing SNAT is dropped as unroutable.
pub const SNAT_PORT_TRIES: u32 = 8;

const _: () = assert!(core::mem::size_of::<NodeConfig>() == 16);
crate::user_pod!(NodeConfig);
