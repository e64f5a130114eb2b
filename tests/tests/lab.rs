//! `vmgov lab` end to end, as a user runs it: the built binary, `--quick`, a fresh output
//! directory. The whole system runs inside it (a coordinator over gRPC, agents on simulated hosts
//! through the real coordinator link); the test reads what it wrote: every scenario under every
//! governor, `performance` as the reference, the oracle at or below it at equal work, vmgov
//! inside its thresholds on every single-VM scenario of the report's, the held-out suite and
//! the full hosts in their own groups, the report's table, and the tables saying so. A second
//! run with a scenarios file repeats two of the scenarios with the same seed and must give the
//! same figures, and runs a CPU-bound phase that ends after a time: slowed down, it shows the
//! clock ratio and no saving at equal work. A bad scenarios file is refused up front, naming
//! the file and the field.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use vmgov_tests::process::binary;

const GOVERNORS: [&str; 7] =
    ["performance", "ondemand", "schedutil", "cpu-load", "equation-9", "vmgov", "oracle"];

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("vmgov-lab-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn lab(args: &[&str], out: &Path) -> Output {
    Command::new(binary("vmgov"))
        .arg("lab")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .expect("vmgov runs")
}

fn report(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("report.json")).expect("report.json is written");
    serde_json::from_str(&text).expect("report.json is JSON")
}

