//! Kubernetes' e2e tests of traffic distribution (test/e2e/network/traffic_distribution.go),
//! topology hints (topology_hints.go), Services with several EndpointSlices (endpointslice.go)
//! and LoadBalancers (loadbalancer.go, `[sig-network] LoadBalancers` and `LoadBalancers
//! ESIPP`) as xlb integration tests: each test is named after an e2e test, quotes the names of
//! those it covers and checks what they check of the proxy, with real traffic through the
//! agents of the namespace cluster, from pods (socket balancing, or their veth's TC path), from
//! the nodes' own processes and from the client outside the cluster.
//!
//! The e2e tests let the controllers write EndpointSlices (with their topology hints) and a
//! cloud provider give a LoadBalancer its ingress IP and send it traffic; here the tests write
//! what the controllers would (`hints.forZones`, `hints.forNodes`, `status.loadBalancer`) and
//! the external client routes the ingress IP through a node, as a cloud load balancer sends
//! traffic to a node (through the node its health checks pick, where that matters). Every
//! change is followed by a barrier, not a sleep: the change carries a new version of a marker
//! Service, and a node has applied the change once its maps hold that version.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::Duration,
};

use lb_common::{proto, service::ServiceKey};
use xlb_tests::{
    checks,
    e2e::{self, ask, fails, reaches, Client, Proto, ANSWER_TIMEOUT},
    kiada, netns,
    services::{pod, pod_ip, programmed, service_yaml, Port, CHANGE_TIMEOUT, START_TIMEOUT},
    sockets,
    testbed::{Spec, Testbed},
};

/// The port every pod's kiada serves, over TCP and UDP.
const POD_PORT: u16 = 8080;
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

// ---------------------------------------------------------------------------------------
// The cluster and its objects

/// A namespace cluster whose agents follow a manifests directory, with the Nodes' zones.
struct Cluster {
    tb: Testbed,
    zones: Vec<Option<&'static str>>,
    version: u8,
}

impl Cluster {
    /// `zones[i]` is node i's `topology.kubernetes.io/zone` (one node per entry); `pods` as
    /// (name, node); every pod serves TCP on `tcp_ports` and UDP on `POD_PORT`. The external
    /// client routes 198.19.0.0/16 (ClusterIPs, LoadBalancer IPs) through node-a.
    fn up(
        zones: &[Option<&'static str>],
        pods: &[(&str, usize)],
        tcp_ports: &[u16],
        objects: impl FnOnce(&Testbed) -> String,
    ) -> Self {
        let spec = Spec {
            nodes: zones.len(),
            pods: pods.iter().map(|(name, node)| (name.to_string(), *node)).collect(),
            tcp_ports: tcp_ports.to_vec(),
            udp_ports: vec![POD_PORT],
        };
        let tb = Testbed::up(&spec).expect("testbed");
        let mut c = Self { tb, zones: zones.to_vec(), version: 0 };
        c.route_client_via(Ipv4Addr::new(198, 19, 0, 0), 16, 0);
        let objects = objects(&c.tb);
        c.write(&objects);
        for i in 0..c.tb.nodes.len() {
            c.tb.start_agent(i).expect("agent");
        }
        c.synced(START_TIMEOUT);
        c
    }

    /// The external client sends `addr/len` through node `node` (a cloud load balancer's
    /// choice of node).
    fn route_client_via(&self, addr: Ipv4Addr, len: u8, node: usize) {
        assert!(self.tb.owns_namespace(&self.tb.client));
        netns::ip(&[
            "-n",
            &self.tb.client,
            "route",
            "replace",
            &format!("{addr}/{len}"),
            "via",
            &self.tb.nodes[node].ip.to_string(),
        ])
        .expect("client route");
    }

    /// Makes `objects` the cluster's objects (the Nodes are added) and waits until every
    /// agent has applied them.
    fn set(&mut self, objects: &str) {
        self.write(objects);
        self.synced(CHANGE_TIMEOUT);
    }

    fn nodes_yaml(&self) -> String {
        let mut yaml = String::new();
        for (node, zone) in self.tb.nodes.iter().zip(&self.zones) {
            let labels = zone.map(|z| format!("  labels:\n    {ZONE_LABEL}: {z}\n")).unwrap_or_default();
            yaml += &format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n{labels}status:\n  addresses:\n  - type: InternalIP\n    address: {}\n---\n",
                node.name, node.ip
            );
        }
        yaml
    }

    fn write(&mut self, objects: &str) {
        self.version += 1;
        let docs = self.nodes_yaml() + objects + &e2e::marker_yaml(self.version);
        self.tb.write_manifest("e2e.yaml", &docs).expect("manifest");
    }

    /// Waits until every node's maps hold the marker of the last change.
    fn synced(&mut self, timeout: Duration) {
        e2e::wait_applied(&mut self.tb, self.version, timeout);
    }

    fn node_ip(&self, node: usize) -> Ipv4Addr {
        self.tb.nodes[node].ip
    }

    /// The backends (address, port) of node `node`'s group for its own pods at `key`.
    fn internal_backends(&self, node: usize, key: ServiceKey) -> BTreeSet<(Ipv4Addr, u16)> {
        use aya::maps::{HashMap, Map, MapData};
        use lb_common::backend::{Backend, BackendKey};
        let p = programmed(&self.tb, node, key).unwrap_or_else(|| panic!("{key:?} not programmed"));
        let dir = &self.tb.nodes[node].bpffs_dir;
        let backends: HashMap<MapData, BackendKey, Backend> = HashMap::try_from(Map::HashMap(
            MapData::from_pin(dir.join(lb_common::maps::BACKENDS)).expect("backends pin"),
        ))
        .expect("backends map");
        (0..u32::from(p.value.internal_count))
            .map(|slot| {
                let b =
                    backends.get(&BackendKey { group_id: p.value.internal_group_id, slot }, 0).expect("slot");
                (b.ip(), b.host_port())
            })
            .collect()
    }
}

