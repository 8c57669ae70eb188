//! tandem-interp: the interpreter processor.
//!
//! An x86-64 processor in software behind the same VMX-shaped [`Vcpu`]
//! interface as the KVM backend. Guest RAM is read and written through the
//! bounds-checked accessors of [`GuestMemory`]; port I/O, accesses to
//! guest-physical addresses that are not RAM and the MSRs the machine owns
//! end the run with the same exits KVM gives, and the run loop completes them.
//!
//! How an exit that needs data completes: every access that leaves the
//! processor is appended to a small per-instruction log. The instruction
//! stops with the exit (RIP still at the instruction); the run loop fills
//! [`Vcpu::io_data`] / [`Vcpu::mmio_data`] or answers the MSR, and at the next
//! `run()` (or `readiness()`, see below) the instruction executes again from
//! the start: the accesses already in the log are answered from it, in order,
//! and only a new access can stop it again. A read-modify-write of MMIO
//! therefore makes a read exit then a write exit. Instructions write their
//! registers after their last access, so the replay sees the state it saw
//! the first time. REP string instructions commit each iteration (RCX, RSI,
//! RDI), as the SDM allows an interrupt to do between iterations.
//!
//! Event semantics follow the SDM (vol. 3, chapter 6 and 25-26 for VM entry
//! event injection): an injected event is delivered at the next `run()`
//! before any instruction; interrupt / NMI windows exit at the first
//! instruction boundary where the event could be taken; STI and MOV SS block
//! for one instruction; NMI blocking lasts from NMI delivery to the next IRET.

mod exec;
mod fallback;
mod flags;
mod hypercall;
mod legacy;
mod mmu;
mod sse;
mod system;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_legacy;
#[cfg(test)]
mod tests_simd;
mod x87;
mod xsave;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use iced_x86::Mnemonic;
use tandem_core::cpu::{
    self, DebugRegs, Event, EventKind, FpuState, InjectedInterrupt, Interruptibility, MpState, Msr,
    PendingException, Regs, Sregs, VcpuEvents,
};
use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Kick, Readiness, Vcpu, VcpuExit, VcpuResult};
use tandem_decoder::DecodeCache;
use thiserror::Error;

pub use fallback::InterpFallback;
pub use mmu::Tlb;

/// Instructions one `run()` executes at most before returning
/// [`VcpuExit::Kicked`], so that the run loop fires device timers.
pub const RUN_BUDGET: u64 = 100_000;

/// Errors of the interpreter's own setup.
#[derive(Debug, Error)]
pub enum InterpError {
    #[error("the interpreter does not support {0}")]
    Unsupported(String),
}

/// The kicker: a flag the interpreter polls at every instruction boundary.
#[derive(Debug, Default)]
pub struct InterpKick {
    flag: AtomicBool,
}

impl Kick for InterpKick {
    fn kick(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

/// Why an instruction stopped before completing normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Stop {
    /// A fault: RIP goes back to the instruction, then the exception is
    /// delivered (#PF has set CR2 already).
    Exc(u8, Option<u32>),
    /// An exit with the instruction unfinished: it runs again afterwards.
    Exit(VcpuExit),
    /// The instruction completed and the run ends with this exit (HLT).
    Done(VcpuExit),
}

pub(crate) type R<T> = Result<T, Stop>;

/// Kinds of accesses that leave the processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum ExtKind {
    #[default]
    PortIn,
    PortOut,
    MmioRead,
    MmioWrite,
    RdMsr,
    WrMsr,
}

/// One completed (or awaited) external access of the current instruction.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Completion {
    kind: ExtKind,
    key: u64,
    len: u8,
    data: u64,
    ok: bool,
}

/// External accesses one instruction may make. Most make at most four (a
/// 16-byte SSE operand split across two pages is four 8-byte accesses; a
/// REP string instruction commits each iteration, so its count is per
/// iteration), but the state-save instructions write their area 2 to 8
/// bytes at a time: FNSAVE 23 accesses, FXSAVE / FXRSTOR 64, XSAVE of x87,
/// SSE and AVX state about 110, up to twice that when every access is split
/// across a page boundary. An area on an MMIO device (pc-testdev's iomem)
/// must still complete.
const REPLAY_MAX: usize = 256;

/// The interpreter's own MSRs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MsrFile {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub fmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub pat: u64,
    pub tsc_offset: u64,
    pub tsc_aux: u64,
    pub misc_enable: u64,
    /// AMD's legacy performance counters (AMD vendor only): PerfEvtSel0-3
    /// (C001_0000h-C001_0003h) and PerfCtr0-3 (C001_0004h-C001_0007h),
    /// which every AMD64 processor has (AMD APM vol. 2, 13.2.1). They keep
    /// what is written and count nothing.
    pub amd_perf: [u64; 8],
    /// IA32_APIC_BASE.EN (kept in the machine's LAPIC) was last seen clear:
    /// CPUID.1:EDX.APIC reads 0 (system.rs `cpuid`).
    pub apic_global_disabled: bool,
}

