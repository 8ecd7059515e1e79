//! A small in-process Kubernetes API server for the integration tests.
//!
//! It serves the three resources the xlb agent watches (Services, EndpointSlices, Nodes) with
//! the real list/watch protocol: resourceVersions, label and field selectors, bookmarks and
//! 410 Gone after compaction. Tests can so run the real agent and kube-runtime watcher against
//! it, and provoke what a real cluster shows only rarely: the API going down, watches dropped
//! by the server, expired watch history.
//!
//! It runs its own tokio runtime so that sync and async tests alike can drive it, and it can
//! listen on loopback inside any network namespace of the test cluster.
use std::{
    any::TypeId,
    collections::BTreeMap,
    convert::Infallible,
    fmt::Display,
    net::{Ipv4Addr, SocketAddr},
    sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use axum::{
    body::Body,
    extract::{Query, State},
    http::{header, HeaderValue, Method, StatusCode, Uri},
    response::Response,
    Router,
};
use futures::{channel::mpsc, future, stream, FutureExt as _, StreamExt as _};
use k8s_openapi::{
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
    ListableResource, Metadata, NamespaceResourceScope,
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::{runtime::Runtime, sync::oneshot};

/// A kind the server stores: implemented for Service, EndpointSlice and Node.
pub trait Stored: ListableResource<Scope: 'static> + Metadata<Ty = ObjectMeta> + Serialize + 'static {
    /// Field-selector fields the real apiserver supports for this kind besides
    /// `metadata.name` and `metadata.namespace`.
    const FIELDS: &'static [&'static str] = &[];

    /// This object's values of `FIELDS`, in order.
    fn fields(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Stored for Service {
    const FIELDS: &'static [&'static str] = &["spec.clusterIP", "spec.type"];

    /// A missing `spec.type` counts as ClusterIP, the default the real server fills in.
    fn fields(&self) -> Vec<String> {
        let spec = self.spec.as_ref();
        vec![
            spec.and_then(|s| s.cluster_ip.clone()).unwrap_or_default(),
            spec.and_then(|s| s.type_.clone()).unwrap_or_else(|| "ClusterIP".into()),
        ]
    }
}

impl Stored for EndpointSlice {}

impl Stored for Node {}

/// A Node named `name` with InternalIP `ip`: what an agent needs of its own Node.
pub fn node_object(name: &str, ip: Ipv4Addr) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip.to_string()}]},
    }))
    .expect("a valid Node")
}

/// The API server: a store of objects, its change history and the watches on it, served
/// by any number of listeners. Clones share everything; dropping the last one stops it all.
#[derive(Clone)]
pub struct ApiServer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Taken on drop, to shut down without blocking (drops may happen in async tests).
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    listeners: Mutex<Vec<Listening>>,
}

