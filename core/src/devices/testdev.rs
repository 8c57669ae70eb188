//! QEMU's `pc-testdev` (hw/misc/pc-testdev.c), the ports and the MMIO
//! region kvm-unit-tests use:
//! - 0xE0-0xE3: a 32-bit scratch register, read back as written at any
//!   width (0xE8-0xEB is the same register, accessed a byte at a time);
//! - 0xE4-0xE7: "flush page" (QEMU re-protects the written page of host
//!   memory to force a KVM fault); writes are ignored here;
//! - 0x2000-0x2017: interrupt lines: a byte write of v to 0x2000 + n sets
//!   ISA/GSI line n (0..23) to `v != 0`.
//!
//! - 0xFF000000-0xFF00FFFF ("testdev-iomem", kvm-unit-tests'
//!   IORAM_BASE_PHYS): 64 KiB that read back as written, at any width. It is
//!   an MMIO region, not RAM, so that every access to it is emulated (an
//!   exit on KVM, an MMIO access on the interpreter): the tests exercise
//!   instruction emulation with it.
//!
//! Reads of the flush and IRQ ports (which QEMU does not implement) return
//! all ones.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::bus::BusDevice;

/// Base port of the scratch / flush block.
pub const TESTDEV_IOPORT: u64 = 0xE0;
/// Ports of that block: 0xE0-0xEB.
pub const TESTDEV_IOPORT_PORTS: u64 = 12;
/// Base port of the IRQ line block.
pub const TESTDEV_IRQ_PORT: u64 = 0x2000;
/// Lines (and ports) of the IRQ line block.
pub const TESTDEV_IRQ_LINES: u64 = 24;

/// Guest-physical base of the MMIO buffer (QEMU's "testdev-iomem").
pub const TESTDEV_IOMEM_BASE: u64 = 0xFF00_0000;
/// Size of the MMIO buffer.
pub const TESTDEV_IOMEM_SIZE: u64 = 0x1_0000;

/// Offsets in the scratch / flush block.
const FLUSH_PAGE: std::ops::Range<u64> = 4..8;

/// What the scratch / flush block holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestdevIoportState {
    /// The scratch register.
    pub data: u32,
    /// Writes to the flush-page port seen (ignored otherwise).
    pub flushes: u64,
}

/// pc-testdev's scratch register and flush-page port, at 0xE0.
#[derive(Debug, Default)]
pub struct TestdevIoport {
    st: TestdevIoportState,
}

impl TestdevIoport {
    pub fn new() -> Self {
        Self::default()
    }

    /// The scratch register.
    pub fn data(&self) -> u32 {
        self.st.data
    }

    pub fn save_state(&self) -> TestdevIoportState {
        self.st.clone()
    }

    pub fn restore_state(&mut self, state: TestdevIoportState) {
        self.st = state;
    }
}

impl BusDevice for TestdevIoport {
    fn name(&self) -> &'static str {
        "pc-testdev"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.st.data.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let off = offset.saturating_add(i as u64);
            *d = if FLUSH_PAGE.contains(&off) || off >= TESTDEV_IOPORT_PORTS {
                0xFF
            } else {
                bytes[(off & 3) as usize]
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.st.data.to_le_bytes();
        let mut flushed = false;
        for (i, &v) in data.iter().enumerate() {
            let off = offset.saturating_add(i as u64);
            if FLUSH_PAGE.contains(&off) {
                flushed = true;
            } else if off < TESTDEV_IOPORT_PORTS {
                bytes[(off & 3) as usize] = v;
            }
        }
        self.st.data = u32::from_le_bytes(bytes);
        if flushed {
            self.st.flushes = self.st.flushes.wrapping_add(1);
        }
    }

    fn dump(&self) -> String {
        format!(
            "pc-testdev @{TESTDEV_IOPORT:#x}: data={:#010x}, {} flush-page writes\n",
            self.st.data, self.st.flushes
        )
    }
}

/// What the MMIO buffer holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestdevIomemState {
    /// The buffer, [`TESTDEV_IOMEM_SIZE`] bytes.
    pub buf: Vec<u8>,
}

/// pc-testdev's 64 KiB read/write MMIO buffer at [`TESTDEV_IOMEM_BASE`].
#[derive(Debug)]
pub struct TestdevIomem {
    st: TestdevIomemState,
}

impl Default for TestdevIomem {
    fn default() -> Self {
        Self::new()
    }
}

impl TestdevIomem {
    /// A zeroed buffer (QEMU allocates it zeroed).
    pub fn new() -> Self {
        TestdevIomem {
            st: TestdevIomemState {
                buf: vec![0; TESTDEV_IOMEM_SIZE as usize],
            },
        }
    }

    pub fn save_state(&self) -> TestdevIomemState {
        self.st.clone()
    }

