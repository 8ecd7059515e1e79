//! The session affinity map (`sessionAffinity: ClientIP`): which backend a client was last
//! given in a backend group. A client is an address for the packet path (kube-proxy keys
//! affinity by client IP) and a network namespace for socket balancing, where the source
//! address is not chosen yet at `connect()`: one pod, one namespace, one client.
//!
//! The entry is checked against the slot it names, so a backend that left the group is never
//! reused, and its timer restarts with every new connection (iptables `recent --set`).

/// Key of `XLB_AFFINITY`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client IPv4 address, network byte order; 0 for a socket's client.
    pub client_addr: u32,
    /// The backend group the client was balanced in.
    pub group_id: u32,
    /// Network namespace cookie of a socket's client (`bpf_get_netns_cookie`); 0 for a
    /// packet's client.
    pub netns_cookie: u64,
}

/// Value of `XLB_AFFINITY`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityEntry {
    /// The slot the backend had in the group; valid while that slot still holds it.
    pub slot: u32,
    /// Backend address, network byte order (the slot's port is used as it is now).
    pub backend_addr: u32,
    /// `bpf_ktime_get_ns()` of the last new connection that used the entry.
    pub last_used_ns: u64,
}

const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);
crate::user_pod!(AffinityKey, AffinityEntry);
