//! Stale UDP flows, removed as kube-proxy's conntrack cleanup removes them
//! (pkg/proxy/conntrack/cleanup.go): a tracked UDP flow whose backend no longer serves its
//! Service port would otherwise keep reaching it for as long as the client keeps sending
//! from the same port (DNS resolvers, statsd, syslog, QUIC), since every datagram refreshes
//! the entry. Deleting the flow's entries makes its next datagram a new flow, balanced
//! afresh (or rejected when the Service has no endpoint left). TCP flows are left alone: a
//! connection to a removed endpoint lives until it ends, as with kube-proxy.
//!
//! The same holds one layer up for the node's own connected UDP sockets, which the socket
//! programs pointed at a backend at `connect()` (pods' UDP takes the packet path): such a
//! socket whose backend no longer serves its frontend is destroyed (`sock_diag`), so its
//! process sees ECONNABORTED and connects again, to a serving backend. kube-proxy has no
//! socket-level balancing and no such sockets; Cilium destroys them the same way.
use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, MapError};
use lb_common::{
    conntrack::{CtBackend, CtEntry, CtKey},
    maps,
    nat::NatEntry,
    proto,
    service::ServiceKey,
    socket::{SockRevNatKey, SockRevNatValue},
};

use super::{Dataplane, DataplaneError};
use crate::{desired::DesiredState, sock_diag};

/// The connection tables the programs fill.
pub struct FlowTables {
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ct_service: HashMap<MapData, CtKey, CtBackend>,
    nat: HashMap<MapData, CtKey, NatEntry>,
    sock_revnat: HashMap<MapData, SockRevNatKey, SockRevNatValue>,
}

/// What one cleanup did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// UDP flows (or balanced sockets) looked at.
    pub udp_flows: usize,
    /// Stale flows removed (sockets destroyed).
    pub removed: usize,
    pub failures: Vec<String>,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// Whether the UDP flow `key` (client → backend) with `entry` is stale in `desired`: its
/// frontend is gone, or its backend is not among the serving endpoints of the frontend's
/// Service port. Traffic policies are left out on purpose, as kube-proxy does: a policy
/// change does not move existing flows.
pub fn is_stale(key: &CtKey, entry: &CtEntry, desired: &DesiredState) -> bool {
    let frontend =
        ServiceKey { addr: entry.frontend_addr, port: entry.frontend_port, proto: key.proto, _pad: 0 };
    !serves(desired, &frontend, (Ipv4Addr::from(u32::from_be(key.daddr)), u16::from_be(key.dport)))
}

/// Whether `backend` serves the Service port of UDP frontend `frontend` in `desired`.
fn serves(desired: &DesiredState, frontend: &ServiceKey, backend: (Ipv4Addr, u16)) -> bool {
    desired.frontends.get(frontend).is_some_and(|frontend| {
        desired.udp_serving.get(&frontend.service_port).is_some_and(|serving| serving.contains(&backend))
    })
}

impl FlowTables {
    pub fn open(dp: &mut Dataplane) -> Result<Self, DataplaneError> {
        Ok(Self {
            conntrack: dp.take_map(maps::CONNTRACK)?.try_into().map_err(map_err(maps::CONNTRACK))?,
            ct_service: dp.take_map(maps::CT_SERVICE)?.try_into().map_err(map_err(maps::CT_SERVICE))?,
            nat: dp.take_map(maps::NAT)?.try_into().map_err(map_err(maps::NAT))?,
            sock_revnat: dp.take_map(maps::SOCK_REVNAT)?.try_into().map_err(map_err(maps::SOCK_REVNAT))?,
        })
    }

