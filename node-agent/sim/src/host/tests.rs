//! Tests that hold the simulated host to physics and to the published figures it was
//! calibrated from (sources in `docs/calibration.md`).

use super::*;
use crate::control::FrequencyControl;

fn host(class: &str, workloads: &[(&str, f64)]) -> SimHost {
    let vms = workloads
        .iter()
        .enumerate()
        .map(|(i, (w, scale))| VmSpec {
            name: format!("vm{i}"),
            vcpus: 2,
            affinity: None,
            workload: Workload::builtin(w).unwrap().scaled(*scale),
        })
        .collect();
    let config = SimConfig { counter_noise: 0.0, ..SimConfig::default() };
    SimHost::new(HardwareClass::builtin(class).unwrap(), vms, config).unwrap()
}

/// Runs to completion with every VM at `pstate` (idle time at the lowest), returns the report.
fn run_fixed(mut h: SimHost, pstate: usize) -> SimReport {
    for vm in 0..h.vm_count() {
        h.set_vm_pstate(vm, Some(pstate)).unwrap();
    }
    for core in 0..h.core_count() {
        h.set_core_pstate(core, 0).unwrap();
    }
    let mut steps = 0;
    while !h.all_finished() {
        h.step();
        steps += 1;
        assert!(steps < 2_000_000, "runaway simulation");
    }
    h.report()
}

/// Runtime (or time) ratio f_max / P-state, i.e. the performance ratio, for one workload alone.
fn perf_ratio(class: &str, w: &str, scale: f64, pstate: usize) -> f64 {
    let top = HardwareClass::builtin(class).unwrap().pstates.len() - 1;
    let t = |p| run_fixed(host(class, &[(w, scale)]), p).vms[0].finished_at_s.unwrap();
    t(top) / t(pstate)
}

#[test]
fn memory_bound_work_keeps_its_speed_while_cpu_bound_work_follows_the_clock() {
    let clock_ratio = 1.4 / 2.2;
    let namd = perf_ratio("phenom-9500", "444.namd", 0.0005, 0);
    assert!(
        (namd - clock_ratio).abs() < 0.03,
        "namd at 1.4 GHz runs at {namd:.3} of its f_max speed"
    );
    for w in ["470.lbm", "462.libquantum"] {
        let r = perf_ratio("phenom-9500", w, 0.0005, 0);
        assert!(
            r > 0.8,
            "{w} at 1.4 GHz runs at {r:.3} of its f_max speed; memory-bound work should lose little"
        );
    }
}

/// Published per-core power: Phenom dynamic 15.0/12.5/10.8/9.2/7.3 W by P-state
/// (calibration README 3.1, [DERIVED] from 139 W measured at 2.6 GHz) plus leakage
/// 2.1 W·(V/1.2)³; EPYC 7502 core power 0.96/1.72/2.33 W per busy core at 1.5/2.2/2.5 GHz
/// (measured, Schöne et al. 2021).
#[test]
fn busy_core_power_per_pstate_matches_the_published_figures() {
    let phenom_dynamic = [7.3, 9.2, 10.8, 12.5, 15.0];
    let volts = [1.050, 1.100, 1.125, 1.150, 1.200];
    for (p, (dynamic, v)) in phenom_dynamic.iter().zip(volts).enumerate() {
        let r = run_fixed(host("phenom-9500", &[("444.namd", 0.0002)]), p);
        let watts = r.vms[0].energy_j / r.vms[0].busy_s;
        let expected: f64 = dynamic + 2.1 * (v / 1.2f64).powi(3);
        assert!(
            (watts / expected - 1.0).abs() < 0.03,
            "P{p}: {watts:.2} W vs published {expected:.2} W"
        );
    }
    for (p, published) in [0.96, 1.72, 2.33].into_iter().enumerate() {
        let r = run_fixed(host("epyc-7502", &[("444.namd", 0.0002)]), p);
        let watts = r.vms[0].energy_j / r.vms[0].busy_s;
        assert!(
            (watts / published - 1.0).abs() < 0.08,
            "EPYC P{p}: {watts:.3} W vs measured {published} W"
        );
    }
}

