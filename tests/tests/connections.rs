//! Connections as clients see them: the node's own processes reaching a ClusterIP through
//! socket balancing, session affinity switched on and off, serving terminating endpoints as
//! the fallback, established connections surviving endpoint removal, and path MTU discovery
//! through SNAT. Every claim is checked with real traffic through the agents' programs.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_common::{
    proto,
    service::{ServiceKey, SVC_F_NO_ENDPOINTS},
};
use xlb_tests::{
    bin_path,
    checks::nodes_yaml,
    kiada::{self, Reply},
    netns,
    services::*,
    sockets,
    testbed::{Spec, Testbed},
    traffic,
};

// ---------------------------------------------------------------------------------------
// 1. The node's own processes

/// A process of the node (in the agent's `--cgroup-path`) reaches a ClusterIP over TCP and
/// UDP, balanced over pods on both nodes, and its socket shows the ClusterIP as its peer
/// (connect4/sendmsg4 point it at a backend, getpeername4/recvmsg4 show the frontend); a
/// process of the same network namespace outside that cgroup is not balanced (no route to
/// the ClusterIP); a Service without endpoints refuses `connect()` at once.
#[test]
fn host_processes_reach_cluster_ips_through_socket_balancing() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 10);
    const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 11);
    const PORTS: [Port; 2] = [("http", 80, 8080, None, "TCP"), ("udp", 80, 8080, None, "UDP")];
    const TRIES: usize = 30;
    let spec = Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 1)],
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
    };
    let keys = [tcp(CLUSTER_IP, 80), ServiceKey::new(CLUSTER_IP, 80, proto::UDP), tcp(EMPTY_IP, 80)];
    let mut tb = up(
        &spec,
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("web", "ClusterIP", CLUSTER_IP, &PORTS, "")
                + &slice_yaml(tb, "web", &PORTS, &[("web-0", State::Ready), ("web-1", State::Ready)])
                + &service_yaml("empty", "ClusterIP", EMPTY_IP, &PORTS, "")
        },
        &keys,
    );
    for key in &keys[..2] {
        wait_for(&mut tb, 0, *key, "two backends", |p| p.internal.len() == 2);
    }
    for protocol in [proto::TCP, proto::UDP] {
        wait_for(&mut tb, 0, ServiceKey::new(EMPTY_IP, 80, protocol), "without endpoints", |p| {
            p.value.flags & SVC_F_NO_ENDPOINTS != 0 && p.value.internal_count == 0
        });
    }

    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    for protocol in ["tcp", "udp"] {
        let mut answered = Vec::new();
        for _ in 0..TRIES {
            let (reply, peer) =
                host_get(&tb, 0, protocol, target).unwrap_or_else(|e| panic!("{protocol} {target}: {e}"));
            assert_eq!(peer, SocketAddr::V4(target), "{protocol}: the socket must show the ClusterIP");
            answered.push(reply);
        }
        let nodes: BTreeSet<&str> = answered.iter().map(|r| r.node.as_str()).collect();
        println!("host {protocol} {target}: {:?}", traffic::tally_pods(&answered));
        assert_eq!(
            nodes,
            BTreeSet::from(["node-a", "node-b"]),
            "{protocol}: {TRIES} requests must reach pods on both nodes"
        );
    }

    // The same namespace outside the cgroup: no socket program, and the ClusterIP has no route.
    for protocol in ["tcp", "udp"] {
        let started = Instant::now();
        let out = netns::command(&tb.nodes[0].ns, &bin_path("kiada").to_string_lossy())
            .args(["get", protocol, &target.to_string()])
            .output()
            .expect("running kiada get");
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("outside the cgroup, {protocol}: {} after {:?}", stderr.trim(), started.elapsed());
        assert!(!out.status.success(), "{protocol}: a process outside the cgroup must not be balanced");
        assert!(
            stderr.contains("unreachable")
                || stderr.contains("timed out")
                || stderr.contains("Resource temporarily"),
            "{protocol}: want no route or a timeout, got {stderr:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4), "{protocol}: took {:?}", started.elapsed());
    }

    // No endpoints (no EndpointSlice at all): refused by the socket program itself, at once.
    for protocol in ["tcp", "udp"] {
        let started = Instant::now();
        let error = host_get(&tb, 0, protocol, SocketAddrV4::new(EMPTY_IP, 80))
            .map(|(reply, _)| reply)
            .expect_err("a Service without endpoints must not answer");
        let elapsed = started.elapsed();
        println!("no endpoints, {protocol}: {error} after {elapsed:?}");
        assert!(error.contains("Connection refused"), "{protocol}: want connection refused, got {error:?}");
        assert!(elapsed < Duration::from_secs(1), "{protocol}: refused only after {elapsed:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Session affinity

/// `sessionAffinity: ClientIP` keeps every new connection of a client on one pod, for a pod
/// reaching the ClusterIP and for an external client reaching the NodePort; switched off,
/// the same clients are balanced over several pods; switched on again, they stick again.
#[test]
fn session_affinity_sticks_and_can_be_switched_off_and_on() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 20);
    const NODE_PORT: u16 = 30320;
    const PORTS: [Port; 1] = [("http", 80, 8080, Some(NODE_PORT), "TCP")];
    const TIMEOUT_S: u32 = 600;
    let spec = Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 0), ("web-2".into(), 1), ("curl".into(), 0)],
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
    };
    let endpoints = [("web-0", State::Ready), ("web-1", State::Ready), ("web-2", State::Ready)];
    let manifest = |tb: &Testbed, affinity: bool| {
        let extra = if affinity {
            format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {TIMEOUT_S}\n")
        } else {
            "  sessionAffinity: None\n".to_string()
        };
        nodes_yaml(tb)
            + &service_yaml("sticky", "NodePort", CLUSTER_IP, &PORTS, &extra)
            + &slice_yaml(tb, "sticky", &PORTS, &endpoints)
    };
    let node_a = NODE_A;
    let keys = [tcp(CLUSTER_IP, 80), tcp(node_a, NODE_PORT)];
    let mut tb = up(&spec, |tb| manifest(tb, true), &keys);
    let client_pod = pod(&tb, "curl").ns.clone();
    let client = tb.client.clone();
    let cluster_ip = SocketAddrV4::new(CLUSTER_IP, 80);
    let node_port = SocketAddrV4::new(node_a, NODE_PORT);

    let expect_affinity = |tb: &mut Testbed, timeout_s: u32| {
        for key in keys {
            wait_for(tb, 0, key, &format!("affinity {timeout_s} s with 3 backends"), |p| {
                p.value.affinity_timeout_s == timeout_s && p.external.len() == 3 && p.internal.len() == 3
            });
        }
    };
    let sticks = |tb: &Testbed, phase: &str| {
        for (ns, target) in [(&client_pod, cluster_ip), (&client, node_port)] {
            // Without affinity, 20 connections over 3 pods all land on one with
            // probability 3 * (1/3)^20 < 1e-9.
            let answered = pods_of(&replies(tb, ns, target, 20));
            println!("{phase}: {ns} → {target}: {answered:?}");
            assert_eq!(answered.len(), 1, "{phase}: {ns} → {target} must stick to one pod, got {answered:?}");
        }
    };

    expect_affinity(&mut tb, TIMEOUT_S);
    sticks(&tb, "ClientIP");

    tb.write_manifest("connections.yaml", &manifest(&tb, false)).unwrap();
    expect_affinity(&mut tb, 0);
    for (ns, target) in [(&client_pod, cluster_ip), (&client, node_port)] {
        let answered = pods_of(&replies(&tb, ns, target, 30));
        println!("None: {ns} → {target}: {answered:?}");
        assert!(answered.len() > 1, "without affinity {ns} → {target} must be balanced, got {answered:?}");
    }

    tb.write_manifest("connections.yaml", &manifest(&tb, true)).unwrap();
    expect_affinity(&mut tb, TIMEOUT_S);
    sticks(&tb, "ClientIP again");
}

