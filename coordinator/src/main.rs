//! `vmgov-coordinator`: thin entry point; the coordinator itself lives in the library.

use clap::Parser;

/// vmgov coordinator: trains energy models per hardware class and pushes them to node agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    Args::parse();
    anyhow::bail!(vmgov_coordinator::STATUS)
}
