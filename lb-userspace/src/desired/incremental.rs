//! The desired state kept up to date Service by Service.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::Hash,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use lb_common::service::{ServiceKey, SVC_F_SOURCE_RANGES};

use super::{frontend_ranges, service::ServicePart, DesiredState, Frontend, GroupName, NodeContext};
use crate::model::{NamespacedName, Protocol, ServiceRecord, Store};

/// What one update changed, for a writer holding the previous revision to diff only that.
/// Closed under use: with a group (or Service port, which is named by its Cluster group)
/// come the frontends that want it or wanted it, and with a frontend the groups it wants
/// and wanted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// The revision these changes lead from; `None` when everything was computed afresh (the
    /// first update, or the node changed), which only a full diff can follow.
    pub since: Option<u64>,
    /// Frontends whose entry or source ranges may differ.
    pub frontends: BTreeSet<ServiceKey>,
    /// Groups whose backends may differ, or that appeared or went.
    pub groups: BTreeSet<GroupName>,
}

/// The desired state, kept up to date Service by Service: an update recomputes the parts
/// of the Services the store says changed (of all, when the node changed) and merges them
/// with the others'. A frontend or health check port claimed by several Services goes to
/// the first by name, so the result is what computing every Service in name order gives.
#[derive(Debug)]
pub struct Incremental {
    state: DesiredState,
    parts: HashMap<NamespacedName, Arc<ServicePart>>,
    frontends: Claims<ServiceKey>,
    groups: Claims<GroupName>,
    health_checks: Claims<u16>,
    /// The node the parts were computed for.
    node: Option<NodeKey>,
    revision: u64,
    changes: Changes,
}

/// A Service's part before and after it was recomputed.
type Recomputed = (Option<Arc<ServicePart>>, Option<Arc<ServicePart>>);

/// What every part depends on besides its own Service.
#[derive(Debug, PartialEq, Eq)]
struct NodeKey {
    name: String,
    addrs: Vec<Ipv4Addr>,
    zone: Option<String>,
}

/// Unique across `Incremental`s, so a writer never takes one's changes for the next of
/// another's.
fn next_revision() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Default for Incremental {
    fn default() -> Self {
        Self {
            state: DesiredState::default(),
            parts: HashMap::new(),
            frontends: Claims::default(),
            groups: Claims::default(),
            health_checks: Claims::default(),
            node: None,
            revision: next_revision(),
            changes: Changes::default(),
        }
    }
}

impl Incremental {
    /// Brings the state up to date with `store`, taking the Services it noted as changed.
    pub fn update(&mut self, store: &mut Store, node: &NodeContext) {
        let changed = store.take_changed_services();
        self.apply(store, node, &changed);
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    pub(super) fn into_state(self) -> DesiredState {
        self.state
    }

    /// Identifies this version of the state; `changes().since` names the one before.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// What the last update changed.
    pub fn changes(&self) -> &Changes {
        &self.changes
    }

    /// Recomputes the `changed` Services, or every Service when the node is not the one the
    /// parts were computed for.
    pub(super) fn apply(&mut self, store: &Store, node: &NodeContext, changed: &BTreeSet<NamespacedName>) {
        let node_record = store.node(node.name);
        let zone = node_record.and_then(|n| n.zone.as_deref());
        let node_key = NodeKey {
            name: node.name.to_string(),
            addrs: node.addrs.to_vec(),
            zone: zone.map(str::to_string),
        };
        let since = if self.node.as_ref() == Some(&node_key) {
            Some(self.revision)
        } else {
            *self = Self { node: Some(node_key), ..Self::default() };
            None
        };
        let recomputed = match since {
            Some(_) => self.recompute(store, node, zone, changed.iter().map(|id| (id, store.service(id)))),
            None => self.recompute(store, node, zone, store.services().map(|svc| (&svc.id, Some(svc)))),
        };
        self.revision = next_revision();
        self.changes = match since {
            Some(since) => self.changes_since(since, &recomputed),
            None => Changes::default(),
        };
        self.state.snat_addr = node_record.and_then(|n| n.internal_ip).or(node.default_snat_addr);
        self.state.conflicts = self.conflicts();
    }

    /// Recomputes the parts of `services` (`None`: gone) and, for every key they claim or
    /// claimed, who holds it now. Returns the parts that changed, before and after.
    fn recompute<'a>(
        &mut self,
        store: &Store,
        node: &NodeContext,
        zone: Option<&str>,
        services: impl Iterator<Item = (&'a NamespacedName, Option<&'a ServiceRecord>)>,
    ) -> Vec<Recomputed> {
        let mut recomputed = Vec::new();
        for (id, svc) in services {
            let new = svc.map(|svc| Arc::new(ServicePart::new(svc, store.service_slices(id), node, zone)));
            let old = self.parts.remove(id);
            if old == new {
                self.parts.extend(old.map(|part| (id.clone(), part)));
                continue;
            }
            if let Some(old) = &old {
                self.withdraw(old);
            }
            if let Some(new) = &new {
                self.claim(new);
                self.parts.insert(id.clone(), new.clone());
            }
            // Right away, while the part is at hand: a key another Service of this batch
            // claims too is settled again with that one.
            for part in old.iter().chain(&new) {
                self.settle(part);
            }
            recomputed.push((old, new));
        }
        recomputed
    }

