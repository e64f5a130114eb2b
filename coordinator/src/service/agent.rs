//! `AgentService.Connect`: one bidirectional stream per agent.
//!
//! The first message must be a hello; it is validated (host, class, P-state table, and the
//! table against the class's active model), the host is registered, and the agent gets the active
//! model of its class, the effective thresholds of its VMs and any learning run it belongs to.
//! Then: sample batches are stored once per (host, batch id) and acknowledged by id, VM
//! lifecycle updates the registration (and the thresholds pushed), decision summaries are kept
//! for status (and every new verification window below a VM's thresholds becomes a
//! `ThresholdMissed` event), and every change in the store (a model activated, a threshold set,
//! through any coordinator) is pushed as it happens.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use vmgov_proto::{EnergyModel, PStateTable, Ratios, RawCounters, pb};

use super::{AgentStream, Coordinator, now_unix_ms};
use crate::{
    store::{Change, HostRecord, Store, VmRecord},
    train::LabelledSample,
};

/// Pushes queued per agent before the stream counts as stuck (the agent then resyncs on
/// reconnect).
const QUEUE: usize = 256;

type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

fn vm_record(vm: &pb::VmInfo) -> VmRecord {
    VmRecord { vm_id: vm.vm_id.clone(), name: vm.name.clone(), vcpus: vm.vcpus }
}

/// Checks a hello and turns it into a host record.
fn validate_hello(hello: &pb::Hello, coordinator: &str) -> Result<HostRecord, Status> {
    if hello.host_id.trim().is_empty() {
        return Err(Status::invalid_argument("hello: host_id is empty"));
    }
    if hello.hardware_class.trim().is_empty() {
        return Err(Status::invalid_argument("hello: hardware_class is empty"));
    }
    let table = hello
        .pstates
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("hello: pstates is required"))?;
    let pstates = PStateTable::try_from(table)
        .map_err(|e| Status::invalid_argument(format!("hello: {e}")))?;
    Ok(HostRecord {
        host_id: hello.host_id.clone(),
        hardware_class: hello.hardware_class.clone(),
        pstates,
        agent_version: hello.agent_version.clone(),
        vms: hello.vms.iter().map(vm_record).collect(),
        coordinator: coordinator.into(),
        connected_unix_ms: now_unix_ms(),
    })
}

/// The labelled samples of a batch (unlabelled ones are not training data).
fn labelled(batch: &pb::SampleBatch) -> Result<Vec<LabelledSample>, Status> {
    batch
        .samples
        .iter()
        .filter_map(|s| s.labels.as_ref().map(|l| (s, l)))
        .map(|(s, l)| {
            let counters = s
                .counters
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("sample without counters"))?;
            Ok(LabelledSample {
                pstate: usize::try_from(s.pstate_index).unwrap_or(usize::MAX),
                counters: RawCounters::try_from(counters)?,
                labels: Ratios::from(l),
            })
        })
        .collect()
}

