//! The Intel 8254 programmable interval timer of a PC, and port 0x61.
//!
//! Three counters clocked at [`PIT_HZ`] (the PC's 14.31818 MHz crystal / 12)
//! at ports 0x40-0x42 with the control word register at 0x43. OUT0 drives
//! ISA IRQ 0, counter 1 is the (unused) DRAM refresh timer, counter 2 drives
//! the speaker and is read and gated through port 0x61 ([`SpeakerPort`]).
//!
//! The model follows the Intel 8254 datasheet (order no. 231164): the control
//! word, the counter latch and read-back commands, the status byte with
//! OUTPUT and NULL COUNT, the read and write flip-flops of the LSB-then-MSB
//! access mode, binary and BCD counting, the six modes with their OUT
//! waveforms and GATE effects, and the loading rules ("the count is loaded on
//! the next CLK pulse", a new count in modes 2/3 waits for the end of the
//! period / half-cycle, modes 1/5 load on a trigger).
//!
//! # Time
//! CLK is free running: CLK pulse `k` happens at guest time `k / PIT_HZ`
//! seconds of the [`SharedClock`], so [`ticks_at`] and [`tick_time_ns`]
//! convert exactly with integer arithmetic. The counting element (CE) is not
//! stepped: each counter remembers the CLK pulse at which it was last
//! (re)loaded and computes its count and OUT from the pulses since then, so
//! nothing drifts however the device is polled. A counter is brought up to
//! the present on every register access and by the timer.
//!
//! # IRQ 0
//! The `irq0` line follows OUT0's level, but a guest cannot see every OUT0
//! transition (mode 2 is low for a single 838 ns clock), so the line is driven
//! per *tick*: every rising edge of OUT0 is a tick, including the period
//! boundaries of modes 2 and 3 whichever instant the device is brought up to
//! date. A delivered tick pulses the line (low, then high) so the PIC always
//! latches an edge; the line then stays high while OUT0 is high and goes low
//! when OUT0 does. [`PitTimer`] implements [`TimerDevice`]: its deadline is
//! the next rising edge of OUT0 (and in mode 3 the falling edge too, so the
//! line follows the square wave); `fire` brings counter 0 up to `now` and
//! delivers the ticks according to the lost-tick policy. At reset OUT0 is
//! high but the line low; the line only rises with a tick.
//!
//! # Lost ticks
//! When the guest does not keep up (the timer fires late, e.g. a descheduled
//! vCPU on the host clock), several periods may have passed. The policy is
//! chosen at construction ([`LostTickPolicy`]):
//! - [`LostTickPolicy::Discard`] (the default), as QEMU's PIT does: however
//!   many ticks passed, one edge is delivered; the rest are lost. The guest's
//!   tick count falls behind wall time but its interrupt rate never bursts.
//! - [`LostTickPolicy::Catchup`], as KVM's in-kernel PIT with `reinject`:
//!   every tick is counted; one edge is delivered and the next only after the
//!   PIC acknowledged IRQ 0 ([`Pit::irq_acked`], called by the machine), so
//!   the missed ticks are delivered one after another as the guest takes
//!   them. As in KVM, the count of pending ticks is dropped when counter 0 is
//!   reprogrammed or when IRQ 0 is unmasked ([`Pit::irq_unmasked`]); it is
//!   capped at [`MAX_PENDING_TICKS`].
//!
//! # Port 0x61 (NMI status and control, "port B" of the PC/AT)
//! Bit 0 is counter 2's GATE, bit 1 the speaker data enable, bits 2-3 the
//! parity / channel check disables (stored and read back as on a PC/AT; QEMU
//! reads them as 0); bit 4 is the refresh detect toggle, which flips on every
//! read as in QEMU (a guest timing loop can never hang on it); bit 5 is OUT2;
//! bits 6-7 (channel check, parity error) read 0: no NMI source exists here.
//!
//! Where the datasheet leaves the outcome open:
//! - power-up state: each counter is as after a mode 3 control word with no
//!   count (OUT high, CE 0, not counting); counters 0 and 1 have GATE tied
//!   high, counter 2's GATE comes from port 0x61 (low at reset);
//! - a control word also clears a latched count and status ("until the
//!   counter is reprogrammed");
//! - a latched count is read LSB first whatever the read flip-flop of the
//!   unlatched count says, as QEMU and Bochs do;
//! - a count of 1 in mode 2 (illegal) or mode 3 leaves OUT high: no ticks;
//! - in BCD mode a digit above 9 counts with its binary weight;
//! - a read of port 0x43 (write only) returns 0, as QEMU does.
//!
//! The line is driven while the `Pit` is borrowed (in practice with its mutex
//! held): its receiver must not lock the `Pit`, and the machine must call
//! [`Pit::irq_acked`] after releasing the PIC's lock.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, SharedDevice};
use crate::clock::SharedClock;
use crate::irq::IrqLine;
use crate::timer::TimerDevice;

/// The 8254's input clock on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
const NS_PER_SEC: u64 = 1_000_000_000;

/// Counter 0's port; the PIT decodes 0x40-0x43.
pub const PIT_BASE: u64 = 0x40;
/// Number of ports the PIT decodes.
pub const PIT_PORT_LEN: u64 = 4;
/// NMI status and control register (PC/AT "port B").
pub const PORT_61: u64 = 0x61;

/// Upper bound of ticks held back under [`LostTickPolicy::Catchup`].
pub const MAX_PENDING_TICKS: u32 = 65_536;

// Control word (datasheet, "Control Word Format").
const CW_SC_SHIFT: u8 = 6;
const CW_SC_READ_BACK: u8 = 3;
const CW_RW_SHIFT: u8 = 4;
const CW_RW_MASK: u8 = 3;
const CW_BCD: u8 = 0x01;
// Read-back command (SC = 11): bits are active low.
const RB_NOT_COUNT: u8 = 0x20;
const RB_NOT_STATUS: u8 = 0x10;
// Status byte.
const ST_OUTPUT: u8 = 0x80;
const ST_NULL_COUNT: u8 = 0x40;
// Port 0x61.
const P61_GATE2: u8 = 0x01;
const P61_SPEAKER_DATA: u8 = 0x02;
const P61_CHECK_DISABLES: u8 = 0x0C;
const P61_REFRESH: u8 = 0x10;
const P61_OUT2: u8 = 0x20;

/// CLK pulses that have happened by guest time `ns`.
pub fn ticks_at(ns: u64) -> u64 {
    // At most u64::MAX * PIT_HZ / 1e9, which fits in a u64.
    (u128::from(ns) * u128::from(PIT_HZ) / u128::from(NS_PER_SEC)) as u64
}

/// The first guest time (ns) at which CLK pulse `tick` has happened
/// (saturates at `u64::MAX`).
pub fn tick_time_ns(tick: u64) -> u64 {
    let ns = (u128::from(tick) * u128::from(NS_PER_SEC)).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// What happens to ticks of IRQ 0 the guest did not take in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LostTickPolicy {
    /// Deliver one edge however many periods passed (QEMU).
    #[default]
    Discard,
    /// Count every tick and deliver them one per PIC acknowledge (KVM's
    /// in-kernel PIT with reinjection).
    Catchup,
}

/// The RW1/RW0 field of a control word: how the count is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// Least significant byte only (RW = 01); the MSB is 0.
    Lsb,
    /// Most significant byte only (RW = 10); the LSB is 0.
    Msb,
    /// Least significant byte first, then most significant byte (RW = 11).
    LsbMsb,
}

impl AccessMode {
    fn bits(self) -> u8 {
        match self {
            AccessMode::Lsb => 1,
            AccessMode::Msb => 2,
            AccessMode::LsbMsb => 3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            AccessMode::Lsb => "lsb",
            AccessMode::Msb => "msb",
            AccessMode::LsbMsb => "lsb/msb",
        }
    }
}

/// The counting element (CE) of a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CountingElement {
    /// Not counting (no count loaded yet, waiting for a trigger, stopped by
    /// GATE in modes 2/3, or the first byte of a mode 0 count written): the
    /// CE holds `ce` (register bits) and OUT holds `out`.
    Held { ce: u16, out: bool },
    /// Loaded at CLK pulse `anchor`. Modes 0, 1, 4, 5: `value` is the
    /// distance to terminal count (1..=65536, or 10000 in BCD) unless `done`,
    /// when terminal count is past and `value` is the CE wrapping down.
    /// Modes 2, 3: `value` is the count N reloaded each period;
    /// `start_low` says a mode 3 count started at the low half-cycle. In
    /// modes 0 and 4, GATE low freezes the CE at `anchor`'s value.
    Running {
        anchor: u64,
        value: u64,
        done: bool,
        start_low: bool,
    },
}

/// One counter's registers and counting state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterState {
    /// M2-M0 as programmed (6 and 7 act as 2 and 3).
    pub mode: u8,
    pub bcd: bool,
    pub access: AccessMode,
    /// Count register (CRm:CRl), as last written in full.
    pub cr: u16,
    /// The LSB written while the write flip-flop waits for the MSB.
    pub write_lsb: u8,
    /// Write flip-flop: the next count byte written is the MSB.
    pub write_msb_next: bool,
    /// Read flip-flop of the unlatched count: the next byte read is the MSB.
    pub read_msb_next: bool,
    /// Output latch (OL) holding a latched count until it is read.
    pub latched_count: Option<u16>,
    /// The latched count's LSB has been read.
    pub latched_msb_next: bool,
    /// Status byte latched by a read-back command, read before the count.
    pub latched_status: Option<u8>,
    /// NULL COUNT: the last count written is not in the CE yet.
    pub null_count: bool,
    /// A full count was written since the control word (modes 1, 2, 3, 5 can
    /// be triggered only then).
    pub armed: bool,
    pub gate: bool,
    pub ce: CountingElement,
    /// CLK pulse at which CR is transferred to CE (a write or trigger waiting
    /// for "the next CLK pulse").
    pub load_at: Option<u64>,
    /// Modes 2/3: a new count waits for the end of the period / half-cycle.
    pub reload_pending: bool,
    /// The CLK pulse the counter was last brought up to.
    pub synced: u64,
}

