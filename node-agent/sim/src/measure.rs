//! The yardstick's measures, from ground truth: how fast a VM worked against itself alone at
//! f_max, and a run's energy at equal work.
//!
//! **Work.** Every phase measures its work in its own unit: instructions for a batch phase,
//! requests served for a server, disk requests for a disk-bound phase. Within a phase these are
//! fixed multiples of one another, so the simulator counts every phase's work as useful
//! instructions ([`PhaseTruth::work`]). Phases are not comparable with one another, so work is
//! expressed in **reference seconds**: the time the VM alone at f_max (its reference) takes to do
//! the same work, phase by phase, `Σ_p work_p / rate_p` with `rate_p` the reference's work rate
//! in phase p. A phase the reference did no work in (a quiet spell) counts its time as it is.
//!
//! **Performance ratio.** Reference seconds of work done over the seconds it took. For a
//! workload that ends after a number of instructions this is exactly the reference runtime over
//! the runtime (up to the simulator's slice at each phase end); for a phase that ends after a
//! time it is the work rate, so doing less in the same time is a slowdown, never free.
//!
//! **Energy at equal work.** A run is charged the energy per reference second of work it
//! achieved: `E / W`. Against `performance`, the energy ratio is `(E / W) / (E_perf / W_perf)`,
//! summed over a host's VMs, so doing less work is never a saving.

use serde::Serialize;

use crate::host::{SimReport, VmTruth};

pub use crate::host::PhaseTruth;

/// A workload's work rates alone at f_max, per phase of its definition: what its work is
/// measured against.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkReference {
    /// Work per second in each phase (useful instructions per second); 0 where it did none.
    pub rates: Vec<f64>,
    /// Reference seconds in the whole reference run (its runtime, phase by phase).
    pub seconds: f64,
}

impl WorkReference {
    /// The reference from the VM's truth in a run alone at f_max.
    pub fn from_truth(truth: &VmTruth) -> Self {
        let rates = truth
            .phases
            .iter()
            .map(|p| if p.time_s > 0.0 && p.work > 0.0 { p.work / p.time_s } else { 0.0 })
            .collect();
        Self { rates, seconds: truth.phases.iter().map(|p| p.time_s).sum() }
    }

    /// The work in `phases`, in reference seconds.
    pub fn reference_seconds(&self, phases: &[PhaseTruth]) -> f64 {
        phases
            .iter()
            .zip(&self.rates)
            .map(|(p, &rate)| if rate > 0.0 { p.work / rate } else { p.time_s })
            .sum()
    }

    /// The performance ratio of `truth`: reference seconds of work over the seconds it took
    /// (None before it did anything).
    pub fn perf_ratio(&self, truth: &VmTruth) -> Option<f64> {
        let elapsed: f64 = truth.phases.iter().map(|p| p.time_s).sum();
        (elapsed > 0.0).then(|| self.reference_seconds(&truth.phases) / elapsed)
    }
}

/// Work and energy of a whole run, for comparisons at equal work.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunWork {
    /// Reference seconds of work, all VMs.
    pub work_s: f64,
    /// Package energy, joules.
    pub package_j: f64,
    /// Cores' share of it, joules.
    pub core_j: f64,
}

impl RunWork {
    /// The run's work against `references` (one per VM, in order; a VM without one counts
    /// nothing).
    pub fn new(report: &SimReport, references: &[Option<&WorkReference>]) -> Self {
        let work_s = report
            .vms
            .iter()
            .zip(references)
            .filter_map(|(vm, r)| r.map(|r| r.reference_seconds(&vm.phases)))
            .sum();
        Self { work_s, package_j: report.package_energy_j, core_j: report.core_energy_j }
    }

    /// Package joules per reference second of work.
    pub fn package_per_work(&self) -> f64 {
        self.package_j / self.work_s
    }

    /// Package energy at equal work over `base`'s: below 1 is a saving.
    pub fn energy_ratio(&self, base: &Self) -> f64 {
        self.package_per_work() / base.package_per_work()
    }

    /// The same for the cores' energy alone.
    pub fn core_energy_ratio(&self, base: &Self) -> f64 {
        (self.core_j / self.work_s) / (base.core_j / base.work_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        HardwareClass, SimConfig, VmSpec, Workload,
        simulate::{self, Policy, Scenario},
    };

    fn run(workload: &Workload, pstate: usize) -> SimReport {
        let scenario = Scenario {
            class: HardwareClass::builtin("phenom-9500").unwrap(),
            vms: vec![VmSpec {
                name: "vm".into(),
                vcpus: 2,
                affinity: None,
                workload: workload.clone(),
            }],
            config: SimConfig { counter_noise: 0.0, ..SimConfig::default() },
            max_time_s: 3600.0,
        };
        simulate::run(&scenario, &Policy::Fixed(vec![pstate])).unwrap().report
    }

    fn timed_cpu_phase() -> Workload {
        Workload::parse(
            "name = \"timed\"\n[[phases]]\nname = \"crunch\"\nduration_s = 4\ncpi_core = 0.65\n",
            std::path::Path::new("timed.toml"),
        )
        .unwrap()
    }

    #[test]
    fn the_reference_is_its_own_unit() {
        let w = Workload::builtin("450.soplex").unwrap().scaled(0.002);
        let top = run(&w, 4);
        let reference = WorkReference::from_truth(&top.vms[0]);
        let ratio = reference.perf_ratio(&top.vms[0]).unwrap();
        assert!((ratio - 1.0).abs() < 1e-9, "{ratio}");
        let work = RunWork::new(&top, &[Some(&reference)]);
        assert!((work.energy_ratio(&work) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_batch_workload_is_judged_by_its_runtime() {
        let w = Workload::builtin("470.lbm").unwrap().scaled(0.0005);
        let (top, slow) = (run(&w, 4), run(&w, 0));
        let reference = WorkReference::from_truth(&top.vms[0]);
        let ratio = reference.perf_ratio(&slow.vms[0]).unwrap();
        let runtime = top.vms[0].finished_at_s.unwrap() / slow.vms[0].finished_at_s.unwrap();
        assert!((ratio - runtime).abs() < 1e-3, "{ratio} vs runtime ratio {runtime}");
    }

    /// A CPU-bound phase that ends after a time, slowed to 1.4 GHz: its ratio is the clock
    /// ratio, and at equal work it saves nothing of the work it did not do.
    #[test]
    fn a_time_bounded_phase_slowed_down_shows_the_clock_ratio_and_no_free_saving() {
        let w = timed_cpu_phase();
        let (top, slow) = (run(&w, 4), run(&w, 0));
        let reference = WorkReference::from_truth(&top.vms[0]);
        let ratio = reference.perf_ratio(&slow.vms[0]).unwrap();
        let clock = 1.4 / 2.2;
        assert!((ratio - clock).abs() < 0.01, "ratio {ratio} vs clock ratio {clock}");
        let (base, governed) =
            (RunWork::new(&top, &[Some(&reference)]), RunWork::new(&slow, &[Some(&reference)]));
        let raw = slow.package_energy_j / top.package_energy_j;
        assert!(raw < 0.9, "the slow run spent less energy in raw terms ({raw})");
        let at_equal_work = governed.energy_ratio(&base);
        assert!(
            at_equal_work > 1.0,
            "at equal work a CPU-bound phase slowed down costs more ({at_equal_work})"
        );
    }
}
