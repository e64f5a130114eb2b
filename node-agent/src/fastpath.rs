//! The per-VM fast path, pure: one timeslice's counters → features → predicted ratios at every
//! P-state → the P-state under the VM's thresholds, or the fallback and the reason for it.
//!
//! Nothing here does I/O or allocates per call: the caller keeps a [`Scratch`] per VM. The
//! actors run this every timeslice; the tick benchmark measures it.

use std::fmt;

use vmgov_proto::{
    Decision, Feature, FeatureVector, Objective, Predictor, Ratios, RawCounters, Thresholds,
    decide,
    features::{self, FeatureError},
};

/// Why a VM runs on the fallback governor instead of a prediction.
#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    /// No valid model for this host's class yet.
    NoModel,
    /// No threshold applies to the VM.
    NoThresholds,
    /// The model needs a feature whose counters this host cannot measure.
    MissingFeature(Feature),
    /// The slice's counters could not be turned into features.
    BadCounters(FeatureError),
    /// A feature was not a finite number.
    NonFiniteFeature(Feature),
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoModel => f.write_str("no valid model for this hardware class"),
            Self::NoThresholds => f.write_str("no thresholds set for this VM"),
            Self::MissingFeature(x) => {
                write!(f, "the model needs {x}, which this host cannot measure")
            }
            Self::BadCounters(e) => write!(f, "unusable counters: {e}"),
            Self::NonFiniteFeature(x) => write!(f, "feature {x} is not a finite number"),
        }
    }
}

/// What the fast path concluded for one VM and one slice.
#[derive(Debug, Clone, PartialEq)]
pub struct VmChoice {
    /// The features of the slice (those the host could measure).
    pub features: FeatureVector,
    /// The P-state chosen, or `None` when the VM runs on the fallback governor.
    pub pstate: Option<usize>,
    /// Predicted ratios at the chosen P-state.
    pub predicted: Option<Ratios>,
    /// False when no P-state met the thresholds (then f_max was chosen).
    pub feasible: bool,
    /// Why the fallback governor runs the VM, if it does.
    pub fallback: Option<Fallback>,
    /// The thresholds the VM was decided under, if any applies.
    pub thresholds: Option<Thresholds>,
}

/// Per-VM buffer for the predictions of one slice.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    predictions: Vec<Ratios>,
}

impl Scratch {
    /// The predictions of the last slice that had a model, one per P-state.
    pub fn predictions(&self) -> &[Ratios] {
        &self.predictions
    }
}

/// The model and thresholds a VM runs under.
#[derive(Debug, Clone, Copy)]
pub struct VmPolicy<'a> {
    /// The active model, if a valid one is loaded.
    pub predictor: Option<&'a Predictor>,
    /// The VM's effective thresholds, if any applies.
    pub thresholds: Option<Thresholds>,
    /// What the decision minimises.
    pub objective: Objective,
    /// The lowest P-state the VM may use: its [`crate::verify::Guard`] after observed misses.
    pub floor: usize,
}

/// Runs the fast path for one VM and one slice.
pub fn choose(counters: &RawCounters, policy: &VmPolicy<'_>, scratch: &mut Scratch) -> VmChoice {
    let fallback = |features, why| VmChoice {
        features,
        pstate: None,
        predicted: None,
        feasible: true,
        fallback: Some(why),
        thresholds: policy.thresholds,
    };
    let features = match features::derive(counters) {
        Ok(f) => f,
        Err(e) => return fallback(FeatureVector::new(), Fallback::BadCounters(e)),
    };
    let Some(predictor) = policy.predictor else { return fallback(features, Fallback::NoModel) };
    let Some(thresholds) = policy.thresholds else {
        return fallback(features, Fallback::NoThresholds);
    };
    scratch.predictions.resize(predictor.pstates().len(), Ratios::default());
    if let Err(e) = predictor.predict_into(&features, &mut scratch.predictions) {
        let why = match e {
            vmgov_proto::PredictError::MissingFeature(f) => Fallback::MissingFeature(f),
            vmgov_proto::PredictError::NonFiniteFeature { feature, .. } => {
                Fallback::NonFiniteFeature(feature)
            }
            // Predictors are built from validated models and sized here: cannot happen, but a
            // fallback is the safe answer if it ever does.
            vmgov_proto::PredictError::Model(_)
            | vmgov_proto::PredictError::OutputLength { .. } => Fallback::NoModel,
        };
        return fallback(features, why);
    }
    // The guard overrules the model: the choice is made among the P-states it allows.
    let floor = policy.floor.min(scratch.predictions.len().saturating_sub(1));
    let Decision { index, feasible } =
        decide(&scratch.predictions[floor..], &thresholds, policy.objective);
    let index = index + floor;
    VmChoice {
        features,
        pstate: Some(index),
        predicted: scratch.predictions.get(index).copied(),
        feasible,
        fallback: None,
        thresholds: policy.thresholds,
    }
}

#[cfg(test)]
mod tests {
    use vmgov_proto::{
        CounterSet, EnergyModel, LinearFit, PState, PStateModel, PStateTable, model::TrainingInfo,
    };

    use super::*;

