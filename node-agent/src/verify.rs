//! Verification windows, pure: what a VM's chosen P-state really costs it, measured rather than
//! predicted.
//!
//! A prediction is only as good as the model, and a model can be wrong for a workload unlike
//! those it was trained on (ours is for soplex, libquantum and hmmer). So once per cycle the
//! host runs every deciding VM at f_max for a reference window, at its own choice for a measured
//! window, and at f_max again: the VM's observed ratios are its mean rates in the measured window
//! over the mean of the two references around it, the same bracketing learning mode uses (see
//! [`crate::learning`]), and a cycle whose two references disagree by more than
//! [`crate::learning::PHASE_CHANGE`] is discarded as straddling a phase change. The first slice
//! of every window straddles a frequency switch and is dropped.
//!
//! Power is the package's, as in learning's labels and so in the model's predictions. Every
//! deciding VM on the host takes its references at the same time, so alone on a host the power
//! ratio is the VM's own, but with neighbours it is the host's (and, on a shared voltage plane,
//! follows the voltage the fastest of them holds): a package meter cannot do better. A VM's
//! core-time share of the package would be worse: a server is busier at a lower clock, so its
//! share would grow by the idle energy f_max leaves to no one, and a lower clock that saves the
//! host a fifth would look like a loss. Likewise the ratios compare against f_max under the
//! current co-location, not against the VM alone on the host.
//!
//! What it costs: `2 × reference_slices` slices at f_max per `every_slices`, by default 8 in 1000
//! (0.8% of the time at f_max; a window every 10 s at the default 10 ms timeslice).
//!
//! What comes of it: a window whose observed ratios fall short of the VM's thresholds raises a
//! per-VM [`Guard`], the lowest P-state the VM may use, to the lowest one that could meet the
//! thresholds at all (a clock change scales a ratio by the clock ratio at most), whatever the
//! model predicts. The guard comes down one P-state at a time after windows that meet the
//! thresholds, waiting twice as long after every further miss, so a model that keeps
//! mispredicting the same workload is overruled for longer each time and a workload that changed
//! phase gets its savings back.

use std::collections::BTreeMap;

use thiserror::Error;
use vmgov_proto::{Ratios, Thresholds};

use crate::learning::{Observation, mean};

/// When and how long to verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyPlan {
    /// Length of one cycle, slices; the windows are its last slices.
    pub every_slices: u32,
    /// Slices at the VM's own choice between the two references.
    pub measured_slices: u32,
    /// Slices of each f_max reference window.
    pub reference_slices: u32,
}

impl Default for VerifyPlan {
    fn default() -> Self {
        Self { every_slices: 1000, measured_slices: 20, reference_slices: 4 }
    }
}

/// A plan whose windows cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    /// A window too short to keep a slice once its first is dropped.
    #[error(
        "verification windows need at least 2 slices each (measured {measured}, reference {reference})"
    )]
    TooShort {
        /// Measured slices asked for.
        measured: u32,
        /// Reference slices asked for.
        reference: u32,
    },
    /// The windows do not fit in the cycle.
    #[error("verification windows ({needed} slices) do not fit in a cycle of {every} slices")]
    DoesNotFit {
        /// Slices the windows need.
        needed: u32,
        /// The cycle.
        every: u32,
    },
}

impl VerifyPlan {
    /// Checks that the windows can be laid out.
    pub fn validate(self) -> Result<Self, PlanError> {
        if self.measured_slices < 2 || self.reference_slices < 2 {
            return Err(PlanError::TooShort {
                measured: self.measured_slices,
                reference: self.reference_slices,
            });
        }
        let needed = self.measured_slices.saturating_add(2 * self.reference_slices);
        if needed > self.every_slices {
            return Err(PlanError::DoesNotFit { needed, every: self.every_slices });
        }
        Ok(self)
    }

    /// Share of the time spent at f_max for the references.
    pub fn overhead(self) -> f64 {
        f64::from(2 * self.reference_slices) / f64::from(self.every_slices.max(1))
    }
}

