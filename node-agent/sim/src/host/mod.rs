//! The simulated KVM host: a platform backend held to physics and published figures.
//!
//! [`SimHost`] advances in timeslices. Every slice it (1) asks each VM's busy threads how much of
//! the slice they want (all of it for batch work, less for a thread blocked on its disk or an
//! under-loaded server), (2) shares the cores among those vCPUs fairly, honouring affinity
//! masks, (3) lays out each core's slice as a sequence of vCPU runs, each at the P-state of the
//! core or of the VM it runs (switched at vCPU switches, as in the report), paying the class's
//! transition latency at every change, (4) solves the socket's memory-bandwidth queueing, (5)
//! executes the instructions and I/O, and (6) integrates power over the slice, with the voltage
//! of the shared plane following the fastest core where the class has one.
//!
//! What the agent sees ([`HostSample`]: counter deltas with configurable noise, a package energy
//! meter, core utilisation) is kept apart from the ground truth ([`SimReport`]: runtimes,
//! throughputs, exact energies). Everything is deterministic for a seed.

pub mod class;
pub mod physics;
pub mod workload;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use vmgov_proto::{PStateTable, RawCounters};

pub use self::{
    class::{ClassError, HardwareClass, VoltageDomain},
    workload::{Workload, WorkloadError},
};
use crate::control::{
    CoreSample, FrequencyControl, HostSample, PlatformError, VcpuPlacement, VmIndex, VmSample,
};

/// Seconds of request arrivals a server queues before dropping (a client timeout).
const QUEUE_S: f64 = 1.0;

/// Simulation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Timeslice length, seconds (the report: a VM timeslice; 10 ms by default).
    pub timeslice_s: f64,
    /// Seed of the measurement noise.
    pub seed: u64,
    /// Relative standard deviation of the hardware counters the agent reads (0 = exact).
    pub counter_noise: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self { timeslice_s: 0.01, seed: 1, counter_noise: 0.01 }
    }
}

/// A VM to place on the simulated host.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Cores the vCPUs may run on (bit i = core i); `None` means every core.
    pub affinity: Option<u64>,
    /// What it runs.
    pub workload: Workload,
}

/// Why a host could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The class is invalid.
    #[error(transparent)]
    Class(#[from] ClassError),
    /// A workload is invalid.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// A VM does not fit the host or its workload.
    #[error("VM {vm}: {problem}")]
    Vm {
        /// The VM.
        vm: String,
        /// What is wrong.
        problem: String,
    },
}

/// How a phase ends.
#[derive(Debug, Clone, Copy)]
enum PhaseEnd {
    Instructions(f64),
    Duration(f64),
}

/// A phase compiled for a class: per-instruction quantities.
#[derive(Debug, Clone)]
struct PhaseRt {
    end: PhaseEnd,
    threads: usize,
    cpi: f64,
    stall_s: f64,
    /// Disk requests per instruction, and CPU cycles per instruction they cost.
    ios_per_instr: f64,
    io_cycles_per_instr: f64,
    /// Seconds a thread is blocked per instruction (closed-loop disk).
    blocked_s_per_instr: f64,
    read_share: f64,
    read_bytes: f64,
    write_bytes: f64,
    l2_per_instr: f64,
    l3_per_instr: f64,
    mem_per_instr: f64,
    dram_bytes_per_instr: f64,
    /// Open-loop serving: instructions arriving per second per thread, and per request.
    arrival_instr_per_s_per_thread: f64,
    instr_per_request: f64,
    rx_bytes: f64,
    rx_packets: f64,
    tx_bytes: f64,
    tx_packets: f64,
    serving: bool,
}

impl PhaseRt {
    fn compile(p: &workload::Phase, f_max: f64, vcpus: u32, vm: &str) -> Result<Self, SimError> {
        let err = |problem: String| SimError::Vm { vm: vm.into(), problem };
        if p.threads > vcpus {
            return Err(err(format!(
                "phase {:?} runs {} threads on {vcpus} vCPUs",
                p.name, p.threads
            )));
        }
        let stall_s = p.mem_stall_ns * 1e-9;
        let (mut ios, mut io_cycles, mut blocked, mut read_share, mut rb, mut wb) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        if let Some(d) = &p.disk {
            // Rates are given as reached alone at f_max; turn them into requests per instruction:
            // R = q / (t + q·(c_io/f + T_s))  =>  q = R·t / (1 − R·(c_io/f + T_s)).
            let rate = d.reads_per_s + d.writes_per_s;
            let t = p.cpi_core / f_max + stall_s;
            let per_io = d.cycles_per_io / f_max + d.service_time_s;
            let busy = rate * per_io;
            if busy >= 1.0 {
                return Err(err(format!(
                    "phase {:?}: {rate} disk requests/s at {per_io:.6} s each cannot fit in a second",
                    p.name
                )));
            }
            ios = if rate > 0.0 { rate * t / (1.0 - busy) } else { 0.0 };
            io_cycles = ios * d.cycles_per_io;
            blocked = ios * d.service_time_s;
            read_share = if rate > 0.0 { d.reads_per_s / rate } else { 0.0 };
            rb = d.read_bytes;
            wb = d.write_bytes;
        }
        let threads = p.threads as usize;
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let (arrival, per_req, rx_b, rx_p, tx_b, tx_p, serving) = match &p.network {
            Some(n) => {
                let per_req = n.cycles_per_request / p.cpi_core;
                (
                    n.requests_per_s * per_req / threads as f64,
                    per_req,
                    n.rx_bytes_per_request,
                    n.rx_packets_per_request,
                    n.tx_bytes_per_request,
                    n.tx_packets_per_request,
                    true,
                )
            }
            None => (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, false),
        };
        Ok(Self {
            end: match (p.instructions, p.duration_s) {
                (Some(n), _) => PhaseEnd::Instructions(n),
                (None, Some(d)) => PhaseEnd::Duration(d),
                (None, None) => return Err(err(format!("phase {:?} has no end", p.name))),
            },
            threads,
            cpi: p.cpi_core,
            stall_s,
            ios_per_instr: ios,
            io_cycles_per_instr: io_cycles,
            blocked_s_per_instr: blocked,
            read_share,
            read_bytes: rb,
            write_bytes: wb,
            l2_per_instr: p.l2_mpki * 1e-3,
            l3_per_instr: p.l3_mpki * 1e-3,
            mem_per_instr: p.mem_apki * 1e-3,
            dram_bytes_per_instr: p.dram_bytes_per_instruction,
            arrival_instr_per_s_per_thread: arrival,
            instr_per_request: per_req,
            rx_bytes: rx_b,
            rx_packets: rx_p,
            tx_bytes: tx_b,
            tx_packets: tx_p,
            serving,
        })
    }

