//! Kubernetes' `[sig-network] Services` e2e tests (test/e2e/network/service.go) as xlb
//! integration tests: each test is named after one e2e test, quotes its name and checks what
//! that test checks of the proxy, with real traffic through the agents of the namespace cluster
//! from pods (socket balancing, or their veth's TC path), from the nodes' own processes and
//! from the client outside the cluster, and with the agents' maps (`xlb inspect services`)
//! where the e2e test relies on something being absent.
//!
//! The e2e tests create pods and let the controllers write EndpointSlices; here the tests
//! write the Services and EndpointSlices the controllers would write, with the kiada pods of
//! the testbed as endpoints, into the agents' manifests directory or, where the source of the
//! objects matters (labels that take a Service out of the proxy's selection), through the
//! in-repo API server too. Every change is followed by a barrier, not a sleep: the change
//! carries a new version of a marker Service and its EndpointSlice, and a node has applied the
//! change once its maps hold that version (both kinds, since the API delivers them on separate
//! watches), so what the maps and the traffic show after it is the change's doing.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{proto, service::ServiceKey};
use serde::Deserialize as _;
use serde_json::Value;
use xlb_tests::{
    apiserver::ApiServer,
    bin_path,
    checks::nodes_yaml,
    e2e::{
        self, fails, reaches, service_reachable, service_unreachable, Client, Proto, ANSWER_TIMEOUT, MARKER,
    },
    kiada, netns,
    services::{
        pod, pod_ip, programmed, service_yaml, slice_yaml, Port, State, CHANGE_TIMEOUT, START_TIMEOUT,
    },
    testbed::{Spec, Testbed},
};

/// The port every pod's kiada serves, over TCP and UDP.
const POD_PORT: u16 = 8080;
/// Where the API server listens in every node's namespace (API mode).
const API_PORT: u16 = 6443;

// ---------------------------------------------------------------------------------------
// The cluster and its objects

/// Where the agents take the objects from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// `--manifests DIR`: one file, rewritten whole for every change.
    Manifests,
    /// `--kubeconfig`: the in-repo API server; a change applies the objects that changed and
    /// deletes those that are gone.
    Api,
}

const SOURCES: [Source; 2] = [Source::Manifests, Source::Api];

/// A namespace cluster of two nodes whose agents follow `source`.
struct Cluster {
    tb: Testbed,
    api: Option<ApiServer>,
    /// What the API holds: (kind, name) → the object as applied.
    applied: BTreeMap<(String, String), Value>,
    version: u8,
}

impl Cluster {
    /// The cluster with `pods` (name, node index), each serving TCP and UDP `POD_PORT`, and
    /// agents that have programmed `objects`.
    fn up(pods: &[(&str, usize)], source: Source, objects: impl FnOnce(&Testbed) -> String) -> Self {
        let spec = Spec {
            nodes: 2,
            pods: pods.iter().map(|(name, node)| (name.to_string(), *node)).collect(),
            tcp_ports: vec![POD_PORT],
            udp_ports: vec![POD_PORT],
        };
        let tb = Testbed::up(&spec).expect("testbed");
        let api = (source == Source::Api).then(|| {
            let api = ApiServer::new();
            for node in &tb.nodes {
                api.listen(Some(&node.ns), API_PORT).expect("API server in the node's namespace");
            }
            api
        });
        let mut c = Self { tb, api, applied: BTreeMap::new(), version: 0 };
        let objects = objects(&c.tb);
        c.write(&objects);
        // In the manifests directory, which no agent reads in API mode (removed with it).
        let kubeconfig = c.tb.manifests.join("kubeconfig");
        if source == Source::Api {
            std::fs::write(&kubeconfig, ApiServer::kubeconfig(([127, 0, 0, 1], API_PORT).into()))
                .expect("kubeconfig");
        }
        for i in 0..c.tb.nodes.len() {
            match source {
                Source::Manifests => c.tb.start_agent(i),
                Source::Api => c.tb.start_agent_with(i, &["--kubeconfig".as_ref(), kubeconfig.as_os_str()]),
            }
            .expect("agent");
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
        let Some(api) = &self.api else {
            self.tb.write_manifest("e2e.yaml", &docs).expect("manifest");
            return;
        };
        let mut objects: Vec<((String, String), Value)> = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&docs) {
            let value = Value::deserialize(doc).expect("YAML document");
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().expect("kind").to_string();
            let name = value["metadata"]["name"].as_str().expect("metadata.name").to_string();
            objects.push(((kind, name), value));
        }
        // The marker last on each watch, and after every deletion.
        let (markers, others): (Vec<_>, Vec<_>) =
            objects.into_iter().partition(|((_, name), _)| name.starts_with(MARKER));
        let wanted: BTreeSet<(String, String)> =
            others.iter().chain(&markers).map(|(key, _)| key.clone()).collect();
        for (key, value) in &others {
            apply(api, &mut self.applied, key, value);
        }
        let gone: Vec<(String, String)> =
            self.applied.keys().filter(|key| !wanted.contains(*key)).cloned().collect();
        for (kind, name) in gone {
            let existed = match kind.as_str() {
                "Service" => api.delete::<Service>(Some("default"), &name),
                "EndpointSlice" => api.delete::<EndpointSlice>(Some("default"), &name),
                "Node" => api.delete::<Node>(None, &name),
                other => panic!("no kind {other}"),
            };
            assert!(existed, "{kind} {name} was applied");
            self.applied.remove(&(kind, name));
        }
        for (key, value) in &markers {
            apply(api, &mut self.applied, key, value);
        }
    }

