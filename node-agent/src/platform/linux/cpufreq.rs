//! Per-core frequencies through cpufreq sysfs, the one interface every Linux frequency driver
//! (acpi-cpufreq, intel_pstate in passive mode, amd-pstate, cppc) offers. The agent borrows
//! the host's frequency settings and must hand them back exactly, on `restore()` and on drop,
//! even after a crash of the actor that set them: so every value is read before the first
//! write, only what was changed is written back, and a missing or unwritable file is an error
//! that names it.
//!
//! Two ways to set a core's P-state, chosen from what the driver offers:
//! - the `userspace` governor, writing the frequency to `scaling_setspeed` (exact);
//! - capping, writing `scaling_max_freq` (the governor in place picks at or below it). With
//!   uclamp (see `uclamp.rs`) the agent caps under `schedutil`, since the userspace governor
//!   ignores utilisation and would make per-VM clamps meaningless.
//!
//! Some drivers choose frequencies themselves and ignore explicit ones: intel_pstate in active
//! mode (the driver then reports itself as `intel_pstate`; with HWP the hardware picks within
//! the limits, `energy_performance_preference` being its only hint) and amd-pstate in active
//! (EPP) mode. Those are detected and named, and setting a P-state is refused with the remedy.
//!
//! The P-state table comes from `scaling_available_frequencies` where the driver lists them,
//! else from `cpuinfo_min_freq`..`cpuinfo_max_freq` in at most 16 even steps (rounded to MHz).
//! Voltages are unknown to cpufreq. CPUs are assumed to share one table (cpu0's).

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
};

use thiserror::Error;
use vmgov_proto::{
    PState, PStateTable,
    pstate::{MAX_PSTATES, PStateError},
};

use crate::platform::PlatformError;

/// Why the cpufreq interface could not be used.
#[derive(Debug, Error)]
pub enum CpufreqError {
    /// No cpufreq directory: no frequency-scaling driver (as in most VMs).
    #[error(
        "no cpufreq sysfs: {} does not exist (no frequency-scaling driver is loaded, as in \
         most virtual machines)",
        path.display()
    )]
    Absent {
        /// The directory looked for.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file did not hold what was expected.
    #[error("{}: {problem}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        problem: String,
    },
    /// The frequencies do not make a P-state table.
    #[error("{}: the frequencies do not make a P-state table", path.display())]
    Table {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: PStateError,
    },
}

/// A driver mode that picks frequencies itself, so explicit frequencies are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocker {
    /// intel_pstate in active mode (with or without HWP).
    IntelPstateActive {
        /// Hardware P-states are on.
        hwp: bool,
    },
    /// amd-pstate in active (EPP) mode.
    AmdPstateActive,
}

impl Blocker {
    /// Why explicit frequencies do not work, and the remedy.
    pub const fn reason(self) -> &'static str {
        match self {
            Self::IntelPstateActive { hwp: true } => {
                "intel_pstate is in active mode with HWP: the hardware picks frequencies itself \
                 and ignores explicit ones; switch to passive mode \
                 (echo passive > /sys/devices/system/cpu/intel_pstate/status)"
            }
            Self::IntelPstateActive { hwp: false } => {
                "intel_pstate is in active mode: the driver picks frequencies itself and offers \
                 no userspace governor; switch to passive mode \
                 (echo passive > /sys/devices/system/cpu/intel_pstate/status)"
            }
            Self::AmdPstateActive => {
                "amd-pstate is in active (EPP) mode: the firmware picks frequencies itself; \
                 switch to passive or guided mode \
                 (echo passive > /sys/devices/system/cpu/amd_pstate/status)"
            }
        }
    }
}

