//! Kubernetes API mode, end to end: the real `xlb agent` follows the in-repo API server
//! (`xlb_tests::apiserver`, on each node's loopback) through a kubeconfig, and real traffic
//! through the namespace cluster checks what it programmed: Services created, changed and
//! deleted; watches that drop or expire; an API server that is down; healthCheckNodePort,
//! /healthz and /metrics; bad objects.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::{proto, service::ServiceKey};
use serde_json::{json, Value};
use xlb_tests::{
    apiserver::{self, ApiServer},
    checks::{answered_by, dechunk, eventually, metric},
    kiada::{self, Reply},
    netns, sockets,
    testbed::{services_map, Spec, Testbed},
    traffic::{self, tally_pods},
};

const HTTP: u16 = 8080;
const WEB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
/// Where the API server listens in every node's namespace.
const API_PORT: u16 = 6443;
/// The agents' `--sync-period`: short, so drift repair and the health timeout show quickly.
const SYNC_PERIOD_S: u64 = 1;
/// How fast a change must reach the dataplane.
const FOLLOW: Duration = Duration::from_secs(1);

/// web-0 and web-1 on node-a, web-2 on node-b; cpod is a client pod on node-a.
fn spec() -> Spec {
    Spec {
        nodes: 2,
        pods: vec![("web-0".into(), 0), ("web-1".into(), 0), ("web-2".into(), 1), ("cpod".into(), 0)],
        tcp_ports: vec![HTTP],
        udp_ports: vec![5353],
    }
}

struct Cluster {
    tb: Testbed,
    api: ApiServer,
}

impl Cluster {
    /// The namespace cluster, the API server on every node's loopback holding both Nodes, and
    /// an agent per node following it. The client routes the Service range through node-a.
    fn up() -> Self {
        let tb = Testbed::up(&spec()).expect("cluster");
        let api = ApiServer::new();
        for node in &tb.nodes {
            api.listen(Some(&node.ns), API_PORT).expect("API server in the node namespace");
            api.apply(apiserver::node_object(&node.name, node.ip));
        }
        netns::ip(&["-n", &tb.client, "route", "add", "198.19.0.0/16", "via", &tb.nodes[0].ip.to_string()])
            .expect("client route");
        let kubeconfig = tb.manifests.join("kubeconfig");
        std::fs::write(&kubeconfig, ApiServer::kubeconfig(([127, 0, 0, 1], API_PORT).into()))
            .expect("kubeconfig");
        let mut cluster = Self { tb, api };
        for i in 0..cluster.tb.nodes.len() {
            cluster.start_agent(i);
        }
        // Changes are timed from here: each agent has listed the API and written its maps.
        for i in 0..cluster.tb.nodes.len() {
            cluster.tb.wait_for_log(i, "synced", Duration::from_secs(30)).expect("first sync");
        }
        cluster
    }

    fn start_agent(&mut self, i: usize) {
        let kubeconfig = self.tb.manifests.join("kubeconfig");
        let sync_period = SYNC_PERIOD_S.to_string();
        let args: [&std::ffi::OsStr; 6] = [
            "--kubeconfig".as_ref(),
            kubeconfig.as_os_str(),
            "--sync-period".as_ref(),
            sync_period.as_ref(),
            // Scraped from the client namespace.
            "--metrics-bind-address".as_ref(),
            "0.0.0.0:10249".as_ref(),
        ];
        self.tb.start_agent_with(i, &args).expect("agent");
    }

    fn pod(&self, name: &str) -> &xlb_tests::testbed::Pod {
        self.tb.pods.iter().find(|p| p.name == name).expect("pod of the spec")
    }

    /// An EndpointSlice `{service}-1` on port `http`/8080 with one endpoint per
    /// (pod, ready, terminating).
    fn slice(&self, service: &str, endpoints: &[(&str, bool, bool)]) -> EndpointSlice {
        let endpoints: Vec<Value> = endpoints
            .iter()
            .map(|(pod, ready, terminating)| {
                let pod = self.pod(pod);
                json!({
                    "addresses": [pod.ip.to_string()],
                    "nodeName": self.tb.nodes[pod.node].name,
                    "conditions": {"ready": ready, "serving": true, "terminating": terminating},
                })
            })
            .collect();
        from_json(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": format!("{service}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": HTTP, "protocol": "TCP"}],
            "endpoints": endpoints,
        }))
    }

    fn ready(&self, service: &str, pods: &[&str]) -> EndpointSlice {
        let endpoints: Vec<(&str, bool, bool)> = pods.iter().map(|p| (*p, true, false)).collect();
        self.slice(service, &endpoints)
    }

    fn ns(&self, pod: &str) -> String {
        self.pod(pod).ns.clone()
    }

    fn node_addr(&self, node: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.tb.nodes[node].ip, port)
    }

    fn log(&self, node: usize) -> String {
        std::fs::read_to_string(self.tb.agent_log(node)).unwrap_or_default()
    }
}

