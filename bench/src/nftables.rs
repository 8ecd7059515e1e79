//! kube-proxy's nftables mode as the benchmark's baseline: the `nft -f` transactions its
//! proxier (`pkg/proxy/nftables/proxier.go`, Kubernetes v1.33, written out by knftables)
//! sends for the benchmark's Services, with its chain, set and map names.
//!
//! Mirrored:
//! - `setupNFTables`: `table ip kube-proxy`, the base chains and the chains they jump to,
//!   dispatch from `services` through the `service-ips` / `service-nodeports` verdict maps,
//!   the `cluster-ips` set, the `no-endpoint-services` / `no-endpoint-nodeports` reject maps,
//!   `mark-for-masquerade` and `masquerading`.
//! - `syncProxyRules` per Service port: the `service-` chain picking an `endpoint-` chain
//!   with `numgen random`, the `external-` chain for NodePort traffic, the `endpoint-` chains
//!   (hairpin masquerade, DNAT), and the map elements pointing at them.
//! - Partial syncs: only the Services whose ports or endpoints changed get their chains
//!   flushed and refilled; elements are written only when they changed (`nftElementStorage`);
//!   chains no longer used are flushed, not deleted (see [`partial_sync`]).
//!
//! Limits, i.e. kube-proxy as the benchmark configures it: IPv4; Cluster traffic policies,
//! no session affinity, no externalIPs, LoadBalancer IPs or source ranges (so `firewall-ips`
//! stays empty); `--nodeport-addresses 0.0.0.0/0` (NodePorts on every local address through
//! `fib daddr type local`, no `nodeport-ips` set); no cluster CIDR, so no local traffic
//! detector and no rule masquerading off-cluster sources sent to a ClusterIP; no
//! `--masquerade-all`; no ServiceCIDR objects, so no rule dropping traffic to unallocated
//! ClusterIPs.
use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};

use data_encoding::BASE32;
use lb_userspace::model::{NamespacedName, Protocol};
use sha2::{Digest, Sha256};

use crate::workload::ServicePortRules;

/// Family and name of kube-proxy's table, the prefix of every command.
const TABLE: &str = "ip kube-proxy";
/// `fmt.Sprintf("%#08x", 1<<14)`: the default `--masquerade-bit` as kube-proxy formats it.
const MASQUERADE_MARK: &str = "0x00004000";
const REJECT_CHAIN: &str = "reject-chain";
const MARK_MASQ_CHAIN: &str = "mark-for-masquerade";

/// `nftablesBaseChains`: name, type, hook, and priority as knftables writes it (a number:
/// `dstnat-10` is -110, `srcnat` 100).
const BASE_CHAINS: [(&str, &str, &str, i32); 8] = [
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
];

/// `nftablesJumpChains`: destination, source base chain, match before the jump.
const JUMP_CHAINS: [(&str, &str, &str); 11] = [
    ("nodeport-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-input", "ct state new "),
    ("service-endpoints-check", "filter-forward", "ct state new "),
    ("service-endpoints-check", "filter-output", "ct state new "),
    ("firewall-check", "filter-prerouting", "ct state new "),
    ("firewall-check", "filter-output", "ct state new "),
    ("services", "nat-output", ""),
    ("services", "nat-prerouting", ""),
    ("masquerading", "nat-postrouting", ""),
    ("cluster-ips-check", "filter-forward", "ct state new "),
    ("cluster-ips-check", "filter-output-post-dnat", "ct state new "),
];

/// `knftables.NameLengthMax` (256) less `chainNamePrefixLengthMax` (16).
const CHAIN_NAME_BASE_LENGTH_MAX: usize = 240;

/// The first sync: an `nft -f` script creating `table ip kube-proxy` with every chain, set,
/// map and element for `ports`.
pub fn first_sync(ports: &[ServicePortRules]) -> String {
    sync(ports, None)
}

/// A later sync after `ports` changed from `previous`, as kube-proxy's nftables mode does it:
/// one transaction touching only what changed. The chains of Services whose ports or
/// endpoints changed are flushed and refilled (new endpoint chains added), map and set
/// elements are added or deleted only where they differ, and chains no longer used are
/// flushed but kept: kube-proxy deletes them in a separate transaction at the start of the
/// first sync at least a second later (kernels before 6.2 notice only after a while that no
/// map element points at them any more), which is not part of this script. Only the chains
/// of `previous` are known, so chains an earlier partial sync left flushed stay as they are.
pub fn partial_sync(ports: &[ServicePortRules], previous: &[ServicePortRules]) -> String {
    sync(ports, Some(previous))
}

