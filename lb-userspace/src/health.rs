//! kube-proxy's two health surfaces, answered the way kube-proxy v1.33 answers them, so load
//! balancers, probes and scripts written against kube-proxy keep working unchanged:
//! - the proxy health server, `/healthz` and `/livez` (pkg/proxy/healthcheck/proxy_health.go);
//! - one healthCheckNodePort server per Service with externalTrafficPolicy Local, which tells
//!   an external load balancer whether this node has local endpoints
//!   (pkg/proxy/healthcheck/service_health.go).
//!
//! xlb balances IPv4 only, so the per-family parts of kube-proxy's answers carry `IPv4` alone.
use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex, MutexGuard, PoisonError,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::any,
    Router,
};
use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::oneshot,
};

use crate::model::NamespacedName;

/// Proxy health as kube-proxy's ProxyHealthServer computes it: unhealthy once a change has
/// waited for a sync longer than twice the sync period. A sync that ran but could not write
/// every entry (a full map) does not count for `/healthz`, whose node then stops getting
/// traffic from load balancers, but does for `/livez`: the agent is working, and restarting
/// it would not make the entries fit.
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<HealthState>,
}

struct HealthState {
    last_updated: SystemTime,
    /// When the oldest change still waiting for a sync arrived (monotonic, like Go's `Sub`).
    oldest_pending: Option<Instant>,
    /// The same, cleared by a sync that left entries out too: what `/livez` goes by.
    oldest_unattempted: Option<Instant>,
    node_eligible: bool,
}

/// One consistent look at the health state, taken once per answer.
struct HealthReading {
    now: SystemTime,
    last_updated: SystemTime,
    healthy: bool,
    /// The sync loop keeps up, whether or not its syncs wrote every entry.
    live: bool,
    node_eligible: bool,
}

impl ProxyHealth {
    /// Counts as updated now: kube-proxy's sync loop marks itself updated when it starts, so a
    /// first sync that never finishes still turns the proxy unhealthy after the timeout.
    pub fn new(sync_period: Duration) -> Self {
        Self {
            timeout: 2 * sync_period,
            state: Mutex::new(HealthState {
                last_updated: SystemTime::now(),
                oldest_pending: None,
                oldest_unattempted: None,
                // Eligible from the start, as in kube-proxy: a node being deleted is only known
                // once its Node object has been read.
                node_eligible: true,
            }),
        }
    }

    /// A change is waiting for a sync (or the API is unreachable). Only the oldest pending
    /// change counts, so later ones do not push the deadline back.
    pub fn queued_update(&self) {
        let mut state = self.lock();
        let now = Instant::now();
        state.oldest_pending.get_or_insert(now);
        state.oldest_unattempted.get_or_insert(now);
    }

    /// A sync with current sources finished.
    pub fn updated(&self) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.oldest_unattempted = None;
        state.last_updated = SystemTime::now();
    }

    /// A sync with current sources ran to its end but could not write some entries (e.g. a
    /// full map): `/healthz` keeps waiting for a complete sync, as kube-proxy's does while
    /// its syncs fail, and turns 503 after the timeout; `/livez` stays 200.
    pub fn updated_with_failures(&self) {
        self.lock().oldest_unattempted = None;
    }

    /// False while our Node has a deletionTimestamp (or the cluster autoscaler's
    /// ToBeDeletedByClusterAutoscaler taint): `/healthz` then answers 503 so load balancers drain
    /// the node, while `/livez` stays 200 so the agent is not restarted.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// The proxy's own health, node eligibility aside (what healthCheckNodePort answers use).
    pub fn is_healthy(&self) -> bool {
        self.read().healthy
    }

    fn read(&self) -> HealthReading {
        let state = self.lock();
        let within_timeout = |queued: Option<Instant>| queued.is_none_or(|q| q.elapsed() < self.timeout);
        HealthReading {
            now: SystemTime::now(),
            last_updated: state.last_updated,
            healthy: within_timeout(state.oldest_pending),
            live: within_timeout(state.oldest_unattempted),
            node_eligible: state.node_eligible,
        }
    }

    /// Every critical section is a plain assignment, so a panic elsewhere cannot leave the
    /// state half-written: a poisoned lock is still good to use.
    fn lock(&self) -> MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Serves `/healthz` and `/livez`; other paths get the 404 of Go's `http.ServeMux`, as from
