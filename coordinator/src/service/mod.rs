//! The coordinator's gRPC services over a [`Store`]: `AgentService` (one bidirectional stream
//! per agent, in `agent.rs`) and `FleetService` (operators and schedulers, in `fleet.rs`), and the
//! state they share: this coordinator's identity and leadership, the open agent streams, learning
//! runs and the latest decision summaries.
//!
//! Only the leader writes models and thresholds (the store fences every such write with its
//! epoch); any coordinator serves agents, stores their samples and reads.

mod agent;
mod fleet;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::{Mutex, RwLock, mpsc};
use tonic::Status;
use vmgov_proto::{Placement, ThresholdScope, pb, scope};

use crate::store::{HostRecord, Leadership, Store, StoreError, ThresholdRecord};

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Fenced { .. } => {
                Self::unavailable(format!("{e}; this coordinator no longer leads"))
            }
            StoreError::VersionExists { .. } => Self::already_exists(e.to_string()),
            StoreError::NoSuchModel { .. } => Self::not_found(e.to_string()),
            StoreError::Unavailable(_) | StoreError::Corrupt { .. } => {
                Self::unavailable(e.to_string())
            }
        }
    }
}

/// A learning run.
#[derive(Debug, Clone)]
pub struct LearningRun {
    /// Its status, as reported to clients.
    pub status: pb::LearningStatus,
    /// Samples of the class seen when it started (progress counts from there).
    pub samples_at_start: u64,
    /// The plan sent to the agents.
    pub plan: pb::StartLearningCommand,
    /// The hosts taking part.
    pub hosts: Vec<String>,
}

/// An agent's open stream, as other tasks see it.
#[derive(Debug, Clone)]
struct AgentStream {
    class: String,
    tx: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
}

/// State shared by the services of one coordinator.
#[derive(Debug)]
pub struct Shared<S: Store> {
    /// The store.
    pub store: S,
    /// This coordinator's id.
    pub id: String,
    /// Where clients reach it.
    pub address: String,
    leadership: RwLock<Option<Leadership>>,
    streams: Mutex<HashMap<String, AgentStream>>,
    learning: Mutex<Vec<LearningRun>>,
    decisions: Mutex<HashMap<String, pb::DecisionSummary>>,
    learning_generation: Mutex<u64>,
    events: tokio::sync::broadcast::Sender<pb::FleetEvent>,
}

/// A coordinator: cheap to clone, one per process.
#[derive(Debug)]
pub struct Coordinator<S: Store> {
    shared: Arc<Shared<S>>,
}

