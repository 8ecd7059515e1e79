//! The test server the testbed's pods run, after the kiada app of the seed article: answers
//! HTTP on every `--tcp` port and datagrams on every `--udp` port with who processed the
//! request and which client address and port it saw. Prints `ready` once all ports listen.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    pod: String,
    #[arg(long)]
    node: String,
    #[arg(long, value_delimiter = ',')]
    tcp: Vec<u16>,
    #[arg(long, value_delimiter = ',')]
    udp: Vec<u16>,
}

fn answer(pod: &str, node: &str, client: SocketAddr) -> String {
    format!("Request processed by \"{pod}\" on node \"{node}\". Client IP: {client}\n")
}

fn serve_http(mut stream: TcpStream, pod: &str, node: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let client = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    // Read the request head; the body of a GET is empty.
    while reader.read_line(&mut line)? > 0 && line != "\r\n" && line != "\n" {
        line.clear();
    }
    let body = answer(pod, node, client);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut handles = Vec::new();
    for port in &args.tcp {
        let listener = TcpListener::bind(("0.0.0.0", *port))?;
        let (pod, node) = (args.pod.clone(), args.node.clone());
        handles.push(thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (pod, node) = (pod.clone(), node.clone());
                thread::spawn(move || serve_http(stream, &pod, &node));
            }
        }));
    }
    for port in &args.udp {
        let socket = UdpSocket::bind(("0.0.0.0", *port))?;
        let (pod, node) = (args.pod.clone(), args.node.clone());
        handles.push(thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((_, client)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(answer(&pod, &node, client).as_bytes(), client);
            }
        }));
    }
    println!("ready");
    for handle in handles {
        let _ = handle.join();
    }
    Ok(())
}
