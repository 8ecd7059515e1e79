//! Validated records of the objects xlb acts on, and the `Store` that holds the last good
//! version of each. Validation happens once, here, for every source.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr},
    ops::RangeInclusive,
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use lb_common::proto;

/// Label that hands a Service to another proxy (kube-proxy skips such Services too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label on EndpointSlices of headless Services; kube-proxy skips Services carrying it too
/// (its informers share one label selector), as `ServiceRecord::from_object` does.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// Node label naming its zone, matched against endpoint zone hints.
pub const LABEL_TOPOLOGY_ZONE: &str = "topology.kubernetes.io/zone";
/// The API server's default `--service-node-port-range`.
pub const NODE_PORT_RANGE_DEFAULT: RangeInclusive<u16> = 30000..=32767;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// kube-proxy's `ServicePortName.String()` (pkg/proxy/types.go): `namespace/name:port`, and
/// `namespace/name` for an unnamed port (no colon).
pub fn service_port_name(service: &NamespacedName, port_name: &str) -> String {
    match port_name {
        "" => service.to_string(),
        port => format!("{service}:{port}"),
    }
}

/// An object field that failed validation: which field, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct InvalidField {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidField {
    InvalidField { field: field.into(), reason: reason.into() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `Ok(None)` for SCTP: a valid Kubernetes protocol xlb does not balance yet, so such a
    /// port is left out while the object's TCP and UDP ports still work.
    fn parse(value: Option<&str>, field: &str) -> Result<Option<Self>, InvalidField> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Some(Self::Tcp)),
            "UDP" => Ok(Some(Self::Udp)),
            "SCTP" => Ok(None),
            other => Err(invalid(field, format!("protocol {other:?} is not one of TCP, UDP, SCTP"))),
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            _ => None,
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An IPv4 address as kube-proxy reads one (`netutils.ParseIPSloppy`, Go's parser before
/// 1.17): four decimal octets, leading zeros allowed and still decimal, so `010.001.002.003`
/// is 10.1.2.3, never octal (CVE-2021-29923). Objects stored before the API server's
/// validation tightened may hold such addresses; Rust's parser refuses them.
fn parse_ipv4_sloppy(value: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = value.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

fn ipv4(value: &str, field: &str) -> Result<Ipv4Addr, InvalidField> {
    parse_ipv4_sloppy(value).ok_or_else(|| invalid(field, format!("{value:?} is not an IPv4 address")))
}

/// An address of either family: `Ok(None)` for IPv6, which xlb (like kube-proxy's IPv4 proxier)
/// leaves alone.
fn ipv4_or_v6(value: &str, field: &str) -> Result<Option<Ipv4Addr>, InvalidField> {
    if let Some(v4) = parse_ipv4_sloppy(value) {
        return Ok(Some(v4));
    }
    match value.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => Ok(Some(v4)),
        Ok(IpAddr::V6(_)) => Ok(None),
        Err(_) => Err(invalid(field, format!("{value:?} is not an IP address"))),
    }
}

/// A CIDR of either family, IPv4 normalised to its network address: `10.1.2.3/8` becomes
/// `(10.0.0.0, 8)`. `Ok(None)` for IPv6. Surrounding whitespace is tolerated, as the API
/// server and kube-proxy tolerate it in `loadBalancerSourceRanges`.
fn ipv4_cidr_or_v6(value: &str, field: &str) -> Result<Option<(Ipv4Addr, u8)>, InvalidField> {
    let not_cidr = || invalid(field, format!("{value:?} is not a CIDR (address/prefix length)"));
    let (addr, len) = value.trim().split_once('/').ok_or_else(not_cidr)?;
    let Some(addr) = ipv4_or_v6(addr, field).map_err(|_| not_cidr())? else {
        return Ok(None);
    };
    let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(not_cidr)?;
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Ok(Some((Ipv4Addr::from(u32::from(addr) & mask), len)))
}

fn port(value: i32, field: &str) -> Result<u16, InvalidField> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, format!("{value} is not a port (1-65535)"))),
    }
}

fn namespaced(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Result<NamespacedName, InvalidField> {
    let name =
        meta.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| invalid("metadata.name", "missing"))?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    Ok(NamespacedName { namespace, name })
}

/// The Service's IPv4 cluster IP: `spec.clusterIPs` (dual-stack, either family first), else
/// `spec.clusterIP`. `Ok(None)` when there is none to program: headless (`None`), unset, or
/// IPv6 only, which kube-proxy's IPv4 proxier skips as well.
fn ipv4_cluster_ip(spec: &ServiceSpec) -> Result<Option<Ipv4Addr>, InvalidField> {
    let (field, ips): (&str, Vec<&str>) = match &spec.cluster_ips {
        Some(list) if !list.is_empty() => ("spec.clusterIPs", list.iter().map(String::as_str).collect()),
        _ => ("spec.clusterIP", spec.cluster_ip.as_deref().into_iter().collect()),
    };
    if matches!(ips.first(), None | Some(&"") | Some(&"None")) {
        return Ok(None);
    }
    for (i, ip) in ips.iter().enumerate() {
        let field = if field == "spec.clusterIPs" { format!("{field}[{i}]") } else { field.to_string() };
        if let Some(v4) = ipv4_or_v6(ip, &field)? {
            return Ok(Some(v4));
        }
    }
    Ok(None)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name; EndpointSlice ports match on (name, protocol).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service xlb programs. Headless (no clusterIP, or labelled `service.kubernetes.io/headless`),
/// ExternalName and other proxies' Services are not represented: `ServiceRecord::from_object` returns `Ok(None)` for them. Addresses and
/// ranges are the IPv4 ones; IPv6 entries are left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub id: NamespacedName,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<Ipv4Addr>,
    /// LoadBalancer ingress IPs the node answers on: `status.loadBalancer.ingress[].ip` of
    /// VIP-mode entries. Proxy-mode ones are left to the load balancer, which in-cluster
    /// clients must then reach rather than be balanced on the node.
    pub lb_ips: Vec<Ipv4Addr>,
    /// `spec.loadBalancerSourceRanges` as (network address, prefix length), for `lb_ips`.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// `externalTrafficPolicy: Local`.
    pub external_policy_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_policy_local: bool,
    /// `sessionAffinity: ClientIP`: the affinity timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// `spec.healthCheckNodePort` of a LoadBalancer with `externalTrafficPolicy: Local`, the
    /// only Services kube-proxy serves one for.
    pub health_check_node_port: Option<u16>,
}

/// `sessionAffinityConfig.clientIP.timeoutSeconds` default and maximum (API validation).
const AFFINITY_TIMEOUT_DEFAULT_S: u32 = 10_800;
const AFFINITY_TIMEOUT_MAX_S: u32 = 86_400;

fn affinity_timeout_s(spec: &ServiceSpec) -> Result<Option<u32>, InvalidField> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(None);
    }
    let configured = spec.session_affinity_config.as_ref().and_then(|c| c.client_ip.as_ref());
    let Some(seconds) = configured.and_then(|c| c.timeout_seconds) else {
        return Ok(Some(AFFINITY_TIMEOUT_DEFAULT_S));
    };
    match u32::try_from(seconds) {
        Ok(s) if (1..=AFFINITY_TIMEOUT_MAX_S).contains(&s) => Ok(Some(s)),
        _ => Err(invalid(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("{seconds} is not in 1-{AFFINITY_TIMEOUT_MAX_S}"),
        )),
    }
}