/// A Service of type LoadBalancer with `ingress` as `status.loadBalancer.ingress`.
fn lb_yaml(name: &str, cluster_ip: Ipv4Addr, ports: &[Port], extra: &str, ingress: Ipv4Addr) -> String {
    let yaml = service_yaml(name, "LoadBalancer", cluster_ip, ports, extra);
    yaml.trim_end_matches("---\n").to_string()
        + &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ingress}\n---\n")
}

/// An endpoint of a slice: pod, `hints.forZones`, `hints.forNodes`.
type Hinted<'a> = (&'a str, &'a [&'a str], &'a [&'a str]);

/// EndpointSlice `slice` of Service `service` with target ports `ports` (name, port) and ready
/// `endpoints` with their zone (their node's) and hints, as the EndpointSlice controller writes
/// them.
fn slice_yaml(
    c: &Cluster,
    service: &str,
    slice: &str,
    ports: &[(&str, u16)],
    endpoints: &[Hinted],
) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {slice}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (name, port) in ports {
        yaml += &format!("- name: {name}\n  port: {port}\n  protocol: TCP\n");
    }
    yaml += if endpoints.is_empty() { "endpoints: []\n" } else { "endpoints:\n" };
    for (pod_name, zones, nodes) in endpoints {
        let p = pod(&c.tb, pod_name);
        yaml += &format!(
            "- addresses:\n  - {}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: {}\n",
            p.ip, c.tb.nodes[p.node].name
        );
        if let Some(zone) = c.zones[p.node] {
            yaml += &format!("  zone: {zone}\n");
        }
        if !zones.is_empty() || !nodes.is_empty() {
            yaml += "  hints:\n";
            if !zones.is_empty() {
                yaml += "    forZones:\n";
                zones.iter().for_each(|z| yaml += &format!("    - name: {z}\n"));
            }
            if !nodes.is_empty() {
                yaml += "    forNodes:\n";
                nodes.iter().for_each(|n| yaml += &format!("    - name: {n}\n"));
            }
        }
        yaml += &format!("  targetRef:\n    kind: Pod\n    name: {pod_name}\n    namespace: default\n");
    }
    yaml + "---\n"
}

/// The one-port slice of `service` on `POD_PORT` (port name `http`).
fn http_slice(c: &Cluster, service: &str, endpoints: &[Hinted]) -> String {
    slice_yaml(c, service, &format!("{service}-abcde"), &[("http", POD_PORT)], endpoints)
}

// ---------------------------------------------------------------------------------------
// Traffic

/// Polls node `node`'s `healthCheckNodePort` until it answers the external client with
/// `want` (`None`: refuses the connection), as the agent's listeners follow its sync; fails
/// after `CHANGE_TIMEOUT`.
fn expect_health(c: &Cluster, node: usize, port: u16, want: Option<u16>, phase: &str) {
    checks::eventually(&format!("{phase}: health check of node {node}"), CHANGE_TIMEOUT, || {
        match (health_check(c, node, port), want) {
            (Ok(status), Some(want)) if status == want => Ok(()),
            (Err(e), None) if e.to_lowercase().contains("refused") => Ok(()),
            (got, _) => anyhow::bail!("got {got:?}, want {want:?}"),
        }
    });
}

