//! The backend map: the endpoints of each backend group, one slot each.

/// Key of `XLB_BACKENDS`. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    /// `ServiceValue::group_id`.
    pub group_id: u32,
    /// Slot in `0..ServiceValue::backend_count`.
    pub slot: u32,
}

/// The endpoint runs on this node: it is reached without SNAT, so it sees the client address.
pub const BACKEND_F_LOCAL: u8 = 1 << 0;

/// Value of `XLB_BACKENDS`. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// Endpoint (pod) IPv4 address, network byte order.
    pub addr: u32,
    /// Endpoint port (the resolved targetPort), network byte order.
    pub port: u16,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// Always 0.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<BackendKey>() == 8);
const _: () = assert!(core::mem::size_of::<Backend>() == 8);
crate::user_pod!(BackendKey, Backend);

#[cfg(feature = "user")]
impl Backend {
    pub fn new(addr: core::net::Ipv4Addr, port: u16, flags: u8) -> Self {
        Self { addr: u32::from(addr).to_be(), port: port.to_be(), flags, _pad: 0 }
    }
    pub fn ip(&self) -> core::net::Ipv4Addr {
        core::net::Ipv4Addr::from(u32::from_be(self.addr))
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}
