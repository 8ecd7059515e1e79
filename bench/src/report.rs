//! Renders a benchmark [`Report`]: the goals evaluated on its figures, the headline table, the
//! whole report as Markdown, and the files of `target/bench/` (`report.json`, `report.md` and
//! one PNG plot per comparison).
//!
//! Every figure is shown as min / median / max of its repeats; every ratio is xlb's median over
//! the other mode's median.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::Context as _;
use plotters::{
    coord::ranged1d::{AsRangedCoord, ValueFormatter},
    prelude::*,
};

use crate::results::{Goal, Metric, Mode, Report, Summary};

/// The paths every connection goal is checked on.
const PATHS: [&str; 2] = ["clusterip-pod", "nodeport-external"];
/// The Service last in iptables' chain order: its worst case, where the goals are set.
const LAST: &str = "last";
/// The Service count the goals are set at.
const GOAL_SERVICES: usize = 10_000;
/// The Service count xlb's connection rate must stay flat from.
const FEW_SERVICES: usize = 100;
/// The headline's rows, in order: these for each path...
const HEADLINE_PER_PATH: [Metric; 2] = [Metric::ConnRate, Metric::LatencyP99];
/// ...then these once.
const HEADLINE_ONCE: [Metric; 2] = [Metric::ProgramAll, Metric::ProgramOne];
/// The other modes xlb is compared with, in column order.
const VERSUS: [Mode; 3] = [Mode::Iptables, Mode::Nftables, Mode::Floor];
/// The font of the plots: plotters' ab_glyph backend has no font of its own.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const PLOT_SIZE: (u32, u32) = (1200, 750);

/// The goals of the benchmark, evaluated on `report` (met = None when not measured, e.g. a
/// quick run without 10,000 Services):
/// - at 10,000 Services, xlb's ConnRate ≥ 4× iptables, ≥ 1.15× nftables, ≥ 0.95× floor, and
///   xlb's LatencyP99 ≤ 1/3 of iptables — each for both paths, target "last";
/// - xlb's ConnRate flat: within 10% between 100 and 10,000 Services (both paths, "last");
/// - xlb ProgramAll at 10,000 < 1000 ms; xlb ProgramOne at 10,000 < 10 ms;
/// - NsPerPacket "xdp-conntrack-hit" median < 100 ns.
///
/// `measured` states the figure (e.g. "5.20× (xlb 21,300 conn/s, iptables 4,100 conn/s)"), or
/// what is missing when the goal was not measured.
pub fn goals(report: &Report) -> Vec<Goal> {
    let at = count(GOAL_SERVICES);
    let mut goals = Vec::new();
    for path in PATHS {
        let key = Key { metric: Metric::ConnRate, services: GOAL_SERVICES, path, target: LAST };
        for (other, least) in [(Mode::Iptables, 4.0), (Mode::Nftables, 1.15), (Mode::Floor, 0.95)] {
            goals.push(goal(
                format!("xlb new connections/s ≥ {least}× {}, {path}, last of {at} Services", other.as_str()),
                versus(report, key, other),
                |ratio| ratio >= least,
            ));
        }
        goals.push(goal(
            format!("xlb p99 latency ≤ 1/3 of iptables, {path}, last of {at} Services"),
            versus(report, Key { metric: Metric::LatencyP99, ..key }, Mode::Iptables),
            |ratio| ratio <= 1.0 / 3.0,
        ));
        goals.push(goal(
            format!(
                "xlb new connections/s flat (within 10%) from {} to {at} Services, {path}, last",
                count(FEW_SERVICES)
            ),
            flatness(report, path),
            |change| change.abs() <= 0.10,
        ));
    }
    for (metric, wording, limit) in [
        (Metric::ProgramAll, format!("xlb programs {at} Services in < 1,000 ms"), 1000.0),
        (Metric::ProgramOne, format!("xlb applies one change among {at} Services in < 10 ms"), 10.0),
    ] {
        let key = Key { metric, services: GOAL_SERVICES, path: "", target: "" };
        let measured = median(report, key, Mode::Xlb).map(|ms| (ms, quantity(ms, metric)));
        goals.push(goal(wording, measured, |ms| ms < limit));
    }
    let ct_hit = per_packet(report)
        .into_iter()
        .find(|(mode, path, _)| *mode == Mode::Xlb && path == "xdp-conntrack-hit")
        .map(|(_, _, s)| (s.median, quantity(s.median, Metric::NsPerPacket)))
        .ok_or_else(|| "no xlb xdp-conntrack-hit figure".to_string());
    goals.push(goal("xlb XDP conntrack hit < 100 ns per packet (median)".into(), ct_hit, |ns| ns < 100.0));
    goals
}

