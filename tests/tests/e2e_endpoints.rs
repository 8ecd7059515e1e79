//! Kubernetes' `[sig-network] Services` e2e tests about which endpoints and ports a Service
//! has: ports served by different pods and changed on the fly, named target ports resolving
//! differently per pod, endpoints published while terminating, internalTrafficPolicy=Local for
//! the node's own processes and to a host-network endpoint, and one port number over two
//! protocols on a LoadBalancer. Named after the e2e tests; real traffic through the agents, in
//! the production configuration. docs/CONFORMANCE.md maps the whole list.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::Stdio,
    time::Duration,
};

use lb_common::{proto, service::ServiceKey};
use xlb_tests::{bin_path, checks::nodes_yaml, kiada, netns, services::*, testbed::Testbed};

const TIMEOUT: Duration = Duration::from_secs(2);

fn udp(addr: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey::new(addr, port, proto::UDP)
}

/// `slice_yaml` under another name, for a Service with several slices.
fn named_slice(
    tb: &Testbed,
    service: &str,
    suffix: &str,
    ports: &[Port],
    endpoints: &[(&str, State)],
) -> String {
    slice_yaml(tb, service, ports, endpoints)
        .replace(&format!("name: {service}-x7k2p"), &format!("name: {service}-{suffix}"))
}

/// The pods that answered `count` TCP requests from pod `client` to `target`, or the first
/// failure.
fn pods_answering(
    tb: &Testbed,
    client: &str,
    target: SocketAddrV4,
    count: usize,
) -> Result<BTreeSet<String>, String> {
    let ns = pod(tb, client).ns.clone();
    netns::within(&ns, move || {
        (0..count)
            .map(|_| kiada::get(target, TIMEOUT).map(|r| r.pod).map_err(|e| format!("{target}: {e:#}")))
            .collect::<Result<BTreeSet<_>, _>>()
    })
    .expect("pod namespace")
}

/// e2e `should serve multiport endpoints from pods` and `should be updated after adding or
/// deleting ports`: a Service with two ports whose named targetPort only one pod each serves,
/// so the EndpointSlice controller writes one slice per port (merged by port name): each port
/// reaches only its pod. Deleting the second port stops it, the first unaffected; adding it
/// back brings it back. (30 requests each: a wrong pod would show with probability 1 - 2^-30.)
#[test]
fn services_should_serve_multiport_endpoints_from_pods_and_be_updated_after_adding_or_deleting_ports() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 10);
    const PORT1: [Port; 1] = [("portname1", 80, 8080, None, "TCP")];
    const PORT2: [Port; 1] = [("portname2", 81, 8080, None, "TCP")];
    const BOTH: [Port; 2] = [PORT1[0], PORT2[0]];
    let manifest = |tb: &Testbed, ports: &[Port]| {
        nodes_yaml(tb)
            + &service_yaml("multi-endpoint-test", "ClusterIP", CLUSTER_IP, ports, "")
            + &named_slice(tb, "multi-endpoint-test", "port1", &PORT1, &[("pod1", State::Ready)])
            + &named_slice(tb, "multi-endpoint-test", "port2", &PORT2, &[("pod2", State::Ready)])
    };
    let mut tb = up(
        &spec(&[("pod1", 0), ("pod2", 1), ("curl", 0)]),
        |tb| manifest(tb, &BOTH),
        &[tcp(CLUSTER_IP, 80), tcp(CLUSTER_IP, 81)],
    );
    let check = |tb: &Testbed, port: u16, want: &str| {
        let answered = pods_answering(tb, "curl", SocketAddrV4::new(CLUSTER_IP, port), 30);
        assert_eq!(answered, Ok(BTreeSet::from([want.to_string()])), "port {port}");
    };
    check(&tb, 80, "pod1");
    check(&tb, 81, "pod2");

    tb.write_manifest("connections.yaml", &manifest(&tb, &PORT1)).expect("manifest");
    for i in 0..2 {
        eventually_gone(&mut tb, i, tcp(CLUSTER_IP, 81));
    }
    check(&tb, 80, "pod1");
    let gone = pods_answering(&tb, "curl", SocketAddrV4::new(CLUSTER_IP, 81), 1);
    assert!(gone.is_err(), "the deleted port must not answer: {gone:?}");

    tb.write_manifest("connections.yaml", &manifest(&tb, &BOTH)).expect("manifest");
    let pod2 = pod_ip(&tb, "pod2");
    wait_for(&mut tb, 0, tcp(CLUSTER_IP, 81), "port 81 back", |p| p.internal == [pod2]);
    check(&tb, 81, "pod2");
}

/// Waits until node `i`'s maps no longer hold frontend `key`.
fn eventually_gone(tb: &mut Testbed, i: usize, key: ServiceKey) {
    xlb_tests::checks::eventually("frontend removed", CHANGE_TIMEOUT, || {
        tb.check_agent_alive(i)?;
        match programmed(tb, i, key) {
            None => Ok(()),
            Some(p) => anyhow::bail!("still programmed: {p:?}"),
        }
    });
}

