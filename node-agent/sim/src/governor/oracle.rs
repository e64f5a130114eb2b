//! The oracle: the limit vmgov's results are measured against on the simulated host.
//!
//! It knows the physics because it asks the simulator itself. Whenever the set of phases
//! running changes, it searches the combinations of per-VM P-states, each with idle time either
//! dropped to the lowest P-state or held at the VMs' P-state on the cores they use, judging each
//! by running a noise-free copy of the host for a short window,
//! and keeps the combination with the least package energy per unit of progress among those
//! that hold every VM at or above its threshold: a batch phase's instruction rate at least
//! `perf` × its rate alone on the host at f_max, a serving phase's served rate at least
//! `throughput` × the same reference. The cost minimised is the window's package energy divided
//! by the VMs' summed progress (work rate over the reference's, served requests for a server):
//! energy at equal work, as `measure` judges every run, so serving fewer requests is no saving.
//! For a single VM in a single phase the choice is therefore the lowest-energy feasible P-state
//! (a test checks it against brute force over whole runs). It holds every phase to the
//! thresholds and plans no further than the phase: the whole-run limit is `bound`'s.
//!
//! **Search.** Where every combination fits [`EXHAUSTIVE_PLANS`] (5³ × 2 = 250 plans for three
//! VMs on the Phenom) the search is exhaustive and the plan optimal among them. Beyond it (16 VMs
//! on a 32-core EPYC: 3¹⁶ combinations) it is **coordinate descent**, a local search that is not
//! guaranteed optimal: from every VM at the top P-state with busy cores held, it sweeps the VMs
//! in turn, tries every P-state for one VM with the others fixed (then the other idle rule), and
//! keeps a change that lowers the cost among feasible plans (or, while no plan is feasible yet,
//! the summed shortfall below the thresholds), until a sweep changes nothing or after
//! [`MAX_SWEEPS`] sweeps. A test checks it against the exhaustive search where both run.
//!
//! **Cost of a re-plan.** Each VM's reference (its rate alone at f_max) is measured once per
//! phase and kept while its phase runs; a plan is judged once per re-plan; and a window whose
//! host has become stationary (a slice starting from the state the previous one started from,
//! [`SliceState::repeats`], with no phase ending before the window does) is extrapolated from
//! its last slice instead of simulated to the end, which changes a plan's cost by at most 1e-12
//! relative.

use std::collections::HashMap;

use vmgov_proto::Thresholds;

use crate::{
    control::{FrequencyControl, HostSample, PlatformError},
    host::{SimHost, SliceState},
};

/// Slices run before measuring, so transitions settle.
const WARMUP_STEPS: usize = 3;
/// Slices measured per evaluation.
const WINDOW_STEPS: usize = 30;
/// Most plans (combinations of P-states × the two idle rules) searched exhaustively at one
/// phase change; beyond it the search is coordinate descent.
pub const EXHAUSTIVE_PLANS: usize = 256 * 2;
/// Most sweeps of coordinate descent over the VMs at one phase change.
pub const MAX_SWEEPS: usize = 4;

/// Sets every core that ran a vCPU in the last slice to `pstate` for its idle time too, and
/// every core that ran nothing to the lowest P-state: the performance governor's rule for any
/// P-state, which spares a VM that blocks often a transition at every wake-up.
pub fn hold_busy_cores(
    sample: &HostSample,
    ctl: &mut dyn FrequencyControl,
    pstate: usize,
) -> Result<(), PlatformError> {
    for (core, c) in sample.cores.iter().enumerate() {
        ctl.set_core_pstate(core, if c.busy > 0.0 { pstate } else { 0 })?;
    }
    Ok(())
}

/// A candidate: a P-state per active VM, and whether busy cores keep the highest of them for
/// their idle time (else idle time drops to the lowest P-state at once).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    vms: Vec<usize>,
    pstates: Vec<usize>,
    hold: bool,
}

