//! The Xen PVH boot ABI for an uncompressed `vmlinux` (xen/include/public/
//! arch-x86/hvm/start_info.h; Linux arch/x86/platform/pvh).
//!
//! [`load_pvh`] loads the ELF's PT_LOAD segments at their physical
//! addresses, finds the 32-bit entry point in the `XEN_ELFNOTE_PHYS32_ENTRY`
//! note (type 18, name "Xen") of a PT_NOTE segment, and builds the
//! `hvm_start_info` structure (version 1, with the memory map), the module
//! list for the initrd and the command line. [`pvh_entry_state`] writes the
//! GDT and gives the documented entry state: 32-bit protected mode, paging
//! off, flat CS and DS/ES/SS, EBX = `hvm_start_info`, a busy 32-bit TSS in
//! TR (base 0, limit 0x67), interrupts off.
//!
//! Selectors: the ABI leaves them unspecified. The GDT is the one Firecracker
//! and Cloud Hypervisor use for PVH: null, 0x08 flat 32-bit code, 0x10 flat
//! data, 0x18 busy 32-bit TSS. Linux's PVH entry loads its own GDT at once.
//!
//! Guest memory used (all in usable e820 RAM below the EBDA, except the
//! kernel and initrd):
//! - `0x500..0x520`: the GDT ([`GDT_ADDR`]);
//! - `0x7000..0x8000`: `hvm_start_info` at 0x7000, the one
//!   `hvm_modlist_entry` at 0x7040, the memory map from 0x7080;
//! - `0x20000..`: the command line;
//! - the initrd page aligned, as high as possible in RAM below 4 GiB, above
//!   the kernel's highest segment.
//!
//! As for the other loaders, everything is checked before the first write
//! and a hostile file yields an error, never a panic.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{
    EI_CLASS, EI_DATA, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFMAG, EM_386, EM_X86_64, SIZEOF_IDENT,
};
use goblin::elf::program_header::{ProgramHeader, PT_LOAD, PT_NOTE};
use goblin::elf::Elf;
use tandem_core::cpu::{cr0, rflags, DescriptorTable, Regs, Segment, Sregs, VcpuState};
use tandem_core::{GuestMemory, MemoryError};
use thiserror::Error;

use crate::e820::{
    e820_map, place_high, usable_below_4g, usable_entry_containing, EBDA_START, FOUR_GIB,
};
use crate::multiboot::APIC_BASE_MSR_VALUE;

/// ELF note type carrying the 32-bit physical PVH entry point.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// `hvm_start_info.magic`.
pub const HVM_START_MAGIC_VALUE: u32 = 0x336E_C578;
/// `hvm_start_info.version` written: 1 has the memory map.
pub const HVM_START_INFO_VERSION: u32 = 1;

/// Where the GDT goes.
pub const GDT_ADDR: u64 = 0x500;
/// Where `hvm_start_info` goes (EBX at entry).
pub const START_INFO_ADDR: u64 = 0x7000;
/// Size of `hvm_start_info` version 1.
pub const START_INFO_SIZE: u64 = 0x38;
/// Where the single `hvm_modlist_entry` (the initrd) goes.
pub const MODLIST_ADDR: u64 = 0x7040;
/// Size of a `hvm_modlist_entry`.
pub const MODLIST_ENTRY_SIZE: u64 = 32;
/// Where the `hvm_memmap_table_entry` array goes.
pub const MEMMAP_ADDR: u64 = 0x7080;
/// Size of a `hvm_memmap_table_entry`: addr, size (u64), type, reserved (u32).
pub const MEMMAP_ENTRY_SIZE: u64 = 24;
/// End of the page holding the start info, module list and memory map.
const INFO_PAGE_END: u64 = 0x8000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;

/// Flat 32-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Flat 32-bit data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Busy 32-bit TSS (base 0, limit 0x67), as the PVH ABI requires in TR.
pub const TSS_SELECTOR: u16 = 0x18;

