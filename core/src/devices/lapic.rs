//! The local APIC, one per vCPU (Intel SDM vol. 3, chapter 11 "Advanced
//! Programmable Interrupt Controller (APIC)"), as a plain state machine.
//!
//! Interfaces:
//! - the xAPIC register page (SDM 11.4.1, Table 11-1) through
//!   [`Lapic::read_mmio`] / [`Lapic::write_mmio`], and the x2APIC MSRs
//!   0x800-0x8FF (SDM 11.12.1.2, Table 11-6) through [`Lapic::read_msr`] /
//!   [`Lapic::write_msr`];
//! - IA32_APIC_BASE (MSR 0x1B, SDM 11.4.4 and 11.12.5) and IA32_TSC_DEADLINE
//!   (MSR 0x6E0, SDM 11.5.4.1);
//! - messages the router decided are for this APIC ([`Lapic::accept`]) and
//!   the LINT0/LINT1 pins ([`Lapic::set_lint`]);
//! - the injection ladder's view: [`Lapic::has_interrupt`],
//!   [`Lapic::ack_interrupt`] and the NMI / SMI / INIT / SIPI / ExtINT flags.
//!
//! What the APIC sends on the bus (IPIs from ICR writes, EOI broadcasts of
//! level-triggered vectors) is queued as [`LapicOutput`]s that the owner
//! takes with [`Lapic::take_outputs`] after releasing the lock, so a
//! self-IPI never locks the same mutex twice (the router does this).
//!
//! Decisions where the SDM leaves room, with who we follow:
//! - version register 0x01050014: version 0x14, max LVT entry 5 (timer,
//!   thermal, performance, LINT0, LINT1, error: no CMCI, as QEMU), bit 24
//!   "suppress EOI broadcast" supported (SVR bit 12).
//! - MMIO: 32-bit writes at 16-byte aligned offsets only, anything else is
//!   dropped (KVM's `apic_mmio_write`). Reads of 1, 2 or 4 bytes inside the
//!   low dword of a register return those bytes (KVM's `kvm_lapic_reg_read`;
//!   the SDM calls smaller accesses model specific, 11.4.1); other reads
//!   return 0. An access to a reserved register in 0x000-0x3F0 sets the ESR
//!   illegal-register-address bit (SDM 11.5.3). With the APIC globally
//!   disabled or in x2APIC mode the page is not decoded (SDM 11.12.2): reads
//!   return all ones like an unclaimed bus, writes are dropped.
//! - x2APIC WRMSR: a non-zero value in a reserved bit raises #GP (SDM
//!   11.12.1.3); read-only bits (delivery status, remote IRR, ICR busy) are
//!   ignored, not reserved (KVM does the same for ICR bit 12).
//! - software-disabled APIC (SVR bit 8 clear, SDM 11.4.7.2): fixed and
//!   lowest-priority messages are dropped (KVM's `__apic_accept_irq`), IRR
//!   contents are held (not delivered), NMI/SMI/INIT/SIPI are accepted, LVT
//!   masks are set by the disabling SVR write and cannot be cleared.
//! - reset: on the BSP, LVT LINT0 resets to ExtINT, unmasked (KVM's
//!   `KVM_X86_QUIRK_LINT0_REENABLED`, QEMU's `apic_reset_common`), so the
//!   8259A reaches the BSP before any guest programs the APIC. The PIC's INT
//!   is accepted when LVT LINT0 is unmasked ExtINT or the APIC is globally
//!   disabled (KVM's `kvm_apic_accept_pic_intr`).
//! - globally disabling the APIC through IA32_APIC_BASE returns the register
//!   file to its power-up state (SDM 11.4.3: "may return to the state
//!   described in 11.4.7.1"), keeping the base address and the BSP flag.
//! - LINT pin polarity (LVT bit 13) is stored but not applied: the pins are
//!   modelled as asserted-high, as KVM and QEMU do. LINT1 is always edge
//!   sensitive (SDM 11.5.1: "level-sensitive interrupts are not supported
//!   for LINT1").
//! - IPIs are sent edge-triggered and asserted except INIT level de-assert
//!   (SDM 11.6.1, ICR bits 14-15: ignored for other delivery modes).
//! - timer: the APIC bus clock is 1 GHz, one tick per nanosecond before the
//!   divider (KVM's `APIC_BUS_CYCLE_NS` = 1). A periodic timer interrupts at
//!   most every [`MIN_PERIODIC_NS`] (KVM's `min_timer_period_us`), so a guest
//!   cannot make every entry take a timer interrupt; the current-count
//!   register still counts the programmed period exactly.
//! - a masked timer keeps counting; expiries while masked are consumed
//!   without an interrupt (the timer reports no deadline while masked and
//!   catches up before any change of its configuration).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::clock::SharedClock;
use crate::devices::apic_bus::{ApicMessage, DeliveryMode, DestMode, Shorthand, TriggerMode};
use crate::timer::TimerDevice;
use crate::trace::{Lvt, TraceEvent, Tracer};

/// Reset value of the APIC base address.
pub const APIC_DEFAULT_BASE: u64 = 0xFEE0_0000;
/// Size of the xAPIC register page.
pub const APIC_MMIO_SIZE: u64 = 0x1000;
/// IA32_APIC_BASE bit 8: this processor is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE bit 10: x2APIC mode enable (EXTD).
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE bit 11: APIC global enable (EN).
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// IA32_APIC_BASE MSR index.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE MSR index.
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// First and last x2APIC MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

/// Version register: version 0x14 (bits 7:0), max LVT entry 5 (bits 23:16),
/// EOI-broadcast suppression supported (bit 24).
pub const APIC_VERSION: u32 = 0x14 | (5 << 16) | (1 << 24);

/// The APIC timer's input clock before the divider: 1 GHz (1 tick per ns).
pub const APIC_BUS_CLOCK_HZ: u64 = 1_000_000_000;
/// Shortest interval between two periodic timer interrupts (KVM's
/// `min_timer_period_us` = 200).
pub const MIN_PERIODIC_NS: u64 = 200_000;

/// Register offsets in the xAPIC page (SDM Table 11-1). The x2APIC MSR of a
/// register is `0x800 + (offset >> 4)` (Table 11-6).
pub mod reg {
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TPR: u32 = 0x080;
    pub const APR: u32 = 0x090;
    pub const PPR: u32 = 0x0A0;
    pub const EOI: u32 = 0x0B0;
    pub const RRD: u32 = 0x0C0;
    pub const LDR: u32 = 0x0D0;
    pub const DFR: u32 = 0x0E0;
    pub const SVR: u32 = 0x0F0;
    pub const ISR: u32 = 0x100;
    pub const TMR: u32 = 0x180;
    pub const IRR: u32 = 0x200;
    pub const ESR: u32 = 0x280;
    pub const LVT_CMCI: u32 = 0x2F0;
    pub const ICR_LOW: u32 = 0x300;
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_THERMAL: u32 = 0x330;
    pub const LVT_PERF: u32 = 0x340;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_LINT1: u32 = 0x360;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL: u32 = 0x380;
    pub const TIMER_CURRENT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
    /// x2APIC only (MSR 0x83F).
    pub const SELF_IPI: u32 = 0x3F0;
}

/// Error status register bits (SDM 11.5.3, Figure 11-9).
pub mod esr {
    pub const SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
    pub const RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
    pub const ILLEGAL_REGISTER_ADDRESS: u32 = 1 << 7;
}

/// Indices into the LVT array, in register order (0x320..0x370).
pub const LVT_TIMER: usize = 0;
pub const LVT_THERMAL: usize = 1;
pub const LVT_PERF: usize = 2;
pub const LVT_LINT0: usize = 3;
pub const LVT_LINT1: usize = 4;
pub const LVT_ERROR: usize = 5;
pub const LVT_ENTRIES: usize = 6;

const LVT_NAMES: [&str; LVT_ENTRIES] = ["LVTT", "LVTTHMR", "LVTPC", "LVT0", "LVT1", "LVTERR"];

// LVT fields (SDM 11.5.1, Figure 11-8).
const LVT_VECTOR: u32 = 0xFF;
const LVT_DELIVERY_MODE: u32 = 0x700;
const LVT_DELIVERY_STATUS: u32 = 1 << 12;
const LVT_POLARITY: u32 = 1 << 13;
const LVT_REMOTE_IRR: u32 = 1 << 14;
const LVT_LEVEL: u32 = 1 << 15;
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE: u32 = 3 << 17;

/// Bits software can write in each LVT entry (xAPIC stores these, x2APIC
/// additionally #GPs on anything outside them plus the read-only bits).
const LVT_WRITABLE: [u32; LVT_ENTRIES] = [
    LVT_VECTOR | LVT_MASKED | LVT_TIMER_MODE,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_MASKED,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_MASKED,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_POLARITY | LVT_LEVEL | LVT_MASKED,
    LVT_VECTOR | LVT_DELIVERY_MODE | LVT_POLARITY | LVT_LEVEL | LVT_MASKED,
    LVT_VECTOR | LVT_MASKED,
];
/// Read-only bits of each LVT entry a WRMSR may carry without #GP.
const LVT_READ_ONLY: [u32; LVT_ENTRIES] = [
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
    LVT_DELIVERY_STATUS,
];

// SVR fields (SDM 11.9, Figure 11-23).
const SVR_VECTOR: u32 = 0xFF;
const SVR_ENABLE: u32 = 1 << 8;
const SVR_FOCUS_DISABLE: u32 = 1 << 9;
const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
const SVR_WRITABLE: u32 = SVR_VECTOR | SVR_ENABLE | SVR_FOCUS_DISABLE | SVR_SUPPRESS_EOI_BROADCAST;

// ICR fields (SDM 11.6.1, Figure 11-12).
const ICR_VECTOR: u32 = 0xFF;
const ICR_DELIVERY_MODE: u32 = 0x700;
const ICR_DEST_LOGICAL: u32 = 1 << 11;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
const ICR_SHORTHAND: u32 = 3 << 18;
const ICR_WRITABLE: u32 = ICR_VECTOR
    | ICR_DELIVERY_MODE
    | ICR_DEST_LOGICAL
    | ICR_LEVEL_ASSERT
    | ICR_TRIGGER_LEVEL
    | ICR_SHORTHAND;
/// x2APIC ICR bits that #GP when set (KVM's X2APIC_ICR_RESERVED_BITS: 13,
/// 16-17, 20-31; bit 12, delivery status, is ignored).
const X2APIC_ICR_RESERVED: u64 = (1 << 13) | (3 << 16) | (0xFFF << 20);

/// Divide configuration bits (SDM 11.5.4, Figure 11-10: bits 0, 1, 3).
const TIMER_DIVIDE_BITS: u32 = 0xB;

/// Outstanding outputs a caller that never takes them can pile up: one
/// access produces at most one, so this only bounds misuse.
const MAX_OUTPUTS: usize = 64;

/// The APIC's operating mode, from IA32_APIC_BASE bits 10-11.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApicMode {
    /// Globally disabled (EN = 0): the pins are INTR and NMI.
    Disabled,
    XApic,
    X2Apic,
}

/// LVT timer mode (bits 17-18; the reserved encoding 3 counts as one-shot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

/// Something the APIC puts on the bus; the owner delivers it after
/// releasing the APIC's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapicOutput {
    /// An IPI from an ICR write. `x2apic` says the destination field is a
    /// 32-bit x2APIC destination (the sender was in x2APIC mode).
    Ipi { msg: ApicMessage, x2apic: bool },
    /// EOI of a level-triggered vector, for the IOAPICs.
    Eoi(u8),
}

/// Everything a local APIC holds: what is saved and restored. Times are in
/// the machine clock's nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LapicState {
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// xAPIC ID register bits 31:24 (the x2APIC ID is the initial ID).
    pub xapic_id: u8,
    pub tpr: u8,
    /// xAPIC LDR (bits 31:24 used); in x2APIC mode the LDR is derived.
    pub ldr: u32,
    /// DFR model bits 31:28 (bits 27:0 read as ones).
    pub dfr: u32,
    pub svr: u32,
    pub isr: [u32; 8],
    pub tmr: [u32; 8],
    pub irr: [u32; 8],
    /// The ESR as software reads it (updated by the last ESR write).
    pub esr: u32,
    /// Errors logged since the last ESR write.
    pub esr_pending: u32,
    /// The next logged error raises the error interrupt (re-armed by an
    /// ESR write, SDM 11.5.3).
    pub error_interrupt_armed: bool,
    pub icr_low: u32,
    /// xAPIC: destination in bits 31:24; x2APIC: the 32-bit destination.
    pub icr_high: u32,
    pub lvt: [u32; LVT_ENTRIES],
    pub timer_initial: u32,
    /// Divide configuration register, bits 0, 1 and 3.
    pub timer_divide: u32,
    /// Timer ticks elapsed since the last load at `timer_ref_ns`.
    pub timer_ref_ticks: u64,
    pub timer_ref_ns: u64,
    /// Next timer expiry not yet processed: the end of the current count in
    /// one-shot / periodic mode, the armed deadline in TSC-deadline mode.
    pub timer_next_ns: Option<u64>,
    /// IA32_TSC_DEADLINE (0: disarmed).
    pub tsc_deadline: u64,
    /// Levels of the LINT0 and LINT1 pins.
    pub lint_level: [bool; 2],
    pub nmi_pending: bool,
    pub smi_pending: bool,
    pub init_pending: bool,
    /// An ExtINT message (IOAPIC / MSI) waits for the PIC's vector.
    pub extint_pending: bool,
    /// The processor is in wait-for-SIPI (an AP after reset or INIT).
    pub wait_for_sipi: bool,
    pub sipi_vector: Option<u8>,
}

