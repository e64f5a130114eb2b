//! vmgov node agent (one per KVM host).
//!
//! The [`agent`] actor tree (supervisor, host loop, one `VmActor` per VM) runs the pure
//! [`fastpath`] every timeslice, turns per-VM choices into per-core frequencies through the
//! [`arbiter`], checks its predictions with [`verify`] windows, sweeps the P-states in
//! [`learning`] mode and talks to the coordinator through the [`link`]. The [`platform`] layer
//! hides the host: the simulated backend ([`platform::sim`], the `vmgov-sim` crate's host) and
//! the real Linux backend ([`platform::linux`]), whose abilities [`preflight`] reports. The
//! baseline governors it falls back on, the oracle, `vmgov-agent simulate` and `calibrate` come
//! from `vmgov-sim`, the yardstick; [`config`] and [`run`] wire it all from the command line.

pub mod agent;
pub mod arbiter;
pub mod config;
pub mod fastpath;
pub mod learning;
pub mod link;
pub mod platform;
pub mod preflight;
pub mod run;
pub mod verify;
