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

use crate::platform::{FrequencyControl, HostSample, PlatformError};

/// The baseline governors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GovernorKind {
    /// Busy cores at f_max: the reference every energy ratio is relative to.
    Performance,
    /// Every core at the lowest P-state.
    Powersave,
    /// Linux ondemand: f_max above 80% load, else proportional to load.
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
        let top = table.max_index();
        let f_max = table.max_frequency_hz();
        let f_min = table.as_slice()[0].frequency_hz;
        if self.requested_hz.len() != sample.cores.len() {
            self.requested_hz = vec![f_max; sample.cores.len()];
        }
        if self.kind == GovernorKind::CpuLoad {
            return self.update_cpu_load(sample, ctl, &table);
        }
        for (core, c) in sample.cores.iter().enumerate() {
            let pstate = match self.kind {
                GovernorKind::Performance => {
                    if c.busy > 0.0 {
                        top
                    } else {
                        0
                    }
                }
                GovernorKind::Powersave => 0,
                GovernorKind::Ondemand => {
                    if c.busy > UP_THRESHOLD {
                        top
                    } else {
                        lowest_at_or_above(&table, f_min + c.busy * (f_max - f_min))
                    }
                }
                GovernorKind::Conservative => {
                    let r = &mut self.requested_hz[core];
                    if c.busy > UP_THRESHOLD {
                        *r = (*r + FREQ_STEP * f_max).min(f_max);
                    } else if c.busy < DOWN_THRESHOLD {
                        *r = (*r - FREQ_STEP * f_max).max(f_min);
                    }
                    lowest_at_or_above(&table, *r)
                }
                GovernorKind::Schedutil => {
                    let util = c.busy * c.mean_frequency_hz / f_max;
                    lowest_at_or_above(&table, SCHEDUTIL_HEADROOM * f_max * util)
                }
                // Per VM, in update_cpu_load; idle time at the lowest P-state.
                GovernorKind::CpuLoad => 0,
            };
            ctl.set_core_pstate(core, pstate)?;
        }
        Ok(())
    }

    /// cpu-load: a VM's load is its busiest vCPU's busy fraction; scaled to f_max it says how
    /// much capacity the VM uses, and the VM gets the lowest P-state that still provides it. A
    /// memory-bound VM looks fully busy and so stays at f_max: the flaw the report points out.
    fn update_cpu_load(
        &mut self,
        sample: &HostSample,
        ctl: &mut dyn FrequencyControl,
        table: &PStateTable,
    ) -> Result<(), PlatformError> {
        let top = table.max_index();
        for vm in &sample.vms {
            if self.vm_pstate.len() <= vm.vm {
                self.vm_pstate.resize(vm.vm + 1, top);
            }
            let pstate = if vm.max_vcpu_busy >= CPU_LOAD_SATURATED {
                top
            } else {
                let ran_hz =
                    table.frequency_hz(self.vm_pstate[vm.vm]).unwrap_or(table.max_frequency_hz());
                lowest_at_or_above(table, vm.max_vcpu_busy * ran_hz)
            };
            self.vm_pstate[vm.vm] = pstate;
            ctl.set_vm_pstate(vm.vm, Some(pstate))?;
        }
        for core in 0..sample.cores.len() {
            ctl.set_core_pstate(core, 0)?;
        }
        Ok(())
    }
}
