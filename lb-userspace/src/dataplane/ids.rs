//! Numeric ids for names: a backend group's `group_id`, a Service port's counter slot. The
//! maps know only the numbers, so an id never changes hands while a frontend in the maps
//! may still read it.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use lb_common::{
    backend::{Backend, BackendKey},
    service::{ServiceKey, ServiceValue},
    stats::SERVICE_STATS_MAX,
};

use crate::desired::{DesiredState, GroupName};

/// Numeric ids for `names`, from `1..limit`. A name keeps an id the maps already use if
/// every use of it (`uses`: an id and the name its user wants now, `None` for a user going
/// away) wants this name, so rewriting what the id points at never sends another name's
/// packets there, even briefly. Other names get ids nothing in the maps uses (`uses` and
/// `also_in_use`); names beyond `limit` get none.
pub(super) fn assign_ids<'a>(
    uses: impl IntoIterator<Item = (u32, Option<&'a GroupName>)>,
    also_in_use: impl IntoIterator<Item = u32>,
    names: impl IntoIterator<Item = &'a GroupName>,
    limit: u32,
) -> BTreeMap<GroupName, u32> {
    let mut wanted_on_id: BTreeMap<u32, Vec<Option<&GroupName>>> = BTreeMap::new();
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
/// `internal_group_id`; ids of slots still in the maps are not reused. A group no frontend
/// in the maps wants keeps its `previous` id if no frontend reads that id either: a group
/// whose frontends were refused (a full services map) keeps the slots written for it,
/// rather than writing them under a new id at every sync while the old ones take room.
pub(super) fn group_ids(
    frontends: &BTreeMap<ServiceKey, ServiceValue>,
    slots: &BTreeMap<BackendKey, Backend>,
    desired: &DesiredState,
    previous: &Ids,
) -> BTreeMap<GroupName, u32> {
    let uses: Vec<(u32, Option<&GroupName>)> = frontends
        .iter()
        .flat_map(|(key, value)| {
            let wanted = desired.frontends.get(key);
            [
                (value.group_id, wanted.map(|f| &f.group)),
                (value.internal_group_id, wanted.map(|f| &f.internal_group)),
            ]
        })
        .collect();
    let (read, named): (HashSet<u32>, HashSet<&GroupName>) =
        (uses.iter().map(|(id, _)| *id).collect(), uses.iter().filter_map(|(_, name)| *name).collect());
    let kept = desired.groups.keys().filter(|name| !named.contains(name)).filter_map(|name| {
        let id = previous.get(name).filter(|id| !read.contains(id))?;
        Some((id, Some(name)))
    });
    let uses = uses.iter().copied().chain(kept);
    assign_ids(uses, slots.keys().map(|k| k.group_id), desired.groups.keys(), u32::MAX)
}

/// Counter slots for the desired Service ports (`Frontend::service_port`). Slot 0 means "not
/// counted": past `SERVICE_STATS_MAX` Service ports, the rest go uncounted.
pub(super) fn stats_indices(
    frontends: &BTreeMap<ServiceKey, ServiceValue>,
    desired: &DesiredState,
) -> BTreeMap<GroupName, u16> {
    let uses = frontends.iter().filter(|(_, v)| v.stats_index != 0).map(|(key, value)| {
        (u32::from(value.stats_index), desired.frontends.get(key).map(|f| &f.service_port))
    });
    let distinct: HashSet<&GroupName> = desired.frontends.values().map(|f| &f.service_port).collect();
    let mut names: Vec<&GroupName> = distinct.into_iter().collect();
    names.sort_unstable();
    let ids = assign_ids(uses, [], names, SERVICE_STATS_MAX);
    ids.into_iter().map(|(name, id)| (name, u16::try_from(id).unwrap_or(0))).collect()
}

/// A change reaches past the names it lists (say, a use disputes the id of a name outside
/// them, whose other users are unknown): only a full assignment, which sees every use, will do.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct OutOfScope;

/// Names and their ids, both ways: the assignment the maps were last written with.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Ids {
    by_name: HashMap<GroupName, u32>,
    by_id: BTreeMap<u32, GroupName>,
}

impl FromIterator<(GroupName, u32)> for Ids {
    fn from_iter<I: IntoIterator<Item = (GroupName, u32)>>(pairs: I) -> Self {
        let pairs = pairs.into_iter();
        let mut ids = Self { by_name: HashMap::with_capacity(pairs.size_hint().0), by_id: BTreeMap::new() };
        for (name, id) in pairs {
            ids.by_id.insert(id, name.clone());
            ids.by_name.insert(name, id);
        }
        ids
    }
}

