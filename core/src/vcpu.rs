//! The processor interface both backends implement.
//!
//! It is shaped like VMX as a VMM sees it: the VMM enters the guest with at
//! most one event to deliver, may ask for an exit as soon as the guest can
//! take an interrupt (interrupt-window exiting) or an NMI (NMI-window
//! exiting), and at every exit reads RFLAGS.IF, the interruptibility state and
//! the event whose delivery the exit cut short (IDT-vectoring information).
//! KVM supplies these from hardware through KVM_RUN and friends; the
//! interpreter implements them in software.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use thiserror::Error;

use crate::cpu::{DebugRegs, Event, FpuState, MpState, Msr, Regs, Sregs, VcpuEvents, VcpuState};

/// Why the processor stopped running guest code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// IN / INS: fill [`Vcpu::io_data`] (`size * count` bytes) before the next run.
    IoIn { port: u16, size: u8, count: u32 },
    /// OUT / OUTS: the data is in [`Vcpu::io_data`].
    IoOut { port: u16, size: u8, count: u32 },
    /// A read of a guest-physical address that is not RAM: fill
    /// [`Vcpu::mmio_data`] before the next run.
    MmioRead { addr: u64, len: u8 },
    /// A write to a guest-physical address that is not RAM; the data is in
    /// [`Vcpu::mmio_data`].
    MmioWrite { addr: u64, len: u8 },
    /// RDMSR of an MSR the machine owns; answer with [`Vcpu::complete_rdmsr`].
    RdMsr { index: u32 },
    /// WRMSR of an MSR the machine owns; answer with [`Vcpu::complete_wrmsr`].
    WrMsr { index: u32, value: u64 },
    /// HLT: the processor waits for an interrupt, an NMI or a reset.
    Hlt,
    /// Interrupt-window exiting was on and the guest can take an interrupt.
    InterruptWindow,
    /// NMI-window exiting was on and the guest can take an NMI.
    NmiWindow,
    /// Triple fault (or another shutdown condition).
    Shutdown,
    /// A debug event (single step, breakpoint) the VMM asked for.
    Debug { exception: u8, dr6: u64, rip: u64 },
    /// The run was interrupted from outside (a kick); nothing to emulate.
    Kicked,
    /// The guest lowered CR8 below what was last given (KVM_EXIT_SET_TPR):
    /// an interrupt the TPR held back may now be deliverable.
    TprLowered,
    /// The processor could not emulate an instruction (KVM internal error,
    /// emulation suberror). `insn` holds the bytes it reported, if any.
    EmulationFailure { insn: Vec<u8> },
    /// Another internal error of the processor.
    InternalError { suberror: u32, data: Vec<u64> },
    /// VM entry failed with a hardware reason.
    FailEntry { reason: u64 },
    /// An exit the machine has no handling for.
    Unhandled(String),
}

