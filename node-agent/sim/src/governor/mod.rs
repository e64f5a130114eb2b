//! Frequency governors that run on any platform through [`FrequencyControl`]: the baselines
//! vmgov is compared against, and (in [`oracle`]) the physical limit on the simulated host.
//!
//! Every baseline follows Linux's algorithm as documented in the kernel's cpufreq governors
//! (`drivers/cpufreq/cpufreq_ondemand.c`, `cpufreq_conservative.c`, `kernel/sched/cpufreq_schedutil.c`)
//! and chooses per core from the last slice's utilisation, except `cpu-load`, which chooses per
//! VM from its CPU load as the Xen approach the report criticises does. Under every governor a
//! core with nothing to run goes to the lowest P-state, as Linux's idle governors let it, so that
//! no comparison is skewed by idle cores held high.

pub mod oracle;

use std::{fmt, str::FromStr};

use serde::Serialize;
use thiserror::Error;
use vmgov_proto::PStateTable;

use crate::control::{FrequencyControl, HostSample, PlatformError, VmIndex};

/// The baseline governors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GovernorKind {
    /// Busy cores at f_max: the reference every energy ratio is relative to.
    Performance,
    /// Every core at the lowest P-state.
    Powersave,
    /// Linux ondemand: f_max above 80% load, else proportional to load (closest P-state).
    Ondemand,
    /// Linux conservative: steps of 5% of f_max up above 80% load, down below 20%.
    Conservative,
    /// Linux schedutil: 1.25 × f_max × frequency-invariant utilisation.
    Schedutil,
    /// Per VM, lower the frequency only when the VM's CPU load is low (Xen-style).
    CpuLoad,
}

impl GovernorKind {
    /// Every baseline.
    pub const ALL: [Self; 6] = [
        Self::Performance,
        Self::Powersave,
        Self::Ondemand,
        Self::Conservative,
        Self::Schedutil,
        Self::CpuLoad,
    ];

    /// Name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Performance => "performance",
            Self::Powersave => "powersave",
            Self::Ondemand => "ondemand",
            Self::Conservative => "conservative",
            Self::Schedutil => "schedutil",
            Self::CpuLoad => "cpu-load",
        }
    }
}

impl fmt::Display for GovernorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A governor name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "unknown governor {0:?}; choose one of performance, powersave, ondemand, conservative, schedutil, cpu-load"
)]
pub struct UnknownGovernor(pub String);

impl FromStr for GovernorKind {
    type Err = UnknownGovernor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|g| g.name() == s).ok_or_else(|| UnknownGovernor(s.to_owned()))
    }
}

/// Linux ondemand's and conservative's default up threshold (load fraction).
const UP_THRESHOLD: f64 = 0.80;
/// Linux conservative's default down threshold.
const DOWN_THRESHOLD: f64 = 0.20;
/// Linux conservative's default step, as a fraction of f_max.
const FREQ_STEP: f64 = 0.05;
/// schedutil's headroom.
const SCHEDUTIL_HEADROOM: f64 = 1.25;
/// cpu-load: a VM whose busiest vCPU is busier than this runs at f_max.
const CPU_LOAD_SATURATED: f64 = 0.95;

/// A baseline governor with its per-core state.
#[derive(Debug, Clone)]
pub struct Baseline {
    kind: GovernorKind,
    /// conservative: the frequency each core asked for last, Hz.
    requested_hz: Vec<f64>,
    /// cpu-load: the P-state each VM was given last.
    vm_pstate: Vec<usize>,
}

/// The P-state closest to `hz` (Linux's CPUFREQ_RELATION_C, ondemand's choice).
pub fn closest(table: &PStateTable, hz: f64) -> usize {
    let distance = |i: usize| (table.as_slice()[i].frequency_hz - hz).abs();
    (0..table.len()).min_by(|&a, &b| distance(a).total_cmp(&distance(b))).unwrap_or(0)
}

/// The lowest P-state whose frequency is at least `hz` (Linux's CPUFREQ_RELATION_L), or f_max.
pub fn lowest_at_or_above(table: &PStateTable, hz: f64) -> usize {
    table.as_slice().iter().position(|p| p.frequency_hz >= hz - 1e3).unwrap_or(table.max_index())
}

