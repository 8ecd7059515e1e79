//! `xlb inspect` against a real agent's pinned maps: the kiada Service's frontends, named
//! after it, and one real connection through its NodePort show up, while the agent runs and
//! after it stopped; and bpftool decodes the same pins with the field names of the lb-common
//! structs (BTF).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use lb_common::{maps, proto};
use serde_json::Value;
use xlb_tests::{bin_path, kiada::Reply, netns, scenario, testbed::Testbed};

/// The node whose agent runs, and the NodePort the client connects to.
const NODE: usize = 0;
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
/// The Service port both frontends belong to: the `http` port of Service `default/kiada`.
const SERVICE_PORT: &str = "default/kiada:http/TCP";

/// The kiada scenario with an agent on node-a only, programmed.
fn cluster_with_agent() -> Testbed {
    let mut tb = Testbed::up(&scenario::spec()).expect("testbed");
    tb.write_manifest("kiada.yaml", &scenario::manifests(&tb)).expect("manifest");
    tb.start_agent(NODE).expect("agent");
    let keys = scenario::node_port_frontends(&tb, NODE);
    tb.wait_programmed(NODE, &keys, Duration::from_secs(30)).expect("agent programmed the NodePorts");
    tb
}

/// One GET from the external client through node-a's NodePort.
fn one_connection(tb: &Testbed) -> Reply {
    let target = SocketAddrV4::new(tb.nodes[NODE].ip, NODE_PORT);
    let mut replies = scenario::requests_from_client(tb, target, 1).expect("client namespace");
    replies.pop().expect("one reply").expect("the request through the NodePort")
}

/// Runs the real `xlb inspect WHAT --bpffs-dir DIR ARGS` in node-a's namespace.
fn xlb_inspect(tb: &Testbed, dir: &Path, what: &str, args: &[&str]) -> Output {
    netns::command(&tb.nodes[NODE].ns, &bin_path("xlb").to_string_lossy())
        .args(["inspect", what, "--bpffs-dir"])
        .arg(dir)
        .args(args)
        .output()
        .expect("running xlb inspect")
}