/// A running listener: dropping `stop` begins a graceful shutdown, and `done` disconnects
/// once the listener and all its connections are closed.
struct Listening {
    stop: oneshot::Sender<()>,
    done: std_mpsc::Receiver<()>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// Starts the server's own background tokio runtime (a thread); nothing listens yet.
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("apiserver")
            .enable_all()
            .build()
            .expect("building the apiserver runtime");
        let shared = Arc::new(Shared::default());
        let ticker = shared.clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                ticker.bookmark();
            }
        });
        let inner = Inner { runtime: Some(runtime), shared, listeners: Mutex::default() };
        Self { inner: Arc::new(inner) }
    }

    /// Serves on 127.0.0.1:`port` (0 = any) inside the network namespace /run/netns/`netns`
    /// (None: the caller's namespace), returning the bound address. May be called for several
    /// namespaces; every listener serves the same store.
    ///
    /// The socket is created by a thread that entered the namespace; a socket stays in the
    /// namespace it was created in, so the runtime can serve it from its own thread.
    pub fn listen(&self, netns: Option<&str>, port: u16) -> anyhow::Result<SocketAddr> {
        let bind = move || std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port));
        let listener = match netns {
            Some(ns) => crate::netns::within(ns, bind)?,
            None => bind(),
        };
        let listener = listener.with_context(|| format!("binding 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = self.inner.runtime.as_ref().expect("runtime lives as long as the server");
        let listener = {
            let _in_runtime = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (stop, stopped) = oneshot::channel();
        let (served_out, done) = std_mpsc::channel();
        let app = Router::new().fallback(handle).with_state(self.inner.shared.clone());
        self.inner.shared.store().down = false;
        runtime.spawn(async move {
            let _served_out = served_out;
            let graceful = async {
                let _ = stopped.await;
            };
            let _ = axum::serve(listener, app).with_graceful_shutdown(graceful).await;
        });
        lock(&self.inner.listeners).push(Listening { stop, done });
        Ok(addr)
    }

    /// API down: closes every listener and every open connection and watch, returning once
    /// they are closed (at most a few seconds). `listen` may be called again later.
    pub fn stop_listening(&self) {
        self.inner.stop();
    }

    /// Creates or replaces `object`, notifies the watches and returns the stored object.
    ///
    /// Like the real server it assigns metadata.resourceVersion (one global counter), and on
    /// create uid and creationTimestamp (kept on update); namespaced kinds default to the
    /// "default" namespace. Panics without metadata.name.
    pub fn apply<K: Stored>(&self, mut object: K) -> K {
        let kind = Kind::of::<K>();
        let mut store = self.inner.shared.store();
        store.rv += 1;
        let rv = store.rv;
        let meta = object.metadata_mut();
        let name = meta.name.clone().expect("apply: object without metadata.name");
        if kind.namespaced {
            meta.namespace.get_or_insert_with(|| "default".into());
        } else {
            meta.namespace = None;
        }
        let key = (kind.kind, meta.namespace.clone().unwrap_or_default(), name);
        let before = store.objects.get(&key).cloned();
        meta.resource_version = Some(rv.to_string());
        match &before {
            Some(old) => {
                meta.uid.clone_from(&old.meta.uid);
                meta.creation_timestamp.clone_from(&old.meta.creation_timestamp);
            }
            None => {
                meta.uid = Some(format!("00000000-0000-4000-8000-{rv:012x}"));
                let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                let now = Timestamp::from_second(now.as_secs() as i64).expect("the clock is sane");
                meta.creation_timestamp = Some(Time(now));
            }
        }
        let after = Arc::new(Obj {
            meta: object.metadata().clone(),
            fields: object.fields(),
            json: serde_json::to_value(&object).expect("k8s-openapi objects serialize"),
        });
        store.objects.insert(key, after.clone());
        store.record(Change { rv, kind: kind.kind, before, after: Some(after) });
        object
    }

    /// Deletes an object, sending DELETED with a new resourceVersion to the watches. Returns
    /// whether it existed. `namespace` defaults to "default" and is ignored for Nodes.
    pub fn delete<K: Stored>(&self, namespace: Option<&str>, name: &str) -> bool {
        let kind = Kind::of::<K>();
        let namespace = if kind.namespaced { namespace.unwrap_or("default") } else { "" };
        let mut store = self.inner.shared.store();
        let Some(old) = store.objects.remove(&(kind.kind, namespace.into(), name.into())) else {
            return false;
        };
        store.rv += 1;
        let rv = store.rv;
        let mut gone = Obj::clone(&old);
        gone.meta.resource_version = Some(rv.to_string());
        gone.json["metadata"]["resourceVersion"] = rv.to_string().into();
        store.record(Change { rv, kind: kind.kind, before: Some(Arc::new(gone)), after: None });
        true
    }

    /// Ends every open watch stream cleanly (clients see the end of the stream and re-watch
    /// from their last resourceVersion) without closing listeners.
    pub fn drop_watches(&self) {
        self.inner.shared.store().watches.clear();
    }

    /// Forgets the event history and ends the open watches: re-watching from any
    /// resourceVersion handed out so far gets 410 Gone ("Expired"), so clients must re-list.
    ///
    /// The counter advances so that this holds even for a client already at the newest
    /// resourceVersion: every client re-lists, not only those that raced with a change.
    pub fn compact(&self) {
        let mut store = self.inner.shared.store();
        store.rv += 1;
        store.compacted = store.rv;
        store.history.clear();
        store.watches.clear();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that asked for bookmarks
    /// (also done every second).
    pub fn bookmark(&self) {
        self.inner.shared.bookmark();
    }

    /// Every request served so far, as "METHOD path?query" with the query decoded (for
    /// example `GET /api/v1/services?limit=500&labelSelector=!a`).
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner.shared.requests).clone()
    }

    /// A kubeconfig with one cluster (server http://`addr`), user and context.
    pub fn kubeconfig(addr: SocketAddr) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: xlb-test
  cluster:
    server: http://{addr}
users:
- name: xlb-test
  user: {{}}
contexts:
- name: xlb-test
  context:
    cluster: xlb-test
    user: xlb-test
current-context: xlb-test
"
        )
    }
}