fn from_json<T: serde::de::DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid object")
}

fn service(name: &str, spec: Value) -> Service {
    from_json(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }))
}

fn web(spec: Value) -> Service {
    let mut base =
        json!({"clusterIP": WEB_IP.to_string(), "ports": [{"name": "http", "port": 80, "targetPort": HTTP}]});
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), spec) {
        base.extend(extra);
    }
    service("web", base)
}

/// `count` GETs from `ns` to `target`: the pods that answered. Stops at the first failure,
/// with a short timeout: a probe must not outlast the change it waits for.
fn pods_answering(
    c: &Cluster,
    ns: &str,
    target: SocketAddrV4,
    count: usize,
) -> anyhow::Result<BTreeSet<String>> {
    if !c.tb.owns_namespace(ns) {
        bail!("{ns} is not ours");
    }
    let replies = netns::within(ns, move || -> anyhow::Result<Vec<Reply>> {
        (0..count).map(|_| Ok(kiada::get_tcp(target, Duration::from_millis(300))?.0)).collect()
    })??;
    Ok(tally_pods(&replies).into_keys().collect())
}

/// New connections from `ns` to `target` are answered by `pods` and no other: each of them
/// answers, and none other in at least 12 connections (`checks::answered_by`).
fn expect_pods(c: &Cluster, ns: &str, target: SocketAddrV4, pods: &[&str]) -> anyhow::Result<()> {
    if !c.tb.owns_namespace(ns) {
        bail!("{ns} is not ours");
    }
    let want: BTreeSet<String> = pods.iter().map(|p| p.to_string()).collect();
    netns::within(ns, move || {
        answered_by(&want, 12, || Ok(kiada::get_tcp(target, Duration::from_millis(300))?.0.pod))
    })?
    .with_context(|| format!("{target}"))?;
    Ok(())
}

/// A parsed HTTP/1.1 response.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// GET `path` from `ns` (a namespace of the testbed) on `addr`.
fn http_get(c: &Cluster, ns: &str, addr: SocketAddrV4, path: &str) -> anyhow::Result<Response> {
    if !c.tb.owns_namespace(ns) {
        bail!("{ns} is not ours");
    }
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = netns::within(ns, move || -> anyhow::Result<Vec<u8>> {
        let mut stream = sockets::tcp_connect(addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        Ok(raw)
    })??;
    let text = String::from_utf8(raw).context("response is not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let mut lines = head.split("\r\n");
    let status =
        lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).context("status")?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v == "chunked");
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok(Response { status, headers, body })
}

fn scrape(c: &Cluster, node: usize) -> anyhow::Result<String> {
    let response = http_get(c, &c.tb.client, c.node_addr(node, 10249), "/metrics")?;
    if response.status != 200 {
        bail!("/metrics answered {}", response.status);
    }
    Ok(response.body)
}

