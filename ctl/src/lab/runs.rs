//! The runs the lab makes: which governors there are, and the simulated runs of the baselines
//! and the oracle (`simulate::run`, on a blocking thread). vmgov's own runs go through real
//! agents (`fleet.rs`).

use std::{collections::BTreeMap, time::Instant};

use anyhow::{Result, anyhow};
use serde::Serialize;
use vmgov_proto::{Objective, Thresholds};
use vmgov_sim::{
    HardwareClass, SimConfig, SimReport, VmSpec,
    bound::{Bound, BoundVm, whole_run_bound},
    governor::GovernorKind,
    simulate::{self, Scenario},
};

use super::{platform::Trace, results::Reference};

/// Who sets the frequencies in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Governor {
    /// Busy cores at f_max: the reference.
    Performance,
    /// Linux ondemand.
    Ondemand,
    /// Linux schedutil.
    Schedutil,
    /// Per VM from its CPU load (Xen-style, as the report's related work).
    CpuLoad,
    /// vmgov's agent minimising predicted power: the report's equation 9.
    #[serde(rename = "equation-9")]
    Equation9,
    /// vmgov's agent minimising predicted energy (its default).
    Vmgov,
    /// The physical limit: exhaustive search on noise-free copies of the host.
    Oracle,
}

impl Governor {
    /// Every governor, in table order.
    pub(crate) const ALL: [Self; 7] = [
        Self::Performance,
        Self::Ondemand,
        Self::Schedutil,
        Self::CpuLoad,
        Self::Equation9,
        Self::Vmgov,
        Self::Oracle,
    ];

    /// Stable id (JSON, file names).
    pub(crate) const fn id(self) -> &'static str {
        match self {
            Self::Performance => "performance",
            Self::Ondemand => "ondemand",
            Self::Schedutil => "schedutil",
            Self::CpuLoad => "cpu-load",
            Self::Equation9 => "equation-9",
            Self::Vmgov => "vmgov",
            Self::Oracle => "oracle",
        }
    }

    /// For tables.
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Self::Performance => "performance",
            Self::Ondemand => "ondemand",
            Self::Schedutil => "schedutil",
            Self::CpuLoad => "cpu-load",
            Self::Equation9 => "eq. 9 (power)",
            Self::Vmgov => "vmgov (energy)",
            Self::Oracle => "oracle",
        }
    }

    /// The run depends on the threshold.
    pub(crate) const fn per_threshold(self) -> bool {
        matches!(self, Self::Equation9 | Self::Vmgov | Self::Oracle)
    }

    /// The agent's objective, for vmgov's two policies.
    pub(crate) const fn objective(self) -> Option<Objective> {
        match self {
            Self::Equation9 => Some(Objective::Power),
            Self::Vmgov => Some(Objective::Energy),
            _ => None,
        }
    }

    /// The baseline governor, for those that are one.
    const fn baseline(self) -> Option<GovernorKind> {
        match self {
            Self::Performance => Some(GovernorKind::Performance),
            Self::Ondemand => Some(GovernorKind::Ondemand),
            Self::Schedutil => Some(GovernorKind::Schedutil),
            Self::CpuLoad => Some(GovernorKind::CpuLoad),
            _ => None,
        }
    }
}

/// What a run left: the simulator's ground truth.
#[derive(Debug, Clone)]
pub(crate) struct RunData {
    /// Ground truth.
    pub report: SimReport,
    /// Every VM finished before the time limit.
    pub completed: bool,
    /// Core frequencies per slice (vmgov's runs).
    pub trace: Option<Trace>,
    /// Wall time it took, seconds.
    pub wall_s: f64,
    /// vmgov's own estimate of its saving (its runs only).
    pub estimated_saving: Option<f64>,
}

/// A run the lab simulates without an agent.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SimPolicy {
    /// A baseline governor, or the oracle at a threshold.
    Governor(Governor, Option<f64>),
    /// Every core at f_max: the research report's baseline, for its table.
    ReportBaseline,
}

/// Runs a baseline governor, the oracle or the report's baseline on a simulated host, to the
/// end of every VM's work (or `max_time_s`). Blocking: call it from a blocking thread.
pub(crate) fn simulated(
    class: &HardwareClass,
    vms: Vec<VmSpec>,
    config: SimConfig,
    policy: SimPolicy,
    max_time_s: f64,
) -> Result<RunData> {
    let started = Instant::now();
    let policy = match policy {
        SimPolicy::ReportBaseline => simulate::Policy::AllCoresMax,
        SimPolicy::Governor(governor, threshold) => match (governor.baseline(), threshold) {
            (Some(kind), _) => simulate::Policy::Governor(kind),
            (None, Some(t)) if governor == Governor::Oracle => {
                simulate::Policy::Oracle(vec![Thresholds::new(t, t)?])
            }
            _ => return Err(anyhow!("{} is not a simulated policy", governor.id())),
        },
    };
    let scenario = Scenario { class: class.clone(), vms, config, max_time_s };
    let outcome = simulate::run(&scenario, &policy)?;
    Ok(RunData {
        report: outcome.report,
        completed: outcome.completed,
        trace: None,
        wall_s: started.elapsed().as_secs_f64(),
        estimated_saving: None,
    })
}

/// A scenario's whole-run bound at one threshold, or why there is none.
pub(crate) type BoundResult = std::result::Result<Bound, String>;

