//! Per-Service-port traffic counters: `XLB_SERVICE_STATS`, a per-CPU array indexed by
//! `ServiceValue::stats_index` (slot 0 is never assigned: "not counted").

/// Packets and IP bytes of one Service port on one CPU, both directions. 16 bytes, host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<ServiceStats>() == 16);
crate::user_pod!(ServiceStats);

/// Counter slots: the index is a u16 in `ServiceValue` and `CtEntry`.
pub const SERVICE_STATS_MAX: u32 = 65_536;
