//! The debugger engine: one guest on the shared machine, run by KVM or by
//! the interpreter, stopped on single steps, breakpoints and interrupt
//! events, and moved between the two processors mid-run.
//!
//! The engine has its own copy of the machine's run loop (timers, the
//! injection ladder, exits) so that it sees what the loop does: which event
//! the ladder injects (breaks on delivery of a vector), which ISA line rose
//! (a sink on the ISA router) and which in-service bit a port, MMIO or MSR
//! write cleared (breaks on EOI).
//!
//! Stopping "at delivery" of a vector means stopping at the handler's first
//! instruction, before it runs: the engine reads the handler's address from
//! the guest's IDT and puts an instruction breakpoint there (KVM: a
//! hardware breakpoint through KVM_SET_GUEST_DEBUG; the interpreter
//! compares addresses). The same breakpoint catches the vector when the
//! guest raises it itself (an exception, INT n).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tandem_core::cpu::{msr, Event, EventKind, Regs, Sregs, VcpuState};
use tandem_core::irq::IsaIrqSink;
use tandem_core::ladder;
use tandem_core::machine::{ExitStats, GuestContext, RunOutcome};
use tandem_core::paging::read_linear;
use tandem_core::pc::Pc;
use tandem_core::trace::{TraceEvent, TraceRecord, TraceSink};
use tandem_core::vcpu::{Doorbell, Vcpu, VcpuExit};
use tandem_decoder::iced_x86::{FlowControl, Mnemonic};
use tandem_interp::InterpVcpu;
use tandem_kvm::{KvmFlavour, KvmVcpu, KvmVm, KvmVmOptions};

use crate::Backend;

/// What a breakpoint waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BpKind {
    /// The instruction at this linear address is about to run.
    Addr(u64),
    /// The vector is delivered: its handler's first instruction is next.
    Vector(u8),
    /// ISA IRQ line n rises.
    IrqRise(u8),
    /// The in-service bit of this vector is cleared (PIC or LAPIC EOI).
    Eoi(u8),
}

impl std::fmt::Display for BpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BpKind::Addr(a) => write!(f, "address {a:#x}"),
            BpKind::Vector(v) => write!(f, "delivery of vector {v:#04x}"),
            BpKind::IrqRise(n) => write!(f, "IRQ {n} rising"),
            BpKind::Eoi(v) => write!(f, "EOI of vector {v:#04x}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breakpoint {
    pub id: u32,
    pub kind: BpKind,
    /// Removed when it stops the guest (`until`, `next`).
    pub temporary: bool,
}

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// One instruction ran (or an event was delivered).
    Step,
    /// An address breakpoint (`temporary`: `until` / `next`'s).
    Breakpoint { id: u32, addr: u64, temporary: bool },
    /// A vector reached its handler.
    Delivered {
        vector: u8,
        handler: u64,
        id: Option<u32>,
    },
    /// An ISA IRQ line rose.
    IrqRaised { irq: u8, id: u32 },
    /// An EOI cleared the vector's in-service bit.
    Eoi {
        vector: u8,
        controller: &'static str,
        id: u32,
    },
    /// The guest's run ended.
    Finished(RunOutcome),
    /// Stopped from outside (gdb's Ctrl-C).
    Interrupted,
}

/// How to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    Step,
    Continue,
}

/// Records rising edges of the ISA lines (a sink on the ISA router, next to
/// the PIC and IOAPIC).
#[derive(Default)]
struct IrqWatch {
    state: Mutex<IrqWatchState>,
}

#[derive(Default)]
struct IrqWatchState {
    levels: [bool; 16],
    rose: Vec<u8>,
}

impl IsaIrqSink for IrqWatch {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = s.levels.get_mut(usize::from(irq)) else {
            return;
        };
        let was = *l;
        *l = level;
        if level && !was && s.rose.len() < 64 {
            s.rose.push(irq);
        }
    }
}

impl IrqWatch {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).rose)
    }
}

/// The interrupt trace's last events (core's `Tracer`), without the exits
/// and writes that would push the interrupt steps out.
#[derive(Default, Clone)]
struct ChainSink {
    records: Arc<Mutex<std::collections::VecDeque<TraceRecord>>>,
}

/// Trace records kept for the chain printed at a stop.
const CHAIN_RECORDS: usize = 512;

impl TraceSink for ChainSink {
    fn record(&mut self, rec: &TraceRecord) -> std::io::Result<()> {
        if matches!(
            rec.event,
            TraceEvent::Exit { .. } | TraceEvent::PortWrite { .. } | TraceEvent::MmioWrite { .. }
        ) {
            return Ok(());
        }
        let mut r = lock(&self.records);
        if r.len() >= CHAIN_RECORDS {
            r.pop_front();
        }
        r.push_back(rec.clone());
        Ok(())
    }
}

impl ChainSink {
    /// The steps of the interrupt flow of the last record `pick` matches,
    /// as readable lines.
    fn chain_of(&self, pick: impl Fn(&TraceEvent) -> bool) -> Vec<String> {
        let r = lock(&self.records);
        let Some(flow) = r
            .iter()
            .rev()
            .find(|rec| pick(&rec.event) && rec.flow.is_some())
            .and_then(|rec| rec.flow.as_ref().map(|f| f.id))
        else {
            return Vec::new();
        };
        r.iter()
            .filter(|rec| rec.flow.as_ref().is_some_and(|f| f.id == flow))
            .map(|rec| {
                let mut l = format!("#{} {}", rec.seq, rec.event.describe());
                if let Some(c) = rec.flow.as_ref().and_then(|f| f.cause.as_ref()) {
                    l.push_str(&format!(" (cause: {c})"));
                }
                l
            })
            .collect()
    }

    /// The last record `pick` matches, as a readable line.
    fn last_matching(&self, pick: impl Fn(&TraceEvent) -> bool) -> Option<String> {
        let r = lock(&self.records);
        r.iter()
            .rev()
            .find(|rec| pick(&rec.event))
            .map(|rec| format!("#{} {}", rec.seq, rec.event.describe()))
    }

    /// The last `n` records as readable lines.
    fn last(&self, n: usize) -> Vec<String> {
        let r = lock(&self.records);
        r.iter()
            .skip(r.len().saturating_sub(n))
            .map(|rec| format!("#{} {}", rec.seq, rec.event.describe()))
            .collect()
    }
}

/// In-service bits of the controllers, to find what an EOI cleared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InService {
    pic: [(u8, u8); 2],
    lapic: [u32; 8],
}

/// A processor of the session.
enum Cpu {
    Kvm(Box<KvmVcpu>),
    Interp(Box<InterpVcpu>),
}

