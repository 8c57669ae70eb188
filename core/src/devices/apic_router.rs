//! The APIC bus: routes interrupt messages (IPIs, IOAPIC redirections,
//! MSIs) to the local APICs of the vCPUs, and gives the machine one place
//! for everything LAPIC-shaped: the xAPIC page and the x2APIC / APIC base /
//! TSC deadline MSRs of each vCPU, the LINT pins, MSIs, the EOI path back to
//! the IOAPICs and the injection ladder's [`InterruptSource`].
//!
//! Destination matching follows SDM vol. 3, 11.6.2 (physical, logical flat,
//! logical cluster, x2APIC logical cluster, the broadcast IDs and the ICR
//! shorthands). Lowest-priority delivery (11.6.2.4) picks, among the
//! addressed software-enabled APICs, the focus processor (one that already
//! has the vector pending or in service, when SVR focus checking is on),
//! else the one with the lowest arbitration priority (APR); ties go to the
//! first candidate in vCPU-index (= initial APIC ID) order starting after
//! the previous lowest-priority winner, a rotation like KVM's round-robin
//! arbitration, deterministic for a given message sequence.
//!
//! Locking: each LAPIC sits in its own mutex and the router never holds two
//! of them, nor one while it calls out (EOI sink, PIC acknowledge, another
//! delivery). What a LAPIC sends while its register is written (an IPI, an
//! EOI broadcast) is taken from it under its lock and delivered after the
//! lock is released, so a self-IPI cannot deadlock. Lock order with the
//! other controllers: IOAPIC then LAPIC (the IOAPIC delivers with its lock
//! held), PIC then LAPIC (the PIC drives INT with its lock held).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use crate::bus::BusDevice;
use crate::clock::SharedClock;
use crate::devices::apic_bus::{
    decode_msi, ApicBus, ApicMessage, DeliveryMode, Shorthand, TriggerMode,
};
use crate::devices::lapic::{
    Lapic, LapicOutput, APIC_MMIO_SIZE, MSR_APIC_BASE, MSR_TSC_DEADLINE, MSR_X2APIC_FIRST,
    MSR_X2APIC_LAST,
};
use crate::irq::IrqLine;
use crate::ladder::InterruptSource;
use crate::machine::MsrHandler;
use crate::timer::TimerDevice;
use crate::trace::{TraceEvent, Tracer};
use crate::vcpu::Doorbell;

/// Where EOIs of level-triggered vectors go (the IOAPICs' `eoi`).
pub type EoiSink = Arc<dyn Fn(u8) + Send + Sync>;
/// The 8259A's interrupt acknowledge: the vector of the ExtINT.
pub type PicAck = Arc<dyn Fn() -> Option<u8> + Send + Sync>;

fn lock(l: &Mutex<Lapic>) -> MutexGuard<'_, Lapic> {
    // A poisoned lock means another vCPU thread panicked inside the APIC;
    // the state is a plain struct, keep using it.
    l.lock().unwrap_or_else(|p| p.into_inner())
}

/// The local APICs of a machine and the bus between them.
pub struct ApicRouter {
    lapics: Vec<Arc<Mutex<Lapic>>>,
    bells: Vec<Arc<Doorbell>>,
    eoi_sink: RwLock<Option<EoiSink>>,
    pic_ack: RwLock<Option<PicAck>>,
    /// Where the next lowest-priority tie-break starts.
    lowest_priority_next: AtomicUsize,
    /// Records MSIs (the LAPICs record the rest).
    tracer: OnceLock<Tracer>,
}

impl std::fmt::Debug for ApicRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApicRouter")
            .field("lapics", &self.lapics.len())
            .finish_non_exhaustive()
    }
}

impl ApicRouter {
    /// A router for `lapics` (index = vCPU index); `bells[i]` is rung when
    /// something becomes pending for vCPU i.
    pub fn new(lapics: Vec<Arc<Mutex<Lapic>>>, bells: Vec<Arc<Doorbell>>) -> Self {
        ApicRouter {
            lapics,
            bells,
            eoi_sink: RwLock::new(None),
            pic_ack: RwLock::new(None),
            lowest_priority_next: AtomicUsize::new(0),
            tracer: OnceLock::new(),
        }
    }

    /// Records what the LAPICs and the bus do in `tracer` (set once).
    pub fn set_tracer(&self, tracer: Tracer) {
        for l in &self.lapics {
            lock(l).set_tracer(tracer.clone());
        }
        let _ = self.tracer.set(tracer);
    }

    /// `n` power-up LAPICs with APIC IDs 0..n, vCPU 0 the BSP.
    pub fn with_vcpus(n: u32, clock: SharedClock, tsc_khz: u64, bells: Vec<Arc<Doorbell>>) -> Self {
        let lapics = (0..n)
            .map(|id| Arc::new(Mutex::new(Lapic::new(id, id == 0, clock.clone(), tsc_khz))))
            .collect();
        Self::new(lapics, bells)
    }

