//! `FleetService`: thresholds by scope, hosts and VMs, models (train, activate, roll back),
//! learning runs, and what-if prediction. Writes go through the leader (the store fences them);
//! a follower answers UNAVAILABLE naming the leader. Bad input gets INVALID_ARGUMENT and changes
//! nothing.

use std::{collections::HashMap, time::Duration};

use tonic::{Request, Response, Status};
use vmgov_proto::{
    Feature, FeatureVector, Objective, Placement, Predictor, RawCounters, Target, ThresholdScope,
    Thresholds, convert, decide, features, pb, scope,
};

use super::{Coordinator, LearningRun, now_unix_ms};
use crate::{
    store::{Store, ThresholdRecord},
    train::{self, TrainRequest},
};

fn entry(r: &ThresholdRecord) -> pb::ThresholdEntry {
    pb::ThresholdEntry {
        scope: Some((&r.scope).into()),
        thresholds: Some((&r.thresholds).into()),
        updated_unix_ms: r.updated_unix_ms,
        updated_by: r.updated_by.clone(),
    }
}

fn scope_of(s: Option<&pb::ThresholdScope>) -> Result<ThresholdScope, Status> {
    Ok(ThresholdScope::try_from(s.ok_or_else(|| Status::invalid_argument("scope is required"))?)?)
}

fn summary(model: &vmgov_proto::EnergyModel, active: bool) -> pb::ModelSummary {
    let wire = pb::EnergyModel::from(model);
    pb::ModelSummary {
        hardware_class: model.hardware_class.clone(),
        version: model.version,
        active,
        training: wire.training,
        mean_mape_perf: model.mean_mape(Target::Perf).unwrap_or(0.0),
        mean_mape_power: model.mean_mape(Target::Power).unwrap_or(0.0),
        mean_mape_throughput: model.mean_mape(Target::Throughput).unwrap_or(0.0),
    }
}

/// Mean of the three targets' mean MAPE: how activation compares models.
fn overall_mape(model: &vmgov_proto::EnergyModel) -> f64 {
    Target::ALL.iter().map(|t| model.mean_mape(*t).unwrap_or(f64::INFINITY)).sum::<f64>() / 3.0
}

impl<S: Store> Coordinator<S> {
    async fn summarise(&self, class: &str, version: u64) -> Result<pb::ModelSummary, Status> {
        let model = self
            .shared
            .store
            .model(class, version)
            .await?
            .ok_or_else(|| Status::not_found(format!("no model {class} v{version}")))?;
        let active = self.shared.store.active(class).await?.is_some_and(|(v, _, _)| v == version);
        Ok(summary(&model, active))
    }

    async fn pstates_of(&self, class: &str) -> Result<vmgov_proto::PStateTable, Status> {
        if let Some(h) =
            self.shared.store.hosts().await?.into_iter().find(|h| h.hardware_class == class)
        {
            return Ok(h.pstates);
        }
        if let Some(v) = self.shared.store.model_versions(class).await?.last()
            && let Some(m) = self.shared.store.model(class, *v).await?
        {
            return Ok(m.pstates);
        }
        Err(Status::failed_precondition(format!(
            "class {class} has no connected host and no model: its P-state table is unknown"
        )))
    }

    /// Watches a learning run and ends it on time or on its sample target.
    fn watch_learning(&self, id: String, class: String, plan: pb::StartLearningCommand) {
        let me = self.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let seen = me.shared.store.samples_seen(&class).await.unwrap_or(0);
                let mut runs = me.shared.learning.lock().await;
                let Some(run) = runs.iter_mut().find(|r| r.status.learning_id == id) else {
                    return;
                };
                if run.status.state != pb::LearningState::Running as i32 {
                    return;
                }
                run.status.samples = seen.saturating_sub(run.samples_at_start);
                let by_time = if plan.duration_seconds > 0.0 {
                    started.elapsed().as_secs_f64() / plan.duration_seconds
                } else {
                    0.0
                };
                #[allow(clippy::cast_precision_loss, reason = "sample counts are far below 2^53")]
                let by_samples = if plan.sample_target > 0 {
                    run.status.samples as f64
                        / (plan.sample_target as f64 * run.hosts.len().max(1) as f64)
                } else {
                    0.0
                };
                // Every host said it is done (it stops on its own target or time).
                let all_reported = run
                    .hosts
                    .iter()
                    .all(|h| run.status.hosts.iter().any(|p| &p.host_id == h && p.finished));
                run.status.fraction_done =
                    if all_reported { 1.0 } else { by_time.max(by_samples).min(1.0) };
                if run.status.fraction_done >= 1.0 {
                    run.status.state = pb::LearningState::Finished as i32;
                    me.event("", pb::fleet_event::Event::Learning(run.status.clone()));
                    let hosts = run.hosts.clone();
                    drop(runs);
                    tracing::info!(learning = %id, "learning finished");
                    me.send_learning(
                        &hosts,
                        pb::learning_command::Command::Stop(pb::StopLearningCommand {}),
                        &id,
                    )
                    .await;
                    return;
                }
            }
        });
    }
}