/// The headline: a Markdown table at the largest Service count measured — for each path
/// (target "last"): median conn/s and p99 per mode, with xlb/iptables, xlb/nftables, xlb/floor
/// ratios; plus programming times; used at the top of report.md and pasted into the README.
pub fn headline(report: &Report) -> String {
    let metrics = [HEADLINE_PER_PATH, HEADLINE_ONCE].concat();
    let Some(services) =
        report.figures.iter().filter(|f| metrics.contains(&f.metric)).map(|f| f.services).max()
    else {
        return "No connection, latency or programming figures were measured.\n".into();
    };
    let columns = Columns::of(report, &metrics, |s| num(s.median));
    let mut table = columns.table(&["Measure"]);
    let paths: BTreeSet<&str> = report
        .figures
        .iter()
        .filter(|f| HEADLINE_PER_PATH.contains(&f.metric) && f.services == services && f.target == LAST)
        .map(|f| f.path.as_str())
        .collect();
    let keys = paths
        .into_iter()
        .flat_map(|path| HEADLINE_PER_PATH.map(|metric| Key { metric, services, path, target: LAST }))
        .chain(HEADLINE_ONCE.map(|metric| Key { metric, services, path: "", target: "" }));
    for key in keys {
        let label = match key.path {
            "" => measure(key.metric),
            path => format!("{path}: {}", measure(key.metric)),
        };
        columns.row(&mut table, report, key, vec![label]);
    }
    format!(
        "At {} Services; medians of {} runs; connections go to the Service last in iptables' chain \
         order (its worst case). Ratios are xlb over the other mode: above 1 is better for \
         connections/s, below 1 for latency and programming time.\n\n{}",
        count(services),
        report.settings.repeats,
        table.render()
    )
}

/// The whole report as Markdown: machine (cores, CPU, kernel, iptables/nft versions), commit,
/// date, settings; the goals table (met / NOT met / not measured, with the figure); the
/// headline; one table per metric (rows: services × path × target; columns: per mode
/// min / median / max; ratio columns xlb/iptables, xlb/nftables, xlb/floor where those modes
/// exist); the per-packet table with xlb minus floor; the notes; links to the PNGs.
///
/// The goals are evaluated afresh with [`goals`], so the table always matches the figures.
pub fn markdown(report: &Report) -> String {
    let (m, s) = (&report.machine, &report.settings);
    let mut md = String::from("# xlb benchmark\n\n");
    if s.quick {
        md += "**Quick run**: fewer Service counts and repeats than a full run.\n\n";
    }
    let counts: Vec<String> = s.service_counts.iter().map(|&n| count(n)).collect();
    let _ = write!(
        md,
        "## Machine\n\n\
         - CPU: {} ({} cores)\n- Kernel: {}\n- iptables: {}\n- nft: {}\n- Commit: `{}`\n- Date: {}\n\n\
         ## Settings\n\n\
         - Service counts: {}\n- Repeats: {} (every figure: min / median / max of the repeats)\n\
         - Endpoints per Service: {}\n\
         - Connection rate: {} ms per measurement, {} concurrent connections\n\
         - Throughput: one TCP stream of {} ms\n\
         - Per packet: {} BPF_PROG_TEST_RUN runs per sample\n\n",
        m.cpu_model,
        m.cores,
        m.kernel,
        m.iptables,
        m.nft,
        m.commit,
        m.date,
        counts.join(", "),
        s.repeats,
        s.endpoints_per_service,
        count(s.conn_ms as usize),
        s.concurrency,
        count(s.stream_ms as usize),
        count(s.test_runs as usize),
    );

    let mut table = Table::new(["Goal", "Result", "Measured"], 3);
    for g in goals(report) {
        let result = match g.met {
            Some(true) => "met",
            Some(false) => "**NOT met**",
            None => "not measured",
        };
        table.rows.push(vec![g.goal, result.into(), g.measured]);
    }
    let _ = write!(md, "## Goals\n\n{}\n## Headline\n\n{}\n", table.render(), headline(report));

    md += "## Figures\n\nEach cell is the median (min–max) of the repeats; ratios are of medians.\n\n";
    let metrics: BTreeSet<Metric> =
        report.figures.iter().map(|f| f.metric).filter(|&m| m != Metric::NsPerPacket).collect();
    for metric in metrics {
        let _ = write!(md, "### {}\n\n{}\n", measure(metric), metric_table(report, metric));
    }

    let _ = write!(md, "## Per packet\n\n{}\n## Notes\n\n", per_packet_table(report));
    if report.notes.is_empty() {
        md += "None.\n";
    }
    for note in &report.notes {
        let _ = writeln!(md, "- {note}");
    }
    md += &run_time(report);
    md += "\n## Plots\n\n";
    for plot in plots(report) {
        let _ = writeln!(md, "![{}]({})\n", plot.title, plot.file);
    }
    md
}

/// Writes report.json (pretty serde_json of `report`), report.md and the PNG plots into `dir`
/// (creating it). Plots (one PNG each, median with min–max error bars or whiskers, log x axis
/// over Service counts, one line per mode, legend): conn-rate-<path>.png (target last),
/// latency-p99-<path>.png, program-all.png, program-one.png (log y), and ns-per-packet.png
/// (bars per path). Returns the paths written.
pub fn write(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // The data first: a plotting failure (a missing font) must not lose the measurements.
    let json = dir.join("report.json");
    std::fs::write(&json, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let md = dir.join("report.md");
    std::fs::write(&md, markdown(report)).with_context(|| format!("writing {}", md.display()))?;
    let mut written = vec![json, md];
    for plot in plots(report) {
        let file = dir.join(&plot.file);
        plot.draw(report, &file).with_context(|| format!("plotting {}", file.display()))?;
        written.push(file);
    }
    Ok(written)
}

/// One comparison: a metric at a Service count, path and target.
#[derive(Clone, Copy)]
struct Key<'a> {
    metric: Metric,
    services: usize,
    path: &'a str,
    target: &'a str,
}