/// Only VIP-mode ingress IPs (`ipMode` absent or `VIP`) are programmed, as kube-proxy does.
/// Entries with only a hostname have no IP to program.
fn lb_ingress_ips(svc: &Service) -> Result<Vec<Ipv4Addr>, InvalidField> {
    let ingress =
        svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
    let mut ips = Vec::new();
    for (i, entry) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) else { continue };
        if matches!(entry.ip_mode.as_deref(), None | Some("VIP")) {
            ips.extend(ipv4_or_v6(ip, &format!("status.loadBalancer.ingress[{i}].ip"))?);
        }
    }
    Ok(ips)
}

/// The IPv4 entries of list `field`, each read by `parse` (which skips IPv6 ones).
fn ipv4_entries<T>(
    list: &Option<Vec<String>>,
    field: &str,
    parse: fn(&str, &str) -> Result<Option<T>, InvalidField>,
) -> Result<Vec<T>, InvalidField> {
    let entries = list.iter().flatten().enumerate();
    entries.filter_map(|(i, value)| parse(value, &format!("{field}[{i}]")).transpose()).collect()
}

/// A node port: a port inside the cluster's node port range.
fn node_port(value: i32, field: &str, range: &RangeInclusive<u16>) -> Result<u16, InvalidField> {
    let p = port(value, field)?;
    if !range.contains(&p) {
        let reason = format!("{p} is outside the node port range {}-{}", range.start(), range.end());
        return Err(invalid(field, reason));
    }
    Ok(p)
}

impl ServiceRecord {
    /// `node_ports`: the cluster's node port range; nodePorts outside it are invalid.
    pub fn from_object(
        svc: &Service,
        node_ports: &RangeInclusive<u16>,
    ) -> Result<Option<Self>, InvalidField> {
        let id = namespaced(&svc.metadata)?;
        // kube-proxy's label selector, which its Service informer applies too.
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME) || l.contains_key(LABEL_HEADLESS))
        {
            return Ok(None);
        }
        let Some(spec) = svc.spec.as_ref() else {
            return Err(invalid("spec", "missing"));
        };
        let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if svc_type == "ExternalName" {
            return Ok(None);
        }
        let Some(cluster_ip) = ipv4_cluster_ip(spec)? else {
            return Ok(None);
        };
        let with_node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            let node_port = match p.node_port {
                Some(np) if with_node_ports => Some(node_port(np, &field("nodePort"), node_ports)?),
                _ => None,
            };
            let Some(protocol) = Protocol::parse(p.protocol.as_deref(), &field("protocol"))? else {
                continue;
            };
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port: port(p.port, &field("port"))?,
                node_port,
            });
        }
        // Ingress IPs and source ranges only mean something for a LoadBalancer.
        let (lb_ips, source_ranges) = if svc_type == "LoadBalancer" {
            let ranges = &spec.load_balancer_source_ranges;
            (lb_ingress_ips(svc)?, ipv4_entries(ranges, "spec.loadBalancerSourceRanges", ipv4_cidr_or_v6)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let external_policy_local = spec.external_traffic_policy.as_deref() == Some("Local");
        let health_check_node_port = match spec.health_check_node_port {
            Some(hc) if svc_type == "LoadBalancer" && external_policy_local => {
                Some(node_port(hc, "spec.healthCheckNodePort", node_ports)?)
            }
            _ => None,
        };
        Ok(Some(Self {
            id,
            cluster_ip,
            ports,
            external_ips: ipv4_entries(&spec.external_ips, "spec.externalIPs", ipv4_or_v6)?,
            lb_ips,
            source_ranges,
            external_policy_local,
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            affinity_timeout_s: affinity_timeout_s(spec)?,
            health_check_node_port,
        }))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `hints.forZones[].name`: the zones whose nodes should use this endpoint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`: the nodes that should use this endpoint
    /// (`trafficDistribution: PreferSameNode`).
    pub node_hints: Vec<String>,
}

/// An IPv4 EndpointSlice of a Service. Non-IPv4 and headless slices: `Ok(None)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    pub id: NamespacedName,
    pub service: NamespacedName,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl SliceRecord {
    pub fn from_object(slice: &EndpointSlice) -> Result<Option<Self>, InvalidField> {
        let id = namespaced(&slice.metadata)?;
        let labels = slice.metadata.labels.clone().unwrap_or_default();
        if labels.contains_key(LABEL_HEADLESS) || slice.address_type != "IPv4" {
            return Ok(None);
        }
        let service_name = labels
            .get(LABEL_SERVICE_NAME)
            .ok_or_else(|| invalid(format!("metadata.labels[{LABEL_SERVICE_NAME}]"), "missing"))?;
        let service = NamespacedName { namespace: id.namespace.clone(), name: service_name.clone() };
        let mut ports = Vec::new();
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let Some(number) = p.port else { continue };
            let Some(protocol) = Protocol::parse(p.protocol.as_deref(), &format!("ports[{i}].protocol"))?
            else {
                continue;
            };
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol,
                port: port(number, &format!("ports[{i}].port"))?,
            });
        }
        let mut endpoints = Vec::new();
        for (i, e) in slice.endpoints.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[0]");
            let addr = e.addresses.first().ok_or_else(|| invalid(&field, "missing"))?;
            let conditions = e.conditions.as_ref();
            // kube-proxy's defaults: absent ready/serving mean true, absent terminating false.
            endpoints.push(Endpoint {
                addr: ipv4(addr, &field)?,
                node_name: e.node_name.clone(),
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                zone_hints: e
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: e
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            });
        }
        Ok(Some(Self { id, service, ports, endpoints }))
    }
}

/// The parts of a Node xlb uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub internal_ip: Option<Ipv4Addr>,
    /// The `topology.kubernetes.io/zone` label, for zone hints.
    pub zone: Option<String>,
    /// The Node has a deletionTimestamp: /healthz reports it not eligible.
    pub deleting: bool,
}

impl NodeRecord {
    pub fn from_object(node: &Node) -> Result<Self, InvalidField> {
        let name = node.metadata.name.clone().ok_or_else(|| invalid("metadata.name", "missing"))?;
        let mut internal_ip = None;
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for (i, a) in addresses.into_iter().flatten().enumerate() {
            // A dual-stack node lists an IPv6 InternalIP too; only IPv4 matters here.
            if a.type_ == "InternalIP" && internal_ip.is_none() {
                internal_ip = ipv4_or_v6(&a.address, &format!("status.addresses[{i}].address"))?;
            }
        }
        let zone = node.metadata.labels.as_ref().and_then(|l| l.get(LABEL_TOPOLOGY_ZONE)).cloned();
        Ok(Self { name, internal_ip, zone, deleting: node.metadata.deletion_timestamp.is_some() })
    }
}

/// An object as a source delivers it, before validation.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Node(_) => Kind::Node,
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::Service(o) => &o.metadata,
            Self::EndpointSlice(o) => &o.metadata,
            Self::Node(o) => &o.metadata,
        }
    }

    /// "Service default/kiada", for messages. Tolerates objects without a name.
    pub fn describe(&self) -> String {
        let kind = self.kind().as_str();
        let meta = self.metadata();
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        match (&meta.namespace, self) {
            (_, Self::Node(_)) => format!("{kind} {name}"),
            (Some(ns), _) => format!("{kind} {ns}/{name}"),
            (None, _) => format!("{kind} default/{name}"),
        }
    }
}

/// Key of an object in the store: kind and namespaced name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKey {
    Service(NamespacedName),
    EndpointSlice(NamespacedName),
    Node(String),
}

/// The kinds of object xlb reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

impl ObjectKey {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Node(_) => Kind::Node,
        }
    }
}

/// A valid object: its key and what it contributes. `None`: an object xlb skips (headless,
/// another proxy's...), still remembered so a later delete or replace knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Record {
    Service(NamespacedName, Option<ServiceRecord>),
    EndpointSlice(NamespacedName, Option<SliceRecord>),
    Node(NodeRecord),
}