#[test]
fn services_follow_the_api_through_create_update_and_delete() {
    let mut c = Cluster::up();
    let cpod = c.ns("cpod");
    let client = c.tb.client.clone();
    let all = ["web-0", "web-1", "web-2"];

    c.api.apply(web(json!({})));
    c.api.apply(c.ready("web", &all));
    let took = eventually("ClusterIP created", FOLLOW, || {
        expect_pods(&c, &cpod, SocketAddrV4::new(WEB_IP, 80), &all)
    });
    eprintln!("create followed in {took:?}");

    c.api.apply(web(json!({"ports": [{"name": "http", "port": 81, "targetPort": HTTP}]})));
    eventually("port changed", FOLLOW, || expect_pods(&c, &cpod, SocketAddrV4::new(WEB_IP, 81), &all));

    c.api.apply(c.ready("web", &["web-2"]));
    eventually("endpoints changed", FOLLOW, || {
        expect_pods(&c, &cpod, SocketAddrV4::new(WEB_IP, 81), &["web-2"])
    });

    let ports = json!([{"name": "http", "port": 81, "targetPort": HTTP, "nodePort": 30080}]);
    c.api.apply(c.ready("web", &all));
    c.api.apply(web(json!({"type": "NodePort", "ports": ports})));
    for node in 0..2 {
        eventually("NodePort", FOLLOW, || expect_pods(&c, &client, c.node_addr(node, 30080), &all));
    }

    let mut lb = web(json!({"type": "LoadBalancer", "ports": ports}));
    lb.status = Some(from_json(json!({"loadBalancer": {"ingress": [{"ip": LB_IP.to_string()}]}})));
    c.api.apply(lb.clone());
    eventually("LoadBalancer IP", FOLLOW, || expect_pods(&c, &client, SocketAddrV4::new(LB_IP, 81), &all));

    let mut sticky = lb.clone();
    sticky.spec.as_mut().expect("spec").session_affinity = Some("ClientIP".into());
    c.api.apply(sticky);
    eventually("affinity on", FOLLOW, || {
        let pods = pods_answering(&c, &client, c.node_addr(0, 30080), 12)?;
        if pods.len() != 1 {
            bail!("answered from {pods:?}");
        }
        Ok(())
    });
    c.api.apply(lb);
    eventually("affinity off", FOLLOW, || {
        let pods = pods_answering(&c, &client, c.node_addr(0, 30080), 30)?;
        if pods.len() < 2 {
            bail!("answered only from {pods:?}");
        }
        Ok(())
    });

    c.api.delete::<Service>(Some("default"), "web");
    for node in 0..2 {
        eventually("deleted NodePort stops answering", FOLLOW, || {
            match traffic::tcp_from(&c.tb, &client, c.node_addr(node, 30080), 1)?.remove(0) {
                Ok((reply, _)) => bail!("still answered by {}", reply.pod),
                Err(_) => Ok(()),
            }
        });
        c.tb.check_agent_alive(node).expect("agent alive");
    }
}

const ALL_WEB: [&str; 3] = ["web-0", "web-1", "web-2"];

/// The cluster with the ClusterIP Service `web` on every web pod, answering from cpod:
/// (cluster, cpod's namespace, the ClusterIP frontend).
fn with_web() -> (Cluster, String, SocketAddrV4) {
    let c = Cluster::up();
    let cpod = c.ns("cpod");
    c.api.apply(web(json!({})));
    c.api.apply(c.ready("web", &ALL_WEB));
    let vip = SocketAddrV4::new(WEB_IP, 80);
    eventually("ClusterIP", FOLLOW, || expect_pods(&c, &cpod, vip, &ALL_WEB));
    (c, cpod, vip)
}

/// Requests the server logged that list (rather than watch) `resource`.
fn lists(api: &ApiServer, resource: &str) -> usize {
    api.requests()
        .iter()
        .filter(|r| r.contains(resource) && !r.contains("watch=true") && !r.contains("limit=1"))
        .count()
}

