//! Byte-exact fixtures for every packet path, run through BPF_PROG_TEST_RUN on the real
//! programs (no interface involved). Each test states what it proves, seeds the maps through
//! the agent's own path (manifest YAML → store → desired state → map writer), runs packets
//! and compares whole output frames with frames whose checksums were computed from scratch.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{CtBackend, CtEntry, CtKey, CT_STATE_ESTABLISHED},
    maps,
    nat::NatEntry,
    proto,
};
use lb_userspace::{
    dataplane::{Dataplane, Hook, MapSizes, MapWriter},
    desired::{self, NodeContext},
    manifests,
    model::Store,
};
use xlb_tests::frame::{self, offset, ACK, SYN};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 40000);
const POD_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 8080);
const POD_A_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 5353);
const POD_A2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 45000);
const POD_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 10), 8080);
/// NodePort of `local` (endpoint on this node), `remote` (on node-b) and `empty` (none).
const NP_LOCAL: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30080);
const NP_REMOTE: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30081);
const NP_EMPTY: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30082);
const NP_EMPTY_UDP: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30083);
const CIP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 80);
const CIP_LOCAL_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 53);

const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: local, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.1
  ports:
  - {name: http, port: 80, nodePort: 30080, targetPort: 8080, protocol: TCP}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: local-1, namespace: default, labels: {kubernetes.io/service-name: local}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [198.18.1.10], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: remote, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.2
  ports: [{name: http, port: 80, nodePort: 30081, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: remote-1, namespace: default, labels: {kubernetes.io/service-name: remote}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [198.18.2.10], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.3
  ports:
  - {name: http, port: 80, nodePort: 30082, targetPort: 8080}
  - {name: dns, port: 53, nodePort: 30083, targetPort: 5353, protocol: UDP}
"#;

/// The programs of node-a with private maps, seeded with `CLUSTER`.
struct Harness {
    dp: Dataplane,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_service: HashMap<MapData, CtKey, CtBackend>,
    nat: HashMap<MapData, CtKey, NatEntry>,
    _writer: MapWriter,
}

impl Harness {
    fn new() -> Self {
        // Room for every SNAT port of one backend, twice (see the SNAT exhaustion tests).
        let sizes = MapSizes { conntrack: 16_384, ..MapSizes::default() };
        let mut dp = Dataplane::load_unpinned(sizes).expect("load programs (needs root)");
        let mut writer = MapWriter::open(&mut dp).expect("maps");
        let mut store = Store::default();
        for object in manifests::parse_str(CLUSTER).expect("fixture YAML").objects {
            store.apply(&object, "fixture").expect("valid fixture");
        }
        let node = NodeContext { name: "node-a", addrs: &[NODE_A], default_snat_addr: Some(NODE_A) };
        let report = writer.sync(&desired::compute(&store, &node));
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let conntrack = dp.take_map(maps::CONNTRACK).unwrap().try_into().unwrap();
        let ct_service = dp.take_map(maps::CT_SERVICE).unwrap().try_into().unwrap();
        let nat = dp.take_map(maps::NAT).unwrap().try_into().unwrap();
        Self { dp, conntrack, ct_service, nat, _writer: writer }
    }

    /// Runs `hook`'s program on `input`: (verdict, output frame).
    fn run(&self, hook: Hook, input: &[u8]) -> (u32, Vec<u8>) {
        let program = self.dp.program(hook).expect("program");
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() };
        let result = match hook {
            Hook::XdpIngress => <&Xdp>::try_from(program).unwrap().test_run(opts),
            Hook::TcIngress | Hook::TcEgress => <&SchedClassifier>::try_from(program).unwrap().test_run(opts),
        }
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {hook:?} on a {}-byte frame: {e}", input.len()));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn entries(&self) -> usize {
        self.conntrack.keys().count() + self.ct_service.keys().count() + self.nat.keys().count()
    }

    /// The connection `client → backend` (after DNAT).
    fn connection(&self, client: SocketAddrV4, backend: SocketAddrV4, proto: u8) -> CtEntry {
        let key = CtKey::new(*client.ip(), client.port(), *backend.ip(), backend.port(), proto);
        self.conntrack.get(&key, 0).expect("conntrack entry")
    }

    /// The SNAT source the egress program will use for the DNATed tuple `client → backend`.
    fn snat_source(&self, client: SocketAddrV4, backend: SocketAddrV4) -> SocketAddrV4 {
        let entry = self.connection(client, backend, proto::TCP);
        assert_ne!(entry.snat_addr, 0, "the connection is SNATed");
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(entry.snat_addr)), u16::from_be(entry.snat_port))
    }
}

