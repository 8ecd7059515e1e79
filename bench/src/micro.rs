//! Per-packet cost of every program path, measured in the kernel with BPF_PROG_TEST_RUN on
//! the real programs with private maps (nothing attached, no interface involved).
//!
//! Method:
//! - The maps hold `SERVICES` benchmark Services (`workload::service`, NodePort, 3 endpoints
//!   each, every endpoint its own address on another node), programmed through the agent's
//!   own path (store → desired state → map writer), so every lookup is in a realistic table.
//!   The map sizes are the agent's defaults (`MapSizes::default()`).
//! - One BPF_PROG_TEST_RUN call per packet, `repeat` = 1: the kernel runs a program again on
//!   the buffer its previous run rewrote, so with `repeat` > 1 every run after the first one
//!   sees the translated frame (a DNATed SYN is no longer addressed to the Service) and takes
//!   another path; the test `repeat_reruns_the_program_on_the_frame_it_rewrote` shows it.
//!   Every call copies the input frame afresh. A sample is the sum of the durations the
//!   kernel reports for `runs` calls, divided by `runs`: the timer's own cost (two clock reads
//!   and some bookkeeping per call) is in every figure, the floor (`xlb_xdp_pass`, which only
//!   returns XDP_PASS) included, measured the very same way.
//! - Every call's verdict and whole output frame are checked, and the connection state each
//!   case leaves is counted, so a benchmark can never time a drop, a pass-through or a
//!   different path than the one it names.
//! - New-flow cases open a new connection on every call (another client port, then another
//!   client address) to the next Service in turn. The conntrack, service conntrack and SNAT
//!   tables are emptied before every sample and whenever `CLEAR_EVERY` connections were
//!   opened since, so the inserts never meet a full LRU table (no eviction) nor an exhausted
//!   SNAT port range; the kernel-reported durations leave the emptying out of the figures.
//! - A first round of every path is not reported: it warms the caches up and, above all,
//!   brings the tables' free lists from the order they were allocated in (consecutive
//!   elements, new flows about a quarter cheaper) to the scattered order a running node has.
//!
//! Paths (`PATHS`), with the packet each one times:
//! - `xdp-pass` (floor): `xlb_xdp_pass` on a client's ACK to a NodePort.
//! - `xdp-no-service`: XDP on a packet to the node that is no Service's (port 22): what every
//!   packet that is not balanced pays (lookups that miss), remote backends' replies to this
//!   node's pods included.
//! - `xdp-conntrack-hit`: XDP, a client's ACK to a NodePort on an open connection (DNAT).
//! - `xdp-new-flow`: XDP, a client's SYN to a NodePort: backend choice, SNAT port allocation
//!   (the backends are remote), conntrack entry, DNAT.
//! - `xdp-reply`: XDP, the remote backend's reply to the SNAT port: reverse SNAT to the client.
//! - `tc-conntrack-hit`: TC ingress on a pod's veth, the pod's ACK to a ClusterIP on an open
//!   connection.
//! - `tc-new-flow`: TC ingress, a pod's SYN to a ClusterIP (no SNAT: the reply comes back
//!   through this node).
//! - `tc-egress-snat`: TC egress, a NodePort connection's client packet (already DNATed at
//!   XDP) leaving for its remote backend: SNAT.
//! - `tc-egress-reply`: TC egress, a backend's reply to a NodePort client leaving the node:
//!   the NodePort put back as its source.
//!
//! TC figures have no floor of their own (the object has no TC program that only passes);
//! the kernel times TC and XDP runs with the same timer, so `xdp-pass` stands for both.
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{Program, TestRun as _, TestRunOptions, Xdp},
    Ebpf, EbpfLoader, Pod,
};
use lb_common::{
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{CtBackend, CtEntry, CtKey},
    maps,
    nat::NatEntry,
    proto,
};
use lb_userspace::{
    dataplane::{Dataplane, Hook, MapSizes, MapWriter, EBPF_OBJECT},
    desired::{self, NodeContext},
};
use xlb_tests::frame::{self, ACK, SYN};

