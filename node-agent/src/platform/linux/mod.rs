//! The real Linux KVM host as a [`HostPlatform`]: the same narrow interface the simulated host
//! implements, so the agent, the arbiter and every governor run unchanged on a real machine.
//!
//! Everything is read from files under two configurable roots (`proc_root`, `sys_root`), so the
//! whole backend runs in tests against fixture trees; only the syscalls (perf, uclamp,
//! affinity) reach the real kernel. Each source of truth has its module: [`procfs`] (VMs,
//! vCPU threads, disk, network, CPU time, placement), [`perf`] (hardware counters),
//! [`cpufreq`] (per-core P-states), [`rapl`] (package energy), [`uclamp`] (per-VM P-states).
//!
//! The host is probed once, at construction: what is missing is logged once, marked in
//! [`HostInfo`] (counters in `unavailable`, `per_vm_frequency`, `energy_meter`) and listed by
//! [`LinuxPlatform::limits`], and the backend keeps going with what works. It can always
//! observe if `/proc` is readable; it can act only where [`LinuxPlatform::cannot_act`] is
//! `None` (`vmgov-agent run` refuses to start otherwise unless `--dry-run`).
//!
//! Choices that shape what the agent sees:
//! - VMs are found by a scan of the proc root at most every `rescan` (0.5 s by default) and on
//!   the first call; between scans the known VMs are sampled. A VM's id is keyed by its pid and
//!   start time and never reused while the agent runs, so a restarted QEMU is a new VM.
//! - Every counter is a delta since the previous `sample()`; the first sample of a VM (and of
//!   the host) is zeros, never running totals.
//! - A core's busy fraction is 1 − (idle + iowait) share of its `/proc/stat` ticks over the
//!   slice: all work on the core, not only vCPUs (host threads cost the same power).
//! - Placement: each vCPU is placed, for its busy fraction of the slice, on the CPU it last ran
//!   on (`stat` field 39): exact for pinned vCPUs, an approximation for vCPUs that migrate
//!   within a slice.
//! - Per-core P-states through cpufreq; per-VM P-states through uclamp, which needs schedutil,
//!   so with uclamp cores are capped under schedutil rather than set by the userspace governor.
//! - Without cpufreq (a VM, or no driver) the P-state table has one entry, the nominal clock
//!   from `/proc/cpuinfo`: the agent observes and has nothing to choose.

pub mod cpufreq;
#[cfg(test)]
pub(crate) mod fixture;
pub mod perf;
pub mod procfs;
pub mod rapl;
#[cfg(test)]
mod tests;
pub mod uclamp;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use nix::{
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    unistd::Pid,
};
use thiserror::Error;
use vmgov_proto::{Counter, CounterSet, PState, PStateTable, RawCounters};

use self::{
    cpufreq::{Cpufreq, CpufreqError, Mode},
    perf::{PerfEvent, PerfReading, PerfSupport, ThreadCounters},
    procfs::{CpuTimes, IoCounters, NetDevCounters, ProcError, ProcFs, QemuCmdline, Schedstat},
    rapl::Rapl,
};
use crate::{
    config::LinuxConfig,
    platform::{
        CoreSample, FrequencyControl, HostInfo, HostPlatform, HostSample, PlatformError,
        VcpuPlacement, VmIndex, VmInfo, VmSample,
    },
};

/// How the backend runs; the defaults are for production.
#[derive(Debug, Clone)]
pub struct LinuxOptions {
    /// How often to look for VMs that appeared or went and for added vCPU threads.
    pub rescan: Duration,
    /// Open perf counters on vCPU threads (false: report them unavailable without trying).
    pub perf: bool,
    /// Try utilisation clamps for per-VM P-states (false: report them unavailable).
    pub uclamp: bool,
}

impl Default for LinuxOptions {
    fn default() -> Self {
        Self { rescan: Duration::from_millis(500), perf: true, uclamp: true }
    }
}

