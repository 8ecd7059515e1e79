//! The SNAT map: which client a backend's reply to a SNAT address and port belongs to.
//!
//! Connections from outside the node to a backend on another node, and hairpin connections
//! (a pod reaching itself through its Service), leave with the node's address and a SNAT
//! port as their source, so the reply comes back through this node. `XLB_CONNTRACK` holds the
//! forward translation; this map, keyed by the reply tuple (backend → SNAT address and port),
//! holds the way back and makes each SNAT port unique per backend. A binding is free again
//! once its connection's conntrack entry is stale or gone.

/// Value of `XLB_NAT` (key: `CtKey` of the reply). 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    /// The client's address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<NatEntry>() == 8);
crate::user_pod!(NatEntry);
