//! The energy model of one hardware class: for every P-state and each target (perf, power,
//! throughput ratio) a linear fit over the model's features, plus how it was trained.
//!
//! A model is plain data (it travels over gRPC, sits in etcd and in the agent's cache) and is
//! checked with [`EnergyModel::validate`] before anything predicts with it: a model from the
//! network, a file or a regression that went wrong (a solver returning 1e11 coefficients on a
//! collinear column) must never reach the fast path.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{
    features::{Feature, UnknownFeature},
    pstate::{PStateError, PStateTable, same_frequency},
};

/// Largest magnitude an intercept may have. Ratios live near [0, 1]; an intercept beyond this
/// means the fit went wrong.
pub const MAX_ABS_INTERCEPT: f64 = 1e3;

/// Largest magnitude a coefficient may have. Per-instruction features are about 1e-4..1e-1 and
/// per-second features up to about 1e9, so sound coefficients stay many orders of magnitude
/// below this; the solver failures seen in practice (collinear or constant columns) give 1e11.
pub const MAX_ABS_COEFFICIENT: f64 = 1e6;

/// What a fit predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Performance ratio: instructions per second at f / at f_max.
    Perf,
    /// Power ratio: processor power at f / at f_max.
    Power,
    /// Throughput ratio: network throughput at f / at f_max.
    Throughput,
}

impl Target {
    /// The three targets, in this order everywhere.
    pub const ALL: [Self; 3] = [Self::Perf, Self::Power, Self::Throughput];

    /// Lower-case name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Perf => "perf",
            Self::Power => "power",
            Self::Throughput => "throughput",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Regression method a model was trained with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Ordinary least squares, as in the report.
    #[default]
    Ols,
    /// Ridge regression (L2 penalty).
    Ridge,
    /// Lasso regression (L1 penalty).
    Lasso,
}

/// `y = intercept + Σ coefficients[i] · x[i]`, over the model's features in raw units.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearFit {
    /// Constant term.
    pub intercept: f64,
    /// One coefficient per model feature, in the model's feature order.
    pub coefficients: Vec<f64>,
}

impl LinearFit {
    /// A fit that always predicts `value` (e.g. 1.0 at f_max).
    pub fn constant(value: f64, features: usize) -> Self {
        Self { intercept: value, coefficients: vec![0.0; features] }
    }
}

/// The three fits of one P-state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PStateModel {
    /// Frequency of the P-state (Hz); must equal the table's.
    pub frequency_hz: f64,
    /// Performance-ratio fit.
    pub perf: LinearFit,
    /// Power-ratio fit.
    pub power: LinearFit,
    /// Throughput-ratio fit.
    pub throughput: LinearFit,
}

impl PStateModel {
    /// The fit of `target`.
    pub const fn fit(&self, target: Target) -> &LinearFit {
        match target {
            Target::Perf => &self.perf,
            Target::Power => &self.power,
            Target::Throughput => &self.throughput,
        }
    }
}

/// Cross-validated quality of one fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitQuality {
    /// P-state the fit belongs to.
    pub pstate_index: u32,
    /// Target of the fit.
    pub target: Target,
    /// Coefficient of determination.
    pub r2: f64,
    /// Mean absolute error (ratio units).
    pub mae: f64,
    /// Mean absolute percentage error, as a fraction.
    pub mape: f64,
}

/// How a model was trained.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingInfo {
    /// Regression method.
    pub algorithm: Algorithm,
    /// Regularisation strength (0 for OLS).
    pub alpha: f64,
    /// Labelled samples used.
    pub sample_count: u64,
    /// Cross-validation folds behind `quality`.
    pub folds: u32,
    /// Per P-state and target figures.
    pub quality: Vec<FitQuality>,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
    /// Features constant in the training data or collinear with an earlier one, given
    /// coefficient 0.
    pub dropped_features: Vec<Feature>,
    /// Free text on the training data.
    pub notes: String,
}

/// A complete energy model for one hardware class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnergyModel {
    /// Hardware class the model belongs to.
    pub hardware_class: String,
    /// Version within the class (1, 2, ...); immutable once stored.
    pub version: u64,
    /// The class's P-states.
    pub pstates: PStateTable,
    /// Features, in coefficient order.
    pub features: Vec<Feature>,
    /// One entry per P-state, in table order.
    pub per_pstate: Vec<PStateModel>,
    /// Training metadata.
    pub training: TrainingInfo,
}

