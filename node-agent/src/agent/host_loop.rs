//! The host loop: the agent's sampler and arbiter, one actor that owns the timeslice.
//!
//! Every slice: measure (the platform's `sample`), notice VMs that appeared or went, ask every
//! VM actor for its choice at once, run the fallback governor for VMs without one, arbitrate,
//! and apply what changed (or, in dry-run, log what would have been set). Once per verification
//! cycle the deciding VMs run at f_max around a measured window, which gives their observed
//! ratios. In learning mode the sweep sets the P-state instead and the slices come out labelled.
//! Nothing here waits on the network or the disk: samples leave through the emitter's queue,
//! status through a watch channel.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::join_all;
use ractor::{Actor, ActorProcessingErr, ActorRef, rpc::CallResult};
use tokio::{sync::watch, time::Instant};
use vmgov_proto::features;
use vmgov_sim::governor::Baseline;

use super::{
    AgentStatus, LabelledOut, LearningSettings, Shared, VmStatus, emit::SampleLine,
    supervisor::SupervisorMsg, vm_actor::VmMsg,
};
use crate::{
    arbiter::{self, Actuation, Inputs, VmInput},
    fastpath::VmChoice,
    learning::{Observation, Sweep},
    platform::{HostPlatform, HostSample, PlatformError, VmIndex, VmInfo},
    verify::{Guard, Slot, Verifier},
};

/// Messages to the host loop.
#[derive(Debug)]
pub(super) enum LoopMsg {
    /// Run one timeslice.
    Tick,
    /// The supervisor restarted a VM's actor.
    VmRestarted(VmIndex, ActorRef<VmMsg>),
    /// The active model's version changed (for status).
    ModelVersion(Option<u64>),
    /// Start a learning run (`id` names it for the coordinator; empty for a local run).
    StartLearning(String, LearningSettings),
    /// Stop the learning run.
    StopLearning,
    /// Fails the actor, for supervision tests.
    #[doc(hidden)]
    InjectFault,
}

/// What the supervisor hands a (re)started host loop.
#[derive(Debug)]
pub(super) struct LoopArgs {
    /// Shared platform and settings.
    pub shared: Arc<Shared>,
    /// The supervisor.
    pub supervisor: ActorRef<SupervisorMsg>,
    /// VM actors already running (after a restart of the loop).
    pub vms: BTreeMap<VmIndex, (VmInfo, ActorRef<VmMsg>)>,
    /// Where status goes.
    pub status: watch::Sender<AgentStatus>,
    /// Active model version.
    pub model_version: Option<u64>,
}

/// A learning run: the host's P-state schedule and a sweep per VM swept.
struct Learning {
    id: String,
    settings: LearningSettings,
    schedule: Sweep,
    vms: BTreeMap<VmIndex, Sweep>,
    joined: bool,
    labelled: u64,
    started_s: f64,
}

impl Learning {
    fn new(id: String, settings: LearningSettings, now_s: f64) -> Self {
        Self {
            id,
            schedule: Sweep::new(settings.plan),
            settings,
            vms: BTreeMap::new(),
            joined: false,
            labelled: 0,
            started_s: now_s,
        }
    }
}

struct Entry {
    info: VmInfo,
    actor: ActorRef<VmMsg>,
    last: Option<VmChoice>,
    /// Estimated energy since the agent started (J), and saved against f_max (J).
    energy_j: f64,
    saved_j: f64,
    /// Ratios of the last verification window, and how many windows completed.
    observed: Option<vmgov_proto::Ratios>,
    verified: u64,
    /// The P-state that window measured, when the VM held one P-state through it.
    observed_at: Option<usize>,
    /// The lowest P-state the VM chose in the current measured window.
    window_low: Option<usize>,
    /// The last window fell short of the thresholds.
    missing: bool,
    /// The highest P-state the VM chose in the current measured window.
    window_pstate: Option<usize>,
    /// The lowest P-state its windows allow it.
    guard: Guard,
}

