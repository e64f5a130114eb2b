//! The loop the product exists for, with real processes and real gRPC: a coordinator, an agent
//! on a simulated host, learning commanded through the FleetService, training on what the agent
//! sent, the model pushed back, and the agent deciding with it. Then the agent restarts with no
//! coordinator and decides at once from its cache.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use vmgov_proto::pb::{self, fleet_service_client::FleetServiceClient};
use vmgov_tests::process::{Daemon, binary};

const CLASS: &str = "phenom-9500";

fn coordinator() -> (Daemon, String) {
    let (d, addr) = vmgov_tests::process::coordinator("coordinator", &[]);
    (d, format!("http://{addr}"))
}

fn agent(endpoint: &str, cache: &std::path::Path, extra: &[&str]) -> Daemon {
    let mut cmd = Command::new(binary("vmgov-agent"));
    cmd.args([
        "run",
        "--platform",
        "sim",
        "-w",
        "train-mem-heavy",
        "--scale",
        "50",
        "--speed",
        "100",
    ])
    .args(["--coordinator", endpoint, "--host-id", "sim-1"])
    .arg("--cache-dir")
    .arg(cache)
    .args(extra)
    .env("RUST_LOG", "info");
    Daemon::spawn("agent", cmd)
}

/// Learning on every host of the class until each has labelled `samples`.
fn learning(samples: u64) -> pb::StartLearningRequest {
    pb::StartLearningRequest {
        hardware_class: CLASS.into(),
        host_ids: vec![],
        plan: Some(pb::StartLearningCommand {
            duration_seconds: 0.0,
            sample_target: samples,
            dwell_seconds: 0.3,
            reference_seconds: 0.1,
            workloads: vec![],
        }),
    }
}

async fn fleet(endpoint: &str) -> FleetServiceClient<Channel> {
    let channel = Channel::from_shared(endpoint.to_owned())
        .expect("a valid endpoint")
        .connect()
        .await
        .expect("the coordinator accepts connections");
    FleetServiceClient::new(channel)
}

async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_learns_gets_a_trained_model_and_decides_with_it() {
    let cache = std::env::temp_dir().join(format!("vmgov-e2e-{}", std::process::id()));
    let (coord, endpoint) = coordinator();
    let mut client = fleet(&endpoint).await;
    let fleet_scope = pb::ThresholdScope {
        scope: Some(pb::threshold_scope::Scope::Fleet(pb::threshold_scope::Fleet {})),
    };
    client
        .set_threshold(pb::SetThresholdRequest {
            scope: Some(fleet_scope),
            thresholds: Some(pb::Thresholds { perf: 0.7, throughput: 0.7 }),
            updated_by: "e2e".into(),
        })
        .await
        .unwrap();
    let mut a = agent(&endpoint, &cache, &[]);
    let host = eventually("the agent to register", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move {
            let hosts =
                c.list_hosts(pb::ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            hosts.into_iter().find(|h| h.host_id == "sim-1" && !h.vms.is_empty())
        }
    })
    .await;
    assert_eq!(host.hardware_class, CLASS);

    // Before any model: the VM runs on the fallback governor and says why.
    let started = client.start_learning(learning(3000)).await.unwrap().into_inner();
    assert!(started.hosts_unreachable.is_empty());
    let done = eventually("learning to finish", Duration::from_secs(90), || {
        let mut c = client.clone();
        let id = started.learning_id.clone();
        async move {
            let s =
                c.get_learning(pb::GetLearningRequest { learning_id: id }).await.ok()?.into_inner();
            (s.state == pb::LearningState::Finished as i32).then_some(s)
        }
    })
    .await;
    assert!(done.samples >= 3000, "{done:?}");

    let trained = client
        .train_model(pb::TrainModelRequest {
            hardware_class: CLASS.into(),
            algorithm: pb::Algorithm::Ols as i32,
            folds: 5,
            activate_if_better: true,
            ..pb::TrainModelRequest::default()
        })
        .await
        .unwrap_or_else(|e| panic!("training failed: {e}; coordinator log:\n{}", coord.log()))
        .into_inner();
    assert_eq!(trained.version, 1);
    assert!(trained.active);
    assert!(trained.mean_mape_perf < 0.1, "perf MAPE {}", trained.mean_mape_perf);

    // The model reaches the agent, which decides with it: a memory-heavy VM held at 70% speed
    // runs below f_max, and saves energy by the estimate the status reports.
    let decision = eventually("the agent to decide with model v1", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move {
            let hosts =
                c.list_hosts(pb::ListHostsRequest::default()).await.ok()?.into_inner().hosts;
            let d =
                hosts.into_iter().find(|h| h.host_id == "sim-1")?.vms.first()?.decision.clone()?;
            (d.model_version == 1 && !d.fallback && d.energy_saved_joules > 0.0).then_some(d)
        }
    })
    .await;
    assert!(decision.pstate_index < 4, "{decision:?}");
    assert!(decision.predicted.as_ref().is_some_and(|r| r.perf >= 0.7), "{decision:?}");
    // Running below f_max is estimated to save energy, less than f_max would have spent.
    assert!(decision.energy_saved_joules < decision.energy_joules, "{decision:?}");
    assert!(
        a.terminate(Duration::from_secs(10)),
        "the agent did not stop on SIGTERM:\n{}",
        a.log()
    );
    assert!(cache.join("model.pb").exists() && cache.join("thresholds.pb").exists());
    drop(coord);

    // Restarted with its coordinator gone, the agent decides from its cache straight away.
    let samples = cache.join("samples.jsonl");
    let mut b = agent(
        "http://127.0.0.1:9",
        &cache,
        &["--emit-samples", samples.to_str().unwrap_or_default()],
    );
    b.wait_for_line("model restored from the local cache", Duration::from_secs(30));
    let line = eventually("decisions from the cached model", Duration::from_secs(30), || {
        let path = samples.clone();
        async move {
            let text = std::fs::read_to_string(path).ok()?;
            text.lines()
                .find(|l| l.contains("\"pstate\":") && !l.contains("\"pstate\":null"))
                .map(str::to_owned)
        }
    })
    .await;
    assert!(line.contains("\"fallback\":null"), "{line}");
    b.terminate(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&cache);
}

