//! The Linux x86 boot protocol for a bzImage, entered through its 64-bit
//! entry point (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").
//!
//! [`load_bzimage`] checks the setup header, loads the protected-mode kernel,
//! the initrd and the command line, and builds `boot_params` (the "zero
//! page") with the e820 map. [`linux_entry_state`] writes the GDT and the
//! identity-mapping page tables and gives the documented entry state: 64-bit
//! mode, paging on, CS = `__BOOT_CS` (0x10), DS/ES/SS = `__BOOT_DS` (0x18),
//! RSI = `boot_params`, RIP = load address + 0x200, interrupts off.
//!
//! Guest memory used (all in usable e820 RAM below the EBDA, except the
//! kernel and initrd):
//! - `0x500..0x530`: the GDT ([`GDT_ADDR`]);
//! - `0x7000..0x8000`: `boot_params` ([`BOOT_PARAMS_ADDR`]);
//! - `0x8000..0x9000`: the boot stack, RSP = [`BOOT_STACK_POINTER`];
//! - `0x9000..0xF000`: PML4, PDPT and four page directories of 2 MiB pages
//!   identity-mapping the first 4 GiB ([`PAGE_TABLES_ADDR`]);
//! - `0x20000..`: the command line, at most `cmdline_size` bytes plus NUL;
//! - the kernel at `pref_address` when it fits (relocatable kernels), else at
//!   1 MiB rounded up to `kernel_alignment`; `init_size` bytes are reserved
//!   from its runtime start;
//! - the initrd page aligned, as high as possible below
//!   min(`initrd_addr_max` + 1, end of RAM below the hole, 4 GiB), above the
//!   kernel's reserved range.
//!
//! Everything from the file is checked before the first byte is written: a
//! load that fails leaves guest memory untouched, and no header value can
//! make the loader panic.

use tandem_core::cpu::{cr0, cr4, efer, rflags, DescriptorTable, Regs, Segment, Sregs, VcpuState};
use tandem_core::{GuestMemory, MemoryError};
use thiserror::Error;

use crate::e820::{align_up, e820_map, place_high, usable_below_4g, E820Entry, FOUR_GIB};
use crate::e820::{EBDA_START, HIGH_MEMORY_START};
use crate::multiboot::APIC_BASE_MSR_VALUE;

/// Where the GDT goes (just above the BIOS data area).
pub const GDT_ADDR: u64 = 0x500;
/// Where `boot_params` (4 KiB) goes.
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Size of `boot_params`.
pub const BOOT_PARAMS_SIZE: u64 = 0x1000;
/// Initial RSP: the top of the page after `boot_params` (16-byte aligned).
pub const BOOT_STACK_POINTER: u64 = 0x8FF0;
/// First page of the page tables (the PML4); PDPT and 4 PDs follow.
pub const PAGE_TABLES_ADDR: u64 = 0x9000;
/// Bytes of page tables: PML4, PDPT, 4 page directories.
pub const PAGE_TABLES_SIZE: u64 = 6 * 0x1000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The traditional protected-mode load address.
pub const DEFAULT_LOAD_ADDR: u64 = HIGH_MEMORY_START;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
pub const ENTRY_64_OFFSET: u64 = 0x200;

/// `__BOOT_CS`: flat 64-bit code segment required by the 64-bit protocol.
pub const BOOT_CS: u16 = 0x10;
/// `__BOOT_DS`: flat read/write data segment.
pub const BOOT_DS: u16 = 0x18;
/// Busy 64-bit TSS (base 0, limit 0x67), only so TR passes VM-entry checks.
pub const TSS_SELECTOR: u16 = 0x20;

