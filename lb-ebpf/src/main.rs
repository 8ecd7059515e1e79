//! xlb's kernel programs: thin entry points per hook around one packet pipeline.
//!
//! - `xlb_xdp_ingress`: XDP on the node's external interfaces (traffic from the fabric).
//! - `xlb_tc_external`: the same at TC ingress, for external interfaces where XDP cannot
//!   answer (a veth whose peer runs no XDP program drops what XDP_TX sends).
//! - `xlb_tc_ingress`: TC ingress on pod interfaces (traffic from local pods).
//! - `xlb_tc_egress`: TC egress on external and pod interfaces (after the kernel routed).
//! - `xlb_sock_*`: cgroup sock_addr hooks for the node's own processes (socket balancing).
//!
//! Ingress DNATs new and established connections, undoes SNAT on replies and rejects
//! connections to Services without endpoints; egress applies SNAT and puts the frontend back
//! as the source of replies. Translating after routing on egress keeps the kernel's routing
//! and its netfilter conntrack seeing one consistent client ↔ backend flow
//! (docs/ARCHITECTURE.md).
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod fragments;
mod icmp;
mod maps;
mod nat;
mod packet;
mod parse;
mod pipeline;
mod reject;
mod service;
mod socket;
mod stats;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};
use pipeline::{Origin, Verdict};

#[xdp]
pub fn xlb_xdp_ingress(mut ctx: XdpContext) -> u32 {
    match pipeline::ingress(&mut ctx, Origin::External) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Bounce => xdp_action::XDP_TX,
    }
}

/// The floor for benchmarks and the peer veths of the test cluster (a frame sent with
/// XDP_TX into a veth is only delivered when its peer has an XDP program).
#[xdp]
pub fn xlb_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn xlb_tc_external(mut ctx: TcContext) -> i32 {
    let verdict = pipeline::ingress(&mut ctx, Origin::External);
    tc_action(&ctx, verdict)
}

#[classifier]
pub fn xlb_tc_ingress(mut ctx: TcContext) -> i32 {
    let verdict = pipeline::ingress(&mut ctx, Origin::Internal);
    tc_action(&ctx, verdict)
}

#[classifier]
pub fn xlb_tc_egress(mut ctx: TcContext) -> i32 {
    let verdict = pipeline::egress(&mut ctx);
    tc_action(&ctx, verdict)
}

#[inline(always)]
fn tc_action(ctx: &TcContext, verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Drop => TC_ACT_SHOT as i32,
        // SAFETY: reading the skb's own ifindex; bpf_redirect only records the target.
        Verdict::Bounce => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
    }
}

#[cgroup_sock_addr(connect4)]
pub fn xlb_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock_action(socket::connect(&ctx))
}

#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_action(socket::connect(&ctx))
}

#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_action(socket::peer(&ctx))
}

#[cgroup_sock_addr(getpeername4)]
pub fn xlb_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_action(socket::peer(&ctx))
}

#[inline(always)]
fn sock_action(verdict: socket::Verdict) -> i32 {
    match verdict {
        socket::Verdict::Allow => 1,
        socket::Verdict::Refuse => 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
