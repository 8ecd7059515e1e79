//! The manifests under `deploy/`: every document is a valid Kubernetes object of its kind with
//! no unknown or misspelled field, the ClusterRole grants exactly what the agent reads, the
//! DaemonSet runs `xlb agent` with flags it accepts and the least privilege it needs, and the
//! kustomization lists every manifest. No cluster needed: the files are read as they are.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{de::DeserializeOwned, Deserialize as _, Serialize};
use serde_json::Value;

const NAMESPACE: &str = "kube-system";
const HEALTHZ_PORT: i32 = 10256;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// The YAML files of `deploy/` and its subdirectories, as paths relative to it.
fn yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                out.push(path.strip_prefix(base).expect("below deploy/").to_path_buf());
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &deploy_dir(), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no YAML file under {}", deploy_dir().display());
    files
}

/// Every document of every YAML file, as a generic value, labelled `file#index`.
fn documents() -> Vec<(String, Value)> {
    let mut docs = Vec::new();
    for file in yaml_files() {
        let text = fs::read_to_string(deploy_dir().join(&file)).expect("readable manifest");
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let label = format!("deploy/{}#{i}", file.display());
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{label}: not valid YAML: {e}"));
            if !value.is_null() {
                docs.push((label, value));
            }
        }
    }
    docs
}

/// The first place where `a` and `b` differ, as a JSON path.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            keys.into_iter().find_map(|k| match (a.get(k), b.get(k)) {
                (Some(x), Some(y)) => first_difference(x, y, &format!("{path}.{k}")),
                (Some(_), None) => Some(format!("{path}.{k} is not a field of the type (misspelled?)")),
                (None, _) => Some(format!("{path}.{k} appears only after the round trip")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} in the file, {b} after the round trip")),
    }
}

/// Parses `doc` into `T`, then checks nothing was dropped: k8s-openapi types ignore unknown
/// fields, so the typed object serialized back must equal the document.
fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| format!("not a valid object: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("does not serialize back: {e}"))?;
    match first_difference(doc, &back, "") {
        None => Ok(typed),
        Some(difference) => Err(format!("lost in a round trip through the typed object: {difference}")),
    }
}

#[derive(Default)]
struct Manifests {
    daemon_sets: Vec<(String, DaemonSet)>,
    service_accounts: Vec<(String, ServiceAccount)>,
    cluster_roles: Vec<(String, ClusterRole)>,
    bindings: Vec<(String, ClusterRoleBinding)>,
    /// The kustomization file's document (no k8s-openapi type).
    kustomization: Option<Value>,
}

/// Every document of `deploy/`, each parsed strictly into the type its `kind` names.
fn manifests() -> Manifests {
    fn parse<T: DeserializeOwned + Serialize>(label: &str, doc: &Value) -> (String, T) {
        (label.to_string(), strict(doc).unwrap_or_else(|e| panic!("{label}: {e}")))
    }
    let mut m = Manifests::default();
    for (label, doc) in documents() {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_else(|| panic!("{label}: no kind"));
        match kind {
            "DaemonSet" => m.daemon_sets.push(parse(&label, &doc)),
            "ServiceAccount" => m.service_accounts.push(parse(&label, &doc)),
            "ClusterRole" => m.cluster_roles.push(parse(&label, &doc)),
            "ClusterRoleBinding" => m.bindings.push(parse(&label, &doc)),
            "Kustomization" => {
                assert!(
                    label.starts_with("deploy/kustomization.yaml#"),
                    "{label}: a Kustomization elsewhere"
                );
                assert!(m.kustomization.replace(doc).is_none(), "{label}: a second Kustomization");
            }
            other => panic!("{label}: kind {other} is not one deploy/ should hold"),
        }
    }
    m
}

fn one<'a, T>(objects: &'a [(String, T)], kind: &str) -> &'a T {
    assert_eq!(objects.len(), 1, "deploy/ should hold exactly one {kind}: {:?}", labels(objects));
    &objects[0].1
}

fn labels<T>(objects: &[(String, T)]) -> Vec<&str> {
    objects.iter().map(|(l, _)| l.as_str()).collect()
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().expect("DaemonSet spec").template.spec.as_ref().expect("DaemonSet spec.template.spec")
}

/// The one container of the DaemonSet's pods.
fn agent_container(ds: &DaemonSet) -> &Container {
    let containers = &pod_spec(ds).containers;
    assert_eq!(containers.len(), 1, "DaemonSet spec.template.spec.containers: one container, the agent");
    &containers[0]
}

