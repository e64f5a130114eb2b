//! vmgov coordinator.
//!
//! Built: [`train`] (one model per hardware class from labelled samples: smartcore, screened,
//! cross-validated), [`store`] (the state behind one trait, with the in-memory backend and the
//! conformance suite every backend passes), and [`service`] (`AgentService.Connect` and
//! `FleetService` over any store), served by [`serve`].
//!
//! In progress (issue #5): the etcd store, leader election across coordinators with epoch
//! fencing, the failover test and the benchmarks.

pub mod service;
pub mod store;
pub mod train;

use std::{future::Future, time::Duration};

use tonic::transport::{Server, server::TcpIncoming};

use crate::{service::Coordinator, store::Store};

/// HTTP/2 keep-alive on every stream: without it a stream to a frozen peer hangs forever.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// Serves both services on `incoming` until `shutdown` resolves.
pub async fn serve<S: Store>(
    coordinator: Coordinator<S>,
    incoming: TcpIncoming,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(coordinator.agent_service())
        .add_service(coordinator.fleet_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
