//! The calibration tables of `docs/calibration.md`: every workload alone on a class, at every
//! P-state and under the oracle, next to the report's figures. `vmgov-agent calibrate` prints
//! them, so anyone can regenerate the document's numbers or check a class of their own.

use std::fmt::Write as _;

use serde::Serialize;
use vmgov_proto::Thresholds;

use crate::{
    governor::GovernorKind,
    host::{HardwareClass, SimConfig, SimReport, VmSpec, Workload},
    measure::{RunWork, WorkReference},
    simulate::{self, Policy, Scenario, SimulateError},
};

/// The report's measured processor-energy savings at threshold 40% (single VM), where it gives
/// one: section 5.1 of the IPSJ text.
pub const REPORT_SAVINGS_AT_40: &[(&str, f64)] =
    &[("470.lbm", 0.383), ("bonnie++", 0.351), ("httperf-500", 0.460)];

/// One workload's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Workload name.
    pub workload: String,
    /// Performance ratio per P-state (slowest first) against the performance governor: its
    /// work rate ([`crate::measure`]), the runtime ratio for work that ends after its
    /// instructions, the throughput ratio for a server.
    pub perf: Vec<f64>,
    /// Package energy at equal work per P-state relative to the performance governor.
    pub package_energy: Vec<f64>,
    /// Core energy (package − uncore) at equal work per P-state relative to the same.
    pub core_energy: Vec<f64>,
    /// Oracle at each threshold: (threshold, package saving, core saving, perf ratio).
    pub oracle: Vec<(f64, f64, f64, f64)>,
}

/// The thresholds the tables use, as in the report.
pub const THRESHOLDS: [f64; 2] = [0.7, 0.4];

fn perf_ratio(run: &SimReport, reference: &WorkReference) -> f64 {
    run.vms.first().and_then(|v| reference.perf_ratio(v)).unwrap_or(0.0)
}

/// Runs every workload alone (2 vCPUs, as in the report) on `class`, at `scale` of its length.
pub fn table(
    class: &HardwareClass,
    workloads: &[Workload],
    scale: f64,
) -> Result<Vec<Row>, SimulateError> {
    let n = class.pstates.len();
    workloads
        .iter()
        .map(|w| {
            let scenario = Scenario {
                class: class.clone(),
                vms: vec![VmSpec {
                    name: "vm".into(),
                    vcpus: 2,
                    affinity: None,
                    workload: w.scaled(scale),
                }],
                config: SimConfig { counter_noise: 0.0, ..SimConfig::default() },
                max_time_s: 1e6,
            };
            let runs: Vec<SimReport> = (0..n)
                .map(|p| simulate::run(&scenario, &Policy::Fixed(vec![p])).map(|o| o.report))
                .collect::<Result<_, _>>()?;
            // The reference of every ratio: the performance governor (busy cores at f_max, cores
            // idle for a whole slice at the lowest P-state), as for every policy compared.
            let top =
                &simulate::run(&scenario, &Policy::Governor(GovernorKind::Performance))?.report;
            let reference = top
                .vms
                .first()
                .map(WorkReference::from_truth)
                .ok_or_else(|| SimulateError::Policy(format!("{} did not run", w.name)))?;
            let work = |r: &SimReport| RunWork::new(r, &[Some(&reference)]);
            let base = work(top);
            let oracle = THRESHOLDS
                .iter()
                .map(|&t| {
                    let thresholds =
                        Thresholds::new(t, t).map_err(|e| SimulateError::Policy(e.to_string()))?;
                    let o = simulate::run(&scenario, &Policy::Oracle(vec![thresholds]))?.report;
                    Ok((
                        t,
                        1.0 - work(&o).energy_ratio(&base),
                        1.0 - work(&o).core_energy_ratio(&base),
                        perf_ratio(&o, &reference),
                    ))
                })
                .collect::<Result<_, SimulateError>>()?;
            Ok(Row {
                workload: w.name.clone(),
                perf: runs.iter().map(|r| perf_ratio(r, &reference)).collect(),
                package_energy: runs.iter().map(|r| work(r).energy_ratio(&base)).collect(),
                core_energy: runs.iter().map(|r| work(r).core_energy_ratio(&base)).collect(),
                oracle,
            })
        })
        .collect()
}

/// The rows as Markdown tables.
pub fn markdown(class: &HardwareClass, rows: &[Row]) -> String {
    let ghz: Vec<String> =
        class.pstates.iter().map(|p| format!("{:.1} GHz", p.frequency_hz / 1e9)).collect();
    let mut out = String::new();
    let header = |out: &mut String, what: &str| {
        let _ = writeln!(
            out,
            "| workload | {} |",
            ghz.iter().map(|g| format!("{what} {g}")).collect::<Vec<_>>().join(" | ")
        );
        let _ = writeln!(out, "|---|{}", "---|".repeat(ghz.len()));
    };
    let _ = writeln!(
        out,
        "Performance ratio with the VM held at each P-state, against the performance governor: its \
         work rate (the runtime ratio for work that ends after its instructions, the throughput \
         ratio for servers):\n"
    );
    header(&mut out, "perf");
    for r in rows {
        let cells: Vec<String> = r.perf.iter().map(|v| format!("{v:.3}")).collect();
        let _ = writeln!(out, "| {} | {} |", r.workload, cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\nEnergy at equal work against the performance governor, package (core only in brackets):\n"
    );
    header(&mut out, "energy");
    for r in rows {
        let cells: Vec<String> = r
            .package_energy
            .iter()
            .zip(&r.core_energy)
            .map(|(p, c)| format!("{p:.3} ({c:.3})"))
            .collect();
        let _ = writeln!(out, "| {} | {} |", r.workload, cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\nOracle: energy saved at equal work against the performance governor, package (core only), and the \
         performance ratio it ran at; \
         the report's measured saving at 40% where it gives one:\n"
    );
    let _ = writeln!(
        out,
        "| workload | oracle 70%: saved (core), perf | oracle 40%: saved (core), perf | report at 40% |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for r in rows {
        let cells: Vec<String> = r
            .oracle
            .iter()
            .map(|(_, pkg, core, perf)| {
                format!("{:.1}% ({:.1}%), {perf:.3}", 100.0 * pkg, 100.0 * core)
            })
            .collect();
        let report = REPORT_SAVINGS_AT_40
            .iter()
            .find(|(w, _)| *w == r.workload)
            .map_or_else(|| "-".to_owned(), |(_, s)| format!("{:.1}%", 100.0 * s));
        let _ = writeln!(out, "| {} | {} | {report} |", r.workload, cells.join(" | "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_workload_and_the_oracle_meets_its_thresholds() {
        let class = HardwareClass::builtin("phenom-9500").unwrap();
        let workloads: Vec<_> =
            ["470.lbm", "httperf-500"].iter().map(|w| Workload::builtin(w).unwrap()).collect();
        let rows = table(&class, &workloads, 0.002).unwrap();
        assert_eq!(rows.len(), 2);
        for r in &rows {
            // A VM held at f_max is the performance governor, up to the cost of switching its
            // cores between the idle P-state and f_max.
            assert!(
                (r.perf[4] - 1.0).abs() < 0.02 && (r.package_energy[4] - 1.0).abs() < 0.02,
                "{r:?}"
            );
            for (t, _, _, perf) in &r.oracle {
                assert!(*perf >= t - 1e-3, "{}: oracle at {t} ran at {perf}", r.workload);
            }
        }
        let md = markdown(&class, &rows);
        assert!(md.contains("| 470.lbm |") && md.contains("38.3%") && md.contains("1.4 GHz"));
    }
}
