//! Kubernetes' `[sig-network] Networking` e2e tests that send traffic through a Service
//! (test/e2e/network/networking.go, mostly `Granular Checks: Services`) as xlb integration
//! tests: each test is named after an e2e test, quotes the names of those it stands for and
//! checks what they check of the proxy, with real traffic through the agents of the namespace
//! cluster.
//!
//! The e2e tests build one `NetworkingTestConfig`: netserver pods on every node (the
//! endpoints, answering HTTP and UDP on 8080), a test container pod, and a NodePort Service
//! with an http port (80) and a udp port (90), plus a ClusterIP Service with ClientIP session
//! affinity. Here the netservers are kiada pods on both nodes and the Services and
//! EndpointSlices are written as the controllers would write them into the agents' manifests
//! directory. Clients are a pod (its TCP through the socket programs, its UDP through its
//! veth's TC path), the same pod outside the cgroup (everything at TC), an endpoint pod (its
//! own Service: hairpin), the nodes' own processes (socket balancing, as a hostNetwork pod)
//! and the external client. Every change is followed by a barrier, not a sleep: the change
//! carries a new version of a marker Service, and a node has applied it once its maps hold
//! that version.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Stdio},
    time::Duration,
};

use lb_common::{proto, service::ServiceKey};
use xlb_tests::{
    bin_path,
    checks::{self, node_get, nodes_yaml},
    e2e::{
        self, addresses, ask, fails, pod_clients, service_reachable, service_unreachable, within, Client,
        Proto, ANSWER_TIMEOUT,
    },
    kiada,
    services::{pod_ip, programmed, service_yaml, slice_yaml, Port, State, CHANGE_TIMEOUT, START_TIMEOUT},
    testbed::{Spec, Testbed},
};

/// The port every netserver serves, over TCP and UDP.
const POD_PORT: u16 = 8080;
/// The e2e framework's ClusterHTTPPort and ClusterUDPPort.
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 90;
/// The nodePorts of the test Service.
const NODE_HTTP_PORT: u16 = 30081;
const NODE_UDP_PORT: u16 = 30091;
/// The test Service (`node-port-service`) and the session affinity one.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 10);
const AFFINITY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 11);
const SERVICE: &str = "node-port-service";
const AFFINITY_SERVICE: &str = "session-affinity-service";
/// The netservers, on node-a and node-b, and the test container pod, on node-a.
const NETSERVERS: [&str; 2] = ["netserver-0", "netserver-1"];
const TEST_POD: &str = "test-container-pod";
/// Requests per client in a check that only one endpoint answers (the e2e's
/// SessionAffinityChecks is 10): without affinity, 20 requests over two endpoints all reach
/// the same one with probability 2^-19.
const AFFINITY_CHECKS: usize = 20;
/// The e2e's large requests: an HTTP request of 2000 bytes and a UDP datagram of 2000 bytes,
/// more than the 1500-byte MTU of every link here (the datagram goes as IPv4 fragments).
const LARGE: usize = 2000;

fn http_port(node_port: u16) -> Port {
    ("http", HTTP_PORT, POD_PORT, Some(node_port), "TCP")
}
fn udp_port(node_port: u16) -> Port {
    ("udp", UDP_PORT, POD_PORT, Some(node_port), "UDP")
}
const PORTS: [Port; 2] = [
    ("http", HTTP_PORT, POD_PORT, Some(NODE_HTTP_PORT), "TCP"),
    ("udp", UDP_PORT, POD_PORT, Some(NODE_UDP_PORT), "UDP"),
];

// ---------------------------------------------------------------------------------------
// The cluster and its objects

/// A namespace cluster of two nodes whose agents read the manifests directory.
struct Cluster {
    tb: Testbed,
    version: u8,
}