/// The HTTP status node `node`'s `healthCheckNodePort` answers the external client, or the
/// connection's error.
fn health_check(c: &Cluster, node: usize, port: u16) -> Result<u16, String> {
    let addr = SocketAddrV4::new(c.node_ip(node), port);
    netns::within(&c.tb.client, move || -> anyhow::Result<u16> {
        let mut stream = sockets::tcp_connect(addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(stream, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response.split(' ').nth(1).and_then(|s| s.parse().ok());
        status.ok_or_else(|| anyhow::anyhow!("no status line in {response:?}"))
    })
    .expect("namespace")
    .map_err(|e| format!("{e:#}"))
}

// ---------------------------------------------------------------------------------------
// traffic_distribution.go, topology_hints.go

/// The clients of the distribution tests: one pod per node (`client-a`...), asking through
/// socket balancing and through its veth's TC path, and each node's own processes.
fn distribution_clients(node: usize) -> [Client; 3] {
    const PODS: [&str; 4] = ["client-a", "client-b", "client-c", "client-d"];
    [Client::Pod(PODS[node]), Client::PodTc(PODS[node]), Client::Node(node)]
}

/// Every client of node `node` reaches exactly `pods` on `target`.
fn node_reaches(c: &Cluster, node: usize, target: SocketAddrV4, pods: &[&str], phase: &str) {
    for from in distribution_clients(node) {
        reaches(&c.tb, from, Proto::Tcp, target, pods, &format!("{phase}, {}", c.tb.nodes[node].name));
    }
}

/// Four nodes: node-a and node-b in zone-1, node-c and node-d in zone-2; a client pod on
/// each, a server pod on node-a, node-b and node-d (none on node-c).
fn four_nodes(objects: impl FnOnce(&Testbed) -> String) -> Cluster {
    Cluster::up(
        &[Some("zone-1"), Some("zone-1"), Some("zone-2"), Some("zone-2")],
        &[
            ("server-a", 0),
            ("server-b", 1),
            ("server-d", 3),
            ("client-a", 0),
            ("client-b", 1),
            ("client-c", 2),
            ("client-d", 3),
        ],
        &[POD_PORT],
        objects,
    )
}

const DIST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 30, 10);
const DIST_PORTS: [Port; 1] = [("http", 80, POD_PORT, None, "TCP")];

fn dist_service(distribution: &str) -> String {
    service_yaml(
        "traffic-dist-test-service",
        "ClusterIP",
        DIST_IP,
        &DIST_PORTS,
        &format!("  trafficDistribution: {distribution}\n"),
    )
}

/// `[sig-network] Traffic Distribution should route traffic correctly between pods on multiple
/// nodes when using PreferClose`, and the same with PreferSameZone, and `... should route
/// traffic to an endpoint in the same zone when using PreferClose` / `PreferSameZone`, and
/// `[sig-network] Topology Hints should distribute endpoints evenly` (requests stay in their
/// zone). The EndpointSlice controller hints each endpoint for its zone (`hints.forZones`) for
/// both values of `trafficDistribution` and for `service.kubernetes.io/topology-mode: Auto`;
/// the proxy reads the hints and its node's zone label. Zone-1 (node-a, node-b) has an endpoint
/// on each node: the clients of both nodes reach both; zone-2's client on node-c reaches only
/// the zone's endpoint on node-d; node-c then moved to zone-3 (its Node relabelled), which has
/// no endpoint, reaches every endpoint. Clients: a pod per node (socket balancing and TC path)
/// and the node's own processes.
#[test]
fn traffic_distribution_should_route_traffic_correctly_between_pods_on_multiple_nodes_when_using_prefer_close(
) {
    let endpoints: [Hinted; 3] =
        [("server-a", &["zone-1"], &[]), ("server-b", &["zone-1"], &[]), ("server-d", &["zone-2"], &[])];
    let mut c = four_nodes(|_| String::new());
    let target = SocketAddrV4::new(DIST_IP, 80);
    for distribution in ["PreferClose", "PreferSameZone"] {
        c.zones[2] = Some("zone-2");
        let objects = dist_service(distribution) + &http_slice(&c, "traffic-dist-test-service", &endpoints);
        c.set(&objects);
        for node in [0, 1] {
            node_reaches(&c, node, target, &["server-a", "server-b"], distribution);
        }
        node_reaches(&c, 2, target, &["server-d"], distribution);
        node_reaches(&c, 3, target, &["server-d"], distribution);
        c.zones[2] = Some("zone-3");
        c.set(&objects);
        node_reaches(
            &c,
            2,
            target,
            &["server-a", "server-b", "server-d"],
            &format!("{distribution}, zone-3"),
        );
        node_reaches(&c, 0, target, &["server-a", "server-b"], &format!("{distribution}, zone-3"));
    }
}

/// `[sig-network] Traffic Distribution should route traffic to an endpoint on the same node or
/// fall back to same zone when using PreferSameNode`: the controller hints each endpoint for
/// its node (`hints.forNodes`) and its zone. Zone-1's clients (node-a, node-b) each reach only
/// the endpoint on their own node; zone-2's client on node-c, with no endpoint on its node,
/// falls back to the zone's endpoint on node-d; node-c moved to zone-3, without any endpoint,
/// reaches them all.
#[test]
fn traffic_distribution_should_route_traffic_to_an_endpoint_on_the_same_node_or_fall_back_to_same_zone_when_using_prefer_same_node(
) {
    let mut c = four_nodes(|_| String::new());
    let endpoints: [Hinted; 3] = [
        ("server-a", &["zone-1"], &[c.tb.nodes[0].name.as_str()]),
        ("server-b", &["zone-1"], &[c.tb.nodes[1].name.as_str()]),
        ("server-d", &["zone-2"], &[c.tb.nodes[3].name.as_str()]),
    ];
    let objects = dist_service("PreferSameNode") + &http_slice(&c, "traffic-dist-test-service", &endpoints);
    c.set(&objects);
    let target = SocketAddrV4::new(DIST_IP, 80);
    node_reaches(&c, 0, target, &["server-a"], "same node");
    node_reaches(&c, 1, target, &["server-b"], "same node");
    node_reaches(&c, 2, target, &["server-d"], "same zone");
    node_reaches(&c, 3, target, &["server-d"], "same node");
    c.zones[2] = Some("zone-3");
    c.set(&objects);
    node_reaches(&c, 2, target, &["server-a", "server-b", "server-d"], "no endpoint in zone-3");
}

/// `[sig-network] Traffic Distribution should route traffic to an endpoint on the same node
/// when using PreferSameNode and fall back when the endpoint becomes unavailable`: a server and
/// a client on each of two nodes; each client reaches only its node's server; node-a's server
/// deleted (the slice keeps node-b's, hinted for node-b), node-a's client reaches node-b's;
/// recreated, each client reaches only its own node's again.
#[test]
fn traffic_distribution_should_route_traffic_to_an_endpoint_on_the_same_node_when_using_prefer_same_node_and_fall_back_when_the_endpoint_becomes_unavailable(
) {
    let mut c = Cluster::up(
        &[Some("zone-1"), Some("zone-1")],
        &[("server-a", 0), ("server-b", 1), ("client-a", 0), ("client-b", 1)],
        &[POD_PORT],
        |_| String::new(),
    );
    let (a, b) = (c.tb.nodes[0].name.clone(), c.tb.nodes[1].name.clone());
    let server_a: Hinted = ("server-a", &["zone-1"], &[a.as_str()]);
    let server_b: Hinted = ("server-b", &["zone-1"], &[b.as_str()]);
    let objects = |c: &Cluster, endpoints: &[Hinted]| {
        dist_service("PreferSameNode") + &http_slice(c, "traffic-dist-test-service", endpoints)
    };
    let target = SocketAddrV4::new(DIST_IP, 80);
    let both = objects(&c, &[server_a, server_b]);
    let only_b = objects(&c, &[server_b]);
    for (phase, objects, from_a) in [
        ("both endpoints", &both, "server-a"),
        ("node-a's endpoint deleted", &only_b, "server-b"),
        ("node-a's endpoint recreated", &both, "server-a"),
    ] {
        c.set(objects);
        node_reaches(&c, 0, target, &[from_a], phase);
        node_reaches(&c, 1, target, &["server-b"], phase);
    }
}

// ---------------------------------------------------------------------------------------
// endpointslice.go

/// `[sig-network] EndpointSlice should support a Service with multiple ports specified in
/// multiple EndpointSlices` and `... should support a Service with multiple endpoint IPs
/// specified in multiple EndpointSlices` (Conformance): Services without selector whose two
/// ports (port80: 80, port81: 81) come from two hand-written slices. With one pod in both
/// slices (8090 in the first, 9090 in the second) both ports reach it, each on its own target
/// port (the nodes' maps); with pod1 in the first slice and pod2 in the second, port 80 reaches
/// only pod1 on 8090 and port 81 only pod2 on 9090. From a pod (both paths) and a node process.
#[test]
fn endpoint_slice_should_support_a_service_with_multiple_ports_specified_in_multiple_endpoint_slices() {
    const SAME_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 31, 10);
    const TWO_IPS: Ipv4Addr = Ipv4Addr::new(198, 19, 31, 11);
    let ports: [Port; 2] = [("port80", 80, 80, None, "TCP"), ("port81", 81, 81, None, "TCP")];
    let mut c = Cluster::up(
        &[None, None],
        &[("pod1", 0), ("pod2", 1), ("execpod", 0)],
        &[POD_PORT, 8090, 9090],
        |_| String::new(),
    );
    let objects = service_yaml("example-custom-endpoints", "ClusterIP", SAME_IP, &ports, "")
        + &slice_yaml(
            &c,
            "example-custom-endpoints",
            "e2e-custom-slice",
            &[("port80", 8090)],
            &[("pod1", &[], &[])],
        )
        + &slice_yaml(
            &c,
            "example-custom-endpoints",
            "e2e-custom-slice2",
            &[("port81", 9090)],
            &[("pod1", &[], &[])],
        )
        + &service_yaml("example-multi-ips", "ClusterIP", TWO_IPS, &ports, "")
        + &slice_yaml(
            &c,
            "example-multi-ips",
            "e2e-multi-ips-slice",
            &[("port80", 8090)],
            &[("pod1", &[], &[])],
        )
        + &slice_yaml(
            &c,
            "example-multi-ips",
            "e2e-multi-ips-slice2",
            &[("port81", 9090)],
            &[("pod2", &[], &[])],
        );
    c.set(&objects);
    let (pod1, pod2) = (pod_ip(&c.tb, "pod1"), pod_ip(&c.tb, "pod2"));
    for (ip, port, pod, backend) in [
        (SAME_IP, 80, "pod1", (pod1, 8090)),
        (SAME_IP, 81, "pod1", (pod1, 9090)),
        (TWO_IPS, 80, "pod1", (pod1, 8090)),
        (TWO_IPS, 81, "pod2", (pod2, 9090)),
    ] {
        for node in 0..2 {
            let key = ServiceKey::new(ip, port, proto::TCP);
            assert_eq!(c.internal_backends(node, key), [backend].into(), "{ip}:{port} on node {node}");
        }
        for from in [Client::Pod("execpod"), Client::PodTc("execpod"), Client::Node(0), Client::Node(1)] {
            reaches(&c.tb, from, Proto::Tcp, SocketAddrV4::new(ip, port), &[pod], "multiple slices");
        }
    }
}

