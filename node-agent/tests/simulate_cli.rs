//! `vmgov-agent simulate` and `calibrate` from the outside, as a user runs them: every shipped
//! workload under every governor and the oracle, JSON that parses, and bad input refused with a
//! clear message.

use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vmgov-agent")).args(args).output().expect("vmgov-agent runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("valid JSON")
}

#[test]
fn every_workload_runs_under_every_governor_and_the_oracle() {
    let list = agent(&["simulate", "--list"]);
    assert!(list.status.success());
    let listing = String::from_utf8_lossy(&list.stdout).into_owned();
    let workloads: Vec<String> = listing
        .lines()
        .filter(|l| l.contains("workloads:"))
        .flat_map(|l| {
            l.split(": ")
                .nth(1)
                .unwrap_or_default()
                .split(", ")
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(workloads.len() >= 28, "evaluation, training and held-out: {listing}");
    let mut policies: Vec<Vec<&str>> =
        ["performance", "powersave", "ondemand", "conservative", "schedutil", "cpu-load"]
            .iter()
            .map(|g| vec!["--governor", g])
            .collect();
    policies.push(vec!["--oracle", "--perf", "0.7", "--throughput", "70%"]);
    policies.push(vec!["--pstate", "0"]);
    for w in &workloads {
        for policy in &policies {
            let mut args = vec!["simulate", "--output", "json", "--scale", "0.0005", "-w", w];
            args.extend(policy);
            let out = json(&agent(&args));
            let vm = &out["report"]["vms"][0];
            assert_eq!(vm["workload"], w.as_str());
            assert!(out["completed"].as_bool().unwrap(), "{w} under {policy:?} did not finish");
            assert!(out["report"]["package_energy_j"].as_f64().unwrap() > 0.0);
        }
    }
}

#[test]
fn several_vms_and_the_table_output() {
    let o = agent(&[
        "simulate", "-w", "444.namd", "-w", "470.lbm", "--scale", "0.001", "--pstate", "0,4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    for needle in ["444.namd", "470.lbm", "fixed [0, 4]", "mean power W", "1.40 GHz", "transitions"]
    {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    for (args, reason) in [
        (
            vec!["simulate", "-w", "470.lbn", "--governor", "ondemand"],
            "no built-in workload \"470.lbn\"",
        ),
        (
            vec!["simulate", "-w", "470.lbm", "--class", "nehalem", "--governor", "ondemand"],
            "phenom-9500",
        ),
        (
            vec!["simulate", "-w", "470.lbm", "--pstate", "9"],
            "P-state 9 is not in this host's table",
        ),
        (vec!["simulate", "-w", "470.lbm", "--pstate", "0,1"], "2 P-states given for 1 VMs"),
        (vec!["simulate", "-w", "470.lbm"], "choose who sets the frequencies"),
        (vec!["simulate", "-w", "470.lbm", "--governor", "turbo"], "unknown governor"),
        (vec!["simulate", "-w", "470.lbm", "--oracle", "--perf", "170"], "not a fraction"),
        (vec!["simulate", "-w", "470.lbm", "--governor", "ondemand", "--scale", "0"], "--scale"),
        (
            vec!["simulate", "-w", "/nonexistent/w.toml", "--governor", "ondemand"],
            "reading workload /nonexistent/w.toml",
        ),
    ] {
        let o = agent(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(reason), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn a_users_own_class_and_workload_files_run() {
    let dir = std::env::temp_dir().join(format!("vmgov-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let class = include_str!("../sim/classes/phenom-9500.toml")
        .replace("name = \"phenom-9500\"", "name = \"my-phenom\"")
        .replace("cores = 4", "cores = 2");
    std::fs::write(dir.join("class.toml"), class).unwrap();
    std::fs::write(
        dir.join("w.toml"),
        "name = \"mine\"\n[[phases]]\nname = \"p\"\ninstructions = 1e9\ncpi_core = 1.0\nmem_stall_ns = 0.2\ndram_bytes_per_instruction = 0.5\n",
    )
    .unwrap();
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let out = json(&agent(&[
        "simulate",
        "--class",
        &path("class.toml"),
        "-w",
        &path("w.toml"),
        "--governor",
        "schedutil",
        "--output",
        "json",
    ]));
    assert_eq!(out["report"]["class"], "my-phenom");
    assert_eq!(out["report"]["residency_s"].as_array().unwrap().len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn calibrate_prints_the_tables() {
    let o = agent(&["calibrate", "-w", "470.lbm", "-w", "httperf-500", "--scale", "0.001"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(md.contains("| 470.lbm |") && md.contains("46.0%"), "{md}");
}
