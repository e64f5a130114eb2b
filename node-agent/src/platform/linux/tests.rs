//! The Linux backend as a whole, on fixture trees: discovery and stable ids, deltas (first
//! sample zeros), the tap's directions, placement, core busy, cpufreq through
//! `FrequencyControl` with restore, what a host without cpufreq or uclamp refuses, and affinity
//! on a real thread of the test process. Then the real `/proc` and `/sys` of this machine.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use nix::{sched::sched_getaffinity, unistd::Pid};
use vmgov_proto::Counter;

use super::{
    LinuxOptions, LinuxPlatform,
    fixture::{FAKE_PID, Tree, io, net_dev, stat_line},
    procfs::uuid_from_name,
};
use crate::{
    config::LinuxConfig,
    platform::{FrequencyControl, HostPlatform, PlatformError},
};

const FREQS: [u64; 4] = [2_200_000, 2_000_000, 1_800_000, 1_400_000];
const WEB: u32 = FAKE_PID;
const DB: u32 = FAKE_PID + 10;

fn options() -> LinuxOptions {
    LinuxOptions { rescan: Duration::ZERO, perf: false, uclamp: false }
}

fn config(t: &Tree) -> LinuxConfig {
    LinuxConfig { proc_root: t.path("proc"), sys_root: t.path("sys"), hardware_class: None }
}

/// Four CPUs with cpufreq, a VM `web` (2 vCPUs, tap vnet0) and a VM `db` (bare name, no UUID).
fn host() -> Tree {
    let t = Tree::new();
    t.proc_basics(4);
    t.cpufreq(4, "acpi-cpufreq", "userspace schedutil performance", &FREQS);
    t.qemu(
        WEB,
        100,
        &[
            "-name",
            "guest=web,debug-threads=on",
            "-uuid",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "-smp",
            "2",
            "-netdev",
            "tap,id=n0,ifname=vnet0,script=no",
        ],
        &[WEB + 1, WEB + 2],
    );
    t.write(&format!("proc/{WEB}/net/dev"), &net_dev(&[("vnet0", 1000, 10, 2000, 20)]));
    t.qemu(DB, 200, &["-name", "db", "-smp", "1"], &[DB + 1]);
    t.write(&format!("proc/{}/cmdline", FAKE_PID + 20), "/bin/bash\0-name\0x\0");
    t
}

#[test]
fn discovery_names_vms_and_keeps_their_ids() {
    let t = host();
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    let info = p.info();
    assert_eq!(
        (info.platform, info.hardware_class.as_str(), info.cores),
        ("linux", "test-cpu-9000", 4)
    );
    assert_eq!(info.pstates.len(), 4);
    assert!(!info.per_vm_frequency && !info.energy_meter);
    assert!(
        info.unavailable.contains(Counter::Energy)
            && info.unavailable.contains(Counter::Instructions)
    );
    assert!(!info.unavailable.contains(Counter::Disk));
    let vms = p.vms().unwrap();
    assert_eq!(vms.len(), 2);
    assert_eq!((vms[0].id, vms[0].name.as_str(), vms[0].vcpus), (0, "web", 2));
    assert_eq!(vms[0].uuid, "1b4e28ba-2fa1-11d2-883f-0016d3cca427");
    assert_eq!(vms[0].affinity, 0b1111);
    assert_eq!((vms[1].id, vms[1].name.as_str(), vms[1].vcpus), (1, "db", 1));
    assert_eq!(vms[1].uuid, uuid_from_name("db"));
    // Same processes, same ids.
    p.sample().unwrap();
    assert_eq!(p.vms().unwrap().iter().map(|v| v.id).collect::<Vec<_>>(), vec![0, 1]);
    // db goes; web is restarted under the same pid: both ids are new, none reused.
    std::fs::remove_dir_all(t.path(&format!("proc/{DB}"))).unwrap();
    t.write(&format!("proc/{WEB}/stat"), &stat_line(WEB, "qemu-system-x86", 101, 0));
    p.sample().unwrap();
    let vms = p.vms().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!((vms[0].id, vms[0].name.as_str()), (2, "web"));
    t.qemu(DB, 300, &["-name", "db"], &[DB + 1]);
    p.sample().unwrap();
    assert_eq!(p.vms().unwrap().iter().map(|v| v.id).collect::<Vec<_>>(), vec![2, 3]);
    // A QEMU without -name is named after its pid.
    std::fs::remove_dir_all(t.path(&format!("proc/{DB}"))).unwrap();
    t.qemu(DB, 301, &["-smp", "cpus=3"], &[]);
    p.sample().unwrap();
    let vms = p.vms().unwrap();
    assert_eq!(vms[1].name, format!("qemu-{DB}"));
    assert_eq!(vms[1].vcpus, 3, "no vCPU threads: -smp says how many");
}

