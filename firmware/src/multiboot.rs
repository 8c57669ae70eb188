//! Multiboot v1 loading (The Multiboot Specification, version 0.6.96).
//!
//! [`load_multiboot`] finds the multiboot header, loads the kernel (ELF32 or
//! ELF64 program headers at their physical addresses, or the a.out kludge
//! addresses of the header), and builds the multiboot information structure
//! with the command line, the memory map and the modules in guest RAM.
//! [`multiboot_entry_state`] gives the machine state the specification
//! documents for the hand-off (section 3.2): 32-bit protected mode, paging
//! off, EAX = 0x2BADB002, EBX = the information structure.
//!
//! Guest memory used by the loader:
//! - the GDT at [`GDT_ADDR`] (`0x500..0x530`, just above the BIOS data area,
//!   which the e820 map reports usable), or, when the kernel itself is loaded
//!   over that spot, in the boot-information area below;
//! - the boot-information area: it starts at the first page boundary after
//!   the highest byte the kernel occupies (its bss included), or at 1 MiB if
//!   that is where the next usable RAM starts, and holds the information
//!   structure, the memory map, the module list, the strings and then each
//!   module on its own page.
//!
//! Everything is checked before the first byte is written: a load that fails
//! leaves guest memory untouched. A malformed or hostile image yields an
//! error, never a panic: every offset and size taken from the file goes
//! through checked arithmetic and bounds-checked slicing.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{
    EI_CLASS, EI_DATA, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, ELFDATA2MSB, ELFMAG, EM_386, EM_X86_64,
    ET_DYN, ET_EXEC, SIZEOF_IDENT,
};
use goblin::elf::program_header::{ProgramHeader, PT_LOAD};
use goblin::elf::Elf;
use tandem_core::cpu::{cr0, rflags, DescriptorTable, Regs, Segment, Sregs, VcpuState};
use tandem_core::{GuestMemory, MemoryError};
use thiserror::Error;

use crate::e820::{
    align_up, e820_map, usable_below_4g, usable_entry_containing, E820Entry, FOUR_GIB,
    HIGH_MEMORY_START,
};

/// `magic` field of the multiboot header.
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX at entry, telling the kernel a multiboot loader started it.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie entirely within the first 8192 bytes (spec 3.1.1).
pub const HEADER_SEARCH_LIMIT: usize = 8192;
/// String placed at `boot_loader_name`.
pub const BOOT_LOADER_NAME: &str = "tandem";

/// Where the loader's GDT goes: the first free byte above the BIOS data area.
pub const GDT_ADDR: u64 = 0x500;
/// Flat 32-bit code segment (the selector QEMU's multiboot option ROM uses).
pub const CODE_SELECTOR: u16 = 0x08;
/// Flat 32-bit data segment (as QEMU's option ROM).
pub const DATA_SELECTOR: u16 = 0x10;
/// 16-bit code segment, base 0, limit 64 KiB (kept at QEMU's slot).
pub const CODE16_SELECTOR: u16 = 0x18;
/// 16-bit data segment, base 0, limit 64 KiB (kept at QEMU's slot).
pub const DATA16_SELECTOR: u16 = 0x20;
/// Busy 32-bit TSS (base 0, limit 0x67): only there so TR is valid for VM entry.
pub const TSS_SELECTOR: u16 = 0x28;

/// The GDT written at [`GDT_ADDR`]. All code/data descriptors have the
/// accessed bit set so they match the descriptor caches of
/// [`multiboot_entry_state`] and the CPU never needs to write it back.
const GDT: [u64; 6] = [
    0,
    // P=1 DPL=0 S=1 type=0xB (execute/read, accessed), G=1 D=1, limit 0xFFFFF.
    0x00CF_9B00_0000_FFFF,
    // P=1 DPL=0 S=1 type=0x3 (read/write, accessed), G=1 B=1, limit 0xFFFFF.
    0x00CF_9300_0000_FFFF,
    // 16-bit variants: byte granular, limit 0xFFFF.
    0x0000_9B00_0000_FFFF,
    0x0000_9300_0000_FFFF,
    // P=1 DPL=0 S=0 type=0xB (32-bit TSS, busy), limit 0x67.
    0x0000_8B00_0000_0067,
];
/// Size in bytes of the loader's GDT.
pub const GDT_SIZE: u64 = (GDT.len() * 8) as u64;

