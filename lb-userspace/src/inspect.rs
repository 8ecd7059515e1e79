//! `xlb inspect`: what the dataplane holds, read from the maps pinned under `--bpffs-dir`.
//! Works while the agent runs and after it stopped (the pins outlive it); never writes.
//!
//! One model, two renderers: each reader turns map entries into typed rows (addresses
//! dotted, ports in host order, bits decoded to words), which `Report::render` prints as an
//! aligned table or as JSON.
//!
//! The maps hold numbers: a frontend's backend groups and counter slot are ids the agent
//! gives in memory (`dataplane::ids`). The Service port a frontend belongs to is the name the
//! agent pinned for its counter slot (`XLB_SERVICE_NAMES`); a frontend that is not counted
//! (slot 0) has none.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    fmt, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
    Pod,
};
use lb_common::{
    affinity::{AffinityEntry, AffinityKey},
    backend::{Backend, BackendKey, BACKEND_F_LOCAL},
    conntrack::{
        ct_timeout_ns, CtEntry, CtKey, CT_F_REPLIED, CT_STATE_CLOSED, CT_STATE_ESTABLISHED, CT_STATE_FIN,
        CT_STATE_OTHER, CT_STATE_SYN_SENT,
    },
    maps, proto,
    service::{ServiceKey, ServiceValue, SVC_F_NO_ENDPOINTS, SVC_F_SOURCE_RANGES},
    stats::{ServicePortName, ServiceStats},
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(
        "{} does not exist: no agent has run with --bpffs-dir {} since boot (bpffs lives in \
         memory), or `xlb agent --cleanup` removed it",
        dir.display(),
        dir.display()
    )]
    NoAgent { dir: PathBuf },
    #[error(
        "{} is not pinned, although {} exists: an agent ran with this --bpffs-dir but has not \
         pinned its maps (it failed while loading, or it is still starting)",
        path.display(),
        dir.display()
    )]
    NotPinned { path: PathBuf, dir: PathBuf },
    #[error("{}: permission denied: reading pinned BPF maps needs root (CAP_BPF and CAP_SYS_ADMIN)", path.display())]
    Permission { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("opening {}: {source}", path.display())]
    Open { path: PathBuf, source: MapError },
    #[error("reading {name}: {source}")]
    Read { name: &'static str, source: MapError },
    #[error("reading CLOCK_MONOTONIC: {0}")]
    Clock(io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

type Result<T, E = InspectError> = std::result::Result<T, E>;

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// One row per frontend (`XLB_SERVICES`), with its Service port and the backends of its
    /// groups.
    Services,
    /// One row per backend slot (`XLB_BACKENDS`).
    Backends,
    /// One row per tracked connection (`XLB_CONNTRACK`).
    Conntrack,
    /// Session affinity entries (`XLB_AFFINITY`).
    Affinity,
    /// Traffic per counter slot (`XLB_SERVICE_STATS`, summed over CPUs) and the Service port
    /// it counts, non-zero slots only.
    Stats,
    /// The hooks attached to each interface (the pinned links): which external interfaces
    /// take their traffic at XDP and which at TC (`--external-hook`).
    Interfaces,
}

/// How to print it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    #[default]
    Table,
    /// A JSON array of the rows.
    Json,
}

/// The rows of one `What`.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Services(Vec<ServiceRow>),
    Backends(Vec<BackendRow>),
    Conntrack(Vec<ConntrackRow>),
    Affinity(Vec<AffinityRow>),
    Stats(Vec<StatsRow>),
    Interfaces(Vec<InterfaceRow>),
}

/// Reads `what` from the maps pinned under `dir`.
pub fn read(dir: &Path, what: What) -> Result<Report> {
    Ok(match what {
        What::Services => Report::Services(services(dir)?),
        What::Backends => Report::Backends(backends(dir)?),
        What::Conntrack => Report::Conntrack(conntrack(dir)?),
        What::Affinity => Report::Affinity(affinity(dir)?),
        What::Stats => Report::Stats(stats(dir)?),
        What::Interfaces => Report::Interfaces(interfaces(dir)?),
    })
}

