//! Lockstep: one guest on two processors (KVM as the reference, the
//! interpreter as the subject), one instruction at a time, the architectural
//! state compared after every instruction.
//!
//! Each side is a whole machine (its own RAM and devices) on a virtual clock;
//! both clocks move by the same amounts (`ns_per_step` an instruction,
//! `ns_per_exit` a port / MMIO / MSR exit, a jump to the next deadline in
//! HLT), so each side's ladder makes the same decision at the same
//! instruction boundary, and the event each injects is compared too.
//!
//! A step is one of: an instruction retired (KVM_GUESTDBG_SINGLESTEP, or on
//! PVM a DR0 breakpoint at the next instruction, see DEVELOPERS.md); an
//! event delivered, stopped at its handler's first instruction with a
//! breakpoint there (as the debugger does, so a step never runs into the
//! handler); a HLT, executed by the lockstep itself on both sides (PVM steps
//! over HLT without its exit) followed by a jump of virtual time to the next
//! timer deadline. The masking rules are in [`RULES`].
//!
//! With several vCPUs (`tandem diff --lockstep --smp N`) each side holds N
//! and the lockstep steps them in one round-robin order, one step each:
//! vCPU 0, 1, ..., skipping a vCPU that is halted with nothing to wake it
//! or waits for a SIPI (INIT and SIPI are taken through
//! `InterruptSource::take_startup`, as the run loop takes them). The same
//! vCPU is stepped on both sides each time, and a divergence names it.
//! When every vCPU waits, both clocks jump to the next timer deadline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tandem_core::cpu::{Event, Regs, Segment, Sregs, VcpuEvents};
use tandem_core::ladder;
use tandem_core::paging;
use tandem_core::pc::Pc;
use tandem_core::vcpu::{Vcpu, VcpuExit};
use tandem_decoder::iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, Instruction, InstructionInfoFactory,
    IntelFormatter, Mnemonic, OpAccess, OpKind, Register, RflagsBits,
};
use tandem_interp::InterpVcpu;
use tandem_kvm::{KvmVcpu, KvmVm};

/// A masking rule: a documented difference that is not a divergence. The
/// value the reference computed is copied to the subject after the
/// comparison, so the difference does not spread to later instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rule {
    /// The flags an instruction leaves undefined (iced-x86's
    /// `Instruction::rflags_undefined`, from the SDM's "Flags Affected").
    UndefinedFlags,
    /// SHLD / SHRD with a count above the operand size (16-bit operands):
    /// the SDM leaves the result and the flags undefined.
    UndefinedResult,
    /// RDTSC / RDTSCP: KVM's TSC is the host's (DEVELOPERS.md).
    Tsc,
    /// RDRAND / RDSEED: random by definition.
    Random,
    /// CPUID: on PVM the feature leaves come from the hardware
    /// (DEVELOPERS.md); the `cpuid` guest compares the table itself.
    Cpuid,
    /// RFLAGS.RF: set by the processor around the VMM's breakpoints, not by
    /// the instruction.
    ResumeFlag,
    /// STI with RFLAGS.IF already set: KVM's instruction emulator (all
    /// ring-0 and legacy code on PVM) reports an STI shadow, which the SDM
    /// (STI: "if IF = 0 ...") and VMX ("execution of STI with RFLAGS.IF = 0
    /// sets this bit") do not. The interpreter takes KVM's shadow, so both
    /// ladders hold an interrupt back for the same instruction.
    StiShadow,
    /// A flag KVM's instruction emulator computes against the SDM, for an
    /// instruction PVM emulates (ring 0, legacy modes): listed with the
    /// reason in [`KVM_EMULATOR_FLAGS`].
    KvmEmulatorFlags,
    /// KVM single-steps with RFLAGS.TF: what it pushes meanwhile (PUSHF,
    /// exception and interrupt frames) has TF set; the lockstep clears it in
    /// KVM's memory where that bit alone differs.
    KvmStepTf,
    /// A segment's hidden attributes other than base, limit, DPL, L and D/B
    /// (the accessed bit, the unusable marker): KVM reports them as its
    /// hardware caches them.
    SegmentAttributes,
}

/// The rules with their names and reasons, for reports and the README.
pub const RULES: &[(Rule, &str, &str)] = &[
    (
        Rule::UndefinedFlags,
        "undefined-flags",
        "flags the SDM leaves undefined for the instruction (iced-x86 rflags_undefined)",
    ),
    (
        Rule::UndefinedResult,
        "undefined-result",
        "SHLD/SHRD with a count greater than the operand size: result and flags undefined (SDM)",
    ),
    (
        Rule::Tsc,
        "tsc",
        "RDTSC/RDTSCP results: KVM's TSC is the host's",
    ),
    (
        Rule::Random,
        "random",
        "RDRAND/RDSEED results and their CF",
    ),
    (
        Rule::Cpuid,
        "cpuid",
        "CPUID results: PVM answers feature leaves from the hardware",
    ),
    (
        Rule::ResumeFlag,
        "rf",
        "RFLAGS.RF around the VMM's breakpoints",
    ),
    (
        Rule::StiShadow,
        "kvm-sti-shadow",
        "KVM's emulator sets an STI shadow for STI with IF already 1 (SDM: only with IF 0)",
    ),
    (
        Rule::KvmEmulatorFlags,
        "kvm-emulator",
        "flags and registers KVM's instruction emulator computes against the SDM and the \
         hardware (PVM, emulated code only)",
    ),
    (
        Rule::KvmStepTf,
        "kvm-step-tf",
        "TF that KVM's single-stepping leaves in pushed RFLAGS images",
    ),
    (
        Rule::SegmentAttributes,
        "segment-attributes",
        "segment accessed bit / unusable marker (hidden attributes beyond base, limit, DPL, L, D/B)",
    ),
];

/// KVM's instruction emulator (arch/x86/kvm/emulate.c), which runs every
/// ring-0 and legacy-mode instruction on PVM, against the SDM: instruction,
/// the RFLAGS bits it gets wrong, why.
pub const KVM_EMULATOR_FLAGS: &[(Mnemonic, u64, &str)] = &[(
    Mnemonic::Aad,
    1 << 7,
    "em_aad ORs the whole accumulator (AX, 16 bits) with 0 for PF/ZF/SF, so SF is AX bit 15 \
     (always 0) instead of AL bit 7 (SDM vol. 2, AAD: SF, ZF, PF from AL)",
)];

/// KVM's instruction emulator against the hardware, for a register an
/// instruction writes (PVM, emulated code only): the instruction, why.
pub const KVM_EMULATOR_REGISTERS: &[(Mnemonic, &str)] = &[(
    Mnemonic::Cmpxchg,
    "em_cmpxchg writes the destination back when the comparison fails, so a 32-bit \
     register destination is zero-extended; the processor leaves a register destination \
     alone (64-bit ring 3 run natively on KVM), and so does the interpreter",
)];

pub fn rule_name(r: Rule) -> &'static str {
    RULES
        .iter()
        .find(|(x, _, _)| *x == r)
        .map(|(_, n, _)| *n)
        .unwrap_or("?")
}

/// The processor of a side.
pub enum Cpu {
    Kvm {
        vcpu: Box<KvmVcpu>,
        /// The VM, held by vCPU 0's side of it.
        _vm: Option<Box<KvmVm>>,
        pvm: bool,
    },
    Interp {
        vcpu: Box<InterpVcpu>,
        /// The decoded-instruction cache is emptied for the code page before
        /// every instruction (the interpreter as its own reference).
        cache_off: bool,
    },
}

/// Registers read since the vCPU last ran or was written.
#[derive(Debug, Default)]
struct Cache {
    regs: Option<Regs>,
    sregs: Option<Sregs>,
    events: Option<VcpuEvents>,
}

/// A vCPU of a side other than the one being stepped, with what the side
/// keeps per vCPU.
struct Parked {
    id: u32,
    cpu: Cpu,
    cache: Cache,
    halted: Option<bool>,
    cr8: Option<u64>,
}

/// One machine of a lockstep. `cpu` (with `cache`, `halted`, `cr8`) is the
/// vCPU being stepped, [`Side::select`] swaps another one in.
pub struct Side {
    cache: Cache,
    pub name: String,
    pub pc: Pc,
    pub cpu: Cpu,
    /// The index of the vCPU in `cpu`.
    id: u32,
    /// The other vCPUs.
    parked: Vec<Parked>,
    /// RFLAGS.IF at the HLT that halted the side.
    halted: Option<bool>,
    cr8: Option<u64>,
    ns_per_step: u64,
    ns_per_exit: u64,
    /// Instructions the interpreter fallback executed for KVM.
    pub fallbacks: u64,
    /// PVM: 64-bit ring-3 instructions run natively, stopped by a planted
    /// HLT whose #GP the machine's handler ends with a HLT exit (the
    /// fuzzer's machines); otherwise the interpreter fallback runs them.
    pub ring3_native: bool,
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// An instruction retired.
    Executed,
    /// An event was delivered; the side stands at its handler.
    Delivered(Event),
    /// HLT: the side waits for an event.
    Halted,
    /// The guest ended (stop request, triple fault, halt nothing can end).
    End(String),
}

impl Side {
    pub fn new(name: &str, pc: Pc, cpu: Cpu, ns_per_step: u64, ns_per_exit: u64) -> Side {
        Side {
            cache: Cache::default(),
            name: name.to_string(),
            pc,
            cpu,
            id: 0,
            parked: Vec::new(),
            halted: None,
            cr8: None,
            ns_per_step,
            ns_per_exit,
            fallbacks: 0,
            ring3_native: false,
        }
    }

