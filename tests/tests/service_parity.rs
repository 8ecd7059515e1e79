//! Service behaviours kube-proxy users rely on, proved with real traffic through the namespace
//! cluster: ClusterIP from pods (several ports, the same port over TCP and UDP), NodePort on
//! every node from the client and from pods, traffic policies, LoadBalancer IPs with source
//! ranges, externalIPs, rejection without endpoints, hairpin and the spread of random choice.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{proto, service::ServiceKey};
use xlb_tests::{
    kiada::{self, Reply},
    netns, sockets,
    testbed::{Spec, Testbed},
    traffic::{self, tally_pods, Exchanges},
};

const HTTP: u16 = 8080;
const DNS_TCP: u16 = 8053;
const DNS_UDP: u16 = 5353;
const MULTI: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 20);
const NP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 21);
const LOCAL: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 22);
const EMPTY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 26);
const ITP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 27);
const ITP_AWAY: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 29);
const SELF: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 28);
const LB_OPEN: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const LB_CLOSED: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 2);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 2);

/// web-0 and web-1 on node-a, web-2 on node-b; cpod is a client pod on node-a.
fn spec() -> Spec {
    Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 0), ("web-2".into(), 1), ("cpod".into(), 0)],
        tcp_ports: vec![HTTP, DNS_TCP],
        udp_ports: vec![DNS_UDP],
    }
}

fn service(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec: {spec}\n---\n"
    )
}

/// An EndpointSlice of `service` with `ports` (flow style) and one endpoint per pod name.
fn slice(tb: &Testbed, service: &str, ports: &str, pods: &[&str]) -> String {
    let endpoints: Vec<String> = pods
        .iter()
        .map(|name| {
            let pod = tb.pods.iter().find(|p| p.name == *name).expect("pod of the spec");
            format!("{{addresses: [{}], nodeName: {}}}", pod.ip, tb.nodes[pod.node].name)
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: [{}]\n---\n",
        endpoints.join(", ")
    )
}

fn nodes(tb: &Testbed) -> String {
    tb.nodes
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: {}}}]}}\n---\n",
                n.name, n.ip
            )
        })
        .collect()
}

const HTTP_PORTS: &str = "[{name: http, port: 8080, protocol: TCP}]";

/// Every Service of this file, as one manifest.
fn manifests(tb: &Testbed) -> String {
    let all = ["web-0", "web-1", "web-2"];
    let mut yaml = nodes(tb);
    yaml += &service(
        "multi",
        &format!("{{clusterIP: {MULTI}, ports: [{{name: http, port: 80, targetPort: {HTTP}}}, {{name: dns-tcp, port: 53, targetPort: {DNS_TCP}}}, {{name: dns, port: 53, protocol: UDP, targetPort: {DNS_UDP}}}]}}"),
    );
    yaml += &slice(
        tb,
        "multi",
        &format!("[{{name: http, port: {HTTP}}}, {{name: dns-tcp, port: {DNS_TCP}}}, {{name: dns, port: {DNS_UDP}, protocol: UDP}}]"),
        &all,
    );
    yaml += &service(
        "np",
        &format!("{{type: NodePort, clusterIP: {NP}, ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]}}"),
    );
    yaml += &slice(
        tb,
        "np",
        &format!("[{{name: http, port: {HTTP}}}, {{name: dns, port: {DNS_UDP}, protocol: UDP}}]"),
        &all,
    );
    yaml += &service(
        "local",
        &format!("{{type: NodePort, externalTrafficPolicy: Local, clusterIP: {LOCAL}, ports: [{{name: http, port: 80, nodePort: 30081}}]}}"),
    );
    yaml += &slice(tb, "local", HTTP_PORTS, &all);
    yaml += &service(
        "lb-open",
        &format!("{{type: LoadBalancer, allocateLoadBalancerNodePorts: false, clusterIP: 198.19.0.23, loadBalancerSourceRanges: [198.18.0.0/24], ports: [{{name: http, port: 80}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {LB_OPEN}}}]}}}}"),
    );
    yaml += &slice(tb, "lb-open", HTTP_PORTS, &all);
    yaml += &service(
        "lb-closed",
        &format!("{{type: LoadBalancer, clusterIP: 198.19.0.24, loadBalancerSourceRanges: [198.18.9.0/24], ports: [{{name: http, port: 80, nodePort: 30084}}]}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {LB_CLOSED}}}]}}}}"),
    );
    yaml += &slice(tb, "lb-closed", HTTP_PORTS, &all);
    yaml += &service(
        "ext",
        &format!(
            "{{clusterIP: 198.19.0.25, externalIPs: [{EXTERNAL_IP}], ports: [{{name: http, port: 80}}]}}"
        ),
    );
    yaml += &slice(tb, "ext", HTTP_PORTS, &all);
    yaml += &service(
        "empty",
        &format!("{{type: NodePort, clusterIP: {EMPTY}, ports: [{{name: http, port: 80, nodePort: 30082}}, {{name: dns, port: 53, protocol: UDP, nodePort: 30083}}]}}"),
    );
    yaml += &service(
        "itp",
        &format!("{{clusterIP: {ITP}, internalTrafficPolicy: Local, ports: [{{name: http, port: 80}}]}}"),
    );
    yaml += &slice(tb, "itp", HTTP_PORTS, &["web-0", "web-2"]);
    yaml += &service(
        "itp-away",
        &format!(
            "{{clusterIP: {ITP_AWAY}, internalTrafficPolicy: Local, ports: [{{name: http, port: 80}}]}}"
        ),
    );
    yaml += &slice(tb, "itp-away", HTTP_PORTS, &["web-2"]);
    yaml += &service("self", &format!("{{clusterIP: {SELF}, ports: [{{name: http, port: 80}}]}}"));
    yaml += &slice(tb, "self", HTTP_PORTS, &["web-0"]);
    yaml
}