/// `syncProxyRules`: a full sync when `previous` is `None` (a fresh table), else a partial one.
fn sync(ports: &[ServicePortRules], previous: Option<&[ServicePortRules]>) -> String {
    let chains: Vec<Option<Chains>> = ports.iter().map(Chains::of).collect();
    // A full sync writes about 1 KiB per port and 600 bytes per endpoint.
    let capacity = match previous {
        Some(_) => 16 << 10,
        None => ports.iter().map(|port| 1024 + 640 * port.endpoints.len()).sum::<usize>() + 8192,
    };
    let mut tx = Transaction(String::with_capacity(capacity));
    let mut storage = ElementStorage::default();
    // What the table held before this sync: the chains kube-proxy would list, and the
    // elements its storage remembers (all written by the sync of `previous`).
    let mut existing_chains = Vec::new();
    let updated = match previous {
        None => {
            tx.setup();
            None
        }
        Some(previous) => {
            for port in previous {
                let port_chains = Chains::of(port);
                storage.remember(elements(port, port_chains.as_ref()));
                existing_chains.extend(port_chains.into_iter().flat_map(Chains::into_all));
            }
            Some(updated_services(ports, previous))
        }
    };

    let mut active = HashSet::new();
    for (port, chains) in ports.iter().zip(&chains) {
        // Unchanged Services keep their chains as they are; their elements are still
        // ensured, which writes nothing as they did not change.
        let skip = updated.as_ref().is_some_and(|updated| !updated.contains(&port.service));
        if let Some(chains) = chains {
            for chain in chains.all() {
                tx.ensure_chain(&mut active, chain, skip);
            }
        }
        for element in elements(port, chains.as_ref()) {
            storage.ensure(&mut tx, element);
        }
        if let (Some(chains), false) = (chains, skip) {
            tx.service_port_rules(port, chains);
        }
    }

    for chain in existing_chains.iter().filter(|chain| !active.contains(chain.as_str())) {
        tx.line(format_args!("flush chain {TABLE} {chain}"));
    }
    storage.cleanup(&mut tx);
    tx.0
}

/// The Services whose ports or endpoints differ between `ports` and `previous` (added and
/// removed ones included): kube-proxy's `UpdatedServices` of the service and endpoint
/// change trackers.
fn updated_services<'a>(
    ports: &'a [ServicePortRules],
    previous: &'a [ServicePortRules],
) -> HashSet<&'a NamespacedName> {
    let by_service = |ports: &'a [ServicePortRules]| {
        let mut map: HashMap<&NamespacedName, Vec<&ServicePortRules>> = HashMap::new();
        for port in ports {
            map.entry(&port.service).or_default().push(port);
        }
        map
    };
    let (now, before) = (by_service(ports), by_service(previous));
    now.keys()
        .chain(before.keys())
        .filter(|service| now.get(*service) != before.get(*service))
        .copied()
        .collect()
}

fn protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `hashAndTruncate`: the name prefixed with the first 8 characters of the base32 of its
/// SHA-256, cut to the maximum chain name base length.
fn hash_and_truncate(name: &str) -> String {
    // 5 bytes are exactly 8 base32 characters, the same as the start of the whole hash's.
    let hash = Sha256::digest(name.as_bytes());
    let mut base = format!("{}-{name}", BASE32.encode(&hash[..5]));
    if base.len() > CHAIN_NAME_BASE_LENGTH_MAX {
        base.truncate(CHAIN_NAME_BASE_LENGTH_MAX - 3);
        base.push_str("...");
    }
    base
}

/// The chains of a Service port with endpoints (`newServiceInfo`, `newEndpointInfo`).
struct Chains {
    /// `service-HASH-ns/name/proto/port`, the Cluster policy chain.
    service: String,
    /// `external-HASH-...`, for NodePort traffic.
    external: Option<String>,
    /// `endpoint-HASH-ns/name/proto/port__ip/port`, in the order of `port.endpoints`.
    endpoints: Vec<String>,
}

impl Chains {
    /// `None` without endpoints: kube-proxy then writes no chains, only reject elements.
    fn of(port: &ServicePortRules) -> Option<Self> {
        if port.endpoints.is_empty() {
            return None;
        }
        // servicePortChainNameBase / servicePortEndpointChainNameBase
        let name = format!(
            "{}/{}/{}/{}",
            port.service.namespace,
            port.service.name,
            protocol(port.protocol),
            port.port_name
        );
        let base = hash_and_truncate(&name);
        Some(Self {
            service: format!("service-{base}"),
            external: port.node_port.map(|_| format!("external-{base}")),
            endpoints: port
                .endpoints
                .iter()
                .map(|ep| {
                    format!("endpoint-{}", hash_and_truncate(&format!("{name}__{}/{}", ep.ip(), ep.port())))
                })
                .collect(),
        })
    }