/// e2e `should support named targetPorts that resolve to different ports on different
/// endpoints`: one Service port whose named targetPort is 8080 on one pod and 9090 on the
/// other (the controller writes a slice per port number): both pods answer, each on its own
/// port.
#[test]
fn services_should_support_named_target_ports_that_resolve_to_different_ports_on_different_endpoints() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 20);
    const ON_8080: [Port; 1] = [("http", 80, 8080, None, "TCP")];
    const ON_9090: [Port; 1] = [("http", 80, 9090, None, "TCP")];
    let mut tb = up(
        &xlb_tests::testbed::Spec {
            nodes: 2,
            pods: vec![("pod-a".into(), 0), ("pod-b".into(), 1), ("curl".into(), 0)],
            tcp_ports: vec![8080, 9090],
            udp_ports: vec![8080],
        },
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("named", "ClusterIP", CLUSTER_IP, &ON_8080, "")
                + &named_slice(tb, "named", "on8080", &ON_8080, &[("pod-a", State::Ready)])
                + &named_slice(tb, "named", "on9090", &ON_9090, &[("pod-b", State::Ready)])
        },
        &[tcp(CLUSTER_IP, 80)],
    );
    wait_for(&mut tb, 0, tcp(CLUSTER_IP, 80), "two backends", |p| p.internal.len() == 2);
    let want = BTreeSet::from(["pod-a".to_string(), "pod-b".to_string()]);
    let answered = xlb_tests::checks::answered_by(&want, 2, || {
        pods_answering(&tb, "curl", SocketAddrV4::new(CLUSTER_IP, 80), 1)
            .map(|pods| pods.into_iter().next().expect("one answer"))
            .map_err(anyhow::Error::msg)
    });
    println!("answers: {:?}", answered.expect("both pods, each on its own target port"));
}

/// e2e `should be able to connect to terminating and unready endpoints if
/// PublishNotReadyAddresses is true` and `should not be able to connect to terminating and
/// unready endpoints if PublishNotReadyAddresses is false`: the only endpoint (on node-a) is
/// terminating; with publishNotReadyAddresses the controller publishes it ready, and a pod on
/// node-b reaches it through the ClusterIP and both nodes' NodePorts; without, it is neither
/// ready nor serving, and all three refuse.
#[test]
fn services_should_connect_to_terminating_and_unready_endpoints_only_if_publish_not_ready_addresses() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 30);
    const PORTS: [Port; 1] = [("http", 80, 8080, Some(30830), "TCP")];
    let manifest = |tb: &Testbed, state: State| {
        nodes_yaml(tb)
            + &service_yaml("pnra", "NodePort", CLUSTER_IP, &PORTS, "  publishNotReadyAddresses: true\n")
            + &slice_yaml(tb, "pnra", &PORTS, &[("webserver", state)])
    };
    let mut tb = up(
        &spec(&[("webserver", 0), ("curl", 1)]),
        |tb| manifest(tb, State::ReadyTerminating),
        &[tcp(CLUSTER_IP, 80), tcp(NODE_A, 30830)],
    );
    let targets = [
        SocketAddrV4::new(CLUSTER_IP, 80),
        SocketAddrV4::new(tb.nodes[0].ip, 30830),
        SocketAddrV4::new(tb.nodes[1].ip, 30830),
    ];
    for target in targets {
        assert_eq!(
            pods_answering(&tb, "curl", target, 5),
            Ok(BTreeSet::from(["webserver".to_string()])),
            "{target}"
        );
    }
    tb.write_manifest("connections.yaml", &manifest(&tb, State::Stopping)).expect("manifest");
    for i in 0..2 {
        let key = tcp(tb.nodes[i].ip, 30830);
        wait_for(&mut tb, i, key, "no usable endpoint", |p| p.external.is_empty() && p.internal.is_empty());
    }
    for target in targets {
        let result = pods_answering(&tb, "curl", target, 1);
        assert!(
            result.is_err(),
            "{target}: a terminating endpoint that no longer serves must not answer: {result:?}"
        );
    }
}

