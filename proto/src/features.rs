//! Features: the explanatory variables of the energy model, derived from [`RawCounters`] in
//! exactly one place ([`derive`]) so that agents, the coordinator and what-if clients agree.
//!
//! The report's eight features are [`Feature::REPORT`]. Names are stable: a model stores the
//! names of the features it was trained on, so features can be added later (append to the enum,
//! never rename or reuse a name) without breaking models already in the field.
//!
//! Counts per instruction hardly move with frequency; rates per second do move for a saturated
//! server. That is why a sample also records the P-state its slice ran at.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::counters::{Counter, RawCounters};

/// One explanatory variable of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Feature {
    /// L2 cache misses per instruction.
    L2MissesPerInstruction,
    /// L3 cache misses per instruction.
    L3MissesPerInstruction,
    /// Memory accesses per instruction.
    MemoryAccessesPerInstruction,
    /// Packets received per second.
    PacketsPerSecond,
    /// Disk reads per second.
    DiskReadsPerSecond,
    /// Bytes read from disk per second.
    DiskReadBytesPerSecond,
    /// Disk writes per second.
    DiskWritesPerSecond,
    /// Bytes written to disk per second.
    DiskWriteBytesPerSecond,
    /// Fraction of the slice the VM's vCPUs were running, averaged over its vCPUs (0 to 1).
    /// Not in the report: it is what lets a model see that a server is near saturation.
    VcpuUtilization,
}

/// Number of features vmgov knows.
pub const FEATURE_COUNT: usize = Feature::ALL.len();

impl Feature {
    /// Every known feature, in declaration order.
    pub const ALL: [Self; 9] = [
        Self::L2MissesPerInstruction,
        Self::L3MissesPerInstruction,
        Self::MemoryAccessesPerInstruction,
        Self::PacketsPerSecond,
        Self::DiskReadsPerSecond,
        Self::DiskReadBytesPerSecond,
        Self::DiskWritesPerSecond,
        Self::DiskWriteBytesPerSecond,
        Self::VcpuUtilization,
    ];

    /// The report's eight features (equations 1-6), in its order.
    pub const REPORT: [Self; 8] = [
        Self::L2MissesPerInstruction,
        Self::L3MissesPerInstruction,
        Self::MemoryAccessesPerInstruction,
        Self::PacketsPerSecond,
        Self::DiskReadsPerSecond,
        Self::DiskReadBytesPerSecond,
        Self::DiskWritesPerSecond,
        Self::DiskWriteBytesPerSecond,
    ];

    /// The stable name, as stored in models and used on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            Self::L2MissesPerInstruction => "l2_misses_per_instruction",
            Self::L3MissesPerInstruction => "l3_misses_per_instruction",
            Self::MemoryAccessesPerInstruction => "memory_accesses_per_instruction",
            Self::PacketsPerSecond => "packets_per_second",
            Self::DiskReadsPerSecond => "disk_reads_per_second",
            Self::DiskReadBytesPerSecond => "disk_read_bytes_per_second",
            Self::DiskWritesPerSecond => "disk_writes_per_second",
            Self::DiskWriteBytesPerSecond => "disk_write_bytes_per_second",
            Self::VcpuUtilization => "vcpu_utilization",
        }
    }

    /// The counters this feature is computed from.
    pub const fn counters(self) -> &'static [Counter] {
        match self {
            Self::L2MissesPerInstruction => &[Counter::L2Misses, Counter::Instructions],
            Self::L3MissesPerInstruction => &[Counter::L3Misses, Counter::Instructions],
            Self::MemoryAccessesPerInstruction => &[Counter::MemoryAccesses, Counter::Instructions],
            Self::PacketsPerSecond => &[Counter::Network],
            Self::DiskReadsPerSecond
            | Self::DiskReadBytesPerSecond
            | Self::DiskWritesPerSecond
            | Self::DiskWriteBytesPerSecond => &[Counter::Disk],
            Self::VcpuUtilization => &[Counter::CpuTime],
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A feature name that vmgov does not know.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown feature {0:?}; known features: {known}", known = known_names())]
pub struct UnknownFeature(pub String);

fn known_names() -> String {
    Feature::ALL.map(Feature::name).join(", ")
}

impl FromStr for Feature {
    type Err = UnknownFeature;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| UnknownFeature(s.to_owned()))
    }
}