/// Numeric value of a BCD count; a digit above 9 weighs what it would
/// count down through.
fn bcd_value(raw: u16) -> u64 {
    let d = |shift: u16| u64::from((raw >> shift) & 0xF);
    d(12) * 1000 + d(8) * 100 + d(4) * 10 + d(0)
}

fn to_bcd(v: u64) -> u16 {
    let v = v % 10_000;
    ((v / 1000) << 12 | (v / 100 % 10) << 8 | (v / 10 % 10) << 4 | (v % 10)) as u16
}

/// Smallest `first + j * n` (j >= 0) greater than `k`.
fn next_after(k: u64, first: u64, n: u64) -> u64 {
    if k < first {
        first
    } else {
        let n = n.max(1);
        first.saturating_add(((k - first) / n + 1).saturating_mul(n))
    }
}

/// Occurrences of `first + j * n` (j >= 0) in `(a, b]`.
fn count_in(a: u64, b: u64, first: u64, n: u64) -> u64 {
    let upto = |x: u64| {
        if x < first {
            0
        } else {
            (x - first) / n.max(1) + 1
        }
    };
    upto(b).saturating_sub(upto(a))
}

/// Mode 3 half-cycles of a count `n`: (high, low) lengths in CLK pulses. An
/// odd count is high for (N + 1) / 2 and low for (N - 1) / 2.
fn halves(n: u64) -> (u64, u64) {
    (n.div_ceil(2), n / 2)
}

impl CounterState {
    fn power_up(gate: bool) -> Self {
        CounterState {
            mode: 3,
            bcd: false,
            access: AccessMode::LsbMsb,
            cr: 0,
            write_lsb: 0,
            write_msb_next: false,
            read_msb_next: false,
            latched_count: None,
            latched_msb_next: false,
            latched_status: None,
            null_count: true,
            armed: false,
            gate,
            ce: CountingElement::Held { ce: 0, out: true },
            load_at: None,
            reload_pending: false,
            synced: 0,
        }
    }