    /// Waits until every node's maps hold the marker of the last change, Service and slice.
    fn synced(&mut self, timeout: Duration) {
        e2e::wait_applied(&mut self.tb, self.version, timeout);
    }

    fn node_ip(&self, node: usize) -> Ipv4Addr {
        self.tb.nodes[node].ip
    }
}

/// Creates or replaces an object through the API, unless it is unchanged.
fn apply(
    api: &ApiServer,
    applied: &mut BTreeMap<(String, String), Value>,
    key: &(String, String),
    value: &Value,
) {
    if applied.get(key) == Some(value) {
        return;
    }
    let typed = value.clone();
    match key.0.as_str() {
        "Service" => {
            api.apply(serde_json::from_value::<Service>(typed).expect("a Service"));
        }
        "EndpointSlice" => {
            api.apply(serde_json::from_value::<EndpointSlice>(typed).expect("an EndpointSlice"));
        }
        "Node" => {
            api.apply(serde_json::from_value::<Node>(typed).expect("a Node"));
        }
        other => panic!("no kind {other}"),
    }
    applied.insert(key.clone(), value.clone());
}

/// `yaml` (one Service or EndpointSlice) with the label `key: value` added.
fn with_label(yaml: &str, key: &str, value: &str) -> String {
    let entry = format!("    {key}: '{value}'\n");
    if yaml.contains("\n  labels:\n") {
        yaml.replacen("\n  labels:\n", &format!("\n  labels:\n{entry}"), 1)
    } else {
        yaml.replacen("metadata:\n", &format!("metadata:\n  labels:\n{entry}"), 1)
    }
}

/// An ExternalName Service as the API server stores one: no clusterIP, the ports it had.
fn external_name_yaml(name: &str, ports: &[Port]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: ExternalName\n  externalName: externalsvc.default.svc.cluster.local\n  ports:\n"
    );
    for (port_name, port, target, _, protocol) in ports {
        yaml += &format!(
            "  - name: {port_name}\n    port: {port}\n    targetPort: {target}\n    protocol: {protocol}\n"
        );
    }
    yaml + "---\n"
}

