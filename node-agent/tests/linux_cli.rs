//! `vmgov-agent preflight` and `vmgov-agent run --platform linux` from the outside, on this
//! machine's real `/proc` and `/sys` and on small fixture trees: the verdict is in the exit code
//! and its reasons in the output; a host that cannot act runs only in dry-run, saying so, and
//! refuses to start otherwise, naming what is missing.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmgov-agent")).args(args).output().expect("vmgov-agent runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn no_cpufreq_here() -> bool {
    !Path::new("/sys/devices/system/cpu/cpu0/cpufreq").exists()
}

#[test]
fn preflight_on_this_machine_says_what_it_allows_and_why() {
    let out = agent(&["preflight"]);
    let stdout = text(&out.stdout);
    let code = out.status.code().expect("an exit code");
    for check in ["proc", "cpufreq", "uclamp", "perf", "rapl", "rivals", "qemu"] {
        assert!(
            stdout.lines().any(|l| l.split_whitespace().nth(1) == Some(check)),
            "{check}:\n{stdout}"
        );
    }
    assert!(stdout.contains(&format!("(exit code {code})")), "{stdout}");
    if no_cpufreq_here() {
        assert!(code == 1 || code == 2, "a host without cpufreq cannot act:\n{stdout}");
        assert!(
            stdout.contains("because core frequencies cannot be set: no cpufreq sysfs"),
            "{stdout}"
        );
        assert!(stdout.contains("--dry-run") || code == 2, "{stdout}");
    }
    let json = agent(&["preflight", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(v["exit_code"].as_i64(), Some(i64::from(code)));
    assert_eq!(json.status.code(), Some(code));
    if code != 0 {
        assert!(!v["reasons"].as_array().unwrap().is_empty());
    }
}

#[test]
fn preflight_on_fixture_roots() {
    let dir = tempfile::tempdir().unwrap();
    let proc = dir.path().join("proc");
    let sys = dir.path().join("sys");
    std::fs::create_dir_all(proc.join("self")).unwrap();
    std::fs::create_dir_all(sys.join("devices/system/cpu/cpu0")).unwrap();
    std::fs::write(proc.join("stat"), "cpu  1 0 1 8 0 0 0 0 0 0\ncpu0 1 0 1 8 0 0 0 0 0 0\n")
        .unwrap();
    std::fs::write(proc.join("self/schedstat"), "1 2 3\n").unwrap();
    let (p, s) = (proc.to_str().unwrap(), sys.to_str().unwrap());
    let out = agent(&["preflight", "--proc-root", p, "--sys-root", s]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("only observe"));
    std::fs::remove_file(proc.join("stat")).unwrap();
    let out = agent(&["preflight", "--proc-root", p, "--sys-root", s]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("can do nothing"), "{}", text(&out.stdout));
}

#[test]
fn run_on_linux_in_dry_run_observes_until_signalled() {
    let child = Command::new(env!("CARGO_BIN_EXE_vmgov-agent"))
        .args(["run", "--platform", "linux", "--dry-run", "--timeslice-ms", "50"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vmgov-agent starts");
    std::thread::sleep(Duration::from_millis(1200));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("agent starting") && stderr.contains("platform=\"linux\""), "{stderr}");
    assert!(stderr.contains("stopped after"), "{stderr}");
    if no_cpufreq_here() {
        assert!(
            stderr.contains("only observes (dry-run)") && stderr.contains("no cpufreq sysfs"),
            "{stderr}"
        );
    }
}

#[test]
fn run_on_linux_without_dry_run_refuses_where_it_cannot_act() {
    if !no_cpufreq_here() {
        return; // this host could act: starting the agent would change its frequencies
    }
    let out = agent(&["run", "--platform", "linux"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("this host cannot act"), "{stderr}");
    assert!(stderr.contains("no cpufreq sysfs") && stderr.contains("--dry-run"), "{stderr}");
}