/// One interpreted processor.
pub struct InterpVcpu {
    id: u32,
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) gpr: [u64; 16],
    pub(crate) rip: u64,
    pub(crate) rflags: u64,
    pub(crate) sregs: Sregs,
    pub(crate) cr8: u64,
    pub(crate) dr: DebugRegs,
    fpu: FpuState,
    pub(crate) msr: MsrFile,
    /// Instructions retired (the TSC counts them, see `rdtsc`).
    pub(crate) retired: u64,
    /// Bitness of the current code segment (16, 32, 64).
    pub(crate) bitness: u32,

    // Event state (software VMX).
    pending_event: Option<Event>,
    irq_window: bool,
    nmi_window: bool,
    pub(crate) sti_shadow: bool,
    pub(crate) mov_ss_shadow: bool,
    /// The MOV SS shadow was active when the current instruction started
    /// (a MOV SS in a MOV SS shadow does not extend it).
    pub(crate) prev_mov_ss: bool,
    pub(crate) nmi_blocked: bool,
    deferred_exit: Option<VcpuExit>,

    // Execution.
    pub(crate) cache: Box<DecodeCache>,
    pub(crate) tlb: Box<Tlb>,
    /// RIP of the instruction executing and of the next one.
    pub(crate) insn_rip: u64,
    pub(crate) next_rip: u64,
    pub(crate) insn_len: u64,
    replay: [Completion; REPLAY_MAX],
    replay_len: usize,
    replay_pos: usize,
    awaiting: bool,
    io_buf: [u8; 8],
    io_len: usize,
    mmio_buf: [u8; 8],
    mmio_len: usize,
    kick: Arc<InterpKick>,
    noted: Vec<Mnemonic>,
    /// Executions of an unimplemented instruction (each one, not only the
    /// first, which `noted` records): the instruction fallback compares it
    /// around the one instruction it executes.
    unimplemented_hits: u64,
    /// Events `deliver` began (the single-step trap does not follow an
    /// instruction that delivered one: INT n, INT3, INTO, INT1).
    pub(crate) events_delivered: u64,
    /// Some DR0-DR3 is an enabled data breakpoint (DR7 R/W = 01 or 11):
    /// only then do linear reads and writes look at the debug registers
    /// (recomputed whenever DR7 changes, `dr7_changed`).
    pub(crate) data_bp_armed: bool,
    /// B0-B3 of the data and I/O breakpoints the current instruction hit
    /// (a trap after it, SDM vol. 3, 18.3.1.2), or that a MOV SS / POP SS
    /// hit and its shadow holds until the next instruction has run.
    pub(crate) db_hits: u64,
    /// The instruction made its own single-step decision (SYSCALL, SYSRET:
    /// `single_step_at_end`), so TF at its start makes no trap.
    pub(crate) single_step_done: bool,
    /// The VMM's debugging of the guest (`set_guest_debug`); `None` in a
    /// normal run, so the hot loop tests one pointer.
    guest_debug: Option<Box<GuestDebug>>,
    /// `run` returns `Kicked` once `retired` reaches this (the
    /// deterministic run loop's next timer deadline).
    stop_at_retired: Option<u64>,
    /// Pause-loop exiting: PAUSEs per exit, and the PAUSEs counted since
    /// the last one.
    pause_exiting: Option<u32>,
    pauses: u32,
    /// The run limit a pause-loop exit stood in for, given back when it
    /// has ended the run.
    limit_before_pause_exit: Option<Option<u64>>,
    /// The processor's CPUID (shared with KVM when both run one guest).
    pub(crate) cpuid: Arc<tandem_core::cpuid::CpuidTable>,
    /// The clock and rate (kHz) the TSC counts from; `None`: retired
    /// instructions.
    pub(crate) tsc_clock: Option<(tandem_core::clock::SharedClock, u64)>,
    /// This processor's name in the memory's `CodeWatch` log, and how far
    /// into that log it has dropped pages other processors wrote.
    pub(crate) code_writer: u64,
    code_seen: u64,
    /// The linear address of the last store and its distance from the one
    /// before: a store stream with a constant stride has its coming lines
    /// prefetched (`prefetch_stores` in mmu.rs).
    pub(crate) store_la: u64,
    pub(crate) store_stride: u64,
}

/// Names processors in `CodeWatch` logs (unique in the process).
static NEXT_CODE_WRITER: AtomicU64 = AtomicU64::new(1);

/// Single-step and instruction breakpoints asked for by the VMM.
#[derive(Debug, Clone, Default)]
struct GuestDebug {
    single_step: bool,
    /// Linear addresses (CS.base + RIP).
    breakpoints: Vec<u64>,
    /// An instruction an exit had left open retired outside `run`
    /// (`readiness` finished it): it is the single step.
    retired: bool,
}

/// DR6 with its reserved bits set as they read (SDM vol. 3, 18.2.3).
const DR6_FIXED: u64 = 0xffff_0ff0;
/// DR6.BS: the #DB came from single-stepping.
const DR6_BS: u64 = 1 << 14;

impl std::fmt::Debug for InterpVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterpVcpu")
            .field("id", &self.id)
            .field("rip", &self.rip)
            .field("rflags", &self.rflags)
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

