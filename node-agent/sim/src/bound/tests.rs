//! The bound held to whole runs of the simulator: exact for one VM (brute force over schedules),
//! never above a fixed P-state or the oracle, and the LP wrapper against every pure schedule.

use proptest::prelude::*;
use vmgov_proto::Thresholds;

use super::*;
use crate::{
    host::{SimReport, VmTruth},
    measure::RunWork,
    simulate::{self, Policy, Scenario},
};

fn config() -> SimConfig {
    SimConfig { counter_noise: 0.0, ..SimConfig::default() }
}

fn class(name: &str) -> HardwareClass {
    HardwareClass::builtin(name).unwrap()
}

fn vm(name: &str, workload: Workload) -> VmSpec {
    VmSpec { name: name.into(), vcpus: 2, affinity: None, workload }
}

fn scenario(class: &HardwareClass, vms: &[VmSpec]) -> Scenario {
    Scenario { class: class.clone(), vms: vms.to_vec(), config: config(), max_time_s: 3600.0 }
}

/// The VM alone at f_max (the performance governor's run).
fn reference(class: &HardwareClass, spec: &VmSpec) -> WorkReference {
    let top = class.pstates.len() - 1;
    let run =
        simulate::run(&scenario(class, std::slice::from_ref(spec)), &Policy::Fixed(vec![top]));
    WorkReference::from_truth(&run.unwrap().report.vms[0])
}

fn bound_vms(class: &HardwareClass, specs: &[VmSpec], t: f64) -> Vec<BoundVm> {
    specs
        .iter()
        .map(|spec| BoundVm {
            spec: spec.clone(),
            reference: reference(class, spec),
            thresholds: Thresholds::new(t, t).unwrap(),
        })
        .collect()
}

/// Served over the reference's served work in the serving phases (1 without any).
fn throughput_ratio(spec: &VmSpec, reference: &WorkReference, truth: &VmTruth) -> f64 {
    let mut served = 0.0;
    let mut target = 0.0;
    for (p, phase) in spec.workload.phases.iter().enumerate() {
        if phase.network.is_some() {
            served += truth.phases[p].work;
            target += reference.rates[p]
                * phase.duration_s.unwrap_or(0.0)
                * f64::from(spec.workload.repeat);
        }
    }
    if target > 0.0 { served / target } else { 1.0 }
}

/// `E / W` of a whole run, if every VM met its thresholds in it.
fn feasible_energy_per_work(report: &SimReport, vms: &[BoundVm]) -> Option<f64> {
    let ok = report.vms.iter().zip(vms).all(|(truth, vm)| {
        vm.reference.perf_ratio(truth).unwrap() >= vm.thresholds.perf()
            && throughput_ratio(&vm.spec, &vm.reference, truth) >= vm.thresholds.throughput()
    });
    let references: Vec<_> = vms.iter().map(|v| Some(&v.reference)).collect();
    ok.then(|| RunWork::new(report, &references).package_per_work())
}

/// Runs one VM with each phase's first `fraction` of instructions at `first` and the rest at
/// `rest`, switching at slice boundaries, idle time at the lowest P-state (drop).
fn run_split(class: &HardwareClass, spec: &VmSpec, plan: &[(usize, f64, usize)]) -> SimReport {
    let mut host = SimHost::new(class.clone(), vec![spec.clone()], config()).unwrap();
    for core in 0..host.core_count() {
        host.set_core_pstate(core, 0).unwrap();
    }
    let phases = &spec.workload.phases;
    while !host.all_finished() {
        let p = host.vm_phase(0) % phases.len();
        let (first, fraction, rest) = plan[p];
        let n = phases[p].instructions.unwrap();
        let k = if host.vm_phase_progress(0) < fraction * n { first } else { rest };
        host.set_vm_pstate(0, Some(k)).unwrap();
        host.step();
    }
    host.report()
}