impl Entry {
    fn new(info: VmInfo, actor: ActorRef<VmMsg>) -> Self {
        Self {
            info,
            actor,
            last: None,
            energy_j: 0.0,
            saved_j: 0.0,
            observed: None,
            verified: 0,
            observed_at: None,
            window_low: None,
            missing: false,
            window_pstate: None,
            guard: Guard::default(),
        }
    }

    /// The P-state the VM chose for itself (`None`: it runs on the fallback governor).
    fn chosen(&self) -> Option<usize> {
        self.last.as_ref().and_then(|c| c.pstate)
    }
}

/// The actor.
#[derive(Debug, Clone, Copy)]
pub(super) struct HostLoop;

/// Its state.
pub(super) struct LoopState {
    shared: Arc<Shared>,
    supervisor: ActorRef<SupervisorMsg>,
    vms: BTreeMap<VmIndex, Entry>,
    status: watch::Sender<AgentStatus>,
    governor: Baseline,
    applied: Actuation,
    sweep: Option<Learning>,
    verifier: Option<Verifier<VmIndex>>,
    labelled: u64,
    labelled_dropped: u64,
    slices: u64,
    next_deadline: Option<Instant>,
    paced_from: Option<(Instant, f64)>,
    model_version: Option<u64>,
    time_s: f64,
    /// Energy charged to, and saved for, VMs that are gone (J).
    gone_energy_j: f64,
    gone_saved_j: f64,
}

impl std::fmt::Debug for LoopState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopState")
            .field("slices", &self.slices)
            .field("vms", &self.vms.len())
            .finish()
    }
}

impl Actor for HostLoop {
    type Msg = LoopMsg;
    type State = LoopState;
    type Arguments = LoopArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let settings = &args.shared.settings;
        let previous = args.status.borrow().clone();
        let sweep = settings.learning.map(|l| Learning::new(String::new(), l, previous.time_s));
        myself.send_message(LoopMsg::Tick)?;
        Ok(LoopState {
            governor: Baseline::new(settings.fallback),
            supervisor: args.supervisor,
            vms: args
                .vms
                .into_iter()
                .map(|(id, (info, actor))| (id, Entry::new(info, actor)))
                .collect(),
            status: args.status,
            applied: Actuation::default(),
            sweep,
            verifier: new_verifier(&args.shared),
            labelled: previous.labelled_samples,
            labelled_dropped: 0,
            slices: previous.slices,
            next_deadline: None,
            paced_from: None,
            model_version: args.model_version,
            time_s: previous.time_s,
            gone_energy_j: 0.0,
            gone_saved_j: 0.0,
            shared: args.shared,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            LoopMsg::Tick => {
                let keep_going = state.tick().await?;
                if keep_going {
                    state.schedule_next(&myself)?;
                } else {
                    tracing::info!(
                        slices = state.slices,
                        "nothing left to run; the host loop stops"
                    );
                    myself.stop(Some("finished".into()));
                }
            }
            LoopMsg::VmRestarted(vm, actor) => {
                if let Some(e) = state.vms.get_mut(&vm) {
                    e.actor = actor;
                }
            }
            LoopMsg::ModelVersion(v) => state.model_version = v,
            LoopMsg::StartLearning(id, settings) => {
                tracing::info!(learning = %id, "learning starts");
                state.sweep = Some(Learning::new(id, settings, state.time_s));
            }
            LoopMsg::StopLearning => {
                if let Some(l) = state.sweep.take() {
                    tracing::info!(learning = %l.id, samples = l.labelled, "learning stopped");
                    // The sweep set the P-states: windows open before it compare nothing.
                    state.verifier = new_verifier(&state.shared);
                }
            }
            LoopMsg::InjectFault => return Err("fault injected into the host loop".into()),
        }
        Ok(())
    }
}

