//! A real coordinator on loopback and real agent streams to it, for the benches: the
//! coordinator over a `MemoryStore`, leading, served by `vmgov_coordinator::serve` on
//! 127.0.0.1 with TCP_NODELAY, and agents as tonic `AgentServiceClient`s, each on its own
//! channel (one TCP connection), that say hello with the class's P-state table.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Streaming,
    transport::{Channel, Endpoint},
};
use vmgov_coordinator::{
    service::{Coordinator, now_unix_ms},
    store::{MemoryStore, Store, ThresholdRecord},
};
use vmgov_proto::{ThresholdScope, Thresholds, pb};

use crate::data;

/// Messages an agent may queue before its sends wait.
const OUTBOUND: usize = 16;

/// A multi-thread runtime with one worker per core: the coordinator and its agents share it.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime")
}

/// A serving coordinator.
pub(crate) struct Running {
    /// The coordinator (its store is `coordinator.shared().store`).
    pub(crate) coordinator: Coordinator<MemoryStore>,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// Its leader epoch.
    #[allow(dead_code, reason = "the push bench writes models with it, the ingest bench does not")]
    pub(crate) epoch: u64,
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<Result<(), String>>,
}

/// Starts a leading coordinator keeping `sample_capacity` samples per class, with a fleet-wide
/// threshold (perf 0.9, throughput 0.95) so that threshold pushes carry every VM.
pub(crate) async fn start(sample_capacity: usize) -> Running {
    let incoming =
        vmgov_coordinator::listen(([127, 0, 0, 1], 0).into()).expect("binding a loopback port");
    let addr = incoming.local_addr().expect("the bound address");
    let coordinator =
        Coordinator::new(MemoryStore::new(sample_capacity), "bench-coordinator", addr.to_string());
    let epoch = coordinator.lead().await.expect("the only coordinator leads").epoch;
    let thresholds = ThresholdRecord {
        scope: ThresholdScope::Fleet,
        thresholds: Thresholds::new(0.9, 0.95).expect("fractions"),
        updated_unix_ms: now_unix_ms(),
        updated_by: "bench".into(),
    };
    coordinator.shared().store.put_threshold(epoch, thresholds).await.expect("the leader writes");
    let (shutdown, stop) = oneshot::channel::<()>();
    let serving = coordinator.clone();
    let server = tokio::spawn(async move {
        vmgov_coordinator::serve(serving, incoming, async {
            let _ = stop.await;
        })
        .await
        .map_err(|e| e.to_string())
    });
    Running { coordinator, addr, epoch, shutdown, server }
}

impl Running {
    /// Stops serving (call after the agents' streams are dropped).
    pub(crate) async fn stop(self) {
        let _ = self.shutdown.send(());
        match tokio::time::timeout(Duration::from_secs(5), self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => panic!("the server failed: {e}"),
            Ok(Err(e)) => panic!("the server task failed: {e}"),
            // Streams still draining: the runtime's end takes them down.
            Err(_) => {}
        }
    }
}

/// One agent's open `AgentService.Connect` stream.
pub(crate) struct Agent {
    /// Messages to the coordinator.
    pub(crate) tx: mpsc::Sender<pb::AgentMessage>,
    /// Messages from it.
    pub(crate) inbound: Streaming<pb::CoordinatorMessage>,
}

/// The hello of host number `host`: two VMs, eight cores, the class's table, no cached model.
fn hello(host: usize) -> pb::Hello {
    let vm = |i: usize| pb::VmInfo {
        vm_id: format!("00000000-0000-4000-8000-{host:08x}{i:04x}"),
        name: format!("host{host}-vm{i}"),
        vcpus: 2,
    };
    pb::Hello {
        host_id: format!("host-{host:04}"),
        hardware_class: data::CLASS.into(),
        pstates: Some((&data::pstates()).into()),
        agent_version: "0.1.0".into(),
        vms: vec![vm(0), vm(1)],
        cores: 8,
        ..pb::Hello::default()
    }
}

/// Connects host number `host` on a channel of its own, says hello and waits for the initial
/// threshold push (which follows the model push when a model is active). Returns the agent and
/// the model version it was given at hello, if any.
pub(crate) async fn connect(addr: SocketAddr, host: usize) -> (Agent, Option<u64>) {
    let channel: Channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid endpoint")
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connecting to the coordinator");
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(OUTBOUND);
    tx.send(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello(host))) })
        .await
        .expect("queueing the hello");
    let mut inbound =
        client.connect(ReceiverStream::new(rx)).await.expect("opening the stream").into_inner();
    let mut model = None;
    loop {
        let msg = inbound.message().await.expect("the stream stays up").expect("a first push");
        match msg.msg {
            Some(pb::coordinator_message::Msg::Thresholds(_)) => break,
            Some(pb::coordinator_message::Msg::Model(push)) => {
                model = push.model.map(|m| m.version);
            }
            _ => {}
        }
    }
    (Agent { tx, inbound }, model)
}
