//! ACPI power-management registers of the PIIX4 PM function as QEMU's `pc`
//! machine places them (PM base 0x600, 0x40 ports), and the PIIX3 reset
//! control register (port 0xCF9).
//!
//! Layout of the PM block (ACPI spec, "PM1 Event Grouping", "PM1 Control
//! Grouping", "Power Management Timer"):
//! - +0x00 PM1a_STS (16 bits, write 1 to clear): TMR_STS bit 0, GBL_STS 5,
//!   PWRBTN_STS 8, SLPBTN_STS 9, RTC_STS 10, WAK_STS 15;
//! - +0x02 PM1a_EN (16 bits): TMR_EN bit 0, GBL_EN 5, PWRBTN_EN 8, ...;
//! - +0x04 PM1a_CNT (16 bits): SCI_EN bit 0 (reads 1: the machine is always
//!   in ACPI mode, so the FADT's SMI_CMD must be 0), SLP_TYP bits 12:10,
//!   SLP_EN bit 13 (write-only);
//! - +0x08 PM_TMR (32 bits, read-only): a 3.579545 MHz counter of which the
//!   low 24 bits are significant (FADT flag TMR_VAL_EXT clear);
//! - +0x20 GPE0_BLK (4 bytes): GPE0_STS (16 bits, write 1 to clear) then
//!   GPE0_EN (16 bits). QEMU's piix4 puts GPE0 at 0xAFE0 instead; only the
//!   FADT says where it is, so the firmware's FADT must give 0x620.
//!
//! Any other offset reads as all ones (an unclaimed ISA port) and ignores
//! writes. Registers decode byte-wise: a byte access touches only its byte.
//!
//! Sleep (ACPI spec 4.8.3.2.1 and 7.4.2): a PM1_CNT write with SLP_EN and
//! the SLP_TYP of \_S5 powers off; with \_S3's (1 in QEMU's DSDT, and
//! Tandem's) it suspends the machine through
//! [`MachineControl::suspend`]. Other sleep types (S1, S4 / 2) are
//! ignored: the guest keeps running. While suspended, a rising RTC
//! interrupt ([`RtcInput`], IRQ 8 teed off the RTC) with RTC_EN set wakes the
//! machine: RTC_STS and WAK_STS are set (ACPI spec 4.8.3.1.1) and
//! [`MachineControl::request_wake`] asks the run loop to resume. RTC_STS is
//! set by every RTC interrupt, asleep or not (PIIX4 datasheet, PMSTS bit
//! 10: "set when the RTC generates an alarm (assertion of IRQ8)").
//!
//! The SCI (ISA IRQ 9, level) is asserted while
//! `(PM1_STS & PM1_EN & (TMR|GBL|PWRBTN|RTC)) != 0` or
//! `(GPE0_STS & GPE0_EN) != 0`, as in QEMU's `acpi_update_sci`.
//!
//! TMR_STS is set whenever bit 23 of the PM timer toggles (ACPI spec, "Power
//! Management Timer (PM_TMR)").
//! The device computes it from the clock when the status is read, and, so
//! the SCI rises on time while TMR_EN is set, `Mutex<AcpiPm>` implements
//! [`TimerDevice`] with the time of the next toggle as its deadline
//! (register `Arc<Mutex<AcpiPm>>` with the `TimerSet`).

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::clock::SharedClock;
use crate::control::{MachineControl, StopRequest};
use crate::irq::IrqLine;
use crate::timer::TimerDevice;

/// Base port of the PM register block (QEMU's piix4 `pm_io_base`).
pub const ACPI_PM_BASE: u64 = 0x600;
/// Ports the PM block decodes.
pub const ACPI_PM_PORTS: u64 = 0x40;
/// ISA IRQ of the SCI (the FADT's SCI_INT).
pub const SCI_IRQ: u8 = 9;
/// PM1a_EVT_BLK, PM1a_CNT_BLK, PM_TMR_BLK and GPE0_BLK as ports, for the
/// FADT.
pub const PM1A_EVT_PORT: u64 = ACPI_PM_BASE + PM1_STS;
pub const PM1A_CNT_PORT: u64 = ACPI_PM_BASE + PM1_CNT;
pub const PM_TMR_PORT: u64 = ACPI_PM_BASE + PM_TMR;
pub const GPE0_PORT: u64 = ACPI_PM_BASE + GPE0_STS;
/// GPE0_BLK_LEN for the FADT.
pub const GPE0_BLK_LEN: u8 = 4;
/// The PM timer's frequency in Hz (ACPI spec, "Power Management Timer").
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The SLP_TYP value of \_S5 in QEMU's piix4 DSDT.
pub const DEFAULT_S5_SLP_TYP: u8 = 0;
/// The SLP_TYP of \_S3 in QEMU's piix4 DSDT (and Tandem's).
pub const DEFAULT_S3_SLP_TYP: u8 = 1;
/// Port of the PIIX3 reset control register.
pub const RESET_CONTROL_PORT: u64 = 0xCF9;

// Register offsets in the block.
const PM1_STS: u64 = 0x00;
const PM1_EN: u64 = 0x02;
const PM1_CNT: u64 = 0x04;
const PM_TMR: u64 = 0x08;
const GPE0_STS: u64 = 0x20;
const GPE0_EN: u64 = 0x22;

