//! The service (frontend) map: which destination a client may address.
//!
//! One entry per reachable frontend: a ClusterIP port, a NodePort on every node address, an
//! externalIP or LoadBalancer ingress IP port. The value names the backend groups to balance
//! to and how many slots each has, so choosing a backend is one random number and one lookup
//! in the backend map: no loop over backends per packet.
//!
//! Traffic policies are resolved by the agent into the two groups: `group_id` serves clients
//! outside the node (arriving on an external interface), `internal_group_id` serves this
//! node's pods and processes. For a ClusterIP both are the `internalTrafficPolicy` group;
//! for an external frontend the first is the `externalTrafficPolicy` group and the second the
//! Cluster group (kube-proxy: a pod reaching a NodePort always gets Cluster policy).

/// Key of `XLB_SERVICES`. 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend IPv4 address (ClusterIP, node address, externalIP or LB IP), network byte order.
    pub addr: u32,
    /// Frontend port (service port or nodePort), network byte order.
    pub port: u16,
    /// IP protocol: `proto::TCP` or `proto::UDP`.
    pub proto: u8,
    /// Always 0: keeps the key free of implicit padding.
    pub _pad: u8,
}

/// The Service port has no usable endpoint at all: new connections are rejected with an ICMP
/// port unreachable (kube-proxy's REJECT). Without this flag an empty group (Local policy
/// without a local endpoint) drops.
pub const SVC_F_NO_ENDPOINTS: u16 = 1 << 0;
/// Clients from outside the node must match `XLB_SOURCE_RANGES` for this frontend
/// (`loadBalancerSourceRanges`, LB IPs only); others are dropped.
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 1;

/// Value of `XLB_SERVICES`. 20 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Backend group in `XLB_BACKENDS` for clients outside the node.
    pub group_id: u32,
    /// Backend group for this node's pods and processes.
    pub internal_group_id: u32,
    /// Slots `0..backend_count` of `group_id`.
    pub backend_count: u16,
    /// Slots `0..internal_count` of `internal_group_id`.
    pub internal_count: u16,
    /// `SVC_F_*` bits.
    pub flags: u16,
    /// Slot of the Service port's counters in `XLB_SERVICE_STATS`; 0: not counted.
    pub stats_index: u16,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 when affinity is off.
    pub affinity_timeout_s: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 20);
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
