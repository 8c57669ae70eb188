//! PCI endpoints on bus 0 beside the built-in bridges (QEMU's `-device`
//! functions): a type-0 configuration header with memory BARs and an MSI
//! capability ([`PciConfigSpace`]), the functions' BAR windows in the PCI
//! memory hole ([`PciMmio`]), the PIIX3's PIRQ routing of their INTx pins
//! to ISA IRQs ([`PirqRouter`]) and the bus-master path into guest memory
//! ([`DmaSpace`]).
//!
//! As on QEMU with SeaBIOS, the machine assigns BAR addresses, the
//! interrupt line and the PIRQ routes before the guest starts; a guest may
//! move a BAR later (sizing writes included) and the window follows it.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::bus::BusDevice;
use crate::devices::pci::{
    CACHE_LINE_SIZE, CLASS_PROG, COMMAND, COMMAND_WMASK, DEVICE_ID, INTERRUPT_LINE,
    QEMU_SUBSYSTEM_ID, QEMU_SUBSYSTEM_VENDOR_ID, REVISION_ID, STATUS, SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use crate::irq::{IrqLine, IsaIrqRouter};

/// Start of the 32-bit PCI memory hole (the end of low RAM on `pc`).
pub const PCI_MMIO_BASE: u64 = crate::memory::LOW_RAM_END;
/// End of the hole: the IOAPIC page.
pub const PCI_MMIO_END: u64 = 0xFEC0_0000;

// Type-0 header registers (PCI Local Bus 3.0 §6.1) beyond those the
// built-in bridges use (pci.rs).
const BAR0: usize = 0x10;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_PIN: usize = 0x3D;
/// First byte after the header: capabilities go here.
const FIRST_CAPABILITY: usize = 0x40;

/// Command register bits.
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: interrupt status (the function asserts INTx, §6.2.3).
const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: the capabilities pointer is valid.
const STATUS_CAP_LIST: u16 = 1 << 4;

/// MSI capability (§6.8.1), 64-bit address, one vector, no masking.
const CAP_ID_MSI: u8 = 0x05;
const MSI_CONTROL: usize = 2;
const MSI_ADDRESS_LO: usize = 4;
const MSI_ADDRESS_HI: usize = 8;
const MSI_DATA: usize = 12;
const MSI_CAP_LEN: usize = 16;
const MSI_ENABLE: u16 = 1 << 0;
const MSI_64BIT: u16 = 1 << 7;

/// Number of BARs in a type-0 header.
pub const PCI_BARS: usize = 6;

/// A function's 256-byte configuration space with QEMU's write masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciConfigSpace {
    pub config: Vec<u8>,
    /// Bits a guest may write.
    wmask: Vec<u8>,
    /// Size of each 32-bit memory BAR (0: not implemented).
    bar_sizes: [u64; PCI_BARS],
    /// Offset of the MSI capability, if the function has one.
    msi_cap: Option<usize>,
}

impl PciConfigSpace {
    /// A type-0 header with QEMU's subsystem IDs.
    pub fn new(vendor: u16, device: u16, revision: u8, class: u32) -> Self {
        let mut s = PciConfigSpace {
            config: vec![0; 256],
            wmask: vec![0; 256],
            bar_sizes: [0; PCI_BARS],
            msi_cap: None,
        };
        s.put16(VENDOR_ID, vendor);
        s.put16(DEVICE_ID, device);
        s.config[REVISION_ID] = revision;
        s.config[CLASS_PROG..CLASS_PROG + 3].copy_from_slice(&class.to_le_bytes()[..3]);
        s.put16(SUBSYSTEM_VENDOR_ID, QEMU_SUBSYSTEM_VENDOR_ID);
        s.put16(SUBSYSTEM_ID, QEMU_SUBSYSTEM_ID);
        s.wmask[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WMASK.to_le_bytes());
        s.wmask[CACHE_LINE_SIZE] = 0xFF;
        s.wmask[INTERRUPT_LINE] = 0xFF;
        s
    }