#[tonic::async_trait]
impl<S: Store> pb::fleet_service_server::FleetService for Coordinator<S> {
    async fn set_threshold(
        &self,
        request: Request<pb::SetThresholdRequest>,
    ) -> Result<Response<pb::ThresholdEntry>, Status> {
        let r = request.into_inner();
        let scope = scope_of(r.scope.as_ref())?;
        let thresholds = Thresholds::try_from(
            r.thresholds
                .as_ref()
                .ok_or_else(|| Status::invalid_argument("thresholds are required"))?,
        )?;
        let epoch = self.leader_epoch().await?;
        let record = ThresholdRecord {
            scope,
            thresholds,
            updated_unix_ms: now_unix_ms(),
            updated_by: r.updated_by,
        };
        self.shared.store.put_threshold(epoch, record.clone()).await?;
        self.event("", pb::fleet_event::Event::ThresholdSet(entry(&record)));
        Ok(Response::new(entry(&record)))
    }

    async fn get_threshold(
        &self,
        request: Request<pb::GetThresholdRequest>,
    ) -> Result<Response<pb::ThresholdEntry>, Status> {
        let scope = scope_of(request.into_inner().scope.as_ref())?;
        let (entries, _) = self.shared.store.thresholds().await?;
        entries
            .iter()
            .find(|e| e.scope == scope)
            .map(|e| Response::new(entry(e)))
            .ok_or_else(|| Status::not_found(format!("no threshold set at {scope}")))
    }

    async fn list_thresholds(
        &self,
        _request: Request<pb::ListThresholdsRequest>,
    ) -> Result<Response<pb::ListThresholdsResponse>, Status> {
        let (mut entries, _) = self.shared.store.thresholds().await?;
        entries.sort_by(|a, b| a.scope.cmp(&b.scope));
        Ok(Response::new(pb::ListThresholdsResponse {
            entries: entries.iter().map(entry).collect(),
        }))
    }

    async fn delete_threshold(
        &self,
        request: Request<pb::DeleteThresholdRequest>,
    ) -> Result<Response<pb::DeleteThresholdResponse>, Status> {
        let scope = scope_of(request.into_inner().scope.as_ref())?;
        let epoch = self.leader_epoch().await?;
        let removed = self
            .shared
            .store
            .delete_threshold(epoch, &scope)
            .await?
            .ok_or_else(|| Status::not_found(format!("no threshold set at {scope}")))?;
        self.event("", pb::fleet_event::Event::ThresholdDeleted((&scope).into()));
        Ok(Response::new(pb::DeleteThresholdResponse { removed: Some(entry(&removed)) }))
    }

