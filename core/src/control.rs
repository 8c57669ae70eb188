//! Requests from devices to end or restart the run (debug exit, i8042 reset,
//! ACPI poweroff). Devices set them; the run loop checks one flag per exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Why the machine stops at the guest's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// A value written to the isa-debug-exit port; the process status is
    /// `(value << 1) | 1`.
    DebugExit(u32),
    /// A reset through the i8042 or port 0xCF9.
    Reset,
    /// ACPI or APM poweroff.
    Poweroff,
    /// The VMM's wall-clock limit (`tandem run --timeout`) ran out.
    Timeout,
}

impl StopRequest {
    /// The process status for this stop.
    pub fn exit_status(&self) -> i32 {
        match self {
            StopRequest::DebugExit(v) => ((v << 1) | 1) as i32,
            StopRequest::Reset | StopRequest::Poweroff => 0,
            StopRequest::Timeout => 5,
        }
    }
}

#[derive(Debug, Default)]
pub struct MachineControl {
    requested: AtomicBool,
    request: Mutex<Option<StopRequest>>,
}

impl MachineControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the machine to stop. The first request wins.
    pub fn request(&self, r: StopRequest) {
        let mut g = self.request.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.requested.store(true, Ordering::Release);
    }

    /// Whether a stop was requested (one atomic load).
    #[inline]
    pub fn stop_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn stop_request(&self) -> Option<StopRequest> {
        *self.request.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_maps_status() {
        let c = MachineControl::new();
        assert!(!c.stop_requested());
        c.request(StopRequest::DebugExit(3));
        c.request(StopRequest::Reset);
        assert!(c.stop_requested());
        assert_eq!(c.stop_request(), Some(StopRequest::DebugExit(3)));
        assert_eq!(StopRequest::DebugExit(3).exit_status(), 7);
        assert_eq!(StopRequest::DebugExit(0).exit_status(), 1);
        assert_eq!(StopRequest::Poweroff.exit_status(), 0);
    }
}
