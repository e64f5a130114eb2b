//! vmgov node agent (one per KVM host).
//!
//! The [`agent`] actor tree (supervisor, host loop, one `VmActor` per VM) runs the pure
//! [`fastpath`] every timeslice, turns per-VM choices into per-core frequencies through the
//! [`arbiter`], checks its predictions with [`verify`] windows, sweeps the P-states in
//! [`learning`] mode and talks to the coordinator through the [`link`]. The [`platform`] layer
//! hides the host: the simulated backend ([`platform::sim`]) and the real Linux backend
//! ([`platform::linux`]), whose abilities [`preflight`] reports. The baseline [`governor`]s and
//! the oracle, [`simulate`] (`vmgov-agent simulate`) and the [`calibration`] tables behind
//! `docs/calibration.md` complete it; [`config`] and [`run`] wire it all from the command line.

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
pub mod verify;
