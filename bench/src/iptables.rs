//! kube-proxy's iptables mode for the benchmark's Services: the `iptables-restore --noflush`
//! input that `syncProxyRules` (pkg/proxy/iptables/proxier.go, Kubernetes v1.33) writes, for
//! the first (full) sync and for a later partial sync.
//!
//! Rule text, argument order, comments, chain names and line order are kube-proxy's, so the
//! kernel evaluates the same rules in the same order as on a kube-proxy node. The kube-proxy
//! configuration reproduced is its default one:
//! - no cluster CIDR (no local-traffic detector) and no `masqueradeAll`: KUBE-SVC chains get
//!   no `! -s <clusterCIDR> -j KUBE-MARK-MASQ` rule; only NodePort traffic (KUBE-EXT) and
//!   hairpin traffic (KUBE-SEP) are marked for masquerade;
//! - masquerade bit 14: mark `0x00004000`, as Go's `%#08x` prints it (iptables-save shows
//!   `0x4000`);
//! - `localhostNodePorts` on: the KUBE-FIREWALL anti-martian rule, and the final nodeports
//!   jump of KUBE-SERVICES without `! -d 127.0.0.0/8`;
//! - `nf_conntrack_tcp_be_liberal` unset: KUBE-FORWARD drops INVALID packets;
//! - iptables with `--random-fully` (v1.8.9 has it);
//! - large-cluster mode above 1,000 endpoints, as kube-proxy switches it on by itself.
//!
//! Limits: ClusterIP and NodePort Services with Cluster traffic policies and no session
//! affinity, which is all the benchmark uses: no externalIPs or load-balancer IPs (KUBE-FW),
//! no Local policies (KUBE-SVL, DROP rules), no `-m recent` affinity, no
//! healthCheckNodePorts.
//!
//! Where the output differs from a running kube-proxy (none of it changes the rules a packet
//! traverses, only their bookkeeping):
//! - Service ports come in `ports` order; kube-proxy walks a Go map, so its order is random.
//! - The jumps from the built-in chains are `-I` lines of the first restore; kube-proxy
//!   inserts the same rules, in the same order, with one `iptables -I` each before it.
//! - No nfacct counters: `-m nfacct` needs counter objects created over netlink, and
//!   kube-proxy itself leaves the matches (and the localhost NodePort rule that carries one)
//!   out when it could not create them.
//! - Stale chains are deleted in every partial sync; in large-cluster mode kube-proxy defers
//!   that to at most once per `--iptables-sync-period` (30 s).
//! - No KUBE-PROXY-CANARY chains: its iptables monitor creates them outside syncs.
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddrV4;

use data_encoding::BASE32;
use lb_userspace::model::{NamespacedName, Protocol};
use sha2::{Digest, Sha256};

use crate::workload::ServicePortRules;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14), as kube-proxy prints it.
const MASQ_MARK: &str = "0x00004000";

/// kube-proxy's `largeClusterEndpointsThreshold`: with more endpoints it leaves the comments
/// out of SVC→SEP and SEP rules. The benchmark's 10,000 Services run in that mode.
const LARGE_CLUSTER_ENDPOINTS_THRESHOLD: usize = 1000;

/// The jumps from built-in chains that kube-proxy ensures on full syncs: its
/// `iptablesJumpChains`, then `iptablesKubeletJumpChains` (its duplicates of kubelet's).
/// Each is (table, built-in chain, extra matches, comment, target), in kube-proxy's order.
const JUMPS: [(&str, &str, &str, &str, &str); 14] = [
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW",
        "kubernetes externally-visible service portals",
        "KUBE-EXTERNAL-SERVICES",
    ),
    ("filter", "INPUT", "", "kubernetes health check service ports", "KUBE-NODEPORTS"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW", "kubernetes service portals", "KUBE-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW", "kubernetes service portals", "KUBE-SERVICES"),
    ("filter", "FORWARD", "", "kubernetes forwarding rules", "KUBE-FORWARD"),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW",
        "kubernetes load balancer firewall",
        "KUBE-PROXY-FIREWALL",
    ),
    ("nat", "OUTPUT", "", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "PREROUTING", "", "kubernetes service portals", "KUBE-SERVICES"),
    ("nat", "POSTROUTING", "", "kubernetes postrouting rules", "KUBE-POSTROUTING"),
    ("filter", "INPUT", "", "", "KUBE-FIREWALL"),
    ("filter", "OUTPUT", "", "", "KUBE-FIREWALL"),
];

