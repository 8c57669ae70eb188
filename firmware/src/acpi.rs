//! ACPI tables (ACPI 6.x specification, chapter 5) for the `pc` machine, as a
//! stock Linux kernel and kvm-unit-tests read them on QEMU's `-M pc`.
//!
//! Tables built: RSDP (revision 2, both checksums), RSDT, XSDT, FADT
//! (revision 3, the ACPI 2.0 layout with the X_ fields), FACS, a minimal DSDT
//! and the MADT. No HPET, SRAT or SSDT.
//!
//! Memory layout (all in the BIOS area `0xF0000..0x100000`, which the e820
//! map reports reserved, so neither the OS nor the multiboot loader reuses
//! it):
//! - `0xF0000..0xF8000`: left for other firmware pieces;
//! - [`ACPI_TABLES_ADDR`] `0xF8000..0xFC000`: FACS (64-byte aligned, first),
//!   DSDT, FADT, MADT, RSDT, XSDT, each on a 16-byte boundary;
//! - `0xFC000..0xFE000`: the MP tables ([`crate::mptable::MPTABLE_ADDR`]);
//! - [`RSDP_ADDR`] `0xFE000`: the RSDP (36 bytes), on the 16-byte boundary
//!   OSes scan (ACPI 6.4 section 5.2.5.1: `0xE0000..0xFFFFF`).
//!
//! The platform described (QEMU's PIIX4 as a guest sees it): LAPIC at
//! 0xFEE00000 with APIC IDs `0..vcpus`; IOAPIC ID 0 at 0xFEC00000, 24 pins,
//! GSI base 0; ISA IRQ 0 → GSI 2 and IRQ 9 (the SCI) level / active high;
//! the PM block at 0x600 (PM1a event 0x600, PM1a control 0x604, 24-bit PM
//! timer 0x608, GPE0 0x620); reset through port 0xCF9 with value 6.
//!
//! ACPI mode: SMI_CMD is 0, which tells the OS the platform has no SMM
//! hand-over and is always in ACPI mode (ACPI 6.4 table 5.9, SMI_CMD), so the
//! PM device should report PM1_CNT.SCI_EN set from reset.
//!
//! Sleep states: `\_S3` (suspend to RAM) with SLP_TYP 1 and `\_S5` (soft
//! off) with SLP_TYP 0 for PM1a and PM1b, as QEMU's DSDT does for PIIX4
//! (`Package { 1, 1, 0, 0 }` and `Package { 0, 0, 0, 0 }`; no `\_S4`, as
//! with QEMU's `disable_s4`). The PM device treats a PM1_CNT write with
//! SLP_EN set as power-off with SLP_TYP 0 and as a suspend with SLP_TYP 1;
//! on the wake the FACS (whose Firmware_Waking_Vector the OS writes) is
//! found again through the RSDP, as SeaBIOS does. The DSDT declares no `\_SB.PCI0`: the platform has no PCI host
//! bridge, and declaring one would send the OS looking for it.

use thiserror::Error;

use tandem_core::{GuestMemory, MemoryError};

use crate::e820::{e820_map, E820Kind, FOUR_GIB, IOAPIC_BASE, LAPIC_BASE};

/// Where [`write_acpi`] puts the tables by default.
pub const ACPI_TABLES_ADDR: u64 = 0xF_8000;
/// Room set aside for the tables at [`ACPI_TABLES_ADDR`].
pub const ACPI_TABLES_MAX_LEN: u64 = 0x4000;
/// Where [`write_acpi`] puts the RSDP by default.
pub const RSDP_ADDR: u64 = 0xF_E000;
/// The range OSes scan for the RSDP signature (ACPI 6.4 section 5.2.5.1).
pub const RSDP_SCAN_START: u64 = 0xE_0000;
/// End (exclusive) of the RSDP scan range.
pub const RSDP_SCAN_END: u64 = 0x10_0000;
/// Size of the revision 2 RSDP.
pub const RSDP_LEN: usize = 36;
/// Size of the revision 1 part of the RSDP covered by the first checksum.
pub const RSDP_V1_LEN: usize = 20;
/// Largest vCPU count: xAPIC IDs are 8 bits and 0xFF is the broadcast ID.
pub const MAX_VCPUS: u32 = 255;

/// OEMID of every table (6 bytes).
pub const OEM_ID: &[u8; 6] = b"TANDEM";
/// OEM table ID of every table (8 bytes).
pub const OEM_TABLE_ID: &[u8; 8] = b"TANDEMPC";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// Creator ID (the "ASL compiler" field; QEMU puts "BXPC" there).
pub const CREATOR_ID: &[u8; 4] = b"TNDM";
/// Creator revision.
pub const CREATOR_REVISION: u32 = 1;

/// Size of the common table header (ACPI 6.4 table 5.4).
pub const SDT_HEADER_LEN: usize = 36;
/// Size of the FADT, revision 3 (ACPI 2.0 layout, up to X_GPE1_BLK).
pub const FADT_LEN: usize = 244;
/// FADT revision written.
pub const FADT_REVISION: u8 = 3;
/// Size of the FACS.
pub const FACS_LEN: usize = 64;

/// The ACPI PM I/O ports (QEMU's PIIX4 PM at base 0x600).
pub mod pm {
    /// PM1a event block: PM1_STS at +0, PM1_EN at +2.
    pub const PM1A_EVT_BLK: u16 = 0x600;
    pub const PM1_EVT_LEN: u8 = 4;
    /// PM1a control block (PM1_CNT: SCI_EN, SLP_TYP, SLP_EN).
    pub const PM1A_CNT_BLK: u16 = 0x604;
    pub const PM1_CNT_LEN: u8 = 2;
    /// PM timer: 24-bit counter at 3.579545 MHz.
    pub const PM_TMR_BLK: u16 = 0x608;
    pub const PM_TMR_LEN: u8 = 4;
    /// GPE0 block: GPE0_STS (2 bytes) then GPE0_EN (2 bytes).
    pub const GPE0_BLK: u16 = 0x620;
    pub const GPE0_BLK_LEN: u8 = 4;
    /// The SCI's ISA IRQ (level, active high).
    pub const SCI_IRQ: u16 = 9;
    /// Reset register: system I/O port 0xCF9 ...
    pub const RESET_PORT: u16 = 0xCF9;
    /// ... written with this value (hard reset, as QEMU's PIIX).
    pub const RESET_VALUE: u8 = 0x06;
    /// SLP_TYP value `\_S5` declares for PM1a and PM1b (QEMU's PIIX4 DSDT).
    pub const S5_SLP_TYP: u8 = 0;
    /// SLP_TYP value `\_S3` declares for PM1a and PM1b (QEMU's PIIX4 DSDT).
    pub const S3_SLP_TYP: u8 = 1;
}

/// FADT Flags bits (ACPI 6.4 table 5.10).
pub mod fadt_flags {
    pub const WBINVD: u32 = 1 << 0;
    pub const PROC_C1: u32 = 1 << 2;
    /// Sleep button is a control-method device (0 = fixed feature).
    pub const SLP_BUTTON: u32 = 1 << 5;
    /// TMR_VAL_EXT: set for a 32-bit PM timer; clear for the 24-bit one here.
    pub const TMR_VAL_EXT: u32 = 1 << 8;
    pub const RESET_REG_SUP: u32 = 1 << 10;
}

/// FADT IAPC_BOOT_ARCH bits (ACPI 6.4 table 5.11).
pub mod iapc_boot_arch {
    /// Legacy ISA devices (LPC/ISA) are present.
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// An 8042 keyboard controller is present.
    pub const I8042: u16 = 1 << 1;
}

