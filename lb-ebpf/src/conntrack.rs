//! Connection tracking: remember each balanced connection's backend, in both directions.
use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    conntrack::{
        ct_timeout_ns, CtEntry, CT_DIR_FORWARD, CT_DIR_REPLY, CT_STATE_CLOSED, CT_STATE_ESTABLISHED,
        CT_STATE_FIN, CT_STATE_OTHER, CT_STATE_SYN_SENT,
    },
    proto,
};

use crate::{
    maps::XLB_CONNTRACK,
    parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Where a tracked packet is to be translated to: `addr:port`, network byte order.
#[derive(Clone, Copy)]
pub struct Translation {
    pub addr: u32,
    pub port: u16,
}

/// The state after `flow`'s packet, given the state before.
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

/// A TCP SYN on a closing or closed entry opens a new connection on a reused tuple.
#[inline(always)]
fn is_reopen(flow: &Flow, state: u8) -> bool {
    flow.proto == proto::TCP
        && flow.has(TCP_SYN)
        && !flow.has(TCP_ACK)
        && (state == CT_STATE_FIN || state == CT_STATE_CLOSED)
}

/// Looks up the live entry for `flow` in direction `dir` and marks it used.
#[inline(always)]
fn touch(flow: &Flow, dir: u8, now: u64) -> Option<Translation> {
    let entry = XLB_CONNTRACK.get_ptr_mut(flow.key(dir))?;
    // SAFETY: a map value pointer, valid for this program run; racing writers only ever
    // store whole fields, and a torn timestamp merely shortens or extends one idle period.
    let entry = unsafe { &mut *entry };
    if now.saturating_sub(entry.last_seen_ns) > ct_timeout_ns(flow.proto, entry.state)
        || is_reopen(flow, entry.state)
    {
        return None;
    }
    entry.state = next_state(flow, entry.state);
    entry.last_seen_ns = now;
    Some(Translation { addr: entry.nat_addr, port: entry.nat_port })
}

/// The backend of an established connection, for a packet from the client.
#[inline(always)]
pub fn lookup_forward(flow: &Flow, now: u64) -> Option<Translation> {
    touch(flow, CT_DIR_FORWARD, now)
}

/// The frontend a backend's reply must appear to come from.
#[inline(always)]
pub fn lookup_reply(flow: &Flow, now: u64) -> Option<Translation> {
    touch(flow, CT_DIR_REPLY, now)
}

/// Records a new connection from `flow` (client → frontend) to `backend`: the forward
/// entry and the reply entry (backend → client).
#[inline(always)]
pub fn create(flow: &Flow, backend: Translation, now: u64) -> Option<()> {
    let state = next_state(flow, CT_STATE_OTHER);
    let forward = CtEntry {
        nat_addr: backend.addr,
        nat_port: backend.port,
        state,
        _pad: 0,
        created_ns: now,
        last_seen_ns: now,
    };
    XLB_CONNTRACK.insert(flow.key(CT_DIR_FORWARD), forward, BPF_ANY as u64).ok()?;
    let mut reply_key = flow.key(CT_DIR_REPLY);
    reply_key.saddr = backend.addr;
    reply_key.sport = backend.port;
    reply_key.daddr = flow.saddr;
    reply_key.dport = flow.sport;
    let reply = CtEntry { nat_addr: flow.daddr, nat_port: flow.dport, ..forward };
    XLB_CONNTRACK.insert(reply_key, reply, BPF_ANY as u64).ok()
}