/// Why a model was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ModelError {
    /// The model names no hardware class.
    #[error("the model names no hardware class")]
    NoHardwareClass,
    /// The model uses no features.
    #[error("the model uses no features")]
    NoFeatures,
    /// A feature appears twice.
    #[error("feature {0} appears more than once")]
    DuplicateFeature(Feature),
    /// A feature name is not known to this build.
    #[error(transparent)]
    UnknownFeature(#[from] UnknownFeature),
    /// The P-state table is invalid.
    #[error("the model's P-state table is invalid")]
    PStates(#[source] PStateError),
    /// Not one per-P-state entry per P-state.
    #[error("the model has fits for {got} P-states but its table has {expected}")]
    PStateCount {
        /// P-states in the table.
        expected: usize,
        /// Per-P-state entries.
        got: usize,
    },
    /// A per-P-state entry's frequency differs from the table's.
    #[error("P-state {index}: fits are for {model_hz} Hz but the table says {table_hz} Hz")]
    PStateFrequency {
        /// P-state index.
        index: usize,
        /// Frequency in the table.
        table_hz: f64,
        /// Frequency on the fits.
        model_hz: f64,
    },
    /// The host's P-states differ from the model's.
    #[error(
        "the model's P-states ({model:?} Hz) do not match this host's ({host:?} Hz); \
         it was trained for another hardware class"
    )]
    HostPStates {
        /// The model's frequencies.
        model: Vec<f64>,
        /// The host's frequencies.
        host: Vec<f64>,
    },
    /// A fit has the wrong number of coefficients.
    #[error("P-state {index} {target}: {got} coefficients for {expected} features")]
    CoefficientCount {
        /// P-state index.
        index: usize,
        /// Target.
        target: Target,
        /// Features in the model.
        expected: usize,
        /// Coefficients given.
        got: usize,
    },
    /// A number is NaN or infinite.
    #[error("P-state {index} {target}: {what} is {value}, not a finite number")]
    NonFinite {
        /// P-state index.
        index: usize,
        /// Target.
        target: Target,
        /// Which number.
        what: String,
        /// Its value.
        value: f64,
    },
    /// A number is implausibly large: the fit went wrong.
    #[error(
        "P-state {index} {target}: {what} is {value:e}, beyond ±{limit:e}; \
         the fit is degenerate (a constant or collinear feature?)"
    )]
    AbsurdMagnitude {
        /// P-state index.
        index: usize,
        /// Target.
        target: Target,
        /// Which number.
        what: String,
        /// Its value.
        value: f64,
        /// The bound it exceeds.
        limit: f64,
    },
    /// A training figure is NaN or infinite.
    #[error("training figure {what} is {value}, not a finite number")]
    BadTrainingFigure {
        /// Which figure.
        what: String,
        /// Its value.
        value: f64,
    },
}

