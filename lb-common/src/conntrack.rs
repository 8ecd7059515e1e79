//! The connection tracking map: which backend a connection was given, in both directions.
//!
//! A balanced connection has two entries: `CT_DIR_FORWARD` keyed by the tuple the client
//! sent (to the frontend), read at ingress to DNAT every later packet to the same backend;
//! and `CT_DIR_REPLY` keyed by the backend's reply tuple (backend → client), read at egress
//! to put the frontend back as the source. The map is an LRU hash and every entry carries
//! its last-seen time, so stale entries expire without any userspace sweep.

/// Key of `XLB_CONNTRACK`; also the key of `XLB_NAT`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    /// Source IPv4 address, network byte order.
    pub saddr: u32,
    /// Destination IPv4 address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// `CT_DIR_*` (conntrack) or `NAT_DIR_*` (nat): which hook reads the entry.
    pub dir: u8,
    /// Always 0.
    pub _pad: u16,
}

/// Client → frontend, read at ingress: DNAT to `CtEntry::nat_addr:nat_port` (the backend).
pub const CT_DIR_FORWARD: u8 = 0;
/// Backend → client, read at egress: SNAT back to `CtEntry::nat_addr:nat_port` (the frontend).
pub const CT_DIR_REPLY: u8 = 1;

/// TCP state as far as the balancer needs it: how long an idle entry stays valid.
pub const CT_STATE_OTHER: u8 = 0;
pub const CT_STATE_SYN_SENT: u8 = 1;
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// A FIN was seen: the connection is closing.
pub const CT_STATE_FIN: u8 = 3;
/// A RST was seen.
pub const CT_STATE_CLOSED: u8 = 4;

const SEC: u64 = 1_000_000_000;
/// Idle timeouts, as kube-proxy configures netfilter (nf_conntrack_tcp_timeout_established
/// 86400 s) and the kernel defaults for the rest (syn_sent 120 s, fin_wait 120 s, close 10 s,
/// udp 30 s). Past its timeout an entry counts as absent: a new connection is balanced anew.
pub const CT_TIMEOUT_SYN_NS: u64 = 120 * SEC;
pub const CT_TIMEOUT_ESTABLISHED_NS: u64 = 86_400 * SEC;
pub const CT_TIMEOUT_FIN_NS: u64 = 120 * SEC;
pub const CT_TIMEOUT_CLOSED_NS: u64 = 10 * SEC;
pub const CT_TIMEOUT_UDP_NS: u64 = 30 * SEC;

/// Idle timeout of an entry in `state` for `proto`.
#[inline(always)]
pub fn ct_timeout_ns(proto: u8, state: u8) -> u64 {
    if proto != crate::proto::TCP {
        return CT_TIMEOUT_UDP_NS;
    }
    match state {
        CT_STATE_ESTABLISHED => CT_TIMEOUT_ESTABLISHED_NS,
        CT_STATE_FIN => CT_TIMEOUT_FIN_NS,
        CT_STATE_CLOSED => CT_TIMEOUT_CLOSED_NS,
        _ => CT_TIMEOUT_SYN_NS,
    }
}

/// Value of `XLB_CONNTRACK`. 24 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// Forward: backend address; reply: frontend address. Network byte order.
    pub nat_addr: u32,
    /// Forward: backend port; reply: frontend port. Network byte order.
    pub nat_port: u16,
    /// `CT_STATE_*`.
    pub state: u8,
    /// Always 0.
    pub _pad: u8,
    /// `bpf_ktime_get_ns()` when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet that used the entry.
    pub last_seen_ns: u64,
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 24);
crate::user_pod!(CtKey, CtEntry);

#[cfg(feature = "user")]
impl CtKey {
    pub fn new(
        saddr: core::net::Ipv4Addr,
        sport: u16,
        daddr: core::net::Ipv4Addr,
        dport: u16,
        proto: u8,
        dir: u8,
    ) -> Self {
        Self {
            saddr: u32::from(saddr).to_be(),
            daddr: u32::from(daddr).to_be(),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            dir,
            _pad: 0,
        }
    }
}