/// Whether the driver blocks explicit frequencies. `intel_pstate_status` is the content of
/// `intel_pstate/status`; `hwp` whether HWP files are present.
pub fn blocker(driver: &str, intel_pstate_status: Option<&str>, hwp: bool) -> Option<Blocker> {
    match driver {
        // In passive mode intel_pstate reports itself as `intel_cpufreq`.
        "intel_pstate" if intel_pstate_status != Some("passive") => {
            Some(Blocker::IntelPstateActive { hwp })
        }
        "amd-pstate-epp" => Some(Blocker::AmdPstateActive),
        _ => None,
    }
}

/// How a core's P-state is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Governor `userspace`, frequency written to `scaling_setspeed`.
    Userspace,
    /// `scaling_max_freq` capped; `governor` (when given, else the one in place) picks at or
    /// below it.
    Capping {
        /// The governor to run under the cap.
        governor: Option<String>,
    },
}

/// Picks the mode: capping under schedutil when per-VM clamps are wanted and schedutil is
/// there, else the userspace governor when offered, else capping under the governor in place.
pub fn choose_mode(governors: &[String], want_schedutil: bool) -> Mode {
    let has = |g: &str| governors.iter().any(|x| x == g);
    if want_schedutil && has("schedutil") {
        Mode::Capping { governor: Some("schedutil".into()) }
    } else if has("userspace") {
        Mode::Userspace
    } else {
        Mode::Capping { governor: None }
    }
}

/// The P-state frequencies (kHz, increasing): the driver's list where it gives one, else at
/// most 16 even steps from `min_khz` to `max_khz` rounded to MHz.
pub fn frequencies_khz(
    available: &[u64],
    min_khz: Option<u64>,
    max_khz: Option<u64>,
) -> Result<Vec<u64>, String> {
    let mut list: Vec<u64> = available.iter().copied().filter(|&f| f > 0).collect();
    list.sort_unstable();
    list.dedup();
    if !list.is_empty() {
        if list.len() > MAX_PSTATES {
            let n = list.len();
            list = (0..MAX_PSTATES).map(|i| list[i * (n - 1) / (MAX_PSTATES - 1)]).collect();
            list.dedup();
        }
        return Ok(list);
    }
    match (min_khz, max_khz) {
        (Some(min), Some(max)) if min > 0 && min <= max => {
            let steps = ((max - min) / 100_000 + 1).min(16);
            if steps <= 1 {
                return Ok(vec![max]);
            }
            let mut out: Vec<u64> = (0..steps)
                .map(|i| {
                    let f = min + (max - min) * i / (steps - 1);
                    if i == 0 || i == steps - 1 { f } else { (f + 500) / 1000 * 1000 }
                })
                .collect();
            out.dedup();
            Ok(out)
        }
        _ => {
            Err("no scaling_available_frequencies and no usable cpuinfo_min_freq/cpuinfo_max_freq"
                .into())
        }
    }
}

/// A P-state table from frequencies in kHz.
pub fn table(khz: &[u64]) -> Result<PStateTable, PStateError> {
    PStateTable::new(khz.iter().map(|&k| PState::new(k as f64 * 1e3)).collect())
}

/// The index of the frequency in `khz` nearest `f`.
fn nearest(khz: &[u64], f: u64) -> usize {
    khz.iter().enumerate().min_by_key(|(_, k)| k.abs_diff(f)).map_or(0, |(i, _)| i)
}

/// What cpufreq says about the host, read without changing anything.
#[derive(Debug, Clone, PartialEq)]
pub struct CpufreqInfo {
    /// `scaling_driver`.
    pub driver: String,
    /// `scaling_governor` of cpu0.
    pub governor: String,
    /// `scaling_available_governors`.
    pub governors: Vec<String>,
    /// `intel_pstate/status`, where present.
    pub intel_pstate_status: Option<String>,
    /// HWP files present.
    pub hwp: bool,
    /// A driver mode that blocks explicit frequencies.
    pub blocker: Option<Blocker>,
    /// The P-states, kHz.
    pub frequencies_khz: Vec<u64>,
}