    fn claim(&mut self, part: &Arc<ServicePart>) {
        for (key, _) in &part.frontends {
            self.frontends.add(key, part);
        }
        for name in part.groups.keys() {
            self.groups.add(name, part);
        }
        if let Some((port, _)) = &part.health_check {
            self.health_checks.add(port, part);
        }
    }

    fn withdraw(&mut self, part: &ServicePart) {
        for (key, _) in &part.frontends {
            self.frontends.remove(key, &part.id);
        }
        for name in part.groups.keys() {
            self.groups.remove(name, &part.id);
        }
        if let Some((port, _)) = &part.health_check {
            self.health_checks.remove(port, &part.id);
        }
    }

    /// Sets every key `part` claims as its first claim (for a group: its last) says now.
    fn settle(&mut self, part: &ServicePart) {
        for (key, _) in &part.frontends {
            self.hold_frontend(*key);
        }
        for name in part.groups.keys() {
            // Only names breaking Kubernetes' rules (`/` or `:` in one) let two Services make
            // the same group name; the last by name holds it, as it was written last.
            let holder = self.groups.claimants(name).last().cloned();
            match &holder {
                Some(holder) => self.state.groups.insert(name.clone(), holder.groups[name].clone()),
                None => self.state.groups.remove(name),
            };
            match holder.as_ref().and_then(|h| h.udp_serving.get(name)) {
                Some(serving) => self.state.udp_serving.insert(name.clone(), serving.clone()),
                None => self.state.udp_serving.remove(name),
            };
        }
        if let Some((port, _)) = part.health_check {
            match self.health_checks.claimants(&port).first() {
                Some(holder) => {
                    let (_, local_ready) = holder.health_check.unwrap_or_default();
                    self.state.health_checks.insert(port, (holder.id.clone(), local_ready))
                }
                None => self.state.health_checks.remove(&port),
            };
        }
    }

    /// Sets frontend `key` and its source ranges as its first claim says.
    fn hold_frontend(&mut self, key: ServiceKey) {
        let state = &mut self.state;
        let stale: Vec<_> = frontend_ranges(&state.source_ranges, key).copied().collect();
        for range in stale {
            state.source_ranges.remove(&range);
        }
        let held = self.frontends.claimants(&key).first().and_then(|holder| {
            let (_, frontend) = holder.frontends.iter().find(|(k, _)| *k == key)?;
            Some((holder, frontend))
        });
        let Some((holder, frontend)) = held else {
            state.frontends.remove(&key);
            return;
        };
        // A frontend lost to another Service must not get this Service's ranges.
        if frontend.flags & SVC_F_SOURCE_RANGES != 0 {
            state.source_ranges.extend(holder.source_ranges.iter().map(|(addr, len)| (key, *addr, *len)));
        }
        state.frontends.insert(key, frontend.clone());
    }

