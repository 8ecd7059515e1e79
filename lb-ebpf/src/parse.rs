//! Header parsing. Every packet access goes through `ptr_at`, the one bounds check.
use lb_common::{conntrack::CtKey, proto};

use crate::packet::Packet;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// IPv4 flags+fragment offset: the MF bit, and the offset bits (non-zero: a later fragment).
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
pub const IP_HLEN: usize = 20;

/// Byte offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Byte offsets inside the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;
const TCP_DATA_OFFSET_OFF: usize = 12;
const TCP_FLAGS_OFF: usize = 13;
const TCP_MIN_LEN: usize = 20;
/// UDP header; also the L4 bytes an ICMP error quotes at least (RFC 792).
pub const UDP_LEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// ICMP errors that quote the packet they are about.
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Returns a pointer to a `T` at `off` bytes into the packet, or `None` if it would reach
/// past the end. The only place packet bounds are checked.
#[inline(always)]
pub fn ptr_at<T, P: Packet>(pkt: &P, off: usize) -> Option<*mut T> {
    let start = pkt.data();
    let end = pkt.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

#[inline(always)]
pub fn read<T: Copy, P: Packet>(pkt: &P, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; unaligned read.
    ptr_at::<T, P>(pkt, off).map(|p| unsafe { p.read_unaligned() })
}

/// How a packet stands to IPv4 fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    No,
    /// The first fragment of a datagram: its L4 header is here. The IPv4 identification.
    First(u16),
    /// A later fragment: no L4 header; its ports are its first fragment's
    /// (`fragments::complete` fills them in). The IPv4 identification.
    Later(u16),
}

/// An IPv4 TCP or UDP packet the balancer may translate: where its headers are and its tuple.
#[derive(Clone, Copy)]
pub struct Flow {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    pub proto: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Addresses and ports in network byte order.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// IPv4 total length: the bytes a Service's counters add.
    pub len: u16,
    pub fragment: Fragment,
}

impl Flow {
    /// Whether the packet holds the L4 header (ports and checksum) at `l4`: not a later
    /// fragment.
    #[inline(always)]
    pub fn has_l4_header(&self) -> bool {
        !matches!(self.fragment, Fragment::Later(_))
    }

    /// Offset of the TCP/UDP checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4 + if self.proto == proto::TCP { TCP_CSUM_OFF } else { UDP_CSUM_OFF }
    }

    /// The tuple as seen in this packet.
    #[inline(always)]
    pub fn key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }
}

/// An ICMP error (destination unreachable, time exceeded, parameter problem) quoting a TCP or
/// UDP packet: the outer addresses and the quoted packet's tuple and offsets.
#[derive(Clone, Copy)]
pub struct IcmpError {
    /// Offset of the outer IPv4 header and of the ICMP header.
    pub l3: usize,
    pub icmp: usize,
    pub saddr: u32,
    pub daddr: u32,
    /// The quoted packet: its IPv4 header (always 20 bytes) and its first 8 L4 bytes.
    pub inner: Flow,
}

/// What the balancer may act on.
pub enum Parsed {
    Flow(Flow),
    IcmpError(IcmpError),
}

/// The IPv4 header at `l3`: its fields and how it stands to fragmentation. `None` for
/// malformed headers; a total length must cover the header and 8 bytes more (the L4 header a
/// whole datagram or first fragment starts with) or, for a later fragment, one byte more.
/// Every field is read through one checked pointer: `l3` may be a variable offset (a header
/// an ICMP error quotes).
#[inline(always)]
fn ipv4<P: Packet>(pkt: &P, l3: usize) -> Option<Ipv4> {
    let header = ptr_at::<[u8; IP_HLEN], P>(pkt, l3)? as *const u8;
    // SAFETY: `header` points at IP_HLEN checked bytes; every offset is below it.
    let (ver_ihl, total_len, id, frag, proto, saddr, daddr) = unsafe {
        (
            header.read(),
            u16::from_be(header.add(2).cast::<u16>().read_unaligned()) as usize,
            header.add(4).cast::<u16>().read_unaligned(),
            u16::from_be(header.add(6).cast::<u16>().read_unaligned()),
            header.add(9).read(),
            header.add(IP_SADDR_OFF).cast::<u32>().read_unaligned(),
            header.add(IP_DADDR_OFF).cast::<u32>().read_unaligned(),
        )
    };
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    let fragment = if frag & IP_OFFSET_MASK != 0 {
        Fragment::Later(id)
    } else if frag & IP_MF != 0 {
        Fragment::First(id)
    } else {
        Fragment::No
    };
    let min_len = if matches!(fragment, Fragment::Later(_)) { ihl + 1 } else { ihl + UDP_LEN };
    if ver_ihl >> 4 != 4 || ihl < IP_HLEN || total_len < min_len {
        return None;
    }
    Some(Ipv4 { ihl, total_len, proto, saddr, daddr, fragment })
}

