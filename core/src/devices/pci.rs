//! PCI configuration mechanism #1 (PCI Local Bus Specification 3.0 §3.2.2.3.2)
//! at ports 0xCF8-0xCFF, with the two functions QEMU's `pc` machine always
//! has on bus 0: the i440FX host bridge (00:00.0, 8086:1237) and the PIIX3
//! PCI-to-ISA bridge (00:01.0, 8086:7000). Nothing else answers: reads of
//! any other bus, device or function return all ones.
//!
//! Port layout, as QEMU decodes it (one device over 0xCF8..0xD00):
//! - 0xCF8, 32-bit access only: CONFIG_ADDRESS (bit 31 enable, bus 23:16,
//!   device 15:11, function 10:8, register 7:0), read back as written;
//! - 0xCF9, byte access only: the PIIX3 reset control register
//!   ([`ResetControl`]); QEMU lays it over CONFIG_ADDRESS the same way;
//! - 0xCFC-0xCFF, 8/16/32-bit: CONFIG_DATA, the register selected by
//!   CONFIG_ADDRESS plus the port's byte offset;
//! - any other access to 0xCF8-0xCFB reads all ones and is dropped.
//!
//! With CONFIG_ADDRESS bit 31 clear, CONFIG_DATA reads all ones and drops
//! writes. Writable configuration bits follow QEMU's masks: the command
//! register's I/O, memory, bus master, parity, SERR and INTx-disable bits,
//! the cache line size, the interrupt line, and the device-specific space
//! 0x40-0xFF (PAM, SMRAM, PIRQ routing... are stored, with no side
//! effect); the rest of the header is read-only.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::control::MachineControl;
use crate::devices::acpi_pm::{ResetControl, ResetControlState};
use crate::devices::pci_device::{PirqRouter, SharedPciFunction, PIRQS};

/// First port of the device (CONFIG_ADDRESS).
pub const PCI_CONFIG_PORT: u64 = 0xCF8;
/// Ports decoded: 0xCF8..0xD00.
pub const PCI_CONFIG_PORTS: u64 = 8;

/// Size of a conventional configuration space.
pub const PCI_CONFIG_SPACE_SIZE: usize = 256;

const CONFIG_ADDRESS_OFFSET: u64 = 0;
const RESET_CONTROL_OFFSET: u64 = 1;
const CONFIG_DATA_OFFSET: u64 = 4;

/// CONFIG_ADDRESS enable bit.
const CONFIG_ENABLE: u32 = 1 << 31;

// Header registers.
pub(crate) const VENDOR_ID: usize = 0x00;
pub(crate) const DEVICE_ID: usize = 0x02;
pub(crate) const COMMAND: usize = 0x04;
pub(crate) const STATUS: usize = 0x06;
pub(crate) const REVISION_ID: usize = 0x08;
pub(crate) const CLASS_PROG: usize = 0x09;
pub(crate) const CACHE_LINE_SIZE: usize = 0x0C;
const HEADER_TYPE: usize = 0x0E;
pub(crate) const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
pub(crate) const SUBSYSTEM_ID: usize = 0x2E;
pub(crate) const INTERRUPT_LINE: usize = 0x3C;
const HEADER_SIZE: usize = 0x40;

/// Command bits a guest may change (QEMU's `pci_init_wmask`).
pub(crate) const COMMAND_WMASK: u16 = 0x0001 // I/O space
    | 0x0002 // memory space
    | 0x0004 // bus master
    | 0x0040 // parity error response
    | 0x0100 // SERR# enable
    | 0x0400; // interrupt disable

/// Status: DEVSEL timing medium.
const STATUS_DEVSEL_MEDIUM: u16 = 0x0200;
/// Header type bit 7: multi-function device.
const HEADER_MULTI_FUNCTION: u8 = 0x80;

pub const INTEL_VENDOR_ID: u16 = 0x8086;
/// 82441FX PMC (i440FX host bridge).
pub const I440FX_DEVICE_ID: u16 = 0x1237;
/// 82371SB PIIX3 ISA bridge.
pub const PIIX3_DEVICE_ID: u16 = 0x7000;
/// The subsystem QEMU gives its devices (Red Hat, "QEMU virtual machine").
pub(crate) const QEMU_SUBSYSTEM_VENDOR_ID: u16 = 0x1AF4;
pub(crate) const QEMU_SUBSYSTEM_ID: u16 = 0x1100;

