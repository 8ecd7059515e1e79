//! Service lookup and backend choice: hash lookups only, no loop over services or backends.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_get_prandom_u32};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    backend::{Backend, BackendKey},
    service::{ServiceKey, ServiceValue},
    source_range::{SourceRangeKey, SOURCE_RANGE_FRONTEND_BITS},
};

use crate::maps::{SourceRangeLookup, XLB_AFFINITY, XLB_BACKENDS, XLB_SERVICES, XLB_SOURCE_RANGES};

const NS_PER_SEC: u64 = 1_000_000_000;

/// Where the client of a new connection is.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Arrived on an external interface: Service traffic policies for external clients apply.
    External,
    /// This node's pods and processes.
    Internal,
}

/// The frontend at `addr:port` (network byte order) for `proto`, if it is one.
#[inline(always)]
pub fn lookup(addr: u32, port: u16, proto: u8) -> Option<(ServiceKey, ServiceValue)> {
    let key = ServiceKey { addr, port, proto, _pad: 0 };
    // SAFETY: copied out at once; the agent replaces values whole.
    unsafe { XLB_SERVICES.get(key).copied() }.map(|value| (key, value))
}

/// Whether `client` may use `frontend` under its `loadBalancerSourceRanges`.
#[inline(always)]
pub fn source_allowed(frontend: ServiceKey, client: u32) -> bool {
    let key = SourceRangeLookup::new(
        SOURCE_RANGE_FRONTEND_BITS + 32,
        SourceRangeKey { frontend, client_addr: client },
    );
    XLB_SOURCE_RANGES.get(&key).is_some()
}

/// The backend group (id, slot count) for a client at `origin`.
#[inline(always)]
pub fn group(svc: &ServiceValue, origin: Origin) -> (u32, u32) {
    match origin {
        Origin::External => (svc.group_id, svc.backend_count as u32),
        Origin::Internal => (svc.internal_group_id, svc.internal_count as u32),
    }
}

#[inline(always)]
fn slot(group_id: u32, slot: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { XLB_BACKENDS.get(BackendKey { group_id, slot }).copied() }
}

/// Who session affinity remembers: a packet's source address, or a socket's network
/// namespace (one per pod; the node's own for its processes).
#[derive(Clone, Copy)]
pub enum Client {
    Addr(u32),
    Netns(u64),
}

/// The backend for a new connection from `client` in group `(group_id, count)` (count > 0):
/// the client's affinity backend while it is fresh and still in the group, otherwise a
/// uniformly random slot (remembered when the Service has affinity).
#[inline(always)]
pub fn select_backend(
    svc: &ServiceValue,
    (group_id, count): (u32, u32),
    client: Client,
    now: u64,
) -> Option<Backend> {
    let timeout_ns = svc.affinity_timeout_s as u64 * NS_PER_SEC;
    let key = match client {
        Client::Addr(client_addr) => AffinityKey { client_addr, group_id, netns_cookie: 0 },
        Client::Netns(netns_cookie) => AffinityKey { client_addr: 0, group_id, netns_cookie },
    };
    if timeout_ns != 0 {
        if let Some(entry) = XLB_AFFINITY.get_ptr_mut(key) {
            // SAFETY: a map value pointer, valid for this program run.
            let entry = unsafe { &mut *entry };
            if now.saturating_sub(entry.last_used_ns) <= timeout_ns && entry.slot < count {
                if let Some(backend) = slot(group_id, entry.slot).filter(|b| b.addr == entry.backend_addr) {
                    entry.last_used_ns = now;
                    return Some(backend);
                }
            }
        }
    }
    // SAFETY: a plain helper call without arguments.
    let chosen = unsafe { bpf_get_prandom_u32() } % count;
    let backend = slot(group_id, chosen)?;
    if timeout_ns != 0 {
        let entry = AffinityEntry { slot: chosen, backend_addr: backend.addr, last_used_ns: now };
        // Best effort: without the entry the next connection is balanced anew.
        let _ = XLB_AFFINITY.insert(key, entry, BPF_ANY as u64);
    }
    Some(backend)
}