// PM1_STS / PM1_EN bits.
pub const TMR_STS: u16 = 1 << 0;
pub const GBL_STS: u16 = 1 << 5;
pub const PWRBTN_STS: u16 = 1 << 8;
pub const SLPBTN_STS: u16 = 1 << 9;
pub const RTC_STS: u16 = 1 << 10;
pub const WAK_STS: u16 = 1 << 15;
/// The enables that raise the SCI (QEMU's ACPI_BITMASK_PM1_COMMON_ENABLED).
const PM1_SCI_ENABLES: u16 = TMR_STS | GBL_STS | PWRBTN_STS | RTC_STS;

// PM1_CNT bits.
pub const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
pub const SLP_EN: u16 = 1 << 13;

/// Bit of the PM timer whose toggling sets TMR_STS.
const TMR_TOGGLE: u64 = 1 << 23;
/// The PM timer's significant bits.
const TMR_MASK: u64 = (1 << 24) - 1;

const NS_PER_SEC: u128 = 1_000_000_000;

/// PM timer ticks at clock time `ns` (exact: floor(ns * f / 1e9)).
fn ticks_at(ns: u64) -> u64 {
    let t = u128::from(ns) * u128::from(PM_TIMER_HZ) / NS_PER_SEC;
    u64::try_from(t).unwrap_or(u64::MAX)
}

/// The first clock time at which the timer has reached `ticks`.
fn ns_of_tick(ticks: u64) -> u64 {
    let hz = u128::from(PM_TIMER_HZ);
    let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(hz);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The first tick after `ticks` at which bit 23 toggles.
fn next_toggle(ticks: u64) -> u64 {
    (ticks | (TMR_TOGGLE - 1)).saturating_add(1)
}

/// Everything the PM block holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiPmState {
    /// PM1a_STS, with TMR_STS as last latched.
    pub pm1_sts: u16,
    /// PM1a_EN.
    pub pm1_en: u16,
    /// PM1a_CNT as written (SLP_EN never stored; SCI_EN reads 1 anyway).
    pub pm1_cnt: u16,
    /// GPE0_STS.
    pub gpe0_sts: u16,
    /// GPE0_EN.
    pub gpe0_en: u16,
    /// Tick count at which TMR_STS is next set (a multiple of 2^23).
    pub tmr_overflow_tick: u64,
    /// Level of the SCI as last driven.
    pub sci_level: bool,
}

impl Default for AcpiPmState {
    fn default() -> Self {
        AcpiPmState {
            pm1_sts: 0,
            pm1_en: 0,
            pm1_cnt: SCI_EN,
            gpe0_sts: 0,
            gpe0_en: 0,
            tmr_overflow_tick: TMR_TOGGLE,
            sci_level: false,
        }
    }
}

/// The PIIX4 ACPI PM1a / PM timer / GPE0 registers.
pub struct AcpiPm {
    st: AcpiPmState,
    sci: Arc<dyn IrqLine>,
    clock: SharedClock,
    control: Arc<MachineControl>,
    s5_slp_typ: u8,
    s3_slp_typ: u8,
}

impl std::fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPm")
            .field("state", &self.st)
            .field("s5_slp_typ", &self.s5_slp_typ)
            .field("s3_slp_typ", &self.s3_slp_typ)
            .finish()
    }
}

impl AcpiPm {
    /// A PM block at reset driving the SCI on `sci`, timing the PM timer on
    /// `clock`, and asking `control` to power off when the guest enters the
    /// sleep state whose SLP_TYP is `s5_slp_typ` (the DSDT's \_S5 value,
    /// [`DEFAULT_S5_SLP_TYP`] for QEMU's; only bits 2:0 count).
    pub fn new(
        sci: Arc<dyn IrqLine>,
        clock: SharedClock,
        control: Arc<MachineControl>,
        s5_slp_typ: u8,
    ) -> Self {
        AcpiPm {
            st: AcpiPmState::default(),
            sci,
            clock,
            control,
            s5_slp_typ: s5_slp_typ & 0x7,
            s3_slp_typ: DEFAULT_S3_SLP_TYP,
        }
    }

    /// Sets the SLP_TYP that suspends to RAM (the DSDT's \_S3 value; only
    /// bits 2:0 count). [`DEFAULT_S3_SLP_TYP`] unless set.
    pub fn set_s3_slp_typ(&mut self, slp_typ: u8) {
        self.s3_slp_typ = slp_typ & 0x7;
    }

    /// The RTC raised its interrupt (a rising edge of IRQ 8): RTC_STS is
    /// set; a suspended machine with RTC_EN set wakes (WAK_STS).
    pub fn rtc_interrupt(&mut self) {
        self.st.pm1_sts |= RTC_STS;
        if self.st.pm1_en & RTC_STS != 0 && self.control.request_wake() {
            self.st.pm1_sts |= WAK_STS;
        }
        self.update_sci();
    }

