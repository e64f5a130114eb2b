//! The agent on a real Linux host with real QEMU guests (TCG), in dry-run: it finds the guests
//! and their vCPU threads, sees a guest's disk writes and another's HTTP traffic in the counters
//! it emits, and stops a VM's actor when the guest goes. Connected to a real coordinator, it
//! registers the guests, and refuses to learn without an energy meter, saying why.
//!
//! Needs root, /dev/net/tun and the packages `tools/test` installs. No assertion depends on
//! speed: timeouts only stop a hang.

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use vmgov_tests::{
    guest::{self, Guest, GuestConfig, GuestImage, HttperfArgs, NetNs, run_httperf},
    process::{Daemon, binary},
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const DD_MIB: u64 = 16;

/// The emitted sample lines, parsed.
fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Sum of a counter over a VM's lines after time `from_s`.
fn sum(lines: &[serde_json::Value], vm: &str, counter: &str, from_s: f64) -> u64 {
    lines
        .iter()
        .filter(|l| l["vm"] == vm && l["time_s"].as_f64().unwrap_or(0.0) > from_s)
        .map(|l| l["counters"][counter].as_u64().unwrap_or(0))
        .sum()
}

fn last_time(lines: &[serde_json::Value]) -> f64 {
    lines.iter().filter_map(|l| l["time_s"].as_f64()).fold(0.0, f64::max)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_agent_sees_real_guests_their_disk_and_their_network() {
    if let Err(e) = guest::check_host() {
        panic!("{e}");
    }
    let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
    let ns = NetNs::new().unwrap();
    let config = GuestConfig::default();
    let mut disk = Guest::start(&image, &ns, &config).unwrap();
    let mut web = Guest::start(&image, &ns, &config).unwrap();
    for g in [&mut disk, &mut web] {
        g.wait_booted(BOOT_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    }
    let samples =
        std::env::temp_dir().join(format!("vmgov-agent-qemu-{}.jsonl", std::process::id()));
    let cache = std::env::temp_dir().join(format!("vmgov-agent-qemu-cache-{}", std::process::id()));
    let (_coordinator, addr) = vmgov_tests::process::coordinator("coordinator", &[]);
    let endpoint = format!("http://{addr}");
    let mut cmd = Command::new(binary("vmgov-agent"));
    cmd.args(["run", "--platform", "linux", "--dry-run", "--timeslice-ms", "100"])
        .args(["--coordinator", &endpoint, "--host-id", "qemu-host"])
        .arg("--emit-samples")
        .arg(&samples)
        .arg("--cache-dir")
        .arg(&cache)
        .env("RUST_LOG", "info");
    let mut agent = Daemon::spawn("agent", cmd);

    // Both guests found, with their two vCPUs.
    wait_until("the agent to emit samples for both guests", Duration::from_secs(60), || {
        let l = lines(&samples);
        [disk.name(), web.name()].iter().all(|n| l.iter().any(|x| x["vm"] == *n))
    });
    let l = lines(&samples);
    for g in [&disk, &web] {
        let line = l.iter().rev().find(|x| x["vm"] == g.name()).unwrap();
        assert_eq!(line["uuid"], g.uuid(), "{line}");
        assert_eq!(line["counters"]["vcpus"], 2, "{line}");
    }
    assert!(agent.log().contains("VM found"), "{}", agent.log());

    // The coordinator knows the host and its guests; asked to learn, the host says it cannot.
    let vmgov = |args: &[&str]| {
        Command::new(binary("vmgov"))
            .env("VMGOV_COORDINATOR", &endpoint)
            .args(args)
            .output()
            .expect("vmgov runs")
    };
    let mut class = String::new();
    wait_until("the coordinator to list both guests", Duration::from_secs(30), || {
        let out = vmgov(&["status", "--output", "json"]);
        let status: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        let host = &status["hosts"][0];
        class = host["hardware_class"].as_str().unwrap_or_default().to_owned();
        let names: Vec<&str> = host["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["vm"]["name"].as_str())
            .collect();
        host["host_id"] == "qemu-host"
            && names.contains(&disk.name())
            && names.contains(&web.name())
    });
    let learn = vmgov(&["learn", "start", "--class", &class, "--samples", "100"]);
    let err = String::from_utf8_lossy(&learn.stderr);
    assert_eq!(learn.status.code(), Some(6), "{err}");
    assert!(err.contains("qemu-host") && err.contains("no package energy meter"), "{err}");

    // A guest writing N MiB shows up as about N MiB of disk writes.
    let t0 = last_time(&lines(&samples));
    let dd = disk
        .run(&format!("dd if=/dev/zero of=/dev/vda bs=1M count={DD_MIB} oflag=direct && sync"))
        .unwrap();
    assert!(dd.success(), "{dd:?}");
    let expected = DD_MIB << 20;
    wait_until("the writes to show in the samples", Duration::from_secs(30), || {
        sum(&lines(&samples), disk.name(), "disk_write_bytes", t0) >= expected * 9 / 10
    });
    thread::sleep(Duration::from_millis(500));
    let written = sum(&lines(&samples), disk.name(), "disk_write_bytes", t0);
    assert!(
        written.abs_diff(expected) <= expected / 10,
        "{written} bytes seen for {expected} written"
    );

    // httperf against the other guest shows up as its received packets.
    let t1 = last_time(&lines(&samples));
    let args = HttperfArgs { num_conns: 100, rate: 20, ..HttperfArgs::new(web.ip()) };
    let load = run_httperf(&ns, &args).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(load.replies, load.requests, "{load:?}");
    wait_until("the packets to show in the samples", Duration::from_secs(30), || {
        sum(&lines(&samples), web.name(), "packets_rx", t1) >= load.requests
    });
    thread::sleep(Duration::from_millis(500));
    let l = lines(&samples);
    let rx = sum(&l, web.name(), "packets_rx", t1);
    let tx = sum(&l, web.name(), "packets_tx", t1);
    // Each HTTP/1.0 request is a handshake, the request and the close: several packets each way.
    assert!(rx >= load.requests && rx <= 20 * load.requests, "{rx} packets received for {load:?}");
    assert!(tx >= load.replies, "{tx} packets sent for {load:?}");
    assert!(
        sum(&l, disk.name(), "packets_rx", t1) < load.requests / 2,
        "the load went to {}",
        web.name()
    );

    // Stopping a guest stops its actor: no samples for it afterwards.
    let gone = disk.name().to_owned();
    disk.stop().unwrap();
    wait_until("the agent to notice the guest went", Duration::from_secs(30), || {
        agent.log().lines().any(|x| x.contains("VM gone") && x.contains(&gone))
    });
    // Lines reach the file through the emitter's queue: let it drain, then compare.
    thread::sleep(Duration::from_secs(1));
    let count = |vm: &str| lines(&samples).iter().filter(|x| x["vm"] == vm).count();
    let gone_before = count(&gone);
    let web_before = count(web.name());
    thread::sleep(Duration::from_secs(1));
    assert_eq!(count(&gone), gone_before, "samples keep coming for a stopped guest");
    assert!(count(web.name()) > web_before, "the other guest is no longer sampled");
    let l = lines(&samples);
    let last = |vm: &str| {
        l.iter().filter(|x| x["vm"] == vm).filter_map(|x| x["time_s"].as_f64()).fold(0.0, f64::max)
    };
    assert!(last(web.name()) - last(&gone) > 0.5, "the stopped guest was sampled until the end");
    assert!(
        agent.terminate(Duration::from_secs(10)),
        "the agent did not stop on SIGTERM:\n{}",
        agent.log()
    );
    let _ = std::fs::remove_file(&samples);
    let _ = std::fs::remove_dir_all(&cache);
}
