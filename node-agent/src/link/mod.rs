//! The coordinator link: one `AgentService.Connect` stream, reconnecting with jittered
//! exponential backoff for as long as the agent runs.
//!
//! Up: a hello (host, class, P-states, VMs, and the fences of the model and thresholds it holds),
//! labelled sample batches from learning (kept in [`buffer`] until acknowledged and re-sent after
//! every reconnect), VM lifecycle, decision summaries and learning progress. Down: models and
//! thresholds (validated, refused when older than what the agent holds, applied, and written to
//! the [`cache`] so a restarted agent starts from them), learning commands, acks.
//!
//! The link is off the fast path: the agent decides every slice whether the coordinator is there
//! or not; while it is away, models and thresholds just stop changing.

pub mod buffer;
pub mod cache;

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use rand::RngExt;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::transport::Endpoint;
use vmgov_proto::{EnergyModel, Thresholds, pb};

use self::{
    buffer::{BufferConfig, SampleBuffer, SpillError},
    cache::{Cache, CacheError},
};
use crate::{
    agent::{AgentControl, AgentStatus, LabelledOut, LearningSettings, LocalThresholds},
    learning::SweepPlan,
    platform::HostInfo,
};

/// How the link runs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The coordinators, e.g. `http://127.0.0.1:7700`: any of them serves an agent; the link
    /// moves to the next one when its stream fails.
    pub endpoints: Vec<String>,
    /// This host's id.
    pub host_id: String,
    /// Hardware class reported.
    pub hardware_class: String,
    /// Cache and spill directory.
    pub cache_dir: PathBuf,
    /// Thresholds configured on the host: the default for VMs the coordinator sends none for.
    pub local_thresholds: LocalThresholds,
    /// Timeslice, seconds (to turn learning windows in seconds into slices).
    pub timeslice_s: f64,
    /// Sample batches.
    pub buffer: BufferConfig,
    /// How often decision summaries go up.
    pub summary_every: Duration,
}

/// Why the link could not start.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The endpoint is not a valid URI.
    #[error("coordinator endpoint {endpoint:?} is not a valid URI")]
    Endpoint {
        /// What was given.
        endpoint: String,
    },
    /// The cache directory is unusable.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The spill directory is unusable.
    #[error(transparent)]
    Spill(#[from] SpillError),
}

/// Fences held per kind of push.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    model: Option<(u64, u64)>,
    thresholds: Option<(u64, u64)>,
    learning: Option<(u64, u64)>,
}

fn fence(f: Option<&pb::Fence>) -> (u64, u64) {
    f.map_or((0, 0), |f| (f.epoch, f.generation))
}

/// The link's state between reconnects.
struct Link {
    config: LinkConfig,
    control: AgentControl,
    info: HostInfo,
    cache: Cache,
    buffer: SampleBuffer,
    held: Held,
    /// The learning run in progress (id, labelled samples when it started, its target).
    learning: Option<(String, u64, u64)>,
    /// A learning command this host could not carry out, to report once.
    refused: Option<pb::LearningProgress>,
    /// Labelled samples the agent had produced at the last status seen.
    labelled_so_far: u64,
}

/// Applies the cached model and thresholds, then runs the link until `shutdown` is set.
pub async fn run(
    config: LinkConfig,
    control: AgentControl,
    info: HostInfo,
    mut status: watch::Receiver<AgentStatus>,
    mut samples: mpsc::Receiver<LabelledOut>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let endpoints = config
        .endpoints
        .iter()
        .map(|e| {
            Endpoint::from_shared(e.clone())
                .map_err(|_| LinkError::Endpoint { endpoint: e.clone() })
                .map(|ep| {
                    ep.connect_timeout(Duration::from_secs(3))
                        .http2_keep_alive_interval(Duration::from_secs(2))
                        .keep_alive_timeout(Duration::from_secs(2))
                        .keep_alive_while_idle(true)
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err(LinkError::Endpoint { endpoint: String::new() });
    }
    let cache = Cache::new(&config.cache_dir)?;
    let buffer = SampleBuffer::new(config.buffer.clone())?;
    let mut link = Link {
        config,
        control,
        info,
        cache,
        buffer,
        held: Held::default(),
        learning: None,
        refused: None,
        labelled_so_far: 0,
    };
    link.restore_from_cache();
    let mut backoff = Duration::from_millis(200);
    let mut next = 0;
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let k = next % endpoints.len();
        let name = link.config.endpoints[k].clone();
        let outcome = tokio::select! {
            r = link.session(&endpoints[k], &name, &mut status, &mut samples) => r,
            _ = shutdown.changed() => return Ok(()),
        };
        match outcome {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => tracing::warn!(coordinator = %name, error = %e, "coordinator link down"),
        }
        next += 1;
        if next % endpoints.len() != 0 {
            // Another coordinator may be up: try it at once.
            continue;
        }
        // Jittered exponential backoff: agents that lost the same coordinator do not all come
        // back at the same instant.
        let jitter = rand::rng().random_range(0.5..1.5);
        let wait = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(Duration::from_secs(10));
        // Labelled samples keep arriving while away: buffer them.
        let deadline = tokio::time::sleep(wait);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                _ = shutdown.changed() => return Ok(()),
                s = samples.recv() => match s {
                    Some(s) => { let _ = link.buffer_sample(s); }
                    None => tokio::time::sleep(wait).await,
                },
            }
        }
    }
}

