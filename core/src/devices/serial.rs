//! 16550A UART (National Semiconductor PC16550D) for COM1: 0x3F8, 8 ports,
//! ISA IRQ 4.
//!
//! Transmission is instantaneous, as in QEMU: a byte written to THR goes
//! straight to the output sink (or, in loopback mode, to the receiver), so
//! THRE and TEMT are set again at once. Reception is fed from a bounded host
//! input queue into the 16-byte receiver FIFO as the guest drains it.
//!
//! The character time-out indication (PC16550D §8.6.3 "FIFO Interrupt Mode
//! Operation") needs time: the UART reads its `SharedClock`, and
//! `Mutex<Serial>` implements [`TimerDevice`] so the machine can fire the
//! time-out while the guest runs (register `Arc<Mutex<Serial>>` with the
//! `TimerSet`).
//!
//! The ISA line: on a PC the chip's INTR output reaches IRQ 4 only through
//! a buffer enabled by the OUT2 pin (MCR bit 3), and Linux's 8250 driver sets
//! OUT2 for that reason. In loopback mode the modem-control output pins are
//! forced inactive (§8.7 MCR bit 4), so the ISA line is low there, as on a
//! real PC.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bus::BusDevice;
use crate::clock::SharedClock;
use crate::irq::IrqLine;
use crate::timer::TimerDevice;

/// Base port of COM1.
pub const COM1_BASE: u64 = 0x3F8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u8 = 4;
/// Number of ports a 16550 decodes.
pub const UART_PORTS: u64 = 8;
/// Depth of the receiver FIFO.
pub const RX_FIFO_SIZE: usize = 16;
/// Bound of the host input queue behind the receiver FIFO.
pub const INPUT_QUEUE_LIMIT: usize = 4096;

/// Baud rate generator input divided by 16: 1.8432 MHz / 16.
const BAUD_BASE: u64 = 115_200;

// Register offsets.
const RBR_THR_DLL: u64 = 0;
const IER_DLM: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

// IER: interrupt enables.
const IER_ERBFI: u8 = 0x01;
const IER_ETBEI: u8 = 0x02;
const IER_ELSI: u8 = 0x04;
const IER_EDSSI: u8 = 0x08;
const IER_MASK: u8 = 0x0F;

// IIR: interrupt identification (bits 3:0) and FIFOs enabled (bits 7:6).
const IIR_NO_INT: u8 = 0x01;
const IIR_RLS: u8 = 0x06;
const IIR_RDA: u8 = 0x04;
const IIR_CTI: u8 = 0x0C;
const IIR_THRE: u8 = 0x02;
const IIR_MS: u8 = 0x00;
const IIR_FIFOS_ENABLED: u8 = 0xC0;

// FCR.
const FCR_FIFO_ENABLE: u8 = 0x01;
const FCR_RX_RESET: u8 = 0x02;
const FCR_DMA_MODE: u8 = 0x08;
const FCR_TRIGGER: u8 = 0xC0;

// LCR.
const LCR_DLAB: u8 = 0x80;

// MCR.
const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1F;

// LSR.
const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_PE: u8 = 0x04;
const LSR_FE: u8 = 0x08;
const LSR_BI: u8 = 0x10;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LSR_ERRORS: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;

// MSR.
const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_DELTAS: u8 = 0x0F;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// The modem inputs of a connected terminal: carrier, data set ready and
/// clear to send asserted, no ring (what QEMU reports without a modem).
const EXTERNAL_MODEM_INPUTS: u8 = MSR_DCD | MSR_DSR | MSR_CTS;

/// Everything a 16550A holds, saved and restored as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialState {
    /// Interrupt Enable Register (bits 3:0).
    pub ier: u8,
    /// FIFO Control Register as programmed: FIFO enable, DMA mode, trigger.
    pub fcr: u8,
    /// Line Control Register.
    pub lcr: u8,
    /// Modem Control Register (bits 4:0).
    pub mcr: u8,
    /// Line Status Register without DR (DR is "receiver FIFO not empty").
    pub lsr: u8,
    /// Modem Status Register: deltas (3:0) and the current inputs (7:4).
    pub msr: u8,
    /// Scratch Register.
    pub scr: u8,
    /// Divisor Latch, low and high byte.
    pub dll: u8,
    pub dlm: u8,
    /// The last byte read from RBR (what an empty receiver reads as).
    pub rbr: u8,
    /// Receiver FIFO (at most one byte in 16450 mode).
    pub rx_fifo: VecDeque<u8>,
    /// Host input not yet in the receiver (bounded by INPUT_QUEUE_LIMIT).
    pub input_queue: VecDeque<u8>,
    /// Paced input: a queued byte reaches the receiver only when the guest
    /// asks for one (reads LSR or enables the receive interrupt with the
    /// receiver empty), so the bytes arrive at the same points of the
    /// guest's run whatever the host's timing (`tandem diff --input`).
    pub paced_input: bool,
    /// A THR-empty interrupt is pending (cleared by reading IIR when it is
    /// the reported source, or by writing THR).
    pub thre_pending: bool,
    /// A character time-out indication is pending.
    pub timeout_pending: bool,
    /// Clock time at which the character time-out occurs if nothing is
    /// received or read before.
    pub rx_timeout_at: Option<u64>,
    /// Level of the ISA line as last driven.
    pub irq_level: bool,
}

