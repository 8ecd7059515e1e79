//! Kubernetes' `[sig-network] Conntrack` e2e tests, and the Services ones about connection
//! state (session affinity timeouts), on the namespace cluster in the production
//! configuration: each test is named after the e2e test it stands for and sends real traffic
//! through the agents' programs. docs/CONFORMANCE.md maps the whole list.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use lb_common::{proto, service::ServiceKey};
use xlb_tests::{
    checks::nodes_yaml,
    frame::{self, ACK},
    netns, raw,
    services::*,
    sockets,
    testbed::{self, Testbed},
};

fn udp(addr: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey::new(addr, port, proto::UDP)
}

// ---------------------------------------------------------------------------------------
// UDP flows while endpoints change

/// The LoadBalancer and internalTrafficPolicy variants of e2e `[sig-network] Conntrack should
/// be able to preserve UDP traffic when server pod cycles for a ...` (the ClusterIP and
/// NodePort ones are in production_nodes.rs): a client that keeps its source port reaches the
/// new endpoint once the old one is removed, the old pod still running and answering.
/// - `LoadBalancers should be able to preserve UDP traffic when server pod cycles for a
///   LoadBalancer service on different nodes` / `... on the same nodes`: the external client
///   to the LoadBalancer IP, the endpoint moving to the other node or staying on node-a;
/// - `... for a ClusterIP service with InternalTrafficPolicy set to Local`: a pod on node-a
///   whose only local endpoint goes; its datagrams are dropped (the other node's endpoint is
///   not for it) until a new local endpoint comes, which then answers.
#[test]
fn conntrack_should_be_able_to_preserve_udp_traffic_for_load_balancer_and_internal_traffic_policy_local() {
    const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 6, 100);
    const LB_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 6, 10);
    const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 6, 11);
    const LB_PORTS: [Port; 1] = [("udp", 80, 8080, Some(30610), "UDP")];
    const LOCAL_PORTS: [Port; 1] = [("udp", 80, 8080, None, "UDP")];
    let lb = |tb: &Testbed, pod: &str| {
        service_yaml("svc-lb", "LoadBalancer", LB_CLUSTER_IP, &LB_PORTS, "")
            .replace("---\n", &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {LB_IP}\n---\n"))
            + &slice_yaml(tb, "svc-lb", &LB_PORTS, &[(pod, State::Ready)])
    };
    let local = |tb: &Testbed, pods: &[&str]| {
        service_yaml("svc-local", "ClusterIP", LOCAL_IP, &LOCAL_PORTS, "  internalTrafficPolicy: Local\n")
            + &slice_yaml(
                tb,
                "svc-local",
                &LOCAL_PORTS,
                &pods.iter().map(|p| (*p, State::Ready)).collect::<Vec<_>>(),
            )
    };
    let pods = [("server-a1", 0), ("server-a2", 0), ("server-b", 1), ("curl", 0)];
    let manifest = |tb: &Testbed, lb_pod: &str, local_pods: &[&str]| {
        nodes_yaml(tb) + &lb(tb, lb_pod) + &local(tb, local_pods)
    };
    let mut tb = up(
        &spec(&pods),
        |tb| manifest(tb, "server-a1", &["server-a1", "server-b"]),
        &[udp(LB_IP, 80), udp(LOCAL_IP, 80)],
    );
    // The external client routes the LoadBalancer IP through node-a, as an L2 or BGP
    // announcement would make it.
    netns::run(&tb.client, "ip", &["route", "add", &format!("{LB_IP}/32"), "via", &NODE_A.to_string()])
        .expect("route");
    let client = tb.client.clone();
    let curl = pod(&tb, "curl").ns.clone();
    let lb_target = SocketAddrV4::new(LB_IP, 80);
    let local_target = SocketAddrV4::new(LOCAL_IP, 80);
    udp_until(&tb, &client, lb_target, 54321, "server-a1", Duration::from_secs(5));
    udp_until(&tb, &curl, local_target, 12345, "server-a1", Duration::from_secs(5));

    // Different nodes: the LoadBalancer's endpoint moves to node-b; the only local endpoint
    // of the ITP=Local Service goes.
    tb.write_manifest("connections.yaml", &manifest(&tb, "server-b", &["server-b"])).expect("manifest");
    let server_b = pod_ip(&tb, "server-b");
    wait_for(&mut tb, 0, udp(LB_IP, 80), "server-b", |p| p.external == [server_b]);
    wait_for(&mut tb, 0, udp(LOCAL_IP, 80), "no local endpoint", |p| p.internal.is_empty());
    let answered = udp_until(&tb, &client, lb_target, 54321, "server-b", Duration::from_secs(5));
    println!("LoadBalancer, endpoint on another node: {answered:?}");
    let silent = udp_from_port(&tb, &curl, local_target, 12345, None, Duration::from_secs(1));
    assert!(silent.is_empty(), "ITP=Local without a local endpoint must not answer: {silent:?}");

    // Same node: the LoadBalancer's endpoint comes back to node-a (another pod); a new local
    // endpoint appears for the ITP=Local Service.
    tb.write_manifest("connections.yaml", &manifest(&tb, "server-a2", &["server-a2", "server-b"]))
        .expect("manifest");
    let server_a2 = pod_ip(&tb, "server-a2");
    wait_for(&mut tb, 0, udp(LB_IP, 80), "server-a2", |p| p.external == [server_a2]);
    wait_for(&mut tb, 0, udp(LOCAL_IP, 80), "server-a2 local", |p| p.internal == [server_a2]);
    let answered = udp_until(&tb, &client, lb_target, 54321, "server-a2", Duration::from_secs(5));
    println!("LoadBalancer, endpoint on the same node: {answered:?}");
    let answered = udp_until(&tb, &curl, local_target, 12345, "server-a2", Duration::from_secs(5));
    println!("ITP=Local, new local endpoint: {answered:?}");
}

