//! Labelled samples waiting for the coordinator: sealed into batches with ids, kept until the
//! coordinator acknowledges them, re-sent after every reconnect. Batches beyond what memory
//! holds spill to files in the cache directory, so an outage shorter than the buffer loses
//! nothing; past that, the oldest spilled batches are dropped and counted.
//!
//! Batch ids are unique per host across agent restarts without persisted state: an id is at
//! least the current time in milliseconds × 1000, and above the previous id.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use prost::Message;
use thiserror::Error;
use vmgov_proto::pb;

/// Why the buffer could not spill or reload.
#[derive(Debug, Error)]
#[error("sample spill {path}")]
pub struct SpillError {
    /// The file.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// Limits of the buffer.
#[derive(Debug, Clone)]
pub struct BufferConfig {
    /// Samples per batch.
    pub batch_size: usize,
    /// Unacknowledged batches kept in memory.
    pub memory_batches: usize,
    /// Unacknowledged batches kept on disk beyond those.
    pub spill_batches: usize,
    /// Where spilled batches go (none: no spilling, the oldest are dropped).
    pub spill_dir: Option<PathBuf>,
}

/// The buffer.
#[derive(Debug)]
pub struct SampleBuffer {
    config: BufferConfig,
    open: Vec<pb::Sample>,
    memory: BTreeMap<u64, pb::SampleBatch>,
    spilled: BTreeMap<u64, PathBuf>,
    last_id: u64,
    /// Batches dropped because both memory and disk were full.
    pub lost_batches: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

impl SampleBuffer {
    /// An empty buffer; batches spilled by an earlier run in `spill_dir` are picked up again.
    pub fn new(config: BufferConfig) -> Result<Self, SpillError> {
        let mut spilled = BTreeMap::new();
        if let Some(dir) = &config.spill_dir {
            std::fs::create_dir_all(dir)
                .map_err(|source| SpillError { path: dir.clone(), source })?;
            let entries = std::fs::read_dir(dir)
                .map_err(|source| SpillError { path: dir.clone(), source })?;
            for entry in entries.flatten() {
                let path = entry.path();
                if let Some(id) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("batch-"))
                    .and_then(|n| n.strip_suffix(".pb"))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    spilled.insert(id, path);
                }
            }
        }
        let last_id = spilled.keys().next_back().copied().unwrap_or(0);
        Ok(Self {
            config,
            open: Vec::new(),
            memory: BTreeMap::new(),
            spilled,
            last_id,
            lost_batches: 0,
        })
    }

    /// Adds a sample; returns a sealed batch to send when one is full.
    pub fn push(&mut self, sample: pb::Sample) -> Result<Option<pb::SampleBatch>, SpillError> {
        self.open.push(sample);
        if self.open.len() >= self.config.batch_size.max(1) { self.seal() } else { Ok(None) }
    }

    /// Seals what is open into a batch (if anything), keeps it until acknowledged, returns it.
    pub fn seal(&mut self) -> Result<Option<pb::SampleBatch>, SpillError> {
        if self.open.is_empty() {
            return Ok(None);
        }
        let id = (self.last_id + 1).max(now_ms().saturating_mul(1000));
        self.last_id = id;
        let batch = pb::SampleBatch { batch_id: id, samples: std::mem::take(&mut self.open) };
        self.memory.insert(id, batch.clone());
        self.make_room()?;
        Ok(Some(batch))
    }

    fn make_room(&mut self) -> Result<(), SpillError> {
        while self.memory.len() > self.config.memory_batches {
            let Some((id, batch)) = self.memory.pop_first() else { break };
            match &self.config.spill_dir {
                Some(dir) if self.config.spill_batches > 0 => {
                    let path = dir.join(format!("batch-{id}.pb"));
                    std::fs::write(&path, batch.encode_to_vec())
                        .map_err(|source| SpillError { path: path.clone(), source })?;
                    self.spilled.insert(id, path);
                    while self.spilled.len() > self.config.spill_batches {
                        if let Some((_, oldest)) = self.spilled.pop_first() {
                            let _ = std::fs::remove_file(oldest);
                            self.lost_batches += 1;
                        }
                    }
                }
                _ => self.lost_batches += 1,
            }
        }
        Ok(())
    }

