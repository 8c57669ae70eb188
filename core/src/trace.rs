//! The interrupt trace: every step of an interrupt's life, from the line a
//! device raises to the handler's EOI, stamped with the machine clock's time
//! (ns) and a sequence number, in the same typed events on both processors.
//!
//! Devices and the run loop hold a [`Tracer`] (an `Arc` inside, cheap to
//! clone). While tracing is off an emission point costs one `Option` check
//! and one relaxed atomic load. When on, each event is stamped and handed,
//! under one lock, to a [`TraceSink`]: memory ([`Tracer::start_memory`]) or
//! a writer in one of three [`TraceFormat`]s (readable text close to QEMU's
//! `-d int`, JSON lines, Chrome trace-event JSON for Perfetto).
//!
//! The tracer also links the events of one interrupt into a *flow*: a
//! source's rising line (or an IPI, an MSI, a LAPIC timer expiry) starts
//! one, the PIC / IOAPIC / LAPIC steps and the injection continue it, the
//! handler entry ends it. The text writer prints the chain as the cause of
//! each injection; the Chrome writer draws it as arrows.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::clock::SharedClock;
use crate::cpu::{cr0, Event, EventKind, Sregs};
use crate::devices::apic_bus::{DeliveryMode, DestMode, Shorthand, TriggerMode};
use crate::irq::IrqLine;
use crate::memory::GuestMemory;
use crate::vcpu::{Vcpu, VcpuExit};

// ----- events -----------------------------------------------------------------

/// A device that drives an interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// 8254 counter 0's OUT on ISA IRQ 0.
    Pit,
    /// COM1's 16550 INTR on ISA IRQ 4.
    Uart,
    /// The MC146818 RTC's IRQ 8.
    Rtc,
    /// The i8042's keyboard IRQ 1.
    Keyboard,
    /// The ACPI SCI (IRQ 9).
    AcpiSci,
    /// pc-testdev's IRQ lines (ISA 0-15, GSI 16-23).
    Testdev,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Pit => "PIT",
            Source::Uart => "UART",
            Source::Rtc => "RTC",
            Source::Keyboard => "i8042",
            Source::AcpiSci => "ACPI",
            Source::Testdev => "testdev",
        }
    }
}

/// One of the 8259A pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PicId {
    Master,
    Slave,
}

impl PicId {
    pub fn name(self) -> &'static str {
        match self {
            PicId::Master => "PIC master",
            PicId::Slave => "PIC slave",
        }
    }
}

/// A local vector table entry (SDM vol. 3, 11.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lvt {
    Timer,
    Lint0,
    Lint1,
    Error,
    Other,
}

impl Lvt {
    pub fn name(self) -> &'static str {
        match self {
            Lvt::Timer => "timer",
            Lvt::Lint0 => "LINT0",
            Lvt::Lint1 => "LINT1",
            Lvt::Error => "error",
            Lvt::Other => "LVT",
        }
    }
}

/// What the injection ladder did before an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LadderAction {
    /// Handed the event to the processor for this entry.
    Inject,
    /// Asked for an interrupt- or NMI-window exit.
    Window,
    /// Kept it pending without a window (the LAPIC's PPR).
    Held,
}

/// Which kind of pending event a ladder decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LadderEvent {
    /// An interrupted delivery (IDT-vectoring information).
    Reinjection,
    Nmi,
    /// ExtINT from the PIC or a LAPIC IRR vector.
    Interrupt,
}

/// Why a pending event was not injected (SDM vol. 3, 6.8.3 and 25.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blocker {
    /// RFLAGS.IF is clear.
    If,
    /// Blocking by STI.
    StiShadow,
    /// Blocking by MOV SS / POP SS.
    MovSsShadow,
    /// NMI blocking (an NMI handler has not executed IRET).
    NmiBlocking,
    /// The highest IRR vector's class is not above the PPR's.
    Ppr { vector: u8, ppr: u8 },
    /// Another event goes in with this entry (or is still queued).
    EventInjected,
}

impl Blocker {
    pub fn describe(self) -> String {
        match self {
            Blocker::If => "IF=0".into(),
            Blocker::StiShadow => "STI shadow".into(),
            Blocker::MovSsShadow => "MOV SS shadow".into(),
            Blocker::NmiBlocking => "NMI blocking".into(),
            Blocker::Ppr { vector, ppr } => format!("PPR={ppr:02x} >= IRR {vector:#04x}"),
            Blocker::EventInjected => "another event is being injected".into(),
        }
    }
}

/// One step in the life of an interrupt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceEvent {
    /// A device drove its line (ISA IRQ 0-15, or GSI 16-23) to `level`.
    IrqLine {
        source: Source,
        line: u8,
        level: bool,
    },
    /// A bit of a PIC's IRR changed (`irq` in ISA numbering; `irr` after).
    PicIrr {
        chip: PicId,
        irq: u8,
        set: bool,
        irr: u8,
    },
    /// A bit of a PIC's ISR changed other than by an EOI (`isr` after).
    PicIsr {
        chip: PicId,
        irq: u8,
        set: bool,
        isr: u8,
    },
    /// The master's INT output (to LINT0) changed.
    PicInt { level: bool },
    /// An interrupt acknowledge: the vector read in the second INTA cycle
    /// and the IRQ put in service (`None`: spurious IR7 response).
    PicInta { irq: Option<u8>, vector: u8 },
    /// An OCW2 EOI (specific or not) cleared ISR bit `irq`.
    PicEoi { chip: PicId, irq: u8 },
    /// The IOAPIC sent redirection entry `pin`'s message.
    IoapicDeliver {
        pin: u8,
        vector: u8,
        dest: u32,
        dest_mode: DestMode,
        mode: DeliveryMode,
        trigger: TriggerMode,
    },
    /// Remote IRR of a level-triggered entry was set (accepted) or
    /// cleared (EOI).
    IoapicRemoteIrr { pin: u8, vector: u8, set: bool },
    /// A LAPIC sent an IPI (ICR or SELF IPI write).
    Ipi {
        from: u32,
        vector: u8,
        dest: u32,
        mode: DeliveryMode,
        shorthand: Shorthand,
    },
    /// A message-signalled interrupt was written.
    Msi { address: u64, data: u32, vector: u8 },
    /// A local interrupt of a LAPIC fired (timer expiry, LINT pin, error).
    LapicLvt {
        cpu: u32,
        lvt: Lvt,
        vector: u8,
        mode: DeliveryMode,
    },
    /// A LAPIC accepted a message (fixed: into the IRR).
    LapicAccept {
        cpu: u32,
        vector: u8,
        mode: DeliveryMode,
        trigger: TriggerMode,
    },
    /// INTA at a LAPIC: the vector moved from IRR to ISR (or the spurious
    /// vector was returned).
    LapicAck {
        cpu: u32,
        vector: u8,
        spurious: bool,
    },
    /// The injection ladder's decision for one pending event.
    LadderDecision {
        cpu: u32,
        action: LadderAction,
        event: LadderEvent,
        blocked_by: Option<Blocker>,
    },
    /// The event handed to the processor, and where the guest was.
    Inject {
        cpu: u32,
        kind: EventKind,
        vector: u8,
        error_code: Option<u32>,
        cs: u16,
        rip: u64,
        reinjection: bool,
    },
    /// The processor entered the handler: the IDT gate's target (`None`
    /// when the gate could not be read).
    Deliver {
        cpu: u32,
        vector: u8,
        handler: Option<(u16, u64)>,
    },
    /// A LAPIC EOI ended `vector`; `level` if its TMR bit was set.
    Eoi { cpu: u32, vector: u8, level: bool },
    /// The EOI of a level-triggered vector went to the IOAPICs.
    EoiBroadcast { vector: u8 },
    /// A VM exit.
    Exit { cpu: u32, reason: String },
    /// The guest wrote `value` (`size` bytes, little-endian) to `port`
    /// (one event per element of a string OUT).
    PortWrite {
        cpu: u32,
        port: u16,
        size: u8,
        value: u64,
    },
    /// The guest wrote `value` (`len` bytes) to the MMIO address `addr`.
    MmioWrite {
        cpu: u32,
        addr: u64,
        len: u8,
        value: u64,
    },
}

/// Which row of a timeline an event belongs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Track {
    Pit,
    PicMaster,
    PicSlave,
    Ioapic,
    Uart,
    Rtc,
    Keyboard,
    AcpiSci,
    Testdev,
    /// MSIs (no device of their own).
    Msi,
    Lapic(u32),
    Vcpu(u32),
}