/// kube-proxy. Does not return in practice: axum logs and retries failed accepts.
pub async fn serve_proxy_health(listener: TcpListener, health: Arc<ProxyHealth>) -> io::Result<()> {
    let router = Router::new()
        .route("/healthz", any(healthz))
        .route("/livez", any(livez))
        .fallback(not_found)
        .with_state(health);
    axum::serve(listener, router).await
}

async fn healthz(State(health): State<Arc<ProxyHealth>>) -> Response {
    proxy_health_answer(&health, true)
}

async fn livez(State(health): State<Arc<ProxyHealth>>) -> Response {
    proxy_health_answer(&health, false)
}

/// kube-proxy's `ProxyHealth`, marshalled with Go's `encoding/json` (compact, fields in this
/// order, `nodeEligible` only on `/healthz`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyHealthBody {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    status: FamilyStatus,
}

/// kube-proxy's per-family map, with the one family xlb serves.
#[derive(Serialize)]
struct FamilyStatus {
    #[serde(rename = "IPv4")]
    ipv4: ProxierHealthBody,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxierHealthBody {
    last_updated: String,
    healthy: bool,
}

/// `/healthz` (`with_node`) also fails while the node is not eligible; `/livez` does not,
/// nor while syncs leave entries out (see `ProxyHealth`).
fn proxy_health_answer(health: &ProxyHealth, with_node: bool) -> Response {
    let mut reading = health.read();
    if !with_node {
        reading.healthy = reading.live;
    }
    let ok = reading.healthy && (reading.node_eligible || !with_node);
    let body = ProxyHealthBody {
        // kube-proxy reports "now" while healthy: older releases' lastUpdated was the last sync
        // loop run, recent whenever the proxy was healthy.
        last_updated: go_json_time(if ok { reading.now } else { reading.last_updated }),
        current_time: go_json_time(reading.now),
        node_eligible: with_node.then_some(reading.node_eligible),
        healthy: reading.healthy,
        status: FamilyStatus {
            ipv4: ProxierHealthBody {
                last_updated: go_json_time(reading.last_updated),
                healthy: reading.healthy,
            },
        },
    };
    let body = serde_json::to_string(&body).expect("a struct of strings and bools serializes");
    json_answer(ok, body)
}

/// `t` as Go's `time.Time` marshals to JSON in UTC: RFC 3339 with nanoseconds, trailing zeros
/// of the fraction trimmed (kube-proxy's image runs in UTC).
fn go_json_time(t: SystemTime) -> String {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let of_day = seconds % 86_400;
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    );
    let nanos = since_epoch.subsec_nanos();
    if nanos != 0 {
        out.push('.');
        out.push_str(format!("{nanos:09}").trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March = 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    (era * 400 + year_of_era + u64::from(month <= 2), month, day)
}

/// The status and headers every kube-proxy health answer carries.
fn json_answer(ok: bool, body: String) -> Response {
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CONTENT_TYPE, "application/json"), (header::X_CONTENT_TYPE_OPTIONS, "nosniff")], body)
        .into_response()
}

/// Go's `http.NotFound`.
async fn not_found() -> Response {
    // A text body brings `Content-Type: text/plain; charset=utf-8`, as in Go.
    (StatusCode::NOT_FOUND, [(header::X_CONTENT_TYPE_OPTIONS, "nosniff")], "404 page not found\n")
        .into_response()
}

