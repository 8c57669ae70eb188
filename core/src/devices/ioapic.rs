//! The I/O APIC: Intel 82093AA register model, version 0x20 (the ICH-class
//! revision with the EOI register, which is what QEMU's `ioapic` reports),
//! 24 input pins, turning pin assertions into APIC bus messages.
//!
//! Register interface (82093AA datasheet, "Register Description"): the
//! guest writes a register index to IOREGSEL (offset 0x00) and reads or
//! writes that register through IOWIN (offset 0x10). Version 0x20 adds the
//! EOI register at 0x40: a write of a vector clears remote IRR of every
//! entry with that vector (Linux uses it for directed EOI).
//!
//! Access rules, chosen to match QEMU and KVM where the guest can tell:
//! - only bits 7:0 of the offset are decoded, so the 256-byte register block
//!   repeats through the 4 KiB window;
//! - accesses must be 1, 2 or 4 bytes and naturally aligned; anything else
//!   (8-byte or misaligned) reads 0 and drops writes, as QEMU's default
//!   4-byte maximum / no-unaligned access rules do;
//! - IOREGSEL accepts any of those sizes: a write whose bytes cover offset
//!   0x00 loads the index from its low byte, a read returns the index
//!   zero-extended (bits 31:8 are reserved and read 0);
//! - IOWIN and the EOI register take only full 32-bit accesses at their
//!   offset; smaller ones read 0 and drop writes (QEMU does the same);
//! - reads of any other offset return 0, and EOI is write-only.
//!
//! Redirection entries: remote IRR (bit 14) and delivery status (bit 12) are
//! read-only. Reserved bits (17-55) are stored and read back as written,
//! with no effect, as QEMU and KVM do (the datasheet leaves their read value
//! undefined), so a differential run against KVM's irqchip agrees.
//!
//! Pins: `set_irq` takes the electrical level of a pin; the entry's
//! polarity says which level is asserted. Delivery is synchronous through
//! the [`ApicBus`], so delivery status always reads idle and the IRR latch
//! of an edge-triggered pin is clear between calls. SMI, NMI, INIT and
//! ExtINT entries are edge-triggered whatever their trigger mode bit says
//! (datasheet, IOREDTBL "Delivery Mode": they "require" / "are treated as"
//! edge); only fixed and lowest-priority entries have level semantics and
//! remote IRR. The reserved delivery modes (0b011, 0b110) send nothing.
//!
//! Locking: when the IOAPIC sits in an `Arc<Mutex<IoApic>>`, it calls
//! [`ApicBus::deliver`] with that mutex held (from `set_irq`, a register
//! write or `eoi`). The bus must therefore not call back into this IOAPIC
//! from `deliver`, and a local APIC must release its own lock before it
//! calls [`ApicBus::eoi`] (lock order: IOAPIC, then LAPIC).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use super::apic_bus::{ApicBus, ApicMessage, DeliveryMode, DestMode, Shorthand, TriggerMode};
use crate::bus::BusDevice;
use crate::irq::IsaIrqSink;
use crate::trace::{TraceEvent, Tracer};

/// Guest-physical base of the IOAPIC on the `pc` machine.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the MMIO window the machine maps.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// Number of input pins (redirection table entries).
pub const IOAPIC_PINS: usize = 24;
/// IOAPICVER: maximum redirection entry 23 in bits 23:16, version 0x20.
pub const IOAPIC_VERSION: u32 = ((IOAPIC_PINS as u32 - 1) << 16) | 0x20;

// MMIO offsets within the 256-byte register block.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const EOI: u64 = 0x40;
/// Address bits the IOAPIC decodes (QEMU and KVM mask with 0xff).
const DECODE_MASK: u64 = 0xff;

// Indirect register indices (written to IOREGSEL).
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION_FIRST: u8 = 0x10;
const REG_REDIRECTION_LAST: u8 = REG_REDIRECTION_FIRST + 2 * IOAPIC_PINS as u8 - 1;

/// IOAPICID: the ID lives in bits 27:24, the rest is reserved.
const ID_SHIFT: u32 = 24;
const ID_MASK: u8 = 0x0F;

/// Bit n = pin n, for the 24 pins.
const ALL_PINS: u32 = (1 << IOAPIC_PINS) - 1;

// Redirection table entry fields (datasheet, IOREDTBL[23:0]).
const RTE_VECTOR: u64 = 0xFF;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DEST_MODE_LOGICAL: u64 = 1 << 11;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_POLARITY_LOW: u64 = 1 << 13;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASK: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;
const RTE_READ_ONLY: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;
/// Power-on value of every entry: masked, everything else 0 (as QEMU).
const RTE_RESET: u64 = RTE_MASK;

/// One redirection table entry, with its fields by datasheet name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rte(u64);

impl Rte {
    fn vector(self) -> u8 {
        (self.0 & RTE_VECTOR) as u8
    }
    fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits((self.0 >> RTE_DELIVERY_MODE_SHIFT) as u32)
    }
    fn dest_mode(self) -> DestMode {
        if self.0 & RTE_DEST_MODE_LOGICAL != 0 {
            DestMode::Logical
        } else {
            DestMode::Physical
        }
    }
    fn delivery_status(self) -> bool {
        self.0 & RTE_DELIVERY_STATUS != 0
    }
    fn active_low(self) -> bool {
        self.0 & RTE_POLARITY_LOW != 0
    }
    fn remote_irr(self) -> bool {
        self.0 & RTE_REMOTE_IRR != 0
    }
    fn trigger_bit_level(self) -> bool {
        self.0 & RTE_TRIGGER_LEVEL != 0
    }
    fn masked(self) -> bool {
        self.0 & RTE_MASK != 0
    }
    fn dest(self) -> u8 {
        (self.0 >> RTE_DEST_SHIFT) as u8
    }
    /// Level semantics in effect: the trigger mode bit says level and the
    /// delivery mode is one that has them. The datasheet makes SMI, NMI,
    /// INIT and ExtINT edge-triggered even when programmed level.
    fn is_level(self) -> bool {
        self.trigger_bit_level()
            && matches!(
                self.delivery_mode(),
                DeliveryMode::Fixed | DeliveryMode::LowestPriority
            )
    }
    /// Whether the delivery mode is one an IOAPIC may send (0b011 and
    /// 0b110 are reserved in the redirection table).
    fn sends(self) -> bool {
        !matches!(
            self.delivery_mode(),
            DeliveryMode::Reserved | DeliveryMode::StartUp
        )
    }
    /// The upstream write the entry becomes (VT-d 5.1.5.1, QEMU's
    /// `ioapic_entry_parse`): bits 63:48 as address bits 19:4 (the
    /// destination, or the remappable format bit and interrupt index),
    /// bit 11 as address bit 2 (destination mode, or index bit 15); the
    /// vector, delivery mode and trigger mode as the data.
    fn upstream_write(self) -> (u64, u32) {
        let address = 0xFEE0_0000 | ((self.0 >> 48) << 4) | ((self.0 >> 11) & 1) << 2;
        let level = u32::from(self.is_level());
        let data =
            u32::from(self.vector()) | self.delivery_mode().bits() << 8 | 1 << 14 | level << 15;
        (address, data)
    }
    fn message(self) -> ApicMessage {
        ApicMessage {
            // ExtINT: the LAPIC fetches the vector from the 8259A in the
            // INTA cycle; the programmed vector is passed along unused.
            vector: self.vector(),
            delivery: self.delivery_mode(),
            dest_mode: self.dest_mode(),
            dest: u32::from(self.dest()),
            trigger: if self.is_level() {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            shorthand: Shorthand::None,
            source: None,
        }
    }
}