/// A. For one VM the bound is the optimum over whole-run schedules: brute force over splits of
/// each phase between neighbouring P-states, run on the simulator, comes within 2% above it and
/// never below it.
#[test]
fn one_vm_bound_is_exact_against_brute_force_over_whole_run_schedules() {
    let phenom = class("phenom-9500");
    let spec = vm("soplex", Workload::builtin("450.soplex").unwrap().scaled(0.004));
    let theta = 0.9;
    let vms = bound_vms(&phenom, std::slice::from_ref(&spec), theta);
    let n = phenom.pstates.len();
    let mut options: Vec<(usize, f64, usize)> = (0..n).map(|k| (k, 1.0, k)).collect();
    for k in 0..n - 1 {
        options.extend([0.25, 0.5, 0.75].map(|a| (k, a, k + 1)));
    }
    let mut best = f64::INFINITY;
    let mut rejected = 0;
    for &a in &options {
        for &b in &options {
            match feasible_energy_per_work(&run_split(&phenom, &spec, &[a, b]), &vms) {
                Some(e) => best = best.min(e),
                None => rejected += 1,
            }
        }
    }
    assert!(rejected > 0 && best.is_finite(), "the threshold must bind ({rejected} rejected)");
    let bound = whole_run_bound(&phenom, &vms, &config()).unwrap();
    assert_eq!(bound.kind, BoundKind::Exact);
    let b = bound.energy_per_work;
    assert!(b <= best * (1.0 + 1e-3), "bound {b:.4} J/s above brute force {best:.4}");
    assert!(best <= b * 1.02, "brute force {best:.4} J/s more than 2% above the bound {b:.4}");
    // Without the threshold the bound is lower still: the threshold is what it was held to.
    let mut free = vms.clone();
    free[0].thresholds = Thresholds::NONE;
    let unconstrained = whole_run_bound(&phenom, &free, &config()).unwrap().energy_per_work;
    assert!(unconstrained < b * (1.0 - 1e-3), "{unconstrained} vs {b}: the threshold never bound");
    // The schedule does each phase's work and meets the threshold.
    let schedule = &bound.schedule[0];
    let (mut work, mut seconds) = (0.0, 0.0);
    for (p, phase) in schedule.phases.iter().enumerate() {
        let w: f64 = phase.slots.iter().map(|s| s.work_s).sum();
        let expected = spec.workload.phases[p].instructions.unwrap() / vms[0].reference.rates[p];
        assert!((w / expected - 1.0).abs() < 1e-6, "phase {p}: {w} vs {expected} reference s");
        work += w;
        seconds += phase.slots.iter().map(|s| s.seconds).sum::<f64>();
    }
    assert!(work / seconds >= theta * (1.0 - 1e-6), "ratio {}", work / seconds);
}

/// B. A phase that ends after a time: running slower does less work in the same time, which
/// the bound must not count as a saving. A CPU-bound phase's energy per instruction is what it
/// is at each P-state, so no mix beats the best fixed one.
#[test]
fn a_time_bounded_phase_gains_nothing_from_doing_less_work() {
    let phenom = class("phenom-9500");
    let timed = Workload::parse(
        "name = \"timed\"\n[[phases]]\nname = \"crunch\"\nduration_s = 4\ncpi_core = 0.65\n",
        std::path::Path::new("timed.toml"),
    )
    .unwrap();
    let spec = vm("timed", timed);
    let vms = bound_vms(&phenom, std::slice::from_ref(&spec), 0.5);
    let s = scenario(&phenom, std::slice::from_ref(&spec));
    let best = (0..phenom.pstates.len())
        .filter_map(|k| {
            let report = simulate::run(&s, &Policy::Fixed(vec![k])).unwrap().report;
            feasible_energy_per_work(&report, &vms)
        })
        .fold(f64::INFINITY, f64::min);
    let b = whole_run_bound(&phenom, &vms, &config()).unwrap().energy_per_work;
    assert!(b >= best * (1.0 - 1e-3), "bound {b:.4} J/s below the best fixed {best:.4}");
    assert!(b <= best * (1.0 + 1e-3), "bound {b:.4} J/s above the best fixed {best:.4}");
}

