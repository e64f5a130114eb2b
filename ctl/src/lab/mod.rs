//! `vmgov lab`: the whole system on one machine (in progress: being written).

use clap::Args;

/// Options of `vmgov lab`.
#[derive(Debug, Args)]
pub(crate) struct LabArgs {}

/// Runs the lab.
pub(crate) async fn run(_args: &LabArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vmgov lab` is not built yet (issue #6, in progress)")
}