fn vec_test(r: &[u32; 8], v: u8) -> bool {
    r[usize::from(v >> 5)] & (1 << (v & 31)) != 0
}

fn vec_set(r: &mut [u32; 8], v: u8) {
    r[usize::from(v >> 5)] |= 1 << (v & 31);
}

fn vec_clear(r: &mut [u32; 8], v: u8) {
    r[usize::from(v >> 5)] &= !(1 << (v & 31));
}

fn vec_highest(r: &[u32; 8]) -> Option<u8> {
    r.iter()
        .enumerate()
        .rev()
        .find(|(_, w)| **w != 0)
        .map(|(i, w)| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
}

fn vec_list(r: &[u32; 8], tmr: Option<&[u32; 8]>) -> String {
    let mut s = String::new();
    for v in 0..=255u8 {
        if vec_test(r, v) {
            let _ = write!(s, " {v:#04x}");
            if tmr.is_some_and(|t| vec_test(t, v)) {
                s.push_str("(level)");
            }
        }
    }
    if s.is_empty() {
        s.push_str(" (none)");
    }
    s
}

fn delivery_name(bits: u32) -> &'static str {
    match bits & 7 {
        0 => "Fixed",
        1 => "LowPri",
        2 => "SMI",
        4 => "NMI",
        5 => "INIT",
        6 => "SIPI",
        7 => "ExtINT",
        _ => "Rsvd",
    }
}

impl LapicState {
    /// The power-up state (SDM 11.4.7.1) of an APIC with `id`.
    fn power_up(id: u32, bsp: bool) -> Self {
        let mut s = LapicState {
            apic_base: APIC_DEFAULT_BASE | APIC_BASE_ENABLE,
            xapic_id: id as u8,
            tpr: 0,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            svr: 0xFF,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            error_interrupt_armed: true,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; LVT_ENTRIES],
            timer_initial: 0,
            timer_divide: 0,
            timer_ref_ticks: 0,
            timer_ref_ns: 0,
            timer_next_ns: None,
            tsc_deadline: 0,
            lint_level: [false; 2],
            nmi_pending: false,
            smi_pending: false,
            init_pending: false,
            extint_pending: false,
            wait_for_sipi: !bsp,
            sipi_vector: None,
        };
        if bsp {
            s.apic_base |= APIC_BASE_BSP;
        }
        s.reset_registers(id, bsp);
        s
    }

    /// Registers to their reset values (SDM 11.4.7.1 / 11.4.7.3), leaving
    /// IA32_APIC_BASE, the pins and the processor's pending events alone.
    fn reset_registers(&mut self, id: u32, bsp: bool) {
        self.xapic_id = id as u8;
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xFFFF_FFFF;
        self.svr = 0xFF;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.error_interrupt_armed = true;
        self.icr_low = 0;
        self.icr_high = 0;
        self.lvt = [LVT_MASKED; LVT_ENTRIES];
        if bsp {
            // Virtual-wire mode on the BSP (KVM / QEMU, see the module doc).
            self.lvt[LVT_LINT0] = 7 << 8;
        }
        self.timer_initial = 0;
        self.timer_divide = 0;
        self.timer_ref_ticks = 0;
        self.timer_ref_ns = 0;
        self.timer_next_ns = None;
        self.tsc_deadline = 0;
    }
}

/// How a register write went.
enum WriteResult {
    Done,
    ReadOnly,
    Reserved,
}

/// One local APIC.
pub struct Lapic {
    initial_id: u32,
    clock: SharedClock,
    tsc_khz: u64,
    /// The guest TSC when the clock read 0 (a processor whose TSC cannot
    /// be set, like PVM's, keeps the host's).
    tsc_offset: u64,
    phys_addr_bits: u8,
    s: LapicState,
    outputs: Vec<LapicOutput>,
    tracer: Tracer,
}

impl std::fmt::Debug for Lapic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lapic")
            .field("initial_id", &self.initial_id)
            .field("tsc_khz", &self.tsc_khz)
            .field("state", &self.s)
            .finish_non_exhaustive()
    }
}

impl Lapic {
    /// An APIC in its power-up state with initial APIC ID `apic_id`; `bsp`
    /// sets IA32_APIC_BASE.BSP. `tsc_khz` is the guest TSC frequency that
    /// TSC-deadline mode compares against (TSC = ns * tsc_khz / 10^6).
    /// Sets the guest TSC that TSC-deadline mode compares with: it counts
    /// at `tsc_khz` and read `offset` when the clock read 0 (the
    /// processor's, known once it exists: KVM_GET_TSC_KHZ and IA32_TSC on
    /// KVM).
    pub fn set_tsc(&mut self, tsc_khz: u64, offset: u64) {
        self.tsc_khz = tsc_khz.max(1);
        self.tsc_offset = offset;
        self.update_timer();
    }

    pub fn new(apic_id: u32, bsp: bool, clock: SharedClock, tsc_khz: u64) -> Self {
        Lapic {
            initial_id: apic_id,
            clock,
            tsc_khz: tsc_khz.max(1),
            tsc_offset: 0,
            phys_addr_bits: 52,
            s: LapicState::power_up(apic_id, bsp),
            outputs: Vec::new(),
            tracer: Tracer::off(),
        }
    }

    /// Records acceptances, local interrupts, INTA, EOIs and IPIs in
    /// `tracer` (as vCPU `initial APIC ID`).
    pub fn set_tracer(&mut self, tracer: Tracer) {
        self.tracer = tracer;
    }

    /// MAXPHYADDR for the IA32_APIC_BASE reserved-bit check (default 52,
    /// the architectural maximum; clamped to 32..=52).
    pub fn set_phys_addr_bits(&mut self, bits: u8) {
        self.phys_addr_bits = bits.clamp(32, 52);
    }

    /// Power-up reset (SDM 11.4.7.1).
    pub fn reset(&mut self) {
        let lint = self.s.lint_level;
        self.s = LapicState::power_up(self.initial_id, self.is_bsp());
        self.s.lint_level = lint;
    }

    /// The APIC's part of INIT (SDM 11.4.7.3): the power-up register state
    /// except that IA32_APIC_BASE (and so the mode) is kept; pending events
    /// are dropped.
    pub fn init_reset(&mut self) {
        let bsp = self.is_bsp();
        self.s.reset_registers(self.initial_id, bsp);
        self.s.nmi_pending = false;
        self.s.smi_pending = false;
        self.s.init_pending = false;
        self.s.extint_pending = false;
        self.s.sipi_vector = None;
    }

    fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    // ----- identity and mode -------------------------------------------

    /// The initial APIC ID (the x2APIC ID).
    pub fn initial_apic_id(&self) -> u32 {
        self.initial_id
    }

    /// The APIC ID messages are matched against: the xAPIC ID register, or
    /// the x2APIC ID in x2APIC mode.
    pub fn apic_id(&self) -> u32 {
        match self.mode() {
            ApicMode::X2Apic => self.initial_id,
            _ => u32::from(self.s.xapic_id),
        }
    }

    pub fn mode(&self) -> ApicMode {
        match (
            self.s.apic_base & APIC_BASE_ENABLE != 0,
            self.s.apic_base & APIC_BASE_EXTD != 0,
        ) {
            (false, _) => ApicMode::Disabled,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        }
    }

    pub fn is_bsp(&self) -> bool {
        self.s.apic_base & APIC_BASE_BSP != 0
    }

    /// IA32_APIC_BASE.EN: the APIC is globally (hardware) enabled.
    pub fn hw_enabled(&self) -> bool {
        self.mode() != ApicMode::Disabled
    }

    /// SVR bit 8 (and globally enabled).
    pub fn sw_enabled(&self) -> bool {
        self.hw_enabled() && self.s.svr & SVR_ENABLE != 0
    }

    pub fn is_x2apic(&self) -> bool {
        self.mode() == ApicMode::X2Apic
    }

    // ----- IA32_APIC_BASE -----------------------------------------------

    pub fn apic_base(&self) -> u64 {
        self.s.apic_base
    }

    /// WRMSR IA32_APIC_BASE. Returns false (#GP) for reserved bits (0-7, 9,
    /// and above MAXPHYADDR), the invalid state EN=0/EXTD=1, and the illegal
    /// transitions x2APIC -> xAPIC and disabled -> x2APIC (SDM 11.12.5,
    /// Figure 11-27).
    pub fn set_apic_base(&mut self, value: u64) -> bool {
        let phys_mask = (1u64 << self.phys_addr_bits) - 1;
        let reserved = 0xFF | (1 << 9) | !phys_mask;
        if value & reserved != 0 {
            return false;
        }
        let new_mode = match (value & APIC_BASE_ENABLE != 0, value & APIC_BASE_EXTD != 0) {
            (false, false) => ApicMode::Disabled,
            (false, true) => return false,
            (true, false) => ApicMode::XApic,
            (true, true) => ApicMode::X2Apic,
        };
        let old_mode = self.mode();
        match (old_mode, new_mode) {
            (ApicMode::X2Apic, ApicMode::XApic) | (ApicMode::Disabled, ApicMode::X2Apic) => {
                return false
            }
            _ => {}
        }
        self.s.apic_base = value;
        if old_mode != ApicMode::Disabled && new_mode == ApicMode::Disabled {
            // SDM 11.4.3: disabling may return the APIC to its power-up
            // state; do so (IA32_APIC_BASE as just written stays).
            let bsp = self.is_bsp();
            self.s.reset_registers(self.initial_id, bsp);
        }
        if old_mode == ApicMode::XApic && new_mode == ApicMode::X2Apic {
            // The x2APIC ID is the initial APIC ID and the ICR destination
            // becomes 32 bits wide (SDM 11.12.5.1).
            self.s.icr_high = 0;
        }
        true
    }

