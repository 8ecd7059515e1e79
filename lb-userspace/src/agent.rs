//! The agent: sources (a manifest directory or the Kubernetes API) feed one store; one sync
//! loop brings the node's desired state up to date with the Services that changed and writes
//! the difference to the maps, at most every `min_sync_period`, and fully (recomputing
//! everything and re-reading the maps, so drift is repaired) every `sync_period`. The
//! health, healthCheckNodePort and metrics servers run beside it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    ops::RangeInclusive,
    path::PathBuf,
    sync::{mpsc, Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use lb_userspace::{
    dataplane::{
        self, external, Dataplane, ExternalHook, ExternalHookMode, FlowTables, Hook, MapSizes, MapWriter,
    },
    desired::{self, GroupName, NodeContext},
    health::{self, ProxyHealth, ServiceHealthServers},
    kubernetes,
    manifests::ManifestDir,
    metrics::{self, DataplaneStats, MapFill, Metrics, ServiceCounters},
    model::{Kind, Rejected, Store},
    netif,
    sources::Shared,
};
use notify::Watcher as _;

/// Where the agent takes its objects from.
pub enum Source {
    Manifests(PathBuf),
    /// The Kubernetes API: in-cluster config, or this kubeconfig file.
    Api {
        kubeconfig: Option<PathBuf>,
    },
}

pub struct Config {
    pub source: Source,
    pub node_name: String,
    pub external_interfaces: Vec<String>,
    pub external_hook: ExternalHookMode,
    pub pod_interfaces: Option<glob::Pattern>,
    pub bpffs_dir: PathBuf,
    pub cgroup_path: Option<PathBuf>,
    pub map_sizes: MapSizes,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub node_port_range: RangeInclusive<u16>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
}

/// Changes in the directory arriving this close together are handled as one.
const COALESCE: Duration = Duration::from_millis(50);

pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Held while the dataplane is loaded and attached, and during each sync: a SIGTERM ends
    // the agent only between them.
    let syncing = Arc::new(Mutex::new(()));
    let starting = syncing.lock().unwrap_or_else(PoisonError::into_inner);
    runtime.spawn(exit_on_signal(syncing.clone()));
    let mut dataplane = Dataplane::load_pinned(&config.bpffs_dir, config.map_sizes)
        .with_context(|| format!("loading the dataplane into {}", config.bpffs_dir.display()))?;
    // Programs whose maps were recreated (another layout) replace the running ones only once
    // the first sync has filled those maps: until then the running programs keep serving.
    let swap_pending = dataplane.has_staged_maps();
    if swap_pending {
        tracing::warn!(
            "maps were recreated: the programs attached now keep serving with the pinned maps until the first sync has filled the new ones"
        );
    }
    let health = Arc::new(ProxyHealth::new(config.sync_period));
    let shared = Shared::new(Store::new(config.node_port_range.clone()), health.clone());
    let counted = Counted::default();
    let metrics = Arc::new(Metrics::new(read_dataplane(config.bpffs_dir.clone(), counted.clone())));
    if !swap_pending {
        attach_node(&mut dataplane, &config, &metrics)?;
    }
    let writer = MapWriter::open(&mut dataplane).context("opening the maps")?;
    let flows = FlowTables::open(&mut dataplane).context("opening the connection tables")?;
    drop(starting);

    let _servers = runtime.enter();
    if let Some(addr) = config.healthz_bind_address {
        let listener = bind(addr, "--healthz-bind-address")?;
        runtime.spawn(log_exit("health server", health::serve_proxy_health(listener, health.clone())));
    }
    if let Some(addr) = config.metrics_bind_address {
        let listener = bind(addr, "--metrics-bind-address")?;
        runtime.spawn(log_exit("metrics server", metrics::serve_metrics(listener, metrics.clone())));
    }
    let on_rejected: kubernetes::OnRejected = {
        let metrics = metrics.clone();
        Arc::new(move |rejected: &Rejected| {
            tracing::warn!("skipped: {rejected}");
            metrics.count_invalid_object(rejected.kind.as_str());
        })
    };
    match &config.source {
        Source::Manifests(dir) => {
            follow_manifests(dir.clone(), shared.clone(), on_rejected, config.sync_period)?
        }
        Source::Api { kubeconfig } => {
            let client = runtime.block_on(kube_client(kubeconfig.as_ref()))?;
            runtime.spawn(kubernetes::watch(client, config.node_name.clone(), shared.clone(), on_rejected));
        }
    }
    tracing::info!(
        node = %config.node_name,
        bpffs = %config.bpffs_dir.display(),
        "agent started"
    );
    let health_servers = ServiceHealthServers::new(health, Ipv4Addr::UNSPECIFIED, runtime.handle().clone());
    SyncLoop {
        config: &config,
        swap_pending,
        dataplane,
        writer,
        flows,
        desired: desired::Incremental::default(),
        shared,
        metrics,
        counted,
        health_servers,
        pods: BTreeSet::new(),
        syncing,
    }
    .run()
}

