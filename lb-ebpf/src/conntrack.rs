//! Connection tracking: one `XLB_CONNTRACK` entry per balanced connection, met by both
//! directions, and the `XLB_CT_SERVICE` entry that leads a client's packet to it.
use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    conntrack::{
        CtBackend, CtEntry, CtKey, CT_F_REPLIED, CT_STATE_CLOSED, CT_STATE_ESTABLISHED, CT_STATE_FIN,
        CT_STATE_OTHER, CT_STATE_SYN_SENT,
    },
    proto,
};

use crate::{
    maps::{XLB_CONNTRACK, XLB_CT_SERVICE},
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// An address and port to translate to, network byte order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
}

/// The state after `flow`'s packet (either direction), given the state before.
#[inline(always)]
fn next_state(flow: &Flow, state: u8) -> u8 {
    if flow.proto != proto::TCP {
        CT_STATE_OTHER
    } else if flow.has(TCP_RST) || state == CT_STATE_CLOSED {
        CT_STATE_CLOSED
    } else if flow.has(TCP_FIN) || state == CT_STATE_FIN {
        // Once closing, late ACKs must not make the connection established again.
        CT_STATE_FIN
    } else if flow.has(TCP_SYN) && !flow.has(TCP_ACK) {
        CT_STATE_SYN_SENT
    } else {
        CT_STATE_ESTABLISHED
    }
}

/// A TCP SYN opens a new connection; on a reused tuple it replaces the old one.
#[inline(always)]
fn is_syn(flow: &Flow) -> bool {
    flow.proto == proto::TCP && flow.has(TCP_SYN) && !flow.has(TCP_ACK)
}

/// The live connection `key` (client → backend), or `None` when absent or past its timeout.
#[inline(always)]
fn live(key: &CtKey, now: u64) -> Option<&'static mut CtEntry> {
    let entry = XLB_CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a map value pointer, valid for this program run; racing writers only ever
    // store whole fields, and a torn timestamp merely shortens or extends one idle period.
    let entry = unsafe { &mut *entry };
    entry.fresh(key.proto, now).then_some(entry)
}

#[inline(always)]
fn touch(entry: &mut CtEntry, flow: &Flow, now: u64) {
    entry.state = next_state(flow, entry.state);
    entry.last_seen_ns = now;
    stats::count(entry.stats_index, flow.len);
}

/// The client → backend tuple of the client's packet `flow`, balanced to `backend`.
#[inline(always)]
pub fn backend_key(flow: &Flow, backend: Endpoint) -> CtKey {
    CtKey { daddr: backend.addr, dport: backend.port, ..flow.key() }
}

/// A later packet from a client: the backend its connection was given. A SYN opening a new
/// connection on the tuple of a finished one gets `None`, and is balanced anew.
#[inline(always)]
pub fn lookup_client(flow: &Flow, now: u64) -> Option<Endpoint> {
    // SAFETY: copied out at once.
    let backend = unsafe { XLB_CT_SERVICE.get(flow.key()) }.copied()?;
    let backend = Endpoint { addr: backend.addr, port: backend.port };
    let entry = live(&backend_key(flow, backend), now)?;
    if is_syn(flow) && matches!(entry.state, CT_STATE_FIN | CT_STATE_CLOSED) {
        return None;
    }
    touch(entry, flow, now);
    Some(backend)
}

/// A client's SYN addressed to no frontend (straight to a backend, e.g. after socket
/// balancing or to a pod's own address) on the client → backend tuple of a finished balanced
/// connection: a new connection the balancer does not translate, so the finished one's
/// entries go. Kept, they would give its replies the old frontend as their source (and its
/// packets the old SNAT source) until they expire, and the client would never see it answer.
#[inline(always)]
pub fn end_finished(flow: &Flow, now: u64) {
    if !is_syn(flow) {
        return;
    }
    let key = flow.key();
    let Some(entry) = live(&key, now) else { return };
    if !matches!(entry.state, CT_STATE_FIN | CT_STATE_CLOSED) {
        return;
    }
    let frontend = CtKey { daddr: entry.frontend_addr, dport: entry.frontend_port, ..key };
    let _ = XLB_CT_SERVICE.remove(&frontend);
    let _ = XLB_CONNTRACK.remove(&key);
}

/// A backend's reply `flow` (backend → client, after any SNAT was undone): the frontend it
/// must come from.
#[inline(always)]
pub fn lookup_reply(flow: &Flow, now: u64) -> Option<Endpoint> {
    let entry = live(&flow.key().reversed(), now)?;
    touch(entry, flow, now);
    entry.flags |= CT_F_REPLIED;
    Some(Endpoint { addr: entry.frontend_addr, port: entry.frontend_port })
}

/// A client's packet after DNAT (client → backend) leaving the node: its SNAT source, if
/// the connection has one.
#[inline(always)]
pub fn snat_source(flow: &Flow, now: u64) -> Option<Endpoint> {
    let entry = live(&flow.key(), now)?;
    (entry.snat_addr != 0).then_some(Endpoint { addr: entry.snat_addr, port: entry.snat_port })
}

/// The connection `key` (client → backend) if live; for SNAT bindings and ICMP errors.
#[inline(always)]
pub fn get(key: &CtKey, now: u64) -> Option<CtEntry> {
    live(key, now).map(|e| *e)
}

/// Records a new connection from the client's packet `flow` (to `frontend`) to `backend`,
/// with an optional SNAT source, and counts the packet for the Service port `stats_index`.
#[inline(always)]
pub fn create(
    flow: &Flow,
    backend: Endpoint,
    snat: Option<Endpoint>,
    stats_index: u16,
    now: u64,
) -> Option<()> {
    let snat = snat.unwrap_or(Endpoint { addr: 0, port: 0 });
    let entry = CtEntry {
        frontend_addr: flow.daddr,
        frontend_port: flow.dport,
        snat_port: snat.port,
        snat_addr: snat.addr,
        state: next_state(flow, CT_STATE_OTHER),
        flags: 0,
        stats_index,
        created_ns: now,
        last_seen_ns: now,
    };
    XLB_CONNTRACK.insert(backend_key(flow, backend), entry, BPF_ANY as u64).ok()?;
    let value = CtBackend { addr: backend.addr, port: backend.port, _pad: 0 };
    XLB_CT_SERVICE.insert(flow.key(), value, BPF_ANY as u64).ok()?;
    stats::count(stats_index, flow.len);
    Some(())
}
