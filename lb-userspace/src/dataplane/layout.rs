//! Pinned maps across upgrades: which maps an earlier agent pinned this build's programs can
//! use as they are.
//!
//! A pinned map is reused only if its layout has not changed since the layout version the
//! pinned maps record (`NodeConfig::layout_version` in `XLB_CONFIG`, see
//! `lb_common::maps::LAYOUT_VERSION`) and its type, key size, value size and flags are the
//! ones the programs expect, as read back from maps created from the object itself. A map the
//! agent fills from desired state is also recreated when its size differs from the one asked
//! for; a connection table keeps its size, since recreating it would reset connections.
//!
//! Every other map is recreated under a staging name (`<name>-new`): the programs still
//! running keep the pinned maps until the new agent has filled the new ones, then the staged
//! pins replace the old ones (`XLB_CONFIG`, which records the version, last) and the new
//! programs go into the links. An agent stopped before that finds the old pins and starts
//! over.
use std::{
    collections::BTreeMap,
    fmt,
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, MapError, MapType},
    EbpfLoader,
};
use lb_common::maps::{self, LAYOUT_VERSION};

use super::{loader::MapSizes, stats::count_entries, DataplaneError, EBPF_OBJECT};

/// A map's layout as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub max_entries: u32,
}

impl Layout {
    pub fn of(map: &MapData) -> Result<Self, MapError> {
        let info = map.info()?;
        Ok(Self {
            map_type: info.map_type()?,
            key_size: info.key_size(),
            value_size: info.value_size(),
            flags: info.map_flags(),
            max_entries: info.max_entries(),
        })
    }

    /// What differs from `wanted` in the type, key, value and flags (the programs would
    /// misread the entries), then in the size.
    fn differences(&self, wanted: &Self) -> (Vec<String>, Option<String>) {
        let mut layout = Vec::new();
        if self.map_type != wanted.map_type {
            layout.push(format!("type {:?}, not {:?}", self.map_type, wanted.map_type));
        }
        for (what, pinned, want) in
            [("key size", self.key_size, wanted.key_size), ("value size", self.value_size, wanted.value_size)]
        {
            if pinned != want {
                layout.push(format!("{what} {pinned} B, not {want} B"));
            }
        }
        if self.flags != wanted.flags {
            layout.push(format!("flags {:#x}, not {:#x}", self.flags, wanted.flags));
        }
        let size = (self.max_entries != wanted.max_entries)
            .then(|| format!("{} entries, not {}", self.max_entries, wanted.max_entries));
        (layout, size)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}, key {} B, value {} B, flags {:#x}, {} entries",
            self.map_type, self.key_size, self.value_size, self.flags, self.max_entries
        )
    }
}

/// Where a recreated map is pinned until it replaces the old one (bpffs refuses dots).
pub fn staged_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}-new"))
}

/// The layouts this build's programs expect, with the sizes the agent asks for: the object's
/// map definitions, read back from maps of one entry created from it and dropped at once.
pub fn expected(sizes: MapSizes) -> Result<BTreeMap<&'static str, Layout>, DataplaneError> {
    let mut probe = EbpfLoader::new();
    for name in maps::ALL {
        probe.map_max_entries(name, 1);
    }
    let mut ebpf = probe.load(EBPF_OBJECT)?;
    maps::ALL
        .into_iter()
        .map(|name| {
            let map_err = |source| DataplaneError::Map { name, source };
            let map = ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))?;
            let data = match &map {
                Map::HashMap(data)
                | Map::LruHashMap(data)
                | Map::LpmTrie(data)
                | Map::Array(data)
                | Map::PerCpuArray(data) => data,
                other => return Err(DataplaneError::MapType { name, found: format!("{other:?}") }),
            };
            let layout =
                Layout { max_entries: sizes.max_entries(name), ..Layout::of(data).map_err(map_err)? };
            Ok((name, layout))
        })
        .collect()
}

