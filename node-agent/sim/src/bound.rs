//! The whole-run energy bound: the least package energy per unit of work (joules per reference
//! second, `E / W` as in [`crate::measure`]) that *any* policy could reach on the simulated host
//! with every VM meeting its thresholds over the whole run, when P-states may change at any slice
//! and time may be split freely between them. It is the floor the lab measures policies against:
//! the per-phase [`oracle`](crate::governor::oracle) picks one P-state per phase, this asks what
//! the best mix over the whole run could do.
//!
//! **Modes**, measured on the simulator itself (no counter noise, the scenario's timeslice). For
//! each VM and each phase of its workload's *definition*, a probe host runs that VM alone on a
//! single-phase copy of the phase made long enough not to end during the probe. At every P-state
//! `k` two modes are measured: *drop* (the VM follows `k` at vCPU switches, every core is set to
//! the lowest P-state, so idle time runs there) and *hold* (as drop, but after each slice the
//! cores that ran a vCPU are set to `k`, as [`oracle::hold_busy_cores`] does). A mode is a work
//! rate `r` (useful instructions per second, [`PhaseTruth::work`]) and a package power `P`, both
//! over a window after a warm-up. A serving phase adds *busy* modes (its request rate ×1000, so
//! it is saturated, held at `k`: its capacity and power) and one *idle* mode (the empty host, all
//! cores at the lowest P-state: no work). Mixing busy and idle is what a server with a queue does
//! (serve fast, then sleep); the program ignores how long the queue is, which can only lower the
//! bound. A serving phase's work is capped by what is offered.
//!
//! **Program.** Variables `t[v,p,m] ≥ 0`, the seconds VM `v` spends in phase `p` in mode `m`,
//! and (several VMs) the host's runtime `T ≥ Σ_{p,m} t[v,p,m]` for every `v`. A phase that ends
//! after `N` instructions does them: `Σ_m r t = N`; one that ends after `D` seconds lasts them:
//! `Σ_m t = D` (serving: `Σ_m r t ≤` the offered instructions). Work is in reference seconds,
//! `W = Σ c t` with `c = r / rate_ref` (`rate_ref` from the VM's [`WorkReference`]; a phase the
//! reference did no work in counts its time, `c = 1`). Per VM, the performance threshold over the
//! whole run: `Σ c t ≥ θ_perf · Σ t`; a VM with serving phases also serves at least `θ_thrp` times
//! what its reference served in them. The objective `E / W` is linear-fractional; the
//! Charnes–Cooper substitution `y = t / W`, `s = 1 / W` makes it the LP `min E(y)` subject to
//! `W(y) = 1` and every constraint with its right-hand side multiplied by `s`, solved with
//! `microlp`. Feasibility is settled first, by an LP that minimises elastic slacks on the
//! inequalities (microlp can fail to prove even a small program infeasible); thresholds no
//! schedule meets are an error naming the first VM that cannot meet them. Energy: for one VM
//! `E = Σ P t`, the host's package energy exactly; for several,
//! `E = P_fixed · T + Σ_v Σ (P[v,p,m] − P_fixed) t`, with `P_fixed` the empty host's power at
//! the lowest P-state and every VM's modes measured alone, on a class with a shared voltage
//! plane made per-core ([`VoltageDomain::PerCore`]).
//!
//! **One VM: exact**, up to the transition stalls a mode pays inside its own probe (a VM that
//! blocks wakes its core from the lowest P-state), a slice's granularity at every switch between
//! modes and at each phase end, and, for a server, the queue's length and the slightly higher
//! bandwidth factor a saturated server's own traffic causes. Any mix the program picks is a
//! schedule of whole slices that the simulator runs at that cost.
//!
//! **Several VMs: a lower bound, possibly loose** (the optimum of a relaxation, not a schedule the
//! host can necessarily run). Take any run meeting the thresholds. (1) Package power splits into
//! the uncore's fixed part, a part per DRAM byte, and per-core power; with every core idle at the
//! lowest P-state it is `P_fixed`, so at every instant `P − P_fixed` is the traffic part plus each
//! core's excess over idling at the lowest P-state. Core power grows with voltage, frequency and
//! activity (a stalled cycle is at least as active as a halted one in every shipped class), so
//! every excess is ≥ 0, and each belongs to one VM: its own bytes, and the cores while they run
//! or switch to its vCPUs (a core idling above the lowest P-state is simply not charged). (2) A
//! shared plane runs every core at the voltage of the fastest one, never below its own P-state's:
//! power measured with per-core voltages is never above the real one. (3) Another VM's traffic
//! only raises the bandwidth factor, which lengthens each instruction's stall: every instruction
//! then costs at least the energy it costs alone (dynamic `C·V²·(cpi + a_stall·f·S·c)` and leakage
//! times its duration both grow with the factor `c`; traffic energy is per byte, so additive) and
//! takes at least as long. Time-sharing a core leaves a vCPU waiting, which costs it nothing of
//! its own. (4) So charge each stretch of VM `v` at P-state `k` doing work `w` as `w / r` seconds
//! of its mode measured alone: that is no longer than the stretch, and no more energy than it
//! spent. A phase that ends after a time fills the rest with a *wait* mode (no work, no energy of
//! its own; the *idle* mode of a server), so its phases keep their work and their lengths, its
//! performance ratio only rises and its throughput is the same: the run maps to a feasible point
//! whose `T` is no longer than the run and whose `E` is no larger, with the same `W`. Transition
//! stalls only add energy, except those a mode pays inside its own probe, as for one VM. The
//! bound ignores every cost of running VMs together, so it can be well below what any policy
//! reaches.
//!
//! **Cost.** Probing dominates: each distinct (phase, vCPUs, affinity) is probed once, even when
//! several VMs run the same workload, over 100 slices after a warm-up of 10 (a serving phase:
//! 1.5 s, as long as a saturated server's queue takes to fill). In a release build one VM on the
//! Phenom takes about a millisecond, 16 VMs on an EPYC socket about 10 ms.
//!
//! [`PhaseTruth::work`]: crate::host::PhaseTruth::work
//! [`oracle::hold_busy_cores`]: crate::governor::oracle::hold_busy_cores

