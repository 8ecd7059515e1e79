//! The network-namespace cluster: a fabric bridge, nodes, pods and an external client.
//!
//! ```text
//!   client (198.18.0.100) ──┐
//!   node-a eth0 (198.18.0.1) ─┼── br0 in the fabric namespace
//!   node-b eth0 (198.18.0.2) ─┘
//!   node-a pods: 198.18.1.10.. via pod0.. (gateway 198.18.1.1), node-b: 198.18.2.10..
//! ```
//! Every namespace is named `xlb-<run>-<role>`, so runs side by side never collide, and the
//! `Testbed` guard tears everything down on drop, panics included: processes it started,
//! bpffs directories of the agents, the nodes' cgroups, namespaces.
//!
//! Nodes are built the way production nodes are: pods keep the kernel's default offloads
//! (tx checksum, TSO, GSO) on both ends of their veths, and a pod's processes (its server, its
//! socket factory: `sockets`) live in a cgroup of their own under the node's cgroup, which
//! is the agent's `--cgroup-path`, as kubelet places pods under the cgroup root the DaemonSet
//! passes. Only the fabric stays NIC-like (complete checksums). One concession remains, and
//! `XLB_KIND_NODE=1` drops it: the fabric side of each node's `eth0` runs `xlb_xdp_pass`, so
//! the agents can take external traffic at XDP (`--external-hook xdp`; XDP_TX into a veth
//! needs an XDP program on its peer). Kind nodes have none there; with `XLB_KIND_NODE=1` the
//! agents choose for themselves (`--external-hook auto`: TC on a veth).
use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    os::{fd::OwnedFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use aya::{
    programs::{links::FdLink, xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::service::{ServiceKey, ServiceValue};
use lb_userspace::dataplane::EBPF_OBJECT;

use crate::{bin_path, netns, sockets};

/// Prefix of every namespace, bpffs directory and cgroup the testbed creates.
pub const PREFIX: &str = "xlb-";
const BPFFS: &str = "/sys/fs/bpf";
/// The program that passes every frame, for the fabric ports of the nodes.
const FABRIC_PASS: &str = "xlb_xdp_pass";
const FABRIC_PREFIX: u8 = 24;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

/// Where pods go: (pod name, node index).
#[derive(Clone, Debug)]
pub struct Spec {
    pub nodes: usize,
    pub pods: Vec<(String, usize)>,
    /// Ports the pods' kiada servers listen on.
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
}

#[derive(Clone, Debug)]
pub struct Node {
    /// The Kubernetes node name, `node-a`, `node-b`...
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub bpffs_dir: PathBuf,
    /// cgroup v2 directory of the node's own processes (`host_command`), the agent's
    /// `--cgroup-path`; its pods' cgroups are below it.
    pub cgroup: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub node: usize,
    /// The cgroup of the pod's processes, under its node's.
    pub cgroup: PathBuf,
    /// The node-side end of its veth.
    pub veth: String,
}

pub struct Testbed {
    pub run: String,
    pub fabric: String,
    pub client: String,
    pub client_ip: Ipv4Addr,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Manifests directory shared by the agents of all nodes (one cluster, one API).
    pub manifests: PathBuf,
    namespaces: Vec<String>,
    servers: Vec<Child>,
    agents: Vec<Option<Child>>,
    fabric_xdp: Option<FabricXdp>,
    keep: bool,
}

/// `xlb_xdp_pass` attached to the fabric ports; dropping the `Ebpf` detaches it.
struct FabricXdp {
    ebpf: Ebpf,
    links: Vec<(String, XdpLinkId)>,
}

/// `XLB_REALISTIC_NODE=1`: nodes filter like a typical Kubernetes host, with strict reverse
/// path filtering and conntrack INVALID packets dropped in FORWARD (Docker and many CNIs
/// install such rules). The suite must pass with and without them.
pub fn realistic_node() -> bool {
    std::env::var_os("XLB_REALISTIC_NODE").is_some_and(|v| v == "1")
}

/// `XLB_KIND_NODE=1`: each node's `eth0` is a veth whose peer runs no XDP program, as a kind
/// node's (its peer sits on the host's bridge), and the agents pick the hook for it
/// themselves (`--external-hook auto`). The suite must pass with and without it.
pub fn kind_node() -> bool {
    std::env::var_os("XLB_KIND_NODE").is_some_and(|v| v == "1")
}

fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 1 + i as u8)
}
fn pod_gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + node as u8, 1)
}
fn run_id() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    format!("{:06x}", (std::process::id() ^ nanos) & 0xff_ffff)
}

