//! The agent's tick for 64 VMs on a 16-core simulated host.
//!
//! - `pure`: what the fast path computes every slice, without actors: derive features, predict
//!   every P-state and decide for each of 64 VMs, then arbitrate (follow).
//! - `actors`: one whole slice of the running agent (host loop + 64 VM actors on a 2-worker
//!   runtime), simulated host step included, measured over many slices.
//!
//! It also prints the agent's memory per VM: resident memory of a running agent with 512 VMs,
//! less that of the same simulated host without the agent, divided by 512.
#![allow(clippy::print_stdout, reason = "a benchmark reports its figures")]

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use vmgov_agent::{
    agent::{Agent, AgentSettings, LocalThresholds, Policy},
    arbiter::{self, ArbiterPolicy, Inputs, VmInput},
    fastpath::{self, Scratch, VmPolicy},
    platform::sim::{HardwareClass, SimConfig, SimHost, SimPlatform, VmSpec, Workload},
};
use vmgov_proto::{
    EnergyModel, Feature, LinearFit, Objective, PStateModel, PStateTable, Predictor, Thresholds,
    model::TrainingInfo,
};

fn class(cores: usize) -> HardwareClass {
    let mut c = HardwareClass::builtin("epyc-7502").expect("built-in class");
    c.cores = cores;
    c
}

fn model(table: &PStateTable) -> EnergyModel {
    let fmax = table.max_frequency_hz();
    EnergyModel {
        hardware_class: "epyc-7502".into(),
        version: 1,
        pstates: table.clone(),
        features: Feature::REPORT.to_vec(),
        per_pstate: table
            .as_slice()
            .iter()
            .map(|p| {
                let s = p.frequency_hz / fmax;
                let fit = |k: f64| LinearFit {
                    intercept: k,
                    coefficients: vec![0.0, 30.0 * (1.0 - s), 0.0, 1e-5, 0.0, 0.0, 0.0, 0.0],
                };
                PStateModel {
                    frequency_hz: p.frequency_hz,
                    perf: fit(s),
                    power: fit(s * s),
                    throughput: fit(1.0),
                }
            })
            .collect(),
        training: TrainingInfo::default(),
    }
}

const WORKLOADS: [&str; 4] = ["470.lbm", "444.namd", "httperf-200", "bonnie++"];

fn host(cores: usize, vms: usize) -> SimHost {
    let specs = (0..vms)
        .map(|i| VmSpec {
            name: format!("vm{i}"),
            vcpus: 2,
            affinity: None,
            workload: Workload::builtin(WORKLOADS[i % WORKLOADS.len()])
                .expect("built-in workload")
                .scaled(100.0),
        })
        .collect();
    SimHost::new(class(cores), specs, SimConfig::default()).expect("valid host")
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn bench(c: &mut Criterion) {
    let mut sim = host(16, 64);
    let table = class(16).pstate_table().expect("table");
    let predictor = Predictor::new(&model(&table)).expect("valid model");
    let thresholds = Some(Thresholds::new(0.7, 0.7).expect("valid"));
    // Warm the host so the counters are those of a running slice.
    for _ in 0..10 {
        sim.step();
    }
    let sample = sim.step().clone();
    let mut scratch: Vec<Scratch> = (0..64).map(|_| Scratch::default()).collect();
    let fallback = vec![2; 16];
    let busy: Vec<f64> = sample.cores.iter().map(|c| c.busy).collect();
    let mut group = c.benchmark_group("agent-tick");
    group.bench_function("pure/64-vms-16-cores", |b| {
        b.iter(|| {
            let policy = VmPolicy {
                predictor: Some(&predictor),
                thresholds,
                objective: Objective::Energy,
                floor: 0,
            };
            let vms: Vec<VmInput> = sample
                .vms
                .iter()
                .zip(scratch.iter_mut())
                .map(|(s, scratch)| {
                    let choice = fastpath::choose(black_box(&s.counters), &policy, scratch);
                    VmInput {
                        vm: s.vm,
                        vcpus: 2,
                        affinity: u64::from(u16::MAX),
                        choice: choice.pstate,
                    }
                })
                .collect();
            black_box(arbiter::arbitrate(
                ArbiterPolicy::Follow,
                &Inputs {
                    vms: &vms,
                    fallback: &fallback,
                    busy: &busy,
                    placement: black_box(&sample.placement),
                },
            ))
        });
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let policy = Policy {
        predictor: Some(Arc::new(Predictor::new(&model(&table)).expect("valid model"))),
        thresholds: LocalThresholds { default: thresholds, ..LocalThresholds::default() },
        objective: Objective::Energy,
    };
    let mut agent = runtime.block_on(async {
        Agent::start(
            Box::new(SimPlatform::new(host(16, 64))),
            AgentSettings::default(),
            policy.clone(),
            None,
        )
        .await
        .expect("agent starts")
    });
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("actors/64-vms-16-cores-one-slice", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = agent.status().slices;
                let t = std::time::Instant::now();
                agent.wait_slices(start + iters).await;
                t.elapsed()
            })
        });
    });
    group.finish();
    runtime.block_on(async { drop(agent.shutdown().await) });

    // Memory per VM.
    let n = 512;
    let before = resident_bytes();
    let bare = host(64, n);
    let with_host = resident_bytes();
    drop(bare);
    let agent = runtime.block_on(async {
        let mut a = Agent::start(
            Box::new(SimPlatform::new(host(64, n))),
            AgentSettings::default(),
            policy,
            None,
        )
        .await
        .expect("agent starts");
        a.wait_slices(20).await;
        a
    });
    let with_agent = resident_bytes();
    let host_bytes = with_host.saturating_sub(before);
    let per_vm = with_agent.saturating_sub(before).saturating_sub(host_bytes) / n as u64;
    let status = agent.status();
    println!(
        "memory: {n} VMs, agent resident growth beyond the simulated host {} KiB => about {} bytes per VM ({} VMs seen)",
        with_agent.saturating_sub(before).saturating_sub(host_bytes) / 1024,
        per_vm,
        status.vms.len()
    );
    runtime.block_on(async { drop(agent.shutdown().await) });
}

criterion_group!(benches, bench);
criterion_main!(benches);