/// MADT structure types and flags (ACPI 6.4 section 5.2.12).
pub mod madt {
    pub const TYPE_LOCAL_APIC: u8 = 0;
    pub const TYPE_IO_APIC: u8 = 1;
    pub const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
    pub const TYPE_LOCAL_APIC_NMI: u8 = 4;
    /// MADT flags: the system also has dual 8259s (PCAT_COMPAT).
    pub const PCAT_COMPAT: u32 = 1 << 0;
    /// Local APIC flags: enabled.
    pub const LAPIC_ENABLED: u32 = 1 << 0;
    /// MPS INTI flags: polarity active high (bits 1:0 = 01).
    pub const POLARITY_ACTIVE_HIGH: u16 = 0b01;
    /// MPS INTI flags: level triggered (bits 3:2 = 11).
    pub const TRIGGER_LEVEL: u16 = 0b11 << 2;
    /// "All processors" in the Local APIC NMI structure.
    pub const ALL_PROCESSORS: u8 = 0xFF;
}

/// The IOAPIC's ID (its ID register reads 0 at reset, and QEMU's MADT uses 0).
pub const IOAPIC_ID: u8 = 0;
/// The IOAPIC's first GSI.
pub const IOAPIC_GSI_BASE: u32 = 0;

/// What the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, APIC IDs `0..vcpus` (1..=255).
    pub vcpus: u32,
    /// Guest-physical address of the tables (64-byte aligned, below 4 GiB).
    pub tables_addr: u64,
    /// Room at `tables_addr`; building fails if the tables need more.
    pub tables_max_len: u64,
    /// Guest-physical address of the RSDP (16-byte aligned, in the scanned range).
    pub rsdp_addr: u64,
    /// A DMAR table for a VT-d remapping unit, when the machine has one.
    pub dmar: Option<DmarConfig>,
}

/// What the DMAR table (VT-d specification 8.1) says of the remapping unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmarConfig {
    /// The unit's register page.
    pub register_base: u64,
    /// DMA address width the unit supports, in bits (39 or 48).
    pub address_width: u8,
    /// The unit remaps interrupts (DMAR flag INTR_REMAP).
    pub interrupt_remapping: bool,
    /// x2APIC mode is not allowed (no extended interrupt mode):
    /// X2APIC_OPT_OUT, as QEMU sets it with `eim=off`.
    pub x2apic_opt_out: bool,
}

/// The PCI source ID of the IOAPIC in the DMAR device scope: QEMU's
/// pseudo device 0xFF:00.0 on q35, so guests see the same.
pub const DMAR_IOAPIC_BUS: u8 = 0xFF;

impl AcpiConfig {
    /// The default layout for `vcpus` vCPUs.
    pub fn new(vcpus: u32) -> Self {
        AcpiConfig {
            vcpus,
            tables_addr: ACPI_TABLES_ADDR,
            tables_max_len: ACPI_TABLES_MAX_LEN,
            rsdp_addr: RSDP_ADDR,
            dmar: None,
        }
    }
}

/// Where each table went (guest-physical addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    pub rsdp: u64,
    pub rsdt: u64,
    pub xsdt: u64,
    pub fadt: u64,
    pub facs: u64,
    pub dsdt: u64,
    pub madt: u64,
    /// One past the last byte of the tables image (the RSDP excluded).
    pub tables_end: u64,
}

/// The built tables: `image` goes at `base`, `rsdp` at `layout.rsdp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub base: u64,
    pub image: Vec<u8>,
    pub rsdp: [u8; RSDP_LEN],
    pub layout: AcpiLayout,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI tables describe 1..={MAX_VCPUS} vCPUs, got {0}")]
    BadVcpuCount(u32),
    #[error("ACPI table address {0:#x} must be 64-byte aligned and the tables below 4 GiB")]
    BadTablesAddr(u64),
    #[error("RSDP address {0:#x} must be 16-byte aligned within 0xE0000..0x100000")]
    BadRsdpAddr(u64),
    #[error("ACPI tables need {needed:#x} bytes, only {room:#x} are set aside")]
    TooBig { needed: u64, room: u64 },
    #[error("ACPI tables {start:#x}..{end:#x} overlap the RSDP at {rsdp:#x}")]
    RsdpOverlap { start: u64, end: u64, rsdp: u64 },
    #[error("guest range {addr:#x}+{len:#x} is not reserved in the e820 map")]
    NotReserved { addr: u64, len: u64 },
    #[error("AML encoding: {0}")]
    Aml(#[from] aml::AmlError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// The byte that makes `bytes` sum to 0 (mod 256) when added.
pub fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// Whether `[addr, addr+len)` lies inside one e820 `Reserved` entry of `mem`'s map.
pub(crate) fn is_reserved(mem: &GuestMemory, addr: u64, len: u64) -> bool {
    e820_map(mem)
        .iter()
        .any(|e| e.kind == E820Kind::Reserved && e.contains(addr, len))
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Starts a table with its 36-byte header; length and checksum are patched by
/// [`finish_table`].
fn table_header(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(signature);
    t.extend_from_slice(&0u32.to_le_bytes()); // Length, patched
    t.push(revision);
    t.push(0); // Checksum, patched
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t
}

/// Patches the Length and Checksum fields of a table begun with [`table_header`].
fn finish_table(mut t: Vec<u8>) -> Vec<u8> {
    // Every table built here is a few KiB at most, far below u32::MAX.
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    t[9] = checksum(&t);
    t
}

/// Generic Address Structure address space IDs and access sizes (ACPI 6.4 5.2.3.2).
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;
const GAS_ACCESS_WORD: u8 = 2;
const GAS_ACCESS_DWORD: u8 = 3;

/// A 12-byte Generic Address Structure for a system I/O register block.
fn gas_io(port: u16, len_bytes: u8, access_size: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = GAS_SYSTEM_IO;
    g[1] = len_bytes * 8; // Register Bit Width
    g[2] = 0; // Register Bit Offset
    g[3] = access_size;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn build_facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    // Hardware signature, waking vectors (the OS writes
    // Firmware_Waking_Vector before S3), global lock and flags stay 0: no
    // S4 and no 64-bit wake support. Version 2 (ACPI 4.0+ layout with OSPM
    // flags).
    f[32] = 2;
    f
}

/// The DSDT's AML: `Name (\_S3, Package (0x04) { One, One, Zero, Zero })`
/// and `Name (\_S5, Package (0x04) { Zero, Zero, Zero, Zero })`.
fn dsdt_aml() -> Result<Vec<u8>, aml::AmlError> {
    let sleep_state = |name: &str, slp_typ: u8| {
        let t = u64::from(slp_typ);
        aml::name(
            name,
            &aml::package(&[
                aml::integer(t), // PM1a_CNT.SLP_TYP
                aml::integer(t), // PM1b_CNT.SLP_TYP (no PM1b block)
                aml::integer(0), // reserved
                aml::integer(0), // reserved
            ])?,
        )
    };
    let mut aml = sleep_state("\\_S3", pm::S3_SLP_TYP)?;
    aml.extend(sleep_state("\\_S5", pm::S5_SLP_TYP)?);
    Ok(aml)
}

fn build_dsdt() -> Result<Vec<u8>, aml::AmlError> {
    // Revision 2: AML integers are 64 bits wide.
    let mut t = table_header(b"DSDT", 2);
    t.extend_from_slice(&dsdt_aml()?);
    Ok(finish_table(t))
}

fn build_madt(vcpus: u32) -> Vec<u8> {
    let mut t = table_header(b"APIC", 1);
    // LAPIC_BASE is 0xFEE00000, which fits the 32-bit field.
    t.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&madt::PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        // vcpus <= 255 is checked by the caller, so the ID fits a byte.
        let id = id as u8;
        t.extend_from_slice(&[madt::TYPE_LOCAL_APIC, 8, id, id]);
        t.extend_from_slice(&madt::LAPIC_ENABLED.to_le_bytes());
    }
    t.extend_from_slice(&[madt::TYPE_IO_APIC, 12, IOAPIC_ID, 0]);
    t.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&IOAPIC_GSI_BASE.to_le_bytes());
    // Interrupt source overrides (bus 0 = ISA): the PIT's IRQ 0 reaches pin 2
    // (conforming flags), and the SCI is level-triggered, active high.
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (
            pm::SCI_IRQ as u8,
            u32::from(pm::SCI_IRQ),
            madt::POLARITY_ACTIVE_HIGH | madt::TRIGGER_LEVEL,
        ),
    ] {
        t.extend_from_slice(&[madt::TYPE_INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq]);
        t.extend_from_slice(&gsi.to_le_bytes());
        t.extend_from_slice(&flags.to_le_bytes());
    }
    // NMI on LINT1 of every processor, conforming flags.
    t.extend_from_slice(&[madt::TYPE_LOCAL_APIC_NMI, 6, madt::ALL_PROCESSORS, 0, 0, 1]);
    finish_table(t)
}