impl LoopState {
    fn schedule_next(&mut self, myself: &ActorRef<LoopMsg>) -> Result<(), ActorProcessingErr> {
        if self.shared.lockstep {
            match self.shared.settings.pace {
                None => myself.send_message(LoopMsg::Tick)?,
                Some(pace) => {
                    // Keep host time at `pace` times the wall clock.
                    let start =
                        *self.paced_from.get_or_insert_with(|| (Instant::now(), self.time_s));
                    let due = start.0
                        + Duration::from_secs_f64(((self.time_s - start.1) / pace).max(0.0));
                    let now = Instant::now();
                    if due > now {
                        myself.send_after(due - now, || LoopMsg::Tick);
                    } else {
                        myself.send_message(LoopMsg::Tick)?;
                    }
                }
            }
            return Ok(());
        }
        // Real clock: keep the cadence, whatever a slice cost.
        let period = Duration::from_secs_f64(self.shared.settings.timeslice_s);
        let now = Instant::now();
        let next = self.next_deadline.map_or(now + period, |d| d + period).max(now);
        self.next_deadline = Some(next);
        myself.send_after(next - now, || LoopMsg::Tick);
        Ok(())
    }

    /// One timeslice. Returns false when the run is over.
    async fn tick(&mut self) -> Result<bool, ActorProcessingErr> {
        let shared = Arc::clone(&self.shared);
        let settings = &shared.settings;
        let mut platform = shared.platform.lock().await;
        if let Some(max) = settings.max_slices
            && self.slices >= max
        {
            return Ok(false);
        }
        // Learning: the sweep sets every core for the slice about to run.
        if let Some(sweep) = &self.sweep {
            let p = sweep.schedule.pstate();
            if !settings.dry_run {
                for core in 0..platform.core_count() {
                    platform.set_core_pstate(core, p)?;
                }
                for &vm in self.vms.keys() {
                    platform.set_vm_pstate(vm, None)?;
                }
            }
        }
        let sample = platform.sample()?.clone();
        self.slices += 1;
        self.time_s += sample.timeslice_s;
        self.discover(platform.as_mut()).await?;
        if self.vms.is_empty() && platform.lockstep() && settings.stop_when_idle {
            self.publish(&sample, true);
            return Ok(false);
        }
        if self.sweep.is_some() {
            self.learn(&sample);
        } else {
            self.account(&sample);
            self.verify(&sample, platform.pstates());
            self.decide(&sample, platform.as_mut()).await?;
        }
        self.publish(&sample, false);
        Ok(true)
    }

    /// Spawns actors for VMs that appeared and stops those of VMs that went.
    async fn discover(
        &mut self,
        platform: &mut dyn HostPlatform,
    ) -> Result<(), ActorProcessingErr> {
        let present = platform.vms()?;
        let gone: Vec<VmIndex> =
            self.vms.keys().copied().filter(|id| !present.iter().any(|v| v.id == *id)).collect();
        for id in gone {
            if let Some(e) = self.vms.remove(&id) {
                tracing::info!(vm = %e.info.name, uuid = %e.info.uuid, "VM gone; stopping its actor");
                self.gone_energy_j += e.energy_j;
                self.gone_saved_j += e.saved_j;
                self.supervisor.send_message(SupervisorMsg::StopVm(id))?;
            }
        }
        for info in present {
            if self.vms.contains_key(&info.id) {
                continue;
            }
            tracing::info!(vm = %info.name, uuid = %info.uuid, vcpus = info.vcpus, "VM found; starting its actor");
            let reply = self
                .supervisor
                .call(|r| SupervisorMsg::SpawnVm(info.clone(), r), Some(Duration::from_secs(10)))
                .await?;
            match reply {
                CallResult::Success(Ok(actor)) => {
                    self.vms.insert(info.id, Entry::new(info, actor));
                }
                CallResult::Success(Err(e)) => {
                    tracing::warn!(vm = %info.name, error = %e, "could not start the VM's actor; will retry")
                }
                CallResult::Timeout | CallResult::SenderError => {
                    tracing::warn!(vm = %info.name, "the supervisor did not answer; will retry");
                }
            }
        }
        Ok(())
    }