impl Cluster {
    /// The netservers, the test container pod and `extra_pods` (name, node index), each
    /// serving TCP and UDP `POD_PORT`, and agents that have programmed `objects`.
    fn up(extra_pods: &[(&str, usize)], objects: impl FnOnce(&Testbed) -> String) -> Self {
        let mut pods: Vec<(String, usize)> =
            vec![(NETSERVERS[0].into(), 0), (NETSERVERS[1].into(), 1), (TEST_POD.into(), 0)];
        pods.extend(extra_pods.iter().map(|(name, node)| (name.to_string(), *node)));
        let spec = Spec { nodes: 2, pods, tcp_ports: vec![POD_PORT], udp_ports: vec![POD_PORT] };
        let tb = Testbed::up(&spec).expect("testbed");
        let mut c = Self { tb, version: 0 };
        let objects = objects(&c.tb);
        c.write(&objects);
        for i in 0..c.tb.nodes.len() {
            c.tb.start_agent(i).expect("agent");
        }
        c.synced(START_TIMEOUT);
        c
    }

    /// Makes `objects` (YAML documents; the Nodes are added) the cluster's objects and waits
    /// until every agent has applied them.
    fn set(&mut self, objects: &str) {
        self.write(objects);
        self.synced(CHANGE_TIMEOUT);
    }

    fn write(&mut self, objects: &str) {
        self.version += 1;
        let docs = nodes_yaml(&self.tb) + objects + &e2e::marker_yaml(self.version);
        self.tb.write_manifest("e2e.yaml", &docs).expect("manifest");
    }

    /// Waits until every node's maps hold the marker of the last change.
    fn synced(&mut self, timeout: Duration) {
        e2e::wait_applied(&mut self.tb, self.version, timeout);
    }

    fn node_ip(&self, node: usize) -> Ipv4Addr {
        self.tb.nodes[node].ip
    }
}

/// The test Service `name` at `cluster_ip` with `ports` (`extra`: more of its spec) and its
/// EndpointSlice with the `endpoints` pods, all ready.
fn service_with_pods(
    tb: &Testbed,
    name: &str,
    cluster_ip: Ipv4Addr,
    ports: &[Port],
    extra: &str,
    endpoints: &[&str],
) -> String {
    let endpoints: Vec<(&str, State)> = endpoints.iter().map(|p| (*p, State::Ready)).collect();
    service_yaml(name, "NodePort", cluster_ip, ports, extra) + &slice_yaml(tb, name, ports, &endpoints)
}

/// The NetworkingTestConfig's Services: the test Service and the session affinity one (its
/// nodePorts 100 above), both with the netservers as endpoints.
fn config_objects(tb: &Testbed) -> String {
    let affinity = "  sessionAffinity: ClientIP\n";
    service_with_pods(tb, SERVICE, CLUSTER_IP, &PORTS, "", &NETSERVERS)
        + &service_with_pods(
            tb,
            AFFINITY_SERVICE,
            AFFINITY_IP,
            &[http_port(NODE_HTTP_PORT + 100), udp_port(NODE_UDP_PORT + 100)],
            affinity,
            &NETSERVERS,
        )
}

// ---------------------------------------------------------------------------------------
// Traffic