#[test]
fn an_idle_host_draws_exactly_its_idle_power() {
    for class in ["phenom-9500", "epyc-7502"] {
        let c = HardwareClass::builtin(class).unwrap();
        let mut h = SimHost::new(c.clone(), Vec::new(), SimConfig::default()).unwrap();
        for core in 0..h.core_count() {
            h.set_core_pstate(core, 0).unwrap();
        }
        for _ in 0..100 {
            h.step();
        }
        let v = c.pstates[0].voltage_v.unwrap();
        let f = c.pstates[0].frequency_hz;
        let p = &c.power;
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let per_core = c.cores as f64
            * (p.ceff_farads * v * v * f * p.idle_activity
                + physics::leakage_watts(p, v) * p.idle_leakage_fraction);
        // One transition from the initial f_max costs no energy of its own: idle power is the same.
        let expected = (per_core + p.uncore_watts) * h.time_s();
        let got = h.report().package_energy_j;
        assert!((got / expected - 1.0).abs() < 1e-6, "{class}: {got} J vs {expected} J");
    }
}

#[test]
fn energy_is_conserved_between_the_meter_and_the_truth() {
    let mut h =
        host("phenom-9500", &[("470.lbm", 0.0003), ("httperf-200", 0.02), ("bonnie++", 0.002)]);
    let mut metered = 0.0;
    let mut g = crate::governor::Baseline::new(crate::governor::GovernorKind::Ondemand);
    while !h.all_finished() {
        let s = h.step().clone();
        metered += s.package_energy_j.unwrap();
        g.update(&s, &mut h).unwrap();
    }
    let r = h.report();
    assert!(
        (metered / r.package_energy_j - 1.0).abs() < 1e-9,
        "{metered} vs {}",
        r.package_energy_j
    );
    assert!((r.core_energy_j + r.uncore_energy_j - r.package_energy_j).abs() < 1e-6);
    // Energy attributed to VMs is part of the cores' energy, never more.
    let attributed: f64 = r.vms.iter().map(|v| v.energy_j).sum();
    assert!(attributed > 0.0 && attributed < r.core_energy_j);
    // Mean power lies between an idle host at the lowest P-state and every core flat out.
    let c = HardwareClass::builtin("phenom-9500").unwrap();
    let vmax = 1.2;
    let max_w = 4.0 * (c.power.ceff_farads * vmax * vmax * 2.2e9 + c.power.leakage_watts)
        + c.power.uncore_watts
        + c.power.uncore_watts_per_gbps * 8.0;
    assert!(r.average_power_w() < max_w && r.average_power_w() > c.power.uncore_watts);
}

#[test]
fn no_pstate_beats_the_physical_bound_on_core_energy() {
    // A fully memory-bound job at 1.4 GHz saves at most 51.3% of core energy on these P-states
    // (calibration README 7, bounds.py): no workload may do better.
    for w in workload::evaluation_names() {
        let scale = if Workload::builtin(w).unwrap().is_server() { 0.01 } else { 0.0003 };
        let top = run_fixed(host("phenom-9500", &[(w, scale)]), 4).core_energy_j;
        let low = run_fixed(host("phenom-9500", &[(w, scale)]), 0).core_energy_j;
        assert!(low / top > 1.0 - 0.513, "{w}: core energy ratio {:.3} beats the bound", low / top);
    }
}

#[test]
fn a_saturated_server_loses_throughput_at_low_frequency_and_a_light_one_does_not() {
    let thr =
        |w: &str, p| run_fixed(host("phenom-9500", &[(w, 0.05)]), p).vms[0].throughput_ratio();
    assert!(thr("httperf-500", 4) > 0.99, "500 req/s at f_max: {}", thr("httperf-500", 4));
    assert!(thr("httperf-500", 0) < 0.9, "500 req/s at 1.4 GHz: {}", thr("httperf-500", 0));
    for p in 0..5 {
        assert!(thr("httperf-10", p) > 0.99, "10 req/s at P{p}: {}", thr("httperf-10", p));
    }
}