    /// The fast path for every VM, the fallback governor, the arbiter, the actuation.
    async fn decide(
        &mut self,
        sample: &HostSample,
        platform: &mut dyn HostPlatform,
    ) -> Result<(), PlatformError> {
        let settings = &self.shared.settings;
        let timeout = Duration::from_secs_f64((settings.timeslice_s / 2.0).max(0.001));
        let timeout = if self.shared.lockstep { Duration::from_secs(5) } else { timeout };
        let asks = self.vms.iter().filter_map(|(id, e)| {
            let s = sample.vms.iter().find(|s| s.vm == *id)?;
            let counters = Box::new(s.counters.clone());
            let floor = e.guard.floor();
            Some(async move {
                (*id, e.actor.call(|r| VmMsg::Tick(counters, floor, r), Some(timeout)).await)
            })
        });
        for (id, answer) in join_all(asks).await {
            let choice = match answer {
                Ok(CallResult::Success(c)) => Some(c),
                // A VM actor that is restarting or late: its VM runs on the fallback governor
                // this slice.
                _ => None,
            };
            if let Some(e) = self.vms.get_mut(&id) {
                let changed = match (&e.last, &choice) {
                    (Some(a), Some(b)) => a.pstate != b.pstate || a.fallback != b.fallback,
                    (None, None) => false,
                    _ => true,
                };
                if changed {
                    log_choice(&e.info, choice.as_ref(), platform.pstates(), settings.dry_run);
                }
                e.last = choice;
            }
        }
        let table = platform.pstates().clone();
        let fallback = self.governor.plan(sample, &table);
        // In a verification reference, every VM that decides for itself runs at f_max.
        let reference = self.verifier.as_ref().is_some_and(|v| v.slot().is_reference());
        let top = table.len() - 1;
        let vms: Vec<VmInput> = self
            .vms
            .iter()
            .map(|(id, e)| VmInput {
                vm: *id,
                vcpus: e.info.vcpus as usize,
                affinity: e.info.affinity,
                choice: e.chosen().map(|p| if reference { top } else { p }),
            })
            .collect();
        let busy: Vec<f64> = sample.cores.iter().map(|c| c.busy).collect();
        let mut actuation = arbiter::arbitrate(
            settings.arbiter,
            &Inputs {
                vms: &vms,
                fallback: &fallback.cores,
                busy: &busy,
                placement: &sample.placement,
            },
        );
        // A per-VM fallback governor (cpu-load) speaks per VM too.
        for (vm, p) in &fallback.vms {
            if let Some(slot) =
                actuation.vm_pstates.iter_mut().find(|(v, c)| v == vm && c.is_none())
            {
                slot.1 = Some(*p);
            }
        }
        if !settings.dry_run {
            apply(platform, &self.applied, &actuation)?;
        }
        self.applied = actuation;
        Ok(())
    }