/// Buffers one evaluation reuses.
#[derive(Debug, Default)]
struct Scratch {
    before: Vec<f64>,
    last: Vec<f64>,
    rates: Vec<f64>,
    state: SliceState,
    previous: SliceState,
}

impl Plan {
    fn held_pstate(&self) -> Option<usize> {
        self.hold.then(|| self.pstates.iter().copied().max().unwrap_or(0))
    }

    fn apply(&self, host: &mut SimHost) -> Result<(), PlatformError> {
        for (&vm, &p) in self.vms.iter().zip(&self.pstates) {
            host.set_vm_pstate(vm, Some(p))?;
        }
        let held = self.held_pstate();
        for core in 0..host.core_count() {
            host.set_core_pstate(core, held.unwrap_or(0))?;
        }
        Ok(())
    }

    /// Runs `host` under the plan for a window: each VM's rate of progress (instructions, served
    /// ones for servers, per second) into `s.rates`, and returns the package energy spent,
    /// joules. Once a slice starts from the state the previous one did, and no phase ends
    /// before the window does, the rest of the window repeats that slice and is extrapolated.
    fn measure(&self, host: &mut SimHost, s: &mut Scratch) -> Result<f64, PlatformError> {
        self.apply(host)?;
        let held = self.held_pstate();
        let step = |host: &mut SimHost| -> Result<(), PlatformError> {
            host.step();
            if let Some(p) = held {
                let sample = host.take_sample();
                let result = hold_busy_cores(&sample, host, p);
                host.return_sample(sample);
                result?;
            }
            Ok(())
        };
        for _ in 0..WARMUP_STEPS {
            step(host)?;
        }
        let done = |host: &SimHost, v: usize| host.vm_truth(v).map_or(0.0, |t| t.instructions);
        s.before.clear();
        s.before.extend(self.vms.iter().map(|&v| done(host, v)));
        let (e0, t0) = (host.package_energy_j(), host.time_s());
        host.slice_state(&mut s.previous);
        for k in 1..=WINDOW_STEPS {
            let e_last = host.package_energy_j();
            s.last.clear();
            s.last.extend(self.vms.iter().map(|&v| done(host, v)));
            step(host)?;
            let left = WINDOW_STEPS - k;
            if left == 0 {
                break;
            }
            host.slice_state(&mut s.state);
            #[allow(clippy::cast_precision_loss, reason = "small counts")]
            let left = left as f64;
            if s.state.repeats(&s.previous) && host.slices_before_event() > left {
                // The last slice's increments, to repeat `left` times.
                for (&v, last) in self.vms.iter().zip(&mut s.last) {
                    *last = done(host, v) - *last;
                }
                let e_slice = host.package_energy_j() - e_last;
                let window = host.time_s() - t0 + left * host.config().timeslice_s;
                s.rates.clear();
                for ((&v, b), last) in self.vms.iter().zip(&s.before).zip(&s.last) {
                    s.rates.push((done(host, v) - b + left * last) / window);
                }
                return Ok(host.package_energy_j() - e0 + left * e_slice);
            }
            std::mem::swap(&mut s.state, &mut s.previous);
        }
        let window = host.time_s() - t0;
        s.rates.clear();
        for (&v, b) in self.vms.iter().zip(&s.before) {
            s.rates.push((done(host, v) - b) / window);
        }
        Ok(host.package_energy_j() - e0)
    }
}

/// How a plan fares: feasible when no VM falls short of its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Verdict {
    feasible: bool,
    /// Summed shortfall of the VMs' ratios below their thresholds.
    shortfall: f64,
    /// Package energy per unit of progress.
    cost: f64,
}

impl Verdict {
    /// Feasible before infeasible; among feasible plans the cheaper, among infeasible ones the
    /// one that falls less short.
    fn better_than(&self, other: &Self) -> bool {
        match (self.feasible, other.feasible) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => self.cost < other.cost,
            (false, false) => self.shortfall < other.shortfall,
        }
    }
}

