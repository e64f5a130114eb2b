//! Workload profiles of the simulated host, as data files (TOML) users can write.
//!
//! A workload is a sequence of phases. Each phase says how the VM's busy threads execute
//! (core cycles per instruction, and the frequency-independent memory stall per instruction),
//! what they make the counters see (misses and accesses per kilo-instruction, DRAM bytes), and
//! optionally disk I/O (closed loop: a thread blocks on the device) and network serving (open
//! loop: requests arrive at a rate whatever the frequency, and throughput falls only when the
//! vCPUs cannot keep up). A batch phase ends after a number of instructions, a server phase after
//! a duration. The shipped profiles are in `node-agent/sim/workloads/`, each with its sources.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Disk behaviour of a phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskParams {
    /// Reads per second the phase issues when running alone at f_max.
    #[serde(default)]
    pub reads_per_s: f64,
    /// Bytes per read.
    #[serde(default)]
    pub read_bytes: f64,
    /// Writes per second when running alone at f_max.
    #[serde(default)]
    pub writes_per_s: f64,
    /// Bytes per write.
    #[serde(default)]
    pub write_bytes: f64,
    /// Device service time per request, seconds: the issuing thread blocks meanwhile.
    pub service_time_s: f64,
    /// CPU cycles the guest spends per request (driver, syscalls, copies).
    pub cycles_per_io: f64,
}

/// Network serving behaviour of a phase: an open-loop request stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkParams {
    /// Requests arriving per second (whatever the frequency).
    pub requests_per_s: f64,
    /// CPU cycles per request at the phase's core CPI (memory stall comes on top).
    pub cycles_per_request: f64,
    /// Bytes and packets received per request.
    pub rx_bytes_per_request: f64,
    /// Packets received per request.
    pub rx_packets_per_request: f64,
    /// Bytes sent per request.
    pub tx_bytes_per_request: f64,
    /// Packets sent per request.
    pub tx_packets_per_request: f64,
}

/// One phase of a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Name for reports.
    pub name: String,
    /// The phase ends after this many instructions (summed over its threads)...
    #[serde(default)]
    pub instructions: Option<f64>,
    /// ...or after this many seconds.
    #[serde(default)]
    pub duration_s: Option<f64>,
    /// Busy threads (each on its own vCPU); at most the VM's vCPUs.
    #[serde(default = "one")]
    pub threads: u32,
    /// Core cycles per instruction that scale with the clock.
    pub cpi_core: f64,
    /// Memory stall per instruction with an otherwise idle memory system, nanoseconds. It does
    /// not scale with the clock and grows with the socket's bandwidth load.
    #[serde(default)]
    pub mem_stall_ns: f64,
    /// L2 misses per kilo-instruction.
    #[serde(default)]
    pub l2_mpki: f64,
    /// L3 misses per kilo-instruction.
    #[serde(default)]
    pub l3_mpki: f64,
    /// Memory accesses per kilo-instruction.
    #[serde(default)]
    pub mem_apki: f64,
    /// DRAM traffic per instruction, bytes (reads and write-backs).
    #[serde(default)]
    pub dram_bytes_per_instruction: f64,
    /// Disk I/O, if any.
    #[serde(default)]
    pub disk: Option<DiskParams>,
    /// Network serving, if any.
    #[serde(default)]
    pub network: Option<NetworkParams>,
}

const fn one() -> u32 {
    1
}

/// A workload profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Name, e.g. "470.lbm".
    pub name: String,
    /// What it models and where its numbers come from.
    #[serde(default)]
    pub description: String,
    /// Phases, run in order.
    pub phases: Vec<Phase>,
    /// How many times the phases run, in order (a duty cycle or a bursty server written once).
    #[serde(default = "one")]
    pub repeat: u32,
}

/// Most phases a workload may run, repetitions included.
pub const MAX_REPEAT: u32 = 100_000;

/// A workload file that could not be used.
#[derive(Debug, Error)]
pub enum WorkloadError {
    /// The file could not be read.
    #[error("reading workload {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid workload.
    #[error("parsing workload {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("workload {workload}, phase {phase:?}: {problem}")]
    Invalid {
        /// The workload.
        workload: String,
        /// The phase.
        phase: String,
        /// What is wrong.
        problem: String,
    },
    /// No built-in workload of that name.
    #[error("no built-in workload {0:?}; built-in: {known}", known = builtin_names().join(", "))]
    Unknown(String),
}