use microlp::{ComparisonOp, OptimizationDirection, Problem, Variable};
use serde::Serialize;
use thiserror::Error;
use vmgov_proto::Thresholds;

use crate::{
    control::{FrequencyControl, PlatformError},
    governor::oracle::hold_busy_cores,
    host::{
        ClassError, HardwareClass, SimConfig, SimError, SimHost, VmSpec, VoltageDomain, Workload,
        workload::Phase,
    },
    measure::WorkReference,
};

/// Slices a probe of a batch or disk phase runs before it measures: the bandwidth factor and a
/// held core's P-state settle within two.
const WARMUP_SLICES: usize = 10;
/// Seconds a probe of a serving phase runs before it measures: a saturated server's queue holds
/// 1 s of arrivals and fills in about that long.
const SERVING_WARMUP_S: f64 = 1.5;
/// Slices a probe measures over.
const WINDOW_SLICES: usize = 100;
/// Factor on a serving phase's request rate that saturates it at every P-state.
const SATURATE: f64 = 1000.0;
/// A probe phase's end, raised so it does not end during the probe.
const ENDLESS_INSTRUCTIONS: f64 = 1e18;
/// The same for a phase that ends after a time, seconds.
const ENDLESS_S: f64 = 1e9;
/// Seconds below which a mode's share of a phase is rounding, not part of the schedule.
const NEGLIGIBLE_S: f64 = 1e-9;

/// A VM whose whole run is bounded.
#[derive(Debug, Clone)]
pub struct BoundVm {
    /// The VM as it runs in the scenario.
    pub spec: VmSpec,
    /// Its work rates alone at f_max: what its work is measured against.
    pub reference: WorkReference,
    /// The thresholds it must meet over its whole run.
    pub thresholds: Thresholds,
}

/// How far the bound can be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoundKind {
    /// One VM: the optimum, up to transition costs and the slice granularity.
    Exact,
    /// Several VMs: a lower bound (modes measured alone, per-core voltages), possibly loose.
    LowerBound,
}

/// How a VM runs in a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeKind {
    /// Following the P-state; idle time at the lowest.
    Drop,
    /// Following the P-state; the cores it ran on keep it for their idle time.
    Hold,
    /// Serving flat out at the P-state (held): a queue being drained.
    Busy,
    /// A server with nothing to serve, the host idle at the lowest P-state.
    Idle,
    /// Descheduled (several VMs only, phases that end after a time): no work, no energy of its
    /// own.
    Wait,
}