    /// Adds vCPU `id` (parked until [`Side::select`] picks it).
    pub fn add_vcpu(&mut self, id: u32, cpu: Cpu) {
        self.parked.push(Parked {
            id,
            cpu,
            cache: Cache::default(),
            halted: None,
            cr8: None,
        });
    }

    /// The vCPUs of the side.
    pub fn vcpu_count(&self) -> usize {
        self.parked.len() + 1
    }

    /// The index of the vCPU being stepped.
    pub fn vcpu_id(&self) -> u32 {
        self.id
    }

    /// Makes vCPU `id` the one stepped (and compared); false if the side
    /// has no such vCPU.
    pub fn select(&mut self, id: u32) -> bool {
        if id == self.id {
            return true;
        }
        let Some(p) = self.parked.iter_mut().find(|p| p.id == id) else {
            return false;
        };
        std::mem::swap(&mut p.id, &mut self.id);
        std::mem::swap(&mut p.cpu, &mut self.cpu);
        std::mem::swap(&mut p.cache, &mut self.cache);
        std::mem::swap(&mut p.halted, &mut self.halted);
        std::mem::swap(&mut p.cr8, &mut self.cr8);
        true
    }

    /// INIT and SIPI for the selected vCPU at this boundary, taken as the
    /// run loop takes them (`Machine::turn`): the state follows; returns
    /// whether the vCPU can run (not waiting for a SIPI) and what happened.
    fn startup(&mut self) -> Result<(bool, String)> {
        use tandem_core::cpu::VcpuState;
        use tandem_core::ladder::Startup;
        use tandem_core::machine::INIT_SIGNATURE;
        let id = self.id;
        let what = self.pc.machine.interrupts.take_startup(id);
        let runs = match what {
            Startup::Run => true,
            Startup::Init => {
                let apic_base = self.sregs()?.apic_base;
                self.v()
                    .set_state(&VcpuState::after_init(id == 0, apic_base, INIT_SIGNATURE))?;
                self.halted = None;
                true
            }
            Startup::Sipi(vector) => {
                let apic_base = self.sregs()?.apic_base;
                let mut st = VcpuState::after_init(false, apic_base, INIT_SIGNATURE);
                st.start_at_sipi(vector);
                self.v().set_state(&st)?;
                self.halted = None;
                true
            }
            Startup::WaitForSipi { init } => {
                if init {
                    let apic_base = self.sregs()?.apic_base;
                    self.v()
                        .set_state(&VcpuState::after_init(false, apic_base, INIT_SIGNATURE))?;
                    self.halted = None;
                }
                false
            }
        };
        Ok((runs, format!("{what:?}")))
    }

    /// Whether the selected vCPU, if halted, has something that ends the
    /// HLT now (without moving time, which the round robin does when every
    /// vCPU waits).
    fn wakes(&mut self) -> bool {
        let Some(if_flag) = self.halted else {
            return true;
        };
        let m = &self.pc.machine;
        m.timers.fire_due(m.clock.now_ns());
        if m.interrupts.nmi_pending(self.id) || (if_flag && m.interrupts.interrupt_pending(self.id))
        {
            self.halted = None;
            return true;
        }
        false
    }