impl Report {
    /// The rows as text: a table with a header line, or a JSON array; ends with a newline.
    pub fn render(&self, format: Format) -> Result<String> {
        match self {
            Self::Services(rows) => render(rows, format),
            Self::Backends(rows) => render(rows, format),
            Self::Conntrack(rows) => render(rows, format),
            Self::Affinity(rows) => render(rows, format),
            Self::Stats(rows) => render(rows, format),
            Self::Interfaces(rows) => render(rows, format),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The model.

/// An IP protocol number, shown by name (`TCP`, `UDP`, `ICMP`) or else by number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Proto(pub u8);

impl Proto {
    pub fn name(self) -> Cow<'static, str> {
        match self.0 {
            proto::TCP => "TCP".into(),
            proto::UDP => "UDP".into(),
            proto::ICMP => "ICMP".into(),
            n => n.to_string().into(),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for Proto {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

/// An address and port, host order (`Display`: `a.b.c.d:port`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    /// From an address and port as the maps hold them (network byte order).
    pub fn from_be(addr: u32, port: u16) -> Self {
        Self { addr: Ipv4Addr::from(u32::from_be(addr)), port: u16::from_be(port) }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// A frontend key (`Display`: `a.b.c.d:port/PROTO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl From<&ServiceKey> for Frontend {
    fn from(key: &ServiceKey) -> Self {
        Self { addr: key.ip(), port: key.host_port(), proto: Proto(key.proto) }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// One frontend of `XLB_SERVICES`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRow {
    /// The Service port, `namespace/name:port/PROTO` (no `:port` when unnamed), as its counter
    /// slot is named in `XLB_SERVICE_NAMES`; `None` when the frontend is not counted or its
    /// slot has no name.
    pub service: Option<String>,
    pub frontend: Frontend,
    /// `SVC_F_*` bits as words: `no-endpoints`, `source-ranges`; unknown bits as `0x..`.
    pub flags: Vec<String>,
    /// `sessionAffinity: ClientIP` timeout; 0: no affinity.
    pub affinity_timeout_s: u32,
    /// Counter slot in `XLB_SERVICE_STATS`; 0: not counted.
    pub stats_slot: u16,
    /// The group for clients outside the node.
    pub external: GroupView,
    /// The group for this node's pods and processes.
    pub internal: GroupView,
}

/// A backend group as a frontend reads it: slots `0..backend_count` of `group_id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupView {
    pub group_id: u32,
    pub backend_count: u16,
    pub backends: Vec<BackendRow>,
    /// Slots below `backend_count` that `XLB_BACKENDS` does not hold (never in a consistent
    /// state: the agent writes slots before the frontend that reads them).
    pub missing_slots: Vec<u32>,
}

/// One slot of `XLB_BACKENDS`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRow {
    pub group_id: u32,
    pub slot: u32,
    pub backend: Endpoint,
    /// `BACKEND_F_*` bits as words: `local` (on this node).
    pub flags: Vec<String>,
}

/// One connection of `XLB_CONNTRACK`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConntrackRow {
    pub proto: Proto,
    pub client: Endpoint,
    pub backend: Endpoint,
    /// What the client addressed.
    pub frontend: Endpoint,
    /// The source the backend sees instead of the client, when SNATed.
    pub snat: Option<Endpoint>,
    /// `CT_STATE_*` as a word: `other`, `syn-sent`, `established`, `fin`, `closed`.
    pub state: String,
    /// `CT_F_*` bits as words: `replied`.
    pub flags: Vec<String>,
    pub stats_slot: u16,
    /// Since the connection's first packet.
    pub age_s: f64,
    /// Since its last packet, either direction.
    pub idle_s: f64,
    /// Its idle timeout in this state.
    pub timeout_s: f64,
    /// Idle past its timeout: the programs treat it as absent (the LRU reclaims it later).
    pub expired: bool,
}

/// One entry of `XLB_AFFINITY`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AffinityRow {
    /// A packet's client address (0.0.0.0 for a socket's client).
    pub client: Ipv4Addr,
    /// A socket's client: the cookie of its network namespace (0 for a packet's client).
    pub netns_cookie: u64,
    pub group_id: u32,
    pub slot: u32,
    pub backend: Ipv4Addr,
    /// Whether the slot still holds this backend (otherwise the entry is no longer used).
    pub in_slot: bool,
    /// Since the last new connection that used the entry.
    pub age_s: f64,
}

/// The hooks attached to one interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InterfaceRow {
    pub interface: String,
    /// Pinned link names, e.g. `xdp_ingress`, `tc_external`, `tc_egress`.
    pub hooks: Vec<&'static str>,
}

/// One counter slot of `XLB_SERVICE_STATS`, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatsRow {
    pub slot: u32,
    /// The Service port the slot counts (`XLB_SERVICE_NAMES`); `None`: no name pinned (the
    /// slot counts no Service port any more).
    pub service: Option<String>,
    pub packets: u64,
    pub bytes: u64,
    /// The frontends counting into the slot now (the Service port's frontends).
    pub frontends: Vec<Frontend>,
}

// ---------------------------------------------------------------------------------------
// Decoding.

/// The words of the set bits of `flags` by `names`; bits without a name as hex.
fn flag_words(flags: u64, names: &[(u64, &str)]) -> Vec<String> {
    let mut words: Vec<String> =
        names.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, name)| (*name).to_string()).collect();
    let unknown = names.iter().fold(flags, |rest, (bit, _)| rest & !bit);
    if unknown != 0 {
        words.push(format!("{unknown:#x}"));
    }
    words
}

pub fn service_flags(flags: u16) -> Vec<String> {
    flag_words(
        u64::from(flags),
        &[(u64::from(SVC_F_NO_ENDPOINTS), "no-endpoints"), (u64::from(SVC_F_SOURCE_RANGES), "source-ranges")],
    )
}

pub fn backend_flags(flags: u8) -> Vec<String> {
    flag_words(u64::from(flags), &[(u64::from(BACKEND_F_LOCAL), "local")])
}

pub fn conntrack_flags(flags: u8) -> Vec<String> {
    flag_words(u64::from(flags), &[(u64::from(CT_F_REPLIED), "replied")])
}