/// IA32_APIC_BASE at entry: LAPIC at 0xFEE00000, enabled (bit 11), BSP (bit 8).
pub const APIC_BASE_MSR_VALUE: u64 = 0xFEE0_0900;

const PAGE_SIZE: u64 = 4096;

/// Flags of the multiboot header (spec 3.1.2).
pub mod header_flags {
    /// Align modules on 4 KiB pages (always done).
    pub const PAGE_ALIGN: u32 = 1 << 0;
    /// Provide mem_* (always done; the mmap too).
    pub const MEMORY_INFO: u32 = 1 << 1;
    /// Video mode table wanted: ignored, the guest stays in text mode.
    pub const VIDEO_MODE: u32 = 1 << 2;
    /// The a.out kludge address fields at offsets 12..32 are valid.
    pub const AOUT_KLUDGE: u32 = 1 << 16;
    /// Bits 0-15 are requirements: a loader must refuse any it does not know.
    pub const REQUIRED_MASK: u32 = 0xFFFF;
    /// The required bits this loader honours.
    pub const SUPPORTED_REQUIRED: u32 = PAGE_ALIGN | MEMORY_INFO | VIDEO_MODE;
}

/// Flags of the multiboot information structure (spec 3.3).
pub mod info_flags {
    pub const MEMORY: u32 = 1 << 0;
    pub const BOOT_DEVICE: u32 = 1 << 1;
    pub const CMDLINE: u32 = 1 << 2;
    pub const MODS: u32 = 1 << 3;
    pub const AOUT_SYMS: u32 = 1 << 4;
    pub const ELF_SHDR: u32 = 1 << 5;
    pub const MMAP: u32 = 1 << 6;
    pub const DRIVES: u32 = 1 << 7;
    pub const CONFIG_TABLE: u32 = 1 << 8;
    pub const BOOT_LOADER_NAME: u32 = 1 << 9;
    pub const APM_TABLE: u32 = 1 << 10;
    pub const VBE: u32 = 1 << 11;
    pub const FRAMEBUFFER: u32 = 1 << 12;
}

/// Byte offsets of the fields of the multiboot information structure.
pub mod info_offsets {
    pub const FLAGS: u64 = 0;
    pub const MEM_LOWER: u64 = 4;
    pub const MEM_UPPER: u64 = 8;
    pub const BOOT_DEVICE: u64 = 12;
    pub const CMDLINE: u64 = 16;
    pub const MODS_COUNT: u64 = 20;
    pub const MODS_ADDR: u64 = 24;
    pub const SYMS: u64 = 28;
    pub const MMAP_LENGTH: u64 = 44;
    pub const MMAP_ADDR: u64 = 48;
    pub const DRIVES_LENGTH: u64 = 52;
    pub const DRIVES_ADDR: u64 = 56;
    pub const CONFIG_TABLE: u64 = 60;
    pub const BOOT_LOADER_NAME: u64 = 64;
    pub const APM_TABLE: u64 = 68;
    pub const VBE_CONTROL_INFO: u64 = 72;
    /// Size written here: up to the VBE fields (flags bits 11/12 stay clear).
    pub const SIZE: u64 = 88;
}

/// Size of one `mmap` entry including its leading `size` field.
pub const MMAP_ENTRY_SIZE: u64 = 24;
/// Size of one module-list entry.
pub const MODULE_ENTRY_SIZE: u64 = 16;

