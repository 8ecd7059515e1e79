//! Traffic for integration tests from any namespace of a testbed: the external client, a
//! pod (ClusterIP from a pod) or a node.
use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::bail;

use crate::{
    kiada::{self, Reply},
    netns,
    testbed::Testbed,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Each request's answer and the peer address the client's socket saw, or its failure.
pub type Exchanges = Vec<anyhow::Result<(Reply, SocketAddr)>>;

/// `count` GETs from `ns` (one connection each) to `target`, with the peer each
/// connection reported.
pub fn tcp_from(tb: &Testbed, ns: &str, target: SocketAddrV4, count: usize) -> anyhow::Result<Exchanges> {
    check_ours(tb, ns)?;
    netns::within(ns, move || (0..count).map(|_| kiada::get_tcp(target, TIMEOUT)).collect())
}

/// `count` datagrams from `ns` (a new socket each) to `target`, with the address each
/// answer came from.
pub fn udp_from(tb: &Testbed, ns: &str, target: SocketAddrV4, count: usize) -> anyhow::Result<Exchanges> {
    check_ours(tb, ns)?;
    netns::within(ns, move || (0..count).map(|_| kiada::get_udp(target, TIMEOUT)).collect())
}

/// Traffic is only ever sent from the testbed's own namespaces, never from the machine's.
fn check_ours(tb: &Testbed, ns: &str) -> anyhow::Result<()> {
    if !tb.owns_namespace(ns) {
        bail!("{ns} is not a namespace of testbed {}", tb.run);
    }
    Ok(())
}

/// How many answers each pod gave.
pub fn tally_pods<'a>(replies: impl IntoIterator<Item = &'a Reply>) -> BTreeMap<String, usize> {
    let mut by_pod = BTreeMap::new();
    for reply in replies {
        *by_pod.entry(reply.pod.clone()).or_default() += 1;
    }
    by_pod
}