    /// `run`, kicked after two seconds: a step that never reaches its
    /// stop (a breakpoint the processor does not honour) ends as an error.
    fn watched_run(&mut self) -> Result<VcpuExit> {
        if let Cpu::Interp { .. } = self.cpu {
            return Ok(self.v().run()?);
        }
        let kicker = self.raw().kicker();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let t = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            while !d2.load(std::sync::atomic::Ordering::SeqCst) {
                if start.elapsed() >= std::time::Duration::from_secs(2) {
                    kicker.kick();
                    return true;
                }
                std::thread::park_timeout(std::time::Duration::from_millis(5));
            }
            false
        });
        let exit = self.v().run();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        t.thread().unpark();
        let kicked = t.join().unwrap_or(false);
        let exit = exit?;
        if kicked && exit == VcpuExit::Kicked {
            let r = self.regs()?;
            bail!(
                "{}: the step did not stop within 2 s (rip {:#x})",
                self.name,
                r.rip
            );
        }
        Ok(exit)
    }

    /// Forgets a halt and the CR8 seen (a new fuzz case is loaded).
    pub fn reset(&mut self) {
        self.halted = None;
        self.cr8 = None;
    }

    /// The vCPU, for anything that may change its state (the cached
    /// registers are dropped).
    pub fn v(&mut self) -> &mut dyn Vcpu {
        self.cache = Cache::default();
        self.raw()
    }

    /// The vCPU without dropping the cache (reads, and calls that change
    /// no register).
    fn raw(&mut self) -> &mut dyn Vcpu {
        match &mut self.cpu {
            Cpu::Kvm { vcpu, .. } => &mut **vcpu,
            Cpu::Interp { vcpu, .. } => &mut **vcpu,
        }
    }

    /// The registers (each KVM ioctl costs tens of microseconds on PVM:
    /// read once a step).
    pub fn regs(&mut self) -> Result<Regs> {
        if let Some(r) = &self.cache.regs {
            return Ok(*r);
        }
        let r = self.raw().get_regs()?;
        self.cache.regs = Some(r);
        Ok(r)
    }

    pub fn sregs(&mut self) -> Result<Sregs> {
        if let Some(r) = &self.cache.sregs {
            return Ok(*r);
        }
        let r = self.raw().get_sregs()?;
        self.cache.sregs = Some(r);
        Ok(r)
    }

    pub fn events(&mut self) -> Result<VcpuEvents> {
        if let Some(r) = &self.cache.events {
            return Ok(*r);
        }
        let r = self.raw().get_events()?;
        self.cache.events = Some(r);
        Ok(r)
    }

    /// Whether this side runs code in `s` through KVM's instruction
    /// emulator (PVM: everything but 64-bit ring 3).
    pub fn emulates(&self, s: &Sregs) -> bool {
        self.pvm() && !(s.long_mode() && s.cs.l && s.cpl() == 3)
    }

    fn pvm(&self) -> bool {
        matches!(self.cpu, Cpu::Kvm { pvm: true, .. })
    }

    fn advance(&self, ns: u64) {
        if let Some(v) = &self.pc.virtual_clock {
            v.advance(ns);
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.pc.machine.clock.now_ns()
    }

    /// Guest debugging for the next entry. The interpreter's "instruction
    /// already retired" note of a previous step is dropped by turning its
    /// debugging off first.
    fn debug(&mut self, step: bool, bps: &[u64]) -> Result<()> {
        if let Cpu::Interp { vcpu, .. } = &mut self.cpu {
            vcpu.set_guest_debug(false, &[])?;
        }
        self.v().set_guest_debug(step, bps)?;
        Ok(())
    }

    fn sync_cr8_from_vcpu(&mut self) {
        let now = self.raw().cr8();
        if self.cr8 != Some(now) {
            self.pc.machine.interrupts.set_cr8(self.id, now);
            self.cr8 = Some(now);
        }
    }

    fn sync_cr8_to_vcpu(&mut self) {
        if let Some(tpr) = self.pc.machine.interrupts.cr8(self.id) {
            if self.cr8 != Some(tpr) {
                self.raw().set_cr8(tpr);
                self.cr8 = Some(tpr);
            }
        }
    }

    /// Waits in virtual time for what ends a HLT. `None`: the side can go
    /// on; `Some(end)`: nothing can end it.
    fn wait_halted(&mut self, if_flag: bool) -> Option<String> {
        let m = self.pc.machine.clone();
        for _ in 0..100_000 {
            if m.control.stop_requested() {
                return None;
            }
            m.timers.fire_due(m.clock.now_ns());
            if m.interrupts.nmi_pending(self.id)
                || (if_flag && m.interrupts.interrupt_pending(self.id))
            {
                self.halted = None;
                return None;
            }
            if !if_flag && !m.interrupts.can_wake_masked(self.id) {
                return Some("halt nothing can end".into());
            }
            match m.timers.next_deadline() {
                Some(d) => {
                    m.clock.warp_to(d.max(m.clock.now_ns() + 1));
                }
                None => return Some("halt nothing can end".into()),
            }
        }
        Some("halt nothing ended in 100000 timer deadlines".into())
    }

    /// One step: the event the ladder injects (to its handler), or the
    /// instruction `insn` (decoded from this side's CS:RIP by the caller).
    ///
    /// `hint`: where the other side's step ended (linear); KVM also stops
    /// there with a breakpoint, so a step that ends somewhere KVM's single
    /// step does not stop (an exception handler: KVM steps into the handler,
    /// or on VMX runs it whole with TF cleared) is compared where the
    /// interpreter ended it. Where KVM goes elsewhere it still stops at the
    /// single step.
    pub fn step(&mut self, insn: Option<&Instruction>, hint: Option<u64>) -> Result<StepKind> {
        let m = self.pc.machine.clone();
        if m.control.stop_requested() {
            if let Some(r) = m.control.stop_request() {
                return Ok(StepKind::End(format!("{r:?}")));
            }
        }
        if let Some(if_flag) = self.halted {
            if let Some(end) = self.wait_halted(if_flag) {
                return Ok(StepKind::End(end));
            }
            if m.control.stop_requested() {
                if let Some(r) = m.control.stop_request() {
                    return Ok(StepKind::End(format!("{r:?}")));
                }
            }
        }
        m.timers.fire_due(m.clock.now_ns());
        // KVM takes an NMI whenever it is handed over and queues it while
        // NMIs are blocked; the interpreter's ladder waits (SDM vol. 3,
        // 25.3). The lockstep holds KVM's ladder back the same way, so both
        // deliver the NMI at the same boundary.
        if matches!(self.cpu, Cpu::Kvm { .. }) && m.interrupts.nmi_pending(self.id) {
            let ev = self.events()?;
            if ev.interruptibility.nmi || ev.interruptibility.mov_ss {
                return self.step_without_ladder(insn, hint);
            }
        }
        let d = ladder::inject_events(self.raw(), &*m.interrupts)?;
        if d.injected.is_some() {
            self.cache = Cache::default();
        }
        // The ladder runs at every boundary here: no window exits.
        self.raw().set_interrupt_window_exiting(false);
        self.raw().set_nmi_window_exiting(false);
        self.sync_cr8_to_vcpu();
        if let Some(ev) = d.injected {
            self.halted = None;
            let sregs = self.sregs()?;
            let handler = crate::debug::engine::handler_address(&self.pc, &sregs, ev.vector);
            if let (true, Some(h)) = (self.pvm() && sregs.long_mode() && sregs.cpl() == 3, handler)
            {
                // PVM does not stop a vCPU interrupted in ring 3 at a DR0
                // breakpoint on the handler: a HLT planted there does.
                return self.deliver_to_planted_hlt(ev, h);
            }
            match handler {
                Some(h) => self.debug(false, &[h])?,
                None => self.debug(true, &[])?,
            }
            return self.run_to_debug(true).map(|k| match k {
                StepKind::Executed => StepKind::Delivered(ev),
                other => other,
            });
        }
        self.step_without_ladder(insn, hint)
    }

    /// The instruction part of `step`.
    fn step_without_ladder(
        &mut self,
        insn: Option<&Instruction>,
        hint: Option<u64>,
    ) -> Result<StepKind> {
        let m = self.pc.machine.clone();
        if self.halted.is_some() {
            // Still halted: nothing was injected.
            return Ok(StepKind::Halted);
        }
        let Some(insn) = insn else {
            let s = self.sregs()?;
            let r = self.regs()?;
            bail!(
                "{}: no instruction decodes at {:04x}:{:x}",
                self.name,
                s.cs.selector,
                r.rip
            );
        };
        if insn.mnemonic() == Mnemonic::Hlt {
            // PVM steps over HLT without its exit: both sides do HLT here.
            let mut r = self.regs()?;
            r.rip = r.rip.wrapping_add(insn.len() as u64);
            self.v().set_regs(&r)?;
            let mut ev = self.events()?;
            if ev.interruptibility.sti || ev.interruptibility.mov_ss {
                ev.interruptibility.sti = false;
                ev.interruptibility.mov_ss = false;
                self.v().set_events(&ev)?;
            }
            self.halted = Some(r.rflags & (1 << 9) != 0);
            self.advance(self.ns_per_step);
            return Ok(StepKind::Halted);
        }
        let s = self.sregs()?;
        let r = self.regs()?;
        let next_ip = r.rip.wrapping_add(insn.len() as u64) & ip_mask(&s);
        let next_la = s.cs.base.wrapping_add(next_ip);
        if self.pvm() {
            let ring3_64 = s.long_mode() && s.cs.l && s.cpl() == 3;
            let flow = insn.flow_control();
            if ring3_64 {
                // PVM shuts a single-stepped 64-bit CPL3 vCPU down and does
                // not stop it at a DR0-DR3 breakpoint either (measured
                // here): the instruction runs natively with a HLT planted
                // after it, which faults (#GP at CPL3) into the ring-0
                // catch-all handler's HLT exit; the ring-3 state comes back
                // from the exception frame. What can leave the straight
                // line goes to the interpreter fallback.
                // A guest's own #GP handler does not stop there: only the
                // fuzzer's machines (`ring3_native`) step ring 3 natively.
                if !self.ring3_native || flow != FlowControl::Next || is_rep_string(insn) {
                    return self.fallback_one();
                }
                return self.step_native_ring3(&s, next_la);
            } else {
                // The step is lost after an OUT or MMIO-write exit: the
                // breakpoint at the next instruction recovers it.
                // PVM runs the ring-3 code after an IRET there natively and
                // stops at no breakpoint: the interpreter fallback executes
                // such an IRET for KVM (documented: not compared).
                if s.long_mode() && iret_to_ring3(&m.mem, insn, &s, &r) {
                    return self.fallback_one();
                }
                // Where it goes (the step after a branch or IRET can be lost
                // too, measured for IRETQ).
                let mut bps: Vec<u64> = if flow == FlowControl::Next {
                    vec![next_la]
                } else {
                    branch_targets(&m.mem, insn, &s, &r)
                };
                if flow == FlowControl::ConditionalBranch {
                    bps.push(next_la);
                }
                bps.extend(hint);
                bps.sort_unstable();
                bps.dedup();
                bps.truncate(4);
                self.debug(true, &bps)?;
            }
        } else {
            let bps: Vec<u64> = hint.into_iter().collect();
            self.debug(true, &bps)?;
        }
        if let Cpu::Interp {
            vcpu,
            cache_off: true,
        } = &mut self.cpu
        {
            if let Some(pa) = paging::translate(&m.mem, &s, s.cs.base.wrapping_add(r.rip)) {
                vcpu.invalidate_page(pa);
            }
        }
        let start_la = s.cs.base.wrapping_add(r.rip);
        let k = self.run_rep(insn, start_la)?;
        if matches!(self.cpu, Cpu::Kvm { .. }) {
            self.hide_step_tf(insn)?;
        }
        Ok(k)
    }

    /// KVM single-steps with RFLAGS.TF, which PVM leaves in the guest's
    /// RFLAGS and which PUSHF pushes: the lockstep clears both (guests here
    /// never set TF themselves), rule `kvm-step-tf`.
    fn hide_step_tf(&mut self, _insn: &Instruction) -> Result<()> {
        const TF: u64 = 1 << 8;
        let mut r = self.regs()?;
        if r.rflags & TF != 0 {
            r.rflags &= !TF;
            self.v().set_regs(&r)?;
        }
        Ok(())
    }

    /// Runs the step; a REP string instruction to its end.
    fn run_rep(&mut self, insn: &Instruction, start_la: u64) -> Result<StepKind> {
        loop {
            let k = self.run_to_debug(false)?;
            if k != StepKind::Executed || !is_rep_string(insn) {
                self.advance(self.ns_per_step);
                return Ok(k);
            }
            // A single step of a REP string instruction stops after each
            // iteration; the step here is the whole instruction.
            let s = self.sregs()?;
            let r = self.regs()?;
            if s.cs.base.wrapping_add(r.rip) != start_la {
                self.advance(self.ns_per_step);
                return Ok(k);
            }
        }
    }

    /// PVM: delivers the injected `ev` and stops at its handler `la` with a
    /// HLT planted there (the handler's code is put back at once).
    fn deliver_to_planted_hlt(&mut self, ev: Event, la: u64) -> Result<StepKind> {
        let m = self.pc.machine.clone();
        let s = self.sregs()?;
        let Some(pa) = paging::translate(&m.mem, &s, la) else {
            bail!("{}: the handler at {la:#x} is not mapped", self.name);
        };
        let saved = m.mem.read_u8(pa)?;
        m.mem.write_u8(pa, 0xf4)?;
        self.debug(false, &[])?;
        let r = self.run_to_debug(true);
        m.mem.write_u8(pa, saved)?;
        match r? {
            StepKind::Halted => {
                self.halted = None;
                let mut regs = self.regs()?;
                regs.rip = regs.rip.wrapping_sub(1);
                self.v().set_regs(&regs)?;
                Ok(StepKind::Delivered(ev))
            }
            other => Ok(other),
        }
    }

    /// PVM, 64-bit ring 3: one instruction natively, stopped by a HLT
    /// planted at `next_la` (see `step`).
    fn step_native_ring3(&mut self, s: &Sregs, next_la: u64) -> Result<StepKind> {
        let m = self.pc.machine.clone();
        let Some(pa) = paging::translate(&m.mem, s, next_la) else {
            return self.fallback_one();
        };
        let saved = m.mem.read_u8(pa)?;
        m.mem.write_u8(pa, 0xf4)?;
        self.debug(false, &[])?;
        let r = self.run_to_debug(false);
        m.mem.write_u8(pa, saved)?;
        let k = r?;
        if k != StepKind::Halted {
            return Ok(k);
        }
        self.halted = None;
        // The #GP frame on the ring-0 stack: error code, RIP, CS, RFLAGS,
        // RSP, SS.
        let now = self.sregs()?;
        let mut regs = self.regs()?;
        let mut frame = [0u8; 48];
        let sp = now.ss.base.wrapping_add(regs.rsp);
        if paging::read_linear(&m.mem, &now, sp, &mut frame) != 48 {
            bail!("{}: cannot read the exception frame at {sp:#x}", self.name);
        }
        let q = |k: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&frame[8 * k..8 * k + 8]);
            u64::from_le_bytes(b)
        };
        if q(1) != next_la.wrapping_sub(s.cs.base) {
            return Ok(StepKind::End(format!(
                "exception in ring 3 at {:#x} (the instruction faulted)",
                q(1)
            )));
        }
        regs.rip = q(1);
        // RF is set in a fault's frame, not by the instruction.
        regs.rflags = q(3) & !(1 << 16);
        regs.rsp = q(4);
        self.v().set_sregs(s)?;
        self.v().set_regs(&regs)?;
        self.advance(self.ns_per_step);
        Ok(StepKind::Executed)
    }

    /// Executes the instruction at CS:RIP through the interpreter fallback
    /// (KVM side, where PVM cannot step it).
    fn fallback_one(&mut self) -> Result<StepKind> {
        let m = self.pc.machine.clone();
        self.debug(false, &[])?;
        let fb = m
            .fallback
            .get()
            .cloned()
            .context("no interpreter fallback installed")?;
        match fb.execute_one(&m, self.v())? {
            Some(_) => {
                self.fallbacks += 1;
                self.advance(self.ns_per_step);
                Ok(StepKind::Executed)
            }
            None => bail!("{}: the fallback refused the instruction", self.name),
        }
    }

    /// Runs until the debug exit that ends the step (or the instruction's
    /// data exit, completed).
    fn run_to_debug(&mut self, delivering: bool) -> Result<StepKind> {
        let m = self.pc.machine.clone();
        let mut stats = tandem_core::machine::ExitStats::default();
        for _ in 0..10_000 {
            let exit = self.watched_run()?;
            self.sync_cr8_from_vcpu();
            match exit {
                VcpuExit::Debug { .. } => return Ok(StepKind::Executed),
                e @ (VcpuExit::IoOut { .. }
                | VcpuExit::IoIn { .. }
                | VcpuExit::MmioWrite { .. }
                | VcpuExit::MmioRead { .. }
                | VcpuExit::RdMsr { .. }
                | VcpuExit::WrMsr { .. }) => {
                    m.handle_data_exit(self.v(), &e, &mut stats);
                    self.advance(self.ns_per_exit);
                    // Finishes the instruction: that is the step.
                    self.v().readiness()?;
                    self.sync_cr8_from_vcpu();
                    if matches!(e, VcpuExit::MmioWrite { .. } | VcpuExit::WrMsr { .. }) {
                        self.sync_cr8_to_vcpu();
                    }
                    if delivering {
                        continue;
                    }
                    return Ok(StepKind::Executed);
                }
                VcpuExit::Hlt => {
                    let if_flag = self.v().readiness()?.if_flag;
                    self.halted = Some(if_flag);
                    return Ok(StepKind::Halted);
                }
                VcpuExit::Kicked
                | VcpuExit::InterruptWindow
                | VcpuExit::NmiWindow
                | VcpuExit::TprLowered => continue,
                VcpuExit::Shutdown => {
                    let r = self.regs().unwrap_or_default();
                    return Ok(StepKind::End(format!("triple fault at rip {:#x}", r.rip)));
                }
                VcpuExit::EmulationFailure { insn } => {
                    if let Some(fb) = m.fallback.get().cloned() {
                        if fb.execute_one(&m, self.v())?.is_some() {
                            self.fallbacks += 1;
                            return Ok(StepKind::Executed);
                        }
                    }
                    bail!(
                        "{}: emulation failure ({} bytes reported), no fallback took it",
                        self.name,
                        insn.len()
                    );
                }
                other => bail!("{}: unexpected exit while stepping: {other:?}", self.name),
            }
        }
        bail!("{}: no debug exit in 10000 runs", self.name)
    }
}