// ---------------------------------------------------------------------------------------
// loadbalancer.go: LoadBalancers

const LB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 40, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 240, 10);

/// `mutability-test` as `[sig-network] LoadBalancers should be able to change the type and
/// ports of a TCP service` / `... of a UDP service` run it: ClusterIP (reached from a pod),
/// NodePort (also the nodePort on both nodes, from the pod and the external client),
/// LoadBalancer (also the ingress IP from the external client), the nodePort changed (the new
/// one answers, the old one no longer), the port changed (the ingress IP answers on the new
/// port, not on the old one), scaled to 0 (the ingress IP does not answer; UDP: ICMP port
/// unreachable, kube-proxy's REJECT), scaled to 1, back to ClusterIP (the ingress IP and the
/// nodePort closed, the ClusterIP still served).
fn change_type_and_ports(protocol: Proto) {
    let (name, proto_name) = match protocol {
        Proto::Tcp => ("tcp", "TCP"),
        Proto::Udp => ("udp", "UDP"),
    };
    let ports =
        |port: u16, node_port: Option<u16>| -> [Port; 1] { [(name, port, POD_PORT, node_port, proto_name)] };
    let slice = |c: &Cluster, pods: &[&str]| {
        let endpoints: Vec<Hinted> = pods.iter().map(|p| (*p, &[][..], &[][..])).collect();
        let yaml = slice_yaml(c, "mutability-test", "mutability-test-abcde", &[(name, POD_PORT)], &endpoints);
        yaml.replace("protocol: TCP", &format!("protocol: {proto_name}"))
    };
    let mut c = Cluster::up(&[None, None], &[("web-0", 1), ("execpod", 0)], &[POD_PORT], |_| String::new());
    let pods = ["web-0"];
    let reach = |c: &Cluster, from: Client, target: SocketAddrV4, phase: &str| {
        reaches(&c.tb, from, protocol, target, &pods, phase);
    };
    let service_reachable = |c: &Cluster, port: u16, node_port: Option<u16>, phase: &str| {
        for from in [Client::Pod("execpod"), Client::PodTc("execpod")] {
            reach(c, from, SocketAddrV4::new(LB_CLUSTER_IP, port), phase);
        }
        if let Some(node_port) = node_port {
            for node in 0..2 {
                for from in [Client::External, Client::Pod("execpod")] {
                    reach(c, from, SocketAddrV4::new(c.node_ip(node), node_port), phase);
                }
            }
        }
    };

    c.set(
        &(service_yaml("mutability-test", "ClusterIP", LB_CLUSTER_IP, &ports(80, None), "")
            + &slice(&c, &pods)),
    );
    service_reachable(&c, 80, None, "ClusterIP");

    c.set(
        &(service_yaml("mutability-test", "NodePort", LB_CLUSTER_IP, &ports(80, Some(30500)), "")
            + &slice(&c, &pods)),
    );
    service_reachable(&c, 80, Some(30500), "NodePort");

    let lb = |c: &Cluster, port: u16, node_port: u16, pods: &[&str]| {
        lb_yaml("mutability-test", LB_CLUSTER_IP, &ports(port, Some(node_port)), "", LB_IP) + &slice(c, pods)
    };
    c.set(&lb(&c, 80, 30500, &pods));
    service_reachable(&c, 80, Some(30500), "LoadBalancer");
    reach(&c, Client::External, SocketAddrV4::new(LB_IP, 80), "LoadBalancer: the ingress IP");

    c.set(&lb(&c, 80, 30501, &pods));
    service_reachable(&c, 80, Some(30501), "nodePort changed");
    reach(&c, Client::External, SocketAddrV4::new(LB_IP, 80), "nodePort changed: the ingress IP");
    fails(&c.tb, Client::External, protocol, SocketAddrV4::new(c.node_ip(0), 30500), "the old nodePort");

    c.set(&lb(&c, 81, 30501, &pods));
    service_reachable(&c, 81, Some(30501), "port changed");
    reach(&c, Client::External, SocketAddrV4::new(LB_IP, 81), "port changed: the ingress IP");
    fails(&c.tb, Client::External, protocol, SocketAddrV4::new(LB_IP, 80), "port changed: the old port");

    c.set(&lb(&c, 81, 30501, &[]));
    let err = fails(&c.tb, Client::External, protocol, SocketAddrV4::new(LB_IP, 81), "scaled to 0");
    if protocol == Proto::Udp {
        assert!(err.to_lowercase().contains("refused"), "scaled to 0: want ICMP port unreachable, got {err}");
    }

    c.set(&lb(&c, 81, 30501, &pods));
    reach(&c, Client::External, SocketAddrV4::new(LB_IP, 81), "scaled to 1: the ingress IP");
    service_reachable(&c, 81, Some(30501), "scaled to 1");

    c.set(
        &(service_yaml("mutability-test", "ClusterIP", LB_CLUSTER_IP, &ports(81, None), "")
            + &slice(&c, &pods)),
    );
    service_reachable(&c, 81, None, "back to ClusterIP");
    fails(
        &c.tb,
        Client::External,
        protocol,
        SocketAddrV4::new(LB_IP, 81),
        "back to ClusterIP: the ingress IP",
    );
    fails(
        &c.tb,
        Client::External,
        protocol,
        SocketAddrV4::new(c.node_ip(0), 30501),
        "back to ClusterIP: the nodePort",
    );
}

