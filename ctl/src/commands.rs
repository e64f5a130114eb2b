//! The operator commands over `FleetService`: thresholds by scope, status, models, learning,
//! what-if prediction and the event stream. Each validates its input before anything is sent,
//! prints a table (or JSON), and maps failures to an exit code (see `client.rs`).

use std::{collections::HashMap, time::Duration};

use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use vmgov_proto::pb;

use crate::client::{Failure, Output, exit, parse_fraction, print, table};

/// Which scope a threshold command is about.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ScopeArgs {
    /// The whole fleet.
    #[arg(long)]
    fleet: bool,
    /// A hardware class.
    #[arg(long, value_name = "CLASS")]
    class: Option<String>,
    /// A host.
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// A VM (UUID).
    #[arg(long, value_name = "VM")]
    vm: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> pb::ThresholdScope {
        use pb::threshold_scope::Scope;
        let scope = match (&self.class, &self.host, &self.vm) {
            (Some(c), _, _) => Scope::HardwareClass(c.clone()),
            (_, Some(h), _) => Scope::HostId(h.clone()),
            (_, _, Some(v)) => Scope::VmId(v.clone()),
            _ => Scope::Fleet(pb::threshold_scope::Fleet {}),
        };
        pb::ThresholdScope { scope: Some(scope) }
    }
}