    /// The coordinator has stored these batches.
    pub fn ack(&mut self, ids: &[u64]) {
        for id in ids {
            self.memory.remove(id);
            if let Some(path) = self.spilled.remove(id) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// Every unacknowledged batch, oldest first (spilled ones read back from disk).
    pub fn unacked(&self) -> Result<Vec<pb::SampleBatch>, SpillError> {
        let mut out = Vec::with_capacity(self.spilled.len() + self.memory.len());
        for path in self.spilled.values() {
            let bytes =
                std::fs::read(path).map_err(|source| SpillError { path: path.clone(), source })?;
            match pb::SampleBatch::decode(bytes.as_slice()) {
                Ok(b) => out.push(b),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "skipping a corrupt spilled batch")
                }
            }
        }
        out.extend(self.memory.values().cloned());
        out.sort_by_key(|b| b.batch_id);
        Ok(out)
    }

    /// Unacknowledged batches, in memory and on disk.
    pub fn pending(&self) -> usize {
        self.memory.len() + self.spilled.len()
    }
}

/// The spill directory inside a cache directory.
pub fn spill_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("spill")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample(i: u64) -> pb::Sample {
        pb::Sample { vm_id: format!("vm{i}"), pstate_index: 1, ..pb::Sample::default() }
    }

    fn config(dir: Option<PathBuf>) -> BufferConfig {
        BufferConfig { batch_size: 3, memory_batches: 2, spill_batches: 100, spill_dir: dir }
    }

    #[test]
    fn batches_are_kept_until_acknowledged_and_spill_beyond_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = SampleBuffer::new(config(Some(spill_dir(dir.path())))).unwrap();
        let mut sent = Vec::new();
        for i in 0..30 {
            if let Some(batch) = b.push(sample(i)).unwrap() {
                sent.push(batch.batch_id);
            }
        }
        assert_eq!(sent.len(), 10);
        assert!(sent.windows(2).all(|w| w[0] < w[1]), "ids increase");
        assert_eq!(b.pending(), 10);
        assert_eq!(
            std::fs::read_dir(spill_dir(dir.path())).unwrap().count(),
            8,
            "all but two spilled"
        );
        let again = b.unacked().unwrap();
        assert_eq!(again.iter().map(|b| b.batch_id).collect::<Vec<_>>(), sent);
        assert_eq!(again[0].samples[0].vm_id, "vm0");
        b.ack(&sent[..9]);
        assert_eq!(b.pending(), 1);
        assert_eq!(std::fs::read_dir(spill_dir(dir.path())).unwrap().count(), 0);
        assert_eq!(b.lost_batches, 0);
    }

    #[test]
    fn a_restarted_agent_resends_what_was_spilled_with_fresh_ids_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let spill = spill_dir(dir.path());
        let first_ids: Vec<u64> = {
            let mut b = SampleBuffer::new(BufferConfig {
                memory_batches: 0,
                ..config(Some(spill.clone()))
            })
            .unwrap();
            (0..9).filter_map(|i| b.push(sample(i)).unwrap()).map(|b| b.batch_id).collect()
        };
        let mut b = SampleBuffer::new(config(Some(spill))).unwrap();
        assert_eq!(b.unacked().unwrap().iter().map(|b| b.batch_id).collect::<Vec<_>>(), first_ids);
        let next = (0..3).find_map(|i| b.push(sample(i)).unwrap()).unwrap();
        assert!(next.batch_id > *first_ids.last().unwrap());
    }

    #[test]
    fn without_room_the_oldest_are_dropped_and_counted() {
        let mut b = SampleBuffer::new(config(None)).unwrap();
        for i in 0..30 {
            b.push(sample(i)).unwrap();
        }
        assert_eq!(b.pending(), 2);
        assert_eq!(b.lost_batches, 8);
        let left = b.unacked().unwrap();
        assert_eq!(left[1].samples[2].vm_id, "vm29", "the newest are kept");
    }

    proptest! {
        #[test]
        fn every_sample_is_either_pending_acked_or_counted_lost(
            n in 0u64..200, acks in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut b = SampleBuffer::new(BufferConfig { batch_size: 4, memory_batches: 3, spill_batches: 5, spill_dir: Some(spill_dir(dir.path())) }).unwrap();
            let mut ids = Vec::new();
            for i in 0..n {
                if let Some(batch) = b.push(sample(i)).unwrap() {
                    ids.push(batch.batch_id);
                }
            }
            let mut acked = std::collections::BTreeSet::new();
            if !ids.is_empty() {
                for a in &acks {
                    let id = ids[a.index(ids.len())];
                    acked.insert(id);
                    b.ack(&[id]);
                }
            }
            let pending: std::collections::BTreeSet<u64> = b.unacked().unwrap().iter().map(|b| b.batch_id).collect();
            let lost = usize::try_from(b.lost_batches).unwrap();
            prop_assert!(pending.is_disjoint(&acked));
            prop_assert!(pending.len() + acked.len() + lost >= ids.len());
            prop_assert!(pending.len() <= 8);
        }
    }
}
