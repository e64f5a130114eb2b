//! Per-VM frequency at every context switch, on a stock kernel, through utilisation clamps:
//! `sched_setattr` with `SCHED_FLAG_UTIL_CLAMP_MIN|MAX` on each vCPU thread. schedutil then
//! requests, whenever that thread runs on a core, the frequency its clamped utilisation asks
//! for: the closest stock-Linux match to the report's per-context-switch DVFS. Clamps need
//! `CONFIG_UCLAMP_TASK` (EOPNOTSUPP without it) and act only under the schedutil governor.
//!
//! A P-state maps to the clamp `floor(f / f_max × 1024)`, set as both minimum and maximum so
//! that the thread's own load neither lowers nor raises the request. Since Linux 6.8 schedutil
//! maps a utilisation linearly to `f_max × util / 1024` and resolves it to the lowest listed
//! frequency at or above (the floor keeps the target at or under f, so it resolves to f). Older
//! kernels add 25% headroom after clamping, so there a clamp lands one or two P-states higher.
//! Clearing a VM's P-state puts the defaults back (0..=1024); vmgov assumes nothing else clamps
//! vCPU threads.
//!
//! This module holds the workspace's only `unsafe`: the one function that makes the syscall,
//! since neither libc nor nix wraps `sched_setattr`, and libc's `sched_attr` lacks the clamp
//! fields.

use std::io;

use thiserror::Error;

/// The utilisation scale: 1024 is a whole CPU at f_max.
pub const SCHED_CAPACITY_SCALE: u32 = 1024;

