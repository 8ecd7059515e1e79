//! The one map writer: diffs desired state against what the maps hold and writes only the
//! difference, in an order that never shows a packet a half-built Service.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, HashMap, MapData};
use lb_common::{
    backend::{Backend, BackendKey},
    config::NodeConfig,
    maps,
    service::{ServiceKey, ServiceValue},
};

use super::{Dataplane, DataplaneError};
use crate::desired::DesiredState;

/// What one sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub frontends: usize,
    pub backends: usize,
    pub written: usize,
    pub deleted: usize,
    /// One line per entry that could not be written (e.g. a full map), naming the group.
    pub failures: Vec<String>,
}

pub struct MapWriter {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, Backend>,
    config: Array<MapData, NodeConfig>,
    /// What the maps hold, as far as this writer knows: read back from the maps at open,
    /// so a restarted agent adopts pinned state and prunes only what is no longer right.
    frontends: BTreeMap<ServiceKey, ServiceValue>,
    slots: BTreeMap<BackendKey, Backend>,
    node_config: NodeConfig,
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl MapWriter {
    pub fn open(dp: &mut Dataplane) -> Result<Self, DataplaneError> {
        let services: HashMap<_, ServiceKey, ServiceValue> =
            dp.take_map(maps::SERVICES)?.try_into().map_err(map_err(maps::SERVICES))?;
        let backends: HashMap<_, BackendKey, Backend> =
            dp.take_map(maps::BACKENDS)?.try_into().map_err(map_err(maps::BACKENDS))?;
        let config: Array<_, NodeConfig> =
            dp.take_map(maps::CONFIG)?.try_into().map_err(map_err(maps::CONFIG))?;
        let frontends = services.iter().collect::<Result<_, _>>().map_err(map_err(maps::SERVICES))?;
        let slots = backends.iter().collect::<Result<_, _>>().map_err(map_err(maps::BACKENDS))?;
        let node_config = config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        Ok(Self { services, backends, config, frontends, slots, node_config })
    }

    /// Numeric ids for the desired groups. A group keeps the id its frontends already point
    /// to in the maps, if every frontend on that id stays in the group (so rewriting its slots
    /// never sends another Service's frontend to this group's backends, even briefly); other
    /// groups get ids no entry in the maps uses.
    fn group_ids(&self, desired: &DesiredState) -> BTreeMap<String, u32> {
        let mut on_id: BTreeMap<u32, Vec<&ServiceKey>> = BTreeMap::new();
        for (key, value) in &self.frontends {
            on_id.entry(value.group_id).or_default().push(key);
        }
        let mut ids = BTreeMap::new();
        let mut taken = BTreeSet::new();
        for (key, frontend) in &desired.frontends {
            let Some(current) = self.frontends.get(key) else { continue };
            let whole_group_stays = on_id[&current.group_id]
                .iter()
                .all(|k| desired.frontends.get(*k).is_some_and(|f| f.group == frontend.group));
            if whole_group_stays && !ids.contains_key(&frontend.group) && taken.insert(current.group_id) {
                ids.insert(frontend.group.clone(), current.group_id);
            }
        }
        let in_use: BTreeSet<u32> = self
            .frontends
            .values()
            .map(|v| v.group_id)
            .chain(self.slots.keys().map(|k| k.group_id))
            .chain(taken.iter().copied())
            .collect();
        let mut next = 1u32;
        for name in desired.groups.keys() {
            if !ids.contains_key(name) {
                while in_use.contains(&next) {
                    next += 1;
                }
                ids.insert(name.clone(), next);
                next += 1;
            }
        }
        ids
    }

    /// Makes the maps hold `desired`. Order: backend slots, then frontends (add or change),
    /// then removed frontends, then removed slots: a frontend only ever points at complete
    /// slots.
    pub fn sync(&mut self, desired: &DesiredState) -> SyncReport {
        let ids = self.group_ids(desired);
        let mut target_slots = BTreeMap::new();
        for (name, backends) in &desired.groups {
            for (slot, backend) in backends.iter().enumerate() {
                target_slots.insert(BackendKey { group_id: ids[name], slot: slot as u32 }, *backend);
            }
        }
        let target_frontends: BTreeMap<ServiceKey, ServiceValue> = desired
            .frontends
            .iter()
            .map(|(key, fe)| {
                let count = desired.groups.get(&fe.group).map_or(0, Vec::len);
                let value = ServiceValue {
                    group_id: ids[&fe.group],
                    backend_count: u16::try_from(count).unwrap_or(u16::MAX),
                    flags: fe.flags,
                };
                (*key, value)
            })
            .collect();
        let group_of =
            |id: u32| ids.iter().find(|(_, v)| **v == id).map_or("?", |(k, _)| k.as_str()).to_string();

        let mut report = SyncReport {
            frontends: target_frontends.len(),
            backends: target_slots.len(),
            ..Default::default()
        };
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
        for (key, value) in &target_frontends {
            if self.frontends.get(key) == Some(value) {
                continue;
            }
            if broken_groups.contains(&value.group_id) {
                report.failures.push(format!(
                    "{}: frontend {}:{} left as it was: backends incomplete",
                    group_of(value.group_id),
                    key.ip(),
                    key.host_port()
                ));
                continue;
            }
            match self.services.insert(key, value, 0) {
                Ok(()) => {
                    self.frontends.insert(*key, *value);
                    report.written += 1;
                }
                Err(e) => report.failures.push(format!(
                    "{}: frontend {}:{}: {e}",
                    group_of(value.group_id),
                    key.ip(),
                    key.host_port()
                )),
            }
        }
        let stale_frontends: Vec<ServiceKey> =
            self.frontends.keys().filter(|k| !target_frontends.contains_key(k)).copied().collect();
        for key in stale_frontends {
            match self.services.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                    self.frontends.remove(&key);
                    report.deleted += 1;
                }
                Err(e) => {
                    report.failures.push(format!("removing frontend {}:{}: {e}", key.ip(), key.host_port()))
                }
            }
        }
        // A slot goes only when no frontend, as the maps now hold them, can still pick it
        // (one left as it was because its new backends did not fit keeps its old slots).
        let still_read = |k: &BackendKey| {
            self.frontends.values().any(|v| v.group_id == k.group_id && u32::from(v.backend_count) > k.slot)
        };
        let stale_slots: Vec<BackendKey> =
            self.slots.keys().filter(|k| !target_slots.contains_key(k) && !still_read(k)).copied().collect();
        for key in stale_slots {
            match self.backends.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
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