#[derive(Debug, Clone, Default)]
struct Changed {
    governor: bool,
    min: bool,
    max: bool,
}

#[derive(Debug)]
struct Cpu {
    dir: PathBuf,
    governor: String,
    min_khz: u64,
    max_khz: u64,
    changed: Changed,
    current: usize,
}

/// The cpufreq knobs of every core, with the original values to put back.
#[derive(Debug)]
pub struct Cpufreq {
    info: CpufreqInfo,
    table: PStateTable,
    mode: Mode,
    cpus: Vec<Cpu>,
}

fn read(path: &Path) -> Result<String, CpufreqError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| CpufreqError::Read { path: path.into(), source })
}

fn read_optional(path: &Path) -> Result<Option<String>, CpufreqError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CpufreqError::Read { path: path.into(), source }),
    }
}

fn read_khz(path: &Path) -> Result<u64, CpufreqError> {
    let s = read(path)?;
    s.parse().map_err(|_| CpufreqError::Parse {
        path: path.into(),
        problem: format!("{s:?} is not a frequency in kHz"),
    })
}

/// Writes a sysfs attribute (never creates one; truncation is a no-op on sysfs and makes fixture
/// files behave like it).
fn write(path: &Path, value: &str) -> Result<(), PlatformError> {
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| PlatformError::io(format!("writing {value} to {}", path.display()), e))
}

/// The `cpufreq` directory of `cpu` under a sys root.
pub fn cpu_dir(sys_root: &Path, cpu: usize) -> PathBuf {
    sys_root.join(format!("devices/system/cpu/cpu{cpu}/cpufreq"))
}

