//! Our own binaries as separate processes, for tests where the point is real processes talking
//! real gRPC: build the binary if need be, start it, read what it prints (standard output and
//! error, interleaved by line), and stop it (SIGTERM first, so it can restore and flush; SIGKILL
//! if it does not go) even when the test panics.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// The path of a workspace binary in the target directory the tests run from, built first.
///
/// The daemons belong to other packages, so `cargo test -p vmgov-tests` alone would not rebuild
/// them and a test could run a stale binary. So the first call in a test process runs
/// `cargo build` for them (a freshness check when nothing changed; cargo does not hold its
/// build lock while tests run).
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(|d| d.parent()).map(PathBuf::from).unwrap_or_default();
    if let Err(e) = BUILT.get_or_init(|| build_daemons(&dir)) {
        panic!("{e}");
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} is not built; run `cargo build --workspace`", path.display());
    path
}

/// Builds the binaries the tests spawn, in the profile the tests were built in.
fn build_daemons(profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(crate::workspace_root()).args(["build", "--bins"]);
    for package in ["vmgov-agent", "vmgov-coordinator", "vmgov-ctl"] {
        cmd.args(["-p", package]);
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let out = cmd.output().map_err(|e| format!("running cargo to build the daemons: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the daemons the tests spawn failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Starts `vmgov-coordinator` on a free loopback port with `extra` flags (its own log at info,
/// the rest at warn) and returns it with the address it listens on (`host:port`).
pub fn coordinator(name: &str, extra: &[&str]) -> (Daemon, String) {
    let mut cmd = Command::new(binary("vmgov-coordinator"));
    cmd.args(["--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "warn,vmgov_coordinator=info");
    let d = Daemon::spawn(name, cmd);
    let addr = d.wait_for_listen_address();
    (d, addr)
}

/// A running process of ours.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    /// Starts `cmd`, collecting its standard error.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let collect = |stream: Box<dyn std::io::Read + Send>| {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        };
        if let Some(out) = child.stdout.take() {
            collect(Box::new(out));
        }
        if let Some(err) = child.stderr.take() {
            collect(Box::new(err));
        }
        Self { name: name.into(), child, log }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits (up to `timeout`) for a logged line containing `needle`, and returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> String {
        let until = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < until,
                "{} never logged {needle:?}; its log:\n{}",
                self.name,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 30 s) for a daemon of ours to log `listening on ADDR` (it binds port 0, so
    /// only its log knows the port) and returns ADDR (`host:port`).
    pub fn wait_for_listen_address(&self) -> String {
        let line = self.wait_for_line("listening on ", Duration::from_secs(30));
        line.split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_default()
            .to_owned()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `grace`; returns whether it exited by itself in time.
    pub fn terminate(&mut self, grace: Duration) -> bool {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    /// SIGKILL, no grace.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate(Duration::from_secs(5));
        }
    }
}