impl Default for SerialState {
    /// The reset state (PC16550D Table IV "UART Reset Configuration"); the
    /// divisor is 12 (9600 baud) as a BIOS leaves it.
    fn default() -> Self {
        SerialState {
            ier: 0,
            fcr: 0,
            lcr: 0,
            mcr: 0,
            lsr: LSR_THRE | LSR_TEMT,
            msr: EXTERNAL_MODEM_INPUTS,
            scr: 0,
            dll: 12,
            dlm: 0,
            rbr: 0,
            rx_fifo: VecDeque::with_capacity(RX_FIFO_SIZE),
            input_queue: VecDeque::new(),
            paced_input: false,
            thre_pending: false,
            timeout_pending: false,
            rx_timeout_at: None,
            irq_level: false,
        }
    }
}

/// A 16550A UART.
pub struct Serial {
    st: SerialState,
    irq: Arc<dyn IrqLine>,
    sink: Box<dyn Write + Send>,
    clock: SharedClock,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").field("state", &self.st).finish()
    }
}

impl Serial {
    /// A UART in its reset state driving `irq`, writing transmitted bytes to
    /// `sink` and timing the character time-out on `clock`.
    pub fn new(irq: Arc<dyn IrqLine>, sink: Box<dyn Write + Send>, clock: SharedClock) -> Self {
        Serial {
            st: SerialState::default(),
            irq,
            sink,
            clock,
        }
    }

    /// Queues host input (typed characters) for the receiver and returns how
    /// many bytes were taken: the queue is bounded, so a caller with more
    /// must retry once the guest has drained some (see [`Self::wants_input`]).
    pub fn push_input(&mut self, bytes: &[u8]) -> usize {
        let room = INPUT_QUEUE_LIMIT.saturating_sub(self.st.input_queue.len());
        let n = room.min(bytes.len());
        self.st.input_queue.extend(bytes.iter().take(n));
        let now = self.clock.now_ns();
        self.feed_input(now);
        self.update_irq();
        n
    }

    /// Paces host input (see [`SerialState::paced_input`]).
    pub fn set_paced_input(&mut self, on: bool) {
        self.st.paced_input = on;
    }

    /// Whether the host input queue has room.
    pub fn wants_input(&self) -> bool {
        self.st.input_queue.len() < INPUT_QUEUE_LIMIT
    }

    /// Level of the ISA line.
    pub fn irq_level(&self) -> bool {
        self.st.irq_level
    }

    pub fn save_state(&self) -> SerialState {
        self.st.clone()
    }

    /// Restores `state` (clamping anything out of range) and drives the line
    /// to the restored level.
    pub fn restore_state(&mut self, state: SerialState) {
        let mut st = state;
        st.ier &= IER_MASK;
        st.mcr &= MCR_MASK;
        st.lsr &= !LSR_DR;
        st.fcr &= FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_TRIGGER;
        let cap = if st.fcr & FCR_FIFO_ENABLE != 0 {
            RX_FIFO_SIZE
        } else {
            1
        };
        st.rx_fifo.truncate(cap);
        st.input_queue.truncate(INPUT_QUEUE_LIMIT);
        self.st = st;
        let level = self.line_level();
        self.st.irq_level = level;
        self.irq.set_level(level);
    }

    fn fifo_enabled(&self) -> bool {
        self.st.fcr & FCR_FIFO_ENABLE != 0
    }

    fn loopback(&self) -> bool {
        self.st.mcr & MCR_LOOP != 0
    }

    fn rx_capacity(&self) -> usize {
        if self.fifo_enabled() {
            RX_FIFO_SIZE
        } else {
            1
        }
    }

    /// Receiver FIFO trigger level (FCR bits 7:6).
    fn rx_trigger(&self) -> usize {
        match self.st.fcr >> 6 {
            0 => 1,
            1 => 4,
            2 => 8,
            _ => 14,
        }
    }

    fn divisor(&self) -> u16 {
        u16::from_le_bytes([self.st.dll, self.st.dlm])
    }

    /// Time of one character frame: start bit, 5-8 data bits, parity, and
    /// 1, 1.5 or 2 stop bits (LCR), at BAUD_BASE / divisor. A divisor of
    /// zero is not a valid setting; it counts as 1.
    fn char_time_ns(&self) -> u64 {
        let lcr = self.st.lcr;
        let divisor = u64::from(self.divisor().max(1));
        let data_bits = 5 + u64::from(lcr & 0x03);
        let parity = u64::from((lcr >> 3) & 1);
        let stop_half_bits = match (lcr & 0x04 != 0, data_bits) {
            (false, _) => 2,
            (true, 5) => 3,
            (true, _) => 4,
        };
        let half_bits = 2 * (1 + data_bits + parity) + stop_half_bits;
        half_bits * divisor * 1_000_000_000 / (2 * BAUD_BASE)
    }

    /// The time-out is four character times after the last character was
    /// received or read (§8.6.3).
    fn timeout_deadline(&self, now: u64) -> u64 {
        now.saturating_add(4 * self.char_time_ns())
    }

    /// Raises the character time-out indication if its time has come.
    fn check_timeout(&mut self, now: u64) {
        if let Some(at) = self.st.rx_timeout_at {
            if now >= at {
                self.st.rx_timeout_at = None;
                if self.fifo_enabled() && !self.st.rx_fifo.is_empty() {
                    self.st.timeout_pending = true;
                }
            }
        }
    }

    /// A character reaches the receiver (from the line or the loopback).
    fn receive(&mut self, byte: u8, now: u64) {
        if self.st.rx_fifo.len() >= self.rx_capacity() {
            self.st.lsr |= LSR_OE;
            if !self.fifo_enabled() {
                // 16450 mode: the new character overwrites RBR (§8.4 LSR
                // bit 1). In FIFO mode it is lost in the shift register.
                self.st.rx_fifo.clear();
                self.st.rx_fifo.push_back(byte);
            }
        } else {
            self.st.rx_fifo.push_back(byte);
        }
        // Once a time-out has occurred only a read clears it; otherwise a
        // received character restarts the timer (§8.6.3).
        if self.fifo_enabled() && !self.st.timeout_pending {
            self.st.rx_timeout_at = Some(self.timeout_deadline(now));
        }
    }