/// One re-plan: the host as it stands, its active VMs and what each is held to.
struct Search<'a> {
    host: &'a SimHost,
    active: &'a [usize],
    /// Per active VM: its reference rate, and the threshold of its current phase.
    limits: Vec<(f64, f64)>,
    trial: Option<SimHost>,
    scratch: Scratch,
    seen: HashMap<(Vec<usize>, bool), Verdict>,
    evaluations: u64,
}

impl Search<'_> {
    /// Judges the plan setting the active VMs to `pstates` (each plan once per re-plan).
    fn judge(&mut self, pstates: &[usize], hold: bool) -> Result<Verdict, PlatformError> {
        if let Some(v) = self.seen.get(&(pstates.to_vec(), hold)) {
            return Ok(*v);
        }
        let plan = Plan { vms: self.active.to_vec(), pstates: pstates.to_vec(), hold };
        let trial = match self.trial.as_mut() {
            Some(t) => {
                t.clone_from(self.host);
                t
            }
            None => self.trial.insert(self.host.clone()),
        };
        trial.set_counter_noise(0.0);
        let energy = plan.measure(trial, &mut self.scratch)?;
        self.evaluations += 1;
        let mut progress = 0.0;
        let mut feasible = true;
        let mut shortfall = 0.0;
        for (&(reference, threshold), &rate) in self.limits.iter().zip(&self.scratch.rates) {
            let ratio = if reference > 0.0 { rate / reference } else { 1.0 };
            feasible &= ratio >= threshold;
            shortfall += (threshold - ratio).max(0.0);
            progress += ratio;
        }
        let cost = if progress > 0.0 { energy / progress } else { energy };
        let verdict = Verdict { feasible, shortfall, cost };
        self.seen.insert((plan.pstates, hold), verdict);
        Ok(verdict)
    }

    /// Every combination; the cheapest feasible plan, first found among equals.
    fn exhaustive(
        &mut self,
        n: usize,
    ) -> Result<Option<(Vec<usize>, bool, Verdict)>, PlatformError> {
        let k = self.active.len();
        let mut best: Option<(Vec<usize>, bool, Verdict)> = None;
        let mut pstates = vec![0; k];
        loop {
            for hold in [false, true] {
                let v = self.judge(&pstates, hold)?;
                if v.feasible && best.as_ref().is_none_or(|b| v.cost < b.2.cost) {
                    best = Some((pstates.clone(), hold, v));
                }
            }
            // The next combination, the first VM's P-state varying fastest.
            let Some(i) = pstates.iter().position(|&p| p + 1 < n) else { break };
            pstates[i] += 1;
            pstates[..i].fill(0);
        }
        Ok(best)
    }

    /// Coordinate descent from every VM at `top` with busy cores held; the plan it ends at if
    /// feasible.
    fn coordinate_descent(
        &mut self,
        n: usize,
        top: usize,
    ) -> Result<Option<(Vec<usize>, bool, Verdict)>, PlatformError> {
        let mut pstates = vec![top; self.active.len()];
        let mut hold = true;
        let mut current = self.judge(&pstates, hold)?;
        for _ in 0..MAX_SWEEPS {
            let mut changed = false;
            for i in 0..pstates.len() {
                let mut trial = pstates.clone();
                let mut best = (pstates[i], current);
                for p in (0..n).filter(|&p| p != pstates[i]) {
                    trial[i] = p;
                    let v = self.judge(&trial, hold)?;
                    if v.better_than(&best.1) {
                        best = (p, v);
                    }
                }
                if best.0 != pstates[i] {
                    pstates[i] = best.0;
                    current = best.1;
                    changed = true;
                }
            }
            let other = self.judge(&pstates, !hold)?;
            if other.better_than(&current) {
                hold = !hold;
                current = other;
                changed = true;
            }
            if !changed {
                break;
            }
        }
        Ok(current.feasible.then_some((pstates, hold, current)))
    }
}

