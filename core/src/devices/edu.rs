//! QEMU's educational PCI device, `edu` (1234:11e8, QEMU docs/specs/
//! edu.rst): a 1 MiB register BAR with a liveness check, a factorial unit,
//! an interrupt raise / acknowledge pair and a DMA engine with a 4 KiB
//! buffer, interrupting through INTx or MSI. kvm-unit-tests drives it to
//! check DMA and interrupt remapping through the IOMMU.
//!
//! Differences from QEMU that no guest can rely on: the factorial and a
//! DMA transfer complete during the register write that starts them
//! (QEMU finishes them on a thread and a 100 ms timer; a driver polls the
//! busy bits, which read clear at once here). A DMA outside the buffer or
//! to memory that is not RAM is dropped (QEMU aborts the emulator).

use std::fmt::Write as _;
use std::sync::Arc;

use crate::devices::pci_device::{DmaSpace, PciConfigSpace, PciFunction};
use crate::irq::{IrqLine, MsiSink};

pub const EDU_VENDOR_ID: u16 = 0x1234;
pub const EDU_DEVICE_ID: u16 = 0x11E8;
/// BAR 0 size.
pub const EDU_BAR_SIZE: u64 = 1 << 20;

/// Identification: version 1.0 (0xRRrr00ed).
const EDU_ID: u32 = 0x0100_00ED;

const REG_ID: u64 = 0x00;
const REG_LIVENESS: u64 = 0x04;
const REG_FACTORIAL: u64 = 0x08;
const REG_STATUS: u64 = 0x20;
const REG_INTR_STATUS: u64 = 0x24;
const REG_INTR_RAISE: u64 = 0x60;
const REG_INTR_ACK: u64 = 0x64;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;

/// Status: computing (read-only), raise an interrupt when done.
const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQ_FACTORIAL: u32 = 0x80;
/// Interrupt status value of a finished factorial / DMA.
const IRQ_FACTORIAL: u32 = 0x001;
const IRQ_DMA: u32 = 0x100;

/// DMA command: start, direction (set: buffer to RAM), interrupt when done.
const DMA_START: u64 = 0x1;
const DMA_FROM_DEVICE: u64 = 0x2;
const DMA_IRQ: u64 = 0x4;
/// Where the device's DMA buffer appears in its own address space.
pub const EDU_DMA_BUFFER: u64 = 0x40000;
pub const EDU_DMA_BUFFER_SIZE: usize = 4096;
/// The device drives 28 address bits (QEMU's default `dma_mask`).
const DMA_MASK: u64 = (1 << 28) - 1;

/// Everything the device holds besides its configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EduState {
    pub config: PciConfigSpace,
    pub liveness: u32,
    pub factorial: u32,
    pub status: u32,
    pub irq_status: u32,
    pub dma_src: u64,
    pub dma_dst: u64,
    pub dma_count: u64,
    pub dma_cmd: u64,
    pub dma_buffer: Vec<u8>,
}

/// The `edu` PCI function.
pub struct Edu {
    state: EduState,
    source_id: u16,
    intx: Arc<dyn IrqLine>,
    msi: Arc<dyn MsiSink>,
    dma: Arc<dyn DmaSpace>,
}

impl Edu {
    /// An `edu` at PCI requester ID `source_id` (bus << 8 | devfn).
    pub fn new(
        source_id: u16,
        intx: Arc<dyn IrqLine>,
        msi: Arc<dyn MsiSink>,
        dma: Arc<dyn DmaSpace>,
    ) -> Self {
        Edu {
            state: Self::power_on(),
            source_id,
            intx,
            msi,
            dma,
        }
    }

    fn power_on() -> EduState {
        // Class 00ff00: "unclassified device", as QEMU gives it.
        let mut config = PciConfigSpace::new(EDU_VENDOR_ID, EDU_DEVICE_ID, 0x10, 0x00_FF_00);
        config.add_memory_bar(0, EDU_BAR_SIZE);
        config.set_interrupt_pin(1);
        config.add_msi_capability();
        EduState {
            config,
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            dma_buffer: vec![0; EDU_DMA_BUFFER_SIZE],
        }
    }