/// Why the Linux backend cannot run at all.
#[derive(Debug, Error)]
pub enum LinuxError {
    /// The proc filesystem could not be read: nothing can be observed.
    #[error("cannot observe this host")]
    Proc(#[from] ProcError),
    /// Without cpufreq, the nominal clock of `/proc/cpuinfo` makes no P-state table.
    #[error("the nominal clock {hz} Hz makes no P-state table")]
    Nominal {
        /// The clock.
        hz: f64,
        /// Why.
        #[source]
        source: vmgov_proto::pstate::PStateError,
    },
}

/// A vCPU thread and what was last read from it.
#[derive(Debug)]
struct Vcpu {
    vcpu: u32,
    tid: u32,
    sched: Option<Schedstat>,
    perf: Option<ThreadCounters>,
    perf_last: Option<PerfReading>,
    /// Counters this thread's perf events could not measure.
    perf_missing: CounterSet,
}

/// A VM and what was last read from it.
#[derive(Debug)]
struct Vm {
    info: VmInfo,
    pid: u32,
    taps: Vec<String>,
    /// A tap the command line does not name and fdinfo did not either.
    taps_unresolved: bool,
    vcpus: Vec<Vcpu>,
    smp: Option<u32>,
    io: Option<IoCounters>,
    net: Option<NetDevCounters>,
    pstate: Option<usize>,
    affinity: Option<u64>,
    warned: CounterSet,
}

/// The real host.
#[derive(Debug)]
pub struct LinuxPlatform {
    proc: ProcFs,
    options: LinuxOptions,
    hardware_class: String,
    cores: usize,
    table: PStateTable,
    cpufreq: Result<Cpufreq, String>,
    /// Why core P-states cannot be set (static for `PlatformError::Unsupported`).
    core_refusal: Option<&'static str>,
    /// The same, with the path and cause, for people.
    core_refusal_detail: Option<String>,
    /// Why per-VM P-states cannot be set.
    vm_refusal: Option<&'static str>,
    /// Why utilisation clamps are unavailable.
    uclamp_error: Option<String>,
    cpufreq_prepared: bool,
    rapl: Result<Rapl, String>,
    perf: PerfSupport,
    host_unavailable: CounterSet,
    ids: BTreeMap<(u32, u64), VmIndex>,
    next_id: VmIndex,
    vms: BTreeMap<VmIndex, Vm>,
    scanned: Option<Instant>,
    created: Instant,
    last: Option<Instant>,
    cpu_last: Vec<Option<CpuTimes>>,
    sample: HostSample,
    clamped: BTreeSet<u32>,
    affinity_originals: BTreeMap<u32, CpuSet>,
}

fn proc_error(e: &ProcError) -> PlatformError {
    let what = e.to_string();
    match e {
        ProcError::Read { source, .. } => {
            PlatformError::io(what, std::io::Error::new(source.kind(), source.to_string()))
        }
        ProcError::Parse { source, .. } => PlatformError::io(
            what,
            std::io::Error::new(std::io::ErrorKind::InvalidData, source.problem.clone()),
        ),
    }
}

/// An error and its causes on one line, for reasons shown to people.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Warns once per VM and counter that the counter cannot be read.
fn warn(warned: &mut CounterSet, counter: Counter, vm: &str, e: &ProcError) {
    if !warned.contains(counter) {
        warned.insert(counter);
        tracing::warn!(vm = %vm, error = %e, "{counter:?} is unavailable for this VM");
    }
}

fn full_mask(cores: usize) -> u64 {
    if cores >= 64 { u64::MAX } else { (1u64 << cores) - 1 }
}

impl LinuxPlatform {
    /// Probes the host under the configured roots with the production options.
    pub fn new(config: &LinuxConfig) -> Result<Self, LinuxError> {
        Self::with_options(config, LinuxOptions::default())
    }