/// One guest under the debugger.
pub struct Session {
    pub pc: Pc,
    flavour: Option<KvmFlavour>,
    vm: Option<KvmVm>,
    kvm: Option<Box<KvmVcpu>>,
    interp: Option<Box<InterpVcpu>>,
    /// The processor running the guest; the other one, once created,
    /// waits in `kvm` / `interp`.
    active: Cpu,
    breakpoints: Vec<Breakpoint>,
    next_id: u32,
    irq_watch: Arc<IrqWatch>,
    pub stats: ExitStats,
    cr8: Option<u64>,
    tpr_written: bool,
    finished: Option<RunOutcome>,
    /// Set from another thread to stop a `continue` (gdb's interrupt).
    pub interrupt: Arc<AtomicBool>,
    /// Lines describing the interrupt chain of the last stop.
    pub notes: Vec<String>,
    /// The last event the ladder injected, with where.
    last_injection: Option<(Event, u64, String)>,
    /// Single-stepping is on at the processor.
    stepping: bool,
    /// RFLAGS.TF as the guest had it when single-stepping began.
    guest_tf: bool,
    /// The CPUID both processors give the guest.
    cpuid: Arc<tandem_core::cpuid::CpuidTable>,
    /// The interrupt trace, subscribed to for the chains printed at stops.
    chain: ChainSink,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.pc.stop_host_threads();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// A session on `pc` whose vCPU 0 starts in `state` on `backend`.
    pub fn new(pc: Pc, state: &VcpuState, backend: Backend) -> Result<Session> {
        if pc.irqchip.is_none() {
            bail!("tandem debug needs Tandem's own interrupt controllers (--irqchip user)");
        }
        let irq_watch = Arc::new(IrqWatch::default());
        pc.machine.isa_irqs.connect(irq_watch.clone());
        // One CPUID for both processors, so a guest moved between them sees
        // one processor: KVM's where /dev/kvm opens, else Tandem's model.
        let cpuid = Arc::new(
            tandem_kvm::offered_cpuid(1)
                .unwrap_or_else(|_| tandem_core::cpuid::CpuidTable::model(1)),
        );
        let _ = pc
            .machine
            .fallback
            .set(Arc::new(tandem_interp::InterpFallback::with_cpuid(
                cpuid.clone(),
            )));
        let first = Box::new(InterpVcpu::new(0, pc.machine.mem.clone()));
        let mut s = Session {
            pc,
            flavour: None,
            vm: None,
            kvm: None,
            interp: None,
            active: Cpu::Interp(first),
            breakpoints: Vec::new(),
            next_id: 1,
            irq_watch,
            stats: ExitStats::default(),
            cr8: None,
            tpr_written: false,
            finished: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            notes: Vec::new(),
            last_injection: None,
            stepping: false,
            guest_tf: false,
            cpuid,
            chain: ChainSink::default(),
        };
        s.pc.tracer()
            .start(Box::new(s.chain.clone()))
            .context("cannot start the interrupt trace")?;
        match backend {
            Backend::Kvm => {
                let mut v = s.new_kvm()?;
                v.set_state(state)
                    .context("cannot load the entry state into KVM")?;
                if let Some(khz) = v.tsc_khz() {
                    s.pc.sync_tsc(&mut *v, khz)
                        .context("cannot set the guest TSC")?;
                }
                if let Cpu::Interp(mut iv) = std::mem::replace(&mut s.active, Cpu::Kvm(v)) {
                    iv.set_cpuid(s.cpuid.clone());
                    s.interp = Some(iv);
                }
            }
            Backend::Interp => {
                if let Cpu::Interp(iv) = &mut s.active {
                    iv.set_cpuid(s.cpuid.clone());
                }
                s.vcpu()
                    .set_state(state)
                    .context("cannot load the entry state into the interpreter")?;
            }
        }
        s.cr8 = s.pc.machine.interrupts.cr8(0);
        if let Some(c) = s.cr8 {
            s.vcpu().set_cr8(c);
        }
        s.pc.start_host_threads()
            .context("cannot start the machine's threads")?;
        Ok(s)
    }

    /// The waiting KVM vCPU, or a new one (the VM is made on first use).
    fn new_kvm(&mut self) -> Result<Box<KvmVcpu>> {
        if let Some(v) = self.kvm.take() {
            return Ok(v);
        }
        self.flavour = tandem_kvm::host_info().map(|i| i.flavour).ok();
        let vm = KvmVm::new(
            self.pc.machine.mem.clone(),
            &KvmVmOptions {
                vcpus: 1,
                kernel_irqchip: false,
            },
        )
        .context("cannot create the KVM VM")?;
        let vcpu = vm.create_vcpu(0).context("cannot create vCPU 0")?;
        self.vm = Some(vm);
        Ok(Box::new(vcpu))
    }

    /// The waiting interpreter processor, or a new one with the session's
    /// CPUID.
    fn new_interp(&mut self) -> Box<InterpVcpu> {
        if let Some(v) = self.interp.take() {
            return v;
        }
        let mut v = Box::new(InterpVcpu::new(0, self.pc.machine.mem.clone()));
        v.set_cpuid(self.cpuid.clone());
        v
    }

    /// The processor running the guest now.
    pub fn vcpu(&mut self) -> &mut dyn Vcpu {
        match &mut self.active {
            Cpu::Kvm(v) => &mut **v,
            Cpu::Interp(v) => &mut **v,
        }
    }

