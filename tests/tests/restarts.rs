//! Restarts and upgrades drop nothing: long-lived TCP streams and a steady stream of new
//! connections, through a ClusterIP (from a pod) and a NodePort (from the external client,
//! with a backend on the other node, so SNAT is in play), while the agents are stopped with
//! SIGTERM or SIGKILL and started again. Every stream must keep exchanging data end to end
//! (sequence-numbered echoes, bytes counted on both sides), every new connection must
//! succeed, including the ones made while no agent runs at all; and once the programs are
//! removed (`xlb agent --cleanup`) the same connections fail, so it was the programs that
//! carried them. And upgrades across map layouts: a pinned map of another layout is
//! recreated, logged, and swapped in only once filled, without a failed connection; the pins
//! of layout 1 gain the map added since (`XLB_SERVICE_NAMES`) and keep all the others.
use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::process::ExitStatusExt as _,
    },
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex, PoisonError,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::maps::{Array, Map, MapData, MapInfo};
use lb_common::{
    config::NodeConfig,
    conntrack::CtEntry,
    maps, proto,
    service::{ServiceKey, ServiceValue},
    stats::ServicePortName,
};
use xlb_tests::{
    apiserver::ApiServer,
    kiada, netns, sockets,
    testbed::{Spec, Testbed},
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 5, 10);
const HTTP_PORT: u16 = 80;
const HTTP_NODE_PORT: u16 = 30580;
/// The echo servers of the long-lived streams listen here, in the pods, as the Service port.
const ECHO_PORT: u16 = 9000;
const ECHO_NODE_PORT: u16 = 30590;
/// Long-lived streams per backend and per path (client → NodePort, pod → ClusterIP).
const STREAMS_PER_BACKEND: usize = 3;
/// One echo exchange: stream id (4 bytes), sequence number (8), filler.
const MESSAGE: usize = 64;
/// Pause between two exchanges of a stream, and between two new connections of a loop: the
/// traffic's rate, never a synchronisation.
const PACE: Duration = Duration::from_millis(20);
/// A stream exchange or a new connection taking longer than this counts as broken.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound of every wait for a condition (agent programmed, traffic progressed).
const DEADLINE: Duration = Duration::from_secs(30);
/// The signal stopping node-a's agent in each round; node-b's gets the other one.
const ROUNDS: [libc::c_int; 5] = [libc::SIGTERM, libc::SIGKILL, libc::SIGKILL, libc::SIGTERM, libc::SIGKILL];
/// Progress every stream and every connection loop must make in each phase (while the agents
/// are down, after they are back).
const STREAM_PROGRESS: u64 = 5;
const CONNECTION_PROGRESS: u64 = 10;

fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGTERM => "SIGTERM",
        libc::SIGKILL => "SIGKILL",
        _ => "signal",
    }
}

fn manifest(tb: &Testbed) -> String {
    let mut yaml = String::new();
    for node in &tb.nodes {
        yaml += &format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n---\n",
            node.name, node.ip
        );
    }
    yaml += &format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: steady\n  namespace: default\nspec:\n  type: NodePort\n  clusterIP: {CLUSTER_IP}\n  clusterIPs:\n  - {CLUSTER_IP}\n  externalTrafficPolicy: Cluster\n  ports:\n  - name: http\n    port: {HTTP_PORT}\n    targetPort: 8080\n    nodePort: {HTTP_NODE_PORT}\n    protocol: TCP\n  - name: echo\n    port: {ECHO_PORT}\n    targetPort: {ECHO_PORT}\n    nodePort: {ECHO_NODE_PORT}\n    protocol: TCP\n---\n"
    );
    yaml += &format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: steady-x7k2p\n  namespace: default\n  labels:\n    kubernetes.io/service-name: steady\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n- name: echo\n  port: {ECHO_PORT}\n  protocol: TCP\nendpoints:\n"
    );
    for pod in tb.pods.iter().filter(|p| p.name.starts_with("web-")) {
        yaml += &format!(
            "- addresses:\n  - {}\n  conditions:\n    ready: true\n    serving: true\n    terminating: false\n  nodeName: {}\n  targetRef:\n    kind: Pod\n    name: {}\n    namespace: default\n",
            pod.ip, tb.nodes[pod.node].name, pod.name
        );
    }
    yaml + "---\n"
}

