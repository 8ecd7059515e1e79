//! The benchmark cluster and the four ways of serving its Services.
//!
//! Two nodes of the namespace testbed, six backend pods (three per node) running the
//! benchmark server, a client pod `cpod` on node-a and the external client, which reaches
//! NodePorts on node-a. The same Service and EndpointSlice objects program every mode:
//! - xlb: the real agents, following the in-repo API server on every node's loopback;
//! - iptables and nftables: kube-proxy's rulesets (`crate::iptables`, `crate::nftables`)
//!   loaded into node-a, which translates every measured path, with
//!   `iptables-restore --noflush` and `nft -f`;
//! - floor: nothing; clients address the Service's endpoints directly.
use std::{
    collections::BTreeSet,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::maps::{HashMap, MapData};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{
    conntrack::{CtBackend, CtEntry, CtKey},
    maps,
    nat::NatEntry,
};
use xlb_tests::{
    apiserver::{self, ApiServer},
    netns,
    testbed::{Spec, Testbed},
};

use crate::{
    iptables, load, nftables,
    results::Mode,
    workload::{self, ServicePortRules, BACKEND_PORT, SERVICE_PORT},
};

/// Backend pods per node.
const BACKENDS_PER_NODE: usize = 3;
/// Accepting threads of each backend's server.
const SERVER_WORKERS: usize = 2;
const CLIENT_POD: &str = "cpod";
const API_PORT: u16 = 6443;
/// Where `verify_all` stops counting.
pub const VERIFY_MAX_FAILURES: usize = 10;
/// How long programming may take before the benchmark gives up on a mode.
/// (iptables-restore alone takes about 110 s for 10,000 Services on 2 cores.)
const PROGRAM_DEADLINE: Duration = Duration::from_secs(300);

/// Where a connection comes from and what it addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// From the client pod through the Service's ClusterIP.
    ClusterIpPod,
    /// From the external client through the NodePort on node-a.
    NodePortExternal,
}

impl Path {
    pub const ALL: [Path; 2] = [Path::ClusterIpPod, Path::NodePortExternal];

    pub fn as_str(self) -> &'static str {
        match self {
            Path::ClusterIpPod => "clusterip-pod",
            Path::NodePortExternal => "nodeport-external",
        }
    }
}

pub struct BenchCluster {
    tb: Testbed,
    api: ApiServer,
    kubeconfig: PathBuf,
    /// Backend pods: name and address.
    backends: Vec<(String, Ipv4Addr)>,
    /// The Services of the current size, as last programmed.
    services: Vec<(Service, EndpointSlice)>,
    /// `services` as the rule generators read them, kept up to date outside the timed steps
    /// (kube-proxy, too, has its Service map at hand when a sync starts).
    ports: Vec<ServicePortRules>,
    /// Which Services have their alternative endpoints (after `change_one`).
    changed: BTreeSet<usize>,
    active: Option<Mode>,
}

impl BenchCluster {
    /// The cluster with every backend serving and the API server holding both Nodes; no
    /// mode active.
    pub fn up() -> anyhow::Result<Self> {
        let mut pods: Vec<(String, usize)> =
            (0..2 * BACKENDS_PER_NODE).map(|i| (format!("backend-{i}"), i / BACKENDS_PER_NODE)).collect();
        pods.push((CLIENT_POD.to_string(), 0));
        // No kiada ports: the backends serve the benchmark's own protocol (`load::serve`).
        let tb = Testbed::up(&Spec { nodes: 2, pods, tcp_ports: vec![], udp_ports: vec![] })?;
        let backends: Vec<(String, Ipv4Addr)> =
            tb.pods.iter().filter(|p| p.name != CLIENT_POD).map(|p| (p.name.clone(), p.ip)).collect();
        for pod in tb.pods.iter().filter(|p| p.name != CLIENT_POD) {
            load::serve(&pod.ns, &pod.name, BACKEND_PORT, SERVER_WORKERS)?;
        }
        // The floor's external client addresses pods directly, through node-a.
        for node in 0..tb.nodes.len() {
            let subnet = format!("198.18.{}.0/24", 1 + node);
            netns::ip(&["-n", &tb.client, "route", "add", &subnet, "via", &tb.nodes[0].ip.to_string()])?;
        }
        let api = ApiServer::new();
        for node in &tb.nodes {
            api.listen(Some(&node.ns), API_PORT)?;
            api.apply(apiserver::node_object(&node.name, node.ip));
        }
        let kubeconfig = tb.manifests.join("kubeconfig");
        std::fs::write(&kubeconfig, ApiServer::kubeconfig(([127, 0, 0, 1], API_PORT).into()))?;
        Ok(Self {
            tb,
            api,
            kubeconfig,
            backends,
            services: Vec::new(),
            ports: Vec::new(),
            changed: BTreeSet::new(),
            active: None,
        })
    }

