//! A network namespace of the test's own, so that taps, QEMU and the load generator share a
//! private network: the same addresses can be used by every test at once, and no packet can
//! reach the host's real interfaces.

use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use super::{Error, owner_is_dead, run_command, unique_id};

/// The prefix of every namespace the harness makes; the rest is `PID-N` of the owning process.
const PREFIX: &str = "vmgov-";

/// A uniquely named network namespace with loopback up. Deleted on drop (its taps with it).
#[derive(Debug)]
pub struct NetNs {
    name: String,
    next_subnet: AtomicU32,
}

/// A tap device in a [`NetNs`] with its own /24: the host side is `10.213.T.1`, the guest
/// attached to it is configured as `10.213.T.2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tap {
    /// Interface name inside the namespace.
    pub name: String,
    /// The namespace's address on the tap.
    pub host_ip: Ipv4Addr,
    /// The address the guest on this tap gets.
    pub guest_ip: Ipv4Addr,
    /// Prefix length of the tap's subnet.
    pub prefix_len: u8,
}

impl NetNs {
    /// Creates the namespace (sweeping what killed test processes left behind first).
    pub fn new() -> Result<Self, Error> {
        super::check_host()?;
        sweep_stale();
        let name = format!("{PREFIX}{}", unique_id());
        run_command(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name, next_subnet: AtomicU32::new(0) };
        ns.run("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`; the
    /// program replaces `ip`, so the child's pid is the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace to completion; non-zero exit is an error.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, Error> {
        run_command(self.command(program).args(args))
    }

    /// Adds a tap device (up, host address assigned) on a subnet of its own.
    pub fn add_tap(&self) -> Result<Tap, Error> {
        let subnet = self.next_subnet.fetch_add(1, Ordering::Relaxed);
        let Ok(subnet) = u8::try_from(subnet) else {
            return Err(Error::TapsExhausted(self.name.clone()));
        };
        let tap = Tap {
            name: format!("vmgtap{subnet}"),
            host_ip: Ipv4Addr::new(10, 213, subnet, 1),
            guest_ip: Ipv4Addr::new(10, 213, subnet, 2),
            prefix_len: 24,
        };
        self.run("ip", &["tuntap", "add", "dev", &tap.name, "mode", "tap"])?;
        let addr = format!("{}/{}", tap.host_ip, tap.prefix_len);
        self.run("ip", &["addr", "add", &addr, "dev", &tap.name])?;
        self.run("ip", &["link", "set", &tap.name, "up"])?;
        Ok(tap)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run_command(Command::new("ip").args(["netns", "delete", &self.name]));
    }
}

/// Removes what test processes that died without cleaning up left: their QEMU processes,
/// namespaces, run dirs and disks. Everything is recognised by the dead owner's pid in its name.
fn sweep_stale() {
    kill_orphaned_qemus();
    if let Ok(out) = run_command(Command::new("ip").args(["netns", "list"])) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name.strip_prefix(PREFIX).is_some_and(owner_is_dead) {
                let _ = run_command(Command::new("ip").args(["netns", "delete", name]));
            }
        }
    }
    remove_stale_entries(&std::env::temp_dir(), "vmgov-guest-", "");
    remove_stale_entries(&super::cache_dir().join("disks"), PREFIX, ".raw");
}

fn kill_orphaned_qemus() {
    let Ok(procs) = fs::read_dir("/proc") else { return };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_qemu = args.first().is_some_and(|a| a.ends_with(super::QEMU));
        let owner = args.iter().find_map(|a| {
            a.strip_prefix("guest=")?.strip_prefix(PREFIX)?.split(',').next().map(str::to_owned)
        });
        if is_qemu && owner.is_some_and(|o| owner_is_dead(&o)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn remove_stale_entries(dir: &Path, prefix: &str, suffix: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name.strip_prefix(prefix).and_then(|rest| rest.strip_suffix(suffix));
        if owner.is_some_and(owner_is_dead) {
            let path = entry.path();
            let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        }
    }
}