    /// A model where perf at P-state i is 0.6 + 0.1·i + 40·(L3 misses/instr), capped by the
    /// features of the test, and power falls with frequency.
    fn predictor() -> Predictor {
        let table =
            PStateTable::new((0..5).map(|i| PState::new(1.4e9 + 2e8 * f64::from(i))).collect())
                .unwrap();
        let per_pstate = table
            .as_slice()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                #[allow(clippy::cast_precision_loss, reason = "small")]
                let i = i as f64;
                let fit = |intercept: f64, l3: f64| LinearFit {
                    intercept,
                    coefficients: vec![0.0, l3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                };
                PStateModel {
                    frequency_hz: p.frequency_hz,
                    perf: fit(0.6 + 0.1 * i, 40.0 * (1.0 - 0.25 * i)),
                    power: fit(0.5 + 0.125 * i, 0.0),
                    throughput: fit(1.0, 0.0),
                }
            })
            .collect();
        Predictor::new(&EnergyModel {
            hardware_class: "t".into(),
            version: 3,
            pstates: table,
            features: Feature::REPORT.to_vec(),
            per_pstate,
            training: TrainingInfo::default(),
        })
        .unwrap()
    }

    fn counters(l3_per_instr: f64) -> RawCounters {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "test values")]
        let l3 = (l3_per_instr * 1e7) as u64;
        RawCounters {
            timeslice_seconds: 0.01,
            instructions: 10_000_000,
            l3_misses: l3,
            vcpus: 2,
            ..RawCounters::default()
        }
    }

    #[test]
    fn chooses_low_for_memory_bound_and_high_for_cpu_bound() {
        let p = predictor();
        let policy = VmPolicy {
            predictor: Some(&p),
            thresholds: Some(Thresholds::new(0.85, 0.85).unwrap()),
            objective: Objective::Energy,
            floor: 0,
        };
        let mut s = Scratch::default();
        let mem = choose(&counters(0.01), &policy, &mut s);
        assert_eq!(mem.pstate, Some(0), "{mem:?}");
        assert!(mem.feasible && mem.fallback.is_none());
        assert!(mem.predicted.is_some_and(|r| r.perf >= 0.85));
        let cpu = choose(&counters(0.0), &policy, &mut s);
        // perf 0.6 + 0.1 i >= 0.85 first at i = 3.
        assert_eq!(cpu.pstate, Some(3), "{cpu:?}");
        // A guard raised by observed misses overrules the model's choice, never lowers it.
        let guarded = VmPolicy { floor: 2, ..policy };
        let mem = choose(&counters(0.01), &guarded, &mut s);
        assert_eq!((mem.pstate, mem.feasible), (Some(2), true), "{mem:?}");
        assert_eq!(choose(&counters(0.0), &guarded, &mut s).pstate, Some(3));
        let beyond = VmPolicy { floor: 99, ..policy };
        assert_eq!(choose(&counters(0.01), &beyond, &mut s).pstate, Some(4));
    }

    #[test]
    fn falls_back_and_says_why() {
        let p = predictor();
        let mut s = Scratch::default();
        let t = Some(Thresholds::new(0.7, 0.7).unwrap());
        let no_model =
            VmPolicy { predictor: None, thresholds: t, objective: Objective::Energy, floor: 0 };
        assert_eq!(choose(&counters(0.0), &no_model, &mut s).fallback, Some(Fallback::NoModel));
        let no_thr = VmPolicy {
            predictor: Some(&p),
            thresholds: None,
            objective: Objective::Energy,
            floor: 0,
        };
        assert_eq!(choose(&counters(0.0), &no_thr, &mut s).fallback, Some(Fallback::NoThresholds));
        let ok =
            VmPolicy { predictor: Some(&p), thresholds: t, objective: Objective::Energy, floor: 0 };
        let mut blind = counters(0.0);
        blind.unavailable = [vmgov_proto::Counter::L2Misses].into_iter().collect::<CounterSet>();
        let c = choose(&blind, &ok, &mut s);
        assert_eq!(c.fallback, Some(Fallback::MissingFeature(Feature::L2MissesPerInstruction)));
        assert!(c.fallback.as_ref().is_some_and(|f| f.to_string().contains("cannot measure")));
        let mut broken = counters(0.0);
        broken.timeslice_seconds = 0.0;
        assert!(matches!(choose(&broken, &ok, &mut s).fallback, Some(Fallback::BadCounters(_))));
    }

    #[test]
    fn impossible_thresholds_mean_f_max() {
        let p = predictor();
        let policy = VmPolicy {
            predictor: Some(&p),
            thresholds: Some(Thresholds::new(1.0, 1.0).unwrap()),
            objective: Objective::Power,
            floor: 0,
        };
        let c = choose(&counters(0.0), &policy, &mut Scratch::default());
        assert_eq!(c.pstate, Some(4));
        // perf at f_max is 1.0: feasible exactly.
        assert!(c.feasible);
        let policy = VmPolicy { thresholds: Some(Thresholds::new(1.0, 1.0).unwrap()), ..policy };
        let mut slow = counters(0.0);
        slow.l3_misses = 0;
        assert_eq!(choose(&slow, &policy, &mut Scratch::default()).pstate, Some(4));
    }
}