    fn put16(&mut self, reg: usize, v: u16) {
        self.config[reg..reg + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn put32(&mut self, reg: usize, v: u32) {
        self.config[reg..reg + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn u16_at(&self, reg: usize) -> u16 {
        match self.config.get(reg..reg + 2) {
            Some(b) => u16::from_le_bytes([b[0], b[1]]),
            None => 0,
        }
    }

    pub fn u32_at(&self, reg: usize) -> u32 {
        match self.config.get(reg..reg + 4) {
            Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            None => 0,
        }
    }

    /// Declares BAR `index` as a 32-bit non-prefetchable memory BAR of
    /// `size` bytes (a power of two, at least 16): the guest sizes it by
    /// writing all ones and reading back `!(size - 1)`.
    pub fn add_memory_bar(&mut self, index: usize, size: u64) {
        if index >= PCI_BARS || !size.is_power_of_two() || !(16..=1 << 31).contains(&size) {
            return;
        }
        self.bar_sizes[index] = size;
        let mask = !(size as u32 - 1) & 0xFFFF_FFF0;
        let reg = BAR0 + 4 * index;
        self.wmask[reg..reg + 4].copy_from_slice(&mask.to_le_bytes());
    }

    /// Interrupt pin: 1 = INTA# .. 4 = INTD#.
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.config[INTERRUPT_PIN] = pin;
    }

    pub fn interrupt_pin(&self) -> u8 {
        self.config[INTERRUPT_PIN]
    }

    /// Adds the MSI capability (64-bit message address, one vector, no
    /// per-vector masking, as QEMU's `msi_init(dev, 0, 1, true, false)`).
    pub fn add_msi_capability(&mut self) {
        let at = FIRST_CAPABILITY;
        self.config[at] = CAP_ID_MSI;
        self.config[at + 1] = 0; // last capability
        self.put16(at + MSI_CONTROL, MSI_64BIT);
        self.wmask[at + MSI_CONTROL] = MSI_ENABLE as u8;
        self.wmask[at + MSI_ADDRESS_LO..at + MSI_ADDRESS_LO + 4]
            .copy_from_slice(&0xFFFF_FFFCu32.to_le_bytes());
        self.wmask[at + MSI_ADDRESS_HI..at + MSI_ADDRESS_HI + 4].fill(0xFF);
        self.wmask[at + MSI_DATA..at + MSI_DATA + 2].fill(0xFF);
        self.config[CAPABILITIES_POINTER] = at as u8;
        let status = self.u16_at(STATUS) | STATUS_CAP_LIST;
        self.put16(STATUS, status);
        self.msi_cap = Some(at);
        debug_assert!(at + MSI_CAP_LEN <= 256);
    }

    /// A configuration read of `data.len()` bytes at `reg` (bytes past the
    /// space read as all ones).
    pub fn read(&self, reg: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.config.get(reg + i).copied().unwrap_or(0xFF);
        }
    }

    /// A configuration write: only the writable bits change.
    pub fn write(&mut self, reg: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let r = reg + i;
            if let (Some(c), Some(&m)) = (self.config.get_mut(r), self.wmask.get(r)) {
                *c = (*c & !m) | (v & m);
            }
        }
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Bus mastering is enabled: the function may DMA and send MSIs.
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// The address BAR `index` decodes (0 until assigned).
    pub fn bar_address(&self, index: usize) -> u64 {
        if index >= PCI_BARS || self.bar_sizes[index] == 0 {
            return 0;
        }
        u64::from(self.u32_at(BAR0 + 4 * index) & 0xFFFF_FFF0)
    }

    pub fn bar_size(&self, index: usize) -> u64 {
        self.bar_sizes.get(index).copied().unwrap_or(0)
    }

    /// Sets BAR `index`'s address, as firmware does.
    pub fn set_bar_address(&mut self, index: usize, address: u32) {
        if index < PCI_BARS && self.bar_sizes[index] != 0 {
            let mask = !(self.bar_sizes[index] as u32 - 1) & 0xFFFF_FFF0;
            self.put32(BAR0 + 4 * index, address & mask);
        }
    }

    /// Sets command bits, as firmware does.
    pub fn set_command(&mut self, bits: u16) {
        let v = self.command() | (bits & COMMAND_WMASK);
        self.put16(COMMAND, v);
    }

    /// Sets the interrupt line register, as firmware does.
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.config[INTERRUPT_LINE] = line;
    }

    /// The BAR and offset a memory access at `addr` reaches: memory
    /// decoding on, the BAR assigned (not 0) and `addr` inside it.
    pub fn bar_containing(&self, addr: u64) -> Option<(usize, u64)> {
        if self.command() & COMMAND_MEMORY == 0 {
            return None;
        }
        (0..PCI_BARS).find_map(|i| {
            let (base, size) = (self.bar_address(i), self.bar_sizes[i]);
            (size != 0 && base != 0 && addr >= base && addr - base < size).then(|| (i, addr - base))
        })
    }

    /// The MSI message (address, data) when MSI is enabled.
    pub fn msi_message(&self) -> Option<(u64, u32)> {
        let at = self.msi_cap?;
        if self.u16_at(at + MSI_CONTROL) & MSI_ENABLE == 0 {
            return None;
        }
        let address = u64::from(self.u32_at(at + MSI_ADDRESS_LO))
            | u64::from(self.u32_at(at + MSI_ADDRESS_HI)) << 32;
        Some((address, u32::from(self.u16_at(at + MSI_DATA))))
    }

    pub fn msi_enabled(&self) -> bool {
        self.msi_message().is_some()
    }

    /// Records whether the function asserts INTx (status bit 3); the
    /// pin itself is driven only while INTx is not disabled. Returns the
    /// level the pin should have.
    pub fn set_interrupt_status(&mut self, asserted: bool) -> bool {
        let mut status = self.u16_at(STATUS) & !STATUS_INTERRUPT;
        if asserted {
            status |= STATUS_INTERRUPT;
        }
        self.put16(STATUS, status);
        self.intx_level()
    }

    /// The level of the INTx pin: interrupt status and not disabled.
    pub fn intx_level(&self) -> bool {
        self.u16_at(STATUS) & STATUS_INTERRUPT != 0
            && self.command() & COMMAND_INTX_DISABLE == 0
            && !self.msi_enabled()
    }

    /// One line for dumps: IDs, command, status, BARs, MSI.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:04x}:{:04x} command {:04x} status {:04x} line {} pin {}",
            self.u16_at(VENDOR_ID),
            self.u16_at(DEVICE_ID),
            self.command(),
            self.u16_at(STATUS),
            self.config[INTERRUPT_LINE],
            self.config[INTERRUPT_PIN]
        );
        for i in 0..PCI_BARS {
            if self.bar_sizes[i] != 0 {
                let _ = write!(
                    s,
                    " BAR{i} {:#x}+{:#x}",
                    self.bar_address(i),
                    self.bar_sizes[i]
                );
            }
        }
        if let Some(at) = self.msi_cap {
            match self.msi_message() {
                Some((a, d)) => {
                    let _ = write!(s, " MSI on address {a:#x} data {d:#06x}");
                }
                None => {
                    let _ = write!(s, " MSI off (cap {at:#x})");
                }
            }
        }
        s
    }
}

