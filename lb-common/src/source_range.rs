//! `loadBalancerSourceRanges`: the client prefixes allowed on a LoadBalancer frontend.
//!
//! An LPM trie keyed by (frontend, client address). An allowed range `a.b.c.d/n` of frontend
//! F is stored with prefix length `SOURCE_RANGE_FRONTEND_BITS + n`, so one longest-prefix
//! lookup with the full length answers "is this client allowed on this frontend".

use crate::service::ServiceKey;

/// The frontend part of the key, always matched in full.
pub const SOURCE_RANGE_FRONTEND_BITS: u32 = 64;

/// Data of an `XLB_SOURCE_RANGES` key (after the trie's `prefix_len`). 12 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub frontend: ServiceKey,
    /// Client address (a range's first address), network byte order.
    pub client_addr: u32,
}

const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 12);
crate::user_pod!(SourceRangeKey);