/// Attaches the programs to the external interfaces and the cgroup, swapping them into the
/// links of an earlier agent. Each external interface takes its traffic at XDP or at TC
/// (`--external-hook`, `dataplane::external`), logged once and exported in the metrics.
fn attach_node(dataplane: &mut Dataplane, config: &Config, metrics: &Metrics) -> anyhow::Result<()> {
    for interface in &config.external_interfaces {
        let driver = netif::driver(interface)
            .map_err(|error| tracing::warn!(%interface, %error, "reading the interface's driver"))
            .ok();
        let (hook, why) = external::choose(config.external_hook, driver.as_deref());
        let (ingress, other) = match hook {
            ExternalHook::Xdp => (Hook::XdpIngress, Hook::TcExternal),
            ExternalHook::Tc => (Hook::TcExternal, Hook::XdpIngress),
        };
        for hook in [ingress, Hook::TcEgress] {
            dataplane.attach(hook, interface).with_context(|| format!("external interface {interface}"))?;
        }
        // Only now that the new ingress hook runs (an earlier agent may have used the other):
        // no packet goes unbalanced, and one that met both is not a frontend's any more.
        dataplane.detach(other, interface).with_context(|| format!("external interface {interface}"))?;
        tracing::info!(%interface, driver = driver.as_deref().unwrap_or("unknown"), %hook, "external interface takes its traffic at {hook}: {why}");
        metrics.set_external_hook(interface, hook.as_str());
    }
    if let Some(cgroup) = &config.cgroup_path {
        dataplane.attach_cgroup(cgroup).with_context(|| format!("cgroup {}", cgroup.display()))?;
    }
    Ok(())
}

/// Ends the agent on SIGTERM (the kubelet stopping its Pod) or SIGINT, once no sync is under
/// way, with a clean exit. The dataplane stays as it is: the programs stay attached through
/// their pinned links and the pinned maps keep the Services and the tracked connections, so
/// traffic keeps flowing without an agent until the next one swaps its programs in. Only
/// `xlb agent --cleanup` removes them.
async fn exit_on_signal(syncing: Arc<Mutex<()>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(error), _) | (_, Err(error)) => {
            return tracing::error!(%error, "installing the SIGTERM handler");
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    let _ = tokio::task::spawn_blocking(move || {
        let _idle = syncing.lock().unwrap_or_else(PoisonError::into_inner);
        tracing::info!(
            signal = name,
            "exiting; the programs stay attached and the maps pinned (`xlb agent --cleanup` removes them)"
        );
        std::process::exit(0);
    })
    .await;
}

fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("{flag} {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

async fn log_exit(what: &'static str, server: impl std::future::Future<Output = std::io::Result<()>>) {
    if let Err(error) = server.await {
        tracing::error!(%error, "{what} stopped");
    }
}

async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context("in-cluster Kubernetes config (or pass --kubeconfig)")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

/// Scans the directory at start, on every change in it and every sync period.
fn follow_manifests(
    dir: PathBuf,
    shared: Arc<Shared>,
    on_rejected: kubernetes::OnRejected,
    rescan_period: Duration,
) -> anyhow::Result<()> {
    const SOURCE: &str = "manifests";
    shared.register(SOURCE);
    let (changed, changes) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads raise access and attribute events: only content changes count.
        use notify::event::{EventKind, ModifyKind};
        let relevant = event.is_ok_and(|e| match e.kind {
            EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
            EventKind::Modify(kind) => !matches!(kind, ModifyKind::Metadata(_)),
            EventKind::Access(_) | EventKind::Other => false,
        });
        if relevant {
            let _ = changed.send(());
        }
    })
    .context("creating the directory watcher")?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    let mut source = ManifestDir::new(&dir);
    std::thread::spawn(move || {
        let _watcher = watcher;
        loop {
            let scan = source.scan();
            for error in &scan.errors {
                tracing::warn!("skipped: {error}");
            }
            let objects = scan.objects.iter().map(|(o, origin)| (o, origin.as_str()));
            let rejected = shared.update(|store| store.replace_all(objects, scan.unreadable));
            rejected.iter().for_each(|r| on_rejected(r));
            shared.listed(SOURCE);
            match changes.recv_timeout(rescan_period) {
                Ok(()) => while changes.recv_timeout(COALESCE).is_ok() {},
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    tracing::error!(dir = %dir.display(), "the directory watcher stopped");
                    return;
                }
            }
        }
    });
    Ok(())
}

