//! Training against data whose answer is known: exact recovery, the smartcore pitfalls
//! (constant and duplicated columns, NaN), refusals of degenerate data, cross-validation figures.

use proptest::prelude::*;
use vmgov_proto::PState;

use super::*;

fn table() -> PStateTable {
    PStateTable::new([1.4e9, 1.8e9, 2.2e9].into_iter().map(PState::new).collect()).unwrap()
}

fn request(algorithm: Algorithm) -> TrainRequest {
    TrainRequest {
        hardware_class: "test".into(),
        version: 1,
        pstates: table(),
        features: Feature::REPORT.to_vec(),
        algorithm,
        alpha: 0.0,
        folds: 5,
        created_unix_ms: 0,
        notes: String::new(),
    }
}

/// Counters with the given misses per kilo-instruction and rates; the features derived from
/// them are exact functions of these numbers.
fn counters(l2: u64, l3: u64, mem: u64, packets: u64, reads: u64, writes: u64) -> RawCounters {
    RawCounters {
        timeslice_seconds: 0.01,
        instructions: 10_000_000,
        cycles: 20_000_000,
        l2_misses: l2 * 10_000,
        l3_misses: l3 * 10_000,
        memory_accesses: mem * 10_000,
        packets_rx: packets,
        disk_reads: reads,
        disk_read_bytes: reads * 4096,
        disk_writes: writes,
        disk_write_bytes: writes * 65_536,
        vcpus: 2,
        ..RawCounters::default()
    }
}

/// Labels from an exact linear law in the derived features, per P-state.
fn law(pstate: usize, c: &RawCounters) -> Ratios {
    let f = features::derive(c).unwrap();
    let x = |feat| f.get(feat).unwrap();
    #[allow(clippy::cast_precision_loss, reason = "small")]
    let s = (pstate as f64 + 1.0) / 3.0;
    Ratios {
        perf: s
            + 20.0 * (1.0 - s) * x(Feature::L3MissesPerInstruction)
            + 1e-4 * x(Feature::DiskReadsPerSecond),
        power: s * s - 3.0 * x(Feature::L2MissesPerInstruction),
        throughput: 1.0 - (1.0 - s) * 1e-4 * x(Feature::PacketsPerSecond),
    }
}

fn samples(n: usize, seed: u64, with_network: bool) -> Vec<LabelledSample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for i in 0..n {
        let pstate = i % 3;
        let r = |rng: &mut ChaCha8Rng, hi: u64| rand::RngExt::random_range(rng, 0..hi);
        let c = counters(
            r(&mut rng, 50),
            r(&mut rng, 30),
            r(&mut rng, 40),
            if with_network { r(&mut rng, 50) } else { 0 },
            r(&mut rng, 20),
            r(&mut rng, 10),
        );
        out.push(LabelledSample { pstate, labels: law(pstate, &c), counters: c });
    }
    out
}

/// What the fits say for a sample, before the physical bounds the [`vmgov_proto::Predictor`]
/// applies: the law here is synthetic and need not respect them.
fn fitted(m: &EnergyModel, s: &LabelledSample) -> Ratios {
    let f = features::derive(&s.counters).unwrap();
    let x: Vec<f64> = m.features.iter().map(|&feat| f.get(feat).unwrap()).collect();
    let p = &m.per_pstate[s.pstate];
    Ratios {
        perf: predict(&p.perf, &x),
        power: predict(&p.power, &x),
        throughput: predict(&p.throughput, &x),
    }
}

#[test]
fn ols_recovers_an_exact_linear_law() {
    let data = samples(600, 1, true);
    let m = train(&request(Algorithm::Ols), &data).unwrap();
    assert!(m.validate().is_ok());
    for s in data.iter().take(50) {
        let got = fitted(&m, s);
        assert!((got.perf - s.labels.perf).abs() < 1e-9, "{got:?} vs {:?}", s.labels);
        assert!((got.power - s.labels.power).abs() < 1e-9);
        assert!((got.throughput - s.labels.throughput).abs() < 1e-9);
    }
    assert_eq!(m.training.quality.len(), 9);
    for q in &m.training.quality {
        assert!(q.r2 > 0.999_999 && q.mae < 1e-9 && q.mape < 1e-9, "{q:?}");
    }
    assert_eq!(m.training.sample_count, 600);
}

#[test]
fn constant_columns_get_coefficient_zero_not_1e11() {
    // A CPU-and-disk-only training set: the network column is constant zero.
    let data = samples(300, 2, false);
    let m = train(&request(Algorithm::Ols), &data).unwrap();
    // Packets are constant; read and write bytes are exact multiples of the read and write
    // counts in this data, so they are collinear and dropped too.
    assert_eq!(
        m.training.dropped_features,
        vec![
            Feature::PacketsPerSecond,
            Feature::DiskReadBytesPerSecond,
            Feature::DiskWriteBytesPerSecond
        ]
    );
    let col = Feature::REPORT.iter().position(|f| *f == Feature::PacketsPerSecond).unwrap();
    for p in &m.per_pstate {
        for t in Target::ALL {
            assert!(p.fit(t).coefficients[col].abs() < f64::EPSILON);
        }
    }
    // The model is valid: no absurd magnitudes.
    assert!(m.validate().is_ok());
}

