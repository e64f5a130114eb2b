//! `vmgov-agent preflight`: what a host lets the agent do, said in plain words before anyone
//! deploys it, because the answer decides how to run the agent (acting, `--dry-run`, or not at
//! all) and depends on kernel options, drivers, BIOS settings and daemons nobody remembers.
//! Scripts read the exit code: 0 the agent can act, 1 it can only observe, 2 it can do nothing.
//!
//! [`gather`] reads files under the proc and sys roots and makes the few probes that need the
//! real kernel (perf, uclamp); [`assess`] is a pure function from those facts to the verdict and
//! its reasons, so every verdict is tested on facts written by hand or read from fixture trees.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use serde::Serialize;
use vmgov_proto::{Counter, CounterSet};

use crate::platform::linux::{
    cpufreq::{Cpufreq, Mode},
    error_chain,
    perf::PerfSupport,
    procfs::{self, ProcFs},
    rapl::Rapl,
    uclamp,
};

/// What cpufreq offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpufreqFacts {
    /// `scaling_driver`.
    pub driver: String,
    /// `scaling_governor` of cpu0.
    pub governor: String,
    /// `scaling_available_governors`.
    pub governors: Vec<String>,
    /// Why the driver ignores explicit frequencies, if it does.
    pub blocker: Option<&'static str>,
    /// The P-states, kHz, slowest first.
    pub frequencies_khz: Vec<u64>,
    /// How the agent would set them.
    pub mode: Mode,
    /// Whether the files it would write open for writing.
    pub writable: Result<(), String>,
}

/// One hardware perf event, and why it does not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerfFact {
    /// Its name.
    pub event: &'static str,
    /// The counter it measures.
    pub counter: Option<Counter>,
    /// Why it does not open (`None`: it opens).
    pub refusal: Option<String>,
}

/// A daemon that sets the same knobs as the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rival {
    /// Its pid.
    pub pid: u32,
    /// `tuned` or `power-profiles-daemon`.
    pub name: &'static str,
}

/// A QEMU VM found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmFact {
    /// QEMU's pid.
    pub pid: u32,
    /// Its name (`qemu-PID` without `-name`).
    pub name: String,
    /// `-smp`.
    pub smp: Option<u32>,
    /// vCPU threads as (vCPU index, thread id).
    pub vcpu_threads: Vec<(u32, u32)>,
    /// Tap interfaces found.
    pub taps: Vec<String>,
}

/// Everything preflight read from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The proc root.
    pub proc_root: PathBuf,
    /// The sys root.
    pub sys_root: PathBuf,
    /// CPUs in `/proc/stat`.
    pub cpus: Result<usize, String>,
    /// Per-thread schedstat readable (vCPU run time).
    pub schedstat: Result<(), String>,
    /// Per-process I/O accounting readable (disk).
    pub task_io: Result<(), String>,
    /// cpufreq.
    pub cpufreq: Result<CpufreqFacts, String>,
    /// Utilisation clamps.
    pub uclamp: Result<(), String>,
    /// `/proc/sys/kernel/perf_event_paranoid`.
    pub perf_event_paranoid: Option<i64>,
    /// Every hardware event.
    pub perf: Vec<PerfFact>,
    /// RAPL package zones.
    pub rapl: Result<usize, String>,
    /// Daemons that would fight the agent.
    pub rivals: Vec<Rival>,
    /// QEMU VMs.
    pub vms: Result<Vec<VmFact>, String>,
}

/// Which daemon a process is, if it is one that sets governors or energy preferences.
pub fn rival(comm: &str, args: &[String]) -> Option<&'static str> {
    let comm = comm.trim();
    let base = |a: &String| a.rsplit('/').next().unwrap_or_default().to_owned();
    if comm == "tuned" || args.iter().take(3).any(|a| base(a) == "tuned") {
        Some("tuned")
    } else if comm.starts_with("power-profiles")
        || args.first().is_some_and(|a| base(a) == "power-profiles-daemon")
    {
        Some("power-profiles-daemon")
    } else {
        None
    }
}

