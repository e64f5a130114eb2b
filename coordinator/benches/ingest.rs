//! Sample ingest rate of one coordinator: 100 agent streams at once over loopback, each sending
//! 50 batches of 100 labelled samples (500,000 samples per round) and counting the acks.
//!
//! Setup, untimed: a real coordinator (`MemoryStore` keeping 1,000,000 samples per class, as the
//! binary's default) serving on 127.0.0.1, and 100 real tonic `AgentService.Connect` streams,
//! each on its own TCP connection, each with a valid hello (same class, the Phenom 9500's five
//! P-states, distinct host ids) answered by its initial threshold push. Samples carry realistic
//! raw counters and labels (`support/data.rs`), so the coordinator stores every one of them.
//!
//! Timed: one round. Every stream pipelines its 50 batches (distinct ids, increasing across
//! rounds, so none is a duplicate) through a 16-message queue while it reads acks, and the round
//! ends when every stream has all 50 acks. Criterion reports the round time and the rate in
//! elements/s, which are samples acknowledged per second. After the runs the bench checks that
//! the store accepted exactly the samples sent.
//!
//! Everything is in one process on one multi-thread tokio runtime with a worker per core: the
//! agents' encoding competes with the coordinator for the same cores, so the figure is a lower
//! bound on what a coordinator with the cores to itself ingests.

#[path = "support/data.rs"]
mod data;
#[path = "support/net.rs"]
mod net;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tokio::task::JoinSet;
use vmgov_coordinator::store::Store;
use vmgov_proto::pb;

const STREAMS: usize = 100;
const BATCHES: u64 = 50;
const PER_BATCH: usize = 100;
const PER_ROUND: u64 = STREAMS as u64 * BATCHES * PER_BATCH as u64;
/// Distinct batch contents; batch `id` carries template `id % TEMPLATES`.
const TEMPLATES: usize = 50;
const WORKLOADS: [&str; 4] = ["mem-stream-4", "445.gobmk", "httperf-200", "fio-randread"];

/// The sample batches' contents, generated once.
fn templates() -> Vec<Vec<pb::Sample>> {
    let samples = data::samples(TEMPLATES * PER_BATCH, 11, data::NOISE);
    let table = data::pstates();
    samples
        .chunks(PER_BATCH)
        .enumerate()
        .map(|(t, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, s)| pb::Sample {
                    vm_id: format!("00000000-0000-4000-8000-0000000{t:05x}"),
                    start_unix_ns: 1_767_225_600_000_000_000
                        + (t * PER_BATCH + i) as u64 * 10_000_000,
                    pstate_index: u32::try_from(s.pstate).expect("five P-states"),
                    frequency_hz: table.frequency_hz(s.pstate).expect("a P-state of the table"),
                    counters: Some((&s.counters).into()),
                    labels: Some((&s.labels).into()),
                    workload: WORKLOADS[t % WORKLOADS.len()].into(),
                })
                .collect()
        })
        .collect()
}

/// An agent and the next batch id it allocates.
struct Sender {
    agent: net::Agent,
    next_batch: u64,
}

impl Sender {
    /// Sends `BATCHES` batches while counting their acks; returns when all are acknowledged.
    async fn round(mut self, templates: Arc<Vec<Vec<pb::Sample>>>) -> Self {
        let first = self.next_batch;
        let last = first + BATCHES;
        self.next_batch = last;
        let net::Agent { tx, inbound } = &mut self.agent;
        let send = async {
            for id in first..last {
                let t = usize::try_from(id).expect("small ids") % TEMPLATES;
                let batch = pb::SampleBatch { batch_id: id, samples: templates[t].clone() };
                tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Samples(batch)) })
                    .await
                    .expect("the outgoing stream stays open");
            }
        };
        let acks = async {
            let mut acked = 0;
            while acked < BATCHES {
                let msg = inbound.message().await.expect("the stream stays up").expect("acks");
                if let Some(pb::coordinator_message::Msg::Ack(ack)) = msg.msg {
                    for id in ack.batch_ids {
                        assert!(
                            (first..last).contains(&id),
                            "ack of batch {id} outside this round"
                        );
                        acked += 1;
                    }
                }
            }
        };
        tokio::join!(send, acks);
        self
    }
}

/// One round over every stream; returns its wall time.
async fn round(senders: &mut Vec<Sender>, templates: &Arc<Vec<Vec<pb::Sample>>>) -> Duration {
    let start = Instant::now();
    let mut tasks: JoinSet<Sender> =
        senders.drain(..).map(|s| s.round(Arc::clone(templates))).collect();
    while let Some(s) = tasks.join_next().await {
        senders.push(s.expect("a stream's task"));
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = net::runtime();
    let templates = Arc::new(templates());
    let (running, mut senders) = rt.block_on(async {
        let running = net::start(1_000_000).await;
        let addr = running.addr;
        let mut connects: JoinSet<net::Agent> =
            (0..STREAMS).map(|h| async move { net::connect(addr, h).await.0 }).collect();
        let mut senders = Vec::with_capacity(STREAMS);
        while let Some(agent) = connects.join_next().await {
            senders.push(Sender { agent: agent.expect("a connect task"), next_batch: 1 });
        }
        (running, senders)
    });

    let mut rounds = 0_u64;
    let mut group = c.benchmark_group("ingest");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements(PER_ROUND));
    group.bench_function("100-streams-50-batches-100-samples", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += round(&mut senders, &templates).await;
                    rounds += 1;
                }
                total
            })
        });
    });
    group.finish();

    rt.block_on(async {
        let seen = running
            .coordinator
            .shared()
            .store
            .samples_seen(data::CLASS)
            .await
            .expect("the store answers");
        assert_eq!(seen, rounds * PER_ROUND, "every sample sent was stored once");
        drop(senders);
        running.stop().await;
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
