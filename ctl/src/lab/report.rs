//! The lab's report: what was run (class, model and its cross-validated accuracy, seeds), a
//! table per scenario and threshold (energy against `performance`, each VM against itself alone,
//! thresholds met, share of the oracle's saving), a summary, as terminal tables, `report.md` and
//! `report.json`.

use std::fmt::Write as _;

use comfy_table::Table;
use serde::Serialize;
use vmgov_proto::EnergyModel;

use super::{
    fleet::LearnedHost,
    inputs::Group,
    report_table::ReportRow,
    results::{GovernorResult, Reference, ScenarioResult, TOLERANCE, ThresholdResult},
    runs::{Governor, ModelCheck},
};

/// How the lab ran.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Settings {
    /// Hardware class of every host.
    pub class: String,
    /// A built-in name or the class file.
    pub class_source: String,
    /// Every workload used, with where it came from (built-in or a file).
    pub workloads: std::collections::BTreeMap<String, String>,
    /// Cores per host.
    pub cores: usize,
    /// P-state frequencies, GHz, slowest first.
    pub pstates_ghz: Vec<f64>,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Timeslice, seconds.
    pub timeslice_s: f64,
    /// Seed of every simulated host's counter noise.
    pub seed: u64,
    /// Relative noise of the counters the agents read.
    pub counter_noise: f64,
    /// Length of every evaluation workload relative to its full length.
    pub scale: f64,
    /// `--quick`.
    pub quick: bool,
    /// Labelled samples asked of each training host.
    pub sample_target: u64,
    /// Thresholds every scenario ran at.
    pub thresholds: Vec<f64>,
    /// The coordinator's store.
    pub store: String,
    /// Where the coordinator served.
    pub coordinator: String,
    /// Runs at once.
    pub jobs: usize,
    /// Slack in threshold comparisons.
    pub tolerance: f64,
}

/// The model the runs used.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelInfo {
    /// Its version.
    pub version: u64,
    /// Mean cross-validated MAPE over P-states, per target (fractions).
    pub mean_mape_perf: f64,
    /// Power.
    pub mean_mape_power: f64,
    /// Throughput.
    pub mean_mape_throughput: f64,
    /// How it was trained, with the per-fit figures.
    pub training: vmgov_proto::model::TrainingInfo,
}

/// One line of the summary.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SummaryRow {
    /// The scenario's part of the report.
    pub group: Group,
    /// Scenario id.
    pub scenario: String,
    /// Its title.
    pub title: String,
    /// The threshold.
    pub threshold: f64,
    /// vmgov's package saving against `performance`.
    pub vmgov_saving: Option<f64>,
    /// vmgov's core-only saving.
    pub vmgov_core_saving: Option<f64>,
    /// vmgov's own estimate of its saving (what `vmgov status` says).
    pub vmgov_estimate: Option<f64>,
    /// Equation 9's package saving.
    pub equation9_saving: Option<f64>,
    /// The oracle's package saving.
    pub oracle_saving: Option<f64>,
    /// The oracle's core-only saving.
    pub oracle_core_saving: Option<f64>,
    /// vmgov's share of the oracle's saving.
    pub vmgov_share: Option<f64>,
    /// The whole-run bound's saving: the most any policy could save.
    pub bound_saving: Option<f64>,
    /// Exact (one VM) or a lower bound (several).
    pub bound_kind: Option<vmgov_sim::bound::BoundKind>,
    /// vmgov's share of the bound's saving.
    pub vmgov_bound_share: Option<f64>,
    /// Every VM met its thresholds under vmgov.
    pub vmgov_met: bool,
    /// Under equation 9.
    pub equation9_met: bool,
    /// Under the oracle.
    pub oracle_met: bool,
    /// Under `performance` (contention can make even it miss).
    pub performance_met: bool,
}

/// Everything, machine-readable (`report.json`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// The program.
    pub tool: String,
    /// How it ran.
    pub settings: Settings,
    /// The model.
    pub model: ModelInfo,
    /// The model's predictions against the simulator, per workload.
    pub model_check: Vec<ModelCheck>,
    /// Learning, per training host.
    pub learning: Vec<LearnedHost>,
    /// Every workload alone under `performance`.
    pub references: Vec<Reference>,
    /// Per scenario.
    pub scenarios: Vec<ScenarioResult>,
    /// The summary.
    pub summary: Vec<SummaryRow>,
    /// The research report's table under its own metric (its class only).
    pub report_table: Vec<ReportRow>,
    /// vmgov's estimate of its saving against the truth, over the summary.
    pub estimate_error: Option<EstimateError>,
    /// The model's error on each held-out workload, then over all of them.
    pub held_out_error: Vec<ModelError>,
    /// Plot files, relative to the report.
    pub plots: Vec<String>,
    /// Wall time, seconds.
    pub wall_s: f64,
}

