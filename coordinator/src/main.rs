//! `vmgov-coordinator`: thin entry point. Flags are parsed here; the work is in the library.
#![allow(clippy::print_stderr, reason = "a command-line program reports where it listens")]

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use vmgov_coordinator::{
    service::Coordinator,
    store::{EtcdConfig, EtcdStore, MemoryStore},
};

/// vmgov coordinator: trains energy models per hardware class and pushes them to node agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed).
    #[arg(long, env = "VMGOV_COORDINATOR_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// This coordinator's id (defaults to id-PORT).
    #[arg(long, env = "VMGOV_COORDINATOR_ID")]
    id: Option<String>,
    /// etcd endpoints for shared state and leader election; without them the state is in memory.
    #[arg(long, env = "VMGOV_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Training samples kept per hardware class.
    #[arg(long, default_value_t = 1_000_000)]
    sample_capacity: usize,
    /// Key prefix in etcd (several fleets can share one etcd).
    #[arg(long, default_value = "/vmgov/")]
    etcd_prefix: String,
    /// Leader lease TTL in etcd, seconds: a dead leader is replaced within about two of these.
    #[arg(long, default_value_t = 10)]
    leader_ttl_s: i64,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmgov-coordinator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let incoming = vmgov_coordinator::listen(args.listen)
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = incoming.local_addr().context("reading the bound address")?;
        let id = args.id.unwrap_or_else(|| format!("coordinator-{}", addr.port()));
        if args.etcd.is_empty() {
            let coordinator =
                Coordinator::new(MemoryStore::new(args.sample_capacity), id, addr.to_string());
            coordinator.lead().await?;
            eprintln!("vmgov-coordinator: listening on {addr} (in-memory store)");
            vmgov_coordinator::serve(coordinator, incoming, shutdown_signal()).await?;
        } else {
            let config = EtcdConfig {
                prefix: args.etcd_prefix.clone(),
                leader_ttl_s: args.leader_ttl_s,
                sample_capacity: args.sample_capacity,
                ..EtcdConfig::new(args.etcd.clone())
            };
            let store = EtcdStore::connect(config)
                .await
                .with_context(|| format!("connecting to etcd at {}", args.etcd.join(",")))?;
            let coordinator = Coordinator::new(store, id, addr.to_string());
            // Followers serve agents and reads while they wait to lead.
            let leadership =
                tokio::spawn(coordinator.clone().maintain_leadership(Duration::from_millis(500)));
            eprintln!("vmgov-coordinator: listening on {addr} (etcd {})", args.etcd.join(","));
            vmgov_coordinator::serve(coordinator, incoming, shutdown_signal()).await?;
            leadership.abort();
        }
        Ok(())
    })
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