/// `xlb inspect services -o json` of node `node`: the frontends of Service `name` (by their
/// counter slots' names), at `cluster_ip` or on `node_port`.
fn frontends(
    c: &Cluster,
    node: usize,
    name: Option<&str>,
    cluster_ip: Ipv4Addr,
    node_port: Option<u16>,
) -> Vec<String> {
    let out = netns::command(&c.tb.nodes[node].ns, &bin_path("xlb").to_string_lossy())
        .args(["inspect", "services", "-o", "json", "--bpffs-dir"])
        .arg(&c.tb.nodes[node].bpffs_dir)
        .output()
        .expect("running xlb inspect");
    assert!(out.status.success(), "xlb inspect services: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("xlb inspect services -o json");
    let prefix = name.map(|name| format!("default/{name}:"));
    rows.iter()
        .filter(|row| {
            let frontend = &row["frontend"];
            prefix.as_ref().is_some_and(|p| row["service"].as_str().is_some_and(|s| s.starts_with(p)))
                || frontend["addr"].as_str() == Some(&cluster_ip.to_string())
                || node_port.is_some_and(|p| frontend["port"].as_u64() == Some(u64::from(p)))
        })
        .map(|row| format!("{} of {}", row["frontend"], row["service"]))
        .collect()
}

/// Asserts that no node holds a frontend of Service `name`, at `cluster_ip` or on `node_port`.
fn nothing_programmed(
    c: &Cluster,
    name: Option<&str>,
    cluster_ip: Ipv4Addr,
    node_port: Option<u16>,
    phase: &str,
) {
    for node in 0..c.tb.nodes.len() {
        let found = frontends(c, node, name, cluster_ip, node_port);
        assert!(found.is_empty(), "{phase}: {} holds {found:?}", c.tb.nodes[node].name);
    }
}

// ---------------------------------------------------------------------------------------
// Traffic

// ---------------------------------------------------------------------------------------
// Same port, different protocols

/// `[sig-network] Services should serve endpoints on same port and different protocols`
/// (Conformance): a ClusterIP Service with 80/TCP and 80/UDP forwards both to the pod; updated
/// to 80/TCP only, TCP is still forwarded and UDP no longer (its frontend is gone from both
/// nodes and a datagram from a pod or a node process is not answered); updated to 80/UDP only,
/// the other way round. Checked from a pod (socket balancing and its veth's TC path) and from
/// a node process.
#[test]
fn services_should_serve_endpoints_on_same_port_and_different_protocols() {
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 10);
    const TCP: Port = ("tcp-port", 80, POD_PORT, None, "TCP");
    const UDP: Port = ("udp-port", 80, POD_PORT, None, "UDP");
    let objects = |tb: &Testbed, ports: &[Port]| {
        service_yaml("multiprotocol-test", "ClusterIP", IP, ports, "")
            + &slice_yaml(tb, "multiprotocol-test", ports, &[("pod1", State::Ready)])
    };
    let mut c = Cluster::up(&[("pod1", 1), ("execpod", 0)], Source::Manifests, |tb| objects(tb, &[TCP, UDP]));
    let clients = [Client::Pod("execpod"), Client::PodTc("execpod"), Client::Node(0)];
    for (phase, ports, removed) in [
        ("TCP and UDP", &[TCP, UDP][..], &[][..]),
        ("TCP only", &[TCP][..], &[UDP][..]),
        ("UDP only", &[UDP][..], &[TCP][..]),
    ] {
        if phase != "TCP and UDP" {
            c.set(&objects(&c.tb, ports));
        }
        service_reachable(&c.tb, IP, ports, &["pod1"], &clients, phase);
        for (_, port, _, _, protocol) in removed {
            let key = ServiceKey::new(IP, *port, if *protocol == "TCP" { proto::TCP } else { proto::UDP });
            for node in 0..2 {
                assert!(programmed(&c.tb, node, key).is_none(), "{phase}: {protocol} still programmed");
            }
        }
        service_unreachable(&c.tb, IP, removed, &clients, phase);
    }
}

/// `[sig-network] Services should be able to update service type to NodePort listening on
/// same port number but different protocols`: a ClusterIP Service on 80/TCP, changed to
/// NodePort, then given 80/UDP beside 80/TCP (one nodePort number for both, as the API server's
/// allocator gives ports of one number, `initNodePorts`): after each update the ClusterIP and
/// both nodes' nodePort answer on every port, from a pod (both paths), from a node process and
/// (nodePorts) from outside the cluster.
#[test]
fn services_should_be_able_to_update_service_type_to_node_port_listening_on_same_port_number_but_different_protocols(
) {
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 20);
    const NODE_PORT: u16 = 30720;
    let pods = ["web-0", "web-1"];
    let objects = |tb: &Testbed, kind: &str, ports: &[Port]| {
        let endpoints = pods.map(|p| (p, State::Ready));
        service_yaml("nodeport-update-service", kind, IP, ports, "")
            + &slice_yaml(tb, "nodeport-update-service", ports, &endpoints)
    };
    let cluster_ip = [("tcp-port", 80, POD_PORT, None, "TCP")];
    let node_port = [("tcp-port", 80, POD_PORT, Some(NODE_PORT), "TCP")];
    let both = [node_port[0], ("udp-port", 80, POD_PORT, Some(NODE_PORT), "UDP")];
    let mut c = Cluster::up(&[("web-0", 0), ("web-1", 1), ("execpod", 0)], Source::Manifests, |tb| {
        objects(tb, "ClusterIP", &cluster_ip)
    });
    let clients = [Client::Pod("execpod"), Client::PodTc("execpod"), Client::Node(0), Client::External];
    service_reachable(&c.tb, IP, &cluster_ip, &pods, &clients, "ClusterIP 80/TCP");
    for (phase, ports) in [("NodePort 80/TCP", &node_port[..]), ("NodePort 80/TCP and 80/UDP", &both[..])] {
        c.set(&objects(&c.tb, "NodePort", ports));
        service_reachable(&c.tb, IP, ports, &pods, &clients, phase);
    }
}