impl ModelInfo {
    pub(crate) fn new(model: &EnergyModel) -> Self {
        use vmgov_proto::Target;
        Self {
            version: model.version,
            mean_mape_perf: model.mean_mape(Target::Perf).unwrap_or(f64::NAN),
            mean_mape_power: model.mean_mape(Target::Power).unwrap_or(f64::NAN),
            mean_mape_throughput: model.mean_mape(Target::Throughput).unwrap_or(f64::NAN),
            training: model.training.clone(),
        }
    }
}

/// "444.namd" → "namd".
fn short(workload: &str) -> &str {
    match workload.split_once('.') {
        Some((n, rest)) if n.chars().all(|c| c.is_ascii_digit()) => rest,
        _ => workload,
    }
}

fn pct(v: f64) -> String {
    if v.is_finite() { format!("{:.1}%", 100.0 * v) } else { "-".into() }
}

fn opt_pct(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), pct)
}

fn ratio(v: f64) -> String {
    if v.is_finite() { format!("{v:.3}") } else { "-".into() }
}

/// Each VM's ratio against itself alone: "0.853", or "namd 0.912 · lbm 0.874" on a shared host,
/// with "thrp" for servers.
fn vm_ratios(g: &GovernorResult, single: bool) -> String {
    g.vms
        .iter()
        .map(|v| {
            let mut parts = Vec::new();
            match v.perf_ratio {
                Some(r) => parts.push(format!("{r:.3}")),
                None if v.runtime_s.is_none() && v.throughput_ratio.is_none() => {
                    parts.push("unfinished".into());
                }
                None => {}
            }
            if let Some(t) = v.throughput_ratio {
                parts.push(format!("thrp {t:.3}"));
            }
            let r = parts.join(" ");
            if single { r } else { format!("{} {r}", short(&v.workload)) }
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

fn met(g: &GovernorResult) -> String {
    if g.thresholds_met {
        return "met".into();
    }
    let missed: Vec<&str> = g.vms.iter().filter(|v| !v.met).map(|v| short(&v.workload)).collect();
    if g.vms.len() == 1 { "MISSED".into() } else { format!("MISSED: {}", missed.join(", ")) }
}

fn row(g: &GovernorResult, single: bool) -> Vec<String> {
    vec![
        g.label.to_owned(),
        ratio(g.energy_ratio),
        ratio(g.core_energy_ratio),
        pct(g.saving),
        vm_ratios(g, single),
        met(g),
        opt_pct(g.oracle_share),
        if g.beats_bound { "BEATS THE BOUND".to_owned() } else { opt_pct(g.bound_share) },
        format!("{:.1}{}", g.time_s, if g.completed { "" } else { " (limit)" }),
    ]
}

/// The bound's line in a scenario's table.
fn bound_row(t: &ThresholdResult) -> Vec<String> {
    let (label, energy, saving) = match (&t.bound, &t.bound_error) {
        (Some(b), _) => (
            match b.kind {
                vmgov_sim::bound::BoundKind::Exact => "whole-run bound (exact)",
                vmgov_sim::bound::BoundKind::LowerBound => "whole-run bound (lower)",
            },
            ratio(b.energy_ratio),
            pct(b.saving),
        ),
        (None, e) => ("whole-run bound", "-".into(), e.clone().unwrap_or_default()),
    };
    let mut row = vec![label.to_owned(), energy, "-".into(), saving];
    row.resize(HEADER.len(), "-".into());
    row
}

/// A scenario's rows at one threshold: every governor, then the bound.
fn rows(t: &ThresholdResult, single: bool) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = t.governors.iter().map(|g| row(g, single)).collect();
    out.push(bound_row(t));
    out
}

const HEADER: [&str; 9] = [
    "governor",
    "energy (pkg)",
    "energy (cores)",
    "saved",
    "perf/thrp vs alone",
    "thresholds",
    "of oracle's saving",
    "of bound's saving",
    "sim s",
];

/// The summary rows.
pub(crate) fn summary(scenarios: &[ScenarioResult]) -> Vec<SummaryRow> {
    let mut out = Vec::new();
    for s in scenarios {
        for t in &s.results {
            let get = |g| t.get(g);
            out.push(SummaryRow {
                group: s.group,
                scenario: s.id.clone(),
                title: s.title.clone(),
                threshold: t.threshold,
                vmgov_saving: get(Governor::Vmgov).map(|r| r.saving),
                vmgov_core_saving: get(Governor::Vmgov).map(|r| 1.0 - r.core_energy_ratio),
                vmgov_estimate: get(Governor::Vmgov).and_then(|r| r.estimated_saving),
                equation9_saving: get(Governor::Equation9).map(|r| r.saving),
                oracle_saving: get(Governor::Oracle).map(|r| r.saving),
                oracle_core_saving: get(Governor::Oracle).map(|r| 1.0 - r.core_energy_ratio),
                vmgov_share: get(Governor::Vmgov).and_then(|r| r.oracle_share),
                bound_saving: t.bound.as_ref().map(|b| b.saving),
                bound_kind: t.bound.as_ref().map(|b| b.kind),
                vmgov_bound_share: get(Governor::Vmgov).and_then(|r| r.bound_share),
                vmgov_met: get(Governor::Vmgov).is_some_and(|r| r.thresholds_met),
                equation9_met: get(Governor::Equation9).is_some_and(|r| r.thresholds_met),
                oracle_met: get(Governor::Oracle).is_some_and(|r| r.thresholds_met),
                performance_met: get(Governor::Performance).is_some_and(|r| r.thresholds_met),
            });
        }
    }
    out
}

const SUMMARY_HEADER: [&str; 11] = [
    "scenario",
    "threshold",
    "vmgov saved (cores)",
    "vmgov's estimate",
    "eq. 9 saved",
    "oracle saved (cores)",
    "bound saved",
    "vmgov / bound",
    "vmgov: all VMs met",
    "eq. 9 met",
    "performance met",
];

fn bound_cell(saving: Option<f64>, kind: Option<vmgov_sim::bound::BoundKind>) -> String {
    match (saving, kind) {
        (Some(s), Some(vmgov_sim::bound::BoundKind::LowerBound)) => format!("≤ {}", pct(s)),
        (Some(s), _) => pct(s),
        _ => "-".into(),
    }
}

fn summary_cells(r: &SummaryRow) -> Vec<String> {
    let yes = |b: bool| if b { "yes" } else { "NO" }.to_owned();
    vec![
        r.title.clone(),
        format!("{:.0}%", 100.0 * r.threshold),
        format!("{} ({})", opt_pct(r.vmgov_saving), opt_pct(r.vmgov_core_saving)),
        opt_pct(r.vmgov_estimate),
        opt_pct(r.equation9_saving),
        format!("{} ({})", opt_pct(r.oracle_saving), opt_pct(r.oracle_core_saving)),
        bound_cell(r.bound_saving, r.bound_kind),
        opt_pct(r.vmgov_bound_share),
        yes(r.vmgov_met),
        yes(r.equation9_met),
        yes(r.performance_met),
    ]
}

fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.set_header(header.iter().copied());
    for r in rows {
        t.add_row(r);
    }
    t.to_string()
}

fn md_table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let cell = |s: &str| s.replace('|', "\\|");
    let mut out =
        format!("| {} |\n", header.iter().map(|h| cell(h)).collect::<Vec<_>>().join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(header.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | "));
    }
    out
}

/// Every run that met its thresholds below the whole-run bound, named: each is a bug in the
/// yardstick (the bound or the simulator), never a result.
pub(crate) fn beaten_bounds(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for s in &report.scenarios {
        for t in &s.results {
            let Some(b) = &t.bound else { continue };
            for g in t.governors.iter().filter(|g| g.beats_bound) {
                out.push(format!(
                    "{} at {:.0}%: {} {:.4} against the bound's {:.4}",
                    s.title,
                    100.0 * t.threshold,
                    g.label,
                    g.energy_ratio,
                    b.energy_ratio
                ));
            }
        }
    }
    out
}

/// One line per governor: in how many cases every VM met its threshold, and where not.
pub(crate) fn verdicts(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    for g in Governor::ALL {
        let mut cases = 0;
        let mut missed = Vec::new();
        for s in &report.scenarios {
            for t in &s.results {
                if let Some(r) = t.get(g) {
                    cases += 1;
                    if !r.thresholds_met {
                        missed.push(format!("{} at {:.0}%", s.title, 100.0 * t.threshold));
                    }
                }
            }
        }
        let line = if missed.is_empty() {
            format!("{}: every VM met its thresholds in all {cases} cases", g.label())
        } else {
            format!(
                "{}: every VM met its thresholds in {} of {cases} cases; missed in {}",
                g.label(),
                cases - missed.len(),
                missed.join("; ")
            )
        };
        out.push(line);
    }
    out
}

/// The tables for the terminal.
pub(crate) fn terminal(report: &Report) -> String {
    let mut out = String::new();
    for s in &report.scenarios {
        for t in &s.results {
            let _ = writeln!(out, "\n{} · threshold {:.0}%", s.title, 100.0 * t.threshold);
            let _ = writeln!(out, "{}", table(&HEADER, rows(t, s.single)));
        }
    }
    for (group, rows) in summary_sections(report) {
        let _ = writeln!(
            out,
            "\nSummary, {}: package energy saved against performance at equal work (cores only in brackets)",
            group.title().to_lowercase()
        );
        let _ = writeln!(out, "{}", table(&SUMMARY_HEADER, rows.into_iter().map(summary_cells)));
    }
    if let Some(line) = estimate_error_line(report) {
        let _ = writeln!(out, "{line}");
    }
    let held_out = &report.held_out_error;
    if !held_out.is_empty() {
        let _ = writeln!(
            out,
            "\nHeld-out workloads: the model's error on the performance (throughput) ratio, over every P-state"
        );
        let _ =
            writeln!(out, "{}", table(&MODEL_ERROR_HEADER, held_out.iter().map(model_error_cells)));
    }
    if !report.report_table.is_empty() {
        let _ = writeln!(out, "\n{REPORT_TABLE_TITLE}");
        let _ = writeln!(
            out,
            "{}",
            table(&REPORT_TABLE_HEADER, report.report_table.iter().map(report_table_cells))
        );
    }
    for v in verdicts(report) {
        let _ = writeln!(out, "{v}");
    }
    out
}

/// The summary's rows, by group, in report order (empty groups left out).
fn summary_sections(report: &Report) -> Vec<(Group, Vec<&SummaryRow>)> {
    Group::ALL
        .into_iter()
        .map(|g| (g, report.summary.iter().filter(|r| r.group == g).collect::<Vec<_>>()))
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
}

/// How far vmgov's estimate of its saving is from the truth.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct EstimateError {
    /// Mean absolute difference (fraction of the energy).
    pub mean: f64,
    /// Worst absolute difference.
    pub worst: f64,
    /// Cases with both.
    pub cases: usize,
}

