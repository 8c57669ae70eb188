//! Forcing a vCPU out of KVM_RUN from another thread: set `immediate_exit`
//! in its kvm_run page (so a KVM_RUN about to start returns at once) and send
//! its thread a signal (so a KVM_RUN under way returns with EINTR). This is
//! what QEMU does with `kvm_cpu_kick`.

use std::sync::{Mutex, Once};

use kvm_ioctls::VcpuFd;
use tandem_core::vcpu::Kick;

static HANDLER: Once = Once::new();

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

fn install_handler() {
    HANDLER.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler
        // is an async-signal-safe empty function; SA_RESTART keeps other
        // syscalls of the vCPU thread from failing with EINTR (KVM_RUN
        // still returns EINTR, it is not restartable).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

struct Target {
    /// `&kvm_run.immediate_exit`, null once the vCPU is gone.
    immediate_exit: *mut u8,
    /// The thread inside KVM_RUN, if any.
    thread: Option<libc::pthread_t>,
}

/// The kick handle of one KVM vCPU.
pub struct KvmKicker {
    target: Mutex<Target>,
}

// SAFETY: the raw pointer is only dereferenced under the mutex, and `detach`
// nulls it (under the same mutex) before the kvm_run mapping is unmapped.
unsafe impl Send for KvmKicker {}
// SAFETY: see Send.
unsafe impl Sync for KvmKicker {}

impl KvmKicker {
    pub(crate) fn new(fd: &mut VcpuFd) -> std::sync::Arc<KvmKicker> {
        install_handler();
        let run = fd.get_kvm_run();
        std::sync::Arc::new(KvmKicker {
            target: Mutex::new(Target {
                immediate_exit: &mut run.immediate_exit as *mut u8,
                thread: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Target> {
        self.target.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calling thread is about to enter KVM_RUN.
    pub(crate) fn enter_run(&self) {
        // SAFETY: pthread_self has no preconditions.
        self.lock().thread = Some(unsafe { libc::pthread_self() });
    }

    /// The calling thread left KVM_RUN: no more signals, and a consumed kick
    /// is cleared.
    pub(crate) fn leave_run(&self, fd: &mut VcpuFd) {
        let mut t = self.lock();
        t.thread = None;
        fd.set_kvm_immediate_exit(0);
    }

    /// The vCPU is being destroyed.
    pub(crate) fn detach(&self) {
        let mut t = self.lock();
        t.immediate_exit = std::ptr::null_mut();
        t.thread = None;
    }
}

impl Kick for KvmKicker {
    fn kick(&self) {
        let t = self.lock();
        if !t.immediate_exit.is_null() {
            // SAFETY: non-null means the vCPU (and its kvm_run mapping) still
            // exists; KVM reads this byte at KVM_RUN entry, a racy byte store
            // is what the KVM API expects (QEMU does the same).
            unsafe { std::ptr::write_volatile(t.immediate_exit, 1) };
        }
        if let Some(th) = t.thread {
            // SAFETY: `thread` is only Some while that thread is between
            // enter_run and leave_run, and leave_run needs this mutex, so the
            // thread is alive during pthread_kill.
            unsafe { libc::pthread_kill(th, kick_signal()) };
        }
    }
}