/// C. A server: the bound (which may serve fast and then idle) is never above a fixed P-state
/// that meets the thresholds, saturated (500 requests/s) or nearly idle (10).
#[test]
fn a_server_bound_is_below_every_fixed_p_state_that_meets_the_thresholds() {
    let phenom = class("phenom-9500");
    for (w, t) in [("httperf-500", 0.8), ("httperf-10", 0.7)] {
        let spec = vm(w, Workload::builtin(w).unwrap().scaled(0.05));
        let vms = bound_vms(&phenom, std::slice::from_ref(&spec), t);
        let bound = whole_run_bound(&phenom, &vms, &config()).unwrap();
        let b = bound.energy_per_work;
        assert!(b > 0.0);
        let s = scenario(&phenom, std::slice::from_ref(&spec));
        let mut feasible = 0;
        for k in 0..phenom.pstates.len() {
            let report = simulate::run(&s, &Policy::Fixed(vec![k])).unwrap().report;
            if let Some(e) = feasible_energy_per_work(&report, &vms) {
                feasible += 1;
                assert!(b <= e * (1.0 + 1e-9), "{w}: bound {b:.4} J/s above P{k}'s {e:.4}");
            }
        }
        assert!(feasible > 0, "{w}: some fixed P-state meets {t}");
    }
}

/// D. Several VMs: the lower bound is below the oracle's run and every fixed combination of
/// per-VM P-states that meets the thresholds, on a shared voltage plane and on per-core ones.
#[test]
fn several_vms_bound_is_below_the_oracle_and_every_fixed_combination() {
    for (name, scale) in [("phenom-9500", 0.0005), ("epyc-7502", 0.0003)] {
        let c = class(name);
        let specs = [
            vm("namd", Workload::builtin("444.namd").unwrap().scaled(scale)),
            vm("lbm", Workload::builtin("470.lbm").unwrap().scaled(scale)),
        ];
        let t = 0.7;
        let vms = bound_vms(&c, &specs, t);
        let bound = whole_run_bound(&c, &vms, &config()).unwrap();
        assert_eq!(bound.kind, BoundKind::LowerBound);
        let b = bound.energy_per_work;
        let s = scenario(&c, &specs);
        let oracle = simulate::run(&s, &Policy::Oracle(vec![Thresholds::new(t, t).unwrap()]));
        let oracle = oracle.unwrap().report;
        let references: Vec<_> = vms.iter().map(|v| Some(&v.reference)).collect();
        let e = RunWork::new(&oracle, &references).package_per_work();
        assert!(b <= e, "{name}: bound {b:.4} J/s above the oracle's {e:.4}");
        let n = c.pstates.len();
        let mut feasible = 0;
        for (k0, k1) in (0..n).flat_map(|a| (0..n).map(move |b| (a, b))) {
            let report = simulate::run(&s, &Policy::Fixed(vec![k0, k1])).unwrap().report;
            if let Some(e) = feasible_energy_per_work(&report, &vms) {
                feasible += 1;
                assert!(b <= e, "{name}: bound {b:.4} J/s above fixed ({k0}, {k1}): {e:.4}");
            }
        }
        assert!(feasible > 0, "{name}: some fixed combination meets {t}");
    }
}

/// Thresholds that no P-state can meet are an error naming the VM, not a panic.
#[test]
fn thresholds_no_schedule_can_meet_are_an_error_naming_the_vm() {
    let phenom = class("phenom-9500");
    let specs = [
        vm("namd", Workload::builtin("444.namd").unwrap().scaled(0.0002)),
        vm("lbm", Workload::builtin("470.lbm").unwrap().scaled(0.0002)),
    ];
    let mut vms = bound_vms(&phenom, &specs, 0.9);
    // A reference 20% faster than this host's f_max: a threshold of 0.9 is out of reach.
    vms[1].reference.rates.iter_mut().for_each(|r| *r *= 1.2);
    let err = whole_run_bound(&phenom, &vms, &config()).unwrap_err();
    assert!(matches!(&err, BoundError::Infeasible { vm, .. } if vm == "lbm"), "{err}");
    assert!(err.to_string().contains("lbm"), "{err}");
    vms[1].reference.rates.push(1.0);
    let err = whole_run_bound(&phenom, &vms, &config()).unwrap_err();
    assert!(matches!(err, BoundError::Reference { .. }), "{err}");
    assert!(err.to_string().contains("2 phase rates for a workload of 1"), "{err}");
    vms[1].reference.rates = vec![f64::NAN];
    let err = whole_run_bound(&phenom, &vms, &config()).unwrap_err();
    assert!(err.to_string().contains("NaN"), "{err}");
    assert!(matches!(whole_run_bound(&phenom, &[], &config()), Err(BoundError::NoVms)));
}