/// Mean and worst absolute difference between vmgov's estimate of its saving and the truth,
/// over the summary rows that have both.
pub(crate) fn estimate_error(rows: &[SummaryRow]) -> Option<EstimateError> {
    let errors: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.vmgov_estimate.zip(r.vmgov_saving).map(|(e, s)| (e - s).abs()))
        .filter(|e| e.is_finite())
        .collect();
    #[allow(clippy::cast_precision_loss, reason = "a few hundred rows")]
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    (!errors.is_empty()).then(|| EstimateError {
        mean,
        worst: errors.iter().copied().fold(0.0, f64::max),
        cases: errors.len(),
    })
}

fn estimate_error_line(report: &Report) -> Option<String> {
    report.estimate_error.map(|e| {
        format!(
            "vmgov's estimate of its saving against the truth, over {} cases: mean absolute difference {:.1} points, worst {:.1}",
            e.cases,
            100.0 * e.mean,
            100.0 * e.worst
        )
    })
}

/// A workload's prediction error: mean and worst absolute error of the predicted performance
/// ratio (throughput for servers) over the P-states, against the simulator.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelError {
    /// The workload.
    pub workload: String,
    /// Mean absolute error over the P-states.
    pub mean: f64,
    /// Worst absolute error.
    pub worst: f64,
    /// At which P-state (GHz) the worst one is.
    pub worst_at_ghz: f64,
}