/// `vmgov threshold ...`
#[derive(Debug, Subcommand)]
pub(crate) enum ThresholdCmd {
    /// Set the thresholds of a scope.
    Set {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Performance threshold: a fraction (0.7) or a percentage (70, 70%).
        #[arg(long, value_parser = parse_fraction)]
        perf: f64,
        /// Throughput threshold: a fraction or a percentage.
        #[arg(long, value_parser = parse_fraction)]
        thrp: f64,
        /// Who is making the change (recorded with it).
        #[arg(long, default_value_t = whoami())]
        by: String,
    },
    /// Show the thresholds set at a scope.
    Get {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// List every threshold entry.
    List,
    /// Delete the thresholds of a scope.
    Delete {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Show which scope's thresholds apply to a VM, and why.
    Explain {
        /// The VM (UUID or name).
        #[arg(long)]
        vm: String,
        /// Its host (looked up when omitted).
        #[arg(long)]
        host: Option<String>,
        /// Its hardware class (looked up when omitted).
        #[arg(long)]
        class: Option<String>,
    },
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "vmgov".into())
}

fn scope_text(s: Option<&pb::ThresholdScope>) -> String {
    match s.and_then(|s| vmgov_proto::ThresholdScope::try_from(s).ok()) {
        Some(s) => s.to_string(),
        None => "?".into(),
    }
}

fn pct(v: f64) -> String {
    format!("{:.0}%", 100.0 * v)
}

fn entries_table(entries: &[pb::ThresholdEntry]) -> comfy_table::Table {
    let mut t = table(["scope", "perf", "throughput", "updated by"]);
    for e in entries {
        let th = e.thresholds.unwrap_or_default();
        t.add_row([
            scope_text(e.scope.as_ref()),
            pct(th.perf),
            pct(th.throughput),
            e.updated_by.clone(),
        ]);
    }
    t
}

type Client = pb::fleet_service_client::FleetServiceClient<tonic::transport::Channel>;

pub(crate) async fn threshold(
    c: &mut Client,
    cmd: &ThresholdCmd,
    out: Output,
) -> Result<(), Failure> {
    match cmd {
        ThresholdCmd::Set { scope, perf, thrp, by } => {
            let e = c
                .set_threshold(pb::SetThresholdRequest {
                    scope: Some(scope.scope()),
                    thresholds: Some(pb::Thresholds { perf: *perf, throughput: *thrp }),
                    updated_by: by.clone(),
                })
                .await
                .map_err(|s| Failure::from_status("setting the threshold", &s))?
                .into_inner();
            print(out, &e, || entries_table(std::slice::from_ref(&e)))
        }
        ThresholdCmd::Get { scope } => {
            let e = c
                .get_threshold(pb::GetThresholdRequest { scope: Some(scope.scope()) })
                .await
                .map_err(|s| Failure::from_status("reading the threshold", &s))?
                .into_inner();
            print(out, &e, || entries_table(std::slice::from_ref(&e)))
        }
        ThresholdCmd::List => {
            let r = c
                .list_thresholds(pb::ListThresholdsRequest {})
                .await
                .map_err(|s| Failure::from_status("listing thresholds", &s))?
                .into_inner();
            print(out, &r, || entries_table(&r.entries))
        }
        ThresholdCmd::Delete { scope } => {
            let r = c
                .delete_threshold(pb::DeleteThresholdRequest { scope: Some(scope.scope()) })
                .await
                .map_err(|s| Failure::from_status("deleting the threshold", &s))?
                .into_inner();
            print(out, &r, || entries_table(r.removed.as_slice()))
        }
        ThresholdCmd::Explain { vm, host, class } => {
            let r = c
                .explain_thresholds(pb::ExplainThresholdsRequest {
                    vm_id: vm.clone(),
                    host_id: host.clone().unwrap_or_default(),
                    hardware_class: class.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| Failure::from_status("explaining thresholds", &s))?
                .into_inner();
            print(out, &r, || {
                let winner = r.effective.as_ref().map(|e| scope_text(e.scope.as_ref()));
                let mut t = table(["scope (most specific first)", "set", "perf", "throughput", ""]);
                for cand in &r.candidates {
                    let s = scope_text(cand.scope.as_ref());
                    let th = cand.thresholds.unwrap_or_default();
                    let (p, q) = if cand.present {
                        (pct(th.perf), pct(th.throughput))
                    } else {
                        ("-".into(), "-".into())
                    };
                    let mark = if winner.as_deref() == Some(s.as_str()) {
                        "← applies (most specific entry)"
                    } else {
                        ""
                    };
                    t.add_row([
                        s,
                        if cand.present { "yes".into() } else { "no".into() },
                        p,
                        q,
                        mark.into(),
                    ]);
                }
                if winner.is_none() {
                    t.add_row([
                        "no entry applies: the VM runs on the fallback governor",
                        "",
                        "",
                        "",
                        "",
                    ]);
                }
                t
            })
        }
    }
}

pub(crate) async fn status(
    c: &mut Client,
    class: Option<&str>,
    out: Output,
) -> Result<(), Failure> {
    let r = c
        .list_hosts(pb::ListHostsRequest { hardware_class: class.unwrap_or_default().into() })
        .await
        .map_err(|s| Failure::from_status("listing hosts", &s))?
        .into_inner();
    print(out, &r, || {
        let mut t = table([
            "host",
            "class",
            "VM",
            "GHz",
            "predicted perf/power/thrp",
            "observed perf/power/thrp",
            "thresholds",
            "saved",
            "model",
            "state",
        ]);
        for h in &r.hosts {
            if h.vms.is_empty() {
                t.add_row([
                    h.host_id.clone(),
                    h.hardware_class.clone(),
                    "-".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "".into(),
                    "no VMs".into(),
                ]);
            }
            for v in &h.vms {
                let name = v.vm.as_ref().map(|v| v.name.clone()).unwrap_or_default();
                let d = v.decision.clone().unwrap_or_default();
                let state = if d.fallback {
                    format!("fallback: {}", d.fallback_reason)
                } else if h.dry_run {
                    "dry-run".into()
                } else if d.below_thresholds() {
                    "deciding, BELOW THRESHOLDS".into()
                } else if d.pstate_floor > 0 {
                    format!("deciding, guarded at P-state {} or above", d.pstate_floor)
                } else {
                    "deciding".into()
                };
                t.add_row([
                    h.host_id.clone(),
                    h.hardware_class.clone(),
                    name,
                    format!("{:.2}", d.frequency_hz / 1e9),
                    ratios(d.predicted.as_ref()),
                    ratios(d.observed.as_ref()),
                    d.thresholds.map_or_else(
                        || "-".into(),
                        |t| format!("{:.2}/{:.2}", t.perf, t.throughput),
                    ),
                    saved(d.energy_joules, d.energy_saved_joules),
                    if d.model_version > 0 { format!("v{}", d.model_version) } else { "-".into() },
                    state,
                ]);
            }
        }
        t
    })
}

/// Ratios as `perf/power/thrp`, `-` where there are none or one is unknown (no energy meter).
fn ratios(r: Option<&pb::Ratios>) -> String {
    let num = |x: f64| if x.is_finite() { format!("{x:.2}") } else { "-".into() };
    r.map_or_else(
        || "-".into(),
        |r| format!("{}/{}/{}", num(r.perf), num(r.power), num(r.throughput)),
    )
}

/// Energy saved against f_max, in joules and as a share of what f_max would have spent.
fn saved(energy_j: f64, saved_j: f64) -> String {
    let at_fmax = energy_j + saved_j;
    if energy_j <= 0.0 || at_fmax <= 0.0 {
        return "-".into();
    }
    format!("{saved_j:.1} J ({:.0}%)", 100.0 * saved_j / at_fmax)
}

/// `vmgov models ...`
#[derive(Debug, Subcommand)]
pub(crate) enum ModelsCmd {
    /// List model versions (all classes, or one).
    List {
        /// Only this class.
        #[arg(long)]
        class: Option<String>,
    },
    /// Show one model: its coefficients and figures (the active one when no version is given).
    Show {
        /// The class.
        #[arg(long)]
        class: String,
        /// The version (the active one by default).
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
    /// Train a new version from the class's samples.
    Train {
        /// The class.
        #[arg(long)]
        class: String,
        /// ols (the report's), ridge or lasso.
        #[arg(long, default_value = "ols")]
        algorithm: String,
        /// Penalty for ridge and lasso.
        #[arg(long, default_value_t = 0.0)]
        alpha: f64,
        /// Cross-validation folds.
        #[arg(long, default_value_t = 5)]
        folds: u32,
        /// Activate the new version if its cross-validated error is no worse than the active one's.
        #[arg(long)]
        activate: bool,
    },
    /// Make a version active.
    Activate {
        /// The class.
        #[arg(long)]
        class: String,
        /// The version.
        #[arg(long)]
        version: u64,
    },
    /// Return to an earlier version (the one active before the current one by default).
    Rollback {
        /// The class.
        #[arg(long)]
        class: String,
        /// The version to return to.
        #[arg(long, default_value_t = 0)]
        version: u64,
    },
}

fn summaries_table(models: &[pb::ModelSummary]) -> comfy_table::Table {
    let mut t = table([
        "class",
        "version",
        "active",
        "algorithm",
        "samples",
        "MAPE perf",
        "MAPE power",
        "MAPE thrp",
    ]);
    for m in models {
        let tr = m.training.clone().unwrap_or_default();
        let algorithm = pb::Algorithm::try_from(tr.algorithm).map_or("?", |a| a.as_str_name());
        t.add_row([
            m.hardware_class.clone(),
            m.version.to_string(),
            if m.active { "yes".into() } else { "".into() },
            algorithm.trim_start_matches("ALGORITHM_").to_lowercase(),
            tr.sample_count.to_string(),
            format!("{:.2}%", 100.0 * m.mean_mape_perf),
            format!("{:.2}%", 100.0 * m.mean_mape_power),
            format!("{:.2}%", 100.0 * m.mean_mape_throughput),
        ]);
    }
    t
}

pub(crate) async fn models(c: &mut Client, cmd: &ModelsCmd, out: Output) -> Result<(), Failure> {
    match cmd {
        ModelsCmd::List { class } => {
            let r = c
                .list_models(pb::ListModelsRequest {
                    hardware_class: class.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| Failure::from_status("listing models", &s))?
                .into_inner();
            print(out, &r, || summaries_table(&r.models))
        }
        ModelsCmd::Show { class, version } => {
            let m = c
                .get_model(pb::GetModelRequest { hardware_class: class.clone(), version: *version })
                .await
                .map_err(|s| Failure::from_status("reading the model", &s))?
                .into_inner();
            print(out, &m, || {
                let mut header = vec!["P-state".to_owned(), "target".into(), "intercept".into()];
                header.extend(m.features.iter().cloned());
                let mut t = comfy_table::Table::new();
                t.set_header(header);
                for p in &m.per_pstate {
                    for (name, fit) in
                        [("perf", &p.perf), ("power", &p.power), ("thrp", &p.throughput)]
                    {
                        let fit = fit.clone().unwrap_or_default();
                        let mut row = vec![
                            format!("{:.2} GHz", p.frequency_hz / 1e9),
                            name.into(),
                            format!("{:.4}", fit.intercept),
                        ];
                        row.extend(fit.coefficients.iter().map(|c| format!("{c:.3e}")));
                        t.add_row(row);
                    }
                }
                t
            })
        }
        ModelsCmd::Train { class, algorithm, alpha, folds, activate } => {
            let algorithm = match algorithm.as_str() {
                "ols" => pb::Algorithm::Ols,
                "ridge" => pb::Algorithm::Ridge,
                "lasso" => pb::Algorithm::Lasso,
                other => {
                    return Err(Failure::new(
                        exit::INVALID,
                        format!("unknown algorithm {other:?}; choose ols, ridge or lasso"),
                    ));
                }
            };
            if !(alpha.is_finite() && *alpha >= 0.0) {
                return Err(Failure::new(
                    exit::INVALID,
                    format!("--alpha {alpha} must be a non-negative number"),
                ));
            }
            let m = c
                .train_model(pb::TrainModelRequest {
                    hardware_class: class.clone(),
                    algorithm: algorithm as i32,
                    alpha: *alpha,
                    folds: *folds,
                    activate_if_better: *activate,
                    features: vec![],
                })
                .await
                .map_err(|s| Failure::from_status("training", &s))?
                .into_inner();
            print(out, &m, || summaries_table(std::slice::from_ref(&m)))
        }
        ModelsCmd::Activate { class, version } => {
            let m = c
                .activate_model(pb::ActivateModelRequest {
                    hardware_class: class.clone(),
                    version: *version,
                })
                .await
                .map_err(|s| Failure::from_status("activating", &s))?
                .into_inner();
            print(out, &m, || summaries_table(std::slice::from_ref(&m)))
        }
        ModelsCmd::Rollback { class, version } => {
            let m = c
                .rollback_model(pb::RollbackModelRequest {
                    hardware_class: class.clone(),
                    version: *version,
                })
                .await
                .map_err(|s| Failure::from_status("rolling back", &s))?
                .into_inner();
            print(out, &m, || summaries_table(std::slice::from_ref(&m)))
        }
    }
}

/// `vmgov learn ...`
#[derive(Debug, Subcommand)]
pub(crate) enum LearnCmd {
    /// Start learning on the hosts of a class and wait for it (with a progress bar).
    Start {
        /// The class.
        #[arg(long)]
        class: String,
        /// Only these hosts (comma-separated; all connected hosts of the class by default).
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// Stop after this many labelled samples per host.
        #[arg(long)]
        samples: Option<u64>,
        /// Seconds at each P-state.
        #[arg(long, default_value_t = 0.5)]
        dwell: f64,
        /// Seconds of each f_max reference window.
        #[arg(long, default_value_t = 0.2)]
        reference: f64,
        /// Return at once instead of waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show a learning run (the latest by default).
    Status {
        /// The run.
        #[arg(long)]
        id: Option<String>,
    },
    /// Stop a learning run.
    Stop {
        /// The run.
        #[arg(long)]
        id: String,
    },
}

fn learning_table(s: &pb::LearningStatus) -> comfy_table::Table {
    let state = pb::LearningState::try_from(s.state).map_or("?", |x| x.as_str_name());
    let mut t = table(["run", "class", "state", "samples", "done"]);
    t.add_row([
        s.learning_id.clone(),
        s.hardware_class.clone(),
        state.trim_start_matches("LEARNING_STATE_").to_lowercase(),
        s.samples.to_string(),
        format!("{:.0}%", 100.0 * s.fraction_done),
    ]);
    for h in &s.hosts {
        t.add_row([
            format!("  host {}", h.host_id),
            String::new(),
            if !h.error.is_empty() {
                format!("failed: {}", h.error)
            } else if h.finished {
                "finished".into()
            } else {
                "learning".into()
            },
            h.samples.to_string(),
            format!("{:.0}%", 100.0 * h.fraction_done),
        ]);
    }
    if !s.hosts_unreachable.is_empty() {
        t.add_row([
            format!("not connected: {}", s.hosts_unreachable.join(", ")),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    t
}

pub(crate) async fn learn(c: &mut Client, cmd: &LearnCmd, out: Output) -> Result<(), Failure> {
    match cmd {
        LearnCmd::Start { class, hosts, duration, samples, dwell, reference, no_wait } => {
            if duration.is_none() && samples.is_none() {
                return Err(Failure::new(
                    exit::INVALID,
                    "give --duration SECONDS or --samples N (or both)",
                ));
            }
            if duration.is_some_and(|d| !(d.is_finite() && d > 0.0)) {
                return Err(Failure::new(
                    exit::INVALID,
                    "--duration must be a positive number of seconds",
                ));
            }
            let started = c
                .start_learning(pb::StartLearningRequest {
                    hardware_class: class.clone(),
                    host_ids: hosts.clone(),
                    plan: Some(pb::StartLearningCommand {
                        duration_seconds: duration.unwrap_or(0.0),
                        sample_target: samples.unwrap_or(0),
                        dwell_seconds: *dwell,
                        reference_seconds: *reference,
                        workloads: vec![],
                    }),
                })
                .await
                .map_err(|s| Failure::from_status("starting learning", &s))?
                .into_inner();
            if *no_wait {
                return print(out, &started, || learning_table(&started));
            }
            let bar = (out == Output::Table).then(|| {
                let b = ProgressBar::new(1000);
                b.set_style(
                    ProgressStyle::with_template("{spinner} learning {msg} [{bar:40}] {percent}%")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b
            });
            let last = loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let s = c
                    .get_learning(pb::GetLearningRequest {
                        learning_id: started.learning_id.clone(),
                    })
                    .await
                    .map_err(|s| Failure::from_status("reading learning progress", &s))?
                    .into_inner();
                if let Some(b) = &bar {
                    #[allow(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "clamped"
                    )]
                    b.set_position((s.fraction_done.clamp(0.0, 1.0) * 1000.0) as u64);
                    b.set_message(format!("{} ({} samples)", s.learning_id, s.samples));
                }
                if s.state != pb::LearningState::Running as i32 {
                    break s;
                }
            };
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            print(out, &last, || learning_table(&last))?;
            let failed: Vec<String> = last
                .hosts
                .iter()
                .filter(|h| !h.error.is_empty())
                .map(|h| format!("{}: {}", h.host_id, h.error))
                .collect();
            if failed.is_empty() {
                Ok(())
            } else {
                Err(Failure::new(
                    exit::UNAVAILABLE,
                    format!("some hosts could not learn ({})", failed.join("; ")),
                ))
            }
        }
        LearnCmd::Status { id } => {
            let s = c
                .get_learning(pb::GetLearningRequest {
                    learning_id: id.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| Failure::from_status("reading learning status", &s))?
                .into_inner();
            print(out, &s, || learning_table(&s))
        }
        LearnCmd::Stop { id } => {
            let s = c
                .stop_learning(pb::StopLearningRequest { learning_id: id.clone() })
                .await
                .map_err(|s| Failure::from_status("stopping learning", &s))?
                .into_inner();
            print(out, &s, || learning_table(&s))
        }
    }
}

/// `vmgov predict`: what-if for a workload's features on a hardware class.
#[derive(Debug, Args)]
pub(crate) struct PredictArgs {
    /// The hardware class.
    #[arg(long)]
    class: String,
    /// The model version (the active one by default).
    #[arg(long, default_value_t = 0)]
    version: u64,
    /// A feature value, NAME=VALUE (repeat), e.g. l3_misses_per_instruction=0.01; features not
    /// given count as 0.
    #[arg(long = "feature", value_name = "NAME=VALUE")]
    features: Vec<String>,
    /// Performance threshold.
    #[arg(long, value_parser = parse_fraction, default_value = "0")]
    perf: f64,
    /// Throughput threshold.
    #[arg(long, value_parser = parse_fraction, default_value = "0")]
    thrp: f64,
    /// energy (default), power (the report's equation 9) or edp.
    #[arg(long, default_value = "energy")]
    objective: String,
}

pub(crate) async fn predict(c: &mut Client, a: &PredictArgs, out: Output) -> Result<(), Failure> {
    let mut values = HashMap::new();
    for name in vmgov_proto::Feature::ALL {
        values.insert(name.name().to_owned(), 0.0);
    }
    for f in &a.features {
        let (name, value) = f.split_once('=').ok_or_else(|| {
            Failure::new(exit::INVALID, format!("--feature {f:?}: write NAME=VALUE"))
        })?;
        let feature: vmgov_proto::Feature =
            name.trim().parse().map_err(|e: vmgov_proto::features::UnknownFeature| {
                Failure::new(exit::INVALID, e.to_string())
            })?;
        let value: f64 =
            value.trim().parse().ok().filter(|v: &f64| v.is_finite()).ok_or_else(|| {
                Failure::new(exit::INVALID, format!("--feature {f:?}: {value:?} is not a number"))
            })?;
        values.insert(feature.name().to_owned(), value);
    }
    let objective: vmgov_proto::Objective =
        a.objective.parse().map_err(|e: vmgov_proto::decide::UnknownObjective| {
            Failure::new(exit::INVALID, e.to_string())
        })?;
    let r = c
        .predict(pb::PredictRequest {
            hardware_class: a.class.clone(),
            model_version: a.version,
            workload: Some(pb::predict_request::Workload::Features(pb::FeatureValues { values })),
            thresholds: Some(pb::Thresholds { perf: a.perf, throughput: a.thrp }),
            objective: pb::Objective::from(objective) as i32,
        })
        .await
        .map_err(|s| Failure::from_status("predicting", &s))?
        .into_inner();
    print(out, &r, || {
        let mut t = table([
            "P-state",
            "GHz",
            "perf",
            "power",
            "throughput",
            "meets thresholds",
            "objective",
            "",
        ]);
        for p in &r.pstates {
            let x = p.predicted.unwrap_or_default();
            t.add_row([
                p.pstate_index.to_string(),
                format!("{:.2}", p.frequency_hz / 1e9),
                format!("{:.3}", x.perf),
                format!("{:.3}", x.power),
                format!("{:.3}", x.throughput),
                if p.feasible { "yes".into() } else { "no".into() },
                format!("{:.3}", p.objective_value),
                if p.pstate_index == r.chosen_pstate_index {
                    "← chosen".into()
                } else {
                    String::new()
                },
            ]);
        }
        if !r.feasible {
            t.add_row([
                "no P-state meets the thresholds: f_max is chosen",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
            ]);
        }
        t
    })
}

/// One event in a line: its kind's name first (for grep), then what it says.
fn describe(e: &pb::fleet_event::Event) -> String {
    use pb::fleet_event::Event;
    let model = |m: &pb::ModelSummary| {
        format!(
            "class {} version {} (cross-validated MAPE perf {:.1}%, power {:.1}%, throughput {:.1}%)",
            m.hardware_class,
            m.version,
            100.0 * m.mean_mape_perf,
            100.0 * m.mean_mape_power,
            100.0 * m.mean_mape_throughput
        )
    };
    let pair = |t: Option<&pb::Thresholds>| {
        t.map_or_else(
            || "-".into(),
            |t| format!("perf {:.2}, throughput {:.2}", t.perf, t.throughput),
        )
    };
    match e {
        Event::HostConnected(h) => {
            format!("HostConnected: class {}, agent {}", h.hardware_class, h.agent_version)
        }
        Event::HostDisconnected(h) => format!("HostDisconnected: {}", h.reason),
        Event::VmStarted(v) => {
            let vm = v.vm.clone().unwrap_or_default();
            format!("VmStarted: {} ({}), {} vCPUs", vm.name, vm.vm_id, vm.vcpus)
        }
        Event::VmStopped(v) => format!("VmStopped: {}", v.vm_id),
        Event::ModelTrained(m) => format!("ModelTrained: {}", model(m)),
        Event::ModelActivated(m) => format!("ModelActivated: {}", model(m)),
        Event::ThresholdSet(t) => format!(
            "ThresholdSet: {} = {} by {:?}",
            scope_text(t.scope.as_ref()),
            pair(t.thresholds.as_ref()),
            t.updated_by
        ),
        Event::ThresholdDeleted(scope) => format!("ThresholdDeleted: {}", scope_text(Some(scope))),
        Event::Learning(l) => format!(
            "Learning: {} on {} is {}, {} samples, {:.0}% done",
            l.learning_id,
            l.hardware_class,
            l.state().as_str_name().trim_start_matches("LEARNING_STATE_").to_lowercase(),
            l.samples,
            100.0 * l.fraction_done
        ),
        Event::LeaderChanged(l) => {
            format!("LeaderChanged: {} leads, epoch {}", l.leader_address, l.epoch)
        }
        Event::ThresholdMissed(m) => {
            let o = m.observed.unwrap_or_default();
            format!(
                "ThresholdMissed: VM {} observed perf {:.2}, throughput {:.2} against thresholds {}",
                m.vm_id,
                o.perf,
                o.throughput,
                pair(m.thresholds.as_ref())
            )
        }
    }
}

/// Follows the fleet's events until interrupted, one line (or JSON object) each.
pub(crate) async fn events(c: &mut Client, kinds: &[String], out: Output) -> Result<(), Failure> {
    let kinds = kinds
        .iter()
        .map(|k| {
            pb::EventKind::from_str_name(&format!("EVENT_KIND_{}", k.to_uppercase()))
                .map(|k| k as i32)
                .ok_or_else(|| Failure::new(exit::INVALID, format!("unknown event kind {k:?}; choose host, vm, model, threshold, learning, leader or sla")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut stream = c
        .watch_events(pb::WatchEventsRequest { kinds })
        .await
        .map_err(|s| Failure::from_status("watching events", &s))?
        .into_inner();
    while let Some(next) = stream.next().await {
        let e = next.map_err(|s| Failure::from_status("the event stream", &s))?;
        match out {
            Output::Json => println!("{}", serde_json::to_string(&e).unwrap_or_default()),
            Output::Table => println!(
                "{} {}{}",
                e.at_unix_ms,
                if e.host_id.is_empty() { String::new() } else { format!("host {} ", e.host_id) },
                e.event.as_ref().map_or_else(|| "(empty event)".into(), describe)
            ),
        }
    }
    Err(Failure::new(exit::UNAVAILABLE, "the coordinator ended the event stream"))
}