impl Track {
    pub fn name(self) -> String {
        match self {
            Track::Pit => "PIT".into(),
            Track::PicMaster => "PIC master".into(),
            Track::PicSlave => "PIC slave".into(),
            Track::Ioapic => "IOAPIC".into(),
            Track::Uart => "UART".into(),
            Track::Rtc => "RTC".into(),
            Track::Keyboard => "i8042".into(),
            Track::AcpiSci => "ACPI".into(),
            Track::Testdev => "testdev".into(),
            Track::Msi => "MSI".into(),
            Track::Lapic(n) => format!("LAPIC {n}"),
            Track::Vcpu(n) => format!("vCPU {n}"),
        }
    }

    /// The Chrome thread id: devices first, then LAPICs, then vCPUs.
    fn tid(self) -> u64 {
        match self {
            Track::Pit => 1,
            Track::PicMaster => 2,
            Track::PicSlave => 3,
            Track::Ioapic => 4,
            Track::Uart => 5,
            Track::Rtc => 6,
            Track::Keyboard => 7,
            Track::AcpiSci => 8,
            Track::Testdev => 9,
            Track::Msi => 10,
            Track::Lapic(n) => 1000 + u64::from(n),
            Track::Vcpu(n) => 2000 + u64::from(n),
        }
    }
}

fn source_track(s: Source) -> Track {
    match s {
        Source::Pit => Track::Pit,
        Source::Uart => Track::Uart,
        Source::Rtc => Track::Rtc,
        Source::Keyboard => Track::Keyboard,
        Source::AcpiSci => Track::AcpiSci,
        Source::Testdev => Track::Testdev,
    }
}

fn pic_track(c: PicId) -> Track {
    match c {
        PicId::Master => Track::PicMaster,
        PicId::Slave => Track::PicSlave,
    }
}

/// A field value, for the JSON writers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    U(u64),
    /// Written as a "0x.." string.
    Hex(u64),
    B(bool),
    S(String),
    Null,
}

/// The chip in a description (the track already says "PIC").
fn chip_short(c: PicId) -> &'static str {
    match c {
        PicId::Master => "master",
        PicId::Slave => "slave",
    }
}

fn mode_name(m: DeliveryMode) -> &'static str {
    match m {
        DeliveryMode::Fixed => "Fixed",
        DeliveryMode::LowestPriority => "LowestPriority",
        DeliveryMode::Smi => "SMI",
        DeliveryMode::Nmi => "NMI",
        DeliveryMode::Init => "INIT",
        DeliveryMode::StartUp => "StartUp",
        DeliveryMode::ExtInt => "ExtINT",
        DeliveryMode::Reserved => "Reserved",
    }
}

fn trigger_name(t: TriggerMode) -> &'static str {
    match t {
        TriggerMode::Edge => "edge",
        TriggerMode::Level => "level",
    }
}

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::External => "external",
        EventKind::Nmi => "NMI",
        EventKind::HardwareException => "exception",
        EventKind::SoftwareInterrupt => "INT n",
        EventKind::PrivilegedSoftwareException => "INT1",
        EventKind::SoftwareException => "INT3/INTO",
    }
}

fn shorthand_name(s: Shorthand) -> &'static str {
    match s {
        Shorthand::None => "none",
        Shorthand::SelfOnly => "self",
        Shorthand::AllIncludingSelf => "all",
        Shorthand::AllExcludingSelf => "all-but-self",
    }
}

fn action_name(a: LadderAction) -> &'static str {
    match a {
        LadderAction::Inject => "inject",
        LadderAction::Window => "window",
        LadderAction::Held => "held",
    }
}

fn ladder_event_name(e: LadderEvent) -> &'static str {
    match e {
        LadderEvent::Reinjection => "reinjection",
        LadderEvent::Nmi => "NMI",
        LadderEvent::Interrupt => "interrupt",
    }
}