/// The prediction errors of one model check.
pub(crate) fn model_error(c: &ModelCheck, pstates_ghz: &[f64]) -> ModelError {
    let predicted = if c.server { &c.predicted_throughput } else { &c.predicted_perf };
    let errors: Vec<f64> =
        predicted.iter().zip(&c.actual_perf).map(|(p, a)| (p - a).abs()).collect();
    let (mut worst, mut at) = (0.0, 0);
    for (i, e) in errors.iter().enumerate() {
        if *e > worst {
            (worst, at) = (*e, i);
        }
    }
    #[allow(clippy::cast_precision_loss, reason = "a handful of P-states")]
    let mean = errors.iter().sum::<f64>() / errors.len().max(1) as f64;
    ModelError {
        workload: c.workload.clone(),
        mean,
        worst,
        worst_at_ghz: pstates_ghz.get(at).copied().unwrap_or(f64::NAN),
    }
}

/// The held-out workloads' prediction errors, then one row over all of them.
pub(crate) fn held_out_errors(
    scenarios: &[ScenarioResult],
    model_check: &[ModelCheck],
    pstates_ghz: &[f64],
) -> Vec<ModelError> {
    let held_out: Vec<&str> = scenarios
        .iter()
        .filter(|s| s.group == Group::HeldOut)
        .flat_map(|s| s.workloads.iter().map(String::as_str))
        .collect();
    let mut rows: Vec<ModelError> = model_check
        .iter()
        .filter(|c| held_out.contains(&c.workload.as_str()))
        .map(|c| model_error(c, pstates_ghz))
        .collect();
    if !rows.is_empty() {
        #[allow(clippy::cast_precision_loss, reason = "a handful of workloads")]
        let mean = rows.iter().map(|r| r.mean).sum::<f64>() / rows.len() as f64;
        let worst = rows.iter().max_by(|a, b| a.worst.total_cmp(&b.worst)).cloned();
        if let Some(w) = worst {
            rows.push(ModelError {
                workload: format!("all held-out (worst: {})", w.workload),
                mean,
                worst: w.worst,
                worst_at_ghz: w.worst_at_ghz,
            });
        }
    }
    rows
}

