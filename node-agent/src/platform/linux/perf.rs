//! Hardware counters per vCPU thread through `perf_event_open`, because instructions, cycles
//! and cache misses are what the energy models predict from and only the PMU sees them. A
//! counter attached to a vCPU thread counts what that thread ran, and on KVM that is mostly
//! the guest (perf counts guest mode unless `exclude_guest` is set).
//!
//! Which kernel events stand for which counter, and how far they can be trusted:
//! - instructions: `PERF_COUNT_HW_INSTRUCTIONS`; cycles: `PERF_COUNT_HW_CPU_CYCLES`.
//! - L2 misses: `PERF_COUNT_HW_CACHE_REFERENCES`. On Intel the kernel maps it to
//!   LONGEST_LAT_CACHE.REFERENCE, the core's requests that reach the last-level cache, i.e. L2
//!   misses. On AMD Zen it counts L2 requests instead, so there it is a proxy.
//! - L3 misses: `PERF_COUNT_HW_CACHE_MISSES`, "usually last-level cache misses" (Intel:
//!   LONGEST_LAT_CACHE.MISS). On AMD Zen the generic event counts L2 misses; Zen's L3 is behind
//!   an uncore PMU that cannot be attached to a thread.
//! - memory accesses: the generic cache events NODE/READ/ACCESS + NODE/WRITE/ACCESS (requests
//!   served by a NUMA node's memory), where the kernel maps them (Intel: offcore response);
//!   unavailable where it does not.
//!
//! The kernel's generic events are the only ones that mean the same thing on every host; raw
//! per-model events would be more exact and are future work. Counting includes kernel mode
//! (`exclude_kernel(false)`, where `perf_event_paranoid` or the agent's privileges allow it):
//! perf-event2 excludes it by default, and the guest kernel's work (its network stack, its page
//! cache) is part of what a VM costs. Where kernel mode is refused the counters fall back to
//! user mode and [`PerfSupport::include_kernel`] says so. Under TCG the "guest" is QEMU's
//! translated code, so these counters measure the emulator, not the guest's instructions.
//!
//! More events than the PMU has counters are time-multiplexed by the kernel; every value is
//! scaled by time enabled / time running. Hosts without a PMU (most VMs) refuse hardware events
//! at open with ENOENT: [`PerfSupport::probe`] finds that once, warns once, and the counters are
//! reported unavailable while everything else keeps working.

use std::io;

use perf_event::{
    Builder,
    events::{Cache, CacheId, CacheOp, CacheResult, Hardware, Software},
};
use vmgov_proto::{Counter, CounterSet};

/// A perf event the agent opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PerfEvent {
    /// Instructions retired.
    Instructions,
    /// Core cycles.
    Cycles,
    /// Generic cache references (stands for L2 misses).
    CacheReferences,
    /// Generic cache misses (stands for L3 misses).
    CacheMisses,
    /// Reads served by a NUMA node's memory.
    NodeReads,
    /// Writes served by a NUMA node's memory.
    NodeWrites,
    /// Software task clock (ns on a CPU): needs no PMU.
    TaskClock,
}

impl PerfEvent {
    /// The hardware events, in the order they are opened.
    pub const HARDWARE: [Self; 6] = [
        Self::Instructions,
        Self::Cycles,
        Self::CacheReferences,
        Self::CacheMisses,
        Self::NodeReads,
        Self::NodeWrites,
    ];

    const COUNT: usize = 7;

    const fn slot(self) -> usize {
        self as usize
    }