fn build_fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = table_header(b"FACP", FADT_REVISION);
    t.resize(FADT_LEN, 0);
    let put16 =
        |t: &mut Vec<u8>, off: usize, v: u16| t[off..off + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |t: &mut Vec<u8>, off: usize, v: u32| t[off..off + 4].copy_from_slice(&v.to_le_bytes());
    let put64 =
        |t: &mut Vec<u8>, off: usize, v: u64| t[off..off + 8].copy_from_slice(&v.to_le_bytes());
    // The caller keeps the tables below 4 GiB, so the 32-bit pointers hold.
    put32(&mut t, 36, facs as u32); // FIRMWARE_CTRL
    put32(&mut t, 40, dsdt as u32); // DSDT
    t[45] = 0; // Preferred_PM_Profile: unspecified
    put16(&mut t, 46, pm::SCI_IRQ); // SCI_INT
    put32(&mut t, 48, 0); // SMI_CMD: none, always in ACPI mode
    put32(&mut t, 56, u32::from(pm::PM1A_EVT_BLK));
    put32(&mut t, 64, u32::from(pm::PM1A_CNT_BLK));
    put32(&mut t, 76, u32::from(pm::PM_TMR_BLK));
    put32(&mut t, 80, u32::from(pm::GPE0_BLK));
    t[88] = pm::PM1_EVT_LEN;
    t[89] = pm::PM1_CNT_LEN;
    t[91] = pm::PM_TMR_LEN;
    t[92] = pm::GPE0_BLK_LEN;
    // C2 / C3 not supported: latencies above 100 / 1000 us (QEMU's values).
    put16(&mut t, 96, 0x0FFF); // P_LVL2_LAT
    put16(&mut t, 98, 0x03E9); // P_LVL3_LAT
    t[108] = 0x32; // CENTURY: the CMOS RTC's century byte, as QEMU
    put16(
        &mut t,
        109,
        iapc_boot_arch::LEGACY_DEVICES | iapc_boot_arch::I8042,
    );
    put32(
        &mut t,
        112,
        fadt_flags::WBINVD
            | fadt_flags::PROC_C1
            | fadt_flags::SLP_BUTTON
            | fadt_flags::RESET_REG_SUP,
    );
    t[116..128].copy_from_slice(&gas_io(pm::RESET_PORT, 1, GAS_ACCESS_BYTE));
    t[128] = pm::RESET_VALUE;
    put64(&mut t, 132, facs); // X_FIRMWARE_CTRL
    put64(&mut t, 140, dsdt); // X_DSDT
                              // The X_ blocks repeat the 32-bit ones with matching widths, so an OS
                              // that prefers them (ACPICA does) sees the same registers.
    t[148..160].copy_from_slice(&gas_io(pm::PM1A_EVT_BLK, pm::PM1_EVT_LEN, GAS_ACCESS_WORD));
    t[172..184].copy_from_slice(&gas_io(pm::PM1A_CNT_BLK, pm::PM1_CNT_LEN, GAS_ACCESS_WORD));
    t[208..220].copy_from_slice(&gas_io(pm::PM_TMR_BLK, pm::PM_TMR_LEN, GAS_ACCESS_DWORD));
    t[220..232].copy_from_slice(&gas_io(pm::GPE0_BLK, pm::GPE0_BLK_LEN, GAS_ACCESS_BYTE));
    finish_table(t)
}

/// The DMAR table: one DRHD covering every PCI device of segment 0
/// (INCLUDE_PCI_ALL) with the IOAPIC in its device scope, which Linux
/// needs before it enables interrupt remapping.
fn build_dmar(d: &DmarConfig) -> Vec<u8> {
    let mut t = table_header(b"DMAR", 1);
    t.push(d.address_width.saturating_sub(1)); // Host Address Width: N - 1
    let mut flags = 0u8;
    if d.interrupt_remapping {
        flags |= 1; // INTR_REMAP
        if d.x2apic_opt_out {
            flags |= 2; // X2APIC_OPT_OUT
        }
    }
    t.push(flags);
    t.extend_from_slice(&[0; 10]);
    // DRHD: type 0, length, flags (INCLUDE_PCI_ALL), size (2^0 pages),
    // segment 0, register base, then the IOAPIC device scope.
    let scope: [u8; 8] = [
        3, // IOAPIC
        8, // length
        0,
        0,
        IOAPIC_ID,       // enumeration ID: the IOAPIC's ID
        DMAR_IOAPIC_BUS, // start bus
        0,               // path: device 0
        0,               // function 0
    ];
    let drhd_len = 16 + scope.len() as u16;
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&drhd_len.to_le_bytes());
    t.push(1); // INCLUDE_PCI_ALL
    t.push(0);
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&d.register_base.to_le_bytes());
    t.extend_from_slice(&scope);
    finish_table(t)
}

fn build_rsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = table_header(b"RSDT", 1);
    for &e in entries {
        t.extend_from_slice(&(e as u32).to_le_bytes());
    }
    finish_table(t)
}

fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = table_header(b"XSDT", 1);
    for &e in entries {
        t.extend_from_slice(&e.to_le_bytes());
    }
    finish_table(t)
}

fn build_rsdp(rsdt: u64, xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(OEM_ID);
    r[15] = 2; // Revision: ACPI 2.0+
    r[16..20].copy_from_slice(&(rsdt as u32).to_le_bytes());
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..RSDP_V1_LEN]);
    r[32] = checksum(&r);
    r
}

/// Builds the tables for `cfg` as an image to be placed at `base` (64-byte
/// aligned, so the FACS at its start is too). `cfg.tables_addr` is not used;
/// `cfg.tables_max_len` bounds the image.
pub fn build_acpi(cfg: &AcpiConfig, base: u64) -> Result<AcpiTables, AcpiError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(AcpiError::BadVcpuCount(cfg.vcpus));
    }
    if base % 64 != 0 || base >= FOUR_GIB {
        return Err(AcpiError::BadTablesAddr(base));
    }
    let facs = build_facs();
    let dsdt = build_dsdt()?;
    let madt = build_madt(cfg.vcpus);

    // Offsets in the image: FACS, DSDT, FADT, MADT, RSDT, XSDT.
    let facs_off = 0u64;
    let dsdt_off = align_up(facs_off + facs.len() as u64, 16);
    let fadt_off = align_up(dsdt_off + dsdt.len() as u64, 16);
    let madt_off = align_up(fadt_off + FADT_LEN as u64, 16);
    let dmar = cfg.dmar.as_ref().map(build_dmar);
    let dmar_off = align_up(madt_off + madt.len() as u64, 16);
    let dmar_len = dmar.as_ref().map_or(0, |d| d.len() as u64);
    let tables = 2 + u64::from(dmar.is_some());
    let rsdt_off = align_up(dmar_off + dmar_len, 16);
    let rsdt_len = SDT_HEADER_LEN as u64 + 4 * tables;
    let xsdt_off = align_up(rsdt_off + rsdt_len, 16);
    let xsdt_len = SDT_HEADER_LEN as u64 + 8 * tables;
    let total = xsdt_off + xsdt_len;
    if total > cfg.tables_max_len {
        return Err(AcpiError::TooBig {
            needed: total,
            room: cfg.tables_max_len,
        });
    }
    if base + total > FOUR_GIB {
        return Err(AcpiError::BadTablesAddr(base));
    }
    let fadt = build_fadt(base + facs_off, base + dsdt_off);
    let mut pointed = vec![base + fadt_off, base + madt_off];
    if dmar.is_some() {
        pointed.push(base + dmar_off);
    }
    let rsdt = build_rsdt(&pointed);
    let xsdt = build_xsdt(&pointed);

    let mut image = vec![0u8; total as usize];
    for (off, table) in [
        (facs_off, &facs),
        (dsdt_off, &dsdt),
        (fadt_off, &fadt),
        (madt_off, &madt),
        (dmar_off, dmar.as_ref().unwrap_or(&Vec::new())),
        (rsdt_off, &rsdt),
        (xsdt_off, &xsdt),
    ] {
        let off = off as usize;
        image[off..off + table.len()].copy_from_slice(table);
    }
    let layout = AcpiLayout {
        rsdp: cfg.rsdp_addr,
        rsdt: base + rsdt_off,
        xsdt: base + xsdt_off,
        fadt: base + fadt_off,
        facs: base + facs_off,
        dsdt: base + dsdt_off,
        madt: base + madt_off,
        tables_end: base + total,
    };
    Ok(AcpiTables {
        base,
        image,
        rsdp: build_rsdp(layout.rsdt, layout.xsdt),
        layout,
    })
}