/// The training suite, one workload per simulated host, as learning mode runs it: the model
/// trained on it must predict its own held-out folds well. Prints the cross-validated figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_training_suite_trains_an_accurate_model() {
    let suite = [
        "train-cpu",
        "train-mem-light",
        "train-mem-medium",
        "train-mem-heavy",
        "train-disk-read",
        "train-disk-write",
        "train-net-50",
        "train-net-300",
        "train-net-800",
        "train-mix",
    ];
    let dir = std::env::temp_dir().join(format!("vmgov-suite-{}", std::process::id()));
    let (coord, endpoint) = coordinator();
    let mut client = fleet(&endpoint).await;
    let mut agents: Vec<Daemon> = suite
        .iter()
        .map(|w| {
            let mut cmd = Command::new(binary("vmgov-agent"));
            cmd.args(["run", "--platform", "sim", "-w", w, "--scale", "20", "--speed", "20"])
                .args(["--coordinator", &endpoint, "--host-id", w])
                .arg("--cache-dir")
                .arg(dir.join(w))
                .env("RUST_LOG", "warn");
            Daemon::spawn(w, cmd)
        })
        .collect();
    eventually("every host to register", Duration::from_secs(60), || {
        let mut c = client.clone();
        async move {
            let n =
                c.list_hosts(pb::ListHostsRequest::default()).await.ok()?.into_inner().hosts.len();
            (n == suite.len()).then_some(())
        }
    })
    .await;
    let started = client.start_learning(learning(1500)).await.unwrap().into_inner();
    let done = eventually("learning to finish on every host", Duration::from_secs(240), || {
        let mut c = client.clone();
        let id = started.learning_id.clone();
        async move {
            let s =
                c.get_learning(pb::GetLearningRequest { learning_id: id }).await.ok()?.into_inner();
            (s.state == pb::LearningState::Finished as i32).then_some(s)
        }
    })
    .await;
    let model = client
        .train_model(pb::TrainModelRequest {
            hardware_class: CLASS.into(),
            folds: 5,
            activate_if_better: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("training failed: {e}\n{}", coord.log()))
        .into_inner();
    let training = model.training.clone().unwrap_or_default();
    eprintln!(
        "training suite: {} samples from {} hosts; cross-validated mean MAPE perf {:.2}%, power {:.2}%, throughput {:.2}%",
        training.sample_count,
        done.hosts.len(),
        100.0 * model.mean_mape_perf,
        100.0 * model.mean_mape_power,
        100.0 * model.mean_mape_throughput
    );
    for q in &training.quality {
        eprintln!(
            "  P-state {} {:?}: R² {:.3}, MAE {:.4}, MAPE {:.2}%",
            q.pstate_index,
            pb::Target::try_from(q.target),
            q.r2,
            q.mae,
            100.0 * q.mape
        );
    }
    assert!(training.sample_count >= 1500 * suite.len() as u64, "{training:?}");
    assert!(model.mean_mape_perf < 0.10 && model.mean_mape_power < 0.10, "{model:?}");
    for a in &mut agents {
        a.terminate(Duration::from_secs(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