    /// The frontends and groups of the `recomputed` Services (before and after) and of every
    /// Service sharing one with them, transitively: a claim may have changed hands.
    fn changes_since(&self, since: u64, recomputed: &[Recomputed]) -> Changes {
        let mut changes = Changes { since: Some(since), ..Changes::default() };
        let previous: HashMap<&NamespacedName, &ServicePart> =
            recomputed.iter().filter_map(|(old, _)| old.as_deref()).map(|part| (&part.id, part)).collect();
        let ids = recomputed.iter().filter_map(|(old, new)| old.as_ref().or(new.as_ref()));
        let mut affected: HashSet<&NamespacedName> = ids.map(|part| &part.id).collect();
        let mut queue: Vec<&NamespacedName> = affected.iter().copied().collect();
        while let Some(id) = queue.pop() {
            let current = self.parts.get(id).map(|part| &**part);
            for part in [previous.get(id).copied(), current].into_iter().flatten() {
                let mut sharing = Vec::new();
                for (key, _) in &part.frontends {
                    changes.frontends.insert(*key);
                    sharing.extend(self.frontends.claimants(key));
                }
                for name in part.groups.keys() {
                    changes.groups.insert(name.clone());
                    sharing.extend(self.groups.claimants(name));
                }
                for other in sharing {
                    if affected.insert(&other.id) {
                        queue.push(&other.id);
                    }
                }
            }
        }
        changes
    }

    /// Every claim that lost, as computing the Services one by one in name order meets them:
    /// by Service, in the Service's claim order, its health check port last.
    fn conflicts(&self) -> Vec<String> {
        let mut lost: Vec<(&NamespacedName, usize, String)> = Vec::new();
        for key in &self.frontends.contested {
            let mut services: Vec<&Arc<ServicePart>> = self.frontends.claimants(key).iter().collect();
            services.dedup_by(|a, b| a.id == b.id);
            let mut claims = services.into_iter().flat_map(|part| {
                let claims = part.frontends.iter().enumerate();
                claims.filter(|(_, (k, _))| k == key).map(move |(at, (_, frontend))| (&part.id, at, frontend))
            });
            let Some((_, _, held)) = claims.next() else { continue };
            for (id, at, frontend) in claims {
                lost.push((id, at, frontend_conflict(key, held, frontend)));
            }
        }
        for port in &self.health_checks.contested {
            let mut claimants = self.health_checks.claimants(port).iter().map(|part| &part.id);
            let Some(owner) = claimants.next() else { continue };
            for id in claimants {
                let message =
                    format!("healthCheckNodePort {port} is claimed by {owner} and {id}; keeping {owner}");
                lost.push((id, usize::MAX, message));
            }
        }
        lost.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        lost.into_iter().map(|(_, _, message)| message).collect()
    }
}

fn frontend_conflict(key: &ServiceKey, held: &Frontend, lost: &Frontend) -> String {
    format!(
        "{}:{}/{} is claimed by {} and {}; keeping {}",
        key.ip(),
        key.host_port(),
        Protocol::from_number(key.proto).map_or_else(|| key.proto.to_string(), |p| p.to_string()),
        held.group,
        lost.group,
        held.group
    )
}

/// Who claims each key: the claiming Services' parts in name order, once per claim.
#[derive(Debug)]
struct Claims<K> {
    by_key: HashMap<K, Claimants>,
    /// The keys with more than one claim.
    contested: BTreeSet<K>,
}

/// The claims on one key; nearly always one, which needs no list.
#[derive(Debug)]
enum Claimants {
    One(Arc<ServicePart>),
    Many(Vec<Arc<ServicePart>>),
}

impl Claimants {
    fn as_slice(&self) -> &[Arc<ServicePart>] {
        match self {
            Self::One(part) => std::slice::from_ref(part),
            Self::Many(parts) => parts,
        }
    }
}

impl<K> Default for Claims<K> {
    fn default() -> Self {
        Self { by_key: HashMap::new(), contested: BTreeSet::new() }
    }
}

impl<K: Clone + Eq + Hash + Ord> Claims<K> {
    fn claimants(&self, key: &K) -> &[Arc<ServicePart>] {
        self.by_key.get(key).map_or(&[], Claimants::as_slice)
    }

