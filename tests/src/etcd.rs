//! A real etcd for tests: Debian's `etcd` binary (package `etcd-server`, which `tools/test`
//! installs) started on free loopback ports with a fresh data directory, never assumed running.
//!
//! [`Etcd`] waits until the server answers `/health`, and on drop kills it and removes its
//! directory. Tests use it to exercise the traps of a real deployment: [`Etcd::freeze`] and
//! [`Etcd::thaw`] (SIGSTOP/SIGCONT: a server that stops answering without closing connections)
//! and [`Etcd::restart`] (SIGKILL, then a new process on the same data directory and ports:
//! open streams end, the data and leases survive).
//!
//! Data directories are named `vmgov-etcd-<test pid>-<n>` under the temporary directory; a
//! server and directory left by a test process that was killed are swept by the next start.

use std::{
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// How long a start may take before it counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Environment variable that names another etcd binary.
pub const ETCD_BIN_ENV: &str = "VMGOV_ETCD_BIN";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Something the harness could not do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No etcd binary.
    #[error(
        "no etcd binary found (looked for ${ETCD_BIN_ENV}, then `etcd` on PATH and /usr/bin/etcd): \
         install Debian's etcd-server package (`tools/test` does: apt-get install etcd-server)"
    )]
    Missing,
    /// The binary could not be started, or a signal not sent.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The server did not answer in time, or exited.
    #[error(
        "etcd on {endpoint} did not become healthy within {after:?}; its log ends with:\n{log}"
    )]
    NotReady {
        /// Its client endpoint.
        endpoint: String,
        /// How long we waited.
        after: Duration,
        /// The end of its log.
        log: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// The etcd binary: `$VMGOV_ETCD_BIN`, else `etcd` on `PATH`, else `/usr/bin/etcd`.
pub fn binary() -> Result<PathBuf, Error> {
    if let Some(bin) = std::env::var_os(ETCD_BIN_ENV) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() { Ok(bin) } else { Err(Error::Missing) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|candidate| candidate.is_file())
        .ok_or(Error::Missing)
}

/// A running etcd server, killed (and its data removed) on drop.
#[derive(Debug)]
pub struct Etcd {
    bin: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl Etcd {
    /// Starts a single-member etcd on free loopback ports with a fresh data directory and waits
    /// until it is healthy. Fails with [`Error::Missing`] if there is no etcd binary.
    pub fn start() -> Result<Self, Error> {
        let bin = binary()?;
        sweep();
        let dir = std::env::temp_dir().join(format!(
            "vmgov-etcd-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let mut last = None;
        // Free ports are found by binding port 0 and letting go: another process may take one
        // before etcd binds it, so try a few times.
        for _ in 0..3 {
            let (client_port, peer_port) = (free_port()?, free_port()?);
            let mut etcd =
                Self { bin: bin.clone(), dir: dir.clone(), client_port, peer_port, child: None };
            match etcd.spawn().and_then(|()| etcd.wait_ready(READY_TIMEOUT)) {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    etcd.stop_process();
                    last = Some(e);
                }
            }
        }
        let _ = fs::remove_dir_all(&dir);
        Err(last.unwrap_or(Error::Missing))
    }

    /// Its client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The server's pid (0 while it is not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Stops the server without closing its connections (SIGSTOP): it no longer answers.
    pub fn freeze(&self) -> Result<(), Error> {
        self.signal(Signal::SIGSTOP)
    }

    /// Lets a frozen server go on (SIGCONT).
    pub fn thaw(&self) -> Result<(), Error> {
        self.signal(Signal::SIGCONT)
    }

    /// Kills the server (SIGKILL) and starts a new one on the same data directory and ports;
    /// returns once it is healthy again.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.stop_process();
        // The ports were ours a moment ago; retry briefly in case the kernel still holds them.
        let mut last = None;
        for _ in 0..3 {
            match self.spawn().and_then(|()| self.wait_ready(READY_TIMEOUT)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.stop_process();
                    last = Some(e);
                    thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Err(last.unwrap_or(Error::Missing))
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(io_error("opening the etcd log"))?;
        let err = log.try_clone().map_err(io_error("opening the etcd log"))?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.bin)
            .arg("--name=vmgov-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=vmgov-test={peer}"))
            .arg("--initial-cluster-state=new")
            .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io_error(format!("starting {}", self.bin.display())))?;
        fs::write(self.dir.join("etcd.pid"), child.id().to_string())
            .map_err(io_error("writing etcd.pid"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/health` says true, or the process exits, or `timeout` passes.
    fn wait_ready(&mut self, timeout: Duration) -> Result<(), Error> {
        let begun = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port));
        while begun.elapsed() < timeout {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break;
            }
            if healthy(&addr) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(Error::NotReady {
            endpoint: self.endpoint(),
            after: begun.elapsed(),
            log: self.log_tail(),
        })
    }

    fn signal(&self, signal: Signal) -> Result<(), Error> {
        let pid = i32::try_from(self.pid()).unwrap_or(0);
        if pid == 0 {
            return Err(Error::Io {
                what: format!("sending {signal} to etcd"),
                source: io::Error::other("etcd is not running"),
            });
        }
        kill(Pid::from_raw(pid), signal).map_err(|errno| Error::Io {
            what: format!("sending {signal} to etcd (pid {pid})"),
            source: io::Error::from(errno),
        })
    }

    fn stop_process(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a stopped process too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop_process();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on right now.
fn free_port() -> Result<u16, Error> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io_error("finding a free port"))?;
    Ok(listener.local_addr().map_err(io_error("finding a free port"))?.port())
}

/// Whether etcd's `/health` answers `"health":"true"`.
fn healthy(addr: &SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

/// Kills servers and removes directories that test processes which no longer exist left.
fn sweep() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix("vmgov-etcd-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if owner == i32::try_from(std::process::id()).unwrap_or(0) || alive(owner) {
            continue;
        }
        let dir = entry.path();
        if let Some(pid) =
            fs::read_to_string(dir.join("etcd.pid")).ok().and_then(|p| p.trim().parse::<i32>().ok())
            && runs_in(pid, &dir)
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}

fn alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

/// Whether process `pid` is an etcd using `dir` (so a recycled pid is never killed).
fn runs_in(pid: i32, dir: &Path) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
}