impl Serialize for Feature {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Feature {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Values of the known features for one VM and one slice; a feature whose counters were
/// unavailable has no value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FeatureVector {
    values: [f64; FEATURE_COUNT],
    present: u16,
}

impl FeatureVector {
    /// A vector with no values.
    pub const fn new() -> Self {
        Self { values: [0.0; FEATURE_COUNT], present: 0 }
    }

    /// The value of `feature`, if known.
    #[inline]
    pub fn get(&self, feature: Feature) -> Option<f64> {
        (self.present & (1 << feature.index()) != 0).then(|| self.values[feature.index()])
    }

    /// Sets `feature` to `value`.
    #[inline]
    pub fn set(&mut self, feature: Feature, value: f64) {
        self.values[feature.index()] = value;
        self.present |= 1 << feature.index();
    }

    /// Builder form of [`set`](Self::set).
    #[must_use]
    pub fn with(mut self, feature: Feature, value: f64) -> Self {
        self.set(feature, value);
        self
    }

    /// The known features and their values, in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = (Feature, f64)> + '_ {
        Feature::ALL.into_iter().filter_map(|f| self.get(f).map(|v| (f, v)))
    }
}

/// Why features could not be derived from a slice's counters.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum FeatureError {
    /// The slice length is not a positive finite number of seconds.
    #[error("timeslice length {0} s is not a positive finite number")]
    BadTimeslice(f64),
    /// The VM has no vCPUs.
    #[error("a VM sample needs at least one vCPU")]
    NoVcpus,
}

// Counts are far below 2^53 per slice, so the u64 -> f64 conversions below are exact.
#[allow(clippy::cast_precision_loss, reason = "per-slice counts are far below 2^53")]
fn ratio(numerator: u64, denominator: u64) -> f64 {
    // A VM that retired no instructions in a slice (halted vCPUs) has no misses either; 0 is
    // the honest value and keeps the idle VM at the model's intercept.
    if denominator == 0 { 0.0 } else { numerator as f64 / denominator as f64 }
}

