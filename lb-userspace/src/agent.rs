//! The agent loop: read the sources, compute the node's desired state, write the maps;
//! again on every change of the manifest directory and every sync period.
use std::{collections::BTreeSet, net::Ipv4Addr, path::PathBuf, sync::mpsc, time::Duration};

use anyhow::Context as _;
use lb_userspace::{
    dataplane::{Dataplane, Hook, MapSizes, MapWriter},
    desired::{self, NodeContext},
    manifests::ManifestDir,
    model::Store,
    netif,
};
use notify::Watcher as _;

pub struct Config {
    pub manifests: PathBuf,
    pub node_name: String,
    pub external_interfaces: Vec<String>,
    pub pod_interfaces: Option<glob::Pattern>,
    pub bpffs_dir: PathBuf,
    pub cgroup_path: Option<PathBuf>,
    pub map_sizes: MapSizes,
    pub sync_period: Duration,
}

/// Changes in the directory arriving this close together are handled as one.
const COALESCE: Duration = Duration::from_millis(50);

pub fn run(config: Config) -> anyhow::Result<()> {
    let mut dataplane = Dataplane::load_pinned(&config.bpffs_dir, config.map_sizes)
        .with_context(|| format!("loading the dataplane into {}", config.bpffs_dir.display()))?;
    for interface in &config.external_interfaces {
        for hook in [Hook::XdpIngress, Hook::TcEgress] {
            dataplane.attach(hook, interface).with_context(|| format!("external interface {interface}"))?;
        }
    }
    if let Some(cgroup) = &config.cgroup_path {
        dataplane.attach_cgroup(cgroup).with_context(|| format!("cgroup {}", cgroup.display()))?;
    }
    let mut writer = MapWriter::open(&mut dataplane).context("opening the maps")?;
    let mut pods_attached = BTreeSet::new();
    let mut source = ManifestDir::new(&config.manifests);
    let mut store = Store::default();

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
        .watch(&config.manifests, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", config.manifests.display()))?;
    tracing::info!(
        node = %config.node_name,
        manifests = %config.manifests.display(),
        bpffs = %config.bpffs_dir.display(),
        "agent started"
    );

    loop {
        if let Some(pattern) = &config.pod_interfaces {
            attach_pod_interfaces(&mut dataplane, pattern, &mut pods_attached);
        }
        sync(&config, &mut source, &mut store, &mut writer);
        match changes.recv_timeout(config.sync_period) {
            Ok(()) => while changes.recv_timeout(COALESCE).is_ok() {},
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!("the directory watcher stopped"),
        }
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

fn sync(config: &Config, source: &mut ManifestDir, store: &mut Store, writer: &mut MapWriter) {
    let scan = source.scan();
    for error in &scan.errors {
        tracing::warn!("skipped: {error}");
    }
    let objects = scan.objects.iter().map(|(o, origin)| (o, origin.as_str()));
    for rejected in store.replace_all(objects, scan.unreadable) {
        tracing::warn!("skipped: {rejected}");
    }
    let addresses = netif::ipv4_addresses().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "reading node addresses");
        Vec::new()
    });
    let node_addrs: Vec<Ipv4Addr> =
        addresses.iter().map(|(_, a)| *a).collect::<BTreeSet<_>>().into_iter().collect();
    let default_snat_addr = config
        .external_interfaces
        .first()
        .and_then(|ext| addresses.iter().find(|(iface, _)| iface == ext))
        .map(|(_, a)| *a);
    let node = NodeContext { name: &config.node_name, addrs: &node_addrs, default_snat_addr };
    let desired = desired::compute(store, &node);
    for conflict in &desired.conflicts {
        tracing::warn!("{conflict}");
    }
    let report = writer.sync(&desired);
    for failure in &report.failures {
        tracing::error!("map write failed: {failure}");
    }
    tracing::info!(
        frontends = report.frontends,
        backends = report.backends,
        written = report.written,
        deleted = report.deleted,
        failed = report.failures.len(),
        "synced"
    );
}