/// The IOAPIC's saveable state. Plain data; [`IoApic::restore_state`]
/// checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoApicState {
    /// IOAPIC ID (IOAPICID bits 27:24), 0..=15; also the arbitration ID.
    pub id: u8,
    /// IOREGSEL: the register index IOWIN accesses.
    pub ioregsel: u8,
    /// The redirection table as the guest reads it: entry n is registers
    /// 0x10 + 2n (low dword) and 0x11 + 2n (high dword).
    pub redirection_table: [u64; IOAPIC_PINS],
    /// Electrical level of each input pin as last driven (before polarity),
    /// bit n = pin n.
    pub pin_levels: u32,
    /// Interrupt request latch, bit n = pin n: for a level-triggered entry
    /// the pin is asserted; for an edge-triggered one an assertion edge not
    /// yet sent (delivery is synchronous, so that is clear between calls).
    pub irr: u32,
}

impl IoApicState {
    /// The power-on state: ID 0, every entry masked, no requests.
    pub fn power_on() -> Self {
        IoApicState {
            id: 0,
            ioregsel: 0,
            redirection_table: [RTE_RESET; IOAPIC_PINS],
            pin_levels: 0,
            irr: 0,
        }
    }
}

/// Why a saved state cannot be restored.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IoApicStateError {
    #[error("IOAPIC ID {0:#x} does not fit the 4-bit ID field")]
    IdOutOfRange(u8),
    #[error("IOAPIC {field} {value:#x} has bits above pin 23")]
    PinOutOfRange { field: &'static str, value: u32 },
    #[error("IOAPIC redirection entry {pin} has delivery status set (delivery is synchronous)")]
    DeliveryStatusSet { pin: usize },
    #[error("IOAPIC redirection entry {pin} has remote IRR set but is not level-triggered")]
    RemoteIrrNotLevel { pin: usize },
}

/// The I/O APIC. Map it at [`IOAPIC_BASE`] with length [`IOAPIC_MMIO_SIZE`];
/// drive its pins with [`IoApic::set_irq`] / [`IoApic::set_gsi`] (or ISA
/// lines through [`IoApicIrqSink`]); forward LAPIC EOIs of level-triggered
/// vectors to [`IoApic::eoi`].
pub struct IoApic {
    state: IoApicState,
    bus: Arc<dyn ApicBus>,
    tracer: Tracer,
}

