//! Requests from devices to end or restart the run (debug exit, i8042 reset,
//! ACPI poweroff), and the machine's ACPI sleep state (S0 / S3). Devices set
//! them; the run loop checks one flag per exit for a stop and one for a
//! sleep state change.
//!
//! S3 (suspend to RAM, ACPI spec 7.4.2.4 / 16.1.3): the PM block calls
//! [`MachineControl::suspend`] when the guest writes SLP_EN with \_S3's
//! SLP_TYP; from then on no vCPU enters the guest. A wake event (the RTC
//! alarm with RTC_EN) calls [`MachineControl::request_wake`]; the first vCPU
//! of the run loop to see it calls [`MachineControl::complete_wake`], which
//! runs the platform's [`WakeHandler`] (device reset, the firmware's resume
//! vector) and counts the wake; each vCPU then resets itself to the state
//! the firmware hands over in ([`MachineControl::wakes`] tells it that a
//! wake happened since it last looked).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// The machine's ACPI sleep state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SleepState {
    /// S0: working.
    #[default]
    Awake,
    /// S3: no vCPU runs; RAM is kept.
    Suspended,
    /// A wake event came; the run loop has not taken it yet.
    WakePending,
    /// One vCPU's run loop is resetting the platform for the wake.
    Waking,
}

/// What the platform does when it wakes from S3 (the firmware's resume
/// path: QEMU resets the machine, SeaBIOS finds the FACS and jumps to its
/// waking vector).
pub trait WakeHandler: Send + Sync {
    /// Resets the devices as a wake from S3 does, and returns the real-mode
    /// address the boot processor resumes at: the FACS
    /// Firmware_Waking_Vector, `None` (or 0) when the OS set none, in which
    /// case the wake is a reset.
    fn wake(&self) -> Option<u32>;
}

#[derive(Debug, Default)]
struct Sleep {
    state: SleepState,
    /// Wakes completed.
    wakes: u64,
    /// The boot processor's resume address of the last wake.
    resume_vector: Option<u32>,
    /// vCPUs that have reset themselves since the last wake.
    resumed: usize,
}

#[derive(Default)]
pub struct MachineControl {
    requested: AtomicBool,
    request: Mutex<Option<StopRequest>>,
    /// A sleep state change the run loop must look at (a suspend, or a wake
    /// some vCPU has not yet followed).
    power_event: AtomicBool,
    sleep: Mutex<Sleep>,
    wake_handler: Mutex<Option<Arc<dyn WakeHandler>>>,
}

impl std::fmt::Debug for MachineControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MachineControl")
            .field("request", &self.stop_request())
            .field("sleep", &self.sleep_state())
            .finish_non_exhaustive()
    }
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

    fn sleep_lock(&self) -> std::sync::MutexGuard<'_, Sleep> {
        self.sleep.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs what a wake from S3 does (the `pc` machine's device reset
    /// and FACS lookup). Without one, a wake is a reset.
    pub fn set_wake_handler(&self, handler: Arc<dyn WakeHandler>) {
        *self.wake_handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// The guest entered S3: every vCPU stops at its next boundary. Ignored
    /// unless the machine is awake.
    pub fn suspend(&self) {
        let mut s = self.sleep_lock();
        if s.state == SleepState::Awake {
            s.state = SleepState::Suspended;
            self.power_event.store(true, Ordering::Release);
        }
    }

    /// A wake event: returns true when the machine was suspended (and now
    /// waits for the run loop to wake it).
    pub fn request_wake(&self) -> bool {
        let mut s = self.sleep_lock();
        if s.state == SleepState::Suspended {
            s.state = SleepState::WakePending;
            true
        } else {
            false
        }
    }

    /// The sleep state now.
    pub fn sleep_state(&self) -> SleepState {
        self.sleep_lock().state
    }

    /// Whether a sleep state change waits for the run loop (one atomic
    /// load).
    #[inline]
    pub fn power_event(&self) -> bool {
        self.power_event.load(Ordering::Acquire)
    }

    /// Wakes completed so far.
    pub fn wakes(&self) -> u64 {
        self.sleep_lock().wakes
    }

    /// The boot processor's resume address of the last wake.
    pub fn resume_vector(&self) -> Option<u32> {
        self.sleep_lock().resume_vector
    }

    /// Takes a pending wake: runs the wake handler (outside the sleep lock:
    /// it takes device locks, and devices call in here under theirs), then
    /// counts the wake. A wake without a resume vector requests a
    /// [`StopRequest::Reset`]. Returns whether this call woke the machine.
    pub fn complete_wake(&self) -> bool {
        {
            let mut s = self.sleep_lock();
            if s.state != SleepState::WakePending {
                return false;
            }
            s.state = SleepState::Waking;
        }
        let handler = self
            .wake_handler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let vector = handler.and_then(|h| h.wake()).filter(|&v| v != 0);
        if vector.is_none() {
            self.request(StopRequest::Reset);
        }
        let mut s = self.sleep_lock();
        s.state = SleepState::Awake;
        s.wakes += 1;
        s.resume_vector = vector;
        s.resumed = 0;
        true
    }

    /// A vCPU reset itself for the last wake; once all `vcpus` have, the
    /// run loop stops looking.
    pub fn vcpu_resumed(&self, vcpus: usize) {
        let mut s = self.sleep_lock();
        s.resumed += 1;
        if s.state == SleepState::Awake && s.resumed >= vcpus {
            self.power_event.store(false, Ordering::Release);
        }
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

    struct Vector(Option<u32>, std::sync::atomic::AtomicU32);
    impl WakeHandler for Vector {
        fn wake(&self) -> Option<u32> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0
        }
    }

    #[test]
    fn suspend_wake_cycle() {
        let c = MachineControl::new();
        let h = Arc::new(Vector(Some(0x1000), Default::default()));
        c.set_wake_handler(h.clone());
        assert!(!c.power_event());
        // Nothing to wake while awake.
        assert!(!c.request_wake());
        assert!(!c.complete_wake());
        c.suspend();
        assert!(c.power_event());
        assert!(!c.stop_requested(), "a suspend is not a stop");
        assert_eq!(c.sleep_state(), SleepState::Suspended);
        assert!(!c.complete_wake(), "no wake event yet");
        assert!(c.request_wake());
        assert!(!c.request_wake(), "one wake at a time");
        assert_eq!(c.sleep_state(), SleepState::WakePending);
        assert!(c.complete_wake());
        assert!(!c.complete_wake());
        assert_eq!(h.1.load(Ordering::SeqCst), 1);
        assert_eq!(c.sleep_state(), SleepState::Awake);
        assert_eq!(c.wakes(), 1);
        assert_eq!(c.resume_vector(), Some(0x1000));
        assert!(!c.stop_requested());
        // The flag stays up until both vCPUs followed the wake.
        c.vcpu_resumed(2);
        assert!(c.power_event());
        c.vcpu_resumed(2);
        assert!(!c.power_event());
    }

    #[test]
    fn wake_without_vector_is_a_reset() {
        for h in [None, Some(Arc::new(Vector(Some(0), Default::default())))] {
            let c = MachineControl::new();
            if let Some(h) = h {
                c.set_wake_handler(h);
            }
            c.suspend();
            assert!(c.request_wake());
            assert!(c.complete_wake());
            assert_eq!(c.stop_request(), Some(StopRequest::Reset));
            assert_eq!(c.resume_vector(), None);
        }
    }
}
