//! What one node's maps must hold, from the store. No I/O.
//!
//! Each Service's part (its frontends, groups and health check) depends only on that
//! Service, its slices and the node (`service`); `Incremental` keeps the parts and merges
//! them into one `DesiredState`, recomputing only the Services that changed.
#[cfg(test)]
pub(crate) mod churn;
mod incremental;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use lb_common::{backend::Backend, service::ServiceKey};

pub use incremental::{Changes, Incremental};

use crate::model::{service_port_name, NamespacedName, ServicePort, ServiceRecord, Store};

/// Name of a backend group, e.g. `default/kiada:http/TCP`: shared, not copied, by the
/// frontends that use it.
pub type GroupName = Arc<str>;

/// A frontend: the backend groups it balances to, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Group for clients outside the node.
    pub group: GroupName,
    /// Group for this node's pods and processes.
    pub internal_group: GroupName,
    /// `SVC_F_*` bits.
    pub flags: u16,
    /// ClientIP session affinity timeout; 0 when off.
    pub affinity_timeout_s: u32,
    /// The Service port it belongs to (its Cluster group's name): traffic is counted per
    /// Service port.
    pub service_port: GroupName,
}

/// An allowed client range of a frontend: (frontend, network address, prefix length).
pub type SourceRange = (ServiceKey, Ipv4Addr, u8);

/// Everything the maps of one node must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<ServiceKey, Frontend>,
    /// Backend groups by name, each in a stable order: per Service port the Cluster group,
    /// and the Local group when a frontend uses it.
    pub groups: BTreeMap<GroupName, Vec<Backend>>,
    /// Per UDP Service port (named by its Cluster group), the endpoints that serve (ready,
    /// or serving while terminating), whatever the traffic policies: a tracked UDP flow to
    /// any other endpoint is stale and gets balanced again (kube-proxy's conntrack cleanup).
    pub udp_serving: BTreeMap<GroupName, BTreeSet<(Ipv4Addr, u16)>>,
    /// Allowed client ranges of the frontends flagged `SVC_F_SOURCE_RANGES`.
    pub source_ranges: BTreeSet<SourceRange>,
    /// Address for SNAT to backends on other nodes.
    pub snat_addr: Option<Ipv4Addr>,
    /// healthCheckNodePort → (Service, its local ready endpoint IPs), as kube-proxy counts them.
    pub health_checks: BTreeMap<u16, (NamespacedName, usize)>,
    /// Frontends or health check ports claimed by more than one Service: the first claim (by
    /// name) wins.
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

/// The desired state of the whole store, computed afresh.
pub fn compute(store: &Store, node: &NodeContext) -> DesiredState {
    let mut desired = Incremental::default();
    desired.apply(store, node, &BTreeSet::new());
    desired.into_state()
}

/// The source ranges of frontend `key` among `ranges`.
pub fn frontend_ranges(
    ranges: &BTreeSet<SourceRange>,
    key: ServiceKey,
) -> impl Iterator<Item = &SourceRange> {
    ranges.range((key, Ipv4Addr::UNSPECIFIED, 0)..=(key, Ipv4Addr::BROADCAST, u8::MAX))
}

/// Names the Cluster backend group of one Service port: kube-proxy's ServicePortName, then
/// the protocol, e.g. `default/kiada:http/TCP`, `default/dns/UDP` for an unnamed port. Its
/// Local group has ` local` appended.
pub fn group_name(svc: &ServiceRecord, port: &ServicePort) -> String {
    format!("{}/{}", service_port_name(&svc.id, &port.name), port.protocol)
}

