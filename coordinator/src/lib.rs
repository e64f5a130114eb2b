//! vmgov coordinator.
//!
//! [`train`] fits one model per hardware class from labelled samples (smartcore, screened,
//! cross-validated); [`store`] keeps the state behind one trait, with the in-memory and etcd
//! backends and the conformance suite both pass; [`service`] serves `AgentService.Connect` and
//! `FleetService` over any store, and keeps leadership across coordinators with epoch fencing
//! when the store is etcd. [`serve`] puts them on a socket with health checking and reflection.

pub mod service;
pub mod store;
pub mod train;

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::TcpSocket;
use tonic::transport::{Server, server::TcpIncoming};

use crate::{service::Coordinator, store::Store};

/// HTTP/2 keep-alive on every stream: without it a stream to a frozen peer hangs forever.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// Pending connections the listening socket queues. The kernel and the standard library default
/// to 128, which a fleet reconnecting at once overflows (a coordinator restart sends every agent
/// back within a second); the kernel caps it at `net.core.somaxconn` (4096 on current kernels).
pub const BACKLOG: u32 = 4096;

/// Binds `addr` for [`serve`] with a [`BACKLOG`]-deep queue and `TCP_NODELAY` on every connection
/// (pushes are small and latency-bound). Needs a Tokio runtime.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpIncoming> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // A restarted coordinator must get its port back while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(TcpIncoming::from(socket.listen(BACKLOG)?).with_nodelay(Some(true)))
}

/// Serves both services on `incoming` until `shutdown` resolves, with gRPC health checking and
/// server reflection so that generic clients (grpcurl, grpcio with reflection) work without our
/// .proto files.
pub async fn serve<S: Store>(
    coordinator: Coordinator<S>,
    incoming: TcpIncoming,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<vmgov_proto::pb::agent_service_server::AgentServiceServer<Coordinator<S>>>()
        .await;
    health
        .set_serving::<vmgov_proto::pb::fleet_service_server::FleetServiceServer<Coordinator<S>>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(vmgov_proto::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(coordinator.agent_service())
        .add_service(coordinator.fleet_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The transport failed.
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptors.
    #[error("building the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet reconnecting at once must queue, not be dropped: with the default backlog of 128
    /// every connection past the 129th would wait for SYN retries while nothing accepts.
    #[tokio::test]
    async fn the_listener_queues_a_fleet_reconnecting_at_once() {
        // The kernel caps the queue at net.core.somaxconn (4096 since Linux 5.4, 128 before).
        let cap = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(128);
        let incoming = listen(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = incoming.local_addr().unwrap();
        let mut held = Vec::new();
        for i in 0..cap.min(1000) {
            let connect = tokio::net::TcpStream::connect(addr);
            let stream = tokio::time::timeout(Duration::from_secs(10), connect)
                .await
                .unwrap_or_else(|_| panic!("connection {i} was not queued"))
                .unwrap();
            held.push(stream);
        }
        drop(incoming);
    }
}
