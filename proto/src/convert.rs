//! The one place where generated protobuf types meet domain types.
//!
//! Incoming messages are checked here (missing fields, unknown enum values, invalid tables,
//! thresholds and models become a [`ConvertError`], which turns into `INVALID_ARGUMENT`), so code
//! past the gRPC edge only ever sees valid domain values.

use thiserror::Error;

use crate::{
    counters::{Counter, RawCounters},
    decide::{Objective, ThresholdError, Thresholds},
    features::{Feature, UnknownFeature},
    model::{
        Algorithm, EnergyModel, FitQuality, LinearFit, ModelError, PStateModel, Target,
        TrainingInfo,
    },
    pb,
    predict::Ratios,
    pstate::{PState, PStateError, PStateTable},
    scope::{ScopeError, ThresholdScope},
};

/// A message that does not convert into a valid domain value.
#[derive(Debug, Error)]
pub enum ConvertError {
    /// A required field is absent.
    #[error("{0} is required")]
    Missing(&'static str),
    /// An enum field holds a value this build does not know.
    #[error("{field}: unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The raw value.
        value: i32,
    },
    /// A P-state table is invalid.
    #[error(transparent)]
    PStates(#[from] PStateError),
    /// A threshold is invalid.
    #[error(transparent)]
    Thresholds(#[from] ThresholdError),
    /// A scope is invalid.
    #[error(transparent)]
    Scope(#[from] ScopeError),
    /// A feature name is unknown.
    #[error(transparent)]
    Feature(#[from] UnknownFeature),
    /// A model is invalid.
    #[error("invalid model: {0}")]
    Model(#[from] ModelError),
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        Self::invalid_argument(e.to_string())
    }
}

fn required<T>(field: Option<T>, name: &'static str) -> Result<T, ConvertError> {
    field.ok_or(ConvertError::Missing(name))
}

impl TryFrom<&pb::PStateTable> for PStateTable {
    type Error = ConvertError;

    fn try_from(t: &pb::PStateTable) -> Result<Self, Self::Error> {
        let pstates = t
            .pstates
            .iter()
            .map(|p| PState { frequency_hz: p.frequency_hz, voltage_v: p.voltage_v })
            .collect();
        Ok(Self::new(pstates)?)
    }
}

impl From<&PStateTable> for pb::PStateTable {
    fn from(t: &PStateTable) -> Self {
        Self {
            pstates: t
                .as_slice()
                .iter()
                .map(|p| pb::PState { frequency_hz: p.frequency_hz, voltage_v: p.voltage_v })
                .collect(),
        }
    }
}

impl From<Counter> for pb::Counter {
    fn from(c: Counter) -> Self {
        match c {
            Counter::Instructions => Self::Instructions,
            Counter::Cycles => Self::Cycles,
            Counter::L2Misses => Self::L2Misses,
            Counter::L3Misses => Self::L3Misses,
            Counter::MemoryAccesses => Self::MemoryAccesses,
            Counter::Disk => Self::Disk,
            Counter::Network => Self::Network,
            Counter::Energy => Self::Energy,
            Counter::CpuTime => Self::CpuTime,
        }
    }
}

/// Decodes a `repeated Counter` field.
pub fn counters_from_pb(values: &[i32], field: &'static str) -> Result<Vec<Counter>, ConvertError> {
    values
        .iter()
        .map(|&value| {
            let c = pb::Counter::try_from(value)
                .map_err(|_| ConvertError::UnknownEnum { field, value })?;
            Ok(match c {
                pb::Counter::Unspecified => return Err(ConvertError::UnknownEnum { field, value }),
                pb::Counter::Instructions => Counter::Instructions,
                pb::Counter::Cycles => Counter::Cycles,
                pb::Counter::L2Misses => Counter::L2Misses,
                pb::Counter::L3Misses => Counter::L3Misses,
                pb::Counter::MemoryAccesses => Counter::MemoryAccesses,
                pb::Counter::Disk => Counter::Disk,
                pb::Counter::Network => Counter::Network,
                pb::Counter::Energy => Counter::Energy,
                pb::Counter::CpuTime => Counter::CpuTime,
            })
        })
        .collect()
}

impl TryFrom<&pb::RawCounters> for RawCounters {
    type Error = ConvertError;

    fn try_from(c: &pb::RawCounters) -> Result<Self, Self::Error> {
        Ok(Self {
            timeslice_seconds: c.timeslice_seconds,
            instructions: c.instructions,
            cycles: c.cycles,
            l2_misses: c.l2_misses,
            l3_misses: c.l3_misses,
            memory_accesses: c.memory_accesses,
            disk_reads: c.disk_reads,
            disk_read_bytes: c.disk_read_bytes,
            disk_writes: c.disk_writes,
            disk_write_bytes: c.disk_write_bytes,
            packets_rx: c.packets_rx,
            bytes_rx: c.bytes_rx,
            packets_tx: c.packets_tx,
            bytes_tx: c.bytes_tx,
            cpu_time_ns: c.cpu_time_ns,
            vcpus: c.vcpus,
            energy_joules: c.energy_joules,
            unavailable: counters_from_pb(&c.unavailable, "RawCounters.unavailable")?
                .into_iter()
                .collect(),
        })
    }
}

impl From<&RawCounters> for pb::RawCounters {
    fn from(c: &RawCounters) -> Self {
        Self {
            timeslice_seconds: c.timeslice_seconds,
            instructions: c.instructions,
            cycles: c.cycles,
            l2_misses: c.l2_misses,
            l3_misses: c.l3_misses,
            memory_accesses: c.memory_accesses,
            disk_reads: c.disk_reads,
            disk_read_bytes: c.disk_read_bytes,
            disk_writes: c.disk_writes,
            disk_write_bytes: c.disk_write_bytes,
            packets_rx: c.packets_rx,
            bytes_rx: c.bytes_rx,
            packets_tx: c.packets_tx,
            bytes_tx: c.bytes_tx,
            cpu_time_ns: c.cpu_time_ns,
            vcpus: c.vcpus,
            energy_joules: c.energy_joules,
            unavailable: c.unavailable.iter().map(|c| pb::Counter::from(c) as i32).collect(),
        }
    }
}

impl TryFrom<&pb::Thresholds> for Thresholds {
    type Error = ConvertError;

    fn try_from(t: &pb::Thresholds) -> Result<Self, Self::Error> {
        Ok(Self::new(t.perf, t.throughput)?)
    }
}

impl From<&Thresholds> for pb::Thresholds {
    fn from(t: &Thresholds) -> Self {
        Self { perf: t.perf(), throughput: t.throughput() }
    }
}

impl TryFrom<&pb::ThresholdScope> for ThresholdScope {
    type Error = ConvertError;

    fn try_from(s: &pb::ThresholdScope) -> Result<Self, Self::Error> {
        use pb::threshold_scope::Scope;
        let scope = match required(s.scope.as_ref(), "ThresholdScope.scope")? {
            Scope::Fleet(_) => Self::Fleet,
            Scope::HardwareClass(n) => Self::HardwareClass(n.clone()),
            Scope::HostId(n) => Self::Host(n.clone()),
            Scope::VmId(n) => Self::Vm(n.clone()),
        };
        scope.validate()?;
        Ok(scope)
    }
}

impl From<&ThresholdScope> for pb::ThresholdScope {
    fn from(s: &ThresholdScope) -> Self {
        use pb::threshold_scope::Scope;
        let scope = match s {
            ThresholdScope::Fleet => Scope::Fleet(pb::threshold_scope::Fleet {}),
            ThresholdScope::HardwareClass(n) => Scope::HardwareClass(n.clone()),
            ThresholdScope::Host(n) => Scope::HostId(n.clone()),
            ThresholdScope::Vm(n) => Scope::VmId(n.clone()),
        };
        Self { scope: Some(scope) }
    }
}

/// Decodes an `Objective` field; unspecified means the default, [`Objective::Energy`].
pub fn objective_from_pb(value: i32) -> Result<Objective, ConvertError> {
    match pb::Objective::try_from(value) {
        Ok(pb::Objective::Unspecified | pb::Objective::Energy) => Ok(Objective::Energy),
        Ok(pb::Objective::Power) => Ok(Objective::Power),
        Ok(pb::Objective::Edp) => Ok(Objective::Edp),
        Err(_) => Err(ConvertError::UnknownEnum { field: "objective", value }),
    }
}

impl From<Objective> for pb::Objective {
    fn from(o: Objective) -> Self {
        match o {
            Objective::Power => Self::Power,
            Objective::Energy => Self::Energy,
            Objective::Edp => Self::Edp,
        }
    }
}

impl From<&pb::Ratios> for Ratios {
    fn from(r: &pb::Ratios) -> Self {
        Self { perf: r.perf, power: r.power, throughput: r.throughput }
    }
}

impl From<&Ratios> for pb::Ratios {
    fn from(r: &Ratios) -> Self {
        Self { perf: r.perf, power: r.power, throughput: r.throughput }
    }
}

impl pb::VmDecision {
    /// True when the VM's last verification window fell short of its thresholds (false without
    /// an observation, without thresholds, or with invalid ones).
    pub fn below_thresholds(&self) -> bool {
        self.observed
            .as_ref()
            .zip(self.thresholds.as_ref())
            .is_some_and(|(o, t)| Thresholds::try_from(t).is_ok_and(|t| !t.admit(&Ratios::from(o))))
    }
}

impl From<Target> for pb::Target {
    fn from(t: Target) -> Self {
        match t {
            Target::Perf => Self::Perf,
            Target::Power => Self::Power,
            Target::Throughput => Self::Throughput,
        }
    }
}

fn target_from_pb(value: i32) -> Result<Target, ConvertError> {
    match pb::Target::try_from(value) {
        Ok(pb::Target::Perf) => Ok(Target::Perf),
        Ok(pb::Target::Power) => Ok(Target::Power),
        Ok(pb::Target::Throughput) => Ok(Target::Throughput),
        Ok(pb::Target::Unspecified) | Err(_) => {
            Err(ConvertError::UnknownEnum { field: "FitQuality.target", value })
        }
    }
}

impl From<Algorithm> for pb::Algorithm {
    fn from(a: Algorithm) -> Self {
        match a {
            Algorithm::Ols => Self::Ols,
            Algorithm::Ridge => Self::Ridge,
            Algorithm::Lasso => Self::Lasso,
        }
    }
}

/// Decodes an `Algorithm` field; unspecified means [`Algorithm::Ols`].
pub fn algorithm_from_pb(value: i32) -> Result<Algorithm, ConvertError> {
    match pb::Algorithm::try_from(value) {
        Ok(pb::Algorithm::Unspecified | pb::Algorithm::Ols) => Ok(Algorithm::Ols),
        Ok(pb::Algorithm::Ridge) => Ok(Algorithm::Ridge),
        Ok(pb::Algorithm::Lasso) => Ok(Algorithm::Lasso),
        Err(_) => Err(ConvertError::UnknownEnum { field: "algorithm", value }),
    }
}

/// Parses feature names in order.
pub fn features_from_names(names: &[String]) -> Result<Vec<Feature>, ConvertError> {
    Ok(names.iter().map(|n| n.parse()).collect::<Result<_, UnknownFeature>>()?)
}

fn fit_from_pb(fit: Option<&pb::LinearFit>, name: &'static str) -> Result<LinearFit, ConvertError> {
    let fit = required(fit, name)?;
    Ok(LinearFit { intercept: fit.intercept, coefficients: fit.coefficients.clone() })
}

fn fit_to_pb(fit: &LinearFit) -> pb::LinearFit {
    pb::LinearFit { intercept: fit.intercept, coefficients: fit.coefficients.clone() }
}

/// Converts and validates a model: a model that converts is safe to predict with.
impl TryFrom<&pb::EnergyModel> for EnergyModel {
    type Error = ConvertError;

    fn try_from(m: &pb::EnergyModel) -> Result<Self, Self::Error> {
        let pstates = PStateTable::try_from(required(m.pstates.as_ref(), "EnergyModel.pstates")?)?;
        let per_pstate = m
            .per_pstate
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if usize::try_from(p.pstate_index).ok() != Some(i) {
                    return Err(ConvertError::Model(ModelError::PStateCount {
                        expected: pstates.len(),
                        got: m.per_pstate.len(),
                    }));
                }
                Ok(PStateModel {
                    frequency_hz: p.frequency_hz,
                    perf: fit_from_pb(p.perf.as_ref(), "PStateModel.perf")?,
                    power: fit_from_pb(p.power.as_ref(), "PStateModel.power")?,
                    throughput: fit_from_pb(p.throughput.as_ref(), "PStateModel.throughput")?,
                })
            })
            .collect::<Result<_, _>>()?;
        let training = match &m.training {
            None => TrainingInfo::default(),
            Some(t) => TrainingInfo {
                algorithm: algorithm_from_pb(t.algorithm)?,
                alpha: t.alpha,
                sample_count: t.sample_count,
                folds: t.folds,
                quality: t
                    .quality
                    .iter()
                    .map(|q| {
                        Ok(FitQuality {
                            pstate_index: q.pstate_index,
                            target: target_from_pb(q.target)?,
                            r2: q.r2,
                            mae: q.mae,
                            mape: q.mape,
                        })
                    })
                    .collect::<Result<_, ConvertError>>()?,
                created_unix_ms: t.created_unix_ms,
                dropped_features: features_from_names(&t.dropped_features)?,
                notes: t.notes.clone(),
            },
        };
        let model = Self {
            hardware_class: m.hardware_class.clone(),
            version: m.version,
            pstates,
            features: features_from_names(&m.features)?,
            per_pstate,
            training,
        };
        model.validate()?;
        Ok(model)
    }
}

impl From<&EnergyModel> for pb::EnergyModel {
    fn from(m: &EnergyModel) -> Self {
        let t = &m.training;
        Self {
            hardware_class: m.hardware_class.clone(),
            version: m.version,
            pstates: Some((&m.pstates).into()),
            features: m.features.iter().map(|f| f.name().to_owned()).collect(),
            per_pstate: m
                .per_pstate
                .iter()
                .zip(0u32..)
                .map(|(p, pstate_index)| pb::PStateModel {
                    pstate_index,
                    frequency_hz: p.frequency_hz,
                    perf: Some(fit_to_pb(&p.perf)),
                    power: Some(fit_to_pb(&p.power)),
                    throughput: Some(fit_to_pb(&p.throughput)),
                })
                .collect(),
            training: Some(pb::TrainingInfo {
                algorithm: pb::Algorithm::from(t.algorithm) as i32,
                alpha: t.alpha,
                sample_count: t.sample_count,
                folds: t.folds,
                quality: t
                    .quality
                    .iter()
                    .map(|q| pb::FitQuality {
                        pstate_index: q.pstate_index,
                        target: pb::Target::from(q.target) as i32,
                        r2: q.r2,
                        mae: q.mae,
                        mape: q.mape,
                    })
                    .collect(),
                created_unix_ms: t.created_unix_ms,
                dropped_features: t.dropped_features.iter().map(|f| f.name().to_owned()).collect(),
                notes: t.notes.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::model::tests::{arb_model, sample_model};

    #[test]
    fn a_model_survives_the_wire() {
        let mut m = sample_model(5);
        m.training = TrainingInfo {
            algorithm: Algorithm::Ridge,
            alpha: 0.1,
            sample_count: 1234,
            folds: 5,
            quality: vec![FitQuality {
                pstate_index: 2,
                target: Target::Power,
                r2: 0.93,
                mae: 0.01,
                mape: 0.02,
            }],
            created_unix_ms: 1_700_000_000_000,
            dropped_features: vec![Feature::PacketsPerSecond],
            notes: "training suite v1".into(),
        };
        let bytes = pb::EnergyModel::from(&m).encode_to_vec();
        let back =
            EnergyModel::try_from(&pb::EnergyModel::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn bad_models_from_the_wire_are_refused_with_reasons() {
        let good = pb::EnergyModel::from(&sample_model(5));

        let mut m = good.clone();
        m.features[0] = "l4_misses".into();
        let err = EnergyModel::try_from(&m).unwrap_err();
        assert!(err.to_string().contains("l4_misses"), "{err}");

        let mut m = good.clone();
        m.per_pstate[1].perf.as_mut().unwrap().coefficients[0] = f64::NAN;
        assert!(matches!(
            EnergyModel::try_from(&m),
            Err(ConvertError::Model(ModelError::NonFinite { .. }))
        ));

        let mut m = good.clone();
        m.per_pstate[2].power = None;
        assert!(matches!(
            EnergyModel::try_from(&m),
            Err(ConvertError::Missing("PStateModel.power"))
        ));

        let mut m = good.clone();
        m.per_pstate.swap(0, 1);
        assert!(EnergyModel::try_from(&m).is_err());

        let mut m = good;
        m.pstates = None;
        let status = tonic::Status::from(EnergyModel::try_from(&m).unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("EnergyModel.pstates"));
    }

    #[test]
    fn counters_and_unknown_enums() {
        let c = RawCounters {
            timeslice_seconds: 0.03,
            instructions: 7,
            unavailable: [Counter::L2Misses, Counter::Energy].into_iter().collect(),
            energy_joules: Some(1.5),
            vcpus: 2,
            ..RawCounters::default()
        };
        assert_eq!(RawCounters::try_from(&pb::RawCounters::from(&c)).unwrap(), c);
        let wire = pb::RawCounters { unavailable: vec![99], ..pb::RawCounters::default() };
        assert!(matches!(
            RawCounters::try_from(&wire),
            Err(ConvertError::UnknownEnum { value: 99, .. })
        ));
        assert_eq!(objective_from_pb(0).unwrap(), Objective::Energy);
        assert_eq!(objective_from_pb(pb::Objective::Edp as i32).unwrap(), Objective::Edp);
        assert!(objective_from_pb(17).is_err());
        assert_eq!(algorithm_from_pb(0).unwrap(), Algorithm::Ols);
    }

    #[test]
    fn scopes_and_thresholds() {
        for s in [
            ThresholdScope::Fleet,
            ThresholdScope::HardwareClass("c".into()),
            ThresholdScope::Host("h".into()),
            ThresholdScope::Vm("v".into()),
        ] {
            assert_eq!(ThresholdScope::try_from(&pb::ThresholdScope::from(&s)).unwrap(), s);
        }
        assert!(matches!(
            ThresholdScope::try_from(&pb::ThresholdScope { scope: None }),
            Err(ConvertError::Missing(_))
        ));
        let empty =
            pb::ThresholdScope { scope: Some(pb::threshold_scope::Scope::HostId(String::new())) };
        assert!(matches!(ThresholdScope::try_from(&empty), Err(ConvertError::Scope(_))));
        assert!(Thresholds::try_from(&pb::Thresholds { perf: 70.0, throughput: 0.5 }).is_err());
    }

    proptest! {
        #[test]
        fn every_valid_model_round_trips(m in arb_model()) {
            let back = EnergyModel::try_from(&pb::EnergyModel::from(&m)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(back, m);
        }
    }
}