/// The frontends node `i` must have programmed.
fn frontends(tb: &Testbed, i: usize) -> Vec<ServiceKey> {
    let ip = tb.nodes[i].ip;
    [(CLUSTER_IP, HTTP_PORT), (CLUSTER_IP, ECHO_PORT), (ip, HTTP_NODE_PORT), (ip, ECHO_NODE_PORT)]
        .into_iter()
        .map(|(addr, port)| ServiceKey::new(addr, port, proto::TCP))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Echo servers: in the backend pods' namespaces, on threads of this process.

/// Starts an echo server on `ECHO_PORT` in `ns`: it first sends `<pod> <peer address>\n` (who
/// answers and the client address it sees), then echoes everything, counting the bytes.
fn start_echo(ns: &str, pod: &str) -> anyhow::Result<Arc<AtomicU64>> {
    let received = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
    let (pod, counter) = (pod.to_string(), received.clone());
    // The accept loop lives as long as the test process; the namespace goes with the testbed.
    drop(netns::spawn(ns, move || {
        let listener = match TcpListener::bind(("0.0.0.0", ECHO_PORT)) {
            Ok(listener) => listener,
            Err(e) => return drop(ready_tx.send(Err(e))),
        };
        let _ = ready_tx.send(Ok(()));
        for stream in listener.incoming().flatten() {
            let (pod, counter) = (pod.clone(), counter.clone());
            thread::spawn(move || echo(stream, &pod, &counter));
        }
    })?);
    // Either the server listens or its thread is gone (the channel then closes): an event.
    ready_rx.recv().map_err(|_| anyhow::anyhow!("the echo server thread in {ns} did not start"))??;
    Ok(received)
}

fn echo(mut stream: TcpStream, pod: &str, received: &AtomicU64) -> io::Result<()> {
    let peer = stream.peer_addr()?;
    writeln!(stream, "{pod} {peer}")?;
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        received.fetch_add(n as u64, Ordering::Relaxed);
        stream.write_all(&buf[..n])?;
    }
}

// ---------------------------------------------------------------------------------------
// Long-lived streams

/// An open stream: which path, which backend answered and which client address it saw.
struct Opened {
    path: &'static str,
    stream: TcpStream,
    backend: String,
    seen_from: SocketAddr,
}

/// Reads the server's greeting line byte by byte (nothing else is in flight yet).
fn greeting(stream: &mut TcpStream) -> anyhow::Result<(String, SocketAddr)> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 256 {
        stream.read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            let line = String::from_utf8(line)?;
            let (pod, peer) = line.split_once(' ').ok_or_else(|| anyhow::anyhow!("greeting {line:?}"))?;
            return Ok((pod.to_string(), peer.parse()?));
        }
        line.push(byte[0]);
    }
    anyhow::bail!("no greeting line")
}