    /// Sets the Services the next `program` writes: `n` of them, none changed yet.
    pub fn set_services(&mut self, n: usize) {
        assert!(self.active.is_none(), "set_services while {:?} is programmed", self.active);
        self.changed.clear();
        self.services = (0..n).map(|i| workload::service(i, &self.endpoint_ips(i))).collect();
        self.ports = workload::service_ports(&workload::store(&self.services));
    }

    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// Service `i`'s endpoints (see `endpoint_picks`).
    fn endpoint_ips(&self, i: usize) -> Vec<Ipv4Addr> {
        endpoint_picks(i, self.changed.contains(&i)).into_iter().map(|b| self.backends[b].1).collect()
    }

    fn backend_names(&self, ips: &[Ipv4Addr]) -> BTreeSet<String> {
        self.backends.iter().filter(|(_, ip)| ips.contains(ip)).map(|(name, _)| name.clone()).collect()
    }

    /// Programs `mode` from scratch with the current Services and returns the time from the
    /// first write until the last Service (in chain order) answers through its ClusterIP.
    /// The floor programs nothing.
    pub fn program(&mut self, mode: Mode) -> anyhow::Result<Duration> {
        assert!(self.active.is_none(), "program({mode:?}) while {:?} is programmed", self.active);
        self.active = Some(mode);
        if mode == Mode::Floor {
            return Ok(Duration::ZERO);
        }
        if mode == Mode::Xlb {
            self.start_agents()?;
        }
        let last = self.services.len() - 1;
        let expected = self.backend_names(&self.endpoint_ips(last));
        let target = SocketAddrV4::new(workload::cluster_ip(last), SERVICE_PORT);
        let probe = self.probe(target, expected)?;
        let began = Instant::now();
        match mode {
            Mode::Xlb => {
                for (service, slice) in &self.services {
                    self.api.apply(service.clone());
                    self.api.apply(slice.clone());
                }
            }
            Mode::Iptables => {
                let rules = iptables::first_sync(&self.ports);
                self.on_node_a("iptables-restore", &["--noflush"], &rules)?;
            }
            Mode::Nftables => {
                let rules = nftables::first_sync(&self.ports);
                self.on_node_a("nft", &["-f", "-"], &rules)?;
            }
            Mode::Floor => unreachable!("returned above"),
        }
        let answered = join(probe)?;
        Ok(answered.saturating_duration_since(began))
    }

    /// With the current mode programmed, gives Service `i` its other endpoints and returns
    /// the time from the first write until a new connection reaches one of them.
    pub fn change_one(&mut self, i: usize) -> anyhow::Result<Duration> {
        let mode = self.active.context("change_one with no mode programmed")?;
        if !self.changed.insert(i) {
            self.changed.remove(&i);
        }
        let ips = self.endpoint_ips(i);
        let (_, slice) = workload::service(i, &ips);
        self.services[i].1 = slice.clone();
        let changed = workload::service_ports(&workload::store(&self.services[i..=i]));
        let previous = self.ports.clone();
        for port in changed {
            if let Some(old) =
                self.ports.iter_mut().find(|p| (&p.service, &p.port_name) == (&port.service, &port.port_name))
            {
                *old = port;
            }
        }
        let expected = self.backend_names(&ips);
        let probe = self.probe(SocketAddrV4::new(workload::cluster_ip(i), SERVICE_PORT), expected)?;
        let began = Instant::now();
        match mode {
            Mode::Xlb => {
                self.api.apply(slice);
            }
            Mode::Iptables => {
                let rules = iptables::partial_sync(&self.ports, &previous);
                self.on_node_a("iptables-restore", &["--noflush"], &rules)?;
            }
            Mode::Nftables => {
                let rules = nftables::partial_sync(&self.ports, &previous);
                self.on_node_a("nft", &["-f", "-"], &rules)?;
            }
            Mode::Floor => bail!("the floor has no Services to change"),
        }
        let answered = join(probe)?;
        Ok(answered.saturating_duration_since(began))
    }

