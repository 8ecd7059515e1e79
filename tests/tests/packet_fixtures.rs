//! Byte-exact fixtures for every packet path, run through BPF_PROG_TEST_RUN on the real
//! programs (no interface involved). Each test states what it proves, seeds the maps through
//! the agent's own path (manifest YAML → store → desired state → map writer), runs packets
//! and compares whole output frames with frames whose checksums were computed from scratch.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{CtKey, CT_STATE_CLOSED, CT_STATE_ESTABLISHED},
    proto,
};
use lb_userspace::dataplane::Hook;
use xlb_tests::{
    frame::{
        self, next_hop_mtu, offset,
        QuotedChecksum::{AsSent, OffloadFixedPoint},
        ACK, NOP_OPTIONS, RST, SYN, WHOLE,
    },
    harness::*,
};

/// Binds every SNAT port towards `POD_B` to another client; with `live` a state, each of
/// those connections also has a fresh conntrack entry in that state using its binding.
fn bind_every_snat_port(h: &mut Harness, live: Option<u8>) {
    let now = monotonic_ns();
    for (i, port) in (SNAT_PORT_MIN..=SNAT_PORT_MAX).enumerate() {
        let connection = Connection {
            proto: proto::TCP,
            client: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 200), 1024 + i as u16),
            frontend: NP_REMOTE,
            backend: POD_B,
            snat: Some(SocketAddrV4::new(NODE_A, port)),
            state: live.unwrap_or_default(),
            stats_index: 0,
        };
        h.insert_snat_binding(&connection);
        if live.is_some() {
            h.insert_conntrack(&connection, now);
        }
    }
}

/// Opens a TCP connection `client → frontend` at `hook`: checks that the whole SYN came out
/// DNATed to the backend its conntrack entry names, nothing else changed, and returns that
/// backend.
fn open(h: &Harness, hook: Hook, client: SocketAddrV4, frontend: SocketAddrV4) -> SocketAddrV4 {
    let what = format!("SYN {client} → {frontend} at {hook:?}");
    let (verdict, out) = h.run(hook, &frame::tcp(client, frontend, SYN));
    assert_eq!(verdict, pass_verdict(hook), "{what}: verdict");
    let backend = h.backend_of(client, frontend, proto::TCP);
    assert_frame(&what, (verdict, out), pass_verdict(hook), &frame::tcp(client, backend, SYN));
    backend
}

/// `addr` with another port: a new connection from the same client address.
fn port(addr: SocketAddrV4, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(*addr.ip(), port)
}

/// Asserts verdict and whole frame, with the first differing byte in the message.
fn assert_frame(what: &str, (verdict, out): (u32, Vec<u8>), want_verdict: u32, want: &[u8]) {
    assert_eq!(verdict, want_verdict, "{what}: verdict");
    let first_diff = out.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        out == want,
        "{what}: frame differs at byte {first_diff:?} (len {} vs {})\n got {out:02x?}\nwant {want:02x?}",
        out.len(),
        want.len()
    );
}

/// A new TCP connection to a NodePort whose endpoint is on this node is DNATed to the pod
/// at XDP, keeping the client's source; the next packet of the connection goes the same way.
#[test]
fn xdp_dnats_new_and_established_connections_to_a_local_backend() {
    let h = Harness::new();
    assert_frame(
        "SYN",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_A, SYN),
    );
    assert_frame(
        "ACK",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, ACK)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_A, ACK),
    );
}

/// The local endpoint's reply leaves through TC egress with the NodePort as its source.
#[test]
fn tc_egress_restores_the_frontend_on_replies_of_a_local_backend() {
    let h = Harness::new();
    h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN));
    assert_frame(
        "SYN-ACK",
        h.run(Hook::TcEgress, &frame::tcp(POD_A, CLIENT, SYN | ACK)),
        TC_ACT_OK,
        &frame::tcp(NP_LOCAL, CLIENT, SYN | ACK),
    );
}

/// A connection balanced to an endpoint on another node: XDP DNATs it (the kernel then
/// routes it), TC egress SNATs it to the node address and a port from the SNAT range; the
/// endpoint's reply to that port gets the client back as destination at XDP, and the
/// NodePort back as source at egress.
#[test]
fn remote_backend_round_trip_through_snat() {
    let h = Harness::new();
    assert_frame(
        "XDP SYN",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_REMOTE, SYN)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_B, SYN),
    );
    let snat = h.snat_source(CLIENT, POD_B);
    assert_eq!(*snat.ip(), NODE_A);
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat.port()), "SNAT port {}", snat.port());
    assert_frame(
        "egress SYN",
        h.run(Hook::TcEgress, &frame::tcp(CLIENT, POD_B, SYN)),
        TC_ACT_OK,
        &frame::tcp(snat, POD_B, SYN),
    );
    assert_frame(
        "XDP SYN-ACK",
        h.run(Hook::XdpIngress, &frame::tcp(POD_B, snat, SYN | ACK)),
        XDP_PASS,
        &frame::tcp(POD_B, CLIENT, SYN | ACK),
    );
    assert_frame(
        "egress SYN-ACK",
        h.run(Hook::TcEgress, &frame::tcp(POD_B, CLIENT, SYN | ACK)),
        TC_ACT_OK,
        &frame::tcp(NP_REMOTE, CLIENT, SYN | ACK),
    );
}

