//! The in-memory store: the embedded default for a single coordinator. It is a real backend
//! with the same semantics as etcd's (fencing, immutable versions, idempotent batches, bounded
//! samples), so a coordinator behaves the same on either; it just forgets everything on exit.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{Mutex, broadcast};
use vmgov_proto::{EnergyModel, ThresholdScope};

use super::{
    Change, Fence, HostRecord, LeaderInfo, Leadership, Store, StoreError, ThresholdRecord,
};
use crate::train::LabelledSample;

/// Batch ids per host remembered below the highest seen; older ones count as already stored
/// (agents allocate ids in increasing order and re-send only what was not acknowledged).
const BATCH_WINDOW: u64 = 1 << 16;

#[derive(Debug, Default)]
struct Seen {
    high: u64,
    ids: BTreeSet<u64>,
}

impl Seen {
    /// Records `id`; false if it was seen already.
    fn insert(&mut self, id: u64) -> bool {
        if id + BATCH_WINDOW <= self.high {
            return false;
        }
        if !self.ids.insert(id) {
            return false;
        }
        self.high = self.high.max(id);
        let floor = self.high.saturating_sub(BATCH_WINDOW);
        while self.ids.first().is_some_and(|&f| f < floor) {
            self.ids.pop_first();
        }
        true
    }
}

/// Reservoir sampling (Vitter's algorithm R): every sample ever offered has the same chance to
/// be retained, so a class's old data cannot crowd out new behaviour and memory stays bounded.
#[derive(Debug)]
struct Reservoir {
    capacity: usize,
    seen: u64,
    items: Vec<LabelledSample>,
}

impl Reservoir {
    fn offer(&mut self, s: LabelledSample, rng: &mut ChaCha8Rng) {
        self.seen += 1;
        if self.items.len() < self.capacity {
            self.items.push(s);
        } else {
            let j = rng.random_range(0..self.seen);
            if let Ok(j) = usize::try_from(j)
                && j < self.capacity
            {
                self.items[j] = s;
            }
        }
    }
}

#[derive(Debug)]
struct State {
    epoch: u64,
    leader: Option<LeaderInfo>,
    thresholds: BTreeMap<ThresholdScope, ThresholdRecord>,
    threshold_generation: u64,
    models: BTreeMap<String, BTreeMap<u64, EnergyModel>>,
    active: HashMap<String, (u64, Fence, Vec<u64>)>,
    model_generation: HashMap<String, u64>,
    hosts: BTreeMap<String, HostRecord>,
    seen: HashMap<String, Seen>,
    samples: HashMap<String, Reservoir>,
    rng: ChaCha8Rng,
}

/// The in-memory store.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Change>,
    capacity: usize,
}

impl MemoryStore {
    /// A store retaining at most `sample_capacity` samples per class.
    pub fn new(sample_capacity: usize) -> Self {
        let (changes, _) = broadcast::channel(1024);
        Self {
            state: Arc::new(Mutex::new(State {
                epoch: 0,
                leader: None,
                thresholds: BTreeMap::new(),
                threshold_generation: 0,
                models: BTreeMap::new(),
                active: HashMap::new(),
                model_generation: HashMap::new(),
                hosts: BTreeMap::new(),
                seen: HashMap::new(),
                samples: HashMap::new(),
                rng: ChaCha8Rng::seed_from_u64(1),
            })),
            changes,
            capacity: sample_capacity.max(1),
        }
    }

    fn notify(&self, change: Change) {
        // Nobody listening is fine.
        let _ = self.changes.send(change);
    }
}

fn fenced(state: &State, writer: u64) -> Result<(), StoreError> {
    if writer == state.epoch && state.leader.is_some() {
        Ok(())
    } else {
        Err(StoreError::Fenced { writer, current: state.epoch })
    }
}

