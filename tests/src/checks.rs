//! Small helpers the integration tests share: waiting for a condition, reading the agent's
//! HTTP answers (chunked bodies, Prometheus samples) and the Node objects of a testbed.
use std::{
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
}
