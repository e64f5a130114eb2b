//! `vmgov-agent`: thin entry point. Flags are parsed here; the work is in the library.
#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a command-line program prints")]

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use vmgov_agent::{
    config::{AgentConfig, LearningConfig, PlatformKind},
    preflight,
};
use vmgov_proto::Thresholds;
use vmgov_sim::{
    HardwareClass, SimConfig, VmSpec, Workload, calibration,
    governor::GovernorKind,
    host::{class, workload},
    simulate::{self, Policy, Scenario},
};

/// vmgov node agent: per-VM DVFS from predicted performance, power and throughput.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: measure every VM each timeslice, predict, decide and set frequencies.
    Run(RunArgs),
    /// Run workloads on the simulated host under a governor, fixed P-states or the oracle, and
    /// print the ground truth (runtime or throughput, energy, power, frequency residency).
    Simulate(SimulateArgs),
    /// Print the calibration tables of docs/calibration.md for a class: every workload alone at
    /// every P-state and under the oracle at thresholds 70% and 40%, next to the report's figures.
    Calibrate(CalibrateArgs),
    /// Check what this host lets the agent do (cpufreq, uclamp, perf, RAPL, rival daemons, QEMU
    /// VMs); exit code 0: it can act, 1: only observe (--dry-run), 2: nothing.
    Preflight(PreflightArgs),
}

#[derive(Args)]
struct PreflightArgs {
    /// Configuration file (TOML): its [linux] roots are checked.
    #[arg(long, env = "VMGOV_AGENT_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// The proc filesystem to check (default /proc, or the configuration's).
    #[arg(long)]
    proc_root: Option<std::path::PathBuf>,
    /// The sys filesystem to check (default /sys, or the configuration's).
    #[arg(long)]
    sys_root: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML); flags override it.
    #[arg(long, env = "VMGOV_AGENT_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Platform backend.
    #[arg(long, value_enum, env = "VMGOV_AGENT_PLATFORM")]
    platform: Option<PlatformArg>,
    /// Shadow mode: decide and log what would be set, never change a frequency.
    #[arg(long)]
    dry_run: bool,
    /// Write one JSON line per VM per timeslice (counter deltas, features, decision) to FILE, or
    /// `-` for standard output.
    #[arg(long, value_name = "FILE|-")]
    emit_samples: Option<String>,
    /// How per-VM choices become per-core frequencies: follow, pin or max.
    #[arg(long)]
    arbiter: Option<vmgov_agent::arbiter::ArbiterPolicy>,
    /// Governor for VMs without a valid model or thresholds.
    #[arg(long)]
    fallback_governor: Option<GovernorKind>,
    /// What decisions minimise: energy (default), power (the report's equation 9) or edp.
    #[arg(long)]
    objective: Option<vmgov_proto::Objective>,
    /// Timeslice in milliseconds.
    #[arg(long)]
    timeslice_ms: Option<f64>,
    /// Model file (JSON) to start with.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Thresholds for every VM without its own, as PERF,THROUGHPUT fractions (0.7,0.7).
    #[arg(long, value_parser = parse_pair)]
    thresholds: Option<(f64, f64)>,
    /// Start in learning mode (sweep the P-states, label the slices).
    #[arg(long)]
    learn: bool,
    /// Measure what each VM's P-state really costs it once every this many slices (f_max, own
    /// choice, f_max windows at the end of each cycle); 0 turns it off. Default 1000.
    #[arg(long, value_name = "SLICES")]
    verify_every: Option<u32>,
    /// Only report VMs whose observed ratios fall short of their thresholds; by default the
    /// agent also keeps them at P-states that could meet the thresholds, whatever the model says.
    #[arg(long)]
    no_guard: bool,
    /// Simulated host: hardware class (built-in name or file).
    #[arg(long)]
    class: Option<String>,
    /// Simulated host: a workload per VM (repeat).
    #[arg(long = "workload", short = 'w')]
    workloads: Vec<String>,
    /// Simulated host: scale every workload's length.
    #[arg(long)]
    scale: Option<f64>,
    /// Simulated host: run at this many times real time (default: as fast as possible).
    #[arg(long)]
    speed: Option<f64>,
    /// The coordinator to connect to, e.g. http://10.0.0.5:7700.
    #[arg(long, env = "VMGOV_COORDINATOR")]
    coordinator: Option<String>,
    /// Directory for the cached model and thresholds and unsent samples.
    #[arg(long, env = "VMGOV_AGENT_CACHE_DIR")]
    cache_dir: Option<std::path::PathBuf>,
    /// This host's id (default: the host name).
    #[arg(long, env = "VMGOV_HOST_ID")]
    host_id: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlatformArg {
    Sim,
    Linux,
}

fn parse_pair(s: &str) -> Result<(f64, f64), String> {
    let (a, b) =
        s.split_once(',').ok_or_else(|| format!("{s:?}: write PERF,THROUGHPUT, e.g. 0.7,0.7"))?;
    Ok((parse_fraction(a)?, parse_fraction(b)?))
}