impl Baseline {
    /// A governor of `kind`.
    pub const fn new(kind: GovernorKind) -> Self {
        Self { kind, requested_hz: Vec::new(), vm_pstate: Vec::new() }
    }

    /// Its kind.
    pub const fn kind(&self) -> GovernorKind {
        self.kind
    }

    /// Sets frequencies from the last slice's sample.
    pub fn update(
        &mut self,
        sample: &HostSample,
        ctl: &mut dyn FrequencyControl,
    ) -> Result<(), PlatformError> {
        let table = ctl.pstates().clone();
        let plan = self.plan(sample, &table);
        for (core, &p) in plan.cores.iter().enumerate() {
            ctl.set_core_pstate(core, p)?;
        }
        for &(vm, p) in &plan.vms {
            ctl.set_vm_pstate(vm, Some(p))?;
        }
        Ok(())
    }

    /// What the governor would set after `sample`, without setting it: a P-state per core, and
    /// per VM for the per-VM governor (cpu-load).
    pub fn plan(&mut self, sample: &HostSample, table: &PStateTable) -> GovernorPlan {
        let top = table.max_index();
        let f_max = table.max_frequency_hz();
        let f_min = table.as_slice()[0].frequency_hz;
        if self.requested_hz.len() != sample.cores.len() {
            self.requested_hz = vec![f_max; sample.cores.len()];
        }
        if self.kind == GovernorKind::CpuLoad {
            return GovernorPlan {
                cores: vec![0; sample.cores.len()],
                vms: self.plan_cpu_load(sample, table),
            };
        }
        let cores = sample
            .cores
            .iter()
            .enumerate()
            .map(|(core, c)| match self.kind {
                GovernorKind::Performance => {
                    if c.busy > 0.0 {
                        top
                    } else {
                        0
                    }
                }
                GovernorKind::Powersave | GovernorKind::CpuLoad => 0,
                GovernorKind::Ondemand => {
                    if c.busy > UP_THRESHOLD {
                        top
                    } else {
                        closest(table, f_min + c.busy * (f_max - f_min))
                    }
                }
                GovernorKind::Conservative => {
                    let r = &mut self.requested_hz[core];
                    if c.busy > UP_THRESHOLD {
                        *r = (*r + FREQ_STEP * f_max).min(f_max);
                    } else if c.busy < DOWN_THRESHOLD {
                        *r = (*r - FREQ_STEP * f_max).max(f_min);
                    }
                    lowest_at_or_above(table, *r)
                }
                GovernorKind::Schedutil => {
                    let util = c.busy * c.mean_frequency_hz / f_max;
                    lowest_at_or_above(table, SCHEDUTIL_HEADROOM * f_max * util)
                }
            })
            .collect();
        GovernorPlan { cores, vms: Vec::new() }
    }

    /// cpu-load: a VM's load is its busiest vCPU's busy fraction; scaled to f_max it says how
    /// much capacity the VM uses, and the VM gets the lowest P-state that still provides it. A
    /// memory-bound VM looks fully busy and so stays at f_max: the flaw the report points out.
    fn plan_cpu_load(&mut self, sample: &HostSample, table: &PStateTable) -> Vec<(VmIndex, usize)> {
        let top = table.max_index();
        sample
            .vms
            .iter()
            .map(|vm| {
                if self.vm_pstate.len() <= vm.vm {
                    self.vm_pstate.resize(vm.vm + 1, top);
                }
                let pstate = if vm.max_vcpu_busy >= CPU_LOAD_SATURATED {
                    top
                } else {
                    let ran_hz = table
                        .frequency_hz(self.vm_pstate[vm.vm])
                        .unwrap_or(table.max_frequency_hz());
                    lowest_at_or_above(table, vm.max_vcpu_busy * ran_hz)
                };
                self.vm_pstate[vm.vm] = pstate;
                (vm.vm, pstate)
            })
            .collect()
    }
}