/// `[sig-network] LoadBalancers should be able to change the type and ports of a TCP service`:
/// see `change_type_and_ports`.
#[test]
fn load_balancers_should_be_able_to_change_the_type_and_ports_of_a_tcp_service() {
    change_type_and_ports(Proto::Tcp);
}

/// `[sig-network] LoadBalancers should be able to change the type and ports of a UDP service`:
/// see `change_type_and_ports`.
#[test]
fn load_balancers_should_be_able_to_change_the_type_and_ports_of_a_udp_service() {
    change_type_and_ports(Proto::Udp);
}

/// `[sig-network] LoadBalancers should be able to create LoadBalancer Service without NodePort
/// and change it`: a ClusterIP Service changed to LoadBalancer with
/// `allocateLoadBalancerNodePorts: false` is reached on its ingress IP and has no nodePort
/// frontend on either node; given a nodePort, it is reached on the ingress IP and the nodePort.
#[test]
fn load_balancers_should_be_able_to_create_load_balancer_service_without_node_port_and_change_it() {
    let mut c = Cluster::up(&[None, None], &[("web-0", 1)], &[POD_PORT], |_| String::new());
    let slice = http_slice(&c, "reallocate-nodeport-test", &[("web-0", &[], &[])]);
    c.set(
        &(service_yaml(
            "reallocate-nodeport-test",
            "ClusterIP",
            LB_CLUSTER_IP,
            &[("http", 80, POD_PORT, None, "TCP")],
            "",
        ) + &slice),
    );
    reaches(
        &c.tb,
        Client::Node(0),
        Proto::Tcp,
        SocketAddrV4::new(LB_CLUSTER_IP, 80),
        &["web-0"],
        "ClusterIP",
    );
    let without = lb_yaml(
        "reallocate-nodeport-test",
        LB_CLUSTER_IP,
        &[("http", 80, POD_PORT, None, "TCP")],
        "  allocateLoadBalancerNodePorts: false\n",
        LB_IP,
    );
    c.set(&(without + &slice));
    reaches(
        &c.tb,
        Client::External,
        Proto::Tcp,
        SocketAddrV4::new(LB_IP, 80),
        &["web-0"],
        "without nodePort",
    );
    for node in 0..2 {
        let key = ServiceKey::new(c.node_ip(node), 30510, proto::TCP);
        assert!(programmed(&c.tb, node, key).is_none(), "no nodePort yet");
    }
    let with = lb_yaml(
        "reallocate-nodeport-test",
        LB_CLUSTER_IP,
        &[("http", 80, POD_PORT, Some(30510), "TCP")],
        "  allocateLoadBalancerNodePorts: true\n",
        LB_IP,
    );
    c.set(&(with + &slice));
    reaches(&c.tb, Client::External, Proto::Tcp, SocketAddrV4::new(LB_IP, 80), &["web-0"], "with nodePort");
    for node in 0..2 {
        let target = SocketAddrV4::new(c.node_ip(node), 30510);
        reaches(&c.tb, Client::External, Proto::Tcp, target, &["web-0"], "the new nodePort");
    }
}

