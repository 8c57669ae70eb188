//! The 8259A programmable interrupt controller pair of a PC, with the ELCR.
//!
//! Two 8259As: the master at ports 0x20-0x21 drives the processor's INTR
//! (here: the LAPIC's LINT0 in ExtINT mode), the slave at 0xA0-0xA1 drives
//! the master's IR2. ISA IRQ 0-7 reach the master's IR0-7, IRQ 8-15 the
//! slave's. The chipset's Edge/Level Control Registers at 0x4D0 (master) and
//! 0x4D1 (slave) make single inputs level triggered.
//!
//! The model follows the Intel 8259A datasheet (order no. 231468): the
//! initialization sequence ICW1-ICW4, the operation command words OCW1-OCW3,
//! priority resolution with rotation, the special fully nested and special
//! mask modes, automatic EOI, the poll command and the default IR7 response.
//! Where the datasheet describes electrical timing rather than a register
//! effect, it behaves as QEMU's `isa-i8259` and KVM's in-kernel PIC do, so a
//! guest tested there sees the same thing:
//! - an edge-triggered request is latched in the IRR by the rising edge and
//!   stays there when the line falls again before INTA (the datasheet asks
//!   the line to stay high until the first INTA; devices here may pulse);
//! - ICW1 also clears the ISR and the rotate-in-AEOI flag (the datasheet's
//!   list does not mention them; every PC emulator clears them and guests
//!   re-initializing the PIC from inside a handler rely on it);
//! - the vector is always formed the 8086 way (ICW2 T7-T3 and the IR
//!   number), even when ICW4's uPM bit asks for the MCS-80/85 CALL sequence,
//!   which an x86 processor cannot take;
//! - which chip is the master is fixed by the board wiring (SP/EN), not by
//!   ICW4's buffered-mode M/S bit, which is only recorded.
//!
//! Where they differ from the datasheet, the datasheet wins:
//! - after ICW1 an input must make a new low-to-high transition before it
//!   requests again (datasheet, ICW1 (a)); QEMU forgets the line's level;
//! - the special fully nested mode only lets the cascaded input interrupt
//!   while it is in service; lower priorities stay blocked (QEMU ignores the
//!   in-service IR2 altogether);
//! - a non-specific EOI in special mask mode skips ISR bits masked in the
//!   IMR (datasheet, "End of Interrupt").
//!
//! The master's INT is driven through an [`IrqLine`] while the `Pic` is
//! borrowed (in practice: with its mutex held), and only when its level
//! changes; the line's receiver must not lock the `Pic` from inside
//! `set_level`.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, SharedDevice};
use crate::irq::{IrqLine, IsaIrqSink};
use crate::trace::{PicId, TraceEvent, Tracer};

/// First port of the master (A0 = 0 at 0x20, A0 = 1 at 0x21).
pub const MASTER_BASE: u64 = 0x20;
/// First port of the slave.
pub const SLAVE_BASE: u64 = 0xA0;
/// The ELCR pair: 0x4D0 for IRQ 0-7, 0x4D1 for IRQ 8-15.
pub const ELCR_BASE: u64 = 0x4D0;
/// Each of the three port ranges is two ports wide.
pub const PORT_LEN: u64 = 2;

/// ELCR bits a guest can set on the master: IRQ 0 (PIT), 1 (keyboard) and
/// 2 (cascade) are always edge triggered on a PC chipset (PIIX, ICH).
pub const MASTER_ELCR_MASK: u8 = 0xF8;
/// ELCR bits a guest can set on the slave: IRQ 8 (RTC) and 13 (FPU error)
/// are always edge triggered.
pub const SLAVE_ELCR_MASK: u8 = 0xDE;

/// The master input the slave's INT is wired to, and the slave's ID.
pub const CASCADE_IR: u8 = 2;

// ICW1 (A0 = 0, D4 = 1).
const ICW1_IC4: u8 = 0x01;
const ICW1_SNGL: u8 = 0x02;
const ICW1_ADI: u8 = 0x04;
const ICW1_LTIM: u8 = 0x08;
const ICW1_SELECT: u8 = 0x10;
// OCW3 (A0 = 0, D4 = 0, D3 = 1).
const OCW3_SELECT: u8 = 0x08;
const OCW3_RIS: u8 = 0x01;
const OCW3_RR: u8 = 0x02;
const OCW3_P: u8 = 0x04;
const OCW3_SMM: u8 = 0x20;
const OCW3_ESMM: u8 = 0x40;
// ICW4.
const ICW4_UPM: u8 = 0x01;
const ICW4_AEOI: u8 = 0x02;
const ICW4_MS: u8 = 0x04;
const ICW4_BUF: u8 = 0x08;
const ICW4_SFNM: u8 = 0x10;
// The poll word's I bit: an interrupt was pending (datasheet, "The Poll
// Command").
const POLL_INTERRUPT: u8 = 0x80;
/// The default IR7 response when the request went away before INTA.
const SPURIOUS_IR: u8 = 7;
/// What an INTA reads when no chip drives the data bus (a floating bus).
const FLOATING_BUS: u8 = 0xFF;

/// Where a chip stands in its initialization sequence: which word the next
/// write with A0 = 1 is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitStep {
    /// Initialized: A0 = 1 writes are OCW1 (the IMR).
    #[default]
    Ready,
    /// After ICW1: waiting for the vector base.
    Icw2,
    /// Cascade mode: waiting for the slave mask (master) or ID (slave).
    Icw3,
    /// ICW1 had IC4 set: waiting for the mode word.
    Icw4,
}

/// One 8259A's registers and modes: what is saved and restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8259State {
    /// Interrupt Request Register.
    pub irr: u8,
    /// In-Service Register.
    pub isr: u8,
    /// Interrupt Mask Register (OCW1).
    pub imr: u8,
    /// The IR with the lowest priority; IR (lowest + 1) mod 8 is the highest.
    pub lowest_priority: u8,
    pub init_step: InitStep,
    /// ICW1 IC4: an ICW4 follows.
    pub icw4_needed: bool,
    /// ICW1 SNGL: no cascade, no ICW3.
    pub single: bool,
    /// ICW1 ADI (MCS-80/85 call address interval 4; recorded only).
    pub address_interval_4: bool,
    /// ICW1 LTIM: every input level triggered.
    pub level_triggered: bool,
    /// ICW2 T7-T3: the vector of IR n is `vector_base | n`.
    pub vector_base: u8,
    /// ICW3: on the master the inputs with a slave (S7-S0), on the slave its
    /// ID (bits 2-0).
    pub icw3: u8,
    /// ICW4 uPM: 8086/8088 mode.
    pub x86_mode: bool,
    /// ICW4 AEOI.
    pub auto_eoi: bool,
    /// ICW4 BUF (recorded only).
    pub buffered: bool,
    /// ICW4 M/S in buffered mode (recorded only).
    pub buffered_master: bool,
    /// ICW4 SFNM.
    pub special_fully_nested: bool,
    /// OCW3 RIS as last selected with RR: reads at A0 = 0 return the ISR.
    pub read_isr: bool,
    /// OCW3 P: the next read is a poll.
    pub poll: bool,
    /// OCW3 SMM.
    pub special_mask: bool,
    /// OCW2 rotate in automatic EOI mode.
    pub rotate_on_aeoi: bool,
    /// The chipset's ELCR for these eight inputs.
    pub elcr: u8,
    /// The level of each input line as last driven.
    pub line_levels: u8,
}

/// Both chips: the PIC's saved state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PicState {
    pub master: I8259State,
    pub slave: I8259State,
}

/// Which port range an access is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PicChip {
    /// 0x20-0x21.
    Master,
    /// 0xA0-0xA1.
    Slave,
    /// 0x4D0-0x4D1.
    Elcr,
}

/// The outcome of an interrupt acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inta {
    /// The vector the processor reads in the second INTA cycle.
    pub vector: u8,
    /// The ISA IRQ (0-15) put in service, or `None` for the default IR7
    /// response (spurious) or a cascade no slave answered.
    pub irq: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Master,
    Slave,
}

fn bit(ir: u8) -> u8 {
    1u8 << (ir & 7)
}