    /// Moves host input into the receiver while there is room. In loopback
    /// mode the receiver is disconnected from the line.
    fn feed_input(&mut self, now: u64) {
        if self.loopback() || self.st.paced_input {
            return;
        }
        while self.st.rx_fifo.len() < self.rx_capacity() {
            let Some(b) = self.st.input_queue.pop_front() else {
                break;
            };
            self.receive(b, now);
        }
    }

    /// The interrupt the IIR reports, by priority (PC16550D Table IV):
    /// receiver line status, received data available or character
    /// time-out, THR empty, modem status.
    fn interrupt_id(&self) -> u8 {
        let s = &self.st;
        let data = !s.rx_fifo.is_empty();
        if s.ier & IER_ELSI != 0 && s.lsr & LSR_ERRORS != 0 {
            IIR_RLS
        } else if s.ier & IER_ERBFI != 0
            && data
            && (!self.fifo_enabled() || s.rx_fifo.len() >= self.rx_trigger())
        {
            IIR_RDA
        } else if s.ier & IER_ERBFI != 0 && s.timeout_pending {
            IIR_CTI
        } else if s.ier & IER_ETBEI != 0 && s.thre_pending {
            IIR_THRE
        } else if s.ier & IER_EDSSI != 0 && s.msr & MSR_DELTAS != 0 {
            IIR_MS
        } else {
            IIR_NO_INT
        }
    }

    fn iir(&self) -> u8 {
        let fifo = if self.fifo_enabled() {
            IIR_FIFOS_ENABLED
        } else {
            0
        };
        self.interrupt_id() | fifo
    }

    fn lsr(&self) -> u8 {
        let dr = if self.st.rx_fifo.is_empty() {
            0
        } else {
            LSR_DR
        };
        self.st.lsr | dr
    }

    /// INTR gated by the OUT2 pin, as wired on a PC.
    fn line_level(&self) -> bool {
        self.interrupt_id() != IIR_NO_INT && self.st.mcr & MCR_OUT2 != 0 && !self.loopback()
    }

    fn update_irq(&mut self) {
        let level = self.line_level();
        if level != self.st.irq_level {
            self.st.irq_level = level;
            self.irq.set_level(level);
        }
    }

    /// The modem-status inputs: from the outside, or in loopback mode from
    /// the modem-control outputs (DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD).
    fn modem_inputs(&self) -> u8 {
        if !self.loopback() {
            return EXTERNAL_MODEM_INPUTS;
        }
        let mcr = self.st.mcr;
        let mut v = 0;
        if mcr & MCR_DTR != 0 {
            v |= MSR_DSR;
        }
        if mcr & MCR_RTS != 0 {
            v |= MSR_CTS;
        }
        if mcr & MCR_OUT1 != 0 {
            v |= MSR_RI;
        }
        if mcr & MCR_OUT2 != 0 {
            v |= MSR_DCD;
        }
        v
    }

    /// Latches new modem inputs and their delta bits; TERI is set on the
    /// trailing edge of RI only (§8.8 MSR bit 2).
    fn update_msr(&mut self) {
        let old = self.st.msr & 0xF0;
        let new = self.modem_inputs();
        let changed = old ^ new;
        let mut deltas = self.st.msr & MSR_DELTAS;
        if changed & MSR_CTS != 0 {
            deltas |= MSR_DCTS;
        }
        if changed & MSR_DSR != 0 {
            deltas |= MSR_DDSR;
        }
        if changed & MSR_DCD != 0 {
            deltas |= MSR_DDCD;
        }
        if old & MSR_RI != 0 && new & MSR_RI == 0 {
            deltas |= MSR_TERI;
        }
        self.st.msr = new | deltas;
    }

    fn transmit(&mut self, byte: u8, now: u64) {
        // Writing THR clears a pending THRE interrupt (§8.6.2); the
        // instantaneous transmission empties THR again at once, so the
        // interrupt comes back, as on a real 16550 once the byte moves to
        // the shift register.
        self.st.thre_pending = false;
        self.st.lsr &= !(LSR_THRE | LSR_TEMT);
        self.update_irq();
        if self.loopback() {
            self.receive(byte, now);
        } else {
            // A closed stdout must not stop the guest: ignore errors.
            let _ = self.sink.write_all(&[byte]);
            let _ = self.sink.flush();
        }
        self.st.lsr |= LSR_THRE | LSR_TEMT;
        self.st.thre_pending = true;
    }

    fn read_rbr(&mut self, now: u64) -> u8 {
        if let Some(b) = self.st.rx_fifo.pop_front() {
            self.st.rbr = b;
        }
        // A read clears the time-out indication and restarts its timer.
        self.st.timeout_pending = false;
        self.st.rx_timeout_at = if self.fifo_enabled() && !self.st.rx_fifo.is_empty() {
            Some(self.timeout_deadline(now))
        } else {
            None
        };
        self.feed_input(now);
        self.st.rbr
    }

    /// Paced input: one queued byte into an empty receiver.
    fn feed_paced(&mut self, now: u64) {
        if self.st.paced_input && !self.loopback() && self.st.rx_fifo.is_empty() {
            if let Some(b) = self.st.input_queue.pop_front() {
                self.receive(b, now);
            }
        }
    }