/// A pod reaching a ClusterIP is DNATed at its veth's TC ingress, keeping its own source.
#[test]
fn tc_ingress_dnats_pod_to_cluster_ip() {
    let h = Harness::new();
    assert_frame(
        "SYN",
        h.run(Hook::TcIngress, &frame::tcp(POD_A2, CIP_LOCAL, SYN)),
        TC_ACT_OK,
        &frame::tcp(POD_A2, POD_A, SYN),
    );
}

/// UDP is translated with its checksum updated at both hooks; a datagram without a
/// checksum (0) keeps none.
#[test]
fn udp_checksums_are_updated_or_left_absent() {
    let h = Harness::new();
    assert_frame(
        "XDP",
        h.run(Hook::XdpIngress, &frame::udp(POD_A2, CIP_LOCAL_DNS, true)),
        XDP_PASS,
        &frame::udp(POD_A2, POD_A_DNS, true),
    );
    let other = SocketAddrV4::new(*POD_A2.ip(), 45001);
    assert_frame(
        "TC",
        h.run(Hook::TcIngress, &frame::udp(other, CIP_LOCAL_DNS, true)),
        TC_ACT_OK,
        &frame::udp(other, POD_A_DNS, true),
    );
    let third = SocketAddrV4::new(*POD_A2.ip(), 45002);
    assert_frame(
        "XDP no checksum",
        h.run(Hook::XdpIngress, &frame::udp(third, CIP_LOCAL_DNS, false)),
        XDP_PASS,
        &frame::udp(third, POD_A_DNS, false),
    );
}

/// A Service without endpoints rejects new connections as kube-proxy does: the packet comes
/// back as an ICMP port unreachable from the frontend (XDP_TX at XDP, a redirect out of the
/// pod's interface at TC), for TCP and UDP.
#[test]
fn service_without_endpoints_rejects_with_port_unreachable() {
    let h = Harness::new();
    let input = frame::tcp(CLIENT, NP_EMPTY, SYN);
    assert_frame("XDP", h.run(Hook::XdpIngress, &input), XDP_TX, &frame::reject_of(&input, AsSent));
    let at_tc = frame::reject_of(&input, OffloadFixedPoint);
    assert_frame("TC external", h.run(Hook::TcExternal, &input), TC_ACT_REDIRECT, &at_tc);
    let from_pod = frame::tcp(POD_A2, NP_EMPTY, SYN);
    let want = frame::reject_of(&from_pod, OffloadFixedPoint);
    assert_frame("TC", h.run(Hook::TcIngress, &from_pod), TC_ACT_REDIRECT, &want);
    let udp = frame::udp(CLIENT, NP_EMPTY_UDP, true);
    assert_frame("XDP UDP", h.run(Hook::XdpIngress, &udp), XDP_TX, &frame::reject_of(&udp, AsSent));
    let want = frame::reject_of(&udp, OffloadFixedPoint);
    assert_frame("TC external UDP", h.run(Hook::TcExternal, &udp), TC_ACT_REDIRECT, &want);
    assert_eq!(h.entries(), 0, "no state for a rejected connection");
}

/// Fragments of a balanced UDP datagram (a DNS answer over the MTU, say) are translated alike,
/// at XDP from a client and at TC from a pod: the first fragment, which holds the UDP header,
/// is balanced and DNATed like a whole datagram and leaves its ports behind; a later one,
/// which holds none, gets the same destination with its payload untouched; the backend's
/// reply fragments get the frontend back at egress. A later fragment whose first fragment was
/// never seen passes unchanged and writes nothing.
#[test]
fn fragments_of_a_balanced_datagram_are_translated_alike() {
    let h = Harness::new();
    let pod_client = SocketAddrV4::new(*POD_A2.ip(), 45053);
    for (hook, client) in [(Hook::XdpIngress, port(CLIENT, 40053)), (Hook::TcIngress, pod_client)] {
        let pass = pass_verdict(hook);
        let (first, later) = frame::fragments(&frame::udp(client, CIP_LOCAL_DNS, true), 16);
        let before = h.entries();
        assert_frame(&format!("{hook:?} later fragment, first unseen"), h.run(hook, &later), pass, &later);
        assert_eq!(h.entries(), before, "an unknown later fragment writes nothing");
        let (want_first, want_later) = frame::fragments(&frame::udp(client, POD_A_DNS, true), 16);
        assert_frame(&format!("{hook:?} first fragment"), h.run(hook, &first), pass, &want_first);
        assert_frame(&format!("{hook:?} later fragment"), h.run(hook, &later), pass, &want_later);
        let (reply_first, reply_later) = frame::fragments(&frame::udp(POD_A_DNS, client, true), 16);
        let (want_first, want_later) = frame::fragments(&frame::udp(CIP_LOCAL_DNS, client, true), 16);
        assert_frame(
            &format!("{hook:?} reply, first"),
            h.run(Hook::TcEgress, &reply_first),
            TC_ACT_OK,
            &want_first,
        );
        assert_frame(
            &format!("{hook:?} reply, later"),
            h.run(Hook::TcEgress, &reply_later),
            TC_ACT_OK,
            &want_later,
        );
    }
}

/// Traffic that is not addressed to a frontend, and replies nobody tracked, pass unchanged.
#[test]
fn unrelated_traffic_passes_untouched() {
    let h = Harness::new();
    let to_node = frame::tcp(CLIENT, SocketAddrV4::new(NODE_A, 22), SYN);
    assert_frame("XDP", h.run(Hook::XdpIngress, &to_node), XDP_PASS, &to_node);
    let stray_reply = frame::tcp(POD_A, CLIENT, SYN | ACK);
    assert_frame("egress", h.run(Hook::TcEgress, &stray_reply), TC_ACT_OK, &stray_reply);
    assert_eq!(h.entries(), 0);
}

