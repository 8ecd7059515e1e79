//! Fuzzing the packet path through BPF_PROG_TEST_RUN: random frames and mutations of valid
//! Service traffic (`XLB_FUZZ_FRAMES` program runs, default 1,000,000) through the four
//! packet hooks of the real programs (XDP, TC external, TC ingress, TC egress), each judged by
//! a userspace model of what the balancer owns (`Oracle`):
//!
//! - a frame it does not own comes out byte for byte as it went in, with PASS;
//! - such frames write nothing: the conntrack, service conntrack, SNAT and affinity maps and
//!   the Service counters are the same after a batch of them, keys and values;
//! - a frame it owns gets a verdict of its hook's set (XDP: PASS, DROP, TX; TC ingress, at
//!   external and pod interfaces: OK, SHOT, REDIRECT; TC egress: OK, SHOT). Passed, it
//!   changed only in the addresses, ports and checksums its translation may rewrite at that hook, to a backend, a frontend, a SNAT
//!   source or the client of a SNAT binding, with every checksum summing as before; bounced,
//!   it is exactly the ICMP port unreachable for a Service without endpoints.
//!
//! Owned: a well-formed IPv4 packet (ethertype 0x0800, version 4, IHL ≥ 5, a total length
//! that covers the headers and arrived whole, a TCP data offset ≥ 5 within the packet) that is
//! TCP or UDP to a programmed frontend or on a tracked tuple (a later fragment, which has no
//! L4 header: with the ports its first fragment left in `XLB_FRAGMENTS`; it may change only in
//! an address and the IPv4 header checksum), or an ICMP error (destination unreachable, time
//! exceeded, parameter problem) quoting a whole tracked flow;
//! per hook, as the pipeline looks them up. Tracked: the connections of `baseline`, put back
//! (and everything else removed) before each chunk of frames, so the LRU tables never fill.
//! In a chunk the frames the model does not own run first, with one map snapshot around them
//! all; then the owned ones.
//!
//! Frames come from the seed corpus in `tests/fuzz/corpus/` (one Ethernet frame per `.bin`;
//! a name starting `xdp-`, `tc-ingress-` or `tc-egress-` names the hook it is meant for;
//! rewritten by the ignored test `write_seed_corpus`): every seed runs at every hook as it
//! is, then mutations and random frames from a PRNG seeded with `XLB_FUZZ_SEED`. A failure
//! names that seed, the frame's number, hook and mutations, and the frame in hex with the
//! command that adds it to the corpus, where it runs first from then on. Needs root.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{Debug, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    ops::Range,
    path::PathBuf,
    time::Instant,
};

use aya::{
    maps::{HashMap, MapData},
    Pod,
};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    config::{SNAT_PORT_MAX, SNAT_PORT_MIN},
    conntrack::{CtBackend, CtEntry, CtKey, CT_STATE_ESTABLISHED, CT_STATE_OTHER},
    fragment::{FragmentKey, FragmentPorts},
    nat::NatEntry,
    proto,
    service::{ServiceKey, SVC_F_NO_ENDPOINTS},
};
use lb_userspace::dataplane::{stats::ServiceTraffic, Hook};
use xlb_tests::{
    frame::{
        self, next_hop_mtu, QuotedChecksum, ACK, FIN, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, NOP_OPTIONS, RST,
        SYN, WHOLE,
    },
    harness::*,
};

const DEFAULT_FRAMES: u64 = 1_000_000;
/// "xlb fuzz".
const DEFAULT_SEED: u64 = 0x786c_6220_6675_7a7a;
/// Frames between two resets of the per-connection maps.
const CHUNK: usize = 2048;
const MAX_FRAME: usize = 1514;
const HOOKS: [Hook; 4] = [Hook::XdpIngress, Hook::TcExternal, Hook::TcIngress, Hook::TcEgress];

const ETH_HLEN: usize = 14;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// Clients of the tracked connections besides `CLIENT`, and of new ones.
const CLIENT_B: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 101), 40001);
const CLIENT_NEW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 102), 40002);
const POD_A2_REMOTE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 45001);
const POD_NEW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 45010);
/// `POD_A` reaching itself through `CIP_LOCAL`.
const HAIRPIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 46000);
const HAIRPIN_NEW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 10), 46001);
/// The SNAT sources of the tracked SNATed connections.
const SNAT_B: SocketAddrV4 = SocketAddrV4::new(NODE_A, 61234);
const SNAT_HAIRPIN: SocketAddrV4 = SocketAddrV4::new(NODE_A, 61235);

/// The Services of both fixtures: every kind of frontend and policy.
fn harness() -> Harness {
    Harness::with(&format!("{CLUSTER}---{POLICIES}"))
}

/// The connections tracked before every chunk: one per kind, whose later packets, replies
/// and ICMP errors the seed corpus holds.
fn baseline(h: &Harness) -> Vec<Connection> {
    let connection = |proto, client, frontend, backend, snat, state| Connection {
        proto,
        client,
        frontend,
        backend,
        snat,
        state,
        stats_index: stats_index(h, frontend, proto),
    };
    let (tcp, udp, established) = (proto::TCP, proto::UDP, CT_STATE_ESTABLISHED);
    vec![
        connection(tcp, CLIENT, NP_LOCAL, POD_A, None, established),
        connection(tcp, CLIENT_B, NP_REMOTE, POD_B, Some(SNAT_B), established),
        connection(tcp, POD_A2, CIP_LOCAL, POD_A, None, established),
        connection(udp, POD_A2, CIP_LOCAL_DNS, POD_A_DNS, None, CT_STATE_OTHER),
        connection(tcp, HAIRPIN, CIP_LOCAL, POD_A, Some(SNAT_HAIRPIN), established),
        connection(tcp, POD_A2_REMOTE, CIP_REMOTE, POD_B, None, established),
    ]
}

/// The counter slot of `frontend`'s Service port.
fn stats_index(h: &Harness, frontend: SocketAddrV4, proto: u8) -> u16 {
    let service_port =
        &h.desired.frontends[&ServiceKey::new(*frontend.ip(), frontend.port(), proto)].service_port;
    let counted = h.writer.counted();
    *counted.iter().find(|(_, port)| *port == service_port).expect("a counted Service port").0
}

// ---------------------------------------------------------------------------------------
// The seed corpus.

