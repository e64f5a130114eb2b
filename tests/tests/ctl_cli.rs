//! `vmgov` against a running coordinator with agents on simulated hosts of two hardware classes:
//! every subcommand, with good and bad input, its output and its exit code; the event stream;
//! and the example scheduler client in Python (grpcio) driving the same coordinator.

use std::{
    process::{Command, Output},
    time::{Duration, Instant},
};

use vmgov_tests::process::{Daemon, binary};

fn coordinator() -> (Daemon, String) {
    vmgov_tests::process::coordinator("coordinator", &[])
}

fn agent(endpoint: &str, class: &str, host: &str, cache: &std::path::Path) -> Daemon {
    let mut cmd = Command::new(binary("vmgov-agent"));
    cmd.args([
        "run",
        "--platform",
        "sim",
        "--class",
        class,
        "-w",
        "train-mix",
        "--scale",
        "50",
        "--speed",
        "30",
    ])
    .args(["--coordinator", endpoint, "--host-id", host])
    .arg("--cache-dir")
    .arg(cache)
    .env("RUST_LOG", "warn");
    Daemon::spawn(host, cmd)
}

struct Vmgov {
    address: String,
}

impl Vmgov {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(binary("vmgov"))
            .env("VMGOV_COORDINATOR", &self.address)
            .args(args)
            .output()
            .expect("vmgov runs")
    }

    /// Runs and expects success; returns standard output.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "vmgov {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs and expects exit code `code`; returns standard error.
    fn fails(&self, args: &[&str], code: i32) -> String {
        let o = self.run(args);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(code), "vmgov {args:?}: {err}");
        err
    }

    /// Every VM of every host in `vmgov status`.
    fn vms(&self) -> Vec<serde_json::Value> {
        let status = self.json(&["status"]);
        let hosts = status["hosts"].as_array().cloned().unwrap_or_default();
        hosts.iter().flat_map(|h| h["vms"].as_array().cloned().unwrap_or_default()).collect()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("valid JSON")
    }
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_vmgov_command_against_a_live_coordinator() {
    let dir = std::env::temp_dir().join(format!("vmgov-ctl-{}", std::process::id()));
    let (coord, addr) = coordinator();
    let endpoint = format!("http://{addr}");
    let v = Vmgov { address: endpoint.clone() };
    let mut agents = [
        agent(&endpoint, "phenom-9500", "phenom-host", &dir.join("a")),
        agent(&endpoint, "epyc-7502", "epyc-host", &dir.join("b")),
    ];
    let events = Daemon::spawn("events", {
        let mut c = Command::new(binary("vmgov"));
        c.env("VMGOV_COORDINATOR", &endpoint).args(["events", "--kind", "model,threshold"]);
        c
    });
    eventually("both hosts to register", Duration::from_secs(30), || {
        v.json(&["status"])["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });

    // Thresholds: set at every scope, read, list, explain, delete; bad input changes nothing.
    assert!(
        v.ok(&["threshold", "set", "--fleet", "--perf", "0.7", "--thrp", "70%"]).contains("fleet")
    );
    v.ok(&["threshold", "set", "--class", "epyc-7502", "--perf", "40", "--thrp", "0.4"]);
    let vm_id = v.json(&["status"])["hosts"]
        .as_array()
        .and_then(|h| h.iter().find(|h| h["host_id"] == "phenom-host"))
        .and_then(|h| h["vms"][0]["vm"]["vm_id"].as_str().map(str::to_owned))
        .expect("a VM on the phenom host");
    v.ok(&["threshold", "set", "--vm", &vm_id, "--perf", "0.9", "--thrp", "0.9", "--by", "test"]);
    let got = v.json(&["threshold", "get", "--vm", &vm_id]);
    assert!((got["thresholds"]["perf"].as_f64().unwrap_or(0.0) - 0.9).abs() < 1e-9, "{got}");
    assert_eq!(got["updated_by"], "test");
    let listed = v.json(&["threshold", "list"]);
    assert_eq!(listed["entries"].as_array().map(Vec::len), Some(3), "{listed}");
    let explained = v.ok(&["threshold", "explain", "--vm", &vm_id]);
    assert!(
        explained.lines().any(|l| l.contains(&format!("vm/{vm_id}")) && l.contains("applies")),
        "{explained}"
    );
    assert!(explained.contains("fleet"));
    let err = v.fails(&["threshold", "set", "--fleet", "--perf", "170", "--thrp", "0.5"], 2);
    assert!(err.contains("out of range"), "{err}");
    v.fails(&["threshold", "set", "--perf", "0.5", "--thrp", "0.5"], 2);
    let err = v.fails(&["threshold", "get", "--host", "nowhere"], 4);
    assert!(err.contains("no threshold set at host/nowhere"), "{err}");
    let after = v.json(&["threshold", "list"]);
    assert_eq!(after, listed, "a refused command changed the thresholds");
    let removed = v.json(&["threshold", "delete", "--class", "epyc-7502"]);
    assert!(removed["removed"]["scope"].is_object(), "{removed}");
    v.fails(&["threshold", "delete", "--class", "epyc-7502"], 4);

    // Learning on both classes, then training and model management.
    for class in ["phenom-9500", "epyc-7502"] {
        let out = v.ok(&[
            "learn",
            "start",
            "--class",
            class,
            "--samples",
            "1500",
            "--dwell",
            "0.3",
            "--reference",
            "0.1",
        ]);
        assert!(out.contains("finished"), "{out}");
        let trained = v.json(&["models", "train", "--class", class, "--activate"]);
        assert_eq!(trained["version"], 1);
        assert_eq!(trained["active"], true);
    }
    let status = v.json(&["learn", "status"]);
    assert_eq!(status["hardware_class"], "epyc-7502");
    v.fails(&["learn", "start", "--class", "phenom-9500"], 5);
    v.fails(&["learn", "start", "--class", "no-such-class", "--samples", "10"], 5);
    v.fails(&["learn", "stop", "--id", "learn-0"], 4);
    let v2 = v.json(&[
        "models",
        "train",
        "--class",
        "phenom-9500",
        "--algorithm",
        "ridge",
        "--alpha",
        "0.001",
    ]);
    assert_eq!(v2["version"], 2);
    v.fails(&["models", "train", "--class", "phenom-9500", "--algorithm", "svm"], 5);
    let list = v.ok(&["models", "list"]);
    assert!(
        list.contains("phenom-9500") && list.contains("epyc-7502") && list.contains("ridge"),
        "{list}"
    );
    let shown = v.ok(&["models", "show", "--class", "phenom-9500"]);
    assert!(shown.contains("l3_misses_per_instruction") && shown.contains("1.40 GHz"), "{shown}");
    v.ok(&["models", "activate", "--class", "phenom-9500", "--version", "2"]);
    let back = v.json(&["models", "rollback", "--class", "phenom-9500"]);
    assert_eq!(back["version"], 1, "{back}");
    v.fails(&["models", "activate", "--class", "phenom-9500", "--version", "9"], 4);
    v.fails(&["models", "rollback", "--class", "epyc-7502"], 5);

    // What-if, and the agents deciding with the models.
    let p = v.json(&[
        "predict",
        "--class",
        "epyc-7502",
        "--feature",
        "l3_misses_per_instruction=0.01",
        "--perf",
        "0.7",
    ]);
    assert_eq!(p["pstates"].as_array().map(Vec::len), Some(3), "{p}");
    v.fails(&["predict", "--class", "epyc-7502", "--feature", "l4_misses=1"], 5);
    v.fails(&["predict", "--class", "epyc-7502", "--feature", "nonsense"], 5);
    eventually("the agents to decide with their class's model", Duration::from_secs(30), || {
        v.ok(&["status"]).lines().filter(|l| l.contains("deciding") && l.contains("v1")).count()
            == 2
    });
    // Each VM is charged its share of the package energy, and the table shows what was saved.
    eventually("energy estimates in the status", Duration::from_secs(30), || {
        let vms = v.vms();
        vms.len() == 2
            && vms
                .iter()
                .all(|vm| vm["decision"]["energy_joules"].as_f64().is_some_and(|e| e > 0.0))
    });
    assert!(v.ok(&["status"]).contains("saved"), "the status table has a saved column");
    // Verification windows measure what each choice really costs: observed ratios appear.
    eventually("observed ratios in the status", Duration::from_secs(30), || {
        v.vms().iter().all(|vm| {
            vm["decision"]["observed"]["perf"].as_f64().is_some_and(|p| p > 0.0 && p < 1.5)
                && vm["decision"]["observed_windows"].as_u64().is_some_and(|n| n > 0)
        })
    });

    // The event stream saw what happened.
    eventually("model and threshold events", Duration::from_secs(10), || {
        let log = events.log();
        log.contains("ModelActivated") && log.contains("ThresholdSet")
    });
    let out = events.log();
    assert!(!out.contains("HostConnected"), "the kind filter let a host event through:\n{out}");
    drop(events);

    // A scheduler in Python, through grpcio, compares the two classes and sets a VM threshold.
    let script = vmgov_tests::workspace_root().join("examples/scheduler.py");
    let py = Command::new("python3")
        .arg(&script)
        .args([
            "--coordinator",
            &addr,
            "--vm",
            "vm-from-python",
            "--perf",
            "0.6",
            "--throughput",
            "0.5",
        ])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&py.stdout);
    assert!(
        py.status.success(),
        "the Python client failed (tools/test installs grpcio): {}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(
        stdout.contains("class phenom-9500: model v1 chooses")
            && stdout.contains("class epyc-7502: model v1 chooses"),
        "{stdout}"
    );
    let set = v.json(&["threshold", "get", "--vm", "vm-from-python"]);
    assert_eq!(set["updated_by"], "example-scheduler");

    // An unreachable coordinator is named, with exit code 3.
    let o = Command::new(binary("vmgov"))
        .args(["--coordinator", "http://127.0.0.1:9", "status"])
        .output()
        .expect("vmgov runs");
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stderr).contains("http://127.0.0.1:9"));

    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
    drop(coord);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model that says no P-state costs any speed: the agent believes it and runs a CPU-bound VM at
/// the lowest P-state. Only measuring shows what that really costs.
fn lying_model(path: &std::path::Path) {
    use vmgov_proto::{EnergyModel, Feature, LinearFit, PStateModel, model::TrainingInfo};
    let table = vmgov_sim::HardwareClass::builtin("phenom-9500")
        .and_then(|c| c.pstate_table())
        .expect("the built-in class");
    let fmax = table.max_frequency_hz();
    let fit = |intercept: f64| LinearFit { intercept, coefficients: vec![0.0; 8] };
    let model = EnergyModel {
        hardware_class: "phenom-9500".into(),
        version: 1,
        pstates: table.clone(),
        features: Feature::REPORT.to_vec(),
        per_pstate: table
            .as_slice()
            .iter()
            .map(|p| PStateModel {
                frequency_hz: p.frequency_hz,
                perf: fit(1.0),
                power: fit((p.frequency_hz / fmax).powi(2)),
                throughput: fit(1.0),
            })
            .collect(),
        training: TrainingInfo::default(),
    };
    std::fs::write(path, serde_json::to_string(&model).expect("serialises")).expect("writes");
}

/// The VM (id and decision) on `host` in `vmgov status --output json`.
fn vm_on(v: &Vmgov, host: &str) -> Option<(String, serde_json::Value)> {
    let status = v.json(&["status"]);
    let h = status["hosts"].as_array()?.iter().find(|h| h["host_id"] == host)?.clone();
    let vm = &h["vms"][0];
    Some((vm["vm"]["vm_id"].as_str()?.to_owned(), vm["decision"].clone()))
}

#[test]
fn a_vm_below_its_thresholds_is_reported_and_guarded() {
    let dir = std::env::temp_dir().join(format!("vmgov-sla-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let model = dir.join("lying-model.json");
    lying_model(&model);
    let (coord, addr) = coordinator();
    let endpoint = format!("http://{addr}");
    let v = Vmgov { address: endpoint.clone() };
    let events = Daemon::spawn("events", {
        let mut c = Command::new(binary("vmgov"));
        c.env("VMGOV_COORDINATOR", &endpoint).args(["events", "--kind", "sla"]);
        c
    });
    // Two hosts run namd on the lying model: one only reports its misses, one guards.
    let host = |name: &str, extra: &[&str]| {
        let mut c = Command::new(binary("vmgov-agent"));
        c.args(["run", "--platform", "sim", "--class", "phenom-9500", "-w", "444.namd"])
            .args(["--scale", "50", "--speed", "30", "--verify-every", "200"])
            .args(["--coordinator", &endpoint, "--host-id", name])
            .args(extra)
            .arg("--model")
            .arg(&model)
            .arg("--cache-dir")
            .arg(dir.join(name))
            .env("RUST_LOG", "warn");
        Daemon::spawn(name, c)
    };
    let mut agents = [host("reporting", &["--no-guard"]), host("guarding", &[])];
    eventually("both hosts to register", Duration::from_secs(30), || {
        v.json(&["status"])["hosts"].as_array().is_some_and(|h| h.len() == 2)
    });
    v.ok(&["threshold", "set", "--fleet", "--perf", "0.85", "--thrp", "0.85"]);
    // namd at 1.4 of 2.2 GHz runs at about 0.64 of its f_max speed, far below 0.85; the host
    // that only reports stays there and says so.
    eventually("the miss in the status", Duration::from_secs(30), || {
        vm_on(&v, "reporting").is_some_and(|(_, d)| {
            d["observed"]["perf"].as_f64().is_some_and(|p| p < 0.75) && d["pstate_index"] == 0
        }) && v.ok(&["status"]).contains("BELOW THRESHOLDS")
    });
    let (reporting_vm, _) = vm_on(&v, "reporting").expect("the reporting host's VM");
    let (guarded_vm, _) = vm_on(&v, "guarding").expect("the guarding host's VM");
    eventually("a ThresholdMissed event from each", Duration::from_secs(30), || {
        let log = events.log();
        [&reporting_vm, &guarded_vm]
            .iter()
            .all(|vm| log.lines().any(|l| l.contains("ThresholdMissed") && l.contains(vm.as_str())))
    });
    // The guarding host overrules the model: 2.0 GHz is the first P-state where namd can reach
    // 0.85 (0.85 / 0.64 × 1.4 GHz = 1.86 GHz by the clock ratio), and it gets there in one step;
    // namd runs at 0.91 there.
    eventually("the guarded VM above its thresholds", Duration::from_secs(30), || {
        vm_on(&v, "guarding").is_some_and(|(_, d)| {
            d["pstate_floor"] == 3
                && d["pstate_index"].as_u64().is_some_and(|p| p >= 3)
                && d["observed"]["perf"].as_f64().is_some_and(|p| p >= 0.85)
        }) && v.ok(&["status"]).contains("guarded at P-state 3")
    });
    // Lowering the threshold below what the VM gets ends the misses.
    v.ok(&["threshold", "set", "--fleet", "--perf", "0.5", "--thrp", "0.5"]);
    eventually("the VMs back above their thresholds", Duration::from_secs(30), || {
        let out = v.ok(&["status"]);
        out.contains("0.50/0.50") && !out.contains("BELOW THRESHOLDS")
    });
    drop(events);
    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
    drop(coord);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_coordinator_answers_health_checks_and_reflection() {
    let (_coord, addr) = coordinator();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("connects");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        for service in ["vmgov.v1.FleetService", "vmgov.v1.AgentService", ""] {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
                .await
                .expect("health answers")
                .into_inner();
            assert_eq!(
                r.status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service}"
            );
        }
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let first = responses.message().await.expect("a response").expect("one message");
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("{first:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"vmgov.v1.FleetService".to_owned())
                && names.contains(&"vmgov.v1.AgentService".to_owned()),
            "{names:?}"
        );
    });
}
