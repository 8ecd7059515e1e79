//! Validated records of the objects xlb acts on, and the `Store` that holds the last good
//! version of each. Validation happens once, here, for every source.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lb_common::proto;

/// Label that hands a Service to another proxy (kube-proxy skips such Services too).
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label on EndpointSlices of headless Services.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label joining an EndpointSlice to its Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

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
    fn parse(value: Option<&str>, field: &str) -> Result<Self, InvalidField> {
        match value.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            other => Err(invalid(field, format!("protocol {other:?} is not supported (TCP, UDP)"))),
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

fn ipv4(value: &str, field: &str) -> Result<Ipv4Addr, InvalidField> {
    value.parse().map_err(|_| invalid(field, format!("{value:?} is not an IPv4 address")))
}

fn port(value: i32, field: &str) -> Result<u16, InvalidField> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(field, format!("{value} is not a port (1-65535)"))),
    }
}

fn namespaced(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Result<NamespacedName, InvalidField> {
    let name = meta.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| invalid("metadata.name", "missing"))?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    Ok(NamespacedName { namespace, name })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// The port's name; EndpointSlice ports match on (name, protocol).
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service xlb programs. Headless, ExternalName and other proxies' Services are not
/// represented: `ServiceRecord::from_object` returns `Ok(None)` for them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub id: NamespacedName,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
}

impl ServiceRecord {
    pub fn from_object(svc: &Service) -> Result<Option<Self>, InvalidField> {
        let id = namespaced(&svc.metadata)?;
        let labels = svc.metadata.labels.as_ref();
        if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
            return Ok(None);
        }
        let Some(spec) = svc.spec.as_ref() else {
            return Err(invalid("spec", "missing"));
        };
        let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
        if svc_type == "ExternalName" {
            return Ok(None);
        }
        let cluster_ip = match spec.cluster_ip.as_deref() {
            None | Some("") | Some("None") => return Ok(None),
            Some(ip) => ipv4(ip, "spec.clusterIP")?,
        };
        let with_node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
        let mut ports = Vec::new();
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            let node_port = match p.node_port {
                Some(np) if with_node_ports => Some(port(np, &field("nodePort"))?),
                _ => None,
            };
            ports.push(ServicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::parse(p.protocol.as_deref(), &field("protocol"))?,
                port: port(p.port, &field("port"))?,
                node_port,
            });
        }
        Ok(Some(Self { id, cluster_ip, ports }))
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
            ports.push(SlicePort {
                name: p.name.clone().unwrap_or_default(),
                protocol: Protocol::parse(p.protocol.as_deref(), &format!("ports[{i}].protocol"))?,
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
}

impl NodeRecord {
    pub fn from_object(node: &Node) -> Result<Self, InvalidField> {
        let name = node.metadata.name.clone().ok_or_else(|| invalid("metadata.name", "missing"))?;
        let mut internal_ip = None;
        let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
        for (i, a) in addresses.into_iter().flatten().enumerate() {
            if a.type_ == "InternalIP" && internal_ip.is_none() {
                // A dual-stack node lists an IPv6 InternalIP too; only IPv4 matters here.
                if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
                    internal_ip = Some(ip);
                } else if !a.address.contains(':') {
                    return Err(invalid(format!("status.addresses[{i}].address"), format!("{:?} is not an IP address", a.address)));
                }
            }
        }
        Ok(Self { name, internal_ip })
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
    /// "Service default/kiada", for messages. Tolerates objects without a name.
    pub fn describe(&self) -> String {
        let (kind, meta) = match self {
            Self::Service(o) => ("Service", &o.metadata),
            Self::EndpointSlice(o) => ("EndpointSlice", &o.metadata),
            Self::Node(o) => ("Node", &o.metadata),
        };
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

/// What a valid object contributes. `Skipped` objects (headless, other proxies...) are
/// still remembered so a later delete or replace knows them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Record {
    Service(ServiceRecord),
    EndpointSlice(SliceRecord),
    Node(NodeRecord),
    Skipped,
}

/// An object that failed validation, with enough to find it.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: {object}: {error}")]
pub struct Rejected {
    pub origin: String,
    pub object: String,
    pub error: InvalidField,
}

fn validate(object: &Object) -> Result<(ObjectKey, Record), InvalidField> {
    Ok(match object {
        Object::Service(svc) => {
            let key = ObjectKey::Service(namespaced(&svc.metadata)?);
            (key, ServiceRecord::from_object(svc)?.map_or(Record::Skipped, Record::Service))
        }
        Object::EndpointSlice(slice) => {
            let key = ObjectKey::EndpointSlice(namespaced(&slice.metadata)?);
            (key, SliceRecord::from_object(slice)?.map_or(Record::Skipped, Record::EndpointSlice))
        }
        Object::Node(node) => {
            let record = NodeRecord::from_object(node)?;
            (ObjectKey::Node(record.name.clone()), Record::Node(record))
        }
    })
}

/// The last good version of every object, fed by any source.
///
/// An invalid object is rejected and its previous good version, if any, stays: a bad edit
/// never takes a working Service down.
#[derive(Default, Debug)]
pub struct Store {
    records: BTreeMap<ObjectKey, Record>,
}

impl Store {
    /// Adds or updates one object. `origin` says where it came from (a file, the API).
    pub fn apply(&mut self, object: &Object, origin: &str) -> Result<(), Rejected> {
        let (key, record) = validate(object).map_err(|error| Rejected {
            origin: origin.to_string(),
            object: object.describe(),
            error,
        })?;
        self.records.insert(key, record);
        Ok(())
    }

    pub fn delete(&mut self, key: &ObjectKey) {
        self.records.remove(key);
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
        let mut previous = std::mem::take(&mut self.records);
        let mut keep: Vec<ObjectKey> = unreadable.into_iter().collect();
        let mut rejected = Vec::new();
        for (object, origin) in objects {
            if let Err(e) = self.apply(object, origin) {
                keep.extend(object_key(object));
                rejected.push(e);
            }
        }
        for key in keep {
            if let (false, Some(record)) = (self.records.contains_key(&key), previous.remove(&key)) {
                self.records.insert(key, record);
            }
        }
        rejected
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.records.values().filter_map(|r| match r {
            Record::Service(s) => Some(s),
            _ => None,
        })
    }

    pub fn slices(&self) -> impl Iterator<Item = &SliceRecord> {
        self.records.values().filter_map(|r| match r {
            Record::EndpointSlice(s) => Some(s),
            _ => None,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodeRecord> {
        match self.records.get(&ObjectKey::Node(name.to_string())) {
            Some(Record::Node(n)) => Some(n),
            _ => None,
        }
    }
}

/// The store key of an object, if it has a name: lets a source keep the last good version
/// of an object it could not validate.
pub fn object_key(object: &Object) -> Option<ObjectKey> {
    let meta = match object {
        Object::Service(o) => &o.metadata,
        Object::EndpointSlice(o) => &o.metadata,
        Object::Node(o) => &o.metadata,
    };
    let name = meta.name.clone()?;
    let namespace = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let id = NamespacedName { namespace, name };
    Some(match object {
        Object::Service(_) => ObjectKey::Service(id),
        Object::EndpointSlice(_) => ObjectKey::EndpointSlice(id),
        Object::Node(_) => ObjectKey::Node(id.name),
    })
}