/// Why a multiboot image could not be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MultibootError {
    #[error("no multiboot header in the first 8192 bytes")]
    NoHeader,
    #[error("multiboot header at offset {offset:#x} has a bad checksum")]
    BadChecksum { offset: usize },
    #[error("multiboot header requires unsupported features (flags {flags:#x})")]
    UnsupportedFlags { flags: u32 },
    #[error("not an ELF image, and the multiboot header has no a.out kludge")]
    NotElf,
    #[error("big-endian ELF image")]
    BigEndian,
    #[error("not an x86 ELF image (e_machine {machine})")]
    NotX86 { machine: u16 },
    #[error("malformed ELF image: {0}")]
    MalformedElf(String),
    #[error("bad multiboot a.out kludge: {0}")]
    BadAoutKludge(&'static str),
    #[error("the image has no loadable segment")]
    NoLoadableSegment,
    #[error(
        "truncated image: {what} needs file bytes {start:#x}..{end:#x}, the file has {file_len:#x}"
    )]
    Truncated {
        what: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("segment {index} ({start:#x}..{end:#x}) is outside usable guest RAM below 4 GiB")]
    SegmentOutsideRam { index: usize, start: u64, end: u64 },
    #[error("entry point {0:#x} is out of range")]
    EntryOutOfRange(u64),
    #[error("image too large for RAM: boot information and modules need {needed:#x} bytes from {start:#x}")]
    TooLarge { start: u64, needed: u64 },
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// A boot module: its contents and its command line.
#[derive(Debug, Clone, Copy)]
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: &'a str,
}

/// Where a module ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedModule {
    /// `mod_start`: first byte (page aligned).
    pub start: u32,
    /// `mod_end`: one past the last byte.
    pub end: u32,
    /// Address of its NUL-terminated command line.
    pub cmdline_addr: u32,
}

/// The result of a successful load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultibootBoot {
    /// Physical entry point (EIP at entry).
    pub entry: u32,
    /// Address of the multiboot information structure (EBX at entry).
    pub info_addr: u32,
    /// Lowest guest-physical byte the kernel occupies.
    pub image_start: u64,
    /// One past the highest byte the kernel occupies, bss included.
    pub image_end: u64,
    /// Address of the loader's GDT (see [`GDT_ADDR`]).
    pub gdt_addr: u32,
    /// Address of the kernel command line string.
    pub cmdline_addr: u32,
    /// The modules, in the order given.
    pub modules: Vec<LoadedModule>,
    /// One past the last byte of the boot-information area and the modules:
    /// `info_addr..boot_data_end` must be left alone by later firmware.
    pub boot_data_end: u64,
}

/// One piece of the image to copy into guest memory.
#[derive(Debug)]
struct LoadSegment<'a> {
    /// Program header index (0 for the a.out kludge), for error messages.
    index: usize,
    /// Physical load address.
    gpa: u64,
    /// Virtual address (ELF p_vaddr; equal to `gpa` for a.out).
    vaddr: u64,
    /// Bytes from the file.
    data: &'a [u8],
    /// Bytes in memory; the part past `data` is zeroed (bss).
    mem_size: u64,
}

impl LoadSegment<'_> {
    fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.mem_size)
    }
}

struct ParsedImage<'a> {
    segments: Vec<LoadSegment<'a>>,
    entry: u64,
}

/// The multiboot header found in the image.
#[derive(Debug, Clone, Copy)]
struct Header {
    offset: usize,
    flags: u32,
}