/// Probing cost in a release build: one VM on the Phenom, and 16 on an EPYC socket (run with
/// `cargo test --release -p vmgov-sim probe_timings -- --ignored --nocapture`).
#[test]
#[ignore = "timing: run in release"]
fn probe_timings() {
    let phenom = class("phenom-9500");
    for w in ["450.soplex", "httperf-500", "bonnie++"] {
        let spec = vm(w, Workload::builtin(w).unwrap().scaled(0.01));
        let vms = bound_vms(&phenom, std::slice::from_ref(&spec), 0.7);
        let start = std::time::Instant::now();
        let b = whole_run_bound(&phenom, &vms, &config()).unwrap();
        let took = start.elapsed();
        println!("phenom-9500, 1 VM ({w}): {took:?}, {:.3} J/s", b.energy_per_work);
        assert!(took.as_secs_f64() < 1.0, "{w}: {took:?}");
    }
    let epyc = class("epyc-7502");
    let names = crate::host::workload::evaluation_names();
    let specs: Vec<_> = (0..16)
        .map(|i| {
            let w = names[i % names.len()];
            vm(&format!("vm{i}"), Workload::builtin(w).unwrap().scaled(0.002))
        })
        .collect();
    let vms = bound_vms(&epyc, &specs, 0.7);
    let start = std::time::Instant::now();
    let b = whole_run_bound(&epyc, &vms, &config()).unwrap();
    let took = start.elapsed();
    println!("epyc-7502, 16 VMs: {took:?}, {:.3} J/s", b.energy_per_work);
    assert!(took.as_secs_f64() < 5.0, "16 VMs: {took:?}");
}

// --- The LP wrapper against pure schedules -------------------------------------------------

fn phase_strategy() -> impl Strategy<Value = LpPhase> {
    let modes = prop::collection::vec((0.1f64..10.0, 1.0f64..100.0), 1..=4);
    (0u8..3, 0.5f64..5.0, 0.5f64..50.0, 1.0f64..1.5, modes, 1.0f64..100.0).prop_map(
        |(kind, reference_rate, amount, slack, modes, idle_w)| {
            let mut modes: Vec<Mode> = modes
                .into_iter()
                .enumerate()
                .map(|(pstate, (rate, power_w))| Mode {
                    pstate,
                    kind: ModeKind::Drop,
                    rate,
                    power_w,
                })
                .collect();
            let end = match kind {
                0 => End::Work(amount),
                1 => End::Duration { seconds: amount, offered: None },
                _ => {
                    modes.push(Mode {
                        pstate: 0,
                        kind: ModeKind::Idle,
                        rate: 0.0,
                        power_w: idle_w,
                    });
                    End::Duration {
                        seconds: amount,
                        offered: Some(reference_rate * amount * slack),
                    }
                }
            };
            LpPhase { end, reference_rate, modes }
        },
    )
}

/// `E / W` of running each phase in one mode, if that meets the VM's constraints.
fn pure(vm: &LpVm, choice: &[usize]) -> Option<f64> {
    let (mut e, mut w, mut t, mut served, mut target) = (0.0, 0.0, 0.0, 0.0, 0.0);
    let mut ok = true;
    for (ph, &c) in vm.phases.iter().zip(choice) {
        let m = &ph.modes[c];
        let seconds = match ph.end {
            End::Work(n) => n / m.rate,
            End::Duration { seconds, offered } => {
                if let Some(o) = offered {
                    ok &= m.rate * seconds <= o;
                    served += m.rate * seconds;
                    target += ph.reference_rate * seconds;
                }
                seconds
            }
        };
        e += m.power_w * seconds;
        w += ph.work_coefficient(m) * seconds;
        t += seconds;
    }
    ok &= w >= vm.perf * t && (target <= 0.0 || served >= vm.throughput * target);
    (ok && w > 0.0).then(|| e / w)
}