/// Derives every feature whose counters were measured. This is the one definition of what each
/// feature means.
#[allow(clippy::cast_precision_loss, reason = "per-slice counts are far below 2^53")]
pub fn derive(c: &RawCounters) -> Result<FeatureVector, FeatureError> {
    if !(c.timeslice_seconds.is_finite() && c.timeslice_seconds > 0.0) {
        return Err(FeatureError::BadTimeslice(c.timeslice_seconds));
    }
    if c.vcpus == 0 {
        return Err(FeatureError::NoVcpus);
    }
    let per_second = 1.0 / c.timeslice_seconds;
    let mut fv = FeatureVector::new();
    for feature in Feature::ALL {
        if feature.counters().iter().any(|&counter| c.unavailable.contains(counter)) {
            continue;
        }
        let value = match feature {
            Feature::L2MissesPerInstruction => ratio(c.l2_misses, c.instructions),
            Feature::L3MissesPerInstruction => ratio(c.l3_misses, c.instructions),
            Feature::MemoryAccessesPerInstruction => ratio(c.memory_accesses, c.instructions),
            Feature::PacketsPerSecond => c.packets_rx as f64 * per_second,
            Feature::DiskReadsPerSecond => c.disk_reads as f64 * per_second,
            Feature::DiskReadBytesPerSecond => c.disk_read_bytes as f64 * per_second,
            Feature::DiskWritesPerSecond => c.disk_writes as f64 * per_second,
            Feature::DiskWriteBytesPerSecond => c.disk_write_bytes as f64 * per_second,
            Feature::VcpuUtilization => {
                c.cpu_time_ns as f64 * 1e-9 * per_second / f64::from(c.vcpus)
            }
        };
        fv.set(feature, value);
    }
    Ok(fv)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn slice() -> RawCounters {
        RawCounters {
            timeslice_seconds: 0.01,
            instructions: 20_000_000,
            cycles: 22_000_000,
            l2_misses: 200_000,
            l3_misses: 100_000,
            memory_accesses: 120_000,
            disk_reads: 3,
            disk_read_bytes: 12_288,
            disk_writes: 1,
            disk_write_bytes: 4096,
            packets_rx: 5,
            bytes_rx: 7_500,
            cpu_time_ns: 15_000_000,
            vcpus: 2,
            ..RawCounters::default()
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() <= 1e-9 * b.abs().max(1.0))
    }

    #[test]
    fn derives_the_reports_features() -> Result<(), FeatureError> {
        let fv = derive(&slice())?;
        assert!(close(fv.get(Feature::L2MissesPerInstruction), 0.01));
        assert!(close(fv.get(Feature::L3MissesPerInstruction), 0.005));
        assert!(close(fv.get(Feature::MemoryAccessesPerInstruction), 0.006));
        assert!(close(fv.get(Feature::PacketsPerSecond), 500.0));
        assert!(close(fv.get(Feature::DiskReadsPerSecond), 300.0));
        assert!(close(fv.get(Feature::DiskReadBytesPerSecond), 1_228_800.0));
        assert!(close(fv.get(Feature::DiskWritesPerSecond), 100.0));
        assert!(close(fv.get(Feature::DiskWriteBytesPerSecond), 409_600.0));
        assert!(close(fv.get(Feature::VcpuUtilization), 0.75));
        Ok(())
    }

    #[test]
    fn unavailable_counters_leave_their_features_unknown() -> Result<(), FeatureError> {
        let mut c = slice();
        c.unavailable = [Counter::Instructions, Counter::Network].into_iter().collect();
        let fv = derive(&c)?;
        assert_eq!(fv.get(Feature::L2MissesPerInstruction), None);
        assert_eq!(fv.get(Feature::MemoryAccessesPerInstruction), None);
        assert_eq!(fv.get(Feature::PacketsPerSecond), None);
        assert!(fv.get(Feature::DiskReadsPerSecond).is_some());
        Ok(())
    }

    #[test]
    fn an_idle_vm_has_zero_misses_per_instruction() -> Result<(), FeatureError> {
        let c = RawCounters { timeslice_seconds: 0.01, vcpus: 1, ..RawCounters::default() };
        let fv = derive(&c)?;
        assert_eq!(fv.iter().count(), FEATURE_COUNT);
        assert!(fv.iter().all(|(_, v)| v == 0.0));
        Ok(())
    }

    #[test]
    fn refuses_bad_slices() {
        for t in [0.0, -0.01, f64::NAN, f64::INFINITY] {
            let c = RawCounters { timeslice_seconds: t, ..slice() };
            assert!(matches!(derive(&c), Err(FeatureError::BadTimeslice(_))));
        }
        let c = RawCounters { vcpus: 0, ..slice() };
        assert_eq!(derive(&c), Err(FeatureError::NoVcpus));
    }

    #[test]
    fn names_are_stable_and_round_trip() {
        // Models in the field store these names: changing one breaks them.
        let names: Vec<_> = Feature::REPORT.map(Feature::name).to_vec();
        assert_eq!(
            names,
            [
                "l2_misses_per_instruction",
                "l3_misses_per_instruction",
                "memory_accesses_per_instruction",
                "packets_per_second",
                "disk_reads_per_second",
                "disk_read_bytes_per_second",
                "disk_writes_per_second",
                "disk_write_bytes_per_second",
            ]
        );
        for f in Feature::ALL {
            assert_eq!(f.name().parse::<Feature>(), Ok(f));
        }
        let err = "l4_misses".parse::<Feature>().map_err(|e| e.to_string());
        assert!(
            matches!(err, Err(ref m) if m.contains("l4_misses") && m.contains("vcpu_utilization"))
        );
    }

    proptest! {
        #[test]
        fn derived_features_are_finite_and_non_negative(
            t in 1e-4f64..10.0,
            counts in proptest::array::uniform13(0u64..1u64 << 40),
            vcpus in 1u32..256,
        ) {
            let c = RawCounters {
                timeslice_seconds: t,
                instructions: counts[0], cycles: counts[1], l2_misses: counts[2],
                l3_misses: counts[3], memory_accesses: counts[4], disk_reads: counts[5],
                disk_read_bytes: counts[6], disk_writes: counts[7], disk_write_bytes: counts[8],
                packets_rx: counts[9], bytes_rx: counts[10], packets_tx: counts[11],
                cpu_time_ns: counts[12], vcpus, ..RawCounters::default()
            };
            let fv = derive(&c).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(fv.iter().count(), FEATURE_COUNT);
            for (f, v) in fv.iter() {
                prop_assert!(v.is_finite() && v >= 0.0, "{f} = {v}");
            }
        }
    }
}
