//! Real QEMU guests for end-to-end tests of the node agent.
//!
//! The agent finds VMs the way a KVM host shows them: QEMU processes in `/proc`, their vCPU
//! threads by name, their disk writes in `/proc/PID/io` and their tap traffic in
//! `/proc/PID/net/dev`. A simulated host cannot prove that those readings mean what the agent
//! thinks, so these tests boot real (small) Linux guests and drive real work inside them.
//!
//! Choices, and why:
//! - TCG, never KVM: nested KVM guests hang on the machines we test on. TCG still gives one host
//!   thread per vCPU (`CPU N/TCG`), which is what the agent samples.
//! - A Debian cloud kernel and a busybox initramfs ([`GuestImage`], built once and cached under
//!   the target dir): they come from apt alone, so a fresh CI machine can build them, and they
//!   boot in seconds under TCG.
//! - Each test makes its own network namespace ([`NetNs`]) for the taps, QEMU and httperf, so
//!   traffic never leaves the test and parallel tests cannot collide on addresses.
//! - The guest's shell is on a second serial port (`ttyS1`) and the kernel log on the first, so
//!   kernel messages never interleave with command output. Commands are framed by markers that
//!   the shell prints, which gives the exit status and survives a late reply to a timed-out
//!   command.
//! - Everything a test starts is removed on drop, also when the test panics; resources left by a
//!   killed test process (they carry its pid in their names) are swept by the next one.

mod httperf;
mod image;
mod netns;
mod procfs;
mod qmp;
mod shell;

use std::{
    fs, io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

pub use httperf::{HttperfArgs, HttperfReport, run_httperf};
pub use image::{GuestImage, cache_dir};
pub use netns::{NetNs, Tap};
pub use procfs::{NetDevCounters, ProcIo, VcpuThread, net_dev, proc_io, vcpu_threads};
pub use qmp::{Qmp, QmpCpu};
pub use shell::GuestOutput;

use shell::Shell;

/// The QEMU binary the harness runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// The line the guest's init writes to the console once the network, httpd and the shell are up.
const READY_MARKER: &str = "vmgov-guest: ready";

/// Something the harness could not do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This machine cannot run the guests.
    #[error(
        "this machine cannot run QEMU guests: {missing}. The QEMU tests need root, /dev/net/tun \
         and the Debian packages that `tools/test` installs"
    )]
    HostUnsupported {
        /// What is missing, comma separated.
        missing: String,
    },
    /// A command could not be started.
    #[error("starting `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it wrote on stderr (trimmed).
        stderr: String,
    },
    /// A file or directory operation failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something did not happen in time.
    #[error("timed out after {timeout:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long the harness waited.
        timeout: Duration,
    },
    /// QEMU exited before it was asked to.
    #[error("QEMU of guest {guest} exited ({status}); its log:\n{log}\nconsole:\n{console}")]
    QemuExited {
        /// The guest's name.
        guest: String,
        /// QEMU's exit status.
        status: ExitStatus,
        /// QEMU's own stderr.
        log: String,
        /// The end of the guest's console.
        console: String,
    },
    /// Output of a tool or a `/proc` file could not be understood.
    #[error("parsing {what}")]
    Parse {
        /// The tool or file.
        what: String,
        /// The cause.
        #[source]
        source: ParseError,
    },
    /// QMP answered with an error or broke the protocol.
    #[error("QMP `{command}` on {socket}: {message}")]
    Qmp {
        /// The QMP command.
        command: String,
        /// The QMP socket.
        socket: PathBuf,
        /// QMP's error, or what was wrong with the answer.
        message: String,
    },
    /// Preparing the guest image failed.
    #[error("preparing the guest image: {0}")]
    Image(String),
    /// A guest did not behave as the harness expects.
    #[error("guest {guest}: {message}")]
    Guest {
        /// The guest's name.
        guest: String,
        /// What went wrong.
        message: String,
    },
    /// A namespace ran out of tap subnets.
    #[error("namespace {0} has no free tap subnet left")]
    TapsExhausted(String),
}

