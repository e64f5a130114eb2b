//! `vmgov`: the operator CLI.
//!
//! Status: not built yet (issue #6 brings thresholds, status, models, learning, what-if
//! prediction, events and `vmgov lab`). Until then it says so and exits non-zero.

use clap::Parser;

/// vmgov: fleet-wide thresholds, status, models, learning, and `vmgov lab`.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Args {}

fn main() -> anyhow::Result<()> {
    Args::parse();
    anyhow::bail!(
        "vmgov is not implemented yet: the CLI and `vmgov lab` arrive with issue #6 \
         (the coordinator it talks to with issue #5)"
    )
}