impl Record {
    fn key(&self) -> ObjectKey {
        match self {
            Self::Service(id, _) => ObjectKey::Service(id.clone()),
            Self::EndpointSlice(id, _) => ObjectKey::EndpointSlice(id.clone()),
            Self::Node(node) => ObjectKey::Node(node.name.clone()),
        }
    }
}

/// An object that failed validation, with enough to find it.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {object}: {error}")]
pub struct Rejected {
    pub kind: Kind,
    pub origin: String,
    pub object: String,
    pub error: InvalidField,
}

fn validate(object: &Object, node_ports: &RangeInclusive<u16>) -> Result<Record, InvalidField> {
    Ok(match object {
        Object::Service(svc) => {
            Record::Service(namespaced(&svc.metadata)?, ServiceRecord::from_object(svc, node_ports)?)
        }
        Object::EndpointSlice(slice) => {
            Record::EndpointSlice(namespaced(&slice.metadata)?, SliceRecord::from_object(slice)?)
        }
        Object::Node(node) => Record::Node(NodeRecord::from_object(node)?),
    })
}

/// The last good version of every object, fed by any source.
///
/// An invalid object is rejected and its previous good version, if any, stays: a bad edit
/// never takes a working Service down. The store notes which Services changed (their
/// Service or one of their slices), so the desired state can be recomputed for those only.
#[derive(Debug)]
pub struct Store {
    services: BTreeMap<NamespacedName, Option<ServiceRecord>>,
    /// The Service of every slice (`None`: a skipped slice).
    slice_services: BTreeMap<NamespacedName, Option<NamespacedName>>,
    /// The slices of each Service by name, so that one Service can be computed alone.
    slices: HashMap<NamespacedName, BTreeMap<NamespacedName, SliceRecord>>,
    nodes: BTreeMap<String, NodeRecord>,
    /// Services whose Service or slices changed since `take_changed_services`.
    changed_services: BTreeSet<NamespacedName>,
    node_ports: RangeInclusive<u16>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new(NODE_PORT_RANGE_DEFAULT)
    }
}

impl Store {
    /// An empty store validating nodePorts against `node_ports`.
    pub fn new(node_ports: RangeInclusive<u16>) -> Self {
        Self {
            services: BTreeMap::new(),
            slice_services: BTreeMap::new(),
            slices: HashMap::new(),
            nodes: BTreeMap::new(),
            changed_services: BTreeSet::new(),
            node_ports,
        }
    }

    /// Adds or updates one object. `origin` says where it came from (a file, the API).
    pub fn apply(&mut self, object: &Object, origin: &str) -> Result<(), Rejected> {
        let record = self.validate(object, origin)?;
        self.insert(record);
        Ok(())
    }

    pub fn delete(&mut self, key: &ObjectKey) {
        match key {
            ObjectKey::Service(id) => self.set_service(id.clone(), None),
            ObjectKey::EndpointSlice(id) => self.set_slice(id.clone(), None),
            ObjectKey::Node(name) => {
                self.nodes.remove(name);
            }
        }
    }

