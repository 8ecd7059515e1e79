//! Connection tracking: remember each balanced connection's backend, in both directions.
use aya_ebpf::bindings::BPF_ANY;
use lb_common::{
    conntrack::{
        ct_timeout_ns, CtEntry, CtKey, CT_DIR_FORWARD, CT_DIR_REPLY, CT_STATE_CLOSED, CT_STATE_ESTABLISHED,
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

#[inline(always)]
fn fresh(entry: &CtEntry, proto: u8, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) <= ct_timeout_ns(proto, entry.state)
}

/// The other half of the connection whose `dir` entry for `flow` is `entry`: forward
/// (client → frontend, translated to the backend) and reply (backend → client, translated
/// to the frontend) name each other.
#[inline(always)]
fn partner_key(flow: &Flow, dir: u8, entry: &CtEntry) -> CtKey {
    let mut key = flow.key(if dir == CT_DIR_FORWARD { CT_DIR_REPLY } else { CT_DIR_FORWARD });
    if dir == CT_DIR_FORWARD {
        (key.saddr, key.sport, key.daddr, key.dport) =
            (entry.nat_addr, entry.nat_port, flow.saddr, flow.sport);
    } else {
        (key.saddr, key.sport, key.daddr, key.dport) =
            (flow.daddr, flow.dport, entry.nat_addr, entry.nat_port);
    }
    key
}

#[inline(always)]
fn key_fresh(key: &CtKey, now: u64) -> bool {
    // SAFETY: copied out at once.
    unsafe { XLB_CONNTRACK.get(key) }.is_some_and(|e| fresh(e, key.proto, now))
}

/// Looks up the live entry for `flow` in direction `dir` and marks it used. A connection
/// lives while either half has seen traffic within its timeout (a backend may be silent for
/// long, a client too), and a FIN or RST closes both halves.
#[inline(always)]
fn touch(flow: &Flow, dir: u8, now: u64) -> Option<Translation> {
    let entry = XLB_CONNTRACK.get_ptr_mut(flow.key(dir))?;
    // SAFETY: a map value pointer, valid for this program run; racing writers only ever
    // store whole fields, and a torn timestamp merely shortens or extends one idle period.
    let entry = unsafe { &mut *entry };
    if is_reopen(flow, entry.state) {
        return None;
    }
    let partner = partner_key(flow, dir, entry);
    if !fresh(entry, flow.proto, now) && !key_fresh(&partner, now) {
        return None;
    }
    entry.state = next_state(flow, entry.state);
    entry.last_seen_ns = now;
    if flow.has(TCP_FIN) || flow.has(TCP_RST) {
        if let Some(other) = XLB_CONNTRACK.get_ptr_mut(partner) {
            // SAFETY: as above.
            let other = unsafe { &mut *other };
            other.state = next_state(flow, other.state);
        }
    }
    Some(Translation { addr: entry.nat_addr, port: entry.nat_port })
}

/// Whether the connection whose reply tuple is `reply` (backend → client) is still live:
/// decides when a SNAT port bound to it may be taken by another connection.
#[inline(always)]
pub fn reply_alive(reply: &CtKey, now: u64) -> bool {
    // SAFETY: copied out at once.
    let Some(entry) = (unsafe { XLB_CONNTRACK.get(reply) }).copied() else {
        return false;
    };
    if fresh(&entry, reply.proto, now) {
        return true;
    }
    let forward = CtKey {
        saddr: reply.daddr,
        sport: reply.dport,
        daddr: entry.nat_addr,
        dport: entry.nat_port,
        dir: CT_DIR_FORWARD,
        ..*reply
    };
    key_fresh(&forward, now)
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