    /// Base of the xAPIC page while it is decoded (globally enabled, not in
    /// x2APIC mode); the machine maps [`APIC_MMIO_SIZE`] bytes there.
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == ApicMode::XApic).then_some(self.s.apic_base & !0xFFF & !(0xFFF << 52))
    }

    // ----- priorities ---------------------------------------------------

    pub fn tpr(&self) -> u8 {
        self.s.tpr
    }

    /// TPR as CR8 writes it (CR8 = TPR[7:4], SDM 11.8.6).
    pub fn set_tpr(&mut self, tpr: u8) {
        self.s.tpr = tpr;
    }

    /// Processor priority (SDM 11.8.3.1): TPR if its class is at least the
    /// class of the highest in-service vector, else that class.
    pub fn ppr(&self) -> u8 {
        let isrv = vec_highest(&self.s.isr).unwrap_or(0);
        if self.s.tpr >> 4 >= isrv >> 4 {
            self.s.tpr
        } else {
            isrv & 0xF0
        }
    }

    /// Arbitration priority, computed as the SDM gives it (11.6.2.4 /
    /// Figure 11-15 "Arbitration Priority Register"):
    /// `IF (TPR[7:4] >= IRRV[7:4]) AND (TPR[7:4] > ISRV[7:4]) THEN APR = TPR
    /// ELSE APR[7:4] = max(TPR[7:4] AND ISRV[7:4], IRRV[7:4]), APR[3:0] = 0`.
    pub fn apr(&self) -> u8 {
        let tpr = self.s.tpr >> 4;
        let isrv = vec_highest(&self.s.isr).unwrap_or(0) >> 4;
        let irrv = vec_highest(&self.s.irr).unwrap_or(0) >> 4;
        if tpr >= irrv && tpr > isrv {
            self.s.tpr
        } else {
            (tpr & isrv).max(irrv) << 4
        }
    }

    /// Focus processor check for lowest-priority arbitration (SDM 11.6.2.4):
    /// focus checking is on (SVR bit 9 clear) and `vector` is already
    /// pending or in service here.
    pub fn is_focus(&self, vector: u8) -> bool {
        self.s.svr & SVR_FOCUS_DISABLE == 0
            && (vec_test(&self.s.irr, vector) || vec_test(&self.s.isr, vector))
    }

    // ----- destination matching (SDM 11.6.2) ------------------------------

    /// Whether a message with destination `dest` in `mode` addresses this
    /// APIC. `x2apic_format`: the destination is a 32-bit x2APIC one (an IPI
    /// from an x2APIC-mode sender); otherwise it is the 8-bit xAPIC field.
    /// 0xFF (xAPIC format) and 0xFFFFFFFF (x2APIC format) are broadcasts in
    /// both modes; an 8-bit broadcast also reaches x2APIC-mode targets (KVM's
    /// `kvm_apic_mda`).
    pub fn matches_destination(&self, dest: u32, mode: DestMode, x2apic_format: bool) -> bool {
        let dest = if x2apic_format { dest } else { dest & 0xFF };
        let broadcast = if x2apic_format { u32::MAX } else { 0xFF };
        if dest == broadcast {
            return true;
        }
        let x2_target = self.is_x2apic();
        match mode {
            DestMode::Physical => {
                if x2_target {
                    dest == self.initial_id
                } else {
                    dest == u32::from(self.s.xapic_id)
                }
            }
            DestMode::Logical => {
                if x2_target {
                    // x2APIC logical: cluster ID in bits 31:16, member bit
                    // mask in 15:0 (SDM 11.12.10.2).
                    let ldr = self.x2apic_ldr();
                    ldr >> 16 == dest >> 16 && ldr & dest & 0xFFFF != 0
                } else {
                    if dest > 0xFF {
                        return false;
                    }
                    let logical = self.s.ldr >> 24;
                    match self.s.dfr >> 28 {
                        // Flat model: a bit mask of up to 8 APICs.
                        0xF => logical & dest != 0,
                        // Cluster model: cluster in 7:4, members in 3:0.
                        0x0 => logical >> 4 == dest >> 4 && logical & dest & 0xF != 0,
                        _ => false,
                    }
                }
            }
        }
    }

    /// The x2APIC logical ID, derived from the x2APIC ID (SDM 11.12.10.2).
    pub fn x2apic_ldr(&self) -> u32 {
        let id = self.initial_id;
        ((id >> 4) << 16) | (1 << (id & 0xF))
    }

    // ----- accepting messages and local interrupts ------------------------

    /// Takes a message the router decided is addressed to this APIC.
    pub fn accept(&mut self, msg: &ApicMessage) {
        if !self.hw_enabled() {
            return;
        }
        match msg.delivery {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                if msg.trigger == TriggerMode::Level && !msg.level {
                    return;
                }
                if msg.vector < 16 {
                    self.log_error(esr::RECEIVE_ILLEGAL_VECTOR);
                    return;
                }
                if !self.sw_enabled() {
                    return;
                }
                self.trace_accept(msg);
                self.set_irr(msg.vector, msg.trigger == TriggerMode::Level);
            }
            DeliveryMode::Nmi => {
                self.trace_accept(msg);
                self.s.nmi_pending = true
            }
            DeliveryMode::Smi => {
                self.trace_accept(msg);
                self.s.smi_pending = true
            }
            DeliveryMode::Init => {
                self.trace_accept(msg);
                // INIT level de-assert only resynchronises arbitration IDs
                // (SDM 11.6.1); there is nothing of that to model.
                if msg.trigger != TriggerMode::Level || msg.level {
                    self.accept_init();
                }
            }
            DeliveryMode::StartUp => {
                // A SIPI outside wait-for-SIPI is ignored (SDM 9.4.4 / 11.6.1).
                if self.s.wait_for_sipi {
                    self.trace_accept(msg);
                    self.s.sipi_vector = Some(msg.vector);
                }
            }
            DeliveryMode::ExtInt => {
                self.trace_accept(msg);
                self.s.extint_pending = true
            }
            DeliveryMode::Reserved => {}
        }
    }

    fn trace_accept(&self, msg: &ApicMessage) {
        self.tracer.emit_with(|| TraceEvent::LapicAccept {
            cpu: self.initial_id,
            vector: msg.vector,
            mode: msg.delivery,
            trigger: msg.trigger,
        });
    }

    fn trace_lvt(&self, index: usize, vector: u8, mode: DeliveryMode) {
        self.tracer.emit_with(|| TraceEvent::LapicLvt {
            cpu: self.initial_id,
            lvt: match index {
                LVT_TIMER => Lvt::Timer,
                LVT_LINT0 => Lvt::Lint0,
                LVT_LINT1 => Lvt::Lint1,
                LVT_ERROR => Lvt::Error,
                _ => Lvt::Other,
            },
            vector,
            mode,
        });
    }

    /// Sets `vector` in the IRR; TMR records the trigger mode (SDM 11.8.4).
    fn set_irr(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.log_error(esr::RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        vec_set(&mut self.s.irr, vector);
        if level {
            vec_set(&mut self.s.tmr, vector);
        } else {
            vec_clear(&mut self.s.tmr, vector);
        }
    }

    /// Logs an error in the ESR and raises the error interrupt if armed and
    /// unmasked (SDM 11.5.3).
    fn log_error(&mut self, bits: u32) {
        self.s.esr_pending |= bits;
        let lvt = self.s.lvt[LVT_ERROR];
        if self.s.error_interrupt_armed && lvt & LVT_MASKED == 0 && self.hw_enabled() {
            self.s.error_interrupt_armed = false;
            let vector = (lvt & LVT_VECTOR) as u8;
            if vector < 16 {
                // No recursion: the illegal error vector is itself logged.
                self.s.esr_pending |= esr::RECEIVE_ILLEGAL_VECTOR;
            } else {
                vec_set(&mut self.s.irr, vector);
                vec_clear(&mut self.s.tmr, vector);
            }
        }
    }

    /// Delivers the local interrupt of LVT entry `index` once (an edge, or
    /// a level assertion for a level-triggered fixed LINT).
    fn deliver_lvt(&mut self, index: usize) {
        let Some(&lvt) = self.s.lvt.get(index) else {
            return;
        };
        if lvt & LVT_MASKED != 0 {
            return;
        }
        let vector = (lvt & LVT_VECTOR) as u8;
        // The timer and error entries have no delivery mode field: fixed.
        let mode = if index == LVT_TIMER || index == LVT_ERROR {
            DeliveryMode::Fixed
        } else {
            DeliveryMode::from_bits(lvt >> 8)
        };
        if mode != DeliveryMode::ExtInt {
            self.trace_lvt(index, vector, mode);
        }
        match mode {
            // Level-triggered LINT0 goes through `eval_level_lint`.
            DeliveryMode::Fixed => self.set_irr(vector, false),
            DeliveryMode::Nmi => self.s.nmi_pending = true,
            DeliveryMode::Smi => self.s.smi_pending = true,
            DeliveryMode::Init => self.accept_init(),
            // ExtINT is taken from the pin level at acknowledge time.
            _ => {}
        }
    }

    /// A fixed, level-triggered LINT0 with its pin high and remote IRR
    /// clear delivers its vector and sets remote IRR (SDM 11.5.1).
    fn eval_level_lint(&mut self) {
        let lvt = self.s.lvt[LVT_LINT0];
        if lvt & (LVT_DELIVERY_MODE | LVT_LEVEL) != LVT_LEVEL {
            // Remote IRR means nothing outside fixed level mode.
            self.s.lvt[LVT_LINT0] &= !LVT_REMOTE_IRR;
            return;
        }
        if lvt & LVT_MASKED != 0 {
            return;
        }
        if self.s.lint_level[0] && lvt & LVT_REMOTE_IRR == 0 && self.hw_enabled() {
            let vector = (lvt & LVT_VECTOR) as u8;
            if vector < 16 {
                self.log_error(esr::RECEIVE_ILLEGAL_VECTOR);
                return;
            }
            self.s.lvt[LVT_LINT0] |= LVT_REMOTE_IRR;
            self.trace_lvt(LVT_LINT0, vector, DeliveryMode::Fixed);
            self.set_irr(vector, true);
        }
    }

    /// Drives the LINT0 (`lint` = 0) or LINT1 (`lint` = 1) pin to `level`.
    /// LINT0 usually carries the 8259A's INT: with LVT LINT0 in ExtINT mode
    /// (or the APIC globally disabled) the PIC's request shows up as
    /// [`Lapic::extint_pending`] while the pin is high.
    pub fn set_lint(&mut self, lint: u8, level: bool) {
        let i = usize::from(lint);
        let Some(old) = self.s.lint_level.get(i).copied() else {
            return;
        };
        self.s.lint_level[i] = level;
        let rising = level && !old;
        if !self.hw_enabled() {
            // A globally disabled APIC leaves LINT0 as INTR and LINT1 as NMI
            // (SDM 11.4.3).
            if i == 1 && rising {
                self.s.nmi_pending = true;
            }
            return;
        }
        let index = LVT_LINT0 + i;
        let lvt = self.s.lvt[index];
        if lvt & LVT_MASKED != 0 {
            return;
        }
        let mode = DeliveryMode::from_bits(lvt >> 8);
        if i == 0 && mode == DeliveryMode::Fixed && lvt & LVT_LEVEL != 0 {
            self.eval_level_lint();
        } else if rising && mode != DeliveryMode::ExtInt {
            self.deliver_lvt(index);
        }
    }

    // ----- the ladder's view ---------------------------------------------

    /// A fixed interrupt is deliverable: the highest IRR vector's priority
    /// class is above the PPR's (SDM 11.8.3.1) and the APIC is software
    /// enabled (SDM 11.4.7.2: held while disabled).
    pub fn has_interrupt(&self) -> bool {
        if !self.sw_enabled() {
            return false;
        }
        match vec_highest(&self.s.irr) {
            Some(v) => v >> 4 > self.ppr() >> 4,
            None => false,
        }
    }

    /// The highest vector in the IRR, if any.
    pub fn highest_irr(&self) -> Option<u8> {
        vec_highest(&self.s.irr)
    }

    /// INTA: moves the highest deliverable IRR vector into service and
    /// returns it. If nothing is deliverable any more (the TPR was raised
    /// since [`Lapic::has_interrupt`]), returns the spurious vector without
    /// touching the ISR (SDM 11.9). `None` when globally disabled.
    pub fn ack_interrupt(&mut self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        if self.has_interrupt() {
            if let Some(v) = vec_highest(&self.s.irr) {
                vec_clear(&mut self.s.irr, v);
                vec_set(&mut self.s.isr, v);
                self.tracer.emit_with(|| TraceEvent::LapicAck {
                    cpu: self.initial_id,
                    vector: v,
                    spurious: false,
                });
                return Some(v);
            }
        }
        let spurious = (self.s.svr & SVR_VECTOR) as u8;
        self.tracer.emit_with(|| TraceEvent::LapicAck {
            cpu: self.initial_id,
            vector: spurious,
            spurious: true,
        });
        Some(spurious)
    }

    pub fn nmi_pending(&self) -> bool {
        self.s.nmi_pending
    }

    /// Takes the pending NMI; true if there was one.
    pub fn take_nmi(&mut self) -> bool {
        std::mem::take(&mut self.s.nmi_pending)
    }

    pub fn smi_pending(&self) -> bool {
        self.s.smi_pending
    }

    pub fn take_smi(&mut self) -> bool {
        std::mem::take(&mut self.s.smi_pending)
    }

    /// Whether the PIC's INT on LINT0 is accepted (KVM's
    /// `kvm_apic_accept_pic_intr`): LVT LINT0 unmasked with delivery mode
    /// ExtINT, or the APIC globally disabled.
    pub fn accepts_pic_interrupt(&self) -> bool {
        let lvt0 = self.s.lvt[LVT_LINT0];
        !self.hw_enabled()
            || (lvt0 & LVT_MASKED == 0
                && DeliveryMode::from_bits(lvt0 >> 8) == DeliveryMode::ExtInt)
    }

    /// An ExtINT waits: an ExtINT message, or the PIC's INT high on an
    /// accepting LINT0. The vector comes from the PIC's acknowledge.
    pub fn extint_pending(&self) -> bool {
        self.s.extint_pending || (self.s.lint_level[0] && self.accepts_pic_interrupt())
    }

    /// Takes the ExtINT (the caller then runs the PIC's INTA); true if one
    /// was pending. The LINT0 level stays until the PIC lowers INT.
    pub fn take_extint(&mut self) -> bool {
        let pending = self.extint_pending();
        self.s.extint_pending = false;
        pending
    }

    pub fn init_pending(&self) -> bool {
        self.s.init_pending
    }

    /// An INIT arrives: the APIC's part takes effect at once, as on hardware
    /// (the INIT reset of the registers, SDM 11.4.7.3, and wait-for-SIPI on
    /// an AP; a BSP restarts at the reset vector), so a SIPI that follows
    /// before the processor has run again is not lost. The processor's reset
    /// waits in `init_pending` for the machine.
    fn accept_init(&mut self) {
        self.init_reset();
        self.s.init_pending = true;
        if !self.is_bsp() {
            self.s.wait_for_sipi = true;
        }
    }

    /// Takes a pending INIT for the processor (the APIC was reset when it
    /// arrived). The caller resets the processor. True if an INIT was
    /// pending.
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.s.init_pending)
    }

    /// INIT and SIPI for the processor, taken together (one look per
    /// entry on the run loop's path).
    pub fn take_startup(&mut self) -> crate::ladder::Startup {
        use crate::ladder::Startup;
        let init = self.take_init();
        if self.s.wait_for_sipi {
            return match self.take_sipi() {
                Some(v) => Startup::Sipi(v),
                None => Startup::WaitForSipi { init },
            };
        }
        if init {
            Startup::Init
        } else {
            Startup::Run
        }
    }

    pub fn sipi_pending(&self) -> bool {
        self.s.sipi_vector.is_some()
    }

    /// Takes a start-up IPI received in wait-for-SIPI: the processor leaves
    /// wait-for-SIPI and starts at `vector << 12`.
    pub fn take_sipi(&mut self) -> Option<u8> {
        let v = self.s.sipi_vector.take()?;
        self.s.wait_for_sipi = false;
        Some(v)
    }

    pub fn wait_for_sipi(&self) -> bool {
        self.s.wait_for_sipi
    }

    /// Puts the processor in or out of wait-for-SIPI (the machine decides
    /// whether APs start running or wait).
    pub fn set_wait_for_sipi(&mut self, on: bool) {
        self.s.wait_for_sipi = on;
        if !on {
            self.s.sipi_vector = None;
        }
    }

    /// LINT1 can raise an NMI (unmasked, NMI delivery mode, or the APIC
    /// globally disabled).
    pub fn lint1_nmi_enabled(&self) -> bool {
        let lvt1 = self.s.lvt[LVT_LINT1];
        !self.hw_enabled()
            || (lvt1 & LVT_MASKED == 0 && DeliveryMode::from_bits(lvt1 >> 8) == DeliveryMode::Nmi)
    }

    /// Whether a signal on LINT0 (the 8259A's INT) would arrive as an NMI,
    /// SMI or INIT, which end a HLT even with IF clear.
    pub fn lint0_wakes_masked(&self) -> bool {
        let lvt0 = self.s.lvt[LVT_LINT0];
        self.hw_enabled()
            && lvt0 & LVT_MASKED == 0
            && matches!(
                DeliveryMode::from_bits(lvt0 >> 8),
                DeliveryMode::Nmi | DeliveryMode::Smi | DeliveryMode::Init
            )
    }

    /// Outputs queued since the last call (IPIs, EOI broadcasts).
    pub fn take_outputs(&mut self) -> Vec<LapicOutput> {
        std::mem::take(&mut self.outputs)
    }

    fn push_output(&mut self, o: LapicOutput) {
        if self.outputs.len() < MAX_OUTPUTS {
            self.outputs.push(o);
        }
    }

    // ----- EOI and IPIs ----------------------------------------------------

    /// EOI (SDM 11.8.5): clears the highest ISR bit; a level-triggered
    /// vector (TMR set) is broadcast to the IOAPICs unless SVR bit 12
    /// suppresses it; a LINT0 entry with that vector loses its remote IRR.
    fn eoi(&mut self) {
        let Some(v) = vec_highest(&self.s.isr) else {
            return;
        };
        vec_clear(&mut self.s.isr, v);
        let level = vec_test(&self.s.tmr, v);
        self.tracer.emit_with(|| TraceEvent::Eoi {
            cpu: self.initial_id,
            vector: v,
            level,
        });
        if level && self.s.svr & SVR_SUPPRESS_EOI_BROADCAST == 0 {
            self.tracer.emit(TraceEvent::EoiBroadcast { vector: v });
            self.push_output(LapicOutput::Eoi(v));
        }
        let lvt0 = self.s.lvt[LVT_LINT0];
        if lvt0 & LVT_REMOTE_IRR != 0 && (lvt0 & LVT_VECTOR) as u8 == v {
            self.s.lvt[LVT_LINT0] &= !LVT_REMOTE_IRR;
            self.eval_level_lint();
        }
    }

    /// Sends the IPI the ICR describes (SDM 11.6.1).
    fn send_icr(&mut self) {
        let low = self.s.icr_low;
        let vector = (low & ICR_VECTOR) as u8;
        let delivery = DeliveryMode::from_bits(low >> 8);
        match delivery {
            // 0b011 and 0b111 are reserved in the ICR.
            DeliveryMode::Reserved | DeliveryMode::ExtInt => return,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority if vector < 16 => {
                self.log_error(esr::SEND_ILLEGAL_VECTOR);
                return;
            }
            _ => {}
        }
        let x2apic = self.is_x2apic();
        let deassert = delivery == DeliveryMode::Init
            && low & ICR_TRIGGER_LEVEL != 0
            && low & ICR_LEVEL_ASSERT == 0;
        let msg = ApicMessage {
            vector,
            delivery,
            dest_mode: if low & ICR_DEST_LOGICAL != 0 {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            dest: if x2apic {
                self.s.icr_high
            } else {
                self.s.icr_high >> 24
            },
            trigger: if deassert {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: !deassert,
            shorthand: match (low & ICR_SHORTHAND) >> 18 {
                0 => Shorthand::None,
                1 => Shorthand::SelfOnly,
                2 => Shorthand::AllIncludingSelf,
                _ => Shorthand::AllExcludingSelf,
            },
            source: Some(self.apic_id()),
        };
        self.tracer.emit_with(|| TraceEvent::Ipi {
            from: self.initial_id,
            vector,
            dest: msg.dest,
            mode: msg.delivery,
            shorthand: msg.shorthand,
        });
        self.push_output(LapicOutput::Ipi { msg, x2apic });
    }

    /// x2APIC SELF IPI register: a fixed, edge-triggered interrupt to this
    /// APIC (SDM 11.12.11).
    fn self_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.log_error(esr::SEND_ILLEGAL_VECTOR);
            return;
        }
        if self.sw_enabled() {
            self.tracer.emit_with(|| TraceEvent::Ipi {
                from: self.initial_id,
                vector,
                dest: self.apic_id(),
                mode: DeliveryMode::Fixed,
                shorthand: Shorthand::SelfOnly,
            });
            self.tracer.emit_with(|| TraceEvent::LapicAccept {
                cpu: self.initial_id,
                vector,
                mode: DeliveryMode::Fixed,
                trigger: TriggerMode::Edge,
            });
            self.set_irr(vector, false);
        }
    }

    // ----- registers --------------------------------------------------------

    /// Offsets of the xAPIC page (0x000-0x3F0) that hold no register in
    /// xAPIC mode (SDM Table 11-1; CMCI is absent with max LVT 5, SELF IPI
    /// exists only in x2APIC mode).
    fn xapic_reserved(r: u32) -> bool {
        matches!(r, 0x000 | 0x010 | 0x040..=0x070 | 0x290..=0x2F0 | 0x3A0..=0x3D0 | 0x3F0)
    }

    /// A register's value (both modes); `None` for a register that does not
    /// exist in the current mode.
    fn read_register(&self, r: u32) -> Option<u32> {
        let x2 = self.is_x2apic();
        let idx = ((r >> 4) & 7) as usize;
        Some(match r {
            reg::ID if x2 => self.initial_id,
            reg::ID => u32::from(self.s.xapic_id) << 24,
            reg::VERSION => APIC_VERSION,
            reg::TPR => u32::from(self.s.tpr),
            reg::APR if !x2 => u32::from(self.apr()),
            reg::PPR => u32::from(self.ppr()),
            reg::EOI | reg::RRD if !x2 => 0,
            reg::LDR if x2 => self.x2apic_ldr(),
            reg::LDR => self.s.ldr,
            reg::DFR if !x2 => self.s.dfr | 0x0FFF_FFFF,
            reg::SVR => self.s.svr,
            0x100..=0x170 => self.s.isr[idx],
            0x180..=0x1F0 => self.s.tmr[idx],
            0x200..=0x270 => self.s.irr[idx],
            reg::ESR => self.s.esr,
            reg::ICR_LOW => self.s.icr_low,
            reg::ICR_HIGH if !x2 => self.s.icr_high,
            reg::LVT_TIMER..=reg::LVT_ERROR => {
                self.s.lvt[((r - reg::LVT_TIMER) >> 4) as usize % LVT_ENTRIES]
            }
            reg::TIMER_INITIAL => self.s.timer_initial,
            reg::TIMER_CURRENT => self.current_count(self.now()),
            reg::TIMER_DIVIDE => self.s.timer_divide,
            _ => return None,
        })
    }

    /// Writes a register (value already checked for x2APIC reserved bits).
    fn write_register(&mut self, r: u32, value: u32) -> WriteResult {
        let x2 = self.is_x2apic();
        match r {
            reg::ID if !x2 => self.s.xapic_id = (value >> 24) as u8,
            reg::TPR => self.s.tpr = value as u8,
            reg::EOI => self.eoi(),
            reg::LDR if !x2 => self.s.ldr = value & 0xFF00_0000,
            reg::DFR if !x2 => self.s.dfr = value | 0x0FFF_FFFF,
            reg::SVR => self.write_svr(value),
            reg::ESR => {
                // SDM 11.5.3: the write latches the errors logged since the
                // previous write and re-arms the error interrupt.
                self.s.esr = std::mem::take(&mut self.s.esr_pending);
                self.s.error_interrupt_armed = true;
            }
            reg::ICR_LOW => {
                self.s.icr_low = value & ICR_WRITABLE;
                self.send_icr();
            }
            reg::ICR_HIGH if !x2 => self.s.icr_high = value & 0xFF00_0000,
            reg::LVT_TIMER..=reg::LVT_ERROR => {
                let index = ((r - reg::LVT_TIMER) >> 4) as usize % LVT_ENTRIES;
                self.write_lvt(index, value);
            }
            reg::TIMER_INITIAL => self.write_initial_count(value),
            reg::TIMER_DIVIDE => self.write_divide(value),
            reg::SELF_IPI if x2 => self.self_ipi(value as u8),
            reg::ID
            | reg::VERSION
            | reg::APR
            | reg::PPR
            | reg::RRD
            | reg::LDR
            | reg::TIMER_CURRENT
            | 0x100..=0x270 => return WriteResult::ReadOnly,
            _ => return WriteResult::Reserved,
        }
        WriteResult::Done
    }

    fn write_svr(&mut self, value: u32) {
        let value = value & SVR_WRITABLE;
        if value & SVR_ENABLE == 0 {
            // Software disable sets every LVT mask (SDM 11.4.7.2); the timer
            // catches up with its old configuration first.
            self.sync_timer(self.now());
            for lvt in self.s.lvt.iter_mut() {
                *lvt |= LVT_MASKED;
            }
        }
        self.s.svr = value;
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let Some(&writable) = LVT_WRITABLE.get(index) else {
            return;
        };
        let old = self.s.lvt[index];
        let mut new = (value & writable) | (old & LVT_REMOTE_IRR);
        if self.s.svr & SVR_ENABLE == 0 {
            new |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            let now = self.now();
            self.sync_timer(now);
            let old_mode = self.timer_mode();
            self.s.lvt[index] = new;
            self.timer_mode_changed(old_mode, now);
            return;
        }
        self.s.lvt[index] = new;
        if index == LVT_LINT0 {
            self.eval_level_lint();
        }
    }

    /// Reads `data.len()` bytes at `offset` in the xAPIC page.
    pub fn read_mmio(&mut self, offset: u64, data: &mut [u8]) {
        if self.mode() != ApicMode::XApic {
            data.fill(0xFF);
            return;
        }
        data.fill(0);
        if offset >= 0x400 {
            return;
        }
        let r = (offset & !0xF) as u32;
        let byte = (offset & 0xF) as usize;
        let len = data.len();
        let value = if Self::xapic_reserved(r) {
            None
        } else {
            self.read_register(r)
        };
        let Some(value) = value else {
            self.log_error(esr::ILLEGAL_REGISTER_ADDRESS);
            return;
        };
        if matches!(len, 1 | 2 | 4) && byte + len <= 4 {
            let bytes = value.to_le_bytes();
            data.copy_from_slice(&bytes[byte..byte + len]);
        }
    }

    /// Writes `data` at `offset` in the xAPIC page: only aligned 32-bit
    /// stores take effect.
    pub fn write_mmio(&mut self, offset: u64, data: &[u8]) {
        if self.mode() != ApicMode::XApic || offset >= 0x400 {
            return;
        }
        let r = (offset & !0xF) as u32;
        if Self::xapic_reserved(r) {
            self.log_error(esr::ILLEGAL_REGISTER_ADDRESS);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset & 0xF != 0 {
            return;
        }
        let _ = self.write_register(r, u32::from_le_bytes(bytes));
    }

    /// RDMSR of an x2APIC MSR (0x800-0x8FF). `None` means #GP: not in
    /// x2APIC mode, a register that does not exist in x2APIC mode, or a
    /// write-only one (EOI, SELF IPI).
    pub fn read_msr(&mut self, index: u32) -> Option<u64> {
        if !self.is_x2apic() || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&index) {
            return None;
        }
        let r = (index - MSR_X2APIC_FIRST) << 4;
        match r {
            reg::ICR_LOW => Some(u64::from(self.s.icr_high) << 32 | u64::from(self.s.icr_low)),
            reg::EOI | reg::SELF_IPI | reg::LVT_CMCI => None,
            _ => self.read_register(r).map(u64::from),
        }
    }

    /// WRMSR of an x2APIC MSR. `false` means #GP: not in x2APIC mode, a
    /// register that does not exist or is read-only, or a reserved bit set
    /// (SDM 11.12.1.2-3; EOI and ESR accept only 0).
    pub fn write_msr(&mut self, index: u32, value: u64) -> bool {
        if !self.is_x2apic() || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&index) {
            return false;
        }
        let r = (index - MSR_X2APIC_FIRST) << 4;
        if r == reg::ICR_LOW {
            if value & X2APIC_ICR_RESERVED != 0 {
                return false;
            }
            self.s.icr_low = value as u32 & ICR_WRITABLE;
            self.s.icr_high = (value >> 32) as u32;
            self.send_icr();
            return true;
        }
        if value >> 32 != 0 {
            return false;
        }
        let v = value as u32;
        let allowed: u32 = match r {
            reg::TPR | reg::SELF_IPI => 0xFF,
            reg::EOI | reg::ESR => 0,
            reg::SVR => SVR_WRITABLE,
            reg::LVT_TIMER..=reg::LVT_ERROR => {
                let i = ((r - reg::LVT_TIMER) >> 4) as usize % LVT_ENTRIES;
                LVT_WRITABLE[i] | LVT_READ_ONLY[i]
            }
            reg::TIMER_DIVIDE => TIMER_DIVIDE_BITS,
            _ => u32::MAX,
        };
        if v & !allowed != 0 {
            return false;
        }
        matches!(self.write_register(r, v), WriteResult::Done)
    }

    // ----- timer (SDM 11.5.4) ----------------------------------------------

    pub fn timer_mode(&self) -> TimerMode {
        match (self.s.lvt[LVT_TIMER] & LVT_TIMER_MODE) >> 17 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::OneShot,
        }
    }

    /// The divider of the divide configuration register (SDM Figure
    /// 11-10): 0b000 -> 2, ..., 0b110 -> 128, 0b111 -> 1.
    pub fn timer_divisor(&self) -> u64 {
        let d = self.s.timer_divide;
        let code = (d & 3) | ((d >> 1) & 4);
        1 << ((code + 1) & 7)
    }

    fn elapsed_ticks(&self, now: u64) -> u64 {
        self.s
            .timer_ref_ticks
            .saturating_add(now.saturating_sub(self.s.timer_ref_ns) / self.timer_divisor())
    }

    /// The current-count register at `now`.
    pub fn current_count(&self, now: u64) -> u32 {
        let initial = u64::from(self.s.timer_initial);
        if self.timer_mode() == TimerMode::TscDeadline
            || initial == 0
            || self.s.timer_next_ns.is_none()
        {
            return 0;
        }
        let e = self.elapsed_ticks(now);
        let c = match self.timer_mode() {
            TimerMode::Periodic => initial - e % initial,
            _ => initial.saturating_sub(e),
        };
        c as u32
    }

    /// The first periodic expiry strictly after `after`.
    fn periodic_expiry_after(&self, after: u64) -> Option<u64> {
        let initial = u64::from(self.s.timer_initial);
        if initial == 0 {
            return None;
        }
        let e = self.elapsed_ticks(after);
        let target = (e / initial).saturating_add(1).saturating_mul(initial);
        let ticks = target.saturating_sub(self.s.timer_ref_ticks);
        Some(
            self.s
                .timer_ref_ns
                .saturating_add(ticks.saturating_mul(self.timer_divisor())),
        )
    }

    /// Processes a due expiry at `now`: the timer interrupt (unless masked),
    /// the periodic reload, or the end of a one-shot / deadline.
    fn sync_timer(&mut self, now: u64) {
        let Some(due) = self.s.timer_next_ns else {
            return;
        };
        if due > now {
            return;
        }
        match self.timer_mode() {
            TimerMode::Periodic => {
                let floor = now.max(due.saturating_add(MIN_PERIODIC_NS - 1));
                self.s.timer_next_ns = self.periodic_expiry_after(floor);
            }
            TimerMode::OneShot => self.s.timer_next_ns = None,
            TimerMode::TscDeadline => {
                // SDM 11.5.4.1: the timer disarms itself and clears the MSR.
                self.s.timer_next_ns = None;
                self.s.tsc_deadline = 0;
            }
        }
        self.deliver_lvt(LVT_TIMER);
    }

    /// Guest-clock time of the next timer interrupt, if one is armed and
    /// unmasked.
    pub fn timer_deadline(&self) -> Option<u64> {
        if self.s.lvt[LVT_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        self.s.timer_next_ns
    }

    /// Brings the timer up to `now`: sets the timer vector in the IRR if an
    /// expiry is due.
    pub fn fire_timer(&mut self, now: u64) {
        self.sync_timer(now);
    }

    /// [`Lapic::fire_timer`] at the clock's current time.
    pub fn update_timer(&mut self) {
        self.sync_timer(self.now());
    }

    fn write_initial_count(&mut self, value: u32) {
        if self.timer_mode() == TimerMode::TscDeadline {
            // SDM 11.5.4.1: ignored in TSC-deadline mode.
            return;
        }
        let now = self.now();
        self.sync_timer(now);
        self.s.timer_initial = value;
        self.s.timer_ref_ns = now;
        self.s.timer_ref_ticks = 0;
        self.s.timer_next_ns = (value != 0)
            .then(|| now.saturating_add(u64::from(value).saturating_mul(self.timer_divisor())));
    }

    fn write_divide(&mut self, value: u32) {
        let now = self.now();
        self.sync_timer(now);
        // Re-base the count so the ticks already counted stay counted and
        // the rest runs at the new rate (KVM rescales the same way).
        let e = self.elapsed_ticks(now);
        self.s.timer_ref_ticks = e;
        self.s.timer_ref_ns = now;
        self.s.timer_divide = value & TIMER_DIVIDE_BITS;
        if self.s.timer_next_ns.is_none() || self.timer_mode() == TimerMode::TscDeadline {
            return;
        }
        let initial = u64::from(self.s.timer_initial);
        self.s.timer_next_ns = match self.timer_mode() {
            TimerMode::Periodic => self.periodic_expiry_after(now),
            _ => (e < initial)
                .then(|| now.saturating_add((initial - e).saturating_mul(self.timer_divisor()))),
        };
    }

    fn timer_mode_changed(&mut self, old: TimerMode, now: u64) {
        let new = self.timer_mode();
        if old == new {
            return;
        }
        if (old == TimerMode::TscDeadline) != (new == TimerMode::TscDeadline) {
            // SDM 11.5.4.1: switching to or from TSC-deadline mode disarms
            // the timer (KVM also zeroes the initial count).
            self.s.timer_initial = 0;
            self.s.timer_next_ns = None;
            self.s.tsc_deadline = 0;
            self.s.timer_ref_ticks = 0;
            self.s.timer_ref_ns = now;
            return;
        }
        // One-shot <-> periodic: the running count continues; leaving
        // periodic mode keeps the position in the current period.
        if old == TimerMode::Periodic && self.s.timer_initial != 0 {
            let e = self.elapsed_ticks(now);
            self.s.timer_ref_ticks = e % u64::from(self.s.timer_initial);
            self.s.timer_ref_ns = now;
        }
    }

    /// The guest TSC at the clock's current time.
    pub fn tsc_now(&self) -> u64 {
        let t = u128::from(self.now()) * u128::from(self.tsc_khz) / 1_000_000;
        u64::try_from(t)
            .unwrap_or(u64::MAX)
            .saturating_add(self.tsc_offset)
    }

    /// The first clock time at which the TSC reaches `tsc`.
    fn ns_for_tsc(&self, tsc: u64) -> u64 {
        let khz = u128::from(self.tsc_khz);
        // A deadline before the clock's origin has passed: time 0.
        let tsc = tsc.saturating_sub(self.tsc_offset);
        let ns = (u128::from(tsc) * 1_000_000).div_ceil(khz);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// WRMSR IA32_TSC_DEADLINE: arms the timer in TSC-deadline mode (0
    /// disarms); ignored in other modes (SDM 11.5.4.1).
    pub fn set_tsc_deadline(&mut self, tsc: u64) {
        if !self.hw_enabled() || self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.sync_timer(self.now());
        self.s.tsc_deadline = tsc;
        self.s.timer_next_ns = (tsc != 0).then(|| self.ns_for_tsc(tsc));
    }

    /// RDMSR IA32_TSC_DEADLINE: 0 outside TSC-deadline mode. Call
    /// [`Lapic::update_timer`] first so an expired deadline reads 0.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() != TimerMode::TscDeadline {
            return 0;
        }
        self.s.tsc_deadline
    }

    // ----- save / restore / dump ---------------------------------------------

    pub fn save_state(&self) -> LapicState {
        self.s.clone()
    }

    /// Loads a saved state; values are masked to what the registers can
    /// hold, so a corrupt state cannot break the invariants.
    pub fn restore_state(&mut self, state: &LapicState) {
        let mut s = state.clone();
        for r in [&mut s.irr, &mut s.isr, &mut s.tmr] {
            r[0] &= 0xFFFF_0000;
        }
        s.svr &= SVR_WRITABLE;
        s.icr_low &= ICR_WRITABLE;
        for (i, lvt) in s.lvt.iter_mut().enumerate() {
            let extra = if i == LVT_LINT0 { LVT_REMOTE_IRR } else { 0 };
            *lvt &= LVT_WRITABLE[i] | extra;
        }
        s.timer_divide &= TIMER_DIVIDE_BITS;
        s.ldr &= 0xFF00_0000;
        s.dfr |= 0x0FFF_FFFF;
        if s.apic_base & (APIC_BASE_ENABLE | APIC_BASE_EXTD) == APIC_BASE_EXTD {
            s.apic_base &= !APIC_BASE_EXTD;
        }
        self.s = s;
    }

    fn decode_lvt(&self, index: usize) -> String {
        let v = self.s.lvt[index];
        let mut s = format!("{:<8}{v:#010x}", LVT_NAMES[index]);
        let mode = if index == LVT_TIMER || index == LVT_ERROR {
            "Fixed"
        } else {
            delivery_name(v >> 8)
        };
        let _ = write!(s, " {mode:<6} vec {:#04x}", v & LVT_VECTOR);
        if index == LVT_LINT0 || index == LVT_LINT1 {
            s.push_str(if v & LVT_POLARITY != 0 {
                " active-lo"
            } else {
                " active-hi"
            });
            s.push_str(if v & LVT_LEVEL != 0 {
                " level"
            } else {
                " edge"
            });
            if v & LVT_REMOTE_IRR != 0 {
                s.push_str(" remote-irr");
            }
        }
        if index == LVT_TIMER {
            s.push_str(match self.timer_mode() {
                TimerMode::OneShot => " one-shot",
                TimerMode::Periodic => " periodic",
                TimerMode::TscDeadline => " tsc-deadline",
            });
        }
        if v & LVT_MASKED != 0 {
            s.push_str(" masked");
        }
        s
    }

    /// The registers in readable form, like QEMU's `info lapic`.
    pub fn dump(&self) -> String {
        let now = self.now();
        let mut s = String::new();
        let mode = match self.mode() {
            ApicMode::Disabled => "disabled",
            ApicMode::XApic => "xAPIC",
            ApicMode::X2Apic => "x2APIC",
        };
        let _ = writeln!(
            s,
            "LAPIC id {:#x} (initial {:#x}) {mode}{} base {:#x} version {APIC_VERSION:#010x}",
            self.apic_id(),
            self.initial_id,
            if self.is_bsp() { " BSP" } else { "" },
            self.s.apic_base,
        );
        for i in 0..LVT_ENTRIES {
            let _ = writeln!(s, "{}", self.decode_lvt(i));
        }
        let _ = writeln!(
            s,
            "Timer   DCR={:#x} (divide by {}) initial_count={} current_count={} next={}{}",
            self.s.timer_divide,
            self.timer_divisor(),
            self.s.timer_initial,
            self.current_count(now),
            self.s
                .timer_next_ns
                .map_or_else(|| "-".to_string(), |n| format!("{n}ns")),
            if self.timer_mode() == TimerMode::TscDeadline {
                format!(
                    " tsc_deadline={:#x} tsc_now={:#x}",
                    self.s.tsc_deadline,
                    self.tsc_now()
                )
            } else {
                String::new()
            },
        );
        let _ = writeln!(
            s,
            "SPIV    {:#010x} APIC {}, focus={}, eoi-broadcast {}, spurious vec {:#04x}",
            self.s.svr,
            if self.s.svr & SVR_ENABLE != 0 {
                "enabled"
            } else {
                "disabled"
            },
            if self.s.svr & SVR_FOCUS_DISABLE != 0 {
                "off"
            } else {
                "on"
            },
            if self.s.svr & SVR_SUPPRESS_EOI_BROADCAST != 0 {
                "suppressed"
            } else {
                "on"
            },
            self.s.svr & SVR_VECTOR,
        );
        let _ = writeln!(
            s,
            "ICR     {:#010x} {} {} {}  ICR2 {:#010x}",
            self.s.icr_low,
            delivery_name(self.s.icr_low >> 8),
            if self.s.icr_low & ICR_DEST_LOGICAL != 0 {
                "logical"
            } else {
                "physical"
            },
            ["no-shorthand", "self", "all-incl-self", "all-excl-self"]
                [((self.s.icr_low >> 18) & 3) as usize],
            self.s.icr_high,
        );
        let _ = writeln!(
            s,
            "ESR     {:#010x} (logged since last write {:#010x})",
            self.s.esr, self.s.esr_pending
        );
        let _ = writeln!(s, "ISR    {}", vec_list(&self.s.isr, None));
        let _ = writeln!(s, "IRR    {}", vec_list(&self.s.irr, Some(&self.s.tmr)));
        let _ = writeln!(s, "TMR    {}", vec_list(&self.s.tmr, None));
        let ldr = if self.is_x2apic() {
            self.x2apic_ldr()
        } else {
            self.s.ldr
        };
        let _ = writeln!(
            s,
            "APR {:#04x} TPR {:#04x} PPR {:#04x} DFR {:#x} LDR {ldr:#010x}",
            self.apr(),
            self.s.tpr,
            self.ppr(),
            self.s.dfr >> 28,
        );
        let _ = write!(
            s,
            "pins LINT0={} LINT1={}  pending:{}{}{}{}{}{}",
            u8::from(self.s.lint_level[0]),
            u8::from(self.s.lint_level[1]),
            if self.s.nmi_pending { " NMI" } else { "" },
            if self.s.smi_pending { " SMI" } else { "" },
            if self.s.init_pending { " INIT" } else { "" },
            if self.extint_pending() { " ExtINT" } else { "" },
            self.s
                .sipi_vector
                .map_or_else(String::new, |v| format!(" SIPI({v:#04x})")),
            if self.s.wait_for_sipi {
                " (wait-for-SIPI)"
            } else {
                ""
            },
        );
        s
    }
}

