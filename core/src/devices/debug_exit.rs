//! QEMU's isa-debug-exit at port 0xF4 (4 bytes wide) and the POST code
//! port 0x80.
//!
//! A value v written anywhere in the debug-exit range (1, 2 or 4 bytes,
//! little-endian) ends the run with process status `(v << 1) | 1`, as QEMU's
//! `-device isa-debug-exit,iobase=0xf4,iosize=4` does; the status itself is
//! computed by `StopRequest::exit_status`.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::{MachineControl, StopRequest};

/// Base port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u64 = 0xF4;
/// Ports it decodes.
pub const DEBUG_EXIT_PORTS: u64 = 4;
/// The POST code port.
pub const POST_PORT: u64 = 0x80;

/// What the debug-exit device remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DebugExitState {
    /// The last value written, if any.
    pub last_value: Option<u32>,
}

/// isa-debug-exit.
pub struct DebugExit {
    st: DebugExitState,
    control: Arc<MachineControl>,
}

impl std::fmt::Debug for DebugExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DebugExit")
            .field("state", &self.st)
            .finish()
    }
}

impl DebugExit {
    /// A device that asks `control` to stop the machine.
    pub fn new(control: Arc<MachineControl>) -> Self {
        DebugExit {
            st: DebugExitState::default(),
            control,
        }
    }

    pub fn save_state(&self) -> DebugExitState {
        self.st.clone()
    }

    pub fn restore_state(&mut self, state: DebugExitState) {
        self.st = state;
    }
}

impl BusDevice for DebugExit {
    fn name(&self) -> &'static str {
        "debug-exit"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        // Little-endian, at most 4 bytes; the offset does not matter (QEMU
        // takes the value wherever in the range it is written).
        let value = data
            .iter()
            .take(4)
            .rev()
            .fold(0u32, |v, &b| (v << 8) | u32::from(b));
        self.st.last_value = Some(value);
        self.control.request(StopRequest::DebugExit(value));
    }

    fn dump(&self) -> String {
        match self.st.last_value {
            Some(v) => format!(
                "isa-debug-exit: last value {v:#x} (exit status {})\n",
                StopRequest::DebugExit(v).exit_status()
            ),
            None => "isa-debug-exit: not written\n".to_string(),
        }
    }
}

/// What port 0x80 remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Port80State {
    /// The last POST code written.
    pub last: u8,
    /// How many writes there were (Linux uses the port as an I/O delay).
    pub writes: u64,
}

/// The POST code port: writes are remembered, reads return the last one.
#[derive(Debug, Default)]
pub struct Port80 {
    st: Port80State,
}

impl Port80 {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last POST code written.
    pub fn last(&self) -> u8 {
        self.st.last
    }

    pub fn save_state(&self) -> Port80State {
        self.st.clone()
    }

    pub fn restore_state(&mut self, state: Port80State) {
        self.st = state;
    }
}

impl BusDevice for Port80 {
    fn name(&self) -> &'static str {
        "post"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = if offset.saturating_add(i as u64) == 0 {
                self.st.last
            } else {
                0xFF
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if offset.saturating_add(i as u64) == 0 {
                self.st.last = v;
                self.st.writes = self.st.writes.wrapping_add(1);
            }
        }
    }

    fn dump(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "POST: last code {:#04x} ({} writes)",
            self.st.last, self.st.writes
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_write_requests_exit_with_status() {
        let control = Arc::new(MachineControl::new());
        let mut d = DebugExit::new(control.clone());
        assert!(!control.stop_requested());
        d.write(0, &[0x03]);
        let req = control.stop_request();
        assert_eq!(req, Some(StopRequest::DebugExit(3)));
        assert_eq!(req.map(|r| r.exit_status()), Some(7));
        assert!(d.dump().contains("exit status 7"));
    }

    #[test]
    fn word_and_dword_writes_are_little_endian() {
        let control = Arc::new(MachineControl::new());
        let mut d = DebugExit::new(control.clone());
        d.write(0, &[0x34, 0x12]);
        assert_eq!(control.stop_request(), Some(StopRequest::DebugExit(0x1234)));
        let control = Arc::new(MachineControl::new());
        let mut d = DebugExit::new(control.clone());
        d.write(0, &[0x78, 0x56, 0x34, 0x12]);
        assert_eq!(
            control.stop_request(),
            Some(StopRequest::DebugExit(0x1234_5678))
        );
        assert_eq!(d.save_state().last_value, Some(0x1234_5678));
        // Zero still stops, with status 1.
        let control = Arc::new(MachineControl::new());
        let mut d = DebugExit::new(control.clone());
        d.write(2, &[0]);
        assert_eq!(control.stop_request().map(|r| r.exit_status()), Some(1));
    }

    #[test]
    fn reads_float_and_empty_writes_do_nothing() {
        let control = Arc::new(MachineControl::new());
        let mut d = DebugExit::new(control.clone());
        let mut b = [0u8; 4];
        d.read(0, &mut b);
        assert_eq!(b, [0xFF; 4]);
        d.write(0, &[]);
        assert!(!control.stop_requested());
        assert!(d.dump().contains("not written"));
    }

    #[test]
    fn port80_remembers_last_code() {
        let mut p = Port80::new();
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b[0], 0);
        p.write(0, &[0x12]);
        p.write(0, &[0xAB]);
        p.read(0, &mut b);
        assert_eq!(b[0], 0xAB);
        assert_eq!(p.last(), 0xAB);
        assert!(p.dump().contains("0xab (2 writes)"));
        let saved = p.save_state();
        let mut q = Port80::new();
        q.restore_state(saved.clone());
        assert_eq!(q.save_state(), saved);
    }

    #[test]
    fn fuzz_no_panic() {
        let control = Arc::new(MachineControl::new());
        let mut d = DebugExit::new(control.clone());
        let mut p = Port80::new();
        let mut x: u64 = 0x1234_5678_9ABC_DEF1;
        let mut last_post = 0u8;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 9) as usize;
            let bytes = x.to_le_bytes();
            let off = (x >> 60) % 5;
            let mut buf = [0u8; 8];
            if x & 0x100 != 0 {
                d.write(off, &bytes[..len]);
                p.write(off, &bytes[..len]);
                if off == 0 && len > 0 {
                    last_post = bytes[0];
                }
            } else {
                d.read(off, &mut buf[..len]);
                p.read(off, &mut buf[..len]);
            }
            assert_eq!(p.last(), last_post);
        }
        if let Some(StopRequest::DebugExit(v)) = control.stop_request() {
            assert_eq!(StopRequest::DebugExit(v).exit_status() & 1, 1);
        } else {
            panic!("some write must have requested an exit");
        }
    }
}