/// Whether the guest can take an event now, read at the last exit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Readiness {
    /// RFLAGS.IF.
    pub if_flag: bool,
    /// No STI / MOV SS shadow, IF set and no event already queued: an
    /// external interrupt injected now is delivered at the next boundary.
    /// (KVM's `ready_for_interrupt_injection`.)
    pub interrupt: bool,
    /// An NMI handed over now will not be lost. On KVM this is always true:
    /// KVM queues NMIs and opens its own NMI window. On the interpreter it is
    /// "not NMI-blocked and not in a MOV SS shadow" (SDM vol. 3, 25.3).
    pub nmi: bool,
}

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("{op} failed: {source}")]
    Host {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl VcpuError {
    pub fn host(op: &'static str, errno: i32) -> VcpuError {
        VcpuError::Host {
            op,
            source: std::io::Error::from_raw_os_error(errno),
        }
    }
}

pub type VcpuResult<T> = Result<T, VcpuError>;

/// Something that can force a running vCPU out of guest mode from another
/// thread.
pub trait Kick: Send + Sync {
    fn kick(&self);
}

/// One processor. The run loop in [`crate::machine`] drives it; it never
/// touches devices itself.
pub trait Vcpu: Send {
    /// The vCPU index (= initial APIC ID).
    fn id(&self) -> u32;
    /// "kvm" or "interp".
    fn backend(&self) -> &'static str;

    /// Runs guest code until the next exit.
    fn run(&mut self) -> VcpuResult<VcpuExit>;
    /// Data buffer of the current port-I/O exit.
    fn io_data(&mut self) -> &mut [u8];
    /// Data buffer of the current MMIO exit.
    fn mmio_data(&mut self) -> &mut [u8];
    /// Answer to an RdMsr exit; `None` raises #GP(0) in the guest.
    fn complete_rdmsr(&mut self, value: Option<u64>);
    /// Answer to a WrMsr exit; `false` raises #GP(0) in the guest.
    fn complete_wrmsr(&mut self, ok: bool);

    /// CR8 as of the last exit (the guest may have moved to it).
    fn cr8(&mut self) -> u64;
    /// CR8 for the next entry (the LAPIC's TPR changed through its page or
    /// MSR).
    fn set_cr8(&mut self, cr8: u64);

    /// Readiness to take an event, as of the last exit. A processor whose
    /// last exit left an instruction unfinished (KVM: port I/O, MMIO, MSR)
    /// finishes it first, so that an STI or MOV SS shadow the instruction
    /// creates is seen (SDM vol. 3, 6.8.3).
    fn readiness(&mut self) -> VcpuResult<Readiness>;
    /// Delivers `event` at the next entry.
    fn inject(&mut self, event: Event) -> VcpuResult<()>;
    /// Asks for an exit as soon as the guest can take an interrupt.
    fn set_interrupt_window_exiting(&mut self, on: bool);
    /// Asks for an exit as soon as the guest can take an NMI.
    fn set_nmi_window_exiting(&mut self, on: bool);
    /// An event whose delivery the last exit cut short and which the VMM must
    /// reinject. KVM reinjects by itself and always answers `None`.
    fn idt_vectoring(&mut self) -> Option<Event>;

    fn get_regs(&mut self) -> VcpuResult<Regs>;
    fn set_regs(&mut self, regs: &Regs) -> VcpuResult<()>;
    fn get_sregs(&mut self) -> VcpuResult<Sregs>;
    fn set_sregs(&mut self, sregs: &Sregs) -> VcpuResult<()>;
    fn get_debug_regs(&mut self) -> VcpuResult<DebugRegs>;
    fn set_debug_regs(&mut self, dr: &DebugRegs) -> VcpuResult<()>;
    fn get_fpu(&mut self) -> VcpuResult<FpuState>;
    fn set_fpu(&mut self, fpu: &FpuState) -> VcpuResult<()>;
    fn get_msrs(&mut self, indices: &[u32]) -> VcpuResult<Vec<Msr>>;
    fn set_msrs(&mut self, msrs: &[Msr]) -> VcpuResult<()>;
    fn get_events(&mut self) -> VcpuResult<VcpuEvents>;
    fn set_events(&mut self, events: &VcpuEvents) -> VcpuResult<()>;
    fn get_mp_state(&mut self) -> VcpuResult<MpState>;
    fn set_mp_state(&mut self, state: MpState) -> VcpuResult<()>;

    /// A handle other threads use to force this vCPU out of `run`.
    fn kicker(&self) -> Arc<dyn Kick>;

    /// Instructions retired so far, for a processor that counts them (the
    /// interpreter); `None` where they cannot be counted (KVM). The
    /// deterministic run loop moves the virtual clock with it.
    fn instructions_retired(&self) -> Option<u64> {
        None
    }

    /// Makes the next `run` return [`VcpuExit::Kicked`] once `instructions`
    /// more have retired (`None`: no limit), so that the deterministic run
    /// loop stops exactly where the next timer deadline falls. Processors
    /// that cannot count instructions (KVM) ignore it.
    fn set_run_limit(&mut self, _instructions: Option<u64>) {}

    /// Pause-loop exiting, as VMX's PLE: `run` returns
    /// [`VcpuExit::Kicked`] after the guest has executed `pauses` PAUSE
    /// instructions (`None`: never). Round-robin vCPUs sharing one thread
    /// use it so a vCPU spinning on another's answer hands over at once.
    /// Processors with their own threads (KVM) ignore it.
    fn set_pause_exiting(&mut self, _pauses: Option<u32>) {}

    /// Debugging the guest from the VMM (KVM_SET_GUEST_DEBUG): with
    /// `single_step`, `run` returns [`VcpuExit::Debug`] after one
    /// instruction (or, when an injected event is delivered first, at the
    /// handler's first instruction); each address of `hw_breakpoints` (a
    /// linear address, CS.base + RIP) returns [`VcpuExit::Debug`] before the
    /// instruction there executes. The guest's own DR0-DR7 are left alone.
    /// `false` and `&[]` turn it off.
    fn set_guest_debug(&mut self, single_step: bool, hw_breakpoints: &[u64]) -> VcpuResult<()> {
        if !single_step && hw_breakpoints.is_empty() {
            return Ok(());
        }
        Err(VcpuError::Unsupported(format!(
            "the {} processor has no guest debugging",
            self.backend()
        )))
    }

    /// The whole architectural state.
    fn get_state(&mut self) -> VcpuResult<VcpuState> {
        Ok(VcpuState {
            regs: self.get_regs()?,
            sregs: self.get_sregs()?,
            debug: self.get_debug_regs()?,
            fpu: self.get_fpu()?,
            msrs: self.get_msrs(crate::cpu::msr::TRANSFERRED)?,
            events: self.get_events()?,
            mp_state: self.get_mp_state()?,
        })
    }

    /// Loads the whole architectural state.
    fn set_state(&mut self, s: &VcpuState) -> VcpuResult<()> {
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        self.set_debug_regs(&s.debug)?;
        self.set_fpu(&s.fpu)?;
        self.set_msrs(&s.msrs)?;
        self.set_events(&s.events)?;
        self.set_mp_state(s.mp_state)
    }
}

/// The doorbell of one vCPU: devices ring it when an event becomes pending
/// for that vCPU. A halted vCPU sleeps on it; a vCPU inside the guest is
/// kicked out so that the injection ladder runs.
///
/// The handshake with the run loop is the usual one (QEMU's `cpu->exit_request`
/// with `kvm_run->immediate_exit`): the ringer sets `pending` then reads
/// `in_guest`; the vCPU sets `in_guest` then reads `pending`. With sequential
/// consistency one of them sees the other, so no event waits for an
/// unrelated exit.
pub struct Doorbell {
    pending: AtomicBool,
    in_guest: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    kicker: OnceLock<Arc<dyn Kick>>,
}

impl Default for Doorbell {
    fn default() -> Self {
        Doorbell {
            pending: AtomicBool::new(false),
            in_guest: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
            kicker: OnceLock::new(),
        }
    }
}

impl std::fmt::Debug for Doorbell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Doorbell")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .field("in_guest", &self.in_guest.load(Ordering::Relaxed))
            .finish()
    }
}

