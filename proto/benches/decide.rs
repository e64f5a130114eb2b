//! Fast-path cost: derive features, predict every P-state and decide, for one VM.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use vmgov_proto::{
    EnergyModel, Feature, LinearFit, Objective, PState, PStateModel, PStateTable, Predictor,
    Ratios, RawCounters, Thresholds, decide, features, model::TrainingInfo,
};

fn model(pstates: usize) -> EnergyModel {
    let table =
        PStateTable::new((0..pstates).map(|i| PState::new(1.0e9 + 1e8 * i as f64)).collect())
            .expect("increasing table");
    let n = Feature::REPORT.len();
    let fit = |k: f64| LinearFit {
        intercept: k,
        coefficients: (0..n).map(|j| k * 1e-3 * j as f64).collect(),
    };
    let per_pstate = table
        .as_slice()
        .iter()
        .map(|p| {
            let s = p.frequency_hz / table.max_frequency_hz();
            PStateModel {
                frequency_hz: p.frequency_hz,
                perf: fit(s),
                power: fit(s * s),
                throughput: fit(1.0),
            }
        })
        .collect();
    EnergyModel {
        hardware_class: "bench".into(),
        version: 1,
        pstates: table,
        features: Feature::REPORT.to_vec(),
        per_pstate,
        training: TrainingInfo::default(),
    }
}

fn counters() -> RawCounters {
    RawCounters {
        timeslice_seconds: 0.01,
        instructions: 20_000_000,
        cycles: 22_000_000,
        l2_misses: 200_000,
        l3_misses: 100_000,
        memory_accesses: 120_000,
        disk_reads: 3,
        disk_read_bytes: 12_288,
        packets_rx: 5,
        cpu_time_ns: 15_000_000,
        vcpus: 2,
        ..RawCounters::default()
    }
}

fn bench(c: &mut Criterion) {
    let thresholds = Thresholds::new(0.7, 0.7).expect("valid thresholds");
    for pstates in [5, 16] {
        let predictor = Predictor::new(&model(pstates)).expect("valid model");
        let mut out = vec![Ratios::default(); pstates];
        let raw = counters();
        c.bench_function(&format!("features+predict+decide/{pstates}-pstates"), |b| {
            b.iter(|| {
                let fv = features::derive(black_box(&raw)).expect("valid counters");
                predictor.predict_into(&fv, &mut out).expect("features present");
                black_box(decide(&out, &thresholds, Objective::Energy))
            });
        });
        let fv = features::derive(&raw).expect("valid counters");
        c.bench_function(&format!("predict+decide/{pstates}-pstates"), |b| {
            b.iter(|| {
                predictor.predict_into(black_box(&fv), &mut out).expect("features present");
                black_box(decide(&out, &thresholds, Objective::Energy))
            });
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
