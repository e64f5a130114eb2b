//! `VmActor`: one per VM. It holds the VM's model, thresholds and scratch buffers and runs the
//! pure fast path ([`crate::fastpath::choose`]) on each timeslice's counters; the host loop asks
//! every VM actor at once and arbitrates their answers.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use vmgov_proto::{Objective, Predictor, RawCounters, Thresholds};

use crate::{
    fastpath::{self, Scratch, VmChoice, VmPolicy},
    platform::VmInfo,
};

/// Messages to a VM actor.
#[derive(Debug)]
pub(super) enum VmMsg {
    /// One slice's counters and the VM's guard floor; reply with the choice.
    Tick(Box<RawCounters>, usize, RpcReplyPort<VmChoice>),
    /// New model and thresholds.
    SetPolicy(VmPolicyState),
    /// Fails the actor, for supervision tests.
    #[doc(hidden)]
    InjectFault,
}

/// The model and thresholds a VM runs under, as the actor keeps them.
#[derive(Debug, Clone)]
pub(super) struct VmPolicyState {
    /// The active model.
    pub predictor: Option<Arc<Predictor>>,
    /// The VM's effective thresholds.
    pub thresholds: Option<Thresholds>,
    /// The objective.
    pub objective: Objective,
}

/// The actor.
#[derive(Debug, Clone, Copy)]
pub(super) struct VmActor;

/// Its state.
#[derive(Debug)]
pub(super) struct VmState {
    info: VmInfo,
    policy: VmPolicyState,
    scratch: Scratch,
}

impl Actor for VmActor {
    type Msg = VmMsg;
    type State = VmState;
    type Arguments = (VmInfo, VmPolicyState);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (info, policy): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        tracing::debug!(vm = %info.name, uuid = %info.uuid, "VM actor started");
        Ok(VmState { info, policy, scratch: Scratch::default() })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            VmMsg::Tick(counters, floor, reply) => {
                let policy = VmPolicy {
                    predictor: state.policy.predictor.as_deref(),
                    thresholds: state.policy.thresholds,
                    objective: state.policy.objective,
                    floor,
                };
                let choice = fastpath::choose(&counters, &policy, &mut state.scratch);
                // The host loop may have given up waiting; that is its business.
                let _ = reply.send(choice);
            }
            VmMsg::SetPolicy(policy) => state.policy = policy,
            VmMsg::InjectFault => {
                return Err(
                    format!("fault injected into the actor of VM {}", state.info.name).into()
                );
            }
        }
        Ok(())
    }
}
