//! What a host sees of a QEMU guest in `/proc`: the readings the agent will sample, parsed here
//! so that tests can check them against what the guest was made to do. Parsers take text and
//! return errors, never panic, since `/proc` formats vary between kernels.

use std::{fs, path::Path};

use super::{Error, ParseError, io_error};

/// The counters of `/proc/PID/io` that matter for guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcIo {
    /// Bytes passed to read syscalls.
    pub rchar: u64,
    /// Bytes passed to write syscalls.
    pub wchar: u64,
    /// Bytes the process caused to be read from storage.
    pub read_bytes: u64,
    /// Bytes the process caused to be written to storage (a guest's disk writes land here).
    pub write_bytes: u64,
}

impl ProcIo {
    /// Reads `/proc/PID/io`.
    pub fn read(pid: u32) -> Result<Self, Error> {
        let path = format!("/proc/{pid}/io");
        let text = read(Path::new(&path))?;
        Self::parse(&text).map_err(|source| Error::Parse { what: path, source })
    }

    /// Parses the text of `/proc/PID/io`.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let field = |name: &str| {
            let value = text
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .ok_or_else(|| ParseError::Missing(name.to_owned()))?;
            number(name, value)
        };
        Ok(Self {
            rchar: field("rchar")?,
            wchar: field("wchar")?,
            read_bytes: field("read_bytes")?,
            write_bytes: field("write_bytes")?,
        })
    }
}

/// One interface's counters from `/proc/PID/net/dev` (the view of the process's namespace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NetDevCounters {
    /// Bytes received by the interface. On a tap: sent by the guest.
    pub rx_bytes: u64,
    /// Packets received by the interface. On a tap: sent by the guest.
    pub rx_packets: u64,
    /// Bytes sent by the interface. On a tap: delivered to the guest.
    pub tx_bytes: u64,
    /// Packets sent by the interface. On a tap: delivered to the guest.
    pub tx_packets: u64,
}

impl NetDevCounters {
    /// Reads `iface`'s counters from `/proc/PID/net/dev`.
    pub fn read(pid: u32, iface: &str) -> Result<Self, Error> {
        let path = format!("/proc/{pid}/net/dev");
        let text = read(Path::new(&path))?;
        Self::parse(&text, iface).map_err(|source| Error::Parse { what: path, source })
    }

    /// Parses `iface`'s line of a `/proc/net/dev` text.
    pub fn parse(text: &str, iface: &str) -> Result<Self, ParseError> {
        let fields = text
            .lines()
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == iface).then_some(rest)
            })
            .ok_or_else(|| ParseError::Missing(format!("interface {iface}")))?;
        let values: Vec<&str> = fields.split_whitespace().collect();
        // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit.
        let at = |i: usize, name: &str| {
            let value =
                values.get(i).ok_or_else(|| ParseError::Missing(format!("{iface} {name}")))?;
            number(name, value)
        };
        Ok(Self {
            rx_bytes: at(0, "rx bytes")?,
            rx_packets: at(1, "rx packets")?,
            tx_bytes: at(8, "tx bytes")?,
            tx_packets: at(9, "tx packets")?,
        })
    }
}

/// A vCPU thread of a QEMU process, found by its name (`CPU N/TCG` or `CPU N/KVM`, given by
/// `-name ...,debug-threads=on`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuThread {
    /// The vCPU index N.
    pub index: u32,
    /// The thread id.
    pub tid: u32,
    /// The thread's name as in `/proc/PID/task/TID/comm`.
    pub comm: String,
}

/// The vCPU threads of process `pid`, sorted by vCPU index.
pub fn vcpu_threads(pid: u32) -> Result<Vec<VcpuThread>, Error> {
    let dir = format!("/proc/{pid}/task");
    let entries =
        fs::read_dir(&dir).map_err(|source| io_error("listing", Path::new(&dir), source))?;
    let mut threads = Vec::new();
    for entry in entries.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        // A thread may exit between listing and reading: skip it.
        let Ok(comm) = fs::read_to_string(entry.path().join("comm")) else { continue };
        let comm = comm.trim_end_matches('\n').to_owned();
        if let Some(index) = vcpu_index(&comm) {
            threads.push(VcpuThread { index, tid, comm });
        }
    }
    threads.sort_by_key(|t| t.index);
    Ok(threads)
}

/// The vCPU index in a QEMU vCPU thread name (`CPU 3/TCG` → 3), if it is one.
pub(super) fn vcpu_index(comm: &str) -> Option<u32> {
    let (index, accel) = comm.strip_prefix("CPU ")?.split_once('/')?;
    matches!(accel, "TCG" | "KVM").then_some(())?;
    index.parse().ok()
}

fn number(field: &str, value: &str) -> Result<u64, ParseError> {
    let value = value.trim();
    value
        .parse()
        .map_err(|_| ParseError::BadNumber { field: field.to_owned(), value: value.to_owned() })
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| io_error("reading", path, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NET_DEV: &str = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
vmgtap0:   31234     212    0    0    0     0          0         0    40211     230    0    0    0     0       0          0
";

    #[test]
    fn net_dev_line_of_the_tap() {
        let c = NetDevCounters::parse(NET_DEV, "vmgtap0").unwrap();
        assert_eq!(
            c,
            NetDevCounters { rx_bytes: 31234, rx_packets: 212, tx_bytes: 40211, tx_packets: 230 }
        );
        assert!(NetDevCounters::parse(NET_DEV, "eth0").is_err());
        assert!(NetDevCounters::parse("vmgtap0: 1 2 3", "vmgtap0").is_err());
    }

    #[test]
    fn proc_io() {
        let text = "rchar: 10\nwchar: 20\nsyscr: 1\nsyscw: 2\nread_bytes: 4096\nwrite_bytes: \
                    16797696\ncancelled_write_bytes: 0\n";
        let io = ProcIo::parse(text).unwrap();
        assert_eq!(io, ProcIo { rchar: 10, wchar: 20, read_bytes: 4096, write_bytes: 16_797_696 });
        assert!(ProcIo::parse("rchar: x").is_err());
    }

    #[test]
    fn vcpu_names() {
        assert_eq!(vcpu_index("CPU 0/TCG"), Some(0));
        assert_eq!(vcpu_index("CPU 12/KVM"), Some(12));
        assert_eq!(vcpu_index("CPU x/TCG"), None);
        assert_eq!(vcpu_index("qemu-system-x86"), None);
        assert_eq!(vcpu_index("CPU 1/XYZ"), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "(?s).{0,300}", iface in "[a-z0-9]{1,8}") {
            let _ = ProcIo::parse(&text);
            let _ = NetDevCounters::parse(&text, &iface);
            let _ = vcpu_index(&text);
        }
    }
}