/// Reads what the host offers under `proc_root` and `sys_root`, and probes perf and uclamp on
/// the real kernel. Changes nothing.
pub fn gather(proc_root: &Path, sys_root: &Path) -> Facts {
    let proc = ProcFs::new(proc_root);
    let cpus = proc
        .cpu_times()
        .map(|t| t.iter().map(|(c, _)| *c as usize + 1).max().unwrap_or(0))
        .map_err(|e| error_chain(&e));
    let schedstat = proc.read("self/schedstat").map(drop).map_err(|e| error_chain(&e));
    let task_io = proc.read("self/io").map(drop).map_err(|e| error_chain(&e));
    let uclamp = uclamp::probe().map_err(|e| error_chain(&e));
    let cpufreq = Cpufreq::open(sys_root, *cpus.as_ref().unwrap_or(&1), uclamp.is_ok())
        .map(|c| CpufreqFacts {
            driver: c.info().driver.clone(),
            governor: c.info().governor.clone(),
            governors: c.info().governors.clone(),
            blocker: c.info().blocker.map(|b| b.reason()),
            frequencies_khz: c.info().frequencies_khz.clone(),
            mode: c.mode().clone(),
            writable: c.check_writable().map_err(|e| error_chain(&e)),
        })
        .map_err(|e| error_chain(&e));
    let perf_event_paranoid =
        proc.read("sys/kernel/perf_event_paranoid").ok().and_then(|s| s.trim().parse().ok());
    let support = PerfSupport::probe();
    let perf = support
        .results()
        .iter()
        .map(|(e, r)| PerfFact {
            event: e.name(),
            counter: e.counter(),
            refusal: r.as_ref().err().map(ToString::to_string),
        })
        .collect();
    let rapl = Rapl::open(sys_root).map(|r| r.packages()).map_err(|e| error_chain(&e));
    let mut rivals = Vec::new();
    let vms = proc.pids().map_err(|e| error_chain(&e)).map(|pids| {
        let mut vms = Vec::new();
        for pid in pids {
            let raw = proc.read_bytes(format!("{pid}/cmdline")).unwrap_or_default();
            let comm = proc.read(format!("{pid}/comm")).unwrap_or_default();
            if let Some(name) = rival(&comm, &procfs::split_cmdline(&raw)) {
                rivals.push(Rival { pid, name });
            }
            let Some(cmd) = procfs::parse_cmdline(&raw) else { continue };
            let threads = proc.vcpu_threads(pid).unwrap_or_default();
            let mut taps = cmd.taps.clone();
            for t in proc.tap_fds(pid).unwrap_or_default() {
                if !taps.contains(&t) {
                    taps.push(t);
                }
            }
            vms.push(VmFact {
                pid,
                name: cmd.name.clone().unwrap_or_else(|| format!("qemu-{pid}")),
                smp: cmd.smp,
                vcpu_threads: threads.iter().map(|t| (t.vcpu, t.tid)).collect(),
                taps,
            });
        }
        vms
    });
    Facts {
        proc_root: proc_root.into(),
        sys_root: sys_root.into(),
        cpus,
        schedstat,
        task_io,
        cpufreq,
        uclamp,
        perf_event_paranoid,
        perf,
        rapl,
        rivals,
        vms,
    }
}

/// What the agent can do on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Measure VMs and set frequencies.
    Act,
    /// Measure VMs only (`--dry-run`).
    Observe,
    /// Not even measure.
    Nothing,
}

impl Verdict {
    /// The exit code of `vmgov-agent preflight`.
    pub const fn exit_code(self) -> u8 {
        match self {
            Self::Act => 0,
            Self::Observe => 1,
            Self::Nothing => 2,
        }
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Works.
    Ok,
    /// Works partly, or something will degrade the agent.
    Warn,
    /// Missing: the agent loses a capability.
    Missing,
    /// For information.
    Info,
}

impl Status {
    const fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Missing => "MISSING",
            Self::Info => "info",
        }
    }
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// How it came out.
    pub status: Status,
    /// In plain words.
    pub detail: String,
}

/// The verdict, its reasons and every check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// What the agent can do.
    pub verdict: Verdict,
    /// The exit code that says it.
    pub exit_code: u8,
    /// Why it can do no more.
    pub reasons: Vec<String>,
    /// Every check.
    pub checks: Vec<Check>,
    /// The QEMU VMs found.
    pub vms: Vec<VmFact>,
}

fn ghz(khz: u64) -> String {
    format!("{:.2}", khz as f64 / 1e6)
}

