//! The SNAT map: source translation for connections sent to a backend on another node.
//!
//! Keyed by `CtKey` like the conntrack map. `NAT_DIR_EGRESS` is keyed by the DNATed forward
//! tuple (client → backend) and read at egress: the source becomes the node address and an
//! allocated port. `NAT_DIR_INGRESS` is keyed by the backend's reply to that address and port
//! and read at ingress: the destination becomes the client again. Kept apart from conntrack
//! because only cross-node connections need it, and its key space (node address, SNAT port)
//! is what must stay unique.

/// Forward tuple after DNAT, read at egress: rewrite the source to `NatEntry`.
pub const NAT_DIR_EGRESS: u8 = 0;
/// Reply to the SNAT address and port, read at ingress: rewrite the destination to `NatEntry`.
pub const NAT_DIR_INGRESS: u8 = 1;

/// Value of `XLB_NAT`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatEntry {
    /// Egress: the SNAT address; ingress: the client address. Network byte order.
    pub addr: u32,
    /// Egress: the SNAT port; ingress: the client port. Network byte order.
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` of the last packet that used the entry.
    pub last_seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<NatEntry>() == 16);
crate::user_pod!(NatEntry);
