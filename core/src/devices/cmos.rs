//! MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71
//! (data), ISA IRQ 8.
//!
//! Time comes from the machine's `SharedClock`. The chip's divider chain
//! (32.768 kHz time base) is modelled as a nanosecond count that runs with
//! the clock while register A selects the 32.768 kHz divider (DV = 010) and
//! is held otherwise. The calendar advances when the chain crosses a whole
//! second, unless register B's SET bit inhibits updates. The time and date
//! registers are rendered from that on every read, in BCD or binary
//! (register B bit 2) and 12- or 24-hour form (bit 1).
//!
//! Periodic, alarm and update-ended flags (register C) are computed from
//! the chain on every access; IRQ 8 follows IRQF. While an interrupt is
//! enabled, `Mutex<Cmos>` implements [`TimerDevice`] so the machine fires it
//! on time (register `Arc<Mutex<Cmos>>` with the `TimerSet`).
//!
//! The CMOS RAM also carries the memory size where SeaBIOS and QEMU keep it.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::clock::SharedClock;
use crate::irq::IrqLine;
use crate::timer::TimerDevice;

/// Base port (index register; data is at +1).
pub const CMOS_BASE: u64 = 0x70;
/// Ports decoded.
pub const CMOS_PORTS: u64 = 2;
/// ISA IRQ of the RTC.
pub const RTC_IRQ: u8 = 8;
/// Bytes of CMOS RAM, the clock registers included.
pub const CMOS_SIZE: usize = 128;

// Register indices.
const SECONDS: usize = 0x00;
const SECONDS_ALARM: usize = 0x01;
const MINUTES: usize = 0x02;
const MINUTES_ALARM: usize = 0x03;
const HOURS: usize = 0x04;
const HOURS_ALARM: usize = 0x05;
const DAY_OF_WEEK: usize = 0x06;
const DAY_OF_MONTH: usize = 0x07;
const MONTH: usize = 0x08;
const YEAR: usize = 0x09;
const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
/// Century, where QEMU and the ACPI FADT's CENTURY field put it.
const CENTURY: usize = 0x32;

/// Registers the update cycle writes.
const TIME_REGS: [usize; 8] = [
    SECONDS,
    MINUTES,
    HOURS,
    DAY_OF_WEEK,
    DAY_OF_MONTH,
    MONTH,
    YEAR,
    CENTURY,
];

const REG_A_UIP: u8 = 0x80;
const REG_A_DV: u8 = 0x70;
/// DV = 010: 32.768 kHz time base, the divider runs.
const REG_A_DV_32K: u8 = 0x20;
const REG_A_RS: u8 = 0x0F;

const REG_B_SET: u8 = 0x80;
const REG_B_PIE: u8 = 0x40;
const REG_B_AIE: u8 = 0x20;
const REG_B_UIE: u8 = 0x10;
const REG_B_SQWE: u8 = 0x08;
const REG_B_DM_BINARY: u8 = 0x04;
const REG_B_24H: u8 = 0x02;

const REG_C_IRQF: u8 = 0x80;
const REG_C_PF: u8 = 0x40;
const REG_C_AF: u8 = 0x20;
const REG_C_UF: u8 = 0x10;

const REG_D_VRT: u8 = 0x80;

/// An alarm byte with both top bits set matches any value.
const ALARM_DONT_CARE: u8 = 0xC0;

const NS_PER_SEC: i128 = 1_000_000_000;
const TIME_BASE_HZ: i128 = 32_768;
/// UIP rises this long before an update (MC146818 datasheet, "Update
/// Cycle": tBUC = 244 us).
const UIP_LEAD_NS: i128 = 244_000;
/// After the divider leaves reset, the first update is half a second later.
const RESET_RELEASE_PHASE_NS: i128 = 500_000_000;
const SECS_PER_DAY: i64 = 86_400;

/// Where QEMU's `pc` machine splits RAM around the PCI hole: with 3.5 GiB
/// or more, 3 GiB below 4 GiB and the rest above; otherwise all below.
/// Returns (below 4 GiB, above 4 GiB).
pub fn pc_ram_split(ram_size: u64) -> (u64, u64) {
    if ram_size >= 0xE000_0000 {
        (0xC000_0000, ram_size - 0xC000_0000)
    } else {
        (ram_size, 0)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date. Counts years in
/// 400-year eras of 146097 days, with the year starting on March 1 so the
/// leap day is last.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let month = i64::from(month.clamp(1, 12));
    let day = i64::from(day);
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let march_month = (month + 9) % 12;
    let day_of_year = (153 * march_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719468 days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

/// The date (year, month 1-12, day 1-31) of a day count since 1970-01-01;
/// the inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalendarTime {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    pub day_of_week: u32,
}

impl CalendarTime {
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let sod = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        CalendarTime {
            year,
            month,
            day,
            hour: (sod / 3600) as u32,
            minute: (sod / 60 % 60) as u32,
            second: (sod % 60) as u32,
            // 1970-01-01 was a Thursday (5).
            day_of_week: ((days + 4).rem_euclid(7) + 1) as u32,
        }
    }

    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * SECS_PER_DAY
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

/// Everything the RTC holds, saved and restored as is. The chain offset is
/// relative to the machine's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CmosState {
    /// Index register bits 6:0.
    pub index: u8,
    /// Index register bit 7: NMI disabled (the chipset's NMI gate).
    pub nmi_disabled: bool,
    /// CMOS RAM; 0x00-0x0D are the clock registers (register C holds the
    /// interrupt flags).
    pub ram: [u8; CMOS_SIZE],
    /// Divider chain time = clock time + this, while the divider runs.
    pub chain_offset_ns: i128,
    /// The divider chain time while the divider is held.
    pub chain_held_ns: Option<i128>,
    /// Unix seconds = whole seconds of the chain + this, while the calendar
    /// runs.
    pub seconds_offset: i64,
    /// Chain time up to which periodic, update and alarm events are counted.
    pub last_chain_ns: i128,
    /// Level of IRQ 8 as last driven.
    pub irq_level: bool,
}

/// The MC146818 RTC with its CMOS RAM.
pub struct Cmos {
    st: CmosState,
    irq: Arc<dyn IrqLine>,
    clock: SharedClock,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos").field("state", &self.st).finish()
    }
}

