//! The `pc` machine: the devices of DESIGN.md at their QEMU `-M pc`
//! addresses, wired together, and left in the state SeaBIOS leaves them in.
//!
//! Interrupt wiring: ISA IRQ n reaches 8259A input n and IOAPIC pin n
//! (IRQ 0 reaches pin 2); the master 8259A's INT drives LINT0 of every LAPIC
//! (virtual-wire mode through ExtINT); the IOAPIC sends messages to the
//! LAPICs and receives their EOIs; the LAPICs are the injection ladder's
//! interrupt source.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use thiserror::Error;

use crate::bus::{Bus, BusDevice, BusError, BusKind, SharedDevice};
use crate::clock::{HostClock, SharedClock, VirtualClock};
use crate::control::MachineControl;
use crate::cpu::Msr;
use crate::devices::acpi_pm::{
    AcpiPm, IrqTee, RtcInput, ACPI_PM_BASE, ACPI_PM_PORTS, DEFAULT_S5_SLP_TYP, SCI_IRQ,
};
use crate::devices::apic_bus::ApicBus;
use crate::devices::apic_router::ApicRouter;
use crate::devices::cmos::{Cmos, CMOS_BASE, CMOS_PORTS, RTC_IRQ};
use crate::devices::debug_exit::{DebugExit, Port80, DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS, POST_PORT};
use crate::devices::fw_cfg::{FwCfg, FW_CFG_PORT, FW_CFG_PORTS};
use crate::devices::i8042::{i8042_ports, I8042, KEYBOARD_IRQ};
use crate::devices::ioapic::{IoApic, IoApicIrqSink, IOAPIC_BASE, IOAPIC_MMIO_SIZE};
use crate::devices::pci::{PciHost, PCI_CONFIG_PORT, PCI_CONFIG_PORTS};
use crate::devices::pci_device::PciMmio;
use crate::devices::pic::{Pic, PicIrqSink};
pub use crate::devices::pit::LostTickPolicy;
use crate::devices::pit::{Pit, PitTimer};
use crate::devices::serial::{Serial, COM1_BASE, COM1_IRQ, UART_PORTS};
use crate::devices::testdev::{
    SetIrqLine, TestdevIomem, TestdevIoport, TestdevIrq, TESTDEV_IOMEM_BASE, TESTDEV_IOMEM_SIZE,
    TESTDEV_IOPORT, TESTDEV_IOPORT_PORTS, TESTDEV_IRQ_LINES, TESTDEV_IRQ_PORT,
};
use crate::devices::vtd::{Vtd, VTD_MMIO_BASE, VTD_MMIO_SIZE};
use crate::irq::IsaIrqRouter;
use crate::ladder::{InterruptSource, NoInterrupts};
use crate::machine::{LocalMmio, Machine, MsrHandler};
use crate::memory::{GuestMemory, MemoryError};
pub use crate::pc_devices::PcDevice;
use crate::pc_devices::{attach_pci_functions, InterruptPath, LateRouter, PcDma};
use crate::timer::TimerSet;
use crate::trace::{Source, TraceEvent, TraceSink, TracedLine, Tracer};
use crate::vcpu::{Doorbell, Vcpu, VcpuResult};

/// The guest TSC rate Tandem's LAPIC and the interpreter use (KVM's own
/// TSC rate is the host's; the TSC-deadline timer converts with this).
pub const DEFAULT_TSC_KHZ: u64 = 1_000_000;

/// Which clock the devices run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockKind {
    /// Host monotonic time: run fast.
    #[default]
    Host,
    /// Time moved by the run loop only: reproducible runs.
    Virtual,
}

/// Whose interrupt controllers and PIT the guest talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqchipKind {
    /// Tandem's device model.
    #[default]
    User,
    /// The processor's own (KVM's in-kernel irqchip and PIT): the machine
    /// leaves them out and the backend connects the ISA lines.
    Kernel,
}

pub struct PcConfig {
    pub mem_size: u64,
    pub vcpus: u32,
    pub clock: ClockKind,
    pub irqchip: IrqchipKind,
    /// What the PIT does with ticks a guest does not take in time.
    pub lost_ticks: LostTickPolicy,
    /// Where COM1's output goes.
    pub serial_out: Box<dyn Write + Send>,
    /// Devices beyond the fixed set (QEMU's `-device`).
    pub devices: Vec<PcDevice>,
}

#[derive(Debug, Error)]
pub enum PcError {
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("device map: {0}")]
    Bus(#[from] BusError),
    #[error("--smp must be between 1 and 255, got {0}")]
    Vcpus(u32),
    #[error(
        "the interrupt trace follows Tandem's PIC, IOAPIC and LAPIC: with KVM's in-kernel \
         irqchip (--irqchip kernel) there is nothing to trace"
    )]
    TraceNeedsUserIrqchip,
    #[error("trace output: {0}")]
    Trace(#[from] std::io::Error),
    #[error(
        "intel-iommu remaps the interrupts of Tandem's IOAPIC: it needs --irqchip user, not KVM's \
         in-kernel irqchip"
    )]
    IommuNeedsUserIrqchip,
    #[error("a machine has one intel-iommu")]
    TwoIommus,
    #[error("PCI bus 0 has room for {0} -device functions")]
    TooManyPciDevices(usize),
}

/// The ladder's view of the `pc` interrupt system: the APIC router, plus
/// the IOAPIC's NMI / INIT / SMI entries as wake sources for a HLT with IF
/// clear.
struct PcInterrupts {
    router: Arc<ApicRouter>,
    ioapic: Arc<Mutex<IoApic>>,
    pit: Arc<Mutex<Pit>>,
}

impl InterruptSource for PcInterrupts {
    fn nmi_pending(&self, vcpu: u32) -> bool {
        self.router.nmi_pending(vcpu)
    }
    fn ack_nmi(&self, vcpu: u32) {
        self.router.ack_nmi(vcpu)
    }
    fn interrupt_pending(&self, vcpu: u32) -> bool {
        self.router.interrupt_pending(vcpu)
    }
    fn ack_interrupt(&self, vcpu: u32) -> Option<u8> {
        let vector = self.router.ack_interrupt(vcpu)?;
        // A PIT tick taken through the IOAPIC (pin 2) is acknowledged here,
        // for the lost-tick policy, as one taken through the PIC is at its
        // INTA. (KVM's PIT counts acknowledgements at EOI; at injection the
        // guest has equally taken the tick.)
        let pin2 = self
            .ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .redirection_entry(2);
        if pin2.is_some_and(|e| e & (1 << 16) == 0 && (e & 0xff) as u8 == vector) {
            self.pit
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .irq_acked();
        }
        Some(vector)
    }
    fn can_wake_masked(&self, vcpu: u32) -> bool {
        if self.router.can_wake_masked(vcpu) {
            return true;
        }
        let io = self.ioapic.lock().unwrap_or_else(|p| p.into_inner());
        (0..crate::devices::ioapic::IOAPIC_PINS as u8).any(|pin| {
            io.redirection_entry(pin).is_some_and(|e| {
                // Unmasked, delivery mode SMI (2), NMI (4) or INIT (5).
                e & (1 << 16) == 0 && matches!((e >> 8) & 7, 2 | 4 | 5)
            })
        })
    }
    fn cr8(&self, vcpu: u32) -> Option<u64> {
        InterruptSource::cr8(&*self.router, vcpu)
    }
    fn set_cr8(&self, vcpu: u32, cr8: u64) {
        InterruptSource::set_cr8(&*self.router, vcpu, cr8)
    }
    fn held_by_priority(&self, vcpu: u32) -> Option<(u8, u8)> {
        self.router.held_by_priority(vcpu)
    }
    fn take_startup(&self, vcpu: u32) -> crate::ladder::Startup {
        self.router.take_startup(vcpu)
    }
}