impl TraceEvent {
    /// The SDM / datasheet name of the event kind.
    pub fn name(&self) -> &'static str {
        match self {
            TraceEvent::IrqLine { .. } => "IrqLine",
            TraceEvent::PicIrr { .. } => "PicIrr",
            TraceEvent::PicIsr { .. } => "PicIsr",
            TraceEvent::PicInt { .. } => "PicInt",
            TraceEvent::PicInta { .. } => "PicInta",
            TraceEvent::PicEoi { .. } => "PicEoi",
            TraceEvent::IoapicDeliver { .. } => "IoapicDeliver",
            TraceEvent::IoapicRemoteIrr { .. } => "IoapicRemoteIrr",
            TraceEvent::Ipi { .. } => "Ipi",
            TraceEvent::Msi { .. } => "Msi",
            TraceEvent::LapicLvt { .. } => "LapicLvt",
            TraceEvent::LapicAccept { .. } => "LapicAccept",
            TraceEvent::LapicAck { .. } => "LapicAck",
            TraceEvent::LadderDecision { .. } => "LadderDecision",
            TraceEvent::Inject { .. } => "Inject",
            TraceEvent::Deliver { .. } => "Deliver",
            TraceEvent::Eoi { .. } => "Eoi",
            TraceEvent::EoiBroadcast { .. } => "EoiBroadcast",
            TraceEvent::Exit { .. } => "Exit",
            TraceEvent::PortWrite { .. } => "PortWrite",
            TraceEvent::MmioWrite { .. } => "MmioWrite",
        }
    }

    /// The vCPU the event belongs to, if any.
    pub fn cpu(&self) -> Option<u32> {
        match self {
            TraceEvent::LapicLvt { cpu, .. }
            | TraceEvent::LapicAccept { cpu, .. }
            | TraceEvent::LapicAck { cpu, .. }
            | TraceEvent::LadderDecision { cpu, .. }
            | TraceEvent::Inject { cpu, .. }
            | TraceEvent::Deliver { cpu, .. }
            | TraceEvent::Eoi { cpu, .. }
            | TraceEvent::Exit { cpu, .. }
            | TraceEvent::PortWrite { cpu, .. }
            | TraceEvent::MmioWrite { cpu, .. } => Some(*cpu),
            TraceEvent::Ipi { from, .. } => Some(*from),
            _ => None,
        }
    }

    /// The timeline row of the event.
    pub fn track(&self) -> Track {
        match self {
            TraceEvent::IrqLine { source, .. } => source_track(*source),
            TraceEvent::PicIrr { chip, .. }
            | TraceEvent::PicIsr { chip, .. }
            | TraceEvent::PicEoi { chip, .. } => pic_track(*chip),
            TraceEvent::PicInt { .. } | TraceEvent::PicInta { .. } => Track::PicMaster,
            TraceEvent::IoapicDeliver { .. }
            | TraceEvent::IoapicRemoteIrr { .. }
            | TraceEvent::EoiBroadcast { .. } => Track::Ioapic,
            TraceEvent::Msi { .. } => Track::Msi,
            TraceEvent::Ipi { from, .. } => Track::Lapic(*from),
            TraceEvent::LapicLvt { cpu, .. }
            | TraceEvent::LapicAccept { cpu, .. }
            | TraceEvent::LapicAck { cpu, .. }
            | TraceEvent::Eoi { cpu, .. } => Track::Lapic(*cpu),
            TraceEvent::LadderDecision { cpu, .. }
            | TraceEvent::Inject { cpu, .. }
            | TraceEvent::Deliver { cpu, .. }
            | TraceEvent::Exit { cpu, .. }
            | TraceEvent::PortWrite { cpu, .. }
            | TraceEvent::MmioWrite { cpu, .. } => Track::Vcpu(*cpu),
        }
    }

    /// The event's fields by name, for the JSON writers.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        use Value::{Hex, Null, B, S, U};
        let s = |x: &str| S(x.to_string());
        match self {
            TraceEvent::IrqLine {
                source,
                line,
                level,
            } => vec![
                ("source", s(source.name())),
                ("line", U((*line).into())),
                ("level", B(*level)),
            ],
            TraceEvent::PicIrr {
                chip,
                irq,
                set,
                irr,
            } => vec![
                ("chip", s(chip.name())),
                ("irq", U((*irq).into())),
                ("set", B(*set)),
                ("irr", Hex((*irr).into())),
            ],
            TraceEvent::PicIsr {
                chip,
                irq,
                set,
                isr,
            } => vec![
                ("chip", s(chip.name())),
                ("irq", U((*irq).into())),
                ("set", B(*set)),
                ("isr", Hex((*isr).into())),
            ],
            TraceEvent::PicInt { level } => vec![("level", B(*level))],
            TraceEvent::PicInta { irq, vector } => vec![
                ("irq", irq.map_or(Null, |i| U(i.into()))),
                ("vector", Hex((*vector).into())),
            ],
            TraceEvent::PicEoi { chip, irq } => {
                vec![("chip", s(chip.name())), ("irq", U((*irq).into()))]
            }
            TraceEvent::IoapicDeliver {
                pin,
                vector,
                dest,
                dest_mode,
                mode,
                trigger,
            } => vec![
                ("pin", U((*pin).into())),
                ("vector", Hex((*vector).into())),
                ("dest", Hex((*dest).into())),
                (
                    "dest_mode",
                    s(match dest_mode {
                        DestMode::Physical => "physical",
                        DestMode::Logical => "logical",
                    }),
                ),
                ("mode", s(mode_name(*mode))),
                ("trigger", s(trigger_name(*trigger))),
            ],
            TraceEvent::IoapicRemoteIrr { pin, vector, set } => vec![
                ("pin", U((*pin).into())),
                ("vector", Hex((*vector).into())),
                ("set", B(*set)),
            ],
            TraceEvent::Ipi {
                from,
                vector,
                dest,
                mode,
                shorthand,
            } => vec![
                ("from", U((*from).into())),
                ("vector", Hex((*vector).into())),
                ("dest", Hex((*dest).into())),
                ("mode", s(mode_name(*mode))),
                ("shorthand", s(shorthand_name(*shorthand))),
            ],
            TraceEvent::Msi {
                address,
                data,
                vector,
            } => vec![
                ("address", Hex(*address)),
                ("data", Hex((*data).into())),
                ("vector", Hex((*vector).into())),
            ],
            TraceEvent::LapicLvt {
                cpu,
                lvt,
                vector,
                mode,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("lvt", s(lvt.name())),
                ("vector", Hex((*vector).into())),
                ("mode", s(mode_name(*mode))),
            ],
            TraceEvent::LapicAccept {
                cpu,
                vector,
                mode,
                trigger,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("vector", Hex((*vector).into())),
                ("mode", s(mode_name(*mode))),
                ("trigger", s(trigger_name(*trigger))),
            ],
            TraceEvent::LapicAck {
                cpu,
                vector,
                spurious,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("vector", Hex((*vector).into())),
                ("spurious", B(*spurious)),
            ],
            TraceEvent::LadderDecision {
                cpu,
                action,
                event,
                blocked_by,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("action", s(action_name(*action))),
                ("event", s(ladder_event_name(*event))),
                ("blocked_by", blocked_by.map_or(Null, |b| S(b.describe()))),
            ],
            TraceEvent::Inject {
                cpu,
                kind,
                vector,
                error_code,
                cs,
                rip,
                reinjection,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("kind", s(kind_name(*kind))),
                ("vector", Hex((*vector).into())),
                ("error_code", error_code.map_or(Null, |e| Hex(e.into()))),
                ("cs", Hex((*cs).into())),
                ("rip", Hex(*rip)),
                ("reinjection", B(*reinjection)),
            ],
            TraceEvent::Deliver {
                cpu,
                vector,
                handler,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("vector", Hex((*vector).into())),
                ("cs", handler.map_or(Null, |h| Hex(h.0.into()))),
                ("rip", handler.map_or(Null, |h| Hex(h.1))),
            ],
            TraceEvent::Eoi { cpu, vector, level } => vec![
                ("cpu", U((*cpu).into())),
                ("vector", Hex((*vector).into())),
                ("level", B(*level)),
            ],
            TraceEvent::EoiBroadcast { vector } => vec![("vector", Hex((*vector).into()))],
            TraceEvent::Exit { cpu, reason } => {
                vec![("cpu", U((*cpu).into())), ("reason", S(reason.clone()))]
            }
            TraceEvent::PortWrite {
                cpu,
                port,
                size,
                value,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("port", Hex((*port).into())),
                ("size", U((*size).into())),
                ("value", Hex(*value)),
            ],
            TraceEvent::MmioWrite {
                cpu,
                addr,
                len,
                value,
            } => vec![
                ("cpu", U((*cpu).into())),
                ("addr", Hex(*addr)),
                ("len", U((*len).into())),
                ("value", Hex(*value)),
            ],
        }
    }

    /// One readable line, without time or track.
    pub fn describe(&self) -> String {
        let lvl = |l: bool| if l { "raised" } else { "lowered" };
        let setc = |s: bool| if s { "set" } else { "cleared" };
        match self {
            TraceEvent::IrqLine {
                source,
                line,
                level,
            } => {
                let what = if *line < 16 { "IRQ" } else { "GSI" };
                format!("{what}{line} {} by {}", lvl(*level), source.name())
            }
            TraceEvent::PicIrr {
                chip,
                irq,
                set,
                irr,
            } => format!(
                "{} IRR bit {} {} (IRR={irr:02x})",
                chip_short(*chip),
                irq & 7,
                setc(*set)
            ),
            TraceEvent::PicIsr {
                chip,
                irq,
                set,
                isr,
            } => format!(
                "{} ISR bit {} {} (ISR={isr:02x})",
                chip_short(*chip),
                irq & 7,
                setc(*set)
            ),
            TraceEvent::PicInt { level } => format!("INT {} (to LINT0)", lvl(*level)),
            TraceEvent::PicInta { irq, vector } => match irq {
                Some(i) => format!("INTA: IRQ{i} in service, vector {vector:#04x}"),
                None => format!("INTA: spurious, vector {vector:#04x}"),
            },
            TraceEvent::PicEoi { chip, irq } => {
                format!(
                    "{} EOI: ISR bit {} cleared (IRQ{irq})",
                    chip_short(*chip),
                    irq & 7
                )
            }
            TraceEvent::IoapicDeliver {
                pin,
                vector,
                dest,
                dest_mode,
                mode,
                trigger,
            } => format!(
                "IOAPIC pin {pin} -> vector {vector:#04x} dest {dest:#x} {} {} {}",
                match dest_mode {
                    DestMode::Physical => "physical",
                    DestMode::Logical => "logical",
                },
                mode_name(*mode),
                trigger_name(*trigger)
            ),
            TraceEvent::IoapicRemoteIrr { pin, vector, set } => {
                format!(
                    "IOAPIC pin {pin} remote IRR {} (vector {vector:#04x})",
                    setc(*set)
                )
            }
            TraceEvent::Ipi {
                from,
                vector,
                dest,
                mode,
                shorthand,
            } => format!(
                "IPI from APIC {from}: vector {vector:#04x} {} dest {dest:#x} shorthand {}",
                mode_name(*mode),
                shorthand_name(*shorthand)
            ),
            TraceEvent::Msi {
                address,
                data,
                vector,
            } => format!("MSI address {address:#x} data {data:#x} vector {vector:#04x}"),
            TraceEvent::LapicLvt {
                cpu,
                lvt,
                vector,
                mode,
            } => format!(
                "LAPIC {cpu} LVT {} fired: vector {vector:#04x} {}",
                lvt.name(),
                mode_name(*mode)
            ),
            TraceEvent::LapicAccept {
                cpu,
                vector,
                mode,
                trigger,
            } => format!(
                "LAPIC {cpu} accepted vector {vector:#04x} {} {} into IRR",
                mode_name(*mode),
                trigger_name(*trigger)
            ),
            TraceEvent::LapicAck {
                cpu,
                vector,
                spurious,
            } => {
                if *spurious {
                    format!("LAPIC {cpu} INTA: spurious vector {vector:#04x}")
                } else {
                    format!("LAPIC {cpu} INTA: vector {vector:#04x} IRR -> ISR")
                }
            }
            TraceEvent::LadderDecision {
                cpu,
                action,
                event,
                blocked_by,
            } => {
                let mut s = format!(
                    "ladder cpu{cpu}: {} {}",
                    ladder_event_name(*event),
                    match action {
                        LadderAction::Inject => "injected",
                        LadderAction::Window => "waits, window requested",
                        LadderAction::Held => "held back",
                    }
                );
                if let Some(b) = blocked_by {
                    let _ = write!(s, " (blocked by {})", b.describe());
                }
                s
            }
            TraceEvent::Inject {
                kind,
                vector,
                error_code,
                cs,
                rip,
                reinjection,
                ..
            } => {
                // QEMU's `-d int` line: v= e= i= IP=cs:rip.
                format!(
                    "v={vector:02x} e={:04x} i={} IP={cs:04x}:{rip:016x} ({}{})",
                    error_code.unwrap_or(0),
                    u8::from(matches!(
                        kind,
                        EventKind::SoftwareInterrupt
                            | EventKind::SoftwareException
                            | EventKind::PrivilegedSoftwareException
                    )),
                    kind_name(*kind),
                    if *reinjection { ", reinjected" } else { "" }
                )
            }
            TraceEvent::Deliver {
                vector, handler, ..
            } => match handler {
                Some((cs, rip)) => {
                    format!("delivered v={vector:02x}: handler entry {cs:04x}:{rip:016x}")
                }
                None => format!("delivered v={vector:02x}: handler not readable from the IDT"),
            },
            TraceEvent::Eoi { cpu, vector, level } => format!(
                "LAPIC {cpu} EOI vector {vector:#04x}{}",
                if *level { " (level)" } else { "" }
            ),
            TraceEvent::EoiBroadcast { vector } => {
                format!("EOI broadcast of vector {vector:#04x} to the IOAPIC")
            }
            TraceEvent::Exit { reason, .. } => format!("exit: {reason}"),
            TraceEvent::PortWrite {
                port, size, value, ..
            } => format!("out {port:#06x}/{size} = {value:#x}"),
            TraceEvent::MmioWrite {
                addr, len, value, ..
            } => format!("mmio write {addr:#x}/{len} = {value:#x}"),
        }
    }
}

