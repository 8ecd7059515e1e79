//! The Kubernetes API source: watches of Services, EndpointSlices and this node's Node,
//! filtered on the server as kube-proxy filters them, fed into the shared store.
//!
//! Each watch lists, then follows from the listed resourceVersion; kube's watcher re-watches
//! after a dropped connection and re-lists after `410 Gone`, with exponential backoff while
//! the API server is unreachable. A re-list replaces the objects of its kind in the store, so
//! the next sync writes only what really changed: no flush.
use std::{fmt::Debug, sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    serde::de::DeserializeOwned,
};
use kube::{
    api::ListParams,
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource,
};

use crate::{
    model::{object_key, Kind, Object, Rejected, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME},
    sources::Shared,
};

/// Where API objects come from, in messages.
const ORIGIN: &str = "API";

/// How often a lost API server is probed.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// kube-proxy's informer filter (cmd/kube-proxy/app/server.go): Services of other proxies
/// and headless EndpointSlices are never sent to the node.
pub fn label_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

/// Headless Services have nothing to program.
pub const SERVICE_FIELD_SELECTOR: &str = "spec.clusterIP!=None";

/// What to do with an object the store rejected: log it, count it.
pub type OnRejected = Arc<dyn Fn(&Rejected) + Send + Sync>;

const KINDS: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];

/// Registers the three kinds as sources at once, before the sync loop can run, so it never
/// writes a store they have not filled yet; the future follows them until the process ends.
pub fn watch(
    client: Client,
    node_name: String,
    shared: Arc<Shared>,
    on_rejected: OnRejected,
) -> impl std::future::Future<Output = ()> {
    for kind in KINDS {
        shared.register(kind.as_str());
    }
    async move { follow_all(client, &node_name, shared, on_rejected).await }
}

/// The watches of Services, EndpointSlices and this node's Node: Services and slices with
/// kube-proxy's label selector (one for both, as its informer factory), headless Services
/// also left out by their clusterIP.
fn watch_configs(node_name: &str) -> [watcher::Config; 3] {
    let labels = label_selector();
    [
        watcher::Config::default().labels(&labels).fields(SERVICE_FIELD_SELECTOR),
        watcher::Config::default().labels(&labels),
        watcher::Config::default().fields(&node_field(node_name)),
    ]
}

fn node_field(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

async fn follow_all(client: Client, node_name: &str, shared: Arc<Shared>, on_rejected: OnRejected) {
    let [services, slices, node] = watch_configs(node_name);
    let node_field = node_field(node_name);
    tokio::join!(
        follow(Api::<Service>::all(client.clone()), services, Kind::Service, &shared, &on_rejected),
        follow(Api::<EndpointSlice>::all(client.clone()), slices, Kind::EndpointSlice, &shared, &on_rejected),
        follow(Api::<Node>::all(client.clone()), node, Kind::Node, &shared, &on_rejected),
        probe(Api::<Node>::all(client), &node_field, &shared),
    );
}

/// After a watch failed, the watcher resumes silently once the API server is back (no event
/// unless something changed). A small list of our own Node tells when it is back, so the
/// agent reports healthy again.
async fn probe(api: Api<Node>, node_field: &str, shared: &Shared) {
    let params = ListParams::default().fields(node_field).limit(1);
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    loop {
        every.tick().await;
        if !shared.all_connected() && api.list(&params).await.is_ok() {
            for kind in KINDS {
                shared.connected(kind.as_str(), true);
            }
        }
    }
}

/// An API object as the store takes it.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {
    fn into_object(self) -> Object;
}

impl Watched for Service {
    fn into_object(self) -> Object {
        Object::Service(Box::new(self))
    }
}

impl Watched for EndpointSlice {
    fn into_object(self) -> Object {
        Object::EndpointSlice(Box::new(self))
    }
}

impl Watched for Node {
    fn into_object(self) -> Object {
        Object::Node(Box::new(self))
    }
}

async fn follow<K: Watched>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    shared: &Shared,
    on_rejected: &OnRejected,
) {
    let source = kind.as_str();
    let mut events = watcher(api, config).default_backoff().boxed();
    // A listing in progress, applied as a whole once complete.
    let mut listing: Vec<Object> = Vec::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(kind = source, %error, "watch failed; retrying with backoff");
                shared.connected(source, false);
                continue;
            }
        };
        match event {
            watcher::Event::Init => listing.clear(),
            watcher::Event::InitApply(object) => listing.push(object.into_object()),
            watcher::Event::InitDone => {
                let objects = std::mem::take(&mut listing);
                let rejected =
                    shared.update(|store| store.replace_kind(kind, objects.iter().map(|o| (o, ORIGIN))));
                rejected.iter().for_each(|r| on_rejected(r));
                tracing::info!(kind = source, objects = objects.len(), "listed");
                shared.listed(source);
            }
            watcher::Event::Apply(object) => {
                shared.connected(source, true);
                let object = object.into_object();
                if let Err(rejected) = shared.update(|store| store.apply(&object, ORIGIN)) {
                    on_rejected(&rejected);
                }
            }
            watcher::Event::Delete(object) => {
                shared.connected(source, true);
                if let Some(key) = object_key(&object.into_object()) {
                    shared.update(|store| store.delete(&key));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kube-proxy's informers (cmd/kube-proxy/app/server.go) list Services and EndpointSlices
    /// with one selector, `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`:
    /// a Service labelled headless is never seen, whatever its clusterIP.
    #[test]
    fn services_and_slices_are_watched_with_kube_proxys_label_selector() {
        let [services, slices, node] = watch_configs("node-a");
        let selector = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
        assert_eq!(services.label_selector.as_deref(), Some(selector));
        assert_eq!(slices.label_selector.as_deref(), Some(selector));
        assert_eq!(services.field_selector.as_deref(), Some("spec.clusterIP!=None"));
        assert_eq!(slices.field_selector, None);
        assert_eq!(node.label_selector, None);
        assert_eq!(node.field_selector.as_deref(), Some("metadata.name=node-a"));
    }
}