impl EnergyModel {
    /// Checks everything that must hold before the model may predict: a class name, known and
    /// distinct features, one fit per P-state at the table's frequencies, the right number of
    /// coefficients, only finite numbers and none of absurd magnitude.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.hardware_class.trim().is_empty() {
            return Err(ModelError::NoHardwareClass);
        }
        if self.features.is_empty() {
            return Err(ModelError::NoFeatures);
        }
        for (i, f) in self.features.iter().enumerate() {
            if self.features[..i].contains(f) {
                return Err(ModelError::DuplicateFeature(*f));
            }
        }
        if self.per_pstate.len() != self.pstates.len() {
            return Err(ModelError::PStateCount {
                expected: self.pstates.len(),
                got: self.per_pstate.len(),
            });
        }
        for (index, (ps, p)) in self.pstates.as_slice().iter().zip(&self.per_pstate).enumerate() {
            if !same_frequency(ps.frequency_hz, p.frequency_hz) {
                return Err(ModelError::PStateFrequency {
                    index,
                    table_hz: ps.frequency_hz,
                    model_hz: p.frequency_hz,
                });
            }
            for target in Target::ALL {
                self.validate_fit(index, target, p.fit(target))?;
            }
        }
        let t = &self.training;
        let figures = t.quality.iter().flat_map(|q| {
            [("r2", q.r2), ("mae", q.mae), ("mape", q.mape)]
                .map(|(name, v)| (format!("{name} (P-state {} {})", q.pstate_index, q.target), v))
        });
        for (what, value) in std::iter::once(("alpha".to_owned(), t.alpha)).chain(figures) {
            if !value.is_finite() {
                return Err(ModelError::BadTrainingFigure { what, value });
            }
        }
        Ok(())
    }

    fn validate_fit(
        &self,
        index: usize,
        target: Target,
        fit: &LinearFit,
    ) -> Result<(), ModelError> {
        if fit.coefficients.len() != self.features.len() {
            return Err(ModelError::CoefficientCount {
                index,
                target,
                expected: self.features.len(),
                got: fit.coefficients.len(),
            });
        }
        let terms = std::iter::once(("intercept".to_owned(), fit.intercept, MAX_ABS_INTERCEPT))
            .chain(
                fit.coefficients
                    .iter()
                    .zip(&self.features)
                    .map(|(&c, f)| (format!("coefficient of {f}"), c, MAX_ABS_COEFFICIENT)),
            );
        for (what, value, limit) in terms {
            if !value.is_finite() {
                return Err(ModelError::NonFinite { index, target, what, value });
            }
            if value.abs() > limit {
                return Err(ModelError::AbsurdMagnitude { index, target, what, value, limit });
            }
        }
        Ok(())
    }

    /// Checks that the model was made for a host with `host` P-states.
    pub fn check_host(&self, host: &PStateTable) -> Result<(), ModelError> {
        if self.pstates.same_frequencies(host) {
            Ok(())
        } else {
            let freqs = |t: &PStateTable| t.as_slice().iter().map(|p| p.frequency_hz).collect();
            Err(ModelError::HostPStates { model: freqs(&self.pstates), host: freqs(host) })
        }
    }

    /// Mean cross-validated MAPE of `target` over the P-states, if the model has figures for it.
    pub fn mean_mape(&self, target: Target) -> Option<f64> {
        let (sum, n) = self
            .training
            .quality
            .iter()
            .filter(|q| q.target == target)
            .fold((0.0, 0u32), |(s, n), q| (s + q.mape, n + 1));
        (n > 0).then(|| sum / f64::from(n))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pstate::PState;

    /// A plausible model: perf falls with frequency less for memory-bound features, power
    /// falls with f·V².
    pub(crate) fn sample_model(pstates: usize) -> EnergyModel {
        let table = PStateTable::new(
            (0..pstates)
                .map(|i| {
                    let f = 1.0e9 + 2e8 * i as f64;
                    PState::with_voltage(f, 0.9 + 0.05 * i as f64)
                })
                .collect(),
        )
        .unwrap_or_else(|e| panic!("test table: {e}"));
        let features = Feature::REPORT.to_vec();
        let fmax = table.max_frequency_hz();
        let per_pstate = table
            .as_slice()
            .iter()
            .map(|p| {
                let s = p.frequency_hz / fmax;
                let fit = |intercept: f64, mem: f64, pkt: f64| LinearFit {
                    intercept,
                    coefficients: vec![0.0, mem, mem / 2.0, pkt, 0.0, 0.0, 0.0, 0.0],
                };
                PStateModel {
                    frequency_hz: p.frequency_hz,
                    perf: fit(s, (1.0 - s) * 40.0, 0.0),
                    power: fit(s * s * s, -(1.0 - s) * 5.0, 0.0),
                    throughput: fit(1.0, 0.0, -(1.0 - s) * 1e-4),
                }
            })
            .collect();
        EnergyModel {
            hardware_class: "test-class".into(),
            version: 1,
            pstates: table,
            features,
            per_pstate,
            training: TrainingInfo::default(),
        }
    }

    #[test]
    fn the_sample_model_is_valid() {
        assert_eq!(sample_model(5).validate(), Ok(()));
    }

    #[test]
    fn refuses_structural_mistakes() {
        let mut m = sample_model(5);
        m.hardware_class = " ".into();
        assert_eq!(m.validate(), Err(ModelError::NoHardwareClass));

        let mut m = sample_model(5);
        m.features.clear();
        assert_eq!(m.validate(), Err(ModelError::NoFeatures));

        let mut m = sample_model(5);
        m.features[1] = m.features[0];
        assert!(matches!(m.validate(), Err(ModelError::DuplicateFeature(_))));

        let mut m = sample_model(5);
        m.per_pstate.pop();
        assert!(matches!(m.validate(), Err(ModelError::PStateCount { expected: 5, got: 4 })));

        let mut m = sample_model(5);
        m.per_pstate[2].frequency_hz += 1e6;
        assert!(matches!(m.validate(), Err(ModelError::PStateFrequency { index: 2, .. })));

        let mut m = sample_model(5);
        m.per_pstate[3].power.coefficients.pop();
        assert!(matches!(
            m.validate(),
            Err(ModelError::CoefficientCount {
                index: 3,
                target: Target::Power,
                expected: 8,
                got: 7
            })
        ));
    }

    #[test]
    fn refuses_degenerate_numbers() {
        let mut m = sample_model(5);
        m.per_pstate[0].perf.coefficients[4] = 3e11;
        let err = m.validate().map_err(|e| e.to_string());
        assert!(
            matches!(err, Err(ref s) if s.contains("disk_reads_per_second") && s.contains("degenerate")),
            "{err:?}"
        );

        let mut m = sample_model(5);
        m.per_pstate[1].throughput.intercept = f64::INFINITY;
        assert!(matches!(
            m.validate(),
            Err(ModelError::NonFinite { index: 1, target: Target::Throughput, .. })
        ));

        let mut m = sample_model(5);
        m.training.quality.push(FitQuality {
            pstate_index: 0,
            target: Target::Perf,
            r2: f64::NAN,
            mae: 0.0,
            mape: 0.0,
        });
        assert!(matches!(m.validate(), Err(ModelError::BadTrainingFigure { .. })));
    }

    #[test]
    fn host_tables_must_match() -> Result<(), PStateError> {
        let m = sample_model(5);
        assert_eq!(m.check_host(&m.pstates), Ok(()));
        let other = PStateTable::new(vec![PState::new(1e9), PState::new(2e9)])?;
        assert!(matches!(m.check_host(&other), Err(ModelError::HostPStates { .. })));
        Ok(())
    }

    #[test]
    fn mean_mape_averages_per_target() {
        let mut m = sample_model(2);
        assert_eq!(m.mean_mape(Target::Perf), None);
        for (i, mape) in (0u32..).zip([0.02, 0.04]) {
            m.training.quality.push(FitQuality {
                pstate_index: i,
                target: Target::Perf,
                r2: 0.9,
                mae: 0.01,
                mape,
            });
        }
        assert!(m.mean_mape(Target::Perf).is_some_and(|v| (v - 0.03).abs() < 1e-12));
        assert_eq!(m.mean_mape(Target::Power), None);
    }

    /// Models built from arbitrary finite numbers within the magnitude bounds.
    pub(crate) fn arb_model() -> impl Strategy<Value = EnergyModel> {
        (1usize..=16, 1usize..=Feature::ALL.len()).prop_flat_map(|(n_pstates, n_features)| {
            let fit = (
                -MAX_ABS_INTERCEPT..=MAX_ABS_INTERCEPT,
                proptest::collection::vec(-MAX_ABS_COEFFICIENT..=MAX_ABS_COEFFICIENT, n_features),
            )
                .prop_map(|(intercept, coefficients)| LinearFit { intercept, coefficients });
            let fits = proptest::collection::vec((fit.clone(), fit.clone(), fit), n_pstates);
            let steps = proptest::collection::vec(1e6f64..5e8, n_pstates);
            let features = Just(Feature::ALL.to_vec()).prop_shuffle().prop_map(move |mut f| {
                f.truncate(n_features);
                f
            });
            (fits, steps, features, 0u64..1000, "[a-z][a-z0-9-]{0,20}").prop_map(
                |(fits, steps, features, version, class)| {
                    let mut f = 0.0;
                    let table: Vec<PState> = steps
                        .iter()
                        .map(|s| {
                            f += s;
                            PState::new(f)
                        })
                        .collect();
                    let per_pstate = table
                        .iter()
                        .zip(fits)
                        .map(|(p, (perf, power, throughput))| PStateModel {
                            frequency_hz: p.frequency_hz,
                            perf,
                            power,
                            throughput,
                        })
                        .collect();
                    EnergyModel {
                        hardware_class: class,
                        version,
                        pstates: PStateTable::new(table)
                            .unwrap_or_else(|e| panic!("increasing by construction: {e}")),
                        features,
                        per_pstate,
                        training: TrainingInfo::default(),
                    }
                },
            )
        })
    }

    proptest! {
        #[test]
        fn validate_accepts_every_model_from_finite_inputs(m in arb_model()) {
            prop_assert_eq!(m.validate(), Ok(()));
        }

        #[test]
        fn validate_rejects_any_model_with_a_nan(
            m in arb_model(),
            pick in any::<prop::sample::Index>(),
            target in prop::sample::select(Target::ALL.to_vec()),
            coefficient in any::<prop::sample::Index>(),
            in_intercept in any::<bool>(),
        ) {
            let mut m = m;
            let p = pick.index(m.per_pstate.len());
            let fit = match target {
                Target::Perf => &mut m.per_pstate[p].perf,
                Target::Power => &mut m.per_pstate[p].power,
                Target::Throughput => &mut m.per_pstate[p].throughput,
            };
            if in_intercept {
                fit.intercept = f64::NAN;
            } else {
                let i = coefficient.index(fit.coefficients.len());
                fit.coefficients[i] = f64::NAN;
            }
            let rejected = matches!(m.validate(), Err(ModelError::NonFinite { .. }));
            prop_assert!(rejected);
        }
    }
}
