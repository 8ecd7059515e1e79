//! Bad input never takes the agent down: a file that is not YAML and a Service with an
//! invalid field are reported with the file, the object and the field, and skipped, while
//! every programmed Service keeps answering.
use std::{net::SocketAddrV4, time::Duration};

use xlb_tests::scenario;

#[test]
fn bad_manifests_are_reported_and_skipped_while_traffic_keeps_flowing() {
    let mut tb = scenario::up_with_agents().expect("cluster with agents");
    tb.write_manifest("broken.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n").unwrap();
    tb.write_manifest(
        "bad-service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: default}\nspec:\n  clusterIP: 198.19.0.300\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    // An edit that breaks the kiada file itself: its last good version must keep serving.
    tb.write_manifest("kiada.yaml", "kind: Service\n  : : not yaml\n").unwrap();

    let timeout = Duration::from_secs(10);
    for i in 0..tb.nodes.len() {
        let line = tb.wait_for_log(i, "broken.yaml", timeout).unwrap();
        assert!(line.contains("not valid YAML"), "{line}");
        let line = tb.wait_for_log(i, "bad-service.yaml", timeout).unwrap();
        assert!(line.contains("Service default/bad") && line.contains("spec.clusterIP"), "{line}");
        tb.wait_for_log(i, "kiada.yaml: not valid YAML", timeout).unwrap();
    }
    // Both agents read all three files before this point; the last good state still serves.
    for (i, node) in tb.nodes.iter().enumerate() {
        let target = SocketAddrV4::new(node.ip, scenario::PORTS[0].3);
        let replies = scenario::requests_from_client(&tb, target, 30).unwrap();
        let failed = replies.iter().filter(|r| r.is_err()).count();
        assert_eq!(failed, 0, "node {i}: {failed} of 30 requests failed after bad manifests");
    }
    for i in 0..tb.nodes.len() {
        tb.check_agent_alive(i).expect("agent survives bad input");
    }
}