    /// Connects the IOAPICs' EOI input (replaces an earlier sink).
    pub fn set_eoi_sink(&self, f: EoiSink) {
        *self.eoi_sink.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Connects the 8259A's interrupt acknowledge.
    pub fn set_pic_ack(&self, f: PicAck) {
        *self.pic_ack.write().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    pub fn len(&self) -> usize {
        self.lapics.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lapics.is_empty()
    }

    /// The LAPIC of vCPU `vcpu`.
    pub fn lapic(&self, vcpu: u32) -> Option<&Arc<Mutex<Lapic>>> {
        self.lapics.get(usize::try_from(vcpu).ok()?)
    }

    fn ring(&self, i: usize) {
        if let Some(b) = self.bells.get(i) {
            b.ring();
        }
    }

    /// Runs `f` on LAPIC `i` under its lock, then delivers what it sent.
    fn with_lapic<R>(&self, i: usize, f: impl FnOnce(&mut Lapic) -> R) -> Option<R> {
        let l = self.lapics.get(i)?;
        let (r, outputs) = {
            let mut g = lock(l);
            let r = f(&mut g);
            (r, g.take_outputs())
        };
        self.process_outputs(i, outputs);
        Some(r)
    }

    fn process_outputs(&self, sender: usize, outputs: Vec<LapicOutput>) {
        for o in outputs {
            match o {
                LapicOutput::Ipi { msg, x2apic } => self.route(&msg, Some(sender), x2apic),
                LapicOutput::Eoi(v) => self.eoi(v),
            }
        }
    }

    fn index(vcpu: u32) -> usize {
        usize::try_from(vcpu).unwrap_or(usize::MAX)
    }

    // ----- delivery -------------------------------------------------------

    /// Delivers `msg` from the APIC of vCPU `sender` (for the shorthands),
    /// with an x2APIC-format destination if `x2apic_format`.
    fn route(&self, msg: &ApicMessage, sender: Option<usize>, x2apic_format: bool) {
        if msg.delivery == DeliveryMode::Reserved {
            return;
        }
        // INIT level de-assert goes to every APIC whatever the destination
        // (SDM 11.6.1); it changes nothing we model.
        let deassert =
            msg.delivery == DeliveryMode::Init && msg.trigger == TriggerMode::Level && !msg.level;
        struct Candidate {
            index: usize,
            apr: u8,
            focus: bool,
            sw_enabled: bool,
        }
        let mut candidates = Vec::new();
        for (i, l) in self.lapics.iter().enumerate() {
            let g = lock(l);
            if !g.hw_enabled() {
                continue;
            }
            let hit = deassert
                || match msg.shorthand {
                    Shorthand::None => {
                        g.matches_destination(msg.dest, msg.dest_mode, x2apic_format)
                    }
                    Shorthand::SelfOnly => sender == Some(i),
                    Shorthand::AllIncludingSelf => true,
                    Shorthand::AllExcludingSelf => sender != Some(i),
                };
            if hit {
                candidates.push(Candidate {
                    index: i,
                    apr: g.apr(),
                    focus: g.is_focus(msg.vector),
                    sw_enabled: g.sw_enabled(),
                });
            }
        }
        let targets: Vec<usize> = if msg.delivery == DeliveryMode::LowestPriority {
            let eligible: Vec<&Candidate> = candidates.iter().filter(|c| c.sw_enabled).collect();
            let chosen = if let Some(c) = eligible.iter().find(|c| c.focus) {
                Some(c.index)
            } else {
                let n = self.lapics.len().max(1);
                let start = self.lowest_priority_next.load(Ordering::Relaxed) % n;
                let chosen = eligible
                    .iter()
                    .min_by_key(|c| (c.apr, (c.index + n - start) % n))
                    .map(|c| c.index);
                if let Some(i) = chosen {
                    self.lowest_priority_next.store(i + 1, Ordering::Relaxed);
                }
                chosen
            };
            chosen.into_iter().collect()
        } else {
            candidates.iter().map(|c| c.index).collect()
        };
        for i in targets {
            if let Some(l) = self.lapics.get(i) {
                lock(l).accept(msg);
                if !deassert {
                    self.ring(i);
                }
            }
        }
    }

    /// The index of the APIC whose current APIC ID is `id`.
    fn index_of_id(&self, id: u32) -> Option<(usize, bool)> {
        self.lapics.iter().enumerate().find_map(|(i, l)| {
            let g = lock(l);
            (g.apic_id() == id).then(|| (i, g.is_x2apic()))
        })
    }

    /// Delivers a message whose destination is in x2APIC format (32-bit
    /// IDs, x2APIC logical clusters): an interrupt remapped in the VT-d
    /// unit's x2APIC mode.
    pub fn deliver_x2apic_format(&self, msg: &ApicMessage) {
        self.route(msg, None, true);
    }

    /// Traces an MSI that reaches the LAPICs by another path (after
    /// interrupt remapping).
    pub fn trace_msi(&self, address: u64, data: u32, vector: u8) {
        if let Some(t) = self.tracer.get() {
            t.emit(TraceEvent::Msi {
                address,
                data,
                vector,
            });
        }
    }

    /// An MSI write of `data` to `address` (SDM 11.11); addresses outside
    /// 0xFEExxxxx are ignored.
    pub fn msi(&self, address: u64, data: u32) {
        if let Some(msg) = decode_msi(address, data) {
            if let Some(t) = self.tracer.get() {
                t.emit(TraceEvent::Msi {
                    address,
                    data,
                    vector: msg.vector,
                });
            }
            self.route(&msg, None, false);
        }
    }

    // ----- pins -------------------------------------------------------------

    /// Drives LINT`lint` of every LAPIC (the 8259A's INT on LINT0, an NMI
    /// source on LINT1, wired to all processors as on a PC).
    pub fn set_lint(&self, lint: u8, level: bool) {
        for (i, l) in self.lapics.iter().enumerate() {
            let wake = {
                let mut g = lock(l);
                g.set_lint(lint, level);
                level
                    && (g.extint_pending()
                        || g.nmi_pending()
                        || g.has_interrupt()
                        || g.init_pending())
            };
            if wake {
                self.ring(i);
            }
        }
    }

    /// An [`IrqLine`] driving LINT`lint` of every LAPIC (give LINT0's to the
    /// 8259A as its INT output).
    pub fn lint_line(self: &Arc<Self>, lint: u8) -> Arc<dyn IrqLine> {
        Arc::new(LintLine {
            router: self.clone(),
            lint,
        })
    }

    // ----- per-vCPU register access -----------------------------------------

    /// Base of vCPU `vcpu`'s xAPIC page while it is decoded.
    pub fn mmio_base(&self, vcpu: u32) -> Option<u64> {
        self.with_lapic(Self::index(vcpu), |l| l.mmio_base())
            .flatten()
    }

    /// The offset of `addr` in vCPU `vcpu`'s xAPIC page, if it falls there.
    pub fn mmio_offset(&self, vcpu: u32, addr: u64) -> Option<u64> {
        let base = self.mmio_base(vcpu)?;
        let off = addr.checked_sub(base)?;
        (off < APIC_MMIO_SIZE).then_some(off)
    }

    /// A read by vCPU `vcpu` at `offset` in its xAPIC page.
    pub fn mmio_read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        if self
            .with_lapic(Self::index(vcpu), |l| l.read_mmio(offset, data))
            .is_none()
        {
            data.fill(0xFF);
        }
    }

    /// A write by vCPU `vcpu` at `offset` in its xAPIC page.
    pub fn mmio_write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        let _ = self.with_lapic(Self::index(vcpu), |l| l.write_mmio(offset, data));
    }