#[test]
fn samples_are_deltas_with_the_taps_directions_right() {
    let t = host();
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    let first = p.sample().unwrap().clone();
    assert!(first.timeslice_s > 0.0);
    assert_eq!(first.cores.len(), 4);
    assert!(first.cores.iter().all(|c| c.busy == 0.0 && c.pstate == 3));
    assert!((first.cores[0].mean_frequency_hz - 2.2e9).abs() < 1.0);
    assert_eq!(first.vms.len(), 2);
    for s in &first.vms {
        let c = &s.counters;
        assert_eq!(
            (c.disk_reads, c.disk_write_bytes, c.packets_rx, c.bytes_tx, c.cpu_time_ns),
            (0, 0, 0, 0, 0),
            "the first sample is zeros, not totals"
        );
    }
    assert_eq!(first.package_energy_j, None);
    // A slice: web reads and writes, receives 20 packets (the tap transmitted them) and sends
    // 5 (the tap received them); its vCPU 1 runs 5 ms on CPU 2; CPU 2 is 75% busy.
    t.write(&format!("proc/{WEB}/io"), &io(10, 4, 4096, 8192));
    t.write(&format!("proc/{WEB}/net/dev"), &net_dev(&[("vnet0", 1500, 15, 5000, 40)]));
    t.write(&format!("proc/{WEB}/task/{}/schedstat", WEB + 2), "5000000 100 3\n");
    t.write(&format!("proc/{WEB}/task/{}/stat", WEB + 2), &stat_line(WEB + 2, "CPU 1/KVM", 1, 2));
    t.write(
        "proc/stat",
        "cpu  0 0 0 0 0 0 0 0 0 0\ncpu0 100 0 100 800 0 0 0 0 0 0\ncpu1 100 0 100 800 0 0 0 0 0 0\n\
         cpu2 300 0 300 850 50 0 0 0 0 0\ncpu3 100 0 100 800 0 0 0 0 0 0\n",
    );
    std::thread::sleep(Duration::from_millis(20));
    let s = p.sample().unwrap().clone();
    let web = s.vms.iter().find(|v| v.vm == 0).unwrap();
    let c = &web.counters;
    assert_eq!(
        (c.disk_reads, c.disk_writes, c.disk_read_bytes, c.disk_write_bytes),
        (10, 4, 4096, 8192)
    );
    assert_eq!((c.packets_rx, c.bytes_rx), (20, 3000), "received by the VM = sent by the tap");
    assert_eq!((c.packets_tx, c.bytes_tx), (5, 500), "sent by the VM = received by the tap");
    assert_eq!(c.cpu_time_ns, 5_000_000);
    assert_eq!(c.vcpus, 2);
    assert!(c.timeslice_seconds >= 0.02);
    assert!(
        c.unavailable.contains(Counter::Instructions) && !c.unavailable.contains(Counter::Network)
    );
    assert!(web.max_vcpu_busy > 0.0 && web.max_vcpu_busy <= 0.25 + 1e-9, "{}", web.max_vcpu_busy);
    assert!((web.busy - web.max_vcpu_busy / 2.0).abs() < 1e-12);
    assert_eq!(s.placement.len(), 1);
    assert_eq!((s.placement[0].vm, s.placement[0].vcpu, s.placement[0].core), (0, 1, 2));
    assert!((s.cores[2].busy - 0.8).abs() < 1e-12, "{}", s.cores[2].busy);
    assert!(s.cores[0].busy.abs() < 1e-12);
    let db = s.vms.iter().find(|v| v.vm == 1).unwrap();
    assert_eq!(db.counters.packets_rx, 0, "no NIC: nothing received, and measured as such");
    assert!(!db.counters.unavailable.contains(Counter::Network));
    assert!(s.time_s >= s.timeslice_s);
}

