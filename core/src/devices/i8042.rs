//! The 8042 keyboard controller at ports 0x60 (data) and 0x64 (status /
//! command), with a PS/2 keyboard that answers commands but has no keys
//! yet, and no mouse on the auxiliary port.
//!
//! What it is for: the controller commands a kernel probes (Linux's i8042
//! and atkbd drivers finish their probe at once), and the reset line: command
//! 0xFE, or an output-port write with bit 0 clear, asks the machine for a
//! reset through `MachineControl`.
//!
//! Ports 0x60 and 0x64 are not contiguous (0x61 is the PIT / speaker
//! port), so the controller, [`I8042`], takes register offsets relative to
//! 0x60 (0 = data, 4 = status/command), and two one-byte [`I8042Port`]
//! wrappers map it at 0x60 and 0x64 (see [`i8042_ports`]).
//!
//! Linux's AUX probe: the auxiliary loopback command (0xD3) echoes as on a
//! real controller, but with no IRQ 12 wired Linux's AUX IRQ test waits
//! 250 ms and then decides there is no AUX port (`i8042.noaux` skips it).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::bus::{BusDevice, SharedDevice};
use crate::control::{MachineControl, StopRequest};
use crate::irq::IrqLine;

/// Data port.
pub const I8042_DATA_PORT: u64 = 0x60;
/// Status (read) and command (write) port.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// ISA IRQ of the keyboard.
pub const KEYBOARD_IRQ: u8 = 1;

/// Offsets of [`I8042`]'s registers, relative to 0x60.
pub const DATA_OFFSET: u64 = 0;
pub const STATUS_COMMAND_OFFSET: u64 = I8042_COMMAND_PORT - I8042_DATA_PORT;

// Status register.
const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
/// A2 when last written: 1 = command (port 0x64), 0 = data.
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited by the key lock.
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

// Command byte (controller RAM byte 0).
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Output port.
/// System reset, active low.
const OUT_RESET: u8 = 0x01;
const OUT_A20: u8 = 0x02;
const OUT_KBD_OBF: u8 = 0x10;
const OUT_AUX_OBF: u8 = 0x20;

// Controller commands.
const CMD_READ_RAM: u8 = 0x20;
const CMD_WRITE_RAM: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_OUTPUT_PORT: u8 = 0xD0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xD1;
const CMD_WRITE_KBD_OBUF: u8 = 0xD2;
const CMD_WRITE_AUX_OBUF: u8 = 0xD3;
const CMD_WRITE_AUX: u8 = 0xD4;
const CMD_A20_DISABLE: u8 = 0xDD;
const CMD_A20_ENABLE: u8 = 0xDF;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xED;
const KBD_ECHO: u8 = 0xEE;
const KBD_SCANCODE_SET: u8 = 0xF0;
const KBD_IDENTIFY: u8 = 0xF2;
const KBD_SET_TYPEMATIC: u8 = 0xF3;
const KBD_ENABLE: u8 = 0xF4;
const KBD_DISABLE: u8 = 0xF5;
const KBD_SET_DEFAULTS: u8 = 0xF6;
const KBD_RESEND: u8 = 0xFE;
const KBD_RESET: u8 = 0xFF;
const KBD_ACK: u8 = 0xFA;
const KBD_BAT_OK: u8 = 0xAA;
/// Also the reply to a command the keyboard does not know.
const KBD_REPLY_RESEND: u8 = 0xFE;

/// Bytes the output side can hold (controller replies and keyboard
/// replies waiting for the one-byte output buffer).
pub const OUTPUT_QUEUE_LIMIT: usize = 16;

/// Default typematic byte: 10.9 characters/s, 500 ms delay.
const TYPEMATIC_DEFAULT: u8 = 0x2B;

