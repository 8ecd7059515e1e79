//! Services on a testbed, for the integration tests: Service and EndpointSlice manifests,
//! bringing a cluster up with agents that programmed them, what the agents' maps hold, and
//! traffic that must be answered.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{
    backend::{Backend, BackendKey},
    maps, proto,
    service::{ServiceKey, ServiceValue},
};

use crate::{
    bin_path,
    kiada::{self, Reply},
    netns, sockets,
    testbed::{self, Spec, Testbed},
    traffic,
};

/// How long an agent may take to start and program its first state.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent may take to program a rewritten manifest.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(15);
/// node-a's fabric address, where the external client reaches its NodePorts.
pub const NODE_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

// Testbed conventions every Spec using these follows: a client pod is called `curl`, never
// `client` (its namespace would be the external client's, `xlb-<run>-client`), and
// `udp_ports` is never empty (kiada's `--udp` does not accept an empty list).

// ---------------------------------------------------------------------------------------
// Manifests

/// One Service port: (name, port, targetPort, nodePort, protocol).
pub type Port = (&'static str, u16, u16, Option<u16>, &'static str);

/// An endpoint's conditions.
#[derive(Clone, Copy)]
pub enum State {
    Ready,
    /// `ready: false, serving: true, terminating: true`: a pod shutting down gracefully.
    Terminating,
    /// `ready: false, serving: false, terminating: false`: a pod not ready yet.
    NotReady,
    /// `ready: true, serving: true, terminating: true`: a terminating pod of a Service with
    /// `publishNotReadyAddresses`, which the EndpointSlice controller publishes as ready.
    ReadyTerminating,
    /// `ready: false, serving: false, terminating: true`: a pod shutting down that no longer
    /// serves.
    Stopping,
}

/// A Service of type `kind` with `ports`; `extra` is appended to its spec (two-space indent).
pub fn service_yaml(name: &str, kind: &str, cluster_ip: Ipv4Addr, ports: &[Port], extra: &str) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {kind}\n  clusterIP: {cluster_ip}\n  clusterIPs:\n  - {cluster_ip}\n{extra}  ports:\n"
    );
    for (port_name, port, target, node_port, protocol) in ports {
        yaml += &format!(
            "  - name: {port_name}\n    port: {port}\n    targetPort: {target}\n    protocol: {protocol}\n"
        );
        if let Some(node_port) = node_port {
            yaml += &format!("    nodePort: {node_port}\n");
        }
    }
    yaml + "---\n"
}

/// Two nodes with `pods` as (name, node index), each serving kiada on TCP and UDP 8080.
pub fn spec(pods: &[(&str, usize)]) -> Spec {
    Spec {
        nodes: 2,
        pods: pods.iter().map(|(name, node)| (name.to_string(), *node)).collect(),
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
    }
}

/// The EndpointSlice of Service `service`: the target ports of `ports`, and `endpoints` as
/// (pod name, state).
pub fn slice_yaml(tb: &Testbed, service: &str, ports: &[Port], endpoints: &[(&str, State)]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-x7k2p\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (port_name, _, target, _, protocol) in ports {
        yaml += &format!("- name: {port_name}\n  port: {target}\n  protocol: {protocol}\n");
    }
    yaml += if endpoints.is_empty() { "endpoints: []\n" } else { "endpoints:\n" };
    for (pod_name, state) in endpoints {
        let pod = pod(tb, pod_name);
        let conditions = match state {
            State::Ready => "ready: true\n    serving: true\n    terminating: false",
            State::Terminating => "ready: false\n    serving: true\n    terminating: true",
            State::NotReady => "ready: false\n    serving: false\n    terminating: false",
            State::ReadyTerminating => "ready: true\n    serving: true\n    terminating: true",
            State::Stopping => "ready: false\n    serving: false\n    terminating: true",
        };
        yaml += &format!(
            "- addresses:\n  - {}\n  conditions:\n    {conditions}\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    name: {pod_name}\n    namespace: default\n",
            pod.ip, tb.nodes[pod.node].name
        );
    }
    yaml + "---\n"
}

pub fn pod<'a>(tb: &'a Testbed, name: &str) -> &'a testbed::Pod {
    tb.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
}

pub fn pod_ip(tb: &Testbed, name: &str) -> Ipv4Addr {
    pod(tb, name).ip
}

/// The cluster of `spec` with `yaml` written and an agent on every node, each having
/// programmed `keys` (NodePort keys are given on node-a's address; every node must have them
/// on its own).
pub fn up(spec: &Spec, yaml: impl FnOnce(&Testbed) -> String, keys: &[ServiceKey]) -> Testbed {
    let mut tb = Testbed::up(spec).expect("testbed");
    tb.write_manifest("connections.yaml", &yaml(&tb)).expect("manifest");
    for i in 0..tb.nodes.len() {
        tb.start_agent(i).expect("agent");
    }
    for i in 0..tb.nodes.len() {
        let node_ip = tb.nodes[i].ip;
        let own: Vec<ServiceKey> = keys
            .iter()
            .map(|k| if k.ip() == NODE_A { ServiceKey::new(node_ip, k.host_port(), k.proto) } else { *k })
            .collect();
        tb.wait_programmed(i, &own, START_TIMEOUT).expect("programmed");
    }
    tb
}

// ---------------------------------------------------------------------------------------
// What the maps hold

/// A frontend as node `i`'s maps hold it: its value and the backend addresses of its group
/// for outside clients and of its group for the node's pods and processes.
#[derive(Debug)]
pub struct Programmed {
    pub value: ServiceValue,
    pub external: Vec<Ipv4Addr>,
    pub internal: Vec<Ipv4Addr>,
}

