//! Socket load balancing for the processes under `--cgroup-path` (cgroup sock_addr hooks): the
//! socket is pointed at a backend when it connects or sends, and shows the frontend when it
//! receives or asks for its peer. No packet of such a socket is translated.
//!
//! With the cgroup v2 root as `--cgroup-path` (the DaemonSet), that is the node's own processes
//! and every pod's. A pod's UDP is left to the packet path (its veth's TC ingress), as
//! kube-proxy's per-packet NAT: a flow keeps its backend by its tuple, and the agent can move
//! it off a removed endpoint by deleting its conntrack entry, which a socket connected to the
//! backend would not notice. Affinity is per client as kube-proxy keeps it: per network
//! namespace here, since the source address is not chosen yet at `connect()`.
use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::{
    proto,
    service::{SVC_F_NO_ENDPOINTS, SVC_F_SOURCE_RANGES},
    socket::{SockRevNatKey, SockRevNatValue},
};

use crate::{
    maps::{XLB_CONFIG, XLB_SOCK_REVNAT},
    service::{self, Client, Origin},
};

const ECONNREFUSED: i32 = 111;

/// Whether the socket operation may go on (the cgroup program's return value).
pub enum Verdict {
    Allow,
    Refuse,
}

#[inline(always)]
fn addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    // SAFETY: the context pointer the kernel passed to this program run.
    unsafe { &mut *ctx.sock_addr }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a helper call on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

#[inline(always)]
fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: a helper call on the program's own context.
    unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a plain helper call without arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() }
}

/// `connect()` of a TCP or UDP socket, or `sendmsg()` of an unconnected UDP one, addressed to
/// a frontend: addressed to a backend instead, chosen as for the node's pods.
#[inline(always)]
pub fn connect(ctx: &SockAddrContext) -> Verdict {
    let sa = addr(ctx);
    let protocol = sa.protocol as u8;
    if protocol != proto::TCP && protocol != proto::UDP {
        return Verdict::Allow;
    }
    let (frontend_addr, frontend_port) = (sa.user_ip4, sa.user_port as u16);
    let Some((frontend, svc)) = service::lookup(frontend_addr, frontend_port, protocol) else {
        return Verdict::Allow;
    };
    let netns = netns_cookie(ctx);
    let config = XLB_CONFIG.get(0);
    let in_pod = config.is_none_or(|c| c.host_netns_cookie != netns);
    if protocol == proto::UDP && in_pod {
        return Verdict::Allow;
    }
    if svc.flags & SVC_F_SOURCE_RANGES != 0 {
        // loadBalancerSourceRanges hold for every client, as kube-proxy's firewall chain. A
        // pod's source is its own address, which its veth's TC path checks: left to it. The
        // node's is its address (the SNAT address); outside the ranges, refused (EPERM).
        if in_pod {
            return Verdict::Allow;
        }
        let node_addr = config.map_or(0, |c| c.snat_addr);
        if !service::source_allowed(frontend, node_addr) {
            return Verdict::Refuse;
        }
    }
    let group = service::group(&svc, Origin::Internal);
    if group.1 == 0 {
        if svc.flags & SVC_F_NO_ENDPOINTS != 0 {
            // SAFETY: a helper call setting this syscall's return value.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            return Verdict::Refuse;
        }
        // Local policy without a local endpoint: the connection goes nowhere, as it would drop.
        return Verdict::Allow;
    }
    let Some(backend) = service::select_backend(&svc, group, Client::Netns(netns), now()) else {
        return Verdict::Allow;
    };
    let key = SockRevNatKey {
        cookie: cookie(ctx),
        backend_addr: backend.addr,
        backend_port: backend.port,
        _pad: 0,
    };
    let value = SockRevNatValue { frontend_addr, frontend_port, _pad: 0 };
    // Without the entry replies would show the backend: better than refusing the socket.
    let _ = XLB_SOCK_REVNAT.insert(key, value, BPF_ANY as u64);
    let sa = addr(ctx);
    sa.user_ip4 = backend.addr;
    sa.user_port = backend.port as u32;
    Verdict::Allow
}

/// `recvmsg()` of a UDP socket, `getpeername()`: a backend the socket was pointed at shows
/// as the frontend it addressed.
#[inline(always)]
pub fn peer(ctx: &SockAddrContext) -> Verdict {
    let sa = addr(ctx);
    let key = SockRevNatKey {
        cookie: cookie(ctx),
        backend_addr: sa.user_ip4,
        backend_port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = unsafe { XLB_SOCK_REVNAT.get(key) }.copied() {
        let sa = addr(ctx);
        sa.user_ip4 = frontend.frontend_addr;
        sa.user_port = frontend.frontend_port as u32;
    }
    Verdict::Allow
}