    /// In the order `syncProxyRules` ensures them.
    fn all(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().chain([&self.service]).chain(&self.external).map(String::as_str)
    }

    fn into_all(self) -> impl Iterator<Item = String> {
        self.endpoints.into_iter().chain([self.service]).chain(self.external)
    }
}

/// kube-proxy's sets and maps that the benchmark's Services put elements in, in the order
/// `syncProxyRules` cleans them up (`firewall-ips`, between `service-ips` and
/// `no-endpoint-services`, stays empty).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Container {
    ClusterIps,
    ServiceIps,
    NoEndpointServices,
    NoEndpointNodePorts,
    ServiceNodePorts,
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIps => "cluster-ips",
            Self::ServiceIps => "service-ips",
            Self::NoEndpointServices => "no-endpoint-services",
            Self::NoEndpointNodePorts => "no-endpoint-nodeports",
            Self::ServiceNodePorts => "service-nodeports",
        })
    }
}

struct Element {
    container: Container,
    /// knftables joins key parts with " . ".
    key: String,
    /// The verdict, "" for a set element.
    value: String,
    /// The ServicePortName on no-endpoint elements.
    comment: Option<String>,
}

/// The elements of one Service port, in the order `syncProxyRules` ensures them.
fn elements(port: &ServicePortRules, chains: Option<&Chains>) -> Vec<Element> {
    let element = |container, key, value, comment| Element { container, key, value, comment };
    let proto = protocol(port.protocol);
    let service_key = format!("{} . {proto} . {}", port.cluster_ip, port.port);
    let mut elements = vec![element(Container::ClusterIps, port.cluster_ip.to_string(), String::new(), None)];
    match chains {
        Some(chains) => {
            elements.push(element(
                Container::ServiceIps,
                service_key,
                format!("goto {}", chains.service),
                None,
            ));
            if let (Some(node_port), Some(external)) = (port.node_port, &chains.external) {
                let key = format!("{proto} . {node_port}");
                elements.push(element(Container::ServiceNodePorts, key, format!("goto {external}"), None));
            }
        }
        None => {
            let reject = || format!("goto {REJECT_CHAIN}");
            let comment = || Some(port.service_port_name());
            elements.push(element(Container::NoEndpointServices, service_key, reject(), comment()));
            if let Some(node_port) = port.node_port {
                let key = format!("{proto} . {node_port}");
                elements.push(element(Container::NoEndpointNodePorts, key, reject(), comment()));
            }
        }
    }
    elements
}

/// `nftElementStorage` for all containers: the elements the table holds, so that a sync
/// writes only those that changed and deletes those no longer ensured.
#[derive(Default)]
struct ElementStorage {
    elements: HashMap<(Container, String), String>,
    leftover: HashSet<(Container, String)>,
}

impl ElementStorage {
    /// Records elements an earlier sync wrote: leftovers until this sync ensures them.
    fn remember(&mut self, elements: Vec<Element>) {
        for Element { container, key, value, .. } in elements {
            self.leftover.insert((container, key.clone()));
            self.elements.insert((container, key), value);
        }
    }

    fn ensure(&mut self, tx: &mut Transaction, element: Element) {
        let id = (element.container, element.key);
        match self.elements.get_mut(&id) {
            Some(value) => {
                if *value != element.value {
                    tx.delete_element(id.0, &id.1);
                    tx.add_element(id.0, &id.1, &element.value, element.comment.as_deref());
                    *value = element.value;
                }
                self.leftover.remove(&id);
            }
            None => {
                tx.add_element(id.0, &id.1, &element.value, element.comment.as_deref());
                self.elements.insert(id, element.value);
            }
        }
    }

    /// Deletes the elements no port ensured, container by container (kube-proxy's order
    /// within a container is Go's map order; sorted here).
    fn cleanup(self, tx: &mut Transaction) {
        let mut leftover: Vec<_> = self.leftover.into_iter().collect();
        leftover.sort_unstable();
        for (container, key) in leftover {
            tx.delete_element(container, &key);
        }
    }
}

/// An `nft -f` script, one command a line, as knftables writes a transaction.
struct Transaction(String);