/// `xlb inspect WHAT -o json`, which must succeed, parsed.
fn inspect_json(tb: &Testbed, what: &str) -> Vec<Value> {
    let out = xlb_inspect(tb, &tb.nodes[NODE].bpffs_dir, what, &["-o", "json"]);
    assert!(out.status.success(), "xlb inspect {what} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "xlb inspect {what} -o json printed no JSON array ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn endpoint(addr: Ipv4Addr, port: u16) -> Value {
    serde_json::json!({ "addr": addr.to_string(), "port": port })
}

/// The NodePort frontend and the ClusterIP frontend of port `http`, named after their Service
/// port, with node-a's view of the backends: all three pods, the two on node-a flagged local.
fn check_services(tb: &Testbed, services: &[Value], when: &str) {
    let node = &tb.nodes[NODE];
    let frontend = serde_json::json!({ "addr": node.ip.to_string(), "port": NODE_PORT, "proto": "TCP" });
    let row = services
        .iter()
        .find(|s| s["frontend"] == frontend)
        .unwrap_or_else(|| panic!("{when}: no frontend {frontend} in {services:#?}"));
    let mut want: Vec<Value> = tb
        .pods
        .iter()
        .map(|p| {
            let flags: Vec<&str> = if p.node == NODE { vec!["local"] } else { vec![] };
            serde_json::json!({ "backend": endpoint(p.ip, TARGET_PORT), "flags": flags })
        })
        .collect();
    let mut got: Vec<Value> = row["external"]["backends"]
        .as_array()
        .expect("external backends")
        .iter()
        .map(|b| serde_json::json!({ "backend": b["backend"], "flags": b["flags"] }))
        .collect();
    want.sort_by_key(Value::to_string);
    got.sort_by_key(Value::to_string);
    assert_eq!(got, want, "{when}: backends of {frontend}");
    assert_eq!(row["external"]["backend_count"], tb.pods.len(), "{when}: {row}");
    assert_eq!(row["external"]["missing_slots"], serde_json::json!([]), "{when}: {row}");
    assert_eq!(row["flags"], serde_json::json!([]), "{when}: {row}");
    assert_eq!(row["service"], SERVICE_PORT, "{when}: {row}");
    let cluster_ip = serde_json::json!({ "addr": scenario::CLUSTER_IP.to_string(), "port": scenario::PORTS[0].1, "proto": "TCP" });
    let row = services
        .iter()
        .find(|s| s["frontend"] == cluster_ip)
        .unwrap_or_else(|| panic!("{when}: no frontend {cluster_ip} in {services:#?}"));
    assert_eq!(row["service"], SERVICE_PORT, "{when}: {row}");
    // Every frontend of the scenario is counted, so every one is named: the other port too.
    let https = format!("default/kiada:{}/TCP", scenario::PORTS[1].0);
    let names: Vec<&Value> = services.iter().map(|s| &s["service"]).collect();
    assert!(names.iter().all(|n| *n == SERVICE_PORT || *n == https.as_str()), "{when}: {names:?}");
}

/// The table form: the NodePort frontend's line names its Service port.
fn check_services_table(tb: &Testbed, when: &str) -> String {
    let out = xlb_inspect(tb, &tb.nodes[NODE].bpffs_dir, "services", &[]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && table.starts_with("SERVICE "), "{when}: {table}");
    let frontend = format!("{}:{NODE_PORT}/TCP", tb.nodes[NODE].ip);
    let line = table.lines().find(|l| l.contains(&frontend));
    assert!(
        line.is_some_and(|l| l.split_whitespace().take(2).eq([SERVICE_PORT, frontend.as_str()])),
        "{when}: {table}"
    );
    table
}

/// The connection of `reply`: from the client to the pod that answered, addressed to the
/// NodePort; the pod sees the client itself when it is on node-a, else node-a's SNAT source.
fn check_connection(tb: &Testbed, conntrack: &[Value], reply: &Reply, when: &str) {
    let node = &tb.nodes[NODE];
    let pod = tb.pods.iter().find(|p| p.name == reply.pod).expect("a pod of the testbed answered");
    let ours: Vec<&Value> = conntrack
        .iter()
        .filter(|c| {
            c["client"]["addr"] == tb.client_ip.to_string() && c["frontend"] == endpoint(node.ip, NODE_PORT)
        })
        .collect();
    assert_eq!(ours.len(), 1, "{when}: want the one connection to the NodePort in {conntrack:#?}");
    let ct = ours[0];
    assert_eq!(ct["proto"], "TCP", "{when}: {ct}");
    assert_eq!(ct["backend"], endpoint(pod.ip, TARGET_PORT), "{when}: {ct}");
    let std::net::SocketAddr::V4(seen) = reply.client else { panic!("IPv6 client {}", reply.client) };
    let (seen_addr, seen_port) = (*seen.ip(), seen.port());
    if pod.node == NODE {
        assert_eq!(
            ct["client"],
            endpoint(seen_addr, seen_port),
            "{when}: the local pod saw the client: {ct}"
        );
        assert_eq!(ct["snat"], Value::Null, "{when}: {ct}");
    } else {
        assert_eq!(
            ct["snat"],
            endpoint(node.ip, seen_port),
            "{when}: the remote pod saw the SNAT source: {ct}"
        );
        assert_eq!(seen_addr, node.ip);
    }
    let state = ct["state"].as_str().expect("state");
    assert!(["syn-sent", "established", "fin", "closed"].contains(&state), "{when}: {ct}");
    assert_eq!(ct["flags"], serde_json::json!(["replied"]), "{when}: the backend answered: {ct}");
    // Measured with CLOCK_MONOTONIC, as the programs stamp it: seconds old, not years.
    let (age, idle) = (ct["age_s"].as_f64().expect("age"), ct["idle_s"].as_f64().expect("idle"));
    assert!((0.0..120.0).contains(&age) && (0.0..=age).contains(&idle), "{when}: age {age}, idle {idle}");
}

#[test]
fn inspect_shows_the_service_and_a_connection_while_the_agent_runs_and_after_it_stopped() {
    let mut tb = cluster_with_agent();
    let reply = one_connection(&tb);

    check_services(&tb, &inspect_json(&tb, "services"), "agent running");
    check_connection(&tb, &inspect_json(&tb, "conntrack"), &reply, "agent running");

    // The table form prints the same frontend, dotted and in host order, after its Service.
    let table = check_services_table(&tb, "agent running");
    let conntrack = xlb_inspect(&tb, &tb.nodes[NODE].bpffs_dir, "conntrack", &[]);
    println!("{table}\n{}", String::from_utf8_lossy(&conntrack.stdout));

    // Stopped without --cleanup: the pins outlive the agent, and so does what inspect reads.
    tb.stop_agent(NODE).expect("stopping the agent");
    assert_eq!(tb.agent_pid(NODE), None);
    check_services(&tb, &inspect_json(&tb, "services"), "agent stopped");
    check_services_table(&tb, "agent stopped");
    check_connection(&tb, &inspect_json(&tb, "conntrack"), &reply, "agent stopped");
    for what in ["backends", "affinity", "stats"] {
        inspect_json(&tb, what);
    }
    let stats = inspect_json(&tb, "stats");
    assert!(
        stats.iter().any(|s| s["frontends"].as_array().is_some_and(|f| f.contains(&serde_json::json!({
            "addr": tb.nodes[NODE].ip.to_string(), "port": NODE_PORT, "proto": "TCP"
        }))) && s["packets"].as_u64() >= Some(4)
            && s["service"] == SERVICE_PORT),
        "the connection's packets are counted for the NodePort's slot, named after its Service port: {stats:#?}"
    );

    // A directory no agent ever used: a clear error naming it, no output.
    let never = Path::new("/sys/fs/bpf").join(format!("{}{}-never", xlb_tests::testbed::PREFIX, tb.run));
    let out = xlb_inspect(&tb, &never, "services", &["-o", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && out.stdout.is_empty(), "{stderr}");
    assert!(stderr.contains(&format!("no agent has run with --bpffs-dir {}", never.display())), "{stderr}");
}

/// `bpftool -j map dump pinned PATH`: its entries, each with `formatted` (BTF-decoded).
fn bpftool_dump(path: &Path) -> Vec<Value> {
    let out =
        Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(path).output().expect("bpftool");
    assert!(out.status.success(), "bpftool on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bpftool -j prints a JSON array")
}

/// The field names of a BTF-decoded struct.
fn fields(value: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not a struct: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    names.sort_unstable();
    names
}

fn sorted<'a>(names: &[&'a str]) -> Vec<&'a str> {
    let mut names = names.to_vec();
    names.sort_unstable();
    names
}

