//! What the `e2e_*` integration tests (Kubernetes' e2e tests as xlb tests) share: the clients
//! a request can come from and the checks of who answers, and the change barrier.
//!
//! The barrier: every change of a test's objects carries a new version of a marker Service
//! and its EndpointSlice (`marker_yaml`), and a node has applied the change once its maps
//! hold that version (`wait_applied`; both kinds, since the API delivers them on separate
//! watches), so what the maps and the traffic show after it is the change's doing. No sleep.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use lb_common::{proto, service::ServiceKey};

use crate::{
    checks::answered_by,
    kiada::{self, Reply},
    netns,
    services::{host_get, pod, programmed, Port},
    sockets,
    testbed::Testbed,
};

/// Timeout of a request that must be answered.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of a request that must fail: refused and unreachable come back at once, a drop
/// shows as this timeout.
pub const FAIL_TIMEOUT: Duration = Duration::from_secs(1);
/// Requests at least when several pods must answer: a pod that must not answer any more but
/// is still one of three misses them all with probability (2/3)^30 < 1e-5, and
/// `answered_by` goes on until every pod wanted has answered.
const SPREAD: usize = 30;
/// Requests at least when one pod must answer all: a second pod wrongly in the group would
/// miss them all with probability 2^-12.
const ONE_POD: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// From a Service port's `protocol`.
    pub fn of(protocol: &str) -> Self {
        match protocol {
            "TCP" => Self::Tcp,
            "UDP" => Self::Udp,
            other => panic!("no protocol {other}"),
        }
    }
}