use crate::{
    results::{Metric, Mode, Report},
    workload,
};

/// Benchmark Services in the maps while measuring.
pub const SERVICES: usize = 1_000;
/// The `services` field of the per-packet figures.
pub const FIGURE_SERVICES: usize = 1;
/// Every path measured, with its mode, in measuring order.
pub const PATHS: [(&str, Mode); 9] = [
    ("xdp-pass", Mode::Floor),
    ("xdp-no-service", Mode::Xlb),
    ("xdp-conntrack-hit", Mode::Xlb),
    ("xdp-new-flow", Mode::Xlb),
    ("xdp-reply", Mode::Xlb),
    ("tc-conntrack-hit", Mode::Xlb),
    ("tc-new-flow", Mode::Xlb),
    ("tc-egress-snat", Mode::Xlb),
    ("tc-egress-reply", Mode::Xlb),
];
/// New connections opened between two emptyings of the connection tables: a quarter of
/// their size.
const CLEAR_EVERY: u64 = maps::CONNTRACK_MAX as u64 / 4;

/// The floor program in the eBPF object.
const FLOOR_PROGRAM: &str = "xlb_xdp_pass";
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;

/// The measured node, with `NODE` its only address (and SNAT address).
const NODE_NAME: &str = "bench-node";
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The Service of the open connections the conntrack-hit and reply cases use.
const TARGET: usize = SERVICES - 1;
/// The external client and the pod of those connections.
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 100), 40000);
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 16, 1), 45000);
/// Clients of new flows: ports 1024-60999 (below the SNAT range) of addresses from
/// 198.18.64.0/18 (external) and 198.18.32.0/19 (pods).
const FIRST_PORT: u16 = 1024;
const PORTS: u64 = (SNAT_PORT_MIN - FIRST_PORT) as u64;
const EXTERNAL_CLIENTS: (Ipv4Addr, u64) = (Ipv4Addr::new(198, 18, 64, 0), 1 << 14);
const POD_CLIENTS: (Ipv4Addr, u64) = (Ipv4Addr::new(198, 18, 32, 0), 1 << 13);

/// The endpoints of benchmark Service `i`: three addresses of its own from 198.18.128.0/17,
/// on no node of ours, so connections from outside are SNATed and no Service shares another's
/// SNAT ports.
pub fn backends(i: usize) -> [Ipv4Addr; workload::ENDPOINTS_PER_SERVICE] {
    std::array::from_fn(|j| {
        let k = (i * workload::ENDPOINTS_PER_SERVICE + j) as u32;
        assert!(k < 128 * 250, "backend addresses for at most 10,922 Services");
        Ipv4Addr::new(198, 18, 128 + (k / 250) as u8, (k % 250 + 1) as u8)
    })
}

fn node_port(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(NODE, workload::node_port(i))
}

fn cluster_ip(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(workload::cluster_ip(i), workload::SERVICE_PORT)
}

/// Client `n` of a new flow from `(base, count)` addresses: never the same tuple twice
/// within `count` × 59,976 flows.
fn client(n: u64, (base, count): (Ipv4Addr, u64)) -> SocketAddrV4 {
    let addr = u32::from(base) + ((n / PORTS) % count) as u32;
    SocketAddrV4::new(Ipv4Addr::from(addr), FIRST_PORT + (n % PORTS) as u16)
}

/// The destination of a frame built by `frame::tcp` (and of its translations).
fn destination(frame: &[u8]) -> Option<SocketAddrV4> {
    let ip = frame.get(frame::offset::IP_VER_IHL + 16..frame::offset::IP_VER_IHL + 20)?;
    let port = frame.get(frame::offset::L4 + 2..frame::offset::L4 + 4)?;
    Some(SocketAddrV4::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), u16::from_be_bytes([port[0], port[1]])))
}