impl InterpVcpu {
    /// A processor with index `id` (= initial APIC ID) over `mem`, in the
    /// reset state (load a real entry state with `set_state`).
    pub fn new(id: u32, mem: Arc<GuestMemory>) -> InterpVcpu {
        let mut sregs = Sregs {
            cs: cpu::Segment::real_mode(0xf000, true),
            ds: cpu::Segment::real_mode(0, false),
            es: cpu::Segment::real_mode(0, false),
            fs: cpu::Segment::real_mode(0, false),
            gs: cpu::Segment::real_mode(0, false),
            ss: cpu::Segment::real_mode(0, false),
            cr0: cpu::cr0::ET,
            apic_base: 0xfee0_0900,
            // IDTR and GDTR at reset: base 0, limit 0xFFFF (SDM vol. 3,
            // table 10-1); the IVT is read through the IDTR.
            idt: cpu::DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            gdt: cpu::DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            ..Default::default()
        };
        sregs.cs.base = 0xffff_0000;
        let code_seen = mem.code_watch().seq();
        let mut v = InterpVcpu {
            id,
            mem,
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: cpu::rflags::FIXED1,
            sregs,
            cr8: 0,
            dr: DebugRegs {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                ..Default::default()
            },
            fpu: FpuState::default(),
            msr: MsrFile {
                pat: 0x0007_0406_0007_0406,
                misc_enable: 1,
                ..Default::default()
            },
            retired: 0,
            bitness: 16,
            pending_event: None,
            irq_window: false,
            nmi_window: false,
            sti_shadow: false,
            mov_ss_shadow: false,
            prev_mov_ss: false,
            nmi_blocked: false,
            deferred_exit: None,
            cache: Box::new(DecodeCache::new()),
            tlb: Box::default(),
            insn_rip: 0,
            next_rip: 0,
            insn_len: 0,
            replay: [Completion::default(); REPLAY_MAX],
            replay_len: 0,
            replay_pos: 0,
            awaiting: false,
            io_buf: [0; 8],
            io_len: 0,
            mmio_buf: [0; 8],
            mmio_len: 0,
            kick: Arc::new(InterpKick::default()),
            noted: Vec::new(),
            unimplemented_hits: 0,
            events_delivered: 0,
            data_bp_armed: false,
            db_hits: 0,
            single_step_done: false,
            guest_debug: None,
            stop_at_retired: None,
            pause_exiting: None,
            pauses: 0,
            limit_before_pause_exit: None,
            cpuid: Arc::new(tandem_core::cpuid::CpuidTable::model(1)),
            tsc_clock: None,
            code_writer: NEXT_CODE_WRITER.fetch_add(1, Ordering::Relaxed),
            code_seen,
            store_la: 0,
            store_stride: 0,
        };
        v.mode_changed();
        v
    }

    /// Gives this processor the CPUID table `table` (by default Tandem's
    /// model for one vCPU); use the KVM VM's table when both processors run
    /// one guest, so the guest sees one processor.
    pub fn set_cpuid(&mut self, table: Arc<tandem_core::cpuid::CpuidTable>) {
        self.cpuid = table;
    }

    /// Makes the TSC count the machine clock `clock` at `khz` (the rate
    /// the LAPIC's TSC-deadline timer uses), instead of retired
    /// instructions (IA32_TSC writes then offset it as on hardware).
    pub fn set_tsc_clock(&mut self, clock: tandem_core::clock::SharedClock, khz: u64) {
        self.tsc_clock = Some((clock, khz.max(1)));
    }

    /// Instructions retired so far.
    pub fn retired(&self) -> u64 {
        self.retired
    }

    /// Decoded-instruction cache statistics (hits, misses).
    pub fn cache_stats(&self) -> (u64, u64) {
        (self.cache.hits, self.cache.misses)
    }

    /// Executes exactly one instruction at CS:RIP, for a processor that gave
    /// up on it: no injected event is delivered first, no window or kick is
    /// looked at. `Ok(None)`: the instruction retired, or the exception it
    /// raised was delivered through the IDT. `Ok(Some(exit))`: a port-I/O,
    /// MMIO or MSR exit leaves it unfinished (complete the exit and call
    /// again: it re-executes with the answer, see the crate docs), or it
    /// ended with HLT / shutdown / an unhandled exit.
    ///
    /// The decoded instruction is not kept cached: the other processor may
    /// rewrite guest code before the next call.
    pub fn step_one(&mut self) -> VcpuResult<Option<VcpuExit>> {
        self.drop_code_others_wrote();
        self.absorb_completion();
        let exit = self.step();
        if self.replay_len == 0 {
            self.cache.invalidate_page(self.tlb.last_fetch_page());
        }
        Ok(exit)
    }

    /// The debug exit at the current instruction boundary with `dr6`'s
    /// cause bits.
    fn debug_exit(&self, cause: u64) -> VcpuExit {
        VcpuExit::Debug {
            exception: 1,
            dr6: DR6_FIXED | cause,
            rip: self.sregs.cs.base.wrapping_add(self.rip),
        }
    }

    /// At an instruction boundary, `done` instructions into this `run`:
    /// the single-step trap after one instruction, or an instruction
    /// breakpoint at CS:RIP (a fault: the instruction has not run).
    #[cold]
    fn debug_check(&self, done: u64) -> Option<VcpuExit> {
        let d = self.guest_debug.as_ref()?;
        if d.single_step && done >= 1 {
            return Some(self.debug_exit(DR6_BS));
        }
        let la = self.sregs.cs.base.wrapping_add(self.rip);
        let hit = d.breakpoints.iter().position(|&b| b == la)?;
        Some(self.debug_exit(1 << hit.min(3)))
    }

