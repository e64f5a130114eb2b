//! `vmgov`: the operator CLI. Flags are parsed here; commands live in `commands.rs`, the
//! connection and output in `client.rs`, and `vmgov lab` in `lab/`.
#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a command-line program prints")]

mod client;
mod commands;
mod lab;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{
    client::{Failure, Output},
    commands::{LearnCmd, ModelsCmd, PredictArgs, ThresholdCmd},
};

/// vmgov: fleet-wide thresholds, status, models, learning, and `vmgov lab`.
///
/// Exit codes: 0 done; 1 failed; 2 bad usage; 3 coordinator unreachable; 4 not found;
/// 5 refused as invalid (nothing changed); 6 unavailable now (not the leader, or busy).
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// The coordinator's address.
    #[arg(long, global = true, env = "VMGOV_COORDINATOR", default_value = "http://127.0.0.1:7700")]
    coordinator: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Thresholds by scope: fleet, hardware class, host, VM (the most specific wins).
    #[command(subcommand)]
    Threshold(ThresholdCmd),
    /// Hosts and VMs: frequency, predicted ratios, model, fallback state.
    Status {
        /// Only this hardware class.
        #[arg(long)]
        class: Option<String>,
    },
    /// Energy models: list, show, train, activate, roll back.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Learning mode: start (and wait), status, stop.
    #[command(subcommand)]
    Learn(LearnCmd),
    /// What-if: predicted ratios at every P-state for a workload's features, and the choice.
    Predict(PredictArgs),
    /// Follow the fleet's events (host, vm, model, threshold, learning, leader, sla).
    Events {
        /// Only these kinds (comma-separated).
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
    },
    /// Run the whole system on this machine (a coordinator and agents on simulated hosts) through
    /// the report's experiment, and write a report.
    Lab(lab::LabArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmgov: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmgov: {e}");
            e.exit_code()
        }
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    if let Command::Lab(args) = &cli.command {
        return lab::run(args).await.map_err(Failure::from);
    }
    let mut c = client::connect(&cli.coordinator).await?;
    let out = cli.output;
    match &cli.command {
        Command::Threshold(cmd) => commands::threshold(&mut c, cmd, out).await,
        Command::Status { class } => commands::status(&mut c, class.as_deref(), out).await,
        Command::Models(cmd) => commands::models(&mut c, cmd, out).await,
        Command::Learn(cmd) => commands::learn(&mut c, cmd, out).await,
        Command::Predict(args) => commands::predict(&mut c, args, out).await,
        Command::Events { kind } => commands::events(&mut c, kind, out).await,
        Command::Lab(_) => Ok(()),
    }
}
