//! Intel MultiProcessor Specification 1.4 tables (MP floating pointer and
//! MP configuration table), for OSes that boot without ACPI (`acpi=off`) or
//! look for the MP table first.
//!
//! [`write_mptable`] puts the 16-byte floating pointer at `at` (16-byte
//! aligned, in the BIOS area the OS scans, default [`MPTABLE_ADDR`] =
//! 0xFC000) and the configuration table right after it at `at + 16`.
//!
//! Entries (MP spec chapter 4), consistent with the ACPI MADT:
//! - one processor per vCPU, APIC ID = index, LAPIC version 0x14 (the LAPIC
//!   model's version register), enabled, BSP flag on CPU 0; the CPU
//!   signature and feature flags are those of QEMU's default `qemu64` CPU
//!   (only informative: Linux prints them);
//! - bus 0 "ISA   ";
//! - the IOAPIC, ID 0, version 0x20 (the IOAPIC model's version register; its
//!   ID register reads 0 at reset; SeaBIOS and QEMU's MADT use ID 0 too);
//! - I/O interrupt entries for ISA IRQs 0..15: IRQ 0 → pin 2 (the PIT, as the
//!   MADT override), IRQ 2 (the 8259 cascade) not connected, IRQ n → pin n
//!   otherwise, all with conforming polarity and trigger;
//! - local interrupts: ExtINT on LINT0 and NMI on LINT1 of every LAPIC.

use thiserror::Error;

use tandem_core::{GuestMemory, MemoryError};

use crate::acpi::{checksum, is_reserved, IOAPIC_ID, MAX_VCPUS};
use crate::e820::{IOAPIC_BASE, LAPIC_BASE};

/// Default address of the MP floating pointer (config table at +16).
pub const MPTABLE_ADDR: u64 = 0xF_C000;
/// Size of the MP floating pointer structure.
pub const MP_FLOATING_POINTER_LEN: usize = 16;
/// Size of the configuration table header.
pub const MP_CONFIG_HEADER_LEN: usize = 44;
/// MP specification revision 1.4.
pub const MP_SPEC_REV: u8 = 4;
/// OEM ID (8 bytes, space padded).
pub const MP_OEM_ID: &[u8; 8] = b"TANDEM  ";
/// Product ID (12 bytes, space padded).
pub const MP_PRODUCT_ID: &[u8; 12] = b"TANDEMPC    ";
/// LAPIC version reported in processor entries.
pub const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version reported in the IOAPIC entry.
pub const IOAPIC_VERSION: u8 = 0x20;
/// CPUID.1:EAX of QEMU's `qemu64` CPU (family 15, model 107, stepping 1).
pub const CPU_SIGNATURE: u32 = 0x0006_0FB1;
/// CPUID.1:EDX of QEMU's `qemu64` CPU (FPU, TSC, MSR, PAE, CX8, APIC, SSE2...).
pub const CPU_FEATURE_FLAGS: u32 = 0x078B_FBFD;
/// The ISA bus's ID.
pub const ISA_BUS_ID: u8 = 0;

/// Entry types (MP spec table 4-3).
pub mod entry {
    pub const PROCESSOR: u8 = 0;
    pub const BUS: u8 = 1;
    pub const IOAPIC: u8 = 2;
    pub const IO_INTERRUPT: u8 = 3;
    pub const LOCAL_INTERRUPT: u8 = 4;
    /// Processor entries are 20 bytes, every other entry 8.
    pub const PROCESSOR_LEN: usize = 20;
    pub const OTHER_LEN: usize = 8;
    /// Processor CPU flags: EN (usable) and BP (bootstrap processor).
    pub const CPU_ENABLED: u8 = 1 << 0;
    pub const CPU_BSP: u8 = 1 << 1;
    /// IOAPIC flags: EN.
    pub const IOAPIC_ENABLED: u8 = 1 << 0;
    /// Interrupt types (MP spec table 4-8).
    pub const INT_INT: u8 = 0;
    pub const INT_NMI: u8 = 1;
    pub const INT_EXTINT: u8 = 3;
    /// Destination "all local APICs".
    pub const ALL_LAPICS: u8 = 0xFF;
}

