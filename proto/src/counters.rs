//! Raw counters of one VM over one timeslice: what a platform measures, before any derivation.
//!
//! Counters are deltas over the slice (not running totals), summed over the VM's vCPU threads.
//! A platform that cannot measure a counter (no hardware PMU, no meter) marks it unavailable
//! instead of reporting a zero that would look like a real measurement.

use serde::{Deserialize, Serialize};

/// A counter, or group of counters, that a platform may be unable to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counter {
    /// Instructions retired.
    Instructions,
    /// Core cycles.
    Cycles,
    /// Private (L2) cache misses.
    L2Misses,
    /// Shared last-level (L3) cache misses.
    L3Misses,
    /// Memory accesses.
    MemoryAccesses,
    /// Virtual disk calls and bytes.
    Disk,
    /// Virtual NIC packets and bytes.
    Network,
    /// Package energy.
    Energy,
    /// vCPU run time.
    CpuTime,
}

impl Counter {
    /// Every counter, in declaration order.
    pub const ALL: [Self; 9] = [
        Self::Instructions,
        Self::Cycles,
        Self::L2Misses,
        Self::L3Misses,
        Self::MemoryAccesses,
        Self::Disk,
        Self::Network,
        Self::Energy,
        Self::CpuTime,
    ];

    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

/// A set of [`Counter`]s, as a bit set (the fast path copies it every slice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CounterSet(u16);

impl CounterSet {
    /// The empty set.
    pub const EMPTY: Self = Self(0);

    /// True when `counter` is in the set.
    pub const fn contains(self, counter: Counter) -> bool {
        self.0 & counter.bit() != 0
    }

    /// Adds `counter`.
    pub fn insert(&mut self, counter: Counter) {
        self.0 |= counter.bit();
    }

    /// True when the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The counters in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Counter> {
        Counter::ALL.into_iter().filter(move |c| self.contains(*c))
    }
}

impl FromIterator<Counter> for CounterSet {
    fn from_iter<I: IntoIterator<Item = Counter>>(iter: I) -> Self {
        let mut set = Self::EMPTY;
        for c in iter {
            set.insert(c);
        }
        set
    }
}

impl Serialize for CounterSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for CounterSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Vec::<Counter>::deserialize(deserializer)?.into_iter().collect())
    }
}

/// What one VM did during one timeslice. Units: seconds, counts, bytes, nanoseconds, joules.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawCounters {
    /// Wall-clock length of the slice in seconds.
    pub timeslice_seconds: f64,
    /// Instructions retired.
    pub instructions: u64,
    /// Core cycles while a vCPU of the VM ran.
    pub cycles: u64,
    /// L2 cache misses.
    pub l2_misses: u64,
    /// L3 cache misses.
    pub l3_misses: u64,
    /// Memory accesses.
    pub memory_accesses: u64,
    /// Virtual disk reads completed.
    pub disk_reads: u64,
    /// Bytes read from the virtual disk.
    pub disk_read_bytes: u64,
    /// Virtual disk writes completed.
    pub disk_writes: u64,
    /// Bytes written to the virtual disk.
    pub disk_write_bytes: u64,
    /// Packets received by the VM's NICs.
    pub packets_rx: u64,
    /// Bytes received by the VM's NICs.
    pub bytes_rx: u64,
    /// Packets sent by the VM's NICs.
    pub packets_tx: u64,
    /// Bytes sent by the VM's NICs.
    pub bytes_tx: u64,
    /// Run time of the VM's vCPU threads, summed, in ns.
    pub cpu_time_ns: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Package energy over the slice in joules, where metered.
    pub energy_joules: Option<f64>,
    /// Counters the platform could not measure (their fields hold 0 and mean "unknown").
    pub unavailable: CounterSet,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_set_holds_what_was_inserted() {
        let set: CounterSet = [Counter::L3Misses, Counter::Energy].into_iter().collect();
        assert!(set.contains(Counter::L3Misses) && set.contains(Counter::Energy));
        assert!(!set.contains(Counter::Instructions));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![Counter::L3Misses, Counter::Energy]);
        assert!(CounterSet::EMPTY.is_empty());
    }

    #[test]
    fn counter_set_serialises_as_names() -> Result<(), serde_json::Error> {
        let set: CounterSet = [Counter::Cycles, Counter::Disk].into_iter().collect();
        let json = serde_json::to_string(&set)?;
        assert_eq!(json, r#"["cycles","disk"]"#);
        assert_eq!(serde_json::from_str::<CounterSet>(&json)?, set);
        Ok(())
    }
}