/// The GDT at [`GDT_ADDR`]; accessed bits are set so the descriptor caches
/// of [`linux_entry_state`] match memory.
const GDT: [u64; 6] = [
    0,
    0,
    // P=1 DPL=0 S=1 type=0xB (execute/read, accessed), L=1 D=0, G=1.
    0x00AF_9B00_0000_FFFF,
    // P=1 DPL=0 S=1 type=0x3 (read/write, accessed), B=1, G=1.
    0x00CF_9300_0000_FFFF,
    // 16-byte system descriptor: P=1 type=0xB (64-bit TSS, busy), limit 0x67...
    0x0000_8B00_0000_0067,
    // ...and base bits 63:32 = 0.
    0,
];
/// Size in bytes of the GDT.
pub const GDT_SIZE: u64 = (GDT.len() * 8) as u64;

const PAGE_SIZE: u64 = 0x1000;

// The fixed low-memory areas do not overlap one another.
const _: () = {
    assert!(GDT_ADDR + GDT_SIZE <= BOOT_PARAMS_ADDR);
    assert!(BOOT_PARAMS_ADDR + BOOT_PARAMS_SIZE <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER <= PAGE_TABLES_ADDR);
    assert!(PAGE_TABLES_ADDR + PAGE_TABLES_SIZE <= CMDLINE_ADDR);
};
/// Lowest protocol version accepted (the first with `cmdline_size`).
pub const MIN_PROTOCOL_VERSION: u16 = 0x0206;
/// First protocol version with `xloadflags` (and so with a 64-bit entry).
const XLOADFLAGS_VERSION: u16 = 0x020C;
/// At most this many entries fit in `boot_params.e820_table`.
pub const E820_MAX_ENTRIES: usize = 128;
/// `type_of_loader` for a loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// `heap_end_ptr`: end of a setup heap in a 64 KiB real-mode segment, minus
/// 0x200, as boot.rst's sample loader sets it (0xE000 - 0x200).
pub const HEAP_END_PTR: u16 = 0xDE00;

/// Byte offsets in `boot_params` (and in the image for the setup header,
/// which the image holds at the same offsets).
pub mod offsets {
    pub const EXT_RAMDISK_IMAGE: usize = 0x0C0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0C4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    pub const E820_ENTRIES: usize = 0x1E8;
    /// Start of the setup header.
    pub const SETUP_SECTS: usize = 0x1F1;
    pub const SYSSIZE: usize = 0x1F4;
    pub const BOOT_FLAG: usize = 0x1FE;
    /// The 2-byte short jump over the header; its displacement byte (0x201)
    /// gives the header's length: it ends at 0x202 + image[0x201].
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const HARDWARE_SUBARCH: usize = 0x23C;
    pub const HARDWARE_SUBARCH_DATA: usize = 0x240;
    pub const SETUP_DATA: usize = 0x250;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    pub const E820_TABLE: usize = 0x2D0;
}

/// `loadflags` bits.
pub mod loadflags {
    pub const LOADED_HIGH: u8 = 1 << 0;
    pub const KASLR_FLAG: u8 = 1 << 1;
    pub const QUIET_FLAG: u8 = 1 << 5;
    pub const KEEP_SEGMENTS: u8 = 1 << 6;
    pub const CAN_USE_HEAP: u8 = 1 << 7;
}

/// `xloadflags` bits.
pub mod xloadflags {
    pub const XLF_KERNEL_64: u16 = 1 << 0;
    pub const XLF_CAN_BE_LOADED_ABOVE_4G: u16 = 1 << 1;
}

/// `boot_flag` value.
pub const BOOT_FLAG: u16 = 0xAA55;
/// `header` magic, "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;