    /// RDMSR by vCPU `vcpu` of IA32_APIC_BASE, IA32_TSC_DEADLINE or an
    /// x2APIC MSR; `None` for other MSRs and for #GP.
    pub fn rdmsr(&self, vcpu: u32, index: u32) -> Option<u64> {
        self.with_lapic(Self::index(vcpu), |l| match index {
            MSR_APIC_BASE => Some(l.apic_base()),
            MSR_TSC_DEADLINE => {
                l.update_timer();
                Some(l.tsc_deadline())
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => l.read_msr(index),
            _ => None,
        })
        .flatten()
    }

    /// WRMSR by vCPU `vcpu`; `false` for other MSRs and for #GP.
    pub fn wrmsr(&self, vcpu: u32, index: u32, value: u64) -> bool {
        self.with_lapic(Self::index(vcpu), |l| match index {
            MSR_APIC_BASE => l.set_apic_base(value),
            MSR_TSC_DEADLINE => {
                l.set_tsc_deadline(value);
                true
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => l.write_msr(index, value),
            _ => false,
        })
        .unwrap_or(false)
    }

    /// CR8 of vCPU `vcpu` (TPR[7:4], SDM 11.8.6.1).
    pub fn cr8(&self, vcpu: u32) -> u64 {
        self.with_lapic(Self::index(vcpu), |l| u64::from(l.tpr() >> 4))
            .unwrap_or(0)
    }

    /// Sets every LAPIC's guest TSC (see `Lapic::set_tsc`).
    pub fn set_tsc(&self, tsc_khz: u64, offset: u64) {
        for l in &self.lapics {
            lock(l).set_tsc(tsc_khz, offset);
        }
    }

    /// MAXPHYADDR of the processor (CPUID 0x8000_0008 EAX[7:0]), for every
    /// LAPIC's IA32_APIC_BASE reserved-bit check.
    pub fn set_phys_addr_bits(&self, bits: u8) {
        for l in &self.lapics {
            lock(l).set_phys_addr_bits(bits);
        }
    }

    /// MOV to CR8 by vCPU `vcpu`.
    pub fn set_cr8(&self, vcpu: u32, cr8: u64) {
        let _ = self.with_lapic(Self::index(vcpu), |l| l.set_tpr(((cr8 & 0xF) << 4) as u8));
    }

    // ----- INIT / SIPI --------------------------------------------------------

    pub fn init_pending(&self, vcpu: u32) -> bool {
        self.with_lapic(Self::index(vcpu), |l| l.init_pending())
            .unwrap_or(false)
    }

    /// Takes a pending INIT for `vcpu` (see [`Lapic::take_init`]).
    pub fn take_init(&self, vcpu: u32) -> bool {
        self.with_lapic(Self::index(vcpu), |l| l.take_init())
            .unwrap_or(false)
    }

    /// Takes a start-up IPI for `vcpu` in wait-for-SIPI.
    pub fn take_sipi(&self, vcpu: u32) -> Option<u8> {
        self.with_lapic(Self::index(vcpu), |l| l.take_sipi())
            .flatten()
    }

    /// INIT and SIPI for `vcpu` under one lock (see [`Lapic::take_startup`]).
    pub fn take_startup(&self, vcpu: u32) -> crate::ladder::Startup {
        self.with_lapic(Self::index(vcpu), |l| l.take_startup())
            .unwrap_or(crate::ladder::Startup::Run)
    }

    // ----- timers and dumps -----------------------------------------------

    /// One [`TimerDevice`] per LAPIC timer that also rings its vCPU's
    /// doorbell when the timer interrupt becomes deliverable.
    pub fn timers(&self) -> Vec<Arc<dyn TimerDevice>> {
        self.lapics
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Arc::new(RoutedLapicTimer {
                    lapic: l.clone(),
                    bell: self.bells.get(i).cloned(),
                }) as Arc<dyn TimerDevice>
            })
            .collect()
    }

    /// Every LAPIC's registers, like QEMU's `info lapic` for each CPU.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for (i, l) in self.lapics.iter().enumerate() {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(&format!("CPU {i}\n{}\n", lock(l).dump()));
        }
        s
    }
}

impl ApicBus for ApicRouter {
    /// Delivers a message from outside (IOAPIC, MSI: `source` None, 8-bit
    /// destination) or an IPI whose `source` names the sender's APIC ID.
    fn deliver(&self, msg: &ApicMessage) {
        let (sender, x2apic) = match msg.source.and_then(|id| self.index_of_id(id)) {
            Some((i, x2)) => (Some(i), x2),
            None => (None, false),
        };
        self.route(msg, sender, x2apic);
    }