pub fn conntrack_state(state: u8) -> String {
    match state {
        CT_STATE_OTHER => "other".into(),
        CT_STATE_SYN_SENT => "syn-sent".into(),
        CT_STATE_ESTABLISHED => "established".into(),
        CT_STATE_FIN => "fin".into(),
        CT_STATE_CLOSED => "closed".into(),
        n => format!("unknown-{n}"),
    }
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn backend_row(key: &BackendKey, backend: &Backend) -> BackendRow {
    BackendRow {
        group_id: key.group_id,
        slot: key.slot,
        backend: Endpoint { addr: backend.ip(), port: backend.host_port() },
        flags: backend_flags(backend.flags),
    }
}

fn group_view(slots: &BTreeMap<BackendKey, Backend>, group_id: u32, count: u16) -> GroupView {
    let mut view = GroupView { group_id, backend_count: count, backends: vec![], missing_slots: vec![] };
    for slot in 0..u32::from(count) {
        let key = BackendKey { group_id, slot };
        match slots.get(&key) {
            Some(backend) => view.backends.push(backend_row(&key, backend)),
            None => view.missing_slots.push(slot),
        }
    }
    view
}

/// The Service port of counter slot `index` by `names` (slot 0: not counted, no name).
fn service_port(names: &BTreeMap<u32, String>, index: u32) -> Option<String> {
    (index != 0).then(|| names.get(&index).cloned()).flatten()
}

/// Frontends with their Service port (by `names`: counter slot → name) and the backends of
/// their groups, sorted by address, port and protocol.
pub fn service_rows(
    frontends: &[(ServiceKey, ServiceValue)],
    slots: &BTreeMap<BackendKey, Backend>,
    names: &BTreeMap<u32, String>,
) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = frontends
        .iter()
        .map(|(key, value)| ServiceRow {
            service: service_port(names, u32::from(value.stats_index)),
            frontend: key.into(),
            flags: service_flags(value.flags),
            affinity_timeout_s: value.affinity_timeout_s,
            stats_slot: value.stats_index,
            external: group_view(slots, value.group_id, value.backend_count),
            internal: group_view(slots, value.internal_group_id, value.internal_count),
        })
        .collect();
    rows.sort_by_key(|r| r.frontend);
    rows
}

/// Every backend slot, by group and slot.
pub fn backend_rows(slots: &BTreeMap<BackendKey, Backend>) -> Vec<BackendRow> {
    slots.iter().map(|(key, backend)| backend_row(key, backend)).collect()
}

/// Connections at monotonic time `now` (ns, as `bpf_ktime_get_ns`), by client then backend.
pub fn conntrack_rows(entries: &[(CtKey, CtEntry)], now: u64) -> Vec<ConntrackRow> {
    let mut rows: Vec<ConntrackRow> = entries
        .iter()
        .map(|(key, entry)| ConntrackRow {
            proto: Proto(key.proto),
            client: Endpoint::from_be(key.saddr, key.sport),
            backend: Endpoint::from_be(key.daddr, key.dport),
            frontend: Endpoint::from_be(entry.frontend_addr, entry.frontend_port),
            snat: (entry.snat_addr != 0).then(|| Endpoint::from_be(entry.snat_addr, entry.snat_port)),
            state: conntrack_state(entry.state),
            flags: conntrack_flags(entry.flags),
            stats_slot: entry.stats_index,
            // An entry written on another CPU after the clock was read may be "newer" than now.
            age_s: secs(now.saturating_sub(entry.created_ns)),
            idle_s: secs(now.saturating_sub(entry.last_seen_ns)),
            timeout_s: secs(ct_timeout_ns(key.proto, entry.state, entry.flags)),
            expired: !entry.fresh(key.proto, now),
        })
        .collect();
    rows.sort_by_key(|r| (r.client, r.backend, r.proto));
    rows
}

/// Affinity entries at monotonic time `now`, by client then group; `slots` tells whether each
/// entry's slot still holds its backend.
pub fn affinity_rows(
    entries: &[(AffinityKey, AffinityEntry)],
    slots: &BTreeMap<BackendKey, Backend>,
    now: u64,
) -> Vec<AffinityRow> {
    let mut rows: Vec<AffinityRow> = entries
        .iter()
        .map(|(key, entry)| AffinityRow {
            client: Ipv4Addr::from(u32::from_be(key.client_addr)),
            netns_cookie: key.netns_cookie,
            group_id: key.group_id,
            slot: entry.slot,
            backend: Ipv4Addr::from(u32::from_be(entry.backend_addr)),
            in_slot: slots
                .get(&BackendKey { group_id: key.group_id, slot: entry.slot })
                .is_some_and(|b| b.addr == entry.backend_addr),
            age_s: secs(now.saturating_sub(entry.last_used_ns)),
        })
        .collect();
    rows.sort_by_key(|r| (r.client, r.netns_cookie, r.group_id));
    rows
}