fn read_u32(image: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    let bytes = image.get(offset..end)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn truncated(what: impl Into<String>, start: u64, end: u64, file_len: usize) -> MultibootError {
    MultibootError::Truncated {
        what: what.into(),
        start,
        end,
        file_len: file_len as u64,
    }
}

/// Finds the header: magic at a 4-byte aligned offset, the 12-byte header
/// entirely inside the first 8192 bytes, and magic + flags + checksum == 0
/// (mod 2^32). Like GRUB and QEMU, a magic value with a wrong checksum does
/// not stop the search; it only changes the error if nothing valid follows.
fn find_header(image: &[u8]) -> Result<Header, MultibootError> {
    let limit = image.len().min(HEADER_SEARCH_LIMIT);
    let mut bad_checksum = None;
    let mut offset = 0usize;
    while offset + 12 <= limit {
        if read_u32(image, offset) == Some(MULTIBOOT_HEADER_MAGIC) {
            let flags = read_u32(image, offset + 4).unwrap_or(0);
            let checksum = read_u32(image, offset + 8).unwrap_or(0);
            if MULTIBOOT_HEADER_MAGIC
                .wrapping_add(flags)
                .wrapping_add(checksum)
                == 0
            {
                return Ok(Header { offset, flags });
            }
            bad_checksum.get_or_insert(offset);
        }
        offset += 4;
    }
    Err(match bad_checksum {
        Some(offset) => MultibootError::BadChecksum { offset },
        None => MultibootError::NoHeader,
    })
}

/// The a.out kludge (spec 3.1.3): the header's address fields say which file
/// bytes go where, whatever the file format.
fn parse_aout_kludge(image: &[u8], header: Header) -> Result<ParsedImage<'_>, MultibootError> {
    let field = |n: usize| -> Result<u32, MultibootError> {
        let at = header.offset + 12 + 4 * n;
        read_u32(image, at).ok_or_else(|| {
            truncated(
                "the multiboot a.out kludge fields",
                header.offset as u64,
                header.offset as u64 + 32,
                image.len(),
            )
        })
    };
    let header_addr = u64::from(field(0)?);
    let load_addr = u64::from(field(1)?);
    let load_end_addr = u64::from(field(2)?);
    let bss_end_addr = u64::from(field(3)?);
    let entry_addr = u64::from(field(4)?);

    // The header's own address places the file: load_addr corresponds to the
    // file offset header_offset - (header_addr - load_addr).
    let before_header = header_addr
        .checked_sub(load_addr)
        .ok_or(MultibootError::BadAoutKludge(
            "load_addr is above header_addr",
        ))?;
    let text_offset =
        (header.offset as u64)
            .checked_sub(before_header)
            .ok_or(MultibootError::BadAoutKludge(
                "header_addr - load_addr reaches before the start of the file",
            ))?;
    let file_len = image.len() as u64;
    let load_size = if load_end_addr == 0 {
        // 0: the text and data segments occupy the rest of the file.
        file_len - text_offset
    } else {
        load_end_addr
            .checked_sub(load_addr)
            .ok_or(MultibootError::BadAoutKludge(
                "load_end_addr is below load_addr",
            ))?
    };
    let file_end = text_offset
        .checked_add(load_size)
        .filter(|&end| end <= file_len)
        .ok_or_else(|| {
            truncated(
                "the a.out kludge load range",
                text_offset,
                text_offset.saturating_add(load_size),
                image.len(),
            )
        })?;
    // Both bounds are <= file_len, which is a usize, so the casts are lossless.
    let data = &image[text_offset as usize..file_end as usize];
    let mem_size = if bss_end_addr == 0 {
        load_size
    } else {
        bss_end_addr
            .checked_sub(load_addr)
            .filter(|&size| size >= load_size)
            .ok_or(MultibootError::BadAoutKludge(
                "bss_end_addr is below the end of the loaded data",
            ))?
    };
    if mem_size == 0 {
        return Err(MultibootError::NoLoadableSegment);
    }
    Ok(ParsedImage {
        segments: vec![LoadSegment {
            index: 0,
            gpa: load_addr,
            vaddr: load_addr,
            data,
            mem_size,
        }],
        entry: entry_addr,
    })
}