    /// The mode the counter behaves as (X10 is mode 2, X11 mode 3).
    fn op_mode(&self) -> u8 {
        let m = self.mode & 7;
        if m & 2 != 0 {
            m & 3
        } else {
            m
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// N for the count register: 0 means 65536 (binary) or 10000 (BCD).
    fn initial_count(&self) -> u64 {
        let v = if self.bcd {
            bcd_value(self.cr)
        } else {
            u64::from(self.cr)
        };
        if v == 0 {
            self.modulus()
        } else {
            v
        }
    }

    fn encode(&self, v: u64) -> u16 {
        let v = v % self.modulus();
        if self.bcd {
            to_bcd(v)
        } else {
            v as u16
        }
    }

    fn counting_enabled(&self) -> bool {
        self.gate || matches!(self.op_mode(), 1 | 5)
    }

    fn elapsed(&self, anchor: u64, t: u64) -> u64 {
        if self.counting_enabled() {
            t.saturating_sub(anchor)
        } else {
            0
        }
    }

    /// Binary CE value of a one-shot count `k` pulses after its anchor.
    fn one_shot_ce(&self, value: u64, k: u64) -> u64 {
        let m = self.modulus();
        (value % m + m - k % m) % m
    }

    /// Where the one-shot modes' terminal event ends with OUT high: at
    /// terminal count in modes 0/1, one clock later (after the strobe) in
    /// modes 4/5.
    fn one_shot_rise(&self, value: u64) -> u64 {
        match self.op_mode() {
            0 | 1 => value,
            _ => value.saturating_add(1),
        }
    }

    /// (CE register bits, OUT) at CLK pulse `t` (not before the anchor).
    fn eval(&self, t: u64) -> (u16, bool) {
        let (anchor, value, done, start_low) = match self.ce {
            CountingElement::Held { ce, out } => return (ce, out),
            CountingElement::Running {
                anchor,
                value,
                done,
                start_low,
            } => (anchor, value, done, start_low),
        };
        let k = self.elapsed(anchor, t);
        match self.op_mode() {
            2 => {
                let n = value.max(1);
                let p = k % n;
                // OUT is low for the one clock the CE holds 1 (GATE low
                // forces it high).
                let low = n >= 2 && p == n - 1 && self.gate;
                (self.encode(n - p), !low)
            }
            3 => {
                let n = value.max(1);
                let (h, _) = halves(n);
                let off = if start_low && n >= 2 { h } else { 0 };
                let p = (k % n + off) % n;
                // An odd count loads N - 1; both halves count down by two.
                let base = n & !1;
                let ce = if p < h {
                    base - 2 * p
                } else {
                    base - 2 * (p - h)
                };
                (self.encode(ce), p < h || !self.gate)
            }
            mode => {
                let ce = self.encode(self.one_shot_ce(value, k));
                let out = match mode {
                    0 | 1 => done || k >= value,
                    _ => done || k != value,
                };
                (ce, out)
            }
        }
    }

    fn out(&self) -> bool {
        self.eval(self.synced).1
    }

    /// First rising edge of OUT in a running periodic count (modes 2/3,
    /// N >= 2), in pulses after the anchor.
    fn periodic_first_rise(&self, n: u64, start_low: bool) -> u64 {
        if self.op_mode() == 3 && start_low {
            halves(n).1
        } else {
            n
        }
    }

    /// Rising edges of OUT at CLK pulses in `(a, b]` within the current CE.
    fn rises_in(&self, a: u64, b: u64) -> u64 {
        let CountingElement::Running {
            anchor,
            value,
            done,
            start_low,
        } = self.ce
        else {
            return 0;
        };
        if b <= a || !self.counting_enabled() {
            return 0;
        }
        let (ka, kb) = (a.saturating_sub(anchor), b.saturating_sub(anchor));
        match self.op_mode() {
            2 | 3 => {
                let n = value.max(1);
                if n < 2 {
                    return 0;
                }
                count_in(ka, kb, self.periodic_first_rise(n, start_low), n)
            }
            _ => {
                let r = self.one_shot_rise(value);
                u64::from(!done && ka < r && r <= kb)
            }
        }
    }

    /// The next OUT change after CLK pulse `a` within the current CE, not
    /// counting the one-clock low of modes 2, 4 and 5 (their rise is the
    /// event).
    fn segment_next_event(&self, a: u64) -> Option<u64> {
        let CountingElement::Running {
            anchor,
            value,
            done,
            start_low,
        } = self.ce
        else {
            return None;
        };
        if !self.counting_enabled() {
            return None;
        }
        let ka = a.saturating_sub(anchor);
        let k = match self.op_mode() {
            2 | 3 => {
                let n = value.max(1);
                if n < 2 {
                    return None;
                }
                let rise = next_after(ka, self.periodic_first_rise(n, start_low), n);
                if self.op_mode() == 2 {
                    rise
                } else {
                    let first_fall = if start_low { n } else { halves(n).0 };
                    rise.min(next_after(ka, first_fall, n))
                }
            }
            _ => {
                let r = self.one_shot_rise(value);
                if done || r == 0 || r <= ka {
                    return None;
                }
                r
            }
        };
        let e = anchor.saturating_add(k);
        (e > a).then_some(e)
    }

    /// Modes 2/3: the next CLK pulse after `a` at which the CE reloads (end
    /// of the period in mode 2, of the half-cycle in mode 3).
    fn next_reload_after(&self, a: u64) -> Option<u64> {
        let CountingElement::Running {
            anchor,
            value,
            start_low,
            ..
        } = self.ce
        else {
            return None;
        };
        let ka = a.saturating_sub(anchor);
        let n = value.max(1);
        let k = match self.op_mode() {
            2 => next_after(ka, n, n),
            3 if n >= 2 => {
                let rise = next_after(ka, self.periodic_first_rise(n, start_low), n);
                let first_fall = if start_low { n } else { halves(n).0 };
                rise.min(next_after(ka, first_fall, n))
            }
            3 => ka.saturating_add(1),
            _ => return None,
        };
        Some(anchor.saturating_add(k))
    }

    /// CR -> CE on CLK pulse `l`.
    fn apply_load(&mut self, l: u64) {
        let n = self.initial_count();
        self.null_count = false;
        self.load_at = None;
        self.reload_pending = false;
        self.ce = match self.op_mode() {
            // Loaded but not counting: GATE low disables modes 2/3 and
            // keeps OUT high.
            op @ (2 | 3) if !self.gate => CountingElement::Held {
                ce: self.encode(if op == 3 { n & !1 } else { n }),
                out: true,
            },
            _ => CountingElement::Running {
                anchor: l,
                value: n,
                done: false,
                start_low: false,
            },
        };
    }

    /// Modes 2/3: a new count reaches the CE at the reload on pulse `r`.
    fn apply_reload(&mut self, r: u64, out_at_r: bool) {
        let n = self.initial_count();
        self.null_count = false;
        self.reload_pending = false;
        self.ce = CountingElement::Running {
            anchor: r,
            value: n,
            done: false,
            // Mode 3: a half-cycle that ended with OUT going low starts the
            // new count at its low half.
            start_low: self.op_mode() == 3 && !out_at_r && n >= 2,
        };
    }

    /// Brings the counter up to CLK pulse `t`; returns the rising edges of
    /// OUT on the way.
    fn advance(&mut self, t: u64) -> u64 {
        let mut rises = 0u64;
        // A load clears a pending reload, so at most two events apply; the
        // bound only guards a corrupt restored state.
        for _ in 0..4 {
            if t <= self.synced {
                return rises;
            }
            let next = self.synced.saturating_add(1);
            let load = self.load_at.map(|l| l.max(next)).filter(|&l| l <= t);
            let reload = if self.reload_pending {
                self.next_reload_after(self.synced).filter(|&r| r <= t)
            } else {
                None
            };
            match (load, reload) {
                (Some(l), r) if r.is_none_or(|r| l <= r) => {
                    // The load replaces whatever the CE would have done on
                    // pulse `l`.
                    rises += self.rises_in(self.synced, l - 1);
                    let before = self.eval(l - 1).1;
                    self.apply_load(l);
                    self.synced = l;
                    rises += u64::from(!before && self.eval(l).1);
                }
                (_, Some(r)) => {
                    rises += self.rises_in(self.synced, r);
                    let before = self.eval(r).1;
                    self.apply_reload(r, before);
                    self.synced = r;
                    rises += u64::from(!before && self.eval(r).1);
                }
                _ => break,
            }
        }
        if t > self.synced {
            rises += self.rises_in(self.synced, t);
            self.synced = t;
        }
        rises
    }

    /// The next CLK pulse after `after` at which OUT rises or (mode 3, or a
    /// mode 1 trigger) changes.
    fn next_out_event(&self, after: u64) -> Option<u64> {
        let mut c = self.clone();
        let mut a = after.max(c.synced);
        c.advance(a);
        for _ in 0..6 {
            let out_a = c.eval(a).1;
            let load = c.load_at.map(|l| l.max(a.saturating_add(1)));
            let reload = if c.reload_pending {
                c.next_reload_after(a)
            } else {
                None
            };
            let e = [c.segment_next_event(a), load, reload]
                .into_iter()
                .flatten()
                .min()?;
            let rises = c.advance(e);
            if rises > 0 || c.eval(e).1 != out_a {
                return Some(e);
            }
            a = e;
        }
        None
    }

    /// Moves the anchor of a one-shot count to `w` (before GATE changes, so
    /// modes 0/4 freeze or resume from the count at `w`).
    fn reanchor(&mut self, w: u64) {
        if let CountingElement::Running {
            anchor,
            value,
            done,
            ..
        } = self.ce
        {
            let k = self.elapsed(anchor, w);
            let (value, done) = if done || k >= self.one_shot_rise(value) {
                (self.one_shot_ce(value, k), true)
            } else {
                (value - k, false)
            };
            self.ce = CountingElement::Running {
                anchor: w,
                value,
                done,
                start_low: false,
            };
        }
    }

    fn status(&self) -> u8 {
        let mut s = (self.access.bits() << CW_RW_SHIFT) | ((self.mode & 7) << 1);
        if self.out() {
            s |= ST_OUTPUT;
        }
        if self.null_count {
            s |= ST_NULL_COUNT;
        }
        if self.bcd {
            s |= CW_BCD;
        }
        s
    }

    /// Counter latch command: ignored while a latched count is unread.
    fn latch_count(&mut self) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.eval(self.synced).0);
            self.latched_msb_next = false;
        }
    }

    fn latch_status(&mut self) {
        if self.latched_status.is_none() {
            self.latched_status = Some(self.status());
        }
    }

    /// A control word selecting this counter (RW != 00) at pulse `w`.
    /// Returns whether OUT rose.
    fn write_control(&mut self, w: u64, val: u8) -> bool {
        let (ce, before) = self.eval(w);
        self.mode = (val >> 1) & 7;
        self.bcd = val & CW_BCD != 0;
        self.access = match (val >> CW_RW_SHIFT) & CW_RW_MASK {
            1 => AccessMode::Lsb,
            2 => AccessMode::Msb,
            _ => AccessMode::LsbMsb,
        };
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latched_count = None;
        self.latched_msb_next = false;
        self.latched_status = None;
        self.null_count = true;
        self.armed = false;
        self.load_at = None;
        self.reload_pending = false;
        // "All control logic is immediately reset and OUT goes to a known
        // initial state": low in mode 0, high in the others.
        let out = self.op_mode() != 0;
        self.ce = CountingElement::Held { ce, out };
        !before && out
    }

    /// A byte written to the counter's port at pulse `w`. Returns whether
    /// OUT rose.
    fn write_count_byte(&mut self, w: u64, val: u8) -> bool {
        let before = self.eval(w).1;
        match self.access {
            AccessMode::Lsb => self.count_written(w, u16::from(val)),
            AccessMode::Msb => self.count_written(w, u16::from(val) << 8),
            AccessMode::LsbMsb if !self.write_msb_next => {
                self.write_lsb = val;
                self.write_msb_next = true;
                if self.op_mode() == 0 {
                    // Mode 0: "writing the first byte disables counting; OUT
                    // is set low immediately".
                    let ce = self.eval(w).0;
                    self.ce = CountingElement::Held { ce, out: false };
                    self.load_at = None;
                }
            }
            AccessMode::LsbMsb => {
                self.write_msb_next = false;
                let cr = u16::from(self.write_lsb) | (u16::from(val) << 8);
                self.count_written(w, cr);
            }
        }
        !before && self.eval(w).1
    }

    fn count_written(&mut self, w: u64, cr: u16) {
        self.cr = cr;
        self.null_count = true;
        let was_armed = std::mem::replace(&mut self.armed, true);
        let next = w.saturating_add(1);
        match self.op_mode() {
            0 | 4 => {
                // Loaded on the next CLK pulse; no pulse passes before it,
                // so holding the CE until then is exact. Mode 0 sets OUT low.
                let (ce, out) = self.eval(w);
                let out = out && self.op_mode() == 4;
                self.ce = CountingElement::Held { ce, out };
                self.load_at = Some(next);
                self.reload_pending = false;
            }
            // Modes 1/5: the count waits for a trigger.
            1 | 5 => {}
            _ => match self.ce {
                CountingElement::Running { .. } => {
                    if self.load_at.is_none() {
                        self.reload_pending = true;
                    }
                }
                CountingElement::Held { .. } => {
                    // The first count after the control word is loaded on
                    // the next pulse; a later one while GATE is low waits for
                    // the trigger.
                    if !was_armed {
                        self.load_at = Some(next);
                    }
                }
            },
        }
    }

    /// GATE changes to `level` at pulse `w`. Returns whether OUT rose.
    fn set_gate(&mut self, w: u64, level: bool) -> bool {
        if level == self.gate {
            return false;
        }
        let before = self.eval(w).1;
        let next = w.saturating_add(1);
        match self.op_mode() {
            0 | 4 => {
                // GATE disables / enables counting; the CE keeps its value.
                self.reanchor(w);
                self.gate = level;
            }
            1 | 5 => {
                self.gate = level;
                if level && self.armed {
                    self.load_at = Some(next);
                }
            }
            _ => {
                if level {
                    self.gate = true;
                    // A trigger reloads the CE on the next pulse.
                    if self.armed {
                        self.load_at = Some(next);
                    }
                } else {
                    // Counting stops and OUT is set high immediately.
                    let ce = self.eval(w).0;
                    self.gate = false;
                    self.ce = CountingElement::Held { ce, out: true };
                    self.reload_pending = false;
                }
            }
        }
        !before && self.eval(w).1
    }

    /// A read of the counter's port at pulse `w`.
    fn read_byte(&mut self, w: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if let Some(v) = self.latched_count {
            let [lsb, msb] = v.to_le_bytes();
            return match self.access {
                AccessMode::Lsb => {
                    self.latched_count = None;
                    lsb
                }
                AccessMode::Msb => {
                    self.latched_count = None;
                    msb
                }
                AccessMode::LsbMsb if !self.latched_msb_next => {
                    self.latched_msb_next = true;
                    lsb
                }
                AccessMode::LsbMsb => {
                    self.latched_count = None;
                    self.latched_msb_next = false;
                    msb
                }
            };
        }
        let [lsb, msb] = self.eval(w).0.to_le_bytes();
        match self.access {
            AccessMode::Lsb => lsb,
            AccessMode::Msb => msb,
            AccessMode::LsbMsb => {
                let msb_now = self.read_msb_next;
                self.read_msb_next = !msb_now;
                if msb_now {
                    msb
                } else {
                    lsb
                }
            }
        }
    }

    fn mode_name(&self) -> &'static str {
        match self.op_mode() {
            0 => "interrupt on terminal count",
            1 => "hardware retriggerable one-shot",
            2 => "rate generator",
            3 => "square wave",
            4 => "software triggered strobe",
            _ => "hardware triggered strobe",
        }
    }
}

/// Everything the PIT and port 0x61 hold, for save / restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PitState {
    pub counters: [CounterState; 3],
    /// Port 0x61 bit 1.
    pub speaker_data_enable: bool,
    /// Port 0x61 bits 2-3 as written (parity / channel check disables).
    pub check_disables: u8,
    /// Port 0x61 bit 4.
    pub refresh_toggle: bool,
    /// The level last driven on the IRQ 0 line.
    pub irq0_level: bool,
    /// Catchup policy: ticks not yet delivered.
    pub pending_ticks: u32,
    /// Catchup policy: an edge was delivered and not yet acknowledged.
    pub awaiting_ack: bool,
    /// Catchup policy: periods that passed while `awaiting_ack`.
    pub unacked_periods: u32,
}