impl Testbed {
    /// Builds the cluster of `spec` and starts a kiada server in every pod.
    pub fn up(spec: &Spec) -> anyhow::Result<Self> {
        let run = run_id();
        let name = |role: &str| format!("{PREFIX}{run}-{role}");
        let cgroup_root = cgroup2_mount()?;
        let manifests = std::env::temp_dir().join(format!("{PREFIX}{run}-manifests"));
        fs::create_dir_all(&manifests)?;
        let mut tb = Testbed {
            fabric: name("fabric"),
            client: name("client"),
            client_ip: CLIENT_IP,
            nodes: Vec::new(),
            pods: Vec::new(),
            manifests,
            namespaces: Vec::new(),
            servers: Vec::new(),
            agents: Vec::new(),
            fabric_xdp: None,
            keep: false,
            run: run.clone(),
        };
        // From here on, a failure drops `tb`, which removes what was made so far.
        tb.add_ns(&tb.fabric.clone())?;
        netns::ip(&["-n", &tb.fabric, "link", "add", "br0", "type", "bridge"])?;
        netns::ip(&["-n", &tb.fabric, "link", "set", "br0", "up"])?;

        let client = tb.client.clone();
        tb.add_ns(&client)?;
        tb.plug_into_fabric(&client, "client", CLIENT_IP)?;

        for i in 0..spec.nodes {
            let node_name = format!("node-{}", (b'a' + i as u8) as char);
            let node = Node {
                ns: name(&node_name),
                ip: node_ip(i),
                bpffs_dir: Path::new(BPFFS).join(name(&node_name)),
                cgroup: cgroup_root.join(name(&node_name)),
                name: node_name,
            };
            tb.add_ns(&node.ns)?;
            tb.plug_into_fabric(&node.ns, &node.name, node.ip)?;
            for (key, value) in [
                ("net.ipv4.ip_forward", "1"),
                // XDP DNATs some connections back out of the interface they came in on:
                // routing, not a redirect the client should learn.
                ("net.ipv4.conf.all.send_redirects", "0"),
                ("net.ipv4.conf.eth0.send_redirects", "0"),
            ] {
                sysctl(&node.ns, key, value)?;
            }
            if realistic_node() {
                // `default` before the pod veths exist, so they start strict too.
                for key in ["all", "default", "eth0"] {
                    sysctl(&node.ns, &format!("net.ipv4.conf.{key}.rp_filter"), "1")?;
                }
                netns::run(
                    &node.ns,
                    "iptables",
                    &["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
                )?;
            }
            fs::create_dir(&node.cgroup).with_context(|| format!("creating {}", node.cgroup.display()))?;
            tb.nodes.push(node);
        }
        if !kind_node() {
            tb.attach_fabric_pass()?;
        }
        for i in 0..spec.nodes {
            for j in (0..spec.nodes).filter(|j| *j != i) {
                let subnet = format!("198.18.{}.0/24", 1 + j);
                netns::ip(&["-n", &tb.nodes[i].ns, "route", "add", &subnet, "via", &node_ip(j).to_string()])?;
            }
        }
        for (pod_name, node) in &spec.pods {
            tb.add_pod(pod_name, *node)?;
        }
        // A spec without ports runs its own servers (the benchmark).
        if !spec.tcp_ports.is_empty() || !spec.udp_ports.is_empty() {
            for pod in tb.pods.clone() {
                tb.start_server(&pod, spec)?;
            }
        }
        Ok(tb)
    }

    /// Attaches `xlb_xdp_pass` to the fabric side of every node's `eth0`. A node's XDP
    /// program answers some packets itself (XDP_TX, e.g. ICMP port unreachable for a Service
    /// without endpoints); a veth delivers such a frame only if its peer runs an XDP program
    /// too. A real NIC needs nothing of the kind.
    fn attach_fabric_pass(&mut self) -> anyhow::Result<()> {
        let ports: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        // Inside the fabric namespace: attaching resolves the port names there.
        let fabric_xdp = netns::within(&self.fabric, move || -> anyhow::Result<FabricXdp> {
            let mut loader = EbpfLoader::new();
            // Loading creates every map of the object, unused here: keep them small.
            for map in lb_common::maps::ALL.into_iter().filter(|m| *m != lb_common::maps::CONFIG) {
                loader.map_max_entries(map, 64);
            }
            let mut ebpf = loader.load(EBPF_OBJECT).context("loading the eBPF object")?;
            let program: &mut Xdp =
                ebpf.program_mut(FABRIC_PASS).context("no xlb_xdp_pass in the object")?.try_into()?;
            program.load().context("loading xlb_xdp_pass")?;
            let mut links = Vec::new();
            for port in ports {
                let id = program
                    .attach(&port, XdpMode::default())
                    .with_context(|| format!("attaching xlb_xdp_pass to fabric port {port}"))?;
                links.push((port, id));
            }
            Ok(FabricXdp { ebpf, links })
        })??;
        self.fabric_xdp = Some(fabric_xdp);
        Ok(())
    }

    /// Whether `ns` is one of this testbed's namespaces.
    pub fn owns_namespace(&self, ns: &str) -> bool {
        self.namespaces.iter().any(|n| n == ns)
    }

    fn add_ns(&mut self, ns: &str) -> anyhow::Result<()> {
        netns::ip(&["netns", "add", ns])?;
        self.namespaces.push(ns.to_string());
        netns::ip(&["-n", ns, "link", "set", "lo", "up"])
    }

    /// Joins `ns` to the fabric bridge with `eth0` at `ip`/24.
    fn plug_into_fabric(&self, ns: &str, port: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        netns::ip(&[
            "-n",
            ns,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            &self.fabric,
        ])?;
        netns::ip(&["-n", &self.fabric, "link", "set", port, "master", "br0", "up"])?;
        netns::ip(&["-n", ns, "addr", "add", &format!("{ip}/{FABRIC_PREFIX}"), "dev", "eth0"])?;
        netns::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        full_checksums(ns, "eth0")
    }

    fn add_pod(&mut self, pod_name: &str, node: usize) -> anyhow::Result<()> {
        let index = self.pods.iter().filter(|p| p.node == node).count();
        let veth = format!("pod{index}");
        let pod = Pod {
            name: pod_name.to_string(),
            ns: format!("{PREFIX}{}-{pod_name}", self.run),
            ip: Ipv4Addr::new(198, 18, 1 + node as u8, 10 + index as u8),
            node,
            cgroup: self.nodes[node].cgroup.join(format!("pod-{pod_name}")),
            veth: veth.clone(),
        };
        let node_ns = self.nodes[node].ns.clone();
        let gateway = pod_gateway(node).to_string();
        self.add_ns(&pod.ns)?;
        netns::ip(&[
            "-n", &node_ns, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &pod.ns,
        ])?;
        // Routed pod network: the node answers as the gateway on every pod veth, and a /32
        // route per pod points at its veth.
        netns::ip(&["-n", &node_ns, "addr", "add", &format!("{gateway}/32"), "dev", &veth])?;
        if realistic_node() {
            sysctl(&node_ns, &format!("net.ipv4.conf.{veth}.rp_filter"), "1")?;
        }
        netns::ip(&["-n", &node_ns, "link", "set", &veth, "up"])?;
        netns::ip(&[
            "-n",
            &node_ns,
            "route",
            "add",
            &format!("{}/32", pod.ip),
            "dev",
            &veth,
            "src",
            &gateway,
        ])?;
        netns::ip(&["-n", &pod.ns, "addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"])?;
        netns::ip(&["-n", &pod.ns, "link", "set", "eth0", "up"])?;
        netns::ip(&["-n", &pod.ns, "route", "add", &gateway, "dev", "eth0"])?;
        netns::ip(&["-n", &pod.ns, "route", "add", "default", "via", &gateway])?;
        // Both ends keep the kernel's default offloads, as a CNI leaves them.
        fs::create_dir(&pod.cgroup).with_context(|| format!("creating {}", pod.cgroup.display()))?;
        self.start_socket_factory(&pod)?;
        self.pods.push(pod);
        Ok(())
    }

    /// Starts the pod's socket factory (`sockets`), in its namespace and cgroup.
    fn start_socket_factory(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let (ours, theirs) = UnixStream::pair().context("a socket pair for the socket factory")?;
        let mut cmd = in_cgroup(&pod.ns, &pod.cgroup, &bin_path("kiada"));
        cmd.arg("sockets").stdin(Stdio::from(OwnedFd::from(theirs)));
        let child = cmd.spawn().with_context(|| format!("starting the socket factory of {}", pod.ns))?;
        self.servers.push(child);
        sockets::register(&pod.ns, Arc::new(sockets::Factory::new(ours)));
        Ok(())
    }

    /// Turns tx checksum offload (and with it TSO) off or back on at both ends of pod
    /// `name`'s veth: for the configuration where a pod's stack sends complete checksums.
    pub fn set_pod_tx_offload(&self, name: &str, on: bool) -> anyhow::Result<()> {
        let pod = self.pods.iter().find(|p| p.name == name).with_context(|| format!("no pod {name}"))?;
        let state = if on { "on" } else { "off" };
        for (ns, dev) in [(pod.ns.as_str(), "eth0"), (self.nodes[pod.node].ns.as_str(), pod.veth.as_str())] {
            netns::run(ns, "ethtool", &["-K", dev, "tx", state])?;
        }
        Ok(())
    }

    fn start_server(&mut self, pod: &Pod, spec: &Spec) -> anyhow::Result<()> {
        let join = |ports: &[u16]| ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = in_cgroup(&pod.ns, &pod.cgroup, &bin_path("kiada"));
        cmd.args(["serve", "--pod", &pod.name, "--node", &self.nodes[pod.node].name])
            .args(["--tcp", &join(&spec.tcp_ports), "--udp", &join(&spec.udp_ports)])
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting kiada in {}", pod.ns))?;
        let stdout = child.stdout.take().expect("piped");
        self.servers.push(child);
        let mut line = String::new();
        // Blocks until the server listens (or exits): an event, not a timed wait.
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("kiada in {} did not start", pod.ns);
        }
        Ok(())
    }

