//! The packet pipeline shared by every hook: parse → conntrack → service lookup → backend
//! choice → NAT → forward (the kernel routes; we only translate, pass or drop).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{backend::BACKEND_F_LOCAL, service::SVC_F_EXTERNAL};

use crate::{
    conntrack::{self, Translation},
    nat,
    packet::Packet,
    parse::{parse, Flow, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF},
    service,
};

pub enum Verdict {
    Pass,
    Drop,
}

/// Which end of a packet a translation rewrites.
#[derive(Clone, Copy)]
enum End {
    Source,
    Destination,
}

/// Rewrites the address and port of `end` to `to`, checksums included.
#[inline(always)]
fn rewrite<P: Packet>(pkt: &mut P, flow: &Flow, end: End, to: Translation) -> Verdict {
    let (addr_off, port_off) = match end {
        End::Source => (IP_SADDR_OFF, L4_SPORT_OFF),
        End::Destination => (IP_DADDR_OFF, L4_DPORT_OFF),
    };
    match (pkt.set_addr(flow, flow.l3 + addr_off, to.addr), pkt.set_port(flow, flow.l4 + port_off, to.port)) {
        (Some(()), Some(())) => Verdict::Pass,
        // A half-translated packet must not leave.
        _ => Verdict::Drop,
    }
}

/// Before routing: packets arriving from the fabric or from a local pod.
#[inline(always)]
pub fn ingress<P: Packet>(pkt: &mut P) -> Verdict {
    let Some(flow) = parse(pkt) else {
        return Verdict::Pass;
    };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    // A backend's reply to our SNAT address: hand it back to its client.
    if let Some(client) = nat::lookup_ingress(&flow, now) {
        return rewrite(pkt, &flow, End::Destination, client);
    }
    // A later packet of a balanced connection: same backend as before.
    if let Some(backend) = conntrack::lookup_forward(&flow, now) {
        return rewrite(pkt, &flow, End::Destination, backend);
    }
    // A new connection to a frontend.
    let Some(svc) = service::lookup(&flow) else {
        return Verdict::Pass;
    };
    if svc.backend_count == 0 {
        return Verdict::Drop;
    }
    let Some(backend) = service::select_backend(&svc) else {
        return Verdict::Drop;
    };
    let to = Translation { addr: backend.addr, port: backend.port };
    let needs_snat = svc.flags & SVC_F_EXTERNAL != 0 && backend.flags & BACKEND_F_LOCAL == 0;
    if needs_snat && nat::create(&flow, to, now).is_none() {
        return Verdict::Drop;
    }
    if conntrack::create(&flow, to, now).is_none() {
        return Verdict::Drop;
    }
    rewrite(pkt, &flow, End::Destination, to)
}

/// After routing: packets leaving towards the fabric or a local pod.
#[inline(always)]
pub fn egress<P: Packet>(pkt: &mut P) -> Verdict {
    let Some(flow) = parse(pkt) else {
        return Verdict::Pass;
    };
    // SAFETY: a plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };

    // A backend's reply: it must come from the frontend the client addressed.
    if let Some(frontend) = conntrack::lookup_reply(&flow, now) {
        return rewrite(pkt, &flow, End::Source, frontend);
    }
    // A connection to a backend on another node: SNAT to the node address.
    if let Some(snat) = nat::lookup_egress(&flow, now) {
        return rewrite(pkt, &flow, End::Source, snat);
    }
    Verdict::Pass
}