impl I8259State {
    /// Power-on state, as QEMU leaves a chip after reset; ICW3 holds the PC
    /// wiring (slave on the master's IR2, slave ID 2).
    fn power_on(role: Role, line_levels: u8) -> Self {
        I8259State {
            irr: 0,
            isr: 0,
            imr: 0,
            lowest_priority: 7,
            init_step: InitStep::Ready,
            icw4_needed: false,
            single: false,
            address_interval_4: false,
            level_triggered: false,
            vector_base: 0,
            icw3: match role {
                Role::Master => bit(CASCADE_IR),
                Role::Slave => CASCADE_IR,
            },
            x86_mode: false,
            auto_eoi: false,
            buffered: false,
            buffered_master: false,
            special_fully_nested: false,
            read_isr: false,
            poll: false,
            special_mask: false,
            rotate_on_aeoi: false,
            elcr: 0,
            line_levels,
        }
    }

    /// Keeps a restored state within what the hardware can hold.
    fn sanitize(&mut self, role: Role) {
        self.lowest_priority &= 7;
        self.vector_base &= 0xF8;
        self.elcr &= elcr_mask(role);
        if role == Role::Slave {
            self.icw3 &= 7;
        }
    }

    /// Inputs that are level triggered: all with LTIM, else the ELCR's.
    fn level_mask(&self) -> u8 {
        if self.level_triggered {
            0xFF
        } else {
            self.elcr
        }
    }

    fn is_level(&self, ir: u8) -> bool {
        self.level_mask() & bit(ir) != 0
    }

    /// Priority rank of `ir`: 0 is the highest, 7 the lowest.
    fn rank(&self, ir: u8) -> u8 {
        ir.wrapping_sub(self.lowest_priority).wrapping_sub(1) & 7
    }

    /// The highest-priority IR among the bits of `mask`.
    fn highest(&self, mask: u8) -> Option<u8> {
        (1..=8u8)
            .map(|r| self.lowest_priority.wrapping_add(r) & 7)
            .find(|&ir| mask & bit(ir) != 0)
    }

    /// Inputs that have a slave behind them (cascade mode, master only).
    fn cascade_inputs(&self, role: Role) -> u8 {
        match role {
            Role::Master if !self.single => self.icw3,
            _ => 0,
        }
    }

    /// The priority resolver: the IR this chip asks the processor to serve,
    /// which is what its INT output shows.
    fn resolve(&self, role: Role) -> Option<u8> {
        let request = self.highest(self.irr & !self.imr)?;
        // In special mask mode a masked level in service does not hold back
        // the others (datasheet, "Special Mask Mode").
        let in_service = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        match self.highest(in_service) {
            None => Some(request),
            Some(current) if self.rank(request) < self.rank(current) => Some(request),
            // Special fully nested mode: a slave in service is not locked
            // out, its (higher-priority, the slave sees to that) requests
            // come through (datasheet, "Special Fully Nest Mode").
            Some(current)
                if current == request
                    && self.special_fully_nested
                    && self.cascade_inputs(role) & bit(request) != 0 =>
            {
                Some(request)
            }
            Some(_) => None,
        }
    }

    /// A change of input `ir`'s line.
    fn set_input(&mut self, ir: u8, level: bool) {
        let b = bit(ir);
        let was_high = self.line_levels & b != 0;
        if level {
            self.line_levels |= b;
        } else {
            self.line_levels &= !b;
        }
        if self.is_level(ir) {
            // Level sensitive: the IRR follows the line.
            if level {
                self.irr |= b;
            } else {
                self.irr &= !b;
            }
        } else if level && !was_high {
            // Edge sensitive: a rising edge latches a request.
            self.irr |= b;
        }
    }

    /// Re-applies the trigger modes after LTIM or the ELCR changed: a
    /// level-sensitive IRR bit is the line itself.
    fn follow_level_lines(&mut self) {
        let level = self.level_mask();
        self.irr = (self.irr & !level) | (self.line_levels & level);
    }

    /// The chip's part of INTA (or of a poll read) for `ir`: the request
    /// moves into service (datasheet, "Interrupt Sequence").
    fn acknowledge(&mut self, ir: u8) {
        let b = bit(ir);
        // A level-sensitive request stays as long as the line is high.
        if !self.is_level(ir) {
            self.irr &= !b;
        }
        if self.auto_eoi {
            // AEOI: the EOI at the end of the INTA sequence leaves nothing
            // in service; with rotation the served level becomes lowest.
            if self.rotate_on_aeoi {
                self.lowest_priority = ir & 7;
            }
        } else {
            self.isr |= b;
        }
    }

    /// ICW1: starts the initialization sequence and resets what the
    /// datasheet lists (section "Initialization Command Words").
    fn icw1(&mut self, role: Role, value: u8) {
        self.icw4_needed = value & ICW1_IC4 != 0;
        self.single = value & ICW1_SNGL != 0;
        self.address_interval_4 = value & ICW1_ADI != 0;
        self.level_triggered = value & ICW1_LTIM != 0;
        // (a) The edge sense circuit is reset: latched edges are forgotten
        // and a high line must go low and high again; a level-sensitive
        // request is the line itself.
        self.irr = self.line_levels & self.level_mask();
        // (b) IMR cleared.
        self.imr = 0;
        // (c) IR7 lowest priority.
        self.lowest_priority = 7;
        // (d) Slave mode address 7.
        if role == Role::Slave {
            self.icw3 = 7;
        }
        // (e) Special mask mode off, status read set to the IRR.
        self.special_mask = false;
        self.read_isr = false;
        self.poll = false;
        // (f) ICW4's functions zero until an ICW4 says otherwise.
        self.x86_mode = false;
        self.auto_eoi = false;
        self.buffered = false;
        self.buffered_master = false;
        self.special_fully_nested = false;
        // As QEMU, KVM and Bochs: nothing stays in service.
        self.isr = 0;
        self.rotate_on_aeoi = false;
        self.init_step = InitStep::Icw2;
    }

    /// OCW2: EOI, rotation and priority commands (R, SL, EOI in D7-D5).
    fn ocw2(&mut self, value: u8) {
        let level = value & 7;
        match value >> 5 {
            // Rotate in automatic EOI mode: clear / set.
            0b000 => self.rotate_on_aeoi = false,
            0b100 => self.rotate_on_aeoi = true,
            // Non-specific EOI, and rotate on non-specific EOI: the highest
            // level in service ends (in special mask mode a masked one is
            // skipped, datasheet "End of Interrupt").
            cmd @ (0b001 | 0b101) => {
                let in_service = if self.special_mask {
                    self.isr & !self.imr
                } else {
                    self.isr
                };
                if let Some(ir) = self.highest(in_service) {
                    self.isr &= !bit(ir);
                    if cmd == 0b101 {
                        self.lowest_priority = ir;
                    }
                }
            }
            // Specific EOI.
            0b011 => self.isr &= !bit(level),
            // Rotate on specific EOI.
            0b111 => {
                self.isr &= !bit(level);
                self.lowest_priority = level;
            }
            // Set priority: L2-L0 becomes the lowest.
            0b110 => self.lowest_priority = level,
            // 0b010: no operation.
            _ => {}
        }
    }

    /// OCW3: read register select, poll, special mask mode.
    fn ocw3(&mut self, value: u8) {
        if value & OCW3_ESMM != 0 {
            self.special_mask = value & OCW3_SMM != 0;
        }
        if value & OCW3_P != 0 {
            self.poll = true;
        }
        if value & OCW3_RR != 0 {
            self.read_isr = value & OCW3_RIS != 0;
        }
    }