fn key(src: SocketAddrV4, dst: SocketAddrV4) -> CtKey {
    CtKey::new(*src.ip(), src.port(), *dst.ip(), dst.port(), proto::TCP)
}

fn socket(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    XdpPass,
    XdpNoService,
    XdpConntrackHit,
    XdpNewFlow,
    XdpReply,
    TcConntrackHit,
    TcNewFlow,
    TcEgressSnat,
    TcEgressReply,
}

impl Path {
    const ALL: [Path; 9] = [
        Path::XdpPass,
        Path::XdpNoService,
        Path::XdpConntrackHit,
        Path::XdpNewFlow,
        Path::XdpReply,
        Path::TcConntrackHit,
        Path::TcNewFlow,
        Path::TcEgressSnat,
        Path::TcEgressReply,
    ];

    /// Name and mode, as in `PATHS`.
    fn figure(self) -> (&'static str, Mode) {
        PATHS[Self::ALL.iter().position(|p| *p == self).expect("every path is in ALL")]
    }

    /// `None` for the floor program.
    fn hook(self) -> Option<Hook> {
        match self {
            Path::XdpPass => None,
            Path::XdpNoService | Path::XdpConntrackHit | Path::XdpNewFlow | Path::XdpReply => {
                Some(Hook::XdpIngress)
            }
            Path::TcConntrackHit | Path::TcNewFlow => Some(Hook::TcIngress),
            Path::TcEgressSnat | Path::TcEgressReply => Some(Hook::TcEgress),
        }
    }

    fn pass_verdict(self) -> u32 {
        match self.hook() {
            None | Some(Hook::XdpIngress) => XDP_PASS,
            Some(Hook::TcExternal | Hook::TcIngress | Hook::TcEgress) => TC_ACT_OK,
        }
    }
}

/// Entries of the connection tables: (conntrack, service conntrack, SNAT bindings).
type Entries = (usize, usize, usize);

/// A connection opened through the programs.
struct Connection {
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    backend: SocketAddrV4,
    /// The SNAT source of a connection from outside to a remote backend.
    snat: Option<SocketAddrV4>,
}

/// One packet to time over and over: its input, verdict and output.
struct Fixed {
    input: Vec<u8>,
    verdict: u32,
    output: Vec<u8>,
    /// The connection state the case starts from and must leave as it is.
    entries: Entries,
}

/// The programs of one node with private maps holding the benchmark Services.
struct Bench {
    dp: Dataplane,
    /// Holds the Service maps; the tests read its counters.
    #[cfg_attr(not(test), allow(dead_code))]
    writer: MapWriter,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_service: HashMap<MapData, CtKey, CtBackend>,
    nat: HashMap<MapData, CtKey, NatEntry>,
    /// The object again, with only `xlb_xdp_pass` loaded (and its unused maps kept small).
    floor: Ebpf,
    out: Vec<u8>,
}

impl Bench {
    /// Loads the programs (root) with `sizes` and programs `services` benchmark Services.
    fn new(services: usize, sizes: MapSizes) -> Result<Self> {
        let mut dp = Dataplane::load_unpinned(sizes).context("loading the programs (needs root)")?;
        let mut writer = MapWriter::open(&mut dp).context("opening the maps")?;
        let objects: Vec<_> = (0..services).map(|i| workload::service(i, &backends(i))).collect();
        let node = NodeContext { name: NODE_NAME, addrs: &[NODE], default_snat_addr: Some(NODE) };
        let sync = writer.sync(&desired::compute(&workload::store(&objects), &node));
        ensure!(sync.failures.is_empty(), "programming {services} Services: {:?}", sync.failures);
        // A ClusterIP and a NodePort frontend per Service.
        ensure!(sync.frontends == 2 * services, "{} frontends for {services} Services", sync.frontends);
        let conntrack = dp.take_map(maps::CONNTRACK)?.try_into()?;
        let ct_service = dp.take_map(maps::CT_SERVICE)?.try_into()?;
        let nat = dp.take_map(maps::NAT)?.try_into()?;

        let mut loader = EbpfLoader::new();
        for map in maps::ALL.into_iter().filter(|m| *m != maps::CONFIG) {
            loader.map_max_entries(map, 64);
        }
        let mut floor = loader.load(EBPF_OBJECT).context("loading the eBPF object for the floor")?;
        let program: &mut Xdp = floor.program_mut(FLOOR_PROGRAM).context("no xlb_xdp_pass")?.try_into()?;
        program.load().context("loading xlb_xdp_pass")?;
        Ok(Self { dp, writer, conntrack, ct_service, nat, floor, out: Vec::new() })
    }