/// e2e `[sig-network] Conntrack should be able to preserve UDP traffic when initial unready
/// endpoints get ready`: a pod keeps sending from one source port to a UDP ClusterIP whose
/// only endpoint is not ready yet (refused: no usable endpoint), then gets ready: the
/// client's next datagrams reach it. Nothing of the refused datagrams may hold the flow.
#[test]
fn conntrack_should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 6, 20);
    const PORTS: [Port; 1] = [("udp", 80, 8080, None, "UDP")];
    let manifest = |tb: &Testbed, state: State| {
        nodes_yaml(tb)
            + &service_yaml("svc-udp", "ClusterIP", CLUSTER_IP, &PORTS, "")
            + &slice_yaml(tb, "svc-udp", &PORTS, &[("pod-server-1", state)])
    };
    let mut tb = up(
        &spec(&[("pod-server-1", 1), ("curl", 0)]),
        |tb| manifest(tb, State::NotReady),
        &[udp(CLUSTER_IP, 80)],
    );
    let curl = pod(&tb, "curl").ns.clone();
    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    let unready = udp_from_port(&tb, &curl, target, 12345, None, Duration::from_secs(1));
    assert!(unready.is_empty(), "an unready endpoint must get nothing: {unready:?}");
    tb.write_manifest("connections.yaml", &manifest(&tb, State::Ready)).expect("manifest");
    let server = pod_ip(&tb, "pod-server-1");
    wait_for(&mut tb, 0, udp(CLUSTER_IP, 80), "ready", |p| p.internal == [server]);
    let started = Instant::now();
    let answered = udp_until(&tb, &curl, target, 12345, "pod-server-1", Duration::from_secs(5));
    println!("answered {answered:?} {:?} after the endpoint got ready", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// Session affinity timeouts

/// e2e `[sig-network] Services should have session affinity timeout work for service with type
/// clusterIP [LinuxOnly]` and `... for NodePort service [LinuxOnly]`: with `timeoutSeconds`,
/// a client sticks to one pod while it keeps coming back within the timeout, and is balanced
/// afresh once it stayed away longer. A pod reaches ClusterIPs (socket balancing, affinity per
/// pod) and the external client NodePorts (the XDP or TC path, affinity per address). Seven
/// Services with three pods each: after the timeout, every one of them keeping its pod in two
/// rounds has probability (1/3)^14 < 1e-6 if affinity had expired as it should.
#[test]
fn services_should_have_session_affinity_timeout_work_for_cluster_ip_and_node_port_services() {
    const SERVICES: u8 = 7;
    const TIMEOUT_S: u64 = 2;
    let ports = |i: u8| -> [Port; 1] { [("http", 80, 8080, Some(30620 + u16::from(i)), "TCP")] };
    let cluster_ip = |i: u8| Ipv4Addr::new(198, 19, 6, 30 + i);
    let affinity = format!("  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {TIMEOUT_S}\n");
    let backends = [("web-0", State::Ready), ("web-1", State::Ready), ("web-2", State::Ready)];
    let keys: Vec<ServiceKey> =
        (0..SERVICES).flat_map(|i| [tcp(cluster_ip(i), 80), tcp(NODE_A, 30620 + u16::from(i))]).collect();
    let tb = up(
        &spec(&[("web-0", 0), ("web-1", 1), ("web-2", 0), ("curl", 0)]),
        |tb| {
            let mut yaml = nodes_yaml(tb);
            for i in 0..SERVICES {
                let name = format!("sticky-{i}");
                yaml += &service_yaml(&name, "NodePort", cluster_ip(i), &ports(i), &affinity);
                yaml += &slice_yaml(tb, &name, &ports(i), &backends);
            }
            yaml
        },
        &keys,
    );
    let curl = pod(&tb, "curl").ns.clone();
    let client = tb.client.clone();
    // One request to every Service of a client; the pod of each.
    let round = |ns: &str, target: &dyn Fn(u8) -> SocketAddrV4| -> Vec<String> {
        (0..SERVICES).map(|i| replies(&tb, ns, target(i), 1)[0].pod.clone()).collect()
    };
    let clients: [(&str, &str, Box<dyn Fn(u8) -> SocketAddrV4>); 2] = [
        ("pod → ClusterIP", &curl, Box::new(|i| SocketAddrV4::new(cluster_ip(i), 80))),
        ("client → NodePort", &client, Box::new(|i| SocketAddrV4::new(NODE_A, 30620 + u16::from(i)))),
    ];
    for (what, ns, target) in &clients {
        let first = round(ns, target);
        // Within the timeout: the same pods, round after round.
        for _ in 0..5 {
            assert_eq!(round(ns, target), first, "{what}: within the timeout every Service keeps its pod");
        }
        // Away longer than the timeout, twice: some Service must have moved.
        let mut moved = false;
        for _ in 0..2 {
            // The behaviour under test is a timeout: only time passing can show it.
            thread::sleep(Duration::from_millis(TIMEOUT_S * 1000 + 300));
            let again = round(ns, target);
            println!("{what}: {first:?} then, after the timeout, {again:?}");
            moved |= again != first;
        }
        assert!(moved, "{what}: after the timeout affinity must expire and balance afresh");
    }
}

// ---------------------------------------------------------------------------------------
// The invalid conntrack state bug

/// e2e `[sig-network] Conntrack proxy implementation should not be vulnerable to the invalid
/// conntrack state bug [Privileged]` (earlier: `should drop INVALID conntrack entries`): the
/// server pod of a ClusterIP connection sends the client a segment far out of its window,
/// which netfilter calls INVALID; a proxy that then fails to translate it back leaks it with
/// the pod's address, and the client, knowing no such connection, resets it. Through xlb the
/// connection survives: no reset, nothing reaches the client from the pod's own address, and
/// data still flows both ways. For a client pod under the agent's cgroup (socket balancing:
/// connected to the pod itself) and one outside it (the TC path: connected to the ClusterIP,
/// replies translated at its veth); `XLB_REALISTIC_NODE=1` runs it with nodes dropping INVALID.
#[test]
fn conntrack_proxy_implementation_should_not_be_vulnerable_to_the_invalid_conntrack_state_bug() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 6, 50);
    const PORTS: [Port; 1] = [("boom", 80, 9090, None, "TCP")];
    let tb = up(
        &spec(&[("boom-server", 1), ("curl", 0)]),
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("boom", "ClusterIP", CLUSTER_IP, &PORTS, "")
                + &slice_yaml(tb, "boom", &PORTS, &[("boom-server", State::Ready)])
        },
        &[tcp(CLUSTER_IP, 80)],
    );
    let server = pod(&tb, "boom-server").clone();
    let curl = pod(&tb, "curl").clone();
    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    for via_sockets in [true, false] {
        let what = if via_sockets { "socket balancing" } else { "TC path" };
        // The server side, in the server pod: accept, learn where the server's sequence is
        // from the client's ACK, inject the out-of-window segment, then echo a line.
        let (listening_tx, listening_rx) = mpsc::channel();
        let (injected_tx, injected_rx) = mpsc::channel();
        let server_ip = server.ip;
        let server_side = netns::spawn(&server.ns, move || -> anyhow::Result<Vec<raw::Tcp>> {
            let capture = raw::capture("eth0", Duration::from_millis(100))?;
            let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 9090))?;
            listening_tx.send(())?;
            let (mut stream, peer) = listener.accept()?;
            let std::net::SocketAddr::V4(peer) = peer else { anyhow::bail!("IPv6 peer") };
            let mut line = [0u8; 6];
            // "hello\n"; the client's last segment acknowledges everything the server sent.
            stream.read_exact(&mut line)?;
            let mut buf = vec![0u8; 65536];
            let mut last_from_client = None;
            let deadline = Instant::now() + Duration::from_secs(2);
            while last_from_client.is_none() && Instant::now() < deadline {
                while let Some(n) = raw::next(&capture, &mut buf) {
                    if let Some(seg) = raw::tcp(&buf[..n]).filter(|s| s.src == peer && s.flags & ACK != 0) {
                        last_from_client = Some(seg);
                    }
                }
            }
            let client_seg =
                last_from_client.ok_or_else(|| anyhow::anyhow!("no segment of the client seen"))?;
            let seq = client_seg.ack.wrapping_add(1 << 30);
            let out_of_window = frame::tcp_seq(
                SocketAddrV4::new(server_ip, 9090),
                peer,
                ACK,
                seq,
                client_seg.seq.wrapping_add(client_seg.payload_len as u32),
            );
            raw::send(&raw::sender()?, &out_of_window[14..], *peer.ip())?;
            injected_tx.send(seq)?;
            stream.write_all(b"after\n")?;
            // "again\n"; then what the client sent the server meanwhile, for resets.
            stream.read_exact(&mut line)?;
            let mut seen = Vec::new();
            while let Some(n) = raw::next(&capture, &mut buf) {
                seen.extend(raw::tcp(&buf[..n]).filter(|s| s.src == peer));
            }
            Ok(seen)
        })
        .expect("server namespace");
        if let Err(e) = listening_rx.recv_timeout(Duration::from_secs(5)) {
            let why = match server_side.join() {
                Ok(Ok(Err(e))) => format!("{e:#}"),
                _ => "the server thread failed".into(),
            };
            panic!("{what}: the server is not listening ({e}): {why}");
        }

        let server_addr = server.ip;
        let client_side =
            netns::within(&curl.ns, move || -> anyhow::Result<(Vec<raw::Tcp>, usize, String)> {
                let capture = raw::capture("eth0", Duration::from_millis(100))?;
                let connect = || sockets::tcp_connect(target, Duration::from_secs(2));
                let mut stream = if via_sockets { connect()? } else { sockets::bypass(connect)? };
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.write_all(b"hello\n")?;
                let injected = injected_rx.recv_timeout(Duration::from_secs(5))?;
                let mut line = [0u8; 6];
                stream.read_exact(&mut line)?;
                stream.write_all(b"again\n")?;
                let mut buf = vec![0u8; 65536];
                let (mut from_pod, mut delivered) = (Vec::new(), 0);
                while let Some(n) = raw::next(&capture, &mut buf) {
                    let Some(seg) = raw::tcp(&buf[..n]) else { continue };
                    // Anything from the server pod's own address to a client connected to the
                    // ClusterIP leaked untranslated.
                    if *seg.src.ip() == server_addr {
                        from_pod.push(seg);
                    }
                    delivered += usize::from(seg.seq == injected);
                }
                Ok((from_pod, delivered, String::from_utf8_lossy(&line).into_owned()))
            })
            .expect("client namespace");
        let (from_pod, delivered, line) =
            client_side.unwrap_or_else(|e| panic!("{what}: the client's connection broke: {e:#}"));
        let seen_by_server = server_side
            .join()
            .expect("server thread")
            .expect("entering")
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        println!(
            "{what}: client read {line:?}; the out-of-window segment reached it {delivered} times; the server saw {} segments of the client",
            seen_by_server.len()
        );
        // Nodes that drop INVALID packets never forward it; others deliver it, translated.
        assert_eq!(delivered > 0, !testbed::realistic_node(), "{what}: the out-of-window segment's delivery");
        assert_eq!(line, "after\n", "{what}");
        let resets: Vec<&raw::Tcp> = seen_by_server.iter().filter(|s| s.flags & 0x04 != 0).collect();
        assert!(resets.is_empty(), "{what}: the client reset the connection: {resets:?}");
        if !via_sockets {
            assert!(from_pod.is_empty(), "{what}: segments reached the client untranslated: {from_pod:?}");
        }
    }
}