    /// How many instructions the interpreter has noted as unimplemented.
    pub fn unimplemented_count(&self) -> usize {
        self.noted.len()
    }

    /// How many times an unimplemented instruction was executed (#UD).
    pub fn unimplemented_hits(&self) -> u64 {
        self.unimplemented_hits
    }

    /// Drops the cached instructions of pages other processors wrote since
    /// the last entry (cross-modifying code, SDM vol. 3, 8.1.3: the change
    /// is seen after the interrupt or exit that serializes this one).
    fn drop_code_others_wrote(&mut self) {
        let cache = &mut self.cache;
        self.mem.code_watch().changes_since(
            &mut self.code_seen,
            self.code_writer,
            |page| match page {
                Some(gpa) => cache.invalidate_page(gpa),
                None => cache.clear(),
            },
        );
    }

    /// Drops the cached instructions of the page holding `gpa`: call it when
    /// something other than this processor wrote guest code.
    pub fn invalidate_page(&mut self, gpa: u64) {
        self.cache.invalidate_page(gpa);
    }

    /// CPL: CS.DPL in protected mode, 0 in real mode.
    #[inline]
    pub(crate) fn cpl(&self) -> u8 {
        self.sregs.cpl()
    }

    /// Recomputes what depends on CS, CR0 and EFER.
    pub(crate) fn mode_changed(&mut self) {
        let s = &self.sregs;
        self.bitness =
            tandem_decoder::bitness(s.long_mode(), s.cs.l, s.cs.db, s.cr0 & cpu::cr0::PE != 0);
    }

    /// Prints one note per mnemonic the interpreter does not implement.
    pub(crate) fn note_unimplemented(&mut self, m: Mnemonic) {
        self.unimplemented_hits += 1;
        if !self.noted.contains(&m) {
            self.noted.push(m);
            eprintln!(
                "tandem: interp: {m:?} is not implemented; delivering #UD to the guest at {:#x}",
                self.insn_rip
            );
        }
    }

    /// An access that leaves the processor (port I/O, MMIO, machine MSR).
    /// Answers from the replay log when this instruction already made it;
    /// otherwise logs it and stops the instruction with its exit.
    pub(crate) fn external(
        &mut self,
        kind: ExtKind,
        key: u64,
        len: u8,
        wdata: u64,
    ) -> R<(u64, bool)> {
        if self.replay_pos < self.replay_len {
            let c = self.replay[self.replay_pos];
            self.replay_pos += 1;
            if c.kind == kind && c.key == key && c.len == len {
                return Ok((c.data, c.ok));
            }
            // The instruction took another path (guest memory changed under
            // it): forget what followed.
            self.replay_len = self.replay_pos - 1;
            self.replay_pos = self.replay_len;
        }
        if self.replay_len >= REPLAY_MAX {
            return Err(Stop::Exit(VcpuExit::Unhandled(format!(
                "instruction at {:#x} makes more than {REPLAY_MAX} port, MMIO or MSR accesses",
                self.insn_rip
            ))));
        }
        self.replay[self.replay_len] = Completion {
            kind,
            key,
            len,
            data: wdata,
            ok: true,
        };
        self.replay_len += 1;
        self.replay_pos = self.replay_len;
        self.awaiting = true;
        let n = usize::from(len.min(8));
        let exit = match kind {
            ExtKind::PortIn => {
                self.io_len = n;
                self.io_buf = [0; 8];
                VcpuExit::IoIn {
                    port: key as u16,
                    size: len,
                    count: 1,
                }
            }
            ExtKind::PortOut => {
                self.io_len = n;
                self.io_buf = wdata.to_le_bytes();
                VcpuExit::IoOut {
                    port: key as u16,
                    size: len,
                    count: 1,
                }
            }
            ExtKind::MmioRead => {
                self.mmio_len = n;
                self.mmio_buf = [0; 8];
                VcpuExit::MmioRead { addr: key, len }
            }
            ExtKind::MmioWrite => {
                self.mmio_len = n;
                self.mmio_buf = wdata.to_le_bytes();
                VcpuExit::MmioWrite { addr: key, len }
            }
            ExtKind::RdMsr => VcpuExit::RdMsr { index: key as u32 },
            ExtKind::WrMsr => VcpuExit::WrMsr {
                index: key as u32,
                value: wdata,
            },
        };
        Err(Stop::Exit(exit))
    }

    /// Takes the run loop's answer to the last exit into the replay log.
    fn absorb_completion(&mut self) {
        if !self.awaiting {
            return;
        }
        self.awaiting = false;
        let Some(last) = self.replay_len.checked_sub(1) else {
            return;
        };
        let c = &mut self.replay[last];
        match c.kind {
            ExtKind::PortIn => c.data = u64::from_le_bytes(self.io_buf),
            ExtKind::MmioRead => c.data = u64::from_le_bytes(self.mmio_buf),
            _ => {}
        }
    }

