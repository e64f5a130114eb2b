//! The vmgov.v1 contract, read back from the descriptor set compiled into vmgov-proto: every
//! call the product promises exists with the right streaming shape, and every field says its
//! units. These are what cloud schedulers in any language build against.

use prost::Message;
use prost_types::{FileDescriptorProto, FileDescriptorSet};
use vmgov_proto::pb::FILE_DESCRIPTOR_SET;

fn contract() -> FileDescriptorProto {
    let set = FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor set decodes");
    set.file.into_iter().find(|f| f.package() == "vmgov.v1").expect("package vmgov.v1")
}

fn method<'a>(
    file: &'a FileDescriptorProto,
    service: &str,
    name: &str,
) -> &'a prost_types::MethodDescriptorProto {
    let svc = file
        .service
        .iter()
        .find(|s| s.name() == service)
        .unwrap_or_else(|| panic!("no service {service}"));
    svc.method.iter().find(|m| m.name() == name).unwrap_or_else(|| panic!("no {service}.{name}"))
}

#[test]
fn agent_service_is_one_bidirectional_stream() {
    let file = contract();
    let connect = method(&file, "AgentService", "Connect");
    assert!(connect.client_streaming() && connect.server_streaming());
    assert_eq!(connect.input_type(), ".vmgov.v1.AgentMessage");
    assert_eq!(connect.output_type(), ".vmgov.v1.CoordinatorMessage");
}

#[test]
fn fleet_service_covers_every_promised_call() {
    let file = contract();
    let unary = [
        "SetThreshold",
        "GetThreshold",
        "ListThresholds",
        "DeleteThreshold",
        "ExplainThresholds",
        "ListHosts",
        "ListVms",
        "ListModels",
        "GetModel",
        "TrainModel",
        "ActivateModel",
        "RollbackModel",
        "StartLearning",
        "StopLearning",
        "GetLearning",
        "Predict",
    ];
    for name in unary {
        let m = method(&file, "FleetService", name);
        assert!(!m.client_streaming() && !m.server_streaming(), "{name} should be unary");
    }
    let watch = method(&file, "FleetService", "WatchEvents");
    assert!(!watch.client_streaming() && watch.server_streaming());
}

fn message<'a>(file: &'a FileDescriptorProto, name: &str) -> &'a prost_types::DescriptorProto {
    file.message_type
        .iter()
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("no message {name}"))
}

fn fields(file: &FileDescriptorProto, name: &str) -> Vec<String> {
    message(file, name).field.iter().map(|f| f.name().to_owned()).collect()
}

#[test]
fn the_stream_messages_carry_what_the_design_needs() {
    let file = contract();
    let agent = fields(&file, "AgentMessage");
    for f in ["hello", "samples", "vm_started", "vm_stopped", "decisions", "learning_progress"] {
        assert!(agent.contains(&f.to_owned()), "AgentMessage lacks {f}");
    }
    let coord = fields(&file, "CoordinatorMessage");
    for f in ["model", "thresholds", "learning", "ack"] {
        assert!(coord.contains(&f.to_owned()), "CoordinatorMessage lacks {f}");
    }
    for push in ["ModelPush", "ThresholdPush", "LearningCommand"] {
        assert!(fields(&file, push).contains(&"fence".to_owned()), "{push} carries no fence");
    }
    assert_eq!(fields(&file, "Fence"), ["epoch", "generation"]);
    assert!(fields(&file, "SampleBatch").contains(&"batch_id".to_owned()));
    let sample = fields(&file, "Sample");
    for f in ["counters", "labels", "pstate_index", "frequency_hz"] {
        assert!(sample.contains(&f.to_owned()), "Sample lacks {f}");
    }
    let counters = fields(&file, "RawCounters");
    for f in [
        "instructions",
        "cycles",
        "l2_misses",
        "l3_misses",
        "memory_accesses",
        "disk_reads",
        "disk_read_bytes",
        "disk_writes",
        "disk_write_bytes",
        "packets_rx",
        "bytes_rx",
        "timeslice_seconds",
        "energy_joules",
    ] {
        assert!(counters.contains(&f.to_owned()), "RawCounters lacks {f}");
    }
    let hello = fields(&file, "Hello");
    for f in ["host_id", "hardware_class", "pstates", "agent_version", "vms"] {
        assert!(hello.contains(&f.to_owned()), "Hello lacks {f}");
    }
}