/// Opens streams from `ns` to `target` until each of `backends` holds `STREAMS_PER_BACKEND`
/// of them (bounded: at most 20 tries per stream wanted).
fn open_streams(
    ns: &str,
    path: &'static str,
    target: SocketAddrV4,
    backends: &[&str],
) -> anyhow::Result<Vec<Opened>> {
    let wanted: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    netns::within(ns, move || -> anyhow::Result<Vec<Opened>> {
        let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
        let mut opened = Vec::new();
        let tries = 20 * STREAMS_PER_BACKEND * wanted.len();
        for _ in 0..tries {
            if wanted.iter().all(|b| per_backend.get(b).copied().unwrap_or(0) >= STREAMS_PER_BACKEND) {
                return Ok(opened);
            }
            let mut stream = sockets::tcp_connect(target, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            stream.set_nodelay(true)?;
            let (backend, seen_from) = greeting(&mut stream)?;
            let count = per_backend.entry(backend.clone()).or_default();
            // Surplus streams to a backend that has enough are closed unused.
            if *count < STREAMS_PER_BACKEND {
                *count += 1;
                opened.push(Opened { path, stream, backend, seen_from });
            }
        }
        anyhow::bail!("{path}: {tries} connections did not reach every backend: {per_backend:?}")
    })?
}

/// What a stream did until it was told to stop.
struct StreamEnd {
    messages: u64,
    bytes: u64,
}

/// Exchanges sequence-numbered messages on `stream` until `stop`, checking that every echo is
/// the message sent; then closes it and checks the server closes too. `progress` counts the
/// exchanges as they complete.
fn drive(
    mut stream: TcpStream,
    id: u32,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> Result<StreamEnd, String> {
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut message = [(seq % 251) as u8; MESSAGE];
        message[..4].copy_from_slice(&id.to_be_bytes());
        message[4..12].copy_from_slice(&seq.to_be_bytes());
        stream.write_all(&message).map_err(|e| format!("message {seq}: sending: {e}"))?;
        let mut echoed = [0u8; MESSAGE];
        stream.read_exact(&mut echoed).map_err(|e| format!("message {seq}: reading the echo: {e}"))?;
        if echoed != message {
            return Err(format!("message {seq}: the echo differs: {echoed:?}"));
        }
        seq += 1;
        progress.store(seq, Ordering::Relaxed);
        thread::sleep(PACE);
    }
    stream.shutdown(Shutdown::Write).map_err(|e| format!("closing: {e}"))?;
    match stream.read(&mut [0u8; 1]) {
        Ok(0) => Ok(StreamEnd { messages: seq, bytes: seq * MESSAGE as u64 }),
        Ok(_) => Err("data after the close".into()),
        Err(e) => Err(format!("waiting for the server's close: {e}")),
    }
}

// ---------------------------------------------------------------------------------------
// New connections

/// One new connection: when it started and ended, and the pod that answered or the error.
struct Attempt {
    started: Instant,
    ended: Instant,
    result: Result<String, String>,
}

/// Opens a new connection (one kiada GET) from `ns` to `target` every `PACE` until `stop`,
/// counting the successes and reporting each failure as it happens.
fn connection_loop(
    ns: &str,
    label: &'static str,
    target: SocketAddrV4,
    stop: Arc<AtomicBool>,
    succeeded: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
) -> anyhow::Result<JoinHandle<io::Result<Vec<Attempt>>>> {
    netns::spawn(ns, move || {
        let mut attempts = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let result = kiada::get(target, IO_TIMEOUT).map(|r| r.pod).map_err(|e| format!("{e:#}"));
            match &result {
                Ok(_) => drop(succeeded.fetch_add(1, Ordering::Relaxed)),
                Err(e) => {
                    failures.lock().unwrap_or_else(PoisonError::into_inner).push(format!("{label}: {e}"))
                }
            }
            attempts.push(Attempt { started, ended: Instant::now(), result });
            thread::sleep(PACE);
        }
        attempts
    })
}

/// Polls `done` until it holds; fails after `DEADLINE` with `what`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        // The polling interval; the condition is what is waited for.
        thread::sleep(Duration::from_millis(10));
    }
}

/// Polls until `ns` has no XDP program on `eth0` (the kernel frees an unpinned link with
/// deferred work).
fn wait_xdp_detached(ns: &str) {
    wait_until(&format!("XDP detached from eth0 in {ns}"), || {
        !netns::run(ns, "ip", &["-d", "link", "show", "eth0"]).expect("ip link").contains("prog/xdp")
    });
}

// ---------------------------------------------------------------------------------------
// Traffic while agents come and go

/// What every long-lived stream and connection loop has done so far, and every failure as
/// it happens (a wait fails at once on one).
#[derive(Default)]
struct Progress {
    streams: Vec<Arc<AtomicU64>>,
    connections: Vec<Arc<AtomicU64>>,
    failures: Arc<Mutex<Vec<String>>>,
}

type Snapshot = (Vec<u64>, Vec<u64>);

impl Progress {
    fn snapshot(&self) -> Snapshot {
        (
            self.streams.iter().map(|p| p.load(Ordering::Relaxed)).collect(),
            self.connections.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        )
    }

    fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Waits until every stream made `STREAM_PROGRESS` more exchanges and every connection
    /// loop `CONNECTION_PROGRESS` more successful connections than at `since`; fails at once
    /// when a stream broke or a connection failed.
    fn wait_beyond(&self, since: &Snapshot, phase: &str) {
        wait_until(&format!("{phase}: traffic progressing"), || {
            let failures = self.failures();
            assert!(failures.is_empty(), "{phase}: {failures:#?}");
            let (streams, connections) = self.snapshot();
            streams.iter().zip(&since.0).all(|(now, then)| *now >= then + STREAM_PROGRESS)
                && connections.iter().zip(&since.1).all(|(now, then)| *now >= then + CONNECTION_PROGRESS)
        });
    }
}

