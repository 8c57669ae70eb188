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

/// Time that moves only when the machine says so: with retired instructions
/// on the interpreter, with exits and steps on KVM. Runs are reproducible.
#[derive(Debug, Default)]
pub struct VirtualClock {
    ns: AtomicU64,
}

impl VirtualClock {
    pub fn new() -> Self {
        Self::default()
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
    fn host_clock_is_monotonic() {
        let c = HostClock::new();
        let a = c.now_ns();
        let b = c.now_ns();
        assert!(b >= a);
    }
}