/// Text that is not what a parser expected. Parsers never panic on bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A line or field that must be present is missing.
    #[error("missing {0}")]
    Missing(String),
    /// A field that is present but not a number of the right kind.
    #[error("field {field}: {value:?} is not a valid number")]
    BadNumber {
        /// The field.
        field: String,
        /// Its text.
        value: String,
    },
    /// A `/proc` file the agent's parser refused.
    #[error(transparent)]
    Proc(#[from] vmgov_agent::platform::linux::procfs::ParseError),
}

/// How to start a guest. `Default` gives the shape the tests use: 2 vCPUs, 256 MiB, 64 MiB disk.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    /// Number of vCPUs (`-smp`).
    pub vcpus: u32,
    /// Memory in MiB (`-m`).
    pub memory_mib: u32,
    /// Size of the raw virtio-blk disk (`/dev/vda` in the guest), sparse on the host.
    pub disk_mib: u64,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self { vcpus: 2, memory_mib: 256, disk_mib: 64 }
    }
}

/// One running QEMU guest in a test's namespace. Killed and cleaned up on drop.
///
/// The lifetime ties the guest to its namespace, which must outlive it.
#[derive(Debug)]
pub struct Guest<'ns> {
    ns: &'ns NetNs,
    name: String,
    uuid: String,
    tap: Tap,
    child: Child,
    pid: u32,
    run_dir: PathBuf,
    disk: PathBuf,
    started: Instant,
    shell: Option<Shell>,
}

