//! The trainer's least squares against numpy's (`numpy.linalg.lstsq`) on the same noisy data:
//! the coefficients must agree to 1e-6 relative. numpy comes from PyPI (tools/test installs it).

use std::{io::Write, process::Command};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmgov_coordinator::train::{LabelledSample, TrainRequest, train};
use vmgov_proto::{Algorithm, Feature, PState, PStateTable, Ratios, RawCounters, Target, features};

#[test]
fn ordinary_least_squares_matches_numpy() {
    let mut rng = ChaCha8Rng::seed_from_u64(2013);
    let mut samples = Vec::new();
    for i in 0..3000 {
        let mut r = |hi: u64| rng.random_range(0..hi);
        let counters = RawCounters {
            timeslice_seconds: 0.01,
            instructions: 10_000_000,
            l2_misses: r(500_000),
            l3_misses: r(300_000),
            memory_accesses: r(400_000),
            packets_rx: r(100),
            disk_reads: r(50),
            disk_read_bytes: r(2_000_000),
            disk_writes: r(20),
            disk_write_bytes: r(1_000_000),
            vcpus: 2,
            ..RawCounters::default()
        };
        let f = features::derive(&counters).unwrap();
        let x = |feat| f.get(feat).unwrap();
        let noise = rng.random_range(-0.02..0.02);
        let perf = 0.6 + 8.0 * x(Feature::L3MissesPerInstruction)
            - 2.0 * x(Feature::L2MissesPerInstruction)
            + 1e-3 * x(Feature::DiskReadsPerSecond)
            + noise;
        samples.push(LabelledSample {
            pstate: i % 2,
            counters,
            labels: Ratios { perf, power: 0.5 + noise, throughput: 1.0 },
        });
    }
    let request = TrainRequest {
        hardware_class: "numpy".into(),
        version: 1,
        pstates: PStateTable::new(vec![PState::new(1e9), PState::new(2e9)]).unwrap(),
        features: Feature::REPORT.to_vec(),
        algorithm: Algorithm::Ols,
        alpha: 0.0,
        folds: 5,
        created_unix_ms: 0,
        notes: String::new(),
    };
    let model = train(&request, &samples).unwrap();
    assert!(model.training.dropped_features.is_empty(), "{:?}", model.training.dropped_features);

    // The same design matrix for P-state 0, perf, handed to numpy.
    let dir = std::env::temp_dir().join(format!("vmgov-numpy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("data.csv");
    let mut out = std::fs::File::create(&csv).unwrap();
    for s in samples.iter().filter(|s| s.pstate == 0) {
        let f = features::derive(&s.counters).unwrap();
        let row: Vec<String> =
            Feature::REPORT.iter().map(|&x| format!("{:e}", f.get(x).unwrap())).collect();
        writeln!(out, "{},{:e}", row.join(","), s.labels.perf).unwrap();
    }
    drop(out);
    // Raw features span 1e-3 (misses per instruction) to 1e8 (bytes per second): the raw design
    // matrix has a condition number near 1e10, where lstsq itself is only good to about 1e-4.
    // Scaling each column by its norm (and the solution back) is the textbook remedy and leaves
    // the least-squares problem the same.
    let script = "import sys, numpy as np\n\
        d = np.loadtxt(sys.argv[1], delimiter=',')\n\
        X = np.hstack([np.ones((d.shape[0], 1)), d[:, :-1]])\n\
        n = np.linalg.norm(X, axis=0)\n\
        beta = np.linalg.lstsq(X / n, d[:, -1], rcond=None)[0] / n\n\
        print(' '.join(repr(float(b)) for b in beta))\n";
    let result = Command::new("python3").arg("-c").arg(script).arg(&csv).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        result.status.success(),
        "numpy failed (tools/test installs it with pip): {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let numpy: Vec<f64> = String::from_utf8_lossy(&result.stdout)
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let fit = model.per_pstate[0].fit(Target::Perf);
    let ours: Vec<f64> =
        std::iter::once(fit.intercept).chain(fit.coefficients.iter().copied()).collect();
    assert_eq!(numpy.len(), ours.len());
    for (i, (a, b)) in ours.iter().zip(&numpy).enumerate() {
        let scale = b.abs().max(1e-12);
        assert!((a - b).abs() / scale < 1e-6, "coefficient {i}: ours {a:e}, numpy {b:e}");
    }
}