/// Hostile and odd frames to a frontend pass unchanged and leave no state: non-IPv4,
/// IPv4 header length below 20, truncated TCP, total length shorter than the headers, a
/// later fragment whose first fragment was never seen (no ports to balance on), VLAN-tagged
/// frames (the tag is not looked behind) and ICMP echo requests (no ports).
#[test]
fn hostile_frames_pass_unchanged_and_write_nothing() {
    let h = Harness::new();
    let valid = frame::tcp(CLIENT, NP_LOCAL, SYN);
    // (description, frame, whether TC can run it: BPF_PROG_TEST_RUN refuses skbs whose
    // IPv4 header is shorter than 20 bytes, so those are XDP-only, where the wire delivers them)
    let mut cases: Vec<(&str, Vec<u8>, bool)> = Vec::new();
    let mut arp = valid.clone();
    arp[offset::ETHERTYPE..offset::ETHERTYPE + 2].copy_from_slice(&0x0806u16.to_be_bytes());
    cases.push(("ARP ethertype", arp, true));
    cases.push(("Ethernet header only", valid[..14].to_vec(), false));
    cases.push(("IPv4 header cut short", valid[..14 + 12].to_vec(), false));
    let mut short_ihl = valid.clone();
    short_ihl[offset::IP_VER_IHL] = 0x44;
    cases.push(("IHL 4", short_ihl, true));
    let mut ipv6_version = valid.clone();
    ipv6_version[offset::IP_VER_IHL] = 0x65;
    cases.push(("version 6 in an IPv4 ethertype", ipv6_version, true));
    cases.push(("TCP header cut short", valid[..offset::L4 + 10].to_vec(), true));
    cases.push(("TCP header cut before its checksum", valid[..offset::L4 + 16].to_vec(), true));
    let mut short_total = valid.clone();
    short_total[offset::IP_TOTAL_LEN..offset::IP_TOTAL_LEN + 2].copy_from_slice(&24u16.to_be_bytes());
    cases.push(("total length below the headers", short_total, true));
    let mut later_fragment = valid.clone();
    later_fragment[offset::IP_FLAGS_FRAG + 1] = 0x10; // offset 16*8
    cases.push(("later fragment", later_fragment, true));
    cases.push(("VLAN-tagged", frame::vlan_tagged(&valid, 100), true));
    cases.push((
        "ICMP echo request to a ClusterIP",
        frame::icmp_echo_request(*CLIENT.ip(), *CIP_LOCAL.ip()),
        true,
    ));
    cases.push(("ICMP echo request to a node address", frame::icmp_echo_request(*CLIENT.ip(), NODE_A), true));
    for (what, input, tc_too) in &cases {
        assert_frame(&format!("{what} at XDP"), h.run(Hook::XdpIngress, input), XDP_PASS, input);
        if *tc_too {
            for hook in [Hook::TcIngress, Hook::TcEgress] {
                assert_frame(&format!("{what} at {hook:?}"), h.run(hook, input), TC_ACT_OK, input);
            }
        }
    }
    assert_eq!(h.entries(), 0, "hostile frames must not create conntrack or NAT entries");
}

/// Packets the kernel drops as malformed are not the balancer's: an IPv4 total length beyond
/// the bytes that arrived (ip_rcv drops the packet), a TCP data offset below 5 or past the
/// packet's end (netfilter calls it INVALID, the receiver drops it). Found by the fuzz test:
/// such a SYN to a frontend opened a connection (a SNAT port, a reject for a Service without
/// endpoints), such an RST closed a tracked one whose packets still flow, and the counters
/// added the length claimed. Each passes every hook unchanged: one byte short of its total
/// length (a new connection, the tracked connection's RST, the backend's reply to its SNAT
/// port and at egress, UDP, an ICMP error about it), or with TCP data offset 4, 15 or 0;
/// the tracked connection, the maps and the counters stay as they were.
#[test]
fn packets_with_lengths_the_kernel_drops_pass_unchanged_and_write_nothing() {
    let h = Harness::new();
    assert_eq!(open(&h, Hook::XdpIngress, CLIENT, NP_REMOTE), POD_B);
    let snat = h.snat_source(CLIENT, POD_B);
    let (tracked, entries, counters) =
        (h.connection(CLIENT, POD_B, proto::TCP), h.entries(), h.writer.traffic().unwrap());
    let newcomer = port(CLIENT, 40100);
    let cut = |frame: Vec<u8>| frame[..frame.len() - 1].to_vec();
    let data_offset = |words: u8, frame: Vec<u8>| {
        let mut frame = frame;
        frame[offset::L4 + 12] = words << 4;
        frame
    };
    let frag_needed = frame::icmp_error(
        NODE_B,
        NODE_A,
        frame::ICMP_DEST_UNREACH,
        frame::ICMP_FRAG_NEEDED,
        next_hop_mtu(1000),
        frame::quote(&frame::tcp(snat, POD_B, ACK), 8),
    );
    let cases = [
        ("SYN to a frontend, cut", cut(frame::tcp(newcomer, NP_REMOTE, SYN))),
        ("SYN to a Service without endpoints, cut", cut(frame::tcp(newcomer, NP_EMPTY, SYN))),
        ("RST of the tracked connection, cut", cut(frame::tcp(CLIENT, NP_REMOTE, RST))),
        ("reply to the SNAT port, cut", cut(frame::tcp(POD_B, snat, ACK))),
        ("reply to the client, cut", cut(frame::tcp(POD_B, CLIENT, ACK))),
        ("UDP to a frontend, cut", cut(frame::udp(newcomer, CIP_LOCAL_DNS, true))),
        ("ICMP error about the tracked connection, cut", cut(frag_needed)),
        ("SYN to a frontend, data offset 4", data_offset(4, frame::tcp(newcomer, NP_REMOTE, SYN))),
        ("SYN to a frontend, data offset 15", data_offset(15, frame::tcp(newcomer, NP_REMOTE, SYN))),
        ("RST of the tracked connection, data offset 0", data_offset(0, frame::tcp(CLIENT, NP_REMOTE, RST))),
    ];
    for (what, input) in &cases {
        for hook in [Hook::XdpIngress, Hook::TcIngress, Hook::TcEgress] {
            assert_frame(&format!("{what} at {hook:?}"), h.run(hook, input), pass_verdict(hook), input);
        }
    }
    assert_eq!(h.connection(CLIENT, POD_B, proto::TCP), tracked, "the tracked connection is untouched");
    assert_eq!(
        (h.entries(), h.writer.traffic().unwrap()),
        (entries, counters),
        "nothing created, nothing counted"
    );
}

