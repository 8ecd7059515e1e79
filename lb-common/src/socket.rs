//! Socket load balancing for the node's own processes (cgroup `connect4`, `sendmsg4`,
//! `recvmsg4`, `getpeername4`): a socket addressing a frontend is pointed at a backend
//! before any packet exists, so no packet of it is ever translated. The map remembers, per
//! socket and backend, the frontend the process addressed, so received datagrams and
//! `getpeername()` show the frontend again.

/// Key of `XLB_SOCK_REVNAT`. 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub backend_addr: u32,
    pub backend_port: u16,
    /// Always 0.
    pub _pad: u16,
}

/// Value of `XLB_SOCK_REVNAT`: the frontend, network byte order. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockRevNatValue {
    pub frontend_addr: u32,
    pub frontend_port: u16,
    /// Always 0.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<SockRevNatKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockRevNatValue>() == 8);
crate::user_pod!(SockRevNatKey, SockRevNatValue);