/// A PCI function the host bridge forwards configuration cycles and BAR
/// accesses to.
pub trait PciFunction: Send {
    fn name(&self) -> &'static str;
    fn config_space(&self) -> &PciConfigSpace;
    /// A configuration read (the default reads the header as stored).
    fn config_read(&mut self, reg: usize, data: &mut [u8]) {
        self.config_space().read(reg, data)
    }
    /// A configuration write; the function reacts to what changed (INTx
    /// disable, MSI enable).
    fn config_write(&mut self, reg: usize, data: &[u8]);
    /// A read of BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write to BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Registers in readable form.
    fn dump(&self) -> String;
}

/// A function shared by the host bridge (configuration) and the memory
/// hole (BARs).
pub type SharedPciFunction = Arc<Mutex<dyn PciFunction>>;

fn lock(f: &SharedPciFunction) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

/// The PCI memory hole: accesses reach the function whose memory BAR
/// contains them; the rest read all ones and drop writes, as on QEMU.
pub struct PciMmio {
    functions: Vec<SharedPciFunction>,
}

impl PciMmio {
    pub fn new(functions: Vec<SharedPciFunction>) -> Self {
        PciMmio { functions }
    }

    fn dispatch(&self, offset: u64, mut f: impl FnMut(&mut dyn PciFunction, usize, u64)) -> bool {
        let addr = PCI_MMIO_BASE + offset;
        for func in &self.functions {
            let mut g = lock(func);
            if let Some((bar, off)) = g.config_space().bar_containing(addr) {
                f(&mut *g, bar, off);
                return true;
            }
        }
        false
    }
}