const GDT: [u64; 4] = [
    0,
    // P=1 DPL=0 S=1 type=0xB (execute/read, accessed), G=1 D=1, limit 0xFFFFF.
    0x00CF_9B00_0000_FFFF,
    // P=1 DPL=0 S=1 type=0x3 (read/write, accessed), G=1 B=1, limit 0xFFFFF.
    0x00CF_9300_0000_FFFF,
    // P=1 DPL=0 S=0 type=0xB (32-bit TSS, busy), limit 0x67.
    0x0000_8B00_0000_0067,
];
/// Size in bytes of the GDT.
pub const GDT_SIZE: u64 = (GDT.len() * 8) as u64;

const PAGE_SIZE: u64 = 0x1000;

/// Why a PVH kernel could not be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PvhError {
    #[error("not a little-endian ELF image")]
    NotElf,
    #[error("not an x86 ELF image (e_machine {0})")]
    NotX86(u16),
    #[error("malformed ELF image: {0}")]
    MalformedElf(String),
    #[error(
        "truncated image: {what} needs file bytes {start:#x}..{end:#x}, the file has {file_len:#x}"
    )]
    Truncated {
        what: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) in a PT_NOTE segment")]
    NoPvhNote,
    #[error("PVH entry note has a {0}-byte descriptor (expected 4 or 8)")]
    BadPvhNote(u32),
    #[error("the image has no loadable segment")]
    NoLoadableSegment,
    #[error("PVH entry point {0:#x} is not inside a loaded segment below 4 GiB")]
    EntryOutOfRange(u64),
    #[error("segment {index} ({start:#x}..{end:#x}) is outside usable guest RAM below 4 GiB")]
    SegmentOutsideRam { index: usize, start: u64, end: u64 },
    #[error("segment {index} ({start:#x}..{end:#x}) overlaps the loader's boot data")]
    SegmentOverlapsBootData { index: usize, start: u64, end: u64 },
    #[error("initrd of {size:#x} bytes does not fit in usable RAM above {floor:#x} below 4 GiB")]
    InitrdTooLarge { size: u64, floor: u64 },
    #[error("command line is {len} bytes, the maximum is {max}")]
    CmdlineTooLong { len: usize, max: u64 },
    #[error("command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("memory map has {0} entries, more than fit in the start-info page")]
    MemmapTooLarge(usize),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// The result of a successful load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhBoot {
    /// EIP at entry, from the PVH note.
    pub entry: u32,
    /// Address of `hvm_start_info` (EBX at entry).
    pub start_info: u64,
    /// Lowest and one past the highest byte of the loaded segments.
    pub image_start: u64,
    pub image_end: u64,
    /// Address and length (without NUL) of the command line.
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    /// Address and size of the initrd, if one was given (and not empty).
    pub initrd: Option<(u64, u64)>,
    /// Address and entry count of the memory map.
    pub memmap_addr: u64,
    pub memmap_entries: u32,
}

struct LoadSegment<'a> {
    index: usize,
    gpa: u64,
    data: &'a [u8],
    mem_size: u64,
}

fn truncated(what: impl Into<String>, start: u64, end: u64, file_len: usize) -> PvhError {
    PvhError::Truncated {
        what: what.into(),
        start,
        end,
        file_len: file_len as u64,
    }
}

/// `image[offset..offset+len]`, or a Truncated error naming `what`.
fn file_range<'a>(
    image: &'a [u8],
    what: &str,
    offset: u64,
    len: u64,
) -> Result<&'a [u8], PvhError> {
    offset
        .checked_add(len)
        .filter(|&end| end <= image.len() as u64)
        // Both bounds are <= image.len(), so they fit in usize.
        .map(|end| &image[offset as usize..end as usize])
        .ok_or_else(|| truncated(what, offset, offset.saturating_add(len), image.len()))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Looks for the PHYS32_ENTRY note in one PT_NOTE segment's bytes. Each note