/// The fields of an IPv4 header the balancer uses.
struct Ipv4 {
    ihl: usize,
    total_len: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    fragment: Fragment,
}

/// Ports, TCP flags and TCP header length of the L4 header at `l4`, read through one checked
/// pointer. `full_header`: the whole fixed TCP header must be present (a packet to translate;
/// flags and length are 0 otherwise); an ICMP error quotes only 8 bytes, enough for the ports.
#[inline(always)]
fn ports<P: Packet>(pkt: &P, l4: usize, proto: u8, full_header: bool) -> Option<(u16, u16, u8, usize)> {
    let tcp_header = if proto == proto::TCP && full_header {
        Some(ptr_at::<[u8; TCP_MIN_LEN], P>(pkt, l4)? as *const u8)
    } else {
        None
    };
    let header = match tcp_header {
        Some(h) => h,
        None => ptr_at::<[u8; UDP_LEN], P>(pkt, l4)? as *const u8,
    };
    // SAFETY: `header` points at at least 8 checked bytes, 20 when flags are read.
    unsafe {
        Some((
            header.add(L4_SPORT_OFF).cast::<u16>().read_unaligned(),
            header.add(L4_DPORT_OFF).cast::<u16>().read_unaligned(),
            if tcp_header.is_some() { header.add(TCP_FLAGS_OFF).read() } else { 0 },
            if tcp_header.is_some() { (header.add(TCP_DATA_OFFSET_OFF).read() >> 4) as usize * 4 } else { 0 },
        ))
    }
}

/// Parses Ethernet + IPv4 + TCP/UDP (whole, or a fragment of a datagram), or an ICMP error
/// about a whole TCP/UDP packet. `None` for everything the balancer leaves alone: other
/// ethertypes and protocols, malformed or truncated headers, packets that did not arrive
/// whole.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Option<Parsed> {
    if u16::from_be(read::<u16, P>(pkt, 12)?) != ETH_P_IP {
        return None;
    }
    let l3 = ETH_HLEN;
    let Ipv4 { ihl, total_len, proto, saddr, daddr, fragment } = ipv4(pkt, l3)?;
    // The kernel drops a packet whose total length is more than arrived (ip_rcv_core): it
    // must not open, touch or close a connection, nor count.
    if l3 + total_len > pkt.frame_len() {
        return None;
    }
    let l4 = l3 + ihl;
    match proto {
        // A later fragment: no L4 header to read; its ports come from its first fragment.
        proto::TCP | proto::UDP if matches!(fragment, Fragment::Later(_)) => Some(Parsed::Flow(Flow {
            l3,
            l4,
            proto,
            tcp_flags: 0,
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            len: total_len as u16,
            fragment,
        })),
        proto::TCP | proto::UDP => {
            let (sport, dport, tcp_flags, tcp_len) = ports(pkt, l4, proto, true)?;
            // Nor is a TCP header shorter than 20 bytes or longer than the packet anything to
            // act on (netfilter calls it INVALID, the receiver drops it).
            if proto == proto::TCP && (tcp_len < TCP_MIN_LEN || ihl + tcp_len > total_len) {
                return None;
            }
            Some(Parsed::Flow(Flow {
                l3,
                l4,
                proto,
                tcp_flags,
                saddr,
                daddr,
                sport,
                dport,
                len: total_len as u16,
                fragment,
            }))
        }
        // An ICMP error must be whole to be read.
        proto::ICMP if fragment == Fragment::No => {
            let icmp = ptr_at::<[u8; ICMP_HLEN], P>(pkt, l4)? as *const u8;
            // SAFETY: points at ICMP_HLEN checked bytes.
            let kind = unsafe { icmp.read() };
            if !matches!(kind, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
                return None;
            }
            let inner_l3 = l4 + ICMP_HLEN;
            let quoted = ipv4(pkt, inner_l3)?;
            // Only a quoted whole packet has its ports at a known place for sure.
            if quoted.ihl != IP_HLEN
                || quoted.fragment != Fragment::No
                || !matches!(quoted.proto, proto::TCP | proto::UDP)
            {
                return None;
            }
            let (inner_len, inner_proto, inner_saddr, inner_daddr) =
                (quoted.total_len, quoted.proto, quoted.saddr, quoted.daddr);
            let inner_l4 = inner_l3 + IP_HLEN;
            let (sport, dport, _, _) = ports(pkt, inner_l4, inner_proto, false)?;
            let inner = Flow {
                l3: inner_l3,
                l4: inner_l4,
                proto: inner_proto,
                tcp_flags: 0,
                saddr: inner_saddr,
                daddr: inner_daddr,
                sport,
                dport,
                len: inner_len as u16,
                fragment: Fragment::No,
            };
            Some(Parsed::IcmpError(IcmpError { l3, icmp: l4, saddr, daddr, inner }))
        }
        _ => None,
    }
}
