//! KVM's in-kernel irqchip and PIT as a reference (`--irqchip kernel`):
//! KVM_CREATE_IRQCHIP + KVM_CREATE_PIT2, GSI routing as QEMU's `pc` sets it
//! (ISA IRQ n to PIC input n and IOAPIC pin n, IRQ 0 to pin 2), the SeaBIOS
//! entry state, ISA lines from Tandem's other devices through
//! KVM_IRQ_LINE, and readable dumps of KVM's device registers.

use std::fmt::Write as _;
use std::sync::Arc;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irqchip, kvm_pit_config, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{VcpuFd, VmFd};
use tandem_core::irq::IsaIrqSink;

use crate::{ioctl_err, KvmError};

/// Creates the in-kernel PIC pair, IOAPIC, LAPICs (for vCPUs created
/// later) and PIT, routes the GSIs as QEMU does, and leaves the PIC and PIT
/// as SeaBIOS does.
pub(crate) fn create(vm: &VmFd) -> Result<(), KvmError> {
    vm.create_irq_chip()
        .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
    set_routing(vm)?;
    seabios_state(vm)
}

fn route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn set_routing(vm: &VmFd) -> Result<(), KvmError> {
    let mut entries = Vec::new();
    for gsi in 0..24u32 {
        if gsi < 16 && gsi != 2 {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(route(gsi, chip, pin));
        }
        // IRQ 0 reaches IOAPIC pin 2 (the interrupt source override); GSI 2
        // is the cascade and reaches no IOAPIC pin.
        match gsi {
            0 => entries.push(route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            n => entries.push(route(n, KVM_IRQCHIP_IOAPIC, n)),
        }
    }
    let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| KvmError::Ioctl {
        op: "KVM_SET_GSI_ROUTING",
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    vm.set_gsi_routing(&routing)
        .map_err(ioctl_err("KVM_SET_GSI_ROUTING"))
}

fn seabios_state(vm: &VmFd) -> Result<(), KvmError> {
    for (chip_id, base, imr, elcr_mask) in [
        (KVM_IRQCHIP_PIC_MASTER, 0x08u8, 0xb8u8, 0xf8u8),
        (KVM_IRQCHIP_PIC_SLAVE, 0x70, 0x8e, 0xde),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
        // SAFETY: chip_id selects the `pic` member of the union.
        let pic = unsafe { &mut chip.chip.pic };
        pic.irq_base = base;
        pic.imr = imr;
        pic.init_state = 0;
        pic.init4 = 1;
        pic.elcr_mask = elcr_mask;
        vm.set_irqchip(&chip)
            .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
    }
    let mut pit = vm.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?;
    let ch = &mut pit.channels[0];
    // SeaBIOS's pit_setup: counter 0, LSB/MSB, mode 2 (rate generator),
    // count 0: 18.2 Hz, as Tandem's PIT (`program_bios_defaults`, 0x34).
    ch.mode = 2;
    ch.rw_mode = 3;
    ch.bcd = 0;
    ch.gate = 1;
    ch.count = 0x10000;
    vm.set_pit2(&pit).map_err(ioctl_err("KVM_SET_PIT2"))
}

/// Tandem's devices' ISA lines into KVM's irqchip.
pub struct KernelIrqSink {
    pub(crate) vm: Arc<VmFd>,
}

impl IsaIrqSink for KernelIrqSink {
    fn set_isa_irq(&self, irq: u8, level: bool) {
        // Fails only for a GSI without routing, which set_routing covers.
        let _ = self.vm.set_irq_line(u32::from(irq), level);
    }
}

/// KVM's PIC pair, IOAPIC and PIT registers, in the same layout as
/// Tandem's `--dump-devices`.
pub(crate) fn dump(vm: &VmFd) -> String {
    let mut out = String::new();
    out.push_str("== pic (KVM in-kernel) ==\n");
    for (name, id) in [
        ("master", KVM_IRQCHIP_PIC_MASTER),
        ("slave", KVM_IRQCHIP_PIC_SLAVE),
    ] {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        if vm.get_irqchip(&mut chip).is_ok() {
            // SAFETY: chip_id selects the `pic` member.
            let p = unsafe { chip.chip.pic };
            let _ = writeln!(
                out,
                "{name}: irr={:02x} imr={:02x} isr={:02x} hprio={} irq_base={:02x} rr_sel={} elcr={:02x} fnm={} aeoi={} poll={} smm={}",
                p.irr, p.imr, p.isr, p.priority_add, p.irq_base, p.read_reg_select, p.elcr,
                p.special_fully_nested_mode, p.auto_eoi, p.poll, p.special_mask
            );
        }
    }
    out.push_str("== ioapic (KVM in-kernel) ==\n");
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    if vm.get_irqchip(&mut chip).is_ok() {
        // SAFETY: chip_id selects the `ioapic` member.
        let io = unsafe { chip.chip.ioapic };
        let _ = writeln!(
            out,
            "id={:02x} ioregsel={:02x} irr={:08x}",
            io.id & 0xf,
            io.ioregsel,
            io.irr
        );
        for (pin, e) in io.redirtbl.iter().enumerate() {
            // SAFETY: `bits` covers the whole entry.
            let bits = unsafe { e.bits };
            let _ = writeln!(
                out,
                "pin {pin:2}: {bits:016x} vec={:02x} mode={} {} {} {} remote_irr={} mask={} dest={:02x}",
                bits & 0xff,
                (bits >> 8) & 7,
                if bits & (1 << 11) != 0 { "logical" } else { "physical" },
                if bits & (1 << 15) != 0 { "level" } else { "edge" },
                if bits & (1 << 13) != 0 { "active-low" } else { "active-high" },
                (bits >> 14) & 1,
                (bits >> 16) & 1,
                bits >> 56
            );
        }
    }
    out.push_str("== pit (KVM in-kernel) ==\n");
    if let Ok(pit) = vm.get_pit2() {
        for (i, c) in pit.channels.iter().enumerate() {
            let _ = writeln!(
                out,
                "channel {i}: mode={} count={:#x} rw={} bcd={} gate={} latched={} status_latched={}",
                c.mode, c.count, c.rw_mode, c.bcd, c.gate, c.count_latched, c.status_latched
            );
        }
    }
    out
}

/// KVM's LAPIC registers of one vCPU.
pub(crate) fn dump_lapic(fd: &VcpuFd, id: u32) -> String {
    let mut out = format!("== lapic {id} (KVM in-kernel) ==\n");
    let Ok(l) = fd.get_lapic() else {
        out.push_str("unavailable\n");
        return out;
    };
    let reg = |off: usize| -> u32 {
        let b = |i: usize| l.regs[off + i] as u8 as u32;
        b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24)
    };
    let vecs = |base: usize| -> String {
        let mut v = Vec::new();
        for i in 0..8 {
            let w = reg(base + i * 0x10);
            for bit in 0..32 {
                if w & (1 << bit) != 0 {
                    v.push(format!("{:#04x}", i * 32 + bit));
                }
            }
        }
        if v.is_empty() {
            "(none)".into()
        } else {
            v.join(" ")
        }
    };
    let _ = writeln!(
        out,
        "id={:08x} version={:08x} tpr={:02x} ppr={:02x} svr={:08x} ldr={:08x} dfr={:08x} esr={:08x}",
        reg(0x20), reg(0x30), reg(0x80), reg(0xa0), reg(0xf0), reg(0xd0), reg(0xe0), reg(0x280)
    );
    let _ = writeln!(out, "isr: {}", vecs(0x100));
    let _ = writeln!(out, "tmr: {}", vecs(0x180));
    let _ = writeln!(out, "irr: {}", vecs(0x200));
    let _ = writeln!(
        out,
        "lvt timer={:08x} thermal={:08x} perf={:08x} lint0={:08x} lint1={:08x} error={:08x}",
        reg(0x320),
        reg(0x330),
        reg(0x340),
        reg(0x350),
        reg(0x360),
        reg(0x370)
    );
    let _ = writeln!(
        out,
        "timer initial={:08x} current={:08x} divide={:08x} icr={:08x}:{:08x}",
        reg(0x380),
        reg(0x390),
        reg(0x3e0),
        reg(0x310),
        reg(0x300)
    );
    out
}

/// One device register as a name and a value, for comparing KVM's
/// in-kernel devices with Tandem's register by register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRegister {
    /// "pic.master.imr", "ioapic.redir02", "pit.ch0.mode", "lapic.tpr"...
    pub name: String,
    pub value: u64,
    /// The value depends on when it is read (a counter, the timer's
    /// current count): KVM's in-kernel devices run on the host's time, not
    /// on Tandem's virtual clock, so such registers are not compared.
    pub time_dependent: bool,
}

