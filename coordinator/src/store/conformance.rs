//! The behaviour every [`Store`] backend must have, as one suite each backend runs against a
//! fresh instance of itself: the in-memory store in its unit tests, the etcd store against a
//! real etcd. Each check panics with what went wrong.

use std::future::Future;

use vmgov_proto::{
    EnergyModel, Feature, LinearFit, PState, PStateModel, PStateTable, Ratios, RawCounters,
    ThresholdScope, Thresholds, model::TrainingInfo,
};

use super::{Change, HostRecord, Store, StoreError, ThresholdRecord, VmRecord};
use crate::train::LabelledSample;

/// A small valid model of `class`, version `version`.
pub fn model(class: &str, version: u64) -> EnergyModel {
    let table = PStateTable::new(vec![PState::new(1e9), PState::new(2e9)])
        .unwrap_or_else(|e| panic!("{e}"));
    let fit = |k: f64| LinearFit { intercept: k, coefficients: vec![0.0; 8] };
    EnergyModel {
        hardware_class: class.into(),
        version,
        pstates: table.clone(),
        features: Feature::REPORT.to_vec(),
        per_pstate: table
            .as_slice()
            .iter()
            .map(|p| PStateModel {
                frequency_hz: p.frequency_hz,
                perf: fit(0.5),
                power: fit(0.4),
                throughput: fit(1.0),
            })
            .collect(),
        training: TrainingInfo { sample_count: version, ..TrainingInfo::default() },
    }
}

fn sample(i: u64) -> LabelledSample {
    LabelledSample {
        pstate: 0,
        counters: RawCounters {
            timeslice_seconds: 0.01,
            instructions: i + 1,
            vcpus: 1,
            ..RawCounters::default()
        },
        labels: Ratios { perf: 1.0, power: 1.0, throughput: 1.0 },
    }
}

fn threshold(scope: ThresholdScope, perf: f64) -> ThresholdRecord {
    ThresholdRecord {
        scope,
        thresholds: Thresholds::new(perf, perf).unwrap_or_else(|e| panic!("{e}")),
        updated_unix_ms: 1,
        updated_by: "conformance".into(),
    }
}

/// Runs every check, each on a fresh store from `make`.
pub async fn run_all<S: Store, F: Future<Output = S>>(make: impl Fn() -> F) {
    leadership_fences_writes(make().await).await;
    thresholds_round_trip(make().await).await;
    models_are_immutable_and_activation_keeps_history(make().await).await;
    batches_are_stored_once(make().await).await;
    hosts_register_and_go(make().await).await;
}

/// A deposed leader's writes are refused; the new leader's epoch is larger.
pub async fn leadership_fences_writes<S: Store>(store: S) {
    let first = store.campaign("a", "127.0.0.1:1").await.unwrap_or_else(|e| panic!("{e}"));
    let leader = store
        .leader()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no leader"));
    assert_eq!((leader.id.as_str(), leader.epoch), ("a", first.epoch));
    store
        .put_threshold(first.epoch, threshold(ThresholdScope::Fleet, 0.5))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    store.resign(&first).await.unwrap_or_else(|e| panic!("{e}"));
    let second = store.campaign("b", "127.0.0.1:2").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(second.epoch > first.epoch, "epochs must grow: {} then {}", first.epoch, second.epoch);
    let stale = store.put_threshold(first.epoch, threshold(ThresholdScope::Fleet, 0.9)).await;
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "a deposed leader wrote: {stale:?}");
    assert!(matches!(
        store.put_model(first.epoch, &model("c", 1)).await,
        Err(StoreError::Fenced { .. })
    ));
    let (entries, _) = store.thresholds().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        (entries[0].thresholds.perf() - 0.5).abs() < 1e-12,
        "the fenced write changed the entry"
    );
}

