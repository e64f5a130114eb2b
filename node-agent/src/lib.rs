//! vmgov node agent (one per KVM host).
//!
//! Status: not built yet (issue #4). The planned shape, from `ARCHITECTURE.md`: a ractor
//! supervisor per host with one `VmActor` per VM; every timeslice the fast path reads each VM's
//! raw counters, derives features, predicts every P-state and decides with
//! [`vmgov_proto`]'s model core, and an arbiter sets per-core frequencies through the platform
//! layer (Linux or simulated). Nothing in that path waits on the network.
//!
//! Today the crate only re-exports the model core it will run, so that the binary can say
//! plainly what is and is not there.

pub use vmgov_proto as model_core;

/// What this build of the agent can do, in plain words.
pub const STATUS: &str = "vmgov-agent is not implemented yet: the actor tree, the Linux and \
    simulated platform backends and the coordinator link arrive with issue #4. The model core it \
    will run (features, predict, decide) is in the vmgov-proto crate and is tested.";
