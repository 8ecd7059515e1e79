//! Service lookup and backend choice: two hash lookups, no loop over services or backends.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{
    backend::{Backend, BackendKey},
    service::{ServiceKey, ServiceValue},
};

use crate::{
    maps::{XLB_BACKENDS, XLB_SERVICES},
    parse::Flow,
};

/// The frontend `flow` is addressed to, if it is one.
#[inline(always)]
pub fn lookup(flow: &Flow) -> Option<ServiceValue> {
    let key = ServiceKey { addr: flow.daddr, port: flow.dport, proto: flow.proto, _pad: 0 };
    // SAFETY: copied out at once; the agent replaces values whole.
    unsafe { XLB_SERVICES.get(key).copied() }
}

/// A uniformly random backend of `svc` (which has at least one).
#[inline(always)]
pub fn select_backend(svc: &ServiceValue) -> Option<Backend> {
    // SAFETY: a plain helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % svc.backend_count as u32;
    let key = BackendKey { group_id: svc.group_id, slot };
    // SAFETY: copied out at once.
    unsafe { XLB_BACKENDS.get(key).copied() }
}
