//! The agent's configuration: one TOML file, every field checked, flags and environment on top
//! (the binary merges them). Unknown fields are errors that name the file and the field, so a
//! typo never silently falls back to a default.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmgov_proto::{Objective, Thresholds};
use vmgov_sim::governor::GovernorKind;

use crate::{
    agent::LocalThresholds,
    arbiter::ArbiterPolicy,
    verify::{PlanError, VerifyPlan},
};

/// Which platform backend drives the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformKind {
    /// The simulated host.
    #[default]
    Sim,
    /// The real Linux host.
    Linux,
}

/// Learning mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LearningConfig {
    /// Slices at each P-state below f_max.
    #[serde(default = "default_dwell")]
    pub dwell_slices: u32,
    /// Slices of each f_max reference window.
    #[serde(default = "default_reference")]
    pub reference_slices: u32,
    /// Stop after this many labelled samples.
    #[serde(default)]
    pub max_samples: Option<u64>,
}

const fn default_dwell() -> u32 {
    50
}

const fn default_reference() -> u32 {
    20
}

impl Default for LearningConfig {
    fn default() -> Self {
        Self {
            dwell_slices: default_dwell(),
            reference_slices: default_reference(),
            max_samples: None,
        }
    }
}

/// `[verify]`: the verification windows that measure what each VM's P-state really costs it
/// (see [`crate::verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Length of a cycle, slices; 0 turns verification off.
    pub every_slices: u32,
    /// Slices at the VM's own choice, between the two references.
    pub measured_slices: u32,
    /// Slices of each f_max reference.
    pub reference_slices: u32,
    /// Keep a VM that fell short of its thresholds at P-states that could meet them, whatever
    /// the model predicts; false only reports the misses.
    pub guard: bool,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        let p = VerifyPlan::default();
        Self {
            every_slices: p.every_slices,
            measured_slices: p.measured_slices,
            reference_slices: p.reference_slices,
            guard: true,
        }
    }
}

impl VerifyConfig {
    /// The plan, `None` when verification is off.
    pub fn plan(self) -> Result<Option<VerifyPlan>, PlanError> {
        if self.every_slices == 0 {
            return Ok(None);
        }
        VerifyPlan {
            every_slices: self.every_slices,
            measured_slices: self.measured_slices,
            reference_slices: self.reference_slices,
        }
        .validate()
        .map(Some)
    }
}

/// The simulated host to run on (`platform = "sim"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfigFile {
    /// Hardware class: built-in name or file.
    #[serde(default = "default_class")]
    pub class: String,
    /// One VM per workload (built-in names or files).
    #[serde(default)]
    pub workloads: Vec<String>,
    /// vCPUs per VM.
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Noise seed.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Counter noise (relative standard deviation).
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// Workload length scale.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Run at this many times real time (none: as fast as the agent can go).
    #[serde(default)]
    pub speed: Option<f64>,
}

fn default_class() -> String {
    "phenom-9500".into()
}

const fn default_vcpus() -> u32 {
    2
}

const fn default_seed() -> u64 {
    1
}

const fn default_noise() -> f64 {
    0.01
}

const fn default_scale() -> f64 {
    1.0
}

impl Default for SimConfigFile {
    fn default() -> Self {
        Self {
            class: default_class(),
            workloads: Vec::new(),
            vcpus: default_vcpus(),
            seed: default_seed(),
            noise: default_noise(),
            scale: default_scale(),
            speed: None,
        }
    }
}

/// Where the Linux backend looks (`platform = "linux"`); other roots serve fixture trees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxConfig {
    /// The proc filesystem.
    #[serde(default = "default_proc")]
    pub proc_root: PathBuf,
    /// The sys filesystem.
    #[serde(default = "default_sys")]
    pub sys_root: PathBuf,
    /// Hardware class name to report (models are keyed by it).
    #[serde(default)]
    pub hardware_class: Option<String>,
}

