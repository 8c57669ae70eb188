//! The machine both processors share, and the run loop on top of the `Vcpu`
//! interface, written once.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::bus::Bus;
use crate::clock::SharedClock;
use crate::control::{MachineControl, SleepState, StopRequest};
use crate::cpu::{Regs, Sregs, VcpuState};
use crate::irq::IsaIrqRouter;
use crate::ladder::{self, InterruptSource, Startup};
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

/// The processor signature in RDX after INIT (SDM vol. 3, 9.1.4): family
/// 6, as Tandem's CPUID model.
pub const INIT_SIGNATURE: u32 = 0x0005_0654;

/// Exits a vCPU may take in one round-robin slice before the next vCPU's
/// turn (a slice also ends when the processor's own budget runs out).
pub const ROUND_ROBIN_TURNS: usize = 1000;

/// Instructions a vCPU runs per entry when round-robin vCPUs share the
/// thread. Short enough that a vCPU spinning on another's answer (an IPI
/// handshake, a spinlock) hands over within ~0.2 ms of guest work, long
/// enough that the turn's own cost stays near 1%.
pub const ROUND_ROBIN_SLICE: u64 = 10_000;

/// PAUSEs after which a round-robin vCPU hands over (pause-loop exiting):
/// a spin-wait loop (`while (!x) pause();`, Linux's cpu_relax) gives the
/// vCPU it waits for its turn after a few dozen iterations, not a slice.
pub const PAUSE_LOOP_EXITS: u32 = 32;

/// What one turn of the run loop came to.
#[derive(Debug)]
pub enum Turn {
    /// The vCPU ran, or its state moved; take another turn.
    Ran,
    /// The vCPU waits (HLT or wait-for-SIPI) and nothing woke it; `deadline`
    /// is the next timer deadline on the machine clock.
    Idle { deadline: Option<u64> },
    /// The run is over.
    Done(RunOutcome),
}

/// A halted vCPU's prospects.
enum Halt {
    Wake,
    Stopping,
    Dead,
    Sleep(Option<u64>),
}

/// The run loop's memory of one vCPU between turns.
pub struct VcpuLoop {
    id: u32,
    bell: Arc<Doorbell>,
    /// The CR8 / TPR value processor and LAPIC agreed on last.
    cr8: Option<u64>,
    /// The last exit could have written the TPR.
    tpr_written: bool,
    /// The handler entry of the last injection, for the trace.
    delivery: Option<crate::trace::TraceEvent>,
    /// In HLT, with IF as it was then.
    halted: Option<bool>,
    /// The last entry ended with a kick (or the interpreter's budget).
    kicked: bool,
    /// Instructions per entry at most (round-robin vCPUs), if any.
    slice: Option<u64>,
    /// Wakes from S3 this vCPU has followed (see [`MachineControl::wakes`]).
    wakes: u64,
    /// Has seen the machine suspended (and kicked the others).
    asleep: bool,
}

impl VcpuLoop {
    /// The last entry ended with a kick or the processor's own budget: a
    /// round-robin slice ends there.
    pub fn kicked(&self) -> bool {
        self.kicked
    }
}

impl std::fmt::Debug for VcpuLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuLoop")
            .field("id", &self.id)
            .field("halted", &self.halted)
            .finish_non_exhaustive()
    }
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
    /// The interrupt trace (off unless started; see [`crate::trace`]).
    pub tracer: crate::trace::Tracer,
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

/// Up to 8 bytes of an access, little-endian, as a number.
fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u64::from(*b) << (8 * i)))
}

fn context(vcpu: &mut dyn Vcpu) -> Box<GuestContext> {
    Box::new(GuestContext {
        regs: vcpu.get_regs().unwrap_or_default(),
        sregs: vcpu.get_sregs().unwrap_or_default(),
    })
}

impl Machine {
    /// Runs `vcpu` until the guest stops, faults fatally or the processor
    /// fails. `stats` counts what was handled. With several vCPUs, each runs
    /// this on its own thread (KVM), or [`Machine::run_round_robin`] takes
    /// them in turn on one thread (the interpreter).
    pub fn run_vcpu(
        &self,
        vcpu: &mut dyn Vcpu,
        stats: &mut ExitStats,
    ) -> Result<RunOutcome, RunError> {
        let mut l = self.vcpu_loop(vcpu);
        loop {
            if let Turn::Done(outcome) = self.turn(&mut l, vcpu, stats, true)? {
                return Ok(outcome);
            }
        }
    }