impl<'ns> Guest<'ns> {
    /// Starts QEMU (returns once the process runs; see [`Guest::wait_booted`]) with a new tap in
    /// `ns`, a new sparse disk, a QMP socket and the shell's serial socket.
    pub fn start(image: &GuestImage, ns: &'ns NetNs, config: &GuestConfig) -> Result<Self, Error> {
        let tap = ns.add_tap()?;
        let id = unique_id();
        let name = format!("vmgov-{id}");
        let uuid = read_trimmed(Path::new("/proc/sys/kernel/random/uuid"))?;
        // Sockets live in the temp dir (a unix socket path must stay under 108 bytes); the disk
        // lives under the target dir, because writes to a tmpfs would not show in /proc/PID/io.
        let run_dir = std::env::temp_dir().join(format!("vmgov-guest-{id}"));
        create_dir(&run_dir)?;
        let disk_dir = cache_dir().join("disks");
        create_dir(&disk_dir)?;
        let disk = disk_dir.join(format!("{name}.raw"));
        let created = fs::File::create(&disk)
            .and_then(|f| f.set_len(config.disk_mib.saturating_mul(1 << 20)));
        created.map_err(|source| io_error("creating disk", &disk, source))?;
        let log = run_dir.join("qemu.log");
        let log_file =
            fs::File::create(&log).map_err(|source| io_error("creating", &log, source))?;
        let log_err = log_file.try_clone().map_err(|source| io_error("opening", &log, source))?;

        let mut cmd = ns.command(QEMU);
        cmd.args(qemu_args(image, &name, &uuid, &tap, config, &run_dir, &disk))
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);
        let command = describe(&cmd);
        let child = cmd.spawn().map_err(|source| {
            let _ = fs::remove_dir_all(&run_dir);
            let _ = fs::remove_file(&disk);
            Error::Spawn { command, source }
        })?;
        let pid = child.id();
        Ok(Self {
            ns,
            name,
            uuid,
            tap,
            child,
            pid,
            run_dir,
            disk,
            started: Instant::now(),
            shell: None,
        })
    }

    /// Waits until the guest's init reports the network, httpd and the shell up, and the shell
    /// answers. Returns the time since [`Guest::start`]. Boot under TCG takes seconds and more on
    /// a loaded host: give a generous timeout and never assert on the duration.
    pub fn wait_booted(&mut self, timeout: Duration) -> Result<Duration, Error> {
        if self.shell.is_some() {
            return Ok(self.started.elapsed());
        }
        let deadline = Instant::now() + timeout;
        let console = self.console_path();
        loop {
            self.check_running()?;
            if fs::read_to_string(&console).is_ok_and(|c| c.contains(READY_MARKER)) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "guest {} to boot; console so far:\n{}",
                        self.name,
                        self.console_tail()
                    ),
                    timeout,
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
        let shell = Shell::connect(&self.run_dir.join("shell.sock"), deadline)?;
        self.shell = Some(shell);
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
        let probe = self.run_with_timeout("echo up", left)?;
        if probe.output.trim() != "up" || probe.status != 0 {
            return Err(Error::Guest {
                guest: self.name.clone(),
                message: format!("its shell answered {probe:?} to `echo up`"),
            });
        }
        Ok(self.started.elapsed())
    }

    /// Runs `cmd` with the guest's `sh -c` (stdin /dev/null, stderr into the output) and waits
    /// up to a minute for it. See [`Guest::run_with_timeout`].
    pub fn run(&mut self, cmd: &str) -> Result<GuestOutput, Error> {
        self.run_with_timeout(cmd, Duration::from_secs(60))
    }

    /// Runs `cmd` in the guest and returns its output and exit status. After a timeout the
    /// command goes on in the guest and later commands queue behind it.
    pub fn run_with_timeout(&mut self, cmd: &str, timeout: Duration) -> Result<GuestOutput, Error> {
        self.check_running()?;
        match &mut self.shell {
            Some(shell) => shell.run(cmd, timeout),
            None => Err(Error::Guest {
                guest: self.name.clone(),
                message: "no shell yet: call wait_booted first".to_owned(),
            }),
        }
    }

    /// Stops QEMU (QMP `quit`, then SIGKILL if it lingers) and waits for the process to be gone.
    pub fn stop(mut self) -> Result<ExitStatus, Error> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Ok(mut qmp) = Qmp::connect(&self.qmp_socket(), Duration::from_secs(5)) {
            // QEMU may close the socket before answering: the exit below is what counts.
            let _ = qmp.execute("quit", None);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().map_err(|source| io_error("waiting for QEMU", &self.run_dir, source))
    }

    /// QEMU's process id (QEMU itself: `ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The guest's name, as given by `-name guest=NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's UUID, as given by `-uuid`.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The QMP unix socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// Opens a QMP session (QEMU serves one client at a time: drop it before opening another).
    pub fn qmp(&self) -> Result<Qmp, Error> {
        Qmp::connect(&self.qmp_socket(), Duration::from_secs(10))
    }

    /// The guest's vCPU threads, found by name in `/proc/PID/task/*/comm`, by vCPU index.
    pub fn vcpu_threads(&self) -> Result<Vec<VcpuThread>, Error> {
        vcpu_threads(self.pid)
    }

    /// The guest's vCPUs and their host thread ids as QMP `query-cpus-fast` reports them.
    pub fn qmp_vcpus(&self) -> Result<Vec<QmpCpu>, Error> {
        self.qmp()?.query_cpus_fast()
    }

    /// The tap the guest's virtio-net is attached to.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's address (eth0, on the tap's subnet).
    pub fn ip(&self) -> Ipv4Addr {
        self.tap.guest_ip
    }

    /// The namespace the guest's QEMU runs in.
    pub fn netns(&self) -> &'ns NetNs {
        self.ns
    }

    /// QEMU's I/O counters (`/proc/PID/io`); `write_bytes` includes the guest's disk writes.
    pub fn proc_io(&self) -> Result<ProcIo, Error> {
        proc_io(self.pid)
    }

    /// The counters of the guest's tap as QEMU's namespace shows them (`/proc/PID/net/dev`).
    pub fn tap_counters(&self) -> Result<NetDevCounters, Error> {
        net_dev(self.pid, &self.tap.name)
    }

    /// The guest's kernel console so far (`ttyS0`), for diagnostics.
    pub fn console(&self) -> String {
        fs::read_to_string(self.console_path()).unwrap_or_default()
    }

    fn console_path(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    fn console_tail(&self) -> String {
        let console = self.console();
        let lines: Vec<&str> = console.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        self.child.try_wait().map_err(|source| io_error("waiting for QEMU", &self.run_dir, source))
    }

    fn check_running(&mut self) -> Result<(), Error> {
        match self.try_wait()? {
            None => Ok(()),
            Some(status) => Err(Error::QemuExited {
                guest: self.name.clone(),
                status,
                log: fs::read_to_string(self.run_dir.join("qemu.log")).unwrap_or_default(),
                console: self.console_tail(),
            }),
        }
    }
}

