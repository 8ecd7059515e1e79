//! What the sources (the manifest directory, the API watches) share with the sync loop: the
//! store they feed, the time of the oldest change not yet written to the maps, and whether
//! each source has listed its objects and is still following them.
use std::{
    collections::BTreeMap,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use crate::{health::ProxyHealth, model::Store};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SourceState {
    /// Has delivered a full listing at least once: until then the store is incomplete and
    /// must not be written over the maps (they may still hold a previous agent's state).
    listed: bool,
    /// Following changes now (the last list or watch did not fail).
    connected: bool,
}

pub struct Shared {
    store: Mutex<Store>,
    /// When the oldest change not yet synced was made.
    changed: Mutex<Option<Instant>>,
    wake: Condvar,
    sources: Mutex<BTreeMap<&'static str, SourceState>>,
    health: Arc<ProxyHealth>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking source must not take the sync loop down with it.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub fn new(store: Store, health: Arc<ProxyHealth>) -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(store),
            changed: Mutex::new(None),
            wake: Condvar::new(),
            sources: Mutex::new(BTreeMap::new()),
            health,
        })
    }

    /// A source the sync loop must wait for before its first write. Its first listing is
    /// an update in waiting: /healthz turns unhealthy if it takes too long.
    pub fn register(&self, source: &'static str) {
        lock(&self.sources).insert(source, SourceState::default());
        self.health.queued_update();
    }

    /// Changes the store and wakes the sync loop.
    pub fn update<R>(&self, change: impl FnOnce(&mut Store) -> R) -> R {
        let result = change(&mut lock(&self.store));
        lock(&self.changed).get_or_insert_with(Instant::now);
        self.health.queued_update();
        self.wake.notify_all();
        result
    }

    /// `source` delivered a full listing and follows changes again.
    pub fn listed(&self, source: &'static str) {
        lock(&self.sources).insert(source, SourceState { listed: true, connected: true });
        // Under the lock `wait_change` checks under, so the wake-up cannot be missed.
        let _changed = lock(&self.changed);
        self.wake.notify_all();
    }

    /// `source` follows changes again (a watch event arrived) or lost its connection. A lost
    /// source counts as an update waiting to be synced: /healthz turns unhealthy if it stays
    /// lost longer than the health timeout, as kube-proxy's does while its informers fail.
    pub fn connected(&self, source: &'static str, connected: bool) {
        let mut sources = lock(&self.sources);
        let state = sources.entry(source).or_default();
        if state.connected && !connected {
            self.health.queued_update();
        }
        state.connected = connected;
    }

    /// Every source has listed; false before any registered.
    pub fn all_listed(&self) -> bool {
        let sources = lock(&self.sources);
        !sources.is_empty() && sources.values().all(|s| s.listed)
    }

    pub fn all_connected(&self) -> bool {
        lock(&self.sources).values().all(|s| s.connected)
    }

    /// Waits until `deadline` for a change to sync, with every source listed; says whether
    /// one came.
    pub fn wait_change(&self, deadline: Instant) -> bool {
        let mut changed = lock(&self.changed);
        loop {
            if changed.is_some() && self.all_listed() {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
            changed = self.wake.wait_timeout(changed, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// The time of the oldest change not yet synced, clearing it: the caller syncs now.
    pub fn take_change(&self) -> Option<Instant> {
        lock(&self.changed).take()
    }

    pub fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    pub fn health(&self) -> &Arc<ProxyHealth> {
        &self.health
    }
}

#[cfg(test)]
mod tests {
    use std::{thread, time::Duration};

    use super::*;

    /// Shared state whose health turns unhealthy as soon as an update waits.
    fn shared() -> Arc<Shared> {
        Shared::new(Store::default(), Arc::new(ProxyHealth::new(Duration::ZERO)))
    }

    #[test]
    fn a_change_is_synced_only_once_every_registered_source_has_listed() {
        let shared = shared();
        shared.register("manifests");
        shared.register("api");
        shared.update(|_| ());
        assert!(!shared.all_listed());
        assert!(!shared.wait_change(Instant::now()));
        shared.listed("manifests");
        assert!(!shared.wait_change(Instant::now()));
        shared.listed("api");
        assert!(shared.all_listed());
        assert!(shared.wait_change(Instant::now()));
    }

    #[test]
    fn take_change_returns_the_time_of_the_oldest_change_and_clears_it() {
        let shared = shared();
        let before = Instant::now();
        shared.update(|_| ());
        let after_first = Instant::now();
        thread::sleep(Duration::from_millis(5));
        shared.update(|_| ());
        let oldest = shared.take_change().unwrap();
        assert!(before <= oldest && oldest <= after_first);
        assert_eq!(shared.take_change(), None);
        assert!(!shared.wait_change(Instant::now()));
    }

    #[test]
    fn update_returns_what_the_change_returns() {
        let shared = shared();
        let node = crate::manifests::parse_str("kind: Node\nmetadata: {name: node-a}\n").unwrap().objects;
        assert!(shared.update(|store| store.apply(&node[0], "test")).is_ok());
        assert!(shared.store().node("node-a").is_some());
    }

    #[test]
    fn a_source_that_loses_its_connection_is_not_connected_and_turns_health_bad_until_synced() {
        let shared = shared();
        shared.listed("api");
        assert!(shared.all_connected());
        assert!(shared.health().is_healthy());
        shared.connected("api", false);
        assert!(!shared.all_connected());
        assert!(!shared.health().is_healthy());
        shared.connected("api", true);
        assert!(shared.all_connected());
        shared.health().updated();
        assert!(shared.health().is_healthy());
        // Still disconnected: not a new loss.
        shared.connected("api", false);
        shared.health().updated();
        shared.connected("api", false);
        assert!(shared.health().is_healthy());
    }

    #[test]
    fn registering_a_source_counts_as_an_update_waiting_for_a_sync() {
        let shared = shared();
        assert!(shared.health().is_healthy());
        shared.register("api");
        assert!(!shared.health().is_healthy());
        assert!(!shared.all_connected());
    }

    #[test]
    fn listed_from_another_thread_wakes_a_waiting_sync() {
        let shared = shared();
        shared.register("api");
        shared.update(|_| ());
        let lister = {
            let shared = Arc::clone(&shared);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(20));
                shared.listed("api");
            })
        };
        let start = Instant::now();
        assert!(shared.wait_change(start + Duration::from_secs(30)));
        assert!(start.elapsed() < Duration::from_secs(30));
        lister.join().unwrap();
    }
}