impl Ids {
    pub fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    pub fn name(&self, id: u32) -> Option<&GroupName> {
        self.by_id.get(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_id.keys().copied()
    }

    /// Brings the ids of the `scope` names up to date after a change, by `assign_ids`' rule
    /// but seeing only `uses`: those of the changed frontends, as every other frontend in
    /// the maps reads the id of the name it still wants. A scope name keeps its id unless a
    /// use wants another name or goes away; a scope name that is `wanted` and has no id gets
    /// one nothing in the maps uses, below `limit`; the others lose theirs.
    pub fn update<'a>(
        &mut self,
        uses: impl IntoIterator<Item = (u32, Option<&'a GroupName>)>,
        scope: &BTreeSet<GroupName>,
        wanted: impl Fn(&GroupName) -> bool,
        limit: u32,
    ) -> Result<(), OutOfScope> {
        let mut disputed = BTreeSet::new();
        for (id, wants) in uses {
            match self.by_id.get(&id) {
                Some(owner) if wants != Some(owner) => {
                    if !scope.contains(owner) {
                        return Err(OutOfScope);
                    }
                    disputed.insert(owner.clone());
                }
                _ => {}
            }
        }
        // An id given up stays in use, by the frontends and slots still reading it, until
        // this sync has written the maps.
        let mut given_up = Vec::new();
        for name in scope {
            if !wanted(name) || disputed.contains(name) {
                if let Some(id) = self.by_name.remove(name) {
                    self.by_id.remove(&id);
                    given_up.push(id);
                }
            }
        }
        let new: Vec<&GroupName> =
            scope.iter().filter(|n| wanted(n) && !self.by_name.contains_key(*n)).collect();
        if !new.is_empty() {
            for (name, id) in assign_ids([], self.ids().chain(given_up), new, limit) {
                self.by_id.insert(id, name.clone());
                self.by_name.insert(name, id);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::desired::Frontend;
    use lb_common::proto::TCP;
    use std::net::Ipv4Addr;

    pub(crate) fn key(last: u8) -> ServiceKey {
        ServiceKey::new(Ipv4Addr::new(10, 96, 0, last), 80, TCP)
    }

    /// A frontend in the maps reading `group_id` (count 2) and `internal_group_id` (count 1).
    pub(crate) fn value(group_id: u32, internal_group_id: u32) -> ServiceValue {
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
                group: (*group).into(),
                internal_group: (*internal_group).into(),
                flags: 0,
                affinity_timeout_s: 0,
                service_port: (*group).into(),
            };
            state.frontends.insert(*key, fe);
            for name in [group, internal_group] {
                state.groups.insert((*name).into(), vec![]);
            }
        }
        state
    }

    fn ids(pairs: &[(&str, u32)]) -> BTreeMap<GroupName, u32> {
        pairs.iter().map(|(name, id)| ((*name).into(), *id)).collect()
    }

    const NO_SLOTS: BTreeMap<BackendKey, Backend> = BTreeMap::new();

    #[test]
    fn groups_keep_the_ids_they_are_read_through_by_either_field() {
        let maps = [(key(1), value(5, 5)), (key(2), value(7, 5)), (key(3), value(7, 5))].into();
        let want =
            desired(&[(key(1), "web", "web"), (key(2), "web local", "web"), (key(3), "web local", "web")]);
        assert_eq!(group_ids(&maps, &NO_SLOTS, &want, &Ids::default()), ids(&[("web", 5), ("web local", 7)]));
    }

    #[test]
    fn an_id_is_not_kept_when_its_frontends_now_want_different_groups() {
        // key(1) read group 5 through both fields; now its outside clients go to "web local".
        let maps = [(key(1), value(5, 5))].into();
        let want = desired(&[(key(1), "web local", "web")]);
        assert_eq!(group_ids(&maps, &NO_SLOTS, &want, &Ids::default()), ids(&[("web", 1), ("web local", 2)]));
        // Or a frontend on the id goes away while another stays.
        let maps = [(key(1), value(5, 5)), (key(2), value(5, 5))].into();
        let want = desired(&[(key(1), "web", "web")]);
        assert_eq!(group_ids(&maps, &NO_SLOTS, &want, &Ids::default()), ids(&[("web", 1)]));
    }

    #[test]
    fn new_ids_skip_every_id_frontends_or_slots_in_the_maps_use() {
        let maps = [(key(1), value(1, 3))].into();
        let slots =
            [(BackendKey { group_id: 2, slot: 0 }, Backend::new(Ipv4Addr::new(10, 244, 1, 1), 80, 0))].into();
        let want = desired(&[(key(2), "a", "b")]);
        assert_eq!(group_ids(&maps, &slots, &want, &Ids::default()), ids(&[("a", 4), ("b", 5)]));
    }

    #[test]
    fn a_group_no_frontend_reads_keeps_its_previous_id_unless_a_frontend_reads_that_id() {
        // "a" and "b" had ids 2 and 3; no frontend in the maps reads "b" (its frontends did
        // not fit), its slots are still there.
        let previous: Ids = [("a".into(), 2), ("b".into(), 3)].into_iter().collect();
        let maps = [(key(1), value(2, 2))].into();
        let slots =
            [(BackendKey { group_id: 3, slot: 0 }, Backend::new(Ipv4Addr::new(10, 244, 1, 1), 80, 0))].into();
        let want = desired(&[(key(1), "a", "a"), (key(2), "b", "b")]);
        assert_eq!(group_ids(&maps, &slots, &want, &previous), ids(&[("a", 2), ("b", 3)]));
        // A frontend now reads 3 for "a": "b" moves to an id nothing uses.
        let maps = [(key(1), value(3, 3))].into();
        assert_eq!(group_ids(&maps, &slots, &want, &previous), ids(&[("a", 3), ("b", 1)]));
    }

    fn names(names: &[&str]) -> Vec<GroupName> {
        names.iter().map(|n| (*n).into()).collect()
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
        let (a, b, c): (GroupName, GroupName, GroupName) = ("a".into(), "b".into(), "c".into());
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
        let z: GroupName = "z".into();
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
                group: (*group).into(),
                internal_group: (*group).into(),
                flags: 0,
                affinity_timeout_s: 0,
                service_port: (*service_port).into(),
            };
            state.frontends.insert(*key, fe);
            state.groups.insert((*group).into(), vec![]);
        }
        state
    }