    fn write(&mut self, role: Role, offset: u8, value: u8) {
        if offset & 1 == 0 {
            if value & ICW1_SELECT != 0 {
                self.icw1(role, value);
            } else if value & OCW3_SELECT != 0 {
                self.ocw3(value);
            } else {
                self.ocw2(value);
            }
            return;
        }
        match self.init_step {
            InitStep::Ready => self.imr = value,
            InitStep::Icw2 => {
                // 8086 mode: T7-T3 of the vector; D2-D0 are ignored.
                self.vector_base = value & 0xF8;
                self.init_step = if !self.single {
                    InitStep::Icw3
                } else if self.icw4_needed {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw3 => {
                self.icw3 = match role {
                    Role::Master => value,
                    Role::Slave => value & 7,
                };
                self.init_step = if self.icw4_needed {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                self.x86_mode = value & ICW4_UPM != 0;
                self.auto_eoi = value & ICW4_AEOI != 0;
                self.buffered_master = value & ICW4_MS != 0;
                self.buffered = value & ICW4_BUF != 0;
                self.special_fully_nested = value & ICW4_SFNM != 0;
                self.init_step = InitStep::Ready;
            }
        }
    }

    fn read(&mut self, role: Role, offset: u8) -> u8 {
        if self.poll {
            // The read after a poll command is this chip's INTA: it puts
            // the highest request in service and returns the poll word
            // (datasheet, "The Poll Command").
            self.poll = false;
            return match self.resolve(role) {
                Some(ir) => {
                    self.acknowledge(ir);
                    POLL_INTERRUPT | ir
                }
                None => 0,
            };
        }
        if offset & 1 == 0 {
            if self.read_isr {
                self.isr
            } else {
                self.irr
            }
        } else {
            self.imr
        }
    }

    fn dump_line(&self, index: u8) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "pic{index}: irr={:02x} imr={:02x} isr={:02x} hprio={} irq_base={:02x} \
             rr_sel={} elcr={:02x} fnm={}",
            self.irr,
            self.imr,
            self.isr,
            self.lowest_priority.wrapping_add(1) & 7,
            self.vector_base,
            u8::from(self.read_isr),
            self.elcr,
            u8::from(self.special_fully_nested),
        );
        let _ = write!(
            s,
            " aeoi={} rot_aeoi={} smm={} poll={} ltim={} sngl={} icw3={:02x} init={:?} lines={:02x}",
            u8::from(self.auto_eoi),
            u8::from(self.rotate_on_aeoi),
            u8::from(self.special_mask),
            u8::from(self.poll),
            u8::from(self.level_triggered),
            u8::from(self.single),
            self.icw3,
            self.init_step,
            self.line_levels,
        );
        s
    }
}

fn elcr_mask(role: Role) -> u8 {
    match role {
        Role::Master => MASTER_ELCR_MASK,
        Role::Slave => SLAVE_ELCR_MASK,
    }
}

/// The cascaded 8259A pair with the ELCR.
pub struct Pic {
    master: I8259State,
    slave: I8259State,
    /// The master's INT: to the processor's INTR / LAPIC LINT0.
    int_line: Arc<dyn IrqLine>,
    /// The level last driven on `int_line`.
    int_level: bool,
    tracer: Tracer,
}

/// The IRR and ISR of both chips, to trace what an operation changed.
#[derive(Clone, Copy)]
struct Regs {
    master_irr: u8,
    master_isr: u8,
    slave_irr: u8,
    slave_isr: u8,
}

impl std::fmt::Debug for Pic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pic")
            .field("master", &self.master)
            .field("slave", &self.slave)
            .field("int_level", &self.int_level)
            .finish()
    }
}

impl Pic {
    /// A PIC pair in its power-on state, its INT (low) on `int_line`.
    pub fn new(int_line: Arc<dyn IrqLine>) -> Self {
        Pic {
            master: I8259State::power_on(Role::Master, 0),
            slave: I8259State::power_on(Role::Slave, 0),
            int_line,
            int_level: false,
            tracer: Tracer::off(),
        }
    }

    /// Records IRR / ISR changes, INTA and EOIs in `tracer`.
    pub fn set_tracer(&mut self, tracer: Tracer) {
        self.tracer = tracer;
    }

    /// The registers to compare after an operation, when tracing.
    fn trace_start(&self) -> Option<Regs> {
        self.tracer.enabled().then_some(Regs {
            master_irr: self.master.irr,
            master_isr: self.master.isr,
            slave_irr: self.slave.irr,
            slave_isr: self.slave.isr,
        })
    }

    /// Records each IRR and ISR bit that changed since `before`; ISR bits
    /// cleared by an OCW2 (`eoi`) are EOIs.
    fn trace_changes(&self, before: Option<Regs>, eoi: bool) {
        let Some(b) = before else {
            return;
        };
        for (chip, state, old_irr, old_isr, base) in [
            (PicId::Master, &self.master, b.master_irr, b.master_isr, 0u8),
            (PicId::Slave, &self.slave, b.slave_irr, b.slave_isr, 8u8),
        ] {
            for ir in 0..8u8 {
                let m = bit(ir);
                let irq = base + ir;
                if (old_irr ^ state.irr) & m != 0 {
                    self.tracer.emit(TraceEvent::PicIrr {
                        chip,
                        irq,
                        set: state.irr & m != 0,
                        irr: state.irr,
                    });
                }
                if (old_isr ^ state.isr) & m != 0 {
                    let set = state.isr & m != 0;
                    self.tracer.emit(if eoi && !set {
                        TraceEvent::PicEoi { chip, irq }
                    } else {
                        TraceEvent::PicIsr {
                            chip,
                            irq,
                            set,
                            isr: state.isr,
                        }
                    });
                }
            }
        }
    }

    /// System reset: both chips and the ELCR to their power-on state. The
    /// input lines keep their levels (the devices own them).
    pub fn reset(&mut self) {
        let before = self.trace_start();
        self.master = I8259State::power_on(Role::Master, self.master.line_levels);
        self.slave = I8259State::power_on(Role::Slave, self.slave.line_levels);
        self.update();
        self.trace_changes(before, false);
    }

