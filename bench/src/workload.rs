//! The benchmark's Services: N NodePort Services with 3 endpoints each, as the Kubernetes
//! objects every mode is programmed from, and the per-port view the rule generators take.
//!
//! xlb reads the objects from the API server; the iptables and nftables generators read the
//! same objects through the agent's own model (`lb_userspace::model::Store`), so all modes
//! serve exactly the same Services.
use std::net::{Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_userspace::model::{NamespacedName, Object, Protocol, Store};
use serde_json::json;

/// Namespace of every benchmark Service.
pub const NAMESPACE: &str = "bench";
/// The port every Service exposes and every backend listens on.
pub const SERVICE_PORT: u16 = 80;
pub const BACKEND_PORT: u16 = 8080;
/// nodePorts are `NODE_PORT_BASE + i`: 10,000 Services need more than the default range.
pub const NODE_PORT_BASE: u16 = 20_000;
/// The node port range every mode is configured with (`--service-node-port-range`).
pub const NODE_PORT_RANGE: std::ops::RangeInclusive<u16> = 20_000..=32_767;
pub const ENDPOINTS_PER_SERVICE: usize = 3;

/// The benchmark's Service `i` (0-based) and its slice, with `backends` its endpoints.
pub fn service(i: usize, backends: &[Ipv4Addr]) -> (Service, EndpointSlice) {
    let name = service_name(i);
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "type": "NodePort",
            "clusterIP": cluster_ip(i).to_string(),
            "ports": [{"name": "http", "protocol": "TCP", "port": SERVICE_PORT,
                       "targetPort": BACKEND_PORT, "nodePort": node_port(i)}],
        },
    });
    let endpoints: Vec<_> = backends
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": BACKEND_PORT}],
        "endpoints": endpoints,
    });
    (
        serde_json::from_value(service).expect("a valid Service"),
        serde_json::from_value(slice).expect("a valid EndpointSlice"),
    )
}

/// `svc-00042`: names sort in creation order, so chain order is index order.
pub fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// ClusterIPs from 198.19.0.0/16, skipping .0 and .255 of every /24.
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    let n = i as u32;
    Ipv4Addr::new(198, 19, (n / 250) as u8, (n % 250 + 1) as u8)
}

pub fn node_port(i: usize) -> u16 {
    NODE_PORT_BASE + i as u16
}

/// The store the rule generators read: the objects of `services`, validated by the agent's
/// model with the benchmark's node port range.
pub fn store(services: &[(Service, EndpointSlice)]) -> Store {
    let mut store = Store::new(NODE_PORT_RANGE);
    for (service, slice) in services {
        for object in
            [Object::Service(Box::new(service.clone())), Object::EndpointSlice(Box::new(slice.clone()))]
        {
            store.apply(&object, "bench").expect("benchmark objects are valid");
        }
    }
    store
}

/// One Service port as kube-proxy programs it: the input of the rule generators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRules {
    pub service: NamespacedName,
    /// The port's name (`http`), "" for an unnamed port.
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints (address and target port), sorted; empty means REJECT.
    pub endpoints: Vec<SocketAddrV4>,
}

impl ServicePortRules {
    /// kube-proxy's ServicePortName string, `namespace/name:port` (`namespace/name` for an
    /// unnamed port), the input of its chain name hashes; xlb names Service ports the same way.
    pub fn service_port_name(&self) -> String {
        lb_userspace::model::service_port_name(&self.service, &self.port_name)
    }
}

/// Every Service port of `store`, in the order of the store (namespace, name, port), with
/// the ready endpoints of its slices whose port name matches.
pub fn service_ports(store: &Store) -> Vec<ServicePortRules> {
    let mut ports = Vec::new();
    for svc in store.services() {
        for port in &svc.ports {
            let mut endpoints: Vec<SocketAddrV4> = store
                .service_slices(&svc.id)
                .flat_map(|slice| {
                    let target =
                        slice.ports.iter().find(|p| p.name == port.name && p.protocol == port.protocol);
                    slice
                        .endpoints
                        .iter()
                        .filter(|e| e.ready)
                        .filter_map(move |e| target.map(|t| SocketAddrV4::new(e.addr, t.port)))
                })
                .collect();
            endpoints.sort();
            endpoints.dedup();
            ports.push(ServicePortRules {
                service: svc.id.clone(),
                port_name: port.name.clone(),
                protocol: port.protocol,
                cluster_ip: svc.cluster_ip,
                port: port.port,
                node_port: port.node_port,
                endpoints,
            });
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_become_ports_with_their_endpoints_in_name_order() {
        let backends =
            [Ipv4Addr::new(198, 18, 1, 11), Ipv4Addr::new(198, 18, 1, 10), Ipv4Addr::new(198, 18, 2, 10)];
        let objects: Vec<_> = (0..3).rev().map(|i| service(i, &backends)).collect();
        let ports = service_ports(&store(&objects));
        assert_eq!(ports.len(), 3);
        assert_eq!(ports[0].service.name, "svc-00000");
        assert_eq!(ports[2].cluster_ip, Ipv4Addr::new(198, 19, 0, 3));
        assert_eq!(ports[2].node_port, Some(20_002));
        assert_eq!(ports[0].service_port_name(), "bench/svc-00000:http");
        let unnamed = ServicePortRules { port_name: String::new(), ..ports[0].clone() };
        assert_eq!(unnamed.service_port_name(), "bench/svc-00000");
        assert_eq!(
            ports[0].endpoints,
            vec![
                SocketAddrV4::new(backends[1], BACKEND_PORT),
                SocketAddrV4::new(backends[0], BACKEND_PORT),
                SocketAddrV4::new(backends[2], BACKEND_PORT),
            ]
        );
    }

    #[test]
    fn cluster_ips_stay_distinct_and_in_range_for_ten_thousand_services() {
        let ips: std::collections::BTreeSet<_> = (0..10_000).map(cluster_ip).collect();
        assert_eq!(ips.len(), 10_000);
        assert!(ips.iter().all(|ip| ip.octets()[0..2] == [198, 19] && ip.octets()[3] != 0));
        assert!(node_port(9_999) <= *NODE_PORT_RANGE.end());
    }
}