    pub fn backend(&self) -> Backend {
        match self.active {
            Cpu::Kvm(_) => Backend::Kvm,
            Cpu::Interp(_) => Backend::Interp,
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self.active {
            Cpu::Kvm(_) => "kvm",
            Cpu::Interp(_) => "interp",
        }
    }

    pub fn finished(&self) -> Option<&RunOutcome> {
        self.finished.as_ref()
    }

    /// Whether this KVM host is PVM (single-step workarounds).
    fn pvm(&self) -> bool {
        self.backend() == Backend::Kvm && self.flavour == Some(KvmFlavour::Pvm)
    }

    // ----- breakpoints -----

    pub fn add_breakpoint(&mut self, kind: BpKind, temporary: bool) -> Result<u32> {
        if self.backend() == Backend::Kvm {
            let hw = self.hw_slots_needed(&kind);
            if hw > 4 {
                bail!(
                    "KVM has 4 hardware breakpoints (DR0-DR3) for address and vector \
                     breakpoints; delete one first, or `switch interp` (no limit)"
                );
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.breakpoints.push(Breakpoint {
            id,
            kind,
            temporary,
        });
        Ok(id)
    }

    fn hw_slots_needed(&self, extra: &BpKind) -> usize {
        let mut addrs: Vec<BpKind> = self
            .breakpoints
            .iter()
            .map(|b| b.kind)
            .filter(|k| matches!(k, BpKind::Addr(_) | BpKind::Vector(_)))
            .collect();
        if matches!(extra, BpKind::Addr(_) | BpKind::Vector(_)) {
            addrs.push(*extra);
        }
        addrs.sort_by_key(|k| format!("{k:?}"));
        addrs.dedup();
        addrs.len()
    }

    /// Deletes breakpoint `id`, or all with `None`. Returns how many went.
    pub fn delete_breakpoint(&mut self, id: Option<u32>) -> usize {
        let before = self.breakpoints.len();
        self.breakpoints.retain(|b| id.is_some_and(|i| b.id != i));
        before - self.breakpoints.len()
    }

    /// Removes the address breakpoint at `addr` (gdb's z0 / z1).
    pub fn delete_addr_breakpoint(&mut self, addr: u64) -> bool {
        let before = self.breakpoints.len();
        self.breakpoints
            .retain(|b| b.kind != BpKind::Addr(addr) || b.temporary);
        before != self.breakpoints.len()
    }

    pub fn breakpoints(&self) -> &[Breakpoint] {
        &self.breakpoints
    }

    // ----- state helpers -----

    pub fn regs(&mut self) -> Result<Regs> {
        Ok(self.vcpu().get_regs()?)
    }

    pub fn sregs(&mut self) -> Result<Sregs> {
        Ok(self.vcpu().get_sregs()?)
    }

    /// CS.base + RIP.
    pub fn linear_rip(&mut self) -> Result<u64> {
        let r = self.regs()?;
        let s = self.sregs()?;
        Ok(s.cs.base.wrapping_add(r.rip))
    }

    /// Reads guest memory at a linear address through the guest's paging;
    /// returns how many bytes were readable.
    pub fn read_linear(&mut self, la: u64, buf: &mut [u8]) -> Result<usize> {
        let s = self.sregs()?;
        Ok(read_linear(&self.pc.machine.mem, &s, la, buf))
    }

    /// Writes guest memory at a linear address, page by page; returns how
    /// many bytes were written.
    pub fn write_linear(&mut self, la: u64, data: &[u8]) -> Result<usize> {
        let s = self.sregs()?;
        let mem = &self.pc.machine.mem;
        let mut done = 0;
        while done < data.len() {
            let a = la.wrapping_add(done as u64);
            let Some(pa) = tandem_core::paging::translate(mem, &s, a) else {
                break;
            };
            let room = (0x1000 - (a & 0xfff)) as usize;
            let n = room.min(data.len() - done);
            if mem.write(pa, &data[done..done + n]).is_err() {
                break;
            }
            // Other vCPUs' decode caches drop the page at their next entry
            // (writer u64::MAX: no vCPU, so none skips it).
            mem.code_watch().note_write(pa, u64::MAX);
            done += n;
        }
        if done > 0 {
            // The interpreter's decode cache may hold the old bytes.
            if let Some(pa) = tandem_core::paging::translate(mem, &s, la) {
                for page in [pa, pa.wrapping_add(data.len() as u64)] {
                    if let Some(iv) = self.interp.as_mut() {
                        iv.invalidate_page(page);
                    }
                    if let Cpu::Interp(iv) = &mut self.active {
                        iv.invalidate_page(page);
                    }
                }
            }
        }
        Ok(done)
    }

    /// The instruction at CS:RIP: (length, flow control, mnemonic).
    fn current_insn(&mut self) -> Result<Option<(u64, FlowControl, Mnemonic)>> {
        let s = self.sregs()?;
        let la = self.linear_rip()?;
        let mut bytes = [0u8; 15];
        let n = self.read_linear(la, &mut bytes)?;
        let bits = bitness(&s);
        Ok(tandem_decoder::decode_at_zero(&bytes[..n], bits)
            .map(|i| (i.len() as u64, i.flow_control(), i.mnemonic())))
    }

    /// Disassembles `count` instructions from linear address `la`.
    pub fn disassemble(&mut self, la: u64, count: usize) -> Result<Vec<String>> {
        let s = self.sregs()?;
        let mut bytes = vec![0u8; count.clamp(1, 256) * 15];
        let n = self.read_linear(la, &mut bytes)?;
        let base = la.wrapping_sub(s.cs.base);
        Ok(
            tandem_decoder::disassemble(&bytes[..n], base, bitness(&s), count)
                .into_iter()
                .map(|d| {
                    let hex: Vec<String> = d.bytes.iter().map(|b| format!("{b:02x}")).collect();
                    format!("{:#018x}:  {:<30} {}", d.ip, hex.join(" "), d.text)
                })
                .collect(),
        )
    }

    /// The linear address of vector `v`'s handler, from the guest's IDT (or
    /// real-mode IVT).
    pub fn handler_address(&mut self, v: u8) -> Result<Option<u64>> {
        let s = self.sregs()?;
        Ok(handler_address(&self.pc, &s, v))
    }

    // ----- running -----

    /// Runs until a stop. `Resume::Step` runs one instruction (or delivers
    /// one event, stopping at its handler).
    pub fn resume(&mut self, mode: Resume) -> Result<Stop> {
        self.notes.clear();
        if let Some(o) = &self.finished {
            return Ok(Stop::Finished(o.clone()));
        }
        let stop = self.run_loop(mode);
        let _ = self.set_debug(false, &[]);
        let stop = stop?;
        if let Stop::Finished(o) = &stop {
            self.finished = Some(o.clone());
        }
        // A temporary breakpoint goes when the guest stops anywhere.
        self.breakpoints.retain(|b| !b.temporary);
        Ok(stop)
    }

    fn run_loop(&mut self, mode: Resume) -> Result<Stop> {
        let machine = self.pc.machine.clone();
        let bell = machine
            .doorbells
            .first()
            .cloned()
            .unwrap_or_else(|| Arc::new(Doorbell::new()));
        let kicker = self.vcpu().kicker();
        bell.set_kicker(kicker);
        // An address breakpoint where the guest stands does not stop it
        // again: the first instruction is stepped with that address left
        // out (what gdb does to step over a breakpoint).
        let mut skip = Some(self.linear_rip()?);
        let mut halted_in_step = false;
        // A resume runs the guest before an ISA line can stop it again
        // (with the host clock a periodic timer fires while at the prompt).
        let mut entered = false;
        // PVM: the next instruction's address, fixed when the step starts.
        let mut step_target: Option<Option<u64>> = None;
        // The handler an injected event will enter, wanted as a stop. It
        // outlives the entry that injected it: a kick can end that entry
        // before the processor delivers the event, and the delivery then
        // happens in a later one.
        let mut handler_bp = None;
        // The trace record of an injected event's delivery, emitted once the
        // processor has delivered it (possibly in a later entry than the one
        // that injected it, when a kick ended that one first).
        let mut delivery = None;
        // An event injected in an entry that a kick ended before the
        // processor delivered it is still in delivery. It goes before the
        // instruction at RIP, so single-stepping now would only put TF in
        // the frame it pushes (the handler's IRET would then trap in the
        // guest). A step stops at its handler, as a step that injects does;
        // a continue lets it be delivered with no step over the breakpoint
        // at RIP, which the handler's return then reaches again.
        if let Some(vector) = self.vector_in_delivery()? {
            let wanted = mode == Resume::Step || self.vector_bp(vector).is_some();
            if wanted {
                handler_bp = self.handler_address(vector)?;
            }
            if handler_bp.is_some() || !wanted {
                skip = None;
            }
        }
        loop {
            if self.interrupt.swap(false, Ordering::SeqCst) {
                return Ok(Stop::Interrupted);
            }
            if machine.control.stop_requested() {
                if let Some(r) = machine.control.stop_request() {
                    return Ok(Stop::Finished(RunOutcome::Stop(r)));
                }
            }
            bell.take();
            machine.timers.fire_due(machine.clock.now_ns());
            if !entered {
                self.irq_watch.take();
            } else if let Some(stop) = self.irq_rises() {
                return Ok(stop);
            }
            let d =
                ladder::inject_events_traced(self.vcpu(), &*machine.interrupts, &machine.tracer)?;
            if let Some(ev) = d.injected {
                self.stats.injections += 1;
                delivery = machine
                    .tracer
                    .injection(&machine.mem, self.vcpu(), ev, d.reinjection);
                let la = self.linear_rip()?;
                let src = self.source_of(&ev);
                self.last_injection = Some((ev, la, src));
                let wanted = mode == Resume::Step || self.vector_bp(ev.vector).is_some();
                handler_bp = if wanted {
                    self.handler_address(ev.vector)?
                } else {
                    None
                };
            } else if halted_in_step && handler_bp.is_none() {
                // (With an injected event still in delivery, the step ends
                // at its handler instead.)
                return Ok(Stop::Step);
            }
            if self.tpr_written {
                self.tpr_written = false;
                if let Some(tpr) = machine.interrupts.cr8(0) {
                    if self.cr8 != Some(tpr) {
                        self.vcpu().set_cr8(tpr);
                        self.cr8 = Some(tpr);
                    }
                }
            }

            // Debug registers for this entry.
            let mut stepping = (mode == Resume::Step || skip.is_some()) && handler_bp.is_none();
            let mut bps: Vec<u64> = Vec::new();
            for b in &self.breakpoints {
                if let BpKind::Addr(a) = b.kind {
                    bps.push(a);
                }
            }
            let vectors: Vec<u8> = self
                .breakpoints
                .iter()
                .filter_map(|b| match b.kind {
                    BpKind::Vector(v) => Some(v),
                    _ => None,
                })
                .collect();
            for v in vectors {
                if let Some(h) = self.handler_address(v)? {
                    bps.push(h);
                }
            }
            if let Some(s) = skip {
                bps.retain(|&a| a != s);
            }
            bps.extend(handler_bp);
            bps.sort_unstable();
            bps.dedup();
            if stepping && self.pvm() && step_target.is_none() {
                // PVM: HLT is stepped over without its exit; do it here.
                if let Some((len, _, Mnemonic::Hlt)) = self.current_insn()? {
                    let mut r = self.regs()?;
                    r.rip = r.rip.wrapping_add(len);
                    self.vcpu().set_regs(&r)?;
                    // HLT ends an STI / MOV SS shadow as any instruction does.
                    let mut ev = self.vcpu().get_events()?;
                    if ev.interruptibility.sti || ev.interruptibility.mov_ss {
                        ev.interruptibility.sti = false;
                        ev.interruptibility.mov_ss = false;
                        self.vcpu().set_events(&ev)?;
                    }
                    skip = None;
                    if mode == Resume::Step {
                        halted_in_step = true;
                    }
                    if let Some(o) = self.halt(&bell)? {
                        return Ok(Stop::Finished(o));
                    }
                    continue;
                }
                // PVM loses the step after an OUT or MMIO-write exit: a
                // breakpoint at the next instruction recovers it.
                let next = match self.current_insn()? {
                    Some((len, FlowControl::Next, _)) => Some(self.linear_rip()?.wrapping_add(len)),
                    _ => None,
                };
                step_target = Some(next);
            }
            if stepping && self.pvm() {
                if let Some(Some(next)) = step_target {
                    if bps.len() < 4 && !bps.contains(&next) {
                        bps.push(next);
                    }
                }
                // PVM answers a single step of 64-bit CPL3 code with
                // SHUTDOWN: the breakpoint at the next instruction is the
                // step there, and a branch cannot be stepped.
                let sr = self.sregs()?;
                if sr.long_mode() && sr.cs.l && sr.cpl() == 3 {
                    match step_target {
                        Some(Some(_)) => stepping = false,
                        _ => bail!(
                            "PVM cannot single-step a branch in 64-bit ring 3 (it shuts the \
                             vCPU down); `switch interp` to step it"
                        ),
                    }
                }
            }
            self.set_debug(stepping, &bps)?;

            if !bell.enter() {
                continue;
            }
            entered = true;
            let exit = self.vcpu().run();
            bell.leave();
            if delivery.is_some()
                && (!matches!(exit, Ok(VcpuExit::Kicked)) || self.vector_in_delivery()?.is_none())
            {
                if let Some(ev) = delivery.take() {
                    machine.tracer.emit(ev);
                }
            }
            if let Some(known) = self.cr8 {
                let now = self.vcpu().cr8();
                if now != known {
                    machine.interrupts.set_cr8(0, now);
                    self.cr8 = Some(now);
                }
            }
            let exit = exit?;
            self.tpr_written = matches!(
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
                    let writes = matches!(
                        e,
                        VcpuExit::IoOut { .. }
                            | VcpuExit::MmioWrite { .. }
                            | VcpuExit::WrMsr { .. }
                    );
                    let before = writes.then(|| self.in_service());
                    let mut stats = self.stats;
                    machine.handle_data_exit(self.vcpu(), &e, &mut stats);
                    self.stats = stats;
                    if let Some(before) = before {
                        if let Some(stop) = self.eoi_stop(&before)? {
                            return Ok(stop);
                        }
                    }
                    if let Some(stop) = self.irq_rises() {
                        self.vcpu().readiness()?;
                        return Ok(stop);
                    }
                }
                VcpuExit::Hlt => {
                    self.stats.hlt += 1;
                    skip = None;
                    if mode == Resume::Step {
                        halted_in_step = true;
                    }
                    if let Some(o) = self.halt(&bell)? {
                        return Ok(Stop::Finished(o));
                    }
                }
                VcpuExit::Debug { rip: la, .. } => {
                    // The step over a breakpoint, if any, is done.
                    skip = None;
                    if let Some(h) = handler_bp {
                        if la == h {
                            return Ok(self.delivered(h));
                        }
                    }
                    if let Some(b) = self.breakpoints.iter().find(|b| b.kind == BpKind::Addr(la)) {
                        return Ok(Stop::Breakpoint {
                            id: b.id,
                            addr: la,
                            temporary: b.temporary,
                        });
                    }
                    let vectors: Vec<(u32, u8)> = self
                        .breakpoints
                        .iter()
                        .filter_map(|b| match b.kind {
                            BpKind::Vector(v) => Some((b.id, v)),
                            _ => None,
                        })
                        .collect();
                    for (id, v) in vectors {
                        if self.handler_address(v)? == Some(la) {
                            self.notes.push(format!(
                                "vector {v:#04x} raised by the guest itself reached its handler"
                            ));
                            return Ok(Stop::Delivered {
                                vector: v,
                                handler: la,
                                id: Some(id),
                            });
                        }
                    }
                    if mode == Resume::Step {
                        return Ok(Stop::Step);
                    }
                }
                VcpuExit::InterruptWindow | VcpuExit::NmiWindow => self.stats.windows += 1,
                VcpuExit::Kicked => self.stats.kicks += 1,
                VcpuExit::TprLowered => {}
                VcpuExit::Shutdown => {
                    return Ok(Stop::Finished(RunOutcome::TripleFault(self.context())))
                }
                VcpuExit::EmulationFailure { insn } => {
                    self.emulation_failure(&insn)?;
                }
                VcpuExit::InternalError { suberror, .. } => {
                    bail!(
                        "{} internal error (suberror {suberror}) at {}",
                        self.backend_name(),
                        self.context().cs_rip()
                    )
                }
                VcpuExit::FailEntry { reason } => {
                    bail!(
                        "VM entry failed (hardware reason {reason:#x}) at {}",
                        self.context().cs_rip()
                    )
                }
                VcpuExit::Unhandled(what) => bail!("unhandled exit: {what}"),
            }
            // An exit other than a debug exit while stepping over a
            // breakpoint: the step continues at the next entry, still
            // without that address.
            if let Some(s) = skip {
                if self.linear_rip()? != s {
                    skip = None;
                }
            }
        }
    }

    /// The vector of an event injected and not yet delivered, if any.
    fn vector_in_delivery(&mut self) -> Result<Option<u8>> {
        let ev = self.vcpu().get_events()?;
        Ok(if ev.nmi_injected {
            Some(2)
        } else if let Some(i) = ev.interrupt {
            Some(i.vector)
        } else {
            ev.exception.filter(|e| e.injected).map(|e| e.vector)
        })
    }

    /// Guest debugging for the next entry. Where KVM leaves the trap flag
    /// it set for single-stepping in the guest's RFLAGS after stepping is
    /// turned off (PVM), the engine clears it again unless the guest had
    /// set it itself.
    fn set_debug(&mut self, stepping: bool, bps: &[u64]) -> Result<()> {
        const TF: u64 = 1 << 8;
        if stepping && !self.stepping {
            self.guest_tf = self.regs()?.rflags & TF != 0;
        }
        self.vcpu().set_guest_debug(stepping, bps)?;
        if !stepping && self.stepping && !self.guest_tf {
            let mut r = self.regs()?;
            if r.rflags & TF != 0 {
                r.rflags &= !TF;
                self.vcpu().set_regs(&r)?;
            }
        }
        self.stepping = stepping;
        Ok(())
    }

    fn context(&mut self) -> Box<GuestContext> {
        Box::new(GuestContext {
            regs: self.vcpu().get_regs().unwrap_or_default(),
            sregs: self.vcpu().get_sregs().unwrap_or_default(),
        })
    }

    /// An instruction the processor gave up on: the interpreter executes it
    /// (as the machine's run loop does), or the event fast path.
    fn emulation_failure(&mut self, insn: &[u8]) -> Result<()> {
        let machine = self.pc.machine.clone();
        if let Some(fb) = machine.fallback.get() {
            if let Ok(Some(_)) = fb.execute_one(&machine, self.vcpu()) {
                self.stats.fallbacks += 1;
                return Ok(());
            }
        }
        if tandem_core::fallback::finish_event_instruction(&machine.mem, self.vcpu())?.is_some() {
            self.stats.fallbacks += 1;
            return Ok(());
        }
        let bytes: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
        bail!(
            "{} could not emulate the instruction at {} ({})",
            self.backend_name(),
            self.context().cs_rip(),
            bytes.join(" ")
        )
    }

    /// HLT: waits until an interrupt can wake the vCPU (the machine's
    /// rules: IF clear and nothing that wakes a masked HLT ends the run).
    fn halt(&mut self, bell: &Doorbell) -> Result<Option<RunOutcome>> {
        let machine = self.pc.machine.clone();
        let if_flag = self.vcpu().readiness()?.if_flag;
        loop {
            if machine.control.stop_requested() || self.interrupt.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let now = machine.clock.now_ns();
            machine.timers.fire_due(now);
            if machine.interrupts.nmi_pending(0)
                || (if_flag && machine.interrupts.interrupt_pending(0))
            {
                return Ok(None);
            }
            if !if_flag && !machine.interrupts.can_wake_masked(0) {
                return Ok(Some(RunOutcome::DeadHalt(self.context())));
            }
            let deadline = machine.timers.next_deadline();
            if let Some(d) = deadline {
                if machine.clock.warp_to(d) {
                    continue;
                }
            }
            if bell.take() {
                continue;
            }
            let timeout = deadline
                .map(|d| Duration::from_nanos(d.saturating_sub(now)))
                .unwrap_or(Duration::from_millis(50))
                .min(Duration::from_millis(50));
            bell.wait(Some(timeout));
        }
    }

    fn vector_bp(&self, v: u8) -> Option<u32> {
        self.breakpoints
            .iter()
            .find(|b| b.kind == BpKind::Vector(v))
            .map(|b| b.id)
    }

    /// The stop at a handler reached by the last injection.
    fn delivered(&mut self, handler: u64) -> Stop {
        let (ev, at, src) = match &self.last_injection {
            Some((ev, at, src)) => (*ev, *at, src.clone()),
            None => (Event::external(0), 0, String::new()),
        };
        self.notes.push(format!(
            "vector {:#04x} ({}) from {src}: injected at {at:#x}, delivered to its handler at {handler:#x}",
            ev.vector,
            kind_name(ev.kind)
        ));
        let v = ev.vector;
        self.push_chain(|e| matches!(e, TraceEvent::Deliver { vector, .. } if *vector == v));
        Stop::Delivered {
            vector: ev.vector,
            handler,
            id: self.vector_bp(ev.vector),
        }
    }

    /// Adds the trace's steps of the interrupt flow `pick` finds to the
    /// notes of this stop.
    fn push_chain(&mut self, pick: impl Fn(&TraceEvent) -> bool) {
        for l in self.chain.chain_of(pick) {
            self.notes.push(format!("trace: {l}"));
        }
    }

    /// The interrupt trace's last `n` events, for `info trace`.
    pub fn trace_lines(&self, n: usize) -> Vec<String> {
        self.chain.last(n)
    }

    /// Which controller an injected event came from, with the state it
    /// left there (for the chain printed at a stop).
    fn source_of(&self, ev: &Event) -> String {
        match ev.kind {
            EventKind::Nmi => return "NMI".into(),
            EventKind::External => {}
            _ => return "an exception".into(),
        }
        let Some(chip) = &self.pc.irqchip else {
            return "the interrupt controllers".into();
        };
        let v = ev.vector;
        let pic = lock(&chip.pic).save_state();
        for (name, st) in [("master", &pic.master), ("slave", &pic.slave)] {
            if v & 0xf8 == st.vector_base & 0xf8 {
                let ir = v & 7;
                return format!(
                    "the 8259A {name} IR{ir} (ExtINT through LAPIC LINT0; INTA: IRR {:#04x} ISR {:#04x} IMR {:#04x})",
                    st.irr, st.isr, st.imr
                );
            }
        }
        if let Some(l) = chip.router.lapic(0) {
            let st = lock(l).save_state();
            const NAMES: [&str; 6] = ["timer", "thermal", "perf", "LINT0", "LINT1", "error"];
            for (i, lvt) in st.lvt.iter().enumerate() {
                if lvt & 0xff == u32::from(v) && lvt & (1 << 16) == 0 {
                    return format!(
                        "the LAPIC (LVT {}; IRR to ISR at acknowledge)",
                        NAMES.get(i).unwrap_or(&"?")
                    );
                }
            }
        }
        let io = lock(&chip.ioapic);
        for pin in 0..24u8 {
            if io
                .redirection_entry(pin)
                .is_some_and(|e| e & 0xff == u64::from(v) && e & (1 << 16) == 0)
            {
                return format!("IOAPIC pin {pin} through the LAPIC");
            }
        }
        "the LAPIC".into()
    }

    fn in_service(&self) -> InService {
        let mut s = InService {
            pic: [(0, 0); 2],
            lapic: [0; 8],
        };
        if let Some(chip) = &self.pc.irqchip {
            let p = lock(&chip.pic).save_state();
            s.pic = [
                (p.master.isr, p.master.vector_base),
                (p.slave.isr, p.slave.vector_base),
            ];
            if let Some(l) = chip.router.lapic(0) {
                s.lapic = lock(l).save_state().isr;
            }
        }
        s
    }

    /// After a write: the vectors whose in-service bit it cleared, and a stop
    /// when one has an EOI breakpoint.
    fn eoi_stop(&mut self, before: &InService) -> Result<Option<Stop>> {
        let after = self.in_service();
        if &after == before {
            return Ok(None);
        }
        let mut cleared: Vec<(u8, &'static str)> = Vec::new();
        for (i, name) in ["8259A master", "8259A slave"].iter().enumerate() {
            let (b, base) = before.pic[i];
            let gone = b & !after.pic[i].0;
            for ir in 0..8u8 {
                if gone & (1 << ir) != 0 {
                    cleared.push(((base & 0xf8) | ir, name));
                }
            }
        }
        for w in 0..8 {
            let gone = before.lapic[w] & !after.lapic[w];
            for bit in 0..32 {
                if gone & (1 << bit) != 0 {
                    cleared.push(((w * 32 + bit) as u8, "LAPIC"));
                }
            }
        }
        for (v, controller) in cleared {
            if let Some(id) = self
                .breakpoints
                .iter()
                .find(|b| b.kind == BpKind::Eoi(v))
                .map(|b| b.id)
            {
                // Finish the instruction so the stop is at a boundary.
                self.vcpu().readiness()?;
                let at = self.linear_rip()?;
                self.notes.push(format!(
                    "EOI of vector {v:#04x}: the {controller} in-service bit cleared by the write before {at:#x}"
                ));
                // The flow ends at the delivery; the EOI closes it.
                self.push_chain(
                    |e| matches!(e, TraceEvent::Deliver { vector, .. } if *vector == v),
                );
                if let Some(l) = self.chain.last_matching(|e| match e {
                    TraceEvent::PicEoi { .. } => controller != "LAPIC",
                    TraceEvent::Eoi { vector, .. } => *vector == v,
                    _ => false,
                }) {
                    self.notes.push(format!("trace: {l}"));
                }
                return Ok(Some(Stop::Eoi {
                    vector: v,
                    controller,
                    id,
                }));
            }
        }
        Ok(None)
    }

    /// A stop for a rising ISA line with a breakpoint.
    fn irq_rises(&mut self) -> Option<Stop> {
        let rose = self.irq_watch.take();
        for irq in rose {
            if let Some(id) = self
                .breakpoints
                .iter()
                .find(|b| b.kind == BpKind::IrqRise(irq))
                .map(|b| b.id)
            {
                let mut note = format!("ISA IRQ {irq} rose");
                if let Some(chip) = &self.pc.irqchip {
                    let p = lock(&chip.pic).save_state();
                    let (st, bit) = if irq < 8 {
                        (&p.master, irq)
                    } else {
                        (&p.slave, irq - 8)
                    };
                    note.push_str(&format!(
                        ": 8259A IRR bit {bit} {} (IRR {:#04x} IMR {:#04x} ISR {:#04x})",
                        if st.irr & (1 << bit) != 0 {
                            "set"
                        } else {
                            "clear"
                        },
                        st.irr,
                        st.imr,
                        st.isr
                    ));
                    let pin = if irq == 0 { 2 } else { irq };
                    if let Some(e) = lock(&chip.ioapic).redirection_entry(pin) {
                        note.push_str(&format!(
                            "; IOAPIC pin {pin} {}",
                            if e & (1 << 16) != 0 {
                                "masked".to_string()
                            } else {
                                format!("vector {:#04x}", e & 0xff)
                            }
                        ));
                    }
                }
                self.notes.push(note);
                self.push_chain(
                    |e| matches!(e, TraceEvent::IrqLine { line, level: true, .. } if *line == irq),
                );
                return Some(Stop::IrqRaised { irq, id });
            }
        }
        None
    }

    // ----- what `info events` prints -----

    pub fn events_report(&mut self) -> Result<String> {
        let machine = self.pc.machine.clone();
        let ready = self.vcpu().readiness()?;
        let ev = self.vcpu().get_events()?;
        let regs = self.regs()?;
        let nmi = machine.interrupts.nmi_pending(0);
        let irq = machine.interrupts.interrupt_pending(0);
        let mut out = String::new();
        out.push_str(&format!(
            "pending: NMI {}, maskable interrupt {}\n",
            yes(nmi),
            yes(irq)
        ));
        // Requests the controllers hold back, and by what.
        let mut held: Vec<String> = Vec::new();
        if let Some(chip) = &self.pc.irqchip {
            let p = lock(&chip.pic).save_state();
            for (name, st) in [("master", &p.master), ("slave", &p.slave)] {
                for ir in 0..8u8 {
                    let bit = 1u8 << ir;
                    if st.irr & bit == 0 {
                        continue;
                    }
                    if st.imr & bit != 0 {
                        held.push(format!("8259A {name} IR{ir}: masked in the IMR"));
                    } else if st.isr != 0 && !st.special_mask {
                        // Fully nested mode: IR n waits behind an equal or
                        // higher priority in service (8259A datasheet).
                        let prio = |i: u8| (i + 8 - ((st.lowest_priority + 1) & 7)) & 7;
                        let blocking = (0..8u8)
                            .filter(|&j| st.isr & (1 << j) != 0)
                            .find(|&j| prio(j) <= prio(ir));
                        if let Some(j) = blocking {
                            held.push(format!(
                                "8259A {name} IR{ir}: waits behind IR{j} in service (no EOI yet)"
                            ));
                        }
                    }
                }
            }
            if let Some(l) = chip.router.lapic(0) {
                let l = lock(l);
                let st = l.save_state();
                if let Some(v) = (0..256u32)
                    .rev()
                    .find(|&v| st.irr[(v / 32) as usize] & (1 << (v % 32)) != 0)
                {
                    if (v as u8 & 0xf0) <= (l.ppr() & 0xf0) {
                        held.push(format!(
                            "LAPIC vector {v:#04x}: its priority class is not above PPR {:#04x} (TPR or a vector in service)",
                            l.ppr()
                        ));
                    }
                }
            }
            out.push_str(&format!(
                "  8259A master: IRR {:#04x} IMR {:#04x} ISR {:#04x} (vector base {:#04x}); slave: IRR {:#04x} IMR {:#04x} ISR {:#04x}\n",
                p.master.irr, p.master.imr, p.master.isr, p.master.vector_base,
                p.slave.irr, p.slave.imr, p.slave.isr
            ));
            if let Some(v) = lock(&chip.pic).pending_vector() {
                out.push_str(&format!("  8259A INT is up: vector {v:#04x} at INTA\n"));
            }
            if let Some(l) = chip.router.lapic(0) {
                let l = lock(l);
                let st = l.save_state();
                let top = |r: &[u32; 8]| {
                    (0..256u32)
                        .rev()
                        .find(|&v| r[(v / 32) as usize] & (1 << (v % 32)) != 0)
                };
                let fmt = |v: Option<u32>| v.map_or("none".to_string(), |v| format!("{v:#04x}"));
                out.push_str(&format!(
                    "  LAPIC: highest IRR {}, highest ISR {}, TPR {:#04x}, PPR {:#04x}\n",
                    fmt(top(&st.irr)),
                    fmt(top(&st.isr)),
                    l.tpr(),
                    l.ppr()
                ));
            }
        }
        out.push_str(&format!(
            "interruptibility: RFLAGS.IF={} STI shadow {} MOV SS shadow {} NMI blocked {}\n",
            u8::from(regs.rflags & (1 << 9) != 0),
            yes(ev.interruptibility.sti),
            yes(ev.interruptibility.mov_ss),
            yes(ev.interruptibility.nmi)
        ));
        let in_delivery = ev.exception.is_some() || ev.interrupt.is_some() || ev.nmi_injected;
        out.push_str(&format!(
            "in delivery: {}\n",
            if in_delivery {
                format!(
                    "{:?} {:?} nmi {}",
                    ev.exception, ev.interrupt, ev.nmi_injected
                )
            } else {
                "nothing".into()
            }
        ));
        for h in &held {
            out.push_str(&format!("held: {h}\n"));
        }
        let why = if !nmi && !irq && !held.is_empty() {
            "no event can be delivered: the controllers hold back what is requested (above)"
                .to_string()
        } else if !nmi && !irq {
            "nothing is pending".to_string()
        } else if nmi && !ready.nmi {
            "an NMI waits: NMIs are blocked (until IRET) or a MOV SS shadow holds it".to_string()
        } else if nmi {
            "an NMI is deliverable at the next entry".to_string()
        } else if !ready.if_flag {
            "the interrupt waits: RFLAGS.IF is 0 (an interrupt window is asked for)".to_string()
        } else if ev.interruptibility.sti || ev.interruptibility.mov_ss {
            "the interrupt waits: an STI / MOV SS shadow blocks it for one instruction".to_string()
        } else if !ready.interrupt {
            "the interrupt waits: an event is already being delivered".to_string()
        } else {
            "the interrupt is deliverable at the next entry".to_string()
        };
        out.push_str(&format!("next event: {why}\n"));
        if let Some((e, at, src)) = &self.last_injection {
            out.push_str(&format!(
                "last injected: vector {:#04x} ({}) from {src} at {at:#x}\n",
                e.vector,
                kind_name(e.kind)
            ));
        }
        Ok(out)
    }

    /// The guest's IDT gates, as `info idt` prints them.
    pub fn idt_report(&mut self) -> Result<String> {
        let s = self.sregs()?;
        let mut out = format!(
            "IDT base {:#x} limit {:#x} ({})\n",
            s.idt.base,
            s.idt.limit,
            s.mode_name()
        );
        let real = s.cr0 & 1 == 0;
        let entry = if real {
            4
        } else if s.long_mode() {
            16
        } else {
            8
        };
        let count = ((u64::from(s.idt.limit) + 1) / entry).min(256);
        for v in 0..count {
            let mut d = [0u8; 16];
            let n = read_linear(
                &self.pc.machine.mem,
                &s,
                s.idt.base + v * entry,
                &mut d[..entry as usize],
            );
            if n < entry as usize {
                break;
            }
            if real {
                let off = u16::from_le_bytes([d[0], d[1]]);
                let seg = u16::from_le_bytes([d[2], d[3]]);
                out.push_str(&format!("  {v:#04x}: {seg:04x}:{off:04x}\n"));
                continue;
            }
            let present = d[5] & 0x80 != 0;
            if !present {
                continue;
            }
            let sel = u16::from_le_bytes([d[2], d[3]]);
            let ty = match d[5] & 0xf {
                0xe | 0x6 => "interrupt gate",
                0xf | 0x7 => "trap gate",
                0x5 => "task gate",
                _ => "?",
            };
            let off = gate_offset(&d, s.long_mode());
            out.push_str(&format!(
                "  {v:#04x}: {sel:04x}:{off:#x} {ty} DPL {}{}\n",
                (d[5] >> 5) & 3,
                if s.long_mode() && d[4] & 7 != 0 {
                    format!(" IST {}", d[4] & 7)
                } else {
                    String::new()
                }
            ));
        }
        Ok(out)
    }

    // ----- moving between processors -----

    /// Moves the vCPU to the other processor. Refuses, with the reason, when
    /// the state cannot be carried exactly.
    pub fn switch_to(&mut self, target: Backend) -> Result<()> {
        if target == self.backend() {
            bail!("the guest already runs on {}", self.backend_name());
        }
        if self.finished.is_some() {
            bail!("the guest's run has ended");
        }
        if target == Backend::Kvm && self.hw_slots_needed(&BpKind::IrqRise(0)) > 4 {
            bail!(
                "refused: more than 4 address / vector breakpoints, and KVM has DR0-DR3 only; \
                 delete some first"
            );
        }
        // Finish an instruction an exit left open (KVM: the I/O is
        // completed at the next KVM_RUN).
        self.vcpu().readiness()?;
        self.set_debug(false, &[])?;
        let before = self.vcpu().get_state()?;
        let ev = &before.events;
        if ev.exception.is_some() || ev.interrupt.is_some() || ev.nmi_injected {
            bail!(
                "refused: an event is in delivery ({:?} {:?} nmi {}); step once and retry",
                ev.exception,
                ev.interrupt,
                ev.nmi_injected
            );
        }
        if ev.smm {
            bail!("refused: the vCPU is in SMM");
        }
        if ev.nmi_pending {
            bail!("refused: KVM holds a pending NMI the interpreter cannot take over");
        }
        let cr8 = self.vcpu().cr8();
        let mut next = match target {
            Backend::Interp => Cpu::Interp(self.new_interp()),
            Backend::Kvm => Cpu::Kvm(self.new_kvm()?),
        };
        let (v, who): (&mut dyn Vcpu, &str) = match &mut next {
            Cpu::Kvm(v) => (&mut **v, "KVM"),
            Cpu::Interp(v) => (&mut **v, "the interpreter"),
        };
        let loaded = v
            .set_state(&before)
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                v.set_cr8(cr8);
                Ok(v.get_state()?)
            })
            .and_then(|after| check_carried(&before, &after, who));
        let old = std::mem::replace(&mut self.active, next);
        // The processor that does not run waits for the next switch.
        let park = |s: &mut Session, c: Cpu| match c {
            Cpu::Kvm(v) => s.kvm = Some(v),
            Cpu::Interp(v) => s.interp = Some(v),
        };
        if let Err(e) = loaded {
            let refused = std::mem::replace(&mut self.active, old);
            park(self, refused);
            return Err(e);
        }
        park(self, old);
        let k = self.vcpu().kicker();
        if let Some(b) = self.pc.machine.doorbells.first() {
            b.set_kicker(k);
        }
        Ok(())
    }
}

/// What the interpreter cannot hold it would silently change: refuse.
fn check_carried(before: &VcpuState, after: &VcpuState, who: &str) -> Result<()> {
    if after.regs != before.regs {
        bail!(
            "refused: {who} cannot hold the registers exactly (RFLAGS {:#x} became {:#x})",
            before.regs.rflags,
            after.regs.rflags
        );
    }
    if after.sregs != before.sregs {
        let mut what = Vec::new();
        let (a, b) = (&after.sregs, &before.sregs);
        for (n, x, y) in [
            ("CR0", a.cr0, b.cr0),
            ("CR3", a.cr3, b.cr3),
            ("CR4", a.cr4, b.cr4),
            ("EFER", a.efer, b.efer),
            ("CR8", a.cr8, b.cr8),
            ("APIC base", a.apic_base, b.apic_base),
        ] {
            if x != y {
                what.push(format!("{n} {y:#x} became {x:#x}"));
            }
        }
        if what.is_empty() {
            what.push("segment / descriptor-table registers differ".into());
        }
        bail!(
            "refused: {who} cannot hold the system registers exactly: {}",
            what.join(", ")
        );
    }
    if !same_fpu(&before.fpu, &after.fpu) {
        bail!("refused: {who} cannot hold the x87 / SSE / XSAVE state exactly (an enabled XSAVE component it lacks?)");
    }
    for m in before.msrs.iter().filter(|m| m.index != msr::IA32_TSC) {
        if !after.msrs.contains(m) {
            bail!(
                "refused: {who} does not hold MSR {:#x} = {:#x}",
                m.index,
                m.value
            );
        }
    }
    if after.events.interruptibility != before.events.interruptibility {
        bail!("refused: {who} cannot hold the interruptibility state");
    }
    Ok(())
}

/// The FPU states hold the same architectural state: MXCSR_MASK (bytes
/// 28-31 of the FXSAVE image) describes the processor, not the guest, and
/// bytes 464-511 are left to software (SDM vol. 1, 10.5.1).
fn same_fpu(a: &tandem_core::cpu::FpuState, b: &tandem_core::cpu::FpuState) -> bool {
    if a.xcr0 != b.xcr0 || a.xsave.len() != b.xsave.len() {
        return a == b;
    }
    a.xsave
        .iter()
        .zip(&b.xsave)
        .enumerate()
        .all(|(i, (x, y))| x == y || (28..32).contains(&i) || (464..512).contains(&i))
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::External => "external interrupt",
        EventKind::Nmi => "NMI",
        EventKind::HardwareException => "exception",
        EventKind::SoftwareInterrupt => "software interrupt",
        EventKind::SoftwareException => "software exception",
        EventKind::PrivilegedSoftwareException => "privileged software exception",
    }
}

