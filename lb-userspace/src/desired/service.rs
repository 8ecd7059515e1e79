//! What one Service asks of the node: a function of the Service, its slices and the node
//! alone, so a change recomputes only the Services it touches.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use lb_common::{
    backend::{Backend, BACKEND_F_LOCAL},
    service::{ServiceKey, SVC_F_NO_ENDPOINTS, SVC_F_SOURCE_RANGES},
};

use super::{group_name, Frontend, GroupName, NodeContext};
use crate::model::{Endpoint, NamespacedName, ServicePort, ServiceRecord, SliceRecord};

/// One Service's frontends, groups and health check, before they meet the other Services':
/// a frontend key or health check port claimed twice goes to the first claim (see
/// `Incremental`).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ServicePart {
    pub id: NamespacedName,
    /// In the order the Service claims them: port by port, the ClusterIP, the NodePorts, the
    /// external IPs, the LB IPs.
    pub frontends: Vec<(ServiceKey, Frontend)>,
    pub groups: BTreeMap<GroupName, Vec<Backend>>,
    /// The serving endpoints of each UDP port, by its Cluster group (`DesiredState::udp_serving`).
    pub udp_serving: BTreeMap<GroupName, BTreeSet<(Ipv4Addr, u16)>>,
    /// `loadBalancerSourceRanges`, for its frontends flagged `SVC_F_SOURCE_RANGES`.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// healthCheckNodePort and the count of this node's ready endpoint IPs.
    pub health_check: Option<(u16, usize)>,
}

impl ServicePart {
    pub fn new<'a>(
        svc: &ServiceRecord,
        slices: impl IntoIterator<Item = &'a SliceRecord>,
        node: &NodeContext,
        zone: Option<&str>,
    ) -> Self {
        let slices: Vec<&SliceRecord> = slices.into_iter().collect();
        let mut part = Self {
            id: svc.id.clone(),
            frontends: Vec::new(),
            groups: BTreeMap::new(),
            udp_serving: BTreeMap::new(),
            source_ranges: svc.source_ranges.clone(),
            health_check: None,
        };
        for port in &svc.ports {
            part.add_port(svc, port, &slices, node, zone);
        }
        part.health_check =
            svc.health_check_node_port.map(|hc_port| (hc_port, local_ready_ips(&slices, node.name)));
        part
    }

    /// The groups and frontends of one Service port.
    fn add_port(
        &mut self,
        svc: &ServiceRecord,
        port: &ServicePort,
        slices: &[&SliceRecord],
        node: &NodeContext,
        zone: Option<&str>,
    ) {
        let EndpointSets { cluster, local, serving } = endpoint_sets(slices, port, node.name, zone);
        let mut name = group_name(svc, port);
        let cluster_group = GroupName::from(name.as_str());
        name.push_str(" local");
        let local_group = GroupName::from(name);
        let policy_group = |local_policy: bool| if local_policy { &local_group } else { &cluster_group };
        // kube-proxy REJECTs only when the Service has no usable endpoint anywhere; an empty
        // Local group with endpoints elsewhere drops.
        let flags = if cluster.is_empty() { SVC_F_NO_ENDPOINTS } else { 0 };
        let frontend = |group: &GroupName, internal_group: &GroupName| Frontend {
            group: group.clone(),
            internal_group: internal_group.clone(),
            flags,
            affinity_timeout_s: svc.affinity_timeout_s.unwrap_or(0),
            service_port: cluster_group.clone(),
        };
        let proto = port.protocol.number();

        let internal = policy_group(svc.internal_policy_local);
        self.frontends
            .push((ServiceKey::new(svc.cluster_ip, port.port, proto), frontend(internal, internal)));

        // Pods and the node reaching an external address always get the Cluster group.
        let external = frontend(policy_group(svc.external_policy_local), &cluster_group);
        let node_ports = port
            .node_port
            .into_iter()
            .flat_map(|np| node.addrs.iter().map(move |a| ServiceKey::new(*a, np, proto)));
        let external_ips = svc.external_ips.iter().map(|ip| ServiceKey::new(*ip, port.port, proto));
        for key in node_ports.chain(external_ips) {
            self.frontends.push((key, external.clone()));
        }
        let ranges = if svc.source_ranges.is_empty() { 0 } else { SVC_F_SOURCE_RANGES };
        let lb = Frontend { flags: flags | ranges, ..external };
        for ip in &svc.lb_ips {
            self.frontends.push((ServiceKey::new(*ip, port.port, proto), lb.clone()));
        }

        let externally_accessible =
            port.node_port.is_some() || !svc.external_ips.is_empty() || !svc.lb_ips.is_empty();
        if svc.internal_policy_local || (svc.external_policy_local && externally_accessible) {
            self.groups.insert(local_group, local);
        }
        if proto == lb_common::proto::UDP {
            self.udp_serving.insert(cluster_group.clone(), serving);
        }
        self.groups.insert(cluster_group, cluster);
    }
}