    /// Probes every Service once through `path`; returns how many did not answer from one
    /// of their endpoints, counting up to `VERIFY_MAX_FAILURES` (a broken mode must not keep
    /// the run waiting on thousands of timeouts).
    pub fn verify_all(&self, path: Path) -> anyhow::Result<usize> {
        let ns = self.client_ns(path).to_string();
        let checks: Vec<(Vec<SocketAddrV4>, BTreeSet<String>)> = (0..self.services.len())
            .map(|i| (self.targets(path, i), self.backend_names(&self.endpoint_ips(i))))
            .collect();
        netns::within(&ns, move || {
            checks
                .iter()
                .filter(|(targets, names)| {
                    !load::request(None, targets[0], Duration::from_secs(1))
                        .is_ok_and(|name| names.contains(&name))
                })
                .take(VERIFY_MAX_FAILURES)
                .count()
        })
        .context("probing from the client's namespace")
    }

    /// Removes what `program` set up, and every connection's state.
    pub fn unprogram(&mut self) -> anyhow::Result<()> {
        match self.active.take() {
            Some(Mode::Xlb) => {
                for i in 0..self.tb.nodes.len() {
                    self.tb.cleanup_agent(i)?;
                }
                for (service, _) in &self.services {
                    let name = service.metadata.name.as_deref().unwrap_or_default();
                    self.api.delete::<Service>(Some(workload::NAMESPACE), name);
                    self.api.delete::<EndpointSlice>(Some(workload::NAMESPACE), &format!("{name}-1"));
                }
                // No agent watches now: the next one lists afresh, and the history of every
                // round would otherwise keep growing (gigabytes over a full run).
                self.api.compact();
            }
            Some(Mode::Iptables | Mode::Nftables) => {
                for node in &self.tb.nodes {
                    netns::run(&node.ns, "nft", &["flush", "ruleset"])?;
                }
                self.flush_connections()?;
            }
            Some(Mode::Floor) | None => {}
        }
        Ok(())
    }

    /// Forgets every tracked connection of the active mode, so one measurement's connections
    /// cannot turn the next one's new connections into conntrack hits.
    pub fn flush_connections(&self) -> anyhow::Result<()> {
        for node in &self.tb.nodes {
            match self.active {
                Some(Mode::Xlb) => {
                    clear::<CtKey, CtEntry>(&node.bpffs_dir.join(maps::CONNTRACK))?;
                    clear::<CtKey, CtBackend>(&node.bpffs_dir.join(maps::CT_SERVICE))?;
                    clear::<CtKey, NatEntry>(&node.bpffs_dir.join(maps::NAT))?;
                }
                // Also after iptables or nftables were removed: their entries outlive the rules.
                _ => {
                    netns::command(&node.ns, "conntrack").arg("-F").stderr(Stdio::null()).status()?;
                }
            }
        }
        Ok(())
    }

    /// Where `path`'s connections to Service `i` go: its ClusterIP or NodePort, or for the
    /// floor its endpoints.
    pub fn targets(&self, path: Path, i: usize) -> Vec<SocketAddrV4> {
        match (self.active, path) {
            (Some(Mode::Floor), _) => {
                self.endpoint_ips(i).into_iter().map(|ip| SocketAddrV4::new(ip, BACKEND_PORT)).collect()
            }
            (_, Path::ClusterIpPod) => vec![SocketAddrV4::new(workload::cluster_ip(i), SERVICE_PORT)],
            (_, Path::NodePortExternal) => {
                vec![SocketAddrV4::new(self.tb.nodes[0].ip, workload::node_port(i))]
            }
        }
    }

    /// The namespace `path`'s client runs in.
    pub fn client_ns(&self, path: Path) -> &str {
        match path {
            Path::ClusterIpPod => &self.tb.pods.iter().find(|p| p.name == CLIENT_POD).expect("client pod").ns,
            Path::NodePortExternal => &self.tb.client,
        }
    }