impl Link {
    fn restore_from_cache(&mut self) {
        if let Some(push) = self.cache.model() {
            match self.apply_model(&push) {
                Ok(()) => tracing::info!("model restored from the local cache"),
                Err(e) => tracing::warn!(error = %e, "the cached model is unusable; ignoring it"),
            }
        }
        if let Some(push) = self.cache.thresholds() {
            match self.apply_thresholds(&push) {
                Ok(()) => tracing::info!("thresholds restored from the local cache"),
                Err(e) => {
                    tracing::warn!(error = %e, "the cached thresholds are unusable; ignoring them")
                }
            }
        }
    }

    fn apply_model(&mut self, push: &pb::ModelPush) -> Result<(), String> {
        let f = fence(push.fence.as_ref());
        if self.held.model.is_some_and(|h| f <= h) {
            return Err(format!(
                "model push with fence {f:?} is not newer than the {:?} held",
                self.held.model
            ));
        }
        let wire = push.model.as_ref().ok_or("model push without a model")?;
        let model = EnergyModel::try_from(wire).map_err(|e| e.to_string())?;
        self.control.set_model(&model).map_err(|e| format!("{e}: {}", source_chain(&e)))?;
        self.held.model = Some(f);
        tracing::info!(class = %model.hardware_class, version = model.version, fence = ?f, "model applied");
        Ok(())
    }

    fn apply_thresholds(&mut self, push: &pb::ThresholdPush) -> Result<(), String> {
        let f = fence(push.fence.as_ref());
        if self.held.thresholds.is_some_and(|h| f < h) {
            return Err(format!(
                "thresholds push with fence {f:?} is older than the {:?} held",
                self.held.thresholds
            ));
        }
        let mut vm = BTreeMap::new();
        for t in &push.vms {
            let thresholds = t.thresholds.as_ref().ok_or("a VM's thresholds are missing")?;
            vm.insert(
                t.vm_id.clone(),
                Thresholds::try_from(thresholds).map_err(|e| e.to_string())?,
            );
        }
        let local = &self.config.local_thresholds;
        let mut merged = LocalThresholds { default: local.default, vm: local.vm.clone() };
        // The coordinator's word wins for the VMs it names.
        merged.vm.extend(vm);
        self.control.set_thresholds(merged).map_err(|e| e.to_string())?;
        self.held.thresholds = Some(f);
        Ok(())
    }

    fn buffer_sample(&mut self, s: LabelledOut) -> Result<Option<pb::SampleBatch>, SpillError> {
        let frequency_hz = self.info.pstates.frequency_hz(s.pstate).unwrap_or(0.0);
        self.buffer.push(pb::Sample {
            vm_id: s.vm_uuid,
            start_unix_ns: 0,
            pstate_index: u32::try_from(s.pstate).unwrap_or(u32::MAX),
            frequency_hz,
            counters: Some((&s.counters).into()),
            labels: Some((&s.labels).into()),
            workload: s.learning_id,
        })
    }

    fn hello(&self, status: &AgentStatus) -> pb::Hello {
        pb::Hello {
            host_id: self.config.host_id.clone(),
            hardware_class: self.config.hardware_class.clone(),
            pstates: Some((&self.info.pstates).into()),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            vms: status.vms.iter().map(|v| vm_info(&v.info)).collect(),
            cores: u32::try_from(self.info.cores).unwrap_or(u32::MAX),
            model_fence: self.held.model.map(|(epoch, generation)| pb::Fence { epoch, generation }),
            model_version: self.control.model_version(),
            thresholds_fence: self
                .held
                .thresholds
                .map(|(epoch, generation)| pb::Fence { epoch, generation }),
            unavailable: self
                .info
                .unavailable
                .iter()
                .map(|c| pb::Counter::from(c) as i32)
                .collect(),
        }
    }