    /// Name as `perf list` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Instructions => "instructions",
            Self::Cycles => "cycles",
            Self::CacheReferences => "cache-references",
            Self::CacheMisses => "cache-misses",
            Self::NodeReads => "node-loads",
            Self::NodeWrites => "node-stores",
            Self::TaskClock => "task-clock",
        }
    }

    /// The counter this event measures (alone, or with its partner for memory accesses).
    pub const fn counter(self) -> Option<Counter> {
        match self {
            Self::Instructions => Some(Counter::Instructions),
            Self::Cycles => Some(Counter::Cycles),
            Self::CacheReferences => Some(Counter::L2Misses),
            Self::CacheMisses => Some(Counter::L3Misses),
            Self::NodeReads | Self::NodeWrites => Some(Counter::MemoryAccesses),
            Self::TaskClock => None,
        }
    }

    fn builder(self) -> Builder<'static> {
        let node =
            |operation| Cache { which: CacheId::NODE, operation, result: CacheResult::ACCESS };
        match self {
            Self::Instructions => Builder::new(Hardware::INSTRUCTIONS),
            Self::Cycles => Builder::new(Hardware::CPU_CYCLES),
            Self::CacheReferences => Builder::new(Hardware::CACHE_REFERENCES),
            Self::CacheMisses => Builder::new(Hardware::CACHE_MISSES),
            Self::NodeReads => Builder::new(node(CacheOp::READ)),
            Self::NodeWrites => Builder::new(node(CacheOp::WRITE)),
            Self::TaskClock => Builder::new(Software::TASK_CLOCK),
        }
    }
}

/// Why an event could not be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The kernel has no such event here (ENOENT, ENODEV, EOPNOTSUPP, EINVAL): no PMU, or the
    /// PMU does not map the generic event.
    NoSuchEvent(String),
    /// Not allowed (EACCES, EPERM): `perf_event_paranoid` and the agent's privileges.
    Denied(String),
    /// The thread is gone (ESRCH).
    NoSuchThread,
    /// Anything else.
    Other(String),
}

impl Refusal {
    /// Classifies an error of `perf_event_open`.
    pub fn of(e: &io::Error) -> Self {
        let errno = e.raw_os_error().unwrap_or(0);
        let name = match errno {
            libc::ENOENT => "ENOENT",
            libc::ENODEV => "ENODEV",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EINVAL => "EINVAL",
            libc::EACCES => "EACCES",
            libc::EPERM => "EPERM",
            _ => "",
        };
        match errno {
            libc::ENOENT | libc::ENODEV | libc::EOPNOTSUPP | libc::EINVAL => {
                Self::NoSuchEvent(name.to_owned())
            }
            libc::EACCES | libc::EPERM => Self::Denied(name.to_owned()),
            libc::ESRCH => Self::NoSuchThread,
            _ => Self::Other(e.to_string()),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchEvent(errno) => {
                write!(f, "not supported here ({errno}: no hardware PMU, or it has no such event)")
            }
            Self::Denied(errno) => write!(
                f,
                "not allowed ({errno}: run as root or with CAP_PERFMON, or lower \
                 /proc/sys/kernel/perf_event_paranoid)"
            ),
            Self::NoSuchThread => write!(f, "the thread is gone"),
            Self::Other(e) => write!(f, "{e}"),
        }
    }
}

/// What this kernel lets the agent count, found once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerfSupport {
    /// Counting includes kernel mode (guest kernel on KVM).
    pub include_kernel: bool,
    results: Vec<(PerfEvent, Result<(), Refusal>)>,
}