/// Who sends a request.
#[derive(Clone, Copy, Debug)]
pub enum Client {
    /// A pod's process, under its node's cgroup as in production: TCP is balanced by the
    /// agent's socket programs, UDP by the pod's veth (TC).
    Pod(&'static str),
    /// The same pod, its sockets outside every cgroup: everything takes the veth's TC path.
    PodTc(&'static str),
    /// A process of node `n` (socket balancing, as for a hostNetwork pod).
    Node(usize),
    /// The client outside the cluster.
    External,
}

/// A pod as a client on both of its paths.
pub fn pod_clients(name: &'static str) -> [Client; 2] {
    [Client::Pod(name), Client::PodTc(name)]
}

/// Runs `request` as `from` does (not for `Client::Node`, whose process is a command).
pub fn within<T: Send + 'static>(
    tb: &Testbed,
    from: Client,
    request: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, String> {
    let (ns, bypass) = match from {
        Client::Pod(name) => (pod(tb, name).ns.clone(), false),
        Client::PodTc(name) => (pod(tb, name).ns.clone(), true),
        Client::External => (tb.client.clone(), false),
        Client::Node(_) => panic!("a node's process runs as a command"),
    };
    assert!(tb.owns_namespace(&ns));
    netns::within(&ns, move || if bypass { sockets::bypass(request) } else { request() })
        .expect("namespace")
        .map_err(|e| format!("{e:#}"))
}

/// One request from `from` to `target`: who answered (and the client address it saw), or why
/// not.
pub fn ask(
    tb: &Testbed,
    from: Client,
    protocol: Proto,
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<Reply, String> {
    if let Client::Node(node) = from {
        let protocol = if protocol == Proto::Tcp { "tcp" } else { "udp" };
        return host_get(tb, node, protocol, target).map(|(reply, _)| reply);
    }
    within(tb, from, move || match protocol {
        Proto::Tcp => kiada::get_tcp(target, timeout).map(|(reply, _)| reply),
        Proto::Udp => kiada::get_udp(target, timeout).map(|(reply, _)| reply),
    })
}

/// New requests from `from` to `target` are all answered, by every one of `pods` and no
/// other (`checks::answered_by`, at least `SPREAD` requests for several pods, `ONE_POD` for
/// one). The replies.
pub fn reaches(
    tb: &Testbed,
    from: Client,
    protocol: Proto,
    target: SocketAddrV4,
    pods: &[&str],
    phase: &str,
) -> Vec<Reply> {
    let want: BTreeSet<String> = pods.iter().map(|p| p.to_string()).collect();
    let min = if pods.len() > 1 { SPREAD } else { ONE_POD };
    let mut replies = Vec::new();
    answered_by(&want, min, || {
        let reply = ask(tb, from, protocol, target, ANSWER_TIMEOUT).map_err(anyhow::Error::msg)?;
        replies.push(reply.clone());
        Ok(reply.pod)
    })
    .unwrap_or_else(|e| panic!("{phase}: {from:?} → {target}/{protocol:?}: {e:#}"));
    replies
}

/// A request from `from` to `target` is not answered (refused, unreachable or dropped): the
/// error.
pub fn fails(tb: &Testbed, from: Client, protocol: Proto, target: SocketAddrV4, phase: &str) -> String {
    let started = Instant::now();
    match ask(tb, from, protocol, target, FAIL_TIMEOUT) {
        Ok(reply) => panic!("{phase}: {from:?} → {target}/{protocol:?} must fail, answered by {}", reply.pod),
        Err(e) => {
            println!("{phase}: {from:?} → {target}/{protocol:?}: {e} after {:?}", started.elapsed());
            e
        }
    }
}

/// Every address of a Service's `ports`: (protocol, address, whether it is a nodePort).
pub fn addresses(tb: &Testbed, cluster_ip: Ipv4Addr, ports: &[Port]) -> Vec<(Proto, SocketAddrV4, bool)> {
    let mut all = Vec::new();
    for (_, port, _, node_port, protocol) in ports {
        all.push((Proto::of(protocol), SocketAddrV4::new(cluster_ip, *port), false));
        for node in &tb.nodes {
            all.extend(node_port.map(|np| (Proto::of(protocol), SocketAddrV4::new(node.ip, np), true)));
        }
    }
    all
}

/// The e2e framework's CheckServiceReachability, from each of `clients`: the ClusterIP on every
/// port and every node's address on every nodePort reach exactly `pods` (the external client
/// tries the nodePorts only).
pub fn service_reachable(
    tb: &Testbed,
    cluster_ip: Ipv4Addr,
    ports: &[Port],
    pods: &[&str],
    clients: &[Client],
    phase: &str,
) {
    for (protocol, target, node_port) in addresses(tb, cluster_ip, ports) {
        for from in clients {
            if node_port || !matches!(from, Client::External) {
                reaches(tb, *from, protocol, target, pods, phase);
            }
        }
    }
}

/// No address of the Service answers any of `clients`.
pub fn service_unreachable(
    tb: &Testbed,
    cluster_ip: Ipv4Addr,
    ports: &[Port],
    clients: &[Client],
    phase: &str,
) {
    for (protocol, target, node_port) in addresses(tb, cluster_ip, ports) {
        for from in clients {
            if node_port || !matches!(from, Client::External) {
                fails(tb, *from, protocol, target, phase);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The change barrier

/// The marker: a Service whose port is the change's version, and an EndpointSlice whose only
/// endpoint's address is too (never contacted).
pub const MARKER: &str = "sync-marker";
const MARKER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 254);

fn marker_backend(version: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 254, version)
}

/// The marker's Service and EndpointSlice at `version`, as YAML documents.
pub fn marker_yaml(version: u8) -> String {
    let port = u16::from(version);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {MARKER}\n  namespace: default\nspec:\n  clusterIP: {MARKER_IP}\n  ports:\n  - name: v\n    port: {port}\n    targetPort: {port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {MARKER}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {MARKER}\naddressType: IPv4\nports:\n- name: v\n  port: {port}\n  protocol: TCP\nendpoints:\n- addresses:\n  - {}\n---\n",
        marker_backend(version)
    )
}

/// Waits until every node's maps hold the marker at `version`, Service and slice; fails after
/// `timeout` or when an agent has died.
pub fn wait_applied(tb: &mut Testbed, version: u8, timeout: Duration) {
    let key = ServiceKey::new(MARKER_IP, u16::from(version), proto::TCP);
    for i in 0..tb.nodes.len() {
        let deadline = Instant::now() + timeout;
        loop {
            tb.check_agent_alive(i).expect("agent alive");
            let seen = programmed(tb, i, key);
            if seen.as_ref().is_some_and(|p| p.internal == [marker_backend(version)]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not apply change {version} within {timeout:?}; marker: {seen:?}",
                tb.nodes[i].name
            );
            // The polling interval; the marker is what is waited for.
            thread::sleep(Duration::from_millis(20));
        }
    }
}
