//! Time for devices: a `Clock` the machine is given, never the host clock read
//! directly by a device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Monotonic guest time in nanoseconds since the machine was created.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
    /// Called when every vCPU is idle until `ns`. A virtual clock jumps
    /// there and returns true; the host clock returns false (the caller
    /// sleeps in real time).
    fn warp_to(&self, _ns: u64) -> bool {
        false
    }
    /// The clock as a [`VirtualClock`], for the run loop's deterministic
    /// mode; `None` for the host clock.
    fn as_virtual(&self) -> Option<&VirtualClock> {
        None
    }
}

/// A clock shared by the machine and its devices.
pub type SharedClock = Arc<dyn Clock>;

/// Host monotonic time, for running fast.
#[derive(Debug)]
pub struct HostClock {
    start: Instant,
}

impl HostClock {
    pub fn new() -> Self {
        HostClock {
            start: Instant::now(),
        }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// How the run loop moves a [`VirtualClock`] with guest progress (the
/// deterministic mode): `ns_per_instruction` for each instruction a
/// processor that counts them (the interpreter) retires, `ns_per_exit` for
/// each port-I/O, MMIO or machine-MSR exit (on both processors), and a jump
/// to the next timer deadline while every vCPU is halted. Nothing else (the
/// host's time, window exits, kicks) moves it, so a run is reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestProgress {
    pub ns_per_instruction: u64,
    pub ns_per_exit: u64,
}

impl GuestProgress {
    /// `tandem run --deterministic`: 1 ns an instruction on the interpreter
    /// (its TSC counts instructions at Tandem's 1 GHz), 1 µs a data exit.
    pub const RUN: GuestProgress = GuestProgress {
        ns_per_instruction: 1,
        ns_per_exit: 1_000,
    };
    /// `tandem diff`: exits only, so that both processors (KVM cannot count
    /// instructions without single-stepping) see the same time at each
    /// exit and timers fire at the same instruction boundaries.
    pub const EXITS: GuestProgress = GuestProgress {
        ns_per_instruction: 0,
        ns_per_exit: 1_000,
    };
}

/// Time that moves only when the machine says so: with retired instructions
/// on the interpreter, with exits and steps on KVM. Runs are reproducible.
/// Without [`VirtualClock::set_progress`] only `advance` moves it.
#[derive(Debug, Default)]
pub struct VirtualClock {
    ns: AtomicU64,
    /// The [`GuestProgress`] rates, used once `progress_on` is set.
    per_instruction: AtomicU64,
    per_exit: AtomicU64,
    progress_on: std::sync::atomic::AtomicBool,
}

impl VirtualClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets the run loop move this clock with guest progress.
    pub fn set_progress(&self, p: GuestProgress) {
        self.per_instruction
            .store(p.ns_per_instruction, Ordering::Release);
        self.per_exit.store(p.ns_per_exit, Ordering::Release);
        self.progress_on.store(true, Ordering::Release);
    }

    /// The progress rates, when the run loop moves this clock.
    pub fn progress(&self) -> Option<GuestProgress> {
        self.progress_on
            .load(Ordering::Acquire)
            .then(|| GuestProgress {
                ns_per_instruction: self.per_instruction.load(Ordering::Acquire),
                ns_per_exit: self.per_exit.load(Ordering::Acquire),
            })
    }

    /// Moves time forward by `ns`.
    pub fn advance(&self, ns: u64) {
        self.ns.fetch_add(ns, Ordering::AcqRel);
    }

    /// Moves time forward to `ns` if it is later than now.
    pub fn advance_to(&self, ns: u64) {
        self.ns.fetch_max(ns, Ordering::AcqRel);
    }
}

impl Clock for VirtualClock {
    fn now_ns(&self) -> u64 {
        self.ns.load(Ordering::Acquire)
    }
    fn warp_to(&self, ns: u64) -> bool {
        self.advance_to(ns);
        true
    }
    fn as_virtual(&self) -> Option<&VirtualClock> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_clock_moves_only_when_advanced() {
        let c = VirtualClock::new();
        assert_eq!(c.now_ns(), 0);
        c.advance(10);
        c.advance_to(5);
        assert_eq!(c.now_ns(), 10);
        c.advance_to(100);
        assert_eq!(c.now_ns(), 100);
    }

    #[test]
    fn progress_is_off_until_set() {
        let c = VirtualClock::new();
        assert_eq!(c.progress(), None);
        assert!(c.as_virtual().is_some());
        c.set_progress(GuestProgress::EXITS);
        assert_eq!(c.progress(), Some(GuestProgress::EXITS));
        assert!(HostClock::new().as_virtual().is_none());
    }

    #[test]
    fn host_clock_is_monotonic() {
        let c = HostClock::new();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
    }
}
