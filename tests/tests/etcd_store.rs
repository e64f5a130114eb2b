//! The etcd store against a real etcd (Debian's `etcd-server`, started by the harness on free
//! ports; the tests fail saying so if the binary is missing): the conformance suite every store
//! passes, leadership across two stores with fencing, a model larger than an etcd request,
//! samples surviving the store that took them, host registrations lapsing with their
//! coordinator, and watches and leases across an etcd restart and a freeze.
//!
//! No assertion depends on speed: timeouts are generous bounds that only stop a hang.

use std::{
    future::Future,
    net::{Ipv4Addr, TcpListener},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use etcd_client::{GetOptions, SortOrder, SortTarget};
use tokio::{
    sync::broadcast,
    time::{Instant, sleep, timeout, timeout_at},
};
use vmgov_coordinator::{
    store::{
        Change, EtcdConfig, EtcdStore, HostRecord, Store, StoreError, ThresholdRecord, VmRecord,
        conformance,
    },
    train::LabelledSample,
};
use vmgov_proto::{Ratios, RawCounters, ThresholdScope, Thresholds};
use vmgov_tests::etcd::Etcd;

/// Upper bound for anything that should happen "soon".
const BOUND: Duration = Duration::from_secs(30);

fn start_etcd() -> Etcd {
    Etcd::start().unwrap_or_else(|e| panic!("{e}"))
}

fn config(etcd: &Etcd, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        prefix: format!("/vmgov-test/{prefix}/"),
        leader_ttl_s: 2,
        host_ttl_s: 2,
        sample_capacity: 1000,
        request_timeout: Duration::from_secs(3),
        ..EtcdConfig::new([etcd.endpoint()])
    }
}

async fn connect(config: EtcdConfig) -> EtcdStore {
    EtcdStore::connect(config).await.unwrap_or_else(|e| panic!("{e}"))
}

fn threshold(perf: f64) -> ThresholdRecord {
    ThresholdRecord {
        scope: ThresholdScope::Fleet,
        thresholds: Thresholds::new(perf, perf).unwrap_or_else(|e| panic!("{e}")),
        updated_unix_ms: 1,
        updated_by: "etcd_store test".into(),
    }
}

fn sample(id: u64) -> LabelledSample {
    LabelledSample {
        pstate: 1,
        counters: RawCounters {
            timeslice_seconds: 0.01,
            instructions: id,
            cycles: 2 * id + 1,
            vcpus: 2,
            ..RawCounters::default()
        },
        labels: Ratios { perf: 0.9, power: 0.8, throughput: 1.0 },
    }
}

fn host(id: &str) -> HostRecord {
    HostRecord {
        host_id: id.into(),
        hardware_class: "phenom".into(),
        pstates: conformance::model("phenom", 1).pstates,
        agent_version: "0.1.0".into(),
        vms: vec![VmRecord { vm_id: "u1".into(), name: "web".into(), vcpus: 2 }],
        coordinator: "c1".into(),
        connected_unix_ms: 5,
    }
}

/// Waits for a change matching `want`, skipping others.
async fn wait_for(changes: &mut broadcast::Receiver<Change>, want: impl Fn(&Change) -> bool) {
    let deadline = Instant::now() + BOUND;
    loop {
        match timeout_at(deadline, changes.recv()).await {
            Ok(Ok(change)) if want(&change) => return,
            Ok(Ok(_) | Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("the change channel closed"),
            Err(_) => panic!("the expected change did not come within {BOUND:?}"),
        }
    }
}

/// Retries `attempt` until it succeeds (etcd coming back), within [`BOUND`].
async fn eventually<T, F: Future<Output = Result<T, StoreError>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + BOUND;
    loop {
        match attempt().await {
            Ok(t) => return t,
            Err(_) if Instant::now() < deadline => sleep(Duration::from_millis(250)).await,
            Err(e) => panic!("{what} did not succeed within {BOUND:?}: {e}"),
        }
    }
}