    /// Runs `vcpus` on this thread, one after another in index order, each
    /// for a slice (until the processor returns to the VMM on its own budget
    /// or [`ROUND_ROBIN_TURNS`] exits), skipping vCPUs that wait in HLT or
    /// for a SIPI: the interpreter's deterministic SMP. Ends with the first
    /// vCPU whose run ends.
    pub fn run_round_robin(
        &self,
        vcpus: &mut [&mut dyn Vcpu],
        stats: &mut ExitStats,
    ) -> Result<RunOutcome, RunError> {
        let mut loops: Vec<VcpuLoop> = vcpus.iter_mut().map(|v| self.vcpu_loop(&mut **v)).collect();
        if loops.len() > 1 {
            for l in &mut loops {
                l.slice = Some(ROUND_ROBIN_SLICE);
            }
            for v in vcpus.iter_mut() {
                v.set_pause_exiting(Some(PAUSE_LOOP_EXITS));
            }
        }
        // The doorbells rung now, as a bit mask (vCPU i: bit i).
        let rung = || {
            self.doorbells
                .iter()
                .take(64)
                .enumerate()
                .fold(0u64, |m, (i, b)| m | (u64::from(b.is_rung()) << i))
        };
        loop {
            let mut all_idle = true;
            let mut earliest: Option<u64> = None;
            for (l, v) in loops.iter_mut().zip(vcpus.iter_mut()) {
                let before = rung();
                let own = 1u64.checked_shl(l.id).unwrap_or(0);
                for _ in 0..ROUND_ROBIN_TURNS {
                    match self.turn(l, &mut **v, stats, false)? {
                        Turn::Done(outcome) => return Ok(outcome),
                        Turn::Idle { deadline } => {
                            if let Some(d) = deadline {
                                earliest = Some(earliest.map_or(d, |e| e.min(d)));
                            }
                            break;
                        }
                        Turn::Ran => {
                            all_idle = false;
                            // Another vCPU's doorbell rang in this slice
                            // (an IPI, an NMI, an interrupt routed there):
                            // let it run now, as a vCPU thread would at
                            // once. Not while this vCPU's own bell rings:
                            // what it sent itself (a self-NMI) is taken
                            // first, as the processor would at its next
                            // boundary, before any other vCPU moves.
                            let now = rung();
                            if now & own == 0 && (l.kicked || now & !before & !own != 0) {
                                break;
                            }
                        }
                    }
                }
            }
            if all_idle {
                // Every vCPU waits: a virtual clock jumps to the next timer
                // deadline; with the host clock, sleep a little (a device
                // thread or the timer watcher rings the doorbells meanwhile).
                if let Some(d) = earliest {
                    if self.clock.warp_to(d) {
                        continue;
                    }
                }
                let now = self.clock.now_ns();
                let nap = earliest.map_or(1_000_000, |d| d.saturating_sub(now).min(1_000_000));
                if let Some(b) = self.doorbells.first() {
                    if !b.take() {
                        b.wait(Some(Duration::from_nanos(nap.max(10_000))));
                    }
                }
            }
        }
    }

    /// The run loop's state for `vcpu`, before its first turn.
    pub fn vcpu_loop(&self, vcpu: &mut dyn Vcpu) -> VcpuLoop {
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
        let cr8 = self.interrupts.cr8(id);
        if let Some(c) = cr8 {
            vcpu.set_cr8(c);
        }
        VcpuLoop {
            id,
            bell,
            cr8,
            tpr_written: false,
            delivery: None,
            halted: None,
            kicked: false,
            slice: None,
            wakes: self.control.wakes(),
            asleep: false,
        }
    }