/// The whole-run bound of every scenario at every threshold, keyed by (scenario, threshold)
/// index. Blocking.
pub(crate) fn bounds(
    inputs: &super::inputs::Inputs,
    references: &BTreeMap<String, Reference>,
    config: &SimConfig,
    scale: f64,
) -> BTreeMap<(usize, usize), BoundResult> {
    let mut out = BTreeMap::new();
    for (i, s) in inputs.scenarios.iter().enumerate() {
        for (t, &thr) in inputs.thresholds.iter().enumerate() {
            let vms: std::result::Result<Vec<BoundVm>, String> = inputs
                .vms(&s.workloads, scale)
                .into_iter()
                .zip(&s.workloads)
                .map(|(spec, w)| {
                    let reference = references
                        .get(w)
                        .and_then(|r| r.work.clone())
                        .ok_or_else(|| format!("{w} has no reference run"))?;
                    let thresholds = Thresholds::new(thr, thr).map_err(|e| e.to_string())?;
                    Ok(BoundVm { spec, reference, thresholds })
                })
                .collect();
            let bound = vms.and_then(|vms| {
                whole_run_bound(&inputs.class, &vms, config).map_err(|e| super::inputs::chain(&e))
            });
            out.insert((i, t), bound);
        }
    }
    out
}

/// What the model predicts for a workload over its whole run at f_max, against what the
/// simulator does with the workload held at each P-state.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelCheck {
    /// The workload.
    pub workload: String,
    /// It serves requests (its ratio is judged as a throughput).
    pub server: bool,
    /// Predicted performance ratio per P-state (slowest first), for the whole run: the
    /// harmonic mean of every slice's prediction (each slice of work takes 1/ratio as long).
    pub predicted_perf: Vec<f64>,
    /// Predicted power ratio per P-state, averaged over the slices.
    pub predicted_power: Vec<f64>,
    /// Predicted throughput ratio per P-state, averaged over the slices.
    pub predicted_throughput: Vec<f64>,
    /// The workload held at each P-state: its performance ratio (work rate against its run at
    /// f_max, `vmgov_sim::measure`), which for a server is its throughput ratio.
    pub actual_perf: Vec<f64>,
    /// Package energy at equal work over its energy at f_max.
    pub actual_energy: Vec<f64>,
}

/// The model against the simulator for `workload` (a blocking call): the model's predictions
/// from the counters of every slice of the workload run whole at f_max (noise-free), and the
/// workload run whole at every P-state, at length `scale`.
pub(crate) fn model_check(
    inputs: &super::inputs::Inputs,
    workload: &str,
    predictor: &vmgov_proto::Predictor,
    config: &SimConfig,
    scale: f64,
) -> Result<ModelCheck> {
    use vmgov_sim::{
        SimHost,
        measure::{RunWork, WorkReference},
    };
    let names = [workload.to_owned()];
    let quiet = SimConfig { counter_noise: 0.0, ..config.clone() };
    let mut host = SimHost::new(inputs.class.clone(), inputs.vms(&names, scale), quiet.clone())?;
    let pstates = inputs.class.pstates.len();
    // Per P-state: Σ 1/perf, Σ power, Σ throughput over the slices the VM ran.
    let mut sums = vec![(0.0, 0.0, 0.0); pstates];
    let mut n = 0.0;
    let max_slices = 36_000.0 / quiet.timeslice_s;
    let mut slices = 0.0;
    while !host.all_finished() && slices < max_slices {
        slices += 1.0;
        let Some(vm) = host.step().vms.first() else { continue };
        if vm.counters.instructions == 0 {
            continue;
        }
        let features = vmgov_proto::features::derive(&vm.counters)
            .map_err(|e| anyhow!("{workload}: features of its counters: {e}"))?;
        let p = predictor.predict(&features).map_err(|e| anyhow!("{workload}: {e}"))?;
        for (acc, r) in sums.iter_mut().zip(&p) {
            acc.0 += 1.0 / r.perf.max(1e-9);
            acc.1 += r.power;
            acc.2 += r.throughput;
        }
        n += 1.0;
    }
    if n == 0.0 {
        return Err(anyhow!("{workload} did not run"));
    }
    let mut runs = Vec::with_capacity(pstates);
    for p in 0..pstates {
        let scenario = Scenario {
            class: inputs.class.clone(),
            vms: inputs.vms(&names, scale),
            config: quiet.clone(),
            max_time_s: 36_000.0,
        };
        runs.push(simulate::run(&scenario, &simulate::Policy::Fixed(vec![p]))?.report);
    }
    let top = runs.last().ok_or_else(|| anyhow!("the class has no P-state"))?;
    let vm_top = top.vms.first().ok_or_else(|| anyhow!("{workload} did not run"))?;
    let reference = WorkReference::from_truth(vm_top);
    let base = RunWork::new(top, &[Some(&reference)]);
    Ok(ModelCheck {
        workload: workload.to_owned(),
        server: vm_top.requests_offered > 0.0,
        predicted_perf: sums.iter().map(|s| n / s.0).collect(),
        predicted_power: sums.iter().map(|s| s.1 / n).collect(),
        predicted_throughput: sums.iter().map(|s| s.2 / n).collect(),
        actual_perf: runs
            .iter()
            .map(|r| r.vms.first().and_then(|v| reference.perf_ratio(v)).unwrap_or(f64::NAN))
            .collect(),
        actual_energy: runs
            .iter()
            .map(|r| RunWork::new(r, &[Some(&reference)]).energy_ratio(&base))
            .collect(),
    })
}
