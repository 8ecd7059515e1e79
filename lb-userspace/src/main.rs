//! `xlb`: the node agent of the xlb load balancer.
mod agent;

use std::{net::SocketAddr, ops::RangeInclusive, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "xlb", version, about = "eBPF/XDP load balancer for Kubernetes Services")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
// Parsed once: boxing the agent's flags would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Run the node agent: load and attach the programs, program the maps, keep them in sync.
    Agent(AgentArgs),
    /// Print what the dataplane holds, read from the pinned maps: works while the agent runs
    /// and after it stopped.
    Inspect(InspectArgs),
}

#[derive(clap::Args)]
struct InspectArgs {
    /// What to print.
    #[arg(value_enum)]
    what: lb_userspace::inspect::What,
    /// bpffs directory of the agent's pinned maps (its --bpffs-dir).
    #[arg(long, default_value = "/sys/fs/bpf/xlb")]
    bpffs_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = lb_userspace::inspect::Format::Table)]
    output: lb_userspace::inspect::Format,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Directory of Kubernetes manifests (Service, EndpointSlice, Node), watched for changes.
    /// Without it the agent follows the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig file for the Kubernetes API; without it, the in-cluster config (the Pod's
    /// service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name: endpoints with this nodeName are local.
    #[arg(long, env = "NODE_NAME", required_unless_present = "cleanup")]
    node_name: Option<String>,
    /// Interfaces facing the network (XDP or TC ingress, TC egress), comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "cleanup")]
    external_interfaces: Vec<String>,
    /// Where external interfaces take their traffic: at XDP (answers such as the REJECT of a
    /// Service without endpoints leave with XDP_TX), at TC ingress (answers leave with a
    /// redirect), or auto: TC on veth interfaces (kind nodes: XDP_TX into a veth is dropped
    /// unless its peer runs an XDP program), XDP elsewhere.
    #[arg(long, value_enum, default_value_t = lb_userspace::dataplane::ExternalHookMode::Auto)]
    external_hook: lb_userspace::dataplane::ExternalHookMode,
    /// Glob for pod interfaces (TC ingress and egress), matched again on every sync.
    #[arg(long)]
    pod_interfaces: Option<String>,
    /// cgroup v2 directory whose processes get socket load balancing to ClusterIPs and
    /// NodePorts (the node's own processes: the DaemonSet passes the cgroup v2 root). Without
    /// it no cgroup program is attached.
    #[arg(long)]
    cgroup_path: Option<PathBuf>,
    /// bpffs directory for the pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/xlb")]
    bpffs_dir: PathBuf,
    /// Entries of the conntrack and SNAT tables (LRU: a full table evicts the least recently
    /// used connection).
    #[arg(long, default_value_t = lb_common::maps::CONNTRACK_MAX)]
    conntrack_size: u32,
    /// Frontends (Service IP or node address, port, protocol) the services map holds.
    #[arg(long, default_value_t = lb_common::maps::SERVICES_MAX)]
    max_services: u32,
    /// Backend slots, over all Service ports, the backends map holds.
    #[arg(long, default_value_t = lb_common::maps::BACKENDS_MAX)]
    max_backends: u32,
    /// Full resync period: the maps are re-read and any drift repaired; also catches address
    /// and interface changes. /healthz turns unhealthy after twice this without a sync.
    #[arg(long, value_parser = humantime_secs, default_value = "30")]
    sync_period: Duration,
    /// Minimum interval between two syncs: changes arriving closer together are written as one.
    #[arg(long, value_parser = humantime_secs, default_value = "0.1")]
    min_sync_period: Duration,
    /// The cluster's node port range (kube-apiserver --service-node-port-range): nodePorts
    /// outside it are rejected.
    #[arg(long, value_parser = port_range, default_value = "30000-32767")]
    service_node_port_range: RangeInclusive<u16>,
    /// Address of the /healthz and /livez server, as kube-proxy's; empty: none.
    #[arg(long, value_parser = bind_address, default_value = "0.0.0.0:10256")]
    healthz_bind_address: BindAddress,
    /// Address of the Prometheus /metrics server; empty: none.
    #[arg(long, value_parser = bind_address, default_value = "127.0.0.1:10249")]
    metrics_bind_address: BindAddress,
    /// Remove every program, link and pin under --bpffs-dir, then exit.
    #[arg(long)]
    cleanup: bool,
}

fn port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let bad = || format!("{s:?} is not a port range like 30000-32767");
    let (low, high) = s.split_once('-').ok_or_else(bad)?;
    let (low, high): (u16, u16) = (low.parse().map_err(|_| bad())?, high.parse().map_err(|_| bad())?);
    if low == 0 || low > high {
        return Err(bad());
    }
    Ok(low..=high)
}

/// A server's address; `None` (an empty flag) turns the server off.
#[derive(Clone)]
struct BindAddress(Option<SocketAddr>);

fn bind_address(s: &str) -> Result<BindAddress, String> {
    if s.is_empty() {
        return Ok(BindAddress(None));
    }
    s.parse().map(|a| BindAddress(Some(a))).map_err(|_| format!("{s:?} is not an address:port"))
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 =
        s.trim_end_matches('s').parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Inspect(args) => {
            let report = lb_userspace::inspect::read(&args.bpffs_dir, args.what)?;
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(report.render(args.output)?.as_bytes()) {
                // `xlb inspect conntrack | head` is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                result => result.context("writing to stdout"),
            }
        }
        Command::Agent(args) if args.cleanup => {
            lb_userspace::dataplane::cleanup(&args.bpffs_dir)
                .with_context(|| format!("cleaning up {}", args.bpffs_dir.display()))?;
            tracing::info!(dir = %args.bpffs_dir.display(), "removed all programs, links and pins");
            Ok(())
        }
        Command::Agent(args) => {
            let pod_interfaces = args
                .pod_interfaces
                .as_deref()
                .map(glob::Pattern::new)
                .transpose()
                .context("--pod-interfaces is not a valid glob")?;
            let source = match args.manifests {
                Some(dir) => agent::Source::Manifests(dir),
                None => agent::Source::Api { kubeconfig: args.kubeconfig },
            };
            agent::run(agent::Config {
                source,
                node_name: args.node_name.expect("required by clap"),
                external_interfaces: args.external_interfaces,
                external_hook: args.external_hook,
                pod_interfaces,
                bpffs_dir: args.bpffs_dir,
                cgroup_path: args.cgroup_path,
                map_sizes: lb_userspace::dataplane::MapSizes {
                    services: args.max_services,
                    backends: args.max_backends,
                    conntrack: args.conntrack_size,
                },
                sync_period: args.sync_period,
                min_sync_period: args.min_sync_period,
                node_port_range: args.service_node_port_range,
                healthz_bind_address: args.healthz_bind_address.0,
                metrics_bind_address: args.metrics_bind_address.0,
            })
        }
    }
}