/// Tells the load balancer how many local endpoints share this node's traffic (GCE's
/// WEIGHTED_MAGLEV reads it).
const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// The healthCheckNodePort servers of one node.
pub struct ServiceHealthServers {
    health: Arc<ProxyHealth>,
    bind: Ipv4Addr,
    runtime: Handle,
    open: BTreeMap<u16, ServiceServer>,
}

/// One open healthCheckNodePort.
struct ServiceServer {
    answer: Arc<ServiceAnswer>,
    /// Dropping it starts the server's graceful shutdown.
    stop: oneshot::Sender<()>,
    /// Disconnects when the listening socket has been closed.
    closed: mpsc::Receiver<()>,
}

/// What one healthCheckNodePort answers from; the count changes in place between syncs.
struct ServiceAnswer {
    service: NamespacedName,
    local_endpoints: AtomicUsize,
    health: Arc<ProxyHealth>,
}

impl ServiceHealthServers {
    /// `bind` is the address to listen on (0.0.0.0 = all node addresses); servers run on
    /// `runtime`.
    pub fn new(health: Arc<ProxyHealth>, bind: Ipv4Addr, runtime: Handle) -> Self {
        Self { health, bind, runtime, open: BTreeMap::new() }
    }

    /// Makes the open servers match `wanted` (healthCheckNodePort → (Service, number of unique
    /// IPs of its local ready endpoints)): closes the ones no longer wanted or now owned by
    /// another Service, opens the missing ones, updates the counts of the others in place.
    /// Returns one message per port that could not be opened; those are retried on the next
    /// call, as kube-proxy does.
    ///
    /// Call it from a plain thread, not from `runtime`: closing waits until the port is free
    /// again, so a Service that takes a port over can bind it at once.
    pub fn sync(&mut self, wanted: &BTreeMap<u16, (NamespacedName, usize)>) -> Vec<String> {
        let stale = self.open.extract_if(.., |port, server| {
            wanted.get(port).is_none_or(|(service, _)| *service != server.answer.service)
        });
        stale.for_each(|(_, server)| server.close());

        let mut failures = Vec::new();
        for (&port, (service, local_endpoints)) in wanted {
            if let Some(server) = self.open.get(&port) {
                server.answer.local_endpoints.store(*local_endpoints, Ordering::Relaxed);
                continue;
            }
            match self.open_server(port, service, *local_endpoints) {
                Ok(server) => {
                    self.open.insert(port, server);
                }
                Err(error) => failures
                    .push(format!("failed to start healthcheck \"{service}\" on port {port}: {error}")),
            }
        }
        failures
    }