/// Long-lived streams and new-connection loops through node-a's NodePort from the client and
/// through the ClusterIP from the curl pod.
struct Traffic {
    stop: Arc<AtomicBool>,
    progress: Progress,
    streams: Vec<(String, JoinHandle<Result<StreamEnd, String>>)>,
    loops: Vec<(&'static str, JoinHandle<io::Result<Vec<Attempt>>>)>,
}

/// What the traffic did, once stopped.
struct Totals {
    streams: usize,
    messages: u64,
    bytes: u64,
    broken: Vec<String>,
    attempts: Vec<(&'static str, Attempt)>,
}

impl Traffic {
    /// Opens `STREAMS_PER_BACKEND` streams to each of `backends` per path, then starts
    /// exchanging on them and the connection loops, and waits until all of it flows.
    fn start(tb: &Testbed, backends: &[&str], snat_from: Option<Ipv4Addr>) -> Self {
        let node_a = tb.nodes[0].ip;
        let curl = tb.pods.iter().find(|p| p.name == "curl").expect("curl pod");
        let mut opened = open_streams(
            &tb.client,
            "client → NodePort",
            SocketAddrV4::new(node_a, ECHO_NODE_PORT),
            backends,
        )
        .expect("streams from the client");
        opened.extend(
            open_streams(
                &curl.ns,
                "curl pod → ClusterIP",
                SocketAddrV4::new(CLUSTER_IP, ECHO_PORT),
                backends,
            )
            .expect("streams from the curl pod"),
        );
        for o in &opened {
            let remote = tb.pods.iter().any(|p| p.name == o.backend && p.node != 0);
            let expected = match (o.path.starts_with("client"), remote) {
                (true, true) => snat_from.expect("SNAT address"),
                (true, false) => tb.client_ip,
                (false, _) => curl.ip,
            };
            assert_eq!(o.seen_from.ip(), expected, "{}: {} saw the wrong client address", o.path, o.backend);
            if expected == node_a {
                assert!(o.seen_from.port() >= lb_common::config::SNAT_PORT_MIN, "SNAT port {}", o.seen_from);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut progress = Progress::default();
        let mut streams = Vec::new();
        for (id, o) in opened.into_iter().enumerate() {
            let counter = Arc::new(AtomicU64::new(0));
            progress.streams.push(counter.clone());
            let label = format!("stream {id} ({}, {} sees {})", o.path, o.backend, o.seen_from);
            let (stop, failures, name) = (stop.clone(), progress.failures.clone(), label.clone());
            let handle = thread::spawn(move || {
                let end = drive(o.stream, id as u32, stop, counter);
                if let Err(e) = &end {
                    failures.lock().unwrap_or_else(PoisonError::into_inner).push(format!("{name}: {e}"));
                }
                end
            });
            streams.push((label, handle));
        }
        let mut loops = Vec::new();
        for (label, ns, target) in [
            ("client → NodePort", tb.client.clone(), SocketAddrV4::new(node_a, HTTP_NODE_PORT)),
            ("curl pod → ClusterIP", curl.ns.clone(), SocketAddrV4::new(CLUSTER_IP, HTTP_PORT)),
        ] {
            let succeeded = Arc::new(AtomicU64::new(0));
            progress.connections.push(succeeded.clone());
            let handle =
                connection_loop(&ns, label, target, stop.clone(), succeeded, progress.failures.clone())
                    .expect("connection loop");
            loops.push((label, handle));
        }
        let traffic = Self { stop, progress, streams, loops };
        traffic.progress.wait_beyond(&traffic.progress.snapshot(), "warm-up");
        traffic
    }

    /// Stops the traffic (each stream closes cleanly) and collects what it did.
    fn finish(self) -> Totals {
        self.stop.store(true, Ordering::Relaxed);
        let mut totals = Totals {
            streams: self.streams.len(),
            messages: 0,
            bytes: 0,
            broken: Vec::new(),
            attempts: Vec::new(),
        };
        for (label, handle) in self.streams {
            match handle.join().expect("stream thread") {
                Ok(end) if end.messages > 0 => {
                    totals.messages += end.messages;
                    totals.bytes += end.bytes;
                }
                Ok(_) => totals.broken.push(format!("{label}: exchanged nothing")),
                Err(e) => totals.broken.push(format!("{label}: {e}")),
            }
        }
        for (label, handle) in self.loops {
            let attempts = handle.join().expect("connection thread").expect("entering the namespace");
            totals.attempts.extend(attempts.into_iter().map(|a| (label, a)));
        }
        totals
    }
}

impl Totals {
    fn failed(&self) -> Vec<String> {
        self.attempts
            .iter()
            .filter_map(|(label, a)| a.result.as_ref().err().map(|e| format!("{label}: {e}")))
            .collect()
    }

    /// Checks that no stream broke, that the servers received every byte the clients got back
    /// (`received` by the echo servers) and that no new connection failed; prints the counts.
    fn check(&self, received: u64) {
        let failed = self.failed();
        println!(
            "streams: {}, messages echoed: {}, bytes: {} sent and echoed back to the clients, {received} received by the servers",
            self.streams, self.messages, self.bytes
        );
        println!(
            "new connections: {} attempted, {} succeeded, {} failed",
            self.attempts.len(),
            self.attempts.len() - failed.len(),
            failed.len()
        );
        assert!(
            self.broken.is_empty(),
            "{} of {} long-lived streams broke: {:#?}",
            self.broken.len(),
            self.streams,
            self.broken
        );
        assert_eq!(received, self.bytes, "bytes the servers received vs bytes the clients got back");
        assert!(
            failed.is_empty(),
            "{} of {} new connections failed: {failed:#?}",
            failed.len(),
            self.attempts.len()
        );
    }
}

/// Starts the testbed of `spec` with echo servers in the `web-*` pods and an agent on every
/// node, each having programmed the Service. Returns the echo servers' byte counters.
fn up(spec: &Spec) -> (Testbed, Vec<Arc<AtomicU64>>) {
    let mut tb = Testbed::up(spec).expect("testbed");
    let servers = tb
        .pods
        .iter()
        .filter(|p| p.name.starts_with("web-"))
        .map(|pod| start_echo(&pod.ns, &pod.name).expect("echo server"))
        .collect();
    tb.write_manifest("restarts.yaml", &manifest(&tb)).expect("manifest");
    for i in 0..tb.nodes.len() {
        tb.start_agent(i).expect("agent");
    }
    for i in 0..tb.nodes.len() {
        let keys = frontends(&tb, i);
        tb.wait_programmed(i, &keys, DEADLINE).expect("programmed");
    }
    (tb, servers)
}

fn received(servers: &[Arc<AtomicU64>]) -> u64 {
    servers.iter().map(|s| s.load(Ordering::Relaxed)).sum()
}

/// Stops node `i`'s agent with `signal` and checks how it ended: SIGTERM is handled with a
/// clean exit.
fn stop_agent(tb: &mut Testbed, i: usize, signal: libc::c_int) {
    let pid = tb.agent_pid(i).expect("a running agent");
    let status = tb.signal_agent(i, signal).expect("signalling the agent").expect("an agent");
    // Waited for and reaped: the process is gone.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "agent {pid} still exists");
    let node = &tb.nodes[i].name;
    match signal {
        libc::SIGTERM => assert!(status.success(), "{node}: SIGTERM ended the agent with {status}"),
        _ => assert_eq!(status.signal(), Some(signal), "{node}: {status}"),
    }
}

/// `count` new connections on each path, which must all fail (`answer` false) or all succeed.
fn expect_connections(tb: &Testbed, count: usize, answer: bool, phase: &str) {
    let curl = tb.pods.iter().find(|p| p.name == "curl").expect("curl pod");
    for (label, ns, target) in [
        ("client → NodePort", tb.client.clone(), SocketAddrV4::new(tb.nodes[0].ip, HTTP_NODE_PORT)),
        ("curl pod → ClusterIP", curl.ns.clone(), SocketAddrV4::new(CLUSTER_IP, HTTP_PORT)),
    ] {
        let timeout = if answer { IO_TIMEOUT } else { Duration::from_millis(500) };
        let answered =
            netns::within(&ns, move || (0..count).filter(|_| kiada::get(target, timeout).is_ok()).count())
                .expect("namespace");
        println!("{phase}, {label}: {answered} of {count} new connections answered");
        assert_eq!(answered, if answer { count } else { 0 }, "{phase}: {label} to {target}");
    }
}

// ---------------------------------------------------------------------------------------
// 1. Restarts

/// Both agents are stopped (SIGTERM or SIGKILL, mixed), traffic flows while none runs, they
/// start again and traffic flows through the programs they swapped in: five times. No
/// stream breaks, no new connection fails; after `--cleanup` the same connections fail.
#[test]
fn restarts_and_kills_of_the_agents_drop_no_connection() {
    let spec = Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 1), ("curl".into(), 0)],
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
    };
    let (mut tb, servers) = up(&spec);
    let node_a = tb.nodes[0].ip;
    let traffic = Traffic::start(&tb, &["web-0", "web-1"], Some(node_a));

