//! The agent's actor tree (ractor), on any [`HostPlatform`].
//!
//! ```text
//! HostSupervisor ── HostLoop (sampler + arbiter; owns the timeslice)
//!                └─ VmActor × one per VM (features → predict → decide)
//! ```
//!
//! Callers hold an [`Agent`], a small handle with async methods; they never see messages. The
//! supervision policy is in `supervisor.rs`: failed children restart alone, and stopping puts
//! the host back as it was. Status flows out through a watch channel that the host loop updates
//! every slice, so asking for it never waits on the loop.

mod emit;
mod host_loop;
mod supervisor;
#[cfg(test)]
mod tests;
mod vm_actor;

use std::{collections::BTreeMap, sync::Arc};

use ractor::{Actor, ActorRef};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::{
    sync::{Mutex, watch},
    task::JoinHandle,
};
use vmgov_proto::{EnergyModel, ModelError, Objective, Predictor, Ratios, Thresholds};

pub use self::emit::{Emitter, SampleLine};
use vmgov_sim::governor::GovernorKind;

use self::supervisor::{HostSupervisor, SupervisorArgs, SupervisorMsg};
use crate::{
    arbiter::ArbiterPolicy,
    learning::SweepPlan,
    platform::{HostPlatform, VmIndex, VmInfo},
    verify::VerifyPlan,
};

/// Learning mode settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearningSettings {
    /// The sweep.
    pub plan: SweepPlan,
    /// Stop learning after this many labelled samples.
    pub max_samples: Option<u64>,
    /// Stop learning after this much host time, seconds.
    pub max_seconds: Option<f64>,
}

/// A labelled slice on its way to the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledOut {
    /// The learning run (empty for a local run).
    pub learning_id: String,
    /// The VM's UUID.
    pub vm_uuid: String,
    /// The P-state it ran at.
    pub pstate: usize,
    /// Its counters.
    pub counters: vmgov_proto::RawCounters,
    /// Its ratios.
    pub labels: Ratios,
}

/// Where the agent's outputs go.
#[derive(Debug, Default)]
pub struct Outputs {
    /// `--emit-samples`.
    pub emitter: Option<Emitter>,
    /// Labelled samples for the coordinator link (never waited on: a full queue drops).
    pub labelled: Option<tokio::sync::mpsc::Sender<LabelledOut>>,
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Timeslice, seconds.
    pub timeslice_s: f64,
    /// Shadow mode: decide and log, never actuate.
    pub dry_run: bool,
    /// How per-VM choices become per-core frequencies.
    pub arbiter: ArbiterPolicy,
    /// Governor for VMs without a model or thresholds.
    pub fallback: GovernorKind,
    /// Learning mode from the start, if set.
    pub learning: Option<LearningSettings>,
    /// Stop after this many slices (tests, simulated runs).
    pub max_slices: Option<u64>,
    /// On a lockstep (simulated) platform, stop once no VM is left.
    pub stop_when_idle: bool,
    /// On a lockstep platform, run at this many times real time (none: flat out).
    pub pace: Option<f64>,
    /// Verification windows that measure what each VM's choice really costs it (none: only
    /// predictions are reported). Not run in dry-run, where nothing is set.
    pub verify: Option<VerifyPlan>,
    /// Keep a VM whose observed ratios fell short at P-states that could meet its thresholds,
    /// whatever the model predicts (see [`crate::verify::Guard`]); off: only report.
    pub guard: bool,
}

impl Default for AgentSettings {
    fn default() -> Self {
        Self {
            timeslice_s: 0.01,
            dry_run: false,
            arbiter: ArbiterPolicy::Follow,
            fallback: GovernorKind::Performance,
            learning: None,
            max_slices: None,
            stop_when_idle: true,
            pace: None,
            verify: Some(VerifyPlan::default()),
            guard: true,
        }
    }
}

/// Thresholds set on this host (until a coordinator pushes them): by VM UUID or name, then a
/// default for every VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalThresholds {
    /// For every VM without its own entry.
    #[serde(default)]
    pub default: Option<Thresholds>,
    /// Per VM, keyed by UUID or name.
    #[serde(default)]
    pub vm: BTreeMap<String, Thresholds>,
}

impl LocalThresholds {
    /// The thresholds that apply to `vm`: its UUID's entry, else its name's, else the default.
    pub fn resolve(&self, vm: &VmInfo) -> Option<Thresholds> {
        self.vm.get(&vm.uuid).or_else(|| self.vm.get(&vm.name)).copied().or(self.default)
    }
}

/// The model and thresholds the agent decides with.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// The active model, compiled.
    pub predictor: Option<Arc<Predictor>>,
    /// Thresholds.
    pub thresholds: LocalThresholds,
    /// What decisions minimise.
    pub objective: Objective,
}

