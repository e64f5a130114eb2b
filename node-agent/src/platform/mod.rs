//! The platform layer: every contact with the machine goes through a narrow trait here, with a
//! simulated backend ([`sim`]) that is a first-class platform (it is how vmgov is demonstrated,
//! evaluated and tested on machines without DVFS), and the real Linux KVM host ([`linux`]).
//!
//! The frequency interface is the one both the agent's arbiter and the baseline governors use,
//! so that every policy is compared through the same knobs.

pub mod linux;
pub mod sim;

use serde::Serialize;
use thiserror::Error;
use vmgov_proto::{CounterSet, PStateTable, RawCounters};

/// Index of a VM on a host (stable for the VM's lifetime on that host).
pub type VmIndex = usize;

/// Why a platform refused an operation.
#[derive(Debug, Clone, Error)]
pub enum PlatformError {
    /// The core does not exist.
    #[error("core {core} does not exist (this host has {cores})")]
    NoSuchCore {
        /// The core asked for.
        core: usize,
        /// Cores present.
        cores: usize,
    },
    /// The VM does not exist.
    #[error("VM #{0} does not exist")]
    NoSuchVm(VmIndex),
    /// The P-state is not in the hardware table: frequencies outside it are refused.
    #[error("P-state {pstate} is not in this host's table of {len}")]
    NoSuchPState {
        /// The P-state asked for.
        pstate: usize,
        /// Entries in the table.
        len: usize,
    },
    /// The platform cannot do this at all, and why.
    #[error("not supported on this platform: {0}")]
    Unsupported(&'static str),
    /// Reading or writing the machine failed.
    #[error("{what}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The cause.
        #[source]
        source: std::sync::Arc<std::io::Error>,
    },
}

impl PlatformError {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source: std::sync::Arc::new(source) }
    }
}

/// A VM on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// Platform id, never reused on this host while the agent runs.
    pub id: VmIndex,
    /// Name (QEMU `-name guest=NAME`).
    pub name: String,
    /// UUID (QEMU `-uuid`), or one derived from the name where the VM has none.
    pub uuid: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Cores its vCPUs may run on.
    pub affinity: u64,
}

/// What a host is and what it allows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostInfo {
    /// Which backend ("sim", "linux").
    pub platform: &'static str,
    /// Hardware class (what models are keyed by).
    pub hardware_class: String,
    /// Cores under control.
    pub cores: usize,
    /// The hardware's P-states.
    pub pstates: PStateTable,
    /// Whether a VM's vCPUs can be run at their own P-state at every vCPU switch.
    pub per_vm_frequency: bool,
    /// Whether a package energy meter exists.
    pub energy_meter: bool,
    /// Counters this host cannot measure.
    pub unavailable: CounterSet,
}

/// A whole host, as the agent drives it: the VMs on it, one timeslice's measurements at a time,
/// and the frequency knobs. Backends: [`sim::SimPlatform`] (lockstep with the simulator) and
/// [`linux::LinuxPlatform`] (the real host, on the wall clock).
pub trait HostPlatform: FrequencyControl + Send {
    /// What the host is.
    fn info(&self) -> HostInfo;
    /// The VMs present now.
    fn vms(&mut self) -> Result<Vec<VmInfo>, PlatformError>;
    /// Measures the timeslice that just ended (on the simulated host: runs it) and returns it.
    fn sample(&mut self) -> Result<&HostSample, PlatformError>;
    /// Restricts a VM's vCPUs to `mask` (the `pin` arbiter policy).
    fn set_vm_affinity(&mut self, vm: VmIndex, mask: u64) -> Result<(), PlatformError>;
    /// Puts back every frequency, governor and affinity the agent changed.
    fn restore(&mut self) -> Result<(), PlatformError>;
    /// True when time advances only when [`Self::sample`] is called (the simulated host), so the
    /// agent need not wait for the wall clock between slices.
    fn lockstep(&self) -> bool;
    /// The concrete backend, for callers that know it (the lab reads the simulator's truth).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// Per-core and per-VM frequency control.
pub trait FrequencyControl {
    /// The hardware's P-states.
    fn pstates(&self) -> &PStateTable;
    /// Number of cores under control.
    fn core_count(&self) -> usize;
    /// The P-state a core is set to (what it runs idle time and non-following vCPUs at).
    fn core_pstate(&self, core: usize) -> Result<usize, PlatformError>;
    /// Sets a core's P-state (cpufreq-style).
    fn set_core_pstate(&mut self, core: usize, pstate: usize) -> Result<(), PlatformError>;
    /// Asks that whichever core runs one of `vm`'s vCPUs run it at `pstate`, switched at every
    /// vCPU switch (the report's per-context-switch DVFS; uclamp on Linux); `None` clears it.
    fn set_vm_pstate(&mut self, vm: VmIndex, pstate: Option<usize>) -> Result<(), PlatformError>;
}

/// What one core did over the last timeslice.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoreSample {
    /// Fraction of the slice a vCPU ran on the core (0..=1).
    pub busy: f64,
    /// The P-state the core is set to.
    pub pstate: usize,
    /// Time-weighted mean frequency the core actually ran at, Hz.
    pub mean_frequency_hz: f64,
}

/// What one VM did over the last timeslice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmSample {
    /// The VM.
    pub vm: VmIndex,
    /// Raw counter deltas, as the agent would read them.
    pub counters: RawCounters,
    /// Mean busy fraction of the VM's vCPUs (0..=1).
    pub busy: f64,
    /// Busy fraction of its busiest vCPU (0..=1): a single-threaded job saturates one vCPU.
    pub max_vcpu_busy: f64,
    /// The VM has finished its work (simulated hosts only; real VMs just go away).
    pub finished: bool,
}

/// Where a vCPU ran during a slice.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VcpuPlacement {
    /// The VM.
    pub vm: VmIndex,
    /// The vCPU within the VM.
    pub vcpu: usize,
    /// The core.
    pub core: usize,
    /// Fraction of the slice it ran there.
    pub share: f64,
}

/// One timeslice of a host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    /// Host time at the end of the slice, seconds since the host started.
    pub time_s: f64,
    /// Length of the slice, seconds.
    pub timeslice_s: f64,
    /// Per core.
    pub cores: Vec<CoreSample>,
    /// Per VM still present.
    pub vms: Vec<VmSample>,
    /// Package energy over the slice, joules, where a meter exists.
    pub package_energy_j: Option<f64>,
    /// Which vCPU ran on which core, for how long (a vCPU may run on two cores in one slice).
    pub placement: Vec<VcpuPlacement>,
}
