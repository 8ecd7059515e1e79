//! What breaks only on nodes configured as in production, and is fixed: pods with the kernel's
//! default offloads, pods whose processes sit under the agent's `--cgroup-path`, external
//! interfaces that are veths without an XDP program on their peer (kind nodes, with
//! `XLB_KIND_NODE=1`), UDP clients that keep their source port while endpoints change, and
//! large transfers with TSO/GSO on every translated path. Each test failed on the code
//! before its fix; each proves its claim with traffic through the agents' programs.
use std::{
    collections::BTreeSet,
    io::{self, BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    conntrack::{CtEntry, CtKey},
    maps, proto,
    service::ServiceKey,
};
use serde_json::Value;
use xlb_tests::{
    bin_path,
    checks::{metric, nodes_yaml, scrape},
    kiada::{self, Reply},
    netns,
    services::*,
    sockets,
    testbed::{self, Testbed},
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `result` failed with "connection refused" (a TCP RST or an ICMP port unreachable
/// turned into ECONNREFUSED by the client's socket).
fn refused<T>(result: &anyhow::Result<T>) -> bool {
    result.as_ref().err().is_some_and(|e| {
        e.chain().any(|c| {
            c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::ConnectionRefused)
        })
    })
}

/// One request over `protocol` to `target`, from the current thread's namespace.
fn ask(protocol: u8, target: SocketAddrV4) -> anyhow::Result<Reply> {
    match protocol {
        proto::TCP => kiada::get_tcp(target, TIMEOUT).map(|(reply, _)| reply),
        _ => kiada::get_udp(target, TIMEOUT).map(|(reply, _)| reply),
    }
}

fn udp(addr: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey::new(addr, port, proto::UDP)
}

fn proto_name(protocol: u8) -> &'static str {
    if protocol == proto::TCP {
        "TCP"
    } else {
        "UDP"
    }
}

/// How a client pod's sockets reach a Service.
#[derive(Clone, Copy, Debug)]
enum PodClient {
    /// Its processes are under the agent's `--cgroup-path` (production): TCP is balanced
    /// by the socket programs, UDP by its veth's TC path.
    InCgroup,
    /// Its processes are outside it: everything takes the TC path.
    OutsideCgroup,
    /// Outside it, and its veth sends complete checksums (tx offload off at both ends).
    OutsideCgroupOffloadsOff,
}

/// Runs `f` in pod `pod`'s namespace as `client` says.
fn from_pod<T: Send + 'static>(
    tb: &Testbed,
    pod: &str,
    client: PodClient,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    tb.set_pod_tx_offload(pod, !matches!(client, PodClient::OutsideCgroupOffloadsOff)).expect("ethtool");
    let ns = xlb_tests::services::pod(tb, pod).ns.clone();
    netns::within(&ns, move || match client {
        PodClient::InCgroup => f(),
        PodClient::OutsideCgroup | PodClient::OutsideCgroupOffloadsOff => sockets::bypass(f),
    })
    .expect("pod namespace")
}

// ---------------------------------------------------------------------------------------
// Services without endpoints

