//! `xlb-testbed`: the namespace cluster from the command line, behind `cargo xtask testbed`
//! and `cargo xtask demo`.
use std::{net::SocketAddrV4, process::Command};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use xlb_tests::{netns, scenario, testbed};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kiada cluster with agents on every node and leave it running.
    Up,
    /// Remove every testbed (any run): namespaces, processes, pins, cgroups.
    Down,
    /// List the testbed namespaces, pins and cgroups that exist.
    Status,
    /// Build the cluster, run the agents, send traffic, show who answered and the maps
    /// (`xlb inspect services` and `conntrack` of every node, one entry through bpftool).
    Demo {
        /// Leave the cluster up afterwards (`cargo xtask testbed down` removes it).
        #[arg(long)]
        keep: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Up => {
            let tb = scenario::up_with_agents()?;
            describe(&tb);
            tb.keep()
        }
        Cmd::Down => {
            for removed in testbed::down_all() {
                println!("removed {removed}");
            }
            Ok(())
        }
        Cmd::Status => {
            let namespaces: Vec<_> =
                netns::list().into_iter().filter(|n| n.starts_with(testbed::PREFIX)).collect();
            let pins = testbed::list_prefixed(std::path::Path::new("/sys/fs/bpf"));
            let cgroups = testbed::list_prefixed(&testbed::cgroup2_mount()?);
            if namespaces.is_empty() && pins.is_empty() && cgroups.is_empty() {
                println!("no testbed is up");
            }
            for ns in namespaces {
                println!("netns {ns}");
            }
            for pin in pins {
                println!("bpffs {}", pin.display());
            }
            for cgroup in cgroups {
                println!("cgroup {}", cgroup.display());
            }
            Ok(())
        }
        Cmd::Demo { keep } => demo(keep),
    }
}

fn describe(tb: &testbed::Testbed) {
    println!("cluster {}: fabric {}, client {} ({})", tb.run, tb.fabric, tb.client, tb.client_ip);
    for node in &tb.nodes {
        println!(
            "  {} {} in {}, pins {}, cgroup {}",
            node.name,
            node.ip,
            node.ns,
            node.bpffs_dir.display(),
            node.cgroup.display()
        );
    }
    for pod in &tb.pods {
        println!("  pod {} {} on {} in {}", pod.name, pod.ip, tb.nodes[pod.node].name, pod.ns);
    }
    println!("  manifests {}", tb.manifests.display());
    if testbed::realistic_node() {
        println!("  realistic nodes: strict rp_filter, conntrack INVALID dropped in FORWARD");
    }
}

fn demo(keep: bool) -> anyhow::Result<()> {
    println!("== bringing up the namespace cluster and an xlb agent on each node");
    let tb = scenario::up_with_agents()?;
    describe(&tb);
    println!("\n== the kiada Service (seed Listing 11.3), from {}", tb.manifests.display());
    for node in &tb.nodes {
        for (_, _, _, node_port) in scenario::PORTS {
            let target = SocketAddrV4::new(node.ip, node_port);
            println!("\n-- 6 requests from the client to {} ({target})", node.name);
            for reply in scenario::requests_from_client(&tb, target, 6)? {
                match reply {
                    Ok(r) => println!(
                        "   answered by {:8} on {}  (the pod saw client {})",
                        r.pod, r.node, r.client
                    ),
                    Err(e) => println!("   FAILED: {e:#}"),
                }
            }
        }
    }
    for node in &tb.nodes {
        for what in ["services", "conntrack"] {
            println!("\n== xlb inspect {what} --bpffs-dir {}  (on {})", node.bpffs_dir.display(), node.name);
            print!("{}", xlb_inspect(node, what)?);
        }
    }
    // The same pins through bpftool: BTF gives it the field names of the lb-common structs;
    // the values stay raw (addresses and ports in network byte order).
    let node = &tb.nodes[0];
    let path = node.bpffs_dir.join(lb_common::maps::SERVICES);
    println!("\n== bpftool -j map dump pinned {} (first entry: BTF field names, raw values)", path.display());
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .context("running bpftool")?;
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    match entries.first() {
        // `formatted` is the entry decoded with BTF; the raw bytes are left out.
        Some(entry) => println!("{}", entry.get("formatted").unwrap_or(entry)),
        None => println!("(no entry: {})", String::from_utf8_lossy(&out.stderr).trim()),
    }
    if keep {
        println!("\nleaving the cluster up; remove it with: cargo xtask testbed down");
        tb.keep()?;
    } else {
        println!("\n== tearing down");
    }
    Ok(())
}

/// The table `xlb inspect WHAT --bpffs-dir DIR` prints for `node`'s pins, run in its network
/// namespace as the node's own `xlb` would be.
fn xlb_inspect(node: &testbed::Node, what: &str) -> anyhow::Result<String> {
    let out = netns::command(&node.ns, &xlb_tests::bin_path("xlb").to_string_lossy())
        .args(["inspect", what, "--bpffs-dir"])
        .arg(&node.bpffs_dir)
        .output()
        .context("running xlb inspect")?;
    if !out.status.success() {
        anyhow::bail!("xlb inspect {what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