impl Transaction {
    fn push(&mut self, args: fmt::Arguments) {
        self.0.write_fmt(args).expect("writing to a String cannot fail");
    }

    fn line(&mut self, args: fmt::Arguments) {
        self.push(args);
        self.0.push('\n');
    }

    /// `ensureChain`: creates and flushes `chain` once per sync; with `skip` (a Service the
    /// partial sync leaves alone) only notes it as in use.
    fn ensure_chain<'a>(&mut self, created: &mut HashSet<&'a str>, chain: &'a str, skip: bool) {
        if created.insert(chain) && !skip {
            self.line(format_args!("add chain {TABLE} {chain}"));
            self.line(format_args!("flush chain {TABLE} {chain}"));
        }
    }

    fn rule(&mut self, chain: &str, rule: fmt::Arguments) {
        self.line(format_args!("add rule {TABLE} {chain} {rule}"));
    }

    fn add_element(&mut self, container: Container, key: &str, value: &str, comment: Option<&str>) {
        self.push(format_args!("add element {TABLE} {container} {{ {key}"));
        if let Some(comment) = comment {
            self.push(format_args!(" comment \"{comment}\""));
        }
        if !value.is_empty() {
            self.push(format_args!(" : {value}"));
        }
        self.0.push_str(" }\n");
    }

    fn delete_element(&mut self, container: Container, key: &str) {
        self.line(format_args!("delete element {TABLE} {container} {{ {key} }}"));
    }

    /// `setupNFTables` on kube-proxy's first sync.
    fn setup(&mut self) {
        self.line(format_args!("add table {TABLE} {{ comment \"rules for kube-proxy\" ; }}"));
        // Recreates base chains left by an earlier kube-proxy, whose properties may differ.
        for (name, ..) in BASE_CHAINS {
            self.line(format_args!("add chain {TABLE} {name}"));
            self.line(format_args!("delete chain {TABLE} {name}"));
        }
        for (name, kind, hook, priority) in BASE_CHAINS {
            self.line(format_args!(
                "add chain {TABLE} {name} {{ type {kind} hook {hook} priority {priority} ; }}"
            ));
            self.line(format_args!("flush chain {TABLE} {name}"));
        }
        let mut created = HashSet::new();
        for (chain, from, matches) in JUMP_CHAINS {
            self.ensure_chain(&mut created, chain, false);
            self.rule(from, format_args!("{matches}jump {chain}"));
        }
        for chain in ["services", "cluster-ips-check", "masquerading", MARK_MASQ_CHAIN] {
            self.ensure_chain(&mut created, chain, false);
        }
        self.rule(MARK_MASQ_CHAIN, format_args!("mark set mark or {MASQUERADE_MARK}"));
        self.rule("masquerading", format_args!("mark and {MASQUERADE_MARK} == 0 return"));
        self.rule("masquerading", format_args!("mark set mark xor {MASQUERADE_MARK}"));
        self.rule("masquerading", format_args!("masquerade fully-random"));

        self.line(format_args!(
            "add set {TABLE} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}"
        ));
        self.rule(
            "cluster-ips-check",
            format_args!(
                "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
            ),
        );
        // kube-proxy ensures the set does not exist by adding then deleting it.
        self.line(format_args!(
            "add set {TABLE} nodeport-ips {{ type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }}"
        ));
        self.line(format_args!("delete set {TABLE} nodeport-ips"));

        let service_map = "ipv4_addr . inet_proto . inet_service : verdict";
        let nodeport_map = "inet_proto . inet_service : verdict";
        let map = |tx: &mut Self, name: Container, kind: &str, comment: &str| {
            tx.line(format_args!("add map {TABLE} {name} {{ type {kind} ; comment \"{comment}\" ; }}"));
        };
        map(
            self,
            Container::NoEndpointServices,
            service_map,
            "vmap to drop or reject packets to services with no endpoints",
        );
        map(
            self,
            Container::NoEndpointNodePorts,
            nodeport_map,
            "vmap to drop or reject packets to service nodeports with no endpoints",
        );
        self.line(format_args!(
            "add chain {TABLE} {REJECT_CHAIN} {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}"
        ));
        self.line(format_args!("flush chain {TABLE} {REJECT_CHAIN}"));
        self.rule(REJECT_CHAIN, format_args!("reject"));
        self.rule(
            "service-endpoints-check",
            format_args!("ip daddr . meta l4proto . th dport vmap @no-endpoint-services"),
        );
        self.rule(
            "nodeport-endpoints-check",
            format_args!("ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports"),
        );

        self.line(format_args!(
            "add map {TABLE} firewall-ips {{ type {service_map} ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}"
        ));
        self.ensure_chain(&mut created, "firewall-check", false);
        self.rule("firewall-check", format_args!("ip daddr . meta l4proto . th dport vmap @firewall-ips"));

        map(self, Container::ServiceIps, service_map, "ClusterIP, ExternalIP and LoadBalancer IP traffic");
        map(self, Container::ServiceNodePorts, nodeport_map, "NodePort traffic");
        self.rule("services", format_args!("ip daddr . meta l4proto . th dport vmap @service-ips"));
        self.rule(
            "services",
            format_args!("fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"),
        );

        // The element storages' reset.
        self.line(format_args!("flush set {TABLE} cluster-ips"));
        for map in [
            "service-ips",
            "firewall-ips",
            "no-endpoint-services",
            "no-endpoint-nodeports",
            "service-nodeports",
        ] {
            self.line(format_args!("flush map {TABLE} {map}"));
        }
    }

    /// The rules of a Service port with endpoints: the external chain masquerades
    /// (Cluster policy may leave the node) and goes to the service chain, which picks an
    /// endpoint chain at random (`writeServiceToEndpointRules`).
    fn service_port_rules(&mut self, port: &ServicePortRules, chains: &Chains) {
        if let Some(external) = &chains.external {
            self.rule(external, format_args!("jump {MARK_MASQ_CHAIN}"));
            self.rule(external, format_args!("goto {}", chains.service));
        }
        let mut vmap = String::with_capacity(chains.endpoints.iter().map(|c| c.len() + 12).sum());
        for (i, chain) in chains.endpoints.iter().enumerate() {
            let separator = if i == 0 { "" } else { " , " };
            write!(vmap, "{separator}{i} : goto {chain}").expect("writing to a String cannot fail");
        }
        self.rule(
            &chains.service,
            format_args!("numgen random mod {} vmap {{ {vmap} }}", chains.endpoints.len()),
        );
        for (endpoint, chain) in port.endpoints.iter().zip(&chains.endpoints) {
            // Hairpin: an endpoint reaching itself through the Service is masqueraded.
            self.rule(chain, format_args!("ip saddr {} jump {MARK_MASQ_CHAIN}", endpoint.ip()));
            self.rule(chain, format_args!("meta l4proto {} dnat to {endpoint}", protocol(port.protocol)));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::process::Command;
    use std::time::Instant;

    use super::*;
    use crate::workload;

    fn lines(script: &str) -> HashSet<&str> {
        script.lines().collect()
    }

    /// A TCP Service port as proxier_test.go writes them.
    fn test_port(
        service: &str,
        cluster_ip: &str,
        node_port: Option<u16>,
        endpoints: &[&str],
    ) -> ServicePortRules {
        let (namespace, name) = service.split_once('/').unwrap();
        ServicePortRules {
            service: NamespacedName { namespace: namespace.into(), name: name.into() },
            port_name: "p80".into(),
            protocol: Protocol::Tcp,
            cluster_ip: cluster_ip.parse().unwrap(),
            port: 80,
            node_port,
            endpoints: endpoints.iter().map(|ep| ep.parse().unwrap()).collect(),
        }
    }

    fn benchmark_ports(backends: &[&[Ipv4Addr]]) -> Vec<ServicePortRules> {
        let objects: Vec<_> = backends.iter().enumerate().map(|(i, b)| workload::service(i, b)).collect();
        workload::service_ports(&workload::store(&objects))
    }

    const BACKENDS: [Ipv4Addr; 4] = [
        Ipv4Addr::new(198, 18, 1, 10),
        Ipv4Addr::new(198, 18, 1, 11),
        Ipv4Addr::new(198, 18, 2, 10),
        Ipv4Addr::new(198, 18, 2, 11),
    ];

    #[test]
    fn chain_names_and_rules_match_proxier_test() {
        let svc1 = test_port("ns1/svc1", "172.30.0.41", None, &["10.180.0.1:80"]);
        let chains = Chains::of(&svc1).unwrap();
        assert_eq!(chains.service, "service-ULMVA6XW-ns1/svc1/tcp/p80");
        assert_eq!(chains.endpoints, ["endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"]);
        assert!(chains.external.is_none());

        // TestOverallNFTablesRules' svc3 (NodePort) and svc6 (no endpoints), less the
        // cluster CIDR masquerade rule.
        let svc3 = test_port("ns3/svc3", "172.30.0.43", Some(3003), &["10.180.0.3:80"]);
        let svc6 = test_port("ns6/svc6", "172.30.0.46", None, &[]);
        let script = first_sync(&[svc3, svc6]);
        let expected = r#"
            add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
            add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
            add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
            add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
            add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
            add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
            add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
            add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
            add element ip kube-proxy cluster-ips { 172.30.0.43 }
            add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
            add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
            add element ip kube-proxy cluster-ips { 172.30.0.46 }
            add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
            add rule ip kube-proxy nat-prerouting jump services
            add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
            add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
            add rule ip kube-proxy reject-chain reject
            add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
            add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
        "#;
        let script_lines = lines(&script);
        for line in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
            assert!(script_lines.contains(line), "missing {line:?} in\n{script}");
        }
    }

    #[test]
    fn long_names_are_truncated_as_kube_proxy_does() {
        let name = "n".repeat(300);
        let base = hash_and_truncate(&name);
        assert_eq!(base.len(), CHAIN_NAME_BASE_LENGTH_MAX);
        assert!(base.ends_with("n..."));
    }

    #[test]
    fn first_sync_dispatches_to_endpoint_chains_and_rejects_without_endpoints() {
        let ports = benchmark_ports(&[&BACKENDS[..3], &BACKENDS[1..], &[]]);
        let script = first_sync(&ports);
        let all = lines(&script);
        let has = |line: &str| assert!(all.contains(line), "missing {line:?} in\n{script}");

        has("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }");
        has("add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }");
        has("add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }");
        has("add rule ip kube-proxy services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports");
        has("add rule ip kube-proxy mark-for-masquerade mark set mark or 0x00004000");
        has("add rule ip kube-proxy masquerading masquerade fully-random");

        for (i, port) in ports.iter().take(2).enumerate() {
            let chains = Chains::of(port).unwrap();
            let service = &chains.service;
            assert!(
                service.starts_with("service-") && service.ends_with(&format!("-bench/svc-0000{i}/tcp/http"))
            );
            let external = chains.external.as_ref().unwrap();
            has(&format!(
                "add element ip kube-proxy service-ips {{ 198.19.0.{} . tcp . 80 : goto {service} }}",
                i + 1
            ));
            has(&format!(
                "add element ip kube-proxy service-nodeports {{ tcp . 2000{i} : goto {external} }}"
            ));
            has(&format!("add rule ip kube-proxy {external} jump mark-for-masquerade"));
            has(&format!("add rule ip kube-proxy {external} goto {service}"));
            let [a, b, c] = &chains.endpoints[..] else { panic!("three endpoint chains") };
            has(&format!("add rule ip kube-proxy {service} numgen random mod 3 vmap {{ 0 : goto {a} , 1 : goto {b} , 2 : goto {c} }}"));
            for (endpoint, chain) in port.endpoints.iter().zip(&chains.endpoints) {
                assert!(chain.ends_with(&format!("__{}/8080", endpoint.ip())));
                has(&format!(
                    "add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade",
                    endpoint.ip()
                ));
                has(&format!("add rule ip kube-proxy {chain} meta l4proto tcp dnat to {endpoint}"));
            }
        }

        has("add element ip kube-proxy cluster-ips { 198.19.0.3 }");
        has("add element ip kube-proxy no-endpoint-services { 198.19.0.3 . tcp . 80 comment \"bench/svc-00002:http\" : goto reject-chain }");
        has("add element ip kube-proxy no-endpoint-nodeports { tcp . 20002 comment \"bench/svc-00002:http\" : goto reject-chain }");
        assert!(!script.contains("bench/svc-00002/"), "no chains for a Service without endpoints");
        assert!(Chains::of(&ports[2]).is_none());
    }

    #[test]
    fn partial_sync_rewrites_only_the_changed_service() {
        let previous = benchmark_ports(&[&BACKENDS[..3], &BACKENDS[..3], &[]]);
        let ports = benchmark_ports(&[&BACKENDS[..3], &[BACKENDS[0], BACKENDS[1], BACKENDS[3]], &[]]);
        let script = partial_sync(&ports, &previous);
        let (old, new) = (Chains::of(&previous[1]).unwrap(), Chains::of(&ports[1]).unwrap());
        let (service, external) = (&new.service, new.external.as_ref().unwrap());
        let expected = [
            format!("add chain ip kube-proxy {}", new.endpoints[0]),
            format!("flush chain ip kube-proxy {}", new.endpoints[0]),
            format!("add chain ip kube-proxy {}", new.endpoints[1]),
            format!("flush chain ip kube-proxy {}", new.endpoints[1]),
            format!("add chain ip kube-proxy {}", new.endpoints[2]),
            format!("flush chain ip kube-proxy {}", new.endpoints[2]),
            format!("add chain ip kube-proxy {service}"),
            format!("flush chain ip kube-proxy {service}"),
            format!("add chain ip kube-proxy {external}"),
            format!("flush chain ip kube-proxy {external}"),
            format!("add rule ip kube-proxy {external} jump mark-for-masquerade"),
            format!("add rule ip kube-proxy {external} goto {service}"),
            format!(
                "add rule ip kube-proxy {service} numgen random mod 3 vmap {{ 0 : goto {} , 1 : goto {} , 2 : goto {} }}",
                new.endpoints[0], new.endpoints[1], new.endpoints[2]
            ),
            format!("add rule ip kube-proxy {} ip saddr 198.18.1.10 jump mark-for-masquerade", new.endpoints[0]),
            format!("add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.1.10:8080", new.endpoints[0]),
            format!("add rule ip kube-proxy {} ip saddr 198.18.1.11 jump mark-for-masquerade", new.endpoints[1]),
            format!("add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.1.11:8080", new.endpoints[1]),
            format!("add rule ip kube-proxy {} ip saddr 198.18.2.11 jump mark-for-masquerade", new.endpoints[2]),
            format!("add rule ip kube-proxy {} meta l4proto tcp dnat to 198.18.2.11:8080", new.endpoints[2]),
            // The endpoint chain no longer used is flushed, to be deleted a sync later.
            format!("flush chain ip kube-proxy {}", old.endpoints[2]),
        ];
        assert_eq!(script.lines().collect::<Vec<_>>(), expected, "\n{script}");
        assert_eq!(old.endpoints[..2], new.endpoints[..2], "kept endpoints keep their chains");
    }

    #[test]
    fn partial_sync_moves_elements_between_the_dispatch_and_reject_maps() {
        let previous = benchmark_ports(&[&BACKENDS[..3], &BACKENDS[..3], &[]]);
        // Service 0 loses its endpoints, 2 gets some, 1 is deleted.
        let ports: Vec<_> = benchmark_ports(&[&[], &BACKENDS[..3], &BACKENDS[..1]])
            .into_iter()
            .filter(|port| port.service.name != "svc-00001")
            .collect();
        let script = partial_sync(&ports, &previous);
        let all = lines(&script);
        let has = |line: String| assert!(all.contains(line.as_str()), "missing {line:?} in\n{script}");
        let (svc0, svc1, svc2) = (
            Chains::of(&previous[0]).unwrap(),
            Chains::of(&previous[1]).unwrap(),
            Chains::of(&ports[1]).unwrap(),
        );

        has("add element ip kube-proxy no-endpoint-services { 198.19.0.1 . tcp . 80 comment \"bench/svc-00000:http\" : goto reject-chain }".into());
        has("add element ip kube-proxy no-endpoint-nodeports { tcp . 20000 comment \"bench/svc-00000:http\" : goto reject-chain }".into());
        has(format!(
            "add element ip kube-proxy service-ips {{ 198.19.0.3 . tcp . 80 : goto {} }}",
            svc2.service
        ));
        has(format!(
            "add element ip kube-proxy service-nodeports {{ tcp . 20002 : goto {} }}",
            svc2.external.as_ref().unwrap()
        ));
        has(format!(
            "add rule ip kube-proxy {} numgen random mod 1 vmap {{ 0 : goto {} }}",
            svc2.service, svc2.endpoints[0]
        ));
        for chain in svc0.all().chain(svc1.all()) {
            has(format!("flush chain ip kube-proxy {chain}"));
        }
        // Deletions come last, in container order.
        let lines: Vec<_> = script.lines().collect();
        assert_eq!(
            lines[lines.len() - 7..],
            [
                "delete element ip kube-proxy cluster-ips { 198.19.0.2 }",
                "delete element ip kube-proxy service-ips { 198.19.0.1 . tcp . 80 }",
                "delete element ip kube-proxy service-ips { 198.19.0.2 . tcp . 80 }",
                "delete element ip kube-proxy no-endpoint-services { 198.19.0.3 . tcp . 80 }",
                "delete element ip kube-proxy no-endpoint-nodeports { tcp . 20002 }",
                "delete element ip kube-proxy service-nodeports { tcp . 20000 }",
                "delete element ip kube-proxy service-nodeports { tcp . 20001 }",
            ]
        );
        assert!(!script.contains("delete chain"));
    }

    #[test]
    fn a_partial_sync_with_no_change_is_empty() {
        let ports = benchmark_ports(&[&BACKENDS[..3], &[]]);
        assert_eq!(partial_sync(&ports, &ports), "");
    }

    #[test]
    fn multi_port_services_share_their_cluster_ip_element() {
        let mut dns = test_port("ns1/dns", "172.30.0.10", None, &["10.180.0.1:53"]);
        dns.port = 53;
        let mut udp = dns.clone();
        udp.protocol = Protocol::Udp;
        let script = first_sync(&[dns, udp]);
        assert_eq!(script.matches("add element ip kube-proxy cluster-ips { 172.30.0.10 }").count(), 1);
        assert!(script.contains("meta l4proto udp dnat to 10.180.0.1:53"));
    }

    /// Loads both scripts into a throwaway network namespace and lists the result.
    #[test]
    fn scripts_load_into_nftables() {
        let previous = benchmark_ports(&[&BACKENDS[..3], &BACKENDS[..3], &[]]);
        let ports =
            benchmark_ports(&[&BACKENDS[..3], &[BACKENDS[0], BACKENDS[1], BACKENDS[3]], &BACKENDS[..1]]);
        let dir = std::env::temp_dir();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let unique = format!("{}-{nanos}", std::process::id());
        let first = dir.join(format!("xlb-bench-nft-first-{unique}.nft"));
        let partial = dir.join(format!("xlb-bench-nft-partial-{unique}.nft"));
        std::fs::write(&first, first_sync(&previous)).unwrap();
        std::fs::write(&partial, partial_sync(&ports, &previous)).unwrap();
        let output = Command::new("unshare")
            .args([
                "--net",
                "sh",
                "-c",
                r#"nft -f "$1" && nft -f "$2" && nft list table ip kube-proxy"#,
                "sh",
            ])
            .arg(&first)
            .arg(&partial)
            .output()
            .expect("running unshare");
        let _ = std::fs::remove_file(&first);
        let _ = std::fs::remove_file(&partial);
        let listing = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "nft failed: {}\n{listing}",
            String::from_utf8_lossy(&output.stderr)
        );

        let (old, new) = (Chains::of(&previous[1]).unwrap(), Chains::of(&ports[1]).unwrap());
        let svc2 = Chains::of(&ports[2]).unwrap();
        for needle in [
            format!("chain {} {{\n\t\tip saddr 198.18.2.11 jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to 198.18.2.11:8080\n\t}}", new.endpoints[2]),
            format!("numgen random mod 3 vmap {{ 0 : goto {}, 1 : goto {}, 2 : goto {} }}", new.endpoints[0], new.endpoints[1], new.endpoints[2]),
            // Flushed, not deleted.
            format!("chain {} {{\n\t}}", old.endpoints[2]),
            format!("198.19.0.3 . tcp . 80 : goto {}", svc2.service),
            format!("tcp . 20002 : goto {}", svc2.external.as_ref().unwrap()),
            "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports".into(),
        ] {
            assert!(listing.contains(&needle), "missing {needle:?} in\n{listing}");
        }
        assert!(
            !listing.contains("comment \"bench/svc-00002:http\""),
            "svc-00002's reject elements are gone\n{listing}"
        );
    }

    #[test]
    fn first_sync_of_ten_thousand_services_is_fast() {
        let ports: Vec<_> = (0..10_000)
            .map(|i| ServicePortRules {
                service: NamespacedName {
                    namespace: workload::NAMESPACE.into(),
                    name: workload::service_name(i),
                },
                port_name: "http".into(),
                protocol: Protocol::Tcp,
                cluster_ip: workload::cluster_ip(i),
                port: workload::SERVICE_PORT,
                node_port: Some(workload::node_port(i)),
                endpoints: BACKENDS[..3]
                    .iter()
                    .map(|ip| SocketAddrV4::new(*ip, workload::BACKEND_PORT))
                    .collect(),
            })
            .collect();
        let start = Instant::now();
        let script = first_sync(&ports);
        let elapsed = start.elapsed();
        eprintln!("first_sync of 10,000 Services: {elapsed:?}, {} bytes", script.len());
        assert!(elapsed.as_millis() < 500, "{elapsed:?}");
        assert_eq!(script.matches("numgen random mod 3").count(), 10_000);
    }
}