/// The cluster with every Service programmed on both nodes, and a route from the external
/// client to the Service addresses through node-a (as a router or an LB would send them).
fn up() -> Testbed {
    let mut tb = Testbed::up(&spec()).expect("cluster");
    tb.write_manifest("services.yaml", &manifests(&tb)).expect("manifests");
    netns::ip(&["-n", &tb.client, "route", "add", "198.19.0.0/16", "via", &tb.nodes[0].ip.to_string()])
        .expect("client route");
    for i in 0..tb.nodes.len() {
        tb.start_agent(i).expect("agent");
    }
    for i in 0..tb.nodes.len() {
        let ip = tb.nodes[i].ip;
        let keys = [
            ServiceKey::new(SELF, 80, proto::TCP),
            ServiceKey::new(LB_CLOSED, 80, proto::TCP),
            ServiceKey::new(ip, 30084, proto::TCP),
            ServiceKey::new(ip, 30053, proto::UDP),
        ];
        tb.wait_programmed(i, &keys, Duration::from_secs(30)).expect("programmed");
    }
    tb
}

fn ns_of(tb: &Testbed, pod: &str) -> String {
    tb.pods.iter().find(|p| p.name == pod).expect("pod").ns.clone()
}

fn ip_of(tb: &Testbed, pod: &str) -> Ipv4Addr {
    tb.pods.iter().find(|p| p.name == pod).expect("pod").ip
}

/// The replies of `exchanges`, failing with the first error if any exchange failed.
fn all_ok(what: &str, exchanges: Exchanges) -> Vec<(Reply, std::net::SocketAddr)> {
    let total = exchanges.len();
    let (ok, failed): (Vec<_>, Vec<_>) = exchanges.into_iter().partition(Result::is_ok);
    if let Some(Err(e)) = failed.into_iter().next() {
        panic!("{what}: {} of {total} failed, first: {e:#}", total - ok.len());
    }
    ok.into_iter().map(Result::unwrap).collect()
}

fn pods_of(replies: &[(Reply, std::net::SocketAddr)]) -> Vec<String> {
    tally_pods(replies.iter().map(|(r, _)| r)).into_keys().collect()
}

/// A pod reaches a ClusterIP's endpoints on its own node and on the other node, on every port
/// of the Service, including 53 over TCP and over UDP to different target ports; the endpoint
/// sees the pod's own address, and the reply comes from the ClusterIP.
#[test]
fn cluster_ip_from_a_pod_reaches_every_endpoint_with_the_pods_address() {
    let tb = up();
    let cpod = ns_of(&tb, "cpod");
    let cpod_ip = ip_of(&tb, "cpod");
    for (what, target, udp) in [
        ("http", SocketAddrV4::new(MULTI, 80), false),
        ("53/TCP", SocketAddrV4::new(MULTI, 53), false),
        ("53/UDP", SocketAddrV4::new(MULTI, 53), true),
    ] {
        let exchanges = if udp {
            traffic::udp_from(&tb, &cpod, target, 60)
        } else {
            traffic::tcp_from(&tb, &cpod, target, 60)
        }
        .expect("cpod namespace");
        let replies = all_ok(what, exchanges);
        assert_eq!(pods_of(&replies), ["web-0", "web-1", "web-2"], "{what}: every endpoint answers");
        for (reply, peer) in &replies {
            assert_eq!(
                reply.client.ip(),
                cpod_ip,
                "{what}: {} must see the pod, not a SNAT address",
                reply.pod
            );
            assert_eq!(*peer, target.into(), "{what}: the answer comes from the ClusterIP");
        }
    }
}

