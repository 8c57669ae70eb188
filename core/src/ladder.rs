//! The event-injection ladder, written once for both processors.
//!
//! Before every entry into the guest the run loop asks it what to deliver. The
//! order is that of KVM's `kvm_check_and_inject_events`:
//! 1. reinjection of an event whose delivery an exit cut short
//!    (IDT-vectoring information, SDM vol. 3, 28.2.4);
//! 2. a pending exception (the processors raise their own; nothing is queued
//!    by the machine today);
//! 3. SMI (Tandem has no SMM: never pending);
//! 4. NMI, or an NMI window when NMIs are blocked (SDM vol. 3, 25.3: blocking
//!    by NMI until IRET, and blocking by MOV SS);
//! 5. the PIC's ExtINT or the LAPIC's highest IRR above PPR, or an interrupt
//!    window when RFLAGS.IF is clear or an STI / MOV SS shadow is active
//!    (SDM vol. 3, 6.8.3).
//!
//! The acknowledgement (PIC INTA, LAPIC IRR to ISR) happens when, and only
//! when, the event is injected.

use crate::cpu::Event;
use crate::trace::{Blocker, LadderAction, LadderEvent, TraceEvent, Tracer};
use crate::vcpu::{Readiness, Vcpu, VcpuResult};

/// What INIT / SIPI ask of a processor (the LAPIC took the APIC's part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Nothing: run on.
    Run,
    /// An INIT on the BSP: reset the processor and run from the reset vector.
    Init,
    /// In wait-for-SIPI (after `init`, reset the processor first): run
    /// nothing until a SIPI.
    WaitForSipi { init: bool },
    /// A SIPI in wait-for-SIPI: start in real mode at `vector << 12`.
    Sipi(u8),
}

/// The interrupt controllers as one vCPU sees them.
pub trait InterruptSource: Send + Sync {
    /// An NMI waits for this vCPU (LINT1, an NMI IPI, IOAPIC NMI delivery).
    fn nmi_pending(&self, vcpu: u32) -> bool;
    /// Takes the pending NMI.
    fn ack_nmi(&self, vcpu: u32);
    /// A maskable interrupt waits: ExtINT from the PIC through LINT0, or a
    /// LAPIC IRR vector above the PPR.
    fn interrupt_pending(&self, vcpu: u32) -> bool;
    /// INTA: moves the interrupt into service and returns its vector, or
    /// `None` if it went away since `interrupt_pending`.
    fn ack_interrupt(&self, vcpu: u32) -> Option<u8>;
    /// Whether anything could still deliver an NMI, INIT or SMI to this
    /// vCPU; a HLT with IF clear is final when not.
    fn can_wake_masked(&self, _vcpu: u32) -> bool {
        false
    }
    /// The TPR as CR8 sees it (SDM vol. 3, 11.8.6: CR8 = TPR[7:4]), when the
    /// controllers have a TPR.
    fn cr8(&self, _vcpu: u32) -> Option<u64> {
        None
    }
    /// A MOV to CR8 the processor reported.
    fn set_cr8(&self, _vcpu: u32, _cr8: u64) {}
    /// What INIT and start-up IPIs ask of the processor at this boundary
    /// (SDM vol. 3, 9.4 and 11.6.1), taking them; one look per entry.
    fn take_startup(&self, _vcpu: u32) -> Startup {
        Startup::Run
    }
    /// For the trace: the highest requested vector the task / processor
    /// priority holds back (SDM vol. 3, 11.8.3.1), with the PPR.
    fn held_by_priority(&self, _vcpu: u32) -> Option<(u8, u8)> {
        None
    }
}

/// An interrupt system with no controllers: nothing is ever pending.
#[derive(Debug, Default)]
pub struct NoInterrupts;

impl InterruptSource for NoInterrupts {
    fn nmi_pending(&self, _vcpu: u32) -> bool {
        false
    }
    fn ack_nmi(&self, _vcpu: u32) {}
    fn interrupt_pending(&self, _vcpu: u32) -> bool {
        false
    }
    fn ack_interrupt(&self, _vcpu: u32) -> Option<u8> {
        None
    }
}

/// What the ladder did before an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The event handed to the processor for this entry, if any.
    pub injected: Option<Event>,
    /// The injected event is a reinjection of an interrupted delivery.
    pub reinjection: bool,
    /// An interrupt waits and the vCPU cannot take it yet.
    pub interrupt_window: bool,
    /// An NMI waits and the vCPU cannot take it yet.
    pub nmi_window: bool,
}