/// The Service port each counter slot counts, as the writer last synced it.
type Counted = Arc<Mutex<Arc<BTreeMap<u16, GroupName>>>>;

/// Reads the counters and table fill for a scrape.
fn read_dataplane(dir: PathBuf, counted: Counted) -> Box<dyn Fn() -> DataplaneStats + Send + Sync> {
    Box::new(move || {
        let counted = counted.lock().map(|c| Arc::clone(&c)).unwrap_or_default();
        let services = dataplane::stats::pinned_service_stats(&dir)
            .and_then(|stats| dataplane::stats::service_traffic(&stats, &counted))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading Service counters");
                Vec::new()
            });
        let maps = dataplane::stats::table_fill(&dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading table fill");
            Vec::new()
        });
        DataplaneStats {
            services: services
                .into_iter()
                .map(|t| {
                    let (namespace, name, port) = desired::split_group_name(&t.service_port);
                    ServiceCounters { namespace, name, port, packets: t.packets, bytes: t.bytes }
                })
                .collect(),
            maps: maps
                .into_iter()
                .map(|f| MapFill { name: f.name.to_string(), entries: f.entries, max_entries: f.max_entries })
                .collect(),
        }
    })
}

struct SyncLoop<'a> {
    config: &'a Config,
    /// The programs are not attached yet: the maps recreated for them are filled by the
    /// first sync, then swapped in, then the programs attached.
    swap_pending: bool,
    dataplane: Dataplane,
    writer: MapWriter,
    flows: FlowTables,
    desired: desired::Incremental,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    counted: Counted,
    health_servers: ServiceHealthServers,
    pods: BTreeSet<String>,
    /// Held during a sync (see `exit_on_signal`).
    syncing: Arc<Mutex<()>>,
}