fn ticks(chain_ns: i128) -> i128 {
    (chain_ns * TIME_BASE_HZ).div_euclid(NS_PER_SEC)
}

impl Cmos {
    /// An RTC showing `start_unix` (UTC seconds) now and advancing with
    /// `clock`, in the state a BIOS leaves it (register A 0x26: 32.768 kHz,
    /// 1024 Hz periodic rate; B 0x02: 24-hour BCD, no interrupts), with the
    /// memory size of `ram_size` bytes of RAM split as [`pc_ram_split`]
    /// does.
    pub fn new(irq: Arc<dyn IrqLine>, clock: SharedClock, start_unix: i64, ram_size: u64) -> Self {
        let now = i128::from(clock.now_ns());
        let mut ram = [0u8; CMOS_SIZE];
        ram[REG_A] = REG_A_DV_32K | 0x06;
        ram[REG_B] = REG_B_24H;
        ram[REG_D] = REG_D_VRT;
        let mut c = Cmos {
            st: CmosState {
                index: 0,
                nmi_disabled: false,
                ram,
                chain_offset_ns: -now,
                chain_held_ns: None,
                seconds_offset: start_unix,
                last_chain_ns: 0,
                irq_level: false,
            },
            irq,
            clock,
        };
        let (below, above) = pc_ram_split(ram_size);
        c.set_memory_size(below, above);
        c.render_time(start_unix);
        c
    }

