//! Ethernet + IPv4 + TCP/UDP frames with every checksum computed from scratch, for
//! BPF_PROG_TEST_RUN fixtures: comparing a program's output with a frame built here checks
//! the program's incremental checksum updates byte for byte.
use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// A payload that must come out as it went in.
pub const PAYLOAD: &[u8] = b"Should not change!!";

fn sum(data: &[u8]) -> u32 {
    data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

/// The Internet checksum of `parts` concatenated (each part of even length but the last).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut s: u32 = parts.iter().map(|p| sum(p)).sum();
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

const SOURCE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn ethernet(frame: &mut Vec<u8>, ethertype: u16) {
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // destination MAC
    frame.extend_from_slice(&SOURCE_MAC);
    frame.extend_from_slice(&ethertype.to_be_bytes());
}

fn ipv4_header(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, l4_len: usize) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.ip().octets());
    h[16..20].copy_from_slice(&dst.ip().octets());
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn l4_checksum(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    checksum(&[&pseudo, segment])
}

/// A TCP segment with `flags` and the sentinel payload, checksum 0.
fn tcp_segment(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut seg = vec![0u8; 20];
    seg[0..2].copy_from_slice(&sport.to_be_bytes());
    seg[2..4].copy_from_slice(&dport.to_be_bytes());
    seg[4..8].copy_from_slice(&1000u32.to_be_bytes());
    if flags & ACK != 0 {
        seg[8..12].copy_from_slice(&2000u32.to_be_bytes());
    }
    seg[12] = 5 << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(PAYLOAD);
    seg
}

/// A TCP segment with `flags` and the sentinel payload.
pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    let mut seg = tcp_segment(src.port(), dst.port(), flags);
    let c = l4_checksum(src, dst, PROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    packet(src, dst, PROTO_TCP, &seg)
}

/// A TCP segment as `tcp` builds it, with sequence number `seq` and acknowledgement `ack`.
pub fn tcp_seq(src: SocketAddrV4, dst: SocketAddrV4, flags: u8, seq: u32, ack: u32) -> Vec<u8> {
    let mut seg = tcp_segment(src.port(), dst.port(), flags);
    seg[4..8].copy_from_slice(&seq.to_be_bytes());
    seg[8..12].copy_from_slice(&ack.to_be_bytes());
    let c = l4_checksum(src, dst, PROTO_TCP, &seg);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    packet(src, dst, PROTO_TCP, &seg)
}

/// The same TCP segment over IPv6, which the balancer leaves alone.
pub fn tcp6(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Vec<u8> {
    let mut seg = tcp_segment(src.port(), dst.port(), flags);
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, PROTO_TCP]);
    let c = checksum(&[&pseudo, &seg]);
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::with_capacity(14 + 40 + seg.len());
    ethernet(&mut frame, ETH_P_IPV6);
    frame.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, no traffic class or flow label
    frame.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[PROTO_TCP, 64]); // next header, hop limit
    frame.extend_from_slice(&src.ip().octets());
    frame.extend_from_slice(&dst.ip().octets());
    frame.extend_from_slice(&seg);
    frame
}

/// An ARP request, broadcast: who has `target`? Tell `sender`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&SOURCE_MAC);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet, IPv4, request
    frame.extend_from_slice(&SOURCE_MAC);
    frame.extend_from_slice(&sender.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target.octets());
    frame
}

/// A UDP datagram with the sentinel payload; `with_checksum: false` sends checksum 0.
pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, with_checksum: bool) -> Vec<u8> {
    let mut seg = vec![0u8; 8];
    seg[0..2].copy_from_slice(&src.port().to_be_bytes());
    seg[2..4].copy_from_slice(&dst.port().to_be_bytes());
    seg[4..6].copy_from_slice(&((8 + PAYLOAD.len()) as u16).to_be_bytes());
    seg.extend_from_slice(PAYLOAD);
    if with_checksum {
        let c = match l4_checksum(src, dst, PROTO_UDP, &seg) {
            0 => 0xffff,
            c => c,
        };
        seg[6..8].copy_from_slice(&c.to_be_bytes());
    }
    packet(src, dst, PROTO_UDP, &seg)
}

