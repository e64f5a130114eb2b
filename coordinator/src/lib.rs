//! vmgov coordinator.
//!
//! Built so far: [`train`], the training of one model per hardware class from labelled samples
//! (smartcore, screened and cross-validated).
//!
//! Not built yet (issue #5, in progress): serving `AgentService.Connect` and `FleetService`, the
//! store (etcd, or in memory) for samples, models and thresholds, and leader election whose epoch
//! fences every write and push. The contract it will serve is `vmgov_proto::pb`.

pub mod train;

/// What this build of the coordinator can do, in plain words.
pub const STATUS: &str = "vmgov-coordinator cannot serve yet: serving agents, the etcd store and \
    leader election arrive with issue #5 (in progress); training (`vmgov_coordinator::train`) is \
    built and tested.";
