//! The test server the testbed's pods run, after the kiada app of the seed article, and its
//! client.
//!
//! `kiada serve` answers HTTP on every `--tcp` port and datagrams on every `--udp` port with
//! who processed the request and which client address and port it saw (`GET /bytes/N`: N
//! bytes of a known pattern instead; a datagram `ECHO <bytes>`: the bytes after the answer
//! line); it prints `ready` once all ports listen. `kiada get tcp|udp ADDR:PORT` sends one request and prints the
//! answer line, then `peer ADDR:PORT` (TCP, from getpeername) or `from ADDR:PORT` (UDP,
//! where the answer came from): what a node's own process sees of a Service.
use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsFd as _, unix::net::UnixStream},
    process::ExitCode,
    thread,
    time::Duration,
};

use clap::{Parser, Subcommand, ValueEnum};
use xlb_tests::kiada::{self, Reply};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve on the given ports until killed.
    Serve {
        #[arg(long)]
        pod: String,
        #[arg(long)]
        node: String,
        #[arg(long, value_delimiter = ',')]
        tcp: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        udp: Vec<u16>,
    },
    /// Send one request; exit status 1 with the error on stderr when it fails.
    Get { proto: Proto, addr: SocketAddrV4 },
    /// A client that keeps one connected UDP socket to ADDR, as a resolver does, and sends a
    /// request every 50 ms: prints `answer POD` for each answer and `aborted` when the socket
    /// is destroyed under it (ECONNABORTED: it then connects a new one). Exits 0 once POD
    /// `--until` answered, 1 after `--within` seconds.
    UdpStream {
        addr: SocketAddrV4,
        #[arg(long)]
        until: String,
        #[arg(long)]
        within: f64,
    },
    /// A pod's socket factory: on standard input, a Unix socket to the test process, which
    /// asks for sockets and gets them created here, in this pod's namespace and cgroup
    /// (`xlb_tests::sockets`). Exits when the test process closes its end.
    Sockets,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

fn serve_http(stream: TcpStream, pod: &str, node: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let client = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let download = line.split_whitespace().nth(1).and_then(kiada::download_len);
    line.clear();
    let mut body_len = 0u64;
    while reader.read_line(&mut line)? > 0 && line != "\r\n" && line != "\n" {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                body_len = value.trim().parse().map_err(io::Error::other)?;
            }
        }
        line.clear();
    }
    // Read the whole body before answering: closing with unread data would reset the
    // connection under the client's upload.
    if io::copy(&mut reader.take(body_len), &mut io::sink())? != body_len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if let Some(len) = download {
        write!(
            &stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )?;
        return kiada::write_pattern(&stream, len);
    }
    let body = format!("{}\n", Reply { pod: pod.to_string(), node: node.to_string(), client });
    write!(
        &stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn serve(pod: String, node: String, tcp: &[u16], udp: &[u16]) -> anyhow::Result<()> {
    let mut handles = Vec::new();
    for port in tcp {
        let listener = TcpListener::bind(("0.0.0.0", *port))?;
        let (pod, node) = (pod.clone(), node.clone());
        handles.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (pod, node) = (pod.clone(), node.clone());
                thread::spawn(move || serve_http(stream, &pod, &node));
            }
        }));
    }
    for port in udp {
        let socket = UdpSocket::bind(("0.0.0.0", *port))?;
        let (pod, node) = (pod.clone(), node.clone());
        handles.push(thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, client)) = socket.recv_from(&mut buf) {
                let reply = Reply { pod: pod.clone(), node: node.clone(), client };
                let mut answer = format!("{reply}\n").into_bytes();
                // `ECHO <bytes>`: the bytes come back after the answer line.
                if let Some(payload) = buf[..len].strip_prefix(kiada::ECHO) {
                    answer.extend_from_slice(payload);
                }
                let _ = socket.send_to(&answer, client);
            }
        }));
    }
    println!("ready");
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}

fn get(proto: Proto, addr: SocketAddrV4) -> anyhow::Result<(Reply, &'static str, SocketAddr)> {
    Ok(match proto {
        Proto::Tcp => {
            let (reply, peer) = kiada::get_tcp(addr, CLIENT_TIMEOUT)?;
            (reply, "peer", peer)
        }
        Proto::Udp => {
            let (reply, from) = kiada::get_udp(addr, CLIENT_TIMEOUT)?;
            (reply, "from", from)
        }
    })
}

fn udp_stream(addr: SocketAddrV4, until: &str, within: Duration) -> anyhow::Result<ExitCode> {
    let deadline = std::time::Instant::now() + within;
    let mut out = io::stdout().lock();
    while std::time::Instant::now() < deadline {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut buf = [0u8; 2048];
        while std::time::Instant::now() < deadline {
            // A refused or lost datagram is sent again. A destroyed socket reports
            // ECONNABORTED once and is disconnected: sending fails with EDESTADDRREQ then.
            let received = socket.send(b"GET").and_then(|_| socket.recv(&mut buf));
            let aborted = |e: &io::Error| {
                e.raw_os_error() == Some(libc::ECONNABORTED)
                    || e.raw_os_error() == Some(libc::EDESTADDRREQ)
                        && socket.take_error().ok().flatten().and_then(|e| e.raw_os_error())
                            == Some(libc::ECONNABORTED)
            };
            match received {
                Ok(len) => {
                    let reply = kiada::parse_reply(&String::from_utf8_lossy(&buf[..len]))?;
                    writeln!(out, "answer {}", reply.pod)?;
                    out.flush()?;
                    if reply.pod == until {
                        return Ok(ExitCode::SUCCESS);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) if aborted(&e) => {
                    writeln!(out, "aborted")?;
                    out.flush()?;
                    break;
                }
                Err(_) => {}
            }
        }
    }
    Ok(ExitCode::FAILURE)
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Cmd::Serve { pod, node, tcp, udp } => serve(pod, node, &tcp, &udp).map(|()| ExitCode::SUCCESS),
        Cmd::UdpStream { addr, until, within } => udp_stream(addr, &until, Duration::from_secs_f64(within)),
        Cmd::Sockets => {
            let stdin = io::stdin().as_fd().try_clone_to_owned()?;
            xlb_tests::sockets::serve(UnixStream::from(stdin))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get { proto, addr } => match get(proto, addr) {
            Ok((reply, label, peer)) => {
                println!("{reply}\n{label} {peer}");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e:#}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}