/// The layout version the pinned maps were filled with, read from the pinned `XLB_CONFIG`
/// whatever its value's size (the version stays at bytes 4..8); `None` if unreadable. 0 is
/// an agent from before layouts were versioned, whose layouts are version 1's.
fn pinned_layout_version(config: &MapData) -> Option<u32> {
    let layout = Layout::of(config).ok()?;
    if layout.key_size != 4 || layout.value_size < 8 {
        return None;
    }
    let mut value = vec![0u8; layout.value_size as usize];
    lookup(config, &0u32.to_ne_bytes(), &mut value).ok()?;
    let version = u32::from_ne_bytes(value[4..8].try_into().ok()?);
    Some(version.max(1))
}

/// BPF_MAP_LOOKUP_ELEM with raw bytes: aya's typed maps need the value type, and a pinned
/// map of another layout has another one.
fn lookup(map: &MapData, key: &[u8], value: &mut [u8]) -> std::io::Result<()> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    /// `union bpf_attr` for map element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = ElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` and both buffers outlive the call; the caller sized `key` and `value` as
    // the map's key and value, which is what the kernel reads and writes.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &attr as *const ElemAttr,
            std::mem::size_of::<ElemAttr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What becomes of one pinned map.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Reuse,
    /// A connection table of another size than asked for: reused as it is.
    KeepSize(String),
    /// Recreated, for this reason.
    Recreate(String),
}

/// Decides about pinned map `name`, given the layout version of the pinned maps (`None`:
/// unknown).
fn verdict(name: &str, pinned: &Layout, wanted: &Layout, version: Option<u32>) -> Verdict {
    let changed = maps::layout_changed(name);
    match version {
        None => return Verdict::Recreate("the layout version of the pinned maps is unknown".into()),
        Some(v) if v > LAYOUT_VERSION => {
            return Verdict::Recreate(format!(
                "the pinned maps are of layout version {v}, newer than this agent's {LAYOUT_VERSION}"
            ))
        }
        Some(v) if changed > v => {
            return Verdict::Recreate(format!(
                "its layout changed in version {changed}, after the pinned {v}"
            ))
        }
        Some(_) => {}
    }
    let (layout, size) = pinned.differences(wanted);
    if !layout.is_empty() {
        return Verdict::Recreate(layout.join(", "));
    }
    match size {
        None => Verdict::Reuse,
        Some(size) if maps::DESIRED_STATE.contains(&name) => Verdict::Recreate(size),
        Some(size) => Verdict::KeepSize(size),
    }
}

