//! The `pc` machine's optional devices (QEMU's `-device`): PCI endpoints
//! on bus 0 and the Intel VT-d remapping unit, and the paths between them
//! and the rest of the machine — bus-master DMA into guest RAM, PCI MSIs and
//! IOAPIC messages through interrupt remapping, INTx through the PIIX3's
//! PIRQ routing.
//!
//! Firmware's part is done here as SeaBIOS does it on QEMU: PIRQA-D routed
//! to IRQ 10, 10, 11, 11 with those IRQs level-triggered in the ELCR, each
//! function's interrupt line set, its memory BARs placed top-down below the
//! IOAPIC and memory decoding enabled.

use std::sync::{Arc, Mutex, OnceLock};

use crate::devices::apic_bus::{ApicBus, ApicMessage};
use crate::devices::apic_router::ApicRouter;
use crate::devices::edu::Edu;
use crate::devices::pci::PciHost;
use crate::devices::pci_device::{
    DmaError, DmaSpace, PciFunction, PirqRouter, SharedPciFunction, PCI_MMIO_END,
};
use crate::devices::vtd::{Vtd, VtdConfig};
use crate::irq::{IsaIrqRouter, MsiSink};
use crate::memory::GuestMemory;

/// A device a `pc` machine can be given beyond its fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcDevice {
    /// QEMU's educational PCI device (1234:11e8).
    Edu,
    /// An Intel VT-d remapping unit at 0xFED90000 (QEMU's `intel-iommu`).
    IntelIommu(VtdConfig),
}

/// SeaBIOS's PIRQ routing on `pc`: PIRQA-D to IRQ 10, 10, 11, 11.
pub const SEABIOS_PIRQ_IRQS: [u8; 4] = [10, 10, 11, 11];
/// Where the first `-device` function goes (00:01.0 is the PIIX3, and
/// QEMU's `-nodefaults` leaves 00:02.0 free).
pub const FIRST_DEVICE_SLOT: u8 = 2;
/// Slots 2..=31 of bus 0.
pub const MAX_PCI_DEVICES: usize = 30;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The APIC router, known once the interrupt controllers are built (the
/// remapping unit exists before them: the IOAPIC sends through it).
#[derive(Default)]
pub(crate) struct LateRouter(OnceLock<Arc<ApicRouter>>);

impl LateRouter {
    pub(crate) fn set(&self, router: Arc<ApicRouter>) {
        let _ = self.0.set(router);
    }
}

/// The remapping unit's own interrupts (fault and invalidation events) are
/// not remapped (VT-d 5.1.6): straight to the LAPICs.
impl MsiSink for LateRouter {
    fn msi(&self, _source_id: Option<u16>, address: u64, data: u32) {
        if let Some(r) = self.0.get() {
            r.msi(address, data);
        }
    }
}

/// The interrupt side of the remapping unit: PCI MSIs and IOAPIC messages
/// pass through its interrupt remapping (when it has one) on their way to
/// the LAPICs.
pub(crate) struct InterruptPath {
    pub(crate) router: Arc<LateRouter>,
    pub(crate) vtd: Option<Arc<Mutex<Vtd>>>,
}

impl InterruptPath {
    fn deliver(&self, msg: &ApicMessage) {
        if let Some(r) = self.router.0.get() {
            r.deliver(msg);
        }
    }

    /// An interrupt write through the remapping unit; a blocked one is
    /// dropped (the unit records the fault). The flag says the destination
    /// is in x2APIC format.
    fn remap(
        &self,
        source_id: Option<u16>,
        address: u64,
        data: u32,
    ) -> Option<(ApicMessage, bool)> {
        match &self.vtd {
            Some(vtd) => {
                let mut v = lock(vtd);
                let x2apic = v.x2apic_destinations();
                let remapped = v.remap_interrupt(source_id, address, data).ok()?;
                // A compatibility-format interrupt passed through keeps its
                // 8-bit destination.
                let x2apic = x2apic && address & (1 << 4) != 0;
                Some((remapped, x2apic))
            }
            None => crate::devices::apic_bus::decode_msi(address, data).map(|m| (m, false)),
        }
    }

    fn deliver_remapped(&self, msg: &ApicMessage, x2apic: bool) {
        match (self.router.0.get(), x2apic) {
            (Some(r), true) => r.deliver_x2apic_format(msg),
            _ => self.deliver(msg),
        }
    }
}

impl MsiSink for InterruptPath {
    fn msi(&self, source_id: Option<u16>, address: u64, data: u32) {
        // A write outside the interrupt window is a memory write, which no
        // device here makes through its MSI registers: dropped.
        if address >> 20 != 0xFEE {
            return;
        }
        if let Some((msg, x2apic)) = self.remap(source_id, address, data) {
            if let Some(r) = self.router.0.get() {
                r.trace_msi(address, data, msg.vector);
            }
            self.deliver_remapped(&msg, x2apic);
        }
    }
}

impl ApicBus for InterruptPath {
    fn deliver(&self, msg: &ApicMessage) {
        InterruptPath::deliver(self, msg)
    }
    fn eoi(&self, vector: u8) {
        if let Some(r) = self.router.0.get() {
            r.eoi(vector);
        }
    }
    /// QEMU's IOAPIC sends without a requester ID, so source-ID checks in
    /// remapping entries do not apply to it (Linux and kvm-unit-tests rely
    /// on that there).
    fn deliver_from_ioapic(&self, msg: &ApicMessage, address: u64, data: u32) {
        if self.vtd.is_none() {
            return self.deliver(msg);
        }
        if let Some((m, x2apic)) = self.remap(None, address, data) {
            self.deliver_remapped(&m, x2apic);
        }
    }
}

/// Bus-master memory: device addresses through the remapping unit's DMA
/// translation (identity while it is off), then guest RAM. Writes are
/// logged for processors caching code from the page (a DMA'd program).
pub(crate) struct PcDma {
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) vtd: Option<Arc<Mutex<Vtd>>>,
}

