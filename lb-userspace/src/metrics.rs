//! Prometheus `/metrics` (OpenMetrics text): kube-proxy's sync metrics under the `xlb_` prefix,
//! with kube-proxy's buckets so dashboards and SLOs carry over (pkg/proxy/metrics/metrics.go),
//! plus what only xlb has: per-Service packet and byte counters and BPF map fill, read from the
//! dataplane at each scrape.
use std::{
    fmt, io,
    sync::{atomic::AtomicU64, Arc},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use prometheus_client::{
    collector::Collector,
    encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, linear_buckets, Histogram},
        TypedMetric,
    },
    registry::Registry,
};
use tokio::net::TcpListener;

/// The map whose fill is also exported as `xlb_conntrack_entries`.
const CONNTRACK_MAP: &str = "XLB_CONNTRACK";

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the dataplane reports at a scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataplaneStats {
    pub services: Vec<ServiceCounters>,
    pub maps: Vec<MapFill>,
}

/// Traffic balanced to one Service port since its counters were created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    pub namespace: String,
    pub name: String,
    /// Port name or number, then the protocol: `http/TCP`, `53/UDP`.
    pub port: String,
    pub packets: u64,
    pub bytes: u64,
}

/// How full one BPF map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFill {
    pub name: String,
    pub entries: u64,
    pub max_entries: u64,
}

/// The agent's metrics, shared through `Arc` by the sync loop and the `/metrics` server.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    programming_latency: Histogram,
    invalid_objects: Family<[(&'static str, String); 1], Counter>,
    skipped_objects: Family<[(&'static str, String); 2], Counter>,
    map_write_failures: Counter,
    last_sync: Gauge<f64, AtomicU64>,
    external_hooks: Family<[(&'static str, String); 2], Gauge>,
}

impl Metrics {
    /// `read_dataplane` is called at each scrape, on a blocking thread: it reads BPF maps with
    /// syscalls.
    pub fn new(read_dataplane: Box<dyn Fn() -> DataplaneStats + Send + Sync>) -> Self {
        let mut registry = Registry::with_prefix("xlb");
        // kube-proxy: ExponentialBuckets(0.001, 2, 15), 1 ms to about 16 s.
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration.clone(),
        );
        let programming_latency = Histogram::new(network_programming_buckets());
        registry.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            programming_latency.clone(),
        );
        let last_sync = Gauge::default();
        registry.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync.clone(),
        );
        let invalid_objects = Family::default();
        registry.register(
            "invalid_objects",
            "Objects left out because they failed validation, by kind",
            invalid_objects.clone(),
        );
        let skipped_objects = Family::default();
        registry.register(
            "skipped_objects",
            "Valid objects (or parts of them) left out, by kind and reason",
            skipped_objects.clone(),
        );
        let map_write_failures = Counter::default();
        registry.register(
            "map_write_failures",
            "BPF map updates and deletes that failed",
            map_write_failures.clone(),
        );
        let external_hooks = Family::default();
        registry.register(
            "external_interface_hook",
            "1 for the hook each external interface takes its traffic at (xdp or tc)",
            external_hooks.clone(),
        );
        registry.register_collector(Box::new(DataplaneCollector { read: read_dataplane }));
        Self {
            registry,
            sync_duration,
            programming_latency,
            invalid_objects,
            skipped_objects,
            map_write_failures,
            last_sync,
            external_hooks,
        }
    }

    /// `interface` takes its traffic at `hook` (`xdp` or `tc`).
    pub fn set_external_hook(&self, interface: &str, hook: &str) {
        for other in ["xdp", "tc"].into_iter().filter(|h| *h != hook) {
            self.external_hooks.remove(&[("interface", interface.to_owned()), ("hook", other.to_owned())]);
        }
        self.external_hooks
            .get_or_create(&[("interface", interface.to_owned()), ("hook", hook.to_owned())])
            .set(1);
    }

    /// How long one sync of desired state into the maps took.
    pub fn observe_sync(&self, duration: Duration) {
        self.sync_duration.observe(duration.as_secs_f64());
    }

    /// From a change's trigger time (e.g. the EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`) to the sync that applied it.
    pub fn observe_programming_latency(&self, latency: Duration) {
        self.programming_latency.observe(latency.as_secs_f64());
    }

    /// `kind` is the object's kind: `Service`, `EndpointSlice`, `Node`.
    pub fn count_invalid_object(&self, kind: &str) {
        self.invalid_objects.get_or_create(&[("kind", kind.to_owned())]).inc();
    }

    /// `reason` is a short snake_case word, e.g. `nodeport_conflict`.
    pub fn count_skipped_object(&self, kind: &str, reason: &str) {
        self.skipped_objects.get_or_create(&[("kind", kind.to_owned()), ("reason", reason.to_owned())]).inc();
    }

    pub fn count_map_write_failures(&self, n: u64) {
        self.map_write_failures.inc_by(n);
    }

    /// When the maps last matched the sources.
    pub fn set_last_sync(&self, when: SystemTime) {
        self.last_sync.set(when.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64());
    }

    /// The full exposition; blocks while the dataplane is read.
    fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, 1 s to 59 s by 1 s, 60 s to
/// 115 s by 5 s, 2 min to 5 min by 30 s (its `merge` starts from a zero bucket).
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    std::iter::once(0.0)
        .chain(linear_buckets(0.25, 0.25, 2))
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

/// Dataplane figures, read fresh at each scrape rather than copied into the registry after
/// each sync, so counters are as current as the BPF maps.
struct DataplaneCollector {
    read: Box<dyn Fn() -> DataplaneStats + Send + Sync>,
}

impl fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataplaneCollector").finish_non_exhaustive()
    }
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats = (self.read)();
        encode_family(
            &mut encoder,
            "service_packets",
            "Packets balanced to each Service port.",
            &stats.services,
            |s| (service_labels(s), ConstCounter::new(s.packets)),
        )?;
        encode_family(
            &mut encoder,
            "service_bytes",
            "Bytes balanced to each Service port.",
            &stats.services,
            |s| (service_labels(s), ConstCounter::new(s.bytes)),
        )?;
        encode_family(&mut encoder, "map_entries", "Entries in each BPF map.", &stats.maps, |m| {
            (map_labels(m), ConstGauge::new(m.entries))
        })?;
        encode_family(&mut encoder, "map_max_entries", "Capacity of each BPF map.", &stats.maps, |m| {
            (map_labels(m), ConstGauge::new(m.max_entries))
        })?;
        encode_family(
            &mut encoder,
            "map_fill_ratio",
            "Entries over capacity of each BPF map.",
            &stats.maps,
            |m| (map_labels(m), ConstGauge::new(m.entries as f64 / m.max_entries as f64)),
        )?;
        if let Some(conntrack) = stats.maps.iter().find(|m| m.name == CONNTRACK_MAP) {
            let gauge = ConstGauge::new(conntrack.entries);
            gauge.encode(encoder.encode_descriptor(
                "conntrack_entries",
                "Connections tracked by the dataplane.",
                None,
                ConstGauge::<u64>::TYPE,
            )?)?;
        }
        Ok(())
    }
}

