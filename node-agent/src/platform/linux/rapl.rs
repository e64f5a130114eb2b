//! Package energy from RAPL through powercap sysfs, because learning mode labels every sample
//! with the power it cost and RAPL is the only meter on a stock server. Only package zones
//! (`intel-rapl:N` named `package-N`) are summed: their sub-zones (core, uncore, dram) are
//! parts of them or outside the package. AMD hosts expose the same `intel-rapl` tree.
//!
//! `energy_uj` is a free-running counter that wraps at `max_energy_range_uj` (about every
//! minute on a busy server), so every delta is taken modulo that range: the agent samples far
//! more often than a counter can wrap twice. Since 2020 (CVE-2020-8694) `energy_uj` is
//! readable by root only; an agent not running as root is told so.

use std::{
    io,
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Why RAPL could not be read.
#[derive(Debug, Error)]
pub enum RaplError {
    /// No package zone under powercap.
    #[error(
        "no RAPL package zone under {} (no powercap driver, as in most virtual machines)",
        path.display()
    )]
    Absent {
        /// The directory looked in.
        path: PathBuf,
    },
    /// A file could not be read.
    #[error("reading {}{}", path.display(), if source.kind() == io::ErrorKind::PermissionDenied { " (energy_uj is readable by root only)" } else { "" })]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file did not hold a number.
    #[error("{}: {value:?} is not a number of microjoules", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it held.
        value: String,
    },
}

/// Energy between two readings of a counter that wraps after `max_range_uj`.
pub fn delta_uj(previous: u64, now: u64, max_range_uj: u64) -> u64 {
    if now >= previous {
        now - previous
    } else {
        max_range_uj.saturating_sub(previous).saturating_add(now)
    }
}

/// True for a top-level package zone's name (`package-0`).
pub fn is_package(name: &str) -> bool {
    name.strip_prefix("package-")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Debug)]
struct Zone {
    energy: PathBuf,
    max_range_uj: u64,
    last_uj: u64,
}

fn read_u64(path: &Path) -> Result<u64, RaplError> {
    let s = std::fs::read_to_string(path)
        .map_err(|source| RaplError::Read { path: path.into(), source })?;
    s.trim().parse().map_err(|_| RaplError::Parse { path: path.into(), value: s.trim().to_owned() })
}

/// The package energy meters of a host.
#[derive(Debug)]
pub struct Rapl {
    zones: Vec<Zone>,
}

impl Rapl {
    /// Finds the package zones under `sys_root/class/powercap` and takes a first reading.
    pub fn open(sys_root: &Path) -> Result<Self, RaplError> {
        let dir = sys_root.join("class/powercap");
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(d) => d
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix("intel-rapl:"))
                        .is_some_and(|rest| !rest.contains(':'))
                })
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(RaplError::Read { path: dir, source }),
        };
        names.sort();
        let mut zones = Vec::new();
        for zone in names {
            let name = std::fs::read_to_string(zone.join("name")).unwrap_or_default();
            if !is_package(name.trim()) {
                continue;
            }
            let energy = zone.join("energy_uj");
            let max_range_uj = read_u64(&zone.join("max_energy_range_uj"))?;
            let last_uj = read_u64(&energy)?;
            zones.push(Zone { energy, max_range_uj, last_uj });
        }
        if zones.is_empty() {
            return Err(RaplError::Absent { path: dir });
        }
        Ok(Self { zones })
    }

    /// Package zones found.
    pub fn packages(&self) -> usize {
        self.zones.len()
    }

    /// Joules used by every package since the previous call (or since `open`).
    pub fn joules_since_last(&mut self) -> Result<f64, RaplError> {
        let mut uj = 0u64;
        for z in &mut self.zones {
            let now = read_u64(&z.energy)?;
            uj = uj.saturating_add(delta_uj(z.last_uj, now, z.max_range_uj));
            z.last_uj = now;
        }
        Ok(uj as f64 * 1e-6)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::platform::linux::fixture::Tree;

    fn zone(t: &Tree, zone: &str, name: &str, energy: u64, max: u64) {
        let d = format!("sys/class/powercap/{zone}");
        t.write(&format!("{d}/name"), &format!("{name}\n"));
        t.write(&format!("{d}/energy_uj"), &format!("{energy}\n"));
        t.write(&format!("{d}/max_energy_range_uj"), &format!("{max}\n"));
    }

    #[test]
    fn packages_are_summed_and_wraps_handled() {
        let t = Tree::new();
        zone(&t, "intel-rapl:0", "package-0", 1_000_000, 262_143_328_850);
        zone(&t, "intel-rapl:1", "package-1", 262_143_000_000, 262_143_328_850);
        zone(&t, "intel-rapl:0:0", "core", 5, 262_143_328_850);
        zone(&t, "intel-rapl:2", "psys", 5, 262_143_328_850);
        let mut r = Rapl::open(&t.path("sys")).unwrap();
        assert_eq!(r.packages(), 2);
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "3000000\n");
        // Package 1 wraps: 328_850 µJ to the top, then 671_150 µJ more.
        t.write("sys/class/powercap/intel-rapl:1/energy_uj", "671150\n");
        t.write("sys/class/powercap/intel-rapl:0:0/energy_uj", "999999999\n");
        let j = r.joules_since_last().unwrap();
        assert!((j - 3.0).abs() < 1e-9, "{j}");
        assert!(r.joules_since_last().unwrap().abs() < 1e-12);
    }

    #[test]
    fn absent_and_unreadable_are_named() {
        let t = Tree::new();
        t.write("sys/class/thermal/x", "");
        let e = Rapl::open(&t.path("sys")).unwrap_err().to_string();
        assert!(e.starts_with("no RAPL package zone") && e.contains("powercap"), "{e}");
        zone(&t, "intel-rapl:0", "package-0", 7, 100);
        t.remove("sys/class/powercap/intel-rapl:0/energy_uj");
        let e = Rapl::open(&t.path("sys")).unwrap_err().to_string();
        assert!(e.contains("intel-rapl:0/energy_uj"), "{e}");
    }

    #[test]
    fn names() {
        assert!(is_package("package-0") && is_package("package-12"));
        assert!(!is_package("package-") && !is_package("core") && !is_package("package-x"));
    }

    proptest! {
        #[test]
        fn deltas_stay_within_the_range(max in 1u64..u64::MAX / 2, a in any::<u64>(), b in any::<u64>()) {
            let (a, b) = (a % max, b % max);
            let d = delta_uj(a, b, max);
            prop_assert!(d <= max);
            prop_assert_eq!((a + d) % max, b);
        }

        #[test]
        fn reading_any_text_never_panics(text in "\\PC{0,40}") {
            let t = Tree::new();
            zone(&t, "intel-rapl:0", "package-0", 0, 10);
            t.write("sys/class/powercap/intel-rapl:0/energy_uj", &text);
            let _ = Rapl::open(&t.path("sys"));
        }
    }
}
