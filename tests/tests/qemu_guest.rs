//! The QEMU guest harness against the real thing: two TCG guests in a private namespace, seen
//! from the host the way the agent will see them (vCPU threads, disk writes, tap traffic).
//!
//! Needs root, /dev/net/tun and the packages `tools/test` installs; without them it fails and
//! says what is missing. No assertion depends on speed: timeouts only stop a hang.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use vmgov_tests::guest::{self, Guest, GuestConfig, GuestImage, HttperfArgs, NetNs, run_httperf};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const DD_MIB: u64 = 16;

#[test]
fn qemu_guests_are_observable_from_the_host() {
    if let Err(e) = guest::check_host() {
        panic!("{e}");
    }
    let begun = Instant::now();
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{}", report(&e)));
    eprintln!("image: {} ({:?})", image.kernel_package, begun.elapsed());

    let ns = NetNs::new().unwrap();
    let ns_name = ns.name().to_owned();
    {
        let config = GuestConfig::default();
        let mut a = Guest::start(&image, &ns, &config).unwrap();
        let mut b = Guest::start(&image, &ns, &config).unwrap();
        for g in [&mut a, &mut b] {
            let took = g.wait_booted(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{}", report(&e)));
            eprintln!("{} (pid {}, {}) booted in {took:?}", g.name(), g.pid(), g.ip());
        }
        assert_ne!(a.pid(), b.pid());
        assert_ne!(a.uuid(), b.uuid());

        // vCPU threads: named `CPU N/TCG` in /proc, the same threads QMP reports.
        for g in [&a, &b] {
            let threads = g.vcpu_threads().unwrap();
            let names: Vec<&str> = threads.iter().map(|t| t.comm.as_str()).collect();
            assert_eq!(names, ["CPU 0/TCG", "CPU 1/TCG"], "vCPU threads of {}", g.name());
            let from_proc: Vec<(u32, u32)> = threads.iter().map(|t| (t.index, t.tid)).collect();
            let from_qmp: Vec<(u32, u32)> =
                g.qmp_vcpus().unwrap().iter().map(|c| (c.index, c.thread_id)).collect();
            assert_eq!(from_proc, from_qmp, "vCPU threads of {}: /proc vs QMP", g.name());
            for (_, tid) in from_proc {
                assert!(Path::new(&format!("/proc/{}/task/{tid}", g.pid())).exists());
            }
        }

        // Disk writes inside the guest show in QEMU's /proc/PID/io.
        let before = a.proc_io().unwrap().write_bytes;
        let dd = a
            .run(&format!("dd if=/dev/zero of=/dev/vda bs=1M count={DD_MIB} oflag=direct && sync"))
            .unwrap();
        assert!(dd.success(), "dd in the guest failed: {dd:?}");
        eprintln!("dd: {}", dd.output.trim().replace('\n', " | "));
        let expected = DD_MIB << 20;
        let mut grown = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            grown = a.proc_io().unwrap().write_bytes.saturating_sub(before);
            if grown >= expected * 9 / 10 {
                break;
            }
            thread::sleep(Duration::from_millis(200));
        }
        eprintln!("write_bytes grew by {grown} for {expected} written in the guest");
        assert!(
            grown.abs_diff(expected) <= expected / 10,
            "QEMU's write_bytes grew by {grown}, expected {expected} ± 10%"
        );

        // HTTP load through the tap: every request answered, and seen on QEMU's tap counters.
        let failed = a.run("exit 3").unwrap();
        assert_eq!(failed.status, 3, "exit status from the guest");
        let tap_before = a.tap_counters().unwrap();
        let other_before = b.tap_counters().unwrap();
        let args = HttperfArgs { num_conns: 100, rate: 20, ..HttperfArgs::new(a.ip()) };
        let load = run_httperf(&ns, &args).unwrap_or_else(|e| panic!("{}", report(&e)));
        let tap_after = a.tap_counters().unwrap();
        eprintln!("httperf: {load:?}");
        eprintln!("tap {}: before {tap_before:?}, after {tap_after:?}", a.tap().name);
        assert_eq!(load.requests, u64::from(args.num_conns));
        assert_eq!(load.replies, load.requests, "every request answered: {load:?}");
        assert_eq!(load.status[1], load.replies, "all replies 2xx: {load:?}");
        let received = tap_after.rx_packets - tap_before.rx_packets;
        let delivered = tap_after.tx_packets - tap_before.tx_packets;
        assert!(received >= load.requests, "guest sent {received} packets for {load:?}");
        assert!(delivered >= load.requests, "guest got {delivered} packets for {load:?}");
        let other_after = b.tap_counters().unwrap();
        assert!(
            other_after.tx_packets - other_before.tx_packets < load.requests,
            "the load went to guest {} only: {other_before:?} → {other_after:?}",
            a.name()
        );

        // Stopping a guest ends its process.
        let pid = b.pid();
        let status = b.stop().unwrap();
        eprintln!("stopped pid {pid}: {status}");
        assert!(!qemu_runs(pid), "QEMU {pid} still runs after stop");

        let pid = a.pid();
        drop(a);
        assert!(!qemu_runs(pid), "QEMU {pid} still runs after drop");
    }
    drop(ns);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(&ns_name)), "{list}");
    eprintln!("whole test: {:?}", begun.elapsed());
}

/// Whether `pid` is (still) a QEMU process; a reused pid is some other program.
fn qemu_runs(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("qemu"))
}

/// An error with its chain of causes.
fn report(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}