#[test]
fn taps_passed_as_fds_are_found_in_fdinfo() {
    let t = host();
    t.qemu(
        FAKE_PID + 30,
        5,
        &["-name", "guest=lv", "-netdev", "tap,id=hostnet0,fd=23"],
        &[FAKE_PID + 31],
    );
    let lv = FAKE_PID + 30;
    t.write(&format!("proc/{lv}/net/dev"), &net_dev(&[("vnet7", 0, 0, 0, 0)]));
    t.qemu(
        FAKE_PID + 40,
        6,
        &["-name", "guest=blind", "-netdev", "tap,id=n,fd=9"],
        &[FAKE_PID + 41],
    );
    t.write(
        &format!("proc/{lv}/fdinfo/23"),
        "pos:\t0\nflags:\t02004002\nmnt_id:\t26\niff:\tvnet7\n",
    );
    t.write(&format!("proc/{lv}/fdinfo/3"), "pos:\t0\nflags:\t02\n");
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    p.sample().unwrap();
    t.write(&format!("proc/{lv}/net/dev"), &net_dev(&[("vnet7", 60, 1, 0, 0)]));
    let s = p.sample().unwrap();
    let lv = s.vms.iter().find(|v| v.vm == 2).unwrap();
    assert_eq!((lv.counters.packets_tx, lv.counters.bytes_tx), (1, 60));
    let blind = s.vms.iter().find(|v| v.vm == 3).unwrap();
    assert!(blind.counters.unavailable.contains(Counter::Network), "a tap nobody names");
}

#[test]
fn a_vm_without_named_vcpu_threads_has_no_cpu_time() {
    let t = Tree::new();
    t.proc_basics(2);
    t.qemu(FAKE_PID, 1, &["-name", "old", "-smp", "4"], &[]);
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    let s = p.sample().unwrap();
    assert!(s.vms[0].counters.unavailable.contains(Counter::CpuTime));
    assert_eq!(s.vms[0].counters.vcpus, 4);
}

#[test]
fn cpufreq_through_frequency_control_and_restore() {
    let t = host();
    let gov = |n: usize| t.read(&format!("sys/devices/system/cpu/cpu{n}/cpufreq/scaling_governor"));
    {
        let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
        assert_eq!(p.cannot_act(), None);
        p.vms().unwrap();
        p.set_core_pstate(1, 0).unwrap();
        assert_eq!(t.read("sys/devices/system/cpu/cpu1/cpufreq/scaling_setspeed"), "1400000");
        assert_eq!(gov(1), "userspace");
        assert_eq!(p.core_pstate(1).unwrap(), 0);
        assert!(matches!(
            p.set_core_pstate(1, 4),
            Err(PlatformError::NoSuchPState { pstate: 4, len: 4 })
        ));
        assert!(matches!(
            p.set_core_pstate(4, 0),
            Err(PlatformError::NoSuchCore { core: 4, cores: 4 })
        ));
        // No uclamp: per-VM P-states are refused with the reason; clearing is a no-op.
        let e = p.set_vm_pstate(0, Some(1)).unwrap_err();
        assert!(matches!(e, PlatformError::Unsupported(why) if why.contains("uclamp")), "{e}");
        p.set_vm_pstate(0, None).unwrap();
        assert!(matches!(p.set_vm_pstate(9, None), Err(PlatformError::NoSuchVm(9))));
        assert!(matches!(p.set_vm_pstate(0, Some(7)), Err(PlatformError::NoSuchPState { .. })));
        assert!(p.limits().iter().any(|l| l.starts_with("per-VM frequencies")));
        p.restore().unwrap();
        assert_eq!(gov(1), "schedutil");
        p.set_core_pstate(3, 2).unwrap();
        assert_eq!(gov(3), "userspace");
        // Dropped without restore(): the platform puts everything back.
    }
    assert_eq!(gov(3), "schedutil");
}