#[test]
fn bpftool_decodes_the_pinned_maps_with_the_lb_common_field_names() {
    let tb = cluster_with_agent();
    one_connection(&tb);
    let dir = &tb.nodes[NODE].bpffs_dir;

    let services = bpftool_dump(&dir.join(maps::SERVICES));
    assert!(!services.is_empty());
    for entry in &services {
        let formatted = &entry["formatted"];
        assert_eq!(fields(&formatted["key"]), sorted(&["addr", "port", "proto", "_pad"]), "{entry}");
        assert_eq!(
            fields(&formatted["value"]),
            sorted(&[
                "group_id",
                "internal_group_id",
                "backend_count",
                "internal_count",
                "flags",
                "stats_index",
                "affinity_timeout_s"
            ]),
            "{entry}"
        );
    }
    // The NodePort's key as the kernel holds it: address and port in network byte order.
    let (addr, port) = (u32::from(tb.nodes[NODE].ip).to_be(), NODE_PORT.to_be());
    assert!(
        services.iter().any(|e| {
            let key = &e["formatted"]["key"];
            key["addr"] == addr && key["port"] == port && key["proto"] == proto::TCP
        }),
        "no key {addr}, {port}, {} in {services:#?}",
        proto::TCP
    );

    let conntrack = bpftool_dump(&dir.join(maps::CONNTRACK));
    assert!(!conntrack.is_empty(), "the connection is tracked");
    for entry in &conntrack {
        let formatted = &entry["formatted"];
        assert_eq!(fields(&formatted["key"]), sorted(&["saddr", "daddr", "sport", "dport", "proto", "_pad"]));
        assert_eq!(
            fields(&formatted["value"]),
            sorted(&[
                "frontend_addr",
                "frontend_port",
                "snat_port",
                "snat_addr",
                "state",
                "flags",
                "stats_index",
                "created_ns",
                "last_seen_ns"
            ]),
            "{entry}"
        );
    }
    assert!(
        conntrack.iter().any(|e| e["formatted"]["key"]["saddr"] == u32::from(tb.client_ip).to_be()
            && e["formatted"]["value"]["frontend_port"] == NODE_PORT.to_be()),
        "no connection from the client to the NodePort in {conntrack:#?}"
    );

    // The counter slots' names: the first `len` bytes of `name` (a u8 array: BTF has no `char`
    // for Rust) are the Service ports, and the NodePort frontend's slot is its own.
    let names = bpftool_dump(&dir.join(maps::SERVICE_NAMES));
    let decoded: Vec<(u64, String)> = names
        .iter()
        .map(|entry| {
            let (key, value) = (&entry["formatted"]["key"], &entry["formatted"]["value"]);
            assert_eq!(fields(value), sorted(&["len", "name"]), "{entry}");
            let len = value["len"].as_u64().expect("len") as usize;
            let bytes: Vec<u8> = value["name"]
                .as_array()
                .expect("name: an array of bytes")
                .iter()
                .map(|b| b.as_u64().expect("a byte") as u8)
                .collect();
            assert!(bytes[len..].iter().all(|b| *b == 0), "{entry}");
            (key.as_u64().expect("slot"), String::from_utf8(bytes[..len].to_vec()).expect("UTF-8"))
        })
        .collect();
    let mut ports: Vec<&str> = decoded.iter().map(|(_, name)| name.as_str()).collect();
    ports.sort_unstable();
    assert_eq!(ports, [SERVICE_PORT, "default/kiada:https/TCP"], "{decoded:?}");
    let slot = services
        .iter()
        .find(|e| e["formatted"]["key"]["addr"] == addr && e["formatted"]["key"]["port"] == port)
        .map(|e| e["formatted"]["value"]["stats_index"].as_u64().expect("stats_index"));
    assert_eq!(decoded.iter().find(|(s, _)| Some(*s) == slot).map(|(_, n)| n.as_str()), Some(SERVICE_PORT));
}