    fn add(&mut self, key: &K, part: &Arc<ServicePart>) {
        let Some(claimants) = self.by_key.get_mut(key) else {
            self.by_key.insert(key.clone(), Claimants::One(part.clone()));
            return;
        };
        let mut parts = claimants.as_slice().to_vec();
        // After the Service's own earlier claims: of those, the first holds the key.
        let at = parts.partition_point(|c| c.id <= part.id);
        parts.insert(at, part.clone());
        *claimants = Claimants::Many(parts);
        self.contested.insert(key.clone());
    }

    /// Withdraws every claim of Service `id` on `key`.
    fn remove(&mut self, key: &K, id: &NamespacedName) {
        let Some(claimants) = self.by_key.get_mut(key) else { return };
        let mut rest: Vec<_> = claimants.as_slice().iter().filter(|c| c.id != *id).cloned().collect();
        if rest.len() < 2 {
            self.contested.remove(key);
        }
        match rest.len() {
            0 => {
                self.by_key.remove(key);
            }
            1 => *claimants = Claimants::One(rest.remove(0)),
            _ => *claimants = Claimants::Many(rest),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        desired::{churn::Churn, compute},
        manifests::parse_str,
        model::ObjectKey,
    };
    use lb_common::proto::TCP;

    /// Checks `changes` against the states before and after: every difference is listed, and
    /// the lists are closed under use.
    fn check_changes(before: &DesiredState, after: &DesiredState, changes: &Changes) {
        let keys = before.frontends.keys().chain(after.frontends.keys());
        for key in keys {
            let ranges = |state: &DesiredState| {
                frontend_ranges(&state.source_ranges, *key).copied().collect::<Vec<_>>()
            };
            if before.frontends.get(key) != after.frontends.get(key) || ranges(before) != ranges(after) {
                assert!(changes.frontends.contains(key), "{key:?} changed but is not listed");
            }
        }
        for name in before.groups.keys().chain(after.groups.keys()) {
            if before.groups.get(name) != after.groups.get(name) {
                assert!(changes.groups.contains(name), "{name} changed but is not listed");
            }
        }
        for state in [before, after] {
            for (key, fe) in &state.frontends {
                let names = [&fe.group, &fe.internal_group, &fe.service_port];
                if changes.frontends.contains(key) {
                    assert!(
                        names.iter().all(|n| changes.groups.contains(*n)),
                        "{key:?} is listed, {fe:?} not"
                    );
                }
                if names.iter().any(|n| changes.groups.contains(*n)) {
                    assert!(changes.frontends.contains(key), "{fe:?} is listed, {key:?} not");
                }
            }
        }
    }

    #[test]
    fn updates_agree_with_computing_afresh_and_list_every_change() {
        for seed in [1, 7, 42] {
            let mut churn = Churn::new(seed);
            let mut desired = Incremental::default();
            let mut before = DesiredState::default();
            for _ in 0..1500 {
                // Sometimes several changes reach one update.
                let steps: Vec<String> =
                    (0..1 + churn.store.services().count() % 3).map(|_| churn.step()).collect();
                let node = churn.node();
                desired.update(&mut churn.store, &node);
                let after = compute(&churn.store, &node);
                assert_eq!(desired.state(), &after, "seed {seed}, after {steps:#?}");
                if desired.changes().since.is_some() {
                    check_changes(&before, &after, desired.changes());
                }
                before = after;
            }
        }
    }

    /// A store holding the objects of a multi-document YAML text.
    fn apply(store: &mut Store, yaml: &str) {
        for object in parse_str(yaml).unwrap().objects {
            store.apply(&object, "test").unwrap();
        }
    }

    fn nodeport(name: &str, cluster_ip: &str, node_port: u16) -> String {
        format!("kind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, clusterIP: {cluster_ip}, ports: [{{name: http, port: 80, nodePort: {node_port}}}]}}\n---\n")
    }

    fn slice(service: &str, addr: &str) -> String {
        format!("kind: EndpointSlice\nmetadata: {{name: {service}-1, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [{addr}]}}]\n---\n")
    }

    const ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(192, 168, 1, 10)];