#[derive(Args)]
struct CalibrateArgs {
    /// Hardware class: a built-in name or a TOML file.
    #[arg(long, default_value = "phenom-9500")]
    class: String,
    /// Workloads to tabulate (built-in names or files); the report's evaluation set by default.
    #[arg(long = "workload", short = 'w')]
    workloads: Vec<String>,
    /// Scale every workload's length (ratios barely depend on it; 1 is the full length).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Print JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct SimulateArgs {
    /// Hardware class: a built-in name (phenom-9500, epyc-7502) or a TOML file.
    #[arg(long, default_value = "phenom-9500")]
    class: String,
    /// A workload per VM: a built-in name (see --list) or a TOML file. Repeat for more VMs.
    #[arg(long = "workload", short = 'w', required_unless_present = "list")]
    workloads: Vec<String>,
    /// vCPUs of every VM.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// A baseline governor: performance, powersave, ondemand, conservative, schedutil, cpu-load.
    #[arg(long, conflicts_with_all = ["pstate", "oracle"])]
    governor: Option<GovernorKind>,
    /// Fixed P-state index per VM (0 = slowest), one for all VMs or comma-separated per VM.
    #[arg(long, value_delimiter = ',', conflicts_with = "oracle")]
    pstate: Vec<usize>,
    /// Use the oracle, holding every VM to --perf and --throughput.
    #[arg(long)]
    oracle: bool,
    /// Performance threshold for the oracle, a fraction (0.7) or a percentage (70).
    #[arg(long, default_value = "0.7", value_parser = parse_fraction)]
    perf: f64,
    /// Throughput threshold for the oracle, a fraction or a percentage.
    #[arg(long, default_value = "0.7", value_parser = parse_fraction)]
    throughput: f64,
    /// Timeslice in milliseconds.
    #[arg(long, default_value_t = 10.0)]
    timeslice_ms: f64,
    /// Seed of the measurement noise.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Relative standard deviation of the counters (0 for exact).
    #[arg(long, default_value_t = 0.01)]
    noise: f64,
    /// Scale every workload's length (0.01 runs 1% of each phase, with the same ratios).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Stop after this much simulated time, seconds.
    #[arg(long, default_value_t = 36_000.0)]
    max_time_s: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
    /// List the built-in classes and workloads and exit.
    #[arg(long)]
    list: bool,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim_end_matches('%').parse().map_err(|e| format!("{s:?}: {e}"))?;
    let v = if v > 1.0 { v / 100.0 } else { v };
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s} is not a fraction in [0, 1] or a percentage"))
    }
}