fn open(event: PerfEvent, tid: u32, include_kernel: bool) -> io::Result<perf_event::Counter> {
    let tid = libc::pid_t::try_from(tid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    let mut b = event.builder();
    b.observe_pid(tid).any_cpu().exclude_kernel(!include_kernel).enabled(true);
    b.build()
}

impl PerfSupport {
    /// Opens every hardware event on the calling thread to see which this host allows, and
    /// warns once about those it does not.
    pub fn probe() -> Self {
        let tid = u32::try_from(nix::unistd::gettid().as_raw()).unwrap_or(0);
        let mut include_kernel = true;
        let mut results = Vec::new();
        for event in PerfEvent::HARDWARE {
            let mut r = open(event, tid, include_kernel);
            if let Err(e) = &r
                && include_kernel
                && matches!(Refusal::of(e), Refusal::Denied(_))
            {
                let user = open(event, tid, false);
                if user.is_ok() {
                    include_kernel = false;
                    r = user;
                }
            }
            results.push((event, r.map(drop).map_err(|e| Refusal::of(&e))));
        }
        let s = Self { include_kernel, results };
        if let Some(failed) = s.describe_failures() {
            tracing::warn!(
                unavailable = ?s.unavailable().iter().collect::<Vec<_>>(),
                "hardware perf events do not open on this host ({failed}); those counters are \
                 reported unavailable and models that need them fall back"
            );
        }
        if !s.include_kernel {
            tracing::warn!(
                "perf counters exclude kernel mode (perf_event_paranoid forbids it for this \
                 user): guest kernel work is not counted"
            );
        }
        s
    }

    /// No hardware counters at all (perf switched off, or tests on fixture trees).
    pub fn disabled() -> Self {
        Self {
            include_kernel: false,
            results: PerfEvent::HARDWARE
                .into_iter()
                .map(|e| (e, Err(Refusal::Other("perf counters are switched off".into()))))
                .collect(),
        }
    }

    /// The events that do not open and why, grouped by reason (`None` when all open).
    pub fn describe_failures(&self) -> Option<String> {
        let mut groups: Vec<(String, Vec<&str>)> = Vec::new();
        for (e, r) in &self.results {
            let Err(why) = r else { continue };
            let why = why.to_string();
            match groups.iter_mut().find(|(w, _)| *w == why) {
                Some((_, names)) => names.push(e.name()),
                None => groups.push((why, vec![e.name()])),
            }
        }
        if groups.is_empty() {
            return None;
        }
        Some(
            groups
                .iter()
                .map(|(why, names)| format!("{}: {why}", names.join(", ")))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }

    /// What was found for each hardware event.
    pub fn results(&self) -> &[(PerfEvent, Result<(), Refusal>)] {
        &self.results
    }

    /// The events that opened.
    pub fn usable(&self) -> Vec<PerfEvent> {
        self.results.iter().filter(|(_, r)| r.is_ok()).map(|(e, _)| *e).collect()
    }

    /// The counters that cannot be measured because an event they need does not open.
    pub fn unavailable(&self) -> CounterSet {
        self.results.iter().filter(|(_, r)| r.is_err()).filter_map(|(e, _)| e.counter()).collect()
    }
}

/// One reading of a thread's counters: running totals, scaled for multiplexing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerfReading {
    values: [Option<u64>; PerfEvent::COUNT],
}

impl PerfReading {
    /// The total of `event`, if it is counted.
    pub const fn get(&self, event: PerfEvent) -> Option<u64> {
        self.values[event.slot()]
    }

    /// What was counted since `earlier` (per event counted in both).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut out = Self::default();
        for (i, slot) in out.values.iter_mut().enumerate() {
            if let (Some(now), Some(then)) = (self.values[i], earlier.values[i]) {
                *slot = Some(now.saturating_sub(then));
            }
        }
        out
    }

    /// Adds another reading's values (per event counted in both; an event missing from either
    /// is missing from the sum).
    pub fn plus(&self, other: &Self) -> Self {
        let mut out = Self::default();
        for (i, slot) in out.values.iter_mut().enumerate() {
            if let (Some(a), Some(b)) = (self.values[i], other.values[i]) {
                *slot = Some(a.saturating_add(b));
            }
        }
        out
    }
}