/// The code-watch writer ID of bus masters (no processor has it).
const DMA_WRITER: u64 = u64::MAX;

impl PcDma {
    /// Splits `[addr, addr + len)` at 4 KiB pages and calls `f` with each
    /// piece's guest-physical address and its range in the buffer.
    fn each_page(
        &self,
        source_id: u16,
        addr: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        let mut done = 0usize;
        while done < len {
            let a = addr.wrapping_add(done as u64);
            let n = ((0x1000 - (a & 0xFFF)) as usize).min(len - done);
            let gpa = match &self.vtd {
                Some(vtd) => lock(vtd)
                    .translate(source_id, a, n as u64, write)
                    .map_err(|_| DmaError::Blocked { addr: a })?,
                None => a,
            };
            f(gpa, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

impl DmaSpace for PcDma {
    fn read(&self, source_id: u16, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        self.each_page(source_id, addr, len, false, |gpa, r| {
            self.mem
                .read(gpa, &mut buf[r])
                .map_err(|_| DmaError::NotRam { addr: gpa })
        })
    }

    fn write(&self, source_id: u16, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        self.each_page(source_id, addr, data.len(), true, |gpa, r| {
            self.mem
                .write(gpa, &data[r])
                .map_err(|_| DmaError::NotRam { addr: gpa })?;
            self.mem.code_watch().note_write(gpa, DMA_WRITER);
            Ok(())
        })
    }
}

/// The PCI requester ID of function 0 of `slot` on bus 0.
pub fn source_id(slot: u8) -> u16 {
    u16::from(slot) << 3
}

/// Builds the PCI functions of `devices`, puts them on `host` from
/// [`FIRST_DEVICE_SLOT`] on, and does SeaBIOS's part. Returns them for the
/// memory hole.
pub(crate) fn attach_pci_functions(
    devices: &[PcDevice],
    host: &mut PciHost,
    isa: &Arc<IsaIrqRouter>,
    interrupts: &Arc<InterruptPath>,
    dma: &Arc<PcDma>,
) -> Vec<SharedPciFunction> {
    let mut functions: Vec<SharedPciFunction> = Vec::new();
    let pirq = Arc::new(PirqRouter::new(isa.clone()));
    host.set_pirq_router(pirq.clone());
    for (n, irq) in SEABIOS_PIRQ_IRQS.iter().enumerate() {
        host.write_piix3(0x60 + n as u8, *irq);
    }
    // BARs top-down from the IOAPIC, each aligned to its size.
    let mut next_top = PCI_MMIO_END;
    let mut slot = FIRST_DEVICE_SLOT;
    for d in devices {
        let f: Arc<Mutex<Edu>> = match d {
            PcDevice::Edu => Arc::new(Mutex::new(Edu::new(
                source_id(slot),
                pirq.intx_line(slot, 1),
                interrupts.clone(),
                dma.clone(),
            ))),
            PcDevice::IntelIommu(_) => continue,
        };
        {
            let mut g = lock(&f);
            let pin = g.config_space().interrupt_pin();
            let line = pirq.irq_of(crate::devices::pci_device::pirq_of(slot, pin));
            let cfg = g.config_mut();
            for bar in 0..crate::devices::pci_device::PCI_BARS {
                let size = cfg.bar_size(bar);
                if size != 0 {
                    next_top = (next_top - size) & !(size - 1);
                    cfg.set_bar_address(bar, next_top as u32);
                }
            }
            cfg.set_command(crate::devices::pci_device::COMMAND_MEMORY);
            if let Some(line) = line {
                cfg.set_interrupt_line(line);
            }
        }
        host.add_endpoint(slot, f.clone());
        functions.push(f);
        slot += 1;
    }
    functions
}
