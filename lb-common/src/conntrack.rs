//! Connection tracking: one entry per balanced connection, met by both directions.
//!
//! Two maps:
//! - `XLB_CT_SERVICE`: the tuple the client sent (client → frontend) → the backend it was
//!   given. Read at ingress only, to find the connection of a later client packet.
//! - `XLB_CONNTRACK`: the connection itself, keyed by the client → backend tuple (after DNAT,
//!   before any SNAT: exactly the flow the kernel's own conntrack and routing see). Client
//!   packets look it up as they are, backend replies with their tuple reversed, so both
//!   directions meet this one entry: its TCP state, its timestamps and the translations to
//!   undo (the frontend for replies, the SNAT source for client packets).
//!
//! Both are LRU hashes; the entry's last-seen time and state decide when it is stale, so
//! entries expire on lookup without a userspace sweep.

/// Key of `XLB_CONNTRACK` and `XLB_CT_SERVICE`; also of `XLB_NAT`. 16 bytes.
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
    /// Always 0.
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The same flow seen from the other end.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self { saddr: self.daddr, daddr: self.saddr, sport: self.dport, dport: self.sport, ..*self }
    }
}

/// TCP state as far as the balancer needs it: how long an idle entry stays valid.
pub const CT_STATE_OTHER: u8 = 0;
pub const CT_STATE_SYN_SENT: u8 = 1;
pub const CT_STATE_ESTABLISHED: u8 = 2;
/// A FIN was seen: the connection is closing.
pub const CT_STATE_FIN: u8 = 3;
/// A RST was seen.
pub const CT_STATE_CLOSED: u8 = 4;

/// The backend has answered at least once (UDP: the flow is a stream).
pub const CT_F_REPLIED: u8 = 1 << 0;

const SEC: u64 = 1_000_000_000;
/// Idle timeouts, as kube-proxy configures netfilter (nf_conntrack_tcp_timeout_established
/// 86400 s) and the kernel defaults for the rest (syn_sent 120 s, fin_wait 120 s, close 10 s,
/// udp 30 s, udp stream 120 s). Past its timeout an entry counts as absent.
pub const CT_TIMEOUT_SYN_NS: u64 = 120 * SEC;
pub const CT_TIMEOUT_ESTABLISHED_NS: u64 = 86_400 * SEC;
pub const CT_TIMEOUT_FIN_NS: u64 = 120 * SEC;
pub const CT_TIMEOUT_CLOSED_NS: u64 = 10 * SEC;
pub const CT_TIMEOUT_UDP_NS: u64 = 30 * SEC;
pub const CT_TIMEOUT_UDP_STREAM_NS: u64 = 120 * SEC;

/// Idle timeout of an entry in `state` with `flags` for `proto`.
#[inline(always)]
pub fn ct_timeout_ns(proto: u8, state: u8, flags: u8) -> u64 {
    if proto != crate::proto::TCP {
        return if flags & CT_F_REPLIED != 0 { CT_TIMEOUT_UDP_STREAM_NS } else { CT_TIMEOUT_UDP_NS };
    }
    match state {
        CT_STATE_ESTABLISHED => CT_TIMEOUT_ESTABLISHED_NS,
        CT_STATE_FIN => CT_TIMEOUT_FIN_NS,
        CT_STATE_CLOSED => CT_TIMEOUT_CLOSED_NS,
        _ => CT_TIMEOUT_SYN_NS,
    }
}

/// Value of `XLB_CONNTRACK`. 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtEntry {
    /// The frontend the client addressed: replies get it back as their source. Network order.
    pub frontend_addr: u32,
    pub frontend_port: u16,
    /// SNAT source port, network byte order; 0 when the connection is not SNATed.
    pub snat_port: u16,
    /// SNAT source address, network byte order; 0 when the connection is not SNATed.
    pub snat_addr: u32,
    /// `CT_STATE_*`.
    pub state: u8,
    /// `CT_F_*` bits.
    pub flags: u8,
    /// The Service port's counters (`ServiceValue::stats_index`), for every later packet.
    pub stats_index: u16,
    /// `bpf_ktime_get_ns()` when the entry was created.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns()` of the last packet, either direction.
    pub last_seen_ns: u64,
}

impl CtEntry {
    /// Whether the entry is still within its idle timeout at `now`.
    #[inline(always)]
    pub fn fresh(&self, proto: u8, now: u64) -> bool {
        now.saturating_sub(self.last_seen_ns) <= ct_timeout_ns(proto, self.state, self.flags)
    }
}

/// Value of `XLB_CT_SERVICE`: the backend of the connection. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtBackend {
    /// Network byte order.
    pub addr: u32,
    pub port: u16,
    /// Always 0.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<CtKey>() == 16);
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);
const _: () = assert!(core::mem::size_of::<CtBackend>() == 8);
crate::user_pod!(CtKey, CtEntry, CtBackend);

#[cfg(feature = "user")]
impl CtKey {
    pub fn new(
        saddr: core::net::Ipv4Addr,
        sport: u16,
        daddr: core::net::Ipv4Addr,
        dport: u16,
        proto: u8,
    ) -> Self {
        Self {
            saddr: u32::from(saddr).to_be(),
            daddr: u32::from(daddr).to_be(),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }
}
