//! The benchmark run: for every Service count and repeat, every mode in turn (the order
//! rotating between repeats) is programmed, changed and measured, then removed.
use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use crate::{
    cluster::{BenchCluster, Path, VERIFY_MAX_FAILURES},
    load::{self, Rng},
    micro,
    results::{Machine, Metric, Mode, Report, Settings, StepTime},
    workload::ENDPOINTS_PER_SERVICE,
};

/// What a run measures and how long each measurement lasts.
#[derive(Clone, Debug)]
pub struct Plan {
    pub settings: Settings,
    /// BPF_PROG_TEST_RUN samples per path.
    pub micro_samples: usize,
}

impl Plan {
    /// The full run of the issue: 100 to 10,000 Services, 5 repeats.
    pub fn full() -> Self {
        Self {
            settings: Settings {
                quick: false,
                service_counts: vec![100, 1_000, 5_000, 10_000],
                repeats: 5,
                endpoints_per_service: ENDPOINTS_PER_SERVICE,
                // Half a second is 8,000-10,000 connections per sample here; longer windows
                // only stretch the run past its 30 minutes.
                conn_ms: 500,
                concurrency: 4,
                stream_ms: 500,
                test_runs: 100_000,
            },
            micro_samples: 5,
        }
    }

    /// The smoke run for CI: the same steps, small and short.
    pub fn quick() -> Self {
        Self {
            settings: Settings {
                quick: true,
                service_counts: vec![100, 1_000],
                repeats: 2,
                conn_ms: 250,
                stream_ms: 250,
                test_runs: 10_000,
                ..Self::full().settings
            },
            micro_samples: 2,
        }
    }
}

/// Prints one progress line, rewritten in place, and adds up how long each kind of step took
/// (the same step of every repeat together), for the report's run-time table.
pub struct Progress {
    started: Instant,
    step: usize,
    steps: usize,
    /// The step under way: its kind and when it began.
    current: Option<(String, Instant)>,
    totals: Vec<StepTime>,
}

impl Progress {
    fn new(steps: usize) -> Self {
        Self { started: Instant::now(), step: 0, steps, current: None, totals: Vec::new() }
    }

    /// Ends the step under way and begins one of `kind`, shown as `shown`.
    fn show(&mut self, kind: String, shown: &str) {
        self.finish_step();
        self.current = Some((kind, Instant::now()));
        self.step += 1;
        let s = self.started.elapsed().as_secs();
        eprint!(
            "\r\x1b[K[{:>3}/{}] {:>2}:{:02} {shown}",
            self.step.min(self.steps),
            self.steps,
            s / 60,
            s % 60
        );
        let _ = std::io::stderr().flush();
    }

    fn finish_step(&mut self) {
        let Some((kind, began)) = self.current.take() else { return };
        let seconds = began.elapsed().as_secs_f64();
        match self.totals.iter_mut().find(|t| t.step == kind) {
            Some(total) => total.seconds += seconds,
            None => self.totals.push(StepTime { step: kind, seconds }),
        }
    }

    /// Every kind of step with its total time, the longest first.
    fn into_totals(mut self) -> Vec<StepTime> {
        self.finish_step();
        self.totals.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        self.totals
    }
}

