//! `vmgov-agent run`: builds the platform, the policy and the settings from a checked
//! configuration, starts the actor tree and runs until the platform has nothing left (simulated
//! host) or `shutdown` resolves (SIGTERM/SIGINT, installed by the binary), then restores the host.

use std::{future::Future, io::Write, sync::Arc};

use thiserror::Error;
use vmgov_proto::{EnergyModel, Predictor};

use crate::{
    agent::{
        Agent, AgentError, AgentSettings, Emitter, Finished, LearningSettings, Outputs, Policy,
    },
    arbiter::ArbiterPolicy,
    config::{AgentConfig, PlatformKind},
    learning::SweepPlan,
    link::{
        self, LinkConfig,
        buffer::{BufferConfig, spill_dir},
    },
    platform::{
        HostPlatform,
        linux::{LinuxError, LinuxPlatform},
        sim::{HardwareClass, SimConfig, SimError, SimHost, SimPlatform, VmSpec, Workload},
    },
};

/// Why the agent could not run.
#[derive(Debug, Error)]
pub enum RunError {
    /// The simulated host could not be built.
    #[error(transparent)]
    Sim(#[from] SimError),
    /// A class or workload file is bad.
    #[error(transparent)]
    Class(#[from] crate::platform::sim::ClassError),
    /// A workload file is bad.
    #[error(transparent)]
    Workload(#[from] crate::platform::sim::WorkloadError),
    /// The model file could not be used.
    #[error("model file {path}: {problem}")]
    Model {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The samples file could not be opened.
    #[error("opening {path} for samples")]
    Emit {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The platform is not available here.
    #[error("{0}")]
    Platform(String),
    /// The Linux host cannot even be observed.
    #[error(transparent)]
    Linux(#[from] LinuxError),
    /// The actors failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Labelled samples queued between the host loop and the link before new ones are dropped.
const LABELLED_QUEUE: usize = 100_000;

/// This host's id: the configured one, else the host name.
pub fn host_id(config: &AgentConfig) -> String {
    config.host_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
    })
}

/// Builds the configured platform.
pub fn platform(config: &AgentConfig) -> Result<Box<dyn HostPlatform>, RunError> {
    match config.platform {
        PlatformKind::Sim => {
            let s = &config.sim;
            let class = HardwareClass::load(&s.class)?;
            let vms = s
                .workloads
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let workload = Workload::load(w)?.scaled(s.scale);
                    Ok(VmSpec {
                        name: format!("vm{i}-{}", workload.name),
                        vcpus: s.vcpus,
                        affinity: None,
                        workload,
                    })
                })
                .collect::<Result<Vec<_>, RunError>>()?;
            let sim = SimConfig {
                timeslice_s: config.timeslice_ms / 1e3,
                seed: s.seed,
                counter_noise: s.noise,
            };
            Ok(Box::new(SimPlatform::new(SimHost::new(class, vms, sim)?)))
        }
        PlatformKind::Linux => Ok(Box::new(linux_platform(config)?)),
    }
}

/// Builds the Linux backend. Where the host cannot act (no cpufreq, a driver that ignores
/// explicit frequencies, or per-VM frequencies for the follow arbiter without uclamp) it runs
/// only in dry-run, saying so; otherwise it refuses to start and names what is missing.
pub fn linux_platform(config: &AgentConfig) -> Result<LinuxPlatform, RunError> {
    let platform = LinuxPlatform::new(&config.linux)?;
    let mut missing: Vec<String> = platform.cannot_act().into_iter().collect();
    if missing.is_empty()
        && !platform.info().per_vm_frequency
        && config.arbiter == ArbiterPolicy::Follow
    {
        missing.push(
            "the follow arbiter sets per-VM frequencies, which need utilisation clamps (uclamp) \
             under schedutil and this host has none: choose --arbiter max or pin"
                .into(),
        );
    }
    if config.learning.is_some() && !platform.info().energy_meter {
        // Without a meter every power label would be unknown: nothing to train a model on.
        return Err(RunError::Platform(
            "learning labels power from the package energy meter (RAPL), which this host does not \
             have: learn on a host of the same class that has one"
                .into(),
        ));
    }
    if missing.is_empty() {
        return Ok(platform);
    }
    if config.dry_run {
        tracing::warn!(
            "this host cannot act, so the agent only observes (dry-run): {}",
            missing.join("; ")
        );
        Ok(platform)
    } else {
        Err(RunError::Platform(format!(
            "this host cannot act: {}. Run with --dry-run to observe only; \
             `vmgov-agent preflight` lists what the host allows",
            missing.join("; ")
        )))
    }
}

/// Loads a model file (JSON) and checks it against the host's P-states.
pub fn load_model(
    path: &std::path::Path,
    platform: &dyn HostPlatform,
) -> Result<Arc<Predictor>, RunError> {
    let err = |problem: String| RunError::Model { path: path.display().to_string(), problem };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let model: EnergyModel = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    model.check_host(&platform.info().pstates).map_err(|e| err(e.to_string()))?;
    Ok(Arc::new(Predictor::new(&model).map_err(|e| err(e.to_string()))?))
}

/// Opens the samples sink: a file, or standard output for `-`.
pub fn emitter(target: Option<&str>) -> Result<Option<Emitter>, RunError> {
    let Some(target) = target else { return Ok(None) };
    let out: Box<dyn Write + Send> = if target == "-" {
        Box::new(std::io::stdout())
    } else {
        Box::new(
            std::fs::File::create(target)
                .map_err(|source| RunError::Emit { path: target.into(), source })?,
        )
    };
    Ok(Some(Emitter::new(out)))
}

/// The agent's settings from its configuration.
pub fn settings(config: &AgentConfig, pstates: usize) -> AgentSettings {
    AgentSettings {
        timeslice_s: config.timeslice_ms / 1e3,
        dry_run: config.dry_run,
        arbiter: config.arbiter,
        fallback: config.fallback(),
        learning: config.learning.as_ref().map(|l| LearningSettings {
            plan: SweepPlan {
                pstates,
                dwell_slices: l.dwell_slices,
                reference_slices: l.reference_slices,
            },
            max_samples: l.max_samples,
            max_seconds: None,
        }),
        max_slices: None,
        // With a coordinator, a simulated host that ran out of work keeps the agent up (the
        // coordinator may still start learning or push models).
        stop_when_idle: config.coordinator.is_none(),
        pace: config.sim.speed,
        // `validate` refused a plan that cannot be laid out.
        verify: config.verify.plan().ok().flatten(),
        guard: config.verify.guard,
    }
}

/// Runs the agent until the platform is done or `shutdown` resolves.
pub async fn run(
    config: &AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<Finished, RunError> {
    let platform = platform(config)?;
    let info = platform.info();
    let predictor =
        config.model.as_deref().map(|m| load_model(m, platform.as_ref())).transpose()?;
    let policy =
        Policy { predictor, thresholds: (&config.thresholds).into(), objective: config.objective };
    tracing::info!(
        platform = info.platform,
        class = %info.hardware_class,
        cores = info.cores,
        pstates = info.pstates.len(),
        dry_run = config.dry_run,
        model = policy.predictor.as_ref().map(|p| p.version()),
        "agent starting"
    );
    let emit = emitter(config.emit_samples.as_deref())?;
    let (labelled_tx, labelled_rx) = tokio::sync::mpsc::channel(LABELLED_QUEUE);
    let outputs =
        Outputs { emitter: emit, labelled: config.coordinator.as_ref().map(|_| labelled_tx) };
    let agent =
        Agent::start_with(platform, settings(config, info.pstates.len()), policy, outputs).await?;
    let (stop_link, link_shutdown) = tokio::sync::watch::channel(false);
    let link = match &config.coordinator {
        Some(endpoint) => {
            let link_config = LinkConfig {
                endpoints: endpoint
                    .split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect(),
                host_id: host_id(config),
                hardware_class: info.hardware_class.clone(),
                cache_dir: config.cache_dir.clone(),
                local_thresholds: (&config.thresholds).into(),
                timeslice_s: config.timeslice_ms / 1e3,
                buffer: BufferConfig {
                    batch_size: 500,
                    memory_batches: 200,
                    spill_batches: 20_000,
                    spill_dir: Some(spill_dir(&config.cache_dir)),
                },
                summary_every: std::time::Duration::from_secs(1),
            };
            Some(tokio::spawn(link::run(
                link_config,
                agent.control(),
                info.clone(),
                agent.status_receiver(),
                labelled_rx,
                link_shutdown,
            )))
        }
        None => None,
    };
    let mut status = agent.status_receiver();
    let finished = async move {
        while status.changed().await.is_ok() {
            if status.borrow().finished {
                break;
            }
        }
    };
    tokio::select! {
        () = finished => tracing::info!("the host has nothing left to run"),
        () = shutdown => tracing::info!("shutdown requested"),
    }
    let _ = stop_link.send(true);
    if let Some(link) = link {
        match link.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "the coordinator link failed"),
            Err(e) => tracing::warn!(error = %e, "the coordinator link task failed"),
            Ok(Ok(())) => {}
        }
    }
    Ok(agent.shutdown().await)
}