    /// One connection, until it fails.
    async fn session(
        &mut self,
        endpoint: &Endpoint,
        name: &str,
        status: &mut watch::Receiver<AgentStatus>,
        samples: &mut mpsc::Receiver<LabelledOut>,
    ) -> Result<(), String> {
        let channel = endpoint.connect().await.map_err(|e| format!("connecting: {e}"))?;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        let send = |m| pb::AgentMessage { msg: Some(m) };
        let current = status.borrow().clone();
        tx.send(send(pb::agent_message::Msg::Hello(self.hello(&current))))
            .await
            .map_err(|_| "the outgoing stream closed")?;
        let mut inbound = client
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(|e| format!("opening the stream: {e}"))?
            .into_inner();
        tracing::info!(coordinator = %name, "connected to the coordinator");
        for batch in self.buffer.unacked().map_err(|e| e.to_string())? {
            tx.send(send(pb::agent_message::Msg::Samples(batch)))
                .await
                .map_err(|_| "the outgoing stream closed")?;
        }
        let mut known_vms: Vec<pb::VmInfo> = current.vms.iter().map(|v| vm_info(&v.info)).collect();
        let mut summary = tokio::time::interval(self.config.summary_every);
        let mut flush = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                msg = inbound.next() => {
                    self.labelled_so_far = status.borrow().labelled_samples;
                    let msg = msg.ok_or("the coordinator closed the stream")?.map_err(|e| format!("stream: {e}"))?;
                    self.handle(msg);
                }
                s = samples.recv() => {
                    let Some(s) = s else { return Err("the agent stopped producing samples".into()) };
                    if let Some(batch) = self.buffer_sample(s).map_err(|e| e.to_string())? {
                        tx.send(send(pb::agent_message::Msg::Samples(batch))).await.map_err(|_| "the outgoing stream closed")?;
                    }
                }
                _ = flush.tick() => {
                    if let Some(batch) = self.buffer.seal().map_err(|e| e.to_string())? {
                        tx.send(send(pb::agent_message::Msg::Samples(batch))).await.map_err(|_| "the outgoing stream closed")?;
                    }
                }
                changed = status.changed() => {
                    changed.map_err(|_| "the agent stopped")?;
                    let now: Vec<pb::VmInfo> = status.borrow().vms.iter().map(|v| vm_info(&v.info)).collect();
                    for vm in now.iter().filter(|v| !known_vms.iter().any(|k| k.vm_id == v.vm_id)) {
                        tx.send(send(pb::agent_message::Msg::VmStarted(pb::VmStarted { vm: Some(vm.clone()), at_unix_ms: 0 })))
                            .await.map_err(|_| "the outgoing stream closed")?;
                    }
                    for vm in known_vms.iter().filter(|k| !now.iter().any(|v| v.vm_id == k.vm_id)) {
                        tx.send(send(pb::agent_message::Msg::VmStopped(pb::VmStopped { vm_id: vm.vm_id.clone(), at_unix_ms: 0 })))
                            .await.map_err(|_| "the outgoing stream closed")?;
                    }
                    known_vms = now;
                }
                _ = summary.tick() => {
                    let s = status.borrow().clone();
                    tx.send(send(pb::agent_message::Msg::Decisions(self.summary(&s)))).await.map_err(|_| "the outgoing stream closed")?;
                    if let Some(progress) = self.progress(&s) {
                        tx.send(send(pb::agent_message::Msg::LearningProgress(progress))).await.map_err(|_| "the outgoing stream closed")?;
                    }
                }
            }
        }
    }

    /// Progress of the learning run in progress, if any; forgets a finished run once reported.
    fn progress(&mut self, s: &AgentStatus) -> Option<pb::LearningProgress> {
        if let Some(refused) = self.refused.take() {
            return Some(refused);
        }
        let (id, at_start, target) = self.learning.clone()?;
        let samples = s.labelled_samples.saturating_sub(at_start);
        let finished = !s.learning && samples > 0;
        if finished {
            self.learning = None;
        }
        #[allow(clippy::cast_precision_loss, reason = "sample counts are far below 2^53")]
        let fraction_done = if finished {
            1.0
        } else if target > 0 {
            (samples as f64 / target as f64).min(1.0)
        } else {
            0.0
        };
        Some(pb::LearningProgress {
            learning_id: id,
            samples,
            fraction_done,
            finished,
            error: String::new(),
            host_id: self.config.host_id.clone(),
        })
    }

    fn summary(&self, s: &AgentStatus) -> pb::DecisionSummary {
        let version = self.control.model_version().unwrap_or(0);
        pb::DecisionSummary {
            window_start_unix_ms: 0,
            window_end_unix_ms: crate::link::now_unix_ms(),
            vms: s
                .vms
                .iter()
                .map(|v| pb::VmDecision {
                    vm_id: v.info.uuid.clone(),
                    pstate_index: v.pstate.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                    frequency_hz: v
                        .pstate
                        .and_then(|p| self.info.pstates.frequency_hz(p))
                        .unwrap_or(0.0),
                    predicted: v.predicted.as_ref().map(Into::into),
                    observed: v.observed.as_ref().map(Into::into),
                    energy_joules: v.energy_j,
                    energy_saved_joules: v.energy_saved_j,
                    fallback: v.fallback.is_some(),
                    fallback_reason: v.fallback.clone().unwrap_or_default(),
                    model_version: version,
                    thresholds: v.thresholds.as_ref().map(Into::into),
                    observed_windows: v.verified_windows,
                    pstate_floor: u32::try_from(v.pstate_floor).unwrap_or(u32::MAX),
                })
                .collect(),
            core_frequency_hz: s
                .cores
                .iter()
                .map(|&p| self.info.pstates.frequency_hz(p).unwrap_or(0.0))
                .collect(),
            package_energy_joules: None,
            dry_run: s.dry_run,
        }
    }

    fn handle(&mut self, msg: pb::CoordinatorMessage) {
        use pb::coordinator_message::Msg;
        match msg.msg {
            Some(Msg::Model(push)) => match self.apply_model(&push) {
                Ok(()) => {
                    if let Err(e) = self.cache.save_model(&push) {
                        tracing::warn!(error = %e, "could not cache the model");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "model push refused; the model in use stays"),
            },
            Some(Msg::Thresholds(push)) => match self.apply_thresholds(&push) {
                Ok(()) => {
                    if let Err(e) = self.cache.save_thresholds(&push) {
                        tracing::warn!(error = %e, "could not cache the thresholds");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "thresholds push refused"),
            },
            Some(Msg::Learning(cmd)) => {
                let f = fence(cmd.fence.as_ref());
                if self.held.learning.is_some_and(|h| f <= h) {
                    tracing::warn!(fence = ?f, "stale learning command refused");
                    return;
                }
                self.held.learning = Some(f);
                let result = match cmd.command {
                    Some(pb::learning_command::Command::Start(_)) if !self.info.energy_meter => {
                        let error = "this host has no package energy meter (RAPL) to label power \
                                     with; it cannot learn";
                        tracing::warn!(learning = %cmd.learning_id, "{error}");
                        self.refused = Some(pb::LearningProgress {
                            learning_id: cmd.learning_id.clone(),
                            finished: true,
                            error: error.into(),
                            host_id: self.config.host_id.clone(),
                            ..pb::LearningProgress::default()
                        });
                        Ok(())
                    }
                    Some(pb::learning_command::Command::Start(plan)) => {
                        self.learning = Some((
                            cmd.learning_id.clone(),
                            self.labelled_so_far,
                            plan.sample_target,
                        ));
                        self.control.start_learning(&cmd.learning_id, self.learning_settings(&plan))
                    }
                    Some(pb::learning_command::Command::Stop(_)) => self.control.stop_learning(),
                    None => Ok(()),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "learning command not applied");
                }
            }
            Some(Msg::Ack(ack)) => self.buffer.ack(&ack.batch_ids),
            None => {}
        }
    }

    fn learning_settings(&self, plan: &pb::StartLearningCommand) -> LearningSettings {
        let slices = |seconds: f64, default: u32| {
            if seconds > 0.0 {
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "clamped"
                )]
                let n = (seconds / self.config.timeslice_s).round().clamp(2.0, 1e6) as u32;
                n
            } else {
                default
            }
        };
        LearningSettings {
            plan: SweepPlan {
                pstates: self.info.pstates.len(),
                dwell_slices: slices(plan.dwell_seconds, 50),
                reference_slices: slices(plan.reference_seconds, 20),
            },
            max_samples: (plan.sample_target > 0).then_some(plan.sample_target),
            max_seconds: (plan.duration_seconds > 0.0).then_some(plan.duration_seconds),
        }
    }
}

fn vm_info(v: &crate::platform::VmInfo) -> pb::VmInfo {
    pb::VmInfo { vm_id: v.uuid.clone(), name: v.name.clone(), vcpus: v.vcpus }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