impl Inner {
    fn stop(&self) {
        {
            let mut store = self.shared.store();
            store.down = true;
            store.watches.clear();
        }
        let listeners = std::mem::take(&mut *lock(&self.listeners));
        let (stops, dones): (Vec<_>, Vec<_>) = listeners.into_iter().map(|l| (l.stop, l.done)).unzip();
        drop(stops);
        for done in dones {
            // Disconnected once served out; the timeout only guards against a stuck client.
            let _ = done.recv_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the HTTP side needs to know of a stored kind.
#[derive(Clone, Copy)]
struct Kind {
    kind: &'static str,
    api_version: &'static str,
    plural: &'static str,
    namespaced: bool,
    fields: &'static [&'static str],
}

impl Kind {
    fn of<K: Stored>() -> Self {
        Kind {
            kind: K::KIND,
            api_version: K::API_VERSION,
            plural: K::URL_PATH_SEGMENT,
            namespaced: TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>(),
            fields: K::FIELDS,
        }
    }

    fn all() -> [Self; 3] {
        [Self::of::<Service>(), Self::of::<EndpointSlice>(), Self::of::<Node>()]
    }
}

/// One stored object, in the forms requests need.
#[derive(Clone)]
struct Obj {
    meta: ObjectMeta,
    /// Values of the kind's extra selectable fields (`Kind::fields`).
    fields: Vec<String>,
    /// The object as served, with apiVersion and kind.
    json: Value,
}

/// One recorded change. `before` and `after` let each watch tell whether an update entered
/// its selection (ADDED), left it (DELETED) or stayed in it (MODIFIED). A deletion has no
/// `after`, and its `before` carries the deletion's resourceVersion.
struct Change {
    rv: u64,
    kind: &'static str,
    before: Option<Arc<Obj>>,
    after: Option<Arc<Obj>>,
}

enum Msg {
    Change(Arc<Change>),
    Bookmark(u64),
}

/// The sending end of an open watch; dropping it ends the client's stream.
struct Watch {
    kind: &'static str,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Msg>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches from a resourceVersion below this get 410 Gone: their history is forgotten.
    compacted: u64,
    /// By (kind, namespace or "", name).
    objects: BTreeMap<(&'static str, String, String), Arc<Obj>>,
    history: Vec<Arc<Change>>,
    watches: Vec<Watch>,
    /// Set while stopped, so that a watch racing with `stop_listening` is not kept open.
    down: bool,
}

impl Store {
    fn record(&mut self, change: Change) {
        let change = Arc::new(change);
        self.watches
            .retain(|w| w.kind != change.kind || w.tx.unbounded_send(Msg::Change(change.clone())).is_ok());
        self.history.push(change);
    }
}

#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    requests: Mutex<Vec<String>>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }

    /// Also forgets watches whose client has gone.
    fn bookmark(&self) {
        let mut store = self.store();
        let rv = store.rv;
        store.watches.retain(|w| {
            !w.tx.is_closed() && (!w.bookmarks || w.tx.unbounded_send(Msg::Bookmark(rv)).is_ok())
        });
    }
}

async fn handle(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    let pairs = Query::<Vec<(String, String)>>::try_from_uri(&uri).map(|q| q.0);
    let query = match &pairs {
        Ok(pairs) => pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"),
        Err(_) => uri.query().unwrap_or_default().to_string(),
    };
    let separator = if query.is_empty() { "" } else { "?" };
    lock(&shared.requests).push(format!("{method} {}{separator}{query}", uri.path()));
    let reply = if method != Method::GET {
        Err(Failure::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported"),
        ))
    } else {
        pairs.map_err(Failure::bad_request).and_then(|pairs| serve(&shared, uri.path(), pairs))
    };
    reply.unwrap_or_else(|failure| respond(failure.code, failure.status().to_string()))
}

fn serve(shared: &Shared, path: &str, pairs: Vec<(String, String)>) -> Result<Response, Failure> {
    let not_found = |message: String| Failure::new(StatusCode::NOT_FOUND, "NotFound", message);
    let (kind, namespace, name) =
        route(path).ok_or_else(|| not_found("the server could not find the requested resource".into()))?;
    if let Some(name) = name {
        let store = shared.store();
        let obj = store.objects.get(&(kind.kind, namespace.unwrap_or_default().into(), name.into()));
        let obj = obj.ok_or_else(|| not_found(format!("{} {name:?} not found", kind.plural)))?;
        return Ok(respond(StatusCode::OK, obj.json.to_string()));
    }
    let params = Params::parse(pairs)?;
    let selector =
        Selector::parse(kind, namespace, &params.labels, &params.fields).map_err(Failure::bad_request)?;
    if params.watch {
        return Ok(watch(shared, kind, selector, &params));
    }
    let store = shared.store();
    if let Some(rv) = params.resource_version.filter(|rv| params.exact && *rv != store.rv) {
        return Err(Failure::expired(format!("resourceVersion {rv} is not the current {}", store.rv)));
    }
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((k, _, _), obj)| *k == kind.kind && selector.matches(obj))
        .map(|(_, obj)| &obj.json)
        .collect();
    let list = json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": kind.api_version,
        "metadata": {"resourceVersion": store.rv.to_string()},
        "items": items,
    });
    Ok(respond(StatusCode::OK, list.to_string()))
}