impl DeviceRegister {
    pub fn new(name: impl Into<String>, value: u64) -> DeviceRegister {
        DeviceRegister {
            name: name.into(),
            value,
            time_dependent: false,
        }
    }

    pub fn timed(name: impl Into<String>, value: u64) -> DeviceRegister {
        DeviceRegister {
            time_dependent: true,
            ..DeviceRegister::new(name, value)
        }
    }
}

/// KVM's 8259A pair (KVM_GET_IRQCHIP) as named registers, in the names
/// `tandem diff --devices` uses for Tandem's PIC too. `lowest` is the
/// lowest-priority IR ((priority_add + 7) mod 8; KVM keeps the highest).
pub fn pic_registers(vm: &VmFd) -> Result<Vec<DeviceRegister>, KvmError> {
    let mut out = Vec::new();
    for (name, id) in [
        ("master", KVM_IRQCHIP_PIC_MASTER),
        ("slave", KVM_IRQCHIP_PIC_SLAVE),
    ] {
        let mut chip = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
        // SAFETY: chip_id selects the `pic` member of the union.
        let p = unsafe { chip.chip.pic };
        let r = |reg: &str, v: u8| DeviceRegister::new(format!("pic.{name}.{reg}"), v.into());
        out.extend([
            r("irr", p.irr),
            r("isr", p.isr),
            r("imr", p.imr),
            r("vector_base", p.irq_base),
            r("lowest_priority", p.priority_add.wrapping_add(7) & 7),
            r("elcr", p.elcr),
            r("auto_eoi", p.auto_eoi),
            r("special_fully_nested", p.special_fully_nested_mode),
            r("special_mask", p.special_mask),
            r("read_isr", p.read_reg_select),
            r("poll", p.poll),
            r("rotate_on_aeoi", p.rotate_on_auto_eoi),
        ]);
    }
    Ok(out)
}

