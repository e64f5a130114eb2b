//! Training time: `train::train` on 1,000,000 labelled samples of one hardware class (the
//! Phenom 9500's 5 P-states, so 200,000 per P-state), the report's 8 features, OLS, 5-fold
//! cross-validation: per P-state one full fit and five fold fits of the three targets, 90 fits
//! in all (OLS factorises each of the 30 designs once for its three targets), on every core.
//!
//! The samples are generated once, deterministically (`support/data.rs`: ChaCha8, realistic raw
//! counters of 10 ms slices, labels from a known linear law times uniform ±2 % noise); only
//! `train::train` is timed, over `RUNS` runs, and the bench prints each run, the median and the
//! rate. One run takes seconds, so criterion's ten samples plus warm-up would take two minutes
//! on a 2-core machine for no better figure: this bench times the runs itself
//! (`harness = false`).
//!
//! It also prints the model's accuracy: the cross-validated mean MAPE and R² per target (over the
//! P-states) that training records, where the ±2 % uniform noise alone puts MAPE at about 1 %,
//! and the MAPE against the noiseless law on 10,000 fresh samples, which is how close the
//! model comes to the truth. Run without `--bench` (as `cargo test --all-targets` runs it) the
//! bench only checks itself, on `TEST_SAMPLES` samples and one run.

#![allow(clippy::print_stdout, reason = "a bench prints what it measured")]

#[path = "support/data.rs"]
mod data;

use std::{hint::black_box, time::Instant};

use vmgov_coordinator::train::{self, TrainRequest};
use vmgov_proto::{Algorithm, Feature, Predictor, Target, features};

const SAMPLES: usize = 1_000_000;
const RUNS: usize = 5;
const FRESH: usize = 10_000;
/// Samples and runs when run as a test (`cargo test --all-targets` runs benches without
/// `--bench`): a quick check that the bench works, as criterion's test mode does.
const TEST_SAMPLES: usize = 10_000;

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    let (n, runs) = if measure { (SAMPLES, RUNS) } else { (TEST_SAMPLES, 1) };
    let req = TrainRequest {
        hardware_class: data::CLASS.into(),
        version: 1,
        pstates: data::pstates(),
        features: Feature::REPORT.to_vec(),
        algorithm: Algorithm::Ols,
        alpha: 0.0,
        folds: 5,
        created_unix_ms: 0,
        notes: "bench".into(),
    };
    let start = Instant::now();
    let samples = data::samples(n, 7, data::NOISE);
    println!(
        "train: generated {n} samples in {:.2} s (not timed below)",
        start.elapsed().as_secs_f64()
    );

    let mut times = Vec::with_capacity(runs);
    let mut model = None;
    for run in 1..=runs {
        let start = Instant::now();
        let m = train::train(black_box(&req), black_box(&samples)).expect("the samples train");
        let t = start.elapsed().as_secs_f64();
        println!("train: run {run}/{runs}: {t:.3} s");
        times.push(t);
        model = Some(m);
    }
    let model = model.expect("at least one run");
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "train: {n} samples, {} P-states, {} features, OLS, {} folds: median {median:.3} s \
         (min {:.3} s, max {:.3} s over {runs} runs), {:.0} samples/s",
        req.pstates.len(),
        req.features.len(),
        req.folds,
        times[0],
        times[times.len() - 1],
        n as f64 / median,
    );

    let predictor = Predictor::new(&model).expect("a trained model compiles");
    let fresh = data::samples(FRESH, 8, 0.0);
    let mut truth_ape = [0.0; 3];
    for s in &fresh {
        let fv = features::derive(&s.counters).expect("generated counters derive");
        let all = predictor.predict(&fv).expect("every feature is measured");
        let p = all[s.pstate];
        for (sum, (got, want)) in truth_ape.iter_mut().zip([
            (p.perf, s.labels.perf),
            (p.power, s.labels.power),
            (p.throughput, s.labels.throughput),
        ]) {
            *sum += ((got - want) / want).abs();
        }
    }
    for (i, target) in Target::ALL.into_iter().enumerate() {
        let mape = model.mean_mape(target).expect("the model has quality figures");
        let (r2_sum, n) = model
            .training
            .quality
            .iter()
            .filter(|q| q.target == target)
            .fold((0.0, 0.0), |(s, n), q| (s + q.r2, n + 1.0));
        println!(
            "train: {target}: cross-validated mean MAPE {:.3} % (labels ±{:.0} % uniform noise), \
             mean R² {:.3}; MAPE against the noiseless law on {FRESH} fresh samples {:.4} %",
            mape * 100.0,
            data::NOISE * 100.0,
            r2_sum / n,
            truth_ape[i] / FRESH as f64 * 100.0,
        );
    }
    println!("train: dropped features: {:?}", model.training.dropped_features);
}