    /// Probes the host: CPUs, cpufreq, RAPL, perf and uclamp support. Fails only when `/proc`
    /// cannot be read; everything else missing is reported and worked around.
    pub fn with_options(config: &LinuxConfig, options: LinuxOptions) -> Result<Self, LinuxError> {
        let proc = ProcFs::new(&config.proc_root);
        let sys = config.sys_root.as_path();
        let cpu_times = proc.cpu_times()?;
        let cores = cpu_times.iter().map(|(c, _)| *c as usize + 1).max().unwrap_or(1);
        let cpuinfo = match proc.cpuinfo() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "no /proc/cpuinfo: the hardware class and nominal clock are unknown");
                procfs::CpuInfo::default()
            }
        };
        let hardware_class = config.hardware_class.clone().unwrap_or_else(|| {
            cpuinfo
                .model_name
                .as_deref()
                .map_or_else(|| "unknown-cpu".into(), procfs::class_from_model)
        });
        let uclamp: Result<(), String> = if options.uclamp {
            uclamp::probe().map_err(|e| error_chain(&e))
        } else {
            Err("utilisation clamps are switched off".into())
        };
        let cpufreq = Cpufreq::open(sys, cores, uclamp.is_ok())
            .map_err(|e| (matches!(e, CpufreqError::Absent { .. }), error_chain(&e)));
        let (core_refusal, core_refusal_detail) = match &cpufreq {
            Err((true, detail)) => (
                Some("no cpufreq sysfs on this host: core frequencies cannot be set"),
                Some(detail.clone()),
            ),
            Err((false, detail)) => (
                Some("the cpufreq sysfs of this host is unusable (see the start-up log)"),
                Some(detail.clone()),
            ),
            Ok(c) => match c.check_writable() {
                Ok(()) => (None, None),
                Err(PlatformError::Unsupported(why)) => (Some(why), Some(why.to_owned())),
                Err(e) => (
                    Some("the cpufreq files of this host cannot be written (run as root)"),
                    Some(format!("{} (run the agent as root)", error_chain(&e))),
                ),
            },
        };
        let cpufreq = cpufreq.map_err(|(_, detail)| detail);
        let table = match &cpufreq {
            Ok(c) => c.table().clone(),
            Err(_) => {
                // The nominal clock, to the kHz; 1 GHz when /proc/cpuinfo has none.
                let hz = cpuinfo.mhz.map_or(1e9, |m| (m * 1e3).round() * 1e3);
                PStateTable::new(vec![PState::new(hz)])
                    .map_err(|source| LinuxError::Nominal { hz, source })?
            }
        };
        let schedutil_caps =
            matches!(cpufreq.as_ref().map(Cpufreq::mode), Ok(Mode::Capping { governor: Some(_) }));
        let vm_refusal = match (&uclamp, core_refusal) {
            (Err(_), _) => Some(
                "utilisation clamps (uclamp) are not available on this host: per-VM frequencies \
                 cannot be set",
            ),
            (Ok(()), Some(why)) => Some(why),
            (Ok(()), None) if !schedutil_caps => Some(
                "per-VM frequencies need the schedutil governor, which this host's cpufreq does \
                 not offer",
            ),
            (Ok(()), None) => None,
        };
        let rapl = Rapl::open(sys).map_err(|e| error_chain(&e));
        let perf = if options.perf { PerfSupport::probe() } else { PerfSupport::disabled() };
        let mut host_unavailable = perf.unavailable();
        if rapl.is_err() {
            host_unavailable.insert(Counter::Energy);
        }
        let platform = Self {
            cpu_last: vec![None; cores],
            proc,
            options,
            hardware_class,
            cores,
            table,
            cpufreq,
            core_refusal,
            core_refusal_detail,
            vm_refusal,
            uclamp_error: uclamp.err(),
            cpufreq_prepared: false,
            rapl,
            perf,
            host_unavailable,
            ids: BTreeMap::new(),
            next_id: 0,
            vms: BTreeMap::new(),
            scanned: None,
            created: Instant::now(),
            last: None,
            sample: HostSample::default(),
            clamped: BTreeSet::new(),
            affinity_originals: BTreeMap::new(),
        };
        for limit in platform.host_limits() {
            tracing::warn!("{limit}");
        }
        Ok(platform)
    }

    /// Why the agent cannot set frequencies on this host, or `None` when it can.
    pub fn cannot_act(&self) -> Option<String> {
        let why = self.core_refusal?;
        Some(format!(
            "core frequencies cannot be set: {}",
            self.core_refusal_detail.as_deref().unwrap_or(why)
        ))
    }

    /// Everything this host does not allow, in plain words (empty on a fully capable host).
    pub fn limits(&self) -> Vec<String> {
        let mut out = self.host_limits();
        if let Some(failed) = self.perf.describe_failures() {
            out.push(format!("hardware counters: {failed}"));
        }
        out
    }

    /// [`Self::limits`] but the hardware counters (which the perf probe reports itself).
    fn host_limits(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(why) = self.cannot_act() {
            out.push(why);
        }
        if let Some(e) = &self.uclamp_error {
            out.push(format!("per-VM frequencies: {e}"));
        } else if let Some(why) = self.vm_refusal
            && self.core_refusal.is_none()
        {
            out.push(format!("per-VM frequencies: {why}"));
        }
        if let Err(e) = &self.rapl {
            out.push(format!("package energy: {e}"));
        }
        out
    }

    /// The hardware perf events this host allows.
    pub const fn perf_support(&self) -> &PerfSupport {
        &self.perf
    }

    fn rescan_due(&self, now: Instant) -> bool {
        self.scanned.is_none_or(|t| now.duration_since(t) >= self.options.rescan)
    }

    /// Looks for VMs that appeared or went, and refreshes every VM's vCPU threads and taps.
    fn rescan(&mut self, now: Instant) -> Result<(), PlatformError> {
        self.scanned = Some(now);
        let pids = self.proc.pids().map_err(|e| proc_error(&e))?;
        let mut seen = BTreeSet::new();
        for pid in pids {
            let q = match self.proc.qemu(pid) {
                Ok(Some(q)) => q,
                Ok(None) => continue,
                Err(e) if e.is_gone() => continue,
                Err(e) => {
                    tracing::debug!(pid, error = %e, "skipping a process that could not be read");
                    continue;
                }
            };
            let key = (q.pid, q.start_time);
            let id = match self.ids.get(&key) {
                Some(&id) => id,
                None => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.ids.insert(key, id);
                    id
                }
            };
            seen.insert(id);
            if !self.vms.contains_key(&id) {
                let vm = self.new_vm(id, q.pid, &q.cmdline);
                self.vms.insert(id, vm);
            }
            self.refresh_vm(id);
        }
        let gone: Vec<VmIndex> = self.vms.keys().copied().filter(|id| !seen.contains(id)).collect();
        for id in gone {
            self.forget(id);
        }
        Ok(())
    }

    fn new_vm(&self, id: VmIndex, pid: u32, cmd: &QemuCmdline) -> Vm {
        let name = cmd.name.clone().unwrap_or_else(|| format!("qemu-{pid}"));
        let uuid = cmd.uuid.clone().unwrap_or_else(|| procfs::uuid_from_name(&name));
        tracing::debug!(vm = %name, %uuid, pid, "QEMU process found");
        Vm {
            info: VmInfo {
                id,
                name,
                uuid,
                vcpus: cmd.smp.unwrap_or(1).max(1),
                affinity: full_mask(self.cores),
            },
            pid,
            taps: cmd.taps.clone(),
            taps_unresolved: cmd.unnamed_taps,
            vcpus: Vec::new(),
            smp: cmd.smp,
            io: None,
            net: None,
            pstate: None,
            affinity: None,
            warned: CounterSet::EMPTY,
        }
    }

    /// Re-reads a VM's vCPU threads (vCPU hotplug) and the taps it holds.
    fn refresh_vm(&mut self, id: VmIndex) {
        let Some(vm) = self.vms.get(&id) else { return };
        let pid = vm.pid;
        let threads = match self.proc.vcpu_threads(pid) {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!(pid, error = %e, "could not list vCPU threads");
                return;
            }
        };
        let fd_taps = self.proc.tap_fds(pid).ok();
        let (events, include_kernel) = (self.perf.usable(), self.perf.include_kernel);
        let host_perf_missing = self.perf.unavailable();
        let cores = self.cores;
        let Some(vm) = self.vms.get_mut(&id) else { return };
        if let Some(fd_taps) = fd_taps {
            let named = fd_taps.iter().any(|t| !vm.taps.contains(t));
            for t in fd_taps {
                if !vm.taps.contains(&t) {
                    vm.taps.push(t);
                }
            }
            if named {
                vm.taps_unresolved = false;
            }
        }
        let mut fresh = Vec::new();
        let mut added = Vec::new();
        for t in &threads {
            if let Some(pos) = vm.vcpus.iter().position(|v| v.tid == t.tid) {
                fresh.push(vm.vcpus.swap_remove(pos));
                continue;
            }
            let (perf, perf_missing) = if events.is_empty() {
                (None, host_perf_missing)
            } else {
                let (c, failed) = ThreadCounters::open(t.tid, &events, include_kernel);
                let mut missing = host_perf_missing;
                for (e, why) in failed {
                    tracing::debug!(vm = %vm.info.name, tid = t.tid, event = e.name(), %why, "perf event did not open");
                    if let Some(c) = e.counter() {
                        missing.insert(c);
                    }
                }
                (Some(c), missing)
            };
            added.push(t.tid);
            fresh.push(Vcpu {
                vcpu: t.vcpu,
                tid: t.tid,
                sched: None,
                perf,
                perf_last: None,
                perf_missing,
            });
        }
        fresh.sort_by_key(|v| (v.vcpu, v.tid));
        vm.vcpus = fresh;
        if vm.vcpus.is_empty() {
            if !vm.warned.contains(Counter::CpuTime) {
                vm.warned.insert(Counter::CpuTime);
                tracing::warn!(
                    vm = %vm.info.name, pid,
                    "no vCPU threads named `CPU N/KVM` or `CPU N/TCG`: start QEMU with \
                     `-name ...,debug-threads=on` (libvirt does); this VM's CPU time and \
                     hardware counters are unavailable"
                );
            }
            vm.info.vcpus = vm.smp.unwrap_or(1).max(1);
        } else {
            vm.info.vcpus = u32::try_from(vm.vcpus.len()).unwrap_or(u32::MAX);
        }
        let first_tid = vm.vcpus.first().map_or(pid, |v| v.tid);
        vm.info.affinity = match self.proc.cpus_allowed(pid, first_tid) {
            Ok(mask) if mask & full_mask(cores) != 0 => mask & full_mask(cores),
            _ => full_mask(cores),
        };
        // New vCPU threads inherit the VM's clamp and affinity.
        let (pstate, affinity) = (vm.pstate, vm.affinity);
        for tid in added {
            if let Some(p) = pstate
                && let Err(e) = self.clamp_thread(tid, Some(p))
            {
                tracing::warn!(tid, error = %e, "could not clamp a new vCPU thread");
            }
            if let Some(mask) = affinity
                && let Err(e) = self.pin_thread(tid, mask)
            {
                tracing::warn!(tid, error = %e, "could not pin a new vCPU thread");
            }
        }
    }

    fn forget(&mut self, id: VmIndex) {
        if let Some(vm) = self.vms.remove(&id) {
            tracing::debug!(vm = %vm.info.name, "QEMU process gone");
            for v in &vm.vcpus {
                self.clamped.remove(&v.tid);
                self.affinity_originals.remove(&v.tid);
            }
        }
        self.ids.retain(|_, v| *v != id);
    }

    fn clamp_thread(&mut self, tid: u32, pstate: Option<usize>) -> Result<(), PlatformError> {
        let r = match pstate.and_then(|p| self.table.frequency_hz(p)) {
            Some(f) => {
                let u = uclamp::util_for(f, self.table.max_frequency_hz());
                uclamp::set(tid, u, u)
            }
            None => uclamp::clear(tid),
        };
        match r {
            Ok(()) => {
                if pstate.is_some() {
                    self.clamped.insert(tid);
                } else {
                    self.clamped.remove(&tid);
                }
                Ok(())
            }
            Err(uclamp::UclampError::Thread { source, .. })
                if source.raw_os_error() == Some(libc::ESRCH) =>
            {
                self.clamped.remove(&tid);
                Ok(())
            }
            Err(e) => Err(PlatformError::io(
                format!("clamping the utilisation of thread {tid}"),
                std::io::Error::other(e.to_string()),
            )),
        }
    }

    fn pin_thread(&mut self, tid: u32, mask: u64) -> Result<(), PlatformError> {
        let pid = Pid::from_raw(i32::try_from(tid).unwrap_or(i32::MAX));
        let mut set = CpuSet::new();
        for core in (0..self.cores.min(64)).filter(|c| mask & (1 << c) != 0) {
            set.set(core)
                .map_err(|e| PlatformError::io(format!("core {core} in a CPU set"), e.into()))?;
        }
        if let std::collections::btree_map::Entry::Vacant(slot) = self.affinity_originals.entry(tid)
        {
            match sched_getaffinity(pid) {
                Ok(original) => {
                    slot.insert(original);
                }
                Err(nix::errno::Errno::ESRCH) => return Ok(()),
                Err(e) => {
                    return Err(PlatformError::io(
                        format!("reading the affinity of thread {tid}"),
                        e.into(),
                    ));
                }
            }
        }
        match sched_setaffinity(pid, &set) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(PlatformError::io(
                format!("setting the affinity of thread {tid} to {mask:#x}"),
                e.into(),
            )),
        }
    }

    /// Per-core busy fractions since the previous call.
    fn core_busy(&mut self) -> Result<Vec<f64>, PlatformError> {
        let times = self.proc.cpu_times().map_err(|e| proc_error(&e))?;
        let mut busy = vec![0.0; self.cores];
        for (cpu, now) in times {
            let cpu = cpu as usize;
            let Some(slot) = self.cpu_last.get_mut(cpu) else { continue };
            if let Some(before) = *slot {
                let total = now.total.saturating_sub(before.total);
                let idle = now.idle.saturating_sub(before.idle).min(total);
                if total > 0 {
                    busy[cpu] = 1.0 - idle as f64 / total as f64;
                }
            }
            *slot = Some(now);
        }
        Ok(busy)
    }

    /// One VM's slice, or `None` when its process has gone.
    fn sample_vm(
        proc: &ProcFs,
        vm: &mut Vm,
        timeslice_s: f64,
        host_unavailable: CounterSet,
        placement: &mut Vec<VcpuPlacement>,
    ) -> Option<(VmSample, bool)> {
        let mut c = RawCounters {
            timeslice_seconds: timeslice_s,
            vcpus: vm.info.vcpus,
            unavailable: host_unavailable,
            ..RawCounters::default()
        };
        // Disk, from the QEMU process.
        match proc.io(vm.pid) {
            Ok(now) => {
                if let Some(before) = vm.io {
                    c.disk_reads = now.syscr.saturating_sub(before.syscr);
                    c.disk_writes = now.syscw.saturating_sub(before.syscw);
                    c.disk_read_bytes = now.read_bytes.saturating_sub(before.read_bytes);
                    c.disk_write_bytes = now.write_bytes.saturating_sub(before.write_bytes);
                }
                vm.io = Some(now);
            }
            Err(e) if e.is_gone() => return None,
            Err(e) => {
                c.unavailable.insert(Counter::Disk);
                warn(&mut vm.warned, Counter::Disk, &vm.info.name, &e);
            }
        }
        // Network, from the taps in QEMU's namespace; directions are the host's.
        if vm.taps_unresolved {
            c.unavailable.insert(Counter::Network);
        } else if !vm.taps.is_empty() {
            match proc.net_dev(vm.pid) {
                Ok(devs) if vm.taps.iter().all(|t| devs.contains_key(t)) => {
                    let now = vm
                        .taps
                        .iter()
                        .filter_map(|t| devs.get(t))
                        .fold(NetDevCounters::default(), |a, &d| a.plus(d));
                    if let Some(before) = vm.net {
                        // The tap transmits what the guest receives, and receives what it sends.
                        c.packets_rx = now.tx_packets.saturating_sub(before.tx_packets);
                        c.bytes_rx = now.tx_bytes.saturating_sub(before.tx_bytes);
                        c.packets_tx = now.rx_packets.saturating_sub(before.rx_packets);
                        c.bytes_tx = now.rx_bytes.saturating_sub(before.rx_bytes);
                    }
                    vm.net = Some(now);
                }
                Ok(_) => {
                    c.unavailable.insert(Counter::Network);
                    vm.net = None;
                }
                Err(e) if e.is_gone() => return None,
                Err(e) => {
                    c.unavailable.insert(Counter::Network);
                    warn(&mut vm.warned, Counter::Network, &vm.info.name, &e);
                }
            }
        }
        // vCPU threads: run time, placement, hardware counters.
        let slice_ns = timeslice_s * 1e9;
        let (mut busy_sum, mut busy_max) = (0.0f64, 0.0f64);
        let mut threads_gone = false;
        let mut perf_total: Option<PerfReading> = None;
        if vm.vcpus.is_empty() {
            c.unavailable.insert(Counter::CpuTime);
            for e in PerfEvent::HARDWARE {
                if let Some(counter) = e.counter() {
                    c.unavailable.insert(counter);
                }
            }
        }
        for v in &mut vm.vcpus {
            let ran = match proc.schedstat(vm.pid, v.tid) {
                Ok(now) => {
                    let d = v.sched.map_or(0, |b| now.run_ns.saturating_sub(b.run_ns));
                    v.sched = Some(now);
                    d
                }
                Err(e) if e.is_gone() => {
                    threads_gone = true;
                    continue;
                }
                Err(e) => {
                    c.unavailable.insert(Counter::CpuTime);
                    warn(&mut vm.warned, Counter::CpuTime, &vm.info.name, &e);
                    0
                }
            };
            c.cpu_time_ns = c.cpu_time_ns.saturating_add(ran);
            let busy = if slice_ns > 0.0 { (ran as f64 / slice_ns).clamp(0.0, 1.0) } else { 0.0 };
            busy_sum += busy;
            busy_max = busy_max.max(busy);
            if busy > 0.0
                && let Ok(stat) = proc.task_stat(vm.pid, v.tid)
            {
                placement.push(VcpuPlacement {
                    vm: vm.info.id,
                    vcpu: v.vcpu as usize,
                    core: stat.processor as usize,
                    share: busy,
                });
            }
            c.unavailable = c.unavailable.iter().chain(v.perf_missing.iter()).collect();
            if let Some(counters) = v.perf.as_mut() {
                match counters.read() {
                    Ok(now) => {
                        let delta = v
                            .perf_last
                            .map_or_else(|| now.since(&now), |before| now.since(&before));
                        v.perf_last = Some(now);
                        perf_total = Some(perf_total.map_or(delta, |t| t.plus(&delta)));
                    }
                    Err(e) => {
                        tracing::debug!(tid = v.tid, error = %e, "reading perf counters failed");
                        for ev in counters.events() {
                            if let Some(counter) = ev.counter() {
                                c.unavailable.insert(counter);
                            }
                        }
                    }
                }
            }
        }
        if let Some(p) = perf_total {
            c.instructions = p.get(PerfEvent::Instructions).unwrap_or(0);
            c.cycles = p.get(PerfEvent::Cycles).unwrap_or(0);
            c.l2_misses = p.get(PerfEvent::CacheReferences).unwrap_or(0);
            c.l3_misses = p.get(PerfEvent::CacheMisses).unwrap_or(0);
            c.memory_accesses = p
                .get(PerfEvent::NodeReads)
                .unwrap_or(0)
                .saturating_add(p.get(PerfEvent::NodeWrites).unwrap_or(0));
        }
        // Fields of unavailable counters hold 0.
        for counter in c.unavailable.iter() {
            match counter {
                Counter::Instructions => c.instructions = 0,
                Counter::Cycles => c.cycles = 0,
                Counter::L2Misses => c.l2_misses = 0,
                Counter::L3Misses => c.l3_misses = 0,
                Counter::MemoryAccesses => c.memory_accesses = 0,
                Counter::CpuTime => c.cpu_time_ns = 0,
                _ => {}
            }
        }
        let n = vm.vcpus.len().max(1) as f64;
        Some((
            VmSample {
                vm: vm.info.id,
                counters: c,
                busy: busy_sum / n,
                max_vcpu_busy: busy_max,
                finished: false,
            },
            threads_gone,
        ))
    }

    fn check_vm(&self, vm: VmIndex) -> Result<(), PlatformError> {
        if self.vms.contains_key(&vm) { Ok(()) } else { Err(PlatformError::NoSuchVm(vm)) }
    }

    fn check_pstate(&self, pstate: usize) -> Result<(), PlatformError> {
        if pstate < self.table.len() {
            Ok(())
        } else {
            Err(PlatformError::NoSuchPState { pstate, len: self.table.len() })
        }
    }

    /// True when something the agent changed is still to be put back.
    fn dirty(&self) -> bool {
        !self.clamped.is_empty()
            || !self.affinity_originals.is_empty()
            || self.cpufreq.as_ref().is_ok_and(Cpufreq::changed)
    }
}