/// The oracle and its current plan.
#[derive(Debug, Clone)]
pub struct Oracle {
    thresholds: Vec<Thresholds>,
    key: Vec<usize>,
    plan: Option<Plan>,
    /// The chosen plan's verdict (None when no plan was feasible).
    verdict: Option<Verdict>,
    /// Per VM: the phase its reference rate was measured in, and the rate.
    references: Vec<Option<(usize, f64)>>,
    budget: usize,
    /// Phase changes it has re-planned at.
    pub replans: u64,
    /// Plans it has simulated, over all re-plans.
    pub evaluations: u64,
}

impl Oracle {
    /// An oracle holding VM `i` to `thresholds[i]`.
    pub const fn new(thresholds: Vec<Thresholds>) -> Self {
        Self {
            thresholds,
            key: Vec::new(),
            plan: None,
            verdict: None,
            references: Vec::new(),
            budget: EXHAUSTIVE_PLANS,
            replans: 0,
            evaluations: 0,
        }
    }

    /// The same oracle searching exhaustively only up to `plans` plans (P-state combinations ×
    /// 2 idle rules), by coordinate descent beyond (0: always coordinate descent).
    #[must_use]
    pub const fn with_search_budget(mut self, plans: usize) -> Self {
        self.budget = plans;
        self
    }

    /// Re-plans if the running phases changed, and applies the plan to `host`. Call before
    /// every slice.
    pub fn update(&mut self, host: &mut SimHost) -> Result<(), PlatformError> {
        let vms = host.vm_count();
        if self.key.len() == vms && (0..vms).all(|v| self.key[v] == host.vm_phase(v)) {
            return Ok(());
        }
        self.key.clear();
        self.key.extend((0..vms).map(|v| host.vm_phase(v)));
        self.replans += 1;
        let active: Vec<usize> = (0..vms).filter(|&v| !host.vm_finished(v)).collect();
        if active.is_empty() {
            return Ok(());
        }
        let top = host.pstates().max_index();
        let n = host.pstates().len();
        self.references.resize(vms, None);
        let mut limits = Vec::with_capacity(active.len());
        for &v in &active {
            let phase = host.vm_phase(v);
            let reference = match self.references[v] {
                Some((p, rate)) if p == phase => rate,
                _ => {
                    let reference = Plan { vms: vec![v], pstates: vec![top], hold: true };
                    let mut scratch = Scratch::default();
                    reference.measure(&mut host.isolated(v), &mut scratch)?;
                    self.references[v] = Some((phase, scratch.rates[0]));
                    scratch.rates[0]
                }
            };
            let t = self.thresholds.get(v).copied().unwrap_or(Thresholds::NONE);
            limits.push((reference, if host.vm_serving(v) { t.throughput() } else { t.perf() }));
        }
        let mut search = Search {
            host,
            active: &active,
            limits,
            trial: None,
            scratch: Scratch::default(),
            seen: HashMap::new(),
            evaluations: 0,
        };
        let plans = u32::try_from(active.len())
            .ok()
            .and_then(|k| n.checked_pow(k))
            .and_then(|c| c.checked_mul(2));
        let best = if plans.is_some_and(|p| p <= self.budget) {
            search.exhaustive(n)?
        } else {
            search.coordinate_descent(n, top)?
        };
        self.evaluations += search.evaluations;
        self.verdict = best.as_ref().map(|b| b.2);
        let (pstates, hold) =
            best.map_or_else(|| (vec![top; active.len()], true), |(p, hold, _)| (p, hold));
        let plan = Plan { vms: active, pstates, hold };
        plan.apply(host)?;
        self.plan = Some(plan);
        Ok(())
    }