/// Every packet of a balanced connection, both directions, adds to its Service port's
/// per-CPU counters (packets, IP bytes); other Service ports and garbage add nothing.
#[test]
fn service_counters_add_every_packet_of_both_directions() {
    let h = Harness::new();
    let packets = [
        (Hook::XdpIngress, frame::tcp(CLIENT, NP_LOCAL, SYN)),
        (Hook::TcEgress, frame::tcp(POD_A, CLIENT, SYN | ACK)),
        (Hook::XdpIngress, frame::tcp(CLIENT, NP_LOCAL, ACK)),
        (Hook::XdpIngress, frame::vlan_tagged(&frame::tcp(CLIENT, NP_LOCAL, ACK), 100)),
    ];
    for (hook, input) in &packets {
        h.run(*hook, input);
    }
    let traffic = h.writer.traffic().expect("counters");
    let counted: Vec<(&str, u64, u64)> = traffic
        .iter()
        .filter(|t| t.packets > 0)
        .map(|t| (t.service_port.as_str(), t.packets, t.bytes))
        .collect();
    // The VLAN-tagged frame is not ours; bytes are the IP packets' (frame minus Ethernet).
    let ip_bytes: u64 = packets[..3].iter().map(|(_, f)| f.len() as u64 - 14).sum();
    assert_eq!(counted, [("default/local:http/TCP", 3, ip_bytes)]);
    assert!(traffic.len() > 1, "every Service port has a counter slot: {traffic:?}");
}

/// A SNAT port held by a connection that is over (no live conntrack entry) is taken over by a
/// new connection: closed connections do not exhaust the SNAT range.
#[test]
fn snat_ports_of_finished_connections_are_reused() {
    let mut h = Harness::new();
    bind_every_snat_port(&mut h, None);
    assert_snat_port_taken_over(&h);
}

/// A SNAT port held by a connection that was reset is free at once, though the reset
/// connection's entry stays until its closed timeout: short connections ended by RST do not
/// exhaust the SNAT range.
#[test]
fn snat_ports_of_reset_connections_are_reused() {
    let mut h = Harness::new();
    bind_every_snat_port(&mut h, Some(CT_STATE_CLOSED));
    assert_snat_port_taken_over(&h);
}

/// A new connection through `NP_REMOTE` gets a SNAT port although every port was bound.
fn assert_snat_port_taken_over(h: &Harness) {
    assert_frame(
        "SYN",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_REMOTE, SYN)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_B, SYN),
    );
    let snat = h.snat_source(CLIENT, POD_B);
    let reply = CtKey::new(*POD_B.ip(), POD_B.port(), NODE_A, snat.port(), proto::TCP);
    let bound = h.nat.get(&reply, 0).expect("SNAT binding");
    assert_eq!(bound.addr, be(CLIENT).0, "the taken-over port now leads back to the new client");
}

/// When every SNAT port is held by a live connection, a new connection needing SNAT is
/// dropped rather than sent with a source its reply could not find.
#[test]
fn new_connection_is_dropped_when_every_snat_port_is_live() {
    let mut h = Harness::new();
    bind_every_snat_port(&mut h, Some(CT_STATE_ESTABLISHED));
    let input = frame::tcp(CLIENT, NP_REMOTE, SYN);
    assert_frame("SYN", h.run(Hook::XdpIngress, &input), XDP_DROP, &input);
}

/// Both directions of a connection meet one conntrack entry, keyed by the client → backend
/// tuple: the client's SYN creates it, the backend's SYN-ACK (at egress) marks it replied and
/// the client's ACK makes it established.
#[test]
fn both_directions_meet_one_conntrack_entry() {
    let h = Harness::new();
    h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN));
    let created = h.connection(CLIENT, POD_A, proto::TCP);
    h.run(Hook::TcEgress, &frame::tcp(POD_A, CLIENT, SYN | ACK));
    h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, ACK));
    let after = h.connection(CLIENT, POD_A, proto::TCP);
    assert_eq!(h.conntrack.keys().count(), 1, "one entry per connection");
    assert_eq!(after.created_ns, created.created_ns, "the same entry");
    assert_eq!(after.state, CT_STATE_ESTABLISHED);
    assert_ne!(after.flags & lb_common::conntrack::CT_F_REPLIED, 0, "the reply was seen on it");
    assert_eq!((after.frontend_addr, after.frontend_port), be(NP_LOCAL));
}

