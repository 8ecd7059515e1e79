//! Incremental Internet checksum updates (RFC 1624), for hooks without checksum helpers.
//!
//! Values are used exactly as loaded from the packet: one's complement sums are byte-order
//! independent as long as every word is read the same way.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace2(csum: u16, old: u16, new: u16) -> u16 {
    // HC' = ~(~HC + ~m + m')
    !fold(!csum as u32 + !old as u32 + new as u32)
}

/// The checksum after a 32-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace4(csum: u16, old: u32, new: u32) -> u16 {
    let sum = !csum as u32 + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// The Internet checksum of `N` 16-bit words (as loaded from the packet), computed afresh.
#[inline(always)]
pub fn compute<const N: usize>(words: &[u16; N]) -> u16 {
    let mut sum = 0u32;
    for w in words {
        sum += *w as u32;
    }
    !fold(sum)
}