/// A Service without endpoints refuses connections at once, as kube-proxy's REJECT does (e2e
/// `[sig-network] Services should be rejected when no endpoints exist`): TCP and UDP, from a
/// pod under the agent's cgroup (socket balancing for TCP, the TC path for UDP), from a pod
/// outside it (the TC path: a pod with default offloads hands TC partial-checksum skbs, which
/// the reject used to fail on, so the client waited for its timeout), from one whose veth
/// sends complete checksums, and from outside the cluster through a NodePort (XDP_TX on the
/// default testbed; on kind-style nodes, where a veth peer without XDP drops what XDP_TX
/// sends, TC). `xlb inspect interfaces` and `/metrics` show which hook took `eth0`.
#[test]
fn services_should_be_rejected_when_no_endpoints_exist() {
    const EMPTY_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 10);
    const NODE_PORT: u16 = 30510;
    const PORTS: [Port; 2] =
        [("tcp", 80, 8080, Some(NODE_PORT), "TCP"), ("udp", 80, 8080, Some(NODE_PORT), "UDP")];
    let keys = [tcp(EMPTY_IP, 80), udp(EMPTY_IP, 80), tcp(NODE_A, NODE_PORT), udp(NODE_A, NODE_PORT)];
    let tb = up(
        &spec(&[("web-0", 0), ("curl", 0)]),
        |tb| nodes_yaml(tb) + &service_yaml("empty", "NodePort", EMPTY_IP, &PORTS, ""),
        &keys,
    );

    let mut failures = Vec::new();
    let mut check = |what: String, result: anyhow::Result<Reply>, took: Duration| {
        println!(
            "{what}: {:?} after {took:?}",
            result.as_ref().map(|r| &r.pod).map_err(|e| format!("{e:#}"))
        );
        if !refused(&result) || took > Duration::from_secs(1) {
            failures.push(format!("{what}: {:?} after {took:?}", result.map_err(|e| format!("{e:#}"))));
        }
    };
    for client in [PodClient::InCgroup, PodClient::OutsideCgroup, PodClient::OutsideCgroupOffloadsOff] {
        for protocol in [proto::TCP, proto::UDP] {
            let started = Instant::now();
            let result =
                from_pod(&tb, "curl", client, move || ask(protocol, SocketAddrV4::new(EMPTY_IP, 80)));
            check(format!("pod {client:?} {} ClusterIP", proto_name(protocol)), result, started.elapsed());
        }
    }
    for protocol in [proto::TCP, proto::UDP] {
        let started = Instant::now();
        let target = SocketAddrV4::new(NODE_A, NODE_PORT);
        let result = netns::within(&tb.client, move || ask(protocol, target)).expect("client namespace");
        check(format!("external {} NodePort", proto_name(protocol)), result, started.elapsed());
    }
    assert!(failures.is_empty(), "not refused at once:\n{}", failures.join("\n"));

    // Which hook took node-a's eth0, as the agent chose it.
    let hook = if testbed::kind_node() { "tc" } else { "xdp" };
    let out = Command::new(bin_path("xlb"))
        .args(["inspect", "interfaces", "-o", "json", "--bpffs-dir"])
        .arg(&tb.nodes[0].bpffs_dir)
        .output()
        .expect("xlb inspect");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let eth0 = rows.iter().find(|r| r["interface"] == "eth0").expect("eth0 in xlb inspect interfaces");
    let ingress = if hook == "tc" { "tc_external" } else { "xdp_ingress" };
    let hooks: BTreeSet<&str> =
        eth0["hooks"].as_array().expect("hooks").iter().filter_map(Value::as_str).collect();
    assert_eq!(hooks, BTreeSet::from([ingress, "tc_egress"]), "eth0's hooks");
    let metrics = scrape(&tb, 0).expect("metrics");
    let series = format!("xlb_external_interface_hook{{interface=\"eth0\",hook=\"{hook}\"}}");
    assert_eq!(metric(&metrics, &series), Some(1.0), "{series} in /metrics");
}

// ---------------------------------------------------------------------------------------
// UDP flows when endpoints change