fn args(container: &Container) -> &[String] {
    container.args.as_deref().expect("DaemonSet container args")
}

/// The value of `--flag` in `args` (`--flag=value` or `--flag value`).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter().enumerate().find_map(|(i, a)| match a.strip_prefix(flag) {
        Some(rest) if rest.starts_with('=') => Some(&rest[1..]),
        Some("") => args.get(i + 1).map(String::as_str),
        _ => None,
    })
}

/// The long flags `xlb agent` accepts, read from lb-userspace/src/main.rs: the fields of
/// `AgentArgs` with `#[arg(long ...)]` (kebab-cased, or an explicit `long = "..."`), and the
/// `global = true` flags of `Cli`, which clap accepts after the subcommand too.
fn agent_flags() -> BTreeSet<String> {
    let path = repo_root().join("lb-userspace/src/main.rs");
    let source = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut flags = BTreeSet::new();
    for (name, only_global) in [("struct AgentArgs", false), ("struct Cli", true)] {
        let start = source.find(name).unwrap_or_else(|| panic!("{} has no `{name}`", path.display()));
        let body = &source[start..];
        let body = &body[..body.find("\n}").unwrap_or_else(|| panic!("`{name}` has no end"))];
        let mut attributes = String::new();
        for line in body.lines().skip(1).map(str::trim) {
            if line.starts_with("//") || line.is_empty() {
                continue;
            }
            let field = line.strip_prefix("pub ").unwrap_or(line).split_once(':').filter(|(ident, rest)| {
                rest.starts_with(' ') && ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            let Some((ident, _)) = field else {
                attributes.push_str(line);
                continue;
            };
            let arg = attributes.find("arg(").map(|i| &attributes[i..]);
            let long =
                arg.filter(|a| a.split(|c: char| !c.is_alphanumeric() && c != '_').any(|w| w == "long"));
            if let Some(arg) = long.filter(|a| !only_global || a.replace(' ', "").contains("global=true")) {
                let explicit = arg.split_once("long = \"").and_then(|(_, rest)| rest.split_once('"'));
                flags.insert(match explicit {
                    Some((name, _)) => name.to_string(),
                    None => ident.replace('_', "-"),
                });
            }
            attributes.clear();
        }
    }
    // The reader itself: these flags exist today; not finding them means it misread main.rs.
    for known in ["external-interfaces", "pod-interfaces", "bpffs-dir", "cgroup-path", "log-format"] {
        assert!(flags.contains(known), "read {flags:?} from {}: no --{known}", path.display());
    }
    flags
}

#[test]
fn every_document_parses_into_its_kubernetes_type_without_unknown_fields() {
    let m = manifests();
    one(&m.daemon_sets, "DaemonSet");
    one(&m.service_accounts, "ServiceAccount");
    one(&m.cluster_roles, "ClusterRole");
    one(&m.bindings, "ClusterRoleBinding");
    assert!(m.kustomization.is_some(), "deploy/kustomization.yaml is missing");
}

#[test]
fn the_round_trip_catches_a_misspelled_field() {
    let (label, mut doc) = documents()
        .into_iter()
        .find(|(_, d)| d.get("kind").and_then(Value::as_str) == Some("DaemonSet"))
        .expect("a DaemonSet document");
    strict::<DaemonSet>(&doc).unwrap_or_else(|e| panic!("{label}: {e}"));
    let pod = doc.pointer_mut("/spec/template/spec").and_then(Value::as_object_mut).expect("a pod spec");
    let host_network = pod.remove("hostNetwork").expect("hostNetwork");
    pod.insert("hostNetwrok".into(), host_network);
    let error = strict::<DaemonSet>(&doc).expect_err("a misspelled field must not pass");
    assert!(error.contains(".spec.template.spec.hostNetwrok"), "{error}");
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_reads() {
    let m = manifests();
    let role = one(&m.cluster_roles, "ClusterRole");
    let name = role.metadata.name.as_deref().unwrap_or_default();
    assert!(role.aggregation_rule.is_none(), "ClusterRole {name}: aggregationRule would add rules");
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        assert!(rule.resource_names.is_none(), "ClusterRole {name} rules[{i}]: resourceNames");
        assert!(rule.non_resource_urls.is_none(), "ClusterRole {name} rules[{i}]: nonResourceURLs");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for word in [group, resource, verb] {
                        assert!(!word.contains('*'), "ClusterRole {name} rules[{i}]: wildcard {word:?}");
                    }
                    assert_ne!(resource, "secrets", "ClusterRole {name} rules[{i}]: secrets");
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group, resource, verb));
        }
    }
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "ClusterRole {name} rules (group, resource, verb): more than needed {extra:?}, missing {missing:?}"
    );
}