    /// The PM block's part of a wake from S3, as QEMU's: the machine reset
    /// clears the registers (PM1_EN, PM1_CNT to SCI_EN, GPE0, the timer's
    /// TMR_STS latch), and the wake leaves WAK_STS and the wake reason
    /// (RTC_STS) in PM1_STS for the OS to read on resume. With the
    /// enables clear the SCI drops.
    pub fn wake_reset(&mut self) {
        let now = self.clock.now_ns();
        self.st.pm1_sts &= WAK_STS | RTC_STS;
        self.st.pm1_en = 0;
        self.st.pm1_cnt = SCI_EN;
        self.st.gpe0_sts = 0;
        self.st.gpe0_en = 0;
        self.st.tmr_overflow_tick = next_toggle(ticks_at(now));
        self.update_sci();
    }

    pub fn save_state(&self) -> AcpiPmState {
        self.st.clone()
    }

    /// Restores `state` and drives the SCI to its level.
    pub fn restore_state(&mut self, state: AcpiPmState) {
        self.st = state;
        self.st.pm1_cnt &= !SLP_EN;
        self.sci.set_level(self.st.sci_level);
    }

    /// The PM timer's 24-bit value now.
    pub fn timer_value(&self) -> u32 {
        (ticks_at(self.clock.now_ns()) & TMR_MASK) as u32
    }

    /// Level of the SCI.
    pub fn sci_level(&self) -> bool {
        self.st.sci_level
    }

    /// The host pressed the power button: PWRBTN_STS is set (an SCI if
    /// PWRBTN_EN is set; Linux then shuts down).
    pub fn press_power_button(&mut self) {
        self.st.pm1_sts |= PWRBTN_STS;
        self.update_sci();
    }

    /// Sets general-purpose event `bit` (0..15) of GPE0_STS.
    pub fn raise_gpe(&mut self, bit: u8) {
        if let Some(m) = 1u16.checked_shl(u32::from(bit)) {
            self.st.gpe0_sts |= m;
            self.update_sci();
        }
    }

    /// Sets TMR_STS if bit 23 toggled since it was last cleared.
    fn latch_timer(&mut self, now: u64) {
        if self.st.pm1_sts & TMR_STS == 0 && ticks_at(now) >= self.st.tmr_overflow_tick {
            self.st.pm1_sts |= TMR_STS;
        }
    }

    fn sci_wanted(&self) -> bool {
        self.st.pm1_sts & self.st.pm1_en & PM1_SCI_ENABLES != 0
            || self.st.gpe0_sts & self.st.gpe0_en != 0
    }

    fn update_sci(&mut self) {
        let level = self.sci_wanted();
        if level != self.st.sci_level {
            self.st.sci_level = level;
            self.sci.set_level(level);
        }
    }

    /// When the timer interrupt is next due, if it is armed.
    fn next_event(&self) -> Option<u64> {
        (self.st.pm1_en & TMR_STS != 0 && self.st.pm1_sts & TMR_STS == 0)
            .then(|| ns_of_tick(self.st.tmr_overflow_tick))
    }

    fn read_reg16(&self, reg: u64) -> u16 {
        match reg {
            PM1_STS => self.st.pm1_sts,
            PM1_EN => self.st.pm1_en,
            PM1_CNT => (self.st.pm1_cnt | SCI_EN) & !SLP_EN,
            GPE0_STS => self.st.gpe0_sts,
            GPE0_EN => self.st.gpe0_en,
            _ => 0xFFFF,
        }
    }

    /// A write of `value` to the bytes of 16-bit register `reg` selected by
    /// `mask`.
    fn write_reg16(&mut self, reg: u64, value: u16, mask: u16, now: u64) {
        let v = value & mask;
        match reg {
            PM1_STS => {
                // Clearing a latched TMR_STS re-arms it for the next toggle.
                if v & TMR_STS != 0 && self.st.pm1_sts & TMR_STS != 0 {
                    self.st.tmr_overflow_tick = next_toggle(ticks_at(now));
                }
                self.st.pm1_sts &= !v;
            }
            PM1_EN => self.st.pm1_en = (self.st.pm1_en & !mask) | v,
            PM1_CNT => {
                let cnt = (self.st.pm1_cnt & !mask) | v;
                self.st.pm1_cnt = cnt & !SLP_EN;
                if v & SLP_EN != 0 {
                    let slp_typ = ((cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT) as u8;
                    // S5 and S3 are modelled; other sleep types (S1, S4)
                    // are ignored: the guest keeps running.
                    if slp_typ == self.s5_slp_typ {
                        self.control.request(StopRequest::Poweroff);
                    } else if slp_typ == self.s3_slp_typ {
                        self.control.suspend();
                    }
                }
            }
            GPE0_STS => self.st.gpe0_sts &= !v,
            GPE0_EN => self.st.gpe0_en = (self.st.gpe0_en & !mask) | v,
            _ => {}
        }
    }
}

/// The 16-bit registers, by offset.
const REGS16: [u64; 5] = [PM1_STS, PM1_EN, PM1_CNT, GPE0_STS, GPE0_EN];

impl BusDevice for AcpiPm {
    fn name(&self) -> &'static str {
        "acpi-pm"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        self.latch_timer(now);
        let timer = (ticks_at(now) & TMR_MASK) as u32;
        for (i, d) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            *d = if (PM_TMR..PM_TMR + 4).contains(&off) {
                timer.to_le_bytes()[(off - PM_TMR) as usize]
            } else if let Some(&reg) = REGS16.iter().find(|&&r| off == r || off == r + 1) {
                self.read_reg16(reg).to_le_bytes()[(off - reg) as usize]
            } else {
                0xFF
            };
        }
        self.update_sci();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        self.latch_timer(now);
        for reg in REGS16 {
            let mut value = 0u16;
            let mut mask = 0u16;
            for (i, &b) in data.iter().enumerate() {
                let off = offset.saturating_add(i as u64);
                if off == reg || off == reg + 1 {
                    let shift = 8 * (off - reg);
                    value |= u16::from(b) << shift;
                    mask |= 0xFF << shift;
                }
            }
            if mask != 0 {
                self.write_reg16(reg, value, mask, now);
            }
        }
        self.update_sci();
    }

    fn dump(&self) -> String {
        let s = &self.st;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ACPI PM @{ACPI_PM_BASE:#x}: PM1_STS={:#06x} PM1_EN={:#06x} PM1_CNT={:#06x} (SCI_EN=1 SLP_TYP={})",
            s.pm1_sts,
            s.pm1_en,
            s.pm1_cnt | SCI_EN,
            (s.pm1_cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT
        );
        let _ = writeln!(
            out,
            "  PM_TMR={:#08x} next TMR_STS at tick {:#x}; GPE0_STS={:#06x} GPE0_EN={:#06x}; SCI (IRQ {SCI_IRQ}) {}; S5 SLP_TYP={} S3 SLP_TYP={} ({:?})",
            self.timer_value(),
            s.tmr_overflow_tick,
            s.gpe0_sts,
            s.gpe0_en,
            if s.sci_level { "asserted" } else { "deasserted" },
            self.s5_slp_typ,
            self.s3_slp_typ,
            self.control.sleep_state()
        );
        out
    }
}

