//! The one map writer: diffs desired state against what the maps hold and writes only the
//! difference, in an order that never shows a packet a half-built Service. Fed by a
//! `desired::Incremental` whose previous revision it wrote, it diffs only what changed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, MapData, MapError, PerCpuArray, PerCpuValues,
};
use lb_common::{
    backend::{Backend, BackendKey},
    config::NodeConfig,
    maps,
    service::{ServiceKey, ServiceValue},
    source_range::{SourceRangeKey, SOURCE_RANGE_FRONTEND_BITS},
    stats::{ServicePortName, ServiceStats, SERVICE_STATS_MAX},
};

use super::{
    ids::{group_ids, stats_indices, Ids, OutOfScope},
    Dataplane, DataplaneError,
};
use crate::desired::{frontend_ranges, Changes, DesiredState, Frontend, GroupName, Incremental, SourceRange};

/// What one sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends: usize,
    pub backends: usize,
    pub source_ranges: usize,
    pub written: usize,
    pub deleted: usize,
    /// One line per entry that could not be written (e.g. a full map), naming the group.
    pub failures: Vec<String>,
}

pub struct MapWriter {
    services: aya::maps::HashMap<MapData, ServiceKey, ServiceValue>,
    backends: aya::maps::HashMap<MapData, BackendKey, Backend>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    config: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, ServiceStats>,
    service_names: aya::maps::HashMap<MapData, u32, ServicePortName>,
    /// What the maps hold, as far as this writer knows: read back from the maps at open,
    /// so a restarted agent adopts pinned state and prunes only what is no longer right.
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<BackendKey, Backend>,
    ranges: BTreeSet<SourceRange>,
    node_config: NodeConfig,
    /// The cookie of the agent's network namespace, the node's own (`NodeConfig`).
    host_netns_cookie: u64,
    names: BTreeMap<u32, ServicePortName>,
    /// The Service port each counter slot in use counts, since its counters were zeroed;
    /// shared, not copied, with readers. Adopted at open from the slots' names in
    /// `XLB_SERVICE_NAMES`, which are written only after the zeroing: a restarted agent keeps
    /// counting where the one before stopped (the programs counted on meanwhile).
    counted: Arc<BTreeMap<u16, GroupName>>,
    /// The ids of the desired groups and the counter slots of the desired Service ports, as
    /// of the last sync.
    group_ids: Ids,
    stats_indices: Ids,
    /// The `Incremental` revision the maps hold, written without failure: its next changes
    /// can be diffed alone.
    synced: Option<u64>,
}

/// The part of the maps one sync diffs: everything, or what changed.
struct Scope {
    /// Frontends to diff, with their source ranges.
    frontends: BTreeSet<ServiceKey>,
    /// Desired groups whose slots to diff.
    groups: Vec<GroupName>,
    /// Group ids whose slots may have gone stale.
    stale_ids: BTreeSet<u32>,
    /// Counter slots whose Service port may have changed.
    counter_slots: BTreeSet<u32>,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

fn trie_key(&(frontend, addr, prefix_len): &SourceRange) -> Key<SourceRangeKey> {
    let data = SourceRangeKey { frontend, client_addr: u32::from(addr).to_be() };
    Key::new(SOURCE_RANGE_FRONTEND_BITS + u32::from(prefix_len), data)
}

/// The inverse of `trie_key` for the entries this writer made (prefix lengths 64-96).
fn source_range(key: &Key<SourceRangeKey>) -> SourceRange {
    let data = key.data();
    let prefix_len = key.prefix_len().saturating_sub(SOURCE_RANGE_FRONTEND_BITS) as u8;
    (data.frontend, Ipv4Addr::from(u32::from_be(data.client_addr)), prefix_len)
}

/// `addr:port` of a frontend, for messages.
fn frontend_name(key: &ServiceKey) -> String {
    format!("{}:{}", key.ip(), key.host_port())
}

/// Why an insert into `map` failed, for messages: a full map says so, and which flag sizes it.
fn refused(map: &str, e: &MapError) -> String {
    let flag = match map {
        maps::SERVICES => ", raise --max-services",
        maps::BACKENDS => ", raise --max-backends",
        _ => "",
    };
    match e {
        MapError::SyscallError(e) => match e.io_error.raw_os_error() {
            // A hash map says E2BIG, an LPM trie ENOSPC.
            Some(libc::E2BIG | libc::ENOSPC) => format!("not written, map {map} is full{flag}"),
            _ => format!("not written to map {map}: {e}: {}", e.io_error),
        },
        e => format!("not written to map {map}: {e}"),
    }
}

/// Per group id, how many of its slots the frontends may pick from: the highest count any
/// frontend reads it with.
fn slots_read<'a>(frontends: impl IntoIterator<Item = &'a ServiceValue>) -> BTreeMap<u32, u16> {
    let mut read: BTreeMap<u32, u16> = BTreeMap::new();
    for v in frontends {
        for (id, count) in [(v.group_id, v.backend_count), (v.internal_group_id, v.internal_count)] {
            let max = read.entry(id).or_default();
            *max = (*max).max(count);
        }
    }
    read
}

/// A pinned counter slot name as this agent names the Service port: agents before kube-proxy's
/// ServicePortName form named an unnamed port `ns/name:/PROTO`, now `ns/name/PROTO`. Names
/// and port names contain no `:` or `/`, so `:/` only ever came from an unnamed port; the slot
/// keeps its counters and is renamed by the next sync.
fn adopted_name(pinned: &str) -> String {
    pinned.replacen(":/", "/", 1)
}

