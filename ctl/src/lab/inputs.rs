//! What the lab runs: the hardware class, the workloads (built-in, replaced or added by
//! `--workloads`), the scenarios and the thresholds. Every file is read and checked before
//! anything starts, and a bad one is named with the field at fault.
//!
//! The default scenarios, in three groups:
//! - **the report's**: every evaluation workload alone, and its Table 2 mixes;
//! - **held-out**: every workload of the held-out suite alone (never trained on, unlike the
//!   training suite by design: the headline of how the model generalises);
//! - **full hosts**: every core of the class filled with 2-vCPU VMs, each running its workload
//!   as two copies (SPECrate-style, so every core is busy, as a fleet's hosts run): a fixed
//!   seeded mix of the evaluation workloads, an all-memory-bound and an all-CPU-bound fill, and
//!   a mixed host at half its cores.
//!
//! `--scenarios FILE` replaces them all.
//!
//! `--workloads FILE`:
//!
//! ```toml
//! # Workload files (paths relative to this file) or built-in names. A file whose workload has
//! # a built-in's name replaces that built-in everywhere (training included); any other entry is
//! # added to the evaluation and run alone.
//! workloads = ["my-web.toml", "train-mix"]
//! ```
//!
//! `--scenarios FILE` (replaces the default scenarios):
//!
//! ```toml
//! thresholds = [70, 40]            # optional: fractions (0.7) or percentages (70)
//! [[scenario]]
//! name = "web and lbm"             # optional; default: the workloads joined with "+"
//! workloads = ["httperf-200", "470.lbm", "my-batch.toml"]
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use rand::{RngExt as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vmgov_sim::{
    HardwareClass, SimConfig, SimHost, VmSpec, Workload,
    host::workload::{builtin_names, evaluation_names, held_out_names, training_names},
};

/// vCPUs of every VM, as in the report.
pub(crate) const VCPUS: u32 = 2;

/// The report's thresholds (performance = throughput).
pub(crate) const DEFAULT_THRESHOLDS: [f64; 2] = [0.7, 0.4];

/// The report's multi-VM scenarios (its Table 2).
const TABLE2: [&[&str]; 5] = [
    &["444.namd", "444.namd"],
    &["444.namd", "470.lbm"],
    &["470.lbm", "470.lbm"],
    &["444.namd", "httperf-500", "bonnie++"],
    &["httperf-200", "bonnie++", "470.lbm"],
];

/// Seed of the full hosts' mix: fixed, so the same hosts run whatever `--seed` says.
const FULL_HOST_SEED: u64 = 2013;

/// Copies of its workload a full host's VM runs, one per vCPU.
const FULL_HOST_COPIES: u32 = VCPUS;

/// The evaluation workloads a memory-bound fill draws from (stall share 0.55-0.65 at f_max).
const MEMORY_BOUND: [&str; 3] = ["470.lbm", "462.libquantum", "450.soplex"];

/// The CPU-bound fill's workload (stall share 0.02).
const CPU_BOUND: [&str; 1] = ["444.namd"];

/// Which part of the report a scenario belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Group {
    /// The report's experiment (or the user's own scenarios).
    Report,
    /// The held-out suite, each workload alone.
    HeldOut,
    /// Hosts with every core (or half of them) given to VMs.
    FullHost,
}

impl Group {
    /// Every group, in report order.
    pub(crate) const ALL: [Self; 3] = [Self::Report, Self::HeldOut, Self::FullHost];

    /// Section title.
    pub(crate) const fn title(self) -> &'static str {
        match self {
            Self::Report => "The report's scenarios",
            Self::HeldOut => "Held-out workloads (never trained on)",
            Self::FullHost => "Full hosts",
        }
    }
}

/// One host's VMs, run under every governor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Scenario {
    /// Safe in file names, unique.
    pub id: String,
    /// For tables.
    pub title: String,
    /// One workload name per VM.
    pub workloads: Vec<String>,
    /// Where it was defined, for errors.
    pub origin: String,
    /// Its part of the report.
    pub group: Group,
}

impl Scenario {
    /// One VM alone on the host.
    pub(crate) fn single(&self) -> bool {
        self.workloads.len() == 1
    }
}