/// Parses `/api/v1/[namespaces/NS/]PLURAL[/NAME]` and `/apis/GROUP/VERSION/...` into the
/// kind, namespace and name.
fn route(path: &str) -> Option<(Kind, Option<&str>, Option<&str>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ((*version).to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", namespace, plural] => (Some(*namespace), *plural, None),
        ["namespaces", namespace, plural, name] => (Some(*namespace), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => return None,
    };
    let kind = Kind::all().into_iter().find(|k| k.api_version == api_version && k.plural == plural)?;
    // Nodes have no namespace; a namespaced object is only addressed within its namespace.
    let addressable = if name.is_some() {
        kind.namespaced == namespace.is_some()
    } else {
        kind.namespaced || namespace.is_none()
    };
    addressable.then_some((kind, namespace, name))
}

/// The query parameters honoured; others (limit, continue, ...) are ignored: lists come
/// in one piece.
#[derive(Default)]
struct Params {
    watch: bool,
    /// None for "", "0" or absent: the current state.
    resource_version: Option<u64>,
    /// resourceVersionMatch=Exact.
    exact: bool,
    labels: String,
    fields: String,
    bookmarks: bool,
    /// sendInitialEvents=true: a streaming list (kube's `streaming_lists()`).
    initial_events: bool,
    timeout: Option<Duration>,
}

impl Params {
    fn parse(pairs: Vec<(String, String)>) -> Result<Self, Failure> {
        let bad = |key: &str, value: &str| Failure::bad_request(format!("invalid {key}: {value:?}"));
        let flag = |key: &str, value: &str| match value {
            "true" | "1" => Ok(true),
            "false" | "0" | "" => Ok(false),
            _ => Err(bad(key, value)),
        };
        let mut params = Params::default();
        for (key, value) in pairs {
            match key.as_str() {
                "watch" => params.watch = flag(&key, &value)?,
                "allowWatchBookmarks" => params.bookmarks = flag(&key, &value)?,
                "sendInitialEvents" => params.initial_events = flag(&key, &value)?,
                "resourceVersion" if value.is_empty() || value == "0" => params.resource_version = None,
                "resourceVersion" => {
                    params.resource_version = Some(value.parse().map_err(|_| bad(&key, &value))?)
                }
                "resourceVersionMatch" => params.exact = value == "Exact",
                "labelSelector" => params.labels = value,
                "fieldSelector" => params.fields = value,
                "timeoutSeconds" => {
                    params.timeout = Some(Duration::from_secs(value.parse().map_err(|_| bad(&key, &value))?))
                }
                _ => {}
            }
        }
        Ok(params)
    }
}

/// Answers a watch: the events since the requested resourceVersion (or the current objects
/// as ADDED), then live events until the client goes, the server ends the watch or
/// `timeoutSeconds` passes. Computed and registered under one lock: no gap, no duplicate.
fn watch(shared: &Shared, kind: Kind, selector: Selector, params: &Params) -> Response {
    let mut store = shared.store();
    let mut lines = Vec::new();
    let mut live = !store.down;
    match params.resource_version {
        Some(rv) if !params.initial_events => {
            if rv < store.compacted {
                let gone = Failure::expired(format!("too old resource version: {rv} ({})", store.compacted));
                lines.push(event_line("ERROR", &gone.status()));
                live = false;
            } else {
                let since = store.history.iter().filter(|c| c.rv > rv && c.kind == kind.kind);
                lines.extend(since.filter_map(|c| selector.event(c)));
            }
        }
        _ => {
            let current =
                store.objects.iter().filter(|((k, _, _), obj)| *k == kind.kind && selector.matches(obj));
            lines.extend(current.map(|(_, obj)| event_line("ADDED", &obj.json)));
            if params.initial_events {
                lines.push(bookmark_line(kind, store.rv, true));
            }
        }
    }
    let (tx, rx) = mpsc::unbounded();
    if live {
        store.watches.push(Watch { kind: kind.kind, bookmarks: params.bookmarks, tx });
    }
    drop(store);
    let live = rx.filter_map(move |msg| {
        future::ready(match msg {
            Msg::Change(change) => selector.event(&change),
            Msg::Bookmark(rv) => Some(bookmark_line(kind, rv, false)),
        })
    });
    let deadline = match params.timeout {
        Some(timeout) => tokio::time::sleep(timeout).boxed(),
        None => future::pending().boxed(),
    };
    let events = stream::iter(lines).chain(live).take_until(deadline);
    respond(StatusCode::OK, Body::from_stream(events.map(Ok::<_, Infallible>)))
}

fn event_line(kind: &str, object: &Value) -> String {
    format!("{{\"type\":\"{kind}\",\"object\":{object}}}\n")
}

/// A BOOKMARK: an object of the watched kind with only metadata.resourceVersion (and the
/// annotation that ends the initial events of a streaming list).
fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> String {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({"kind": kind.kind, "apiVersion": kind.api_version, "metadata": metadata});
    event_line("BOOKMARK", &object)
}

/// A parsed labelSelector and fieldSelector, plus the namespace of a namespaced URL.
struct Selector {
    namespace: Option<String>,
    labels: Vec<Label>,
    fields: Vec<FieldIs>,
}

enum Label {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// `field` == `value`, or != when `equal` is false.
struct FieldIs {
    field: Field,
    value: String,
    equal: bool,
}

enum Field {
    Name,
    Namespace,
    /// Index into `Kind::fields`.
    Extra(usize),
}

impl Selector {
    fn parse(kind: Kind, namespace: Option<&str>, labels: &str, fields: &str) -> Result<Self, String> {
        let labels = split_requirements(labels).map(parse_label).collect::<Result<_, _>>()?;
        let fields = fields.split(',').map(str::trim).filter(|r| !r.is_empty());
        let fields = fields.map(|r| parse_field(kind, r)).collect::<Result<_, _>>()?;
        Ok(Selector { namespace: namespace.map(str::to_string), labels, fields })
    }

    fn matches(&self, obj: &Obj) -> bool {
        let meta = &obj.meta;
        let labels = meta.labels.clone().unwrap_or_default();
        self.namespace.as_ref().is_none_or(|ns| meta.namespace.as_ref() == Some(ns))
            && self.labels.iter().all(|label| match label {
                Label::Exists(key) => labels.contains_key(key),
                Label::NotExists(key) => !labels.contains_key(key),
                Label::In(key, values) => labels.get(key).is_some_and(|v| values.contains(v)),
                Label::NotIn(key, values) => labels.get(key).is_none_or(|v| !values.contains(v)),
            })
            && self.fields.iter().all(|f| {
                let actual = match f.field {
                    Field::Name => meta.name.as_deref(),
                    Field::Namespace => meta.namespace.as_deref(),
                    Field::Extra(i) => obj.fields.get(i).map(String::as_str),
                };
                (actual.unwrap_or_default() == f.value) == f.equal
            })
    }

    /// The event line this watch gets for `change`, if any.
    fn event(&self, change: &Change) -> Option<String> {
        let was = change.before.as_deref().is_some_and(|obj| self.matches(obj));
        let (kind, obj) = match change.after.as_deref() {
            Some(obj) if self.matches(obj) => (if was { "MODIFIED" } else { "ADDED" }, obj),
            Some(obj) => (was.then_some("DELETED")?, obj),
            None => (was.then_some("DELETED")?, change.before.as_deref()?),
        };
        Some(event_line(kind, &obj.json))
    }
}

/// Splits a label selector at the commas outside `in (...)` value lists.
fn split_requirements(selector: &str) -> impl Iterator<Item = &str> {
    let mut depth = 0;
    selector
        .split(move |c| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map(str::trim)
        .filter(|r| !r.is_empty())
}

fn parse_label(requirement: &str) -> Result<Label, String> {
    let bad = || format!("unable to parse requirement: {requirement:?}");
    let key = |key: &str| {
        let key = key.trim();
        let valid = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        valid.then(|| key.to_string()).ok_or_else(bad)
    };
    let value = |value: &str| {
        let value = value.trim();
        let valid = value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        valid.then(|| value.to_string()).ok_or_else(bad)
    };
    if let Some(k) = requirement.strip_prefix('!') {
        return Ok(Label::NotExists(key(k)?));
    }
    if let Some((left, values)) = requirement.split_once('(') {
        let values = values.strip_suffix(')').ok_or_else(bad)?;
        let values = values.split(',').map(value).collect::<Result<Vec<_>, _>>()?;
        return match left.trim().rsplit_once(char::is_whitespace).ok_or_else(bad)? {
            (k, "in") => Ok(Label::In(key(k)?, values)),
            (k, "notin") => Ok(Label::NotIn(key(k)?, values)),
            _ => Err(bad()),
        };
    }
    if let Some((k, v)) = requirement.split_once("!=") {
        return Ok(Label::NotIn(key(k)?, vec![value(v)?]));
    }
    if let Some((k, v)) = requirement.split_once("==").or_else(|| requirement.split_once('=')) {
        return Ok(Label::In(key(k)?, vec![value(v)?]));
    }
    Ok(Label::Exists(key(requirement)?))
}

fn parse_field(kind: Kind, requirement: &str) -> Result<FieldIs, String> {
    let (name, value, equal) = if let Some((name, value)) = requirement.split_once("!=") {
        (name, value, false)
    } else if let Some((name, value)) = requirement.split_once("==").or_else(|| requirement.split_once('=')) {
        (name, value, true)
    } else {
        return Err(format!("invalid selector: {requirement:?}"));
    };
    let field = match name.trim() {
        "metadata.name" => Field::Name,
        "metadata.namespace" => Field::Namespace,
        other => Field::Extra(
            kind.fields
                .iter()
                .position(|f| *f == other)
                .ok_or_else(|| format!("field label not supported: {other}"))?,
        ),
    };
    Ok(FieldIs { field, value: value.trim().to_string(), equal })
}

/// An error answer, sent as a metav1 Status like the real server's.
struct Failure {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(code: StatusCode, reason: &'static str, message: impl Display) -> Self {
        Failure { code, reason, message: message.to_string() }
    }

    fn bad_request(message: impl Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }

    /// 410 Gone: the requested resourceVersion is no longer available.
    fn expired(message: impl Display) -> Self {
        Self::new(StatusCode::GONE, "Expired", message)
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code.as_u16(),
        })
    }
}

fn respond(code: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