impl Drop for Guest<'_> {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.run_dir);
        let _ = fs::remove_file(&self.disk);
    }
}

/// Checks that this machine can run the guests: root, `/dev/net/tun`, and the tools. The error
/// names everything that is missing.
pub fn check_host() -> Result<(), Error> {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (the tests create network namespaces and taps)".to_owned());
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_owned());
    }
    for tool in [QEMU, "ip", "httperf", "cpio", "apt-get", "dpkg"] {
        if which(tool).is_none() {
            missing.push(format!("`{tool}` on PATH"));
        }
    }
    if !Path::new(image::BUSYBOX).exists() {
        missing.push(format!("{} (package busybox-static)", image::BUSYBOX));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::HostUnsupported { missing: missing.join(", ") })
    }
}

fn is_root() -> bool {
    // The second field of `Uid:` is the effective uid.
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|p| p.is_file())
}

fn qemu_args(
    image: &GuestImage,
    name: &str,
    uuid: &str,
    tap: &Tap,
    config: &GuestConfig,
    run_dir: &Path,
    disk: &Path,
) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    let [_, _, subnet, host] = tap.guest_ip.octets();
    let append =
        format!("console=ttyS0 quiet panic=-1 vmgov.ip={}/{}", tap.guest_ip, tap.prefix_len);
    [
        "-name",
        &format!("guest={name},debug-threads=on"),
        "-uuid",
        uuid,
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-m",
        &config.memory_mib.to_string(),
        "-smp",
        &config.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        &path(&image.kernel),
        "-initrd",
        &path(&image.initramfs),
        "-append",
        &append,
        // ttyS0: the kernel console, to a file; ttyS1: the command shell.
        "-serial",
        &format!("file:{}", path(&run_dir.join("console.log"))),
        "-chardev",
        &format!("socket,id=shell,path={},server=on,wait=off", path(&run_dir.join("shell.sock"))),
        "-serial",
        "chardev:shell",
        "-qmp",
        &format!("unix:{},server=on,wait=off", path(&run_dir.join("qmp.sock"))),
        "-drive",
        &format!("file={},format=raw,if=none,id=disk0", path(disk)),
        "-device",
        "virtio-blk-pci,drive=disk0",
        "-netdev",
        &format!("tap,id=net0,ifname={},script=no,downscript=no", tap.name),
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac=52:54:00:d5:{subnet:02x}:{host:02x},romfile="),
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

/// A process-unique id that also names the owning test process: `PID-N`.
fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The command line, for error messages.
fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.join(" ")
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
fn run_command(cmd: &mut Command) -> Result<Output, Error> {
    let command = describe(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn { command: command.clone(), source })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(Error::CommandFailed {
            command,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io { action, path: path.to_path_buf(), source }
}

fn create_dir(path: &Path) -> Result<(), Error> {
    fs::create_dir_all(path).map_err(|source| io_error("creating", path, source))
}

fn read_trimmed(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| io_error("reading", path, source))
}

/// Whether a process that owns harness resources (by the pid in their names) is gone.
fn owner_is_dead(id: &str) -> bool {
    id.split('-').next().and_then(|pid| pid.parse::<u32>().ok()).is_some_and(|pid| {
        pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
    })
}