impl Store for MemoryStore {
    async fn campaign(&self, id: &str, address: &str) -> Result<Leadership, StoreError> {
        let mut s = self.state.lock().await;
        s.epoch += 1;
        s.leader = Some(LeaderInfo { id: id.into(), address: address.into(), epoch: s.epoch });
        let leadership = Leadership { epoch: s.epoch, id: id.into() };
        drop(s);
        self.notify(Change::Leader);
        Ok(leadership)
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        Ok(self.state.lock().await.leader.clone())
    }

    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        let mut s = self.state.lock().await;
        if s.epoch == leadership.epoch {
            s.leader = None;
        }
        drop(s);
        self.notify(Change::Leader);
        Ok(())
    }

    async fn put_threshold(&self, epoch: u64, record: ThresholdRecord) -> Result<u64, StoreError> {
        let mut s = self.state.lock().await;
        fenced(&s, epoch)?;
        s.thresholds.insert(record.scope.clone(), record);
        s.threshold_generation += 1;
        let g = s.threshold_generation;
        drop(s);
        self.notify(Change::Thresholds(g));
        Ok(g)
    }

    async fn delete_threshold(
        &self,
        epoch: u64,
        scope: &ThresholdScope,
    ) -> Result<Option<ThresholdRecord>, StoreError> {
        let mut s = self.state.lock().await;
        fenced(&s, epoch)?;
        let removed = s.thresholds.remove(scope);
        if removed.is_some() {
            s.threshold_generation += 1;
            let g = s.threshold_generation;
            drop(s);
            self.notify(Change::Thresholds(g));
        }
        Ok(removed)
    }

    async fn thresholds(&self) -> Result<(Vec<ThresholdRecord>, u64), StoreError> {
        let s = self.state.lock().await;
        Ok((s.thresholds.values().cloned().collect(), s.threshold_generation))
    }

    async fn put_model(&self, epoch: u64, model: &EnergyModel) -> Result<(), StoreError> {
        let mut s = self.state.lock().await;
        fenced(&s, epoch)?;
        let versions = s.models.entry(model.hardware_class.clone()).or_default();
        if versions.contains_key(&model.version) {
            return Err(StoreError::VersionExists {
                class: model.hardware_class.clone(),
                version: model.version,
            });
        }
        versions.insert(model.version, model.clone());
        Ok(())
    }

    async fn model(&self, class: &str, version: u64) -> Result<Option<EnergyModel>, StoreError> {
        Ok(self.state.lock().await.models.get(class).and_then(|v| v.get(&version)).cloned())
    }

    async fn model_versions(&self, class: &str) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .state
            .lock()
            .await
            .models
            .get(class)
            .map(|v| v.keys().copied().collect())
            .unwrap_or_default())
    }

    async fn model_classes(&self) -> Result<Vec<String>, StoreError> {
        Ok(self.state.lock().await.models.keys().cloned().collect())
    }

    async fn activate(&self, epoch: u64, class: &str, version: u64) -> Result<Fence, StoreError> {
        let mut s = self.state.lock().await;
        fenced(&s, epoch)?;
        if !s.models.get(class).is_some_and(|v| v.contains_key(&version)) {
            return Err(StoreError::NoSuchModel { class: class.into(), version });
        }
        let g = s.model_generation.entry(class.into()).or_default();
        *g += 1;
        let fence = Fence { epoch, generation: *g };
        let history = match s.active.remove(class) {
            Some((previous, _, mut history)) => {
                history.push(previous);
                history
            }
            None => Vec::new(),
        };
        s.active.insert(class.into(), (version, fence, history));
        drop(s);
        self.notify(Change::ActiveModel { class: class.into(), version, fence });
        Ok(fence)
    }

    async fn active(&self, class: &str) -> Result<Option<(u64, Fence, Vec<u64>)>, StoreError> {
        Ok(self.state.lock().await.active.get(class).cloned())
    }

    async fn put_host(&self, record: HostRecord) -> Result<(), StoreError> {
        self.state.lock().await.hosts.insert(record.host_id.clone(), record);
        self.notify(Change::Hosts);
        Ok(())
    }

    async fn remove_host(&self, host_id: &str) -> Result<(), StoreError> {
        let removed = self.state.lock().await.hosts.remove(host_id).is_some();
        if removed {
            self.notify(Change::Hosts);
        }
        Ok(())
    }

    async fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        Ok(self.state.lock().await.hosts.values().cloned().collect())
    }

    async fn append_samples(
        &self,
        class: &str,
        host_id: &str,
        batch_id: u64,
        samples: Vec<LabelledSample>,
    ) -> Result<bool, StoreError> {
        let mut guard = self.state.lock().await;
        let s = &mut *guard;
        if !s.seen.entry(host_id.into()).or_default().insert(batch_id) {
            return Ok(false);
        }
        let capacity = self.capacity;
        let reservoir = s.samples.entry(class.into()).or_insert_with(|| Reservoir {
            capacity,
            seen: 0,
            items: Vec::new(),
        });
        for sample in samples {
            reservoir.offer(sample, &mut s.rng);
        }
        Ok(true)
    }

    async fn samples(&self, class: &str) -> Result<Vec<LabelledSample>, StoreError> {
        Ok(self.state.lock().await.samples.get(class).map(|r| r.items.clone()).unwrap_or_default())
    }

    async fn samples_seen(&self, class: &str) -> Result<u64, StoreError> {
        Ok(self.state.lock().await.samples.get(class).map_or(0, |r| r.seen))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    #[tokio::test]
    async fn the_memory_store_passes_the_conformance_suite() {
        conformance::run_all(|| async { MemoryStore::new(1000) }).await;
    }

    #[test]
    fn batch_ids_are_remembered_within_the_window() {
        let mut seen = Seen::default();
        assert!(seen.insert(5));
        assert!(!seen.insert(5));
        assert!(seen.insert(3), "out of order but new");
        assert!(seen.insert(BATCH_WINDOW + 100));
        assert!(!seen.insert(2), "far below the window counts as stored");
        assert!(seen.ids.len() <= 3);
    }
}
