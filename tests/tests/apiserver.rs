//! Self-tests of the in-repo API server (`xlb_tests::apiserver`) through the kube 5 client and
//! watcher the agent uses, plus raw HTTP for the wire format. No root, no namespaces.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{Api, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt as _},
    Client,
};
use serde_json::Value;
use tokio::time::timeout;
use xlb_tests::apiserver::ApiServer;

const DEADLINE: Duration = Duration::from_secs(10);
/// The agent's selectors: Services no other proxy claims, and not headless.
const NO_PROXY: &str = "!service.kubernetes.io/service-proxy-name";
const NOT_HEADLESS: &str = "spec.clusterIP!=None";

async fn client(addr: SocketAddr) -> Client {
    let kubeconfig = Kubeconfig::from_yaml(&ApiServer::kubeconfig(addr)).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(config).expect("client")
}

fn service(namespace: &str, name: &str, cluster_ip: &str, labels: &[(&str, &str)]) -> Service {
    let mut service = Service::default();
    service.metadata.name = Some(name.into());
    service.metadata.namespace = Some(namespace.into());
    service.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    service.spec = Some(ServiceSpec { cluster_ip: Some(cluster_ip.into()), ..Default::default() });
    service
}

/// A server listening on loopback with four Services: two the agent selects (plain,
/// elsewhere), one claimed by another proxy and one headless.
fn populated() -> (ApiServer, SocketAddr) {
    let server = ApiServer::new();
    let addr = server.listen(None, 0).expect("listening");
    server.apply(service("default", "plain", "10.0.0.1", &[("app", "web")]));
    server.apply(service(
        "default",
        "proxied",
        "10.0.0.2",
        &[("app", "db"), ("service.kubernetes.io/service-proxy-name", "other")],
    ));
    server.apply(service("default", "headless", "None", &[]));
    server.apply(service("other", "elsewhere", "10.0.0.4", &[]));
    (server, addr)
}

fn names(services: impl IntoIterator<Item = Service>) -> Vec<String> {
    let mut names: Vec<_> = services.into_iter().filter_map(|s| s.metadata.name).collect();
    names.sort();
    names
}

/// The watcher's next event within the deadline, as "Kind name" (errors panic).
async fn step<S>(events: &mut S) -> String
where
    S: Stream<Item = watcher::Result<watcher::Event<Service>>> + Unpin,
{
    let event = timeout(DEADLINE, events.next()).await.expect("event within the deadline");
    describe(event.expect("the watcher never ends").expect("watcher event"))
}

fn describe(event: watcher::Event<Service>) -> String {
    let name = |s: Service| s.metadata.name.unwrap_or_default();
    match event {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::InitApply(s) => format!("InitApply {}", name(s)),
        watcher::Event::Apply(s) => format!("Apply {}", name(s)),
        watcher::Event::Delete(s) => format!("Delete {}", name(s)),
    }
}

/// The initial list as the watcher reports it, sorted between Init and InitDone.
async fn initial<S>(events: &mut S) -> Vec<String>
where
    S: Stream<Item = watcher::Result<watcher::Event<Service>>> + Unpin,
{
    assert_eq!(step(events).await, "Init");
    let mut applied = Vec::new();
    loop {
        match step(events).await.as_str() {
            "InitDone" => break,
            event => applied.push(event.to_string()),
        }
    }
    applied.sort();
    applied
}