/// Non-zero counter slots (`per_slot[i]`: slot `i`'s values on each CPU), with the Service
/// port each counts (`names`) and the frontends counting into it.
pub fn stats_rows(
    per_slot: &[Vec<ServiceStats>],
    frontends: &[(ServiceKey, ServiceValue)],
    names: &BTreeMap<u32, String>,
) -> Vec<StatsRow> {
    let mut by_slot: BTreeMap<u32, Vec<Frontend>> = BTreeMap::new();
    for (key, value) in frontends.iter().filter(|(_, v)| v.stats_index != 0) {
        by_slot.entry(u32::from(value.stats_index)).or_default().push(key.into());
    }
    per_slot
        .iter()
        .enumerate()
        .map(|(slot, cpus)| {
            (slot as u32, cpus.iter().map(|s| s.packets).sum(), cpus.iter().map(|s| s.bytes).sum())
        })
        .filter(|&(_, packets, bytes)| packets != 0 || bytes != 0)
        .map(|(slot, packets, bytes)| {
            let mut frontends = by_slot.remove(&slot).unwrap_or_default();
            frontends.sort();
            StatsRow { slot, service: service_port(names, slot), packets, bytes, frontends }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Reading the pins.

fn open(dir: &Path, name: &'static str) -> Result<Map> {
    let path = dir.join(name);
    let denied = |e: &io::Error| e.kind() == io::ErrorKind::PermissionDenied;
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(match std::fs::symlink_metadata(dir) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    InspectError::NoAgent { dir: dir.to_owned() }
                }
                _ => InspectError::NotPinned { path, dir: dir.to_owned() },
            });
        }
        Err(e) if denied(&e) => return Err(InspectError::Permission { path }),
        Err(source) => return Err(InspectError::Io { path, source }),
    }
    let data = MapData::from_pin(&path).map_err(|source| match &source {
        MapError::SyscallError(e) if denied(&e.io_error) => InspectError::Permission { path: path.clone() },
        _ => InspectError::Open { path: path.clone(), source },
    })?;
    Map::from_map_data(data).map_err(|source| InspectError::Open { path, source })
}

/// Every entry of the pinned hash or LRU hash `name` (entries deleted while it is walked are
/// skipped).
fn read_hash<K: Pod, V: Pod>(dir: &Path, name: &'static str) -> Result<Vec<(K, V)>> {
    let read_err = |source| InspectError::Read { name, source };
    let map: HashMap<MapData, K, V> = open(dir, name)?.try_into().map_err(read_err)?;
    map.iter().collect::<Result<_, _>>().map_err(read_err)
}

fn read_slots(dir: &Path) -> Result<BTreeMap<BackendKey, Backend>> {
    Ok(read_hash::<BackendKey, Backend>(dir, maps::BACKENDS)?.into_iter().collect())
}

