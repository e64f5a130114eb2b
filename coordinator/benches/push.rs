//! Model push fan-out: the time from storing and activating a new model version of a class until
//! every one of 1,000 connected agent streams of that class has received its `ModelPush`.
//!
//! Setup: a real coordinator (`MemoryStore`, leading, a fleet-wide threshold) on 127.0.0.1 with
//! model v1 of the class (trained on 5,000 generated samples) active, and 1,000 real tonic
//! `AgentService.Connect` streams, each on its own TCP connection (2,000 sockets in all; the fd
//! limit here is 20,000, so no channel is shared), each with a valid hello and a distinct host
//! id, at most `CONNECTING` connecting at a time. The bench times the connect phase (every hello
//! answered with model v1 and the initial threshold push), then waits until no stream has
//! received anything for `QUIET`, because of the connect storm: every hello registers a host,
//! every registration is a `Change::Hosts`, and on each one every open stream's pusher clones
//! every host record from the store and re-sends its thresholds. 1,000 hellos thus cost about
//! 1,000²/2 threshold re-pushes and 1,000³/6 host-record clones; on this 2-core machine that
//! took 5 to 6.5 minutes (471,000 re-pushes), during which a model push waits behind the backlog.
//! The bench prints the storm's size and progress, and the setup takes that long until the
//! coordinator re-sends thresholds only to the host whose record changed.
//!
//! Timed, `PUSHES` times after one warm-up: `put_model` of version v (v1's coefficients under a
//! new version) and `activate` through the leader's epoch, directly on the store as the
//! `FleetService` does, until the 1,000th stream has decoded the `ModelPush` of version v. Each
//! stream's reader task stamps the moment it decoded the push, which gives per-stream latency
//! percentiles as well. A push is a single fan-out event after a long one-off setup, so the bench
//! times the pushes itself (`harness = false`) instead of under criterion.
//!
//! Everything is in one process on one multi-thread tokio runtime with a worker per core: the
//! 1,000 agents' decoding competes with the coordinator for the same cores. Run without
//! `--bench` (as `cargo test --all-targets` runs it) the bench only checks itself, on
//! `TEST_AGENTS` streams and one push.

#![allow(clippy::print_stdout, reason = "a bench prints what it measured")]

#[path = "support/data.rs"]
mod data;
#[path = "support/net.rs"]
mod net;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinSet};
use vmgov_coordinator::{
    service::now_unix_ms,
    store::Store,
    train::{self, TrainRequest},
};
use vmgov_proto::{Algorithm, Feature, pb};

const AGENTS: usize = 1000;
/// Agents when run as a test (`cargo test --all-targets` runs benches without `--bench`): a
/// quick check that the bench works, as criterion's test mode does.
const TEST_AGENTS: usize = 20;
/// Agents connecting at once: a thousand at once overflow the listen queue (std's backlog of
/// 128) and connections get reset; agents reconnect with jittered backoff anyway.
const CONNECTING: usize = 64;
/// Measured pushes, after one warm-up push.
const PUSHES: u64 = 10;
/// The streams count as settled after this long without a message.
const QUIET: Duration = Duration::from_secs(2);
/// Longest wait for the connect storm to settle: it took 5 to 6.5 minutes here (module doc).
const SETTLE_PATIENCE: Duration = Duration::from_secs(900);
/// Progress lines while the storm lasts.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// Longest wait for one push to reach every stream.
const PUSH_PATIENCE: Duration = Duration::from_secs(60);

/// A stream decoded a model push.
struct Receipt {
    agent: usize,
    version: u64,
    at: Instant,
}

