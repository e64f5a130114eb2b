//! The host supervisor: parent of the host loop and of every VM actor.
//!
//! Supervision policy (ractor's default would stop the supervisor when any child fails): a VM
//! actor that fails is started again with its VM's model and thresholds, and the host loop is
//! told its new address; a host loop that fails is started again with the VM actors that are
//! still running, so the other VMs are not disturbed. A child that stops normally (a VM that
//! went, a run that finished) is not restarted; when the host loop finishes, the supervisor stops
//! too. On stop the supervisor puts back every frequency and affinity the agent changed.

use std::{collections::BTreeMap, sync::Arc};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;

use super::{
    AgentStatus, Policy, Shared,
    host_loop::{HostLoop, LoopArgs, LoopMsg},
    vm_actor::{VmActor, VmMsg, VmPolicyState},
};
use crate::platform::{VmIndex, VmInfo};

/// Messages to the supervisor.
#[derive(Debug)]
pub(super) enum SupervisorMsg {
    /// Start an actor for a VM that appeared.
    SpawnVm(VmInfo, RpcReplyPort<Result<ActorRef<VmMsg>, String>>),
    /// Stop the actor of a VM that went.
    StopVm(VmIndex),
    /// A new model or new thresholds.
    SetPolicy(Box<Policy>),
    /// Start a learning run.
    StartLearning(String, super::LearningSettings),
    /// Stop the learning run.
    StopLearning,
    /// Fails the host loop, for supervision tests.
    #[doc(hidden)]
    FailHostLoop,
    /// Fails one VM's actor, for supervision tests.
    #[doc(hidden)]
    FailVm(VmIndex),
}

/// What the supervisor starts with.
#[derive(Debug)]
pub(super) struct SupervisorArgs {
    /// Shared platform and settings.
    pub shared: Arc<Shared>,
    /// Initial model and thresholds.
    pub policy: Policy,
    /// Where status goes.
    pub status: watch::Sender<AgentStatus>,
}

/// The actor.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostSupervisor;

/// Its state.
#[derive(Debug)]
pub(super) struct SupervisorState {
    shared: Arc<Shared>,
    policy: Policy,
    status: watch::Sender<AgentStatus>,
    host_loop: Option<ActorRef<LoopMsg>>,
    vms: BTreeMap<VmIndex, (VmInfo, ActorRef<VmMsg>)>,
    /// Children restarted after a failure.
    pub restarts: u64,
}

impl SupervisorState {
    fn vm_policy(&self, info: &VmInfo) -> VmPolicyState {
        VmPolicyState {
            predictor: self.policy.predictor.clone(),
            thresholds: self.policy.thresholds.resolve(info),
            objective: self.policy.objective,
        }
    }

    async fn spawn_loop(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let args = LoopArgs {
            shared: Arc::clone(&self.shared),
            supervisor: myself.clone(),
            vms: self.vms.clone(),
            status: self.status.clone(),
            model_version: self.policy.predictor.as_ref().map(|p| p.version()),
        };
        let (actor, _) = Actor::spawn_linked(None, HostLoop, args, myself.get_cell()).await?;
        self.host_loop = Some(actor);
        Ok(())
    }

    async fn spawn_vm(
        &self,
        myself: &ActorRef<SupervisorMsg>,
        info: &VmInfo,
    ) -> Result<ActorRef<VmMsg>, ActorProcessingErr> {
        let (actor, _) = Actor::spawn_linked(
            None,
            VmActor,
            (info.clone(), self.vm_policy(info)),
            myself.get_cell(),
        )
        .await?;
        Ok(actor)
    }

    fn which_vm(&self, cell: &ActorCell) -> Option<VmIndex> {
        self.vms.iter().find(|(_, (_, a))| a.get_id() == cell.get_id()).map(|(id, _)| *id)
    }

    fn is_host_loop(&self, cell: &ActorCell) -> bool {
        self.host_loop.as_ref().is_some_and(|l| l.get_id() == cell.get_id())
    }
}

impl Actor for HostSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            shared: args.shared,
            policy: args.policy,
            status: args.status,
            host_loop: None,
            vms: BTreeMap::new(),
            restarts: 0,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.spawn_loop(&myself).await
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(l) = state.host_loop.take() {
            l.stop_and_wait(Some("agent stopping".into()), None).await.ok();
        }
        for (_, (_, a)) in std::mem::take(&mut state.vms) {
            a.stop_and_wait(Some("agent stopping".into()), None).await.ok();
        }
        let mut platform = state.shared.platform.lock().await;
        match platform.restore() {
            Ok(()) => tracing::info!("restored every frequency and affinity the agent changed"),
            Err(e) => {
                tracing::error!(error = %e, "could not restore the host's frequency settings")
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::SpawnVm(info, reply) => {
                let result = match state.vms.get(&info.id) {
                    Some((_, a)) => Ok(a.clone()),
                    None => match state.spawn_vm(&myself, &info).await {
                        Ok(a) => {
                            state.vms.insert(info.id, (info, a.clone()));
                            Ok(a)
                        }
                        Err(e) => Err(e.to_string()),
                    },
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::StopVm(id) => {
                if let Some((_, a)) = state.vms.remove(&id) {
                    a.stop(Some("VM gone".into()));
                }
            }
            SupervisorMsg::SetPolicy(policy) => {
                state.policy = *policy;
                for (info, actor) in state.vms.values() {
                    actor.send_message(VmMsg::SetPolicy(state.vm_policy(info))).ok();
                }
                if let Some(l) = &state.host_loop {
                    let version = state.policy.predictor.as_ref().map(|p| p.version());
                    l.send_message(LoopMsg::ModelVersion(version)).ok();
                }
            }
            SupervisorMsg::StartLearning(id, settings) => {
                if let Some(l) = &state.host_loop {
                    l.send_message(LoopMsg::StartLearning(id, settings)).ok();
                }
            }
            SupervisorMsg::StopLearning => {
                if let Some(l) = &state.host_loop {
                    l.send_message(LoopMsg::StopLearning).ok();
                }
            }
            SupervisorMsg::FailHostLoop => {
                if let Some(l) = &state.host_loop {
                    l.send_message(LoopMsg::InjectFault).ok();
                }
            }
            SupervisorMsg::FailVm(id) => {
                if let Some((_, a)) = state.vms.get(&id) {
                    a.send_message(VmMsg::InjectFault).ok();
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                state.restarts += 1;
                if state.is_host_loop(&cell) {
                    tracing::error!(%error, "the host loop failed; restarting it");
                    state.spawn_loop(&myself).await?;
                } else if let Some(id) = state.which_vm(&cell) {
                    let info = state.vms[&id].0.clone();
                    tracing::error!(vm = %info.name, %error, "a VM actor failed; restarting it");
                    let actor = state.spawn_vm(&myself, &info).await?;
                    state.vms.insert(id, (info, actor.clone()));
                    if let Some(l) = &state.host_loop {
                        l.send_message(LoopMsg::VmRestarted(id, actor)).ok();
                    }
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) if state.is_host_loop(&cell) => {
                tracing::info!(
                    reason = reason.as_deref().unwrap_or(""),
                    "host loop finished; agent stopping"
                );
                state.host_loop = None;
                myself.stop(reason);
            }
            _ => {}
        }
        Ok(())
    }
}