/// The interrupt source, MSR handlers and per-vCPU MMIO of a machine.
type Handlers = (
    Arc<dyn InterruptSource>,
    Vec<Arc<dyn MsrHandler>>,
    Option<Arc<dyn LocalMmio>>,
);

/// Tandem's interrupt controllers and PIT.
pub struct UserIrqchip {
    pub pic: Arc<Mutex<Pic>>,
    pub pit: Arc<Mutex<Pit>>,
    pub ioapic: Arc<Mutex<IoApic>>,
    pub router: Arc<ApicRouter>,
}

/// A built `pc` machine and handles to its devices.
pub struct Pc {
    pub machine: Arc<Machine>,
    pub virtual_clock: Option<Arc<VirtualClock>>,
    pub serial: Arc<Mutex<Serial>>,
    /// `None` with `IrqchipKind::Kernel`.
    pub irqchip: Option<UserIrqchip>,
    pub cmos: Arc<Mutex<Cmos>>,
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    /// The VT-d remapping unit, with `PcDevice::IntelIommu`.
    pub iommu: Option<Arc<Mutex<Vtd>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_threads: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pc")
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// A device whose writes can move a timer deadline: after each write the
/// timer watcher re-computes its sleep.
struct Rearming {
    inner: SharedDevice,
    timers: Arc<TimerSet>,
    name: &'static str,
}

impl BusDevice for Rearming {
    fn name(&self) -> &'static str {
        self.name
    }
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(offset, data);
        self.timers.rearm();
    }
    fn dump(&self) -> String {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).dump()
    }
}

fn rearming(inner: SharedDevice, timers: &Arc<TimerSet>) -> SharedDevice {
    let name = inner.lock().map(|d| d.name()).unwrap_or("device");
    Arc::new(Mutex::new(Rearming {
        inner,
        timers: timers.clone(),
        name,
    }))
}

/// The LAPIC page of each vCPU, and the APIC MSRs, with timer re-arming.
struct ApicAccess {
    router: Arc<ApicRouter>,
    timers: Arc<TimerSet>,
}

impl LocalMmio for ApicAccess {
    fn read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> bool {
        match self.router.mmio_offset(vcpu, addr) {
            Some(off) => {
                self.router.mmio_read(vcpu, off, data);
                true
            }
            None => false,
        }
    }
    fn write(&self, vcpu: u32, addr: u64, data: &[u8]) -> bool {
        match self.router.mmio_offset(vcpu, addr) {
            Some(off) => {
                self.router.mmio_write(vcpu, off, data);
                self.timers.rearm();
                true
            }
            None => false,
        }
    }
}

impl MsrHandler for ApicAccess {
    fn rdmsr(&self, vcpu: u32, index: u32) -> Option<u64> {
        self.router.rdmsr(vcpu, index)
    }
    fn wrmsr(&self, vcpu: u32, index: u32, value: u64) -> bool {
        let ok = self.router.wrmsr(vcpu, index, value);
        self.timers.rearm();
        ok
    }
}

