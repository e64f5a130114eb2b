//! The lab's fleet: a coordinator serving real gRPC on a loopback port, over the in-memory store
//! or etcd, and agents on simulated hosts ([`LabPlatform`]) that talk to it through the real
//! coordinator link. The lab itself is a `FleetService` client like any operator: it commands
//! learning, trains and activates the model, and sets thresholds by host scope.
//!
//! Learning runs one training host at a time: the coordinator counts a learning run's progress
//! in samples of the class, so hosts learning at once could end each other's run early; one at a
//! time, each host sweeps exactly its sample target from the start of its workload, and the
//! model is the same for the same seed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tonic::transport::Channel;
use vmgov_agent::{
    agent::{Agent, AgentSettings, AgentStatus, LocalThresholds, Outputs, Policy},
    link::{self, LinkConfig, LinkError, buffer::BufferConfig},
    platform::HostPlatform,
};
use vmgov_coordinator::{service::Coordinator, store::Store};
use vmgov_proto::{EnergyModel, Objective, Predictor, Thresholds, pb};
use vmgov_sim::{SimHost, SimReport};

use super::platform::{Handles, LabPlatform, Trace};

type Client = pb::fleet_service_client::FleetServiceClient<Channel>;

/// Labelled samples queued between an agent's host loop and its link.
const LABELLED_QUEUE: usize = 200_000;
/// How long the lab waits for the coordinator to see something an agent did.
const SEEN_WITHIN: Duration = Duration::from_secs(30);

/// A coordinator in this process, serving on a loopback port.
pub(crate) struct Fleet<S: Store> {
    coordinator: Coordinator<S>,
    /// Where agents and clients reach it.
    pub endpoint: String,
    client: Client,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
    /// Agents' caches, removed at the end.
    work_dir: PathBuf,
    /// A host with no VM, connected throughout, as a fleet has: it keeps its class known to the
    /// coordinator between the training hosts and the evaluation hosts.
    spare: tokio::sync::Mutex<Option<LabAgent>>,
}

/// A training host's learning.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct LearnedHost {
    /// The host.
    pub host_id: String,
    /// Its workload.
    pub workload: String,
    /// The workload's length factor.
    pub scale: f64,
    /// Labelled samples it produced.
    pub samples: u64,
    /// The workload's length alone at f_max, simulated seconds.
    pub length_s: f64,
    /// The workload ended before the sample target (the host gave what it had).
    pub ended_early: bool,
}

/// The model the coordinator trained and activated.
#[derive(Debug, Clone)]
pub(crate) struct Trained {
    /// The model, as the coordinator serves it.
    pub model: EnergyModel,
    /// Its summary (cross-validated figures).
    pub summary: pb::ModelSummary,
}

/// A run of vmgov's agent on a simulated host, and what the simulator says happened.
#[derive(Debug)]
pub(crate) struct AgentRun {
    /// Ground truth.
    pub report: SimReport,
    /// Every VM finished.
    pub completed: bool,
    /// Core frequencies per slice.
    pub trace: Option<Trace>,
    /// The agent's own estimate of the share of f_max's energy it saved (what `vmgov status`
    /// would say), if it charged any energy.
    pub estimated_saving: Option<f64>,
}

fn status_error(what: &str, endpoint: &str, e: &tonic::Status) -> anyhow::Error {
    anyhow!("{what} through the lab's coordinator at {endpoint}: {} ({:?})", e.message(), e.code())
}

