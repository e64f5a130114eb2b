//! The arbiter, pure: turns the per-VM P-state choices of one slice into settings for the cores
//! and the VMs, under a selectable policy. The executor applies only what changed.
//!
//! - `follow`: each VM's vCPUs run at its own choice, switched at every vCPU switch (simulated
//!   host, uclamp); a core's own setting covers its idle time.
//! - `pin`: VMs with similar choices are grouped onto the same cores through affinity masks, each
//!   group's cores at the highest choice in it. For hosts that can only set a frequency per core.
//! - `max`: each core at the highest choice among the VMs allowed on it.
//!
//! Everywhere, a core that ran nothing in the last slice goes to the lowest P-state, and a VM on
//! the fallback governor contributes the fallback governor's choice for its cores.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::platform::{VcpuPlacement, VmIndex};

/// How per-VM choices become per-core frequencies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArbiterPolicy {
    /// A core runs at the choice of the VM whose vCPU it is running.
    #[default]
    Follow,
    /// Group VMs with similar choices on the same cores.
    Pin,
    /// Each core at the highest choice among the VMs allowed on it.
    Max,
}

impl ArbiterPolicy {
    /// Name on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Follow => "follow",
            Self::Pin => "pin",
            Self::Max => "max",
        }
    }
}

impl fmt::Display for ArbiterPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An arbiter policy name that is not known.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown arbiter policy {0:?}; choose follow, pin or max")]
pub struct UnknownPolicy(pub String);

impl FromStr for ArbiterPolicy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Follow, Self::Pin, Self::Max]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// One VM as the arbiter sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmInput {
    /// The VM.
    pub vm: VmIndex,
    /// Its vCPUs.
    pub vcpus: usize,
    /// Cores it may run on (its configured mask, before any pinning by the arbiter).
    pub affinity: u64,
    /// The fast path's choice, or `None` for the fallback governor.
    pub choice: Option<usize>,
}

/// What to set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actuation {
    /// P-state of every core.
    pub cores: Vec<usize>,
    /// Per-VM P-state to follow at vCPU switches (`None` clears it).
    pub vm_pstates: Vec<(VmIndex, Option<usize>)>,
    /// Per-VM affinity masks (pin only).
    pub vm_affinity: Vec<(VmIndex, u64)>,
}

/// Everything the arbiter decides from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Per-VM choices.
    pub vms: &'a [VmInput],
    /// The fallback governor's P-state for every core (from its own per-core rule).
    pub fallback: &'a [usize],
    /// Busy fraction of every core in the last slice.
    pub busy: &'a [f64],
    /// Where vCPUs ran in the last slice.
    pub placement: &'a [VcpuPlacement],
}

fn full_mask(cores: usize) -> u64 {
    if cores >= 64 { u64::MAX } else { (1u64 << cores) - 1 }
}

/// Decides the settings for one slice.
pub fn arbitrate(policy: ArbiterPolicy, inputs: &Inputs<'_>) -> Actuation {
    let cores = inputs.fallback.len();
    let choice_of = |vm: VmIndex| inputs.vms.iter().find(|v| v.vm == vm).and_then(|v| v.choice);
    match policy {
        ArbiterPolicy::Follow => {
            // Idle time on a core holds the highest choice of the VMs that ran there (no
            // transition at every wake-up), or the fallback's if a fallback VM ran there.
            let mut setting: Vec<Option<usize>> = vec![None; cores];
            for p in inputs.placement.iter().filter(|p| p.share > 0.0 && p.core < cores) {
                let want = choice_of(p.vm).unwrap_or(inputs.fallback[p.core]);
                setting[p.core] = Some(setting[p.core].map_or(want, |s| s.max(want)));
            }
            Actuation {
                cores: (0..cores)
                    .map(|c| {
                        if inputs.busy[c] > 0.0 {
                            setting[c].unwrap_or(inputs.fallback[c])
                        } else {
                            0
                        }
                    })
                    .collect(),
                vm_pstates: inputs.vms.iter().map(|v| (v.vm, v.choice)).collect(),
                vm_affinity: Vec::new(),
            }
        }
        ArbiterPolicy::Max => Actuation {
            cores: (0..cores)
                .map(|c| {
                    if inputs.busy[c] <= 0.0 {
                        return 0;
                    }
                    inputs
                        .vms
                        .iter()
                        .filter(|v| v.affinity & (1 << c) != 0)
                        .map(|v| v.choice.unwrap_or(inputs.fallback[c]))
                        .max()
                        .unwrap_or(inputs.fallback[c])
                })
                .collect(),
            vm_pstates: inputs.vms.iter().map(|v| (v.vm, None)).collect(),
            vm_affinity: Vec::new(),
        },
        ArbiterPolicy::Pin => pin(inputs, cores),
    }
}