/// The Service port each counter slot counts, from `XLB_SERVICE_NAMES`. Pins of an agent
/// from before that map (layout version 1) have none: every frontend then shows no name.
/// Names that are not UTF-8 are left out.
fn read_names(dir: &Path) -> Result<BTreeMap<u32, String>> {
    let names = match read_hash::<u32, ServicePortName>(dir, maps::SERVICE_NAMES) {
        Err(InspectError::NotPinned { .. }) => return Ok(BTreeMap::new()),
        names => names?,
    };
    Ok(names.into_iter().filter_map(|(slot, name)| Some((slot, name.as_str()?.to_string()))).collect())
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> Result<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(InspectError::Clock(io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

pub fn services(dir: &Path) -> Result<Vec<ServiceRow>> {
    let frontends = read_hash(dir, maps::SERVICES)?;
    Ok(service_rows(&frontends, &read_slots(dir)?, &read_names(dir)?))
}

pub fn backends(dir: &Path) -> Result<Vec<BackendRow>> {
    Ok(backend_rows(&read_slots(dir)?))
}

pub fn conntrack(dir: &Path) -> Result<Vec<ConntrackRow>> {
    let entries = read_hash(dir, maps::CONNTRACK)?;
    // After the walk, so (on this CPU) no entry is newer than `now`.
    Ok(conntrack_rows(&entries, monotonic_ns()?))
}

pub fn affinity(dir: &Path) -> Result<Vec<AffinityRow>> {
    let entries = read_hash(dir, maps::AFFINITY)?;
    let slots = read_slots(dir)?;
    Ok(affinity_rows(&entries, &slots, monotonic_ns()?))
}

pub fn interfaces(dir: &Path) -> Result<Vec<InterfaceRow>> {
    let links = crate::dataplane::attached_hooks(dir)
        .map_err(|source| InspectError::Io { path: dir.join("links"), source })?;
    let mut rows: Vec<InterfaceRow> = Vec::new();
    for (hook, interface) in links {
        match rows.iter_mut().find(|r| r.interface == interface) {
            Some(row) => row.hooks.push(hook.pin_name()),
            None => rows.push(InterfaceRow { interface, hooks: vec![hook.pin_name()] }),
        }
    }
    rows.sort_by(|a, b| a.interface.cmp(&b.interface));
    Ok(rows)
}

pub fn stats(dir: &Path) -> Result<Vec<StatsRow>> {
    let name = maps::SERVICE_STATS;
    let read_err = |source| InspectError::Read { name, source };
    let map: PerCpuArray<MapData, ServiceStats> = open(dir, name)?.try_into().map_err(read_err)?;
    let per_slot: Vec<Vec<ServiceStats>> =
        map.iter().map(|values| values.map(|v| v.to_vec())).collect::<Result<_, _>>().map_err(read_err)?;
    let frontends = read_hash(dir, maps::SERVICES)?;
    Ok(stats_rows(&per_slot, &frontends, &read_names(dir)?))
}

// ---------------------------------------------------------------------------------------
// Rendering.

/// A row as table cells.
trait TableRow {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

fn render<R: TableRow + Serialize>(rows: &[R], format: Format) -> Result<String> {
    match format {
        Format::Table => Ok(table(rows)),
        Format::Json => Ok(serde_json::to_string_pretty(rows)? + "\n"),
    }
}

/// Left-aligned columns two spaces apart, a header line first; no trailing spaces.
fn table<R: TableRow>(rows: &[R]) -> String {
    let lines: Vec<Vec<String>> = std::iter::once(R::HEADERS.iter().map(|h| (*h).to_string()).collect())
        .chain(rows.iter().map(TableRow::cells))
        .collect();
    let mut widths = vec![0; R::HEADERS.len()];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (cell, width) in line.iter().zip(&widths) {
            text += &format!("{cell:<width$}  ");
        }
        out += text.trim_end();
        out.push('\n');
    }
    out
}

fn words(flags: &[String]) -> String {
    if flags.is_empty() {
        "-".into()
    } else {
        flags.join(",")
    }
}

/// A duration for people: `4.2s`, `3m07s`, `2h05m`, `1d03h`.
pub fn human_duration(s: f64) -> String {
    let whole = s as u64;
    match whole {
        0..60 => format!("{s:.1}s"),
        60..3_600 => format!("{}m{:02}s", whole / 60, whole % 60),
        3_600..86_400 => format!("{}h{:02}m", whole / 3_600, whole % 3_600 / 60),
        _ => format!("{}d{:02}h", whole / 86_400, whole % 86_400 / 3_600),
    }
}

fn backend_list(view: &GroupView) -> String {
    let mut items: Vec<String> = view
        .backends
        .iter()
        .map(|b| {
            if b.flags.is_empty() {
                b.backend.to_string()
            } else {
                format!("{} ({})", b.backend, words(&b.flags))
            }
        })
        .collect();
    items.extend(view.missing_slots.iter().map(|slot| format!("slot {slot} missing")));
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

impl TableRow for ServiceRow {
    const HEADERS: &'static [&'static str] = &[
        "SERVICE",
        "FRONTEND",
        "FLAGS",
        "AFFINITY",
        "STATS",
        "EXT-GROUP",
        "EXT-N",
        "INT-GROUP",
        "INT-N",
        "BACKENDS",
    ];
    fn cells(&self) -> Vec<String> {
        let backends = if self.external.group_id == self.internal.group_id
            && self.external.backend_count == self.internal.backend_count
        {
            backend_list(&self.external)
        } else {
            format!("ext: {}; int: {}", backend_list(&self.external), backend_list(&self.internal))
        };
        vec![
            self.service.clone().unwrap_or_else(|| "-".into()),
            self.frontend.to_string(),
            words(&self.flags),
            if self.affinity_timeout_s == 0 { "-".into() } else { format!("{}s", self.affinity_timeout_s) },
            if self.stats_slot == 0 { "-".into() } else { self.stats_slot.to_string() },
            self.external.group_id.to_string(),
            self.external.backend_count.to_string(),
            self.internal.group_id.to_string(),
            self.internal.backend_count.to_string(),
            backends,
        ]
    }
}

impl TableRow for BackendRow {
    const HEADERS: &'static [&'static str] = &["GROUP", "SLOT", "BACKEND", "FLAGS"];
    fn cells(&self) -> Vec<String> {
        vec![self.group_id.to_string(), self.slot.to_string(), self.backend.to_string(), words(&self.flags)]
    }
}

impl TableRow for ConntrackRow {
    const HEADERS: &'static [&'static str] = &[
        "PROTO", "CLIENT", "BACKEND", "FRONTEND", "SNAT", "STATE", "FLAGS", "STATS", "AGE", "IDLE",
        "TIMEOUT", "EXPIRED",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.proto.to_string(),
            self.client.to_string(),
            self.backend.to_string(),
            self.frontend.to_string(),
            self.snat.map_or_else(|| "-".into(), |s| s.to_string()),
            self.state.clone(),
            words(&self.flags),
            if self.stats_slot == 0 { "-".into() } else { self.stats_slot.to_string() },
            human_duration(self.age_s),
            human_duration(self.idle_s),
            human_duration(self.timeout_s),
            if self.expired { "yes".into() } else { "no".into() },
        ]
    }
}

impl TableRow for AffinityRow {
    const HEADERS: &'static [&'static str] = &["CLIENT", "GROUP", "SLOT", "BACKEND", "IN-SLOT", "AGE"];
    fn cells(&self) -> Vec<String> {
        vec![
            match self.netns_cookie {
                0 => self.client.to_string(),
                cookie => format!("netns {cookie}"),
            },
            self.group_id.to_string(),
            self.slot.to_string(),
            self.backend.to_string(),
            if self.in_slot { "yes".into() } else { "no".into() },
            human_duration(self.age_s),
        ]
    }
}

