//! Client side of the kiada test server: one short HTTP request per connection, or one
//! datagram, over sockets of the calling thread's pod (`sockets`). Shared by the in-process
//! tests and `kiada get`.
use std::{
    fmt,
    io::{Read as _, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use anyhow::{bail, Context as _};

use crate::sockets;

/// Who answered a request, and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub pod: String,
    pub node: String,
    pub client: SocketAddr,
}

/// The server's answer line (without the newline), the text `parse_reply` reads back.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Request processed by \"{}\" on node \"{}\". Client IP: {}",
            self.pod, self.node, self.client
        )
    }
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

/// One GET over a new connection, in the calling thread's namespace.
pub fn get(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<Reply> {
    get_tcp(addr, timeout).map(|(reply, _)| reply)
}

/// One GET over a new connection; also returns the peer the socket reports
/// (`getpeername`), which socket load balancing must keep at the Service address.
pub fn get_tcp(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<(Reply, SocketAddr)> {
    let mut stream = connect(addr, timeout)?;
    let peer = stream.peer_addr().with_context(|| format!("getpeername of the connection to {addr}"))?;
    write!(stream, "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("sending to {addr}"))?;
    Ok((read_reply(stream, addr)?, peer))
}

/// One POST with a body of `body_len` bytes: large uploads fill full-size segments, which
/// path MTU discovery must get through.
pub fn post(addr: SocketAddrV4, body_len: usize, timeout: Duration) -> anyhow::Result<Reply> {
    let mut stream = connect(addr, timeout)?;
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {body_len}\r\nConnection: close\r\n\r\n"
    )
    .and_then(|()| stream.write_all(&vec![b'x'; body_len]))
    .with_context(|| format!("sending {body_len} bytes to {addr}"))?;
    read_reply(stream, addr)
}

/// The path of a download of `len` bytes (`download`).
pub fn download_path(len: u64) -> String {
    format!("/bytes/{len}")
}

/// The length a download path asks for.
pub fn download_len(path: &str) -> Option<u64> {
    path.strip_prefix("/bytes/")?.parse().ok()
}

/// Byte `i` of every download: a pattern a dropped, repeated or corrupted segment breaks.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Writes `len` bytes of the download pattern (the server's side of `download`).
pub fn write_pattern(mut out: impl Write, len: u64) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let n = chunk.len().min((len - sent) as usize);
        for (j, byte) in chunk[..n].iter_mut().enumerate() {
            *byte = pattern(sent + j as u64);
        }
        out.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// Downloads `len` bytes from a kiada server over one connection and checks that every byte
/// arrived, in order and intact. `timeout` bounds each read and write.
pub fn download(addr: SocketAddrV4, len: u64, timeout: Duration) -> anyhow::Result<()> {
    let mut stream = connect(addr, timeout)?;
    let path = download_path(len);
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("sending to {addr}"))?;
    let mut reader = std::io::BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        if std::io::BufRead::read_line(&mut reader, &mut head)
            .with_context(|| format!("reading from {addr}"))?
            == 0
        {
            bail!("{addr} closed before the body: {head:?}");
        }
    }
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{addr} answered {head:?}");
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0u64;
    loop {
        let n =
            reader.read(&mut buf).with_context(|| format!("reading byte {received} of {len} from {addr}"))?;
        if n == 0 {
            break;
        }
        if let Some(j) = buf[..n].iter().enumerate().position(|(j, b)| *b != pattern(received + j as u64)) {
            bail!("byte {} of {len} from {addr} is wrong", received + j as u64);
        }
        received += n as u64;
    }
    if received != len {
        bail!("{received} of {len} bytes arrived from {addr}");
    }
    Ok(())
}

fn connect(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = sockets::tcp_connect(addr, timeout).with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

fn read_reply(mut stream: TcpStream, addr: SocketAddrV4) -> anyhow::Result<Reply> {
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

/// One datagram to `addr` and its answer, with the address the answer came from (socket
/// load balancing must show the Service address there). The socket is unconnected, as a
/// resolver's often is, with `IP_RECVERR`: an ICMP port unreachable then fails the receive
/// with "connection refused" instead of passing unseen.
pub fn get_udp(addr: SocketAddrV4, timeout: Duration) -> anyhow::Result<(Reply, SocketAddr)> {
    let socket =
        sockets::udp_bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with an int option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_RECVERR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting IP_RECVERR");
    }
    socket.set_read_timeout(Some(timeout))?;
    socket.send_to(b"GET", addr).with_context(|| format!("sending to {addr}"))?;
    let mut buf = [0u8; 2048];
    let (len, from) = socket.recv_from(&mut buf).with_context(|| format!("waiting for {addr}'s answer"))?;
    Ok((parse_reply(&String::from_utf8_lossy(&buf[..len]))?, from))
}

/// The start of a datagram whose bytes the server sends back after its answer line.
pub const ECHO: &[u8] = b"ECHO ";

/// One datagram of `len` bytes (more than a frame holds: the IP layer fragments it both
/// ways) to `addr`, echoed back: the answer, after checking every echoed byte.
pub fn udp_echo(addr: SocketAddrV4, len: usize, timeout: Duration) -> anyhow::Result<Reply> {
    let socket =
        sockets::udp_bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)).context("binding a UDP socket")?;
    socket.set_read_timeout(Some(timeout))?;
    let mut datagram = ECHO.to_vec();
    datagram.extend((0..len as u64).map(pattern));
    socket.send_to(&datagram, addr).with_context(|| format!("sending {len} bytes to {addr}"))?;
    let mut buf = vec![0u8; 65536];
    let (n, _) = socket.recv_from(&mut buf).with_context(|| format!("waiting for {addr}'s echo"))?;
    let answer = &buf[..n];
    let line_end = answer.iter().position(|b| *b == b'\n').context("no answer line")?;
    let echoed = &answer[line_end + 1..];
    if echoed != &datagram[ECHO.len()..] {
        bail!("{} of {len} bytes came back from {addr}, not all intact", echoed.len());
    }
    parse_reply(&String::from_utf8_lossy(&answer[..line_end]))
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
    fn the_answer_text_parses_back() {
        let reply = Reply {
            pod: "kiada-2".into(),
            node: "node-b".into(),
            client: "198.18.0.2:61000".parse().unwrap(),
        };
        assert_eq!(parse_reply(&format!("{reply}\n")).unwrap(), reply);
    }

    #[test]
    fn rejects_other_text() {
        assert!(parse_reply("hello").is_err());
    }
}