/// kube-proxy's localEndpoints: the distinct IPs of this node's ready endpoints, over all
/// the Service's slices and ports.
fn local_ready_ips(slices: &[&SliceRecord], node_name: &str) -> usize {
    let local_ready: BTreeSet<Ipv4Addr> = slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|ep| ep.ready && ep.node_name.as_deref() == Some(node_name))
        .map(|ep| ep.addr)
        .collect();
    local_ready.len()
}

/// The endpoints of one Service port as kube-proxy categorises them (pkg/proxy/topology.go
/// `CategorizeEndpoints`).
struct EndpointSets {
    /// For Cluster traffic policy.
    cluster: Vec<Backend>,
    /// For Local traffic policy: the same choice among this node's endpoints.
    local: Vec<Backend>,
    /// Every serving endpoint (ready, or serving while terminating; kube-proxy's
    /// `IsServing`), whatever the node or zone.
    serving: BTreeSet<(Ipv4Addr, u16)>,
}

fn endpoint_sets(
    slices: &[&SliceRecord],
    port: &ServicePort,
    node_name: &str,
    zone: Option<&str>,
) -> EndpointSets {
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
    let backends: Vec<(&Endpoint, Backend)> = by_ip
        .into_values()
        .map(|(ep, target_port)| {
            let local = ep.node_name.as_deref() == Some(node_name);
            (ep, Backend::new(ep.addr, target_port, if local { BACKEND_F_LOCAL } else { 0 }))
        })
        .collect();
    // Hints apply only when they keep a ready endpoint, so the terminating fallback of
    // `eligible` never runs on a filtered set: kube-proxy falls back over all endpoints.
    let topology = Topology::from_hints(&backends, node_name, zone);
    EndpointSets {
        serving: backends.iter().filter(|(ep, _)| ep.serving).map(|(_, b)| (b.ip(), b.host_port())).collect(),
        cluster: eligible(backends.iter().filter(|(ep, _)| topology.available(ep))),
        local: eligible(backends.iter().filter(|(_, b)| b.flags & BACKEND_F_LOCAL != 0)),
    }
}

/// Which hints the Cluster endpoints are filtered by: kube-proxy's topology modes
/// (pkg/proxy/topology.go `topologyModeFromHints`, `availableForTopology`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    /// Every endpoint.
    Any,
    /// `trafficDistribution: PreferSameNode`: endpoints hinted for this node (`forNodes`).
    SameNode(&'a str),
    /// `PreferSameZone` or topology-aware routing: endpoints hinted for this node's zone
    /// (`forZones`).
    SameZone(&'a str),
}

impl<'a> Topology<'a> {
    /// Hints count only when every ready endpoint has one of that kind and some ready
    /// endpoint is hinted for this node (its zone); otherwise a partial rollout of hints
    /// would overload the hinted endpoints. Node hints come first, then zone hints. Endpoints
    /// that are not ready are left out of both checks.
    fn from_hints(endpoints: &[(&Endpoint, Backend)], node_name: &'a str, zone: Option<&'a str>) -> Self {
        let ready: Vec<&Endpoint> = endpoints.iter().filter(|(ep, _)| ep.ready).map(|(ep, _)| *ep).collect();
        let applies = |hints: fn(&Endpoint) -> &[String], name: &str| {
            ready.iter().all(|ep| !hints(ep).is_empty())
                && ready.iter().any(|ep| hints(ep).iter().any(|h| h == name))
        };
        if applies(|ep| &ep.node_hints, node_name) {
            return Self::SameNode(node_name);
        }
        // A node without the zone label has no zone for hints to match.
        match zone {
            Some(zone) if applies(|ep| &ep.zone_hints, zone) => Self::SameZone(zone),
            _ => Self::Any,
        }
    }

    fn available(self, ep: &Endpoint) -> bool {
        match self {
            Self::Any => true,
            Self::SameNode(node) => ep.node_hints.iter().any(|n| n == node),
            Self::SameZone(zone) => ep.zone_hints.iter().any(|z| z == zone),
        }
    }
}

/// The endpoints a new connection may go to: the ready ones; if none is ready, the serving
/// terminating ones.
fn eligible<'a>(endpoints: impl Iterator<Item = &'a (&'a Endpoint, Backend)> + Clone) -> Vec<Backend> {
    let ready: Vec<Backend> = endpoints.clone().filter(|(ep, _)| ep.ready).map(|(_, b)| *b).collect();
    if !ready.is_empty() {
        return ready;
    }
    endpoints.filter(|(ep, _)| ep.serving && ep.terminating).map(|(_, b)| *b).collect()
}