fn governor<'a>(threshold: &'a Value, id: &str) -> &'a Value {
    threshold["governors"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["governor"] == id))
        .unwrap_or_else(|| panic!("no {id} in {threshold}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// The row of `label` in the markdown table under `heading`.
fn md_row<'a>(md: &'a str, heading: &str, label: &str) -> &'a str {
    let section = md
        .split(&format!("### {heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("report.md has no section {heading:?}"));
    section
        .lines()
        .take_while(|l| !l.starts_with("###"))
        .find(|l| l.starts_with(&format!("| {label} |")))
        .unwrap_or_else(|| panic!("report.md section {heading:?} has no row {label:?}"))
}

#[test]
fn the_quick_lab_runs_the_reports_experiment_end_to_end() {
    let dir = TempDir::new("quick");
    let out = lab(&["--quick", "--class", "phenom-9500"], &dir.0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "vmgov lab --quick failed:\n{stderr}");
    // Progress while it works, tables at the end.
    assert!(
        stderr.contains("learning 10/10") && stderr.contains("trained and activated"),
        "{stderr}"
    );
    assert!(stdout.contains("Summary") && stdout.contains("vmgov (energy)"), "{stdout}");
    for f in ["report.md", "report.json", "model.json"] {
        assert!(dir.0.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(dir.0.join("report.md")).unwrap();
    let r = report(&dir.0);

    // What was run: the model learnt on the training suite only, through the coordinator.
    assert_eq!(r["settings"]["class"], "phenom-9500");
    assert!(r["model"]["version"].as_u64().is_some_and(|v| v >= 1));
    let learning = r["learning"].as_array().unwrap();
    assert_eq!(learning.len(), 10);
    assert!(learning.iter().all(|l| l["workload"].as_str().unwrap().starts_with("train-")));

    let scenarios = r["scenarios"].as_array().unwrap();
    let in_group = |g: &str| scenarios.iter().filter(|s| s["group"] == g).count();
    assert_eq!(in_group("report"), 9 + 5, "every single-VM evaluation and Table 2");
    assert!(in_group("held-out") >= 8, "the held-out suite, each workload alone");
    assert_eq!(in_group("full-host"), 4, "three full hosts and a half-full one");
    assert_eq!(scenarios.len(), in_group("report") + in_group("held-out") + 4);
    let full = scenarios.iter().find(|s| s["id"] == "full-mix").unwrap();
    assert_eq!(full["workloads"].as_array().unwrap().len(), 2, "4 cores: two 2-vCPU VMs");
    for s in scenarios {
        let id = s["id"].as_str().unwrap();
        let title = s["title"].as_str().unwrap();
        let plots: Vec<&str> =
            s["plots"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert!(plots.contains(&format!("energy-{id}.svg").as_str()), "{id}: {plots:?}");
        for p in &plots {
            let svg = std::fs::read_to_string(dir.0.join(p)).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{p}");
        }
        let results = s["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{id}: thresholds 70% and 40%");
        for t in results {
            let pct = (100.0 * f(&t["threshold"])).round();
            assert!(
                plots.contains(&format!("frequency-{id}-{pct}.svg").as_str()),
                "{id}: {plots:?}"
            );
            let ids: Vec<&str> = t["governors"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|g| g["governor"].as_str())
                .collect();
            assert_eq!(ids, GOVERNORS, "{id} at {pct}%");
            let perf = governor(t, "performance");
            assert!((f(&perf["energy_ratio"]) - 1.0).abs() < 1e-12, "{id}: {perf}");
            // The per-phase oracle plans from short windows, so on a mix it may come out a
            // little above `performance`; nothing may come out below the bound.
            let oracle = governor(t, "oracle");
            assert!(
                f(&oracle["energy_ratio"]) <= 1.01,
                "{id} at {pct}%: the oracle used more energy per unit of work than performance: {oracle}"
            );
            for g in t["governors"].as_array().unwrap() {
                assert!(g["beats_bound"] == false, "{id} at {pct}%: below the bound: {g}");
            }
            if s["single"] == true {
                assert_eq!(t["bound"]["kind"], "exact", "{id}: one VM's bound is exact");
            } else {
                assert_eq!(t["bound"]["kind"], "lower-bound", "{id}");
            }
            let vmgov = governor(t, "vmgov");
            // vmgov's agent counted what it saved, as `vmgov status` would say; the baselines
            // have no agent to ask.
            assert!(vmgov["estimated_saving"].as_f64().is_some_and(f64::is_finite), "{vmgov}");
            assert!(perf["estimated_saving"].is_null(), "{perf}");
            if s["single"] == true && s["group"] == "report" {
                assert!(
                    vmgov["thresholds_met"] == true,
                    "{id} at {pct}%: vmgov missed its threshold: {vmgov}"
                );
            }
            // The tables say what report.json says, misses included.
            let heading = format!("{title} · threshold {pct}%");
            for g in t["governors"].as_array().unwrap() {
                let row = md_row(&md, &heading, g["label"].as_str().unwrap());
                let missed = row.contains("MISSED");
                assert_eq!(missed, g["thresholds_met"] == false, "{heading}: {row}");
            }
        }
    }

    // Same seed, same figures: two of the scenarios again from a scenarios file.
    for section in ["## Held-out workloads", "## The report's table"] {
        assert!(md.contains(section), "report.md has no {section:?}");
    }
    assert_eq!(r["report_table"].as_array().unwrap().len(), 6, "the report's six rows");
    let held_out_error = r["held_out_error"].as_array().unwrap();
    assert_eq!(held_out_error.len(), in_group("held-out") + 1, "each held-out workload, then all");
    assert!(held_out_error.iter().all(|e| f(&e["worst"]) >= f(&e["mean"])));
    let estimate = &r["estimate_error"];
    assert!(
        estimate["cases"].as_u64().is_some_and(|n| n > 0)
            && f(&estimate["worst"]) >= f(&estimate["mean"])
    );

    let again = TempDir::new("again");
    std::fs::create_dir_all(&again.0).unwrap();
    let file = again.0.join("scenarios.toml");
    std::fs::write(
        again.0.join("timed.toml"),
        "name = \"timed-cpu\"\n[[phases]]\nname = \"crunch\"\nduration_s = 40\ncpi_core = 0.65\n",
    )
    .unwrap();
    std::fs::write(
        &file,
        "thresholds = [40]\n\
         [[scenario]]\nworkloads = [\"470.lbm\"]\n\
         [[scenario]]\nname = \"namd and lbm\"\nworkloads = [\"444.namd\", \"470.lbm\"]\n\
         [[scenario]]\nworkloads = [\"timed.toml\"]\n",
    )
    .unwrap();
    // Without --class, both built-in classes, a folder each.
    let out = lab(&["--quick", "--scenarios", file.to_str().unwrap()], &again.0.join("out"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let index = std::fs::read_to_string(again.0.join("out").join("report.md")).unwrap();
    assert!(index.contains("phenom-9500/report.md") && index.contains("epyc-7502/report.md"));
    let epyc = report(&again.0.join("out").join("epyc-7502"));
    assert_eq!(epyc["settings"]["class"], "epyc-7502");
    assert_eq!(epyc["scenarios"].as_array().unwrap().len(), 3);
    let r2 = report(&again.0.join("out").join("phenom-9500"));
    let pairs = [("470.lbm", "470.lbm"), ("table2-2", "namd-and-lbm")];
    for (first, second) in pairs {
        let a = scenarios.iter().find(|s| s["id"] == first).unwrap();
        let b = r2["scenarios"].as_array().unwrap().iter().find(|s| s["id"] == second).unwrap();
        let a40 = a["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| (f(&t["threshold"]) - 0.4).abs() < 1e-9)
            .unwrap();
        let b40 = &b["results"][0];
        for g in GOVERNORS {
            assert_eq!(
                governor(a40, g)["package_energy_j"],
                governor(b40, g)["package_energy_j"],
                "{first} under {g}: the same seed gave different energy"
            );
        }
    }
    // A CPU-bound phase that ends after 40 s: equation 9 at 40% slows it to 1.4 GHz, which it
    // shows as the clock ratio, and the energy it did not spend on work it did not do is no
    // saving.
    let timed =
        r2["scenarios"].as_array().unwrap().iter().find(|s| s["id"] == "timed-cpu").unwrap();
    let t40 = &timed["results"][0];
    let (eq9, perf) = (governor(t40, "equation-9"), governor(t40, "performance"));
    let ratio = f(&eq9["vms"][0]["perf_ratio"]);
    assert!((ratio - 1.4 / 2.2).abs() < 0.02, "timed CPU phase at 1.4 GHz: ratio {ratio}");
    assert!(
        f(&eq9["package_energy_j"]) < f(&perf["package_energy_j"]),
        "it did spend less energy in all: {eq9}"
    );
    assert!(f(&eq9["energy_ratio"]) > 1.0, "but more per unit of work: {eq9}");
}

#[test]
fn a_bad_scenarios_file_is_refused_naming_the_file_and_the_field() {
    let dir = TempDir::new("bad");
    std::fs::create_dir_all(&dir.0).unwrap();
    let cases = [
        ("typo.toml", "[[scenario]]\nworkload = [\"470.lbm\"]\n", "workload"),
        (
            "unknown.toml",
            "[[scenario]]\nworkloads = [\"470.lbm\", \"no-such-load\"]\n",
            "no-such-load",
        ),
        (
            "threshold.toml",
            "thresholds = [150]\n[[scenario]]\nworkloads = [\"470.lbm\"]\n",
            "thresholds[0]",
        ),
        ("empty.toml", "thresholds = [70]\n", "[[scenario]]"),
    ];
    for (name, text, field) in cases {
        let file = dir.0.join(name);
        std::fs::write(&file, text).unwrap();
        let out_dir = dir.0.join(format!("out-{name}"));
        let out = lab(&["--quick", "--scenarios", file.to_str().unwrap()], &out_dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(stderr.contains(name) && stderr.contains(field), "{name}: {stderr}");
        assert!(!out_dir.exists(), "{name}: nothing may be written for a bad file");
    }
}