/// An entry past its idle timeout counts as absent: the next SYN on the same tuple opens a
/// new connection (a new entry), not a continuation of the old one.
#[test]
fn an_expired_connection_is_balanced_anew() {
    let mut h = Harness::new();
    h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN));
    let key = CtKey::new(*CLIENT.ip(), CLIENT.port(), *POD_A.ip(), POD_A.port(), proto::TCP);
    let mut entry = h.connection(CLIENT, POD_A, proto::TCP);
    entry.last_seen_ns = 1; // idle for as long as the machine is up
    h.conntrack.insert(key, entry, 0).unwrap();
    let stray_reply = frame::tcp(POD_A, CLIENT, ACK);
    assert_frame(
        "reply of the expired connection",
        h.run(Hook::TcEgress, &stray_reply),
        TC_ACT_OK,
        &stray_reply,
    );
    assert_frame(
        "SYN",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_A, SYN),
    );
    assert!(h.connection(CLIENT, POD_A, proto::TCP).created_ns > 1, "a new entry");
}

/// externalTrafficPolicy: Local keeps clients from outside the node on this node's endpoints,
/// unSNATed so the pod sees the client's address: 20 new connections at XDP all reach the
/// local pod, none with a SNAT source. The node's own pods reaching the same NodePort get
/// Cluster policy (as with kube-proxy): over 40 connections at TC ingress both endpoints
/// appear. Each choice is uniform over the two, so one of them never appearing has
/// probability 2 × 2^-40 ≈ 1.8e-12.
#[test]
fn external_traffic_policy_local_keeps_outside_clients_on_local_endpoints() {
    let h = Harness::with(POLICIES);
    for i in 0..20 {
        let client = port(CLIENT, CLIENT.port() + i);
        assert_eq!(open(&h, Hook::XdpIngress, client, NP_ETP_LOCAL), POD_A, "from outside: the local pod");
        let entry = h.connection(client, POD_A, proto::TCP);
        assert_eq!((entry.snat_addr, entry.snat_port), (0, 0), "not SNATed: the pod sees the client");
    }
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let pod = port(POD_A2, POD_A2.port() + i);
        let backend = open(&h, Hook::TcIngress, pod, NP_ETP_LOCAL);
        assert!([POD_A, POD_B].contains(&backend), "{backend} is no endpoint");
        seen.insert(backend);
    }
    assert_eq!(seen, BTreeSet::from([POD_A, POD_B]), "pods get every endpoint (Cluster policy)");
}

/// externalTrafficPolicy: Local without an endpoint on this node drops new connections from
/// outside (XDP_DROP, frame unchanged, no state). The Service has an endpoint elsewhere, so
/// this is a drop, not a reject. A pod reaching the same NodePort still gets that endpoint.
#[test]
fn external_traffic_policy_local_without_a_local_endpoint_drops() {
    let h = Harness::with(POLICIES);
    let input = frame::tcp(CLIENT, NP_ETP_AWAY, SYN);
    assert_frame("from outside", h.run(Hook::XdpIngress, &input), XDP_DROP, &input);
    assert_eq!(h.entries(), 0, "no state for a dropped connection");
    assert_eq!(open(&h, Hook::TcIngress, POD_A2, NP_ETP_AWAY), POD_B, "from a pod: Cluster policy");
}

/// internalTrafficPolicy: Local keeps pods reaching the ClusterIP on this node's endpoint: 20
/// connections all reach it (were the policy ignored, that would happen with probability
/// 2^-20 ≈ 9.5e-7). Without a local endpoint the pod's packet is dropped (TC_ACT_SHOT, no
/// state).
#[test]
fn internal_traffic_policy_local_keeps_pods_on_local_endpoints() {
    let h = Harness::with(POLICIES);
    for i in 0..20 {
        let pod = port(POD_A2, POD_A2.port() + i);
        assert_eq!(open(&h, Hook::TcIngress, pod, CIP_ITP_LOCAL), POD_A, "the local endpoint only");
    }
    let before = h.entries();
    let input = frame::tcp(POD_A2, CIP_ITP_AWAY, SYN);
    assert_frame("no local endpoint", h.run(Hook::TcIngress, &input), TC_ACT_SHOT, &input);
    assert_eq!(h.entries(), before, "no state for a dropped connection");
}