/// Builds the tables for `cfg` and writes them at `cfg.tables_addr` and the
/// RSDP at `cfg.rsdp_addr`. Both ranges must be e820-reserved guest RAM and
/// must not overlap; nothing is written unless every check passes.
pub fn write_acpi(mem: &GuestMemory, cfg: &AcpiConfig) -> Result<AcpiLayout, AcpiError> {
    let rsdp = cfg.rsdp_addr;
    if rsdp % 16 != 0 || rsdp < RSDP_SCAN_START || rsdp + RSDP_LEN as u64 > RSDP_SCAN_END {
        return Err(AcpiError::BadRsdpAddr(rsdp));
    }
    let tables = build_acpi(cfg, cfg.tables_addr)?;
    let (start, end) = (tables.base, tables.layout.tables_end);
    if rsdp < end && start < rsdp + RSDP_LEN as u64 {
        return Err(AcpiError::RsdpOverlap { start, end, rsdp });
    }
    for (addr, len) in [(start, end - start), (rsdp, RSDP_LEN as u64)] {
        if !is_reserved(mem, addr, len) {
            return Err(AcpiError::NotReserved { addr, len });
        }
        if !mem.is_ram(addr, len) {
            return Err(MemoryError::OutOfRange { gpa: addr, len }.into());
        }
    }
    mem.write(start, &tables.image)?;
    mem.write(rsdp, &tables.rsdp)?;
    Ok(tables.layout)
}

/// A small encoder for the AML constructs the DSDT needs (ACPI 6.4 chapter
/// 20, "ACPI Machine Language Specification").
pub mod aml {
    use thiserror::Error;

    pub const ZERO_OP: u8 = 0x00;
    pub const ONE_OP: u8 = 0x01;
    pub const NAME_OP: u8 = 0x08;
    pub const BYTE_PREFIX: u8 = 0x0A;
    pub const WORD_PREFIX: u8 = 0x0B;
    pub const DWORD_PREFIX: u8 = 0x0C;
    pub const STRING_PREFIX: u8 = 0x0D;
    pub const QWORD_PREFIX: u8 = 0x0E;
    pub const SCOPE_OP: u8 = 0x10;
    pub const PACKAGE_OP: u8 = 0x12;
    pub const DUAL_NAME_PREFIX: u8 = 0x2E;
    pub const MULTI_NAME_PREFIX: u8 = 0x2F;
    pub const ROOT_CHAR: u8 = b'\\';
    pub const PARENT_PREFIX_CHAR: u8 = b'^';
    pub const EXT_OP_PREFIX: u8 = 0x5B;
    /// Second byte of DeviceOp (`0x5B 0x82`).
    pub const DEVICE_OP: u8 = 0x82;
    /// Largest value PkgLength can encode (28 bits, 4 bytes).
    pub const PKG_LENGTH_MAX: usize = (1 << 28) - 1;

    #[derive(Debug, Error, PartialEq, Eq)]
    pub enum AmlError {
        #[error("AML package of {0} bytes is too long for PkgLength")]
        TooLong(usize),
        #[error("invalid AML name {0:?}")]
        BadName(String),
        #[error("AML string must be ASCII without NUL")]
        BadString,
        #[error("AML package has {0} elements, at most 255")]
        TooManyElements(usize),
    }

    /// The PkgLength encoding for a construct whose body after the PkgLength
    /// is `body_len` bytes (the encoded length counts the PkgLength bytes
    /// themselves, ACPI 6.4 section 20.2.4): one byte holds lengths up to 63;
    /// otherwise bits 7:6 of the lead byte give 1-3 following bytes, its bits
    /// 3:0 are the low nibble and each following byte the next 8 bits.
    pub fn pkg_length(body_len: usize) -> Result<Vec<u8>, AmlError> {
        for extra in 0..=3usize {
            let total = body_len
                .checked_add(1 + extra)
                .ok_or(AmlError::TooLong(body_len))?;
            if extra == 0 {
                if total <= 0x3F {
                    return Ok(vec![total as u8]);
                }
                continue;
            }
            if total < 1 << (4 + 8 * extra) {
                let mut out = vec![((extra as u8) << 6) | (total & 0xF) as u8];
                for i in 0..extra {
                    out.push((total >> (4 + 8 * i)) as u8);
                }
                return Ok(out);
            }
        }
        Err(AmlError::TooLong(body_len))
    }

    /// The shortest encoding of an integer: ZeroOp, OneOp or a Byte/Word/
    /// DWord/QWord constant.
    pub fn integer(v: u64) -> Vec<u8> {
        match v {
            0 => vec![ZERO_OP],
            1 => vec![ONE_OP],
            2..=0xFF => vec![BYTE_PREFIX, v as u8],
            0x100..=0xFFFF => {
                let mut o = vec![WORD_PREFIX];
                o.extend_from_slice(&(v as u16).to_le_bytes());
                o
            }
            0x1_0000..=0xFFFF_FFFF => {
                let mut o = vec![DWORD_PREFIX];
                o.extend_from_slice(&(v as u32).to_le_bytes());
                o
            }
            _ => {
                let mut o = vec![QWORD_PREFIX];
                o.extend_from_slice(&v.to_le_bytes());
                o
            }
        }
    }

    /// A String constant: StringPrefix, ASCII bytes, NUL.
    pub fn string(s: &str) -> Result<Vec<u8>, AmlError> {
        if !s.is_ascii() || s.bytes().any(|b| b == 0) {
            return Err(AmlError::BadString);
        }
        let mut o = vec![STRING_PREFIX];
        o.extend_from_slice(s.as_bytes());
        o.push(0);
        Ok(o)
    }

    /// One NameSeg: a lead character `A-Z` or `_`, then `A-Z`, `0-9` or `_`,
    /// padded with `_` to four characters.
    fn name_seg(seg: &str, whole: &str) -> Result<[u8; 4], AmlError> {
        let bad = || AmlError::BadName(whole.to_string());
        let bytes = seg.as_bytes();
        if bytes.is_empty() || bytes.len() > 4 {
            return Err(bad());
        }
        let mut out = [b'_'; 4];
        for (i, &c) in bytes.iter().enumerate() {
            let ok = c.is_ascii_uppercase() || c == b'_' || (i > 0 && c.is_ascii_digit());
            if !ok {
                return Err(bad());
            }
            out[i] = c;
        }
        Ok(out)
    }

