//! Hardware classes of the simulated host, as data files (TOML) users can write.
//!
//! A class says how many cores there are, which P-states they offer, whether the cores share one
//! voltage plane, and the constants of the power model in [`super::physics`]. The shipped classes
//! are in `node-agent/sim/classes/` and embedded in the binary; `docs/calibration.md` gives the
//! source of every number.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmgov_proto::{PState, PStateTable, pstate::PStateError};

/// Whether cores can run at different voltages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VoltageDomain {
    /// One plane for all cores, held at the voltage of the fastest core's P-state (AMD family
    /// 10h: frequency is per core, voltage is not).
    Shared,
    /// A regulator per core (modern server parts).
    PerCore,
}

/// The power model's constants (see [`super::physics`] for the equations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerParams {
    /// Effective switched capacitance per core at full activity, farads: dynamic power is
    /// `ceff · V² · f · activity`.
    pub ceff_farads: f64,
    /// Activity of a cycle stalled on memory relative to a retiring cycle (0..=1).
    pub stall_activity: f64,
    /// Activity of a halted (idle) core relative to a busy one (0..=1).
    pub idle_activity: f64,
    /// Leakage of one core at `leakage_ref_voltage_v`, watts.
    pub leakage_watts: f64,
    /// Voltage at which `leakage_watts` holds.
    pub leakage_ref_voltage_v: f64,
    /// Leakage scales as `(V / V_ref)^leakage_exponent`.
    pub leakage_exponent: f64,
    /// Share of its leakage a halted core still burns (1 without power gating, near 0 in a deep
    /// C-state).
    pub idle_leakage_fraction: f64,
    /// Uncore (northbridge, L3, memory controller) power, watts, independent of core P-states.
    pub uncore_watts: f64,
    /// Extra uncore power per GB/s of DRAM traffic.
    pub uncore_watts_per_gbps: f64,
}

/// Costs of changing a core's P-state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvfsParams {
    /// The core does no work for this long at every frequency change, seconds.
    pub stall_s: f64,
    /// Extra stall when the core's voltage changes too, seconds.
    pub voltage_stall_s: f64,
    /// A requested change takes effect only after this long (the core keeps running at the old
    /// P-state meanwhile), seconds: firmware-controlled parts.
    pub delay_s: f64,
}

/// A hardware class of simulated host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareClass {
    /// Class id, as agents report it and models are keyed by.
    pub name: String,
    /// Free text: what part this models and where its numbers come from.
    #[serde(default)]
    pub description: String,
    /// Number of cores (1..=64).
    pub cores: usize,
    /// Voltage domain.
    pub voltage_domain: VoltageDomain,
    /// Sustainable DRAM bandwidth of the socket, bytes per second.
    pub memory_bandwidth_bytes_per_s: f64,
    /// P-states, slowest first.
    pub pstates: Vec<PState>,
    /// Power model.
    pub power: PowerParams,
    /// DVFS transition costs.
    pub dvfs: DvfsParams,
}

/// A class file that could not be used.
#[derive(Debug, Error)]
pub enum ClassError {
    /// The file could not be read.
    #[error("reading hardware class {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid class description.
    #[error("parsing hardware class {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// The P-state table is invalid.
    #[error("hardware class {class}: invalid P-state table")]
    PStates {
        /// The class.
        class: String,
        /// The cause.
        #[source]
        source: PStateError,
    },
    /// A field is out of range.
    #[error("hardware class {class}: {field} = {value} is out of range ({expected})")]
    Field {
        /// The class.
        class: String,
        /// The field.
        field: &'static str,
        /// The value given.
        value: f64,
        /// What is allowed.
        expected: &'static str,
    },
    /// No voltage for a P-state.
    #[error("hardware class {class}: every P-state needs a voltage_v for the power model")]
    MissingVoltage {
        /// The class.
        class: String,
    },
    /// No built-in class of that name.
    #[error("no built-in hardware class {0:?}; built-in: {known}", known = builtin_names().join(", "))]
    Unknown(String),
}

/// The classes shipped with vmgov (file name, contents).
const BUILTIN: &[(&str, &str)] = &[
    ("phenom-9500", include_str!("../../classes/phenom-9500.toml")),
    ("epyc-7502", include_str!("../../classes/epyc-7502.toml")),
];

/// Names of the built-in classes.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