#[tokio::test]
async fn list_with_selectors() {
    let (server, addr) = populated();
    let client = client(addr).await;
    let all: Api<Service> = Api::all(client.clone());
    let default: Api<Service> = Api::namespaced(client.clone(), "default");

    let agent = ListParams::default().labels(NO_PROXY).fields(NOT_HEADLESS);
    assert_eq!(names(all.list(&agent).await.unwrap()), ["elsewhere", "plain"]);
    assert_eq!(names(default.list(&agent).await.unwrap()), ["plain"]);
    assert!(server.requests().contains(
        &"GET /api/v1/services?fieldSelector=spec.clusterIP!=None&labelSelector=!service.kubernetes.io/service-proxy-name"
            .to_string()
    ));

    for (labels, fields, expected) in [
        ("app in (web, db)", "", &["plain", "proxied"][..]),
        ("app notin (web)", "", &["elsewhere", "headless", "proxied"]),
        ("app!=web", "", &["elsewhere", "headless", "proxied"]),
        ("app", "", &["plain", "proxied"]),
        ("app==db,service.kubernetes.io/service-proxy-name=other", "", &["proxied"]),
        ("", "metadata.name=headless", &["headless"]),
        ("", "metadata.namespace!=default", &["elsewhere"]),
        ("", "spec.type=ClusterIP,spec.clusterIP==10.0.0.2", &["proxied"]),
        ("app", "spec.type!=ClusterIP", &[]),
    ] {
        let params = ListParams::default().labels(labels).fields(fields);
        assert_eq!(names(all.list(&params).await.unwrap()), expected, "{labels:?} {fields:?}");
    }

    for params in
        [ListParams::default().fields("spec.nodeName=a"), ListParams::default().labels("app in web")]
    {
        let error = all.list(&params).await.unwrap_err();
        assert!(matches!(&error, kube::Error::Api(s) if s.code == 400), "{error:?}");
    }

    // Single objects: metadata assigned on create, uid and creationTimestamp kept on update.
    let plain = default.get("plain").await.unwrap();
    assert_eq!(plain.metadata.resource_version.as_deref(), Some("1"));
    assert!(plain.metadata.uid.is_some() && plain.metadata.creation_timestamp.is_some());
    let updated = server.apply(service("default", "plain", "10.0.0.1", &[]));
    assert_eq!(
        (&updated.metadata.uid, &updated.metadata.creation_timestamp),
        (&plain.metadata.uid, &plain.metadata.creation_timestamp)
    );
    assert_eq!(updated.metadata.resource_version.as_deref(), Some("5"));
    let error = default.get("missing").await.unwrap_err();
    assert!(matches!(&error, kube::Error::Api(s) if s.code == 404), "{error:?}");

    // The other two kinds: Nodes without a namespace, EndpointSlices in their group.
    let mut node = Node::default();
    node.metadata.name = Some("node-1".into());
    server.apply(node);
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default()).await.unwrap();
    assert_eq!(nodes.items.len(), 1);
    assert_eq!(nodes.items[0].metadata.namespace, None);
    assert_eq!(nodes.metadata.resource_version.as_deref(), Some("6"));
    let mut slice = EndpointSlice { address_type: "IPv4".into(), ..Default::default() };
    slice.metadata.name = Some("plain-abcde".into());
    slice.metadata.labels = Some([("kubernetes.io/service-name".into(), "plain".into())].into());
    server.apply(slice);
    let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
    let listed =
        slices.list(&ListParams::default().labels("kubernetes.io/service-name=plain")).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert!(slices.get("plain-abcde").await.is_ok());
}

#[tokio::test]
async fn watcher_sees_changes() {
    let (server, addr) = populated();
    let api: Api<Service> = Api::all(client(addr).await);
    let config = watcher::Config::default().labels(NO_PROXY).fields(NOT_HEADLESS);
    let mut events = watcher(api.clone(), config).boxed();
    assert_eq!(initial(&mut events).await, ["InitApply elsewhere", "InitApply plain"]);

    server.apply(service("default", "plain", "10.0.0.1", &[("app", "web2")]));
    assert_eq!(step(&mut events).await, "Apply plain");
    // Gets a cluster IP: enters the selection.
    server.apply(service("default", "headless", "10.0.0.3", &[]));
    assert_eq!(step(&mut events).await, "Apply headless");
    // Claimed by another proxy: leaves the selection.
    server.apply(service(
        "default",
        "plain",
        "10.0.0.1",
        &[("service.kubernetes.io/service-proxy-name", "x")],
    ));
    assert_eq!(step(&mut events).await, "Delete plain");
    // Changes outside the selection are not seen.
    server.apply(service(
        "default",
        "proxied",
        "10.0.0.9",
        &[("service.kubernetes.io/service-proxy-name", "x")],
    ));
    assert!(server.delete::<Service>(Some("other"), "elsewhere"));
    assert!(!server.delete::<Service>(Some("other"), "elsewhere"));
    assert_eq!(step(&mut events).await, "Delete elsewhere");

    // Streaming lists (sendInitialEvents) end their initial events with a bookmark.
    let mut streaming = watcher(api, watcher::Config::default().streaming_lists()).boxed();
    assert_eq!(initial(&mut streaming).await, ["InitApply headless", "InitApply plain", "InitApply proxied"]);
}

