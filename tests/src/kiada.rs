//! Client side of the kiada test server: one short HTTP request per connection.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context as _};

/// Who answered a request, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub pod: String,
    pub node: String,
    pub client: SocketAddr,
}

/// Parses `Request processed by "POD" on node "NODE". Client IP: ADDR:PORT`.
pub fn parse_reply(body: &str) -> anyhow::Result<Reply> {
    let fields: Vec<&str> = body.split('"').collect();
    let client = body.rsplit("Client IP: ").next().unwrap_or("").trim();
    match (fields.get(1), fields.get(3)) {
        (Some(pod), Some(node)) => Ok(Reply {
            pod: pod.to_string(),
            node: node.to_string(),
            client: client.parse().with_context(|| format!("client address in {body:?}"))?,
        }),
        _ => bail!("not a kiada answer: {body:?}"),
    }
}

/// One GET over a new connection. Must run inside the client's namespace.
pub fn get(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    let mut stream =
        TcpStream::connect_timeout(&addr.into(), timeout).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).with_context(|| format!("reading from {addr}"))?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        bail!("incomplete response from {addr}: {response:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr} answered {head:?}");
    }
    parse_reply(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_servers_answer() {
        let reply = parse_reply(
            "Request processed by \"kiada-1\" on node \"node-a\". Client IP: 198.18.0.100:40000\n",
        )
        .unwrap();
        assert_eq!(reply.pod, "kiada-1");
        assert_eq!(reply.node, "node-a");
        assert_eq!(reply.client, "198.18.0.100:40000".parse().unwrap());
    }

    #[test]
    fn rejects_other_text() {
        assert!(parse_reply("hello").is_err());
    }
}
