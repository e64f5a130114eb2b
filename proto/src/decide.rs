//! The decision: which P-state a VM should run at, from its predicted ratios.
//!
//! The report's rule (equation 9): `A = {f | thr_perf ≤ Ŷ_perf(f)}`, `B = {f | thr_thrp ≤
//! Ŷ_thrp(f)}`, and among `A ∩ B` the P-state minimising the objective. When no P-state
//! qualifies the VM runs at f_max, the one choice that cannot make it slower than the reference.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::predict::Ratios;

/// A VM's performance and throughput thresholds, fractions in [0, 1] (0 disables one).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawThresholds", into = "RawThresholds")]
pub struct Thresholds {
    perf: f64,
    throughput: f64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThresholds {
    perf: f64,
    throughput: f64,
}

/// A threshold outside [0, 1].
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{which} threshold {value} is not a fraction in [0, 1] (0.7 means 70% of the f_max rate)")]
pub struct ThresholdError {
    /// "performance" or "throughput".
    pub which: &'static str,
    /// The value given.
    pub value: f64,
}

impl Thresholds {
    /// Thresholds that constrain nothing.
    pub const NONE: Self = Self { perf: 0.0, throughput: 0.0 };

    /// Validated thresholds.
    pub fn new(perf: f64, throughput: f64) -> Result<Self, ThresholdError> {
        for (which, value) in [("performance", perf), ("throughput", throughput)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ThresholdError { which, value });
            }
        }
        Ok(Self { perf, throughput })
    }

    /// The performance threshold.
    pub const fn perf(&self) -> f64 {
        self.perf
    }

    /// The throughput threshold.
    pub const fn throughput(&self) -> f64 {
        self.throughput
    }

    /// True when predicted `ratios` meet both thresholds (the report's A ∩ B). NaN never does.
    #[inline]
    pub fn admit(&self, ratios: &Ratios) -> bool {
        ratios.perf >= self.perf && ratios.throughput >= self.throughput
    }
}

impl TryFrom<RawThresholds> for Thresholds {
    type Error = ThresholdError;

    fn try_from(raw: RawThresholds) -> Result<Self, Self::Error> {
        Self::new(raw.perf, raw.throughput)
    }
}

impl From<Thresholds> for RawThresholds {
    fn from(t: Thresholds) -> Self {
        Self { perf: t.perf, throughput: t.throughput }
    }
}

/// What a decision minimises among the admissible P-states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Predicted power ratio: the report's equation 9 as written.
    Power,
    /// Predicted energy per unit of work, power / perf: what the report's goal calls for.
    #[default]
    Energy,
    /// Energy-delay product, power / perf².
    Edp,
}

impl Objective {
    /// Every objective.
    pub const ALL: [Self; 3] = [Self::Power, Self::Energy, Self::Edp];

    /// Lower-case name, as on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Power => "power",
            Self::Energy => "energy",
            Self::Edp => "edp",
        }
    }

    /// The value to minimise for predicted `r`; +inf where it is undefined: a non-positive
    /// predicted power (the model is extrapolating) or, for energy and EDP, a non-positive
    /// predicted performance.
    #[inline]
    pub fn value(self, r: &Ratios) -> f64 {
        if r.power.is_nan() || r.power <= 0.0 {
            return f64::INFINITY;
        }
        match self {
            Self::Power => r.power,
            Self::Energy if r.perf > 0.0 => r.power / r.perf,
            Self::Edp if r.perf > 0.0 => r.power / (r.perf * r.perf),
            Self::Energy | Self::Edp => f64::INFINITY,
        }
    }
}

impl fmt::Display for Objective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An objective name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown objective {0:?}; choose power, energy or edp")]
pub struct UnknownObjective(pub String);

impl FromStr for Objective {
    type Err = UnknownObjective;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|o| o.name() == s).ok_or_else(|| UnknownObjective(s.to_owned()))
    }
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Chosen P-state (index into the table, slowest first).
    pub index: usize,
    /// False when no P-state met the thresholds and f_max was chosen as the safe default.
    pub feasible: bool,
}