macro_rules! builtin {
    ($($name:literal => $file:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../../workloads/", $file)))),*]
    };
}

/// The report's evaluation workloads.
const EVALUATION: &[(&str, &str)] = builtin! {
    "444.namd" => "444.namd.toml",
    "450.soplex" => "450.soplex.toml",
    "456.hmmer" => "456.hmmer.toml",
    "462.libquantum" => "462.libquantum.toml",
    "470.lbm" => "470.lbm.toml",
    "bonnie++" => "bonnie++.toml",
    "httperf-10" => "httperf-10.toml",
    "httperf-200" => "httperf-200.toml",
    "httperf-500" => "httperf-500.toml",
};

/// The training suite: synthetic micro-workloads, never the evaluation ones.
const TRAINING: &[(&str, &str)] = builtin! {
    "train-cpu" => "training/train-cpu.toml",
    "train-mem-light" => "training/train-mem-light.toml",
    "train-mem-medium" => "training/train-mem-medium.toml",
    "train-mem-heavy" => "training/train-mem-heavy.toml",
    "train-disk-read" => "training/train-disk-read.toml",
    "train-disk-write" => "training/train-disk-write.toml",
    "train-net-50" => "training/train-net-50.toml",
    "train-net-300" => "training/train-net-300.toml",
    "train-net-800" => "training/train-net-800.toml",
    "train-mix" => "training/train-mix.toml",
};

/// The held-out suite: written from published characterisations, deliberately unlike the
/// training suite, never trained on; the lab judges the model on it.
const HELD_OUT: &[(&str, &str)] = builtin! {
    "ho-429.mcf" => "held-out/ho-429.mcf.toml",
    "ho-gups" => "held-out/ho-gups.toml",
    "ho-453.povray" => "held-out/ho-453.povray.toml",
    "ho-471.omnetpp-llc" => "held-out/ho-471.omnetpp-llc.toml",
    "ho-403.gcc" => "held-out/ho-403.gcc.toml",
    "ho-memcached-burst" => "held-out/ho-memcached-burst.toml",
    "ho-pgbench" => "held-out/ho-pgbench.toml",
    "ho-sysbench-timed" => "held-out/ho-sysbench-timed.toml",
    "ho-stream-2t" => "held-out/ho-stream-2t.toml",
};

/// Names of the report's evaluation workloads.
pub fn evaluation_names() -> Vec<&'static str> {
    EVALUATION.iter().map(|(n, _)| *n).collect()
}

/// Names of the training suite.
pub fn training_names() -> Vec<&'static str> {
    TRAINING.iter().map(|(n, _)| *n).collect()
}

/// Names of the held-out suite.
pub fn held_out_names() -> Vec<&'static str> {
    HELD_OUT.iter().map(|(n, _)| *n).collect()
}

/// Every built-in workload name.
pub fn builtin_names() -> Vec<&'static str> {
    EVALUATION.iter().chain(TRAINING).chain(HELD_OUT).map(|(n, _)| *n).collect()
}

impl Workload {
    /// A built-in workload by name.
    pub fn builtin(name: &str) -> Result<Self, WorkloadError> {
        let (_, text) = EVALUATION
            .iter()
            .chain(TRAINING)
            .chain(HELD_OUT)
            .find(|(n, _)| *n == name)
            .ok_or_else(|| WorkloadError::Unknown(name.into()))?;
        Self::parse(text, Path::new(name))
    }

