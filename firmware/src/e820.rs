//! The PC memory map (INT 15h, AX=E820h) as SeaBIOS reports it on QEMU's `pc`
//! machine. Multiboot hands it to the kernel as the `mmap` list and the Linux
//! boot protocol as `boot_params.e820_table`, so both build it here.
//!
//! Layout (ascending addresses):
//! - usable `0..0x9FC00` (conventional memory up to the EBDA);
//! - reserved `0x9FC00..0xA0000` (the 1 KiB extended BIOS data area);
//! - `0xA0000..0xF0000` is not reported (VGA window, option ROMs);
//! - reserved `0xF0000..0x100000` (the BIOS image, where the firmware tables live);
//! - usable `0x100000..` the end of RAM below the PCI hole;
//! - reserved IOAPIC (`0xFEC00000`, 4 KiB) and LAPIC (`0xFEE00000`, 4 KiB);
//! - reserved BIOS flash `0xFFFC0000..4 GiB`;
//! - usable RAM above 4 GiB when the guest has more than fits below the hole.

use std::fmt;

use tandem_core::GuestMemory;

/// Start of the extended BIOS data area (639 KiB).
pub const EBDA_START: u64 = 0x9_FC00;
/// End of conventional memory (start of the VGA window).
pub const EBDA_END: u64 = 0xA_0000;
/// Start of the system BIOS image in the first MiB.
pub const BIOS_START: u64 = 0xF_0000;
/// First byte of extended memory (1 MiB).
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// IOAPIC MMIO window.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Local APIC MMIO window.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;
/// Size of each APIC MMIO window reported as reserved.
pub const APIC_WINDOW_SIZE: u64 = 0x1000;
/// The BIOS flash mapped just below 4 GiB (SeaBIOS's 256 KiB image).
pub const BIOS_FLASH_START: u64 = 0xFFFC_0000;
/// 4 GiB, the end of the 32-bit physical address space.
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// Address range type, with the standard ACPI / INT 15h E820 type numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum E820Kind {
    /// AddressRangeMemory: usable RAM.
    Ram = 1,
    /// AddressRangeReserved: not usable by the OS.
    Reserved = 2,
    /// AddressRangeACPI: ACPI tables, reclaimable once read.
    Acpi = 3,
    /// AddressRangeNVS: ACPI non-volatile storage, must be preserved.
    Nvs = 4,
}

impl E820Kind {
    /// The type number stored in the E820 entry.
    pub fn type_code(self) -> u32 {
        self as u32
    }

    /// Inverse of [`E820Kind::type_code`]; `None` for numbers not modelled.
    pub fn from_type_code(code: u32) -> Option<E820Kind> {
        match code {
            1 => Some(E820Kind::Ram),
            2 => Some(E820Kind::Reserved),
            3 => Some(E820Kind::Acpi),
            4 => Some(E820Kind::Nvs),
            _ => None,
        }
    }

    /// The name Linux prints for the type in its `BIOS-e820:` lines.
    pub fn name(self) -> &'static str {
        match self {
            E820Kind::Ram => "usable",
            E820Kind::Reserved => "reserved",
            E820Kind::Acpi => "ACPI data",
            E820Kind::Nvs => "ACPI NVS",
        }
    }
}

/// One address range of the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical address.
    pub addr: u64,
    /// Length in bytes (never 0 in a map built here).
    pub len: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    /// Size of an entry in the INT 15h buffer and in `boot_params.e820_table`.
    pub const SIZE: usize = 20;

    /// One past the last address (saturating, so a hostile entry cannot wrap).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.len)
    }

    /// Whether `[addr, addr+len)` lies entirely inside this entry.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match addr.checked_add(len) {
            Some(end) => addr >= self.addr && end <= self.end(),
            None => false,
        }
    }

    /// The packed 20-byte form: base (u64), length (u64), type (u32), little endian.
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.kind.type_code().to_le_bytes());
        b
    }
}

impl fmt::Display for E820Entry {
    /// Formatted like Linux's boot log: `[mem 0x...-0x...] usable`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[mem {:#018x}-{:#018x}] {}",
            self.addr,
            self.end().saturating_sub(1),
            self.kind.name()
        )
    }
}

/// Ranges that are never reported as usable even when RAM backs them: the
/// EBDA, the VGA window and option ROMs, the BIOS image; the MMIO windows
/// below 4 GiB (RAM never reaches them, but stay safe if that changes).
const NOT_USABLE: &[(u64, u64)] = &[
    (EBDA_START, HIGH_MEMORY_START),
    (IOAPIC_BASE, IOAPIC_BASE + APIC_WINDOW_SIZE),
    (LAPIC_BASE, LAPIC_BASE + APIC_WINDOW_SIZE),
    (BIOS_FLASH_START, FOUR_GIB),
];

/// Ranges reported as reserved.
const RESERVED: &[(u64, u64)] = &[
    (EBDA_START, EBDA_END),
    (BIOS_START, HIGH_MEMORY_START),
    (IOAPIC_BASE, IOAPIC_BASE + APIC_WINDOW_SIZE),
    (LAPIC_BASE, LAPIC_BASE + APIC_WINDOW_SIZE),
    (BIOS_FLASH_START, FOUR_GIB),
];

