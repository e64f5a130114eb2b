//! `vmgov lab`: the whole system on one machine, through the report's experiment and beyond it,
//! on every hardware class asked for (both built-in ones by default), one after the other.
//!
//! Per class, in one process: a coordinator (in-memory store, or etcd with `--etcd`) serving
//! real gRPC on a loopback port, and agents on simulated hosts talking to it through the real
//! coordinator link. The lab drives it as an operator would, over `FleetService`:
//!
//! 1. learning on the training suite (never an evaluated workload), one host per workload,
//!    then training and activation of the model (`fleet.rs`);
//! 2. every scenario (the report's, the held-out suite, full hosts: `inputs.rs`) at every
//!    threshold, under `performance`, `ondemand`, `schedutil`, `cpu-load` and the oracle
//!    (simulated, in `runs.rs`), and vmgov's agent with the `power` objective (the report's
//!    equation 9) and with its default `energy` objective, each a real agent on its own
//!    simulated host ([`platform::LabPlatform`]) in lockstep until its VMs finish; and each
//!    scenario's whole-run bound;
//! 3. the measures of `docs/yardstick.md` (`results.rs`), the report's table
//!    (`report_table.rs`), and the report: tables on the terminal, `report.md`, `report.json` and
//!    SVG plots (`report.rs`, `svg.rs`). A run that met its thresholds below the bound fails the
//!    lab after the report is written: the yardstick would be wrong.
//!
//! Inputs are checked before anything starts (`inputs.rs`). Runs go in parallel, one per CPU;
//! the baselines start while the training hosts learn. Everything is repeatable for a seed.

mod fleet;
mod inputs;
mod platform;
mod report;
mod report_table;
mod results;
mod runs;
mod svg;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tokio::{sync::Semaphore, task::JoinSet};
use vmgov_coordinator::store::{EtcdConfig, EtcdStore, MemoryStore, Store};
use vmgov_proto::{Predictor, Thresholds};
use vmgov_sim::{SimConfig, SimHost};

use self::{
    fleet::{Fleet, LearnedHost, Trained},
    inputs::{Inputs, Scenario},
    report::{ModelInfo, Report, Settings},
    results::{Reference, ScenarioResult},
    runs::{Governor, RunData, SimPolicy},
};

/// Timeslice of every host, seconds (the report's VM timeslice).
const TIMESLICE_S: f64 = 0.01;
/// Relative noise of the simulated counters.
const COUNTER_NOISE: f64 = 0.01;
/// Workload length by default, relative to the full profiles: keeps the full run within a few
/// minutes on 2 cores; the ratios barely depend on it.
const DEFAULT_SCALE: f64 = 0.5;
/// With `--quick`.
const QUICK_SCALE: f64 = 0.02;
/// Labelled samples per training host.
const DEFAULT_SAMPLES: u64 = 3000;
/// With `--quick`.
const QUICK_SAMPLES: u64 = 800;
/// Samples labelled per slice of learning, about (the first slice after every switch is
/// dropped): sizes the training workloads.
const LABELS_PER_SLICE: f64 = 0.95;
/// A training workload lasts this many times the learning it must carry, at f_max.
const TRAINING_MARGIN: f64 = 1.25;
/// Length of the runs that check the model against the simulator (at most).
const MODEL_CHECK_SCALE: f64 = 0.05;
/// Samples the coordinator keeps per class (more than any lab produces).
const SAMPLE_CAPACITY: usize = 2_000_000;

