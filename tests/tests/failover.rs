//! High availability with real processes: three coordinators on one real etcd, two agents on
//! simulated hosts learning through them. The leader is killed with SIGKILL mid-run: another
//! coordinator leads within two lease TTLs, followers refuse writes naming the leader, the agents
//! reconnect and keep deciding, and every sample an agent produced is stored exactly once.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use tonic::{Code, transport::Channel};
use vmgov_coordinator::store::{EtcdConfig, EtcdStore, Store};
use vmgov_proto::pb::{self, fleet_service_client::FleetServiceClient};
use vmgov_tests::{
    etcd::Etcd,
    process::{Daemon, binary},
};

const CLASS: &str = "phenom-9500";
const LEADER_TTL_S: u64 = 3;

fn coordinator(etcd: &str, id: &str) -> (Daemon, String) {
    let ttl = LEADER_TTL_S.to_string();
    let extra = ["--etcd", etcd, "--id", id, "--leader-ttl-s", &ttl];
    let (d, addr) = vmgov_tests::process::coordinator(id, &extra);
    (d, format!("http://{addr}"))
}

fn agent(
    endpoints: &str,
    host: &str,
    samples: &std::path::Path,
    cache: &std::path::Path,
) -> Daemon {
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
        "5",
    ])
    .args(["--coordinator", endpoints, "--host-id", host])
    .arg("--emit-samples")
    .arg(samples)
    .arg("--cache-dir")
    .arg(cache)
    .env("RUST_LOG", "info");
    Daemon::spawn(host, cmd)
}

async fn client(url: &str) -> FleetServiceClient<Channel> {
    let channel = Channel::from_shared(url.to_owned())
        .expect("a valid endpoint")
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    FleetServiceClient::new(channel)
}

fn fleet_threshold(perf: f64) -> pb::SetThresholdRequest {
    pb::SetThresholdRequest {
        scope: Some(pb::ThresholdScope {
            scope: Some(pb::threshold_scope::Scope::Fleet(pb::threshold_scope::Fleet {})),
        }),
        thresholds: Some(pb::Thresholds { perf, throughput: perf }),
        updated_by: "failover".into(),
    }
}

/// The index of the coordinator that accepts writes, and the messages of those that refused.
async fn find_leader(urls: &[String], perf: f64) -> Option<(usize, Vec<String>)> {
    let mut refusals = Vec::new();
    let mut leader = None;
    for (i, url) in urls.iter().enumerate() {
        match client(url).await.set_threshold(fleet_threshold(perf)).await {
            Ok(_) => leader = Some(i),
            Err(s) if s.code() == Code::Unavailable => refusals.push(s.message().to_owned()),
            Err(_) => {}
        }
    }
    leader.map(|l| (l, refusals))
}

fn labelled_lines(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"labels\":{"))
        .count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_sample() {
    let etcd = Etcd::start().unwrap_or_else(|e| panic!("{e}"));
    let endpoint = etcd.endpoint();
    let mut coordinators: Vec<(Daemon, String)> =
        ["c1", "c2", "c3"].iter().map(|id| coordinator(&endpoint, id)).collect();
    let urls: Vec<String> = coordinators.iter().map(|(_, u)| u.clone()).collect();

    let until = Instant::now() + Duration::from_secs(30);
    let (leader, refusals) = loop {
        if let Some(found) = find_leader(&urls, 0.6).await {
            break found;
        }
        assert!(Instant::now() < until, "no coordinator leads");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(refusals.len(), 2, "two followers refuse writes: {refusals:?}");
    assert!(
        refusals.iter().all(|r| r.contains(&urls[leader].replace("http://", ""))),
        "{refusals:?}"
    );

    // Two agents, each knowing every coordinator, learning through whichever serves it.
    let dir = std::env::temp_dir().join(format!("vmgov-failover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let all = urls.join(",");
    let hosts = ["sim-a", "sim-b"];
    let mut agents: Vec<Daemon> = hosts
        .iter()
        .map(|h| agent(&all, h, &dir.join(format!("{h}.jsonl")), &dir.join(format!("{h}-cache"))))
        .collect();
    let leader_client = client(&urls[leader]).await;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = leader_client
            .clone()
            .list_hosts(pb::ListHostsRequest::default())
            .await
            .map(|r| r.into_inner().hosts.len());
        if listed.is_ok_and(|n| n == 2) {
            break;
        }
        assert!(Instant::now() < until, "the agents never registered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let target = 8000;
    leader_client
        .clone()
        .start_learning(pb::StartLearningRequest {
            hardware_class: CLASS.into(),
            host_ids: vec![],
            plan: Some(pb::StartLearningCommand {
                duration_seconds: 0.0,
                sample_target: target,
                dwell_seconds: 0.3,
                reference_seconds: 0.1,
                workloads: vec![],
            }),
        })
        .await
        .unwrap();
    // Let samples flow, then kill the leader in the middle of it.
    let until = Instant::now() + Duration::from_secs(30);
    while hosts.iter().map(|h| labelled_lines(&dir.join(format!("{h}.jsonl")))).sum::<u64>() < 1000
    {
        assert!(Instant::now() < until, "no samples flowed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    coordinators[leader].0.kill();
    let killed = Instant::now();
    let survivors: Vec<String> =
        urls.iter().enumerate().filter(|(i, _)| *i != leader).map(|(_, u)| u.clone()).collect();
    let new_leader = loop {
        if let Some((l, _)) = find_leader(&survivors, 0.7).await {
            break l;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(2 * LEADER_TTL_S + 10),
            "no new leader {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let took = killed.elapsed();
    eprintln!("new leader {} after {took:?}", survivors[new_leader]);
    assert!(took < Duration::from_secs(2 * LEADER_TTL_S + 2), "failover took {took:?}");

    // The agents come back through the survivors and keep learning.
    let before = hosts.iter().map(|h| labelled_lines(&dir.join(format!("{h}.jsonl")))).sum::<u64>();
    let until = Instant::now() + Duration::from_secs(60);
    for a in &agents {
        while !survivors.iter().any(|u| {
            a.log()
                .lines()
                .any(|l| l.contains("connected to the coordinator") && l.contains(u.as_str()))
        }) {
            assert!(Instant::now() < until, "an agent never reached a survivor:\n{}", a.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(30);
    while hosts.iter().map(|h| labelled_lines(&dir.join(format!("{h}.jsonl")))).sum::<u64>()
        <= before
    {
        assert!(Instant::now() < until, "learning stopped with the leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = new_leader;

    // Learning ends on the agents' own sample target; wait for their samples to settle, then
    // count: every labelled sample an agent produced is in etcd exactly once.
    let produced = |hosts: &[&str]| {
        hosts.iter().map(|h| labelled_lines(&dir.join(format!("{h}.jsonl")))).sum::<u64>()
    };
    let store = EtcdStore::connect(EtcdConfig::new([endpoint.clone()])).await.unwrap();
    let until = Instant::now() + Duration::from_secs(90);
    let mut last = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (produced(&hosts), store.samples_seen(CLASS).await.unwrap_or(0));
        if now.0 >= 2 * target && now == last && now.0 == now.1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "produced {} samples, stored {} (last {last:?})",
            now.0,
            now.1
        );
        last = now;
    }
    for a in &mut agents {
        assert!(a.terminate(Duration::from_secs(10)), "an agent did not stop:\n{}", a.log());
        assert!(a.log().contains("connected to the coordinator"), "{}", a.log());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