#[test]
fn dropped_and_expired_watches_recover_without_a_flush() {
    let (mut c, cpod, vip) = with_web();
    let all = ALL_WEB;

    // Watch the frontend in the maps the whole time: a flush would remove it, if briefly.
    let key = ServiceKey::new(WEB_IP, 80, proto::TCP);
    let map_path = c.tb.nodes[0].bpffs_dir.join(lb_common::maps::SERVICES);
    let (stop, gaps, polls) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let watcher = {
        let (stop, gaps, polls) = (stop.clone(), gaps.clone(), polls.clone());
        std::thread::spawn(move || {
            let map = services_map(&map_path).expect("services map");
            while !stop.load(Ordering::Relaxed) {
                if map.get(&key, 0).is_err() {
                    gaps.fetch_add(1, Ordering::Relaxed);
                }
                polls.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let slice_lists = lists(&c.api, "endpointslices");
    c.api.drop_watches();
    c.api.apply(c.ready("web", &["web-0"]));
    eventually("change after a dropped watch", FOLLOW, || expect_pods(&c, &cpod, vip, &["web-0"]));
    assert_eq!(lists(&c.api, "endpointslices"), slice_lists, "a dropped watch resumes without a new list");

    c.api.compact();
    c.api.apply(c.ready("web", &all));
    eventually("change after 410 Gone", Duration::from_secs(5), || expect_pods(&c, &cpod, vip, &all));
    assert!(lists(&c.api, "endpointslices") > slice_lists, "410 Gone makes the agent list again");

    stop.store(true, Ordering::Relaxed);
    watcher.join().expect("map watcher");
    assert_eq!(
        gaps.load(Ordering::Relaxed),
        0,
        "the frontend left the map during {} polls",
        polls.load(Ordering::Relaxed)
    );
    c.tb.check_agent_alive(0).expect("agent alive");
}

#[test]
fn drift_is_repaired_and_a_down_api_server_keeps_the_pinned_state_serving() {
    let (mut c, cpod, vip) = with_web();
    let all = ALL_WEB;
    let healthz = |c: &Cluster| http_get(c, &c.tb.client, c.node_addr(0, 10256), "/healthz");
    assert_eq!(healthz(&c).expect("/healthz").status, 200);

    // An entry deleted by hand (as with bpftool) comes back within a sync period.
    let key = ServiceKey::new(WEB_IP, 80, proto::TCP);
    let mut map = services_map(&c.tb.nodes[0].bpffs_dir.join(lb_common::maps::SERVICES)).expect("map");
    map.remove(&key).expect("remove by hand");
    eventually("drift repaired", Duration::from_secs(3 * SYNC_PERIOD_S), || {
        map.get(&key, 0).map(|_| ()).context("frontend still missing")
    });

    // The API server goes away and the agent restarts: the pinned maps keep serving.
    for i in 0..2 {
        c.tb.stop_agent(i).expect("stop agent");
    }
    c.api.stop_listening();
    c.start_agent(0);
    c.tb.wait_for_log(0, "watch failed", Duration::from_secs(10)).expect("the agent retries");
    expect_pods(&c, &cpod, vip, &all).expect("pinned state serves while the API is down");
    eventually(
        "/healthz unhealthy after 2 × syncPeriod",
        Duration::from_secs(4 * SYNC_PERIOD_S + 2),
        || match healthz(&c)?.status {
            503 => Ok(()),
            other => bail!("/healthz {other}"),
        },
    );
    expect_pods(&c, &cpod, vip, &all).expect("still serving");
    assert!(!c.log(0).contains("synced"), "no sync may write the maps before the first listing");

    for node in &c.tb.nodes {
        c.api.listen(Some(&node.ns), API_PORT).expect("API server back");
    }
    c.api.apply(c.ready("web", &["web-1"]));
    eventually("change after the API is back", Duration::from_secs(35), || {
        expect_pods(&c, &cpod, vip, &["web-1"])
    });
    eventually("/healthz healthy again", Duration::from_secs(5), || match healthz(&c)?.status {
        200 => Ok(()),
        other => bail!("/healthz {other}"),
    });
}

/// kube-proxy's healthCheckNodePort body (pkg/proxy/healthcheck/service_health.go).
fn hc_body(name: &str, local: usize, healthy: bool) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"{name}\"\n\t}},\n\t\"localEndpoints\": {local},\n\t\"serviceProxyHealthy\": {healthy}\n}}"
    )
}

fn expect_hc(c: &Cluster, node: usize, port: u16, status: u16, local: usize) -> anyhow::Result<()> {
    let r = http_get(c, &c.tb.client, c.node_addr(node, port), "/any/path?x=1")?;
    let want_headers = [
        ("Content-Type", "application/json".to_string()),
        ("X-Content-Type-Options", "nosniff".to_string()),
        ("X-Load-Balancing-Endpoint-Weight", local.to_string()),
    ];
    for (name, value) in &want_headers {
        if r.header(name) != Some(value.as_str()) {
            bail!("node {node}: {name}: {:?}, want {value:?}", r.header(name));
        }
    }
    if r.status != status || r.body != hc_body("lbl", local, true) {
        bail!("node {node}: {} {:?}, want {status} {:?}", r.status, r.body, hc_body("lbl", local, true));
    }
    Ok(())
}

#[test]
fn health_check_node_port_healthz_and_metrics_answer_like_kube_proxy() {
    let c = Cluster::up();
    const HC: u16 = 32100;
    let lbl = service(
        "lbl",
        json!({"type": "LoadBalancer", "clusterIP": "198.19.0.40", "externalTrafficPolicy": "Local",
               "healthCheckNodePort": HC,
               "ports": [{"name": "http", "port": 80, "targetPort": HTTP, "nodePort": 30090}]}),
    );
    c.api.apply(lbl);
    c.api.apply(c.slice("lbl", &[("web-0", true, false), ("web-2", false, true)]));
    eventually("200 with a local ready endpoint", FOLLOW, || expect_hc(&c, 0, HC, 200, 1));
    eventually("503 with only a terminating one", FOLLOW, || expect_hc(&c, 1, HC, 503, 0));

    c.api.apply(c.slice("lbl", &[("web-0", false, true), ("web-2", false, true)]));
    eventually("503 once the local endpoint terminates", FOLLOW, || expect_hc(&c, 0, HC, 503, 0));

    // Traffic, then the Service's counters and the tables' fill.
    expect_pods(&c, &c.tb.client, c.node_addr(0, 30090), &["web-0"])
        .expect("terminating local endpoint serves");
    let metrics = scrape(&c, 0).expect("scrape");
    let series = r#"xlb_service_packets_total{namespace="default",service="lbl",port="http/TCP"}"#;
    assert!(metric(&metrics, series).is_some_and(|v| v >= 12.0 * 4.0), "{series} in:\n{metrics}");
    let bytes = r#"xlb_service_bytes_total{namespace="default",service="lbl",port="http/TCP"}"#;
    assert!(metric(&metrics, bytes).is_some_and(|v| v > 12.0 * 200.0), "{bytes}");
    assert!(metric(&metrics, "xlb_conntrack_entries").is_some_and(|v| v >= 12.0), "conntrack entries");
    assert!(metric(&metrics, r#"xlb_map_fill_ratio{map="XLB_SERVICES"}"#).is_some_and(|v| v > 0.0));
    assert!(metrics.contains("xlb_sync_proxy_rules_duration_seconds_bucket"), "sync histogram");
    assert!(metrics.contains("xlb_network_programming_duration_seconds_bucket"), "latency histogram");

    c.api.delete::<Service>(Some("default"), "lbl");
    eventually("healthCheckNodePort closed with its Service", FOLLOW, || {
        match netns::within(&c.tb.client, {
            let addr = c.node_addr(0, HC);
            move || sockets::tcp_connect(addr, Duration::from_secs(1))
        })? {
            Ok(_) => bail!("still open"),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => bail!("{e}"),
        }
    });

    for path in ["/healthz", "/livez"] {
        let r = http_get(&c, &c.tb.client, c.node_addr(0, 10256), path).expect(path);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.header("Content-Type"), Some("application/json"), "{path}");
        assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"), "{path}");
        let body: Value = serde_json::from_str(&r.body).expect("JSON body");
        assert!(body.get("lastUpdated").is_some() && body.get("currentTime").is_some(), "{path}: {body}");
        assert_eq!(body.get("nodeEligible").is_some(), path == "/healthz", "{path}: {body}");
    }
}

#[test]
fn bad_objects_are_logged_counted_and_skipped_while_the_rest_works() {
    let mut c = Cluster::up();
    let client = c.tb.client.clone();
    let np = |name: &str, ip: &str, node_port: i64| {
        service(
            name,
            json!({"type": "NodePort", "clusterIP": ip,
                   "ports": [{"name": "http", "port": 80, "targetPort": HTTP, "nodePort": node_port}]}),
        )
    };
    c.api.apply(np("good", "198.19.0.50", 30050));
    c.api.apply(c.ready("good", &["web-0", "web-1", "web-2"]));
    c.api.apply(np("bad-ip", "198.19.0.300", 30051));
    c.api.apply(service(
        "bad-port",
        json!({"clusterIP": "198.19.0.52", "ports": [{"name": "http", "port": 0}]}),
    ));
    c.api.apply(np("bad-nodeport", "198.19.0.53", 40000));
    c.api.apply(np("claim-a", "198.19.0.54", 30777));
    c.api.apply(c.ready("claim-a", &["web-0"]));
    c.api.apply(np("claim-b", "198.19.0.55", 30777));
    c.api.apply(c.ready("claim-b", &["web-2"]));
    let mut bad_eps = c.ready("bad-eps", &["web-0"]);
    bad_eps.endpoints[0].addresses = vec!["198.19.300.1".into()];
    c.api.apply(bad_eps);

    eventually("the good Service works", FOLLOW, || {
        expect_pods(&c, &client, c.node_addr(0, 30050), &["web-0", "web-1", "web-2"])
    });
    eventually("the first claim of a nodePort wins", FOLLOW, || {
        expect_pods(&c, &client, c.node_addr(1, 30777), &["web-0"])
    });
    let log = c.log(0);
    for name in [
        "Service default/bad-ip",
        "Service default/bad-port",
        "Service default/bad-nodeport",
        "EndpointSlice default/bad-eps-1",
        "30777",
    ] {
        assert!(log.contains(name), "the log names {name}:\n{log}");
    }
    let metrics = scrape(&c, 0).expect("scrape");
    assert_eq!(metric(&metrics, r#"xlb_invalid_objects_total{kind="Service"}"#), Some(3.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"xlb_invalid_objects_total{kind="EndpointSlice"}"#), Some(1.0));
    assert!(
        metrics.lines().any(|l| l.starts_with("xlb_skipped_objects_total{") && !l.ends_with(" 0")),
        "conflicts counted"
    );
    for node in 0..2 {
        c.tb.check_agent_alive(node).expect("bad objects never take the agent down");
    }
}