/// Reads what cpufreq says about the host (cpu0), changing nothing.
pub fn read_info(sys_root: &Path) -> Result<CpufreqInfo, CpufreqError> {
    let dir = cpu_dir(sys_root, 0);
    if !dir.is_dir() {
        return Err(CpufreqError::Absent { path: dir });
    }
    let cpu_root = sys_root.join("devices/system/cpu");
    let driver = read(&dir.join("scaling_driver"))?;
    let governor = read(&dir.join("scaling_governor"))?;
    let governors = read_optional(&dir.join("scaling_available_governors"))?
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let intel_pstate_status = read_optional(&cpu_root.join("intel_pstate/status"))?;
    let hwp = cpu_root.join("intel_pstate/hwp_dynamic_boost").exists()
        || dir.join("energy_performance_preference").exists();
    let available: Vec<u64> = read_optional(&dir.join("scaling_available_frequencies"))?
        .map(|s| s.split_whitespace().filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    let min = read_optional(&dir.join("cpuinfo_min_freq"))?.and_then(|s| s.parse().ok());
    let max = read_optional(&dir.join("cpuinfo_max_freq"))?.and_then(|s| s.parse().ok());
    let frequencies_khz = frequencies_khz(&available, min, max)
        .map_err(|problem| CpufreqError::Parse { path: dir.clone(), problem })?;
    Ok(CpufreqInfo {
        blocker: blocker(&driver, intel_pstate_status.as_deref(), hwp),
        driver,
        governor,
        governors,
        intel_pstate_status,
        hwp,
        frequencies_khz,
    })
}

impl Cpufreq {
    /// Reads the cpufreq state of CPUs `0..cores` under `sys_root` and remembers it; writes
    /// nothing. `want_schedutil`: cap under schedutil (for uclamp) where possible.
    pub fn open(sys_root: &Path, cores: usize, want_schedutil: bool) -> Result<Self, CpufreqError> {
        let info = read_info(sys_root)?;
        let table = table(&info.frequencies_khz)
            .map_err(|source| CpufreqError::Table { path: cpu_dir(sys_root, 0), source })?;
        let mode = choose_mode(&info.governors, want_schedutil);
        let mut cpus = Vec::with_capacity(cores);
        for cpu in 0..cores {
            let dir = cpu_dir(sys_root, cpu);
            if !dir.is_dir() {
                return Err(CpufreqError::Absent { path: dir });
            }
            let governor = read(&dir.join("scaling_governor"))?;
            let min_khz = read_khz(&dir.join("scaling_min_freq"))?;
            let max_khz = read_khz(&dir.join("scaling_max_freq"))?;
            let now = if governor == "userspace" {
                read_khz(&dir.join("scaling_setspeed")).unwrap_or(max_khz)
            } else {
                max_khz
            };
            let current = nearest(&info.frequencies_khz, now);
            cpus.push(Cpu {
                dir,
                governor,
                min_khz,
                max_khz,
                changed: Changed::default(),
                current,
            });
        }
        Ok(Self { info, table, mode, cpus })
    }

    /// What cpufreq said at open.
    pub const fn info(&self) -> &CpufreqInfo {
        &self.info
    }

    /// The P-states.
    pub const fn table(&self) -> &PStateTable {
        &self.table
    }

    /// How P-states are set.
    pub const fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Cores under control.
    pub fn cores(&self) -> usize {
        self.cpus.len()
    }

    /// The files the mode writes, for a writability check.
    fn files_written(&self) -> Vec<PathBuf> {
        let Some(cpu) = self.cpus.first() else { return Vec::new() };
        match &self.mode {
            Mode::Userspace => {
                vec![cpu.dir.join("scaling_governor"), cpu.dir.join("scaling_setspeed")]
            }
            Mode::Capping { governor } => {
                let mut v =
                    vec![cpu.dir.join("scaling_max_freq"), cpu.dir.join("scaling_min_freq")];
                if governor.is_some() {
                    v.push(cpu.dir.join("scaling_governor"));
                }
                v
            }
        }
    }

    /// Whether P-states can be set: not blocked by the driver, and the files the mode writes
    /// open for writing (opening writes nothing).
    pub fn check_writable(&self) -> Result<(), PlatformError> {
        if let Some(b) = self.info.blocker {
            return Err(PlatformError::Unsupported(b.reason()));
        }
        for path in self.files_written() {
            std::fs::OpenOptions::new().write(true).open(&path).map_err(|e| {
                PlatformError::io(format!("opening {} for writing", path.display()), e)
            })?;
        }
        Ok(())
    }

    fn check(&self, core: usize) -> Result<(), PlatformError> {
        if core >= self.cpus.len() {
            return Err(PlatformError::NoSuchCore { core, cores: self.cpus.len() });
        }
        Ok(())
    }

    /// The P-state a core is set to.
    pub fn current(&self, core: usize) -> Result<usize, PlatformError> {
        self.check(core)?;
        Ok(self.cpus[core].current)
    }

    /// The frequency a core runs at now (`scaling_cur_freq`), Hz, where readable.
    pub fn cur_freq_hz(&self, core: usize) -> Option<f64> {
        let cpu = self.cpus.get(core)?;
        let khz: u64 =
            std::fs::read_to_string(cpu.dir.join("scaling_cur_freq")).ok()?.trim().parse().ok()?;
        Some(khz as f64 * 1e3)
    }

    /// Puts the governor the mode needs on `core`, once.
    fn prepare_core(&mut self, core: usize) -> Result<(), PlatformError> {
        let wanted = match &self.mode {
            Mode::Userspace => Some("userspace".to_owned()),
            Mode::Capping { governor } => governor.clone(),
        };
        let cpu = &mut self.cpus[core];
        if let Some(g) = wanted
            && cpu.governor != g
            && !cpu.changed.governor
        {
            write(&cpu.dir.join("scaling_governor"), &g)?;
            cpu.changed.governor = true;
        }
        Ok(())
    }

    /// Puts the governor the mode needs on every core (before per-VM clamps are set).
    pub fn prepare(&mut self) -> Result<(), PlatformError> {
        if let Some(b) = self.info.blocker {
            return Err(PlatformError::Unsupported(b.reason()));
        }
        for core in 0..self.cpus.len() {
            self.prepare_core(core)?;
        }
        Ok(())
    }

    /// Sets a core's P-state; refuses cores and P-states that do not exist.
    pub fn set(&mut self, core: usize, pstate: usize) -> Result<(), PlatformError> {
        self.check(core)?;
        let len = self.info.frequencies_khz.len();
        let Some(&khz) = self.info.frequencies_khz.get(pstate) else {
            return Err(PlatformError::NoSuchPState { pstate, len });
        };
        if let Some(b) = self.info.blocker {
            return Err(PlatformError::Unsupported(b.reason()));
        }
        self.prepare_core(core)?;
        let lowest = self.info.frequencies_khz.first().copied().unwrap_or(khz);
        let userspace = self.mode == Mode::Userspace;
        let cpu = &mut self.cpus[core];
        if userspace {
            write(&cpu.dir.join("scaling_setspeed"), &khz.to_string())?;
        } else {
            if khz < cpu.min_khz && !cpu.changed.min {
                write(&cpu.dir.join("scaling_min_freq"), &lowest.to_string())?;
                cpu.changed.min = true;
            }
            write(&cpu.dir.join("scaling_max_freq"), &khz.to_string())?;
            cpu.changed.max = true;
        }
        cpu.current = pstate;
        Ok(())
    }

    /// True when something was changed and not yet put back.
    pub fn changed(&self) -> bool {
        self.cpus.iter().any(|c| c.changed.governor || c.changed.min || c.changed.max)
    }

    /// Puts back every value changed (maximum, then minimum, then governor), on every core;
    /// returns the first error after trying them all.
    pub fn restore(&mut self) -> Result<(), PlatformError> {
        let mut first = None;
        let mut keep = |r: Result<(), PlatformError>| {
            if let Err(e) = r
                && first.is_none()
            {
                first = Some(e);
            }
        };
        let top = self.info.frequencies_khz.len().saturating_sub(1);
        for cpu in &mut self.cpus {
            if cpu.changed.max {
                let r = write(&cpu.dir.join("scaling_max_freq"), &cpu.max_khz.to_string());
                cpu.changed.max = r.is_err();
                keep(r);
            }
            if cpu.changed.min {
                let r = write(&cpu.dir.join("scaling_min_freq"), &cpu.min_khz.to_string());
                cpu.changed.min = r.is_err();
                keep(r);
            }
            if cpu.changed.governor {
                let r = write(&cpu.dir.join("scaling_governor"), &cpu.governor);
                cpu.changed.governor = r.is_err();
                keep(r);
            }
            cpu.current = nearest(&self.info.frequencies_khz, cpu.max_khz).min(top);
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Cpufreq {
    fn drop(&mut self) {
        if self.changed()
            && let Err(e) = self.restore()
        {
            tracing::error!(error = %e, "could not put back the cpufreq settings");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::platform::linux::fixture::Tree;

    const FREQS: [u64; 4] = [2_200_000, 2_000_000, 1_800_000, 1_400_000];

    fn cpu(t: &Tree, n: usize, file: &str) -> String {
        t.read(&format!("sys/devices/system/cpu/cpu{n}/cpufreq/{file}"))
    }

    #[test]
    fn userspace_mode_sets_and_restores_every_value() {
        let t = Tree::new();
        t.cpufreq(
            4,
            "acpi-cpufreq",
            "conservative ondemand userspace powersave performance schedutil",
            &FREQS,
        );
        let sys = t.path("sys");
        let mut c = Cpufreq::open(&sys, 4, false).unwrap();
        assert_eq!(c.mode(), &Mode::Userspace);
        assert_eq!(c.table().len(), 4);
        assert!((c.table().max_frequency_hz() - 2.2e9).abs() < 1.0);
        assert_eq!(c.current(2).unwrap(), 3);
        c.check_writable().unwrap();
        c.set(2, 1).unwrap();
        assert_eq!(cpu(&t, 2, "scaling_governor"), "userspace");
        assert_eq!(cpu(&t, 2, "scaling_setspeed"), "1800000");
        assert_eq!(cpu(&t, 1, "scaling_governor"), "schedutil", "other cores untouched");
        assert_eq!(c.current(2).unwrap(), 1);
        assert!(matches!(c.set(2, 4), Err(PlatformError::NoSuchPState { pstate: 4, len: 4 })));
        assert!(matches!(c.set(4, 0), Err(PlatformError::NoSuchCore { core: 4, cores: 4 })));
        c.restore().unwrap();
        assert_eq!(cpu(&t, 2, "scaling_governor"), "schedutil");
        assert!(!c.changed());
    }

    #[test]
    fn capping_mode_lowers_the_minimum_when_needed_and_restores_it() {
        let t = Tree::new();
        t.cpufreq(4, "cppc_cpufreq", "performance schedutil", &FREQS);
        // The governor's floor is above the slowest P-state.
        t.write("sys/devices/system/cpu/cpu0/cpufreq/scaling_min_freq", "2000000\n");
        let sys = t.path("sys");
        {
            let mut c = Cpufreq::open(&sys, 4, false).unwrap();
            assert_eq!(c.mode(), &Mode::Capping { governor: None });
            c.set(0, 0).unwrap();
            assert_eq!(cpu(&t, 0, "scaling_max_freq"), "1400000");
            assert_eq!(cpu(&t, 0, "scaling_min_freq"), "1400000");
            c.set(3, 2).unwrap();
            assert_eq!(cpu(&t, 3, "scaling_min_freq"), "1400000", "not touched when not needed");
            // Dropped without restore(): Drop puts everything back.
        }
        assert_eq!(cpu(&t, 0, "scaling_max_freq"), "2200000");
        assert_eq!(cpu(&t, 0, "scaling_min_freq"), "2000000");
        assert_eq!(cpu(&t, 3, "scaling_max_freq"), "2200000");
        assert_eq!(cpu(&t, 0, "scaling_governor"), "schedutil");
    }

    #[test]
    fn capping_under_schedutil_for_uclamp() {
        let t = Tree::new();
        t.cpufreq(4, "acpi-cpufreq", "userspace performance schedutil", &FREQS);
        for n in 0..4 {
            t.write(
                &format!("sys/devices/system/cpu/cpu{n}/cpufreq/scaling_governor"),
                "performance\n",
            );
        }
        let mut c = Cpufreq::open(&t.path("sys"), 4, true).unwrap();
        assert_eq!(c.mode(), &Mode::Capping { governor: Some("schedutil".into()) });
        c.prepare().unwrap();
        assert_eq!(cpu(&t, 3, "scaling_governor"), "schedutil");
        c.restore().unwrap();
        assert_eq!(cpu(&t, 3, "scaling_governor"), "performance");
    }

    #[test]
    fn missing_and_unwritable_files_are_named() {
        let t = Tree::new();
        t.cpufreq(4, "acpi-cpufreq", "userspace schedutil", &FREQS);
        t.remove("sys/devices/system/cpu/cpu1/cpufreq/scaling_setspeed");
        let sys = t.path("sys");
        let mut c = Cpufreq::open(&sys, 4, false).unwrap();
        let e = c.set(1, 0).unwrap_err();
        let msg = format!("{e}");
        assert!(msg.contains("cpu1/cpufreq/scaling_setspeed") && msg.contains("writing"), "{msg}");
        // A directory where a file should be cannot be written, even by root.
        let max = t.path("sys/devices/system/cpu/cpu0/cpufreq/scaling_setspeed");
        std::fs::remove_file(&max).unwrap();
        std::fs::create_dir(&max).unwrap();
        let e = c.check_writable().unwrap_err().to_string();
        assert!(e.contains("cpu0/cpufreq/scaling_setspeed"), "{e}");
        c.restore().unwrap();
        assert_eq!(cpu(&t, 1, "scaling_governor"), "schedutil");
        // A missing file needed at open.
        t.remove("sys/devices/system/cpu/cpu3/cpufreq/scaling_max_freq");
        let e = Cpufreq::open(&sys, 4, false).unwrap_err().to_string();
        assert!(e.contains("cpu3/cpufreq/scaling_max_freq"), "{e}");
    }

    #[test]
    fn no_cpufreq_is_reported_as_such() {
        let t = Tree::new();
        t.write("sys/devices/system/cpu/cpu0/topology/core_id", "0\n");
        let e = Cpufreq::open(&t.path("sys"), 2, false).unwrap_err();
        assert!(matches!(e, CpufreqError::Absent { .. }));
        let msg = e.to_string();
        assert!(msg.starts_with("no cpufreq sysfs") && msg.contains("cpu0/cpufreq"), "{msg}");
    }

    #[test]
    fn intel_pstate_active_with_hwp_blocks_explicit_frequencies() {
        let t = Tree::new();
        t.cpufreq(4, "intel_pstate", "performance powersave", &[]);
        t.write("sys/devices/system/cpu/intel_pstate/status", "active\n");
        t.write("sys/devices/system/cpu/intel_pstate/hwp_dynamic_boost", "0\n");
        let mut c = Cpufreq::open(&t.path("sys"), 4, false).unwrap();
        assert_eq!(c.info().blocker, Some(Blocker::IntelPstateActive { hwp: true }));
        assert_eq!(c.table().len(), 16, "cpuinfo 0.8..3.0 GHz in even steps");
        let e = c.set(0, 3).unwrap_err().to_string();
        assert!(e.contains("intel_pstate") && e.contains("HWP") && e.contains("passive"), "{e}");
        assert!(c.check_writable().is_err());
        assert!(!c.changed());
        // Passive mode: the driver calls itself intel_cpufreq and frequencies can be set.
        assert_eq!(blocker("intel_cpufreq", Some("passive"), false), None);
        assert_eq!(blocker("amd-pstate-epp", None, false), Some(Blocker::AmdPstateActive));
        assert_eq!(blocker("amd-pstate", None, false), None);
        assert_eq!(
            blocker("intel_pstate", Some("active"), false),
            Some(Blocker::IntelPstateActive { hwp: false })
        );
    }

    #[test]
    fn tables_from_lists_and_ranges() {
        assert_eq!(frequencies_khz(&[2000, 1000, 2000, 0], None, None).unwrap(), vec![1000, 2000]);
        assert_eq!(
            frequencies_khz(&[], Some(1_000_000), Some(1_000_000)).unwrap(),
            vec![1_000_000]
        );
        assert_eq!(
            frequencies_khz(&[], Some(1_000_000), Some(1_300_000)).unwrap(),
            vec![1_000_000, 1_100_000, 1_200_000, 1_300_000]
        );
        assert!(frequencies_khz(&[], None, Some(1)).is_err());
        let many: Vec<u64> = (1..=100).map(|i| i * 10_000).collect();
        assert_eq!(frequencies_khz(&many, None, None).unwrap().len(), MAX_PSTATES);
    }

    proptest! {
        #[test]
        fn any_range_gives_a_valid_table(min in 1u64..5_000_000, span in 0u64..5_000_000, list in proptest::collection::vec(any::<u32>(), 0..100)) {
            let list: Vec<u64> = list.into_iter().map(u64::from).collect();
            if let Ok(khz) = frequencies_khz(&list, Some(min), Some(min + span)) {
                prop_assert!(table(&khz).is_ok(), "{khz:?}");
                prop_assert!(khz.len() <= MAX_PSTATES);
            }
        }
    }
}
