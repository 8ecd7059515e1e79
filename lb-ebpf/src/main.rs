//! xlb's kernel programs: thin entry points per hook around one packet pipeline.
//!
//! - `xlb_xdp_ingress`: XDP on the node's external interfaces (traffic from the fabric).
//! - `xlb_tc_ingress`: TC ingress on pod interfaces (traffic from local pods).
//! - `xlb_tc_egress`: TC egress on external and pod interfaces (after the kernel routed).
//!
//! Ingress DNATs new and established connections and undoes SNAT on replies; egress applies
//! SNAT and puts the frontend back as the source of replies. Translating after routing on
//! egress keeps the kernel's routing and its netfilter conntrack seeing one consistent
//! client ↔ backend flow (docs/ARCHITECTURE.md).
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod maps;
mod nat;
mod packet;
mod parse;
mod pipeline;
mod service;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use pipeline::Verdict;

#[xdp]
pub fn xlb_xdp_ingress(mut ctx: XdpContext) -> u32 {
    match pipeline::ingress(&mut ctx) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn xlb_tc_ingress(mut ctx: TcContext) -> i32 {
    tc_action(pipeline::ingress(&mut ctx))
}

#[classifier]
pub fn xlb_tc_egress(mut ctx: TcContext) -> i32 {
    tc_action(pipeline::egress(&mut ctx))
}

#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    match verdict {
        Verdict::Pass => TC_ACT_OK as i32,
        Verdict::Drop => TC_ACT_SHOT as i32,
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