impl TimerDevice for Mutex<AcpiPm> {
    fn deadline(&self) -> Option<u64> {
        self.lock().unwrap_or_else(|p| p.into_inner()).next_event()
    }

    fn fire(&self, now: u64) {
        let mut pm = self.lock().unwrap_or_else(|p| p.into_inner());
        pm.latch_timer(now);
        pm.update_sci();
    }
}

/// The PM block's RTC input: an [`IrqLine`] that the RTC's IRQ 8 is teed
/// into (see [`IrqTee`]); a rising edge is [`AcpiPm::rtc_interrupt`].
pub struct RtcInput {
    pm: std::sync::Weak<Mutex<AcpiPm>>,
    level: std::sync::atomic::AtomicBool,
}

impl RtcInput {
    pub fn new(pm: &Arc<Mutex<AcpiPm>>) -> Self {
        RtcInput {
            pm: Arc::downgrade(pm),
            level: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl IrqLine for RtcInput {
    fn set_level(&self, level: bool) {
        let was = self.level.swap(level, std::sync::atomic::Ordering::AcqRel);
        if level && !was {
            if let Some(pm) = self.pm.upgrade() {
                pm.lock().unwrap_or_else(|p| p.into_inner()).rtc_interrupt();
            }
        }
    }
}

/// One output driving two inputs (the RTC's IRQ 8 goes to the interrupt
/// controllers and to the PM block's RTC_STS).
pub struct IrqTee(pub Arc<dyn IrqLine>, pub Arc<dyn IrqLine>);

impl IrqLine for IrqTee {
    fn set_level(&self, level: bool) {
        self.0.set_level(level);
        self.1.set_level(level);
    }
}

/// Where the BIOS looks for the RSDP (ACPI spec 5.2.5.1: the 16-byte
/// boundaries of the BIOS read-only area).
const RSDP_SCAN: std::ops::Range<u64> = 0xE_0000..0x10_0000;

/// The FACS Firmware_Waking_Vector as SeaBIOS's `find_resume_vector` reads
/// it on an S3 resume: the RSDP found in `0xE0000..0x100000`, its RSDT, the
/// FADT ("FACP") there, the FADT's FIRMWARE_CTRL, and the 32-bit vector at
/// offset 12 of that "FACS". X_Firmware_Waking_Vector (ACPI 2.0) is not
/// used, as SeaBIOS does not. `None` when a table is missing or malformed,
/// or the vector is 0 (no OS waking vector: the wake is a reset).
pub fn find_firmware_waking_vector(mem: &crate::memory::GuestMemory) -> Option<u32> {
    let mut sig = [0u8; 8];
    let rsdp = RSDP_SCAN
        .step_by(16)
        .find(|&a| mem.read(a, &mut sig).is_ok() && &sig == b"RSD PTR ")?;
    let rsdt = u64::from(mem.read_u32(rsdp + 16).ok()?);
    let mut table_sig = [0u8; 4];
    mem.read(rsdt, &mut table_sig).ok()?;
    if &table_sig != b"RSDT" {
        return None;
    }
    let len = u64::from(mem.read_u32(rsdt + 4).ok()?);
    // 36-byte header, then 32-bit table addresses (bounded: at most 1024).
    let entries = len.saturating_sub(36) / 4;
    let fadt = (0..entries.min(1024)).find_map(|i| {
        let t = u64::from(mem.read_u32(rsdt + 36 + 4 * i).ok()?);
        let mut sig = [0u8; 4];
        mem.read(t, &mut sig).ok()?;
        (&sig == b"FACP").then_some(t)
    })?;
    let facs = u64::from(mem.read_u32(fadt + 36).ok()?);
    mem.read(facs, &mut table_sig).ok()?;
    if &table_sig != b"FACS" {
        return None;
    }
    mem.read_u32(facs + 12).ok().filter(|&v| v != 0)
}

/// What the reset control register holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResetControlState {
    /// SYS_RST (bit 1): the kind of reset the next RST_CPU asks for. The
    /// other bits are not stored (RST_CPU acts at once).
    pub rcr: u8,
}

/// PIIX3 Reset Control Register (82371FB/SB datasheet, "RC — Reset
/// Control Register (I/O)", port 0xCF9): writing RST_CPU (bit 2) resets the
/// machine; SYS_RST (bit 1) is kept and read back.
pub struct ResetControl {
    st: ResetControlState,
    control: Arc<MachineControl>,
}

/// SYS_RST: hard (system) reset rather than a soft CPU reset.
pub const RCR_SYS_RST: u8 = 1 << 1;
/// RST_CPU: start the reset.
pub const RCR_RST_CPU: u8 = 1 << 2;

impl std::fmt::Debug for ResetControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResetControl")
            .field("state", &self.st)
            .finish()
    }
}