/// Everything the controller and its keyboard hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8042State {
    /// Controller RAM; byte 0 is the command byte.
    pub ram: [u8; 32],
    /// Output port (bit 0 reset, active low; bit 1 A20 gate).
    pub output_port: u8,
    /// Whether the last write was to the command port (status bit 3).
    pub last_write_was_command: bool,
    /// A controller command waiting for its data byte.
    pub pending_command: Option<u8>,
    /// Bytes for the output buffer, oldest first; `true` marks AUX data.
    pub output: VecDeque<(u8, bool)>,
    /// What port 0x60 reads when nothing is waiting.
    pub last_output: u8,
    /// Keyboard: scanning enabled.
    pub kbd_scanning: bool,
    /// Keyboard: scan code set 1-3.
    pub kbd_scancode_set: u8,
    pub kbd_leds: u8,
    pub kbd_typematic: u8,
    /// Keyboard: a command waiting for its parameter byte.
    pub kbd_pending: Option<u8>,
    /// Keyboard: the last byte it sent (for Resend).
    pub kbd_last_sent: u8,
    /// Level of IRQ 1 as last driven.
    pub irq_level: bool,
}

impl Default for I8042State {
    /// The state SeaBIOS leaves: self-tested (system flag set), keyboard
    /// interrupt on, AUX port disabled, scan code translation on.
    fn default() -> Self {
        let mut ram = [0u8; 32];
        ram[0] = CTR_KBD_INT | CTR_SYS | CTR_AUX_DISABLE | CTR_XLATE;
        I8042State {
            ram,
            output_port: 0xC0 | OUT_A20 | OUT_RESET,
            last_write_was_command: false,
            pending_command: None,
            output: VecDeque::with_capacity(OUTPUT_QUEUE_LIMIT),
            last_output: 0,
            kbd_scanning: true,
            kbd_scancode_set: 2,
            kbd_leds: 0,
            kbd_typematic: TYPEMATIC_DEFAULT,
            kbd_pending: None,
            kbd_last_sent: KBD_ACK,
            irq_level: false,
        }
    }
}

/// The 8042 keyboard controller.
pub struct I8042 {
    st: I8042State,
    control: Arc<MachineControl>,
    kbd_irq: Option<Arc<dyn IrqLine>>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").field("state", &self.st).finish()
    }
}

impl I8042 {
    /// A controller that requests resets through `control` and, if given,
    /// drives IRQ 1 while keyboard data waits and command byte bit 0 is set.
    pub fn new(control: Arc<MachineControl>, kbd_irq: Option<Arc<dyn IrqLine>>) -> Self {
        I8042 {
            st: I8042State::default(),
            control,
            kbd_irq,
        }
    }

    pub fn save_state(&self) -> I8042State {
        self.st.clone()
    }

    /// Restores `state` (bounding the output queue) and drives IRQ 1 to
    /// the restored level.
    pub fn restore_state(&mut self, state: I8042State) {
        self.st = state;
        self.st.output.truncate(OUTPUT_QUEUE_LIMIT);
        if !(1..=3).contains(&self.st.kbd_scancode_set) {
            self.st.kbd_scancode_set = 2;
        }
        let level = self.line_level();
        self.st.irq_level = level;
        if let Some(l) = &self.kbd_irq {
            l.set_level(level);
        }
    }

    /// The command byte.
    pub fn command_byte(&self) -> u8 {
        self.st.ram[0]
    }

