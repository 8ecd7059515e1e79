//! What the pipeline needs from a hook: packet bounds and header rewrites that keep every
//! checksum right. XDP writes in place and updates checksums incrementally; TC goes through
//! the kernel's helpers, which also handle CHECKSUM_PARTIAL skbs from local senders.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{bpf_skb_change_head, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use lb_common::proto;

use crate::{
    csum,
    parse::{ptr_at, Flow, IP_CSUM_OFF},
};

pub trait Packet: Sized {
    /// Whether the hook may see a packet whose L4 checksum its sender left to offload
    /// (CHECKSUM_PARTIAL: the field holds only the pseudo-header sum, and the kernel or the
    /// NIC completes it on the way out). TC may; XDP gets what the wire delivered.
    const CHECKSUM_MAY_BE_PARTIAL: bool;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// The frame's length in bytes, all of it: for TC, paged data included (`data_end`
    /// bounds only the linear part).
    fn frame_len(&self) -> usize;
    /// Sets the IPv4 address at `off` (source or destination) to `new`, fixing the IPv4
    /// header checksum and the TCP/UDP pseudo-header checksum (when the packet holds the L4
    /// header: not a later fragment).
    fn set_addr(&mut self, flow: &Flow, off: usize, new: u32) -> Option<()>;
    /// Sets the TCP/UDP port at `off` to `new`, fixing the TCP/UDP checksum.
    fn set_port(&mut self, flow: &Flow, off: usize, new: u16) -> Option<()>;
    /// Adds `len` bytes in front of the frame (invalidates every packet pointer).
    fn grow_head(&mut self, len: usize) -> Option<()>;
    /// Cuts the frame to `len` bytes, no longer than it is (invalidates every packet pointer).
    fn truncate(&mut self, len: usize) -> Option<()>;
}

/// Reads a packet bound from the context as a new value every time. Otherwise LLVM may drop a
/// bounds check it proved redundant with an earlier one while reloading the pointer after a
/// helper call, and the verifier, which tracks checks per loaded pointer, rejects the access.
#[inline(always)]
unsafe fn fresh(bound: *const u32) -> usize {
    core::ptr::read_volatile(bound) as usize
}

/// UDP checksum 0 means "none" and must stay 0; a computed 0 is sent as 0xffff.
#[inline(always)]
fn xdp_l4_update(flow: &Flow, p: *mut u16, update: impl FnOnce(u16) -> u16) {
    // SAFETY: p comes from ptr_at, inside the packet.
    unsafe {
        let old = p.read_unaligned();
        if flow.proto == proto::UDP && old == 0 {
            return;
        }
        let mut new = update(old);
        if flow.proto == proto::UDP && new == 0 {
            new = 0xffff;
        }
        p.write_unaligned(new);
    }
}

impl Packet for XdpContext {
    const CHECKSUM_MAY_BE_PARTIAL: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the context pointer is the program's own (see `fresh` for why volatile).
        unsafe { fresh(&(*self.ctx).data) }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { fresh(&(*self.ctx).data_end) }
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        // Loaded without multi-buffer support: the frame is all in one buffer.
        self.data_end() - self.data()
    }

    #[inline(always)]
    fn set_addr(&mut self, flow: &Flow, off: usize, new: u32) -> Option<()> {
        let field = ptr_at::<u32, _>(self, off)?;
        let ip_csum = ptr_at::<u16, _>(self, flow.l3 + IP_CSUM_OFF)?;
        let l4_csum =
            if flow.has_l4_header() { Some(ptr_at::<u16, _>(self, flow.l4_csum_off())?) } else { None };
        // SAFETY: all three pointers were bounds-checked by ptr_at.
        let old = unsafe { field.read_unaligned() };
        unsafe {
            field.write_unaligned(new);
            ip_csum.write_unaligned(csum::replace4(ip_csum.read_unaligned(), old, new));
        }
        if let Some(l4_csum) = l4_csum {
            xdp_l4_update(flow, l4_csum, |c| csum::replace4(c, old, new));
        }
        Some(())
    }

    #[inline(always)]
    fn set_port(&mut self, flow: &Flow, off: usize, new: u16) -> Option<()> {
        let field = ptr_at::<u16, _>(self, off)?;
        let l4_csum = ptr_at::<u16, _>(self, flow.l4_csum_off())?;
        // SAFETY: bounds-checked by ptr_at.
        let old = unsafe { field.read_unaligned() };
        unsafe { field.write_unaligned(new) };
        xdp_l4_update(flow, l4_csum, |c| csum::replace2(c, old, new));
        Some(())
    }

    #[inline(always)]
    fn grow_head(&mut self, len: usize) -> Option<()> {
        // SAFETY: the context pointer is the program's own.
        (unsafe { bpf_xdp_adjust_head(self.ctx, -(len as i32)) } == 0).then_some(())
    }

    #[inline(always)]
    fn truncate(&mut self, len: usize) -> Option<()> {
        let now = self.data_end() - self.data();
        if len > now {
            return None;
        }
        // SAFETY: as above.
        (unsafe { bpf_xdp_adjust_tail(self.ctx, len as i32 - now as i32) } == 0).then_some(())
    }
}

#[inline(always)]
fn tc_l4_flags(flow: &Flow) -> u64 {
    if flow.proto == proto::UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

impl Packet for TcContext {
    const CHECKSUM_MAY_BE_PARTIAL: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        // SAFETY: the skb pointer is the program's own (see `fresh` for why volatile).
        unsafe { fresh(&(*self.skb.skb).data) }
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        // SAFETY: as above.
        unsafe { fresh(&(*self.skb.skb).data_end) }
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.len() as usize
    }

    #[inline(always)]
    fn set_addr(&mut self, flow: &Flow, off: usize, new: u32) -> Option<()> {
        let old: u32 = self.load(off).ok()?;
        if flow.has_l4_header() {
            let flags = tc_l4_flags(flow) | BPF_F_PSEUDO_HDR as u64 | 4;
            self.l4_csum_replace(flow.l4_csum_off(), old as u64, new as u64, flags).ok()?;
        }
        self.l3_csum_replace(flow.l3 + IP_CSUM_OFF, old as u64, new as u64, 4).ok()?;
        self.store(off, &new, 0).ok()
    }

    #[inline(always)]
    fn set_port(&mut self, flow: &Flow, off: usize, new: u16) -> Option<()> {
        let old: u16 = self.load(off).ok()?;
        let flags = tc_l4_flags(flow) | 2;
        self.l4_csum_replace(flow.l4_csum_off(), old as u64, new as u64, flags).ok()?;
        self.store(off, &new, 0).ok()
    }

    #[inline(always)]
    fn grow_head(&mut self, len: usize) -> Option<()> {
        // SAFETY: the skb pointer is the program's own.
        (unsafe { bpf_skb_change_head(self.skb.skb as *mut _, len as u32, 0) } == 0).then_some(())
    }

    #[inline(always)]
    fn truncate(&mut self, len: usize) -> Option<()> {
        if len > self.len() as usize {
            return None;
        }
        // SAFETY: as above.
        (unsafe { bpf_skb_change_tail(self.skb.skb as *mut _, len as u32, 0) } == 0).then_some(())
    }
}
