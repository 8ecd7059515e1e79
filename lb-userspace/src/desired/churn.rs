//! Tests only: a random but reproducible run of store and node changes that exercises
//! everything spreading across Services (shared NodePorts, ClusterIPs, LB IPs and health
//! check ports; slices moving between Services; zones, node addresses), for checking that
//! incremental updates agree with computing afresh.
use std::net::Ipv4Addr;

use super::NodeContext;
use crate::{
    manifests::parse_str,
    model::{NamespacedName, Object, ObjectKey, Store},
};

const SERVICES: usize = 5;
const SLICES: usize = 6;
static NODE_ADDRS: [&[Ipv4Addr]; 2] =
    [&[Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(192, 168, 1, 10)], &[Ipv4Addr::new(198, 18, 0, 1)]];

pub struct Churn {
    rng: u64,
    pub store: Store,
    addrs: &'static [Ipv4Addr],
}

impl Churn {
    pub fn new(seed: u64) -> Self {
        Self { rng: seed.max(1), store: Store::default(), addrs: NODE_ADDRS[0] }
    }

    /// The node the state is computed for: node-a with one of two address sets.
    pub fn node(&self) -> NodeContext<'static> {
        NodeContext {
            name: "node-a",
            addrs: self.addrs,
            default_snat_addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
        }
    }

    /// xorshift64: reproducible without a dependency.
    fn below(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }

    /// Makes one random change; says which.
    pub fn step(&mut self) -> String {
        match self.below(20) {
            0..=6 => {
                let (i, variant) = (self.below(SERVICES), self.below(6));
                self.apply(service(i, variant))
            }
            7 => {
                let i = self.below(SERVICES);
                self.delete(ObjectKey::Service(nn(&format!("svc{i}"))))
            }
            8..=15 => {
                let (i, service, endpoints, n) =
                    (self.below(SLICES), self.below(SERVICES), self.below(4), 1 + self.below(3));
                self.apply(slice(i, service, endpoints, n))
            }
            16 => {
                let i = self.below(SLICES);
                self.delete(ObjectKey::EndpointSlice(nn(&format!("slice{i}"))))
            }
            17..=18 => {
                let variant = self.below(3);
                self.apply(node(variant))
            }
            _ => {
                self.addrs = NODE_ADDRS[self.below(2)];
                format!("node addresses {:?}", self.addrs)
            }
        }
    }

    fn apply(&mut self, yaml: String) -> String {
        let objects = parse_str(&yaml).expect("churn YAML").objects;
        let object: &Object = &objects[0];
        self.store.apply(object, "churn").expect("churn objects are valid");
        yaml
    }

    fn delete(&mut self, key: ObjectKey) -> String {
        self.store.delete(&key);
        format!("delete {key:?}")
    }
}

fn nn(name: &str) -> NamespacedName {
    NamespacedName { namespace: "default".into(), name: name.into() }
}

/// Service `svc{i}` in one of its variants; several share NodePorts, a ClusterIP, LB and
/// external IPs, and a health check port.
fn service(i: usize, variant: usize) -> String {
    let (spec, status) = match variant {
        0 => (format!("{{clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80}}]}}", i + 1), String::new()),
        1 => (
            format!("{{type: NodePort, clusterIP: 10.96.0.{}, ports: [{{name: http, port: 80, nodePort: 30080}}, {{name: dns, port: 53, protocol: UDP, nodePort: 30053}}]}}", i + 1),
            String::new(),
        ),
        // 203.0.113.1 is an external IP and an LB IP at once: the Service conflicts with itself.
        2 => (
            format!("{{type: LoadBalancer, clusterIP: 10.96.0.{}, externalTrafficPolicy: Local, healthCheckNodePort: 32000, externalIPs: [203.0.113.9, 203.0.113.1], loadBalancerSourceRanges: [10.0.0.0/8, 192.168.{i}.0/24], ports: [{{name: http, port: 80, nodePort: {}}}]}}", i + 1, 30090 + i),
            format!("status: {{loadBalancer: {{ingress: [{{ip: 203.0.113.1}}, {{ip: 203.0.113.{}}}]}}}}\n", 10 + i),
        ),
        3 => (
            format!("{{clusterIP: 10.96.0.{}, internalTrafficPolicy: Local, sessionAffinity: ClientIP, ports: [{{name: http, port: 80}}]}}", i + 1),
            String::new(),
        ),
        4 => ("{clusterIP: 10.96.0.100, ports: [{name: http, port: 80}]}".to_string(), String::new()),
        _ => ("{clusterIP: None, ports: [{port: 80}]}".to_string(), String::new()),
    };
    format!("kind: Service\nmetadata: {{name: svc{i}}}\nspec: {spec}\n{status}")
}

/// Slice `slice{i}` of Service `svc{service}` with endpoints in one of four shapes, their
/// addresses varied by `n`.
fn slice(i: usize, service: usize, endpoints: usize, n: usize) -> String {
    let endpoints = match endpoints {
        0 => format!("[{{addresses: [10.244.1.{n}], nodeName: node-a}}, {{addresses: [10.244.2.{n}], nodeName: node-b}}]"),
        1 => format!("[{{addresses: [10.244.1.{n}], nodeName: node-a, conditions: {{ready: false, serving: true, terminating: true}}}}]"),
        2 => format!("[{{addresses: [10.244.3.{n}], nodeName: node-c, hints: {{forZones: [{{name: zone-a}}]}}}}, {{addresses: [10.244.2.{n}], nodeName: node-b, hints: {{forZones: [{{name: zone-b}}]}}}}]"),
        _ => "[]".to_string(),
    };
    format!(
        "kind: EndpointSlice\nmetadata: {{name: slice{i}, labels: {{kubernetes.io/service-name: svc{service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints: {endpoints}\n"
    )
}

/// Node node-a in a zone or not, with an InternalIP or not.
fn node(variant: usize) -> String {
    match variant {
        0 => "kind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.7}]}\n".to_string(),
        1 => "kind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 10.0.0.7}]}\n".to_string(),
        _ => "kind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-b}}\n".to_string(),
    }
}
