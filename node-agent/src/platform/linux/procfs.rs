//! What `/proc` says about QEMU VMs: which processes are VMs, which of their threads are vCPUs,
//! and what those did. Everything the agent knows about a VM without QEMU's help comes from
//! here, so that the agent needs no QMP socket, no libvirt and no agent inside the guest.
//!
//! The pure parsers come first and never touch a file, so that every quirk of the formats (a
//! `comm` with spaces and parentheses, QEMU's `,,` escape, `-name NAME` against
//! `-name guest=NAME`) is tested with literal text and fuzzed with arbitrary bytes; [`ProcFs`]
//! then reads the files under a configurable root, so that tests run against fixture trees.
//!
//! How the VM's activity is attributed, and what that costs in accuracy:
//! - Disk: QEMU does the guest's disk I/O itself (its main loop, I/O threads or thread pool), so
//!   the QEMU process's `/proc/PID/io` is the VM's disk: bytes from `read_bytes`/`write_bytes`
//!   (what reached the block layer), calls from `syscr`/`syscw`. The call counts are an
//!   over-estimate: they count every read-like and write-like syscall of QEMU (eventfds, the
//!   monitor, the tap device), not only disk requests.
//! - Network: the VM's tap devices, as `/proc/QEMU_PID/net/dev` shows them, which works in
//!   whichever network namespace QEMU runs. A tap's directions are the host's: what the tap
//!   *transmits* goes host → guest, so it is what the VM *receives*, and the tap's receive
//!   counters are what the VM sends.
//! - CPU: `/proc/PID/task/TID/schedstat` run time of the vCPU threads (`CPU N/KVM`, `CPU N/TCG`,
//!   named so by `-name ...,debug-threads=on`, which libvirt always passes), and the last CPU a
//!   vCPU ran on from `/proc/PID/task/TID/stat` field 39.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// A file under `/proc` that did not say what was expected.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{problem}")]
pub struct ParseError {
    /// What was wrong.
    pub problem: String,
}

impl ParseError {
    fn new(problem: impl Into<String>) -> Self {
        Self { problem: problem.into() }
    }
}

/// What a QEMU command line says about its VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QemuCmdline {
    /// `-name guest=NAME` or `-name NAME`.
    pub name: Option<String>,
    /// `-uuid`, lowercased.
    pub uuid: Option<String>,
    /// `-smp N` or `-smp cpus=N` (or the product of its topology).
    pub smp: Option<u32>,
    /// Tap interfaces named on the command line (`-netdev tap,ifname=X`, `-nic tap,ifname=X`).
    pub taps: Vec<String>,
    /// A tap-like network backend whose interface name the command line does not give
    /// (`tap,fd=N` as libvirt passes it, `bridge`): only `/proc/PID/fdinfo` can name it.
    pub unnamed_taps: bool,
}

/// True when `argv0` is a QEMU system emulator: its basename starts with `qemu-system` or
/// `qemu-kvm`.
pub fn is_qemu(argv0: &str) -> bool {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base.starts_with("qemu-system") || base.starts_with("qemu-kvm")
}

/// Splits a NUL-separated `/proc/PID/cmdline` into arguments (invalid UTF-8 replaced).
pub fn split_cmdline(raw: &[u8]) -> Vec<String> {
    let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// Parses a QEMU command line, or `None` when the process is not QEMU.
pub fn parse_cmdline(raw: &[u8]) -> Option<QemuCmdline> {
    let args = split_cmdline(raw);
    let argv0 = args.first()?;
    if !is_qemu(argv0) {
        return None;
    }
    Some(parse_qemu_args(&args[1..]))
}

/// Splits a QEMU option string at commas, where `,,` stands for a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// The value of `key` in split options, where the first element without `=` is the value of
/// the option's implied key (`guest` for `-name`, `cpus` for `-smp`, `type` for `-netdev`).
fn opt<'a>(opts: &'a [String], key: &str, implied: bool) -> Option<&'a str> {
    for (i, o) in opts.iter().enumerate() {
        match o.split_once('=') {
            Some((k, v)) if k == key => return Some(v),
            None if implied && i == 0 && !o.is_empty() => return Some(o),
            _ => {}
        }
    }
    None
}