/// What a governor would set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GovernorPlan {
    /// A P-state per core.
    pub cores: Vec<usize>,
    /// Per-VM P-states (cpu-load only).
    pub vms: Vec<(VmIndex, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::{HardwareClass, SimConfig, SimHost, VmSpec, Workload},
        simulate::{self, Policy, Scenario},
    };

    fn scenario(workloads: &[(&str, f64)]) -> Scenario {
        Scenario {
            class: HardwareClass::builtin("phenom-9500").unwrap(),
            vms: workloads
                .iter()
                .enumerate()
                .map(|(i, (w, s))| VmSpec {
                    name: format!("vm{i}"),
                    vcpus: 2,
                    affinity: None,
                    workload: Workload::builtin(w).unwrap().scaled(*s),
                })
                .collect(),
            config: SimConfig { counter_noise: 0.0, ..SimConfig::default() },
            max_time_s: 3600.0,
        }
    }

    /// Share of core-time each P-state got over the run.
    fn residency(o: &simulate::Outcome) -> Vec<f64> {
        let mut total = vec![0.0; o.pstates_hz.len()];
        for core in &o.report.residency_s {
            for (t, r) in total.iter_mut().zip(core) {
                *t += r;
            }
        }
        let sum: f64 = total.iter().sum();
        total.iter().map(|t| t / sum).collect()
    }

    #[test]
    fn names_parse() {
        for g in GovernorKind::ALL {
            assert_eq!(g.name().parse::<GovernorKind>(), Ok(g));
        }
        assert!("userspace".parse::<GovernorKind>().unwrap_err().to_string().contains("schedutil"));
    }

    #[test]
    fn relation_l_picks_the_lowest_pstate_at_or_above() {
        let t = HardwareClass::builtin("phenom-9500").unwrap().pstate_table().unwrap();
        assert_eq!(lowest_at_or_above(&t, 0.0), 0);
        assert_eq!(lowest_at_or_above(&t, 1.5e9), 1);
        assert_eq!(lowest_at_or_above(&t, 1.6e9), 1);
        assert_eq!(lowest_at_or_above(&t, 9e9), 4);
        assert_eq!(closest(&t, 1.45e9), 0);
        assert_eq!(closest(&t, 1.55e9), 1);
    }

    #[test]
    fn performance_runs_busy_cores_at_f_max_and_idle_cores_at_the_lowest() {
        let o = simulate::run(
            &scenario(&[("444.namd", 0.005)]),
            &Policy::Governor(GovernorKind::Performance),
        )
        .unwrap();
        // One busy thread on four cores: a quarter of core-time at f_max, the rest idle and low.
        let r = residency(&o);
        assert!((r[4] - 0.25).abs() < 0.01 && (r[0] - 0.75).abs() < 0.01, "{r:?}");
    }

    #[test]
    fn utilisation_governors_slow_a_light_server_and_not_a_busy_job() {
        for g in [
            GovernorKind::Ondemand,
            GovernorKind::Schedutil,
            GovernorKind::Conservative,
            GovernorKind::CpuLoad,
        ] {
            let light =
                simulate::run(&scenario(&[("httperf-10", 0.02)]), &Policy::Governor(g)).unwrap();
            assert!(residency(&light)[0] > 0.95, "{g}: {:?}", residency(&light));
            let busy =
                simulate::run(&scenario(&[("470.lbm", 0.0005)]), &Policy::Governor(g)).unwrap();
            // lbm's core is busy all the time: every load-based governor keeps it fast, which is
            // the report's point about memory-bound VMs.
            let r = residency(&busy);
            assert!(r[4] > 0.2, "{g}: {r:?}");
        }
    }

    #[test]
    fn powersave_runs_everything_at_the_lowest_pstate() {
        let o = simulate::run(
            &scenario(&[("444.namd", 0.005)]),
            &Policy::Governor(GovernorKind::Powersave),
        )
        .unwrap();
        // All but the first slice, which starts at f_max before the governor has run.
        assert!(residency(&o)[0] > 0.995, "{:?}", residency(&o));
    }

    #[test]
    fn governors_only_use_the_hardware_table() {
        let mut h = SimHost::new(
            HardwareClass::builtin("epyc-7502").unwrap(),
            vec![VmSpec {
                name: "v".into(),
                vcpus: 2,
                affinity: None,
                workload: Workload::builtin("train-mix").unwrap().scaled(0.01),
            }],
            SimConfig::default(),
        )
        .unwrap();
        for kind in GovernorKind::ALL {
            let mut g = Baseline::new(kind);
            for _ in 0..20 {
                let s = h.step().clone();
                g.update(&s, &mut h).unwrap();
                for c in 0..h.core_count() {
                    assert!(h.core_pstate(c).unwrap() < 3);
                }
            }
        }
    }
}