impl PitState {
    /// Power-up state: counters 0 and 1 with GATE tied high, counter 2's
    /// GATE low (port 0x61 = 0).
    pub fn power_up() -> Self {
        PitState {
            counters: [
                CounterState::power_up(true),
                CounterState::power_up(true),
                CounterState::power_up(false),
            ],
            speaker_data_enable: false,
            check_disables: 0,
            refresh_toggle: false,
            irq0_level: false,
            pending_ticks: 0,
            awaiting_ack: false,
            unacked_periods: 0,
        }
    }
}

impl Default for PitState {
    fn default() -> Self {
        Self::power_up()
    }
}

/// The 8254 with counter 0's OUT wired to ISA IRQ 0 and counter 2's GATE and
/// OUT to port 0x61.
pub struct Pit {
    clock: SharedClock,
    irq0: Arc<dyn IrqLine>,
    policy: LostTickPolicy,
    state: PitState,
}

impl std::fmt::Debug for Pit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pit")
            .field("policy", &self.policy)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Pit {
    /// A PIT in its power-up state, timed by `clock`, OUT0 driving `irq0`.
    pub fn new(clock: SharedClock, irq0: Arc<dyn IrqLine>, policy: LostTickPolicy) -> Self {
        Pit {
            clock,
            irq0,
            policy,
            state: PitState::power_up(),
        }
    }

    pub fn policy(&self) -> LostTickPolicy {
        self.policy
    }

    /// Back to the power-up state; the IRQ 0 line is lowered.
    pub fn reset(&mut self) {
        let t = self.now_tick();
        self.state = PitState::power_up();
        for c in &mut self.state.counters {
            c.synced = t;
        }
        self.irq0.lower();
    }

    /// Programs counter 0 as SeaBIOS leaves it (its `pit_setup`): mode 2,
    /// LSB then MSB, binary, count 0 (65536: 18.2 Hz).
    pub fn program_bios_defaults(&mut self) {
        self.write_port(3, 0x34);
        self.write_port(0, 0);
        self.write_port(0, 0);
    }

    fn now_tick(&self) -> u64 {
        ticks_at(self.clock.now_ns())
    }

    /// Brings counter `i` up to pulse `t`; returns the pulse it is at
    /// (never earlier than before) and the rises of OUT on the way.
    fn bring_up(&mut self, i: usize, t: u64) -> (u64, u64) {
        let c = &mut self.state.counters[i];
        let rises = c.advance(t);
        (c.synced, rises)
    }

    /// Brings counter 0 up to pulse `t` and delivers its ticks.
    fn sync_irq0(&mut self, t: u64) {
        let (_, rises) = self.bring_up(0, t);
        self.deliver(rises);
    }

    fn pulse_irq0(&mut self) {
        if self.state.irq0_level {
            self.irq0.lower();
        }
        self.irq0.raise();
        self.state.irq0_level = true;
    }

    /// Delivers `rises` new ticks of OUT0 per the policy, then lets the line
    /// follow OUT0 down.
    fn deliver(&mut self, rises: u64) {
        match self.policy {
            LostTickPolicy::Discard => {
                if rises > 0 {
                    self.pulse_irq0();
                }
            }
            LostTickPolicy::Catchup => {
                let p = u64::from(self.state.pending_ticks)
                    .saturating_add(rises)
                    .min(u64::from(MAX_PENDING_TICKS));
                self.state.pending_ticks = p as u32;
                if self.state.awaiting_ack && rises > 0 {
                    // An edge the guest can no longer take (the PIC was
                    // re-initialised, the line masked) would stall the
                    // reinjection for good; KVM clears it through its mask
                    // notifiers. Tandem gives up on an edge after two
                    // periods without an acknowledgement: at worst one tick
                    // merges with one still pending in the IRR.
                    self.state.unacked_periods =
                        self.state.unacked_periods.saturating_add(rises as u32);
                    if self.state.unacked_periods >= 2 {
                        self.state.awaiting_ack = false;
                    }
                }
                if self.state.pending_ticks > 0 && !self.state.awaiting_ack {
                    self.state.pending_ticks -= 1;
                    self.state.awaiting_ack = true;
                    self.state.unacked_periods = 0;
                    self.pulse_irq0();
                }
            }
        }
        if self.state.irq0_level && !self.state.counters[0].out() {
            self.irq0.lower();
            self.state.irq0_level = false;
        }
    }

    /// Reprogramming counter 0 drops held-back ticks, as KVM does.
    fn reset_reinject(&mut self) {
        self.state.pending_ticks = 0;
        self.state.awaiting_ack = false;
        self.state.unacked_periods = 0;
    }

    /// A read of PIT port `offset` (0-2: counters, 3: control word).
    pub fn read_port(&mut self, offset: u64) -> u8 {
        let t = self.now_tick();
        self.sync_irq0(t);
        match offset {
            0..=2 => {
                let i = offset as usize;
                let (w, _) = self.bring_up(i, t);
                self.state.counters[i].read_byte(w)
            }
            // The control word register is write only.
            3 => 0,
            _ => 0xFF,
        }
    }

    /// A write of PIT port `offset`.
    pub fn write_port(&mut self, offset: u64, val: u8) {
        let t = self.now_tick();
        self.sync_irq0(t);
        match offset {
            0..=2 => {
                let i = offset as usize;
                let (w, _) = self.bring_up(i, t);
                let c = &mut self.state.counters[i];
                let rose = c.write_count_byte(w, val);
                let complete = !c.write_msb_next;
                if i == 0 {
                    if complete {
                        self.reset_reinject();
                    }
                    self.deliver(u64::from(rose));
                }
            }
            3 => self.write_control_word(t, val),
            _ => {}
        }
    }

    fn write_control_word(&mut self, t: u64, val: u8) {
        let sc = val >> CW_SC_SHIFT;
        if sc == CW_SC_READ_BACK {
            for i in 0..3 {
                if val & (2 << i) == 0 {
                    continue;
                }
                self.bring_up(i, t);
                let c = &mut self.state.counters[i];
                if val & RB_NOT_COUNT == 0 {
                    c.latch_count();
                }
                if val & RB_NOT_STATUS == 0 {
                    c.latch_status();
                }
            }
            return;
        }
        let i = usize::from(sc);
        let (w, _) = self.bring_up(i, t);
        let c = &mut self.state.counters[i];
        if (val >> CW_RW_SHIFT) & CW_RW_MASK == 0 {
            c.latch_count();
            return;
        }
        let rose = c.write_control(w, val);
        if i == 0 {
            self.reset_reinject();
            self.deliver(u64::from(rose));
        }
    }

    /// A read of port 0x61.
    pub fn read_port61(&mut self) -> u8 {
        let t = self.now_tick();
        self.sync_irq0(t);
        self.bring_up(2, t);
        self.state.refresh_toggle = !self.state.refresh_toggle;
        let c2 = &self.state.counters[2];
        let mut v = self.state.check_disables & P61_CHECK_DISABLES;
        if c2.gate {
            v |= P61_GATE2;
        }
        if self.state.speaker_data_enable {
            v |= P61_SPEAKER_DATA;
        }
        if self.state.refresh_toggle {
            v |= P61_REFRESH;
        }
        if c2.out() {
            v |= P61_OUT2;
        }
        v
    }

    /// A write of port 0x61.
    pub fn write_port61(&mut self, val: u8) {
        self.state.speaker_data_enable = val & P61_SPEAKER_DATA != 0;
        self.state.check_disables = val & P61_CHECK_DISABLES;
        self.set_gate(2, val & P61_GATE2 != 0);
    }

    /// Drives counter `counter`'s GATE input (0 and 1 are tied high on a PC;
    /// port 0x61 drives counter 2). Out-of-range counters are ignored.
    pub fn set_gate(&mut self, counter: usize, level: bool) {
        if counter > 2 {
            return;
        }
        let t = self.now_tick();
        self.sync_irq0(t);
        let (w, _) = self.bring_up(counter, t);
        let rose = self.state.counters[counter].set_gate(w, level);
        if counter == 0 {
            self.deliver(u64::from(rose));
        }
    }

    /// OUT of `counter` now (false for an out-of-range counter).
    pub fn out(&mut self, counter: usize) -> bool {
        if counter > 2 {
            return false;
        }
        let t = self.now_tick();
        self.sync_irq0(t);
        self.bring_up(counter, t);
        self.state.counters[counter].out()
    }

    /// The level last driven on the IRQ 0 line.
    pub fn irq0_level(&self) -> bool {
        self.state.irq0_level
    }

    /// Ticks held back under [`LostTickPolicy::Catchup`].
    pub fn pending_ticks(&self) -> u32 {
        self.state.pending_ticks
    }

    /// Guest time (ns) at which OUT0 next rises (or, in mode 3, falls): when
    /// [`Pit::fire`] must run.
    pub fn deadline(&self) -> Option<u64> {
        let c = &self.state.counters[0];
        c.next_out_event(c.synced).map(tick_time_ns)
    }

    /// Brings counter 0 up to `now_ns` and drives IRQ 0.
    pub fn fire(&mut self, now_ns: u64) {
        self.sync_irq0(ticks_at(now_ns));
    }

    /// The PIC acknowledged IRQ 0. Under [`LostTickPolicy::Catchup`] this
    /// delivers the next held-back tick; otherwise it does nothing.
    pub fn irq_acked(&mut self) {
        if self.policy != LostTickPolicy::Catchup {
            return;
        }
        let t = self.now_tick();
        let (_, rises) = self.bring_up(0, t);
        self.state.awaiting_ack = false;
        self.deliver(rises);
    }

    /// IRQ 0 was unmasked (PIC IMR bit 0 or IOAPIC pin 2). Under
    /// [`LostTickPolicy::Catchup`] the held-back ticks are dropped and the
    /// next tick is delivered without waiting for an acknowledge, as KVM's
    /// mask notifier does, so an edge lost while masked (an IOAPIC drops
    /// edges on a masked pin) cannot stall the reinjection.
    pub fn irq_unmasked(&mut self) {
        if self.policy == LostTickPolicy::Catchup {
            self.reset_reinject();
        }
    }

    pub fn save_state(&self) -> PitState {
        self.state.clone()
    }

    /// Restores `state` and drives the IRQ 0 line to its saved level.
    pub fn restore_state(&mut self, state: &PitState) {
        self.state = state.clone();
        self.state.pending_ticks = self.state.pending_ticks.min(MAX_PENDING_TICKS);
        self.irq0.set_level(self.state.irq0_level);
    }

    /// The registers in readable form: one line per counter, then port 0x61.
    pub fn dump(&self) -> String {
        let t = self.now_tick();
        let mut s = String::new();
        let _ = writeln!(
            s,
            "pit: lost ticks {}, irq0 {}, pending {}, awaiting ack {}",
            match self.policy {
                LostTickPolicy::Discard => "discard",
                LostTickPolicy::Catchup => "catchup",
            },
            u8::from(self.state.irq0_level),
            self.state.pending_ticks,
            u8::from(self.state.awaiting_ack),
        );
        for (i, c) in self.state.counters.iter().enumerate() {
            let mut c = c.clone();
            c.advance(t);
            let (ce, out) = c.eval(c.synced);
            let latched = c
                .latched_count
                .map_or_else(|| "-".to_string(), |v| format!("{v:#06x}"));
            let status = c
                .latched_status
                .map_or_else(|| "-".to_string(), |v| format!("{v:#04x}"));
            let next = c
                .next_out_event(c.synced)
                .map_or_else(|| "none".to_string(), |e| format!("{} ns", tick_time_ns(e)));
            let _ = writeln!(
                s,
                "channel {i}: mode {} ({}), bcd {}, rw {}, count {:#06x}, ce {:#06x}, \
                 latched {latched}, status latched {status}, read {}, write {}, gate {}, \
                 out {}, null count {}, next event {next}",
                c.mode,
                c.mode_name(),
                u8::from(c.bcd),
                c.access.name(),
                c.cr,
                ce,
                if c.read_msb_next { "msb" } else { "lsb" },
                if c.write_msb_next { "msb" } else { "lsb" },
                u8::from(c.gate),
                u8::from(out),
                u8::from(c.null_count),
            );
        }
        let _ = writeln!(s, "{}", self.dump_port61());
        s
    }

    fn dump_port61(&self) -> String {
        let mut c2 = self.state.counters[2].clone();
        c2.advance(self.now_tick());
        format!(
            "port 0x61: gate2 {}, speaker data {}, check disables {:#x}, refresh {}, out2 {}",
            u8::from(c2.gate),
            u8::from(self.state.speaker_data_enable),
            self.state.check_disables,
            u8::from(self.state.refresh_toggle),
            u8::from(c2.out()),
        )
    }
}