    #[inline]
    fn busy_per_instr(&self, f: f64, contention: f64) -> f64 {
        physics::busy_seconds_per_instruction(
            self.cpi,
            self.stall_s,
            self.io_cycles_per_instr,
            f,
            contention,
        )
    }
}

/// Ground truth of one VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VmTruth {
    /// VM name.
    pub name: String,
    /// Workload name.
    pub workload: String,
    /// Instructions retired.
    pub instructions: f64,
    /// Core energy attributed to the VM's vCPUs (dynamic + leakage while they ran), joules.
    pub energy_j: f64,
    /// vCPU run time, summed over vCPUs, seconds.
    pub busy_s: f64,
    /// When its last phase ended, seconds since the host started (None while running).
    pub finished_at_s: Option<f64>,
    /// Requests offered and served (serving phases).
    pub requests_offered: f64,
    /// Requests served.
    pub requests_served: f64,
    /// Time spent in serving phases, seconds.
    pub serving_s: f64,
    /// Disk requests completed.
    pub disk_requests: f64,
    /// Per phase of the workload's definition (repetitions summed): the work each did.
    pub phases: Vec<PhaseTruth>,
}

/// What a VM did in one phase of its workload's definition, summed over its repetitions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PhaseTruth {
    /// Useful instructions: every instruction of a batch phase, the served requests'
    /// instructions of a serving phase. Requests served and disk requests completed are fixed
    /// multiples of it within a phase, so it measures the phase's work in any of those units.
    pub work: f64,
    /// Time spent in the phase, seconds.
    pub time_s: f64,
}

impl VmTruth {
    /// Served over offered requests (1 when it serves nothing).
    pub fn throughput_ratio(&self) -> f64 {
        if self.requests_offered > 0.0 { self.requests_served / self.requests_offered } else { 1.0 }
    }
}

/// Ground truth of the host so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SimReport {
    /// Hardware class.
    pub class: String,
    /// Simulated time, seconds.
    pub time_s: f64,
    /// Package energy (cores + uncore), joules.
    pub package_energy_j: f64,
    /// Uncore share of it, joules.
    pub uncore_energy_j: f64,
    /// Cores' share of it (package − uncore), joules: what a core-only meter would show.
    pub core_energy_j: f64,
    /// Per VM.
    pub vms: Vec<VmTruth>,
    /// Seconds each core spent at each P-state (core-major).
    pub residency_s: Vec<Vec<f64>>,
    /// P-state changes per core.
    pub transitions: Vec<u64>,
}

impl SimReport {
    /// Mean package power, watts.
    pub fn average_power_w(&self) -> f64 {
        if self.time_s > 0.0 { self.package_energy_j / self.time_s } else { 0.0 }
    }
}

#[derive(Debug, Clone, Default)]
struct StepAcc {
    /// The phase that ran this slice.
    phase: usize,
    instr: f64,
    cycles: f64,
    run_s: f64,
    max_vcpu_run_s: f64,
    energy_j: f64,
    served_instr: f64,
}

#[derive(Debug, Clone)]
struct VmRt {
    /// Host time at which the VM appears, seconds.
    start_s: f64,
    vcpus: usize,
    affinity: u64,
    phases: Vec<PhaseRt>,
    /// Phases in the workload's definition (`phases` holds its repetitions in turn).
    distinct: usize,
    phase: usize,
    phase_done: f64,
    follow: Option<usize>,
    vcpu_core: Vec<usize>,
    /// Instructions of requests that arrived and wait to be served (serving phases).
    backlog_instr: f64,
    acc: StepAcc,
    /// Fractional event counts carried between slices, so reported counts are integers with
    /// exact long-run totals: reads, writes, rx packets, tx packets.
    carry: [f64; 4],
    truth: VmTruth,
}

impl VmRt {
    fn finished(&self) -> bool {
        self.phase >= self.phases.len()
    }
}

#[derive(Debug, Clone)]
struct CoreRt {
    set: usize,
    actual: usize,
    residency: Vec<f64>,
    transitions: u64,
    /// Capacity left while placing this slice.
    free: f64,
    busy: f64,
    freq_time: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Run,
    Switch,
    Idle,
}

/// A stretch of one core's slice.
#[derive(Debug, Clone, Copy)]
struct Piece {
    core: usize,
    start: f64,
    end: f64,
    pstate: usize,
    kind: Kind,
    /// The vCPU's VM (Run and Switch pieces).
    vm: usize,
    /// Fraction of run time stalled on memory (set once contention is known).
    stalled: f64,
}

#[derive(Debug, Clone, Copy)]
struct Want {
    /// Placement order: affinity width, mask, last core, VM, vCPU (see [`Want::key`]).
    key: u128,
    vm: usize,
    vcpu: usize,
    want: f64,
    share: f64,
}

/// The state a slice starts from, as [`SimHost::slice_state`] records it.
#[derive(Debug, Clone, Default)]
pub struct SliceState {
    contention: f64,
    /// Per core: its setting and the P-state it is at.
    cores: Vec<(usize, usize)>,
    /// Per VM: phase, followed P-state, affinity, queued instructions.
    vms: Vec<(usize, Option<usize>, u64, f64)>,
    vcpu_cores: Vec<usize>,
}

