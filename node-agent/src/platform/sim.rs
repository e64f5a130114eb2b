//! [`SimPlatform`]: the simulated host as a whole platform for the agent, in lockstep: every
//! `sample()` runs one timeslice of the simulator, so simulated time advances exactly as fast as
//! the agent works. VMs appear when added and disappear when their workload ends, as QEMU
//! processes come and go.

use vmgov_proto::PStateTable;
pub use vmgov_sim::host::*;

use crate::platform::{
    FrequencyControl, HostInfo, HostPlatform, HostSample, PlatformError, VmIndex, VmInfo,
};

/// The simulated host driven by an agent.
#[derive(Debug)]
pub struct SimPlatform {
    host: SimHost,
}

impl SimPlatform {
    /// Wraps a simulated host.
    pub const fn new(host: SimHost) -> Self {
        Self { host }
    }

    /// The simulator, for its ground truth.
    pub const fn host(&self) -> &SimHost {
        &self.host
    }

    /// The simulator, to add VMs while it runs.
    pub const fn host_mut(&mut self) -> &mut SimHost {
        &mut self.host
    }
}

/// A UUID for a simulated VM, stable for its index.
fn uuid(vm: VmIndex) -> String {
    format!("00000000-0000-4000-8000-{vm:012x}")
}

impl FrequencyControl for SimPlatform {
    fn pstates(&self) -> &PStateTable {
        self.host.pstates()
    }

    fn core_count(&self) -> usize {
        self.host.core_count()
    }

    fn core_pstate(&self, core: usize) -> Result<usize, PlatformError> {
        self.host.core_pstate(core)
    }

    fn set_core_pstate(&mut self, core: usize, pstate: usize) -> Result<(), PlatformError> {
        self.host.set_core_pstate(core, pstate)
    }

    fn set_vm_pstate(&mut self, vm: VmIndex, pstate: Option<usize>) -> Result<(), PlatformError> {
        self.host.set_vm_pstate(vm, pstate)
    }
}

impl HostPlatform for SimPlatform {
    fn info(&self) -> HostInfo {
        HostInfo {
            platform: "sim",
            hardware_class: self.host.class().name.clone(),
            cores: self.host.core_count(),
            pstates: self.host.pstates().clone(),
            per_vm_frequency: true,
            energy_meter: true,
            unavailable: vmgov_proto::CounterSet::EMPTY,
        }
    }

    fn vms(&mut self) -> Result<Vec<VmInfo>, PlatformError> {
        Ok((0..self.host.vm_count())
            .filter(|&vm| self.host.vm_started(vm) && !self.host.vm_finished(vm))
            .filter_map(|vm| {
                self.host.vm_spec(vm).map(|(name, vcpus, affinity)| VmInfo {
                    id: vm,
                    name: name.to_owned(),
                    uuid: uuid(vm),
                    vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
                    affinity,
                })
            })
            .collect())
    }

    fn sample(&mut self) -> Result<&HostSample, PlatformError> {
        Ok(self.host.step())
    }

    fn set_vm_affinity(&mut self, vm: VmIndex, mask: u64) -> Result<(), PlatformError> {
        self.host.set_vm_affinity(vm, mask)
    }

    fn restore(&mut self) -> Result<(), PlatformError> {
        let top = self.host.pstates().max_index();
        for core in 0..self.host.core_count() {
            self.host.set_core_pstate(core, top)?;
        }
        for vm in 0..self.host.vm_count() {
            self.host.set_vm_pstate(vm, None)?;
        }
        Ok(())
    }

    fn lockstep(&self) -> bool {
        true
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