/// Options of `vmgov lab`.
#[derive(Debug, Args)]
pub(crate) struct LabArgs {
    /// Where to write report.md, report.json and the plots [default: a new folder
    /// vmgov-lab-<UTC time> in the current directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// A TOML file listing workload files (relative to it) or built-in names: files replace the
    /// built-in workload of the same name, anything else is added and run alone too.
    #[arg(long, value_name = "FILE")]
    workloads: Option<PathBuf>,
    /// A TOML file of scenarios (`[[scenario]] workloads = [...]`, optional `thresholds`), run
    /// instead of the report's.
    #[arg(long, value_name = "FILE")]
    scenarios: Option<PathBuf>,
    /// Hardware classes, each a class file or a built-in name, comma-separated: the lab runs
    /// the whole experiment on each in turn (learning and a model per class), into a folder per
    /// class when there are several.
    #[arg(
        long,
        value_name = "CLASS",
        value_delimiter = ',',
        default_values = ["phenom-9500", "epyc-7502"]
    )]
    class: Vec<String>,
    /// Seed of every simulated host's counter noise: the same seed gives the same report.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A quick run (shorter workloads, fewer learning samples): under a minute.
    #[arg(long)]
    quick: bool,
    /// Length of every evaluation workload relative to its full profile [default: 0.5, or
    /// 0.02 with --quick].
    #[arg(long, value_name = "F")]
    scale: Option<f64>,
    /// Labelled samples each training host gives in learning mode [default: 3000, or 800 with
    /// --quick].
    #[arg(long, value_name = "N")]
    samples: Option<u64>,
    /// Runs at once [default: the number of CPUs].
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Keep the coordinator's state in etcd at these endpoints (comma-separated) instead of in
    /// memory; each lab run uses its own key prefix.
    #[arg(long, value_name = "ENDPOINTS", value_delimiter = ',')]
    etcd: Vec<String>,
}

/// The knobs, checked.
#[derive(Debug, Clone)]
struct Knobs {
    scale: f64,
    samples: u64,
    jobs: usize,
    seed: u64,
    quick: bool,
}

impl Knobs {
    fn new(args: &LabArgs) -> Result<Self> {
        let scale = args.scale.unwrap_or(if args.quick { QUICK_SCALE } else { DEFAULT_SCALE });
        if !(scale.is_finite() && scale > 0.0 && scale <= 10.0) {
            bail!("--scale {scale}: give a length factor in (0, 10], e.g. 0.5");
        }
        let samples =
            args.samples.unwrap_or(if args.quick { QUICK_SAMPLES } else { DEFAULT_SAMPLES });
        if !(200..=1_000_000).contains(&samples) {
            bail!("--samples {samples}: give 200 to 1000000 labelled samples per training host");
        }
        let jobs = args
            .jobs
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
        if jobs == 0 {
            bail!("--jobs 0: give at least 1");
        }
        Ok(Self { scale, samples, jobs, seed: args.seed, quick: args.quick })
    }

    fn sim(&self) -> SimConfig {
        SimConfig { timeslice_s: TIMESLICE_S, seed: self.seed, counter_noise: COUNTER_NOISE }
    }
}

/// One line per step on standard error.
struct Progress {
    started: Instant,
    done: AtomicUsize,
    total: usize,
}

impl Progress {
    fn say(&self, what: &str) {
        eprintln!("[{:>5.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn run_done(&self, what: &str) {
        let n = self.done.fetch_add(1, Ordering::SeqCst) + 1;
        let width = self.total.to_string().len();
        self.say(&format!("run {n:>width$}/{}: {what}", self.total));
    }
}

/// Which run a result belongs to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    /// A workload alone under `performance`.
    Reference(String),
    /// A scenario with every core at f_max: the research report's baseline, for its table.
    ReportBaseline(usize),
    /// A scenario under a governor (at a threshold, for those that depend on one).
    Run { scenario: usize, governor: Governor, threshold: Option<usize> },
}