    /// Nothing blocks an NMI at this boundary: no NMI handler running, no
    /// MOV SS shadow, and no STI shadow, which holds NMIs back too on Intel
    /// processors (SDM vol. 3, 24.4.2, "blocking by STI ... may also block
    /// NMIs on some processors"; KVM's VMX NMI readiness and Bochs do the
    /// same, and kvm-unit-tests' nmi-after-sti checks it).
    fn nmi_unblocked(&self) -> bool {
        !self.nmi_blocked && !self.mov_ss_shadow && !self.sti_shadow
    }

    /// A PAUSE retires: with pause-loop exiting, the run ends after it
    /// once enough have been counted (a run limit at the current count
    /// stops the loop at the next boundary).
    pub(crate) fn count_pause(&mut self) {
        let Some(limit) = self.pause_exiting else {
            return;
        };
        self.pauses += 1;
        if self.pauses >= limit {
            self.pauses = 0;
            // This PAUSE retires before the check: stop right after it.
            if self.limit_before_pause_exit.is_none() {
                self.limit_before_pause_exit = Some(self.stop_at_retired);
            }
            self.stop_at_retired = Some(self.retired.saturating_add(1));
        }
    }

    /// Executes one instruction with the interrupt-shadow bookkeeping.
    /// `Ok(None)`: it retired (or delivered its exception); `Ok(Some(exit))`:
    /// the run ends.
    fn step(&mut self) -> Option<VcpuExit> {
        self.prev_mov_ss = self.mov_ss_shadow;
        let (sti, movss) = (self.sti_shadow, self.mov_ss_shadow);
        self.sti_shadow = false;
        self.mov_ss_shadow = false;
        let start = self.rip;
        self.replay_pos = 0;
        // Data breakpoint hits a MOV SS / POP SS shadow holds for this
        // instruction (see `debug_trap`).
        let held = self.db_hits;
        // The guest's own debug exceptions (SDM vol. 3, 17.3): an
        // instruction breakpoint is a fault before the instruction (not on
        // its re-execution after an exit, nor with RF set, nor in a MOV SS
        // shadow, which inhibits it on Intel processors, SDM vol. 3, 6.8.3);
        // RF is cleared as the instruction starts (IRET may load it again);
        // TF at the start makes a single-step trap after it.
        let rf = self.rflags & flags::RF;
        if self.dr.dr7 & 0xff != 0 && rf == 0 && !movss && self.replay_len == 0 {
            if let Some(hits) = self.instruction_breakpoints() {
                self.dr.dr6 = (self.dr.dr6 & !0xf) | hits;
                return self.raise(Event::exception(1, None));
            }
        }
        self.rflags &= !flags::RF;
        let tf = self.rflags & flags::TF != 0;
        let delivered = self.events_delivered;
        match self.exec_one() {
            Ok(()) => {
                self.replay_len = 0;
                self.retired += 1;
                let single_step = tf && self.single_step_trap(delivered);
                if single_step || self.db_hits != 0 {
                    return self.debug_trap(single_step);
                }
                None
            }
            Err(Stop::Done(exit)) => {
                self.replay_len = 0;
                self.retired += 1;
                // HLT: its single-step trap waits in the halt state and is
                // delivered first when an interrupt ends it (a trap of the
                // previous instruction comes before an external interrupt,
                // SDM vol. 3, 6.9): `run` delivers it.
                if tf && self.single_step_trap(delivered) {
                    self.db_hits |= DR6_BS;
                }
                Some(exit)
            }
            Err(Stop::Exit(exit)) => {
                // Unfinished: the shadows (and RF) still hold for its
                // re-execution.
                self.rflags |= rf;
                self.rip = start;
                self.sti_shadow = sti;
                self.mov_ss_shadow = movss;
                // Its re-execution makes its accesses again.
                self.db_hits = held;
                Some(exit)
            }
            Err(Stop::Exc(vector, error_code)) => {
                self.replay_len = 0;
                self.rip = start;
                // A faulting instruction did not complete: its accesses
                // make no data breakpoint trap (SDM vol. 3, 18.3.1.2).
                self.db_hits = held;
                let exit = self.raise(Event::exception(vector, error_code));
                if exit.is_none() && self.db_hits != 0 {
                    // Hits held by a MOV SS shadow come after the fault's
                    // delivery, at its handler's first instruction.
                    return self.debug_trap(false);
                }
                exit
            }
        }
    }

    /// The trap-class #DB after an instruction: single-step (DR6.BS) and
    /// the data / I/O breakpoints it hit (DR6.B0-B3, the others cleared;
    /// SDM vol. 3, 18.2.3), one #DB for all. A MOV SS / POP SS holds the
    /// data breakpoints until the next instruction has run (SDM vol. 3,
    /// 6.8.3), including one that delivers an event: after INT n or INT3
    /// the #DB comes at the handler's first instruction; a #DB delivered
    /// meanwhile (INT1) reports them itself (`deliver`).
    #[cold]
    #[inline(never)]
    fn debug_trap(&mut self, single_step: bool) -> Option<VcpuExit> {
        if self.mov_ss_shadow {
            return None;
        }
        let hits = std::mem::take(&mut self.db_hits);
        let bs = if single_step { DR6_BS } else { 0 };
        self.dr.dr6 = (self.dr.dr6 & !0xf) | hits | bs;
        self.raise(Event::exception(1, None))
    }

