//! The connected UDP sockets of the agent's network namespace (the node's own), through
//! NETLINK_SOCK_DIAG: listing them and destroying one (`SOCK_DESTROY`, as `ss -K` does; the
//! kernel needs CONFIG_INET_DIAG_DESTROY). A destroyed UDP socket reports ECONNABORTED to
//! its process and is disconnected; clients such as resolvers then open a new one.
use std::{
    io, mem,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// A connected UDP socket's state.
const TCP_ESTABLISHED: u32 = 1;

/// `struct inet_diag_sockid` (include/uapi/linux/inet_diag.h): ports and addresses in
/// network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct nlmsghdr` followed by a request.
#[repr(C)]
struct Message {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    request: Request,
}

/// The start of `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

/// A connected IPv4 UDP socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocket {
    /// The socket cookie, as `bpf_get_socket_cookie` gives it.
    pub cookie: u64,
    pub local: SocketAddrV4,
    pub peer: SocketAddrV4,
    id: SockId,
}

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket creation; the descriptor is owned from here on.
    let fd =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created and nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: &OwnedFd, kind: u16, flags: u16, request: Request) -> io::Result<()> {
    let message = Message {
        len: mem::size_of::<Message>() as u32,
        kind,
        flags: libc::NLM_F_REQUEST as u16 | flags,
        seq: 1,
        pid: 0,
        request,
    };
    // SAFETY: sends the bytes of a #[repr(C)] value without padding, to the kernel (the
    // socket's default destination).
    let sent = unsafe {
        libc::send(fd.as_raw_fd(), (&message as *const Message).cast(), mem::size_of::<Message>(), 0)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Calls `each` with every netlink message of the answers to the last request, until
/// NLMSG_DONE or, for a request with NLM_F_ACK, its acknowledgement. An error message ends it
/// with that error.
fn receive(fd: &OwnedFd, mut each: impl FnMut(&[u8])) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receives into a buffer we own, at most its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().expect("2 bytes"));
            if len < 16 || len > rest.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            match kind as libc::c_int {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(rest[16..20].try_into().expect("4 bytes"));
                    return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                _ => each(&rest[16..len]),
            }
            // Messages are 4-byte aligned.
            rest = &rest[(len + 3) & !3..];
        }
    }
}

fn addr(id: &SockId) -> (SocketAddrV4, SocketAddrV4) {
    let v4 = |a: u32, port: u16| SocketAddrV4::new(Ipv4Addr::from(u32::from_be(a)), u16::from_be(port));
    (v4(id.src[0], id.sport), v4(id.dst[0], id.dport))
}

/// A request about connected IPv4 UDP sockets, `id` naming one (or all, zeroed).
fn connected_udp(id: SockId) -> Request {
    Request {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_UDP as u8,
        ext: 0,
        pad: 0,
        states: 1 << TCP_ESTABLISHED,
        id,
    }
}

/// Every connected IPv4 UDP socket of this network namespace.
pub fn connected_udp_sockets() -> io::Result<Vec<UdpSocket>> {
    let fd = open()?;
    send(&fd, SOCK_DIAG_BY_FAMILY, libc::NLM_F_DUMP as u16, connected_udp(SockId::default()))?;
    let mut sockets = Vec::new();
    receive(&fd, |payload| {
        if payload.len() < mem::size_of::<DiagMsg>() {
            return;
        }
        // SAFETY: at least size_of::<DiagMsg>() bytes, read unaligned; every bit pattern is
        // a valid DiagMsg.
        let msg = unsafe { payload.as_ptr().cast::<DiagMsg>().read_unaligned() };
        if msg.family == libc::AF_INET as u8 && u32::from(msg.state) == TCP_ESTABLISHED {
            let (local, peer) = addr(&msg.id);
            let cookie = u64::from(msg.id.cookie[0]) | u64::from(msg.id.cookie[1]) << 32;
            sockets.push(UdpSocket { cookie, local, peer, id: msg.id });
        }
    })?;
    Ok(sockets)
}

/// Destroys `socket`: its process sees ECONNABORTED and the socket is no longer connected.
pub fn destroy(socket: &UdpSocket) -> io::Result<()> {
    let fd = open()?;
    send(&fd, SOCK_DESTROY, libc::NLM_F_ACK as u16, connected_udp(socket.id))?;
    receive(&fd, |_| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected UDP socket of the test process is listed with its cookie, and destroying
    /// it makes its next receive fail with ECONNABORTED (needs CONFIG_INET_DIAG_DESTROY and
    /// CAP_NET_ADMIN, as the agent has).
    #[test]
    fn lists_and_destroys_a_connected_udp_socket() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(peer.local_addr().unwrap()).unwrap();
        let local = socket.local_addr().unwrap();
        let mut cookie = 0u64;
        let mut len = mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt on a socket we own, writing at most `len` bytes to `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        let listed = connected_udp_sockets().unwrap();
        let ours = listed.iter().find(|s| std::net::SocketAddr::V4(s.local) == local).expect("listed");
        assert_eq!((ours.cookie, std::net::SocketAddr::V4(ours.peer)), (cookie, peer.local_addr().unwrap()));
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        destroy(ours).unwrap();
        socket.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
        let error = socket.recv(&mut [0u8; 16]).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ECONNABORTED), "{error}");
    }
}
