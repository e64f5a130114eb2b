//! P-state tables: the frequencies (and, where known, voltages) a hardware class offers.
//!
//! A table is ordered by increasing frequency, so index 0 is the slowest P-state and the last
//! index is f_max, the reference of every ratio. (ACPI numbers the other way round: P0 is the
//! fastest. vmgov never uses ACPI numbers.)

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Most P-states a table may hold; real parts have fewer than 32.
pub const MAX_PSTATES: usize = 64;

/// True when two frequencies name the same P-state: within 1 kHz, since sysfs and MSR tables
/// round to kHz or MHz. NaN matches nothing.
pub fn same_frequency(a_hz: f64, b_hz: f64) -> bool {
    (a_hz - b_hz).abs() < 1e3
}

/// One performance state: a core frequency and, where known, its supply voltage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PState {
    /// Core clock in Hz.
    pub frequency_hz: f64,
    /// Supply voltage in volts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voltage_v: Option<f64>,
}

impl PState {
    /// A P-state at `frequency_hz` with no known voltage.
    pub const fn new(frequency_hz: f64) -> Self {
        Self { frequency_hz, voltage_v: None }
    }

    /// A P-state at `frequency_hz` and `voltage_v`.
    pub const fn with_voltage(frequency_hz: f64, voltage_v: f64) -> Self {
        Self { frequency_hz, voltage_v: Some(voltage_v) }
    }
}

/// Why a P-state table was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PStateError {
    /// The table is empty.
    #[error("a P-state table needs at least one P-state")]
    Empty,
    /// The table is longer than [`MAX_PSTATES`].
    #[error("a P-state table may hold at most {MAX_PSTATES} P-states, this one has {len}")]
    TooMany {
        /// Number of P-states given.
        len: usize,
    },
    /// A frequency is not a positive finite number.
    #[error("P-state {index}: frequency {frequency_hz} Hz is not a positive finite number")]
    BadFrequency {
        /// Position in the table.
        index: usize,
        /// The frequency given.
        frequency_hz: f64,
    },
    /// A voltage is not a positive finite number.
    #[error("P-state {index}: voltage {voltage_v} V is not a positive finite number")]
    BadVoltage {
        /// Position in the table.
        index: usize,
        /// The voltage given.
        voltage_v: f64,
    },
    /// Frequencies do not strictly increase.
    #[error(
        "P-state {index}: frequency {frequency_hz} Hz is not above the previous one \
         ({previous_hz} Hz); list P-states from slowest to fastest, each once"
    )]
    NotIncreasing {
        /// Position in the table.
        index: usize,
        /// The frequency given.
        frequency_hz: f64,
        /// The frequency before it.
        previous_hz: f64,
    },
}

/// A validated P-state table: non-empty, frequencies positive, finite and strictly increasing,
/// voltages (where given) positive and finite.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<PState>", into = "Vec<PState>")]
pub struct PStateTable {
    pstates: Vec<PState>,
}

impl PStateTable {
    /// Validates `pstates` into a table.
    pub fn new(pstates: Vec<PState>) -> Result<Self, PStateError> {
        if pstates.is_empty() {
            return Err(PStateError::Empty);
        }
        if pstates.len() > MAX_PSTATES {
            return Err(PStateError::TooMany { len: pstates.len() });
        }
        for (index, p) in pstates.iter().enumerate() {
            if !(p.frequency_hz.is_finite() && p.frequency_hz > 0.0) {
                return Err(PStateError::BadFrequency { index, frequency_hz: p.frequency_hz });
            }
            if let Some(voltage_v) = p.voltage_v
                && !(voltage_v.is_finite() && voltage_v > 0.0)
            {
                return Err(PStateError::BadVoltage { index, voltage_v });
            }
            if index > 0 {
                let previous_hz = pstates[index - 1].frequency_hz;
                if p.frequency_hz <= previous_hz {
                    return Err(PStateError::NotIncreasing {
                        index,
                        frequency_hz: p.frequency_hz,
                        previous_hz,
                    });
                }
            }
        }
        Ok(Self { pstates })
    }

    /// Number of P-states (at least one).
    pub fn len(&self) -> usize {
        self.pstates.len()
    }

    /// Always false: a table holds at least one P-state.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The P-states, slowest first.
    pub fn as_slice(&self) -> &[PState] {
        &self.pstates
    }