/// Parses QEMU's arguments after `argv[0]`.
pub fn parse_qemu_args(args: &[String]) -> QemuCmdline {
    let mut c = QemuCmdline::default();
    let mut i = 0;
    while i < args.len() {
        let flag = args[i].strip_prefix('-').unwrap_or(&args[i]);
        let flag = flag.strip_prefix('-').unwrap_or(flag);
        let Some(value) = args.get(i + 1) else { break };
        let consumed = match flag {
            "name" => {
                let opts = split_opts(value);
                c.name = opt(&opts, "guest", true).map(str::to_owned);
                true
            }
            "uuid" => {
                c.uuid = Some(value.trim().to_ascii_lowercase());
                true
            }
            "smp" => {
                c.smp = parse_smp(value);
                true
            }
            "netdev" | "nic" | "net" => {
                parse_netdev(value, &mut c);
                true
            }
            _ => false,
        };
        i += if consumed { 2 } else { 1 };
    }
    c
}

fn parse_smp(value: &str) -> Option<u32> {
    let opts = split_opts(value);
    if let Some(n) = opt(&opts, "cpus", true) {
        return n.trim().parse().ok();
    }
    let mut product: Option<u32> = None;
    for key in ["sockets", "dies", "clusters", "cores", "threads"] {
        if let Some(n) = opt(&opts, key, false).and_then(|v| v.trim().parse::<u32>().ok()) {
            product = Some(product.unwrap_or(1).saturating_mul(n));
        }
    }
    product
}

fn parse_netdev(value: &str, c: &mut QemuCmdline) {
    let (kind, ifname) = if value.trim_start().starts_with('{') {
        // `-netdev {"type":"tap","ifname":"vnet0",...}`, as newer libvirt writes it.
        let Ok(v) = serde_json::from_str::<serde_json::Value>(value) else { return };
        let s = |k: &str| v.get(k).and_then(serde_json::Value::as_str).map(str::to_owned);
        (s("type").unwrap_or_default(), s("ifname"))
    } else {
        let opts = split_opts(value);
        let kind = opt(&opts, "type", true).unwrap_or_default().to_owned();
        (kind, opt(&opts, "ifname", false).map(str::to_owned))
    };
    match (kind.as_str(), ifname) {
        ("tap", Some(name)) if !name.is_empty() && !c.taps.contains(&name) => c.taps.push(name),
        ("tap", Some(name)) if !name.is_empty() => {}
        // `tap,fd=N` (libvirt), a tap QEMU names itself, or the bridge helper's tap.
        ("tap" | "bridge", _) => c.unnamed_taps = true,
        _ => {}
    }
}

/// The vCPU index of a thread named `CPU N/KVM` or `CPU N/TCG`.
pub fn parse_vcpu_comm(comm: &str) -> Option<u32> {
    let rest = comm.trim_end().strip_prefix("CPU ")?;
    let (n, accel) = rest.split_once('/')?;
    if accel == "KVM" || accel == "TCG" { n.parse().ok() } else { None }
}

/// `/proc/PID/io`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Bytes read by read-like syscalls (any file, socket or pipe).
    pub rchar: u64,
    /// Bytes written by write-like syscalls.
    pub wchar: u64,
    /// Read-like syscalls.
    pub syscr: u64,
    /// Write-like syscalls.
    pub syscw: u64,
    /// Bytes fetched from the storage layer.
    pub read_bytes: u64,
    /// Bytes sent to the storage layer.
    pub write_bytes: u64,
}

/// Parses `/proc/PID/io`; every one of the six fields must be there.
pub fn parse_io(text: &str) -> Result<IoCounters, ParseError> {
    let mut fields: BTreeMap<&str, u64> = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':')
            && let Ok(v) = v.trim().parse::<u64>()
        {
            fields.insert(k.trim(), v);
        }
    }
    let get = |k: &str| fields.get(k).copied().ok_or_else(|| ParseError::new(format!("no {k}")));
    Ok(IoCounters {
        rchar: get("rchar")?,
        wchar: get("wchar")?,
        syscr: get("syscr")?,
        syscw: get("syscw")?,
        read_bytes: get("read_bytes")?,
        write_bytes: get("write_bytes")?,
    })
}