/// A NodePort answers on every node's address, over TCP and UDP, from the external client
/// and from a pod. With Cluster policy, endpoints on the addressed node see the client,
/// endpoints on the other node see the addressed node (SNAT, so replies return through it).
#[test]
fn node_port_answers_on_every_node_from_the_client_and_from_pods() {
    let tb = up();
    let cpod = ns_of(&tb, "cpod");
    for (i, node) in tb.nodes.iter().enumerate() {
        let http = SocketAddrV4::new(node.ip, 30080);
        let replies = all_ok("client http", traffic::tcp_from(&tb, &tb.client, http, 60).unwrap());
        assert_eq!(pods_of(&replies), ["web-0", "web-1", "web-2"], "{http} from the client");
        for (reply, _) in &replies {
            let pod = tb.pods.iter().find(|p| p.name == reply.pod).unwrap();
            let want = if pod.node == i { tb.client_ip } else { node.ip };
            assert_eq!(reply.client.ip(), want, "{http}: address seen by {}", pod.name);
        }
        let dns = SocketAddrV4::new(node.ip, 30053);
        let replies = all_ok("client dns", traffic::udp_from(&tb, &tb.client, dns, 60).unwrap());
        assert_eq!(pods_of(&replies), ["web-0", "web-1", "web-2"], "{dns} over UDP");
        assert!(replies.iter().all(|(_, from)| *from == dns.into()), "{dns}: answers come from the NodePort");
        let replies = all_ok("pod http", traffic::tcp_from(&tb, &cpod, http, 60).unwrap());
        assert_eq!(pods_of(&replies), ["web-0", "web-1", "web-2"], "{http} from a pod on node-a");
    }
}

/// externalTrafficPolicy: Local: the client only reaches endpoints on the node it addressed
/// and they see its own address; a pod reaching its own node's NodePort gets Cluster policy.
#[test]
fn external_traffic_policy_local_keeps_the_client_address_and_node() {
    let tb = up();
    for (node, want) in [(0, vec!["web-0", "web-1"]), (1, vec!["web-2"])] {
        let target = SocketAddrV4::new(tb.nodes[node].ip, 30081);
        let replies = all_ok("client", traffic::tcp_from(&tb, &tb.client, target, 40).unwrap());
        assert_eq!(pods_of(&replies), want, "{target}: local endpoints only");
        assert!(replies.iter().all(|(r, _)| r.client.ip() == tb.client_ip), "{target}: client address kept");
    }
    let target = SocketAddrV4::new(tb.nodes[0].ip, 30081);
    let replies = all_ok("pod", traffic::tcp_from(&tb, &ns_of(&tb, "cpod"), target, 60).unwrap());
    assert_eq!(pods_of(&replies), ["web-0", "web-1", "web-2"], "{target} from a pod: Cluster policy");
}

/// LoadBalancer ingress IPs and externalIPs are balanced; loadBalancerSourceRanges drop
/// clients outside the ranges on the LB IP only, not on the Service's NodePort; a
/// LoadBalancer without node ports (allocateLoadBalancerNodePorts: false) works on its IP.
#[test]
fn load_balancer_ips_source_ranges_and_external_ips() {
    let tb = up();
    for target in [SocketAddrV4::new(LB_OPEN, 80), SocketAddrV4::new(EXTERNAL_IP, 80)] {
        // 60 connections miss one of 3 endpoints with probability below 3 * (2/3)^60 < 1e-10.
        let replies = all_ok("client", traffic::tcp_from(&tb, &tb.client, target, 60).unwrap());
        assert_eq!(pods_of(&replies), ["web-0", "web-1", "web-2"], "{target}");
    }
    let closed = SocketAddrV4::new(LB_CLOSED, 80);
    let started = Instant::now();
    let exchanges = traffic::tcp_from(&tb, &tb.client, closed, 1).unwrap();
    let err = exchanges[0].as_ref().expect_err("a client outside the source ranges must not get through");
    assert!(started.elapsed() >= Duration::from_secs(1), "dropped, not refused: {err:#}");
    let node_port = SocketAddrV4::new(tb.nodes[0].ip, 30084);
    let replies =
        all_ok("node port of lb-closed", traffic::tcp_from(&tb, &tb.client, node_port, 20).unwrap());
    assert!(!replies.is_empty(), "{node_port}: NodePorts are not subject to source ranges");
}