impl FrequencyControl for LinuxPlatform {
    fn pstates(&self) -> &PStateTable {
        &self.table
    }

    fn core_count(&self) -> usize {
        self.cores
    }

    fn core_pstate(&self, core: usize) -> Result<usize, PlatformError> {
        if core >= self.cores {
            return Err(PlatformError::NoSuchCore { core, cores: self.cores });
        }
        match &self.cpufreq {
            Ok(c) => c.current(core),
            Err(_) => Ok(self.table.max_index()),
        }
    }

    fn set_core_pstate(&mut self, core: usize, pstate: usize) -> Result<(), PlatformError> {
        if core >= self.cores {
            return Err(PlatformError::NoSuchCore { core, cores: self.cores });
        }
        self.check_pstate(pstate)?;
        if let Some(why) = self.core_refusal {
            return Err(PlatformError::Unsupported(why));
        }
        match &mut self.cpufreq {
            Ok(c) => c.set(core, pstate),
            Err(_) => Err(PlatformError::Unsupported("no cpufreq sysfs on this host")),
        }
    }

    fn set_vm_pstate(&mut self, vm: VmIndex, pstate: Option<usize>) -> Result<(), PlatformError> {
        self.check_vm(vm)?;
        if let Some(p) = pstate {
            self.check_pstate(p)?;
        }
        if let Some(why) = self.vm_refusal {
            // Nothing was ever clamped, so clearing is already done.
            return if pstate.is_none() { Ok(()) } else { Err(PlatformError::Unsupported(why)) };
        }
        if !self.cpufreq_prepared
            && let Ok(c) = &mut self.cpufreq
        {
            c.prepare()?;
            self.cpufreq_prepared = true;
        }
        let tids: Vec<u32> =
            self.vms.get(&vm).map(|v| v.vcpus.iter().map(|t| t.tid).collect()).unwrap_or_default();
        for tid in tids {
            self.clamp_thread(tid, pstate)?;
        }
        if let Some(v) = self.vms.get_mut(&vm) {
            v.pstate = pstate;
        }
        Ok(())
    }
}