fn packet(src: SocketAddrV4, dst: SocketAddrV4, proto: u8, segment: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + 20 + segment.len());
    ethernet(&mut frame, ETH_P_IP);
    frame.extend_from_slice(&ipv4_header(src, dst, proto, segment.len()));
    frame.extend_from_slice(segment);
    frame
}

const PROTO_ICMP: u8 = 1;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_PORT_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// An ICMP error from `src` to `dst` quoting `quoted` (an IPv4 header and what follows of
/// the packet it is about); `rest` is the header's second word (the MTU for "fragmentation
/// needed").
pub fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut msg = vec![kind, code, 0, 0];
    msg.extend_from_slice(&rest);
    msg.extend_from_slice(quoted);
    let c = checksum(&[&msg]);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    packet(SocketAddrV4::new(src, 0), SocketAddrV4::new(dst, 0), PROTO_ICMP, &msg)
}

/// The second word of an ICMP "fragmentation needed": unused, then the next-hop MTU.
pub fn next_hop_mtu(mtu: u16) -> [u8; 4] {
    let [hi, lo] = mtu.to_be_bytes();
    [0, 0, hi, lo]
}

/// More L4 bytes than any fixture has, for `quote`: the whole packet, as routers quote as
/// much as fits (RFC 1812).
pub const WHOLE: usize = 1500;

/// The IPv4 packet of a frame built here, cut after `l4_bytes` of its TCP/UDP header: what an
/// ICMP error quotes.
pub fn quote(frame: &[u8], l4_bytes: usize) -> &[u8] {
    &frame[offset::IP_VER_IHL..offset::L4.saturating_add(l4_bytes).min(frame.len())]
}

/// How a reject's quote carries the rejected packet's L4 checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotedChecksum {
    /// As the packet had it (XDP).
    AsSent,
    /// The value that checksum offload, were the skb still CHECKSUM_PARTIAL, would write
    /// there itself (TC: a local sender's packet may be partial).
    OffloadFixedPoint,
}

/// What the balancer answers `rejected` (a frame to a Service without endpoints) with: an
/// ICMP port unreachable from the frontend back to the sender, Ethernet addresses swapped,
/// IPv4 header as Linux sends ICMP errors (TOS 0xc0, no id, TTL 64), quoting the IPv4 header
/// and the first 20 bytes of a TCP header or the 8 of a UDP one.
pub fn reject_of(rejected: &[u8], quoted_checksum: QuotedChecksum) -> Vec<u8> {
    let ip = &rejected[offset::IP_VER_IHL..];
    let (src, dst) = (
        Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
        Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
    );
    let tcp = rejected[offset::IP_VER_IHL + 9] == PROTO_TCP;
    let mut msg = vec![ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(quote(rejected, if tcp { 20 } else { 8 }));
    if quoted_checksum == QuotedChecksum::OffloadFixedPoint {
        let l4 = &mut msg[8 + 20..];
        let field = if tcp { 16 } else { 6 };
        let value = offload_fixed_point(l4, field);
        l4[field..field + 2].copy_from_slice(&value.to_be_bytes());
    }
    let c = checksum(&[&msg]);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = 0xc0;
    h[2..4].copy_from_slice(&((20 + msg.len()) as u16).to_be_bytes());
    h[8] = 64;
    h[9] = PROTO_ICMP;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&rejected[6..12]);
    frame.extend_from_slice(&rejected[0..6]);
    frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
    frame.extend_from_slice(&h);
    frame.extend_from_slice(&msg);
    frame
}

/// The value `x` of the checksum field at `field` in `data` (the end of a packet) that the
/// kernel's or a NIC's checksum offload leaves as it is: it writes the checksum of the data
/// with `x` in place, or 0xffff for a computed 0 (skb_checksum_help). Found by trying every
/// value, to check the programs' closed form independently.
pub fn offload_fixed_point(data: &[u8], field: usize) -> u16 {
    let mut data = data.to_vec();
    (0..=u16::MAX)
        .find(|x| {
            data[field..field + 2].copy_from_slice(&x.to_be_bytes());
            let written = match checksum(&[&data]) {
                0 => 0xffff,
                c => c,
            };
            written == *x
        })
        .expect("a fixed point exists")
}