    pub fn save_state(&self) -> EduState {
        self.state.clone()
    }

    /// Restores `state`; a buffer of the wrong size is resized.
    pub fn restore_state(&mut self, mut state: EduState) {
        state.dma_buffer.resize(EDU_DMA_BUFFER_SIZE, 0);
        self.state = state;
        self.update_intx();
    }

    /// Firmware's part: BAR 0's address, memory decoding, interrupt line.
    pub fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.state.config
    }

    fn update_intx(&mut self) {
        let level = self
            .state
            .config
            .set_interrupt_status(self.state.irq_status != 0);
        self.intx.set_level(level);
    }

    /// Ors `value` into the interrupt status: an MSI per raise when MSI is
    /// on (and bus mastering, which MSI writes need), else INTx held high.
    fn raise(&mut self, value: u32) {
        self.state.irq_status |= value;
        if self.state.irq_status == 0 {
            return;
        }
        match self.state.config.msi_message() {
            Some((address, data)) => {
                if self.state.config.bus_master() {
                    self.msi.msi(Some(self.source_id), address, data);
                }
            }
            None => self.update_intx(),
        }
    }

    fn acknowledge(&mut self, value: u32) {
        self.state.irq_status &= !value;
        self.update_intx();
    }

    fn compute_factorial(&mut self, n: u32) {
        let mut f: u32 = 1;
        for i in 2..=n.min(64) {
            f = f.wrapping_mul(i);
        }
        // 34! and above have 32 zero low bits.
        self.state.factorial = if n > 64 { 0 } else { f };
        self.state.status &= !STATUS_COMPUTING;
        if self.state.status & STATUS_IRQ_FACTORIAL != 0 {
            self.raise(IRQ_FACTORIAL);
        }
    }

    /// The buffer range `[addr, addr + count)` of the device's own space.
    fn buffer_range(addr: u64, count: u64) -> Option<std::ops::Range<usize>> {
        let start = addr.checked_sub(EDU_DMA_BUFFER)?;
        let end = start.checked_add(count)?;
        (end <= EDU_DMA_BUFFER_SIZE as u64).then_some(start as usize..end as usize)
    }

    fn run_dma(&mut self) {
        let s = &mut self.state;
        // A transfer that cannot be made (outside the buffer, not RAM,
        // blocked by the IOMMU) is dropped; the command still completes.
        let _moved = s.config.bus_master()
            && if s.dma_cmd & DMA_FROM_DEVICE == 0 {
                // RAM (device address dma_src) to the buffer.
                Self::buffer_range(s.dma_dst, s.dma_count).is_some_and(|r| {
                    self.dma
                        .read(self.source_id, s.dma_src & DMA_MASK, &mut s.dma_buffer[r])
                        .is_ok()
                })
            } else {
                Self::buffer_range(s.dma_src, s.dma_count).is_some_and(|r| {
                    self.dma
                        .write(self.source_id, s.dma_dst & DMA_MASK, &s.dma_buffer[r])
                        .is_ok()
                })
            };
        s.dma_cmd &= !DMA_START;
        if s.dma_cmd & DMA_IRQ != 0 {
            self.raise(IRQ_DMA);
        }
    }

    /// Only 4-byte accesses below 0x80, 4 or 8 from there (edu.rst).
    fn size_ok(reg: u64, len: usize) -> bool {
        len == 4 || (reg >= 0x80 && len == 8)
    }

    fn read_reg(&self, reg: u64, len: usize) -> u64 {
        let s = &self.state;
        let ones = u64::MAX;
        if !Self::size_ok(reg, len) {
            return ones;
        }
        match reg {
            REG_ID => u64::from(EDU_ID),
            REG_LIVENESS => u64::from(!s.liveness),
            REG_FACTORIAL => u64::from(s.factorial),
            REG_STATUS => u64::from(s.status),
            REG_INTR_STATUS => u64::from(s.irq_status),
            REG_DMA_SRC => s.dma_src,
            REG_DMA_DST => s.dma_dst,
            REG_DMA_COUNT => s.dma_count,
            REG_DMA_CMD => s.dma_cmd,
            _ => ones,
        }
    }

    fn write_reg(&mut self, reg: u64, len: usize, value: u64) {
        if !Self::size_ok(reg, len) {
            return;
        }
        let v32 = value as u32;
        match reg {
            REG_LIVENESS => self.state.liveness = v32,
            REG_FACTORIAL if self.state.status & STATUS_COMPUTING == 0 => {
                self.state.status |= STATUS_COMPUTING;
                self.compute_factorial(v32);
            }
            REG_STATUS => {
                self.state.status =
                    (self.state.status & STATUS_COMPUTING) | (v32 & STATUS_IRQ_FACTORIAL);
            }
            REG_INTR_RAISE => self.raise(v32),
            REG_INTR_ACK => self.acknowledge(v32),
            REG_DMA_SRC => self.state.dma_src = value,
            REG_DMA_DST => self.state.dma_dst = value,
            REG_DMA_COUNT => self.state.dma_count = value,
            // A command written while a transfer runs is ignored.
            REG_DMA_CMD if self.state.dma_cmd & DMA_START == 0 => {
                self.state.dma_cmd = value;
                if value & DMA_START != 0 {
                    self.run_dma();
                }
            }
            _ => {}
        }
    }
}