    /// One turn of the run loop for `vcpu`: INIT / SIPI, a HLT's wake-up
    /// check, timers, the injection ladder, one entry into the processor
    /// and its exit. With `blocking`, a waiting vCPU sleeps on its doorbell
    /// here; otherwise the turn returns [`Turn::Idle`].
    pub fn turn(
        &self,
        l: &mut VcpuLoop,
        vcpu: &mut dyn Vcpu,
        stats: &mut ExitStats,
        blocking: bool,
    ) -> Result<Turn, RunError> {
        let id = l.id;
        if self.control.stop_requested() {
            if let Some(r) = self.control.stop_request() {
                return Ok(Turn::Done(RunOutcome::Stop(r)));
            }
        }
        if self.control.power_event() {
            if let Some(t) = self.sleep_turn(l, vcpu, blocking)? {
                return Ok(t);
            }
        }
        // INIT and start-up IPIs (SDM vol. 3, 9.4.4 and 11.6.1): the LAPIC
        // took them; the processor's state follows here.
        match self.interrupts.take_startup(id) {
            Startup::Run => {}
            Startup::Init => {
                let apic_base = vcpu.get_sregs()?.apic_base;
                vcpu.set_state(&VcpuState::after_init(id == 0, apic_base, INIT_SIGNATURE))?;
                l.halted = None;
            }
            Startup::Sipi(vector) => {
                let apic_base = vcpu.get_sregs()?.apic_base;
                let mut st = VcpuState::after_init(false, apic_base, INIT_SIGNATURE);
                st.start_at_sipi(vector);
                vcpu.set_state(&st)?;
                l.halted = None;
            }
            Startup::WaitForSipi { init } => {
                if init {
                    let apic_base = vcpu.get_sregs()?.apic_base;
                    vcpu.set_state(&VcpuState::after_init(false, apic_base, INIT_SIGNATURE))?;
                    l.halted = None;
                }
                if !blocking {
                    return Ok(Turn::Idle { deadline: None });
                }
                if !l.bell.take() {
                    l.bell.wait(Some(Duration::from_millis(100)));
                }
                return Ok(Turn::Ran);
            }
        }
        if let Some(if_flag) = l.halted {
            match self.halt_poll(vcpu, if_flag) {
                Halt::Wake => l.halted = None,
                Halt::Stopping => return Ok(Turn::Ran),
                Halt::Dead => return Ok(Turn::Done(RunOutcome::DeadHalt(context(vcpu)))),
                Halt::Sleep(deadline) => {
                    if !blocking {
                        return Ok(Turn::Idle { deadline });
                    }
                    // A timer deadline is in guest-clock nanoseconds; with
                    // the host clock they are host nanoseconds too. A virtual
                    // clock does not move while the vCPU sleeps, so waiting
                    // on it would never end: the clock decides how long a
                    // halt lasts.
                    if let Some(d) = deadline {
                        if self.doorbells.len() <= 1 && self.clock.warp_to(d) {
                            return Ok(Turn::Ran);
                        }
                    }
                    // Deterministic mode has no host thread to ring the
                    // bell: with no deadline nothing can end this HLT.
                    if deadline.is_none()
                        && self.doorbells.len() <= 1
                        && self.guest_progress().is_some()
                    {
                        return Ok(Turn::Done(RunOutcome::DeadHalt(context(vcpu))));
                    }
                    let now = self.clock.now_ns();
                    let timeout = deadline.map(|d| Duration::from_nanos(d.saturating_sub(now)));
                    if !l.bell.take() {
                        l.bell.wait(timeout);
                    }
                    return Ok(Turn::Ran);
                }
            }
        }
        l.bell.take();
        l.kicked = false;
        self.timers.fire_due(self.clock.now_ns());
        let d = ladder::inject_events_traced(vcpu, &*self.interrupts, &self.tracer)?;
        if let Some(ev) = d.injected {
            stats.injections += 1;
            if self.tracer.enabled() {
                l.delivery = self.tracer.injection(&self.mem, vcpu, ev, d.reinjection);
            }
        }
        if l.tpr_written {
            l.tpr_written = false;
            if let Some(tpr) = self.interrupts.cr8(id) {
                if l.cr8 != Some(tpr) {
                    vcpu.set_cr8(tpr);
                    l.cr8 = Some(tpr);
                }
            }
        }
        if !l.bell.enter() {
            return Ok(Turn::Ran);
        }
        let progress = self.guest_progress();
        let retired_before = self.limit_run(vcpu, progress, l.slice);
        let exit = vcpu.run();
        l.bell.leave();
        self.advance_with_instructions(vcpu, progress, retired_before);
        // A kick can end the run before the entry delivered anything.
        if !matches!(exit, Ok(VcpuExit::Kicked)) {
            if let Some(ev) = l.delivery.take() {
                self.tracer.emit(ev);
            }
        }
        if let Some(known) = l.cr8 {
            let now = vcpu.cr8();
            if now != known {
                self.interrupts.set_cr8(id, now);
                l.cr8 = Some(now);
            }
        }
        let exit = exit?;
        self.tracer.exit(id, &exit);
        l.tpr_written = matches!(
            exit,
            VcpuExit::MmioWrite { .. } | VcpuExit::WrMsr { .. } | VcpuExit::EmulationFailure { .. }
        );
        match exit {
            e @ (VcpuExit::IoOut { .. }
            | VcpuExit::IoIn { .. }
            | VcpuExit::MmioWrite { .. }
            | VcpuExit::MmioRead { .. }
            | VcpuExit::RdMsr { .. }
            | VcpuExit::WrMsr { .. }) => {
                self.handle_data_exit(vcpu, &e, stats);
                if let (Some(p), Some(v)) = (progress, self.clock.as_virtual()) {
                    v.advance(p.ns_per_exit);
                }
            }
            VcpuExit::Hlt => {
                stats.hlt += 1;
                l.halted = Some(vcpu.readiness()?.if_flag);
            }
            VcpuExit::InterruptWindow | VcpuExit::NmiWindow => stats.windows += 1,
            VcpuExit::Kicked => {
                stats.kicks += 1;
                l.kicked = true;
            }
            VcpuExit::TprLowered => {}
            VcpuExit::Debug { .. } => {}
            VcpuExit::Shutdown => return Ok(Turn::Done(RunOutcome::TripleFault(context(vcpu)))),
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
                            return Ok(Turn::Ran);
                        }
                        Ok(None) => {}
                        Err(e) => refused = Some(e),
                    }
                }
                if let Some(done) = crate::fallback::finish_event_instruction(&self.mem, vcpu)? {
                    stats.fallbacks += 1;
                    self.note_fallback(
                        vcpu.backend(),
                        &format!("{done:?}"),
                        "Tandem delivered its event",
                    );
                    return Ok(Turn::Ran);
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
        Ok(Turn::Ran)
    }

    /// ACPI S3 (see [`crate::control`]): while the machine is suspended no
    /// vCPU enters the guest (the instruction that wrote SLP_EN completed;
    /// nothing after it runs); the turn fires due timers (the RTC alarm is
    /// the wake event) and waits for the next deadline: it sleeps on the
    /// doorbell with the host clock, a virtual clock jumps there. The first
    /// vCPU to see the wake event wakes the platform; every vCPU then
    /// resets itself as after a power loss: the BSP in real mode at the
    /// firmware waking vector, the APs in wait-for-SIPI (their LAPICs were
    /// reset). `None`: the machine is awake and this vCPU is up to date.
    fn sleep_turn(
        &self,
        l: &mut VcpuLoop,
        vcpu: &mut dyn Vcpu,
        blocking: bool,
    ) -> Result<Option<Turn>, RunError> {
        if self.control.sleep_state() != SleepState::Awake {
            if !l.asleep {
                l.asleep = true;
                // The other vCPUs stop at their next instruction boundary.
                for (i, b) in self.doorbells.iter().enumerate() {
                    if i != l.id as usize {
                        b.ring();
                    }
                }
            }
            let now = self.clock.now_ns();
            self.timers.fire_due(now);
            if self.control.complete_wake() {
                for b in &self.doorbells {
                    b.ring();
                }
                // The next turn resets this vCPU, or ends the run when the
                // wake is a reset.
                return Ok(Some(Turn::Ran));
            }
            let deadline = self.timers.next_deadline();
            if !blocking {
                return Ok(Some(Turn::Idle { deadline }));
            }
            match deadline {
                Some(d) if self.clock.warp_to(d) => return Ok(Some(Turn::Ran)),
                // Deterministic mode with nothing armed: no wake can come.
                None if self.guest_progress().is_some() && self.doorbells.len() <= 1 => {
                    return Ok(Some(Turn::Done(RunOutcome::DeadHalt(context(vcpu)))));
                }
                _ => {}
            }
            let nap = deadline.map_or(100_000_000, |d| d.saturating_sub(now).min(100_000_000));
            if !l.bell.take() {
                l.bell.wait(Some(Duration::from_nanos(nap)));
            }
            return Ok(Some(Turn::Ran));
        }
        let wakes = self.control.wakes();
        if l.wakes != wakes {
            l.wakes = wakes;
            l.asleep = false;
            l.halted = None;
            l.delivery = None;
            let bsp = l.id == 0;
            let apic_base = crate::devices::lapic::APIC_DEFAULT_BASE
                | crate::devices::lapic::APIC_BASE_ENABLE
                | if bsp {
                    crate::devices::lapic::APIC_BASE_BSP
                } else {
                    0
                };
            let mut st = VcpuState::after_init(bsp, apic_base, INIT_SIGNATURE);
            if let (true, Some(v)) = (bsp, self.control.resume_vector()) {
                // SeaBIOS's s3_resume: a far call to the vector as a
                // real-mode segment:offset (CS = vector >> 4, IP = vector &
                // 0xF), the other registers zero.
                st.sregs.cs = crate::cpu::Segment::real_mode((v >> 4) as u16, true);
                st.regs.rip = u64::from(v & 0xF);
                st.regs.rdx = 0;
            }
            vcpu.set_state(&st)?;
            l.cr8 = self.interrupts.cr8(l.id);
            if let Some(c) = l.cr8 {
                vcpu.set_cr8(c);
            }
            self.control.vcpu_resumed(self.doorbells.len().max(1));
        }
        Ok(None)
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
                    self.tracer
                        .emit_with(|| crate::trace::TraceEvent::PortWrite {
                            cpu: id,
                            port,
                            size: chunk.len() as u8,
                            value: le_value(chunk),
                        });
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
                self.tracer
                    .emit_with(|| crate::trace::TraceEvent::MmioWrite {
                        cpu: id,
                        addr,
                        len: n as u8,
                        value: le_value(&data[..n]),
                    });
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

    /// The deterministic mode's rates, when the machine runs on a virtual
    /// clock the run loop moves (see [`crate::clock::GuestProgress`]).
    pub fn guest_progress(&self) -> Option<crate::clock::GuestProgress> {
        self.clock.as_virtual().and_then(|v| v.progress())
    }

    /// Deterministic mode on a processor that counts instructions: limits
    /// the next run to the instructions left until the next timer deadline
    /// (at least one), so the timer fires at that instruction boundary;
    /// round-robin vCPUs also to their `slice`. Returns the instructions
    /// retired before the run (deterministic mode only).
    fn limit_run(
        &self,
        vcpu: &mut dyn Vcpu,
        progress: Option<crate::clock::GuestProgress>,
        slice: Option<u64>,
    ) -> Option<u64> {
        let rate = progress.map(|p| p.ns_per_instruction).filter(|&r| r != 0);
        let to_deadline = rate.and_then(|rate| {
            self.timers.next_deadline().map(|d| {
                let left = d.saturating_sub(self.clock.now_ns());
                left.div_ceil(rate).max(1)
            })
        });
        if rate.is_some() || slice.is_some() {
            let limit = match (to_deadline, slice) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            vcpu.set_run_limit(limit);
        }
        rate?;
        vcpu.instructions_retired()
    }

    /// Deterministic mode: moves the clock by the instructions the last run
    /// retired.
    fn advance_with_instructions(
        &self,
        vcpu: &mut dyn Vcpu,
        progress: Option<crate::clock::GuestProgress>,
        retired_before: Option<u64>,
    ) {
        let (Some(p), Some(before), Some(v)) = (progress, retired_before, self.clock.as_virtual())
        else {
            return;
        };
        let now = vcpu.instructions_retired().unwrap_or(before);
        v.advance(
            now.saturating_sub(before)
                .saturating_mul(p.ns_per_instruction),
        );
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

    /// Whether a vCPU halted by HLT (with IF as it was at the HLT) can go on.
    fn halt_poll(&self, vcpu: &mut dyn Vcpu, if_flag: bool) -> Halt {
        let id = vcpu.id();
        if self.control.stop_requested() {
            return Halt::Stopping;
        }
        self.timers.fire_due(self.clock.now_ns());
        if self.interrupts.nmi_pending(id) || (if_flag && self.interrupts.interrupt_pending(id)) {
            return Halt::Wake;
        }
        // With IF clear only an NMI, SMI or INIT ends a HLT (SDM vol. 3,
        // 6.8.1 and the HLT instruction); timers raise maskable interrupts
        // unless the controllers route them as NMIs, which
        // `can_wake_masked` answers.
        if !if_flag && !self.interrupts.can_wake_masked(id) {
            return Halt::Dead;
        }
        Halt::Sleep(self.timers.next_deadline())
    }
}