/// The LAPIC timer as a [`TimerDevice`]. It does not ring the vCPU's
/// doorbell; [`crate::devices::apic_router::ApicRouter::timers`] gives
/// wrappers that do, which the machine should prefer.
pub struct LapicTimer(pub Arc<Mutex<Lapic>>);

impl TimerDevice for LapicTimer {
    fn deadline(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .timer_deadline()
    }

    fn fire(&self, now: u64) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fire_timer(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, VirtualClock};

    /// 1 GHz TSC: one TSC tick per nanosecond.
    const TSC_KHZ: u64 = 1_000_000;

    fn lapic(id: u32, bsp: bool) -> (Arc<VirtualClock>, Lapic) {
        let c = Arc::new(VirtualClock::new());
        let l = Lapic::new(id, bsp, c.clone(), TSC_KHZ);
        (c, l)
    }

    fn w(l: &mut Lapic, off: u32, v: u32) {
        l.write_mmio(u64::from(off), &v.to_le_bytes());
    }

    fn r(l: &mut Lapic, off: u32) -> u32 {
        let mut b = [0u8; 4];
        l.read_mmio(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// Software-enables the APIC with spurious vector 0xFF.
    fn enable(l: &mut Lapic) {
        w(l, reg::SVR, 0x1FF);
    }

    /// Reads the ESR the way a guest must: write, then read.
    fn esr_read(l: &mut Lapic) -> u32 {
        w(l, reg::ESR, 0);
        r(l, reg::ESR)
    }

    fn fixed(vector: u8, level: bool) -> ApicMessage {
        ApicMessage {
            vector,
            delivery: DeliveryMode::Fixed,
            dest_mode: DestMode::Physical,
            dest: 0,
            trigger: if level {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            shorthand: Shorthand::None,
            source: None,
        }
    }

    fn msg(delivery: DeliveryMode, vector: u8) -> ApicMessage {
        ApicMessage {
            delivery,
            ..fixed(vector, false)
        }
    }

    fn irr_has(l: &mut Lapic, v: u8) -> bool {
        let word = r(l, reg::IRR + u32::from(v >> 5) * 0x10);
        word & (1 << (v & 31)) != 0
    }

    fn isr_has(l: &mut Lapic, v: u8) -> bool {
        let word = r(l, reg::ISR + u32::from(v >> 5) * 0x10);
        word & (1 << (v & 31)) != 0
    }

    fn to_x2apic(l: &mut Lapic) {
        let base = l.apic_base();
        assert!(l.set_apic_base(base | APIC_BASE_EXTD));
    }

    #[test]
    fn reset_values() {
        let (_, mut l) = lapic(3, false);
        assert_eq!(r(&mut l, reg::ID), 0x0300_0000);
        assert_eq!(r(&mut l, reg::VERSION), 0x0105_0014);
        assert_eq!(r(&mut l, reg::SVR), 0xFF);
        assert_eq!(r(&mut l, reg::DFR), 0xFFFF_FFFF);
        assert_eq!(r(&mut l, reg::TPR), 0);
        for off in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(0x10) {
            assert_eq!(r(&mut l, off), LVT_MASKED, "LVT {off:#x}");
        }
        assert_eq!(l.apic_base(), 0xFEE0_0800);
        assert!(l.wait_for_sipi());
        // The BSP resets in virtual-wire mode: LINT0 unmasked ExtINT.
        let (_, mut b) = lapic(0, true);
        assert_eq!(r(&mut b, reg::LVT_LINT0), 0x700);
        assert_eq!(b.apic_base(), 0xFEE0_0900);
        assert_eq!(b.mmio_base(), Some(0xFEE0_0000));
        assert!(!b.wait_for_sipi());
    }

    #[test]
    fn software_enable_via_svr() {
        let (_, mut l) = lapic(0, true);
        l.accept(&fixed(0x40, false));
        assert!(
            !irr_has(&mut l, 0x40),
            "a software-disabled APIC drops fixed"
        );
        // LVT masks cannot be cleared while software-disabled.
        w(&mut l, reg::LVT_ERROR, 0xFE);
        assert_eq!(r(&mut l, reg::LVT_ERROR), LVT_MASKED | 0xFE);
        enable(&mut l);
        assert_eq!(r(&mut l, reg::SVR), 0x1FF);
        l.accept(&fixed(0x40, false));
        assert!(irr_has(&mut l, 0x40));
        assert!(l.has_interrupt());
        w(&mut l, reg::LVT_ERROR, 0xFE);
        assert_eq!(r(&mut l, reg::LVT_ERROR), 0xFE);
        // Disabling holds the IRR and masks every LVT entry.
        w(&mut l, reg::SVR, 0xFF);
        assert!(!l.has_interrupt());
        assert!(irr_has(&mut l, 0x40));
        assert_eq!(r(&mut l, reg::LVT_ERROR), LVT_MASKED | 0xFE);
        assert_eq!(r(&mut l, reg::LVT_LINT0), LVT_MASKED | 0x700);
        // NMIs are still accepted.
        l.accept(&msg(DeliveryMode::Nmi, 0));
        assert!(l.nmi_pending());
    }

    #[test]
    fn tpr_masks_and_releases() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::TPR, 0x50);
        l.accept(&fixed(0x40, false));
        assert!(!l.has_interrupt(), "class 4 is not above TPR class 5");
        w(&mut l, reg::TPR, 0x40);
        assert!(!l.has_interrupt(), "equal class is held too");
        w(&mut l, reg::TPR, 0x30);
        assert!(l.has_interrupt());
        assert_eq!(l.ack_interrupt(), Some(0x40));
        assert!(isr_has(&mut l, 0x40));
        assert!(!irr_has(&mut l, 0x40));
        assert_eq!(r(&mut l, reg::PPR), 0x40);
    }

    #[test]
    fn ppr_is_tpr_or_isr_class() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        assert_eq!(r(&mut l, reg::PPR), 0);
        l.accept(&fixed(0x83, false));
        assert_eq!(l.ack_interrupt(), Some(0x83));
        w(&mut l, reg::TPR, 0x20);
        assert_eq!(r(&mut l, reg::PPR), 0x80, "ISR class wins, low bits 0");
        w(&mut l, reg::TPR, 0x85);
        assert_eq!(r(&mut l, reg::PPR), 0x85, "equal class: TPR");
        w(&mut l, reg::TPR, 0x9A);
        assert_eq!(r(&mut l, reg::PPR), 0x9A);
        w(&mut l, reg::EOI, 0);
        w(&mut l, reg::TPR, 0x21);
        assert_eq!(r(&mut l, reg::PPR), 0x21);
    }