    /// Writes the memory size bytes as QEMU's `pc_cmos_init` does, which
    /// SeaBIOS and old kernels read: 0x15/0x16 base memory in KiB (at most
    /// 640), 0x17/0x18 and 0x30/0x31 extended memory above 1 MiB in KiB (at
    /// most 65535), 0x34/0x35 memory between 16 MiB and 4 GiB in 64 KiB
    /// units, 0x5B-0x5D memory above 4 GiB in 64 KiB units.
    pub fn set_memory_size(&mut self, below_4g: u64, above_4g: u64) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        let base = (below_4g / KIB).min(640);
        let ext = (below_4g.saturating_sub(MIB) / KIB).min(0xFFFF);
        let above_16m = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xFFFF);
        let high = (above_4g / (64 * KIB)).min(0xFF_FFFF);
        let ram = &mut self.st.ram;
        ram[0x15] = base as u8;
        ram[0x16] = (base >> 8) as u8;
        ram[0x17] = ext as u8;
        ram[0x18] = (ext >> 8) as u8;
        ram[0x30] = ext as u8;
        ram[0x31] = (ext >> 8) as u8;
        ram[0x34] = above_16m as u8;
        ram[0x35] = (above_16m >> 8) as u8;
        ram[0x5B] = high as u8;
        ram[0x5C] = (high >> 8) as u8;
        ram[0x5D] = (high >> 16) as u8;
    }

    /// A CMOS RAM byte, as firmware setup reads it (no side effects).
    pub fn ram(&self, index: u8) -> u8 {
        self.st.ram[usize::from(index & 0x7F)]
    }

    /// Sets a CMOS RAM byte for firmware setup (e.g. 0x5F, the CPU count
    /// minus one, as QEMU stores it). Not for the clock registers.
    pub fn set_ram(&mut self, index: u8, value: u8) {
        let i = usize::from(index & 0x7F);
        if i > REG_D && i != CENTURY {
            self.st.ram[i] = value;
        }
    }

    /// Whether the guest disabled NMIs through bit 7 of port 0x70.
    pub fn nmi_disabled(&self) -> bool {
        self.st.nmi_disabled
    }

    /// Level of IRQ 8.
    pub fn irq_level(&self) -> bool {
        self.st.irq_level
    }

    /// The time the clock shows now, as Unix seconds (what the registers
    /// hold while updates are inhibited).
    pub fn unix_time(&self) -> i64 {
        if self.calendar_running() {
            self.running_unix(self.clock.now_ns())
        } else {
            self.registers_unix()
        }
    }

    pub fn save_state(&self) -> CmosState {
        self.st.clone()
    }

    /// What a system reset does to the RTC, as QEMU's `rtc_reset_enter`
    /// (the `pc` machine's wake from S3 is such a reset): the time, the
    /// alarm and the CMOS RAM are kept; register B loses PIE, AIE and SQWE,
    /// register C its flags, and IRQ 8 drops (the MC146818 datasheet's
    /// RESET pin clears the same enables and flags, and UIE too).
    pub fn system_reset(&mut self) {
        let now = self.clock.now_ns();
        // Count what happened up to now first, so that it is cleared too.
        self.catch_up(now);
        self.st.ram[REG_B] &= !(REG_B_PIE | REG_B_AIE | REG_B_SQWE);
        self.st.ram[REG_C] &= !(REG_C_IRQF | REG_C_PF | REG_C_AF | REG_C_UF);
        self.update_irq();
    }

    /// Restores `state` and drives IRQ 8 to the restored level.
    pub fn restore_state(&mut self, state: CmosState) {
        let now = self.clock.now_ns();
        self.st = state;
        self.st.index &= 0x7F;
        // Keep "held" consistent with register A's divider bits.
        if self.divider_running() {
            if let Some(held) = self.st.chain_held_ns.take() {
                self.st.chain_offset_ns = held - i128::from(now);
            }
        } else if self.st.chain_held_ns.is_none() {
            self.st.chain_held_ns = Some(self.chain_ns(now));
        }
        let level = self.irqf();
        self.set_irqf(level);
        self.st.irq_level = level;
        self.irq.set_level(level);
    }

    fn divider_running(&self) -> bool {
        self.st.ram[REG_A] & REG_A_DV == REG_A_DV_32K
    }

    fn calendar_running(&self) -> bool {
        self.divider_running() && self.st.ram[REG_B] & REG_B_SET == 0
    }

    fn chain_ns(&self, now: u64) -> i128 {
        self.st
            .chain_held_ns
            .unwrap_or_else(|| i128::from(now) + self.st.chain_offset_ns)
    }

    fn running_unix(&self, now: u64) -> i64 {
        let secs = self.chain_ns(now).div_euclid(NS_PER_SEC);
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        secs.saturating_add(self.st.seconds_offset)
    }

    /// Periodic interrupt period in 32.768 kHz ticks (register A RS bits;
    /// MC146818 Table 5): RS 1 and 2 give 256 and 128 Hz, RS n >= 3 gives
    /// 65536 >> n Hz.
    fn periodic_ticks(&self) -> Option<i128> {
        match self.st.ram[REG_A] & REG_A_RS {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            rs => Some(1 << (rs - 1)),
        }
    }

    fn binary(&self) -> bool {
        self.st.ram[REG_B] & REG_B_DM_BINARY != 0
    }

    fn encode_reg(&self, v: u32) -> u8 {
        let v = (v % 100) as u8;
        if self.binary() {
            v
        } else {
            ((v / 10) << 4) | (v % 10)
        }
    }

    fn decode_reg(&self, r: u8) -> u32 {
        if self.binary() {
            u32::from(r)
        } else {
            u32::from(r >> 4) * 10 + u32::from(r & 0x0F)
        }
    }

    fn hour_to_reg(&self, hour: u32) -> u8 {
        if self.st.ram[REG_B] & REG_B_24H != 0 {
            self.encode_reg(hour)
        } else {
            let h12 = match hour % 12 {
                0 => 12,
                h => h,
            };
            let pm = if hour >= 12 { 0x80 } else { 0 };
            self.encode_reg(h12) | pm
        }
    }

    fn hour_from_reg(&self, r: u8) -> u32 {
        if self.st.ram[REG_B] & REG_B_24H != 0 {
            self.decode_reg(r)
        } else {
            let pm = if r & 0x80 != 0 { 12 } else { 0 };
            self.decode_reg(r & 0x7F) % 12 + pm
        }
    }

    /// Writes `unix` into the time and date registers in the current mode.
    fn render_time(&mut self, unix: i64) {
        let t = CalendarTime::from_unix(unix);
        let year = t.year.clamp(0, 9999) as u32;
        let vals = [
            (SECONDS, self.encode_reg(t.second)),
            (MINUTES, self.encode_reg(t.minute)),
            (HOURS, self.hour_to_reg(t.hour)),
            (DAY_OF_WEEK, self.encode_reg(t.day_of_week)),
            (DAY_OF_MONTH, self.encode_reg(t.day)),
            (MONTH, self.encode_reg(t.month)),
            (YEAR, self.encode_reg(year % 100)),
            (CENTURY, self.encode_reg(year / 100)),
        ];
        for (i, v) in vals {
            self.st.ram[i] = v;
        }
    }

    /// The time the registers hold. Values out of range (a guest may write
    /// anything) are clamped; the day of week is not used.
    fn registers_unix(&self) -> i64 {
        let r = &self.st.ram;
        let year =
            i64::from(self.decode_reg(r[CENTURY])) * 100 + i64::from(self.decode_reg(r[YEAR]));
        CalendarTime {
            year,
            month: self.decode_reg(r[MONTH]).clamp(1, 12),
            day: self.decode_reg(r[DAY_OF_MONTH]).clamp(1, 31),
            hour: self.hour_from_reg(r[HOURS]).min(23),
            minute: self.decode_reg(r[MINUTES]).min(59),
            second: self.decode_reg(r[SECONDS]).min(59),
            day_of_week: 1,
        }
        .to_unix()
    }

    /// Takes the registers as the current time, keeping the divider
    /// chain's phase: the next update comes when the chain next crosses a
    /// second.
    fn set_time_from_registers(&mut self, now: u64) {
        let chain_secs = self.chain_ns(now).div_euclid(NS_PER_SEC);
        let chain_secs = i64::try_from(chain_secs).unwrap_or(i64::MAX);
        self.st.seconds_offset = self.registers_unix().saturating_sub(chain_secs);
    }

    fn alarm_matches(&self, unix: i64) -> bool {
        let t = CalendarTime::from_unix(unix);
        let r = &self.st.ram;
        let hit = |alarm: u8, now: u8| alarm & ALARM_DONT_CARE == ALARM_DONT_CARE || alarm == now;
        hit(r[SECONDS_ALARM], self.encode_reg(t.second))
            && hit(r[MINUTES_ALARM], self.encode_reg(t.minute))
            && hit(r[HOURS_ALARM], self.hour_to_reg(t.hour))
    }

    /// Counts the periodic, update-ended and alarm events between the last
    /// catch-up and `now` into register C.
    fn catch_up(&mut self, now: u64) {
        let c = self.chain_ns(now);
        let last = self.st.last_chain_ns;
        self.st.last_chain_ns = c;
        if c <= last || !self.divider_running() {
            return;
        }
        let mut flags = self.st.ram[REG_C];
        if let Some(p) = self.periodic_ticks() {
            if ticks(c).div_euclid(p) > ticks(last).div_euclid(p) {
                flags |= REG_C_PF;
            }
        }
        if self.calendar_running() {
            let s_last = last.div_euclid(NS_PER_SEC);
            let s_now = c.div_euclid(NS_PER_SEC);
            if s_now > s_last {
                flags |= REG_C_UF;
                if flags & REG_C_AF == 0 {
                    // The alarm matches h:m:s, so one day of updates covers
                    // every possible match.
                    let first = (s_last + 1).max(s_now - i128::from(SECS_PER_DAY) + 1);
                    let base = self.st.seconds_offset;
                    let matched = (first..=s_now).any(|s| {
                        let s = i64::try_from(s).unwrap_or(i64::MAX);
                        self.alarm_matches(s.saturating_add(base))
                    });
                    if matched {
                        flags |= REG_C_AF;
                    }
                }
            }
        }
        self.st.ram[REG_C] = flags;
    }

    /// IRQF = PF·PIE + AF·AIE + UF·UIE (datasheet, register C bit 7).
    fn irqf(&self) -> bool {
        let b = self.st.ram[REG_B];
        let c = self.st.ram[REG_C];
        (c & REG_C_PF != 0 && b & REG_B_PIE != 0)
            || (c & REG_C_AF != 0 && b & REG_B_AIE != 0)
            || (c & REG_C_UF != 0 && b & REG_B_UIE != 0)
    }

    fn set_irqf(&mut self, on: bool) {
        if on {
            self.st.ram[REG_C] |= REG_C_IRQF;
        } else {
            self.st.ram[REG_C] &= !REG_C_IRQF;
        }
    }

    fn update_irq(&mut self) {
        let level = self.irqf();
        self.set_irqf(level);
        if level != self.st.irq_level {
            self.st.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// Clock time of the first event after the last catch-up that can
    /// raise an enabled interrupt. It stays put until a catch-up passes it,
    /// so a late `fire` still sees it due.
    fn next_event(&self) -> Option<u64> {
        if self.st.irq_level || !self.divider_running() {
            return None;
        }
        let b = self.st.ram[REG_B];
        let c = self.st.last_chain_ns;
        let mut next: Option<i128> = None;
        if b & REG_B_PIE != 0 {
            if let Some(p) = self.periodic_ticks() {
                let tick = (ticks(c).div_euclid(p) + 1) * p;
                // Round up so the chain has crossed the tick at that time.
                let ns = (tick * NS_PER_SEC + TIME_BASE_HZ - 1).div_euclid(TIME_BASE_HZ);
                next = Some(ns);
            }
        }
        if b & (REG_B_UIE | REG_B_AIE) != 0 && self.calendar_running() {
            let ns = (c.div_euclid(NS_PER_SEC) + 1) * NS_PER_SEC;
            next = Some(next.map_or(ns, |n| n.min(ns)));
        }
        next.map(|chain| {
            let t = (chain - self.st.chain_offset_ns).max(0);
            u64::try_from(t).unwrap_or(u64::MAX)
        })
    }

    fn write_reg_a(&mut self, value: u8, now: u64) {
        let was_running = self.divider_running();
        let was_reset = self.st.ram[REG_A] & 0x60 == 0x60;
        let calendar_was_running = self.calendar_running();
        if calendar_was_running {
            self.render_time(self.running_unix(now));
        }
        let chain = self.chain_ns(now);
        self.st.ram[REG_A] = value & !REG_A_UIP;
        let running = self.divider_running();
        if was_running && !running {
            self.st.chain_held_ns = Some(chain);
        } else if !was_running && running {
            let resume = if was_reset {
                // Leaving reset: the first update is 500 ms later.
                RESET_RELEASE_PHASE_NS
            } else {
                chain
            };
            self.st.chain_held_ns = None;
            self.st.chain_offset_ns = resume - i128::from(now);
            self.st.last_chain_ns = resume;
            if self.calendar_running() {
                self.set_time_from_registers(now);
            }
        }
    }

    fn write_reg_b(&mut self, value: u8, now: u64) {
        let mut value = value;
        let calendar_was_running = self.calendar_running();
        if value & REG_B_SET != 0 {
            if calendar_was_running {
                // Freeze the time in the registers.
                self.render_time(self.running_unix(now));
            }
            // Setting SET clears UIE (datasheet, register B bit 4).
            value &= !REG_B_UIE;
        }
        self.st.ram[REG_B] = value;
        if !calendar_was_running && self.calendar_running() {
            self.set_time_from_registers(now);
        }
    }

    fn read_data(&mut self, now: u64) -> u8 {
        let i = usize::from(self.st.index);
        match i {
            REG_A => {
                let phase = self.chain_ns(now).rem_euclid(NS_PER_SEC);
                let uip = self.calendar_running() && phase >= NS_PER_SEC - UIP_LEAD_NS;
                self.st.ram[REG_A] | if uip { REG_A_UIP } else { 0 }
            }
            REG_C => {
                let v = self.st.ram[REG_C];
                self.st.ram[REG_C] = 0;
                v
            }
            REG_D => REG_D_VRT,
            _ if TIME_REGS.contains(&i) => {
                if self.calendar_running() {
                    self.render_time(self.running_unix(now));
                }
                self.st.ram[i]
            }
            _ => self.st.ram.get(i).copied().unwrap_or(0xFF),
        }
    }

    fn write_data(&mut self, value: u8, now: u64) {
        let i = usize::from(self.st.index);
        match i {
            REG_A => self.write_reg_a(value, now),
            REG_B => self.write_reg_b(value, now),
            // Register C and D are read-only.
            REG_C | REG_D => {}
            _ if TIME_REGS.contains(&i) => {
                if self.calendar_running() {
                    // A write while the clock runs sets the time at once
                    // (as QEMU does); the other fields are taken as they
                    // read now.
                    self.render_time(self.running_unix(now));
                    self.st.ram[i] = value;
                    self.set_time_from_registers(now);
                } else {
                    self.st.ram[i] = value;
                }
            }
            _ => {
                if let Some(b) = self.st.ram.get_mut(i) {
                    *b = value;
                }
            }
        }
    }
}

impl BusDevice for Cmos {
    fn name(&self) -> &'static str {
        "rtc"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        self.catch_up(now);
        self.update_irq();
        for (i, d) in data.iter_mut().enumerate() {
            *d = match offset.saturating_add(i as u64) {
                // The index register is write-only.
                0 => 0xFF,
                1 => self.read_data(now),
                _ => 0xFF,
            };
        }
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        self.catch_up(now);
        for (i, &v) in data.iter().enumerate() {
            match offset.saturating_add(i as u64) {
                0 => {
                    self.st.index = v & 0x7F;
                    self.st.nmi_disabled = v & 0x80 != 0;
                }
                1 => self.write_data(v, now),
                _ => {}
            }
        }
        self.update_irq();
    }

    fn dump(&self) -> String {
        let now = self.clock.now_ns();
        let r = &self.st.ram;
        let t = CalendarTime::from_unix(self.unix_time());
        let mode = if self.calendar_running() {
            "running"
        } else if self.divider_running() {
            "SET"
        } else {
            "divider held"
        };
        let periodic = self
            .periodic_ticks()
            .map_or_else(|| "off".to_string(), |p| format!("{} Hz", TIME_BASE_HZ / p));
        let mut out = String::new();
        let _ = writeln!(
            out,
            "MC146818: index={:02x} NMI={} A={:02x} B={:02x} C={:02x} D={:02x} irq={}",
            self.st.index,
            if self.st.nmi_disabled {
                "disabled"
            } else {
                "enabled"
            },
            r[REG_A],
            r[REG_B],
            r[REG_C],
            REG_D_VRT,
            u8::from(self.st.irq_level)
        );
        let _ = writeln!(
            out,
            "  {:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC ({mode}) {} {} periodic={periodic} chain={} ns",
            t.year,
            t.month,
            t.day,
            t.hour,
            t.minute,
            t.second,
            if self.binary() { "binary" } else { "BCD" },
            if r[REG_B] & REG_B_24H != 0 {
                "24h"
            } else {
                "12h"
            },
            self.chain_ns(now)
        );
        for (row, chunk) in r.chunks(16).enumerate() {
            let _ = write!(out, "  {:02x}:", row * 16);
            for b in chunk {
                let _ = write!(out, " {b:02x}");
            }
            out.push('\n');
        }
        out
    }
}