/// Why a bzImage could not be loaded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinuxError {
    #[error("not a bzImage: no 0xAA55 boot flag and \"HdrS\" setup header")]
    NotBzImage,
    #[error("boot protocol {}.{:02} is too old (need 2.06 or later)", .0 >> 8, .0 & 0xff)]
    UnsupportedVersion(u16),
    #[error("not a bzImage: LOADED_HIGH is clear (a zImage loads below 1 MiB)")]
    NotLoadedHigh,
    #[error("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")]
    NotKernel64,
    #[error("bad setup header: {0}")]
    BadHeader(&'static str),
    #[error(
        "truncated image: {what} needs file bytes {start:#x}..{end:#x}, the file has {file_len:#x}"
    )]
    Truncated {
        what: &'static str,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error(
        "kernel does not fit in RAM: it needs {needed:#x} bytes of usable RAM at or above 1 MiB"
    )]
    KernelTooLarge { needed: u64 },
    #[error(
        "initrd of {size:#x} bytes does not fit in usable RAM between {floor:#x} and {limit:#x}"
    )]
    InitrdTooLarge { size: u64, floor: u64, limit: u64 },
    #[error("command line is {len} bytes, the maximum is {max}")]
    CmdlineTooLong { len: usize, max: u64 },
    #[error("command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
}

/// The result of a successful load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxBoot {
    /// RIP at entry: the protected-mode kernel's start + 0x200.
    pub entry_64: u64,
    /// Address of `boot_params` (RSI at entry).
    pub boot_params: u64,
    /// Where the protected-mode kernel was copied.
    pub load_addr: u64,
    /// Bytes copied there (the file after the setup sectors).
    pub kernel_size: u64,
    /// One past the end of the range reserved for the kernel (its payload
    /// and `init_size` from its runtime start); the initrd lies above.
    pub kernel_end: u64,
    /// Address and length (without NUL) of the command line.
    pub cmdline_addr: u64,
    pub cmdline_len: u64,
    /// Address and size of the initrd, if one was given (and not empty).
    pub initrd: Option<(u64, u64)>,
    /// Boot protocol version from the header (0x020F is 2.15).
    pub protocol_version: u16,
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// The setup header fields the loader uses. Fields past the end of the
/// header the image declares read as 0.
struct Header<'a> {
    /// `image[..header_end]`.
    bytes: &'a [u8],
    version: u16,
}

impl Header<'_> {
    fn u8(&self, at: usize) -> u8 {
        self.bytes.get(at).copied().unwrap_or(0)
    }
    fn u16(&self, at: usize) -> u16 {
        le16(self.bytes, at)
    }
    fn u32(&self, at: usize) -> u32 {
        le32(self.bytes, at)
    }
    fn u64(&self, at: usize) -> u64 {
        le64(self.bytes, at)
    }
}

fn parse_header(image: &[u8]) -> Result<Header<'_>, LinuxError> {
    if le16(image, offsets::BOOT_FLAG) != BOOT_FLAG || le32(image, offsets::HEADER) != HDRS_MAGIC {
        return Err(LinuxError::NotBzImage);
    }
    // The byte at 0x201 is the jump's displacement: the header ends where it
    // lands, 0x202 + image[0x201] (boot.rst, "Details of header fields").
    let header_end =
        offsets::HEADER + usize::from(image.get(offsets::JUMP + 1).copied().unwrap_or(0));
    let bytes = image.get(..header_end).ok_or(LinuxError::Truncated {
        what: "the setup header",
        start: offsets::SETUP_SECTS as u64,
        end: header_end as u64,
        file_len: image.len() as u64,
    })?;
    let version = le16(bytes, offsets::VERSION);
    if version < MIN_PROTOCOL_VERSION {
        return Err(LinuxError::UnsupportedVersion(version));
    }
    Ok(Header { bytes, version })
}

/// Where the kernel goes and the range reserved for it.
struct KernelPlacement {
    load_addr: u64,
    reserved_end: u64,
}

