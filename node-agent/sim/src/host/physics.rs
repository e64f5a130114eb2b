//! The simulated host's physics, as pure functions.
//!
//! Execution (calibration README section 1): an instruction takes `cpi_core / f + S_mem · c`
//! seconds, where `S_mem` is the memory stall per instruction with an idle memory system and
//! `c ≥ 1` is the queueing factor of the socket's DRAM bandwidth, `c = 1 / (1 − ρ)` with `ρ` the
//! bandwidth demand of everything running over the sustainable bandwidth, solved
//! self-consistently because demand itself falls as stalls grow.
//!
//! Power per core: `C_eff · V² · f · activity + P_leak · (V / V_ref)^k`, where activity is 1 for
//! retiring cycles, `stall_activity` for cycles stalled on memory and `idle_activity` for a halted
//! core; package power adds the uncore, `P_uncore + w · GB/s of DRAM traffic`.
//!
//! Time sharing: each core's capacity is split max-min fairly among the vCPUs that want it, and
//! vCPUs of one affinity group are packed onto its cores with McNaughton's wrap-around rule,
//! which is exact for preemptive scheduling of jobs no longer than a slice.

use super::class::PowerParams;

/// Seconds one instruction keeps a vCPU busy at `frequency_hz`: core cycles, memory stall
/// (scaled by the bandwidth factor `contention`) and the CPU cost of its share of disk I/O.
#[inline]
pub fn busy_seconds_per_instruction(
    cpi_core: f64,
    mem_stall_s: f64,
    io_cycles_per_instruction: f64,
    frequency_hz: f64,
    contention: f64,
) -> f64 {
    (cpi_core + io_cycles_per_instruction) / frequency_hz + mem_stall_s * contention
}

/// Dynamic power of one core, watts.
#[inline]
pub fn dynamic_watts(p: &PowerParams, voltage_v: f64, frequency_hz: f64, activity: f64) -> f64 {
    p.ceff_farads * voltage_v * voltage_v * frequency_hz * activity
}

/// Leakage power of one core at `voltage_v`, watts.
#[inline]
pub fn leakage_watts(p: &PowerParams, voltage_v: f64) -> f64 {
    p.leakage_watts * (voltage_v / p.leakage_ref_voltage_v).powf(p.leakage_exponent)
}

/// Activity of a running core whose time is a fraction `stalled` stalled on memory.
#[inline]
pub fn running_activity(p: &PowerParams, stalled: f64) -> f64 {
    (1.0 - stalled) + p.stall_activity * stalled
}

/// Solves `c = 1 / (1 − demand(c) / bandwidth)` for the bandwidth queueing factor, where
/// `demand(c)` (bytes/s) does not increase with `c`. Returns 1 when nothing uses memory.
///
/// Newton's method on `h(c) = c·(1 − demand(c)/bandwidth) − 1`, which rises monotonically from
/// `h(1) ≤ 0`, kept inside a shrinking bracket so that it can never diverge.
pub fn bandwidth_contention(bandwidth: f64, demand: impl Fn(f64) -> f64) -> f64 {
    let h = |c: f64| c * (1.0 - demand(c) / bandwidth) - 1.0;
    if demand(1.0) <= 0.0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (1.0, 2.0);
    while h(hi) < 0.0 && hi < 1e6 {
        lo = hi;
        hi *= 2.0;
    }
    let mut c = lo;
    for _ in 0..60 {
        let hc = h(c);
        if hc.abs() < 1e-12 {
            break;
        }
        if hc < 0.0 {
            lo = c;
        } else {
            hi = c;
        }
        let step = 1e-7 * c;
        let slope = (h(c + step) - hc) / step;
        let next = c - hc / slope;
        // Fall back to bisection whenever Newton leaves the bracket.
        c = if slope > 0.0 && next > lo && next < hi { next } else { 0.5 * (lo + hi) };
        if hi - lo < 1e-12 * hi {
            break;
        }
    }
    c
}

/// Max-min fair split of `capacity` among `wants` (each also capped at 1, a vCPU runs on one
/// core at a time), written into `shares`.
pub fn fair_shares(wants: &[f64], capacity: f64, shares: &mut [f64]) {
    let total: f64 = wants.iter().sum();
    if total <= capacity {
        shares.copy_from_slice(wants);
        return;
    }
    // Water-filling: raise a common level until the capacity is used. A negative share marks a
    // vCPU whose share is not fixed yet (no scratch allocation on the per-step path).
    shares.fill(-1.0);
    let mut remaining = capacity;
    loop {
        let unfilled = shares.iter().filter(|s| **s < 0.0).count();
        if unfilled == 0 {
            return;
        }
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let level = remaining / unfilled as f64;
        let mut progressed = false;
        for (share, &want) in shares.iter_mut().zip(wants) {
            if *share < 0.0 && want <= level {
                *share = want;
                remaining -= want;
                progressed = true;
            }
        }
        if !progressed {
            for share in shares.iter_mut().filter(|s| **s < 0.0) {
                *share = level;
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn contention_is_one_without_memory_traffic_and_grows_with_demand() {
        assert!((bandwidth_contention(8e9, |_| 0.0) - 1.0).abs() < 1e-12);
        // Demand independent of c: c = 1 / (1 - rho).
        let c = bandwidth_contention(8e9, |_| 4e9);
        assert!((c - 2.0).abs() < 1e-6, "{c}");
        // Demand that would exceed the bandwidth at c = 1 still gives a finite, self-consistent c.
        let demand = |c: f64| 12e9 / c;
        let c = bandwidth_contention(8e9, demand);
        assert!((c * (1.0 - demand(c) / 8e9) - 1.0).abs() < 1e-6, "{c}");
    }

    #[test]
    fn fair_shares_split_evenly_when_oversubscribed() {
        let mut s = [0.0; 3];
        fair_shares(&[1.0, 1.0, 1.0], 2.0, &mut s);
        for v in s {
            assert!((v - 2.0 / 3.0).abs() < 1e-12);
        }
        fair_shares(&[0.2, 1.0, 1.0], 1.2, &mut s);
        assert!(
            (s[0] - 0.2).abs() < 1e-12 && (s[1] - 0.5).abs() < 1e-12 && (s[2] - 0.5).abs() < 1e-12
        );
    }

    proptest! {
        #[test]
        fn fair_shares_never_exceed_wants_or_capacity(
            wants in proptest::collection::vec(0.0f64..=1.0, 1..12),
            capacity in 0.1f64..8.0,
        ) {
            let mut s = vec![0.0; wants.len()];
            fair_shares(&wants, capacity, &mut s);
            let total: f64 = s.iter().sum();
            prop_assert!(total <= capacity + 1e-9);
            let want_total: f64 = wants.iter().sum();
            prop_assert!((total - want_total.min(capacity)).abs() < 1e-9, "{} vs {}", total, want_total.min(capacity));
            for (w, v) in wants.iter().zip(&s) {
                prop_assert!(*v <= *w + 1e-12 && *v >= 0.0);
            }
        }

        #[test]
        fn contention_solves_its_equation(bw in 1e9f64..1e11, base in 0.0f64..3e11) {
            let demand = |c: f64| base / c.powf(0.8);
            let c = bandwidth_contention(bw, demand);
            prop_assert!(c >= 1.0);
            if base > 0.0 {
                prop_assert!((c * (1.0 - demand(c) / bw) - 1.0).abs() < 1e-6);
            }
        }
    }
}