impl Key<'_> {
    fn summary(&self, report: &Report, mode: Mode) -> Option<Summary> {
        let figure = report.figure(self.metric, mode, self.services, self.path, self.target)?;
        Summary::of(&figure.samples)
    }
}

/// What a goal is checked on: the value and how it reads, or what is missing.
type Measured = Result<(f64, String), String>;

fn goal(goal: String, measured: Measured, holds: impl Fn(f64) -> bool) -> Goal {
    match measured {
        Ok((value, measured)) => Goal { goal, measured, met: Some(holds(value)) },
        Err(missing) => Goal { goal, measured: missing, met: None },
    }
}

/// `mode`'s median of `key`, or what is missing.
fn median(report: &Report, key: Key, mode: Mode) -> Result<f64, String> {
    key.summary(report, mode).map(|s| s.median).ok_or_else(|| {
        let path = if key.path.is_empty() { String::new() } else { format!(" on {}", key.path) };
        format!("no {} figure at {} Services{path}", mode.as_str(), count(key.services))
    })
}

/// xlb's median over `other`'s, e.g. "5.20× (xlb 21,300 conn/s, iptables 4,100 conn/s)".
fn versus(report: &Report, key: Key, other: Mode) -> Measured {
    let xlb = median(report, key, Mode::Xlb)?;
    let theirs = median(report, key, other)?;
    if theirs <= 0.0 {
        return Err(format!("{} median is {}", other.as_str(), num(theirs)));
    }
    let text = format!(
        "{} (xlb {}, {} {})",
        ratio(xlb / theirs),
        quantity(xlb, key.metric),
        other.as_str(),
        quantity(theirs, key.metric)
    );
    Ok((xlb / theirs, text))
}

/// The relative change of xlb's connection rate from few to many Services.
fn flatness(report: &Report, path: &str) -> Measured {
    let key = |services| Key { metric: Metric::ConnRate, services, path, target: LAST };
    let few = median(report, key(FEW_SERVICES), Mode::Xlb)?;
    let many = median(report, key(GOAL_SERVICES), Mode::Xlb)?;
    let change = many / few - 1.0;
    let text = format!(
        "{:+.1}% ({} at {}, {} at {})",
        change * 100.0,
        quantity(few, Metric::ConnRate),
        count(FEW_SERVICES),
        quantity(many, Metric::ConnRate),
        count(GOAL_SERVICES)
    );
    Ok((change, text))
}

/// The per-packet figures as (mode, path, summary), floor first, then in measuring order.
/// Found by path alone: they are measured at a single Service count.
fn per_packet(report: &Report) -> Vec<(Mode, String, Summary)> {
    let mut rows: Vec<_> = report
        .figures
        .iter()
        .filter(|f| f.metric == Metric::NsPerPacket)
        .filter_map(|f| Some((f.mode, f.path.clone(), Summary::of(&f.samples)?)))
        .collect();
    rows.sort_by_key(|(mode, _, _)| *mode);
    rows
}

/// The run's total time and its longest kinds of step.
fn run_time(report: &Report) -> String {
    /// Rows shown; report.json has them all.
    const SHOWN: usize = 12;
    if report.run_time.is_empty() {
        return String::new();
    }
    let total: f64 = report.run_time.iter().map(|t| t.seconds).sum();
    let mut table = Table::new(["Step (all repeats)", "Time", "Share"], 1);
    for t in report.run_time.iter().take(SHOWN) {
        table.rows.push(vec![
            t.step.clone(),
            format!("{:.0} s", t.seconds),
            format!("{:.0}%", 100.0 * t.seconds / total.max(f64::MIN_POSITIVE)),
        ]);
    }
    let seconds = total.round() as u64;
    format!(
        "\n## Run time\n\n{} min {:02} s in all; the {} longest kinds of step:\n\n{}",
        seconds / 60,
        seconds % 60,
        SHOWN.min(report.run_time.len()),
        table.render()
    )
}

/// The per-packet table: each path's time, and what xlb adds over the floor's XDP_PASS.
fn per_packet_table(report: &Report) -> String {
    let rows = per_packet(report);
    if rows.is_empty() {
        return "Not measured.\n".into();
    }
    let floor = rows.iter().find(|(mode, _, _)| *mode == Mode::Floor).map(|(_, _, s)| s.median);
    let mut table = Table::new(["Mode", "Path", "ns per packet", "xlb − floor"], 2);
    for (mode, path, s) in &rows {
        let over = match (mode, floor) {
            (Mode::Xlb, Some(floor)) => {
                format!("{}{}", if s.median >= floor { "+" } else { "" }, num(s.median - floor))
            }
            _ => "—".into(),
        };
        table.rows.push(vec![mode.as_str().into(), path.clone(), spread(s), over]);
    }
    table.render()
}