const MODEL_ERROR_HEADER: [&str; 4] =
    ["workload", "mean absolute error", "worst absolute error", "worst at"];

fn model_error_cells(e: &ModelError) -> Vec<String> {
    vec![
        e.workload.clone(),
        format!("{:.3}", e.mean),
        format!("{:.3}", e.worst),
        format!("{:.1} GHz", e.worst_at_ghz),
    ]
}

const REPORT_TABLE_TITLE: &str = "The report's table, under its own metric: equation 9 at 40%, processor (core) energy saved against every core at f_max";

const REPORT_TABLE_HEADER: [&str; 5] =
    ["scenario", "the report", "the lab (cores)", "difference", "the lab (package)"];

fn report_table_cells(r: &ReportRow) -> Vec<String> {
    vec![
        r.title.clone(),
        pct(r.report),
        pct(r.cores),
        format!("{:+.1} pp", 100.0 * (r.cores - r.report)),
        pct(r.package),
    ]
}

/// `report.md`.
pub(crate) fn markdown(report: &Report) -> String {
    let st = &report.settings;
    let m = &report.model;
    let mut out = String::from("# vmgov lab report\n\n");
    let _ = writeln!(
        out,
        "The whole system on one machine: a coordinator ({}) serving gRPC at {}, agents on \
         simulated hosts of class `{}` ({} cores, P-states {} GHz; from {}) talking to it \
         through the real coordinator link, {}-vCPU VMs, {:.0} ms timeslices. Produced by {} in \
         {:.0} s of wall time.\n",
        st.store,
        st.coordinator,
        st.class,
        st.cores,
        st.pstates_ghz.iter().map(|f| format!("{f:.1}")).collect::<Vec<_>>().join("/"),
        st.class_source,
        st.vcpus,
        1e3 * st.timeslice_s,
        report.tool,
        report.wall_s
    );
    let hosts = report.learning.len();
    let early: Vec<&str> =
        report.learning.iter().filter(|l| l.ended_early).map(|l| l.workload.as_str()).collect();
    let _ = writeln!(
        out,
        "1. **Learning** on the training suite only ({}), one simulated host per workload, \
         commanded through `FleetService.StartLearning` with {} labelled samples per host{}.",
        report.learning.iter().map(|l| format!("`{}`", l.workload)).collect::<Vec<_>>().join(", "),
        st.sample_target,
        if early.is_empty() {
            String::new()
        } else {
            format!(" ({} ended before the target and gave what it had)", early.join(", "))
        }
    );
    let _ = writeln!(
        out,
        "2. **Training** through `FleetService.TrainModel` (OLS, {} folds) on {} samples from {hosts} \
         hosts: model **v{}**, cross-validated mean MAPE: performance {:.2}%, power {:.2}%, \
         throughput {:.2}%. Activated, and used by every vmgov run.",
        m.training.folds,
        m.training.sample_count,
        m.version,
        100.0 * m.mean_mape_perf,
        100.0 * m.mean_mape_power,
        100.0 * m.mean_mape_throughput
    );
    let _ = writeln!(
        out,
        "3. **Evaluation**: {} scenarios at thresholds {} (performance = throughput), workloads at \
         {} of their full length, counter noise {:.0}% with seed {}. Each under `performance` \
         (the reference), `ondemand`, `schedutil`, `cpu-load` and the oracle (simulated), and \
         vmgov's agent with the report's equation 9 (`power` objective) and with its default \
         (`energy` objective), each a real agent on its own simulated host with its thresholds \
         set through the coordinator; and each scenario's whole-run bound. The scenarios come in \
         groups: the report's (every evaluation workload alone and its Table 2), the held-out \
         suite (never trained on) and full hosts (every core given to VMs).\n",
        report.scenarios.len(),
        st.thresholds
            .iter()
            .map(|t| format!("{:.0}%", 100.0 * t))
            .collect::<Vec<_>>()
            .join(" and "),
        st.scale,
        100.0 * st.counter_noise,
        st.seed
    );
    let _ = writeln!(
        out,
        "Reading the tables (`docs/yardstick.md` has the definitions): a VM's performance \
         ratio is its work rate against itself alone on the host under `performance`, over the \
         whole run: reference seconds of work (the time it alone at f_max takes to do the same \
         work, phase by phase: instructions, requests served, disk requests) per second. For a \
         workload that ends after its instructions that is its runtime ratio; for a phase that \
         ends after a time, its work rate. A server's throughput ratio (\"thrp\") is what it \
         served against its reference. A VM meets threshold t when both are at least t \
         (compared with {TOLERANCE} of slack). Energy is the whole run's **at equal work**: \
         joules per reference second of work, against `performance` on the same host (package, \
         and cores only: the uncore, which no core P-state lowers, is a large share of the \
         package), so a run that did less work saves nothing by it. \"of oracle's saving\" is \
         the saving over the oracle's, shown when the oracle saved at least 2%.\n",
    );
    let _ = writeln!(out, "## Summary\n");
    let _ = writeln!(
        out,
        "Package energy saved against `performance` at equal work (cores only in brackets). \
         \"vmgov's estimate\" is what vmgov's agent itself counted, as `vmgov status` reports \
         it: the energy charged to the VMs (their core-time share of the package meter) against \
         what f_max would have taken, from measured ratios once its verification windows have \
         them. \"bound saved\" is the whole-run bound's: the most any policy could save with \
         every VM meeting its thresholds over the whole run. For one VM it is exact; \"≤\" marks \
         several VMs, where it is a proven lower bound on energy that ignores every cost of \
         running them together, so the true optimum lies between it and the best run in the \
         scenario's table.\n"
    );
    for (group, rows) in summary_sections(report) {
        let _ = writeln!(
            out,
            "### {}\n\n{}",
            group.title(),
            md_table(&SUMMARY_HEADER, rows.into_iter().map(summary_cells))
        );
    }
    if let Some(line) = estimate_error_line(report) {
        let _ = writeln!(out, "{line}.\n");
    }
    for v in verdicts(report) {
        let _ = writeln!(out, "- {v}");
    }
    let held_out = &report.held_out_error;
    if !held_out.is_empty() {
        let _ = writeln!(
            out,
            "\n## Held-out workloads: the model on workloads it never saw\n\nThe held-out suite \
             (`node-agent/sim/workloads/held-out/`, each file citing its sources) is never \
             trained on and unlike the training suite by design. The model's error on each \
             workload's performance ratio (throughput for servers), predicted from the \
             counters of its whole run at f_max, against the simulator with the workload held at \
             each P-state (the full table is under \"The model against the simulator\"); \
             vmgov's saving on them is in the summary above.\n\n{}",
            md_table(&MODEL_ERROR_HEADER, held_out.iter().map(model_error_cells))
        );
    }
    if !report.report_table.is_empty() {
        let _ = writeln!(
            out,
            "\n## The report's table\n\n{REPORT_TABLE_TITLE}: the lab's equation-9 run against \
             the same scenario with every core, idle ones included, held at f_max, as the \
             report's figures are. Raw energy, as the report measured it (not at equal work). \
             `docs/calibration.md` (\"The report's table\") says why these are the report's \
             terms and explains what remains.\n\n{}",
            md_table(&REPORT_TABLE_HEADER, report.report_table.iter().map(report_table_cells))
        );
    }
    let _ = writeln!(
        out,
        "\nThe oracle searches every combination of per-VM P-states on noise-free copies of the \
         host at each phase change, for the least energy per unit of progress over a short \
         window: the limit for one VM, but with several VMs a per-phase choice, not a bound over \
         the whole run, so a policy can come out ahead of it.\n"
    );
    let _ = writeln!(out, "## Scenarios\n");
    for s in &report.scenarios {
        for t in &s.results {
            let _ = writeln!(out, "### {} · threshold {:.0}%\n", s.title, 100.0 * t.threshold);
            let _ = writeln!(out, "{}", md_table(&HEADER, rows(t, s.single)));
        }
        let plots = &s.plots;
        if !plots.is_empty() {
            let _ = writeln!(
                out,
                "Plots: {}\n",
                plots.iter().map(|p| format!("[{p}]({p})")).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let _ = writeln!(out, "## The model against the simulator\n");
    let _ = writeln!(
        out,
        "What model v{} predicts for each workload from the counters of its whole run at f_max \
         (noise-free; performance as the harmonic mean of every slice's prediction, the others \
         as means), against the workload run whole with its VM held at each P-state (its \
         performance ratio, and its energy at equal work). \
         vmgov can only be as good as these predictions: a P-state whose predicted performance \
         is below the threshold is never chosen, and the `energy` objective compares predicted \
         power / performance. Predicted performance and throughput are held to [f / f_max, 1], \
         the most and the least a clock change can do.\n",
        m.version
    );
    let mut header = vec!["workload".to_owned()];
    header.extend(st.pstates_ghz.iter().map(|f| format!("{f:.1} GHz")));
    let header: Vec<&str> = header.iter().map(String::as_str).collect();
    let perf_rows = report.model_check.iter().map(|c| {
        let predicted = if c.server { &c.predicted_throughput } else { &c.predicted_perf };
        let mut row = vec![c.workload.clone()];
        for (i, actual) in c.actual_perf.iter().enumerate() {
            let p = predicted.get(i).copied().unwrap_or(f64::NAN);
            row.push(format!("{} ({})", ratio(p), ratio(*actual)));
        }
        row
    });
    let _ = writeln!(
        out,
        "Performance (throughput for servers): predicted (actual).\n\n{}",
        md_table(&header, perf_rows)
    );
    let energy_rows = report.model_check.iter().map(|c| {
        let mut row = vec![c.workload.clone()];
        for (i, actual) in c.actual_energy.iter().enumerate() {
            let pw = c.predicted_power.get(i).copied().unwrap_or(f64::NAN);
            let pf = c.predicted_perf.get(i).copied().unwrap_or(f64::NAN);
            row.push(format!("{} ({})", ratio(pw / pf), ratio(*actual)));
        }
        row
    });
    let _ = writeln!(
        out,
        "Energy per unit of work: predicted power / performance (actual package energy).\n\n{}",
        md_table(&header, energy_rows)
    );
    let _ = writeln!(out, "## References: every workload alone under `performance`\n");
    let _ = writeln!(
        out,
        "{}",
        md_table(
            &["workload", "runtime s", "throughput (served/offered)", "package J"],
            report.references.iter().map(|r| {
                vec![
                    r.workload.clone(),
                    r.runtime_s.map_or_else(|| "-".into(), |t| format!("{t:.2}")),
                    r.throughput.map_or_else(|| "-".into(), |t| format!("{t:.4}")),
                    format!("{:.1}", r.package_energy_j),
                ]
            })
        )
    );
    let _ = writeln!(out, "## Learning\n");
    let _ = writeln!(
        out,
        "{}",
        md_table(
            &["host", "workload", "length factor", "length alone at f_max, s", "samples"],
            report.learning.iter().map(|l| {
                vec![
                    l.host_id.clone(),
                    l.workload.clone(),
                    format!("{:.3}", l.scale),
                    format!("{:.1}", l.length_s),
                    l.samples.to_string(),
                ]
            })
        )
    );
    out
}