#[test]
fn the_binding_gives_the_role_to_the_daemon_sets_service_account() {
    let m = manifests();
    let (role, sa, binding, ds) = (
        one(&m.cluster_roles, "ClusterRole"),
        one(&m.service_accounts, "ServiceAccount"),
        one(&m.bindings, "ClusterRoleBinding"),
        one(&m.daemon_sets, "DaemonSet"),
    );
    let binding_name = binding.metadata.name.as_deref().unwrap_or_default();
    assert_eq!(
        binding.role_ref.api_group, "rbac.authorization.k8s.io",
        "ClusterRoleBinding {binding_name} roleRef.apiGroup"
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole", "ClusterRoleBinding {binding_name} roleRef.kind");
    assert_eq!(
        Some(&binding.role_ref.name),
        role.metadata.name.as_ref(),
        "ClusterRoleBinding {binding_name} roleRef.name"
    );

    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE), "ServiceAccount metadata.namespace");
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE), "DaemonSet metadata.namespace");
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(
        subjects.len(),
        1,
        "ClusterRoleBinding {binding_name} subjects: the agent's ServiceAccount only"
    );
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount", "ClusterRoleBinding {binding_name} subjects[0].kind");
    assert_eq!(
        Some(&subject.name),
        sa.metadata.name.as_ref(),
        "ClusterRoleBinding {binding_name} subjects[0].name"
    );
    assert_eq!(
        subject.namespace.as_deref(),
        Some(NAMESPACE),
        "ClusterRoleBinding {binding_name} subjects[0].namespace"
    );
    assert_eq!(
        pod_spec(ds).service_account_name.as_ref(),
        sa.metadata.name.as_ref(),
        "DaemonSet spec.template.spec.serviceAccountName"
    );
}

#[test]
fn the_daemon_set_runs_on_every_node_in_the_host_network() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let spec = ds.spec.as_ref().expect("DaemonSet spec");
    let pod = pod_spec(ds);
    let at = "DaemonSet spec.template.spec";
    assert_eq!(pod.host_network, Some(true), "{at}.hostNetwork");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"), "{at}.dnsPolicy");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{at}.priorityClassName");
    assert_ne!(pod.host_pid, Some(true), "{at}.hostPID");
    assert_ne!(pod.host_ipc, Some(true), "{at}.hostIPC");
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "{at}.tolerations: one with operator Exists and no key or effect (every taint)"
    );
    assert!(pod.termination_grace_period_seconds.is_some(), "{at}.terminationGracePeriodSeconds");

    let strategy = spec.update_strategy.as_ref().expect("DaemonSet spec.updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "DaemonSet spec.updateStrategy.type");
    let rolling = strategy.rolling_update.as_ref().expect("DaemonSet spec.updateStrategy.rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)), "DaemonSet rollingUpdate.maxUnavailable");
    assert!(
        matches!(rolling.max_surge, None | Some(IntOrString::Int(0))),
        "DaemonSet rollingUpdate.maxSurge: two agents on a node would share its pins and port"
    );

    let labels = ds.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|m| m.labels.as_ref());
    for (key, value) in spec.selector.match_labels.iter().flatten() {
        assert_eq!(
            labels.and_then(|l| l.get(key)),
            Some(value),
            "DaemonSet selector {key} not on the pod template"
        );
    }

    let container = agent_container(ds);
    let image = container.image.as_deref().unwrap_or_default();
    assert!(image.starts_with("ghcr.io/xlb-project/xlb:"), "DaemonSet container image {image}");
    let requests = container.resources.as_ref().and_then(|r| r.requests.as_ref());
    for resource in ["cpu", "memory"] {
        assert!(
            requests.is_some_and(|r| r.contains_key(resource)),
            "DaemonSet container resources.requests.{resource}"
        );
    }
}