/// Scales a multiplexed count to the whole time enabled.
fn scaled(count: u64, enabled: u64, running: u64) -> u64 {
    if running == 0 || running >= enabled {
        return count;
    }
    let v = u128::from(count) * u128::from(enabled) / u128::from(running);
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The counters open on one thread.
#[derive(Debug)]
pub struct ThreadCounters {
    tid: u32,
    counters: Vec<(PerfEvent, perf_event::Counter)>,
}

impl ThreadCounters {
    /// Opens and starts `events` on thread `tid`; returns the counters that opened and why the
    /// others did not.
    pub fn open(
        tid: u32,
        events: &[PerfEvent],
        include_kernel: bool,
    ) -> (Self, Vec<(PerfEvent, Refusal)>) {
        let mut counters = Vec::new();
        let mut failed = Vec::new();
        for &event in events {
            match open(event, tid, include_kernel) {
                Ok(c) => counters.push((event, c)),
                Err(e) => failed.push((event, Refusal::of(&e))),
            }
        }
        (Self { tid, counters }, failed)
    }

    /// The thread.
    pub const fn tid(&self) -> u32 {
        self.tid
    }

    /// The events open.
    pub fn events(&self) -> impl Iterator<Item = PerfEvent> + '_ {
        self.counters.iter().map(|(e, _)| *e)
    }

    /// Reads every counter (about 200 ns each).
    pub fn read(&mut self) -> io::Result<PerfReading> {
        let mut r = PerfReading::default();
        for (event, c) in &mut self.counters {
            let cat = c.read_count_and_time()?;
            r.values[event.slot()] = Some(scaled(cat.count, cat.time_enabled, cat.time_running));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
            mpsc,
        },
        time::Duration,
    };

    use proptest::prelude::*;

    use super::*;

    /// A thread of this test process that spins until told to stop.
    fn spinner() -> (u32, Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let s = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            tx.send(u32::try_from(nix::unistd::gettid().as_raw()).unwrap()).unwrap();
            let mut x = 0u64;
            while !s.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
            }
            x
        });
        (rx.recv().unwrap(), stop, handle)
    }

    #[test]
    fn hardware_counters_that_do_not_open_are_reported_not_fatal() {
        let support = PerfSupport::probe();
        let (tid, stop, handle) = spinner();
        let (mut counters, failed) =
            ThreadCounters::open(tid, &PerfEvent::HARDWARE, support.include_kernel);
        std::thread::sleep(Duration::from_millis(20));
        let reading = counters.read().unwrap();
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        assert_eq!(counters.tid(), tid);
        assert_eq!(counters.events().count() + failed.len(), PerfEvent::HARDWARE.len());
        for (event, why) in &failed {
            assert!(reading.get(*event).is_none());
            assert!(
                support.unavailable().contains(event.counter().unwrap()),
                "{} failed on the thread ({why}) but not in the probe",
                event.name()
            );
        }
        if counters.events().count() > 0
            || std::path::Path::new("/sys/bus/event_source/devices/cpu").exists()
        {
            return; // a host with a PMU: what it lacks was checked above
        }
        // No PMU (this VM): every hardware event is refused at open, cleanly.
        assert_eq!(failed.len(), PerfEvent::HARDWARE.len(), "{failed:?}");
        assert!(failed.iter().all(|(_, r)| matches!(r, Refusal::NoSuchEvent(_))), "{failed:?}");
        for c in [Counter::Instructions, Counter::Cycles, Counter::L2Misses, Counter::L3Misses] {
            assert!(support.unavailable().contains(c));
        }
        assert!(support.usable().is_empty());
    }

    #[test]
    fn software_task_clock_counts_another_thread() {
        let (tid, stop, handle) = spinner();
        let (mut counters, failed) = ThreadCounters::open(tid, &[PerfEvent::TaskClock], false);
        assert!(failed.is_empty(), "{failed:?}");
        let first = counters.read().unwrap();
        // However busy the machine, the spinner gets 5 ms of CPU eventually; the deadline only
        // stops a hang (a counter that never moves).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let ran = loop {
            std::thread::sleep(Duration::from_millis(10));
            let ran = counters.read().unwrap().since(&first).get(PerfEvent::TaskClock).unwrap();
            if ran > 5_000_000 || std::time::Instant::now() > deadline {
                break ran;
            }
        };
        stop.store(true, Ordering::Relaxed);
        handle.join().unwrap();
        assert!(ran > 5_000_000, "the spinning thread's task clock stayed at {ran} ns");
    }

    #[test]
    fn a_gone_thread_is_named_so() {
        let (_, failed) = ThreadCounters::open(5_000_000, &[PerfEvent::TaskClock], false);
        assert_eq!(failed, vec![(PerfEvent::TaskClock, Refusal::NoSuchThread)]);
        let disabled = PerfSupport::disabled();
        assert!(disabled.usable().is_empty());
        assert!(disabled.unavailable().contains(Counter::MemoryAccesses));
    }

    proptest! {
        #[test]
        fn scaling_never_shrinks_nor_panics(count in any::<u64>(), enabled in any::<u64>(), running in any::<u64>()) {
            prop_assert!(scaled(count, enabled, running) >= count);
        }

        #[test]
        fn deltas_of_readings(a in any::<u64>(), b in any::<u64>()) {
            let mut x = PerfReading::default();
            let mut y = PerfReading::default();
            x.values[0] = Some(a);
            y.values[0] = Some(b);
            prop_assert_eq!(y.since(&x).get(PerfEvent::Instructions), Some(b.saturating_sub(a)));
            prop_assert_eq!(y.since(&x).get(PerfEvent::Cycles), None);
            prop_assert_eq!(x.plus(&y).get(PerfEvent::Instructions), Some(a.saturating_add(b)));
        }
    }
}