/// Where the MP structures went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MpTableLayout {
    pub floating_pointer: u64,
    pub config_table: u64,
    /// Base table length of the configuration table.
    pub config_len: u64,
    /// Entry count of the configuration table.
    pub entry_count: u16,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("the MP table describes 1..={MAX_VCPUS} vCPUs, got {0}")]
    BadVcpuCount(u32),
    #[error(
        "MP floating pointer address {0:#x} must be 16-byte aligned and the tables below 1 MiB"
    )]
    BadAddress(u64),
    #[error("guest range {addr:#x}+{len:#x} is not reserved in the e820 map")]
    NotReserved { addr: u64, len: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// ISA IRQ → IOAPIC pin; `None` for IRQ 2 (the cascade, not connected).
fn isa_irq_pin(irq: u8) -> Option<u8> {
    match irq {
        0 => Some(2),
        2 => None,
        n => Some(n),
    }
}

fn push_interrupt(t: &mut Vec<u8>, kind: u8, int_type: u8, bus_irq: u8, dest: u8, pin: u8) {
    // Flags 0: polarity and trigger conform to the bus (ISA: edge, active high).
    t.extend_from_slice(&[kind, int_type, 0, 0, ISA_BUS_ID, bus_irq, dest, pin]);
}

/// Builds the MP floating pointer followed by the configuration table, as
/// one image to be placed at `at`.
pub fn build_mptable(vcpus: u32, at: u64) -> Result<(Vec<u8>, MpTableLayout), MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::BadVcpuCount(vcpus));
    }
    if at % 16 != 0 || at >= 0x10_0000 {
        return Err(MpTableError::BadAddress(at));
    }
    let config_at = at + MP_FLOATING_POINTER_LEN as u64;

    let mut t = Vec::with_capacity(MP_CONFIG_HEADER_LEN + 20 * vcpus as usize + 200);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&0u16.to_le_bytes()); // base table length, patched
    t.push(MP_SPEC_REV);
    t.push(0); // checksum, patched
    t.extend_from_slice(MP_OEM_ID);
    t.extend_from_slice(MP_PRODUCT_ID);
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    t.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    t.extend_from_slice(&0u16.to_le_bytes()); // entry count, patched
    t.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0); // reserved

    let mut count: u16 = 0;
    for id in 0..vcpus {
        let mut flags = entry::CPU_ENABLED;
        if id == 0 {
            flags |= entry::CPU_BSP;
        }
        // vcpus <= 255 was checked, so the APIC ID fits a byte.
        t.extend_from_slice(&[entry::PROCESSOR, id as u8, LAPIC_VERSION, flags]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURE_FLAGS.to_le_bytes());
        t.extend_from_slice(&[0; 8]);
        count += 1;
    }
    t.extend_from_slice(&[entry::BUS, ISA_BUS_ID]);
    t.extend_from_slice(b"ISA   ");
    count += 1;
    t.extend_from_slice(&[
        entry::IOAPIC,
        IOAPIC_ID,
        IOAPIC_VERSION,
        entry::IOAPIC_ENABLED,
    ]);
    t.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        if let Some(pin) = isa_irq_pin(irq) {
            push_interrupt(
                &mut t,
                entry::IO_INTERRUPT,
                entry::INT_INT,
                irq,
                IOAPIC_ID,
                pin,
            );
            count += 1;
        }
    }
    push_interrupt(
        &mut t,
        entry::LOCAL_INTERRUPT,
        entry::INT_EXTINT,
        0,
        entry::ALL_LAPICS,
        0,
    );
    push_interrupt(
        &mut t,
        entry::LOCAL_INTERRUPT,
        entry::INT_NMI,
        0,
        entry::ALL_LAPICS,
        1,
    );
    count += 2;

    // At most 44 + 255 * 20 + 160 bytes, well within u16.
    let len = t.len() as u16;
    t[4..6].copy_from_slice(&len.to_le_bytes());
    t[34..36].copy_from_slice(&count.to_le_bytes());
    t[7] = checksum(&t);

    let end = config_at + t.len() as u64;
    if end > 0x10_0000 {
        return Err(MpTableError::BadAddress(at));
    }

    let mut fp = [0u8; MP_FLOATING_POINTER_LEN];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(config_at as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MP_SPEC_REV;
    // Feature byte 1 = 0: a configuration table is present. Feature byte 2
    // bit 7 (IMCR) = 0: virtual wire mode, as on QEMU.
    fp[10] = checksum(&fp);

    let mut image = fp.to_vec();
    image.extend_from_slice(&t);
    Ok((
        image,
        MpTableLayout {
            floating_pointer: at,
            config_table: config_at,
            config_len: u64::from(len),
            entry_count: count,
        },
    ))
}