// ---------------------------------------------------------------------------------------
// 3. Terminating endpoints

/// A serving terminating endpoint gets no new connection while a ready one exists, and gets
/// them all once it is the only one left (kube-proxy's fallback): for Cluster policy (the
/// terminating pod on the other node, reached with SNAT) and for `externalTrafficPolicy:
/// Local`, where a local terminating pod is preferred over a ready pod on another node.
#[test]
fn serving_terminating_endpoints_are_the_fallback() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 30);
    const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 31);
    const PORTS: [Port; 1] = [("http", 80, 8080, Some(30330), "TCP")];
    const LOCAL_PORTS: [Port; 1] = [("http", 80, 8080, Some(30331), "TCP")];
    const TRIES: usize = 30;
    let spec = Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 1), ("web-2".into(), 0)],
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
    };
    let manifest = |tb: &Testbed, with_web0: bool| {
        let ready0 = if with_web0 { vec![("web-0", State::Ready)] } else { vec![] };
        let cluster = [ready0.clone(), vec![("web-1", State::Terminating)]].concat();
        let local = [ready0, vec![("web-2", State::Terminating), ("web-1", State::Ready)]].concat();
        nodes_yaml(tb)
            + &service_yaml("drain", "NodePort", CLUSTER_IP, &PORTS, "  externalTrafficPolicy: Cluster\n")
            + &slice_yaml(tb, "drain", &PORTS, &cluster)
            + &service_yaml(
                "drain-local",
                "NodePort",
                LOCAL_IP,
                &LOCAL_PORTS,
                "  externalTrafficPolicy: Local\n",
            )
            + &slice_yaml(tb, "drain-local", &LOCAL_PORTS, &local)
    };
    let node_a = NODE_A;
    let cluster_key = tcp(node_a, 30330);
    let local_key = tcp(node_a, 30331);
    let mut tb = up(&spec, |tb| manifest(tb, true), &[cluster_key, local_key]);
    let (web0, web1, web2) = (pod_ip(&tb, "web-0"), pod_ip(&tb, "web-1"), pod_ip(&tb, "web-2"));
    wait_for(&mut tb, 0, cluster_key, "web-0 only", |p| p.external == [web0]);
    wait_for(&mut tb, 0, local_key, "web-0 only", |p| p.external == [web0]);

    let client = tb.client.clone();
    let only = |tb: &Testbed, key: ServiceKey, pod: &str, client_ip: Ipv4Addr, phase: &str| {
        let target = SocketAddrV4::new(key.ip(), key.host_port());
        let answered = replies(tb, &client, target, TRIES);
        println!("{phase}: {target}: {:?}", traffic::tally_pods(&answered));
        assert_eq!(pods_of(&answered), BTreeSet::from([pod.to_string()]), "{phase}: {target}");
        for reply in &answered {
            assert_eq!(reply.client.ip(), client_ip, "{phase}: {target}: address {} saw", reply.pod);
        }
    };
    let client_ip = tb.client_ip;
    only(&tb, cluster_key, "web-0", client_ip, "ready web-0, terminating web-1");
    only(&tb, local_key, "web-0", client_ip, "Local, ready web-0 and web-1, terminating web-2");

    tb.write_manifest("connections.yaml", &manifest(&tb, false)).unwrap();
    wait_for(&mut tb, 0, cluster_key, "web-1 only", |p| p.external == [web1]);
    wait_for(&mut tb, 0, local_key, "web-2 only", |p| p.external == [web2]);
    // web-1 is on node-b: reached with SNAT to node-a's address.
    only(&tb, cluster_key, "web-1", node_a, "only terminating web-1");
    only(&tb, local_key, "web-2", client_ip, "Local, ready web-1 on node-b, terminating web-2");
}