    /// Applies the plan's rule for busy cores after a slice.
    pub fn after_step(
        &self,
        sample: &HostSample,
        ctl: &mut dyn FrequencyControl,
    ) -> Result<(), PlatformError> {
        match self.plan.as_ref().and_then(Plan::held_pstate) {
            Some(p) => hold_busy_cores(sample, ctl, p),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use vmgov_proto::Thresholds;

    use super::Oracle;
    use crate::{
        host::{HardwareClass, SimConfig, SimHost, VmSpec, Workload},
        measure::WorkReference,
        simulate::{self, Policy, Scenario},
    };

    /// `vms` VMs of 2 vCPUs on one EPYC 7502 socket (32 cores), each running two copies of the
    /// next workload of a mix of CPU-, memory-, disk- and network-bound ones, scaled by `scale`:
    /// with 16 VMs every core is busy.
    fn full_epyc(vms: usize, scale: f64) -> Scenario {
        const MIX: [&str; 6] =
            ["444.namd", "470.lbm", "450.soplex", "462.libquantum", "bonnie++", "httperf-200"];
        Scenario {
            class: HardwareClass::builtin("epyc-7502").unwrap(),
            vms: (0..vms)
                .map(|i| VmSpec {
                    name: format!("vm{i}"),
                    vcpus: 2,
                    affinity: None,
                    workload: Workload::builtin(MIX[i % MIX.len()])
                        .unwrap()
                        .copies(2)
                        .scaled(scale),
                })
                .collect(),
            config: SimConfig::default(),
            max_time_s: 3600.0,
        }
    }

    /// Where both searches run (three VMs on the Phenom: 125 combinations), coordinate descent
    /// ends within 2% of the exhaustive search's cost, on fewer evaluations.
    #[test]
    fn coordinate_descent_comes_within_two_percent_of_the_exhaustive_search() {
        for (mix, t) in [
            (["470.lbm", "444.namd", "httperf-200"], 0.7),
            (["470.lbm", "444.namd", "httperf-200"], 0.4),
            (["bonnie++", "450.soplex", "462.libquantum"], 0.7),
        ] {
            let vms = mix
                .iter()
                .enumerate()
                .map(|(i, w)| VmSpec {
                    name: format!("vm{i}"),
                    vcpus: 2,
                    affinity: None,
                    workload: Workload::builtin(w).unwrap().scaled(0.01),
                })
                .collect();
            let config = SimConfig { counter_noise: 0.0, ..SimConfig::default() };
            let mut host =
                SimHost::new(HardwareClass::builtin("phenom-9500").unwrap(), vms, config).unwrap();
            for _ in 0..5 {
                host.step();
            }
            let thresholds = vec![Thresholds::new(t, t).unwrap()];
            let mut exhaustive = Oracle::new(thresholds.clone());
            let mut descent = Oracle::new(thresholds).with_search_budget(0);
            exhaustive.update(&mut host.clone()).unwrap();
            descent.update(&mut host.clone()).unwrap();
            assert_eq!(exhaustive.evaluations, 250, "{mix:?}: the exhaustive search ran");
            assert!(descent.evaluations < 250, "{mix:?}: coordinate descent ran");
            let (e, d) = (exhaustive.verdict.unwrap(), descent.verdict.unwrap());
            assert!(e.feasible && d.feasible);
            assert!(e.cost <= d.cost * (1.0 + 1e-12), "{mix:?} at {t}: {e:?} vs {d:?}");
            assert!(d.cost <= e.cost * 1.02, "{mix:?} at {t}: descent {d:?} vs exhaustive {e:?}");
        }
    }

    /// On a full 32-core host (16 VMs of two busy vCPUs) the oracle searches by coordinate
    /// descent, and every phase of every VM runs at 0.7 or more of its work rate alone at f_max.
    #[test]
    fn the_oracle_holds_sixteen_vms_on_a_full_epyc_to_their_thresholds_per_phase() {
        let s = full_epyc(16, 0.05);
        let top = s.class.pstates.len() - 1;
        let references: Vec<WorkReference> = s.vms[..6]
            .iter()
            .map(|v| {
                let mut alone = s.clone();
                alone.vms = vec![v.clone()];
                let r = simulate::run(&alone, &Policy::Fixed(vec![top])).unwrap().report;
                WorkReference::from_truth(&r.vms[0])
            })
            .collect();
        let run =
            simulate::run(&s, &Policy::Oracle(vec![Thresholds::new(0.7, 0.7).unwrap()])).unwrap();
        assert!(run.completed);
        for (i, v) in run.report.vms.iter().enumerate() {
            let reference = &references[i % references.len()];
            for (p, (phase, rate)) in v.phases.iter().zip(&reference.rates).enumerate() {
                let ratio = phase.work / phase.time_s / rate;
                assert!(ratio >= 0.7 * 0.99, "{} ({}), phase {p}: {ratio:.3}", v.name, v.workload);
            }
        }
    }

    fn scenario(w: &str, scale: f64) -> Scenario {
        Scenario {
            class: HardwareClass::builtin("phenom-9500").unwrap(),
            vms: vec![VmSpec {
                name: "vm0".into(),
                vcpus: 2,
                affinity: None,
                workload: Workload::builtin(w).unwrap().scaled(scale),
            }],
            config: SimConfig { counter_noise: 0.0, ..SimConfig::default() },
            max_time_s: 3600.0,
        }
    }

    /// For one VM the oracle's choice must be the best fixed P-state that meets the threshold
    /// (least energy at equal work), found here by brute force over whole runs.
    #[test]
    fn the_oracle_matches_brute_force_for_one_vm() {
        for (w, scale, t) in [
            ("470.lbm", 0.0005, 0.7),
            // namd at 2.0 and 2.2 GHz costs within 0.1% per unit of work: a run of a few hundred
            // slices, so the first window's transitions do not decide it.
            ("444.namd", 0.005, 0.7),
            ("httperf-500", 0.05, 0.85),
            ("470.lbm", 0.0005, 0.95),
        ] {
            let s = scenario(w, scale);
            let runs: Vec<_> = (0..5)
                .map(|p| simulate::run(&s, &Policy::Fixed(vec![p])).unwrap().report)
                .collect();
            let reference = &runs[4];
            let work = crate::measure::WorkReference::from_truth(&reference.vms[0]);
            let per_work = |r: &crate::host::SimReport| {
                crate::measure::RunWork::new(r, &[Some(&work)]).package_per_work()
            };
            let ok = |r: &crate::host::SimReport| {
                if reference.vms[0].requests_offered > 0.0 {
                    r.vms[0].throughput_ratio() >= t * reference.vms[0].throughput_ratio()
                } else {
                    r.vms[0].finished_at_s.unwrap() <= reference.vms[0].finished_at_s.unwrap() / t
                }
            };
            let best = runs.iter().filter(|r| ok(r)).map(per_work).fold(f64::INFINITY, f64::min);
            let oracle = simulate::run(&s, &Policy::Oracle(vec![Thresholds::new(t, t).unwrap()]))
                .unwrap()
                .report;
            assert!(ok(&oracle), "{w} at {t}: the oracle misses the threshold");
            assert!(
                per_work(&oracle) <= best * 1.005,
                "{w} at {t}: oracle {:.3} J/s of work vs best fixed {best:.3}",
                per_work(&oracle)
            );
        }
    }

    #[test]
    fn the_oracle_holds_every_vm_of_a_mix_to_its_threshold() {
        let mut s = scenario("470.lbm", 0.0005);
        s.vms.push(VmSpec {
            name: "vm1".into(),
            vcpus: 2,
            affinity: None,
            workload: Workload::builtin("444.namd").unwrap().scaled(0.0003),
        });
        let alone: Vec<f64> = s
            .vms
            .iter()
            .map(|v| {
                let mut one = s.clone();
                one.vms = vec![v.clone()];
                simulate::run(&one, &Policy::Fixed(vec![4])).unwrap().report.vms[0]
                    .finished_at_s
                    .unwrap()
            })
            .collect();
        let r = simulate::run(&s, &Policy::Oracle(vec![Thresholds::new(0.6, 0.6).unwrap()]))
            .unwrap()
            .report;
        for (v, a) in r.vms.iter().zip(alone) {
            assert!(
                v.finished_at_s.unwrap() <= a / 0.6 * 1.01,
                "{}: {:?} vs alone {a}",
                v.workload,
                v.finished_at_s
            );
        }
    }
}
