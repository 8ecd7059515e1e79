//! What the dataplane has done, read from the pinned maps for `/metrics`: traffic per
//! Service port and how full each table is. Works while the programs run; never writes.
use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{Map, MapData, MapError, PerCpuArray};
use lb_common::{maps, stats::ServiceStats};

use super::DataplaneError;
use crate::desired::GroupName;

/// Packets and IP bytes of one Service port, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTraffic {
    /// `ns/name:port/PROTO` (`ns/name/PROTO` for an unnamed port), as `desired::group_name`
    /// writes it.
    pub service_port: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Entries of one table against its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFill {
    pub name: &'static str,
    pub entries: u64,
    pub max_entries: u64,
}

/// The tables whose fill matters: every hash, LRU and trie map (arrays are always full).
const TABLES: [&str; 9] = [
    maps::SERVICES,
    maps::BACKENDS,
    maps::CT_SERVICE,
    maps::CONNTRACK,
    maps::NAT,
    maps::AFFINITY,
    maps::SOURCE_RANGES,
    maps::SOCK_REVNAT,
    maps::SERVICE_NAMES,
];

fn open(dir: &Path, name: &'static str) -> Result<MapData, DataplaneError> {
    MapData::from_pin(dir.join(name)).map_err(|source| DataplaneError::Map { name, source })
}

/// The pinned counters map under `dir`.
pub fn pinned_service_stats(dir: &Path) -> Result<PerCpuArray<MapData, ServiceStats>, DataplaneError> {
    let map = Map::PerCpuArray(open(dir, maps::SERVICE_STATS)?);
    map.try_into().map_err(|source| DataplaneError::Map { name: maps::SERVICE_STATS, source })
}

/// The counters of every Service port in `counted` (counter slot → Service port).
pub fn service_traffic(
    stats: &PerCpuArray<MapData, ServiceStats>,
    counted: &BTreeMap<u16, GroupName>,
) -> Result<Vec<ServiceTraffic>, DataplaneError> {
    let map_err = |source| DataplaneError::Map { name: maps::SERVICE_STATS, source };
    counted
        .iter()
        .map(|(index, service_port)| {
            let per_cpu = stats.get(&u32::from(*index), 0).map_err(map_err)?;
            Ok(ServiceTraffic {
                service_port: service_port.to_string(),
                packets: per_cpu.iter().map(|s| s.packets).sum(),
                bytes: per_cpu.iter().map(|s| s.bytes).sum(),
            })
        })
        .collect()
}

/// Entries and size of every table.
pub fn table_fill(dir: &Path) -> Result<Vec<TableFill>, DataplaneError> {
    TABLES
        .iter()
        .map(|name| {
            let map_err = |source| DataplaneError::Map { name, source };
            let data = open(dir, name)?;
            let info = data.info().map_err(map_err)?;
            let entries = count_entries(&data, info.key_size() as usize).map_err(map_err)?;
            Ok(TableFill { name, entries, max_entries: u64::from(info.max_entries()) })
        })
        .collect()
}

/// Walks the keys with BPF_MAP_GET_NEXT_KEY, which works on every map type and does not
/// need the key type (aya's iterators do).
pub(super) fn count_entries(map: &MapData, key_size: usize) -> Result<u64, MapError> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    /// `union bpf_attr` for map element commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let (mut key, mut next) = (vec![0u8; key_size], vec![0u8; key_size]);
    let mut count = 0u64;
    let mut first = true;
    loop {
        let attr = ElemAttr {
            map_fd: fd as u32,
            _pad: 0,
            // A null key asks for the first key.
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `attr` and both buffers outlive the call; the kernel writes at most
        // `key_size` bytes into `next`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &attr as *const ElemAttr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if ret < 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOENT) {
                return Ok(count);
            }
            return Err(MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_get_next_key",
                io_error: error,
            }));
        }
        count += 1;
        first = false;
        std::mem::swap(&mut key, &mut next);
    }
}