/// One interface in `/proc/PID/net/dev`, in the host's directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetDevCounters {
    /// Bytes the host received on the interface.
    pub rx_bytes: u64,
    /// Packets the host received on the interface.
    pub rx_packets: u64,
    /// Bytes the host transmitted on the interface.
    pub tx_bytes: u64,
    /// Packets the host transmitted on the interface.
    pub tx_packets: u64,
}

impl NetDevCounters {
    /// Sums two interfaces (wrapping: counters are compared as deltas).
    pub const fn plus(self, o: Self) -> Self {
        Self {
            rx_bytes: self.rx_bytes.wrapping_add(o.rx_bytes),
            rx_packets: self.rx_packets.wrapping_add(o.rx_packets),
            tx_bytes: self.tx_bytes.wrapping_add(o.tx_bytes),
            tx_packets: self.tx_packets.wrapping_add(o.tx_packets),
        }
    }
}

/// Parses `/proc/PID/net/dev` into counters per interface; lines that do not parse (the two
/// header lines) are skipped.
pub fn parse_net_dev(text: &str) -> BTreeMap<String, NetDevCounters> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let f: Vec<u64> = rest.split_whitespace().map_while(|v| v.parse().ok()).collect();
        if f.len() < 10 {
            continue;
        }
        out.insert(
            name.trim().to_owned(),
            NetDevCounters { rx_bytes: f[0], rx_packets: f[1], tx_bytes: f[8], tx_packets: f[9] },
        );
    }
    out
}

/// `/proc/PID/task/TID/schedstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedstat {
    /// Time spent running on a CPU, ns.
    pub run_ns: u64,
    /// Time spent runnable but waiting for a CPU, ns.
    pub wait_ns: u64,
    /// Timeslices run.
    pub timeslices: u64,
}

/// Parses `/proc/PID/task/TID/schedstat` (three numbers).
pub fn parse_schedstat(text: &str) -> Result<Schedstat, ParseError> {
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    let mut next = |what: &str| match it.next() {
        Some(Ok(v)) => Ok(v),
        _ => Err(ParseError::new(format!("no {what} in {text:?}"))),
    };
    Ok(Schedstat {
        run_ns: next("run time")?,
        wait_ns: next("wait time")?,
        timeslices: next("timeslices")?,
    })
}

/// The fields of `/proc/PID/stat` (or `task/TID/stat`) the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStat {
    /// `comm`, between the parentheses.
    pub comm: String,
    /// Field 22: start time after boot, clock ticks (with the pid, a process's identity).
    pub start_time: u64,
    /// Field 39: the CPU the task last ran on.
    pub processor: u32,
}

/// Parses a `stat` line. `comm` may contain spaces and parentheses, so the fields after it
/// start after the *last* `)`.
pub fn parse_task_stat(text: &str) -> Result<TaskStat, ParseError> {
    let open = text.find('(').ok_or_else(|| ParseError::new("no '(' before comm"))?;
    let close = text.rfind(')').ok_or_else(|| ParseError::new("no ')' after comm"))?;
    if close < open {
        return Err(ParseError::new("')' before '('"));
    }
    let comm = text[open + 1..close].to_owned();
    let rest: Vec<&str> = text[close + 1..].split_whitespace().collect();
    // Field k (1-based, k >= 3) is rest[k - 3].
    let field =
        |k: usize| rest.get(k - 3).ok_or_else(|| ParseError::new(format!("stat has no field {k}")));
    let start_time =
        field(22)?.parse().map_err(|_| ParseError::new("field 22 (starttime) is not a number"))?;
    let processor =
        field(39)?.parse().map_err(|_| ParseError::new("field 39 (processor) is not a number"))?;
    Ok(TaskStat { comm, start_time, processor })
}