impl std::fmt::Debug for IoApic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoApic")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl IoApic {
    /// A powered-on IOAPIC sending its messages to `bus`.
    pub fn new(bus: Arc<dyn ApicBus>) -> Self {
        IoApic {
            state: IoApicState::power_on(),
            bus,
            tracer: Tracer::off(),
        }
    }

    /// Records messages sent and remote IRR changes in `tracer`.
    pub fn set_tracer(&mut self, tracer: Tracer) {
        self.tracer = tracer;
    }

    /// RESET: ID 0, IOREGSEL 0, every entry masked and edge, no requests.
    /// The pins keep the levels their drivers hold.
    pub fn reset(&mut self) {
        let pin_levels = self.state.pin_levels;
        self.state = IoApicState::power_on();
        self.state.pin_levels = pin_levels;
    }

    /// The IOAPIC ID (as in IOAPICID bits 27:24).
    pub fn id(&self) -> u8 {
        self.state.id
    }

    /// Redirection table entry `pin`, as the guest reads it.
    pub fn redirection_entry(&self, pin: u8) -> Option<u64> {
        self.state.redirection_table.get(usize::from(pin)).copied()
    }

    /// A copy of the whole state.
    pub fn save_state(&self) -> IoApicState {
        self.state.clone()
    }

    /// Replaces the state with `state` after checking it; on error nothing
    /// changes. Nothing is sent: a consistent saved state has already sent
    /// everything it could, and the LAPICs are restored alongside.
    pub fn restore_state(&mut self, state: &IoApicState) -> Result<(), IoApicStateError> {
        if state.id & !ID_MASK != 0 {
            return Err(IoApicStateError::IdOutOfRange(state.id));
        }
        for (field, value) in [("pin levels", state.pin_levels), ("IRR", state.irr)] {
            if value & !ALL_PINS != 0 {
                return Err(IoApicStateError::PinOutOfRange { field, value });
            }
        }
        for (pin, &raw) in state.redirection_table.iter().enumerate() {
            let rte = Rte(raw);
            if rte.delivery_status() {
                return Err(IoApicStateError::DeliveryStatusSet { pin });
            }
            if rte.remote_irr() && !rte.is_level() {
                return Err(IoApicStateError::RemoteIrrNotLevel { pin });
            }
        }
        self.state = state.clone();
        Ok(())
    }

    fn rte(&self, pin: usize) -> Rte {
        Rte(self
            .state
            .redirection_table
            .get(pin)
            .copied()
            .unwrap_or(RTE_RESET))
    }

    fn set_rte(&mut self, pin: usize, rte: Rte) {
        if let Some(slot) = self.state.redirection_table.get_mut(pin) {
            *slot = rte.0;
        }
    }

    /// Whether `pin` is asserted: its level, inverted for active-low.
    fn asserted(&self, pin: usize) -> bool {
        let level = self.state.pin_levels & (1 << pin) != 0;
        level != self.rte(pin).active_low()
    }

    /// Drives input `pin` (0..=23) to electrical `level`; other pins are
    /// ignored. Edge-triggered: an assertion edge sends one message if the
    /// entry is unmasked (an edge on a masked pin is lost: the 82093AA
    /// ignores it). Level-triggered: an asserted pin sends a message when
    /// remote IRR is clear, and again after the EOI while still asserted.
    pub fn set_irq(&mut self, pin: u8, level: bool) {
        let pin = usize::from(pin);
        if pin >= IOAPIC_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let was_asserted = self.asserted(pin);
        if level {
            self.state.pin_levels |= bit;
        } else {
            self.state.pin_levels &= !bit;
        }
        let asserted = self.asserted(pin);
        let rte = self.rte(pin);
        if rte.is_level() {
            self.latch_level(pin);
        } else if asserted && !was_asserted && !rte.masked() {
            self.state.irr |= bit;
        }
        self.service(pin);
    }

    /// Drives global system interrupt `gsi`: this IOAPIC has GSI base 0, so
    /// GSI n is pin n. Meant for the PCI pins 16-23; GSIs beyond 23 are
    /// ignored.
    pub fn set_gsi(&mut self, gsi: u32, level: bool) {
        if let Ok(pin) = u8::try_from(gsi) {
            self.set_irq(pin, level);
        }
    }

    /// An EOI for `vector` (the LAPIC's EOI broadcast / directed EOI, or a
    /// write to the EOI register): clears remote IRR of every entry with
    /// that vector, and sends again for those whose pin is still asserted.
    pub fn eoi(&mut self, vector: u8) {
        for pin in 0..IOAPIC_PINS {
            let rte = self.rte(pin);
            if rte.vector() == vector && rte.remote_irr() {
                self.set_rte(pin, Rte(rte.0 & !RTE_REMOTE_IRR));
                self.tracer.emit(TraceEvent::IoapicRemoteIrr {
                    pin: pin as u8,
                    vector,
                    set: false,
                });
                self.service(pin);
            }
        }
    }

    /// For a level-triggered entry, IRR follows the asserted state.
    fn latch_level(&mut self, pin: usize) {
        let bit = 1u32 << pin;
        if self.asserted(pin) {
            self.state.irr |= bit;
        } else {
            self.state.irr &= !bit;
        }
    }

    /// Sends the request pending on `pin`, if the entry allows it.
    fn service(&mut self, pin: usize) {
        let bit = 1u32 << pin;
        if self.state.irr & bit == 0 {
            return;
        }
        let rte = self.rte(pin);
        if rte.masked() {
            return;
        }
        if rte.is_level() {
            if rte.remote_irr() {
                // The LAPIC has not yet EOI'd the previous message.
                return;
            }
            // Datasheet: remote IRR is set when a LAPIC accepts the level
            // interrupt; the bus has no refusal, so it is accepted.
            self.set_rte(pin, Rte(rte.0 | RTE_REMOTE_IRR));
        } else {
            self.state.irr &= !bit;
        }
        if rte.sends() {
            let msg = rte.message();
            self.tracer.emit_with(|| TraceEvent::IoapicDeliver {
                pin: pin as u8,
                vector: msg.vector,
                dest: msg.dest,
                dest_mode: msg.dest_mode,
                mode: msg.delivery,
                trigger: msg.trigger,
            });
            if rte.is_level() {
                self.tracer.emit(TraceEvent::IoapicRemoteIrr {
                    pin: pin as u8,
                    vector: msg.vector,
                    set: true,
                });
            }
            let (address, data) = rte.upstream_write();
            self.bus.deliver_from_ioapic(&msg, address, data);
        }
    }

    /// Reads indirect register `index` (what IOWIN returns when IOREGSEL
    /// holds `index`). Unimplemented indices read 0.
    pub fn read_register(&self, index: u8) -> u32 {
        match index {
            // The arbitration ID is loaded from the ID whenever the ID is
            // written (datasheet, IOAPICARB), so both read the same.
            REG_ID | REG_ARBITRATION => u32::from(self.state.id) << ID_SHIFT,
            REG_VERSION => IOAPIC_VERSION,
            REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => {
                let rte = self.rte(usize::from((index - REG_REDIRECTION_FIRST) / 2));
                if index & 1 == 0 {
                    rte.0 as u32
                } else {
                    (rte.0 >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    /// Writes indirect register `index` (a 32-bit IOWIN write). Read-only
    /// registers and bits keep their values; unimplemented indices ignore it.
    pub fn write_register(&mut self, index: u8, value: u32) {
        match index {
            REG_ID => self.state.id = (value >> ID_SHIFT) as u8 & ID_MASK,
            REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => {
                let pin = usize::from((index - REG_REDIRECTION_FIRST) / 2);
                self.write_rte(pin, index & 1 == 1, value);
            }
            _ => {}
        }
    }

    fn write_rte(&mut self, pin: usize, high: bool, value: u32) {
        let old = self.rte(pin);
        let written = if high {
            (old.0 & 0xFFFF_FFFF) | (u64::from(value) << 32)
        } else {
            (old.0 & !0xFFFF_FFFF) | u64::from(value)
        };
        let mut new = Rte((written & !RTE_READ_ONLY) | (old.0 & RTE_READ_ONLY));
        if new.is_level() {
            // Switching to level (or changing polarity) re-evaluates the pin.
            self.set_rte(pin, new);
            self.latch_level(pin);
        } else {
            // Remote IRR means nothing for edge entries; clearing it here is
            // what Linux's EOI emulation for IOAPICs without the EOI
            // register (mask, set edge, set level) relies on, and QEMU does
            // it. A level held by the pin is not an edge: drop its request.
            new = Rte(new.0 & !RTE_REMOTE_IRR);
            if old.is_level() {
                self.state.irr &= !(1 << pin);
            }
            self.set_rte(pin, new);
        }
        // Unmasking an asserted level pin sends it.
        self.service(pin);
    }

    fn ioregsel_description(&self) -> String {
        match self.state.ioregsel {
            REG_ID => "ID".to_string(),
            REG_VERSION => "version".to_string(),
            REG_ARBITRATION => "arbitration".to_string(),
            i @ REG_REDIRECTION_FIRST..=REG_REDIRECTION_LAST => format!(
                "redir[{}] {}",
                (i - REG_REDIRECTION_FIRST) / 2,
                if i & 1 == 0 { "low" } else { "high" }
            ),
            _ => "unimplemented".to_string(),
        }
    }

    /// The registers in readable form, in the style of QEMU's `info pic`.
    pub fn dump(&self) -> String {
        let s = &self.state;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ioapic: ver={:#x} id={:#04x} sel={:#04x} ({})",
            IOAPIC_VERSION & 0xFF,
            s.id,
            s.ioregsel,
            self.ioregsel_description()
        );
        let mut remote_irr = 0u32;
        for pin in 0..IOAPIC_PINS {
            let rte = self.rte(pin);
            let mode = match rte.delivery_mode() {
                DeliveryMode::Fixed => "fixed",
                DeliveryMode::LowestPriority => "lowest",
                DeliveryMode::Smi => "SMI",
                DeliveryMode::Nmi => "NMI",
                DeliveryMode::Init => "INIT",
                DeliveryMode::ExtInt => "extINT",
                DeliveryMode::StartUp | DeliveryMode::Reserved => "reserved",
            };
            if rte.remote_irr() {
                remote_irr |= 1 << pin;
            }
            let _ = writeln!(
                out,
                "  pin {:<2} {:#018x} vec={:#04x} {:<8} {:<8} dest={:#04x} {:<8} {:<5} {} \
                 remote-irr={} status={} line={}",
                pin,
                rte.0,
                rte.vector(),
                mode,
                match rte.dest_mode() {
                    DestMode::Physical => "physical",
                    DestMode::Logical => "logical",
                },
                rte.dest(),
                if rte.masked() { "masked" } else { "unmasked" },
                if rte.trigger_bit_level() {
                    "level"
                } else {
                    "edge"
                },
                if rte.active_low() {
                    "active-lo"
                } else {
                    "active-hi"
                },
                u8::from(rte.remote_irr()),
                if rte.delivery_status() {
                    "pending"
                } else {
                    "idle"
                },
                u8::from(s.pin_levels & (1 << pin) != 0),
            );
        }
        dump_pin_set(&mut out, "IRR", s.irr);
        dump_pin_set(&mut out, "Remote IRR", remote_irr);
        out
    }
}

fn dump_pin_set(out: &mut String, name: &str, set: u32) {
    let _ = write!(out, "  {name:<10} ");
    if set == 0 {
        out.push_str("(none)");
    } else {
        for pin in (0..IOAPIC_PINS).filter(|p| set & (1 << p) != 0) {
            let _ = write!(out, "{pin} ");
        }
    }
    out.push('\n');
}

impl BusDevice for IoApic {
    fn name(&self) -> &'static str {
        "ioapic"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(offset) = decode(offset, data.len()) else {
            return;
        };
        let value = match offset {
            IOREGSEL => u32::from(self.state.ioregsel),
            IOWIN if data.len() == 4 => self.read_register(self.state.ioregsel),
            _ => 0,
        };
        // Sub-dword reads at offset 0 see the low bytes; reads of the
        // reserved upper bytes of IOREGSEL land in `_` above and read 0.
        let bytes = value.to_le_bytes();
        for (d, b) in data.iter_mut().zip(bytes.iter()) {
            *d = *b;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(offset) = decode(offset, data.len()) else {
            return;
        };
        match (offset, data) {
            // Any write covering byte 0 of IOREGSEL loads the index; the
            // upper bytes are reserved.
            (IOREGSEL, [index, ..]) => self.state.ioregsel = *index,
            (IOWIN, &[a, b, c, d]) => {
                self.write_register(self.state.ioregsel, u32::from_le_bytes([a, b, c, d]))
            }
            // EOI register: bits 7:0 are the vector, 31:8 are ignored.
            (EOI, &[vector, _, _, _]) => self.eoi(vector),
            _ => {}
        }
    }

    fn dump(&self) -> String {
        IoApic::dump(self)
    }
}

/// The decoded offset of an access of `len` bytes, or `None` for sizes and
/// alignments the IOAPIC does not accept (see the module comment).
fn decode(offset: u64, len: usize) -> Option<u64> {
    let len = u64::try_from(len).ok()?;
    if !matches!(len, 1 | 2 | 4) || offset % len != 0 {
        return None;
    }
    Some(offset & DECODE_MASK)
}

/// The IOAPIC pin ISA IRQ `irq` reaches on the `pc` machine: IRQ n → pin n,
/// except IRQ 0 (the PIT) → pin 2, as the MADT's interrupt source override
/// says. IRQ 2 is the 8259A cascade and reaches no pin, so pin 0 (the
/// 8259A's INTR on real boards, unconnected on QEMU too) gets nothing.
pub fn isa_irq_to_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        1..=15 => Some(irq),
        _ => None,
    }
}

/// Connects the IOAPIC to the ISA interrupt router with the `pc` mapping
/// of [`isa_irq_to_pin`].
#[derive(Debug, Clone)]
pub struct IoApicIrqSink(pub Arc<Mutex<IoApic>>);

impl IsaIrqSink for IoApicIrqSink {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        if let Some(pin) = isa_irq_to_pin(irq) {
            // A poisoned lock: another thread panicked inside the device;
            // its state is plain data, keep using it.
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_irq(pin, level);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An APIC bus that records what it is given.
    #[derive(Default)]
    struct RecordingBus {
        messages: Mutex<Vec<ApicMessage>>,
        eois: Mutex<Vec<u8>>,
    }

    impl ApicBus for RecordingBus {
        fn deliver(&self, msg: &ApicMessage) {
            self.messages.lock().unwrap().push(*msg);
        }
        fn eoi(&self, vector: u8) {
            self.eois.lock().unwrap().push(vector);
        }
    }

    impl RecordingBus {
        fn take(&self) -> Vec<ApicMessage> {
            std::mem::take(&mut *self.messages.lock().unwrap())
        }
    }

    /// Records the upstream writes an interrupt-remapping unit would see.
    #[derive(Default)]
    struct UpstreamBus(Mutex<Vec<(u64, u32)>>);

    impl ApicBus for UpstreamBus {
        fn deliver(&self, _: &ApicMessage) {}
        fn eoi(&self, _: u8) {}
        fn deliver_from_ioapic(&self, _: &ApicMessage, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    #[test]
    fn upstream_write_carries_the_remappable_format() {
        let bus = Arc::new(UpstreamBus::default());
        let mut io = IoApic::new(bus.clone());
        // Pin 5: compatibility format, dest 3 logical, vector 0x41, level.
        io.write_register(0x10 + 11, 0x0300_0000);
        io.write_register(0x10 + 10, 0x0000_8841);
        io.set_irq(5, true);
        // Pin 6: remappable format (bit 48), index 0x4321 (bits 63:49 =
        // index[14:0], bit 11 = index[15]), edge, vector 0xED.
        let index: u64 = 0x8001;
        let rte = (index & 0x7FFF) << 49 | 1 << 48 | (index >> 15) << 11 | 0xED;
        io.write_register(0x10 + 13, (rte >> 32) as u32);
        io.write_register(0x10 + 12, rte as u32);
        io.set_irq(6, true);
        let got = bus.0.lock().unwrap().clone();
        assert_eq!(got[0], (0xFEE0_3004, 0xC041));
        let (address, data) = got[1];
        assert_eq!(address & (1 << 4), 1 << 4, "interrupt format");
        assert_eq!((address >> 5) & 0x7FFF, 1, "handle[14:0]");
        assert_eq!((address >> 2) & 1, 1, "handle[15]");
        assert_eq!(data & 0xFF, 0xED);
    }

    fn new_ioapic() -> (IoApic, Arc<RecordingBus>) {
        let bus = Arc::new(RecordingBus::default());
        (IoApic::new(bus.clone()), bus)
    }

    fn mmio_write32(io: &mut IoApic, offset: u64, value: u32) {
        BusDevice::write(io, offset, &value.to_le_bytes());
    }

    fn mmio_read32(io: &mut IoApic, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        BusDevice::read(io, offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// What a guest does: IOREGSEL, then IOWIN.
    fn write_reg(io: &mut IoApic, index: u8, value: u32) {
        mmio_write32(io, 0x00, u32::from(index));
        mmio_write32(io, 0x10, value);
    }

    fn read_reg(io: &mut IoApic, index: u8) -> u32 {
        mmio_write32(io, 0x00, u32::from(index));
        mmio_read32(io, 0x10)
    }

    /// Programs redirection entry `pin`: high dword first, then low, as
    /// Linux does (so the entry is complete when it is unmasked).
    fn program(io: &mut IoApic, pin: u8, low: u32, dest: u8) {
        write_reg(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        write_reg(io, 0x10 + 2 * pin, low);
    }

    fn entry(io: &mut IoApic, pin: u8) -> u64 {
        let low = read_reg(io, 0x10 + 2 * pin);
        let high = read_reg(io, 0x11 + 2 * pin);
        (u64::from(high) << 32) | u64::from(low)
    }

    const LEVEL: u32 = 1 << 15;
    const MASKED: u32 = 1 << 16;
    const ACTIVE_LOW: u32 = 1 << 13;
    const LOGICAL: u32 = 1 << 11;
    const REMOTE_IRR: u32 = 1 << 14;
    const DELIVERY_STATUS: u32 = 1 << 12;

    fn fixed(vector: u8, dest: u8, trigger: TriggerMode) -> ApicMessage {
        ApicMessage {
            vector,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestMode::Physical,
            dest: u32::from(dest),
            trigger,
            level: true,
            shorthand: Shorthand::None,
            source: None,
        }
    }

    #[test]
    fn version_id_and_arbitration() {
        let (mut io, _) = new_ioapic();
        assert_eq!(read_reg(&mut io, 0x01), 0x0017_0020);
        assert_eq!(read_reg(&mut io, 0x00), 0);
        write_reg(&mut io, 0x00, 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut io, 0x00), 0x0F00_0000);
        assert_eq!(read_reg(&mut io, 0x02), 0x0F00_0000);
        assert_eq!(io.id(), 0xF);
        write_reg(&mut io, 0x00, 0x0200_0000);
        assert_eq!(read_reg(&mut io, 0x02), 0x0200_0000);
        // Version and arbitration are read-only.
        write_reg(&mut io, 0x01, 0);
        write_reg(&mut io, 0x02, 0x0500_0000);
        assert_eq!(read_reg(&mut io, 0x01), 0x0017_0020);
        assert_eq!(read_reg(&mut io, 0x02), 0x0200_0000);
        // Unknown indices read 0 and ignore writes.
        for index in [0x03, 0x0F, 0x40, 0xFF] {
            write_reg(&mut io, index, 0xFFFF_FFFF);
            assert_eq!(read_reg(&mut io, index), 0, "index {index:#x}");
        }
        // IOREGSEL reads back the index.
        mmio_write32(&mut io, 0x00, 0x1234_5617);
        assert_eq!(mmio_read32(&mut io, 0x00), 0x17);
    }

    #[test]
    fn power_on_entries_are_masked() {
        let (mut io, bus) = new_ioapic();
        for pin in 0..24 {
            assert_eq!(entry(&mut io, pin), 0x1_0000);
        }
        io.set_irq(5, true);
        assert!(bus.take().is_empty());
    }

    #[test]
    fn isa_irq0_reaches_pin2_edge() {
        let bus = Arc::new(RecordingBus::default());
        let io = Arc::new(Mutex::new(IoApic::new(bus.clone())));
        let sink = IoApicIrqSink(io.clone());
        program(&mut io.lock().unwrap(), 2, 0x30, 1);
        sink.set_isa_irq(0, true);
        assert_eq!(bus.take(), vec![fixed(0x30, 1, TriggerMode::Edge)]);
        // Holding the line is not another edge.
        sink.set_isa_irq(0, true);
        assert!(bus.take().is_empty());
        sink.set_isa_irq(0, false);
        sink.set_isa_irq(0, true);
        assert_eq!(bus.take(), vec![fixed(0x30, 1, TriggerMode::Edge)]);
        // Edge entries never set remote IRR.
        assert_eq!(
            io.lock().unwrap().redirection_entry(2),
            Some(0x0100_0000_0000_0030)
        );
        // IRQ 2 (cascade) reaches nothing, pin 0 included.
        program(&mut io.lock().unwrap(), 0, 0x40, 1);
        sink.set_isa_irq(2, true);
        sink.set_isa_irq(16, true);
        assert!(bus.take().is_empty());
        // Other ISA IRQs map one to one.
        program(&mut io.lock().unwrap(), 4, 0x34, 0);
        sink.set_isa_irq(4, true);
        assert_eq!(bus.take(), vec![fixed(0x34, 0, TriggerMode::Edge)]);
        assert_eq!(isa_irq_to_pin(0), Some(2));
        assert_eq!(isa_irq_to_pin(2), None);
        assert_eq!(isa_irq_to_pin(15), Some(15));
    }

    #[test]
    fn masked_edge_is_lost() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 2, 0x30 | MASKED, 0);
        io.set_irq(2, true);
        assert!(bus.take().is_empty());
        // Unmasking does not bring the edge back.
        program(&mut io, 2, 0x30, 0);
        assert!(bus.take().is_empty());
        assert_eq!(io.save_state().irr, 0);
        io.set_irq(2, false);
        io.set_irq(2, true);
        assert_eq!(bus.take().len(), 1);
    }

    #[test]
    fn level_remote_irr_and_eoi() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 17, 0x51 | LEVEL, 3);
        io.set_gsi(17, true);
        assert_eq!(bus.take(), vec![fixed(0x51, 3, TriggerMode::Level)]);
        assert_ne!(read_reg(&mut io, 0x10 + 34) & REMOTE_IRR, 0);
        // Still asserted, not EOI'd: nothing more.
        io.set_gsi(17, true);
        io.set_gsi(17, false);
        io.set_gsi(17, true);
        assert!(bus.take().is_empty());
        // EOI of another vector changes nothing.
        io.eoi(0x52);
        assert!(bus.take().is_empty());
        // EOI with the line still high: sent again, remote IRR set again.
        io.eoi(0x51);
        assert_eq!(bus.take(), vec![fixed(0x51, 3, TriggerMode::Level)]);
        assert_ne!(read_reg(&mut io, 0x10 + 34) & REMOTE_IRR, 0);
        // EOI with the line low: remote IRR clear, nothing sent.
        io.set_gsi(17, false);
        io.eoi(0x51);
        assert!(bus.take().is_empty());
        assert_eq!(read_reg(&mut io, 0x10 + 34) & REMOTE_IRR, 0);
        // GSIs beyond the pins are ignored.
        io.set_gsi(24, true);
        io.set_gsi(u32::MAX, true);
        assert!(bus.take().is_empty());
    }

    #[test]
    fn eoi_register_clears_remote_irr() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 9, 0x49 | LEVEL, 0);
        program(&mut io, 10, 0x49 | LEVEL, 0);
        io.set_irq(9, true);
        io.set_irq(10, true);
        assert_eq!(bus.take().len(), 2);
        io.set_irq(9, false);
        // A byte write is not an EOI (QEMU takes only 32-bit ones).
        BusDevice::write(&mut io, 0x40, &[0x49]);
        assert_ne!(entry(&mut io, 9) & u64::from(REMOTE_IRR), 0);
        // Bits 31:8 are ignored: every entry with the vector is EOI'd.
        mmio_write32(&mut io, 0x40, 0xABCD_EF49);
        assert_eq!(entry(&mut io, 9) & u64::from(REMOTE_IRR), 0);
        // Pin 10 is still asserted: cleared and sent again at once.
        assert_eq!(bus.take(), vec![fixed(0x49, 0, TriggerMode::Level)]);
        assert_ne!(entry(&mut io, 10) & u64::from(REMOTE_IRR), 0);
        // The EOI register is write-only; the alias at +0x100 decodes too.
        assert_eq!(mmio_read32(&mut io, 0x40), 0);
        mmio_write32(&mut io, 0x140, 0x49);
        assert_eq!(bus.take().len(), 1);
    }

    #[test]
    fn unmask_of_asserted_level_pin_delivers() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 11, 0x3B | LEVEL | MASKED, 0);
        io.set_irq(11, true);
        assert!(bus.take().is_empty());
        assert_eq!(io.save_state().irr, 1 << 11);
        program(&mut io, 11, 0x3B | LEVEL, 0);
        assert_eq!(bus.take(), vec![fixed(0x3B, 0, TriggerMode::Level)]);
        // Masked again and EOI'd: nothing sent until unmasked.
        program(&mut io, 11, 0x3B | LEVEL | MASKED, 0);
        io.eoi(0x3B);
        assert!(bus.take().is_empty());
        program(&mut io, 11, 0x3B | LEVEL, 0);
        assert_eq!(bus.take().len(), 1);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 12, 0x3C | LEVEL, 0);
        io.set_irq(12, true);
        assert_eq!(bus.take().len(), 1);
        // Linux's EOI emulation for IOAPICs without the EOI register.
        program(&mut io, 12, 0x3C | MASKED, 0);
        assert_eq!(entry(&mut io, 12) & u64::from(REMOTE_IRR), 0);
        program(&mut io, 12, 0x3C | LEVEL | MASKED, 0);
        assert!(bus.take().is_empty());
        program(&mut io, 12, 0x3C | LEVEL, 0);
        assert_eq!(bus.take(), vec![fixed(0x3C, 0, TriggerMode::Level)]);
    }

    #[test]
    fn active_low_polarity() {
        let (mut io, bus) = new_ioapic();
        // Level, active low: asserted while the line is low.
        io.set_irq(20, true);
        program(&mut io, 20, 0x60 | LEVEL | ACTIVE_LOW, 0);
        assert!(bus.take().is_empty());
        io.set_irq(20, false);
        assert_eq!(bus.take(), vec![fixed(0x60, 0, TriggerMode::Level)]);
        io.set_irq(20, true);
        io.eoi(0x60);
        assert!(bus.take().is_empty());
        // Edge, active low: the falling edge is the assertion.
        program(&mut io, 21, 0x61 | ACTIVE_LOW, 0);
        io.set_irq(21, true);
        assert!(bus.take().is_empty());
        io.set_irq(21, false);
        assert_eq!(bus.take(), vec![fixed(0x61, 0, TriggerMode::Edge)]);
        // Changing the polarity is not an edge.
        program(&mut io, 21, 0x61, 0);
        assert!(bus.take().is_empty());
        io.set_irq(21, true);
        assert_eq!(bus.take().len(), 1);
    }

    #[test]
    fn logical_destination_and_lowest_priority() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 3, 0x33 | LOGICAL | (1 << 8), 0xF0);
        io.set_irq(3, true);
        let msg = ApicMessage {
            delivery: DeliveryMode::LowestPriority,
            dest_mode: DestMode::Logical,
            ..fixed(0x33, 0xF0, TriggerMode::Edge)
        };
        assert_eq!(bus.take(), vec![msg]);
    }

    #[test]
    fn nmi_init_extint_smi_are_edge() {
        let (mut io, bus) = new_ioapic();
        for (pin, mode, delivery) in [
            (5u8, 4u32, DeliveryMode::Nmi),
            (6, 5, DeliveryMode::Init),
            (7, 7, DeliveryMode::ExtInt),
            (8, 2, DeliveryMode::Smi),
        ] {
            // Programmed level: treated as edge all the same (datasheet).
            program(&mut io, pin, (mode << 8) | LEVEL, 2);
            io.set_irq(pin, true);
            let expected = ApicMessage {
                delivery,
                ..fixed(0, 2, TriggerMode::Edge)
            };
            assert_eq!(bus.take(), vec![expected], "mode {mode}");
            assert_eq!(entry(&mut io, pin) & u64::from(REMOTE_IRR), 0);
            // Held high: no more messages; a new edge sends again.
            io.set_irq(pin, true);
            assert!(bus.take().is_empty());
            io.set_irq(pin, false);
            io.set_irq(pin, true);
            assert_eq!(bus.take().len(), 1);
        }
        // Reserved delivery modes send nothing.
        program(&mut io, 9, (3 << 8) | 0x40, 0);
        program(&mut io, 10, (6 << 8) | 0x40, 0);
        io.set_irq(9, true);
        io.set_irq(10, true);
        assert!(bus.take().is_empty());
    }

    #[test]
    fn read_only_bits_cannot_be_written() {
        let (mut io, bus) = new_ioapic();
        program(&mut io, 14, 0x4E | LEVEL | REMOTE_IRR | DELIVERY_STATUS, 0);
        assert_eq!(entry(&mut io, 14), 0x4E | u64::from(LEVEL));
        io.set_irq(14, true);
        assert_eq!(bus.take().len(), 1);
        // Writing 0 to remote IRR leaves it set.
        write_reg(&mut io, 0x10 + 28, 0x4E | LEVEL);
        assert_ne!(read_reg(&mut io, 0x10 + 28) & REMOTE_IRR, 0);
        assert!(bus.take().is_empty());
        // Reserved bits read back as written (as QEMU and KVM); the
        // destination is the top byte.
        write_reg(&mut io, 0x11 + 28, 0xAB12_3456);
        assert_eq!(read_reg(&mut io, 0x11 + 28), 0xAB12_3456);
        io.eoi(0x4E);
        assert_eq!(bus.take()[0].dest, 0xAB);
    }

    #[test]
    fn mmio_access_sizes() {
        let (mut io, _) = new_ioapic();
        // A byte write selects the register; byte and word reads see it.
        BusDevice::write(&mut io, 0x00, &[0x01]);
        let mut b = [0u8; 1];
        BusDevice::read(&mut io, 0x00, &mut b);
        assert_eq!(b, [0x01]);
        let mut w = [0xEEu8; 2];
        BusDevice::read(&mut io, 0x00, &mut w);
        assert_eq!(w, [0x01, 0x00]);
        assert_eq!(mmio_read32(&mut io, 0x10), 0x0017_0020);
        // Sub-dword IOWIN reads return 0.
        BusDevice::read(&mut io, 0x10, &mut w);
        assert_eq!(w, [0, 0]);
        // A byte write to a reserved IOREGSEL byte does not change the index.
        BusDevice::write(&mut io, 0x01, &[0x10]);
        assert_eq!(mmio_read32(&mut io, 0x00), 0x01);
        // 8-byte and misaligned accesses are ignored.
        BusDevice::write(&mut io, 0x00, &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        BusDevice::write(&mut io, 0x02, &[0x10, 0, 0, 0]);
        assert_eq!(mmio_read32(&mut io, 0x00), 0x01);
        let mut q = [0xEEu8; 8];
        BusDevice::read(&mut io, 0x10, &mut q);
        assert_eq!(q, [0; 8]);
        // A sub-dword IOWIN write is dropped.
        BusDevice::write(&mut io, 0x00, &[0x00]);
        BusDevice::write(&mut io, 0x13, &[0x0F]);
        BusDevice::write(&mut io, 0x10, &[0, 0]);
        assert_eq!(io.id(), 0);
        // Unimplemented offsets read 0; the block repeats every 0x100.
        assert_eq!(mmio_read32(&mut io, 0x20), 0);
        mmio_write32(&mut io, 0xF00, 0x01);
        assert_eq!(mmio_read32(&mut io, 0xF10), 0x0017_0020);
    }

    #[test]
    fn save_restore_and_dump() {
        let (mut io, bus) = new_ioapic();
        write_reg(&mut io, 0x00, 0x0300_0000);
        program(&mut io, 16, 0x70 | LEVEL | ACTIVE_LOW, 1);
        io.set_irq(16, false);
        assert_eq!(bus.take().len(), 1);
        let saved = io.save_state();
        assert_eq!(saved.irr, 1 << 16);
        assert_eq!(saved.pin_levels, 0);

        let (mut other, other_bus) = new_ioapic();
        other.restore_state(&saved).unwrap();
        assert_eq!(other.save_state(), saved);
        assert!(other_bus.take().is_empty());
        other.eoi(0x70);
        assert_eq!(other_bus.take(), vec![fixed(0x70, 1, TriggerMode::Level)]);

        let mut bad = saved.clone();
        bad.id = 0x10;
        assert_eq!(
            other.restore_state(&bad),
            Err(IoApicStateError::IdOutOfRange(0x10))
        );
        let mut bad = saved.clone();
        bad.irr = 1 << 24;
        assert!(matches!(
            other.restore_state(&bad),
            Err(IoApicStateError::PinOutOfRange { .. })
        ));
        let mut bad = saved.clone();
        bad.redirection_table[0] = u64::from(REMOTE_IRR);
        assert_eq!(
            other.restore_state(&bad),
            Err(IoApicStateError::RemoteIrrNotLevel { pin: 0 })
        );
        let mut bad = saved.clone();
        bad.redirection_table[1] = u64::from(DELIVERY_STATUS);
        assert_eq!(
            other.restore_state(&bad),
            Err(IoApicStateError::DeliveryStatusSet { pin: 1 })
        );

        let dump = io.dump();
        assert!(dump.starts_with("ioapic: ver=0x20 id=0x03"), "{dump}");
        let line = dump.lines().find(|l| l.contains("pin 16")).unwrap();
        for field in [
            "vec=0x70",
            "fixed",
            "physical",
            "dest=0x01",
            "unmasked",
            "level",
            "active-lo",
            "remote-irr=1",
            "status=idle",
            "line=0",
        ] {
            assert!(line.contains(field), "{field} missing in {line}");
        }
        assert!(dump.contains("Remote IRR 16"), "{dump}");
        assert_eq!(dump.lines().count(), 1 + 24 + 2);

        io.reset();
        assert_eq!(io.save_state(), IoApicState::power_on());
    }

    /// xorshift64: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Counts messages instead of keeping them, so the test itself does
    /// not grow.
    #[derive(Default)]
    struct CountingBus(Mutex<u64>, Mutex<u64>);
    impl ApicBus for CountingBus {
        fn deliver(&self, msg: &ApicMessage) {
            *self.0.lock().unwrap() += 1;
            if msg.trigger == TriggerMode::Level {
                *self.1.lock().unwrap() += 1;
            }
        }
        fn eoi(&self, _vector: u8) {}
    }

    #[test]
    fn fuzz_no_panic_bounded_state() {
        let bus = Arc::new(CountingBus::default());
        let io = Arc::new(Mutex::new(IoApic::new(bus.clone())));
        let sink = IoApicIrqSink(io.clone());
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for step in 0..200_000 {
            let r = rng.next();
            let before = *bus.0.lock().unwrap();
            match r % 8 {
                0..=3 => {
                    let len = [1usize, 2, 4, 8][(r >> 8) as usize % 4];
                    // Mostly the register block, sometimes anywhere.
                    let offset = if r & (1 << 12) != 0 {
                        (r >> 16) % 0x1000
                    } else {
                        [0x00, 0x10, 0x40, 0x01, 0x12][(r >> 16) as usize % 5]
                    };
                    let value = rng.next();
                    let mut d = io.lock().unwrap();
                    if r & (1 << 13) != 0 {
                        // Bias IOREGSEL towards implemented registers.
                        let index = if r & (1 << 14) != 0 {
                            (value % 0x40) as u8
                        } else {
                            value as u8
                        };
                        BusDevice::write(&mut *d, 0x00, &[index]);
                        BusDevice::write(&mut *d, offset, &value.to_le_bytes()[..len]);
                    } else {
                        let mut buf = vec![0u8; len];
                        BusDevice::read(&mut *d, offset, &mut buf);
                    }
                }
                4 => io
                    .lock()
                    .unwrap()
                    .set_irq((r >> 8) as u8 % 30, r & (1 << 20) != 0),
                5 => sink.set_isa_irq((r >> 8) as u8 % 20, r & (1 << 20) != 0),
                6 => io
                    .lock()
                    .unwrap()
                    .set_gsi((r >> 8) as u32 % 40, r & (1 << 20) != 0),
                _ => {
                    let vector = io
                        .lock()
                        .unwrap()
                        .redirection_entry((r >> 8) as u8 % 24)
                        .map_or(0, |e| e as u8);
                    io.lock().unwrap().eoi(vector ^ ((r >> 32) as u8 & 1));
                }
            }
            // At most one message per pin per operation.
            let sent = *bus.0.lock().unwrap() - before;
            assert!(sent <= IOAPIC_PINS as u64, "step {step}: {sent} messages");

            let d = io.lock().unwrap();
            let s = d.save_state();
            assert!(s.id <= 0xF);
            assert_eq!(s.pin_levels & !ALL_PINS, 0);
            assert_eq!(s.irr & !ALL_PINS, 0);
            for (pin, &raw) in s.redirection_table.iter().enumerate() {
                let rte = Rte(raw);
                assert!(!rte.delivery_status(), "step {step} pin {pin}");
                if rte.is_level() {
                    // IRR follows the asserted state, and anything
                    // deliverable has been delivered.
                    let asserted = d.asserted(pin);
                    assert_eq!(s.irr & (1 << pin) != 0, asserted, "step {step} pin {pin}");
                    assert!(
                        !asserted || rte.masked() || rte.remote_irr(),
                        "step {step} pin {pin}: undelivered level request"
                    );
                } else {
                    assert!(!rte.remote_irr(), "step {step} pin {pin}");
                    assert_eq!(s.irr & (1 << pin), 0, "step {step} pin {pin}");
                }
            }
            // The saved state always restores.
            if step % 1000 == 0 {
                let (mut other, _) = new_ioapic();
                other.restore_state(&s).unwrap();
                assert_eq!(other.save_state(), s);
                assert_eq!(other.dump().lines().count(), 1 + 24 + 2);
            }
        }
        // The run reached both kinds of delivery, not just the error paths.
        let (sent, level) = (*bus.0.lock().unwrap(), *bus.1.lock().unwrap());
        assert!(sent > 1000 && level > 100, "{sent} sent, {level} level");
    }
}