fn agent_config(args: &RunArgs) -> anyhow::Result<AgentConfig> {
    let mut c = match &args.config {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    if let Some(p) = args.platform {
        c.platform = match p {
            PlatformArg::Sim => PlatformKind::Sim,
            PlatformArg::Linux => PlatformKind::Linux,
        };
    }
    c.dry_run |= args.dry_run;
    if let Some(e) = &args.emit_samples {
        c.emit_samples = Some(e.clone());
    }
    if let Some(a) = args.arbiter {
        c.arbiter = a;
    }
    if let Some(g) = args.fallback_governor {
        c.fallback_governor = g.name().to_owned();
    }
    if let Some(o) = args.objective {
        c.objective = o;
    }
    if let Some(t) = args.timeslice_ms {
        c.timeslice_ms = t;
    }
    if let Some(m) = &args.model {
        c.model = Some(m.clone());
    }
    if let Some((perf, thrp)) = args.thresholds {
        c.thresholds.default = Some(Thresholds::new(perf, thrp)?);
    }
    if let Some(n) = args.verify_every {
        c.verify.every_slices = n;
    }
    if args.no_guard {
        c.verify.guard = false;
    }
    if args.learn && c.learning.is_none() {
        c.learning = Some(LearningConfig::default());
    }
    if let Some(class) = &args.class {
        c.sim.class = class.clone();
    }
    if !args.workloads.is_empty() {
        c.sim.workloads = args.workloads.clone();
    }
    if let Some(s) = args.speed {
        c.sim.speed = Some(s);
    }
    if let Some(u) = &args.coordinator {
        c.coordinator = Some(u.clone());
    }
    if let Some(d) = &args.cache_dir {
        c.cache_dir = d.clone();
    }
    if let Some(h) = &args.host_id {
        c.host_id = Some(h.clone());
    }
    if let Some(s) = args.scale {
        c.sim.scale = s;
    }
    c.validate()?;
    Ok(c)
}

fn run_cmd(args: &RunArgs) -> anyhow::Result<()> {
    let config = agent_config(args)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if config.platform == PlatformKind::Sim && config.sim.workloads.is_empty() {
        bail!(
            "the simulated host has no VMs: give workloads with -w NAME (see `vmgov-agent simulate --list`)"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let finished = runtime.block_on(vmgov_agent::run::run(&config, shutdown_signal()))?;
    let s = &finished.status;
    eprintln!(
        "vmgov-agent: stopped after {} slices ({:.2} s of host time); {} labelled samples; {} sample lines dropped",
        s.slices, s.time_s, s.labelled_samples, s.samples_dropped
    );
    if s.energy_j > 0.0 {
        let at_fmax = s.energy_j + s.energy_saved_j;
        eprintln!(
            "vmgov-agent: its estimate: {:.1} J charged to VMs, {:.1} J saved against f_max ({:.1}% of {:.1} J)",
            s.energy_j,
            s.energy_saved_j,
            100.0 * s.energy_saved_j / at_fmax,
            at_fmax
        );
    }
    if let Some(mut platform) = finished.platform
        && let Some(sim) =
            platform.as_any_mut().downcast_mut::<vmgov_agent::platform::sim::SimPlatform>()
    {
        let report = sim.host().report();
        let pstates_hz = sim.host().class().pstates.iter().map(|p| p.frequency_hz).collect();
        let outcome = simulate::Outcome {
            policy: "vmgov-agent".into(),
            completed: sim.host().all_finished(),
            steps: s.slices,
            pstates_hz,
            report,
        };
        print!("{}", simulate::render(&outcome));
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmgov-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Some(Command::Run(args)) => run_cmd(&args).map(|()| ExitCode::SUCCESS),
        Some(Command::Simulate(args)) => simulate_cmd(&args).map(|()| ExitCode::SUCCESS),
        Some(Command::Calibrate(args)) => calibrate_cmd(&args).map(|()| ExitCode::SUCCESS),
        Some(Command::Preflight(args)) => Ok(preflight_cmd(&args)),
        None => bail!("choose a command: run, simulate, calibrate or preflight (see --help)"),
    }
}

/// Exit code 0, 1 or 2 as the verdict says; 2 as well when the check itself cannot start.
fn preflight_cmd(args: &PreflightArgs) -> ExitCode {
    let linux = match &args.config {
        Some(path) => match AgentConfig::load(path) {
            Ok(c) => c.linux,
            Err(e) => {
                eprintln!("vmgov-agent: {:#}", anyhow::Error::from(e));
                return ExitCode::from(2);
            }
        },
        None => vmgov_agent::config::LinuxConfig::default(),
    };
    let proc_root = args.proc_root.clone().unwrap_or(linux.proc_root);
    let sys_root = args.sys_root.clone().unwrap_or(linux.sys_root);
    let facts = preflight::gather(&proc_root, &sys_root);
    let report = preflight::assess(&facts);
    match args.output {
        Output::Table => print!("{}", report.render(&facts)),
        Output::Json => match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("vmgov-agent: {e}");
                return ExitCode::from(2);
            }
        },
    }
    ExitCode::from(report.exit_code)
}

fn simulate_cmd(args: &SimulateArgs) -> anyhow::Result<()> {
    if args.list {
        println!("hardware classes: {}", class::builtin_names().join(", "));
        println!("evaluation workloads: {}", workload::evaluation_names().join(", "));
        println!("training workloads: {}", workload::training_names().join(", "));
        println!("held-out workloads: {}", workload::held_out_names().join(", "));
        return Ok(());
    }
    let class = HardwareClass::load(&args.class)?;
    if !(args.scale.is_finite() && args.scale > 0.0) {
        bail!("--scale {} must be a positive number", args.scale);
    }
    let vms = args
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let workload = Workload::load(w)?.scaled(args.scale);
            Ok(VmSpec { name: format!("vm{i}"), vcpus: args.vcpus, affinity: None, workload })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let policy = if let Some(g) = args.governor {
        Policy::Governor(g)
    } else if !args.pstate.is_empty() {
        Policy::Fixed(args.pstate.clone())
    } else if args.oracle {
        Policy::Oracle(vec![Thresholds::new(args.perf, args.throughput)?])
    } else {
        bail!("choose who sets the frequencies: --governor NAME, --pstate N[,N...] or --oracle");
    };
    let scenario = Scenario {
        class,
        vms,
        config: SimConfig {
            timeslice_s: args.timeslice_ms / 1e3,
            seed: args.seed,
            counter_noise: args.noise,
        },
        max_time_s: args.max_time_s,
    };
    let outcome = simulate::run(&scenario, &policy).context("simulation failed")?;
    match args.output {
        Output::Table => print!("{}", simulate::render(&outcome)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&outcome)?),
    }
    Ok(())
}

fn calibrate_cmd(args: &CalibrateArgs) -> anyhow::Result<()> {
    if !(args.scale.is_finite() && args.scale > 0.0) {
        bail!("--scale {} must be a positive number", args.scale);
    }
    let class = HardwareClass::load(&args.class)?;
    let names: Vec<String> = if args.workloads.is_empty() {
        workload::evaluation_names().into_iter().map(str::to_owned).collect()
    } else {
        args.workloads.clone()
    };
    let workloads = names.iter().map(|w| Workload::load(w)).collect::<Result<Vec<_>, _>>()?;
    eprintln!("vmgov-agent: simulating {} workloads on {} ...", workloads.len(), class.name);
    let rows = calibration::table(&class, &workloads, args.scale)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", calibration::markdown(&class, &rows));
    }
    Ok(())
}
