//! `vmgov-agent`: thin entry point; the agent itself lives in the library.

use clap::Parser;

/// vmgov node agent: per-VM DVFS from predicted performance, power and throughput.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    Args::parse();
    anyhow::bail!(vmgov_agent::STATUS)
}