/// e2e `should respect internalTrafficPolicy=Local Pod (hostNetwork: true) to Pod` and
/// `should respect internalTrafficPolicy=Local Pod and Node, to Pod (hostNetwork: true)`: the
/// node's own processes (socket balancing) reach an internalTrafficPolicy=Local ClusterIP only
/// on the node with its endpoint; and with an endpoint that is a host-network process of
/// node-a (the node's address), pods and node processes of node-a reach it, node-b's do not.
#[test]
fn services_should_respect_internal_traffic_policy_local_for_host_network_clients_and_endpoints() {
    const POD_SVC: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 40);
    const HOST_SVC: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 41);
    const HOST_PORT: u16 = 8090;
    const POD_PORTS: [Port; 1] = [("http", 80, 8080, None, "TCP")];
    const HOST_PORTS: [Port; 1] = [("http", 80, HOST_PORT, None, "TCP")];
    let local = "  internalTrafficPolicy: Local\n";
    let mut tb = up(
        &spec(&[("webserver", 0), ("curl-a", 0), ("curl-b", 1)]),
        |tb| {
            let host_endpoint = slice_yaml(tb, "host-svc", &HOST_PORTS, &[("webserver", State::Ready)])
                .replace(
                    &tb.pods.iter().find(|p| p.name == "webserver").expect("webserver").ip.to_string(),
                    &tb.nodes[0].ip.to_string(),
                );
            nodes_yaml(tb)
                + &service_yaml("pod-svc", "ClusterIP", POD_SVC, &POD_PORTS, local)
                + &slice_yaml(tb, "pod-svc", &POD_PORTS, &[("webserver", State::Ready)])
                + &service_yaml("host-svc", "ClusterIP", HOST_SVC, &HOST_PORTS, local)
                + &host_endpoint
        },
        &[tcp(POD_SVC, 80), tcp(HOST_SVC, 80)],
    );
    // A kiada server as a host-network process of node-a.
    let mut host_server = tb
        .host_command(0, &bin_path("kiada"))
        .args([
            "serve",
            "--pod",
            "host-webserver",
            "--node",
            "node-a",
            "--tcp",
            &HOST_PORT.to_string(),
            "--udp",
            "8091",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("host kiada");
    let mut ready = String::new();
    BufReader::new(host_server.stdout.take().expect("piped")).read_line(&mut ready).expect("ready line");
    assert_eq!(ready.trim(), "ready");
    let node_a = tb.nodes[0].ip;
    wait_for(&mut tb, 0, tcp(HOST_SVC, 80), "node-a as endpoint", |p| p.internal == [node_a]);

    let pod_target = SocketAddrV4::new(POD_SVC, 80);
    let host_target = SocketAddrV4::new(HOST_SVC, 80);
    let from_node =
        |node: usize, target: SocketAddrV4| host_get(&tb, node, "tcp", target).map(|(reply, _)| reply.pod);
    assert_eq!(from_node(0, pod_target), Ok("webserver".to_string()), "node-a process → local endpoint");
    assert!(from_node(1, pod_target).is_err(), "node-b process: no local endpoint");
    assert_eq!(from_node(0, host_target), Ok("host-webserver".to_string()), "node-a process → host endpoint");
    assert!(from_node(1, host_target).is_err(), "node-b process: no local endpoint");
    assert_eq!(
        pods_answering(&tb, "curl-a", host_target, 3),
        Ok(BTreeSet::from(["host-webserver".to_string()])),
        "node-a pod → host endpoint"
    );
    assert!(pods_answering(&tb, "curl-b", host_target, 1).is_err(), "node-b pod: no local endpoint");
    let _ = host_server.kill();
    let _ = host_server.wait();
}

/// e2e `should serve endpoints on same port and different protocol for internal traffic on
/// Type LoadBalancer`: a LoadBalancer Service (no ingress IP yet) with port 80 over TCP and
/// UDP: a pod reaches both protocols on the ClusterIP and on both nodes' NodePorts.
#[test]
fn services_should_serve_endpoints_on_same_port_and_different_protocol_for_internal_traffic_on_type_load_balancer(
) {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 8, 50);
    const PORTS: [Port; 2] =
        [("tcp-port", 80, 8080, Some(30850), "TCP"), ("udp-port", 80, 8080, Some(30850), "UDP")];
    let tb = up(
        &spec(&[("web-0", 1), ("curl", 0)]),
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("lb-both", "LoadBalancer", CLUSTER_IP, &PORTS, "")
                + &slice_yaml(tb, "lb-both", &PORTS, &[("web-0", State::Ready)])
        },
        &[tcp(CLUSTER_IP, 80), udp(CLUSTER_IP, 80), tcp(NODE_A, 30850), udp(NODE_A, 30850)],
    );
    let targets = [
        SocketAddrV4::new(CLUSTER_IP, 80),
        SocketAddrV4::new(tb.nodes[0].ip, 30850),
        SocketAddrV4::new(tb.nodes[1].ip, 30850),
    ];
    let ns = pod(&tb, "curl").ns.clone();
    for target in targets {
        let answers = netns::within(&ns, move || {
            [kiada::get(target, TIMEOUT), kiada::get_udp(target, TIMEOUT).map(|(reply, _)| reply)]
        })
        .expect("pod namespace");
        for (protocol, answer) in ["TCP", "UDP"].iter().zip(answers) {
            assert_eq!(
                answer.map(|r| r.pod).map_err(|e| format!("{e:#}")),
                Ok("web-0".to_string()),
                "{protocol} {target}"
            );
        }
    }
}