fn place_kernel(
    map: &[E820Entry],
    hdr: &Header<'_>,
    payload_len: u64,
) -> Result<KernelPlacement, LinuxError> {
    let init_size = u64::from(hdr.u32(offsets::INIT_SIZE));
    let pref_address = hdr.u64(offsets::PREF_ADDRESS);
    let relocatable = hdr.u8(offsets::RELOCATABLE_KERNEL) != 0;
    let needed = payload_len.max(init_size);
    if relocatable {
        let alignment = u64::from(hdr.u32(offsets::KERNEL_ALIGNMENT));
        if !alignment.is_power_of_two() {
            return Err(LinuxError::BadHeader(
                "kernel_alignment is not a power of two",
            ));
        }
        // The kernel runs where it is loaded, so init_size counts from there.
        let mut candidates = Vec::with_capacity(2);
        if pref_address % alignment == 0 {
            candidates.push(pref_address);
        }
        if let Some(a) = align_up(DEFAULT_LOAD_ADDR, alignment) {
            candidates.push(a);
        }
        candidates
            .into_iter()
            .find(|&a| a >= HIGH_MEMORY_START && usable_below_4g(map, a, needed))
            .map(|a| KernelPlacement {
                load_addr: a,
                reserved_end: a + needed,
            })
            .ok_or(LinuxError::KernelTooLarge { needed })
    } else {
        // Loaded at 1 MiB; it moves itself to pref_address (its link
        // address) and needs init_size bytes there.
        let runtime = if pref_address == 0 {
            DEFAULT_LOAD_ADDR
        } else {
            pref_address
        };
        if runtime < HIGH_MEMORY_START
            || !usable_below_4g(map, DEFAULT_LOAD_ADDR, payload_len)
            || !usable_below_4g(map, runtime, init_size)
        {
            return Err(LinuxError::KernelTooLarge {
                needed: runtime
                    .saturating_add(init_size)
                    .max(DEFAULT_LOAD_ADDR + payload_len)
                    - DEFAULT_LOAD_ADDR,
            });
        }
        Ok(KernelPlacement {
            load_addr: DEFAULT_LOAD_ADDR,
            reserved_end: (DEFAULT_LOAD_ADDR + payload_len).max(runtime + init_size),
        })
    }
}

