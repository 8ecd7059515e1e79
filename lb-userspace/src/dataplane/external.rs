//! Which hook takes an external interface's traffic. XDP is the fast path, but a frame an XDP
//! program sends back out (XDP_TX: the ICMP error that rejects a connection to a Service
//! without endpoints) into a veth is dropped unless the veth's peer runs an XDP program too,
//! and the peer of a kind node's `eth0` (on the host's bridge) runs none; nothing would tell
//! the operator. Such interfaces get the same pipeline at TC ingress (`xlb_tc_external`),
//! which answers with a redirect that needs nothing of the peer.
use std::fmt;

/// `--external-hook`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalHookMode {
    /// TC on veth interfaces, XDP on every other.
    #[default]
    Auto,
    /// XDP everywhere (a veth whose peer runs an XDP program, e.g. a test fabric).
    Xdp,
    /// TC everywhere.
    Tc,
}

/// The hook an external interface got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalHook {
    Xdp,
    Tc,
}

impl ExternalHook {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }
}

impl fmt::Display for ExternalHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The hook for an interface whose driver is `driver` (`None`: unknown), and why.
pub fn choose(mode: ExternalHookMode, driver: Option<&str>) -> (ExternalHook, &'static str) {
    match (mode, driver) {
        (ExternalHookMode::Xdp, _) => (ExternalHook::Xdp, "--external-hook xdp"),
        (ExternalHookMode::Tc, _) => (ExternalHook::Tc, "--external-hook tc"),
        (ExternalHookMode::Auto, Some("veth")) => {
            (ExternalHook::Tc, "veth: frames XDP sends back are lost unless the peer runs XDP too")
        }
        (ExternalHookMode::Auto, _) => (ExternalHook::Xdp, "XDP_TX works on this driver"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_takes_tc_on_veth_and_xdp_elsewhere_and_a_forced_mode_wins() {
        use ExternalHookMode::*;
        assert_eq!(choose(Auto, Some("veth")).0, ExternalHook::Tc);
        for driver in [Some("mlx5_core"), Some("virtio_net"), None] {
            assert_eq!(choose(Auto, driver).0, ExternalHook::Xdp, "{driver:?}");
        }
        assert_eq!(choose(Xdp, Some("veth")).0, ExternalHook::Xdp);
        assert_eq!(choose(Tc, Some("ixgbe")).0, ExternalHook::Tc);
    }
}
