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

fn typed<T: DeserializeOwned>(value: Value, kind: &str, key: Option<ObjectKey>, object: String) -> Result<T, DocumentError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        DocumentError { object, field, message: e.into_inner().to_string(), key }
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
        "Service" => (id.map(ObjectKey::Service), format!("Service {namespace}/{}", name.as_deref().unwrap_or("<unnamed>"))),
        "EndpointSlice" => (id.map(ObjectKey::EndpointSlice), format!("EndpointSlice {namespace}/{}", name.as_deref().unwrap_or("<unnamed>"))),
        "Node" => (name.clone().map(ObjectKey::Node), format!("Node {}", name.as_deref().unwrap_or("<unnamed>"))),
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
        Err(e) => parsed.errors.push(e),
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
            Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_manifest(p)).collect(),
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
                    let mut keys: Vec<ObjectKey> = parsed.objects.iter().filter_map(crate::model::object_key).collect();
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
