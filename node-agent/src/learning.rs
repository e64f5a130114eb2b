//! Learning mode, pure: the P-state sweep and the labels it produces.
//!
//! The host runs at each P-state in turn for a dwell window, with a short f_max reference window
//! before and after every one. A slice measured at P-state f is labelled against the mean of the
//! two reference windows around it, so that its performance, power and throughput ratios compare
//! like with like (the same program phase, minutes apart at most), which a single reference
//! measured at the start could not. The reference slices are labelled too (ratios near 1), so
//! every P-state including f_max has samples. The first slice after every switch is discarded:
//! it straddles the transition. A measured window whose two references disagree by more than
//! [`PHASE_CHANGE`] is discarded too: the program changed phase in between, and no reference
//! compares like with like.

use vmgov_proto::{Ratios, RawCounters};

/// Relative difference between the references before and after a window beyond which the
/// window is discarded as straddling a phase change.
pub const PHASE_CHANGE: f64 = 0.15;

/// How to sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweepPlan {
    /// P-states in the table.
    pub pstates: usize,
    /// Slices spent at each P-state other than f_max.
    pub dwell_slices: u32,
    /// Slices of each f_max reference window.
    pub reference_slices: u32,
}

/// One slice as learning sees it: the VM's counters and the package's energy.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The VM's counter deltas.
    pub counters: RawCounters,
    /// Package energy over the slice, joules.
    pub package_energy_j: f64,
    /// Start of the slice, Unix ns.
    pub start_unix_ns: u64,
}

/// A slice with its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// The P-state the slice ran at.
    pub pstate: usize,
    /// The slice.
    pub observation: Observation,
    /// Its ratios against f_max.
    pub labels: Ratios,
}

/// Mean rates over a window of slices.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Means {
    ips: f64,
    watts: f64,
    net_bytes_per_s: f64,
}

impl Means {
    /// The ratios of these rates to `reference`'s.
    pub(crate) fn against(self, reference: Self) -> Ratios {
        Ratios {
            perf: ratio(self.ips, reference.ips),
            power: ratio(self.watts, reference.watts),
            throughput: ratio(self.net_bytes_per_s, reference.net_bytes_per_s),
        }
    }

    /// True when two references taken around a window agree: the program kept its phase.
    pub(crate) fn steady_with(self, other: Self) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() <= PHASE_CHANGE * a.max(b);
        close(self.ips, other.ips) && close(self.net_bytes_per_s, other.net_bytes_per_s)
    }

    /// The mean of two references.
    pub(crate) fn midpoint(self, other: Self) -> Self {
        Self {
            ips: 0.5 * (self.ips + other.ips),
            watts: 0.5 * (self.watts + other.watts),
            net_bytes_per_s: 0.5 * (self.net_bytes_per_s + other.net_bytes_per_s),
        }
    }
}

#[allow(clippy::cast_precision_loss, reason = "per-slice counts are far below 2^53")]
fn rates(o: &Observation) -> Means {
    let t = o.counters.timeslice_seconds.max(1e-12);
    Means {
        ips: o.counters.instructions as f64 / t,
        watts: o.package_energy_j / t,
        net_bytes_per_s: (o.counters.bytes_rx + o.counters.bytes_tx) as f64 / t,
    }
}

/// Mean rates over `window`; `None` when it is empty.
pub(crate) fn mean(window: &[Observation]) -> Option<Means> {
    if window.is_empty() {
        return None;
    }
    #[allow(clippy::cast_precision_loss, reason = "small counts")]
    let n = window.len() as f64;
    let sum = window.iter().map(rates).fold(Means::default(), |a, b| Means {
        ips: a.ips + b.ips,
        watts: a.watts + b.watts,
        net_bytes_per_s: a.net_bytes_per_s + b.net_bytes_per_s,
    });
    Some(Means { ips: sum.ips / n, watts: sum.watts / n, net_bytes_per_s: sum.net_bytes_per_s / n })
}

