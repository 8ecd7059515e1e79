//! Sockets of a pod's processes. A process's sockets belong to the cgroup it was in when it
//! created them, and the agent's socket programs act on the sockets under its `--cgroup-path`:
//! in production every pod's. Test code runs in threads of the test process (`netns::within`),
//! which cannot join a pod's cgroup alone, so a pod has a socket factory: a small process in
//! the pod's network namespace and cgroup (`kiada sockets`) that creates sockets on request
//! and passes them over a Unix socket (SCM_RIGHTS). A thread that entered a pod's namespace
//! creates its sockets there (`tcp_connect`, `udp_bind`); elsewhere, or inside `bypass`, they
//! are the test process's own, outside every node's cgroup.
use std::{
    cell::RefCell,
    collections::HashMap,
    io::{self, Read as _, Write as _},
    mem,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::net::UnixStream,
    },
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

/// What a factory is asked for: one byte.
const TCP4: u8 = b't';
const UDP4: u8 = b'u';

/// The test process's end of a pod's socket factory.
#[derive(Debug)]
pub struct Factory(Mutex<UnixStream>);

impl Factory {
    pub fn new(stream: UnixStream) -> Self {
        Self(Mutex::new(stream))
    }

    fn socket(&self, kind: u8) -> io::Result<Socket> {
        let stream = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (&*stream).write_all(&[kind])?;
        receive_fd(&stream).map(Socket::from)
    }
}

/// Factories by network namespace name (registered by the testbed for its pods).
fn registry() -> &'static Mutex<HashMap<String, Arc<Factory>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<Factory>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

pub fn register(ns: &str, factory: Arc<Factory>) {
    registry().lock().unwrap_or_else(PoisonError::into_inner).insert(ns.to_string(), factory);
}

pub fn unregister(ns: &str) {
    registry().lock().unwrap_or_else(PoisonError::into_inner).remove(ns);
}

thread_local! {
    /// The factory of the pod whose namespace this thread entered, if any.
    static CURRENT: RefCell<Option<Arc<Factory>>> = const { RefCell::new(None) };
}

/// Called by a thread entering namespace `ns`: its sockets come from `ns`'s factory, if it has one.
pub(crate) fn entered(ns: &str) {
    let factory = registry().lock().unwrap_or_else(PoisonError::into_inner).get(ns).cloned();
    CURRENT.with(|current| *current.borrow_mut() = factory);
}

/// Runs `f` with sockets of the test process itself (outside every node's cgroup), as a pod
/// whose processes the agent's socket programs do not see: its traffic takes the pod
/// interface's TC path.
pub fn bypass<T>(f: impl FnOnce() -> T) -> T {
    let saved = CURRENT.with(|current| current.borrow_mut().take());
    let result = f();
    CURRENT.with(|current| *current.borrow_mut() = saved);
    result
}

fn new_socket(kind: u8) -> io::Result<Socket> {
    match CURRENT.with(|current| current.borrow().clone()) {
        Some(factory) => factory.socket(kind),
        None if kind == TCP4 => Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)),
        None => Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)),
    }
}

/// A TCP connection to `addr` from the current thread's pod (or the test process).
pub fn tcp_connect(addr: SocketAddrV4, timeout: Duration) -> io::Result<TcpStream> {
    let socket = new_socket(TCP4)?;
    socket.connect_timeout(&SocketAddr::V4(addr).into(), timeout)?;
    Ok(socket.into())
}

/// A UDP socket bound to `addr` (port 0: any) in the current thread's pod (or the test process).
pub fn udp_bind(addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let socket = new_socket(UDP4)?;
    socket.bind(&SocketAddr::V4(addr).into())?;
    Ok(socket.into())
}

/// The factory process's loop (`kiada sockets`): a socket for each request byte on `stream`,
/// until the test process closes its end.
pub fn serve(stream: UnixStream) -> io::Result<()> {
    let mut kind = [0u8];
    loop {
        match (&stream).read(&mut kind)? {
            0 => return Ok(()),
            _ => {
                let socket = match kind[0] {
                    TCP4 => Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?,
                    UDP4 => Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?,
                    other => return Err(io::Error::other(format!("unknown socket kind {other}"))),
                };
                send_fd(&stream, &OwnedFd::from(socket))?;
            }
        }
    }
}

/// Room for one file descriptor in a control message.
const CMSG_SPACE: usize = 24;

/// A message of one byte (`byte`) with room for one descriptor in `control`.
///
/// # Safety
/// The message points at `byte`, `iov` and `control`, which must outlive its use.
unsafe fn message(iov: &mut libc::iovec, control: &mut [u8; CMSG_SPACE]) -> libc::msghdr {
    let mut msg: libc::msghdr = mem::zeroed();
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE;
    msg
}

fn send_fd(stream: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = [0u8; CMSG_SPACE];
    // SAFETY: the message points at live buffers; the control buffer has room for one cmsghdr
    // with one int (CMSG_SPACE(4) == 24 on 64-bit Linux), filled through the CMSG macros
    // before sendmsg reads it.
    unsafe {
        let mut msg = message(&mut iov, &mut control);
        msg.msg_controllen = libc::CMSG_SPACE(mem::size_of::<libc::c_int>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<libc::c_int>() as u32) as usize;
        libc::CMSG_DATA(cmsg).cast::<libc::c_int>().write_unaligned(fd.as_raw_fd());
        if libc::sendmsg(stream.as_raw_fd(), &msg, 0) != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn receive_fd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut byte = [0u8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut control = [0u8; CMSG_SPACE];
    // SAFETY: as in send_fd; the descriptor is taken only from an SCM_RIGHTS message of the
    // expected length, and owned from then on.
    unsafe {
        let mut msg = message(&mut iov, &mut control);
        let n = libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the socket factory exited"));
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_level != libc::SOL_SOCKET || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::other("the socket factory sent no socket"));
        }
        Ok(OwnedFd::from_raw_fd(libc::CMSG_DATA(cmsg).cast::<libc::c_int>().read_unaligned()))
    }
}
