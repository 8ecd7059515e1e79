//! The session affinity map (`sessionAffinity: ClientIP`): which backend a client address was
//! last given in a backend group.
//!
//! The entry is checked against the slot it names, so a backend that left the group is never
//! reused, and its timer restarts with every new connection (iptables `recent --set`).

/// Key of `XLB_AFFINITY`. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityKey {
    /// Client IPv4 address, network byte order.
    pub client_addr: u32,
    /// The backend group the client was balanced in.
    pub group_id: u32,
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

const _: () = assert!(core::mem::size_of::<AffinityKey>() == 8);
const _: () = assert!(core::mem::size_of::<AffinityEntry>() == 16);
crate::user_pod!(AffinityKey, AffinityEntry);