/// What the next slice is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Nothing to measure: VMs run their own choice.
    Free,
    /// The reference before the measured window: deciding VMs run at f_max.
    Before,
    /// The measured window: VMs run their own choice.
    Measured,
    /// The reference after it: deciding VMs run at f_max.
    After,
}

impl Slot {
    /// True when deciding VMs run at f_max in this slot.
    pub fn is_reference(self) -> bool {
        matches!(self, Self::Before | Self::After)
    }
}

#[derive(Debug, Clone, Default)]
struct Windows {
    before: Vec<Observation>,
    measured: Vec<Observation>,
    after: Vec<Observation>,
}

/// The cycle, and each VM's windows in it.
#[derive(Debug, Clone)]
pub struct Verifier<K> {
    plan: VerifyPlan,
    /// Index of the next slice in the cycle.
    slice: u32,
    vms: BTreeMap<K, Windows>,
    /// Cycles whose references disagreed (a phase change), per VM and cycle.
    discarded: u64,
}

impl<K: Ord + Copy> Verifier<K> {
    /// A verifier at the start of a cycle.
    pub fn new(plan: VerifyPlan) -> Result<Self, PlanError> {
        Ok(Self { plan: plan.validate()?, slice: 0, vms: BTreeMap::new(), discarded: 0 })
    }

    /// What the next slice is for.
    pub fn slot(&self) -> Slot {
        let p = self.plan;
        let after = p.every_slices - p.reference_slices;
        let measured = after - p.measured_slices;
        let before = measured - p.reference_slices;
        match self.slice {
            s if s >= after => Slot::After,
            s if s >= measured => Slot::Measured,
            s if s >= before => Slot::Before,
            _ => Slot::Free,
        }
    }

    /// True when the next slice starts a cycle (the last [`Self::observe`] ended one).
    pub fn at_cycle_start(&self) -> bool {
        self.slice == 0
    }

    /// Measured windows discarded because the program changed phase.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Takes the slice that just ran in [`Self::slot`]: one observation per VM that ran as the
    /// slot asked (its own choice, or f_max in a reference). At the end of a cycle, returns the
    /// observed ratios of every VM with slices kept in all three windows.
    pub fn observe(
        &mut self,
        slice: impl IntoIterator<Item = (K, Observation)>,
    ) -> Vec<(K, Ratios)> {
        let slot = self.slot();
        let p = self.plan;
        let start = match slot {
            Slot::Free => None,
            Slot::Before => Some(p.every_slices - p.measured_slices - 2 * p.reference_slices),
            Slot::Measured => Some(p.every_slices - p.reference_slices - p.measured_slices),
            Slot::After => Some(p.every_slices - p.reference_slices),
        };
        // The first slice of a window ran across a frequency switch.
        if start.is_some_and(|s| s != self.slice) {
            for (vm, o) in slice {
                let w = self.vms.entry(vm).or_default();
                match slot {
                    Slot::Before => w.before.push(o),
                    Slot::Measured => w.measured.push(o),
                    Slot::After => w.after.push(o),
                    Slot::Free => {}
                }
            }
        }
        self.slice += 1;
        if self.slice < p.every_slices {
            return Vec::new();
        }
        self.slice = 0;
        let mut out = Vec::new();
        for (vm, w) in std::mem::take(&mut self.vms) {
            let (Some(before), Some(measured), Some(after)) =
                (mean(&w.before), mean(&w.measured), mean(&w.after))
            else {
                continue;
            };
            if before.steady_with(after) {
                out.push((vm, measured.against(before.midpoint(after))));
            } else {
                self.discarded += 1;
            }
        }
        out
    }
}

/// Windows that must meet the thresholds before the guard comes down one P-state, at first.
pub const PATIENCE: u32 = 3;

/// The most windows the guard waits before coming down, however often the VM missed.
pub const MAX_PATIENCE: u32 = 96;

/// The lowest P-state a VM may use after what its verification windows showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guard {
    floor: usize,
    /// Windows met since the last change.
    calm: u32,
    /// Windows to meet before coming down one P-state.
    patience: u32,
    missed: bool,
}