/// Where a branch, RET or IRET at CS:RIP goes (linear), read from the
/// state before it runs; empty where that is not known.
fn branch_targets(
    mem: &tandem_core::memory::GuestMemory,
    i: &Instruction,
    s: &Sregs,
    r: &Regs,
) -> Vec<u64> {
    if matches!(
        i.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    ) {
        return vec![s.cs.base.wrapping_add(i.near_branch_target())];
    }
    let bits = crate::debug::engine::bitness(s);
    let w: u64 = match i.mnemonic() {
        Mnemonic::Iretq => 8,
        Mnemonic::Iretd => 4,
        Mnemonic::Iret => 2,
        Mnemonic::Ret => u64::from(bits / 8),
        _ => return Vec::new(),
    };
    let sp =
        s.ss.base
            .wrapping_add(r.rsp & if bits == 16 { 0xffff } else { u64::MAX });
    let mut b = [0u8; 16];
    if paging::read_linear(mem, s, sp, &mut b[..(2 * w) as usize]) != (2 * w) as usize {
        return Vec::new();
    }
    let word = |k: u64| {
        let mut v = [0u8; 8];
        let at = (k * w) as usize;
        v[..w as usize].copy_from_slice(&b[at..at + w as usize]);
        u64::from_le_bytes(v)
    };
    let ip = word(0);
    if i.mnemonic() == Mnemonic::Ret {
        return vec![s.cs.base.wrapping_add(ip)];
    }
    let cs = word(1) & 0xffff;
    if s.cr0 & 1 == 0 {
        return vec![(cs << 4).wrapping_add(ip)];
    }
    // Protected and long mode: the flat segments of the project's guests
    // and of fuzz cases.
    vec![ip]
}

/// An IRET whose frame returns to ring 3.
fn iret_to_ring3(
    mem: &tandem_core::memory::GuestMemory,
    i: &Instruction,
    s: &Sregs,
    r: &Regs,
) -> bool {
    let w: u64 = match i.mnemonic() {
        Mnemonic::Iretq => 8,
        Mnemonic::Iretd => 4,
        Mnemonic::Iret => 2,
        _ => return false,
    };
    let mut cs = [0u8; 2];
    let at = s.ss.base.wrapping_add(r.rsp).wrapping_add(w);
    paging::read_linear(mem, s, at, &mut cs) == 2 && u16::from_le_bytes(cs) & 3 == 3
}

fn ip_mask(s: &Sregs) -> u64 {
    match crate::debug::engine::bitness(s) {
        64 => u64::MAX,
        32 => 0xffff_ffff,
        _ => 0xffff,
    }
}

fn is_rep_string(i: &Instruction) -> bool {
    (i.has_rep_prefix() || i.has_repne_prefix()) && i.is_string_instruction()
}

/// The architectural state compared after a step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub regs: Regs,
    pub sregs: Sregs,
    pub sti: bool,
    pub mov_ss: bool,
    pub nmi_blocked: bool,
    pub now_ns: u64,
}

fn snapshot(side: &mut Side) -> Result<Snapshot> {
    let regs = side.regs()?;
    let sregs = side.sregs()?;
    let ev: VcpuEvents = side.events()?;
    Ok(Snapshot {
        regs,
        sregs,
        sti: ev.interruptibility.sti,
        mov_ss: ev.interruptibility.mov_ss,
        nmi_blocked: ev.interruptibility.nmi,
        now_ns: side.now_ns(),
    })
}

/// The instruction at the side's CS:RIP.
fn decode_at(side: &mut Side, s: &Sregs, rip: u64) -> Option<Instruction> {
    let la = s.cs.base.wrapping_add(rip);
    let mut buf = [0u8; 15];
    let n = paging::read_linear(&side.pc.machine.mem, s, la, &mut buf);
    if n == 0 {
        return None;
    }
    let bits = crate::debug::engine::bitness(s);
    let mut d = Decoder::with_ip(bits, buf.get(..n)?, rip, DecoderOptions::NONE);
    let i = d.decode();
    (!i.is_invalid()).then_some(i)
}

/// The text of an instruction, with its bytes.
pub fn describe(side: &mut Side, s: &Sregs, rip: u64, i: &Instruction) -> String {
    let mut text = String::new();
    IntelFormatter::new().format(i, &mut text);
    let mut bytes = vec![0u8; i.len()];
    let n = paging::read_linear(
        &side.pc.machine.mem,
        s,
        s.cs.base.wrapping_add(rip),
        &mut bytes,
    );
    let hex: Vec<String> = bytes.iter().take(n).map(|b| format!("{b:02x}")).collect();
    format!(
        "{:04x}:{:016x}  {:<24} {}",
        s.cs.selector,
        rip,
        hex.join(" "),
        text
    )
}

/// The first difference of a lockstep.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// Steps completed before the divergent one (0-based index of it).
    pub step: u64,
    /// The vCPU that diverged, when the sides have several.
    pub vcpu: Option<u32>,
    /// The instruction (or event) of the divergent step, first line of the
    /// report.
    pub what: String,
    /// The mnemonic of the divergent instruction, when it was one.
    pub mnemonic: Option<Mnemonic>,
    /// The differing fields, one a line.
    pub differences: Vec<String>,
    /// Both states side by side.
    pub table: String,
}

impl Divergence {
    pub fn report(&self, reference: &str, subject: &str) -> String {
        let mut s = String::new();
        match self.vcpu {
            Some(k) => {
                let _ = writeln!(s, "vCPU {k} diverges at: {}", self.what);
            }
            None => {
                let _ = writeln!(s, "first divergent instruction: {}", self.what);
            }
        }
        let _ = writeln!(
            s,
            "after {} identical steps; {reference} and {subject} differ in:",
            self.step
        );
        for d in &self.differences {
            let _ = writeln!(s, "  {d}");
        }
        let _ = writeln!(s, "state after the instruction:");
        s.push_str(&self.table);
        s
    }
}

/// How a lockstep ended.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Both sides ended the same way after `steps` identical steps.
    Identical {
        steps: u64,
        end: String,
    },
    /// The step limit or the stop address was reached, identical so far.
    Stopped {
        steps: u64,
    },
    Diverged(Box<Divergence>),
}

/// Two sides stepped together.
pub struct Lockstep {
    pub reference: Side,
    pub subject: Side,
    pub steps: u64,
    pub deliveries: u64,
    /// How often each masking rule hid a difference.
    pub masked: BTreeMap<Rule, u64>,
    /// Linear ranges compared in full at the end (fuzz sandboxes).
    pub compare_at_end: Vec<(u64, u64)>,
    /// Wall-clock limit of `run`.
    pub deadline: Option<std::time::Instant>,
    /// Steps and deliveries per vCPU.
    pub per_vcpu: Vec<(u64, u64)>,
    info: InstructionInfoFactory,
}

impl Lockstep {
    pub fn new(reference: Side, subject: Side) -> Lockstep {
        Lockstep {
            reference,
            subject,
            steps: 0,
            deliveries: 0,
            masked: BTreeMap::new(),
            compare_at_end: Vec::new(),
            deadline: None,
            per_vcpu: Vec::new(),
            info: InstructionInfoFactory::new(),
        }
    }