// ---------------------------------------------------------------------------------------
// Recreated Services

/// `[sig-network] Services should work after the service has been recreated`: a Service is
/// reached by a node process and a pod; its Service and EndpointSlice are deleted, and it is
/// down (no frontend on either node, requests fail); recreated with the same ClusterIP it is
/// up again; deleted again and recreated with another ClusterIP, the slice this time before the
/// Service (nothing is programmed for a slice alone), the new address is up and the old one
/// stays down. Through the manifests and through the API (DELETED events).
#[test]
fn services_should_work_after_the_service_has_been_recreated() {
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 30);
    const OTHER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 31);
    const PORTS: [Port; 1] = [("http", 80, POD_PORT, None, "TCP")];
    let pods = ["web-0", "web-1"];
    let endpoints = pods.map(|p| (p, State::Ready));
    let clients = [Client::Node(0), Client::Pod("execpod"), Client::PodTc("execpod")];
    for source in SOURCES {
        let service = |ip| service_yaml("service1", "ClusterIP", ip, &PORTS, "");
        let slice = |tb: &Testbed| slice_yaml(tb, "service1", &PORTS, &endpoints);
        let mut c =
            Cluster::up(&[("web-0", 0), ("web-1", 1), ("execpod", 0)], source, |tb| service(IP) + &slice(tb));
        let up = |c: &Cluster, ip, phase: &str| {
            service_reachable(&c.tb, ip, &PORTS, &pods, &clients, &format!("{source:?}: {phase}"))
        };
        // Nothing of the Service, or (once recreated elsewhere) nothing at `ip`.
        let down = |c: &Cluster, name: Option<&str>, ip, phase: &str| {
            let phase = format!("{source:?}: {phase}");
            nothing_programmed(c, name, ip, None, &phase);
            service_unreachable(&c.tb, ip, &PORTS, &clients, &phase);
        };
        up(&c, IP, "created");

        c.set("");
        down(&c, Some("service1"), IP, "deleted");
        c.set(&(service(IP) + &slice(&c.tb)));
        up(&c, IP, "recreated with the same ClusterIP");

        c.set("");
        down(&c, Some("service1"), IP, "deleted again");
        c.set(&slice(&c.tb));
        nothing_programmed(&c, Some("service1"), OTHER_IP, None, &format!("{source:?}: the slice alone"));
        c.set(&(slice(&c.tb) + &service(OTHER_IP)));
        up(&c, OTHER_IP, "recreated with another ClusterIP");
        down(&c, None, IP, "the old ClusterIP after the recreation");
    }
}

// ---------------------------------------------------------------------------------------
// Type changes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    ExternalName,
    ClusterIP,
    NodePort,
}