#[tonic::async_trait]
impl<S: Store> pb::agent_service_server::AgentService for Coordinator<S> {
    type ConnectStream = ConnectStream;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::failed_precondition("the stream closed before a hello"))?;
        let Some(pb::agent_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::failed_precondition(
                "the first message on a stream must be a hello",
            ));
        };
        let mut host = validate_hello(&hello, &self.shared.id)?;
        let class = host.hardware_class.clone();
        if let Some(push) = self.model_push(&class).await?
            && let Some(model) = push.model.as_ref()
        {
            let model = EnergyModel::try_from(model)?;
            model.check_host(&host.pstates).map_err(|e| {
                Status::invalid_argument(format!(
                    "hello: host {} does not match class {class}: {e}",
                    host.host_id
                ))
            })?;
        }
        self.shared.store.put_host(host.clone()).await?;
        tracing::info!(host = %host.host_id, class = %class, vms = host.vms.len(), "agent connected");
        self.event(
            &host.host_id,
            pb::fleet_event::Event::HostConnected(pb::HostConnected {
                hardware_class: class.clone(),
                agent_version: host.agent_version.clone(),
            }),
        );

        let (tx, rx) = mpsc::channel(QUEUE);
        // The initial state: model (unless the agent holds it already), thresholds, learning.
        if let Some(push) = self.model_push(&class).await? {
            let held = hello.model_fence.map(|f| (f.epoch, f.generation));
            let offered = push.fence.map(|f| (f.epoch, f.generation));
            if held.is_none() || offered > held {
                let _ = tx.send(Ok(msg_model(push))).await;
            }
        }
        let _ = tx.send(Ok(msg_thresholds(self.threshold_push(&host).await?))).await;
        let runs = self.shared.learning.lock().await.clone();
        for run in runs.iter().filter(|r| {
            r.status.state == pb::LearningState::Running as i32
                && r.status.hardware_class == class
                && r.hosts.contains(&host.host_id)
        }) {
            let _ = self
                .send_learning(
                    std::slice::from_ref(&host.host_id),
                    pb::learning_command::Command::Start(run.plan.clone()),
                    &run.status.learning_id,
                )
                .await;
        }
        self.shared
            .streams
            .lock()
            .await
            .insert(host.host_id.clone(), AgentStream { class: class.clone(), tx: tx.clone() });

        // Pushes driven by the store's changes, whichever coordinator made them.
        let mut changes = self.shared.store.subscribe();
        let me = self.clone();
        let host_id = host.host_id.clone();
        let push_tx = tx.clone();
        let pusher =
            tokio::spawn(async move {
                loop {
                    let change = match changes.recv().await {
                        Ok(c) => c,
                        // Missed changes: resend everything current.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            Change::Thresholds(0)
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    };
                    let msg =
                        match change {
                            Change::ActiveModel { class: c, .. } if c == class => {
                                me.model_push(&class).await.ok().flatten().map(msg_model)
                            }
                            // A threshold changed somewhere: re-resolve this host's VMs. Host
                            // registrations are not watched here: a host's own VM changes come
                            // through its stream (see `handle`), and reacting to every host's
                            // registration would cost O(hosts²) when a fleet connects.
                            Change::Thresholds(_) => {
                                let current =
                                    me.shared.store.hosts().await.ok().and_then(|hs| {
                                        hs.into_iter().find(|h| h.host_id == host_id)
                                    });
                                match current {
                                    Some(h) => me.threshold_push(&h).await.ok().map(msg_thresholds),
                                    None => None,
                                }
                            }
                            _ => None,
                        };
                    if let Some(m) = msg
                        && push_tx.send(Ok(m)).await.is_err()
                    {
                        break;
                    }
                }
            });

        // The agent's messages.
        let me = self.clone();
        tokio::spawn(async move {
            while let Some(next) = inbound.next().await {
                let msg = match next {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::info!(host = %host.host_id, error = %e, "agent stream failed");
                        break;
                    }
                };
                if let Err(e) = me.handle(&mut host, msg, &tx).await {
                    tracing::warn!(host = %host.host_id, error = %e, "agent message refused");
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
            pusher.abort();
            me.shared.streams.lock().await.remove(&host.host_id);
            if let Err(e) = me.shared.store.remove_host(&host.host_id).await {
                tracing::warn!(host = %host.host_id, error = %e, "could not deregister the host");
            }
            tracing::info!(host = %host.host_id, "agent disconnected");
            me.event(
                &host.host_id,
                pb::fleet_event::Event::HostDisconnected(pb::HostDisconnected {
                    reason: "stream ended".into(),
                }),
            );
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn msg_model(push: pb::ModelPush) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { msg: Some(pb::coordinator_message::Msg::Model(push)) }
}

fn msg_thresholds(push: pb::ThresholdPush) -> pb::CoordinatorMessage {
    pb::CoordinatorMessage { msg: Some(pb::coordinator_message::Msg::Thresholds(push)) }
}

impl<S: Store> Coordinator<S> {
    async fn handle(
        &self,
        host: &mut HostRecord,
        msg: pb::AgentMessage,
        tx: &mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    ) -> Result<(), Status> {
        use pb::agent_message::Msg;
        match msg.msg {
            Some(Msg::Hello(_)) => {
                return Err(Status::failed_precondition("a second hello on one stream"));
            }
            Some(Msg::Samples(batch)) => {
                let samples = labelled(&batch)?;
                let n = samples.len();
                let new = self
                    .shared
                    .store
                    .append_samples(&host.hardware_class, &host.host_id, batch.batch_id, samples)
                    .await?;
                tracing::debug!(host = %host.host_id, batch = batch.batch_id, samples = n, new, "sample batch");
                let ack = pb::CoordinatorMessage {
                    msg: Some(pb::coordinator_message::Msg::Ack(pb::BatchAck {
                        batch_ids: vec![batch.batch_id],
                    })),
                };
                let _ = tx.send(Ok(ack)).await;
            }
            Some(Msg::VmStarted(started)) => {
                self.event(&host.host_id, pb::fleet_event::Event::VmStarted(started.clone()));
                if let Some(vm) = started.vm {
                    host.vms.retain(|v| v.vm_id != vm.vm_id);
                    host.vms.push(vm_record(&vm));
                    self.shared.store.put_host(host.clone()).await?;
                    // The new VM's thresholds.
                    let _ = tx.send(Ok(msg_thresholds(self.threshold_push(host).await?))).await;
                }
            }
            Some(Msg::VmStopped(stopped)) => {
                self.event(&host.host_id, pb::fleet_event::Event::VmStopped(stopped.clone()));
                host.vms.retain(|v| v.vm_id != stopped.vm_id);
                self.shared.store.put_host(host.clone()).await?;
            }
            Some(Msg::Decisions(summary)) => {
                let misses = {
                    let mut decisions = self.shared.decisions.lock().await;
                    let misses = threshold_misses(decisions.get(&host.host_id), &summary);
                    decisions.insert(host.host_id.clone(), summary);
                    misses
                };
                for missed in misses {
                    tracing::warn!(host = %host.host_id, vm = %missed.vm_id, "VM below its thresholds");
                    self.event(&host.host_id, pb::fleet_event::Event::ThresholdMissed(missed));
                }
            }
            Some(Msg::LearningProgress(mut progress)) => {
                progress.host_id = host.host_id.clone();
                let mut runs = self.shared.learning.lock().await;
                if let Some(run) =
                    runs.iter_mut().find(|r| r.status.learning_id == progress.learning_id)
                {
                    run.status.hosts.retain(|h| h.host_id != progress.host_id);
                    run.status.hosts.push(progress);
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// The VMs of `now` with a verification window that `previous` did not have and whose observed
/// ratios fall short of their thresholds: one miss per window, however often the agent repeats
/// its summary. A count that went down is a restarted agent counting afresh: its window is new.
fn threshold_misses(
    previous: Option<&pb::DecisionSummary>,
    now: &pb::DecisionSummary,
) -> Vec<pb::ThresholdMissed> {
    now.vms
        .iter()
        .filter(|d| {
            let seen = previous
                .and_then(|p| p.vms.iter().find(|x| x.vm_id == d.vm_id))
                .map_or(0, |x| x.observed_windows);
            d.observed_windows > 0 && d.observed_windows != seen
        })
        .filter(|d| d.below_thresholds())
        .map(|d| pb::ThresholdMissed {
            vm_id: d.vm_id.clone(),
            thresholds: d.thresholds,
            observed: d.observed,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(vm: &str, windows: u64, perf: f64) -> pb::VmDecision {
        pb::VmDecision {
            vm_id: vm.into(),
            observed: Some(pb::Ratios { perf, power: 0.5, throughput: 1.0 }),
            thresholds: Some(pb::Thresholds { perf: 0.7, throughput: 0.7 }),
            observed_windows: windows,
            ..pb::VmDecision::default()
        }
    }

    fn summary(vms: Vec<pb::VmDecision>) -> pb::DecisionSummary {
        pb::DecisionSummary { vms, ..pb::DecisionSummary::default() }
    }

    #[test]
    fn each_window_below_the_thresholds_is_one_miss() {
        let first = summary(vec![decision("a", 1, 0.6), decision("b", 1, 0.9)]);
        let misses = threshold_misses(None, &first);
        assert_eq!(misses.iter().map(|m| m.vm_id.as_str()).collect::<Vec<_>>(), ["a"]);
        assert!((misses[0].observed.unwrap_or_default().perf - 0.6).abs() < 1e-12);
        // The same window again: nothing new.
        assert!(threshold_misses(Some(&first), &first).is_empty());
        // A new window, still short; and b's new window falls short too.
        let second = summary(vec![decision("a", 2, 0.65), decision("b", 2, 0.69)]);
        assert_eq!(threshold_misses(Some(&first), &second).len(), 2);
        // Met again: no miss. No thresholds, or no observation: nothing to miss.
        let third = summary(vec![decision("a", 3, 0.8)]);
        assert!(threshold_misses(Some(&second), &third).is_empty());
        // The agent restarted and counts from 1 again: its first window is new.
        let restarted = summary(vec![decision("a", 1, 0.5)]);
        assert_eq!(threshold_misses(Some(&third), &restarted).len(), 1);
        let mut free = decision("c", 1, 0.1);
        free.thresholds = None;
        let mut blind = decision("d", 1, 0.1);
        blind.observed = None;
        assert!(threshold_misses(None, &summary(vec![free, blind])).is_empty());
    }

    fn hello() -> pb::Hello {
        pb::Hello {
            host_id: "h1".into(),
            hardware_class: "phenom".into(),
            pstates: Some(pb::PStateTable {
                pstates: vec![
                    pb::PState { frequency_hz: 1e9, voltage_v: None },
                    pb::PState { frequency_hz: 2e9, voltage_v: None },
                ],
            }),
            agent_version: "0.1.0".into(),
            ..pb::Hello::default()
        }
    }

    #[test]
    fn hellos_are_validated() {
        assert!(validate_hello(&hello(), "c").is_ok());
        let mut h = hello();
        h.host_id = " ".into();
        assert_eq!(validate_hello(&h, "c").unwrap_err().code(), tonic::Code::InvalidArgument);
        let mut h = hello();
        h.pstates = None;
        assert!(validate_hello(&h, "c").unwrap_err().message().contains("pstates"));
        let mut h = hello();
        if let Some(t) = h.pstates.as_mut() {
            t.pstates.reverse();
        }
        assert!(validate_hello(&h, "c").unwrap_err().message().contains("previous one"));
    }
}