    /// node-a's agent: resident memory and the memory of its BPF maps, in bytes.
    pub fn agent_memory(&self) -> anyhow::Result<(u64, u64)> {
        let pid = self.tb.agent_pid(0).context("no agent runs on node-a")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        let mut map_bytes = 0;
        for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
            let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
            if info.lines().any(|l| l.starts_with("map_type:")) {
                map_bytes += info
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        Ok((rss_kib * 1024, map_bytes))
    }

    /// Starts both agents on the API server, which holds no Services yet, and waits for
    /// their first sync.
    fn start_agents(&mut self) -> anyhow::Result<()> {
        let range = format!("{}-{}", workload::NODE_PORT_RANGE.start(), workload::NODE_PORT_RANGE.end());
        let args = [
            "--kubeconfig".as_ref(),
            self.kubeconfig.as_os_str(),
            "--service-node-port-range".as_ref(),
            range.as_ref(),
        ];
        for i in 0..self.tb.nodes.len() {
            self.tb.start_agent_with(i, &args)?;
        }
        for i in 0..self.tb.nodes.len() {
            self.tb.wait_for_log(i, "synced", Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Starts probing `target` from the client pod until one of `expected` answers.
    fn probe(
        &self,
        target: SocketAddrV4,
        expected: BTreeSet<String>,
    ) -> anyhow::Result<std::thread::JoinHandle<std::io::Result<anyhow::Result<Instant>>>> {
        load::probe_until(
            self.client_ns(Path::ClusterIpPod),
            target,
            move |name| expected.contains(name),
            Instant::now() + PROGRAM_DEADLINE,
        )
    }

    /// Runs `program args` with `input` on its stdin in node-a, the node whose rules every
    /// measured path meets (the client pod's ClusterIP connections and the NodePort on
    /// node-a are translated there; node-b only routes to its backends). Loading the same
    /// rules into node-b too would only wait for a second restore: with iptables the two
    /// took turns, doubling each 10,000-Service round to over 200 s.
    fn on_node_a(&self, program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
        let ns = &self.tb.nodes[0].ns;
        let mut child = netns::command(ns, program)
            .args(args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program} in {ns}"))?;
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("{program} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

/// Which backends (0-2 on node-a, 3-5 on node-b) are Service `i`'s endpoints: two on node-a
/// and one on node-b, or once `changed`, the other three (one on node-a, two on node-b): no
/// endpoint in common, so a change is seen only once it is in place.
fn endpoint_picks(i: usize, changed: bool) -> Vec<usize> {
    let first =
        [i % BACKENDS_PER_NODE, (i + 1) % BACKENDS_PER_NODE, BACKENDS_PER_NODE + i % BACKENDS_PER_NODE];
    if changed {
        (0..2 * BACKENDS_PER_NODE).filter(|b| !first.contains(b)).collect()
    } else {
        first.to_vec()
    }
}

fn join<T>(handle: std::thread::JoinHandle<std::io::Result<anyhow::Result<T>>>) -> anyhow::Result<T> {
    handle.join().map_err(|_| anyhow::anyhow!("a probe panicked"))??
}

/// Deletes every entry of the pinned hash map at `pin`.
fn clear<K: aya::Pod, V: aya::Pod>(pin: &std::path::Path) -> anyhow::Result<()> {
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let mut map: HashMap<MapData, K, V> = aya::maps::Map::from_map_data(data)?.try_into()?;
    // Keys first: deleting while iterating would skip entries.
    let keys: Vec<K> = map.keys().collect::<Result<_, _>>()?;
    for key in keys {
        // Gone already (the connection expired meanwhile) is fine.
        let _ = map.remove(&key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::ENDPOINTS_PER_SERVICE;

    #[test]
    fn a_change_moves_a_service_to_three_other_backends() {
        for i in 0..12 {
            let (before, after) = (endpoint_picks(i, false), endpoint_picks(i, true));
            assert_eq!((before.len(), after.len()), (ENDPOINTS_PER_SERVICE, ENDPOINTS_PER_SERVICE));
            assert!(before.iter().all(|b| !after.contains(b)), "Service {i}: {before:?} → {after:?}");
            let on_node_a = |picks: &[usize]| picks.iter().filter(|&&b| b < BACKENDS_PER_NODE).count();
            assert_eq!((on_node_a(&before), on_node_a(&after)), (2, 1), "Service {i}");
        }
    }
}
