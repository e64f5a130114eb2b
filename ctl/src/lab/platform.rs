//! [`LabPlatform`]: the simulated host as the lab hands it to an agent. It is the agent's
//! [`SimPlatform`] with two additions the lab needs:
//!
//! - a gate: while it is closed the host shows no VM and its time does not move (every slice is
//!   an idle one), so a learning host starts its workload exactly when learning starts, whatever
//!   the wall clock did meanwhile, and every run is repeatable for a seed;
//! - a trace of every core's mean frequency per slice, for the lab's plots.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use vmgov_agent::platform::{
    CoreSample, FrequencyControl, HostInfo, HostPlatform, HostSample, PlatformError, VmIndex,
    VmInfo, sim::SimPlatform,
};
use vmgov_proto::PStateTable;
use vmgov_sim::SimHost;

/// Every core's mean frequency in every slice of a run, GHz, slice-major.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trace {
    /// Cores per slice.
    pub cores: usize,
    /// Slice length, seconds.
    pub timeslice_s: f64,
    /// `cores` values per slice.
    pub ghz: Vec<f32>,
}

impl Trace {
    /// Slices recorded.
    pub(crate) fn slices(&self) -> usize {
        self.ghz.len().checked_div(self.cores).unwrap_or(0)
    }
}

/// The simulated host behind a gate, recording core frequencies.
#[derive(Debug)]
pub(crate) struct LabPlatform {
    sim: SimPlatform,
    gate: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    idle: HostSample,
    trace: Option<Trace>,
}

/// The lab's hold on a [`LabPlatform`] that an agent owns.
#[derive(Debug, Clone)]
pub(crate) struct Handles {
    /// Open: the simulator runs.
    pub gate: Arc<AtomicBool>,
    /// Every VM of the simulator has finished.
    pub done: Arc<AtomicBool>,
}

impl Handles {
    /// Lets the simulator run.
    pub(crate) fn open(&self) {
        self.gate.store(true, Ordering::SeqCst);
    }

    /// Stops the simulator: from the next slice on the host shows no VM and its time stands.
    pub(crate) fn close(&self) {
        self.gate.store(false, Ordering::SeqCst);
    }

    /// True once every VM has finished its workload.
    pub(crate) fn done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }
}

impl LabPlatform {
    /// Wraps `host`; `open` says whether it runs from the start, `trace` whether core
    /// frequencies are recorded.
    pub(crate) fn new(host: SimHost, open: bool, trace: bool) -> (Self, Handles) {
        let handles = Handles {
            gate: Arc::new(AtomicBool::new(open)),
            done: Arc::new(AtomicBool::new(false)),
        };
        let timeslice_s = host.config().timeslice_s;
        let cores = host.core_count();
        let platform = Self {
            sim: SimPlatform::new(host),
            gate: Arc::clone(&handles.gate),
            done: Arc::clone(&handles.done),
            idle: HostSample { timeslice_s, ..HostSample::default() },
            trace: trace.then(|| Trace { cores, timeslice_s, ghz: Vec::new() }),
        };
        (platform, handles)
    }

    /// The simulator, for its ground truth.
    pub(crate) const fn host(&self) -> &SimHost {
        self.sim.host()
    }

    /// Takes the recorded trace out.
    pub(crate) fn take_trace(&mut self) -> Option<Trace> {
        self.trace.take()
    }

    fn open(&self) -> bool {
        self.gate.load(Ordering::SeqCst)
    }

    /// An idle slice at the cores' current settings; simulated time stands still.
    fn idle_sample(&mut self) -> &HostSample {
        let host = self.sim.host();
        let table = host.pstates();
        let cores = (0..host.core_count())
            .map(|c| {
                let pstate = host.core_pstate(c).unwrap_or(0);
                CoreSample {
                    busy: 0.0,
                    pstate,
                    mean_frequency_hz: table.frequency_hz(pstate).unwrap_or(0.0),
                }
            })
            .collect();
        self.idle.time_s = host.time_s();
        self.idle.cores = cores;
        self.idle.package_energy_j = Some(0.0);
        &self.idle
    }
}

impl FrequencyControl for LabPlatform {
    fn pstates(&self) -> &PStateTable {
        self.sim.pstates()
    }

    fn core_count(&self) -> usize {
        self.sim.core_count()
    }

    fn core_pstate(&self, core: usize) -> Result<usize, PlatformError> {
        self.sim.core_pstate(core)
    }

    fn set_core_pstate(&mut self, core: usize, pstate: usize) -> Result<(), PlatformError> {
        self.sim.set_core_pstate(core, pstate)
    }

    fn set_vm_pstate(&mut self, vm: VmIndex, pstate: Option<usize>) -> Result<(), PlatformError> {
        self.sim.set_vm_pstate(vm, pstate)
    }
}

impl HostPlatform for LabPlatform {
    fn info(&self) -> HostInfo {
        self.sim.info()
    }

    fn vms(&mut self) -> Result<Vec<VmInfo>, PlatformError> {
        if self.open() { self.sim.vms() } else { Ok(Vec::new()) }
    }

    fn sample(&mut self) -> Result<&HostSample, PlatformError> {
        if !self.open() {
            return Ok(self.idle_sample());
        }
        self.sim.sample()?;
        let host = self.sim.host();
        if let Some(trace) = self.trace.as_mut() {
            #[allow(clippy::cast_possible_truncation, reason = "GHz in an f32 for a plot")]
            trace.ghz.extend(
                host.last_sample().cores.iter().map(|c| (c.mean_frequency_hz / 1e9) as f32),
            );
        }
        if host.all_finished() {
            self.done.store(true, Ordering::SeqCst);
        }
        Ok(self.sim.host().last_sample())
    }

    fn set_vm_affinity(&mut self, vm: VmIndex, mask: u64) -> Result<(), PlatformError> {
        self.sim.set_vm_affinity(vm, mask)
    }

    fn restore(&mut self) -> Result<(), PlatformError> {
        self.sim.restore()
    }

    fn lockstep(&self) -> bool {
        true
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