impl PciFunction for Edu {
    fn name(&self) -> &'static str {
        "edu"
    }

    fn config_space(&self) -> &PciConfigSpace {
        &self.state.config
    }

    fn config_write(&mut self, reg: usize, data: &[u8]) {
        self.state.config.write(reg, data);
        // INTx disable or MSI enable may have changed the pin's level.
        self.update_intx();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let v = if bar == 0 {
            self.read_reg(offset, data.len())
        } else {
            u64::MAX
        };
        let b = v.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(i).copied().unwrap_or(0xFF);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 || data.len() > 8 {
            return;
        }
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        self.write_reg(offset, data.len(), u64::from_le_bytes(b));
    }

    fn dump(&self) -> String {
        let s = &self.state;
        let mut out = format!(
            "edu (source id {:#06x}): {}\n",
            self.source_id,
            s.config.summary()
        );
        let _ = writeln!(
            out,
            "  status {:#x} irq status {:#x} factorial {:#x} liveness {:#x}",
            s.status, s.irq_status, s.factorial, s.liveness
        );
        let _ = writeln!(
            out,
            "  DMA src {:#x} dst {:#x} count {:#x} cmd {:#x}",
            s.dma_src, s.dma_dst, s.dma_count, s.dma_cmd
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::pci_device::DmaError;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Line(Mutex<Vec<bool>>);
    impl IrqLine for Line {
        fn set_level(&self, level: bool) {
            self.0.lock().unwrap().push(level);
        }
    }
    impl Line {
        fn level(&self) -> bool {
            self.0.lock().unwrap().last().copied().unwrap_or(false)
        }
    }

    #[derive(Default)]
    struct Msis(Mutex<Vec<(Option<u16>, u64, u32)>>);
    impl MsiSink for Msis {
        fn msi(&self, source_id: Option<u16>, address: u64, data: u32) {
            self.0.lock().unwrap().push((source_id, address, data));
        }
    }

    /// 64 KiB of "RAM" at device address 0 (translation is the caller's).
    struct Ram(Mutex<Vec<u8>>);
    impl DmaSpace for Ram {
        fn read(&self, _: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
            let m = self.0.lock().unwrap();
            let a = addr as usize;
            let src = m.get(a..a + buf.len()).ok_or(DmaError::NotRam { addr })?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn write(&self, _: u16, addr: u64, data: &[u8]) -> Result<(), DmaError> {
            let mut m = self.0.lock().unwrap();
            let a = addr as usize;
            m.get_mut(a..a + data.len())
                .ok_or(DmaError::NotRam { addr })?
                .copy_from_slice(data);
            Ok(())
        }
    }

    fn edu() -> (Edu, Arc<Line>, Arc<Msis>, Arc<Ram>) {
        let line = Arc::new(Line::default());
        let msis = Arc::new(Msis::default());
        let ram = Arc::new(Ram(Mutex::new(vec![0; 0x10000])));
        let mut e = Edu::new(0x0018, line.clone(), msis.clone(), ram.clone());
        e.config_mut().set_bar_address(0, 0xFEB0_0000);
        // Memory space and bus master, as a driver enables them.
        e.config_write(4, &[0x06, 0x00]);
        (e, line, msis, ram)
    }

    fn rd(e: &mut Edu, reg: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        e.bar_read(0, reg, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn wr(e: &mut Edu, reg: u64, len: usize, v: u64) {
        e.bar_write(0, reg, &v.to_le_bytes()[..len]);
    }

    #[test]
    fn identification_liveness_and_access_sizes() {
        let (mut e, ..) = edu();
        assert_eq!(rd(&mut e, REG_ID, 4), 0x0100_00ED);
        wr(&mut e, REG_LIVENESS, 4, 0x1234_5678);
        assert_eq!(rd(&mut e, REG_LIVENESS, 4), !0x1234_5678u32 as u64);
        // Below 0x80 only 4-byte accesses work.
        assert_eq!(rd(&mut e, REG_ID, 2), 0xFFFF);
        wr(&mut e, REG_LIVENESS, 2, 0);
        assert_eq!(rd(&mut e, REG_LIVENESS, 4), !0x1234_5678u32 as u64);
        // 8-byte DMA registers.
        wr(&mut e, REG_DMA_SRC, 8, 0x1_2345_6789);
        assert_eq!(rd(&mut e, REG_DMA_SRC, 8), 0x1_2345_6789);
        assert_eq!(rd(&mut e, REG_DMA_SRC, 4), 0x2345_6789);
        assert_eq!(e.config_space().u32_at(0), 0x11E8_1234);
    }

    #[test]
    fn factorial_with_interrupt() {
        let (mut e, line, ..) = edu();
        wr(&mut e, REG_STATUS, 4, 0xFF);
        assert_eq!(
            rd(&mut e, REG_STATUS, 4),
            0x80,
            "only the IRQ bit is writable"
        );
        wr(&mut e, REG_FACTORIAL, 4, 10);
        assert_eq!(rd(&mut e, REG_FACTORIAL, 4), 3_628_800);
        assert_eq!(rd(&mut e, REG_STATUS, 4) & 1, 0);
        assert_eq!(rd(&mut e, REG_INTR_STATUS, 4), 1);
        assert!(line.level());
        wr(&mut e, REG_INTR_ACK, 4, 1);
        assert!(!line.level());
        wr(&mut e, REG_FACTORIAL, 4, 13);
        assert_eq!(rd(&mut e, REG_FACTORIAL, 4), 6_227_020_800u64 as u32 as u64);
    }

    #[test]
    fn intx_raise_ack_and_disable() {
        let (mut e, line, msis, _) = edu();
        wr(&mut e, REG_INTR_RAISE, 4, 0x10);
        assert!(line.level());
        assert_eq!(e.config_space().u16_at(6) & 8, 8);
        // INTx disable drops the pin, status stays.
        e.config_write(4, &[0x06, 0x04]);
        assert!(!line.level());
        e.config_write(4, &[0x06, 0x00]);
        assert!(line.level());
        wr(&mut e, REG_INTR_RAISE, 4, 0x20);
        wr(&mut e, REG_INTR_ACK, 4, 0x10);
        assert!(line.level(), "0x20 still pending");
        wr(&mut e, REG_INTR_ACK, 4, 0x20);
        assert!(!line.level());
        assert!(msis.0.lock().unwrap().is_empty());
    }

    #[test]
    fn msi_per_raise() {
        let (mut e, line, msis, _) = edu();
        let at = 0x40;
        e.config_write(at + 4, &0xFEE0_0010u32.to_le_bytes());
        e.config_write(at + 12, &0x00ABu32.to_le_bytes());
        e.config_write(at + 2, &[1]);
        wr(&mut e, REG_INTR_RAISE, 4, 1);
        wr(&mut e, REG_INTR_RAISE, 4, 1);
        assert_eq!(
            *msis.0.lock().unwrap(),
            vec![(Some(0x18), 0xFEE0_0010, 0xAB); 2]
        );
        assert!(!line.level());
        // Without bus mastering no MSI goes out.
        e.config_write(4, &[0x02, 0x00]);
        wr(&mut e, REG_INTR_RAISE, 4, 1);
        assert_eq!(msis.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn dma_both_directions_and_bad_ranges() {
        let (mut e, line, _, ram) = edu();
        ram.0.lock().unwrap()[0x1000..0x1004].copy_from_slice(&0x1234_5678u32.to_le_bytes());
        // RAM 0x1000 -> buffer + 0.
        wr(&mut e, REG_DMA_SRC, 8, 0x1000);
        wr(&mut e, REG_DMA_DST, 8, EDU_DMA_BUFFER);
        wr(&mut e, REG_DMA_COUNT, 8, 4);
        wr(&mut e, REG_DMA_CMD, 4, DMA_START);
        assert_eq!(rd(&mut e, REG_DMA_CMD, 4) & DMA_START, 0);
        // Buffer + 0 -> RAM 0x1004, with an interrupt.
        wr(&mut e, REG_DMA_SRC, 8, EDU_DMA_BUFFER);
        wr(&mut e, REG_DMA_DST, 8, 0x1004);
        wr(
            &mut e,
            REG_DMA_CMD,
            4,
            DMA_START | DMA_FROM_DEVICE | DMA_IRQ,
        );
        assert_eq!(
            &ram.0.lock().unwrap()[0x1004..0x1008],
            &0x1234_5678u32.to_le_bytes()
        );
        assert_eq!(rd(&mut e, REG_INTR_STATUS, 4), IRQ_DMA as u64);
        assert!(line.level());
        // Out of the buffer: dropped, no panic.
        wr(&mut e, REG_DMA_SRC, 8, EDU_DMA_BUFFER + 4095);
        wr(&mut e, REG_DMA_COUNT, 8, 2);
        wr(&mut e, REG_DMA_DST, 8, 0x2000);
        wr(&mut e, REG_DMA_CMD, 4, DMA_START | DMA_FROM_DEVICE);
        assert_eq!(ram.0.lock().unwrap()[0x2000], 0);
        // Not RAM: dropped.
        wr(&mut e, REG_DMA_SRC, 8, 0xFF_0000);
        wr(&mut e, REG_DMA_DST, 8, EDU_DMA_BUFFER);
        wr(&mut e, REG_DMA_COUNT, 8, 4);
        wr(&mut e, REG_DMA_CMD, 4, DMA_START);
        assert_eq!(rd(&mut e, REG_DMA_CMD, 4) & DMA_START, 0);
        // Bus mastering off: nothing moves.
        e.config_write(4, &[0x02, 0x00]);
        wr(&mut e, REG_DMA_SRC, 8, EDU_DMA_BUFFER);
        wr(&mut e, REG_DMA_DST, 8, 0x3000);
        wr(&mut e, REG_DMA_CMD, 4, DMA_START | DMA_FROM_DEVICE);
        assert_eq!(ram.0.lock().unwrap()[0x3000], 0);
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut e, line, ..) = edu();
        wr(&mut e, REG_LIVENESS, 4, 7);
        wr(&mut e, REG_INTR_RAISE, 4, 4);
        let s = e.save_state();
        let (mut f, line2, ..) = edu();
        f.restore_state(s.clone());
        assert_eq!(f.save_state(), s);
        assert!(line.level() && line2.level());
        assert_eq!(rd(&mut f, REG_LIVENESS, 4), !7u32 as u64);
        assert!(f.dump().contains("irq status 0x4"));
    }

    #[test]
    fn fuzz_registers_no_panic() {
        let (mut e, ..) = edu();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let reg = (x >> 8) % 0x100;
            let len = [1usize, 2, 4, 8][(x >> 20) as usize % 4];
            match x % 4 {
                0 => {
                    let _ = rd(&mut e, reg, len);
                }
                1 => wr(&mut e, reg, len, x >> 3),
                2 => e.config_write(
                    (x >> 30) as usize % 260,
                    &(x >> 40).to_le_bytes()[..len.min(4)],
                ),
                _ => {
                    let mut b = [0u8; 4];
                    e.config_read((x >> 30) as usize % 260, &mut b[..len.min(4)]);
                }
            }
            assert_eq!(e.save_state().dma_buffer.len(), EDU_DMA_BUFFER_SIZE);
        }
    }
}