pub fn bitness(s: &Sregs) -> u32 {
    tandem_decoder::bitness(s.long_mode(), s.cs.l, s.cs.db, s.cr0 & 1 != 0)
}

fn gate_offset(d: &[u8; 16], long: bool) -> u64 {
    let lo = u64::from(u16::from_le_bytes([d[0], d[1]]));
    let mid = u64::from(u16::from_le_bytes([d[6], d[7]]));
    let mut off = lo | (mid << 16);
    if long {
        off |= u64::from(u32::from_le_bytes([d[8], d[9], d[10], d[11]])) << 32;
    }
    off
}

/// The linear address of vector `v`'s handler in state `s`.
pub fn handler_address(pc: &Pc, s: &Sregs, v: u8) -> Option<u64> {
    let mem = &pc.machine.mem;
    if s.cr0 & 1 == 0 {
        let mut d = [0u8; 4];
        if read_linear(mem, s, s.idt.base + u64::from(v) * 4, &mut d) != 4 {
            return None;
        }
        let off = u64::from(u16::from_le_bytes([d[0], d[1]]));
        let seg = u64::from(u16::from_le_bytes([d[2], d[3]]));
        return Some((seg << 4) + off);
    }
    let entry: u64 = if s.long_mode() { 16 } else { 8 };
    let at = u64::from(v) * entry;
    if at + entry - 1 > u64::from(s.idt.limit) {
        return None;
    }
    let mut d = [0u8; 16];
    if read_linear(mem, s, s.idt.base + at, &mut d[..entry as usize]) != entry as usize {
        return None;
    }
    if d[5] & 0x80 == 0 {
        return None;
    }
    let off = gate_offset(&d, s.long_mode());
    if s.long_mode() {
        return Some(off);
    }
    // The code segment's base from the GDT (flat guests: 0).
    let sel = u16::from_le_bytes([d[2], d[3]]);
    let mut g = [0u8; 8];
    let idx = u64::from(sel & !7);
    if sel & 4 != 0 || read_linear(mem, s, s.gdt.base + idx, &mut g) != 8 {
        return Some(off);
    }
    let base =
        u64::from(g[2]) | u64::from(g[3]) << 8 | u64::from(g[4]) << 16 | u64::from(g[7]) << 24;
    Some((base + off) & 0xffff_ffff)
}