fn utc_stamp() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The output directory: the one given (created if missing), or a new one named by the time.
fn output_dir(given: Option<&Path>) -> Result<(PathBuf, bool)> {
    if let Some(dir) = given {
        if dir.exists() && !dir.is_dir() {
            bail!("--out {}: exists and is not a directory; choose another --out", dir.display());
        }
        let created = !dir.exists();
        std::fs::create_dir_all(dir).with_context(|| {
            format!("creating the output directory {}; choose another --out", dir.display())
        })?;
        return Ok((dir.to_owned(), created));
    }
    let base = format!("vmgov-lab-{}", utc_stamp());
    for n in 0..100 {
        let name = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        let dir = PathBuf::from(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok((dir, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(anyhow!(
                    "creating the output directory {} in the current directory: {e}; give --out DIR",
                    dir.display()
                ));
            }
        }
    }
    bail!("could not find a free name for the output directory; give --out DIR")
}

/// Runs the lab.
pub(crate) async fn run(args: &LabArgs) -> Result<()> {
    let started = Instant::now();
    let knobs = Knobs::new(args)?;
    if args.class.is_empty() {
        bail!("--class: give at least one hardware class, e.g. phenom-9500");
    }
    // Every class and file is checked before anything runs.
    let mut all: Vec<Arc<Inputs>> = Vec::new();
    for class in &args.class {
        all.push(Arc::new(inputs::load(
            Some(class),
            args.workloads.as_deref(),
            args.scenarios.as_deref(),
            TIMESLICE_S,
        )?));
    }
    for (i, a) in all.iter().enumerate() {
        if all[..i]
            .iter()
            .any(|b| inputs::file_safe(&b.class.name) == inputs::file_safe(&a.class.name))
        {
            bail!("--class: class {} is given twice; give each class once", a.class.name);
        }
    }
    let (out, created) = output_dir(args.out.as_deref())?;
    let several = all.len() > 1;
    let mut done = Vec::new();
    for inputs in &all {
        let dir =
            if several { out.join(inputs::file_safe(&inputs.class.name)) } else { out.clone() };
        let result = run_class(args, inputs, &knobs, &dir, started).await;
        if let Err(e) = result {
            if created && done.is_empty() {
                // Nothing was written: leave no empty folder behind.
                let _ = std::fs::remove_dir(&dir);
                let _ = std::fs::remove_dir(&out);
            }
            return Err(e);
        }
        done.push(inputs.class.name.clone());
    }
    if several {
        write_index(&out, &done)?;
        println!(
            "vmgov lab: {} classes, one folder each under {}/ ({:.0} s)",
            done.len(),
            out.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The top of a several-class report: a line and a link per class.
fn write_index(out: &Path, classes: &[String]) -> Result<()> {
    let mut text = String::from(
        "# vmgov lab report\n\nThe whole experiment on each hardware class, in its own folder \
         (learning, a model of its own, every scenario, the bound; `docs/yardstick.md` defines \
         the measures):\n\n",
    );
    for c in classes {
        let dir = inputs::file_safe(c);
        text.push_str(&format!("- `{c}`: [{dir}/report.md]({dir}/report.md)\n"));
    }
    let path = out.join("report.md");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The whole experiment on one class, into `out`.
async fn run_class(
    args: &LabArgs,
    inputs: &Arc<Inputs>,
    knobs: &Knobs,
    out: &Path,
    started: Instant,
) -> Result<()> {
    std::fs::create_dir_all(out)
        .with_context(|| format!("creating the output directory {}", out.display()))?;
    if args.etcd.is_empty() {
        let desc = "in-memory store".to_owned();
        let store = MemoryStore::new(SAMPLE_CAPACITY);
        run_with(store, desc, inputs, knobs, out, started).await
    } else {
        let prefix = format!(
            "/vmgov-lab/{}-{}-{}/",
            utc_stamp(),
            std::process::id(),
            inputs::file_safe(&inputs.class.name)
        );
        let endpoints = args.etcd.join(",");
        let config = EtcdConfig {
            prefix: prefix.clone(),
            sample_capacity: SAMPLE_CAPACITY,
            ..EtcdConfig::new(args.etcd.clone())
        };
        let hint = "start etcd there, or leave out --etcd to use the in-memory store";
        let store = tokio::time::timeout(Duration::from_secs(30), EtcdStore::connect(config))
            .await
            .map_err(|_| anyhow!("etcd at {endpoints} did not answer within 30 s; {hint}"))?
            .map_err(|e| anyhow!("connecting to etcd at {endpoints}: {e}; {hint}"))?;
        let desc = format!("etcd at {endpoints}, key prefix {prefix}");
        run_with(store, desc, inputs, knobs, out, started).await
    }
}

/// Runs the experiment on `store`, then prints the tables and writes the report.
async fn run_with<S: Store>(
    store: S,
    desc: String,
    inputs: &Arc<Inputs>,
    knobs: &Knobs,
    out: &Path,
    started: Instant,
) -> Result<()> {
    let report = experiment(store, desc, inputs, knobs, out, started).await?;
    println!("\n=== vmgov lab on {} ===", inputs.class.name);
    println!("{}", report::terminal(&report));
    write_files(out, &report)?;
    println!(
        "vmgov lab: report.md, report.json, model.json and {} plots written to {}/ ({:.0} s)",
        report.plots.len(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    let beaten = report::beaten_bounds(&report);
    if !beaten.is_empty() {
        bail!(
            "the yardstick is wrong: {} run(s) met their thresholds on less energy than the whole-run bound allows (by more than {:.1}%): {}",
            beaten.len(),
            100.0 * results::BOUND_NOISE,
            beaten.join("; ")
        );
    }
    Ok(())
}

fn write_files(out: &Path, report: &Report) -> Result<()> {
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("report.md", &report::markdown(report))?;
    write("report.json", &serde_json::to_string_pretty(report).context("serialising the report")?)?;
    Ok(())
}

/// Learning on the training suite, one host after another, then training and activation.
async fn learn_and_train<S: Store>(
    fleet: Arc<Fleet<S>>,
    inputs: Arc<Inputs>,
    knobs: Knobs,
    progress: Arc<Progress>,
) -> Result<(Vec<LearnedHost>, Trained)> {
    // Size each training workload so that it outlasts its share of learning but not by much:
    // its phases are all seen. Its length at f_max comes from a short simulated run.
    #[allow(clippy::cast_precision_loss, reason = "sample counts are far below 2^53")]
    let learning_s = knobs.samples as f64 / LABELS_PER_SLICE * TIMESLICE_S;
    let probe = 0.05;
    let mut hosts = Vec::new();
    for (i, name) in inputs.training.iter().enumerate() {
        let (inputs2, config, name2) = (Arc::clone(&inputs), knobs.sim(), name.clone());
        let alone = tokio::task::spawn_blocking(move || {
            runs::simulated(
                &inputs2.class,
                inputs2.vms(std::slice::from_ref(&name2), probe),
                config,
                SimPolicy::Governor(Governor::Performance, None),
                36_000.0,
            )
        })
        .await
        .context("a simulation task failed")??;
        let runtime = alone.report.time_s / probe;
        let scale = TRAINING_MARGIN * learning_s / runtime.max(1e-3);
        let host = SimHost::new(
            inputs.class.clone(),
            inputs.vms(std::slice::from_ref(name), scale),
            knobs.sim(),
        )
        .map_err(|e| anyhow!("training workload {name}: {}", inputs::chain(&e)))?;
        let host_id = format!("lab-learn-{name}");
        let t = Instant::now();
        let learned = fleet
            .learn(&host_id, name, scale, host, runtime * scale, knobs.samples)
            .await
            .with_context(|| format!("learning on training host {host_id}"))?;
        progress.say(&format!(
            "learning {}/{}: {name}: {} samples{} ({:.1} s)",
            i + 1,
            inputs.training.len(),
            learned.samples,
            if learned.ended_early { ", workload ended before the target" } else { "" },
            t.elapsed().as_secs_f64()
        ));
        hosts.push(learned);
    }
    let t = Instant::now();
    let trained = fleet.train(&inputs.class.name).await?;
    let s = &trained.summary;
    progress.say(&format!(
        "model v{} trained and activated through the coordinator: {} samples, cross-validated mean MAPE perf {:.2}%, power {:.2}%, throughput {:.2}% ({:.1} s)",
        s.version,
        s.training.as_ref().map_or(0, |t| t.sample_count),
        100.0 * s.mean_mape_perf,
        100.0 * s.mean_mape_power,
        100.0 * s.mean_mape_throughput,
        t.elapsed().as_secs_f64()
    ));
    Ok((hosts, trained))
}

/// A run's name for progress lines and errors.
fn name(inputs: &Inputs, key: &Key) -> String {
    match key {
        Key::Reference(w) => format!("{w} alone under performance (reference)"),
        Key::ReportBaseline(s) => format!(
            "{} with every core at f_max (the report's baseline)",
            inputs.scenarios.get(*s).map_or("?", |s| s.title.as_str())
        ),
        Key::Run { scenario, governor, threshold } => {
            let title = inputs.scenarios.get(*scenario).map_or("?", |s| s.title.as_str());
            let at = threshold
                .and_then(|t| inputs.thresholds.get(t))
                .map(|t| format!(" @{:.0}%", 100.0 * t))
                .unwrap_or_default();
            format!("{title} · {}{at}", governor.label())
        }
    }
}

fn describe(inputs: &Inputs, key: &Key, run: &RunData) -> String {
    format!(
        "{}: {:.1} J{}, {:.1} s",
        name(inputs, key),
        run.report.package_energy_j,
        if run.completed { "" } else { " (hit the time limit)" },
        run.wall_s
    )
}

#[allow(clippy::too_many_lines, reason = "the experiment's schedule, in order")]
async fn experiment<S: Store>(
    store: S,
    store_desc: String,
    inputs: &Arc<Inputs>,
    knobs: &Knobs,
    out: &Path,
    started: Instant,
) -> Result<Report> {
    let scenarios = &inputs.scenarios;
    let thresholds = &inputs.thresholds;
    let evaluated = inputs.evaluated();
    let per_scenario = |s: &Scenario| {
        Governor::ALL
            .iter()
            .map(|g| match (g, s.single()) {
                (Governor::Performance, true) => 0,
                (g, _) if g.per_threshold() => thresholds.len(),
                _ => 1,
            })
            .sum::<usize>()
    };
    let total = evaluated.len()
        + scenarios.iter().map(per_scenario).sum::<usize>()
        + report_table::scenarios(inputs).len();
    let progress = Arc::new(Progress { started, done: AtomicUsize::new(0), total });
    progress.say(&format!(
        "vmgov lab: {} scenarios × {} thresholds × {} governors on {} ({} runs, {} at once); workloads at {} of full length, seed {}",
        scenarios.len(),
        thresholds.len(),
        Governor::ALL.len(),
        inputs.class.name,
        total,
        knobs.jobs,
        knobs.scale,
        knobs.seed
    ));
    let work_dir = std::env::temp_dir().join(format!(
        "vmgov-lab-{}-{}",
        std::process::id(),
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
    ));
    let fleet = Arc::new(Fleet::start(store, &work_dir).await?);
    progress.say(&format!("coordinator serving at {} ({store_desc})", fleet.endpoint));
    let spare = SimHost::new(inputs.class.clone(), Vec::new(), knobs.sim()).map_err(|e| {
        anyhow!("an empty host of class {}: {}", inputs.class.name, inputs::chain(&e))
    });
    let result = match spare {
        Ok(host) => match fleet.start_spare(host).await {
            Ok(()) => {
                experiment_with(&fleet, store_desc, inputs, knobs, out, started, &progress).await
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match Arc::try_unwrap(fleet) {
        Ok(f) => f.stop().await,
        Err(_) => {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
    }
    result
}

#[allow(clippy::too_many_lines, reason = "the experiment's schedule, in order")]
async fn experiment_with<S: Store>(
    fleet: &Arc<Fleet<S>>,
    store_desc: String,
    inputs: &Arc<Inputs>,
    knobs: &Knobs,
    out: &Path,
    started: Instant,
    progress: &Arc<Progress>,
) -> Result<Report> {
    let scenarios = &inputs.scenarios;
    let thresholds = &inputs.thresholds;
    let evaluated = inputs.evaluated();
    let permits = Arc::new(Semaphore::new(knobs.jobs));
    // 1. Learning and training, one training host after another, alongside the simulated runs;
    //    the agents learning take one of the permits.
    let learning = {
        let (fleet, inputs, knobs, progress) =
            (Arc::clone(fleet), Arc::clone(inputs), knobs.clone(), Arc::clone(progress));
        let permits = Arc::clone(&permits);
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            learn_and_train(fleet, inputs, knobs, progress).await
        })
    };

    // 2. Every workload alone under performance: the references.
    let mut set: JoinSet<(Key, Result<RunData>)> = JoinSet::new();
    let spawn_sim = |set: &mut JoinSet<(Key, Result<RunData>)>,
                     key: Key,
                     workloads: Vec<String>,
                     policy: SimPolicy,
                     max_time_s: f64| {
        let (inputs, permits, config, scale) =
            (Arc::clone(inputs), Arc::clone(&permits), knobs.sim(), knobs.scale);
        set.spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return (key, Err(anyhow!("the lab is stopping")));
            };
            let result = tokio::task::spawn_blocking(move || {
                runs::simulated(
                    &inputs.class,
                    inputs.vms(&workloads, scale),
                    config,
                    policy,
                    max_time_s,
                )
            })
            .await
            .map_err(|e| anyhow!("a simulation task failed: {e}"))
            .and_then(|r| r);
            (key, result)
        });
    };
    for w in &evaluated {
        spawn_sim(
            &mut set,
            Key::Reference(w.clone()),
            vec![w.clone()],
            SimPolicy::Governor(Governor::Performance, None),
            36_000.0 * knobs.scale.max(0.01) + 60.0,
        );
    }
    let mut results: BTreeMap<Key, RunData> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut collect =
        |key: Key, result: Result<RunData>, results: &mut BTreeMap<Key, RunData>| match result {
            Ok(run) => {
                progress.run_done(&describe(inputs, &key, &run));
                results.insert(key, run);
            }
            Err(e) => {
                let what = format!("{}: {e:#}", name(inputs, &key));
                progress.say(&format!("FAILED: {what}"));
                failures.push(what);
            }
        };
    while let Some(joined) = set.join_next().await {
        let (key, result) = joined.context("a lab task failed")?;
        collect(key, result, &mut results);
    }
    let references: BTreeMap<String, Reference> = evaluated
        .iter()
        .filter_map(|w| {
            results
                .get(&Key::Reference(w.clone()))
                .map(|r| (w.clone(), Reference::new(w, &r.report)))
        })
        .collect();
    if references.len() != evaluated.len() {
        learning.abort();
        bail!("some reference runs failed: {}", failures.join("; "));
    }
    // The whole-run bound of every scenario at every threshold (milliseconds each; off the
    // schedule's critical path).
    let bounds_task = {
        let (inputs, references, config, scale) =
            (Arc::clone(inputs), references.clone(), knobs.sim(), knobs.scale);
        tokio::task::spawn_blocking(move || runs::bounds(&inputs, &references, &config, scale))
    };
    // A run may take this long before it counts as stuck: ten times its VMs' runtimes alone.
    let bounds: Vec<f64> = scenarios
        .iter()
        .map(|s| {
            let alone: f64 = s
                .workloads
                .iter()
                .filter_map(|w| results.get(&Key::Reference(w.clone())))
                .map(|r| r.report.time_s)
                .sum();
            10.0 * alone + 10.0
        })
        .collect();

    // 3. The baselines and the oracle, simulated.
    for (i, s) in scenarios.iter().enumerate() {
        for g in Governor::ALL {
            if g.objective().is_some() || (g == Governor::Performance && s.single()) {
                continue;
            }
            if g.per_threshold() {
                for (t, &thr) in thresholds.iter().enumerate() {
                    let key = Key::Run { scenario: i, governor: g, threshold: Some(t) };
                    let policy = SimPolicy::Governor(g, Some(thr));
                    spawn_sim(&mut set, key, s.workloads.clone(), policy, bounds[i]);
                }
            } else {
                let key = Key::Run { scenario: i, governor: g, threshold: None };
                let policy = SimPolicy::Governor(g, None);
                spawn_sim(&mut set, key, s.workloads.clone(), policy, bounds[i]);
            }
        }
    }
    for i in report_table::scenarios(inputs) {
        let workloads = scenarios[i].workloads.clone();
        let key = Key::ReportBaseline(i);
        spawn_sim(&mut set, key, workloads, SimPolicy::ReportBaseline, bounds[i]);
    }

    // 4. vmgov's agents, once the model is trained.
    let mut learning = learning;
    let (learned, trained) = loop {
        tokio::select! {
            joined = set.join_next(), if !set.is_empty() => {
                if let Some(joined) = joined {
                    let (key, result) = joined.context("a lab task failed")?;
                    collect(key, result, &mut results);
                }
            }
            learned = &mut learning => break learned.context("the learning task failed")??,
        }
    };
    let predictor = Arc::new(
        Predictor::new(&trained.model)
            .map_err(|e| anyhow!("the trained model is unusable: {e}"))?,
    );
    // The model against the simulator, workload by workload (short runs, off the schedule).
    let checks = {
        let mut checks = JoinSet::new();
        for w in &evaluated {
            let (inputs, predictor, config, w) =
                (Arc::clone(inputs), Arc::clone(&predictor), knobs.sim(), w.clone());
            let scale = knobs.scale.min(MODEL_CHECK_SCALE);
            checks
                .spawn_blocking(move || runs::model_check(&inputs, &w, &predictor, &config, scale));
        }
        checks
    };
    for (i, s) in scenarios.iter().enumerate() {
        for g in Governor::ALL {
            let Some(objective) = g.objective() else { continue };
            for (t, &thr) in thresholds.iter().enumerate() {
                let key = Key::Run { scenario: i, governor: g, threshold: Some(t) };
                let host_id = format!("lab-{}-{}-{:.0}", s.id, g.id(), 100.0 * thr);
                let host = SimHost::new(
                    inputs.class.clone(),
                    inputs.vms(&s.workloads, knobs.scale),
                    knobs.sim(),
                )
                .map_err(|e| anyhow!("scenario {:?}: {}", s.title, inputs::chain(&e)))?;
                #[allow(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a bounded positive count"
                )]
                let max_slices = (bounds[i] / TIMESLICE_S).ceil() as u64;
                let thresholds = Thresholds::new(thr, thr)?;
                let (fleet, permits, predictor) =
                    (Arc::clone(fleet), Arc::clone(&permits), Arc::clone(&predictor));
                set.spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return (key, Err(anyhow!("the lab is stopping")));
                    };
                    let t0 = Instant::now();
                    let result = fleet
                        .run_agent(&host_id, host, thresholds, objective, predictor, max_slices)
                        .await
                        .with_context(|| format!("vmgov's agent on host {host_id}"))
                        .map(|r| RunData {
                            report: r.report,
                            completed: r.completed,
                            trace: r.trace,
                            wall_s: t0.elapsed().as_secs_f64(),
                            estimated_saving: r.estimated_saving,
                        });
                    (key, result)
                });
            }
        }
    }
    while let Some(joined) = set.join_next().await {
        let (key, result) = joined.context("a lab task failed")?;
        collect(key, result, &mut results);
    }
    if !failures.is_empty() {
        bail!("{} runs failed: {}", failures.len(), failures.join("; "));
    }
    let whole_run_bounds = bounds_task.await.context("computing the whole-run bounds")?;
    let mut model_check: Vec<runs::ModelCheck> = Vec::new();
    for joined in checks.join_all().await {
        model_check.push(joined.context("checking the model against the simulator")?);
    }
    model_check.sort_by_key(|c| evaluated.iter().position(|w| *w == c.workload));

    // 5. Measures, plots, report.
    let pstates_ghz: Vec<f64> = inputs.class.pstates.iter().map(|p| p.frequency_hz / 1e9).collect();
    let mut scenario_results = Vec::new();
    let mut all_plots = Vec::new();
    for (i, s) in scenarios.iter().enumerate() {
        let mut per_threshold = Vec::new();
        let mut plots = Vec::new();
        for (t, &thr) in thresholds.iter().enumerate() {
            let mut runs: BTreeMap<Governor, &RunData> = BTreeMap::new();
            for g in Governor::ALL {
                let key = if g == Governor::Performance && s.single() {
                    Key::Reference(s.workloads[0].clone())
                } else {
                    Key::Run { scenario: i, governor: g, threshold: g.per_threshold().then_some(t) }
                };
                if let Some(r) = results.get(&key) {
                    runs.insert(g, r);
                }
            }
            if let Some(trace) = runs.get(&Governor::Vmgov).and_then(|r| r.trace.as_ref()) {
                let name = format!("frequency-{}-{:.0}.svg", s.id, 100.0 * thr);
                let title = format!("{} · vmgov (energy) at {:.0}%", s.title, 100.0 * thr);
                let svg = svg::frequency_chart(&title, trace, &pstates_ghz);
                std::fs::write(out.join(&name), svg)
                    .with_context(|| format!("writing {}", out.join(&name).display()))?;
                plots.push(name);
            }
            let bound = whole_run_bounds.get(&(i, t));
            per_threshold.push(results::evaluate(inputs, s, thr, &references, &runs, bound));
        }
        let mut bars = Vec::new();
        for (k, g) in Governor::ALL.iter().enumerate() {
            for tr in &per_threshold {
                let Some(r) = tr.get(*g) else { continue };
                let label = if g.per_threshold() {
                    format!("{} @{:.0}%", g.label(), 100.0 * tr.threshold)
                } else {
                    g.label().to_owned()
                };
                bars.push(svg::EnergyBar {
                    label,
                    package: r.energy_ratio,
                    core: r.core_energy_ratio,
                    met: r.thresholds_met,
                    colour: k,
                });
                if !g.per_threshold() {
                    break;
                }
            }
        }
        let name = format!("energy-{}.svg", s.id);
        std::fs::write(out.join(&name), svg::energy_chart(&s.title, &bars))
            .with_context(|| format!("writing {}", out.join(&name).display()))?;
        plots.insert(0, name);
        all_plots.extend(plots.iter().cloned());
        scenario_results.push(ScenarioResult {
            id: s.id.clone(),
            title: s.title.clone(),
            single: s.single(),
            group: s.group,
            workloads: s.workloads.clone(),
            results: per_threshold,
            plots,
        });
    }
    let model_path = out.join("model.json");
    std::fs::write(
        &model_path,
        serde_json::to_string_pretty(&trained.model).context("serialising the model")?,
    )
    .with_context(|| format!("writing {}", model_path.display()))?;
    let summary = report::summary(&scenario_results);
    let report_table = report_table::rows(inputs, &results);
    let estimate_error = report::estimate_error(&summary);
    let held_out_error = report::held_out_errors(&scenario_results, &model_check, &pstates_ghz);
    Ok(Report {
        tool: format!("vmgov lab {}", env!("CARGO_PKG_VERSION")),
        settings: Settings {
            class: inputs.class.name.clone(),
            class_source: inputs.class_source.clone(),
            workloads: inputs.origins.clone(),
            cores: inputs.class.cores,
            pstates_ghz,
            vcpus: inputs::VCPUS,
            timeslice_s: TIMESLICE_S,
            seed: knobs.seed,
            counter_noise: COUNTER_NOISE,
            scale: knobs.scale,
            quick: knobs.quick,
            sample_target: knobs.samples,
            thresholds: thresholds.clone(),
            store: store_desc,
            coordinator: fleet.endpoint.clone(),
            jobs: knobs.jobs,
            tolerance: results::TOLERANCE,
        },
        model: ModelInfo::new(&trained.model),
        model_check,
        learning: learned,
        references: evaluated.iter().filter_map(|w| references.get(w).cloned()).collect(),
        scenarios: scenario_results,
        summary,
        report_table,
        estimate_error,
        held_out_error,
        plots: all_plots,
        wall_s: started.elapsed().as_secs_f64(),
    })
}