/// `writeln!` into a String, which cannot fail.
macro_rules! put {
    ($buf:expr, $($arg:tt)*) => {
        writeln!($buf, $($arg)*).expect("writing to a String cannot fail")
    };
}

/// The first sync: `iptables-restore --noflush` input creating every chain and rule for
/// `ports`, plus the jumps from the built-in chains (nat PREROUTING/OUTPUT → KUBE-SERVICES,
/// POSTROUTING → KUBE-POSTROUTING, and the filter ones) that kube-proxy installs once.
pub fn first_sync(ports: &[ServicePortRules]) -> String {
    sync(ports, |_| true, &[], true)
}

/// A later sync after `ports` changed from `previous`, as kube-proxy v1.33 does it with
/// partial syncs (MinimizeIPTablesRestore, GA): the filter table and the top-level nat chains
/// (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-POSTROUTING, KUBE-MARK-MASQ) in full, the
/// KUBE-EXT/SVC/SEP chains of the Services that changed, and `-X` for chains that no longer
/// exist.
pub fn partial_sync(ports: &[ServicePortRules], previous: &[ServicePortRules]) -> String {
    let updated = updated_services(ports, previous);
    // Chain names hash the Service port name, so only updated Services' chains can go stale.
    let active: HashSet<String> = ports
        .iter()
        .filter(|port| updated.contains(&port.service))
        .filter_map(PortChains::of)
        .flat_map(PortChains::into_names)
        .collect();
    let stale: Vec<String> = previous
        .iter()
        .filter(|port| updated.contains(&port.service))
        .filter_map(PortChains::of)
        .flat_map(PortChains::into_names)
        .filter(|chain| !active.contains(chain))
        .collect();
    sync(ports, |service| updated.contains(service), &stale, false)
}

/// The Services kube-proxy's change trackers report as updated: they work per Service, so a
/// change to any port (or its endpoints) rewrites the chains of all the Service's ports.
fn updated_services<'a>(
    ports: &'a [ServicePortRules],
    previous: &'a [ServicePortRules],
) -> HashSet<&'a NamespacedName> {
    fn by_service(ports: &[ServicePortRules]) -> HashMap<&NamespacedName, Vec<&ServicePortRules>> {
        let mut services: HashMap<_, Vec<_>> = HashMap::new();
        for port in ports {
            services.entry(&port.service).or_default().push(port);
        }
        services
    }
    let (now, before) = (by_service(ports), by_service(previous));
    now.keys()
        .chain(before.keys())
        .filter(|service| now.get(*service) != before.get(*service))
        .copied()
        .collect()
}

/// The nat chains of one Service port, named as kube-proxy names them.
struct PortChains {
    /// KUBE-SVC-<hash>: Cluster policy, picks an endpoint.
    svc: String,
    /// KUBE-EXT-<hash>: NodePort traffic, marked for masquerade then sent to `svc`.
    ext: Option<String>,
    /// KUBE-SEP-<hash> of each endpoint, in `endpoints` order.
    seps: Vec<String>,
}