    /// Restores `state`; a buffer of another size is cut or zero-padded to
    /// [`TESTDEV_IOMEM_SIZE`].
    pub fn restore_state(&mut self, state: TestdevIomemState) {
        let mut buf = state.buf;
        buf.resize(TESTDEV_IOMEM_SIZE as usize, 0);
        self.st.buf = buf;
    }

    /// The byte at `offset` (`None` outside the buffer).
    fn byte_mut(&mut self, offset: u64, i: usize) -> Option<&mut u8> {
        let off = usize::try_from(offset.checked_add(i as u64)?).ok()?;
        self.st.buf.get_mut(off)
    }
}

impl BusDevice for TestdevIomem {
    fn name(&self) -> &'static str {
        "pc-testdev-iomem"
    }

    /// Bytes beyond the buffer (an access straddling its end) read as all
    /// ones, as unassigned memory does.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.byte_mut(offset, i).map_or(0xFF, |b| *b);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            if let Some(b) = self.byte_mut(offset, i) {
                *b = v;
            }
        }
    }

    fn dump(&self) -> String {
        let nonzero = self.st.buf.iter().filter(|&&b| b != 0).count();
        let mut out = format!(
            "pc-testdev iomem @{TESTDEV_IOMEM_BASE:#x} ({TESTDEV_IOMEM_SIZE:#x} bytes): {nonzero} non-zero bytes; first 16:"
        );
        for b in self.st.buf.iter().take(16) {
            let _ = write!(out, " {b:02x}");
        }
        out.push('\n');
        out
    }
}

/// Sets interrupt line `n` (0..23) to a level: the machine routes ISA
/// lines 0..15 through the ISA router and 16..23 to IOAPIC pins.
pub type SetIrqLine = Arc<dyn Fn(u8, bool) + Send + Sync>;

/// What the IRQ line block holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TestdevIrqState {
    /// Level last written to each line (bit n = line n).
    pub levels: u32,
}

/// pc-testdev's interrupt line ports, at 0x2000.
pub struct TestdevIrq {
    st: TestdevIrqState,
    set_line: SetIrqLine,
}

impl std::fmt::Debug for TestdevIrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestdevIrq")
            .field("state", &self.st)
            .finish()
    }
}

impl TestdevIrq {
    /// Ports that drive lines through `set_line`.
    pub fn new(set_line: SetIrqLine) -> Self {
        TestdevIrq {
            st: TestdevIrqState::default(),
            set_line,
        }
    }

    /// Level last written to line `n`.
    pub fn level(&self, n: u8) -> bool {
        u32::from(n) < TESTDEV_IRQ_LINES as u32 && self.st.levels & (1 << n) != 0
    }

    pub fn save_state(&self) -> TestdevIrqState {
        self.st.clone()
    }

    /// Restores `state` and drives every line to its saved level.
    pub fn restore_state(&mut self, state: TestdevIrqState) {
        self.st.levels = state.levels & ((1 << TESTDEV_IRQ_LINES) - 1);
        for n in 0..TESTDEV_IRQ_LINES as u8 {
            (self.set_line)(n, self.level(n));
        }
    }
}

