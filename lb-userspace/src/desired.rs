//! Pure functions from the store to what one node's maps must hold. No I/O.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use lb_common::{
    backend::{Backend, BACKEND_F_LOCAL},
    service::{ServiceKey, SVC_F_EXTERNAL},
};

use crate::model::{Endpoint, NamespacedName, ServicePort, ServiceRecord, SliceRecord, Store};

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
            key.proto,
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
        let Some(target) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
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
