//! The programs of one node under BPF_PROG_TEST_RUN, for the packet fixtures and the fuzz
//! test: the real programs loaded with private maps (nothing pinned or attached), the maps
//! programmed through the agent's own path (manifest YAML → store → desired state → map
//! writer), frames run through a hook, and the per-connection maps read and seeded.
//!
//! Also the fixture cluster both use: node-a's addresses, its pods and the Services of
//! `CLUSTER` and `POLICIES`. Needs root.
use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    maps::{HashMap, MapData},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    conntrack::{CtBackend, CtEntry, CtKey},
    fragment::{FragmentKey, FragmentPorts},
    maps,
    nat::NatEntry,
    proto,
};
use lb_userspace::{
    dataplane::{Dataplane, Hook, MapSizes, MapWriter},
    desired::{self, DesiredState, NodeContext},
    manifests,
    model::Store,
};

// Verdicts as BPF_PROG_TEST_RUN returns them.
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// node-a, whose programs the harness runs: its address, its clients, pods and frontends.
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 40000);
pub const POD_A: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 8080);
pub const POD_A_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 5353);
pub const POD_A2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 45000);
pub const POD_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 2, 10), 8080);
/// NodePort of `local` (endpoint on this node), `remote` (on node-b) and `empty` (none).
pub const NP_LOCAL: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30080);
pub const NP_REMOTE: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30081);
pub const NP_EMPTY: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30082);
pub const NP_EMPTY_UDP: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30083);
pub const CIP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 80);
pub const CIP_LOCAL_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 1), 53);
pub const CIP_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 2), 80);
pub const CIP_EMPTY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 3), 80);
pub const CIP_EMPTY_DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 3), 53);
/// node-b, where `POD_B` runs.
pub const NODE_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A router between the nodes.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

pub const CLUSTER: &str = r#"
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
pub const NP_ETP_LOCAL: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30090);
pub const NP_ETP_AWAY: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30091);
pub const CIP_ITP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 12), 80);
pub const CIP_ITP_AWAY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 13), 80);
pub const NP_STICKY: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30094);
pub const LB_RANGES: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 1, 1), 80);
pub const NP_RANGES: SocketAddrV4 = SocketAddrV4::new(NODE_A, 30095);
pub const EXTERNAL_IP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 2, 2), 80);
/// The three endpoints of `sticky`, all on node-a.
pub const STICKY_PODS: [SocketAddrV4; 3] = [
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 20), 8080),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 21), 8080),
    SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 22), 8080),
];
/// A client outside `lb-ranges`' loadBalancerSourceRanges (198.18.0.0/24).
pub const OUTSIDER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 5, 5), 40000);
/// `sticky`'s sessionAffinityConfig.clientIP.timeoutSeconds.
pub const STICKY_TIMEOUT_S: u64 = 10;

/// Traffic policies, session affinity, LoadBalancer source ranges and externalIPs, each on a
/// Service of its own. `POD_A` (198.18.1.10) runs on node-a, `POD_B` (198.18.2.10) on node-b.
pub const POLICIES: &str = r#"
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
pub struct Harness {
    pub dp: Dataplane,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub ct_service: HashMap<MapData, CtKey, CtBackend>,
    pub nat: HashMap<MapData, CtKey, NatEntry>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityEntry>,
    pub fragments: HashMap<MapData, FragmentKey, FragmentPorts>,
    pub writer: MapWriter,
    /// What the writer programmed: the frontends and backend groups.
    pub desired: DesiredState,
}

/// A connection as the programs track it (addresses and ports in host order), to seed the
/// maps with directly.
#[derive(Clone, Copy, Debug)]
pub struct Connection {
    pub proto: u8,
    pub client: SocketAddrV4,
    pub frontend: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// The SNAT source, when the connection is SNATed.
    pub snat: Option<SocketAddrV4>,
    /// `CT_STATE_*`.
    pub state: u8,
    /// The Service port's counter slot; 0: not counted.
    pub stats_index: u16,
}

impl Harness {
    pub fn new() -> Self {
        Self::with(CLUSTER)
    }

    /// The programs with their maps seeded from the manifests in `yaml`.
    pub fn with(yaml: &str) -> Self {
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
        let desired = desired::compute(&store, &node);
        let report = writer.sync(&desired);
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let conntrack = dp.take_map(maps::CONNTRACK).unwrap().try_into().unwrap();
        let ct_service = dp.take_map(maps::CT_SERVICE).unwrap().try_into().unwrap();
        let nat = dp.take_map(maps::NAT).unwrap().try_into().unwrap();
        let affinity = dp.take_map(maps::AFFINITY).unwrap().try_into().unwrap();
        let fragments = dp.take_map(maps::FRAGMENTS).unwrap().try_into().unwrap();
        Self { dp, conntrack, ct_service, nat, affinity, fragments, writer, desired }
    }