impl<S: Store> Clone for Coordinator<S> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<S: Store> Coordinator<S> {
    /// A coordinator named `id`, reachable at `address`, over `store`.
    pub fn new(store: S, id: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                id: id.into(),
                address: address.into(),
                leadership: RwLock::new(None),
                streams: Mutex::new(HashMap::new()),
                learning: Mutex::new(Vec::new()),
                decisions: Mutex::new(HashMap::new()),
                learning_generation: Mutex::new(0),
                events: tokio::sync::broadcast::channel(1024).0,
            }),
        }
    }

    /// The shared state.
    pub fn shared(&self) -> &Shared<S> {
        &self.shared
    }

    /// Campaigns until this coordinator leads, and records the leadership.
    pub async fn lead(&self) -> Result<Leadership, StoreError> {
        let l = self.shared.store.campaign(&self.shared.id, &self.shared.address).await?;
        tracing::info!(id = %self.shared.id, epoch = l.epoch, "leading");
        *self.shared.leadership.write().await = Some(l.clone());
        self.event(
            "",
            pb::fleet_event::Event::LeaderChanged(pb::LeaderChanged {
                leader_address: self.shared.address.clone(),
                epoch: l.epoch,
            }),
        );
        Ok(l)
    }

    /// Announces a fleet event to `WatchEvents` subscribers.
    pub(crate) fn event(&self, host_id: &str, event: pb::fleet_event::Event) {
        // Nobody watching is fine.
        let _ = self.shared.events.send(pb::FleetEvent {
            at_unix_ms: now_unix_ms(),
            event: Some(event),
            host_id: host_id.into(),
        });
    }

    /// Keeps campaigning for leadership for as long as the process runs: leads when elected,
    /// notices when the store names another leader (a lapsed lease, a partition) and campaigns
    /// again. Followers serve agents and reads meanwhile; writes answer UNAVAILABLE naming the
    /// leader.
    pub async fn maintain_leadership(self, check_every: std::time::Duration) {
        let mut backoff = std::time::Duration::from_millis(200);
        loop {
            let leadership = match self.lead().await {
                Ok(l) => {
                    backoff = std::time::Duration::from_millis(200);
                    l
                }
                Err(e) => {
                    tracing::warn!(error = %e, "campaign failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                tokio::time::sleep(check_every).await;
                match self.shared.store.leader().await {
                    Ok(Some(l)) if l.epoch == leadership.epoch => {}
                    // Unreachable store: keep the leadership; its writes are fenced anyway if it
                    // was lost meanwhile.
                    Err(StoreError::Unavailable(_)) => {}
                    other => {
                        tracing::warn!(epoch = leadership.epoch, now = ?other.ok().flatten(), "leadership lost");
                        *self.shared.leadership.write().await = None;
                        break;
                    }
                }
            }
        }
    }

    /// The `AgentService` server.
    pub fn agent_service(&self) -> pb::agent_service_server::AgentServiceServer<Self> {
        pb::agent_service_server::AgentServiceServer::new(self.clone())
    }

    /// The `FleetService` server.
    pub fn fleet_service(&self) -> pb::fleet_service_server::FleetServiceServer<Self> {
        pb::fleet_service_server::FleetServiceServer::new(self.clone())
    }

    /// This coordinator's epoch if it leads, else UNAVAILABLE naming the leader.
    async fn leader_epoch(&self) -> Result<u64, Status> {
        if let Some(l) = self.shared.leadership.read().await.as_ref() {
            return Ok(l.epoch);
        }
        let leader = self.shared.store.leader().await?;
        Err(Status::unavailable(match leader {
            Some(l) => format!(
                "this coordinator does not lead; send writes to {} (epoch {})",
                l.address, l.epoch
            ),
            None => "no coordinator leads right now; retry shortly".into(),
        }))
    }

    /// The epoch pushes carry: the current leader's.
    async fn current_epoch(&self) -> u64 {
        if let Some(l) = self.shared.leadership.read().await.as_ref() {
            return l.epoch;
        }
        self.shared.store.leader().await.ok().flatten().map_or(0, |l| l.epoch)
    }

    /// The thresholds that apply to each VM of `host`, as a push.
    async fn threshold_push(&self, host: &HostRecord) -> Result<pb::ThresholdPush, StoreError> {
        let (entries, generation) = self.shared.store.thresholds().await?;
        let map: HashMap<ThresholdScope, ThresholdRecord> =
            entries.into_iter().map(|e| (e.scope.clone(), e)).collect();
        let vms = host
            .vms
            .iter()
            .filter_map(|vm| {
                let placement = Placement {
                    vm_id: &vm.vm_id,
                    host_id: &host.host_id,
                    hardware_class: &host.hardware_class,
                };
                scope::resolve(&placement, |s| map.get(s)).map(|(source, r)| pb::VmThresholds {
                    vm_id: vm.vm_id.clone(),
                    thresholds: Some((&r.thresholds).into()),
                    source: Some((&source).into()),
                })
            })
            .collect();
        Ok(pb::ThresholdPush {
            fence: Some(pb::Fence { epoch: self.current_epoch().await, generation }),
            vms,
            objective: pb::Objective::Energy as i32,
        })
    }

    /// The active model of `class`, as a push.
    async fn model_push(&self, class: &str) -> Result<Option<pb::ModelPush>, StoreError> {
        let Some((version, fence, _)) = self.shared.store.active(class).await? else {
            return Ok(None);
        };
        let Some(model) = self.shared.store.model(class, version).await? else { return Ok(None) };
        Ok(Some(pb::ModelPush {
            fence: Some(pb::Fence { epoch: fence.epoch, generation: fence.generation }),
            model: Some((&model).into()),
        }))
    }

    /// Sends a learning command to the streams of `hosts`; returns those that were not open.
    async fn send_learning(
        &self,
        hosts: &[String],
        command: pb::learning_command::Command,
        id: &str,
    ) -> Vec<String> {
        let generation = {
            let mut g = self.shared.learning_generation.lock().await;
            *g += 1;
            *g
        };
        let epoch = self.current_epoch().await;
        let msg = pb::CoordinatorMessage {
            msg: Some(pb::coordinator_message::Msg::Learning(pb::LearningCommand {
                fence: Some(pb::Fence { epoch, generation }),
                learning_id: id.into(),
                command: Some(command),
            })),
        };
        let streams = self.shared.streams.lock().await;
        let mut missing = Vec::new();
        for h in hosts {
            match streams.get(h) {
                Some(s) => {
                    let _ = s.tx.try_send(Ok(msg.clone()));
                }
                None => missing.push(h.clone()),
            }
        }
        missing
    }

    /// Connected hosts of `class`.
    async fn connected_hosts(&self, class: &str) -> Vec<String> {
        self.shared
            .streams
            .lock()
            .await
            .iter()
            .filter(|(_, s)| s.class == class)
            .map(|(h, _)| h.clone())
            .collect()
    }
}