/// Groups VMs by choice (fallback VMs count as f_max) and gives each group a share of the cores
/// proportional to its vCPUs, at least one core, slowest group first; with more groups than
/// cores, neighbouring groups merge (the faster choice wins).
fn pin(inputs: &Inputs<'_>, cores: usize) -> Actuation {
    let top = inputs.fallback.iter().copied().max().unwrap_or(0);
    let mut vms: Vec<(usize, &VmInput)> =
        inputs.vms.iter().map(|v| (v.choice.unwrap_or(top), v)).collect();
    vms.sort_by_key(|(c, v)| (*c, v.vm));
    // Groups of equal choice, as (choice, vcpus, members).
    let mut groups: Vec<(usize, usize, Vec<VmIndex>)> = Vec::new();
    for (c, v) in vms {
        match groups.last_mut() {
            Some(g) if g.0 == c => {
                g.1 += v.vcpus;
                g.2.push(v.vm);
            }
            _ => groups.push((c, v.vcpus, vec![v.vm])),
        }
    }
    while groups.len() > cores.max(1) {
        // Merge the two neighbours with the smallest vCPU total into the faster one.
        let i = (0..groups.len() - 1).min_by_key(|&i| groups[i].1 + groups[i + 1].1).unwrap_or(0);
        let slower = groups.remove(i);
        groups[i].1 += slower.1;
        groups[i].2.extend(slower.2);
    }
    let total: usize = groups.iter().map(|g| g.1).sum::<usize>().max(1);
    let mut actuation = Actuation { cores: vec![0; cores], ..Actuation::default() };
    let mut next = 0;
    for (k, (choice, vcpus, members)) in groups.iter().enumerate() {
        let left_groups = groups.len() - k - 1;
        let fair = (cores * vcpus).div_ceil(total).max(1);
        let n = fair.min(cores - next - left_groups).max(1);
        let mut mask = 0u64;
        for c in next..(next + n).min(cores) {
            mask |= 1 << c;
            actuation.cores[c] = *choice;
        }
        next += n;
        for vm in members {
            actuation.vm_affinity.push((*vm, if mask == 0 { full_mask(cores) } else { mask }));
            actuation.vm_pstates.push((*vm, None));
        }
    }
    actuation
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn placement(vm: VmIndex, core: usize) -> VcpuPlacement {
        VcpuPlacement { vm, vcpu: 0, core, share: 1.0 }
    }

    #[test]
    fn follow_sets_each_vm_and_holds_busy_cores_at_their_choice() {
        let vms = [
            VmInput { vm: 0, vcpus: 2, affinity: 0b1111, choice: Some(1) },
            VmInput { vm: 1, vcpus: 2, affinity: 0b1111, choice: None },
        ];
        let a = arbitrate(
            ArbiterPolicy::Follow,
            &Inputs {
                vms: &vms,
                fallback: &[4, 4, 4, 0],
                busy: &[1.0, 0.5, 0.0, 0.0],
                placement: &[placement(0, 0), placement(1, 1)],
            },
        );
        assert_eq!(a.vm_pstates, vec![(0, Some(1)), (1, None)]);
        assert_eq!(a.cores, vec![1, 4, 0, 0]);
        assert!(a.vm_affinity.is_empty());
    }

    #[test]
    fn max_takes_the_highest_choice_allowed_on_each_core() {
        let vms = [
            VmInput { vm: 0, vcpus: 1, affinity: 0b0011, choice: Some(1) },
            VmInput { vm: 1, vcpus: 1, affinity: 0b0110, choice: Some(3) },
        ];
        let a = arbitrate(
            ArbiterPolicy::Max,
            &Inputs {
                vms: &vms,
                fallback: &[2, 2, 2, 2],
                busy: &[1.0, 1.0, 1.0, 1.0],
                placement: &[],
            },
        );
        assert_eq!(a.cores, vec![1, 3, 3, 2]);
        assert!(a.vm_pstates.iter().all(|(_, p)| p.is_none()));
    }

    #[test]
    fn pin_groups_similar_choices_on_their_own_cores() {
        let vms = [
            VmInput { vm: 0, vcpus: 2, affinity: 0b1111, choice: Some(0) },
            VmInput { vm: 1, vcpus: 2, affinity: 0b1111, choice: Some(4) },
            VmInput { vm: 2, vcpus: 2, affinity: 0b1111, choice: Some(0) },
        ];
        let a = arbitrate(
            ArbiterPolicy::Pin,
            &Inputs { vms: &vms, fallback: &[4; 4], busy: &[1.0; 4], placement: &[] },
        );
        let mask = |vm| a.vm_affinity.iter().find(|(v, _)| *v == vm).map(|(_, m)| *m).unwrap();
        assert_eq!(mask(0), mask(2));
        assert_eq!(mask(0) & mask(1), 0, "groups share no core");
        for c in 0..4 {
            let expected = if mask(0) & (1 << c) != 0 { 0 } else { 4 };
            assert_eq!(a.cores[c], expected);
        }
    }

    proptest! {
        #[test]
        fn pin_gives_every_vm_a_core_and_never_slows_a_vm_below_its_choice(
            choices in proptest::collection::vec(proptest::option::of(0usize..5), 1..20),
            cores in 1usize..17,
        ) {
            let vms: Vec<VmInput> = choices
                .iter()
                .enumerate()
                .map(|(i, &choice)| VmInput { vm: i, vcpus: 1 + i % 3, affinity: full_mask(cores), choice })
                .collect();
            let fallback = vec![4; cores];
            let busy = vec![1.0; cores];
            let a = arbitrate(ArbiterPolicy::Pin, &Inputs { vms: &vms, fallback: &fallback, busy: &busy, placement: &[] });
            prop_assert_eq!(a.cores.len(), cores);
            for v in &vms {
                let mask = a.vm_affinity.iter().find(|(x, _)| *x == v.vm).map(|(_, m)| *m);
                prop_assert!(mask.is_some_and(|m| m != 0 && m & !full_mask(cores) == 0));
                for c in (0..cores).filter(|c| mask.unwrap_or(0) & (1 << c) != 0) {
                    prop_assert!(a.cores[c] >= v.choice.unwrap_or(4));
                }
            }
        }

        #[test]
        fn idle_cores_always_go_to_the_lowest_pstate(
            busy in proptest::collection::vec(prop_oneof![Just(0.0), 0.01f64..1.0], 1..16),
            choice in 0usize..5,
            policy in prop_oneof![Just(ArbiterPolicy::Follow), Just(ArbiterPolicy::Max)],
        ) {
            let cores = busy.len();
            let vms = [VmInput { vm: 0, vcpus: 2, affinity: full_mask(cores), choice: Some(choice) }];
            let fallback = vec![4; cores];
            let placement: Vec<_> = (0..cores).filter(|&c| busy[c] > 0.0).map(|c| placement(0, c)).collect();
            let a = arbitrate(policy, &Inputs { vms: &vms, fallback: &fallback, busy: &busy, placement: &placement });
            for (b, core) in busy.iter().zip(&a.cores) {
                prop_assert_eq!(*core, if *b > 0.0 { choice } else { 0 });
            }
        }
    }
}
