//! The service (frontend) map: which destination a client may address.
//!
//! One entry per reachable frontend: a ClusterIP port, and a NodePort on every node address.
//! The value names a backend group and how many slots it has, so choosing a backend is one
//! random number and one lookup in the backend map: no loop over backends per packet.

/// Key of `XLB_SERVICES`. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address (ClusterIP or a node address), network byte order.
    pub addr: u32,
    /// Frontend port (service port or nodePort), network byte order.
    pub port: u16,
    /// IP protocol: `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// Always 0: keeps the key free of implicit padding.
    pub _pad: u8,
}

/// The frontend answers for traffic from outside the cluster (NodePort, LoadBalancer,
/// externalIP): with `externalTrafficPolicy: Cluster` the connection is SNATed to the node
/// address when the backend is on another node, so the reply comes back through this node.
pub const SVC_F_EXTERNAL: u16 = 1 << 0;

/// Value of `XLB_SERVICES`. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backend group in `XLB_BACKENDS`; shared by every frontend of one Service port.
    pub group_id: u32,
    /// Number of slots `0..backend_count` in the group. 0 means the Service has no endpoint.
    pub backend_count: u16,
    /// `SVC_F_*` bits.
    pub flags: u16,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);
crate::user_pod!(ServiceKey, ServiceValue);

#[cfg(feature = "user")]
impl ServiceKey {
    pub fn new(addr: core::net::Ipv4Addr, port: u16, proto: u8) -> Self {
        Self { addr: u32::from(addr).to_be(), port: port.to_be(), proto, _pad: 0 }
    }
    pub fn ip(&self) -> core::net::Ipv4Addr {
        core::net::Ipv4Addr::from(u32::from_be(self.addr))
    }
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}
