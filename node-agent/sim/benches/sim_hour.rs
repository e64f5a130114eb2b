//! Simulation speed: one simulated hour of a 4-core Phenom host with three VMs (lbm, namd and a
//! web server at 200 requests/s) at 10 ms timeslices, under the ondemand governor. The aim is
//! 10,000× real time: 0.36 s per simulated hour.

use criterion::{Criterion, criterion_group, criterion_main};
use vmgov_sim::{
    HardwareClass, SimConfig, VmSpec, Workload,
    governor::GovernorKind,
    simulate::{self, Policy, Scenario},
};

fn bench(c: &mut Criterion) {
    let vm = |i: usize, w: &str| VmSpec {
        name: format!("vm{i}"),
        vcpus: 2,
        affinity: None,
        workload: Workload::builtin(w).expect("built-in workload").scaled(10.0),
    };
    let scenario = Scenario {
        class: HardwareClass::builtin("phenom-9500").expect("built-in class"),
        vms: vec![vm(0, "470.lbm"), vm(1, "444.namd"), vm(2, "httperf-200")],
        config: SimConfig::default(),
        max_time_s: 3600.0,
    };
    let mut group = c.benchmark_group("simulated-host");
    group.sample_size(10);
    group.bench_function("one-hour-4-cores-3-vms-10ms", |b| {
        b.iter(|| {
            simulate::run(&scenario, &Policy::Governor(GovernorKind::Ondemand)).expect("runs")
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