/// Thresholds set, read, deleted; each change bumps the generation and is announced.
pub async fn thresholds_round_trip<S: Store>(store: S) {
    let mut changes = store.subscribe();
    let l = store.campaign("a", "x").await.unwrap_or_else(|e| panic!("{e}"));
    let g1 = store
        .put_threshold(l.epoch, threshold(ThresholdScope::Fleet, 0.4))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let g2 = store
        .put_threshold(l.epoch, threshold(ThresholdScope::Vm("vm-1".into()), 0.7))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(g2 > g1);
    let (entries, g) = store.thresholds().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(g, g2);
    assert_eq!(entries.len(), 2);
    let removed = store
        .delete_threshold(l.epoch, &ThresholdScope::Fleet)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(removed.is_some_and(|r| (r.thresholds.perf() - 0.4).abs() < 1e-12));
    assert!(
        store
            .delete_threshold(l.epoch, &ThresholdScope::Fleet)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .is_none()
    );
    let mut saw = Vec::new();
    while let Ok(c) = changes.try_recv() {
        saw.push(c);
    }
    assert!(saw.iter().filter(|c| matches!(c, Change::Thresholds(_))).count() >= 3, "{saw:?}");
}

/// Versions cannot be overwritten; activation is fenced, ordered and remembers history.
pub async fn models_are_immutable_and_activation_keeps_history<S: Store>(store: S) {
    let l = store.campaign("a", "x").await.unwrap_or_else(|e| panic!("{e}"));
    for v in 1..=3 {
        store.put_model(l.epoch, &model("phenom", v)).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(matches!(
        store.put_model(l.epoch, &model("phenom", 2)).await,
        Err(StoreError::VersionExists { .. })
    ));
    assert_eq!(
        store.model_versions("phenom").await.unwrap_or_else(|e| panic!("{e}")),
        vec![1, 2, 3]
    );
    assert_eq!(
        store.model_classes().await.unwrap_or_else(|e| panic!("{e}")),
        vec!["phenom".to_owned()]
    );
    let back = store
        .model("phenom", 2)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("no v2"));
    assert_eq!(back, model("phenom", 2));
    assert!(matches!(
        store.activate(l.epoch, "phenom", 9).await,
        Err(StoreError::NoSuchModel { .. })
    ));
    let f1 = store.activate(l.epoch, "phenom", 1).await.unwrap_or_else(|e| panic!("{e}"));
    let f3 = store.activate(l.epoch, "phenom", 3).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(f3 > f1);
    let (active, fence, history) = store
        .active("phenom")
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("none active"));
    assert_eq!((active, fence, history), (3, f3, vec![1]));
    assert!(store.active("epyc").await.unwrap_or_else(|e| panic!("{e}")).is_none());
}

/// A batch re-sent after a reconnect is stored once; the reservoir stays bounded.
pub async fn batches_are_stored_once<S: Store>(store: S) {
    let batch: Vec<_> = (0..10).map(sample).collect();
    assert!(
        store
            .append_samples("phenom", "h1", 7, batch.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        !store
            .append_samples("phenom", "h1", 7, batch.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        store.append_samples("phenom", "h2", 7, batch).await.unwrap_or_else(|e| panic!("{e}")),
        "ids are per host"
    );
    assert_eq!(store.samples("phenom").await.unwrap_or_else(|e| panic!("{e}")).len(), 20);
    assert_eq!(store.samples_seen("phenom").await.unwrap_or_else(|e| panic!("{e}")), 20);
    for id in 100..300 {
        let batch: Vec<_> = (0..10).map(|i| sample(id * 10 + i)).collect();
        store.append_samples("phenom", "h1", id, batch).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let kept = store.samples("phenom").await.unwrap_or_else(|e| panic!("{e}")).len();
    assert!((1000..=2020).contains(&kept), "the reservoir holds {kept}");
    assert_eq!(store.samples_seen("phenom").await.unwrap_or_else(|e| panic!("{e}")), 2020);
    assert!(store.samples("epyc").await.unwrap_or_else(|e| panic!("{e}")).is_empty());
}

/// Hosts come and go.
pub async fn hosts_register_and_go<S: Store>(store: S) {
    let record = HostRecord {
        host_id: "h1".into(),
        hardware_class: "phenom".into(),
        pstates: model("phenom", 1).pstates,
        agent_version: "0.1.0".into(),
        vms: vec![VmRecord { vm_id: "u1".into(), name: "web".into(), vcpus: 2 }],
        coordinator: "c1".into(),
        connected_unix_ms: 5,
    };
    store.put_host(record.clone()).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.hosts().await.unwrap_or_else(|e| panic!("{e}")), vec![record]);
    store.remove_host("h1").await.unwrap_or_else(|e| panic!("{e}"));
    assert!(store.hosts().await.unwrap_or_else(|e| panic!("{e}")).is_empty());
}