impl Doorbell {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects the vCPU's kicker (once, when the vCPU is created).
    pub fn set_kicker(&self, k: Arc<dyn Kick>) {
        let _ = self.kicker.set(k);
    }

    /// Something is pending for this vCPU.
    pub fn ring(&self) {
        self.pending.store(true, Ordering::SeqCst);
        if self.in_guest.load(Ordering::SeqCst) {
            if let Some(k) = self.kicker.get() {
                k.kick();
            }
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.cv.notify_all();
    }

    /// Whether the bell rang since the last `take`.
    pub fn is_rung(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Clears the pending flag; the caller is about to look at every source.
    pub fn take(&self) -> bool {
        self.pending.swap(false, Ordering::SeqCst)
    }

    /// Marks entry into the guest. Returns false if the bell rang since the
    /// last `take`, in which case the caller must not enter.
    pub fn enter(&self) -> bool {
        self.in_guest.store(true, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) {
            self.in_guest.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Marks the return from the guest.
    pub fn leave(&self) {
        self.in_guest.store(false, Ordering::SeqCst);
    }

    /// Sleeps until the bell rings or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) {
        let g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.pending.load(Ordering::SeqCst) {
            return;
        }
        match timeout {
            Some(t) => {
                let _ = self.cv.wait_timeout(g, t);
            }
            None => {
                let _g = self.cv.wait(g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    struct CountKick(AtomicU32);
    impl Kick for CountKick {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn doorbell_kicks_only_in_guest_and_blocks_entry_when_rung() {
        let d = Doorbell::new();
        let k = Arc::new(CountKick(AtomicU32::new(0)));
        d.set_kicker(k.clone());
        d.ring();
        assert_eq!(k.0.load(Ordering::SeqCst), 0);
        assert!(!d.enter(), "a rung bell must stop the entry");
        assert!(d.take());
        assert!(d.enter());
        d.ring();
        assert_eq!(k.0.load(Ordering::SeqCst), 1);
        d.leave();
    }

    #[test]
    fn doorbell_wakes_a_sleeper() {
        let d = Arc::new(Doorbell::new());
        let d2 = d.clone();
        let t = std::thread::spawn(move || {
            d2.wait(None);
            d2.take()
        });
        std::thread::sleep(Duration::from_millis(20));
        d.ring();
        assert!(t.join().unwrap());
    }
}