    /// The A20 gate bit of the output port (not applied to memory here).
    pub fn a20_enabled(&self) -> bool {
        self.st.output_port & OUT_A20 != 0
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if let Some(&(_, aux)) = self.st.output.front() {
            s |= STATUS_OBF;
            if aux {
                s |= STATUS_AUX_DATA;
            }
        }
        if self.st.ram[0] & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.st.last_write_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn line_level(&self) -> bool {
        self.kbd_irq.is_some()
            && self.st.ram[0] & CTR_KBD_INT != 0
            && matches!(self.st.output.front(), Some(&(_, false)))
    }

    fn set_line(&mut self, level: bool) {
        if level != self.st.irq_level {
            self.st.irq_level = level;
            if let Some(l) = &self.kbd_irq {
                l.set_level(level);
            }
        }
    }

    fn update_irq(&mut self) {
        let level = self.line_level();
        self.set_line(level);
    }

    /// Queues a byte for the output buffer; beyond the bound it is lost.
    fn queue(&mut self, value: u8, aux: bool) {
        if self.st.output.len() < OUTPUT_QUEUE_LIMIT {
            self.st.output.push_back((value, aux));
        }
    }

    /// A byte from the keyboard. With translation on (command byte bit 6),
    /// the controller turns set-2 codes into set-1 codes; of what this
    /// keyboard sends, that changes the second ID byte and the scan code set
    /// number (bytes 0x80 and up pass unchanged).
    fn keyboard_send(&mut self, value: u8) {
        let value = if self.st.ram[0] & CTR_XLATE != 0 {
            match value {
                0x01 => 0x43,
                0x02 => 0x41,
                0x03 => 0x3F,
                0x83 => 0x41,
                v => v,
            }
        } else {
            value
        };
        self.st.kbd_last_sent = value;
        self.queue(value, false);
    }

    fn request_reset(&self) {
        self.control.request(StopRequest::Reset);
    }

    fn output_port_value(&self) -> u8 {
        let mut v = self.st.output_port & !(OUT_KBD_OBF | OUT_AUX_OBF);
        match self.st.output.front() {
            Some(&(_, false)) => v |= OUT_KBD_OBF,
            Some(&(_, true)) => v |= OUT_AUX_OBF,
            None => {}
        }
        v
    }

    fn write_output_port(&mut self, value: u8) {
        self.st.output_port = value;
        if value & OUT_RESET == 0 {
            self.request_reset();
        }
    }

    fn keyboard_defaults(&mut self) {
        self.st.kbd_scancode_set = 2;
        self.st.kbd_typematic = TYPEMATIC_DEFAULT;
        self.st.kbd_leds = 0;
    }

    /// A byte written to the keyboard through port 0x60.
    fn keyboard_write(&mut self, value: u8) {
        // Sending to the keyboard enables its interface again (as QEMU).
        self.st.ram[0] &= !CTR_KBD_DISABLE;
        if let Some(cmd) = self.st.kbd_pending.take() {
            match cmd {
                KBD_SET_LEDS => {
                    self.st.kbd_leds = value & 0x07;
                    self.keyboard_send(KBD_ACK);
                }
                KBD_SET_TYPEMATIC => {
                    self.st.kbd_typematic = value & 0x7F;
                    self.keyboard_send(KBD_ACK);
                }
                _ => match value {
                    0 => {
                        self.keyboard_send(KBD_ACK);
                        self.keyboard_send(self.st.kbd_scancode_set);
                    }
                    1..=3 => {
                        self.st.kbd_scancode_set = value;
                        self.keyboard_send(KBD_ACK);
                    }
                    _ => self.keyboard_send(KBD_REPLY_RESEND),
                },
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_SET_TYPEMATIC | KBD_SCANCODE_SET => {
                self.st.kbd_pending = Some(value);
                self.keyboard_send(KBD_ACK);
            }
            KBD_ECHO => self.keyboard_send(KBD_ECHO),
            KBD_IDENTIFY => {
                // An MF2 keyboard: 0xAB 0x83.
                self.keyboard_send(KBD_ACK);
                self.keyboard_send(0xAB);
                self.keyboard_send(0x83);
            }
            KBD_ENABLE => {
                self.st.kbd_scanning = true;
                self.keyboard_send(KBD_ACK);
            }
            KBD_DISABLE => {
                self.keyboard_defaults();
                self.st.kbd_scanning = false;
                self.keyboard_send(KBD_ACK);
            }
            KBD_SET_DEFAULTS => {
                self.keyboard_defaults();
                self.keyboard_send(KBD_ACK);
            }
            // Set-3 key type commands: accepted, nothing to change.
            0xF7..=0xFD => self.keyboard_send(KBD_ACK),
            KBD_RESEND => {
                let last = self.st.kbd_last_sent;
                self.queue(last, false);
            }
            KBD_RESET => {
                self.keyboard_defaults();
                self.st.kbd_scanning = true;
                self.keyboard_send(KBD_ACK);
                self.keyboard_send(KBD_BAT_OK);
            }
            _ => self.keyboard_send(KBD_REPLY_RESEND),
        }
    }

    fn write_command(&mut self, cmd: u8) {
        self.st.last_write_was_command = true;
        self.st.pending_command = None;
        match cmd {
            CMD_READ_RAM..=0x3F => {
                let v = self.st.ram[usize::from(cmd & 0x1F)];
                self.queue(v, false);
            }
            CMD_WRITE_RAM..=0x7F
            | CMD_WRITE_OUTPUT_PORT
            | CMD_WRITE_KBD_OBUF
            | CMD_WRITE_AUX_OBUF
            | CMD_WRITE_AUX => self.st.pending_command = Some(cmd),
            CMD_AUX_DISABLE => self.st.ram[0] |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.st.ram[0] &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST | CMD_KBD_TEST => self.queue(0x00, false),
            CMD_SELF_TEST => {
                self.st.ram[0] |= CTR_SYS;
                self.queue(0x55, false);
            }
            CMD_KBD_DISABLE => self.st.ram[0] |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.st.ram[0] &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => {
                let v = self.output_port_value();
                self.queue(v, false);
            }
            CMD_A20_DISABLE => self.st.output_port &= !OUT_A20,
            CMD_A20_ENABLE => self.st.output_port |= OUT_A20,
            // 0xF0-0xFF pulse output port bits 3:0 where the command has a
            // 0; bit 0 is the reset line (0xFE pulses only reset).
            0xF0..=0xFF if cmd & OUT_RESET == 0 => self.request_reset(),
            // Unknown commands are ignored, as by a real 8042.
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        self.st.last_write_was_command = false;
        match self.st.pending_command.take() {
            Some(cmd @ CMD_WRITE_RAM..=0x7F) => self.st.ram[usize::from(cmd & 0x1F)] = value,
            Some(CMD_WRITE_OUTPUT_PORT) => self.write_output_port(value),
            Some(CMD_WRITE_KBD_OBUF) => self.queue(value, false),
            Some(CMD_WRITE_AUX_OBUF) => self.queue(value, true),
            // No mouse is attached: the byte goes nowhere.
            Some(CMD_WRITE_AUX) => {}
            _ => self.keyboard_write(value),
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some((v, _)) = self.st.output.pop_front() {
            self.st.last_output = v;
            // OBF falls on the read and rises again when the next byte
            // moves into the output buffer: a new edge for the PIC.
            self.set_line(false);
        }
        self.st.last_output
    }
}

impl BusDevice for I8042 {
    fn name(&self) -> &'static str {
        "i8042"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = match offset.saturating_add(i as u64) {
                DATA_OFFSET => self.read_data(),
                STATUS_COMMAND_OFFSET => self.status(),
                _ => 0xFF,
            };
        }
        self.update_irq();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            match offset.saturating_add(i as u64) {
                DATA_OFFSET => self.write_data(v),
                STATUS_COMMAND_OFFSET => self.write_command(v),
                _ => {}
            }
        }
        self.update_irq();
    }

    fn dump(&self) -> String {
        let s = &self.st;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "i8042: status={:02x} command-byte={:02x} output-port={:02x} pending-command={} irq1={}",
            self.status(),
            s.ram[0],
            s.output_port,
            s.pending_command
                .map_or_else(|| "-".to_string(), |c| format!("{c:02x}")),
            u8::from(s.irq_level)
        );
        let queued: Vec<String> = s
            .output
            .iter()
            .map(|&(v, aux)| format!("{v:02x}{}", if aux { "(aux)" } else { "" }))
            .collect();
        let _ = writeln!(
            out,
            "  output=[{}] keyboard: scanning={} set={} leds={:x} typematic={:02x}",
            queued.join(" "),
            s.kbd_scanning,
            s.kbd_scancode_set,
            s.kbd_leds,
            s.kbd_typematic
        );
        out
    }
}