#[test]
fn more_vcpus_than_cores_share_time_fairly() {
    // Three VMs with two busy threads each: six vCPUs on four cores.
    let mut w = Workload::builtin("train-cpu").unwrap();
    w.phases.retain(|p| p.threads == 2);
    let mut h = SimHost::new(
        HardwareClass::builtin("phenom-9500").unwrap(),
        (0..3)
            .map(|i| VmSpec {
                name: format!("vm{i}"),
                vcpus: 2,
                affinity: None,
                workload: w.clone(),
            })
            .collect(),
        SimConfig { counter_noise: 0.0, ..SimConfig::default() },
    )
    .unwrap();
    for _ in 0..200 {
        h.step();
    }
    let r = h.report();
    let busy: Vec<f64> = r.vms.iter().map(|v| v.busy_s).collect();
    let total: f64 = busy.iter().sum();
    assert!(
        (total - 4.0 * r.time_s).abs() < 1e-6,
        "cores idle while vCPUs wait: {total} of {}",
        4.0 * r.time_s
    );
    for b in &busy {
        assert!((b / (total / 3.0) - 1.0).abs() < 1e-6, "unfair shares {busy:?}");
    }
    for s in &h.last_sample().vms {
        assert!((s.busy - 2.0 / 3.0).abs() < 1e-6);
    }
}

#[test]
fn affinity_masks_are_honoured() {
    let w = Workload::builtin("444.namd").unwrap().scaled(0.01);
    let mut h = SimHost::new(
        HardwareClass::builtin("phenom-9500").unwrap(),
        vec![
            VmSpec { name: "pinned".into(), vcpus: 2, affinity: Some(0b0100), workload: w.clone() },
            VmSpec { name: "free".into(), vcpus: 2, affinity: None, workload: w },
        ],
        SimConfig::default(),
    )
    .unwrap();
    for _ in 0..50 {
        let s = h.step();
        assert!((s.cores[2].busy - 1.0).abs() < 1e-9, "core 2 should run the pinned vCPU");
        for p in &s.placement {
            if p.vm == 0 {
                assert_eq!(p.core, 2, "the pinned VM ran on core {}", p.core);
            } else {
                assert_ne!(p.core, 2, "the free VM ran on the pinned core");
            }
        }
        let pinned: f64 = s.placement.iter().filter(|p| p.vm == 0).map(|p| p.share).sum();
        assert!((pinned - 1.0).abs() < 1e-12, "the pinned vCPU ran {pinned} of the slice");
        assert!(s.cores[2].busy + s.cores.iter().map(|c| c.busy).sum::<f64>() > 1.99);
    }
    let bad = SimHost::new(
        HardwareClass::builtin("phenom-9500").unwrap(),
        vec![VmSpec {
            name: "x".into(),
            vcpus: 1,
            affinity: Some(1 << 9),
            workload: Workload::builtin("444.namd").unwrap(),
        }],
        SimConfig::default(),
    );
    assert!(bad.unwrap_err().to_string().contains("affinity"));
}

#[test]
fn a_neighbours_memory_traffic_slows_a_memory_bound_vm() {
    let alone =
        run_fixed(host("phenom-9500", &[("470.lbm", 0.0003)]), 4).vms[0].finished_at_s.unwrap();
    let shared = run_fixed(host("phenom-9500", &[("470.lbm", 0.0003), ("470.lbm", 0.0003)]), 4);
    let together = shared.vms[0].finished_at_s.unwrap();
    assert!(
        together > alone * 1.1,
        "lbm+lbm {together:.2} s vs alone {alone:.2} s: no bandwidth contention"
    );
    let namd_alone =
        run_fixed(host("phenom-9500", &[("444.namd", 0.0002)]), 4).vms[0].finished_at_s.unwrap();
    let namd_shared =
        run_fixed(host("phenom-9500", &[("444.namd", 0.0002), ("470.lbm", 0.0003)]), 4);
    assert!(
        (namd_shared.vms[0].finished_at_s.unwrap() / namd_alone - 1.0).abs() < 0.02,
        "namd barely uses memory"
    );
}

