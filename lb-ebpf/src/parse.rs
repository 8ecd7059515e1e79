//! Header parsing. Every packet access goes through `ptr_at`, the one bounds check.
use lb_common::{conntrack::CtKey, proto};

use crate::packet::Packet;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// IPv4 flags+fragment offset: MF bit and offset bits. Non-zero means a fragment.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;

/// Byte offsets inside the IPv4 header.
pub const IP_CSUM_OFF: usize = 10;
pub const IP_SADDR_OFF: usize = 12;
pub const IP_DADDR_OFF: usize = 16;
/// Byte offsets inside the TCP/UDP header.
pub const L4_SPORT_OFF: usize = 0;
pub const L4_DPORT_OFF: usize = 2;
const TCP_CSUM_OFF: usize = 16;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
const TCP_MIN_LEN: usize = 20;
const UDP_LEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

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
fn read<T: Copy, P: Packet>(pkt: &P, off: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the whole T lies inside the packet; unaligned read.
    ptr_at::<T, P>(pkt, off).map(|p| unsafe { p.read_unaligned() })
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
}

impl Flow {
    /// Offset of the TCP/UDP checksum.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4 + if self.proto == proto::TCP { TCP_CSUM_OFF } else { UDP_CSUM_OFF }
    }

    /// The tuple as seen in this packet, tagged with the direction `dir` of the table entry.
    #[inline(always)]
    pub fn key(&self, dir: u8) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub fn has(&self, flag: u8) -> bool {
        self.tcp_flags & flag != 0
    }
}

/// Parses Ethernet + IPv4 + TCP/UDP. `None` for everything the balancer leaves alone:
/// other ethertypes and protocols, fragments (no ports to match), malformed headers.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Option<Flow> {
    let ethertype = u16::from_be(read::<u16, P>(pkt, 12)?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let l3 = ETH_HLEN;
    let ver_ihl: u8 = read(pkt, l3)?;
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ver_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let total_len = u16::from_be(read::<u16, P>(pkt, l3 + 2)?) as usize;
    let frag = u16::from_be(read::<u16, P>(pkt, l3 + 6)?);
    if frag & IP_MF_OFFSET_MASK != 0 || total_len < ihl {
        return None;
    }
    let proto: u8 = read(pkt, l3 + 9)?;
    let l4 = l3 + ihl;
    // The whole fixed TCP/UDP header (checksum included) must be in the packet before any
    // state is made; ports and flags are read through that one checked pointer.
    let (min_len, flags_off) = match proto {
        proto::TCP => (TCP_MIN_LEN, Some(TCP_FLAGS_OFF)),
        proto::UDP => (UDP_LEN, None),
        _ => return None,
    };
    if total_len < ihl + min_len {
        return None;
    }
    let header = ptr_at::<[u8; TCP_MIN_LEN], P>(pkt, l4).map(|p| p as *const u8);
    let header = match (header, proto) {
        (Some(h), _) => h,
        // A UDP header is shorter than the TCP one: check only its 8 bytes.
        (None, proto::UDP) => ptr_at::<[u8; UDP_LEN], P>(pkt, l4)? as *const u8,
        (None, _) => return None,
    };
    // SAFETY: `header` points at at least `min_len` checked bytes; all offsets are below it.
    let (sport, dport, tcp_flags) = unsafe {
        (
            header.add(L4_SPORT_OFF).cast::<u16>().read_unaligned(),
            header.add(L4_DPORT_OFF).cast::<u16>().read_unaligned(),
            flags_off.map_or(0, |off| header.add(off).read()),
        )
    };
    Some(Flow {
        l3,
        l4,
        proto,
        tcp_flags,
        saddr: read(pkt, l3 + IP_SADDR_OFF)?,
        daddr: read(pkt, l3 + IP_DADDR_OFF)?,
        sport,
        dport,
    })
}