    /// Makes the store hold exactly `objects`, a full listing: objects not listed are
    /// deleted. A listed object that is rejected keeps its previous version, and so do the
    /// objects named in `unreadable` (listed by a source that could not read them this time,
    /// e.g. a file that does not parse). Returns the rejections.
    pub fn replace_all<'a>(
        &mut self,
        objects: impl IntoIterator<Item = (&'a Object, &'a str)>,
        unreadable: impl IntoIterator<Item = ObjectKey>,
    ) -> Vec<Rejected> {
        self.replace_matching(|_| true, objects, unreadable)
    }

    /// Like `replace_all`, for the objects of one kind: a full listing from a watch of that
    /// kind leaves the other kinds alone.
    pub fn replace_kind<'a>(
        &mut self,
        kind: Kind,
        objects: impl IntoIterator<Item = (&'a Object, &'a str)>,
    ) -> Vec<Rejected> {
        self.replace_matching(|key| key.kind() == kind, objects, [])
    }

    fn replace_matching<'a>(
        &mut self,
        replaced: impl Fn(&ObjectKey) -> bool,
        objects: impl IntoIterator<Item = (&'a Object, &'a str)>,
        unreadable: impl IntoIterator<Item = ObjectKey>,
    ) -> Vec<Rejected> {
        let mut keep: BTreeSet<ObjectKey> = unreadable.into_iter().collect();
        let mut listed = Vec::new();
        let mut rejected = Vec::new();
        for (object, origin) in objects {
            match self.validate(object, origin) {
                Ok(record) => listed.push(record),
                Err(e) => {
                    keep.extend(object_key(object));
                    rejected.push(e);
                }
            }
        }
        keep.extend(listed.iter().map(Record::key));
        let gone: Vec<ObjectKey> = self.keys().filter(|k| replaced(k) && !keep.contains(k)).collect();
        for key in &gone {
            self.delete(key);
        }
        // Unchanged objects are inserted again as they are: no Service counts as changed.
        for record in listed {
            self.insert(record);
        }
        rejected
    }

    fn validate(&self, object: &Object, origin: &str) -> Result<Record, Rejected> {
        validate(object, &self.node_ports).map_err(|error| Rejected {
            kind: object.kind(),
            origin: origin.to_string(),
            object: object.describe(),
            error,
        })
    }

    fn keys(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        let services = self.services.keys().map(|id| ObjectKey::Service(id.clone()));
        let slices = self.slice_services.keys().map(|id| ObjectKey::EndpointSlice(id.clone()));
        services.chain(slices).chain(self.nodes.keys().map(|name| ObjectKey::Node(name.clone())))
    }

    fn insert(&mut self, record: Record) {
        match record {
            Record::Service(id, svc) => self.set_service(id, Some(svc)),
            Record::EndpointSlice(id, slice) => self.set_slice(id, Some(slice)),
            Record::Node(node) => {
                self.nodes.insert(node.name.clone(), node);
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) the record of Service `id`.
    fn set_service(&mut self, id: NamespacedName, record: Option<Option<ServiceRecord>>) {
        let old = match record {
            Some(record) => self.services.insert(id.clone(), record),
            None => self.services.remove(&id),
        };
        if old.flatten().as_ref() != self.service(&id) {
            self.changed_services.insert(id);
        }
    }

    /// Sets (`Some`) or removes (`None`) the record of slice `id`: its Service, and the one
    /// it belonged to before, change.
    fn set_slice(&mut self, id: NamespacedName, record: Option<Option<SliceRecord>>) {
        let service = record.as_ref().map(|r| r.as_ref().map(|slice| slice.service.clone()));
        let old_service = match service {
            Some(service) => self.slice_services.insert(id.clone(), service),
            None => self.slice_services.remove(&id),
        }
        .flatten();
        let new = record.flatten();
        let old = old_service.as_ref().and_then(|service| self.slices.get(service)?.get(&id));
        if old == new.as_ref() {
            return;
        }
        if let Some(service) = old_service {
            if let Some(slices) = self.slices.get_mut(&service) {
                slices.remove(&id);
                if slices.is_empty() {
                    self.slices.remove(&service);
                }
            }
            self.changed_services.insert(service);
        }
        if let Some(new) = new {
            if !self.changed_services.contains(&new.service) {
                self.changed_services.insert(new.service.clone());
            }
            match self.slices.get_mut(&new.service) {
                Some(slices) => {
                    slices.insert(id, new);
                }
                None => {
                    self.slices.insert(new.service.clone(), BTreeMap::from([(id, new)]));
                }
            }
        }
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services.values().flatten()
    }

    pub fn service(&self, id: &NamespacedName) -> Option<&ServiceRecord> {
        self.services.get(id).and_then(Option::as_ref)
    }

    pub fn slices(&self) -> impl Iterator<Item = &SliceRecord> {
        let services = self.slice_services.iter().filter_map(|(id, service)| Some((id, service.as_ref()?)));
        services.filter_map(|(id, service)| self.slices.get(service)?.get(id))
    }

    /// The slices of Service `id`, in slice name order.
    pub fn service_slices(&self, id: &NamespacedName) -> impl Iterator<Item = &SliceRecord> {
        self.slices.get(id).into_iter().flat_map(BTreeMap::values)
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// The Services whose Service object or slices changed since the last call: the ones
    /// whose part of the desired state must be recomputed.
    pub fn take_changed_services(&mut self) -> BTreeSet<NamespacedName> {
        std::mem::take(&mut self.changed_services)
    }
}

/// The store key of an object, if it has a name: lets a source keep the last good version
/// of an object it could not validate.
pub fn object_key(object: &Object) -> Option<ObjectKey> {
    let meta = object.metadata();
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let id = NamespacedName { namespace, name };
    Some(match object {
        Object::Service(_) => ObjectKey::Service(id),
        Object::EndpointSlice(_) => ObjectKey::EndpointSlice(id),
        Object::Node(_) => ObjectKey::Node(id.name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse_str;

    /// The one object of a YAML document.
    fn object(yaml: &str) -> Object {
        let mut parsed = parse_str(yaml).unwrap();
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(parsed.objects.len(), 1, "{yaml}");
        parsed.objects.remove(0)
    }

    /// A Service named `name` in `default` with the given flow-style spec.
    fn svc(name: &str, spec: &str) -> Object {
        object(&format!("kind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n"))
    }

    fn service_record(obj: &Object) -> Result<Option<ServiceRecord>, InvalidField> {
        let Object::Service(s) = obj else { panic!("not a Service") };
        ServiceRecord::from_object(s, &NODE_PORT_RANGE_DEFAULT)
    }

    fn slice(body: &str) -> Object {
        object(&format!("kind: EndpointSlice\n{body}"))
    }

    fn slice_record(obj: &Object) -> Result<Option<SliceRecord>, InvalidField> {
        let Object::EndpointSlice(s) = obj else { panic!("not an EndpointSlice") };
        SliceRecord::from_object(s)
    }

    fn node_record(yaml: &str) -> Result<NodeRecord, InvalidField> {
        let Object::Node(n) = object(yaml) else { panic!("not a Node") };
        NodeRecord::from_object(&n)
    }

    fn field_err<T: fmt::Debug>(r: Result<T, InvalidField>) -> String {
        r.expect_err("expected a validation error").field
    }

    fn nn(namespace: &str, name: &str) -> NamespacedName {
        NamespacedName { namespace: namespace.into(), name: name.into() }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn service_becomes_record_with_default_protocol_and_name() {
        let obj = svc("web", "{type: NodePort, clusterIP: 10.96.0.10, ports: [{name: http, port: 80, nodePort: 30080}, {port: 53, protocol: UDP}]}");
        assert_eq!(
            service_record(&obj).unwrap(),
            Some(ServiceRecord {
                id: nn("default", "web"),
                cluster_ip: ip("10.96.0.10"),
                ports: vec![
                    ServicePort {
                        name: "http".into(),
                        protocol: Protocol::Tcp,
                        port: 80,
                        node_port: Some(30080)
                    },
                    ServicePort { name: "".into(), protocol: Protocol::Udp, port: 53, node_port: None },
                ],
                external_ips: vec![],
                lb_ips: vec![],
                source_ranges: vec![],
                external_policy_local: false,
                internal_policy_local: false,
                affinity_timeout_s: None,
                health_check_node_port: None,
            })
        );
    }

    /// A LoadBalancer Service `web` with `spec_extra` added to its spec and the given
    /// flow-style `status.loadBalancer.ingress` list.
    fn lb_svc(spec_extra: &str, ingress: &str) -> Object {
        object(&format!(
            "kind: Service\nmetadata: {{name: web}}\nspec: {{type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{{port: 80, nodePort: 30080}}]{spec_extra}}}\nstatus: {{loadBalancer: {{ingress: {ingress}}}}}\n"
        ))
    }

    fn lb_record(spec_extra: &str, ingress: &str) -> ServiceRecord {
        service_record(&lb_svc(spec_extra, ingress)).unwrap().unwrap()
    }

    #[test]
    fn external_ips_are_the_ipv4_ones_and_a_bad_one_is_rejected_with_its_index() {
        let record = |ips: &str| {
            service_record(&svc(
                "web",
                &format!("{{clusterIP: 10.96.0.10, externalIPs: {ips}, ports: [{{port: 80}}]}}"),
            ))
        };
        assert_eq!(
            record("[203.0.113.7, '2001:db8::7', 203.0.113.8]").unwrap().unwrap().external_ips,
            vec![ip("203.0.113.7"), ip("203.0.113.8")]
        );
        assert_eq!(
            record("[203.0.113.7, 203.0.113.300]").unwrap_err(),
            InvalidField {
                field: "spec.externalIPs[1]".into(),
                reason: "\"203.0.113.300\" is not an IP address".into()
            }
        );
    }

    #[test]
    fn lb_ips_are_the_ipv4_vip_mode_ingress_ips_of_a_load_balancer() {
        let ingress = "[{ip: 203.0.113.1}, {ip: 203.0.113.2, ipMode: VIP}, {ip: 203.0.113.3, ipMode: Proxy}, {hostname: lb.example.com}, {ip: '2001:db8::1'}]";
        assert_eq!(lb_record("", ingress).lb_ips, vec![ip("203.0.113.1"), ip("203.0.113.2")]);
        let no_status = svc("web", "{type: LoadBalancer, clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        assert_eq!(service_record(&no_status).unwrap().unwrap().lb_ips, Vec::<Ipv4Addr>::new());
        assert_eq!(
            field_err(service_record(&lb_svc("", "[{ip: 203.0.113.1}, {ip: lb.example.com}]"))),
            "status.loadBalancer.ingress[1].ip"
        );
    }

    #[test]
    fn ingress_ips_and_source_ranges_of_other_types_are_ignored_unvalidated() {
        let obj = object(
            "kind: Service\nmetadata: {name: web}\nspec: {type: NodePort, clusterIP: 10.96.0.10, loadBalancerSourceRanges: [bad], ports: [{port: 80}]}\nstatus: {loadBalancer: {ingress: [{ip: 203.0.113.1}]}}\n",
        );
        let record = service_record(&obj).unwrap().unwrap();
        assert_eq!((record.lb_ips, record.source_ranges), (vec![], vec![]));
    }

    #[test]
    fn source_ranges_are_normalised_to_the_network_address_and_ipv6_ranges_left_out() {
        let record = lb_record(
            ", loadBalancerSourceRanges: [10.1.2.3/8, ' 198.18.0.100/32 ', '2001:db8::/32', 192.168.1.77/0, 172.16.5.4/22]",
            "[]",
        );
        assert_eq!(
            record.source_ranges,
            vec![(ip("10.0.0.0"), 8), (ip("198.18.0.100"), 32), (ip("0.0.0.0"), 0), (ip("172.16.4.0"), 22)]
        );
    }

    #[test]
    fn bad_source_range_is_rejected_with_its_index() {
        for bad in ["10.0.0.0", "10.0.0.0/33", "10.0.0.0/x", "10.0.0/8", "/8", "10.0.0.0/-1"] {
            let spec_extra = format!(", loadBalancerSourceRanges: [10.0.0.0/8, '{bad}']");
            assert_eq!(
                service_record(&lb_svc(&spec_extra, "[]")).unwrap_err(),
                InvalidField {
                    field: "spec.loadBalancerSourceRanges[1]".into(),
                    reason: format!("{bad:?} is not a CIDR (address/prefix length)")
                }
            );
        }
    }

    #[test]
    fn traffic_policies_are_local_only_when_set_to_local() {
        let policies = |extra: &str| {
            let r = lb_record(extra, "[]");
            (r.external_policy_local, r.internal_policy_local)
        };
        assert_eq!(policies(""), (false, false));
        assert_eq!(
            policies(", externalTrafficPolicy: Cluster, internalTrafficPolicy: Cluster"),
            (false, false)
        );
        assert_eq!(policies(", externalTrafficPolicy: Local"), (true, false));
        assert_eq!(policies(", internalTrafficPolicy: Local"), (false, true));
    }

    #[test]
    fn client_ip_affinity_timeout_defaults_to_10800_and_must_be_1_to_86400() {
        let timeout = |extra: &str| {
            service_record(&svc("web", &format!("{{clusterIP: 10.96.0.10, ports: [{{port: 80}}]{extra}}}")))
                .map(|r| r.unwrap().affinity_timeout_s)
        };
        assert_eq!(timeout(""), Ok(None));
        assert_eq!(timeout(", sessionAffinity: None"), Ok(None));
        assert_eq!(timeout(", sessionAffinity: ClientIP"), Ok(Some(10_800)));
        assert_eq!(
            timeout(", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {}}"),
            Ok(Some(10_800))
        );
        let with = |s: i64| {
            format!(
                ", sessionAffinity: ClientIP, sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {s}}}}}"
            )
        };
        assert_eq!(timeout(&with(1)), Ok(Some(1)));
        assert_eq!(timeout(&with(86_400)), Ok(Some(86_400)));
        for bad in [0, -1, 86_401] {
            assert_eq!(
                timeout(&with(bad)),
                Err(InvalidField {
                    field: "spec.sessionAffinityConfig.clientIP.timeoutSeconds".into(),
                    reason: format!("{bad} is not in 1-86400")
                })
            );
        }
        // Without ClientIP affinity the config does not count.
        assert_eq!(timeout(&with(0).replace("ClientIP,", "None,")), Ok(None));
    }

    #[test]
    fn node_port_is_ignored_unless_type_is_node_port_or_load_balancer() {
        let ports = "ports: [{port: 80, nodePort: 30080}]";
        let node_port = |ty: &str| {
            service_record(&svc("web", &format!("{{type: {ty}, clusterIP: 10.96.0.10, {ports}}}")))
                .unwrap()
                .unwrap()
                .ports[0]
                .node_port
        };
        assert_eq!(node_port("ClusterIP"), None);
        assert_eq!(node_port("NodePort"), Some(30080));
        assert_eq!(node_port("LoadBalancer"), Some(30080));
        // A nodePort that does not count is not validated either.
        let ignored = svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 0}]}");
        assert_eq!(service_record(&ignored).unwrap().unwrap().ports[0].node_port, None);
    }

    #[test]
    fn invalid_cluster_ip_is_rejected_with_field_spec_cluster_ip() {
        let err = service_record(&svc("web", "{clusterIP: 10.0.0.300, ports: [{port: 80}]}")).unwrap_err();
        assert_eq!(
            err,
            InvalidField {
                field: "spec.clusterIP".into(),
                reason: "\"10.0.0.300\" is not an IP address".into()
            }
        );
        assert_eq!(
            field_err(service_record(&svc("web", "{clusterIP: kiada, ports: [{port: 80}]}"))),
            "spec.clusterIP"
        );
    }

    #[test]
    fn port_zero_or_above_65535_is_rejected_with_its_index() {
        let err = service_record(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80}, {port: 0}]}"))
            .unwrap_err();
        assert_eq!(
            err,
            InvalidField { field: "spec.ports[1].port".into(), reason: "0 is not a port (1-65535)".into() }
        );
        assert_eq!(
            field_err(service_record(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 70000}]}"))),
            "spec.ports[0].port"
        );
        assert_eq!(
            field_err(service_record(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: -1}]}"))),
            "spec.ports[0].port"
        );
        let max =
            service_record(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 65535}]}")).unwrap().unwrap();
        assert_eq!(max.ports[0].port, 65535);
    }

    #[test]
    fn invalid_node_port_is_rejected_with_field_node_port() {
        for bad in [0, 70000, -5] {
            let obj = svc("web", &format!("{{type: NodePort, clusterIP: 10.96.0.10, ports: [{{port: 80, nodePort: 30080}}, {{port: 81, nodePort: {bad}}}]}}"));
            assert_eq!(
                service_record(&obj).unwrap_err(),
                InvalidField {
                    field: "spec.ports[1].nodePort".into(),
                    reason: format!("{bad} is not a port (1-65535)")
                }
            );
        }
    }

    #[test]
    fn sctp_ports_are_left_out_and_unknown_protocols_rejected() {
        let obj = svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80, protocol: SCTP}, {port: 81}]}");
        let record = service_record(&obj).unwrap().unwrap();
        assert_eq!(record.ports.iter().map(|p| p.port).collect::<Vec<_>>(), vec![81]);
        let obj = svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80, protocol: QUIC}]}");
        assert_eq!(
            service_record(&obj).unwrap_err(),
            InvalidField {
                field: "spec.ports[0].protocol".into(),
                reason: "protocol \"QUIC\" is not one of TCP, UDP, SCTP".into()
            }
        );
    }

    #[test]
    fn ipv4_cluster_ip_is_taken_from_cluster_ips_and_ipv6_only_services_are_skipped() {
        let dual =
            svc("dual", "{clusterIP: fd00::10, clusterIPs: [fd00::10, 10.96.0.12], ports: [{port: 80}]}");
        assert_eq!(service_record(&dual).unwrap().unwrap().cluster_ip, Ipv4Addr::new(10, 96, 0, 12));
        let v6 = svc("v6", "{clusterIP: fd00::10, ports: [{port: 80}]}");
        assert_eq!(service_record(&v6).unwrap(), None);
        let bad = svc("bad", "{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1x], ports: [{port: 80}]}");
        assert_eq!(field_err(service_record(&bad)), "spec.clusterIPs[0]");
    }

    #[test]
    fn ipv4_addresses_with_leading_zeros_are_decimal_as_kube_proxy_reads_them() {
        let cases = [
            ("010.001.002.003", Some(Ipv4Addr::new(10, 1, 2, 3))),
            ("198.019.000.010", Some(Ipv4Addr::new(198, 19, 0, 10))),
            ("0000255.0.0.0", Some(Ipv4Addr::new(255, 0, 0, 0))),
            ("10.1.2.3", Some(Ipv4Addr::new(10, 1, 2, 3))),
            ("10.1.2.256", None),
            ("10.1.2", None),
            ("10.1.2.3.4", None),
            ("10..2.3", None),
            ("+1.1.2.3", None),
            ("0x0a.1.2.3", None),
            ("fd00::10", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_ipv4_sloppy(text), want, "{text}");
        }
        let zeros = svc("zeros", "{clusterIP: 010.096.000.012, ports: [{port: 80}]}");
        assert_eq!(service_record(&zeros).unwrap().unwrap().cluster_ip, Ipv4Addr::new(10, 96, 0, 12));
    }

    #[test]
    fn service_without_name_or_spec_is_rejected() {
        let unnamed = object("kind: Service\nspec: {clusterIP: 10.96.0.10}\n");
        assert_eq!(field_err(service_record(&unnamed)), "metadata.name");
        assert_eq!(field_err(service_record(&object("kind: Service\nmetadata: {name: web}\n"))), "spec");
    }

    #[test]
    fn headless_external_name_and_other_proxy_services_are_skipped() {
        let headless = svc("headless", "{clusterIP: None, ports: [{port: 80}]}");
        let no_ip = svc("no-ip", "{ports: [{port: 80}]}");
        let external = svc("ext", "{type: ExternalName, externalName: example.com, clusterIP: 10.0.0.300}");
        let other_proxy = object(
            "kind: Service\nmetadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: cilium}}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}\n",
        );
        // kube-proxy's Service informer filters on the headless label as well as on
        // service-proxy-name (cmd/kube-proxy/app/server.go: one selector for Services and
        // EndpointSlices), whatever the clusterIP; the EndpointSlice controller does not copy
        // this label from the Service to its slices, so only the Service shows it.
        let labelled_headless = object(
            "kind: Service\nmetadata: {name: labelled, labels: {service.kubernetes.io/headless: ''}}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}\n",
        );
        let mut store = Store::default();
        for obj in [&headless, &no_ip, &external, &other_proxy, &labelled_headless] {
            assert_eq!(service_record(obj).unwrap(), None, "{}", obj.describe());
            store.apply(obj, "test").unwrap();
        }
        assert_eq!(store.services().count(), 0);
    }

    #[test]
    fn skipped_version_replaces_a_programmed_service() {
        let mut store = Store::default();
        store.apply(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80}]}"), "a").unwrap();
        assert_eq!(store.services().count(), 1);
        store.apply(&svc("web", "{clusterIP: None, ports: [{port: 80}]}"), "a").unwrap();
        assert_eq!(store.services().count(), 0);
    }

    const SLICE_META: &str =
        "metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}\n";

    #[test]
    fn slice_becomes_record_of_its_service_with_condition_defaults() {
        let obj = slice(&format!(
            "{SLICE_META}addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: dns, port: 53, protocol: UDP}}, {{name: all}}]
endpoints:
- addresses: [10.244.1.1]
  nodeName: node-a
- addresses: [10.244.1.2]
  conditions: {{}}
- addresses: [10.244.1.3]
  conditions: {{ready: false, serving: true, terminating: true}}
- addresses: [10.244.1.4]
  conditions: {{ready: false}}
"
        ));
        let ep = |addr: &str, node: Option<&str>, ready, serving, terminating| Endpoint {
            addr: ip(addr),
            node_name: node.map(str::to_string),
            ready,
            serving,
            terminating,
            zone_hints: vec![],
            node_hints: vec![],
        };
        assert_eq!(
            slice_record(&obj).unwrap(),
            Some(SliceRecord {
                id: nn("shop", "web-1"),
                service: nn("shop", "web"),
                ports: vec![
                    SlicePort { name: "http".into(), protocol: Protocol::Tcp, port: 8080 },
                    SlicePort { name: "dns".into(), protocol: Protocol::Udp, port: 53 },
                ],
                endpoints: vec![
                    ep("10.244.1.1", Some("node-a"), true, true, false),
                    ep("10.244.1.2", None, true, true, false),
                    ep("10.244.1.3", None, false, true, true),
                    ep("10.244.1.4", None, false, true, false),
                ],
            })
        );
    }

    #[test]
    fn ipv6_and_headless_slices_are_skipped() {
        let ipv6 =
            slice(&format!("{SLICE_META}addressType: IPv6\nendpoints: [{{addresses: ['fd00::1']}}]\n"));
        assert_eq!(slice_record(&ipv6).unwrap(), None);
        let headless = slice(
            "metadata: {name: db-1, labels: {kubernetes.io/service-name: db, service.kubernetes.io/headless: ''}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.1.1]}]\n",
        );
        assert_eq!(slice_record(&headless).unwrap(), None);
        let mut store = Store::default();
        store.apply(&ipv6, "test").unwrap();
        store.apply(&headless, "test").unwrap();
        assert_eq!(store.slices().count(), 0);
    }

    #[test]
    fn slice_without_service_name_label_is_rejected() {
        let obj = slice("metadata: {name: web-1, labels: {app: web}}\naddressType: IPv4\nendpoints: []\n");
        assert_eq!(
            slice_record(&obj).unwrap_err(),
            InvalidField {
                field: "metadata.labels[kubernetes.io/service-name]".into(),
                reason: "missing".into()
            }
        );
    }

    #[test]
    fn slice_with_bad_address_or_port_is_rejected_with_its_index() {
        let bad_addr = slice(&format!("{SLICE_META}addressType: IPv4\nendpoints: [{{addresses: [10.244.1.1]}}, {{addresses: [10.244.1.256]}}]\n"));
        assert_eq!(field_err(slice_record(&bad_addr)), "endpoints[1].addresses[0]");
        let no_addr = slice(&format!("{SLICE_META}addressType: IPv4\nendpoints: [{{addresses: []}}]\n"));
        assert_eq!(
            slice_record(&no_addr).unwrap_err(),
            InvalidField { field: "endpoints[0].addresses[0]".into(), reason: "missing".into() }
        );
        let bad_port = slice(&format!(
            "{SLICE_META}addressType: IPv4\nports: [{{port: 80}}, {{port: 0}}]\nendpoints: []\n"
        ));
        assert_eq!(field_err(slice_record(&bad_port)), "ports[1].port");
    }

    #[test]
    fn node_internal_ip_is_the_first_ipv4_internal_address() {
        let node = |addresses: &str| {
            node_record(&format!(
                "kind: Node\nmetadata: {{name: node-a}}\nstatus: {{addresses: {addresses}}}\n"
            ))
        };
        let internal_ip = |addresses: &str| node(addresses).unwrap().internal_ip;
        assert_eq!(
            node("[{type: ExternalIP, address: 203.0.113.1}, {type: InternalIP, address: 'fd00::1'}, {type: InternalIP, address: 192.168.1.10}]"),
            Ok(NodeRecord { name: "node-a".into(), internal_ip: Some(ip("192.168.1.10")), zone: None, deleting: false })
        );
        assert_eq!(
            internal_ip(
                "[{type: InternalIP, address: 192.168.1.10}, {type: InternalIP, address: 192.168.1.11}]"
            ),
            Some(ip("192.168.1.10"))
        );
        assert_eq!(internal_ip("[{type: Hostname, address: node-a}]"), None);
        assert_eq!(node_record("kind: Node\nmetadata: {name: node-a}\n").unwrap().internal_ip, None);
        assert_eq!(
            field_err(node("[{type: Hostname, address: node-a}, {type: InternalIP, address: node-a.local}]")),
            "status.addresses[1].address"
        );
    }

    #[test]
    fn rejected_display_names_origin_object_and_field() {
        let mut store = Store::default();
        let err = store.apply(&svc("web", "{clusterIP: 10.0.0.300}"), "manifests/web.yaml").unwrap_err();
        assert_eq!(err.origin, "manifests/web.yaml");
        assert_eq!(err.object, "Service default/web");
        assert_eq!(err.error.field, "spec.clusterIP");
        assert_eq!(
            err.to_string(),
            "manifests/web.yaml: Service default/web: spec.clusterIP: \"10.0.0.300\" is not an IP address"
        );
    }

    #[test]
    fn apply_of_a_rejected_version_keeps_the_previous_one() {
        let mut store = Store::default();
        store.apply(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80}]}"), "a").unwrap();
        store.apply(&svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 0}]}"), "a").unwrap_err();
        let ports: Vec<u16> = store.services().flat_map(|s| s.ports.iter().map(|p| p.port)).collect();
        assert_eq!(ports, vec![80]);
        store.delete(&ObjectKey::Service(nn("default", "web")));
        assert_eq!(store.services().count(), 0);
    }

    fn cluster_ips(store: &Store) -> Vec<(String, Ipv4Addr)> {
        store.services().map(|s| (s.id.to_string(), s.cluster_ip)).collect()
    }

    #[test]
    fn replace_all_keeps_previous_good_version_of_rejected_and_unreadable_objects_and_deletes_unlisted_ones()
    {
        let good = |name: &str, ip: &str| svc(name, &format!("{{clusterIP: {ip}, ports: [{{port: 80}}]}}"));
        let mut store = Store::default();
        let first =
            [good("a", "10.96.0.1"), good("b", "10.96.0.2"), good("c", "10.96.0.3"), good("d", "10.96.0.4")];
        assert_eq!(store.replace_all(first.iter().map(|o| (o, "first.yaml")), []).len(), 0);
        assert_eq!(cluster_ips(&store).len(), 4);

        // a: updated; b: rejected (keeps 10.96.0.2); c: unreadable (keeps 10.96.0.3); d: gone;
        // e: new and rejected (nothing to keep).
        let second =
            [good("a", "10.96.0.11"), svc("b", "{clusterIP: 10.0.0.300}"), svc("e", "{clusterIP: bad}")];
        let rejected = store
            .replace_all(second.iter().map(|o| (o, "second.yaml")), [ObjectKey::Service(nn("default", "c"))]);
        let rejected: Vec<String> =
            rejected.iter().map(|r| format!("{} {}", r.object, r.error.field)).collect();
        assert_eq!(rejected, vec!["Service default/b spec.clusterIP", "Service default/e spec.clusterIP"]);
        assert_eq!(
            cluster_ips(&store),
            vec![
                ("default/a".to_string(), ip("10.96.0.11")),
                ("default/b".to_string(), ip("10.96.0.2")),
                ("default/c".to_string(), ip("10.96.0.3")),
            ]
        );

        // Nothing listed, nothing unreadable: the store empties.
        assert_eq!(store.replace_all(std::iter::empty(), []).len(), 0);
        assert_eq!(cluster_ips(&store), vec![]);
    }

    #[test]
    fn object_key_and_describe_default_the_namespace() {
        let obj = svc("web", "{clusterIP: 10.96.0.10}");
        assert_eq!(object_key(&obj), Some(ObjectKey::Service(nn("default", "web"))));
        assert_eq!(obj.describe(), "Service default/web");
        let node = object("kind: Node\nmetadata: {name: node-a, namespace: ignored}\n");
        assert_eq!(object_key(&node), Some(ObjectKey::Node("node-a".into())));
        assert_eq!(node.describe(), "Node node-a");
        let unnamed =
            object("kind: EndpointSlice\nmetadata: {namespace: shop}\naddressType: IPv4\nendpoints: []\n");
        assert_eq!(object_key(&unnamed), None);
        assert_eq!(unnamed.describe(), "EndpointSlice shop/<unnamed>");
    }

    #[test]
    fn node_port_outside_the_node_port_range_is_rejected_with_field_node_port() {
        let record = |np: i32| {
            service_record(&svc(
                "web",
                &format!("{{type: NodePort, clusterIP: 10.96.0.10, ports: [{{port: 80, nodePort: 30080}}, {{port: 81, nodePort: {np}}}]}}"),
            ))
        };
        for bad in [80, 29_999, 32_768] {
            assert_eq!(
                record(bad).unwrap_err(),
                InvalidField {
                    field: "spec.ports[1].nodePort".into(),
                    reason: format!("{bad} is outside the node port range 30000-32767")
                }
            );
        }
        for good in [30_000, 32_767] {
            assert_eq!(record(good).unwrap().unwrap().ports[1].node_port, Some(good as u16));
        }
    }

    #[test]
    fn store_validates_node_ports_and_health_check_node_ports_against_its_own_range() {
        let mut store = Store::new(20_000..=20_100);
        let node_port = |np: u16| {
            svc(
                "web",
                &format!("{{type: NodePort, clusterIP: 10.96.0.10, ports: [{{port: 80, nodePort: {np}}}]}}"),
            )
        };
        store.apply(&node_port(20_050), "a").unwrap();
        assert_eq!(store.services().next().unwrap().ports[0].node_port, Some(20_050));
        let err = store.apply(&node_port(30_080), "a").unwrap_err();
        assert_eq!(
            err.error,
            InvalidField {
                field: "spec.ports[0].nodePort".into(),
                reason: "30080 is outside the node port range 20000-20100".into()
            }
        );
        // The rejected version leaves the good one in place.
        assert_eq!(store.services().next().unwrap().ports[0].node_port, Some(20_050));
        let hc =
            |port: u16| lb_svc(&format!(", externalTrafficPolicy: Local, healthCheckNodePort: {port}"), "[]");
        // lb_svc's nodePort 30080 is outside this store's range as well.
        assert_eq!(store.apply(&hc(20_001), "a").unwrap_err().error.field, "spec.ports[0].nodePort");
        let mut wide = Store::new(20_000..=32_767);
        wide.apply(&hc(20_001), "a").unwrap();
        assert_eq!(wide.services().next().unwrap().health_check_node_port, Some(20_001));
        assert_eq!(wide.apply(&hc(19_999), "a").unwrap_err().error.field, "spec.healthCheckNodePort");
    }

    #[test]
    fn health_check_node_port_is_read_only_for_a_load_balancer_with_external_traffic_policy_local() {
        let hc = |spec_extra: &str| lb_record(spec_extra, "[]").health_check_node_port;
        assert_eq!(hc(", externalTrafficPolicy: Local, healthCheckNodePort: 32000"), Some(32000));
        assert_eq!(hc(", externalTrafficPolicy: Cluster, healthCheckNodePort: 32000"), None);
        assert_eq!(hc(", externalTrafficPolicy: Local"), None);
        // An ignored healthCheckNodePort is not validated either.
        assert_eq!(hc(", healthCheckNodePort: 80"), None);
        let node_port = svc(
            "web",
            "{type: NodePort, clusterIP: 10.96.0.10, externalTrafficPolicy: Local, healthCheckNodePort: 80, ports: [{port: 80, nodePort: 30080}]}",
        );
        assert_eq!(service_record(&node_port).unwrap().unwrap().health_check_node_port, None);
    }

    #[test]
    fn health_check_node_port_outside_the_range_is_rejected_with_field_spec_health_check_node_port() {
        let with = |port: i32| {
            service_record(&lb_svc(
                &format!(", externalTrafficPolicy: Local, healthCheckNodePort: {port}"),
                "[]",
            ))
        };
        let field = "spec.healthCheckNodePort".to_string();
        assert_eq!(
            with(80).unwrap_err(),
            InvalidField {
                field: field.clone(),
                reason: "80 is outside the node port range 30000-32767".into()
            }
        );
        assert_eq!(
            with(0).unwrap_err(),
            InvalidField { field: field.clone(), reason: "0 is not a port (1-65535)".into() }
        );
        assert_eq!(
            with(70_000).unwrap_err(),
            InvalidField { field, reason: "70000 is not a port (1-65535)".into() }
        );
        assert_eq!(with(30_000).unwrap().unwrap().health_check_node_port, Some(30_000));
        assert_eq!(with(32_767).unwrap().unwrap().health_check_node_port, Some(32_767));
    }

    #[test]
    fn endpoint_hints_are_the_names_of_its_for_zones_and_for_nodes_hints() {
        let obj = slice(&format!(
            "{SLICE_META}addressType: IPv4
endpoints:
- addresses: [10.244.1.1]
  hints: {{forZones: [{{name: zone-a}}, {{name: zone-b}}]}}
- addresses: [10.244.1.2]
  hints: {{forZones: [], forNodes: []}}
- addresses: [10.244.1.3]
  hints: {{}}
- addresses: [10.244.1.4]
- addresses: [10.244.1.5]
  hints: {{forZones: [{{name: zone-a}}], forNodes: [{{name: node-a}}, {{name: node-b}}]}}
"
        ));
        let hints: Vec<(Vec<String>, Vec<String>)> = slice_record(&obj)
            .unwrap()
            .unwrap()
            .endpoints
            .into_iter()
            .map(|e| (e.zone_hints, e.node_hints))
            .collect();
        let names = |names: &[&str]| -> Vec<String> { names.iter().map(|n| n.to_string()).collect() };
        assert_eq!(
            hints,
            vec![
                (names(&["zone-a", "zone-b"]), vec![]),
                (vec![], vec![]),
                (vec![], vec![]),
                (vec![], vec![]),
                (names(&["zone-a"]), names(&["node-a", "node-b"])),
            ]
        );
    }

    #[test]
    fn node_zone_is_its_topology_zone_label_and_deleting_follows_its_deletion_timestamp() {
        let node = node_record(
            "kind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a, topology.kubernetes.io/region: eu}, deletionTimestamp: '2024-05-01T10:00:00Z'}\n",
        )
        .unwrap();
        assert_eq!(
            node,
            NodeRecord {
                name: "node-a".into(),
                internal_ip: None,
                zone: Some("zone-a".into()),
                deleting: true
            }
        );
        let plain =
            node_record("kind: Node\nmetadata: {name: node-a, labels: {kubernetes.io/os: linux}}\n").unwrap();
        assert_eq!((plain.zone, plain.deleting), (None, false));
    }

    /// A slice `name` of Service `default/web` with one endpoint at `addr`.
    fn web_slice(name: &str, addr: &str) -> Object {
        slice(&format!(
            "metadata: {{name: {name}, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{addr}]}}]\n"
        ))
    }

    fn slice_addrs(store: &Store) -> Vec<(String, Ipv4Addr)> {
        store.slices().flat_map(|s| s.endpoints.iter().map(|e| (s.id.name.clone(), e.addr))).collect()
    }

    #[test]
    fn replace_kind_replaces_only_the_objects_of_that_kind() {
        let mut store = Store::default();
        let first = [
            svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80}]}"),
            web_slice("web-1", "10.244.1.1"),
            web_slice("web-2", "10.244.1.2"),
            object("kind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n"),
        ];
        assert_eq!(store.replace_all(first.iter().map(|o| (o, "first")), []).len(), 0);

        // A re-list of EndpointSlices: web-1 changed, web-2 gone, web-3 new.
        let relist = [web_slice("web-1", "10.244.1.11"), web_slice("web-3", "10.244.1.3")];
        let rejected = store.replace_kind(Kind::EndpointSlice, relist.iter().map(|o| (o, "api")));
        assert_eq!(rejected.len(), 0);
        assert_eq!(
            slice_addrs(&store),
            vec![("web-1".to_string(), ip("10.244.1.11")), ("web-3".to_string(), ip("10.244.1.3"))]
        );
        assert_eq!(cluster_ips(&store), vec![("default/web".to_string(), ip("10.96.0.10"))]);
        assert_eq!(store.node("node-a").unwrap().zone.as_deref(), Some("zone-a"));

        // An empty listing of Services deletes the Services alone.
        assert_eq!(store.replace_kind(Kind::Service, std::iter::empty()).len(), 0);
        assert_eq!(cluster_ips(&store), vec![]);
        assert_eq!(slice_addrs(&store).len(), 2);
        assert!(store.node("node-a").is_some());
    }

    #[test]
    fn replace_kind_keeps_the_previous_version_of_a_rejected_listed_object_and_names_its_kind() {
        let mut store = Store::default();
        let first = [web_slice("web-1", "10.244.1.1"), web_slice("web-2", "10.244.1.2")];
        assert_eq!(store.replace_kind(Kind::EndpointSlice, first.iter().map(|o| (o, "api"))).len(), 0);

        // web-1 rejected (keeps its version), web-2 unlisted (deleted), web-4 new and rejected.
        let relist = [web_slice("web-1", "10.244.1.256"), web_slice("web-4", "bad")];
        let rejected = store.replace_kind(Kind::EndpointSlice, relist.iter().map(|o| (o, "api")));
        let rejected: Vec<(Kind, String, String)> =
            rejected.into_iter().map(|r| (r.kind, r.object, r.error.field)).collect();
        let field = "endpoints[0].addresses[0]".to_string();
        assert_eq!(
            rejected,
            vec![
                (Kind::EndpointSlice, "EndpointSlice default/web-1".into(), field.clone()),
                (Kind::EndpointSlice, "EndpointSlice default/web-4".into(), field),
            ]
        );
        assert_eq!(slice_addrs(&store), vec![("web-1".to_string(), ip("10.244.1.1"))]);
    }

    #[test]
    fn rejected_carries_the_kind_of_the_object() {
        let mut store = Store::default();
        let err = store.apply(&svc("web", "{clusterIP: 10.0.0.300}"), "a").unwrap_err();
        assert_eq!(err.kind, Kind::Service);
        let node = object(
            "kind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: x}]}\n",
        );
        let err = store.apply(&node, "a").unwrap_err();
        assert_eq!(err.kind, Kind::Node);
    }

    fn changed(store: &mut Store) -> Vec<String> {
        store.take_changed_services().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn store_notes_the_services_whose_service_or_slices_changed() {
        let mut store = Store::default();
        let web = svc("web", "{clusterIP: 10.96.0.10, ports: [{port: 80}]}");
        store.apply(&web, "a").unwrap();
        assert_eq!(changed(&mut store), vec!["default/web"]);
        assert_eq!(changed(&mut store), Vec::<String>::new());
        // The same version again, a rejected one, a skipped one that was never programmed.
        store.apply(&web, "a").unwrap();
        store.apply(&svc("web", "{clusterIP: bad}"), "a").unwrap_err();
        store.apply(&svc("headless", "{clusterIP: None}"), "a").unwrap();
        assert_eq!(changed(&mut store), Vec::<String>::new());

        store.apply(&web_slice("web-1", "10.244.1.1"), "a").unwrap();
        assert_eq!(changed(&mut store), vec!["default/web"]);
        // A slice moving to another Service changes both.
        let moved = slice("metadata: {name: web-1, labels: {kubernetes.io/service-name: api}}\naddressType: IPv4\nendpoints: []\n");
        store.apply(&moved, "a").unwrap();
        assert_eq!(changed(&mut store), vec!["default/api", "default/web"]);
        assert_eq!(store.service_slices(&nn("default", "web")).count(), 0);
        assert_eq!(store.service_slices(&nn("default", "api")).count(), 1);

        // A full listing of what is there changes nothing; deleting does.
        let all = [web.clone(), moved.clone()];
        assert_eq!(store.replace_all(all.iter().map(|o| (o, "a")), []).len(), 0);
        assert_eq!(changed(&mut store), Vec::<String>::new());
        store.replace_all(std::iter::once((&web, "a")), []);
        assert_eq!(changed(&mut store), vec!["default/api"]);
        store.delete(&ObjectKey::Service(nn("default", "web")));
        assert_eq!(changed(&mut store), vec!["default/web"]);
    }
}