/// The e2e's large requests through `target_http` and `target_udp` from `from`, `count`
/// times each: a 2000-byte HTTP request (read whole by the server before it answers) and a
/// 2000-byte datagram echoed back intact (IPv4 fragments both ways); every one answered by
/// one of `pods`.
fn large_requests(
    c: &Cluster,
    from: Client,
    target_http: SocketAddrV4,
    target_udp: SocketAddrV4,
    pods: &[&str],
    count: usize,
) {
    for i in 0..count {
        let http = within(&c.tb, from, move || kiada::post(target_http, LARGE, ANSWER_TIMEOUT));
        let udp = within(&c.tb, from, move || kiada::udp_echo(target_udp, LARGE, ANSWER_TIMEOUT));
        for (what, answer) in [("http", http), ("udp", udp)] {
            match answer {
                Ok(reply) => assert!(
                    pods.contains(&reply.pod.as_str()),
                    "large {what} request {i} from {from:?} answered by {}",
                    reply.pod
                ),
                Err(e) => panic!("large {what} request {i} from {from:?}: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// pod-Service, node-Service, endpoint-Service

/// `[sig-network] Networking Granular Checks: Services should function for pod-Service: http`
/// and `... should function for pod-Service: udp`: the test container pod reaches both
/// netservers (one per node) through the ClusterIP (80/TCP, 90/UDP) and through every node's
/// nodePorts, by socket balancing and by its veth's TC path.
#[test]
fn networking_granular_checks_services_should_function_for_pod_service_http_and_udp() {
    let c = Cluster::up(&[], config_objects);
    service_reachable(&c.tb, CLUSTER_IP, &PORTS, &NETSERVERS, &pod_clients(TEST_POD), "pod-Service");
}

/// `[sig-network] Networking Granular Checks: Services should function for node-Service: http`,
/// `... should function for node-Service: udp` and `... should support basic nodePort: udp
/// functionality`: the nodes' own processes (a hostNetwork pod's) reach both netservers
/// through the ClusterIP and through every node's nodePorts, TCP and UDP; the external client
/// through the nodePorts too. With them `[sig-network] Networking should check kube-proxy
/// urls`: on every node the agent answers `/healthz` on 10256 with 200 and `lastUpdated`, and
/// `/proxyMode` on 10249 with 200 (`xlb`).
#[test]
fn networking_granular_checks_services_should_function_for_node_service_http_and_udp() {
    let c = Cluster::up(&[], config_objects);
    let clients = [Client::Node(0), Client::Node(1), Client::External];
    service_reachable(&c.tb, CLUSTER_IP, &PORTS, &NETSERVERS, &clients, "node-Service");
    for node in 0..c.tb.nodes.len() {
        let (status, body) = node_get(&c.tb, node, 10256, "/healthz").expect("/healthz");
        assert!(status == 200 && body.contains("lastUpdated"), "node {node} /healthz: {status} {body}");
        let (status, body) = node_get(&c.tb, node, checks::METRICS_PORT, "/proxyMode").expect("/proxyMode");
        assert_eq!((status, body.trim()), (200, "xlb"), "node {node} /proxyMode");
    }
}

/// `[sig-network] Networking Granular Checks: Services should function for endpoint-Service:
/// http`, `... should function for endpoint-Service: udp` and `... should function for
/// multiple endpoint-Services with same selector`: netserver-0, an endpoint of the Service,
/// reaches both netservers (itself included: hairpin) through the ClusterIP and every node's
/// nodePorts, by socket balancing and by its veth's TC path. A second NodePort Service with the
/// same endpoints is reached as well; once the first is deleted, the second still answers and
/// no address of the first does.
#[test]
fn networking_granular_checks_services_should_function_for_endpoint_service_http_and_udp() {
    const SECOND_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 12);
    const SECOND: &str = "node-port-service-2";
    let second_ports = [http_port(NODE_HTTP_PORT + 1), udp_port(NODE_UDP_PORT + 1)];
    let second = |tb: &Testbed| service_with_pods(tb, SECOND, SECOND_IP, &second_ports, "", &NETSERVERS);
    let mut c = Cluster::up(&[], config_objects);
    let clients = pod_clients(NETSERVERS[0]);
    service_reachable(&c.tb, CLUSTER_IP, &PORTS, &NETSERVERS, &clients, "endpoint-Service");

    c.set(&(config_objects(&c.tb) + &second(&c.tb)));
    service_reachable(&c.tb, CLUSTER_IP, &PORTS, &NETSERVERS, &clients, "two Services, the first");
    service_reachable(&c.tb, SECOND_IP, &second_ports, &NETSERVERS, &clients, "two Services, the second");

    c.set(&second(&c.tb));
    service_reachable(&c.tb, SECOND_IP, &second_ports, &NETSERVERS, &clients, "first deleted, the second");
    service_unreachable(&c.tb, CLUSTER_IP, &PORTS, &clients, "first deleted, the first");
}

// ---------------------------------------------------------------------------------------
// Updates

/// `[sig-network] Networking Granular Checks: Services should update endpoints: http` and
/// `... should update endpoints: udp`: the test container pod reaches both netservers through
/// the ClusterIP; netserver-0 is deleted and replaced by netserver-2 (the EndpointSlice
/// changes as the controller would change it): its address is gone from every node's maps,
/// and the ClusterIP is answered by netserver-1 and netserver-2 only, by socket balancing and
/// by the TC path, TCP and UDP.
#[test]
fn networking_granular_checks_services_should_update_endpoints_http_and_udp() {
    const REPLACEMENT: &str = "netserver-2";
    let mut c = Cluster::up(&[(REPLACEMENT, 0)], |tb| {
        service_with_pods(tb, SERVICE, CLUSTER_IP, &PORTS, "", &NETSERVERS)
    });
    let cluster_ip_only =
        [("http", HTTP_PORT, POD_PORT, None, "TCP"), ("udp", UDP_PORT, POD_PORT, None, "UDP")];
    let clients = pod_clients(TEST_POD);
    service_reachable(&c.tb, CLUSTER_IP, &cluster_ip_only, &NETSERVERS, &clients, "initial");

    let after = [NETSERVERS[1], REPLACEMENT];
    c.set(&service_with_pods(&c.tb, SERVICE, CLUSTER_IP, &PORTS, "", &after));
    let removed = pod_ip(&c.tb, NETSERVERS[0]);
    for node in 0..c.tb.nodes.len() {
        for key in [
            ServiceKey::new(CLUSTER_IP, HTTP_PORT, proto::TCP),
            ServiceKey::new(CLUSTER_IP, UDP_PORT, proto::UDP),
        ] {
            let p = programmed(&c.tb, node, key).expect("programmed");
            assert!(
                !p.internal.contains(&removed) && !p.external.contains(&removed) && p.internal.len() == 2,
                "node {node}: {} still among {p:?}",
                NETSERVERS[0]
            );
        }
    }
    service_reachable(&c.tb, CLUSTER_IP, &cluster_ip_only, &after, &clients, "endpoint recovery");
}

/// `[sig-network] Networking Granular Checks: Services should update nodePort: http` and
/// `... should update nodePort: udp`: a node's process and the external client reach both
/// netservers through every node's nodePorts; the nodePorts are changed, and the old ones
/// are refused while the new ones answer; the Service is deleted, and its nodePorts (and
/// ClusterIP) answer nobody.
#[test]
fn networking_granular_checks_services_should_update_node_port_http_and_udp() {
    let mut c = Cluster::up(&[], config_objects);
    let clients = [Client::Node(0), Client::External];
    service_reachable(&c.tb, CLUSTER_IP, &PORTS, &NETSERVERS, &clients, "initial nodePorts");

    let moved = [http_port(NODE_HTTP_PORT + 2), udp_port(NODE_UDP_PORT + 2)];
    c.set(&service_with_pods(&c.tb, SERVICE, CLUSTER_IP, &moved, "", &NETSERVERS));
    service_reachable(&c.tb, CLUSTER_IP, &moved, &NETSERVERS, &clients, "new nodePorts");
    let old_node_ports: Vec<(Proto, SocketAddrV4, bool)> =
        addresses(&c.tb, CLUSTER_IP, &PORTS).into_iter().filter(|(_, _, node_port)| *node_port).collect();
    for (protocol, target, _) in &old_node_ports {
        for from in clients {
            fails(&c.tb, from, *protocol, *target, "old nodePorts");
        }
    }

    c.set("");
    service_unreachable(
        &c.tb,
        CLUSTER_IP,
        &moved,
        &[Client::Node(0), Client::Pod(TEST_POD), Client::External],
        "deleted",
    );
}

// ---------------------------------------------------------------------------------------
// Session affinity, large requests

/// `[sig-network] Networking Granular Checks: Services should function for client IP based
/// session affinity: http [LinuxOnly]` and `... udp [LinuxOnly]`: through the session affinity
/// Service's ClusterIP, each client gets exactly one netserver for all of its requests: the
/// test container pod (socket balancing and TC path), a node's process, and (nodePorts) the
/// external client.
#[test]
fn networking_granular_checks_services_should_function_for_client_ip_based_session_affinity_http_and_udp() {
    let c = Cluster::up(&[], config_objects);
    let ports = [http_port(NODE_HTTP_PORT + 100), udp_port(NODE_UDP_PORT + 100)];
    let clients = [Client::Pod(TEST_POD), Client::PodTc(TEST_POD), Client::Node(0), Client::External];
    for (protocol, target, node_port) in addresses(&c.tb, AFFINITY_IP, &ports) {
        for from in clients {
            if !node_port && matches!(from, Client::External) {
                continue;
            }
            let answered: BTreeSet<String> = (0..AFFINITY_CHECKS)
                .map(|i| match ask(&c.tb, from, protocol, target, ANSWER_TIMEOUT) {
                    Ok(reply) => reply.pod,
                    Err(e) => panic!("{from:?} → {target}/{protocol:?}: request {i} failed: {e}"),
                })
                .collect();
            assert_eq!(
                answered.len(),
                1,
                "{from:?} → {target}/{protocol:?}: want one endpoint, got {answered:?}"
            );
        }
    }
}

/// `[sig-network] Networking Granular Checks: Services should be able to handle large requests:
/// http` and `... large requests: udp`: from the test container pod (socket balancing and TC
/// path), a 2000-byte HTTP request through the ClusterIP arrives whole, and a 2000-byte UDP
/// datagram, over the links' MTU, goes through as IPv4 fragments and comes back echoed intact;
/// also through node-b's nodePorts (fragments through XDP or TC on the node's `eth0`).
#[test]
fn networking_granular_checks_services_should_be_able_to_handle_large_requests_http_and_udp() {
    let c = Cluster::up(&[], config_objects);
    for from in pod_clients(TEST_POD) {
        large_requests(
            &c,
            from,
            SocketAddrV4::new(CLUSTER_IP, HTTP_PORT),
            SocketAddrV4::new(CLUSTER_IP, UDP_PORT),
            &NETSERVERS,
            10,
        );
        large_requests(
            &c,
            from,
            SocketAddrV4::new(c.node_ip(1), NODE_HTTP_PORT),
            SocketAddrV4::new(c.node_ip(1), NODE_UDP_PORT),
            &NETSERVERS,
            10,
        );
    }
    large_requests(
        &c,
        Client::External,
        SocketAddrV4::new(c.node_ip(0), NODE_HTTP_PORT),
        SocketAddrV4::new(c.node_ip(0), NODE_UDP_PORT),
        &NETSERVERS,
        10,
    );
}

// ---------------------------------------------------------------------------------------
// hostNetwork endpoints

/// kiada servers in the nodes' own namespaces (hostNetwork netservers); killed on drop.
struct HostServers(Vec<Child>);

impl HostServers {
    fn start(tb: &Testbed) -> Self {
        let mut servers = HostServers(Vec::new());
        for (i, node) in tb.nodes.iter().enumerate() {
            let mut child = tb
                .host_command(i, &bin_path("kiada"))
                .args(["serve", "--pod", &host_server(&node.name), "--node", &node.name])
                .args(["--tcp", &POD_PORT.to_string(), "--udp", &POD_PORT.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .expect("starting kiada on the node");
            let stdout = child.stdout.take().expect("piped");
            servers.0.push(child);
            let mut line = String::new();
            // Blocks until the server listens (or exits): an event, not a timed wait.
            BufReader::new(stdout).read_line(&mut line).expect("kiada's first line");
            assert_eq!(line.trim(), "ready", "kiada on {}", node.name);
        }
        servers
    }
}

impl Drop for HostServers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn host_server(node: &str) -> String {
    format!("host-{node}")
}

/// The test Service with the nodes' addresses as its endpoints (hostNetwork pods).
fn host_network_objects(tb: &Testbed) -> String {
    let mut slice = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {SERVICE}-h0st1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {SERVICE}\naddressType: IPv4\nports:\n"
    );
    for (name, _, target, _, protocol) in PORTS {
        slice += &format!("- name: {name}\n  port: {target}\n  protocol: {protocol}\n");
    }
    slice += "endpoints:\n";
    for node in &tb.nodes {
        slice += &format!(
            "- addresses:\n  - {}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: {}\n",
            node.ip, node.name
        );
    }
    service_yaml(SERVICE, "NodePort", CLUSTER_IP, &PORTS, "") + &slice + "---\n"
}

/// `[sig-network] Networking Granular Checks: Services should function for service endpoints
/// using hostNetwork`: the endpoints are servers in the nodes' own network namespaces (their
/// addresses are the nodes'). The test container pod (socket balancing and TC path) and the
/// nodes' processes reach both through the ClusterIP and every node's nodePorts, TCP and UDP,
/// and the large requests (2000-byte HTTP request, 2000-byte fragmented datagram echoed) go
/// through the ClusterIP.
#[test]
fn networking_granular_checks_services_should_function_for_service_endpoints_using_host_network() {
    // Dropped in reverse order: the servers go before the testbed removes their cgroups.
    let c = Cluster::up(&[], host_network_objects);
    let _servers = HostServers::start(&c.tb);
    let hosts: Vec<String> = c.tb.nodes.iter().map(|n| host_server(&n.name)).collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let clients = [Client::Pod(TEST_POD), Client::PodTc(TEST_POD), Client::Node(0), Client::Node(1)];
    service_reachable(&c.tb, CLUSTER_IP, &PORTS, &hosts, &clients, "hostNetwork endpoints");
    for from in pod_clients(TEST_POD) {
        large_requests(
            &c,
            from,
            SocketAddrV4::new(CLUSTER_IP, HTTP_PORT),
            SocketAddrV4::new(CLUSTER_IP, UDP_PORT),
            &hosts,
            10,
        );
    }
}

// ---------------------------------------------------------------------------------------
// Addresses as kube-proxy reads them

/// Not an e2e test: addresses written with leading zeros (`198.019.008.020`), which the API
/// server kept from before its validation tightened, are read in decimal as kube-proxy reads
/// them (`netutils.ParseIPSloppy`; CVE-2021-29923 is about reading them in octal), in a
/// Service's clusterIP and in an EndpointSlice's addresses: the Service is programmed and a
/// pod and a node's process reach both netservers through it. Before, the agent refused such
/// objects as invalid.
#[test]
fn addresses_with_leading_zeros_are_read_in_decimal_as_kube_proxy_reads_them() {
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 20);
    let padded = |ip: Ipv4Addr| ip.octets().map(|o| format!("{o:03}")).join(".");
    let objects = |tb: &Testbed| {
        let ports = [("http", HTTP_PORT, POD_PORT, None, "TCP"), ("udp", UDP_PORT, POD_PORT, None, "UDP")];
        let mut yaml =
            service_with_pods(tb, "zeros", IP, &ports, "", &NETSERVERS).replace("NodePort", "ClusterIP");
        for ip in NETSERVERS.map(|p| pod_ip(tb, p)).into_iter().chain([IP]) {
            yaml = yaml.replace(&format!(" {ip}\n"), &format!(" {}\n", padded(ip)));
        }
        assert!(yaml.contains(&padded(IP)) && yaml.contains(&padded(pod_ip(tb, NETSERVERS[1]))), "{yaml}");
        yaml
    };
    let c = Cluster::up(&[], objects);
    let ports = [("http", HTTP_PORT, POD_PORT, None, "TCP"), ("udp", UDP_PORT, POD_PORT, None, "UDP")];
    let clients = [Client::Pod(TEST_POD), Client::PodTc(TEST_POD), Client::Node(0)];
    service_reachable(&c.tb, IP, &ports, &NETSERVERS, &clients, "leading zeros");
}