/// `[sig-network] LoadBalancers should only allow access from service loadbalancer source
/// ranges`: a LoadBalancer whose `loadBalancerSourceRanges` holds only `execpod-accept`'s
/// address is reached on its ingress IP by that pod and not by `execpod-drop`; the ranges
/// changed to `execpod-drop`'s address, the other way round; the ranges deleted, both reach
/// it. As kube-proxy applies the ranges to traffic to the ingress IP from anywhere (its
/// firewall chain sits in PREROUTING and OUTPUT), the pods are checked through socket balancing
/// and through their veth's TC path, and so are a node process (allowed only while the node's
/// address is in the ranges) and the external client (never in them until they are deleted).
/// The nodePort is never filtered. Fixed: xlb applied the ranges to outside clients only, so
/// pods and node processes outside them reached the Service.
#[test]
fn load_balancers_should_only_allow_access_from_service_loadbalancer_source_ranges() {
    let mut c = Cluster::up(
        &[None, None],
        &[("web-0", 1), ("execpod-accept", 0), ("execpod-drop", 1)],
        &[POD_PORT],
        |_| String::new(),
    );
    let ports: [Port; 1] = [("http", 80, POD_PORT, Some(30520), "TCP")];
    let slice = http_slice(&c, "lb-sourcerange", &[("web-0", &[], &[])]);
    let objects = |ranges: &[String]| {
        let extra = if ranges.is_empty() {
            String::new()
        } else {
            "  loadBalancerSourceRanges:\n".to_string()
                + &ranges.iter().map(|r| format!("  - {r}\n")).collect::<String>()
        };
        lb_yaml("lb-sourcerange", LB_CLUSTER_IP, &ports, &extra, LB_IP) + &slice
    };
    let accept = format!("{}/32", pod_ip(&c.tb, "execpod-accept"));
    let drop = format!("{}/32", pod_ip(&c.tb, "execpod-drop"));
    let node_a = format!("{}/32", c.node_ip(0));
    let target = SocketAddrV4::new(LB_IP, 80);
    let pods = |name: &'static str| [Client::Pod(name), Client::PodTc(name)];
    for (phase, ranges, allowed, denied) in [
        (
            "accept only",
            vec![accept.clone()],
            pods("execpod-accept").to_vec(),
            [&pods("execpod-drop")[..], &[Client::Node(0), Client::Node(1), Client::External]].concat(),
        ),
        (
            "drop only",
            vec![drop.clone()],
            pods("execpod-drop").to_vec(),
            [&pods("execpod-accept")[..], &[Client::Node(0), Client::Node(1), Client::External]].concat(),
        ),
        (
            "drop and node-a",
            vec![drop.clone(), node_a],
            [&pods("execpod-drop")[..], &[Client::Node(0)]].concat(),
            [&pods("execpod-accept")[..], &[Client::Node(1), Client::External]].concat(),
        ),
        (
            "ranges deleted",
            vec![],
            [
                &pods("execpod-accept")[..],
                &pods("execpod-drop"),
                &[Client::Node(0), Client::Node(1), Client::External],
            ]
            .concat(),
            vec![],
        ),
    ] {
        c.set(&objects(&ranges));
        for from in allowed {
            reaches(&c.tb, from, Proto::Tcp, target, &["web-0"], phase);
        }
        for from in denied {
            fails(&c.tb, from, Proto::Tcp, target, phase);
        }
        for node in 0..2 {
            let node_port = SocketAddrV4::new(c.node_ip(node), 30520);
            reaches(
                &c.tb,
                Client::External,
                Proto::Tcp,
                node_port,
                &["web-0"],
                &format!("{phase}: nodePort"),
            );
        }
    }
}

