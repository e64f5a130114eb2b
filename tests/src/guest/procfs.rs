//! What a host sees of a QEMU guest in `/proc`, read through the agent's own parsers
//! (`vmgov_agent::platform::linux::procfs`): tests then check what the guest was made to do
//! against the very readings the agent samples. Only the file access lives here.

use std::{fs, path::Path};

pub use vmgov_agent::platform::linux::procfs::{IoCounters as ProcIo, NetDevCounters};
use vmgov_agent::platform::linux::procfs::{parse_io, parse_net_dev, parse_vcpu_comm};

use super::{Error, ParseError, io_error};

/// Reads `/proc/PID/io`.
pub fn proc_io(pid: u32) -> Result<ProcIo, Error> {
    let path = format!("/proc/{pid}/io");
    let text = read(Path::new(&path))?;
    parse_io(&text).map_err(|e| Error::Parse { what: path, source: ParseError::Proc(e) })
}

/// Reads `iface`'s counters from `/proc/PID/net/dev` (the view of the process's namespace).
pub fn net_dev(pid: u32, iface: &str) -> Result<NetDevCounters, Error> {
    let path = format!("/proc/{pid}/net/dev");
    let text = read(Path::new(&path))?;
    parse_net_dev(&text).remove(iface).ok_or_else(|| Error::Parse {
        what: path,
        source: ParseError::Missing(format!("interface {iface}")),
    })
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
        if let Some(index) = parse_vcpu_comm(&comm) {
            threads.push(VcpuThread { index, tid, comm });
        }
    }
    threads.sort_by_key(|t| t.index);
    Ok(threads)
}

fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| io_error("reading", path, source))
}
