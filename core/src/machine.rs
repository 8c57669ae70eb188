//! The machine both processors share, and the run loop on top of the `Vcpu`
//! interface, written once.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::bus::Bus;
use crate::clock::SharedClock;
use crate::control::{MachineControl, StopRequest};
use crate::cpu::{Regs, Sregs};
use crate::irq::IsaIrqRouter;
use crate::ladder::{self, InterruptSource};
use crate::memory::GuestMemory;
use crate::timer::TimerSet;
use crate::vcpu::{Doorbell, Vcpu, VcpuError, VcpuExit};

/// MSRs the machine owns (x2APIC, TSC deadline): the processors forward
/// accesses to them here.
pub trait MsrHandler: Send + Sync {
    /// `None`: not this handler's MSR or not readable now (#GP).
    fn rdmsr(&self, vcpu: u32, index: u32) -> Option<u64>;
    /// `false`: #GP.
    fn wrmsr(&self, vcpu: u32, index: u32, value: u64) -> bool;
}

/// Memory-mapped registers that differ per vCPU (the LAPIC page): tried
/// before the MMIO bus, with the accessing vCPU's index.
pub trait LocalMmio: Send + Sync {
    /// Returns false when `addr` is not this handler's.
    fn read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> bool;
    /// Returns false when `addr` is not this handler's.
    fn write(&self, vcpu: u32, addr: u64, data: &[u8]) -> bool;
}

/// Where the guest was when the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestContext {
    pub regs: Regs,
    pub sregs: Sregs,
}

impl GuestContext {
    /// "CS:RIP" as QEMU prints it.
    pub fn cs_rip(&self) -> String {
        format!("{:04x}:{:016x}", self.sregs.cs.selector, self.regs.rip)
    }
}

/// How a vCPU's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// The guest asked to stop (debug exit, reset, poweroff).
    Stop(StopRequest),
    /// Triple fault.
    TripleFault(Box<GuestContext>),
    /// HLT with interrupts disabled and nothing that could wake the vCPU.
    DeadHalt(Box<GuestContext>),
}

impl RunOutcome {
    /// Process status: the debug-exit value as `(v << 1) | 1`, 0 for a
    /// reset or poweroff, 2 for a triple fault, 4 for a halt nothing can end.
    pub fn exit_status(&self) -> i32 {
        match self {
            RunOutcome::Stop(r) => r.exit_status(),
            RunOutcome::TripleFault(_) => 2,
            RunOutcome::DeadHalt(_) => 4,
        }
    }
}

#[derive(Debug, Error)]
pub enum RunError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("{backend} could not emulate the instruction at {cs_rip} ({bytes})")]
    EmulationFailure {
        backend: &'static str,
        cs_rip: String,
        bytes: String,
        context: Box<GuestContext>,
    },
    #[error("{backend} internal error (suberror {suberror}) at {cs_rip}")]
    Internal {
        backend: &'static str,
        suberror: u32,
        cs_rip: String,
        context: Box<GuestContext>,
    },
    #[error("VM entry failed (hardware reason {reason:#x}) at {cs_rip}")]
    FailEntry {
        reason: u64,
        cs_rip: String,
        context: Box<GuestContext>,
    },
    #[error("unhandled exit: {0}")]
    Unhandled(String),
}

/// Counts of what the run loop handled, for benchmarks and `--stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    pub io: u64,
    pub mmio: u64,
    pub msr: u64,
    pub hlt: u64,
    pub windows: u64,
    pub kicks: u64,
    pub injections: u64,
    /// Instructions the processor gave up on and Tandem finished.
    pub fallbacks: u64,
}

/// Everything but the processors.
pub struct Machine {
    pub mem: Arc<GuestMemory>,
    pub pio: Bus,
    pub mmio: Bus,
    pub clock: SharedClock,
    pub control: Arc<MachineControl>,
    pub isa_irqs: Arc<IsaIrqRouter>,
    pub interrupts: Arc<dyn InterruptSource>,
    pub msrs: Vec<Arc<dyn MsrHandler>>,
    pub local_mmio: Option<Arc<dyn LocalMmio>>,
    pub timers: Arc<TimerSet>,
    pub doorbells: Vec<Arc<Doorbell>>,
    /// Instructions already reported by `note_fallback` (mnemonic or
    /// bytes), so that each is reported once.
    pub fallback_notes: std::sync::Mutex<Vec<String>>,
    /// Executes an instruction the processor gave up on (the interpreter,
    /// for KVM). Set once, after the machine is built; empty: such an
    /// instruction ends the run.
    pub fallback: std::sync::OnceLock<Arc<dyn crate::fallback::InstructionFallback>>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("mem", &self.mem)
            .field("pio", &self.pio)
            .field("mmio", &self.mmio)
            .finish_non_exhaustive()
    }
}

