//! The host interface every policy uses, on any host: the frequency knobs
//! ([`FrequencyControl`]) and one timeslice's measurements ([`HostSample`]). The simulated host
//! implements it here, the agent's Linux backend on the real machine; the baseline governors, the
//! oracle and the agent's arbiter drive hosts only through it, so every policy is compared
//! through the same knobs.

use thiserror::Error;
use vmgov_proto::{PStateTable, RawCounters};

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