/// Runs `plan` on a fresh benchmark cluster.
pub fn run(plan: &Plan, machine: Machine) -> anyhow::Result<Report> {
    let settings = &plan.settings;
    let mut report = Report { machine, settings: settings.clone(), ..Report::default() };
    let per_mode = 4 + 3 * Path::ALL.len();
    let steps = settings.service_counts.len() * settings.repeats * Mode::ALL.len() * per_mode + 1;
    let mut progress = Progress::new(steps);
    let mut cluster = BenchCluster::up()?;
    for &n in &settings.service_counts {
        cluster.set_services(n);
        for repeat in 0..settings.repeats {
            let mut rng = Rng::new((n * 1_000 + repeat) as u64);
            let changed = n / 2;
            // Any Service but the last and the changed one, the same for every mode.
            let random = loop {
                let i = rng.below(n - 1);
                if i != changed {
                    break i;
                }
            };
            let mut order = Mode::ALL;
            order.rotate_left(repeat % Mode::ALL.len());
            for mode in order {
                let mut step = |progress: &mut Progress, what: &str| {
                    let shown = format!(
                        "{n} Services, repeat {}/{}, {}: {what}",
                        repeat + 1,
                        settings.repeats,
                        mode.as_str()
                    );
                    progress.show(format!("{n} Services, {}: {what}", mode.as_str()), &shown);
                };
                step(&mut progress, "programming");
                measure_mode(
                    &mut cluster,
                    &mut report,
                    plan,
                    mode,
                    changed,
                    random,
                    repeat,
                    &mut progress,
                    &mut step,
                )?;
                step(&mut progress, "removing");
                cluster.unprogram()?;
            }
        }
    }
    let what = "BPF_PROG_TEST_RUN per-packet cost";
    progress.show(what.to_string(), what);
    micro::measure(&mut report, settings.test_runs, plan.micro_samples)?;
    eprintln!();
    report.run_time = progress.into_totals();
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn measure_mode(
    cluster: &mut BenchCluster,
    report: &mut Report,
    plan: &Plan,
    mode: Mode,
    changed: usize,
    random: usize,
    repeat: usize,
    progress: &mut Progress,
    step: &mut dyn FnMut(&mut Progress, &str),
) -> anyhow::Result<()> {
    let settings = &plan.settings;
    let n = cluster.services();
    let programmed = cluster.program(mode)?;
    if mode != Mode::Floor {
        report.add(Metric::ProgramAll, mode, n, "", "", ms(programmed));
    }
    if repeat == 0 {
        step(progress, "checking every Service answers");
        for path in Path::ALL {
            let failed = cluster.verify_all(path)?;
            if failed > 0 {
                let at_least = if failed == VERIFY_MAX_FAILURES { "at least " } else { "" };
                report.notes.push(format!(
                    "{}: {at_least}{failed} of {n} Services did not answer through {} after programming",
                    mode.as_str(),
                    path.as_str()
                ));
            }
        }
    } else {
        step(progress, "programmed");
    }
    let conn = Duration::from_millis(settings.conn_ms);
    for path in Path::ALL {
        for (target, i) in [("last", n - 1), ("random", random)] {
            step(progress, &format!("new connections, {} to the {target} Service", path.as_str()));
            cluster.flush_connections()?;
            let seed = (n * 31 + repeat * 7 + i) as u64;
            let stats = load::connection_rate(
                cluster.client_ns(path),
                &cluster.targets(path, i),
                conn,
                settings.concurrency,
                seed,
            )?;
            if stats.failed > 0 {
                report.notes.push(format!(
                    "{} at {n} Services, {} to the {target} Service: {} of {} connections failed",
                    mode.as_str(),
                    path.as_str(),
                    stats.failed,
                    stats.failed + stats.completed
                ));
            }
            report.add(Metric::ConnRate, mode, n, path.as_str(), target, stats.rate);
            report.add(Metric::LatencyP50, mode, n, path.as_str(), target, stats.p50_us);
            report.add(Metric::LatencyP99, mode, n, path.as_str(), target, stats.p99_us);
        }
    }
    for path in Path::ALL {
        step(progress, &format!("one stream, {}", path.as_str()));
        cluster.flush_connections()?;
        let target = cluster.targets(path, n - 1)[0];
        let gbits = load::stream_throughput(
            cluster.client_ns(path),
            target,
            Duration::from_millis(settings.stream_ms),
        )?;
        report.add(Metric::Throughput, mode, n, path.as_str(), "", gbits);
    }
    // Seconds after the last write, as a change comes in a steady cluster: right after
    // programming, the agent would first wait out its --min-sync-period, which coalesces
    // bursts of changes. The changed Service is neither the last nor the random one.
    if mode != Mode::Floor {
        step(progress, "changing one Service");
        let followed = cluster.change_one(changed)?;
        report.add(Metric::ProgramOne, mode, n, "", "", ms(followed));
    } else {
        step(progress, "nothing to change");
    }
    if mode == Mode::Xlb {
        let (rss, maps) = cluster.agent_memory()?;
        report.add(Metric::AgentRss, mode, n, "", "", mib(rss));
        report.add(Metric::MapMemory, mode, n, "", "", mib(maps));
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