    fn node() -> NodeContext<'static> {
        NodeContext { name: "node-a", addrs: &ADDRS, default_snat_addr: None }
    }

    /// The frontend keys of a NodePort Service on `cluster_ip` and `node_port`.
    fn keys(cluster_ip: &str, node_port: u16) -> BTreeSet<ServiceKey> {
        let cluster_ip = ServiceKey::new(cluster_ip.parse().unwrap(), 80, TCP);
        ADDRS.iter().map(|addr| ServiceKey::new(*addr, node_port, TCP)).chain([cluster_ip]).collect()
    }

    fn names(names: &[&str]) -> BTreeSet<GroupName> {
        names.iter().map(|name| GroupName::from(*name)).collect()
    }

    /// Services a, b and c with a slice each, synced once.
    fn three_services() -> (Store, Incremental) {
        let mut store = Store::default();
        for (name, n) in [("a", 1), ("b", 2), ("c", 3)] {
            let yaml =
                nodeport(name, &format!("10.96.0.{n}"), 30080 + n) + &slice(name, &format!("10.244.1.{n}"));
            apply(&mut store, &yaml);
        }
        let mut desired = Incremental::default();
        desired.update(&mut store, &node());
        (store, desired)
    }

    #[test]
    fn an_update_recomputes_and_lists_only_the_services_that_changed() {
        let (mut store, mut desired) = three_services();
        let first = desired.revision();
        apply(&mut store, &slice("b", "10.244.2.2"));
        desired.update(&mut store, &node());
        let expected = Changes {
            since: Some(first),
            frontends: keys("10.96.0.2", 30082),
            groups: names(&["default/b:http/TCP"]),
        };
        assert_eq!(desired.changes(), &expected);
        assert_eq!(desired.state(), &compute(&store, &node()));
        // Nothing changed since: nothing listed.
        let second = desired.revision();
        desired.update(&mut store, &node());
        assert_eq!(desired.changes(), &Changes { since: Some(second), ..Changes::default() });
    }

    #[test]
    fn a_deleted_service_is_listed_and_its_frontends_and_groups_go() {
        let (mut store, mut desired) = three_services();
        store.delete(&ObjectKey::Service(NamespacedName { namespace: "default".into(), name: "c".into() }));
        desired.update(&mut store, &node());
        assert_eq!(desired.changes().frontends, keys("10.96.0.3", 30083));
        assert_eq!(desired.changes().groups, names(&["default/c:http/TCP"]));
        assert_eq!(desired.state(), &compute(&store, &node()));
        assert!(!desired.state().groups.contains_key("default/c:http/TCP"));
    }

    #[test]
    fn a_node_change_recomputes_every_service_for_a_full_diff() {
        let (mut store, mut desired) = three_services();
        let one_addr = NodeContext { addrs: &ADDRS[..1], ..node() };
        desired.update(&mut store, &one_addr);
        assert_eq!(desired.changes(), &Changes::default());
        assert_eq!(desired.state(), &compute(&store, &one_addr));
        // So does a new zone of the Node object.
        apply(&mut store, "kind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: z}}\n");
        desired.update(&mut store, &one_addr);
        assert_eq!(desired.changes().since, None);
    }

    #[test]
    fn a_frontend_lost_in_a_conflict_passes_to_the_next_claim_when_its_holder_goes() {
        let mut store = Store::default();
        apply(&mut store, &(nodeport("alpha", "10.96.0.1", 30080) + &nodeport("beta", "10.96.0.2", 30080)));
        let mut desired = Incremental::default();
        desired.update(&mut store, &node());
        assert_eq!(desired.state().conflicts.len(), 2);
        let node_port = ServiceKey::new(ADDRS[0], 30080, TCP);
        assert_eq!(&*desired.state().frontends[&node_port].group, "default/alpha:http/TCP");
        store.delete(&ObjectKey::Service(NamespacedName {
            namespace: "default".into(),
            name: "alpha".into(),
        }));
        desired.update(&mut store, &node());
        assert_eq!(&*desired.state().frontends[&node_port].group, "default/beta:http/TCP");
        assert_eq!(desired.state().conflicts, Vec::<String>::new());
        // beta did not change, but its frontends did: they are listed with its groups.
        assert!(keys("10.96.0.2", 30080).is_subset(&desired.changes().frontends));
        assert!(desired.changes().groups.contains("default/beta:http/TCP"));
        assert_eq!(desired.state(), &compute(&store, &node()));
    }
}