    /// A NameString such as `\_S5`, `_SB`, `\_SB.PCI0` or `^FOO`.
    pub fn name_string(path: &str) -> Result<Vec<u8>, AmlError> {
        let mut out = Vec::new();
        let mut rest = path;
        if let Some(r) = rest.strip_prefix('\\') {
            out.push(ROOT_CHAR);
            rest = r;
        } else {
            while let Some(r) = rest.strip_prefix('^') {
                out.push(PARENT_PREFIX_CHAR);
                rest = r;
            }
        }
        if rest.is_empty() {
            out.push(0); // NullName
            return Ok(out);
        }
        let segs = rest
            .split('.')
            .map(|s| name_seg(s, path))
            .collect::<Result<Vec<_>, _>>()?;
        match segs.len() {
            1 => {}
            2 => out.push(DUAL_NAME_PREFIX),
            n if n <= 255 => {
                out.push(MULTI_NAME_PREFIX);
                out.push(n as u8);
            }
            _ => return Err(AmlError::BadName(path.to_string())),
        }
        for s in segs {
            out.extend_from_slice(&s);
        }
        Ok(out)
    }

    /// `Name (path, value)`: NameOp NameString DataRefObject.
    pub fn name(path: &str, value: &[u8]) -> Result<Vec<u8>, AmlError> {
        let mut o = vec![NAME_OP];
        o.extend_from_slice(&name_string(path)?);
        o.extend_from_slice(value);
        Ok(o)
    }

    /// `Package () { elements }`: PackageOp PkgLength NumElements elements.
    pub fn package(elements: &[Vec<u8>]) -> Result<Vec<u8>, AmlError> {
        let count =
            u8::try_from(elements.len()).map_err(|_| AmlError::TooManyElements(elements.len()))?;
        let mut body = vec![count];
        for e in elements {
            body.extend_from_slice(e);
        }
        let mut o = vec![PACKAGE_OP];
        o.extend_from_slice(&pkg_length(body.len())?);
        o.extend_from_slice(&body);
        Ok(o)
    }

    fn named_block(opcode: &[u8], path: &str, terms: &[u8]) -> Result<Vec<u8>, AmlError> {
        let mut body = name_string(path)?;
        body.extend_from_slice(terms);
        let mut o = opcode.to_vec();
        o.extend_from_slice(&pkg_length(body.len())?);
        o.extend_from_slice(&body);
        Ok(o)
    }

    /// `Scope (path) { terms }`: ScopeOp PkgLength NameString TermList.
    pub fn scope(path: &str, terms: &[u8]) -> Result<Vec<u8>, AmlError> {
        named_block(&[SCOPE_OP], path, terms)
    }

    /// `Device (path) { terms }`: ExtOpPrefix DeviceOp PkgLength NameString TermList.
    pub fn device(path: &str, terms: &[u8]) -> Result<Vec<u8>, AmlError> {
        named_block(&[EXT_OP_PREFIX, DEVICE_OP], path, terms)
    }
}

#[cfg(test)]
mod tests {
    use super::aml::{self, AmlError};
    use super::*;

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    // ---- A small AML reader, independent of the encoder, for the tests ----

    /// (encoded value, bytes used) of a PkgLength, or None if malformed.
    fn decode_pkg_length(b: &[u8]) -> Option<(usize, usize)> {
        let lead = *b.first()?;
        let follow = usize::from(lead >> 6);
        if follow == 0 {
            return Some((usize::from(lead & 0x3F), 1));
        }
        if lead & 0x30 != 0 {
            return None; // bits 5:4 must be zero in a multi-byte PkgLength
        }
        let mut v = usize::from(lead & 0xF);
        for i in 0..follow {
            v |= usize::from(*b.get(1 + i)?) << (4 + 8 * i);
        }
        Some((v, 1 + follow))
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Aml {
        Int(u64),
        Str(String),
        Package(Vec<Aml>),
        Name(String, Box<Aml>),
        Scope(String, Vec<Aml>),
        Device(String, Vec<Aml>),
    }

    struct Reader<'a> {
        b: &'a [u8],
        pos: usize,
    }