impl BusDevice for TestdevIrq {
    fn name(&self) -> &'static str {
        "pc-testdev-irq"
    }

    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    /// Only byte writes decode (QEMU's region accepts one byte only).
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (&[v], Ok(n)) = (data, u8::try_from(offset)) else {
            return;
        };
        if u64::from(n) >= TESTDEV_IRQ_LINES {
            return;
        }
        let level = v != 0;
        if level {
            self.st.levels |= 1 << n;
        } else {
            self.st.levels &= !(1 << n);
        }
        (self.set_line)(n, level);
    }

    fn dump(&self) -> String {
        let mut out = format!("pc-testdev irq lines @{TESTDEV_IRQ_PORT:#x}: high:");
        let mut any = false;
        for n in 0..TESTDEV_IRQ_LINES as u8 {
            if self.level(n) {
                let _ = write!(out, " {n}");
                any = true;
            }
        }
        if !any {
            out.push_str(" none");
        }
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn scratch_register_reads_back_at_every_width() {
        let mut t = TestdevIoport::new();
        t.write(0, &0xDEAD_BEEFu32.to_le_bytes());
        let mut b4 = [0u8; 4];
        t.read(0, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0xDEAD_BEEF);
        t.write(2, &[0x34, 0x12]);
        let mut b2 = [0u8; 2];
        t.read(2, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 0x1234);
        t.write(1, &[0x99]);
        assert_eq!(t.data(), 0x1234_99EF);
        // 0xE8-0xEB: the same register, bytewise.
        let mut b1 = [0u8; 1];
        t.read(8 + 3, &mut b1);
        assert_eq!(b1[0], 0x12);
        t.write(8, &0x0102_0304u32.to_le_bytes());
        t.read(0, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x0102_0304);
        // Flush page: ignored, counted, reads float.
        t.write(4, &0x1000u32.to_le_bytes());
        assert_eq!(t.data(), 0x0102_0304);
        t.read(4, &mut b4);
        assert_eq!(b4, [0xFF; 4]);
        assert!(t.dump().contains("data=0x01020304, 1 flush"));
        let saved = t.save_state();
        let mut u = TestdevIoport::new();
        u.restore_state(saved.clone());
        assert_eq!(u.save_state(), saved);
    }

    #[test]
    fn irq_ports_set_line_levels() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut t = TestdevIrq::new(Arc::new(move |n, l| s.lock().unwrap().push((n, l))));
        t.write(0x0E, &[1]);
        t.write(0x0E, &[0]);
        t.write(0x17, &[0x80]);
        // Not a byte write, or outside the 24 lines: nothing.
        t.write(0x03, &[1, 0]);
        t.write(0x18, &[1]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(0x0E, true), (0x0E, false), (0x17, true)]
        );
        assert!(t.level(23));
        assert!(!t.level(14));
        assert!(!t.level(200));
        assert!(t.dump().contains("high: 23"));
        let mut b = [0u8; 1];
        t.read(0, &mut b);
        assert_eq!(b[0], 0xFF);
        // Restoring re-drives every line.
        seen.lock().unwrap().clear();
        t.restore_state(TestdevIrqState { levels: 0b101 });
        let v = seen.lock().unwrap().clone();
        assert_eq!(v.len(), 24);
        assert_eq!(v[0], (0, true));
        assert_eq!(v[1], (1, false));
        assert_eq!(v[2], (2, true));
    }

    #[test]
    fn iomem_reads_back_as_written_at_every_width() {
        let mut m = TestdevIomem::new();
        let mut b8 = [0u8; 8];
        m.read(0x100, &mut b8);
        assert_eq!(b8, [0; 8], "starts zeroed");
        // 1, 2, 4 and 8 bytes, unaligned, overlapping.
        m.write(0x101, &0x1122_3344_5566_7788u64.to_le_bytes());
        m.read(0x101, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 0x1122_3344_5566_7788);
        m.write(0x103, &[0xAA, 0xBB]);
        let mut b4 = [0u8; 4];
        m.read(0x102, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0x44BB_AA77);
        let mut b1 = [0u8; 1];
        m.write(0xFFFF, &[0x5A]);
        m.read(0xFFFF, &mut b1);
        assert_eq!(b1[0], 0x5A);
        // Straddling the end: the part inside is kept, the rest floats.
        m.write(0xFFFE, &[1, 2, 3, 4]);
        m.read(0xFFFE, &mut b4);
        assert_eq!(b4, [1, 2, 0xFF, 0xFF]);
        assert!(m.dump().contains("0xff000000"));
        let saved = m.save_state();
        let mut n = TestdevIomem::new();
        n.restore_state(saved.clone());
        assert_eq!(n.save_state(), saved);
        n.restore_state(TestdevIomemState { buf: vec![7; 3] });
        assert_eq!(n.save_state().buf.len(), TESTDEV_IOMEM_SIZE as usize);
    }

    #[test]
    fn iomem_fuzz_matches_a_byte_array() {
        let mut m = TestdevIomem::new();
        let mut model = vec![0u8; TESTDEV_IOMEM_SIZE as usize];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 17) as usize;
            let off = (x >> 8) % (TESTDEV_IOMEM_SIZE + 32);
            let bytes = [(x >> 24) as u8; 16];
            if x & (1 << 50) != 0 {
                m.write(off, &bytes[..len]);
                for (i, &v) in bytes[..len].iter().enumerate() {
                    if let Some(b) = model.get_mut(off as usize + i) {
                        *b = v;
                    }
                }
            } else {
                let mut b = [0u8; 16];
                m.read(off, &mut b[..len]);
                for (i, v) in b[..len].iter().enumerate() {
                    assert_eq!(*v, *model.get(off as usize + i).unwrap_or(&0xFF));
                }
            }
        }
        assert_eq!(m.save_state().buf, model);
    }

    #[test]
    fn fuzz_no_panic() {
        let levels = Arc::new(Mutex::new([false; 24]));
        let l = levels.clone();
        let mut irq = TestdevIrq::new(Arc::new(move |n, v| {
            l.lock().unwrap()[usize::from(n)] = v;
        }));
        let mut io = TestdevIoport::new();
        let mut x: u64 = 0x0123_4567_89AB_CDEF;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 5) as usize;
            let bytes = (x >> 16).to_le_bytes();
            let off = (x >> 8) % 30;
            let mut b = [0u8; 4];
            if x & (1 << 40) != 0 {
                irq.write(off, &bytes[..len]);
                io.write(off % 14, &bytes[..len]);
            } else {
                irq.read(off, &mut b[..len]);
                io.read(off % 14, &mut b[..len]);
            }
            let seen = *levels.lock().unwrap();
            for (n, &lv) in seen.iter().enumerate() {
                assert_eq!(irq.level(n as u8), lv);
            }
        }
    }
}