/// Label values are Kubernetes names, port names and map names: nothing to escape.
fn service_labels(s: &ServiceCounters) -> [(&'static str, &str); 3] {
    [("namespace", &s.namespace), ("service", &s.name), ("port", &s.port)]
}

fn map_labels(m: &MapFill) -> [(&'static str, &str); 1] {
    [("map", &m.name)]
}

/// One metric family with a sample per row; nothing at all for no rows, as the registry does
/// for an empty `Family`.
fn encode_family<'a, T, L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &'a [T],
    sample: impl Fn(&'a T) -> (L, M),
) -> fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for row in rows {
        let (labels, metric) = sample(row);
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// What `/proxyMode` answers: kube-proxy answers its mode there (`iptables`, `nftables`,
/// `ipvs`), and Kubernetes' e2e tests (`[sig-network] Networking should check kube-proxy
/// urls`) require a 200 from it.
pub const PROXY_MODE: &str = "xlb";

/// Serves `/metrics` and `/proxyMode`; other paths get 404. Does not return in practice: axum
/// logs and retries failed accepts.
pub async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .route("/proxyMode", get(|| async { PROXY_MODE }))
        .with_state(metrics);
    axum::serve(listener, router).await
}

async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    // Reading the dataplane makes syscalls: keep them off the async workers.
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(exposition)) => {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], exposition).into_response()
        }
        failed => {
            tracing::error!(?failed, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, SocketAddr},
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::health::test_client::get;

    fn stats() -> DataplaneStats {
        DataplaneStats {
            services: vec![
                ServiceCounters {
                    namespace: "shop".into(),
                    name: "web".into(),
                    port: "http/TCP".into(),
                    packets: 10,
                    bytes: 1500,
                },
                ServiceCounters {
                    namespace: "kube-system".into(),
                    name: "kube-dns".into(),
                    port: "53/UDP".into(),
                    packets: 7,
                    bytes: 420,
                },
            ],
            maps: vec![
                MapFill { name: CONNTRACK_MAP.into(), entries: 250, max_entries: 1000 },
                MapFill { name: "XLB_BACKENDS".into(), entries: 3, max_entries: 4 },
            ],
        }
    }

    fn serve(metrics: Arc<Metrics>) -> (tokio::runtime::Runtime, SocketAddr) {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(serve_metrics(listener, metrics));
        (runtime, addr)
    }

    #[test]
    fn scrape_exposes_sync_metrics_and_dataplane_figures() {
        let reads = Arc::new(AtomicUsize::new(0));
        let metrics = Arc::new(Metrics::new(Box::new({
            let reads = reads.clone();
            move || {
                reads.fetch_add(1, Ordering::Relaxed);
                stats()
            }
        })));
        metrics.observe_sync(Duration::from_millis(3));
        metrics.observe_programming_latency(Duration::from_millis(1500));
        metrics.count_invalid_object("Service");
        metrics.count_invalid_object("Service");
        metrics.count_skipped_object("Service", "nodeport_conflict");
        metrics.count_map_write_failures(3);
        metrics.set_last_sync(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let (_runtime, addr) = serve(metrics);

        let reply = get(addr, "/metrics");
        assert_eq!(reply.status_line, "HTTP/1.1 200 OK");
        assert_eq!(reply.header("content-type"), Some(OPENMETRICS_CONTENT_TYPE));
        let lines: Vec<&str> = reply.body.lines().collect();
        for expected in [
            "# TYPE xlb_sync_proxy_rules_duration_seconds histogram",
            "xlb_sync_proxy_rules_duration_seconds_sum 0.003",
            "xlb_sync_proxy_rules_duration_seconds_count 1",
            "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"0.002\"} 0",
            "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 1",
            "xlb_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "# TYPE xlb_network_programming_duration_seconds histogram",
            "xlb_network_programming_duration_seconds_count 1",
            "xlb_network_programming_duration_seconds_bucket{le=\"0.0\"} 0",
            "xlb_network_programming_duration_seconds_bucket{le=\"1.0\"} 0",
            "xlb_network_programming_duration_seconds_bucket{le=\"2.0\"} 1",
            "xlb_network_programming_duration_seconds_bucket{le=\"300.0\"} 1",
            "xlb_sync_proxy_rules_last_timestamp_seconds 1700000000.0",
            "# TYPE xlb_invalid_objects counter",
            "xlb_invalid_objects_total{kind=\"Service\"} 2",
            "xlb_skipped_objects_total{kind=\"Service\",reason=\"nodeport_conflict\"} 1",
            "xlb_map_write_failures_total 3",
            "# TYPE xlb_service_packets counter",
            "xlb_service_packets_total{namespace=\"shop\",service=\"web\",port=\"http/TCP\"} 10",
            "xlb_service_packets_total{namespace=\"kube-system\",service=\"kube-dns\",port=\"53/UDP\"} 7",
            "xlb_service_bytes_total{namespace=\"shop\",service=\"web\",port=\"http/TCP\"} 1500",
            "xlb_service_bytes_total{namespace=\"kube-system\",service=\"kube-dns\",port=\"53/UDP\"} 420",
            "# TYPE xlb_map_entries gauge",
            "xlb_map_entries{map=\"XLB_CONNTRACK\"} 250",
            "xlb_map_entries{map=\"XLB_BACKENDS\"} 3",
            "xlb_map_max_entries{map=\"XLB_CONNTRACK\"} 1000",
            "xlb_map_fill_ratio{map=\"XLB_CONNTRACK\"} 0.25",
            "xlb_map_fill_ratio{map=\"XLB_BACKENDS\"} 0.75",
            "# TYPE xlb_conntrack_entries gauge",
            "xlb_conntrack_entries 250",
        ] {
            assert!(lines.contains(&expected), "missing {expected:?} in\n{}", reply.body);
        }
        // 81 kube-proxy bounds and +Inf.
        let buckets =
            lines.iter().filter(|l| l.starts_with("xlb_network_programming_duration_seconds_bucket"));
        assert_eq!(buckets.count(), 82);
        assert_eq!(lines.last(), Some(&"# EOF"));

        get(addr, "/metrics");
        assert_eq!(reads.load(Ordering::Relaxed), 2, "the dataplane is read at each scrape");
        assert_eq!(get(addr, "/").status_line, "HTTP/1.1 404 Not Found");
        let mode = get(addr, "/proxyMode");
        assert_eq!((mode.status_line.as_str(), mode.body.as_str()), ("HTTP/1.1 200 OK", PROXY_MODE));
    }

    #[test]
    fn an_empty_dataplane_exports_no_dataplane_families() {
        let metrics = Metrics::new(Box::new(DataplaneStats::default));
        let exposition = metrics.encode().unwrap();
        assert!(
            !exposition.contains("xlb_service_") && !exposition.contains("xlb_map_entries"),
            "{exposition}"
        );
        assert!(!exposition.contains("xlb_conntrack_entries"), "{exposition}");
        assert!(exposition.contains("xlb_sync_proxy_rules_duration_seconds_count 0"), "{exposition}");
    }
}