/// How an event takes part in an interrupt's flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowPhase {
    Start,
    Step,
    End,
}

/// The flow an event belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRef {
    pub id: u64,
    pub phase: FlowPhase,
    /// The chain so far ("PIT IRQ0 -> PIC master IR0 -> INTA 0x20"), on
    /// injections and deliveries.
    pub cause: Option<String>,
}

/// A stamped event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceRecord {
    /// Position in the trace, from 0.
    pub seq: u64,
    /// The machine clock when the event happened (ns).
    pub ns: u64,
    pub event: TraceEvent,
    pub flow: Option<FlowRef>,
}

// ----- flows ------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Chain {
    id: u64,
    cause: String,
}

/// Links the events of one interrupt. Keys: the line (ISA IRQ or GSI) while
/// the request sits in a controller, then the vector (on any CPU, or one).
#[derive(Debug, Default)]
struct Flows {
    next: u64,
    by_line: HashMap<u8, Chain>,
    by_vector: HashMap<(Option<u32>, u8), Chain>,
}

/// The ISA IRQ (or GSI) behind IOAPIC pin `pin` on the `pc` machine.
fn pin_line(pin: u8) -> Option<u8> {
    match pin {
        0 => None,
        2 => Some(0),
        p => Some(p),
    }
}

impl Flows {
    fn start(&mut self, cause: String) -> Chain {
        self.next += 1;
        Chain {
            id: self.next,
            cause,
        }
    }

    fn flow(c: &Chain, phase: FlowPhase, with_cause: bool) -> Option<FlowRef> {
        Some(FlowRef {
            id: c.id,
            phase,
            cause: with_cause.then(|| c.cause.clone()),
        })
    }

    fn resolve(&mut self, ev: &TraceEvent) -> Option<FlowRef> {
        match *ev {
            TraceEvent::IrqLine {
                source,
                line,
                level: true,
            } => {
                let kind = if line < 16 { "IRQ" } else { "GSI" };
                let c = self.start(format!("{} {kind}{line}", source.name()));
                let f = Self::flow(&c, FlowPhase::Start, false);
                self.by_line.insert(line, c);
                f
            }
            TraceEvent::PicIrr { irq, set: true, .. } => self
                .by_line
                .get(&irq)
                .and_then(|c| Self::flow(c, FlowPhase::Step, false)),
            TraceEvent::PicInta {
                irq: Some(irq),
                vector,
            } => {
                let mut c = self.by_line.remove(&irq)?;
                let chip = if irq < 8 { "master" } else { "slave" };
                let _ = write!(
                    c.cause,
                    " -> PIC {chip} IR{} -> INTA {vector:#04x}",
                    irq & 7
                );
                let f = Self::flow(&c, FlowPhase::Step, false);
                self.by_vector.insert((None, vector), c);
                f
            }
            TraceEvent::IoapicDeliver { pin, vector, .. } => {
                let (mut c, phase) = match pin_line(pin).and_then(|l| self.by_line.remove(&l)) {
                    Some(c) => (c, FlowPhase::Step),
                    None => (self.start(String::new()), FlowPhase::Start),
                };
                if phase == FlowPhase::Step {
                    c.cause.push_str(" -> ");
                }
                let _ = write!(c.cause, "IOAPIC pin {pin} vector {vector:#04x}");
                let f = Self::flow(&c, phase, false);
                self.by_vector.insert((None, vector), c);
                f
            }
            TraceEvent::Ipi { from, vector, .. } => {
                let c = self.start(format!("IPI from APIC {from} vector {vector:#04x}"));
                let f = Self::flow(&c, FlowPhase::Start, false);
                self.by_vector.insert((None, vector), c);
                f
            }
            TraceEvent::Msi { vector, .. } => {
                let c = self.start(format!("MSI vector {vector:#04x}"));
                let f = Self::flow(&c, FlowPhase::Start, false);
                self.by_vector.insert((None, vector), c);
                f
            }
            TraceEvent::LapicLvt {
                cpu, lvt, vector, ..
            } => {
                let c = self.start(format!("LAPIC {cpu} {} vector {vector:#04x}", lvt.name()));
                let f = Self::flow(&c, FlowPhase::Start, false);
                self.by_vector.insert((Some(cpu), vector), c);
                f
            }
            TraceEvent::LapicAccept { cpu, vector, .. } => {
                let mut c = self.by_vector.remove(&(None, vector))?;
                let _ = write!(c.cause, " -> LAPIC {cpu} IRR");
                let f = Self::flow(&c, FlowPhase::Step, false);
                self.by_vector.insert((Some(cpu), vector), c);
                f
            }
            TraceEvent::Inject { cpu, vector, .. } => {
                let c = match self.by_vector.remove(&(Some(cpu), vector)) {
                    Some(c) => c,
                    None => self.by_vector.remove(&(None, vector))?,
                };
                let f = Self::flow(&c, FlowPhase::Step, true);
                self.by_vector.insert((Some(cpu), vector), c);
                f
            }
            TraceEvent::Deliver { cpu, vector, .. } => {
                let c = self.by_vector.remove(&(Some(cpu), vector))?;
                Self::flow(&c, FlowPhase::End, true)
            }
            _ => None,
        }
    }
}

// ----- sinks ------------------------------------------------------------------

/// Where stamped events go.
pub trait TraceSink: Send {
    fn record(&mut self, rec: &TraceRecord) -> io::Result<()>;
    /// Completes the output (the Chrome writer closes its array) and
    /// flushes.
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Events collected in memory.
pub type TraceBuffer = Arc<Mutex<Vec<TraceRecord>>>;

/// A sink that appends to a [`TraceBuffer`], up to a limit.
pub struct MemorySink {
    records: TraceBuffer,
    limit: usize,
}

impl MemorySink {
    /// At most `limit` records are kept (later ones are dropped), so a long
    /// run cannot exhaust memory.
    pub fn new(limit: usize) -> (MemorySink, TraceBuffer) {
        let records: TraceBuffer = Arc::new(Mutex::new(Vec::new()));
        (
            MemorySink {
                records: records.clone(),
                limit,
            },
            records,
        )
    }
}

impl TraceSink for MemorySink {
    fn record(&mut self, rec: &TraceRecord) -> io::Result<()> {
        let mut r = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() < self.limit {
            r.push(rec.clone());
        }
        Ok(())
    }
}

/// The three file formats of `--trace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// One readable line per event (`.txt`, `.log`).
    Text,
    /// One JSON object per line (`.jsonl`).
    JsonLines,
    /// Chrome trace-event JSON (`.json`) for Perfetto and chrome://tracing.
    Chrome,
}

impl TraceFormat {
    /// The format a file name asks for by its extension.
    pub fn from_path(path: &Path) -> Option<TraceFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "txt" | "log" => Some(TraceFormat::Text),
            "jsonl" => Some(TraceFormat::JsonLines),
            "json" => Some(TraceFormat::Chrome),
            _ => None,
        }
    }
}

