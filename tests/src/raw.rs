//! Raw IPv4 packets for the integration tests: sending crafted packets from a namespace (a
//! spoofed source, an out-of-window segment) and capturing what passes an interface.
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::{ensure, Context as _};

fn os_result(rc: libc::c_int, what: &str) -> anyhow::Result<libc::c_int> {
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context(what.to_string());
    }
    Ok(rc)
}

fn set_option<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: T,
    what: &str,
) -> anyhow::Result<()> {
    // SAFETY: setsockopt on a socket we own, with a value of the option's type.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    os_result(rc, what).map(drop)
}

/// A raw socket that sends whole IPv4 packets (IPPROTO_RAW implies IP_HDRINCL), in the
/// calling thread's namespace.
pub fn sender() -> anyhow::Result<OwnedFd> {
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd =
        os_result(unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) }, "raw socket")?;
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends the IPv4 `packet` (header included) towards `dst` through `fd` (a `sender`).
pub fn send(fd: &OwnedFd, packet: &[u8], dst: Ipv4Addr) -> std::io::Result<()> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(dst).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto with a valid buffer and a sockaddr_in of the right length.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A packet socket seeing every IPv4 packet through `iface` of the calling thread's
/// namespace (both directions), with a receive `timeout` and a 16 MiB buffer, so nothing is
/// lost while the test does other work.
pub fn capture(iface: &str, timeout: Duration) -> anyhow::Result<OwnedFd> {
    let protocol = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: a plain socket call; the descriptor is owned at once.
    let fd = os_result(
        unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol.into()) },
        "packet socket",
    )?;
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "no interface {iface}");
    // SAFETY: zeroed sockaddr_ll is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a sockaddr_ll of the right length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    os_result(rc, "binding the packet socket")?;
    set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20, "SO_RCVBUFFORCE")?;
    let timeout = libc::timeval { tv_sec: timeout.as_secs() as _, tv_usec: timeout.subsec_micros() as _ };
    set_option(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, timeout, "SO_RCVTIMEO")?;
    Ok(fd)
}

/// The next captured IPv4 packet (from its IP header on), or `None` at the timeout.
pub fn next(fd: &OwnedFd, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: recv into a buffer of the given length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).ok()
}

/// The TCP view of a captured IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload_len: usize,
}

/// `packet` as TCP, if it is an unfragmented IPv4 TCP segment.
pub fn tcp(packet: &[u8]) -> Option<Tcp> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet[0] >> 4 != 4 || *packet.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]])).min(packet.len());
    let seg = packet.get(ihl..total)?;
    let data_offset = usize::from(*seg.get(12)? >> 4) * 4;
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let addr = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    Some(Tcp {
        src: std::net::SocketAddrV4::new(addr(&packet[12..16]), u16::from_be_bytes([seg[0], seg[1]])),
        dst: std::net::SocketAddrV4::new(addr(&packet[16..20]), u16::from_be_bytes([seg[2], seg[3]])),
        seq: be32(&seg[4..8]),
        ack: be32(&seg[8..12]),
        flags: seg[13],
        payload_len: seg.len().saturating_sub(data_offset),
    })
}