/// A Service without endpoints refuses at once, as kube-proxy's REJECT: TCP and UDP from the
/// client on the NodePort, TCP from a pod on the ClusterIP.
#[test]
fn service_without_endpoints_refuses_at_once() {
    let tb = up();
    let cases = [
        ("client TCP", tb.client.clone(), SocketAddrV4::new(tb.nodes[0].ip, 30082), false),
        ("client UDP", tb.client.clone(), SocketAddrV4::new(tb.nodes[1].ip, 30083), true),
        ("pod TCP", ns_of(&tb, "cpod"), SocketAddrV4::new(EMPTY, 80), false),
        ("pod UDP", ns_of(&tb, "cpod"), SocketAddrV4::new(EMPTY, 53), true),
    ];
    for (what, ns, target, udp) in cases {
        let started = Instant::now();
        let exchanges =
            if udp { traffic::udp_from(&tb, &ns, target, 1) } else { traffic::tcp_from(&tb, &ns, target, 1) }
                .unwrap();
        let elapsed = started.elapsed();
        let err = format!("{:#}", exchanges[0].as_ref().expect_err("no endpoint, no answer"));
        assert!(
            err.to_lowercase().contains("refused"),
            "{what} {target}: want connection refused, got {err}"
        );
        assert!(elapsed < Duration::from_secs(1), "{what} {target}: refused after {elapsed:?}, not at once");
    }
}

/// internalTrafficPolicy: Local: a pod only reaches endpoints on its own node; with none
/// there, the connection is dropped (not sent to the other node, not refused).
#[test]
fn internal_traffic_policy_local_stays_on_the_node() {
    let tb = up();
    let cpod = ns_of(&tb, "cpod");
    let replies = all_ok("itp", traffic::tcp_from(&tb, &cpod, SocketAddrV4::new(ITP, 80), 40).unwrap());
    assert_eq!(pods_of(&replies), ["web-0"], "only the endpoint on node-a");
    let exchanges = traffic::tcp_from(&tb, &cpod, SocketAddrV4::new(ITP_AWAY, 80), 1).unwrap();
    let err = format!("{:#}", exchanges[0].as_ref().expect_err("no local endpoint"));
    assert!(!err.to_lowercase().contains("refused"), "dropped, not refused: {err}");
}

/// Hairpin (e2e `[sig-network] Services should allow pods to hairpin back to themselves
/// through services`): a pod reaching itself through its own Service is answered by itself.
/// Through socket balancing (its processes under the agent's cgroup, as in production) the
/// socket is pointed at the pod's own address and the connection never leaves the pod; through
/// its veth's TC path (processes outside the cgroup) the connection is SNATed to the node, as
/// kube-proxy masquerades hairpin traffic, so the reply leaves the pod. Either way the socket
/// shows the Service as its peer.
#[test]
fn a_pod_reaches_itself_through_its_service() {
    let tb = up();
    let target = SocketAddrV4::new(SELF, 80);
    let web_0 = tb.pods.iter().find(|p| p.name == "web-0").expect("web-0").ip;
    for (path, bypass, client) in [("socket balancing", false, web_0), ("TC path", true, tb.nodes[0].ip)] {
        let exchanges = netns::within(&ns_of(&tb, "web-0"), move || {
            let ask = || (0..10).map(|_| kiada::get_tcp(target, Duration::from_secs(2))).collect::<Vec<_>>();
            if bypass {
                sockets::bypass(ask)
            } else {
                ask()
            }
        })
        .unwrap();
        for (reply, peer) in all_ok("hairpin", exchanges) {
            assert_eq!(reply.pod, "web-0", "{path}");
            assert_eq!(reply.client.ip(), client, "{path}: the connection's source");
            assert_eq!(peer, target.into(), "{path}");
        }
    }
}

/// Random choice per new connection: 3,000 connections to 3 endpoints give each 1,000 ± 15%
/// (a fair choice misses that with probability 2e-8; ± 10% failed one run in 3,000).
#[test]
fn random_choice_spreads_3000_connections_evenly() {
    let tb = up();
    let replies = all_ok(
        "spread",
        traffic::tcp_from(&tb, &ns_of(&tb, "cpod"), SocketAddrV4::new(MULTI, 80), 3000).unwrap(),
    );
    let by_pod = tally_pods(replies.iter().map(|(r, _)| r));
    println!("3000 connections: {by_pod:?}");
    assert_eq!(by_pod.len(), 3);
    for (pod, n) in by_pod {
        assert!((850..=1150).contains(&n), "{pod} got {n} of 3000, want 1000 ± 15%");
    }
}