    /// Learning mode: label the slice and hand the labelled samples out.
    fn learn(&mut self, sample: &HostSample) {
        let Some(learning) = self.sweep.as_mut() else { return };
        if !learning.joined {
            // Nothing to sweep yet (learning started on a host with no VM): wait for the first
            // VMs, with the host's schedule held at its start so their windows line up.
            if sample.vms.is_empty() {
                return;
            }
            // The VMs present when learning starts are swept; VMs that appear later wait for
            // the next learning run, since their windows would not line up.
            let plan = learning.settings.plan;
            learning.vms = sample.vms.iter().map(|s| (s.vm, Sweep::new(plan))).collect();
            learning.joined = true;
        }
        let energy = sample.package_energy_j.unwrap_or(0.0);
        // Power is the package's: with several VMs on the host each is labelled with it, so the
        // labels are clean only with one VM, as in the report.
        let mut labelled = Vec::new();
        for s in &sample.vms {
            if let Some(sweep) = learning.vms.get_mut(&s.vm) {
                let observation = Observation {
                    counters: s.counters.clone(),
                    package_energy_j: energy,
                    start_unix_ns: 0,
                };
                labelled.extend(sweep.observe(observation).into_iter().map(|l| (s.vm, l)));
            }
        }
        learning.schedule.observe(Observation {
            counters: vmgov_proto::RawCounters {
                timeslice_seconds: sample.timeslice_s,
                vcpus: 1,
                ..Default::default()
            },
            package_energy_j: energy,
            start_unix_ns: 0,
        });
        self.labelled += labelled.len() as u64;
        learning.labelled += labelled.len() as u64;
        if let Some(tx) = &self.shared.labelled {
            for (vm, l) in &labelled {
                let Some(e) = self.vms.get(vm) else { continue };
                let out = LabelledOut {
                    learning_id: learning.id.clone(),
                    vm_uuid: e.info.uuid.clone(),
                    pstate: l.pstate,
                    counters: l.observation.counters.clone(),
                    labels: l.labels,
                };
                if tx.try_send(out).is_err() {
                    self.labelled_dropped += 1;
                }
            }
        }
        if let Some(emitter) = &self.shared.emitter {
            for (vm, l) in labelled {
                let Some(e) = self.vms.get(&vm) else { continue };
                let features = features::derive(&l.observation.counters)
                    .map(|f| f.iter().collect())
                    .unwrap_or_default();
                emitter.emit(SampleLine {
                    time_s: self.time_s,
                    vm: e.info.name.clone(),
                    uuid: e.info.uuid.clone(),
                    counters: l.observation.counters,
                    features,
                    pstate: Some(l.pstate),
                    fallback: None,
                    predicted: None,
                    labels: Some(l.labels),
                });
            }
        }
        let by_samples = learning.settings.max_samples.is_some_and(|m| learning.labelled >= m);
        let by_time =
            learning.settings.max_seconds.is_some_and(|t| self.time_s - learning.started_s >= t);
        if by_samples || by_time {
            tracing::info!(learning = %learning.id, samples = learning.labelled, "learning done");
            self.sweep = None;
            self.verifier = new_verifier(&self.shared);
        }
    }

    /// Estimates each VM's energy over the slice just run and, where it ran at a P-state of its
    /// own choice, the energy f_max would have taken for the same work: from the ratios its last
    /// verification window measured at that P-state when there are some (a model can be wrong
    /// about a workload; the measurement is not), else from the predicted ones. Package meters
    /// are not per VM: a VM is given the package's energy in proportion to its share of all core
    /// time, so the share matching idle core time is charged to no one. In dry-run nothing was
    /// set, so nothing was saved, and a verification reference ran at f_max, so it saved nothing
    /// either. The sums restart with the loop (a restarted loop starts from zero).
    fn account(&mut self, sample: &HostSample) {
        #[allow(clippy::cast_precision_loss, reason = "core counts and nanoseconds fit f64")]
        let core_ns = sample.cores.len() as f64 * sample.timeslice_s * 1e9;
        let package_j = sample
            .package_energy_j
            .filter(|_| core_ns > 0.0 && core_ns.is_finite())
            .unwrap_or(f64::NAN);
        let acting = !self.shared.settings.dry_run;
        let reference = self.verifier.as_ref().is_some_and(|v| v.slot().is_reference());
        for s in &sample.vms {
            let Some(e) = self.vms.get_mut(&s.vm) else { continue };
            #[allow(clippy::cast_precision_loss, reason = "nanoseconds per slice fit f64")]
            let energy_j = package_j * (s.counters.cpu_time_ns as f64 / core_ns).min(1.0);
            if energy_j.is_nan() {
                continue;
            }
            e.energy_j += energy_j;
            let Some(choice) = e.last.as_ref().filter(|_| acting && !reference) else { continue };
            let measured = e.observed.filter(|o| {
                e.observed_at.is_some() && e.observed_at == choice.pstate && o.power.is_finite()
            });
            if let Some(at_fmax) =
                measured.or(choice.predicted).and_then(|r| r.energy_at_fmax(energy_j))
            {
                e.saved_j += at_fmax - energy_j;
            }
        }
    }

