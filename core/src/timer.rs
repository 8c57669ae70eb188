//! Device timers: each timer device reports when it next needs service in
//! guest-clock nanoseconds; the run loop fires due timers before each entry,
//! and a watcher thread rings the vCPUs' doorbells when a deadline passes
//! while they run guest code (kicking KVM out of KVM_RUN).

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use crate::clock::SharedClock;
use crate::vcpu::Doorbell;

/// A device with a timer (PIT counter, LAPIC timer, RTC).
pub trait TimerDevice: Send + Sync {
    /// Guest-clock time of the next event, if any.
    fn deadline(&self) -> Option<u64>;
    /// Brings the device up to `now`: updates counters, raises lines.
    fn fire(&self, now: u64);
}

/// Asks the kernel to wake the calling thread within a microsecond of its
/// timeouts instead of the default 50 µs slack: a halted vCPU waiting for a
/// 20 µs LAPIC timer must not sleep three times as long.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only the
    // calling thread's timer slack; no memory is passed.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
}

#[derive(Default)]
pub struct TimerSet {
    timers: RwLock<Vec<Arc<dyn TimerDevice>>>,
    generation: Mutex<u64>,
    changed: Condvar,
}

impl std::fmt::Debug for TimerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerSet")
            .field("next_deadline", &self.next_deadline())
            .finish()
    }
}

impl TimerSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, t: Arc<dyn TimerDevice>) {
        self.timers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(t);
        self.rearm();
    }

    /// A device changed its deadline: the watcher recomputes its sleep.
    pub fn rearm(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.wrapping_add(1);
        self.changed.notify_all();
    }

    /// Fires every timer whose deadline is at or before `now`.
    pub fn fire_due(&self, now: u64) {
        let timers = self.timers.read().unwrap_or_else(|p| p.into_inner());
        for t in timers.iter() {
            if t.deadline().is_some_and(|d| d <= now) {
                t.fire(now);
            }
        }
    }

    /// The earliest deadline of all timers.
    pub fn next_deadline(&self) -> Option<u64> {
        let timers = self.timers.read().unwrap_or_else(|p| p.into_inner());
        timers.iter().filter_map(|t| t.deadline()).min()
    }

    /// Starts the thread that rings `bells` when a deadline passes on
    /// `clock`. It ends when `stop` returns true (checked at least every
    /// 100 ms).
    pub fn spawn_watcher(
        self: &Arc<Self>,
        clock: SharedClock,
        bells: Vec<Arc<Doorbell>>,
        stop: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let set = self.clone();
        std::thread::Builder::new()
            .name("tandem-timers".into())
            .spawn(move || {
                tight_timer_slack();
                let mut rung: Option<u64> = None;
                while !stop() {
                    let now = clock.now_ns();
                    let next = set.next_deadline();
                    let wait = match next {
                        Some(d) if d <= now => {
                            if rung != Some(d) {
                                for b in &bells {
                                    b.ring();
                                }
                                rung = Some(d);
                            }
                            // Wait for the vCPU to serve it and re-arm.
                            Duration::from_millis(1)
                        }
                        Some(d) => Duration::from_nanos(d - now).min(Duration::from_millis(100)),
                        None => Duration::from_millis(100),
                    };
                    let g = set.generation.lock().unwrap_or_else(|p| p.into_inner());
                    let seen = *g;
                    let _ = set.changed.wait_timeout_while(g, wait, |gen| *gen == seen);
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, VirtualClock};
    use std::sync::atomic::{AtomicU64, Ordering};

    struct OneShot {
        at: AtomicU64,
        fired: AtomicU64,
    }
    impl TimerDevice for OneShot {
        fn deadline(&self) -> Option<u64> {
            let a = self.at.load(Ordering::SeqCst);
            (a != u64::MAX).then_some(a)
        }
        fn fire(&self, now: u64) {
            self.fired.store(now, Ordering::SeqCst);
            self.at.store(u64::MAX, Ordering::SeqCst);
        }
    }

    #[test]
    fn fires_only_due_timers() {
        let s = TimerSet::new();
        let t = Arc::new(OneShot {
            at: AtomicU64::new(100),
            fired: AtomicU64::new(0),
        });
        s.add(t.clone());
        assert_eq!(s.next_deadline(), Some(100));
        s.fire_due(99);
        assert_eq!(t.fired.load(Ordering::SeqCst), 0);
        s.fire_due(150);
        assert_eq!(t.fired.load(Ordering::SeqCst), 150);
        assert_eq!(s.next_deadline(), None);
    }

    #[test]
    fn watcher_rings_when_deadline_passes() {
        let s = Arc::new(TimerSet::new());
        let clock = Arc::new(VirtualClock::new());
        s.add(Arc::new(OneShot {
            at: AtomicU64::new(1000),
            fired: AtomicU64::new(0),
        }));
        let bell = Arc::new(Doorbell::new());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let h = s
            .spawn_watcher(
                clock.clone(),
                vec![bell.clone()],
                Arc::new(move || st.load(Ordering::SeqCst)),
            )
            .unwrap();
        assert!(!bell.take());
        clock.advance(2000);
        assert!(clock.now_ns() >= 1000);
        s.rearm();
        let mut rang = false;
        for _ in 0..200 {
            if bell.take() {
                rang = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::SeqCst);
        s.rearm();
        h.join().unwrap();
        assert!(rang);
    }
}
