//! vmgov coordinator.
//!
//! Status: not built yet (issue #5). The planned shape, from `ARCHITECTURE.md`: serves
//! `AgentService.Connect` (one bidirectional stream per agent) and `FleetService`, stores samples,
//! models and thresholds behind a store trait (etcd, or in memory), trains one model per hardware
//! class with smartcore, and leads through an etcd election whose epoch fences every write and
//! push. The contract it will serve is `vmgov_proto::pb`.

/// What this build of the coordinator can do, in plain words.
pub const STATUS: &str = "vmgov-coordinator is not implemented yet: serving agents, training, \
    the etcd store and leader election arrive with issue #5. The gRPC contract is defined in \
    proto/proto/vmgov/v1/vmgov.proto.";
