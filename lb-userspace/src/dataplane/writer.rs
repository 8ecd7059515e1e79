//! The one map writer: diffs desired state against what the maps hold and writes only the
//! difference, in an order that never shows a packet a half-built Service.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use aya::maps::{
    lpm_trie::{Key, LpmTrie},
    Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues,
};
use lb_common::{
    backend::{Backend, BackendKey},
    config::NodeConfig,
    maps,
    service::{ServiceKey, ServiceValue},
    source_range::{SourceRangeKey, SOURCE_RANGE_FRONTEND_BITS},
    stats::{ServiceStats, SERVICE_STATS_MAX},
};

use super::{Dataplane, DataplaneError};
use crate::desired::{DesiredState, SourceRange};

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
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    config: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, ServiceStats>,
    /// What the maps hold, as far as this writer knows: read back from the maps at open,
    /// so a restarted agent adopts pinned state and prunes only what is no longer right.
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<BackendKey, Backend>,
    ranges: BTreeSet<SourceRange>,
    node_config: NodeConfig,
    /// The Service port each counter slot in use counts.
    counted: BTreeMap<u16, String>,
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

/// Numeric ids for `names`, from `1..limit`. A name keeps an id the maps already use if
/// every use of it (`uses`: an id and the name its user wants now, `None` for a user going
/// away) wants this name, so rewriting what the id points at never sends another name's
/// packets there, even briefly. Other names get ids nothing in the maps uses (`uses` and
/// `also_in_use`); names beyond `limit` get none.
fn assign_ids<'a>(
    uses: impl IntoIterator<Item = (u32, Option<&'a String>)>,
    also_in_use: impl IntoIterator<Item = u32>,
    names: impl IntoIterator<Item = &'a String>,
    limit: u32,
) -> BTreeMap<String, u32> {
    let mut wanted_on_id: BTreeMap<u32, Vec<Option<&String>>> = BTreeMap::new();
    for (id, wanted) in uses {
        wanted_on_id.entry(id).or_default().push(wanted);
    }
    let mut ids = BTreeMap::new();
    for (id, wanted) in &wanted_on_id {
        if let Some(Some(name)) = wanted.first() {
            if wanted.iter().all(|w| *w == Some(*name)) && !ids.contains_key(*name) {
                ids.insert((*name).clone(), *id);
            }
        }
    }
    let in_use: BTreeSet<u32> = wanted_on_id.keys().copied().chain(also_in_use).collect();
    let mut next = 1u32;
    for name in names {
        if !ids.contains_key(name) {
            while in_use.contains(&next) {
                next += 1;
            }
            if next >= limit {
                break;
            }
            ids.insert(name.clone(), next);
            next += 1;
        }
    }
    ids
}

/// Numeric ids for the desired backend groups, read through `group_id` or
/// `internal_group_id`; ids of slots still in the maps are not reused.
fn group_ids(
    frontends: &BTreeMap<ServiceKey, ServiceValue>,
    slots: &BTreeMap<BackendKey, Backend>,
    desired: &DesiredState,
) -> BTreeMap<String, u32> {
    let uses = frontends.iter().flat_map(|(key, value)| {
        let wanted = desired.frontends.get(key);
        [
            (value.group_id, wanted.map(|f| &f.group)),
            (value.internal_group_id, wanted.map(|f| &f.internal_group)),
        ]
    });
    assign_ids(uses, slots.keys().map(|k| k.group_id), desired.groups.keys(), u32::MAX)
}

/// Counter slots for the desired Service ports (`Frontend::service_port`). Slot 0 means "not
/// counted": past `SERVICE_STATS_MAX` Service ports, the rest go uncounted.
fn stats_indices(
    frontends: &BTreeMap<ServiceKey, ServiceValue>,
    desired: &DesiredState,
) -> BTreeMap<String, u16> {
    let uses = frontends.iter().filter(|(_, v)| v.stats_index != 0).map(|(key, value)| {
        (u32::from(value.stats_index), desired.frontends.get(key).map(|f| &f.service_port))
    });
    let names: BTreeSet<&String> = desired.frontends.values().map(|f| &f.service_port).collect();
    let ids = assign_ids(uses, [], names, SERVICE_STATS_MAX);
    ids.into_iter().map(|(name, id)| (name, u16::try_from(id).unwrap_or(0))).collect()
}