/// One metric's table: a row per Service count × path × target (the path and target columns
/// only where the metric has them), each mode's spread, and the ratios.
fn metric_table(report: &Report, metric: Metric) -> String {
    let keys: BTreeSet<(usize, &str, &str)> = report
        .figures
        .iter()
        .filter(|f| f.metric == metric)
        .map(|f| (f.services, f.path.as_str(), f.target.as_str()))
        .collect();
    let has_path = keys.iter().any(|k| !k.1.is_empty());
    let has_target = keys.iter().any(|k| !k.2.is_empty());
    let labels: Vec<&str> = [("Services", true), ("Path", has_path), ("Target", has_target)]
        .into_iter()
        .filter_map(|(label, shown)| shown.then_some(label))
        .collect();
    let columns = Columns::of(report, &[metric], spread);
    let mut table = columns.table(&labels);
    for (services, path, target) in keys {
        let mut label = vec![count(services)];
        label.extend(has_path.then(|| path.to_string()));
        label.extend(has_target.then(|| target.to_string()));
        columns.row(&mut table, report, Key { metric, services, path, target }, label);
    }
    table.render()
}

/// The mode and ratio columns of a comparison table, and how a mode's figure is shown.
struct Columns {
    modes: Vec<Mode>,
    versus: Vec<Mode>,
    cell: fn(&Summary) -> String,
}

impl Columns {
    /// The modes measured for `metrics`, xlb against each other one of them, each figure
    /// shown by `cell`.
    fn of(report: &Report, metrics: &[Metric], cell: fn(&Summary) -> String) -> Self {
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|&mode| report.figures.iter().any(|f| f.mode == mode && metrics.contains(&f.metric)))
            .collect();
        let versus = if modes.contains(&Mode::Xlb) {
            VERSUS.into_iter().filter(|m| modes.contains(m)).collect()
        } else {
            Vec::new()
        };
        Self { modes, versus, cell }
    }

    /// An empty table with `labels` first, then the mode and ratio columns.
    fn table(&self, labels: &[&str]) -> Table {
        let head = labels
            .iter()
            .map(|l| l.to_string())
            .chain(self.modes.iter().map(|m| m.as_str().to_string()))
            .chain(self.versus.iter().map(|m| format!("xlb/{}", m.as_str())));
        Table::new(head, labels.len())
    }

    /// Adds `key`'s row to `table` after `label`, unless no mode measured it.
    fn row(&self, table: &mut Table, report: &Report, key: Key, mut label: Vec<String>) {
        let summaries: Vec<Option<Summary>> = self.modes.iter().map(|&m| key.summary(report, m)).collect();
        if summaries.iter().all(Option::is_none) {
            return;
        }
        let dash = || "—".to_string();
        label.extend(summaries.iter().map(|s| s.as_ref().map_or_else(dash, self.cell)));
        label.extend(self.versus.iter().map(|&other| {
            match (key.summary(report, Mode::Xlb), key.summary(report, other)) {
                (Some(xlb), Some(theirs)) if theirs.median > 0.0 => ratio(xlb.median / theirs.median),
                _ => dash(),
            }
        }));
        table.rows.push(label);
    }
}

/// A Markdown table: the first `labels` columns left-aligned, the figures right-aligned.
struct Table {
    head: Vec<String>,
    labels: usize,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: impl IntoIterator<Item = impl ToString>, labels: usize) -> Self {
        Self { head: head.into_iter().map(|h| h.to_string()).collect(), labels, rows: Vec::new() }
    }

    fn render(&self) -> String {
        fn line<S: AsRef<str>>(cells: impl IntoIterator<Item = S>) -> String {
            let cells: Vec<String> = cells.into_iter().map(|c| c.as_ref().replace('|', "\\|")).collect();
            format!("| {} |\n", cells.join(" | "))
        }
        let align = (0..self.head.len()).map(|i| if i < self.labels { ":--" } else { "--:" });
        let mut out = line(&self.head) + &line(align);
        for row in &self.rows {
            out += &line(row);
        }
        out
    }
}

/// A metric's name with its unit, as a heading or row label.
fn measure(metric: Metric) -> String {
    let name = match metric {
        Metric::ConnRate => "New connections per second",
        Metric::LatencyP50 => "Latency p50",
        Metric::LatencyP99 => "Latency p99",
        Metric::Throughput => "Throughput (one TCP stream)",
        Metric::ProgramAll => "Programming all Services",
        Metric::ProgramOne => "Programming one change",
        Metric::AgentRss => "Agent resident memory",
        Metric::MapMemory => "BPF map memory",
        Metric::NsPerPacket => "Time per packet",
    };
    format!("{name} ({})", metric.unit())
}

/// A figure with three significant digits (more for large ones) and thousands separators.
fn num(value: f64) -> String {
    if !value.is_finite() {
        return "—".into();
    }
    if value == 0.0 {
        return "0".into();
    }
    let digits = value.abs().log10().floor() as i32 + 1;
    let text = format!("{:.*}", (3 - digits).clamp(0, 6) as usize, value.abs());
    let (int, frac) = text.split_once('.').map_or((text.as_str(), None), |(i, f)| (i, Some(f)));
    let sign = if value < 0.0 { "-" } else { "" };
    format!("{sign}{}{}", group(int), frac.map(|f| format!(".{f}")).unwrap_or_default())
}

/// A count with thousands separators: 10,000.
fn count(n: usize) -> String {
    group(&n.to_string())
}