/// i440FX register QEMU fills with the RAM size in 8 MiB units (for old
/// coreboot).
const I440FX_COREBOOT_RAM_SIZE: usize = 0x57;
/// PIIX3 PIRQRC[A..D]: PCI interrupt routing (82371SB §2.2.11).
const PIIX3_PIRQRC: usize = 0x60;
/// i440FX SMRAM control register.
const I440FX_SMRAM: usize = 0x72;

/// One function's configuration space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunctionState {
    /// Device number on bus 0.
    pub device: u8,
    /// Function number.
    pub function: u8,
    /// The 256 bytes of configuration space.
    pub config: [u8; PCI_CONFIG_SPACE_SIZE],
}

impl PciFunctionState {
    fn blank(device: u8, function: u8) -> Self {
        PciFunctionState {
            device,
            function,
            config: [0; PCI_CONFIG_SPACE_SIZE],
        }
    }

    fn set_u16(&mut self, reg: usize, v: u16) {
        let b = v.to_le_bytes();
        self.config[reg] = b[0];
        self.config[reg + 1] = b[1];
    }

    fn u16_at(&self, reg: usize) -> u16 {
        u16::from_le_bytes([self.config[reg], self.config[reg + 1]])
    }

    fn header(&mut self, device_id: u16, revision: u8, class: u32, header_type: u8) {
        self.set_u16(VENDOR_ID, INTEL_VENDOR_ID);
        self.set_u16(DEVICE_ID, device_id);
        self.config[REVISION_ID] = revision;
        let c = class.to_le_bytes();
        self.config[CLASS_PROG..CLASS_PROG + 3].copy_from_slice(&c[..3]);
        self.config[HEADER_TYPE] = header_type;
        self.set_u16(SUBSYSTEM_VENDOR_ID, QEMU_SUBSYSTEM_VENDOR_ID);
        self.set_u16(SUBSYSTEM_ID, QEMU_SUBSYSTEM_ID);
    }
}

/// The i440FX host bridge at 00:00.0 as QEMU resets it.
fn i440fx(ram_size: u64) -> PciFunctionState {
    let mut f = PciFunctionState::blank(0, 0);
    f.header(I440FX_DEVICE_ID, 0x02, 0x06_00_00, 0x00);
    f.config[I440FX_COREBOOT_RAM_SIZE] = (ram_size >> 23).min(255) as u8;
    f.config[I440FX_SMRAM] = 0x02;
    f
}

/// The PIIX3 ISA bridge at 00:01.0 as QEMU's `piix_reset` leaves it.
fn piix3() -> PciFunctionState {
    let mut f = PciFunctionState::blank(1, 0);
    f.header(PIIX3_DEVICE_ID, 0x00, 0x06_01_00, HEADER_MULTI_FUNCTION);
    // I/O, memory and bus master on; DEVSEL medium.
    f.set_u16(COMMAND, 0x0007);
    f.set_u16(STATUS, STATUS_DEVSEL_MEDIUM);
    for (reg, v) in [
        (0x4C, 0x4D), // IORT: ISA I/O recovery timer
        (0x4E, 0x03), // XBCS: BIOS, keyboard and RTC decode
        (0x60, 0x80), // PIRQRC[A..D]: routing disabled
        (0x61, 0x80),
        (0x62, 0x80),
        (0x63, 0x80),
        (0x69, 0x02), // TOM: top of memory
        (0x70, 0x80), // MBIRQ0: disabled
        (0x76, 0x0C), // MBDMA0/1: disabled
        (0x77, 0x0C),
        (0x78, 0x02), // PCSC
        (0xA0, 0x08), // SMICNTL
        (0xA8, 0x0F), // FTMR: fast off timer
    ] {
        f.config[reg] = v;
    }
    f
}

/// Which bits of configuration register `reg` a guest may write.
fn wmask(reg: usize) -> u8 {
    match reg {
        COMMAND => COMMAND_WMASK.to_le_bytes()[0],
        r if r == COMMAND + 1 => COMMAND_WMASK.to_le_bytes()[1],
        CACHE_LINE_SIZE | INTERRUPT_LINE => 0xFF,
        r if (HEADER_SIZE..PCI_CONFIG_SPACE_SIZE).contains(&r) => 0xFF,
        _ => 0,
    }
}