/// Judges the facts: a pure function.
pub fn assess(f: &Facts) -> Report {
    let mut checks = Vec::new();
    let mut check = |name, status, detail: String| checks.push(Check { name, status, detail });
    let proc = f.proc_root.display();

    // Observation.
    let observe = match (&f.cpus, &f.schedstat) {
        (Ok(n), Ok(())) => {
            check(
                "proc",
                Status::Ok,
                format!("{n} CPUs in {proc}/stat; per-thread schedstat readable (vCPU run time)"),
            );
            Ok(())
        }
        (Err(e), _) => {
            let d = format!("cannot read the CPUs' times: {e}");
            check("proc", Status::Missing, d.clone());
            Err(d)
        }
        (Ok(_), Err(e)) => {
            let d = format!(
                "per-thread schedstat unreadable ({e}): vCPU run time cannot be measured \
                 (kernel without CONFIG_SCHED_INFO?)"
            );
            check("proc", Status::Missing, d.clone());
            Err(d)
        }
    };
    match &f.task_io {
        Ok(()) => check(
            "disk",
            Status::Ok,
            "per-process I/O accounting readable (disk bytes and calls)".into(),
        ),
        Err(e) => check(
            "disk",
            Status::Warn,
            format!(
                "per-process I/O accounting unreadable ({e}): disk counters unavailable (kernel without CONFIG_TASK_IO_ACCOUNTING?)"
            ),
        ),
    }

    // Acting: core frequencies through cpufreq.
    let act = match &f.cpufreq {
        Err(e) => Err(format!("core frequencies cannot be set: {e}")),
        Ok(c) => {
            let what = format!("driver {}, governor {}", c.driver, c.governor);
            if let Some(why) = c.blocker {
                Err(format!("{what}: {why}"))
            } else if c.frequencies_khz.len() < 2 {
                Err(format!(
                    "{what}: one frequency only ({} GHz): nothing to choose",
                    ghz(c.frequencies_khz.first().copied().unwrap_or(0))
                ))
            } else if let Err(e) = &c.writable {
                Err(format!(
                    "{what}: cannot write the frequency files ({e}): run the agent as root"
                ))
            } else {
                Ok(what)
            }
        }
    };
    match (&act, &f.cpufreq) {
        (Ok(what), Ok(c)) => {
            let how = match &c.mode {
                Mode::Userspace => "through the userspace governor (scaling_setspeed)".to_owned(),
                Mode::Capping { governor: Some(g) } => {
                    format!("by capping scaling_max_freq under {g}")
                }
                Mode::Capping { governor: None } => "by capping scaling_max_freq".to_owned(),
            };
            let (lo, hi) = (
                c.frequencies_khz.first().copied().unwrap_or(0),
                c.frequencies_khz.last().copied().unwrap_or(0),
            );
            check(
                "cpufreq",
                Status::Ok,
                format!(
                    "{what}; {} P-states {}-{} GHz, set {how}",
                    c.frequencies_khz.len(),
                    ghz(lo),
                    ghz(hi)
                ),
            );
        }
        (Err(e), _) => check("cpufreq", Status::Missing, e.clone()),
        (Ok(_), Err(_)) => {}
    }

    // Per-VM frequencies.
    let schedutil = f.cpufreq.as_ref().is_ok_and(|c| c.governors.iter().any(|g| g == "schedutil"));
    match (&f.uclamp, &f.cpufreq) {
        (Err(e), _) => check(
            "uclamp",
            Status::Warn,
            format!(
                "{e}: no per-VM frequency at vCPU switches; run the agent with --arbiter max or pin"
            ),
        ),
        (Ok(()), Err(_)) => check(
            "uclamp",
            Status::Warn,
            "utilisation clamps work, but without cpufreq there is no frequency to clamp".into(),
        ),
        (Ok(()), Ok(_)) if !schedutil => check(
            "uclamp",
            Status::Warn,
            "utilisation clamps work, but cpufreq offers no schedutil governor, which applies them"
                .into(),
        ),
        (Ok(()), Ok(_)) => check(
            "uclamp",
            Status::Ok,
            "utilisation clamps work: per-VM frequencies at every vCPU switch (under schedutil)"
                .into(),
        ),
    }

    // Counters.
    let paranoid = f.perf_event_paranoid.map_or_else(|| "unknown".to_owned(), |p| p.to_string());
    let failed: Vec<&PerfFact> = f.perf.iter().filter(|p| p.refusal.is_some()).collect();
    let lost: CounterSet = failed.iter().filter_map(|p| p.counter).collect();
    if failed.is_empty() {
        let names: Vec<&str> = f.perf.iter().map(|p| p.event).collect();
        check(
            "perf",
            Status::Ok,
            format!("perf_event_paranoid = {paranoid}; hardware events open: {}", names.join(", ")),
        );
    } else {
        let mut reasons: Vec<String> = failed.iter().filter_map(|p| p.refusal.clone()).collect();
        reasons.dedup();
        let detail = if failed.len() == f.perf.len() && reasons.len() == 1 {
            format!("no hardware event opens: {}", reasons[0])
        } else {
            failed
                .iter()
                .map(|p| format!("{}: {}", p.event, p.refusal.as_deref().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let counters: Vec<String> = lost.iter().map(|c| format!("{c:?}")).collect();
        check(
            "perf",
            Status::Warn,
            format!(
                "perf_event_paranoid = {paranoid}; {detail}. Unavailable: {}; models that need them \
                 cannot predict and those VMs run on the fallback governor",
                counters.join(", ")
            ),
        );
    }
    match &f.rapl {
        Ok(n) => check(
            "rapl",
            Status::Ok,
            format!("{n} RAPL package zone(s): package energy is metered"),
        ),
        Err(e) => check(
            "rapl",
            Status::Warn,
            format!("{e}: no package energy, so learning mode cannot label power"),
        ),
    }
    if f.rivals.is_empty() {
        check("rivals", Status::Ok, "neither tuned nor power-profiles-daemon runs".into());
    }
    for r in &f.rivals {
        check(
            "rivals",
            Status::Warn,
            format!(
                "{} runs (pid {}): it sets governors and energy preferences too and would fight \
                 the agent over them; stop it (systemctl stop {})",
                r.name, r.pid, r.name
            ),
        );
    }
    let vms = match &f.vms {
        Err(e) => {
            check("qemu", Status::Warn, format!("cannot list processes: {e}"));
            Vec::new()
        }
        Ok(vms) if vms.is_empty() => {
            check(
                "qemu",
                Status::Info,
                "no QEMU processes found (the agent picks VMs up when they start)".into(),
            );
            Vec::new()
        }
        Ok(vms) => {
            for vm in vms {
                let taps = if vm.taps.is_empty() {
                    "no taps".to_owned()
                } else {
                    format!("taps {}", vm.taps.join(", "))
                };
                if vm.vcpu_threads.is_empty() {
                    check(
                        "qemu",
                        Status::Warn,
                        format!(
                            "VM {} (pid {}): no named vCPU threads, so no CPU time or hardware \
                             counters: start QEMU with -name ...,debug-threads=on; {taps}",
                            vm.name, vm.pid
                        ),
                    );
                } else {
                    check(
                        "qemu",
                        Status::Info,
                        format!(
                            "VM {} (pid {}): {} vCPU threads; {taps}",
                            vm.name,
                            vm.pid,
                            vm.vcpu_threads.len()
                        ),
                    );
                }
            }
            vms.clone()
        }
    };
    let (verdict, reasons) = match (observe, act) {
        (Err(e), _) => (Verdict::Nothing, vec![e]),
        (Ok(()), Err(e)) => (Verdict::Observe, vec![e]),
        (Ok(()), Ok(_)) => (Verdict::Act, Vec::new()),
    };
    Report { verdict, exit_code: verdict.exit_code(), reasons, checks, vms }
}

impl Report {
    /// The report for a person.
    pub fn render(&self, facts: &Facts) -> String {
        let mut s = format!(
            "vmgov-agent preflight (proc {}, sys {})\n\n",
            facts.proc_root.display(),
            facts.sys_root.display()
        );
        for c in &self.checks {
            let _ = writeln!(s, "  {:<8} {:<8} {}", c.status.label(), c.name, c.detail);
        }
        let _ = writeln!(
            s,
            "\n{} (exit code {})",
            match self.verdict {
                Verdict::Act =>
                    "This host lets vmgov-agent act: it can measure VMs and set frequencies.",
                Verdict::Observe =>
                    "This host lets vmgov-agent only observe: it can measure VMs but not set \
                     frequencies; run it with --dry-run.",
                Verdict::Nothing =>
                    "vmgov-agent can do nothing on this host: it cannot even measure VMs.",
            },
            self.exit_code
        );
        for r in &self.reasons {
            let _ = writeln!(s, "  because {r}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::platform::linux::fixture::{FAKE_PID, Tree};

    fn capable() -> Facts {
        Facts {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
            cpus: Ok(8),
            schedstat: Ok(()),
            task_io: Ok(()),
            cpufreq: Ok(CpufreqFacts {
                driver: "acpi-cpufreq".into(),
                governor: "schedutil".into(),
                governors: vec!["userspace".into(), "schedutil".into()],
                blocker: None,
                frequencies_khz: vec![1_400_000, 2_200_000],
                mode: Mode::Capping { governor: Some("schedutil".into()) },
                writable: Ok(()),
            }),
            uclamp: Ok(()),
            perf_event_paranoid: Some(-1),
            perf: vec![PerfFact {
                event: "instructions",
                counter: Some(Counter::Instructions),
                refusal: None,
            }],
            rapl: Ok(1),
            rivals: Vec::new(),
            vms: Ok(vec![VmFact {
                pid: 10,
                name: "web".into(),
                smp: Some(2),
                vcpu_threads: vec![(0, 11), (1, 12)],
                taps: vec!["vnet0".into()],
            }]),
        }
    }

    fn status(r: &Report, name: &str) -> Status {
        r.checks.iter().find(|c| c.name == name).map(|c| c.status).unwrap()
    }

    #[test]
    fn a_capable_host_acts() {
        let r = assess(&capable());
        assert_eq!((r.verdict, r.exit_code), (Verdict::Act, 0));
        assert!(r.reasons.is_empty());
        assert!(
            ["proc", "disk", "cpufreq", "uclamp", "perf", "rapl", "rivals"]
                .iter()
                .all(|n| status(&r, n) == Status::Ok),
            "{r:#?}"
        );
        let text = r.render(&capable());
        assert!(text.contains("VM web (pid 10): 2 vCPU threads; taps vnet0"), "{text}");
        assert!(text.contains("under schedutil") && text.contains("1.40-2.20 GHz"), "{text}");
    }

    #[test]
    fn no_cpufreq_observes_and_says_why() {
        let mut f = capable();
        f.cpufreq =
            Err("no cpufreq sysfs: /sys/devices/system/cpu/cpu0/cpufreq does not exist".into());
        f.uclamp = Err("sched_setattr ... (EOPNOTSUPP: built without CONFIG_UCLAMP_TASK)".into());
        let r = assess(&f);
        assert_eq!((r.verdict, r.exit_code), (Verdict::Observe, 1));
        assert!(r.reasons[0].contains("no cpufreq sysfs"), "{:?}", r.reasons);
        assert_eq!(status(&r, "cpufreq"), Status::Missing);
        assert_eq!(status(&r, "uclamp"), Status::Warn);
        assert!(r.render(&f).contains("--dry-run"));
    }

    #[test]
    fn intel_pstate_active_and_unwritable_files_only_observe() {
        let mut f = capable();
        if let Ok(c) = &mut f.cpufreq {
            c.driver = "intel_pstate".into();
            c.blocker = Some(
                crate::platform::linux::cpufreq::Blocker::IntelPstateActive { hwp: true }.reason(),
            );
        }
        let r = assess(&f);
        assert_eq!(r.verdict, Verdict::Observe);
        assert!(
            r.reasons[0].contains("intel_pstate") && r.reasons[0].contains("HWP"),
            "{:?}",
            r.reasons
        );
        let mut f = capable();
        if let Ok(c) = &mut f.cpufreq {
            c.writable = Err("opening .../scaling_max_freq for writing: Permission denied".into());
        }
        let r = assess(&f);
        assert_eq!(r.verdict, Verdict::Observe);
        assert!(r.reasons[0].contains("root"), "{:?}", r.reasons);
    }

    #[test]
    fn unreadable_proc_does_nothing() {
        let mut f = capable();
        f.cpus = Err("reading /nowhere/stat: No such file or directory".into());
        let r = assess(&f);
        assert_eq!((r.verdict, r.exit_code), (Verdict::Nothing, 2));
        let mut f = capable();
        f.schedstat = Err("reading /proc/self/schedstat".into());
        assert_eq!(assess(&f).verdict, Verdict::Nothing);
    }

    #[test]
    fn warnings_do_not_change_the_verdict() {
        let mut f = capable();
        f.rivals = vec![Rival { pid: 812, name: "tuned" }];
        f.perf = vec![
            PerfFact {
                event: "instructions",
                counter: Some(Counter::Instructions),
                refusal: Some("not supported here (ENOENT)".into()),
            },
            PerfFact {
                event: "cycles",
                counter: Some(Counter::Cycles),
                refusal: Some("not supported here (ENOENT)".into()),
            },
        ];
        f.rapl = Err("no RAPL package zone".into());
        f.vms = Ok(vec![VmFact {
            pid: 5,
            name: "old".into(),
            smp: None,
            vcpu_threads: vec![],
            taps: vec![],
        }]);
        let r = assess(&f);
        assert_eq!(r.verdict, Verdict::Act);
        let text = r.render(&f);
        assert!(
            text.contains("tuned runs (pid 812)") && text.contains("systemctl stop tuned"),
            "{text}"
        );
        assert!(text.contains("no hardware event opens: not supported here (ENOENT)"), "{text}");
        assert!(text.contains("Instructions, Cycles"), "{text}");
        assert!(text.contains("debug-threads=on"), "{text}");
        assert_eq!(status(&r, "rapl"), Status::Warn);
    }

    #[test]
    fn rivals_are_recognised() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            rival("tuned", &args(&["/usr/bin/python3", "-Es", "/usr/sbin/tuned", "-l"])),
            Some("tuned")
        );
        assert_eq!(
            rival("python3", &args(&["/usr/bin/python3", "-Es", "/usr/sbin/tuned"])),
            Some("tuned")
        );
        assert_eq!(
            rival("power-profiles-", &args(&["/usr/libexec/power-profiles-daemon"])),
            Some("power-profiles-daemon")
        );
        assert_eq!(rival("bash", &args(&["bash", "-c", "tuned-adm"])), None);
    }

    #[test]
    fn fixture_hosts_from_files_to_verdict() {
        // A capable fixture: cpufreq with userspace, a VM, tuned.
        let t = Tree::new();
        t.proc_basics(4);
        t.cpufreq(4, "acpi-cpufreq", "userspace schedutil", &[2_200_000, 1_400_000]);
        t.qemu(
            FAKE_PID,
            1,
            &["-name", "guest=web,debug-threads=on", "-netdev", "tap,id=n,ifname=vnet0"],
            &[FAKE_PID + 1],
        );
        t.write(&format!("proc/{}/comm", FAKE_PID + 5), "tuned\n");
        t.write(
            &format!("proc/{}/cmdline", FAKE_PID + 5),
            "/usr/bin/python3\0-Es\0/usr/sbin/tuned\0",
        );
        let f = gather(&t.path("proc"), &t.path("sys"));
        assert_eq!(f.cpus, Ok(4));
        assert_eq!(f.perf_event_paranoid, Some(2));
        assert_eq!(f.rivals, vec![Rival { pid: FAKE_PID + 5, name: "tuned" }]);
        let vms = f.vms.as_ref().unwrap();
        assert_eq!(
            (vms[0].name.as_str(), vms[0].vcpu_threads.clone(), vms[0].taps.clone()),
            ("web", vec![(0, FAKE_PID + 1)], vec!["vnet0".to_owned()])
        );
        let r = assess(&f);
        assert_eq!(r.verdict, Verdict::Act, "{}", r.render(&f));
        // Nothing was written while looking.
        assert_eq!(t.read("sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"), "schedutil");
        // The same without cpufreq, then without /proc/stat.
        std::fs::remove_dir_all(t.path("sys")).unwrap();
        let f = gather(&t.path("proc"), &t.path("sys"));
        let r = assess(&f);
        assert_eq!(r.verdict, Verdict::Observe);
        assert!(r.reasons[0].contains("no cpufreq sysfs"), "{:?}", r.reasons);
        t.remove("proc/stat");
        assert_eq!(assess(&gather(&t.path("proc"), &t.path("sys"))).verdict, Verdict::Nothing);
    }

    #[test]
    fn reports_serialise() {
        let r = assess(&capable());
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["verdict"], "act");
        assert_eq!(json["exit_code"], 0);
        assert_eq!(json["checks"][0]["status"], "ok");
    }

    proptest! {
        #[test]
        fn rival_never_panics(comm in "\\PC{0,20}", args in proptest::collection::vec("\\PC{0,20}", 0..4)) {
            let _ = rival(&comm, &args);
        }
    }
}