/// A UDP client that keeps its source port moves to a serving endpoint once its endpoint
/// is removed, through a ClusterIP from a pod (the TC path) and through a NodePort from
/// outside (XDP or TC, and SNAT to the other node); a node process's connected UDP socket,
/// which the socket programs pointed at the endpoint, is destroyed and its next one reaches
/// the serving endpoint: e2e `[sig-network] Conntrack should be
/// able to preserve UDP traffic when server pod cycles for a ClusterIP service` / `... for a
/// NodePort service`. The removed pod keeps running and answering, so only the agent's
/// flushing of the flow can move the client; before, it reached the removed pod for as long
/// as it sent.
#[test]
fn conntrack_should_be_able_to_preserve_udp_traffic_when_server_pod_cycles() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 20);
    const NODE_PORT: u16 = 30520;
    const PORTS: [Port; 1] = [("udp", 80, 8080, Some(NODE_PORT), "UDP")];
    let manifest = |tb: &Testbed, pod: &str| {
        nodes_yaml(tb)
            + &service_yaml("svc-udp", "NodePort", CLUSTER_IP, &PORTS, "")
            + &slice_yaml(tb, "svc-udp", &PORTS, &[(pod, State::Ready)])
    };
    let keys = [udp(CLUSTER_IP, 80), udp(NODE_A, NODE_PORT)];
    let mut tb = up(
        &spec(&[("pod-server-1", 0), ("pod-server-2", 1), ("curl", 0)]),
        |tb| manifest(tb, "pod-server-1"),
        &keys,
    );
    let server_2 = pod_ip(&tb, "pod-server-2");
    let curl = xlb_tests::services::pod(&tb, "curl").ns.clone();
    let client = tb.client.clone();
    let paths = [
        ("pod → ClusterIP", curl, SocketAddrV4::new(CLUSTER_IP, 80)),
        ("client → NodePort", client, SocketAddrV4::new(NODE_A, NODE_PORT)),
    ];
    // A node process with a connected UDP socket, as a resolver keeps one: the socket
    // programs pointed it at pod-server-1 at connect().
    let mut resolver = tb
        .host_command(0, &bin_path("kiada"))
        .args(["udp-stream", &SocketAddrV4::new(CLUSTER_IP, 80).to_string(), "--until", "pod-server-2"])
        .args(["--within", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("kiada udp-stream");
    let mut resolver_lines =
        BufReader::new(resolver.stdout.take().expect("piped")).lines().map_while(Result::ok);
    let first = resolver_lines.next();
    assert_eq!(first.as_deref(), Some("answer pod-server-1"), "the node process's first answer");
    for (what, ns, target) in &paths {
        let answered = udp_until(&tb, ns, *target, 12345, "pod-server-1", Duration::from_secs(5));
        println!("{what}: {answered:?}");
    }
    tb.write_manifest("connections.yaml", &manifest(&tb, "pod-server-2")).expect("manifest");
    for key in keys {
        wait_for(&mut tb, 0, key, "pod-server-2 only", |p| p.external == [server_2]);
    }
    for (what, ns, target) in &paths {
        let started = Instant::now();
        let answered = udp_until(&tb, ns, *target, 12345, "pod-server-2", Duration::from_secs(5));
        println!("{what} after the change: {answered:?} within {:?}", started.elapsed());
    }
    // The node process's socket was destroyed (it saw ECONNABORTED), and its new one reached
    // pod-server-2.
    let rest: Vec<String> = resolver_lines.collect();
    let status = resolver.wait().expect("kiada udp-stream");
    println!(
        "node process, connected socket: {} answers, then {:?}",
        rest.len(),
        rest.iter().rev().take(3).collect::<Vec<_>>()
    );
    assert!(
        status.success(),
        "the node process's connected socket never reached pod-server-2: {:?}",
        rest.last()
    );
    assert!(rest.iter().any(|l| l == "aborted"), "its socket was not destroyed: {:?}", rest.last());
}

// ---------------------------------------------------------------------------------------
// Session affinity under socket balancing

/// ClientIP session affinity is kept per client pod when pods reach a ClusterIP through socket
/// balancing (their processes under the agent's `--cgroup-path`, as in production), as
/// kube-proxy keeps it per client address: two pods get an entry each, keyed by their network
/// namespace, and each sticks to its backend. Before, every pod of a node shared the node's
/// entry. The connections made no conntrack entry: the socket programs balanced them.
#[test]
fn session_affinity_is_kept_per_client_pod_under_socket_balancing() {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 30);
    const PORTS: [Port; 1] = [("http", 80, 8080, None, "TCP")];
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n";
    let backends = [("web-0", State::Ready), ("web-1", State::Ready), ("web-2", State::Ready)];
    let mut tb = up(
        &spec(&[("web-0", 0), ("web-1", 1), ("web-2", 0), ("curl", 0), ("curl-2", 0)]),
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("sticky", "ClusterIP", CLUSTER_IP, &PORTS, affinity)
                + &slice_yaml(tb, "sticky", &PORTS, &backends)
        },
        &[tcp(CLUSTER_IP, 80)],
    );
    wait_for(&mut tb, 0, tcp(CLUSTER_IP, 80), "3 backends", |p| p.internal.len() == 3);
    let target = SocketAddrV4::new(CLUSTER_IP, 80);
    for client in ["curl", "curl-2"] {
        let answered = pods_of(&replies(&tb, &xlb_tests::services::pod(&tb, client).ns.clone(), target, 10));
        println!("{client}: {answered:?}");
        assert_eq!(answered.len(), 1, "{client} must stick to one pod, got {answered:?}");
    }

    let dir = &tb.nodes[0].bpffs_dir;
    let affinity: HashMap<MapData, AffinityKey, AffinityEntry> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(dir.join(maps::AFFINITY)).expect("pin")))
            .expect("map");
    let keys: Vec<AffinityKey> = affinity.keys().collect::<Result<_, _>>().expect("affinity keys");
    println!("affinity keys: {keys:?}");
    assert_eq!(keys.len(), 2, "one affinity entry per client pod, got {keys:?}");
    assert!(
        keys.iter().all(|k| k.client_addr == 0 && k.netns_cookie != 0),
        "keyed by network namespace: {keys:?}"
    );
    assert_ne!(keys[0].netns_cookie, keys[1].netns_cookie);

    let conntrack: HashMap<MapData, CtKey, CtEntry> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(dir.join(maps::CONNTRACK)).expect("pin")))
            .expect("map");
    let clients: BTreeSet<Ipv4Addr> = [pod_ip(&tb, "curl"), pod_ip(&tb, "curl-2")].into();
    let tracked: Vec<CtKey> = conntrack
        .keys()
        .filter_map(Result::ok)
        .filter(|k| clients.contains(&Ipv4Addr::from(u32::from_be(k.saddr))))
        .collect();
    assert!(tracked.is_empty(), "socket-balanced connections need no conntrack entry: {tracked:?}");
}