/// Writes the MP floating pointer at `at` and the configuration table after
/// it. The whole range must be e820-reserved guest RAM below 1 MiB (the BIOS
/// area `0xF0000..0x100000` is); nothing is written unless it is.
pub fn write_mptable(
    mem: &GuestMemory,
    vcpus: u32,
    at: u64,
) -> Result<MpTableLayout, MpTableError> {
    let (image, layout) = build_mptable(vcpus, at)?;
    let len = image.len() as u64;
    if !is_reserved(mem, at, len) {
        return Err(MpTableError::NotReserved { addr: at, len });
    }
    mem.write(at, &image)?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }
    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Scans the BIOS area on 16-byte boundaries for "_MP_" with a valid
    /// checksum, as Linux's smp_scan_config does.
    fn find_mpf(mem: &GuestMemory) -> Option<u64> {
        (0xF_0000u64..0x10_0000).step_by(16).find(|&a| {
            let mut b = [0u8; 16];
            mem.read(a, &mut b).is_ok() && &b[..4] == b"_MP_" && b[8] == 1 && sum(&b) == 0
        })
    }

    struct Parsed {
        header: Vec<u8>,
        cpus: Vec<[u8; 20]>,
        buses: Vec<[u8; 8]>,
        ioapics: Vec<[u8; 8]>,
        io_ints: Vec<[u8; 8]>,
        local_ints: Vec<[u8; 8]>,
    }

    fn parse(mem: &GuestMemory) -> Parsed {
        let mpf_at = find_mpf(mem).expect("MP floating pointer not found");
        let mut mpf = [0u8; 16];
        mem.read(mpf_at, &mut mpf).unwrap();
        assert_eq!(mpf[9], 4, "spec rev 1.4");
        assert_eq!(mpf[11], 0, "feature byte 1: config table present");
        let cfg_at = u64::from(u32_at(&mpf, 4));
        let mut hdr = [0u8; MP_CONFIG_HEADER_LEN];
        mem.read(cfg_at, &mut hdr).unwrap();
        assert_eq!(&hdr[..4], b"PCMP");
        let len = usize::from(u16_at(&hdr, 4));
        let mut t = vec![0u8; len];
        mem.read(cfg_at, &mut t).unwrap();
        assert_eq!(sum(&t), 0, "config table checksum");
        assert_eq!(t[6], 4, "spec rev");
        assert_eq!(&t[8..16], b"TANDEM  ");
        assert_eq!(&t[16..28], b"TANDEMPC    ");
        assert_eq!(u32_at(&t, 36), 0xFEE0_0000, "LAPIC address");
        let count = usize::from(u16_at(&t, 34));
        let mut p = Parsed {
            header: t[..MP_CONFIG_HEADER_LEN].to_vec(),
            cpus: vec![],
            buses: vec![],
            ioapics: vec![],
            io_ints: vec![],
            local_ints: vec![],
        };
        let mut off = MP_CONFIG_HEADER_LEN;
        for _ in 0..count {
            let kind = t[off];
            if kind == entry::PROCESSOR {
                p.cpus.push(t[off..off + 20].try_into().unwrap());
                off += 20;
                continue;
            }
            let e: [u8; 8] = t[off..off + 8].try_into().unwrap();
            match kind {
                entry::BUS => p.buses.push(e),
                entry::IOAPIC => p.ioapics.push(e),
                entry::IO_INTERRUPT => p.io_ints.push(e),
                entry::LOCAL_INTERRUPT => p.local_ints.push(e),
                other => panic!("unknown entry type {other}"),
            }
            off += 8;
        }
        assert_eq!(off, len, "entries fill the base table exactly");
        p
    }

    #[test]
    fn floating_pointer_is_found_and_entries_describe_the_platform() {
        for vcpus in [1u32, 4] {
            let mem = GuestMemory::new(16 << 20).unwrap();
            let layout = write_mptable(&mem, vcpus, MPTABLE_ADDR).unwrap();
            assert_eq!(find_mpf(&mem), Some(MPTABLE_ADDR));
            assert_eq!(layout.config_table, MPTABLE_ADDR + 16);
            let p = parse(&mem);
            assert_eq!(u16_at(&p.header, 34), layout.entry_count);
            assert_eq!(u64::from(u16_at(&p.header, 4)), layout.config_len);
            assert_eq!(p.cpus.len(), vcpus as usize);
            for (i, c) in p.cpus.iter().enumerate() {
                assert_eq!(c[1], i as u8, "APIC ID");
                assert_eq!(c[2], 0x14, "LAPIC version");
                let want_flags = if i == 0 { 0b11 } else { 0b01 };
                assert_eq!(c[3], want_flags, "CPU flags of {i}");
                assert_eq!(u32_at(c, 4), CPU_SIGNATURE);
                assert_eq!(u32_at(c, 8), CPU_FEATURE_FLAGS);
            }
            assert_eq!(p.buses, vec![*b"\x01\x00ISA   "]);
            assert_eq!(p.ioapics.len(), 1);
            let io = p.ioapics[0];
            assert_eq!((io[1], io[2], io[3]), (0, 0x20, 1));
            assert_eq!(u32_at(&io, 4), 0xFEC0_0000);
            // ISA IRQs 0..15 except the cascade; IRQ 0 reaches pin 2.
            assert_eq!(p.io_ints.len(), 15);
            let routes: Vec<(u8, u8)> = p.io_ints.iter().map(|e| (e[5], e[7])).collect();
            assert!(routes.contains(&(0, 2)));
            assert!(!routes.iter().any(|&(irq, _)| irq == 2));
            for irq in (1..16u8).filter(|&i| i != 2) {
                assert!(routes.contains(&(irq, irq)), "IRQ {irq}");
            }
            for e in &p.io_ints {
                assert_eq!(e[1], entry::INT_INT);
                assert_eq!(u16_at(e, 2), 0, "conforming polarity/trigger");
                assert_eq!(e[4], ISA_BUS_ID);
                assert_eq!(e[6], 0, "destination IOAPIC ID");
            }
            assert_eq!(
                p.local_ints,
                vec![
                    [4, entry::INT_EXTINT, 0, 0, 0, 0, 0xFF, 0],
                    [4, entry::INT_NMI, 0, 0, 0, 0, 0xFF, 1],
                ]
            );
            assert_eq!(
                usize::from(layout.entry_count),
                vcpus as usize + 1 + 1 + 15 + 2
            );
        }
    }

    #[test]
    fn bad_arguments_are_refused_and_write_nothing() {
        let mem = GuestMemory::new(16 << 20).unwrap();
        assert_eq!(
            write_mptable(&mem, 0, MPTABLE_ADDR),
            Err(MpTableError::BadVcpuCount(0))
        );
        assert_eq!(
            write_mptable(&mem, 256, MPTABLE_ADDR),
            Err(MpTableError::BadVcpuCount(256))
        );
        assert_eq!(
            write_mptable(&mem, 1, MPTABLE_ADDR + 4),
            Err(MpTableError::BadAddress(MPTABLE_ADDR + 4))
        );
        // Would run past 1 MiB.
        assert_eq!(
            write_mptable(&mem, 4, 0xF_FF00),
            Err(MpTableError::BadAddress(0xF_FF00))
        );
        // Usable RAM and the unreported 0xA0000..0xF0000 hole are refused.
        for at in [0x1_0000u64, 0xE_0000] {
            assert!(matches!(
                write_mptable(&mem, 1, at),
                Err(MpTableError::NotReserved { addr, .. }) if addr == at
            ));
        }
        let mut buf = vec![0u8; 0x10_0000];
        mem.read(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn every_vcpu_count_and_aligned_address_gives_consistent_tables() {
        // Property test: deterministic xorshift over vCPU counts and
        // addresses in the BIOS area; every success yields a table whose
        // checksums hold and whose length matches the entries.
        let mut x: u64 = 0xDEAD_BEEF_1234_5678;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let vcpus = (x % 300) as u32;
            let at = 0xF_0000 + ((x >> 16) % 0x1_0000);
            match build_mptable(vcpus, at) {
                Ok((image, layout)) => {
                    assert!((1..=MAX_VCPUS).contains(&vcpus));
                    assert_eq!(at % 16, 0);
                    assert_eq!(sum(&image[..16]), 0);
                    assert_eq!(sum(&image[16..]), 0);
                    assert_eq!(image.len() as u64, 16 + layout.config_len);
                    assert!(at + image.len() as u64 <= 0x10_0000);
                    assert_eq!(
                        layout.config_len,
                        44 + 20 * u64::from(vcpus) + 8 * (1 + 1 + 15 + 2)
                    );
                }
                Err(MpTableError::BadVcpuCount(v)) => {
                    assert!(v == 0 || v > MAX_VCPUS)
                }
                Err(MpTableError::BadAddress(a)) => {
                    assert!(a % 16 != 0 || a + 16 + 44 + 20 * u64::from(vcpus) + 152 > 0x10_0000)
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
    }
}