impl BusDevice for PciMmio {
    fn name(&self) -> &'static str {
        "pci-mmio"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut hit = false;
        self.dispatch(offset, |f, bar, off| {
            f.bar_read(bar, off, data);
            hit = true;
        });
        if !hit {
            data.fill(0xFF);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.dispatch(offset, |f, bar, off| f.bar_write(bar, off, data));
    }

    fn dump(&self) -> String {
        let mut out = format!("PCI memory hole {PCI_MMIO_BASE:#x}-{PCI_MMIO_END:#x}\n");
        for f in &self.functions {
            out.push_str(&lock(f).dump());
        }
        out
    }
}

/// Number of PIRQ lines of the PIIX3 (PIRQA#..PIRQD#).
pub const PIRQS: usize = 4;
/// PIRQRC value: routing disabled.
const PIRQ_DISABLE: u8 = 0x80;

/// The PIRQ line PCI slot `slot`'s pin `pin` (1 = INTA#) is wired to on
/// QEMU's `pc` board: the pins rotate by slot.
pub fn pirq_of(slot: u8, pin: u8) -> usize {
    (usize::from(slot) + usize::from(pin.max(1)) - 1) % PIRQS
}

#[derive(Debug, Default)]
struct PirqState {
    /// PIRQRC[A..D] (PIIX3 config 0x60-0x63): bit 7 disables, bits 3:0
    /// the ISA IRQ.
    routes: [u8; PIRQS],
    /// Which INTx sources assert each PIRQ (bit per source).
    asserted: [u32; PIRQS],
    /// ISA IRQs the PIRQs drive high now.
    driven: u16,
}

/// The PIIX3's PIRQ router: PCI INTx pins are wire-ORed onto four PIRQ
/// lines, each routed to an ISA IRQ by its PIRQRC register (82371SB
/// datasheet §2.2.11). IRQs 0-2, 8 and 13 are reserved there.
pub struct PirqRouter {
    state: Mutex<PirqState>,
    isa: Arc<IsaIrqRouter>,
    sources: Mutex<u32>,
}

impl std::fmt::Debug for PirqRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PirqRouter").finish_non_exhaustive()
    }
}

fn routable(irq: u8) -> bool {
    !matches!(irq, 0..=2 | 8 | 13)
}

impl PirqRouter {
    pub fn new(isa: Arc<IsaIrqRouter>) -> Self {
        PirqRouter {
            state: Mutex::new(PirqState {
                routes: [PIRQ_DISABLE; PIRQS],
                ..PirqState::default()
            }),
            isa,
            sources: Mutex::new(0),
        }
    }

    /// PIRQRC[`pirq`] was written with `value`.
    pub fn set_route(&self, pirq: usize, value: u8) {
        self.update(|s| {
            if let Some(r) = s.routes.get_mut(pirq) {
                *r = value;
            }
        });
    }