/// The ELF path: PT_LOAD segments at p_paddr, entry e_entry (translated from
/// virtual to physical when it lies in a segment whose p_vaddr differs from
/// its p_paddr, as GRUB 2 and QEMU's ELF loader do for higher-half kernels).
fn parse_elf(image: &[u8]) -> Result<ParsedImage<'_>, MultibootError> {
    if image.get(..ELFMAG.len()) != Some(&ELFMAG[..]) {
        return Err(MultibootError::NotElf);
    }
    let ident = image.get(..SIZEOF_IDENT).ok_or_else(|| {
        truncated(
            "the ELF identification",
            0,
            SIZEOF_IDENT as u64,
            image.len(),
        )
    })?;
    match ident[EI_DATA] {
        ELFDATA2LSB => {}
        ELFDATA2MSB => return Err(MultibootError::BigEndian),
        other => {
            return Err(MultibootError::MalformedElf(format!(
                "unknown data encoding {other}"
            )))
        }
    }
    let (container, ehdr_size) = match ident[EI_CLASS] {
        ELFCLASS32 => (Container::Little, goblin::elf32::header::SIZEOF_EHDR),
        ELFCLASS64 => (Container::Big, goblin::elf64::header::SIZEOF_EHDR),
        other => {
            return Err(MultibootError::MalformedElf(format!(
                "unknown class {other}"
            )))
        }
    };
    if image.len() < ehdr_size {
        return Err(truncated(
            "the ELF header",
            0,
            ehdr_size as u64,
            image.len(),
        ));
    }
    let ehdr = Elf::parse_header(image).map_err(|e| MultibootError::MalformedElf(e.to_string()))?;
    if ehdr.e_machine != EM_386 && ehdr.e_machine != EM_X86_64 {
        return Err(MultibootError::NotX86 {
            machine: ehdr.e_machine,
        });
    }
    if ehdr.e_type != ET_EXEC && ehdr.e_type != ET_DYN {
        return Err(MultibootError::MalformedElf(format!(
            "not an executable (e_type {})",
            ehdr.e_type
        )));
    }

    let ctx = Ctx::new(container, Endian::Little);
    let phdr_size = ProgramHeader::size(ctx);
    let phnum = usize::from(ehdr.e_phnum);
    let phentsize = usize::from(ehdr.e_phentsize);
    if phnum == 0 {
        return Err(MultibootError::NoLoadableSegment);
    }
    if phentsize < phdr_size {
        return Err(MultibootError::MalformedElf(format!(
            "e_phentsize {phentsize} is smaller than a program header ({phdr_size})"
        )));
    }
    // u16 * u16 cannot overflow a u64.
    let table_len = (phnum * phentsize) as u64;
    let table_end = ehdr
        .e_phoff
        .checked_add(table_len)
        .filter(|&end| end <= image.len() as u64)
        .ok_or_else(|| {
            truncated(
                "the program header table",
                ehdr.e_phoff,
                ehdr.e_phoff.saturating_add(table_len),
                image.len(),
            )
        })?;
    // The table lies inside the file, so its offsets fit in usize.
    let table = &image[ehdr.e_phoff as usize..table_end as usize];

    let mut segments = Vec::new();
    for index in 0..phnum {
        let at = index * phentsize;
        let raw = table
            .get(at..at + phdr_size)
            .ok_or_else(|| MultibootError::MalformedElf("program header out of table".into()))?;
        let ph = ProgramHeader::parse(raw, 0, 1, ctx)
            .map_err(|e| MultibootError::MalformedElf(e.to_string()))?
            .into_iter()
            .next()
            .ok_or_else(|| MultibootError::MalformedElf("empty program header".into()))?;
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(MultibootError::MalformedElf(format!(
                "segment {index}: p_filesz {:#x} exceeds p_memsz {:#x}",
                ph.p_filesz, ph.p_memsz
            )));
        }
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .filter(|&end| end <= image.len() as u64)
            .ok_or_else(|| {
                truncated(
                    format!("segment {index}"),
                    ph.p_offset,
                    ph.p_offset.saturating_add(ph.p_filesz),
                    image.len(),
                )
            })?;
        let data = &image[ph.p_offset as usize..file_end as usize];
        segments.push(LoadSegment {
            index,
            gpa: ph.p_paddr,
            vaddr: ph.p_vaddr,
            data,
            mem_size: ph.p_memsz,
        });
    }
    if segments.is_empty() {
        return Err(MultibootError::NoLoadableSegment);
    }

    let entry = segments
        .iter()
        .find(|s| {
            s.vaddr != s.gpa && ehdr.e_entry >= s.vaddr && ehdr.e_entry - s.vaddr < s.mem_size
        })
        .and_then(|s| (ehdr.e_entry - s.vaddr).checked_add(s.gpa))
        .unwrap_or(ehdr.e_entry);
    Ok(ParsedImage { segments, entry })
}

