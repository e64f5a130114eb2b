//! Threshold scopes and their resolution: the most specific scope that has an entry wins,
//! VM > host > hardware class > fleet, and it wins whole (both thresholds come from it), so an
//! operator reading one entry knows exactly what a VM runs under.
//!
//! Resolution takes a lookup function rather than a container so that the coordinator can
//! resolve against whatever store holds the entries.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where a threshold entry applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThresholdScope {
    /// Every VM in the fleet.
    Fleet,
    /// Every VM on hosts of a hardware class.
    HardwareClass(String),
    /// Every VM on a host.
    Host(String),
    /// One VM (by UUID).
    Vm(String),
}

impl ThresholdScope {
    /// 0 for the fleet up to 3 for a VM: a higher number wins.
    pub const fn specificity(&self) -> u8 {
        match self {
            Self::Fleet => 0,
            Self::HardwareClass(_) => 1,
            Self::Host(_) => 2,
            Self::Vm(_) => 3,
        }
    }

    /// Checks that the scope names something.
    pub fn validate(&self) -> Result<(), ScopeError> {
        match self {
            Self::Fleet => Ok(()),
            Self::HardwareClass(name) | Self::Host(name) | Self::Vm(name) => {
                if name.trim().is_empty() {
                    Err(ScopeError::EmptyName { kind: self.kind() })
                } else if name.contains('/') || name.chars().any(char::is_control) {
                    Err(ScopeError::BadName { kind: self.kind(), name: name.clone() })
                } else {
                    Ok(())
                }
            }
        }
    }

    const fn kind(&self) -> &'static str {
        match self {
            Self::Fleet => "fleet",
            Self::HardwareClass(_) => "class",
            Self::Host(_) => "host",
            Self::Vm(_) => "vm",
        }
    }
}

/// `fleet`, `class/NAME`, `host/NAME` or `vm/UUID`: the form used in keys and on the command line.
impl fmt::Display for ThresholdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fleet => f.write_str("fleet"),
            Self::HardwareClass(n) | Self::Host(n) | Self::Vm(n) => {
                write!(f, "{}/{n}", self.kind())
            }
        }
    }
}

/// A scope that is malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ScopeError {
    /// A class, host or VM scope with an empty name.
    #[error("a {kind} scope needs a name")]
    EmptyName {
        /// Kind of scope.
        kind: &'static str,
    },
    /// A name with a '/' or a control character.
    #[error("{kind} name {name:?} may not contain '/' or control characters")]
    BadName {
        /// Kind of scope.
        kind: &'static str,
        /// The name given.
        name: String,
    },
    /// Text that is not a scope.
    #[error("{0:?} is not a scope; write fleet, class/NAME, host/NAME or vm/UUID")]
    Unparsable(String),
}

impl FromStr for ThresholdScope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let scope = match s.split_once('/') {
            None if s == "fleet" => Self::Fleet,
            Some(("class", n)) => Self::HardwareClass(n.to_owned()),
            Some(("host", n)) => Self::Host(n.to_owned()),
            Some(("vm", n)) => Self::Vm(n.to_owned()),
            _ => return Err(ScopeError::Unparsable(s.to_owned())),
        };
        scope.validate()?;
        Ok(scope)
    }
}

/// Where a VM runs: what its thresholds are resolved against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement<'a> {
    /// The VM's UUID.
    pub vm_id: &'a str,
    /// The host it runs on.
    pub host_id: &'a str,
    /// The host's hardware class.
    pub hardware_class: &'a str,
}

impl Placement<'_> {
    /// The four scopes that apply to the VM, most specific first.
    pub fn scopes(&self) -> [ThresholdScope; 4] {
        [
            ThresholdScope::Vm(self.vm_id.to_owned()),
            ThresholdScope::Host(self.host_id.to_owned()),
            ThresholdScope::HardwareClass(self.hardware_class.to_owned()),
            ThresholdScope::Fleet,
        ]
    }
}