    fn write_ier(&mut self, value: u8, now: u64) {
        let old = self.st.ier;
        self.st.ier = value & IER_MASK;
        if (old ^ self.st.ier) & self.st.ier & IER_ERBFI != 0 {
            self.feed_paced(now);
        }
        // Enabling ETBEI while THR is empty makes a THRE interrupt pending
        // even if one was cleared by reading IIR before (QEMU and Bochs do
        // this on the rising edge; Linux's UART_BUG_THRE probe expects it).
        if (old ^ self.st.ier) & IER_ETBEI != 0 {
            self.st.thre_pending = self.st.ier & IER_ETBEI != 0 && self.st.lsr & LSR_THRE != 0;
        }
    }

    fn write_fcr(&mut self, value: u8, now: u64) {
        let was = self.fifo_enabled();
        let enable = value & FCR_FIFO_ENABLE != 0;
        // FCR0 must be 1 for the other bits to be programmed (§8.5).
        if !enable && !was {
            return;
        }
        // Changing FCR0 clears both FIFOs.
        let clear_rx = enable != was || value & FCR_RX_RESET != 0;
        self.st.fcr = if enable {
            value & (FCR_FIFO_ENABLE | FCR_DMA_MODE | FCR_TRIGGER)
        } else {
            0
        };
        if clear_rx {
            self.st.rx_fifo.clear();
            self.st.lsr &= !LSR_BI;
            self.st.timeout_pending = false;
            self.st.rx_timeout_at = None;
        }
        // The transmitter is always empty: a transmit reset changes nothing.
        self.feed_input(now);
    }

    fn write_mcr(&mut self, value: u8, now: u64) {
        let was_loop = self.loopback();
        self.st.mcr = value & MCR_MASK;
        self.update_msr();
        if was_loop && !self.loopback() {
            self.feed_input(now);
        }
    }

    fn read_reg(&mut self, offset: u64, now: u64) -> u8 {
        let dlab = self.st.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.st.dll,
            RBR_THR_DLL => self.read_rbr(now),
            IER_DLM if dlab => self.st.dlm,
            IER_DLM => self.st.ier,
            IIR_FCR => {
                let v = self.iir();
                if v & 0x0F == IIR_THRE {
                    self.st.thre_pending = false;
                }
                v
            }
            LCR => self.st.lcr,
            MCR => self.st.mcr,
            LSR => {
                self.feed_paced(now);
                let v = self.lsr();
                self.st.lsr &= !LSR_ERRORS;
                v
            }
            MSR => {
                let v = self.st.msr;
                self.st.msr &= !MSR_DELTAS;
                v
            }
            SCR => self.st.scr,
            _ => 0xFF,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u8, now: u64) {
        let dlab = self.st.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR_DLL if dlab => self.st.dll = value,
            RBR_THR_DLL => self.transmit(value, now),
            IER_DLM if dlab => self.st.dlm = value,
            IER_DLM => self.write_ier(value, now),
            IIR_FCR => self.write_fcr(value, now),
            LCR => self.st.lcr = value,
            MCR => self.write_mcr(value, now),
            // LSR and MSR are read-only (writes are for factory test).
            LSR | MSR => {}
            SCR => self.st.scr = value,
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    fn name(&self) -> &'static str {
        "uart"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        self.check_timeout(now);
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.read_reg(offset.saturating_add(i as u64), now);
        }
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        self.check_timeout(now);
        for (i, &v) in data.iter().enumerate() {
            self.write_reg(offset.saturating_add(i as u64), v, now);
        }
        self.update_irq();
    }

    fn dump(&self) -> String {
        let s = &self.st;
        let divisor = self.divisor();
        let baud = BAUD_BASE.checked_div(u64::from(divisor)).unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "16550A: IER={:02x} IIR={:02x} FCR={:02x} LCR={:02x} MCR={:02x} LSR={:02x} MSR={:02x} SCR={:02x}",
            s.ier,
            self.iir(),
            s.fcr,
            s.lcr,
            s.mcr,
            self.lsr(),
            s.msr,
            s.scr
        );
        let _ = writeln!(
            out,
            "  divisor={divisor} ({baud} baud) fifo={} trigger={} rx={}/{} input-queue={} thre-pending={} timeout-pending={} irq={}",
            if self.fifo_enabled() { "on" } else { "off" },
            self.rx_trigger(),
            s.rx_fifo.len(),
            self.rx_capacity(),
            s.input_queue.len(),
            s.thre_pending,
            s.timeout_pending,
            u8::from(s.irq_level)
        );
        out
    }
}

/// The character time-out, fired by the machine's `TimerSet`.
impl TimerDevice for Mutex<Serial> {
    fn deadline(&self) -> Option<u64> {
        let s = self.lock().unwrap_or_else(|p| p.into_inner());
        s.st.rx_timeout_at
    }

    fn fire(&self, now: u64) {
        let mut s = self.lock().unwrap_or_else(|p| p.into_inner());
        s.check_timeout(now);
        s.update_irq();
    }
}