/// Loads a bzImage with an optional initrd and command line into `mem` and
/// builds `boot_params`. On error nothing has been written to `mem`.
pub fn load_bzimage(
    mem: &GuestMemory,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<LinuxBoot, LinuxError> {
    let hdr = parse_header(image)?;
    if hdr.u8(offsets::LOADFLAGS) & loadflags::LOADED_HIGH == 0 {
        return Err(LinuxError::NotLoadedHigh);
    }
    // xloadflags exists from protocol 2.12; older kernels have no 64-bit entry.
    if hdr.version < XLOADFLAGS_VERSION
        || hdr.u16(offsets::XLOADFLAGS) & xloadflags::XLF_KERNEL_64 == 0
    {
        return Err(LinuxError::NotKernel64);
    }

    // The real-mode setup: the boot sector plus setup_sects sectors (0 means 4).
    let setup_sects = match hdr.u8(offsets::SETUP_SECTS) {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let file_len = image.len() as u64;
    // syssize (protocol 2.04+) is the payload size in 16-byte paragraphs.
    let payload_min = u64::from(hdr.u32(offsets::SYSSIZE)) * 16;
    if file_len <= setup_size || file_len - setup_size < payload_min {
        return Err(LinuxError::Truncated {
            what: if file_len <= setup_size {
                "the setup sectors"
            } else {
                "the protected-mode kernel"
            },
            start: setup_size,
            end: setup_size + payload_min.max(1),
            file_len,
        });
    }
    // setup_size < file_len, so it fits in usize.
    let payload = &image[setup_size as usize..];
    let payload_len = payload.len() as u64;

    let map = e820_map(mem);
    let kernel = place_kernel(&map, &hdr, payload_len)?;

    // The command line: cmdline_size bytes at most, and room before the EBDA.
    let cmdline_max = u64::from(hdr.u32(offsets::CMDLINE_SIZE)).min(EBDA_START - CMDLINE_ADDR - 1);
    let cmdline_len = cmdline.len() as u64;
    if cmdline_len > cmdline_max {
        return Err(LinuxError::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max,
        });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxError::CmdlineHasNul);
    }

    // The loader's own low-memory structures must be usable RAM.
    for (addr, len) in [
        (GDT_ADDR, GDT_SIZE),
        (BOOT_PARAMS_ADDR, BOOT_PARAMS_SIZE),
        (BOOT_STACK_POINTER & !(PAGE_SIZE - 1), PAGE_SIZE),
        (PAGE_TABLES_ADDR, PAGE_TABLES_SIZE),
        (CMDLINE_ADDR, cmdline_len + 1),
    ] {
        if !usable_below_4g(&map, addr, len) {
            return Err(LinuxError::Memory(MemoryError::OutOfRange {
                gpa: addr,
                len,
            }));
        }
    }

    let initrd = initrd.filter(|d| !d.is_empty());
    let initrd_placed = match initrd {
        None => None,
        Some(data) => {
            let size = data.len() as u64;
            let floor = align_up(kernel.reserved_end, PAGE_SIZE).unwrap_or(u64::MAX);
            // initrd_addr_max is the highest address the initrd may occupy.
            let limit = (u64::from(hdr.u32(offsets::INITRD_ADDR_MAX)) + 1).min(FOUR_GIB);
            let base = place_high(&map, size, floor, limit, PAGE_SIZE)
                .ok_or(LinuxError::InitrdTooLarge { size, floor, limit })?;
            Some((base, data))
        }
    };

    // boot_params: zeroed, the setup header copied from the image as is.
    let mut bp = vec![0u8; BOOT_PARAMS_SIZE as usize];
    let header_bytes = &hdr.bytes[offsets::SETUP_SECTS..];
    bp[offsets::SETUP_SECTS..offsets::SETUP_SECTS + header_bytes.len()]
        .copy_from_slice(header_bytes);
    let put32 = |bp: &mut [u8], at: usize, v: u32| bp[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // Fields the loader owns: a plain PC (subarch 0), no setup_data list,
    // whatever the image's bytes there say.
    bp[offsets::HARDWARE_SUBARCH..offsets::HARDWARE_SUBARCH + 4].fill(0);
    bp[offsets::HARDWARE_SUBARCH_DATA..offsets::HARDWARE_SUBARCH_DATA + 8].fill(0);
    bp[offsets::SETUP_DATA..offsets::SETUP_DATA + 8].fill(0);
    bp[offsets::TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED;
    bp[offsets::LOADFLAGS] |= loadflags::CAN_USE_HEAP;
    bp[offsets::HEAP_END_PTR..offsets::HEAP_END_PTR + 2]
        .copy_from_slice(&HEAP_END_PTR.to_le_bytes());
    // Every address below is under 4 GiB (checked by `fits`/`place_initrd`).
    put32(&mut bp, offsets::CODE32_START, kernel.load_addr as u32);
    put32(&mut bp, offsets::CMD_LINE_PTR, CMDLINE_ADDR as u32);
    put32(&mut bp, offsets::EXT_CMD_LINE_PTR, 0);
    let (ramdisk_image, ramdisk_size) = initrd_placed.map_or((0, 0), |(b, d)| (b, d.len() as u64));
    put32(&mut bp, offsets::RAMDISK_IMAGE, ramdisk_image as u32);
    put32(&mut bp, offsets::RAMDISK_SIZE, ramdisk_size as u32);
    put32(
        &mut bp,
        offsets::EXT_RAMDISK_IMAGE,
        (ramdisk_image >> 32) as u32,
    );
    put32(
        &mut bp,
        offsets::EXT_RAMDISK_SIZE,
        (ramdisk_size >> 32) as u32,
    );
    // The e820 table: the lowest 128 ranges if there were ever more.
    let entries = map.len().min(E820_MAX_ENTRIES);
    for (i, e) in map.iter().take(entries).enumerate() {
        let at = offsets::E820_TABLE + i * E820Entry::SIZE;
        bp[at..at + E820Entry::SIZE].copy_from_slice(&e.to_bytes());
    }
    bp[offsets::E820_ENTRIES] = entries as u8;

    // All checks passed: write.
    mem.write(kernel.load_addr, payload)?;
    if let Some((base, data)) = initrd_placed {
        mem.write(base, data)?;
    }
    mem.write(CMDLINE_ADDR, cmdline.as_bytes())?;
    mem.write_u8(CMDLINE_ADDR + cmdline_len, 0)?;
    mem.write(BOOT_PARAMS_ADDR, &bp)?;

    Ok(LinuxBoot {
        entry_64: kernel.load_addr + ENTRY_64_OFFSET,
        boot_params: BOOT_PARAMS_ADDR,
        load_addr: kernel.load_addr,
        kernel_size: payload_len,
        kernel_end: kernel.reserved_end,
        cmdline_addr: CMDLINE_ADDR,
        cmdline_len,
        initrd: initrd_placed.map(|(b, d)| (b, d.len() as u64)),
        protocol_version: hdr.version,
    })
}

/// The page tables at [`PAGE_TABLES_ADDR`]: PML4[0] → PDPT, PDPT[0..4] →
/// four page directories of 2 MiB pages, identity-mapping 0..4 GiB
/// (present, writable, supervisor; SDM vol. 3, 4.5 "4-Level Paging").
fn page_tables() -> Vec<u8> {
    const P_RW: u64 = 0x3;
    const PS: u64 = 0x80;
    let mut t = vec![0u8; PAGE_TABLES_SIZE as usize];
    let mut put = |at: usize, v: u64| t[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let pdpt = PAGE_TABLES_ADDR + PAGE_SIZE;
    let pd = pdpt + PAGE_SIZE;
    put(0, pdpt | P_RW);
    for gib in 0..4u64 {
        put(
            (PAGE_SIZE + gib * 8) as usize,
            (pd + gib * PAGE_SIZE) | P_RW,
        );
        for j in 0..512u64 {
            let at = (2 * PAGE_SIZE + gib * PAGE_SIZE + j * 8) as usize;
            put(at, (gib << 30) | (j << 21) | P_RW | PS);
        }
    }
    t
}

/// Writes the GDT and the identity-mapping page tables (at the addresses
/// [`load_bzimage`] checked) and returns the 64-bit boot protocol's entry
/// state: long mode with paging (CR0 = PE|ET|NE|PG, CR4 = PAE, EFER =
/// LME|LMA, CR3 = the PML4), CS = `__BOOT_CS`, DS/ES/FS/GS/SS = `__BOOT_DS`,
/// RSI = `boot_params`, RIP = `entry_64`, RFLAGS = 0x2 (IF clear), RSP =
/// [`BOOT_STACK_POINTER`], IDTR limit 0. TR holds the busy 64-bit TSS and
/// LDTR is unusable, as VM entry requires (SDM vol. 3, "Checks on Guest
/// Segment Registers").
pub fn linux_entry_state(boot: &LinuxBoot, mem: &GuestMemory) -> Result<VcpuState, LinuxError> {
    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt)?;
    mem.write(PAGE_TABLES_ADDR, &page_tables())?;

    let code = Segment::flat(BOOT_CS, 0xb, true);
    let data = Segment::flat(BOOT_DS, 0x3, false);
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
            rsi: boot.boot_params,
            rip: boot.entry_64,
            rsp: BOOT_STACK_POINTER,
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
            cr0: cr0::PE | cr0::ET | cr0::NE | cr0::PG,
            cr3: PAGE_TABLES_ADDR,
            cr4: cr4::PAE,
            efer: efer::LME | efer::LMA,
            apic_base: APIC_BASE_MSR_VALUE,
            ..Sregs::default()
        },
        ..VcpuState::default()
    })
}

#[cfg(test)]
mod tests;