/// `bpf_ktime_get_ns()` as seen from user space.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn be(addr: SocketAddrV4) -> (u32, u16) {
    (u32::from(*addr.ip()).to_be(), addr.port().to_be())
}

/// Binds every SNAT port towards `POD_B` to another client; with `live`, each of those
/// connections also has a fresh conntrack entry using its binding.
fn bind_every_snat_port(h: &mut Harness, live: bool) {
    let now = monotonic_ns();
    for (i, port) in (SNAT_PORT_MIN..=SNAT_PORT_MAX).enumerate() {
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 200), 1024 + i as u16);
        let (addr, cport) = be(client);
        let reply = CtKey::new(*POD_B.ip(), POD_B.port(), NODE_A, port, proto::TCP);
        h.nat.insert(reply, NatEntry { addr, port: cport, _pad: 0 }, 0).unwrap();
        if live {
            let key = CtKey::new(*client.ip(), client.port(), *POD_B.ip(), POD_B.port(), proto::TCP);
            let (fa, fp) = be(NP_REMOTE);
            let entry = CtEntry {
                frontend_addr: fa,
                frontend_port: fp,
                snat_addr: u32::from(NODE_A).to_be(),
                snat_port: port.to_be(),
                state: CT_STATE_ESTABLISHED,
                flags: 0,
                _pad: 0,
                created_ns: now,
                last_seen_ns: now,
            };
            h.conntrack.insert(key, entry, 0).unwrap();
        }
    }
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
    assert_frame("XDP", h.run(Hook::XdpIngress, &input), XDP_TX, &frame::reject_of(&input));
    let from_pod = frame::tcp(POD_A2, NP_EMPTY, SYN);
    assert_frame("TC", h.run(Hook::TcIngress, &from_pod), TC_ACT_REDIRECT, &frame::reject_of(&from_pod));
    let udp = frame::udp(CLIENT, NP_EMPTY_UDP, true);
    assert_frame("XDP UDP", h.run(Hook::XdpIngress, &udp), XDP_TX, &frame::reject_of(&udp));
    assert_eq!(h.entries(), 0, "no state for a rejected connection");
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
/// IPv4 header length below 20, truncated TCP, total length shorter than the headers, and
/// fragments (no ports to balance on).
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
    let mut first_fragment = valid.clone();
    first_fragment[offset::IP_FLAGS_FRAG] = 0x20; // MF
    cases.push(("first fragment", first_fragment, true));
    let mut later_fragment = valid.clone();
    later_fragment[offset::IP_FLAGS_FRAG + 1] = 0x10; // offset 16*8
    cases.push(("later fragment", later_fragment, true));
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

/// A SNAT port held by a connection that is over (no live conntrack entry) is taken over by a
/// new connection: closed connections do not exhaust the SNAT range.
#[test]
fn snat_ports_of_finished_connections_are_reused() {
    let mut h = Harness::new();
    bind_every_snat_port(&mut h, false);
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
    bind_every_snat_port(&mut h, true);
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
    assert_frame("reply of the expired connection", h.run(Hook::TcEgress, &stray_reply), TC_ACT_OK, &stray_reply);
    assert_frame(
        "SYN",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_A, SYN),
    );
    assert!(h.connection(CLIENT, POD_A, proto::TCP).created_ns > 1, "a new entry");
}