    /// Binds synchronously, so a port in use is reported by this sync, then serves on the
    /// runtime.
    fn open_server(
        &self,
        port: u16,
        service: &NamespacedName,
        local_endpoints: usize,
    ) -> io::Result<ServiceServer> {
        let listener = std::net::TcpListener::bind((self.bind, port))?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _runtime = self.runtime.enter();
            TcpListener::from_std(listener)?
        };
        let answer = Arc::new(ServiceAnswer {
            service: service.clone(),
            local_endpoints: AtomicUsize::new(local_endpoints),
            health: self.health.clone(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let (closed_tx, closed) = mpsc::channel();
        let router = Router::new().fallback(service_health).with_state(answer.clone());
        let serve = axum::serve(ClosingListener { listener, _closed: closed_tx }, router)
            .with_graceful_shutdown(async {
                // `close` drops the sender: either outcome means stop.
                let _ = stopped.await;
            });
        // With graceful shutdown, serving returns (always Ok) only once stopped.
        self.runtime.spawn(async { serve.await.ok() });
        Ok(ServiceServer { answer, stop, closed })
    }
}

impl ServiceServer {
    /// Returns once the listening socket is closed. Open connections finish their request and
    /// close on their own (graceful shutdown).
    fn close(self) {
        drop(self.stop);
        // Disconnected when the serving task drops its listener, which it does as soon as it
        // sees the stop (or when the runtime drops the task).
        let _ = self.closed.recv();
    }
}

/// Any path, any method: the same answer, as kube-proxy's handler ignores the request.
async fn service_health(State(answer): State<Arc<ServiceAnswer>>) -> Response {
    let local_endpoints = answer.local_endpoints.load(Ordering::Relaxed);
    let proxy_healthy = answer.health.is_healthy();
    // kube-proxy's body is a dedented, newline-trimmed Go template with %q names, not
    // json.Marshal: tab indents and ": " separators.
    let body = format!(
        "{{\n\
         \t\"service\": {{\n\
         \t\t\"namespace\": {},\n\
         \t\t\"name\": {}\n\
         \t}},\n\
         \t\"localEndpoints\": {},\n\
         \t\"serviceProxyHealthy\": {}\n\
         }}",
        json_string(&answer.service.namespace),
        json_string(&answer.service.name),
        local_endpoints,
        proxy_healthy
    );
    let mut response = json_answer(local_endpoints > 0 && proxy_healthy, body);
    response.headers_mut().insert(ENDPOINT_WEIGHT, HeaderValue::from(local_endpoints));
    response
}

/// A quoted JSON string; for Kubernetes names (DNS labels) the same bytes as Go's %q.
fn json_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// A TCP listener whose closing can be awaited from another thread: axum drops the listener
/// as soon as graceful shutdown begins, and `_closed` is dropped right after the socket
/// (fields drop in declaration order).
struct ClosingListener {
    listener: TcpListener,
    _closed: mpsc::Sender<()>,
}

impl axum::serve::Listener for ClosingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    fn accept(&mut self) -> impl Future<Output = (TcpStream, SocketAddr)> + Send {
        axum::serve::Listener::accept(&mut self.listener)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// A raw HTTP/1.1 client for tests, so status lines and headers are checked as sent.
#[cfg(test)]
pub(crate) mod test_client {
    use std::{
        io::{BufRead, BufReader, Read, Write},
        net::{SocketAddr, TcpStream},
    };

    pub struct Reply {
        pub status_line: String,
        /// Header lines as received, without the CRLF.
        pub headers: Vec<String>,
        pub body: String,
    }

    impl Reply {
        /// The value of header `name` (case-insensitive, as HTTP header names are).
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.iter().find_map(|line| {
                let (key, value) = line.split_once(": ")?;
                key.eq_ignore_ascii_case(name).then_some(value)
            })
        }
    }

    /// One request on a new connection.
    pub fn get(addr: SocketAddr, target: &str) -> Reply {
        let mut connection = BufReader::new(TcpStream::connect(addr).expect("connect"));
        request(&mut connection, target, true)
    }

    /// One request on an open connection, read to the end of its body (Content-Length).
    pub fn request(connection: &mut BufReader<TcpStream>, target: &str, close: bool) -> Reply {
        let connection_header = if close { "close" } else { "keep-alive" };
        write!(
            connection.get_mut(),
            "GET {target} HTTP/1.1\r\nHost: test\r\nConnection: {connection_header}\r\n\r\n"
        )
        .expect("send request");
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            connection.read_line(&mut line).expect("read response head");
            let line = line.strip_suffix("\r\n").expect("CRLF-terminated line").to_owned();
            if line.is_empty() {
                break;
            }
            lines.push(line);
        }
        let status_line = lines.remove(0);
        let mut reply = Reply { status_line, headers: lines, body: String::new() };
        let length: u64 = reply.header("content-length").expect("Content-Length").parse().expect("length");
        connection.take(length).read_to_string(&mut reply.body).expect("read body");
        reply
    }
}

#[cfg(test)]
mod tests {
    use std::{io::BufReader, net::TcpStream};

    use super::{test_client::*, *};

    fn service(namespace: &str, name: &str) -> NamespacedName {
        NamespacedName { namespace: namespace.into(), name: name.into() }
    }