    /// Delivers `event` with the SDM's double-fault rules (vol. 3, table
    /// 6-5): a contributory exception or #PF during the delivery of a
    /// contributory exception or #PF becomes #DF; a fault delivering #DF is a
    /// triple fault (shutdown). Returns an exit when the run must end.
    fn raise(&mut self, event: Event) -> Option<VcpuExit> {
        let mut ev = event;
        loop {
            match self.deliver(&ev) {
                Ok(()) => return None,
                Err(Stop::Exc(v2, e2)) => {
                    if ev.kind == EventKind::HardwareException && ev.vector == 8 {
                        return Some(VcpuExit::Shutdown);
                    }
                    let contributory = |v: u8| matches!(v, 0 | 10 | 11 | 12 | 13);
                    let first_hw = ev.kind == EventKind::HardwareException;
                    let df = first_hw
                        && ((contributory(ev.vector) && contributory(v2))
                            || (ev.vector == 14 && (contributory(v2) || v2 == 14)));
                    ev = if df {
                        Event::exception(8, Some(0))
                    } else {
                        Event::exception(v2, e2)
                    };
                }
                Err(Stop::Exit(e)) | Err(Stop::Done(e)) => return Some(e),
            }
        }
    }

    /// The interruptibility state for `get_events`.
    fn interruptibility(&self) -> Interruptibility {
        Interruptibility {
            sti: self.sti_shadow,
            mov_ss: self.mov_ss_shadow,
            nmi: self.nmi_blocked,
        }
    }

    /// Finishes an instruction an exit left unfinished, so that the state
    /// (and a shadow it creates) is architectural before the VMM looks at
    /// it. An exit it needs is kept for the next `run()`.
    fn finish_in_progress(&mut self) {
        self.absorb_completion();
        if self.deferred_exit.is_none() && self.replay_len > 0 {
            self.deferred_exit = self.step();
            if self.replay_len == 0 {
                if let Some(d) = self.guest_debug.as_mut() {
                    d.retired = true;
                }
            }
        }
    }
}