/// A Service of type `from` changed to type `to`, as the four e2e tests do: an ExternalName
/// Service has nothing programmed on any node (its ports and EndpointSlice notwithstanding);
/// a ClusterIP one is reached by a pod and a node process on its ClusterIP and has no
/// nodePort; a NodePort one also on both nodes' nodePort, from a pod, a node process and the
/// external client. Back to ExternalName, every former frontend is gone and no former address
/// answers. The Service its externalName names (`externalsvc`, the e2e's CNAME target) is
/// served throughout.
fn type_change(from: Type, to: Type) {
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 40);
    const NODE_PORT: u16 = 30740;
    const TARGET_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 41);
    const TARGET_PORTS: [Port; 1] = [("http", 80, POD_PORT, None, "TCP")];
    let name = match from {
        Type::ExternalName => "externalname-service",
        Type::ClusterIP => "clusterip-service",
        Type::NodePort => "nodeport-service",
    };
    let pods = ["web-0", "web-1"];
    let endpoints = pods.map(|p| (p, State::Ready));
    let ports = |t: Type| [("http", 80, POD_PORT, (t == Type::NodePort).then_some(NODE_PORT), "TCP")];
    let objects = |tb: &Testbed, t: Type| {
        let service = match t {
            Type::ExternalName => external_name_yaml(name, &ports(t)),
            Type::ClusterIP => service_yaml(name, "ClusterIP", IP, &ports(t), ""),
            Type::NodePort => service_yaml(name, "NodePort", IP, &ports(t), ""),
        };
        service
            + &slice_yaml(tb, name, &ports(t), &endpoints)
            + &service_yaml("externalsvc", "ClusterIP", TARGET_IP, &TARGET_PORTS, "")
            + &slice_yaml(tb, "externalsvc", &TARGET_PORTS, &[("web-2", State::Ready)])
    };
    let mut c =
        Cluster::up(&[("web-0", 0), ("web-1", 1), ("web-2", 1), ("execpod", 0)], Source::Manifests, |tb| {
            objects(tb, from)
        });
    let all = [Client::Pod("execpod"), Client::PodTc("execpod"), Client::Node(0), Client::External];
    let check = |c: &Cluster, t: Type, phase: &str| {
        let phase = format!("{phase} ({t:?})");
        match t {
            Type::ExternalName => {
                nothing_programmed(c, Some(name), IP, Some(NODE_PORT), &phase);
                service_unreachable(&c.tb, IP, &ports(Type::NodePort), &all, &phase);
            }
            Type::ClusterIP => {
                service_reachable(&c.tb, IP, &ports(t), &pods, &all, &phase);
                for node in 0..2 {
                    let node_port = SocketAddrV4::new(c.node_ip(node), NODE_PORT);
                    let key = ServiceKey::new(*node_port.ip(), NODE_PORT, proto::TCP);
                    assert!(programmed(&c.tb, node, key).is_none(), "{phase}: {node_port} programmed");
                    fails(&c.tb, Client::External, Proto::Tcp, node_port, &phase);
                }
            }
            Type::NodePort => service_reachable(&c.tb, IP, &ports(t), &pods, &all, &phase),
        }
        service_reachable(
            &c.tb,
            TARGET_IP,
            &TARGET_PORTS,
            &["web-2"],
            &all[..3],
            &format!("{phase}: externalsvc"),
        );
    };
    check(&c, from, "created");
    c.set(&objects(&c.tb, to));
    check(&c, to, "changed");
}

/// `[sig-network] Services should be able to change the type from ExternalName to ClusterIP`
/// (Conformance): see `type_change`.
#[test]
fn services_should_be_able_to_change_the_type_from_external_name_to_cluster_ip() {
    type_change(Type::ExternalName, Type::ClusterIP);
}

/// `[sig-network] Services should be able to change the type from ExternalName to NodePort`
/// (Conformance): see `type_change`.
#[test]
fn services_should_be_able_to_change_the_type_from_external_name_to_node_port() {
    type_change(Type::ExternalName, Type::NodePort);
}

/// `[sig-network] Services should be able to change the type from ClusterIP to ExternalName`
/// (Conformance): see `type_change`. The e2e test then resolves the name through DNS, which is
/// not the proxy's; the proxy's part is that the ClusterIP is no longer served.
#[test]
fn services_should_be_able_to_change_the_type_from_cluster_ip_to_external_name() {
    type_change(Type::ClusterIP, Type::ExternalName);
}

/// `[sig-network] Services should be able to change the type from NodePort to ExternalName`
/// (Conformance): see `type_change`; the nodePort is released on both nodes.
#[test]
fn services_should_be_able_to_change_the_type_from_node_port_to_external_name() {
    type_change(Type::NodePort, Type::ExternalName);
}

// ---------------------------------------------------------------------------------------
// Labels that take a Service from the proxy

