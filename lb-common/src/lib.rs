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

// The `new` helpers the tests build values with are behind the `user` feature:
// `cargo test -p lb-common --features user`.
#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use core::{
        mem::{align_of, offset_of, size_of},
        net::Ipv4Addr,
    };
    use std::vec::Vec;

    use crate::{
        backend::{Backend, BackendKey, BACKEND_F_LOCAL},
        config::NodeConfig,
        conntrack::*,
        nat::{NatEntry, NAT_DIR_EGRESS, NAT_DIR_INGRESS},
        proto::{TCP, UDP},
        service::{ServiceKey, ServiceValue, SVC_F_EXTERNAL},
    };

    /// The bytes of a map key or value exactly as the kernel sees them.
    fn bytes<T>(value: &T) -> &[u8] {
        // SAFETY: every map type is #[repr(C)] with integer fields and explicit padding:
        // all `size_of::<T>()` bytes are initialised.
        unsafe { core::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
    }

    /// Host-order integers as the kernel stores them (these fields are not swapped).
    fn ne(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn be_addr(a: u8, b: u8, c: u8, d: u8) -> u32 {
        u32::from(Ipv4Addr::new(a, b, c, d)).to_be()
    }

    #[test]
    fn service_key_is_address_and_port_in_network_order_then_proto_and_zero_pad() {
        let key = ServiceKey::new(Ipv4Addr::new(198, 18, 0, 1), 30080, TCP);
        assert_eq!(bytes(&key), [198, 18, 0, 1, 0x75, 0x80, 6, 0]);
        assert_eq!((key.ip(), key.host_port()), (Ipv4Addr::new(198, 18, 0, 1), 30080));
        let udp = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 10), 53, UDP);
        assert_eq!(bytes(&udp), [10, 96, 0, 10, 0, 53, 17, 0]);
        assert_eq!((size_of::<ServiceKey>(), align_of::<ServiceKey>()), (8, 4));
        assert_eq!(
            (offset_of!(ServiceKey, port), offset_of!(ServiceKey, proto), offset_of!(ServiceKey, _pad)),
            (4, 6, 7)
        );
    }

    #[test]
    fn service_value_is_group_count_and_flags_in_host_order() {
        let value = ServiceValue { group_id: 0x0102_0304, backend_count: 3, flags: SVC_F_EXTERNAL };
        assert_eq!(
            bytes(&value),
            ne(&[&0x0102_0304u32.to_ne_bytes(), &3u16.to_ne_bytes(), &1u16.to_ne_bytes()])
        );
        assert_eq!(SVC_F_EXTERNAL, 1);
        assert_eq!(size_of::<ServiceValue>(), 8);
        assert_eq!((offset_of!(ServiceValue, backend_count), offset_of!(ServiceValue, flags)), (4, 6));
    }

    #[test]
    fn backend_key_is_group_and_slot_in_host_order() {
        let key = BackendKey { group_id: 7, slot: 0x0a0b_0c0d };
        assert_eq!(bytes(&key), ne(&[&7u32.to_ne_bytes(), &0x0a0b_0c0du32.to_ne_bytes()]));
        assert_eq!(size_of::<BackendKey>(), 8);
    }

    #[test]
    fn backend_is_address_and_port_in_network_order_then_flags_and_zero_pad() {
        let backend = Backend::new(Ipv4Addr::new(10, 244, 1, 5), 8080, BACKEND_F_LOCAL);
        assert_eq!(bytes(&backend), [10, 244, 1, 5, 0x1f, 0x90, 1, 0]);
        assert_eq!((backend.ip(), backend.host_port()), (Ipv4Addr::new(10, 244, 1, 5), 8080));
        assert_eq!(
            bytes(&Backend::new(Ipv4Addr::new(10, 244, 2, 6), 65535, 0)),
            [10, 244, 2, 6, 0xff, 0xff, 0, 0]
        );
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(
            (offset_of!(Backend, port), offset_of!(Backend, flags), offset_of!(Backend, _pad)),
            (4, 6, 7)
        );
    }

    #[test]
    fn ct_key_is_addresses_then_ports_in_network_order_then_proto_dir_and_zero_pad() {
        let key = CtKey::new(
            Ipv4Addr::new(10, 0, 0, 1),
            40000,
            Ipv4Addr::new(10, 96, 0, 10),
            80,
            TCP,
            CT_DIR_REPLY,
        );
        assert_eq!(bytes(&key), [10, 0, 0, 1, 10, 96, 0, 10, 0x9c, 0x40, 0, 80, 6, 1, 0, 0]);
        let nat = CtKey::new(
            Ipv4Addr::new(192, 168, 1, 10),
            61000,
            Ipv4Addr::new(10, 244, 1, 5),
            8080,
            UDP,
            NAT_DIR_INGRESS,
        );
        assert_eq!(bytes(&nat), [192, 168, 1, 10, 10, 244, 1, 5, 0xee, 0x48, 0x1f, 0x90, 17, 1, 0, 0]);
        assert_eq!((CT_DIR_FORWARD, CT_DIR_REPLY, NAT_DIR_EGRESS, NAT_DIR_INGRESS), (0, 1, 0, 1));
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(
            [
                offset_of!(CtKey, daddr),
                offset_of!(CtKey, sport),
                offset_of!(CtKey, dport),
                offset_of!(CtKey, proto),
                offset_of!(CtKey, dir),
                offset_of!(CtKey, _pad)
            ],
            [4, 8, 10, 12, 13, 14]
        );
    }

    #[test]
    fn ct_entry_is_nat_address_port_state_then_two_host_order_timestamps() {
        let entry = CtEntry {
            nat_addr: be_addr(10, 244, 1, 5),
            nat_port: 8080u16.to_be(),
            state: CT_STATE_ESTABLISHED,
            _pad: 0,
            created_ns: 0x1122_3344_5566_7788,
            last_seen_ns: 42,
        };
        let head: &[u8] = &[10, 244, 1, 5, 0x1f, 0x90, 2, 0];
        assert_eq!(bytes(&entry), ne(&[head, &0x1122_3344_5566_7788u64.to_ne_bytes(), &42u64.to_ne_bytes()]));
        assert_eq!((size_of::<CtEntry>(), align_of::<CtEntry>()), (24, 8));
        assert_eq!((offset_of!(CtEntry, created_ns), offset_of!(CtEntry, last_seen_ns)), (8, 16));
    }

    #[test]
    fn nat_entry_is_address_and_port_in_network_order_then_host_order_timestamp() {
        let entry =
            NatEntry { addr: be_addr(192, 168, 1, 10), port: 61000u16.to_be(), _pad: 0, last_seen_ns: 7 };
        let head: &[u8] = &[192, 168, 1, 10, 0xee, 0x48, 0, 0];
        assert_eq!(bytes(&entry), ne(&[head, &7u64.to_ne_bytes()]));
        assert_eq!((size_of::<NatEntry>(), align_of::<NatEntry>()), (16, 8));
        assert_eq!((offset_of!(NatEntry, port), offset_of!(NatEntry, last_seen_ns)), (4, 8));
    }

    #[test]
    fn node_config_is_snat_address_in_network_order_and_zero_pad() {
        let config = NodeConfig { snat_addr: be_addr(192, 168, 1, 10), _pad: 0 };
        assert_eq!(bytes(&config), [192, 168, 1, 10, 0, 0, 0, 0]);
        assert_eq!(bytes(&NodeConfig::default()), [0; 8]);
        assert_eq!(size_of::<NodeConfig>(), 8);
    }

    #[test]
    fn ct_timeout_depends_on_tcp_state_and_is_udp_timeout_for_other_protocols() {
        const SEC: u64 = 1_000_000_000;
        assert_eq!(ct_timeout_ns(TCP, CT_STATE_OTHER), 120 * SEC);
        assert_eq!(ct_timeout_ns(TCP, CT_STATE_SYN_SENT), 120 * SEC);
        assert_eq!(ct_timeout_ns(TCP, CT_STATE_ESTABLISHED), 86_400 * SEC);
        assert_eq!(ct_timeout_ns(TCP, CT_STATE_FIN), 120 * SEC);
        assert_eq!(ct_timeout_ns(TCP, CT_STATE_CLOSED), 10 * SEC);
        assert_eq!(ct_timeout_ns(UDP, CT_STATE_ESTABLISHED), 30 * SEC);
    }
}