impl TableRow for InterfaceRow {
    const HEADERS: &'static [&'static str] = &["INTERFACE", "HOOKS"];
    fn cells(&self) -> Vec<String> {
        vec![self.interface.clone(), self.hooks.join(",")]
    }
}

impl TableRow for StatsRow {
    const HEADERS: &'static [&'static str] = &["SLOT", "SERVICE", "PACKETS", "BYTES", "FRONTENDS"];
    fn cells(&self) -> Vec<String> {
        let frontends: Vec<String> = self.frontends.iter().map(Frontend::to_string).collect();
        vec![
            self.slot.to_string(),
            self.service.clone().unwrap_or_else(|| "-".into()),
            self.packets.to_string(),
            self.bytes.to_string(),
            if frontends.is_empty() { "-".into() } else { frontends.join(", ") },
        ]
    }
}

#[cfg(test)]
mod tests {
    use lb_common::conntrack::{CT_TIMEOUT_CLOSED_NS, CT_TIMEOUT_UDP_NS};

    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn slots() -> BTreeMap<BackendKey, Backend> {
        [
            (BackendKey { group_id: 3, slot: 0 }, Backend::new(ip("198.18.1.10"), 8080, BACKEND_F_LOCAL)),
            (BackendKey { group_id: 3, slot: 1 }, Backend::new(ip("198.18.2.10"), 8080, 0)),
            (BackendKey { group_id: 4, slot: 0 }, Backend::new(ip("198.18.1.10"), 8080, BACKEND_F_LOCAL)),
        ]
        .into()
    }

    fn value(group_id: u32, backend_count: u16, internal: (u32, u16)) -> ServiceValue {
        ServiceValue {
            group_id,
            internal_group_id: internal.0,
            backend_count,
            internal_count: internal.1,
            flags: 0,
            stats_index: 0,
            affinity_timeout_s: 0,
        }
    }

    #[test]
    fn endpoints_turn_network_order_into_dotted_addresses_and_host_order_ports() {
        // 198.18.0.1:30080 exactly as the maps hold it: the bytes in packet order.
        let addr = u32::from_ne_bytes([198, 18, 0, 1]);
        let port = u16::from_ne_bytes([0x75, 0x80]);
        let endpoint = Endpoint::from_be(addr, port);
        assert_eq!(endpoint, Endpoint { addr: ip("198.18.0.1"), port: 30080 });
        assert_eq!(endpoint.to_string(), "198.18.0.1:30080");
        let frontend = Frontend::from(&ServiceKey::new(ip("198.19.0.10"), 53, proto::UDP));
        assert_eq!(frontend.to_string(), "198.19.0.10:53/UDP");
        assert_eq!(Proto(132).to_string(), "132");
    }

    #[test]
    fn flags_are_words_and_unknown_bits_stay_visible() {
        assert_eq!(service_flags(0), Vec::<String>::new());
        assert_eq!(service_flags(SVC_F_NO_ENDPOINTS), ["no-endpoints"]);
        assert_eq!(
            service_flags(SVC_F_NO_ENDPOINTS | SVC_F_SOURCE_RANGES),
            ["no-endpoints", "source-ranges"]
        );
        assert_eq!(service_flags(SVC_F_SOURCE_RANGES | 0x80), ["source-ranges", "0x80"]);
        assert_eq!(backend_flags(BACKEND_F_LOCAL), ["local"]);
        assert_eq!(backend_flags(0), Vec::<String>::new());
        assert_eq!(conntrack_flags(CT_F_REPLIED | 0x4), ["replied", "0x4"]);
    }

    #[test]
    fn conntrack_states_have_names() {
        let names: Vec<String> =
            [CT_STATE_OTHER, CT_STATE_SYN_SENT, CT_STATE_ESTABLISHED, CT_STATE_FIN, CT_STATE_CLOSED, 9]
                .into_iter()
                .map(conntrack_state)
                .collect();
        assert_eq!(names, ["other", "syn-sent", "established", "fin", "closed", "unknown-9"]);
    }

    #[test]
    fn services_resolve_both_groups_and_report_missing_slots() {
        let mut affine = value(3, 2, (4, 1));
        affine.flags = SVC_F_SOURCE_RANGES;
        affine.stats_index = 7;
        affine.affinity_timeout_s = 10_800;
        let frontends = [
            (ServiceKey::new(ip("198.19.0.10"), 80, proto::TCP), value(3, 3, (3, 3))),
            (ServiceKey::new(ip("198.18.0.1"), 30080, proto::TCP), affine),
        ];
        let rows = service_rows(&frontends, &slots(), &names(&[(7, "default/kiada:http/TCP")]));
        // Sorted by dotted address, not by the network-order integer.
        assert_eq!(rows[0].frontend.to_string(), "198.18.0.1:30080/TCP");
        assert_eq!(
            (rows[0].service.as_deref(), rows[1].service.as_deref()),
            (Some("default/kiada:http/TCP"), None)
        );
        assert_eq!(rows[0].flags, ["source-ranges"]);
        assert_eq!((rows[0].affinity_timeout_s, rows[0].stats_slot), (10_800, 7));
        let ext: Vec<String> = rows[0].external.backends.iter().map(|b| b.backend.to_string()).collect();
        assert_eq!(ext, ["198.18.1.10:8080", "198.18.2.10:8080"]);
        assert_eq!(rows[0].external.backends[0].flags, ["local"]);
        assert_eq!((rows[0].internal.group_id, rows[0].internal.backends.len()), (4, 1));
        assert_eq!(rows[1].external.missing_slots, [2]);
        let text = table(&rows);
        assert!(
            text.contains("ext: 198.18.1.10:8080 (local), 198.18.2.10:8080; int: 198.18.1.10:8080 (local)")
        );
        assert!(text.contains("198.18.1.10:8080 (local), 198.18.2.10:8080, slot 2 missing"));
    }