impl Default for Guard {
    fn default() -> Self {
        Self { floor: 0, calm: 0, patience: PATIENCE, missed: false }
    }
}

impl Guard {
    /// The lowest P-state index the VM may use (0: no restriction).
    pub const fn floor(&self) -> usize {
        self.floor
    }

    /// Takes a window's verdict: `observed` at P-state `ran_at` against `thresholds`, where
    /// `clock[i]` is f_i / f_max. Returns true when the floor changed.
    pub fn record(
        &mut self,
        observed: &Ratios,
        thresholds: &Thresholds,
        ran_at: usize,
        clock: &[f64],
    ) -> bool {
        let Some(top) = clock.len().checked_sub(1) else { return false };
        let before = self.floor;
        if thresholds.admit(observed) {
            if self.floor > 0 {
                self.calm += 1;
                if self.calm >= self.patience {
                    self.floor -= 1;
                    self.calm = 0;
                }
            }
            return self.floor != before;
        }
        // A ratio can grow at most as the clock: the P-state must reach at least
        // threshold / observed × its clock ratio before it could meet the threshold.
        let at = clock.get(ran_at).copied().unwrap_or(1.0);
        let need = |threshold: f64, got: f64| {
            if threshold <= 0.0 || got >= threshold {
                0.0
            } else if got > 0.0 {
                threshold / got * at
            } else {
                f64::INFINITY
            }
        };
        let needed = need(thresholds.perf(), observed.perf)
            .max(need(thresholds.throughput(), observed.throughput));
        let reach = clock.iter().position(|&c| c >= needed - 1e-12).unwrap_or(top);
        // At least one P-state above the one that fell short.
        self.floor = self.floor.max(reach).max((ran_at + 1).min(top));
        if self.missed {
            // Missed before: the model keeps mispredicting this VM, so trust it less long.
            self.patience = (self.patience * 2).min(MAX_PATIENCE);
        }
        self.missed = true;
        self.calm = 0;
        self.floor != before
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use vmgov_proto::{RawCounters, Thresholds};

    use super::*;

    fn obs(ips: f64, watts: f64, bytes_per_s: f64) -> Observation {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "test values")]
        Observation {
            counters: RawCounters {
                timeslice_seconds: 0.01,
                instructions: (ips * 0.01) as u64,
                bytes_tx: (bytes_per_s * 0.01) as u64,
                vcpus: 1,
                ..RawCounters::default()
            },
            package_energy_j: watts * 0.01,
            start_unix_ns: 0,
        }
    }

    /// Runs `cycles` cycles of a VM whose speed is `speed(f_max?, slice)` and power `watts(..)`.
    fn run(
        plan: VerifyPlan,
        cycles: u32,
        mut rate: impl FnMut(bool, u32) -> (f64, f64, f64),
    ) -> (Vec<Ratios>, Verifier<u8>) {
        let mut v = Verifier::new(plan).unwrap();
        let mut out = Vec::new();
        for i in 0..plan.every_slices * cycles {
            let (ips, watts, net) = rate(v.slot().is_reference(), i);
            out.extend(v.observe([(0, obs(ips, watts, net))]).into_iter().map(|(_, r)| r));
        }
        (out, v)
    }

    #[test]
    fn the_windows_sit_at_the_end_of_the_cycle() {
        let plan = VerifyPlan { every_slices: 10, measured_slices: 3, reference_slices: 2 };
        let mut v = Verifier::<u8>::new(plan).unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            seen.push(v.slot());
            v.observe([]);
        }
        use Slot::*;
        assert_eq!(
            seen,
            [Free, Free, Free, Before, Before, Measured, Measured, Measured, After, After]
        );
        assert_eq!(v.slot(), Free, "a new cycle starts");
        assert!((plan.overhead() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn bad_plans_are_refused() {
        let p = |every_slices, measured_slices, reference_slices| VerifyPlan {
            every_slices,
            measured_slices,
            reference_slices,
        };
        assert!(matches!(p(100, 1, 4).validate(), Err(PlanError::TooShort { .. })));
        assert!(matches!(p(100, 20, 1).validate(), Err(PlanError::TooShort { .. })));
        assert_eq!(p(27, 20, 4).validate(), Err(PlanError::DoesNotFit { needed: 28, every: 27 }));
        assert!(p(28, 20, 4).validate().is_ok());
        assert!(VerifyPlan::default().validate().is_ok());
    }

    #[test]
    fn a_cycle_across_a_phase_change_is_discarded() {
        let plan = VerifyPlan { every_slices: 40, measured_slices: 10, reference_slices: 3 };
        // The program doubles its speed in the middle of the measured window of the first cycle.
        let (got, v) = run(plan, 2, |fmax, i| {
            let speed = if i < 33 { 1e9 } else { 2e9 };
            (if fmax { speed } else { 0.5 * speed }, 10.0, 0.0)
        });
        assert_eq!(v.discarded(), 1);
        assert_eq!(got.len(), 1, "the second cycle is steady");
        assert!((got[0].perf - 0.5).abs() < 1e-6, "{:?}", got[0]);
    }

    #[test]
    fn without_an_energy_meter_power_is_unknown_not_one() {
        let plan = VerifyPlan { every_slices: 12, measured_slices: 4, reference_slices: 2 };
        let (got, _) = run(plan, 1, |fmax, _| (if fmax { 2e9 } else { 1e9 }, f64::NAN, 0.0));
        assert_eq!(got.len(), 1);
        assert!(got[0].power.is_nan() && (got[0].perf - 0.5).abs() < 1e-9, "{:?}", got[0]);
        assert!((got[0].throughput - 1.0).abs() < 1e-12, "nothing sent, nothing lost");
    }

    #[test]
    fn a_vm_missing_from_a_window_gets_no_verdict() {
        let plan = VerifyPlan { every_slices: 12, measured_slices: 4, reference_slices: 2 };
        let mut v = Verifier::new(plan).unwrap();
        let mut got = Vec::new();
        for _ in 0..12 {
            // VM 1 only runs its own choice: it never took a reference.
            let mut slice = vec![(1u8, obs(1e9, 10.0, 0.0))];
            if v.slot() != Slot::Free {
                slice.push((0, obs(1e9, 10.0, 0.0)));
            }
            if v.slot().is_reference() {
                slice.retain(|(vm, _)| *vm == 0);
            }
            got.extend(v.observe(slice));
        }
        assert_eq!(got.iter().map(|(vm, _)| *vm).collect::<Vec<_>>(), [0]);
    }

    /// The Phenom's clock ratios: 1.4, 1.6, 1.8, 2.0, 2.2 GHz.
    const PHENOM: [f64; 5] = [1.4 / 2.2, 1.6 / 2.2, 1.8 / 2.2, 2.0 / 2.2, 1.0];

    fn perf(p: f64) -> Ratios {
        Ratios { perf: p, power: 0.5, throughput: 1.0 }
    }

    #[test]
    fn a_miss_raises_the_floor_to_the_first_pstate_that_could_meet_the_threshold() {
        let t = Thresholds::new(0.9, 0.0).unwrap();
        // CPU-bound work at 1.4 GHz runs at 0.64: only 2.0 GHz (0.91) can reach 0.9.
        let mut g = Guard::default();
        assert!(g.record(&perf(0.64), &t, 0, &PHENOM));
        assert_eq!(g.floor(), 3);
        // Nearly there at 1.8 GHz: one P-state up suffices by the clock bound.
        let mut g = Guard::default();
        assert!(g.record(&perf(0.89), &t, 2, &PHENOM));
        assert_eq!(g.floor(), 3);
        // Nothing at all: f_max.
        let mut g = Guard::default();
        g.record(&perf(0.0), &t, 1, &PHENOM);
        assert_eq!(g.floor(), 4);
        // A throughput miss counts the same way.
        let t = Thresholds::new(0.0, 0.8).unwrap();
        let mut g = Guard::default();
        g.record(&Ratios { perf: 1.0, power: 0.5, throughput: 0.7 }, &t, 0, &PHENOM);
        assert_eq!(g.floor(), 1, "0.7 × 1.6/1.4 = 0.8");
    }

    #[test]
    fn the_floor_comes_down_after_calm_windows_and_more_slowly_after_each_miss() {
        let t = Thresholds::new(0.7, 0.7).unwrap();
        let mut g = Guard::default();
        g.record(&perf(0.65), &t, 0, &PHENOM);
        assert_eq!(g.floor(), 1);
        for _ in 1..PATIENCE {
            assert!(!g.record(&perf(0.8), &t, 1, &PHENOM));
        }
        assert!(g.record(&perf(0.8), &t, 1, &PHENOM), "down after {PATIENCE} calm windows");
        assert_eq!(g.floor(), 0);
        // Missing again right after coming down: twice the patience before the next try.
        g.record(&perf(0.65), &t, 0, &PHENOM);
        assert_eq!(g.floor(), 1);
        let mut windows = 0;
        while g.floor() > 0 {
            g.record(&perf(0.8), &t, 1, &PHENOM);
            windows += 1;
        }
        assert_eq!(windows, 2 * PATIENCE);
        // Without thresholds to miss, nothing happens.
        let mut g = Guard::default();
        assert!(!g.record(&perf(0.1), &Thresholds::new(0.0, 0.0).unwrap(), 0, &PHENOM));
        assert_eq!(g, Guard::default());
    }

    proptest! {
        /// Whatever the windows say, the floor stays in the table, a miss never lowers it, and
        /// after a miss the floor is above the P-state that fell short (unless that was f_max).
        #[test]
        fn the_guard_stays_in_the_table_and_never_yields_to_a_miss(
            windows in proptest::collection::vec((0.0f64..1.2, 0.0f64..1.2, 0usize..5), 1..60),
            perf_t in 0.0f64..1.0,
            thrp_t in 0.0f64..1.0,
        ) {
            let t = Thresholds::new(perf_t, thrp_t).unwrap();
            let mut g = Guard::default();
            for (p, q, at) in windows {
                let o = Ratios { perf: p, power: 0.5, throughput: q };
                let before = g.floor();
                g.record(&o, &t, at, &PHENOM);
                prop_assert!(g.floor() <= 4);
                if !t.admit(&o) {
                    prop_assert!(g.floor() >= before);
                    prop_assert!(g.floor() > at || at == 4);
                } else {
                    prop_assert!(g.floor() + 1 >= before);
                }
            }
        }

        /// A VM whose rates follow the P-state exactly is observed at exactly its ratios, the
        /// switching slices and the free slices (whatever ran in them) notwithstanding.
        #[test]
        fn observed_ratios_are_the_true_ratios(
            perf in 0.05f64..1.0,
            power in 0.05f64..1.0,
            thrp in 0.05f64..1.0,
            measured in 2u32..30,
            reference in 2u32..10,
            free in 0u32..50,
            cycles in 1u32..4,
        ) {
            let plan = VerifyPlan {
                every_slices: measured + 2 * reference + free,
                measured_slices: measured,
                reference_slices: reference,
            };
            let mut previous = None;
            let (got, _) = run(plan, cycles, |fmax, _| {
                // Slices right after a switch carry junk: they must not count.
                let junk = previous.replace(fmax) != Some(fmax);
                match (fmax, junk) {
                    (_, true) => (1.0, 1.0, 1.0),
                    (true, false) => (2e9, 80.0, 1e9),
                    (false, false) => (2e9 * perf, 80.0 * power, 1e9 * thrp),
                }
            });
            prop_assert_eq!(got.len(), cycles as usize);
            for r in got {
                prop_assert!((r.perf - perf).abs() < 1e-6, "{:?}", r);
                prop_assert!((r.power - power).abs() < 1e-6, "{:?}", r);
                prop_assert!((r.throughput - thrp).abs() < 1e-6, "{:?}", r);
            }
        }
    }
}
