//! ICMP errors about translated connections, translated like the packets they quote, so the
//! sender's socket matches them (port unreachable, fragmentation needed: path MTU discovery
//! keeps working through the balancer).
//!
//! The quoted packet is a client → backend packet. At ingress an error to a SNAT address gets
//! its client back (quoted source, outer destination); at egress an error on its way to the
//! client gets the frontend back (quoted destination, and the outer source when the backend
//! itself sent it). Checksums are updated in place so every covered sum stays constant: the
//! quoted IPv4 header, the quoted TCP/UDP checksum (when quoted and in use), the ICMP checksum
//! and the outer IPv4 header.
use lb_common::proto;

use crate::{
    conntrack::{self, Endpoint},
    csum, nat,
    packet::Packet,
    parse::{ptr_at, Flow, IcmpError, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF},
    pipeline::Verdict,
};

const ICMP_CSUM_OFF: usize = 2;

/// Writes `new` at `field` and fixes the checksum at `csum` covering it; returns the old value.
///
/// # Safety
/// Both pointers must have been bounds-checked by `ptr_at` since the last helper call.
#[inline(always)]
unsafe fn set32(field: *mut u32, new: u32, csum: *mut u16) -> u32 {
    let old = field.read_unaligned();
    field.write_unaligned(new);
    csum.write_unaligned(csum::replace4(csum.read_unaligned(), old, new));
    old
}

/// As `set32`, for a 16-bit field.
#[inline(always)]
unsafe fn set16(field: *mut u16, new: u16, csum: *mut u16) -> u16 {
    let old = field.read_unaligned();
    field.write_unaligned(new);
    csum.write_unaligned(csum::replace2(csum.read_unaligned(), old, new));
    old
}

#[derive(Clone, Copy)]
enum End {
    Source,
    Destination,
}

/// Rewrites one end of the quoted packet to `to`. Every pointer is checked before the first
/// write: a failure leaves the packet as it was.
#[inline(always)]
fn rewrite_quoted<P: Packet>(pkt: &mut P, err: &IcmpError, end: End, to: Endpoint) -> Option<()> {
    let inner: &Flow = &err.inner;
    let (addr_off, port_off) = match end {
        End::Source => (IP_SADDR_OFF, L4_SPORT_OFF),
        End::Destination => (IP_DADDR_OFF, L4_DPORT_OFF),
    };
    let addr = ptr_at::<u32, P>(pkt, inner.l3 + addr_off)?;
    let ip_csum = ptr_at::<u16, P>(pkt, inner.l3 + IP_CSUM_OFF)?;
    let port = ptr_at::<u16, P>(pkt, inner.l4 + port_off)?;
    let icmp_csum = ptr_at::<u16, P>(pkt, err.icmp + ICMP_CSUM_OFF)?;
    // A TCP checksum is quoted only when the sender quoted more than 8 L4 bytes.
    let l4_csum = ptr_at::<u16, P>(pkt, inner.l4_csum_off());
    // SAFETY: every pointer was bounds-checked above, and no helper ran since.
    unsafe {
        // The quoted IPv4 header keeps summing to the same value, so the ICMP checksum needs
        // no change for it; the quoted L4 bytes do change it.
        let old_addr = set32(addr, to.addr, ip_csum);
        let old_port = set16(port, to.port, icmp_csum);
        if let Some(l4_csum) = l4_csum {
            let old = l4_csum.read_unaligned();
            if !(inner.proto == proto::UDP && old == 0) {
                let new = csum::replace2(csum::replace4(old, old_addr, to.addr), old_port, to.port);
                set16(l4_csum, new, icmp_csum);
            }
        }
    }
    Some(())
}

#[inline(always)]
fn rewrite_outer<P: Packet>(pkt: &mut P, err: &IcmpError, end: End, addr: u32) -> Option<()> {
    let off = match end {
        End::Source => IP_SADDR_OFF,
        End::Destination => IP_DADDR_OFF,
    };
    let field = ptr_at::<u32, P>(pkt, err.l3 + off)?;
    let csum = ptr_at::<u16, P>(pkt, err.l3 + IP_CSUM_OFF)?;
    // SAFETY: both pointers were bounds-checked just above.
    unsafe { set32(field, addr, csum) };
    Some(())
}

/// A half-translated error must not leave.
#[inline(always)]
fn verdict(done: Option<()>) -> Verdict {
    match done {
        Some(()) => Verdict::Pass,
        None => Verdict::Drop,
    }
}

/// Before routing: an error about a SNATed connection goes back to its client.
#[inline(always)]
pub fn ingress<P: Packet>(pkt: &mut P, err: &IcmpError, now: u64) -> Verdict {
    let inner = &err.inner;
    if !nat::is_snat_port(inner.sport) || err.daddr != inner.saddr {
        return Verdict::Pass;
    }
    let Some(client) = nat::client_of(&inner.key().reversed(), now) else {
        return Verdict::Pass;
    };
    verdict(
        rewrite_quoted(pkt, err, End::Source, client)
            .and_then(|()| rewrite_outer(pkt, err, End::Destination, client.addr)),
    )
}

/// After routing: an error on its way to a client quotes the frontend it addressed.
#[inline(always)]
pub fn egress<P: Packet>(pkt: &mut P, err: &IcmpError, now: u64) -> Verdict {
    let inner = &err.inner;
    let Some(entry) = conntrack::get(&inner.key(), now) else {
        return Verdict::Pass;
    };
    let frontend = Endpoint { addr: entry.frontend_addr, port: entry.frontend_port };
    let backend_sent_it = err.saddr == inner.daddr;
    verdict(rewrite_quoted(pkt, err, End::Destination, frontend).and_then(|()| {
        if backend_sent_it {
            rewrite_outer(pkt, err, End::Source, frontend.addr)
        } else {
            Some(())
        }
    }))
}
