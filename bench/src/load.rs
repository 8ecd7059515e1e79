//! The benchmark's traffic: the backends' server, short connections (rate and latency), one
//! long stream (throughput) and probes that wait for a Service to answer.
//!
//! Every short connection binds its own source port and ends with a reset (SO_LINGER 0), so
//! no TIME_WAIT socket is left on either side, and no 4-tuple repeats within a measurement:
//! each new connection is new to every conntrack table. Clients run on threads that entered
//! the client's network namespace (`xlb_tests::netns::spawn`).
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use socket2::{Domain, Socket, Type};
use xlb_tests::netns;

/// First byte of a connection: a request answered with the backend's name.
const REQUEST: u8 = b'R';
/// First byte of a connection: a stream the backend reads to the end.
const STREAM: u8 = b'S';
/// How long a short connection may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Source ports the short connections bind, split between the concurrent loops.
const SOURCE_PORTS: std::ops::Range<u16> = 1024..65_535;
/// Between probes that failed: the agent or iptables-restore needs the CPU more than we do.
const PROBE_PAUSE: Duration = Duration::from_micros(250);
/// How long one probe waits for its answer. A SYN sent before the rules exist is dropped
/// and TCP would resend it only after 1 s, so the next probe starts after this: it bounds
/// the resolution of a programming time (200 ms made every small one read as ~200 ms).
const PROBE_TIMEOUT: Duration = Duration::from_millis(20);

/// Serves the benchmark protocol on `port` in `ns` with `workers` threads, answering every
/// request with `name`. The threads live as long as the process.
pub fn serve(ns: &str, name: &str, port: u16, workers: usize) -> anyhow::Result<()> {
    let listener = netns::within(ns, move || TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
        .with_context(|| format!("listening on port {port} in {ns}"))?;
    let reply = format!("{name}\n");
    for _ in 0..workers {
        let listener = listener.try_clone()?;
        let reply = reply.clone();
        thread::spawn(move || loop {
            if let Ok((stream, _)) = listener.accept() {
                // A client that resets mid-answer is the normal end of a connection here.
                let _ = answer(stream, reply.as_bytes());
            }
        });
    }
    Ok(())
}

fn answer(mut stream: TcpStream, reply: &[u8]) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    if stream.read(&mut buf)? == 0 {
        return Ok(());
    }
    if buf[0] != STREAM {
        stream.write_all(reply)?;
    }
    // Until the client closes or resets: the client closes first, so the backend never
    // holds a TIME_WAIT socket.
    while stream.read(&mut buf)? > 0 {}
    Ok(())
}