/// The seed corpus: a frame for every path, named after the hook it is meant for.
fn seed_corpus() -> Vec<(&'static str, Vec<u8>)> {
    use frame::{icmp_error, quote, tcp, udp, vlan_tagged, with_ip_options};
    let frag_needed = |from: Ipv4Addr, to: Ipv4Addr, about: &[u8], quoted: usize| {
        icmp_error(from, to, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, next_hop_mtu(1000), quote(about, quoted))
    };
    let ipv6 = |last: u16, port: u16| {
        SocketAddrV6::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last), port, 0, 0)
    };
    vec![
        // From outside the node, at XDP: new connections, later packets of tracked ones, the
        // backend's reply to a SNAT port, and what is not the balancer's.
        ("xdp-syn-nodeport-local", tcp(CLIENT_NEW, NP_LOCAL, SYN)),
        ("xdp-ack-nodeport-local", tcp(CLIENT, NP_LOCAL, ACK)),
        ("xdp-fin-nodeport-local", tcp(CLIENT, NP_LOCAL, FIN | ACK)),
        ("xdp-rst-nodeport-local", tcp(CLIENT, NP_LOCAL, RST)),
        ("xdp-syn-nodeport-remote", tcp(CLIENT_NEW, NP_REMOTE, SYN)),
        ("xdp-ack-nodeport-remote", tcp(CLIENT_B, NP_REMOTE, ACK)),
        ("xdp-snat-reply", tcp(POD_B, SNAT_B, SYN | ACK)),
        ("xdp-syn-clusterip", tcp(CLIENT_NEW, CIP_LOCAL, SYN)),
        ("xdp-udp-clusterip", udp(CLIENT_NEW, CIP_LOCAL_DNS, true)),
        ("xdp-udp-clusterip-no-checksum", udp(CLIENT_NEW, CIP_LOCAL_DNS, false)),
        ("xdp-syn-no-endpoints", tcp(CLIENT_NEW, NP_EMPTY, SYN)),
        ("xdp-udp-no-endpoints", udp(CLIENT_NEW, NP_EMPTY_UDP, true)),
        ("xdp-syn-no-endpoints-ip-options", with_ip_options(&tcp(CLIENT_NEW, NP_EMPTY, SYN), &NOP_OPTIONS)),
        ("xdp-syn-etp-local", tcp(CLIENT_NEW, NP_ETP_LOCAL, SYN)),
        ("xdp-syn-etp-local-no-local-endpoint", tcp(CLIENT_NEW, NP_ETP_AWAY, SYN)),
        ("xdp-syn-session-affinity", tcp(CLIENT_NEW, NP_STICKY, SYN)),
        ("xdp-syn-lb-source-range-inside", tcp(CLIENT_NEW, LB_RANGES, SYN)),
        ("xdp-syn-lb-source-range-outside", tcp(OUTSIDER, LB_RANGES, SYN)),
        ("xdp-syn-external-ip", tcp(CLIENT_NEW, EXTERNAL_IP, SYN)),
        ("xdp-syn-ip-options", with_ip_options(&tcp(CLIENT_NEW, NP_LOCAL, SYN), &NOP_OPTIONS)),
        ("xdp-icmp-frag-needed-snat", frag_needed(NODE_B, NODE_A, &tcp(SNAT_B, POD_B, ACK), 8)),
        ("xdp-syn-vlan", vlan_tagged(&tcp(CLIENT_NEW, NP_LOCAL, SYN), 100)),
        ("xdp-syn-first-fragment", fragment(tcp(CLIENT_NEW, NP_LOCAL, SYN), true, 0)),
        ("xdp-syn-later-fragment", fragment(tcp(CLIENT_NEW, NP_LOCAL, SYN), false, 2)),
        ("xdp-icmp-echo-clusterip", frame::icmp_echo_request(*CLIENT.ip(), *CIP_LOCAL.ip())),
        ("xdp-icmp-echo-node", frame::icmp_echo_request(*CLIENT.ip(), NODE_A)),
        ("xdp-arp", frame::arp_request(*CLIENT.ip(), NODE_A)),
        ("xdp-ipv6-syn", frame::tcp6(ipv6(0x100, 40000), ipv6(1, 30080), SYN)),
        ("xdp-syn-node-ssh", tcp(CLIENT_NEW, SocketAddrV4::new(NODE_A, 22), SYN)),
        // From the node's pods, at TC ingress.
        ("tc-ingress-syn-clusterip", tcp(POD_NEW, CIP_LOCAL, SYN)),
        ("tc-ingress-ack-clusterip", tcp(POD_A2, CIP_LOCAL, ACK)),
        ("tc-ingress-fin-clusterip", tcp(POD_A2, CIP_LOCAL, FIN | ACK)),
        ("tc-ingress-rst-clusterip", tcp(POD_A2, CIP_LOCAL, RST | ACK)),
        ("tc-ingress-syn-clusterip-remote", tcp(POD_NEW, CIP_REMOTE, SYN)),
        ("tc-ingress-ack-clusterip-remote", tcp(POD_A2_REMOTE, CIP_REMOTE, ACK)),
        ("tc-ingress-udp-clusterip", udp(POD_A2, CIP_LOCAL_DNS, true)),
        ("tc-ingress-udp-clusterip-new", udp(POD_NEW, CIP_LOCAL_DNS, true)),
        ("tc-ingress-udp-clusterip-first-fragment", frame::fragments(&udp(POD_A2, CIP_LOCAL_DNS, true), 8).0),
        ("tc-ingress-udp-clusterip-later-fragment", frame::fragments(&udp(POD_A2, CIP_LOCAL_DNS, true), 8).1),
        ("tc-ingress-syn-no-endpoints", tcp(POD_NEW, CIP_EMPTY, SYN)),
        ("tc-ingress-udp-no-endpoints", udp(POD_NEW, CIP_EMPTY_DNS, true)),
        ("tc-ingress-syn-itp-local", tcp(POD_NEW, CIP_ITP_LOCAL, SYN)),
        ("tc-ingress-syn-itp-local-no-local-endpoint", tcp(POD_NEW, CIP_ITP_AWAY, SYN)),
        ("tc-ingress-syn-nodeport", tcp(POD_NEW, NP_REMOTE, SYN)),
        ("tc-ingress-syn-hairpin", tcp(HAIRPIN_NEW, CIP_LOCAL, SYN)),
        ("tc-ingress-hairpin-reply", tcp(POD_A, SNAT_HAIRPIN, SYN | ACK)),
        // Leaving the node, at TC egress: replies of backends, client packets to SNAT, ICMP
        // errors quoting tracked flows.
        ("tc-egress-reply-nodeport-local", tcp(POD_A, CLIENT, SYN | ACK)),
        ("tc-egress-snat-nodeport-remote", tcp(CLIENT_B, POD_B, ACK)),
        ("tc-egress-reply-nodeport-remote", tcp(POD_B, CLIENT_B, ACK)),
        ("tc-egress-reply-clusterip", tcp(POD_A, POD_A2, ACK)),
        ("tc-egress-reply-clusterip-remote", tcp(POD_B, POD_A2_REMOTE, FIN | ACK)),
        ("tc-egress-udp-reply", udp(POD_A_DNS, POD_A2, true)),
        ("tc-egress-udp-reply-later-fragment", frame::fragments(&udp(POD_A_DNS, POD_A2, true), 8).1),
        ("tc-egress-snat-hairpin", tcp(HAIRPIN, POD_A, ACK)),
        ("tc-egress-reply-hairpin", tcp(POD_A, HAIRPIN, ACK)),
        ("tc-egress-reply-untracked", tcp(POD_A, CLIENT_NEW, ACK)),
        (
            "tc-egress-icmp-port-unreachable-udp",
            icmp_error(
                *POD_A.ip(),
                *POD_A2.ip(),
                ICMP_DEST_UNREACH,
                frame::ICMP_PORT_UNREACH,
                [0; 4],
                quote(&udp(POD_A2, POD_A_DNS, true), WHOLE),
            ),
        ),
        (
            "tc-egress-icmp-frag-needed-router",
            frag_needed(ROUTER, *POD_A2.ip(), &tcp(POD_A2_REMOTE, POD_B, ACK), 8),
        ),
        (
            "tc-egress-icmp-frag-needed-router-whole",
            frag_needed(ROUTER, *POD_A2.ip(), &tcp(POD_A2_REMOTE, POD_B, ACK), WHOLE),
        ),
        (
            "tc-egress-icmp-frag-needed-snat-to-client",
            frag_needed(NODE_B, *CLIENT_B.ip(), &tcp(CLIENT_B, POD_B, ACK), 8),
        ),
        (
            "tc-egress-icmp-time-exceeded",
            icmp_error(
                ROUTER,
                *POD_A2.ip(),
                ICMP_TIME_EXCEEDED,
                0,
                [0; 4],
                quote(&tcp(POD_A2, POD_A, ACK), 8),
            ),
        ),
        (
            "tc-egress-icmp-parameter-problem-from-backend",
            icmp_error(
                *POD_A.ip(),
                *CLIENT.ip(),
                ICMP_PARAMETER_PROBLEM,
                0,
                [20, 0, 0, 0],
                quote(&tcp(CLIENT, POD_A, ACK), WHOLE),
            ),
        ),
        // Anywhere.
        ("any-tcp-between-routers", tcp(SocketAddrV4::new(ROUTER, 179), SocketAddrV4::new(NODE_B, 179), ACK)),
    ]
}

/// `frame` (IPv4, built by `frame`) as a fragment: MF and the offset in 8-byte units.
fn fragment(mut frame: Vec<u8>, more: bool, offset: u16) -> Vec<u8> {
    let flags = if more { 0x2000 } else { 0 } | offset;
    put(&mut frame, frame::offset::IP_FLAGS_FRAG, &flags.to_be_bytes());
    fix_checksums(&mut frame);
    frame
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus")
}

/// Writes the seed corpus into `tests/fuzz/corpus/`; other files there are left alone.
#[test]
#[ignore = "writes tests/fuzz/corpus/: run when the seeds change"]
fn write_seed_corpus() {
    let dir = corpus_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, frame) in seed_corpus() {
        std::fs::write(dir.join(format!("{name}.bin")), frame).unwrap();
    }
}