    /// Drives ISA IRQ `irq` (0-15) to `level`; other numbers are ignored,
    /// and so is IRQ 2: the master's IR2 is the slave's INT (on an AT the
    /// bus's IRQ 2 pin is wired to IRQ 9).
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        let before = self.trace_start();
        match irq {
            CASCADE_IR => return,
            0..=7 => self.master.set_input(irq, level),
            8..=15 => self.slave.set_input(irq - 8, level),
            _ => return,
        }
        self.trace_changes(before, false);
        // The slave's INT into the master's IR2 (traced after the request
        // itself, and before the master's INT follows).
        let before = self.trace_start();
        self.update();
        self.trace_changes(before, false);
    }

    /// The master's INT output.
    pub fn int_output(&self) -> bool {
        self.master.resolve(Role::Master).is_some()
    }

    /// INTA: returns the vector and puts the request in service.
    pub fn intack(&mut self) -> u8 {
        self.acknowledge().vector
    }

    /// INTA with the IRQ it served, for traces.
    ///
    /// With no request left on the master (it went away or was masked since
    /// INT rose) the master answers with its IR7 vector and sets nothing in
    /// service. When the master serves the cascade input but the slave's
    /// request went away, the master's IR2 goes in service and the slave
    /// answers with its IR7 vector, its ISR untouched, as the 8259A does
    /// (and QEMU models): the guest has to EOI the master for a spurious
    /// IRQ 15.
    pub fn acknowledge(&mut self) -> Inta {
        let before = self.trace_start();
        let inta = self.acknowledge_untraced();
        if before.is_some() {
            self.tracer.emit(TraceEvent::PicInta {
                irq: inta.irq,
                vector: inta.vector,
            });
        }
        self.trace_changes(before, false);
        inta
    }

    fn acknowledge_untraced(&mut self) -> Inta {
        let Some(ir) = self.master.resolve(Role::Master) else {
            return Inta {
                vector: self.master.vector_base | SPURIOUS_IR,
                irq: None,
            };
        };
        let inta = if self.master.cascade_inputs(Role::Master) & bit(ir) != 0 {
            let inta = if self.slave_answers(ir) {
                match self.slave.resolve(Role::Slave) {
                    Some(slave_ir) => {
                        self.slave.acknowledge(slave_ir);
                        Inta {
                            vector: self.slave.vector_base | slave_ir,
                            irq: Some(slave_ir + 8),
                        }
                    }
                    None => Inta {
                        vector: self.slave.vector_base | SPURIOUS_IR,
                        irq: None,
                    },
                }
            } else {
                Inta {
                    vector: FLOATING_BUS,
                    irq: None,
                }
            };
            // The slave's INT may have fallen with its acknowledge; the
            // master's input sees that before the master's own INTA.
            let slave_int = self.slave.resolve(Role::Slave).is_some();
            self.master.set_input(CASCADE_IR, slave_int);
            inta
        } else {
            Inta {
                vector: self.master.vector_base | ir,
                irq: Some(ir),
            }
        };
        self.master.acknowledge(ir);
        self.update();
        inta
    }

    /// What the next INTA would return, without acknowledging anything;
    /// `None` while INT is low.
    pub fn pending_vector(&self) -> Option<u8> {
        let ir = self.master.resolve(Role::Master)?;
        if self.master.cascade_inputs(Role::Master) & bit(ir) == 0 {
            return Some(self.master.vector_base | ir);
        }
        if !self.slave_answers(ir) {
            return Some(FLOATING_BUS);
        }
        let slave_ir = self.slave.resolve(Role::Slave).unwrap_or(SPURIOUS_IR);
        Some(self.slave.vector_base | slave_ir)
    }

    /// Whether the slave decodes cascade address `ir` in INTA: its ID
    /// (ICW3) matches, or it was set up alone (SNGL) and answers anyway.
    fn slave_answers(&self, ir: u8) -> bool {
        self.slave.single || self.slave.icw3 & 7 == ir
    }

    /// A byte read at `offset` (0 or 1) of a port range.
    pub fn read_port(&mut self, chip: PicChip, offset: u8) -> u8 {
        let before = self.trace_start();
        let value = match chip {
            PicChip::Master => self.master.read(Role::Master, offset),
            PicChip::Slave => self.slave.read(Role::Slave, offset),
            PicChip::Elcr => {
                return match offset {
                    0 => self.master.elcr,
                    1 => self.slave.elcr,
                    _ => FLOATING_BUS,
                }
            }
        };
        // A poll read may have put something in service.
        self.update();
        self.trace_changes(before, false);
        value
    }

    /// A byte write at `offset` (0 or 1) of a port range.
    pub fn write_port(&mut self, chip: PicChip, offset: u8, value: u8) {
        let before = self.trace_start();
        // OCW2 (A0 = 0, D4 = D3 = 0): what it clears in the ISR is an EOI.
        let ocw2 = chip != PicChip::Elcr && offset == 0 && value & 0x18 == 0;
        match chip {
            PicChip::Master => self.master.write(Role::Master, offset, value),
            PicChip::Slave => self.slave.write(Role::Slave, offset, value),
            PicChip::Elcr => match offset {
                0 => {
                    self.master.elcr = value & MASTER_ELCR_MASK;
                    self.master.follow_level_lines();
                }
                1 => {
                    self.slave.elcr = value & SLAVE_ELCR_MASK;
                    self.slave.follow_level_lines();
                }
                _ => return,
            },
        }
        self.update();
        self.trace_changes(before, ocw2);
    }

    /// Recomputes the slave's INT into the master's IR2 and the master's INT
    /// onto the output line, driving it only on a change.
    fn update(&mut self) {
        let slave_int = self.slave.resolve(Role::Slave).is_some();
        self.master.set_input(CASCADE_IR, slave_int);
        let int = self.master.resolve(Role::Master).is_some();
        if int != self.int_level {
            self.tracer.emit(TraceEvent::PicInt { level: int });
            self.int_level = int;
            self.int_line.set_level(int);
        }
    }

    pub fn save_state(&self) -> PicState {
        PicState {
            master: self.master.clone(),
            slave: self.slave.clone(),
        }
    }

    /// Restores a saved state (values out of the hardware's range are
    /// trimmed) and drives INT to match it.
    pub fn restore_state(&mut self, state: &PicState) {
        self.master = state.master.clone();
        self.master.sanitize(Role::Master);
        self.slave = state.slave.clone();
        self.slave.sanitize(Role::Slave);
        self.update();
        // Restoring is not an interrupt event: nothing is traced.
    }

    /// The registers of both chips, one line each, as QEMU's `info pic`
    /// prints them (followed by the modes QEMU does not show).
    pub fn dump(&self) -> String {
        format!("{}\n{}", self.master.dump_line(0), self.slave.dump_line(1))
    }

    /// The dump of one port range's registers.
    pub fn dump_chip(&self, chip: PicChip) -> String {
        match chip {
            PicChip::Master => self.master.dump_line(0),
            PicChip::Slave => self.slave.dump_line(1),
            PicChip::Elcr => format!(
                "elcr: 4d0={:02x} 4d1={:02x}",
                self.master.elcr, self.slave.elcr
            ),
        }
    }
}

/// One of the PIC's three port ranges on the I/O bus.
pub struct PicPorts {
    pic: Arc<Mutex<Pic>>,
    chip: PicChip,
}

impl PicPorts {
    pub fn new(pic: Arc<Mutex<Pic>>, chip: PicChip) -> Self {
        PicPorts { pic, chip }
    }