impl SliceState {
    /// True when `self` and `other` would run alike: everything discrete equal, the bandwidth
    /// factor within 1e-12 relative and the queues within 1e-12 relative or a millionth of an
    /// instruction (rounding leaves a server's emptied queue at 0 or at 1e-9).
    pub fn repeats(&self, other: &Self) -> bool {
        let close = |a: f64, b: f64, abs: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs()) + abs;
        close(self.contention, other.contention, 0.0)
            && self.cores == other.cores
            && self.vcpu_cores == other.vcpu_cores
            && self.vms.len() == other.vms.len()
            && self
                .vms
                .iter()
                .zip(&other.vms)
                .all(|(a, b)| (a.0, a.1, a.2) == (b.0, b.1, b.2) && close(a.3, b.3, 1e-6))
    }
}

impl Want {
    /// The tuple `(mask.count_ones(), mask, core, vm, vcpu)` packed into one integer that sorts
    /// the same (7 + 64 + 6 + 45 + 6 bits: a core and a vCPU index are below 64).
    fn key(mask: u64, core: usize, vm: usize, vcpu: usize) -> u128 {
        debug_assert!(core < 64 && vcpu < 64 && vm < 1 << 45);
        (u128::from(mask.count_ones()) << 121)
            | (u128::from(mask) << 57)
            | ((core as u128) << 51)
            | ((vm as u128) << 6)
            | vcpu as u128
    }
}

/// The simulated host.
#[derive(Debug, Clone)]
pub struct SimHost {
    class: HardwareClass,
    table: PStateTable,
    freqs: Vec<f64>,
    volts: Vec<f64>,
    config: SimConfig,
    rng: ChaCha8Rng,
    time_s: f64,
    cores: Vec<CoreRt>,
    vms: Vec<VmRt>,
    contention: f64,
    package_energy_j: f64,
    uncore_energy_j: f64,
    // Per-slice scratch, kept to avoid allocating on every step.
    wants: Vec<Want>,
    group_wants: Vec<f64>,
    group_shares: Vec<f64>,
    segments: Vec<(usize, usize, f64)>,
    pieces: Vec<Piece>,
    /// Index of each core's first piece (pieces are grouped by core, in time order), plus the end.
    core_first: Vec<usize>,
    cursor: Vec<usize>,
    bounds: Vec<f64>,
    demand_terms: Vec<(f64, f64, f64)>,
    /// The last demand solved for, and its bandwidth factor (None before the first).
    solved_terms: Vec<(f64, f64, f64)>,
    solved_contention: Option<f64>,
    /// Per P-state: leakage watts at its voltage; per (voltage P-state, frequency P-state):
    /// `C_eff · V² · f`, the dynamic watts at activity 1 (row-major), as [`physics`] computes
    /// them.
    leak_w: Vec<f64>,
    dynamic_w: Vec<f64>,
    sample: HostSample,
}