/// sessionAffinity: ClientIP (timeout 10 s) on a Service with three endpoints:
/// - after its first connection, 19 more from the same client address (other ports) go to the
///   same backend;
/// - other client addresses are balanced on their own: each sticks to its own backend, and
///   over 20 of them more than one backend appears (all alike: probability 3^-19 ≈ 8.6e-10);
/// - once the client's entry is expired (last used at boot), its next connection is balanced
///   anew and the entry is refreshed with the backend just given. Over 20 expiries more than
///   one backend appears (were the stale entry reused, one would: probability 3^-19).
#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend_until_it_expires() {
    let mut h = Harness::with(POLICIES);
    let first = open(&h, Hook::XdpIngress, CLIENT, NP_STICKY);
    assert!(STICKY_PODS.contains(&first), "{first} is no endpoint");
    for i in 1..20 {
        let client = port(CLIENT, CLIENT.port() + i);
        assert_eq!(open(&h, Hook::XdpIngress, client, NP_STICKY), first, "same client address, same backend");
    }
    let (_, entry) = h.affinity_of(*CLIENT.ip());
    assert_eq!(entry.backend_addr, be(first).0);

    let mut others = BTreeSet::new();
    for host in 1..=20 {
        let other = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100 + host), 40000);
        let backend = open(&h, Hook::XdpIngress, other, NP_STICKY);
        assert_eq!(open(&h, Hook::XdpIngress, port(other, 40001), NP_STICKY), backend, "{other} sticks");
        assert_eq!(h.affinity_of(*other.ip()).1.backend_addr, be(backend).0);
        others.insert(backend);
    }
    assert!(others.len() > 1, "other clients are balanced on their own, got only {others:?}");

    assert!(
        monotonic_ns() > 2 * STICKY_TIMEOUT_S * 1_000_000_000,
        "an entry last used at boot must be past the affinity timeout"
    );
    let mut rebalanced = BTreeSet::new();
    for i in 0..20 {
        let (key, mut entry) = h.affinity_of(*CLIENT.ip());
        entry.last_used_ns = 1;
        h.affinity.insert(key, entry, 0).unwrap();
        let backend = open(&h, Hook::XdpIngress, port(CLIENT, 41000 + i), NP_STICKY);
        let (_, refreshed) = h.affinity_of(*CLIENT.ip());
        assert!(refreshed.last_used_ns > 1, "the expired entry is refreshed");
        assert_eq!(refreshed.backend_addr, be(backend).0, "and names the backend just given");
        rebalanced.insert(backend);
    }
    assert!(rebalanced.len() > 1, "expired entries are balanced anew, got only {rebalanced:?}");
}

/// loadBalancerSourceRanges [198.18.0.0/24] on a LoadBalancer IP: a client inside is DNATed
/// on the LB IP; a client outside is dropped there (frame unchanged, no state) but reaches
/// the Service's NodePort, which the ranges do not cover; a pod outside the ranges (TC
/// ingress) is dropped on the LB IP as well, as kube-proxy filters every source.
#[test]
fn load_balancer_source_ranges_filter_outside_clients_on_the_lb_ip_only() {
    let h = Harness::with(POLICIES);
    assert_eq!(open(&h, Hook::XdpIngress, CLIENT, LB_RANGES), POD_A, "198.18.0.100 is in range");
    let outside = frame::tcp(OUTSIDER, LB_RANGES, SYN);
    let before = h.entries();
    assert_frame("outside the ranges", h.run(Hook::XdpIngress, &outside), XDP_DROP, &outside);
    assert_eq!(h.entries(), before, "no state for a dropped connection");
    assert_eq!(open(&h, Hook::XdpIngress, OUTSIDER, NP_RANGES), POD_A, "the NodePort has no ranges");
    // Pods too, as kube-proxy filters every source (the fix: pods used to pass).
    let from_pod = frame::tcp(POD_A2, LB_RANGES, SYN);
    let before = h.entries();
    assert_frame("a pod outside the ranges", h.run(Hook::TcIngress, &from_pod), TC_ACT_SHOT, &from_pod);
    assert_eq!(h.entries(), before, "no state for a dropped pod connection");
}

/// A Service's externalIPs are frontends for clients from outside: DNATed at XDP.
#[test]
fn external_ips_are_dnated() {
    let h = Harness::with(POLICIES);
    assert_frame(
        "SYN",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, EXTERNAL_IP, SYN)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_A, SYN),
    );
}

/// Hairpin: a pod reaching its own Service whose only endpoint is itself. TC ingress DNATs
/// its packet back to itself; TC egress (towards the pod) SNATs the source to the node
/// address and a SNAT port, or the pod would answer itself directly; the pod's reply to that
/// port gets the pod's own address and port back as destination at TC ingress, and the
/// ClusterIP back as source at TC egress. The client's next packet takes the same way.
#[test]
fn hairpin_pod_reaches_itself_through_its_service() {
    let h = Harness::new();
    let client = port(POD_A, 46000);
    assert_frame(
        "ingress SYN",
        h.run(Hook::TcIngress, &frame::tcp(client, CIP_LOCAL, SYN)),
        TC_ACT_OK,
        &frame::tcp(client, POD_A, SYN),
    );
    let snat = h.snat_source(client, POD_A);
    assert_eq!(*snat.ip(), NODE_A);
    assert!((SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat.port()), "SNAT port {}", snat.port());
    assert_frame(
        "egress SYN",
        h.run(Hook::TcEgress, &frame::tcp(client, POD_A, SYN)),
        TC_ACT_OK,
        &frame::tcp(snat, POD_A, SYN),
    );
    assert_frame(
        "ingress SYN-ACK",
        h.run(Hook::TcIngress, &frame::tcp(POD_A, snat, SYN | ACK)),
        TC_ACT_OK,
        &frame::tcp(POD_A, client, SYN | ACK),
    );
    assert_frame(
        "egress SYN-ACK",
        h.run(Hook::TcEgress, &frame::tcp(POD_A, client, SYN | ACK)),
        TC_ACT_OK,
        &frame::tcp(CIP_LOCAL, client, SYN | ACK),
    );
    assert_frame(
        "ingress ACK",
        h.run(Hook::TcIngress, &frame::tcp(client, CIP_LOCAL, ACK)),
        TC_ACT_OK,
        &frame::tcp(client, POD_A, ACK),
    );
    assert_frame(
        "egress ACK",
        h.run(Hook::TcEgress, &frame::tcp(client, POD_A, ACK)),
        TC_ACT_OK,
        &frame::tcp(snat, POD_A, ACK),
    );
}