fn context(vcpu: &mut dyn Vcpu) -> Box<GuestContext> {
    Box::new(GuestContext {
        regs: vcpu.get_regs().unwrap_or_default(),
        sregs: vcpu.get_sregs().unwrap_or_default(),
    })
}

impl Machine {
    /// Runs `vcpu` until the guest stops, faults fatally or the processor
    /// fails. `stats` counts what was handled.
    pub fn run_vcpu(
        &self,
        vcpu: &mut dyn Vcpu,
        stats: &mut ExitStats,
    ) -> Result<RunOutcome, RunError> {
        let id = vcpu.id();
        let bell = self
            .doorbells
            .get(id as usize)
            .cloned()
            .unwrap_or_else(|| Arc::new(Doorbell::new()));
        bell.set_kicker(vcpu.kicker());
        crate::timer::tight_timer_slack();
        // CR8 and the LAPIC TPR are one register (SDM vol. 3, 11.8.6); the
        // processor holds CR8, the machine the TPR. `cr8` is the value both
        // agreed on last. The TPR only moves through the APIC page or MSRs,
        // so it is read back only after an exit that could have written it.
        let mut cr8 = self.interrupts.cr8(id);
        if let Some(c) = cr8 {
            vcpu.set_cr8(c);
        }
        let mut tpr_written = false;
        loop {
            if self.control.stop_requested() {
                if let Some(r) = self.control.stop_request() {
                    return Ok(RunOutcome::Stop(r));
                }
            }
            bell.take();
            self.timers.fire_due(self.clock.now_ns());
            let d = ladder::inject_events(vcpu, &*self.interrupts)?;
            if d.injected.is_some() {
                stats.injections += 1;
            }
            if tpr_written {
                tpr_written = false;
                if let Some(tpr) = self.interrupts.cr8(id) {
                    if cr8 != Some(tpr) {
                        vcpu.set_cr8(tpr);
                        cr8 = Some(tpr);
                    }
                }
            }
            if !bell.enter() {
                continue;
            }
            let exit = vcpu.run();
            bell.leave();
            if let Some(known) = cr8 {
                let now = vcpu.cr8();
                if now != known {
                    self.interrupts.set_cr8(id, now);
                    cr8 = Some(now);
                }
            }
            let exit = exit?;
            tpr_written = matches!(
                exit,
                VcpuExit::MmioWrite { .. }
                    | VcpuExit::WrMsr { .. }
                    | VcpuExit::EmulationFailure { .. }
            );
            match exit {
                e @ (VcpuExit::IoOut { .. }
                | VcpuExit::IoIn { .. }
                | VcpuExit::MmioWrite { .. }
                | VcpuExit::MmioRead { .. }
                | VcpuExit::RdMsr { .. }
                | VcpuExit::WrMsr { .. }) => {
                    self.handle_data_exit(vcpu, &e, stats);
                }
                VcpuExit::Hlt => {
                    stats.hlt += 1;
                    if let Some(outcome) = self.halt(vcpu, &bell)? {
                        return Ok(outcome);
                    }
                }
                VcpuExit::InterruptWindow | VcpuExit::NmiWindow => stats.windows += 1,
                VcpuExit::Kicked => stats.kicks += 1,
                VcpuExit::TprLowered => {}
                VcpuExit::Debug { .. } => {}
                VcpuExit::Shutdown => return Ok(RunOutcome::TripleFault(context(vcpu))),
                VcpuExit::EmulationFailure { insn } => {
                    // The interpreter executes the instruction when one is
                    // installed (it delivers INT3 / INT n through the IDT
                    // exactly, which a stock kernel's INT3 self-test needs
                    // on PVM); the event fast path is for machines without
                    // it, and for what the interpreter refuses.
                    let mut refused = None;
                    if let Some(fb) = self.fallback.get() {
                        match fb.execute_one(self, vcpu) {
                            Ok(Some(done)) => {
                                stats.fallbacks += 1;
                                self.note_fallback(
                                    vcpu.backend(),
                                    &done,
                                    "Tandem's interpreter executed it",
                                );
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) => refused = Some(e),
                        }
                    }
                    if let Some(done) = crate::fallback::finish_event_instruction(&self.mem, vcpu)?
                    {
                        stats.fallbacks += 1;
                        self.note_fallback(
                            vcpu.backend(),
                            &format!("{done:?}"),
                            "Tandem delivered its event",
                        );
                        continue;
                    }
                    if let Some(e) = refused {
                        return Err(e);
                    }
                    let context = context(vcpu);
                    let bytes = if insn.is_empty() {
                        "no instruction bytes reported".to_string()
                    } else {
                        insn.iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    return Err(RunError::EmulationFailure {
                        backend: vcpu.backend(),
                        cs_rip: context.cs_rip(),
                        bytes,
                        context,
                    });
                }
                VcpuExit::InternalError { suberror, .. } => {
                    let context = context(vcpu);
                    return Err(RunError::Internal {
                        backend: vcpu.backend(),
                        suberror,
                        cs_rip: context.cs_rip(),
                        context,
                    });
                }
                VcpuExit::FailEntry { reason } => {
                    let context = context(vcpu);
                    return Err(RunError::FailEntry {
                        reason,
                        cs_rip: context.cs_rip(),
                        context,
                    });
                }
                VcpuExit::Unhandled(what) => return Err(RunError::Unhandled(what)),
            }
        }
    }

    /// Completes a port-I/O, MMIO or machine-MSR exit of `vcpu` through the
    /// buses and handlers (the run loop and the instruction fallback share
    /// it). Returns false, doing nothing, for any other exit.
    pub fn handle_data_exit(
        &self,
        vcpu: &mut dyn Vcpu,
        exit: &VcpuExit,
        stats: &mut ExitStats,
    ) -> bool {
        let id = vcpu.id();
        match *exit {
            VcpuExit::IoOut { port, size, count } => {
                stats.io += 1;
                let size = usize::from(size.max(1));
                let data = vcpu.io_data();
                for chunk in data.chunks(size).take(count as usize) {
                    self.pio.write(u64::from(port), chunk);
                }
            }
            VcpuExit::IoIn { port, size, count } => {
                stats.io += 1;
                let size = usize::from(size.max(1));
                let data = vcpu.io_data();
                for chunk in data.chunks_mut(size).take(count as usize) {
                    self.pio.read(u64::from(port), chunk);
                }
            }
            VcpuExit::MmioWrite { addr, len } => {
                stats.mmio += 1;
                let data = vcpu.mmio_data();
                let n = usize::from(len).min(data.len());
                let local = self
                    .local_mmio
                    .as_ref()
                    .is_some_and(|l| l.write(id, addr, &data[..n]));
                if !local {
                    self.mmio.write(addr, &data[..n]);
                }
            }
            VcpuExit::MmioRead { addr, len } => {
                stats.mmio += 1;
                let data = vcpu.mmio_data();
                let n = usize::from(len).min(data.len());
                let local = self
                    .local_mmio
                    .as_ref()
                    .is_some_and(|l| l.read(id, addr, &mut data[..n]));
                if !local {
                    self.mmio.read(addr, &mut data[..n]);
                }
            }
            VcpuExit::RdMsr { index } => {
                stats.msr += 1;
                let v = self.msrs.iter().find_map(|h| h.rdmsr(id, index));
                vcpu.complete_rdmsr(v);
            }
            VcpuExit::WrMsr { index, value } => {
                stats.msr += 1;
                let ok = self.msrs.iter().any(|h| h.wrmsr(id, index, value));
                vcpu.complete_wrmsr(ok);
            }
            _ => return false,
        }
        true
    }

    /// Says once per distinct instruction that the processor gave up on it.
    fn note_fallback(&self, backend: &str, insn: &str, how: &str) {
        let mut seen = self
            .fallback_notes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !seen.iter().any(|s| s == insn) {
            seen.push(insn.to_string());
            eprintln!("tandem: {backend} could not execute {insn}; {how}");
        }
    }

    /// HLT: sleeps until something can wake the vCPU. Returns an outcome when
    /// the run must end instead.
    fn halt(&self, vcpu: &mut dyn Vcpu, bell: &Doorbell) -> Result<Option<RunOutcome>, RunError> {
        let id = vcpu.id();
        let if_flag = vcpu.readiness()?.if_flag;
        loop {
            if self.control.stop_requested() {
                return Ok(None);
            }
            let now = self.clock.now_ns();
            self.timers.fire_due(now);
            if self.interrupts.nmi_pending(id) || (if_flag && self.interrupts.interrupt_pending(id))
            {
                return Ok(None);
            }
            let deadline = self.timers.next_deadline();
            // With IF clear only an NMI, SMI or INIT ends a HLT (SDM vol. 3,
            // 6.8.1 and the HLT instruction); timers raise maskable
            // interrupts unless the controllers route them as NMIs, which
            // `can_wake_masked` answers.
            if !if_flag && !self.interrupts.can_wake_masked(id) {
                return Ok(Some(RunOutcome::DeadHalt(context(vcpu))));
            }
            // A timer deadline is in guest-clock nanoseconds; with the host
            // clock they are host nanoseconds too. A virtual clock does not
            // move while the vCPU sleeps, so waiting on it would never end:
            // the clock decides how long a halt lasts.
            if let Some(d) = deadline {
                if self.doorbells.len() <= 1 && self.clock.warp_to(d) {
                    continue;
                }
            }
            let timeout = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
            if bell.take() {
                continue;
            }
            bell.wait(timeout);
        }
    }
}