/// Why a clamp could not be set.
#[derive(Debug, Error)]
pub enum UclampError {
    /// The kernel has no utilisation clamping.
    #[error(
        "sched_setattr with utilisation clamps is not supported by this kernel ({0}: built \
         without CONFIG_UCLAMP_TASK, or older than Linux 5.3)"
    )]
    Unsupported(&'static str),
    /// The syscall failed for a thread.
    #[error("sched_setattr on thread {tid}")]
    Thread {
        /// The thread.
        tid: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The utilisation clamp that asks schedutil for `frequency_hz` on a core whose top is
/// `f_max_hz` (1..=1024).
pub fn util_for(frequency_hz: f64, f_max_hz: f64) -> u32 {
    if !(frequency_hz.is_finite() && f_max_hz.is_finite() && f_max_hz > 0.0) {
        return SCHED_CAPACITY_SCALE;
    }
    let u = (frequency_hz / f_max_hz * f64::from(SCHED_CAPACITY_SCALE)).floor();
    #[allow(clippy::cast_possible_truncation, reason = "in 1..=1024 after the clamp: exact")]
    let u = u.clamp(1.0, f64::from(SCHED_CAPACITY_SCALE)) as u32;
    u
}

/// `struct sched_attr` as of Linux 5.3 (SCHED_ATTR_SIZE_VER1, 56 bytes), with the clamp fields
/// libc leaves out.
#[repr(C)]
#[derive(Debug, Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

const SCHED_ATTR_SIZE_VER1: u32 = 56;
const _: () = assert!(std::mem::size_of::<SchedAttr>() == SCHED_ATTR_SIZE_VER1 as usize);

/// Keep policy and parameters; change only the clamps.
const FLAGS: u64 = (libc::SCHED_FLAG_KEEP_POLICY
    | libc::SCHED_FLAG_KEEP_PARAMS
    | libc::SCHED_FLAG_UTIL_CLAMP_MIN
    | libc::SCHED_FLAG_UTIL_CLAMP_MAX) as u64;

/// The syscall. `tid` 0 is the calling thread.
#[allow(unsafe_code, reason = "sched_setattr has no safe wrapper in libc or nix")]
fn sched_setattr(tid: libc::pid_t, attr: &SchedAttr) -> io::Result<()> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` struct whose layout is the kernel's
    // `struct sched_attr` (VER1, 56 bytes, checked at compile time) and whose `size` field says
    // so; the kernel only reads `size` bytes from the pointer during the call and keeps no
    // reference to it. The last argument (flags) must be 0.
    let r = unsafe {
        libc::syscall(libc::SYS_sched_setattr, tid, std::ptr::from_ref(attr), 0 as libc::c_uint)
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn attr(min: u32, max: u32) -> SchedAttr {
    SchedAttr {
        size: SCHED_ATTR_SIZE_VER1,
        sched_flags: FLAGS,
        sched_util_min: min.min(SCHED_CAPACITY_SCALE),
        sched_util_max: max.min(SCHED_CAPACITY_SCALE),
        ..SchedAttr::default()
    }
}

fn classify(tid: u32, e: io::Error) -> UclampError {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => UclampError::Unsupported("EOPNOTSUPP"),
        Some(libc::E2BIG) => UclampError::Unsupported("E2BIG"),
        Some(libc::ENOSYS) => UclampError::Unsupported("ENOSYS"),
        _ => UclampError::Thread { tid, source: e },
    }
}

/// Whether this kernel clamps utilisation: sets the default clamps (0..=1024, a no-op) on the
/// calling thread.
pub fn probe() -> Result<(), UclampError> {
    sched_setattr(0, &attr(0, SCHED_CAPACITY_SCALE)).map_err(|e| classify(0, e))
}

/// Clamps thread `tid`'s utilisation to `min..=max` (of 1024).
pub fn set(tid: u32, min: u32, max: u32) -> Result<(), UclampError> {
    let id = libc::pid_t::try_from(tid).map_err(|_| UclampError::Thread {
        tid,
        source: io::Error::from_raw_os_error(libc::ESRCH),
    })?;
    if id == 0 {
        // 0 would mean the calling thread.
        return Err(UclampError::Thread { tid, source: io::Error::from_raw_os_error(libc::ESRCH) });
    }
    sched_setattr(id, &attr(min, max)).map_err(|e| classify(tid, e))
}

/// Puts thread `tid`'s clamps back to the defaults.
pub fn clear(tid: u32) -> Result<(), UclampError> {
    set(tid, 0, SCHED_CAPACITY_SCALE)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn pstates_map_to_clamps() {
        assert_eq!(util_for(2.2e9, 2.2e9), 1024);
        assert_eq!(util_for(1.1e9, 2.2e9), 512);
        assert_eq!(util_for(1.4e9, 2.2e9), 651);
        assert_eq!(util_for(f64::NAN, 2.2e9), 1024);
        assert_eq!(util_for(1e3, 2.2e9), 1);
    }

    #[test]
    fn probing_says_whether_clamps_work() {
        match probe() {
            Ok(()) => {
                // A kernel with clamps: setting and clearing on a thread of this process works.
                let tid = u32::try_from(nix::unistd::gettid().as_raw()).unwrap();
                set(tid, 512, 512).unwrap();
                clear(tid).unwrap();
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, UclampError::Unsupported(_)), "{msg}");
                assert!(msg.contains("CONFIG_UCLAMP_TASK"), "{msg}");
            }
        }
    }

    #[test]
    fn a_thread_that_does_not_exist_is_named() {
        match set(5_000_000, 0, 1024) {
            Err(UclampError::Thread { tid, source }) => {
                assert_eq!(tid, 5_000_000);
                assert_eq!(source.raw_os_error(), Some(libc::ESRCH));
            }
            Err(UclampError::Unsupported(_)) => {}
            Ok(()) => panic!("thread 5000000 cannot exist"),
        }
        assert!(matches!(set(0, 0, 1024), Err(UclampError::Thread { tid: 0, .. })));
    }

    proptest! {
        #[test]
        fn clamps_are_monotone_and_in_range(a in 1.0e6f64..5e9, b in 1.0e6f64..5e9, top in 1.0e8f64..5e9) {
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let (ul, uh) = (util_for(lo, top), util_for(hi, top));
            prop_assert!(ul <= uh);
            prop_assert!((1..=1024).contains(&ul) && (1..=1024).contains(&uh));
            // The frequency a clamp asks for never exceeds the P-state's (below f_max).
            if hi <= top {
                prop_assert!(f64::from(uh) / 1024.0 * top <= hi * (1.0 + 1e-12));
            }
        }
    }
}
