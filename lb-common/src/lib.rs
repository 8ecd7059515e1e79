//! Types shared by the kernel programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so both sides agree on the
//! byte layout and the kernel never sees uninitialised bytes in a key. Addresses and ports
//! are kept in network byte order, exactly as they sit in the packet, so the per-packet path
//! never swaps bytes; the user side converts with the helpers behind the `user` feature.
#![no_std]

pub mod backend;
pub mod config;
pub mod conntrack;
pub mod maps;
pub mod nat;
pub mod service;

/// Implements `aya::Pod` for map types on the user side.
macro_rules! user_pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: #[repr(C)], only integer fields, explicit padding: every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use user_pod;

/// IP protocol numbers as they appear in the IPv4 header.
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}
