//! The research report's table, reproduced under its own metric: the one measurement of this
//! method on real hardware, so it validates the simulator.
//!
//! The report gives six savings of processor energy at threshold 40% under its policy,
//! equation 9, on a Phenom 9500, each against a run with **every core at the maximum
//! frequency** (its section 5), idle cores included. `docs/calibration.md` ("The report's
//! table") argues its processor energy is the cores' (the package less the uncore, which no
//! core P-state lowers). So each row here is the lab's equation-9 run at 40% against the same
//! scenario with every core held at f_max, in core energy, raw (the report does not scale by
//! work), with the package beside it. Shown only on the report's class, at 40%.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    Key,
    inputs::{Group, Inputs},
    runs::{Governor, RunData},
};

/// The report's threshold for its table.
const THRESHOLD: f64 = 0.4;

/// The class the report measured.
const CLASS: &str = "phenom-9500";

/// Each row: the scenario's workloads, and the processor-energy saving the report measured.
const ROWS: [(&[&str], f64); 6] = [
    (&["470.lbm"], 0.383),
    (&["bonnie++"], 0.351),
    (&["httperf-500"], 0.460),
    (&["470.lbm", "470.lbm"], 0.443),
    (&["444.namd", "444.namd"], 0.187),
    (&["httperf-200", "bonnie++", "470.lbm"], 0.397),
];

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ReportRow {
    /// The scenario.
    pub title: String,
    /// The report's saving of processor energy.
    pub report: f64,
    /// The lab's: core energy of equation 9 at 40% against every core at f_max.
    pub cores: f64,
    /// The same for the whole package.
    pub package: f64,
}

fn threshold_index(inputs: &Inputs) -> Option<usize> {
    inputs.thresholds.iter().position(|t| (t - THRESHOLD).abs() < 1e-9)
}

/// The scenarios the table needs, by index: none unless the class is the report's and 40% is
/// one of the thresholds.
pub(crate) fn scenarios(inputs: &Inputs) -> Vec<usize> {
    if inputs.class.name != CLASS || threshold_index(inputs).is_none() {
        return Vec::new();
    }
    ROWS.iter()
        .filter_map(|(workloads, _)| {
            inputs
                .scenarios
                .iter()
                .position(|s| s.group == Group::Report && s.workloads == *workloads)
        })
        .collect()
}

/// The rows whose runs exist.
pub(crate) fn rows(inputs: &Inputs, results: &BTreeMap<Key, RunData>) -> Vec<ReportRow> {
    let Some(t) = threshold_index(inputs) else { return Vec::new() };
    let mut out = Vec::new();
    for i in scenarios(inputs) {
        let scenario = &inputs.scenarios[i];
        let Some(&(_, report)) = ROWS.iter().find(|(w, _)| scenario.workloads == *w) else {
            continue;
        };
        let eq9 = Key::Run { scenario: i, governor: Governor::Equation9, threshold: Some(t) };
        let (Some(run), Some(base)) = (results.get(&eq9), results.get(&Key::ReportBaseline(i)))
        else {
            continue;
        };
        let (r, b) = (&run.report, &base.report);
        out.push(ReportRow {
            title: scenario.title.clone(),
            report,
            cores: 1.0 - r.core_energy_j / b.core_energy_j,
            package: 1.0 - r.package_energy_j / b.package_energy_j,
        });
    }
    out
}