    fn eoi(&self, vector: u8) {
        let sink = self
            .eoi_sink
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = sink {
            f(vector);
        }
    }
}

impl InterruptSource for ApicRouter {
    fn cr8(&self, vcpu: u32) -> Option<u64> {
        Some(ApicRouter::cr8(self, vcpu))
    }

    fn set_cr8(&self, vcpu: u32, cr8: u64) {
        ApicRouter::set_cr8(self, vcpu, cr8)
    }

    fn nmi_pending(&self, vcpu: u32) -> bool {
        self.with_lapic(Self::index(vcpu), |l| l.nmi_pending())
            .unwrap_or(false)
    }

    fn take_startup(&self, vcpu: u32) -> crate::ladder::Startup {
        ApicRouter::take_startup(self, vcpu)
    }

    fn ack_nmi(&self, vcpu: u32) {
        let _ = self.with_lapic(Self::index(vcpu), |l| l.take_nmi());
    }

    fn interrupt_pending(&self, vcpu: u32) -> bool {
        self.with_lapic(Self::index(vcpu), |l| {
            l.has_interrupt() || l.extint_pending()
        })
        .unwrap_or(false)
    }

    fn held_by_priority(&self, vcpu: u32) -> Option<(u8, u8)> {
        self.with_lapic(Self::index(vcpu), |l| {
            let v = l.highest_irr()?;
            (l.sw_enabled() && !l.has_interrupt()).then(|| (v, l.ppr()))
        })
        .flatten()
    }

    /// ExtINT first (the PIC's INTA, KVM's `kvm_cpu_get_interrupt` order),
    /// else the LAPIC's IRR -> ISR.
    fn ack_interrupt(&self, vcpu: u32) -> Option<u8> {
        let i = Self::index(vcpu);
        let extint = self.with_lapic(i, |l| l.take_extint())?;
        if extint {
            // Outside the LAPIC lock: the PIC's INTA changes its INT, which
            // comes back here through `set_lint`.
            let ack = self
                .pic_ack
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            return ack.and_then(|f| f());
        }
        self.with_lapic(i, |l| l.ack_interrupt()).flatten()
    }

    /// An NMI or INIT can still come: another vCPU can send IPIs, LINT0
    /// passes the PIC's INT as an NMI / SMI / INIT, or one is already
    /// pending. (The IOAPIC's NMI entries are the machine's to add.)
    fn can_wake_masked(&self, vcpu: u32) -> bool {
        // LINT1 is not counted: nothing on this machine drives it (a PC's
        // chipset NMI sources are not modelled).
        self.lapics.len() > 1
            || self
                .with_lapic(Self::index(vcpu), |l| {
                    l.lint0_wakes_masked() || l.nmi_pending() || l.init_pending() || l.smi_pending()
                })
                .unwrap_or(false)
    }
}

impl MsrHandler for ApicRouter {
    fn rdmsr(&self, vcpu: u32, index: u32) -> Option<u64> {
        ApicRouter::rdmsr(self, vcpu, index)
    }

    fn wrmsr(&self, vcpu: u32, index: u32, value: u64) -> bool {
        ApicRouter::wrmsr(self, vcpu, index, value)
    }
}

struct LintLine {
    router: Arc<ApicRouter>,
    lint: u8,
}

impl IrqLine for LintLine {
    fn set_level(&self, level: bool) {
        self.router.set_lint(self.lint, level);
    }
}

/// A LAPIC timer that rings its vCPU's doorbell when it makes an interrupt
/// deliverable (another vCPU's run loop may be the one firing it).
struct RoutedLapicTimer {
    lapic: Arc<Mutex<Lapic>>,
    bell: Option<Arc<Doorbell>>,
}

impl TimerDevice for RoutedLapicTimer {
    fn deadline(&self) -> Option<u64> {
        lock(&self.lapic).timer_deadline()
    }

    fn fire(&self, now: u64) {
        let wake = {
            let mut g = lock(&self.lapic);
            g.fire_timer(now);
            g.has_interrupt()
        };
        if wake {
            if let Some(b) = &self.bell {
                b.ring();
            }
        }
    }
}

/// The xAPIC page of one fixed vCPU as a [`BusDevice`] (name "lapic"). The
/// MMIO bus does not say which vCPU made an access, so this only fits a
/// one-vCPU machine or a per-vCPU bus; otherwise the machine should send
/// accesses inside [`ApicRouter::mmio_offset`] to [`ApicRouter::mmio_read`]
/// / [`ApicRouter::mmio_write`] with the accessing vCPU.
pub struct LapicMmio {
    pub router: Arc<ApicRouter>,
    pub vcpu: u32,
}

impl BusDevice for LapicMmio {
    fn name(&self) -> &'static str {
        "lapic"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.router.mmio_read(self.vcpu, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.router.mmio_write(self.vcpu, offset, data);
    }