impl HostPlatform for LinuxPlatform {
    fn info(&self) -> HostInfo {
        HostInfo {
            platform: "linux",
            hardware_class: self.hardware_class.clone(),
            cores: self.cores,
            pstates: self.table.clone(),
            per_vm_frequency: self.vm_refusal.is_none(),
            energy_meter: self.rapl.is_ok(),
            unavailable: self.host_unavailable,
        }
    }

    fn vms(&mut self) -> Result<Vec<VmInfo>, PlatformError> {
        if self.scanned.is_none() {
            self.rescan(Instant::now())?;
        }
        Ok(self.vms.values().map(|v| v.info.clone()).collect())
    }

    fn sample(&mut self) -> Result<&HostSample, PlatformError> {
        let now = Instant::now();
        let first = self.last.is_none();
        let timeslice_s =
            now.duration_since(self.last.unwrap_or(self.created)).as_secs_f64().max(1e-6);
        self.last = Some(now);
        if self.rescan_due(now) {
            self.rescan(now)?;
        }
        let busy = self.core_busy()?;
        let cores = busy
            .iter()
            .enumerate()
            .map(|(core, &busy)| {
                let pstate = self.core_pstate(core).unwrap_or(0);
                let mean_frequency_hz = self
                    .cpufreq
                    .as_ref()
                    .ok()
                    .and_then(|c| c.cur_freq_hz(core))
                    .or_else(|| self.table.frequency_hz(pstate))
                    .unwrap_or(0.0);
                CoreSample { busy, pstate, mean_frequency_hz }
            })
            .collect();
        let package_energy_j = match &mut self.rapl {
            Ok(r) => match r.joules_since_last() {
                Ok(j) => Some(if first { 0.0 } else { j }),
                Err(e) => {
                    tracing::warn!(error = %e, "reading RAPL failed this slice");
                    None
                }
            },
            Err(_) => None,
        };
        let mut placement = Vec::new();
        let mut vms = Vec::with_capacity(self.vms.len());
        let mut gone = Vec::new();
        let mut threads_changed = false;
        for (id, vm) in &mut self.vms {
            match Self::sample_vm(
                &self.proc,
                vm,
                timeslice_s,
                self.host_unavailable,
                &mut placement,
            ) {
                Some((s, t)) => {
                    threads_changed |= t;
                    vms.push(s);
                }
                None => gone.push(*id),
            }
        }
        for id in gone {
            self.forget(id);
        }
        if threads_changed {
            // A vCPU thread went (unplug, or the VM is stopping): look again next slice.
            self.scanned = None;
        }
        self.sample = HostSample {
            time_s: now.duration_since(self.created).as_secs_f64(),
            timeslice_s,
            cores,
            vms,
            package_energy_j,
            placement,
        };
        Ok(&self.sample)
    }

