//! Prediction: all three ratios at every P-state for one VM's features.
//!
//! [`Predictor`] is the fast-path form of a validated [`EnergyModel`]: coefficients laid out
//! flat in one allocation, features resolved to positions once, so a prediction is a gather and
//! `3 × P-states` dot products with no allocation.
//!
//! Predictions are held to physics: a VM cannot do more work per second at a lower clock than at
//! f_max, nor less than the clock ratio f / f_max allows (the part of its time spent computing
//! stretches by f_max / f at most; the part waiting on memory, disk or clients does not
//! stretch). So predicted performance and throughput ratios are clamped to [f / f_max, 1]. A
//! linear model extrapolates: fitted on one mix of memory behaviour, it predicted 0.23 for
//! soplex at 1.4 of 2.2 GHz, where nothing can run below 0.64 (the lab's model table shows it).

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    features::{FEATURE_COUNT, Feature, FeatureVector},
    model::{EnergyModel, ModelError, Target},
    pstate::PStateTable,
};

/// Performance, power and throughput ratios against f_max.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    /// Instructions per second at f / at f_max.
    pub perf: f64,
    /// Processor power at f / at f_max.
    pub power: f64,
    /// Network throughput at f / at f_max.
    pub throughput: f64,
}

impl Ratios {
    /// All three ratios equal to 1: running at f_max.
    pub const ONE: Self = Self { perf: 1.0, power: 1.0, throughput: 1.0 };

    /// The energy the same work would have taken at f_max, given `energy_j` spent at the
    /// P-state these ratios describe: the energy ratio is power / perf (power at f times the
    /// longer runtime, against f_max's), so E_fmax = E * perf / power. `None` when the ratios
    /// cannot say (power or perf not positive and finite).
    pub fn energy_at_fmax(&self, energy_j: f64) -> Option<f64> {
        let usable = |x: f64| x.is_finite() && x > 0.0;
        (usable(self.perf) && usable(self.power) && energy_j.is_finite())
            .then(|| energy_j * self.perf / self.power)
    }
}

/// Why a prediction could not be made.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PredictError {
    /// The model is invalid.
    #[error("invalid model")]
    Model(#[from] ModelError),
    /// The VM's features lack one the model needs (its counters are unavailable).
    #[error("feature {0} is not available for this VM; the model needs it")]
    MissingFeature(Feature),
    /// A feature value is NaN or infinite.
    #[error("feature {feature} is {value}, not a finite number")]
    NonFiniteFeature {
        /// The feature.
        feature: Feature,
        /// Its value.
        value: f64,
    },
    /// The output buffer does not have one slot per P-state.
    #[error("output holds {got} predictions but the model has {expected} P-states")]
    OutputLength {
        /// P-states in the model.
        expected: usize,
        /// Slots given.
        got: usize,
    },
}

/// A validated model, compiled for fast repeated prediction.
#[derive(Debug, Clone)]
pub struct Predictor {
    hardware_class: String,
    version: u64,
    pstates: PStateTable,
    features: Vec<Feature>,
    /// Per P-state, per target (perf, power, throughput): intercept then coefficients.
    weights: Vec<f64>,
    /// Per P-state, f / f_max: the least performance or throughput ratio physics allows.
    floors: Vec<f64>,
}

impl Predictor {
    /// Validates `model` and compiles it.
    pub fn new(model: &EnergyModel) -> Result<Self, ModelError> {
        model.validate()?;
        let mut weights = Vec::with_capacity(
            model.per_pstate.len() * Target::ALL.len() * (model.features.len() + 1),
        );
        for p in &model.per_pstate {
            for target in Target::ALL {
                let fit = p.fit(target);
                weights.push(fit.intercept);
                weights.extend_from_slice(&fit.coefficients);
            }
        }
        let fmax = model.pstates.max_frequency_hz();
        let floors = model.pstates.as_slice().iter().map(|p| p.frequency_hz / fmax).collect();
        Ok(Self {
            hardware_class: model.hardware_class.clone(),
            version: model.version,
            pstates: model.pstates.clone(),
            features: model.features.clone(),
            weights,
            floors,
        })
    }

