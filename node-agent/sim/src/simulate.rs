//! Runs workloads on the simulated host under a policy and reports the ground truth: what
//! `vmgov-agent simulate` prints, and what the lab's baselines and oracle runs are made of.
//!
//! Users calibrate their own classes and workloads with it; it is also how anyone can check the
//! physics from outside the code.

use comfy_table::Table;
use serde::Serialize;
use thiserror::Error;
use vmgov_proto::Thresholds;

use crate::{
    control::{FrequencyControl, PlatformError},
    governor::{
        Baseline, GovernorKind,
        oracle::{self, Oracle},
    },
    host::{HardwareClass, SimConfig, SimError, SimHost, SimReport, VmSpec},
};

/// Who sets the frequencies.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// A baseline governor.
    Governor(GovernorKind),
    /// A fixed P-state per VM (one entry for all VMs, or one per VM), applied per VM at vCPU
    /// switches; cores that ran a vCPU keep the highest of them for their idle time, cores that
    /// ran nothing go to the lowest (so a VM fixed at f_max is the performance governor).
    Fixed(Vec<usize>),
    /// The oracle, holding each VM to its thresholds (one entry for all, or one per VM).
    Oracle(Vec<Thresholds>),
    /// Every core at the top P-state all the time, idle or not: the research report's baseline
    /// ("all cores at the maximum frequency"), not the lab's, which rests idle cores.
    AllCoresMax,
}

impl Policy {
    /// Short name for tables.
    pub fn name(&self) -> String {
        match self {
            Self::Governor(g) => g.name().to_owned(),
            Self::Fixed(p) => format!("fixed {p:?}"),
            Self::Oracle(_) => "oracle".to_owned(),
            Self::AllCoresMax => "all cores at f_max".to_owned(),
        }
    }
}

/// A run to make.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The host.
    pub class: HardwareClass,
    /// Its VMs.
    pub vms: Vec<VmSpec>,
    /// Simulation settings.
    pub config: SimConfig,
    /// Stop after this much simulated time even if work remains, seconds.
    pub max_time_s: f64,
}

/// A run's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The policy's name.
    pub policy: String,
    /// Ground truth.
    pub report: SimReport,
    /// Timeslices simulated.
    pub steps: u64,
    /// False when the run hit `max_time_s` before every VM finished.
    pub completed: bool,
    /// The class's P-state frequencies, Hz (for reading residencies).
    pub pstates_hz: Vec<f64>,
}

/// Why a run failed.
#[derive(Debug, Error)]
pub enum SimulateError {
    /// The host could not be built.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// The policy asked for something the platform refused.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The policy does not fit the scenario.
    #[error("{0}")]
    Policy(String),
}

fn per_vm<T: Copy>(values: &[T], vms: usize, what: &str) -> Result<Vec<T>, SimulateError> {
    match values {
        [one] => Ok(vec![*one; vms]),
        v if v.len() == vms => Ok(v.to_vec()),
        v => Err(SimulateError::Policy(format!(
            "{} {what} given for {vms} VMs; give one, or one per VM",
            v.len()
        ))),
    }
}

/// Runs `scenario` under `policy` until every VM finishes (or `max_time_s`).
pub fn run(scenario: &Scenario, policy: &Policy) -> Result<Outcome, SimulateError> {
    let mut host =
        SimHost::new(scenario.class.clone(), scenario.vms.clone(), scenario.config.clone())?;
    let n = host.vm_count();
    let mut baseline = None;
    let mut oracle = None;
    let mut held = None;
    match policy {
        Policy::Governor(kind) => baseline = Some(Baseline::new(*kind)),
        Policy::Fixed(pstates) => {
            let pstates = per_vm(pstates, n, "P-states")?;
            for (vm, &p) in pstates.iter().enumerate() {
                host.set_vm_pstate(vm, Some(p))?;
            }
            held = pstates.iter().copied().max();
        }
        Policy::Oracle(thresholds) => {
            oracle = Some(Oracle::new(per_vm(thresholds, n, "thresholds")?))
        }
        Policy::AllCoresMax => {
            let top = host.pstates().max_index();
            for core in 0..host.core_count() {
                host.set_core_pstate(core, top)?;
            }
        }
    }
    let mut steps = 0;
    while !host.all_finished() && host.time_s() < scenario.max_time_s {
        if let Some(o) = oracle.as_mut() {
            o.update(&mut host)?;
        }
        host.step();
        steps += 1;
        let sample = host.take_sample();
        let result = match (&mut baseline, &oracle, held) {
            (Some(g), _, _) => g.update(&sample, &mut host),
            (_, Some(o), _) => o.after_step(&sample, &mut host),
            (_, _, Some(p)) => oracle::hold_busy_cores(&sample, &mut host, p),
            _ => Ok(()),
        };
        host.return_sample(sample);
        result?;
    }
    Ok(Outcome {
        policy: policy.name(),
        report: host.report(),
        steps,
        completed: host.all_finished(),
        pstates_hz: host.pstates().as_slice().iter().map(|p| p.frequency_hz).collect(),
    })
}

/// The outcome as human tables: per VM, then the package and per-core frequency residency.
pub fn render(outcome: &Outcome) -> String {
    let r = &outcome.report;
    let mut vms = Table::new();
    vms.set_header([
        "VM",
        "workload",
        "runtime s",
        "throughput",
        "instructions",
        "busy s",
        "core energy J",
    ]);
    for v in &r.vms {
        let throughput = if v.requests_offered > 0.0 {
            format!(
                "{:.1} req/s ({:.1}%)",
                v.requests_served / v.serving_s.max(1e-9),
                100.0 * v.throughput_ratio()
            )
        } else {
            "-".into()
        };
        vms.add_row([
            v.name.clone(),
            v.workload.clone(),
            v.finished_at_s.map_or_else(|| "unfinished".into(), |t| format!("{t:.2}")),
            throughput,
            format!("{:.3e}", v.instructions),
            format!("{:.2}", v.busy_s),
            format!("{:.1}", v.energy_j),
        ]);
    }
    let mut pkg = Table::new();
    pkg.set_header(["policy", "time s", "package J", "cores J", "uncore J", "mean power W"]);
    pkg.add_row([
        outcome.policy.clone(),
        format!("{:.2}", r.time_s),
        format!("{:.1}", r.package_energy_j),
        format!("{:.1}", r.core_energy_j),
        format!("{:.1}", r.uncore_energy_j),
        format!("{:.2}", r.average_power_w()),
    ]);
    let mut res = Table::new();
    let mut header = vec!["core".to_owned()];
    header.extend(outcome.pstates_hz.iter().map(|f| format!("{:.2} GHz", f / 1e9)));
    header.push("transitions".into());
    res.set_header(header);
    for (core, (residency, transitions)) in r.residency_s.iter().zip(&r.transitions).enumerate() {
        let total: f64 = residency.iter().sum::<f64>().max(1e-12);
        let mut row = vec![core.to_string()];
        row.extend(residency.iter().map(|s| format!("{:.1}%", 100.0 * s / total)));
        row.push(transitions.to_string());
        res.add_row(row);
    }
    let mut out = format!("{vms}\n{pkg}\n{res}\n");
    if !outcome.completed {
        out.push_str("note: stopped at the time limit before every VM finished\n");
    }
    out
}