    async fn explain_thresholds(
        &self,
        request: Request<pb::ExplainThresholdsRequest>,
    ) -> Result<Response<pb::ExplainThresholdsResponse>, Status> {
        let r = request.into_inner();
        if r.vm_id.is_empty() {
            return Err(Status::invalid_argument("vm_id is required"));
        }
        let (mut host_id, mut class) = (r.host_id, r.hardware_class);
        if host_id.is_empty() || class.is_empty() {
            let hosts = self.shared.store.hosts().await?;
            if let Some(h) =
                hosts.iter().find(|h| h.vms.iter().any(|v| v.vm_id == r.vm_id || v.name == r.vm_id))
            {
                host_id.clone_from(&h.host_id);
                class.clone_from(&h.hardware_class);
            }
        }
        let (entries, _) = self.shared.store.thresholds().await?;
        let map: HashMap<ThresholdScope, ThresholdRecord> =
            entries.into_iter().map(|e| (e.scope.clone(), e)).collect();
        let placement = Placement { vm_id: &r.vm_id, host_id: &host_id, hardware_class: &class };
        let candidates = scope::explain(&placement, |s| map.get(s))
            .into_iter()
            .map(|(s, e)| pb::ScopeCandidate {
                scope: Some((&s).into()),
                present: e.is_some(),
                thresholds: e.map(|e| (&e.thresholds).into()),
            })
            .collect();
        let effective = scope::resolve(&placement, |s| map.get(s)).map(|(_, e)| entry(e));
        Ok(Response::new(pb::ExplainThresholdsResponse { effective, candidates }))
    }

    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        let class = request.into_inner().hardware_class;
        let decisions = self.shared.decisions.lock().await.clone();
        let hosts = self
            .shared
            .store
            .hosts()
            .await?
            .into_iter()
            .filter(|h| class.is_empty() || h.hardware_class == class)
            .map(|h| {
                let d = decisions.get(&h.host_id);
                pb::HostStatus {
                    host_id: h.host_id.clone(),
                    hardware_class: h.hardware_class.clone(),
                    connected: true,
                    last_seen_unix_ms: d.map_or(h.connected_unix_ms, |d| d.window_end_unix_ms),
                    agent_version: h.agent_version.clone(),
                    pstates: Some((&h.pstates).into()),
                    cores: d
                        .map(|d| {
                            d.core_frequency_hz
                                .iter()
                                .enumerate()
                                .map(|(c, f)| pb::CoreStatus {
                                    core: u32::try_from(c).unwrap_or(u32::MAX),
                                    frequency_hz: *f,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    model_version: d.and_then(|d| d.vms.first()).map_or(0, |v| v.model_version),
                    dry_run: d.is_some_and(|d| d.dry_run),
                    energy_joules: d.and_then(|d| d.package_energy_joules).unwrap_or(0.0),
                    energy_saved_joules: d
                        .map_or(0.0, |d| d.vms.iter().map(|v| v.energy_saved_joules).sum()),
                    vms: h
                        .vms
                        .iter()
                        .map(|v| pb::VmStatus {
                            vm: Some(pb::VmInfo {
                                vm_id: v.vm_id.clone(),
                                name: v.name.clone(),
                                vcpus: v.vcpus,
                            }),
                            host_id: h.host_id.clone(),
                            decision: d
                                .and_then(|d| d.vms.iter().find(|x| x.vm_id == v.vm_id).cloned()),
                        })
                        .collect(),
                    learning_id: String::new(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn list_vms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        let r = request.into_inner();
        let hosts = self
            .list_hosts(Request::new(pb::ListHostsRequest { hardware_class: r.hardware_class }))
            .await?
            .into_inner()
            .hosts;
        let vms = hosts
            .into_iter()
            .filter(|h| r.host_id.is_empty() || h.host_id == r.host_id)
            .flat_map(|h| h.vms)
            .collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let class = request.into_inner().hardware_class;
        let classes =
            if class.is_empty() { self.shared.store.model_classes().await? } else { vec![class] };
        let mut models = Vec::new();
        for c in classes {
            for v in self.shared.store.model_versions(&c).await? {
                models.push(self.summarise(&c, v).await?);
            }
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::EnergyModel>, Status> {
        let r = request.into_inner();
        let version = if r.version == 0 {
            self.shared.store.active(&r.hardware_class).await?.map(|(v, _, _)| v).ok_or_else(
                || Status::not_found(format!("class {} has no active model", r.hardware_class)),
            )?
        } else {
            r.version
        };
        let model =
            self.shared.store.model(&r.hardware_class, version).await?.ok_or_else(|| {
                Status::not_found(format!("no model {} v{version}", r.hardware_class))
            })?;
        Ok(Response::new((&model).into()))
    }

    async fn train_model(
        &self,
        request: Request<pb::TrainModelRequest>,
    ) -> Result<Response<pb::ModelSummary>, Status> {
        let r = request.into_inner();
        let epoch = self.leader_epoch().await?;
        let class = r.hardware_class.clone();
        if class.is_empty() {
            return Err(Status::invalid_argument("hardware_class is required"));
        }
        let features = if r.features.is_empty() {
            Feature::REPORT.to_vec()
        } else {
            convert::features_from_names(&r.features)?
        };
        let pstates = self.pstates_of(&class).await?;
        let samples = self.shared.store.samples(&class).await?;
        let version = self.shared.store.model_versions(&class).await?.last().map_or(1, |v| v + 1);
        let request = TrainRequest {
            hardware_class: class.clone(),
            version,
            pstates,
            features,
            algorithm: convert::algorithm_from_pb(r.algorithm)?,
            alpha: r.alpha,
            folds: if r.folds == 0 { 5 } else { r.folds },
            created_unix_ms: now_unix_ms(),
            notes: format!("trained by {} on {} samples", self.shared.id, samples.len()),
        };
        // Training is CPU work: keep it off the async workers.
        let model = tokio::task::spawn_blocking(move || train::train(&request, &samples))
            .await
            .map_err(|e| Status::internal(format!("training task failed: {e}")))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.shared.store.put_model(epoch, &model).await?;
        tracing::info!(class = %class, version, mape = overall_mape(&model), "model trained");
        if r.activate_if_better {
            let better = match self.shared.store.active(&class).await? {
                None => true,
                Some((v, _, _)) => match self.shared.store.model(&class, v).await? {
                    Some(current) => overall_mape(&model) <= overall_mape(&current),
                    None => true,
                },
            };
            if better {
                self.shared.store.activate(epoch, &class, version).await?;
                tracing::info!(class = %class, version, "model activated");
            }
        }
        let summary = self.summarise(&class, version).await?;
        self.event("", pb::fleet_event::Event::ModelTrained(summary.clone()));
        if summary.active {
            self.event("", pb::fleet_event::Event::ModelActivated(summary.clone()));
        }
        Ok(Response::new(summary))
    }

    async fn activate_model(
        &self,
        request: Request<pb::ActivateModelRequest>,
    ) -> Result<Response<pb::ModelSummary>, Status> {
        let r = request.into_inner();
        let epoch = self.leader_epoch().await?;
        self.shared.store.activate(epoch, &r.hardware_class, r.version).await?;
        let summary = self.summarise(&r.hardware_class, r.version).await?;
        self.event("", pb::fleet_event::Event::ModelActivated(summary.clone()));
        Ok(Response::new(summary))
    }

    async fn rollback_model(
        &self,
        request: Request<pb::RollbackModelRequest>,
    ) -> Result<Response<pb::ModelSummary>, Status> {
        let r = request.into_inner();
        let epoch = self.leader_epoch().await?;
        let version = if r.version == 0 {
            let (_, _, history) =
                self.shared.store.active(&r.hardware_class).await?.ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "class {} has no active model",
                        r.hardware_class
                    ))
                })?;
            *history.last().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "class {} has no earlier active model to return to",
                    r.hardware_class
                ))
            })?
        } else {
            r.version
        };
        self.shared.store.activate(epoch, &r.hardware_class, version).await?;
        let summary = self.summarise(&r.hardware_class, version).await?;
        self.event("", pb::fleet_event::Event::ModelActivated(summary.clone()));
        Ok(Response::new(summary))
    }

    async fn start_learning(
        &self,
        request: Request<pb::StartLearningRequest>,
    ) -> Result<Response<pb::LearningStatus>, Status> {
        let r = request.into_inner();
        self.leader_epoch().await?;
        let plan = r.plan.unwrap_or_default();
        if plan.duration_seconds <= 0.0 && plan.sample_target == 0 {
            return Err(Status::invalid_argument("give a duration_seconds or a sample_target"));
        }
        if !(plan.duration_seconds.is_finite() && plan.duration_seconds >= 0.0) {
            return Err(Status::invalid_argument("duration_seconds must be a non-negative number"));
        }
        let connected = self.connected_hosts(&r.hardware_class).await;
        let hosts = if r.host_ids.is_empty() { connected } else { r.host_ids.clone() };
        if hosts.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no connected host of class {}",
                r.hardware_class
            )));
        }
        let id = format!("learn-{}", now_unix_ms());
        let missing = self
            .send_learning(&hosts, pb::learning_command::Command::Start(plan.clone()), &id)
            .await;
        let status = pb::LearningStatus {
            learning_id: id.clone(),
            hardware_class: r.hardware_class.clone(),
            state: pb::LearningState::Running as i32,
            started_unix_ms: now_unix_ms(),
            samples: 0,
            fraction_done: 0.0,
            hosts: Vec::new(),
            hosts_unreachable: missing,
        };
        let samples_at_start = self.shared.store.samples_seen(&r.hardware_class).await?;
        self.event("", pb::fleet_event::Event::Learning(status.clone()));
        self.shared.learning.lock().await.push(LearningRun {
            status: status.clone(),
            samples_at_start,
            plan: plan.clone(),
            hosts,
        });
        self.watch_learning(id, r.hardware_class, plan);
        Ok(Response::new(status))
    }

    async fn stop_learning(
        &self,
        request: Request<pb::StopLearningRequest>,
    ) -> Result<Response<pb::LearningStatus>, Status> {
        let id = request.into_inner().learning_id;
        let mut runs = self.shared.learning.lock().await;
        let run = runs
            .iter_mut()
            .find(|r| r.status.learning_id == id)
            .ok_or_else(|| Status::not_found(format!("no learning run {id}")))?;
        if run.status.state == pb::LearningState::Running as i32 {
            run.status.state = pb::LearningState::Stopped as i32;
        }
        let (status, hosts) = (run.status.clone(), run.hosts.clone());
        drop(runs);
        self.send_learning(
            &hosts,
            pb::learning_command::Command::Stop(pb::StopLearningCommand {}),
            &id,
        )
        .await;
        Ok(Response::new(status))
    }

    async fn get_learning(
        &self,
        request: Request<pb::GetLearningRequest>,
    ) -> Result<Response<pb::LearningStatus>, Status> {
        let id = request.into_inner().learning_id;
        let runs = self.shared.learning.lock().await;
        let run = if id.is_empty() {
            runs.last()
        } else {
            runs.iter().find(|r| r.status.learning_id == id)
        };
        run.map(|r| Response::new(r.status.clone())).ok_or_else(|| {
            Status::not_found(if id.is_empty() {
                "no learning run yet".into()
            } else {
                format!("no learning run {id}")
            })
        })
    }

    async fn predict(
        &self,
        request: Request<pb::PredictRequest>,
    ) -> Result<Response<pb::PredictResponse>, Status> {
        let r = request.into_inner();
        let model = self
            .get_model(Request::new(pb::GetModelRequest {
                hardware_class: r.hardware_class.clone(),
                version: r.model_version,
            }))
            .await?
            .into_inner();
        let model = vmgov_proto::EnergyModel::try_from(&model)?;
        let fv = match r.workload {
            Some(pb::predict_request::Workload::Features(f)) => {
                let mut fv = FeatureVector::new();
                for (name, value) in &f.values {
                    let feature: Feature =
                        name.parse().map_err(|e: vmgov_proto::features::UnknownFeature| {
                            Status::invalid_argument(e.to_string())
                        })?;
                    fv.set(feature, *value);
                }
                fv
            }
            Some(pb::predict_request::Workload::Counters(c)) => {
                features::derive(&RawCounters::try_from(&c)?)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?
            }
            None => {
                return Err(Status::invalid_argument("give the workload as features or counters"));
            }
        };
        let thresholds = match &r.thresholds {
            Some(t) => Thresholds::try_from(t)?,
            None => Thresholds::NONE,
        };
        let objective: Objective = convert::objective_from_pb(r.objective)?;
        let predictor = Predictor::new(&model).map_err(|e| Status::internal(e.to_string()))?;
        let predictions =
            predictor.predict(&fv).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let d = decide(&predictions, &thresholds, objective);
        Ok(Response::new(pb::PredictResponse {
            hardware_class: model.hardware_class.clone(),
            model_version: model.version,
            pstates: predictions
                .iter()
                .enumerate()
                .map(|(i, p)| pb::PStatePrediction {
                    pstate_index: u32::try_from(i).unwrap_or(u32::MAX),
                    frequency_hz: model.pstates.frequency_hz(i).unwrap_or(0.0),
                    predicted: Some(p.into()),
                    feasible: thresholds.admit(p),
                    objective_value: objective.value(p),
                })
                .collect(),
            chosen_pstate_index: u32::try_from(d.index).unwrap_or(u32::MAX),
            chosen_frequency_hz: model.pstates.frequency_hz(d.index).unwrap_or(0.0),
            feasible: d.feasible,
        }))
    }

    type WatchEventsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FleetEvent, Status>> + Send>>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        use pb::fleet_event::Event;
        let kinds: Vec<i32> = request.into_inner().kinds;
        let kind_of = |e: &Event| {
            (match e {
                Event::HostConnected(_) | Event::HostDisconnected(_) => pb::EventKind::Host,
                Event::VmStarted(_) | Event::VmStopped(_) => pb::EventKind::Vm,
                Event::ModelTrained(_) | Event::ModelActivated(_) => pb::EventKind::Model,
                Event::ThresholdSet(_) | Event::ThresholdDeleted(_) => pb::EventKind::Threshold,
                Event::Learning(_) => pb::EventKind::Learning,
                Event::LeaderChanged(_) => pb::EventKind::Leader,
                Event::ThresholdMissed(_) => pb::EventKind::Sla,
            }) as i32
        };
        let events = tokio_stream::wrappers::BroadcastStream::new(self.shared.events.subscribe());
        let stream = tokio_stream::StreamExt::filter_map(events, move |e| match e {
            Ok(ev)
                if kinds.is_empty()
                    || ev.event.as_ref().is_some_and(|x| kinds.contains(&kind_of(x))) =>
            {
                Some(Ok(ev))
            }
            Ok(_) => None,
            // A watcher too slow to keep up is told how many events it missed.
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Err(Status::data_loss(format!("{n} events were missed; watch again"))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