/// Decides, for every map, whether the one pinned under `dir` is reused, and logs each one
/// that is not, naming the map, its old and new layout and what is lost. Returns the maps to
/// create under their staging names, `XLB_CONFIG` last; none when nothing is pinned yet.
pub fn plan(dir: &Path, sizes: MapSizes) -> Result<Vec<&'static str>, DataplaneError> {
    // Staged maps of an agent that stopped before swapping them in: never used, start over.
    for name in maps::ALL {
        let path = staged_pin(dir, name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DataplaneError::Io { path, source: e })
            }
            _ => {}
        }
    }
    let pinned: Vec<(&'static str, Option<MapData>)> = maps::ALL
        .into_iter()
        .filter(|name| dir.join(name).exists())
        .map(|name| (name, MapData::from_pin(dir.join(name)).ok()))
        .collect();
    if pinned.is_empty() {
        return Ok(Vec::new());
    }
    let wanted = expected(sizes)?;
    let config = pinned.iter().find(|(name, _)| *name == maps::CONFIG).and_then(|(_, map)| map.as_ref());
    let version = config.and_then(pinned_layout_version);
    let version_text = version.map_or_else(|| "unknown".to_string(), |v| v.to_string());
    let mut staged = Vec::new();
    for name in maps::ALL {
        let want = &wanted[name];
        let Some((_, map)) = pinned.iter().find(|(n, _)| *n == name) else {
            tracing::warn!(
                "map {name}: not pinned while others are: created ({want}), filled before the new programs replace the running ones"
            );
            staged.push(name);
            continue;
        };
        let Some(layout) = map.as_ref().and_then(|m| Layout::of(m).ok()) else {
            tracing::warn!("map {name}: the pin is not a readable map: recreated ({want})");
            staged.push(name);
            continue;
        };
        match verdict(name, &layout, want, version) {
            Verdict::Reuse => {}
            Verdict::KeepSize(size) => tracing::warn!(
                "map {name}: reused with {size}: resizing it would reset the connections it tracks; `xlb agent --cleanup` before a start applies the new size"
            ),
            Verdict::Recreate(reason) => {
                let what = format!(
                    "map {name}: pinned layout not reused ({reason}): pinned {layout}, layout version {version_text}; now {want}, layout version {LAYOUT_VERSION}"
                );
                if maps::DESIRED_STATE.contains(&name) {
                    tracing::warn!("{what}. Recreated and filled from desired state before the new programs replace the running ones");
                } else {
                    let entries = map.as_ref().map(|m| count_entries(m, layout.key_size as usize));
                    let entries = entries.and_then(Result::ok).map_or_else(|| "its".to_string(), |n| n.to_string());
                    tracing::warn!(
                        "{what}. Recreated: {entries} tracked entries are reset when the new programs replace the running ones (their connections break)"
                    );
                }
                staged.push(name);
            }
        }
    }
    // XLB_CONFIG records the layout version of the maps under their names: it is swapped
    // in last, with any other, so an agent stopped in between starts over.
    if !staged.is_empty() && !staged.contains(&maps::CONFIG) {
        tracing::info!("map {}: recreated with the others (it records their layout version)", maps::CONFIG);
        staged.push(maps::CONFIG);
    }
    staged.sort_by_key(|name| *name == maps::CONFIG);
    Ok(staged)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: Layout =
        Layout { map_type: MapType::Hash, key_size: 8, value_size: 20, flags: 0, max_entries: 1024 };
    const LRU: Layout =
        Layout { map_type: MapType::LruHash, key_size: 16, value_size: 32, flags: 0, max_entries: 1024 };

    #[test]
    fn a_map_of_the_same_layout_and_version_is_reused() {
        assert_eq!(verdict(maps::SERVICES, &HASH, &HASH, Some(LAYOUT_VERSION)), Verdict::Reuse);
        assert_eq!(verdict(maps::CONNTRACK, &LRU, &LRU, Some(LAYOUT_VERSION)), Verdict::Reuse);
    }

    #[test]
    fn another_type_key_value_or_flags_recreates_the_map_and_says_what_differs() {
        let value = Layout { value_size: 24, ..LRU };
        assert_eq!(
            verdict(maps::CONNTRACK, &value, &LRU, Some(LAYOUT_VERSION)),
            Verdict::Recreate("value size 24 B, not 32 B".into())
        );
        let other = Layout { map_type: MapType::Hash, key_size: 12, flags: 1, ..LRU };
        let Verdict::Recreate(reason) = verdict(maps::NAT, &other, &LRU, Some(LAYOUT_VERSION)) else {
            panic!("reused")
        };
        assert_eq!(reason, "type Hash, not LruHash, key size 12 B, not 16 B, flags 0x1, not 0x0");
    }

    #[test]
    fn another_size_recreates_a_desired_state_map_and_keeps_a_connection_table() {
        let bigger = Layout { max_entries: 4096, ..HASH };
        assert_eq!(
            verdict(maps::SERVICES, &bigger, &HASH, Some(LAYOUT_VERSION)),
            Verdict::Recreate("4096 entries, not 1024".into())
        );
        let bigger = Layout { max_entries: 4096, ..LRU };
        assert_eq!(
            verdict(maps::CONNTRACK, &bigger, &LRU, Some(LAYOUT_VERSION)),
            Verdict::KeepSize("4096 entries, not 1024".into())
        );
    }

    #[test]
    fn an_unknown_or_newer_layout_version_recreates_every_map() {
        for name in maps::ALL {
            assert!(matches!(verdict(name, &LRU, &LRU, None), Verdict::Recreate(_)), "{name}");
            assert!(matches!(verdict(name, &LRU, &LRU, Some(LAYOUT_VERSION + 1)), Verdict::Recreate(_)));
        }
    }

    #[test]
    fn an_older_layout_version_recreates_the_maps_changed_since() {
        // Every map's layout is at least version 1: version 1 and agents before versions
        // (read as 1) keep them all.
        for name in maps::ALL {
            let changed = maps::layout_changed(name);
            assert_eq!(verdict(name, &LRU, &LRU, Some(changed)), Verdict::Reuse);
            if changed > 1 {
                assert!(matches!(verdict(name, &LRU, &LRU, Some(changed - 1)), Verdict::Recreate(_)));
            }
        }
    }
}