    fn ct(state: u8, flags: u8, snat: Option<(Ipv4Addr, u16)>) -> CtEntry {
        CtEntry {
            frontend_addr: u32::from(ip("198.18.0.1")).to_be(),
            frontend_port: 30080u16.to_be(),
            snat_port: snat.map_or(0, |s| s.1.to_be()),
            snat_addr: snat.map_or(0, |s| u32::from(s.0).to_be()),
            state,
            flags,
            stats_index: 1,
            created_ns: 100 * SEC,
            last_seen_ns: 1_000 * SEC,
        }
    }

    #[test]
    fn conntrack_rows_show_the_tuple_the_snat_source_ages_and_expiry_by_the_shared_timeouts() {
        let tcp = CtKey::new(ip("198.18.0.100"), 40000, ip("198.18.2.10"), 8080, proto::TCP);
        let udp = CtKey::new(ip("198.18.0.100"), 40001, ip("198.18.1.10"), 8080, proto::UDP);
        let entries = [
            (tcp, ct(CT_STATE_CLOSED, CT_F_REPLIED, Some((ip("198.18.0.1"), 61000)))),
            (udp, ct(CT_STATE_OTHER, 0, None)),
        ];
        // UDP without a reply times out after 30 s, a closed TCP connection after 10 s.
        let now = 1_000 * SEC + CT_TIMEOUT_CLOSED_NS + 1;
        let rows = conntrack_rows(&entries, now);
        let (tcp_row, udp_row) = (&rows[0], &rows[1]);
        assert_eq!(tcp_row.client.to_string(), "198.18.0.100:40000");
        assert_eq!(tcp_row.backend.to_string(), "198.18.2.10:8080");
        assert_eq!(tcp_row.frontend.to_string(), "198.18.0.1:30080");
        assert_eq!(tcp_row.snat.map(|s| s.to_string()).as_deref(), Some("198.18.0.1:61000"));
        assert_eq!((tcp_row.state.as_str(), tcp_row.flags.clone()), ("closed", vec!["replied".to_string()]));
        assert!(tcp_row.expired);
        assert_eq!(tcp_row.timeout_s, 10.0);
        assert_eq!(tcp_row.idle_s, secs(CT_TIMEOUT_CLOSED_NS + 1));
        assert_eq!(tcp_row.age_s, secs(now - 100 * SEC));
        assert_eq!((udp_row.proto, udp_row.snat, udp_row.expired), (Proto(proto::UDP), None, false));
        assert_eq!(udp_row.timeout_s, secs(CT_TIMEOUT_UDP_NS));
        // Exactly at the timeout an entry is still fresh; a clock before its last packet is 0 idle.
        assert!(!conntrack_rows(&entries[1..], 1_000 * SEC + CT_TIMEOUT_UDP_NS)[0].expired);
        assert!(conntrack_rows(&entries[1..], 1_000 * SEC + CT_TIMEOUT_UDP_NS + 1)[0].expired);
        assert_eq!(conntrack_rows(&entries[1..], 0)[0].idle_s, 0.0);
    }

    #[test]
    fn affinity_rows_tell_whether_the_slot_still_holds_the_backend() {
        let key =
            AffinityKey { client_addr: u32::from(ip("198.18.0.100")).to_be(), group_id: 3, netns_cookie: 0 };
        let entry = |slot| AffinityEntry {
            slot,
            backend_addr: u32::from(ip("198.18.2.10")).to_be(),
            last_used_ns: 5 * SEC,
        };
        let rows = affinity_rows(
            &[(key, entry(1)), (AffinityKey { group_id: 4, ..key }, entry(0))],
            &slots(),
            65 * SEC,
        );
        assert_eq!(
            (rows[0].client, rows[0].backend, rows[0].age_s),
            (ip("198.18.0.100"), ip("198.18.2.10"), 60.0)
        );
        assert_eq!((rows[0].in_slot, rows[1].in_slot), (true, false));
        assert!(table(&rows).contains("1m00s"));
    }