/// One VM in the status.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmStatus {
    /// The VM.
    pub info: VmInfo,
    /// Its P-state in the last slice (`None`: fallback governor).
    pub pstate: Option<usize>,
    /// Predicted ratios at that P-state.
    pub predicted: Option<Ratios>,
    /// Why it runs on the fallback governor, if it does.
    pub fallback: Option<String>,
    /// Estimated energy since the agent started, joules: its share of the package meter by core
    /// time (0 without a meter).
    pub energy_j: f64,
    /// Estimated energy saved against running the same work at f_max since the agent started,
    /// joules (negative where a lower P-state cost more): from the ratios the last verification
    /// window measured at the P-state it ran at, or else the predicted ones.
    pub energy_saved_j: f64,
    /// Ratios measured in the last verification window (see [`crate::verify`]); power is the
    /// package's, NaN where the host has no energy meter.
    pub observed: Option<Ratios>,
    /// Verification windows completed for this VM since the agent started.
    pub verified_windows: u64,
    /// The thresholds it is decided under.
    pub thresholds: Option<Thresholds>,
    /// The lowest P-state its verification windows allow it (0: no restriction).
    pub pstate_floor: usize,
}

/// What the agent is doing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AgentStatus {
    /// Slices run.
    pub slices: u64,
    /// Host time covered, seconds.
    pub time_s: f64,
    /// Shadow mode.
    pub dry_run: bool,
    /// Learning mode is on.
    pub learning: bool,
    /// Labelled samples produced.
    pub labelled_samples: u64,
    /// Version of the active model.
    pub model_version: Option<u64>,
    /// P-state of every core (as set, or as it would be set in dry-run).
    pub cores: Vec<usize>,
    /// Per VM.
    pub vms: Vec<VmStatus>,
    /// The run is over (simulated host with nothing left to run).
    pub finished: bool,
    /// Sample lines dropped because the writer was behind.
    pub samples_dropped: u64,
    /// Energy charged to VMs since the loop started, joules, and saved against f_max: the sums of
    /// [`VmStatus::energy_j`] and [`VmStatus::energy_saved_j`] over every VM, gone ones included.
    pub energy_j: f64,
    /// See [`Self::energy_j`].
    pub energy_saved_j: f64,
}

/// State shared by the actors: the platform (behind a lock the host loop holds for a slice)
/// and the settings.
pub struct Shared {
    platform: Mutex<Box<dyn HostPlatform>>,
    settings: AgentSettings,
    lockstep: bool,
    emitter: Option<Emitter>,
    labelled: Option<tokio::sync::mpsc::Sender<LabelledOut>>,
}

