//! vmgov node agent (one per KVM host).
//!
//! Built so far: the [`platform`] layer's frequency interface and its simulated backend
//! ([`platform::sim`]), the real Linux backend ([`platform::linux`]) and [`preflight`], which
//! says what a host lets it do, the baseline [`governor`]s and the oracle, and
//! [`simulate`], the engine behind `vmgov-agent simulate`, and the [`calibration`] tables behind
//! `vmgov-agent calibrate` and `docs/calibration.md`.
//!
//! Not built yet (issue #4): the ractor actor tree (supervisor, one `VmActor` per VM, sampler,
//! arbiter, coordinator link, model cache) and the fast path that runs
//! [`vmgov_proto`]'s model core every timeslice. The binary says so plainly when asked to run
//! as an agent.

pub mod agent;
pub mod arbiter;
pub mod calibration;
pub mod config;
pub mod fastpath;
pub mod governor;
pub mod learning;
pub mod link;
pub mod platform;
pub mod preflight;
pub mod run;
pub mod simulate;