impl<S: Store> Fleet<S> {
    /// Starts a coordinator over `store` on 127.0.0.1 (a free port), leading, and connects to it.
    pub(crate) async fn start(store: S, work_dir: &Path) -> Result<Self> {
        let listen: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
        let incoming = vmgov_coordinator::listen(listen)
            .context("binding a loopback port for the lab's coordinator")?;
        let addr = incoming.local_addr().context("reading the coordinator's port")?;
        let coordinator = Coordinator::new(store, "lab-coordinator", addr.to_string());
        tokio::time::timeout(Duration::from_secs(30), coordinator.lead())
            .await
            .map_err(|_| anyhow!("the lab's coordinator could not become leader within 30 s (is another coordinator leading on this store?)"))?
            .context("the lab's coordinator could not become leader")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = vmgov_coordinator::serve(coordinator.clone(), incoming, async {
            let _ = stopped.await;
        });
        let server = tokio::spawn(async move {
            if let Err(e) = serving.await {
                eprintln!("vmgov lab: the coordinator stopped serving: {e}");
            }
        });
        let endpoint = format!("http://{addr}");
        let mut last = None;
        for _ in 0..50 {
            let channel = Channel::from_shared(endpoint.clone())
                .map_err(|e| anyhow!("coordinator endpoint {endpoint}: {e}"))?;
            match channel.connect().await {
                Ok(channel) => {
                    let client = Client::new(channel);
                    std::fs::create_dir_all(work_dir).with_context(|| {
                        format!("creating the agents' cache directory {}", work_dir.display())
                    })?;
                    return Ok(Self {
                        coordinator,
                        endpoint,
                        client,
                        stop: Some(stop),
                        server,
                        work_dir: work_dir.to_owned(),
                        spare: tokio::sync::Mutex::new(None),
                    });
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the lab's coordinator at {endpoint} did not accept connections: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        )
    }

    /// Connects a host of `host`'s class with no VM, running at real time (it costs nothing),
    /// until the lab stops.
    pub(crate) async fn start_spare(&self, host: SimHost) -> Result<()> {
        let host_id = "lab-spare";
        let timeslice_s = host.config().timeslice_s;
        let (platform, handles) = LabPlatform::new(host, true, false);
        let settings = AgentSettings {
            timeslice_s,
            stop_when_idle: false,
            pace: Some(1.0),
            ..AgentSettings::default()
        };
        let agent = LabAgent::start(
            platform,
            handles,
            host_id,
            &self.endpoint,
            &self.work_dir.join(host_id),
            settings,
            Policy::default(),
        )
        .await?;
        self.wait_registered(host_id).await?;
        *self.spare.lock().await = Some(agent);
        Ok(())
    }

    /// Stops serving and removes the agents' caches.
    pub(crate) async fn stop(mut self) {
        if let Some(spare) = self.spare.get_mut().take() {
            spare.stop().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.server).await;
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }

    async fn samples_seen(&self, class: &str) -> Result<u64> {
        self.coordinator
            .shared()
            .store
            .samples_seen(class)
            .await
            .map_err(|e| anyhow!("reading the coordinator's sample count: {e}"))
    }

    async fn wait_registered(&self, host_id: &str) -> Result<()> {
        let until = Instant::now() + SEEN_WITHIN;
        loop {
            let hosts = self
                .client
                .clone()
                .list_hosts(pb::ListHostsRequest::default())
                .await
                .map_err(|e| status_error("listing hosts", &self.endpoint, &e))?
                .into_inner()
                .hosts;
            if hosts.iter().any(|h| h.host_id == host_id) {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "host {host_id} never registered with the lab's coordinator at {}",
                    self.endpoint
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Learning mode on one training host: the host joins, learning is commanded through the
    /// FleetService with a sample target, the host sweeps its P-states from the first slice of
    /// its workload, and the lab waits until the coordinator holds every sample it labelled.
    pub(crate) async fn learn(
        &self,
        host_id: &str,
        workload: &str,
        scale: f64,
        host: SimHost,
        length_s: f64,
        sample_target: u64,
    ) -> Result<LearnedHost> {
        let class = host.class().name.clone();
        let timeslice_s = host.config().timeslice_s;
        let seen_before = self.samples_seen(&class).await?;
        let (platform, handles) = LabPlatform::new(host, false, false);
        // No VM shows until learning has started, so the host must stay up while empty.
        let settings =
            AgentSettings { timeslice_s, stop_when_idle: false, ..AgentSettings::default() };
        let agent = LabAgent::start(
            platform,
            handles,
            host_id,
            &self.endpoint,
            &self.work_dir.join(host_id),
            settings,
            Policy::default(),
        )
        .await?;
        let result = self.learn_with(&agent, host_id, &class, sample_target).await;
        // Every labelled sample reaches the coordinator before the host goes.
        let waited = match &result {
            Ok(_) => self.wait_samples(&agent, host_id, &class, seen_before).await,
            Err(_) => Ok(()),
        };
        let finished = agent.stop().await;
        let (samples, ended_early) = result?;
        waited?;
        Ok(LearnedHost {
            host_id: host_id.into(),
            workload: workload.into(),
            scale,
            samples: samples.max(finished.labelled_samples),
            length_s,
            ended_early,
        })
    }

    async fn wait_samples(
        &self,
        agent: &LabAgent,
        host_id: &str,
        class: &str,
        seen_before: u64,
    ) -> Result<()> {
        let produced = agent.status.borrow().labelled_samples;
        let until = Instant::now() + SEEN_WITHIN;
        loop {
            let received = self.samples_seen(class).await?.saturating_sub(seen_before);
            if received >= produced {
                return Ok(());
            }
            if Instant::now() > until {
                bail!(
                    "the coordinator received {received} of the {produced} samples host {host_id} labelled"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn learn_with(
        &self,
        agent: &LabAgent,
        host_id: &str,
        class: &str,
        sample_target: u64,
    ) -> Result<(u64, bool)> {
        self.wait_registered(host_id).await?;
        let plan = pb::StartLearningCommand {
            duration_seconds: 0.0,
            sample_target,
            dwell_seconds: 0.3,
            reference_seconds: 0.1,
            workloads: vec![],
        };
        let mut client = self.client.clone();
        let mut started = None;
        let until = Instant::now() + SEEN_WITHIN;
        while Instant::now() < until {
            let s = client
                .start_learning(pb::StartLearningRequest {
                    hardware_class: class.into(),
                    host_ids: vec![host_id.into()],
                    plan: Some(plan.clone()),
                })
                .await
                .map_err(|e| status_error("starting learning", &self.endpoint, &e))?
                .into_inner();
            if s.hosts_unreachable.is_empty() {
                started = Some(s);
                break;
            }
            // Registered, but its stream is not open yet: call this run off and ask again.
            let _ = client
                .stop_learning(pb::StopLearningRequest { learning_id: s.learning_id.clone() })
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = started.ok_or_else(|| {
            anyhow!("host {host_id} never became reachable for learning at {}", self.endpoint)
        })?;
        let mut status = agent.status.clone();
        tokio::time::timeout(SEEN_WITHIN, status.wait_for(|s| s.learning))
            .await
            .map_err(|_| anyhow!("host {host_id} never started learning"))?
            .map_err(|_| anyhow!("host {host_id}'s agent stopped before learning"))?;
        // Learning is on: let the workload start, on the sweep's first slice.
        agent.handles.open();
        let until = Instant::now() + Duration::from_secs(600);
        loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let s = client
                .get_learning(pb::GetLearningRequest { learning_id: started.learning_id.clone() })
                .await
                .map_err(|e| status_error("reading learning progress", &self.endpoint, &e))?
                .into_inner();
            let agent_status = agent.status.borrow().clone();
            if !agent_status.learning && agent_status.labelled_samples > 0 {
                // Done on the host: its workload need not run on.
                agent.handles.close();
            }
            if s.state == pb::LearningState::Finished as i32 {
                return Ok((agent_status.labelled_samples, false));
            }
            if s.state != pb::LearningState::Running as i32 {
                bail!("learning on host {host_id} ended in state {:?}", s.state());
            }
            if agent.handles.done() && agent_status.learning {
                // The workload ended before the target: keep what it gave.
                let _ = client
                    .stop_learning(pb::StopLearningRequest {
                        learning_id: started.learning_id.clone(),
                    })
                    .await;
                return Ok((agent_status.labelled_samples, true));
            }
            if Instant::now() > until {
                bail!(
                    "learning on host {host_id} did not finish within 10 minutes ({} samples so far)",
                    agent_status.labelled_samples
                );
            }
        }
    }

    /// Trains a model for `class` on every sample the coordinator holds (OLS, 5 folds), makes it
    /// active, and fetches it.
    pub(crate) async fn train(&self, class: &str) -> Result<Trained> {
        let mut client = self.client.clone();
        let summary = client
            .train_model(pb::TrainModelRequest {
                hardware_class: class.into(),
                algorithm: pb::Algorithm::Ols as i32,
                alpha: 0.0,
                folds: 5,
                activate_if_better: true,
                features: vec![],
            })
            .await
            .map_err(|e| status_error("training the model", &self.endpoint, &e))?
            .into_inner();
        let summary = if summary.active {
            summary
        } else {
            client
                .activate_model(pb::ActivateModelRequest {
                    hardware_class: class.into(),
                    version: summary.version,
                })
                .await
                .map_err(|e| status_error("activating the model", &self.endpoint, &e))?
                .into_inner()
        };
        let wire = client
            .get_model(pb::GetModelRequest {
                hardware_class: class.into(),
                version: summary.version,
            })
            .await
            .map_err(|e| status_error("fetching the model", &self.endpoint, &e))?
            .into_inner();
        let model = EnergyModel::try_from(&wire)
            .map_err(|e| anyhow!("the coordinator served an unusable model: {e}"))?;
        Ok(Trained { model, summary })
    }

    /// Runs vmgov's agent on `host` until every VM has finished (or `max_slices`): its
    /// thresholds set through the coordinator for its host and held locally, the trained model
    /// from the start (the coordinator pushes the same one when the agent connects).
    pub(crate) async fn run_agent(
        &self,
        host_id: &str,
        host: SimHost,
        thresholds: Thresholds,
        objective: Objective,
        predictor: Arc<Predictor>,
        max_slices: u64,
    ) -> Result<AgentRun> {
        self.client
            .clone()
            .set_threshold(pb::SetThresholdRequest {
                scope: Some(pb::ThresholdScope {
                    scope: Some(pb::threshold_scope::Scope::HostId(host_id.into())),
                }),
                thresholds: Some(pb::Thresholds {
                    perf: thresholds.perf(),
                    throughput: thresholds.throughput(),
                }),
                updated_by: "vmgov lab".into(),
            })
            .await
            .map_err(|e| status_error("setting a host's thresholds", &self.endpoint, &e))?;
        let timeslice_s = host.config().timeslice_s;
        let (platform, handles) = LabPlatform::new(host, true, true);
        let settings = AgentSettings {
            timeslice_s,
            max_slices: Some(max_slices),
            stop_when_idle: true,
            ..AgentSettings::default()
        };
        let policy = Policy {
            predictor: Some(predictor),
            thresholds: LocalThresholds { default: Some(thresholds), ..LocalThresholds::default() },
            objective,
        };
        let agent = LabAgent::start(
            platform,
            handles,
            host_id,
            &self.endpoint,
            &self.work_dir.join(host_id),
            settings,
            policy,
        )
        .await?;
        agent.finish().await
    }
}

/// An agent and its coordinator link.
struct LabAgent {
    agent: Agent,
    handles: Handles,
    status: watch::Receiver<AgentStatus>,
    stop_link: watch::Sender<bool>,
    link: JoinHandle<Result<(), LinkError>>,
}

impl LabAgent {
    async fn start(
        platform: LabPlatform,
        handles: Handles,
        host_id: &str,
        endpoint: &str,
        cache_dir: &Path,
        settings: AgentSettings,
        policy: Policy,
    ) -> Result<Self> {
        let info = platform.info();
        let (labelled_tx, labelled_rx) = mpsc::channel(LABELLED_QUEUE);
        let local_thresholds = policy.thresholds.clone();
        let timeslice_s = settings.timeslice_s;
        let agent = Agent::start_with(
            Box::new(platform),
            settings,
            policy,
            Outputs { emitter: None, labelled: Some(labelled_tx) },
        )
        .await
        .with_context(|| format!("starting the agent of host {host_id}"))?;
        let (stop_link, shutdown) = watch::channel(false);
        let link = tokio::spawn(link::run(
            LinkConfig {
                endpoints: vec![endpoint.to_owned()],
                host_id: host_id.to_owned(),
                hardware_class: info.hardware_class.clone(),
                cache_dir: cache_dir.to_owned(),
                local_thresholds,
                timeslice_s,
                buffer: BufferConfig {
                    batch_size: 500,
                    memory_batches: 10_000,
                    spill_batches: 0,
                    spill_dir: None,
                },
                summary_every: Duration::from_millis(100),
            },
            agent.control(),
            info,
            agent.status_receiver(),
            labelled_rx,
            shutdown,
        ));
        let status = agent.status_receiver();
        Ok(Self { agent, handles, status, stop_link, link })
    }

    async fn stop_link(stop: &watch::Sender<bool>, link: JoinHandle<Result<(), LinkError>>) {
        let _ = stop.send(true);
        match tokio::time::timeout(Duration::from_secs(10), link).await {
            Ok(Ok(Err(e))) => eprintln!("vmgov lab: an agent's coordinator link failed: {e}"),
            Ok(Err(e)) => eprintln!("vmgov lab: an agent's coordinator link task failed: {e}"),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
    }

    /// Stops the link and the agent: its last status.
    async fn stop(self) -> AgentStatus {
        Self::stop_link(&self.stop_link, self.link).await;
        self.agent.shutdown().await.status
    }

    /// Waits for the run to end by itself, then stops the link: the simulator's truth.
    async fn finish(self) -> Result<AgentRun> {
        let finished = self.agent.wait().await;
        Self::stop_link(&self.stop_link, self.link).await;
        let mut platform = finished
            .platform
            .ok_or_else(|| anyhow!("the agent did not hand its simulated host back"))?;
        let lab = platform
            .as_any_mut()
            .downcast_mut::<LabPlatform>()
            .ok_or_else(|| anyhow!("the agent handed back another platform"))?;
        let s = &finished.status;
        let at_fmax = s.energy_j + s.energy_saved_j;
        Ok(AgentRun {
            report: lab.host().report(),
            completed: lab.host().all_finished(),
            trace: lab.take_trace(),
            estimated_saving: (s.energy_j > 0.0 && at_fmax > 0.0)
                .then(|| s.energy_saved_j / at_fmax),
        })
    }
}
