//! The manifest directory source: ordinary Kubernetes YAML as `kubectl get -o yaml` writes
//! it (multi-document files, `kind: List`), read into k8s-openapi types.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

use crate::model::{NamespacedName, Object, ObjectKey};

/// A document that is YAML but not a valid object of a kind xlb reads.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{object}: {field}: {message}")]
pub struct DocumentError {
    /// "Service default/kiada".
    pub object: String,
    /// Path of the offending field, e.g. `spec.ports[0].port`.
    pub field: String,
    pub message: String,
    /// The object's store key, when the document names it.
    pub key: Option<ObjectKey>,
}

/// The objects of one file, or why the file as a whole could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not valid YAML: {0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

#[derive(Debug, Default)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub errors: Vec<DocumentError>,
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, k| v.get(*k))?.as_str()
}

fn typed<T: DeserializeOwned>(
    value: Value,
    kind: &str,
    key: Option<ObjectKey>,
    object: String,
) -> Result<T, Box<DocumentError>> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| {
            let field = e.path().to_string();
            Box::new(DocumentError { object, field, message: e.into_inner().to_string(), key })
        })
        .inspect_err(|e| tracing::debug!(kind, error = %e, "document rejected"))
}

fn add_document(value: Value, parsed: &mut ParsedFile) {
    if value.is_null() {
        return;
    }
    let kind = str_at(&value, &["kind"]).unwrap_or("").to_string();
    if kind == "List" {
        if let Some(Value::Sequence(items)) = value.get("items") {
            for item in items.clone() {
                add_document(item, parsed);
            }
        }
        return;
    }
    let name = str_at(&value, &["metadata", "name"]).map(str::to_string);
    let namespace = str_at(&value, &["metadata", "namespace"]).unwrap_or("default").to_string();
    let id = name.clone().map(|name| NamespacedName { namespace: namespace.clone(), name });
    let (key, object) = match kind.as_str() {
        "Service" => (
            id.map(ObjectKey::Service),
            format!("Service {namespace}/{}", name.as_deref().unwrap_or("<unnamed>")),
        ),
        "EndpointSlice" => (
            id.map(ObjectKey::EndpointSlice),
            format!("EndpointSlice {namespace}/{}", name.as_deref().unwrap_or("<unnamed>")),
        ),
        "Node" => {
            (name.clone().map(ObjectKey::Node), format!("Node {}", name.as_deref().unwrap_or("<unnamed>")))
        }
        // Deployments, Pods and the rest of an application's manifests: not ours.
        _ => return,
    };
    let result = match kind.as_str() {
        "Service" => typed(value, &kind, key, object).map(|o| Object::Service(Box::new(o))),
        "EndpointSlice" => typed(value, &kind, key, object).map(|o| Object::EndpointSlice(Box::new(o))),
        _ => typed(value, &kind, key, object).map(|o| Object::Node(Box::new(o))),
    };
    match result {
        Ok(object) => parsed.objects.push(object),
        Err(e) => parsed.errors.push(*e),
    }
}

/// Parses every document of a YAML text. A YAML syntax error makes the whole text
/// unreadable: what follows it cannot be trusted.
pub fn parse_str(text: &str) -> Result<ParsedFile, FileError> {
    let mut values = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        values.push(<Value as serde::Deserialize>::deserialize(doc)?);
    }
    let mut parsed = ParsedFile::default();
    for value in values {
        add_document(value, &mut parsed);
    }
    Ok(parsed)
}

/// One reading of the whole directory.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every object read, with the file it came from.
    pub objects: Vec<(Object, String)>,
    /// Objects that were there before but could not be read this time: keep their last
    /// good version.
    pub unreadable: Vec<ObjectKey>,
    /// One line per problem: file, object, field, reason.
    pub errors: Vec<String>,
}

/// A directory of manifests, remembering which objects each file held when last readable.
pub struct ManifestDir {
    dir: PathBuf,
    last_good: HashMap<PathBuf, Vec<ObjectKey>>,
}