/// Parses a number: 0x hex, or decimal.
pub fn parse_num(s: &str) -> Result<u64> {
    let t = s.trim().trim_start_matches('*');
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(&h.replace('_', ""), 16)
    } else {
        t.replace('_', "").parse::<u64>()
    };
    r.map_err(|_| anyhow!("not a number: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::cpu::{FpuState, Msr};

    fn state() -> VcpuState {
        VcpuState {
            msrs: vec![Msr {
                index: 0xc000_0081,
                value: 0x0023_0010_0000_0000,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn an_exact_copy_is_carried() {
        let a = state();
        assert!(check_carried(&a, &a.clone(), "x").is_ok());
    }

    #[test]
    fn what_the_target_cannot_hold_is_refused_with_the_reason() {
        let a = state();
        let mut b = a.clone();
        b.sregs.cr4 = 0x20;
        let e = check_carried(&a, &b, "the interpreter")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refused") && e.contains("CR4 0x0 became 0x20"),
            "{e}"
        );

        let mut b = a.clone();
        b.regs.rflags = 0x2;
        let mut a2 = a.clone();
        a2.regs.rflags = 0x40002;
        let e = check_carried(&a2, &b, "KVM").unwrap_err().to_string();
        assert!(e.contains("RFLAGS 0x40002 became 0x2"), "{e}");

        let mut b = a.clone();
        b.msrs.clear();
        let e = check_carried(&a, &b, "KVM").unwrap_err().to_string();
        assert!(e.contains("MSR 0xc0000081"), "{e}");

        let mut b = a.clone();
        b.events.interruptibility.sti = true;
        assert!(check_carried(&a, &b, "KVM").is_err());

        let mut b = a.clone();
        b.fpu.xsave[160] = 1; // XMM0
        let e = check_carried(&a, &b, "KVM").unwrap_err().to_string();
        assert!(e.contains("x87 / SSE / XSAVE"), "{e}");
    }

    #[test]
    fn the_tsc_and_fxsave_fields_of_the_processor_are_not_state() {
        let a = state();
        let mut b = a.clone();
        b.msrs.push(Msr {
            index: msr::IA32_TSC,
            value: 5,
        });
        assert!(check_carried(&a, &b, "x").is_ok());
        let (mut f, g) = (FpuState::default(), FpuState::default());
        f.xsave[28] = 0xff; // MXCSR_MASK
        f.xsave[470] = 1; // software-available bytes
        assert!(same_fpu(&f, &g));
        f.xsave[24] = 0; // MXCSR itself
        assert!(!same_fpu(&f, &g));
    }

    #[test]
    fn numbers_parse_in_hex_and_decimal() {
        assert_eq!(parse_num("0x10").unwrap(), 16);
        assert_eq!(parse_num("*0x101f00").unwrap(), 0x101f00);
        assert_eq!(parse_num("42").unwrap(), 42);
        assert!(parse_num("zz").is_err());
        assert!(parse_num("0x").is_err());
    }

    #[test]
    fn idt_gate_offsets() {
        let mut d = [0u8; 16];
        d[0..2].copy_from_slice(&0x5678u16.to_le_bytes());
        d[6..8].copy_from_slice(&0x1234u16.to_le_bytes());
        d[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        assert_eq!(gate_offset(&d, false), 0x1234_5678);
        assert_eq!(gate_offset(&d, true), 0xffff_ffff_1234_5678);
    }
}
