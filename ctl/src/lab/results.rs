//! From the simulator's ground truth to the lab's measures (`vmgov_sim::measure` defines them):
//! every VM against its reference, the same workload alone on the host under `performance`,
//! by its work rate (reference seconds of work per second: the runtime ratio for a workload
//! that ends after its instructions, the work rate for a phase that ends after a time); a
//! server's throughput against its reference's; and energy against the performance governor on
//! the same host at equal work, so a run that did less work saves nothing by it. A VM meets
//! threshold t when its performance ratio (and, for a server, its throughput ratio) is at least
//! t over the whole run, as the report defines a threshold.

use std::collections::BTreeMap;

use serde::Serialize;
use vmgov_sim::{
    SimReport, Workload,
    bound::{BoundKind, VmSchedule},
    measure::{RunWork, WorkReference},
};

use super::{
    inputs::{Group, Inputs, Scenario},
    runs::{Governor, RunData},
};

/// Ratios are compared with this much slack: a runtime is known to a timeslice, and a ratio
/// that rounds to the threshold at three decimals meets it.
pub(crate) const TOLERANCE: f64 = 5e-4;

/// Below this package saving (2%) the oracle (or the bound) saved too little to divide by.
const NOTHING_TO_SAVE: f64 = 0.02;

/// How far below the whole-run bound a governor meeting its thresholds may come before the
/// yardstick is called wrong: the bound's own approximations (a slice at every switch and phase
/// end, transition stalls inside its probes) are well below this.
pub(crate) const BOUND_NOISE: f64 = 0.005;

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
    /// Its work rate in every phase: what its work is measured against.
    pub work: Option<WorkReference>,
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
            work: vm.map(WorkReference::from_truth),
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
    /// Reference seconds of work per second, over the whole run (its work rate against itself
    /// alone at f_max).
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
    /// Work done, reference seconds (all VMs).
    pub work_s: f64,
    /// Package energy per unit of work over `performance`'s: energy at equal work.
    pub energy_ratio: f64,
    /// The same for the cores' energy.
    pub core_energy_ratio: f64,
    /// 1 − energy ratio.
    pub saving: f64,
    /// The share of the oracle's package saving this achieved (None when the oracle saved
    /// almost nothing).
    pub oracle_share: Option<f64>,
    /// The share of the whole-run bound's saving this achieved (None when the bound saves
    /// almost nothing, or there is none).
    pub bound_share: Option<f64>,
    /// It met its thresholds yet spent less than the bound allows (beyond [`BOUND_NOISE`]): a
    /// bug in the yardstick.
    pub beats_bound: bool,
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

/// A scenario's whole-run bound at one threshold, against `performance`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BoundResult {
    /// Energy at equal work over `performance`'s: the least any policy could reach.
    pub energy_ratio: f64,
    /// 1 − that.
    pub saving: f64,
    /// Exact (one VM) or a lower bound (several).
    pub kind: BoundKind,
    /// How it runs each VM, per phase: seconds at each P-state and mode.
    pub schedule: Vec<VmSchedule>,
}

/// Every governor on one host at one threshold.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ThresholdResult {
    /// The performance and throughput threshold, a fraction.
    pub threshold: f64,
    /// The whole-run bound (None when it could not be computed: `bound_error` says why).
    pub bound: Option<BoundResult>,
    /// Why there is no bound.
    pub bound_error: Option<String>,
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
    /// Its part of the report.
    pub group: Group,
    /// One workload per VM.
    pub workloads: Vec<String>,
    /// Per threshold.
    pub results: Vec<ThresholdResult>,
    /// Its plot files, relative to the report.
    pub plots: Vec<String>,
}