/// Offsets, relative to the page-aligned start of the boot-information area.
struct InfoLayout {
    gdt: Option<u64>,
    mmap: u64,
    mods: u64,
    cmdline: u64,
    loader_name: u64,
    module_cmdlines: Vec<u64>,
    module_data: Vec<u64>,
    total: u64,
}

fn layout_info(
    gdt_inside: bool,
    map_entries: usize,
    cmdline: &str,
    modules: &[Module<'_>],
) -> Option<InfoLayout> {
    let mut cursor = info_offsets::SIZE;
    let gdt = if gdt_inside {
        let at = align_up(cursor, 8)?;
        cursor = at.checked_add(GDT_SIZE)?;
        Some(at)
    } else {
        None
    };
    let mmap = align_up(cursor, 8)?;
    cursor = mmap.checked_add(MMAP_ENTRY_SIZE.checked_mul(map_entries as u64)?)?;
    let mods = align_up(cursor, 8)?;
    cursor = mods.checked_add(MODULE_ENTRY_SIZE.checked_mul(modules.len() as u64)?)?;
    let cmdline_at = cursor;
    cursor = cursor.checked_add(cmdline.len() as u64)?.checked_add(1)?;
    let loader_name = cursor;
    cursor = cursor
        .checked_add(BOOT_LOADER_NAME.len() as u64)?
        .checked_add(1)?;
    let mut module_cmdlines = Vec::with_capacity(modules.len());
    for m in modules {
        module_cmdlines.push(cursor);
        cursor = cursor.checked_add(m.cmdline.len() as u64)?.checked_add(1)?;
    }
    let mut module_data = Vec::with_capacity(modules.len());
    for m in modules {
        let at = align_up(cursor, PAGE_SIZE)?;
        module_data.push(at);
        cursor = at.checked_add(m.data.len() as u64)?;
    }
    Some(InfoLayout {
        gdt,
        mmap,
        mods,
        cmdline: cmdline_at,
        loader_name,
        module_cmdlines,
        module_data,
        total: cursor,
    })
}

/// Chooses where the boot-information area goes: the first page after the
/// image, or 1 MiB when the image ends in low memory and the area does not
/// fit before the EBDA. It must lie in one usable e820 range below 4 GiB.
fn place_info(map: &[E820Entry], image_end: u64, total: u64) -> Result<u64, MultibootError> {
    let first = align_up(image_end, PAGE_SIZE).ok_or(MultibootError::TooLarge {
        start: image_end,
        needed: total,
    })?;
    [first, first.max(HIGH_MEMORY_START)]
        .into_iter()
        .find(|&base| usable_below_4g(map, base, total))
        .ok_or(MultibootError::TooLarge {
            start: first,
            needed: total,
        })
}

/// KiB of usable memory from `start` up to the end of the usable range
/// holding it (mem_lower from 0, mem_upper from 1 MiB), 0 if none.
fn usable_kib_from(map: &[E820Entry], start: u64) -> u32 {
    usable_entry_containing(map, start, 1)
        .map(|e| u32::try_from((e.end() - start) / 1024).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn to_u32(value: u64) -> Result<u32, MultibootError> {
    // Callers only pass addresses already checked to be below 4 GiB.
    u32::try_from(value).map_err(|_| MultibootError::TooLarge {
        start: value,
        needed: 0,
    })
}

fn write_cstr(mem: &GuestMemory, gpa: u64, s: &str) -> Result<(), MultibootError> {
    mem.write(gpa, s.as_bytes())?;
    let nul = gpa
        .checked_add(s.len() as u64)
        .ok_or(MemoryError::OutOfRange { gpa, len: 1 })?;
    mem.write_u8(nul, 0)?;
    Ok(())
}

/// Loads a multiboot v1 kernel with its command line and modules into `mem`
/// and builds the multiboot information structure. On error nothing has been
/// written to `mem`.
pub fn load_multiboot(
    mem: &GuestMemory,
    image: &[u8],
    cmdline: &str,
    modules: &[Module<'_>],
) -> Result<MultibootBoot, MultibootError> {
    let header = find_header(image)?;
    let unsupported =
        header.flags & header_flags::REQUIRED_MASK & !header_flags::SUPPORTED_REQUIRED;
    if unsupported != 0 {
        return Err(MultibootError::UnsupportedFlags {
            flags: header.flags,
        });
    }
    let parsed = if header.flags & header_flags::AOUT_KLUDGE != 0 {
        parse_aout_kludge(image, header)?
    } else {
        parse_elf(image)?
    };

    let map = e820_map(mem);

    // Every segment must sit in usable RAM the 32-bit kernel can reach.
    let mut image_start = u64::MAX;
    let mut image_end = 0u64;
    for seg in &parsed.segments {
        let end = seg
            .end()
            .filter(|_| usable_below_4g(&map, seg.gpa, seg.mem_size));
        let Some(end) = end else {
            return Err(MultibootError::SegmentOutsideRam {
                index: seg.index,
                start: seg.gpa,
                end: seg.gpa.saturating_add(seg.mem_size),
            });
        };
        image_start = image_start.min(seg.gpa);
        image_end = image_end.max(end);
    }

    if parsed.entry >= FOUR_GIB || !mem.is_ram(parsed.entry, 1) {
        return Err(MultibootError::EntryOutOfRange(parsed.entry));
    }

    // The GDT stays at 0x500 unless the kernel itself is loaded there.
    let gdt_low_end = GDT_ADDR + GDT_SIZE;
    let gdt_overlapped = parsed
        .segments
        .iter()
        .any(|s| s.gpa < gdt_low_end && s.end().is_some_and(|end| end > GDT_ADDR));
    let gdt_low_ok = !gdt_overlapped && usable_entry_containing(&map, GDT_ADDR, GDT_SIZE).is_some();

    let layout =
        layout_info(!gdt_low_ok, map.len(), cmdline, modules).ok_or(MultibootError::TooLarge {
            start: image_end,
            needed: u64::MAX,
        })?;
    let base = place_info(&map, image_end, layout.total)?;
    // From here on every address is below 4 GiB: base + total <= 4 GiB.
    let at = |offset: u64| base + offset;

    // All checks passed: write the kernel.
    for seg in &parsed.segments {
        mem.write(seg.gpa, seg.data)?;
        let file_len = seg.data.len() as u64;
        if seg.mem_size > file_len {
            mem.zero(seg.gpa + file_len, seg.mem_size - file_len)?;
        }
    }

    // The GDT.
    let gdt_addr = layout.gdt.map_or(GDT_ADDR, at);
    for (i, descriptor) in GDT.iter().enumerate() {
        mem.write_u64(gdt_addr + 8 * i as u64, *descriptor)?;
    }

    // Memory map: each entry is preceded by its size (20, not counting itself).
    for (i, entry) in map.iter().enumerate() {
        let entry_at = at(layout.mmap + MMAP_ENTRY_SIZE * i as u64);
        mem.write_u32(entry_at, (MMAP_ENTRY_SIZE - 4) as u32)?;
        mem.write(entry_at + 4, &entry.to_bytes())?;
    }

    // Strings.
    write_cstr(mem, at(layout.cmdline), cmdline)?;
    write_cstr(mem, at(layout.loader_name), BOOT_LOADER_NAME)?;

    // Modules: data page aligned, then the list entries.
    let mut loaded_modules = Vec::with_capacity(modules.len());
    for (i, module) in modules.iter().enumerate() {
        let data_at = at(layout.module_data[i]);
        let string_at = at(layout.module_cmdlines[i]);
        mem.write(data_at, module.data)?;
        write_cstr(mem, string_at, module.cmdline)?;
        let loaded = LoadedModule {
            start: to_u32(data_at)?,
            end: to_u32(data_at + module.data.len() as u64)?,
            cmdline_addr: to_u32(string_at)?,
        };
        let entry_at = at(layout.mods + MODULE_ENTRY_SIZE * i as u64);
        mem.write_u32(entry_at, loaded.start)?;
        mem.write_u32(entry_at + 4, loaded.end)?;
        mem.write_u32(entry_at + 8, loaded.cmdline_addr)?;
        mem.write_u32(entry_at + 12, 0)?;
        loaded_modules.push(loaded);
    }

    // The information structure itself.
    let mut flags =
        info_flags::MEMORY | info_flags::CMDLINE | info_flags::MMAP | info_flags::BOOT_LOADER_NAME;
    if !modules.is_empty() {
        flags |= info_flags::MODS;
    }
    let mut info = [0u8; info_offsets::SIZE as usize];
    let mut put = |offset: u64, value: u32| {
        let o = offset as usize;
        info[o..o + 4].copy_from_slice(&value.to_le_bytes());
    };
    put(info_offsets::FLAGS, flags);
    put(info_offsets::MEM_LOWER, usable_kib_from(&map, 0));
    put(
        info_offsets::MEM_UPPER,
        usable_kib_from(&map, HIGH_MEMORY_START),
    );
    put(info_offsets::CMDLINE, to_u32(at(layout.cmdline))?);
    if !modules.is_empty() {
        put(info_offsets::MODS_COUNT, to_u32(modules.len() as u64)?);
        put(info_offsets::MODS_ADDR, to_u32(at(layout.mods))?);
    }
    put(
        info_offsets::MMAP_LENGTH,
        to_u32(MMAP_ENTRY_SIZE * map.len() as u64)?,
    );
    put(info_offsets::MMAP_ADDR, to_u32(at(layout.mmap))?);
    put(
        info_offsets::BOOT_LOADER_NAME,
        to_u32(at(layout.loader_name))?,
    );
    mem.write(base, &info)?;

    Ok(MultibootBoot {
        entry: to_u32(parsed.entry)?,
        info_addr: to_u32(base)?,
        image_start,
        image_end,
        gdt_addr: to_u32(gdt_addr)?,
        cmdline_addr: to_u32(at(layout.cmdline))?,
        modules: loaded_modules,
        boot_data_end: base + layout.total,
    })
}

/// The machine state at the multiboot hand-off (spec 3.2): EAX = 0x2BADB002,
/// EBX = information structure, CS a flat 32-bit execute/read segment,
/// DS/ES/FS/GS/SS flat 32-bit read/write, CR0 = PE|ET (paging off),
/// EFLAGS = 0x2 (IF and VM clear), GDTR = the loader's GDT, IDTR limit 0.
/// TR holds the GDT's busy 32-bit TSS and LDTR is unusable, which is what
/// VMX guest-state checks require (SDM vol. 3, "Checks on Guest Segment
/// Registers"); the guest must load its own before using either.
/// IA32_APIC_BASE = 0xFEE00900 (BSP, enabled).
pub fn multiboot_entry_state(boot: &MultibootBoot) -> VcpuState {
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
    VcpuState {
        regs: Regs {
            rax: u64::from(MULTIBOOT_BOOTLOADER_MAGIC),
            rbx: u64::from(boot.info_addr),
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
                base: u64::from(boot.gdt_addr),
                limit: (GDT_SIZE - 1) as u16,
            },
            idt: DescriptorTable { base: 0, limit: 0 },
            cr0: cr0::PE | cr0::ET,
            efer: 0,
            apic_base: APIC_BASE_MSR_VALUE,
            ..Sregs::default()
        },
        ..VcpuState::default()
    }
}

#[cfg(test)]
mod tests;