impl SimHost {
    /// A host of `class` running `vms`.
    pub fn new(
        class: HardwareClass,
        vms: Vec<VmSpec>,
        config: SimConfig,
    ) -> Result<Self, SimError> {
        class.validate()?;
        let table = class.pstate_table()?;
        let freqs: Vec<f64> = table.as_slice().iter().map(|p| p.frequency_hz).collect();
        let volts: Vec<f64> = table.as_slice().iter().map(|p| p.voltage_v.unwrap_or(1.0)).collect();
        let f_max = table.max_frequency_hz();
        if !(config.timeslice_s.is_finite()
            && config.timeslice_s > 0.0
            && config.timeslice_s <= 1.0)
        {
            return Err(SimError::Vm {
                vm: "-".into(),
                problem: format!("timeslice {} s must be in (0, 1]", config.timeslice_s),
            });
        }
        let mut rts = Vec::with_capacity(vms.len());
        for spec in vms {
            rts.push(Self::compile_vm(spec, f_max, class.cores)?);
        }
        let top = table.max_index();
        let power = &class.power;
        let leak_w = volts.iter().map(|&v| physics::leakage_watts(power, v)).collect();
        let dynamic_w = volts
            .iter()
            .flat_map(|&v| freqs.iter().map(move |&f| physics::dynamic_watts(power, v, f, 1.0)))
            .collect();
        let cores = (0..class.cores)
            .map(|_| CoreRt {
                set: top,
                actual: top,
                residency: vec![0.0; table.len()],
                transitions: 0,
                free: 1.0,
                busy: 0.0,
                freq_time: 0.0,
            })
            .collect();
        Ok(Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            class,
            table,
            freqs,
            volts,
            config,
            time_s: 0.0,
            cores,
            vms: rts,
            contention: 1.0,
            package_energy_j: 0.0,
            uncore_energy_j: 0.0,
            wants: Vec::new(),
            group_wants: Vec::new(),
            group_shares: Vec::new(),
            segments: Vec::new(),
            pieces: Vec::new(),
            core_first: Vec::new(),
            cursor: Vec::new(),
            bounds: Vec::new(),
            demand_terms: Vec::new(),
            solved_terms: Vec::new(),
            solved_contention: None,
            leak_w,
            dynamic_w,
            sample: HostSample::default(),
        })
    }

    fn compile_vm(spec: VmSpec, f_max: f64, cores: usize) -> Result<VmRt, SimError> {
        spec.workload.validate()?;
        let all_cores = if cores == 64 { u64::MAX } else { (1u64 << cores) - 1 };
        let err = |problem: String| SimError::Vm { vm: spec.name.clone(), problem };
        if spec.vcpus == 0 || spec.vcpus > 64 {
            return Err(err(format!("{} vCPUs; a VM has 1 to 64", spec.vcpus)));
        }
        let affinity = spec.affinity.unwrap_or(all_cores) & all_cores;
        if affinity == 0 {
            return Err(err(format!(
                "affinity {:#x} names no core of this {cores}-core host",
                spec.affinity.unwrap_or(0)
            )));
        }
        let phases = spec
            .workload
            .phase_sequence()
            .map(|p| PhaseRt::compile(p, f_max, spec.vcpus, &spec.name))
            .collect::<Result<Vec<_>, _>>()?;
        let first_core = affinity.trailing_zeros() as usize;
        Ok(VmRt {
            start_s: 0.0,
            vcpus: spec.vcpus as usize,
            affinity,
            distinct: spec.workload.phases.len(),
            phases,
            phase: 0,
            phase_done: 0.0,
            follow: None,
            vcpu_core: vec![first_core; spec.vcpus as usize],
            backlog_instr: 0.0,
            acc: StepAcc::default(),
            carry: [0.0; 4],
            truth: VmTruth {
                name: spec.name,
                workload: spec.workload.name,
                phases: vec![PhaseTruth::default(); spec.workload.phases.len()],
                ..VmTruth::default()
            },
        })
    }

    /// Starts a VM on the running host (it appears, as a VM does when QEMU starts).
    pub fn add_vm(&mut self, spec: VmSpec) -> Result<VmIndex, SimError> {
        self.add_vm_at(spec, self.time_s)
    }

    /// Adds a VM that appears at host time `start_s` (seconds).
    pub fn add_vm_at(&mut self, spec: VmSpec, start_s: f64) -> Result<VmIndex, SimError> {
        let mut vm = Self::compile_vm(spec, self.table.max_frequency_hz(), self.cores.len())?;
        vm.start_s = start_s;
        self.vms.push(vm);
        Ok(self.vms.len() - 1)
    }

    /// True once VM `vm` has appeared (and also after it finished).
    pub fn vm_started(&self, vm: VmIndex) -> bool {
        self.vms.get(vm).is_some_and(|v| v.start_s <= self.time_s + 1e-12)
    }

    /// A VM's name, vCPUs and affinity.
    pub fn vm_spec(&self, vm: VmIndex) -> Option<(&str, usize, u64)> {
        self.vms.get(vm).map(|v| (v.truth.name.as_str(), v.vcpus, v.affinity))
    }

    /// Restricts a VM's vCPUs to the cores in `mask`.
    pub fn set_vm_affinity(&mut self, vm: VmIndex, mask: u64) -> Result<(), PlatformError> {
        let cores = self.cores.len();
        let all = if cores == 64 { u64::MAX } else { (1u64 << cores) - 1 };
        if mask & all == 0 {
            return Err(PlatformError::NoSuchCore { core: mask.trailing_zeros() as usize, cores });
        }
        self.vms.get_mut(vm).ok_or(PlatformError::NoSuchVm(vm))?.affinity = mask & all;
        Ok(())
    }

    /// The hardware class.
    pub const fn class(&self) -> &HardwareClass {
        &self.class
    }

    /// Simulated time, seconds.
    pub const fn time_s(&self) -> f64 {
        self.time_s
    }

    /// The settings.
    pub const fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Turns measurement noise off (the oracle evaluates the physics itself).
    pub fn set_counter_noise(&mut self, noise: f64) {
        self.config.counter_noise = noise;
    }

    /// Number of VMs (finished ones included).
    pub fn vm_count(&self) -> usize {
        self.vms.len()
    }

    /// True when every VM has finished its workload.
    pub fn all_finished(&self) -> bool {
        self.vms.iter().all(VmRt::finished)
    }

    /// True when VM `vm` has finished.
    pub fn vm_finished(&self, vm: VmIndex) -> bool {
        self.vms.get(vm).is_none_or(VmRt::finished)
    }

    /// The phase VM `vm` is in (equal to its phase count once finished).
    pub fn vm_phase(&self, vm: VmIndex) -> usize {
        self.vms.get(vm).map_or(0, |v| v.phase)
    }

    /// The P-state VM `vm` follows, if any.
    pub fn vm_pstate(&self, vm: VmIndex) -> Option<usize> {
        self.vms.get(vm).and_then(|v| v.follow)
    }

    /// Progress of VM `vm` in its current phase: instructions (batch) or seconds (duration).
    pub fn vm_phase_progress(&self, vm: VmIndex) -> f64 {
        self.vms.get(vm).map_or(0.0, |v| v.phase_done)
    }

    /// True when VM `vm`'s current phase serves requests (its target is throughput).
    pub fn vm_serving(&self, vm: VmIndex) -> bool {
        self.vms.get(vm).and_then(|v| v.phases.get(v.phase)).is_some_and(|p| p.serving)
    }

    /// Records in `into` the state the next slice starts from, apart from the clock and what
    /// only accumulates (energies, truths, progress within a phase): the settings, the phases,
    /// where each vCPU last ran, servers' queues and the bandwidth factor. Two slices that start
    /// from states that [`SliceState::repeats`] do the same work at the same energy, as long
    /// as no phase ends and no VM appears between them ([`Self::slices_before_event`]): the
    /// oracle fast-forwards a stationary host with it.
    pub fn slice_state(&self, into: &mut SliceState) {
        into.contention = self.contention;
        into.cores.clear();
        into.cores.extend(self.cores.iter().map(|c| (c.set, c.actual)));
        into.vms.clear();
        into.vms.extend(self.vms.iter().map(|v| (v.phase, v.follow, v.affinity, v.backlog_instr)));
        into.vcpu_cores.clear();
        for v in &self.vms {
            into.vcpu_cores.extend_from_slice(&v.vcpu_core);
        }
    }

    /// Whole slices from now before a VM appears or some VM's phase ends, if every running VM
    /// keeps the pace of the last slice (0 when a phase changed in the last slice).
    pub fn slices_before_event(&self) -> f64 {
        let dt = self.config.timeslice_s;
        let mut slices = f64::INFINITY;
        for vm in &self.vms {
            if vm.finished() {
                continue;
            }
            if vm.start_s > self.time_s + 1e-12 {
                slices = slices.min(((vm.start_s - self.time_s) / dt).floor());
                continue;
            }
            if vm.acc.phase != vm.phase {
                return 0.0;
            }
            let left = match vm.phases[vm.phase].end {
                PhaseEnd::Instructions(n) if vm.acc.instr > 0.0 => {
                    (n - vm.phase_done) / vm.acc.instr
                }
                PhaseEnd::Instructions(_) => f64::INFINITY,
                PhaseEnd::Duration(d) => (d - 1e-9 - vm.phase_done) / dt,
            };
            slices = slices.min(left.floor().max(0.0));
        }
        slices
    }

    /// A copy of the host, without measurement noise, in which only `vm` still runs: what it
    /// would do alone.
    #[must_use]
    pub fn isolated(&self, vm: VmIndex) -> Self {
        let mut h = self.clone();
        h.config.counter_noise = 0.0;
        for (i, v) in h.vms.iter_mut().enumerate() {
            if i != vm {
                v.phase = v.phases.len();
            }
        }
        h
    }

    /// Ground truth so far.
    pub fn report(&self) -> SimReport {
        SimReport {
            class: self.class.name.clone(),
            time_s: self.time_s,
            package_energy_j: self.package_energy_j,
            uncore_energy_j: self.uncore_energy_j,
            core_energy_j: self.package_energy_j - self.uncore_energy_j,
            vms: self.vms.iter().map(|v| v.truth.clone()).collect(),
            residency_s: self.cores.iter().map(|c| c.residency.clone()).collect(),
            transitions: self.cores.iter().map(|c| c.transitions).collect(),
        }
    }

    /// Truth of one VM.
    pub fn vm_truth(&self, vm: VmIndex) -> Option<&VmTruth> {
        self.vms.get(vm).map(|v| &v.truth)
    }

    /// Package energy so far, joules.
    pub const fn package_energy_j(&self) -> f64 {
        self.package_energy_j
    }

    /// The last slice's sample.
    pub const fn last_sample(&self) -> &HostSample {
        &self.sample
    }

    /// Takes the last slice's sample out (so a governor can read it while it sets frequencies
    /// on the host); hand it back with [`Self::return_sample`] to reuse its buffers.
    pub fn take_sample(&mut self) -> HostSample {
        std::mem::take(&mut self.sample)
    }

    /// Gives back a sample taken with [`Self::take_sample`].
    pub fn return_sample(&mut self, sample: HostSample) {
        self.sample = sample;
    }

    /// Advances one timeslice and returns what the agent would measure over it.
    pub fn step(&mut self) -> &HostSample {
        let dt = self.config.timeslice_s;
        self.collect_wants(dt);
        self.place();
        self.lay_out_cores(dt);
        self.contention = self.solve_contention(dt);
        self.execute();
        let (core_j, dram_bytes) = self.integrate_power();
        let uncore_j = (self.class.power.uncore_watts
            + self.class.power.uncore_watts_per_gbps * dram_bytes / dt / 1e9)
            * dt;
        self.uncore_energy_j += uncore_j;
        self.package_energy_j += core_j + uncore_j;
        self.time_s += dt;
        self.finish_step(dt);
        self.emit_sample(dt, core_j + uncore_j);
        &self.sample
    }

    fn vcpu_frequency_hint(&self, vm: &VmRt, vcpu: usize) -> f64 {
        let p = vm.follow.unwrap_or_else(|| self.cores[vm.vcpu_core[vcpu]].set);
        self.freqs[p]
    }

    /// (1) How much of the slice each busy vCPU wants.
    fn collect_wants(&mut self, dt: f64) {
        self.wants.clear();
        let now = self.time_s + 1e-12;
        for (i, vm) in self.vms.iter().enumerate() {
            if vm.finished() || vm.start_s > now {
                continue;
            }
            let ph = &vm.phases[vm.phase];
            for vcpu in 0..ph.threads.min(vm.vcpus) {
                let f = self.vcpu_frequency_hint(vm, vcpu);
                let b = ph.busy_per_instr(f, self.contention);
                #[allow(clippy::cast_precision_loss, reason = "small counts")]
                let want = if ph.serving {
                    let pending = ph.arrival_instr_per_s_per_thread * dt
                        + vm.backlog_instr / ph.threads as f64;
                    (pending * b / dt).min(1.0)
                } else if ph.blocked_s_per_instr > 0.0 {
                    b / (b + ph.blocked_s_per_instr)
                } else {
                    1.0
                };
                let key = Want::key(vm.affinity, vm.vcpu_core[vcpu], i, vcpu);
                self.wants.push(Want { key, vm: i, vcpu, want, share: 0.0 });
            }
        }
    }

    /// (2) Fair shares per affinity group, packed onto the group's cores (McNaughton).
    fn place(&mut self) {
        for c in &mut self.cores {
            c.free = 1.0;
        }
        self.segments.clear();
        // Groups by affinity mask, narrowest first, so pinned vCPUs get their cores before
        // vCPUs that could go anywhere.
        // Keys are unique (they end with the VM and vCPU), so an unstable sort is exact.
        self.wants.sort_unstable_by_key(|w| w.key);
        let mut start = 0;
        while start < self.wants.len() {
            let mask = self.vms[self.wants[start].vm].affinity;
            let end = start
                + self.wants[start..]
                    .iter()
                    .take_while(|w| self.vms[w.vm].affinity == mask)
                    .count();
            let capacity: f64 = (0..self.cores.len())
                .filter(|c| mask & (1 << c) != 0)
                .map(|c| self.cores[c].free)
                .sum();
            self.group_wants.clear();
            self.group_wants.extend(self.wants[start..end].iter().map(|w| w.want));
            self.group_shares.clear();
            self.group_shares.resize(end - start, 0.0);
            physics::fair_shares(&self.group_wants, capacity, &mut self.group_shares);
            let mut core = 0;
            for (k, w) in self.wants[start..end].iter_mut().enumerate() {
                w.share = self.group_shares[k];
                let mut left = w.share;
                while left > 1e-12 {
                    while core < self.cores.len()
                        && (mask & (1 << core) == 0 || self.cores[core].free <= 1e-12)
                    {
                        core += 1;
                    }
                    let Some(c) = self.cores.get_mut(core) else { break };
                    let take = left.min(c.free);
                    c.free -= take;
                    left -= take;
                    self.segments.push((core, start + k, take));
                }
            }
            start = end;
        }
        // Remember where each vCPU ran most, for stickiness and frequency hints.
        for &(core, k, _) in &self.segments {
            let w = self.wants[k];
            self.vms[w.vm].vcpu_core[w.vcpu] = core;
        }
    }

    /// (3) Each core's slice as pieces, with transitions where the P-state changes.
    fn lay_out_cores(&mut self, dt: f64) {
        self.pieces.clear();
        self.core_first.clear();
        if !self.segments.is_sorted_by_key(|s| s.0) {
            self.segments.sort_by_key(|s| s.0);
        }
        let dvfs = &self.class.dvfs;
        let mut seg = 0;
        for (ci, core) in self.cores.iter_mut().enumerate() {
            self.core_first.push(self.pieces.len());
            let mut t = 0.0;
            let mut cur = core.actual;
            while seg < self.segments.len() && self.segments[seg].0 == ci {
                let (_, k, share) = self.segments[seg];
                seg += 1;
                let w = self.wants[k];
                let target = self.vms[w.vm].follow.unwrap_or(core.set);
                let mut left = share * dt;
                let push = |kind, p, d: f64, t: &mut f64, pieces: &mut Vec<Piece>| {
                    if d > 0.0 {
                        pieces.push(Piece {
                            core: ci,
                            start: *t,
                            end: *t + d,
                            pstate: p,
                            kind,
                            vm: w.vm,
                            stalled: 0.0,
                        });
                        *t += d;
                    }
                };
                if target != cur {
                    let delay = dvfs.delay_s.min(left);
                    push(Kind::Run, cur, delay, &mut t, &mut self.pieces);
                    left -= delay;
                    if left > 0.0 {
                        let mut stall = dvfs.stall_s;
                        if (self.volts[target] - self.volts[cur]).abs() > 1e-9 {
                            stall += dvfs.voltage_stall_s;
                        }
                        let stall = stall.min(left);
                        push(Kind::Switch, target, stall, &mut t, &mut self.pieces);
                        left -= stall;
                        cur = target;
                        core.transitions += 1;
                    }
                }
                push(Kind::Run, cur, left, &mut t, &mut self.pieces);
            }
            core.busy = (t / dt).min(1.0);
            // Idle time runs at the core's own setting; a core busy all slice never gets there.
            if dt - t > 1e-12 {
                if core.set != cur {
                    cur = core.set;
                    core.transitions += 1;
                }
                self.pieces.push(Piece {
                    core: ci,
                    start: t,
                    end: dt,
                    pstate: cur,
                    kind: Kind::Idle,
                    vm: usize::MAX,
                    stalled: 0.0,
                });
            }
            core.actual = cur;
        }
        self.core_first.push(self.pieces.len());
    }

    /// (4) The bandwidth queueing factor for this slice.
    fn solve_contention(&mut self, dt: f64) -> f64 {
        // Demand is Σ k / (a + s·c) over run pieces: precompute k, a and s once per slice.
        self.demand_terms.clear();
        for p in self.pieces.iter().filter(|p| p.kind == Kind::Run) {
            let vm = &self.vms[p.vm];
            let ph = &vm.phases[vm.phase];
            if ph.dram_bytes_per_instr > 0.0 {
                let f = self.freqs[p.pstate];
                let k = ph.dram_bytes_per_instr * (p.end - p.start) / dt;
                self.demand_terms.push((k, (ph.cpi + ph.io_cycles_per_instr) / f, ph.stall_s));
            }
        }
        // A slice that demands what the last one did gets the same factor (a stationary host
        // solves it once).
        if let Some(c) = self.solved_contention
            && self.solved_terms == self.demand_terms
        {
            return c;
        }
        let terms = &self.demand_terms;
        let demand = |c: f64| terms.iter().map(|(k, a, s)| k / (a + s * c)).sum::<f64>();
        let c = physics::bandwidth_contention(self.class.memory_bandwidth_bytes_per_s, demand);
        self.solved_terms.clone_from(&self.demand_terms);
        self.solved_contention = Some(c);
        c
    }

    /// (5) Instructions and cycles of every run piece.
    fn execute(&mut self) {
        for vm in &mut self.vms {
            vm.acc = StepAcc { phase: vm.phase.min(vm.phases.len() - 1), ..StepAcc::default() };
        }
        let dt = self.config.timeslice_s;
        for w in &self.wants {
            let acc = &mut self.vms[w.vm].acc;
            acc.max_vcpu_run_s = acc.max_vcpu_run_s.max(w.share * dt);
        }
        let c = self.contention;
        for p in &mut self.pieces {
            if p.kind == Kind::Idle {
                continue;
            }
            let d = p.end - p.start;
            let vm = &mut self.vms[p.vm];
            vm.acc.run_s += d;
            if p.kind == Kind::Switch {
                continue;
            }
            let ph = &vm.phases[vm.phase];
            let f = self.freqs[p.pstate];
            let b = ph.busy_per_instr(f, c);
            p.stalled = ph.stall_s * c / b;
            vm.acc.instr += d / b;
            vm.acc.cycles += d * f;
        }
    }

    /// (6) Energy of every piece; returns the cores' energy (J) and the DRAM traffic (bytes).
    fn integrate_power(&mut self) -> (f64, f64) {
        let power = &self.class.power;
        let n = self.freqs.len();
        let (dynamic_w, leak_w) = (&self.dynamic_w, &self.leak_w);
        // `physics::dynamic_watts + physics::leakage_watts × fraction` at the voltage of P-state
        // `vi`, from the tables (the same products in the same order).
        let piece_power = |p: &Piece, vi: usize| {
            let (activity, leak_fraction) = match p.kind {
                Kind::Run => (physics::running_activity(power, p.stalled), 1.0),
                Kind::Switch => (power.idle_activity, 1.0),
                Kind::Idle => (power.idle_activity, power.idle_leakage_fraction),
            };
            dynamic_w[vi * n + p.pstate] * activity + leak_w[vi] * leak_fraction
        };
        let mut total = 0.0;
        match self.class.voltage_domain {
            VoltageDomain::PerCore => {
                for p in &self.pieces {
                    let e = piece_power(p, p.pstate) * (p.end - p.start);
                    total += e;
                    if p.kind != Kind::Idle {
                        self.vms[p.vm].acc.energy_j += e;
                    }
                }
            }
            VoltageDomain::Shared => {
                // The plane follows the fastest core's P-state at every instant: sweep the
                // slice over every piece boundary.
                self.bounds.clear();
                self.bounds.extend(self.pieces.iter().map(|p| p.end));
                self.bounds.sort_unstable_by(f64::total_cmp);
                self.bounds.dedup_by(|a, b| (*a - *b).abs() < 1e-15);
                let cores = self.cores.len();
                self.cursor.clear();
                self.cursor.extend_from_slice(&self.core_first[..cores]);
                let mut t0 = 0.0;
                for &t1 in &self.bounds {
                    if t1 - t0 <= 1e-15 {
                        continue;
                    }
                    let mid = 0.5 * (t0 + t1);
                    // Each core's pieces tile its slice in time order: advance its cursor to the
                    // piece covering this interval.
                    let (mut v, mut vi): (f64, usize) = (0.0, 0);
                    for c in 0..cores {
                        let end = self.core_first[c + 1];
                        while self.cursor[c] + 1 < end && self.pieces[self.cursor[c]].end <= mid {
                            self.cursor[c] += 1;
                        }
                        if self.cursor[c] < end {
                            let pi = self.pieces[self.cursor[c]].pstate;
                            if self.volts[pi] > v {
                                (v, vi) = (self.volts[pi], pi);
                            }
                        }
                    }
                    for c in 0..cores {
                        if self.cursor[c] >= self.core_first[c + 1] {
                            continue;
                        }
                        let p = &self.pieces[self.cursor[c]];
                        let e = piece_power(p, vi) * (t1 - t0);
                        total += e;
                        if p.kind != Kind::Idle {
                            self.vms[p.vm].acc.energy_j += e;
                        }
                    }
                    t0 = t1;
                }
            }
        }
        for core in &mut self.cores {
            core.freq_time = 0.0;
        }
        for p in &self.pieces {
            let core = &mut self.cores[p.core];
            core.residency[p.pstate] += p.end - p.start;
            core.freq_time += self.freqs[p.pstate] * (p.end - p.start);
        }
        let dram = self
            .vms
            .iter()
            .filter(|v| !v.finished())
            .map(|v| v.acc.instr * v.phases[v.phase].dram_bytes_per_instr)
            .sum();
        (total, dram)
    }

    /// Advances phases and truths.
    fn finish_step(&mut self, dt: f64) {
        let now = self.time_s;
        for vm in &mut self.vms {
            if vm.finished() || vm.start_s > now - dt + 1e-12 {
                continue;
            }
            let ph = &vm.phases[vm.phase];
            let mut acc = vm.acc.clone();
            if ph.serving {
                // Requests wait in the server's queue while the vCPUs are busy or switching;
                // past QUEUE_S seconds of arrivals they are dropped (the client times out).
                #[allow(clippy::cast_precision_loss, reason = "small counts")]
                let rate = ph.arrival_instr_per_s_per_thread * ph.threads as f64;
                let arrived = rate * dt;
                let pending = vm.backlog_instr + arrived;
                acc.served_instr = acc.instr.min(pending);
                acc.instr = acc.served_instr;
                vm.backlog_instr = (pending - acc.served_instr).min(rate * QUEUE_S);
                vm.truth.requests_offered += arrived / ph.instr_per_request;
                vm.truth.requests_served += acc.served_instr / ph.instr_per_request;
                vm.truth.serving_s += dt;
            }
            let mut fraction = 1.0;
            match ph.end {
                PhaseEnd::Instructions(n) => {
                    let left = n - vm.phase_done;
                    if acc.instr >= left {
                        fraction = if acc.instr > 0.0 { left / acc.instr } else { 1.0 };
                        vm.phase_done = n;
                    } else {
                        vm.phase_done += acc.instr;
                    }
                }
                PhaseEnd::Duration(_) => vm.phase_done += dt,
            }
            acc.instr *= fraction;
            acc.cycles *= fraction;
            vm.truth.instructions += acc.instr;
            vm.truth.busy_s += acc.run_s;
            vm.truth.energy_j += acc.energy_j;
            vm.truth.disk_requests += acc.instr * ph.ios_per_instr;
            let phase = &mut vm.truth.phases[vm.phase % vm.distinct];
            phase.work += acc.instr;
            phase.time_s += dt * fraction;
            let ended = match ph.end {
                PhaseEnd::Instructions(n) => vm.phase_done >= n,
                PhaseEnd::Duration(d) => vm.phase_done >= d - 1e-9,
            };
            vm.acc = acc;
            if ended {
                vm.phase += 1;
                vm.phase_done = 0.0;
                // Requests still queued when a phase ends are dropped (their clients time out):
                // every phase's requests are served in that phase or never, which keeps each
                // phase's work its own (`measure` and `bound` count work phase by phase).
                vm.backlog_instr = 0.0;
                if vm.finished() {
                    vm.truth.finished_at_s = Some(now - dt * (1.0 - fraction));
                }
            }
        }
    }

    /// What the agent would read: counter deltas with noise, the package meter.
    fn emit_sample(&mut self, dt: f64, package_j: f64) {
        let sigma = self.config.counter_noise;
        self.sample.time_s = self.time_s;
        self.sample.timeslice_s = dt;
        self.sample.cores.clear();
        for c in &self.cores {
            self.sample.cores.push(CoreSample {
                busy: c.busy,
                pstate: c.set,
                mean_frequency_hz: c.freq_time / dt,
            });
        }
        self.sample.vms.clear();
        let started = self.time_s - dt + 1e-12;
        for (i, vm) in self.vms.iter_mut().enumerate() {
            if vm.start_s > started {
                continue;
            }
            let acc = &vm.acc;
            let ph = &vm.phases[acc.phase];
            let mut noisy = |x: f64| -> u64 {
                let z: f64 = if sigma > 0.0 { StandardNormal.sample(&mut self.rng) } else { 0.0 };
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "clamped to >= 0"
                )]
                let v = round_to_u64((x * (1.0 + sigma * z)).max(0.0));
                v
            };
            let instructions = noisy(acc.instr);
            let cycles = noisy(acc.cycles);
            let l2 = noisy(acc.instr * ph.l2_per_instr);
            let l3 = noisy(acc.instr * ph.l3_per_instr);
            let mem = noisy(acc.instr * ph.mem_per_instr);
            let ios = acc.instr * ph.ios_per_instr;
            let requests = if ph.serving { acc.instr / ph.instr_per_request } else { 0.0 };
            let mut count = |slot: usize, x: f64| -> u64 {
                vm.carry[slot] += x;
                let whole = floor_non_negative(vm.carry[slot]);
                vm.carry[slot] -= whole;
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "non-negative"
                )]
                let n = whole as u64;
                n
            };
            let reads = count(0, ios * ph.read_share);
            let writes = count(1, ios * (1.0 - ph.read_share));
            let rx = count(2, requests * ph.rx_packets);
            let tx = count(3, requests * ph.tx_packets);
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "non-negative, small"
            )]
            let counters = RawCounters {
                timeslice_seconds: dt,
                instructions,
                cycles,
                l2_misses: l2,
                l3_misses: l3,
                memory_accesses: mem,
                disk_reads: reads,
                disk_read_bytes: (reads as f64 * ph.read_bytes) as u64,
                disk_writes: writes,
                disk_write_bytes: (writes as f64 * ph.write_bytes) as u64,
                packets_rx: rx,
                bytes_rx: (requests * ph.rx_bytes) as u64,
                packets_tx: tx,
                bytes_tx: (requests * ph.tx_bytes) as u64,
                cpu_time_ns: (acc.run_s * 1e9) as u64,
                vcpus: u32::try_from(vm.vcpus).unwrap_or(u32::MAX),
                energy_joules: None,
                unavailable: vmgov_proto::CounterSet::EMPTY,
            };
            #[allow(clippy::cast_precision_loss, reason = "small counts")]
            let busy = acc.run_s / (dt * vm.vcpus as f64);
            let max_vcpu_busy = (acc.max_vcpu_run_s / dt).min(1.0);
            self.sample.vms.push(VmSample {
                vm: i,
                counters,
                busy,
                max_vcpu_busy,
                finished: vm.finished(),
            });
        }
        self.sample.package_energy_j = Some(package_j);
        self.sample.placement.clear();
        for &(core, k, share) in &self.segments {
            let w = self.wants[k];
            self.sample.placement.push(VcpuPlacement { vm: w.vm, vcpu: w.vcpu, core, share });
        }
    }
}

