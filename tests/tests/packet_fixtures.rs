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
    conntrack::{CtEntry, CtKey, CT_DIR_FORWARD, CT_DIR_REPLY, CT_STATE_ESTABLISHED},
    maps,
    nat::{NatEntry, NAT_DIR_EGRESS, NAT_DIR_INGRESS},
    proto,
};
use lb_userspace::{
    dataplane::{Dataplane, Hook, MapWriter},
    desired::{self, NodeContext},
    manifests,
    model::Store,
};
use xlb_tests::frame::{self, offset, ACK, SYN};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

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
  ports: [{name: http, port: 80, nodePort: 30082, targetPort: 8080}]
"#;

/// The programs of node-a with private maps, seeded with `CLUSTER`.
struct Harness {
    dp: Dataplane,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    nat: HashMap<MapData, CtKey, NatEntry>,
    _writer: MapWriter,
}

impl Harness {
    fn new() -> Self {
        // Room for every SNAT port of one backend, twice (see the SNAT exhaustion tests).
        let mut dp = Dataplane::load_unpinned(16_384).expect("load programs (needs root)");
        let mut writer = MapWriter::open(&mut dp).expect("maps");
        let mut store = Store::default();
        for object in manifests::parse_str(CLUSTER).expect("fixture YAML").objects {
            store.apply(&object, "fixture").expect("valid fixture");
        }
        let node = NodeContext { name: "node-a", addrs: &[NODE_A], default_snat_addr: Some(NODE_A) };
        let report = writer.sync(&desired::compute(&store, &node));
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let conntrack = dp.take_map(maps::CONNTRACK).unwrap().try_into().unwrap();
        let nat = dp.take_map(maps::NAT).unwrap().try_into().unwrap();
        Self { dp, conntrack, nat, _writer: writer }
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
        self.conntrack.keys().count() + self.nat.keys().count()
    }

    /// The SNAT source the egress program will use for the DNATed tuple `client → backend`.
    fn snat_source(&self, client: SocketAddrV4, backend: SocketAddrV4) -> SocketAddrV4 {
        let key = CtKey::new(
            *client.ip(),
            client.port(),
            *backend.ip(),
            backend.port(),
            proto::TCP,
            NAT_DIR_EGRESS,
        );
        let entry = self.nat.get(&key, 0).expect("SNAT binding");
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(entry.addr)), u16::from_be(entry.port))
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
/// connections also has a fresh conntrack reply entry.
fn bind_every_snat_port(h: &mut Harness, live: bool) {
    let now = monotonic_ns();
    for (i, port) in (SNAT_PORT_MIN..=SNAT_PORT_MAX).enumerate() {
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 200), 1024 + i as u16);
        let (addr, cport) = be(client);
        let ingress = CtKey::new(*POD_B.ip(), POD_B.port(), NODE_A, port, proto::TCP, NAT_DIR_INGRESS);
        h.nat.insert(ingress, NatEntry { addr, port: cport, _pad: 0, last_seen_ns: now }, 0).unwrap();
        if live {
            let reply =
                CtKey::new(*POD_B.ip(), POD_B.port(), *client.ip(), client.port(), proto::TCP, CT_DIR_REPLY);
            let (fa, fp) = be(NP_REMOTE);
            let entry = CtEntry {
                nat_addr: fa,
                nat_port: fp,
                state: CT_STATE_ESTABLISHED,
                _pad: 0,
                created_ns: now,
                last_seen_ns: now,
            };
            h.conntrack.insert(reply, entry, 0).unwrap();
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

/// A Service without endpoints drops new connections instead of passing them to the node.
#[test]
fn service_without_endpoints_drops() {
    let h = Harness::new();
    let input = frame::tcp(CLIENT, NP_EMPTY, SYN);
    assert_frame("XDP", h.run(Hook::XdpIngress, &input), XDP_DROP, &input);
    assert_frame("TC", h.run(Hook::TcIngress, &input), TC_ACT_SHOT, &input);
    assert_eq!(h.entries(), 0, "no state for a dropped connection");
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
    let ingress = CtKey::new(*POD_B.ip(), POD_B.port(), NODE_A, snat.port(), proto::TCP, NAT_DIR_INGRESS);
    let bound = h.nat.get(&ingress, 0).expect("ingress binding");
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

/// A connection lives while either direction is fresh: a client packet after its own entry
/// went idle past the timeout keeps the backend (and the entry) the reply side kept alive.
#[test]
fn a_fresh_reply_half_keeps_the_connection() {
    let mut h = Harness::new();
    h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, SYN));
    h.run(Hook::TcEgress, &frame::tcp(POD_A, CLIENT, SYN | ACK));
    let forward =
        CtKey::new(*CLIENT.ip(), CLIENT.port(), NODE_A, NP_LOCAL.port(), proto::TCP, CT_DIR_FORWARD);
    let mut entry = h.conntrack.get(&forward, 0).unwrap();
    entry.last_seen_ns = 1; // idle for as long as the machine is up
    h.conntrack.insert(forward, entry, 0).unwrap();
    assert_frame(
        "ACK",
        h.run(Hook::XdpIngress, &frame::tcp(CLIENT, NP_LOCAL, ACK)),
        XDP_PASS,
        &frame::tcp(CLIENT, POD_A, ACK),
    );
    let after = h.conntrack.get(&forward, 0).unwrap();
    assert_eq!(after.created_ns, entry.created_ns, "the same connection, not a new one");
    assert!(after.last_seen_ns > 1);
}