#[test]
fn the_agent_runs_unprivileged_with_exactly_its_capabilities() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let container = agent_container(ds);
    let at = "DaemonSet container securityContext";
    let security = container.security_context.as_ref().unwrap_or_else(|| panic!("{at}"));
    assert_eq!(security.privileged, Some(false), "{at}.privileged");
    assert_eq!(security.allow_privilege_escalation, Some(false), "{at}.allowPrivilegeEscalation");
    let capabilities = security.capabilities.as_ref().unwrap_or_else(|| panic!("{at}.capabilities"));
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_string()][..]), "{at}.capabilities.drop");
    let added: BTreeSet<&str> = capabilities.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]), "{at}.capabilities.add");
}

#[test]
fn the_probes_hit_the_agents_health_server() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let container = agent_container(ds);
    let ports: BTreeMap<&str, i32> = container
        .ports
        .iter()
        .flatten()
        .filter_map(|p| Some((p.name.as_deref()?, p.container_port)))
        .collect();
    let check = |probe: Option<&Probe>, what: &str, path: &str| {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("DaemonSet container {what}.httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "DaemonSet container {what}.httpGet.path");
        let port = match &get.port {
            IntOrString::Int(port) => *port,
            IntOrString::String(name) => *ports
                .get(name.as_str())
                .unwrap_or_else(|| panic!("DaemonSet container {what}: no port {name}")),
        };
        assert_eq!(port, HEALTHZ_PORT, "DaemonSet container {what}.httpGet.port");
    };
    check(container.liveness_probe.as_ref(), "livenessProbe", "/livez");
    check(container.readiness_probe.as_ref(), "readinessProbe", "/healthz");
    // The agent must listen where the probes go (its default is 0.0.0.0:10256).
    if let Some(address) = flag_value(args(container), "--healthz-bind-address") {
        assert!(
            address.ends_with(&format!(":{HEALTHZ_PORT}")) && !address.starts_with("127."),
            "DaemonSet container args --healthz-bind-address={address}: the kubelet probes {HEALTHZ_PORT} on the node's address"
        );
    }
}

#[test]
fn the_node_name_and_api_server_come_from_the_environment() {
    let m = manifests();
    let container = agent_container(one(&m.daemon_sets, "DaemonSet"));
    let env: BTreeMap<&str, _> = container.env.iter().flatten().map(|e| (e.name.as_str(), e)).collect();
    let node_name = env.get("NODE_NAME").expect("DaemonSet container env NODE_NAME");
    let field =
        node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(
        field,
        Some("spec.nodeName"),
        "DaemonSet container env NODE_NAME.valueFrom.fieldRef.fieldPath"
    );
    assert!(
        flag_value(args(container), "--node-name").is_none(),
        "DaemonSet container args: --node-name overrides NODE_NAME"
    );
    // Without kube-proxy the `kubernetes` Service's ClusterIP (the kubelet's default for these)
    // is only served once the agent runs: the agent must reach the API server directly.
    for name in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let value = env.get(name).and_then(|e| e.value.as_deref()).unwrap_or_default();
        assert!(!value.is_empty(), "DaemonSet container env {name}: the API server's own address");
    }
}

#[test]
fn the_args_are_flags_xlb_agent_accepts() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let container = agent_container(ds);
    assert!(
        container.command.is_none(),
        "DaemonSet container command: the image's entrypoint (tini, then xlb)"
    );
    let args = args(container);
    assert_eq!(args.first().map(String::as_str), Some("agent"), "DaemonSet container args[0]");
    let known = agent_flags();
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        let flag = arg[2..].split('=').next().unwrap_or_default();
        assert!(
            known.contains(flag),
            "DaemonSet container args: --{flag} is not a flag of xlb agent ({known:?})"
        );
    }
    for flag in ["--cleanup", "--manifests", "--kubeconfig"] {
        assert!(!args.iter().any(|a| a.split('=').next() == Some(flag)), "DaemonSet container args: {flag}");
    }
    for flag in ["--external-interfaces", "--pod-interfaces", "--cgroup-path", "--bpffs-dir"] {
        let value = flag_value(args, flag).unwrap_or_default();
        assert!(!value.is_empty(), "DaemonSet container args: {flag} with a value");
    }
}