    /// Runs `hook`'s program on `input`: (verdict, output frame).
    pub fn run(&self, hook: Hook, input: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(hook, input)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {hook:?} on a {}-byte frame: {e}", input.len()))
    }

    /// As `run`, or the kernel's refusal to run the program on `input` (e.g. too short).
    pub fn try_run(&self, hook: Hook, input: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let program = self.dp.program(hook).expect("program");
        let mut out = vec![0u8; input.len() + 256];
        let opts = TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ..Default::default() };
        let result = match hook {
            Hook::XdpIngress => <&Xdp>::try_from(program).unwrap().test_run(opts),
            Hook::TcExternal | Hook::TcIngress | Hook::TcEgress => {
                <&SchedClassifier>::try_from(program).unwrap().test_run(opts)
            }
        }?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    pub fn entries(&self) -> usize {
        self.conntrack.keys().count() + self.ct_service.keys().count() + self.nat.keys().count()
    }

    /// The connection `client → backend` (after DNAT).
    pub fn connection(&self, client: SocketAddrV4, backend: SocketAddrV4, proto: u8) -> CtEntry {
        let key = CtKey::new(*client.ip(), client.port(), *backend.ip(), backend.port(), proto);
        self.conntrack.get(&key, 0).expect("conntrack entry")
    }

    /// The backend the connection `client → frontend` was given.
    pub fn backend_of(&self, client: SocketAddrV4, frontend: SocketAddrV4, proto: u8) -> SocketAddrV4 {
        let key = CtKey::new(*client.ip(), client.port(), *frontend.ip(), frontend.port(), proto);
        let backend = self.ct_service.get(&key, 0).expect("service conntrack entry");
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(backend.addr)), u16::from_be(backend.port))
    }

    /// The one session affinity entry of `client`.
    pub fn affinity_of(&self, client: Ipv4Addr) -> (AffinityKey, AffinityEntry) {
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
    pub fn snat_source(&self, client: SocketAddrV4, backend: SocketAddrV4) -> SocketAddrV4 {
        let entry = self.connection(client, backend, proto::TCP);
        assert_ne!(entry.snat_addr, 0, "the connection is SNATed");
        SocketAddrV4::new(Ipv4Addr::from(u32::from_be(entry.snat_addr)), u16::from_be(entry.snat_port))
    }

    /// Writes the conntrack entry of `c` (key client → backend), created and last seen at `now`.
    pub fn insert_conntrack(&mut self, c: &Connection, now: u64) {
        let key = CtKey::new(*c.client.ip(), c.client.port(), *c.backend.ip(), c.backend.port(), c.proto);
        let (frontend_addr, frontend_port) = be(c.frontend);
        let (snat_addr, snat_port) = c.snat.map_or((0, 0), be);
        let entry = CtEntry {
            frontend_addr,
            frontend_port,
            snat_addr,
            snat_port,
            state: c.state,
            flags: 0,
            stats_index: c.stats_index,
            created_ns: now,
            last_seen_ns: now,
        };
        self.conntrack.insert(key, entry, 0).unwrap();
    }

    /// Writes the SNAT binding of `c`'s backend and SNAT source to its client.
    pub fn insert_snat_binding(&mut self, c: &Connection) {
        let snat = c.snat.expect("a SNATed connection");
        let reply = CtKey::new(*c.backend.ip(), c.backend.port(), *snat.ip(), snat.port(), c.proto);
        let (addr, port) = be(c.client);
        self.nat.insert(reply, NatEntry { addr, port, _pad: 0 }, 0).unwrap();
    }

    /// Writes every entry of `c`: the service conntrack entry that leads its client's packets
    /// to it, its conntrack entry and its SNAT binding, if any.
    pub fn track(&mut self, c: &Connection, now: u64) {
        let key = CtKey::new(*c.client.ip(), c.client.port(), *c.frontend.ip(), c.frontend.port(), c.proto);
        let (addr, port) = be(c.backend);
        self.ct_service.insert(key, CtBackend { addr, port, _pad: 0 }, 0).unwrap();
        self.insert_conntrack(c, now);
        if c.snat.is_some() {
            self.insert_snat_binding(c);
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

/// `bpf_ktime_get_ns()` as seen from user space.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Address and port in network byte order, as the maps hold them.
pub fn be(addr: SocketAddrV4) -> (u32, u16) {
    (u32::from(*addr.ip()).to_be(), addr.port().to_be())
}

/// The verdict of a packet a hook let through (translated or not).
pub fn pass_verdict(hook: Hook) -> u32 {
    match hook {
        Hook::XdpIngress => XDP_PASS,
        Hook::TcExternal | Hook::TcIngress | Hook::TcEgress => TC_ACT_OK,
    }
}