/// The e2e tests of the labels `service.kubernetes.io/service-proxy-name` and
/// `service.kubernetes.io/headless`, through the manifests and through the API: `disabled` is
/// created with `label` and never served (no frontend on either node, a node process and a pod
/// get no answer); `toggled` is created without it and served, then labelled and no longer
/// served, then unlabelled and served again. The EndpointSlice controller copies a Service's
/// labels to its slices except reserved ones, `service.kubernetes.io/headless` among them:
/// `copied_to_slices` says which this label is.
fn label_takes_services_from_the_proxy(label: &str, disabled: &str, toggled: &str, copied_to_slices: bool) {
    const DISABLED_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 50);
    const TOGGLED_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 51);
    const PORTS: [Port; 1] = [("http", 80, POD_PORT, None, "TCP")];
    let pods = ["web-0", "web-1"];
    let endpoints = pods.map(|p| (p, State::Ready));
    let clients = [Client::Node(0), Client::Pod("execpod"), Client::PodTc("execpod")];
    let service = |tb: &Testbed, name: &str, ip, labelled: bool| {
        let (service, slice) =
            (service_yaml(name, "ClusterIP", ip, &PORTS, ""), slice_yaml(tb, name, &PORTS, &endpoints));
        match (labelled, copied_to_slices) {
            (false, _) => service + &slice,
            (true, false) => with_label(&service, label, "") + &slice,
            (true, true) => with_label(&service, label, "foo-bar") + &with_label(&slice, label, "foo-bar"),
        }
    };
    let objects = |tb: &Testbed, toggled_labelled: bool| {
        service(tb, disabled, DISABLED_IP, true) + &service(tb, toggled, TOGGLED_IP, toggled_labelled)
    };
    for source in SOURCES {
        let mut c =
            Cluster::up(&[("web-0", 0), ("web-1", 1), ("execpod", 0)], source, |tb| objects(tb, false));
        let up = |c: &Cluster, phase: &str| {
            service_reachable(&c.tb, TOGGLED_IP, &PORTS, &pods, &clients, &format!("{source:?}: {phase}"))
        };
        let down = |c: &Cluster, name: &str, ip, phase: &str| {
            let phase = format!("{source:?}: {phase}: {name}");
            nothing_programmed(c, Some(name), ip, None, &phase);
            service_unreachable(&c.tb, ip, &PORTS, &clients, &phase);
        };
        up(&c, "created");
        down(&c, disabled, DISABLED_IP, "created with the label");
        c.set(&objects(&c.tb, true));
        down(&c, toggled, TOGGLED_IP, "label added");
        c.set(&objects(&c.tb, false));
        up(&c, "label removed");
        down(&c, disabled, DISABLED_IP, "still labelled");
    }
}

/// `[sig-network] Services should implement service.kubernetes.io/service-proxy-name`: see
/// `label_takes_services_from_the_proxy` (the label's value names another proxy, `foo-bar`).
#[test]
fn services_should_implement_service_kubernetes_io_service_proxy_name() {
    label_takes_services_from_the_proxy(
        "service.kubernetes.io/service-proxy-name",
        "service-proxy-disabled",
        "service-proxy-toggled",
        true,
    );
}

/// `[sig-network] Services should implement service.kubernetes.io/headless`: see
/// `label_takes_services_from_the_proxy`. The Services keep their ClusterIP, and their slices
/// do not carry the label: kube-proxy leaves them out because its Service informer filters on
/// the label (cmd/kube-proxy/app/server.go). In manifests mode xlb honoured it on slices only
/// and served both Services.
#[test]
fn services_should_implement_service_kubernetes_io_headless() {
    label_takes_services_from_the_proxy(
        "service.kubernetes.io/headless",
        "service-headless",
        "service-headless-toggled",
        false,
    );
}

// ---------------------------------------------------------------------------------------
// Terminating endpoints

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    InternalCluster,
    InternalLocal,
    ExternalLocal,
}