    fn slots(pairs: &[(&str, u16)]) -> BTreeMap<GroupName, u16> {
        pairs.iter().map(|(name, slot)| ((*name).into(), *slot)).collect()
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
        let service_ports: Vec<(ServiceKey, GroupName)> = (0..SERVICE_STATS_MAX)
            .map(|i| {
                (
                    ServiceKey::new(Ipv4Addr::from(0x0a00_0000 + i), 80, TCP),
                    format!("ns/svc-{i:05}/TCP").into(),
                )
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

    fn table(pairs: &[(&str, u32)]) -> Ids {
        pairs.iter().map(|(name, id)| (GroupName::from(*name), *id)).collect()
    }

    fn scope(names: &[&str]) -> BTreeSet<GroupName> {
        names.iter().map(|n| GroupName::from(*n)).collect()
    }

    #[test]
    fn update_keeps_undisputed_ids_and_gives_new_names_ids_nothing_uses() {
        let mut ids = table(&[("web", 1), ("db", 3)]);
        let web = GroupName::from("web");
        let updated = ids.update([(1, Some(&web))], &scope(&["web", "api", "cache"]), |_| true, u32::MAX);
        assert_eq!(updated, Ok(()));
        assert_eq!(ids, table(&[("web", 1), ("api", 2), ("cache", 4), ("db", 3)]));
    }

    #[test]
    fn update_moves_a_disputed_name_to_a_new_id_and_leaves_its_old_one_unused() {
        // A frontend on web's id 1 now wants "web local": web gets a new id, not 1.
        let mut ids = table(&[("web", 1), ("db", 2)]);
        let local = GroupName::from("web local");
        let updated = ids.update([(1, Some(&local))], &scope(&["web", "web local"]), |_| true, u32::MAX);
        assert_eq!(updated, Ok(()));
        assert_eq!(ids, table(&[("web", 3), ("web local", 4), ("db", 2)]));
        // A frontend on web's id going away disputes it as well.
        let mut ids = table(&[("web", 1)]);
        assert_eq!(ids.update([(1, None)], &scope(&["web"]), |_| true, u32::MAX), Ok(()));
        assert_eq!(ids, table(&[("web", 2)]));
    }

    #[test]
    fn update_drops_the_ids_of_names_no_longer_wanted_and_gives_none_from_the_limit_on() {
        let mut ids = table(&[("web", 1), ("db", 2)]);
        let wanted = |name: &GroupName| &**name != "db";
        assert_eq!(ids.update([], &scope(&["db", "api", "cache"]), wanted, 4), Ok(()));
        // db's id 2 stays in use during this sync: api gets 3, cache none.
        assert_eq!(ids, table(&[("web", 1), ("api", 3)]));
    }

    #[test]
    fn update_refuses_a_dispute_over_a_name_outside_the_scope() {
        let mut ids = table(&[("web", 1)]);
        assert_eq!(ids.update([(1, None)], &scope(&["api"]), |_| true, u32::MAX), Err(OutOfScope));
    }
}