    fn program(&self, path: Path) -> Result<&Program> {
        match path.hook() {
            Some(hook) => self.dp.program(hook).with_context(|| format!("no program for {hook:?}")),
            None => self.floor.program(FLOOR_PROGRAM).context("no xlb_xdp_pass"),
        }
    }

    /// One BPF_PROG_TEST_RUN of `path`'s program on `input` with `repeat`: the verdict and
    /// the duration the kernel reports (ns, the average over the repeats). The output frame
    /// is left in `self.out`.
    fn run(&mut self, path: Path, input: &[u8], repeat: u32) -> Result<(u32, u64)> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        out.resize(input.len() + 256, 0);
        let opts =
            TestRunOptions { data_in: Some(input), data_out: Some(&mut out), repeat, ..Default::default() };
        let result = match self.program(path)? {
            Program::Xdp(p) => p.test_run(opts),
            Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("{path:?}: not a packet program"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {path:?}"))?;
        out.truncate(result.data_size_out as usize);
        self.out = out;
        Ok((result.return_value, u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX)))
    }

    /// Runs `input` once and checks the verdict and the whole output frame.
    fn expect(&mut self, path: Path, input: &[u8], verdict: u32, output: &[u8]) -> Result<u64> {
        let (got, ns) = self.run(path, input, 1)?;
        ensure!(got == verdict, "{path:?}: verdict {got}, expected {verdict}");
        ensure!(self.out == output, "{path:?}: output frame\n got {:02x?}\nwant {output:02x?}", self.out);
        Ok(ns)
    }

    /// Empties the connection tables; the entries they held.
    fn clear(&mut self) -> Result<Entries> {
        fn drain<V: Pod>(map: &mut HashMap<MapData, CtKey, V>) -> Result<usize> {
            let keys = map.keys().collect::<Result<Vec<_>, _>>()?;
            for key in &keys {
                map.remove(key)?;
            }
            Ok(keys.len())
        }
        Ok((drain(&mut self.conntrack)?, drain(&mut self.ct_service)?, drain(&mut self.nat)?))
    }

    /// Opens a TCP connection `client → frontend` of Service `service` at `path`'s hook with
    /// a SYN, checking its translation and the state it leaves.
    fn open(
        &mut self,
        path: Path,
        client: SocketAddrV4,
        frontend: SocketAddrV4,
        service: usize,
    ) -> Result<Connection> {
        let input = frame::tcp(client, frontend, SYN);
        let (verdict, _) = self.run(path, &input, 1)?;
        ensure!(verdict == path.pass_verdict(), "{path:?} SYN {client} → {frontend}: verdict {verdict}");
        let backend = destination(&self.out).context("no output frame")?;
        ensure!(
            backend.port() == workload::BACKEND_PORT && backends(service).contains(backend.ip()),
            "{path:?} SYN {client} → {frontend}: sent to {backend}, not an endpoint of Service {service}"
        );
        ensure!(
            self.out == frame::tcp(client, backend, SYN),
            "{path:?} SYN {client} → {frontend}: output frame"
        );
        let given = self.ct_service.get(&key(client, frontend), 0).context("no service conntrack entry")?;
        ensure!(socket(given.addr, given.port) == backend, "service conntrack entry names another backend");
        let entry = self.conntrack.get(&key(client, backend), 0).context("no conntrack entry")?;
        ensure!(socket(entry.frontend_addr, entry.frontend_port) == frontend, "conntrack entry: frontend");
        let snat = (entry.snat_addr != 0).then(|| socket(entry.snat_addr, entry.snat_port));
        match (path.hook(), snat) {
            (Some(Hook::XdpIngress), Some(snat)) => {
                ensure!(
                    *snat.ip() == NODE && (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&snat.port()),
                    "SNAT source {snat}"
                );
                let bound = self.nat.get(&key(backend, snat), 0).context("no SNAT binding")?;
                ensure!(socket(bound.addr, bound.port) == client, "the SNAT binding names another client");
            }
            (Some(Hook::TcIngress), None) => {}
            (hook, snat) => bail!("{hook:?} SYN {client} → {frontend}: SNAT source {snat:?}"),
        }
        Ok(Connection { client, frontend, backend, snat })
    }

