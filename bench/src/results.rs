//! What a benchmark run measured: every figure with its samples, the machine, the goals.
//! Serialized as `target/bench/report.json`; `report` renders it as Markdown and plots.
use serde::{Deserialize, Serialize};

/// Who served the Services in a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No Service rules: the client talks to an endpoint directly (routing alone).
    Floor,
    Xlb,
    Iptables,
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Floor, Mode::Xlb, Mode::Iptables, Mode::Nftables];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Floor => "floor",
            Mode::Xlb => "xlb",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// The measured quantities. `unit()` says how samples are expressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// New connections per second, one request each.
    ConnRate,
    /// Connect + request + response + close, per connection.
    LatencyP50,
    LatencyP99,
    /// One long TCP stream.
    Throughput,
    /// From writing N Services to traffic flowing for them.
    ProgramAll,
    /// With N Services present, from changing one to traffic following the change.
    ProgramOne,
    /// Agent resident set size after programming N Services.
    AgentRss,
    /// Memory of the agent's BPF maps (memlock of each map).
    MapMemory,
    /// BPF_PROG_TEST_RUN time per packet.
    NsPerPacket,
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::ConnRate => "conn/s",
            Metric::LatencyP50 | Metric::LatencyP99 => "µs",
            Metric::Throughput => "Gbit/s",
            Metric::ProgramAll | Metric::ProgramOne => "ms",
            Metric::AgentRss | Metric::MapMemory => "MiB",
            Metric::NsPerPacket => "ns",
        }
    }

    /// Whether a larger value is better (for ratios and goal wording).
    pub fn higher_is_better(self) -> bool {
        matches!(self, Metric::ConnRate | Metric::Throughput)
    }
}

/// One figure: a metric for one mode, Service count and path, with every repeat's sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub metric: Metric,
    pub mode: Mode,
    /// Services present (0 for the per-packet figures).
    pub services: usize,
    /// Which path or case: `clusterip-pod`, `nodeport-external`, `ct-hit`...
    pub path: String,
    /// Which Service was targeted: `last` (last in iptables' chain order), `random`, or "".
    pub target: String,
    pub samples: Vec<f64>,
}

/// min, median and max of a figure's samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// `None` for no samples. The median of an even count is the mean of the middle two.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| s.is_finite()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Some(Self { min: sorted[0], median, max: sorted[n - 1] })
    }
}

/// The machine and the code measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub commit: String,
    /// UTC, RFC 3339.
    pub date: String,
    /// `iptables -V`, e.g. `iptables v1.8.9 (nf_tables)`.
    pub iptables: String,
    pub nft: String,
}

/// How the run was configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub quick: bool,
    pub service_counts: Vec<usize>,
    pub repeats: usize,
    pub endpoints_per_service: usize,
    /// Length of each connection-rate measurement.
    pub conn_ms: u64,
    /// Concurrent client connections in the connection-rate measurement.
    pub concurrency: usize,
    /// Length of each throughput measurement.
    pub stream_ms: u64,
    /// BPF_PROG_TEST_RUN runs per per-packet sample.
    pub test_runs: u32,
}

/// A goal of the benchmark and whether this run met it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Goal {
    /// What was required, e.g. "xlb/iptables new-connection rate at 10,000 Services ≥ 4".
    pub goal: String,
    /// The measured figure, e.g. "6.1".
    pub measured: String,
    /// `None` when the run did not measure it (e.g. `--quick` stops below 10,000 Services).
    pub met: Option<bool>,
}

/// Where a run's time went: one kind of step (e.g. "10000 Services, iptables: programming"),
/// every repeat together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub settings: Settings,
    pub figures: Vec<Figure>,
    pub goals: Vec<Goal>,
    /// Things the reader must know about this run (failed probes, skipped steps).
    pub notes: Vec<String>,
    /// Every kind of step with its total time, the longest first.
    #[serde(default)]
    pub run_time: Vec<StepTime>,
}

impl Report {
    /// The figure of `metric` for `mode` at `services` on `path` and `target`, if measured.
    pub fn figure(
        &self,
        metric: Metric,
        mode: Mode,
        services: usize,
        path: &str,
        target: &str,
    ) -> Option<&Figure> {
        self.figures.iter().find(|f| {
            f.metric == metric
                && f.mode == mode
                && f.services == services
                && f.path == path
                && f.target == target
        })
    }

    /// Adds `sample` to its figure, creating the figure on first use.
    pub fn add(
        &mut self,
        metric: Metric,
        mode: Mode,
        services: usize,
        path: &str,
        target: &str,
        sample: f64,
    ) {
        match self.figures.iter_mut().find(|f| {
            f.metric == metric
                && f.mode == mode
                && f.services == services
                && f.path == path
                && f.target == target
        }) {
            Some(figure) => figure.samples.push(sample),
            None => self.figures.push(Figure {
                metric,
                mode,
                services,
                path: path.to_string(),
                target: target.to_string(),
                samples: vec![sample],
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_takes_min_median_max_and_ignores_non_finite_samples() {
        let s = Summary::of(&[5.0, 1.0, f64::NAN, 3.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        assert_eq!(Summary::of(&[4.0, 2.0]).unwrap().median, 3.0);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn samples_of_one_figure_accumulate() {
        let mut r = Report::default();
        r.add(Metric::ConnRate, Mode::Xlb, 100, "clusterip-pod", "last", 1.0);
        r.add(Metric::ConnRate, Mode::Xlb, 100, "clusterip-pod", "last", 2.0);
        r.add(Metric::ConnRate, Mode::Floor, 100, "clusterip-pod", "last", 3.0);
        assert_eq!(r.figures.len(), 2);
        assert_eq!(
            r.figure(Metric::ConnRate, Mode::Xlb, 100, "clusterip-pod", "last").unwrap().samples,
            [1.0, 2.0]
        );
    }
}
