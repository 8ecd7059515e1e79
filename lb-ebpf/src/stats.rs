//! Per-Service-port counters: one per-CPU slot add per balanced packet, no atomics.
use crate::maps::XLB_SERVICE_STATS;

/// Counts one packet of `len` IP bytes for the Service port at `index` (0: not counted).
#[inline(always)]
pub fn count(index: u16, len: u16) {
    if index == 0 {
        return;
    }
    if let Some(stats) = XLB_SERVICE_STATS.get_ptr_mut(u32::from(index)) {
        // SAFETY: this CPU's slot, valid for this program run; no other writer on this CPU.
        let stats = unsafe { &mut *stats };
        stats.packets += 1;
        stats.bytes += u64::from(len);
    }
}