/// The fallback e2e tests: Service `svc-proxy-terminating` has one endpoint, `echo-hostname-0`
/// on node-a, first ready, then `{ready: false, serving: true, terminating: true}` (the pod
/// deleted, in its grace period); `pause-pod-0` runs on node-a and `pause-pod-1` on node-b.
/// While it terminates, the nodes' maps still hold it where the policy allows it, and the
/// e2e test's clients reach it or fail as it says, each pod through socket balancing and
/// through its veth's TC path, plus the nodes' own processes for ClusterIP.
fn terminating_fallback(policy: Policy) {
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 60);
    const NODE_PORT: u16 = 30760;
    const SERVER: &str = "echo-hostname-0";
    let (kind, extra, node_port) = match policy {
        Policy::InternalCluster => ("ClusterIP", "", None),
        Policy::InternalLocal => ("ClusterIP", "  internalTrafficPolicy: Local\n", None),
        Policy::ExternalLocal => ("NodePort", "  externalTrafficPolicy: Local\n", Some(NODE_PORT)),
    };
    let ports = [("http", 80, POD_PORT, node_port, "TCP")];
    let objects = |tb: &Testbed, state| {
        service_yaml("svc-proxy-terminating", kind, IP, &ports, extra)
            + &slice_yaml(tb, "svc-proxy-terminating", &ports, &[(SERVER, state)])
    };
    let mut c =
        Cluster::up(&[(SERVER, 0), ("pause-pod-0", 0), ("pause-pod-1", 1)], Source::Manifests, |tb| {
            objects(tb, State::Ready)
        });
    let server = pod_ip(&c.tb, SERVER);
    let cluster_ip = SocketAddrV4::new(IP, 80);
    let node_port = |node| SocketAddrV4::new(c.node_ip(node), NODE_PORT);
    // (client, target, answered), as the e2e test's comments give them.
    let pods = |name| [Client::Pod(name), Client::PodTc(name)];
    let mut expected: Vec<(Client, SocketAddrV4, bool)> = Vec::new();
    let mut both = |froms: &[Client], target, ok| expected.extend(froms.iter().map(|f| (*f, target, ok)));
    match policy {
        Policy::InternalCluster => {
            both(&pods("pause-pod-0"), cluster_ip, true);
            both(&pods("pause-pod-1"), cluster_ip, true);
            both(&[Client::Node(0), Client::Node(1)], cluster_ip, true);
        }
        Policy::InternalLocal => {
            both(&pods("pause-pod-0"), cluster_ip, true);
            both(&[Client::Node(0)], cluster_ip, true);
            both(&pods("pause-pod-1"), cluster_ip, false);
            both(&[Client::Node(1)], cluster_ip, false);
        }
        Policy::ExternalLocal => {
            // "external" for node-b, which has no local endpoint
            both(&pods("pause-pod-0"), node_port(1), false);
            both(&pods("pause-pod-1"), node_port(0), true);
            both(&pods("pause-pod-0"), node_port(0), true);
            // Not checked by the e2e test (implementations differ), kube-proxy's answer: a
            // pod reaching its own node's nodePort gets Cluster policy.
            both(&pods("pause-pod-1"), node_port(1), true);
        }
    }
    // Where each node's maps must hold the endpoint: (node, group of outside clients, group of
    // the node's pods and processes).
    let groups: [(usize, bool, bool); 2] = match policy {
        Policy::InternalCluster => [(0, true, true), (1, true, true)],
        Policy::InternalLocal => [(0, true, true), (1, false, false)],
        Policy::ExternalLocal => [(0, true, true), (1, false, true)],
    };
    for (state, phase) in [(State::Ready, "ready"), (State::Terminating, "terminating")] {
        if phase == "terminating" {
            c.set(&objects(&c.tb, state));
        }
        let key = |node| match policy {
            Policy::ExternalLocal => ServiceKey::new(c.node_ip(node), NODE_PORT, proto::TCP),
            _ => ServiceKey::new(IP, 80, proto::TCP),
        };
        for (node, external, internal) in groups {
            let p = programmed(&c.tb, node, key(node)).unwrap_or_else(|| panic!("{phase}: no frontend"));
            let want = |held: bool| if held { vec![server] } else { vec![] };
            assert_eq!(
                (p.external, p.internal),
                (want(external), want(internal)),
                "{phase}: node {node}'s groups"
            );
        }
        for (from, target, ok) in &expected {
            let phase = format!("{policy:?}, {SERVER} {phase}");
            if *ok {
                reaches(&c.tb, *from, Proto::Tcp, *target, &[SERVER], &phase);
            } else {
                fails(&c.tb, *from, Proto::Tcp, *target, &phase);
            }
        }
    }
}

/// `[sig-network] Services should fallback to terminating endpoints when there are no ready
/// endpoints with internalTrafficPolicy=Cluster`: pods on both nodes (and both nodes' processes)
/// reach the ClusterIP's only endpoint while it terminates. See `terminating_fallback`.
#[test]
fn services_should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_cluster(
) {
    terminating_fallback(Policy::InternalCluster);
}