/// Parses a CPU list (`0-3,8,10-11`) into a mask of the CPUs below 64.
pub fn parse_cpu_list(s: &str) -> Result<u64, ParseError> {
    let mut mask = 0u64;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || ParseError::new(format!("{part:?} is not a CPU or a range"));
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<u32>().map_err(|_| bad())?,
                b.trim().parse::<u32>().map_err(|_| bad())?,
            ),
            None => {
                let a = part.trim().parse::<u32>().map_err(|_| bad())?;
                (a, a)
            }
        };
        if a > b {
            return Err(bad());
        }
        for cpu in a..=b.min(63) {
            mask |= 1 << cpu;
        }
    }
    Ok(mask)
}

/// `Cpus_allowed_list` of a `/proc/PID/status`, as a mask.
pub fn parse_status_cpus_allowed(text: &str) -> Result<u64, ParseError> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| ParseError::new("no Cpus_allowed_list"))?;
    parse_cpu_list(line)
}

/// One CPU's line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// idle + iowait.
    pub idle: u64,
    /// Every state up to steal (guest time is already inside user and nice).
    pub total: u64,
}

/// Parses the per-CPU lines (`cpuN ...`) of `/proc/stat`, as (CPU number, times).
pub fn parse_proc_stat(text: &str) -> Vec<(u32, CpuTimes)> {
    let mut out = Vec::new();
    for line in text.lines() {
        // `cpuN`, not the aggregate `cpu ` line.
        let Some(rest) =
            line.strip_prefix("cpu").filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let Some(Ok(cpu)) = parts.next().map(str::parse::<u32>) else { continue };
        let f: Vec<u64> = parts.map_while(|v| v.parse().ok()).collect();
        if f.len() < 4 {
            continue;
        }
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        let idle = at(3).saturating_add(at(4));
        let total = f.iter().take(8).fold(0u64, |a, &v| a.saturating_add(v));
        out.push((cpu, CpuTimes { idle, total }));
    }
    out
}

/// The interface a tun/tap file descriptor is attached to (`iff:` in `/proc/PID/fdinfo/FD`).
pub fn parse_fdinfo_iff(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// What the agent takes from `/proc/cpuinfo` (the first processor's entries).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CpuInfo {
    /// `model name`.
    pub model_name: Option<String>,
    /// `cpu MHz`.
    pub mhz: Option<f64>,
}

/// Parses `/proc/cpuinfo`.
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim());
        if k == "model name" && info.model_name.is_none() && !v.is_empty() {
            info.model_name = Some(v.to_owned());
        } else if k == "cpu MHz" && info.mhz.is_none() {
            info.mhz = v.parse().ok().filter(|m: &f64| m.is_finite() && *m > 0.0);
        }
    }
    info
}

/// A hardware class name from a CPU model name: lowercased, runs of white space to one dash.
pub fn class_from_model(model: &str) -> String {
    model.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join("-")
}

/// A UUID for a VM started without `-uuid`, derived from its name so that the same name gives
/// the same UUID on every host and across agent restarts: 128 bits of FNV-1a over the name
/// (two 64-bit passes with different prefixes), laid out as an RFC 9562 version 8 (custom)
/// UUID. Two VMs with the same name and no `-uuid` therefore share a UUID.
pub fn uuid_from_name(name: &str) -> String {
    fn fnv1a(prefix: &[u8], data: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in prefix.iter().chain(data) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
    let hi = fnv1a(b"vmgov-vm-uuid-hi:", name.as_bytes()).to_be_bytes();
    let lo = fnv1a(b"vmgov-vm-uuid-lo:", name.as_bytes()).to_be_bytes();
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&hi);
    b[8..].copy_from_slice(&lo);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Reading a file under the proc root failed.
#[derive(Debug, Error)]
pub enum ProcError {
    /// The file could not be read.
    #[error("reading {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file did not parse.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: ParseError,
    },
}