fn ratio(x: f64, reference: f64) -> f64 {
    if x.is_nan() || reference.is_nan() {
        // Not measured (a host without an energy meter): unknown, not 1.
        f64::NAN
    } else if reference > 0.0 {
        x / reference
    } else {
        // A VM that sends nothing has lost no throughput.
        1.0
    }
}

fn label(o: &Observation, reference: Means) -> Ratios {
    rates(o).against(reference)
}

/// The sweep's state.
#[derive(Debug, Clone)]
pub struct Sweep {
    plan: SweepPlan,
    /// Window number: even windows are references, odd ones measure a P-state.
    window: u64,
    slice: u32,
    previous_reference: Vec<Observation>,
    reference: Vec<Observation>,
    measured: Vec<Observation>,
    measured_pstate: usize,
    /// Measured windows discarded because the program changed phase.
    pub discarded_windows: u64,
}

impl Sweep {
    /// A sweep that starts with a reference window.
    pub fn new(plan: SweepPlan) -> Self {
        let plan = SweepPlan {
            pstates: plan.pstates.max(1),
            dwell_slices: plan.dwell_slices.max(2),
            reference_slices: plan.reference_slices.max(2),
        };
        Self {
            plan,
            window: 0,
            slice: 0,
            previous_reference: Vec::new(),
            reference: Vec::new(),
            measured: Vec::new(),
            measured_pstate: 0,
            discarded_windows: 0,
        }
    }

    fn top(&self) -> usize {
        self.plan.pstates - 1
    }

    fn is_reference(&self) -> bool {
        self.window.is_multiple_of(2) || self.plan.pstates == 1
    }

    /// The P-state measured in odd window `w`: every P-state below f_max in turn, fastest first.
    fn pstate_of(&self, window: u64) -> usize {
        let below = (self.plan.pstates - 1).max(1) as u64;
        let k = (window / 2) % below;
        #[allow(clippy::cast_possible_truncation, reason = "k < pstates")]
        let k = k as usize;
        self.top().saturating_sub(1 + k)
    }

    /// The P-state the host should run the next slice at.
    pub fn pstate(&self) -> usize {
        if self.is_reference() { self.top() } else { self.pstate_of(self.window) }
    }

    /// Fraction of one full cycle through the P-states done, in [0, 1].
    pub fn cycle_fraction(&self) -> f64 {
        let windows = 2 * (self.plan.pstates as u64 - 1).max(1);
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let f = (self.window % windows) as f64 / windows as f64;
        f
    }

