//! Deterministic labelled samples for the coordinator benches.
//!
//! The class is the report's machine, the Phenom 9500 with its five P-states (1.4 to 2.2 GHz).
//! Each sample is one 10 ms slice of a 2-vCPU VM with raw counters in realistic ranges (5 to 50
//! million instructions, 0.1-3 % L2 misses per instruction, disk requests of 4 KiB to 256 KiB, up
//! to 20,000 packets/s), and its labels come from a known law, linear in the report's eight
//! features at each P-state, times uniform ±2 % noise. The same seed gives the same samples.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use vmgov_coordinator::train::LabelledSample;
use vmgov_proto::{Feature, PState, PStateTable, Ratios, RawCounters, features};

/// The hardware class of every sample.
pub(crate) const CLASS: &str = "phenom-9500";

/// The class's P-states (frequency Hz, voltage V), slowest first.
const PSTATES: [(f64, f64); 5] =
    [(1.4e9, 1.050), (1.6e9, 1.100), (1.8e9, 1.125), (2.0e9, 1.150), (2.2e9, 1.200)];

/// Relative noise on labels the benches use: uniform in ±this.
pub(crate) const NOISE: f64 = 0.02;

/// The class's P-state table.
pub(crate) fn pstates() -> PStateTable {
    PStateTable::new(PSTATES.iter().map(|&(f, v)| PState::with_voltage(f, v)).collect())
        .expect("the Phenom 9500 table is valid")
}

/// One 10 ms slice of a 2-vCPU VM.
fn counters(rng: &mut ChaCha8Rng) -> RawCounters {
    let instructions = rng.random_range(5_000_000..50_000_000_u64);
    let per_instruction = |rng: &mut ChaCha8Rng, lo: f64, hi: f64| -> u64 {
        let rate: f64 = rng.random_range(lo..hi);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a positive count far below 2^53"
        )]
        let n = (rate * instructions as f64) as u64;
        n
    };
    let l2_misses = per_instruction(rng, 0.001, 0.03);
    let l3_misses = per_instruction(rng, 0.000_2, 0.01);
    let memory_accesses = per_instruction(rng, 0.000_3, 0.015);
    let cycles = per_instruction(rng, 0.8, 3.0);
    let disk_reads = rng.random_range(0..12_u64);
    let disk_writes = rng.random_range(0..8_u64);
    let packets_rx = rng.random_range(0..200_u64);
    let packets_tx = rng.random_range(0..200_u64);
    RawCounters {
        timeslice_seconds: 0.01,
        instructions,
        cycles,
        l2_misses,
        l3_misses,
        memory_accesses,
        disk_reads,
        disk_read_bytes: disk_reads * rng.random_range(4096..131_072_u64),
        disk_writes,
        disk_write_bytes: disk_writes * rng.random_range(4096..262_144_u64),
        packets_rx,
        bytes_rx: packets_rx * rng.random_range(64..1500_u64),
        packets_tx,
        bytes_tx: packets_tx * rng.random_range(64..1500_u64),
        cpu_time_ns: rng.random_range(1_000_000..20_000_000_u64),
        vcpus: 2,
        ..RawCounters::default()
    }
}

/// The known law: ratios at P-state `pstate` of a slice with features `x`, without noise.
/// Memory-bound and I/O-bound slices lose less performance at lower clocks, misses cut power,
/// network-heavy slices lose throughput.
fn law(pstate: usize, c: &RawCounters) -> Ratios {
    let f = features::derive(c).expect("generated counters derive");
    let x = |feature| f.get(feature).expect("every counter is measured");
    let s = PSTATES[pstate].0 / PSTATES[PSTATES.len() - 1].0;
    let slack = 1.0 - s;
    Ratios {
        perf: s + slack
            * (12.0 * x(Feature::L3MissesPerInstruction)
                + 4.0 * x(Feature::MemoryAccessesPerInstruction)
                + 1.5e-4 * x(Feature::DiskReadsPerSecond)
                + 2e-9 * x(Feature::DiskReadBytesPerSecond)
                + 5e-5 * x(Feature::DiskWritesPerSecond)),
        power: s.powf(2.5)
            - slack
                * (3.0 * x(Feature::L2MissesPerInstruction)
                    + 5.0 * x(Feature::L3MissesPerInstruction))
            + 1e-6 * x(Feature::PacketsPerSecond),
        throughput: 1.0
            - slack
                * (2.5e-5 * x(Feature::PacketsPerSecond)
                    + 1e-9 * x(Feature::DiskWriteBytesPerSecond)),
    }
}

/// `n` labelled samples spread evenly over the P-states, from `seed`, with labels times uniform
/// `1 ± noise` (0: the exact law).
pub(crate) fn samples(n: usize, seed: u64, noise: f64) -> Vec<LabelledSample> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let pstate = i % PSTATES.len();
            let counters = counters(&mut rng);
            let exact = law(pstate, &counters);
            let mut noisy =
                |v: f64| if noise > 0.0 { v * (1.0 + rng.random_range(-noise..noise)) } else { v };
            let labels = Ratios {
                perf: noisy(exact.perf),
                power: noisy(exact.power),
                throughput: noisy(exact.throughput),
            };
            LabelledSample { pstate, counters, labels }
        })
        .collect()
}