fn start_unix_time() -> i64 {
    // The RTC is given the date once, at construction; it never reads the
    // host clock itself.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Pc {
    pub fn new(cfg: PcConfig) -> Result<Pc, PcError> {
        if cfg.vcpus == 0 || cfg.vcpus > 255 {
            return Err(PcError::Vcpus(cfg.vcpus));
        }
        let mem = Arc::new(GuestMemory::new(cfg.mem_size)?);
        let (clock, virtual_clock): (SharedClock, _) = match cfg.clock {
            ClockKind::Host => (Arc::new(HostClock::new()), None),
            ClockKind::Virtual => {
                let v = Arc::new(VirtualClock::new());
                (v.clone(), Some(v))
            }
        };
        // Off until `start_trace`; every device holds a clone.
        let tracer = Tracer::new(clock.clone());
        let control = Arc::new(MachineControl::new());
        let isa = Arc::new(IsaIrqRouter::new());
        let timers = Arc::new(TimerSet::new());
        let bells: Vec<Arc<Doorbell>> = (0..cfg.vcpus).map(|_| Arc::new(Doorbell::new())).collect();
        let mut pio = Bus::new(BusKind::Pio);
        let mut mmio = Bus::new(BusKind::Mmio);

        // The VT-d unit first: the IOAPIC sends through it.
        let mut iommus = cfg.devices.iter().filter_map(|d| match d {
            PcDevice::IntelIommu(c) => Some(*c),
            PcDevice::Edu => None,
        });
        let iommu_cfg = iommus.next();
        if iommus.next().is_some() {
            return Err(PcError::TwoIommus);
        }
        if iommu_cfg.is_some() && cfg.irqchip == IrqchipKind::Kernel {
            return Err(PcError::IommuNeedsUserIrqchip);
        }
        let late_router = Arc::new(LateRouter::default());
        let iommu =
            iommu_cfg.map(|c| Arc::new(Mutex::new(Vtd::new(c, mem.clone(), late_router.clone()))));
        if let Some(v) = &iommu {
            mmio.insert(v.clone(), VTD_MMIO_BASE, VTD_MMIO_SIZE)?;
        }
        let interrupt_path = Arc::new(InterruptPath {
            router: late_router.clone(),
            vtd: iommu.clone(),
        });

        let irqchip = match cfg.irqchip {
            IrqchipKind::User => Some(Self::user_irqchip(
                &cfg,
                &clock,
                &isa,
                &timers,
                &bells,
                &tracer,
                &mut pio,
                &mut mmio,
                &interrupt_path,
            )?),
            IrqchipKind::Kernel => None,
        };

        // COM1.
        let traced = |source, irq: u8| TracedLine::wrap(isa.line(irq), tracer.clone(), source, irq);
        let serial = Arc::new(Mutex::new(Serial::new(
            traced(Source::Uart, COM1_IRQ),
            cfg.serial_out,
            clock.clone(),
        )));
        pio.insert(rearming(serial.clone(), &timers), COM1_BASE, UART_PORTS)?;
        timers.add(serial.clone());

        // The ACPI PM block (on the bus below) first: the RTC's IRQ 8 also
        // reaches its RTC_STS, the S3 wake event.
        let acpi_pm = Arc::new(Mutex::new(AcpiPm::new(
            traced(Source::AcpiSci, SCI_IRQ),
            clock.clone(),
            control.clone(),
            DEFAULT_S5_SLP_TYP,
        )));

        // CMOS / RTC.
        let cmos = Arc::new(Mutex::new(Cmos::new(
            Arc::new(IrqTee(
                traced(Source::Rtc, RTC_IRQ),
                Arc::new(RtcInput::new(&acpi_pm)),
            )),
            clock.clone(),
            // A reproducible run starts at a fixed date (2000-01-01 UTC).
            if cfg.clock == ClockKind::Virtual {
                946_684_800
            } else {
                start_unix_time()
            },
            cfg.mem_size,
        )));
        pio.insert(rearming(cmos.clone(), &timers), CMOS_BASE, CMOS_PORTS)?;
        timers.add(cmos.clone());

        // i8042 (reset line, keyboard probe answers).
        let kbc = Arc::new(Mutex::new(I8042::new(
            control.clone(),
            Some(traced(Source::Keyboard, KEYBOARD_IRQ)),
        )));
        for (base, dev) in i8042_ports(&kbc) {
            pio.insert(dev, base, 1)?;
        }

        // ACPI PM block (PM timer, PM1 control with S5 poweroff, SCI on
        // IRQ 9), PCI configuration mechanism #1 with the i440FX and PIIX3
        // (and the 0xCF9 reset control), fw_cfg, pc-testdev.
        pio.insert(
            rearming(acpi_pm.clone(), &timers),
            ACPI_PM_BASE,
            ACPI_PM_PORTS,
        )?;
        timers.add(acpi_pm.clone());
        let mut pci_host = PciHost::new(control.clone(), cfg.mem_size);
        let pci_devices = cfg
            .devices
            .iter()
            .filter(|d| !matches!(d, PcDevice::IntelIommu(_)))
            .count();
        if pci_devices > crate::pc_devices::MAX_PCI_DEVICES {
            return Err(PcError::TooManyPciDevices(
                crate::pc_devices::MAX_PCI_DEVICES,
            ));
        }
        if pci_devices > 0 {
            let dma = Arc::new(PcDma {
                mem: mem.clone(),
                vtd: iommu.clone(),
            });
            let functions =
                attach_pci_functions(&cfg.devices, &mut pci_host, &isa, &interrupt_path, &dma);
            mmio.insert(
                Arc::new(Mutex::new(PciMmio::new(functions))),
                crate::devices::pci_device::PCI_MMIO_BASE,
                crate::devices::pci_device::PCI_MMIO_END
                    - crate::devices::pci_device::PCI_MMIO_BASE,
            )?;
            // SeaBIOS makes the PCI IRQs level-triggered in the ELCR.
            if let Some(chip) = &irqchip {
                let mut elcr = 0u16;
                for irq in crate::pc_devices::SEABIOS_PIRQ_IRQS {
                    elcr |= 1 << irq;
                }
                let mut pic = chip.pic.lock().unwrap_or_else(|p| p.into_inner());
                for (offset, v) in elcr.to_le_bytes().into_iter().enumerate() {
                    let old = pic.read_port(crate::devices::pic::PicChip::Elcr, offset as u8);
                    pic.write_port(crate::devices::pic::PicChip::Elcr, offset as u8, old | v);
                }
            }
        }
        pio.insert(
            Arc::new(Mutex::new(pci_host)),
            PCI_CONFIG_PORT,
            PCI_CONFIG_PORTS,
        )?;
        let fw_cfg = Arc::new(Mutex::new(FwCfg::new(cfg.mem_size, cfg.vcpus as u16)));
        pio.insert(fw_cfg.clone(), FW_CFG_PORT, FW_CFG_PORTS)?;
        pio.insert(
            Arc::new(Mutex::new(TestdevIoport::new())),
            TESTDEV_IOPORT,
            TESTDEV_IOPORT_PORTS,
        )?;
        // pc-testdev's MMIO buffer ("testdev-iomem"): MMIO, so that its
        // accesses are emulated on both processors.
        mmio.insert(
            Arc::new(Mutex::new(TestdevIomem::new())),
            TESTDEV_IOMEM_BASE,
            TESTDEV_IOMEM_SIZE,
        )?;
        {
            let ioapic = irqchip.as_ref().map(|c| Arc::downgrade(&c.ioapic));
            let isa = isa.clone();
            let tracer = tracer.clone();
            // The level of each line, so that only changes are traced.
            let levels = std::sync::atomic::AtomicU32::new(0);
            // Lines 0-15 are ISA IRQs (PIC n and IOAPIC pin n, IRQ 0 to
            // pin 2); 16-23 reach IOAPIC pins directly, as QEMU's GSIs.
            let set_line: SetIrqLine = Arc::new(move |n, level| {
                if let Some(bit) = 1u32.checked_shl(u32::from(n)) {
                    let old = if level {
                        levels.fetch_or(bit, Ordering::Relaxed)
                    } else {
                        levels.fetch_and(!bit, Ordering::Relaxed)
                    };
                    if (old & bit != 0) != level {
                        tracer.emit(TraceEvent::IrqLine {
                            source: Source::Testdev,
                            line: n,
                            level,
                        });
                    }
                }
                if n < 16 {
                    isa.set(n, level)
                } else if let Some(io) = ioapic.as_ref().and_then(Weak::upgrade) {
                    io.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .set_gsi(u32::from(n), level);
                }
            });
            pio.insert(
                Arc::new(Mutex::new(TestdevIrq::new(set_line))),
                TESTDEV_IRQ_PORT,
                TESTDEV_IRQ_LINES,
            )?;
        }

        // isa-debug-exit and the POST port.
        pio.insert(
            Arc::new(Mutex::new(DebugExit::new(control.clone()))),
            DEBUG_EXIT_PORT,
            DEBUG_EXIT_PORTS,
        )?;
        pio.insert(Arc::new(Mutex::new(Port80::new())), POST_PORT, 1)?;

        let (interrupts, msrs, local_mmio): Handlers = match &irqchip {
            Some(chip) => {
                let apic_access = Arc::new(ApicAccess {
                    router: chip.router.clone(),
                    timers: timers.clone(),
                });
                (
                    Arc::new(PcInterrupts {
                        router: chip.router.clone(),
                        ioapic: chip.ioapic.clone(),
                        pit: chip.pit.clone(),
                    }),
                    vec![apic_access.clone()],
                    Some(apic_access),
                )
            }
            None => (Arc::new(NoInterrupts), Vec::new(), None),
        };
        let machine = Arc::new(Machine {
            mem,
            pio,
            mmio,
            clock,
            control,
            isa_irqs: isa,
            interrupts,
            msrs,
            local_mmio,
            timers,
            doorbells: bells,
            fallback_notes: Mutex::new(Vec::new()),
            fallback: std::sync::OnceLock::new(),
            tracer,
        });
        let pc = Pc {
            machine,
            virtual_clock,
            serial,
            irqchip,
            cmos,
            fw_cfg,
            iommu,
            threads: Mutex::new(Vec::new()),
            stop_threads: Arc::new(AtomicBool::new(false)),
        };
        pc.seabios_state();
        pc.machine.control.set_wake_handler(Arc::new(PcWake {
            mem: Arc::downgrade(&pc.machine.mem),
            timers: Arc::downgrade(&pc.machine.timers),
            chip: pc.irqchip.as_ref().map(|c| {
                (
                    Arc::downgrade(&c.pic),
                    Arc::downgrade(&c.pit),
                    Arc::downgrade(&c.ioapic),
                    Arc::downgrade(&c.router),
                )
            }),
            cmos: Arc::downgrade(&pc.cmos),
            acpi_pm: Arc::downgrade(&acpi_pm),
            iommu: pc.iommu.as_ref().map(Arc::downgrade),
        }));
        Ok(pc)
    }

    /// Tandem's LAPICs, 8259A pair, PIT and IOAPIC, wired together.
    // The wiring needs every shared part of the machine; a struct for them
    // would only rename the parameters.
    #[allow(clippy::too_many_arguments)]
    fn user_irqchip(
        cfg: &PcConfig,
        clock: &SharedClock,
        isa: &Arc<IsaIrqRouter>,
        timers: &Arc<TimerSet>,
        bells: &[Arc<Doorbell>],
        tracer: &Tracer,
        pio: &mut Bus,
        mmio: &mut Bus,
        interrupt_path: &Arc<InterruptPath>,
    ) -> Result<UserIrqchip, PcError> {
        // Local APICs and the APIC bus.
        let router = Arc::new(ApicRouter::with_vcpus(
            cfg.vcpus,
            clock.clone(),
            DEFAULT_TSC_KHZ,
            bells.to_vec(),
        ));
        interrupt_path.router.set(router.clone());
        for t in router.timers() {
            timers.add(t);
        }
        router.set_tracer(tracer.clone());

        // 8259A pair; INT drives LINT0.
        let pic = Arc::new(Mutex::new(Pic::new(router.lint_line(0))));
        pic.lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_tracer(tracer.clone());
        for (dev, base, len) in crate::devices::pic::pc_port_devices(&pic) {
            pio.insert(dev, base, len)?;
        }
        isa.connect(Arc::new(PicIrqSink(pic.clone())));

        // 8254 PIT on IRQ 0, port 0x61.
        let pit = Arc::new(Mutex::new(Pit::new(
            clock.clone(),
            TracedLine::wrap(isa.line(0), tracer.clone(), Source::Pit, 0),
            cfg.lost_ticks,
        )));
        for (dev, base, len) in crate::devices::pit::pc_port_devices(&pit) {
            pio.insert(rearming(dev, timers), base, len)?;
        }
        timers.add(Arc::new(PitTimer(pit.clone())));

        // The PIC's INTA; IRQ 0's acknowledgement feeds the PIT's lost-tick
        // accounting (outside the PIC's lock: the PIT drives IRQ 0 under its
        // own lock, which reaches the PIC).
        {
            let pic = pic.clone();
            let pit = Arc::downgrade(&pit);
            router.set_pic_ack(Arc::new(move || {
                let inta = pic.lock().unwrap_or_else(|p| p.into_inner()).acknowledge();
                if inta.irq == Some(0) {
                    if let Some(pit) = pit.upgrade() {
                        pit.lock().unwrap_or_else(|p| p.into_inner()).irq_acked();
                    }
                }
                Some(inta.vector)
            }));
        }

        // IOAPIC: messages to the LAPICs (through interrupt remapping when
        // there is a VT-d unit), EOIs back.
        let ioapic_bus: Arc<dyn ApicBus> = interrupt_path.clone();
        let ioapic = Arc::new(Mutex::new(IoApic::new(ioapic_bus)));
        ioapic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_tracer(tracer.clone());
        mmio.insert(ioapic.clone(), IOAPIC_BASE, IOAPIC_MMIO_SIZE)?;
        isa.connect(Arc::new(IoApicIrqSink(ioapic.clone())));
        {
            let weak: Weak<Mutex<IoApic>> = Arc::downgrade(&ioapic);
            router.set_eoi_sink(Arc::new(move |vector| {
                if let Some(io) = weak.upgrade() {
                    io.lock().unwrap_or_else(|p| p.into_inner()).eoi(vector);
                }
            }));
        }

        Ok(UserIrqchip {
            pic,
            pit,
            ioapic,
            router,
        })
    }

    /// Leaves the legacy devices as SeaBIOS leaves them on QEMU: PIC bases
    /// 0x08 / 0x70, masks 0xB8 / 0x8E, PIT channel 0 at 18.2 Hz.
    fn seabios_state(&self) {
        if let Some(chip) = &self.irqchip {
            seabios_legacy_state(chip, &self.machine.timers);
        }
    }

    /// Makes the guest's TSC and the one Tandem's LAPIC compares TSC
    /// deadlines with the same: the processor's TSC is set to the machine
    /// clock's value at the processor's `tsc_khz`, then read back; what
    /// differs (a processor that cannot set its TSC keeps the host's)
    /// becomes the LAPICs' TSC offset.
    pub fn sync_tsc(&self, vcpu: &mut dyn Vcpu, tsc_khz: u64) -> VcpuResult<()> {
        let khz = tsc_khz.max(1);
        let clock_tsc = |ns: u64| (u128::from(ns) * u128::from(khz) / 1_000_000) as u64;
        let tsc = crate::cpu::msr::IA32_TSC;
        // Refused writes are fine: the read-back below tells the truth.
        let _ = vcpu.set_msrs(&[Msr {
            index: tsc,
            value: clock_tsc(self.machine.clock.now_ns()),
        }]);
        let guest = vcpu.get_msrs(&[tsc])?.first().map(|m| m.value).unwrap_or(0);
        let offset = guest.saturating_sub(clock_tsc(self.machine.clock.now_ns()));
        if let Some(chip) = &self.irqchip {
            chip.router.set_tsc(khz, offset);
        }
        Ok(())
    }

    /// Tells the LAPICs the processor's MAXPHYADDR (from its CPUID), which
    /// bounds the base WRMSR IA32_APIC_BASE may set (SDM vol. 3, 11.4.4).
    pub fn set_phys_addr_bits(&self, bits: u8) {
        if let Some(chip) = &self.irqchip {
            chip.router.set_phys_addr_bits(bits);
        }
    }

    /// Starts the timer watcher, the host thread that kicks vCPUs when a
    /// device deadline passes.
    pub fn start_host_threads(&self) -> std::io::Result<()> {
        let stop = self.stop_threads.clone();
        let control = self.machine.control.clone();
        let h = self.machine.timers.spawn_watcher(
            self.machine.clock.clone(),
            self.machine.doorbells.clone(),
            Arc::new(move || stop.load(Ordering::SeqCst) || control.stop_requested()),
        )?;
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(h);
        Ok(())
    }

    /// Feeds COM1 from the process's stdin when it is a pipe, terminal,
    /// socket or file (a detached thread).
    pub fn start_stdin(&self) -> std::io::Result<()> {
        let bells = self.machine.doorbells.clone();
        let timers = self.machine.timers.clone();
        crate::devices::serial::spawn_stdin_reader(
            self.serial.clone(),
            Arc::new(move || {
                timers.rearm();
                if let Some(b) = bells.first() {
                    b.ring();
                }
            }),
        )?;
        Ok(())
    }

    /// The machine's interrupt trace handle.
    pub fn tracer(&self) -> &Tracer {
        &self.machine.tracer
    }

    /// Starts the interrupt trace into `sink` (see [`crate::trace`]).
    /// Refused with KVM's in-kernel irqchip: its PIC, IOAPIC and LAPIC are
    /// out of Tandem's sight.
    pub fn start_trace(&self, sink: Box<dyn TraceSink>) -> Result<(), PcError> {
        if self.irqchip.is_none() {
            return Err(PcError::TraceNeedsUserIrqchip);
        }
        self.machine.tracer.start(sink)?;
        Ok(())
    }

    /// Ends the interrupt trace: completes and flushes its output.
    pub fn finish_trace(&self) -> Result<(), PcError> {
        self.machine.tracer.finish()?;
        Ok(())
    }

    /// Stops and joins the timer watcher.
    pub fn stop_host_threads(&self) {
        self.stop_threads.store(true, Ordering::SeqCst);
        self.machine.timers.rearm();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Every device's registers in readable form.
    pub fn dump_devices(&self) -> String {
        let mut out = String::new();
        let mut section = |title: &str, body: String| {
            out.push_str(&format!("== {title} ==\n{body}"));
            if !out.ends_with('\n') {
                out.push('\n');
            }
        };
        if let Some(chip) = &self.irqchip {
            section(
                "pic",
                chip.pic.lock().unwrap_or_else(|p| p.into_inner()).dump(),
            );
            section(
                "pit",
                chip.pit.lock().unwrap_or_else(|p| p.into_inner()).dump(),
            );
            section(
                "ioapic",
                chip.ioapic.lock().unwrap_or_else(|p| p.into_inner()).dump(),
            );
            section("lapic", chip.router.dump());
        }
        for (base, _len, dev) in self.machine.pio.devices() {
            let d = dev.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(d.name(), "pic" | "elcr" | "pit" | "port61") || d.name().starts_with("pic")
            {
                continue;
            }
            let body = d.dump();
            if !body.is_empty() {
                section(&format!("{} @ {base:#x}", d.name()), body);
            }
        }
        // MMIO devices other than the IOAPIC (above): the PCI functions'
        // BARs and the VT-d unit, when the machine has them.
        for (base, _len, dev) in self.machine.mmio.devices() {
            let d = dev.lock().unwrap_or_else(|p| p.into_inner());
            if base == IOAPIC_BASE {
                continue;
            }
            let body = d.dump();
            if !body.is_empty() {
                section(&format!("{} @ {base:#x}", d.name()), body);
            }
        }
        out
    }
}

/// The legacy devices as SeaBIOS leaves them on QEMU, at boot and on an S3
/// resume (its `pic_setup`): PIC bases 0x08 / 0x70, masks 0xB8 / 0x8E, PIT
/// channel 0 at 18.2 Hz, the BSP's LAPIC in virtual-wire mode.
fn seabios_legacy_state(chip: &UserIrqchip, timers: &TimerSet) {
    use crate::devices::pic::PicChip;
    let mut pic = chip.pic.lock().unwrap_or_else(|p| p.into_inner());
    for (chip, base, icw3, mask) in [
        (PicChip::Master, 0x08, 0x04, 0xB8),
        (PicChip::Slave, 0x70, 0x02, 0x8E),
    ] {
        pic.write_port(chip, 0, 0x11);
        pic.write_port(chip, 1, base);
        pic.write_port(chip, 1, icw3);
        pic.write_port(chip, 1, 0x01);
        pic.write_port(chip, 1, mask);
    }
    drop(pic);
    chip.pit
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .program_bios_defaults();
    // SeaBIOS enables the BSP's LAPIC in virtual-wire mode: software
    // enabled with spurious vector 0xFF, LINT0 ExtINT, LINT1 NMI.
    for (offset, value) in [(0xf0u64, 0x1ffu32), (0x350, 0x8700), (0x360, 0x8400)] {
        chip.router.mmio_write(0, offset, &value.to_le_bytes());
    }
    timers.rearm();
}

/// A wake from S3 on the `pc` machine (QEMU's `pc_machine_wakeup`: a
/// machine reset that keeps RAM; then SeaBIOS's resume path). Devices reset:
/// the LAPICs (power-up state: APs back in wait-for-SIPI), the IOAPIC, the
/// 8259A pair and PIT (then set up as SeaBIOS does), the RTC's interrupt
/// enables and flags (its time, alarm and CMOS RAM kept) and PM1_CNT
/// (PM1_STS with WAK_STS and PM1_EN kept), and the VT-d unit. Not reset:
/// COM1, the i8042, fw_cfg, the PCI configuration registers, the `-device`
/// PCI functions (their BARs stay where firmware put them) and pc-testdev,
/// which hold no state a resuming OS relies on. The waking vector is read from the FACS
/// as SeaBIOS finds it; a vector at or above 1 MiB (SeaBIOS would call it
/// in 32-bit mode) is not supported and makes the wake a reset.
struct PcWake {
    mem: Weak<GuestMemory>,
    timers: Weak<TimerSet>,
    #[allow(clippy::type_complexity)]
    chip: Option<(
        Weak<Mutex<Pic>>,
        Weak<Mutex<Pit>>,
        Weak<Mutex<IoApic>>,
        Weak<ApicRouter>,
    )>,
    cmos: Weak<Mutex<Cmos>>,
    acpi_pm: Weak<Mutex<AcpiPm>>,
    /// The VT-d unit: reset (translation and remapping off), as QEMU's
    /// wake resets it; the OS sets it up again on resume.
    iommu: Option<Weak<Mutex<Vtd>>>,
}

impl crate::control::WakeHandler for PcWake {
    fn wake(&self) -> Option<u32> {
        let timers = self.timers.upgrade()?;
        if let Some((pic, pit, ioapic, router)) = &self.chip {
            if let (Some(pic), Some(pit), Some(ioapic), Some(router)) = (
                pic.upgrade(),
                pit.upgrade(),
                ioapic.upgrade(),
                router.upgrade(),
            ) {
                for i in 0..router.len() as u32 {
                    if let Some(l) = router.lapic(i) {
                        l.lock().unwrap_or_else(|p| p.into_inner()).reset();
                    }
                }
                ioapic.lock().unwrap_or_else(|p| p.into_inner()).reset();
                pic.lock().unwrap_or_else(|p| p.into_inner()).reset();
                pit.lock().unwrap_or_else(|p| p.into_inner()).reset();
                let chip = UserIrqchip {
                    pic,
                    pit,
                    ioapic,
                    router,
                };
                seabios_legacy_state(&chip, &timers);
            }
        }
        if let Some(c) = self.cmos.upgrade() {
            c.lock().unwrap_or_else(|p| p.into_inner()).system_reset();
        }
        if let Some(pm) = self.acpi_pm.upgrade() {
            pm.lock().unwrap_or_else(|p| p.into_inner()).wake_reset();
        }
        if let Some(v) = self.iommu.as_ref().and_then(Weak::upgrade) {
            v.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
        timers.rearm();
        let mem = self.mem.upgrade()?;
        crate::devices::acpi_pm::find_firmware_waking_vector(&mem).filter(|&v| v < 0x10_0000)
    }
}

impl Drop for Pc {
    fn drop(&mut self) {
        self.stop_host_threads();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::cpu::{cr0, Segment};
    use crate::machine::{ExitStats, RunOutcome};
    use crate::testing::FakeVcpu;
    use crate::trace::{LadderAction, LadderEvent, PicId, TraceBuffer};
    use crate::vcpu::{Readiness, VcpuExit};

    const IDT: u64 = 0x1000;

    /// A one-vCPU `pc` machine on the virtual clock, tracing into memory.
    fn traced_pc() -> (Pc, TraceBuffer) {
        let pc = Pc::new(PcConfig {
            mem_size: 4 << 20,
            vcpus: 1,
            clock: ClockKind::Virtual,
            irqchip: IrqchipKind::User,
            lost_ticks: LostTickPolicy::Discard,
            serial_out: Box::new(std::io::sink()),
            devices: Vec::new(),
        })
        .unwrap();
        let buf = pc.tracer().start_memory();
        (pc, buf)
    }

    /// A vCPU in 32-bit protected mode, ready for interrupts, with an IDT
    /// at `IDT` whose gate for `vector` enters 0008:`handler`.
    fn vcpu_with_gate(pc: &Pc, vector: u8, handler: u32, exits: Vec<VcpuExit>) -> FakeVcpu {
        let h = handler.to_le_bytes();
        let gate = [h[0], h[1], 0x08, 0x00, 0x00, 0x8e, h[2], h[3]];
        pc.machine
            .mem
            .write(IDT + u64::from(vector) * 8, &gate)
            .unwrap();
        let mut v = FakeVcpu::new(0);
        v.readiness = Readiness {
            if_flag: true,
            interrupt: true,
            nmi: true,
        };
        v.sregs.cr0 = cr0::PE;
        v.sregs.cs = Segment::flat(8, 0xb, false);
        v.sregs.idt.base = IDT;
        v.sregs.idt.limit = 0x7ff;
        v.regs.rip = 0x4000;
        v.exits = exits.into();
        v
    }

    /// Moves the clock past one PIT period (SeaBIOS's 18.2 Hz) and runs the
    /// vCPU through its scripted exits.
    fn one_tick(pc: &Pc, v: &mut FakeVcpu) {
        pc.virtual_clock.as_ref().unwrap().advance(60_000_000);
        let mut stats = ExitStats::default();
        let out = pc.machine.run_vcpu(v, &mut stats).unwrap();
        assert!(matches!(out, RunOutcome::TripleFault(_)), "script ran out");
        assert_eq!(stats.injections, 1);
    }

    fn events(buf: &TraceBuffer) -> Vec<TraceEvent> {
        buf.lock()
            .unwrap()
            .iter()
            .map(|r| r.event.clone())
            .collect()
    }

    /// The position of the first event `f` accepts, after `from`.
    fn find(evs: &[TraceEvent], from: usize, f: impl Fn(&TraceEvent) -> bool) -> usize {
        evs.iter()
            .skip(from)
            .position(f)
            .map(|p| p + from)
            .unwrap_or_else(|| panic!("event not found after {from} in {evs:#?}"))
    }

    #[test]
    fn pit_tick_through_the_pic_is_traced_from_irq0_to_the_eoi() {
        let (pc, buf) = traced_pc();
        // A non-specific EOI to the master (OCW2 0x20) from the handler.
        let mut v = vcpu_with_gate(
            &pc,
            0x08,
            0x5000,
            vec![VcpuExit::IoOut {
                port: 0x20,
                size: 1,
                count: 1,
            }],
        );
        v.io = vec![0x20];
        one_tick(&pc, &mut v);
        let evs = events(&buf);
        let raise = find(&evs, 0, |e| {
            *e == TraceEvent::IrqLine {
                source: Source::Pit,
                line: 0,
                level: true,
            }
        });
        let irr = find(&evs, raise, |e| {
            matches!(
                e,
                TraceEvent::PicIrr {
                    chip: PicId::Master,
                    irq: 0,
                    set: true,
                    ..
                }
            )
        });
        let int = find(&evs, irr, |e| *e == TraceEvent::PicInt { level: true });
        let decide = find(&evs, int, |e| {
            matches!(
                e,
                TraceEvent::LadderDecision {
                    action: LadderAction::Inject,
                    event: LadderEvent::Interrupt,
                    ..
                }
            )
        });
        let inta = find(&evs, int, |e| {
            *e == TraceEvent::PicInta {
                irq: Some(0),
                vector: 0x08,
            }
        });
        let isr = find(&evs, inta, |e| {
            matches!(
                e,
                TraceEvent::PicIsr {
                    irq: 0,
                    set: true,
                    ..
                }
            )
        });
        let inject = find(&evs, isr, |e| {
            matches!(
                e,
                TraceEvent::Inject {
                    vector: 0x08,
                    cs: 8,
                    rip: 0x4000,
                    ..
                }
            )
        });
        let deliver = find(&evs, inject, |e| {
            *e == TraceEvent::Deliver {
                cpu: 0,
                vector: 0x08,
                handler: Some((8, 0x5000)),
            }
        });
        let exit = find(&evs, deliver, |e| matches!(e, TraceEvent::Exit { .. }));
        let eoi = find(&evs, exit, |e| {
            *e == TraceEvent::PicEoi {
                chip: PicId::Master,
                irq: 0,
            }
        });
        assert!(decide < inject && eoi > exit);
        // One flow from the raise to the handler, with the PIC's steps.
        let recs = buf.lock().unwrap().clone();
        let id = recs[raise].flow.as_ref().expect("flow starts").id;
        for i in [irr, inta, inject, deliver] {
            assert_eq!(recs[i].flow.as_ref().map(|f| f.id), Some(id), "{i}");
        }
        assert_eq!(
            recs[deliver].flow.as_ref().and_then(|f| f.cause.clone()),
            Some("PIT IRQ0 -> PIC master IR0 -> INTA 0x08".to_string())
        );
    }

    #[test]
    fn pit_tick_through_the_ioapic_and_lapic_is_traced_to_the_lapic_eoi() {
        let (pc, buf) = traced_pc();
        let chip = pc.irqchip.as_ref().unwrap();
        // Mask IRQ 0 at the PIC; IOAPIC pin 2 -> vector 0x30, edge,
        // physical APIC ID 0, unmasked.
        pc.machine.pio.write(0x21, &[0xff]);
        {
            let mut io = chip.ioapic.lock().unwrap();
            io.write_register(0x10 + 2 * 2 + 1, 0);
            io.write_register(0x10 + 2 * 2, 0x30);
        }
        // EOI register write from the handler.
        let mut v = vcpu_with_gate(
            &pc,
            0x30,
            0x6000,
            vec![VcpuExit::MmioWrite {
                addr: 0xfee0_00b0,
                len: 4,
            }],
        );
        v.mmio = vec![0; 8];
        buf.lock().unwrap().clear();
        one_tick(&pc, &mut v);
        let evs = events(&buf);
        let raise = find(&evs, 0, |e| {
            matches!(
                e,
                TraceEvent::IrqLine {
                    source: Source::Pit,
                    level: true,
                    ..
                }
            )
        });
        let ioapic = find(&evs, raise, |e| {
            matches!(
                e,
                TraceEvent::IoapicDeliver {
                    pin: 2,
                    vector: 0x30,
                    dest: 0,
                    ..
                }
            )
        });
        let accept = find(&evs, ioapic, |e| {
            matches!(
                e,
                TraceEvent::LapicAccept {
                    cpu: 0,
                    vector: 0x30,
                    ..
                }
            )
        });
        let ack = find(&evs, accept, |e| {
            *e == TraceEvent::LapicAck {
                cpu: 0,
                vector: 0x30,
                spurious: false,
            }
        });
        let inject = find(&evs, ack, |e| {
            matches!(e, TraceEvent::Inject { vector: 0x30, .. })
        });
        let deliver = find(&evs, inject, |e| {
            *e == TraceEvent::Deliver {
                cpu: 0,
                vector: 0x30,
                handler: Some((8, 0x6000)),
            }
        });
        find(&evs, deliver, |e| {
            *e == TraceEvent::Eoi {
                cpu: 0,
                vector: 0x30,
                level: false,
            }
        });
        assert!(
            !evs.iter().any(|e| matches!(e, TraceEvent::PicInta { .. })),
            "the masked PIC is not acknowledged"
        );
        let recs = buf.lock().unwrap().clone();
        let cause = recs[deliver].flow.as_ref().and_then(|f| f.cause.clone());
        assert_eq!(
            cause.as_deref(),
            Some("PIT IRQ0 -> IOAPIC pin 2 vector 0x30 -> LAPIC 0 IRR")
        );
    }

    /// Arbitrary register writes to the traced controllers with the clock
    /// moving and the ladder running: no panic, and the records stay in
    /// sequence and time order.
    #[test]
    fn fuzz_traced_controllers() {
        let (pc, buf) = traced_pc();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ports = [0x20u64, 0x21, 0xa0, 0xa1, 0x40, 0x43, 0x4d0, 0x4d1, 0xf1];
        let mut v = FakeVcpu::new(0);
        let clock = pc.virtual_clock.clone().unwrap();
        for _ in 0..20_000 {
            let r = next();
            let value = (r >> 8) as u8;
            match r % 4 {
                0 | 1 => {
                    let port = ports[(r >> 16) as usize % ports.len()];
                    pc.machine.pio.write(port, &[value]);
                }
                2 => {
                    let off = if r & 0x100 != 0 { 0x10 } else { 0 };
                    pc.machine
                        .mmio
                        .write(IOAPIC_BASE + off, &((r >> 32) as u32).to_le_bytes());
                }
                _ => {
                    clock.advance(r % 2_000_000);
                    pc.machine.timers.fire_due(clock.now_ns());
                    v.readiness = Readiness {
                        if_flag: r & 1 != 0,
                        interrupt: r & 2 != 0,
                        nmi: true,
                    };
                    crate::ladder::inject_events_traced(
                        &mut v,
                        &*pc.machine.interrupts,
                        &pc.machine.tracer,
                    )
                    .unwrap();
                    v.injected.clear();
                }
            }
        }
        let recs = buf.lock().unwrap();
        assert!(!recs.is_empty());
        for w in recs.windows(2) {
            assert_eq!(w[1].seq, w[0].seq + 1);
            assert!(w[1].ns >= w[0].ns);
        }
    }

    /// Deterministic mode: each data exit moves the clock by one quantum
    /// and is traced with the value written; a HLT jumps to the PIT's next
    /// deadline (SeaBIOS's 18.2 Hz counter 0) and the tick is injected.
    #[test]
    fn deterministic_clock_moves_with_exits_and_jumps_in_hlt() {
        let (pc, buf) = traced_pc();
        let clock = pc.virtual_clock.clone().unwrap();
        clock.set_progress(crate::clock::GuestProgress::EXITS);
        let mut v = vcpu_with_gate(
            &pc,
            0x08,
            0x5000,
            vec![
                VcpuExit::IoOut {
                    port: 0x80,
                    size: 1,
                    count: 1,
                },
                VcpuExit::IoOut {
                    port: 0x80,
                    size: 1,
                    count: 1,
                },
            ],
        );
        v.io = vec![0x5a];
        let mut stats = ExitStats::default();
        pc.machine.run_vcpu(&mut v, &mut stats).unwrap();
        assert_eq!(clock.now_ns(), 2_000, "two exits, 1 µs each");
        let writes: Vec<_> = events(&buf)
            .into_iter()
            .filter(|e| matches!(e, TraceEvent::PortWrite { .. }))
            .collect();
        assert_eq!(
            writes,
            vec![
                TraceEvent::PortWrite {
                    cpu: 0,
                    port: 0x80,
                    size: 1,
                    value: 0x5a
                };
                2
            ]
        );
        assert_eq!(stats.injections, 0);

        v.exits = vec![VcpuExit::Hlt].into();
        let mut stats = ExitStats::default();
        pc.machine.run_vcpu(&mut v, &mut stats).unwrap();
        // 65536 PIT clocks at 1.193182 MHz: 54.925 ms.
        assert!(
            (54_900_000..55_000_000).contains(&clock.now_ns()),
            "{}",
            clock.now_ns()
        );
        assert_eq!(stats.injections, 1, "the tick wakes the HLT");
    }

    #[test]
    fn trace_is_refused_with_the_kernel_irqchip_and_off_by_default() {
        let pc = Pc::new(PcConfig {
            mem_size: 2 << 20,
            vcpus: 1,
            clock: ClockKind::Virtual,
            irqchip: IrqchipKind::Kernel,
            lost_ticks: LostTickPolicy::Discard,
            serial_out: Box::new(std::io::sink()),
            devices: Vec::new(),
        })
        .unwrap();
        assert!(!pc.tracer().enabled());
        let (sink, _) = crate::trace::MemorySink::new(10);
        assert!(matches!(
            pc.start_trace(Box::new(sink)),
            Err(PcError::TraceNeedsUserIrqchip)
        ));
    }

    #[test]
    fn testdev_iomem_is_mmio_that_reads_back_with_either_irqchip() {
        for irqchip in [IrqchipKind::User, IrqchipKind::Kernel] {
            let pc = Pc::new(PcConfig {
                mem_size: 2 << 20,
                vcpus: 1,
                clock: ClockKind::Virtual,
                irqchip,
                lost_ticks: LostTickPolicy::Discard,
                serial_out: Box::new(std::io::sink()),
                devices: Vec::new(),
            })
            .unwrap();
            // QEMU's pc-testdev "testdev-iomem": 64 KiB at 0xFF000000, not RAM.
            assert!(!pc.machine.mem.is_ram(TESTDEV_IOMEM_BASE, 1));
            let last = TESTDEV_IOMEM_BASE + TESTDEV_IOMEM_SIZE - 8;
            assert!(pc
                .machine
                .mmio
                .write(last, &0x0102_0304_0506_0708u64.to_le_bytes()));
            let mut b = [0u8; 8];
            assert!(pc.machine.mmio.read(last, &mut b));
            assert_eq!(u64::from_le_bytes(b), 0x0102_0304_0506_0708);
            // Nothing decodes just past it.
            assert!(!pc
                .machine
                .mmio
                .read(TESTDEV_IOMEM_BASE + TESTDEV_IOMEM_SIZE, &mut b));
        }
    }

    /// ACPI S3 through the run loop: the BSP's SLP_EN write suspends the
    /// machine (its next exit is not taken), the virtual clock warps to the
    /// RTC alarm, the wake sets WAK_STS / RTC_STS, resets the devices and
    /// resumes the BSP at the FACS waking vector as CS:IP; the AP stays in
    /// wait-for-SIPI.
    #[test]
    fn s3_suspend_and_wake_through_the_run_loop() {
        let pc = Pc::new(PcConfig {
            mem_size: 4 << 20,
            vcpus: 2,
            clock: ClockKind::Virtual,
            irqchip: IrqchipKind::User,
            lost_ticks: LostTickPolicy::Discard,
            serial_out: Box::new(std::io::sink()),
            devices: Vec::new(),
        })
        .unwrap();
        let m = &pc.machine;
        // RSDP -> RSDT -> FADT -> FACS with Firmware_Waking_Vector 0x7008.
        let mem = &m.mem;
        mem.write(0xF_E000, b"RSD PTR ").unwrap();
        mem.write_u32(0xF_E000 + 16, 0xF_9000).unwrap();
        mem.write(0xF_9000, b"RSDT").unwrap();
        mem.write_u32(0xF_9004, 40).unwrap();
        mem.write_u32(0xF_9000 + 36, 0xF_8100).unwrap();
        mem.write(0xF_8100, b"FACP").unwrap();
        mem.write_u32(0xF_8100 + 36, 0xF_8000).unwrap();
        mem.write(0xF_8000, b"FACS").unwrap();
        mem.write_u32(0xF_8000 + 12, 0x7008).unwrap();
        // PM1_EN.RTC_EN; the RTC alarm "don't care" with AIE.
        m.pio.write(0x602, &[0x00, 0x04]);
        for (index, value) in [(0x01u8, 0xC0u8), (0x03, 0xC0), (0x05, 0xC0), (0x0B, 0x22)] {
            m.pio.write(0x70, &[index]);
            m.pio.write(0x71, &[value]);
        }
        let mut bsp = FakeVcpu::new(0);
        let mut ap = FakeVcpu::new(1);
        // SLP_EN | SLP_TYP 1, then (after the wake) an isa-debug-exit
        // write of the same data.
        bsp.io = vec![0x00, 0x24];
        bsp.exits.push_back(VcpuExit::IoOut {
            port: 0x604,
            size: 2,
            count: 1,
        });
        bsp.exits.push_back(VcpuExit::IoOut {
            port: 0xF4,
            size: 2,
            count: 1,
        });
        let mut stats = ExitStats::default();
        let outcome = {
            let mut vcpus: [&mut dyn Vcpu; 2] = [&mut bsp, &mut ap];
            m.run_round_robin(&mut vcpus, &mut stats).unwrap()
        };
        assert_eq!(
            outcome,
            RunOutcome::Stop(crate::StopRequest::DebugExit(0x2400))
        );
        assert_eq!(
            m.control.wakes(),
            1,
            "the exit after SLP_EN ran after the wake"
        );
        assert!(m.clock.now_ns() >= 1_000_000_000, "slept until the alarm");
        assert_eq!(bsp.sregs.cs.selector, 0x700);
        assert_eq!(bsp.sregs.cs.base, 0x7000);
        assert_eq!(bsp.regs.rip, 8);
        assert_eq!(bsp.sregs.cr0 & cr0::PE, 0, "real mode");
        let mut b = [0u8; 2];
        m.pio.read(0x600, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x8400, "WAK_STS | RTC_STS");
        m.pio.read(0x602, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0, "PM1_EN reset");
        m.pio.write(0x70, &[0x0B]);
        m.pio.read(0x71, &mut b[..1]);
        assert_eq!(b[0], 0x02, "AIE cleared by the wake");
        let chip = pc.irqchip.as_ref().unwrap();
        assert!(
            chip.router
                .lapic(1)
                .unwrap()
                .lock()
                .unwrap()
                .wait_for_sipi(),
            "the AP waits for a SIPI"
        );
    }
}