    fn dump(&self) -> String {
        self.router
            .lapic(self.vcpu)
            .map(|l| lock(l).dump())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
    use crate::clock::{Clock, VirtualClock};
    use crate::devices::apic_bus::DestMode;
    use std::sync::atomic::AtomicU32;

    const SVR: u64 = 0x0F0;
    const TPR: u64 = 0x080;
    const EOI: u64 = 0x0B0;
    const LDR: u64 = 0x0D0;
    const DFR: u64 = 0x0E0;
    const ICR_LOW: u64 = 0x300;
    const ICR_HIGH: u64 = 0x310;
    const LVT_TIMER: u64 = 0x320;
    const LVT_LINT0: u64 = 0x350;
    const LVT_LINT1: u64 = 0x360;
    const TIMER_INITIAL: u64 = 0x380;
    const TIMER_DIVIDE: u64 = 0x3E0;

    struct Rig {
        clock: Arc<VirtualClock>,
        router: Arc<ApicRouter>,
        bells: Vec<Arc<Doorbell>>,
    }

    /// `n` vCPUs, every APIC software-enabled, bells cleared.
    fn rig(n: u32) -> Rig {
        let clock = Arc::new(VirtualClock::new());
        let bells: Vec<_> = (0..n).map(|_| Arc::new(Doorbell::new())).collect();
        let router = Arc::new(ApicRouter::with_vcpus(
            n,
            clock.clone(),
            1_000_000,
            bells.clone(),
        ));
        for cpu in 0..n {
            w(&router, cpu, SVR, 0x1FF);
        }
        for b in &bells {
            b.take();
        }
        Rig {
            clock,
            router,
            bells,
        }
    }

    fn w(r: &ApicRouter, cpu: u32, off: u64, v: u32) {
        r.mmio_write(cpu, off, &v.to_le_bytes());
    }

    fn rd(r: &ApicRouter, cpu: u32, off: u64) -> u32 {
        let mut b = [0u8; 4];
        r.mmio_read(cpu, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn irr_has(r: &ApicRouter, cpu: u32, v: u8) -> bool {
        let word = r.lapic(cpu).unwrap().lock().unwrap().save_state().irr[usize::from(v >> 5)];
        word & (1 << (v & 31)) != 0
    }

    /// xAPIC IPI from `from`: destination `dest` in ICR high, then ICR low.
    fn ipi(r: &ApicRouter, from: u32, dest: u8, low: u32) {
        w(r, from, ICR_HIGH, u32::from(dest) << 24);
        w(r, from, ICR_LOW, low);
    }

    fn receivers(r: &ApicRouter, v: u8) -> Vec<u32> {
        (0..r.len() as u32).filter(|&c| irr_has(r, c, v)).collect()
    }

    /// Takes vector `v` into service and EOIs it everywhere.
    fn clear(r: &ApicRouter, v: u8) {
        for cpu in 0..r.len() as u32 {
            if irr_has(r, cpu, v) {
                assert_eq!(r.ack_interrupt(cpu), Some(v));
                w(r, cpu, EOI, 0);
            }
        }
    }

    #[test]
    fn fixed_ipi_by_physical_id_rings_the_target() {
        let t = rig(3);
        ipi(&t.router, 0, 2, 0x4050);
        assert_eq!(receivers(&t.router, 0x50), vec![2]);
        assert!(t.bells[2].take());
        assert!(!t.bells[1].take() && !t.bells[0].take());
        assert!(t.router.interrupt_pending(2));
        assert!(!t.router.interrupt_pending(1));
        assert_eq!(t.router.ack_interrupt(2), Some(0x50));
        // Physical broadcast.
        ipi(&t.router, 0, 0xFF, 0x4051);
        assert_eq!(receivers(&t.router, 0x51), vec![0, 1, 2]);
        // No APIC with that ID.
        ipi(&t.router, 0, 7, 0x4052);
        assert!(receivers(&t.router, 0x52).is_empty());
    }

    #[test]
    fn logical_flat_and_cluster_destinations() {
        let t = rig(3);
        for cpu in 0..3 {
            w(&t.router, cpu, LDR, (1 << cpu) << 24);
        }
        ipi(&t.router, 0, 0x06, 0x4850);
        assert_eq!(receivers(&t.router, 0x50), vec![1, 2]);
        for (cpu, ldr) in [(0, 0x11), (1, 0x12), (2, 0x21)] {
            w(&t.router, cpu, DFR, 0x0FFF_FFFF);
            w(&t.router, cpu, LDR, ldr << 24);
        }
        ipi(&t.router, 0, 0x13, 0x4860);
        assert_eq!(receivers(&t.router, 0x60), vec![0, 1]);
        ipi(&t.router, 0, 0x21, 0x4861);
        assert_eq!(receivers(&t.router, 0x61), vec![2]);
        ipi(&t.router, 0, 0x22, 0x4862);
        assert!(receivers(&t.router, 0x62).is_empty());
    }

    #[test]
    fn shorthands() {
        let t = rig(3);
        // Self: delivered through the router without deadlocking.
        ipi(&t.router, 1, 0, 0x4_4070);
        assert_eq!(receivers(&t.router, 0x70), vec![1]);
        ipi(&t.router, 1, 0, 0x8_4071);
        assert_eq!(receivers(&t.router, 0x71), vec![0, 1, 2]);
        ipi(&t.router, 1, 0, 0xC_4072);
        assert_eq!(receivers(&t.router, 0x72), vec![0, 2]);
        assert!(t.bells[0].take() && t.bells[2].take());
        // A globally disabled APIC receives nothing.
        assert!(t.router.wrmsr(2, 0x1b, 0xFEE0_0000));
        ipi(&t.router, 1, 0, 0x8_4073);
        assert_eq!(receivers(&t.router, 0x73), vec![0, 1]);
    }

    #[test]
    fn lowest_priority_picks_the_lowest_priority_apic() {
        let t = rig(3);
        for (cpu, tpr) in [(0, 0x40), (1, 0x10), (2, 0x30)] {
            w(&t.router, cpu, TPR, tpr);
        }
        ipi(&t.router, 0, 0xFF, 0x4150);
        assert_eq!(receivers(&t.router, 0x50), vec![1]);
        clear(&t.router, 0x50);
        // Equal priorities: the winner rotates.
        for cpu in 0..3 {
            w(&t.router, cpu, TPR, 0);
        }
        let mut winners = Vec::new();
        for _ in 0..4 {
            ipi(&t.router, 0, 0xFF, 0x4155);
            let got = receivers(&t.router, 0x55);
            assert_eq!(got.len(), 1);
            winners.push(got[0]);
            clear(&t.router, 0x55);
        }
        assert_eq!(winners, vec![2, 0, 1, 2]);
        // Focus processor: the APIC with the vector in service gets it.
        ipi(&t.router, 0, 0, 0x4_4060);
        assert_eq!(t.router.ack_interrupt(0), Some(0x60));
        w(&t.router, 1, TPR, 0x00);
        w(&t.router, 0, TPR, 0x20);
        t.router.msi(0xFEEF_F008, 0x0060);
        assert!(irr_has(&t.router, 0, 0x60), "focus processor");
        // Without focus checking, priority decides.
        w(&t.router, 0, EOI, 0);
        let _ = t.router.ack_interrupt(0);
        w(&t.router, 0, EOI, 0);
        w(&t.router, 0, SVR, 0x3FF);
        t.router.msi(0xFEEF_F008, 0x0160);
        assert!(!irr_has(&t.router, 0, 0x60));
        // A software-disabled APIC never wins.
        let r = rig(2);
        w(&r.router, 0, SVR, 0xFF);
        w(&r.router, 1, TPR, 0xF0);
        ipi(&r.router, 1, 0xFF, 0x4157);
        assert_eq!(receivers(&r.router, 0x57), vec![1]);
    }

    #[test]
    fn nmi_init_and_sipi_ipis() {
        let t = rig(2);
        ipi(&t.router, 0, 1, 0x4400);
        assert!(t.router.nmi_pending(1));
        assert!(!t.router.nmi_pending(0));
        assert!(t.bells[1].take());
        t.router.ack_nmi(1);
        assert!(!t.router.nmi_pending(1));
        // INIT, then start-up with vector 0x9A.
        w(&t.router, 1, TPR, 0x30);
        ipi(&t.router, 0, 1, 0xC500);
        assert!(t.router.init_pending(1));
        ipi(&t.router, 0, 1, 0x8500);
        assert!(t.router.take_init(1));
        assert_eq!(rd(&t.router, 1, TPR), 0);
        ipi(&t.router, 0, 1, 0x4600 | 0x9A);
        assert_eq!(t.router.take_sipi(1), Some(0x9A));
        assert_eq!(t.router.take_sipi(1), None);
        // The BSP is not in wait-for-SIPI.
        ipi(&t.router, 1, 0, 0x4600 | 0x9A);
        assert_eq!(t.router.take_sipi(0), None);
        // The run loop's one look: INIT and SIPI that both arrived before the
        // AP ran again start it at the SIPI page; an INIT alone makes it
        // wait; the BSP's INIT resets it; then nothing.
        use crate::ladder::Startup;
        ipi(&t.router, 0, 1, 0xC500);
        ipi(&t.router, 0, 1, 0x4600 | 0x10);
        assert_eq!(t.router.take_startup(1), Startup::Sipi(0x10));
        ipi(&t.router, 0, 1, 0xC500);
        assert_eq!(
            t.router.take_startup(1),
            Startup::WaitForSipi { init: true }
        );
        assert_eq!(
            t.router.take_startup(1),
            Startup::WaitForSipi { init: false }
        );
        ipi(&t.router, 1, 0, 0xC500);
        assert_eq!(t.router.take_startup(0), Startup::Init);
        assert_eq!(t.router.take_startup(0), Startup::Run);
    }

    #[test]
    fn msi_delivery_and_level_eoi_to_the_sink() {
        let t = rig(2);
        let eois = Arc::new(Mutex::new(Vec::new()));
        let e = eois.clone();
        // The sink may deliver again (an IOAPIC with the line still high):
        // no lock is held while it runs.
        let weak = Arc::downgrade(&t.router);
        t.router.set_eoi_sink(Arc::new(move |v| {
            e.lock().unwrap().push(v);
            if let Some(r) = weak.upgrade() {
                r.msi(0xFEE0_0000, 0x0042);
            }
        }));
        t.router.msi(0xFEE0_1000, 0xC061);
        assert_eq!(receivers(&t.router, 0x61), vec![1]);
        assert!(t.bells[1].take());
        assert_eq!(t.router.ack_interrupt(1), Some(0x61));
        w(&t.router, 1, EOI, 0);
        assert_eq!(*eois.lock().unwrap(), vec![0x61]);
        assert!(irr_has(&t.router, 0, 0x42));
        // Not an MSI address.
        t.router.msi(0xFED0_1000, 0x0063);
        assert!(receivers(&t.router, 0x63).is_empty());
        // Logical MSI.
        w(&t.router, 0, LDR, 0x0100_0000);
        w(&t.router, 1, LDR, 0x0200_0000);
        t.router.msi(0xFEE0_2004, 0x0064);
        assert_eq!(receivers(&t.router, 0x64), vec![1]);
    }

    #[test]
    fn x2apic_ipis() {
        let t = rig(3);
        for cpu in 0..3 {
            let base = t.router.rdmsr(cpu, 0x1b).unwrap();
            assert!(t.router.wrmsr(cpu, 0x1b, base | 0x400));
        }
        assert!(t.router.wrmsr(0, 0x830, (2 << 32) | 0x4070));
        assert_eq!(receivers(&t.router, 0x70), vec![2]);
        assert!(t.router.wrmsr(0, 0x830, (0xFFFF_FFFF << 32) | 0x4071));
        assert_eq!(receivers(&t.router, 0x71), vec![0, 1, 2]);
        // x2APIC logical: cluster 0, members 1 and 2.
        assert!(t.router.wrmsr(0, 0x830, (0b110 << 32) | 0x4872));
        assert_eq!(receivers(&t.router, 0x72), vec![1, 2]);
        // 0xFF is not a broadcast in a 32-bit destination...
        assert!(t.router.wrmsr(0, 0x830, (0xFF << 32) | 0x4073));
        assert!(receivers(&t.router, 0x73).is_empty());
        // ...but is in an 8-bit one (IOAPIC, MSI).
        t.router.msi(0xFEE0_0000 | (0xFF << 12), 0x0074);
        assert_eq!(receivers(&t.router, 0x74), vec![0, 1, 2]);
        // SELF IPI register.
        assert!(t.router.wrmsr(1, 0x83F, 0x75));
        assert_eq!(receivers(&t.router, 0x75), vec![1]);
        // The xAPIC page is gone.
        assert_eq!(t.router.mmio_base(1), None);
        assert_eq!(rd(&t.router, 1, TPR), 0xFFFF_FFFF);
    }

    #[test]
    fn pic_interrupt_through_lint0() {
        let t = rig(2);
        let acks = Arc::new(AtomicU32::new(0));
        let a = acks.clone();
        let line = t.router.lint_line(0);
        let l2 = line.clone();
        t.router.set_pic_ack(Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
            // The PIC lowers INT during INTA: re-entry must not deadlock.
            l2.lower();
            Some(0x08)
        }));
        line.raise();
        assert!(t.bells[0].take());
        assert!(t.router.interrupt_pending(0));
        assert!(!t.router.interrupt_pending(1), "the AP's LINT0 is masked");
        assert_eq!(t.router.ack_interrupt(0), Some(0x08));
        assert_eq!(acks.load(Ordering::SeqCst), 1);
        assert!(!t.router.interrupt_pending(0));
        // ExtINT goes before LAPIC vectors.
        ipi(&t.router, 1, 0, 0x4090);
        line.raise();
        assert_eq!(t.router.ack_interrupt(0), Some(0x08));
        assert_eq!(t.router.ack_interrupt(0), Some(0x90));
        // An ExtINT message (IOAPIC in virtual wire mode B).
        t.router.msi(0xFEE0_1000, 0x0700);
        assert!(t.router.interrupt_pending(1));
        assert_eq!(t.router.ack_interrupt(1), Some(0x08));
        assert!(!t.router.interrupt_pending(1));
    }

    #[test]
    fn can_wake_masked() {
        let one = rig(1);
        assert!(!one.router.can_wake_masked(0));
        // Nothing drives LINT1 on this machine.
        w(&one.router, 0, LVT_LINT1, 0x400);
        assert!(!one.router.can_wake_masked(0));
        // LINT0 carries the PIC's INT: as an NMI it can end a masked HLT.
        w(&one.router, 0, LVT_LINT0, 0x400);
        assert!(one.router.can_wake_masked(0));
        let two = rig(2);
        assert!(two.router.can_wake_masked(0));
    }

    #[test]
    fn msr_handler_and_tsc_deadline() {
        let t = rig(1);
        let h: &dyn MsrHandler = &*t.router;
        assert_eq!(h.rdmsr(0, 0x1b), Some(0xFEE0_0900));
        assert_eq!(h.rdmsr(0, 0x10), None);
        assert!(!h.wrmsr(0, 0x10, 0));
        assert_eq!(h.rdmsr(5, 0x1b), None, "no such vCPU");
        assert_eq!(h.rdmsr(0, 0x6e0), Some(0));
        w(&t.router, 0, LVT_TIMER, 0x4_0000 | 0xEC);
        assert!(h.wrmsr(0, 0x6e0, 5000));
        assert_eq!(h.rdmsr(0, 0x6e0), Some(5000));
        t.clock.advance(5000);
        assert_eq!(h.rdmsr(0, 0x6e0), Some(0), "expired: cleared");
        assert!(irr_has(&t.router, 0, 0xEC));
        // x2APIC MSRs #GP in xAPIC mode.
        assert_eq!(h.rdmsr(0, 0x802), None);
        // CR8 is TPR[7:4].
        t.router.set_cr8(0, 0x5);
        assert_eq!(rd(&t.router, 0, TPR), 0x50);
        assert_eq!(t.router.cr8(0), 5);
    }

    #[test]
    fn timers_ring_their_vcpu() {
        let t = rig(2);
        let timers = t.router.timers();
        assert_eq!(timers.len(), 2);
        w(&t.router, 1, LVT_TIMER, 0x41);
        w(&t.router, 1, TIMER_DIVIDE, 0xB);
        w(&t.router, 1, TIMER_INITIAL, 1000);
        assert_eq!(timers[1].deadline(), Some(1000));
        assert_eq!(timers[0].deadline(), None);
        t.clock.advance(1000);
        timers[1].fire(t.clock.now_ns());
        assert!(t.bells[1].take());
        assert!(!t.bells[0].take());
        assert!(t.router.interrupt_pending(1));
        assert_eq!(t.router.ack_interrupt(1), Some(0x41));
    }

    #[test]
    fn mmio_window_and_bus_device() {
        let t = rig(2);
        assert_eq!(t.router.mmio_offset(0, 0xFEE0_0080), Some(0x80));
        assert_eq!(t.router.mmio_offset(0, 0xFEE0_1000), None);
        assert!(t.router.wrmsr(1, 0x1b, 0xFED0_0800));
        assert_eq!(t.router.mmio_offset(1, 0xFEE0_0080), None);
        assert_eq!(t.router.mmio_offset(1, 0xFED0_0080), Some(0x80));
        assert_eq!(t.router.mmio_offset(0, 0xFEE0_0080), Some(0x80));
        let mut bus = Bus::new(BusKind::Mmio);
        let dev = Arc::new(Mutex::new(LapicMmio {
            router: t.router.clone(),
            vcpu: 0,
        }));
        bus.insert(dev.clone(), 0xFEE0_0000, APIC_MMIO_SIZE)
            .unwrap();
        assert!(bus.write(0xFEE0_0080, &0x30u32.to_le_bytes()));
        assert_eq!(rd(&t.router, 0, TPR), 0x30);
        assert_eq!(bus.device_at(0xFEE0_0000), Some("lapic"));
        assert!(dev.lock().unwrap().dump().contains("TPR 0x30"));
        assert!(t.router.dump().contains("CPU 1"));
    }

    /// Random register accesses, MSRs, messages, pins and time on three
    /// vCPUs: no panic, no lock-up, and the state stays within the
    /// registers' bounds.
    #[test]
    fn fuzz_no_panic_and_bounded_state() {
        let t = rig(3);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        t.router.set_eoi_sink(Arc::new(|_| {}));
        t.router.set_pic_ack(Arc::new(|| Some(0x20)));
        let timers = t.router.timers();
        let mut acked = 0u32;
        for step in 0..60_000u32 {
            let r = next();
            let cpu = (r >> 8) as u32 % 3;
            let v = next();
            match r % 12 {
                0 | 1 => {
                    // Mostly aligned 32-bit writes to real registers.
                    let off = if r & 0x10_0000 != 0 {
                        (v >> 40) % 0x1000
                    } else {
                        ((v >> 40) % 0x40) << 4
                    };
                    let len = [1usize, 2, 4, 4, 4, 8][(v % 6) as usize];
                    let bytes = v.to_le_bytes();
                    t.router.mmio_write(cpu, off, &bytes[..len]);
                }
                2 => {
                    let mut buf = [0u8; 8];
                    let len = [1usize, 2, 4, 8][(v % 4) as usize];
                    t.router.mmio_read(cpu, (v >> 20) % 0x1100, &mut buf[..len]);
                }
                3 => {
                    let index = match v % 4 {
                        0 => 0x1b,
                        1 => 0x6e0,
                        _ => 0x800 + ((v >> 8) % 0x100) as u32,
                    };
                    let value = match index {
                        // Keep the APICs mostly alive.
                        0x1b => [0xFEE0_0800, 0xFEE0_0C00, 0, v][(v >> 50) as usize % 4],
                        _ if r & 1 == 0 => (v >> 16) & 0xFFFF_FFFF,
                        _ => next(),
                    };
                    t.router.wrmsr(cpu, index, value);
                    let _ = t.router.rdmsr(cpu, index);
                }
                4 => {
                    let m = ApicMessage {
                        vector: v as u8,
                        delivery: DeliveryMode::from_bits((v >> 8) as u32),
                        dest_mode: if v & (1 << 11) != 0 {
                            DestMode::Logical
                        } else {
                            DestMode::Physical
                        },
                        dest: if v & (1 << 12) != 0 {
                            (v >> 32) as u32
                        } else {
                            (v >> 32) as u32 & 0xFF
                        },
                        trigger: if v & (1 << 15) != 0 {
                            TriggerMode::Level
                        } else {
                            TriggerMode::Edge
                        },
                        level: v & (1 << 14) != 0,
                        shorthand: [
                            Shorthand::None,
                            Shorthand::SelfOnly,
                            Shorthand::AllIncludingSelf,
                            Shorthand::AllExcludingSelf,
                        ][((v >> 18) & 3) as usize],
                        source: (v & (1 << 20) != 0).then_some((v >> 24) as u32 & 3),
                    };
                    t.router.deliver(&m);
                }
                5 => t.router.msi(0xFEE0_0000 | (v & 0xF_FFFF), (v >> 32) as u32),
                6 => t.router.set_lint((v % 3) as u8, v & 8 != 0),
                7 => {
                    t.clock.advance(v % 2_000_000);
                    let now = t.clock.now_ns();
                    for tm in &timers {
                        if tm.deadline().is_some_and(|d| d <= now) {
                            tm.fire(now);
                        }
                    }
                }
                8 | 9 => {
                    if t.router.interrupt_pending(cpu) {
                        if t.router.ack_interrupt(cpu).is_some() {
                            acked += 1;
                        }
                        if v & 1 == 0 {
                            w(&t.router, cpu, EOI, 0);
                            t.router.wrmsr(cpu, 0x80B, 0);
                        }
                    }
                }
                10 => {
                    if t.router.nmi_pending(cpu) {
                        t.router.ack_nmi(cpu);
                    }
                    t.router.take_init(cpu);
                    let _ = t.router.take_sipi(cpu);
                }
                _ => {
                    // Re-enable now and then so delivery paths stay live.
                    if t.router.rdmsr(cpu, 0x1b).is_some_and(|b| b & 0x800 == 0) {
                        t.router.wrmsr(cpu, 0x1b, 0xFEE0_0800);
                    }
                    w(&t.router, cpu, SVR, 0x1FF);
                    t.router.wrmsr(cpu, 0x80F, 0x1FF);
                }
            }
            if step % 97 == 0 {
                for c in 0..3u32 {
                    let l = t.router.lapic(c).unwrap();
                    let mut g = l.lock().unwrap();
                    let s = g.save_state();
                    assert_eq!(s.irr[0] & 0xFFFF, 0, "vectors 0-15 never pend");
                    assert_eq!(s.isr[0] & 0xFFFF, 0);
                    assert!(g.take_outputs().is_empty(), "the router drains outputs");
                    assert!(s.ldr & 0x00FF_FFFF == 0 && s.svr & !0x13FF == 0);
                    assert!(s.timer_divide & !0xB == 0);
                    assert!(!g.dump().is_empty());
                }
            }
        }
        assert!(acked > 100, "the fuzz delivered interrupts ({acked})");
    }
}