    let mut gaps: Vec<(Instant, Instant)> = Vec::new();
    let mut stops = BTreeMap::<&str, usize>::new();
    for (round, signal) in ROUNDS.into_iter().enumerate() {
        let signals = [signal, if signal == libc::SIGTERM { libc::SIGKILL } else { libc::SIGTERM }];
        for (i, signal) in signals.into_iter().enumerate() {
            stop_agent(&mut tb, i, signal);
            *stops.entry(signal_name(signal)).or_default() += 1;
        }
        // No agent runs from here until the restarts: hold the gap until traffic has flowed.
        let gap_start = Instant::now();
        traffic
            .progress
            .wait_beyond(&traffic.progress.snapshot(), &format!("round {round}: no agent running"));
        let gap_end = Instant::now();
        gaps.push((gap_start, gap_end));
        for i in 0..tb.nodes.len() {
            tb.start_agent(i).expect("restarting the agent");
        }
        for i in 0..tb.nodes.len() {
            tb.wait_for_log(i, "synced full=true", DEADLINE).expect("the restarted agent synced");
            // It reused every pinned map: nothing was recreated, nothing deferred.
            let log = std::fs::read_to_string(tb.agent_log(i)).expect("agent log");
            assert!(
                !log.contains("recreated"),
                "{}: a plain restart recreated maps:\n{log}",
                tb.nodes[i].name
            );
        }
        traffic.progress.wait_beyond(&traffic.progress.snapshot(), &format!("round {round}: agents back"));
        println!(
            "round {round}: node-a {}, node-b {}; no agent for {:?}",
            signal_name(signals[0]),
            signal_name(signals[1]),
            gap_end - gap_start
        );
    }

