//! The platform layer: every contact with the machine goes through a narrow trait here, with a
//! simulated backend ([`sim`], the `vmgov-sim` crate's host in lockstep) that is a first-class
//! platform (it is how vmgov is demonstrated, evaluated and tested on machines without DVFS), and
//! the real Linux KVM host ([`linux`]).
//!
//! The frequency interface and the per-slice sample ([`FrequencyControl`], [`HostSample`]) are
//! `vmgov-sim`'s, re-exported here: the agent's arbiter and every baseline governor drive hosts
//! through the same knobs.

pub mod linux;
pub mod sim;

use serde::Serialize;
use vmgov_proto::{CounterSet, PStateTable};
pub use vmgov_sim::control::{
    CoreSample, FrequencyControl, HostSample, PlatformError, VcpuPlacement, VmIndex, VmSample,
};

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
