//! Issue 2's end-to-end slice: an external client reaches the kiada pods on two nodes
//! through NodePort 30080 and 30443 of either node, every packet translated by xlb's own
//! programs; once they are removed, the same requests fail.
use std::{net::SocketAddrV4, time::Duration};

use xlb_tests::{kiada, netns, scenario};

const REQUESTS: usize = 200;

/// The NAT rules of a node namespace: iptables' nat table rules and nftables' NAT table (the
/// realistic-node run adds a filter rule, which is not NAT).
fn netfilter_nat_rules(ns: &str) -> Vec<String> {
    let iptables = netns::run(ns, "iptables-save", &["-t", "nat"]).unwrap_or_default();
    let nft = netns::run(ns, "nft", &["list", "table", "ip", "nat"]).unwrap_or_default();
    iptables
        .lines()
        .filter(|l| l.starts_with("-A"))
        .chain(nft.lines().filter(|l| !l.trim().is_empty()))
        .map(str::to_string)
        .collect()
}

#[test]
fn nodeport_balances_across_nodes_and_stops_without_xlb() {
    let mut tb = scenario::up_with_agents().expect("cluster with agents");
    for node in &tb.nodes {
        assert_eq!(
            netfilter_nat_rules(&node.ns),
            Vec::<String>::new(),
            "{} must have no netfilter NAT",
            node.name
        );
    }

    for (i, node) in tb.nodes.iter().enumerate() {
        for (port_name, _, _, node_port) in scenario::PORTS {
            let target = SocketAddrV4::new(node.ip, node_port);
            let replies = scenario::requests_from_client(&tb, target, REQUESTS).expect("client namespace");
            let failures: Vec<String> =
                replies.iter().filter_map(|r| r.as_ref().err()).map(|e| format!("{e:#}")).collect();
            assert!(
                failures.is_empty(),
                "{target} ({port_name}): {} of {REQUESTS} failed, first: {:?}",
                failures.len(),
                failures.first()
            );

            let by_pod = scenario::tally(&replies);
            println!("{} {target}: {by_pod:?}", node.name);
            for pod in &tb.pods {
                let n = by_pod.get(&pod.name).copied().unwrap_or(0);
                assert!(n >= 20, "{target}: {} answered {n} times, want at least 20 of {REQUESTS}", pod.name);
            }
            for reply in replies.iter().flatten() {
                let pod = tb.pods.iter().find(|p| p.name == reply.pod).expect("known pod");
                // Pods on the node the client addressed see the client itself; pods on the
                // other node see that node's address (SNAT), so their replies return through it.
                if pod.node == i {
                    assert_eq!(
                        reply.client.ip(),
                        tb.client_ip,
                        "{}: local pod {} must see the client",
                        target,
                        pod.name
                    );
                } else {
                    assert_eq!(
                        reply.client.ip(),
                        node.ip,
                        "{}: remote pod {} must see the node address",
                        target,
                        pod.name
                    );
                    let port = reply.client.port();
                    assert!(
                        port >= lb_common::config::SNAT_PORT_MIN,
                        "SNAT port {port} outside the SNAT range"
                    );
                }
            }
        }
    }

    // Without xlb: detach and unpin everything, then the very same requests must fail.
    for i in 0..tb.nodes.len() {
        tb.cleanup_agent(i).expect("xlb agent --cleanup");
        let dir = &tb.nodes[i].bpffs_dir;
        assert!(!dir.exists(), "{} must be removed by --cleanup", dir.display());
        // The kernel frees an unpinned link a moment later (deferred work): poll with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let xdp = netns::run(&tb.nodes[i].ns, "ip", &["-d", "link", "show", "eth0"]).expect("ip link");
            if !xdp.contains("prog/xdp") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "XDP still attached on {}: {xdp}",
                tb.nodes[i].name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(netfilter_nat_rules(&tb.nodes[i].ns), Vec::<String>::new());
    }
    for node in &tb.nodes {
        for (_, _, _, node_port) in scenario::PORTS {
            let target = SocketAddrV4::new(node.ip, node_port);
            let replies = netns::within(&tb.client, move || {
                (0..10).map(|_| kiada::get(target, Duration::from_millis(500))).collect::<Vec<_>>()
            })
            .expect("client namespace");
            let answered = replies.iter().filter(|r| r.is_ok()).count();
            assert_eq!(answered, 0, "{target} still answers without xlb's programs");
        }
    }
}
