//! SNAT for connections whose reply would otherwise not come back through this node:
//! port allocation and the reverse binding (backend → SNAT address and port ⇒ client).
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use lb_common::{
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES},
    conntrack::{CtEntry, CtKey, CT_STATE_CLOSED},
    nat::NatEntry,
};

use crate::{
    conntrack::{self, Endpoint},
    maps::{XLB_CONFIG, XLB_NAT},
    parse::Flow,
};

/// Whether `port` (network byte order) is one SNAT allocates: spares other packets a lookup.
#[inline(always)]
pub fn is_snat_port(port: u16) -> bool {
    (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&u16::from_be(port))
}

/// The client a SNAT binding `reply` (backend → SNAT address and port) belongs to, if its
/// connection is live and still uses that binding.
#[inline(always)]
pub fn client_of(reply: &CtKey, now: u64) -> Option<Endpoint> {
    binding(reply, now).map(|(client, _)| client)
}

/// The client of the binding `reply` and its connection's entry, if live and still using it.
#[inline(always)]
fn binding(reply: &CtKey, now: u64) -> Option<(Endpoint, CtEntry)> {
    // SAFETY: copied out at once.
    let client = unsafe { XLB_NAT.get(reply) }.copied()?;
    let connection =
        CtKey { saddr: client.addr, sport: client.port, daddr: reply.saddr, dport: reply.sport, ..*reply };
    let entry = conntrack::get(&connection, now)?;
    (entry.snat_addr == reply.daddr && entry.snat_port == reply.dport)
        .then_some((Endpoint { addr: client.addr, port: client.port }, entry))
}

/// Whether a new connection must leave the binding `reply` alone: its connection is live and
/// was not reset. A reset connection's tuple is free at once (the backend has no socket left
/// on it), as netfilter's NAT lets a new SYN reuse the tuple of a closed connection; without
/// that, short connections ended by RST would hold every port for the closed timeout.
#[inline(always)]
fn is_held(reply: &CtKey, now: u64) -> bool {
    binding(reply, now).is_some_and(|(_, entry)| entry.state != CT_STATE_CLOSED)
}

/// Binds the client's new connection `flow`, balanced to `backend`, to a free SNAT port on
/// the node's SNAT address. `None` when no address is configured or no port was free after
/// `SNAT_PORT_TRIES` random tries.
#[inline(always)]
pub fn allocate(flow: &Flow, backend: Endpoint, now: u64) -> Option<Endpoint> {
    let snat_addr = XLB_CONFIG.get(0)?.snat_addr;
    if snat_addr == 0 {
        return None;
    }
    let client = NatEntry { addr: flow.saddr, port: flow.sport, _pad: 0 };
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: a plain helper call without arguments.
        let port = ((SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16).to_be();
        let reply = CtKey {
            saddr: backend.addr,
            daddr: snat_addr,
            sport: backend.port,
            dport: port,
            proto: flow.proto,
            _pad: [0; 3],
        };
        // NOEXIST: the port is taken if another connection to this backend holds it, unless
        // that connection is over or was reset: then its binding is taken over.
        if XLB_NAT.insert(reply, client, BPF_NOEXIST as u64).is_err() {
            if is_held(&reply, now) {
                continue;
            }
            XLB_NAT.insert(reply, client, BPF_ANY as u64).ok()?;
        }
        return Some(Endpoint { addr: snat_addr, port });
    }
    None
}
