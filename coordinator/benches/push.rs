//! Model push fan-out: the time from storing and activating a new model version of a class until
//! every one of 1,000 connected agent streams of that class has received its `ModelPush`.
//!
//! Setup: a real coordinator (`MemoryStore`, leading, a fleet-wide threshold) on 127.0.0.1 with
//! model v1 of the class (trained on 5,000 generated samples) active, and 1,000 real tonic
//! `AgentService.Connect` streams, each on its own TCP connection (2,000 sockets in all: the fd
//! limit here is 20,000, so no channel is shared), each with a valid hello and a distinct host
//! id. The bench times the connect phase (every hello answered with model v1 and the initial
//! threshold push), then waits until the streams fall quiet: every hello registers a host, and
//! every host registration makes the coordinator re-send thresholds to every open stream, so the
//! connect phase sets off a storm of threshold pushes (counted and printed) that would otherwise
//! queue in front of the model pushes.
//!
//! Timed, `PUSHES` times after one warm-up: `put_model` of version v (v1's coefficients under a
//! new version) and `activate` through the leader's epoch, directly on the store as the
//! `FleetService` does, until the 1,000th stream has decoded the `ModelPush` of version v. Each
//! stream's reader task stamps the moment it decoded the push, which gives per-stream latency
//! percentiles as well. One push is a single fan-out event with a one-off setup of about a
//! minute, so the bench times the pushes itself (`harness = false`) instead of under criterion.
//!
//! Everything is in one process on one multi-thread tokio runtime with a worker per core: the
//! 1,000 agents' decoding competes with the coordinator for the same cores.

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
/// Measured pushes, after one warm-up push.
const PUSHES: u64 = 10;
/// The streams count as settled after this long without a message.
const QUIET: Duration = Duration::from_secs(1);
/// Longest wait for the connect storm to settle, and for one push to reach everyone.
const PATIENCE: Duration = Duration::from_secs(60);

/// A stream decoded a model push.
struct Receipt {
    agent: usize,
    version: u64,
    at: Instant,
}

fn main() {
    net::runtime().block_on(run());
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

async fn run() {
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
        (0..AGENTS).map(|h| net::connect(addr, h)).collect();
    let mut agents = Vec::with_capacity(AGENTS);
    while let Some(joined) = connects.join_next().await {
        let (agent, model) = joined.expect("a connect task");
        assert_eq!(model, Some(1), "every agent gets the active model at hello");
        agents.push(agent);
    }
    let connected = start.elapsed();
    println!(
        "push: {AGENTS} streams connected (hello answered with model v1 and thresholds) in {:.2} s",
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

    let mut last = messages.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = messages.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        } else if last_change.elapsed() >= QUIET {
            break;
        }
        assert!(start.elapsed() < connected + PATIENCE, "the streams did not fall quiet");
    }
    println!(
        "push: the connect storm settled {:.2} s after the connect phase: {} threshold re-pushes \
         after the initial ones ({:.0} per stream)",
        (last_change - start - connected).as_secs_f64(),
        threshold_pushes.load(Ordering::Relaxed),
        threshold_pushes.load(Ordering::Relaxed) as f64 / AGENTS as f64,
    );
    println!("push: model push message: {size} bytes encoded");

    let mut totals = Vec::new();
    let mut pooled = Vec::new();
    for version in 2..=2 + PUSHES {
        let mut model = base.clone();
        model.version = version;
        model.training.created_unix_ms = now_unix_ms();
        let start = Instant::now();
        store.put_model(epoch, &model).await.expect("the leader stores a model");
        store.activate(epoch, data::CLASS, version).await.expect("the leader activates it");
        let mut got: Vec<Option<Duration>> = vec![None; AGENTS];
        let mut n = 0;
        while n < AGENTS {
            let r = tokio::time::timeout(PATIENCE, receipts.recv())
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
        let all = latencies[AGENTS - 1];
        let warm_up = version == 2;
        println!(
            "push: v{version}{}: all {AGENTS} streams in {:.1} ms (per stream p50 {:.1} ms, p99 {:.1} ms)",
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
        "push: new model to all {AGENTS} streams: median {:.1} ms (min {:.1} ms, max {:.1} ms) over \
         {PUSHES} pushes",
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