/// Chooses a P-state from `predictions` (one per P-state, slowest first, as [`Predictor`]
/// gives them) under `thresholds`, minimising `objective` over the admissible set.
///
/// Ties go to the faster P-state. An admissible P-state whose objective is undefined is kept
/// only as a last resort: then the fastest admissible one is chosen. With nothing admissible the
/// result is f_max (the last index) with `feasible == false`.
///
/// [`Predictor`]: crate::predict::Predictor
pub fn decide(predictions: &[Ratios], thresholds: &Thresholds, objective: Objective) -> Decision {
    let f_max = predictions.len().saturating_sub(1);
    let mut best: Option<(usize, f64)> = None;
    let mut fastest_admissible = None;
    for (index, r) in predictions.iter().enumerate().rev() {
        if !thresholds.admit(r) {
            continue;
        }
        fastest_admissible.get_or_insert(index);
        let value = objective.value(r);
        if value.is_finite() && best.is_none_or(|(_, b)| value < b) {
            best = Some((index, value));
        }
    }
    match (best, fastest_admissible) {
        (Some((index, _)), _) | (None, Some(index)) => Decision { index, feasible: true },
        (None, None) => Decision { index: f_max, feasible: false },
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn r(perf: f64, power: f64, throughput: f64) -> Ratios {
        Ratios { perf, power, throughput }
    }

    /// A memory-bound VM on the Phenom's five P-states: perf barely falls, power falls fast.
    fn memory_bound() -> Vec<Ratios> {
        vec![
            r(0.90, 0.52, 1.0),
            r(0.93, 0.62, 1.0),
            r(0.95, 0.72, 1.0),
            r(0.98, 0.85, 1.0),
            r(1.00, 1.00, 1.0),
        ]
    }

    #[test]
    fn picks_the_lowest_energy_admissible_pstate() {
        let t = Thresholds::new(0.7, 0.7).unwrap();
        assert_eq!(
            decide(&memory_bound(), &t, Objective::Energy),
            Decision { index: 0, feasible: true }
        );
    }

    #[test]
    fn thresholds_exclude_slow_pstates() {
        // CPU-bound: perf falls with the clock.
        let cpu = vec![
            r(0.64, 0.50, 1.0),
            r(0.73, 0.60, 1.0),
            r(0.82, 0.71, 1.0),
            r(0.91, 0.84, 1.0),
            r(1.00, 1.00, 1.0),
        ];
        let t = Thresholds::new(0.70, 0.0).unwrap();
        assert_eq!(decide(&cpu, &t, Objective::Power).index, 1);
        // Energy: 0.60/0.73 = 0.822 is the lowest of the admissible ones.
        assert_eq!(decide(&cpu, &t, Objective::Energy).index, 1);
        let t = Thresholds::new(0.0, 0.0).unwrap();
        // Power alone always goes lowest; energy 0.50/0.64 = 0.781 is also the minimum here.
        assert_eq!(decide(&cpu, &t, Objective::Power).index, 0);
        // EDP weighs delay: 0.50/0.4096 = 1.22 > 0.84/0.8281 = 1.014 > 1.0 at f_max.
        assert_eq!(decide(&cpu, &t, Objective::Edp).index, 4);
    }

    #[test]
    fn throughput_threshold_counts_too() {
        let server = vec![
            r(0.64, 0.50, 0.60),
            r(0.73, 0.60, 0.75),
            r(0.82, 0.71, 0.95),
            r(0.91, 0.84, 1.0),
            r(1.00, 1.00, 1.0),
        ];
        let t = Thresholds::new(0.5, 0.9).unwrap();
        assert_eq!(decide(&server, &t, Objective::Power).index, 2);
    }

    #[test]
    fn nothing_admissible_means_f_max() {
        let t = Thresholds::new(0.99, 0.0).unwrap();
        let mut p = memory_bound();
        p[4].perf = 0.98; // f_max itself predicted (wrongly) below the threshold
        assert_eq!(decide(&p, &t, Objective::Energy), Decision { index: 4, feasible: false });
        assert_eq!(
            decide(&[r(f64::NAN, 1.0, 1.0); 3], &t, Objective::Power),
            Decision { index: 2, feasible: false }
        );
    }

    #[test]
    fn undefined_objective_falls_back_to_the_fastest_admissible() {
        let p = vec![r(0.5, -0.1, 1.0), r(0.6, 0.0, 1.0), r(0.7, -1.0, 1.0)];
        let t = Thresholds::new(0.0, 0.0).unwrap();
        assert_eq!(decide(&p, &t, Objective::Energy), Decision { index: 2, feasible: true });
    }

    #[test]
    fn ties_go_to_the_faster_pstate() {
        let p = vec![r(1.0, 0.5, 1.0), r(1.0, 0.5, 1.0), r(1.0, 1.0, 1.0)];
        assert_eq!(decide(&p, &Thresholds::NONE, Objective::Power).index, 1);
    }

    #[test]
    fn thresholds_are_fractions() {
        assert!(Thresholds::new(1.0, 0.0).is_ok());
        for bad in [-0.01, 1.01, 70.0, f64::NAN] {
            let err = Thresholds::new(bad, 0.5).map_err(|e| e.to_string());
            assert!(matches!(err, Err(ref m) if m.contains("performance")), "{err:?}");
            assert!(Thresholds::new(0.5, bad).is_err());
        }
        assert!(serde_json::from_str::<Thresholds>(r#"{"perf":1.5,"throughput":0.5}"#).is_err());
        assert!(serde_json::from_str::<Thresholds>(r#"{"perf":0.5,"throughput":0.5}"#).is_ok());
    }

    #[test]
    fn objectives_parse_by_name() {
        for o in Objective::ALL {
            assert_eq!(o.name().parse::<Objective>(), Ok(o));
        }
        assert!("speed".parse::<Objective>().is_err());
        assert_eq!(Objective::default(), Objective::Energy);
    }

    fn ratio() -> impl Strategy<Value = f64> {
        prop_oneof![8 => -0.2f64..1.2, 1 => Just(f64::NAN), 1 => Just(0.0)]
    }

    fn predictions() -> impl Strategy<Value = Vec<Ratios>> {
        proptest::collection::vec(
            (ratio(), ratio(), ratio()).prop_map(|(perf, power, throughput)| Ratios {
                perf,
                power,
                throughput,
            }),
            1..=16,
        )
    }

    fn thresholds() -> impl Strategy<Value = Thresholds> {
        (0.0f64..=1.0, 0.0f64..=1.0).prop_map(|(p, t)| Thresholds::new(p, t).unwrap())
    }

    fn objective() -> impl Strategy<Value = Objective> {
        prop::sample::select(Objective::ALL.to_vec())
    }

    proptest! {
        #[test]
        fn never_picks_an_inadmissible_pstate_unless_none_qualifies(
            p in predictions(), t in thresholds(), o in objective(),
        ) {
            let d = decide(&p, &t, o);
            prop_assert!(d.index < p.len());
            let any_admissible = p.iter().any(|r| t.admit(r));
            prop_assert_eq!(d.feasible, any_admissible);
            if any_admissible {
                prop_assert!(t.admit(&p[d.index]), "chose {} = {:?} under {:?}", d.index, p[d.index], t);
            } else {
                prop_assert_eq!(d.index, p.len() - 1);
            }
        }

        #[test]
        fn the_choice_minimises_the_objective(p in predictions(), t in thresholds(), o in objective()) {
            let d = decide(&p, &t, o);
            let chosen = o.value(&p[d.index]);
            for r in p.iter().filter(|r| t.admit(r)) {
                prop_assert!(o.value(r) >= chosen, "{:?} beats the choice {:?}", r, p[d.index]);
            }
        }
    }
}