/// Runs the ladder once for `vcpu`.
pub fn inject_events(vcpu: &mut dyn Vcpu, src: &dyn InterruptSource) -> VcpuResult<Decision> {
    inject_events_traced(vcpu, src, &Tracer::off())
}

/// Why a maskable interrupt cannot go in now: RFLAGS.IF, then the shadows
/// from the interruptibility state, else an event already on its way.
fn interrupt_blocker(vcpu: &mut dyn Vcpu, ready: Readiness) -> Blocker {
    if !ready.if_flag {
        return Blocker::If;
    }
    match vcpu.get_events() {
        Ok(e) if e.interruptibility.sti => Blocker::StiShadow,
        Ok(e) if e.interruptibility.mov_ss => Blocker::MovSsShadow,
        _ => Blocker::EventInjected,
    }
}

/// Why an NMI cannot go in now: NMI blocking or a MOV SS shadow.
fn nmi_blocker(vcpu: &mut dyn Vcpu) -> Blocker {
    match vcpu.get_events() {
        Ok(e) if e.interruptibility.mov_ss => Blocker::MovSsShadow,
        _ => Blocker::NmiBlocking,
    }
}

/// Runs the ladder once for `vcpu`, recording each decision (and why an
/// event was held back) in `tracer`.
pub fn inject_events_traced(
    vcpu: &mut dyn Vcpu,
    src: &dyn InterruptSource,
    tracer: &Tracer,
) -> VcpuResult<Decision> {
    let d = ladder(vcpu, src, tracer)?;
    if tracer.enabled() {
        trace_decision(vcpu, src, tracer, &d)?;
    }
    Ok(d)
}

/// The trace of a decision: one event per pending kind of event.
fn trace_decision(
    vcpu: &mut dyn Vcpu,
    src: &dyn InterruptSource,
    tracer: &Tracer,
    d: &Decision,
) -> VcpuResult<()> {
    let cpu = vcpu.id();
    let decision = |action, event, blocked_by| TraceEvent::LadderDecision {
        cpu,
        action,
        event,
        blocked_by,
    };
    // Injections were recorded by `ladder` as they were decided, before
    // the acknowledgement they cause.
    if d.nmi_window {
        let b = if d.reinjection {
            Blocker::EventInjected
        } else {
            nmi_blocker(vcpu)
        };
        tracer.emit(decision(LadderAction::Window, LadderEvent::Nmi, Some(b)));
    }
    if d.interrupt_window {
        let b = if d.injected.is_some() {
            Blocker::EventInjected
        } else {
            let ready = vcpu.readiness()?;
            interrupt_blocker(vcpu, ready)
        };
        tracer.emit(decision(
            LadderAction::Window,
            LadderEvent::Interrupt,
            Some(b),
        ));
    } else if d.injected.is_none() {
        if let Some((vector, ppr)) = src.held_by_priority(cpu) {
            tracer.emit(decision(
                LadderAction::Held,
                LadderEvent::Interrupt,
                Some(Blocker::Ppr { vector, ppr }),
            ));
        }
    }
    Ok(())
}

/// Records the decision to inject `event` (before its acknowledgement).
fn trace_inject(tracer: &Tracer, cpu: u32, event: LadderEvent) {
    tracer.emit_with(|| TraceEvent::LadderDecision {
        cpu,
        action: LadderAction::Inject,
        event,
        blocked_by: None,
    });
}