fn main() {
    let measure = std::env::args().any(|a| a == "--bench");
    let (agents, pushes) = if measure { (AGENTS, PUSHES) } else { (TEST_AGENTS, 1) };
    net::runtime().block_on(run(agents, pushes));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a rank within the slice"
    )]
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn run(streams: usize, pushes: u64) {
    let running = net::start(1_000_000).await;
    let store = running.coordinator.shared().store.clone();
    let epoch = running.epoch;
    let request = TrainRequest {
        hardware_class: data::CLASS.into(),
        version: 1,
        pstates: data::pstates(),
        features: Feature::REPORT.to_vec(),
        algorithm: Algorithm::Ols,
        alpha: 0.0,
        folds: 5,
        created_unix_ms: now_unix_ms(),
        notes: "bench".into(),
    };
    let base = train::train(&request, &data::samples(5_000, 3, data::NOISE))
        .expect("the generated samples train");
    store.put_model(epoch, &base).await.expect("the leader stores a model");
    store.activate(epoch, data::CLASS, 1).await.expect("the leader activates it");
    let size = prost::Message::encoded_len(&pb::CoordinatorMessage {
        msg: Some(pb::coordinator_message::Msg::Model(pb::ModelPush {
            fence: None,
            model: Some((&base).into()),
        })),
    });

    let start = Instant::now();
    let addr = running.addr;
    let mut connects: JoinSet<(net::Agent, Option<u64>)> =
        (0..CONNECTING.min(streams)).map(|h| net::connect(addr, h)).collect();
    let mut next = CONNECTING.min(streams);
    let mut agents = Vec::with_capacity(streams);
    while let Some(joined) = connects.join_next().await {
        let (agent, model) = joined.expect("a connect task");
        assert_eq!(model, Some(1), "every agent gets the active model at hello");
        agents.push(agent);
        if next < streams {
            connects.spawn(net::connect(addr, next));
            next += 1;
        }
    }
    let connected = start.elapsed();
    println!(
        "push: {streams} streams connected (hello answered with model v1 and thresholds) in {:.2} s",
        connected.as_secs_f64()
    );

    let messages = Arc::new(AtomicU64::new(0));
    let threshold_pushes = Arc::new(AtomicU64::new(0));
    let (receipts_tx, mut receipts) = mpsc::unbounded_channel::<Receipt>();
    let mut readers = JoinSet::new();
    for (agent, net::Agent { tx, mut inbound }) in agents.into_iter().enumerate() {
        let receipts_tx = receipts_tx.clone();
        let messages = Arc::clone(&messages);
        let threshold_pushes = Arc::clone(&threshold_pushes);
        readers.spawn(async move {
            // Holding the sender keeps the stream open.
            let _tx = tx;
            while let Ok(Some(msg)) = inbound.message().await {
                messages.fetch_add(1, Ordering::Relaxed);
                match msg.msg {
                    Some(pb::coordinator_message::Msg::Model(push)) => {
                        let at = Instant::now();
                        if let Some(m) = push.model {
                            let _ = receipts_tx.send(Receipt { agent, version: m.version, at });
                        }
                    }
                    Some(pb::coordinator_message::Msg::Thresholds(_)) => {
                        threshold_pushes.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }
    drop(receipts_tx);

    let settling = Instant::now();
    let mut last = messages.load(Ordering::Relaxed);
    let mut last_change = settling;
    let mut progress = settling;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = messages.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= QUIET {
            break;
        }
        if progress.elapsed() >= PROGRESS_EVERY {
            progress = Instant::now();
            let so_far = threshold_pushes.load(Ordering::Relaxed);
            println!(
                "push: still settling after {:.0} s: {so_far} threshold re-pushes so far ({:.0}/s)",
                settling.elapsed().as_secs_f64(),
                so_far as f64 / settling.elapsed().as_secs_f64(),
            );
        }
        assert!(settling.elapsed() < SETTLE_PATIENCE, "the streams did not fall quiet in time");
    }
    println!(
        "push: the connect storm settled {:.1} s after the connect phase: {} threshold re-pushes \
         after the initial ones ({:.0} per stream)",
        (last_change - settling).as_secs_f64(),
        threshold_pushes.load(Ordering::Relaxed),
        threshold_pushes.load(Ordering::Relaxed) as f64 / streams as f64,
    );
    println!("push: model push message: {size} bytes encoded");

    let mut totals = Vec::new();
    let mut pooled = Vec::new();
    for version in 2..=2 + pushes {
        let mut model = base.clone();
        model.version = version;
        model.training.created_unix_ms = now_unix_ms();
        let start = Instant::now();
        store.put_model(epoch, &model).await.expect("the leader stores a model");
        store.activate(epoch, data::CLASS, version).await.expect("the leader activates it");
        let mut got: Vec<Option<Duration>> = vec![None; streams];
        let mut n = 0;
        while n < streams {
            let r = tokio::time::timeout(PUSH_PATIENCE, receipts.recv())
                .await
                .expect("every stream gets the model in time")
                .expect("the readers run");
            assert!(r.version <= version, "a push of a version not yet activated");
            if r.version == version && got[r.agent].is_none() {
                got[r.agent] = Some(r.at.saturating_duration_since(start));
                n += 1;
            }
        }
        let mut latencies: Vec<Duration> = got.into_iter().flatten().collect();
        latencies.sort();
        let all = latencies[streams - 1];
        let warm_up = version == 2;
        println!(
            "push: v{version}{}: all {streams} streams in {:.1} ms (per stream p50 {:.1} ms, p99 {:.1} ms)",
            if warm_up { " (warm-up, not counted)" } else { "" },
            ms(all),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
        );
        if !warm_up {
            totals.push(all);
            pooled.extend(latencies);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    totals.sort();
    pooled.sort();
    println!(
        "push: new model to all {streams} streams: median {:.1} ms (min {:.1} ms, max {:.1} ms) over \
         {pushes} pushes",
        ms(percentile(&totals, 50.0)),
        ms(totals[0]),
        ms(totals[totals.len() - 1]),
    );
    println!(
        "push: per-stream latency over {} receipts: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, \
         max {:.1} ms",
        pooled.len(),
        ms(percentile(&pooled, 50.0)),
        ms(percentile(&pooled, 90.0)),
        ms(percentile(&pooled, 99.0)),
        ms(pooled[pooled.len() - 1]),
    );

    readers.shutdown().await;
    running.stop().await;
}