/// `digits` with a comma every three from the right.
fn group(digits: &str) -> String {
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A figure with its metric's unit: "21,300 conn/s".
fn quantity(value: f64, metric: Metric) -> String {
    format!("{} {}", num(value), metric.unit())
}

/// A ratio of medians: "5.20×".
fn ratio(value: f64) -> String {
    format!("{}×", num(value))
}

/// A figure's spread: "21,300 (20,900–21,800)", or the value alone when the repeats agree.
fn spread(s: &Summary) -> String {
    if s.min == s.max {
        num(s.median)
    } else {
        format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
    }
}

/// One PNG of the report.
struct Plot {
    file: String,
    title: String,
    kind: PlotKind,
}

enum PlotKind {
    /// Each mode's median over the Service counts, with min–max whiskers.
    Lines { metric: Metric, path: String, target: &'static str, log_y: bool },
    /// The per-packet figures, a bar each.
    PerPacket,
}

/// The plots `report` has figures for.
fn plots(report: &Report) -> Vec<Plot> {
    let mut plots = Vec::new();
    for (metric, stem) in [(Metric::ConnRate, "conn-rate"), (Metric::LatencyP99, "latency-p99")] {
        let paths: BTreeSet<&str> =
            report.figures.iter().filter(|f| f.metric == metric).map(|f| f.path.as_str()).collect();
        for path in paths {
            plots.push(Plot {
                file: format!("{stem}-{path}.png"),
                title: format!("{}, {path}, last Service", measure(metric)),
                kind: PlotKind::Lines { metric, path: path.into(), target: LAST, log_y: false },
            });
        }
    }
    // Log y: programming times of the modes differ by orders of magnitude.
    for (metric, file) in [(Metric::ProgramAll, "program-all.png"), (Metric::ProgramOne, "program-one.png")] {
        plots.push(Plot {
            file: file.into(),
            title: measure(metric),
            kind: PlotKind::Lines { metric, path: String::new(), target: "", log_y: true },
        });
    }
    plots.push(Plot {
        file: "ns-per-packet.png".into(),
        title: measure(Metric::NsPerPacket),
        kind: PlotKind::PerPacket,
    });
    plots.retain(|plot| match &plot.kind {
        PlotKind::Lines { metric, path, target, .. } => !lines(report, *metric, path, target).is_empty(),
        PlotKind::PerPacket => !per_packet(report).is_empty(),
    });
    plots
}

impl Plot {
    fn draw(&self, report: &Report, file: &Path) -> anyhow::Result<()> {
        register_font()?;
        let root = BitMapBackend::new(file, PLOT_SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        match &self.kind {
            PlotKind::Lines { metric, path, target, log_y } => {
                let lines = lines(report, *metric, path, target);
                let values =
                    lines.iter().flat_map(|(_, points)| points.iter().flat_map(|(_, s)| [s.min, s.max]));
                let (low, high) = values.fold((f64::INFINITY, 0f64), |(l, h), v| (l.min(v), h.max(v)));
                // Headroom above the data for the legend.
                if *log_y {
                    let low = if low > 0.0 { low / 2.0 } else { 0.01 };
                    self.draw_lines(&root, &lines, *metric, (low..high.max(low) * 20.0).log_scale())?;
                } else {
                    self.draw_lines(&root, &lines, *metric, 0.0..high.max(1e-9) * 1.35)?;
                }
            }
            PlotKind::PerPacket => self.draw_bars(&root, &per_packet(report))?,
        }
        root.present()?;
        Ok(())
    }

    /// The chart on `root`: title, margins and label areas.
    fn chart<'a, 'b, X: AsRangedCoord, Y: AsRangedCoord>(
        &self,
        root: &'a Canvas<'b>,
        x: X,
        y: Y,
    ) -> anyhow::Result<Chart<'a, 'b, X::CoordDescType, Y::CoordDescType>> {
        Ok(ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 30))
            .margin(25)
            .x_label_area_size(60)
            .y_label_area_size(110)
            .build_cartesian_2d(x, y)?)
    }

    fn draw_lines<Y>(
        &self,
        root: &Canvas,
        lines: &[(Mode, Vec<(usize, Summary)>)],
        metric: Metric,
        y: Y,
    ) -> anyhow::Result<()>
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let counts: BTreeSet<usize> =
            lines.iter().flat_map(|(_, points)| points.iter().map(|(n, _)| *n)).collect();
        let (first, last) = (counts.first().copied().unwrap_or(1), counts.last().copied().unwrap_or(1));
        // Margins around the first and last count keep their whiskers inside the plot.
        let x = ((first * 5 / 8).max(1)..last * 8 / 5 + 1)
            .log_scale()
            .with_key_points(counts.into_iter().collect());
        let mut chart = self.chart(root, x, y)?;
        chart
            .configure_mesh()
            .x_desc("Services (log scale)")
            .y_desc(metric.unit())
            .x_label_formatter(&|n| count(*n))
            .y_label_formatter(&|v| num(*v))
            .label_style(("sans-serif", 20))
            .axis_desc_style(("sans-serif", 22))
            .draw()?;
        for (mode, points) in lines {
            let color = mode_color(*mode);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|(n, s)| (*n, s.median)),
                    color.stroke_width(3),
                ))?
                .label(mode.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 25, y)], color.stroke_width(3)));
            // A filled error bar: the median's dot and the min–max whisker.
            chart.draw_series(points.iter().map(|(n, s)| {
                ErrorBar::new_vertical(*n, s.min, s.median, s.max, color.filled().stroke_width(2), 14)
            }))?;
        }
        legend(&mut chart)
    }

    /// A bar per figure, labelled with its path, coloured by its mode. Bar `i` spans x from
    /// `SLOT * i` to `SLOT * (i + 1)`: an integer axis, whose labels plotters lets us format.
    fn draw_bars(&self, root: &Canvas, bars: &[(Mode, String, Summary)]) -> anyhow::Result<()> {
        const SLOT: usize = 10;
        let high = bars.iter().map(|(_, _, s)| s.max).fold(0f64, f64::max).max(1e-9);
        let centres = (0..bars.len()).map(|i| SLOT * i + SLOT / 2).collect();
        let x = (0..SLOT * bars.len()).with_key_points(centres);
        let mut chart = self.chart(root, x, 0.0..high * 1.35)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc(Metric::NsPerPacket.unit())
            .x_label_formatter(&|x| bars.get(x / SLOT).map(|(_, path, _)| path.clone()).unwrap_or_default())
            .y_label_formatter(&|v| num(*v))
            .label_style(("sans-serif", 18))
            .axis_desc_style(("sans-serif", 22))
            .draw()?;
        for mode in Mode::ALL {
            let color = mode_color(mode);
            let mine: Vec<(usize, &Summary)> =
                bars.iter().enumerate().filter(|(_, b)| b.0 == mode).map(|(i, b)| (SLOT * i, &b.2)).collect();
            if mine.is_empty() {
                continue;
            }
            chart
                .draw_series(mine.iter().map(|&(x, s)| {
                    Rectangle::new([(x + 1, 0.0), (x + SLOT - 1, s.median)], color.mix(0.8).filled())
                }))?
                .label(mode.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 8), (x + 20, y + 8)], color.filled()));
            // Whiskers without ErrorBar's dot, which would sit on the bar's top edge.
            let whiskers = mine.iter().flat_map(|&(x, s)| {
                let x = x + SLOT / 2;
                [[(x, s.min), (x, s.max)], [(x - 1, s.min), (x + 1, s.min)], [(x - 1, s.max), (x + 1, s.max)]]
            });
            chart.draw_series(whiskers.map(|ends| PathElement::new(ends, BLACK.stroke_width(2))))?;
        }
        legend(&mut chart)
    }
}