    /// Writes a manifest file into the shared manifests directory.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> anyhow::Result<()> {
        // Write then rename, so an agent never reads half a file.
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.manifests.join(file))?;
        Ok(())
    }

    /// Starts `xlb agent` in node `i`'s namespace on the shared manifests directory, attached
    /// to its `eth0` and pod veths.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let manifests = self.manifests.clone();
        self.start_agent_with(i, &["--manifests".as_ref(), manifests.as_os_str()])
    }

    /// Starts `xlb agent` in node `i`'s namespace with `source` (e.g. `--kubeconfig FILE`)
    /// and any other flags, attached to its `eth0` and pod veths.
    pub fn start_agent_with(&mut self, i: usize, source: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let mut cmd = netns::command(&node.ns, &bin_path("xlb").to_string_lossy());
        cmd.arg("agent")
            .args(source)
            .args(["--node-name", &node.name, "--external-interfaces", "eth0", "--pod-interfaces", "pod*"])
            // The fabric's XDP programs let XDP_TX through (see the module docs).
            .args(if kind_node() { &[][..] } else { &["--external-hook", "xdp"][..] })
            .arg("--bpffs-dir")
            .arg(&node.bpffs_dir)
            .arg("--cgroup-path")
            .arg(&node.cgroup)
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.agent_log(i))?);
        let child = cmd.spawn().with_context(|| format!("starting xlb agent in {}", node.ns))?;
        self.agents.resize_with(self.nodes.len(), || None);
        self.agents[i] = Some(child);
        Ok(())
    }

    /// A command running `program` as one of node `node`'s own processes: in its network
    /// namespace and its cgroup, where the agent's socket programs apply. The shell joins the
    /// cgroup before it execs `program`, so before `program` opens any socket.
    pub fn host_command(&self, node: usize, program: &Path) -> Command {
        let node = &self.nodes[node];
        in_cgroup(&node.ns, &node.cgroup, program)
    }

    /// A command running `program` as one of pod `name`'s processes: in its network
    /// namespace and its cgroup, under the node's.
    pub fn pod_command(&self, name: &str, program: &Path) -> anyhow::Result<Command> {
        let pod = self.pods.iter().find(|p| p.name == name).with_context(|| format!("no pod {name}"))?;
        Ok(in_cgroup(&pod.ns, &pod.cgroup, program))
    }

    /// Where node `i`'s agent writes its log (printed when a test panics).
    pub fn agent_log(&self, i: usize) -> PathBuf {
        self.manifests.with_file_name(format!("{PREFIX}{}-agent-{}.log", self.run, self.nodes[i].name))
    }

    /// Waits until node `i`'s agent has programmed every frontend in `keys`, or fails after
    /// `timeout` (the agent exited or never got there).
    pub fn wait_programmed(
        &mut self,
        i: usize,
        keys: &[ServiceKey],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let path = self.nodes[i].bpffs_dir.join(lb_common::maps::SERVICES);
        loop {
            self.check_agent_alive(i)?;
            if let Ok(map) = services_map(&path) {
                if keys.iter().all(|k| map.get(k, 0).is_ok()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not program {keys:?} within {timeout:?}", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until node `i`'s agent log contains `needle`; fails after `timeout` or if the
    /// agent exited.
    pub fn wait_for_log(&mut self, i: usize, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_agent_alive(i)?;
            let log = fs::read_to_string(self.agent_log(i)).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if Instant::now() > deadline {
                bail!("{} never logged {needle:?} within {timeout:?}", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of node `i`'s running agent.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents.get(i)?.as_ref().map(Child::id)
    }

    /// Fails if node `i`'s agent has exited.
    pub fn check_agent_alive(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(Some(agent)) = self.agents.get_mut(i) {
            if let Some(status) = agent.try_wait()? {
                bail!("agent of {} exited: {status}", self.nodes[i].name);
            }
        }
        Ok(())
    }

    /// Stops node `i`'s agent (SIGTERM, then wait). Its programs stay attached.
    pub fn stop_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.signal_agent(i, libc::SIGTERM).map(drop)
    }

    /// Sends `signal` (e.g. SIGTERM, SIGKILL) to node `i`'s agent and waits until it has
    /// exited and is reaped: when this returns, the process is gone. Its exit status, or
    /// `None` when no agent ran.
    pub fn signal_agent(
        &mut self,
        i: usize,
        signal: libc::c_int,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let Some(Some(mut agent)) = self.agents.get_mut(i).map(Option::take) else { return Ok(None) };
        // SAFETY: signalling a child we own and have not reaped yet.
        if unsafe { libc::kill(agent.id() as i32, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("signalling the agent");
        }
        Ok(Some(agent.wait()?))
    }

    /// Runs `xlb agent --cleanup` for node `i`: detaches and unpins everything it made.
    pub fn cleanup_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_agent(i)?;
        let status = Command::new(bin_path("xlb"))
            .args(["agent", "--cleanup", "--bpffs-dir"])
            .arg(&self.nodes[i].bpffs_dir)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("xlb agent --cleanup failed for {}", self.nodes[i].name);
        }
        Ok(())
    }

    /// Leaves the cluster running after this guard is dropped (`testbed up`, `demo --keep`).
    /// Pins the fabric's XDP links, which would otherwise detach when this process exits;
    /// `down_all` removes the pins with the rest.
    pub fn keep(mut self) -> anyhow::Result<()> {
        let dir = self.fabric_pins().join("links");
        if let Some(FabricXdp { ebpf, links }) = &mut self.fabric_xdp {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let program: &mut Xdp = ebpf.program_mut(FABRIC_PASS).context("xlb_xdp_pass")?.try_into()?;
            for (port, id) in links.drain(..) {
                let pin = dir.join(format!("xdp_pass@{port}"));
                FdLink::try_from(program.take_link(id)?)?
                    .pin(&pin)
                    .with_context(|| format!("pinning {}", pin.display()))?;
            }
        }
        self.keep = true;
        Ok(())
    }

    /// Where a kept testbed pins the fabric's XDP links, laid out as an agent's bpffs
    /// directory so `dataplane::cleanup` removes it.
    fn fabric_pins(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.fabric)
    }
}

/// `program` in network namespace `ns` and cgroup `cgroup`: the shell joins the cgroup before
/// it execs `program`, so before `program` opens any socket.
fn in_cgroup(ns: &str, cgroup: &Path, program: &Path) -> Command {
    let mut cmd = netns::command(ns, "sh");
    cmd.args(["-c", r#"echo $$ > "$0/cgroup.procs" && exec "$@""#]).arg(cgroup).arg(program);
    cmd
}

fn sysctl(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    netns::run(ns, "sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
}

/// Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified
/// next to cgroup v1).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.get(2) == Some(&"cgroup2"))
        .map(|fields| PathBuf::from(fields[1]))
        .context("no cgroup2 file system is mounted")
}

/// Kills the processes of cgroup `dir` and of the cgroups below it and removes them all, once
/// their processes have exited.
fn remove_cgroup(dir: &Path) -> anyhow::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for child in entries.filter_map(|e| e.ok()).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            remove_cgroup(&child.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::read_to_string(dir.join("cgroup.procs")) {
            Ok(procs) => {
                for pid in procs.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                    // SAFETY: killing a process in a cgroup of ours.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}/cgroup.procs", dir.display())),
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Busy until the killed processes have exited.
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing {}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Frames leave the fabric's veths with complete checksums, as a NIC delivers them: XDP
/// cannot see a partial (offloaded) checksum and would update it wrongly.
fn full_checksums(ns: &str, dev: &str) -> anyhow::Result<()> {
    netns::run(ns, "ethtool", &["-K", dev, "tx", "off"]).map(drop)
}

/// The pinned service map of an agent.
pub fn services_map(
    path: &Path,
) -> anyhow::Result<aya::maps::HashMap<aya::maps::MapData, ServiceKey, ServiceValue>> {
    let map = aya::maps::MapData::from_pin(path)?;
    Ok(aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))?)
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for pod in &self.pods {
            sockets::unregister(&pod.ns);
        }
        for child in self.agents.iter_mut().flatten().chain(self.servers.iter_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let _ = lb_userspace::dataplane::cleanup(&node.bpffs_dir);
            let log = self.agent_log(i);
            if std::thread::panicking() {
                let text = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- last lines of the agent log of {}:", node.name);
                tail.iter().rev().for_each(|l| eprintln!("{l}"));
            }
            let _ = fs::remove_file(log);
            let _ = remove_cgroup(&node.cgroup);
        }
        let _ = lb_userspace::dataplane::cleanup(&self.fabric_pins());
        for ns in self.namespaces.iter().rev() {
            let _ = netns::ip(&["netns", "del", ns]);
        }
        let _ = fs::remove_dir_all(&self.manifests);
    }
}

/// Removes every testbed of any run: processes in `xlb-*` namespaces, the namespaces, the
/// bpffs directories (agents' and kept fabrics'), the nodes' cgroups and their processes, and
/// the manifest directories. Returns what it removed.
pub fn down_all() -> Vec<String> {
    let mut removed = Vec::new();
    for ns in netns::list().into_iter().filter(|n| n.starts_with(PREFIX)) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: killing a process that lives in a namespace of ours.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = netns::ip(&["netns", "del", &ns]);
        removed.push(format!("netns {ns}"));
    }
    for dir in list_prefixed(Path::new(BPFFS)) {
        let _ = lb_userspace::dataplane::cleanup(&dir);
        removed.push(format!("bpffs {}", dir.display()));
    }
    for dir in cgroup2_mount().map(|root| list_prefixed(&root)).unwrap_or_default() {
        let _ = remove_cgroup(&dir);
        removed.push(format!("cgroup {}", dir.display()));
    }
    // Only what a run leaves in the temporary directory: its manifests and agent logs.
    for path in list_prefixed(&std::env::temp_dir()) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with("-manifests") {
            let _ = fs::remove_dir_all(&path);
            removed.push(format!("dir {}", path.display()));
        } else if name.contains("-agent-") && name.ends_with(".log") {
            let _ = fs::remove_file(&path);
            removed.push(format!("file {}", path.display()));
        }
    }
    removed
}

/// `xlb-*` entries of `dir`.
pub fn list_prefixed(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(PREFIX))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}