impl Vcpu for InterpVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn backend(&self) -> &'static str {
        "interp"
    }

    fn run(&mut self) -> VcpuResult<VcpuExit> {
        if self.kick.flag.swap(false, Ordering::SeqCst) {
            return Ok(VcpuExit::Kicked);
        }
        self.drop_code_others_wrote();
        self.finish_in_progress();
        if let Some(e) = self.deferred_exit.take() {
            return Ok(e);
        }
        // The instruction an exit left open counts as the step.
        if self
            .guest_debug
            .as_mut()
            .is_some_and(|d| std::mem::take(&mut d.retired) && d.single_step)
        {
            return Ok(self.debug_exit(DR6_BS));
        }
        // A debug trap an instruction that ended the last run (HLT) left
        // pending comes before the event that wakes the processor.
        if self.db_hits != 0 && !self.mov_ss_shadow {
            if let Some(exit) = self.debug_trap(false) {
                return Ok(exit);
            }
        }
        if let Some(ev) = self.pending_event.take() {
            if ev.kind == EventKind::Nmi {
                self.nmi_blocked = true;
            }
            if let Some(exit) = self.raise(ev) {
                return Ok(exit);
            }
            // Single-stepping stops at the handler's first instruction.
            if self.guest_debug.as_ref().is_some_and(|d| d.single_step) {
                return Ok(self.debug_exit(DR6_BS));
            }
        }
        // Only `set_guest_debug` changes it, never an instruction: tested
        // once here, the hot loop tests a register.
        let debugging = self.guest_debug.is_some();
        let mut n = 0u64;
        loop {
            if self.kick.flag.load(Ordering::Relaxed) {
                self.kick.flag.store(false, Ordering::SeqCst);
                return Ok(VcpuExit::Kicked);
            }
            if self.irq_window
                && self.rflags & cpu::rflags::IF != 0
                && !self.sti_shadow
                && !self.mov_ss_shadow
            {
                return Ok(VcpuExit::InterruptWindow);
            }
            if self.nmi_window && self.nmi_unblocked() {
                return Ok(VcpuExit::NmiWindow);
            }
            if debugging {
                if let Some(exit) = self.debug_check(n) {
                    return Ok(exit);
                }
            }
            if self.stop_at_retired.is_some_and(|t| self.retired >= t) {
                if let Some(limit) = self.limit_before_pause_exit.take() {
                    self.stop_at_retired = limit;
                }
                return Ok(VcpuExit::Kicked);
            }
            if n >= RUN_BUDGET {
                return Ok(VcpuExit::Kicked);
            }
            n += 1;
            if let Some(exit) = self.step() {
                return Ok(exit);
            }
        }
    }

    fn io_data(&mut self) -> &mut [u8] {
        &mut self.io_buf[..self.io_len]
    }

    fn mmio_data(&mut self) -> &mut [u8] {
        &mut self.mmio_buf[..self.mmio_len]
    }

    fn complete_rdmsr(&mut self, value: Option<u64>) {
        if let Some(last) = self.replay_len.checked_sub(1) {
            let c = &mut self.replay[last];
            if c.kind == ExtKind::RdMsr {
                c.data = value.unwrap_or(0);
                c.ok = value.is_some();
            }
        }
    }

    fn complete_wrmsr(&mut self, ok: bool) {
        if let Some(last) = self.replay_len.checked_sub(1) {
            let c = &mut self.replay[last];
            if c.kind == ExtKind::WrMsr {
                c.ok = ok;
            }
        }
    }

    fn cr8(&mut self) -> u64 {
        self.cr8
    }

    fn set_cr8(&mut self, cr8: u64) {
        self.cr8 = cr8 & 0xf;
    }

    fn readiness(&mut self) -> VcpuResult<Readiness> {
        self.finish_in_progress();
        let if_flag = self.rflags & cpu::rflags::IF != 0;
        let busy = self.deferred_exit.is_some() || self.pending_event.is_some();
        Ok(Readiness {
            if_flag,
            interrupt: if_flag && !self.sti_shadow && !self.mov_ss_shadow && !busy,
            nmi: self.nmi_unblocked() && !busy,
        })
    }

    fn inject(&mut self, event: Event) -> VcpuResult<()> {
        self.pending_event = Some(event);
        Ok(())
    }

    fn set_interrupt_window_exiting(&mut self, on: bool) {
        self.irq_window = on;
    }

    fn set_nmi_window_exiting(&mut self, on: bool) {
        self.nmi_window = on;
    }

    fn idt_vectoring(&mut self) -> Option<Event> {
        // Deliveries are not cut short by exits in this milestone: an IDT,
        // GDT, TSS or stack outside RAM ends the run (see `system.rs`).
        None
    }

    fn get_regs(&mut self) -> VcpuResult<Regs> {
        let g = &self.gpr;
        Ok(Regs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.rip,
            rflags: self.rflags,
        })
    }

    fn set_regs(&mut self, r: &Regs) -> VcpuResult<()> {
        self.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.rip = r.rip;
        self.rflags = (r.rflags & flags::SETTABLE) | cpu::rflags::FIXED1;
        self.replay_len = 0;
        self.awaiting = false;
        Ok(())
    }

    fn get_sregs(&mut self) -> VcpuResult<Sregs> {
        let mut s = self.sregs;
        s.cr8 = self.cr8;
        Ok(s)
    }

    fn set_sregs(&mut self, s: &Sregs) -> VcpuResult<()> {
        self.sregs = *s;
        self.cr8 = s.cr8 & 0xf;
        self.tlb.flush();
        self.mode_changed();
        Ok(())
    }

    fn get_debug_regs(&mut self) -> VcpuResult<DebugRegs> {
        Ok(self.dr)
    }

    fn set_debug_regs(&mut self, dr: &DebugRegs) -> VcpuResult<()> {
        self.dr = *dr;
        self.dr7_changed();
        Ok(())
    }

    fn get_fpu(&mut self) -> VcpuResult<FpuState> {
        Ok(self.fpu.clone())
    }

    fn set_fpu(&mut self, fpu: &FpuState) -> VcpuResult<()> {
        self.fpu = fpu.clone();
        Ok(())
    }

    fn get_msrs(&mut self, indices: &[u32]) -> VcpuResult<Vec<Msr>> {
        Ok(indices
            .iter()
            .filter_map(|&index| self.own_msr_read(index).map(|value| Msr { index, value }))
            .collect())
    }

    fn set_msrs(&mut self, msrs: &[Msr]) -> VcpuResult<()> {
        for m in msrs {
            // Values another processor accepted; an unknown one is skipped.
            let _ = self.own_msr_write(m.index, m.value);
        }
        Ok(())
    }

    fn get_events(&mut self) -> VcpuResult<VcpuEvents> {
        let mut e = VcpuEvents {
            interruptibility: self.interruptibility(),
            ..Default::default()
        };
        if let Some(ev) = self.pending_event {
            match ev.kind {
                EventKind::HardwareException
                | EventKind::SoftwareException
                | EventKind::PrivilegedSoftwareException => {
                    e.exception = Some(PendingException {
                        vector: ev.vector,
                        error_code: ev.error_code,
                        injected: true,
                        payload: None,
                    })
                }
                EventKind::Nmi => e.nmi_injected = true,
                EventKind::External => {
                    e.interrupt = Some(InjectedInterrupt {
                        vector: ev.vector,
                        soft: false,
                    })
                }
                EventKind::SoftwareInterrupt => {
                    e.interrupt = Some(InjectedInterrupt {
                        vector: ev.vector,
                        soft: true,
                    })
                }
            }
        }
        Ok(e)
    }

    fn set_events(&mut self, e: &VcpuEvents) -> VcpuResult<()> {
        self.sti_shadow = e.interruptibility.sti;
        self.mov_ss_shadow = e.interruptibility.mov_ss;
        self.nmi_blocked = e.interruptibility.nmi;
        self.pending_event = if let Some(x) = e.exception {
            Some(Event::exception(x.vector, x.error_code))
        } else if e.nmi_injected {
            Some(Event::nmi())
        } else {
            e.interrupt.map(|i| Event {
                kind: if i.soft {
                    EventKind::SoftwareInterrupt
                } else {
                    EventKind::External
                },
                vector: i.vector,
                error_code: None,
                instruction_len: 0,
            })
        };
        Ok(())
    }

    fn get_mp_state(&mut self) -> VcpuResult<MpState> {
        // HLT is an exit the run loop waits on, as on KVM without an
        // in-kernel LAPIC.
        Ok(MpState::Runnable)
    }

    fn set_mp_state(&mut self, _state: MpState) -> VcpuResult<()> {
        Ok(())
    }

    fn instructions_retired(&self) -> Option<u64> {
        Some(self.retired)
    }

    fn set_run_limit(&mut self, instructions: Option<u64>) {
        self.limit_before_pause_exit = None;
        self.stop_at_retired = instructions.map(|n| self.retired.saturating_add(n));
    }

    fn set_pause_exiting(&mut self, pauses: Option<u32>) {
        self.pause_exiting = pauses;
        self.pauses = 0;
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.kick.clone()
    }

    fn set_guest_debug(&mut self, single_step: bool, hw_breakpoints: &[u64]) -> VcpuResult<()> {
        // Any number of breakpoints: the interpreter compares addresses.
        if !single_step && hw_breakpoints.is_empty() {
            self.guest_debug = None;
            return Ok(());
        }
        let d = self.guest_debug.get_or_insert_with(Box::default);
        d.single_step = single_step;
        d.breakpoints.clear();
        d.breakpoints.extend_from_slice(hw_breakpoints);
        Ok(())
    }
}