#[test]
fn without_cpufreq_the_host_can_only_observe() {
    let t = Tree::new();
    t.proc_basics(2);
    t.write("sys/devices/system/cpu/cpu0/topology/core_id", "0\n");
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    let why = p.cannot_act().unwrap();
    assert!(why.contains("no cpufreq sysfs") && why.contains("cpu0/cpufreq"), "{why}");
    let info = p.info();
    assert_eq!(info.pstates.len(), 1);
    assert!((info.pstates.max_frequency_hz() - 2.4e9).abs() < 1.0, "the nominal clock");
    let e = p.set_core_pstate(0, 0).unwrap_err().to_string();
    assert!(e.contains("no cpufreq sysfs"), "{e}");
    assert_eq!(p.core_pstate(1).unwrap(), 0);
    let limits = p.limits().join("\n");
    assert!(limits.contains("core frequencies") && limits.contains("package energy"), "{limits}");
    // It still observes.
    assert_eq!(p.sample().unwrap().cores.len(), 2);
    p.restore().unwrap();
}

#[test]
fn rapl_and_a_configured_class() {
    let t = host();
    let z = "sys/class/powercap/intel-rapl:0";
    t.write(&format!("{z}/name"), "package-0\n");
    t.write(&format!("{z}/energy_uj"), "1000000\n");
    t.write(&format!("{z}/max_energy_range_uj"), "262143328850\n");
    let mut c = config(&t);
    c.hardware_class = Some("epyc-7502".into());
    let mut p = LinuxPlatform::with_options(&c, options()).unwrap();
    let info = p.info();
    assert!(info.energy_meter && !info.unavailable.contains(Counter::Energy));
    assert_eq!(info.hardware_class, "epyc-7502");
    assert_eq!(p.sample().unwrap().package_energy_j, Some(0.0));
    t.write(&format!("{z}/energy_uj"), "3500000\n");
    let j = p.sample().unwrap().package_energy_j.unwrap();
    assert!((j - 2.5).abs() < 1e-9, "{j}");
}

/// A thread of this test that waits to be told to stop.
fn parked_thread() -> (u32, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let s = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        tx.send(u32::try_from(nix::unistd::gettid().as_raw()).unwrap()).unwrap();
        while !s.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    (rx.recv().unwrap(), stop, handle)
}

#[test]
fn affinity_is_set_on_real_vcpu_threads_and_put_back() {
    let (tid, stop, handle) = parked_thread();
    let real = |tid: u32| sched_getaffinity(Pid::from_raw(i32::try_from(tid).unwrap())).unwrap();
    let original = real(tid);
    let t = Tree::new();
    t.proc_basics(4);
    // A fixture VM whose vCPU thread is the real, parked thread.
    t.qemu(FAKE_PID, 1, &["-name", "guest=pinned"], &[tid]);
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    p.vms().unwrap();
    p.set_vm_affinity(0, 0b0001).unwrap();
    let now = real(tid);
    assert!(now.is_set(0).unwrap() && !now.is_set(1).unwrap());
    assert_eq!(p.vms().unwrap()[0].affinity, 0b0001);
    assert!(matches!(p.set_vm_affinity(0, 0b1_0000), Err(PlatformError::Unsupported(_))));
    assert!(matches!(p.set_vm_affinity(5, 1), Err(PlatformError::NoSuchVm(5))));
    p.restore().unwrap();
    assert_eq!(real(tid), original);
    assert_eq!(p.vms().unwrap()[0].affinity, 0b1111);
    // Dropping after another change puts it back too.
    p.set_vm_affinity(0, 0b0001).unwrap();
    drop(p);
    assert_eq!(real(tid), original);
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
}