/// A backend's port unreachable about a UDP datagram of a balanced flow, quoting the whole
/// datagram (UDP checksum included), leaves TC egress as the client's socket expects it: from
/// the frontend, quoting client → frontend, with the quoted UDP and IPv4 checksums, the ICMP
/// checksum and the outer IPv4 checksum all right.
#[test]
fn icmp_error_from_a_backend_quotes_the_frontend_at_egress() {
    let h = Harness::new();
    assert_frame(
        "datagram",
        h.run(Hook::TcIngress, &frame::udp(POD_A2, CIP_LOCAL_DNS, true)),
        TC_ACT_OK,
        &frame::udp(POD_A2, POD_A_DNS, true),
    );
    let about = frame::udp(POD_A2, POD_A_DNS, true);
    let error = frame::icmp_error(
        *POD_A_DNS.ip(),
        *POD_A2.ip(),
        frame::ICMP_DEST_UNREACH,
        frame::ICMP_PORT_UNREACH,
        [0; 4],
        frame::quote(&about, WHOLE),
    );
    let as_sent = frame::udp(POD_A2, CIP_LOCAL_DNS, true);
    let want = frame::icmp_error(
        *CIP_LOCAL_DNS.ip(),
        *POD_A2.ip(),
        frame::ICMP_DEST_UNREACH,
        frame::ICMP_PORT_UNREACH,
        [0; 4],
        frame::quote(&as_sent, WHOLE),
    );
    assert_frame("port unreachable", h.run(Hook::TcEgress, &error), TC_ACT_OK, &want);
}

/// A router's "fragmentation needed" (MTU 1000) about a pod's TCP segment to a remote backend
/// (not SNATed) quotes the frontend when it leaves TC egress towards the pod, so path MTU
/// discovery works through the balancer; the outer source stays the router. Both with the
/// minimal quote (IPv4 header + 8 bytes: no TCP checksum) and with the whole segment quoted
/// (the quoted TCP checksum is updated too).
#[test]
fn fragmentation_needed_from_a_router_quotes_the_frontend_at_egress() {
    let h = Harness::new();
    open(&h, Hook::TcIngress, POD_A2, CIP_REMOTE);
    let about = frame::tcp(POD_A2, POD_B, ACK);
    let as_sent = frame::tcp(POD_A2, CIP_REMOTE, ACK);
    for (what, quoted) in [("8-byte quote", 8), ("whole quote", WHOLE)] {
        let frag_needed = |about: &[u8]| {
            frame::icmp_error(
                ROUTER,
                *POD_A2.ip(),
                frame::ICMP_DEST_UNREACH,
                frame::ICMP_FRAG_NEEDED,
                next_hop_mtu(1000),
                frame::quote(about, quoted),
            )
        };
        assert_frame(what, h.run(Hook::TcEgress, &frag_needed(&about)), TC_ACT_OK, &frag_needed(&as_sent));
    }
}

/// A "fragmentation needed" from the remote backend's node about a SNATed segment (quoting
/// node → backend from the SNAT port) goes back to the client: at XDP the outer destination
/// and the quoted source become the client's, at TC egress the quoted destination becomes
/// the NodePort the client addressed (the outer source, node-b, stays).
#[test]
fn fragmentation_needed_about_a_snated_connection_goes_back_to_the_client() {
    let h = Harness::new();
    assert_eq!(open(&h, Hook::XdpIngress, CLIENT, NP_REMOTE), POD_B);
    let snat = h.snat_source(CLIENT, POD_B);
    assert_frame(
        "egress SYN",
        h.run(Hook::TcEgress, &frame::tcp(CLIENT, POD_B, SYN)),
        TC_ACT_OK,
        &frame::tcp(snat, POD_B, SYN),
    );
    let frag_needed = |to: Ipv4Addr, about: &[u8]| {
        frame::icmp_error(
            NODE_B,
            to,
            frame::ICMP_DEST_UNREACH,
            frame::ICMP_FRAG_NEEDED,
            next_hop_mtu(1000),
            frame::quote(about, 8),
        )
    };
    let from_node_b = frag_needed(NODE_A, &frame::tcp(snat, POD_B, SYN));
    let to_client = frag_needed(*CLIENT.ip(), &frame::tcp(CLIENT, POD_B, SYN));
    assert_frame("XDP", h.run(Hook::XdpIngress, &from_node_b), XDP_PASS, &to_client);
    let as_sent = frag_needed(*CLIENT.ip(), &frame::tcp(CLIENT, NP_REMOTE, SYN));
    assert_frame("egress", h.run(Hook::TcEgress, &to_client), TC_ACT_OK, &as_sent);
}

/// ICMP errors about flows nobody tracked pass every hook unchanged and create nothing: one
/// to a client about its own connection, and one to the node quoting a port of the SNAT range
/// that no connection holds.
#[test]
fn icmp_errors_about_untracked_flows_pass_unchanged() {
    let h = Harness::new();
    let frag_needed = |to: Ipv4Addr, about: &[u8]| {
        frame::icmp_error(
            ROUTER,
            to,
            frame::ICMP_DEST_UNREACH,
            frame::ICMP_FRAG_NEEDED,
            next_hop_mtu(1000),
            frame::quote(about, 8),
        )
    };
    let elsewhere = SocketAddrV4::new(Ipv4Addr::new(198, 18, 3, 3), 80);
    let unbound = SocketAddrV4::new(NODE_A, SNAT_PORT_MIN);
    let cases = [
        ("about a client's flow", frag_needed(*CLIENT.ip(), &frame::tcp(CLIENT, elsewhere, ACK))),
        ("about an unbound SNAT port", frag_needed(NODE_A, &frame::tcp(unbound, POD_B, ACK))),
    ];
    for (what, error) in &cases {
        for hook in [Hook::XdpIngress, Hook::TcIngress, Hook::TcEgress] {
            assert_frame(&format!("{what} at {hook:?}"), h.run(hook, error), pass_verdict(hook), error);
        }
    }
    assert_eq!(h.entries(), 0);
}