/// `x.round() as u64` for `x >= 0`, without a call to libm below 2^52: `x − trunc(x)` is exact
/// there, so comparing it with one half rounds half away from zero as `round` does.
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "0 <= x < 2^52 on the fast path"
)]
fn round_to_u64(x: f64) -> u64 {
    if (0.0..4_503_599_627_370_496.0).contains(&x) {
        let whole = x as u64;
        if x - whole as f64 >= 0.5 { whole + 1 } else { whole }
    } else {
        x.round() as u64
    }
}

/// `x.floor()` for `x >= 0`, without a call to libm below 2^52 (truncation is the floor there).
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "0 <= x < 2^52 on the fast path"
)]
fn floor_non_negative(x: f64) -> f64 {
    if (0.0..4_503_599_627_370_496.0).contains(&x) { (x as u64) as f64 } else { x.floor() }
}

impl FrequencyControl for SimHost {
    fn pstates(&self) -> &PStateTable {
        &self.table
    }

    fn core_count(&self) -> usize {
        self.cores.len()
    }

    fn core_pstate(&self, core: usize) -> Result<usize, PlatformError> {
        self.cores
            .get(core)
            .map(|c| c.set)
            .ok_or(PlatformError::NoSuchCore { core, cores: self.cores.len() })
    }