/// Periodic, alarm and update-ended interrupts, fired by the machine's
/// `TimerSet`.
impl TimerDevice for Mutex<Cmos> {
    fn deadline(&self) -> Option<u64> {
        let c = self.lock().unwrap_or_else(|p| p.into_inner());
        c.next_event()
    }

    fn fire(&self, now: u64) {
        let mut c = self.lock().unwrap_or_else(|p| p.into_inner());
        c.catch_up(now);
        c.update_irq();
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
    /// 2026-11-22 03:04:05 UTC, a Sunday.
    const START: i64 = 1_795_316_645;

    struct Rig {
        rtc: Cmos,
        line: Arc<RecLine>,
        clock: Arc<VirtualClock>,
    }

    fn rig_at(start: i64) -> Rig {
        let line = Arc::new(RecLine::default());
        let clock = Arc::new(VirtualClock::new());
        let rtc = Cmos::new(line.clone(), clock.clone(), start, 128 << 20);
        Rig { rtc, line, clock }
    }

    impl Rig {
        fn rd(&mut self, index: usize) -> u8 {
            self.rtc.write(0, &[index as u8]);
            let mut b = [0u8];
            self.rtc.read(1, &mut b);
            b[0]
        }
        fn wr(&mut self, index: usize, v: u8) {
            self.rtc.write(0, &[index as u8]);
            self.rtc.write(1, &[v]);
        }
        fn time(&mut self) -> [u8; 8] {
            TIME_REGS.map(|i| self.rd(i))
        }
        fn level(&self) -> bool {
            self.line.level.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn known_start_time_in_bcd_24h() {
        let mut r = rig_at(START);
        // sec, min, hour, dow, day, month, year, century
        assert_eq!(r.time(), [0x05, 0x04, 0x03, 0x01, 0x22, 0x11, 0x26, 0x20]);
        assert_eq!(r.rd(REG_A), 0x26);
        assert_eq!(r.rd(REG_B), 0x02);
        assert_eq!(r.rd(REG_D), 0x80);
    }

    #[test]
    fn binary_mode() {
        let mut r = rig_at(START);
        r.wr(REG_B, REG_B_24H | REG_B_DM_BINARY);
        assert_eq!(r.time(), [5, 4, 3, 1, 22, 11, 26, 20]);
    }

    #[test]
    fn twelve_hour_mode() {
        for (h, bcd) in [
            (0, 0x12u8),
            (3, 0x03),
            (11, 0x11),
            (12, 0x92),
            (15, 0x83),
            (23, 0x91),
        ] {
            let mut r = rig_at(START - 3 * 3600 + h * 3600);
            r.wr(REG_B, 0);
            assert_eq!(r.rd(HOURS), bcd, "hour {h}");
            r.wr(REG_B, REG_B_DM_BINARY);
            let bin = (bcd & 0x80) | ((((bcd & 0x7F) >> 4) * 10) + (bcd & 0x0F));
            assert_eq!(r.rd(HOURS), bin, "hour {h} binary");
        }
    }

    #[test]
    fn clock_advance_rolls_minute_and_year() {
        let mut r = rig_at(START);
        r.clock.advance(61 * SEC);
        assert_eq!(r.rd(SECONDS), 0x06);
        assert_eq!(r.rd(MINUTES), 0x05);
        assert_eq!(r.rtc.unix_time(), START + 61);
        // 2026-12-31 23:59:59 (Thursday) + 1 s.
        let mut r = rig_at(days_from_civil(2026, 12, 31) * 86_400 + 86_399);
        assert_eq!(r.time(), [0x59, 0x59, 0x23, 0x05, 0x31, 0x12, 0x26, 0x20]);
        r.clock.advance(SEC);
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 0x06, 0x01, 0x01, 0x27, 0x20]);
    }

    #[test]
    fn guest_sets_time_with_set_bit() {
        let mut r = rig_at(START);
        r.clock.advance(SEC / 4);
        r.wr(REG_B, REG_B_SET | REG_B_24H | REG_B_UIE);
        assert_eq!(r.rd(REG_B), REG_B_SET | REG_B_24H, "SET clears UIE");
        // 2000-02-29 23:59:59.
        for (i, v) in [
            (SECONDS, 0x59),
            (MINUTES, 0x59),
            (HOURS, 0x23),
            (DAY_OF_MONTH, 0x29),
            (MONTH, 0x02),
            (YEAR, 0x00),
            (CENTURY, 0x20),
        ] {
            r.wr(i, v);
        }
        r.clock.advance(5 * SEC);
        assert_eq!(r.rd(SECONDS), 0x59, "no updates while SET");
        assert_eq!(r.rd(REG_A) & REG_A_UIP, 0);
        r.wr(REG_B, REG_B_24H);
        assert_eq!(r.rtc.unix_time(), 951_868_799);
        // The divider phase is kept: the next update is 0.75 s later.
        r.clock.advance(SEC * 3 / 4 - 1);
        assert_eq!(r.rd(SECONDS), 0x59);
        r.clock.advance(1);
        // 2000-03-01 00:00:00, a Wednesday (4).
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 0x04, 0x01, 0x03, 0x00, 0x20]);
    }

    #[test]
    fn write_while_running_sets_time_at_once() {
        let mut r = rig_at(START);
        r.wr(MINUTES, 0x30);
        assert_eq!(r.rd(MINUTES), 0x30);
        r.clock.advance(2 * SEC);
        assert_eq!(r.rd(SECONDS), 0x07);
        assert_eq!(r.rtc.unix_time(), START + 26 * 60 + 2);
    }

    #[test]
    fn twelve_hour_write_decodes_pm() {
        let mut r = rig_at(START);
        r.wr(REG_B, REG_B_SET);
        r.wr(HOURS, 0x92); // 12 PM
        r.wr(REG_B, 0);
        r.wr(REG_B, REG_B_24H);
        assert_eq!(r.rd(HOURS), 0x12);
        r.wr(REG_B, REG_B_SET);
        r.wr(HOURS, 0x12); // 12 AM
        r.wr(REG_B, 0);
        r.wr(REG_B, REG_B_24H);
        assert_eq!(r.rd(HOURS), 0x00);
    }

    #[test]
    fn update_in_progress_window() {
        let mut r = rig_at(START);
        r.clock.advance(999_700_000);
        assert_eq!(r.rd(REG_A), 0x26);
        r.clock.advance(100_000);
        assert_eq!(r.rd(REG_A), 0xA6);
        assert_eq!(r.rd(SECONDS), 0x05);
        r.clock.advance(200_000);
        assert_eq!(r.rd(REG_A), 0x26);
        assert_eq!(r.rd(SECONDS), 0x06);
    }

    #[test]
    fn periodic_interrupt_at_1024_hz() {
        let r = rig_at(START);
        let (line, clock) = (r.line.clone(), r.clock.clone());
        let mut r = r;
        r.wr(REG_B, REG_B_24H | REG_B_PIE);
        let rtc = Mutex::new(r.rtc);
        // 32 ticks of 32768 Hz = 976562.5 ns, rounded up.
        assert_eq!(rtc.deadline(), Some(976_563));
        clock.advance(976_562);
        rtc.fire(clock.now_ns());
        assert!(!line.level.load(Ordering::SeqCst));
        clock.advance(1);
        rtc.fire(clock.now_ns());
        assert!(line.level.load(Ordering::SeqCst));
        assert_eq!(rtc.deadline(), None, "nothing new until C is read");
        r.rtc = rtc.into_inner().unwrap();
        assert_eq!(r.rd(REG_C), REG_C_IRQF | REG_C_PF);
        assert!(!r.level());
        assert_eq!(r.rd(REG_C), 0, "reading C cleared it");
        // PF is set without PIE, but raises nothing.
        r.wr(REG_B, REG_B_24H);
        r.clock.advance(SEC / 1024);
        assert_eq!(r.rd(REG_C), REG_C_PF);
        assert!(!r.level());
        // Enabling PIE with PF already set raises IRQF at once.
        r.clock.advance(SEC / 512);
        r.wr(REG_B, REG_B_24H | REG_B_PIE);
        assert!(r.level());
        assert_eq!(
            r.line.changes.lock().unwrap().as_slice(),
            &[true, false, true]
        );
    }

    #[test]
    fn update_ended_and_alarm_interrupts() {
        let mut r = rig_at(START);
        r.wr(REG_A, REG_A_DV_32K); // no periodic flag in the way
        r.wr(REG_B, REG_B_24H | REG_B_UIE);
        let rtc = Mutex::new(r.rtc);
        assert_eq!(rtc.deadline(), Some(SEC));
        r.clock.advance(SEC);
        rtc.fire(r.clock.now_ns());
        assert!(r.line.level.load(Ordering::SeqCst));
        r.rtc = rtc.into_inner().unwrap();
        assert_eq!(r.rd(REG_C), REG_C_IRQF | REG_C_UF);
        assert!(!r.level());
        // Alarm at 03:04:10; a jump over it still sets AF.
        r.wr(REG_B, REG_B_24H | REG_B_AIE);
        r.wr(SECONDS_ALARM, 0x10);
        r.wr(MINUTES_ALARM, 0x04);
        r.wr(HOURS_ALARM, 0x03);
        r.clock.advance(3 * SEC); // 03:04:09
        assert_eq!(r.rd(REG_C), REG_C_UF);
        assert!(!r.level());
        r.clock.advance(3 * SEC); // 03:04:12
        assert!(r.rd(REG_A) & REG_A_UIP == 0 && r.level(), "AF raised IRQ 8");
        assert_eq!(r.rd(REG_C), REG_C_IRQF | REG_C_AF | REG_C_UF);
        // Don't-care alarm bytes match every second.
        r.wr(SECONDS_ALARM, 0xC0);
        r.wr(MINUTES_ALARM, 0xFF);
        r.wr(HOURS_ALARM, 0xC5);
        r.clock.advance(SEC);
        assert_eq!(r.rd(REG_C), REG_C_IRQF | REG_C_AF | REG_C_UF);
    }

    #[test]
    fn shared_rtc_is_a_bus_device_and_a_timer() {
        let mut r = rig_at(START);
        r.wr(REG_B, REG_B_24H | REG_B_UIE);
        let shared = Arc::new(Mutex::new(r.rtc));
        let timer: Arc<dyn TimerDevice> = shared.clone();
        let dev: crate::bus::SharedDevice = shared.clone();
        assert_eq!(dev.lock().unwrap().name(), "rtc");
        let set = crate::timer::TimerSet::new();
        set.add(timer);
        assert_eq!(set.next_deadline(), Some(SEC));
        r.clock.advance(SEC);
        set.fire_due(r.clock.now_ns());
        assert!(r.line.level.load(Ordering::SeqCst));
        assert_eq!(set.next_deadline(), None);
    }

    #[test]
    fn divider_reset_holds_time_and_releases_half_a_second_later() {
        let mut r = rig_at(START);
        r.clock.advance(SEC / 10);
        r.wr(REG_A, 0x70);
        r.clock.advance(10 * SEC);
        assert_eq!(r.rd(SECONDS), 0x05);
        assert_eq!(r.rd(REG_A), 0x70);
        r.wr(REG_A, 0x26);
        r.clock.advance(SEC / 2 - 1);
        assert_eq!(r.rd(SECONDS), 0x05);
        r.clock.advance(1);
        assert_eq!(r.rd(SECONDS), 0x06);
    }

    #[test]
    fn memory_size_bytes() {
        let r = rig_at(START); // 128 MiB
        let c = &r.rtc;
        assert_eq!((c.ram(0x15), c.ram(0x16)), (0x80, 0x02));
        assert_eq!((c.ram(0x17), c.ram(0x18)), (0xFF, 0xFF));
        assert_eq!((c.ram(0x30), c.ram(0x31)), (0xFF, 0xFF));
        assert_eq!((c.ram(0x34), c.ram(0x35)), (0x00, 0x07));
        assert_eq!((c.ram(0x5B), c.ram(0x5C), c.ram(0x5D)), (0, 0, 0));
        let clock = Arc::new(VirtualClock::new());
        let line = Arc::new(RecLine::default());
        let c = Cmos::new(line.clone(), clock.clone(), 0, 8 << 30);
        assert_eq!((c.ram(0x34), c.ram(0x35)), (0x00, 0xBF));
        assert_eq!((c.ram(0x5B), c.ram(0x5C), c.ram(0x5D)), (0x00, 0x40, 0x01));
        let c = Cmos::new(line.clone(), clock.clone(), 0, 32 << 20);
        assert_eq!((c.ram(0x17), c.ram(0x18)), (0x00, 0x7C)); // 31744 KiB
        assert_eq!((c.ram(0x34), c.ram(0x35)), (0x00, 0x01));
        let c = Cmos::new(line, clock, 0, 512 << 10);
        assert_eq!((c.ram(0x15), c.ram(0x16)), (0x00, 0x02));
        assert_eq!((c.ram(0x17), c.ram(0x18)), (0, 0));
    }

    #[test]
    fn index_port_and_nmi_bit() {
        let mut r = rig_at(START);
        r.rtc.write(0, &[0x80 | 0x40]);
        assert!(r.rtc.nmi_disabled());
        r.rtc.write(1, &[0xAB]);
        let mut b = [0u8];
        r.rtc.read(0, &mut b);
        assert_eq!(b[0], 0xFF, "the index register is write-only");
        r.rtc.read(1, &mut b);
        assert_eq!(b[0], 0xAB);
        r.rtc.write(0, &[0x40]);
        assert!(!r.rtc.nmi_disabled());
        assert!(r.rtc.dump().contains("2026-11-22 03:04:05"));
        // Registers C and D ignore writes.
        r.wr(REG_D, 0);
        assert_eq!(r.rd(REG_D), 0x80);
        r.wr(REG_C, 0xFF);
        assert_eq!(r.rd(REG_C), 0);
    }

    #[test]
    fn civil_conversion_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2024, 2, 28) + 1),
            (2024, 2, 29)
        );
        let mut prev = civil_from_days(-800_000);
        for z in -799_999..800_000i64 {
            let d = civil_from_days(z);
            assert_eq!(days_from_civil(d.0, d.1, d.2), z);
            let next_in_month = (d.0, d.1) == (prev.0, prev.1) && d.2 == prev.2 + 1;
            let new_month = d.2 == 1 && (d.1 == prev.1 % 12 + 1);
            assert!(next_in_month || new_month, "{prev:?} -> {d:?}");
            prev = d;
        }
        let t = CalendarTime::from_unix(START);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2026, 11, 22, 3, 4, 5)
        );
        assert_eq!(t.day_of_week, 1);
        assert_eq!(t.to_unix(), START);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = rig_at(START);
        r.wr(0x40, 0x99);
        r.wr(REG_B, REG_B_24H | REG_B_PIE);
        r.clock.advance(SEC);
        r.rd(REG_A);
        assert!(r.level());
        let saved = r.rtc.save_state();
        let mut r2 = Rig {
            rtc: Cmos::new(r.line.clone(), r.clock.clone(), 0, 0),
            line: r.line.clone(),
            clock: r.clock.clone(),
        };
        r2.rtc.restore_state(saved.clone());
        assert_eq!(r2.rtc.save_state(), saved);
        assert_eq!(r2.rd(0x40), 0x99);
        assert_eq!(r2.time(), r.time());
        assert_eq!(r2.rd(REG_C), REG_C_IRQF | REG_C_PF | REG_C_UF);
    }

    #[test]
    fn fuzz_registers_no_panic() {
        let mut r = rig_at(START);
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100_000 {
            let v = next();
            let val = (v >> 16) as u8;
            match v % 6 {
                0 | 1 => r.rtc.write(0, &[val]),
                2 => r.rtc.write((v >> 8) % 3, &[val, (v >> 24) as u8]),
                3 | 4 => {
                    let mut b = [0u8; 2];
                    r.rtc.read((v >> 8) % 3, &mut b);
                }
                _ => r.clock.advance((v >> 32) % (3 * SEC)),
            }
            assert_eq!(r.level(), r.rtc.st.irq_level);
            if let Some(d) = r.rtc.next_event() {
                // Always ahead of the last catch-up: firing makes progress.
                assert!(i128::from(d) + r.rtc.st.chain_offset_ns > r.rtc.st.last_chain_ns);
            }
        }
        let changes = r.line.changes.lock().unwrap();
        assert!(changes.windows(2).all(|w| w[0] != w[1]));
    }

    /// kvm-unit-tests' s3 programs the alarm so: wait for an update, read
    /// C, all three alarm bytes "don't care" (0xC0), AIE. IRQ 8 must rise at
    /// the next update, through the timer, and a system reset (the wake)
    /// drops it and the enables but keeps the time and alarm.
    #[test]
    fn dont_care_alarm_fires_at_next_second_and_system_reset_clears_it() {
        let mut r = rig_at(START);
        r.clock.advance(SEC / 3);
        r.rd(REG_C);
        for i in [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM] {
            r.wr(i, ALARM_DONT_CARE);
        }
        let b = r.rd(REG_B);
        r.wr(REG_B, b | REG_B_AIE);
        let rtc = Mutex::new(r.rtc);
        let due = rtc.deadline().expect("AIE arms the timer");
        assert_eq!(due, SEC, "the next update");
        r.clock.advance_to(due - 1);
        rtc.fire(r.clock.now_ns());
        assert!(
            !r.line.level.load(Ordering::SeqCst),
            "not before the second"
        );
        r.clock.advance_to(due);
        rtc.fire(due);
        assert!(r.line.level.load(Ordering::SeqCst), "alarm at the update");
        let mut rtc = rtc.into_inner().unwrap();
        let before = rtc.unix_time();
        rtc.system_reset();
        assert!(!rtc.irq_level());
        assert!(!r.line.level.load(Ordering::SeqCst));
        r.rtc = rtc;
        assert_eq!(r.rd(REG_B), REG_B_24H, "AIE cleared, mode kept");
        assert_eq!(r.rd(REG_C), 0);
        assert_eq!(r.rd(SECONDS_ALARM), ALARM_DONT_CARE);
        assert_eq!(r.rtc.unix_time(), before, "the time is kept");
    }
}