impl ProcError {
    /// True when the process or thread has gone (the file no longer exists).
    pub fn is_gone(&self) -> bool {
        match self {
            Self::Read { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            Self::Parse { .. } => false,
        }
    }

    /// True when reading was refused (the agent is not root, or ptrace rules forbid it).
    pub fn is_denied(&self) -> bool {
        matches!(self, Self::Read { source, .. } if source.kind() == io::ErrorKind::PermissionDenied)
    }
}

/// A QEMU process found under the proc root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time (field 22 of its stat), with the pid a key no later process reuses.
    pub start_time: u64,
    /// What its command line says.
    pub cmdline: QemuCmdline,
}

/// A vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuThread {
    /// The vCPU index (`CPU N/...`).
    pub vcpu: u32,
    /// The thread id.
    pub tid: u32,
}

/// Reads the proc filesystem under a root (`/proc`, or a fixture tree in tests).
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

impl ProcFs {
    /// Reads under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path under the root.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// Reads a file under the root as bytes.
    pub fn read_bytes(&self, rel: impl AsRef<Path>) -> Result<Vec<u8>, ProcError> {
        let path = self.path(rel);
        std::fs::read(&path).map_err(|source| ProcError::Read { path, source })
    }

    /// Reads a file under the root as text.
    pub fn read(&self, rel: impl AsRef<Path>) -> Result<String, ProcError> {
        let path = self.path(rel);
        std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path, source })
    }

    fn parsed<T>(
        &self,
        rel: impl AsRef<Path>,
        parse: impl FnOnce(&str) -> Result<T, ParseError>,
    ) -> Result<T, ProcError> {
        let rel = rel.as_ref();
        let text = self.read(rel)?;
        parse(&text).map_err(|source| ProcError::Parse { path: self.path(rel), source })
    }

    /// Every process id under the root.
    pub fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let dir = std::fs::read_dir(&self.root)
            .map_err(|source| ProcError::Read { path: self.root.clone(), source })?;
        let mut pids: Vec<u32> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// The process `pid` if it is QEMU, with its identity and command line.
    pub fn qemu(&self, pid: u32) -> Result<Option<QemuProcess>, ProcError> {
        let raw = self.read_bytes(format!("{pid}/cmdline"))?;
        let Some(cmdline) = parse_cmdline(&raw) else { return Ok(None) };
        let stat = self.parsed(format!("{pid}/stat"), parse_task_stat)?;
        Ok(Some(QemuProcess { pid, start_time: stat.start_time, cmdline }))
    }

    /// The threads of `pid`.
    pub fn tids(&self, pid: u32) -> Result<Vec<u32>, ProcError> {
        let path = self.path(format!("{pid}/task"));
        let dir = std::fs::read_dir(&path).map_err(|source| ProcError::Read { path, source })?;
        let mut tids: Vec<u32> = dir
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
            .collect();
        tids.sort_unstable();
        Ok(tids)
    }

    /// The vCPU threads of `pid`, by vCPU index. Threads that exit while being listed are
    /// skipped.
    pub fn vcpu_threads(&self, pid: u32) -> Result<Vec<VcpuThread>, ProcError> {
        let mut out = Vec::new();
        for tid in self.tids(pid)? {
            match self.read(format!("{pid}/task/{tid}/comm")) {
                Ok(comm) => {
                    if let Some(vcpu) = parse_vcpu_comm(&comm) {
                        out.push(VcpuThread { vcpu, tid });
                    }
                }
                Err(e) if e.is_gone() => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|t| (t.vcpu, t.tid));
        Ok(out)
    }

    /// Interfaces of the tun/tap file descriptors `pid` holds (`iff:` in its fdinfo): how a VM
    /// whose taps libvirt opened and passed as file descriptors is matched to them.
    pub fn tap_fds(&self, pid: u32) -> Result<Vec<String>, ProcError> {
        let path = self.path(format!("{pid}/fdinfo"));
        let dir = std::fs::read_dir(&path).map_err(|source| ProcError::Read { path, source })?;
        let mut out = Vec::new();
        for entry in dir.filter_map(Result::ok) {
            if let Ok(text) = std::fs::read_to_string(entry.path())
                && let Some(iff) = parse_fdinfo_iff(&text)
                && !out.contains(&iff)
            {
                out.push(iff);
            }
        }
        out.sort();
        Ok(out)
    }

    /// `/proc/PID/io`.
    pub fn io(&self, pid: u32) -> Result<IoCounters, ProcError> {
        self.parsed(format!("{pid}/io"), parse_io)
    }

    /// `/proc/PID/net/dev`.
    pub fn net_dev(&self, pid: u32) -> Result<BTreeMap<String, NetDevCounters>, ProcError> {
        self.read(format!("{pid}/net/dev")).map(|t| parse_net_dev(&t))
    }

    /// `/proc/PID/task/TID/schedstat`.
    pub fn schedstat(&self, pid: u32, tid: u32) -> Result<Schedstat, ProcError> {
        self.parsed(format!("{pid}/task/{tid}/schedstat"), parse_schedstat)
    }

    /// `/proc/PID/task/TID/stat`.
    pub fn task_stat(&self, pid: u32, tid: u32) -> Result<TaskStat, ProcError> {
        self.parsed(format!("{pid}/task/{tid}/stat"), parse_task_stat)
    }

    /// The CPUs thread `tid` of `pid` may run on.
    pub fn cpus_allowed(&self, pid: u32, tid: u32) -> Result<u64, ProcError> {
        self.parsed(format!("{pid}/task/{tid}/status"), parse_status_cpus_allowed)
    }

    /// The per-CPU lines of `/proc/stat`.
    pub fn cpu_times(&self) -> Result<Vec<(u32, CpuTimes)>, ProcError> {
        let text = self.read("stat")?;
        let cpus = parse_proc_stat(&text);
        if cpus.is_empty() {
            return Err(ProcError::Parse {
                path: self.path("stat"),
                source: ParseError::new("no per-CPU lines"),
            });
        }
        Ok(cpus)
    }

    /// `/proc/cpuinfo`.
    pub fn cpuinfo(&self) -> Result<CpuInfo, ProcError> {
        self.read("cpuinfo").map(|t| parse_cpuinfo(&t))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut raw = Vec::new();
        for a in args {
            raw.extend_from_slice(a.as_bytes());
            raw.push(0);
        }
        raw
    }

    #[test]
    fn libvirt_style_command_line() {
        let raw = cmdline(&[
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=web-01,debug-threads=on",
            "-S",
            "-uuid",
            "1B4E28BA-2FA1-11D2-883F-0016D3CCA427",
            "-smp",
            "4,sockets=4,cores=1,threads=1",
            "-netdev",
            "tap,id=hostnet0,ifname=vnet3,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=hostnet0",
        ]);
        let c = parse_cmdline(&raw).unwrap();
        assert_eq!(c.name.as_deref(), Some("web-01"));
        assert_eq!(c.uuid.as_deref(), Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427"));
        assert_eq!(c.smp, Some(4));
        assert_eq!(c.taps, vec!["vnet3".to_owned()]);
        assert!(!c.unnamed_taps);
    }

    #[test]
    fn bare_name_cpus_key_nic_and_escaped_commas() {
        let raw = cmdline(&[
            "qemu-kvm",
            "--name",
            "db,,primary,process=qemu:db",
            "-smp",
            "cpus=2,maxcpus=8",
            "-nic",
            "tap,ifname=tap7,model=virtio",
            "-netdev",
            "tap,id=n1,fd=23",
        ]);
        let c = parse_cmdline(&raw).unwrap();
        assert_eq!(c.name.as_deref(), Some("db,primary"));
        assert_eq!(c.uuid, None);
        assert_eq!(c.smp, Some(2));
        assert_eq!(c.taps, vec!["tap7".to_owned()]);
        assert!(c.unnamed_taps, "tap,fd=N has no name on the command line");
    }

    #[test]
    fn json_netdev_and_topology_only_smp() {
        let raw = cmdline(&[
            "/usr/libexec/qemu-kvm",
            "-smp",
            "sockets=2,cores=3,threads=2",
            "-netdev",
            r#"{"type":"tap","ifname":"vnet9","id":"hostnet0"}"#,
            "-netdev",
            "user,id=n2",
            "-name",
            "debug-threads=on,guest=x",
        ]);
        let c = parse_cmdline(&raw).unwrap();
        assert_eq!(c.smp, Some(12));
        assert_eq!(c.taps, vec!["vnet9".to_owned()]);
        assert!(!c.unnamed_taps, "a user-mode netdev is not a tap");
        assert_eq!(c.name.as_deref(), Some("x"));
    }

    #[test]
    fn other_processes_are_not_qemu() {
        assert!(parse_cmdline(&cmdline(&["/usr/bin/bash", "-name", "x"])).is_none());
        assert!(parse_cmdline(b"").is_none());
        assert!(parse_cmdline(&cmdline(&["/opt/qemu-img", "info"])).is_none());
        assert!(is_qemu("qemu-system-aarch64"));
        assert!(
            parse_cmdline(&cmdline(&["qemu-system-x86_64"])).unwrap() == QemuCmdline::default()
        );
    }

    #[test]
    fn vcpu_thread_names() {
        assert_eq!(parse_vcpu_comm("CPU 0/KVM\n"), Some(0));
        assert_eq!(parse_vcpu_comm("CPU 12/TCG"), Some(12));
        assert_eq!(parse_vcpu_comm("CPU x/KVM"), None);
        assert_eq!(parse_vcpu_comm("CPU 1/XEN"), None);
        assert_eq!(parse_vcpu_comm("qemu-system-x86"), None);
    }

    #[test]
    fn io_file() {
        let text = "rchar: 610093\nwchar: 24\nsyscr: 77\nsyscw: 3\nread_bytes: 14454784\n\
                    write_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(
            parse_io(text).unwrap(),
            IoCounters {
                rchar: 610_093,
                wchar: 24,
                syscr: 77,
                syscw: 3,
                read_bytes: 14_454_784,
                write_bytes: 8192
            }
        );
        let e = parse_io("rchar: 1\nwchar: 2\n").unwrap_err();
        assert!(e.problem.contains("syscr"), "{e}");
    }

    const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0
 vnet3: 1000      10    0    0    0     0          0         0  250000     200    0    0    0     0       0          0
";

    #[test]
    fn net_dev_file() {
        let m = parse_net_dev(NET_DEV);
        assert_eq!(m.len(), 2);
        assert_eq!(
            m["vnet3"],
            NetDevCounters { rx_bytes: 1000, rx_packets: 10, tx_bytes: 250_000, tx_packets: 200 }
        );
    }

    #[test]
    fn schedstat_file() {
        assert_eq!(
            parse_schedstat("716658 110338 5\n").unwrap(),
            Schedstat { run_ns: 716_658, wait_ns: 110_338, timeslices: 5 }
        );
        assert!(parse_schedstat("1 2").is_err());
    }

    #[test]
    fn stat_with_a_hostile_comm() {
        let tail = "R 26524 26524 24231 0 -1 4194304 98 0 0 0 0 0 0 0 20 0 1 0 228559 3133440 \
                    365 18446744073709551615 1 1 1 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_task_stat(&format!("26530 (CPU 0/KVM) {tail}")).unwrap();
        assert_eq!((s.comm.as_str(), s.start_time, s.processor), ("CPU 0/KVM", 228_559, 1));
        let s = parse_task_stat(&format!("7 (a) b (c)) {tail}")).unwrap();
        assert_eq!(s.comm, "a) b (c)");
        assert_eq!(s.processor, 1);
        assert!(parse_task_stat("7 (x) R 1 2").is_err());
        assert!(parse_task_stat("7 )x( R").is_err());
    }

    #[test]
    fn the_real_stat_of_this_process_parses() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let s = parse_task_stat(&text).unwrap();
        assert!(s.start_time > 0);
    }

    #[test]
    fn cpu_lists_and_status() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n").unwrap(), 0b1101_0000_1111);
        assert_eq!(parse_cpu_list("").unwrap(), 0);
        assert_eq!(parse_cpu_list("60-70").unwrap(), 0xf << 60);
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
        let status = "Name:\tqemu\nCpus_allowed:\t3\nCpus_allowed_list:\t0-1\n";
        assert_eq!(parse_status_cpus_allowed(status).unwrap(), 0b11);
    }

    #[test]
    fn proc_stat_lines() {
        let text = "cpu  163420 0 34431 253302 3125 0 180 181 0 0\n\
                    cpu0 79057 0 16262 131343 561 0 24 90 0 0\n\
                    cpu1 84363 0 18169 121958 2563 0 155 90 5 0\nintr 1 2\n";
        let cpus = parse_proc_stat(text);
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0].0, 0);
        assert_eq!(cpus[1].1.idle, 121_958 + 2563);
        assert_eq!(cpus[1].1.total, 84363 + 18169 + 121_958 + 2563 + 155 + 90);
    }

    #[test]
    fn fdinfo_and_cpuinfo() {
        assert_eq!(
            parse_fdinfo_iff("pos:\t0\nflags:\t02\nmnt_id:\t15\nino:\t1\niff:\tvnet0\n").as_deref(),
            Some("vnet0")
        );
        assert_eq!(parse_fdinfo_iff("pos:\t0\n"), None);
        let info = parse_cpuinfo(
            "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.140\n\nprocessor\t: 1\nmodel name\t: other\n",
        );
        assert_eq!(info.model_name.as_deref(), Some("AMD EPYC"));
        assert!((info.mhz.unwrap() - 2596.14).abs() < 1e-9);
        assert_eq!(
            class_from_model("AMD  EPYC 7502 32-Core Processor"),
            "amd-epyc-7502-32-core-processor"
        );
    }

    #[test]
    fn uuids_from_names_are_stable_and_well_formed() {
        let a = uuid_from_name("web-01");
        assert_eq!(a, uuid_from_name("web-01"));
        assert_ne!(a, uuid_from_name("web-02"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "8", "version 8");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "RFC variant: {a}");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = parse_cmdline(&bytes);
            let _ = parse_io(&text);
            let _ = parse_net_dev(&text);
            let _ = parse_schedstat(&text);
            let _ = parse_task_stat(&text);
            let _ = parse_cpu_list(&text);
            let _ = parse_status_cpus_allowed(&text);
            let _ = parse_proc_stat(&text);
            let _ = parse_fdinfo_iff(&text);
            let _ = parse_cpuinfo(&text);
            let _ = parse_vcpu_comm(&text);
            let _ = uuid_from_name(&text);
        }

        #[test]
        fn qemu_args_never_panic(args in proptest::collection::vec("[-a-z=,{}\":0-9 ]{0,24}", 0..12)) {
            let mut all = vec!["qemu-system-x86_64".to_owned()];
            all.extend(args);
            let raw: Vec<u8> = all.iter().flat_map(|a| a.bytes().chain([0])).collect();
            prop_assert!(parse_cmdline(&raw).is_some());
        }

        #[test]
        fn stat_fields_survive_any_comm(comm in "[ -~]{0,16}", cpu in 0u32..512, start in any::<u64>()) {
            let mut fields = vec!["0".to_owned(); 50];
            fields[19] = start.to_string();
            fields[36] = cpu.to_string();
            let s = parse_task_stat(&format!("1 ({comm}) {}", fields.join(" "))).unwrap();
            prop_assert_eq!(s.comm, comm);
            prop_assert_eq!(s.processor, cpu);
            prop_assert_eq!(s.start_time, start);
        }

        #[test]
        fn net_dev_round_trips(rx in any::<u32>(), rxp in any::<u32>(), tx in any::<u32>(), txp in any::<u32>()) {
            let text = format!("x|y\n h|b\n tapA: {rx} {rxp} 0 0 0 0 0 0 {tx} {txp} 0 0 0 0 0 0\n");
            let m = parse_net_dev(&text);
            prop_assert_eq!(m["tapA"], NetDevCounters {
                rx_bytes: rx.into(), rx_packets: rxp.into(), tx_bytes: tx.into(), tx_packets: txp.into()
            });
        }
    }
}