/// `[sig-network] Services should fallback to local terminating endpoints when there are no
/// ready endpoints with internalTrafficPolicy=Local`: the pod (and process) on the endpoint's
/// node reaches it while it terminates, the pod (and process) on the other node does not. See
/// `terminating_fallback`.
#[test]
fn services_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internal_traffic_policy_local(
) {
    terminating_fallback(Policy::InternalLocal);
}

/// `[sig-network] Services should fallback to local terminating endpoints when there are no
/// ready endpoints with externalTrafficPolicy=Local`: the pod-originated checks of the e2e
/// test, a pod on node-a reaching node-b's nodePort fails (external traffic for node-b, which
/// has no local endpoint), a pod on node-b reaching node-a's and a pod on node-a reaching its
/// own node's succeed. See `terminating_fallback`. (`... with externallTrafficPolicy=Cluster`
/// is connections.rs's `serving_terminating_endpoints_are_the_fallback`.)
#[test]
fn services_should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_external_traffic_policy_local(
) {
    terminating_fallback(Policy::ExternalLocal);
}

// ---------------------------------------------------------------------------------------
// Found by these tests

/// Not an e2e test: the bug that made the tests above fail now and then. A pod reaches a
/// Service over its veth's TC path from source port P (a conntrack entry client:P → backend),
/// the connection ends (FIN, or RST), and the pod connects to the same backend straight, not
/// through the Service (as a socket-balanced connection does, or any pod-to-pod connection),
/// from the same port P. The finished connection's entry used to stay live for its timeout
/// (FIN 120 s, RST 10 s), so TC egress gave the new connection's SYN-ACK the Service's address
/// as its source and the client never got an answer (the tests' socket-balanced requests after
/// TC-path ones to the same ClusterIP timed out when the kernel picked a port used before).
/// Netfilter lets such a connection through (it remaps a clashing source port); xlb now ends a
/// finished connection's entries when a SYN not addressed to a frontend arrives on its tuple.
#[test]
fn a_pod_reaches_a_backend_straight_from_the_port_of_a_finished_service_connection() {
    use socket2::{Domain, Protocol, Socket, Type as SocketType};
    use std::io::{Read as _, Write as _};
    const IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 90);
    const PORTS: [Port; 1] = [("http", 80, POD_PORT, None, "TCP")];
    let c = Cluster::up(&[("web-0", 1), ("execpod", 0)], Source::Manifests, |tb| {
        service_yaml("reuse", "ClusterIP", IP, &PORTS, "")
            + &slice_yaml(tb, "reuse", &PORTS, &[("web-0", State::Ready)])
    });
    let service = SocketAddrV4::new(IP, 80);
    let backend = SocketAddrV4::new(pod_ip(&c.tb, "web-0"), POD_PORT);
    // One GET from `port` to `target` over a socket of the test process (the TC path); the
    // client half-closes first (so the server keeps no TIME_WAIT), or resets the connection
    // after the answer.
    let get = |target: SocketAddrV4, port: u16, reset: bool| -> anyhow::Result<String> {
        let socket = Socket::new(Domain::IPV4, SocketType::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
        socket.connect_timeout(&target.into(), ANSWER_TIMEOUT)?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.set_read_timeout(Some(ANSWER_TIMEOUT))?;
        write!(stream, "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")?;
        if !reset {
            stream.shutdown(std::net::Shutdown::Write)?;
        }
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        if reset {
            Socket::from(stream).set_linger(Some(Duration::ZERO))?;
        }
        let reply = kiada::parse_reply(response.split("\r\n\r\n").nth(1).unwrap_or_default())?;
        Ok(reply.pod)
    };
    for (ended, port, reset) in [("FIN", 40_000, false), ("RST", 40_001, true)] {
        let results = netns::within(&pod(&c.tb, "execpod").ns, move || {
            [get(service, port, reset), get(backend, port, false)].map(|r| r.map_err(|e| format!("{e:#}")))
        })
        .expect("namespace");
        println!("{ended}: through {service}, then straight to {backend}, from port {port}: {results:?}");
        assert_eq!(results[0].as_deref(), Ok("web-0"), "{ended}: through the Service");
        assert_eq!(results[1].as_deref(), Ok("web-0"), "{ended}: straight to the backend afterwards");
    }
}