impl std::fmt::Debug for dyn HostPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let info = self.info();
        write!(f, "{} host of class {}", info.platform, info.hardware_class)
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Why the agent failed.
#[derive(Debug, Error)]
pub enum AgentError {
    /// The actors could not start.
    #[error("starting the agent's actors")]
    Spawn(#[source] ractor::SpawnErr),
    /// The agent has stopped.
    #[error("the agent has stopped")]
    Stopped,
    /// A model was refused; the previous one stays active.
    #[error("model refused; the previous one stays active")]
    Model(#[from] ModelError),
}

/// A cheap, cloneable handle that changes what a running agent decides with: the coordinator
/// link holds one.
#[derive(Debug, Clone)]
pub struct AgentControl {
    supervisor: ActorRef<SupervisorMsg>,
    policy: Arc<std::sync::Mutex<Policy>>,
    table: vmgov_proto::PStateTable,
}

impl AgentControl {
    fn with_policy(&self, change: impl FnOnce(&mut Policy)) -> Result<(), AgentError> {
        let policy = {
            let mut p = self.policy.lock().map_err(|_| AgentError::Stopped)?;
            change(&mut p);
            p.clone()
        };
        self.supervisor
            .send_message(SupervisorMsg::SetPolicy(Box::new(policy)))
            .map_err(|_| AgentError::Stopped)
    }

    /// Swaps in a new model, validated first (against the host's P-states too): a bad model is
    /// refused and the old one kept.
    pub fn set_model(&self, model: &EnergyModel) -> Result<(), AgentError> {
        model.check_host(&self.table)?;
        let predictor = Arc::new(Predictor::new(model)?);
        self.with_policy(|p| p.predictor = Some(predictor))
    }

    /// Replaces the thresholds.
    pub fn set_thresholds(&self, thresholds: LocalThresholds) -> Result<(), AgentError> {
        self.with_policy(|p| p.thresholds = thresholds)
    }

    /// The thresholds in force.
    pub fn thresholds(&self) -> LocalThresholds {
        self.policy.lock().map(|p| p.thresholds.clone()).unwrap_or_default()
    }

    /// The active model's version, if any.
    pub fn model_version(&self) -> Option<u64> {
        self.policy.lock().ok().and_then(|p| p.predictor.as_ref().map(|m| m.version()))
    }

    /// Starts a learning run.
    pub fn start_learning(&self, id: &str, settings: LearningSettings) -> Result<(), AgentError> {
        self.supervisor
            .send_message(SupervisorMsg::StartLearning(id.into(), settings))
            .map_err(|_| AgentError::Stopped)
    }

    /// Stops the learning run.
    pub fn stop_learning(&self) -> Result<(), AgentError> {
        self.supervisor.send_message(SupervisorMsg::StopLearning).map_err(|_| AgentError::Stopped)
    }

    /// The host's P-states.
    pub const fn pstates(&self) -> &vmgov_proto::PStateTable {
        &self.table
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    control: AgentControl,
    join: JoinHandle<()>,
    status: watch::Receiver<AgentStatus>,
    shared: Arc<Shared>,
}

impl Agent {
    /// Starts the actor tree on `platform`.
    pub async fn start(
        platform: Box<dyn HostPlatform>,
        settings: AgentSettings,
        policy: Policy,
        emitter: Option<Emitter>,
    ) -> Result<Self, AgentError> {
        Self::start_with(platform, settings, policy, Outputs { emitter, labelled: None }).await
    }

    /// Starts the actor tree with all its outputs.
    pub async fn start_with(
        platform: Box<dyn HostPlatform>,
        settings: AgentSettings,
        policy: Policy,
        outputs: Outputs,
    ) -> Result<Self, AgentError> {
        let lockstep = platform.lockstep();
        let table = platform.info().pstates;
        let shared = Arc::new(Shared {
            platform: Mutex::new(platform),
            settings,
            lockstep,
            emitter: outputs.emitter,
            labelled: outputs.labelled,
        });
        let (tx, status) = watch::channel(AgentStatus::default());
        let args =
            SupervisorArgs { shared: Arc::clone(&shared), policy: policy.clone(), status: tx };
        let (supervisor, join) =
            Actor::spawn(None, HostSupervisor, args).await.map_err(AgentError::Spawn)?;
        let control =
            AgentControl { supervisor, policy: Arc::new(std::sync::Mutex::new(policy)), table };
        Ok(Self { control, join, status, shared })
    }

    /// A handle that changes the model, thresholds and learning of this agent.
    pub fn control(&self) -> AgentControl {
        self.control.clone()
    }

    /// The latest status.
    pub fn status(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status update.
    pub fn status_receiver(&self) -> watch::Receiver<AgentStatus> {
        self.status.clone()
    }

    /// Waits until the host loop has run at least `slices` slices (or the agent stopped).
    pub async fn wait_slices(&mut self, slices: u64) -> AgentStatus {
        loop {
            let s = self.status.borrow_and_update().clone();
            if s.slices >= slices || s.finished {
                return s;
            }
            if self.status.changed().await.is_err() {
                return self.status.borrow().clone();
            }
        }
    }

    /// Swaps in a new model (see [`AgentControl::set_model`]).
    pub fn set_model(&self, model: &EnergyModel) -> Result<(), AgentError> {
        self.control.set_model(model)
    }

    /// Replaces the thresholds.
    pub fn set_thresholds(&self, thresholds: LocalThresholds) -> Result<(), AgentError> {
        self.control.set_thresholds(thresholds)
    }

    /// Fault injection for supervision tests: fails the host loop.
    #[doc(hidden)]
    pub fn fail_host_loop(&self) -> Result<(), AgentError> {
        self.control
            .supervisor
            .send_message(SupervisorMsg::FailHostLoop)
            .map_err(|_| AgentError::Stopped)
    }

    /// Fault injection for supervision tests: fails one VM's actor.
    #[doc(hidden)]
    pub fn fail_vm(&self, vm: VmIndex) -> Result<(), AgentError> {
        self.control
            .supervisor
            .send_message(SupervisorMsg::FailVm(vm))
            .map_err(|_| AgentError::Stopped)
    }

    /// Runs `f` on the platform between two slices (tests and the lab: add a simulated VM,
    /// read the simulator's truth).
    pub async fn with_platform<T>(&self, f: impl FnOnce(&mut dyn HostPlatform) -> T) -> T {
        let mut p = self.shared.platform.lock().await;
        f(p.as_mut())
    }

    /// Waits for the run to end by itself (a simulated host with nothing left to run), and
    /// hands the platform back.
    pub async fn wait(self) -> Finished {
        let status = self.status.clone();
        let _ = self.join.await;
        let status = status.borrow().clone();
        let platform = Arc::try_unwrap(self.shared).ok().map(|s| s.platform.into_inner());
        Finished { status, platform }
    }

    /// Stops every actor, restores the host, and hands the platform back.
    pub async fn shutdown(self) -> Finished {
        self.control.supervisor.stop(Some("shutdown".into()));
        self.wait().await
    }
}

/// A stopped agent.
#[derive(Debug)]
pub struct Finished {
    /// The last status.
    pub status: AgentStatus,
    /// The platform, restored (`None` only if an actor still held it, which stopping prevents).
    pub platform: Option<Box<dyn HostPlatform>>,
}
