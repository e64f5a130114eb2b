//! Fixture trees for the Linux backend's tests: a temporary directory laid out like `/proc` and
//! `/sys`, so that every parser and every write is exercised on files the test controls, on any
//! machine, without root. Process and thread ids in fixtures are above Linux's largest pid, so
//! that nothing a test does (affinity, perf, uclamp) can reach a real process.

use std::path::PathBuf;

/// A temporary tree, removed on drop.
#[derive(Debug)]
pub(crate) struct Tree {
    dir: tempfile::TempDir,
}

/// The first fake pid: above `PID_MAX_LIMIT` (4194304), so never a real process.
pub(crate) const FAKE_PID: u32 = 5_000_000;

impl Tree {
    pub(crate) fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("a temporary directory") }
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes `content` to `rel`, creating directories.
    pub(crate) fn write(&self, rel: &str, content: &str) {
        let path = self.path(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("fixture directories");
        }
        std::fs::write(&path, content).expect("fixture file");
    }

    pub(crate) fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).expect("fixture file").trim().to_owned()
    }

    pub(crate) fn remove(&self, rel: &str) {
        std::fs::remove_file(self.path(rel)).expect("fixture file to remove");
    }

    /// `sys/devices/system/cpu/cpuN/cpufreq` for `cpus` CPUs under the governor `governor`,
    /// with `frequencies` (kHz, as sysfs lists them) or only cpuinfo min/max when empty.
    pub(crate) fn cpufreq(&self, cpus: usize, driver: &str, governors: &str, frequencies: &[u64]) {
        let min = frequencies.iter().min().copied().unwrap_or(800_000);
        let max = frequencies.iter().max().copied().unwrap_or(3_000_000);
        for cpu in 0..cpus {
            let d = format!("sys/devices/system/cpu/cpu{cpu}/cpufreq");
            self.write(&format!("{d}/scaling_driver"), &format!("{driver}\n"));
            self.write(&format!("{d}/scaling_governor"), "schedutil\n");
            self.write(&format!("{d}/scaling_available_governors"), &format!("{governors}\n"));
            if !frequencies.is_empty() {
                let list: Vec<String> = frequencies.iter().map(u64::to_string).collect();
                self.write(
                    &format!("{d}/scaling_available_frequencies"),
                    &format!("{} \n", list.join(" ")),
                );
            }
            self.write(&format!("{d}/cpuinfo_min_freq"), &format!("{min}\n"));
            self.write(&format!("{d}/cpuinfo_max_freq"), &format!("{max}\n"));
            self.write(&format!("{d}/scaling_min_freq"), &format!("{min}\n"));
            self.write(&format!("{d}/scaling_max_freq"), &format!("{max}\n"));
            self.write(&format!("{d}/scaling_cur_freq"), &format!("{max}\n"));
            self.write(&format!("{d}/scaling_setspeed"), "<unsupported>\n");
        }
    }

    /// A `proc` tree with `cpus` CPUs in `stat` and `cpuinfo`.
    pub(crate) fn proc_basics(&self, cpus: usize) {
        let mut stat = String::from("cpu  0 0 0 0 0 0 0 0 0 0\n");
        let mut cpuinfo = String::new();
        for cpu in 0..cpus {
            stat.push_str(&format!("cpu{cpu} 100 0 100 800 0 0 0 0 0 0\n"));
            cpuinfo.push_str(&format!(
                "processor\t: {cpu}\nmodel name\t: Test CPU  9000\ncpu MHz\t\t: 2400.000\n\n"
            ));
        }
        stat.push_str("intr 0\nctxt 0\n");
        self.write("proc/stat", &stat);
        self.write("proc/cpuinfo", &cpuinfo);
        self.write("proc/self/schedstat", "1 2 3\n");
        self.write("proc/self/io", &io(0, 0, 0, 0));
        self.write("proc/sys/kernel/perf_event_paranoid", "2\n");
    }

    /// A QEMU process `pid` with `args` (after argv[0]) and vCPU threads `tids` (vCPU i is
    /// `tids[i]`), plus its main thread.
    pub(crate) fn qemu(&self, pid: u32, start_time: u64, args: &[&str], tids: &[u32]) {
        let mut cmdline = String::from("/usr/bin/qemu-system-x86_64\0");
        for a in args {
            cmdline.push_str(a);
            cmdline.push('\0');
        }
        let p = format!("proc/{pid}");
        self.write(&format!("{p}/cmdline"), &cmdline);
        self.write(&format!("{p}/stat"), &stat_line(pid, "qemu-system-x86", start_time, 0));
        self.write(&format!("{p}/io"), &io(0, 0, 0, 0));
        self.write(&format!("{p}/net/dev"), &net_dev(&[]));
        self.thread(pid, pid, "qemu-system-x86", 0);
        for (vcpu, &tid) in tids.iter().enumerate() {
            self.thread(pid, tid, &format!("CPU {vcpu}/KVM"), 0);
        }
    }

    /// A thread `tid` of `pid` named `comm`, last on `cpu`, that has run for nothing yet.
    pub(crate) fn thread(&self, pid: u32, tid: u32, comm: &str, cpu: u32) {
        let t = format!("proc/{pid}/task/{tid}");
        self.write(&format!("{t}/comm"), &format!("{comm}\n"));
        self.write(&format!("{t}/stat"), &stat_line(tid, comm, 1, cpu));
        self.write(&format!("{t}/schedstat"), "0 0 0\n");
        self.write(&format!("{t}/status"), "Name:\tx\nCpus_allowed_list:\t0-3\n");
    }
}

/// A `stat` line with `start_time` in field 22 and `cpu` in field 39.
pub(crate) fn stat_line(pid: u32, comm: &str, start_time: u64, cpu: u32) -> String {
    let mut fields = vec!["0".to_owned(); 50];
    fields[0] = "S".into();
    fields[19] = start_time.to_string();
    fields[36] = cpu.to_string();
    format!("{pid} ({comm}) {}\n", fields.join(" "))
}

/// A `/proc/PID/io`.
pub(crate) fn io(syscr: u64, syscw: u64, read_bytes: u64, write_bytes: u64) -> String {
    format!(
        "rchar: {}\nwchar: {}\nsyscr: {syscr}\nsyscw: {syscw}\nread_bytes: {read_bytes}\n\
         write_bytes: {write_bytes}\ncancelled_write_bytes: 0\n",
        read_bytes + 17,
        write_bytes + 3
    )
}

/// A `/proc/PID/net/dev` with `lo` and `(name, rx_bytes, rx_packets, tx_bytes, tx_packets)`
/// per interface.
pub(crate) fn net_dev(ifaces: &[(&str, u64, u64, u64, u64)]) -> String {
    let mut s = String::from(
        "Inter-|   Receive                                                |  Transmit\n \
         face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs \
         drop fifo colls carrier compressed\n    lo:  100  1  0 0 0 0 0 0  100  1  0 0 0 0 0 0\n",
    );
    for (name, rb, rp, tb, tp) in ifaces {
        s.push_str(&format!("{name:>6}: {rb} {rp} 0 0 0 0 0 0 {tb} {tp} 0 0 0 0 0 0\n"));
    }
    s
}