/// ICMP errors about tracked connections whose quote ends inside the quoted IPv4 header, or
/// before the quoted ports are complete, pass every hook unchanged: nothing is read past the
/// quote.
#[test]
fn icmp_errors_cut_inside_the_quote_pass_unchanged() {
    let h = Harness::new();
    assert_eq!(open(&h, Hook::XdpIngress, CLIENT, NP_REMOTE), POD_B);
    let snat = h.snat_source(CLIENT, POD_B);
    open(&h, Hook::TcIngress, POD_A2, CIP_REMOTE);
    let cut = |from: Ipv4Addr, to: Ipv4Addr, about: &[u8], len: usize| {
        frame::icmp_error(
            from,
            to,
            frame::ICMP_DEST_UNREACH,
            frame::ICMP_FRAG_NEEDED,
            next_hop_mtu(1000),
            &frame::quote(about, 8)[..len],
        )
    };
    let snated = frame::tcp(snat, POD_B, SYN);
    let from_pod = frame::tcp(POD_A2, POD_B, ACK);
    let cases = [
        ("SNATed, cut in the IPv4 header", cut(NODE_B, NODE_A, &snated, 10)),
        ("SNATed, cut in the ports", cut(NODE_B, NODE_A, &snated, 20 + 3)),
        ("SNATed, cut before the ports' end", cut(NODE_B, NODE_A, &snated, 20 + 7)),
        ("from a pod, cut in the IPv4 header", cut(ROUTER, *POD_A2.ip(), &from_pod, 19)),
        ("from a pod, cut in the ports", cut(ROUTER, *POD_A2.ip(), &from_pod, 20 + 2)),
    ];
    let before = h.entries();
    for (what, error) in &cases {
        for hook in [Hook::XdpIngress, Hook::TcIngress, Hook::TcEgress] {
            assert_frame(&format!("{what} at {hook:?}"), h.run(hook, error), pass_verdict(hook), error);
        }
    }
    assert_eq!(h.entries(), before, "nothing created");
}

/// A pod's UDP datagram to a ClusterIP without endpoints is rejected at TC ingress: the frame
/// becomes an ICMP port unreachable from the frontend, redirected out of the pod's interface.
#[test]
fn udp_to_a_service_without_endpoints_is_rejected_at_tc_ingress() {
    let h = Harness::new();
    let input = frame::udp(POD_A2, CIP_EMPTY_DNS, true);
    let want = frame::reject_of(&input, OffloadFixedPoint);
    assert_frame("UDP", h.run(Hook::TcIngress, &input), TC_ACT_REDIRECT, &want);
    assert_eq!(h.entries(), 0, "no state for a rejected connection");
}

/// IPv4 options (IHL 6, four NOPs) make a valid packet whose TCP header starts 4 bytes later:
/// it is translated correctly at every hook (ports and checksums found after the options),
/// not mangled or passed untranslated.
#[test]
fn ipv4_options_move_the_l4_header_and_are_translated() {
    let h = Harness::new();
    let with_options = |frame: Vec<u8>| frame::with_ip_options(&frame, &NOP_OPTIONS);
    assert_frame(
        "XDP",
        h.run(Hook::XdpIngress, &with_options(frame::tcp(CLIENT, NP_LOCAL, SYN))),
        XDP_PASS,
        &with_options(frame::tcp(CLIENT, POD_A, SYN)),
    );
    assert_frame(
        "egress reply",
        h.run(Hook::TcEgress, &with_options(frame::tcp(POD_A, CLIENT, SYN | ACK))),
        TC_ACT_OK,
        &with_options(frame::tcp(NP_LOCAL, CLIENT, SYN | ACK)),
    );
    assert_frame(
        "TC ingress",
        h.run(Hook::TcIngress, &with_options(frame::tcp(POD_A2, CIP_LOCAL, SYN))),
        TC_ACT_OK,
        &with_options(frame::tcp(POD_A2, POD_A, SYN)),
    );
    assert_frame(
        "TC ingress UDP",
        h.run(Hook::TcIngress, &with_options(frame::udp(POD_A2, CIP_LOCAL_DNS, true))),
        TC_ACT_OK,
        &with_options(frame::udp(POD_A2, POD_A_DNS, true)),
    );
}

/// A reject candidate (to a Service without endpoints) with IPv4 options cannot be answered
/// with the fixed 28-byte quote: it is dropped, frame unchanged, nothing created.
#[test]
fn reject_candidate_with_ipv4_options_is_dropped() {
    let h = Harness::new();
    let input = frame::with_ip_options(&frame::tcp(CLIENT, NP_EMPTY, SYN), &NOP_OPTIONS);
    assert_frame("XDP", h.run(Hook::XdpIngress, &input), XDP_DROP, &input);
    let from_pod = frame::with_ip_options(&frame::tcp(POD_A2, CIP_EMPTY, SYN), &NOP_OPTIONS);
    assert_frame("TC", h.run(Hook::TcIngress, &from_pod), TC_ACT_SHOT, &from_pod);
    assert_eq!(h.entries(), 0);
}