    /// The P-state at `index`, if there is one.
    pub fn get(&self, index: usize) -> Option<&PState> {
        self.pstates.get(index)
    }

    /// Index of f_max, the fastest P-state.
    pub fn max_index(&self) -> usize {
        self.pstates.len() - 1
    }

    /// f_max in Hz.
    pub fn max_frequency_hz(&self) -> f64 {
        self.pstates[self.max_index()].frequency_hz
    }

    /// Frequency of the P-state at `index` in Hz.
    pub fn frequency_hz(&self, index: usize) -> Option<f64> {
        self.pstates.get(index).map(|p| p.frequency_hz)
    }

    /// Index of the P-state whose frequency is `frequency_hz` (see [`same_frequency`]).
    pub fn index_of(&self, frequency_hz: f64) -> Option<usize> {
        self.pstates.iter().position(|p| same_frequency(p.frequency_hz, frequency_hz))
    }

    /// True when both tables list the same frequencies (see [`same_frequency`]); voltages are
    /// not compared, since a model does not depend on them.
    pub fn same_frequencies(&self, other: &Self) -> bool {
        self.len() == other.len()
            && self
                .pstates
                .iter()
                .zip(&other.pstates)
                .all(|(a, b)| same_frequency(a.frequency_hz, b.frequency_hz))
    }
}

impl TryFrom<Vec<PState>> for PStateTable {
    type Error = PStateError;

    fn try_from(pstates: Vec<PState>) -> Result<Self, Self::Error> {
        Self::new(pstates)
    }
}

impl From<PStateTable> for Vec<PState> {
    fn from(table: PStateTable) -> Self {
        table.pstates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phenom() -> Vec<PState> {
        [(1.4, 1.050), (1.6, 1.100), (1.8, 1.125), (2.0, 1.150), (2.2, 1.200)]
            .into_iter()
            .map(|(ghz, v)| PState::with_voltage(ghz * 1e9, v))
            .collect()
    }

    #[test]
    fn accepts_the_reports_phenom_table() -> Result<(), PStateError> {
        let table = PStateTable::new(phenom())?;
        assert_eq!(table.len(), 5);
        assert_eq!(table.max_index(), 4);
        assert!((table.max_frequency_hz() - 2.2e9).abs() < 1.0);
        assert_eq!(table.index_of(1.8e9), Some(2));
        assert_eq!(table.index_of(1.7e9), None);
        Ok(())
    }

    #[test]
    fn refuses_bad_tables() {
        assert_eq!(PStateTable::new(vec![]), Err(PStateError::Empty));
        let mut descending = phenom();
        descending.reverse();
        assert!(matches!(
            PStateTable::new(descending),
            Err(PStateError::NotIncreasing { index: 1, .. })
        ));
        let mut duplicate = phenom();
        duplicate[1].frequency_hz = duplicate[0].frequency_hz;
        assert!(matches!(
            PStateTable::new(duplicate),
            Err(PStateError::NotIncreasing { index: 1, .. })
        ));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut t = phenom();
            t[0].frequency_hz = bad;
            assert!(matches!(PStateTable::new(t), Err(PStateError::BadFrequency { index: 0, .. })));
            let mut t = phenom();
            t[3].voltage_v = Some(bad);
            assert!(matches!(PStateTable::new(t), Err(PStateError::BadVoltage { index: 3, .. })));
        }
        let many = (1..=65).map(|i| PState::new(f64::from(i) * 1e8)).collect();
        assert_eq!(PStateTable::new(many), Err(PStateError::TooMany { len: 65 }));
    }

    #[test]
    fn voltages_are_optional() -> Result<(), PStateError> {
        let table = PStateTable::new(vec![PState::new(1e9), PState::with_voltage(2e9, 1.1)])?;
        assert_eq!(table.get(0).and_then(|p| p.voltage_v), None);
        Ok(())
    }

    #[test]
    fn deserialising_validates() {
        let ok: Result<PStateTable, _> =
            serde_json::from_str(r#"[{"frequency_hz":1e9},{"frequency_hz":2e9,"voltage_v":1.2}]"#);
        assert!(ok.is_ok());
        let err =
            serde_json::from_str::<PStateTable>(r#"[{"frequency_hz":2e9},{"frequency_hz":1e9}]"#)
                .map(|_| ())
                .map_err(|e| e.to_string());
        assert!(matches!(err, Err(ref m) if m.contains("not above the previous one")), "{err:?}");
    }
}
