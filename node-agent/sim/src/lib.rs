//! vmgov's yardstick: everything vmgov's results are measured with, and nothing of the agent.
//!
//! - [`control`]: the host interface every policy uses (frequency knobs, one slice's sample).
//! - [`host`]: the simulated KVM host, held to physics and published figures, with its hardware
//!   classes and workload profiles as data files (`classes/`, `workloads/`).
//! - [`governor`]: the baseline governors (Linux's and a Xen-style per-VM one) and the per-phase
//!   oracle.
//! - [`measure`]: work-rate performance ratios and energy at equal work, from ground truth.
//! - [`simulate`]: a scenario run under a policy, and its ground truth.
//! - [`bound`]: the whole-run energy bound, the least energy per work any policy could reach.
//! - [`calibration`]: the tables of `docs/calibration.md`.
//!
//! The agent uses [`host`] as its simulated platform (wrapped in its own `SimPlatform`) and the
//! governors as its fallback; `vmgov lab` uses all of it.

pub mod bound;
pub mod calibration;
pub mod control;
pub mod governor;
pub mod host;
pub mod measure;
pub mod simulate;

pub use host::{
    ClassError, HardwareClass, PhaseTruth, SimConfig, SimError, SimHost, SimReport, VmSpec,
    VmTruth, VoltageDomain, Workload, WorkloadError,
};