/// Everything the lab will run, checked.
#[derive(Debug, Clone)]
pub(crate) struct Inputs {
    /// The hardware class of every host.
    pub class: HardwareClass,
    /// Where it came from (a built-in name or a file).
    pub class_source: String,
    /// Every workload a scenario or the training suite names, unscaled, by name.
    pub workloads: BTreeMap<String, Workload>,
    /// Where each workload came from.
    pub origins: BTreeMap<String, String>,
    /// The training suite.
    pub training: Vec<String>,
    /// The scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// The thresholds every scenario is run at (fractions).
    pub thresholds: Vec<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadsFile {
    workloads: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenariosFile {
    #[serde(default)]
    thresholds: Option<Vec<f64>>,
    #[serde(default)]
    scenario: Vec<ScenarioEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioEntry {
    #[serde(default)]
    name: Option<String>,
    workloads: Vec<String>,
}

/// A name safe in file names: letters, digits, `.`, `_` and `-`.
pub(crate) fn file_safe(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "scenario".into() } else { s }
}

fn read(path: &Path, what: &str) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the {what} file {}", path.display()))
}

/// A workload named by an entry of `file`: a built-in name, or a path relative to `file`; and
/// where it came from.
fn resolve_entry(entry: &str, file: &Path) -> Result<(Workload, String)> {
    if builtin_names().contains(&entry) {
        return Ok((Workload::builtin(entry)?, "built-in".to_owned()));
    }
    let path = file.parent().map_or_else(|| PathBuf::from(entry), |d| d.join(entry));
    if !path.exists() {
        bail!(
            "{entry:?} is neither a built-in workload nor a file ({} does not exist); built-in: {}",
            path.display(),
            builtin_names().join(", ")
        );
    }
    let w = Workload::load(&path.to_string_lossy()).map_err(|e| anyhow!("{}", chain(&e)))?;
    Ok((w, path.display().to_string()))
}

/// An error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// A threshold given as a fraction (0.7) or a percentage (70), as a fraction.
fn threshold(v: f64) -> Option<f64> {
    let f = if v > 1.0 { v / 100.0 } else { v };
    (v.is_finite() && f > 0.0 && f <= 1.0).then_some(f)
}

/// Loads and checks the class, the workloads and the scenarios.
pub(crate) fn load(
    class: Option<&str>,
    workloads_file: Option<&Path>,
    scenarios_file: Option<&Path>,
    timeslice_s: f64,
) -> Result<Inputs> {
    let class_source = class.unwrap_or("phenom-9500").to_owned();
    let class = HardwareClass::load(&class_source).map_err(|e| {
        anyhow!(
            "hardware class {class_source}: {}; give a class file or a built-in name",
            chain(&e)
        )
    })?;

    let mut catalogue: BTreeMap<String, (Workload, String)> = BTreeMap::new();
    for name in builtin_names() {
        catalogue.insert(name.to_owned(), (Workload::builtin(name)?, "built-in".to_owned()));
    }
    let mut extras = Vec::new();
    if let Some(file) = workloads_file {
        let text = read(file, "workloads")?;
        let parsed: WorkloadsFile = toml::from_str(&text)
            .map_err(|e| anyhow!("workloads file {}: {}", file.display(), e.to_string().trim()))?;
        if parsed.workloads.is_empty() {
            bail!(
                "workloads file {}: `workloads` is empty; list workload files or built-in names",
                file.display()
            );
        }
        for (i, entry) in parsed.workloads.iter().enumerate() {
            let (w, origin) = resolve_entry(entry, file).map_err(|e| {
                anyhow!("workloads file {}: workloads[{i}] = {entry:?}: {e:#}", file.display())
            })?;
            let bare_builtin = builtin_names().contains(&entry.as_str());
            let replaces = !bare_builtin && builtin_names().contains(&w.name.as_str());
            if !replaces && !extras.contains(&w.name) {
                extras.push(w.name.clone());
            }
            catalogue.insert(w.name.clone(), (w, origin));
        }
    }

    let mut thresholds = DEFAULT_THRESHOLDS.to_vec();
    let scenarios = match scenarios_file {
        None => {
            let (scenarios, derived) = default_scenarios(&extras, &catalogue, class.cores);
            for w in derived {
                catalogue.insert(w.name.clone(), (w, "built-in, as copies".to_owned()));
            }
            scenarios
        }
        Some(file) => {
            let text = read(file, "scenarios")?;
            let parsed: ScenariosFile = toml::from_str(&text).map_err(|e| {
                anyhow!("scenarios file {}: {}", file.display(), e.to_string().trim())
            })?;
            if let Some(t) = &parsed.thresholds {
                if t.is_empty() {
                    bail!(
                        "scenarios file {}: `thresholds` is empty; give e.g. [70, 40]",
                        file.display()
                    );
                }
                thresholds = t
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        threshold(v).ok_or_else(|| {
                            anyhow!(
                                "scenarios file {}: thresholds[{i}] = {v} is not a fraction in (0, 1] or a percentage in (1, 100]",
                                file.display()
                            )
                        })
                    })
                    .collect::<Result<_>>()?;
            }
            if parsed.scenario.is_empty() {
                bail!(
                    "scenarios file {}: no [[scenario]] given; add e.g.\n[[scenario]]\nworkloads = [\"444.namd\", \"470.lbm\"]",
                    file.display()
                );
            }
            let mut out: Vec<Scenario> = Vec::new();
            for (i, s) in parsed.scenario.iter().enumerate() {
                let at = |field: &str| {
                    format!(
                        "scenarios file {}: scenario[{i}]{} {field}",
                        file.display(),
                        s.name.as_ref().map(|n| format!(" ({n:?})")).unwrap_or_default()
                    )
                };
                if s.workloads.is_empty() {
                    bail!("{}: a scenario needs at least one workload", at("workloads"));
                }
                let mut names = Vec::new();
                for (j, entry) in s.workloads.iter().enumerate() {
                    let name = match catalogue.get(entry) {
                        Some((w, _)) => w.name.clone(),
                        None => {
                            let (w, origin) = resolve_entry(entry, file).map_err(|e| {
                                anyhow!("{}[{j}] = {entry:?}: {e:#}", at("workloads"))
                            })?;
                            let name = w.name.clone();
                            catalogue.insert(name.clone(), (w, origin));
                            name
                        }
                    };
                    names.push(name);
                }
                let title = s.name.clone().unwrap_or_else(|| names.join(" + "));
                let id = file_safe(s.name.as_deref().unwrap_or(&names.join("+")));
                if let Some(other) = out.iter().find(|o| o.id == id) {
                    bail!(
                        "{}: {title:?} has the same name as {:?} once made safe for file names ({id}); give each scenario its own name",
                        at("name"),
                        other.title
                    );
                }
                let origin =
                    format!("scenarios file {}: scenario[{i}] ({title:?})", file.display());
                out.push(Scenario { id, title, workloads: names, origin, group: Group::Report });
            }
            out
        }
    };

    let training: Vec<String> = training_names().into_iter().map(str::to_owned).collect();
    let mut workloads = BTreeMap::new();
    let mut origins = BTreeMap::new();
    for name in scenarios.iter().flat_map(|s| s.workloads.iter()).chain(&training) {
        if let Some((w, origin)) = catalogue.get(name) {
            workloads.insert(name.clone(), w.clone());
            origins.insert(name.clone(), origin.clone());
        }
    }
    let inputs =
        Inputs { class, class_source, workloads, origins, training, scenarios, thresholds };
    // Build every host once now, so that a workload that does not fit (more threads than
    // vCPUs, say) stops the lab before it starts rather than halfway.
    let config = SimConfig { timeslice_s, ..SimConfig::default() };
    for s in &inputs.scenarios {
        SimHost::new(inputs.class.clone(), inputs.vms(&s.workloads, 1.0), config.clone()).map_err(
            |e| {
                let from: Vec<String> = s
                    .workloads
                    .iter()
                    .filter_map(|w| {
                        inputs
                            .origins
                            .get(w)
                            .filter(|o| *o != "built-in")
                            .map(|o| format!("{w} from {o}"))
                    })
                    .collect();
                let from = if from.is_empty() {
                    String::new()
                } else {
                    format!(" (workloads: {})", from.join(", "))
                };
                anyhow!("{}: {}{from}", s.origin, chain(&e))
            },
        )?;
    }
    for t in &inputs.training {
        SimHost::new(
            inputs.class.clone(),
            inputs.vms(std::slice::from_ref(t), 1.0),
            config.clone(),
        )
        .map_err(|e| anyhow!("training workload {t}: {}", chain(&e)))?;
    }
    Ok(inputs)
}