    /// Takes the slice that just ran at [`Self::pstate`]; returns the slices that can now be
    /// labelled (a measured window is labelled once the reference after it is complete).
    pub fn observe(&mut self, o: Observation) -> Vec<Labelled> {
        let first = self.slice == 0;
        self.slice += 1;
        let reference = self.is_reference();
        if !first {
            if reference { self.reference.push(o) } else { self.measured.push(o) }
        }
        let length = if reference { self.plan.reference_slices } else { self.plan.dwell_slices };
        if self.slice < length {
            return Vec::new();
        }
        // The window is over.
        self.slice = 0;
        let mut out = Vec::new();
        if reference {
            if let Some(now) = mean(&self.reference) {
                let top = self.top();
                out.extend(self.reference.iter().map(|o| Labelled {
                    pstate: top,
                    labels: label(o, now),
                    observation: o.clone(),
                }));
                let before = mean(&self.previous_reference);
                let steady = before.is_none_or(|b| b.steady_with(now));
                let both = before.map_or(now, |b| b.midpoint(now));
                let p = self.measured_pstate;
                if steady {
                    out.extend(self.measured.drain(..).map(|o| Labelled {
                        pstate: p,
                        labels: label(&o, both),
                        observation: o,
                    }));
                } else if !self.measured.is_empty() {
                    self.measured.clear();
                    self.discarded_windows += 1;
                }
            }
            self.previous_reference = std::mem::take(&mut self.reference);
        } else {
            self.measured_pstate = self.pstate_of(self.window);
        }
        self.window += 1;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(ips: f64, watts: f64) -> Observation {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "test values")]
        let instructions = (ips * 0.01) as u64;
        Observation {
            counters: RawCounters {
                timeslice_seconds: 0.01,
                instructions,
                vcpus: 1,
                ..RawCounters::default()
            },
            package_energy_j: watts * 0.01,
            start_unix_ns: 0,
        }
    }

    /// A workload whose speed and power follow the P-state exactly: perf ∝ f, power ∝ f³.
    fn run(plan: SweepPlan, slices: usize, drift: f64) -> Vec<Labelled> {
        let mut s = Sweep::new(plan);
        let mut out = Vec::new();
        for i in 0..slices {
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let f = (s.pstate() + 1) as f64 / plan.pstates as f64;
            // The program's own speed drifts slowly (phase change): references must follow it.
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let phase = 1.0 + drift * i as f64;
            out.extend(s.observe(obs(1e9 * f * phase, 50.0 * f * f * f)));
        }
        out
    }

    #[test]
    fn labels_compare_each_pstate_with_the_reference_around_it() {
        let plan = SweepPlan { pstates: 5, dwell_slices: 10, reference_slices: 4 };
        let labelled = run(plan, 400, 0.0);
        for p in 0..5 {
            let mine: Vec<_> = labelled.iter().filter(|l| l.pstate == p).collect();
            assert!(!mine.is_empty(), "no samples at P-state {p}");
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let f = (p + 1) as f64 / 5.0;
            for l in mine {
                assert!((l.labels.perf - f).abs() < 1e-9, "P{p}: perf {}", l.labels.perf);
                assert!((l.labels.power - f * f * f).abs() < 1e-9);
                assert!((l.labels.throughput - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn interleaved_references_cancel_a_drifting_program() {
        let plan = SweepPlan { pstates: 5, dwell_slices: 10, reference_slices: 4 };
        // The program speeds up 0.1% per slice: 40% over the run. A reference taken once at the
        // start would make every later ratio wrong by up to 40%; bracketing keeps the error to
        // the drift within one window.
        for l in run(plan, 400, 0.001).iter().filter(|l| l.pstate < 4) {
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let f = (l.pstate + 1) as f64 / 5.0;
            assert!(
                (l.labels.perf / f - 1.0).abs() < 0.02,
                "P{}: {} vs {f}",
                l.pstate,
                l.labels.perf
            );
        }
    }

    #[test]
    fn a_window_across_a_phase_change_is_discarded() {
        let plan = SweepPlan { pstates: 3, dwell_slices: 5, reference_slices: 3 };
        let mut s = Sweep::new(plan);
        let mut labelled = Vec::new();
        for i in 0..30 {
            // The program doubles its speed at slice 5, inside the first measured window.
            let speed = if i < 5 { 1e9 } else { 2e9 };
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let f = (s.pstate() + 1) as f64 / 3.0;
            labelled.extend(s.observe(obs(speed * f, 10.0)));
        }
        assert_eq!(s.discarded_windows, 1);
        for l in labelled.iter().filter(|l| l.pstate < 2) {
            #[allow(clippy::cast_precision_loss, reason = "small")]
            let f = (l.pstate + 1) as f64 / 3.0;
            assert!((l.labels.perf - f).abs() < 1e-6, "P{} labelled {}", l.pstate, l.labels.perf);
        }
    }

    #[test]
    fn the_first_slice_after_a_switch_is_discarded_and_order_is_fastest_first() {
        let plan = SweepPlan { pstates: 3, dwell_slices: 5, reference_slices: 3 };
        let mut s = Sweep::new(plan);
        let mut seen = Vec::new();
        for _ in 0..40 {
            seen.push(s.pstate());
            s.observe(obs(1e9, 10.0));
        }
        seen.dedup();
        assert_eq!(&seen[..5], &[2, 1, 2, 0, 2]);
        let labelled = run(plan, 16, 0.0);
        // Reference 3 slices (2 kept), measure 5 (4 kept), reference 3 (2 kept).
        assert_eq!(labelled.len(), 8);
    }
}