    fn set_core_pstate(&mut self, core: usize, pstate: usize) -> Result<(), PlatformError> {
        let len = self.table.len();
        if pstate >= len {
            return Err(PlatformError::NoSuchPState { pstate, len });
        }
        let cores = self.cores.len();
        self.cores.get_mut(core).ok_or(PlatformError::NoSuchCore { core, cores })?.set = pstate;
        Ok(())
    }

    fn set_vm_pstate(&mut self, vm: VmIndex, pstate: Option<usize>) -> Result<(), PlatformError> {
        let len = self.table.len();
        if let Some(p) = pstate
            && p >= len
        {
            return Err(PlatformError::NoSuchPState { pstate: p, len });
        }
        self.vms.get_mut(vm).ok_or(PlatformError::NoSuchVm(vm))?.follow = pstate;
        Ok(())
    }
}

/// Why a definition named by built-in name or by file path could not be read.
pub(crate) enum DefinitionRead {
    /// A bare word that is no file: it was meant as a built-in name, and is none.
    Unknown,
    /// The file could not be read.
    Io(std::io::Error),
}

/// Reads the definition file `name_or_path` (the caller has already ruled out built-in names).
pub(crate) fn read_definition(name_or_path: &str) -> Result<String, DefinitionRead> {
    let path = std::path::Path::new(name_or_path);
    std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound
            && path.components().count() == 1
            && path.extension().is_none_or(|e| e != "toml")
        {
            DefinitionRead::Unknown
        } else {
            DefinitionRead::Io(source)
        }
    })
}

#[cfg(test)]
mod tests;