    /// Steps both sides until they end, diverge, take `max_steps` steps, or
    /// the reference stands at linear address `stop_at` at an instruction
    /// boundary outside any handler. Sides with several vCPUs are stepped
    /// in round robin ([`Lockstep::run_smp`]; `stop_at` is not used there).
    pub fn run(&mut self, max_steps: u64, stop_at: Option<u64>) -> Result<Finish> {
        if self.reference.vcpu_count() > 1 || self.subject.vcpu_count() > 1 {
            return self.run_smp(max_steps);
        }
        let mut in_handler = 0u32;
        loop {
            let pre = snapshot(&mut self.reference)?;
            let la = pre.sregs.cs.base.wrapping_add(pre.regs.rip);
            if stop_at == Some(la) && in_handler == 0 {
                if let Some(d) = self.final_compare()? {
                    return Ok(Finish::Diverged(Box::new(d)));
                }
                return Ok(Finish::Stopped { steps: self.steps });
            }
            if self.steps >= max_steps {
                return Ok(Finish::Stopped { steps: self.steps });
            }
            self.check_deadline()?;
            if let Some(f) = self.step_both(pre, &mut in_handler)? {
                return Ok(f);
            }
        }
    }

    fn check_deadline(&self) -> Result<()> {
        if self.steps % 4096 == 0
            && self
                .deadline
                .is_some_and(|d| std::time::Instant::now() >= d)
        {
            bail!("timed out after {} identical steps", self.steps);
        }
        Ok(())
    }

    /// The selected vCPU when the sides have several (divergences name it).
    fn smp_vcpu(&self) -> Option<u32> {
        (self.reference.vcpu_count() > 1).then(|| self.reference.vcpu_id())
    }

    /// One step of the selected vCPU on both sides, from the reference's
    /// state `pre`, compared. `Some`: the lockstep is over.
    fn step_both(&mut self, pre: Snapshot, in_handler: &mut u32) -> Result<Option<Finish>> {
        let insn = decode_at(&mut self.reference, &pre.sregs, pre.regs.rip);
        let sub_pre = snapshot(&mut self.subject)?;
        let sub_insn = decode_at(&mut self.subject, &sub_pre.sregs, sub_pre.regs.rip);
        let b = self.subject.step(sub_insn.as_ref(), None)?;
        let hint = match b {
            StepKind::Executed => {
                let r = self.subject.regs()?;
                let s = self.subject.sregs()?;
                Some(s.cs.base.wrapping_add(r.rip))
            }
            _ => None,
        };
        let a = self.reference.step(insn.as_ref(), hint)?;
        self.hide_pushed_tf(&pre)?;
        if let Some(d) = self.compare(&pre, insn.as_ref(), &a, &b)? {
            return Ok(Some(Finish::Diverged(Box::new(d))));
        }
        self.steps += 1;
        let id = self.reference.vcpu_id() as usize;
        if self.per_vcpu.len() <= id {
            self.per_vcpu.resize(id + 1, (0, 0));
        }
        if let Some(c) = self.per_vcpu.get_mut(id) {
            c.0 += 1;
            if matches!(a, StepKind::Delivered(_)) {
                c.1 += 1;
            }
        }
        match (&a, insn.as_ref().map(|i| i.mnemonic())) {
            (StepKind::Delivered(_), _) => {
                self.deliveries += 1;
                *in_handler += 1;
            }
            (StepKind::Executed, Some(Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq)) => {
                *in_handler = in_handler.saturating_sub(1)
            }
            _ => {}
        }
        if let StepKind::End(e) = a {
            return Ok(Some(self.end(e)?));
        }
        Ok(None)
    }

    /// Both sides ended the same way: the memory compared at the end.
    fn end(&mut self, how: String) -> Result<Finish> {
        if let Some(d) = self.final_compare()? {
            return Ok(Finish::Diverged(Box::new(d)));
        }
        Ok(Finish::Identical {
            steps: self.steps,
            end: how,
        })
    }

    /// A divergence of the round robin itself (what the sides' vCPUs may
    /// do), named after the selected vCPU.
    fn schedule_divergence(&mut self, what: String, difference: String) -> Result<Finish> {
        let ra = snapshot(&mut self.reference)?;
        let rb = snapshot(&mut self.subject)?;
        Ok(Finish::Diverged(Box::new(Divergence {
            step: self.steps,
            vcpu: self.smp_vcpu(),
            what,
            mnemonic: None,
            differences: vec![difference],
            table: side_by_side(&self.reference.name, &ra, &self.subject.name, &rb),
        })))
    }

    /// Several vCPUs: one step each in index order, skipping a vCPU that
    /// waits for a SIPI or is halted with nothing to wake it; the same vCPU
    /// on both sides. When every vCPU waits, both clocks jump to the next
    /// timer deadline (nothing can end the waits without one: the run
    /// ends). A stop the guest requested ends the run at the next vCPU.
    pub fn run_smp(&mut self, max_steps: u64) -> Result<Finish> {
        let n = self.reference.vcpu_count();
        if self.subject.vcpu_count() != n {
            bail!(
                "{} has {n} vCPUs, {} {}",
                self.reference.name,
                self.subject.name,
                self.subject.vcpu_count()
            );
        }
        self.per_vcpu = vec![(0, 0); n];
        // Interrupt handlers are not tracked across vCPUs (no `stop_at`).
        let mut in_handler = 0u32;
        let mut warps = 0u32;
        loop {
            let mut stepped = false;
            for id in 0..n as u32 {
                let stop_a = self.reference.pc.machine.control.stop_request();
                let stop_b = self.subject.pc.machine.control.stop_request();
                if stop_a != stop_b {
                    return self.schedule_divergence(
                        "(stop request)".into(),
                        format!("stop request: {stop_a:?} vs {stop_b:?}"),
                    );
                }
                if let Some(r) = stop_a {
                    return self.end(format!("{r:?}"));
                }
                if self.steps >= max_steps {
                    return Ok(Finish::Stopped { steps: self.steps });
                }
                self.check_deadline()?;
                if !(self.reference.select(id) && self.subject.select(id)) {
                    bail!("vCPU {id} is missing on a side");
                }
                let (ra, wa) = self.reference.startup()?;
                let (rb, wb) = self.subject.startup()?;
                if (ra, &wa) != (rb, &wb) {
                    return self.schedule_divergence(
                        "(INIT / SIPI)".into(),
                        format!("start-up: {wa} vs {wb}"),
                    );
                }
                if !ra {
                    continue;
                }
                let (ka, kb) = (self.reference.wakes(), self.subject.wakes());
                if ka != kb {
                    return self.schedule_divergence(
                        "(halted)".into(),
                        format!("wakes from HLT: {ka} vs {kb}"),
                    );
                }
                if !ka {
                    continue;
                }
                stepped = true;
                let pre = snapshot(&mut self.reference)?;
                if let Some(f) = self.step_both(pre, &mut in_handler)? {
                    return Ok(f);
                }
            }
            if stepped {
                warps = 0;
                continue;
            }
            warps += 1;
            if warps > 100_000 {
                return self
                    .end("every vCPU waits: nothing ended it in 100000 timer deadlines".into());
            }
            // Every vCPU waits.
            let da = self.reference.pc.machine.timers.next_deadline();
            let db = self.subject.pc.machine.timers.next_deadline();
            if da != db {
                return self.schedule_divergence(
                    "(every vCPU waits)".into(),
                    format!("next timer deadline: {da:?} vs {db:?}"),
                );
            }
            let Some(d) = da else {
                return self.end("every vCPU waits and nothing can end the waits".into());
            };
            for side in [&self.reference, &self.subject] {
                let c = &side.pc.machine.clock;
                c.warp_to(d.max(c.now_ns() + 1));
            }
        }
    }

    /// What KVM pushed during the step (PUSHF, an exception or interrupt
    /// frame) carries the TF it single-steps with: where a pushed byte
    /// differs from the interpreter's in that bit alone, KVM's is cleared
    /// (rule `kvm-step-tf`).
    fn hide_pushed_tf(&mut self, pre: &Snapshot) -> Result<()> {
        if !matches!(self.reference.cpu, Cpu::Kvm { .. }) {
            return Ok(());
        }
        let ra = self.reference.regs()?;
        let sa = self.reference.sregs()?;
        let old_top = pre.sregs.ss.base.wrapping_add(pre.regs.rsp);
        let new_top = sa.ss.base.wrapping_add(ra.rsp);
        // Nothing pushed (a new stack after a privilege change is below
        // the old one in the project's guests and fuzz machines too).
        if new_top >= old_top && sa.cs.dpl == pre.sregs.cs.dpl {
            return Ok(());
        }
        // The old stack (PUSHF, same-privilege frames) and a new one.
        let mut spans = vec![(new_top, 64u64)];
        if old_top.wrapping_sub(new_top) > 64 {
            spans.push((old_top.wrapping_sub(64), 64));
        }
        let ma = self.reference.pc.machine.mem.clone();
        let mb = self.subject.pc.machine.mem.clone();
        let mut hid = false;
        let mut page: Option<(u64, Option<u64>)> = None;
        for (start, len) in spans {
            for k in 0..len {
                let la = start.wrapping_add(k);
                if la.wrapping_sub(new_top) % 2 != 1 {
                    continue;
                }
                let base = match page {
                    Some((p, b)) if p == la >> 12 => b,
                    _ => {
                        let b = paging::translate(&ma, &sa, la & !0xfff);
                        page = Some((la >> 12, b));
                        b
                    }
                };
                let Some(pa) = base.map(|b| b + (la & 0xfff)) else {
                    continue;
                };
                let (Ok(x), Ok(y)) = (ma.read_u8(pa), mb.read_u8(pa)) else {
                    continue;
                };
                if x ^ y == 1 && x & 1 != 0 {
                    ma.write_u8(pa, y)?;
                    hid = true;
                }
            }
        }
        if hid {
            self.mask(Rule::KvmStepTf);
        }
        Ok(())
    }