/// The corpus in the repository holds every seed as `seed_corpus` builds it now.
#[test]
fn seed_corpus_is_current() {
    for (name, frame) in seed_corpus() {
        let path = corpus_dir().join(format!("{name}.bin"));
        let stored = std::fs::read(&path).unwrap_or_default();
        assert!(
            stored == frame,
            "{} is missing or stale: run `cargo test --release -p xlb-tests --test fuzz -- --ignored \
             write_seed_corpus`",
            path.display()
        );
    }
}

struct Seed {
    name: String,
    /// The hook the seed is meant for, from its name.
    hook: Option<Hook>,
    frame: Vec<u8>,
}

/// Every `.bin` of the corpus, by name.
fn read_corpus() -> Vec<Seed> {
    let dir = corpus_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "bin"))
        .collect();
    paths.sort();
    assert!(!paths.is_empty(), "no seed in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let hook = [
                ("xdp-", Hook::XdpIngress),
                ("tc-external-", Hook::TcExternal),
                ("tc-ingress-", Hook::TcIngress),
                ("tc-egress-", Hook::TcEgress),
            ]
            .into_iter()
            .find(|(prefix, _)| name.starts_with(prefix))
            .map(|(_, hook)| hook);
            Seed { name, hook, frame: std::fs::read(&path).unwrap() }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The model: what the balancer owns.

/// A TCP or UDP header the programs may translate, or the one an ICMP error quotes: where
/// its headers are and its tuple as the maps key it (network byte order).
#[derive(Clone, Copy, Debug)]
struct Flow {
    l3: usize,
    l4: usize,
    key: CtKey,
    /// A later fragment: no L4 header at `l4`, its ports from its first fragment.
    later_fragment: bool,
}

impl Flow {
    fn csum_off(&self) -> usize {
        self.l4 + if self.key.proto == proto::TCP { 16 } else { 6 }
    }
}

#[derive(Clone, Copy, Debug)]
enum Parsed {
    Flow {
        flow: Flow,
        ihl: usize,
        total_len: usize,
    },
    /// `saddr`, `daddr`: the outer addresses, network byte order.
    IcmpError {
        l3: usize,
        ihl: usize,
        icmp: usize,
        saddr: u32,
        daddr: u32,
        inner: Flow,
    },
}

fn raw32(frame: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(frame[off..off + 4].try_into().unwrap())
}

fn raw16(frame: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([frame[off], frame[off + 1]])
}

fn be16(frame: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]))
}

fn put(frame: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(field) = frame.get_mut(off..off + bytes.len()) {
        field.copy_from_slice(bytes);
    }
}

/// The IPv4 header at `l3`: (header length, total length, protocol, source, destination,
/// fragment), or `None` when it is cut short, not version 4, shorter than 20 bytes, or its
/// total length does not cover it and 8 bytes more (1 more for a later fragment). The
/// fragment: `None` for a whole packet, else (later fragment, IPv4 identification as stored).
fn ipv4(frame: &[u8], l3: usize) -> Option<(usize, usize, u8, u32, u32, Option<(bool, u16)>)> {
    let header = frame.get(l3..l3 + 20)?;
    let ihl = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let flags_offset = u16::from_be_bytes([header[6], header[7]]);
    let later = flags_offset & 0x1fff != 0;
    let fragment = (later || flags_offset & 0x2000 != 0).then_some((later, raw16(header, 4)));
    if header[0] >> 4 != 4 || ihl < 20 || total_len < ihl + if later { 1 } else { 8 } {
        return None;
    }
    Some((ihl, total_len, header[9], raw32(header, 12), raw32(header, 16), fragment))
}

/// The tuple of the TCP/UDP header at `l4`, when its first 8 bytes are in the frame.
fn flow(frame: &[u8], l3: usize, l4: usize, proto: u8, saddr: u32, daddr: u32) -> Option<Flow> {
    frame.get(l4..l4 + 8)?;
    let (sport, dport) = (raw16(frame, l4), raw16(frame, l4 + 2));
    Some(Flow {
        l3,
        l4,
        key: CtKey { saddr, daddr, sport, dport, proto, _pad: [0; 3] },
        later_fragment: false,
    })
}

/// What the balancer may act on in `frame`; `fragments` gives the ports a later fragment's
/// first fragment left (`XLB_FRAGMENTS`).
fn parse(frame: &[u8], fragments: impl Fn(FragmentKey) -> Option<FragmentPorts>) -> Option<Parsed> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let l3 = ETH_HLEN;
    let (ihl, total_len, proto, saddr, daddr, fragment) = ipv4(frame, l3)?;
    // The whole packet must have arrived: the kernel drops a truncated one (ip_rcv_core).
    if l3 + total_len > frame.len() {
        return None;
    }
    let l4 = l3 + ihl;
    match proto {
        proto::TCP | proto::UDP if matches!(fragment, Some((true, _))) => {
            let id = fragment.map_or(0, |(_, id)| id);
            let ports = fragments(FragmentKey { saddr, daddr, id, proto, _pad: 0 })?;
            let key = CtKey { saddr, daddr, sport: ports.sport, dport: ports.dport, proto, _pad: [0; 3] };
            Some(Parsed::Flow { flow: Flow { l3, l4, key, later_fragment: true }, ihl, total_len })
        }
        proto::TCP | proto::UDP => {
            if proto == proto::TCP {
                let data_offset = usize::from(*frame.get(l4 + 12)? >> 4) * 4;
                if data_offset < 20 || ihl + data_offset > total_len {
                    return None;
                }
            }
            Some(Parsed::Flow { flow: flow(frame, l3, l4, proto, saddr, daddr)?, ihl, total_len })
        }
        proto::ICMP if fragment.is_none() => {
            if !matches!(
                frame.get(l4..l4 + 8)?[0],
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
            ) {
                return None;
            }
            let inner_l3 = l4 + 8;
            let (inner_ihl, _, inner_proto, inner_saddr, inner_daddr, inner_fragment) =
                ipv4(frame, inner_l3)?;
            if inner_ihl != 20 || inner_fragment.is_some() || !matches!(inner_proto, proto::TCP | proto::UDP)
            {
                return None;
            }
            let inner = flow(frame, inner_l3, inner_l3 + 20, inner_proto, inner_saddr, inner_daddr)?;
            Some(Parsed::IcmpError { l3, ihl, icmp: l4, saddr, daddr, inner })
        }
        _ => None,
    }
}

fn is_snat_port(port: u16) -> bool {
    (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&u16::from_be(port))
}

fn is_ingress(hook: Hook) -> bool {
    hook != Hook::TcEgress
}

/// What the programs were given: frontends and backends, and the keys of the connections
/// `baseline` tracks.
struct Oracle {
    /// Frontend → its `SVC_F_*` flags.
    frontends: BTreeMap<ServiceKey, u16>,
    /// The (address, port) of every frontend and of every backend, network byte order.
    frontend_ends: BTreeSet<(u32, u16)>,
    backends: BTreeSet<(u32, u16)>,
    snat_addr: u32,
    conntrack: BTreeSet<CtKey>,
    ct_service: BTreeSet<CtKey>,
    nat: BTreeSet<CtKey>,
}

impl Oracle {
    fn new(h: &Harness, baseline: &[Connection]) -> Self {
        let key =
            |a: SocketAddrV4, b: SocketAddrV4, proto| CtKey::new(*a.ip(), a.port(), *b.ip(), b.port(), proto);
        let frontends: BTreeMap<ServiceKey, u16> =
            h.desired.frontends.iter().map(|(k, f)| (*k, f.flags)).collect();
        Self {
            frontend_ends: frontends.keys().map(|k| (k.addr, k.port)).collect(),
            frontends,
            backends: h.desired.groups.values().flatten().map(|b| (b.addr, b.port)).collect(),
            snat_addr: u32::from(h.desired.snat_addr.expect("a SNAT address")).to_be(),
            conntrack: baseline.iter().map(|c| key(c.client, c.backend, c.proto)).collect(),
            ct_service: baseline.iter().map(|c| key(c.client, c.frontend, c.proto)).collect(),
            nat: baseline.iter().filter_map(|c| Some(key(c.backend, c.snat?, c.proto))).collect(),
        }
    }