    /// Sets up `path` from empty tables: the packet it times, checked once here.
    fn fixed(&mut self, path: Path) -> Result<Fixed> {
        let (verdict, input, output, entries) = match path {
            Path::XdpPass => {
                let ack = frame::tcp(CLIENT, node_port(TARGET), ACK);
                (XDP_PASS, ack.clone(), ack, (0, 0, 0))
            }
            Path::XdpNoService => {
                let ssh = frame::tcp(CLIENT, SocketAddrV4::new(NODE, 22), ACK);
                (XDP_PASS, ssh.clone(), ssh, (0, 0, 0))
            }
            Path::TcConntrackHit => {
                let c = self.open(Path::TcNewFlow, POD, cluster_ip(TARGET), TARGET)?;
                (
                    TC_ACT_OK,
                    frame::tcp(c.client, c.frontend, ACK),
                    frame::tcp(c.client, c.backend, ACK),
                    (1, 1, 0),
                )
            }
            Path::XdpConntrackHit | Path::XdpReply | Path::TcEgressSnat | Path::TcEgressReply => {
                let c = self.open(Path::XdpNewFlow, CLIENT, node_port(TARGET), TARGET)?;
                let snat = c.snat.context("a connection from outside to a remote backend is SNATed")?;
                let (input, output) = match path {
                    Path::XdpConntrackHit => {
                        (frame::tcp(c.client, c.frontend, ACK), frame::tcp(c.client, c.backend, ACK))
                    }
                    Path::XdpReply => {
                        (frame::tcp(c.backend, snat, ACK), frame::tcp(c.backend, c.client, ACK))
                    }
                    Path::TcEgressSnat => {
                        (frame::tcp(c.client, c.backend, ACK), frame::tcp(snat, c.backend, ACK))
                    }
                    _ => (frame::tcp(c.backend, c.client, ACK), frame::tcp(c.frontend, c.client, ACK)),
                };
                (path.pass_verdict(), input, output, (1, 1, 1))
            }
            Path::XdpNewFlow | Path::TcNewFlow => bail!("{path:?} opens a new connection per packet"),
        };
        self.expect(path, &input, verdict, &output)?;
        Ok(Fixed { input, verdict, output, entries })
    }

    /// One sample of a path that times one packet: the mean kernel time of `runs` calls.
    fn sample_fixed(&mut self, path: Path, runs: u32) -> Result<f64> {
        self.clear()?;
        let Fixed { input, verdict, output, entries } = self.fixed(path)?;
        let mut total = 0;
        for _ in 0..runs {
            total += self.expect(path, &input, verdict, &output)?;
        }
        let left = self.clear()?;
        ensure!(
            left == entries,
            "{path:?}: the timed packets changed the connection tables: {left:?}, not {entries:?}"
        );
        Ok(total as f64 / f64::from(runs))
    }