/// The drawing area of a plot's PNG, and a chart on it.
type Canvas<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b, X, Y> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<X, Y>>;

/// Each mode's (Service count, summary) points of `metric` on `path` and `target`.
fn lines(report: &Report, metric: Metric, path: &str, target: &str) -> Vec<(Mode, Vec<(usize, Summary)>)> {
    Mode::ALL
        .into_iter()
        .filter_map(|mode| {
            let mut points: Vec<(usize, Summary)> = report
                .figures
                .iter()
                .filter(|f| f.metric == metric && f.mode == mode && f.path == path && f.target == target)
                .filter_map(|f| Some((f.services, Summary::of(&f.samples)?)))
                .collect();
            points.sort_by_key(|(n, _)| *n);
            (!points.is_empty()).then_some((mode, points))
        })
        .collect()
}

/// The legend of the series labelled so far, in the headroom left at the top right.
fn legend<'a, 'b: 'a, X: Ranged, Y: Ranged>(chart: &mut Chart<'a, 'b, X, Y>) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .legend_area_size(40)
        .label_font(("sans-serif", 22))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn mode_color(mode: Mode) -> RGBColor {
    match mode {
        Mode::Floor => RGBColor(110, 110, 110),
        Mode::Xlb => RGBColor(31, 119, 180),
        Mode::Iptables => RGBColor(214, 39, 40),
        Mode::Nftables => RGBColor(255, 127, 14),
    }
}

