//! Pure functions from the store to what one node's maps must hold. No I/O.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    backend::{Backend, BACKEND_F_LOCAL},
    service::{ServiceKey, SVC_F_EXTERNAL},
};

use crate::model::{Endpoint, NamespacedName, Protocol, ServicePort, ServiceRecord, SliceRecord, Store};

/// A frontend: which backend group it balances to, and how (`SVC_F_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub group: String,
    pub flags: u16,
}

/// Everything the maps of one node must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// Backend groups by name (one per Service port), each in a stable order.
    pub groups: BTreeMap<String, Vec<Backend>>,
    /// Address for SNAT to backends on other nodes.
    pub snat_addr: Option<Ipv4Addr>,
    /// Frontends claimed by more than one Service: the first claim (by name) wins.
    pub conflicts: Vec<String>,
}

/// The node the state is computed for.
pub struct NodeContext<'a> {
    pub name: &'a str,
    /// Every IPv4 address of the node: NodePorts answer on all of them.
    pub addrs: &'a [Ipv4Addr],
    /// SNAT address when the Node object has no InternalIP.
    pub default_snat_addr: Option<Ipv4Addr>,
}

pub fn compute(store: &Store, node: &NodeContext) -> DesiredState {
    let mut slices_by_service: HashMap<&NamespacedName, Vec<&SliceRecord>> = HashMap::new();
    for slice in store.slices() {
        slices_by_service.entry(&slice.service).or_default().push(slice);
    }
    let mut state = DesiredState {
        snat_addr: store.node(node.name).and_then(|n| n.internal_ip).or(node.default_snat_addr),
        ..Default::default()
    };
    for svc in store.services() {
        let slices = slices_by_service.get(&svc.id).map(Vec::as_slice).unwrap_or_default();
        for port in &svc.ports {
            let group = group_name(svc, port);
            state.groups.insert(group.clone(), backends(slices, port, node.name));
            for (key, flags) in frontends(svc, port, node.addrs) {
                add_frontend(&mut state, key, Frontend { group: group.clone(), flags });
            }
        }
    }
    state
}

fn add_frontend(state: &mut DesiredState, key: ServiceKey, frontend: Frontend) {
    match state.frontends.get(&key) {
        Some(existing) => state.conflicts.push(format!(
            "{}:{}/{} is claimed by {} and {}; keeping {}",
            key.ip(),
            key.host_port(),
            Protocol::from_number(key.proto).map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            existing.group,
            frontend.group,
            existing.group
        )),
        None => {
            state.frontends.insert(key, frontend);
        }
    }
}

/// Names the backend group of one Service port, e.g. `default/kiada:http/TCP`.
pub fn group_name(svc: &ServiceRecord, port: &ServicePort) -> String {
    format!("{}:{}/{}", svc.id, port.name, port.protocol)
}

fn frontends<'a>(
    svc: &'a ServiceRecord,
    port: &'a ServicePort,
    node_addrs: &'a [Ipv4Addr],
) -> impl Iterator<Item = (ServiceKey, u16)> + 'a {
    let proto = port.protocol.number();
    let cluster_ip = std::iter::once((ServiceKey::new(svc.cluster_ip, port.port, proto), 0));
    let node_ports = port.node_port.into_iter().flat_map(move |np| {
        node_addrs.iter().map(move |addr| (ServiceKey::new(*addr, np, proto), SVC_F_EXTERNAL))
    });
    cluster_ip.chain(node_ports)
}