    fn mask(&mut self, r: Rule) {
        *self.masked.entry(r).or_default() += 1;
    }

    /// Compares the sides after a step; applies the masking rules (the
    /// subject takes the reference's masked values).
    fn compare(
        &mut self,
        pre: &Snapshot,
        insn: Option<&Instruction>,
        a: &StepKind,
        b: &StepKind,
    ) -> Result<Option<Divergence>> {
        let ra = snapshot(&mut self.reference)?;
        let mut rb = snapshot(&mut self.subject)?;
        let mut diffs = Vec::new();
        if a != b {
            diffs.push(format!(
                "step: {} {}, {} {}",
                self.reference.name,
                kind_text(a),
                self.subject.name,
                kind_text(b)
            ));
        }
        let executed = matches!(a, StepKind::Executed);
        let mnemonic = insn.map(|i| i.mnemonic()).filter(|_| executed);
        // Masking rules: the subject adopts the reference's values.
        let mut adopt = rb.regs;
        let undefined = match (insn, executed) {
            (Some(i), true) => {
                iced_flags_to_rflags(i.rflags_undefined()) | count_undefined_flags(i, &pre.regs)
            }
            _ => 0,
        };
        const RF: u64 = 1 << 16;
        let mut flag_mask = RF;
        if undefined != 0 && (ra.regs.rflags ^ rb.regs.rflags) & undefined != 0 {
            self.mask(Rule::UndefinedFlags);
        }
        flag_mask |= undefined;
        if let (Some(i), true) = (insn, executed) {
            if shift_result_undefined(i, &pre.regs) {
                self.mask(Rule::UndefinedResult);
                flag_mask |= 0x8d5;
                if i.op0_kind() == OpKind::Register {
                    let reg = i.op0_register();
                    set_gpr(&mut adopt, reg, get_gpr(&ra.regs, reg));
                } else if let Some(la) = self.written_ranges(i, pre).first().map(|r| r.0) {
                    let size = i.memory_size().size();
                    let mut x = vec![0u8; size];
                    let n =
                        paging::read_linear(&self.reference.pc.machine.mem, &ra.sregs, la, &mut x);
                    if let Some(pa) = paging::translate(&self.subject.pc.machine.mem, &ra.sregs, la)
                    {
                        let _ = self.subject.pc.machine.mem.write(pa, &x[..n]);
                    }
                }
            }
        }
        if let (Some(m), Some(i), true) = (mnemonic, insn, self.reference.emulates(&pre.sregs)) {
            if KVM_EMULATOR_REGISTERS.iter().any(|(em, _)| *em == m)
                && i.op0_kind() == OpKind::Register
            {
                let reg = i.op0_register();
                if get_gpr(&ra.regs, reg) != get_gpr(&rb.regs, reg) {
                    self.mask(Rule::KvmEmulatorFlags);
                    set_gpr(&mut adopt, reg, get_gpr(&ra.regs, reg));
                }
            }
            for (em, bits, _) in KVM_EMULATOR_FLAGS {
                if *em == m {
                    if (ra.regs.rflags ^ rb.regs.rflags) & bits != 0 {
                        self.mask(Rule::KvmEmulatorFlags);
                    }
                    flag_mask |= bits;
                }
            }
        }
        if (ra.regs.rflags ^ rb.regs.rflags) & RF != 0 {
            self.mask(Rule::ResumeFlag);
        }
        adopt.rflags = (rb.regs.rflags & !flag_mask) | (ra.regs.rflags & flag_mask);
        match mnemonic {
            Some(Mnemonic::Rdtsc) | Some(Mnemonic::Rdtscp) => {
                if (ra.regs.rax, ra.regs.rdx, ra.regs.rcx)
                    != (rb.regs.rax, rb.regs.rdx, rb.regs.rcx)
                {
                    self.mask(Rule::Tsc);
                }
                adopt.rax = ra.regs.rax;
                adopt.rdx = ra.regs.rdx;
                if mnemonic == Some(Mnemonic::Rdtscp) {
                    adopt.rcx = ra.regs.rcx;
                }
            }
            Some(Mnemonic::Cpuid) => {
                if (ra.regs.rax, ra.regs.rbx, ra.regs.rcx, ra.regs.rdx)
                    != (rb.regs.rax, rb.regs.rbx, rb.regs.rcx, rb.regs.rdx)
                {
                    self.mask(Rule::Cpuid);
                }
                adopt.rax = ra.regs.rax;
                adopt.rbx = ra.regs.rbx;
                adopt.rcx = ra.regs.rcx;
                adopt.rdx = ra.regs.rdx;
            }
            Some(Mnemonic::Rdrand) | Some(Mnemonic::Rdseed) => {
                self.mask(Rule::Random);
                if let Some(i) = insn {
                    set_gpr(
                        &mut adopt,
                        i.op0_register(),
                        get_gpr(&ra.regs, i.op0_register()),
                    );
                }
                adopt.rflags = ra.regs.rflags;
            }
            _ => {}
        }
        if adopt != rb.regs {
            self.subject.v().set_regs(&adopt)?;
            rb.regs = adopt;
        }
        if mnemonic == Some(Mnemonic::Sti) && pre.regs.rflags & (1 << 9) != 0 && ra.sti && !rb.sti {
            self.mask(Rule::StiShadow);
            let mut ev = self.subject.events()?;
            ev.interruptibility.sti = true;
            self.subject.v().set_events(&ev)?;
            rb.sti = true;
        }
        // Registers.
        for (name, x, y) in gprs(&ra.regs, &rb.regs) {
            if x != y {
                diffs.push(format!("{name}: {x:#x} vs {y:#x}"));
            }
        }
        if ra.regs.rflags != rb.regs.rflags {
            diffs.push(format!(
                "rflags: {:#x} vs {:#x} (differing bits {})",
                ra.regs.rflags,
                rb.regs.rflags,
                flag_names(ra.regs.rflags ^ rb.regs.rflags)
            ));
        }
        let mut attrs_masked = false;
        for (name, x, y) in segs(&ra.sregs, &rb.sregs) {
            let (ka, kb) = (seg_key(x), seg_key(y));
            if ka != kb {
                diffs.push(format!("{name}: {} vs {}", seg_text(x), seg_text(y)));
            } else if x != y {
                attrs_masked = true;
            }
        }
        if attrs_masked {
            self.mask(Rule::SegmentAttributes);
        }
        for (name, x, y) in [
            ("cr0", ra.sregs.cr0, rb.sregs.cr0),
            ("cr2", ra.sregs.cr2, rb.sregs.cr2),
            ("cr3", ra.sregs.cr3, rb.sregs.cr3),
            ("cr4", ra.sregs.cr4, rb.sregs.cr4),
            ("efer", ra.sregs.efer, rb.sregs.efer),
            ("gdtr.base", ra.sregs.gdt.base, rb.sregs.gdt.base),
            (
                "gdtr.limit",
                ra.sregs.gdt.limit.into(),
                rb.sregs.gdt.limit.into(),
            ),
            ("idtr.base", ra.sregs.idt.base, rb.sregs.idt.base),
            (
                "idtr.limit",
                ra.sregs.idt.limit.into(),
                rb.sregs.idt.limit.into(),
            ),
        ] {
            if x != y {
                diffs.push(format!("{name}: {x:#x} vs {y:#x}"));
            }
        }
        for (name, x, y) in [
            ("sti shadow", ra.sti, rb.sti),
            ("mov ss shadow", ra.mov_ss, rb.mov_ss),
            ("nmi blocked", ra.nmi_blocked, rb.nmi_blocked),
        ] {
            if x != y {
                diffs.push(format!("{name}: {x} vs {y}"));
            }
        }
        if ra.now_ns != rb.now_ns {
            diffs.push(format!(
                "virtual time: {} ns vs {} ns",
                ra.now_ns, rb.now_ns
            ));
        }
        // Memory the instruction wrote (or the frame an event pushed).
        let mut ranges: Vec<(u64, usize)> = Vec::new();
        match (a, insn) {
            (StepKind::Executed, Some(i)) => ranges = self.written_ranges(i, pre),
            (StepKind::Delivered(_), _) => {
                let sp = ra.sregs.ss.base.wrapping_add(ra.regs.rsp);
                ranges.push((sp, 48));
            }
            _ => {}
        }
        for (la, size) in ranges {
            let mut x = vec![0u8; size];
            let mut y = vec![0u8; size];
            let nx = paging::read_linear(&self.reference.pc.machine.mem, &ra.sregs, la, &mut x);
            let ny = paging::read_linear(&self.subject.pc.machine.mem, &ra.sregs, la, &mut y);
            if nx != ny || x != y {
                diffs.push(format!(
                    "memory at {la:#x}: {} vs {}",
                    hex(&x[..nx]),
                    hex(&y[..ny])
                ));
            }
        }
        if diffs.is_empty() {
            return Ok(None);
        }
        let what = match (a, insn) {
            (StepKind::Delivered(ev), _) => format!(
                "delivery of {:?} vector {:#04x} at {:04x}:{:016x}",
                ev.kind, ev.vector, pre.sregs.cs.selector, pre.regs.rip
            ),
            (_, Some(i)) => describe(&mut self.reference, &pre.sregs, pre.regs.rip, i),
            _ => format!(
                "(undecodable) at {:04x}:{:016x}",
                pre.sregs.cs.selector, pre.regs.rip
            ),
        };
        Ok(Some(Divergence {
            step: self.steps,
            vcpu: self.smp_vcpu(),
            what,
            mnemonic,
            differences: diffs,
            table: side_by_side(&self.reference.name, &ra, &self.subject.name, &rb),
        }))
    }