fn choices(vm: &LpVm) -> Vec<Vec<usize>> {
    vm.phases.iter().fold(vec![Vec::new()], |acc, ph| {
        acc.into_iter()
            .flat_map(|c| {
                (0..ph.modes.len()).map(move |m| {
                    let mut c = c.clone();
                    c.push(m);
                    c
                })
            })
            .collect()
    })
}

/// `E / W` recomputed from the schedule the solver returned.
fn energy_per_work_of(program: &Program, solved: &Solved) -> f64 {
    let (mut e, mut w) = (0.0, 0.0);
    for (vm, seconds) in program.vms.iter().zip(&solved.seconds) {
        let mut busy = 0.0;
        for (ph, seconds) in vm.phases.iter().zip(seconds) {
            for (m, t) in ph.modes.iter().zip(seconds) {
                e += (m.power_w - program.fixed_w.unwrap_or(0.0)) * t;
                w += ph.work_coefficient(m) * t;
                busy += t;
            }
        }
        e += program.fixed_w.unwrap_or(0.0) * busy;
    }
    e / w
}

proptest! {
    /// E. On synthetic modes the bound is never above a feasible pure schedule, never below 0,
    /// infeasible only when no pure schedule is feasible (a mix can meet what none can), read
    /// back from its schedule, and the same with the several-VM decomposition for one VM.
    #[test]
    fn the_program_is_below_every_feasible_pure_schedule(
        phases in prop::collection::vec(phase_strategy(), 1..=3),
        perf in 0.0f64..1.0,
        throughput in 0.0f64..1.0,
        fixed_w in 0.0f64..50.0,
    ) {
        let vm = LpVm { phases, perf, throughput };
        let best = choices(&vm).iter().filter_map(|c| pure(&vm, c)).fold(f64::INFINITY, f64::min);
        let program = Program { vms: vec![vm], fixed_w: None };
        match program.solve() {
            Ok(solved) => {
                let b = solved.energy_per_work;
                prop_assert!(b >= 0.0, "{b}");
                prop_assert!(b <= best * (1.0 + 1e-6), "bound {b} above pure {best}");
                let again = energy_per_work_of(&program, &solved);
                prop_assert!((again / b - 1.0).abs() < 1e-6, "{again} read back vs {b}");
                let split = Program { fixed_w: Some(fixed_w), ..program.clone() };
                let s = split.solve().map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                prop_assert!(
                    (s.energy_per_work / b - 1.0).abs() < 1e-6,
                    "decomposed {} vs exact {b}", s.energy_per_work
                );
            }
            Err(LpFailure::Infeasible) => {
                prop_assert!(best.is_infinite(), "infeasible, but a pure schedule costs {best}");
            }
            Err(e) => prop_assert!(false, "{e:?}"),
        }
    }
}

/// Two programs microlp once failed on (a numerical error instead of "infeasible"): both are
/// infeasible, a performance threshold of 0.97 against a phase that runs at a fifth of its
/// reference.
#[test]
fn small_infeasible_programs_are_reported_infeasible() {
    for (rate0, rate1) in [(0.1, 9.339555155522516), (0.7722439612957053, 0.1)] {
        let vm = LpVm {
            phases: vec![
                LpPhase {
                    end: End::Work(18.257206153004148),
                    reference_rate: 3.778709016836272,
                    modes: vec![Mode {
                        pstate: 0,
                        kind: ModeKind::Drop,
                        rate: rate0,
                        power_w: 1.0,
                    }],
                },
                LpPhase {
                    end: End::Duration {
                        seconds: 39.69331717314431,
                        offered: Some(19.846658586572154),
                    },
                    reference_rate: 0.5,
                    modes: vec![
                        Mode { pstate: 0, kind: ModeKind::Drop, rate: rate1, power_w: 1.0 },
                        Mode {
                            pstate: 1,
                            kind: ModeKind::Drop,
                            rate: 2.1968209933981897,
                            power_w: 61.93509300121471,
                        },
                        Mode { pstate: 0, kind: ModeKind::Idle, rate: 0.0, power_w: 1.0 },
                    ],
                },
            ],
            perf: 0.9723285494031748,
            throughput: 0.0,
        };
        let program = Program { vms: vec![vm], fixed_w: None };
        assert!(matches!(program.solve(), Err(LpFailure::Infeasible)), "{:?}", program.solve());
    }
}
