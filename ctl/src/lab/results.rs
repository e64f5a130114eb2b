//! From the simulator's ground truth to the report's measures, as the report defines them:
//! energy against the performance governor on the same host, and every VM against its
//! reference, the same workload alone on the host under `performance`. A batch VM meets its
//! threshold when its runtime is at most the reference runtime divided by the threshold; a
//! server when its throughput is at least the reference throughput times the threshold.

use std::collections::BTreeMap;

use serde::Serialize;
use vmgov_sim::{SimReport, Workload};

use super::{
    inputs::{Inputs, Scenario},
    runs::{Governor, RunData},
};

/// Ratios are compared with this much slack: a runtime is known to a timeslice, and a ratio
/// that rounds to the threshold at three decimals meets it.
pub(crate) const TOLERANCE: f64 = 5e-4;

/// Below this package saving (2%) the oracle saved too little to divide by.
const NOTHING_TO_SAVE: f64 = 0.02;

/// A workload alone on the host under `performance`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Reference {
    /// The workload.
    pub workload: String,
    /// When it finished, seconds (batch work).
    pub runtime_s: Option<f64>,
    /// Served over offered requests (servers).
    pub throughput: Option<f64>,
    /// Package energy, joules.
    pub package_energy_j: f64,
}

impl Reference {
    /// The reference from a run of the workload alone.
    pub(crate) fn new(workload: &str, report: &SimReport) -> Self {
        let vm = report.vms.first();
        Self {
            workload: workload.into(),
            runtime_s: vm.and_then(|v| v.finished_at_s),
            throughput: vm.filter(|v| v.requests_offered > 0.0).map(|v| v.throughput_ratio()),
            package_energy_j: report.package_energy_j,
        }
    }
}

/// One VM of one run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct VmResult {
    /// VM name.
    pub name: String,
    /// Its workload.
    pub workload: String,
    /// When it finished, seconds (None: it did not).
    pub runtime_s: Option<f64>,
    /// Reference runtime over runtime (batch work).
    pub perf_ratio: Option<f64>,
    /// Throughput over reference throughput (servers).
    pub throughput_ratio: Option<f64>,
    /// Both ratios at or above the threshold.
    pub met: bool,
}

/// One governor on one host at one threshold.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct GovernorResult {
    /// Stable id.
    pub governor: Governor,
    /// For tables.
    pub label: &'static str,
    /// Package energy (cores + uncore), joules.
    pub package_energy_j: f64,
    /// Cores' share of it, joules.
    pub core_energy_j: f64,
    /// Package energy over `performance`'s.
    pub energy_ratio: f64,
    /// Core energy over `performance`'s.
    pub core_energy_ratio: f64,
    /// 1 − energy ratio.
    pub saving: f64,
    /// The share of the oracle's package saving this achieved (None when the oracle saved
    /// almost nothing).
    pub oracle_share: Option<f64>,
    /// Every VM at or above its threshold.
    pub thresholds_met: bool,
    /// Simulated time until the last VM finished, seconds.
    pub time_s: f64,
    /// Every VM finished before the time limit.
    pub completed: bool,
    /// P-state changes, all cores.
    pub transitions: u64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// The agent's own estimate of its saving, as `vmgov status` reports it (vmgov's runs): on
    /// the energy charged to VMs (their core-time share of the package), not the whole package.
    pub estimated_saving: Option<f64>,
    /// Per VM.
    pub vms: Vec<VmResult>,
}

/// Every governor on one host at one threshold.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ThresholdResult {
    /// The performance and throughput threshold, a fraction.
    pub threshold: f64,
    /// In [`Governor::ALL`] order.
    pub governors: Vec<GovernorResult>,
}

impl ThresholdResult {
    /// One governor's result.
    pub(crate) fn get(&self, g: Governor) -> Option<&GovernorResult> {
        self.governors.iter().find(|r| r.governor == g)
    }
}

/// A scenario at every threshold.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioResult {
    /// Safe in file names.
    pub id: String,
    /// For tables.
    pub title: String,
    /// One VM alone.
    pub single: bool,
    /// One workload per VM.
    pub workloads: Vec<String>,
    /// Per threshold.
    pub results: Vec<ThresholdResult>,
    /// Its plot files, relative to the report.
    pub plots: Vec<String>,
}

fn is_batch(w: &Workload) -> bool {
    w.phases.iter().any(|p| p.network.is_none())
}

/// The measures of one scenario at one threshold, from its runs (`runs[g]` for every governor).
pub(crate) fn evaluate(
    inputs: &Inputs,
    scenario: &Scenario,
    threshold: f64,
    references: &BTreeMap<String, Reference>,
    runs: &BTreeMap<Governor, &RunData>,
) -> ThresholdResult {
    let reference = runs.get(&Governor::Performance).map(|r| &r.report);
    let base_pkg = reference.map_or(f64::NAN, |r| r.package_energy_j);
    let base_core = reference.map_or(f64::NAN, |r| r.core_energy_j);
    let oracle_saving =
        runs.get(&Governor::Oracle).map(|r| 1.0 - r.report.package_energy_j / base_pkg);
    let mut governors = Vec::new();
    for g in Governor::ALL {
        let Some(run) = runs.get(&g) else { continue };
        let r = &run.report;
        let vms: Vec<VmResult> = scenario
            .workloads
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let truth = r.vms.get(i);
                let reference = references.get(name);
                let workload = inputs.workloads.get(name);
                let batch = workload.is_none_or(is_batch);
                let server = workload.is_some_and(Workload::is_server);
                let runtime_s = truth.and_then(|t| t.finished_at_s);
                let perf_ratio = if batch {
                    reference.and_then(|x| x.runtime_s).zip(runtime_s).map(|(a, b)| a / b)
                } else {
                    None
                };
                let throughput_ratio = if server {
                    reference
                        .and_then(|x| x.throughput)
                        .zip(truth)
                        .map(|(a, t)| t.throughput_ratio() / a)
                } else {
                    None
                };
                let ok = |ratio: Option<f64>, needed: bool| {
                    !needed || ratio.is_some_and(|x| x >= threshold - TOLERANCE)
                };
                VmResult {
                    name: truth.map(|t| t.name.clone()).unwrap_or_default(),
                    workload: name.clone(),
                    runtime_s,
                    perf_ratio,
                    throughput_ratio,
                    met: runtime_s.is_some()
                        && ok(perf_ratio, batch)
                        && ok(throughput_ratio, server),
                }
            })
            .collect();
        let saving = 1.0 - r.package_energy_j / base_pkg;
        governors.push(GovernorResult {
            governor: g,
            label: g.label(),
            package_energy_j: r.package_energy_j,
            core_energy_j: r.core_energy_j,
            energy_ratio: r.package_energy_j / base_pkg,
            core_energy_ratio: r.core_energy_j / base_core,
            saving,
            oracle_share: oracle_saving.filter(|s| *s >= NOTHING_TO_SAVE).map(|s| saving / s),
            thresholds_met: vms.iter().all(|v| v.met),
            time_s: r.time_s,
            completed: run.completed,
            transitions: r.transitions.iter().sum(),
            wall_s: run.wall_s,
            estimated_saving: run.estimated_saving,
            vms,
        });
    }
    ThresholdResult { threshold, governors }
}