/// A plain etcd client, to act behind the stores' backs.
async fn raw_client(etcd: &Etcd) -> etcd_client::Client {
    etcd_client::Client::connect([etcd.endpoint()], None).await.unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_store_passes_the_conformance_suite() {
    let etcd = start_etcd();
    let n = AtomicU32::new(0);
    conformance::run_all(|| {
        let config = config(&etcd, &format!("conformance-{}", n.fetch_add(1, Ordering::Relaxed)));
        async move { connect(config).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_is_fenced_and_the_other_store_leads() {
    let etcd = start_etcd();
    let a = connect(config(&etcd, "fence")).await;
    let b = connect(config(&etcd, "fence")).await;
    let mut a_changes = a.subscribe();

    let la = a.campaign("a", "10.0.0.1:7000").await.unwrap();
    let seen = b.leader().await.unwrap().expect("b sees no leader");
    assert_eq!(
        (seen.id.as_str(), seen.address.as_str(), seen.epoch),
        ("a", "10.0.0.1:7000", la.epoch)
    );
    a.put_threshold(la.epoch, threshold(0.5)).await.unwrap();

    // b campaigns, and waits while a leads.
    let b2 = b.clone();
    let mut campaign = tokio::spawn(async move { b2.campaign("b", "10.0.0.2:7000").await });
    assert!(
        timeout(Duration::from_millis(1500), &mut campaign).await.is_err(),
        "b led while a led"
    );

    // a pauses and its lease expires meanwhile: revoke it behind a's back, as etcd would.
    let mut raw = raw_client(&etcd).await;
    let options = GetOptions::new().with_prefix().with_sort(SortTarget::Create, SortOrder::Ascend);
    let resp = raw.get("/vmgov-test/fence/leader/", Some(options)).await.unwrap();
    let a_key = resp.kvs().first().expect("no leader key");
    assert_eq!(
        u64::try_from(a_key.create_revision()).unwrap(),
        la.epoch,
        "the epoch is the key's create revision"
    );
    raw.lease_revoke(a_key.lease()).await.unwrap();

    let lb = timeout(BOUND, campaign).await.expect("b never led").unwrap().unwrap();
    assert!(lb.epoch > la.epoch, "epochs must grow: {} then {}", la.epoch, lb.epoch);

    // a wakes up: none of its leader-only writes goes through.
    let stale = a.put_threshold(la.epoch, threshold(0.9)).await;
    assert!(
        matches!(stale, Err(StoreError::Fenced { writer, current }) if writer == la.epoch && current == lb.epoch),
        "{stale:?}"
    );
    let model = conformance::model("phenom", 1);
    assert!(matches!(a.put_model(la.epoch, &model).await, Err(StoreError::Fenced { .. })));
    assert!(matches!(
        a.delete_threshold(la.epoch, &ThresholdScope::Fleet).await,
        Err(StoreError::Fenced { .. })
    ));
    assert!(a.model_versions("phenom").await.unwrap().is_empty(), "a fenced model was stored");

    // b's go through, and a hears of them through its watch.
    b.put_model(lb.epoch, &model).await.unwrap();
    assert!(matches!(a.activate(la.epoch, "phenom", 1).await, Err(StoreError::Fenced { .. })));
    let fence = b.activate(lb.epoch, "phenom", 1).await.unwrap();
    assert_eq!(fence.epoch, lb.epoch);
    wait_for(&mut a_changes, |c| {
        matches!(c, Change::ActiveModel { class, version: 1, fence: f } if class == "phenom" && *f == fence)
    })
    .await;
    let (entries, _) = a.thresholds().await.unwrap();
    assert!((entries[0].thresholds.perf() - 0.5).abs() < 1e-12, "a fenced write changed the entry");
    assert_eq!(a.leader().await.unwrap().map(|l| l.id), Some("b".into()));

    // b resigns; a campaigns again and leads with a larger epoch, and b is the stale one now.
    b.resign(&lb).await.unwrap();
    let la2 =
        timeout(BOUND, a.campaign("a", "10.0.0.1:7000")).await.expect("a never led again").unwrap();
    assert!(la2.epoch > lb.epoch, "epochs must grow: {} then {}", lb.epoch, la2.epoch);
    assert!(matches!(
        b.put_threshold(lb.epoch, threshold(0.1)).await,
        Err(StoreError::Fenced { .. })
    ));
    a.put_threshold(la2.epoch, threshold(0.6)).await.unwrap();
    let fence2 = a.activate(la2.epoch, "phenom", 1).await.unwrap();
    assert!(fence2 > fence, "fences must grow: {fence:?} then {fence2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_an_etcd_request_round_trips_in_chunks() {
    let etcd = start_etcd();
    let a = connect(config(&etcd, "big")).await;
    let leader = a.campaign("a", "x").await.unwrap();
    let mut big = conformance::model("epyc", 1);
    // etcd refuses requests over 1.5 MiB: this model is more than twice that.
    big.training.notes = "the quick brown fox jumps over the lazy dog ".repeat(80_000);
    assert!(big.training.notes.len() > 3 << 20);
    a.put_model(leader.epoch, &big).await.unwrap();

    let b = connect(config(&etcd, "big")).await;
    let back = b.model("epyc", 1).await.unwrap().expect("the model is not there");
    assert!(back == big, "the model changed on its way through etcd");
    assert_eq!(b.model_versions("epyc").await.unwrap(), vec![1]);

    // It is in several pieces, and a refused second write of the version leaves none behind.
    assert!(matches!(a.put_model(leader.epoch, &big).await, Err(StoreError::VersionExists { .. })));
    let mut raw = raw_client(&etcd).await;
    let options = GetOptions::new().with_prefix().with_keys_only();
    let pieces = raw.get("/vmgov-test/big/model-chunks/", Some(options)).await.unwrap();
    assert!(pieces.kvs().len() >= 7, "{} pieces", pieces.kvs().len());
    let uploads: std::collections::BTreeSet<_> = pieces
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().rsplit_once('/').unwrap().0.to_owned())
        .collect();
    assert_eq!(uploads.len(), 1, "pieces of a refused write were left: {uploads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_survive_the_store_that_took_them() {
    let etcd = start_etcd();
    let config = EtcdConfig { sample_capacity: 500, sample_chunk: 16, ..config(&etcd, "samples") };
    {
        let a = connect(config.clone()).await;
        for batch in 0..10 {
            let samples = (0..100).map(|i| sample(batch * 100 + i)).collect();
            assert!(a.append_samples("phenom", "h1", batch, samples).await.unwrap());
        }
        // A batch far bigger than one txn may carry (8 chunks of 16) goes in several.
        let samples = (1000..4000).map(sample).collect();
        assert!(a.append_samples("phenom", "h2", 1, samples).await.unwrap());
        // a goes away without any cleanup.
    }
    let b = connect(config).await;
    assert_eq!(b.samples_seen("phenom").await.unwrap(), 4000);
    let kept = b.samples("phenom").await.unwrap();
    assert_eq!(kept.len(), 500, "the reservoir is bounded");
    let ids: std::collections::BTreeSet<u64> =
        kept.iter().map(|s| s.counters.instructions).collect();
    assert_eq!(ids.len(), 500, "a sample is retained at most once");
    assert!(
        kept.iter().all(|s| s.counters.cycles == 2 * s.counters.instructions + 1 && s.pstate == 1)
    );
    // Each of the 4000 is kept with probability 1/8: about 125 old ones and 375 new ones.
    let old = ids.iter().filter(|&&i| i < 1000).count();
    assert!((50..=250).contains(&old), "{old} of 500 retained samples are from the first 1000");

    // Re-sent batches are recognised by another store too.
    let again = (0..100).map(|i| sample(300 + i)).collect();
    assert!(!b.append_samples("phenom", "h1", 3, again).await.unwrap());
    assert!(!b.append_samples("phenom", "h2", 1, Vec::new()).await.unwrap());
    assert_eq!(b.samples_seen("phenom").await.unwrap(), 4000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_registered_by_a_dead_coordinator_lapses() {
    let etcd = start_etcd();
    let b = connect(config(&etcd, "hosts")).await;
    let mut changes = b.subscribe();
    {
        let a = connect(config(&etcd, "hosts")).await;
        a.put_host(host("h1")).await.unwrap();
        wait_for(&mut changes, |c| *c == Change::Hosts).await;
        // Its lease (TTL 2 s) is kept alive while a lives.
        sleep(Duration::from_secs(5)).await;
        assert_eq!(
            b.hosts().await.unwrap(),
            vec![host("h1")],
            "the registration lapsed while a lived"
        );
        // a dies without removing the host.
    }
    let deadline = Instant::now() + BOUND;
    while !b.hosts().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the host is still registered {BOUND:?} after a went");
        sleep(Duration::from_millis(250)).await;
    }
    wait_for(&mut changes, |c| *c == Change::Hosts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_leases_survive_an_etcd_restart() {
    let mut etcd = start_etcd();
    let watcher = connect(config(&etcd, "restart")).await;
    let leader = connect(config(&etcd, "restart")).await;
    let mut changes = watcher.subscribe();
    let l = leader.campaign("a", "x").await.unwrap();
    leader.put_host(host("h1")).await.unwrap();
    let g1 = leader.put_threshold(l.epoch, threshold(0.5)).await.unwrap();
    wait_for(&mut changes, |c| *c == Change::Thresholds(g1)).await;

    tokio::task::block_in_place(|| etcd.restart()).unwrap_or_else(|e| panic!("{e}"));

    // The same leadership writes on (its lease survived), and the watcher, whose stream ended
    // with the old process, hears of it.
    let g2 =
        eventually("a write after the restart", || leader.put_threshold(l.epoch, threshold(0.6)))
            .await;
    assert!(g2 > g1);
    wait_for(&mut changes, |c| *c == Change::Thresholds(g2)).await;

    // Longer than the leases' TTL (2 s): only leases renewed since the restart are still there.
    sleep(Duration::from_secs(5)).await;
    let g3 = leader.put_threshold(l.epoch, threshold(0.7)).await.unwrap();
    wait_for(&mut changes, |c| *c == Change::Thresholds(g3)).await;
    assert_eq!(watcher.hosts().await.unwrap(), vec![host("h1")], "the host lease was not renewed");
    let (entries, generation) = watcher.thresholds().await.unwrap();
    assert_eq!(generation, g3);
    assert!((entries[0].thresholds.perf() - 0.7).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_makes_calls_fail_instead_of_hanging() {
    let etcd = start_etcd();
    let config = EtcdConfig {
        leader_ttl_s: 20,
        request_timeout: Duration::from_secs(2),
        ..config(&etcd, "frozen")
    };
    let store = connect(config.clone()).await;
    let watcher = connect(config).await;
    let mut changes = watcher.subscribe();
    let l = store.campaign("a", "x").await.unwrap();

    etcd.freeze().unwrap();
    let frozen = timeout(BOUND, store.thresholds()).await.expect("a call to a frozen etcd hung");
    assert!(matches!(frozen, Err(StoreError::Unavailable(_))), "{frozen:?}");
    // Long enough for the HTTP/2 keep-alive (1 s + 1 s) to end the watch streams.
    sleep(Duration::from_secs(3)).await;
    etcd.thaw().unwrap();

    let g =
        eventually("a write after the thaw", || store.put_threshold(l.epoch, threshold(0.4))).await;
    wait_for(&mut changes, |c| *c == Change::Thresholds(g)).await;
}

#[tokio::test]
async fn connecting_where_no_etcd_listens_fails_naming_the_endpoint() {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = EtcdConfig {
        request_timeout: Duration::from_secs(2),
        ..EtcdConfig::new([endpoint.clone()])
    };
    let err = timeout(BOUND, EtcdStore::connect(config)).await.expect("connect hung").unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
}