    let totals = traffic.finish();
    let during_gaps: Vec<usize> = gaps
        .iter()
        .map(|(start, end)| {
            let inside = |a: &Attempt| *start <= a.started && a.ended <= *end && a.result.is_ok();
            totals.attempts.iter().filter(|(_, a)| inside(a)).count()
        })
        .collect();
    println!(
        "restarts: {} rounds, {} agent stops and starts ({stops:?}); new connections that succeeded while no agent ran: {} ({during_gaps:?} per round)",
        ROUNDS.len(),
        stops.values().sum::<usize>(),
        during_gaps.iter().sum::<usize>()
    );
    totals.check(received(&servers));
    assert!(during_gaps.iter().all(|n| *n > 0), "a gap without new connections: {during_gaps:?}");

    // Without the programs the same connections fail: they were what carried them.
    for i in 0..tb.nodes.len() {
        tb.cleanup_agent(i).expect("xlb agent --cleanup");
        assert!(!tb.nodes[i].bpffs_dir.exists(), "--cleanup leaves {}", tb.nodes[i].bpffs_dir.display());
    }
    for node in &tb.nodes {
        wait_xdp_detached(&node.ns);
    }
    // The TC links go with deferred work too: the first failure on each path marks them gone.
    let curl = tb.pods.iter().find(|p| p.name == "curl").expect("curl pod").clone();
    for (ns, target) in [
        (tb.client.clone(), SocketAddrV4::new(node_a, HTTP_NODE_PORT)),
        (curl.ns.clone(), SocketAddrV4::new(CLUSTER_IP, HTTP_PORT)),
    ] {
        let gone = netns::spawn(&ns, move || {
            let deadline = Instant::now() + DEADLINE;
            while kiada::get(target, Duration::from_millis(500)).is_ok() {
                if Instant::now() > deadline {
                    return false;
                }
                thread::sleep(Duration::from_millis(10));
            }
            true
        })
        .expect("namespace");
        assert!(gone.join().expect("thread").expect("namespace"), "{target} still answers after --cleanup");
    }
    expect_connections(&tb, 10, false, "after --cleanup");
}

// ---------------------------------------------------------------------------------------
// 2. Map layouts

/// BPF_MAP_CREATE of a map with the given type and sizes, pinned at `path` in place of the
/// agent's: what an agent of another layout would have left there.
fn pin_foreign_map(path: &Path, map_type: u32, key_size: u32, value_size: u32) -> MapData {
    /// The head of `union bpf_attr` for BPF_MAP_CREATE; the kernel zero-fills the rest.
    #[repr(C)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = CreateAttr { map_type, key_size, value_size, max_entries: 64, map_flags: 0 };
    // SAFETY: BPF_MAP_CREATE (0) reads `size_of::<CreateAttr>()` bytes of `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0 as libc::c_long,
            &attr as *const CreateAttr,
            std::mem::size_of::<CreateAttr>(),
        )
    };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
    // SAFETY: a new file descriptor the kernel just gave us.
    let map = MapData::from_fd(unsafe { OwnedFd::from_raw_fd(fd as i32) }).expect("map from fd");
    std::fs::remove_file(path).expect("removing the agent's pin");
    map.pin(path).expect("pinning the foreign map");
    map
}