impl PortChains {
    /// None for a port without endpoints: kube-proxy gives it no nat chains, only filter
    /// REJECT rules.
    fn of(port: &ServicePortRules) -> Option<Self> {
        if port.endpoints.is_empty() {
            return None;
        }
        let name = port.service_port_name();
        let protocol = protocol(port.protocol);
        let hash = chain_hash(&name, protocol, None);
        Some(Self {
            svc: format!("KUBE-SVC-{hash}"),
            ext: port.node_port.map(|_| format!("KUBE-EXT-{hash}")),
            seps: port
                .endpoints
                .iter()
                .map(|endpoint| format!("KUBE-SEP-{}", chain_hash(&name, protocol, Some(endpoint))))
                .collect(),
        })
    }

    fn into_names(self) -> impl Iterator<Item = String> {
        self.ext.into_iter().chain([self.svc]).chain(self.seps)
    }
}

/// kube-proxy's `portProtoHash` (KUBE-SVC/EXT) and `servicePortEndpointChainName` (KUBE-SEP):
/// base32 of sha256(servicePortName + lowercase protocol [+ "ip:port"]), cut to 16 characters.
fn chain_hash(service_port_name: &str, protocol: &str, endpoint: Option<&SocketAddrV4>) -> String {
    let mut sha = Sha256::new();
    sha.update(service_port_name);
    sha.update(protocol);
    if let Some(endpoint) = endpoint {
        sha.update(endpoint.to_string());
    }
    // 10 bytes encode to exactly 16 base32 characters, so there is no padding to cut.
    BASE32.encode(&sha.finalize()[..10])
}