    #[test]
    fn stats_sum_the_cpus_skip_zero_slots_and_name_the_frontends_of_a_slot() {
        let cpu = |packets, bytes| ServiceStats { packets, bytes };
        let per_slot = vec![vec![cpu(0, 0); 2], vec![cpu(3, 180), cpu(2, 120)], vec![cpu(0, 0); 2]];
        let mut counted = value(3, 1, (3, 1));
        counted.stats_index = 1;
        let frontends = [
            (ServiceKey::new(ip("198.19.0.10"), 80, proto::TCP), counted),
            (ServiceKey::new(ip("198.18.0.1"), 30080, proto::TCP), counted),
        ];
        let rows = stats_rows(&per_slot, &frontends, &names(&[(1, "default/kiada:http/TCP")]));
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].slot, rows[0].packets, rows[0].bytes), (1, 5, 300));
        assert_eq!(rows[0].service.as_deref(), Some("default/kiada:http/TCP"));
        let text = table(&rows);
        assert_eq!(text.lines().next(), Some("SLOT  SERVICE                 PACKETS  BYTES  FRONTENDS"));
        assert!(text.contains("1     default/kiada:http/TCP  5        300"), "{text}");
        // A slot counting no Service port any more has no name.
        assert_eq!(stats_rows(&per_slot, &frontends, &BTreeMap::new())[0].service, None);
        let names: Vec<String> = rows[0].frontends.iter().map(Frontend::to_string).collect();
        assert_eq!(names, ["198.18.0.1:30080/TCP", "198.19.0.10:80/TCP"]);
    }

    fn names(pairs: &[(u32, &str)]) -> BTreeMap<u32, String> {
        pairs.iter().map(|(slot, name)| (*slot, (*name).to_string())).collect()
    }

    #[test]
    fn a_frontend_is_named_by_its_counter_slot_and_shows_no_name_uncounted_or_unnamed() {
        let counted = |stats_index| ServiceValue { stats_index, ..value(3, 1, (3, 1)) };
        let frontends = [
            (ServiceKey::new(ip("198.19.0.10"), 80, proto::TCP), counted(1)),
            (ServiceKey::new(ip("198.19.0.10"), 443, proto::TCP), counted(2)),
            (ServiceKey::new(ip("198.19.0.11"), 53, proto::UDP), counted(0)),
        ];
        // Slot 2's name is missing; slot 0 is never looked up, whatever the map holds.
        let names = names(&[(0, "default/zero/TCP"), (1, "default/kiada:http/TCP")]);
        let rows = service_rows(&frontends, &slots(), &names);
        let services: Vec<Option<&str>> = rows.iter().map(|r| r.service.as_deref()).collect();
        assert_eq!(services, [Some("default/kiada:http/TCP"), None, None]);
        let text = Report::Services(rows.clone()).render(Format::Table).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SERVICE                 FRONTEND             FLAGS"), "{text}");
        assert!(lines[1].starts_with("default/kiada:http/TCP  198.19.0.10:80/TCP   -"), "{text}");
        assert!(lines[2].starts_with("-                       198.19.0.10:443/TCP  -"), "{text}");
        let json: serde_json::Value =
            serde_json::from_str(&Report::Services(rows).render(Format::Json).unwrap()).unwrap();
        assert_eq!(json[0]["service"], "default/kiada:http/TCP");
        assert_eq!(
            (&json[1]["service"], &json[2]["service"]),
            (&serde_json::Value::Null, &serde_json::Value::Null)
        );
        assert_eq!(json[0]["stats_slot"], 1);
    }

    #[test]
    fn json_and_table_render_the_same_rows() {
        let rows = backend_rows(&slots());
        let report = Report::Backends(rows);
        let json: serde_json::Value = serde_json::from_str(&report.render(Format::Json).unwrap()).unwrap();
        assert_eq!(
            json[0],
            serde_json::json!({
                "group_id": 3, "slot": 0,
                "backend": {"addr": "198.18.1.10", "port": 8080},
                "flags": ["local"]
            })
        );
        assert_eq!(json.as_array().unwrap().len(), 3);
        let text = report.render(Format::Table).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "GROUP  SLOT  BACKEND           FLAGS");
        assert_eq!(lines[1], "3      0     198.18.1.10:8080  local");
        assert_eq!(lines[2], "3      1     198.18.2.10:8080  -");
        // Protocols are names in JSON too.
        let frontend =
            serde_json::to_value(Frontend::from(&ServiceKey::new(ip("198.19.0.10"), 80, proto::TCP)));
        assert_eq!(frontend.unwrap(), serde_json::json!({"addr": "198.19.0.10", "port": 80, "proto": "TCP"}));
    }

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(4.31), "4.3s");
        assert_eq!(human_duration(187.0), "3m07s");
        assert_eq!(human_duration(7_500.0), "2h05m");
        assert_eq!(human_duration(97_200.0), "1d03h");
    }

    #[test]
    fn a_missing_pin_says_whether_an_agent_ever_used_the_directory() {
        let never = Path::new("/nonexistent/xlb-inspect-test");
        let err = services(never).unwrap_err();
        assert!(matches!(err, InspectError::NoAgent { .. }), "{err}");
        assert!(err.to_string().contains("no agent has run with --bpffs-dir /nonexistent/xlb-inspect-test"));
        let dir = std::env::temp_dir();
        let err = conntrack(&dir).unwrap_err();
        assert!(matches!(err, InspectError::NotPinned { .. }), "{err}");
        assert!(err.to_string().contains(&dir.join("XLB_CONNTRACK").display().to_string()), "{err}");
        // Only the names map missing (pins of layout version 1): no names, no error.
        assert_eq!(read_names(&dir).unwrap(), BTreeMap::new());
    }
}