/// is namesz, descsz, type (u32 each), then name and descriptor, each padded
/// to 4 bytes. A malformed tail ends the scan.
fn find_entry_note(notes: &[u8]) -> Result<Option<u64>, PvhError> {
    let pad4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    let mut at = 0usize;
    while let (Some(namesz), Some(descsz), Some(kind)) =
        (le32(notes, at), le32(notes, at + 4), le32(notes, at + 8))
    {
        let name_at = at + 12;
        let Some(desc_at) = pad4(namesz as usize).and_then(|n| name_at.checked_add(n)) else {
            break;
        };
        let Some(next) = pad4(descsz as usize).and_then(|n| desc_at.checked_add(n)) else {
            break;
        };
        let name = notes.get(name_at..name_at.saturating_add(namesz as usize));
        let desc = notes.get(desc_at..desc_at.saturating_add(descsz as usize));
        let (Some(name), Some(desc)) = (name, desc) else {
            break;
        };
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && (name == b"Xen\0" || name == b"Xen") {
            // Linux emits the address with _ASM_PTR: 8 bytes on x86-64.
            return match desc.len() {
                4 => Ok(Some(u64::from(le32(desc, 0).unwrap_or(0)))),
                8 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(desc);
                    Ok(Some(u64::from_le_bytes(b)))
                }
                n => Err(PvhError::BadPvhNote(n as u32)),
            };
        }
        at = next;
    }
    Ok(None)
}

struct Parsed<'a> {
    segments: Vec<LoadSegment<'a>>,
    entry: u64,
}

fn parse_elf(image: &[u8]) -> Result<Parsed<'_>, PvhError> {
    if image.get(..ELFMAG.len()) != Some(&ELFMAG[..]) {
        return Err(PvhError::NotElf);
    }
    let ident = file_range(image, "the ELF identification", 0, SIZEOF_IDENT as u64)?;
    if ident[EI_DATA] != ELFDATA2LSB {
        return Err(PvhError::NotElf);
    }
    let (container, ehdr_size) = match ident[EI_CLASS] {
        ELFCLASS32 => (Container::Little, goblin::elf32::header::SIZEOF_EHDR),
        ELFCLASS64 => (Container::Big, goblin::elf64::header::SIZEOF_EHDR),
        other => return Err(PvhError::MalformedElf(format!("unknown class {other}"))),
    };
    file_range(image, "the ELF header", 0, ehdr_size as u64)?;
    let ehdr = Elf::parse_header(image).map_err(|e| PvhError::MalformedElf(e.to_string()))?;
    if ehdr.e_machine != EM_386 && ehdr.e_machine != EM_X86_64 {
        return Err(PvhError::NotX86(ehdr.e_machine));
    }
    let ctx = Ctx::new(container, Endian::Little);
    let phdr_size = ProgramHeader::size(ctx);
    let phnum = usize::from(ehdr.e_phnum);
    let phentsize = usize::from(ehdr.e_phentsize);
    if phnum == 0 {
        return Err(PvhError::NoLoadableSegment);
    }
    if phentsize < phdr_size {
        return Err(PvhError::MalformedElf(format!(
            "e_phentsize {phentsize} is smaller than a program header ({phdr_size})"
        )));
    }
    // u16 * u16 cannot overflow.
    let table = file_range(
        image,
        "the program header table",
        ehdr.e_phoff,
        (phnum * phentsize) as u64,
    )?;

    let mut segments = Vec::new();
    let mut entry = None;
    for index in 0..phnum {
        let at = index * phentsize;
        let raw = table
            .get(at..at + phdr_size)
            .ok_or_else(|| PvhError::MalformedElf("program header out of table".into()))?;
        let ph = ProgramHeader::parse(raw, 0, 1, ctx)
            .map_err(|e| PvhError::MalformedElf(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| PvhError::MalformedElf("empty program header".into()))?;
        match ph.p_type {
            PT_NOTE if entry.is_none() => {
                let notes = file_range(
                    image,
                    &format!("note segment {index}"),
                    ph.p_offset,
                    ph.p_filesz,
                )?;
                entry = find_entry_note(notes)?;
            }
            PT_LOAD if ph.p_memsz > 0 => {
                if ph.p_filesz > ph.p_memsz {
                    return Err(PvhError::MalformedElf(format!(
                        "segment {index}: p_filesz {:#x} exceeds p_memsz {:#x}",
                        ph.p_filesz, ph.p_memsz
                    )));
                }
                let data =
                    file_range(image, &format!("segment {index}"), ph.p_offset, ph.p_filesz)?;
                segments.push(LoadSegment {
                    index,
                    gpa: ph.p_paddr,
                    data,
                    mem_size: ph.p_memsz,
                });
            }
            _ => {}
        }
    }
    let entry = entry.ok_or(PvhError::NoPvhNote)?;
    if segments.is_empty() {
        return Err(PvhError::NoLoadableSegment);
    }
    Ok(Parsed { segments, entry })
}