/// The entry that applies to `placement`: the most specific scope for which `lookup` has one.
pub fn resolve<T>(
    placement: &Placement<'_>,
    mut lookup: impl FnMut(&ThresholdScope) -> Option<T>,
) -> Option<(ThresholdScope, T)> {
    placement.scopes().into_iter().find_map(|scope| lookup(&scope).map(|t| (scope, t)))
}

/// Every scope that applies to `placement`, most specific first, with its entry if any. The
/// first `Some` is what [`resolve`] returns.
pub fn explain<T>(
    placement: &Placement<'_>,
    mut lookup: impl FnMut(&ThresholdScope) -> Option<T>,
) -> Vec<(ThresholdScope, Option<T>)> {
    placement
        .scopes()
        .into_iter()
        .map(|scope| {
            let entry = lookup(&scope);
            (scope, entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const VM: Placement<'static> =
        Placement { vm_id: "vm-1", host_id: "h1", hardware_class: "phenom" };

    #[test]
    fn most_specific_wins() {
        let mut book = BTreeMap::new();
        book.insert(ThresholdScope::Fleet, 0.4);
        assert_eq!(resolve(&VM, |s| book.get(s).copied()), Some((ThresholdScope::Fleet, 0.4)));
        book.insert(ThresholdScope::HardwareClass("phenom".into()), 0.5);
        book.insert(ThresholdScope::Host("other".into()), 0.9);
        assert_eq!(resolve(&VM, |s| book.get(s).copied()).map(|(_, t)| t), Some(0.5));
        book.insert(ThresholdScope::Host("h1".into()), 0.6);
        book.insert(ThresholdScope::Vm("vm-1".into()), 0.7);
        assert_eq!(
            resolve(&VM, |s| book.get(s).copied()),
            Some((ThresholdScope::Vm("vm-1".into()), 0.7))
        );
        let chain = explain(&VM, |s| book.get(s).copied());
        assert_eq!(
            chain.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
            [Some(0.7), Some(0.6), Some(0.5), Some(0.4)]
        );
        assert_eq!(resolve(&VM, |_| None::<f64>), None);
    }

    #[test]
    fn scopes_parse_and_print() {
        for s in
            ["fleet", "class/epyc-7502", "host/kvm-17", "vm/4f1c9a2e-0000-4000-8000-000000000001"]
        {
            let scope: ThresholdScope = s.parse().unwrap();
            assert_eq!(scope.to_string(), s);
        }
        for bad in ["", "fleet/x", "class/", "host", "vm/a/b", "rack/r1", "host/ "] {
            assert!(bad.parse::<ThresholdScope>().is_err(), "{bad:?} parsed");
        }
    }

    fn arb_scope() -> impl Strategy<Value = ThresholdScope> {
        let name =
            prop::sample::select(vec!["a", "b", "vm-1", "h1", "phenom"]).prop_map(str::to_owned);
        prop_oneof![
            Just(ThresholdScope::Fleet),
            name.clone().prop_map(ThresholdScope::HardwareClass),
            name.clone().prop_map(ThresholdScope::Host),
            name.prop_map(ThresholdScope::Vm),
        ]
    }

    proptest! {
        #[test]
        fn resolution_honours_precedence(entries in proptest::collection::btree_map(arb_scope(), 0u32..100, 0..12)) {
            let got = resolve(&VM, |s| entries.get(s).copied());
            let applicable: Vec<_> = entries
                .iter()
                .filter(|(s, _)| VM.scopes().contains(s))
                .collect();
            match got {
                None => prop_assert!(applicable.is_empty()),
                Some((scope, value)) => {
                    prop_assert_eq!(entries.get(&scope).copied(), Some(value));
                    for (other, _) in applicable {
                        prop_assert!(other.specificity() <= scope.specificity(), "{} beat {}", scope, other);
                    }
                }
            }
        }
    }
}