impl SyncLoop<'_> {
    /// Syncs until the process ends; returns only when the programs could not be attached
    /// after the first sync.
    fn run(mut self) -> anyhow::Result<()> {
        let mut next_full = Instant::now();
        let mut last_sync: Option<Instant> = None;
        let mut retried = false;
        loop {
            if !self.shared.wait_change(next_full) && !self.shared.all_listed() {
                // The store is incomplete: the maps keep serving what they hold (a previous
                // agent's state) until every source has listed its objects.
                tracing::info!("waiting for the sources' first listing; the maps are left as they are");
                next_full = Instant::now() + self.config.sync_period;
                continue;
            }
            // Coalesce bursts: at most one sync per min_sync_period.
            if let Some(wait) = last_sync.and_then(|t| self.config.min_sync_period.checked_sub(t.elapsed())) {
                std::thread::sleep(wait);
            }
            let syncing = Arc::clone(&self.syncing);
            let _syncing = syncing.lock().unwrap_or_else(PoisonError::into_inner);
            // An agent's first sync is a full one, even when waiting for the sources' first
            // listing moved `next_full`.
            let full = last_sync.is_none() || Instant::now() >= next_full;
            if full {
                next_full = Instant::now() + self.config.sync_period;
                if let Err(e) = self.writer.reread() {
                    tracing::error!(error = %e, "re-reading the maps");
                }
                // Between full syncs only what changed is recomputed and written; a full
                // sync starts both sides afresh.
                self.desired = desired::Incremental::default();
            }
            let changed_at = self.shared.take_change();
            let refused_while_freeing = self.sync(full)?;
            if let Some(at) = changed_at {
                self.metrics.observe_programming_latency(at.elapsed());
            }
            last_sync = Some(Instant::now());
            // Entries refused (a full map) by a sync that also removed some: the removals,
            // written after the additions, may have made room, and the refused entries would
            // otherwise wait for the next full sync. One full sync at once, not a loop.
            retried = refused_while_freeing && !retried;
            if retried {
                next_full = Instant::now();
            }
        }
    }

    /// Returns whether entries were refused while others were removed.
    fn sync(&mut self, full: bool) -> anyhow::Result<bool> {
        let started = Instant::now();
        if let Some(pattern) = self.config.pod_interfaces.as_ref().filter(|_| !self.swap_pending) {
            attach_pod_interfaces(&mut self.dataplane, pattern, &mut self.pods);
        }
        let addresses = netif::ipv4_addresses().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading node addresses");
            Vec::new()
        });
        let node_addrs: Vec<Ipv4Addr> =
            addresses.iter().map(|(_, a)| *a).collect::<BTreeSet<_>>().into_iter().collect();
        let default_snat_addr = self
            .config
            .external_interfaces
            .first()
            .and_then(|ext| addresses.iter().find(|(iface, _)| iface == ext))
            .map(|(_, a)| *a);
        let node = NodeContext { name: &self.config.node_name, addrs: &node_addrs, default_snat_addr };
        let connected = self.shared.all_connected();
        let deleting = {
            let mut store = self.shared.store();
            self.desired.update(&mut store, &node);
            store.node(node.name).is_some_and(|n| n.deleting)
        };
        let desired = self.desired.state();
        for conflict in &desired.conflicts {
            tracing::warn!("skipped: {conflict}");
            self.metrics.count_skipped_object(Kind::Service.as_str(), "conflict");
        }
        let report = self.writer.sync_changes(&self.desired);
        for failure in &report.failures {
            tracing::error!("map write failed: {failure}");
        }
        // Only after the write: a flow removed earlier could be balanced again to its old
        // backend. Changes come with every frontend of a changed group.
        let udp_changed = self.desired.changes().frontends.iter().any(|k| k.proto == lb_common::proto::UDP);
        if full || self.desired.changes().since.is_none() || udp_changed {
            let flows = self.flows.remove_stale_udp(desired);
            let sockets = self.flows.destroy_stale_udp_sockets(desired);
            for failure in flows.failures.iter().chain(&sockets.failures) {
                tracing::warn!("{failure}");
            }
            if flows.removed + sockets.removed > 0 {
                tracing::info!(
                    flows = flows.removed,
                    sockets = sockets.removed,
                    "removed UDP flows and destroyed connected UDP sockets whose endpoint no longer serves"
                );
            }
        }
        if self.swap_pending {
            self.dataplane.swap_in_staged_maps().context("swapping in the recreated maps")?;
            attach_node(&mut self.dataplane, self.config, &self.metrics)?;
            if let Some(pattern) = &self.config.pod_interfaces {
                attach_pod_interfaces(&mut self.dataplane, pattern, &mut self.pods);
            }
            self.swap_pending = false;
            tracing::info!("the new programs and their maps replaced the running ones");
        }
        self.metrics.count_map_write_failures(report.failures.len() as u64);
        if let Ok(mut counted) = self.counted.lock() {
            *counted = Arc::clone(self.writer.counted());
        }
        let health = self.shared.health();
        health.set_node_eligible(!deleting);
        match (connected, report.failures.is_empty()) {
            (true, true) => health.updated(),
            // The loop works (/livez) but the maps lack entries (/healthz waits).
            (true, false) => health.updated_with_failures(),
            (false, _) => {}
        }
        for error in self.health_servers.sync(&desired.health_checks) {
            tracing::warn!("healthCheckNodePort: {error}");
        }
        self.metrics.observe_sync(started.elapsed());
        // As kube-proxy's: the last sync that wrote everything, so staleness alerts fire while
        // a full map refuses entries.
        if report.failures.is_empty() {
            self.metrics.set_last_sync(SystemTime::now());
        }
        if full || report.written + report.deleted > 0 {
            tracing::info!(
                full,
                frontends = report.frontends,
                backends = report.backends,
                source_ranges = report.source_ranges,
                health_checks = desired.health_checks.len(),
                written = report.written,
                deleted = report.deleted,
                failed = report.failures.len(),
                "synced"
            );
        }
        Ok(!report.failures.is_empty() && report.deleted > 0)
    }
}

fn attach_pod_interfaces(
    dataplane: &mut Dataplane,
    pattern: &glob::Pattern,
    attached: &mut BTreeSet<String>,
) {
    let names = match netif::interface_names() {
        Ok(names) => names,
        Err(e) => return tracing::warn!(error = %e, "listing interfaces"),
    };
    // Interfaces that went away (a deleted pod) are forgotten, their pins removed, so a new
    // interface of that name is attached afresh.
    for gone in attached.iter().filter(|n| !names.contains(n)) {
        if let Err(e) = dataplane.forget_interface(gone) {
            tracing::warn!(interface = %gone, error = %e, "removing links of a vanished interface");
        }
    }
    attached.retain(|n| names.contains(n));
    let new: Vec<String> =
        names.into_iter().filter(|n| pattern.matches(n) && !attached.contains(n)).collect();
    for name in new {
        let result =
            [Hook::TcIngress, Hook::TcEgress].into_iter().try_for_each(|hook| dataplane.attach(hook, &name));
        match result {
            Ok(()) => {
                tracing::info!(interface = %name, "attached to pod interface");
                attached.insert(name);
            }
            Err(e) => tracing::warn!(interface = %name, error = %e, "attaching to pod interface"),
        }
    }
}