fn is_manifest(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str());
    !hidden && matches!(ext, Some("yaml" | "yml" | "json")) && path.is_file()
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), last_good: HashMap::new() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every manifest file (not recursive, like `kubectl apply -f DIR`).
    pub fn scan(&mut self) -> Scan {
        let mut scan = Scan::default();
        let mut files: Vec<PathBuf> = match fs::read_dir(&self.dir) {
            Ok(entries) => {
                entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect()
            }
            Err(e) => {
                scan.errors.push(format!("{}: cannot read directory: {e}", self.dir.display()));
                scan.unreadable = self.last_good.values().flatten().cloned().collect();
                return scan;
            }
        };
        files.sort();
        let mut last_good = HashMap::new();
        for path in files {
            let origin = path.display().to_string();
            match fs::read_to_string(&path).map_err(FileError::from).and_then(|t| parse_str(&t)) {
                Ok(parsed) => {
                    let mut keys: Vec<ObjectKey> =
                        parsed.objects.iter().filter_map(crate::model::object_key).collect();
                    for e in parsed.errors {
                        scan.errors.push(format!("{origin}: {e}"));
                        scan.unreadable.extend(e.key.clone());
                        keys.extend(e.key);
                    }
                    scan.objects.extend(parsed.objects.into_iter().map(|o| (o, origin.clone())));
                    last_good.insert(path, keys);
                }
                Err(e) => {
                    scan.errors.push(format!("{origin}: {e}"));
                    if let Some(keys) = self.last_good.get(&path) {
                        scan.unreadable.extend(keys.iter().cloned());
                        last_good.insert(path, keys.clone());
                    }
                }
            }
        }
        self.last_good = last_good;
        scan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
";
    const NODE: &str = "apiVersion: v1
kind: Node
metadata:
  name: node-a
";
    const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
";

    fn svc_key(ns: &str, name: &str) -> ObjectKey {
        ObjectKey::Service(NamespacedName { namespace: ns.into(), name: name.into() })
    }

    fn keys(parsed: &ParsedFile) -> Vec<ObjectKey> {
        parsed.objects.iter().map(|o| crate::model::object_key(o).unwrap()).collect()
    }

    #[test]
    fn multi_document_file_reads_service_slice_and_node_and_ignores_deployment() {
        let text = [SERVICE, SLICE, DEPLOYMENT, NODE].join("---\n");
        let parsed = parse_str(&text).unwrap();
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(
            keys(&parsed),
            vec![
                svc_key("default", "web"),
                ObjectKey::EndpointSlice(NamespacedName { namespace: "shop".into(), name: "web-abc".into() }),
                ObjectKey::Node("node-a".into()),
            ]
        );
        let Object::Service(svc) = &parsed.objects[0] else {
            panic!("not a Service: {:?}", parsed.objects[0])
        };
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.ports.as_ref().unwrap()[0].port, 80);
        let Object::EndpointSlice(slice) = &parsed.objects[1] else { panic!("not a slice") };
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(slice.endpoints[0].addresses, vec!["10.244.1.5".to_string()]);
    }

    #[test]
    fn list_kind_yields_its_items() {
        let indent = |doc: &str| doc.lines().map(|l| format!("  {l}\n")).collect::<String>();
        let text = format!(
            "apiVersion: v1\nkind: List\nitems:\n-\n{}-\n{}-\n{}",
            indent(SERVICE),
            indent(DEPLOYMENT),
            indent(NODE)
        );
        let parsed = parse_str(&text).unwrap();
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(keys(&parsed), vec![svc_key("default", "web"), ObjectKey::Node("node-a".into())]);
    }

    #[test]
    fn empty_documents_are_skipped() {
        assert_eq!(parse_str("").unwrap().objects.len(), 0);
        assert_eq!(parse_str("---\n---\n# only a comment\n").unwrap().objects.len(), 0);
        let parsed = parse_str(&format!("---\n---\n{SERVICE}---\n---\n")).unwrap();
        assert_eq!(parsed.errors, vec![]);
        assert_eq!(keys(&parsed), vec![svc_key("default", "web")]);
    }

    #[test]
    fn yaml_syntax_error_makes_the_whole_file_an_error() {
        let text = format!("{SERVICE}---\n{NODE}---\nkind: Service\nmetadata: {{name: [broken\n");
        match parse_str(&text) {
            Err(FileError::Yaml(_)) => {}
            other => panic!("expected a YAML error, got {other:?}"),
        }
    }

    #[test]
    fn typed_error_names_object_field_and_key_while_other_documents_still_read() {
        let bad = SERVICE.replace("name: web", "name: broken").replace("port: 80", "port: eighty");
        let parsed = parse_str(&[bad.as_str(), NODE].join("---\n")).unwrap();
        assert_eq!(keys(&parsed), vec![ObjectKey::Node("node-a".into())]);
        assert_eq!(parsed.errors.len(), 1);
        let e = &parsed.errors[0];
        assert_eq!(e.object, "Service default/broken");
        assert_eq!(e.field, "spec.ports[0].port");
        assert_eq!(e.key, Some(svc_key("default", "broken")));
        assert!(e.message.contains("eighty"), "{}", e.message);
        assert!(e.to_string().starts_with("Service default/broken: spec.ports[0].port: "), "{e}");
    }

    #[test]
    fn typed_error_in_unnamed_node_has_no_key() {
        let parsed = parse_str("kind: Node\nspec:\n  unschedulable: maybe\n").unwrap();
        assert_eq!(parsed.objects.len(), 0);
        assert_eq!(parsed.errors.len(), 1);
        assert_eq!(parsed.errors[0].object, "Node <unnamed>");
        assert_eq!(parsed.errors[0].field, "spec.unschedulable");
        assert_eq!(parsed.errors[0].key, None);
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
            let dir = std::env::temp_dir().join(format!("xlb-test-{tag}-{}-{nanos}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn scan_keys(scan: &Scan) -> Vec<ObjectKey> {
        scan.objects.iter().map(|(o, _)| crate::model::object_key(o).unwrap()).collect()
    }

    #[test]
    fn scan_reads_yaml_files_in_order_and_ignores_hidden_and_other_files() {
        let tmp = TempDir::new("scan-filter");
        let svc = |name: &str| SERVICE.replace("name: web", &format!("name: {name}"));
        let a = tmp.write("a.yaml", &svc("a"));
        tmp.write("b.yml", &svc("b"));
        tmp.write("c.json", r#"{"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-c"}}"#);
        tmp.write(".hidden.yaml", &svc("hidden"));
        tmp.write("notes.txt", &svc("txt"));
        tmp.write("a.yaml~", &svc("backup"));
        fs::create_dir(tmp.0.join("sub.yaml")).unwrap();
        fs::write(tmp.0.join("sub.yaml").join("d.yaml"), svc("nested")).unwrap();

        let mut dir = ManifestDir::new(&tmp.0);
        assert_eq!(dir.dir(), tmp.0.as_path());
        let scan = dir.scan();
        assert_eq!(scan.errors, Vec::<String>::new());
        assert_eq!(scan.unreadable, vec![]);
        assert_eq!(
            scan_keys(&scan),
            vec![svc_key("default", "a"), svc_key("default", "b"), ObjectKey::Node("node-c".into())]
        );
        assert_eq!(scan.objects[0].1, a.display().to_string());
    }

    #[test]
    fn scan_keeps_keys_of_a_file_that_stops_parsing() {
        let tmp = TempDir::new("scan-unreadable");
        let path = tmp.write("web.yaml", &[SERVICE, NODE].join("---\n"));
        tmp.write("other.yaml", &SERVICE.replace("name: web", "name: other"));
        let mut dir = ManifestDir::new(&tmp.0);

        let first = dir.scan();
        assert_eq!(first.errors, Vec::<String>::new());
        assert_eq!(first.objects.len(), 3);

        fs::write(&path, "kind: Service\nmetadata: {name: [web\n").unwrap();
        let broken = dir.scan();
        assert_eq!(scan_keys(&broken), vec![svc_key("default", "other")]);
        assert_eq!(broken.unreadable, vec![svc_key("default", "web"), ObjectKey::Node("node-a".into())]);
        assert_eq!(broken.errors.len(), 1);
        assert!(
            broken.errors[0].starts_with(&format!("{}: not valid YAML: ", path.display())),
            "{}",
            broken.errors[0]
        );

        // Still broken on the next scan: the keys are still remembered.
        let again = dir.scan();
        assert_eq!(again.unreadable, vec![svc_key("default", "web"), ObjectKey::Node("node-a".into())]);

        // Fixed: the file's objects are read again, nothing is unreadable.
        fs::write(&path, SERVICE).unwrap();
        let fixed = dir.scan();
        assert_eq!(fixed.errors, Vec::<String>::new());
        assert_eq!(fixed.unreadable, vec![]);
        assert_eq!(scan_keys(&fixed), vec![svc_key("default", "other"), svc_key("default", "web")]);

        // Removed: its objects are simply gone, not unreadable.
        fs::remove_file(&path).unwrap();
        let removed = dir.scan();
        assert_eq!(removed.unreadable, vec![]);
        assert_eq!(scan_keys(&removed), vec![svc_key("default", "other")]);
    }

    #[test]
    fn scan_reports_document_errors_with_file_and_marks_their_keys_unreadable() {
        let tmp = TempDir::new("scan-document");
        let path = tmp
            .write("web.yaml", &[SERVICE.replace("port: 80", "port: eighty").as_str(), NODE].join("---\n"));
        let scan = ManifestDir::new(&tmp.0).scan();
        assert_eq!(scan_keys(&scan), vec![ObjectKey::Node("node-a".into())]);
        assert_eq!(scan.unreadable, vec![svc_key("default", "web")]);
        assert_eq!(scan.errors.len(), 1);
        assert!(
            scan.errors[0]
                .starts_with(&format!("{}: Service default/web: spec.ports[0].port: ", path.display())),
            "{}",
            scan.errors[0]
        );
    }

    #[test]
    fn scan_of_a_vanished_directory_is_an_error_and_keeps_every_last_good_key() {
        let tmp = TempDir::new("scan-missing");
        let sub = tmp.0.join("manifests");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("web.yaml"), [SERVICE, NODE].join("---\n")).unwrap();
        let mut dir = ManifestDir::new(&sub);
        assert_eq!(dir.scan().objects.len(), 2);

        fs::remove_dir_all(&sub).unwrap();
        let scan = dir.scan();
        assert_eq!(scan.objects.len(), 0);
        let mut unreadable = scan.unreadable.clone();
        unreadable.sort();
        assert_eq!(unreadable, vec![svc_key("default", "web"), ObjectKey::Node("node-a".into())]);
        assert_eq!(scan.errors.len(), 1);
        assert!(
            scan.errors[0].starts_with(&format!("{}: cannot read directory: ", sub.display())),
            "{}",
            scan.errors[0]
        );
    }
}
