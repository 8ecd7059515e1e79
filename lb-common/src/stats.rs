//! Per-Service-port traffic counters: `XLB_SERVICE_STATS`, a per-CPU array indexed by
//! `ServiceValue::stats_index` (slot 0 is never assigned: "not counted"), and the name of the
//! Service port each slot counts: `XLB_SERVICE_NAMES`, for the agent's readers only.

/// Packets and IP bytes of one Service port on one CPU, both directions. 16 bytes, host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
}

const _: () = assert!(core::mem::size_of::<ServiceStats>() == 16);
crate::user_pod!(ServiceStats);

/// Counter slots: the index is a u16 in `ServiceValue` and `CtEntry`.
pub const SERVICE_STATS_MAX: u32 = 65_536;

/// Bytes of `ServicePortName::name`: room for the longest name Kubernetes allows,
/// `namespace/name:port/PROTO`: namespace ≤ 63, name ≤ 63 (DNS labels), port name ≤ 15
/// (an IANA service name), protocol ≤ 4 (`SCTP`), and the separators: 148 bytes.
pub const SERVICE_PORT_NAME_MAX: usize = 156;

/// Value of `XLB_SERVICE_NAMES`, keyed by counter slot (`u32`, as `XLB_SERVICE_STATS`): the
/// Service port the slot counts, `namespace/name:port/PROTO` (`default/kiada:http/TCP`; as
/// kube-proxy's ServicePortName, no `:port` for an unnamed port: `default/dns/UDP`), so `xlb inspect` and bpftool can name a frontend's
/// Service from the pins alone, with no agent running. Written by the agent when it gives the
/// slot to a Service port (right after zeroing its counters), removed when no Service port has
/// it; the programs never read it. 160 bytes, 4-aligned:
/// - bytes 0..4: `len`, the name's length in bytes, host order;
/// - bytes 4..160: `name`, its UTF-8 bytes, then zeros.
///
/// A longer name (only a manifest directory can hold one: it does not check name lengths) is
/// cut at a character boundary to `SERVICE_PORT_NAME_MAX` bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServicePortName {
    pub len: u32,
    pub name: [u8; SERVICE_PORT_NAME_MAX],
}

const _: () = assert!(core::mem::size_of::<ServicePortName>() == 160);
crate::user_pod!(ServicePortName);

impl ServicePortName {
    /// `name`, cut at a character boundary to `SERVICE_PORT_NAME_MAX` bytes if longer.
    pub fn new(name: &str) -> Self {
        let mut len = name.len().min(SERVICE_PORT_NAME_MAX);
        while !name.is_char_boundary(len) {
            len -= 1;
        }
        let mut value = Self { len: len as u32, name: [0; SERVICE_PORT_NAME_MAX] };
        value.name[..len].copy_from_slice(&name.as_bytes()[..len]);
        value
    }

    /// The name; `None` if `len` is out of range or the bytes are not UTF-8 (an entry this
    /// agent did not write).
    pub fn as_str(&self) -> Option<&str> {
        let bytes = self.name.get(..usize::try_from(self.len).ok()?)?;
        core::str::from_utf8(bytes).ok()
    }
}