/// Appends `s` to `out` as a JSON string literal (RFC 8259 escaping).
pub fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_value(out: &mut String, v: &Value) {
    match v {
        Value::U(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Hex(n) => {
            let _ = write!(out, "\"{n:#x}\"");
        }
        Value::B(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::S(s) => json_string(out, s),
        Value::Null => out.push_str("null"),
    }
}

fn json_fields(out: &mut String, fields: &[(&'static str, Value)]) {
    for (k, v) in fields {
        out.push(',');
        json_string(out, k);
        out.push(':');
        json_value(out, v);
    }
}

fn phase_name(p: FlowPhase) -> &'static str {
    match p {
        FlowPhase::Start => "start",
        FlowPhase::Step => "step",
        FlowPhase::End => "end",
    }
}

/// The readable text line of a record: time, sequence, track, event and,
/// on injections and deliveries, the cause.
pub fn text_line(rec: &TraceRecord) -> String {
    let mut s = format!(
        "{:>10}.{:03} us #{:<6} {:<10} {}",
        rec.ns / 1000,
        rec.ns % 1000,
        rec.seq,
        rec.event.track().name(),
        rec.event.describe()
    );
    if let Some(f) = &rec.flow {
        if let Some(c) = &f.cause {
            let _ = write!(s, " cause: {c}");
        }
    }
    s
}

/// The JSON-lines object of a record.
pub fn json_line(rec: &TraceRecord) -> String {
    let mut s = String::with_capacity(160);
    let _ = write!(s, "{{\"seq\":{},\"ns\":{},\"event\":", rec.seq, rec.ns);
    json_string(&mut s, rec.event.name());
    s.push_str(",\"track\":");
    json_string(&mut s, &rec.event.track().name());
    json_fields(&mut s, &rec.event.fields());
    if let Some(f) = &rec.flow {
        let _ = write!(s, ",\"flow\":{},\"flow_phase\":", f.id);
        json_string(&mut s, phase_name(f.phase));
        if let Some(c) = &f.cause {
            s.push_str(",\"cause\":");
            json_string(&mut s, c);
        }
    }
    s.push('}');
    s
}

/// Microseconds with nanosecond precision, as Chrome's "ts" wants them.
fn micros(ns: u64) -> String {
    format!("{}.{:03}", ns / 1000, ns % 1000)
}

/// The process id every Chrome event carries.
const CHROME_PID: u64 = 1;

/// The Chrome trace-event objects of a record: "M" metadata for a track
/// seen for the first time, then an "X" slice (with a flow binding) or an
/// "i" instant.
fn chrome_events(rec: &TraceRecord, seen: &mut BTreeSet<Track>, out: &mut Vec<String>) {
    let track = rec.event.track();
    let tid = track.tid();
    if seen.is_empty() {
        let mut m = format!(
            "{{\"ph\":\"M\",\"pid\":{CHROME_PID},\"tid\":0,\"ts\":0,\"name\":\"process_name\",\"args\":{{\"name\":"
        );
        json_string(&mut m, "tandem interrupts");
        m.push_str("}}");
        out.push(m);
    }
    if seen.insert(track) {
        let mut m = format!(
            "{{\"ph\":\"M\",\"pid\":{CHROME_PID},\"tid\":{tid},\"ts\":0,\"name\":\"thread_name\",\"args\":{{\"name\":"
        );
        json_string(&mut m, &track.name());
        m.push_str("}}");
        out.push(m);
        out.push(format!(
            "{{\"ph\":\"M\",\"pid\":{CHROME_PID},\"tid\":{tid},\"ts\":0,\"name\":\"thread_sort_index\",\"args\":{{\"sort_index\":{tid}}}}}"
        ));
    }
    let mut e = String::with_capacity(200);
    e.push_str("{\"name\":");
    json_string(&mut e, &rec.event.describe());
    e.push_str(",\"cat\":\"interrupt\"");
    let ts = micros(rec.ns);
    match &rec.flow {
        Some(f) => {
            // A zero-length slice carrying the flow binding (flow events
            // v2: "bind_id" with "flow_out" / "flow_in"), which Perfetto and
            // chrome://tracing draw as an arrow from the source to the
            // handler entry.
            let _ = write!(
                e,
                ",\"ph\":\"X\",\"ts\":{ts},\"dur\":0,\"pid\":{CHROME_PID},\"tid\":{tid},\"bind_id\":\"{:#x}\"",
                f.id
            );
            if f.phase != FlowPhase::Start {
                e.push_str(",\"flow_in\":true");
            }
            if f.phase != FlowPhase::End {
                e.push_str(",\"flow_out\":true");
            }
        }
        None => {
            let _ = write!(
                e,
                ",\"ph\":\"i\",\"s\":\"t\",\"ts\":{ts},\"pid\":{CHROME_PID},\"tid\":{tid}"
            );
        }
    }
    let _ = write!(e, ",\"args\":{{\"seq\":{}", rec.seq);
    e.push_str(",\"event\":");
    json_string(&mut e, rec.event.name());
    json_fields(&mut e, &rec.event.fields());
    if let Some(c) = rec.flow.as_ref().and_then(|f| f.cause.as_ref()) {
        e.push_str(",\"cause\":");
        json_string(&mut e, c);
    }
    e.push_str("}}");
    out.push(e);
}

/// A sink streaming one of the three formats to a writer.
pub struct WriterSink {
    format: TraceFormat,
    out: Box<dyn Write + Send>,
    /// Chrome: tracks already named, and whether an element was written.
    seen: BTreeSet<Track>,
    started: bool,
    any: bool,
}

impl WriterSink {
    pub fn new(format: TraceFormat, out: Box<dyn Write + Send>) -> WriterSink {
        WriterSink {
            format,
            out,
            seen: BTreeSet::new(),
            started: false,
            any: false,
        }
    }

    fn open(&mut self) -> io::Result<()> {
        if !self.started && self.format == TraceFormat::Chrome {
            self.out.write_all(b"{\"traceEvents\":[\n")?;
        }
        self.started = true;
        Ok(())
    }
}

impl TraceSink for WriterSink {
    fn record(&mut self, rec: &TraceRecord) -> io::Result<()> {
        self.open()?;
        match self.format {
            TraceFormat::Text => writeln!(self.out, "{}", text_line(rec)),
            TraceFormat::JsonLines => writeln!(self.out, "{}", json_line(rec)),
            TraceFormat::Chrome => {
                let mut evs = Vec::new();
                chrome_events(rec, &mut self.seen, &mut evs);
                for e in evs {
                    if self.any {
                        self.out.write_all(b",\n")?;
                    }
                    self.any = true;
                    self.out.write_all(e.as_bytes())?;
                }
                Ok(())
            }
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.open()?;
        if self.format == TraceFormat::Chrome {
            self.out.write_all(b"\n],\"displayTimeUnit\":\"ns\"}\n")?;
        }
        self.out.flush()
    }
}

/// Renders `records` in `format` (what a [`WriterSink`] would have
/// written).
pub fn render(format: TraceFormat, records: &[TraceRecord]) -> String {
    let buf = SharedBuf::default();
    let mut sink = WriterSink::new(format, Box::new(buf.clone()));
    for r in records {
        let _ = sink.record(r);
    }
    let _ = sink.finish();
    buf.text()
}

/// A cloneable in-memory writer (for [`render`] and tests).
#[derive(Debug, Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl SharedBuf {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

// ----- the tracer -------------------------------------------------------------

struct State {
    seq: u64,
    sink: Option<Box<dyn TraceSink>>,
    flows: Flows,
    /// The last ladder decision per vCPU: a decision repeated at every exit
    /// (a window the guest keeps closed) is recorded once.
    last_decision: HashMap<u32, TraceEvent>,
    error: Option<io::Error>,
}

struct Inner {
    on: AtomicBool,
    clock: SharedClock,
    state: Mutex<State>,
}

/// The handle devices and the run loop emit through. `Tracer::default()`
/// is off for good; [`Tracer::new`] can be started later.
#[derive(Clone, Default)]
pub struct Tracer {
    inner: Option<Arc<Inner>>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl Tracer {
    /// A tracer that never records (no allocation).
    pub fn off() -> Tracer {
        Tracer { inner: None }
    }

    /// A tracer stamping with `clock`, off until [`Tracer::start`].
    pub fn new(clock: SharedClock) -> Tracer {
        Tracer {
            inner: Some(Arc::new(Inner {
                on: AtomicBool::new(false),
                clock,
                state: Mutex::new(State {
                    seq: 0,
                    sink: None,
                    flows: Flows::default(),
                    last_decision: HashMap::new(),
                    error: None,
                }),
            })),
        }
    }

    /// Whether events are recorded now: one `Option` check and one relaxed
    /// load, the whole cost of an emission point while tracing is off.
    #[inline]
    pub fn enabled(&self) -> bool {
        match &self.inner {
            Some(i) => i.on.load(Ordering::Relaxed),
            None => false,
        }
    }

    fn lock(inner: &Inner) -> MutexGuard<'_, State> {
        inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts recording into `sink` (replacing an earlier one, which is
    /// finished first). Does nothing on [`Tracer::off`].
    pub fn start(&self, sink: Box<dyn TraceSink>) -> io::Result<()> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let mut st = Self::lock(inner);
        let old = st.sink.replace(sink);
        inner.on.store(true, Ordering::Relaxed);
        drop(st);
        match old {
            Some(mut s) => s.finish(),
            None => Ok(()),
        }
    }

    /// Starts recording into memory; returns the buffer.
    pub fn start_memory(&self) -> TraceBuffer {
        let (sink, buf) = MemorySink::new(1 << 20);
        let _ = self.start(Box::new(sink));
        buf
    }

    /// Stops recording, completes the output and returns the first write
    /// error, if any.
    pub fn finish(&self) -> io::Result<()> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        inner.on.store(false, Ordering::Relaxed);
        let mut st = Self::lock(inner);
        let sink = st.sink.take();
        let err = st.error.take();
        drop(st);
        let r = match sink {
            Some(mut s) => s.finish(),
            None => Ok(()),
        };
        match err {
            Some(e) => Err(e),
            None => r,
        }
    }

    /// Records `ev` if tracing is on.
    #[inline]
    pub fn emit(&self, ev: TraceEvent) {
        if self.enabled() {
            self.record(ev);
        }
    }

    /// Records the event `f` builds, building it only if tracing is on.
    #[inline]
    pub fn emit_with(&self, f: impl FnOnce() -> TraceEvent) {
        if self.enabled() {
            self.record(f());
        }
    }

    #[cold]
    fn record(&self, ev: TraceEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut st = Self::lock(inner);
        if let TraceEvent::LadderDecision { cpu, action, .. } = &ev {
            // Every injection is recorded; a window or a hold repeated at
            // each exit only when it changes.
            if *action == LadderAction::Inject {
                st.last_decision.remove(cpu);
            } else if st.last_decision.get(cpu) == Some(&ev) {
                return;
            } else {
                st.last_decision.insert(*cpu, ev.clone());
            }
        }
        // Time is read under the lock so that sequence and time agree.
        let ns = inner.clock.now_ns();
        let flow = st.flows.resolve(&ev);
        let rec = TraceRecord {
            seq: st.seq,
            ns,
            event: ev,
            flow,
        };
        st.seq += 1;
        let st = &mut *st;
        if let Some(sink) = st.sink.as_mut() {
            if let Err(e) = sink.record(&rec) {
                // The first error is reported at `finish`; recording stops.
                st.error.get_or_insert(e);
                inner.on.store(false, Ordering::Relaxed);
            }
        }
    }

    /// The run loop's record of an injection: the event with the guest's
    /// CS:RIP, and the handler entry the processor will reach (from the
    /// IDT, so both processors report the same address), to be emitted
    /// with [`Tracer::emit`] after the next entry. `None` when off.
    pub fn injection(
        &self,
        mem: &GuestMemory,
        vcpu: &mut dyn Vcpu,
        event: Event,
        reinjection: bool,
    ) -> Option<TraceEvent> {
        if !self.enabled() {
            return None;
        }
        let cpu = vcpu.id();
        let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        let sregs = vcpu.get_sregs().unwrap_or_default();
        self.record(TraceEvent::Inject {
            cpu,
            kind: event.kind,
            vector: event.vector,
            error_code: event.error_code,
            cs: sregs.cs.selector,
            rip,
            reinjection,
        });
        Some(TraceEvent::Deliver {
            cpu,
            vector: event.vector,
            handler: idt_handler(mem, &sregs, event.vector),
        })
    }

    /// Records a VM exit.
    #[inline]
    pub fn exit(&self, cpu: u32, exit: &VcpuExit) {
        if self.enabled() {
            self.record(TraceEvent::Exit {
                cpu,
                reason: exit_reason(exit),
            });
        }
    }
}

/// A short description of an exit.
pub fn exit_reason(exit: &VcpuExit) -> String {
    match exit {
        VcpuExit::IoIn { port, size, .. } => format!("io in {port:#x}/{size}"),
        VcpuExit::IoOut { port, size, .. } => format!("io out {port:#x}/{size}"),
        VcpuExit::MmioRead { addr, len } => format!("mmio read {addr:#x}/{len}"),
        VcpuExit::MmioWrite { addr, len } => format!("mmio write {addr:#x}/{len}"),
        VcpuExit::RdMsr { index } => format!("rdmsr {index:#x}"),
        VcpuExit::WrMsr { index, value } => format!("wrmsr {index:#x} = {value:#x}"),
        VcpuExit::Hlt => "hlt".into(),
        VcpuExit::InterruptWindow => "interrupt window".into(),
        VcpuExit::NmiWindow => "NMI window".into(),
        VcpuExit::Shutdown => "shutdown".into(),
        VcpuExit::Debug { exception, rip, .. } => format!("debug #{exception} at {rip:#x}"),
        VcpuExit::Kicked => "kicked".into(),
        VcpuExit::TprLowered => "TPR lowered".into(),
        VcpuExit::EmulationFailure { .. } => "emulation failure".into(),
        VcpuExit::InternalError { suberror, .. } => format!("internal error {suberror}"),
        VcpuExit::FailEntry { reason } => format!("entry failed {reason:#x}"),
        VcpuExit::Unhandled(w) => format!("unhandled: {w}"),
    }
}

/// The entry point of `vector`'s handler as the guest's IDT (or real-mode
/// IVT) gives it: (CS selector, offset). `None` beyond the IDT limit, for a
/// not-present gate or a task gate, or when the table is not readable.
/// Gate layouts: SDM vol. 3, 6.11 (32-bit) and 6.14.1 (64-bit); IVT: 20.1.4.
pub fn idt_handler(mem: &GuestMemory, sregs: &Sregs, vector: u8) -> Option<(u16, u64)> {
    let v = u64::from(vector);
    let limit = u64::from(sregs.idt.limit);
    if sregs.cr0 & cr0::PE == 0 {
        // Real mode: 4-byte IVT entries, offset then segment.
        if v * 4 + 3 > limit {
            return None;
        }
        let mut b = [0u8; 4];
        if crate::paging::read_linear(mem, sregs, sregs.idt.base + v * 4, &mut b) != 4 {
            return None;
        }
        return Some((
            u16::from_le_bytes([b[2], b[3]]),
            u64::from(u16::from_le_bytes([b[0], b[1]])),
        ));
    }
    let size = if sregs.long_mode() { 16 } else { 8 };
    if v * size + size - 1 > limit {
        return None;
    }
    let mut b = [0u8; 16];
    let want = size as usize;
    let buf = b.get_mut(..want)?;
    if crate::paging::read_linear(mem, sregs, sregs.idt.base.wrapping_add(v * size), buf) != want {
        return None;
    }
    let present = b[5] & 0x80 != 0;
    let gate_type = b[5] & 0xf;
    if !present || gate_type == 5 {
        return None;
    }
    let selector = u16::from_le_bytes([b[2], b[3]]);
    let mut offset = u64::from(u16::from_le_bytes([b[0], b[1]]))
        | (u64::from(u16::from_le_bytes([b[6], b[7]])) << 16);
    if size == 16 {
        offset |= u64::from(u32::from_le_bytes([b[8], b[9], b[10], b[11]])) << 32;
    } else if gate_type & 8 == 0 {
        // A 16-bit interrupt or trap gate: offset 15:0 only.
        offset &= 0xffff;
    }
    Some((selector, offset))
}

/// An [`IrqLine`] that records each level change of a device's line before
/// passing it on.
pub struct TracedLine {
    inner: Arc<dyn IrqLine>,
    tracer: Tracer,
    source: Source,
    line: u8,
    level: AtomicBool,
}

impl TracedLine {
    /// `inner`, with the changes of its level recorded as `source`'s line
    /// `line`.
    pub fn wrap(
        inner: Arc<dyn IrqLine>,
        tracer: Tracer,
        source: Source,
        line: u8,
    ) -> Arc<dyn IrqLine> {
        Arc::new(TracedLine {
            inner,
            tracer,
            source,
            line,
            level: AtomicBool::new(false),
        })
    }
}

impl IrqLine for TracedLine {
    fn set_level(&self, level: bool) {
        // Only changes are events (a device may drive its level again).
        if self.level.swap(level, Ordering::Relaxed) != level {
            self.tracer.emit(TraceEvent::IrqLine {
                source: self.source,
                line: self.line,
                level,
            });
        }
        self.inner.set_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;

    /// A minimal JSON parser: enough to check that every writer's output
    /// is valid JSON and to look at its structure.
    #[derive(Debug, Clone, PartialEq)]
    enum Json {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<Json>),
        Obj(Vec<(String, Json)>),
    }

    impl Json {
        fn get(&self, k: &str) -> Option<&Json> {
            match self {
                Json::Obj(v) => v.iter().find(|(n, _)| n == k).map(|(_, j)| j),
                _ => None,
            }
        }
        fn str(&self) -> Option<&str> {
            match self {
                Json::Str(s) => Some(s),
                _ => None,
            }
        }
        fn num(&self) -> Option<f64> {
            match self {
                Json::Num(n) => Some(*n),
                _ => None,
            }
        }
    }

    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl P<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn eat(&mut self, c: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected {} at {}", c as char, self.i))
            }
        }
        fn value(&mut self) -> Result<Json, String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'{') => {
                    self.i += 1;
                    let mut v = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b'}') {
                        self.i += 1;
                        return Ok(Json::Obj(v));
                    }
                    loop {
                        self.ws();
                        let k = match self.value()? {
                            Json::Str(s) => s,
                            _ => return Err("key".into()),
                        };
                        self.eat(b':')?;
                        v.push((k, self.value()?));
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b'}') => {
                                self.i += 1;
                                return Ok(Json::Obj(v));
                            }
                            _ => return Err(format!("object at {}", self.i)),
                        }
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    let mut v = Vec::new();
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(Json::Arr(v));
                    }
                    loop {
                        v.push(self.value()?);
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(Json::Arr(v));
                            }
                            _ => return Err(format!("array at {}", self.i)),
                        }
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    let mut out = String::new();
                    loop {
                        let c = *self.s.get(self.i).ok_or("eof in string")?;
                        self.i += 1;
                        match c {
                            b'"' => return Ok(Json::Str(out)),
                            b'\\' => {
                                let e = *self.s.get(self.i).ok_or("eof")?;
                                self.i += 1;
                                match e {
                                    b'"' => out.push('"'),
                                    b'\\' => out.push('\\'),
                                    b'/' => out.push('/'),
                                    b'n' => out.push('\n'),
                                    b'r' => out.push('\r'),
                                    b't' => out.push('\t'),
                                    b'b' => out.push('\u{8}'),
                                    b'f' => out.push('\u{c}'),
                                    b'u' => {
                                        let h = std::str::from_utf8(
                                            self.s.get(self.i..self.i + 4).ok_or("eof")?,
                                        )
                                        .map_err(|e| e.to_string())?;
                                        let n = u32::from_str_radix(h, 16)
                                            .map_err(|e| e.to_string())?;
                                        out.push(char::from_u32(n).ok_or("bad \\u")?);
                                        self.i += 4;
                                    }
                                    _ => return Err("bad escape".into()),
                                }
                            }
                            c if c < 0x20 => return Err("control char in string".into()),
                            _ => {
                                // Re-decode UTF-8 sequences byte-wise.
                                let start = self.i - 1;
                                let mut end = self.i;
                                while end < self.s.len() && (self.s[end] & 0xc0) == 0x80 {
                                    end += 1;
                                }
                                out.push_str(
                                    std::str::from_utf8(&self.s[start..end])
                                        .map_err(|e| e.to_string())?,
                                );
                                self.i = end;
                            }
                        }
                    }
                }
                Some(b't') if self.s[self.i..].starts_with(b"true") => {
                    self.i += 4;
                    Ok(Json::Bool(true))
                }
                Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                    self.i += 5;
                    Ok(Json::Bool(false))
                }
                Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                    self.i += 4;
                    Ok(Json::Null)
                }
                Some(c) if *c == b'-' || c.is_ascii_digit() => {
                    let start = self.i;
                    while self.i < self.s.len()
                        && matches!(
                            self.s[self.i],
                            b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                        )
                    {
                        self.i += 1;
                    }
                    let t =
                        std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                    t.parse().map(Json::Num).map_err(|e| format!("{e}: {t}"))
                }
                _ => Err(format!("unexpected at {}", self.i)),
            }
        }
    }

    fn parse(s: &str) -> Result<Json, String> {
        let mut p = P {
            s: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }

    /// One PIT tick through the PIC, as the devices and the run loop emit
    /// it, plus an exit with a string that needs escaping.
    fn tick_events() -> Vec<TraceEvent> {
        vec![
            TraceEvent::IrqLine {
                source: Source::Pit,
                line: 0,
                level: true,
            },
            TraceEvent::PicIrr {
                chip: PicId::Master,
                irq: 0,
                set: true,
                irr: 1,
            },
            TraceEvent::PicInt { level: true },
            TraceEvent::LadderDecision {
                cpu: 0,
                action: LadderAction::Inject,
                event: LadderEvent::Interrupt,
                blocked_by: None,
            },
            TraceEvent::PicInta {
                irq: Some(0),
                vector: 0x20,
            },
            TraceEvent::Inject {
                cpu: 0,
                kind: EventKind::External,
                vector: 0x20,
                error_code: None,
                cs: 8,
                rip: 0x1000,
                reinjection: false,
            },
            TraceEvent::Deliver {
                cpu: 0,
                vector: 0x20,
                handler: Some((8, 0x2000)),
            },
            TraceEvent::Exit {
                cpu: 0,
                reason: "unhandled: \"quote\" \\ tab\t\u{1}".into(),
            },
            TraceEvent::PicEoi {
                chip: PicId::Master,
                irq: 0,
            },
        ]
    }

    fn record_all(events: Vec<TraceEvent>) -> Vec<TraceRecord> {
        let clock = Arc::new(VirtualClock::new());
        let t = Tracer::new(clock.clone());
        let buf = t.start_memory();
        for e in events {
            clock.advance(1500);
            t.emit(e);
        }
        t.finish().unwrap();
        let r = buf.lock().unwrap().clone();
        r
    }

    #[test]
    fn off_tracer_records_nothing_and_costs_no_allocation() {
        let t = Tracer::off();
        assert!(!t.enabled());
        t.emit(TraceEvent::EoiBroadcast { vector: 1 });
        let clock = Arc::new(VirtualClock::new());
        let t = Tracer::new(clock);
        assert!(!t.enabled(), "a new tracer is off until started");
        let buf = t.start_memory();
        assert!(t.enabled());
        t.emit(TraceEvent::EoiBroadcast { vector: 1 });
        t.finish().unwrap();
        assert!(!t.enabled());
        t.emit(TraceEvent::EoiBroadcast { vector: 2 });
        assert_eq!(buf.lock().unwrap().len(), 1);
    }

    #[test]
    fn records_are_stamped_in_order_and_flows_link_source_to_handler() {
        let recs = record_all(tick_events());
        assert_eq!(recs.len(), 9);
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64);
            assert_eq!(r.ns, 1500 * (i as u64 + 1));
        }
        let flow_of = |i: usize| recs[i].flow.clone();
        let start = flow_of(0).expect("the raise starts a flow");
        assert_eq!(start.phase, FlowPhase::Start);
        for i in [1, 4, 5] {
            let f = flow_of(i).unwrap_or_else(|| panic!("event {i} in the flow"));
            assert_eq!((f.id, f.phase), (start.id, FlowPhase::Step));
        }
        let end = flow_of(6).unwrap();
        assert_eq!((end.id, end.phase), (start.id, FlowPhase::End));
        assert_eq!(
            end.cause.as_deref(),
            Some("PIT IRQ0 -> PIC master IR0 -> INTA 0x20")
        );
        assert!(flow_of(7).is_none() && flow_of(8).is_none());
    }

    #[test]
    fn repeated_ladder_decisions_are_recorded_once() {
        let d = TraceEvent::LadderDecision {
            cpu: 0,
            action: LadderAction::Window,
            event: LadderEvent::Interrupt,
            blocked_by: Some(Blocker::If),
        };
        let recs = record_all(vec![
            d.clone(),
            d.clone(),
            TraceEvent::LadderDecision {
                cpu: 0,
                action: LadderAction::Inject,
                event: LadderEvent::Interrupt,
                blocked_by: None,
            },
            d,
        ]);
        assert_eq!(recs.len(), 3);
    }

    #[test]
    fn text_writer_prints_qemu_style_injections_with_their_cause() {
        let text = render(TraceFormat::Text, &record_all(tick_events()));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 9);
        assert!(lines[0].contains("PIT") && lines[0].contains("IRQ0 raised by PIT"));
        assert!(lines[0].starts_with("         1.500 us #0"), "{}", lines[0]);
        assert!(lines[1].contains("PIC master master IRR bit 0 set (IRR=01)"));
        let inj = lines[5];
        assert!(
            inj.contains("v=20 e=0000 i=0 IP=0008:0000000000001000 (external)"),
            "{inj}"
        );
        assert!(inj.contains("cause: PIT IRQ0 -> PIC master IR0 -> INTA 0x20"));
        assert!(lines[6].contains("handler entry 0008:0000000000002000"));
        assert!(lines[8].contains("EOI"));
    }

    #[test]
    fn json_lines_are_valid_json_with_escaped_strings() {
        let text = render(TraceFormat::JsonLines, &record_all(tick_events()));
        let objs: Vec<Json> = text
            .lines()
            .map(|l| parse(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(objs.len(), 9);
        assert_eq!(objs[0].get("event").and_then(Json::str), Some("IrqLine"));
        assert_eq!(objs[0].get("source").and_then(Json::str), Some("PIT"));
        assert_eq!(objs[0].get("level"), Some(&Json::Bool(true)));
        assert_eq!(objs[5].get("vector").and_then(Json::str), Some("0x20"));
        assert_eq!(objs[5].get("rip").and_then(Json::str), Some("0x1000"));
        assert_eq!(objs[6].get("flow_phase").and_then(Json::str), Some("end"));
        assert_eq!(
            objs[7].get("reason").and_then(Json::str),
            Some("unhandled: \"quote\" \\ tab\t\u{1}")
        );
        assert_eq!(objs[4].get("seq").and_then(Json::num), Some(4.0));
    }

    #[test]
    fn chrome_trace_has_tracks_timestamps_and_matched_flows() {
        let text = render(TraceFormat::Chrome, &record_all(tick_events()));
        let root = parse(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
        let Some(Json::Arr(evs)) = root.get("traceEvents") else {
            panic!("no traceEvents array");
        };
        let mut names = Vec::new();
        let mut flow_out = Vec::new();
        let mut flow_in = Vec::new();
        let mut real = 0;
        for e in evs {
            let ph = e.get("ph").and_then(Json::str).expect("ph");
            assert!(e.get("pid").and_then(Json::num).is_some(), "pid: {e:?}");
            assert!(e.get("tid").and_then(Json::num).is_some(), "tid: {e:?}");
            assert!(e.get("ts").and_then(Json::num).is_some(), "ts: {e:?}");
            match ph {
                "M" => {
                    if e.get("name").and_then(Json::str) == Some("thread_name") {
                        let n = e
                            .get("args")
                            .and_then(|a| a.get("name"))
                            .and_then(Json::str);
                        names.push(n.unwrap().to_string());
                    }
                }
                "X" | "i" => {
                    real += 1;
                    let id = e.get("bind_id").and_then(Json::str).map(str::to_string);
                    if e.get("flow_out") == Some(&Json::Bool(true)) {
                        flow_out.push(id.clone().unwrap());
                    }
                    if e.get("flow_in") == Some(&Json::Bool(true)) {
                        flow_in.push(id.unwrap());
                    }
                }
                other => panic!("unexpected phase {other}"),
            }
        }
        assert_eq!(real, 9);
        for t in ["PIT", "PIC master", "vCPU 0"] {
            assert!(names.iter().any(|n| n == t), "track {t} named: {names:?}");
        }
        // Raise, IRR, INTA, inject: out; IRR, INTA, inject, deliver: in.
        assert_eq!(flow_out.len(), 4);
        assert_eq!(flow_in.len(), 4);
        assert!(flow_out.iter().chain(&flow_in).all(|i| *i == flow_out[0]));
        // ts in microseconds: the first event at 1500 ns.
        let first = evs
            .iter()
            .find(|e| e.get("ph").and_then(Json::str) == Some("X"))
            .unwrap();
        assert_eq!(first.get("ts").and_then(Json::num), Some(1.5));
    }

    #[test]
    fn empty_chrome_trace_is_still_valid() {
        let root = parse(&render(TraceFormat::Chrome, &[])).unwrap();
        assert_eq!(root.get("traceEvents"), Some(&Json::Arr(vec![])));
    }

    #[test]
    fn format_from_extension() {
        assert_eq!(
            TraceFormat::from_path(Path::new("a/out.txt")),
            Some(TraceFormat::Text)
        );
        assert_eq!(
            TraceFormat::from_path(Path::new("out.JSONL")),
            Some(TraceFormat::JsonLines)
        );
        assert_eq!(
            TraceFormat::from_path(Path::new("out.json")),
            Some(TraceFormat::Chrome)
        );
        assert_eq!(TraceFormat::from_path(Path::new("out.bin")), None);
        assert_eq!(TraceFormat::from_path(Path::new("out")), None);
    }

    #[test]
    fn idt_gates_in_every_mode() {
        use crate::cpu::{efer, Segment};
        let m = GuestMemory::new(1 << 20).unwrap();
        // Real mode IVT at 0: vector 8 -> f000:fea5.
        m.write_u16(8 * 4, 0xfea5).unwrap();
        m.write_u16(8 * 4 + 2, 0xf000).unwrap();
        let mut s = Sregs::default();
        s.idt.limit = 0x3ff;
        assert_eq!(idt_handler(&m, &s, 8), Some((0xf000, 0xfea5)));
        // 32-bit interrupt gate at 0x1000 for vector 0x20.
        s.cr0 = cr0::PE;
        s.cs = Segment::flat(8, 0xb, false);
        s.idt.base = 0x1000;
        s.idt.limit = 0x7ff;
        let g = 0x1000 + 0x20 * 8;
        m.write(g, &[0x34, 0x12, 0x08, 0x00, 0x00, 0x8e, 0x78, 0x56])
            .unwrap();
        assert_eq!(idt_handler(&m, &s, 0x20), Some((8, 0x5678_1234)));
        // Not present, task gate, beyond the limit.
        m.write(g + 8, &[0, 0, 8, 0, 0, 0x0e, 0, 0]).unwrap();
        assert_eq!(idt_handler(&m, &s, 0x21), None);
        m.write(g + 16, &[0, 0, 8, 0, 0, 0x85, 0, 0]).unwrap();
        assert_eq!(idt_handler(&m, &s, 0x22), None);
        s.idt.limit = 0x20 * 8 + 6;
        assert_eq!(idt_handler(&m, &s, 0x20), None);
        // 64-bit gate (paging needs tables; identity-map 0-2 MiB).
        m.write_u64(0x10000, 0x11003).unwrap();
        m.write_u64(0x11000, 0x12003).unwrap();
        m.write_u64(0x12000, 0x83).unwrap();
        s.cr0 = cr0::PE | cr0::PG;
        s.cr4 = crate::cpu::cr4::PAE;
        s.cr3 = 0x10000;
        s.efer = efer::LME | efer::LMA;
        s.idt.base = 0x2000;
        s.idt.limit = 0xfff;
        let g = 0x2000 + 0x30 * 16;
        m.write(
            g,
            &[
                0xef, 0xbe, 0x10, 0x00, 0x00, 0x8e, 0xad, 0xde, 0x01, 0x00, 0x00, 0x00, 0, 0, 0, 0,
            ],
        )
        .unwrap();
        assert_eq!(idt_handler(&m, &s, 0x30), Some((0x10, 0x1_dead_beef)));
    }

    #[test]
    fn traced_line_records_changes_only_and_passes_every_call_on() {
        #[derive(Default)]
        struct Count(std::sync::atomic::AtomicUsize);
        impl IrqLine for Count {
            fn set_level(&self, _: bool) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let clock = Arc::new(VirtualClock::new());
        let t = Tracer::new(clock);
        let buf = t.start_memory();
        let inner = Arc::new(Count::default());
        let l = TracedLine::wrap(inner.clone(), t.clone(), Source::Uart, 4);
        l.raise();
        l.raise();
        l.lower();
        assert_eq!(inner.0.load(Ordering::Relaxed), 3);
        let evs: Vec<TraceEvent> = buf
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.event.clone())
            .collect();
        assert_eq!(
            evs,
            vec![
                TraceEvent::IrqLine {
                    source: Source::Uart,
                    line: 4,
                    level: true
                },
                TraceEvent::IrqLine {
                    source: Source::Uart,
                    line: 4,
                    level: false
                },
            ]
        );
    }

    /// Arbitrary events in arbitrary order: no panic, every line of every
    /// format is well formed, and the flow tables stay bounded.
    #[test]
    fn fuzz_arbitrary_event_streams() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let clock = Arc::new(VirtualClock::new());
        let t = Tracer::new(clock.clone());
        let buf = t.start_memory();
        for _ in 0..20_000 {
            let r = next();
            let v = (r >> 8) as u8;
            let cpu = ((r >> 16) & 3) as u32;
            let ev = match r % 9 {
                0 => TraceEvent::IrqLine {
                    source: Source::Testdev,
                    line: v % 24,
                    level: r & (1 << 30) != 0,
                },
                1 => TraceEvent::PicInta {
                    irq: Some(v % 16),
                    vector: v,
                },
                2 => TraceEvent::IoapicDeliver {
                    pin: v % 24,
                    vector: v,
                    dest: 0,
                    dest_mode: DestMode::Physical,
                    mode: DeliveryMode::Fixed,
                    trigger: TriggerMode::Edge,
                },
                3 => TraceEvent::LapicAccept {
                    cpu,
                    vector: v,
                    mode: DeliveryMode::Fixed,
                    trigger: TriggerMode::Edge,
                },
                4 => TraceEvent::Inject {
                    cpu,
                    kind: EventKind::External,
                    vector: v,
                    error_code: None,
                    cs: 8,
                    rip: r,
                    reinjection: false,
                },
                5 => TraceEvent::Deliver {
                    cpu,
                    vector: v,
                    handler: None,
                },
                6 => TraceEvent::Msi {
                    address: 0xfee0_0000,
                    data: u32::from(v),
                    vector: v,
                },
                7 => TraceEvent::LapicLvt {
                    cpu,
                    lvt: Lvt::Timer,
                    vector: v,
                    mode: DeliveryMode::Fixed,
                },
                _ => TraceEvent::Exit {
                    cpu,
                    reason: format!("{:?}", char::from_u32((r >> 40) as u32 & 0x7f)),
                },
            };
            clock.advance(r % 1000);
            t.emit(ev);
        }
        {
            let inner = t.inner.as_ref().unwrap();
            let st = Tracer::lock(inner);
            assert!(st.flows.by_line.len() <= 24);
            assert!(st.flows.by_vector.len() <= 5 * 256);
        }
        t.finish().unwrap();
        let recs = buf.lock().unwrap().clone();
        assert_eq!(recs.len(), 20_000);
        for l in render(TraceFormat::JsonLines, &recs[..2000]).lines() {
            parse(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        }
        parse(&render(TraceFormat::Chrome, &recs[..2000])).unwrap();
    }
}