/// (namespace, name, `port/PROTO`) of a Cluster group name, `/PROTO` for an unnamed port:
/// Kubernetes names and port names contain neither `/` nor `:`, so the split is unambiguous.
pub fn split_group_name(group: &str) -> (String, String, String) {
    let (namespace, rest) = group.split_once('/').unwrap_or(("", group));
    let (name, port) = match rest.find([':', '/']) {
        Some(i) if rest[i..].starts_with(':') => (&rest[..i], &rest[i + 1..]),
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    (namespace.to_string(), name.to_string(), port.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_str;
    use lb_common::{
        backend::BACKEND_F_LOCAL,
        proto::{TCP, UDP},
        service::{SVC_F_NO_ENDPOINTS, SVC_F_SOURCE_RANGES},
    };

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

    /// A frontend whose clients all go to `group`, without affinity.
    fn frontend(group: &str, flags: u16) -> Frontend {
        external(group, group, flags)
    }

    /// A frontend sending outside clients to `group` and the node's own to `internal_group`.
    fn external(group: &str, internal_group: &str, flags: u16) -> Frontend {
        Frontend {
            group: group.into(),
            internal_group: internal_group.into(),
            flags,
            affinity_timeout_s: 0,
            // The Cluster group's name: either group without the " local" suffix.
            service_port: group.trim_end_matches(" local").into(),
        }
    }

    fn frontends<const N: usize>(entries: [(&str, u16, u8, Frontend); N]) -> BTreeMap<ServiceKey, Frontend> {
        entries
            .into_iter()
            .map(|(addr, port, proto, fe)| (ServiceKey::new(ip(addr), port, proto), fe))
            .collect()
    }

    /// The backends of group `default/web:http/TCP` as (address, port, flags).
    fn web_backends(yaml: &str) -> Vec<(Ipv4Addr, u16, u8)> {
        let state = compute(&store(yaml), &node());
        state.groups["default/web:http/TCP"].iter().map(|b| (b.ip(), b.host_port(), b.flags)).collect()
    }

    /// The backends of group `name` as (address, port, flags).
    fn group(state: &DesiredState, name: &str) -> Vec<(Ipv4Addr, u16, u8)> {
        state.groups[name].iter().map(|b| (b.ip(), b.host_port(), b.flags)).collect()
    }

    /// A LoadBalancer Service with `spec_extra` added to its spec and the given flow-style
    /// `status.loadBalancer.ingress` list.
    fn lb_svc(name: &str, cluster_ip: &str, spec_extra: &str, ingress: &str) -> String {
        format!(
            "kind: Service\nmetadata: {{name: {name}}}\nspec: {{type: LoadBalancer, clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, nodePort: 30080}}]{spec_extra}}}\nstatus: {{loadBalancer: {{ingress: {ingress}}}}}\n---\n"
        )
    }

    const CLUSTER: &str = "default/web:http/TCP";
    const LOCAL: &str = "default/web:http/TCP local";

    /// One ready endpoint on this node (10.244.1.1) and one on node-b (10.244.2.2).
    fn web_slice() -> String {
        slice(
            "web-1",
            "web",
            HTTP,
            &format!("[{}, {}]", ep("10.244.1.1", "node-a", ""), ep("10.244.2.2", "node-b", "")),
        )
    }

    #[test]
    fn node_port_service_has_cluster_ip_and_node_port_frontends_on_every_node_address() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}]}";
        let yaml = svc("web", spec) + &slice("web-1", "web", HTTP, "[{addresses: [10.244.1.1]}]");
        let state = compute(&store(&yaml), &node());
        let (http, dns) = ("default/web:http/TCP", "default/web:dns/UDP");
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(http, 0)),
            ("198.18.0.1", 30080, TCP, frontend(http, 0)),
            ("192.168.1.10", 30080, TCP, frontend(http, 0)),
            // dns has no endpoint: its frontends reject.
            ("10.96.0.10", 53, UDP, frontend(dns, SVC_F_NO_ENDPOINTS)),
            ("198.18.0.1", 30053, UDP, frontend(dns, SVC_F_NO_ENDPOINTS)),
            ("192.168.1.10", 30053, UDP, frontend(dns, SVC_F_NO_ENDPOINTS)),
        ]);
        assert_eq!(state.frontends, expected);
        let groups: BTreeMap<GroupName, Vec<Backend>> =
            [(http.into(), vec![Backend::new(ip("10.244.1.1"), 8080, 0)]), (dns.into(), vec![])]
                .into_iter()
                .collect();
        assert_eq!(state.groups, groups);
        assert_eq!(state.source_ranges, BTreeSet::new());
        assert_eq!(state.conflicts, Vec::<String>::new());
    }

    #[test]
    fn cluster_ip_service_has_no_node_port_frontends() {
        let state = compute(&store(&svc("web", WEB)), &node());
        let expected =
            frontends([("10.96.0.10", 80, TCP, frontend("default/web:http/TCP", SVC_F_NO_ENDPOINTS))]);
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
        let groups: BTreeMap<GroupName, Vec<Backend>> = [
            ("default/web/UDP".into(), vec![Backend::new(ip("10.244.1.1"), 5353, 0)]),
            ("default/web:http/TCP".into(), vec![Backend::new(ip("10.244.1.1"), 8080, 0)]),
            ("default/web:metrics/TCP".into(), vec![Backend::new(ip("10.244.1.1"), 9100, 0)]),
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
        let expected = frontends([
            ("10.96.0.1", 80, TCP, frontend(alpha, SVC_F_NO_ENDPOINTS)),
            ("10.96.0.2", 80, TCP, frontend(beta, SVC_F_NO_ENDPOINTS)),
            ("198.18.0.1", 30080, TCP, frontend(alpha, SVC_F_NO_ENDPOINTS)),
            ("192.168.1.10", 30080, TCP, frontend(alpha, SVC_F_NO_ENDPOINTS)),
        ]);
        assert_eq!(state.frontends, expected);
        assert_eq!(
            state.conflicts,
            vec![
                format!("198.18.0.1:30080/TCP is claimed by {alpha} and {beta}; keeping {alpha}"),
                format!("192.168.1.10:30080/TCP is claimed by {alpha} and {beta}; keeping {alpha}"),
            ]
        );
    }

    #[test]
    fn external_traffic_policy_local_sends_outside_clients_to_local_endpoints_and_the_node_to_all() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
        let state = compute(&store(&(svc("web", spec) + &web_slice())), &node());
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(CLUSTER, 0)),
            ("198.18.0.1", 30080, TCP, external(LOCAL, CLUSTER, 0)),
            ("192.168.1.10", 30080, TCP, external(LOCAL, CLUSTER, 0)),
        ]);
        assert_eq!(state.frontends, expected);
        assert_eq!(
            group(&state, CLUSTER),
            vec![(ip("10.244.1.1"), 8080, BACKEND_F_LOCAL), (ip("10.244.2.2"), 8080, 0)]
        );
        assert_eq!(group(&state, LOCAL), vec![(ip("10.244.1.1"), 8080, BACKEND_F_LOCAL)]);
    }

    #[test]
    fn internal_traffic_policy_local_sends_cluster_ip_clients_to_local_endpoints_and_leaves_node_ports_alone()
    {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
        let state = compute(&store(&(svc("web", spec) + &web_slice())), &node());
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(LOCAL, 0)),
            ("198.18.0.1", 30080, TCP, frontend(CLUSTER, 0)),
            ("192.168.1.10", 30080, TCP, frontend(CLUSTER, 0)),
        ]);
        assert_eq!(state.frontends, expected);
        assert_eq!(group(&state, LOCAL), vec![(ip("10.244.1.1"), 8080, BACKEND_F_LOCAL)]);
    }

    #[test]
    fn local_group_exists_only_when_a_frontend_uses_it() {
        let groups = |yaml: &str| {
            compute(&store(yaml), &node()).groups.into_keys().map(|name| name.to_string()).collect::<Vec<_>>()
        };
        // externalTrafficPolicy Local without any external frontend: nothing uses it.
        let no_external =
            "{clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80}]}";
        assert_eq!(groups(&(svc("web", no_external) + &web_slice())), vec![CLUSTER]);
        let lb_without_node_port = lb_svc("web", "10.96.0.10", ", externalTrafficPolicy: Local", "[]")
            .replace(", nodePort: 30080", "");
        assert_eq!(groups(&(lb_without_node_port + &web_slice())), vec![CLUSTER]);
        let itp = "{clusterIP: 10.96.0.10, internalTrafficPolicy: Local, ports: [{name: http, port: 80}]}";
        assert_eq!(groups(&(svc("web", itp) + &web_slice())), vec![CLUSTER, LOCAL]);
    }

    #[test]
    fn cluster_and_local_sets_fall_back_to_serving_terminating_endpoints_separately() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
        let terminating = "ready: false, serving: true, terminating: true";
        let sets = |endpoints: &[String]| {
            let yaml =
                svc("web", spec) + &slice("web-1", "web", HTTP, &format!("[{}]", endpoints.join(", ")));
            let state = compute(&store(&yaml), &node());
            let addrs = |name| group(&state, name).into_iter().map(|(addr, _, _)| addr).collect::<Vec<_>>();
            (addrs(CLUSTER), addrs(LOCAL))
        };
        // Ready only elsewhere: the cluster set takes it, the local set falls back.
        assert_eq!(
            sets(&[
                ep("10.244.1.1", "node-a", terminating),
                ep("10.244.1.2", "node-a", "ready: false, serving: false, terminating: true"),
                ep("10.244.2.2", "node-b", ""),
            ]),
            (vec![ip("10.244.2.2")], vec![ip("10.244.1.1")])
        );
        // Ready only here: both sets take it.
        assert_eq!(
            sets(&[ep("10.244.1.1", "node-a", ""), ep("10.244.2.2", "node-b", terminating)]),
            (vec![ip("10.244.1.1")], vec![ip("10.244.1.1")])
        );
        // Nothing ready: both fall back, each to its own serving terminating endpoints.
        assert_eq!(
            sets(&[ep("10.244.1.1", "node-a", terminating), ep("10.244.2.2", "node-b", terminating)]),
            (vec![ip("10.244.1.1"), ip("10.244.2.2")], vec![ip("10.244.1.1")])
        );
        // Nothing usable here: the local set is empty.
        assert_eq!(
            sets(&[ep("10.244.1.1", "node-a", "ready: false"), ep("10.244.2.2", "node-b", "")]),
            (vec![ip("10.244.2.2")], vec![])
        );
    }

    #[test]
    fn no_endpoints_flag_is_set_when_the_cluster_set_is_empty_not_when_only_the_local_set_is() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, internalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
        let flags = |endpoints: &str| {
            let yaml = svc("web", spec) + &slice("web-1", "web", HTTP, endpoints);
            let state = compute(&store(&yaml), &node());
            state.frontends.values().map(|f| f.flags).collect::<BTreeSet<_>>()
        };
        // Only on node-b: this node drops (empty local group) rather than rejects.
        assert_eq!(flags(&format!("[{}]", ep("10.244.2.2", "node-b", ""))), [0].into());
        assert_eq!(flags("[]"), [SVC_F_NO_ENDPOINTS].into());
        let unusable = format!(
            "[{}, {}]",
            ep("10.244.1.1", "node-a", "ready: false, serving: true, terminating: false"),
            ep("10.244.2.2", "node-b", "ready: false, serving: false, terminating: true")
        );
        assert_eq!(flags(&unusable), [SVC_F_NO_ENDPOINTS].into());
    }

    #[test]
    fn external_ips_are_external_frontends_on_the_service_port() {
        let spec = "{clusterIP: 10.96.0.10, externalIPs: [203.0.113.7, '2001:db8::7'], externalTrafficPolicy: Local, ports: [{name: http, port: 80}]}";
        let state = compute(&store(&(svc("web", spec) + &web_slice())), &node());
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(CLUSTER, 0)),
            ("203.0.113.7", 80, TCP, external(LOCAL, CLUSTER, 0)),
        ]);
        assert_eq!(state.frontends, expected);
        assert_eq!(group(&state, LOCAL), vec![(ip("10.244.1.1"), 8080, BACKEND_F_LOCAL)]);
    }

    #[test]
    fn lb_ingress_ips_are_external_frontends_and_proxy_mode_ingress_is_left_to_the_load_balancer() {
        let ingress = "[{ip: 203.0.113.1}, {ip: 203.0.113.2, ipMode: VIP}, {ip: 203.0.113.3, ipMode: Proxy}]";
        let state = compute(&store(&(lb_svc("web", "10.96.0.10", "", ingress) + &web_slice())), &node());
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(CLUSTER, 0)),
            ("198.18.0.1", 30080, TCP, frontend(CLUSTER, 0)),
            ("192.168.1.10", 30080, TCP, frontend(CLUSTER, 0)),
            ("203.0.113.1", 80, TCP, frontend(CLUSTER, 0)),
            ("203.0.113.2", 80, TCP, frontend(CLUSTER, 0)),
        ]);
        assert_eq!(state.frontends, expected);
        assert_eq!(state.source_ranges, BTreeSet::new());
    }

    #[test]
    fn source_ranges_flag_lb_ip_frontends_only_and_are_listed_normalised_per_frontend() {
        let spec_extra = ", externalIPs: [203.0.113.9], loadBalancerSourceRanges: [10.1.2.3/8, 198.18.0.100/32, '2001:db8::/32']";
        let ingress = "[{ip: 203.0.113.1}, {ip: 203.0.113.2}]";
        let state =
            compute(&store(&(lb_svc("web", "10.96.0.10", spec_extra, ingress) + &web_slice())), &node());
        let ranged = frontend(CLUSTER, SVC_F_SOURCE_RANGES);
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(CLUSTER, 0)),
            ("198.18.0.1", 30080, TCP, frontend(CLUSTER, 0)),
            ("192.168.1.10", 30080, TCP, frontend(CLUSTER, 0)),
            ("203.0.113.9", 80, TCP, frontend(CLUSTER, 0)),
            ("203.0.113.1", 80, TCP, ranged.clone()),
            ("203.0.113.2", 80, TCP, ranged),
        ]);
        assert_eq!(state.frontends, expected);
        let (lb1, lb2) =
            (ServiceKey::new(ip("203.0.113.1"), 80, TCP), ServiceKey::new(ip("203.0.113.2"), 80, TCP));
        let ranges: BTreeSet<SourceRange> = [
            (lb1, ip("10.0.0.0"), 8),
            (lb1, ip("198.18.0.100"), 32),
            (lb2, ip("10.0.0.0"), 8),
            (lb2, ip("198.18.0.100"), 32),
        ]
        .into();
        assert_eq!(state.source_ranges, ranges);
    }

    #[test]
    fn lb_ip_lost_in_a_conflict_does_not_get_the_losers_source_ranges() {
        let ingress = "[{ip: 203.0.113.1}]";
        let yaml = lb_svc("alpha", "10.96.0.1", "", ingress)
            + &lb_svc("beta", "10.96.0.2", ", loadBalancerSourceRanges: [10.0.0.0/8]", ingress)
                .replace("30080", "30081");
        let state = compute(&store(&yaml), &node());
        let key = ServiceKey::new(ip("203.0.113.1"), 80, TCP);
        assert_eq!(state.frontends[&key], frontend("default/alpha:http/TCP", SVC_F_NO_ENDPOINTS));
        assert_eq!(state.source_ranges, BTreeSet::new());
        assert_eq!(
            state.conflicts,
            vec!["203.0.113.1:80/TCP is claimed by default/alpha:http/TCP and default/beta:http/TCP; keeping default/alpha:http/TCP"]
        );
    }

    #[test]
    fn load_balancer_without_allocated_node_ports_has_no_node_port_frontends() {
        let lb = lb_svc("web", "10.96.0.10", ", allocateLoadBalancerNodePorts: false", "[{ip: 203.0.113.1}]")
            .replace(", nodePort: 30080", "");
        let state = compute(&store(&(lb + &web_slice())), &node());
        let expected = frontends([
            ("10.96.0.10", 80, TCP, frontend(CLUSTER, 0)),
            ("203.0.113.1", 80, TCP, frontend(CLUSTER, 0)),
        ]);
        assert_eq!(state.frontends, expected);
    }

    #[test]
    fn client_ip_affinity_timeout_is_on_every_frontend_of_the_service() {
        let timeouts = |spec_extra: &str| {
            let yaml = lb_svc("web", "10.96.0.10", spec_extra, "[{ip: 203.0.113.1}]") + &web_slice();
            compute(&store(&yaml), &node())
                .frontends
                .values()
                .map(|f| f.affinity_timeout_s)
                .collect::<Vec<_>>()
        };
        assert_eq!(timeouts(""), vec![0; 4]);
        assert_eq!(timeouts(", sessionAffinity: ClientIP"), vec![10_800; 4]);
        assert_eq!(
            timeouts(", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}"),
            vec![60; 4]
        );
    }

    #[test]
    fn service_with_affinity_timeout_out_of_range_is_rejected_and_its_last_good_version_kept() {
        let good = lb_svc("web", "10.96.0.10", ", sessionAffinity: ClientIP", "[]");
        let mut store = store(&good);
        let bad = parse_str(
            &good.replace("ClientIP", "ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}"),
        )
        .unwrap()
        .objects;
        let rejected = store.replace_all(bad.iter().map(|o| (o, "test.yaml")), []);
        assert_eq!(
            rejected.iter().map(|r| r.error.field.as_str()).collect::<Vec<_>>(),
            vec!["spec.sessionAffinityConfig.clientIP.timeoutSeconds"]
        );
        let state = compute(&store, &node());
        assert!(state.frontends.values().all(|f| f.affinity_timeout_s == 10_800));
    }

    /// A LoadBalancer Service with externalTrafficPolicy Local and the given healthCheckNodePort.
    fn hc_svc(name: &str, cluster_ip: &str, node_port: u16, hc_port: u16) -> String {
        lb_svc(
            name,
            cluster_ip,
            &format!(", externalTrafficPolicy: Local, healthCheckNodePort: {hc_port}"),
            "[]",
        )
        .replace("30080", &node_port.to_string())
    }

    fn nn(namespace: &str, name: &str) -> NamespacedName {
        NamespacedName { namespace: namespace.into(), name: name.into() }
    }

    #[test]
    fn health_check_counts_the_distinct_ips_of_this_nodes_ready_endpoints_over_all_slices() {
        let web_1 = format!(
            "[{}, {}, {}, {}]",
            ep("10.244.1.1", "node-a", ""),
            ep("10.244.1.2", "node-a", "ready: false, serving: true, terminating: true"),
            ep("10.244.1.4", "node-a", "ready: false"),
            ep("10.244.2.2", "node-b", ""),
        );
        // web-2 repeats 10.244.1.1 on another port and adds 10.244.1.3.
        let web_2 = format!("[{}, {}]", ep("10.244.1.1", "node-a", ""), ep("10.244.1.3", "node-a", ""));
        let yaml = hc_svc("web", "10.96.0.10", 30080, 32000)
            + &slice("web-1", "web", HTTP, &web_1)
            + &slice("web-2", "web", "[{name: metrics, port: 9100}]", &web_2);
        let state = compute(&store(&yaml), &node());
        assert_eq!(state.health_checks, [(32000, (nn("default", "web"), 2))].into());
        assert_eq!(state.conflicts, Vec::<String>::new());
    }

    #[test]
    fn health_check_of_a_service_without_local_ready_endpoints_counts_zero() {
        let yaml = hc_svc("web", "10.96.0.10", 30080, 32000)
            + &slice("web-1", "web", HTTP, &format!("[{}]", ep("10.244.2.2", "node-b", "")));
        assert_eq!(
            compute(&store(&yaml), &node()).health_checks,
            [(32000, (nn("default", "web"), 0))].into()
        );
        let without_slices = hc_svc("web", "10.96.0.10", 30080, 32000);
        assert_eq!(
            compute(&store(&without_slices), &node()).health_checks,
            [(32000, (nn("default", "web"), 0))].into()
        );
    }

    #[test]
    fn only_load_balancers_with_external_traffic_policy_local_get_a_health_check() {
        let cluster_policy = lb_svc("web", "10.96.0.10", ", healthCheckNodePort: 32000", "[]");
        let state = compute(&store(&(cluster_policy + &web_slice())), &node());
        assert_eq!(state.health_checks, BTreeMap::new());
    }

    #[test]
    fn health_check_node_port_claimed_by_two_services_is_a_conflict_won_by_the_first_name() {
        // "beta" comes first in the text and has the local endpoint; "alpha" still wins.
        let yaml = hc_svc("beta", "10.96.0.2", 30081, 32000)
            + &hc_svc("alpha", "10.96.0.1", 30080, 32000)
            + &slice("beta-1", "beta", HTTP, &format!("[{}]", ep("10.244.1.1", "node-a", "")));
        let state = compute(&store(&yaml), &node());
        assert_eq!(state.health_checks, [(32000, (nn("default", "alpha"), 0))].into());
        assert_eq!(
            state.conflicts,
            vec!["healthCheckNodePort 32000 is claimed by default/alpha and default/beta; keeping default/alpha"]
        );
    }

    /// Node `node-a` with the given labels (flow-style map).
    fn node_obj(labels: &str) -> String {
        format!("kind: Node\nmetadata: {{name: node-a, labels: {labels}}}\n---\n")
    }

    /// A ready endpoint hinted for `zones` (flow-style list of names); `[]` for no hints.
    fn hinted(addr: &str, node: &str, zones: &[&str]) -> String {
        hinted_for(addr, node, zones, &[])
    }

    /// A ready endpoint with `hints.forZones` of `zones` and `hints.forNodes` of `nodes`, each
    /// left out when empty.
    fn hinted_for(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> String {
        let names =
            |names: &[&str]| -> Vec<String> { names.iter().map(|n| format!("{{name: {n}}}")).collect() };
        let mut hints = Vec::new();
        if !zones.is_empty() {
            hints.push(format!("forZones: [{}]", names(zones).join(", ")));
        }
        if !nodes.is_empty() {
            hints.push(format!("forNodes: [{}]", names(nodes).join(", ")));
        }
        let hints =
            if hints.is_empty() { String::new() } else { format!(", hints: {{{}}}", hints.join(", ")) };
        format!("{{addresses: [{addr}], nodeName: {node}{hints}}}")
    }

    /// A ready endpoint hinted for `nodes` (trafficDistribution: PreferSameNode).
    fn node_hinted(addr: &str, node: &str, nodes: &[&str]) -> String {
        hinted_for(addr, node, &[], nodes)
    }

    const ZONE_A: &str = "{topology.kubernetes.io/zone: zone-a}";

    /// The addresses of the Cluster group of Service `web` (ClusterIP) with the given endpoints,
    /// on node-a labelled `node_labels` (`None`: no Node object).
    fn cluster_addrs(node_labels: Option<&str>, endpoints: &[String]) -> Vec<Ipv4Addr> {
        let yaml = node_labels.map(node_obj).unwrap_or_default()
            + &svc("web", WEB)
            + &slice("web-1", "web", HTTP, &format!("[{}]", endpoints.join(", ")));
        let state = compute(&store(&yaml), &node());
        group(&state, CLUSTER).into_iter().map(|(addr, _, _)| addr).collect()
    }

    #[test]
    fn cluster_group_holds_only_the_endpoints_hinted_for_the_nodes_zone() {
        let endpoints = [
            hinted("10.244.1.1", "node-a", &["zone-a"]),
            hinted("10.244.2.2", "node-b", &["zone-b"]),
            hinted("10.244.3.3", "node-c", &["zone-b", "zone-a"]),
        ];
        assert_eq!(cluster_addrs(Some(ZONE_A), &endpoints), vec![ip("10.244.1.1"), ip("10.244.3.3")]);
    }

    #[test]
    fn zone_hints_are_ignored_unless_every_ready_endpoint_has_one_and_one_is_for_the_nodes_zone() {
        let all = vec![ip("10.244.1.1"), ip("10.244.2.2")];
        let a_and_b =
            [hinted("10.244.1.1", "node-a", &["zone-a"]), hinted("10.244.2.2", "node-b", &["zone-b"])];
        // One ready endpoint without hints: a partial rollout.
        let partial = [hinted("10.244.1.1", "node-a", &["zone-a"]), hinted("10.244.2.2", "node-b", &[])];
        assert_eq!(cluster_addrs(Some(ZONE_A), &partial), all);
        // No endpoint for this node's zone.
        let b_only =
            [hinted("10.244.1.1", "node-a", &["zone-b"]), hinted("10.244.2.2", "node-b", &["zone-c"])];
        assert_eq!(cluster_addrs(Some(ZONE_A), &b_only), all);
        // The node has no zone label, or there is no Node object at all.
        assert_eq!(cluster_addrs(Some("{kubernetes.io/os: linux}"), &a_and_b), all);
        assert_eq!(cluster_addrs(None, &a_and_b), all);
        // With every condition met, the hints apply.
        assert_eq!(cluster_addrs(Some(ZONE_A), &a_and_b), vec![ip("10.244.1.1")]);
    }

    #[test]
    fn endpoints_that_are_not_ready_do_not_need_zone_hints_and_are_not_chosen() {
        let endpoints = [
            hinted("10.244.1.1", "node-a", &["zone-a"]),
            hinted("10.244.2.2", "node-b", &["zone-b"]),
            // Not ready and unhinted: does not turn hints off.
            ep("10.244.3.3", "node-c", "ready: false, serving: true, terminating: true"),
            // Not ready but hinted for this zone: still not chosen.
            "{addresses: [10.244.4.4], nodeName: node-d, conditions: {ready: false, serving: true, terminating: true}, hints: {forZones: [{name: zone-a}]}}".to_string(),
        ];
        assert_eq!(cluster_addrs(Some(ZONE_A), &endpoints), vec![ip("10.244.1.1")]);
    }

    #[test]
    fn local_groups_ignore_zone_hints() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
        // This node's endpoint is hinted for another zone.
        let endpoints = format!(
            "[{}, {}]",
            hinted("10.244.1.1", "node-a", &["zone-b"]),
            hinted("10.244.2.2", "node-b", &["zone-a"])
        );
        let yaml = node_obj(ZONE_A) + &svc("web", spec) + &slice("web-1", "web", HTTP, &endpoints);
        let state = compute(&store(&yaml), &node());
        assert_eq!(group(&state, CLUSTER), vec![(ip("10.244.2.2"), 8080, 0)]);
        assert_eq!(group(&state, LOCAL), vec![(ip("10.244.1.1"), 8080, BACKEND_F_LOCAL)]);
    }

    #[test]
    fn cluster_group_holds_only_the_endpoints_hinted_for_this_node() {
        let endpoints = [
            node_hinted("10.244.1.1", "node-a", &["node-a"]),
            node_hinted("10.244.2.2", "node-b", &["node-b"]),
            node_hinted("10.244.3.3", "node-c", &["node-c", "node-a"]),
        ];
        // Node hints need no zone label on the node, nor a Node object.
        assert_eq!(cluster_addrs(None, &endpoints), vec![ip("10.244.1.1"), ip("10.244.3.3")]);
        assert_eq!(cluster_addrs(Some(ZONE_A), &endpoints), vec![ip("10.244.1.1"), ip("10.244.3.3")]);
    }

    #[test]
    fn node_hints_are_ignored_unless_every_ready_endpoint_has_one_and_one_is_for_this_node() {
        let all = vec![ip("10.244.1.1"), ip("10.244.2.2")];
        // One ready endpoint without node hints: a partial rollout.
        let partial = [node_hinted("10.244.1.1", "node-a", &["node-a"]), hinted("10.244.2.2", "node-b", &[])];
        assert_eq!(cluster_addrs(None, &partial), all);
        // No endpoint hinted for this node.
        let elsewhere = [
            node_hinted("10.244.1.1", "node-c", &["node-c"]),
            node_hinted("10.244.2.2", "node-b", &["node-b"]),
        ];
        assert_eq!(cluster_addrs(None, &elsewhere), all);
        // Endpoints that are not ready neither need node hints nor are chosen for theirs.
        let endpoints = [
            node_hinted("10.244.1.1", "node-a", &["node-a"]),
            node_hinted("10.244.2.2", "node-b", &["node-b"]),
            ep("10.244.3.3", "node-c", "ready: false, serving: true, terminating: true"),
            "{addresses: [10.244.4.4], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}, hints: {forNodes: [{name: node-a}]}}".to_string(),
        ];
        assert_eq!(cluster_addrs(None, &endpoints), vec![ip("10.244.1.1")]);
    }

    #[test]
    fn node_hints_come_before_zone_hints_which_apply_when_node_hints_do_not() {
        // PreferSameNode endpoints carry both hints: the node's own endpoint alone, though
        // node-c's is in this node's zone too.
        let both = [
            hinted_for("10.244.1.1", "node-a", &["zone-a"], &["node-a"]),
            hinted_for("10.244.2.2", "node-b", &["zone-b"], &["node-b"]),
            hinted_for("10.244.3.3", "node-c", &["zone-a"], &["node-c"]),
        ];
        assert_eq!(cluster_addrs(Some(ZONE_A), &both), vec![ip("10.244.1.1")]);
        // No endpoint for this node: the zone hints decide.
        let no_local = [
            hinted_for("10.244.2.2", "node-b", &["zone-b"], &["node-b"]),
            hinted_for("10.244.3.3", "node-c", &["zone-a"], &["node-c"]),
        ];
        assert_eq!(cluster_addrs(Some(ZONE_A), &no_local), vec![ip("10.244.3.3")]);
        // One endpoint without a node hint: the zone hints decide too.
        let partial = [
            hinted_for("10.244.1.1", "node-a", &["zone-a"], &["node-a"]),
            hinted_for("10.244.2.2", "node-b", &["zone-b"], &[]),
            hinted_for("10.244.3.3", "node-c", &["zone-a"], &["node-c"]),
        ];
        assert_eq!(cluster_addrs(Some(ZONE_A), &partial), vec![ip("10.244.1.1"), ip("10.244.3.3")]);
        // Neither applies (no zone label): every ready endpoint.
        let all = vec![ip("10.244.2.2"), ip("10.244.3.3")];
        assert_eq!(cluster_addrs(None, &no_local), all);
    }

    #[test]
    fn local_groups_ignore_node_hints() {
        let spec = "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, ports: [{name: http, port: 80, nodePort: 30080}]}";
        // This node's endpoint is hinted for another node, the other node's for this one.
        let endpoints = format!(
            "[{}, {}]",
            node_hinted("10.244.1.1", "node-a", &["node-b"]),
            node_hinted("10.244.2.2", "node-b", &["node-a"])
        );
        let yaml = svc("web", spec) + &slice("web-1", "web", HTTP, &endpoints);
        let state = compute(&store(&yaml), &node());
        assert_eq!(group(&state, CLUSTER), vec![(ip("10.244.2.2"), 8080, 0)]);
        assert_eq!(group(&state, LOCAL), vec![(ip("10.244.1.1"), 8080, BACKEND_F_LOCAL)]);
    }

    #[test]
    fn every_frontend_of_a_service_port_counts_for_its_cluster_group() {
        let spec_extra =
            ", externalTrafficPolicy: Local, internalTrafficPolicy: Local, externalIPs: [203.0.113.9]";
        let yaml = lb_svc("web", "10.96.0.10", spec_extra, "[{ip: 203.0.113.1}]").replace(
            "nodePort: 30080}",
            "nodePort: 30080}, {name: dns, port: 53, protocol: UDP, nodePort: 30053}",
        ) + &web_slice();
        let state = compute(&store(&yaml), &node());
        let service_ports: Vec<(Ipv4Addr, u16, u8, &str)> = state
            .frontends
            .iter()
            .map(|(key, fe)| (key.ip(), key.host_port(), key.proto, &*fe.service_port))
            .collect();
        let dns = "default/web:dns/UDP";
        let mut expected = vec![
            (ip("10.96.0.10"), 80, TCP, CLUSTER),
            (ip("198.18.0.1"), 30080, TCP, CLUSTER),
            (ip("192.168.1.10"), 30080, TCP, CLUSTER),
            (ip("203.0.113.9"), 80, TCP, CLUSTER),
            (ip("203.0.113.1"), 80, TCP, CLUSTER),
            (ip("10.96.0.10"), 53, UDP, dns),
            (ip("198.18.0.1"), 30053, UDP, dns),
            (ip("192.168.1.10"), 30053, UDP, dns),
            (ip("203.0.113.9"), 53, UDP, dns),
            (ip("203.0.113.1"), 53, UDP, dns),
        ];
        expected.sort_by_key(|(addr, port, proto, _)| ServiceKey::new(*addr, *port, *proto));
        assert_eq!(service_ports, expected);
        // The frontends themselves use the Local groups.
        let http_cluster_ip = &state.frontends[&ServiceKey::new(ip("10.96.0.10"), 80, TCP)];
        assert_eq!((&*http_cluster_ip.group, &*http_cluster_ip.service_port), (LOCAL, CLUSTER));
    }

    #[test]
    fn group_name_is_kube_proxys_service_port_name_then_the_protocol() {
        // kube-proxy's ServicePortName.String(): `ns/name:port`, no colon for an unnamed port.
        let yaml = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {port: 53, protocol: UDP}]}\n";
        let store = store(yaml);
        let svc = store.services().next().unwrap();
        let names: Vec<String> = svc.ports.iter().map(|p| group_name(svc, p)).collect();
        assert_eq!(names, vec!["shop/web:http/TCP", "shop/web/UDP"]);
    }

    #[test]
    fn split_group_name_inverts_group_name() {
        let yaml = "kind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}, {port: 53, protocol: UDP}]}\n";
        let store = store(yaml);
        let svc = store.services().next().unwrap();
        let split: Vec<_> = svc.ports.iter().map(|p| split_group_name(&group_name(svc, p))).collect();
        // The `port` label: the port name and protocol, `/PROTO` for an unnamed port.
        let parts = |port: &str| ("shop".to_string(), "web".to_string(), port.to_string());
        assert_eq!(split, vec![parts("http/TCP"), parts("/UDP")]);
    }
}