    impl Reader<'_> {
        fn byte(&mut self) -> Option<u8> {
            let v = *self.b.get(self.pos)?;
            self.pos += 1;
            Some(v)
        }
        fn bytes(&mut self, n: usize) -> Option<&[u8]> {
            let s = self.b.get(self.pos..self.pos + n)?;
            self.pos += n;
            Some(s)
        }
        /// Reads a PkgLength and returns where the construct ends.
        fn pkg_end(&mut self) -> Option<usize> {
            let start = self.pos;
            let (len, used) = decode_pkg_length(&self.b[self.pos..])?;
            self.pos += used;
            let end = start + len;
            (end <= self.b.len() && end >= self.pos).then_some(end)
        }
        fn seg(&mut self) -> Option<String> {
            let s = self.bytes(4)?;
            let ok = (s[0].is_ascii_uppercase() || s[0] == b'_')
                && s[1..]
                    .iter()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
            ok.then(|| String::from_utf8_lossy(s).into_owned())
        }
        fn name_string(&mut self) -> Option<String> {
            let mut out = String::new();
            match self.b.get(self.pos)? {
                b'\\' => {
                    out.push('\\');
                    self.pos += 1;
                }
                _ => {
                    while self.b.get(self.pos) == Some(&b'^') {
                        out.push('^');
                        self.pos += 1;
                    }
                }
            }
            let segs = match *self.b.get(self.pos)? {
                0 => {
                    self.pos += 1;
                    0
                }
                0x2E => {
                    self.pos += 1;
                    2
                }
                0x2F => {
                    self.pos += 1;
                    usize::from(self.byte()?)
                }
                _ => 1,
            };
            let mut parts = Vec::new();
            for _ in 0..segs {
                parts.push(self.seg()?);
            }
            out.push_str(&parts.join("."));
            Some(out)
        }
        fn data(&mut self) -> Option<Aml> {
            Some(match self.byte()? {
                0x00 => Aml::Int(0),
                0x01 => Aml::Int(1),
                0x0A => Aml::Int(u64::from(self.byte()?)),
                0x0B => Aml::Int(u64::from(u16::from_le_bytes(
                    self.bytes(2)?.try_into().ok()?,
                ))),
                0x0C => Aml::Int(u64::from(u32::from_le_bytes(
                    self.bytes(4)?.try_into().ok()?,
                ))),
                0x0E => Aml::Int(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?)),
                0x0D => {
                    let rest = &self.b[self.pos..];
                    let nul = rest.iter().position(|&c| c == 0)?;
                    let s = String::from_utf8(rest[..nul].to_vec()).ok()?;
                    self.pos += nul + 1;
                    Aml::Str(s)
                }
                0x12 => {
                    let end = self.pkg_end()?;
                    let count = usize::from(self.byte()?);
                    let mut elems = Vec::new();
                    while self.pos < end {
                        elems.push(self.data()?);
                    }
                    (self.pos == end && elems.len() == count).then_some(())?;
                    Aml::Package(elems)
                }
                _ => return None,
            })
        }
        fn term(&mut self) -> Option<Aml> {
            match self.byte()? {
                0x08 => {
                    let n = self.name_string()?;
                    Some(Aml::Name(n, Box::new(self.data()?)))
                }
                0x10 => {
                    let end = self.pkg_end()?;
                    let n = self.name_string()?;
                    Some(Aml::Scope(n, self.term_list(end)?))
                }
                0x5B if self.byte()? == 0x82 => {
                    let end = self.pkg_end()?;
                    let n = self.name_string()?;
                    Some(Aml::Device(n, self.term_list(end)?))
                }
                _ => None,
            }
        }
        fn term_list(&mut self, end: usize) -> Option<Vec<Aml>> {
            let mut out = Vec::new();
            while self.pos < end {
                out.push(self.term()?);
            }
            (self.pos == end).then_some(out)
        }
    }

    fn parse_aml(b: &[u8]) -> Option<Vec<Aml>> {
        Reader { b, pos: 0 }.term_list(b.len())
    }

    // ---- AML encoder ----

    #[test]
    fn pkg_length_one_two_three_and_four_bytes() {
        // One byte: the length counts the PkgLength byte itself, up to 63.
        assert_eq!(aml::pkg_length(0).unwrap(), vec![0x01]);
        assert_eq!(aml::pkg_length(10).unwrap(), vec![11]);
        assert_eq!(aml::pkg_length(62).unwrap(), vec![63]);
        // Two bytes: 63 + 2 = 65 = 0x041 -> lead 0x40 | 0x1, then 0x04.
        assert_eq!(aml::pkg_length(63).unwrap(), vec![0x41, 0x04]);
        assert_eq!(aml::pkg_length(4093).unwrap(), vec![0x4F, 0xFF]);
        // Three bytes: 4094 + 3 = 0x1001.
        assert_eq!(aml::pkg_length(4094).unwrap(), vec![0x81, 0x00, 0x01]);
        assert_eq!(
            aml::pkg_length((1 << 20) - 4).unwrap(),
            vec![0x8F, 0xFF, 0xFF]
        );
        // Four bytes: (2^20 - 3) + 4 = 0x100001.
        assert_eq!(
            aml::pkg_length((1 << 20) - 3).unwrap(),
            vec![0xC1, 0x00, 0x00, 0x01]
        );
        assert_eq!(
            aml::pkg_length(aml::PKG_LENGTH_MAX - 4).unwrap(),
            vec![0xCF, 0xFF, 0xFF, 0xFF]
        );
        assert_eq!(
            aml::pkg_length(aml::PKG_LENGTH_MAX - 3),
            Err(AmlError::TooLong(aml::PKG_LENGTH_MAX - 3))
        );
        assert!(aml::pkg_length(usize::MAX).is_err());
    }

    #[test]
    fn pkg_length_round_trips_for_many_lengths() {
        // Deterministic xorshift over the whole encodable range, plus every
        // boundary neighbourhood.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut lens: Vec<usize> = (0..200).collect();
        for b in [63usize, 4096, 1 << 20, 1 << 28] {
            lens.extend(b.saturating_sub(8)..b.saturating_add(8));
        }
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lens.push((x % (1 << 28)) as usize);
        }
        for body in lens {
            match aml::pkg_length(body) {
                Ok(enc) => {
                    let (v, used) = decode_pkg_length(&enc).unwrap();
                    assert_eq!(used, enc.len(), "body {body}");
                    assert_eq!(v, body + enc.len(), "body {body}");
                    // Shortest form: one byte fewer could not have held it.
                    let limit = [0x3F, 0xFFF, 0xF_FFFF, 0xFFF_FFFF][enc.len() - 1];
                    assert!(v <= limit);
                    if enc.len() > 1 {
                        let prev = [0x3F, 0xFFF, 0xF_FFFF][enc.len() - 2];
                        assert!(body + enc.len() - 1 > prev, "body {body} not minimal");
                    }
                }
                Err(e) => assert_eq!(e, AmlError::TooLong(body)),
            }
        }
    }

    #[test]
    fn integers_strings_and_names_encode_as_the_spec_says() {
        assert_eq!(aml::integer(0), vec![0x00]);
        assert_eq!(aml::integer(1), vec![0x01]);
        assert_eq!(aml::integer(5), vec![0x0A, 5]);
        assert_eq!(aml::integer(0x1234), vec![0x0B, 0x34, 0x12]);
        assert_eq!(aml::integer(0x12_3456), vec![0x0C, 0x56, 0x34, 0x12, 0]);
        assert_eq!(aml::integer(1 << 40)[0], 0x0E);
        assert_eq!(aml::string("PNP").unwrap(), b"\x0DPNP\0".to_vec());
        assert_eq!(aml::string("a\0b"), Err(AmlError::BadString));
        assert_eq!(aml::name_string("\\_S5").unwrap(), b"\\_S5_".to_vec());
        assert_eq!(aml::name_string("_SB").unwrap(), b"_SB_".to_vec());
        assert_eq!(
            aml::name_string("\\_SB.PCI0").unwrap(),
            b"\\\x2E_SB_PCI0".to_vec()
        );
        assert_eq!(
            aml::name_string("A.B.C").unwrap(),
            b"\x2F\x03A___B___C___".to_vec()
        );
        assert_eq!(aml::name_string("^^X").unwrap(), b"^^X___".to_vec());
        assert_eq!(aml::name_string("\\").unwrap(), vec![b'\\', 0]);
        for bad in ["1ABC", "ABCDE", "a", "\\_SB..X", "A-B"] {
            assert!(
                matches!(aml::name_string(bad), Err(AmlError::BadName(_))),
                "{bad}"
            );
        }
        let many: Vec<Vec<u8>> = (0..256).map(|_| aml::integer(0)).collect();
        assert_eq!(aml::package(&many), Err(AmlError::TooManyElements(256)));
    }

    #[test]
    fn scope_and_device_nest_with_correct_lengths() {
        let hid = aml::name("_HID", &aml::string("PNP0A03").unwrap()).unwrap();
        let dev = aml::device("PCI0", &hid).unwrap();
        assert_eq!(&dev[..2], &[0x5B, 0x82]);
        let small = aml::scope("\\_SB", &dev).unwrap();
        // A scope large enough for a 2-byte and one for a 3-byte PkgLength.
        let devs_100: Vec<u8> = (0..100)
            .flat_map(|i| aml::name(&format!("N{i:03}"), &aml::integer(i)).unwrap())
            .collect();
        let devs_big: Vec<u8> = (0..800)
            .flat_map(|i| aml::device(&format!("D{i:03}"), &hid).unwrap())
            .collect();
        let mid = aml::scope("\\_SB", &devs_100).unwrap();
        let big = aml::scope("\\_SB", &devs_big).unwrap();
        assert_eq!(mid[1] >> 6, 1);
        assert_eq!(big[1] >> 6, 2);
        let parsed = parse_aml(&small).unwrap();
        assert_eq!(
            parsed,
            vec![Aml::Scope(
                "\\_SB_".into(),
                vec![Aml::Device(
                    "PCI0".into(),
                    vec![Aml::Name(
                        "_HID".into(),
                        Box::new(Aml::Str("PNP0A03".into()))
                    )]
                )]
            )]
        );
        match &parse_aml(&mid).unwrap()[0] {
            Aml::Scope(_, terms) => {
                assert_eq!(terms.len(), 100);
                assert_eq!(terms[99], Aml::Name("N099".into(), Box::new(Aml::Int(99))));
            }
            other => panic!("{other:?}"),
        }
        match &parse_aml(&big).unwrap()[0] {
            Aml::Scope(_, terms) => assert_eq!(terms.len(), 800),
            other => panic!("{other:?}"),
        }
        // A corrupted length is caught by the reader (sanity of the reader).
        let mut broken = small.clone();
        broken[1] += 1;
        assert!(parse_aml(&broken).is_none());
    }

    // ---- The tables in guest memory ----

    fn guest(vcpus: u32) -> (GuestMemory, AcpiLayout) {
        let mem = GuestMemory::new(16 << 20).unwrap();
        let layout = write_acpi(&mem, &AcpiConfig::new(vcpus)).unwrap();
        (mem, layout)
    }

    /// Scans 0xE0000..0x100000 on 16-byte boundaries as Linux's
    /// acpi_find_root_pointer does; returns the RSDP whose checksum holds.
    fn find_rsdp(mem: &GuestMemory) -> Option<u64> {
        (RSDP_SCAN_START..RSDP_SCAN_END).step_by(16).find(|&a| {
            let mut b = [0u8; RSDP_V1_LEN];
            mem.read(a, &mut b).is_ok() && &b[..8] == b"RSD PTR " && sum(&b) == 0
        })
    }

    /// Reads a table at `addr`, checking its length field and checksum.
    fn read_table(mem: &GuestMemory, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut hdr = [0u8; SDT_HEADER_LEN];
        mem.read(addr, &mut hdr).unwrap();
        assert_eq!(&hdr[..4], sig, "signature at {addr:#x}");
        let len = u32_at(&hdr, 4) as usize;
        assert!(len >= SDT_HEADER_LEN, "{sig:?} length {len}");
        let mut t = vec![0u8; len];
        mem.read(addr, &mut t).unwrap();
        assert_eq!(sum(&t), 0, "{:?} checksum", std::str::from_utf8(sig));
        assert_eq!(&t[10..16], OEM_ID);
        assert_eq!(&t[16..24], OEM_TABLE_ID);
        t
    }

    struct Found {
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
        facs: Vec<u8>,
    }

    fn walk(mem: &GuestMemory) -> Found {
        let rsdp_at = find_rsdp(mem).expect("RSDP not found");
        let mut rsdp = [0u8; RSDP_LEN];
        mem.read(rsdp_at, &mut rsdp).unwrap();
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), RSDP_LEN as u32);
        assert_eq!(sum(&rsdp), 0, "extended checksum");
        assert_eq!(&rsdp[9..15], OEM_ID);
        let rsdt = read_table(mem, u64::from(u32_at(&rsdp, 16)), b"RSDT");
        let xsdt = read_table(mem, u64_at(&rsdp, 24), b"XSDT");
        let rsdt_entries: Vec<u64> = rsdt[SDT_HEADER_LEN..]
            .chunks_exact(4)
            .map(|c| u64::from(u32_at(c, 0)))
            .collect();
        let xsdt_entries: Vec<u64> = xsdt[SDT_HEADER_LEN..]
            .chunks_exact(8)
            .map(|c| u64_at(c, 0))
            .collect();
        assert_eq!((rsdt.len() - SDT_HEADER_LEN) % 4, 0);
        assert_eq!((xsdt.len() - SDT_HEADER_LEN) % 8, 0);
        assert_eq!(rsdt_entries, xsdt_entries);
        let mut fadt = None;
        let mut madt = None;
        for &a in &xsdt_entries {
            let mut sig = [0u8; 4];
            mem.read(a, &mut sig).unwrap();
            match &sig {
                b"FACP" => fadt = Some(read_table(mem, a, b"FACP")),
                b"APIC" => madt = Some(read_table(mem, a, b"APIC")),
                other => panic!("unexpected table {other:?}"),
            }
        }
        let fadt = fadt.expect("no FADT");
        let madt = madt.expect("no MADT");
        assert_eq!(fadt.len(), FADT_LEN);
        assert_eq!(fadt[8], 3, "FADT revision");
        let dsdt_at = u64::from(u32_at(&fadt, 40));
        assert_eq!(u64_at(&fadt, 140), dsdt_at, "X_DSDT");
        let dsdt = read_table(mem, dsdt_at, b"DSDT");
        let facs_at = u64::from(u32_at(&fadt, 36));
        assert_eq!(u64_at(&fadt, 132), facs_at, "X_FIRMWARE_CTRL");
        assert_eq!(facs_at % 64, 0, "FACS must be 64-byte aligned");
        let mut facs = vec![0u8; FACS_LEN];
        mem.read(facs_at, &mut facs).unwrap();
        Found {
            fadt,
            madt,
            dsdt,
            facs,
        }
    }

    #[test]
    fn rsdp_is_found_by_scanning_and_every_table_checks_out() {
        let (mem, layout) = guest(1);
        assert_eq!(find_rsdp(&mem), Some(RSDP_ADDR));
        assert_eq!(layout.rsdp, RSDP_ADDR);
        assert!(layout.tables_end <= ACPI_TABLES_ADDR + ACPI_TABLES_MAX_LEN);
        let f = walk(&mem);
        assert_eq!(&f.facs[..4], b"FACS");
        assert_eq!(u32_at(&f.facs, 4), FACS_LEN as u32);
        assert_eq!(u32_at(&f.fadt, 36) as u64, layout.facs);
        assert_eq!(u32_at(&f.fadt, 40) as u64, layout.dsdt);
        assert_eq!(f.dsdt[8], 2, "DSDT revision 2: 64-bit integers");
    }

    #[test]
    fn fadt_describes_the_piix4_pm_block() {
        let (mem, _) = guest(2);
        let t = walk(&mem).fadt;
        assert_eq!(u16_at(&t, 46), 9, "SCI_INT");
        assert_eq!(u32_at(&t, 48), 0, "SMI_CMD: always ACPI mode");
        assert_eq!(u32_at(&t, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(&t, 60), 0, "PM1b_EVT_BLK");
        assert_eq!(u32_at(&t, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!(u32_at(&t, 76), 0x608, "PM_TMR_BLK");
        assert_eq!(u32_at(&t, 80), 0x620, "GPE0_BLK");
        assert_eq!(&t[88..94], &[4, 2, 0, 4, 4, 0], "block lengths");
        let flags = u32_at(&t, 112);
        assert_eq!(flags & fadt_flags::TMR_VAL_EXT, 0, "24-bit PM timer");
        for bit in [
            fadt_flags::WBINVD,
            fadt_flags::PROC_C1,
            fadt_flags::SLP_BUTTON,
            fadt_flags::RESET_REG_SUP,
        ] {
            assert_ne!(flags & bit, 0, "flag {bit:#x}");
        }
        assert_eq!(u16_at(&t, 109), 0b11, "IAPC_BOOT_ARCH legacy + 8042");
        // RESET_REG: system I/O, 8 bits, port 0xCF9; RESET_VALUE 6.
        assert_eq!(t[116], 1);
        assert_eq!(t[117], 8);
        assert_eq!(u64_at(&t, 120), 0xCF9);
        assert_eq!(t[128], 6);
        // X_ blocks agree with the 32-bit ones (space, width, address).
        for (off, port, bits) in [
            (148, 0x600u64, 32u8),
            (172, 0x604, 16),
            (208, 0x608, 32),
            (220, 0x620, 32),
        ] {
            assert_eq!(t[off], 1, "X_ block at {off} is system I/O");
            assert_eq!(t[off + 1], bits, "X_ block at {off} width");
            assert_eq!(u64_at(&t, off + 4), port);
        }
        assert_eq!(u64_at(&t, 160), 0, "no X_PM1b_EVT_BLK");
    }

    #[derive(Debug, Default)]
    struct Madt {
        lapics: Vec<(u8, u8, u32)>,
        ioapics: Vec<(u8, u32, u32)>,
        overrides: Vec<(u8, u8, u32, u16)>,
        nmis: Vec<(u8, u16, u8)>,
    }

    fn parse_madt(t: &[u8]) -> Madt {
        let mut m = Madt::default();
        let mut off = 44;
        while off < t.len() {
            let (kind, len) = (t[off], usize::from(t[off + 1]));
            assert!(len >= 2 && off + len <= t.len(), "entry at {off}");
            let e = &t[off..off + len];
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    m.lapics.push((e[2], e[3], u32_at(e, 4)));
                }
                1 => {
                    assert_eq!(len, 12);
                    m.ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
                }
                2 => {
                    assert_eq!(len, 10);
                    m.overrides.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8)));
                }
                4 => {
                    assert_eq!(len, 6);
                    m.nmis.push((e[2], u16_at(e, 3), e[5]));
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            off += len;
        }
        assert_eq!(off, t.len());
        m
    }

    #[test]
    fn madt_has_one_lapic_per_vcpu_the_ioapic_overrides_and_nmi() {
        for vcpus in [1u32, 4] {
            let (mem, _) = guest(vcpus);
            let t = walk(&mem).madt;
            assert_eq!(u32_at(&t, 36), 0xFEE0_0000, "local APIC address");
            assert_eq!(u32_at(&t, 40), madt::PCAT_COMPAT);
            let m = parse_madt(&t);
            let want: Vec<(u8, u8, u32)> = (0..vcpus as u8).map(|i| (i, i, 1)).collect();
            assert_eq!(m.lapics, want, "vcpus {vcpus}");
            assert_eq!(m.ioapics, vec![(0, 0xFEC0_0000, 0)]);
            assert_eq!(m.overrides, vec![(0, 0, 2, 0), (0, 9, 9, 0x000D)]);
            assert_eq!(m.nmis, vec![(0xFF, 0, 1)]);
        }
    }

    #[test]
    fn dsdt_aml_declares_well_formed_s3_and_s5_packages() {
        let (mem, _) = guest(1);
        let dsdt = walk(&mem).dsdt;
        let terms = parse_aml(&dsdt[SDT_HEADER_LEN..]).expect("DSDT AML does not parse");
        assert_eq!(
            terms,
            vec![
                Aml::Name(
                    "\\_S3_".into(),
                    Box::new(Aml::Package(vec![
                        Aml::Int(1),
                        Aml::Int(1),
                        Aml::Int(0),
                        Aml::Int(0)
                    ]))
                ),
                Aml::Name(
                    "\\_S5_".into(),
                    Box::new(Aml::Package(vec![Aml::Int(0); 4]))
                )
            ]
        );
        // The PM device suspends on the same values.
        assert_eq!(
            pm::S3_SLP_TYP,
            tandem_core::devices::acpi_pm::DEFAULT_S3_SLP_TYP
        );
        assert_eq!(
            pm::S5_SLP_TYP,
            tandem_core::devices::acpi_pm::DEFAULT_S5_SLP_TYP
        );
    }

    #[test]
    fn every_vcpu_count_builds_valid_tables_that_fit() {
        for vcpus in 1..=MAX_VCPUS {
            let t = build_acpi(&AcpiConfig::new(vcpus), ACPI_TABLES_ADDR).unwrap();
            assert!(t.image.len() as u64 <= ACPI_TABLES_MAX_LEN);
            assert_eq!(sum(&t.rsdp), 0);
            assert_eq!(sum(&t.rsdp[..RSDP_V1_LEN]), 0);
            let madt_off = (t.layout.madt - t.base) as usize;
            let madt_len = u32_at(&t.image, madt_off + 4) as usize;
            let m = parse_madt(&t.image[madt_off..madt_off + madt_len]);
            assert_eq!(m.lapics.len(), vcpus as usize);
            assert_eq!(sum(&t.image[madt_off..madt_off + madt_len]), 0);
        }
        // With the most vCPUs, the tables, the MP region and the RSDP are disjoint.
        let t = build_acpi(&AcpiConfig::new(MAX_VCPUS), ACPI_TABLES_ADDR).unwrap();
        let (_, mp) =
            crate::mptable::build_mptable(MAX_VCPUS, crate::mptable::MPTABLE_ADDR).unwrap();
        assert!(t.layout.tables_end <= mp.floating_pointer);
        assert!(mp.config_table + mp.config_len <= RSDP_ADDR);
    }

    #[test]
    fn bad_configurations_are_refused_and_write_nothing() {
        let mem = GuestMemory::new(16 << 20).unwrap();
        let cases = [
            (AcpiConfig::new(0), AcpiError::BadVcpuCount(0)),
            (AcpiConfig::new(256), AcpiError::BadVcpuCount(256)),
            (
                AcpiConfig {
                    rsdp_addr: RSDP_ADDR + 8,
                    ..AcpiConfig::new(1)
                },
                AcpiError::BadRsdpAddr(RSDP_ADDR + 8),
            ),
            (
                AcpiConfig {
                    rsdp_addr: 0xD_0000,
                    ..AcpiConfig::new(1)
                },
                AcpiError::BadRsdpAddr(0xD_0000),
            ),
            (
                AcpiConfig {
                    tables_addr: ACPI_TABLES_ADDR + 16,
                    ..AcpiConfig::new(1)
                },
                AcpiError::BadTablesAddr(ACPI_TABLES_ADDR + 16),
            ),
            (
                AcpiConfig {
                    tables_max_len: 0x100,
                    ..AcpiConfig::new(1)
                },
                AcpiError::TooBig {
                    needed: build_acpi(&AcpiConfig::new(1), ACPI_TABLES_ADDR)
                        .unwrap()
                        .image
                        .len() as u64,
                    room: 0x100,
                },
            ),
            (
                AcpiConfig {
                    rsdp_addr: ACPI_TABLES_ADDR + 0x40,
                    ..AcpiConfig::new(1)
                },
                AcpiError::RsdpOverlap {
                    start: ACPI_TABLES_ADDR,
                    end: build_acpi(&AcpiConfig::new(1), ACPI_TABLES_ADDR)
                        .unwrap()
                        .layout
                        .tables_end,
                    rsdp: ACPI_TABLES_ADDR + 0x40,
                },
            ),
        ];
        for (cfg, want) in cases {
            assert_eq!(write_acpi(&mem, &cfg), Err(want));
        }
        // Usable RAM (0x10000) is not where firmware tables may go.
        let cfg = AcpiConfig {
            tables_addr: 0x1_0000,
            ..AcpiConfig::new(1)
        };
        assert!(matches!(
            write_acpi(&mem, &cfg),
            Err(AcpiError::NotReserved { addr: 0x1_0000, .. })
        ));
        // Nothing was written anywhere.
        let mut buf = vec![0u8; 0x1_0000];
        mem.read(0xF_0000, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        mem.read(0x1_0000, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(find_rsdp(&mem), None);
    }

    #[test]
    fn dmar_describes_the_remapping_unit() {
        let cfg = AcpiConfig {
            dmar: Some(DmarConfig {
                register_base: 0xFED9_0000,
                address_width: 39,
                interrupt_remapping: true,
                x2apic_opt_out: true,
            }),
            ..AcpiConfig::new(2)
        };
        let t = build_acpi(&cfg, ACPI_TABLES_ADDR).unwrap();
        // The XSDT lists FADT, MADT and DMAR.
        let x = (t.layout.xsdt - t.base) as usize;
        let xlen = u32::from_le_bytes(t.image[x + 4..x + 8].try_into().unwrap()) as usize;
        assert_eq!(xlen, SDT_HEADER_LEN + 24);
        let dmar = u64::from_le_bytes(t.image[x + 52..x + 60].try_into().unwrap());
        let d = (dmar - t.base) as usize;
        assert_eq!(&t.image[d..d + 4], b"DMAR");
        let len = u32::from_le_bytes(t.image[d + 4..d + 8].try_into().unwrap()) as usize;
        assert_eq!(sum(&t.image[d..d + len]), 0);
        assert_eq!(t.image[d + 36], 38, "host address width - 1");
        assert_eq!(t.image[d + 37], 3, "INTR_REMAP | X2APIC_OPT_OUT");
        // DRHD at 48: type 0, INCLUDE_PCI_ALL, the register base.
        assert_eq!(&t.image[d + 48..d + 50], &[0, 0]);
        assert_eq!(t.image[d + 52], 1);
        assert_eq!(
            u64::from_le_bytes(t.image[d + 56..d + 64].try_into().unwrap()),
            0xFED9_0000
        );
        // IOAPIC scope: type 3, ID 0, 0xFF:00.0.
        assert_eq!(&t.image[d + 64..d + 72], &[3, 8, 0, 0, 0, 0xFF, 0, 0]);
        assert_eq!(len, 72);
        // Without a unit there is no DMAR and two tables.
        let plain = build_acpi(&AcpiConfig::new(2), ACPI_TABLES_ADDR).unwrap();
        assert!(plain.image.len() < t.image.len());
        assert!(!plain.image.windows(4).any(|w| w == b"DMAR"));
    }

    #[test]
    fn checksum_makes_the_sum_zero() {
        let mut x: u32 = 0x1234_5678;
        for n in 0..300usize {
            let mut v: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            v.push(0);
            let c = checksum(&v);
            *v.last_mut().unwrap() = c;
            assert_eq!(sum(&v), 0);
        }
    }
}
