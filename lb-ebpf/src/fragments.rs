//! Later fragments of balanced datagrams (`XLB_FRAGMENTS`; lb-common/src/fragment.rs): a
//! translated first fragment leaves its ports behind, keyed by what all fragments of its
//! datagram share, and each later fragment takes them up to meet the same connection.
use aya_ebpf::bindings::BPF_ANY;
use lb_common::fragment::{FragmentKey, FragmentPorts};

use crate::{
    maps::XLB_FRAGMENTS,
    parse::{Flow, Fragment},
};

#[inline(always)]
fn key(flow: &Flow, id: u16) -> FragmentKey {
    FragmentKey { saddr: flow.saddr, daddr: flow.daddr, id, proto: flow.proto, _pad: 0 }
}

/// Remembers the ports of `flow` (as it arrived) when it is the first fragment of a datagram
/// about to be translated.
#[inline(always)]
pub fn remember(flow: &Flow) {
    if let Fragment::First(id) = flow.fragment {
        let ports = FragmentPorts { sport: flow.sport, dport: flow.dport };
        // Best effort: without the entry the later fragments pass untranslated, as before.
        let _ = XLB_FRAGMENTS.insert(key(flow, id), ports, BPF_ANY as u64);
    }
}

/// Gives a later fragment its datagram's ports. `false` when its first fragment was not
/// translated here (or its entry is gone): the fragment is none of the balancer's business.
#[inline(always)]
pub fn complete(flow: &mut Flow) -> bool {
    let Fragment::Later(id) = flow.fragment else { return true };
    // SAFETY: copied out at once.
    let Some(ports) = (unsafe { XLB_FRAGMENTS.get(key(flow, id)) }).copied() else { return false };
    flow.sport = ports.sport;
    flow.dport = ports.dport;
    true
}
