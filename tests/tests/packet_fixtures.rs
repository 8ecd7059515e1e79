//! Byte-exact fixtures for every packet path, run through BPF_PROG_TEST_RUN on the real
//! programs (no interface involved). Each test states what it proves, seeds the maps through
//! the agent's own path (manifest YAML → store → desired state → map writer), runs packets
//! and compares whole output frames with frames whose checksums were computed from scratch.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{CtBackend, CtEntry, CtKey, CT_STATE_CLOSED, CT_STATE_ESTABLISHED},
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
const CIP_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 2), 80);
const CIP_EMPTY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 3), 80);
const CIP_EMPTY_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 3), 53);
/// node-b, where `POD_B` runs.
const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A router between the nodes.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

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

/// Frontends of the Services in `POLICIES`.
const NP_ETP_LOCAL: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30090);
const NP_ETP_AWAY: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30091);
const CIP_ITP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 12), 80);
const CIP_ITP_AWAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 13), 80);
const NP_STICKY: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30094);
const LB_RANGES: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 1), 80);
const NP_RANGES: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30095);
const EXTERNAL_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 2, 2), 80);
/// The three endpoints of `sticky`, all on node-a.
const STICKY_PODS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 20), 8080),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 21), 8080),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 22), 8080),
];
/// A client outside `lb-ranges`' loadBalancerSourceRanges (198.18.0.0/24).
const OUTSIDER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 5, 5), 40000);
/// `sticky`'s sessionAffinityConfig.clientIP.timeoutSeconds.
const STICKY_TIMEOUT_S: u64 = 10;

/// Traffic policies, session affinity, LoadBalancer source ranges and externalIPs, each on a
/// Service of its own. `POD_A` (198.18.1.10) runs on node-a, `POD_B` (198.18.2.10) on node-b.
const POLICIES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: etp-local, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.10
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30090, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: etp-local-1, namespace: default, labels: {kubernetes.io/service-name: etp-local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.1.10], nodeName: node-a}, {addresses: [198.18.2.10], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: etp-away, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.11
  externalTrafficPolicy: Local
  ports: [{name: http, port: 80, nodePort: 30091, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: etp-away-1, namespace: default, labels: {kubernetes.io/service-name: etp-away}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.2.10], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: itp-local, namespace: default}
spec:
  clusterIP: 198.19.0.12
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: itp-local-1, namespace: default, labels: {kubernetes.io/service-name: itp-local}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.1.10], nodeName: node-a}, {addresses: [198.18.2.10], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: itp-away, namespace: default}
spec:
  clusterIP: 198.19.0.13
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: itp-away-1, namespace: default, labels: {kubernetes.io/service-name: itp-away}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.2.10], nodeName: node-b}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: default}
spec:
  type: NodePort
  clusterIP: 198.19.0.14
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 10}}
  ports: [{name: http, port: 80, nodePort: 30094, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: sticky-1, namespace: default, labels: {kubernetes.io/service-name: sticky}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [198.18.1.20], nodeName: node-a}
- {addresses: [198.18.1.21], nodeName: node-a}
- {addresses: [198.18.1.22], nodeName: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: lb-ranges, namespace: default}
spec:
  type: LoadBalancer
  clusterIP: 198.19.0.15
  loadBalancerSourceRanges: [198.18.0.0/24]
  ports: [{name: http, port: 80, nodePort: 30095, targetPort: 8080}]
status:
  loadBalancer:
    ingress: [{ip: 198.19.1.1}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-ranges-1, namespace: default, labels: {kubernetes.io/service-name: lb-ranges}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.1.10], nodeName: node-a}]
---
apiVersion: v1
kind: Service
metadata: {name: external-ip, namespace: default}
spec:
  clusterIP: 198.19.0.16
  externalIPs: [198.19.2.2]
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: external-ip-1, namespace: default, labels: {kubernetes.io/service-name: external-ip}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.1.10], nodeName: node-a}]
"#;

/// The programs of node-a with private maps, seeded with `CLUSTER` or another fixture.
struct Harness {
    dp: Dataplane,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_service: HashMap<MapData, CtKey, CtBackend>,
    nat: HashMap<MapData, CtKey, NatEntry>,
    affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    writer: MapWriter,
}

impl Harness {
    fn new() -> Self {
        Self::with(CLUSTER)
    }