    /// The linear ranges instruction `i` writes, from the state before it.
    fn written_ranges(&mut self, i: &Instruction, pre: &Snapshot) -> Vec<(u64, usize)> {
        let mut ranges = Vec::new();
        let info = self.info.info(i);
        for um in info.used_memory() {
            if !matches!(
                um.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                continue;
            }
            let size = um.memory_size().size().clamp(1, 64);
            let seg = seg_base(&pre.sregs, um.segment());
            let va = um.virtual_address(0, |reg, _, _| Some(reg_value(&pre.regs, reg)));
            if let Some(va) = va {
                ranges.push((seg.wrapping_add(va), size));
            }
        }
        ranges
    }

    /// The ranges of `compare_at_end`, byte for byte.
    fn final_compare(&mut self) -> Result<Option<Divergence>> {
        let mut diffs = Vec::new();
        let ra = snapshot(&mut self.reference)?;
        let rb = snapshot(&mut self.subject)?;
        for &(gpa, len) in &self.compare_at_end {
            let mut x = vec![0u8; len as usize];
            let mut y = vec![0u8; len as usize];
            self.reference.pc.machine.mem.read(gpa, &mut x)?;
            self.subject.pc.machine.mem.read(gpa, &mut y)?;
            if let Some(k) = x.iter().zip(&y).position(|(p, q)| p != q) {
                let end = (k + 8).min(x.len());
                diffs.push(format!(
                    "memory at {:#x}: {} vs {}",
                    gpa + k as u64,
                    hex(&x[k..end]),
                    hex(&y[k..end])
                ));
            }
        }
        if diffs.is_empty() {
            return Ok(None);
        }
        Ok(Some(Divergence {
            step: self.steps,
            vcpu: self.smp_vcpu(),
            what: format!(
                "(end of run) at {:04x}:{:016x}",
                ra.sregs.cs.selector, ra.regs.rip
            ),
            mnemonic: None,
            differences: diffs,
            table: side_by_side(&self.reference.name, &ra, &self.subject.name, &rb),
        }))
    }
}

/// Flags a shift or rotate leaves undefined for its count, which iced-x86's
/// static information cannot know: OF for a masked count other than 1
/// (SDM vol. 2, SAL/SAR/SHL/SHR, RCL/RCR/ROL/ROR, SHLD, SHRD: "the OF flag
/// is affected only on 1-bit shifts/rotates").
fn count_undefined_flags(i: &Instruction, pre: &Regs) -> u64 {
    let m = i.mnemonic();
    let (count_op, shift) = match m {
        Mnemonic::Shl
        | Mnemonic::Sal
        | Mnemonic::Shr
        | Mnemonic::Sar
        | Mnemonic::Rol
        | Mnemonic::Ror
        | Mnemonic::Rcl
        | Mnemonic::Rcr => (1, true),
        Mnemonic::Shld | Mnemonic::Shrd => (2, true),
        _ => (0, false),
    };
    if !shift {
        return 0;
    }
    let size = if i.op0_kind() == OpKind::Register {
        i.op0_register().size()
    } else {
        i.memory_size().size()
    };
    let raw = match i.op_kind(count_op) {
        OpKind::Register => pre.rcx & 0xff,
        OpKind::Immediate8 => u64::from(i.immediate8()),
        _ => 1,
    };
    let count = raw & if size == 8 { 0x3f } else { 0x1f };
    if count > 1 {
        1 << 11
    } else {
        0
    }
}

/// SHLD / SHRD whose masked count exceeds the operand size.
fn shift_result_undefined(i: &Instruction, pre: &Regs) -> bool {
    if !matches!(i.mnemonic(), Mnemonic::Shld | Mnemonic::Shrd) {
        return false;
    }
    let size = if i.op0_kind() == OpKind::Register {
        i.op0_register().size()
    } else {
        i.memory_size().size()
    } as u64;
    let raw = if i.op2_kind() == OpKind::Register {
        pre.rcx & 0xff
    } else {
        u64::from(i.immediate8())
    };
    let count = raw & if size == 8 { 0x3f } else { 0x1f };
    count > size * 8
}

fn kind_text(k: &StepKind) -> String {
    match k {
        StepKind::Executed => "executed an instruction".into(),
        StepKind::Delivered(ev) => format!("delivered {:?} {:#04x}", ev.kind, ev.vector),
        StepKind::Halted => "halted".into(),
        StepKind::End(e) => format!("ended ({e})"),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// iced-x86's RflagsBits as RFLAGS bits.
pub fn iced_flags_to_rflags(f: u32) -> u64 {
    let mut r = 0;
    for (bit, fl) in [
        (RflagsBits::CF, 1u64 << 0),
        (RflagsBits::PF, 1 << 2),
        (RflagsBits::AF, 1 << 4),
        (RflagsBits::ZF, 1 << 6),
        (RflagsBits::SF, 1 << 7),
        (RflagsBits::DF, 1 << 10),
        (RflagsBits::OF, 1 << 11),
        (RflagsBits::AC, 1 << 18),
    ] {
        if f & bit != 0 {
            r |= fl;
        }
    }
    r
}

fn flag_names(bits: u64) -> String {
    let names = [
        (0, "CF"),
        (2, "PF"),
        (4, "AF"),
        (6, "ZF"),
        (7, "SF"),
        (8, "TF"),
        (9, "IF"),
        (10, "DF"),
        (11, "OF"),
        (14, "NT"),
        (16, "RF"),
        (17, "VM"),
        (18, "AC"),
        (21, "ID"),
    ];
    let v: Vec<&str> = names
        .iter()
        .filter(|(b, _)| bits & (1 << b) != 0)
        .map(|(_, n)| *n)
        .collect();
    if v.is_empty() {
        format!("{bits:#x}")
    } else {
        v.join(" ")
    }
}

fn gprs(a: &Regs, b: &Regs) -> [(&'static str, u64, u64); 17] {
    [
        ("rax", a.rax, b.rax),
        ("rbx", a.rbx, b.rbx),
        ("rcx", a.rcx, b.rcx),
        ("rdx", a.rdx, b.rdx),
        ("rsi", a.rsi, b.rsi),
        ("rdi", a.rdi, b.rdi),
        ("rsp", a.rsp, b.rsp),
        ("rbp", a.rbp, b.rbp),
        ("r8", a.r8, b.r8),
        ("r9", a.r9, b.r9),
        ("r10", a.r10, b.r10),
        ("r11", a.r11, b.r11),
        ("r12", a.r12, b.r12),
        ("r13", a.r13, b.r13),
        ("r14", a.r14, b.r14),
        ("r15", a.r15, b.r15),
        ("rip", a.rip, b.rip),
    ]
}

fn segs<'a>(a: &'a Sregs, b: &'a Sregs) -> [(&'static str, &'a Segment, &'a Segment); 8] {
    [
        ("cs", &a.cs, &b.cs),
        ("ds", &a.ds, &b.ds),
        ("es", &a.es, &b.es),
        ("fs", &a.fs, &b.fs),
        ("gs", &a.gs, &b.gs),
        ("ss", &a.ss, &b.ss),
        ("tr", &a.tr, &b.tr),
        ("ldtr", &a.ldt, &b.ldt),
    ]
}

/// What of a segment register is compared: selector, base, limit, DPL, L,
/// D/B (the rest is rule `segment-attributes`). A null data selector in
/// 64-bit mode is compared by selector alone.
fn seg_key(s: &Segment) -> (u16, u64, u32, u8, bool, bool) {
    if s.unusable {
        return (s.selector, 0, 0, 0, false, false);
    }
    (s.selector, s.base, s.limit, s.dpl, s.l, s.db)
}

fn seg_text(s: &Segment) -> String {
    format!(
        "{:04x} base {:#x} limit {:#x} dpl {} type {:#x}{}{}{}",
        s.selector,
        s.base,
        s.limit,
        s.dpl,
        s.type_,
        if s.l { " L" } else { "" },
        if s.db { " D" } else { "" },
        if s.unusable { " unusable" } else { "" }
    )
}

fn seg_base(s: &Sregs, r: Register) -> u64 {
    match r {
        Register::ES => s.es.base,
        Register::CS => s.cs.base,
        Register::SS => s.ss.base,
        Register::DS => s.ds.base,
        Register::FS => s.fs.base,
        Register::GS => s.gs.base,
        _ => 0,
    }
}

fn full(r: Register) -> Register {
    r.full_register()
}

/// The value of `reg` (any width) in `regs`; RIP for RIP-relative
/// addressing is the next instruction's, which iced-x86 already folded in.
fn reg_value(regs: &Regs, reg: Register) -> u64 {
    let v = get_gpr(regs, reg);
    match reg.size() {
        1 if matches!(
            reg,
            Register::AH | Register::CH | Register::DH | Register::BH
        ) =>
        {
            (v >> 8) & 0xff
        }
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    }
}

pub fn get_gpr(r: &Regs, reg: Register) -> u64 {
    match full(reg) {
        Register::RAX => r.rax,
        Register::RBX => r.rbx,
        Register::RCX => r.rcx,
        Register::RDX => r.rdx,
        Register::RSI => r.rsi,
        Register::RDI => r.rdi,
        Register::RSP => r.rsp,
        Register::RBP => r.rbp,
        Register::R8 => r.r8,
        Register::R9 => r.r9,
        Register::R10 => r.r10,
        Register::R11 => r.r11,
        Register::R12 => r.r12,
        Register::R13 => r.r13,
        Register::R14 => r.r14,
        Register::R15 => r.r15,
        Register::RIP => r.rip,
        _ => 0,
    }
}

pub fn set_gpr(r: &mut Regs, reg: Register, v: u64) {
    let slot = match full(reg) {
        Register::RAX => &mut r.rax,
        Register::RBX => &mut r.rbx,
        Register::RCX => &mut r.rcx,
        Register::RDX => &mut r.rdx,
        Register::RSI => &mut r.rsi,
        Register::RDI => &mut r.rdi,
        Register::RSP => &mut r.rsp,
        Register::RBP => &mut r.rbp,
        Register::R8 => &mut r.r8,
        Register::R9 => &mut r.r9,
        Register::R10 => &mut r.r10,
        Register::R11 => &mut r.r11,
        Register::R12 => &mut r.r12,
        Register::R13 => &mut r.r13,
        Register::R14 => &mut r.r14,
        Register::R15 => &mut r.r15,
        _ => return,
    };
    *slot = v;
}

/// Both states, one field a line, differing lines marked `<<`.
pub fn side_by_side(an: &str, a: &Snapshot, bn: &str, b: &Snapshot) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "  {:<10} {:<42} {:<42}", "", an, bn);
    let mut line = |name: &str, x: String, y: String| {
        let mark = if x != y { " <<" } else { "" };
        let _ = writeln!(s, "  {name:<10} {x:<42} {y:<42}{mark}");
    };
    for (name, x, y) in gprs(&a.regs, &b.regs) {
        line(name, format!("{x:016x}"), format!("{y:016x}"));
    }
    line(
        "rflags",
        format!(
            "{:016x} {}",
            a.regs.rflags,
            flag_names(a.regs.rflags & 0x2f_4fd5)
        ),
        format!(
            "{:016x} {}",
            b.regs.rflags,
            flag_names(b.regs.rflags & 0x2f_4fd5)
        ),
    );
    for (name, x, y) in segs(&a.sregs, &b.sregs) {
        line(name, seg_text(x), seg_text(y));
    }
    for (name, x, y) in [
        ("cr0", a.sregs.cr0, b.sregs.cr0),
        ("cr2", a.sregs.cr2, b.sregs.cr2),
        ("cr3", a.sregs.cr3, b.sregs.cr3),
        ("cr4", a.sregs.cr4, b.sregs.cr4),
        ("efer", a.sregs.efer, b.sregs.efer),
    ] {
        line(name, format!("{x:#x}"), format!("{y:#x}"));
    }
    line(
        "shadows",
        format!("sti {} mov-ss {} nmi {}", a.sti, a.mov_ss, a.nmi_blocked),
        format!("sti {} mov-ss {} nmi {}", b.sti, b.mov_ss, b.nmi_blocked),
    );
    line(
        "time",
        format!("{} ns", a.now_ns),
        format!("{} ns", b.now_ns),
    );
    s
}