    #[test]
    fn priority_nesting_and_eoi_order() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        l.accept(&fixed(0x80, false));
        assert_eq!(l.ack_interrupt(), Some(0x80));
        l.accept(&fixed(0x70, false));
        assert!(!l.has_interrupt(), "0x70 is held while 0x80 is in service");
        l.accept(&fixed(0x90, false));
        assert!(l.has_interrupt());
        assert_eq!(l.ack_interrupt(), Some(0x90));
        assert!(!l.has_interrupt());
        // EOI retires the highest in-service vector first.
        w(&mut l, reg::EOI, 0);
        assert!(!isr_has(&mut l, 0x90));
        assert!(isr_has(&mut l, 0x80));
        assert!(!l.has_interrupt());
        w(&mut l, reg::EOI, 0);
        assert!(!isr_has(&mut l, 0x80));
        assert!(l.has_interrupt());
        assert_eq!(l.ack_interrupt(), Some(0x70));
        // An interrupt in the same class as the one in service waits too.
        l.accept(&fixed(0x7F, false));
        assert!(!l.has_interrupt());
    }

    #[test]
    fn eoi_broadcast_only_for_level_and_not_when_suppressed() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        l.accept(&fixed(0x61, true));
        assert_eq!(r(&mut l, reg::TMR + 0x30) & (1 << 1), 1 << 1);
        assert_eq!(l.ack_interrupt(), Some(0x61));
        w(&mut l, reg::EOI, 0);
        assert_eq!(l.take_outputs(), vec![LapicOutput::Eoi(0x61)]);
        l.accept(&fixed(0x62, false));
        assert_eq!(l.ack_interrupt(), Some(0x62));
        w(&mut l, reg::EOI, 0);
        assert!(
            l.take_outputs().is_empty(),
            "edge vectors are not broadcast"
        );
        // SVR bit 12: the OS EOIs the IOAPIC itself.
        w(&mut l, reg::SVR, 0x11FF);
        l.accept(&fixed(0x63, true));
        assert_eq!(l.ack_interrupt(), Some(0x63));
        w(&mut l, reg::EOI, 0);
        assert!(l.take_outputs().is_empty());
        assert!(!isr_has(&mut l, 0x63));
        // An EOI with nothing in service does nothing.
        w(&mut l, reg::EOI, 0);
        assert!(l.take_outputs().is_empty());
    }

    #[test]
    fn spurious_when_interrupt_went_away() {
        let (_, mut l) = lapic(0, true);
        w(&mut l, reg::SVR, 0x1EF);
        l.accept(&fixed(0x45, false));
        assert!(l.has_interrupt());
        w(&mut l, reg::TPR, 0xF0);
        assert_eq!(l.ack_interrupt(), Some(0xEF));
        assert!(!isr_has(&mut l, 0x45) && !isr_has(&mut l, 0xEF));
        assert!(irr_has(&mut l, 0x45));
    }

    #[test]
    fn icr_write_sends_ipi() {
        let (_, mut l) = lapic(2, false);
        enable(&mut l);
        w(&mut l, reg::ICR_HIGH, 0x0500_0000);
        assert_eq!(r(&mut l, reg::ICR_HIGH), 0x0500_0000);
        w(&mut l, reg::ICR_LOW, 0x4000 | 0x0800 | 0x51);
        let out = l.take_outputs();
        assert_eq!(out.len(), 1);
        let LapicOutput::Ipi { msg, x2apic } = out[0] else {
            panic!("not an IPI: {out:?}");
        };
        assert!(!x2apic);
        assert_eq!(msg.vector, 0x51);
        assert_eq!(msg.dest, 5);
        assert_eq!(msg.dest_mode, DestMode::Logical);
        assert_eq!(msg.source, Some(2));
        assert_eq!(msg.shorthand, Shorthand::None);
        assert_eq!(msg.trigger, TriggerMode::Edge);
        // Self shorthand.
        w(&mut l, reg::ICR_LOW, 0x4_0000 | 0x52);
        let out = l.take_outputs();
        assert!(
            matches!(out[..], [LapicOutput::Ipi { msg, .. }] if msg.shorthand == Shorthand::SelfOnly && msg.vector == 0x52)
        );
        // INIT level de-assert.
        w(&mut l, reg::ICR_LOW, 0x8000 | 0x500);
        let out = l.take_outputs();
        assert!(
            matches!(out[..], [LapicOutput::Ipi { msg, .. }] if msg.delivery == DeliveryMode::Init && !msg.level && msg.trigger == TriggerMode::Level)
        );
        // Reserved delivery mode: nothing.
        w(&mut l, reg::ICR_LOW, 0x300 | 0x40);
        assert!(l.take_outputs().is_empty());
        assert_eq!(r(&mut l, reg::ICR_LOW), 0x340, "delivery status reads idle");
    }

    #[test]
    fn illegal_vectors_set_esr() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        l.accept(&fixed(5, false));
        assert_eq!(r(&mut l, reg::IRR), 0);
        assert_eq!(r(&mut l, reg::ESR), 0, "not latched before an ESR write");
        assert_eq!(esr_read(&mut l), esr::RECEIVE_ILLEGAL_VECTOR);
        assert_eq!(esr_read(&mut l), 0, "the write clears logged errors");
        w(&mut l, reg::ICR_LOW, 0x4000 | 0x03);
        assert!(l.take_outputs().is_empty(), "an illegal vector is not sent");
        assert_eq!(esr_read(&mut l), esr::SEND_ILLEGAL_VECTOR);
        // NMI IPIs carry no vector: vector 0 is fine.
        w(&mut l, reg::ICR_LOW, 0x4400);
        assert_eq!(l.take_outputs().len(), 1);
        assert_eq!(esr_read(&mut l), 0);
        // With LVT error unmasked an error raises the error interrupt once
        // until the ESR is written again.
        w(&mut l, reg::LVT_ERROR, 0xFE);
        l.accept(&fixed(1, false));
        assert!(irr_has(&mut l, 0xFE));
        assert_eq!(l.ack_interrupt(), Some(0xFE));
        w(&mut l, reg::EOI, 0);
        l.accept(&fixed(2, false));
        assert!(!irr_has(&mut l, 0xFE), "not re-armed yet");
        assert_eq!(esr_read(&mut l), esr::RECEIVE_ILLEGAL_VECTOR);
        l.accept(&fixed(2, false));
        assert!(irr_has(&mut l, 0xFE));
    }

    #[test]
    fn reserved_registers_and_access_sizes() {
        let (_, mut l) = lapic(0x12, true);
        enable(&mut l);
        assert_eq!(r(&mut l, 0x040), 0);
        assert_eq!(esr_read(&mut l), esr::ILLEGAL_REGISTER_ADDRESS);
        w(&mut l, reg::SELF_IPI, 0x50);
        assert_eq!(esr_read(&mut l), esr::ILLEGAL_REGISTER_ADDRESS);
        assert_eq!(r(&mut l, reg::IRR + 0x20), 0);
        w(&mut l, reg::LVT_CMCI, 0x50);
        assert_eq!(esr_read(&mut l), esr::ILLEGAL_REGISTER_ADDRESS);
        // Valid registers (even read-only ones) log nothing.
        w(&mut l, reg::VERSION, 0);
        let _ = r(&mut l, reg::EOI);
        assert_eq!(esr_read(&mut l), 0);
        // A byte read inside a register's low dword works; elsewhere 0.
        let mut b = [0u8; 1];
        l.read_mmio(0x23, &mut b);
        assert_eq!(b[0], 0x12);
        l.read_mmio(0x27, &mut b);
        assert_eq!(b[0], 0);
        let mut q = [0xAAu8; 8];
        l.read_mmio(0x30, &mut q);
        assert_eq!(q, [0; 8]);
        // Only aligned 32-bit writes count.
        l.write_mmio(0x80, &[0x70]);
        l.write_mmio(0x84, &0x60u32.to_le_bytes());
        l.write_mmio(0x80, &0x50u16.to_le_bytes());
        assert_eq!(r(&mut l, reg::TPR), 0);
        w(&mut l, reg::TPR, 0x1_2345);
        assert_eq!(r(&mut l, reg::TPR), 0x45);
        // Beyond 0x3F0: nothing, no error.
        assert_eq!(r(&mut l, 0x800), 0);
        assert_eq!(esr_read(&mut l), 0);
        // LDR/DFR keep only their defined bits.
        w(&mut l, reg::LDR, 0x0312_3456);
        assert_eq!(r(&mut l, reg::LDR), 0x0300_0000);
        w(&mut l, reg::DFR, 0x0000_0000);
        assert_eq!(r(&mut l, reg::DFR), 0x0FFF_FFFF);
        // The xAPIC ID is writable.
        w(&mut l, reg::ID, 0x0700_0000);
        assert_eq!(l.apic_id(), 7);
    }

    #[test]
    fn timer_one_shot() {
        let (c, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::LVT_TIMER, 0x31);
        w(&mut l, reg::TIMER_DIVIDE, 0x0); // divide by 2
        w(&mut l, reg::TIMER_INITIAL, 1000);
        assert_eq!(l.timer_deadline(), Some(2000));
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 1000);
        c.advance(500);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 750);
        c.advance(1499);
        l.fire_timer(c.now_ns());
        assert!(!irr_has(&mut l, 0x31));
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 1);
        c.advance(1);
        l.fire_timer(c.now_ns());
        assert!(irr_has(&mut l, 0x31));
        assert_eq!(l.timer_deadline(), None);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 0);
        assert_eq!(r(&mut l, reg::TIMER_INITIAL), 1000);
        assert_eq!(l.ack_interrupt(), Some(0x31));
        w(&mut l, reg::EOI, 0);
        c.advance(10_000);
        l.fire_timer(c.now_ns());
        assert!(!irr_has(&mut l, 0x31), "one-shot fires once");
        // Writing 0 stops a running timer.
        w(&mut l, reg::TIMER_INITIAL, 50);
        w(&mut l, reg::TIMER_INITIAL, 0);
        assert_eq!(l.timer_deadline(), None);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 0);
    }

    #[test]
    fn timer_periodic() {
        let (c, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::LVT_TIMER, 0x2_0000 | 0x32);
        w(&mut l, reg::TIMER_DIVIDE, 0xB); // divide by 1
        w(&mut l, reg::TIMER_INITIAL, 300_000);
        let mut fired_at = Vec::new();
        for _ in 0..10 {
            let d = l.timer_deadline().expect("periodic timer armed");
            c.advance_to(d);
            l.fire_timer(d);
            if l.ack_interrupt() == Some(0x32) {
                fired_at.push(d);
                w(&mut l, reg::EOI, 0);
            }
        }
        let expect: Vec<u64> = (1..=10).map(|k| k * 300_000).collect();
        assert_eq!(fired_at, expect);
        c.advance(100_000);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 200_000);
        // A late fire delivers once and keeps the phase.
        c.advance(1_000_000);
        l.fire_timer(c.now_ns());
        assert_eq!(l.timer_deadline(), Some(4_200_000));
        assert_eq!(
            r(&mut l, reg::TIMER_CURRENT),
            300_000 - (4_100_000 % 300_000) as u32
        );
    }

    #[test]
    fn periodic_interrupt_rate_is_bounded() {
        let (c, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::LVT_TIMER, 0x2_0000 | 0x32);
        w(&mut l, reg::TIMER_DIVIDE, 0xB);
        w(&mut l, reg::TIMER_INITIAL, 10);
        c.advance(10);
        l.fire_timer(10);
        assert!(l.timer_deadline().unwrap() >= 10 + MIN_PERIODIC_NS);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 10, "the count is exact");
    }

    #[test]
    fn timer_divide_configuration() {
        // (DCR value, divisor) per SDM Figure 11-10.
        let table = [
            (0x0, 2),
            (0x1, 4),
            (0x2, 8),
            (0x3, 16),
            (0x8, 32),
            (0x9, 64),
            (0xA, 128),
            (0xB, 1),
        ];
        for (dcr, div) in table {
            let (c, mut l) = lapic(0, true);
            enable(&mut l);
            w(&mut l, reg::LVT_TIMER, 0x40);
            w(&mut l, reg::TIMER_DIVIDE, dcr | 0xF0);
            assert_eq!(r(&mut l, reg::TIMER_DIVIDE), dcr);
            assert_eq!(l.timer_divisor(), div);
            w(&mut l, reg::TIMER_INITIAL, 100);
            assert_eq!(l.timer_deadline(), Some(100 * div));
            c.advance(10 * div);
            assert_eq!(r(&mut l, reg::TIMER_CURRENT), 90, "dcr {dcr:#x}");
        }
        // Changing the divider mid-count keeps the ticks already counted.
        let (c, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::LVT_TIMER, 0x40);
        w(&mut l, reg::TIMER_DIVIDE, 0xB);
        w(&mut l, reg::TIMER_INITIAL, 100);
        c.advance(40);
        w(&mut l, reg::TIMER_DIVIDE, 0x0);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 60);
        assert_eq!(l.timer_deadline(), Some(40 + 120));
    }

    #[test]
    fn masked_timer_counts_but_does_not_interrupt() {
        let (c, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::LVT_TIMER, LVT_MASKED | 0x33);
        w(&mut l, reg::TIMER_DIVIDE, 0xB);
        w(&mut l, reg::TIMER_INITIAL, 1000);
        assert_eq!(l.timer_deadline(), None);
        c.advance(400);
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 600);
        c.advance(1000);
        l.fire_timer(c.now_ns());
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 0);
        // Unmasking after the expiry does not deliver the lost interrupt.
        w(&mut l, reg::LVT_TIMER, 0x33);
        assert!(!irr_has(&mut l, 0x33));
        assert_eq!(l.timer_deadline(), None);
        // A periodic masked timer keeps its phase and interrupts once unmasked.
        w(&mut l, reg::LVT_TIMER, LVT_MASKED | 0x2_0000 | 0x33);
        w(&mut l, reg::TIMER_INITIAL, 300_000);
        c.advance(700_000);
        w(&mut l, reg::LVT_TIMER, 0x2_0000 | 0x33);
        assert!(!irr_has(&mut l, 0x33));
        assert_eq!(l.timer_deadline(), Some(1400 + 900_000));
    }

    #[test]
    fn timer_tsc_deadline_mode() {
        let c = Arc::new(VirtualClock::new());
        // 2 GHz TSC: two ticks per ns.
        let mut l = Lapic::new(0, true, c.clone(), 2_000_000);
        enable(&mut l);
        c.advance(1000);
        assert_eq!(l.tsc_now(), 2000);
        // Not in deadline mode: the MSR ignores writes and reads 0.
        l.set_tsc_deadline(5000);
        assert_eq!(l.tsc_deadline(), 0);
        assert_eq!(l.timer_deadline(), None);
        w(&mut l, reg::LVT_TIMER, 0x4_0000 | 0x34);
        w(&mut l, reg::TIMER_INITIAL, 1234);
        assert_eq!(r(&mut l, reg::TIMER_INITIAL), 0, "initial count ignored");
        assert_eq!(r(&mut l, reg::TIMER_CURRENT), 0);
        l.set_tsc_deadline(3001);
        assert_eq!(l.tsc_deadline(), 3001);
        assert_eq!(l.timer_deadline(), Some(1501), "first ns with TSC >= 3001");
        c.advance(500);
        l.fire_timer(c.now_ns());
        assert!(!irr_has(&mut l, 0x34));
        c.advance(1);
        assert!(l.tsc_now() >= 3001);
        l.fire_timer(c.now_ns());
        assert!(irr_has(&mut l, 0x34));
        assert_eq!(l.tsc_deadline(), 0, "disarmed and cleared on expiry");
        assert_eq!(l.timer_deadline(), None);
        // Writing 0 disarms.
        l.set_tsc_deadline(1_000_000);
        assert!(l.timer_deadline().is_some());
        l.set_tsc_deadline(0);
        assert_eq!(l.timer_deadline(), None);
        // A deadline in the past fires at once.
        l.set_tsc_deadline(10);
        assert!(l.timer_deadline().unwrap() <= c.now_ns());
        // Leaving deadline mode disarms.
        w(&mut l, reg::LVT_TIMER, 0x34);
        assert_eq!(l.timer_deadline(), None);
        assert_eq!(l.tsc_deadline(), 0);
    }

    #[test]
    fn apic_base_transitions_and_relocation() {
        let (_, mut l) = lapic(0, true);
        // Not in x2APIC mode: the MSRs #GP.
        assert_eq!(l.read_msr(0x802), None);
        assert!(!l.write_msr(0x808, 0));
        // Reserved bits 0-7, 9, and above MAXPHYADDR.
        assert!(!l.set_apic_base(0xFEE0_0900 | 1));
        assert!(!l.set_apic_base(0xFEE0_0900 | (1 << 9)));
        l.set_phys_addr_bits(40);
        assert!(!l.set_apic_base(0xFEE0_0900 | (1 << 45)));
        // Relocation.
        assert!(l.set_apic_base(0xFED0_0900));
        assert_eq!(l.mmio_base(), Some(0xFED0_0000));
        enable(&mut l);
        w(&mut l, reg::TPR, 0x20);
        // xAPIC -> x2APIC keeps the registers.
        assert!(l.set_apic_base(0xFED0_0D00));
        assert_eq!(l.mode(), ApicMode::X2Apic);
        assert_eq!(l.mmio_base(), None);
        assert_eq!(l.read_msr(0x808), Some(0x20));
        // The page is gone in x2APIC mode.
        assert_eq!(r(&mut l, reg::TPR), 0xFFFF_FFFF);
        // x2APIC -> xAPIC is illegal; EN=0 with EXTD=1 is invalid.
        assert!(!l.set_apic_base(0xFED0_0900));
        assert!(!l.set_apic_base(0xFED0_0500));
        assert_eq!(l.mode(), ApicMode::X2Apic);
        // x2APIC -> disabled resets the APIC.
        assert!(l.set_apic_base(0xFED0_0100));
        assert_eq!(l.mode(), ApicMode::Disabled);
        assert_eq!(l.mmio_base(), None);
        // Disabled -> x2APIC is illegal; disabled -> xAPIC is fine.
        assert!(!l.set_apic_base(0xFED0_0D00));
        assert!(l.set_apic_base(0xFEE0_0900));
        assert_eq!(r(&mut l, reg::TPR), 0);
        assert_eq!(r(&mut l, reg::SVR), 0xFF);
        assert!(l.is_bsp());
        // A disabled APIC takes no messages.
        assert!(l.set_apic_base(0xFEE0_0100));
        l.accept(&msg(DeliveryMode::Nmi, 0));
        assert!(!l.nmi_pending());
    }

    #[test]
    fn x2apic_msr_rules() {
        let (_, mut l) = lapic(0x23, false);
        to_x2apic(&mut l);
        assert!(l.write_msr(0x80F, 0x1FF));
        assert_eq!(l.read_msr(0x802), Some(0x23));
        assert!(!l.write_msr(0x802, 0x23), "ID is read-only");
        assert_eq!(l.read_msr(0x803), Some(u64::from(APIC_VERSION)));
        // LDR is derived from the ID and read-only.
        assert_eq!(l.read_msr(0x80D), Some((2 << 16) | (1 << 3)));
        assert!(!l.write_msr(0x80D, 0));
        // Registers that do not exist in x2APIC mode.
        for msr in [0x800, 0x809, 0x80C, 0x80E, 0x82F, 0x831, 0x83A] {
            assert_eq!(l.read_msr(msr), None, "{msr:#x}");
            assert!(!l.write_msr(msr, 0), "{msr:#x}");
        }
        // Write-only registers.
        assert_eq!(l.read_msr(0x80B), None);
        assert_eq!(l.read_msr(0x83F), None);
        assert!(!l.write_msr(0x80B, 1), "EOI takes only 0");
        assert!(l.write_msr(0x80B, 0));
        assert!(!l.write_msr(0x828, 1), "ESR takes only 0");
        assert!(l.write_msr(0x828, 0));
        // Reserved bits.
        assert!(!l.write_msr(0x808, 0x100));
        assert!(!l.write_msr(0x808, 1 << 32));
        assert!(l.write_msr(0x808, 0x10));
        assert!(!l.write_msr(0x80F, 0x1FF | (1 << 10)));
        assert!(!l.write_msr(0x832, 1 << 19));
        assert!(l.write_msr(0x832, 0x2_0040));
        assert!(!l.write_msr(0x837, 0x100));
        assert!(!l.write_msr(0x835, 1 << 11));
        assert!(l.write_msr(0x835, 0x1_A7FF));
        assert!(!l.write_msr(0x83E, 0x4));
        assert!(l.write_msr(0x83E, 0xB));
        assert!(!l.write_msr(0x83F, 0x100));
        assert!(!l.write_msr(0x839, 5), "current count is read-only");
        assert!(!l.write_msr(0x820, 0), "IRR is read-only");
        // ICR is one 64-bit register with a 32-bit destination.
        assert!(!l.write_msr(0x830, 1 << 13));
        assert!(!l.write_msr(0x830, 1 << 20));
        assert!(l.write_msr(0x830, (0x1234_5678 << 32) | 0x4051));
        assert_eq!(l.read_msr(0x830), Some((0x1234_5678 << 32) | 0x4051));
        let out = l.take_outputs();
        assert!(
            matches!(out[..], [LapicOutput::Ipi { msg, x2apic: true }] if msg.dest == 0x1234_5678 && msg.vector == 0x51 && msg.source == Some(0x23))
        );
    }

    #[test]
    fn x2apic_self_ipi_register() {
        let (_, mut l) = lapic(1, false);
        to_x2apic(&mut l);
        assert!(l.write_msr(0x80F, 0x1FF));
        assert!(l.write_msr(0x83F, 0x55));
        assert_eq!(l.read_msr(0x822).map(|w| w & (1 << 0x15)), Some(1 << 0x15));
        assert!(l.take_outputs().is_empty(), "handled locally");
        assert!(l.has_interrupt());
        assert_eq!(l.ack_interrupt(), Some(0x55));
        assert!(l.write_msr(0x83F, 0x0F));
        assert!(l.write_msr(0x828, 0));
        assert_eq!(l.read_msr(0x828), Some(u64::from(esr::SEND_ILLEGAL_VECTOR)));
    }

    #[test]
    fn destination_matching() {
        let (_, mut l) = lapic(3, false);
        w(&mut l, reg::LDR, 0x2400_0000);
        // Physical.
        assert!(l.matches_destination(3, DestMode::Physical, false));
        assert!(!l.matches_destination(4, DestMode::Physical, false));
        assert!(l.matches_destination(0xFF, DestMode::Physical, false));
        assert!(
            l.matches_destination(0x103, DestMode::Physical, false),
            "8-bit field"
        );
        // Logical flat: a bit mask.
        assert!(l.matches_destination(0x04, DestMode::Logical, false));
        assert!(l.matches_destination(0x21, DestMode::Logical, false));
        assert!(!l.matches_destination(0x0B, DestMode::Logical, false));
        // Logical cluster: cluster 2, member bit 2.
        w(&mut l, reg::DFR, 0x0FFF_FFFF);
        assert!(l.matches_destination(0x24, DestMode::Logical, false));
        assert!(l.matches_destination(0x2C, DestMode::Logical, false));
        assert!(!l.matches_destination(0x34, DestMode::Logical, false));
        assert!(!l.matches_destination(0x21, DestMode::Logical, false));
        assert!(l.matches_destination(0xFF, DestMode::Logical, false));
        // x2APIC: 32-bit IDs, derived cluster LDR.
        let (_, mut x) = lapic(0x35, false);
        to_x2apic(&mut x);
        assert!(x.matches_destination(0x35, DestMode::Physical, true));
        assert!(x.matches_destination(u32::MAX, DestMode::Physical, true));
        assert!(!x.matches_destination(0xFF, DestMode::Physical, true));
        assert!(
            x.matches_destination(0xFF, DestMode::Physical, false),
            "8-bit broadcast"
        );
        assert!(x.matches_destination((3 << 16) | (1 << 5), DestMode::Logical, true));
        assert!(!x.matches_destination((2 << 16) | (1 << 5), DestMode::Logical, true));
        assert!(!x.matches_destination((3 << 16) | (1 << 4), DestMode::Logical, true));
    }

    #[test]
    fn lint0_passes_the_pic_through() {
        // BSP at reset: virtual wire, the PIC's INT is an ExtINT.
        let (_, mut l) = lapic(0, true);
        assert!(!l.extint_pending());
        l.set_lint(0, true);
        assert!(l.extint_pending());
        assert!(!l.has_interrupt(), "ExtINT is not an IRR vector");
        assert!(l.take_extint());
        assert!(l.extint_pending(), "pending while the PIC holds INT high");
        l.set_lint(0, false);
        assert!(!l.extint_pending());
        // An AP at reset has LINT0 masked.
        let (_, mut ap) = lapic(1, false);
        ap.set_lint(0, true);
        assert!(!ap.extint_pending());
        // A globally disabled APIC passes INTR straight through.
        assert!(ap.set_apic_base(0xFEE0_0000));
        assert!(ap.extint_pending());
        // Masking LINT0 on the BSP stops it.
        enable(&mut l);
        w(&mut l, reg::LVT_LINT0, LVT_MASKED | 0x700);
        l.set_lint(0, true);
        assert!(!l.extint_pending());
        // An ExtINT message is pending until taken.
        l.accept(&msg(DeliveryMode::ExtInt, 0));
        assert!(l.extint_pending());
        assert!(l.take_extint());
        l.set_lint(0, false);
        assert!(!l.extint_pending());
    }

    #[test]
    fn lint0_fixed_level_uses_remote_irr() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        w(&mut l, reg::LVT_LINT0, 0x8000 | 0x3A);
        l.set_lint(0, true);
        assert!(irr_has(&mut l, 0x3A));
        assert_eq!(r(&mut l, reg::LVT_LINT0) & LVT_REMOTE_IRR, LVT_REMOTE_IRR);
        assert_eq!(l.ack_interrupt(), Some(0x3A));
        // Line still high: no second request until the EOI.
        l.set_lint(0, true);
        assert!(!irr_has(&mut l, 0x3A));
        w(&mut l, reg::EOI, 0);
        assert!(
            irr_has(&mut l, 0x3A),
            "re-delivered: the line is still high"
        );
        assert_eq!(l.take_outputs(), vec![LapicOutput::Eoi(0x3A)]);
        assert_eq!(l.ack_interrupt(), Some(0x3A));
        l.set_lint(0, false);
        w(&mut l, reg::EOI, 0);
        assert!(!irr_has(&mut l, 0x3A));
        assert_eq!(r(&mut l, reg::LVT_LINT0) & LVT_REMOTE_IRR, 0);
        // Edge-triggered fixed: one request per rising edge.
        w(&mut l, reg::LVT_LINT0, 0x3B);
        l.set_lint(0, true);
        assert_eq!(l.ack_interrupt(), Some(0x3B));
        l.set_lint(0, true);
        assert!(!irr_has(&mut l, 0x3B));
    }

    #[test]
    fn lint1_nmi() {
        let (_, mut l) = lapic(0, true);
        enable(&mut l);
        l.set_lint(1, true);
        assert!(!l.nmi_pending(), "LINT1 is masked at reset");
        assert!(!l.lint1_nmi_enabled());
        l.set_lint(1, false);
        w(&mut l, reg::LVT_LINT1, 0x400);
        assert!(l.lint1_nmi_enabled());
        l.set_lint(1, true);
        assert!(l.nmi_pending());
        assert!(l.take_nmi());
        assert!(!l.take_nmi());
        l.set_lint(1, true);
        assert!(!l.nmi_pending(), "NMI is edge triggered");
    }

    #[test]
    fn init_and_sipi() {
        let (_, mut l) = lapic(1, false);
        enable(&mut l);
        w(&mut l, reg::TPR, 0x40);
        // INIT level de-assert does nothing.
        l.accept(&ApicMessage {
            trigger: TriggerMode::Level,
            level: false,
            ..msg(DeliveryMode::Init, 0)
        });
        assert!(!l.init_pending());
        l.set_wait_for_sipi(false);
        l.accept(&msg(DeliveryMode::StartUp, 0x10));
        assert!(!l.sipi_pending(), "SIPI outside wait-for-SIPI is ignored");
        l.accept(&msg(DeliveryMode::Init, 0));
        assert!(l.init_pending());
        assert!(l.take_init());
        assert!(!l.init_pending());
        assert!(l.wait_for_sipi());
        assert_eq!(r(&mut l, reg::TPR), 0, "INIT resets the registers");
        assert_eq!(r(&mut l, reg::SVR), 0xFF);
        assert_eq!(l.apic_base(), 0xFEE0_0800, "but not the APIC base");
        l.accept(&msg(DeliveryMode::StartUp, 0x9A));
        assert_eq!(l.take_sipi(), Some(0x9A));
        assert!(!l.wait_for_sipi());
        l.accept(&msg(DeliveryMode::StartUp, 0x9B));
        assert_eq!(l.take_sipi(), None);
        l.accept(&msg(DeliveryMode::Smi, 0));
        assert!(l.take_smi());
    }

    #[test]
    fn save_restore_roundtrip_and_dump() {
        let (c, mut l) = lapic(2, false);
        enable(&mut l);
        w(&mut l, reg::LVT_TIMER, 0x2_0000 | 0xEC);
        w(&mut l, reg::TIMER_INITIAL, 5000);
        l.accept(&fixed(0x61, true));
        l.accept(&fixed(0x90, false));
        assert_eq!(l.ack_interrupt(), Some(0x90));
        c.advance(1234);
        let st = l.save_state();
        let mut m = Lapic::new(2, false, c.clone(), TSC_KHZ);
        assert_ne!(m.save_state(), st);
        m.restore_state(&st);
        assert_eq!(m.save_state(), st);
        assert_eq!(m.dump(), l.dump());
        assert_eq!(r(&mut m, reg::TIMER_CURRENT), r(&mut l, reg::TIMER_CURRENT));
        let d = l.dump();
        for needle in [
            "LVTT",
            "periodic",
            "0x61(level)",
            "ISR     0x90",
            "SPIV",
            "LVT0",
            "divide by 2",
        ] {
            assert!(d.contains(needle), "dump lacks {needle:?}:\n{d}");
        }
        // A corrupt state cannot put illegal vectors in the IRR.
        let mut bad = st.clone();
        bad.irr = [u32::MAX; 8];
        m.restore_state(&bad);
        assert_eq!(r(&mut m, reg::IRR) & 0xFFFF, 0);
    }
}
