//! Internet checksums: incremental updates (RFC 1624) for hooks without checksum helpers, and
//! fresh ones for the packets the programs write themselves.
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

/// The unfolded sum of `N` 16-bit words (as loaded from the packet), for `finish`.
#[inline(always)]
pub fn sum<const N: usize>(words: &[u16; N]) -> u32 {
    let mut sum = 0u32;
    for w in words {
        sum += *w as u32;
    }
    sum
}

/// The checksum of data whose words add up to `sum`.
#[inline(always)]
pub fn finish(sum: u32) -> u16 {
    !fold(sum)
}

/// The Internet checksum of `N` 16-bit words (as loaded from the packet), computed afresh.
#[inline(always)]
pub fn compute<const N: usize>(words: &[u16; N]) -> u16 {
    finish(sum(words))
}

/// The checksum field value `x` that makes data ending the packet (`words`, its field 0) a
/// fixed point of checksum offload: an skb still marked CHECKSUM_PARTIAL at that field gets
/// the checksum of the data written there by the kernel or the NIC (`~(S + x)`, S the sum
/// of the other words), which equals `x` when `2x = ~S` in one's complement arithmetic,
/// where doubling is a 1-bit rotation. So bytes summed into an enclosing checksum now stay
/// the same whether the offload runs or not. (~S = 0 gives 0xffff, which the kernel also
/// writes for a computed 0.)
#[inline(always)]
pub fn partial_fixed_point<const N: usize>(words: &[u16; N]) -> u16 {
    match !fold(sum(words)) {
        0 => 0xffff,
        not_sum => not_sum.rotate_right(1),
    }
}
