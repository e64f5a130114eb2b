//! `--emit-samples`: one JSON line per VM per timeslice, written by a thread of its own so that
//! the fast path never waits on the disk or a slow reader. Lines that cannot be queued (the
//! writer is behind by a whole queue) are counted and dropped, never blocked on.

use std::{
    io::{BufWriter, Write},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::JoinHandle,
};

use serde::Serialize;
use vmgov_proto::{Feature, Ratios, RawCounters};

/// Lines waiting to be written before new ones are dropped.
const QUEUE: usize = 65_536;

/// One VM, one timeslice.
#[derive(Debug, Clone, Serialize)]
pub struct SampleLine {
    /// Host time at the end of the slice, seconds since the agent started (simulated time on
    /// the simulated host).
    pub time_s: f64,
    /// VM name.
    pub vm: String,
    /// VM UUID.
    pub uuid: String,
    /// The slice's counter deltas.
    pub counters: RawCounters,
    /// The features derived from them, by stable name (unmeasurable ones absent).
    pub features: Vec<(Feature, f64)>,
    /// The P-state the VM ran at (the sweep's, in learning mode).
    pub pstate: Option<usize>,
    /// Why the VM is on the fallback governor, if it is.
    pub fallback: Option<String>,
    /// Predicted ratios at the chosen P-state.
    pub predicted: Option<Ratios>,
    /// Measured ratios (learning mode only).
    pub labels: Option<Ratios>,
}

/// The writer thread and its queue.
#[derive(Debug)]
pub struct Emitter {
    tx: Option<SyncSender<SampleLine>>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Emitter {
    /// Writes lines to `out` from a thread of its own.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        let (tx, rx) = mpsc::sync_channel::<SampleLine>(QUEUE);
        let thread = std::thread::spawn(move || {
            let mut out = BufWriter::new(out);
            for line in rx {
                serde_json::to_writer(&mut out, &line).map_err(std::io::Error::other)?;
                out.write_all(b"\n")?;
            }
            out.flush()
        });
        Self { tx: Some(tx), dropped: Arc::new(AtomicU64::new(0)), thread: Some(thread) }
    }

    /// Queues a line without waiting.
    pub fn emit(&self, line: SampleLine) {
        if let Some(tx) = &self.tx
            && let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = tx.try_send(line)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the thread.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.close()
    }

    fn close(&mut self) -> std::io::Result<()> {
        self.tx.take();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(std::io::Error::other("the sample writer thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Emitter {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "writing samples failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn writes_one_json_line_per_sample() {
        let out = Shared::default();
        let e = Emitter::new(Box::new(out.clone()));
        for i in 0..3 {
            e.emit(SampleLine {
                time_s: f64::from(i) * 0.01,
                vm: "web".into(),
                uuid: "u".into(),
                counters: RawCounters { instructions: 5, ..RawCounters::default() },
                features: vec![(Feature::PacketsPerSecond, 100.0)],
                pstate: Some(2),
                fallback: None,
                predicted: None,
                labels: None,
            });
        }
        e.finish().unwrap();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> =
            text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1]["counters"]["instructions"], 5);
        assert_eq!(lines[1]["features"][0][0], "packets_per_second");
        assert_eq!(lines[2]["vm"], "web");
    }
}