impl HardwareClass {
    /// A built-in class by name.
    pub fn builtin(name: &str) -> Result<Self, ClassError> {
        let (_, text) = BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ClassError::Unknown(name.into()))?;
        Self::parse(text, Path::new(name))
    }

    /// A built-in class by name, or a class file by path.
    pub fn load(name_or_path: &str) -> Result<Self, ClassError> {
        if BUILTIN.iter().any(|(n, _)| *n == name_or_path) {
            return Self::builtin(name_or_path);
        }
        let path = Path::new(name_or_path);
        let text = super::read_definition(name_or_path).map_err(|e| match e {
            super::DefinitionRead::Unknown => ClassError::Unknown(name_or_path.into()),
            super::DefinitionRead::Io(source) => ClassError::Read { path: path.into(), source },
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a class description; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ClassError> {
        let class: Self = toml::from_str(text)
            .map_err(|source| ClassError::Parse { path: origin.into(), source })?;
        class.validate()?;
        Ok(class)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ClassError> {
        let field = |field, value: f64, ok: bool, expected| {
            if ok {
                Ok(())
            } else {
                Err(ClassError::Field { class: self.name.clone(), field, value, expected })
            }
        };
        #[allow(clippy::cast_precision_loss, reason = "small counts")]
        let cores = self.cores as f64;
        field("cores", cores, (1..=64).contains(&self.cores), "1 to 64")?;
        let positive = "a positive number";
        let fraction = "0 to 1";
        let non_negative = "0 or more";
        let p = &self.power;
        let bw = self.memory_bandwidth_bytes_per_s;
        field("memory_bandwidth_bytes_per_s", bw, bw.is_finite() && bw > 0.0, positive)?;
        for (name, v, ok, expected) in [
            (
                "power.ceff_farads",
                p.ceff_farads,
                p.ceff_farads > 0.0 && p.ceff_farads < 1e-6,
                "0 to 1e-6",
            ),
            (
                "power.stall_activity",
                p.stall_activity,
                (0.0..=1.0).contains(&p.stall_activity),
                fraction,
            ),
            (
                "power.idle_activity",
                p.idle_activity,
                (0.0..=1.0).contains(&p.idle_activity),
                fraction,
            ),
            ("power.leakage_watts", p.leakage_watts, p.leakage_watts >= 0.0, non_negative),
            (
                "power.leakage_ref_voltage_v",
                p.leakage_ref_voltage_v,
                p.leakage_ref_voltage_v > 0.0,
                positive,
            ),
            (
                "power.leakage_exponent",
                p.leakage_exponent,
                (0.0..=10.0).contains(&p.leakage_exponent),
                "0 to 10",
            ),
            (
                "power.idle_leakage_fraction",
                p.idle_leakage_fraction,
                (0.0..=1.0).contains(&p.idle_leakage_fraction),
                fraction,
            ),
            ("power.uncore_watts", p.uncore_watts, p.uncore_watts >= 0.0, non_negative),
            (
                "power.uncore_watts_per_gbps",
                p.uncore_watts_per_gbps,
                p.uncore_watts_per_gbps >= 0.0,
                non_negative,
            ),
            (
                "dvfs.stall_s",
                self.dvfs.stall_s,
                (0.0..0.01).contains(&self.dvfs.stall_s),
                "0 to 0.01",
            ),
            (
                "dvfs.voltage_stall_s",
                self.dvfs.voltage_stall_s,
                (0.0..0.01).contains(&self.dvfs.voltage_stall_s),
                "0 to 0.01",
            ),
            (
                "dvfs.delay_s",
                self.dvfs.delay_s,
                (0.0..0.01).contains(&self.dvfs.delay_s),
                "0 to 0.01",
            ),
        ] {
            field(name, v, v.is_finite() && ok, expected)?;
        }
        self.pstate_table()?;
        if self.pstates.iter().any(|p| p.voltage_v.is_none()) {
            return Err(ClassError::MissingVoltage { class: self.name.clone() });
        }
        Ok(())
    }

    /// The validated P-state table.
    pub fn pstate_table(&self) -> Result<PStateTable, ClassError> {
        PStateTable::new(self.pstates.clone())
            .map_err(|source| ClassError::PStates { class: self.name.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_classes_are_valid() {
        for name in builtin_names() {
            let class = HardwareClass::builtin(name).unwrap();
            assert_eq!(class.name, name);
        }
        let phenom = HardwareClass::builtin("phenom-9500").unwrap();
        assert_eq!(phenom.cores, 4);
        assert_eq!(phenom.voltage_domain, VoltageDomain::Shared);
        let f: Vec<_> = phenom.pstates.iter().map(|p| p.frequency_hz / 1e9).collect();
        assert_eq!(f, [1.4, 1.6, 1.8, 2.0, 2.2]);
    }

    #[test]
    fn bad_files_say_what_is_wrong() {
        let text = include_str!("../../classes/phenom-9500.toml");
        let err =
            HardwareClass::parse(&text.replace("cores = 4", "cores = 0"), Path::new("x.toml"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("cores") && err.contains("1 to 64"), "{err}");
        let err = HardwareClass::parse(
            &text.replace("stall_activity = ", "stall_activty = "),
            Path::new("x.toml"),
        )
        .unwrap_err();
        assert!(matches!(err, ClassError::Parse { .. }), "{err}");
        let err = HardwareClass::parse(
            &text.replace("frequency_hz = 1.6e9", "frequency_hz = 1.2e9"),
            Path::new("x"),
        )
        .unwrap_err();
        assert!(matches!(err, ClassError::PStates { .. }), "{err}");
        assert!(matches!(HardwareClass::load("no-such-class"), Err(ClassError::Unknown(_))));
        assert!(matches!(HardwareClass::load("/no/such.toml"), Err(ClassError::Read { .. })));
        assert!(HardwareClass::builtin("nehalem").unwrap_err().to_string().contains("phenom-9500"));
    }
}
