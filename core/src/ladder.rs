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
use crate::vcpu::{Vcpu, VcpuResult};

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
