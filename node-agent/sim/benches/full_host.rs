//! Simulation speed on a full host: one socket of EPYC 7502 (32 cores) with 16 VMs of 2 vCPUs,
//! each running two copies of its workload (SPECrate-style, [`Workload::copies`]), so all 32
//! cores are busy; the workloads cycle through namd, lbm, soplex, libquantum, bonnie++ and a web
//! server at 200 requests/s. Ten simulated minutes at 10 ms timeslices under the performance
//! governor (60,000 slices), and the same host at half its cores (8 VMs). The aim is 3,000× real
//! time: 0.2 s per ten simulated minutes.
//!
//! `oracle` times the per-phase oracle on the 16-VM host with every workload scaled to 5% (the
//! lab's quick runs), at a 0.7 threshold: its re-plans at every phase change dominate.

use criterion::{Criterion, criterion_group, criterion_main};
use vmgov_proto::Thresholds;
use vmgov_sim::{
    HardwareClass, SimConfig, VmSpec, Workload,
    governor::GovernorKind,
    simulate::{self, Policy, Scenario},
};

const MIX: [&str; 6] =
    ["444.namd", "470.lbm", "450.soplex", "462.libquantum", "bonnie++", "httperf-200"];

/// `vms` VMs of 2 vCPUs on one EPYC socket, each running two copies of the next workload of
/// [`MIX`] scaled by `scale`.
fn full_host(vms: usize, scale: f64, max_time_s: f64) -> Scenario {
    Scenario {
        class: HardwareClass::builtin("epyc-7502").expect("built-in class"),
        vms: (0..vms)
            .map(|i| VmSpec {
                name: format!("vm{i}"),
                vcpus: 2,
                affinity: None,
                workload: Workload::builtin(MIX[i % MIX.len()])
                    .expect("built-in workload")
                    .copies(2)
                    .scaled(scale),
            })
            .collect(),
        config: SimConfig::default(),
        max_time_s,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("full-host");
    group.sample_size(10);
    let performance = Policy::Governor(GovernorKind::Performance);
    for vms in [16, 8] {
        let scenario = full_host(vms, 10.0, 600.0);
        group.bench_function(format!("ten-minutes-32-cores-{vms}-vms-10ms"), |b| {
            b.iter(|| simulate::run(&scenario, &performance).expect("runs"));
        });
    }
    let scenario = full_host(16, 0.05, 3600.0);
    let oracle = Policy::Oracle(vec![Thresholds::new(0.7, 0.7).expect("valid thresholds")]);
    group.bench_function("oracle-32-cores-16-vms-scale-0.05", |b| {
        b.iter(|| simulate::run(&scenario, &oracle).expect("runs"));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