#[tokio::test]
async fn watcher_resumes_and_relists() {
    let (server, addr) = populated();
    let api: Api<Service> = Api::all(client(addr).await);
    let mut events = watcher(api, watcher::Config::default()).boxed();
    assert_eq!(initial(&mut events).await.len(), 4);
    let requests = |watch: bool| -> Vec<String> {
        let services = server.requests().into_iter().filter(|r| r.starts_with("GET /api/v1/services?"));
        services.filter(|r| r.contains("watch=true") == watch).collect()
    };

    // Watching: a change arrives. Then the server drops the watch: the watcher re-watches from
    // the last resourceVersion and gets the next change without listing again.
    let rv = server.apply(service("default", "a", "10.0.0.5", &[])).metadata.resource_version.unwrap();
    assert_eq!(step(&mut events).await, "Apply a");
    server.drop_watches();
    server.apply(service("default", "b", "10.0.0.6", &[]));
    assert_eq!(step(&mut events).await, "Apply b");
    let watches = requests(true);
    assert_eq!(watches.len(), 2, "{watches:?}");
    assert!(watches[1].ends_with(&format!("&resourceVersion={rv}")), "{watches:?}");
    assert_eq!(requests(false).len(), 1);

    // After compaction the re-watch gets 410 Gone and the watcher lists again.
    server.compact();
    server.apply(service("default", "c", "10.0.0.7", &[]));
    let mut gone = false;
    loop {
        match timeout(DEADLINE, events.next()).await.expect("event within the deadline").unwrap() {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => gone = true,
            Err(error) => panic!("{error:?}"),
            Ok(event) if describe(event.clone()).ends_with(" c") => break,
            Ok(_) => {}
        }
    }
    assert!(gone);
    assert_eq!(requests(false).len(), 2);
}

/// A watch over raw HTTP/1.1, decoding the chunked body into events. Blocking I/O (tokio's
/// io-util is not enabled) is fine: the server runs on its own runtime.
struct RawWatch {
    reader: BufReader<TcpStream>,
    head: String,
    buffer: String,
}

impl RawWatch {
    fn open(addr: SocketAddr, query: &str) -> Self {
        let mut stream = connect(addr);
        let request = format!("GET /api/v1/services?{query} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            assert_ne!(reader.read_line(&mut head).unwrap(), 0, "{head}");
        }
        RawWatch { reader, head: head.to_lowercase(), buffer: String::new() }
    }

    /// The next event other than a bookmark (those also come every second), or None once
    /// the stream has ended.
    fn event(&mut self) -> Option<Value> {
        loop {
            match self.any_event() {
                Some(event) if event["type"] == "BOOKMARK" => continue,
                event => return event,
            }
        }
    }

    fn any_event(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find('\n') {
                let line: String = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_str(&line).unwrap());
            }
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).unwrap();
            if size == 0 {
                return None;
            }
            self.buffer.push_str(std::str::from_utf8(&chunk[..size]).unwrap());
        }
    }
}

/// `(type, object.metadata.name)` of a watch event.
fn summary(event: &Value) -> (&str, &str) {
    (event["type"].as_str().unwrap(), event["object"]["metadata"]["name"].as_str().unwrap_or_default())
}

/// A connection whose reads fail after the deadline.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