#[test]
fn bpffs_and_the_cgroup_root_come_from_the_host() {
    let m = manifests();
    let ds = one(&m.daemon_sets, "DaemonSet");
    let container = agent_container(ds);
    let args = args(container);
    let volumes: BTreeMap<&str, &str> = pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.as_str(), v.host_path.as_ref()?.path.as_str())))
        .collect();
    // The host path and mount of the volume mounted at `dir` or above it.
    let host_mount = |dir: &str| {
        container.volume_mounts.iter().flatten().find_map(|mount| {
            let below = dir == mount.mount_path || dir.starts_with(&format!("{}/", mount.mount_path));
            below.then(|| volumes.get(mount.name.as_str()).map(|host| (*host, mount))).flatten()
        })
    };

    let bpffs_dir = flag_value(args, "--bpffs-dir").expect("DaemonSet container args --bpffs-dir");
    let (host, mount) = host_mount(bpffs_dir)
        .unwrap_or_else(|| panic!("DaemonSet: --bpffs-dir={bpffs_dir} is not on a hostPath volume"));
    assert_eq!(
        host, "/sys/fs/bpf",
        "DaemonSet: the volume holding --bpffs-dir={bpffs_dir} (its hostPath.path)"
    );
    assert_eq!(mount.mount_path, "/sys/fs/bpf", "DaemonSet container volumeMounts: bpffs mountPath");
    assert_ne!(mount.read_only, Some(true), "DaemonSet container volumeMounts: bpffs is written (pins)");
    // Bidirectional would need a privileged container.
    assert_eq!(
        mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "DaemonSet container volumeMounts: bpffs mountPropagation"
    );

    let cgroup = flag_value(args, "--cgroup-path").expect("DaemonSet container args --cgroup-path");
    let (host, mount) = host_mount(cgroup)
        .unwrap_or_else(|| panic!("DaemonSet: --cgroup-path={cgroup} is not on a hostPath volume"));
    assert_eq!(
        mount.mount_path, cgroup,
        "DaemonSet: --cgroup-path is the volume's root (the host's cgroup root)"
    );
    assert_eq!(host, "/sys/fs/cgroup", "DaemonSet: the volume at --cgroup-path={cgroup} (its hostPath.path)");
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let m = manifests();
    let kustomization = m.kustomization.expect("deploy/kustomization.yaml");
    let listed: BTreeSet<PathBuf> = kustomization
        .get("resources")
        .and_then(Value::as_array)
        .expect("deploy/kustomization.yaml resources")
        .iter()
        .map(|r| PathBuf::from(r.as_str().expect("deploy/kustomization.yaml resources: file names")))
        .collect();
    let files: BTreeSet<PathBuf> =
        yaml_files().into_iter().filter(|f| f != Path::new("kustomization.yaml")).collect();
    assert_eq!(listed, files, "deploy/kustomization.yaml resources against the YAML files of deploy/");

    // `images:` must name the DaemonSet's image, or an override would not apply.
    let image = agent_container(one(&m.daemon_sets, "DaemonSet")).image.clone().unwrap_or_default();
    let image_name = image.rsplit_once(':').map_or(image.as_str(), |(name, _)| name);
    let names: Vec<&str> = kustomization
        .get("images")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("name").and_then(Value::as_str))
        .collect();
    assert!(
        names.contains(&image_name),
        "deploy/kustomization.yaml images[].name: {names:?}, DaemonSet image {image}"
    );
}

#[test]
fn the_image_starts_the_agent_under_an_init_and_pins_the_xtask_bpf_linker() {
    let path = deploy_dir().join("Containerfile");
    let containerfile =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    // As PID 1 the agent would get only the signals it has a handler for: tini passes the
    // kubelet's SIGTERM on. The DaemonSet gives only args, so the entrypoint must end in xlb.
    let entrypoint = containerfile
        .lines()
        .rfind(|l| l.starts_with("ENTRYPOINT"))
        .expect("deploy/Containerfile ENTRYPOINT");
    assert!(
        entrypoint.contains("tini") && entrypoint.ends_with("\"/usr/local/bin/xlb\"]"),
        "deploy/Containerfile: {entrypoint}: tini first, then xlb (the DaemonSet passes only args)"
    );
    let setup = fs::read_to_string(repo_root().join("xtask/src/setup.rs")).expect("xtask/src/setup.rs");
    let version = setup
        .lines()
        .find_map(|l| l.strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|rest| rest.split_once('"'))
        .map(|(version, _)| version)
        .expect("xtask/src/setup.rs BPF_LINKER_VERSION");
    assert!(
        containerfile.contains(&format!("ARG BPF_LINKER_VERSION={version}\n")),
        "deploy/Containerfile: bpf-linker should be {version}, as `cargo xtask setup` installs"
    );
}
