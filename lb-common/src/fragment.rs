//! IPv4 fragments of balanced datagrams (`XLB_FRAGMENTS`). Only the first fragment of a
//! datagram carries its TCP/UDP header; the programs remember its ports by the identity all
//! fragments of the datagram share, so the later fragments find the datagram's connection and
//! get the same addresses (netfilter reassembles before NAT instead; a large UDP datagram, a
//! DNS answer over 1,500 bytes say, would otherwise leave half translated and never reassemble).

/// Key of `XLB_FRAGMENTS`: what every fragment of one datagram carries, as it arrived (before
/// any translation), network byte order. 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragmentKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IPv4 identification.
    pub id: u16,
    pub proto: u8,
    /// Always 0.
    pub _pad: u8,
}

/// Value of `XLB_FRAGMENTS`: the datagram's ports as the first fragment had them, network byte
/// order. 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragmentPorts {
    pub sport: u16,
    pub dport: u16,
}

const _: () = assert!(core::mem::size_of::<FragmentKey>() == 12);
const _: () = assert!(core::mem::size_of::<FragmentPorts>() == 4);
crate::user_pod!(FragmentKey, FragmentPorts);