fn raw_request(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut stream = connect(addr);
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[tokio::test]
async fn wire_format_and_bookmarks() {
    let (server, addr) = populated();

    // No resourceVersion: the current objects as ADDED, then bookmarks when asked for.
    let mut watch = RawWatch::open(addr, "watch=1&allowWatchBookmarks=true&labelSelector=app");
    assert!(watch.head.starts_with("http/1.1 200 ok\r\n"), "{}", watch.head);
    assert!(watch.head.contains("content-type: application/json\r\n"), "{}", watch.head);
    assert!(watch.head.contains("transfer-encoding: chunked\r\n"), "{}", watch.head);
    let added = watch.event().unwrap();
    assert_eq!(summary(&added), ("ADDED", "plain"));
    assert_eq!((&added["object"]["apiVersion"], &added["object"]["kind"]), (&"v1".into(), &"Service".into()));
    assert_eq!(summary(&watch.event().unwrap()), ("ADDED", "proxied"));
    server.bookmark();
    let bookmark = watch.any_event().unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    let expected =
        serde_json::json!({"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "4"}});
    assert_eq!(bookmark["object"], expected);

    // From a resourceVersion: the later events, then live ones.
    let mut replay = RawWatch::open(addr, "watch=true&resourceVersion=2");
    assert_eq!(summary(&replay.event().unwrap()), ("ADDED", "headless"));
    assert_eq!(summary(&replay.event().unwrap()), ("ADDED", "elsewhere"));
    server.delete::<Service>(None, "headless");
    let deleted = replay.event().unwrap();
    assert_eq!(summary(&deleted), ("DELETED", "headless"));
    assert_eq!(deleted["object"]["metadata"]["resourceVersion"], "5");

    // Compaction ends the watches; watching from before it is 410 Gone, as an ERROR event.
    server.compact();
    assert_eq!(watch.event(), None);
    assert_eq!(replay.event(), None);
    let mut expired = RawWatch::open(addr, "watch=true&resourceVersion=5");
    let error = expired.event().unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!((&error["object"]["kind"], &error["object"]["code"]), (&"Status".into(), &410.into()));
    assert_eq!(error["object"]["reason"], "Expired");
    assert_eq!(expired.event(), None);

    // timeoutSeconds ends the stream.
    let mut short = RawWatch::open(addr, "watch=true&resourceVersion=6&timeoutSeconds=1");
    assert_eq!(short.event(), None);

    for (method, path, code) in [
        ("POST", "/api/v1/services", "405"),
        ("GET", "/api/v1/pods", "404"),
        ("GET", "/api/v1/namespaces/default/services/missing", "404"),
        ("GET", "/api/v1/services?watch=maybe", "400"),
    ] {
        let response = raw_request(addr, method, path);
        assert!(response.starts_with(&format!("HTTP/1.1 {code} ")), "{method} {path}: {response}");
        assert!(response.contains(r#""kind":"Status","#) && response.contains(&format!(r#""code":{code}"#)));
    }
}

#[tokio::test]
async fn stop_and_listen_again() {
    let (server, addr) = populated();
    let api: Api<Service> = Api::all(client(addr).await);
    let mut events = watcher(api.clone(), watcher::Config::default()).default_backoff().boxed();
    assert_eq!(initial(&mut events).await.len(), 4);
    server.apply(service("default", "a", "10.0.0.5", &[]));
    assert_eq!(step(&mut events).await, "Apply a");

    // Down: connections refused, the open watch ends and re-watching fails.
    server.stop_listening();
    let refused = TcpStream::connect(addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(api.list(&ListParams::default()).await.is_err());
    let event = timeout(DEADLINE, events.next()).await.expect("event within the deadline").unwrap();
    assert!(event.is_err(), "{event:?}");
    server.apply(service("default", "b", "10.0.0.6", &[]));

    // Up again on the same port, with the same store: the watcher catches up.
    assert_eq!(server.listen(None, addr.port()).unwrap(), addr);
    assert_eq!(names(api.list(&ListParams::default()).await.unwrap()).len(), 6);
    loop {
        let event = timeout(DEADLINE, events.next()).await.expect("event within the deadline").unwrap();
        if event.is_ok_and(|e| describe(e) == "Apply b") {
            break;
        }
    }

    drop(server);
    assert!(TcpStream::connect(addr).is_err());
}