fn default_proc() -> PathBuf {
    "/proc".into()
}

fn default_sys() -> PathBuf {
    "/sys".into()
}

impl Default for LinuxConfig {
    fn default() -> Self {
        Self { proc_root: default_proc(), sys_root: default_sys(), hardware_class: None }
    }
}

/// The agent's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Host id reported to the coordinator (defaults to the host name).
    #[serde(default)]
    pub host_id: Option<String>,
    /// Backend.
    #[serde(default)]
    pub platform: PlatformKind,
    /// Timeslice, milliseconds.
    #[serde(default = "default_timeslice_ms")]
    pub timeslice_ms: f64,
    /// Shadow mode.
    #[serde(default)]
    pub dry_run: bool,
    /// Arbiter policy.
    #[serde(default)]
    pub arbiter: ArbiterPolicy,
    /// Governor for VMs without a model or thresholds.
    #[serde(default = "default_fallback")]
    pub fallback_governor: String,
    /// What decisions minimise.
    #[serde(default)]
    pub objective: Objective,
    /// Write one JSON line per VM per slice here (`-` for standard output).
    #[serde(default)]
    pub emit_samples: Option<String>,
    /// A model file (JSON, as `vmgov models show --output json` writes) to start with.
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Thresholds set on this host.
    #[serde(default)]
    pub thresholds: ThresholdsConfig,
    /// Learning mode from the start.
    #[serde(default)]
    pub learning: Option<LearningConfig>,
    /// Verification windows.
    #[serde(default)]
    pub verify: VerifyConfig,
    /// Simulated host.
    #[serde(default)]
    pub sim: SimConfigFile,
    /// Linux host.
    #[serde(default)]
    pub linux: LinuxConfig,
    /// The coordinators to connect to, comma-separated (e.g. `http://10.0.0.5:7700`); the link
    /// moves to the next when one fails. None runs the agent alone.
    #[serde(default)]
    pub coordinator: Option<String>,
    /// Where the last model and thresholds and unsent samples are kept.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

fn default_cache_dir() -> PathBuf {
    "/var/lib/vmgov-agent".into()
}

/// `[thresholds]`: a default and per-VM entries (by UUID or name).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsConfig {
    /// For every VM.
    #[serde(default)]
    pub default: Option<Thresholds>,
    /// Per VM.
    #[serde(default)]
    pub vm: BTreeMap<String, Thresholds>,
}

impl From<&ThresholdsConfig> for LocalThresholds {
    fn from(t: &ThresholdsConfig) -> Self {
        Self { default: t.default, vm: t.vm.clone() }
    }
}

const fn default_timeslice_ms() -> f64 {
    10.0
}

fn default_fallback() -> String {
    "performance".into()
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            host_id: None,
            platform: PlatformKind::default(),
            timeslice_ms: default_timeslice_ms(),
            dry_run: false,
            arbiter: ArbiterPolicy::default(),
            fallback_governor: default_fallback(),
            objective: Objective::default(),
            emit_samples: None,
            model: None,
            thresholds: ThresholdsConfig::default(),
            learning: None,
            verify: VerifyConfig::default(),
            sim: SimConfigFile::default(),
            linux: LinuxConfig::default(),
            coordinator: None,
            cache_dir: default_cache_dir(),
        }
    }
}