    /// Hardware class of the model.
    pub fn hardware_class(&self) -> &str {
        &self.hardware_class
    }

    /// Version of the model.
    pub const fn version(&self) -> u64 {
        self.version
    }

    /// P-states the predictions are for.
    pub const fn pstates(&self) -> &PStateTable {
        &self.pstates
    }

    /// Features the model reads, in coefficient order.
    pub fn features(&self) -> &[Feature] {
        &self.features
    }

    /// Predicts the ratios at every P-state into `out` (one slot per P-state, table order), with
    /// performance and throughput clamped to what physics allows (see the module doc).
    pub fn predict_into(&self, fv: &FeatureVector, out: &mut [Ratios]) -> Result<(), PredictError> {
        if out.len() != self.pstates.len() {
            return Err(PredictError::OutputLength {
                expected: self.pstates.len(),
                got: out.len(),
            });
        }
        let n = self.features.len();
        let mut x = [0.0; FEATURE_COUNT];
        for (slot, &feature) in x.iter_mut().zip(&self.features) {
            let value = fv.get(feature).ok_or(PredictError::MissingFeature(feature))?;
            if !value.is_finite() {
                return Err(PredictError::NonFiniteFeature { feature, value });
            }
            *slot = value;
        }
        let x = &x[..n];
        let dot = |w: &[f64]| w[0] + w[1..].iter().zip(x).map(|(a, b)| a * b).sum::<f64>();
        for ((ratios, w), &floor) in
            out.iter_mut().zip(self.weights.chunks_exact(3 * (n + 1))).zip(&self.floors)
        {
            let (perf, rest) = w.split_at(n + 1);
            let (power, throughput) = rest.split_at(n + 1);
            *ratios = Ratios {
                perf: dot(perf).clamp(floor, 1.0),
                power: dot(power),
                throughput: dot(throughput).clamp(floor, 1.0),
            };
        }
        Ok(())
    }

    /// Predicts the ratios at every P-state, in table order.
    pub fn predict(&self, fv: &FeatureVector) -> Result<Vec<Ratios>, PredictError> {
        let mut out = vec![Ratios::default(); self.pstates.len()];
        self.predict_into(fv, &mut out)?;
        Ok(out)
    }
}