/// What one connection-rate measurement saw.
#[derive(Clone, Debug)]
pub struct ConnStats {
    pub completed: usize,
    pub failed: usize,
    /// Completed connections per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Short connections from `ns` for `duration`: `concurrency` closed loops, each connecting
/// to a target drawn from `targets` (one Service, or the floor's endpoints), sending one
/// request, reading the answer and resetting the connection.
pub fn connection_rate(
    ns: &str,
    targets: &[SocketAddrV4],
    duration: Duration,
    concurrency: usize,
    seed: u64,
) -> anyhow::Result<ConnStats> {
    if targets.is_empty() || concurrency == 0 {
        bail!("a connection-rate measurement needs targets and at least one loop");
    }
    let span = (SOURCE_PORTS.end - SOURCE_PORTS.start) / concurrency as u16;
    let start = Instant::now() + Duration::from_millis(20);
    let loops = (0..concurrency)
        .map(|i| {
            let targets = targets.to_vec();
            let first_port = SOURCE_PORTS.start + i as u16 * span;
            let mut rng = Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            netns::spawn(ns, move || {
                // Every loop starts together, after all threads exist.
                thread::sleep(start.saturating_duration_since(Instant::now()));
                closed_loop(&targets, first_port..first_port + span, start + duration, &mut rng)
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut latencies = Vec::new();
    let mut failed = 0;
    for handle in loops {
        let (lat, fail) = handle.join().map_err(|_| anyhow::anyhow!("a client loop panicked"))???;
        latencies.extend(lat);
        failed += fail;
    }
    let elapsed = Instant::now().saturating_duration_since(start).max(duration);
    latencies.sort_unstable();
    Ok(ConnStats {
        completed: latencies.len(),
        failed,
        rate: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
    })
}

/// Latencies in ns of the completed connections, and the count of failed ones.
fn closed_loop(
    targets: &[SocketAddrV4],
    ports: std::ops::Range<u16>,
    deadline: Instant,
    rng: &mut Rng,
) -> io::Result<(Vec<u64>, usize)> {
    let mut latencies = Vec::with_capacity(65_536);
    let mut failed = 0;
    let mut port = ports.start;
    while Instant::now() < deadline {
        let target = targets[rng.below(targets.len())];
        let began = Instant::now();
        match request(Some(port), target, CONNECT_TIMEOUT) {
            Ok(_) => latencies.push(began.elapsed().as_nanos() as u64),
            Err(_) => failed += 1,
        }
        port = if port + 1 >= ports.end { ports.start } else { port + 1 };
    }
    Ok((latencies, failed))
}

/// One request on a new connection from `source_port` (any when `None`) to `target`: the
/// answering backend's name. The connection ends with a reset.
pub fn request(source_port: Option<u16>, target: SocketAddrV4, timeout: Duration) -> io::Result<String> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(port) = source_port {
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    }
    socket.connect_timeout(&SocketAddr::V4(target).into(), timeout)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(&[REQUEST])?;
    let mut answer = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !answer.ends_with(b"\n") {
        match stream.read(&mut buf)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering")),
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
    Socket::from(stream).set_linger(Some(Duration::ZERO))?;
    answer.pop();
    String::from_utf8(answer).map_err(io::Error::other)
}

/// Throughput of one TCP stream from `ns` to `target` for `duration`, in Gbit/s.
pub fn stream_throughput(ns: &str, target: SocketAddrV4, duration: Duration) -> anyhow::Result<f64> {
    netns::within(ns, move || -> io::Result<f64> {
        let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), CONNECT_TIMEOUT)?;
        let chunk = vec![STREAM; 128 * 1024];
        let began = Instant::now();
        let mut sent = 0u64;
        while began.elapsed() < duration {
            stream.write_all(&chunk)?;
            sent += chunk.len() as u64;
        }
        let seconds = began.elapsed().as_secs_f64();
        Socket::from(stream).set_linger(Some(Duration::ZERO))?;
        Ok(sent as f64 * 8.0 / seconds / 1e9)
    })?
    .with_context(|| format!("streaming to {target}"))
}

/// Starts probing `target` from `ns` until an answer satisfies `accept` or `deadline`
/// passes; the handle yields when the first accepted answer arrived. Started before the
/// change it waits for, so the change can be timed from its very first step.
pub fn probe_until(
    ns: &str,
    target: SocketAddrV4,
    accept: impl Fn(&str) -> bool + Send + 'static,
    deadline: Instant,
) -> anyhow::Result<thread::JoinHandle<io::Result<anyhow::Result<Instant>>>> {
    netns::spawn(ns, move || loop {
        match request(None, target, PROBE_TIMEOUT) {
            Ok(name) if accept(&name) => return Ok(Instant::now()),
            _ if Instant::now() > deadline => bail!("{target} did not answer as expected in time"),
            Ok(_) => {}
            Err(_) => thread::sleep(PROBE_PAUSE),
        }
    })
}

/// The `q` quantile of sorted ns latencies, in µs (nearest rank).
fn percentile(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
    sorted_ns[rank - 1] as f64 / 1e3
}

/// xorshift64*: target choice needs speed and reproducibility, not quality.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as usize % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&ns, 0.50), 50.0);
        assert_eq!(percentile(&ns, 0.99), 99.0);
        assert_eq!(percentile(&[7000], 0.99), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn rng_covers_every_choice() {
        let mut rng = Rng::new(42);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[rng.below(3)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }
}
