//! The oracle: the limit vmgov's results are measured against on the simulated host.
//!
//! It knows the physics because it asks the simulator itself. Whenever the set of phases
//! running changes, it evaluates every combination of per-VM P-states (exhaustively: 5³ = 125
//! for three VMs on the Phenom) by running a noise-free copy of the host for a short window,
//! and keeps the combination with the least package energy per unit of progress among those
//! that hold every VM at or above its threshold: a batch phase's instruction rate at least
//! `perf` × its rate alone on the host at f_max, a serving phase's served rate at least
//! `throughput` × the same reference. Progress is the sum over VMs of their rate over their
//! reference, so for a single VM the choice is exactly the lowest-energy feasible P-state.
//! With several VMs, energy per unit of summed progress is the definition of "lowest energy"
//! used; a run-long schedule over future phases is not searched.

use vmgov_proto::Thresholds;

use crate::platform::{FrequencyControl, PlatformError, sim::SimHost};

/// Slices run before measuring, so transitions settle.
const WARMUP_STEPS: usize = 3;
/// Slices measured per evaluation.
const WINDOW_STEPS: usize = 30;
/// Most combinations evaluated at one phase change.
pub const MAX_COMBINATIONS: usize = 1 << 14;

/// The oracle and its current choice.
#[derive(Debug, Clone)]
pub struct Oracle {
    thresholds: Vec<Thresholds>,
    key: Vec<usize>,
    /// Phase changes it has re-planned at.
    pub replans: u64,
}

/// Rate of progress of `vm` on `host` over a window: instructions (served ones for servers)
/// per second, and the package energy spent, joules.
fn measure(host: &mut SimHost, vms: &[usize]) -> (Vec<f64>, f64) {
    for _ in 0..WARMUP_STEPS {
        host.step();
    }
    let before: Vec<f64> =
        vms.iter().map(|&v| host.vm_truth(v).map_or(0.0, |t| t.instructions)).collect();
    let e0 = host.package_energy_j();
    let t0 = host.time_s();
    for _ in 0..WINDOW_STEPS {
        host.step();
    }
    let window = host.time_s() - t0;
    let rates = vms
        .iter()
        .zip(before)
        .map(|(&v, b)| (host.vm_truth(v).map_or(0.0, |t| t.instructions) - b) / window)
        .collect();
    (rates, host.package_energy_j() - e0)
}

fn pin(host: &mut SimHost, vms: &[usize], pstates: &[usize]) -> Result<(), PlatformError> {
    for (&vm, &p) in vms.iter().zip(pstates) {
        host.set_vm_pstate(vm, Some(p))?;
    }
    for core in 0..host.core_count() {
        host.set_core_pstate(core, 0)?;
    }
    Ok(())
}

impl Oracle {
    /// An oracle holding VM `i` to `thresholds[i]`.
    pub const fn new(thresholds: Vec<Thresholds>) -> Self {
        Self { thresholds, key: Vec::new(), replans: 0 }
    }

    /// Re-plans if the running phases changed, and applies its choice to `host`.
    pub fn update(&mut self, host: &mut SimHost) -> Result<(), PlatformError> {
        let key: Vec<usize> = (0..host.vm_count()).map(|v| host.vm_phase(v)).collect();
        if key == self.key {
            return Ok(());
        }
        self.key = key;
        self.replans += 1;
        let active: Vec<usize> = (0..host.vm_count()).filter(|&v| !host.vm_finished(v)).collect();
        if active.is_empty() {
            return Ok(());
        }
        let top = host.pstates().max_index();
        let n = host.pstates().len();
        let references: Vec<f64> = active
            .iter()
            .map(|&v| {
                let mut alone = host.isolated(v);
                pin(&mut alone, &[v], &[top])?;
                Ok(measure(&mut alone, &[v]).0[0])
            })
            .collect::<Result<_, PlatformError>>()?;
        let combos =
            n.checked_pow(u32::try_from(active.len()).unwrap_or(u32::MAX)).unwrap_or(usize::MAX);
        if combos > MAX_COMBINATIONS {
            return Err(PlatformError::Unsupported(
                "the oracle's exhaustive search is limited to 16384 combinations",
            ));
        }
        let mut best: Option<(f64, Vec<usize>)> = None;
        let mut pstates = vec![0; active.len()];
        for combo in 0..combos {
            let mut rest = combo;
            for p in &mut pstates {
                *p = rest % n;
                rest /= n;
            }
            let mut trial = host.clone();
            trial.set_counter_noise(0.0);
            pin(&mut trial, &active, &pstates)?;
            let (rates, energy) = measure(&mut trial, &active);
            let mut progress = 0.0;
            let mut feasible = true;
            for (k, &vm) in active.iter().enumerate() {
                let ratio = if references[k] > 0.0 { rates[k] / references[k] } else { 1.0 };
                let t = self.thresholds.get(vm).copied().unwrap_or(Thresholds::NONE);
                let needed = if host.vm_serving(vm) { t.throughput() } else { t.perf() };
                feasible &= ratio >= needed;
                progress += ratio;
            }
            if feasible && progress > 0.0 {
                let cost = energy / progress;
                if best.as_ref().is_none_or(|(b, _)| cost < *b) {
                    best = Some((cost, pstates.clone()));
                }
            }
        }
        let choice = best.map_or_else(|| vec![top; active.len()], |(_, p)| p);
        pin(host, &active, &choice)
    }
}