/// Starts a detached thread that reads the process's stdin and pushes the
/// bytes into `serial`, calling `on_input` after each push (the machine
/// rings the vCPU's doorbell there, and re-arms its timers so the
/// character time-out is seen). Only a terminal, a pipe, a socket or a
/// regular file is read; with stdin closed or on /dev/null nothing starts.
/// Terminal modes are left unchanged. The thread never holds up process
/// exit: it is not joined, and process exit ends it.
pub fn spawn_stdin_reader(
    serial: Arc<Mutex<Serial>>,
    on_input: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    use std::io::{IsTerminal, Read};
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;

    let stdin = std::io::stdin();
    let is_terminal = stdin.is_terminal();
    // A duplicate of fd 0, so we can fstat it and read it unbuffered
    // without unsafe code. Failure means stdin is closed.
    let Ok(fd) = stdin.as_fd().try_clone_to_owned() else {
        return Ok(());
    };
    let mut file = std::fs::File::from(fd);
    let kind = file.metadata()?.file_type();
    if !(is_terminal || kind.is_fifo() || kind.is_socket() || kind.is_file()) {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("tandem-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                let mut rest = buf.get(..n).unwrap_or_default();
                while !rest.is_empty() {
                    let taken = {
                        let mut s = serial.lock().unwrap_or_else(|p| p.into_inner());
                        s.push_input(rest)
                    };
                    if taken > 0 {
                        on_input();
                        rest = rest.get(taken..).unwrap_or_default();
                    } else {
                        // The guest is not draining: wait, keeping memory
                        // bounded rather than dropping typed input.
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })?;
    Ok(())
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
    impl RecLine {
        fn level(&self) -> bool {
            self.level.load(Ordering::SeqCst)
        }
        fn take(&self) -> Vec<bool> {
            std::mem::take(&mut *self.changes.lock().unwrap())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        uart: Serial,
        line: Arc<RecLine>,
        out: Sink,
        clock: Arc<VirtualClock>,
    }

    fn rig() -> Rig {
        let line = Arc::new(RecLine::default());
        let out = Sink::default();
        let clock = Arc::new(VirtualClock::new());
        let uart = Serial::new(line.clone(), Box::new(out.clone()), clock.clone());
        Rig {
            uart,
            line,
            out,
            clock,
        }
    }

    impl Rig {
        fn rd(&mut self, off: u64) -> u8 {
            let mut b = [0u8];
            self.uart.read(off, &mut b);
            b[0]
        }
        fn wr(&mut self, off: u64, v: u8) {
            self.uart.write(off, &[v]);
        }
        fn output(&self) -> Vec<u8> {
            self.out.0.lock().unwrap().clone()
        }
    }

    #[test]
    fn reset_state() {
        let mut r = rig();
        assert_eq!(r.rd(IIR_FCR), 0x01);
        assert_eq!(r.rd(LSR), 0x60);
        assert_eq!(r.rd(MSR) & 0xF0, 0xB0);
        assert_eq!(r.rd(IER_DLM), 0);
        assert!(!r.line.level());
    }

    /// The probe and start-up sequence of Linux's 8250 driver
    /// (autoconfig, autoconfig_16550a, serial8250_do_startup).
    #[test]
    fn linux_8250_probe_and_startup() {
        let mut r = rig();
        // Existence test: IER reads back what was written, masked to 0x0F.
        r.wr(IER_DLM, 0);
        assert_eq!(r.rd(IER_DLM) & 0x0F, 0);
        r.wr(IER_DLM, 0x0F);
        assert_eq!(r.rd(IER_DLM) & 0x0F, 0x0F);
        r.wr(IER_DLM, 0);
        // Loopback test: MCR = LOOP | OUT2 | RTS gives DCD | CTS.
        r.wr(MCR, MCR_LOOP | 0x0A);
        assert_eq!(r.rd(MSR) & 0xF0, MSR_DCD | MSR_CTS);
        r.wr(MCR, 0);
        // FIFO probe: IIR bits 7:6 = 3 is a 16550A.
        r.wr(IIR_FCR, FCR_FIFO_ENABLE);
        assert_eq!(r.rd(IIR_FCR) >> 6, 3);
        // No EFR behind LCR=0xBF: offset 2 still reads IIR (non-zero).
        r.wr(LCR, 0xBF);
        assert_ne!(r.rd(IIR_FCR), 0);
        r.wr(LCR, 0);
        // Not a 16750: bit 5 of IIR never sets.
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | 0x20);
        assert_eq!(r.rd(IIR_FCR) & 0xE0, 0xC0);
        r.wr(LCR, 0x80);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | 0x20);
        r.wr(LCR, 0);
        assert_eq!(r.rd(IIR_FCR) & 0xE0, 0xC0);
        // Not an XScale: IER bit 6 does not stick.
        r.wr(IER_DLM, 0x40);
        assert_eq!(r.rd(IER_DLM) & 0x40, 0);
        r.wr(IER_DLM, 0);
        // Clear FIFOs, clear interrupts, LSR is not 0xff.
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | FCR_RX_RESET | 0x04);
        r.wr(IIR_FCR, 0);
        r.rd(LSR);
        r.rd(RBR_THR_DLL);
        r.rd(IIR_FCR);
        r.rd(MSR);
        assert_ne!(r.rd(LSR), 0xFF);
        // 115200 8N1, DTR | RTS | OUT2.
        r.wr(LCR, 0x80 | 0x03);
        r.wr(RBR_THR_DLL, 1);
        r.wr(IER_DLM, 0);
        r.wr(LCR, 0x03);
        r.wr(MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | 0x80);
        // UART_BUG_THRE probe: THRE re-asserts after IER toggling.
        r.line.take();
        r.wr(IER_DLM, IER_ETBEI);
        assert_eq!(r.rd(IIR_FCR), 0xC2);
        assert_eq!(r.rd(IIR_FCR), 0xC1, "reading IIR cleared THRE");
        r.wr(IER_DLM, 0);
        r.wr(IER_DLM, IER_ETBEI);
        let iir = r.rd(IIR_FCR);
        r.wr(IER_DLM, 0);
        assert_eq!(iir & IIR_NO_INT, 0, "THRE re-asserted");
        assert_eq!(r.line.take(), vec![true, false, true, false]);
        r.wr(IER_DLM, IER_ELSI | IER_ERBFI);
        for &b in b"ok\n" {
            r.wr(RBR_THR_DLL, b);
        }
        assert_eq!(r.output(), b"ok\n");
        assert_eq!(r.rd(LSR) & 0x60, 0x60);
        assert!(!r.line.level());
    }

    #[test]
    fn thre_interrupt_on_off_and_out2_gating() {
        let mut r = rig();
        r.wr(IER_DLM, IER_ETBEI);
        // INTR is active but OUT2 is low: the ISA line stays low.
        assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_THRE);
        assert!(!r.line.level());
        // Reading IIR cleared it; re-enable and raise OUT2.
        r.wr(IER_DLM, 0);
        r.wr(IER_DLM, IER_ETBEI);
        r.wr(MCR, MCR_OUT2);
        assert!(r.line.level());
        r.wr(MCR, 0);
        assert!(!r.line.level());
        r.wr(MCR, MCR_OUT2);
        assert!(r.line.level());
        r.line.take();
        // Writing THR clears the interrupt; the instant transmission sets
        // it again: one pulse.
        r.wr(RBR_THR_DLL, b'x');
        assert_eq!(r.line.take(), vec![false, true]);
        assert_eq!(r.output(), b"x");
        // Reading IIR while THRE is the source clears it.
        assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_THRE);
        assert!(!r.line.level());
        assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_NO_INT);
        // Disabling ETBEI lowers a pending THRE.
        r.wr(RBR_THR_DLL, b'y');
        assert!(r.line.level());
        r.wr(IER_DLM, 0);
        assert!(!r.line.level());
        // The line was only driven on changes.
        let changes = r.line.take();
        assert!(changes.windows(2).all(|w| w[0] != w[1]), "{changes:?}");
    }

    #[test]
    fn fifo_fill_to_sixteen_then_overrun() {
        let mut r = rig();
        r.wr(MCR, MCR_LOOP);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | 0xC0); // trigger 14
        r.wr(IER_DLM, IER_ERBFI | IER_ELSI);
        for i in 0..13u8 {
            r.wr(RBR_THR_DLL, i);
        }
        assert_eq!(r.rd(LSR) & LSR_DR, LSR_DR);
        assert_eq!(r.rd(IIR_FCR), 0xC1, "below the trigger level");
        r.wr(RBR_THR_DLL, 13);
        assert_eq!(r.rd(IIR_FCR), 0xC4, "trigger level reached");
        r.wr(RBR_THR_DLL, 14);
        r.wr(RBR_THR_DLL, 15);
        assert_eq!(r.rd(LSR) & LSR_OE, 0, "16 bytes fit");
        r.wr(RBR_THR_DLL, 16);
        assert_eq!(r.rd(IIR_FCR), 0xC6, "overrun: receiver line status first");
        assert_eq!(r.rd(LSR) & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(r.rd(LSR) & LSR_OE, 0, "reading LSR cleared OE");
        assert_eq!(r.rd(IIR_FCR), 0xC4);
        let got: Vec<u8> = (0..16).map(|_| r.rd(RBR_THR_DLL)).collect();
        assert_eq!(got, (0..16).collect::<Vec<u8>>(), "the 17th byte was lost");
        assert_eq!(r.rd(LSR) & LSR_DR, 0);
        assert_eq!(r.rd(IIR_FCR), 0xC1);
    }

    #[test]
    fn overrun_without_fifo_overwrites_rbr() {
        let mut r = rig();
        r.wr(MCR, MCR_LOOP);
        r.wr(RBR_THR_DLL, 1);
        r.wr(RBR_THR_DLL, 2);
        assert_eq!(r.rd(LSR) & (LSR_OE | LSR_DR), LSR_OE | LSR_DR);
        assert_eq!(r.rd(RBR_THR_DLL), 2);
        assert_eq!(r.rd(LSR) & LSR_DR, 0);
        // An empty receiver reads the last byte again.
        assert_eq!(r.rd(RBR_THR_DLL), 2);
    }

    #[test]
    fn trigger_levels() {
        for (fcr, level) in [(0x01u8, 1usize), (0x41, 4), (0x81, 8), (0xC1, 14)] {
            let mut r = rig();
            r.wr(MCR, MCR_LOOP);
            r.wr(IIR_FCR, fcr);
            r.wr(IER_DLM, IER_ERBFI);
            for i in 0..level - 1 {
                r.wr(RBR_THR_DLL, i as u8);
            }
            assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_NO_INT, "fcr {fcr:#x}");
            r.wr(RBR_THR_DLL, 0xAA);
            assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_RDA, "fcr {fcr:#x}");
            r.rd(RBR_THR_DLL);
            assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_NO_INT, "fcr {fcr:#x}");
        }
    }

    #[test]
    fn fifo_enable_and_clear() {
        let mut r = rig();
        r.wr(MCR, MCR_LOOP);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE);
        r.wr(RBR_THR_DLL, 1);
        r.wr(RBR_THR_DLL, 2);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | FCR_RX_RESET);
        assert_eq!(r.rd(LSR) & LSR_DR, 0);
        r.wr(RBR_THR_DLL, 3);
        // Disabling the FIFOs clears them and the IIR FIFO bits.
        r.wr(IIR_FCR, 0);
        assert_eq!(r.rd(LSR) & LSR_DR, 0);
        assert_eq!(r.rd(IIR_FCR) & 0xC0, 0);
        // With FCR0 = 0 the other bits are not programmed.
        r.wr(RBR_THR_DLL, 4);
        r.wr(IIR_FCR, FCR_RX_RESET);
        assert_eq!(r.rd(RBR_THR_DLL), 4);
    }

    #[test]
    fn paced_input_arrives_when_the_guest_asks_for_it() {
        let mut r = rig();
        r.uart.set_paced_input(true);
        assert_eq!(r.uart.push_input(b"ab"), 2);
        // A FIFO reset (a driver's init) loses nothing: nothing arrived yet.
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | FCR_RX_RESET);
        assert_eq!(r.uart.save_state().rx_fifo.len(), 0);
        // Polling LSR with the receiver empty brings one byte.
        assert_ne!(r.rd(LSR) & LSR_DR, 0);
        assert_eq!(r.rd(RBR_THR_DLL), b'a');
        assert_eq!(r.uart.save_state().rx_fifo.len(), 0, "one byte at a time");
        // Enabling the receive interrupt with the receiver empty does too.
        r.wr(MCR, MCR_OUT2);
        r.wr(IER_DLM, IER_ERBFI);
        assert!(r.line.level());
        assert_eq!(r.rd(RBR_THR_DLL), b'b');
        assert_eq!(r.rd(LSR) & LSR_DR, 0, "the queue is empty");
    }

    #[test]
    fn character_timeout() {
        let mut r = rig();
        r.wr(LCR, 0x83);
        r.wr(RBR_THR_DLL, 1); // 115200 baud, 8N1: 10 bits = 86.8 us
        r.wr(LCR, 0x03);
        r.wr(MCR, MCR_OUT2);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | 0x80); // trigger 8
        r.wr(IER_DLM, IER_ERBFI);
        assert_eq!(r.uart.push_input(b"abc"), 3);
        assert_eq!(r.rd(IIR_FCR), 0xC1);
        let four_chars = 4 * (10 * 1_000_000_000 / 115_200);
        let uart = Mutex::new(r.uart);
        assert_eq!(uart.deadline(), Some(four_chars));
        r.clock.advance(four_chars - 1);
        uart.fire(r.clock.now_ns());
        assert!(!r.line.level());
        r.clock.advance(1);
        uart.fire(r.clock.now_ns());
        assert!(r.line.level(), "time-out raised the line");
        assert_eq!(uart.deadline(), None);
        r.uart = uart.into_inner().unwrap();
        assert_eq!(r.rd(IIR_FCR), 0xCC);
        assert_eq!(r.rd(RBR_THR_DLL), b'a');
        assert_eq!(r.rd(IIR_FCR), 0xC1, "a read cleared the time-out");
        assert!(!r.line.level());
        // Without reads, the time-out comes again four characters later,
        // noticed on any register access too.
        r.clock.advance(four_chars);
        assert_eq!(r.rd(IIR_FCR), 0xCC);
        assert_eq!(r.rd(RBR_THR_DLL), b'b');
        assert_eq!(r.rd(RBR_THR_DLL), b'c');
        r.clock.advance(10 * four_chars);
        assert_eq!(r.rd(IIR_FCR), 0xC1, "no time-out with an empty FIFO");
    }

    #[test]
    fn shared_uart_is_a_bus_device_and_a_timer() {
        let r = rig();
        let shared = Arc::new(Mutex::new(r.uart));
        let timer: Arc<dyn TimerDevice> = shared.clone();
        let dev: crate::bus::SharedDevice = shared.clone();
        assert_eq!(dev.lock().unwrap().name(), "uart");
        assert_eq!(timer.deadline(), None);
        shared.lock().unwrap().write(IIR_FCR, &[FCR_FIFO_ENABLE]);
        shared.lock().unwrap().push_input(b"a");
        assert!(timer.deadline().is_some());
    }

    #[test]
    fn loopback_modem_lines_and_deltas() {
        let mut r = rig();
        r.rd(MSR);
        r.wr(IER_DLM, IER_EDSSI);
        r.wr(MCR, MCR_LOOP | MCR_DTR);
        // CTS and DCD fell, DSR stayed: deltas for CTS and DCD.
        assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_MS);
        assert_eq!(r.rd(MSR), MSR_DSR | MSR_DCTS | MSR_DDCD);
        assert_eq!(r.rd(MSR), MSR_DSR, "reading MSR cleared the deltas");
        assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_NO_INT);
        r.wr(MCR, MCR_LOOP | MCR_OUT1 | MCR_RTS | MCR_OUT2);
        assert_eq!(
            r.rd(MSR),
            MSR_RI | MSR_CTS | MSR_DCD | MSR_DCTS | MSR_DDSR | MSR_DDCD
        );
        r.wr(MCR, MCR_LOOP | MCR_RTS | MCR_OUT2);
        assert_eq!(r.rd(MSR), MSR_CTS | MSR_DCD | MSR_TERI, "RI trailing edge");
        // In loopback the OUT2 pin is inactive: no ISA interrupt.
        r.wr(MCR, MCR_LOOP | MCR_OUT2);
        assert_eq!(r.rd(IIR_FCR) & 0x0F, IIR_MS);
        assert!(!r.line.level());
        // Transmitted bytes come back and do not reach the sink.
        r.wr(RBR_THR_DLL, 0x5A);
        assert_eq!(r.rd(RBR_THR_DLL), 0x5A);
        assert!(r.output().is_empty());
        // Leaving loopback restores the external inputs.
        r.rd(MSR);
        r.wr(MCR, 0);
        assert_eq!(r.rd(MSR), 0xB0 | MSR_DDSR | MSR_DCTS);
    }

    #[test]
    fn divisor_latch() {
        let mut r = rig();
        r.wr(IER_DLM, 0x05);
        r.wr(LCR, LCR_DLAB | 0x03);
        r.wr(RBR_THR_DLL, 0x34);
        r.wr(IER_DLM, 0x12);
        assert_eq!(r.rd(RBR_THR_DLL), 0x34);
        assert_eq!(r.rd(IER_DLM), 0x12);
        assert!(r.output().is_empty(), "DLL write is not a transmission");
        r.wr(LCR, 0x03);
        assert_eq!(r.rd(IER_DLM), 0x05);
        assert_eq!(r.uart.divisor(), 0x1234);
        assert!(r.uart.dump().contains("divisor=4660"));
    }

    #[test]
    fn iir_priority_order() {
        let mut r = rig();
        r.wr(MCR, MCR_LOOP);
        r.rd(MSR);
        r.wr(IIR_FCR, FCR_FIFO_ENABLE); // trigger 1
        r.wr(MCR, MCR_LOOP | MCR_DTR); // modem status delta
        for i in 0..17u8 {
            r.wr(RBR_THR_DLL, i); // data + overrun
        }
        r.wr(IER_DLM, 0x0F);
        // THRE pending from enabling ETBEI.
        assert_eq!(r.rd(IIR_FCR), 0xC6);
        r.rd(LSR);
        assert_eq!(r.rd(IIR_FCR), 0xC4);
        for _ in 0..16 {
            r.rd(RBR_THR_DLL);
        }
        assert_eq!(r.rd(IIR_FCR), 0xC2);
        assert_eq!(r.rd(IIR_FCR), 0xC0, "THRE cleared by the IIR read");
        r.rd(MSR);
        assert_eq!(r.rd(IIR_FCR), 0xC1);
    }

    #[test]
    fn host_input_is_bounded_and_not_lost() {
        let mut r = rig();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let taken = r.uart.push_input(&data);
        assert_eq!(taken, INPUT_QUEUE_LIMIT);
        assert!(r.uart.wants_input(), "one byte moved into the 16450 RBR");
        r.wr(IIR_FCR, FCR_FIFO_ENABLE);
        // Enabling the FIFO cleared the receiver; the queue refills it.
        let mut got = Vec::new();
        while r.rd(LSR) & LSR_DR != 0 {
            got.push(r.rd(RBR_THR_DLL));
        }
        // The first byte sat in the 16450 RBR and was cleared by FCR.
        assert_eq!(got.len(), INPUT_QUEUE_LIMIT - 1);
        assert_eq!(got.as_slice(), &data[1..INPUT_QUEUE_LIMIT]);
        let taken2 = r.uart.push_input(&data[taken..]);
        assert_eq!(taken2, data.len() - taken);
        assert_eq!(r.rd(RBR_THR_DLL), data[taken]);
    }

    #[test]
    fn host_input_waits_during_loopback() {
        let mut r = rig();
        r.wr(MCR, MCR_LOOP);
        r.uart.push_input(b"k");
        assert_eq!(r.rd(LSR) & LSR_DR, 0);
        r.wr(MCR, 0);
        assert_eq!(r.rd(LSR) & LSR_DR, LSR_DR);
        assert_eq!(r.rd(RBR_THR_DLL), b'k');
    }

    #[test]
    fn received_data_interrupt_reaches_line() {
        let mut r = rig();
        r.wr(MCR, MCR_OUT2);
        r.wr(IER_DLM, IER_ERBFI);
        assert!(!r.line.level());
        r.uart.push_input(b"z");
        assert!(r.line.level());
        assert_eq!(r.rd(IIR_FCR), 0x04);
        assert_eq!(r.rd(RBR_THR_DLL), b'z');
        assert!(!r.line.level());
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = rig();
        r.wr(IIR_FCR, FCR_FIFO_ENABLE | 0x40);
        r.wr(MCR, MCR_OUT2 | MCR_DTR);
        r.wr(IER_DLM, IER_ERBFI);
        r.wr(SCR, 0x77);
        r.uart.push_input(b"hello");
        let saved = r.uart.save_state();
        assert!(r.line.level());
        let mut r2 = rig();
        r2.uart.restore_state(saved.clone());
        assert!(r2.line.level(), "restore drives the line");
        assert_eq!(r2.uart.save_state(), saved);
        assert_eq!(r2.rd(SCR), 0x77);
        let got: Vec<u8> = (0..5).map(|_| r2.rd(RBR_THR_DLL)).collect();
        assert_eq!(got, b"hello");
        // Out-of-range restored state is clamped, not trusted.
        let mut bad = saved;
        bad.fcr = 0;
        bad.rx_fifo = (0..100).collect();
        r2.uart.restore_state(bad);
        assert_eq!(r2.uart.save_state().rx_fifo.len(), 1);
    }

    #[test]
    fn multi_byte_access_is_split() {
        let mut r = rig();
        r.uart.write(SCR, &[0x11, 0x22]); // SCR and an offset past the UART
        let mut b = [0u8; 2];
        r.uart.read(SCR, &mut b);
        assert_eq!(b, [0x11, 0xFF]);
    }

    #[test]
    fn fuzz_registers_no_panic_bounded() {
        let mut r = rig();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..200_000 {
            let v = next();
            let off = (v >> 8) % 10;
            let val = (v >> 16) as u8;
            match v % 8 {
                0..=2 => r.wr(off, val),
                3..=5 => {
                    r.rd(off);
                }
                6 => {
                    let n = ((v >> 24) % 64) as usize;
                    r.uart.push_input(&vec![val; n]);
                }
                _ => r.clock.advance((v >> 32) % 2_000_000),
            }
            let s = &r.uart.st;
            assert!(s.rx_fifo.len() <= RX_FIFO_SIZE);
            assert!(s.input_queue.len() <= INPUT_QUEUE_LIMIT);
            assert_eq!(r.line.level(), s.irq_level);
            assert_eq!(s.irq_level, r.uart.line_level());
        }
        let changes = r.line.take();
        assert!(changes.windows(2).all(|w| w[0] != w[1]));
        assert!(r.out.0.lock().unwrap().len() < 200_000);
    }
}