    fn set_vm_affinity(&mut self, vm: VmIndex, mask: u64) -> Result<(), PlatformError> {
        self.check_vm(vm)?;
        let mask = mask & full_mask(self.cores);
        if mask == 0 {
            return Err(PlatformError::Unsupported(
                "an affinity mask must name at least one core of this host",
            ));
        }
        let tids: Vec<u32> =
            self.vms.get(&vm).map(|v| v.vcpus.iter().map(|t| t.tid).collect()).unwrap_or_default();
        for tid in tids {
            self.pin_thread(tid, mask)?;
        }
        if let Some(v) = self.vms.get_mut(&vm) {
            v.affinity = Some(mask);
            v.info.affinity = mask;
        }
        Ok(())
    }

    fn restore(&mut self) -> Result<(), PlatformError> {
        let mut first: Option<PlatformError> = None;
        if let Ok(c) = &mut self.cpufreq
            && let Err(e) = c.restore()
        {
            first.get_or_insert(e);
        }
        for tid in std::mem::take(&mut self.clamped) {
            match uclamp::clear(tid) {
                Ok(()) => {}
                Err(uclamp::UclampError::Thread { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    first.get_or_insert(PlatformError::io(
                        format!("clearing the utilisation clamps of thread {tid}"),
                        std::io::Error::other(e.to_string()),
                    ));
                }
            }
        }
        for (tid, set) in std::mem::take(&mut self.affinity_originals) {
            let pid = Pid::from_raw(i32::try_from(tid).unwrap_or(i32::MAX));
            match sched_setaffinity(pid, &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    first.get_or_insert(PlatformError::io(
                        format!("putting back the affinity of thread {tid}"),
                        e.into(),
                    ));
                }
            }
        }
        let all = full_mask(self.cores);
        for vm in self.vms.values_mut() {
            vm.pstate = None;
            if vm.affinity.take().is_some() {
                vm.info.affinity = all;
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn lockstep(&self) -> bool {
        false
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Drop for LinuxPlatform {
    fn drop(&mut self) {
        if self.dirty()
            && let Err(e) = self.restore()
        {
            tracing::error!(error = %e, "could not put back what the agent changed on this host");
        }
    }
}