    /// A built-in workload by name, or a workload file by path.
    pub fn load(name_or_path: &str) -> Result<Self, WorkloadError> {
        if builtin_names().contains(&name_or_path) {
            return Self::builtin(name_or_path);
        }
        let path = Path::new(name_or_path);
        let text = super::read_definition(name_or_path).map_err(|e| match e {
            super::DefinitionRead::Unknown => WorkloadError::Unknown(name_or_path.into()),
            super::DefinitionRead::Io(source) => WorkloadError::Read { path: path.into(), source },
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates a workload; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Self, WorkloadError> {
        let w: Self = toml::from_str(text)
            .map_err(|source| WorkloadError::Parse { path: origin.into(), source })?;
        w.validate()?;
        Ok(w)
    }

    /// Checks every phase.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        let invalid = |phase: &str, problem: String| WorkloadError::Invalid {
            workload: self.name.clone(),
            phase: phase.to_owned(),
            problem,
        };
        if self.phases.is_empty() {
            return Err(invalid("-", "a workload needs at least one phase".into()));
        }
        let runs = u64::from(self.repeat) * self.phases.len() as u64;
        if self.repeat == 0 || runs > u64::from(MAX_REPEAT) {
            return Err(invalid(
                "-",
                format!(
                    "repeat = {} with {} phases: at least 1, and at most {MAX_REPEAT} phases run in all",
                    self.repeat,
                    self.phases.len()
                ),
            ));
        }
        for p in &self.phases {
            let check = |what: &str, v: f64, ok: bool| {
                if v.is_finite() && ok {
                    Ok(())
                } else {
                    Err(invalid(&p.name, format!("{what} = {v} is out of range")))
                }
            };
            match (p.instructions, p.duration_s) {
                (Some(n), None) => check("instructions", n, n > 0.0)?,
                (None, Some(d)) => check("duration_s", d, d > 0.0)?,
                _ => {
                    return Err(invalid(
                        &p.name,
                        "give exactly one of instructions or duration_s".into(),
                    ));
                }
            }
            if p.network.is_some() && p.duration_s.is_none() {
                return Err(invalid(&p.name, "a serving phase ends after duration_s".into()));
            }
            if !(1..=64).contains(&p.threads) {
                return Err(invalid(&p.name, format!("threads = {} must be 1 to 64", p.threads)));
            }
            check("cpi_core", p.cpi_core, p.cpi_core > 0.0 && p.cpi_core < 100.0)?;
            for (what, v) in [
                ("mem_stall_ns", p.mem_stall_ns),
                ("l2_mpki", p.l2_mpki),
                ("l3_mpki", p.l3_mpki),
                ("mem_apki", p.mem_apki),
                ("dram_bytes_per_instruction", p.dram_bytes_per_instruction),
            ] {
                check(what, v, v >= 0.0)?;
            }
            if let Some(d) = &p.disk {
                for (what, v) in [
                    ("disk.reads_per_s", d.reads_per_s),
                    ("disk.read_bytes", d.read_bytes),
                    ("disk.writes_per_s", d.writes_per_s),
                    ("disk.write_bytes", d.write_bytes),
                    ("disk.service_time_s", d.service_time_s),
                    ("disk.cycles_per_io", d.cycles_per_io),
                ] {
                    check(what, v, v >= 0.0)?;
                }
            }
            if let Some(n) = &p.network {
                check("network.requests_per_s", n.requests_per_s, n.requests_per_s >= 0.0)?;
                check(
                    "network.cycles_per_request",
                    n.cycles_per_request,
                    n.cycles_per_request > 0.0,
                )?;
                for (what, v) in [
                    ("network.rx_bytes_per_request", n.rx_bytes_per_request),
                    ("network.rx_packets_per_request", n.rx_packets_per_request),
                    ("network.tx_bytes_per_request", n.tx_bytes_per_request),
                    ("network.tx_packets_per_request", n.tx_packets_per_request),
                ] {
                    check(what, v, v >= 0.0)?;
                }
            }
        }
        Ok(())
    }

    /// The same workload `factor` times as long: for quick runs whose ratios match the full
    /// ones. A repeated workload keeps its phases' lengths and repeats fewer times while it can
    /// (so its phases change as fast as in the full run); the rest scales every phase.
    #[must_use]
    pub fn scaled(&self, factor: f64) -> Self {
        let mut w = self.clone();
        let total = f64::from(self.repeat) * factor;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "clamped")]
        let repeat = total.round().clamp(1.0, f64::from(self.repeat.max(1))) as u32;
        w.repeat = repeat;
        let factor = total / f64::from(repeat);
        for p in &mut w.phases {
            p.instructions = p.instructions.map(|n| n * factor);
            p.duration_s = p.duration_s.map(|d| d * factor);
        }
        w
    }

    /// The same workload run as `copies` copies side by side in one VM (SPECrate-style): every
    /// phase that does not serve requests gets `copies` times the threads and, if it ends after
    /// its instructions, `copies` times the instructions; serving phases keep their workers.
    /// The name says how many copies run.
    #[must_use]
    pub fn copies(&self, copies: u32) -> Self {
        let mut w = self.clone();
        if copies <= 1 {
            return w;
        }
        w.name = format!("{}-x{copies}", self.name);
        for p in w.phases.iter_mut().filter(|p| p.network.is_none()) {
            p.threads = p.threads.saturating_mul(copies);
            p.instructions = p.instructions.map(|n| n * f64::from(copies));
        }
        w
    }

    /// True when some phase serves network requests (its result is a throughput).
    pub fn is_server(&self) -> bool {
        self.phases.iter().any(|p| p.network.is_some())
    }

    /// The phases in the order they run, repetitions included.
    pub fn phase_sequence(&self) -> impl Iterator<Item = &Phase> {
        (0..self.repeat).flat_map(|_| self.phases.iter())
    }

    /// Most threads any phase uses.
    pub fn max_threads(&self) -> u32 {
        self.phases.iter().map(|p| p.threads).max().unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_workload_is_valid() {
        for name in builtin_names() {
            let w = Workload::builtin(name).unwrap();
            assert_eq!(w.name, name);
        }
        assert!(Workload::builtin("httperf-500").unwrap().is_server());
        assert!(!Workload::builtin("470.lbm").unwrap().is_server());
    }

    #[test]
    fn training_and_evaluation_never_overlap() {
        let eval = evaluation_names();
        let held_out = held_out_names();
        assert!(training_names().iter().all(|t| !eval.contains(t) && !held_out.contains(t)));
        assert!(held_out.iter().all(|h| !eval.contains(h)));
        assert!(held_out.len() >= 8);
    }

    /// Every held-out profile says where its numbers come from.
    #[test]
    fn every_held_out_workload_cites_its_sources() {
        for (name, text) in HELD_OUT {
            let header: String =
                text.lines().take_while(|l| l.starts_with('#')).collect::<Vec<_>>().join("\n");
            assert!(
                header.contains("Source") && header.len() > 300,
                "{name}: the file must open with its sources"
            );
        }
    }

    #[test]
    fn a_repeated_workload_runs_its_phases_in_turn_and_scales_by_repeating_less() {
        let text = r#"
            name = "duty"
            repeat = 50
            [[phases]]
            name = "on"
            duration_s = 2
            cpi_core = 1.0
            [[phases]]
            name = "off"
            duration_s = 3
            cpi_core = 1.0
        "#;
        let w = Workload::parse(text, Path::new("duty.toml")).unwrap();
        let names: Vec<&str> = w.phase_sequence().map(|p| p.name.as_str()).take(4).collect();
        assert_eq!(names, ["on", "off", "on", "off"]);
        assert_eq!(w.phase_sequence().count(), 100);
        let quick = w.scaled(0.1);
        assert_eq!(quick.repeat, 5);
        assert_eq!(quick.phases[0].duration_s, Some(2.0));
        let tiny = w.scaled(0.01);
        assert_eq!(tiny.repeat, 1);
        assert!((tiny.phases[1].duration_s.unwrap() - 1.5).abs() < 1e-12);
        let e = Workload::parse(&text.replace("50", "0"), Path::new("d.toml")).unwrap_err();
        assert!(e.to_string().contains("repeat"), "{e}");
        let e = Workload::parse(&text.replace("50", "60000"), Path::new("d.toml")).unwrap_err();
        assert!(e.to_string().contains("100000"), "{e}");
    }

    #[test]
    fn bad_profiles_say_what_is_wrong() {
        let base = r#"
            name = "w"
            [[phases]]
            name = "p"
            instructions = 1e9
            cpi_core = 1.0
        "#;
        assert!(Workload::parse(base, Path::new("w.toml")).is_ok());
        let both = base.replace("cpi_core", "duration_s = 3\ncpi_core");
        let err = Workload::parse(&both, Path::new("w.toml")).unwrap_err().to_string();
        assert!(err.contains("exactly one"), "{err}");
        let negative = base.replace("cpi_core = 1.0", "cpi_core = 1.0\nmem_stall_ns = -1");
        let err = Workload::parse(&negative, Path::new("w.toml")).unwrap_err().to_string();
        assert!(err.contains("mem_stall_ns"), "{err}");
        let typo = base.replace("cpi_core", "cpi_cor");
        assert!(matches!(
            Workload::parse(&typo, Path::new("w.toml")),
            Err(WorkloadError::Parse { .. })
        ));
        let server = base.replace("cpi_core = 1.0", "cpi_core = 1.0\n[phases.network]\nrequests_per_s = 1\ncycles_per_request = 1\nrx_bytes_per_request = 1\nrx_packets_per_request = 1\ntx_bytes_per_request = 1\ntx_packets_per_request = 1");
        let err = Workload::parse(&server, Path::new("w.toml")).unwrap_err().to_string();
        assert!(err.contains("duration_s"), "{err}");
    }
}