    /// Hands the slice just run to the verification windows: every VM that ran its own choice
    /// (or f_max in its stead, in a reference) is observed; at the end of a cycle the VMs get
    /// their observed ratios, and a VM that fell short of its thresholds is guarded.
    fn verify(&mut self, sample: &HostSample, table: &vmgov_proto::PStateTable) {
        let Some(verifier) = self.verifier.as_mut() else { return };
        let slot = verifier.slot();
        // The package's energy, as learning labels power: the VM's core-time share of it would
        // charge a server, busier at a lower clock, the idle energy f_max leaves to no one.
        let package_j = sample.package_energy_j.unwrap_or(f64::NAN);
        let measured = slot == Slot::Measured;
        let vms = &mut self.vms;
        // Most slices are free: nothing to copy for them.
        let in_window = slot != Slot::Free;
        let slice: Vec<_> = sample
            .vms
            .iter()
            .filter(|_| in_window)
            .filter_map(|s| {
                let e = vms.get_mut(&s.vm)?;
                let chosen = e.chosen()?;
                if measured {
                    e.window_pstate = Some(e.window_pstate.map_or(chosen, |p| p.max(chosen)));
                    e.window_low = Some(e.window_low.map_or(chosen, |p| p.min(chosen)));
                }
                Some((
                    s.vm,
                    Observation {
                        counters: s.counters.clone(),
                        package_energy_j: package_j,
                        start_unix_ns: 0,
                    },
                ))
            })
            .collect();
        let verdicts = verifier.observe(slice);
        if !verifier.at_cycle_start() {
            return;
        }
        let fmax = table.max_frequency_hz();
        let clock: Vec<f64> = table.as_slice().iter().map(|p| p.frequency_hz / fmax).collect();
        for (vm, observed) in verdicts {
            let Some(e) = self.vms.get_mut(&vm) else { continue };
            e.observed = Some(observed);
            e.verified += 1;
            e.observed_at = e.window_pstate.filter(|&p| e.window_low == Some(p));
            let Some(t) = e.last.as_ref().and_then(|c| c.thresholds) else { continue };
            let missing = !t.admit(&observed);
            // Logged when it changes, not every window: the coordinator reports each miss.
            if missing != e.missing {
                e.missing = missing;
                if missing {
                    tracing::warn!(
                        vm = %e.info.name, perf = observed.perf, throughput = observed.throughput,
                        perf_threshold = t.perf(), throughput_threshold = t.throughput(),
                        "observed ratios below the VM's thresholds"
                    );
                } else {
                    tracing::info!(vm = %e.info.name, perf = observed.perf, throughput = observed.throughput,
                        "observed ratios back above the VM's thresholds");
                }
            }
            let ran_at = e.window_pstate.or_else(|| e.chosen()).unwrap_or(0);
            if self.shared.settings.guard && e.guard.record(&observed, &t, ran_at, &clock) {
                let floor = e.guard.floor();
                let ghz = table.frequency_hz(floor).unwrap_or(0.0) / 1e9;
                if missing {
                    tracing::warn!(vm = %e.info.name, floor, ghz,
                        "guard: the VM may not go below P-state {floor} ({ghz:.2} GHz) whatever the model predicts");
                } else {
                    tracing::info!(vm = %e.info.name, floor, ghz, "guard eased to P-state {floor} ({ghz:.2} GHz)");
                }
            }
        }
        // A new cycle: new measured windows.
        for e in self.vms.values_mut() {
            e.window_pstate = None;
            e.window_low = None;
        }
    }