/// Registers DejaVu Sans as plotters' "sans-serif", once per process.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    let registered = REGISTERED.get_or_init(|| {
        let bytes = std::fs::read(FONT)
            .map_err(|e| format!("reading the plot font {FONT} (Debian package fonts-dejavu-core): {e}"))?;
        // plotters keeps a 'static reference; the font is loaded once and lives as long as the process.
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
    });
    registered.clone().map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{Machine, Settings, StepTime};

    /// Three runs at 100 and 10,000 Services, crafted so that some goals are met, some missed
    /// and some unmeasured, with medians that differ from the means.
    fn report() -> Report {
        let mut r = Report {
            machine: Machine {
                cores: 8,
                cpu_model: "Test CPU".into(),
                kernel: "6.12.0".into(),
                commit: "abc1234".into(),
                date: "2025-01-01T00:00:00Z".into(),
                iptables: "iptables v1.8.9 (nf_tables)".into(),
                nft: "nftables v1.0.6".into(),
            },
            settings: Settings {
                quick: false,
                service_counts: vec![100, 10_000],
                repeats: 3,
                endpoints_per_service: 3,
                conn_ms: 2000,
                concurrency: 32,
                stream_ms: 3000,
                test_runs: 100_000,
            },
            notes: vec!["nftables probe retried once".into()],
            run_time: vec![
                StepTime { step: "10000 Services, iptables: programming".into(), seconds: 90.0 },
                StepTime { step: "100 Services, xlb: programming".into(), seconds: 35.4 },
            ],
            ..Report::default()
        };
        let mut add = |metric, mode, services, path: &str, target: &str, samples: &[f64]| {
            for &s in samples {
                r.add(metric, mode, services, path, target, s);
            }
        };
        use {Metric::*, Mode::*};
        let (pod, ext) = ("clusterip-pod", "nodeport-external");
        for mode in Mode::ALL {
            add(ConnRate, mode, 100, pod, "last", &[20_500.0, 21_000.0, 21_500.0]);
            add(ConnRate, mode, 100, ext, "last", &[20_000.0, 20_000.0, 20_000.0]);
        }
        add(ConnRate, Xlb, 10_000, pod, "last", &[10_000.0, 20_000.0, 21_000.0]);
        add(ConnRate, Iptables, 10_000, pod, "last", &[5_000.0, 5_000.0, 9_000.0]);
        add(ConnRate, Nftables, 10_000, pod, "last", &[16_000.0, 16_000.0, 16_000.0]);
        add(ConnRate, Floor, 10_000, pod, "last", &[20_000.0, 20_500.0, 21_000.0]);
        add(ConnRate, Xlb, 10_000, pod, "random", &[20_000.0, 20_000.0, 20_000.0]);
        add(ConnRate, Xlb, 10_000, ext, "last", &[10_000.0, 10_000.0, 10_000.0]);
        add(ConnRate, Iptables, 10_000, ext, "last", &[5_000.0, 5_000.0, 5_000.0]);
        add(ConnRate, Nftables, 10_000, ext, "last", &[8_000.0, 8_000.0, 8_000.0]);
        add(ConnRate, Floor, 10_000, ext, "last", &[20_000.0, 20_000.0, 20_000.0]);
        add(LatencyP99, Xlb, 100, pod, "last", &[100.0, 110.0, 130.0]);
        add(LatencyP99, Iptables, 100, pod, "last", &[120.0, 130.0, 140.0]);
        add(LatencyP99, Xlb, 10_000, pod, "last", &[100.0, 120.0, 400.0]);
        add(LatencyP99, Iptables, 10_000, pod, "last", &[500.0, 600.0, 700.0]);
        for (mode, at_100, at_10k) in [(Xlb, 25.0, 450.0), (Iptables, 80.0, 3_500.0), (Nftables, 60.0, 900.0)]
        {
            add(ProgramAll, mode, 100, "", "", &[at_100 - 5.0, at_100, at_100 + 5.0]);
            add(ProgramAll, mode, 10_000, "", "", &[at_10k - 50.0, at_10k, at_10k + 50.0]);
        }
        add(AgentRss, Xlb, 100, "", "", &[30.0]);
        add(AgentRss, Xlb, 10_000, "", "", &[60.0]);
        add(NsPerPacket, Floor, 1, "xdp-pass", "", &[20.0, 21.0, 22.0]);
        add(NsPerPacket, Xlb, 1, "xdp-conntrack-hit", "", &[60.0, 62.0, 70.0]);
        add(NsPerPacket, Xlb, 1, "tc-new-flow", "", &[300.0, 310.0, 330.0]);
        r.goals = goals(&r);
        r
    }

    fn met(goals: &[Goal], words: &str) -> Option<bool> {
        let found: Vec<&Goal> = goals.iter().filter(|g| g.goal.contains(words)).collect();
        assert_eq!(found.len(), 1, "one goal with {words:?} in {goals:#?}");
        found[0].met
    }

    #[test]
    fn goals_are_met_missed_or_unmeasured() {
        let goals = goals(&report());
        assert_eq!(goals.len(), 13);
        assert_eq!(met(&goals, "≥ 4× iptables, clusterip-pod"), Some(true));
        assert_eq!(met(&goals, "≥ 1.15× nftables, clusterip-pod"), Some(true));
        assert_eq!(met(&goals, "≥ 0.95× floor, clusterip-pod"), Some(true));
        assert_eq!(met(&goals, "≥ 4× iptables, nodeport-external"), Some(false));
        assert_eq!(met(&goals, "≥ 0.95× floor, nodeport-external"), Some(false));
        assert_eq!(met(&goals, "1/3 of iptables, clusterip-pod"), Some(true));
        assert_eq!(met(&goals, "1/3 of iptables, nodeport-external"), None);
        assert_eq!(met(&goals, "Services, clusterip-pod, last"), Some(true), "-4.8% is flat");
        assert_eq!(met(&goals, "Services, nodeport-external, last"), Some(false), "-50% is not");
        assert_eq!(met(&goals, "programs 10,000"), Some(true));
        assert_eq!(met(&goals, "one change"), None);
        assert_eq!(met(&goals, "conntrack hit"), Some(true));

        let iptables = goals.iter().find(|g| g.goal.contains("≥ 4× iptables, clusterip-pod")).unwrap();
        assert_eq!(iptables.measured, "4.00× (xlb 20,000 conn/s, iptables 5,000 conn/s)");
        let flat = goals.iter().find(|g| g.goal.contains("Services, clusterip-pod, last")).unwrap();
        assert_eq!(flat.measured, "-4.8% (21,000 conn/s at 100, 20,000 conn/s at 10,000)");
        let one = goals.iter().find(|g| g.goal.contains("one change")).unwrap();
        assert_eq!(one.measured, "no xlb figure at 10,000 Services");
    }

    #[test]
    fn headline_compares_medians_at_the_largest_count() {
        let h = headline(&report());
        assert!(h.starts_with("At 10,000 Services; medians of 3 runs"), "{h}");
        let rows = [
            "| clusterip-pod: New connections per second (conn/s) | 20,500 | 20,000 | 5,000 | 16,000 | 4.00× | 1.25× | 0.976× |",
            "| clusterip-pod: Latency p99 (µs) | — | 120 | 600 | — | 0.200× | — | — |",
            "| nodeport-external: New connections per second (conn/s) | 20,000 | 10,000 | 5,000 | 8,000 | 2.00× | 1.25× | 0.500× |",
            "| Programming all Services (ms) | — | 450 | 3,500 | 900 | 0.129× | 0.500× | — |",
        ];
        for row in rows {
            assert!(h.contains(row), "{row}\nnot in\n{h}");
        }
        // Not measured for any mode: no row.
        assert!(!h.contains("nodeport-external: Latency") && !h.contains("one change"), "{h}");
    }

    #[test]
    fn markdown_has_every_section() {
        let md = markdown(&report());
        for section in [
            "# xlb benchmark",
            "## Machine",
            "- CPU: Test CPU (8 cores)",
            "- iptables: iptables v1.8.9 (nf_tables)",
            "- Commit: `abc1234`",
            "## Settings",
            "- Service counts: 100, 10,000",
            "## Goals",
            "| met |",
            "| **NOT met** |",
            "| not measured |",
            "## Headline",
            "At 10,000 Services",
            "### New connections per second (conn/s)",
            "| Services | Path | Target | floor | xlb | iptables | nftables | xlb/iptables | xlb/nftables | xlb/floor |",
            "| 10,000 | clusterip-pod | last | 20,500 (20,000–21,000) | 20,000 (10,000–21,000) |",
            "| 10,000 | clusterip-pod | random | — | 20,000 | — | — | — | — | — |",
            "### Latency p99 (µs)",
            "### Programming all Services (ms)",
            "| Services | xlb | iptables | nftables | xlb/iptables | xlb/nftables |",
            "### Agent resident memory (MiB)",
            "| Services | xlb |\n",
            "## Per packet",
            "| floor | xdp-pass | 21.0 (20.0–22.0) | — |",
            "| xlb | xdp-conntrack-hit | 62.0 (60.0–70.0) | +41.0 |",
            "## Notes",
            "- nftables probe retried once",
            "## Run time",
            "2 min 05 s in all; the 2 longest kinds of step:",
            "| 10000 Services, iptables: programming | 90 s | 72% |",
            "## Plots",
            "(conn-rate-clusterip-pod.png)",
            "(latency-p99-clusterip-pod.png)",
            "(program-all.png)",
            "(ns-per-packet.png)",
        ] {
            assert!(md.contains(section), "{section:?} not in\n{md}");
        }
        assert!(!md.contains("### Time per packet"), "per-packet figures have their own table");
    }

    #[test]
    fn numbers_have_three_significant_digits_and_separators() {
        let cases = [(21_300.4, "21,300"), (1_234_567.0, "1,234,567"), (412.3, "412"), (41.23, "41.2")];
        for (value, text) in cases.into_iter().chain([(4.123, "4.12"), (0.04123, "0.0412"), (0.0, "0")]) {
            assert_eq!(num(value), text);
        }
        assert_eq!(num(-1_234.4), "-1,234");
        assert_eq!(num(f64::INFINITY), "—");
        assert_eq!(count(10_000), "10,000");
        assert_eq!(count(100), "100");
    }

    #[test]
    fn sparse_reports_render() {
        let dir = std::env::temp_dir().join(format!("xlb-bench-sparse-report-{}", std::process::id()));
        let empty = Report::default();
        assert!(goals(&empty).iter().all(|g| g.met.is_none()));
        assert!(headline(&empty).starts_with("No connection"));
        assert!(markdown(&empty).contains("## Per packet\n\nNot measured."));
        assert_eq!(write(&empty, &dir).unwrap().len(), 2, "report.json and report.md");

        // A quick run at one Service count; a figure without finite samples has no point.
        let mut quick = Report::default();
        quick.add(Metric::ConnRate, Mode::Xlb, 100, "clusterip-pod", "last", 1_000.0);
        quick.add(Metric::ProgramAll, Mode::Xlb, 100, "", "", f64::NAN);
        let written = write(&quick, &dir).unwrap();
        assert_eq!(written.last().unwrap().file_name().unwrap(), "conn-rate-clusterip-pod.png");
        assert_eq!(written.len(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_produces_json_markdown_and_plots() {
        let dir = std::env::temp_dir().join(format!("xlb-bench-report-{}", std::process::id()));
        let report = report();
        let written = write(&report, &dir).unwrap();
        let names: Vec<String> =
            written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            [
                "report.json",
                "report.md",
                "conn-rate-clusterip-pod.png",
                "conn-rate-nodeport-external.png",
                "latency-p99-clusterip-pod.png",
                "program-all.png",
                "ns-per-packet.png",
            ]
        );
        let json: Report =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
        assert_eq!(json, report);
        assert_eq!(std::fs::read_to_string(dir.join("report.md")).unwrap(), markdown(&report));
        for png in written.iter().filter(|p| p.extension().is_some_and(|e| e == "png")) {
            let bytes = std::fs::read(png).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", png.display());
            assert!(bytes.len() > 20_000, "{} has {} bytes: nothing drawn?", png.display(), bytes.len());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