fn overlaps(a_start: u64, a_end: u64, b_start: u64, b_end: u64) -> bool {
    a_start < b_end && b_start < a_end
}

/// Loads a PVH-capable vmlinux with an optional initrd and command line into
/// `mem` and builds `hvm_start_info`. On error nothing has been written.
pub fn load_pvh(
    mem: &GuestMemory,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<PvhBoot, PvhError> {
    let parsed = parse_elf(image)?;
    let map = e820_map(mem);

    let cmdline_len = cmdline.len() as u64;
    let cmdline_max = EBDA_START - CMDLINE_ADDR - 1;
    if cmdline_len > cmdline_max {
        return Err(PvhError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(PvhError::CmdlineHasNul);
    }
    let memmap_max = ((INFO_PAGE_END - MEMMAP_ADDR) / MEMMAP_ENTRY_SIZE) as usize;
    if map.len() > memmap_max {
        return Err(PvhError::MemmapTooLarge(map.len()));
    }
    let boot_data = [
        (GDT_ADDR, GDT_ADDR + GDT_SIZE),
        (START_INFO_ADDR, INFO_PAGE_END),
        (CMDLINE_ADDR, CMDLINE_ADDR + cmdline_len + 1),
    ];
    for &(start, end) in &boot_data {
        if usable_entry_containing(&map, start, end - start).is_none() {
            return Err(PvhError::Memory(MemoryError::OutOfRange {
                gpa: start,
                len: end - start,
            }));
        }
    }

    let mut image_start = u64::MAX;
    let mut image_end = 0u64;
    for seg in &parsed.segments {
        let end = seg
            .gpa
            .checked_add(seg.mem_size)
            .filter(|_| usable_below_4g(&map, seg.gpa, seg.mem_size))
            .ok_or(PvhError::SegmentOutsideRam {
                index: seg.index,
                start: seg.gpa,
                end: seg.gpa.saturating_add(seg.mem_size),
            })?;
        if boot_data.iter().any(|&(s, e)| overlaps(seg.gpa, end, s, e)) {
            return Err(PvhError::SegmentOverlapsBootData {
                index: seg.index,
                start: seg.gpa,
                end,
            });
        }
        image_start = image_start.min(seg.gpa);
        image_end = image_end.max(end);
    }

    let entry = parsed.entry;
    let in_segment = parsed
        .segments
        .iter()
        .any(|s| entry >= s.gpa && entry - s.gpa < s.mem_size);
    if entry >= FOUR_GIB || !in_segment {
        return Err(PvhError::EntryOutOfRange(entry));
    }

    let initrd = initrd.filter(|d| !d.is_empty());
    let floor = (image_end + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let initrd_placed = match initrd {
        None => None,
        Some(data) => {
            let size = data.len() as u64;
            let base = place_high(&map, size, floor, FOUR_GIB, PAGE_SIZE)
                .ok_or(PvhError::InitrdTooLarge { size, floor })?;
            Some((base, data))
        }
    };

    // All checks passed: write.
    for seg in &parsed.segments {
        mem.write(seg.gpa, seg.data)?;
        let file_len = seg.data.len() as u64;
        if seg.mem_size > file_len {
            mem.zero(seg.gpa + file_len, seg.mem_size - file_len)?;
        }
    }
    if let Some((base, data)) = initrd_placed {
        mem.write(base, data)?;
    }
    mem.write(CMDLINE_ADDR, cmdline.as_bytes())?;
    mem.write_u8(CMDLINE_ADDR + cmdline_len, 0)?;

    let mut page = vec![0u8; (INFO_PAGE_END - START_INFO_ADDR) as usize];
    let mut put = |at: u64, bytes: &[u8]| {
        let at = (at - START_INFO_ADDR) as usize;
        page[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(START_INFO_ADDR, &HVM_START_MAGIC_VALUE.to_le_bytes());
    put(START_INFO_ADDR + 4, &HVM_START_INFO_VERSION.to_le_bytes());
    // flags (0x08) stay 0.
    if let Some((base, data)) = initrd_placed {
        put(START_INFO_ADDR + 0x0C, &1u32.to_le_bytes());
        put(START_INFO_ADDR + 0x10, &MODLIST_ADDR.to_le_bytes());
        put(MODLIST_ADDR, &base.to_le_bytes());
        put(MODLIST_ADDR + 8, &(data.len() as u64).to_le_bytes());
        // cmdline_paddr and reserved of the module entry stay 0.
    }
    put(START_INFO_ADDR + 0x18, &CMDLINE_ADDR.to_le_bytes());
    // rsdp_paddr (0x20) stays 0: the kernel scans for the RSDP.
    put(START_INFO_ADDR + 0x28, &MEMMAP_ADDR.to_le_bytes());
    put(START_INFO_ADDR + 0x30, &(map.len() as u32).to_le_bytes());
    for (i, e) in map.iter().enumerate() {
        let at = MEMMAP_ADDR + MEMMAP_ENTRY_SIZE * i as u64;
        put(at, &e.addr.to_le_bytes());
        put(at + 8, &e.len.to_le_bytes());
        put(at + 16, &e.kind.type_code().to_le_bytes());
    }
    mem.write(START_INFO_ADDR, &page)?;

    Ok(PvhBoot {
        // entry < 4 GiB, checked above.
        entry: entry as u32,
        start_info: START_INFO_ADDR,
        image_start,
        image_end,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len,
        initrd: initrd_placed.map(|(b, d)| (b, d.len() as u64)),
        memmap_addr: MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
    })
}

/// Writes the GDT and returns the PVH entry state (start_info.h, "Entry
/// point"): CR0 = PE|ET (paging off, other writable bits clear), CR4 = 0,
/// EFER = 0, CS flat 32-bit execute/read, DS/ES/FS/GS/SS flat read/write,
/// TR a busy 32-bit TSS with base 0 and limit 0x67, EFLAGS = 0x2 (IF, TF
/// and VM clear), EBX = `hvm_start_info`, EIP = the note's entry, IDTR
/// limit 0, LDTR unusable.
pub fn pvh_entry_state(boot: &PvhBoot, mem: &GuestMemory) -> Result<VcpuState, PvhError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt)?;
    let code = Segment::flat(CODE_SELECTOR, 0xb, false);
    let data = Segment::flat(DATA_SELECTOR, 0x3, false);
    let tr = Segment {
        selector: TSS_SELECTOR,
        base: 0,
        limit: 0x67,
        type_: 0xb,
        present: true,
        ..Segment::default()
    };
    let ldt = Segment {
        unusable: true,
        ..Segment::default()
    };
    Ok(VcpuState {
        regs: Regs {
            rbx: boot.start_info,
            rip: u64::from(boot.entry),
            rflags: rflags::FIXED1,
            ..Regs::default()
        },
        sregs: Sregs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt,
            gdt: DescriptorTable {
                base: GDT_ADDR,
                limit: (GDT_SIZE - 1) as u16,
            },
            idt: DescriptorTable { base: 0, limit: 0 },
            cr0: cr0::PE | cr0::ET,
            cr4: 0,
            efer: 0,
            apic_base: APIC_BASE_MSR_VALUE,
            ..Sregs::default()
        },
        ..VcpuState::default()
    })
}

#[cfg(test)]
mod tests;