#[test]
fn counters_report_what_happened() {
    let mut h = host("phenom-9500", &[("bonnie++", 0.002), ("httperf-200", 0.02)]);
    h.set_counter_noise(0.02);
    let (mut instr, mut write_bytes, mut rx) = (0u64, 0u64, 0u64);
    while !h.all_finished() {
        let s = h.step();
        instr += s.vms[0].counters.instructions;
        write_bytes += s.vms[0].counters.disk_write_bytes;
        rx += s.vms[1].counters.packets_rx;
        assert_eq!(s.vms[0].counters.vcpus, 2);
    }
    let r = h.report();
    #[allow(clippy::cast_precision_loss, reason = "test magnitudes")]
    let (instr, rx) = (instr as f64, rx as f64);
    assert!((instr / r.vms[0].instructions - 1.0).abs() < 0.01, "noise should average out");
    assert!(write_bytes > 0);
    // httperf-200 for 2.4 s: ~480 requests of 5 packets each.
    assert!((rx / (r.vms[1].requests_served * 5.0) - 1.0).abs() < 0.01, "{rx} packets");
}

#[test]
fn runs_are_deterministic_for_a_seed() {
    let run = |seed| {
        let mut h = host("phenom-9500", &[("462.libquantum", 0.0001), ("httperf-500", 0.01)]);
        h.config.seed = seed;
        h.rng = ChaCha8Rng::seed_from_u64(seed);
        h.set_counter_noise(0.05);
        let mut counters = Vec::new();
        while !h.all_finished() {
            counters.push(h.step().vms[0].counters.instructions);
        }
        (counters, h.report())
    };
    assert_eq!(run(7), run(7));
    assert_ne!(run(7).0, run(8).0);
}

#[test]
fn shared_plane_holds_every_core_at_the_fastest_cores_voltage() {
    // Two single-thread VMs, one at f_max and one at the lowest P-state: the slow one's core
    // burns power at 1.2 V, not at 1.05 V.
    let w = || Workload::builtin("444.namd").unwrap().scaled(0.01);
    let run = |other: usize| {
        let mut h = SimHost::new(
            HardwareClass::builtin("phenom-9500").unwrap(),
            vec![
                VmSpec { name: "slow".into(), vcpus: 1, affinity: Some(0b01), workload: w() },
                VmSpec { name: "other".into(), vcpus: 1, affinity: Some(0b10), workload: w() },
            ],
            SimConfig { counter_noise: 0.0, ..SimConfig::default() },
        )
        .unwrap();
        h.set_vm_pstate(0, Some(0)).unwrap();
        h.set_vm_pstate(1, Some(other)).unwrap();
        for c in 0..4 {
            h.set_core_pstate(c, 0).unwrap();
        }
        for _ in 0..100 {
            h.step();
        }
        let t = h.vm_truth(0).unwrap();
        t.energy_j / t.busy_s
    };
    let (alone_low, beside_fast) = (run(0), run(4));
    let expected = (1.2f64 / 1.05).powi(2);
    assert!(beside_fast / alone_low > expected * 0.95, "{alone_low:.2} W vs {beside_fast:.2} W");
    // A per-core-voltage class has no such coupling.
    assert!(HardwareClass::builtin("epyc-7502").unwrap().voltage_domain == VoltageDomain::PerCore);
}

#[test]
fn frequency_control_refuses_what_the_hardware_lacks() {
    let mut h = host("phenom-9500", &[("444.namd", 0.0001)]);
    assert!(matches!(
        h.set_core_pstate(4, 0),
        Err(PlatformError::NoSuchCore { core: 4, cores: 4 })
    ));
    assert!(matches!(
        h.set_core_pstate(0, 5),
        Err(PlatformError::NoSuchPState { pstate: 5, len: 5 })
    ));
    assert!(matches!(h.set_vm_pstate(3, Some(0)), Err(PlatformError::NoSuchVm(3))));
    assert!(matches!(h.set_vm_affinity(0, 1 << 7), Err(PlatformError::NoSuchCore { .. })));
    assert_eq!(h.core_pstate(1).unwrap(), 4);
}
