//! The runs the lab makes: which governors there are, and the simulated runs of the baselines
//! and the oracle (`simulate::run`, on a blocking thread). vmgov's own runs go through real
//! agents (`fleet.rs`).

use std::time::Instant;

use anyhow::{Result, anyhow};
use serde::Serialize;
use vmgov_proto::{Objective, Thresholds};
use vmgov_sim::{
    HardwareClass, SimConfig, SimReport, VmSpec,
    governor::GovernorKind,
    simulate::{self, Scenario},
};

use super::platform::Trace;

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

/// Runs a baseline governor or the oracle on a simulated host, to the end of every VM's work
/// (or `max_time_s`). Blocking: call it from a blocking thread.
pub(crate) fn simulated(
    class: &HardwareClass,
    vms: Vec<VmSpec>,
    config: SimConfig,
    governor: Governor,
    threshold: Option<f64>,
    max_time_s: f64,
) -> Result<RunData> {
    let started = Instant::now();
    let policy = match (governor.baseline(), threshold) {
        (Some(kind), _) => simulate::Policy::Governor(kind),
        (None, Some(t)) if governor == Governor::Oracle => {
            simulate::Policy::Oracle(vec![Thresholds::new(t, t)?])
        }
        _ => return Err(anyhow!("{} is not a simulated policy", governor.id())),
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

/// What the model predicts for a workload (from the counters of the start of its first phase,
/// noise-free, at f_max) against what the simulator does with the workload held at each P-state.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelCheck {
    /// The workload.
    pub workload: String,
    /// Predicted performance ratio per P-state (slowest first).
    pub predicted_perf: Vec<f64>,
    /// Predicted power ratio per P-state.
    pub predicted_power: Vec<f64>,
    /// Predicted throughput ratio per P-state.
    pub predicted_throughput: Vec<f64>,
    /// The workload held at each P-state: runtime at f_max over runtime (batch), or throughput
    /// over throughput at f_max (servers).
    pub actual_perf: Vec<f64>,
    /// Package energy over its energy at f_max.
    pub actual_energy: Vec<f64>,
}

/// The model against the simulator for `workload` (a blocking call): the predictions from its
/// first phase's counters, and the workload run whole at every P-state at length `scale`.
pub(crate) fn model_check(
    inputs: &super::inputs::Inputs,
    workload: &str,
    predictor: &vmgov_proto::Predictor,
    config: &SimConfig,
    scale: f64,
) -> Result<ModelCheck> {
    use vmgov_sim::SimHost;
    let names = [workload.to_owned()];
    let quiet = SimConfig { counter_noise: 0.0, ..config.clone() };
    let mut host = SimHost::new(inputs.class.clone(), inputs.vms(&names, scale), quiet.clone())?;
    // Predictions are linear in the features: average them over slices, as integer event
    // counts (disk requests, packets) vary from slice to slice.
    let (warmup, slices) = (10, 50);
    let mut predicted: Vec<vmgov_proto::Ratios> = Vec::new();
    let mut n = 0.0;
    for i in 0..warmup + slices {
        let Some(vm) = host.step().vms.first() else { break };
        if i < warmup {
            continue;
        }
        let features = vmgov_proto::features::derive(&vm.counters)
            .map_err(|e| anyhow!("{workload}: features of its counters: {e}"))?;
        let p = predictor.predict(&features).map_err(|e| anyhow!("{workload}: {e}"))?;
        predicted.resize(p.len(), vmgov_proto::Ratios { perf: 0.0, power: 0.0, throughput: 0.0 });
        for (acc, r) in predicted.iter_mut().zip(&p) {
            acc.perf += r.perf;
            acc.power += r.power;
            acc.throughput += r.throughput;
        }
        n += 1.0;
    }
    if n == 0.0 {
        return Err(anyhow!("{workload} did not run"));
    }
    for r in &mut predicted {
        r.perf /= n;
        r.power /= n;
        r.throughput /= n;
    }
    let pstates = inputs.class.pstates.len();
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
    let server = vm_top.requests_offered > 0.0;
    let actual_perf = runs
        .iter()
        .map(|r| {
            let vm = r.vms.first();
            if server {
                vm.map_or(f64::NAN, |v| v.throughput_ratio() / vm_top.throughput_ratio())
            } else {
                vm.and_then(|v| v.finished_at_s)
                    .zip(vm_top.finished_at_s)
                    .map_or(f64::NAN, |(t, t0)| t0 / t)
            }
        })
        .collect();
    Ok(ModelCheck {
        workload: workload.to_owned(),
        predicted_perf: predicted.iter().map(|r| r.perf).collect(),
        predicted_power: predicted.iter().map(|r| r.power).collect(),
        predicted_throughput: predicted.iter().map(|r| r.throughput).collect(),
        actual_perf,
        actual_energy: runs.iter().map(|r| r.package_energy_j / top.package_energy_j).collect(),
    })
}