    /// The port where this range starts on a PC.
    pub fn base(&self) -> u64 {
        match self.chip {
            PicChip::Master => MASTER_BASE,
            PicChip::Slave => SLAVE_BASE,
            PicChip::Elcr => ELCR_BASE,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pic> {
        // A poisoned lock means another thread panicked inside the PIC; the
        // state is still a plain struct, keep using it.
        self.pic.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The three port ranges of `pic` as (device, base, length), ready for
/// `Bus::insert`: master 0x20, slave 0xA0, ELCR 0x4D0, two ports each.
pub fn pc_port_devices(pic: &Arc<Mutex<Pic>>) -> [(SharedDevice, u64, u64); 3] {
    [PicChip::Master, PicChip::Slave, PicChip::Elcr].map(|chip| {
        let ports = PicPorts::new(pic.clone(), chip);
        let base = ports.base();
        let dev: SharedDevice = Arc::new(Mutex::new(ports));
        (dev, base, PORT_LEN)
    })
}

/// Byte `i` of an access at `offset` as a port offset, if it is one of
/// the range's two ports. A 16-bit access is two byte cycles, low port
/// first, as on the ISA bus.
fn port_offset(offset: u64, i: usize) -> Option<u8> {
    let o = offset.checked_add(u64::try_from(i).ok()?)?;
    (o < PORT_LEN).then_some(o as u8)
}

impl BusDevice for PicPorts {
    fn name(&self) -> &'static str {
        match self.chip {
            PicChip::Master => "pic-master",
            PicChip::Slave => "pic-slave",
            PicChip::Elcr => "elcr",
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let chip = self.chip;
        let mut pic = self.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match port_offset(offset, i) {
                Some(o) => pic.read_port(chip, o),
                None => FLOATING_BUS,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let chip = self.chip;
        let mut pic = self.lock();
        for (i, &byte) in data.iter().enumerate() {
            if let Some(o) = port_offset(offset, i) {
                pic.write_port(chip, o, byte);
            }
        }
    }

    fn dump(&self) -> String {
        self.lock().dump_chip(self.chip)
    }
}

/// The PIC as a receiver of the ISA interrupt router's lines.
pub struct PicIrqSink(pub Arc<Mutex<Pic>>);

impl IsaIrqSink for PicIrqSink {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_irq(irq, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// The processor's INTR pin: records the level and counts calls that
    /// did not change it.
    #[derive(Default)]
    struct IntPin {
        level: AtomicBool,
        changes: AtomicUsize,
        redundant: AtomicUsize,
    }

    impl IrqLine for IntPin {
        fn set_level(&self, level: bool) {
            if self.level.swap(level, Ordering::SeqCst) == level {
                self.redundant.fetch_add(1, Ordering::SeqCst);
            } else {
                self.changes.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    /// A guest's view: the PIC on a port bus, lines through the ISA sink.
    struct Pc {
        pic: Arc<Mutex<Pic>>,
        bus: Bus,
        sink: PicIrqSink,
        pin: Arc<IntPin>,
    }

    impl Pc {
        fn new() -> Self {
            let pin = Arc::new(IntPin::default());
            let pic = Arc::new(Mutex::new(Pic::new(pin.clone())));
            let mut bus = Bus::new(BusKind::Pio);
            for (dev, base, len) in pc_port_devices(&pic) {
                bus.insert(dev, base, len).unwrap();
            }
            let sink = PicIrqSink(pic.clone());
            Pc {
                pic,
                bus,
                sink,
                pin,
            }
        }

        /// The standard PC initialization (Linux, SeaBIOS), then IMRs open.
        fn initialized() -> Self {
            let pc = Self::new();
            pc.init(0x11, 0x20, 0x01, 0x11, 0x28, 0x01);
            pc
        }

        fn init(&self, icw1: u8, base_m: u8, icw4_m: u8, icw1_s: u8, base_s: u8, icw4_s: u8) {
            self.outb(0x20, icw1);
            self.outb(0x21, base_m);
            self.outb(0x21, 0x04);
            self.outb(0x21, icw4_m);
            self.outb(0xA0, icw1_s);
            self.outb(0xA1, base_s);
            self.outb(0xA1, 0x02);
            self.outb(0xA1, icw4_s);
            self.outb(0x21, 0x00);
            self.outb(0xA1, 0x00);
        }

        fn outb(&self, port: u64, v: u8) {
            assert!(self.bus.write(port, &[v]), "no device at {port:#x}");
        }

        fn inb(&self, port: u64) -> u8 {
            let mut b = [0u8];
            assert!(self.bus.read(port, &mut b), "no device at {port:#x}");
            b[0]
        }

        fn irq(&self, n: u8, level: bool) {
            self.sink.set_isa_irq(n, level);
        }

        fn pulse(&self, n: u8) {
            self.irq(n, true);
            self.irq(n, false);
        }

        fn intack(&self) -> u8 {
            self.pic.lock().unwrap().intack()
        }

        fn int(&self) -> bool {
            let pin = self.pin.level.load(Ordering::SeqCst);
            assert_eq!(pin, self.pic.lock().unwrap().int_output());
            pin
        }

        fn pending(&self) -> Option<u8> {
            self.pic.lock().unwrap().pending_vector()
        }

        /// OCW3 read IRR, then read it.
        fn irr(&self, cmd: u64) -> u8 {
            self.outb(cmd, 0x0A);
            self.inb(cmd)
        }

        /// OCW3 read ISR, then read it.
        fn isr(&self, cmd: u64) -> u8 {
            self.outb(cmd, 0x0B);
            self.inb(cmd)
        }

        fn eoi(&self, cmd: u64) {
            self.outb(cmd, 0x20);
        }

        fn state(&self) -> PicState {
            self.pic.lock().unwrap().save_state()
        }
    }

    #[test]
    fn pc_init_irq0_is_delivered_and_put_in_service() {
        let pc = Pc::initialized();
        let s = pc.state();
        assert_eq!(s.master.vector_base, 0x20);
        assert_eq!(s.slave.vector_base, 0x28);
        assert_eq!(s.master.icw3, 0x04);
        assert_eq!(s.slave.icw3, 0x02);
        assert!(s.master.x86_mode && s.slave.x86_mode);
        assert_eq!(s.master.init_step, InitStep::Ready);
        assert!(!pc.int());

        pc.irq(0, true);
        assert!(pc.int());
        assert_eq!(pc.pending(), Some(0x20));
        assert_eq!(pc.irr(0x20), 0x01);
        assert_eq!(pc.intack(), 0x20);
        assert_eq!(pc.isr(0x20), 0x01);
        assert_eq!(pc.irr(0x20), 0x00, "edge request consumed by INTA");
        assert!(!pc.int());
        assert_eq!(pc.pending(), None);
    }

    #[test]
    fn non_specific_eoi_clears_isr() {
        let pc = Pc::initialized();
        pc.pulse(4);
        assert_eq!(pc.intack(), 0x24);
        assert_eq!(pc.isr(0x20), 0x10);
        pc.eoi(0x20);
        assert_eq!(pc.isr(0x20), 0x00);
        assert!(!pc.int());
    }

    #[test]
    fn imr_masks_but_irr_latches() {
        let pc = Pc::initialized();
        pc.outb(0x21, 0x01);
        assert_eq!(pc.inb(0x21), 0x01);
        pc.irq(0, true);
        assert!(!pc.int());
        assert_eq!(pc.irr(0x20), 0x01);
        pc.outb(0x21, 0x00);
        assert!(pc.int());
        assert_eq!(pc.intack(), 0x20);
        // Masking the slave's line hides it from the master too.
        pc.outb(0xA1, 0x10);
        pc.irq(12, true);
        assert!(!pc.int());
        assert_eq!(pc.irr(0xA0), 0x10);
        pc.eoi(0x20);
        pc.outb(0xA1, 0x00);
        assert!(pc.int());
        assert_eq!(pc.intack(), 0x2C);
    }

    #[test]
    fn lower_irq_number_wins_and_nesting_follows_priority() {
        let pc = Pc::initialized();
        pc.irq(3, true);
        pc.irq(1, true);
        assert_eq!(pc.intack(), 0x21);
        // IR3 is lower than IR1 in service: held back.
        assert!(!pc.int());
        pc.eoi(0x20);
        assert_eq!(pc.intack(), 0x23);
        // IR1 (higher) preempts IR3 in service.
        pc.irq(1, false);
        pc.irq(1, true);
        assert!(pc.int());
        assert_eq!(pc.intack(), 0x21);
        assert_eq!(pc.isr(0x20), 0x0A);
        // IR5 (lower) does not.
        pc.irq(5, true);
        assert!(!pc.int());
        pc.eoi(0x20); // ends IR1, the highest in service
        assert_eq!(pc.isr(0x20), 0x08);
        assert!(!pc.int());
        pc.eoi(0x20);
        assert!(pc.int());
        assert_eq!(pc.intack(), 0x25);
    }

    #[test]
    fn slave_irq_goes_through_the_cascade() {
        let pc = Pc::initialized();
        pc.irq(8, true);
        assert!(pc.int());
        assert_eq!(pc.pending(), Some(0x28));
        assert_eq!(pc.irr(0x20), 0x04);
        let inta = pc.pic.lock().unwrap().acknowledge();
        assert_eq!(
            inta,
            Inta {
                vector: 0x28,
                irq: Some(8)
            }
        );
        assert_eq!(pc.isr(0x20), 0x04);
        assert_eq!(pc.isr(0xA0), 0x01);
        assert!(!pc.int());
        pc.eoi(0xA0);
        pc.eoi(0x20);
        assert_eq!(pc.isr(0xA0), 0);
        assert_eq!(pc.isr(0x20), 0);
        // While IRQ 12 is in service (master IR2 too), IRQ 3 waits.
        pc.irq(12, true);
        assert_eq!(pc.intack(), 0x2C);
        pc.irq(3, true);
        assert!(!pc.int());
        pc.eoi(0xA0);
        pc.eoi(0x20);
        assert_eq!(pc.intack(), 0x23);
    }

    #[test]
    fn level_mode_via_elcr_follows_the_line() {
        let pc = Pc::initialized();
        pc.outb(0x4D0, 0x20); // IRQ 5 level triggered
        pc.irq(5, true);
        assert_eq!(pc.intack(), 0x25);
        assert_eq!(pc.irr(0x20), 0x20, "a level request stays while high");
        assert!(!pc.int(), "in service holds it back");
        pc.eoi(0x20);
        assert!(pc.int(), "still high after EOI: requested again");
        assert_eq!(pc.intack(), 0x25);
        pc.irq(5, false);
        assert_eq!(pc.irr(0x20), 0x00);
        pc.eoi(0x20);
        assert!(!pc.int());
        // Slave side: IRQ 11.
        pc.outb(0x4D1, 0x08);
        pc.irq(11, true);
        assert_eq!(pc.intack(), 0x2B);
        pc.eoi(0xA0);
        pc.eoi(0x20);
        assert!(pc.int());
        // The line falls before INTA: the master's latched cascade edge
        // still asks, and the slave answers with its IR7 (spurious IRQ 15).
        pc.irq(11, false);
        assert_eq!(pc.irr(0xA0), 0x00);
        assert!(pc.int());
        assert_eq!(pc.pending(), Some(0x2F));
    }

    #[test]
    fn ltim_makes_the_whole_chip_level_triggered() {
        let pc = Pc::new();
        pc.init(0x19, 0x20, 0x01, 0x11, 0x28, 0x01);
        assert!(pc.state().master.level_triggered);
        pc.irq(0, true);
        assert_eq!(pc.intack(), 0x20);
        pc.eoi(0x20);
        assert!(pc.int());
        pc.irq(0, false);
        assert!(!pc.int());
        assert_eq!(pc.irr(0x20), 0);
    }

    #[test]
    fn edge_mode_latches_a_pulse_and_a_held_line_does_not_retrigger() {
        let pc = Pc::initialized();
        pc.pulse(4);
        assert_eq!(pc.irr(0x20), 0x10, "pulse latched");
        assert!(pc.int());
        assert_eq!(pc.intack(), 0x24);
        pc.eoi(0x20);
        assert!(!pc.int());
        pc.irq(4, true);
        assert_eq!(pc.intack(), 0x24);
        pc.eoi(0x20);
        pc.irq(4, true); // held: no new edge
        assert!(!pc.int());
        assert_eq!(pc.irr(0x20), 0);
        pc.irq(4, false);
        pc.irq(4, true);
        assert!(pc.int());
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let pc = Pc::new();
        pc.init(0x11, 0x20, 0x03, 0x11, 0x28, 0x01);
        assert!(pc.state().master.auto_eoi);
        pc.irq(1, true);
        assert_eq!(pc.intack(), 0x21);
        assert_eq!(pc.isr(0x20), 0);
        // A lower level is served without any EOI.
        pc.irq(6, true);
        assert!(pc.int());
        assert_eq!(pc.intack(), 0x26);
        assert_eq!(pc.isr(0x20), 0);
        assert_eq!(pc.state().master.lowest_priority, 7, "no rotation");
    }

    #[test]
    fn rotate_on_non_specific_eoi_makes_the_served_irq_lowest() {
        let pc = Pc::initialized();
        pc.pulse(0);
        assert_eq!(pc.intack(), 0x20);
        pc.outb(0x20, 0xA0);
        assert_eq!(pc.isr(0x20), 0);
        assert_eq!(pc.state().master.lowest_priority, 0);
        pc.pulse(0);
        pc.pulse(3);
        assert_eq!(pc.intack(), 0x23, "IR0 is now the lowest");
        pc.outb(0x20, 0xA0); // IR3 lowest, IR4 highest
        assert_eq!(pc.intack(), 0x20);
        assert!(pc.pic.lock().unwrap().dump().contains("hprio=4"));
    }

    #[test]
    fn set_priority_and_rotate_on_specific_eoi() {
        let pc = Pc::initialized();
        pc.outb(0x20, 0xC4); // IR4 lowest: IR5 highest
        pc.pulse(3);
        pc.pulse(5);
        assert_eq!(pc.intack(), 0x25);
        // IR3 is below IR5: waits.
        assert!(!pc.int());
        pc.outb(0x20, 0xE5); // rotate on specific EOI of IR5
        assert_eq!(pc.state().master.lowest_priority, 5);
        assert_eq!(pc.isr(0x20), 0);
        assert_eq!(pc.intack(), 0x23);
        // No operation leaves everything as it is.
        let before = pc.state();
        pc.outb(0x20, 0x40);
        assert_eq!(pc.state(), before);
    }

    #[test]
    fn rotate_in_auto_eoi_mode() {
        let pc = Pc::new();
        pc.init(0x11, 0x20, 0x03, 0x11, 0x28, 0x01);
        pc.outb(0x20, 0x80); // set rotate in AEOI
        assert!(pc.state().master.rotate_on_aeoi);
        pc.pulse(4);
        assert_eq!(pc.intack(), 0x24);
        assert_eq!(pc.state().master.lowest_priority, 4);
        assert_eq!(pc.isr(0x20), 0);
        pc.pulse(1);
        pc.pulse(5);
        assert_eq!(pc.intack(), 0x25, "IR5 is highest after IR4 was served");
        assert_eq!(pc.state().master.lowest_priority, 5);
        pc.outb(0x20, 0x00); // clear rotate in AEOI
        assert!(!pc.state().master.rotate_on_aeoi);
        assert_eq!(pc.intack(), 0x21);
        assert_eq!(pc.state().master.lowest_priority, 5);
    }

    #[test]
    fn specific_eoi_ends_the_named_level() {
        let pc = Pc::initialized();
        pc.irq(3, true);
        assert_eq!(pc.intack(), 0x23);
        pc.irq(1, true);
        assert_eq!(pc.intack(), 0x21);
        assert_eq!(pc.isr(0x20), 0x0A);
        pc.outb(0x20, 0x63); // specific EOI IR3
        assert_eq!(pc.isr(0x20), 0x02);
        pc.outb(0x20, 0x61);
        assert_eq!(pc.isr(0x20), 0x00);
        assert_eq!(pc.state().master.lowest_priority, 7);
    }

    #[test]
    fn special_mask_mode_enables_lower_levels() {
        let pc = Pc::initialized();
        pc.irq(3, true);
        assert_eq!(pc.intack(), 0x23);
        pc.irq(5, true);
        assert!(!pc.int());
        pc.outb(0x20, 0x68); // set special mask mode
        pc.outb(0x21, 0x08); // mask IR3 (in service)
        assert!(pc.state().master.special_mask);
        assert!(pc.int(), "IR5 enabled while IR3 is masked in service");
        assert_eq!(pc.intack(), 0x25);
        assert_eq!(pc.isr(0x20), 0x28);
        // A non-specific EOI skips the masked IR3.
        pc.eoi(0x20);
        assert_eq!(pc.isr(0x20), 0x08);
        pc.outb(0x20, 0x48); // reset special mask mode
        pc.outb(0x21, 0x00);
        assert!(!pc.state().master.special_mask);
        pc.irq(5, false);
        pc.irq(5, true);
        assert!(!pc.int(), "normal nesting again: IR3 holds IR5 back");
        pc.eoi(0x20);
        assert_eq!(pc.intack(), 0x25);
    }

    #[test]
    fn special_fully_nested_mode_lets_higher_slave_irqs_nest() {
        // Normal nesting first: IRQ 9 waits while IRQ 10 is in service.
        let pc = Pc::initialized();
        pc.irq(10, true);
        assert_eq!(pc.intack(), 0x2A);
        pc.irq(9, true);
        assert!(!pc.int());

        let pc = Pc::new();
        pc.init(0x11, 0x20, 0x11, 0x11, 0x28, 0x01);
        assert!(pc.state().master.special_fully_nested);
        pc.irq(10, true);
        assert_eq!(pc.intack(), 0x2A);
        pc.irq(9, true);
        assert!(pc.int(), "SFNM: the slave is not locked out");
        assert_eq!(pc.intack(), 0x29);
        assert_eq!(pc.isr(0xA0), 0x06);
        assert_eq!(pc.isr(0x20), 0x04);
        // A lower slave level stays blocked by the slave itself, and a lower
        // master level by the master's IR2 in service.
        pc.irq(11, true);
        pc.irq(3, true);
        assert!(!pc.int());
        // The guest's SFNM exit: EOI the slave, EOI the master only when the
        // slave's ISR is empty.
        pc.eoi(0xA0);
        assert_eq!(pc.isr(0xA0), 0x04);
        pc.eoi(0xA0);
        assert_eq!(pc.isr(0xA0), 0x00);
        pc.eoi(0x20);
        assert_eq!(pc.intack(), 0x2B, "IR2 (slave) outranks IR3");
    }

    #[test]
    fn poll_command_reads_the_level_and_acknowledges() {
        let pc = Pc::initialized();
        pc.outb(0x21, 0xFF); // the processor's INT is not used when polling
        pc.outb(0x20, 0x0C);
        assert_eq!(pc.inb(0x20), 0x00, "nothing pending");
        pc.outb(0x21, 0x00);
        pc.irq(6, true);
        pc.irq(7, true);
        pc.outb(0x20, 0x0C);
        assert_eq!(pc.inb(0x20), 0x86);
        assert_eq!(pc.isr(0x20), 0x40);
        assert_eq!(pc.irr(0x20), 0x80);
        // The poll is one read only: the next read is the IRR again.
        assert_eq!(pc.inb(0x20), 0x80);
        // Polling the master for a slave request acknowledges IR2 only.
        pc.eoi(0x20);
        pc.irq(13, true);
        pc.outb(0x20, 0x0C);
        assert_eq!(pc.inb(0x20), 0x82);
        pc.outb(0xA0, 0x0C);
        assert_eq!(pc.inb(0xA1), 0x85, "poll word at either port");
        assert_eq!(pc.isr(0xA0), 0x20);
        assert_eq!(pc.isr(0x20), 0x04);
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_a0_1_reads_imr() {
        let pc = Pc::initialized();
        pc.outb(0x21, 0x5A);
        pc.irq(0, true);
        assert_eq!(pc.intack(), 0x20);
        pc.irq(5, true); // IMR 0x5A leaves IR5 open
        pc.outb(0x20, 0x0B);
        assert_eq!(pc.inb(0x20), 0x01);
        assert_eq!(pc.inb(0x20), 0x01, "selection persists");
        assert_eq!(pc.inb(0x21), 0x5A);
        pc.outb(0x20, 0x08); // RR = 0: no change
        assert_eq!(pc.inb(0x20), 0x01);
        pc.outb(0x20, 0x0A);
        assert_eq!(pc.inb(0x20), 0x20);
        assert_eq!(pc.inb(0x21), 0x5A);
    }

    #[test]
    fn spurious_irq7_when_the_request_goes_away_before_inta() {
        let pc = Pc::initialized();
        pc.outb(0x4D0, 0x20); // IRQ 5 level, as a PCI line
        pc.irq(5, true);
        assert!(pc.int());
        pc.irq(5, false);
        assert!(!pc.int());
        // The processor had already sampled INTR.
        let inta = pc.pic.lock().unwrap().acknowledge();
        assert_eq!(
            inta,
            Inta {
                vector: 0x27,
                irq: None
            }
        );
        assert_eq!(pc.isr(0x20), 0x00, "IR7 not put in service");

        // Masking an edge request after INT rose has the same effect.
        pc.pulse(6);
        assert!(pc.int());
        pc.outb(0x21, 0x40);
        assert_eq!(pc.intack(), 0x27);
        assert_eq!(pc.isr(0x20), 0x00);
        assert_eq!(pc.irr(0x20), 0x40, "the masked request is still there");
    }

    #[test]
    fn spurious_irq15_puts_master_ir2_in_service() {
        let pc = Pc::initialized();
        pc.outb(0x4D1, 0x04); // IRQ 10 level
        pc.irq(10, true);
        assert_eq!(pc.irr(0x20), 0x04);
        pc.irq(10, false);
        // The master latched the cascade edge; the slave has nothing.
        assert!(pc.int());
        assert_eq!(pc.pending(), Some(0x2F));
        let inta = pc.pic.lock().unwrap().acknowledge();
        assert_eq!(
            inta,
            Inta {
                vector: 0x2F,
                irq: None
            }
        );
        assert_eq!(pc.isr(0xA0), 0x00);
        assert_eq!(pc.isr(0x20), 0x04, "the guest must EOI the master");
        pc.eoi(0x20);
        assert_eq!(pc.isr(0x20), 0x00);
    }

    #[test]
    fn elcr_write_masks() {
        let pc = Pc::initialized();
        pc.outb(0x4D0, 0xFF);
        pc.outb(0x4D1, 0xFF);
        assert_eq!(pc.inb(0x4D0), 0xF8);
        assert_eq!(pc.inb(0x4D1), 0xDE);
        pc.outb(0x4D0, 0x07);
        assert_eq!(pc.inb(0x4D0), 0x00);
        // A 16-bit access covers both registers, low port first.
        assert!(pc.bus.write(0x4D0, &[0x28, 0x21]));
        let mut w = [0u8; 2];
        assert!(pc.bus.read(0x4D0, &mut w));
        assert_eq!(w, [0x28, 0x00]);
        // IRQ 0 cannot be made level: a held PIT line does not retrigger.
        pc.outb(0x4D0, 0xFF);
        pc.irq(0, true);
        assert_eq!(pc.intack(), 0x20);
        pc.eoi(0x20);
        assert!(!pc.int());
    }

    #[test]
    fn elcr_switch_to_level_follows_the_line_at_once() {
        let pc = Pc::initialized();
        pc.outb(0x21, 0xFF);
        pc.pulse(9); // IRQ 9 edge-latched, line low again
        assert_eq!(pc.irr(0xA0), 0x02);
        pc.outb(0x4D1, 0x02); // level: the IRR is the (low) line
        assert_eq!(pc.irr(0xA0), 0x00);
        pc.irq(9, true);
        assert_eq!(pc.irr(0xA0), 0x02);
    }

    #[test]
    fn icw1_resets_what_the_datasheet_lists() {
        let pc = Pc::initialized();
        pc.irq(3, true);
        assert_eq!(pc.intack(), 0x23);
        pc.pulse(6);
        pc.outb(0x21, 0x81);
        pc.outb(0x20, 0x68); // special mask mode
        pc.outb(0x20, 0xC2); // IR2 lowest
        pc.outb(0x20, 0x0B); // read ISR
        pc.outb(0x20, 0x11);
        let m = pc.state().master;
        assert_eq!(m.imr, 0);
        assert_eq!(m.lowest_priority, 7);
        assert!(!m.special_mask);
        assert!(!m.read_isr);
        assert_eq!(m.isr, 0);
        assert_eq!(m.irr, 0, "latched edges are forgotten");
        assert_eq!(m.init_step, InitStep::Icw2);
        pc.outb(0x21, 0x30);
        pc.outb(0x21, 0x04);
        pc.outb(0x21, 0x01);
        assert_eq!(pc.state().master.init_step, InitStep::Ready);
        // IRQ 3 is still high: it must go low and high again.
        assert!(!pc.int());
        pc.irq(3, false);
        pc.irq(3, true);
        assert_eq!(pc.intack(), 0x33);
        // A slave's ICW1 sets its ID to 7 until ICW3.
        pc.outb(0xA0, 0x11);
        assert_eq!(pc.state().slave.icw3, 7);
        // ICW1 without IC4 clears the ICW4 functions.
        pc.outb(0x20, 0x10);
        let m = pc.state().master;
        assert!(!m.x86_mode && !m.auto_eoi && !m.special_fully_nested);
    }

    #[test]
    fn init_sequence_follows_sngl_and_ic4() {
        // Cascade without ICW4: ICW2, ICW3, then OCW1.
        let pc = Pc::new();
        pc.outb(0x20, 0x10);
        pc.outb(0x21, 0x47); // T7-T3 only
        assert_eq!(pc.state().master.init_step, InitStep::Icw3);
        pc.outb(0x21, 0x04);
        assert_eq!(pc.state().master.init_step, InitStep::Ready);
        pc.outb(0x21, 0x3C);
        let m = pc.state().master;
        assert_eq!((m.vector_base, m.icw3, m.imr), (0x40, 0x04, 0x3C));
        // Single with ICW4: ICW2, ICW4, then OCW1.
        pc.outb(0x20, 0x13);
        pc.outb(0x21, 0x50);
        assert_eq!(pc.state().master.init_step, InitStep::Icw4);
        pc.outb(0x21, 0x1F);
        let m = pc.state().master;
        assert!(m.single && m.x86_mode && m.auto_eoi && m.buffered && m.special_fully_nested);
        assert!(m.buffered_master);
        pc.outb(0x21, 0x11);
        assert_eq!(pc.state().master.imr, 0x11);
        // Single without ICW4: ICW2, then OCW1.
        pc.outb(0x20, 0x12);
        pc.outb(0x21, 0x60);
        assert_eq!(pc.state().master.init_step, InitStep::Ready);
        pc.outb(0x21, 0x22);
        assert_eq!(pc.state().master.imr, 0x22);
    }

    #[test]
    fn single_master_serves_ir2_itself_and_cascade_follows_icw3() {
        let pc = Pc::new();
        pc.outb(0x20, 0x13);
        pc.outb(0x21, 0x08);
        pc.outb(0x21, 0x01);
        pc.irq(2, true); // not a device input: ignored
        assert!(!pc.int());
        pc.irq(8, true);
        assert_eq!(pc.intack(), 0x0A, "no cascade: the master's own IR2 vector");
        assert_eq!(pc.isr(0x20), 0x04);
        assert_eq!(pc.isr(0xA0), 0x00);

        // A slave whose ID does not match the master's cascade address
        // leaves the data bus floating and its ISR empty.
        let pc = Pc::initialized();
        pc.outb(0xA0, 0x11);
        pc.outb(0xA1, 0x28);
        pc.outb(0xA1, 0x05);
        pc.outb(0xA1, 0x01);
        pc.irq(8, true);
        assert_eq!(pc.pending(), Some(0xFF));
        assert_eq!(pc.intack(), 0xFF);
        assert_eq!(pc.isr(0xA0), 0x00);
        assert_eq!(pc.isr(0x20), 0x04);
        pc.eoi(0x20);
        // Fixed by a proper init.
        pc.init(0x11, 0x20, 0x01, 0x11, 0x28, 0x01);
        pc.irq(8, false);
        pc.irq(8, true);
        assert_eq!(pc.intack(), 0x28);
    }

    #[test]
    fn int_line_is_driven_only_on_changes() {
        let pc = Pc::initialized();
        pc.irq(0, true);
        pc.irq(1, true);
        pc.irq(8, true);
        pc.outb(0x21, 0x00);
        assert_eq!(pc.pin.changes.load(Ordering::SeqCst), 1);
        assert_eq!(pc.intack(), 0x20);
        pc.eoi(0x20);
        assert_eq!(pc.intack(), 0x21);
        pc.eoi(0x20);
        assert_eq!(pc.intack(), 0x28);
        assert!(!pc.int());
        assert_eq!(pc.pin.redundant.load(Ordering::SeqCst), 0);
        assert!(pc.pin.changes.load(Ordering::SeqCst) >= 3);
    }

    #[test]
    fn pending_vector_has_no_side_effects() {
        let pc = Pc::initialized();
        pc.irq(9, true);
        let before = pc.state();
        assert_eq!(pc.pending(), Some(0x29));
        assert_eq!(pc.pending(), Some(0x29));
        assert_eq!(pc.state(), before);
        assert_eq!(pc.intack(), 0x29);
        assert_eq!(pc.pending(), None);
    }

    #[test]
    fn out_of_range_irqs_are_ignored() {
        let pc = Pc::initialized();
        let before = pc.state();
        for irq in [16u8, 17, 100, 255] {
            pc.irq(irq, true);
        }
        assert_eq!(pc.state(), before);
        assert!(!pc.int());
    }

    #[test]
    fn save_and_restore_round_trip_and_drive_int() {
        let pc = Pc::initialized();
        pc.outb(0x4D1, 0x04);
        pc.irq(10, true);
        pc.irq(3, true);
        pc.outb(0x20, 0xC5);
        let saved = pc.state();
        assert!(pc.int());

        let other = Pc::new();
        assert!(!other.int());
        other.pic.lock().unwrap().restore_state(&saved);
        assert_eq!(other.state(), saved);
        assert!(other.int(), "restore drives INT");
        assert_eq!(other.intack(), pc.intack());

        // Out-of-range values are trimmed.
        let mut bad = saved.clone();
        bad.master.lowest_priority = 200;
        bad.master.vector_base = 0xFF;
        bad.slave.elcr = 0xFF;
        other.pic.lock().unwrap().restore_state(&bad);
        let s = other.state();
        assert_eq!(s.master.lowest_priority, 200 & 7);
        assert_eq!(s.master.vector_base, 0xF8);
        assert_eq!(s.slave.elcr, SLAVE_ELCR_MASK);
    }

    #[test]
    fn reset_returns_to_power_on() {
        let pc = Pc::initialized();
        pc.outb(0x4D0, 0x20);
        pc.irq(5, true);
        assert!(pc.int());
        pc.pic.lock().unwrap().reset();
        let s = pc.state();
        assert_eq!(s.master.elcr, 0);
        assert_eq!(s.master.vector_base, 0);
        assert_eq!(s.master.line_levels, 0x20, "lines keep their level");
        assert_eq!(s.master.irr, 0);
        assert!(!pc.int());
    }

    #[test]
    fn dump_looks_like_info_pic() {
        let pc = Pc::initialized();
        pc.outb(0x21, 0xB8);
        pc.outb(0xA1, 0x8E);
        pc.outb(0x4D1, 0x0C);
        pc.irq(1, true);
        let d = pc.pic.lock().unwrap().dump();
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with(
                "pic0: irr=02 imr=b8 isr=00 hprio=0 irq_base=20 rr_sel=0 elcr=00 fnm=0"
            ),
            "{d}"
        );
        assert!(
            lines[1].starts_with(
                "pic1: irr=00 imr=8e isr=00 hprio=0 irq_base=28 rr_sel=0 elcr=0c fnm=0"
            ),
            "{d}"
        );
        let devs = pc.bus.devices();
        let names: Vec<String> = devs
            .iter()
            .map(|(_, _, d)| d.lock().unwrap().dump())
            .collect();
        assert!(names[0].starts_with("pic0:"));
        assert!(names[1].starts_with("pic1:"));
        assert_eq!(names[2], "elcr: 4d0=00 4d1=0c");
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn fuzz_random_guest_and_lines_no_panic_bounded_state() {
        const PORTS: [u64; 6] = [0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1];
        let pc = Pc::new();
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut intas = 0u32;
        let mut served = [0u32; 16];
        for step in 0..200_000u32 {
            let r = rng.next();
            let value = (r >> 8) as u8;
            let port = PORTS[((r >> 16) % 6) as usize];
            match r % 8 {
                0 | 1 => pc.outb(port, value),
                2 => {
                    pc.inb(port);
                }
                3 | 4 => pc.irq((r >> 24) as u8 % 20, r & 0x100 != 0),
                5 => {
                    let pending = pc.pending();
                    let int = pc.int();
                    assert_eq!(pending.is_some(), int);
                    let inta = pc.pic.lock().unwrap().acknowledge();
                    if let Some(v) = pending {
                        assert_eq!(inta.vector, v, "pending_vector predicts INTA");
                    }
                    if let Some(irq) = inta.irq {
                        served[usize::from(irq)] += 1;
                    }
                    intas += 1;
                }
                6 => {
                    // Odd-sized accesses straddling the ranges.
                    let mut buf = [0u8; 2];
                    pc.bus.read(port, &mut buf);
                    pc.bus.write(port + 1, &buf);
                }
                _ => {
                    if step % 1000 == 7 {
                        let saved = pc.state();
                        pc.pic.lock().unwrap().restore_state(&saved);
                        assert_eq!(pc.state(), saved);
                    }
                }
            }
            let s = pc.state();
            for (chip, mask) in [(&s.master, MASTER_ELCR_MASK), (&s.slave, SLAVE_ELCR_MASK)] {
                assert!(chip.lowest_priority < 8);
                assert_eq!(chip.vector_base & 7, 0);
                assert_eq!(chip.elcr & !mask, 0);
                // A level-sensitive request is exactly its line.
                let level = chip.level_mask();
                assert_eq!(chip.irr & level, chip.line_levels & level);
            }
            assert!(s.slave.icw3 < 8);
            // The pin always shows the master's INT, and was never driven
            // with an unchanged level.
            pc.int();
        }
        assert!(intas > 10_000);
        // The walk reached real deliveries on both chips.
        assert!(served[..8].iter().sum::<u32>() > 100, "{served:?}");
        assert!(served[8..].iter().sum::<u32>() > 100, "{served:?}");
        assert_eq!(pc.pin.redundant.load(Ordering::SeqCst), 0);
    }
}
