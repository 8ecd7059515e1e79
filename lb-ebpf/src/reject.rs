//! Rejecting a connection to a Service without endpoints, as kube-proxy's REJECT does: the
//! packet is turned, in place, into an ICMP port unreachable back to its sender, so a TCP
//! client sees "connection refused" at once and a UDP client gets ECONNREFUSED.
//!
//! Layout after the rewrite (70 bytes): Ethernet (addresses swapped), a new IPv4 header from
//! the frontend to the client, the ICMP header, then the quoted IPv4 header and first 8 L4
//! bytes of the rejected packet (RFC 792).
use lb_common::proto;

use crate::{
    csum,
    packet::Packet,
    parse::{ptr_at, Flow, ETH_HLEN, ICMP_HLEN, IP_HLEN, UDP_LEN},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Bytes added in front: the new IPv4 and ICMP headers.
const GROWTH: usize = IP_HLEN + ICMP_HLEN;
const QUOTED: usize = IP_HLEN + UDP_LEN;
const ICMP_LEN: usize = ICMP_HLEN + QUOTED;
const FRAME_LEN: usize = ETH_HLEN + IP_HLEN + ICMP_LEN;
const IP_TTL: u8 = 64;

/// Rewrites the packet of `flow` into an ICMP port unreachable to its sender. `None` when it
/// cannot (IP options: the quote would not be the fixed 28 bytes); the caller drops then.
#[inline(always)]
pub fn port_unreachable<P: Packet>(pkt: &mut P, flow: &Flow) -> Option<()> {
    if flow.l4 - flow.l3 != IP_HLEN {
        return None;
    }
    pkt.grow_head(GROWTH)?;
    pkt.truncate(FRAME_LEN)?;
    let frame = ptr_at::<[u8; FRAME_LEN], P>(pkt, 0)? as *mut u8;
    // SAFETY: `frame` points at FRAME_LEN checked bytes; every offset below is inside them.
    unsafe {
        // The old Ethernet header now sits right before the quoted packet.
        let old_eth = frame.add(GROWTH);
        let old_dst = old_eth.cast::<[u8; 6]>().read_unaligned();
        let old_src = old_eth.add(6).cast::<[u8; 6]>().read_unaligned();
        frame.cast::<[u8; 6]>().write_unaligned(old_src);
        frame.add(6).cast::<[u8; 6]>().write_unaligned(old_dst);
        frame.add(12).cast::<[u8; 2]>().write_unaligned(0x0800u16.to_be_bytes());

        let ip = frame.add(ETH_HLEN);
        let mut header = [0u8; IP_HLEN];
        header[0] = 0x45;
        header[1] = 0xc0; // precedence "internetwork control", as Linux sends ICMP errors
        header[2..4].copy_from_slice(&((IP_HLEN + ICMP_LEN) as u16).to_be_bytes());
        header[8] = IP_TTL;
        header[9] = proto::ICMP;
        header[12..16].copy_from_slice(&flow.daddr.to_ne_bytes());
        header[16..20].copy_from_slice(&flow.saddr.to_ne_bytes());
        ip.cast::<[u8; IP_HLEN]>().write_unaligned(header);
        let ip_csum = csum::compute(&ip.cast::<[u16; IP_HLEN / 2]>().read_unaligned());
        ip.add(10).cast::<u16>().write_unaligned(ip_csum);

        let icmp = ip.add(IP_HLEN);
        icmp.cast::<[u8; ICMP_HLEN]>().write_unaligned([
            ICMP_DEST_UNREACH,
            ICMP_PORT_UNREACH,
            0,
            0,
            0,
            0,
            0,
            0,
        ]);
        let icmp_csum = csum::compute(&icmp.cast::<[u16; ICMP_LEN / 2]>().read_unaligned());
        icmp.add(2).cast::<u16>().write_unaligned(icmp_csum);
    }
    Some(())
}