/// Which of the controller's two ports an [`I8042Port`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum I8042Register {
    /// Port 0x60.
    Data,
    /// Port 0x64.
    StatusCommand,
}

/// One of the controller's ports as a one-byte bus device.
pub struct I8042Port {
    dev: Arc<Mutex<I8042>>,
    register: I8042Register,
}

impl I8042Port {
    pub fn new(dev: Arc<Mutex<I8042>>, register: I8042Register) -> Self {
        I8042Port { dev, register }
    }

    fn offset(&self) -> u64 {
        match self.register {
            I8042Register::Data => DATA_OFFSET,
            I8042Register::StatusCommand => STATUS_COMMAND_OFFSET,
        }
    }
}

impl BusDevice for I8042Port {
    fn name(&self) -> &'static str {
        match self.register {
            I8042Register::Data => "i8042-data",
            I8042Register::StatusCommand => "i8042-cmd",
        }
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        for (i, d) in data.iter_mut().enumerate() {
            if offset.saturating_add(i as u64) == 0 {
                dev.read(self.offset(), std::slice::from_mut(d));
            } else {
                *d = 0xFF;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut dev = self.dev.lock().unwrap_or_else(|p| p.into_inner());
        for (i, &v) in data.iter().enumerate() {
            if offset.saturating_add(i as u64) == 0 {
                dev.write(self.offset(), &[v]);
            }
        }
    }

    fn dump(&self) -> String {
        match self.register {
            I8042Register::Data => self.dev.lock().unwrap_or_else(|p| p.into_inner()).dump(),
            I8042Register::StatusCommand => "i8042: see i8042-data\n".to_string(),
        }
    }
}

/// The controller's two bus devices with their ports, to map with length 1
/// each: `for (port, d) in i8042_ports(&kbc) { pio.insert(d, port, 1)? }`.
pub fn i8042_ports(dev: &Arc<Mutex<I8042>>) -> [(u64, SharedDevice); 2] {
    [
        (
            I8042_DATA_PORT,
            Arc::new(Mutex::new(I8042Port::new(dev.clone(), I8042Register::Data))),
        ),
        (
            I8042_COMMAND_PORT,
            Arc::new(Mutex::new(I8042Port::new(
                dev.clone(),
                I8042Register::StatusCommand,
            ))),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, BusKind};
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

    struct Rig {
        kbc: I8042,
        control: Arc<MachineControl>,
        line: Arc<RecLine>,
    }

    fn rig() -> Rig {
        let control = Arc::new(MachineControl::new());
        let line = Arc::new(RecLine::default());
        let kbc = I8042::new(control.clone(), Some(line.clone()));
        Rig { kbc, control, line }
    }

    impl Rig {
        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.kbc.read(STATUS_COMMAND_OFFSET, &mut b);
            b[0]
        }
        fn cmd(&mut self, c: u8) {
            self.kbc.write(STATUS_COMMAND_OFFSET, &[c]);
        }
        fn data(&mut self, v: u8) {
            self.kbc.write(DATA_OFFSET, &[v]);
        }
        fn read(&mut self) -> u8 {
            let mut b = [0];
            self.kbc.read(DATA_OFFSET, &mut b);
            b[0]
        }
        /// What Linux's i8042_wait_read + read_data do; panics in the test
        /// if the byte never comes.
        fn wait_read(&mut self) -> u8 {
            assert_ne!(self.status() & STATUS_OBF, 0, "output buffer empty");
            self.read()
        }
        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.status() & STATUS_OBF != 0 {
                v.push(self.read());
            }
            v
        }
        fn level(&self) -> bool {
            self.line.level.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn self_test_and_status() {
        let mut r = rig();
        assert_eq!(r.status(), STATUS_UNLOCKED | STATUS_SYS);
        r.cmd(CMD_SELF_TEST);
        assert_eq!(
            r.status(),
            STATUS_OBF | STATUS_SYS | STATUS_CMD | STATUS_UNLOCKED
        );
        assert_eq!(r.read(), 0x55);
        assert_eq!(r.status() & STATUS_OBF, 0);
        r.cmd(CMD_KBD_TEST);
        assert_eq!(r.wait_read(), 0x00);
        r.cmd(CMD_AUX_TEST);
        assert_eq!(r.wait_read(), 0x00);
        r.data(KBD_ECHO);
        assert_eq!(r.status() & STATUS_CMD, 0, "last write was data");
    }

    #[test]
    fn command_byte_and_port_enables() {
        let mut r = rig();
        r.cmd(CMD_READ_RAM);
        assert_eq!(r.wait_read(), 0x65);
        r.cmd(CMD_WRITE_RAM);
        r.data(0x30);
        assert_eq!(r.kbc.command_byte(), 0x30);
        assert_eq!(r.status() & STATUS_SYS, 0, "SYS follows command byte bit 2");
        r.cmd(CMD_KBD_ENABLE);
        r.cmd(CMD_AUX_ENABLE);
        r.cmd(CMD_READ_RAM);
        assert_eq!(r.wait_read(), 0x00);
        r.cmd(CMD_KBD_DISABLE);
        r.cmd(CMD_AUX_DISABLE);
        r.cmd(CMD_READ_RAM);
        assert_eq!(r.wait_read(), CTR_KBD_DISABLE | CTR_AUX_DISABLE);
        // Other controller RAM bytes.
        r.cmd(0x65);
        r.data(0x5C);
        r.cmd(0x25);
        assert_eq!(r.wait_read(), 0x5C);
    }

    #[test]
    fn reset_through_pulse_command() {
        let mut r = rig();
        r.cmd(0xFF); // pulses nothing
        assert!(!r.control.stop_requested());
        r.cmd(0xFE);
        assert_eq!(r.control.stop_request(), Some(StopRequest::Reset));
    }

    #[test]
    fn reset_through_output_port() {
        let mut r = rig();
        r.cmd(CMD_WRITE_OUTPUT_PORT);
        r.data(0xC3);
        assert!(!r.control.stop_requested());
        r.cmd(CMD_READ_OUTPUT_PORT);
        assert_eq!(r.wait_read(), 0xC3);
        r.cmd(CMD_A20_DISABLE);
        assert!(!r.kbc.a20_enabled());
        r.cmd(CMD_A20_ENABLE);
        assert!(r.kbc.a20_enabled());
        r.cmd(CMD_WRITE_OUTPUT_PORT);
        r.data(0xC2);
        assert_eq!(r.control.stop_request(), Some(StopRequest::Reset));
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let mut r = rig();
        r.data(KBD_RESET);
        assert_eq!(r.drain(), [KBD_ACK, KBD_BAT_OK]);
        r.data(KBD_IDENTIFY);
        assert_eq!(r.drain(), [KBD_ACK, 0xAB, 0x41], "translated ID");
        r.data(KBD_SET_LEDS);
        r.data(0x02);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK]);
        r.data(KBD_SET_TYPEMATIC);
        r.data(0x20);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK]);
        r.data(KBD_SCANCODE_SET);
        r.data(0);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK, 0x41], "set 2, translated");
        r.data(KBD_DISABLE);
        r.data(KBD_ENABLE);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK]);
        r.data(KBD_ECHO);
        assert_eq!(r.drain(), [KBD_ECHO]);
        r.data(0x12);
        assert_eq!(r.drain(), [KBD_REPLY_RESEND]);
        r.data(KBD_RESEND);
        assert_eq!(r.drain(), [KBD_REPLY_RESEND]);
        // Without translation the keyboard's own codes come through.
        r.cmd(CMD_WRITE_RAM);
        r.data(CTR_SYS);
        r.data(KBD_IDENTIFY);
        assert_eq!(r.drain(), [KBD_ACK, 0xAB, 0x83]);
        r.data(KBD_SCANCODE_SET);
        r.data(3);
        r.data(KBD_SCANCODE_SET);
        r.data(0);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK, KBD_ACK, KBD_ACK, 3]);
    }

    #[test]
    fn irq1_follows_keyboard_data() {
        let mut r = rig();
        r.data(KBD_RESET);
        assert!(r.level());
        assert_eq!(r.read(), KBD_ACK);
        assert!(r.level(), "next byte moved into the buffer");
        assert_eq!(r.read(), KBD_BAT_OK);
        assert!(!r.level());
        // One pulse per byte: an edge for each.
        assert_eq!(
            r.line.changes.lock().unwrap().as_slice(),
            &[true, false, true, false]
        );
        // AUX data does not raise IRQ 1.
        r.cmd(CMD_WRITE_AUX_OBUF);
        r.data(0x5A);
        assert_eq!(r.status() & (STATUS_OBF | STATUS_AUX_DATA), 0x21);
        assert!(!r.level());
        assert_eq!(r.read(), 0x5A);
        // Nor does anything with command byte bit 0 clear.
        r.cmd(CMD_WRITE_RAM);
        r.data(CTR_XLATE);
        r.data(KBD_ENABLE);
        assert!(!r.level());
        r.cmd(CMD_WRITE_RAM);
        r.data(CTR_XLATE | CTR_KBD_INT);
        assert!(r.level(), "enabling the interrupt with data waiting");
    }

    #[test]
    fn output_queue_is_bounded() {
        let mut r = rig();
        for _ in 0..100 {
            r.data(KBD_RESET);
        }
        assert_eq!(r.kbc.st.output.len(), OUTPUT_QUEUE_LIMIT);
        assert_eq!(r.drain().len(), OUTPUT_QUEUE_LIMIT);
        // An empty buffer reads the last byte again.
        assert_eq!(r.read(), r.kbc.st.last_output);
    }

    /// Linux's i8042 probe (controller check, self test, CTR init, MUX and
    /// AUX checks) and atkbd probe, polling like the driver does.
    #[test]
    fn linux_probe_sequence() {
        let mut r = rig();
        r.drain(); // i8042_flush
        r.cmd(CMD_SELF_TEST);
        assert_eq!(r.wait_read(), 0x55);
        r.cmd(CMD_READ_RAM);
        let ctr0 = r.wait_read();
        r.cmd(CMD_READ_RAM);
        assert_eq!(r.wait_read(), ctr0, "stable CTR");
        assert_ne!(r.status() & STATUS_UNLOCKED, 0, "no keylock");
        let ctr = (ctr0 | CTR_KBD_DISABLE) & !CTR_KBD_INT;
        r.cmd(CMD_WRITE_RAM);
        r.data(ctr);
        // i8042_set_mux_mode: the third loop byte comes back unchanged:
        // not a MUX.
        for v in [0xF0, 0x56, 0xA4] {
            r.cmd(CMD_WRITE_AUX_OBUF);
            r.data(v);
            assert_ne!(r.status() & STATUS_AUX_DATA, 0);
            assert_eq!(r.wait_read(), v);
        }
        // i8042_check_aux bit assignment test.
        r.cmd(CMD_AUX_DISABLE);
        r.cmd(CMD_READ_RAM);
        assert_ne!(r.wait_read() & CTR_AUX_DISABLE, 0);
        r.cmd(CMD_AUX_ENABLE);
        r.cmd(CMD_READ_RAM);
        assert_eq!(r.wait_read() & CTR_AUX_DISABLE, 0);
        r.cmd(CMD_KBD_TEST);
        assert_eq!(r.wait_read(), 0);
        // Enable the keyboard port and its interrupt; atkbd probes.
        r.cmd(CMD_WRITE_RAM);
        r.data((ctr & !CTR_KBD_DISABLE) | CTR_KBD_INT);
        r.line.changes.lock().unwrap().clear();
        r.data(KBD_IDENTIFY);
        assert!(r.level(), "the ACK interrupts");
        assert_eq!(r.drain(), [KBD_ACK, 0xAB, 0x41]);
        r.data(KBD_DISABLE);
        assert_eq!(r.drain(), [KBD_ACK]);
        r.data(KBD_SET_LEDS);
        assert_eq!(r.drain(), [KBD_ACK]);
        r.data(0);
        assert_eq!(r.drain(), [KBD_ACK]);
        r.data(KBD_ENABLE);
        assert_eq!(r.drain(), [KBD_ACK]);
        assert_eq!(
            r.line
                .changes
                .lock()
                .unwrap()
                .iter()
                .filter(|&&l| l)
                .count(),
            7
        );
        assert!(!r.control.stop_requested());
    }

    #[test]
    fn ports_map_at_0x60_and_0x64() {
        let control = Arc::new(MachineControl::new());
        let kbc = Arc::new(Mutex::new(I8042::new(control.clone(), None)));
        let mut bus = Bus::new(BusKind::Pio);
        for (port, d) in i8042_ports(&kbc) {
            bus.insert(d, port, 1).unwrap();
        }
        assert_eq!(bus.device_at(0x60), Some("i8042-data"));
        assert_eq!(bus.device_at(0x64), Some("i8042-cmd"));
        assert_eq!(bus.device_at(0x61), None, "port 0x61 stays free");
        bus.write(0x64, &[CMD_SELF_TEST]);
        let mut b = [0];
        bus.read(0x64, &mut b);
        assert_eq!(b[0] & STATUS_OBF, STATUS_OBF);
        bus.read(0x60, &mut b);
        assert_eq!(b[0], 0x55);
        bus.write(0x64, &[0xFE]);
        assert_eq!(control.stop_request(), Some(StopRequest::Reset));
        let (_, _, d) = bus.devices()[0].clone();
        assert!(d.lock().unwrap().dump().contains("command-byte=65"));
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = rig();
        r.cmd(CMD_WRITE_RAM);
        r.data(0x47);
        r.data(KBD_IDENTIFY);
        r.cmd(CMD_WRITE_OUTPUT_PORT);
        let saved = r.kbc.save_state();
        let mut r2 = rig();
        r2.kbc.restore_state(saved.clone());
        assert_eq!(r2.kbc.save_state(), saved);
        assert!(r2.level());
        r2.data(0x03); // completes the pending output-port write
        assert_eq!(r2.drain(), [KBD_ACK, 0xAB, 0x41]);
        r2.cmd(CMD_READ_OUTPUT_PORT);
        assert_eq!(r2.wait_read(), 0x03);
    }

    #[test]
    fn fuzz_registers_no_panic() {
        let mut r = rig();
        let mut x: u64 = 0xD1B5_4A32_D192_ED03;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..100_000 {
            let v = next();
            let val = (v >> 16) as u8;
            let off = (v >> 8) % 6;
            if v % 2 == 0 {
                // Mostly harmless commands; 0xF0-0xFF may request resets.
                r.kbc.write(off, &[val]);
            } else {
                let mut b = [0u8; 2];
                r.kbc.read(off, &mut b);
            }
            assert!(r.kbc.st.output.len() <= OUTPUT_QUEUE_LIMIT);
            assert_eq!(r.level(), r.kbc.st.irq_level);
            assert_eq!(r.kbc.st.irq_level, r.kbc.line_level());
        }
        let changes = r.line.changes.lock().unwrap();
        assert!(changes.windows(2).all(|w| w[0] != w[1]));
    }
}