impl ResetControl {
    /// A register that asks `control` for a reset.
    pub fn new(control: Arc<MachineControl>) -> Self {
        ResetControl {
            st: ResetControlState::default(),
            control,
        }
    }

    /// The register as a byte read returns it.
    pub fn read_byte(&self) -> u8 {
        self.st.rcr
    }

    /// A byte written to the register.
    pub fn write_byte(&mut self, value: u8) {
        if value & RCR_RST_CPU != 0 {
            self.control.request(StopRequest::Reset);
            return;
        }
        self.st.rcr = value & RCR_SYS_RST;
    }

    pub fn save_state(&self) -> ResetControlState {
        self.st.clone()
    }

    pub fn restore_state(&mut self, state: ResetControlState) {
        self.st.rcr = state.rcr & RCR_SYS_RST;
    }
}

impl BusDevice for ResetControl {
    fn name(&self) -> &'static str {
        "reset-control"
    }

    /// Only byte accesses decode (QEMU's register is one byte wide).
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 1 {
            data[0] = self.read_byte();
        } else {
            data.fill(0xFF);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([v], 0) = (data, offset) {
            self.write_byte(*v);
        }
    }

    fn dump(&self) -> String {
        format!(
            "reset control @{RESET_CONTROL_PORT:#x}: RCR={:#04x} (SYS_RST={})\n",
            self.st.rcr,
            u8::from(self.st.rcr & RCR_SYS_RST != 0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, VirtualClock};
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct RecLine {
        level: AtomicBool,
        changes: Mutex<Vec<bool>>,
    }
    impl IrqLine for RecLine {
        fn set_level(&self, level: bool) {
            self.level.store(level, Ordering::SeqCst);
            self.changes.lock().unwrap().push(level);
        }
    }

    const SEC: u64 = 1_000_000_000;

    struct Rig {
        pm: AcpiPm,
        clock: Arc<VirtualClock>,
        sci: Arc<RecLine>,
        control: Arc<MachineControl>,
    }

    fn rig() -> Rig {
        let clock = Arc::new(VirtualClock::new());
        let sci = Arc::new(RecLine::default());
        let control = Arc::new(MachineControl::new());
        let pm = AcpiPm::new(
            sci.clone(),
            clock.clone(),
            control.clone(),
            DEFAULT_S5_SLP_TYP,
        );
        Rig {
            pm,
            clock,
            sci,
            control,
        }
    }

    fn inw(pm: &mut AcpiPm, off: u64) -> u16 {
        let mut b = [0u8; 2];
        pm.read(off, &mut b);
        u16::from_le_bytes(b)
    }

    fn inl(pm: &mut AcpiPm, off: u64) -> u32 {
        let mut b = [0u8; 4];
        pm.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn outw(pm: &mut AcpiPm, off: u64, v: u16) {
        pm.write(off, &v.to_le_bytes());
    }

    #[test]
    fn pm_timer_runs_at_3_579545_mhz() {
        let mut r = rig();
        assert_eq!(inl(&mut r.pm, PM_TMR), 0);
        r.clock.advance(SEC);
        assert_eq!(inl(&mut r.pm, PM_TMR), 3_579_545);
        // Five seconds: 17897725 ticks, wrapped to 24 bits.
        r.clock.advance(4 * SEC);
        assert_eq!(inl(&mut r.pm, PM_TMR), (5 * 3_579_545u32) & 0x00FF_FFFF);
        // Exact integer arithmetic: 1 µs is 3.579545 ticks, floored.
        let r2 = rig();
        r2.clock.advance(1_000);
        assert_eq!(r2.pm.timer_value(), 3);
        // Byte reads give the bytes of the same value; writes are ignored.
        let mut r = rig();
        r.clock.advance(SEC);
        r.pm.write(PM_TMR, &[0, 0, 0, 0]);
        let mut b = [0u8; 1];
        r.pm.read(PM_TMR + 1, &mut b);
        assert_eq!(b[0], (3_579_545u32 >> 8) as u8);
        r.pm.read(PM_TMR + 3, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn sci_en_reads_one_and_slp_en_s5_powers_off() {
        let mut r = rig();
        assert_eq!(inw(&mut r.pm, PM1_CNT) & SCI_EN, SCI_EN);
        outw(&mut r.pm, PM1_CNT, 0);
        assert_eq!(inw(&mut r.pm, PM1_CNT), SCI_EN);
        // SLP_TYP = 2 (S4 in QEMU's DSDT) with SLP_EN: nothing.
        outw(&mut r.pm, PM1_CNT, (2 << 10) | SLP_EN);
        assert!(!r.control.stop_requested());
        assert!(!r.control.power_event());
        assert_eq!(inw(&mut r.pm, PM1_CNT), (2 << 10) | SCI_EN);
        // SLP_TYP = 0 (S5) with SLP_EN: power off. SLP_EN reads 0.
        outw(&mut r.pm, PM1_CNT, SLP_EN);
        assert_eq!(r.control.stop_request(), Some(StopRequest::Poweroff));
        assert_eq!(inw(&mut r.pm, PM1_CNT) & SLP_EN, 0);
    }

    #[test]
    fn slp_en_with_s3_type_suspends() {
        use crate::control::SleepState;
        let mut r = rig();
        // SLP_TYP alone does nothing.
        outw(&mut r.pm, PM1_CNT, 1 << 10);
        assert_eq!(r.control.sleep_state(), SleepState::Awake);
        // kvm-unit-tests' s3: outw(0x2400) = SLP_EN | SLP_TYP 1.
        outw(&mut r.pm, PM1_CNT, 0x2400);
        assert_eq!(r.control.sleep_state(), SleepState::Suspended);
        assert!(r.control.power_event());
        assert!(!r.control.stop_requested(), "S3 is not a stop");
        assert_eq!(inw(&mut r.pm, PM1_CNT), (1 << 10) | SCI_EN);
        assert!(r.pm.dump().contains("S3 SLP_TYP=1 (Suspended)"));
        // The wake resets PM1_CNT and PM1_EN, and keeps WAK_STS / RTC_STS.
        outw(&mut r.pm, PM1_EN, RTC_STS | TMR_STS);
        r.pm.rtc_interrupt();
        r.pm.press_power_button();
        assert_eq!(inw(&mut r.pm, PM1_STS), WAK_STS | RTC_STS | PWRBTN_STS);
        assert!(r.pm.sci_level());
        r.pm.wake_reset();
        assert_eq!(inw(&mut r.pm, PM1_CNT), SCI_EN);
        assert_eq!(inw(&mut r.pm, PM1_EN), 0);
        assert_eq!(inw(&mut r.pm, PM1_STS), WAK_STS | RTC_STS);
        assert!(!r.pm.sci_level());
        // The \_S3 value is a parameter.
        let mut q = rig();
        q.pm.set_s3_slp_typ(5);
        outw(&mut q.pm, PM1_CNT, 0x2400);
        assert_eq!(q.control.sleep_state(), SleepState::Awake);
        outw(&mut q.pm, PM1_CNT, (5 << 10) | SLP_EN);
        assert_eq!(q.control.sleep_state(), SleepState::Suspended);
    }

    #[test]
    fn rtc_interrupt_sets_rtc_sts_and_wakes_only_with_rtc_en() {
        use crate::control::SleepState;
        let r = rig();
        let control = r.control.clone();
        let sci = r.sci.clone();
        let pm = Arc::new(Mutex::new(r.pm));
        let rtc_line = RtcInput::new(&pm);
        // Awake: the RTC interrupt sets RTC_STS, no SCI (RTC_EN clear).
        rtc_line.set_level(true);
        rtc_line.set_level(false);
        {
            let mut g = pm.lock().unwrap();
            assert_eq!(inw(&mut g, PM1_STS), RTC_STS);
            outw(&mut g, PM1_STS, RTC_STS);
            assert_eq!(inw(&mut g, PM1_STS), 0);
            // Asleep without RTC_EN: no wake.
            outw(&mut g, PM1_CNT, 0x2400);
        }
        rtc_line.set_level(true);
        assert_eq!(control.sleep_state(), SleepState::Suspended);
        rtc_line.set_level(false);
        {
            let mut g = pm.lock().unwrap();
            assert_eq!(inw(&mut g, PM1_STS), RTC_STS);
            outw(&mut g, PM1_STS, RTC_STS);
            outw(&mut g, PM1_EN, RTC_STS);
        }
        assert!(!sci.level.load(Ordering::SeqCst));
        // A level that stays high is one edge.
        rtc_line.set_level(true);
        assert_eq!(control.sleep_state(), SleepState::WakePending);
        {
            let mut g = pm.lock().unwrap();
            assert_eq!(inw(&mut g, PM1_STS), WAK_STS | RTC_STS);
            outw(&mut g, PM1_STS, RTC_STS);
        }
        rtc_line.set_level(true);
        assert_eq!(pm.lock().unwrap().save_state().pm1_sts, WAK_STS);
        // RTC_STS with RTC_EN raised the SCI (ACPI's fixed RTC event).
        assert_eq!(*sci.changes.lock().unwrap(), vec![true, false]);
        // A tee drives both inputs.
        let other = Arc::new(RecLine::default());
        let tee = IrqTee(other.clone(), Arc::new(RtcInput::new(&pm)));
        tee.set_level(true);
        assert!(other.level.load(Ordering::SeqCst));
        assert_eq!(pm.lock().unwrap().save_state().pm1_sts, WAK_STS | RTC_STS);
    }

    #[test]
    fn waking_vector_found_through_rsdp_rsdt_fadt_facs() {
        let mem = crate::memory::GuestMemory::new(2 << 20).unwrap();
        assert_eq!(find_firmware_waking_vector(&mem), None);
        let (rsdp, rsdt, fadt, facs) = (0xF_E000u64, 0xF_9000u64, 0xF_8100u64, 0xF_8000u64);
        mem.write(rsdp, b"RSD PTR ").unwrap();
        mem.write_u32(rsdp + 16, rsdt as u32).unwrap();
        mem.write(rsdt, b"RSDT").unwrap();
        mem.write_u32(rsdt + 4, 36 + 8).unwrap();
        mem.write_u32(rsdt + 36, 0xF_A000).unwrap(); // an APIC table
        mem.write(0xF_A000, b"APIC").unwrap();
        mem.write_u32(rsdt + 40, fadt as u32).unwrap();
        mem.write(fadt, b"FACP").unwrap();
        mem.write_u32(fadt + 36, facs as u32).unwrap();
        // Not a FACS yet.
        assert_eq!(find_firmware_waking_vector(&mem), None);
        mem.write(facs, b"FACS").unwrap();
        // No vector set: none.
        assert_eq!(find_firmware_waking_vector(&mem), None);
        mem.write_u32(facs + 12, 0x1000).unwrap();
        assert_eq!(find_firmware_waking_vector(&mem), Some(0x1000));
        // A FIRMWARE_CTRL beyond RAM, or an absurd RSDT length: none, no panic.
        mem.write_u32(fadt + 36, 0xFFFF_FFF0).unwrap();
        assert_eq!(find_firmware_waking_vector(&mem), None);
        mem.write_u32(rsdt + 4, u32::MAX).unwrap();
        assert_eq!(find_firmware_waking_vector(&mem), None);
    }

    #[test]
    fn s5_value_is_a_parameter_and_byte_writes_work() {
        let clock = Arc::new(VirtualClock::new());
        let control = Arc::new(MachineControl::new());
        let mut pm = AcpiPm::new(Arc::new(RecLine::default()), clock, control.clone(), 5);
        outw(&mut pm, PM1_CNT, SLP_EN);
        assert!(!control.stop_requested());
        // Linux writes SLP_TYP first, then SLP_EN, as 16-bit writes; a
        // byte write of the high byte alone must work too.
        pm.write(PM1_CNT + 1, &[(((5u16 << 10) | SLP_EN) >> 8) as u8]);
        assert_eq!(control.stop_request(), Some(StopRequest::Poweroff));
    }

    #[test]
    fn tmr_sts_sets_on_bit23_toggle_and_clears_by_writing_one() {
        let mut r = rig();
        // 2^23 ticks is 2.3435 s.
        let toggle_ns = ns_of_tick(1 << 23);
        assert_eq!(ticks_at(toggle_ns), 1 << 23);
        assert_eq!(ticks_at(toggle_ns - 1), (1 << 23) - 1);
        r.clock.advance(toggle_ns - 1);
        assert_eq!(inw(&mut r.pm, PM1_STS) & TMR_STS, 0);
        r.clock.advance(1);
        assert_eq!(inw(&mut r.pm, PM1_STS) & TMR_STS, TMR_STS);
        // Writing 0 leaves it, writing 1 clears it until the next toggle.
        outw(&mut r.pm, PM1_STS, 0);
        assert_eq!(inw(&mut r.pm, PM1_STS) & TMR_STS, TMR_STS);
        outw(&mut r.pm, PM1_STS, TMR_STS);
        assert_eq!(inw(&mut r.pm, PM1_STS) & TMR_STS, 0);
        r.clock.advance_to(ns_of_tick(2 << 23) - 1);
        assert_eq!(inw(&mut r.pm, PM1_STS) & TMR_STS, 0);
        r.clock.advance(1);
        assert_eq!(inw(&mut r.pm, PM1_STS) & TMR_STS, TMR_STS);
        // No SCI: TMR_EN is clear.
        assert!(!r.sci.level.load(Ordering::SeqCst));
    }

    #[test]
    fn timer_device_raises_sci_when_tmr_en_set() {
        let r = rig();
        let clock = r.clock.clone();
        let sci = r.sci.clone();
        let pm = Arc::new(Mutex::new(r.pm));
        assert_eq!(pm.deadline(), None);
        {
            let mut g = pm.lock().unwrap();
            outw(&mut g, PM1_EN, TMR_STS);
            assert_eq!(inw(&mut g, PM1_EN), TMR_STS);
        }
        let due = ns_of_tick(1 << 23);
        assert_eq!(pm.deadline(), Some(due));
        clock.advance_to(due);
        pm.fire(due);
        assert!(sci.level.load(Ordering::SeqCst));
        assert_eq!(pm.deadline(), None);
        {
            let mut g = pm.lock().unwrap();
            assert!(g.sci_level());
            // The handler acknowledges: the SCI drops, the timer re-arms.
            outw(&mut g, PM1_STS, TMR_STS);
            assert!(!g.sci_level());
        }
        assert!(!sci.level.load(Ordering::SeqCst));
        assert_eq!(pm.deadline(), Some(ns_of_tick(2 << 23)));
        assert_eq!(*sci.changes.lock().unwrap(), vec![true, false]);
    }

    #[test]
    fn power_button_and_gpe_drive_sci() {
        let mut r = rig();
        r.pm.press_power_button();
        assert!(!r.pm.sci_level());
        assert_eq!(inw(&mut r.pm, PM1_STS), PWRBTN_STS);
        outw(&mut r.pm, PM1_EN, PWRBTN_STS);
        assert!(r.pm.sci_level());
        outw(&mut r.pm, PM1_STS, PWRBTN_STS);
        assert!(!r.pm.sci_level());
        // GPE0: status bit 3 with enable bit 3.
        r.pm.raise_gpe(3);
        r.pm.raise_gpe(200);
        let mut b = [0u8; 4];
        r.pm.read(GPE0_STS, &mut b);
        assert_eq!(b, [0x08, 0, 0, 0]);
        r.pm.write(GPE0_EN, &[0x08]);
        assert!(r.sci.level.load(Ordering::SeqCst));
        r.pm.write(GPE0_STS, &[0x08]);
        assert!(!r.sci.level.load(Ordering::SeqCst));
        assert_eq!(inw(&mut r.pm, GPE0_EN), 0x08);
        // WAK_STS is write-1-to-clear like the rest.
        r.pm.restore_state(AcpiPmState {
            pm1_sts: WAK_STS,
            ..AcpiPmState::default()
        });
        outw(&mut r.pm, PM1_STS, WAK_STS);
        assert_eq!(inw(&mut r.pm, PM1_STS), 0);
    }

    #[test]
    fn unclaimed_offsets_float_and_state_round_trips() {
        let mut r = rig();
        let mut b = [0u8; 2];
        r.pm.read(0x10, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
        r.pm.read(0x06, &mut b);
        assert_eq!(b, [0xFF, 0xFF]);
        outw(&mut r.pm, PM1_EN, 0x0121);
        r.clock.advance(3 * SEC);
        let saved = r.pm.save_state();
        let mut q = rig();
        q.pm.restore_state(saved.clone());
        assert_eq!(q.pm.save_state(), saved);
        let d = r.pm.dump();
        assert!(d.contains("PM1_EN=0x0121"), "{d}");
        assert!(d.contains("SCI (IRQ 9)"), "{d}");
    }

    #[test]
    fn reset_control_register() {
        let control = Arc::new(MachineControl::new());
        let mut rc = ResetControl::new(control.clone());
        let mut b = [0u8; 1];
        rc.write(0, &[0x02]);
        rc.read(0, &mut b);
        assert_eq!(b[0], 0x02);
        assert!(!control.stop_requested());
        // Wider accesses do not decode.
        rc.write(0, &[0x06, 0x06]);
        assert!(!control.stop_requested());
        rc.write(0, &[0x06]);
        assert_eq!(control.stop_request(), Some(StopRequest::Reset));
        // RST_CPU is not stored.
        assert_eq!(rc.save_state().rcr, 0x02);
        assert!(rc.dump().contains("SYS_RST=1"));
        let mut rc2 = ResetControl::new(Arc::new(MachineControl::new()));
        rc2.restore_state(ResetControlState { rcr: 0xFF });
        assert_eq!(rc2.read_byte(), 0x02);
    }

    #[test]
    fn fuzz_no_panic() {
        let mut r = rig();
        let pm_timer_only_24_bits = |v: u32| v <= 0x00FF_FFFF;
        let mut rc = ResetControl::new(r.control.clone());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 5) as usize;
            let off = (x >> 8) % 0x44;
            let bytes = (x >> 16).to_le_bytes();
            match (x >> 40) % 4 {
                0 => r.pm.write(off, &bytes[..len]),
                1 => {
                    let mut b = [0u8; 4];
                    r.pm.read(off, &mut b[..len]);
                }
                2 => r.clock.advance((x >> 20) % 100_000_000),
                _ => {
                    rc.write(off % 2, &bytes[..len.min(1)]);
                    let mut b = [0u8; 1];
                    rc.read(0, &mut b);
                    assert_eq!(b[0] & !RCR_SYS_RST, 0);
                }
            }
            assert!(pm_timer_only_24_bits(inl(&mut r.pm, PM_TMR)));
            assert_eq!(r.pm.sci_level(), r.pm.sci_wanted());
            assert_eq!(inw(&mut r.pm, PM1_CNT) & (SCI_EN | SLP_EN), SCI_EN);
            if x % 97 == 0 {
                r.pm.rtc_interrupt();
                assert_ne!(inw(&mut r.pm, PM1_STS) & RTC_STS, 0);
            }
            if x % 89 == 0 {
                r.pm.wake_reset();
                r.control.complete_wake();
            }
        }
        let _ = r.clock.now_ns();
    }
}