fn ladder(vcpu: &mut dyn Vcpu, src: &dyn InterruptSource, tracer: &Tracer) -> VcpuResult<Decision> {
    let id = vcpu.id();
    let mut d = Decision {
        injected: None,
        reinjection: false,
        interrupt_window: false,
        nmi_window: false,
    };

    // 1. An interrupted delivery goes first; nothing else may be injected
    //    with it, but windows are opened for what waits behind it.
    if let Some(ev) = vcpu.idt_vectoring() {
        trace_inject(tracer, id, LadderEvent::Reinjection);
        vcpu.inject(ev)?;
        d.injected = Some(ev);
        d.reinjection = true;
    }

    let nmi_pending = src.nmi_pending(id);
    let irq_pending = src.interrupt_pending(id);
    if d.injected.is_none() && (nmi_pending || irq_pending) {
        let ready = vcpu.readiness()?;
        // 4. NMI.
        if nmi_pending {
            if ready.nmi {
                trace_inject(tracer, id, LadderEvent::Nmi);
                src.ack_nmi(id);
                let ev = Event::nmi();
                vcpu.inject(ev)?;
                d.injected = Some(ev);
            } else {
                d.nmi_window = true;
            }
        }
        // 5. Maskable interrupt, only if nothing else goes in this entry.
        if irq_pending {
            if d.injected.is_none() && ready.interrupt {
                trace_inject(tracer, id, LadderEvent::Interrupt);
                if let Some(vector) = src.ack_interrupt(id) {
                    let ev = Event::external(vector);
                    vcpu.inject(ev)?;
                    d.injected = Some(ev);
                }
            } else {
                d.interrupt_window = true;
            }
        }
    } else if d.injected.is_some() {
        d.nmi_window = nmi_pending;
        d.interrupt_window = irq_pending;
    }

    vcpu.set_nmi_window_exiting(d.nmi_window);
    vcpu.set_interrupt_window_exiting(d.interrupt_window);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::EventKind;
    use crate::testing::FakeVcpu;
    use crate::vcpu::Readiness;
    use std::sync::Mutex;

    /// A controller with a queue of vectors and an NMI flag.
    #[derive(Default)]
    struct Src {
        nmi: Mutex<bool>,
        irqs: Mutex<Vec<u8>>,
        acks: Mutex<u32>,
    }
    impl InterruptSource for Src {
        fn nmi_pending(&self, _: u32) -> bool {
            *self.nmi.lock().unwrap()
        }
        fn ack_nmi(&self, _: u32) {
            *self.nmi.lock().unwrap() = false;
        }
        fn interrupt_pending(&self, _: u32) -> bool {
            !self.irqs.lock().unwrap().is_empty()
        }
        fn ack_interrupt(&self, _: u32) -> Option<u8> {
            *self.acks.lock().unwrap() += 1;
            let mut q = self.irqs.lock().unwrap();
            (!q.is_empty()).then(|| q.remove(0))
        }
    }

    fn ready() -> Readiness {
        Readiness {
            if_flag: true,
            interrupt: true,
            nmi: true,
        }
    }

    #[test]
    fn injects_a_ready_interrupt_and_acknowledges_it_once() {
        let src = Src::default();
        src.irqs.lock().unwrap().push(0x20);
        let mut v = FakeVcpu::new(0);
        v.readiness = ready();
        let d = inject_events(&mut v, &src).unwrap();
        assert_eq!(d.injected, Some(Event::external(0x20)));
        assert_eq!(v.injected, vec![Event::external(0x20)]);
        assert_eq!(*src.acks.lock().unwrap(), 1);
        assert!(!v.interrupt_window);
    }

    #[test]
    fn opens_an_interrupt_window_without_acknowledging() {
        let src = Src::default();
        src.irqs.lock().unwrap().push(0x20);
        let mut v = FakeVcpu::new(0);
        v.readiness = Readiness {
            if_flag: false,
            interrupt: false,
            nmi: true,
        };
        let d = inject_events(&mut v, &src).unwrap();
        assert!(d.injected.is_none());
        assert!(d.interrupt_window && v.interrupt_window);
        assert_eq!(*src.acks.lock().unwrap(), 0, "INTA only on injection");
    }

    #[test]
    fn nmi_goes_before_an_interrupt_which_then_waits_for_a_window() {
        let src = Src::default();
        *src.nmi.lock().unwrap() = true;
        src.irqs.lock().unwrap().push(0x30);
        let mut v = FakeVcpu::new(0);
        v.readiness = ready();
        let d = inject_events(&mut v, &src).unwrap();
        assert_eq!(d.injected.map(|e| e.kind), Some(EventKind::Nmi));
        assert!(v.interrupt_window);
        assert!(!*src.nmi.lock().unwrap());
        assert_eq!(*src.acks.lock().unwrap(), 0);
    }

    #[test]
    fn blocked_nmi_opens_an_nmi_window_and_lets_the_interrupt_through() {
        let src = Src::default();
        *src.nmi.lock().unwrap() = true;
        src.irqs.lock().unwrap().push(0x30);
        let mut v = FakeVcpu::new(0);
        v.readiness = Readiness {
            if_flag: true,
            interrupt: true,
            nmi: false,
        };
        let d = inject_events(&mut v, &src).unwrap();
        assert!(v.nmi_window);
        assert_eq!(d.injected, Some(Event::external(0x30)));
    }

    #[test]
    fn reinjection_comes_first_and_alone() {
        let src = Src::default();
        src.irqs.lock().unwrap().push(0x40);
        let mut v = FakeVcpu::new(0);
        v.readiness = ready();
        v.vectoring = Some(Event::exception(14, Some(2)));
        let d = inject_events(&mut v, &src).unwrap();
        assert!(d.reinjection);
        assert_eq!(v.injected, vec![Event::exception(14, Some(2))]);
        assert!(v.interrupt_window, "the waiting interrupt needs a window");
        assert_eq!(*src.acks.lock().unwrap(), 0);
    }

    /// The decisions recorded for one ladder run with `v` and `src`.
    fn traced(v: &mut FakeVcpu, src: &Src) -> Vec<TraceEvent> {
        let t = Tracer::new(std::sync::Arc::new(crate::clock::VirtualClock::new()));
        let buf = t.start_memory();
        inject_events_traced(v, src, &t).unwrap();
        let evs = buf
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.event.clone())
            .collect();
        evs
    }

    fn window(blocker: Blocker, event: LadderEvent) -> TraceEvent {
        TraceEvent::LadderDecision {
            cpu: 0,
            action: LadderAction::Window,
            event,
            blocked_by: Some(blocker),
        }
    }

    #[test]
    fn trace_says_what_held_an_interrupt_back() {
        let src = Src::default();
        src.irqs.lock().unwrap().push(0x20);
        let mut v = FakeVcpu::new(0);
        assert_eq!(
            traced(&mut v, &src),
            vec![window(Blocker::If, LadderEvent::Interrupt)]
        );
        v.readiness.if_flag = true;
        v.events.interruptibility.sti = true;
        assert_eq!(
            traced(&mut v, &src),
            vec![window(Blocker::StiShadow, LadderEvent::Interrupt)]
        );
        v.events.interruptibility.sti = false;
        v.events.interruptibility.mov_ss = true;
        assert_eq!(
            traced(&mut v, &src),
            vec![window(Blocker::MovSsShadow, LadderEvent::Interrupt)]
        );
        v.readiness = ready();
        v.events.interruptibility.mov_ss = false;
        assert_eq!(
            traced(&mut v, &src),
            vec![TraceEvent::LadderDecision {
                cpu: 0,
                action: LadderAction::Inject,
                event: LadderEvent::Interrupt,
                blocked_by: None,
            }]
        );
    }

    #[test]
    fn trace_says_an_nmi_waits_for_nmi_blocking_to_end() {
        let src = Src::default();
        *src.nmi.lock().unwrap() = true;
        let mut v = FakeVcpu::new(0);
        v.readiness = Readiness {
            if_flag: true,
            interrupt: true,
            nmi: false,
        };
        v.events.interruptibility.nmi = true;
        assert_eq!(
            traced(&mut v, &src),
            vec![window(Blocker::NmiBlocking, LadderEvent::Nmi)]
        );
    }

    #[test]
    fn trace_reports_an_interrupt_held_by_the_ppr() {
        struct Held;
        impl InterruptSource for Held {
            fn nmi_pending(&self, _: u32) -> bool {
                false
            }
            fn ack_nmi(&self, _: u32) {}
            fn interrupt_pending(&self, _: u32) -> bool {
                false
            }
            fn ack_interrupt(&self, _: u32) -> Option<u8> {
                None
            }
            fn held_by_priority(&self, _: u32) -> Option<(u8, u8)> {
                Some((0x41, 0x50))
            }
        }
        let t = Tracer::new(std::sync::Arc::new(crate::clock::VirtualClock::new()));
        let buf = t.start_memory();
        let mut v = FakeVcpu::new(0);
        v.readiness = ready();
        let d = inject_events_traced(&mut v, &Held, &t).unwrap();
        assert!(d.injected.is_none() && !v.interrupt_window);
        let evs: Vec<TraceEvent> = buf
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.event.clone())
            .collect();
        assert_eq!(
            evs,
            vec![TraceEvent::LadderDecision {
                cpu: 0,
                action: LadderAction::Held,
                event: LadderEvent::Interrupt,
                blocked_by: Some(Blocker::Ppr {
                    vector: 0x41,
                    ppr: 0x50
                }),
            }]
        );
    }

    #[test]
    fn nothing_pending_closes_windows() {
        let src = Src::default();
        let mut v = FakeVcpu::new(0);
        v.interrupt_window = true;
        v.nmi_window = true;
        let d = inject_events(&mut v, &src).unwrap();
        assert!(d.injected.is_none());
        assert!(!v.interrupt_window && !v.nmi_window);
    }
}