    /// One sample of a new-flow path: `runs` new connections, from client `next` on, each
    /// to the next Service in turn.
    fn sample_new_flows(&mut self, path: Path, runs: u32, next: &mut u64, services: usize) -> Result<f64> {
        let (clients, snat) = match path {
            Path::XdpNewFlow => (EXTERNAL_CLIENTS, 1),
            Path::TcNewFlow => (POD_CLIENTS, 0),
            _ => bail!("{path:?} is no new-flow path"),
        };
        let verdict = path.pass_verdict();
        let expected = |opened: u64| {
            let n = opened as usize;
            (n, n, n * snat)
        };
        self.clear()?;
        // Checked in full (tables included) before timing.
        let service = (*next % services as u64) as usize;
        let frontend = if path == Path::XdpNewFlow { node_port(service) } else { cluster_ip(service) };
        self.open(path, client(*next, clients), frontend, service)?;
        *next += 1;
        let mut opened = 1;
        let mut total = 0;
        for _ in 0..runs {
            if opened == CLEAR_EVERY {
                let left = self.clear()?;
                ensure!(left == expected(opened), "{path:?}: {opened} new connections left {left:?}");
                opened = 0;
            }
            let n = *next;
            *next += 1;
            let service = (n % services as u64) as usize;
            let from = client(n, clients);
            let frontend = if path == Path::XdpNewFlow { node_port(service) } else { cluster_ip(service) };
            let (got, ns) = self.run(path, &frame::tcp(from, frontend, SYN), 1)?;
            ensure!(got == verdict, "{path:?} SYN {from} → {frontend}: verdict {got}");
            let backend = destination(&self.out).context("no output frame")?;
            ensure!(
                backend.port() == workload::BACKEND_PORT
                    && backends(service).contains(backend.ip())
                    && self.out == frame::tcp(from, backend, SYN),
                "{path:?} SYN {from} → {frontend}: not DNATed to an endpoint ({backend})"
            );
            opened += 1;
            total += ns;
        }
        let left = self.clear()?;
        ensure!(left == expected(opened), "{path:?}: {opened} new connections left {left:?}");
        Ok(total as f64 / f64::from(runs))
    }
}

/// Keeps the calling thread on the CPU it runs on (per-CPU maps and caches stay the same
/// for every call); restores the thread's CPU set when dropped.
struct Pinned(Option<libc::cpu_set_t>);

impl Pinned {
    fn here() -> Self {
        // SAFETY: plain libc calls on a zeroed cpu_set_t of the right size for this thread.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            let cpu = libc::sched_getcpu();
            if cpu < 0 || libc::sched_getaffinity(0, size, &mut old) != 0 {
                return Self(None);
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, size, &one) != 0 {
                return Self(None);
            }
            Self(Some(old))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            // SAFETY: restores the set sched_getaffinity gave us.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), old) };
        }
    }
}