impl BusDevice for Pit {
    fn name(&self) -> &'static str {
        "pit"
    }

    /// A wider access is split into byte accesses at successive ports, as
    /// the ISA bus does for an 8-bit device.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.read_port(offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            self.write_port(offset.saturating_add(i as u64), b);
        }
    }

    fn dump(&self) -> String {
        Pit::dump(self)
    }
}

fn lock(pit: &Mutex<Pit>) -> std::sync::MutexGuard<'_, Pit> {
    // A poisoned lock means a vCPU thread panicked inside the device; the
    // state is a plain struct, keep using it.
    pit.lock().unwrap_or_else(|p| p.into_inner())
}

/// Port 0x61 as its own bus device (the bus hands each range offsets from
/// its own base).
pub struct SpeakerPort(pub Arc<Mutex<Pit>>);

impl BusDevice for SpeakerPort {
    fn name(&self) -> &'static str {
        "port61"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = if offset.saturating_add(i as u64) == 0 {
                lock(&self.0).read_port61()
            } else {
                0xFF
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if offset.saturating_add(i as u64) == 0 {
                lock(&self.0).write_port61(b);
            }
        }
    }

    fn dump(&self) -> String {
        lock(&self.0).dump_port61()
    }
}

/// Counter 0 as a [`TimerDevice`] for the machine's `TimerSet`.
pub struct PitTimer(pub Arc<Mutex<Pit>>);

impl TimerDevice for PitTimer {
    fn deadline(&self) -> Option<u64> {
        lock(&self.0).deadline()
    }

    fn fire(&self, now: u64) {
        lock(&self.0).fire(now);
    }
}