/// A configuration that could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this struct (the message names the field).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl AgentConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let config: Self = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| Err(ConfigError::Invalid { field, problem });
        if !(self.timeslice_ms.is_finite() && (1.0..=1000.0).contains(&self.timeslice_ms)) {
            return invalid(
                "timeslice_ms",
                format!("{} ms is outside 1 to 1000", self.timeslice_ms),
            );
        }
        if let Err(e) = self.fallback_governor.parse::<GovernorKind>() {
            return invalid("fallback_governor", e.to_string());
        }
        if let Some(l) = &self.learning
            && (l.dwell_slices < 2 || l.reference_slices < 2)
        {
            return invalid(
                "learning",
                "dwell_slices and reference_slices must be at least 2".into(),
            );
        }
        if let Err(e) = self.verify.plan() {
            return invalid("verify", e.to_string());
        }
        if !(self.sim.scale.is_finite() && self.sim.scale > 0.0) {
            return invalid("sim.scale", format!("{} must be a positive number", self.sim.scale));
        }
        if let Some(speed) = self.sim.speed
            && !(speed.is_finite() && speed > 0.0)
        {
            return invalid("sim.speed", format!("{speed} must be a positive number"));
        }
        if let Some(c) = &self.coordinator
            && let Some(bad) = c
                .split(',')
                .map(str::trim)
                .find(|c| !(c.starts_with("http://") || c.starts_with("https://")))
        {
            return invalid(
                "coordinator",
                format!(
                    "{bad:?} must be a URL such as http://10.0.0.5:7700 (several: comma-separated)"
                ),
            );
        }
        if !(self.sim.noise.is_finite() && (0.0..1.0).contains(&self.sim.noise)) {
            return invalid("sim.noise", format!("{} must be in [0, 1)", self.sim.noise));
        }
        Ok(())
    }

    /// The fallback governor.
    pub fn fallback(&self) -> GovernorKind {
        self.fallback_governor.parse().unwrap_or(GovernorKind::Performance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let c: AgentConfig = toml::from_str(text)
            .map_err(|source| ConfigError::Parse { path: "agent.toml".into(), source })?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn a_full_file_parses() {
        let c = parse(
            r#"
            host_id = "kvm-17"
            platform = "linux"
            timeslice_ms = 20
            dry_run = true
            arbiter = "max"
            fallback_governor = "schedutil"
            objective = "edp"
            emit_samples = "-"
            [thresholds]
            default = { perf = 0.7, throughput = 0.7 }
            vm.web = { perf = 0.4, throughput = 0.9 }
            [learning]
            dwell_slices = 30
            [verify]
            every_slices = 300
            guard = false
            [linux]
            sys_root = "/tmp/fixture/sys"
            "#,
        )
        .unwrap();
        assert_eq!(c.platform, PlatformKind::Linux);
        assert_eq!(c.arbiter, ArbiterPolicy::Max);
        assert_eq!(c.fallback(), GovernorKind::Schedutil);
        assert_eq!(c.objective, Objective::Edp);
        assert_eq!(c.learning.as_ref().unwrap().reference_slices, 20);
        let plan = c.verify.plan().unwrap().unwrap();
        assert_eq!((plan.every_slices, plan.measured_slices), (300, 20));
        assert!(!c.verify.guard && AgentConfig::default().verify.guard);
        assert_eq!(parse("[verify]\nevery_slices = 0").unwrap().verify.plan().unwrap(), None);
        assert_eq!(c.linux.proc_root, PathBuf::from("/proc"));
        let t = LocalThresholds::from(&c.thresholds);
        assert!((t.vm["web"].perf() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("timeslce_ms = 10").unwrap_err().to_string();
        assert!(e.contains("agent.toml") && e.contains("timeslce_ms"), "{e}");
        let e = parse("timeslice_ms = 0.1").unwrap_err().to_string();
        assert!(e.contains("timeslice_ms"), "{e}");
        let e = parse("fallback_governor = \"turbo\"").unwrap_err().to_string();
        assert!(e.contains("fallback_governor") && e.contains("schedutil"), "{e}");
        let e = parse("[thresholds]\ndefault = { perf = 70, throughput = 0.7 }")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fraction"), "{e}");
        let e = parse("arbiter = \"random\"").unwrap_err().to_string();
        assert!(e.contains("arbiter"), "{e}");
        let e = parse("[verify]\nevery_slices = 20").unwrap_err().to_string();
        assert!(e.contains("verify") && e.contains("do not fit"), "{e}");
    }
}