/// Per-packet cost of each program path, BPF_PROG_TEST_RUN, `runs` calls per sample and
/// `samples` samples per case: adds `Metric::NsPerPacket` figures (services = 1, target "") to
/// `report`, mode `Mode::Floor` for path "xdp-pass" and `Mode::Xlb` for the others of
/// `PATHS` ("xdp-conntrack-hit", "xdp-new-flow", "xdp-reply", "tc-conntrack-hit",
/// "tc-new-flow", ...). `SERVICES` Services are in the maps; samples of every path are
/// taken in turn. Needs root.
pub fn measure(report: &mut Report, runs: u32, samples: usize) -> anyhow::Result<()> {
    ensure!(runs > 0, "at least one run per sample");
    let mut bench = Bench::new(SERVICES, MapSizes::default())?;
    let _pinned = Pinned::here();
    let (mut next_external, mut next_pod) = (0, 0);
    // Round 0 is a warm-up, not reported: see the module's documentation.
    for round in 0..=samples {
        for path in Path::ALL {
            let ns = match path {
                Path::XdpNewFlow => bench.sample_new_flows(path, runs, &mut next_external, SERVICES)?,
                Path::TcNewFlow => bench.sample_new_flows(path, runs, &mut next_pod, SERVICES)?,
                _ => bench.sample_fixed(path, runs)?,
            };
            if round > 0 {
                let (name, mode) = path.figure();
                report.add(Metric::NsPerPacket, mode, FIGURE_SERVICES, name, "", ns);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Summary;

    fn packets_of(bench: &Bench, service: usize) -> u64 {
        let name = format!("{}/{}:http/TCP", workload::NAMESPACE, workload::service_name(service));
        let traffic = bench.writer.traffic().expect("counters");
        traffic.iter().find(|t| t.service_port == name).map_or(0, |t| t.packets)
    }

    /// The method's premise: with `repeat` = 10, the kernel runs the program ten times on one
    /// buffer, each run on what the previous one wrote. A NodePort ACK of an open connection
    /// comes out DNATed as with one run, but the Service counted one packet, not ten: runs
    /// 2-10 saw a frame addressed to the backend, no conntrack hit, no Service, and passed it.
    /// Likewise ten runs of a SYN open one connection and count one packet.
    #[test]
    fn repeat_reruns_the_program_on_the_frame_it_rewrote() {
        let sizes = MapSizes { conntrack: 16_384, ..MapSizes::default() };
        let mut bench = Bench::new(10, sizes).expect("load (needs root)");
        let path = Path::XdpConntrackHit;
        let c = bench.open(Path::XdpNewFlow, CLIENT, node_port(0), 0).unwrap();
        let ack = frame::tcp(c.client, c.frontend, ACK);
        let before = packets_of(&bench, 0);
        let (verdict, _) = bench.run(path, &ack, 10).unwrap();
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(bench.out, frame::tcp(c.client, c.backend, ACK), "the output of one run");
        assert_eq!(packets_of(&bench, 0), before + 1, "one of ten runs hit the connection");
        bench.expect(path, &ack, XDP_PASS, &frame::tcp(c.client, c.backend, ACK)).unwrap();
        assert_eq!(packets_of(&bench, 0), before + 2, "one run, one packet counted");

        bench.clear().unwrap();
        let other = SocketAddrV4::new(*CLIENT.ip(), 40001);
        let before = packets_of(&bench, 1);
        let (verdict, _) = bench.run(Path::XdpNewFlow, &frame::tcp(other, node_port(1), SYN), 10).unwrap();
        assert_eq!(verdict, XDP_PASS);
        let backend = destination(&bench.out).unwrap();
        assert_eq!(bench.out, frame::tcp(other, backend, SYN), "DNATed once");
        assert_eq!(packets_of(&bench, 1), before + 1, "one new connection counted, not ten");
        assert_eq!(bench.clear().unwrap(), (1, 1, 1), "one connection opened");
    }

    #[test]
    fn micro_measures_every_path_and_the_floor_is_cheapest() {
        let samples = 3;
        let mut report = Report::default();
        measure(&mut report, 2_000, samples).expect("measure (needs root)");
        let median = |path: &str, mode| {
            let figure = report.figure(Metric::NsPerPacket, mode, FIGURE_SERVICES, path, "").expect(path);
            assert_eq!(figure.target, "");
            assert_eq!(figure.samples.len(), samples, "{path}");
            assert!(figure.samples.iter().all(|s| s.is_finite() && *s > 0.0), "{path}: {:?}", figure.samples);
            Summary::of(&figure.samples).unwrap().median
        };
        for (path, mode) in PATHS {
            median(path, mode);
        }
        assert_eq!(report.figures.len(), PATHS.len());
        let floor = median("xdp-pass", Mode::Floor);
        let new_flow = median("xdp-new-flow", Mode::Xlb);
        assert!(floor < new_flow, "floor {floor} ns ≥ new flow {new_flow} ns");
    }
}