/// Time in one mode within a phase of the optimal schedule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slot {
    /// The P-state (the lowest for idle and wait).
    pub pstate: usize,
    /// The mode.
    pub mode: ModeKind,
    /// Seconds spent in it, over the whole run.
    pub seconds: f64,
    /// Work done in it, reference seconds.
    pub work_s: f64,
}

/// One phase of a VM's optimal schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseSchedule {
    /// The phase's name.
    pub phase: String,
    /// The modes with time in them, summed over the phase's repetitions.
    pub slots: Vec<Slot>,
}

/// One VM's optimal schedule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmSchedule {
    /// The VM's name.
    pub vm: String,
    /// Per phase of its workload's definition.
    pub phases: Vec<PhaseSchedule>,
}

/// The whole-run energy bound of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bound {
    /// Package joules per reference second of work, all VMs.
    pub energy_per_work: f64,
    /// Exact (one VM) or a lower bound (several).
    pub kind: BoundKind,
    /// The schedule that reaches it, per VM in order.
    pub schedule: Vec<VmSchedule>,
}

/// Why a bound could not be computed.
#[derive(Debug, Error)]
pub enum BoundError {
    /// Nothing to bound.
    #[error("no VMs to bound")]
    NoVms,
    /// A VM's reference does not fit its workload.
    #[error("VM {vm}: its reference {problem}")]
    Reference {
        /// The VM.
        vm: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The class is invalid.
    #[error(transparent)]
    Class(#[from] ClassError),
    /// A probe host could not be built.
    #[error("VM {vm}, phase {phase:?}: building its probe host")]
    Probe {
        /// The VM.
        vm: String,
        /// The phase.
        phase: String,
        /// The cause (boxed: it is large, and errors are rare).
        #[source]
        source: Box<SimError>,
    },
    /// A probe host refused a P-state.
    #[error("VM {vm}, phase {phase:?}: setting P-states on its probe host")]
    Control {
        /// The VM.
        vm: String,
        /// The phase.
        phase: String,
        /// The cause.
        #[source]
        source: PlatformError,
    },
    /// No schedule meets a VM's thresholds.
    #[error(
        "VM {vm}: no mix of P-states meets its thresholds (performance {perf}, throughput \
         {throughput}) over the whole run"
    )]
    Infeasible {
        /// The first VM that cannot meet them, or "-" when only the whole program fails.
        vm: String,
        /// Its performance threshold.
        perf: f64,
        /// Its throughput threshold.
        throughput: f64,
    },
    /// The LP solver failed.
    #[error("solving the bound's linear program")]
    Solver(#[source] microlp::Error),
    /// The LP solver stopped before it found a solution.
    #[error("the LP solver stopped before it found a solution")]
    Interrupted,
}

/// The whole-run energy bound of `vms` on `class` (see the module's documentation): measures
/// each VM's modes on probe hosts with `config`'s timeslice, then solves the program.
pub fn whole_run_bound(
    class: &HardwareClass,
    vms: &[BoundVm],
    config: &SimConfig,
) -> Result<Bound, BoundError> {
    if vms.is_empty() {
        return Err(BoundError::NoVms);
    }
    class.validate()?;
    let several = vms.len() > 1;
    let mut probe_class = class.clone();
    if several {
        // Per-core voltages: a core's power never exceeds what the shared plane imposes on it,
        // and each VM's excess no longer depends on what the others run.
        probe_class.voltage_domain = VoltageDomain::PerCore;
    }
    let config = SimConfig { counter_noise: 0.0, ..config.clone() };
    let pstates = class.pstate_table()?.len();
    let idle_w = idle_power(&probe_class, &config)?;
    let mut probes = Probes::default();
    let mut program = Program { vms: Vec::with_capacity(vms.len()), fixed_w: None };
    if several {
        program.fixed_w = Some(idle_w);
    }
    for vm in vms {
        let workload = &vm.spec.workload;
        let rates = &vm.reference.rates;
        let problem = if rates.len() != workload.phases.len() {
            Some(format!(
                "has {} phase rates for a workload of {}",
                rates.len(),
                workload.phases.len()
            ))
        } else {
            rates
                .iter()
                .find(|r| !(r.is_finite() && **r >= 0.0))
                .map(|r| format!("has a phase rate of {r}; rates are finite and >= 0"))
        };
        if let Some(problem) = problem {
            return Err(BoundError::Reference { vm: vm.spec.name.clone(), problem });
        }
        let repeat = f64::from(workload.repeat);
        let mut phases = Vec::with_capacity(workload.phases.len());
        for (phase, &reference_rate) in workload.phases.iter().zip(&vm.reference.rates) {
            let mut modes = probes.modes(&probe_class, &vm.spec, phase, &config, pstates)?.to_vec();
            let end = match (phase.instructions, phase.duration_s) {
                (Some(n), _) => End::Work(n * repeat),
                (None, d) => {
                    let seconds = d.unwrap_or(0.0) * repeat;
                    let offered = phase.network.as_ref().map(|net| {
                        // The simulator's arrival rate: requests/s × instructions per request.
                        net.requests_per_s * net.cycles_per_request / phase.cpi_core * seconds
                    });
                    if offered.is_some() {
                        modes.push(Mode {
                            pstate: 0,
                            kind: ModeKind::Idle,
                            rate: 0.0,
                            power_w: idle_w,
                        });
                    } else if several {
                        modes.push(Mode {
                            pstate: 0,
                            kind: ModeKind::Wait,
                            rate: 0.0,
                            power_w: idle_w,
                        });
                    }
                    End::Duration { seconds, offered }
                }
            };
            phases.push(LpPhase { end, reference_rate, modes });
        }
        program.vms.push(LpVm {
            phases,
            perf: vm.thresholds.perf(),
            throughput: vm.thresholds.throughput(),
        });
    }
    let solved = match program.solve() {
        Ok(s) => s,
        Err(LpFailure::Infeasible) => return Err(infeasible(&program, vms)),
        Err(LpFailure::Solver(e)) => return Err(BoundError::Solver(e)),
        Err(LpFailure::Interrupted) => return Err(BoundError::Interrupted),
    };
    let schedule = vms
        .iter()
        .zip(&program.vms)
        .zip(&solved.seconds)
        .map(|((vm, lp), seconds)| VmSchedule {
            vm: vm.spec.name.clone(),
            phases: vm
                .spec
                .workload
                .phases
                .iter()
                .zip(&lp.phases)
                .zip(seconds)
                .map(|((phase, lp), seconds)| PhaseSchedule {
                    phase: phase.name.clone(),
                    slots: lp
                        .modes
                        .iter()
                        .zip(seconds)
                        .filter(|(_, t)| **t > NEGLIGIBLE_S)
                        .map(|(m, &t)| Slot {
                            pstate: m.pstate,
                            mode: m.kind,
                            seconds: t,
                            work_s: lp.work_coefficient(m) * t,
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    Ok(Bound {
        energy_per_work: solved.energy_per_work,
        kind: if several { BoundKind::LowerBound } else { BoundKind::Exact },
        schedule,
    })
}

/// The first VM whose own constraints no schedule meets (the VMs share nothing but the runtime,
/// which constrains nothing, so one of them must be).
fn infeasible(program: &Program, vms: &[BoundVm]) -> BoundError {
    let culprit = program.vms.iter().zip(vms).find(|(lp, _)| {
        let alone = Program { vms: vec![(*lp).clone()], fixed_w: None };
        matches!(alone.solve(), Err(LpFailure::Infeasible))
    });
    let (vm, t) = culprit.map_or_else(
        || ("-".to_owned(), vms[0].thresholds),
        |(_, vm)| (vm.spec.name.clone(), vm.thresholds),
    );
    BoundError::Infeasible { vm, perf: t.perf(), throughput: t.throughput() }
}

// --- Probing -------------------------------------------------------------------------------

/// Modes already measured, by what determines them: the phase's physics, vCPUs and affinity.
#[derive(Debug, Default)]
struct Probes {
    done: Vec<(Phase, u32, Option<u64>, Vec<Mode>)>,
}

impl Probes {
    /// The modes of `phase` run by `spec`'s VM alone, probed on first use.
    fn modes(
        &mut self,
        class: &HardwareClass,
        spec: &VmSpec,
        phase: &Phase,
        config: &SimConfig,
        pstates: usize,
    ) -> Result<&[Mode], BoundError> {
        let key = endless(phase);
        let found = self.done.iter().position(|(p, vcpus, affinity, _)| {
            *p == key && *vcpus == spec.vcpus && *affinity == spec.affinity
        });
        let index = match found {
            Some(i) => i,
            None => {
                let modes = probe(class, spec, phase, config, pstates)?;
                self.done.push((key, spec.vcpus, spec.affinity, modes));
                self.done.len() - 1
            }
        };
        Ok(&self.done[index].3)
    }
}

/// `phase` as a probe runs it: unnamed (names change no physics) and endless.
fn endless(phase: &Phase) -> Phase {
    let mut p = phase.clone();
    p.name = String::new();
    p.instructions = p.instructions.map(|_| ENDLESS_INSTRUCTIONS);
    p.duration_s = p.duration_s.map(|_| ENDLESS_S);
    p
}

/// Every mode of `phase` but idle and wait: drop and hold at each P-state, and busy for a server.
fn probe(
    class: &HardwareClass,
    spec: &VmSpec,
    phase: &Phase,
    config: &SimConfig,
    pstates: usize,
) -> Result<Vec<Mode>, BoundError> {
    let mut probe_phase = endless(phase);
    probe_phase.name.clone_from(&phase.name);
    let serving = probe_phase.network.is_some();
    let warmup = if serving {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "small, > 0")]
        let slices = (SERVING_WARMUP_S / config.timeslice_s).ceil() as usize;
        slices.max(1)
    } else {
        WARMUP_SLICES
    };
    let mut saturated = probe_phase.clone();
    if let Some(net) = saturated.network.as_mut() {
        net.requests_per_s *= SATURATE;
    }
    let mut modes = Vec::with_capacity(pstates * 3);
    for k in 0..pstates {
        for (kind, p) in [(ModeKind::Drop, &probe_phase), (ModeKind::Hold, &probe_phase)]
            .into_iter()
            .chain(serving.then_some((ModeKind::Busy, &saturated)))
        {
            let hold = kind != ModeKind::Drop;
            let (rate, power_w) = run_mode(class, spec, p, config, k, hold, warmup)?;
            modes.push(Mode { pstate: k, kind, rate, power_w });
        }
    }
    Ok(modes)
}

/// Runs `phase` alone at P-state `k` (idle time at the lowest, or held at `k` on the cores that
/// ran a vCPU): its work rate (useful instructions per second) and package power, watts.
fn run_mode(
    class: &HardwareClass,
    spec: &VmSpec,
    phase: &Phase,
    config: &SimConfig,
    k: usize,
    hold: bool,
    warmup: usize,
) -> Result<(f64, f64), BoundError> {
    let vm = VmSpec {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        affinity: spec.affinity,
        workload: Workload {
            name: spec.workload.name.clone(),
            description: String::new(),
            phases: vec![phase.clone()],
            repeat: 1,
        },
    };
    let control =
        |source| BoundError::Control { vm: spec.name.clone(), phase: phase.name.clone(), source };
    let mut host = SimHost::new(class.clone(), vec![vm], config.clone()).map_err(|source| {
        BoundError::Probe {
            vm: spec.name.clone(),
            phase: phase.name.clone(),
            source: Box::new(source),
        }
    })?;
    host.set_vm_pstate(0, Some(k)).map_err(control)?;
    for core in 0..host.core_count() {
        host.set_core_pstate(core, 0).map_err(control)?;
    }
    let step = |host: &mut SimHost| -> Result<(), BoundError> {
        host.step();
        if hold {
            let sample = host.take_sample();
            let result = hold_busy_cores(&sample, host, k);
            host.return_sample(sample);
            result.map_err(control)?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        step(&mut host)?;
    }
    let work = |h: &SimHost| h.vm_truth(0).and_then(|t| t.phases.first()).map_or(0.0, |p| p.work);
    let (w0, e0, t0) = (work(&host), host.package_energy_j(), host.time_s());
    for _ in 0..WINDOW_SLICES {
        step(&mut host)?;
    }
    let elapsed = host.time_s() - t0;
    Ok(((work(&host) - w0) / elapsed, (host.package_energy_j() - e0) / elapsed))
}

/// The empty host's package power with every core at the lowest P-state, watts.
fn idle_power(class: &HardwareClass, config: &SimConfig) -> Result<f64, BoundError> {
    let probe = |source| BoundError::Probe {
        vm: "-".into(),
        phase: "idle".into(),
        source: Box::new(source),
    };
    let mut host = SimHost::new(class.clone(), Vec::new(), config.clone()).map_err(probe)?;
    for core in 0..host.core_count() {
        host.set_core_pstate(core, 0).map_err(|source| BoundError::Control {
            vm: "-".into(),
            phase: "idle".into(),
            source,
        })?;
    }
    // The cores start at the top P-state: the first slice pays their transitions.
    host.step();
    let (e0, t0) = (host.package_energy_j(), host.time_s());
    for _ in 0..WARMUP_SLICES {
        host.step();
    }
    Ok((host.package_energy_j() - e0) / (host.time_s() - t0))
}

// --- The linear program --------------------------------------------------------------------

/// A way of running a phase: its work rate and the package power it costs.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Mode {
    pstate: usize,
    kind: ModeKind,
    /// Useful instructions per second.
    rate: f64,
    /// Package power, watts (the whole host's, measured with the VM alone).
    power_w: f64,
}

/// How a phase ends, over all its repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
enum End {
    /// After this many instructions.
    Work(f64),
    /// After this many seconds; a server's work is capped by the instructions offered.
    Duration { seconds: f64, offered: Option<f64> },
}

#[derive(Debug, Clone, PartialEq)]
struct LpPhase {
    end: End,
    /// The reference's work rate in the phase (0: it did none there).
    reference_rate: f64,
    modes: Vec<Mode>,
}

impl LpPhase {
    /// Reference seconds of work per second in mode `m`.
    fn work_coefficient(&self, m: &Mode) -> f64 {
        if self.reference_rate > 0.0 { m.rate / self.reference_rate } else { 1.0 }
    }

    /// Rate that makes this phase's work rows O(1): the reference's, else the fastest mode's.
    fn unit_rate(&self) -> f64 {
        if self.reference_rate > 0.0 {
            self.reference_rate
        } else {
            self.modes.iter().map(|m| m.rate).fold(0.0, f64::max)
        }
    }

    fn serving(&self) -> bool {
        matches!(self.end, End::Duration { offered: Some(_), .. })
    }

    /// The phase's length in reference seconds, roughly: for the program's scale only.
    fn scale_s(&self) -> f64 {
        match self.end {
            End::Work(n) => {
                let unit = self.unit_rate();
                if unit > 0.0 { n / unit } else { 0.0 }
            }
            End::Duration { seconds, .. } => seconds,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct LpVm {
    phases: Vec<LpPhase>,
    perf: f64,
    throughput: f64,
}

/// The program: one VM with its exact energy (`fixed_w` None), or several with the empty host's
/// power `fixed_w` charged over the runtime and each mode's excess over it.
#[derive(Debug, Clone, PartialEq)]
struct Program {
    vms: Vec<LpVm>,
    fixed_w: Option<f64>,
}

#[derive(Debug)]
enum LpFailure {
    Infeasible,
    Solver(microlp::Error),
    Interrupted,
}

/// The optimum: `E / W`, and the seconds per VM, phase and mode.
#[derive(Debug, Clone, PartialEq)]
struct Solved {
    energy_per_work: f64,
    seconds: Vec<Vec<Vec<f64>>>,
}

/// Coefficients below this are dropped: they are rounding (a rate ratio equal to its threshold),
/// and microlp wants each row's coefficients within six orders of magnitude.
const TINY: f64 = 1e-9;

fn term(v: Variable, coeff: f64) -> Option<(Variable, f64)> {
    (coeff.abs() > TINY).then_some((v, coeff))
}

/// Which LP of the program to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Variables `u = t / scale`; every inequality gets an elastic slack, and the objective is
    /// their sum: always feasible, and 0 exactly when the program is.
    Feasibility,
    /// Charnes–Cooper: `y = t / W`, `σ = scale / W`, `W(y) = 1`, objective `E / W`.
    Fractional,
}

/// One of the program's LPs and its variables.
struct Built {
    lp: Problem,
    /// The work normaliser (fractional form).
    sigma: Option<Variable>,
    /// Elastic slacks (feasibility form).
    elastic: bool,
    vars: Vec<Vec<Vec<Option<Variable>>>>,
    scale: f64,
}

impl Built {
    /// Adds `Σ terms + constant·σ {op} 0` (σ = 1 but in the fractional form).
    fn row(&mut self, mut terms: Vec<(Variable, f64)>, constant: f64, op: ComparisonOp) {
        if self.elastic {
            let slack = self.lp.add_var(1.0, (0.0, f64::INFINITY));
            match op {
                ComparisonOp::Ge => terms.push((slack, 1.0)),
                ComparisonOp::Le => terms.push((slack, -1.0)),
                ComparisonOp::Eq => {}
            }
        }
        match self.sigma {
            Some(sigma) => {
                if constant != 0.0 {
                    terms.push((sigma, constant));
                }
                self.lp.add_constraint(terms, op, 0.0);
            }
            None => self.lp.add_constraint(terms, op, -constant),
        }
    }

    fn solve(&self) -> Result<microlp::Solution, LpFailure> {
        let mut options = microlp::SolveOptions::default();
        loop {
            match self.lp.solve_with(options.clone()) {
                Ok(outcome) => return outcome.into_solution().map_err(|_| LpFailure::Interrupted),
                Err(microlp::Error::Infeasible) => return Err(LpFailure::Infeasible),
                // Turning presolve off is the solver's advice for ruling out a numerical failure.
                Err(microlp::Error::InternalError(_)) if options.presolve => {
                    options.presolve = false;
                }
                Err(e) => return Err(LpFailure::Solver(e)),
            }
        }
    }
}

/// Elastic slack (in units of the normalised rows) above which the program is infeasible: the
/// solver's feasibility tolerance.
const INFEASIBLE_SLACK: f64 = 1e-7;

impl Program {
    /// Solves the program. Feasibility is settled first, by minimising elastic slacks: microlp
    /// can fail to *prove* even a small program infeasible (the homogeneous Charnes–Cooper form
    /// of one especially), while an always-feasible LP it solves. Then the Charnes–Cooper form
    /// gives the optimum.
    fn solve(&self) -> Result<Solved, LpFailure> {
        // A phase no mode can finish makes the equalities themselves unsatisfiable.
        let stuck = self.vms.iter().flat_map(|v| &v.phases).any(|ph| match ph.end {
            End::Work(_) => ph.modes.iter().all(|m| m.rate <= 0.0),
            End::Duration { .. } => ph.modes.is_empty(),
        });
        if stuck {
            return Err(LpFailure::Infeasible);
        }
        let slack = self.build(Form::Feasibility).solve()?.objective();
        if slack > INFEASIBLE_SLACK {
            return Err(LpFailure::Infeasible);
        }
        let built = self.build(Form::Fractional);
        let solution = built.solve()?;
        let s = built.sigma.map_or(1.0, |sigma| solution.var_value(sigma));
        if s <= 0.0 {
            // W = 1 with every phase bounded by σ forces σ > 0; anything else is the solver's
            // rounding, which no schedule can be read from.
            return Err(LpFailure::Solver(microlp::Error::InternalError(format!(
                "the work normaliser came out as {s}"
            ))));
        }
        let seconds = built
            .vars
            .iter()
            .map(|phases| {
                phases
                    .iter()
                    .map(|modes| {
                        modes
                            .iter()
                            .map(|x| {
                                x.map_or(0.0, |x| {
                                    (solution.var_value(x) * built.scale / s).max(0.0)
                                })
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        Ok(Solved { energy_per_work: solution.objective(), seconds })
    }

    /// The program as an LP in `form`, every coefficient O(1) whatever the run's length
    /// (`scale` is its length in reference seconds).
    fn build(&self, form: Form) -> Built {
        let scale: f64 =
            self.vms.iter().flat_map(|v| &v.phases).map(LpPhase::scale_s).sum::<f64>().max(1e-9);
        let fractional = form == Form::Fractional;
        let cost = |w: f64| if fractional { w } else { 0.0 };
        let mut lp = Problem::new(OptimizationDirection::Minimize);
        let sigma = fractional.then(|| lp.add_var(0.0, (0.0, f64::INFINITY)));
        let runtime = self.fixed_w.map(|w| lp.add_var(cost(w), (0.0, f64::INFINITY)));
        let fixed = self.fixed_w.unwrap_or(0.0);
        // Variables per VM, phase and mode; none for a mode that cannot advance a phase that
        // ends after its work.
        let mut vars = Vec::with_capacity(self.vms.len());
        for vm in &self.vms {
            let mut phases = Vec::with_capacity(vm.phases.len());
            for ph in &vm.phases {
                let mut modes = Vec::with_capacity(ph.modes.len());
                for m in &ph.modes {
                    let useless = matches!(ph.end, End::Work(_)) && m.rate <= 0.0;
                    modes.push(
                        (!useless)
                            .then(|| lp.add_var(cost(m.power_w - fixed), (0.0, f64::INFINITY))),
                    );
                }
                phases.push(modes);
            }
            vars.push(phases);
        }
        let mut b = Built { lp, sigma, elastic: !fractional, vars, scale };
        let each = |b: &Built, v: usize, p: usize| -> Vec<(Mode, Variable)> {
            let ph = &self.vms[v].phases[p];
            ph.modes.iter().zip(&b.vars[v][p]).filter_map(|(m, x)| x.map(|x| (*m, x))).collect()
        };
        if fractional {
            // W = 1: the Charnes–Cooper normalisation.
            let mut w = Vec::new();
            for (v, vm) in self.vms.iter().enumerate() {
                for (p, ph) in vm.phases.iter().enumerate() {
                    w.extend(
                        each(&b, v, p).iter().filter_map(|(m, x)| term(*x, ph.work_coefficient(m))),
                    );
                }
            }
            b.lp.add_constraint(w, ComparisonOp::Eq, 1.0);
        }
        for (v, vm) in self.vms.iter().enumerate() {
            let mut perf = Vec::new();
            let mut served = Vec::new();
            let mut target = 0.0;
            let unit_served = vm
                .phases
                .iter()
                .filter(|ph| ph.serving())
                .map(|ph| ph.reference_rate)
                .fold(0.0, f64::max);
            for (p, ph) in vm.phases.iter().enumerate() {
                let unit = ph.unit_rate();
                let modes = each(&b, v, p);
                match ph.end {
                    End::Work(n) => {
                        let row =
                            modes.iter().filter_map(|(m, x)| term(*x, m.rate / unit)).collect();
                        // With no mode that advances it (unit 0) the phase cannot end: 0 = σ.
                        let constant = if unit > 0.0 { -n / unit / scale } else { -1.0 };
                        b.row(row, constant, ComparisonOp::Eq);
                    }
                    End::Duration { seconds, offered } => {
                        let row = modes.iter().map(|(_, x)| (*x, 1.0)).collect();
                        b.row(row, -seconds / scale, ComparisonOp::Eq);
                        if let Some(o) = offered.filter(|_| unit > 0.0) {
                            let row =
                                modes.iter().filter_map(|(m, x)| term(*x, m.rate / unit)).collect();
                            b.row(row, -o / unit / scale, ComparisonOp::Le);
                        }
                        if offered.is_some() && unit_served > 0.0 {
                            served.extend(
                                modes.iter().filter_map(|(m, x)| term(*x, m.rate / unit_served)),
                            );
                            target += ph.reference_rate * seconds;
                        }
                    }
                }
                perf.extend(
                    modes.iter().filter_map(|(m, x)| term(*x, ph.work_coefficient(m) - vm.perf)),
                );
            }
            if vm.perf > 0.0 {
                b.row(perf, 0.0, ComparisonOp::Ge);
            }
            if vm.throughput > 0.0 && target > 0.0 {
                b.row(served, -vm.throughput * target / unit_served / scale, ComparisonOp::Ge);
            }
            if let Some(runtime) = runtime {
                let mut row = vec![(runtime, 1.0)];
                for p in 0..vm.phases.len() {
                    row.extend(each(&b, v, p).iter().map(|(_, x)| (*x, -1.0)));
                }
                b.row(row, 0.0, ComparisonOp::Ge);
            }
        }
        b
    }
}

#[cfg(test)]
mod tests;
