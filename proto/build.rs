//! Generates the vmgov.v1 Rust code and a file descriptor set (for gRPC server reflection)
//! with the protoc binary that the protoc-bin-vendored crate ships: no system protoc needed.

use std::{env, error::Error, path::PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let proto_dir = "proto";
    let proto = "proto/vmgov/v1/vmgov.proto";
    // tonic-prost-build prints no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed={proto_dir}");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // The generated clients' `connect(dst)` constructor would clash with the
        // `AgentService.Connect` call; clients are built with `new(channel)` instead.
        .build_transport(false)
        // JSON output of `vmgov --output json` and the lab's report use the wire types as they are.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .file_descriptor_set_path(out_dir.join("vmgov_v1_descriptor.bin"))
        .compile_with_config(config, &[proto], &[proto_dir])?;
    Ok(())
}