    /// Emits sample lines (outside learning) and publishes the status.
    fn publish(&mut self, sample: &HostSample, finished: bool) {
        if self.sweep.is_none()
            && let Some(emitter) = &self.shared.emitter
        {
            for s in &sample.vms {
                let Some(e) = self.vms.get(&s.vm) else { continue };
                let c = e.last.as_ref();
                emitter.emit(SampleLine {
                    time_s: self.time_s,
                    vm: e.info.name.clone(),
                    uuid: e.info.uuid.clone(),
                    counters: s.counters.clone(),
                    features: c.map(|c| c.features.iter().collect()).unwrap_or_default(),
                    pstate: c.and_then(|c| c.pstate),
                    fallback: c.and_then(|c| c.fallback.as_ref().map(ToString::to_string)),
                    predicted: c.and_then(|c| c.predicted),
                    labels: None,
                });
            }
        }
        let status = AgentStatus {
            slices: self.slices,
            time_s: self.time_s,
            dry_run: self.shared.settings.dry_run,
            learning: self.sweep.is_some(),
            labelled_samples: self.labelled,
            model_version: self.model_version,
            cores: if self.applied.cores.is_empty() {
                sample.cores.iter().map(|c| c.pstate).collect()
            } else {
                self.applied.cores.clone()
            },
            vms: self
                .vms
                .values()
                .map(|e| VmStatus {
                    info: e.info.clone(),
                    pstate: e.last.as_ref().and_then(|c| c.pstate),
                    predicted: e.last.as_ref().and_then(|c| c.predicted),
                    fallback: e
                        .last
                        .as_ref()
                        .and_then(|c| c.fallback.as_ref().map(ToString::to_string)),
                    energy_j: e.energy_j,
                    energy_saved_j: e.saved_j,
                    observed: e.observed,
                    verified_windows: e.verified,
                    thresholds: e.last.as_ref().and_then(|c| c.thresholds),
                    pstate_floor: e.guard.floor(),
                })
                .collect(),
            finished,
            samples_dropped: self.shared.emitter.as_ref().map_or(0, |e| e.dropped()),
            energy_j: self.gone_energy_j + self.vms.values().map(|e| e.energy_j).sum::<f64>(),
            energy_saved_j: self.gone_saved_j + self.vms.values().map(|e| e.saved_j).sum::<f64>(),
        };
        self.status.send_replace(status);
    }
}

/// The verification windows the settings ask for: none in dry-run (nothing is set, so nothing
/// can be measured) or when disabled.
fn new_verifier(shared: &Shared) -> Option<Verifier<VmIndex>> {
    let plan = shared.settings.verify.filter(|_| !shared.settings.dry_run)?;
    match Verifier::new(plan) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "verification windows are off");
            None
        }
    }
}

fn log_choice(
    info: &VmInfo,
    choice: Option<&VmChoice>,
    table: &vmgov_proto::PStateTable,
    dry_run: bool,
) {
    let verb = if dry_run { "would set" } else { "sets" };
    match choice {
        Some(VmChoice { pstate: Some(p), predicted, feasible, .. }) => {
            let ghz = table.frequency_hz(*p).unwrap_or(0.0) / 1e9;
            let r = predicted.unwrap_or_default();
            tracing::info!(
                vm = %info.name, pstate = p, ghz, perf = r.perf, power = r.power, throughput = r.throughput,
                feasible, dry_run, "decision: {verb} P-state {p} ({ghz:.2} GHz)"
            );
        }
        Some(VmChoice { fallback: Some(why), .. }) => {
            tracing::info!(vm = %info.name, dry_run, "decision: fallback governor ({why})");
        }
        _ => {
            tracing::info!(vm = %info.name, dry_run, "decision: fallback governor (no answer from the VM's actor)")
        }
    }
}

/// Applies what differs from the last actuation.
fn apply(
    platform: &mut dyn HostPlatform,
    before: &Actuation,
    after: &Actuation,
) -> Result<(), PlatformError> {
    for (core, &p) in after.cores.iter().enumerate() {
        if before.cores.get(core) != Some(&p) {
            platform.set_core_pstate(core, p)?;
        }
    }
    for &(vm, p) in &after.vm_pstates {
        if !before.vm_pstates.contains(&(vm, p)) {
            platform.set_vm_pstate(vm, p)?;
        }
    }
    for &(vm, mask) in &after.vm_affinity {
        if !before.vm_affinity.contains(&(vm, mask)) {
            platform.set_vm_affinity(vm, mask)?;
        }
    }
    Ok(())
}