#[test]
fn an_unreadable_proc_root_is_an_error_that_names_it() {
    let t = Tree::new();
    let e = LinuxPlatform::with_options(&config(&t), options()).unwrap_err();
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default()
    );
    assert!(chain.contains("cannot observe") && chain.contains("proc/stat"), "{chain}");
}

#[test]
fn this_machine_is_observed() {
    let mut p = LinuxPlatform::with_options(
        &LinuxConfig::default(),
        LinuxOptions { rescan: Duration::ZERO, ..LinuxOptions::default() },
    )
    .unwrap();
    let info = p.info();
    assert_eq!(info.platform, "linux");
    assert!(info.cores >= 1);
    p.vms().unwrap();
    p.sample().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let s = p.sample().unwrap();
    assert_eq!(s.cores.len(), info.cores);
    assert!(s.cores.iter().all(|c| (0.0..=1.0).contains(&c.busy)));
    if !std::path::Path::new("/sys/devices/system/cpu/cpu0/cpufreq").exists() {
        let why = p.cannot_act().unwrap();
        assert!(why.contains("no cpufreq sysfs"), "{why}");
        assert!(!info.per_vm_frequency);
    }
    if !std::path::Path::new("/sys/class/powercap").exists() {
        assert!(!info.energy_meter && info.unavailable.contains(Counter::Energy));
    }
    p.restore().unwrap();
}

#[test]
fn intel_pstate_in_active_mode_is_named() {
    let t = host();
    t.cpufreq(4, "intel_pstate", "performance powersave", &[]);
    t.write("sys/devices/system/cpu/intel_pstate/status", "active\n");
    t.write(
        "sys/devices/system/cpu/cpu0/cpufreq/energy_performance_preference",
        "balance_performance\n",
    );
    let mut p = LinuxPlatform::with_options(&config(&t), options()).unwrap();
    let why = p.cannot_act().unwrap();
    assert!(
        why.contains("intel_pstate") && why.contains("HWP") && why.contains("passive"),
        "{why}"
    );
    let e = p.set_core_pstate(0, 0).unwrap_err();
    assert!(matches!(e, PlatformError::Unsupported(w) if w.contains("intel_pstate")), "{e}");
}

#[test]
fn run_refuses_to_act_where_it_cannot_and_observes_in_dry_run() {
    use crate::{arbiter::ArbiterPolicy, config::AgentConfig, run::linux_platform};
    let t = host();
    // No schedutil, so no per-VM frequencies whether or not this kernel has uclamp.
    t.cpufreq(4, "acpi-cpufreq", "userspace performance", &FREQS);
    let mut c = AgentConfig { linux: config(&t), ..AgentConfig::default() };
    // The follow arbiter's per-VM frequencies cannot be applied.
    let e = linux_platform(&c).unwrap_err().to_string();
    assert!(e.contains("cannot act") && e.contains("--arbiter max or pin"), "{e}");
    c.arbiter = ArbiterPolicy::Max;
    assert!(linux_platform(&c).is_ok());
    // No cpufreq: refused, unless in dry-run.
    std::fs::remove_dir_all(t.path("sys")).unwrap();
    let e = linux_platform(&c).unwrap_err().to_string();
    assert!(e.contains("no cpufreq sysfs") && e.contains("--dry-run"), "{e}");
    c.dry_run = true;
    let p = linux_platform(&c).unwrap();
    assert!(p.cannot_act().is_some());
    // Learning needs the energy meter this fixture does not have.
    c.learning = Some(crate::config::LearningConfig::default());
    let e = linux_platform(&c).unwrap_err().to_string();
    assert!(e.contains("energy meter") && e.contains("RAPL"), "{e}");
}
