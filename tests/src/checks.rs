//! Small helpers the integration tests share: waiting for a condition, checking which pods
//! random backend choice reaches, reading the agent's HTTP answers (chunked bodies,
//! Prometheus samples) and the Node objects of a testbed.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

use crate::{netns, testbed::Testbed};

/// The agent's default `--metrics-bind-address` port.
pub const METRICS_PORT: u16 = 10249;

/// GET `path` on `port` of the node's loopback, from inside node `node`'s namespace:
/// (status, body).
pub fn node_get(tb: &Testbed, node: usize, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let ns = tb.nodes[node].ns.clone();
    ensure!(tb.owns_namespace(&ns), "{ns} is not ours");
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    let raw = netns::within(&ns, move || -> anyhow::Result<Vec<u8>> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        Ok(raw)
    })??;
    let text = String::from_utf8(raw).context("not UTF-8")?;
    let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("status line")?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The agent's `/metrics` on node `node` (its default `--metrics-bind-address`).
pub fn scrape(tb: &Testbed, node: usize) -> anyhow::Result<String> {
    match node_get(tb, node, METRICS_PORT, "/metrics")? {
        (200, body) => Ok(body),
        (status, _) => bail!("/metrics answered {status}"),
    }
}

/// Retries `check` every 20 ms until it passes, or panics after `within`; returns how long
/// it took.
pub fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> anyhow::Result<()>) -> Duration {
    let start = Instant::now();
    loop {
        match check() {
            Ok(()) => return start.elapsed(),
            Err(e) if start.elapsed() > within => panic!("{what}: not within {within:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The most a check of random backend choice may fail while the dataplane is right: the
/// tests make fewer than 100 such checks in a run, so a false failure is rarer than one run
/// in a million.
pub const FALSE_FAILURE: f64 = 1e-8;

/// How many new connections it takes for every one of `pods` equally likely backends to
/// have answered, but with a probability below `FALSE_FAILURE`: the smallest n with
/// pods · (1 − 1/pods)^n < FALSE_FAILURE (a union bound over the pods that could be
/// missed): 28 for 2 pods, 49 for 3.
pub fn connections_to_reach_all(pods: usize) -> usize {
    if pods <= 1 {
        return 1;
    }
    let miss_one = 1.0 - 1.0 / pods as f64;
    let mut n = 1;
    while pods as f64 * miss_one.powi(n as i32) >= FALSE_FAILURE {
        n += 1;
    }
    n
}

/// Makes new connections (`connect` returns the pod that answered one) until every pod of
/// `want` has answered and at least `min` connections were made, so that a pod that must not
/// answer gets as many chances to show as in a fixed sample of `min`. Fails at once on a pod
/// outside `want` or a failed connection, and when a pod of `want` has not answered after
/// `connections_to_reach_all` connections (or `min`, if more). The answers per pod.
pub fn answered_by(
    want: &BTreeSet<String>,
    min: usize,
    mut connect: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let most = connections_to_reach_all(want.len()).max(min);
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for made in 1..=most {
        let pod = connect().with_context(|| format!("connection {made} (answers so far {answers:?})"))?;
        if !want.contains(&pod) {
            bail!("answered by {pod}, want only {want:?} (answers so far {answers:?})");
        }
        *answers.entry(pod).or_default() += 1;
        if made >= min && answers.len() == want.len() {
            return Ok(answers);
        }
    }
    bail!("{most} connections were answered by {answers:?}, want every one of {want:?}")
}

/// The body of an HTTP/1.1 chunked response.
pub fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("chunk size")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(body);
        }
        body.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("chunk end")?;
    }
}

/// The value of the sample `series` (name and labels, exactly) in a Prometheus scrape.
pub fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.split(' ').next()?.parse().ok())
}

/// The Node objects with their InternalIP (the agents' SNAT address).
pub fn nodes_yaml(tb: &Testbed) -> String {
    tb.nodes
        .iter()
        .map(|node| {
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n---\n",
                node.name, node.ip
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_and_samples_are_read() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").unwrap(), "hello world");
        assert!(dechunk("5\r\nhel").is_err());
        let scrape = "# HELP x\nxlb_a{map=\"M\"} 3\nxlb_a 1.5 1700000000\n";
        assert_eq!(metric(scrape, r#"xlb_a{map="M"}"#), Some(3.0));
        assert_eq!(metric(scrape, "xlb_a"), Some(1.5));
        assert_eq!(metric(scrape, "xlb_b"), None);
    }

    #[test]
    fn connections_to_reach_all_bound_a_false_failure() {
        assert_eq!([1, 2, 3].map(connections_to_reach_all), [1, 28, 49]);
        for pods in 2..=5 {
            let n = connections_to_reach_all(pods) as i32;
            let miss = |n: i32| pods as f64 * (1.0 - 1.0 / pods as f64).powi(n);
            assert!(miss(n) < FALSE_FAILURE && miss(n - 1) >= FALSE_FAILURE, "{pods} pods: {n}");
        }
    }

    #[test]
    fn answered_by_stops_once_every_wanted_pod_answered_and_fails_on_any_other() {
        let want: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let replies = |pods: &'static [&'static str]| {
            let mut pods = pods.iter().cycle();
            move || Ok(pods.next().unwrap().to_string())
        };
        // Both answered by the 3rd connection, but at least 4 are made.
        let got = answered_by(&want, 4, replies(&["a", "a", "b"])).unwrap();
        assert_eq!(got, [("a".to_string(), 3), ("b".to_string(), 1)].into());
        // Past `min`, it stops at the first connection that completes the set.
        let got = answered_by(&want, 1, replies(&["a", "a", "a", "b"])).unwrap();
        assert_eq!(got.values().sum::<usize>(), 4);
        // A pod that must not answer fails the check, within `min` connections.
        let err = answered_by(&want, 4, replies(&["a", "b", "a", "c"])).unwrap_err();
        assert!(format!("{err:#}").contains("answered by c"), "{err:#}");
        // A wanted pod that never answers: after the bound, not forever.
        let mut made = 0;
        let err = answered_by(&want, 4, || {
            made += 1;
            Ok("a".to_string())
        })
        .unwrap_err();
        assert_eq!(made, 28, "{err:#}");
        // A failed connection fails the check.
        assert!(answered_by(&want, 1, || bail!("refused")).is_err());
    }
}