#[cfg(test)]
mod run_limit_tests {
    use super::*;

    /// A real-mode vCPU at 0000:1000 spinning on `jmp $`.
    fn spinning() -> InterpVcpu {
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        mem.write(0x1000, &[0xeb, 0xfe]).unwrap();
        let mut v = InterpVcpu::new(0, mem);
        let mut s = v.get_sregs().unwrap();
        s.cs = cpu::Segment::real_mode(0, true);
        v.set_sregs(&s).unwrap();
        let mut r = v.get_regs().unwrap();
        r.rip = 0x1000;
        v.set_regs(&r).unwrap();
        v
    }

    #[test]
    fn run_stops_exactly_at_the_limit_and_the_limit_can_be_lifted() {
        let mut v = spinning();
        assert_eq!(v.instructions_retired(), Some(0));
        v.set_run_limit(Some(10));
        assert_eq!(v.run().unwrap(), VcpuExit::Kicked);
        assert_eq!(v.instructions_retired(), Some(10));
        // The limit counts from when it is given.
        v.set_run_limit(Some(7));
        assert_eq!(v.run().unwrap(), VcpuExit::Kicked);
        assert_eq!(v.retired(), 17);
        v.set_run_limit(None);
        assert_eq!(v.run().unwrap(), VcpuExit::Kicked);
        assert_eq!(v.retired(), 17 + RUN_BUDGET);
    }

    /// A real-mode vCPU over `mem` at 0000:`ip`.
    fn real_mode_at(id: u32, mem: &Arc<GuestMemory>, ip: u64) -> InterpVcpu {
        let mut v = InterpVcpu::new(id, mem.clone());
        let mut s = v.get_sregs().unwrap();
        s.cs = cpu::Segment::real_mode(0, true);
        v.set_sregs(&s).unwrap();
        let mut r = v.get_regs().unwrap();
        r.rip = ip;
        v.set_regs(&r).unwrap();
        v
    }

    /// Cross-modifying code (SDM vol. 3, 8.1.3): code one processor wrote
    /// is what another executes after its next entry, although it had
    /// decoded (and cached) the old bytes. Linux patches its text on one
    /// CPU (INT3 first, then the new instruction, an IPI after each step);
    /// a CPU that kept the INT3 cached took it forever, the handler
    /// backing RIP up to retry the instruction it found restored.
    #[test]
    fn code_another_processor_wrote_is_seen_at_the_next_entry() {
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        // 0x1000: mov al, 1; hlt
        mem.write(0x1000, &[0xb0, 0x01, 0xf4]).unwrap();
        // 0x2000: mov byte [0x1001], 2; hlt
        mem.write(0x2000, &[0xc6, 0x06, 0x01, 0x10, 0x02, 0xf4])
            .unwrap();
        let mut reader = real_mode_at(1, &mem, 0x1000);
        let mut writer = real_mode_at(0, &mem, 0x2000);
        assert_eq!(reader.run().unwrap(), VcpuExit::Hlt);
        assert_eq!(reader.get_regs().unwrap().rax & 0xff, 1);
        assert_eq!(writer.run().unwrap(), VcpuExit::Hlt);
        let mut r = reader.get_regs().unwrap();
        r.rip = 0x1000;
        reader.set_regs(&r).unwrap();
        assert_eq!(reader.run().unwrap(), VcpuExit::Hlt);
        assert_eq!(
            reader.get_regs().unwrap().rax & 0xff,
            2,
            "the reader ran the instruction it had cached before the write"
        );
        // The writer's own write is not in its log: its cache dropped the
        // page already, and it runs on.
        assert_eq!(writer.code_seen, 0);
        writer.drop_code_others_wrote();
        assert_eq!(writer.code_seen, mem.code_watch().seq());
    }
}