/// Per group id, how many of its slots the frontends may pick from: the highest count any
/// frontend reads it with.
fn slots_read(frontends: &BTreeMap<ServiceKey, ServiceValue>) -> BTreeMap<u32, u16> {
    let mut read: BTreeMap<u32, u16> = BTreeMap::new();
    for v in frontends.values() {
        for (id, count) in [(v.group_id, v.backend_count), (v.internal_group_id, v.internal_count)] {
            let max = read.entry(id).or_default();
            *max = (*max).max(count);
        }
    }
    read
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
            frontends: BTreeMap::new(),
            slots: BTreeMap::new(),
            ranges: BTreeSet::new(),
            node_config: NodeConfig::default(),
            counted: BTreeMap::new(),
        };
        writer.reread()?;
        Ok(writer)
    }

    /// Reads back what the maps hold, forgetting what this writer believed: the next sync
    /// then repairs any drift (an entry removed or changed by hand, e.g. with bpftool).
    pub fn reread(&mut self) -> Result<(), DataplaneError> {
        self.frontends = self.services.iter().collect::<Result<_, _>>().map_err(map_err(maps::SERVICES))?;
        self.slots = self.backends.iter().collect::<Result<_, _>>().map_err(map_err(maps::BACKENDS))?;
        self.ranges = self
            .source_ranges
            .keys()
            .map(|key| key.map(|k| source_range(&k)))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SOURCE_RANGES))?;
        self.node_config = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        Ok(())
    }

    /// The Service port (`ns/name:port/PROTO`) each counter slot in `XLB_SERVICE_STATS`
    /// counts, as of the last sync.
    pub fn counted(&self) -> &BTreeMap<u16, String> {
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

    /// Makes the maps hold `desired`. Order: backend slots, new source ranges, frontends (add
    /// or change), removed frontends, removed source ranges, removed slots: a frontend only
    /// ever points at complete slots and finds all of its ranges.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let ids = group_ids(&self.frontends, &self.slots, desired);
        let counters = stats_indices(&self.frontends, desired);
        let mut target_slots = BTreeMap::new();
        for (name, backends) in &desired.groups {
            for (slot, backend) in backends.iter().enumerate() {
                target_slots.insert(BackendKey { group_id: ids[name], slot: slot as u32 }, *backend);
            }
        }
        let count =
            |name: &String| u16::try_from(desired.groups.get(name).map_or(0, Vec::len)).unwrap_or(u16::MAX);
        let target_frontends: BTreeMap<ServiceKey, ServiceValue> = desired
            .frontends
            .iter()
            .map(|(key, fe)| {
                let value = ServiceValue {
                    group_id: ids[&fe.group],
                    internal_group_id: ids[&fe.internal_group],
                    backend_count: count(&fe.group),
                    internal_count: count(&fe.internal_group),
                    flags: fe.flags,
                    stats_index: counters.get(&fe.service_port).copied().unwrap_or(0),
                    affinity_timeout_s: fe.affinity_timeout_s,
                };
                (*key, value)
            })
            .collect();
        let group_of =
            |id: u32| ids.iter().find(|(_, v)| **v == id).map_or("?", |(k, _)| k.as_str()).to_string();

        let mut report = SyncReport {
            frontends: target_frontends.len(),
            backends: target_slots.len(),
            source_ranges: desired.source_ranges.len(),
            ..Default::default()
        };
        // A slot starts counting a Service port from zero, before any frontend points at it.
        for (name, index) in &counters {
            if self.counted.get(index) != Some(name) {
                match self.reset_counters(*index) {
                    Ok(()) => {
                        self.counted.insert(*index, name.clone());
                    }
                    Err(e) => report.failures.push(format!("{name}: resetting counter slot {index}: {e}")),
                }
            }
        }
        self.counted.retain(|index, name| counters.get(name) == Some(index));
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
                        "{}: backend slot {}: {e}",
                        group_of(key.group_id),
                        key.slot
                    ));
                }
            }
        }
        // A range that cannot be written does not hold its frontend back: the frontend then
        // admits fewer clients than desired, never more.
        let new_ranges: Vec<SourceRange> = desired.source_ranges.difference(&self.ranges).copied().collect();
        for range in new_ranges {
            match self.source_ranges.insert(&trie_key(&range), 1, 0) {
                Ok(()) => {
                    self.ranges.insert(range);
                    report.written += 1;
                }
                Err(e) => report.failures.push(format!(
                    "{}: source range {}/{}: {e}",
                    frontend_name(&range.0),
                    range.1,
                    range.2
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
                    "{}: frontend {} left as it was: backends incomplete",
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
                    "{}: frontend {}: {e}",
                    group_of(value.group_id),
                    frontend_name(key)
                )),
            }
        }
        let stale_frontends: Vec<ServiceKey> =
            self.frontends.keys().filter(|k| !target_frontends.contains_key(k)).copied().collect();
        for key in stale_frontends {
            match self.services.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.frontends.remove(&key);
                    report.deleted += 1;
                }
                Err(e) => report.failures.push(format!("removing frontend {}: {e}", frontend_name(&key))),
            }
        }
        let stale_ranges: Vec<SourceRange> =
            self.ranges.difference(&desired.source_ranges).copied().collect();
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
        let read = slots_read(&self.frontends);
        let still_read =
            |k: &BackendKey| read.get(&k.group_id).is_some_and(|count| u32::from(*count) > k.slot);
        let stale_slots: Vec<BackendKey> =
            self.slots.keys().filter(|k| !target_slots.contains_key(k) && !still_read(k)).copied().collect();
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
        let node_config =
            NodeConfig { snat_addr: desired.snat_addr.map_or(0, |a| u32::from(a).to_be()), _pad: 0 };
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
    use crate::desired::Frontend;
    use lb_common::proto::TCP;

    fn key(last: u8) -> ServiceKey {
        ServiceKey::new(Ipv4Addr::new(10, 96, 0, last), 80, TCP)
    }

    /// A frontend in the maps reading `group_id` (count 2) and `internal_group_id` (count 1).
    fn value(group_id: u32, internal_group_id: u32) -> ServiceValue {
        ServiceValue {
            group_id,
            internal_group_id,
            backend_count: 2,
            internal_count: 1,
            flags: 0,
            stats_index: 0,
            affinity_timeout_s: 0,
        }
    }

    /// Desired frontends (key, group, internal group); every named group exists.
    fn desired(frontends: &[(ServiceKey, &str, &str)]) -> DesiredState {
        let mut state = DesiredState::default();
        for (key, group, internal_group) in frontends {
            let fe = Frontend {
                group: group.to_string(),
                internal_group: internal_group.to_string(),
                flags: 0,
                affinity_timeout_s: 0,
                service_port: group.to_string(),
            };
            state.frontends.insert(*key, fe);
            for name in [group, internal_group] {
                state.groups.insert(name.to_string(), vec![]);
            }
        }
        state
    }

    fn ids(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
        pairs.iter().map(|(name, id)| (name.to_string(), *id)).collect()
    }

    const NO_SLOTS: BTreeMap<BackendKey, Backend> = BTreeMap::new();

    #[test]
    fn groups_keep_the_ids_they_are_read_through_by_either_field() {
        let maps = [(key(1), value(5, 5)), (key(2), value(7, 5)), (key(3), value(7, 5))].into();
        let want =
            desired(&[(key(1), "web", "web"), (key(2), "web local", "web"), (key(3), "web local", "web")]);
        assert_eq!(group_ids(&maps, &NO_SLOTS, &want), ids(&[("web", 5), ("web local", 7)]));
    }

    #[test]
    fn an_id_is_not_kept_when_its_frontends_now_want_different_groups() {
        // key(1) read group 5 through both fields; now its outside clients go to "web local".
        let maps = [(key(1), value(5, 5))].into();
        let want = desired(&[(key(1), "web local", "web")]);
        assert_eq!(group_ids(&maps, &NO_SLOTS, &want), ids(&[("web", 1), ("web local", 2)]));
        // Or a frontend on the id goes away while another stays.
        let maps = [(key(1), value(5, 5)), (key(2), value(5, 5))].into();
        let want = desired(&[(key(1), "web", "web")]);
        assert_eq!(group_ids(&maps, &NO_SLOTS, &want), ids(&[("web", 1)]));
    }

    #[test]
    fn new_ids_skip_every_id_frontends_or_slots_in_the_maps_use() {
        let maps = [(key(1), value(1, 3))].into();
        let slots =
            [(BackendKey { group_id: 2, slot: 0 }, Backend::new(Ipv4Addr::new(10, 244, 1, 1), 80, 0))].into();
        let want = desired(&[(key(2), "a", "b")]);
        assert_eq!(group_ids(&maps, &slots, &want), ids(&[("a", 4), ("b", 5)]));
    }

    #[test]
    fn slots_read_per_id_is_the_highest_count_through_either_field() {
        let maps = [(key(1), value(5, 7)), (key(2), value(7, 5))].into();
        assert_eq!(slots_read(&maps), [(5, 2), (7, 2)].into());
        let maps = [(key(1), value(5, 7))].into();
        assert_eq!(slots_read(&maps), [(5, 2), (7, 1)].into());
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

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn assign_ids_gives_new_names_the_lowest_ids_not_in_use_and_none_from_the_limit_on() {
        let wanted = names(&["a", "b", "c", "d"]);
        let assigned = assign_ids([], [1, 3], &wanted, 5);
        assert_eq!(assigned, ids(&[("a", 2), ("b", 4)]));
        assert_eq!(assign_ids([], [], &wanted, u32::MAX), ids(&[("a", 1), ("b", 2), ("c", 3), ("d", 4)]));
        assert_eq!(assign_ids([], [], &wanted, 1), ids(&[]));
    }

    #[test]
    fn assign_ids_keeps_an_id_only_when_every_use_wants_the_name_and_a_name_only_once() {
        let (a, b, c) = ("a".to_string(), "b".to_string(), "c".to_string());
        let uses = [
            // a is wanted on 4 and 6: it keeps the lower; 6 stays in use.
            (6, Some(&a)),
            (4, Some(&a)),
            (4, Some(&a)),
            // A user of 8 goes away: b cannot keep it.
            (8, Some(&b)),
            (8, None),
            // 2 is wanted by b and c: neither keeps it.
            (2, Some(&b)),
            (2, Some(&c)),
        ];
        let wanted = names(&["a", "b", "c"]);
        assert_eq!(assign_ids(uses, [], &wanted, u32::MAX), ids(&[("a", 4), ("b", 1), ("c", 3)]));
    }

    #[test]
    fn assign_ids_lets_a_name_keep_its_id_when_the_limit_leaves_new_names_without_one() {
        let z = "z".to_string();
        let wanted = names(&["a", "b", "z"]);
        // Only ids 1 and 2 exist: z keeps 2, a takes 1, b gets none.
        assert_eq!(assign_ids([(2, Some(&z))], [], &wanted, 3), ids(&[("a", 1), ("z", 2)]));
    }

    /// A frontend in the maps counted in slot `stats_index`.
    fn counted(stats_index: u16) -> ServiceValue {
        ServiceValue { stats_index, ..value(1, 1) }
    }

    /// Desired frontends (key, group, Service port).
    fn desired_ports(frontends: &[(ServiceKey, &str, &str)]) -> DesiredState {
        let mut state = DesiredState::default();
        for (key, group, service_port) in frontends {
            let fe = Frontend {
                group: group.to_string(),
                internal_group: group.to_string(),
                flags: 0,
                affinity_timeout_s: 0,
                service_port: service_port.to_string(),
            };
            state.frontends.insert(*key, fe);
            state.groups.insert(group.to_string(), vec![]);
        }
        state
    }

    fn slots(pairs: &[(&str, u16)]) -> BTreeMap<String, u16> {
        pairs.iter().map(|(name, slot)| (name.to_string(), *slot)).collect()
    }

    #[test]
    fn service_ports_get_one_counter_slot_each_from_1() {
        let want =
            desired_ports(&[(key(1), "web", "web"), (key(2), "web local", "web"), (key(3), "db", "db")]);
        assert_eq!(stats_indices(&BTreeMap::new(), &want), slots(&[("db", 1), ("web", 2)]));
    }

    #[test]
    fn service_port_keeps_the_counter_slot_its_frontends_in_the_maps_use() {
        let maps = [(key(1), counted(7)), (key(2), counted(7))].into();
        // key(3) is new: it joins slot 7; db takes the lowest free slot.
        let want = desired_ports(&[
            (key(1), "web", "web"),
            (key(2), "web local", "web"),
            (key(3), "web", "web"),
            (key(4), "db", "db"),
        ]);
        assert_eq!(stats_indices(&maps, &want), slots(&[("db", 1), ("web", 7)]));
    }

    #[test]
    fn counter_slot_is_not_kept_when_one_of_its_frontends_counts_another_service_port_or_goes_away() {
        // key(2) now counts for db: slot 7 would mix web and db.
        let maps = [(key(1), counted(7)), (key(2), counted(7))].into();
        let want = desired_ports(&[(key(1), "web", "web"), (key(2), "db", "db")]);
        assert_eq!(stats_indices(&maps, &want), slots(&[("db", 1), ("web", 2)]));
        // key(2) goes away while still counting in slot 7: slot 7 is not reused either.
        let maps = [(key(1), counted(1)), (key(2), counted(1))].into();
        let want = desired_ports(&[(key(1), "web", "web")]);
        assert_eq!(stats_indices(&maps, &want), slots(&[("web", 2)]));
    }

    #[test]
    fn frontends_in_slot_0_are_uncounted_and_hold_no_slot() {
        let maps = [(key(1), counted(0)), (key(2), counted(0))].into();
        let want = desired_ports(&[(key(1), "web", "web"), (key(2), "db", "db")]);
        assert_eq!(stats_indices(&maps, &want), slots(&[("db", 1), ("web", 2)]));
        // Even when every uncounted frontend wants the same Service port.
        let want = desired_ports(&[(key(1), "web", "web"), (key(2), "web local", "web")]);
        assert_eq!(stats_indices(&maps, &want), slots(&[("web", 1)]));
    }

    #[test]
    fn service_ports_past_the_last_counter_slot_go_uncounted() {
        let service_ports: Vec<(ServiceKey, String)> = (0..SERVICE_STATS_MAX)
            .map(|i| {
                (ServiceKey::new(Ipv4Addr::from(0x0a00_0000 + i), 80, TCP), format!("ns/svc-{i:05}:/TCP"))
            })
            .collect();
        let mut want = DesiredState::default();
        for (key, name) in &service_ports {
            let fe = Frontend {
                group: name.clone(),
                internal_group: name.clone(),
                flags: 0,
                affinity_timeout_s: 0,
                service_port: name.clone(),
            };
            want.frontends.insert(*key, fe);
        }
        let indices = stats_indices(&BTreeMap::new(), &want);
        // Slots 1-65535: one Service port short.
        assert_eq!(indices.len(), usize::from(u16::MAX));
        assert_eq!(indices.values().copied().collect::<BTreeSet<u16>>(), (1..=u16::MAX).collect());
        assert_eq!(indices.get(&service_ports.last().unwrap().1), None);
    }
}