/// Everything the configuration mechanism holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciHostState {
    /// CONFIG_ADDRESS as last written.
    pub config_address: u32,
    /// The functions on bus 0.
    pub functions: Vec<PciFunctionState>,
    /// The reset control register at 0xCF9.
    pub reset_control: ResetControlState,
}

/// PCI configuration mechanism #1 with the i440FX and PIIX3, and the
/// PIIX3 reset control register.
pub struct PciHost {
    config_address: u32,
    functions: Vec<PciFunctionState>,
    reset_control: ResetControl,
    /// Endpoints (`-device` functions): (device number, function 0).
    endpoints: Vec<(u8, SharedPciFunction)>,
    /// Where the PIIX3's PIRQRC registers take effect.
    pirq: Option<Arc<PirqRouter>>,
}

impl std::fmt::Debug for PciHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHost")
            .field("config_address", &self.config_address)
            .field("reset_control", &self.reset_control)
            .finish_non_exhaustive()
    }
}

impl PciHost {
    /// The `pc` machine's PCI bus 0 for a guest of `ram_size` bytes; a
    /// write of RST_CPU to 0xCF9 asks `control` for a reset.
    pub fn new(control: Arc<MachineControl>, ram_size: u64) -> Self {
        PciHost {
            config_address: 0,
            functions: vec![i440fx(ram_size), piix3()],
            reset_control: ResetControl::new(control),
            endpoints: Vec::new(),
            pirq: None,
        }
    }

    /// Routes PCI INTx through `pirq` as the PIIX3's PIRQRC registers say.
    pub fn set_pirq_router(&mut self, pirq: Arc<PirqRouter>) {
        self.pirq = Some(pirq);
        self.apply_pirq_routes();
    }

    /// Hands the PIIX3's PIRQRC registers to the PIRQ router.
    fn apply_pirq_routes(&self) {
        let (Some(pirq), Some(piix3)) = (&self.pirq, self.functions.iter().find(|f| f.device == 1))
        else {
            return;
        };
        for n in 0..PIRQS {
            pirq.set_route(n, piix3.config[PIIX3_PIRQRC + n]);
        }
    }

    /// Puts `function` at device number `device` (function 0) of bus 0.
    pub fn add_endpoint(&mut self, device: u8, function: SharedPciFunction) {
        self.endpoints.push((device, function));
    }

    /// Writes a PIIX3 register, as firmware does (SeaBIOS's PIRQ routing).
    pub fn write_piix3(&mut self, reg: u8, value: u8) {
        let saved = self.config_address;
        self.config_address = CONFIG_ENABLE | (1 << 11) | u32::from(reg & 0xFC);
        self.config_data_write(u64::from(reg & 3), &[value]);
        self.config_address = saved;
    }

    /// The endpoint CONFIG_ADDRESS selects, if any.
    fn selected_endpoint(&self) -> Option<SharedPciFunction> {
        let a = self.config_address;
        if a & CONFIG_ENABLE == 0 || (a >> 16) & 0xFF != 0 || (a >> 8) & 0x7 != 0 {
            return None;
        }
        let device = ((a >> 11) & 0x1F) as u8;
        self.endpoints
            .iter()
            .find(|(d, _)| *d == device)
            .map(|(_, f)| f.clone())
    }

    /// CONFIG_ADDRESS as last written.
    pub fn config_address(&self) -> u32 {
        self.config_address
    }

    pub fn save_state(&self) -> PciHostState {
        PciHostState {
            config_address: self.config_address,
            functions: self.functions.clone(),
            reset_control: self.reset_control.save_state(),
        }
    }

    pub fn restore_state(&mut self, state: PciHostState) {
        self.config_address = state.config_address;
        self.functions = state.functions;
        self.reset_control.restore_state(state.reset_control);
        self.apply_pirq_routes();
    }

    /// The function CONFIG_ADDRESS selects, if it exists.
    fn selected(&mut self) -> Option<&mut PciFunctionState> {
        let a = self.config_address;
        if a & CONFIG_ENABLE == 0 || (a >> 16) & 0xFF != 0 {
            return None;
        }
        let device = ((a >> 11) & 0x1F) as u8;
        let function = ((a >> 8) & 0x7) as u8;
        self.functions
            .iter_mut()
            .find(|f| f.device == device && f.function == function)
    }

    /// First configuration register a CONFIG_DATA access at byte `port`
    /// (0..3) reaches. Like QEMU, the low bits of CONFIG_ADDRESS are
    /// combined with the port's.
    fn data_register(&self, port: u64) -> usize {
        ((self.config_address as usize) & 0xFF) | ((port & 3) as usize)
    }

