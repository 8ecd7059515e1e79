//! The packet pipeline shared by every hook: parse → conntrack → service lookup → backend
//! choice → NAT → forward (the kernel routes; we translate, pass, drop or reject).
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{backend::BACKEND_F_LOCAL, service::SVC_F_NO_ENDPOINTS, service::SVC_F_SOURCE_RANGES};

pub use crate::service::Origin;
use crate::{
    conntrack::{self, Endpoint},
    fragments, icmp, nat,
    packet::Packet,
    parse::{parse, Flow, Parsed, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF},
    reject, service,
};

pub enum Verdict {
    Pass,
    Drop,
    /// The packet was rewritten into an ICMP error for its sender: send it back out the
    /// interface it came in on.
    Bounce,
}

/// Which end of a packet a translation rewrites.
#[derive(Clone, Copy)]
enum End {
    Source,
    Destination,
}

/// Rewrites the address and port of `end` to `to`, checksums included (a later fragment
/// holds only the address). A first fragment leaves its ports for the later ones.
#[inline(always)]
fn rewrite<P: Packet>(pkt: &mut P, flow: &Flow, end: End, to: Endpoint) -> Verdict {
    let (addr_off, port_off) = match end {
        End::Source => (IP_SADDR_OFF, L4_SPORT_OFF),
        End::Destination => (IP_DADDR_OFF, L4_DPORT_OFF),
    };
    fragments::remember(flow);
    let port = if flow.has_l4_header() { pkt.set_port(flow, flow.l4 + port_off, to.port) } else { Some(()) };
    match (pkt.set_addr(flow, flow.l3 + addr_off, to.addr), port) {
        (Some(()), Some(())) => Verdict::Pass,
        // A half-translated packet must not leave.
        _ => Verdict::Drop,
    }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a plain helper call without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Before routing: packets arriving from the fabric (`Origin::External`) or from a local pod.
#[inline(always)]
pub fn ingress<P: Packet>(pkt: &mut P, origin: Origin) -> Verdict {
    let mut flow = match parse(pkt) {
        Some(Parsed::Flow(flow)) => flow,
        Some(Parsed::IcmpError(err)) => return icmp::ingress(pkt, &err, now()),
        None => return Verdict::Pass,
    };
    if !fragments::complete(&mut flow) {
        return Verdict::Pass;
    }
    let now = now();

    // A backend's reply to a SNAT address: hand it back to its client.
    if nat::is_snat_port(flow.dport) {
        if let Some(client) = nat::client_of(&flow.key(), now) {
            return rewrite(pkt, &flow, End::Destination, client);
        }
    }
    // A later packet of a balanced connection: same backend as before.
    if let Some(backend) = conntrack::lookup_client(&flow, now) {
        return rewrite(pkt, &flow, End::Destination, backend);
    }
    // A new connection to a frontend; a later fragment starts none.
    if !flow.has_l4_header() {
        return Verdict::Pass;
    }
    let Some((frontend, svc)) = service::lookup(flow.daddr, flow.dport, flow.proto) else {
        // Not balanced: it may reuse the tuple of a finished connection that was.
        conntrack::end_finished(&flow, now);
        return Verdict::Pass;
    };
    // As kube-proxy's firewall chain, whoever the client: outside, a pod, the node.
    if svc.flags & SVC_F_SOURCE_RANGES != 0 && !service::source_allowed(frontend, flow.saddr) {
        return Verdict::Drop;
    }
    let group = service::group(&svc, origin);
    if group.1 == 0 {
        if svc.flags & SVC_F_NO_ENDPOINTS != 0 && reject::port_unreachable(pkt, &flow).is_some() {
            return Verdict::Bounce;
        }
        return Verdict::Drop;
    }
    let Some(backend) = service::select_backend(&svc, group, service::Client::Addr(flow.saddr), now) else {
        return Verdict::Drop;
    };
    let to = Endpoint { addr: backend.addr, port: backend.port };
    // SNAT when the reply would not come back through this node (a client outside the node,
    // a backend on another node) or would not leave the backend (hairpin).
    let needs_snat =
        (origin == Origin::External && backend.flags & BACKEND_F_LOCAL == 0) || backend.addr == flow.saddr;
    let snat = if needs_snat {
        match nat::allocate(&flow, to, now) {
            Some(snat) => Some(snat),
            None => return Verdict::Drop,
        }
    } else {
        None
    };
    if conntrack::create(&flow, to, snat, svc.stats_index, now).is_none() {
        return Verdict::Drop;
    }
    rewrite(pkt, &flow, End::Destination, to)
}

/// After routing: packets leaving towards the fabric or a local pod.
#[inline(always)]
pub fn egress<P: Packet>(pkt: &mut P) -> Verdict {
    let mut flow = match parse(pkt) {
        Some(Parsed::Flow(flow)) => flow,
        Some(Parsed::IcmpError(err)) => return icmp::egress(pkt, &err, now()),
        None => return Verdict::Pass,
    };
    if !fragments::complete(&mut flow) {
        return Verdict::Pass;
    }
    let now = now();

    // A backend's reply: it must come from the frontend the client addressed.
    if let Some(frontend) = conntrack::lookup_reply(&flow, now) {
        return rewrite(pkt, &flow, End::Source, frontend);
    }
    // A client's packet to its backend: SNAT if its connection has a SNAT source.
    if let Some(snat) = conntrack::snat_source(&flow, now) {
        return rewrite(pkt, &flow, End::Source, snat);
    }
    Verdict::Pass
}
