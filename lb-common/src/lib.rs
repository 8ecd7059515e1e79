//! Types shared by the kernel programs (`lb-ebpf`) and the agent (`lb-userspace`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so both sides agree on the
//! byte layout and the kernel never sees uninitialised bytes in a key. Addresses and ports
//! are kept in network byte order, exactly as they sit in the packet, so the per-packet path
//! never swaps bytes; the user side converts with the helpers behind the `user` feature.
#![no_std]

pub mod affinity;
pub mod backend;
pub mod config;
pub mod conntrack;
pub mod fragment;
pub mod maps;
pub mod nat;
pub mod service;
pub mod socket;
pub mod source_range;
pub mod stats;

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
    pub const ICMP: u8 = 1;
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

    use aya::maps::lpm_trie::Key;

    use crate::{
        affinity::{AffinityEntry, AffinityKey},
        backend::{Backend, BackendKey, BACKEND_F_LOCAL},
        config::NodeConfig,
        conntrack::*,
        nat::NatEntry,
        proto::{ICMP, TCP, UDP},
        service::{ServiceKey, ServiceValue, SVC_F_NO_ENDPOINTS, SVC_F_SOURCE_RANGES},
        source_range::{SourceRangeKey, SOURCE_RANGE_FRONTEND_BITS},
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
    fn service_value_is_two_groups_two_counts_flags_stats_index_and_affinity_timeout_in_host_order() {
        let value = ServiceValue {
            group_id: 0x0102_0304,
            internal_group_id: 0x0506_0708,
            backend_count: 3,
            internal_count: 1,
            flags: SVC_F_NO_ENDPOINTS | SVC_F_SOURCE_RANGES,
            stats_index: 0x0a0b,
            affinity_timeout_s: 10_800,
        };
        assert_eq!(
            bytes(&value),
            ne(&[
                &0x0102_0304u32.to_ne_bytes(),
                &0x0506_0708u32.to_ne_bytes(),
                &3u16.to_ne_bytes(),
                &1u16.to_ne_bytes(),
                &3u16.to_ne_bytes(),
                &0x0a0bu16.to_ne_bytes(),
                &10_800u32.to_ne_bytes(),
            ])
        );
        assert_eq!((SVC_F_NO_ENDPOINTS, SVC_F_SOURCE_RANGES), (1, 2));
        assert_eq!((size_of::<ServiceValue>(), align_of::<ServiceValue>()), (20, 4));
        assert_eq!(
            [
                offset_of!(ServiceValue, internal_group_id),
                offset_of!(ServiceValue, backend_count),
                offset_of!(ServiceValue, internal_count),
                offset_of!(ServiceValue, flags),
                offset_of!(ServiceValue, stats_index),
                offset_of!(ServiceValue, affinity_timeout_s)
            ],
            [4, 8, 10, 12, 14, 16]
        );
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
    fn ct_key_is_addresses_then_ports_in_network_order_then_proto_and_zero_pad() {
        let key = CtKey::new(Ipv4Addr::new(10, 0, 0, 1), 40000, Ipv4Addr::new(10, 96, 0, 10), 80, TCP);
        assert_eq!(bytes(&key), [10, 0, 0, 1, 10, 96, 0, 10, 0x9c, 0x40, 0, 80, 6, 0, 0, 0]);
        let udp = CtKey::new(Ipv4Addr::new(192, 168, 1, 10), 61000, Ipv4Addr::new(10, 244, 1, 5), 8080, UDP);
        assert_eq!(bytes(&udp), [192, 168, 1, 10, 10, 244, 1, 5, 0xee, 0x48, 0x1f, 0x90, 17, 0, 0, 0]);
        assert_eq!((size_of::<CtKey>(), align_of::<CtKey>()), (16, 4));
        assert_eq!(
            [
                offset_of!(CtKey, daddr),
                offset_of!(CtKey, sport),
                offset_of!(CtKey, dport),
                offset_of!(CtKey, proto),
                offset_of!(CtKey, _pad)
            ],
            [4, 8, 10, 12, 13]
        );
    }

    #[test]
    fn reversed_ct_key_swaps_addresses_and_ports_and_keeps_proto() {
        let key = CtKey::new(Ipv4Addr::new(10, 0, 0, 1), 40000, Ipv4Addr::new(10, 244, 1, 5), 8080, UDP);
        let reply = CtKey::new(Ipv4Addr::new(10, 244, 1, 5), 8080, Ipv4Addr::new(10, 0, 0, 1), 40000, UDP);
        assert_eq!(key.reversed(), reply);
        assert_eq!(reply.reversed(), key);
    }

    #[test]
    fn ct_entry_is_frontend_and_snat_in_network_order_then_state_flags_and_host_order_stats_index_and_timestamps(
    ) {
        let entry = CtEntry {
            frontend_addr: be_addr(10, 96, 0, 10),
            frontend_port: 80u16.to_be(),
            snat_port: 61000u16.to_be(),
            snat_addr: be_addr(198, 18, 0, 1),
            state: CT_STATE_ESTABLISHED,
            flags: CT_F_REPLIED,
            stats_index: 0x0102,
            created_ns: 0x1122_3344_5566_7788,
            last_seen_ns: 42,
        };
        let head: &[u8] = &[10, 96, 0, 10, 0, 80, 0xee, 0x48, 198, 18, 0, 1, 2, 1];
        assert_eq!(
            bytes(&entry),
            ne(&[
                head,
                &0x0102u16.to_ne_bytes(),
                &0x1122_3344_5566_7788u64.to_ne_bytes(),
                &42u64.to_ne_bytes()
            ])
        );
        assert_eq!((size_of::<CtEntry>(), align_of::<CtEntry>()), (32, 8));
        assert_eq!(
            [
                offset_of!(CtEntry, frontend_port),
                offset_of!(CtEntry, snat_port),
                offset_of!(CtEntry, snat_addr),
                offset_of!(CtEntry, state),
                offset_of!(CtEntry, flags),
                offset_of!(CtEntry, stats_index),
                offset_of!(CtEntry, created_ns),
                offset_of!(CtEntry, last_seen_ns)
            ],
            [4, 6, 8, 12, 13, 14, 16, 24]
        );
    }

    #[test]
    fn ct_backend_and_nat_entry_are_address_and_port_in_network_order_then_zero_pad() {
        let backend = CtBackend { addr: be_addr(10, 244, 1, 5), port: 8080u16.to_be(), _pad: 0 };
        assert_eq!(bytes(&backend), [10, 244, 1, 5, 0x1f, 0x90, 0, 0]);
        assert_eq!(
            (size_of::<CtBackend>(), offset_of!(CtBackend, port), offset_of!(CtBackend, _pad)),
            (8, 4, 6)
        );
        let nat = NatEntry { addr: be_addr(192, 168, 1, 10), port: 40000u16.to_be(), _pad: 0 };
        assert_eq!(bytes(&nat), [192, 168, 1, 10, 0x9c, 0x40, 0, 0]);
        assert_eq!(
            (size_of::<NatEntry>(), offset_of!(NatEntry, port), offset_of!(NatEntry, _pad)),
            (8, 4, 6)
        );
    }

    #[test]
    fn affinity_key_is_client_in_network_order_then_host_order_group_and_netns_cookie() {
        let key = AffinityKey {
            client_addr: be_addr(198, 18, 0, 100),
            group_id: 0x0a0b_0c0d,
            netns_cookie: 0x0102,
        };
        assert_eq!(
            bytes(&key),
            ne(&[&[198, 18, 0, 100], &0x0a0b_0c0du32.to_ne_bytes(), &0x0102u64.to_ne_bytes()])
        );
        assert_eq!(
            (
                size_of::<AffinityKey>(),
                offset_of!(AffinityKey, group_id),
                offset_of!(AffinityKey, netns_cookie)
            ),
            (16, 4, 8)
        );
    }

    #[test]
    fn affinity_entry_is_host_order_slot_then_backend_in_network_order_then_host_order_timestamp() {
        let entry = AffinityEntry { slot: 5, backend_addr: be_addr(10, 244, 1, 5), last_used_ns: 99 };
        assert_eq!(bytes(&entry), ne(&[&5u32.to_ne_bytes(), &[10, 244, 1, 5], &99u64.to_ne_bytes()]));
        assert_eq!((size_of::<AffinityEntry>(), align_of::<AffinityEntry>()), (16, 8));
        assert_eq!(
            (offset_of!(AffinityEntry, backend_addr), offset_of!(AffinityEntry, last_used_ns)),
            (4, 8)
        );
    }

    #[test]
    fn source_range_key_is_the_frontend_then_the_client_address_so_the_prefix_covers_the_frontend_first() {
        let data = SourceRangeKey {
            frontend: ServiceKey::new(Ipv4Addr::new(203, 0, 113, 7), 443, TCP),
            client_addr: be_addr(198, 18, 0, 0),
        };
        assert_eq!(bytes(&data), [203, 0, 113, 7, 0x01, 0xbb, 6, 0, 198, 18, 0, 0]);
        assert_eq!((size_of::<SourceRangeKey>(), offset_of!(SourceRangeKey, client_addr)), (12, 8));
        // The trie key as the kernel reads it: prefix length (host order), then the data, whose
        // first 64 bits are the whole frontend.
        assert_eq!(SOURCE_RANGE_FRONTEND_BITS as usize, 8 * offset_of!(SourceRangeKey, client_addr));
        let key = Key::new(SOURCE_RANGE_FRONTEND_BITS + 16, data);
        assert_eq!(bytes(&key), ne(&[&80u32.to_ne_bytes(), bytes(&data)]));
    }

    #[test]
    fn fragment_key_is_addresses_then_id_in_network_order_then_proto_and_zero_pad() {
        use crate::fragment::{FragmentKey, FragmentPorts};
        let key = FragmentKey {
            saddr: be_addr(198, 18, 1, 10),
            daddr: be_addr(198, 19, 0, 10),
            id: 0x1234u16.to_be(),
            proto: UDP,
            _pad: 0,
        };
        assert_eq!(bytes(&key), [198, 18, 1, 10, 198, 19, 0, 10, 0x12, 0x34, 17, 0]);
        let ports = FragmentPorts { sport: 40000u16.to_be(), dport: 53u16.to_be() };
        assert_eq!(bytes(&ports), [0x9c, 0x40, 0, 53]);
    }

    #[test]
    fn service_stats_are_packets_then_bytes_in_host_order() {
        let stats = crate::stats::ServiceStats { packets: 3, bytes: 0x0102_0304_0506_0708 };
        assert_eq!(bytes(&stats), ne(&[&3u64.to_ne_bytes(), &0x0102_0304_0506_0708u64.to_ne_bytes()]));
        assert_eq!(crate::stats::SERVICE_STATS_MAX, u32::from(u16::MAX) + 1);
    }

    #[test]
    fn service_port_name_is_host_order_length_then_the_utf8_bytes_zero_padded() {
        use crate::stats::{ServicePortName, SERVICE_PORT_NAME_MAX};
        let name = ServicePortName::new("default/kiada:http/TCP");
        let mut want = ne(&[&22u32.to_ne_bytes(), b"default/kiada:http/TCP"]);
        want.resize(160, 0);
        assert_eq!(bytes(&name), want);
        assert_eq!(name.as_str(), Some("default/kiada:http/TCP"));
        assert_eq!((size_of::<ServicePortName>(), align_of::<ServicePortName>()), (160, 4));
        assert_eq!(offset_of!(ServicePortName, name), 4);
        // The longest name Kubernetes allows fits whole.
        let longest = std::format!("{}/{}:{}/SCTP", "n".repeat(63), "s".repeat(63), "p".repeat(15));
        assert_eq!(ServicePortName::new(&longest).as_str(), Some(longest.as_str()));
        // Longer ones are cut at a character boundary; an unnamed port is just shorter.
        let long = std::format!("{}é", "x".repeat(SERVICE_PORT_NAME_MAX - 1));
        assert_eq!(ServicePortName::new(&long).as_str(), Some(&long[..SERVICE_PORT_NAME_MAX - 1]));
        assert_eq!(ServicePortName::new("ns/dns:/UDP").as_str(), Some("ns/dns:/UDP"));
        // Entries this agent did not write read as none.
        assert_eq!(ServicePortName { len: 161, ..name }.as_str(), None);
        let mut bad = name;
        bad.name[0] = 0xff;
        assert_eq!(bad.as_str(), None);
    }

    #[test]
    fn node_config_is_snat_address_in_network_order_then_host_order_layout_version_and_netns_cookie() {
        let config = NodeConfig {
            snat_addr: be_addr(192, 168, 1, 10),
            layout_version: 0x0102_0304,
            host_netns_cookie: 0x0a0b,
        };
        assert_eq!(
            bytes(&config),
            ne(&[&[192, 168, 1, 10], &0x0102_0304u32.to_ne_bytes(), &0x0a0bu64.to_ne_bytes()])
        );
        // Where every later agent looks for the version the pinned maps have.
        assert_eq!(offset_of!(NodeConfig, layout_version), 4);
        assert_eq!(bytes(&NodeConfig::default()), [0; 16]);
        assert_eq!(size_of::<NodeConfig>(), 16);
    }

    #[test]
    fn every_map_has_a_layout_version_and_the_latest_change_is_the_current_version() {
        use crate::maps::{layout_changed, ALL, DESIRED_STATE, LAYOUT_CHANGED, LAYOUT_VERSION};
        let listed: Vec<&str> = LAYOUT_CHANGED.iter().map(|(name, _)| *name).collect();
        assert_eq!(listed, ALL);
        assert!(LAYOUT_CHANGED.iter().all(|(_, v)| (1..=LAYOUT_VERSION).contains(v)));
        // A bump names the map it changed.
        assert_eq!(LAYOUT_CHANGED.iter().map(|(_, v)| *v).max(), Some(LAYOUT_VERSION));
        assert_eq!(layout_changed("XLB_UNKNOWN"), LAYOUT_VERSION);
        assert!(DESIRED_STATE.iter().all(|name| ALL.contains(name)));
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn ct_timeout_depends_on_tcp_state_and_ignores_flags_for_tcp() {
        for flags in [0, CT_F_REPLIED] {
            assert_eq!(ct_timeout_ns(TCP, CT_STATE_OTHER, flags), 120 * SEC);
            assert_eq!(ct_timeout_ns(TCP, CT_STATE_SYN_SENT, flags), 120 * SEC);
            assert_eq!(ct_timeout_ns(TCP, CT_STATE_ESTABLISHED, flags), 86_400 * SEC);
            assert_eq!(ct_timeout_ns(TCP, CT_STATE_FIN, flags), 120 * SEC);
            assert_eq!(ct_timeout_ns(TCP, CT_STATE_CLOSED, flags), 10 * SEC);
        }
    }

    #[test]
    fn ct_timeout_of_other_protocols_is_udp_30_s_and_120_s_once_the_backend_replied() {
        for proto in [UDP, ICMP] {
            assert_eq!(ct_timeout_ns(proto, CT_STATE_OTHER, 0), 30 * SEC);
            assert_eq!(ct_timeout_ns(proto, CT_STATE_ESTABLISHED, 0), 30 * SEC);
            assert_eq!(ct_timeout_ns(proto, CT_STATE_OTHER, CT_F_REPLIED), 120 * SEC);
        }
    }

    #[test]
    fn ct_entry_is_fresh_up_to_its_timeout_after_the_last_packet() {
        let entry = |state, flags| CtEntry {
            frontend_addr: 0,
            frontend_port: 0,
            snat_port: 0,
            snat_addr: 0,
            state,
            flags,
            stats_index: 0,
            created_ns: 0,
            last_seen_ns: 1_000 * SEC,
        };
        let udp = entry(CT_STATE_OTHER, 0);
        assert!(udp.fresh(UDP, 1_030 * SEC));
        assert!(!udp.fresh(UDP, 1_030 * SEC + 1));
        assert!(entry(CT_STATE_OTHER, CT_F_REPLIED).fresh(UDP, 1_120 * SEC));
        assert!(!entry(CT_STATE_CLOSED, 0).fresh(TCP, 1_010 * SEC + 1));
        // A clock reading before the last packet (entries written on another CPU) is fresh.
        assert!(udp.fresh(UDP, 0));
    }
}