/// The value size of the map pinned at `path`.
fn pinned_value_size(path: &Path) -> u32 {
    MapInfo::from_pin(path).expect("pinned map").value_size()
}

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

/// A pinned map of another layout is never used as it is. `XLB_SERVICES` with a wrong value
/// size (a map the agent fills): recreated, and the running programs keep serving with their
/// maps until the new agent has filled the new one, even while it cannot reach its API at
/// all; then swapped in without a failed connection. `XLB_CONNTRACK` with a wrong value size:
/// recreated, with the count of tracked entries reset in the log, and the agent works. Pins
/// of layout version 1: `XLB_SERVICE_NAMES` is created (with `XLB_CONFIG`, as always), every
/// other map reused, and no stream breaks.
#[test]
fn pinned_maps_of_another_layout_are_recreated_and_swapped_in_without_a_gap() {
    let spec = Spec {
        nodes: 1,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 0), ("curl".into(), 0)],
        tcp_ports: vec![8080],
        udp_ports: vec![8080],
    };
    let (mut tb, servers) = up(&spec);
    let dir = tb.nodes[0].bpffs_dir.clone();
    let traffic = Traffic::start(&tb, &["web-0", "web-1"], None);

    // XLB_SERVICES as an agent with a 24-byte ServiceValue would have pinned it.
    stop_agent(&mut tb, 0, libc::SIGTERM);
    let services = dir.join(maps::SERVICES);
    drop(pin_foreign_map(&services, BPF_MAP_TYPE_HASH, 8, 24));
    // An agent whose API server is unreachable: it never gets to its first sync.
    let kubeconfig = tb.manifests.join("kubeconfig");
    std::fs::write(&kubeconfig, ApiServer::kubeconfig(([127, 0, 0, 1], 6443).into())).expect("kubeconfig");
    tb.start_agent_with(0, &["--kubeconfig".as_ref(), kubeconfig.as_os_str()]).expect("agent");
    let line = tb
        .wait_for_log(0, "map XLB_SERVICES: pinned layout not reused (value size 24 B, not 20 B)", DEADLINE)
        .expect("the layout log line");
    println!("{line}");
    tb.wait_for_log(0, "keep serving with the pinned maps", DEADLINE).expect("swap deferred");
    traffic.progress.wait_beyond(&traffic.progress.snapshot(), "new agent without its API");
    assert_eq!(pinned_value_size(&services), 24, "the pin was replaced before the new map was filled");
    stop_agent(&mut tb, 0, libc::SIGTERM);
    // An agent that reaches its source: it fills the new map, then swaps.
    tb.start_agent(0).expect("agent");
    tb.wait_for_log(0, "map XLB_SERVICES: pinned layout not reused", DEADLINE).expect("the layout log line");
    tb.wait_for_log(0, "replaced the running ones", DEADLINE).expect("swapped in");
    traffic.progress.wait_beyond(&traffic.progress.snapshot(), "after the swap");
    assert_eq!(pinned_value_size(&services), std::mem::size_of::<ServiceValue>() as u32);
    assert!(!maps::ALL.iter().any(|m| dir.join(format!("{m}-new")).exists()), "staging pins left");
    let keys = frontends(&tb, 0);
    tb.wait_programmed(0, &keys, DEADLINE).expect("programmed");
    traffic.finish().check(received(&servers));

    // XLB_CONNTRACK as an agent with a 24-byte CtEntry would have pinned it, tracking two
    // connections.
    stop_agent(&mut tb, 0, libc::SIGKILL);
    let conntrack = dir.join(maps::CONNTRACK);
    let foreign = pin_foreign_map(&conntrack, BPF_MAP_TYPE_LRU_HASH, 16, 24);
    let mut foreign: aya::maps::HashMap<MapData, [u8; 16], [u8; 24]> =
        aya::maps::HashMap::try_from(Map::LruHashMap(foreign)).expect("LRU hash");
    for n in 1..=2u8 {
        foreign.insert([n; 16], [n; 24], 0).expect("entry");
    }
    drop(foreign);
    tb.start_agent(0).expect("agent");
    let line = tb
        .wait_for_log(0, "map XLB_CONNTRACK: pinned layout not reused (value size 24 B, not 32 B)", DEADLINE)
        .expect("the layout log line");
    println!("{line}");
    assert!(line.contains("2 tracked entries are reset"), "{line}");
    tb.wait_for_log(0, "replaced the running ones", DEADLINE).expect("swapped in");
    assert_eq!(pinned_value_size(&conntrack), std::mem::size_of::<CtEntry>() as u32);
    expect_connections(&tb, 20, true, "after recreating the conntrack table");

    // The pins of an agent of layout version 1, from before XLB_SERVICE_NAMES: that map is
    // created and filled, the maps changed since (affinity and config in version 3) are
    // recreated, every other map is reused as it is (the streams keep flowing through their
    // conntrack entries), and the counter slots are named once it is swapped in.
    let received_before = received(&servers);
    let traffic = Traffic::start(&tb, &["web-0", "web-1"], None);
    stop_agent(&mut tb, 0, libc::SIGTERM);
    std::fs::remove_file(dir.join(maps::SERVICE_NAMES)).expect("removing the XLB_SERVICE_NAMES pin");
    let config = MapData::from_pin(dir.join(maps::CONFIG)).expect("XLB_CONFIG");
    let mut config: Array<MapData, NodeConfig> = Map::Array(config).try_into().expect("an array");
    let node_config = config.get(&0, 0).expect("XLB_CONFIG[0]");
    config.set(0, NodeConfig { layout_version: 1, ..node_config }, 0).expect("layout version 1");
    drop(config);
    tb.start_agent(0).expect("agent");
    let line = tb
        .wait_for_log(0, "map XLB_SERVICE_NAMES: not pinned while others are", DEADLINE)
        .expect("the new map's log line");
    println!("{line}");
    tb.wait_for_log(0, "replaced the running ones", DEADLINE).expect("swapped in");
    let log = std::fs::read_to_string(tb.agent_log(0)).expect("agent log");
    // Exactly the maps whose layout changed after version 1 are recreated (the names map is
    // new); the connection tables the streams use are not.
    for name in maps::ALL.into_iter().filter(|name| *name != maps::SERVICE_NAMES) {
        let recreated = log.contains(&format!("map {name}: pinned layout not reused"));
        assert_eq!(recreated, maps::layout_changed(name) > 1, "{name} recreated: {recreated}\n{log}");
    }
    traffic.progress.wait_beyond(&traffic.progress.snapshot(), "after the upgrade from layout 1");
    traffic.finish().check(received(&servers) - received_before);
    let names = MapData::from_pin(dir.join(maps::SERVICE_NAMES)).expect("XLB_SERVICE_NAMES pinned");
    let names: aya::maps::HashMap<MapData, u32, ServicePortName> =
        Map::HashMap(names).try_into().expect("a hash map");
    let mut ports: Vec<String> =
        names.iter().map(|entry| entry.expect("entry").1.as_str().expect("UTF-8").to_string()).collect();
    ports.sort_unstable();
    assert_eq!(ports, ["default/steady:echo/TCP", "default/steady:http/TCP"]);
}