/// The PIT's bus devices on a PC, as (device, base, length): the PIT at
/// 0x40-0x43 and port 0x61.
pub fn pc_port_devices(pit: &Arc<Mutex<Pit>>) -> [(SharedDevice, u64, u64); 2] {
    let speaker: SharedDevice = Arc::new(Mutex::new(SpeakerPort(pit.clone())));
    let pit_dev: SharedDevice = pit.clone();
    [(pit_dev, PIT_BASE, PIT_PORT_LEN), (speaker, PORT_61, 1)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
    use crate::clock::{Clock, VirtualClock};

    /// Records the line as an edge-triggered PIC input sees it.
    #[derive(Default)]
    struct Line {
        level: Mutex<bool>,
        rises: Mutex<u64>,
    }

    impl IrqLine for Line {
        fn set_level(&self, level: bool) {
            let mut l = self.level.lock().unwrap();
            if level && !*l {
                *self.rises.lock().unwrap() += 1;
            }
            *l = level;
        }
    }

    impl Line {
        fn rises(&self) -> u64 {
            *self.rises.lock().unwrap()
        }
        fn level(&self) -> bool {
            *self.level.lock().unwrap()
        }
    }

    struct Pc {
        clock: Arc<VirtualClock>,
        line: Arc<Line>,
        pit: Arc<Mutex<Pit>>,
        timer: PitTimer,
        bus: Bus,
    }

    impl Pc {
        fn new(policy: LostTickPolicy) -> Self {
            let clock = Arc::new(VirtualClock::new());
            let line = Arc::new(Line::default());
            let pit = Arc::new(Mutex::new(Pit::new(clock.clone(), line.clone(), policy)));
            let mut bus = Bus::new(BusKind::Pio);
            for (dev, base, len) in pc_port_devices(&pit) {
                bus.insert(dev, base, len).unwrap();
            }
            let timer = PitTimer(pit.clone());
            Pc {
                clock,
                line,
                pit,
                timer,
                bus,
            }
        }

        fn outb(&self, port: u64, v: u8) {
            assert!(self.bus.write(port, &[v]));
        }

        fn inb(&self, port: u64) -> u8 {
            let mut b = [0u8];
            assert!(self.bus.read(port, &mut b));
            b[0]
        }

        /// Moves the clock to the instant CLK pulse `tick` happens.
        fn at_tick(&self, tick: u64) {
            self.clock.advance_to(tick_time_ns(tick));
        }

        fn now(&self) -> u64 {
            self.clock.now_ns()
        }

        /// Fires the timer if due, as the run loop does.
        fn run_timers(&self) {
            if self.timer.deadline().is_some_and(|d| d <= self.now()) {
                self.timer.fire(self.now());
            }
        }

        fn out2(&self) -> bool {
            self.inb(0x61) & P61_OUT2 != 0
        }

        fn read_count_word(&self, port: u64) -> u16 {
            let lo = self.inb(port);
            let hi = self.inb(port);
            u16::from_le_bytes([lo, hi])
        }

        fn status(&self, counter: u8) -> u8 {
            self.outb(0x43, 0xC0 | RB_NOT_COUNT | (2 << counter));
            self.inb(0x40 + u64::from(counter))
        }
    }

    #[test]
    fn tick_conversion_is_exact() {
        assert_eq!(ticks_at(0), 0);
        assert_eq!(ticks_at(NS_PER_SEC), PIT_HZ);
        assert_eq!(tick_time_ns(PIT_HZ), NS_PER_SEC);
        for k in [1u64, 2, 1193, 65536, 1 << 40] {
            let ns = tick_time_ns(k);
            assert_eq!(ticks_at(ns), k);
            assert_eq!(ticks_at(ns - 1), k - 1);
        }
        assert_eq!(tick_time_ns(u64::MAX), u64::MAX);
    }

    #[test]
    fn mode2_rate_generator_one_edge_per_period() {
        let pc = Pc::new(LostTickPolicy::Discard);
        // Counter 0, LSB then MSB, mode 2, binary; count 1193 (~1 kHz).
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0xA9);
        pc.outb(0x40, 0x04);
        // Loaded on CLK pulse 1; OUT0 rises at each reload, every 1193.
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(1 + 1193)));
        assert_eq!(pc.line.rises(), 0);
        for i in 1..=5u64 {
            let d = pc.timer.deadline().unwrap();
            assert_eq!(d, tick_time_ns(1 + 1193 * i));
            // Not yet due one ns before.
            pc.clock.advance_to(d - 1);
            pc.timer.fire(pc.now());
            assert_eq!(pc.line.rises(), i - 1);
            pc.clock.advance_to(d);
            pc.timer.fire(pc.now());
            assert_eq!(pc.line.rises(), i);
            assert!(pc.line.level());
        }
        let period = tick_time_ns(1 + 1193 * 6) - tick_time_ns(1 + 1193 * 5);
        assert!((999_846..=999_848).contains(&period), "{period}");
        // No drift: after 1000 periods the deadline is still on the pulse.
        for _ in 0..1000 {
            pc.clock.advance_to(pc.timer.deadline().unwrap());
            pc.run_timers();
        }
        assert_eq!(pc.line.rises(), 1005);
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(1 + 1193 * 1006)));
    }

    #[test]
    fn mode0_one_shot_rises_once_at_terminal_count() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.clock.advance(1234); // pulse 1 has happened (838 ns)
        pc.outb(0x43, 0x30); // counter 0, LSB/MSB, mode 0
        assert_eq!(
            pc.status(0) & ST_OUTPUT,
            0,
            "OUT low after the control word"
        );
        pc.outb(0x40, 100);
        pc.outb(0x40, 0);
        assert!(!pc.pit.lock().unwrap().out(0));
        // Loaded on pulse 2, terminal count N = 100 pulses later: N + 1
        // pulses after the write.
        let terminal = tick_time_ns(2 + 100);
        assert_eq!(pc.timer.deadline(), Some(terminal));
        pc.clock.advance_to(terminal - 1);
        pc.timer.fire(pc.now());
        assert!(!pc.pit.lock().unwrap().out(0));
        assert_eq!(pc.line.rises(), 0);
        pc.clock.advance_to(terminal);
        pc.timer.fire(pc.now());
        assert!(pc.pit.lock().unwrap().out(0));
        assert_eq!(pc.line.rises(), 1);
        assert!(pc.line.level());
        assert_eq!(pc.timer.deadline(), None);
        // The counter keeps counting (wraps) but OUT stays high.
        pc.clock.advance(200_000_000);
        pc.timer.fire(pc.now());
        pc.run_timers();
        assert_eq!(pc.line.rises(), 1);
        assert!(pc.line.level());
        // A new count sets OUT (and the line) low again.
        pc.outb(0x40, 10);
        assert!(!pc.line.level());
        pc.outb(0x40, 0);
        assert!(pc.timer.deadline().is_some());
        pc.clock.advance_to(pc.timer.deadline().unwrap());
        pc.run_timers();
        assert_eq!(pc.line.rises(), 2);
    }

    #[test]
    fn mode0_first_byte_stops_counting() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x30);
        pc.outb(0x40, 0x00);
        pc.outb(0x40, 0x10); // 0x1000, loaded on pulse 1
        pc.at_tick(101);
        pc.outb(0x43, 0x00);
        assert_eq!(pc.read_count_word(0x40), 0x1000 - 100);
        pc.outb(0x40, 0x20); // first byte: counting stops, OUT low
        pc.at_tick(500);
        pc.outb(0x43, 0x00);
        assert_eq!(pc.read_count_word(0x40), 0x1000 - 100);
        assert_eq!(pc.timer.deadline(), None);
        pc.outb(0x40, 0x00); // count 0x0020, loaded on pulse 501
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(501 + 0x20)));
    }

    #[test]
    fn counter_latch_holds_running_count() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0xA9);
        pc.outb(0x40, 0x04); // 1193, loaded on pulse 1
                             // 500 us: 500_000 * 1_193_182 / 1e9 = 596.59 -> pulse 596; the CE
                             // has counted 595 pulses since it was loaded: 1193 - 595 = 598.
        pc.clock.advance_to(500_000);
        pc.outb(0x43, 0x00); // counter latch, counter 0
        pc.clock.advance(100_000);
        pc.outb(0x43, 0x00); // ignored: the first latch is unread
        assert_eq!(pc.read_count_word(0x40), 598);
        // Unlatched again: follows the CE. 600 us -> pulse 715: 1193 - 714.
        assert_eq!(ticks_at(600_000), 715);
        assert_eq!(pc.read_count_word(0x40), 1193 - 714);
        // Wraps at the period: pulse 1 + 1193 + 10 reads 1183.
        pc.at_tick(1 + 1193 + 10);
        pc.outb(0x43, 0x00);
        assert_eq!(pc.read_count_word(0x40), 1183);
        // Reading the latch LSB by LSB interleaves with other counters.
        pc.outb(0x43, 0x00);
        let lo = pc.inb(0x40);
        pc.outb(0x43, 0x80); // latch counter 2
        let hi = pc.inb(0x40);
        assert_eq!(u16::from_le_bytes([lo, hi]), 1183);
    }

    #[test]
    fn read_back_status_and_null_count() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x34); // counter 0, LSB/MSB, mode 2, binary
                             // OUT high, NULL COUNT, RW 11, mode 010, binary.
        assert_eq!(pc.status(0), 0x80 | 0x40 | 0x30 | 0x04);
        pc.outb(0x40, 0x10);
        assert_eq!(pc.status(0) & ST_NULL_COUNT, ST_NULL_COUNT);
        pc.outb(0x40, 0x00); // 16, loaded on pulse 1
        assert_eq!(pc.status(0), 0xF4);
        pc.at_tick(1);
        assert_eq!(pc.status(0), 0xB4, "NULL COUNT clears once loaded");
        // A new count in mode 2 waits for the end of the period.
        pc.at_tick(5);
        pc.outb(0x40, 0x08);
        pc.outb(0x40, 0x00);
        assert_eq!(pc.status(0) & ST_NULL_COUNT, ST_NULL_COUNT);
        pc.at_tick(16);
        assert_eq!(pc.status(0) & ST_NULL_COUNT, ST_NULL_COUNT);
        pc.at_tick(17); // reload on pulse 1 + 16
        assert_eq!(pc.status(0) & ST_NULL_COUNT, 0);
        pc.outb(0x43, 0x00);
        assert_eq!(pc.read_count_word(0x40), 8);
        // Count and status together: status first, then LSB, MSB. Mode 2
        // OUT is low for the clock the CE holds 1.
        pc.at_tick(17 + 7);
        pc.outb(0x43, 0xC2);
        assert_eq!(pc.inb(0x40), 0x34);
        assert_eq!(pc.read_count_word(0x40), 1);
        // Read-back of counters 1 and 2 at once, status only; BCD mode 0.
        pc.outb(0x43, 0x51); // counter 1, LSB only, mode 0, BCD
        pc.outb(0x43, 0xB6); // counter 2, LSB/MSB, mode 3, binary
        pc.outb(0x43, 0xC0 | RB_NOT_COUNT | 0x04 | 0x08);
        assert_eq!(pc.inb(0x41), 0x40 | 0x10 | 0x01);
        assert_eq!(pc.inb(0x42), 0x80 | 0x40 | 0x30 | 0x06);
        // A second status latch is ignored until the first is read: counter
        // 0 is in its low clock at pulse 24 and high again at 25.
        pc.outb(0x43, 0xC0 | RB_NOT_COUNT | 0x02);
        pc.at_tick(17 + 8);
        pc.outb(0x43, 0xC0 | RB_NOT_COUNT | 0x02);
        assert_eq!(pc.inb(0x40), 0x34);
        assert_eq!(pc.status(0), 0xB4);
        assert_eq!(pc.inb(0x43), 0, "control register reads 0");
    }

    #[test]
    fn read_back_latch_is_not_repeated_and_control_word_clears_it() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0x00);
        pc.outb(0x40, 0x01); // 256
        pc.at_tick(11);
        pc.outb(0x43, 0xC0 | RB_NOT_STATUS | 0x02); // latch count 0
        pc.at_tick(51);
        pc.outb(0x43, 0xC0 | RB_NOT_STATUS | 0x02); // ignored
        assert_eq!(pc.read_count_word(0x40), 256 - 10);
        pc.outb(0x43, 0x00);
        pc.outb(0x43, 0x34); // reprogramming drops the latch
        pc.at_tick(60);
        pc.outb(0x40, 0x00);
        pc.outb(0x40, 0x02);
        pc.at_tick(71);
        assert_eq!(pc.read_count_word(0x40), 0x200 - 10);
    }

    #[test]
    fn lsb_msb_flip_flops_are_independent() {
        let pc = Pc::new(LostTickPolicy::Discard);
        // Counter 2 with GATE low: mode 0 does not count, the CE is stable.
        pc.outb(0x61, 0x00);
        pc.outb(0x43, 0xB0); // counter 2, LSB/MSB, mode 0
        pc.outb(0x42, 0x34);
        pc.outb(0x42, 0x12);
        pc.at_tick(5);
        assert_eq!(pc.inb(0x42), 0x34);
        assert_eq!(pc.inb(0x42), 0x12);
        assert_eq!(pc.inb(0x42), 0x34);
        // The datasheet's interleaving: read LSB, write LSB, read MSB,
        // write MSB.
        pc.outb(0x42, 0x78);
        assert_eq!(pc.inb(0x42), 0x12);
        pc.outb(0x42, 0x56);
        pc.at_tick(6);
        assert_eq!(pc.read_count_word(0x42), 0x5678);
        // LSB only: the MSB is 0; MSB only: the LSB is 0.
        pc.outb(0x43, 0x90); // counter 2, LSB, mode 0
        pc.outb(0x42, 0x42);
        pc.at_tick(7);
        assert_eq!(pc.inb(0x42), 0x42);
        assert_eq!(pc.inb(0x42), 0x42);
        pc.outb(0x43, 0xA0); // counter 2, MSB, mode 0
        pc.outb(0x42, 0x33);
        pc.at_tick(8);
        assert_eq!(pc.inb(0x42), 0x33);
        pc.outb(0x43, 0x80); // latch: read as the RW mode says (MSB)
        assert_eq!(pc.inb(0x42), 0x33);
        pc.outb(0x43, 0xB0);
        pc.outb(0x43, 0x80);
        assert_eq!(pc.read_count_word(0x42), 0x3300);
    }

    #[test]
    fn bcd_counting() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x35); // counter 0, LSB/MSB, mode 2, BCD
        pc.outb(0x40, 0x00);
        pc.outb(0x40, 0x01); // BCD 0100 = 100 pulses
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(1 + 100)));
        pc.at_tick(1 + 11);
        assert_eq!(pc.read_count_word(0x40), 0x0089);
        pc.at_tick(1 + 100 + 1);
        assert_eq!(pc.read_count_word(0x40), 0x0099);
        // BCD 0 is 10000.
        pc.outb(0x43, 0x35);
        pc.outb(0x40, 0x00);
        pc.outb(0x40, 0x00);
        let t = ticks_at(pc.now());
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(t + 1 + 10_000)));
        pc.at_tick(t + 1 + 1);
        assert_eq!(pc.read_count_word(0x40), 0x9999);
        // Mode 0 wraps to 9999 after terminal count.
        pc.outb(0x43, 0x31);
        pc.outb(0x40, 0x05);
        pc.outb(0x40, 0x00);
        let t = ticks_at(pc.now());
        pc.at_tick(t + 1 + 5);
        assert_eq!(pc.read_count_word(0x40), 0x0000);
        assert!(pc.pit.lock().unwrap().out(0));
        pc.at_tick(t + 1 + 7);
        assert_eq!(pc.read_count_word(0x40), 0x9998);
    }

    #[test]
    fn mode3_square_wave_on_out2_with_gate() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x61, 0x01); // GATE2 high
        pc.outb(0x43, 0xB6); // counter 2, LSB/MSB, mode 3
        pc.outb(0x42, 10);
        pc.outb(0x42, 0); // loaded on pulse 1
                          // Even count: high 5, low 5, from pulse 1.
        for k in 1..=41u64 {
            pc.at_tick(k);
            let expect_high = (k - 1) % 10 < 5;
            assert_eq!(pc.out2(), expect_high, "pulse {k}");
        }
        // CE counts down by two and reloads each half-cycle.
        pc.at_tick(41 + 2);
        pc.outb(0x43, 0x80);
        assert_eq!(pc.read_count_word(0x42), 10 - 4);
        // Odd count 7: high (7 + 1) / 2 = 4, low 3. The new count takes over
        // at the end of the current half-cycle (pulse 46, OUT falls) and
        // starts with the low half.
        pc.outb(0x42, 7);
        pc.outb(0x42, 0);
        let mut seen = Vec::new();
        for k in 44..=60u64 {
            pc.at_tick(k);
            seen.push(pc.out2());
        }
        let h = true;
        let l = false;
        #[rustfmt::skip]
        let want = [
            h, h, // 44, 45: rest of the old high half
            l, l, l, // 46-48: low half of 7
            h, h, h, h, // 49-52: high
            l, l, l, // 53-55
            h, h, h, h, // 56-59
            l, // 60
        ];
        assert_eq!(seen, want);
        // GATE low while OUT2 is low sets it high at once and stops.
        pc.at_tick(61);
        assert!(!pc.out2());
        pc.outb(0x61, 0x00);
        assert!(pc.out2());
        for k in 62..100u64 {
            pc.at_tick(k);
            assert!(pc.out2());
        }
        pc.outb(0x43, 0x80);
        let frozen = pc.read_count_word(0x42);
        pc.at_tick(120);
        pc.outb(0x43, 0x80);
        assert_eq!(pc.read_count_word(0x42), frozen);
        // GATE high again: the count reloads on the next pulse (121) and
        // the square wave restarts with its high half.
        pc.outb(0x61, 0x01);
        for k in 121..=135u64 {
            pc.at_tick(k);
            assert_eq!(pc.out2(), (k - 121) % 7 < 4, "pulse {k}");
        }
    }

    #[test]
    fn mode3_on_irq0_fires_at_both_half_periods() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x36); // counter 0, LSB/MSB, mode 3
        pc.outb(0x40, 0);
        pc.outb(0x40, 0);
        // Count 65536: high 32768, low 32768, from pulse 1.
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(1 + 32768)));
        pc.clock.advance_to(tick_time_ns(1 + 32768));
        pc.run_timers();
        assert!(!pc.line.level());
        assert_eq!(pc.line.rises(), 0);
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(1 + 65536)));
        pc.clock.advance_to(tick_time_ns(1 + 65536));
        pc.run_timers();
        assert!(pc.line.level());
        assert_eq!(pc.line.rises(), 1);
        // 18.2 Hz: 65536 pulses are 54.9 ms.
        let period = tick_time_ns(65536);
        assert!((54_925_000..54_926_000).contains(&period), "{period}");
    }

    #[test]
    fn bios_defaults_are_seabios_mode_2_at_18_2_hz() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.pit.lock().unwrap().program_bios_defaults();
        // Read-back status of counter 0: RW 3 (LSB/MSB), mode 2, binary.
        pc.outb(0x43, 0xE2);
        let status = pc.inb(0x40);
        assert_eq!(status & 0x3F, 0x34, "status {status:#x}");
        // One IRQ 0 edge per 65536 pulses.
        let d = pc.timer.deadline().unwrap();
        pc.clock.advance_to(d);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 1);
        let next = pc.timer.deadline().unwrap();
        assert!(next > d);
    }

    #[test]
    fn mode1_one_shot_triggered_by_gate() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0xB2); // counter 2, LSB/MSB, mode 1
        pc.outb(0x42, 5);
        pc.outb(0x42, 0);
        for k in 1..20 {
            pc.at_tick(k);
            assert!(pc.out2(), "no trigger yet");
        }
        pc.outb(0x61, 0x01); // trigger at pulse 19: loaded on 20
        pc.at_tick(20);
        assert!(!pc.out2());
        pc.at_tick(24);
        assert!(!pc.out2());
        pc.outb(0x43, 0x80);
        assert_eq!(pc.read_count_word(0x42), 1);
        pc.at_tick(25);
        assert!(pc.out2(), "high at terminal count, N pulses after loading");
        // GATE level does not matter, only a rising edge retriggers.
        pc.outb(0x61, 0x00);
        pc.at_tick(40);
        assert!(pc.out2());
        pc.outb(0x61, 0x01); // trigger at 40, loaded on 41
        pc.at_tick(43);
        // Retrigger during the pulse: reloads on 44, low until 49.
        pc.outb(0x61, 0x00);
        pc.outb(0x61, 0x01);
        for k in 44..49 {
            pc.at_tick(k);
            assert!(!pc.out2(), "pulse {k}");
        }
        pc.at_tick(49);
        assert!(pc.out2());
        // A new count does not disturb the pulse; the next trigger uses it.
        pc.outb(0x42, 2);
        pc.outb(0x42, 0);
        pc.outb(0x61, 0x00);
        pc.outb(0x61, 0x01); // loaded on 50
        pc.at_tick(51);
        assert!(!pc.out2());
        pc.at_tick(52);
        assert!(pc.out2());
    }

    #[test]
    fn mode5_strobe_triggered_by_gate() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0xBA); // counter 2, LSB/MSB, mode 5
        pc.outb(0x42, 4);
        pc.outb(0x42, 0);
        pc.at_tick(10);
        assert!(pc.out2());
        pc.outb(0x61, 0x01); // trigger at pulse 10, loaded on 11
        for k in 11..=20u64 {
            pc.at_tick(k);
            assert_eq!(pc.out2(), k != 15, "pulse {k}");
        }
        pc.outb(0x61, 0x00);
        pc.outb(0x61, 0x01); // trigger again at 20, loaded on 21
        pc.at_tick(25);
        assert!(!pc.out2());
        pc.at_tick(26);
        assert!(pc.out2());
    }

    #[test]
    fn mode4_software_strobe_on_irq0() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x38); // counter 0, LSB/MSB, mode 4
        pc.outb(0x40, 3);
        pc.outb(0x40, 0); // loaded on 1, strobe on 4 (N + 1 after the write)
        assert_eq!(pc.status(0) & ST_OUTPUT, ST_OUTPUT);
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(5)));
        pc.at_tick(4);
        assert_eq!(pc.status(0) & ST_OUTPUT, 0, "strobe low for one clock");
        pc.at_tick(5);
        pc.run_timers();
        assert_eq!(pc.status(0) & ST_OUTPUT, ST_OUTPUT);
        assert_eq!(pc.line.rises(), 1);
        assert_eq!(pc.timer.deadline(), None);
        // Writing the count again retriggers it.
        pc.outb(0x40, 3);
        pc.outb(0x40, 0);
        pc.at_tick(10);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 2);
    }

    #[test]
    fn gate_low_freezes_mode0_and_mode4() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x61, 0x01);
        pc.outb(0x43, 0xB0); // counter 2, mode 0
        pc.outb(0x42, 20);
        pc.outb(0x42, 0); // loaded on 1, terminal on 21
        pc.at_tick(11);
        pc.outb(0x61, 0x00); // frozen at 10
        pc.at_tick(100);
        pc.outb(0x43, 0x80);
        assert_eq!(pc.read_count_word(0x42), 10);
        assert!(!pc.out2());
        pc.outb(0x61, 0x01); // resumes: 10 more pulses
        pc.at_tick(109);
        assert!(!pc.out2());
        pc.at_tick(110);
        assert!(pc.out2());
        // Mode 4 with GATE low: loaded but held until GATE goes high.
        pc.outb(0x61, 0x00);
        pc.outb(0x43, 0xB8);
        pc.outb(0x42, 2);
        pc.outb(0x42, 0);
        pc.at_tick(150);
        assert!(pc.out2());
        pc.outb(0x43, 0x80);
        assert_eq!(pc.read_count_word(0x42), 2);
        pc.outb(0x61, 0x01);
        pc.at_tick(152);
        assert!(!pc.out2());
        pc.at_tick(153);
        assert!(pc.out2());
    }

    #[test]
    fn discard_delivers_one_edge_for_missed_periods() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0xA9);
        pc.outb(0x40, 0x04);
        pc.at_tick(1 + 1193 * 10);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 1);
        pc.pit.lock().unwrap().irq_acked();
        assert_eq!(pc.line.rises(), 1);
        assert_eq!(pc.timer.deadline(), Some(tick_time_ns(1 + 1193 * 11)));
        pc.at_tick(1 + 1193 * 11);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 2);
    }

    #[test]
    fn catchup_delivers_missed_periods_on_ack() {
        let pc = Pc::new(LostTickPolicy::Catchup);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0xA9);
        pc.outb(0x40, 0x04);
        pc.at_tick(1 + 1193 * 10);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 1);
        assert_eq!(pc.pit.lock().unwrap().pending_ticks(), 9);
        for i in 2..=10 {
            pc.pit.lock().unwrap().irq_acked();
            assert_eq!(pc.line.rises(), i);
        }
        pc.pit.lock().unwrap().irq_acked();
        assert_eq!(pc.line.rises(), 10);
        assert_eq!(pc.pit.lock().unwrap().pending_ticks(), 0);
        // The next period is delivered when due.
        pc.at_tick(1 + 1193 * 11);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 11);
        // Without an acknowledge, a tick waits.
        pc.at_tick(1 + 1193 * 12);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 11);
        assert_eq!(pc.pit.lock().unwrap().pending_ticks(), 1);
        pc.pit.lock().unwrap().irq_acked();
        assert_eq!(pc.line.rises(), 12);
        // Two periods without an acknowledge: the edge is given up on and
        // the next held-back tick goes out.
        pc.at_tick(1 + 1193 * 15);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 13);
        assert_eq!(pc.pit.lock().unwrap().pending_ticks(), 2);
        // Unmasking drops what is held back.
        pc.pit.lock().unwrap().irq_unmasked();
        assert_eq!(pc.pit.lock().unwrap().pending_ticks(), 0);
        pc.at_tick(1 + 1193 * 16);
        pc.run_timers();
        assert_eq!(pc.line.rises(), 14);
    }

    #[test]
    fn control_word_sets_out_and_line_follows() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 100);
        pc.outb(0x40, 0);
        pc.at_tick(101);
        pc.run_timers();
        assert!(pc.line.level());
        // Mode 0 control word: OUT0 low at once, and the line with it.
        pc.outb(0x43, 0x30);
        assert!(!pc.line.level());
        assert_eq!(pc.timer.deadline(), None);
        // Mode 2 control word: OUT0 high again, a rising edge.
        pc.outb(0x43, 0x34);
        assert!(pc.line.level());
        assert_eq!(pc.line.rises(), 2);
    }

    #[test]
    fn speaker_port_bits() {
        let pc = Pc::new(LostTickPolicy::Discard);
        let a = pc.inb(0x61);
        let b = pc.inb(0x61);
        assert_eq!((a ^ b) & P61_REFRESH, P61_REFRESH, "refresh toggles");
        assert_eq!(a & 0xC0, 0);
        assert_eq!(a & P61_OUT2, P61_OUT2, "OUT2 high at power-up (mode 3)");
        pc.outb(0x61, 0x0F);
        let v = pc.inb(0x61);
        assert_eq!(v & 0x0F, 0x0F);
        assert_eq!(v & 0xC0, 0);
        pc.outb(0x61, 0xF0);
        assert_eq!(pc.inb(0x61) & 0x0F, 0);
        let dump = pc.bus.devices()[1].2.lock().unwrap().dump();
        assert!(dump.starts_with("port 0x61"), "{dump}");
    }

    #[test]
    fn word_access_is_split_into_bytes() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x61, 0);
        pc.outb(0x43, 0x90); // counter 2 LSB only, mode 0, GATE low
        pc.outb(0x43, 0x50); // counter 1 LSB only, mode 0
                             // A word write at 0x41 writes 0x41 then 0x42.
        assert!(pc.bus.write(0x41, &[0x11, 0x22]));
        pc.at_tick(1);
        assert_eq!(pc.inb(0x42), 0x22);
        let mut w = [0u8; 2];
        assert!(pc.bus.read(0x42, &mut w));
        assert_eq!(w, [0x22, 0]);
    }

    #[test]
    fn save_restore_round_trip() {
        let pc = Pc::new(LostTickPolicy::Catchup);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0xA9);
        pc.outb(0x40, 0x04);
        pc.outb(0x43, 0xB6);
        pc.outb(0x42, 0x33);
        pc.at_tick(1 + 1193 * 3 + 17);
        pc.run_timers();
        pc.outb(0x43, 0xC2); // latched count and status left unread
        let saved = pc.pit.lock().unwrap().save_state();
        let deadline = pc.timer.deadline();

        let other = Pc::new(LostTickPolicy::Catchup);
        other.clock.advance_to(pc.now());
        other.pit.lock().unwrap().restore_state(&saved);
        assert_eq!(other.pit.lock().unwrap().save_state(), saved);
        assert_eq!(other.timer.deadline(), deadline);
        assert_eq!(other.line.level(), pc.line.level());
        for port in [0x40, 0x40, 0x40, 0x42, 0x61] {
            assert_eq!(other.inb(port), pc.inb(port));
        }
        assert_eq!(
            other.pit.lock().unwrap().dump(),
            pc.pit.lock().unwrap().dump()
        );
    }

    #[test]
    fn dump_reads_like_info_pit() {
        let pc = Pc::new(LostTickPolicy::Discard);
        pc.outb(0x43, 0x34);
        pc.outb(0x40, 0xA9);
        pc.outb(0x40, 0x04);
        pc.at_tick(11);
        let d = pc.bus.devices()[0].2.lock().unwrap().dump();
        assert!(d.contains("lost ticks discard"), "{d}");
        assert!(d.contains("channel 0: mode 2 (rate generator)"), "{d}");
        assert!(d.contains("count 0x04a9, ce 0x049f"), "{d}");
        assert!(
            d.contains(&format!("next event {} ns", tick_time_ns(1194))),
            "{d}"
        );
        assert!(d.contains("channel 2: mode 3 (square wave)"), "{d}");
        assert!(d.contains("port 0x61: gate2 0"), "{d}");
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn fuzz(policy: LostTickPolicy, seed: u64) {
        let pc = Pc::new(policy);
        let mut rng = Rng(seed);
        for _ in 0..30_000 {
            let r = rng.next();
            let v = (r >> 8) as u8;
            match r % 16 {
                0..=3 => pc.outb(0x40 + (r >> 4) % 4, v),
                // Bias towards useful control words.
                4 => pc.outb(0x43, v | 0x30),
                5..=7 => {
                    pc.inb(0x40 + (r >> 4) % 4);
                }
                8 => pc.outb(0x61, v),
                9 => {
                    pc.inb(0x61);
                }
                10 | 11 => pc.clock.advance((r >> 20) % 3_000_000),
                12 => pc.clock.advance((r >> 20) % 50),
                13 => pc.pit.lock().unwrap().irq_acked(),
                14 => {
                    if r & 0x100 != 0 {
                        pc.pit.lock().unwrap().irq_unmasked();
                    }
                    pc.bus.read(0x40, &mut [0u8; 4]);
                }
                _ => {}
            }
            pc.run_timers();
            if let Some(d) = pc.timer.deadline() {
                assert!(
                    d > pc.now(),
                    "deadline {d} not after a fire at {}",
                    pc.now()
                );
            }
            let p = pc.pit.lock().unwrap();
            assert!(p.pending_ticks() <= MAX_PENDING_TICKS);
            assert_eq!(p.irq0_level(), pc.line.level());
            for c in &p.state.counters {
                assert!(c.synced <= ticks_at(pc.now()));
                if let CountingElement::Running { value, .. } = c.ce {
                    assert!(value <= 0x1_0000);
                }
            }
            let _ = p.dump();
        }
    }

    #[test]
    fn fuzz_random_ports_and_time_never_panics() {
        fuzz(LostTickPolicy::Discard, 0x9E37_79B9_7F4A_7C15);
        fuzz(LostTickPolicy::Catchup, 0x2545_F491_4F6C_DD1D);
    }

    #[test]
    fn restoring_arbitrary_state_never_panics() {
        let pc = Pc::new(LostTickPolicy::Catchup);
        let mut rng = Rng(0xDEAD_BEEF_1234_5678);
        for _ in 0..2_000 {
            let mut s = PitState::power_up();
            for c in &mut s.counters {
                c.mode = rng.next() as u8;
                c.bcd = rng.next() & 1 != 0;
                c.cr = rng.next() as u16;
                c.gate = rng.next() & 1 != 0;
                c.synced = rng.next() >> (rng.next() % 64);
                c.load_at = (rng.next() & 1 != 0).then(|| rng.next() >> (rng.next() % 64));
                c.reload_pending = rng.next() & 1 != 0;
                c.ce = if rng.next() & 1 != 0 {
                    CountingElement::Held {
                        ce: rng.next() as u16,
                        out: rng.next() & 1 != 0,
                    }
                } else {
                    CountingElement::Running {
                        anchor: rng.next() >> (rng.next() % 64),
                        value: rng.next() >> (rng.next() % 64),
                        done: rng.next() & 1 != 0,
                        start_low: rng.next() & 1 != 0,
                    }
                };
            }
            s.pending_ticks = rng.next() as u32;
            pc.pit.lock().unwrap().restore_state(&s);
            pc.clock.advance(rng.next() % 10_000_000);
            pc.run_timers();
            let _ = pc.timer.deadline();
            for port in 0x40..0x44 {
                pc.inb(port);
            }
            pc.outb(0x43, 0xCE);
            pc.inb(0x61);
            pc.outb(0x61, rng.next() as u8);
            pc.pit.lock().unwrap().irq_acked();
            let _ = pc.pit.lock().unwrap().dump();
            assert!(pc.pit.lock().unwrap().pending_ticks() <= MAX_PENDING_TICKS);
        }
    }
}