impl EnergyModel {
    /// Validates the model and predicts the ratios at every P-state, in table order. For one-off
    /// predictions (what-if queries); the fast path keeps a [`Predictor`].
    pub fn predict(&self, fv: &FeatureVector) -> Result<Vec<Ratios>, PredictError> {
        Predictor::new(self)?.predict(fv)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::tests::{arb_model, sample_model};

    #[test]
    fn predicts_each_target_from_its_own_fit() {
        let m = sample_model(5);
        let fv = Feature::REPORT
            .into_iter()
            .fold(FeatureVector::new(), |fv, f| fv.with(f, 0.0))
            .with(Feature::L3MissesPerInstruction, 0.01)
            .with(Feature::PacketsPerSecond, 1000.0);
        let got = m.predict(&fv).unwrap();
        assert_eq!(got.len(), 5);
        for (p, r) in m.per_pstate.iter().zip(&got) {
            // sample_model puts its memory coefficient on L2 (0) and half of it on L3.
            let perf = p.perf.intercept + p.perf.coefficients[1] * 0.01;
            let thrp = p.throughput.intercept + p.throughput.coefficients[3] * 1000.0;
            assert!((r.perf - perf).abs() < 1e-12 && (r.throughput - thrp).abs() < 1e-12);
        }
        let top = got[4];
        assert!((top.perf - 1.0).abs() < 1e-12 && (top.power - 1.0).abs() < 1e-12);
        // Memory-bound work keeps more of its speed at the lowest P-state than the clock ratio.
        assert!(got[0].perf > 1.0e9 / 1.8e9);
    }

    #[test]
    fn missing_and_bad_features_are_errors() {
        let p = Predictor::new(&sample_model(5)).unwrap();
        let fv = FeatureVector::new().with(Feature::L2MissesPerInstruction, 0.01);
        assert_eq!(
            p.predict(&fv),
            Err(PredictError::MissingFeature(Feature::L3MissesPerInstruction))
        );
        let fv = Feature::REPORT
            .into_iter()
            .fold(FeatureVector::new(), |fv, f| fv.with(f, 1.0))
            .with(Feature::DiskReadsPerSecond, f64::NAN);
        assert!(matches!(p.predict(&fv), Err(PredictError::NonFiniteFeature { .. })));
        let mut out = [Ratios::default(); 3];
        assert!(matches!(p.predict_into(&fv, &mut out), Err(PredictError::OutputLength { .. })));
    }

    #[test]
    fn refuses_to_compile_an_invalid_model() {
        let mut m = sample_model(5);
        m.per_pstate[0].power.intercept = f64::NAN;
        assert!(Predictor::new(&m).is_err());
        assert!(matches!(m.predict(&FeatureVector::new()), Err(PredictError::Model(_))));
    }

    #[test]
    fn energy_at_fmax_follows_the_energy_ratio() {
        assert_eq!(Ratios::ONE.energy_at_fmax(3.0), Some(3.0));
        // Half the power for 80% of the speed: f_max would have spent 1.6x the energy.
        let r = Ratios { perf: 0.8, power: 0.5, throughput: 1.0 };
        assert!((r.energy_at_fmax(10.0).unwrap() - 16.0).abs() < 1e-12);
        assert_eq!(Ratios { power: 0.0, ..r }.energy_at_fmax(1.0), None);
        assert_eq!(Ratios { perf: f64::NAN, ..r }.energy_at_fmax(1.0), None);
    }

    #[test]
    fn predictions_stay_within_what_the_clock_allows() {
        // A model that extrapolates wildly both ways: -5 at every P-state, then +5.
        let mut m = sample_model(5);
        for p in &mut m.per_pstate {
            p.perf.intercept = -5.0;
            p.throughput.intercept = 5.0;
            p.perf.coefficients.iter_mut().for_each(|c| *c = 0.0);
            p.throughput.coefficients.iter_mut().for_each(|c| *c = 0.0);
        }
        let fv = Feature::REPORT.into_iter().fold(FeatureVector::new(), |fv, f| fv.with(f, 0.0));
        let fmax = m.pstates.max_frequency_hz();
        for (p, r) in m.pstates.as_slice().iter().zip(m.predict(&fv).unwrap()) {
            assert!((r.perf - p.frequency_hz / fmax).abs() < 1e-12, "perf floor at {p:?}: {r:?}");
            assert!((r.throughput - 1.0).abs() < 1e-12, "throughput ceiling: {r:?}");
        }
    }

    proptest! {
        #[test]
        fn compiled_prediction_equals_the_linear_formula_within_the_physical_bounds(
            m in arb_model(),
            values in proptest::collection::vec(0.0f64..1e3, FEATURE_COUNT),
        ) {
            let fv = Feature::ALL.into_iter().zip(&values).fold(FeatureVector::new(), |fv, (f, v)| fv.with(f, *v));
            let got = m.predict(&fv).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let fmax = m.pstates.max_frequency_hz();
            for (p, r) in m.per_pstate.iter().zip(&got) {
                let floor = p.frequency_hz / fmax;
                for (target, value) in [(Target::Perf, r.perf), (Target::Power, r.power), (Target::Throughput, r.throughput)] {
                    let fit = p.fit(target);
                    let linear = fit.intercept + fit.coefficients.iter().zip(&m.features)
                        .map(|(c, f)| c * values[Feature::ALL.iter().position(|g| g == f).unwrap_or(0)])
                        .sum::<f64>();
                    let want = if target == Target::Power { linear } else { linear.clamp(floor, 1.0) };
                    prop_assert!((value - want).abs() <= 1e-9 * want.abs().max(1.0), "{value} vs {want}");
                }
            }
        }
    }
}