/// Whether this host's KVM is PVM.
pub fn host_is_pvm() -> bool {
    tandem_kvm::host_info()
        .map(|h| h.flavour == tandem_kvm::KvmFlavour::Pvm)
        .unwrap_or(false)
}

/// A KVM side over `pc`: the VM, vCPU 0 with `state`, the interpreter
/// fallback installed.
pub fn kvm_side(
    name: &str,
    pc: Pc,
    state: &tandem_core::cpu::VcpuState,
    ns_per_step: u64,
    ns_per_exit: u64,
) -> Result<Side> {
    kvm_side_smp(name, pc, state, 1, ns_per_step, ns_per_exit)
}

/// A KVM side with `vcpus` vCPUs: vCPU 0 with `state`, the others in their
/// reset state waiting for INIT / SIPI.
pub fn kvm_side_smp(
    name: &str,
    pc: Pc,
    state: &tandem_core::cpu::VcpuState,
    vcpus: u32,
    ns_per_step: u64,
    ns_per_exit: u64,
) -> Result<Side> {
    let vm = KvmVm::new(
        pc.machine.mem.clone(),
        &tandem_kvm::KvmVmOptions {
            vcpus: vcpus.max(1),
            kernel_irqchip: false,
        },
    )
    .context("cannot create the KVM VM")?;
    let mut vcpu = vm.create_vcpu(0).context("cannot create vCPU 0")?;
    vcpu.set_state(state)
        .context("cannot load the entry state into KVM")?;
    let mut aps = Vec::new();
    for id in 1..vcpus {
        aps.push(
            vm.create_vcpu(id)
                .with_context(|| format!("cannot create vCPU {id}"))?,
        );
    }
    let _ = pc
        .machine
        .fallback
        .set(Arc::new(tandem_interp::InterpFallback::with_cpuid(
            Arc::new(vm.cpuid_table().clone()),
        )));
    let pvm = host_is_pvm();
    let mut side = Side::new(
        name,
        pc,
        Cpu::Kvm {
            vcpu: Box::new(vcpu),
            _vm: Some(Box::new(vm)),
            pvm,
        },
        ns_per_step,
        ns_per_exit,
    );
    for (id, v) in (1..).zip(aps) {
        side.add_vcpu(
            id,
            Cpu::Kvm {
                vcpu: Box::new(v),
                _vm: None,
                pvm,
            },
        );
    }
    Ok(side)
}

/// An interpreter side over `pc` with `state` and the CPUID KVM offers
/// (Tandem's model without /dev/kvm).
pub fn interp_side(
    name: &str,
    pc: Pc,
    state: &tandem_core::cpu::VcpuState,
    cache_off: bool,
    ns_per_step: u64,
    ns_per_exit: u64,
) -> Result<Side> {
    interp_side_smp(name, pc, state, 1, cache_off, ns_per_step, ns_per_exit)
}

/// An interpreter side with `vcpus` vCPUs: vCPU 0 with `state`, the others
/// in their reset state waiting for INIT / SIPI.
pub fn interp_side_smp(
    name: &str,
    pc: Pc,
    state: &tandem_core::cpu::VcpuState,
    vcpus: u32,
    cache_off: bool,
    ns_per_step: u64,
    ns_per_exit: u64,
) -> Result<Side> {
    let cpuid = tandem_kvm::offered_cpuid(vcpus.max(1)).ok().map(Arc::new);
    let new = |id: u32| {
        let mut v = InterpVcpu::new(id, pc.machine.mem.clone());
        if let Some(c) = &cpuid {
            v.set_cpuid(c.clone());
        }
        v
    };
    let mut vcpu = new(0);
    vcpu.set_state(state)
        .context("cannot load the entry state into the interpreter")?;
    let aps: Vec<InterpVcpu> = (1..vcpus).map(new).collect();
    let mut side = Side::new(
        name,
        pc,
        Cpu::Interp {
            vcpu: Box::new(vcpu),
            cache_off,
        },
        ns_per_step,
        ns_per_exit,
    );
    for (id, v) in (1..).zip(aps) {
        side.add_vcpu(
            id,
            Cpu::Interp {
                vcpu: Box::new(v),
                cache_off,
            },
        );
    }
    Ok(side)
}

/// Rule summary, `name count` pairs.
pub fn masked_text(m: &BTreeMap<Rule, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(r, n)| format!("{} {n}", rule_name(*r)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::pc::{ClockKind, IrqchipKind, LostTickPolicy, PcConfig};

    fn pc(vcpus: u32) -> Pc {
        Pc::new(PcConfig {
            mem_size: 1 << 20,
            vcpus,
            clock: ClockKind::Virtual,
            irqchip: IrqchipKind::User,
            lost_ticks: LostTickPolicy::Discard,
            serial_out: Box::new(std::io::sink()),
            devices: Vec::new(),
        })
        .unwrap()
    }

    /// Selecting a vCPU swaps it in with its own registers; the others keep
    /// theirs; a vCPU the side does not have is refused.
    #[test]
    fn select_swaps_the_stepped_vcpu() {
        let state = tandem_core::cpu::VcpuState::default();
        let mut side = interp_side_smp("interp", pc(3), &state, 3, false, 1, 1_000).unwrap();
        assert_eq!(side.vcpu_count(), 3);
        assert_eq!((side.vcpu_id(), side.raw().id()), (0, 0));
        let mut r = side.regs().unwrap();
        r.rax = 0x1234;
        side.v().set_regs(&r).unwrap();
        assert!(side.select(2));
        assert_eq!((side.vcpu_id(), side.raw().id()), (2, 2));
        assert_ne!(
            side.regs().unwrap().rax,
            0x1234,
            "vCPU 2 has its own registers"
        );
        assert!(!side.select(7));
        assert_eq!(side.vcpu_id(), 2);
        assert!(side.select(0));
        assert_eq!(side.regs().unwrap().rax, 0x1234);
    }

    /// A vCPU that waits for a SIPI does not run; a halted one runs again
    /// only when something ends its HLT.
    #[test]
    fn application_processors_wait_for_their_sipi() {
        let state = tandem_core::cpu::VcpuState::default();
        let mut side = interp_side_smp("interp", pc(2), &state, 2, false, 1, 1_000).unwrap();
        assert!(side.startup().unwrap().0, "the BSP runs");
        assert!(side.select(1));
        let (runs, what) = side.startup().unwrap();
        assert!(!runs, "{what}");
        side.halted = Some(false);
        assert!(!side.wakes());
    }

    #[test]
    fn a_divergence_names_its_vcpu() {
        let d = Divergence {
            step: 7,
            vcpu: Some(2),
            what: "hlt".into(),
            mnemonic: None,
            differences: vec!["rax: 0x1 vs 0x2".into()],
            table: String::new(),
        };
        let text = d.report("kvm", "interp");
        assert!(text.starts_with("vCPU 2 diverges at: hlt"), "{text}");
        let one = Divergence { vcpu: None, ..d };
        assert!(one
            .report("kvm", "interp")
            .starts_with("first divergent instruction: hlt"));
    }
}