/// The slots of group `id`.
fn group_slots(
    slots: &BTreeMap<BackendKey, Backend>,
    id: u32,
) -> impl Iterator<Item = (&BackendKey, &Backend)> {
    slots.range(BackendKey { group_id: id, slot: 0 }..=BackendKey { group_id: id, slot: u32::MAX })
}

impl MapWriter {
    pub fn open(dp: &mut Dataplane) -> Result<Self, DataplaneError> {
        let mut writer = Self {
            services: dp.take_map(maps::SERVICES)?.try_into().map_err(map_err(maps::SERVICES))?,
            backends: dp.take_map(maps::BACKENDS)?.try_into().map_err(map_err(maps::BACKENDS))?,
            source_ranges: dp
                .take_map(maps::SOURCE_RANGES)?
                .try_into()
                .map_err(map_err(maps::SOURCE_RANGES))?,
            config: dp.take_map(maps::CONFIG)?.try_into().map_err(map_err(maps::CONFIG))?,
            stats: dp.take_map(maps::SERVICE_STATS)?.try_into().map_err(map_err(maps::SERVICE_STATS))?,
            service_names: dp
                .take_map(maps::SERVICE_NAMES)?
                .try_into()
                .map_err(map_err(maps::SERVICE_NAMES))?,
            frontends: BTreeMap::new(),
            slots: BTreeMap::new(),
            ranges: BTreeSet::new(),
            node_config: NodeConfig::default(),
            host_netns_cookie: crate::netif::netns_cookie()
                .map_err(|source| DataplaneError::Io { path: "SO_NETNS_COOKIE".into(), source })?,
            names: BTreeMap::new(),
            counted: Arc::default(),
            group_ids: Ids::default(),
            stats_indices: Ids::default(),
            synced: None,
        };
        writer.reread()?;
        let named = writer.names.iter().filter_map(|(slot, name)| {
            let index = u16::try_from(*slot).ok().filter(|i| *i != 0)?;
            Some((index, GroupName::from(adopted_name(name.as_str()?))))
        });
        writer.counted = Arc::new(named.collect());
        Ok(writer)
    }