    pub fn routes(&self) -> [u8; PIRQS] {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).routes
    }

    /// The ISA IRQ `pirq` is routed to, if routing is on.
    pub fn irq_of(&self, pirq: usize) -> Option<u8> {
        let r = *self.routes().get(pirq)?;
        (r & PIRQ_DISABLE == 0 && routable(r & 0xF)).then_some(r & 0xF)
    }

    fn update(&self, f: impl FnOnce(&mut PirqState)) {
        let changes = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut s);
            let mut driven = 0u16;
            for p in 0..PIRQS {
                let r = s.routes[p];
                if s.asserted[p] != 0 && r & PIRQ_DISABLE == 0 && routable(r & 0xF) {
                    driven |= 1 << (r & 0xF);
                }
            }
            let changed = driven ^ s.driven;
            s.driven = driven;
            (changed, driven)
        };
        // Outside the lock: the ISA router reaches the PIC and IOAPIC.
        let (changed, driven) = changes;
        for irq in 0..16u8 {
            if changed & (1 << irq) != 0 {
                self.isa.set(irq, driven & (1 << irq) != 0);
            }
        }
    }

    /// The INTx pin `pin` of the function in `slot`, as a line.
    pub fn intx_line(self: &Arc<Self>, slot: u8, pin: u8) -> Arc<dyn IrqLine> {
        let source = {
            let mut n = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let s = *n % 32;
            *n += 1;
            s
        };
        Arc::new(IntxLine {
            router: self.clone(),
            pirq: pirq_of(slot, pin),
            bit: 1 << source,
        })
    }
}

struct IntxLine {
    router: Arc<PirqRouter>,
    pirq: usize,
    bit: u32,
}

