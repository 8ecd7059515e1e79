//! The kiada scenario of the seed article (Listing 11.3): a NodePort Service with ports
//! 80→8080 (nodePort 30080) and 443→8443 (nodePort 30443), three pods on two nodes.
//! Shared by `cargo xtask demo` and the integration tests.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use lb_common::{proto, service::ServiceKey};

use crate::{
    kiada::Reply,
    testbed::{Spec, Testbed},
    traffic,
};

pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
/// (name, service port, target port, node port)
pub const PORTS: [(&str, u16, u16, u16); 2] = [("http", 80, 8080, 30080), ("https", 443, 8443, 30443)];

/// Two nodes; kiada-0 and kiada-1 on node-a, kiada-2 on node-b.
pub fn spec() -> Spec {
    Spec {
        nodes: 2,
        pods: vec![("kiada-0".into(), 0), ("kiada-1".into(), 0), ("kiada-2".into(), 1)],
        tcp_ports: PORTS.iter().map(|p| p.2).collect(),
        udp_ports: PORTS.iter().map(|p| p.2).collect(),
    }
}

/// The Service, its EndpointSlice and the Node objects, as `kubectl get -o yaml` shows them.
pub fn manifests(tb: &Testbed) -> String {
    let mut yaml = String::new();
    for node in &tb.nodes {
        yaml += &format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n  - type: Hostname\n    address: {}\n---\n",
            node.name, node.ip, node.name
        );
    }
    yaml += &format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: kiada\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  clusterIPs:\n  - {CLUSTER_IP}\n  externalTrafficPolicy: Cluster\n  selector:\n    app: kiada\n  ports:\n"
    );
    for (name, port, target, node_port) in PORTS {
        yaml += &format!("  - name: {name}\n    port: {port}\n    nodePort: {node_port}\n    targetPort: {target}\n    protocol: TCP\n");
    }
    yaml += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kiada-x7k2p\n  namespace: default\n  labels:\n    kubernetes.io/service-name: kiada\n    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io\naddressType: IPv4\nports:\n";
    for (name, _, target, _) in PORTS {
        yaml += &format!("- name: {name}\n  port: {target}\n  protocol: TCP\n");
    }
    yaml += "endpoints:\n";
    for pod in &tb.pods {
        yaml += &format!(
            "- addresses:\n  - {}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: default\n",
            pod.ip, tb.nodes[pod.node].name, pod.name
        );
    }
    yaml
}

/// The NodePort frontends node `i`'s agent must have programmed on its fabric address.
pub fn node_port_frontends(tb: &Testbed, i: usize) -> Vec<ServiceKey> {
    PORTS.iter().map(|p| ServiceKey::new(tb.nodes[i].ip, p.3, proto::TCP)).collect()
}

/// Brings the scenario up: cluster, manifests, an agent on every node, programmed.
pub fn up_with_agents() -> anyhow::Result<Testbed> {
    let mut tb = Testbed::up(&spec())?;
    tb.write_manifest("kiada.yaml", &manifests(&tb))?;
    for i in 0..tb.nodes.len() {
        tb.start_agent(i)?;
    }
    for i in 0..tb.nodes.len() {
        let keys = node_port_frontends(&tb, i);
        tb.wait_programmed(i, &keys, Duration::from_secs(30))?;
    }
    Ok(tb)
}

/// `count` short requests from the external client to `target`, one connection each.
pub fn requests_from_client(
    tb: &Testbed,
    target: SocketAddrV4,
    count: usize,
) -> anyhow::Result<Vec<anyhow::Result<Reply>>> {
    let exchanges = traffic::tcp_from(tb, &tb.client, target, count)?;
    Ok(exchanges.into_iter().map(|e| e.map(|(reply, _)| reply)).collect())
}

/// How many answers each pod gave.
pub fn tally(replies: &[anyhow::Result<Reply>]) -> BTreeMap<String, usize> {
    traffic::tally_pods(replies.iter().flatten())
}
