//! Rejecting a connection to a Service without endpoints, as kube-proxy's REJECT does: the
//! packet is turned, in place, into an ICMP port unreachable back to its sender, so a TCP
//! client sees "connection refused" at once and a UDP client gets ECONNREFUSED.
//!
//! Layout after the rewrite: Ethernet (addresses swapped), a new IPv4 header from the
//! frontend to the client, the ICMP header, then the quoted IPv4 header and the first L4
//! bytes of the rejected packet: its whole fixed TCP header (20 bytes, 82-byte frame) or its
//! UDP header (8 bytes, 70-byte frame). RFC 792 asks for at least 8; a TCP sender with
//! checksum offload hands TC a CHECKSUM_PARTIAL skb whose pending checksum lies in bytes
//! 16..18 of its TCP header, and the kernel refuses to cut an skb short of that.
use lb_common::proto;

use crate::{
    csum,
    packet::Packet,
    parse::{ptr_at, Flow, ETH_HLEN, ICMP_HLEN, IP_HLEN, TCP_CSUM_OFF, UDP_CSUM_OFF, UDP_LEN},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// Bytes added in front: the new IPv4 and ICMP headers.
const GROWTH: usize = IP_HLEN + ICMP_HLEN;
/// Where the quoted L4 header starts.
const QUOTED_L4: usize = ETH_HLEN + GROWTH + IP_HLEN;
const TCP_QUOTED: usize = 20;
const IP_TTL: u8 = 64;

/// Rewrites the packet of `flow` into an ICMP port unreachable to its sender. `None` when it
/// cannot (IP options: the quote would not start at a fixed offset); the caller drops then.
#[inline(always)]
pub fn port_unreachable<P: Packet>(pkt: &mut P, flow: &Flow) -> Option<()> {
    if flow.l4 - flow.l3 != IP_HLEN {
        return None;
    }
    if flow.proto == proto::TCP {
        build::<P, { QUOTED_L4 + TCP_QUOTED }, { TCP_QUOTED / 2 }>(pkt, flow, TCP_CSUM_OFF)
    } else {
        build::<P, { QUOTED_L4 + UDP_LEN }, { UDP_LEN / 2 }>(pkt, flow, UDP_CSUM_OFF)
    }
}

/// Builds the error in a `FRAME`-byte frame quoting `L4_WORDS` 16-bit words of the L4 header,
/// whose checksum sits at `l4_csum_off` in it.
#[inline(always)]
fn build<P: Packet, const FRAME: usize, const L4_WORDS: usize>(
    pkt: &mut P,
    flow: &Flow,
    l4_csum_off: usize,
) -> Option<()> {
    pkt.grow_head(GROWTH)?;
    pkt.truncate(FRAME)?;
    let frame = ptr_at::<[u8; FRAME], P>(pkt, 0)? as *mut u8;
    // SAFETY: `frame` points at FRAME checked bytes; every offset below is inside them
    // (QUOTED_L4 + 2 * L4_WORDS == FRAME, l4_csum_off + 2 <= 2 * L4_WORDS).
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
        header[2..4].copy_from_slice(&((FRAME - ETH_HLEN) as u16).to_be_bytes());
        header[8] = IP_TTL;
        header[9] = proto::ICMP;
        header[12..16].copy_from_slice(&flow.daddr.to_ne_bytes());
        header[16..20].copy_from_slice(&flow.saddr.to_ne_bytes());
        ip.cast::<[u8; IP_HLEN]>().write_unaligned(header);
        let ip_csum = csum::compute(&ip.cast::<[u16; IP_HLEN / 2]>().read_unaligned());
        ip.add(10).cast::<u16>().write_unaligned(ip_csum);

        let l4 = frame.add(QUOTED_L4);
        if P::CHECKSUM_MAY_BE_PARTIAL {
            let field = l4.add(l4_csum_off).cast::<u16>();
            field.write_unaligned(0);
            field.write_unaligned(csum::partial_fixed_point(&l4.cast::<[u16; L4_WORDS]>().read_unaligned()));
        }

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
        // ICMP header and quoted IPv4 header, then the quoted L4 bytes.
        let head = csum::sum(&icmp.cast::<[u16; (ICMP_HLEN + IP_HLEN) / 2]>().read_unaligned());
        let tail = csum::sum(&l4.cast::<[u16; L4_WORDS]>().read_unaligned());
        icmp.add(2).cast::<u16>().write_unaligned(csum::finish(head + tail));
    }
    Some(())
}