    fn config_data_read(&mut self, port: u64, data: &mut [u8]) {
        let reg = self.data_register(port);
        if let Some(f) = self.selected_endpoint() {
            f.lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_read(reg, data);
            return;
        }
        match self.selected() {
            Some(f) => {
                for (i, d) in data.iter_mut().enumerate() {
                    *d = f.config.get(reg + i).copied().unwrap_or(0xFF);
                }
            }
            None => data.fill(0xFF),
        }
    }

    fn config_data_write(&mut self, port: u64, data: &[u8]) {
        let reg = self.data_register(port);
        if let Some(f) = self.selected_endpoint() {
            f.lock()
                .unwrap_or_else(|p| p.into_inner())
                .config_write(reg, data);
            return;
        }
        let mut pirq_written = false;
        if let Some(f) = self.selected() {
            for (i, &v) in data.iter().enumerate() {
                let r = reg + i;
                if let Some(c) = f.config.get_mut(r) {
                    let m = wmask(r);
                    *c = (*c & !m) | (v & m);
                }
                if f.device == 1 && (PIIX3_PIRQRC..PIIX3_PIRQRC + PIRQS).contains(&r) {
                    pirq_written = true;
                }
            }
        }
        if pirq_written {
            self.apply_pirq_routes();
        }
    }
}

