//! SNAT for connections balanced to a backend on another node: port allocation and the
//! two bindings (egress: client → node address and port; ingress: the reverse).
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_get_prandom_u32,
};
use lb_common::{
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES},
    conntrack::{ct_timeout_ns, CtKey, CT_DIR_REPLY, CT_STATE_ESTABLISHED},
    nat::{NatEntry, NAT_DIR_EGRESS, NAT_DIR_INGRESS},
};

use crate::{
    conntrack::{self, Translation},
    maps::{XLB_CONFIG, XLB_NAT},
    parse::Flow,
};

#[inline(always)]
fn touch(flow: &Flow, dir: u8, now: u64) -> Option<Translation> {
    let entry = XLB_NAT.get_ptr_mut(flow.key(dir))?;
    // SAFETY: a map value pointer, valid for this program run.
    let entry = unsafe { &mut *entry };
    // The NAT binding lives as long as an established connection may idle; conntrack
    // decides the finer TCP states.
    if now.saturating_sub(entry.last_seen_ns) > ct_timeout_ns(flow.proto, CT_STATE_ESTABLISHED) {
        return None;
    }
    entry.last_seen_ns = now;
    Some(Translation { addr: entry.addr, port: entry.port })
}

/// For a reply from a backend to the SNAT address and port: the client it belongs to.
#[inline(always)]
pub fn lookup_ingress(flow: &Flow, now: u64) -> Option<Translation> {
    // Only SNAT ports can be bound: spares every other packet a lookup.
    let port = u16::from_be(flow.dport);
    if !(SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&port) {
        return None;
    }
    touch(flow, NAT_DIR_INGRESS, now)
}

/// For a DNATed packet leaving towards a backend on another node: its SNAT source.
#[inline(always)]
pub fn lookup_egress(flow: &Flow, now: u64) -> Option<Translation> {
    touch(flow, NAT_DIR_EGRESS, now)
}

/// Binds the new connection `flow` (client → frontend), balanced to `backend`, to a free
/// SNAT port on the node's SNAT address. `None` when no address is configured or no port
/// was free after `SNAT_PORT_TRIES` random tries.
#[inline(always)]
pub fn create(flow: &Flow, backend: Translation, now: u64) -> Option<()> {
    let snat_addr = XLB_CONFIG.get(0)?.snat_addr;
    if snat_addr == 0 {
        return None;
    }
    // The DNATed forward tuple, as egress will see it.
    let mut egress_key = flow.key(NAT_DIR_EGRESS);
    egress_key.daddr = backend.addr;
    egress_key.dport = backend.port;
    let span = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: a plain helper call without arguments.
        let port = (SNAT_PORT_MIN as u32 + unsafe { bpf_get_prandom_u32() } % span) as u16;
        let port = port.to_be();
        let ingress_key = CtKey {
            saddr: backend.addr,
            daddr: snat_addr,
            sport: backend.port,
            dport: port,
            proto: flow.proto,
            dir: NAT_DIR_INGRESS,
            _pad: 0,
        };
        let client = NatEntry { addr: flow.saddr, port: flow.sport, _pad: 0, last_seen_ns: now };
        // NOEXIST: the port is taken if another connection to this backend holds it...
        if XLB_NAT.insert(ingress_key, client, BPF_NOEXIST as u64).is_err() {
            // ...unless that connection is over: then its binding is taken over.
            if bound_connection_alive(&ingress_key, now) {
                continue;
            }
            XLB_NAT.insert(ingress_key, client, BPF_ANY as u64).ok()?;
        }
        let snat = NatEntry { addr: snat_addr, port, _pad: 0, last_seen_ns: now };
        return XLB_NAT.insert(egress_key, snat, BPF_ANY as u64).ok();
    }
    None
}

/// Whether the connection holding the SNAT binding `ingress_key` (backend → SNAT address
/// and port) is still live, judged by conntrack's state and timeouts.
#[inline(always)]
fn bound_connection_alive(ingress_key: &CtKey, now: u64) -> bool {
    // SAFETY: copied out at once.
    let Some(client) = (unsafe { XLB_NAT.get(ingress_key) }).copied() else {
        return false;
    };
    let reply = CtKey { daddr: client.addr, dport: client.port, dir: CT_DIR_REPLY, ..*ingress_key };
    conntrack::reply_alive(&reply, now)
}