    /// The flags of the frontend `key` is addressed to, if it is one.
    fn frontend(&self, key: &CtKey) -> Option<u16> {
        self.frontends
            .get(&ServiceKey { addr: key.daddr, port: key.dport, proto: key.proto, _pad: 0 })
            .copied()
    }

    /// Whether `hook` may act on `parsed`, as the pipeline looks it up.
    fn owns(&self, hook: Hook, parsed: &Parsed) -> bool {
        match (parsed, is_ingress(hook)) {
            // A backend's reply to a SNAT port, a tracked client's packet, a new connection.
            (Parsed::Flow { flow, .. }, true) => {
                let key = &flow.key;
                (is_snat_port(key.dport) && self.nat.contains(key))
                    || self.ct_service.contains(key)
                    || self.frontend(key).is_some()
            }
            // A backend's reply; a client's packet to the backend of a SNATed connection.
            (Parsed::Flow { flow, .. }, false) => {
                self.conntrack.contains(&flow.key.reversed()) || self.conntrack.contains(&flow.key)
            }
            // An error to a SNAT address about a packet from it.
            (Parsed::IcmpError { daddr, inner, .. }, true) => {
                is_snat_port(inner.key.sport)
                    && *daddr == inner.key.saddr
                    && self.nat.contains(&inner.key.reversed())
            }
            // An error about a client's packet to its backend.
            (Parsed::IcmpError { inner, .. }, false) => self.conntrack.contains(&inner.key),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Judging a program's output.

/// A frame to run: where it came from, for the failure message.
struct Case {
    /// Its number in the sequence `XLB_FUZZ_SEED` makes (0: the corpus as it is).
    number: u64,
    hook: Hook,
    seed: Option<usize>,
    ops: Vec<Op>,
    frame: Vec<u8>,
}

/// The ones' complement sum of `parts` (0xffff for a checksum that verifies), with its two
/// zeros made one.
fn sum(parts: &[&[u8]]) -> u16 {
    match !frame::checksum(parts) {
        0 => 0xffff,
        s => s,
    }
}

/// The TCP/UDP pseudo header and segment of a flow whose packet ends at `end`.
fn l4_sum(frame: &[u8], flow: &Flow, end: usize) -> u16 {
    let mut pseudo = frame[flow.l3 + 12..flow.l3 + 20].to_vec();
    pseudo.extend_from_slice(&[0, flow.key.proto]);
    pseudo.extend_from_slice(&((end - flow.l4) as u16).to_be_bytes());
    sum(&[&pseudo, &frame[flow.l4..end]])
}

/// Offsets of a translation's fields: (IPv4 address, L4 port) of one end.
fn end_offsets(flow: &Flow, source: bool) -> (usize, usize) {
    if source {
        (flow.l3 + 12, flow.l4)
    } else {
        (flow.l3 + 16, flow.l4 + 2)
    }
}

/// The (address, port) at `offsets`, network byte order.
fn endpoint(frame: &[u8], (addr, port): (usize, usize)) -> (u32, u16) {
    (raw32(frame, addr), raw16(frame, port))
}

/// The bytes `hook`'s translation of `parsed` may change: one end's address and port, and
/// the checksums covering them (for an ICMP error: in the quote and outside).
fn rewritable(hook: Hook, parsed: &Parsed) -> Vec<Range<usize>> {
    let ingress = is_ingress(hook);
    let fields = |flow: &Flow, source: bool| {
        let (addr, port) = end_offsets(flow, source);
        [addr..addr + 4, port..port + 2, flow.l3 + 10..flow.l3 + 12]
    };
    match parsed {
        // A later fragment: only the address and the IPv4 header checksum.
        Parsed::Flow { flow, .. } if flow.later_fragment => {
            let (addr, _) = end_offsets(flow, !ingress);
            vec![addr..addr + 4, flow.l3 + 10..flow.l3 + 12]
        }
        // Ingress translates destinations (DNAT, SNAT undone), egress sources.
        Parsed::Flow { flow, .. } => {
            let mut ranges = fields(flow, !ingress).to_vec();
            ranges.push(flow.csum_off()..flow.csum_off() + 2);
            ranges
        }
        // Ingress: the client back as the quoted source and the outer destination; egress:
        // the frontend as the quoted destination and maybe the outer source.
        Parsed::IcmpError { l3, icmp, inner, .. } => {
            let outer = if ingress { l3 + 16 } else { l3 + 12 };
            let mut ranges = fields(inner, ingress).to_vec();
            ranges.extend([inner.csum_off()..inner.csum_off() + 2, outer..outer + 4, l3 + 10..l3 + 12]);
            ranges.push(icmp + 2..icmp + 4);
            ranges
        }
    }
}

/// What is wrong with `out`, `hook`'s translation of the owned packet `input` it passed.
fn judge_translation(
    oracle: &Oracle,
    h: &Harness,
    hook: Hook,
    parsed: &Parsed,
    input: &[u8],
    out: &[u8],
) -> Option<String> {
    if out.len() != input.len() {
        return Some(format!("a passed frame changed length: {} → {} bytes", input.len(), out.len()));
    }
    let allowed = rewritable(hook, parsed);
    if let Some(at) =
        (0..input.len()).find(|&i| input[i] != out[i] && !allowed.iter().any(|r| r.contains(&i)))
    {
        return Some(format!(
            "byte {at} changed ({:#04x} → {:#04x}), not a field NAT may rewrite",
            input[at], out[at]
        ));
    }
    if out == input {
        return None;
    }
    let ingress = is_ingress(hook);
    let nat_client = |key: &CtKey| h.nat.get(key, 0).ok().map(|c| (c.addr, c.port));
    match parsed {
        Parsed::Flow { flow, ihl, total_len } => {
            let ip = flow.l3..flow.l3 + ihl;
            if sum(&[&input[ip.clone()]]) != sum(&[&out[ip]]) {
                return Some("the IPv4 header checksum no longer sums as before".into());
            }
            let end = flow.l3 + total_len;
            if flow.later_fragment {
                // No L4 header: the address must be one a translation of its flow gives.
                let to = raw32(out, end_offsets(flow, !ingress).0);
                let plausible = if ingress {
                    oracle.backends.iter().any(|b| b.0 == to)
                        || nat_client(&flow.key).is_some_and(|c| c.0 == to)
                } else {
                    oracle.frontend_ends.iter().any(|f| f.0 == to) || to == oracle.snat_addr
                };
                return (!plausible)
                    .then(|| format!("a later fragment translated to {to:#x}, no flow's address"));
            }
            let csum = be16(input, flow.csum_off()).unwrap();
            if flow.key.proto == proto::UDP && csum == 0 {
                if be16(out, flow.csum_off()) != Some(0) {
                    return Some("a UDP datagram without checksum got one".into());
                }
            } else if l4_sum(input, flow, end) != l4_sum(out, flow, end) {
                return Some("the TCP/UDP checksum no longer sums as before".into());
            }
            let to = endpoint(out, end_offsets(flow, !ingress));
            let plausible = if ingress {
                oracle.backends.contains(&to) || nat_client(&flow.key) == Some(to)
            } else {
                oracle.frontend_ends.contains(&to) || (to.0 == oracle.snat_addr && is_snat_port(to.1))
            };
            (!plausible)
                .then(|| format!("translated to {}, no backend, frontend, SNAT source or client", show(to)))
        }
        Parsed::IcmpError { l3, ihl, icmp, saddr, inner, .. } => {
            let sums = |f: &[u8]| {
                (sum(&[&f[*l3..l3 + ihl]]), sum(&[&f[inner.l3..inner.l3 + 20]]), sum(&[&f[*icmp..]]))
            };
            if sums(input) != sums(out) {
                return Some("an ICMP error's checksums no longer sum as before".into());
            }
            let quoted = endpoint(out, end_offsets(inner, ingress));
            let (outer_src, outer_dst) = (raw32(out, l3 + 12), raw32(out, l3 + 16));
            if ingress {
                let client = nat_client(&inner.key.reversed());
                (client != Some(quoted) || outer_dst != quoted.0)
                    .then(|| format!("the error went to {}, not the SNAT binding's client", show(quoted)))
            } else if !oracle.frontend_ends.contains(&quoted) {
                Some(format!("the error quotes {}, no frontend", show(quoted)))
            } else {
                (outer_src != *saddr && outer_src != quoted.0)
                    .then(|| "the error's source changed to another address than its frontend's".into())
            }
        }
    }
}

fn show((addr, port): (u32, u16)) -> String {
    format!("{}:{}", Ipv4Addr::from(u32::from_be(addr)), u16::from_be(port))
}

/// Whether BPF_PROG_TEST_RUN refuses to run `hook` on `frame` (measured on Linux 6.18): no
/// Ethernet header, or an skb whose IPv4 or IPv6 header is cut short.
fn refused(hook: Hook, frame: &[u8]) -> bool {
    let ethertype = be16(frame, 12);
    frame.len() < ETH_HLEN
        || (hook != Hook::XdpIngress
            && ((ethertype == Some(0x0800) && frame.len() < ETH_HLEN + 20)
                || (ethertype == Some(0x86dd) && frame.len() < ETH_HLEN + 40)))
}

// ---------------------------------------------------------------------------------------
// Map snapshots.

#[derive(Debug, PartialEq)]
struct Snapshot {
    conntrack: BTreeMap<CtKey, CtEntry>,
    ct_service: BTreeMap<CtKey, CtBackend>,
    nat: BTreeMap<CtKey, NatEntry>,
    affinity: BTreeMap<AffinityKey, AffinityEntry>,
    traffic: Vec<ServiceTraffic>,
}

fn entries<K: Pod + Ord, V: Pod>(map: &HashMap<MapData, K, V>) -> BTreeMap<K, V> {
    map.iter().map(|entry| entry.expect("map entry")).collect()
}

fn snapshot(h: &Harness) -> Snapshot {
    Snapshot {
        conntrack: entries(&h.conntrack),
        ct_service: entries(&h.ct_service),
        nat: entries(&h.nat),
        affinity: entries(&h.affinity),
        traffic: h.writer.traffic().expect("counters"),
    }
}

/// A tuple as the maps key it, readable.
fn show_key(key: &CtKey) -> String {
    let proto = match key.proto {
        proto::TCP => "tcp",
        proto::UDP => "udp",
        _ => "?",
    };
    format!("{proto} {} → {}", show((key.saddr, key.sport)), show((key.daddr, key.dport)))
}

fn diff_map<K: Ord, V: PartialEq + Debug>(
    name: &str,
    (a, b): (&BTreeMap<K, V>, &BTreeMap<K, V>),
    show_key: impl Fn(&K) -> String,
    out: &mut String,
) {
    for (k, v) in b {
        match a.get(k) {
            None => writeln!(out, "  {name}: added {} → {v:?}", show_key(k)).unwrap(),
            Some(old) if old != v => {
                writeln!(out, "  {name}: {} changed {old:?} → {v:?}", show_key(k)).unwrap()
            }
            Some(_) => {}
        }
    }
    for k in a.keys().filter(|k| !b.contains_key(k)) {
        writeln!(out, "  {name}: removed {}", show_key(k)).unwrap();
    }
}

fn diff(a: &Snapshot, b: &Snapshot) -> String {
    let mut out = String::new();
    diff_map("XLB_CONNTRACK", (&a.conntrack, &b.conntrack), show_key, &mut out);
    diff_map("XLB_CT_SERVICE", (&a.ct_service, &b.ct_service), show_key, &mut out);
    diff_map("XLB_NAT", (&a.nat, &b.nat), show_key, &mut out);
    diff_map("XLB_AFFINITY", (&a.affinity, &b.affinity), |k| format!("{k:?}"), &mut out);
    for (before, after) in a.traffic.iter().zip(&b.traffic).filter(|(before, after)| before != after) {
        writeln!(out, "  counters: {before:?} → {after:?}").unwrap();
    }
    out
}

fn clear<K: Pod, V: Pod>(map: &mut HashMap<MapData, K, V>) {
    let keys: Vec<K> = map.keys().map(|key| key.expect("map key")).collect();
    for key in keys {
        map.remove(&key).expect("remove");
    }
}

/// Empties the per-connection maps, then tracks `baseline`'s connections afresh, each with a
/// datagram in flight in both directions whose first fragment was translated (IPv4
/// identification 0x1234, as every frame here has it), so later fragments can be owned.
fn reset(h: &mut Harness, baseline: &[Connection]) {
    clear(&mut h.conntrack);
    clear(&mut h.ct_service);
    clear(&mut h.nat);
    clear(&mut h.affinity);
    clear(&mut h.fragments);
    let now = monotonic_ns();
    for connection in baseline {
        h.track(connection, now);
        let be = |a: SocketAddrV4| (u32::from(*a.ip()).to_be(), a.port().to_be());
        let arrivals = [(connection.client, connection.frontend), (connection.backend, connection.client)];
        for ((saddr, sport), (daddr, dport)) in arrivals.map(|(from, to)| (be(from), be(to))) {
            let key = FragmentKey { saddr, daddr, id: 0x1234u16.to_be(), proto: connection.proto, _pad: 0 };
            h.fragments.insert(key, FragmentPorts { sport, dport }, 0).expect("fragment entry");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Making frames.

/// SplitMix64: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`, `n > 0`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Uniform in `low..=high`.
    fn within(&mut self, low: usize, high: usize) -> usize {
        low + self.below(high - low + 1)
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// A position in a frame of `len > 0` bytes, mostly in the headers.
    fn position(&mut self, len: usize) -> usize {
        if self.percent(75) {
            self.below(len.min(80))
        } else {
            self.below(len)
        }
    }
}

/// What was done to a frame, for the failure message.
#[derive(Clone, Debug)]
#[expect(dead_code, reason = "the fields are read through Debug, in failure messages")]
enum Op {
    Random {
        len: usize,
        ipv4: bool,
    },
    Verbatim,
    FlipBits(Vec<usize>),
    Overwrite {
        at: usize,
        value: u8,
    },
    Overwrite16 {
        at: usize,
        value: u16,
    },
    Truncate(usize),
    Extend(usize),
    /// A header field (named) set to a value.
    Field(&'static str, u32),
    Splice {
        at: usize,
        with: String,
        from: usize,
    },
    Insert {
        at: usize,
        len: usize,
    },
    Delete {
        at: usize,
        len: usize,
    },
    FixChecksums,
}

/// Where the headers of `frame` would be, taken at their word (IHL at least 5).
struct Layout {
    l3: usize,
    l4: usize,
    proto: u8,
    total_len: usize,
    inner_l3: usize,
    inner_l4: usize,
}

fn layout(frame: &[u8]) -> Layout {
    let ihl = |at: usize| frame.get(at).map_or(20, |b| (usize::from(b & 0x0f) * 4).max(20));
    let l3 = ETH_HLEN;
    let l4 = l3 + ihl(l3);
    let inner_l3 = l4 + 8;
    Layout {
        l3,
        l4,
        proto: frame.get(l3 + 9).copied().unwrap_or(0),
        total_len: usize::from(be16(frame, l3 + 2).unwrap_or(0)),
        inner_l3,
        inner_l4: inner_l3 + ihl(inner_l3),
    }
}

/// Every header boundary of `frame`'s layout and the bytes around the fields the parser
/// reads: where truncations and splices cut.
fn boundaries(frame: &[u8]) -> Vec<usize> {
    let at = layout(frame);
    let data_offset = frame.get(at.l4 + 12).map_or(20, |b| usize::from(b >> 4) * 4);
    let mut cuts = vec![0, 1, 6, 12, 13, ETH_HLEN, ETH_HLEN + 1];
    cuts.extend([2, 4, 9, 10, 12, 16, 19, 20].map(|o| at.l3 + o));
    cuts.extend([0, 1, 2, 4, 6, 7, 8, 12, 13, 14, 16, 18, 19, 20, data_offset].map(|o| at.l4 + o));
    cuts.extend([0, 2, 9, 10, 12, 16, 19, 20].map(|o| at.inner_l3 + o));
    cuts.extend([0, 2, 4, 6, 7, 8, 16, 18].map(|o| at.inner_l4 + o));
    let end = at.l3 + at.total_len;
    cuts.extend([end.saturating_sub(1), end, end + 1]);
    cuts.retain(|&c| c <= frame.len());
    cuts
}

/// Recomputes the IPv4 header checksum and the TCP, UDP or ICMP one (and an ICMP error's
/// quoted IPv4 header checksum) over what the headers claim, as far as the frame goes.
fn fix_checksums(frame: &mut [u8]) {
    if frame.get(12..14) != Some(&[0x08, 0x00][..]) || frame.len() < ETH_HLEN + 20 {
        return;
    }
    let at = layout(frame);
    if at.l4 <= frame.len() {
        refresh(frame, at.l3 + 10, &[], at.l3..at.l4);
    }
    let end = (at.l3 + at.total_len).min(frame.len());
    match at.proto {
        proto::TCP | proto::UDP => {
            let csum = at.l4 + if at.proto == proto::TCP { 16 } else { 6 };
            if end < csum + 2 {
                return;
            }
            let mut pseudo = frame[at.l3 + 12..at.l3 + 20].to_vec();
            pseudo.extend_from_slice(&[0, at.proto]);
            pseudo.extend_from_slice(&((end - at.l4) as u16).to_be_bytes());
            refresh(frame, csum, &pseudo, at.l4..end);
            if at.proto == proto::UDP && be16(frame, csum) == Some(0) {
                put(frame, csum, &[0xff, 0xff]);
            }
        }
        proto::ICMP if end >= at.l4 + 4 => {
            if at.inner_l4 <= end {
                refresh(frame, at.inner_l3 + 10, &[], at.inner_l3..at.inner_l4);
            }
            refresh(frame, at.l4 + 2, &[], at.l4..end);
        }
        _ => {}
    }
}

/// Sets the checksum at `at` to the one of `pseudo` and `covered` (which holds it).
fn refresh(frame: &mut [u8], at: usize, pseudo: &[u8], covered: Range<usize>) {
    put(frame, at, &[0, 0]);
    let c = frame::checksum(&[pseudo, &frame[covered]]);
    put(frame, at, &c.to_be_bytes());
}

/// Values worth trying in fields: the cluster's addresses and ports, edges and the rest.
struct Pools {
    addrs: Vec<[u8; 4]>,
    ports: Vec<u16>,
}

impl Pools {
    fn new(oracle: &Oracle) -> Self {
        let mut addrs: BTreeSet<[u8; 4]> = [
            NODE_A,
            NODE_B,
            ROUTER,
            *CLIENT.ip(),
            *CLIENT_B.ip(),
            *CLIENT_NEW.ip(),
            *POD_A2.ip(),
            *OUTSIDER.ip(),
        ]
        .iter()
        .map(|a| a.octets())
        .collect();
        addrs.extend([[0, 0, 0, 0], [255, 255, 255, 255], [127, 0, 0, 1], [198, 19, 0, 0]]);
        let mut ports: BTreeSet<u16> = [0, 1, 22, 179, 1023, 1024, 32768, 60999, 61000, 65535].into();
        for &(addr, port) in oracle.frontend_ends.iter().chain(&oracle.backends) {
            addrs.insert(addr.to_ne_bytes());
            ports.insert(u16::from_be(port));
        }
        ports.extend(
            [CLIENT, CLIENT_B, CLIENT_NEW, POD_A2, POD_A2_REMOTE, POD_NEW, HAIRPIN, SNAT_B, SNAT_HAIRPIN]
                .map(|a| a.port()),
        );
        Self { addrs: addrs.into_iter().collect(), ports: ports.into_iter().collect() }
    }
}

struct Mutator {
    rng: Rng,
    pools: Pools,
}

impl Mutator {
    /// A frame of random bytes, of a length biased toward the headers' sizes; half of them
    /// made IPv4 TCP, UDP or ICMP in their first bytes, to get past the first checks.
    fn random(&mut self) -> (Vec<u8>, Op) {
        let len = match self.rng.below(100) {
            0..=54 => self.rng.within(ETH_HLEN, 80),
            55..=59 => self.rng.below(ETH_HLEN),
            _ => self.rng.within(0, MAX_FRAME),
        };
        let mut frame = self.rng.bytes(len);
        let ipv4 = self.rng.percent(50);
        if ipv4 {
            put(&mut frame, 12, &[0x08, 0x00, 0x45]);
            put(&mut frame, ETH_HLEN + 2, &(len.saturating_sub(ETH_HLEN) as u16).to_be_bytes());
            put(&mut frame, ETH_HLEN + 6, &[0, 0]);
            let proto = self.rng.pick(&[proto::TCP, proto::UDP, proto::ICMP]);
            put(&mut frame, ETH_HLEN + 9, &[proto]);
            if self.rng.percent(30) {
                let addr = self.rng.pick(&self.pools.addrs);
                let port = self.rng.pick(&self.pools.ports);
                put(&mut frame, ETH_HLEN + 16, &addr);
                put(&mut frame, ETH_HLEN + 22, &port.to_be_bytes());
            }
        }
        (frame, Op::Random { len, ipv4 })
    }

    /// One to four mutations of `frame`, sometimes with checksums fixed after them.
    fn mutate(&mut self, frame: &mut Vec<u8>, corpus: &[Seed], ops: &mut Vec<Op>) {
        for _ in 0..self.rng.within(1, 4) {
            let op = match self.rng.below(100) {
                0..=14 => self.flip_bits(frame),
                15..=29 => self.overwrite(frame),
                30..=39 => self.truncate(frame),
                40..=45 => self.extend(frame),
                46..=83 => self.field(frame),
                84..=91 => self.splice(frame, corpus),
                _ => self.shift(frame),
            };
            ops.push(op);
        }
        if self.rng.percent(35) {
            fix_checksums(frame);
            ops.push(Op::FixChecksums);
        }
        frame.truncate(MAX_FRAME);
    }

    fn flip_bits(&mut self, frame: &mut Vec<u8>) -> Op {
        if frame.is_empty() {
            return self.extend(frame);
        }
        let bits: Vec<usize> = (0..self.rng.within(1, 4))
            .map(|_| self.rng.position(frame.len()) * 8 + self.rng.below(8))
            .collect();
        for bit in &bits {
            frame[bit / 8] ^= 1 << (bit % 8);
        }
        Op::FlipBits(bits)
    }

    fn overwrite(&mut self, frame: &mut Vec<u8>) -> Op {
        if frame.is_empty() {
            return self.extend(frame);
        }
        let at = self.rng.position(frame.len());
        if self.rng.percent(50) {
            let value = self
                .rng
                .pick(&[0, 1, 0x05, 0x0f, 0x10, 0x14, 0x20, 0x40, 0x45, 0x4f, 0x50, 0x7f, 0x80, 0xff]);
            frame[at] = value;
            Op::Overwrite { at, value }
        } else {
            let len = frame.len();
            let lengths =
                [len, len - 1, len + 1, len.saturating_sub(ETH_HLEN), len.saturating_sub(ETH_HLEN + 20)];
            let value = match self.rng.below(3) {
                0 => self.rng.pick(&lengths) as u16,
                _ => self.rng.pick(&[0, 1, 7, 8, 20, 28, 40, 60, 0x7fff, 0x8000, 0xffff]),
            };
            put(frame, at, &value.to_be_bytes());
            Op::Overwrite16 { at, value }
        }
    }

    fn truncate(&mut self, frame: &mut Vec<u8>) -> Op {
        let cuts = boundaries(frame);
        let at = (self.rng.pick(&cuts) + self.rng.below(3)).saturating_sub(1).min(frame.len());
        frame.truncate(at);
        Op::Truncate(at)
    }

    fn extend(&mut self, frame: &mut Vec<u8>) -> Op {
        let room = MAX_FRAME.saturating_sub(frame.len()).max(1);
        let len =
            if self.rng.percent(60) { self.rng.within(1, 16.min(room)) } else { self.rng.within(1, room) };
        frame.extend(self.rng.bytes(len));
        Op::Extend(len)
    }

    fn splice(&mut self, frame: &mut Vec<u8>, corpus: &[Seed]) -> Op {
        let other = &corpus[self.rng.below(corpus.len())];
        let at = self.rng.pick(&boundaries(frame));
        let from = if self.rng.percent(60) {
            at.min(other.frame.len())
        } else {
            self.rng.pick(&boundaries(&other.frame))
        };
        frame.truncate(at);
        frame.extend_from_slice(&other.frame[from..]);
        Op::Splice { at, with: other.name.clone(), from }
    }

    /// Inserts or deletes a few bytes inside the headers: every later field moves.
    fn shift(&mut self, frame: &mut Vec<u8>) -> Op {
        let at = self.rng.position(frame.len() + 1).min(frame.len());
        let len = self.rng.within(1, 8);
        if self.rng.percent(50) {
            let bytes = self.rng.bytes(len);
            frame.splice(at..at, bytes);
            Op::Insert { at, len }
        } else {
            let len = len.min(frame.len() - at);
            frame.drain(at..at + len);
            Op::Delete { at, len }
        }
    }

    /// Sets a header field of the outer headers, or of those an ICMP error quotes, to a value
    /// the parser draws a line at, a value of the cluster or a random one.
    fn field(&mut self, frame: &mut [u8]) -> Op {
        let at = layout(frame);
        let ip_payload = frame.len().saturating_sub(at.l3) as u32;
        let l4_payload = frame.len().saturating_sub(at.l4) as u32;
        let random = self.rng.next() as u32;
        let addr = u32::from_be_bytes(self.rng.pick(&self.pools.addrs));
        let port = u32::from(self.rng.pick(&self.pools.ports));
        let ihl = if self.rng.percent(60) { self.rng.pick(&[0, 1, 4, 5, 6, 15]) } else { random & 0x0f };
        let version_ihl = if self.rng.percent(80) { 4 << 4 } else { random & 0xf0 } | ihl;
        let fragment = self.rng.pick(&[0x2000, 0x0001, 0x1fff, 0x4000, 0x8000, 0x6000, 0, random & 0xffff]);
        let protocol = self.rng.pick(&[1, 6, 17, 0, 4, 41, 47, 50, 132, 255, random & 0xff]);
        let mostly = |rng: &mut Rng, values: &[u32], width_mask: u32| {
            if rng.percent(80) {
                rng.pick(values)
            } else {
                random & width_mask
            }
        };
        // (name, offset, width, value): 1, 2 or 4 bytes, big-endian. The lengths and the TCP
        // data offset, where the parser draws its lines, twice as often.
        let (name, off, width, value) = match self.rng.below(25) {
            0 => (
                "ethertype",
                12,
                2,
                mostly(&mut self.rng, &[0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0], 0xffff),
            ),
            1 => ("version, IHL", at.l3, 1, version_ihl),
            2 | 3 => {
                let values =
                    [0, 20, 27, 28, 39, 40, ip_payload.wrapping_sub(1), ip_payload, ip_payload + 1, 0xffff];
                ("total length", at.l3 + 2, 2, mostly(&mut self.rng, &values, 0xffff))
            }
            4 => ("fragment", at.l3 + 6, 2, fragment),
            5 => ("protocol", at.l3 + 9, 1, protocol),
            6 => ("source address", at.l3 + 12, 4, addr),
            7 => ("destination address", at.l3 + 16, 4, addr),
            8 => return swap(frame, "addresses swapped", at.l3 + 12, at.l3 + 16, 4),
            9 => ("source port", at.l4, 2, port),
            10 => ("destination port", at.l4 + 2, 2, port),
            11 => return swap(frame, "ports swapped", at.l4, at.l4 + 2, 2),
            12 | 13 => {
                let offset = mostly(&mut self.rng, &[0, 1, 4, 5, 6, 15], 0x0f);
                let reserved = u32::from(frame.get(at.l4 + 12).map_or(0, |b| b & 0x0f));
                ("TCP data offset", at.l4 + 12, 1, offset << 4 | reserved)
            }
            14 => (
                "TCP flags",
                at.l4 + 13,
                1,
                mostly(&mut self.rng, &[0x02, 0x10, 0x12, 0x11, 0x04, 0x14, 0, 0xff], 0xff),
            ),
            15 | 16 => {
                let values = [0, 7, 8, l4_payload.wrapping_sub(1), l4_payload, l4_payload + 1, 0xffff];
                ("UDP length", at.l4 + 4, 2, mostly(&mut self.rng, &values, 0xffff))
            }
            17 => ("ICMP type", at.l4, 1, mostly(&mut self.rng, &[0, 3, 4, 5, 8, 11, 12, 13], 0xff)),
            18 => ("quoted version, IHL", at.inner_l3, 1, version_ihl),
            19 => (
                "quoted total length",
                at.inner_l3 + 2,
                2,
                mostly(&mut self.rng, &[0, 20, 27, 28, 40, 0xffff], 0xffff),
            ),
            20 => ("quoted fragment", at.inner_l3 + 6, 2, fragment),
            21 => ("quoted protocol", at.inner_l3 + 9, 1, protocol),
            22 => ("quoted address", at.inner_l3 + if self.rng.percent(50) { 12 } else { 16 }, 4, addr),
            23 => ("quoted port", at.inner_l4 + if self.rng.percent(50) { 0 } else { 2 }, 2, port),
            _ => return swap(frame, "quoted addresses swapped", at.inner_l3 + 12, at.inner_l3 + 16, 4),
        };
        put(frame, off, &value.to_be_bytes()[4 - width..]);
        Op::Field(name, value)
    }
}

/// Swaps the `width`-byte fields at `a` and `b`, when both are in the frame.
fn swap(frame: &mut [u8], name: &'static str, a: usize, b: usize, width: usize) -> Op {
    if b + width <= frame.len() {
        let first = frame[a..a + width].to_vec();
        frame.copy_within(b..b + width, a);
        frame[b..b + width].copy_from_slice(&first);
    }
    Op::Field(name, 0)
}

// ---------------------------------------------------------------------------------------
// The run.

/// What the frames did, per hook (`HOOKS` order).
#[derive(Default)]
struct Tally {
    runs: [u64; HOOKS.len()],
    refused: [u64; HOOKS.len()],
    not_owned: u64,
    owned: u64,
    translated: u64,
    untouched: u64,
    dropped: u64,
    bounced: u64,
}

fn hook_index(hook: Hook) -> usize {
    HOOKS.iter().position(|&h| h == hook).unwrap()
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Err(_) => default,
        Ok(v) => match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        }
        .unwrap_or_else(|e| panic!("{name}={v}: {e}")),
    }
}

struct Fuzzer {
    h: Harness,
    baseline: Vec<Connection>,
    oracle: Oracle,
    corpus: Vec<Seed>,
    mutator: Mutator,
    seed: u64,
    numbered: u64,
    tally: Tally,
}

impl Fuzzer {
    fn new(seed: u64) -> Self {
        let h = harness();
        let baseline = baseline(&h);
        let oracle = Oracle::new(&h, &baseline);
        let mutator = Mutator { rng: Rng(seed), pools: Pools::new(&oracle) };
        Self {
            h,
            baseline,
            oracle,
            corpus: read_corpus(),
            mutator,
            seed,
            numbered: 0,
            tally: Tally::default(),
        }
    }

    /// Fails the test on `case`, with what it takes to run it again.
    fn fail(&self, case: &Case, what: &str) -> ! {
        let hex = hex(&case.frame);
        let seed = case.seed.map_or("none (random bytes)", |i| self.corpus[i].name.as_str());
        let prefix = match case.hook {
            Hook::XdpIngress => "xdp",
            Hook::TcExternal => "tc-external",
            Hook::TcIngress => "tc-ingress",
            Hook::TcEgress => "tc-egress",
        };
        panic!(
            "{what}\n  at {:?}: frame #{} of XLB_FUZZ_SEED={:#x} (0: the corpus as it is), {} bytes\n  \
             from seed {seed}, mutations {:?}\n  frame {hex}\n  keep it in the corpus: echo {hex} | xxd -r -p > \
             tests/fuzz/corpus/{prefix}-found-{:x}-{}.bin",
            case.hook,
            case.number,
            self.seed,
            case.frame.len(),
            case.ops,
            self.seed,
            case.number,
        );
    }

    /// A frame made from the corpus (mutated or as it is) or from random bytes, for the
    /// seed's hook more often than not.
    fn next_case(&mut self) -> Case {
        self.numbered += 1;
        let rng = &mut self.mutator.rng;
        let (frame, seed, ops) = if rng.percent(8) {
            let (frame, op) = self.mutator.random();
            (frame, None, vec![op])
        } else {
            let i = rng.below(self.corpus.len());
            let mut frame = self.corpus[i].frame.clone();
            let mut ops = Vec::new();
            if rng.percent(4) {
                ops.push(Op::Verbatim);
            } else {
                self.mutator.mutate(&mut frame, &self.corpus, &mut ops);
            }
            (frame, Some(i), ops)
        };
        let rng = &mut self.mutator.rng;
        let hook = match seed.and_then(|i| self.corpus[i].hook) {
            Some(hook) if rng.percent(60) => hook,
            _ => rng.pick(&HOOKS),
        };
        Case { number: self.numbered, hook, seed, ops, frame }
    }

    /// Runs `cases` from the baseline state: first those the model does not own, under one
    /// map snapshot, then the owned ones.
    fn chunk(&mut self, cases: &[Case]) {
        reset(&mut self.h, &self.baseline);
        let mut not_owned = Vec::new();
        let mut owned = Vec::new();
        for case in cases {
            let fragments = |key| self.h.fragments.get(&key, 0).ok();
            match parse(&case.frame, fragments).filter(|p| self.oracle.owns(case.hook, p)) {
                Some(parsed) => owned.push((case, parsed)),
                None => not_owned.push(case),
            }
        }
        let before = snapshot(&self.h);
        for case in &not_owned {
            self.run_not_owned(case);
        }
        let after = snapshot(&self.h);
        if before != after {
            self.blame(&not_owned, &diff(&before, &after));
        }
        for (case, parsed) in &owned {
            self.run_owned(case, parsed);
        }
    }

    fn try_run(&mut self, case: &Case) -> Option<(u32, Vec<u8>)> {
        match self.h.try_run(case.hook, &case.frame) {
            Ok(result) => {
                self.tally.runs[hook_index(case.hook)] += 1;
                Some(result)
            }
            Err(_) if refused(case.hook, &case.frame) => {
                self.tally.refused[hook_index(case.hook)] += 1;
                None
            }
            Err(e) => self.fail(case, &format!("BPF_PROG_TEST_RUN failed: {e}")),
        }
    }

    fn run_not_owned(&mut self, case: &Case) {
        let Some((verdict, out)) = self.try_run(case) else { return };
        self.tally.not_owned += 1;
        if verdict != pass_verdict(case.hook) {
            self.fail(case, &format!("verdict {verdict} for a frame the balancer does not own (want PASS)"));
        }
        if out != case.frame {
            let at = out.iter().zip(&case.frame).position(|(a, b)| a != b);
            self.fail(
                case,
                &format!(
                    "a frame the balancer does not own was changed: first at byte {at:?}, {} → {} bytes\n  out   {}",
                    case.frame.len(),
                    out.len(),
                    hex(&out)
                ),
            );
        }
    }

    /// The frame among `cases` that wrote to the maps, each run alone from the baseline.
    fn blame(&mut self, cases: &[&Case], batch_diff: &str) -> ! {
        for case in cases {
            reset(&mut self.h, &self.baseline);
            let before = snapshot(&self.h);
            let _ = self.h.try_run(case.hook, &case.frame);
            let after = snapshot(&self.h);
            if before != after {
                self.fail(
                    case,
                    &format!(
                        "a frame the balancer does not own wrote to the maps:\n{}",
                        diff(&before, &after)
                    ),
                );
            }
        }
        panic!(
            "{} frames the balancer does not own wrote to the maps, none alone (XLB_FUZZ_SEED={:#x}, up to frame #{}):\n{batch_diff}",
            cases.len(),
            self.seed,
            self.numbered
        );
    }

    fn run_owned(&mut self, case: &Case, parsed: &Parsed) {
        let Some((verdict, out)) = self.try_run(case) else {
            self.fail(case, "BPF_PROG_TEST_RUN refused an owned frame");
        };
        self.tally.owned += 1;
        let hook = case.hook;
        let problem = match (hook, verdict) {
            (_, v) if v == pass_verdict(hook) => {
                let problem = judge_translation(&self.oracle, &self.h, hook, parsed, &case.frame, &out);
                if out == case.frame {
                    self.tally.untouched += 1;
                } else {
                    self.tally.translated += 1;
                }
                problem
            }
            (Hook::XdpIngress, XDP_DROP)
            | (Hook::TcExternal | Hook::TcIngress | Hook::TcEgress, TC_ACT_SHOT) => {
                self.tally.dropped += 1;
                None
            }
            (Hook::XdpIngress, XDP_TX) | (Hook::TcExternal | Hook::TcIngress, TC_ACT_REDIRECT) => {
                self.tally.bounced += 1;
                self.judge_reject(hook, parsed, &case.frame, &out)
            }
            (_, v) => Some(format!("verdict {v} outside the hook's set")),
        };
        if let Some(problem) = problem {
            self.fail(case, &format!("{problem}\n  out   {}", hex(&out)));
        }
    }

    /// A bounce must be the ICMP port unreachable for a new connection to a frontend without
    /// endpoints.
    fn judge_reject(&self, hook: Hook, parsed: &Parsed, input: &[u8], out: &[u8]) -> Option<String> {
        let Parsed::Flow { flow, .. } = parsed else {
            return Some("an ICMP error was bounced".into());
        };
        if self.oracle.frontend(&flow.key).is_none_or(|flags| flags & SVC_F_NO_ENDPOINTS == 0) {
            return Some("bounced, but not addressed to a frontend without endpoints".into());
        }
        let quoted = match hook {
            Hook::XdpIngress => QuotedChecksum::AsSent,
            _ => QuotedChecksum::OffloadFixedPoint,
        };
        (out != frame::reject_of(input, quoted))
            .then(|| "bounced, but not as the ICMP port unreachable of the frame".into())
    }
}

/// Fuzzes the packet path: `XLB_FUZZ_FRAMES` program runs (default 1,000,000) over the
/// four packet hooks, after every seed at every hook; `XLB_FUZZ_SEED` picks the frames.
#[test]
fn fuzz_the_packet_path() {
    let frames = env_number("XLB_FUZZ_FRAMES", DEFAULT_FRAMES);
    let seed = env_number("XLB_FUZZ_SEED", DEFAULT_SEED);
    let start = Instant::now();
    let mut fuzzer = Fuzzer::new(seed);
    println!("fuzz: XLB_FUZZ_SEED={seed:#x}, {frames} frames, {} seeds", fuzzer.corpus.len());

    // The corpus as it is, at every hook: it must reach every kind of outcome.
    let verbatim: Vec<Case> = (0..fuzzer.corpus.len())
        .flat_map(|i| HOOKS.map(|hook| (i, hook)))
        .map(|(i, hook)| Case {
            number: 0,
            hook,
            seed: Some(i),
            ops: vec![Op::Verbatim],
            frame: fuzzer.corpus[i].frame.clone(),
        })
        .collect();
    fuzzer.chunk(&verbatim);
    let t = &fuzzer.tally;
    assert!(
        t.not_owned > 0 && t.translated > 0 && t.dropped > 0 && t.bounced > 0,
        "the corpus misses a kind of outcome: {} not owned, {} translated, {} dropped, {} bounced",
        t.not_owned,
        t.translated,
        t.dropped,
        t.bounced
    );

    while fuzzer.tally.runs.iter().sum::<u64>() < frames {
        let cases: Vec<Case> = (0..CHUNK).map(|_| fuzzer.next_case()).collect();
        fuzzer.chunk(&cases);
    }

    let t = &fuzzer.tally;
    let runs: u64 = t.runs.iter().sum();
    let elapsed = start.elapsed();
    println!(
        "fuzz: {runs} runs (XDP {}, TC external {}, TC ingress {}, TC egress {}) of {} frames in {elapsed:.1?} ({:.1} µs a run)\n\
         fuzz: {} not owned; {} owned: {} translated, {} passed untouched, {} dropped, {} bounced; \
         {} refused by BPF_PROG_TEST_RUN (too short for its hook)",
        t.runs[0],
        t.runs[1],
        t.runs[2],
        t.runs[3],
        fuzzer.numbered,
        elapsed.as_secs_f64() * 1e6 / runs as f64,
        t.not_owned,
        t.owned,
        t.translated,
        t.untouched,
        t.dropped,
        t.bounced,
        t.refused.iter().sum::<u64>(),
    );
}