    /// Destroys every connected UDP socket of the node's network namespace (the agent's) that
    /// the socket programs pointed at a backend that no longer serves the frontend the socket
    /// addressed.
    pub fn destroy_stale_udp_sockets(&self, desired: &DesiredState) -> CleanupReport {
        let mut report = CleanupReport::default();
        let sockets = match sock_diag::connected_udp_sockets() {
            Ok(sockets) => sockets,
            Err(e) => {
                report.failures.push(format!("listing the node's connected UDP sockets: {e}"));
                return report;
            }
        };
        for socket in sockets {
            let key = SockRevNatKey {
                cookie: socket.cookie,
                backend_addr: u32::from(*socket.peer.ip()).to_be(),
                backend_port: socket.peer.port().to_be(),
                _pad: 0,
            };
            // Only sockets the programs balanced have an entry.
            let Ok(frontend) = self.sock_revnat.get(&key, 0) else { continue };
            report.udp_flows += 1;
            let frontend = ServiceKey {
                addr: frontend.frontend_addr,
                port: frontend.frontend_port,
                proto: proto::UDP,
                _pad: 0,
            };
            if serves(desired, &frontend, (*socket.peer.ip(), socket.peer.port())) {
                continue;
            }
            match sock_diag::destroy(&socket) {
                Ok(()) => report.removed += 1,
                // Closed meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => report.failures.push(format!(
                    "destroying the UDP socket {} → {} (a removed endpoint): {e}",
                    socket.local, socket.peer
                )),
            }
        }
        report
    }

    /// Removes every stale UDP flow (`is_stale`): its conntrack entry, the entry that leads
    /// the client's datagrams to it, and its SNAT binding.
    pub fn remove_stale_udp(&mut self, desired: &DesiredState) -> CleanupReport {
        let mut report = CleanupReport::default();
        // Keys first: deleting while walking would make the walk restart or skip.
        let keys: Vec<CtKey> = match self.conntrack.keys().collect::<Result<_, _>>() {
            Ok(keys) => keys,
            Err(e) => {
                report.failures.push(format!("walking {}: {e}", maps::CONNTRACK));
                return report;
            }
        };
        for key in keys.into_iter().filter(|k| k.proto == proto::UDP) {
            report.udp_flows += 1;
            // Gone meanwhile (LRU eviction, or the flow ended): nothing to do.
            let Ok(entry) = self.conntrack.get(&key, 0) else { continue };
            if !is_stale(&key, &entry, desired) {
                continue;
            }
            let to_frontend = CtKey { daddr: entry.frontend_addr, dport: entry.frontend_port, ..key };
            let snat_binding = (entry.snat_addr != 0).then_some(CtKey {
                saddr: key.daddr,
                sport: key.dport,
                daddr: entry.snat_addr,
                dport: entry.snat_port,
                ..key
            });
            // The lead from the client's tuple first: a datagram arriving in between finds no
            // flow and is balanced afresh, never the half-removed one.
            let removed = [
                remove(&mut self.ct_service, &to_frontend, maps::CT_SERVICE),
                snat_binding.map_or(Ok(()), |binding| remove(&mut self.nat, &binding, maps::NAT)),
                remove(&mut self.conntrack, &key, maps::CONNTRACK),
            ];
            match removed.into_iter().collect::<Result<(), String>>() {
                Ok(()) => report.removed += 1,
                Err(e) => report.failures.push(e),
            }
        }
        report
    }
}

fn remove<V: aya::Pod>(map: &mut HashMap<MapData, CtKey, V>, key: &CtKey, name: &str) -> Result<(), String> {
    match map.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(format!("removing a stale UDP flow from {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::desired::Frontend;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn flow(backend: &str, frontend: (&str, u16)) -> (CtKey, CtEntry) {
        let key = CtKey::new(ip("198.18.1.10"), 40000, ip(backend), 5353, proto::UDP);
        let entry = CtEntry {
            frontend_addr: u32::from(ip(frontend.0)).to_be(),
            frontend_port: frontend.1.to_be(),
            snat_port: 0,
            snat_addr: 0,
            state: 0,
            flags: 0,
            stats_index: 0,
            created_ns: 0,
            last_seen_ns: 0,
        };
        (key, entry)
    }

    #[test]
    fn a_udp_flow_is_stale_when_its_backend_no_longer_serves_or_its_frontend_is_gone() {
        let dns: crate::desired::GroupName = "kube-system/dns:dns/UDP".into();
        let mut desired = DesiredState::default();
        let frontend = Frontend {
            group: format!("{dns} local").into(),
            internal_group: dns.clone(),
            flags: 0,
            affinity_timeout_s: 0,
            service_port: dns.clone(),
        };
        desired.frontends.insert(ServiceKey::new(ip("198.19.0.10"), 53, proto::UDP), frontend);
        desired.udp_serving.insert(dns.clone(), BTreeSet::from([(ip("198.18.2.10"), 5353)]));

        // Serving, even if the frontend's groups (a Local policy here) do not hold it.
        let (key, entry) = flow("198.18.2.10", ("198.19.0.10", 53));
        assert!(!is_stale(&key, &entry, &desired));
        // Removed, or no longer serving.
        let (key, entry) = flow("198.18.1.11", ("198.19.0.10", 53));
        assert!(is_stale(&key, &entry, &desired));
        // The frontend is gone (the Service was deleted or lost the port).
        let (key, entry) = flow("198.18.2.10", ("198.19.0.11", 53));
        assert!(is_stale(&key, &entry, &desired));
        // A Service port without serving endpoints at all.
        desired.udp_serving.insert(dns, BTreeSet::new());
        let (key, entry) = flow("198.18.2.10", ("198.19.0.10", 53));
        assert!(is_stale(&key, &entry, &desired));
    }
}