impl BusDevice for PciHost {
    fn name(&self) -> &'static str {
        "pci-config"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (CONFIG_ADDRESS_OFFSET, 4) => data.copy_from_slice(&self.config_address.to_le_bytes()),
            (RESET_CONTROL_OFFSET, 1) => data[0] = self.reset_control.read_byte(),
            (o, n) if o >= CONFIG_DATA_OFFSET && n <= 4 => {
                self.config_data_read(o - CONFIG_DATA_OFFSET, data)
            }
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (CONFIG_ADDRESS_OFFSET, &[a, b, c, d]) => {
                self.config_address = u32::from_le_bytes([a, b, c, d]);
            }
            (RESET_CONTROL_OFFSET, &[v]) => self.reset_control.write_byte(v),
            (o, d) if o >= CONFIG_DATA_OFFSET && d.len() <= 4 => {
                self.config_data_write(o - CONFIG_DATA_OFFSET, d)
            }
            _ => {}
        }
    }

    fn dump(&self) -> String {
        let mut out = String::new();
        let a = self.config_address;
        let _ = writeln!(
            out,
            "PCI config @{PCI_CONFIG_PORT:#x}: CONFIG_ADDRESS={a:#010x} (enable={} bus={} dev={} fn={} reg={:#04x})",
            a >> 31,
            (a >> 16) & 0xFF,
            (a >> 11) & 0x1F,
            (a >> 8) & 0x7,
            a & 0xFF
        );
        for f in &self.functions {
            let class = u32::from_le_bytes([
                f.config[CLASS_PROG],
                f.config[CLASS_PROG + 1],
                f.config[CLASS_PROG + 2],
                0,
            ]);
            let _ = writeln!(
                out,
                "  00:{:02x}.{} {:04x}:{:04x} class {class:06x} rev {:02x} command {:04x} status {:04x}",
                f.device,
                f.function,
                f.u16_at(VENDOR_ID),
                f.u16_at(DEVICE_ID),
                f.config[REVISION_ID],
                f.u16_at(COMMAND),
                f.u16_at(STATUS)
            );
        }
        for (device, f) in &self.endpoints {
            let g = f.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(
                out,
                "  00:{device:02x}.0 {}: {}",
                g.name(),
                g.config_space().summary()
            );
        }
        if let Some(p) = &self.pirq {
            let _ = writeln!(out, "  PIRQRC[A-D] {:02x?}", p.routes());
        }
        out.push_str("  ");
        out.push_str(&self.reset_control.dump());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::StopRequest;

    fn host() -> (PciHost, Arc<MachineControl>) {
        let c = Arc::new(MachineControl::new());
        (PciHost::new(c.clone(), 128 << 20), c)
    }

    fn addr(dev: u32, func: u32, reg: u32) -> u32 {
        CONFIG_ENABLE | (dev << 11) | (func << 8) | reg
    }

    fn outl(p: &mut PciHost, port: u64, v: u32) {
        p.write(port - PCI_CONFIG_PORT, &v.to_le_bytes());
    }

    fn inl(p: &mut PciHost, port: u64) -> u32 {
        let mut b = [0u8; 4];
        p.read(port - PCI_CONFIG_PORT, &mut b);
        u32::from_le_bytes(b)
    }

    fn inw(p: &mut PciHost, port: u64) -> u16 {
        let mut b = [0u8; 2];
        p.read(port - PCI_CONFIG_PORT, &mut b);
        u16::from_le_bytes(b)
    }

    fn inb(p: &mut PciHost, port: u64) -> u8 {
        let mut b = [0u8; 1];
        p.read(port - PCI_CONFIG_PORT, &mut b);
        b[0]
    }

    fn cfg_read32(p: &mut PciHost, dev: u32, func: u32, reg: u32) -> u32 {
        outl(p, 0xCF8, addr(dev, func, reg & 0xFC));
        inl(p, 0xCFC)
    }

    #[test]
    fn bridges_identify_with_all_access_sizes() {
        let (mut p, _) = host();
        // 32-bit.
        assert_eq!(cfg_read32(&mut p, 0, 0, 0), 0x1237_8086);
        assert_eq!(cfg_read32(&mut p, 0, 0, 8), 0x0600_0002);
        assert_eq!(cfg_read32(&mut p, 0, 0, 0x0C) >> 16 & 0xFF, 0x00);
        assert_eq!(cfg_read32(&mut p, 0, 0, 0x2C), 0x1100_1AF4);
        assert_eq!(cfg_read32(&mut p, 1, 0, 0), 0x7000_8086);
        assert_eq!(cfg_read32(&mut p, 1, 0, 4), 0x0200_0007);
        assert_eq!(cfg_read32(&mut p, 1, 0, 8), 0x0601_0000);
        // 16-bit at the right byte offsets of the data window.
        outl(&mut p, 0xCF8, addr(1, 0, 0));
        assert_eq!(inw(&mut p, 0xCFC), 0x8086);
        assert_eq!(inw(&mut p, 0xCFE), 0x7000);
        outl(&mut p, 0xCF8, addr(0, 0, 0x08));
        assert_eq!(inw(&mut p, 0xCFE), 0x0600);
        // 8-bit: header type and class bytes.
        outl(&mut p, 0xCF8, addr(1, 0, 0x0C));
        assert_eq!(inb(&mut p, 0xCFE), 0x80);
        outl(&mut p, 0xCF8, addr(0, 0, 0x0C));
        assert_eq!(inb(&mut p, 0xCFE), 0x00);
        outl(&mut p, 0xCF8, addr(0, 0, 0x08));
        assert_eq!(inb(&mut p, 0xCF8 + 4), 0x02);
        assert_eq!(inb(&mut p, 0xCFF), 0x06);
        // The RAM size register QEMU fills: 128 MiB / 8 MiB.
        outl(&mut p, 0xCF8, addr(0, 0, 0x54));
        assert_eq!(inb(&mut p, 0xCFF), 16);
        assert!(p.dump().contains("00:01.0 8086:7000 class 060100"));
    }

    #[test]
    fn absent_functions_and_disabled_access_read_all_ones() {
        let (mut p, _) = host();
        for (dev, func) in [(2, 0), (31, 7), (0, 1), (1, 1), (1, 7)] {
            assert_eq!(cfg_read32(&mut p, dev, func, 0), 0xFFFF_FFFF);
            assert_eq!(inw(&mut p, 0xCFE), 0xFFFF);
            assert_eq!(inb(&mut p, 0xCFD), 0xFF);
        }
        // Another bus.
        outl(&mut p, 0xCF8, CONFIG_ENABLE | (1 << 16));
        assert_eq!(inl(&mut p, 0xCFC), 0xFFFF_FFFF);
        // Enable bit clear.
        outl(&mut p, 0xCF8, 0);
        assert_eq!(inl(&mut p, 0xCFC), 0xFFFF_FFFF);
        // Writes there change nothing.
        outl(&mut p, 0xCFC, 0);
        assert_eq!(cfg_read32(&mut p, 0, 0, 0), 0x1237_8086);
    }

    #[test]
    fn config_address_decodes_only_as_dword() {
        let (mut p, c) = host();
        // Linux's pci_check_type1: outb 0xCFB, then the 32-bit round trip.
        p.write(3, &[0x01]);
        outl(&mut p, 0xCF8, 0x8000_0000);
        assert_eq!(inl(&mut p, 0xCF8), 0x8000_0000);
        assert_eq!(inw(&mut p, 0xCF8), 0xFFFF);
        assert_eq!(inb(&mut p, 0xCFA), 0xFF);
        p.write(0, &[0x12, 0x34]);
        assert_eq!(p.config_address(), 0x8000_0000);
        // A byte at 0xCF9 is the reset control register.
        p.write(1, &[0x02]);
        assert_eq!(inb(&mut p, 0xCF9), 0x02);
        assert_eq!(p.config_address(), 0x8000_0000);
        assert!(!c.stop_requested());
        p.write(1, &[0x06]);
        assert_eq!(c.stop_request(), Some(StopRequest::Reset));
    }

    #[test]
    fn only_writable_bits_change() {
        let (mut p, _) = host();
        // Command: all ones written, QEMU's mask kept.
        outl(&mut p, 0xCF8, addr(0, 0, 4));
        outl(&mut p, 0xCFC, 0xFFFF_FFFF);
        assert_eq!(inl(&mut p, 0xCFC), u32::from(COMMAND_WMASK));
        // Byte write to the command register's low byte.
        p.write(4, &[0x00]);
        assert_eq!(inw(&mut p, 0xCFC), COMMAND_WMASK & 0xFF00);
        // IDs, class and header type are read-only.
        outl(&mut p, 0xCF8, addr(1, 0, 0));
        outl(&mut p, 0xCFC, 0);
        assert_eq!(inl(&mut p, 0xCFC), 0x7000_8086);
        outl(&mut p, 0xCF8, addr(1, 0, 0x0C));
        outl(&mut p, 0xCFC, 0xFFFF_FFFF);
        assert_eq!(inl(&mut p, 0xCFC), 0x0080_00FF);
        // BARs read 0 and stay 0 (no BARs on these functions).
        outl(&mut p, 0xCF8, addr(0, 0, 0x10));
        outl(&mut p, 0xCFC, 0xFFFF_FFFF);
        assert_eq!(inl(&mut p, 0xCFC), 0);
        // Interrupt line is writable, pin is not.
        outl(&mut p, 0xCF8, addr(1, 0, 0x3C));
        outl(&mut p, 0xCFC, 0xFFFF_FFFF);
        assert_eq!(inl(&mut p, 0xCFC), 0x0000_00FF);
        // PIIX3 PIRQ routing (device-specific space) is writable.
        outl(&mut p, 0xCF8, addr(1, 0, 0x60));
        assert_eq!(inl(&mut p, 0xCFC), 0x8080_8080);
        p.write(5, &[0x0B]);
        assert_eq!(inl(&mut p, 0xCFC), 0x8080_0B80);
        // State round trip.
        let saved = p.save_state();
        let (mut q, _) = host();
        q.restore_state(saved.clone());
        assert_eq!(q.save_state(), saved);
        assert_eq!(cfg_read32(&mut q, 1, 0, 0x60), 0x8080_0B80);
    }

    #[test]
    fn fuzz_no_panic() {
        let (mut p, _) = host();
        let mut x: u64 = 0xD1B5_4A32_D192_ED03;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = [1usize, 2, 4, 3, 0][(x % 5) as usize];
            let off = (x >> 8) % PCI_CONFIG_PORTS;
            let bytes = (x >> 16).to_le_bytes();
            if (x >> 40) % 8 == 0 {
                // Aim CONFIG_ADDRESS at an interesting place.
                let a = (x >> 20) as u32 & 0x8000_0FFF;
                outl(&mut p, 0xCF8, a);
            } else if x & (1 << 41) != 0 {
                // Never reset through 0xCF9, to keep going.
                let mut b = [0u8; 4];
                b[..len].copy_from_slice(&bytes[..len]);
                if off == 1 {
                    b[0] &= !0x04;
                }
                p.write(off, &b[..len]);
            } else {
                let mut b = [0u8; 4];
                p.read(off, &mut b[..len]);
            }
            // Identity registers never change.
            let keep = p.config_address();
            assert_eq!(cfg_read32(&mut p, 0, 0, 0), 0x1237_8086);
            assert_eq!(cfg_read32(&mut p, 1, 0, 8), 0x0601_0000);
            outl(&mut p, 0xCF8, keep);
        }
        assert_eq!(p.save_state().functions.len(), 2);
    }
}