/// KVM's IOAPIC (KVM_GET_IRQCHIP): its ID, IOREGSEL and the 24
/// redirection entries (remote IRR included).
pub fn ioapic_registers(vm: &VmFd) -> Result<Vec<DeviceRegister>, KvmError> {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
    // SAFETY: chip_id selects the `ioapic` member.
    let io = unsafe { chip.chip.ioapic };
    let mut out = vec![
        // KVM keeps the 4-bit ID itself (the register's bits 27:24), as
        // QEMU's kvm_ioapic_get reads it.
        DeviceRegister::new("ioapic.id", u64::from(io.id & 0xf)),
        DeviceRegister::new("ioapic.ioregsel", u64::from(io.ioregsel)),
    ];
    for (pin, e) in io.redirtbl.iter().enumerate() {
        // SAFETY: `bits` covers the whole entry.
        let bits = unsafe { e.bits };
        out.push(DeviceRegister::new(format!("ioapic.redir{pin:02}"), bits));
    }
    Ok(out)
}

/// KVM's PIT (KVM_GET_PIT2), per channel: mode, access, BCD, GATE and the
/// reload value (65536 for 0); the running count is time-dependent.
pub fn pit_registers(vm: &VmFd) -> Result<Vec<DeviceRegister>, KvmError> {
    let pit = vm.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?;
    let mut out = Vec::new();
    for (i, c) in pit.channels.iter().enumerate() {
        let r = |reg: &str, v: u64| DeviceRegister::new(format!("pit.ch{i}.{reg}"), v);
        out.extend([
            r("mode", c.mode.into()),
            r("access", c.rw_mode.into()),
            r("bcd", c.bcd.into()),
            r("gate", c.gate.into()),
            r(
                "reload",
                if c.count == 0 {
                    0x10000
                } else {
                    c.count.into()
                },
            ),
        ]);
    }
    Ok(out)
}

/// The LAPIC registers `tandem diff --devices` compares, by offset in the
/// APIC page (SDM vol. 3, table 11-1); the current count is time-dependent.
pub const LAPIC_COMPARED: &[(&str, u16)] = &[
    ("id", 0x20),
    ("version", 0x30),
    ("tpr", 0x80),
    ("ppr", 0xa0),
    ("ldr", 0xd0),
    ("dfr", 0xe0),
    ("svr", 0xf0),
    ("isr0", 0x100),
    ("isr1", 0x110),
    ("isr2", 0x120),
    ("isr3", 0x130),
    ("isr4", 0x140),
    ("isr5", 0x150),
    ("isr6", 0x160),
    ("isr7", 0x170),
    ("tmr0", 0x180),
    ("tmr1", 0x190),
    ("tmr2", 0x1a0),
    ("tmr3", 0x1b0),
    ("tmr4", 0x1c0),
    ("tmr5", 0x1d0),
    ("tmr6", 0x1e0),
    ("tmr7", 0x1f0),
    ("irr0", 0x200),
    ("irr1", 0x210),
    ("irr2", 0x220),
    ("irr3", 0x230),
    ("irr4", 0x240),
    ("irr5", 0x250),
    ("irr6", 0x260),
    ("irr7", 0x270),
    ("esr", 0x280),
    ("icr_low", 0x300),
    ("icr_high", 0x310),
    ("lvt_timer", 0x320),
    ("lvt_thermal", 0x330),
    ("lvt_perf", 0x340),
    ("lvt_lint0", 0x350),
    ("lvt_lint1", 0x360),
    ("lvt_error", 0x370),
    ("timer_initial", 0x380),
    ("timer_current", 0x390),
    ("timer_divide", 0x3e0),
];

/// Whether the LAPIC register at `offset` depends on when it is read.
pub fn lapic_time_dependent(offset: u16) -> bool {
    offset == 0x390
}

/// KVM's LAPIC page of one vCPU (KVM_GET_LAPIC) as named registers.
pub fn lapic_registers(fd: &VcpuFd) -> Result<Vec<DeviceRegister>, KvmError> {
    let l = fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
    let reg = |off: usize| -> u64 {
        let b = |i: usize| u64::from(l.regs.get(off + i).map_or(0, |&v| v as u8));
        b(0) | (b(1) << 8) | (b(2) << 16) | (b(3) << 24)
    };
    Ok(LAPIC_COMPARED
        .iter()
        .map(|&(name, off)| {
            let v = reg(usize::from(off));
            if lapic_time_dependent(off) {
                DeviceRegister::timed(format!("lapic.{name}"), v)
            } else {
                DeviceRegister::new(format!("lapic.{name}"), v)
            }
        })
        .collect())
}
