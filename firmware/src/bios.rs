//! A minimal real-mode interrupt vector table, as a PC BIOS leaves it.
//!
//! SeaBIOS points every vector of the IVT (256 far pointers, offset then
//! segment, at physical 0; SDM vol. 3, 20.1.4) at a handler in the BIOS
//! segment F000h before it boots anything. A guest that switches to real
//! mode and enables interrupts (kvm-unit-tests' `realmode`, a boot loader)
//! relies on that: the 8254's IRQ 0 arrives at vector 8 through the
//! 8259A's default base. Tandem has no BIOS, so [`write_bios_ivt`] writes
//! the table and three stubs:
//! - IRQ 0-7 (vectors 8-15): a non-specific EOI (OCW2 = 20h) to the master
//!   8259A at port 20h, then IRET;
//! - IRQ 8-15 (vectors 70h-77h): a non-specific EOI to the slave (port A0h),
//!   then to the master (its cascade input, IRQ 2), then IRET;
//! - every other vector: IRET.
//!
//! The stubs sit at [`BIOS_STUBS_ADDR`] (F000:0000), in the part of the
//! BIOS area the ACPI and MP tables leave free (`0xF0000..0xF8000`, see
//! [`crate::acpi`]).

use tandem_core::{GuestMemory, MemoryError};

/// Guest-physical address of the interrupt vector table.
pub const IVT_ADDR: u64 = 0;
/// Vectors in the table.
pub const IVT_VECTORS: usize = 256;
/// The real-mode segment of the stubs (the BIOS segment).
pub const BIOS_SEGMENT: u16 = 0xF000;
/// Guest-physical address of the stubs: F000:0000.
pub const BIOS_STUBS_ADDR: u64 = 0xF_0000;
/// One past the last byte the BIOS pieces may use (the ACPI tables follow).
pub const BIOS_STUBS_END: u64 = crate::acpi::ACPI_TABLES_ADDR;

/// The 8259A's vector bases after a BIOS's initialisation (ICW2): master
/// at 08h, slave at 70h.
pub const MASTER_IRQ_BASE: u8 = 0x08;
pub const SLAVE_IRQ_BASE: u8 = 0x70;

/// IRET.
const IRET_STUB: &[u8] = &[0xCF];
/// PUSH AX; MOV AL, 20h; OUT 20h, AL; POP AX; IRET.
const MASTER_EOI_STUB: &[u8] = &[0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF];
/// PUSH AX; MOV AL, 20h; OUT A0h, AL; OUT 20h, AL; POP AX; IRET.
const SLAVE_EOI_STUB: &[u8] = &[0x50, 0xB0, 0x20, 0xE6, 0xA0, 0xE6, 0x20, 0x58, 0xCF];

/// Where each stub starts, as an offset in [`BIOS_SEGMENT`].
const IRET_OFFSET: u16 = 0x00;
const MASTER_EOI_OFFSET: u16 = 0x10;
const SLAVE_EOI_OFFSET: u16 = 0x20;

/// What [`build_bios_ivt`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BiosIvt {
    /// The 1 KiB table for [`IVT_ADDR`].
    pub ivt: Vec<u8>,
    /// The stubs for [`BIOS_STUBS_ADDR`].
    pub stubs: Vec<u8>,
}

/// The handler offset (in [`BIOS_SEGMENT`]) of `vector`.
pub fn handler_offset(vector: u8) -> u16 {
    if (MASTER_IRQ_BASE..MASTER_IRQ_BASE + 8).contains(&vector) {
        MASTER_EOI_OFFSET
    } else if (SLAVE_IRQ_BASE..SLAVE_IRQ_BASE + 8).contains(&vector) {
        SLAVE_EOI_OFFSET
    } else {
        IRET_OFFSET
    }
}

/// The table and the stubs, without writing them.
pub fn build_bios_ivt() -> BiosIvt {
    let mut ivt = Vec::with_capacity(IVT_VECTORS * 4);
    for v in 0..=u8::MAX {
        ivt.extend_from_slice(&handler_offset(v).to_le_bytes());
        ivt.extend_from_slice(&BIOS_SEGMENT.to_le_bytes());
    }
    let mut stubs = vec![0u8; usize::from(SLAVE_EOI_OFFSET) + SLAVE_EOI_STUB.len()];
    for (off, code) in [
        (IRET_OFFSET, IRET_STUB),
        (MASTER_EOI_OFFSET, MASTER_EOI_STUB),
        (SLAVE_EOI_OFFSET, SLAVE_EOI_STUB),
    ] {
        let at = usize::from(off);
        stubs[at..at + code.len()].copy_from_slice(code);
    }
    BiosIvt { ivt, stubs }
}

