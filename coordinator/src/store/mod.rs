//! The coordinator's state, behind one trait: thresholds, models and which one is active per
//! class, registered hosts, training samples, and leadership.
//!
//! Backends: [`MemoryStore`] (the embedded default for a single coordinator) and [`EtcdStore`]
//! (several coordinators, one leading). Both pass the same conformance suite in
//! [`conformance`].
//!
//! Fencing: leadership carries an epoch, and every write only the leader may make (thresholds,
//! models, activation) names the writer's epoch; a write with an epoch that is no longer current
//! is refused with [`StoreError::Fenced`], so a paused old leader that wakes up changes nothing.
//! Everything pushed to agents carries a [`Fence`] (epoch, generation) that orders pushes.
//! Samples and host registrations come from whichever coordinator serves the agent, leader or
//! not; sample batches are stored once per (host, batch id) however often they arrive.

pub mod conformance;
mod etcd;
mod memory;

use std::future::Future;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::broadcast;
use vmgov_proto::{EnergyModel, PStateTable, ThresholdScope, Thresholds};

pub use self::etcd::{EtcdConfig, EtcdStore};
pub use self::memory::MemoryStore;
use crate::train::LabelledSample;

/// Orders pushes of one kind: compare (epoch, generation) lexicographically.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Fence {
    /// The leader's epoch when the change was made.
    pub epoch: u64,
    /// Increases with every change of the kind.
    pub generation: u64,
}

/// This coordinator leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// Its epoch: larger than every earlier leader's.
    pub epoch: u64,
    /// Who leads (the coordinator's id).
    pub id: String,
}

/// Who leads, as anyone can see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The leader's id.
    pub id: String,
    /// Where clients reach it.
    pub address: String,
    /// Its epoch.
    pub epoch: u64,
}

/// A threshold entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThresholdRecord {
    /// Where it applies.
    pub scope: ThresholdScope,
    /// The thresholds.
    pub thresholds: Thresholds,
    /// Last change, Unix ms.
    pub updated_unix_ms: u64,
    /// Who changed it.
    pub updated_by: String,
}

/// A VM on a registered host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// UUID.
    pub vm_id: String,
    /// Name.
    pub name: String,
    /// vCPUs.
    pub vcpus: u32,
}

/// A host whose agent is connected to some coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host id.
    pub host_id: String,
    /// Hardware class.
    pub hardware_class: String,
    /// Its P-states.
    pub pstates: PStateTable,
    /// Agent version.
    pub agent_version: String,
    /// Its VMs.
    pub vms: Vec<VmRecord>,
    /// The coordinator serving its stream.
    pub coordinator: String,
    /// When the stream opened, Unix ms.
    pub connected_unix_ms: u64,
}

/// Something changed; watchers re-read what they need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A threshold was set or deleted; the new generation.
    Thresholds(u64),
    /// A class's active model changed.
    ActiveModel {
        /// The class.
        class: String,
        /// The version now active.
        version: u64,
        /// Its fence.
        fence: Fence,
    },
    /// A host registered or went.
    Hosts,
    /// Leadership changed.
    Leader,
}

/// Why a store operation failed.
#[derive(Debug, Clone, Error)]
pub enum StoreError {
    /// The writer's epoch is not the current leader's: it was deposed.
    #[error("write refused: epoch {writer} is not the current leader's ({current})")]
    Fenced {
        /// The writer's epoch.
        writer: u64,
        /// The current epoch.
        current: u64,
    },
    /// A model version that exists already (versions are immutable).
    #[error("model {class} v{version} exists already; versions are immutable")]
    VersionExists {
        /// The class.
        class: String,
        /// The version.
        version: u64,
    },
    /// No such model.
    #[error("no model {class} v{version}")]
    NoSuchModel {
        /// The class.
        class: String,
        /// The version.
        version: u64,
    },
    /// The backend is unreachable or failed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored data is corrupt at {key}: {problem}")]
    Corrupt {
        /// Where.
        key: String,
        /// What.
        problem: String,
    },
}

/// The coordinator's state.
pub trait Store: Clone + Send + Sync + 'static {
    /// Waits until this coordinator leads; returns its leadership.
    fn campaign(
        &self,
        id: &str,
        address: &str,
    ) -> impl Future<Output = Result<Leadership, StoreError>> + Send;
    /// Who leads now, if anyone.
    fn leader(&self) -> impl Future<Output = Result<Option<LeaderInfo>, StoreError>> + Send;
    /// Gives leadership up.
    fn resign(
        &self,
        leadership: &Leadership,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sets a threshold (leader only); returns the thresholds' new generation.
    fn put_threshold(
        &self,
        epoch: u64,
        record: ThresholdRecord,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes a threshold (leader only); returns what was there.
    fn delete_threshold(
        &self,
        epoch: u64,
        scope: &ThresholdScope,
    ) -> impl Future<Output = Result<Option<ThresholdRecord>, StoreError>> + Send;
    /// Every threshold entry, and their generation.
    fn thresholds(
        &self,
    ) -> impl Future<Output = Result<(Vec<ThresholdRecord>, u64), StoreError>> + Send;

    /// Stores a new model version (leader only; versions are immutable).
    fn put_model(
        &self,
        epoch: u64,
        model: &EnergyModel,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// One model version.
    fn model(
        &self,
        class: &str,
        version: u64,
    ) -> impl Future<Output = Result<Option<EnergyModel>, StoreError>> + Send;
    /// The versions of a class, ascending.
    fn model_versions(
        &self,
        class: &str,
    ) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
    /// Classes with at least one model.
    fn model_classes(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Makes a version active (leader only); returns the fence of the change.
    fn activate(
        &self,
        epoch: u64,
        class: &str,
        version: u64,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;
    /// The active version of a class and its fence, with the versions active before it (most
    /// recent last) for rollback.
    fn active(
        &self,
        class: &str,
    ) -> impl Future<Output = Result<Option<(u64, Fence, Vec<u64>)>, StoreError>> + Send;

    /// Registers (or refreshes) a host while its agent is connected.
    fn put_host(&self, record: HostRecord) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes a host whose agent went.
    fn remove_host(&self, host_id: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Registered hosts.
    fn hosts(&self) -> impl Future<Output = Result<Vec<HostRecord>, StoreError>> + Send;

    /// Stores a batch of labelled samples once per (host, batch id); returns false for a batch
    /// already stored. Samples of a class are bounded (a reservoir).
    fn append_samples(
        &self,
        class: &str,
        host_id: &str,
        batch_id: u64,
        samples: Vec<LabelledSample>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// The retained samples of a class.
    fn samples(
        &self,
        class: &str,
    ) -> impl Future<Output = Result<Vec<LabelledSample>, StoreError>> + Send;
    /// Samples of a class ever accepted (retained or not).
    fn samples_seen(&self, class: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Changes as they happen.
    fn subscribe(&self) -> broadcast::Receiver<Change>;
}