    /// A port the kernel just handed out, free again for the test to use.
    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port()
    }

    fn local(port: u16) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, port).into()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    fn expected_service_body(local_endpoints: usize, proxy_healthy: bool) -> String {
        format!(
            "{{\n\
             \t\"service\": {{\n\
             \t\t\"namespace\": \"shop\",\n\
             \t\t\"name\": \"web\"\n\
             \t}},\n\
             \t\"localEndpoints\": {local_endpoints},\n\
             \t\"serviceProxyHealthy\": {proxy_healthy}\n\
             }}"
        )
    }

    #[test]
    fn service_health_answer_is_kube_proxys_byte_for_byte_on_any_path() {
        let runtime = runtime();
        let mut servers = ServiceHealthServers::new(
            Arc::new(ProxyHealth::new(Duration::from_secs(30))),
            Ipv4Addr::LOCALHOST,
            runtime.handle().clone(),
        );
        let (up, down) = (free_port(), free_port());
        let failures = servers
            .sync(&BTreeMap::from([(up, (service("shop", "web"), 2)), (down, (service("shop", "web"), 0))]));
        assert!(failures.is_empty(), "{failures:?}");

        for target in ["/", "/foo?x=1", "/healthz"] {
            let reply = get(local(up), target);
            assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
            // hyper sends header names in lower case; the values are kube-proxy's.
            assert_eq!(
                reply.headers[..3],
                [
                    "content-type: application/json",
                    "x-content-type-options: nosniff",
                    "x-load-balancing-endpoint-weight: 2"
                ]
            );
            // What kube-proxy writes, spelled out byte by byte.
            let kube_proxy_body = concat!(
                "{\n",
                "\t\"service\": {\n",
                "\t\t\"namespace\": \"shop\",\n",
                "\t\t\"name\": \"web\"\n",
                "\t},\n",
                "\t\"localEndpoints\": 2,\n",
                "\t\"serviceProxyHealthy\": true\n",
                "}"
            );
            assert_eq!(reply.body, kube_proxy_body);
            assert_eq!(reply.header("content-length"), Some(reply.body.len().to_string().as_str()));
        }

        let reply = get(local(down), "/");
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("0"));
        assert_eq!(reply.body, expected_service_body(0, true));
    }

    #[test]
    fn service_health_fails_while_the_proxy_is_unhealthy() {
        let runtime = runtime();
        // A zero sync period makes any queued update overdue at once.
        let health = Arc::new(ProxyHealth::new(Duration::ZERO));
        let mut servers =
            ServiceHealthServers::new(health.clone(), Ipv4Addr::LOCALHOST, runtime.handle().clone());
        let port = free_port();
        assert!(servers.sync(&BTreeMap::from([(port, (service("shop", "web"), 2))])).is_empty());
        health.queued_update();

        let reply = get(local(port), "/");
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("2"));
        assert_eq!(reply.body, expected_service_body(2, false));

        health.updated();
        assert_eq!(get(local(port), "/").body, expected_service_body(2, true));
    }

    #[test]
    fn sync_closes_reopens_and_updates_counts_in_place() {
        let runtime = runtime();
        let mut servers = ServiceHealthServers::new(
            Arc::new(ProxyHealth::new(Duration::from_secs(30))),
            Ipv4Addr::LOCALHOST,
            runtime.handle().clone(),
        );
        let port = free_port();
        let wanted = |count| BTreeMap::from([(port, (service("shop", "web"), count))]);
        assert!(servers.sync(&wanted(1)).is_empty());

        // A kept-alive connection survives a count change: the server was not reopened.
        let mut connection = BufReader::new(TcpStream::connect(local(port)).unwrap());
        assert_eq!(request(&mut connection, "/", false).body, expected_service_body(1, true));
        assert!(servers.sync(&wanted(3)).is_empty());
        let reply = request(&mut connection, "/", true);
        assert_eq!(reply.header("x-load-balancing-endpoint-weight"), Some("3"));
        assert_eq!(reply.body, expected_service_body(3, true));

        // Closed means refused as soon as sync returns.
        assert!(servers.sync(&BTreeMap::new()).is_empty());
        let refused = TcpStream::connect(local(port)).expect_err("port closed");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

        assert!(servers.sync(&wanted(0)).is_empty());
        assert_eq!(get(local(port), "/").status_line, "HTTP/1.1 503 Service Unavailable");

        // The port handed to another Service answers for that Service.
        assert!(servers.sync(&BTreeMap::from([(port, (service("shop", "api"), 1))])).is_empty());
        assert!(get(local(port), "/").body.contains("\"name\": \"api\""));
    }

    #[test]
    fn a_port_in_use_is_reported_and_retried_on_the_next_sync() {
        let runtime = runtime();
        let mut servers = ServiceHealthServers::new(
            Arc::new(ProxyHealth::new(Duration::from_secs(30))),
            Ipv4Addr::LOCALHOST,
            runtime.handle().clone(),
        );
        let squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = squatter.local_addr().unwrap().port();
        let wanted = BTreeMap::from([(port, (service("shop", "web"), 1))]);

        let failures = servers.sync(&wanted);
        assert_eq!(failures.len(), 1);
        assert!(
            failures[0].contains("\"shop/web\"") && failures[0].contains(&format!("port {port}")),
            "{failures:?}"
        );

        drop(squatter);
        assert!(servers.sync(&wanted).is_empty());
        assert_eq!(get(local(port), "/").status_line, "HTTP/1.1 200 OK");
    }

    /// Serves `health` on a fresh port of `runtime`.
    fn serve(runtime: &tokio::runtime::Runtime, health: Arc<ProxyHealth>) -> SocketAddr {
        let listener = runtime.block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(serve_proxy_health(listener, health));
        addr
    }

    fn json(reply: &Reply) -> serde_json::Value {
        serde_json::from_str(&reply.body).expect("JSON body")
    }

    #[test]
    fn proxy_health_answers_like_kube_proxy() {
        let runtime = runtime();
        let health = Arc::new(ProxyHealth::new(Duration::from_secs(30)));
        let addr = serve(&runtime, health.clone());

        let reply = get(addr, "/healthz");
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert_eq!(reply.headers[..2], ["content-type: application/json", "x-content-type-options: nosniff"]);
        // Go's json.Marshal: compact, struct field order.
        let keys = [
            "{\"lastUpdated\":\"",
            ",\"currentTime\":\"",
            ",\"nodeEligible\":true,\"healthy\":true,\"status\":{\"IPv4\":{\"lastUpdated\":\"",
        ];
        let positions: Vec<_> = keys.iter().map(|key| reply.body.find(key).expect(key)).collect();
        assert!(reply.body.starts_with(keys[0]) && positions.is_sorted(), "{}", reply.body);
        assert!(reply.body.ends_with("\",\"healthy\":true}}}"), "{}", reply.body);
        let body = json(&reply);
        for key in ["lastUpdated", "currentTime"] {
            let time = body[key].as_str().unwrap();
            assert!(time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        }

        let reply = get(addr, "/livez");
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        let body = json(&reply);
        let keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 4);
        assert!(
            body.get("nodeEligible").is_none()
                && body["healthy"] == true
                && body["status"]["IPv4"]["healthy"] == true
        );

        for target in ["/", "/healthz/", "/metrics"] {
            let reply = get(addr, target);
            assert_eq!(reply.status_line, "HTTP/1.1 404 Not Found");
            assert_eq!(reply.header("content-type"), Some("text/plain; charset=utf-8"));
            assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
            assert_eq!(reply.body, "404 page not found\n");
        }
    }

    #[test]
    fn proxy_turns_unhealthy_once_a_queued_update_outlives_twice_the_sync_period() {
        let runtime = runtime();
        let health = Arc::new(ProxyHealth::new(Duration::from_millis(50)));
        let addr = serve(&runtime, health.clone());
        let queued = Instant::now();
        health.queued_update();

        let deadline = queued + Duration::from_secs(10);
        let reply = loop {
            let reply = get(addr, "/livez");
            if reply.status_line != "HTTP/1.1 200 OK" || Instant::now() > deadline {
                break reply;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(queued.elapsed() >= Duration::from_millis(100), "unhealthy before the timeout");
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        let body = json(&reply);
        assert!(body["healthy"] == false && body["status"]["IPv4"]["healthy"] == false);
        // While unhealthy, lastUpdated is the last sync, not now.
        assert_eq!(body["lastUpdated"], body["status"]["IPv4"]["lastUpdated"]);
        assert_ne!(body["lastUpdated"], body["currentTime"]);
        assert_eq!(get(addr, "/healthz").status_line, "HTTP/1.1 503 Service Unavailable");
        assert!(!health.is_healthy());

        // A later queued update does not restart the clock; a sync does.
        health.queued_update();
        assert!(!health.is_healthy());
        health.updated();
        assert!(health.is_healthy());
        assert_eq!(get(addr, "/livez").status_line, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/healthz").status_line, "HTTP/1.1 200 OK");
    }

    #[test]
    fn syncs_that_leave_entries_out_fail_healthz_after_the_timeout_but_not_livez() {
        let runtime = runtime();
        let health = Arc::new(ProxyHealth::new(Duration::from_millis(50)));
        let addr = serve(&runtime, health.clone());
        let queued = Instant::now();
        health.queued_update();
        health.updated_with_failures();
        let deadline = queued + Duration::from_secs(10);
        while health.is_healthy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(queued.elapsed() >= Duration::from_millis(100), "unhealthy before the timeout");
        let reply = get(addr, "/healthz");
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(json(&reply)["healthy"], false);
        let reply = get(addr, "/livez");
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert!(json(&reply)["healthy"] == true && json(&reply)["status"]["IPv4"]["healthy"] == true);

        // A later change that no sync gets to fails /livez too; a complete sync heals both.
        let queued = Instant::now();
        health.queued_update();
        while get(addr, "/livez").status_line == "HTTP/1.1 200 OK" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(queued.elapsed() >= Duration::from_millis(100), "/livez failed before the timeout");
        assert_eq!(get(addr, "/livez").status_line, "HTTP/1.1 503 Service Unavailable");
        health.updated();
        assert_eq!(get(addr, "/livez").status_line, "HTTP/1.1 200 OK");
        assert_eq!(get(addr, "/healthz").status_line, "HTTP/1.1 200 OK");
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let runtime = runtime();
        let health = Arc::new(ProxyHealth::new(Duration::from_secs(30)));
        let addr = serve(&runtime, health.clone());
        health.set_node_eligible(false);

        let reply = get(addr, "/healthz");
        assert_eq!(reply.status_line, "HTTP/1.1 503 Service Unavailable");
        let body = json(&reply);
        assert!(body["nodeEligible"] == false && body["healthy"] == true);
        assert_eq!(get(addr, "/livez").status_line, "HTTP/1.1 200 OK");
        assert!(health.is_healthy(), "service health ignores node eligibility");

        health.set_node_eligible(true);
        assert_eq!(get(addr, "/healthz").status_line, "HTTP/1.1 200 OK");
    }

    #[test]
    fn times_are_formatted_as_go_marshals_them() {
        let at = |seconds, nanos| go_json_time(UNIX_EPOCH + Duration::new(seconds, nanos));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400, 0), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000, 123_456_789), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(at(1_709_164_799, 500_000_000), "2024-02-28T23:59:59.5Z");
        assert_eq!(at(4_102_444_800, 1_000), "2100-01-01T00:00:00.000001Z");
    }
}