/// Writes the IVT at [`IVT_ADDR`] and its stubs at [`BIOS_STUBS_ADDR`].
pub fn write_bios_ivt(mem: &GuestMemory) -> Result<BiosIvt, MemoryError> {
    let b = build_bios_ivt();
    mem.write(IVT_ADDR, &b.ivt)?;
    mem.write(BIOS_STUBS_ADDR, &b.stubs)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The far pointer of `vector` in a written table.
    fn vector_of(mem: &GuestMemory, vector: u8) -> (u16, u16) {
        let mut e = [0u8; 4];
        mem.read(IVT_ADDR + u64::from(vector) * 4, &mut e).unwrap();
        (
            u16::from_le_bytes([e[0], e[1]]),
            u16::from_le_bytes([e[2], e[3]]),
        )
    }

    /// The handler's bytes up to and including its IRET.
    fn handler(mem: &GuestMemory, seg: u16, off: u16) -> Vec<u8> {
        let mut code = [0u8; 16];
        let pa = u64::from(seg) * 16 + u64::from(off);
        mem.read(pa, &mut code).unwrap();
        let end = code.iter().position(|&b| b == 0xCF).unwrap();
        code[..=end].to_vec()
    }

    #[test]
    fn every_vector_points_into_the_bios_segment() {
        let mem = GuestMemory::new(2 << 20).unwrap();
        write_bios_ivt(&mem).unwrap();
        for v in 0..=u8::MAX {
            let (off, seg) = vector_of(&mem, v);
            assert_eq!(seg, BIOS_SEGMENT, "vector {v:#x}");
            let pa = u64::from(seg) * 16 + u64::from(off);
            assert!((BIOS_STUBS_ADDR..BIOS_STUBS_END).contains(&pa));
        }
    }

    #[test]
    fn irq_vectors_send_a_non_specific_eoi() {
        let mem = GuestMemory::new(2 << 20).unwrap();
        write_bios_ivt(&mem).unwrap();
        // OCW2 0x20 (non-specific EOI) with OUT imm8, AL.
        let master_eoi = [0xB0, 0x20, 0xE6, 0x20];
        for irq in 0..8u8 {
            let (off, seg) = vector_of(&mem, 0x08 + irq);
            let code = handler(&mem, seg, off);
            assert!(code.windows(4).any(|w| w == master_eoi), "IRQ {irq}");
            assert!(!code.windows(2).any(|w| w == [0xE6, 0xA0]), "IRQ {irq}");
            // AX is preserved: PUSH AX first, POP AX before the IRET.
            assert_eq!(code[0], 0x50);
            assert_eq!(code[code.len() - 2..], [0x58, 0xCF]);
        }
        for irq in 8..16u8 {
            let (off, seg) = vector_of(&mem, 0x70 + irq - 8);
            let code = handler(&mem, seg, off);
            let slave = code.windows(2).position(|w| w == [0xE6, 0xA0]);
            let master = code.windows(2).position(|w| w == [0xE6, 0x20]);
            // The slave first, then the master's cascade input.
            assert!(
                slave.is_some() && master.is_some() && slave < master,
                "IRQ {irq}"
            );
            assert_eq!(code[0], 0x50);
            assert_eq!(code[code.len() - 2..], [0x58, 0xCF]);
        }
    }

    #[test]
    fn other_vectors_just_iret() {
        let mem = GuestMemory::new(2 << 20).unwrap();
        write_bios_ivt(&mem).unwrap();
        for v in (0..=u8::MAX).filter(|v| !(0x08..0x10).contains(v) && !(0x70..0x78).contains(v)) {
            let (off, seg) = vector_of(&mem, v);
            assert_eq!(handler(&mem, seg, off), vec![0xCF], "vector {v:#x}");
        }
    }

    #[test]
    fn stays_clear_of_the_acpi_and_mp_tables() {
        let b = build_bios_ivt();
        assert_eq!(b.ivt.len(), 1024);
        assert!(BIOS_STUBS_ADDR + b.stubs.len() as u64 <= crate::acpi::ACPI_TABLES_ADDR);
        assert!(BIOS_STUBS_ADDR + (b.stubs.len() as u64) < crate::mptable::MPTABLE_ADDR);
        // The IVT ends where the BIOS data area begins, below the loader's GDT.
        assert!(IVT_ADDR + b.ivt.len() as u64 <= 0x400);
        const { assert!(0x400 <= crate::multiboot::GDT_ADDR) };
    }
}