    /// The programs with their maps seeded from the manifests in `yaml`.
    fn with(yaml: &str) -> Self {
        // Room for every SNAT port of one backend, twice (see the SNAT exhaustion tests).
        let sizes = MapSizes { conntrack: 16_384, ..MapSizes::default() };
        let mut dp = Dataplane::load_unpinned(sizes).expect("load programs (needs root)");
        let mut writer = MapWriter::open(&mut dp).expect("maps");
        let mut store = Store::default();
        let parsed = manifests::parse_str(yaml).expect("fixture YAML");
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        for object in parsed.objects {
            store.apply(&object, "fixture").expect("valid fixture");
        }
        let node = NodeContext { name: "node-a", addrs: &[NODE_A], default_snat_addr: Some(NODE_A) };
        let report = writer.sync(&desired::compute(&store, &node));
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let conntrack = dp.take_map(maps::CONNTRACK).unwrap().try_into().unwrap();
        let ct_service = dp.take_map(maps::CT_SERVICE).unwrap().try_into().unwrap();
        let nat = dp.take_map(maps::NAT).unwrap().try_into().unwrap();
        let affinity = dp.take_map(maps::AFFINITY).unwrap().try_into().unwrap();
        Self { dp, conntrack, ct_service, nat, affinity, writer }
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

    /// The backend the connection `client → frontend` was given.
    fn backend_of(&self, client: SocketAddrV4, frontend: SocketAddrV4, proto: u8) -> SocketAddrV4 {
        let key = CtKey::new(*client.ip(), client.port(), *frontend.ip(), frontend.port(), proto);
        let backend = self.ct_service.get(&key, 0).expect("service conntrack entry");
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(backend.addr)), u16::from_be(backend.port))
    }

    /// The one session affinity entry of `client`.
    fn affinity_of(&self, client: Ipv4Addr) -> (AffinityKey, AffinityEntry) {
        let entries: Vec<_> = self
            .affinity
            .iter()
            .map(|e| e.expect("affinity entry"))
            .filter(|(key, _)| key.client_addr == u32::from(client).to_be())
            .collect();
        assert_eq!(entries.len(), 1, "affinity entries of {client}: {entries:?}");
        entries[0]
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

/// Binds every SNAT port towards `POD_B` to another client; with `live` a state, each of
/// those connections also has a fresh conntrack entry in that state using its binding.
fn bind_every_snat_port(h: &mut Harness, live: Option<u8>) {
    let now = monotonic_ns();
    for (i, port) in (SNAT_PORT_MIN..=SNAT_PORT_MAX).enumerate() {
        let client = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 200), 1024 + i as u16);
        let (addr, cport) = be(client);
        let reply = CtKey::new(*POD_B.ip(), POD_B.port(), NODE_A, port, proto::TCP);
        h.nat.insert(reply, NatEntry { addr, port: cport, _pad: 0 }, 0).unwrap();
        if let Some(state) = live {
            let key = CtKey::new(*client.ip(), client.port(), *POD_B.ip(), POD_B.port(), proto::TCP);
            let (fa, fp) = be(NP_REMOTE);
            let entry = CtEntry {
                frontend_addr: fa,
                frontend_port: fp,
                snat_addr: u32::from(NODE_A).to_be(),
                snat_port: port.to_be(),
                state,
                flags: 0,
                stats_index: 0,
                created_ns: now,
                last_seen_ns: now,
            };
            h.conntrack.insert(key, entry, 0).unwrap();
        }
    }
}

/// The verdict of a packet a hook let through (translated or not).
fn pass_verdict(hook: Hook) -> u32 {
    match hook {
        Hook::XdpIngress => XDP_PASS,
        Hook::TcIngress | Hook::TcEgress => TC_ACT_OK,
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

/// The second word of an ICMP "fragmentation needed": unused, then the next-hop MTU.
fn next_hop_mtu(mtu: u16) -> [u8; 4] {
    let [hi, lo] = mtu.to_be_bytes();
    [0, 0, hi, lo]
}

/// More L4 bytes than any fixture has, for `frame::quote`: the whole packet, as routers quote
/// as much as fits (RFC 1812).
const WHOLE: usize = 1500;
/// Four IPv4 "no operation" options: a valid header of 24 bytes (IHL 6).
const NOP_OPTIONS: [u8; 4] = [1, 1, 1, 1];

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
/// IPv4 header length below 20, truncated TCP, total length shorter than the headers,
/// fragments (no ports to balance on), VLAN-tagged frames (the tag is not looked behind) and
/// ICMP echo requests (no ports).
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
/// the Service's NodePort, which the ranges do not cover; a pod (TC ingress) is not subject to
/// the ranges.
#[test]
fn load_balancer_source_ranges_filter_outside_clients_on_the_lb_ip_only() {
    let h = Harness::with(POLICIES);
    assert_eq!(open(&h, Hook::XdpIngress, CLIENT, LB_RANGES), POD_A, "198.18.0.100 is in range");
    let outside = frame::tcp(OUTSIDER, LB_RANGES, SYN);
    let before = h.entries();
    assert_frame("outside the ranges", h.run(Hook::XdpIngress, &outside), XDP_DROP, &outside);
    assert_eq!(h.entries(), before, "no state for a dropped connection");
    assert_eq!(open(&h, Hook::XdpIngress, OUTSIDER, NP_RANGES), POD_A, "the NodePort has no ranges");
    assert_eq!(open(&h, Hook::TcIngress, POD_A2, LB_RANGES), POD_A, "pods are not filtered");
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
    assert_frame("UDP", h.run(Hook::TcIngress, &input), TC_ACT_REDIRECT, &frame::reject_of(&input));
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