/// The measures of one scenario at one threshold, from its runs (`runs[g]` for every governor).
pub(crate) fn evaluate(
    inputs: &Inputs,
    scenario: &Scenario,
    threshold: f64,
    references: &BTreeMap<String, Reference>,
    runs: &BTreeMap<Governor, &RunData>,
    bound: Option<&super::runs::BoundResult>,
) -> ThresholdResult {
    let work_refs: Vec<Option<&WorkReference>> = scenario
        .workloads
        .iter()
        .map(|w| references.get(w).and_then(|r| r.work.as_ref()))
        .collect();
    let work = |r: &SimReport| RunWork::new(r, &work_refs);
    let base = runs.get(&Governor::Performance).map(|r| work(&r.report));
    let ratio = |w: &RunWork| base.as_ref().map_or(f64::NAN, |b| w.energy_ratio(b));
    let oracle_saving = runs.get(&Governor::Oracle).map(|r| 1.0 - ratio(&work(&r.report)));
    let (bound, bound_error) = match bound {
        Some(Ok(b)) => {
            let energy_ratio =
                base.as_ref().map_or(f64::NAN, |base| b.energy_per_work / base.package_per_work());
            let result = BoundResult {
                energy_ratio,
                saving: 1.0 - energy_ratio,
                kind: b.kind,
                schedule: b.schedule.clone(),
            };
            (Some(result), None)
        }
        Some(Err(e)) => (None, Some(e.clone())),
        None => (None, Some("not computed".to_owned())),
    };
    let mut governors = Vec::new();
    for g in Governor::ALL {
        let Some(run) = runs.get(&g) else { continue };
        let r = &run.report;
        let run_work = work(r);
        let vms: Vec<VmResult> = scenario
            .workloads
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let truth = r.vms.get(i);
                let reference = references.get(name);
                let workload = inputs.workloads.get(name);
                let server = workload.is_some_and(Workload::is_server);
                let runtime_s = truth.and_then(|t| t.finished_at_s);
                let perf_ratio = reference
                    .and_then(|x| x.work.as_ref())
                    .zip(truth)
                    .and_then(|(w, t)| w.perf_ratio(t));
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
                        && ok(perf_ratio, true)
                        && ok(throughput_ratio, server),
                }
            })
            .collect();
        let energy_ratio = ratio(&run_work);
        let saving = 1.0 - energy_ratio;
        governors.push(GovernorResult {
            governor: g,
            label: g.label(),
            package_energy_j: r.package_energy_j,
            core_energy_j: r.core_energy_j,
            work_s: run_work.work_s,
            energy_ratio,
            core_energy_ratio: base.as_ref().map_or(f64::NAN, |b| run_work.core_energy_ratio(b)),
            saving,
            oracle_share: oracle_saving.filter(|s| *s >= NOTHING_TO_SAVE).map(|s| saving / s),
            bound_share: bound
                .as_ref()
                .map(|b| b.saving)
                .filter(|s| *s >= NOTHING_TO_SAVE)
                .map(|s| saving / s),
            beats_bound: false,
            thresholds_met: vms.iter().all(|v| v.met),
            time_s: r.time_s,
            completed: run.completed,
            transitions: r.transitions.iter().sum(),
            wall_s: run.wall_s,
            estimated_saving: run.estimated_saving,
            vms,
        });
    }
    if let Some(b) = &bound {
        for g in &mut governors {
            g.beats_bound =
                g.thresholds_met && g.energy_ratio < b.energy_ratio * (1.0 - BOUND_NOISE);
        }
    }
    ThresholdResult { threshold, bound, bound_error, governors }
}

#[cfg(test)]
mod tests {
    use vmgov_sim::bound::{Bound, BoundKind};

    use super::*;
    use crate::lab::{
        inputs,
        runs::{self, SimPolicy},
    };

    /// A run that meets its thresholds below the bound is flagged, and only such a run.
    #[test]
    fn a_run_below_the_bound_is_flagged_as_a_yardstick_bug() {
        let inputs = inputs::load(None, None, None, 0.01).unwrap();
        let scenario = inputs.scenarios.iter().find(|s| s.workloads == ["470.lbm"]).unwrap();
        let config = vmgov_sim::SimConfig { counter_noise: 0.0, ..vmgov_sim::SimConfig::default() };
        let perf = runs::simulated(
            &inputs.class,
            inputs.vms(&scenario.workloads, 0.0005),
            config,
            SimPolicy::Governor(Governor::Performance, None),
            3600.0,
        )
        .unwrap();
        let references: BTreeMap<String, Reference> =
            [("470.lbm".to_owned(), Reference::new("470.lbm", &perf.report))].into();
        // A run as good as performance on 10% less energy: impossible, so a bug if it happens.
        let mut cheat = perf.clone();
        cheat.report.package_energy_j *= 0.9;
        let runs: BTreeMap<Governor, &RunData> =
            [(Governor::Performance, &perf), (Governor::Vmgov, &cheat)].into();
        let per_work = RunWork::new(&perf.report, &[references["470.lbm"].work.as_ref()]);
        let bound = |energy_per_work: f64| -> runs::BoundResult {
            Ok(Bound { energy_per_work, kind: BoundKind::Exact, schedule: Vec::new() })
        };
        let below = bound(0.95 * per_work.package_per_work());
        let t = evaluate(&inputs, scenario, 0.7, &references, &runs, Some(&below));
        assert!(t.get(Governor::Vmgov).unwrap().beats_bound, "{t:?}");
        assert!(!t.get(Governor::Performance).unwrap().beats_bound);
        assert!((t.bound.as_ref().unwrap().saving - 0.05).abs() < 1e-9);
        let within = bound(0.9 * per_work.package_per_work());
        let t = evaluate(&inputs, scenario, 0.7, &references, &runs, Some(&within));
        assert!(!t.get(Governor::Vmgov).unwrap().beats_bound, "within noise of the bound");
    }
}