/// The memory map of `mem`, sorted by address, entries not overlapping.
pub fn e820_map(mem: &GuestMemory) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for region in mem.regions() {
        // Subtract every NOT_USABLE range from the region; what is left is RAM.
        let mut pieces = vec![(region.gpa, region.gpa.saturating_add(region.len))];
        for &(hole_start, hole_end) in NOT_USABLE {
            pieces = pieces
                .into_iter()
                .flat_map(|(start, end)| {
                    let mut out = Vec::with_capacity(2);
                    if hole_end <= start || hole_start >= end {
                        out.push((start, end));
                    } else {
                        if start < hole_start {
                            out.push((start, hole_start));
                        }
                        if hole_end < end {
                            out.push((hole_end, end));
                        }
                    }
                    out
                })
                .collect();
        }
        map.extend(
            pieces
                .into_iter()
                .filter(|(s, e)| e > s)
                .map(|(s, e)| E820Entry {
                    addr: s,
                    len: e - s,
                    kind: E820Kind::Ram,
                }),
        );
    }
    map.extend(RESERVED.iter().map(|&(s, e)| E820Entry {
        addr: s,
        len: e - s,
        kind: E820Kind::Reserved,
    }));
    map.sort_by_key(|e| e.addr);
    map
}

/// The usable (`Ram`) entry of `map` that holds all of `[addr, addr+len)`.
pub fn usable_entry_containing(map: &[E820Entry], addr: u64, len: u64) -> Option<&E820Entry> {
    map.iter()
        .find(|e| e.kind == E820Kind::Ram && e.contains(addr, len))
}

/// Whether `[start, start+len)` lies in one usable range and below 4 GiB,
/// where every boot protocol's 32-bit pointers reach.
pub fn usable_below_4g(map: &[E820Entry], start: u64, len: u64) -> bool {
    start
        .checked_add(len)
        .is_some_and(|end| end <= FOUR_GIB && usable_entry_containing(map, start, len).is_some())
}

/// The highest `align`-aligned base (a power of two) for `size` bytes in
/// usable RAM with `floor <= base` and `base + size <= limit`: where loaders
/// put an initrd.
pub fn place_high(map: &[E820Entry], size: u64, floor: u64, limit: u64, align: u64) -> Option<u64> {
    map.iter()
        .rev()
        .filter(|e| e.kind == E820Kind::Ram)
        .find_map(|e| {
            let top = e.end().min(limit);
            let base = top.checked_sub(size)? & !(align - 1);
            (base >= e.addr && base >= floor).then_some(base)
        })
}

/// `value` rounded up to a multiple of `align` (a power of two).
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::memory::{HIGH_RAM_START, LOW_RAM_END};

    fn entry(addr: u64, end: u64, kind: E820Kind) -> E820Entry {
        E820Entry {
            addr,
            len: end - addr,
            kind,
        }
    }

    #[test]
    fn four_mib_guest_matches_seabios_layout() {
        let mem = GuestMemory::new(4 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(
            map,
            vec![
                entry(0, 0x9_FC00, E820Kind::Ram),
                entry(0x9_FC00, 0xA_0000, E820Kind::Reserved),
                entry(0xF_0000, 0x10_0000, E820Kind::Reserved),
                entry(0x10_0000, 0x40_0000, E820Kind::Ram),
                entry(0xFEC0_0000, 0xFEC0_1000, E820Kind::Reserved),
                entry(0xFEE0_0000, 0xFEE0_1000, E820Kind::Reserved),
                entry(0xFFFC_0000, 0x1_0000_0000, E820Kind::Reserved),
            ]
        );
    }

    #[test]
    fn one_mib_guest_has_no_extended_memory() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map.len(), 6);
        assert!(map
            .iter()
            .all(|e| e.kind != E820Kind::Ram || e.end() <= EBDA_START));
    }

    #[test]
    fn ram_above_the_hole_is_reported_after_four_gib() {
        let mem = GuestMemory::new(LOW_RAM_END + (16 << 20)).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[3], entry(0x10_0000, LOW_RAM_END, E820Kind::Ram));
        assert_eq!(
            map.last().copied(),
            Some(entry(
                HIGH_RAM_START,
                HIGH_RAM_START + (16 << 20),
                E820Kind::Ram
            ))
        );
        // Sorted and disjoint.
        for pair in map.windows(2) {
            assert!(pair[0].end() <= pair[1].addr, "{} / {}", pair[0], pair[1]);
        }
    }

    #[test]
    fn entry_encoding_and_type_codes() {
        let e = entry(0x10_0000, 0x40_0000, E820Kind::Ram);
        let b = e.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0x10_0000);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0x30_0000);
        assert_eq!(u32::from_le_bytes(b[16..20].try_into().unwrap()), 1);
        for (kind, code) in [
            (E820Kind::Ram, 1),
            (E820Kind::Reserved, 2),
            (E820Kind::Acpi, 3),
            (E820Kind::Nvs, 4),
        ] {
            assert_eq!(kind.type_code(), code);
            assert_eq!(E820Kind::from_type_code(code), Some(kind));
        }
        assert_eq!(E820Kind::from_type_code(5), None);
        assert_eq!(
            e.to_string(),
            "[mem 0x0000000000100000-0x00000000003fffff] usable"
        );
    }

    #[test]
    fn usable_lookup_respects_bounds() {
        let mem = GuestMemory::new(4 << 20).unwrap();
        let map = e820_map(&mem);
        assert!(usable_entry_containing(&map, 0x500, 0x30).is_some());
        assert!(usable_entry_containing(&map, 0x9_F000, 0x1000).is_none());
        assert!(usable_entry_containing(&map, 0xF_0000, 1).is_none());
        assert!(usable_entry_containing(&map, 0x3F_F000, 0x1000).is_some());
        assert!(usable_entry_containing(&map, 0x3F_F000, 0x1001).is_none());
        assert!(usable_entry_containing(&map, u64::MAX, 2).is_none());
    }
}