    /// Reads back what the maps hold, forgetting what this writer believed: the next sync
    /// then repairs any drift (an entry removed or changed by hand, e.g. with bpftool).
    pub fn reread(&mut self) -> Result<(), DataplaneError> {
        self.synced = None;
        self.frontends = self.services.iter().collect::<Result<_, _>>().map_err(map_err(maps::SERVICES))?;
        self.slots = self.backends.iter().collect::<Result<_, _>>().map_err(map_err(maps::BACKENDS))?;
        self.ranges = self
            .source_ranges
            .keys()
            .map(|key| key.map(|k| source_range(&k)))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SOURCE_RANGES))?;
        self.node_config = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        self.names =
            self.service_names.iter().collect::<Result<_, _>>().map_err(map_err(maps::SERVICE_NAMES))?;
        Ok(())
    }

    /// The Service port (`ns/name:port/PROTO`, `ns/name/PROTO` when unnamed) each counter slot in `XLB_SERVICE_STATS`
    /// counts, as of the last sync.
    pub fn counted(&self) -> &Arc<BTreeMap<u16, GroupName>> {
        &self.counted
    }

    /// Traffic of every Service port counted, as of now.
    pub fn traffic(&self) -> Result<Vec<super::stats::ServiceTraffic>, DataplaneError> {
        super::stats::service_traffic(&self.stats, &self.counted)
    }

    /// Zeroes counter slot `index` before it counts another Service port.
    fn reset_counters(&mut self, index: u16) -> Result<(), String> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e.to_string())?;
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|e| e.to_string())?;
        self.stats.set(u32::from(index), zeros, 0).map_err(|e| e.to_string())
    }

    /// Makes the maps hold `desired`, diffing all of it.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        self.synced = None;
        self.sync_all(desired)
    }

    /// Makes the maps hold `desired`'s state. When they hold the revision its changes lead
    /// from, only the changes are diffed.
    pub fn sync_changes(&mut self, desired: &Incremental) -> SyncReport {
        let changes = desired.changes();
        let report = match changes.since {
            Some(since) if self.synced == Some(since) => self.sync_changed(desired.state(), changes),
            _ => self.sync_all(desired.state()),
        };
        // After a failure the maps hold neither revision: the next sync diffs everything.
        self.synced = report.failures.is_empty().then_some(desired.revision());
        report
    }

    /// Diffs everything, with ids assigned afresh from what the maps hold.
    fn sync_all(&mut self, desired: &DesiredState) -> SyncReport {
        self.group_ids =
            group_ids(&self.frontends, &self.slots, desired, &self.group_ids).into_iter().collect();
        let indices = stats_indices(&self.frontends, desired);
        self.stats_indices = indices.into_iter().map(|(name, index)| (name, u32::from(index))).collect();
        let ranged = desired.source_ranges.iter().chain(&self.ranges).map(|(key, _, _)| key);
        let scope = Scope {
            frontends: desired.frontends.keys().chain(self.frontends.keys()).chain(ranged).copied().collect(),
            groups: desired.groups.keys().cloned().collect(),
            stale_ids: self.slots.keys().map(|k| k.group_id).collect(),
            counter_slots: self
                .counted
                .keys()
                .map(|i| u32::from(*i))
                .chain(self.names.keys().copied())
                .chain(self.stats_indices.ids())
                .collect(),
        };
        self.write(desired, &scope)
    }

    /// Diffs the `changes` alone: the maps hold the state they lead from, so every frontend
    /// outside them already reads the ids of the groups it wants.
    fn sync_changed(&mut self, desired: &DesiredState, changes: &Changes) -> SyncReport {
        match self.changed_scope(desired, changes) {
            Ok(scope) => self.write(desired, &scope),
            Err(OutOfScope) => self.sync_all(desired),
        }
    }

    /// The scope of `changes`, with the ids of their groups and Service ports (named by their
    /// Cluster group, so listed as groups too) brought up to date.
    fn changed_scope(&mut self, desired: &DesiredState, changes: &Changes) -> Result<Scope, OutOfScope> {
        // The listed frontends as the maps hold them and as desired.
        let listed: Vec<(Option<ServiceValue>, Option<&Frontend>)> = changes
            .frontends
            .iter()
            .map(|key| (self.frontends.get(key).copied(), desired.frontends.get(key)))
            .collect();
        let held = || listed.iter().filter_map(|(value, wanted)| Some((value.as_ref()?, wanted)));
        let group_uses = held().flat_map(|(value, wanted)| {
            [
                (value.group_id, wanted.map(|f| &f.group)),
                (value.internal_group_id, wanted.map(|f| &f.internal_group)),
            ]
        });
        let port_uses = held()
            .filter(|(value, _)| value.stats_index != 0)
            .map(|(value, wanted)| (u32::from(value.stats_index), wanted.map(|f| &f.service_port)));
        let ports: BTreeSet<&GroupName> =
            listed.iter().filter_map(|(_, wanted)| Some(&(*wanted)?.service_port)).collect();
        let old_ids: Vec<u32> = changes.groups.iter().filter_map(|g| self.group_ids.get(g)).collect();
        let old_slots: Vec<u32> = changes.groups.iter().filter_map(|p| self.stats_indices.get(p)).collect();
        self.group_ids.update(group_uses, &changes.groups, |g| desired.groups.contains_key(g), u32::MAX)?;
        self.stats_indices.update(port_uses, &changes.groups, |p| ports.contains(p), SERVICE_STATS_MAX)?;
        // A listed frontend wanting a group outside the changes finds it with its old id.
        let wanted = listed.iter().filter_map(|(_, wanted)| *wanted);
        if wanted.flat_map(|f| [&f.group, &f.internal_group]).any(|g| self.group_ids.get(g).is_none()) {
            return Err(OutOfScope);
        }
        let new_ids = changes.groups.iter().filter_map(|g| self.group_ids.get(g));
        let new_slots = changes.groups.iter().filter_map(|p| self.stats_indices.get(p));
        Ok(Scope {
            frontends: changes.frontends.clone(),
            groups: changes.groups.iter().filter(|g| desired.groups.contains_key(*g)).cloned().collect(),
            stale_ids: old_ids.into_iter().chain(new_ids).collect(),
            counter_slots: old_slots.into_iter().chain(new_slots).collect(),
        })
    }

    /// Makes the `scope` of the maps hold `desired`, with the ids assigned. Order: counter
    /// resets, backend slots, new source ranges, frontends (add or change), removed
    /// frontends, removed source ranges, removed slots: a frontend only ever points at
    /// complete slots and finds all of its ranges.
    fn write(&mut self, desired: &DesiredState, scope: &Scope) -> SyncReport {
        let mut report = SyncReport {
            frontends: desired.frontends.len(),
            backends: desired.groups.values().map(Vec::len).sum(),
            source_ranges: desired.source_ranges.len(),
            ..Default::default()
        };
        // A slot starts counting a Service port from zero, before any frontend points at it,
        // and is named after the Service port once zeroed (`XLB_SERVICE_NAMES`). The names of
        // slots no longer counting go with the removed slots, after the frontends.
        for &slot in &scope.counter_slots {
            let Ok(index) = u16::try_from(slot) else { continue };
            let port = self.stats_indices.name(slot).cloned();
            if self.counted.get(&index) != port.as_ref() {
                // Until reset, the slot counts no Service port.
                Arc::make_mut(&mut self.counted).remove(&index);
                if let Some(port) = port {
                    match self.reset_counters(index) {
                        Ok(()) => {
                            Arc::make_mut(&mut self.counted).insert(index, port);
                        }
                        Err(e) => {
                            report.failures.push(format!("{port}: resetting counter slot {index}: {e}"))
                        }
                    }
                }
            }
            let Some(port) = self.counted.get(&index) else { continue };
            let name = ServicePortName::new(port);
            if self.names.get(&slot) == Some(&name) {
                continue;
            }
            match self.service_names.insert(slot, name, 0) {
                Ok(()) => {
                    self.names.insert(slot, name);
                    report.written += 1;
                }
                Err(e) => report.failures.push(format!("{port}: naming counter slot {index}: {e}")),
            }
        }
        // Every desired group has an id (a changes-only sync falls back to a full one
        // otherwise); 0 is never assigned.
        let id = |name: &GroupName| self.group_ids.get(name).unwrap_or(0);
        let mut target_slots = BTreeMap::new();
        for name in &scope.groups {
            for (slot, backend) in desired.groups[name].iter().enumerate() {
                target_slots.insert(BackendKey { group_id: id(name), slot: slot as u32 }, *backend);
            }
        }
        // Several frontends read each group: its id and slot count are looked up once.
        let mut groups: HashMap<&GroupName, (u32, u16)> = HashMap::new();
        let mut group = |name| {
            *groups.entry(name).or_insert_with(|| {
                let count = desired.groups.get(name).map_or(0, Vec::len);
                (id(name), u16::try_from(count).unwrap_or(u16::MAX))
            })
        };
        let stats_index =
            |port: &GroupName| self.stats_indices.get(port).and_then(|i| u16::try_from(i).ok()).unwrap_or(0);
        let target_frontends: BTreeMap<ServiceKey, ServiceValue> = scope
            .frontends
            .iter()
            .filter_map(|key| {
                let fe = desired.frontends.get(key)?;
                let ((group_id, backend_count), (internal_group_id, internal_count)) =
                    (group(&fe.group), group(&fe.internal_group));
                let value = ServiceValue {
                    group_id,
                    internal_group_id,
                    backend_count,
                    internal_count,
                    flags: fe.flags,
                    stats_index: stats_index(&fe.service_port),
                    affinity_timeout_s: fe.affinity_timeout_s,
                };
                Some((*key, value))
            })
            .collect();
        let group_of = |id: u32| self.group_ids.name(id).map_or("?", |name| &**name).to_string();

        let mut broken_groups = BTreeSet::new();
        for (key, backend) in &target_slots {
            if self.slots.get(key) == Some(backend) {
                continue;
            }
            match self.backends.insert(key, backend, 0) {
                Ok(()) => {
                    self.slots.insert(*key, *backend);
                    report.written += 1;
                }
                Err(e) => {
                    broken_groups.insert(key.group_id);
                    report.failures.push(format!(
                        "Service {}: backend slot {} {}",
                        group_of(key.group_id),
                        key.slot,
                        refused(maps::BACKENDS, &e)
                    ));
                }
            }
        }
        // A range that cannot be written does not hold its frontend back: the frontend then
        // admits fewer clients than desired, never more.
        let new_ranges: Vec<SourceRange> = scope
            .frontends
            .iter()
            .flat_map(|key| frontend_ranges(&desired.source_ranges, *key))
            .filter(|range| !self.ranges.contains(range))
            .copied()
            .collect();
        for range in new_ranges {
            match self.source_ranges.insert(&trie_key(&range), 1, 0) {
                Ok(()) => {
                    self.ranges.insert(range);
                    report.written += 1;
                }
                Err(e) => report.failures.push(format!(
                    "{}: source range {}/{} {}",
                    frontend_name(&range.0),
                    range.1,
                    range.2,
                    refused(maps::SOURCE_RANGES, &e)
                )),
            }
        }
        for (key, value) in &target_frontends {
            if self.frontends.get(key) == Some(value) {
                continue;
            }
            if let Some(id) =
                [value.group_id, value.internal_group_id].into_iter().find(|id| broken_groups.contains(id))
            {
                report.failures.push(format!(
                    "Service {}: frontend {} left as it was: backends incomplete",
                    group_of(id),
                    frontend_name(key)
                ));
                continue;
            }
            match self.services.insert(key, value, 0) {
                Ok(()) => {
                    self.frontends.insert(*key, *value);
                    report.written += 1;
                }
                Err(e) => report.failures.push(format!(
                    "Service {}: frontend {} {}",
                    group_of(value.group_id),
                    frontend_name(key),
                    refused(maps::SERVICES, &e)
                )),
            }
        }
        let stale_frontends: Vec<ServiceKey> = scope
            .frontends
            .iter()
            .filter(|k| self.frontends.contains_key(k) && !target_frontends.contains_key(k))
            .copied()
            .collect();
        for key in stale_frontends {
            match self.services.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.frontends.remove(&key);
                    report.deleted += 1;
                }
                Err(e) => report.failures.push(format!("removing frontend {}: {e}", frontend_name(&key))),
            }
        }
        let stale_ranges: Vec<SourceRange> = scope
            .frontends
            .iter()
            .flat_map(|key| frontend_ranges(&self.ranges, *key))
            .filter(|range| !desired.source_ranges.contains(range))
            .copied()
            .collect();
        for range in stale_ranges {
            match self.source_ranges.remove(&trie_key(&range)) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.ranges.remove(&range);
                    report.deleted += 1;
                }
                Err(e) => report.failures.push(format!(
                    "removing source range {}/{} of {}: {e}",
                    range.1,
                    range.2,
                    frontend_name(&range.0)
                )),
            }
        }
        // A slot goes only when no frontend, as the maps now hold them, can still pick it
        // (one left as it was because its new backends did not fit keeps its old slots).
        // Every frontend reading a scope id is in the scope.
        let read = slots_read(scope.frontends.iter().filter_map(|key| self.frontends.get(key)));
        let still_read =
            |k: &BackendKey| read.get(&k.group_id).is_some_and(|count| u32::from(*count) > k.slot);
        let stale_slots: Vec<BackendKey> = scope
            .stale_ids
            .iter()
            .flat_map(|id| group_slots(&self.slots, *id))
            .map(|(key, _)| *key)
            .filter(|k| !target_slots.contains_key(k) && !still_read(k))
            .collect();
        for key in stale_slots {
            match self.backends.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.slots.remove(&key);
                    report.deleted += 1;
                }
                Err(e) => {
                    report.failures.push(format!("removing backend slot {}/{}: {e}", key.group_id, key.slot))
                }
            }
        }
        // A slot counting no Service port loses its name once no frontend of the scope, as the
        // maps now hold them, counts into it (a frontend left as it was keeps its name).
        let still_counted: BTreeSet<u32> = scope
            .frontends
            .iter()
            .filter_map(|key| self.frontends.get(key))
            .map(|value| u32::from(value.stats_index))
            .collect();
        let stale_names: Vec<u32> = scope
            .counter_slots
            .iter()
            .copied()
            .filter(|slot| self.names.contains_key(slot))
            .filter(|slot| {
                let counted = u16::try_from(*slot).is_ok_and(|index| self.counted.contains_key(&index));
                !counted && !still_counted.contains(slot)
            })
            .collect();
        for slot in stale_names {
            match self.service_names.remove(&slot) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.names.remove(&slot);
                    report.deleted += 1;
                }
                Err(e) => report.failures.push(format!("removing the name of counter slot {slot}: {e}")),
            }
        }
        // The layout version marks the maps as filled by an agent of this version.
        let node_config = NodeConfig {
            snat_addr: desired.snat_addr.map_or(0, |a| u32::from(a).to_be()),
            layout_version: maps::LAYOUT_VERSION,
            host_netns_cookie: self.host_netns_cookie,
        };
        if node_config != self.node_config {
            match self.config.set(0, node_config, 0) {
                Ok(()) => {
                    self.node_config = node_config;
                    report.written += 1;
                }
                Err(e) => report.failures.push(format!("node config: {e}")),
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::MapSizes,
        desired::{churn::Churn, NodeContext},
        manifests::parse_str,
        model::{NamespacedName, ObjectKey, Store},
    };
    use lb_common::proto::TCP;

    use crate::dataplane::ids::tests::{key, value};

    #[test]
    fn slots_read_per_id_is_the_highest_count_through_either_field() {
        let maps = [(key(1), value(5, 7)), (key(2), value(7, 5))];
        assert_eq!(slots_read(maps.iter().map(|(_, v)| v)), [(5, 2), (7, 2)].into());
        let maps = [(key(1), value(5, 7))];
        assert_eq!(slots_read(maps.iter().map(|(_, v)| v)), [(5, 2), (7, 1)].into());
    }

    #[test]
    fn trie_key_puts_the_frontend_before_the_prefix_and_round_trips() {
        let range = (key(1), Ipv4Addr::new(10, 0, 0, 0), 8);
        let trie = trie_key(&range);
        assert_eq!(trie.prefix_len(), 72);
        assert_eq!(
            trie.data(),
            SourceRangeKey { frontend: key(1), client_addr: u32::from_ne_bytes([10, 0, 0, 0]) }
        );
        assert_eq!(source_range(&trie), range);
    }

    // The tests below load the programs and write real maps: they need root.

    /// A writer on private maps, and the dataplane that holds them.
    fn writer(backends: u32) -> (Dataplane, MapWriter) {
        let sizes = MapSizes { services: 1024, backends, conntrack: 1024 };
        let mut dp = Dataplane::load_unpinned(sizes).expect("loading the programs (needs root)");
        let writer = MapWriter::open(&mut dp).unwrap();
        (dp, writer)
    }

    /// Per frontend, what a packet finds: flags, affinity timeout, the Service port counted,
    /// and the backends of its two groups.
    type Seen = BTreeMap<ServiceKey, (u16, u32, Option<GroupName>, Vec<Backend>, Vec<Backend>)>;

    /// The names in `XLB_SERVICE_NAMES`, read back.
    fn names(w: &MapWriter) -> BTreeMap<u32, String> {
        let names = w.service_names.iter().map(Result::unwrap);
        names.map(|(slot, name)| (slot, name.as_str().unwrap().to_string())).collect()
    }

    /// What the maps hold, checking on the way that every slot is one of a desired group or
    /// one a frontend can pick, that one group name has one id, that every counter slot in
    /// use, and no other, is named after the Service port it counts, and that the writer knows
    /// the maps as they are.
    fn seen(w: &MapWriter, desired: &DesiredState) -> Seen {
        let services: BTreeMap<ServiceKey, ServiceValue> = w.services.iter().map(Result::unwrap).collect();
        let slots: BTreeMap<BackendKey, Backend> = w.backends.iter().map(Result::unwrap).collect();
        let ranges: BTreeSet<SourceRange> =
            w.source_ranges.keys().map(|k| source_range(&k.unwrap())).collect();
        assert_eq!((&w.frontends, &w.slots, &w.ranges), (&services, &slots, &ranges));
        let named: BTreeMap<u32, ServicePortName> = w.service_names.iter().map(Result::unwrap).collect();
        assert_eq!(named, w.names);
        let counted: BTreeMap<u32, String> =
            w.counted.iter().map(|(index, port)| (u32::from(*index), port.to_string())).collect();
        assert_eq!(names(w), counted);
        assert_eq!(ranges, desired.source_ranges);
        let read = slots_read(services.values());
        for key in slots.keys() {
            let desired_len =
                w.group_ids.name(key.group_id).and_then(|name| desired.groups.get(name)).map(Vec::len);
            let read = read.get(&key.group_id).is_some_and(|count| u32::from(*count) > key.slot);
            assert!(read || desired_len.is_some_and(|len| len > key.slot as usize), "{key:?}");
        }
        let mut ids: BTreeMap<&GroupName, u32> = BTreeMap::new();
        for (key, value) in &services {
            let fe = &desired.frontends[key];
            for (name, id) in [(&fe.group, value.group_id), (&fe.internal_group, value.internal_group_id)] {
                assert_eq!(*ids.entry(name).or_insert(id), id, "{name}");
            }
        }
        let distinct: BTreeSet<u32> = ids.values().copied().collect();
        assert_eq!(distinct.len(), ids.len());
        let backends =
            |id, count| (0..u32::from(count)).map(|slot| slots[&BackendKey { group_id: id, slot }]).collect();
        let seen = services.iter().map(|(key, v)| {
            let counted = w.counted.get(&v.stats_index).cloned();
            let groups =
                (backends(v.group_id, v.backend_count), backends(v.internal_group_id, v.internal_count));
            (*key, (v.flags, v.affinity_timeout_s, counted, groups.0, groups.1))
        });
        seen.collect()
    }

    /// What `desired` asks packets to find.
    fn wanted(desired: &DesiredState) -> Seen {
        let wanted = desired.frontends.iter().map(|(key, fe)| {
            let groups = (desired.groups[&fe.group].clone(), desired.groups[&fe.internal_group].clone());
            (*key, (fe.flags, fe.affinity_timeout_s, Some(fe.service_port.clone()), groups.0, groups.1))
        });
        wanted.collect()
    }

    #[test]
    fn syncing_changes_leaves_the_maps_as_a_full_sync_would() {
        let (_dp, mut w) = writer(4096);
        let mut churn = Churn::new(3);
        let mut desired = Incremental::default();
        for step in 0..600 {
            let what = churn.step();
            let node = churn.node();
            desired.update(&mut churn.store, &node);
            let report = w.sync_changes(&desired);
            assert_eq!(report.failures, Vec::<String>::new(), "{what}");
            assert_eq!(w.synced, Some(desired.revision()));
            assert_eq!(seen(&w, desired.state()), wanted(desired.state()), "step {step}: {what}");
            if step % 100 == 99 {
                w.reread().unwrap();
            }
        }
    }

    fn nodeport(name: &str, n: u8, spec_extra: &str) -> String {
        format!("kind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, clusterIP: 10.96.0.{n}, ports: [{{name: http, port: 80, nodePort: {}}}]{spec_extra}}}\n---\n", 30000 + u16::from(n))
    }

    fn slice(service: &str, addrs: &[&str]) -> String {
        let endpoints: Vec<String> =
            addrs.iter().map(|a| format!("{{addresses: [{a}], nodeName: node-a}}")).collect();
        format!("kind: EndpointSlice\nmetadata: {{name: {service}-1, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{}]\n---\n", endpoints.join(", "))
    }

    fn apply(store: &mut Store, yaml: &str) {
        for object in parse_str(yaml).unwrap().objects {
            store.apply(&object, "test").unwrap();
        }
    }

    const NODE: NodeContext<'static> =
        NodeContext { name: "node-a", addrs: &[Ipv4Addr::new(198, 18, 0, 1)], default_snat_addr: None };

    /// Updates `desired` from `store` and syncs its changes: (written, deleted).
    fn sync(w: &mut MapWriter, store: &mut Store, desired: &mut Incremental) -> (usize, usize) {
        desired.update(store, &NODE);
        let report = w.sync_changes(desired);
        assert_eq!(report.failures, Vec::<String>::new());
        assert_eq!(seen(w, desired.state()), wanted(desired.state()));
        (report.written, report.deleted)
    }

    #[test]
    fn a_change_to_one_service_is_written_alone_and_a_full_sync_repairs_the_rest() {
        let (_dp, mut w) = writer(1024);
        let (mut store, mut desired) = (Store::default(), Incremental::default());
        for n in 1..=10 {
            let name = format!("svc{n}");
            apply(&mut store, &(nodeport(&name, n, "") + &slice(&name, &["10.244.1.1", "10.244.1.2"])));
        }
        // 10 Services: 2 frontends, 2 slots and a counter slot name each; and the node
        // config, with the layout version.
        assert_eq!(sync(&mut w, &mut store, &mut desired), (51, 0));
        // Drift the maps by hand: a changes-only sync does not look there.
        let svc9 = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 9), 80, TCP);
        w.services.remove(&svc9).unwrap();
        apply(&mut store, &slice("svc5", &["10.244.1.1", "10.244.1.3"]));
        desired.update(&mut store, &NODE);
        assert_eq!(w.sync_changes(&desired).written, 1);
        assert!(w.services.get(&svc9, 0).is_err());
        // One more endpoint: its slot, then both frontends with the new count.
        apply(&mut store, &slice("svc5", &["10.244.1.1", "10.244.1.3", "10.244.1.4"]));
        desired.update(&mut store, &NODE);
        assert_eq!((w.sync_changes(&desired).written, w.synced), (3, Some(desired.revision())));
        // The periodic full sync reads the maps back and repairs them.
        w.reread().unwrap();
        assert_eq!(sync(&mut w, &mut store, &mut desired), (1, 0));
        // A deleted Service: its frontends, then its slots and its counter slot's name.
        store
            .delete(&ObjectKey::Service(NamespacedName { namespace: "default".into(), name: "svc5".into() }));
        assert_eq!(sync(&mut w, &mut store, &mut desired), (0, 6));
        assert!(!w.counted.values().any(|port| &**port == "default/svc5:http/TCP"));
    }

    #[test]
    fn a_group_whose_frontends_now_want_another_moves_to_a_new_id() {
        let (_dp, mut w) = writer(1024);
        let (mut store, mut desired) = (Store::default(), Incremental::default());
        apply(&mut store, &(nodeport("web", 1, "") + &slice("web", &["10.244.1.1", "10.244.2.2"])));
        sync(&mut w, &mut store, &mut desired);
        let cluster_ip = ServiceKey::new(Ipv4Addr::new(10, 96, 0, 1), 80, TCP);
        let before = w.frontends[&cluster_ip];
        // The ClusterIP frontend now reads the Local group; the NodePort keeps the Cluster one.
        apply(&mut store, &nodeport("web", 1, ", internalTrafficPolicy: Local"));
        sync(&mut w, &mut store, &mut desired);
        let after = w.frontends[&cluster_ip];
        let ids = [after.group_id, w.frontends[&ServiceKey::new(NODE.addrs[0], 30001, TCP)].group_id];
        assert!(!ids.contains(&before.group_id), "{before:?} {after:?}");
        assert!(!w.slots.keys().any(|k| k.group_id == before.group_id));
    }

    #[test]
    fn after_a_failed_sync_the_next_one_diffs_everything() {
        // Room for 3 backend slots only.
        let (_dp, mut w) = writer(3);
        let (mut store, mut desired) = (Store::default(), Incremental::default());
        apply(&mut store, &(nodeport("a", 1, "") + &slice("a", &["10.244.1.1", "10.244.1.2"])));
        sync(&mut w, &mut store, &mut desired);
        apply(&mut store, &(nodeport("b", 2, "") + &slice("b", &["10.244.2.1", "10.244.2.2"])));
        desired.update(&mut store, &NODE);
        let report = w.sync_changes(&desired);
        assert_eq!(report.failures.len(), 3, "{:?}", report.failures);
        assert_eq!(
            report.failures[0],
            "Service default/b:http/TCP: backend slot 1 not written, map XLB_BACKENDS is full, raise --max-backends"
        );
        assert_eq!(w.synced, None);
        // b's one slot written is pruned by the full diff that follows.
        store.delete(&ObjectKey::Service(NamespacedName { namespace: "default".into(), name: "b".into() }));
        sync(&mut w, &mut store, &mut desired);
        assert_eq!(w.slots.len(), 2);
    }

    fn service(name: &str) -> ObjectKey {
        ObjectKey::Service(NamespacedName { namespace: "default".into(), name: name.into() })
    }

    fn named(pairs: &[(u32, &str)]) -> BTreeMap<u32, String> {
        pairs.iter().map(|(slot, service)| (*slot, format!("default/{service}:http/TCP"))).collect()
    }

    #[test]
    fn a_counter_slot_is_named_while_it_counts_a_service_port_and_renamed_when_reused() {
        let (_dp, mut w) = writer(1024);
        let (mut store, mut desired) = (Store::default(), Incremental::default());
        apply(&mut store, &(nodeport("a", 1, "") + &slice("a", &["10.244.1.1"])));
        sync(&mut w, &mut store, &mut desired);
        assert_eq!((names(&w), w.frontends[&key(1)].stats_index), (named(&[(1, "a")]), 1));
        // Another Service port: another slot, another name.
        apply(&mut store, &(nodeport("b", 2, "") + &slice("b", &["10.244.1.2"])));
        sync(&mut w, &mut store, &mut desired);
        assert_eq!(names(&w), named(&[(1, "a"), (2, "b")]));
        // A deleted Service: 2 frontends, then its backend slot and its counter slot's name.
        store.delete(&service("a"));
        assert_eq!(sync(&mut w, &mut store, &mut desired), (0, 4));
        assert_eq!(names(&w), named(&[(2, "b")]));
        // The freed counter slot, given to the next new Service port, is named after it.
        apply(&mut store, &(nodeport("c", 3, "") + &slice("c", &["10.244.1.3"])));
        sync(&mut w, &mut store, &mut desired);
        assert_eq!((names(&w), w.frontends[&key(3)].stats_index), (named(&[(1, "c"), (2, "b")]), 1));
        // Names removed or changed by hand come back with the next full sync; a stray one goes.
        w.service_names.remove(&1).unwrap();
        w.service_names.insert(2, ServicePortName::new("default/x:http/TCP"), 0).unwrap();
        w.service_names.insert(9, ServicePortName::new("default/y:http/TCP"), 0).unwrap();
        w.reread().unwrap();
        assert_eq!(sync(&mut w, &mut store, &mut desired), (2, 1));
        assert_eq!(names(&w), named(&[(1, "c"), (2, "b")]));
    }

    /// Removes the pins under its directory when dropped.
    struct Pins(std::path::PathBuf);

    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = crate::dataplane::cleanup(&self.0);
        }
    }

    /// The packets counted in each slot of `slots`, summed over CPUs.
    fn packets(w: &MapWriter, slots: &[u32]) -> Vec<u64> {
        let per_cpu = slots.iter().map(|slot| w.stats.get(slot, 0).unwrap());
        per_cpu.map(|values| values.iter().map(|s| s.packets).sum()).collect()
    }

    #[test]
    fn a_restarted_writer_keeps_the_counters_of_slots_named_after_the_service_port_they_still_count() {
        let dir = std::path::Path::new("/sys/fs/bpf").join(format!("xlb-writer-test-{}", std::process::id()));
        let _pins = Pins(dir.clone());
        let sizes = MapSizes { services: 1024, backends: 1024, conntrack: 1024 };
        let mut store = Store::default();
        for (n, name) in [(1, "a"), (2, "b"), (3, "d")] {
            apply(&mut store, &(nodeport(name, n, "") + &slice(name, &[&format!("10.244.1.{n}")])));
        }
        let cpus = aya::util::nr_cpus().unwrap();
        {
            let mut dp = Dataplane::load_pinned(&dir, sizes).expect("loading the programs (needs root)");
            let mut w = MapWriter::open(&mut dp).unwrap();
            sync(&mut w, &mut store, &mut Incremental::default());
            assert_eq!(names(&w), named(&[(1, "a"), (2, "b"), (3, "d")]));
            // Traffic on every slot: 5 packets on each CPU.
            let traffic = vec![ServiceStats { packets: 5, bytes: 500 }; cpus];
            for slot in 1..=3 {
                w.stats.set(slot, PerCpuValues::try_from(traffic.clone()).unwrap(), 0).unwrap();
            }
        }
        // While no agent runs: slot 2's name is changed by hand, d is deleted and c added.
        let pin = aya::maps::MapData::from_pin(dir.join(maps::SERVICE_NAMES)).unwrap();
        let mut pinned: aya::maps::HashMap<_, u32, ServicePortName> =
            aya::maps::Map::HashMap(pin).try_into().unwrap();
        pinned.insert(2, ServicePortName::new("default/x:http/TCP"), 0).unwrap();
        store.delete(&service("d"));
        apply(&mut store, &(nodeport("c", 4, "") + &slice("c", &["10.244.1.4"])));

        let mut dp = Dataplane::load_pinned(&dir, sizes).unwrap();
        let mut w = MapWriter::open(&mut dp).unwrap();
        // The slots' names are what the new writer believes they count.
        let adopted: BTreeMap<u16, &str> = w.counted.iter().map(|(i, port)| (*i, &**port)).collect();
        assert_eq!(
            adopted,
            [(1, "default/a:http/TCP"), (2, "default/x:http/TCP"), (3, "default/d:http/TCP")].into()
        );
        sync(&mut w, &mut store, &mut Incremental::default());
        // a still counts in slot 1, as named: its counters go on. Slot 2 counted another Service
        // port as far as its name says: zeroed for b. d's slot is freed with its name; c takes a
        // slot no frontend used.
        assert_eq!(names(&w), named(&[(1, "a"), (2, "b"), (4, "c")]));
        assert_eq!(packets(&w, &[1, 2, 4]), [5 * cpus as u64, 0, 0]);
    }

    #[test]
    fn a_restarted_writer_keeps_the_counters_of_an_unnamed_port_named_with_the_colon_of_older_agents() {
        let dir = std::path::Path::new("/sys/fs/bpf")
            .join(format!("xlb-writer-legacy-test-{}", std::process::id()));
        let _pins = Pins(dir.clone());
        let sizes = MapSizes { services: 1024, backends: 1024, conntrack: 1024 };
        let mut store = Store::default();
        let unnamed = "kind: Service\nmetadata: {name: u}\nspec: {type: NodePort, clusterIP: 10.96.0.9, ports: [{port: 80, nodePort: 30009}]}\n---\nkind: EndpointSlice\nmetadata: {name: u-1, labels: {kubernetes.io/service-name: u}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.1.9], nodeName: node-a}]\n";
        apply(&mut store, unnamed);
        let cpus = aya::util::nr_cpus().unwrap();
        {
            let mut dp = Dataplane::load_pinned(&dir, sizes).expect("loading the programs (needs root)");
            let mut w = MapWriter::open(&mut dp).unwrap();
            sync(&mut w, &mut store, &mut Incremental::default());
            assert_eq!(names(&w), [(1, "default/u/TCP".to_string())].into());
            let traffic = vec![ServiceStats { packets: 5, bytes: 500 }; cpus];
            w.stats.set(1, PerCpuValues::try_from(traffic).unwrap(), 0).unwrap();
        }
        // As an agent before kube-proxy's form named the slot.
        let pin = aya::maps::MapData::from_pin(dir.join(maps::SERVICE_NAMES)).unwrap();
        let mut pinned: aya::maps::HashMap<_, u32, ServicePortName> =
            aya::maps::Map::HashMap(pin).try_into().unwrap();
        pinned.insert(1, ServicePortName::new("default/u:/TCP"), 0).unwrap();

        let mut dp = Dataplane::load_pinned(&dir, sizes).unwrap();
        let mut w = MapWriter::open(&mut dp).unwrap();
        let adopted: BTreeMap<u16, &str> = w.counted.iter().map(|(i, port)| (*i, &**port)).collect();
        assert_eq!(adopted, [(1, "default/u/TCP")].into());
        sync(&mut w, &mut store, &mut Incremental::default());
        // Renamed, not zeroed.
        assert_eq!(names(&w), [(1, "default/u/TCP".to_string())].into());
        assert_eq!(packets(&w, &[1]), [5 * cpus as u64]);
    }
}