pub fn programmed(tb: &Testbed, i: usize, key: ServiceKey) -> Option<Programmed> {
    let dir = &tb.nodes[i].bpffs_dir;
    let services = testbed::services_map(&dir.join(maps::SERVICES)).ok()?;
    let value = services.get(&key, 0).ok()?;
    let backends: HashMap<MapData, BackendKey, Backend> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(dir.join(maps::BACKENDS)).ok()?)).ok()?;
    let group = |group_id: u32, count: u16| -> Option<Vec<Ipv4Addr>> {
        (0..u32::from(count))
            .map(|slot| backends.get(&BackendKey { group_id, slot }, 0).ok().map(|b| b.ip()))
            .collect()
    };
    Some(Programmed {
        external: group(value.group_id, value.backend_count)?,
        internal: group(value.internal_group_id, value.internal_count)?,
        value,
    })
}

/// Polls node `i`'s maps until `key` is programmed as `done` says (a rewritten manifest has
/// taken effect); fails after `CHANGE_TIMEOUT` or when the agent exits.
pub fn wait_for(tb: &mut Testbed, i: usize, key: ServiceKey, what: &str, done: impl Fn(&Programmed) -> bool) {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    loop {
        tb.check_agent_alive(i).expect("agent alive");
        let seen = programmed(tb, i, key);
        if seen.as_ref().is_some_and(&done) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: {}:{} never became {what} within {CHANGE_TIMEOUT:?}; last seen {seen:?}",
            tb.nodes[i].name,
            key.ip(),
            key.host_port()
        );
        // The polling interval; the condition is what is waited for.
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn tcp(addr: Ipv4Addr, port: u16) -> ServiceKey {
    ServiceKey::new(addr, port, proto::TCP)
}

// ---------------------------------------------------------------------------------------
// Traffic

/// `count` GETs from namespace `ns` to `target`, one connection each; every one must be
/// answered.
pub fn replies(tb: &Testbed, ns: &str, target: SocketAddrV4, count: usize) -> Vec<Reply> {
    let exchanges = traffic::tcp_from(tb, ns, target, count).expect("own namespace");
    let failures: Vec<String> =
        exchanges.iter().filter_map(|e| e.as_ref().err()).map(|e| format!("{e:#}")).collect();
    assert!(
        failures.is_empty(),
        "{target} from {ns}: {} of {count} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    exchanges.into_iter().flatten().map(|(reply, _)| reply).collect()
}

/// The pods that answered.
pub fn pods_of(replies: &[Reply]) -> BTreeSet<String> {
    replies.iter().map(|r| r.pod.clone()).collect()
}

/// `kiada get PROTO TARGET` run as one of node `node`'s own processes (in its cgroup): the
/// answer and the peer the socket showed (TCP: getpeername, UDP: where the answer came
/// from), or the client's error.
pub fn host_get(
    tb: &Testbed,
    node: usize,
    protocol: &str,
    target: SocketAddrV4,
) -> Result<(Reply, SocketAddr), String> {
    let out = tb
        .host_command(node, &bin_path("kiada"))
        .args(["get", protocol, &target.to_string()])
        .output()
        .expect("running kiada get");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let reply = kiada::parse_reply(lines.next().unwrap_or_default()).expect("kiada's answer line");
    let label = if protocol == "tcp" { "peer " } else { "from " };
    let peer = lines
        .next()
        .and_then(|l| l.strip_prefix(label))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {label:?} line in {stdout:?}"));
    Ok((reply, peer))
}

/// Sends a GET on an open connection and reads the answer.
pub fn request(mut stream: TcpStream, addr: SocketAddrV4) -> anyhow::Result<Reply> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        anyhow::bail!("incomplete response: {response:?}");
    };
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "answered {head:?}");
    kiada::parse_reply(body)
}

/// Datagrams from a fixed source port in `ns` to `target` (refused or lost ones sent again)
/// for `during`, or until one is answered by `until`: the pods that answered, in order.
pub fn udp_from_port(
    tb: &Testbed,
    ns: &str,
    target: SocketAddrV4,
    source_port: u16,
    until: Option<&str>,
    during: Duration,
) -> Vec<String> {
    assert!(tb.owns_namespace(ns));
    let until = until.map(str::to_string);
    netns::within(ns, move || {
        let socket = sockets::udp_bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, source_port)).expect("bind");
        socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        let deadline = Instant::now() + during;
        let mut answered = Vec::new();
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline && answered.last() != until.as_ref() {
            let _ = socket.send_to(b"GET", target);
            if let Ok((len, _)) = socket.recv_from(&mut buf) {
                answered.push(
                    kiada::parse_reply(&String::from_utf8_lossy(&buf[..len])).expect("kiada answer").pod,
                );
            }
        }
        answered
    })
    .expect("namespace")
}

/// As `udp_from_port` until `want` answers; fails at `within` with the pods that did.
pub fn udp_until(
    tb: &Testbed,
    ns: &str,
    target: SocketAddrV4,
    source_port: u16,
    want: &str,
    within: Duration,
) -> Vec<String> {
    let answered = udp_from_port(tb, ns, target, source_port, Some(want), within);
    if answered.last().map(String::as_str) != Some(want) {
        let mut tally = std::collections::BTreeMap::<&str, usize>::new();
        answered.iter().for_each(|pod| *tally.entry(pod).or_default() += 1);
        panic!(
            "{target} from port {source_port}: {want} never answered within {within:?}; answers: {tally:?}"
        );
    }
    answered
}