// ---------------------------------------------------------------------------------------
// 4. Established connections

/// Connections established before an endpoint is removed (and another Service changed in the
/// same update) keep their backend and are answered, those on the removed endpoint included;
/// new connections no longer reach the removed endpoint.
#[test]
fn established_connections_survive_endpoint_removal_and_unrelated_changes() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 40);
    const OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 41);
    const PORTS: [Port; 1] = [("http", 80, 8080, None, "TCP")];
    const OTHER_PORTS: [Port; 2] = [("http", 80, 8080, None, "TCP"), ("alt", 81, 8081, None, "TCP")];
    // With 2 backends, all 28 connections miss web-1 with probability (1/2)^28 < 1e-8
    // (`checks::FALSE_FAILURE`).
    const OPEN: usize = 28;
    let spec = Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 1), ("curl".into(), 0)],
        tcp_ports: vec![8080, 8081],
        udp_ports: vec![8080],
    };
    let manifest = |tb: &Testbed, after: bool| {
        let endpoints: &[(&str, State)] = if after {
            &[("web-0", State::Ready)]
        } else {
            &[("web-0", State::Ready), ("web-1", State::Ready)]
        };
        let other_ports = if after { &OTHER_PORTS[..] } else { &OTHER_PORTS[..1] };
        nodes_yaml(tb)
            + &service_yaml("keep", "ClusterIP", CLUSTER_IP, &PORTS, "")
            + &slice_yaml(tb, "keep", &PORTS, endpoints)
            + &service_yaml("other", "ClusterIP", OTHER_IP, other_ports, "")
            + &slice_yaml(tb, "other", other_ports, &[("web-0", State::Ready)])
    };
    let key = tcp(CLUSTER_IP, 80);
    let mut tb = up(&spec, |tb| manifest(tb, false), &[key, tcp(OTHER_IP, 80)]);
    let (web0, web1) = (pod_ip(&tb, "web-0"), pod_ip(&tb, "web-1"));
    wait_for(&mut tb, 0, key, "web-0 and web-1", |p| p.internal == [web0, web1]);
    let client_pod = pod(&tb, "curl").clone();
    let target = SocketAddrV4::new(CLUSTER_IP, 80);

    // The connections live on a thread inside the client pod's namespace; it opens them,
    // reports, waits for the main thread to change the manifests, then uses them.
    let (opened_tx, opened_rx) = mpsc::channel::<Instant>();
    let (changed_tx, changed_rx) = mpsc::channel::<()>();
    let ns = client_pod.ns.clone();
    let connections = thread::spawn(move || {
        netns::within(&ns, move || -> anyhow::Result<Vec<anyhow::Result<Reply>>> {
            let streams = (0..OPEN)
                .map(|_| sockets::tcp_connect(target, Duration::from_secs(2)))
                .collect::<Result<Vec<_>, _>>()?;
            opened_tx.send(Instant::now())?;
            changed_rx.recv()?;
            Ok(streams.into_iter().map(|s| request(s, target)).collect())
        })
    });
    let opened = match opened_rx.recv() {
        Ok(opened) => opened,
        Err(_) => panic!("opening the connections failed: {:?}", connections.join()),
    };

    tb.write_manifest("connections.yaml", &manifest(&tb, true)).unwrap();
    wait_for(&mut tb, 0, key, "web-0 only", |p| p.internal == [web0] && p.value.internal_count == 1);
    wait_for(&mut tb, 0, tcp(OTHER_IP, 81), "the new port", |p| p.internal == [web0]);
    let idle = opened.elapsed();
    // kiada closes a connection that sends no request within 5 s.
    assert!(idle < Duration::from_millis(4500), "the update took {idle:?}: the server's read timeout is 5 s");
    changed_tx.send(()).unwrap();

    let answers = connections.join().expect("connection thread").expect("client namespace").expect("connect");
    let failures: Vec<String> =
        answers.iter().filter_map(|a| a.as_ref().err()).map(|e| format!("{e:#}")).collect();
    assert!(failures.is_empty(), "{} of {OPEN} established connections failed: {failures:?}", failures.len());
    let answers: Vec<Reply> = answers.into_iter().flatten().collect();
    println!("established before the change (idle {idle:?}): {:?}", traffic::tally_pods(&answers));
    let on_web1 = answers.iter().filter(|r| r.pod == "web-1").count();
    assert!(on_web1 >= 1, "no connection went to web-1 before its removal (p < 1e-8): {answers:?}");
    for reply in &answers {
        assert_eq!(reply.client.ip(), client_pod.ip, "{} must see the client pod", reply.pod);
    }

    let after = replies(&tb, &client_pod.ns, target, 20);
    println!("new connections after the change: {:?}", traffic::tally_pods(&after));
    assert_eq!(
        pods_of(&after),
        BTreeSet::from(["web-0".to_string()]),
        "new connections after removing web-1"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Path MTU discovery through SNAT

/// The only endpoint of a NodePort is on node-b behind a link of MTU 1200: node-b answers
/// the external client's full-size segments (SNATed by node-a) with "fragmentation needed"
/// to node-a's address, node-a translates it back to the client, the client lowers its path
/// MTU and a 20,000 byte upload gets through.
#[test]
fn path_mtu_discovery_works_through_snat() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 3, 50);
    const NODE_PORT: u16 = 30350;
    const PORTS: [Port; 1] = [("http", 80, 8080, Some(NODE_PORT), "TCP")];
    let spec =
        Spec { nodes: 2, pods: vec![("web-b".into(), 1)], tcp_ports: vec![8080], udp_ports: vec![8080] };
    let node_a = NODE_A;
    let key = tcp(node_a, NODE_PORT);
    let mut tb = up(
        &spec,
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("upload", "NodePort", CLUSTER_IP, &PORTS, "")
                + &slice_yaml(tb, "upload", &PORTS, &[("web-b", State::Ready)])
        },
        &[key],
    );
    let web_b = pod(&tb, "web-b").clone();
    wait_for(&mut tb, 0, key, "web-b", |p| p.external == [web_b.ip]);
    let node_b = tb.nodes[1].ns.clone();
    // The node side of web-b's veth (the first pod of node-b) is the narrow link.
    let route = netns::run(&node_b, "ip", &["route", "get", &web_b.ip.to_string()]).unwrap();
    assert!(route.contains("dev pod0"), "web-b is not behind pod0: {route}");
    netns::ip(&["-n", &node_b, "link", "set", "pod0", "mtu", "1200"]).unwrap();
    let client_route = || netns::run(&tb.client, "ip", &["route", "get", &node_a.to_string()]).unwrap();
    let before = client_route();
    assert!(!before.contains("mtu"), "the client knows a path MTU before any traffic: {before}");

    let target = SocketAddrV4::new(node_a, NODE_PORT);
    let started = Instant::now();
    let reply = netns::within(&tb.client, move || kiada::post(target, 20_000, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("20,000 byte POST to {target} through a 1200 byte link: {e:#}"));
    println!("POST answered by {} after {:?}", reply, started.elapsed());
    assert_eq!(reply.pod, "web-b");
    assert_eq!(reply.client.ip(), node_a, "web-b is reached with SNAT to node-a");

    let after = client_route();
    println!("client route to node-a after the upload: {}", after.trim());
    assert!(after.contains("mtu 1200"), "the client did not learn the path MTU: {after}");
}