/// The endpoints a new connection may go to, as kube-proxy picks them for Cluster policy
/// (pkg/proxy/topology.go): the ready ones; if none is ready, the serving terminating ones.
fn backends(slices: &[&SliceRecord], port: &ServicePort, node_name: &str) -> Vec<Backend> {
    // Per IP, the non-terminating endpoint wins over a terminating duplicate.
    let mut by_ip: BTreeMap<Ipv4Addr, (&Endpoint, u16)> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            match by_ip.get(&ep.addr) {
                Some((existing, _)) if !existing.terminating || ep.terminating => {}
                _ => {
                    by_ip.insert(ep.addr, (ep, target.port));
                }
            }
        }
    }
    let ready: Vec<_> = by_ip.values().filter(|(ep, _)| ep.ready).collect();
    let eligible = if ready.is_empty() {
        by_ip.values().filter(|(ep, _)| ep.serving && ep.terminating).collect()
    } else {
        ready
    };
    eligible
        .into_iter()
        .map(|(ep, target_port)| {
            let local = ep.node_name.as_deref() == Some(node_name);
            Backend::new(ep.addr, *target_port, if local { BACKEND_F_LOCAL } else { 0 })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_str;
    use lb_common::proto::{TCP, UDP};

    /// A store holding every object of a multi-document YAML text, all valid.
    fn store(yaml: &str) -> Store {
        let parsed = parse_str(yaml).unwrap();
        assert_eq!(parsed.errors, vec![]);
        let mut store = Store::default();
        let rejected = store.replace_all(parsed.objects.iter().map(|o| (o, "test.yaml")), []);
        assert!(rejected.is_empty(), "{rejected:?}");
        store
    }

    fn svc(name: &str, spec: &str) -> String {
        format!("kind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    }

    /// An IPv4 slice of Service `default/{service}`; `endpoints` is a flow-style list.
    fn slice(name: &str, service: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "kind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n---\n"
        )
    }

    /// A flow-style endpoint: `ep("10.244.1.1", "node-b", "ready: false")`.
    fn ep(addr: &str, node: &str, conditions: &str) -> String {
        format!("{{addresses: [{addr}], nodeName: {node}, conditions: {{{conditions}}}}}")
    }

    const WEB: &str = "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}";
    const HTTP: &str = "[{name: http, port: 8080}]";
    const NODE_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(192, 168, 1, 10)];

    fn node() -> NodeContext<'static> {
        NodeContext {
            name: "node-a",
            addrs: &NODE_ADDRS,
            default_snat_addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn frontend(group: &str, flags: u16) -> Frontend {
        Frontend { group: group.into(), flags }
    }

    /// The backends of group `default/web:http/TCP` as (address, port, flags).
    fn web_backends(yaml: &str) -> Vec<(Ipv4Addr, u16, u8)> {
        let state = compute(&store(yaml), &node());
        state.groups["default/web:http/TCP"].iter().map(|b| (b.ip(), b.host_port(), b.flags)).collect()
    }

    #[test]
    fn node_port_service_has_cluster_ip_and_external_node_port_frontends_on_every_node_address() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]}";
        let state = compute(&store(&svc("web", spec)), &node());
        let (http, dns) = ("default/web:http/TCP", "default/web:dns/UDP");
        let expected: BTreeMap<ServiceKey, Frontend> = [
            (ServiceKey::new(ip("10.96.0.10"), 80, TCP), frontend(http, 0)),
            (ServiceKey::new(ip("198.18.0.1"), 30080, TCP), frontend(http, SVC_F_EXTERNAL)),
            (ServiceKey::new(ip("192.168.1.10"), 30080, TCP), frontend(http, SVC_F_EXTERNAL)),
            (ServiceKey::new(ip("10.96.0.10"), 53, UDP), frontend(dns, 0)),
            (ServiceKey::new(ip("198.18.0.1"), 30053, UDP), frontend(dns, SVC_F_EXTERNAL)),
            (ServiceKey::new(ip("192.168.1.10"), 30053, UDP), frontend(dns, SVC_F_EXTERNAL)),
        ]
        .into_iter()
        .collect();
        assert_eq!(state.frontends, expected);
        let groups: BTreeMap<String, Vec<Backend>> =
            [(http.to_string(), vec![]), (dns.to_string(), vec![])].into_iter().collect();
        assert_eq!(state.groups, groups);
        assert_eq!(state.conflicts, Vec::<String>::new());
    }

    #[test]
    fn cluster_ip_service_has_no_node_port_frontends() {
        let state = compute(&store(&svc("web", WEB)), &node());
        let expected: BTreeMap<ServiceKey, Frontend> =
            [(ServiceKey::new(ip("10.96.0.10"), 80, TCP), frontend("default/web:http/TCP", 0))]
                .into_iter()
                .collect();
        assert_eq!(state.frontends, expected);
    }

    #[test]
    fn skipped_and_absent_services_have_no_frontends() {
        let yaml = svc("headless", "{clusterIP: None, ports: [{port: 80}]}")
            + &slice("headless-1", "headless", "[{port: 80}]", "[{addresses: [10.244.1.1]}]");
        assert_eq!(
            compute(&store(&yaml), &node()),
            DesiredState { snat_addr: Some(ip("198.18.0.1")), ..Default::default() }
        );
    }

    #[test]
    fn only_ready_endpoints_are_chosen_when_any_is_ready() {
        let endpoints = format!(
            "[{}, {}, {}, {}]",
            ep("10.244.1.3", "node-b", ""),
            ep("10.244.1.1", "node-b", "ready: true, serving: true, terminating: false"),
            ep("10.244.1.2", "node-b", "ready: false, serving: false, terminating: false"),
            ep("10.244.1.4", "node-b", "ready: false, serving: true, terminating: true"),
        );
        let yaml = svc("web", WEB) + &slice("web-1", "web", HTTP, &endpoints);
        assert_eq!(web_backends(&yaml), vec![(ip("10.244.1.1"), 8080, 0), (ip("10.244.1.3"), 8080, 0)]);
    }

    #[test]
    fn serving_terminating_endpoints_are_chosen_when_none_is_ready() {
        let endpoints = format!(
            "[{}, {}, {}, {}]",
            ep("10.244.1.1", "node-b", "ready: false, serving: true, terminating: true"),
            ep("10.244.1.2", "node-b", "ready: false, serving: false, terminating: true"),
            ep("10.244.1.3", "node-b", "ready: false, serving: true, terminating: false"),
            ep("10.244.1.4", "node-b", "ready: false, terminating: true"),
        );
        let yaml = svc("web", WEB) + &slice("web-1", "web", HTTP, &endpoints);
        assert_eq!(web_backends(&yaml), vec![(ip("10.244.1.1"), 8080, 0), (ip("10.244.1.4"), 8080, 0)]);
    }

    #[test]
    fn no_backend_when_no_endpoint_is_ready_or_serving_terminating() {
        let endpoints = format!(
            "[{}, {}]",
            ep("10.244.1.1", "node-b", "ready: false, serving: false, terminating: true"),
            ep("10.244.1.2", "node-b", "ready: false, serving: true, terminating: false"),
        );
        let yaml = svc("web", WEB) + &slice("web-1", "web", HTTP, &endpoints);
        assert_eq!(web_backends(&yaml), vec![]);
    }

    #[test]
    fn duplicate_ip_across_slices_takes_the_non_terminating_endpoint() {
        let terminating = ep("10.244.1.1", "node-b", "ready: false, serving: true, terminating: true");
        let ready = ep("10.244.1.1", "node-b", "");
        // The slices differ in target port, which shows which endpoint was taken, in both orders.
        let yaml = svc("web", WEB)
            + &slice("web-a", "web", "[{name: http, port: 8081}]", &format!("[{terminating}]"))
            + &slice("web-b", "web", "[{name: http, port: 8082}]", &format!("[{ready}]"));
        assert_eq!(web_backends(&yaml), vec![(ip("10.244.1.1"), 8082, 0)]);
        let yaml = svc("web", WEB)
            + &slice("web-a", "web", "[{name: http, port: 8081}]", &format!("[{ready}]"))
            + &slice("web-b", "web", "[{name: http, port: 8082}]", &format!("[{terminating}]"));
        assert_eq!(web_backends(&yaml), vec![(ip("10.244.1.1"), 8081, 0)]);
    }

    #[test]
    fn slice_port_is_matched_by_name_and_protocol() {
        let spec = "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {name: metrics, port: 9090}, {port: 53, protocol: UDP}]}";
        let yaml = svc("web", spec)
            + &slice("web-1", "web", "[{name: metrics, port: 9100}, {name: http, port: 8080}, {port: 5353, protocol: UDP}]", "[{addresses: [10.244.1.1]}]")
            // Port name "web" and http/UDP match no Service port: these slices contribute nothing.
            + &slice("web-2", "web", "[{name: web, port: 8080}]", "[{addresses: [10.244.2.2]}]")
            + &slice("web-3", "web", "[{name: http, port: 8080, protocol: UDP}]", "[{addresses: [10.244.3.3]}]")
            // Same Service name in another namespace: not this Service's slice.
            + "kind: EndpointSlice\nmetadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.4.4]}]\n";
        let state = compute(&store(&yaml), &node());
        let groups: BTreeMap<String, Vec<Backend>> = [
            ("default/web:/UDP".to_string(), vec![Backend::new(ip("10.244.1.1"), 5353, 0)]),
            ("default/web:http/TCP".to_string(), vec![Backend::new(ip("10.244.1.1"), 8080, 0)]),
            ("default/web:metrics/TCP".to_string(), vec![Backend::new(ip("10.244.1.1"), 9100, 0)]),
        ]
        .into_iter()
        .collect();
        assert_eq!(state.groups, groups);
    }

    #[test]
    fn endpoint_on_this_node_is_flagged_local() {
        let endpoints = format!(
            "[{}, {}, {{addresses: [10.244.1.3]}}]",
            ep("10.244.1.1", "node-a", ""),
            ep("10.244.1.2", "node-b", "")
        );
        let yaml = svc("web", WEB) + &slice("web-1", "web", HTTP, &endpoints);
        assert_eq!(
            web_backends(&yaml),
            vec![
                (ip("10.244.1.1"), 8080, BACKEND_F_LOCAL),
                (ip("10.244.1.2"), 8080, 0),
                (ip("10.244.1.3"), 8080, 0)
            ]
        );
    }

    #[test]
    fn snat_addr_is_the_node_internal_ip_else_the_default() {
        let node_obj = |name: &str, addresses: &str| {
            format!("kind: Node\nmetadata: {{name: {name}}}\nstatus: {{addresses: {addresses}}}\n---\n")
        };
        let with_ip = node_obj(
            "node-a",
            "[{type: ExternalIP, address: 203.0.113.7}, {type: InternalIP, address: 10.0.0.7}]",
        );
        assert_eq!(compute(&store(&with_ip), &node()).snat_addr, Some(ip("10.0.0.7")));
        let without_ip = node_obj("node-a", "[{type: Hostname, address: node-a}]");
        assert_eq!(compute(&store(&without_ip), &node()).snat_addr, Some(ip("198.18.0.1")));
        let other_node = node_obj("node-b", "[{type: InternalIP, address: 10.0.0.8}]");
        assert_eq!(compute(&store(&other_node), &node()).snat_addr, Some(ip("198.18.0.1")));
        let no_default = NodeContext { default_snat_addr: None, ..node() };
        assert_eq!(compute(&store(&other_node), &no_default).snat_addr, None);
        assert_eq!(compute(&store(&with_ip), &no_default).snat_addr, Some(ip("10.0.0.7")));
    }

    #[test]
    fn frontend_claimed_by_two_services_is_a_conflict_won_by_the_first_name() {
        let spec = |ip: &str| {
            format!("{{type: NodePort, clusterIP: {ip}, ports: [{{name: http, port: 80, nodePort: 30080}}]}}")
        };
        // "beta" comes first in the text; "alpha" still wins: the order is by name.
        let yaml = svc("beta", &spec("10.96.0.2")) + &svc("alpha", &spec("10.96.0.1"));
        let state = compute(&store(&yaml), &node());
        let (alpha, beta) = ("default/alpha:http/TCP", "default/beta:http/TCP");
        let expected: BTreeMap<ServiceKey, Frontend> = [
            (ServiceKey::new(ip("10.96.0.1"), 80, TCP), frontend(alpha, 0)),
            (ServiceKey::new(ip("10.96.0.2"), 80, TCP), frontend(beta, 0)),
            (ServiceKey::new(ip("198.18.0.1"), 30080, TCP), frontend(alpha, SVC_F_EXTERNAL)),
            (ServiceKey::new(ip("192.168.1.10"), 30080, TCP), frontend(alpha, SVC_F_EXTERNAL)),
        ]
        .into_iter()
        .collect();
        assert_eq!(state.frontends, expected);
        assert_eq!(
            state.conflicts,
            vec![
                format!("198.18.0.1:30080/TCP is claimed by {alpha} and {beta}; keeping {alpha}"),
                format!("192.168.1.10:30080/TCP is claimed by {alpha} and {beta}; keeping {alpha}"),
            ]
        );
    }
}