#[test]
fn a_duplicated_column_is_dropped_and_the_fit_stays_sane() {
    // Disk read bytes are exactly 4096 × reads: the two columns are collinear.
    let data = samples(300, 3, true);
    let m = train(&request(Algorithm::Ols), &data).unwrap();
    for p in &m.per_pstate {
        for t in Target::ALL {
            assert!(p.fit(t).coefficients.iter().all(|c| c.abs() < 1e3), "{:?}", p.fit(t));
        }
    }
    let got = fitted(&m, &data[7]);
    let s = &data[7];
    assert!((got.perf - s.labels.perf).abs() < 1e-9);
}

#[test]
fn ridge_and_lasso_fit_with_an_intercept() {
    for algorithm in [Algorithm::Ridge, Algorithm::Lasso] {
        let mut req = request(algorithm);
        req.alpha = 1e-4;
        let data = samples(600, 4, true);
        let m = train(&req, &data).unwrap();
        assert_eq!(m.training.algorithm, algorithm);
        for q in &m.training.quality {
            assert!(q.r2 > 0.99, "{algorithm:?}: {q:?}");
        }
        // The intercept is fitted (ridge with normalize=false alone would force it to 0).
        assert!(m.per_pstate[2].perf.intercept > 0.5, "{algorithm:?}: {:?}", m.per_pstate[2].perf);
    }
}

#[test]
fn degenerate_data_is_refused_with_the_reason() {
    let mut data = samples(300, 5, true);
    data.retain(|s| s.pstate != 1);
    assert!(matches!(
        train(&request(Algorithm::Ols), &data),
        Err(TrainError::NoSamples { pstate: 1, .. })
    ));
    let data = samples(30, 5, true);
    assert!(matches!(
        train(&request(Algorithm::Ols), &data),
        Err(TrainError::TooFewSamples { .. })
    ));
    let mut data = samples(300, 5, true);
    data[17].labels.power = f64::NAN;
    let e = train(&request(Algorithm::Ols), &data).unwrap_err();
    assert!(matches!(e, TrainError::BadSample { sample: 17, .. }), "{e}");
    let mut data = samples(300, 5, true);
    data[3].pstate = 9;
    assert!(matches!(
        train(&request(Algorithm::Ols), &data),
        Err(TrainError::UnknownPState { sample: 3, .. })
    ));
    let mut data = samples(300, 5, true);
    data[4].counters.unavailable = [vmgov_proto::Counter::Network].into_iter().collect();
    assert!(
        train(&request(Algorithm::Ols), &data)
            .unwrap_err()
            .to_string()
            .contains("packets_per_second")
    );
    let mut req = request(Algorithm::Ols);
    req.folds = 1;
    assert!(matches!(train(&req, &samples(300, 5, true)), Err(TrainError::BadRequest(_))));
}

#[test]
fn cross_validation_reports_honest_errors_on_noisy_data() {
    let mut data = samples(900, 6, true);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    for s in &mut data {
        let noise: f64 = rand::RngExt::random_range(&mut rng, -0.05..0.05);
        s.labels.perf += noise;
    }
    let m = train(&request(Algorithm::Ols), &data).unwrap();
    let perf: Vec<_> = m.training.quality.iter().filter(|q| q.target == Target::Perf).collect();
    for q in perf {
        // Uniform noise of ±0.05 has a mean absolute value of 0.025.
        assert!((q.mae - 0.025).abs() < 0.006, "{q:?}");
        assert!(q.mape > 0.0 && q.r2 < 1.0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn any_finite_well_sized_data_trains_a_valid_model_or_says_why(
        seed in 0u64..1000,
        n in 60usize..300,
        network in any::<bool>(),
        algorithm in prop_oneof![Just(Algorithm::Ols), Just(Algorithm::Ridge), Just(Algorithm::Lasso)],
    ) {
        let mut req = request(algorithm);
        req.alpha = 1e-3;
        match train(&req, &samples(n, seed, network)) {
            Ok(m) => prop_assert!(m.validate().is_ok()),
            Err(e) => prop_assert!(matches!(e, TrainError::TooFewSamples { .. }), "{}", e),
        }
    }
}

/// Folds and P-states train side by side on every core: the model, its cross-validated figures
/// included, is the same every time.
#[test]
fn training_on_every_core_gives_the_same_model_every_time() {
    let mut data = samples(1500, 11, true);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for s in &mut data {
        s.labels.power += rand::RngExt::random_range(&mut rng, -0.02..0.02);
    }
    let req = request(Algorithm::Ols);
    let first = train(&req, &data).unwrap();
    for _ in 0..3 {
        assert_eq!(train(&req, &data).unwrap(), first);
    }
    let q = &first.training.quality;
    assert_eq!(q.len(), 3 * req.pstates.len(), "one figure per P-state and target");
    assert!(q.iter().enumerate().all(|(i, f)| f.pstate_index as usize == i / 3));
}