/// `frame` (an unfragmented IPv4 frame built here) as two fragments, split `at` bytes into
/// its IPv4 payload (a multiple of 8): the first with MF, the later with its offset; both
/// with the frame's IPv4 identification, DF cleared, total length and header checksum fixed.
/// The L4 checksum, of the whole datagram, stays in the first.
pub fn fragments(frame: &[u8], at: usize) -> (Vec<u8>, Vec<u8>) {
    assert!(at.is_multiple_of(8), "fragment offsets count 8-byte units");
    let (head, payload) = frame.split_at(offset::L4);
    let piece = |bytes: &[u8], flags_offset: u16| {
        let mut out = head.to_vec();
        out.extend_from_slice(bytes);
        let ip = &mut out[offset::IP_VER_IHL..offset::L4];
        ip[2..4].copy_from_slice(&((20 + bytes.len()) as u16).to_be_bytes());
        ip[6..8].copy_from_slice(&flags_offset.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&[ip]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out
    };
    (piece(&payload[..at], 0x2000), piece(&payload[at..], (at / 8) as u16))
}

/// Byte offsets in frames built here, for hostile variants.
pub mod offset {
    pub const ETHERTYPE: usize = 12;
    pub const IP_VER_IHL: usize = 14;
    pub const IP_TOTAL_LEN: usize = 16;
    pub const IP_FLAGS_FRAG: usize = 20;
    pub const L4: usize = 34;
}

/// Four IPv4 "no operation" options: a valid header of 24 bytes (IHL 6).
pub const NOP_OPTIONS: [u8; 4] = [1, 1, 1, 1];

/// `frame` (built here) with `options` (a multiple of 4 bytes, at most 40) after its 20-byte
/// IPv4 header: header length, total length and header checksum fixed. The TCP/UDP checksum
/// does not cover IPv4 options, so it stays valid as it is.
pub fn with_ip_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40, "IPv4 options come in 32-bit words");
    let mut header = frame[offset::IP_VER_IHL..offset::L4].to_vec();
    header.extend_from_slice(options);
    header[0] = 0x40 | (header.len() / 4) as u8;
    let total = u16::from_be_bytes([header[2], header[3]]) + options.len() as u16;
    header[2..4].copy_from_slice(&total.to_be_bytes());
    header[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&[&header]);
    header[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = frame[..offset::IP_VER_IHL].to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&frame[offset::L4..]);
    out
}

/// `frame` (built here) with an 802.1Q tag for `vlan` between the MAC addresses and the
/// IPv4 ethertype, as a trunk port delivers it when nothing untagged it.
pub fn vlan_tagged(frame: &[u8], vlan: u16) -> Vec<u8> {
    const ETH_P_8021Q: u16 = 0x8100;
    let mut out = frame[..offset::ETHERTYPE].to_vec();
    out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    out.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[offset::ETHERTYPE..]);
    out
}

pub const ICMP_ECHO_REQUEST: u8 = 8;

/// An ICMP echo request (ping) from `src` to `dst`, identifier 0x1234, sequence 1, carrying
/// the sentinel payload. It has an error's layout (type, code, checksum, a second word, data).
pub fn icmp_echo_request(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    icmp_error(src, dst, ICMP_ECHO_REQUEST, 0, [0x12, 0x34, 0, 1], PAYLOAD)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let a: SocketAddrV4 = "198.18.0.100:40000".parse().unwrap();
        let b: SocketAddrV4 = "198.18.0.1:30080".parse().unwrap();
        let f = tcp(a, b, SYN);
        assert_eq!(checksum(&[&f[14..34]]), 0, "IPv4 header checksum");
        let seg = &f[34..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&a.ip().octets());
        pseudo.extend_from_slice(&b.ip().octets());
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        assert_eq!(checksum(&[&pseudo, seg]), 0, "TCP checksum");
    }
}