// ---------------------------------------------------------------------------------------
// Large transfers

/// 20 MB each way through every translated path, with the pods' TSO/GSO on: NodePort to a
/// pod on the node (DNAT), NodePort to a pod on the other node (DNAT and SNAT), ClusterIP from
/// a pod through its veth's TC path, and ClusterIP from a pod through socket balancing. Every
/// byte arrives, in order and intact. And UDP datagrams of 4,000 bytes, which leave as IP
/// fragments both ways (netfilter would reassemble them before NAT; the programs translate
/// every fragment), on the same paths: every one is echoed whole (e2e `[sig-network]
/// Networking Granular Checks: Services should be able to handle large requests: udp`).
#[test]
fn large_transfers_arrive_whole_on_every_translated_path() {
    const LEN: u64 = 20_000_000;
    const LOCAL_PORT: u16 = 30530;
    const REMOTE_PORT: u16 = 30531;
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 40);
    const LOCAL: [Port; 2] =
        [("http", 80, 8080, Some(LOCAL_PORT), "TCP"), ("udp", 80, 8080, Some(LOCAL_PORT), "UDP")];
    const REMOTE: [Port; 2] =
        [("http", 80, 8080, Some(REMOTE_PORT), "TCP"), ("udp", 80, 8080, Some(REMOTE_PORT), "UDP")];
    let tb = up(
        &spec(&[("web-0", 0), ("web-1", 1), ("curl", 0)]),
        |tb| {
            nodes_yaml(tb)
                + &service_yaml("local", "NodePort", Ipv4Addr::new(198, 19, 5, 41), &LOCAL, "")
                + &slice_yaml(tb, "local", &LOCAL, &[("web-0", State::Ready)])
                + &service_yaml("remote", "NodePort", CLUSTER_IP, &REMOTE, "")
                + &slice_yaml(tb, "remote", &REMOTE, &[("web-1", State::Ready)])
        },
        &[tcp(NODE_A, LOCAL_PORT), tcp(NODE_A, REMOTE_PORT), tcp(CLUSTER_IP, 80), udp(CLUSTER_IP, 80)],
    );
    let transfer = |target: SocketAddrV4| -> anyhow::Result<()> {
        let timeout = Duration::from_secs(10);
        kiada::download(target, LEN, timeout)?;
        let reply = kiada::post(target, LEN as usize, timeout)?;
        anyhow::ensure!(reply.pod.starts_with("web-"), "answered by {reply:?}");
        for _ in 0..5 {
            kiada::udp_echo(target, 4000, Duration::from_secs(2))?;
        }
        Ok(())
    };
    let mut failures = Vec::new();
    let external = [("NodePort, local pod", LOCAL_PORT), ("NodePort, pod on node-b (SNAT)", REMOTE_PORT)];
    for (what, port) in external {
        let target = SocketAddrV4::new(NODE_A, port);
        let result = netns::within(&tb.client, move || transfer(target)).expect("client namespace");
        println!("{what}: {result:?}");
        failures.extend(result.err().map(|e| format!("{what}: {e:#}")));
    }
    for client in [PodClient::OutsideCgroup, PodClient::InCgroup] {
        let target = SocketAddrV4::new(CLUSTER_IP, 80);
        let result = from_pod(&tb, "curl", client, move || transfer(target));
        println!("ClusterIP from a pod, {client:?}: {result:?}");
        failures.extend(result.err().map(|e| format!("ClusterIP from a pod {client:?}: {e:#}")));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
