//! A minimal QMP client: QEMU's own account of a guest (vCPU thread ids, quit) to check what the
//! harness and, later, the agent find in `/proc` against.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{Error, io_error};

/// One QMP session (QEMU serves one at a time per socket).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    socket: PathBuf,
}

/// A vCPU as `query-cpus-fast` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QmpCpu {
    /// The vCPU index (`cpu-index`).
    pub index: u32,
    /// The host thread running it (`thread-id`).
    pub thread_id: u32,
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket at start-up), reads the
    /// greeting and negotiates capabilities.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, Error> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(source) if Instant::now() >= deadline => {
                    return Err(io_error("connecting to QMP", socket, source));
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        };
        let set_timeout = stream.set_read_timeout(Some(timeout.max(Duration::from_secs(1))));
        set_timeout.map_err(|source| io_error("setting a timeout on", socket, source))?;
        let writer = stream.try_clone().map_err(|source| io_error("cloning", socket, source))?;
        let mut qmp = Self { reader: BufReader::new(stream), writer, socket: socket.to_path_buf() };
        let greeting = qmp.read_message("greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.error("greeting", format!("not a QMP greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value; a QMP error is an [`Error::Qmp`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| io_error("writing to QMP", &self.socket, source))?;
        loop {
            let mut message = self.read_message(command)?;
            if message.get("event").is_some() {
                continue;
            }
            if let Some(value) = message.get_mut("return") {
                return Ok(value.take());
            }
            let reason = message.get("error").map_or_else(
                || format!("unexpected answer {message}"),
                |e| format!("{}: {}", e["class"], e["desc"]),
            );
            return Err(self.error(command, reason));
        }
    }

    /// The vCPUs and their host threads, by index.
    pub fn query_cpus_fast(&mut self) -> Result<Vec<QmpCpu>, Error> {
        const COMMAND: &str = "query-cpus-fast";
        let answer = self.execute(COMMAND, None)?;
        let cpus = answer.as_array().ok_or_else(|| self.error(COMMAND, "not a list".into()))?;
        let mut found = cpus
            .iter()
            .map(|cpu| {
                let field = |name: &str| {
                    cpu.get(name)
                        .and_then(Value::as_u64)
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| self.error(COMMAND, format!("no valid {name} in {cpu}")))
                };
                Ok(QmpCpu { index: field("cpu-index")?, thread_id: field("thread-id")? })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        found.sort_by_key(|c| c.index);
        Ok(found)
    }

    fn read_message(&mut self, command: &str) -> Result<Value, Error> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| io_error("reading from QMP", &self.socket, source))?;
        if n == 0 {
            return Err(self.error(command, "QEMU closed the socket".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| self.error(command, format!("invalid JSON {line:?}: {e}")))
    }

    fn error(&self, command: &str, message: String) -> Error {
        Error::Qmp { command: command.to_owned(), socket: self.socket.clone(), message }
    }
}