impl Inputs {
    /// The VMs of a host running `workloads`, each scaled by `scale`.
    pub(crate) fn vms(&self, workloads: &[String], scale: f64) -> Vec<VmSpec> {
        workloads
            .iter()
            .enumerate()
            .filter_map(|(i, name)| {
                let w = self.workloads.get(name)?;
                Some(VmSpec {
                    name: format!("vm{i}-{}", w.name),
                    vcpus: VCPUS,
                    affinity: None,
                    workload: w.scaled(scale),
                })
            })
            .collect()
    }

    /// The distinct workloads the scenarios run, in first-use order.
    pub(crate) fn evaluated(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self.scenarios.iter().flat_map(|s| s.workloads.iter()) {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }
}

fn alone(w: String, group: Group) -> Scenario {
    Scenario {
        id: file_safe(&w),
        title: format!("{w} alone"),
        origin: format!("the single-VM scenario of {w}"),
        workloads: vec![w],
        group,
    }
}

/// The default scenarios for a class of `cores` cores, and the workloads they derive from the
/// catalogue's (the full hosts' copies).
fn default_scenarios(
    extras: &[String],
    catalogue: &BTreeMap<String, (Workload, String)>,
    cores: usize,
) -> (Vec<Scenario>, Vec<Workload>) {
    let held_out = held_out_names();
    let mut out: Vec<Scenario> = evaluation_names()
        .into_iter()
        .map(str::to_owned)
        .chain(
            extras
                .iter()
                .filter(|e| {
                    !evaluation_names().contains(&e.as_str()) && !held_out.contains(&e.as_str())
                })
                .cloned(),
        )
        .map(|w| alone(w, Group::Report))
        .collect();
    for (i, set) in TABLE2.iter().enumerate() {
        let workloads: Vec<String> = set.iter().map(|s| (*s).to_owned()).collect();
        out.push(Scenario {
            id: format!("table2-{}", i + 1),
            title: format!("Table 2 #{}: {}", i + 1, workloads.join(" + ")),
            origin: format!("the report's Table 2 scenario {}", i + 1),
            workloads,
            group: Group::Report,
        });
    }
    out.extend(held_out.iter().map(|w| alone((*w).to_owned(), Group::HeldOut)));
    let (full, derived) = full_hosts(catalogue, cores);
    out.extend(full);
    (out, derived)
}

/// The full hosts of a class of `cores` cores: one 2-vCPU VM per two cores, each running two
/// copies of its workload; and the copies, as workloads.
fn full_hosts(
    catalogue: &BTreeMap<String, (Workload, String)>,
    cores: usize,
) -> (Vec<Scenario>, Vec<Workload>) {
    let vms = (cores / VCPUS as usize).max(1);
    let half = (vms / 2).max(1);
    let evaluation = evaluation_names();
    let mut rng = ChaCha8Rng::seed_from_u64(FULL_HOST_SEED);
    let mut draw = |n: usize| -> Vec<&str> {
        (0..n).map(|_| evaluation[rng.random_range(0..evaluation.len())]).collect()
    };
    let fill = |from: &[&'static str]| -> Vec<&'static str> {
        (0..vms).map(|i| from[i % from.len()]).collect()
    };
    let hosts: [(&str, String, Vec<&str>); 4] = [
        ("full-mix", format!("full host: {vms} VMs, seeded mix"), draw(vms)),
        ("full-memory", format!("full host: {vms} VMs, memory-bound"), fill(&MEMORY_BOUND)),
        ("full-cpu", format!("full host: {vms} VMs, CPU-bound"), fill(&CPU_BOUND)),
        ("half-mix", format!("half host: {half} VMs, seeded mix"), draw(half)),
    ];
    let mut derived: Vec<Workload> = Vec::new();
    let mut scenarios = Vec::new();
    for (id, title, names) in hosts {
        let mut workloads = Vec::new();
        for name in names {
            let Some((w, _)) = catalogue.get(name) else { continue };
            let copy = w.copies(FULL_HOST_COPIES);
            workloads.push(copy.name.clone());
            if !derived.iter().any(|d| d.name == copy.name) {
                derived.push(copy);
            }
        }
        scenarios.push(Scenario {
            id: id.to_owned(),
            title,
            origin: format!("the {id} scenario ({cores} cores)"),
            workloads,
            group: Group::FullHost,
        });
    }
    (scenarios, derived)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_defaults_are_the_reports_experiment() {
        let inputs = load(None, None, None, 0.01).unwrap();
        assert_eq!(inputs.class.name, "phenom-9500");
        assert_eq!(inputs.thresholds, vec![0.7, 0.4]);
        let group = |g| inputs.scenarios.iter().filter(|s| s.group == g).count();
        assert_eq!(group(Group::Report), 9 + 5);
        assert!(inputs.scenarios[..9].iter().all(Scenario::single));
        assert_eq!(inputs.scenarios[13].workloads, ["httperf-200", "bonnie++", "470.lbm"]);
        assert_eq!(group(Group::HeldOut), held_out_names().len());
        assert_eq!(group(Group::FullHost), 4);
        assert!(inputs.training.iter().all(|t| t.starts_with("train-")));
        assert!(inputs.evaluated().iter().all(|w| !inputs.training.contains(w)));
    }

    /// Full hosts give every core a vCPU: two copies of a workload per 2-vCPU VM, from a fixed
    /// seed, and the memory- and CPU-bound fills draw only from their kind.
    #[test]
    fn full_hosts_fill_every_core_of_the_class() {
        for (class, vms) in [("phenom-9500", 2), ("epyc-7502", 16)] {
            let inputs = load(Some(class), None, None, 0.01).unwrap();
            let full: Vec<&Scenario> =
                inputs.scenarios.iter().filter(|s| s.group == Group::FullHost).collect();
            for s in &full[..3] {
                assert_eq!(s.workloads.len(), vms, "{class}: {}", s.title);
                for w in &s.workloads {
                    let w = &inputs.workloads[w];
                    assert!(w.name.ends_with("-x2"), "{}", w.name);
                    assert!(w.phases.iter().all(|p| p.network.is_some() || p.threads == 2));
                }
            }
            assert_eq!(full[3].workloads.len(), vms / 2, "half a host");
            let memory = &full[1].workloads;
            assert!(memory.iter().all(|w| MEMORY_BOUND.iter().any(|m| *w == format!("{m}-x2"))));
            assert!(full[2].workloads.iter().all(|w| w == "444.namd-x2"));
            let again = load(Some(class), None, None, 0.01).unwrap();
            let mixes = |i: &Inputs| -> Vec<Vec<String>> {
                i.scenarios
                    .iter()
                    .filter(|s| s.group == Group::FullHost)
                    .map(|s| s.workloads.clone())
                    .collect()
            };
            assert_eq!(mixes(&inputs), mixes(&again), "the mix is the same every time");
        }
    }

    #[test]
    fn scenario_and_workload_files_are_checked_field_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let bad = write(d, "s.toml", "[[scenario]]\nworkload = [\"470.lbm\"]\n");
        let e = format!("{:#}", load(None, None, Some(&bad), 0.01).unwrap_err());
        assert!(e.contains("s.toml") && e.contains("workload"), "{e}");
        let unknown = write(d, "u.toml", "[[scenario]]\nworkloads = [\"470.lbm\", \"nope\"]\n");
        let e = format!("{:#}", load(None, None, Some(&unknown), 0.01).unwrap_err());
        assert!(e.contains("u.toml") && e.contains("scenario[0]") && e.contains("nope"), "{e}");
        let thr = write(d, "t.toml", "thresholds = [0]\n[[scenario]]\nworkloads = [\"470.lbm\"]\n");
        let e = format!("{:#}", load(None, None, Some(&thr), 0.01).unwrap_err());
        assert!(e.contains("thresholds[0]"), "{e}");
        write(
            d,
            "w.toml",
            "name = \"my-batch\"\n[[phases]]\nname = \"p\"\ninstructions = 1e9\ncpi_core = 1.0\n",
        );
        let wl = write(d, "wl.toml", "workloads = [\"w.toml\"]\n");
        let ok = write(
            d,
            "ok.toml",
            "thresholds = [50]\n[[scenario]]\nname = \"mine + lbm\"\nworkloads = [\"my-batch\", \"470.lbm\"]\n",
        );
        let inputs = load(None, Some(&wl), Some(&ok), 0.01).unwrap();
        assert_eq!(inputs.thresholds, vec![0.5]);
        assert_eq!(inputs.scenarios[0].id, "mine---lbm");
        assert_eq!(inputs.scenarios[0].workloads, ["my-batch", "470.lbm"]);
        let with_extra = load(None, Some(&wl), None, 0.01).unwrap();
        assert!(with_extra.scenarios.iter().any(|s| s.workloads == ["my-batch"]));
        write(
            d,
            "b.toml",
            "name = \"x\"\n[[phases]]\nname = \"p\"\ninstructions = -1\ncpi_core = 1.0\n",
        );
        let wl = write(d, "wl2.toml", "workloads = [\"b.toml\"]\n");
        let e = format!("{:#}", load(None, Some(&wl), None, 0.01).unwrap_err());
        assert!(e.contains("wl2.toml") && e.contains("instructions"), "{e}");
        let e =
            format!("{:#}", load(Some("/nonexistent/class.toml"), None, None, 0.01).unwrap_err());
        assert!(e.contains("class.toml"), "{e}");
    }
}