/// `[sig-network] LoadBalancers should have session affinity work for LoadBalancer service with
/// ESIPP on` and `... with ESIPP off`, `... should be able to switch session affinity for
/// LoadBalancer service with ESIPP on` and `... with ESIPP off`: a LoadBalancer with
/// `sessionAffinity: ClientIP` and two endpoints on node-a (where the external client's traffic
/// to the ingress IP arrives) and one on node-b: every new connection of the client goes to one
/// pod; switched to `None`, the client reaches every endpoint its policy allows (node-a's two
/// with Local, all three with Cluster); switched back, it sticks to one pod again.
#[test]
fn load_balancers_should_have_session_affinity_work_for_load_balancer_service_with_esipp_on() {
    let mut c = Cluster::up(&[None, None], &[("web-0", 0), ("web-1", 0), ("web-2", 1)], &[POD_PORT], |_| {
        String::new()
    });
    let ports: [Port; 1] = [("http", 80, POD_PORT, Some(30530), "TCP")];
    let endpoints: [Hinted; 3] = [("web-0", &[], &[]), ("web-1", &[], &[]), ("web-2", &[], &[])];
    let slice = http_slice(&c, "affinity-lb", &endpoints);
    let target = SocketAddrV4::new(LB_IP, 80);
    for (policy, spread) in
        [("Local", &["web-0", "web-1"][..]), ("Cluster", &["web-0", "web-1", "web-2"][..])]
    {
        let objects = |affinity: &str| {
            let hc = if policy == "Local" { "  healthCheckNodePort: 32530\n" } else { "" };
            let extra = format!("  externalTrafficPolicy: {policy}\n{hc}  sessionAffinity: {affinity}\n");
            lb_yaml("affinity-lb", LB_CLUSTER_IP, &ports, &extra, LB_IP) + &slice
        };
        for affinity in ["ClientIP", "None", "ClientIP"] {
            let phase = format!("externalTrafficPolicy {policy}, sessionAffinity {affinity}");
            c.set(&objects(affinity));
            if affinity == "None" {
                reaches(&c.tb, Client::External, Proto::Tcp, target, spread, &phase);
                continue;
            }
            let first = ask(&c.tb, Client::External, Proto::Tcp, target, ANSWER_TIMEOUT)
                .unwrap_or_else(|e| panic!("{phase}: {e}"))
                .pod;
            assert!(spread.contains(&first.as_str()), "{phase}: answered by {first}");
            // Without affinity, 28 connections stay on one of two pods with probability 2^-27.
            for _ in 0..checks::connections_to_reach_all(2) {
                let pod = ask(&c.tb, Client::External, Proto::Tcp, target, ANSWER_TIMEOUT)
                    .unwrap_or_else(|e| panic!("{phase}: {e}"))
                    .pod;
                assert_eq!(pod, first, "{phase}: affinity");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// loadbalancer.go: LoadBalancers ESIPP

const HC_PORT: u16 = 32540;

fn esipp_yaml(name: &str, policy: &str, node_port: u16) -> String {
    let ports: [Port; 1] = [("http", 80, POD_PORT, Some(node_port), "TCP")];
    let hc = if policy == "Local" { format!("  healthCheckNodePort: {HC_PORT}\n") } else { String::new() };
    lb_yaml(name, LB_CLUSTER_IP, &ports, &format!("  externalTrafficPolicy: {policy}\n{hc}"), LB_IP)
}

/// `[sig-network] LoadBalancers ESIPP should only target nodes with endpoints`, `... should work
/// for type=LoadBalancer`, `... should work for type=NodePort` and `... should work from pods`:
/// an `externalTrafficPolicy: Local` LoadBalancer with its endpoint on one node, then on the
/// other: its `healthCheckNodePort` answers 200 on the endpoint's node and 503 on the other;
/// the ingress IP, sent by the client to the node passing the health check, is answered and the
/// endpoint sees the client's own address; a pod (the e2e test container) reaching the
/// endpoint's node on the nodePort is seen with its own address; a pod reaching the ingress
/// IP is answered (Cluster policy for the cluster's own traffic) and seen with its address.
#[test]
fn load_balancers_esipp_should_only_target_nodes_with_endpoints() {
    let mut c =
        Cluster::up(&[None, None], &[("web-a", 0), ("web-b", 1), ("execpod", 0)], &[POD_PORT], |_| {
            String::new()
        });
    let target = SocketAddrV4::new(LB_IP, 80);
    let execpod = pod_ip(&c.tb, "execpod");
    for (endpoint_node, server) in [(0, "web-a"), (1, "web-b")] {
        let phase = format!("endpoint on {}", c.tb.nodes[endpoint_node].name);
        let objects = esipp_yaml("external-local-nodes", "Local", 30540)
            + &http_slice(&c, "external-local-nodes", &[(server, &[], &[])]);
        c.set(&objects);
        for node in 0..2 {
            let want = if node == endpoint_node { 200 } else { 503 };
            expect_health(&c, node, HC_PORT, Some(want), &phase);
        }
        c.route_client_via(LB_IP, 32, endpoint_node);
        for reply in reaches(&c.tb, Client::External, Proto::Tcp, target, &[server], &phase) {
            assert_eq!(
                reply.client.ip(),
                c.tb.client_ip,
                "{phase}: source IP preserved through the ingress IP"
            );
        }
        let node_port = SocketAddrV4::new(c.node_ip(endpoint_node), 30540);
        for from in [Client::Pod("execpod"), Client::PodTc("execpod")] {
            for reply in reaches(&c.tb, from, Proto::Tcp, node_port, &[server], &format!("{phase}: nodePort"))
            {
                assert_eq!(reply.client.ip(), execpod, "{phase}: source IP preserved on the nodePort");
            }
            for reply in reaches(&c.tb, from, Proto::Tcp, target, &[server], &format!("{phase}: from a pod"))
            {
                assert_eq!(reply.client.ip(), execpod, "{phase}: source IP preserved from a pod");
            }
        }
    }
}

/// `[sig-network] LoadBalancers ESIPP should handle updates to ExternalTrafficPolicy field`: an
/// `externalTrafficPolicy: Local` LoadBalancer with its endpoint on node-b, turned to Cluster:
/// its `healthCheckNodePort` closes on both nodes, node-a (no endpoint) proxies its nodePort
/// to node-b, and the ingress IP sent through node-a reaches the endpoint with the node's
/// address as source (not the client's); turned back to Local with the same
/// `healthCheckNodePort`, the health check answers again (200 on node-b) and the ingress IP,
/// sent to node-b, reaches the endpoint with the client's own address.
#[test]
fn load_balancers_esipp_should_handle_updates_to_external_traffic_policy_field() {
    let mut c = Cluster::up(&[None, None], &[("web-b", 1)], &[POD_PORT], |_| String::new());
    let slice = http_slice(&c, "external-local-update", &[("web-b", &[], &[])]);
    let target = SocketAddrV4::new(LB_IP, 80);
    c.set(&(esipp_yaml("external-local-update", "Local", 30550) + &slice));
    expect_health(&c, 1, HC_PORT, Some(200), "Local");
    expect_health(&c, 0, HC_PORT, Some(503), "Local");

    c.set(&(esipp_yaml("external-local-update", "Cluster", 30550) + &slice));
    for node in 0..2 {
        expect_health(&c, node, HC_PORT, None, "Cluster: closed");
    }
    let node_port = SocketAddrV4::new(c.node_ip(0), 30550);
    reaches(&c.tb, Client::External, Proto::Tcp, node_port, &["web-b"], "Cluster: node-a's nodePort");
    c.route_client_via(LB_IP, 32, 0);
    for reply in
        reaches(&c.tb, Client::External, Proto::Tcp, target, &["web-b"], "Cluster: ingress IP via node-a")
    {
        assert_eq!(reply.client.ip(), c.node_ip(0), "Cluster: source IP not preserved");
    }

    c.set(&(esipp_yaml("external-local-update", "Local", 30550) + &slice));
    expect_health(&c, 1, HC_PORT, Some(200), "back to Local");
    expect_health(&c, 0, HC_PORT, Some(503), "back to Local");
    c.route_client_via(LB_IP, 32, 1);
    for reply in
        reaches(&c.tb, Client::External, Proto::Tcp, target, &["web-b"], "Local: ingress IP via node-b")
    {
        assert_eq!(reply.client.ip(), c.tb.client_ip, "back to Local: source IP preserved");
    }
}

/// `[sig-network] LoadBalancers should not have connectivity disruption during rolling update
/// with externalTrafficPolicy=Cluster` and `... =Local`: a LoadBalancer over one pod per node
/// (a DaemonSet) is hit by the external client without pause (one new connection every 20 ms,
/// through node-a as the load balancer sends it) while the DaemonSet is rolled twice, node by
/// node, as its controller and kubelet do it: the old pod terminating (`serving`, not ready:
/// it keeps serving for its grace period) beside the new one not ready yet, then the new one
/// ready, then the old one gone, each state held until 5 requests were made in it. Every
/// request must be answered (the e2e test accepts 95%):
/// with Local policy node-a falls back to its terminating endpoint while it has no ready one.
fn rolling_update(policy: &str) {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    };
    use xlb_tests::services::{slice_yaml as state_slice, State};
    let mut c = Cluster::up(
        &[None, None],
        &[("old-a", 0), ("new-a", 0), ("old-b", 1), ("new-b", 1)],
        &[POD_PORT],
        |_| String::new(),
    );
    let ports: [Port; 1] = [("http", 80, POD_PORT, Some(30560), "TCP")];
    let hc = if policy == "Local" { format!("  healthCheckNodePort: {HC_PORT}\n") } else { String::new() };
    let service = lb_yaml(
        "test-lb-rolling-update",
        LB_CLUSTER_IP,
        &ports,
        &format!("  externalTrafficPolicy: {policy}\n{hc}"),
        LB_IP,
    );
    let objects = |c: &Cluster, endpoints: &[(&str, State)]| {
        service.clone() + &state_slice(&c.tb, "test-lb-rolling-update", &ports, endpoints)
    };
    c.set(&objects(&c, &[("old-a", State::Ready), ("old-b", State::Ready)]));
    let target = SocketAddrV4::new(LB_IP, 80);
    let first = if policy == "Local" { &["old-a"][..] } else { &["old-a", "old-b"][..] };
    reaches(&c.tb, Client::External, Proto::Tcp, target, first, "before the update");

    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicUsize::new(0));
    let hitting = {
        let (stop, made) = (stop.clone(), made.clone());
        netns::spawn(&c.tb.client, move || {
            let (mut answered, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match kiada::get(target, ANSWER_TIMEOUT) {
                    Ok(_) => answered += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
                made.fetch_add(1, Ordering::Relaxed);
                // The request rate, not a synchronisation.
                thread::sleep(Duration::from_millis(20));
            }
            (answered, failed)
        })
        .expect("client thread")
    };
    // Each pod's state in the slice; None: no pod (not created yet, or gone).
    let mut state: Vec<(&str, Option<State>)> =
        vec![("old-a", Some(State::Ready)), ("new-a", None), ("old-b", Some(State::Ready)), ("new-b", None)];
    for round in 0..2 {
        for node in [0, 1] {
            let (old, new) = if round == 0 { (node * 2, node * 2 + 1) } else { (node * 2 + 1, node * 2) };
            for (old_state, new_state) in [
                (Some(State::Terminating), Some(State::NotReady)),
                (Some(State::Terminating), Some(State::Ready)),
                (None, Some(State::Ready)),
            ] {
                state[old].1 = old_state;
                state[new].1 = new_state;
                let endpoints: Vec<(&str, State)> =
                    state.iter().filter_map(|(pod, s)| s.map(|s| (*pod, s))).collect();
                c.set(&objects(&c, &endpoints));
                // Every state gets its requests: at least 5 made after the agents applied it.
                let before = made.load(Ordering::Relaxed);
                checks::eventually("requests in this state", CHANGE_TIMEOUT, || {
                    anyhow::ensure!(made.load(Ordering::Relaxed) >= before + 5, "waiting for requests");
                    Ok(())
                });
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (answered, failed) = hitting.join().expect("client thread").expect("client namespace");
    assert!(
        failed.is_empty(),
        "{policy}: {} of {} requests failed, first: {:?}",
        failed.len(),
        answered + failed.len(),
        failed.first()
    );
    assert!(answered >= 60, "{policy}: only {answered} requests made during the updates");
    let last = if policy == "Local" { &["old-a"][..] } else { &["old-a", "old-b"][..] };
    reaches(&c.tb, Client::External, Proto::Tcp, target, last, "after two updates");
}

/// `[sig-network] LoadBalancers should not have connectivity disruption during rolling update
/// with externalTrafficPolicy=Cluster`: see `rolling_update`.
#[test]
fn load_balancers_should_not_have_connectivity_disruption_during_rolling_update_with_external_traffic_policy_cluster(
) {
    rolling_update("Cluster");
}

/// `[sig-network] LoadBalancers should not have connectivity disruption during rolling update
/// with externalTrafficPolicy=Local`: see `rolling_update`.
#[test]
fn load_balancers_should_not_have_connectivity_disruption_during_rolling_update_with_external_traffic_policy_local(
) {
    rolling_update("Local");
}