impl IrqLine for IntxLine {
    fn set_level(&self, level: bool) {
        let (p, bit) = (self.pirq, self.bit);
        self.router.update(|s| {
            if level {
                s.asserted[p] |= bit;
            } else {
                s.asserted[p] &= !bit;
            }
        });
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DmaError {
    #[error("DMA at {addr:#x}: not guest RAM")]
    NotRam { addr: u64 },
    #[error("DMA at {addr:#x}: blocked by the IOMMU")]
    Blocked { addr: u64 },
}

/// A bus master's view of memory: device addresses (IOVAs when an IOMMU
/// translates them) of requester `source_id`.
pub trait DmaSpace: Send + Sync {
    fn read(&self, source_id: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    fn write(&self, source_id: u16, addr: u64, data: &[u8]) -> Result<(), DmaError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IsaIrqSink;

    #[test]
    fn bar_sizing_and_decoding() {
        let mut c = PciConfigSpace::new(0x1234, 0x11E8, 0x10, 0x00FF00);
        c.add_memory_bar(0, 1 << 20);
        // Sizing: all ones read back as the size mask.
        c.write(0x10, &[0xFF; 4]);
        assert_eq!(c.u32_at(0x10), 0xFFF0_0000);
        c.write(0x10, &0xFEB0_0000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), 0xFEB0_0000);
        // Unimplemented BARs stay 0.
        c.write(0x14, &[0xFF; 4]);
        assert_eq!(c.u32_at(0x14), 0);
        // Decoding needs memory space enabled.
        assert_eq!(c.bar_containing(0xFEB0_0010), None);
        c.write(COMMAND, &[COMMAND_MEMORY as u8, 0]);
        assert_eq!(c.bar_containing(0xFEB0_0010), Some((0, 0x10)));
        assert_eq!(c.bar_containing(0xFEC0_0000), None);
        // IDs are read-only.
        c.write(0, &[0; 4]);
        assert_eq!(c.u32_at(0), 0x11E8_1234);
        assert!(c.summary().contains("BAR0 0xfeb00000+0x100000"));
    }

    #[test]
    fn msi_capability() {
        let mut c = PciConfigSpace::new(0x1234, 0x11E8, 0x10, 0x00FF00);
        c.add_msi_capability();
        assert_eq!(c.u16_at(STATUS) & STATUS_CAP_LIST, STATUS_CAP_LIST);
        let at = c.config[CAPABILITIES_POINTER] as usize;
        assert_eq!(c.config[at], CAP_ID_MSI);
        assert_eq!(c.config[at + 1], 0);
        assert_eq!(c.u16_at(at + 2), MSI_64BIT);
        c.write(at + 4, &0xFEE0_1003u32.to_le_bytes());
        c.write(at + 8, &1u32.to_le_bytes());
        c.write(at + 12, &0xABCD_4041u32.to_le_bytes());
        assert_eq!(c.msi_message(), None);
        // Only the enable bit of the control word is writable.
        c.write(at + 2, &[0xFF, 0xFF]);
        assert_eq!(c.u16_at(at + 2), MSI_64BIT | MSI_ENABLE);
        assert_eq!(c.msi_message(), Some((0x1_FEE0_1000, 0x4041)));
    }

    #[test]
    fn intx_follows_status_disable_and_msi() {
        let mut c = PciConfigSpace::new(0x1234, 0x11E8, 0x10, 0x00FF00);
        c.add_msi_capability();
        assert!(c.set_interrupt_status(true));
        assert_eq!(c.u16_at(STATUS) & STATUS_INTERRUPT, STATUS_INTERRUPT);
        c.write(COMMAND + 1, &[(COMMAND_INTX_DISABLE >> 8) as u8]);
        assert!(!c.intx_level());
        // Interrupt status stays visible while disabled.
        assert_eq!(c.u16_at(STATUS) & STATUS_INTERRUPT, STATUS_INTERRUPT);
        c.write(COMMAND + 1, &[0]);
        assert!(c.intx_level());
        c.write(0x42, &[1]);
        assert!(!c.intx_level(), "MSI enabled: no INTx");
        assert!(!c.set_interrupt_status(false));
    }

    #[derive(Default)]
    struct Levels(Mutex<[bool; 16]>);
    impl IsaIrqSink for Levels {
        fn set_isa_irq(&self, irq: u8, level: bool) {
            self.0.lock().unwrap()[irq as usize] = level;
        }
    }

    #[test]
    fn pirq_routing_wire_ors_and_follows_reroutes() {
        let isa = Arc::new(IsaIrqRouter::new());
        let levels = Arc::new(Levels::default());
        isa.connect(levels.clone());
        let r = Arc::new(PirqRouter::new(isa));
        // Slot 3 INTA# and slot 2 INTB# share PIRQD (index 3).
        assert_eq!(pirq_of(3, 1), 3);
        assert_eq!(pirq_of(2, 2), 3);
        let a = r.intx_line(3, 1);
        let b = r.intx_line(2, 2);
        a.raise();
        assert!(!levels.0.lock().unwrap()[11], "routing disabled at reset");
        r.set_route(3, 11);
        assert!(levels.0.lock().unwrap()[11]);
        b.raise();
        a.lower();
        assert!(levels.0.lock().unwrap()[11], "B still asserts");
        // Re-route PIRQD to IRQ 10: 11 falls, 10 rises.
        r.set_route(3, 10);
        assert!(!levels.0.lock().unwrap()[11]);
        assert!(levels.0.lock().unwrap()[10]);
        // Reserved IRQs are not routed.
        r.set_route(3, 8);
        assert!(!levels.0.lock().unwrap()[8] && !levels.0.lock().unwrap()[10]);
        assert_eq!(r.irq_of(3), None);
        r.set_route(3, 0x0B);
        b.lower();
        assert!(!levels.0.lock().unwrap()[11]);
    }

    #[test]
    fn fuzz_config_space_no_panic() {
        let mut c = PciConfigSpace::new(0x1234, 0x11E8, 0x10, 0x00FF00);
        c.add_memory_bar(0, 1 << 20);
        c.add_msi_capability();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let reg = (x % 300) as usize;
            let len = [1usize, 2, 4][(x >> 10) as usize % 3];
            let v = (x >> 20).to_le_bytes();
            if x & (1 << 50) != 0 {
                c.write(reg, &v[..len]);
            } else {
                let mut b = [0u8; 4];
                c.read(reg, &mut b[..len]);
            }
            let _ = c.bar_containing(x >> 32);
            let _ = c.msi_message();
            assert_eq!(c.u32_at(0), 0x11E8_1234);
            assert_eq!(c.config.len(), 256);
        }
    }
}