/// The lowercase protocol kube-proxy uses in matches and chain hashes.
fn protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// One `syncProxyRules` run: the filter table and the top-level nat chains in full, the
/// per-Service nat chains of Services `rewrite` selects, `-X` for `stale` chains, and the
/// built-in chain jumps when `jumps`.
fn sync(
    ports: &[ServicePortRules],
    rewrite: impl Fn(&NamespacedName) -> bool,
    stale: &[String],
    jumps: bool,
) -> String {
    let endpoints: usize = ports.iter().map(|port| port.endpoints.len()).sum();
    let large_cluster = endpoints > LARGE_CLUSTER_ENDPOINTS_THRESHOLD;
    // Room for every line of a full sync (rules run up to ~200 bytes), so nothing reallocates.
    let mut filter = String::with_capacity(4096 + 256 * ports.len());
    let mut nat_chains = String::with_capacity(64 * (ports.len() + endpoints + stale.len()));
    let mut nat_rules = String::with_capacity(256 * (ports.len() + 2 * endpoints) + 32 * stale.len());

    put!(filter, "*filter");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FORWARD",
        "KUBE-NODEPORTS",
        "KUBE-PROXY-FIREWALL",
        "KUBE-FIREWALL",
    ] {
        put!(filter, ":{chain} - [0:0]");
    }
    for chain in ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        put!(nat_chains, ":{chain} - [0:0]");
    }
    if jumps {
        for (table, from, matches, comment, to) in JUMPS {
            let rules = if table == "nat" { &mut nat_rules } else { &mut filter };
            let matches = if matches.is_empty() { String::new() } else { format!(" {matches}") };
            let comment = if comment.is_empty() {
                String::new()
            } else {
                format!(" -m comment --comment \"{comment}\"")
            };
            put!(rules, "-I {from}{matches}{comment} -j {to}");
        }
    }

    put!(nat_rules, "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN");
    // Clear the mark so a packet re-traversing the stack is not masqueraded twice.
    put!(nat_rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    put!(
        nat_rules,
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully"
    );
    put!(nat_rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    // route_localnet makes 127/8 NodePorts reachable; this keeps them from off-node sources.
    put!(
        filter,
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 \
         ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    );

    for port in ports {
        let name = port.service_port_name();
        let proto = protocol(port.protocol);
        let (ip, service_port) = (port.cluster_ip, port.port);
        let Some(chains) = PortChains::of(port) else {
            put!(
                filter,
                "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {proto} -p {proto} \
                 -d {ip} --dport {service_port} -j REJECT"
            );
            if let Some(node_port) = port.node_port {
                put!(
                    filter,
                    "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"{name} has no endpoints\" -m addrtype \
                     --dst-type LOCAL -m {proto} -p {proto} --dport {node_port} -j REJECT"
                );
            }
            continue;
        };
        let svc = &chains.svc;
        put!(
            nat_rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {ip} \
             --dport {service_port} -j {svc}"
        );
        if let (Some(node_port), Some(ext)) = (port.node_port, &chains.ext) {
            put!(
                nat_rules,
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {node_port} \
                 -j {ext}"
            );
        }
        // A partial sync leaves unchanged Services' chains as they are in the kernel.
        if !rewrite(&port.service) {
            continue;
        }

        if let Some(ext) = &chains.ext {
            put!(nat_chains, ":{ext} - [0:0]");
            // Cluster policy may pick an endpoint on another node: masquerade so replies return here.
            put!(
                nat_rules,
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" \
                 -j KUBE-MARK-MASQ"
            );
            put!(nat_rules, "-A {ext} -j {svc}");
        }

        put!(nat_chains, ":{svc} - [0:0]");
        let count = chains.seps.len();
        for (i, (endpoint, sep)) in port.endpoints.iter().zip(&chains.seps).enumerate() {
            let comment = if large_cluster {
                String::new()
            } else {
                format!(" -m comment --comment \"{name} -> {endpoint}\"")
            };
            // Endpoint i of n is taken with probability 1/(n-i): uniform overall; the last always matches.
            let statistic = if i + 1 < count {
                format!(" -m statistic --mode random --probability {:.10}", 1.0 / (count - i) as f64)
            } else {
                String::new()
            };
            put!(nat_rules, "-A {svc}{comment}{statistic} -j {sep}");
        }

        let comment = if large_cluster { String::new() } else { format!(" -m comment --comment {name}") };
        for (endpoint, sep) in port.endpoints.iter().zip(&chains.seps) {
            put!(nat_chains, ":{sep} - [0:0]");
            // Hairpin: an endpoint reaching itself through the Service must see the node as source.
            put!(nat_rules, "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ", endpoint.ip());
            put!(nat_rules, "-A {sep}{comment} -m {proto} -p {proto} -j DNAT --to-destination {endpoint}");
        }
    }

    for chain in stale {
        // The chain line flushes the chain, so nothing it holds blocks the delete.
        put!(nat_chains, ":{chain} - [0:0]");
        put!(nat_rules, "-X {chain}");
    }
    put!(
        nat_rules,
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the \
         last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    );

    // Written after the per-Service REJECTs, as kube-proxy does.
    put!(filter, "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP");
    put!(
        filter,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" \
         -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
    );
    put!(
        filter,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" \
         -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    put!(filter, "COMMIT");

    let mut restore = filter;
    restore.reserve(nat_chains.len() + nat_rules.len() + 16);
    put!(restore, "*nat");
    restore.push_str(&nat_chains);
    restore.push_str(&nat_rules);
    put!(restore, "COMMIT");
    restore
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::workload::{self, BACKEND_PORT, NAMESPACE, SERVICE_PORT};

    const B0: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
    const B1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
    const B2: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
    const B3: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);

    /// The ports of benchmark Services 0, 1, 2 with these backends each.
    fn ports(backends: [&[Ipv4Addr]; 3]) -> Vec<ServicePortRules> {
        let objects: Vec<_> = backends.iter().enumerate().map(|(i, b)| workload::service(i, b)).collect();
        workload::service_ports(&workload::store(&objects))
    }

    fn section<'a>(restore: &'a str, table: &str) -> &'a str {
        let start =
            restore.find(&format!("*{table}\n")).unwrap_or_else(|| panic!("no *{table} in:\n{restore}"));
        let rest = &restore[start..];
        &rest[..rest.find("COMMIT\n").expect("table ends with COMMIT")]
    }

    /// The `-A chain` rules of `table`, in order; works on restore input and iptables-save output.
    fn rules<'a>(restore: &'a str, table: &str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        section(restore, table).lines().filter(|line| line.starts_with(&prefix)).collect()
    }

    fn declares(restore: &str, table: &str, chain: &str) -> bool {
        let line = format!(":{chain} - [0:0]");
        section(restore, table).lines().any(|l| l == line)
    }

    fn chains(port: &ServicePortRules) -> PortChains {
        PortChains::of(port).expect("port has endpoints")
    }

    #[test]
    fn rules_and_chain_names_match_kube_proxys_own_tests() {
        // Lines from kube-proxy's proxier_test.go for ns1/svc1:p80 with two endpoints.
        let port = ServicePortRules {
            service: NamespacedName { namespace: "ns1".into(), name: "svc1".into() },
            port_name: "p80".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(10, 20, 30, 41),
            port: 80,
            node_port: None,
            endpoints: vec!["10.180.0.1:80".parse().unwrap(), "10.180.2.1:80".parse().unwrap()],
        };
        let restore = first_sync(&[port]);
        assert_eq!(
            rules(&restore, "nat", "KUBE-SERVICES"),
            [
                r#"-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 10.20.30.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"#,
                r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#,
            ]
        );
        assert_eq!(
            rules(&restore, "nat", "KUBE-SVC-XPGD46QRK7WJZT7O"),
            [
                r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ"#,
                r#"-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j KUBE-SEP-ZX7GRIZKSNUQ3LAJ"#,
            ]
        );
        assert_eq!(
            rules(&restore, "nat", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
            [
                "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
                "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            ]
        );
        assert_eq!(chain_hash("ns2/svc2:p80", "tcp", None), "GNZBNJ2PO5MGZ6GT");
        // No node port, so no KUBE-EXT chain.
        assert!(!restore.contains("KUBE-EXT-"));
    }

    #[test]
    fn first_sync_writes_kube_proxys_chains_for_three_services() {
        let ports = ports([&[B0, B1, B2], &[], &[B2]]);
        let restore = first_sync(&ports);
        let [svc0, svc2] = [chains(&ports[0]), chains(&ports[2])];
        assert!(PortChains::of(&ports[1]).is_none());

        let services = rules(&restore, "nat", "KUBE-SERVICES");
        assert_eq!(services.len(), 3, "{services:#?}");
        assert!(services[0]
            .contains("\"bench/svc-00000:http cluster IP\" -m tcp -p tcp -d 198.19.0.1 --dport 80"));
        assert!(services[0].ends_with(&format!("-j {}", svc0.svc)));
        assert!(services[1].contains("-d 198.19.0.3 --dport 80") && services[1].ends_with(&svc2.svc));
        assert!(services[2].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));

        let node_ports = rules(&restore, "nat", "KUBE-NODEPORTS");
        let ext0 = svc0.ext.as_deref().expect("NodePort Service");
        assert_eq!(
            node_ports,
            [
                format!("-A KUBE-NODEPORTS -m comment --comment bench/svc-00000:http -m tcp -p tcp --dport 20000 -j {ext0}"),
                format!(
                    "-A KUBE-NODEPORTS -m comment --comment bench/svc-00002:http -m tcp -p tcp --dport 20002 -j {}",
                    svc2.ext.as_deref().unwrap()
                ),
            ]
        );
        assert_eq!(
            rules(&restore, "nat", ext0),
            [
                format!(
                    "-A {ext0} -m comment --comment \"masquerade traffic for bench/svc-00000:http external \
                     destinations\" -j KUBE-MARK-MASQ"
                ),
                format!("-A {ext0} -j {}", svc0.svc),
            ]
        );

        let balance = rules(&restore, "nat", &svc0.svc);
        let expected = [" --probability 0.3333333333 -j ", " --probability 0.5000000000 -j ", "\" -j "];
        for ((rule, statistic), sep) in balance.iter().zip(expected).zip(&svc0.seps) {
            assert!(rule.contains(statistic) && rule.ends_with(sep.as_str()), "{rule}");
        }
        assert_eq!(balance.len(), 3);
        assert_eq!(rules(&restore, "nat", &svc2.svc).len(), 1);

        let endpoint = SocketAddrV4::new(B0, BACKEND_PORT);
        assert_eq!(ports[0].endpoints[0], endpoint);
        assert_eq!(
            rules(&restore, "nat", &svc0.seps[0]),
            [
                format!("-A {} -m comment --comment bench/svc-00000:http -s 198.18.1.10 -j KUBE-MARK-MASQ", svc0.seps[0]),
                format!(
                    "-A {} -m comment --comment bench/svc-00000:http -m tcp -p tcp -j DNAT --to-destination {endpoint}",
                    svc0.seps[0]
                ),
            ]
        );

        // The endpoint-less Service: REJECTs in filter, nothing in nat.
        assert_eq!(
            rules(&restore, "filter", "KUBE-SERVICES"),
            [
                r#"-A KUBE-SERVICES -m comment --comment "bench/svc-00001:http has no endpoints" -m tcp -p tcp -d 198.19.0.2 --dport 80 -j REJECT"#
            ]
        );
        assert_eq!(
            rules(&restore, "filter", "KUBE-EXTERNAL-SERVICES"),
            [
                r#"-A KUBE-EXTERNAL-SERVICES -m comment --comment "bench/svc-00001:http has no endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 20001 -j REJECT"#
            ]
        );
        assert!(!section(&restore, "nat").contains("svc-00001"));

        assert_eq!(
            rules(&restore, "nat", "KUBE-MARK-MASQ"),
            ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000"]
        );
        assert_eq!(rules(&restore, "nat", "KUBE-POSTROUTING").len(), 3);
        assert_eq!(rules(&restore, "filter", "KUBE-FORWARD").len(), 3);
        let jumps = restore.lines().filter(|line| line.starts_with("-I ")).count();
        assert_eq!(jumps, JUMPS.len());
        assert!(!restore.contains("-X "));
    }

    #[test]
    fn partial_sync_rewrites_only_the_changed_service() {
        let before = ports([&[B0, B1, B2], &[], &[B2]]);
        let after = ports([&[B0, B1, B3], &[], &[B2]]);
        let restore = partial_sync(&after, &before);
        let (old0, new0, svc2) = (chains(&before[0]), chains(&after[0]), chains(&after[2]));

        // Top-level chains in full, every Service port included.
        assert_eq!(rules(&restore, "nat", "KUBE-SERVICES").len(), 3);
        assert_eq!(rules(&restore, "nat", "KUBE-NODEPORTS").len(), 2);
        assert_eq!(rules(&restore, "filter", "KUBE-SERVICES").len(), 1);
        // The changed Service's chains, rewritten.
        for chain in [new0.ext.as_deref().unwrap(), new0.svc.as_str()]
            .into_iter()
            .chain(new0.seps.iter().map(String::as_str))
        {
            assert!(declares(&restore, "nat", chain), "{chain} not rewritten");
        }
        assert_eq!(rules(&restore, "nat", &new0.svc).len(), 3);
        assert!(rules(&restore, "nat", &new0.svc)[2].ends_with(&new0.seps[2]));
        // Its stale endpoint chain, flushed then deleted before the final nodeports rule.
        let stale = &old0.seps[2];
        assert!(!new0.seps.contains(stale));
        assert!(declares(&restore, "nat", stale));
        let deletes: Vec<_> = restore.lines().filter(|line| line.starts_with("-X ")).collect();
        assert_eq!(deletes, [format!("-X {stale}")]);
        let nat: Vec<_> = section(&restore, "nat").lines().collect();
        assert!(
            nat.iter().position(|l| l.starts_with("-X "))
                < nat.iter().position(|l| l.contains("nodeports; NOTE"))
        );
        // The unchanged Service's chains are left alone, and no jumps are repeated.
        for chain in [svc2.ext.as_deref().unwrap(), svc2.svc.as_str(), svc2.seps[0].as_str()] {
            assert!(
                !declares(&restore, "nat", chain) && rules(&restore, "nat", chain).is_empty(),
                "{chain} rewritten"
            );
        }
        assert!(!restore.contains("\n-I "));

        // Nothing changed: only the top-level chains.
        let idle = partial_sync(&after, &after);
        assert_eq!(section(&idle, "nat").lines().filter(|l| l.starts_with(':')).count(), 4);
    }

    #[test]
    fn partial_sync_deletes_all_chains_of_a_service_without_endpoints() {
        let before = ports([&[B0], &[], &[B2, B3]]);
        let after = ports([&[B0], &[B1], &[]]);
        let restore = partial_sync(&after, &before);
        let deleted: HashSet<_> =
            restore.lines().filter_map(|line| line.strip_prefix("-X ")).map(String::from).collect();
        assert_eq!(
            deleted,
            chains(&before[2]).into_names().collect(),
            "all of Service 2's chains, nothing else"
        );
        assert!(
            rules(&restore, "filter", "KUBE-SERVICES")[0].contains("bench/svc-00002:http has no endpoints")
        );
        assert!(declares(&restore, "nat", &chains(&after[1]).svc));
        assert!(!declares(&restore, "nat", &chains(&after[0]).svc));
    }

    /// `n` benchmark Service ports with 3 endpoints each, built directly (the store is slow
    /// for 10,000 objects and not what is measured here).
    fn many_ports(n: usize) -> Vec<ServicePortRules> {
        (0..n)
            .map(|i| ServicePortRules {
                service: NamespacedName { namespace: NAMESPACE.into(), name: workload::service_name(i) },
                port_name: "http".into(),
                protocol: Protocol::Tcp,
                cluster_ip: workload::cluster_ip(i),
                port: SERVICE_PORT,
                node_port: Some(workload::node_port(i)),
                endpoints: (0..3)
                    .map(|e| {
                        SocketAddrV4::new(Ipv4Addr::from(0xc612_0000 + (3 * i + e) as u32), BACKEND_PORT)
                    })
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn large_clusters_drop_endpoint_comments_like_kube_proxy() {
        let ports = many_ports(LARGE_CLUSTER_ENDPOINTS_THRESHOLD / 3 + 1);
        let restore = first_sync(&ports);
        let svc0 = chains(&ports[0]);
        assert!(rules(&restore, "nat", &svc0.svc)[0].starts_with(&format!("-A {} -m statistic", svc0.svc)));
        assert!(rules(&restore, "nat", &svc0.seps[0])[0].starts_with(&format!("-A {} -s ", svc0.seps[0])));
        // Top-level rules keep theirs.
        assert!(rules(&restore, "nat", "KUBE-SERVICES")[0]
            .contains("--comment \"bench/svc-00000:http cluster IP\""));
    }

    #[test]
    fn ten_thousand_services_generate_in_well_under_a_second() {
        let before = many_ports(10_000);
        let mut after = before.clone();
        after[5_000].endpoints[0] = SocketAddrV4::new(B3, BACKEND_PORT);

        let start = Instant::now();
        let full = first_sync(&before);
        let first = start.elapsed();
        let start = Instant::now();
        let partial = partial_sync(&after, &before);
        let later = start.elapsed();

        assert_eq!(section(&full, "nat").matches(":KUBE-SEP-").count(), 30_000);
        assert_eq!(section(&partial, "nat").matches(":KUBE-SEP-").count(), 4, "3 rewritten, 1 deleted");
        assert_eq!(rules(&partial, "nat", "KUBE-SERVICES").len(), 10_001);
        eprintln!(
            "first sync {} bytes in {first:?}, partial sync {} bytes in {later:?}",
            full.len(),
            partial.len()
        );
        assert!(
            first < Duration::from_millis(500) && later < Duration::from_millis(500),
            "{first:?} {later:?}"
        );
    }

    /// Runs `script` in a throwaway network namespace, so the host's rules are never touched,
    /// and returns its output.
    fn in_throwaway_netns(script: &str) -> String {
        let output =
            Command::new("unshare").args(["--net", "sh", "-c", script]).output().expect("unshare runs");
        assert!(output.status.success(), "{script}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("iptables-save prints UTF-8")
    }

    #[test]
    fn syncs_load_with_iptables_restore() {
        let first = ports([&[B0, B1, B2], &[], &[B2]]);
        let second = ports([&[B0, B1, B3], &[], &[B2]]);
        let third = ports([&[B0, B1, B3], &[B1], &[]]);
        let files: Vec<_> =
            [first_sync(&first), partial_sync(&second, &first), partial_sync(&third, &second)]
                .iter()
                .enumerate()
                .map(|(i, restore)| {
                    let path = std::env::temp_dir()
                        .join(format!("xlb-bench-iptables-{}-{i}.rules", std::process::id()));
                    std::fs::write(&path, restore).expect("temp file written");
                    path
                })
                .collect();
        let script = files
            .iter()
            .map(|file| {
                format!("iptables-restore --noflush < {} && iptables-save && echo '#SYNC'", file.display())
            })
            .collect::<Vec<_>>()
            .join(" && ");
        let output = in_throwaway_netns(&script);
        for file in &files {
            std::fs::remove_file(file).expect("temp file removed");
        }
        let saved: Vec<_> = output.split("#SYNC\n").collect();
        let old_sep = chains(&first[0]).seps.swap_remove(2);
        let new_sep = chains(&second[0]).seps.swap_remove(2);

        // First sync: every chain, the jumps, and iptables' own spelling of the rules.
        let first_saved = saved[0];
        assert_eq!(
            rules(first_saved, "nat", "PREROUTING"),
            ["-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"]
        );
        assert_eq!(rules(first_saved, "nat", "POSTROUTING").len(), 1);
        assert_eq!(rules(first_saved, "filter", "INPUT").len(), 4);
        assert!(rules(first_saved, "filter", "INPUT")[0].ends_with("-j KUBE-FIREWALL"));
        for chain in chains(&first[0]).into_names().chain(chains(&first[2]).into_names()) {
            assert!(declares(first_saved, "nat", &chain), "{chain} missing:\n{first_saved}");
        }
        let services = rules(first_saved, "nat", "KUBE-SERVICES");
        assert!(
            services[0].starts_with("-A KUBE-SERVICES -d 198.19.0.1/32 -p tcp -m comment"),
            "{}",
            services[0]
        );
        assert!(rules(first_saved, "filter", "KUBE-SERVICES")[0]
            .ends_with("-j REJECT --reject-with icmp-port-unreachable"));
        assert!(first_saved.contains("-j MASQUERADE --random-fully"));

        // Second: the replaced endpoint's chain is gone, its successor there, nothing doubled.
        assert!(!saved[1].contains(&old_sep) && declares(saved[1], "nat", &new_sep));
        assert_eq!(rules(saved[1], "nat", "PREROUTING").len(), 1);
        assert_eq!(rules(saved[1], "nat", "KUBE-SERVICES").len(), 3);
        assert_eq!(rules(saved[1], "nat", &chains(&second[0]).svc).len(), 3);
        assert!(declares(saved[1], "nat", &chains(&second[2]).svc));

        // Third: Service 2 lost its endpoints, so all its chains are gone and it is rejected.
        let gone = chains(&second[2]);
        for chain in gone.into_names() {
            assert!(!saved[2].contains(chain.as_str()), "{chain} still there:\n{}", saved[2]);
        }
        assert!(rules(saved[2], "filter", "KUBE-EXTERNAL-SERVICES")[0].contains("--dport 20002 -j REJECT"));
        assert!(declares(saved[2], "nat", &chains(&third[1]).svc));
    }
}
