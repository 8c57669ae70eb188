//! Multiboot loader tests. The kernels are built by hand here: ELF headers,
//! program headers and the multiboot header written byte by byte.

use super::*;
use crate::e820::E820Kind;

const MIB: u64 = 1 << 20;
const RAM: u64 = 4 * MIB;

fn mem() -> GuestMemory {
    GuestMemory::new(RAM).unwrap()
}

fn push16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn push64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut [u8], at: usize, x: u32) {
    v[at..at + 4].copy_from_slice(&x.to_le_bytes());
}

fn multiboot_header(flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    push32(&mut h, MULTIBOOT_HEADER_MAGIC);
    push32(&mut h, flags);
    push32(
        &mut h,
        0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags)),
    );
    h
}

/// A PT_LOAD segment of a test kernel.
struct Seg {
    paddr: u64,
    vaddr: u64,
    data: Vec<u8>,
    memsz: u64,
}

impl Seg {
    fn new(paddr: u64, data: Vec<u8>, memsz: u64) -> Seg {
        Seg {
            paddr,
            vaddr: paddr,
            data,
            memsz,
        }
    }
}

/// A built test kernel and where its parts are in the file.
struct Built {
    bytes: Vec<u8>,
    header_offset: usize,
    segment_offsets: Vec<usize>,
}

/// Builds an x86 ELF32 (`elf64 == false`) or x86-64 ELF64 executable with
/// the multiboot header (if `mb_flags` is given) right after the program
/// headers and the segment contents after that.
fn build_elf(elf64: bool, entry: u64, segs: &[Seg], mb_flags: Option<u32>) -> Built {
    let (ehsize, phentsize) = if elf64 { (64usize, 56usize) } else { (52, 32) };
    let mut b = Vec::new();
    b.extend_from_slice(b"\x7FELF");
    b.push(if elf64 { 2 } else { 1 }); // EI_CLASS
    b.push(1); // EI_DATA: little endian
    b.push(1); // EI_VERSION
    b.extend_from_slice(&[0; 9]);
    push16(&mut b, 2); // ET_EXEC
    push16(&mut b, if elf64 { 62 } else { 3 });
    push32(&mut b, 1);
    let phoff = ehsize;
    if elf64 {
        push64(&mut b, entry);
        push64(&mut b, phoff as u64);
        push64(&mut b, 0); // e_shoff
    } else {
        push32(&mut b, entry as u32);
        push32(&mut b, phoff as u32);
        push32(&mut b, 0);
    }
    push32(&mut b, 0); // e_flags
    push16(&mut b, ehsize as u16);
    push16(&mut b, phentsize as u16);
    push16(&mut b, segs.len() as u16);
    push16(&mut b, if elf64 { 64 } else { 40 });
    push16(&mut b, 0);
    push16(&mut b, 0);
    assert_eq!(b.len(), ehsize);

    let header_offset = (phoff + segs.len() * phentsize).next_multiple_of(16);
    let mut data_offset = header_offset + 32;
    let mut segment_offsets = Vec::new();
    for s in segs {
        segment_offsets.push(data_offset);
        if elf64 {
            push32(&mut b, 1); // PT_LOAD
            push32(&mut b, 5); // R+X
            push64(&mut b, data_offset as u64);
            push64(&mut b, s.vaddr);
            push64(&mut b, s.paddr);
            push64(&mut b, s.data.len() as u64);
            push64(&mut b, s.memsz);
            push64(&mut b, 0x1000);
        } else {
            push32(&mut b, 1);
            push32(&mut b, data_offset as u32);
            push32(&mut b, s.vaddr as u32);
            push32(&mut b, s.paddr as u32);
            push32(&mut b, s.data.len() as u32);
            push32(&mut b, s.memsz as u32);
            push32(&mut b, 5);
            push32(&mut b, 0x1000);
        }
        data_offset = (data_offset + s.data.len()).next_multiple_of(16);
    }
    b.resize(header_offset, 0);
    if let Some(flags) = mb_flags {
        b.extend_from_slice(&multiboot_header(flags));
    }
    for (s, &off) in segs.iter().zip(&segment_offsets) {
        b.resize(off, 0);
        b.extend_from_slice(&s.data);
    }
    Built {
        bytes: b,
        header_offset,
        segment_offsets,
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Two segments: text at 1 MiB (0x300 bytes) and data + bss at 0x102000
/// (0x100 file bytes, 0x1800 in memory, so the image ends at 0x103800).
fn two_segment_kernel(elf64: bool) -> Built {
    build_elf(
        elf64,
        0x10_0010,
        &[
            Seg::new(0x10_0000, pattern(0x300, 1), 0x300),
            Seg::new(0x10_2000, pattern(0x100, 2), 0x1800),
        ],
        Some(0),
    )
}

fn read_bytes(m: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read(gpa, &mut v).unwrap();
    v
}

fn read_cstr(m: &GuestMemory, gpa: u64) -> String {
    let mut s = Vec::new();
    for i in 0..4096 {
        let b = m.read_u8(gpa + i).unwrap();
        if b == 0 {
            return String::from_utf8(s).unwrap();
        }
        s.push(b);
    }
    panic!("unterminated string at {gpa:#x}");
}

fn info_u32(m: &GuestMemory, boot: &MultibootBoot, offset: u64) -> u32 {
    m.read_u32(u64::from(boot.info_addr) + offset).unwrap()
}

/// Decodes a GDT code/data/TSS descriptor into the descriptor-cache form.
fn decode_descriptor(d: u64, selector: u16) -> Segment {
    let limit_raw = (d & 0xFFFF) | ((d >> 32) & 0xF_0000);
    let g = d & (1 << 55) != 0;
    Segment {
        selector,
        base: ((d >> 16) & 0xFF_FFFF) | ((d >> 32) & 0xFF00_0000),
        limit: if g {
            ((limit_raw << 12) | 0xFFF) as u32
        } else {
            limit_raw as u32
        },
        type_: ((d >> 40) & 0xF) as u8,
        s: d & (1 << 44) != 0,
        dpl: ((d >> 45) & 3) as u8,
        present: d & (1 << 47) != 0,
        avl: d & (1 << 52) != 0,
        l: d & (1 << 53) != 0,
        db: d & (1 << 54) != 0,
        g,
        unusable: false,
    }
}

#[test]
fn elf32_segments_bss_and_info_structure() {
    let m = mem();
    let k = two_segment_kernel(false);
    // Garbage where the bss goes proves the loader zeroes it.
    m.write(0x10_2000, &vec![0xAA; 0x1800]).unwrap();
    let mod_a = pattern(5000, 9);
    let mod_b = b"second module".to_vec();
    let modules = [
        Module {
            data: &mod_a,
            cmdline: "initrd.img root=/dev/ram0",
        },
        Module {
            data: &mod_b,
            cmdline: "",
        },
    ];
    let boot = load_multiboot(&m, &k.bytes, "kernel console=ttyS0", &modules).unwrap();

    // Segments.
    assert_eq!(read_bytes(&m, 0x10_0000, 0x300), pattern(0x300, 1));
    assert_eq!(read_bytes(&m, 0x10_2000, 0x100), pattern(0x100, 2));
    assert!(read_bytes(&m, 0x10_2100, 0x1700).iter().all(|&b| b == 0));
    assert_eq!(boot.image_start, 0x10_0000);
    assert_eq!(boot.image_end, 0x10_3800);
    assert_eq!(boot.entry, 0x10_0010);

    // Info structure on the first page after the image.
    assert_eq!(boot.info_addr, 0x10_4000);
    let flags = info_u32(&m, &boot, info_offsets::FLAGS);
    assert_eq!(
        flags,
        info_flags::MEMORY
            | info_flags::CMDLINE
            | info_flags::MODS
            | info_flags::MMAP
            | info_flags::BOOT_LOADER_NAME
    );
    assert_eq!(info_u32(&m, &boot, info_offsets::MEM_LOWER), 639);
    assert_eq!(info_u32(&m, &boot, info_offsets::MEM_UPPER), 3072);
    let cmdline = info_u32(&m, &boot, info_offsets::CMDLINE);
    assert_eq!(cmdline, boot.cmdline_addr);
    assert_eq!(read_cstr(&m, u64::from(cmdline)), "kernel console=ttyS0");
    let name = info_u32(&m, &boot, info_offsets::BOOT_LOADER_NAME);
    assert_eq!(read_cstr(&m, u64::from(name)), "tandem");
    for unused in [
        info_offsets::BOOT_DEVICE,
        info_offsets::SYMS,
        info_offsets::DRIVES_LENGTH,
        info_offsets::DRIVES_ADDR,
        info_offsets::CONFIG_TABLE,
        info_offsets::APM_TABLE,
        info_offsets::VBE_CONTROL_INFO,
    ] {
        assert_eq!(info_u32(&m, &boot, unused), 0, "offset {unused}");
    }

    // Memory map: the e820 entries, each preceded by size = 20.
    let map = e820_map(&m);
    assert_eq!(map.len(), 7);
    assert_eq!(
        info_u32(&m, &boot, info_offsets::MMAP_LENGTH),
        24 * map.len() as u32
    );
    let mmap = u64::from(info_u32(&m, &boot, info_offsets::MMAP_ADDR));
    for (i, e) in map.iter().enumerate() {
        let at = mmap + 24 * i as u64;
        assert_eq!(m.read_u32(at).unwrap(), 20);
        assert_eq!(m.read_u64(at + 4).unwrap(), e.addr);
        assert_eq!(m.read_u64(at + 12).unwrap(), e.len);
        assert_eq!(m.read_u32(at + 20).unwrap(), e.kind.type_code());
    }
    assert_eq!(m.read_u64(mmap + 24 * 3 + 4).unwrap(), 0x10_0000);
    assert_eq!(
        m.read_u32(mmap + 24 * 3 + 20).unwrap(),
        E820Kind::Ram as u32
    );

    // Modules: page aligned, after the info area, contents and strings.
    assert_eq!(info_u32(&m, &boot, info_offsets::MODS_COUNT), 2);
    let mods = u64::from(info_u32(&m, &boot, info_offsets::MODS_ADDR));
    for (i, (module, loaded)) in modules.iter().zip(&boot.modules).enumerate() {
        let at = mods + 16 * i as u64;
        let start = m.read_u32(at).unwrap();
        let end = m.read_u32(at + 4).unwrap();
        let string = m.read_u32(at + 8).unwrap();
        assert_eq!(m.read_u32(at + 12).unwrap(), 0);
        assert_eq!(
            (start, end, string),
            (loaded.start, loaded.end, loaded.cmdline_addr)
        );
        assert_eq!(start % 4096, 0);
        assert!(u64::from(start) >= boot.image_end);
        assert_eq!(end - start, module.data.len() as u32);
        assert_eq!(
            read_bytes(&m, u64::from(start), module.data.len()),
            module.data
        );
        assert_eq!(read_cstr(&m, u64::from(string)), module.cmdline);
    }
    assert!(boot.modules[1].start >= boot.modules[0].end);
    assert_eq!(u64::from(boot.modules[1].end), boot.boot_data_end);

    // The GDT at 0x500.
    assert_eq!(boot.gdt_addr, 0x500);
    assert_eq!(m.read_u64(0x508).unwrap(), 0x00CF_9B00_0000_FFFF);
}

#[test]
fn entry_state_is_the_documented_machine_state() {
    let m = mem();
    let k = two_segment_kernel(false);
    let boot = load_multiboot(&m, &k.bytes, "", &[]).unwrap();
    let st = multiboot_entry_state(&boot);
    assert_eq!(st.regs.rax, 0x2BAD_B002);
    assert_eq!(st.regs.rbx, u64::from(boot.info_addr));
    assert_eq!(st.regs.rip, 0x10_0010);
    assert_eq!(st.regs.rflags, 0x2);
    let s = &st.sregs;
    assert_eq!(s.cr0, cr0::PE | cr0::ET);
    assert_eq!(s.efer, 0);
    assert_eq!(s.cr4, 0);
    assert_eq!(s.apic_base, 0xFEE0_0900);
    assert_eq!(s.mode_name(), "32-bit protected mode");
    assert_eq!(
        (s.cs.selector, s.cs.type_, s.cs.base, s.cs.limit),
        (0x08, 0xb, 0, u32::MAX)
    );
    assert!(s.cs.db && s.cs.s && s.cs.present && !s.cs.l && s.cs.dpl == 0);
    for d in [&s.ds, &s.es, &s.fs, &s.gs, &s.ss] {
        assert_eq!(
            (d.selector, d.type_, d.base, d.limit),
            (0x10, 0x3, 0, u32::MAX)
        );
        assert!(d.db && d.s && d.present && !d.unusable);
    }
    assert_eq!(s.idt.limit, 0);
    assert_eq!(
        s.gdt,
        DescriptorTable {
            base: 0x500,
            limit: 0x2F
        }
    );
    assert_eq!((s.tr.type_, s.tr.base, s.tr.limit), (0xb, 0, 0x67));
    assert!(s.tr.present && !s.tr.s && !s.tr.unusable);
    assert!(s.ldt.unusable);

    // Every descriptor cache matches the descriptor its selector names in
    // the GDT written to guest memory.
    for seg in [&s.cs, &s.ds, &s.ss, &s.tr] {
        let desc = m
            .read_u64(s.gdt.base + u64::from(seg.selector & !7))
            .unwrap();
        assert_eq!(decode_descriptor(desc, seg.selector), *seg);
        assert!(u64::from(seg.selector) + 7 <= u64::from(s.gdt.limit));
    }
}

#[test]
fn elf64_higher_half_kernel_enters_at_its_physical_address() {
    let m = mem();
    let virt = 0xFFFF_FFFF_8000_0000u64;
    let mut text = Seg::new(0x20_0000, pattern(0x400, 3), 0x400);
    text.vaddr = virt + 0x20_0000;
    let mut data = Seg::new(0x20_1000, pattern(0x80, 4), 0x3000);
    data.vaddr = virt + 0x20_1000;
    let k = build_elf(true, virt + 0x20_0040, &[text, data], Some(0));
    m.write(0x20_1080, &[0x55; 0x100]).unwrap();
    let boot = load_multiboot(&m, &k.bytes, "x", &[]).unwrap();
    assert_eq!(boot.entry, 0x20_0040);
    assert_eq!(read_bytes(&m, 0x20_0000, 0x400), pattern(0x400, 3));
    assert_eq!(read_bytes(&m, 0x20_1000, 0x80), pattern(0x80, 4));
    assert!(read_bytes(&m, 0x20_1080, 0x100).iter().all(|&b| b == 0));
    assert_eq!(boot.image_end, 0x20_4000);
    assert_eq!(boot.info_addr, 0x20_4000);
    // No modules: flag 3 clear.
    assert_eq!(
        info_u32(&m, &boot, info_offsets::FLAGS) & info_flags::MODS,
        0
    );
    assert_eq!(info_u32(&m, &boot, info_offsets::MODS_COUNT), 0);
}

#[test]
fn video_mode_flag_is_ignored_and_unknown_required_flags_refused() {
    let m = mem();
    let segs = [Seg::new(0x10_0000, pattern(16, 0), 16)];
    let ok = build_elf(false, 0x10_0000, &segs, Some(header_flags::VIDEO_MODE | 3));
    assert!(load_multiboot(&m, &ok.bytes, "", &[]).is_ok());
    // Optional bits above 16 other than the kludge are ignored too.
    let ok = build_elf(false, 0x10_0000, &segs, Some(1 << 20));
    assert!(load_multiboot(&m, &ok.bytes, "", &[]).is_ok());
    let bad = build_elf(false, 0x10_0000, &segs, Some(1 << 3));
    assert_eq!(
        load_multiboot(&m, &bad.bytes, "", &[]),
        Err(MultibootError::UnsupportedFlags { flags: 1 << 3 })
    );
}

/// A flat binary with an a.out-kludge header at file offset 0x40.
fn aout_kernel(len: usize, bss: u32) -> Vec<u8> {
    let mut b = pattern(len, 5);
    let mut h = multiboot_header(header_flags::AOUT_KLUDGE);
    push32(&mut h, 0x10_0040); // header_addr
    push32(&mut h, 0x10_0000); // load_addr
    push32(&mut h, 0); // load_end_addr: whole file
    push32(
        &mut h,
        if bss == 0 {
            0
        } else {
            0x10_0000 + len as u32 + bss
        },
    );
    push32(&mut h, 0x10_0080); // entry_addr
    b[0x40..0x40 + h.len()].copy_from_slice(&h);
    b
}

#[test]
fn aout_kludge_loads_the_file_at_load_addr() {
    let m = mem();
    let k = aout_kernel(0x1234, 0x2000);
    m.write(0x10_1234, &[0xEE; 0x2000]).unwrap();
    let boot = load_multiboot(&m, &k, "a.out", &[]).unwrap();
    assert_eq!(read_bytes(&m, 0x10_0000, k.len()), k);
    assert!(read_bytes(&m, 0x10_1234, 0x2000).iter().all(|&b| b == 0));
    assert_eq!(boot.entry, 0x10_0080);
    assert_eq!(boot.image_end, 0x10_3234);
    assert_eq!(boot.info_addr, 0x10_4000);

    // load_end_addr limits what is loaded.
    let m = mem();
    let mut k = aout_kernel(0x1000, 0);
    put32(&mut k, 0x40 + 20, 0x10_0800);
    let boot = load_multiboot(&m, &k, "", &[]).unwrap();
    assert_eq!(boot.image_end, 0x10_0800);
    assert_eq!(read_bytes(&m, 0x10_0000, 0x800), k[..0x800]);
    assert_eq!(m.read_u8(0x10_0800).unwrap(), 0);
}

#[test]
fn bad_aout_kludge_fields_are_refused() {
    let m = mem();
    let mut k = aout_kernel(0x400, 0);
    put32(&mut k, 0x40 + 16, 0x10_0041); // load_addr above header_addr
    assert!(matches!(
        load_multiboot(&m, &k, "", &[]),
        Err(MultibootError::BadAoutKludge(_))
    ));
    let mut k = aout_kernel(0x400, 0);
    put32(&mut k, 0x40 + 12, 0x10_1000); // header 0x1000 past load_addr: before file start
    assert!(matches!(
        load_multiboot(&m, &k, "", &[]),
        Err(MultibootError::BadAoutKludge(_))
    ));
    let mut k = aout_kernel(0x400, 0);
    put32(&mut k, 0x40 + 20, 0x10_1000); // load_end beyond the file
    assert!(matches!(
        load_multiboot(&m, &k, "", &[]),
        Err(MultibootError::Truncated { .. })
    ));
    let mut k = aout_kernel(0x400, 0);
    put32(&mut k, 0x40 + 24, 0x10_0100); // bss_end inside the loaded data
    assert!(matches!(
        load_multiboot(&m, &k, "", &[]),
        Err(MultibootError::BadAoutKludge(_))
    ));
    // The kludge fields cut off by the end of the file.
    let k = aout_kernel(0x400, 0);
    assert!(matches!(
        load_multiboot(&m, &k[..0x40 + 20], "", &[]),
        Err(MultibootError::Truncated { .. })
    ));
}

#[test]
fn not_a_multiboot_image() {
    let m = mem();
    let text = b"This is a text file, not a kernel.\n".repeat(100);
    assert_eq!(
        load_multiboot(&m, &text, "", &[]),
        Err(MultibootError::NoHeader)
    );
    assert_eq!(
        load_multiboot(&m, &[], "", &[]),
        Err(MultibootError::NoHeader)
    );
    let plain = build_elf(
        false,
        0x10_0000,
        &[Seg::new(0x10_0000, vec![1; 8], 8)],
        None,
    );
    assert_eq!(
        load_multiboot(&m, &plain.bytes, "", &[]),
        Err(MultibootError::NoHeader)
    );

    // Header past the first 8192 bytes.
    let mut late = vec![0u8; 8192];
    late.extend_from_slice(&multiboot_header(0));
    assert_eq!(
        load_multiboot(&m, &late, "", &[]),
        Err(MultibootError::NoHeader)
    );
    // Header straddling the 8192-byte limit.
    let mut straddle = vec![0u8; 8188];
    straddle.extend_from_slice(&multiboot_header(0));
    assert_eq!(
        load_multiboot(&m, &straddle, "", &[]),
        Err(MultibootError::NoHeader)
    );
    // Misaligned header.
    let mut misaligned = vec![0u8; 2];
    misaligned.extend_from_slice(&multiboot_header(0));
    assert_eq!(
        load_multiboot(&m, &misaligned, "", &[]),
        Err(MultibootError::NoHeader)
    );
}

#[test]
fn bad_checksum_is_reported_with_its_offset() {
    let m = mem();
    let mut k = two_segment_kernel(false);
    let at = k.header_offset + 8;
    k.bytes[at] ^= 1;
    assert_eq!(
        load_multiboot(&m, &k.bytes, "", &[]),
        Err(MultibootError::BadChecksum {
            offset: k.header_offset
        })
    );
}

#[test]
fn header_without_kludge_in_a_non_elf_file() {
    let m = mem();
    let mut raw = vec![0x90u8; 0x100];
    raw[0x20..0x2C].copy_from_slice(&multiboot_header(0));
    assert_eq!(
        load_multiboot(&m, &raw, "", &[]),
        Err(MultibootError::NotElf)
    );
}

#[test]
fn truncated_elf_files() {
    let m = mem();
    let k = two_segment_kernel(false);
    // Cut inside the second segment's file bytes.
    let cut = k.bytes.len() - 16;
    match load_multiboot(&m, &k.bytes[..cut], "", &[]) {
        Err(MultibootError::Truncated {
            what,
            start,
            end,
            file_len,
        }) => {
            assert_eq!(what, "segment 1");
            assert_eq!(start, k.segment_offsets[1] as u64);
            assert_eq!(end, k.segment_offsets[1] as u64 + 0x100);
            assert_eq!(file_len, cut as u64);
        }
        other => panic!("unexpected {other:?}"),
    }
    // Cut inside the ELF header: the multiboot header is gone too.
    assert_eq!(
        load_multiboot(&m, &k.bytes[..40], "", &[]),
        Err(MultibootError::NoHeader)
    );
    // Program header table pointing past the end of the file.
    let mut bad = k.bytes.clone();
    put32(&mut bad, 28, 0x10_0000); // e_phoff
    assert!(matches!(
        load_multiboot(&m, &bad, "", &[]),
        Err(MultibootError::Truncated { ref what, .. }) if what == "the program header table"
    ));
    // A truncated ELF header after a kludge-less multiboot header elsewhere.
    let mut short = b"\x7FELF\x01\x01\x01".to_vec();
    short.resize(0x20, 0);
    short.extend_from_slice(&multiboot_header(0));
    assert!(matches!(
        load_multiboot(&m, &short, "", &[]),
        Err(MultibootError::Truncated { .. })
    ));
    // Nothing was written.
    assert!(read_bytes(&m, 0x10_0000, 0x300).iter().all(|&b| b == 0));
}

#[test]
fn segment_outside_ram_is_refused_before_anything_is_written() {
    let m = mem();
    let k = build_elf(
        false,
        0x10_0000,
        &[
            Seg::new(0x10_0000, pattern(0x100, 1), 0x100),
            Seg::new(0x3F_F000, pattern(0x100, 2), 0x2000),
        ],
        Some(0),
    );
    let err = load_multiboot(&m, &k.bytes, "", &[]).unwrap_err();
    assert_eq!(
        err,
        MultibootError::SegmentOutsideRam {
            index: 1,
            start: 0x3F_F000,
            end: 0x40_1000
        }
    );
    assert_eq!(
        err.to_string(),
        "segment 1 (0x3ff000..0x401000) is outside usable guest RAM below 4 GiB"
    );
    assert!(read_bytes(&m, 0x10_0000, 0x100).iter().all(|&b| b == 0));

    // Reserved areas of the e820 map count as outside RAM.
    for paddr in [0xF_0000u64, 0x9_FC00, 0xA_0000] {
        let k = build_elf(
            false,
            0x10_0000,
            &[Seg::new(paddr, vec![1; 16], 16)],
            Some(0),
        );
        assert!(matches!(
            load_multiboot(&m, &k.bytes, "", &[]),
            Err(MultibootError::SegmentOutsideRam { .. })
        ));
    }
    // A 64-bit address that wraps.
    let k = build_elf(
        true,
        0x10_0000,
        &[Seg::new(u64::MAX - 8, vec![1; 16], 16)],
        Some(0),
    );
    assert!(matches!(
        load_multiboot(&m, &k.bytes, "", &[]),
        Err(MultibootError::SegmentOutsideRam { .. })
    ));
}

#[test]
fn elf_format_errors() {
    let m = mem();
    let k = two_segment_kernel(false);

    let mut be = k.bytes.clone();
    be[5] = 2; // EI_DATA = big endian
    assert_eq!(
        load_multiboot(&m, &be, "", &[]),
        Err(MultibootError::BigEndian)
    );

    let mut arm = k.bytes.clone();
    arm[18] = 40; // e_machine = EM_ARM
    assert_eq!(
        load_multiboot(&m, &arm, "", &[]),
        Err(MultibootError::NotX86 { machine: 40 })
    );

    let mut class = k.bytes.clone();
    class[4] = 7;
    assert!(matches!(
        load_multiboot(&m, &class, "", &[]),
        Err(MultibootError::MalformedElf(_))
    ));

    let filesz_gt_memsz = build_elf(
        false,
        0x10_0000,
        &[Seg::new(0x10_0000, vec![1; 64], 32)],
        Some(0),
    );
    assert!(matches!(
        load_multiboot(&m, &filesz_gt_memsz.bytes, "", &[]),
        Err(MultibootError::MalformedElf(_))
    ));

    let no_segments = build_elf(false, 0x10_0000, &[], Some(0));
    assert_eq!(
        load_multiboot(&m, &no_segments.bytes, "", &[]),
        Err(MultibootError::NoLoadableSegment)
    );
}

#[test]
fn entry_point_must_be_below_4gib_and_in_ram() {
    let m = mem();
    let segs = [Seg::new(0x10_0000, vec![0xF4; 16], 16)];
    let k = build_elf(true, 0x1_0000_0000, &segs, Some(0));
    assert_eq!(
        load_multiboot(&m, &k.bytes, "", &[]),
        Err(MultibootError::EntryOutOfRange(0x1_0000_0000))
    );
    let k = build_elf(false, 0xFFFF_F000, &segs, Some(0));
    assert_eq!(
        load_multiboot(&m, &k.bytes, "", &[]),
        Err(MultibootError::EntryOutOfRange(0xFFFF_F000))
    );
}

#[test]
fn modules_that_do_not_fit_are_refused() {
    let m = mem();
    let k = two_segment_kernel(false);
    let big = vec![0u8; 3 * MIB as usize];
    let err = load_multiboot(
        &m,
        &k.bytes,
        "",
        &[Module {
            data: &big,
            cmdline: "big",
        }],
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            MultibootError::TooLarge {
                start: 0x10_4000,
                ..
            }
        ),
        "{err:?}"
    );
    // The kernel itself was not loaded either.
    assert!(read_bytes(&m, 0x10_0000, 0x300).iter().all(|&b| b == 0));
}

#[test]
fn low_memory_kernel_gets_info_after_it_or_at_1mib() {
    let m = mem();
    let k = build_elf(
        false,
        0x1_0000,
        &[Seg::new(0x1_0000, pattern(0x800, 6), 0x1000)],
        Some(0),
    );
    let boot = load_multiboot(&m, &k.bytes, "low", &[]).unwrap();
    assert_eq!(boot.info_addr, 0x1_1000);
    assert_eq!(read_cstr(&m, u64::from(boot.cmdline_addr)), "low");

    // A module too big for conventional memory moves everything to 1 MiB.
    let m = mem();
    let module = vec![7u8; 0x10_0000];
    let boot = load_multiboot(
        &m,
        &k.bytes,
        "",
        &[Module {
            data: &module,
            cmdline: "m",
        }],
    )
    .unwrap();
    assert_eq!(boot.info_addr, 0x10_0000);
    assert_eq!(boot.modules[0].start, 0x10_1000);
    assert_eq!(m.read_u8(0x10_1000 + 0xF_FFFF).unwrap(), 7);
}

#[test]
fn kernel_over_0x500_moves_the_gdt_into_the_info_area() {
    let m = mem();
    let k = build_elf(
        false,
        0x0,
        &[Seg::new(0x0, pattern(0x1000, 8), 0x1000)],
        Some(0),
    );
    let boot = load_multiboot(&m, &k.bytes, "", &[]).unwrap();
    assert_eq!(boot.info_addr, 0x1000);
    assert_eq!(u64::from(boot.gdt_addr), 0x1000 + info_offsets::SIZE);
    // The image still owns 0x500.
    assert_eq!(
        read_bytes(&m, 0x500, 0x30),
        pattern(0x1000, 8)[0x500..0x530]
    );
    let st = multiboot_entry_state(&boot);
    assert_eq!(st.sregs.gdt.base, u64::from(boot.gdt_addr));
    let code = m.read_u64(st.sregs.gdt.base + 8).unwrap();
    assert_eq!(decode_descriptor(code, 8), st.sregs.cs);
    // The mmap does not overlap the moved GDT.
    let mmap = u64::from(info_u32(&m, &boot, info_offsets::MMAP_ADDR));
    assert!(mmap >= u64::from(boot.gdt_addr) + GDT_SIZE);
}

#[test]
fn error_messages_are_short_lines() {
    let errors = [
        MultibootError::NoHeader,
        MultibootError::BadChecksum { offset: 0x40 },
        MultibootError::UnsupportedFlags { flags: 8 },
        MultibootError::NotElf,
        MultibootError::BigEndian,
        MultibootError::NotX86 { machine: 40 },
        MultibootError::EntryOutOfRange(0x1_0000_0000),
        MultibootError::TooLarge {
            start: 0x10_0000,
            needed: 0x40_0000,
        },
    ];
    for e in errors {
        let s = e.to_string();
        assert!(!s.is_empty() && s.len() < 120 && !s.contains('\n'), "{s}");
    }
}

/// Deterministic xorshift64 PRNG.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

#[test]
fn fuzz_mutated_images_never_panic() {
    let m = mem();
    let mut bases: Vec<(Vec<u8>, usize)> = Vec::new();
    for elf64 in [false, true] {
        let k = two_segment_kernel(elf64);
        bases.push((k.bytes, k.header_offset));
    }
    bases.push((aout_kernel(0x600, 0x800), 0x40));
    let interesting = [
        0u32,
        1,
        0x7F,
        0x80,
        0xFFFF,
        0x1_0000,
        0x10_0000,
        0x3F_F000,
        0x40_0000,
        0x7FFF_FFFF,
        0x8000_0000,
        0xFFFF_F000,
        0xFFFF_FFFF,
    ];
    let module = pattern(3000, 1);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut ok, mut failed) = (0usize, 0usize);
    for iteration in 0..30_000 {
        let (base, header_offset) = &bases[iteration % bases.len()];
        let mut img = base.clone();
        for _ in 0..1 + rng.below(6) {
            match rng.below(5) {
                // Flip bits anywhere.
                0 => {
                    let at = rng.below(img.len());
                    if let Some(b) = img.get_mut(at) {
                        *b ^= 1 << rng.below(8);
                    }
                }
                // Random byte in the headers, where it matters most.
                1 => {
                    let at = rng.below(img.len().min(256));
                    if let Some(b) = img.get_mut(at) {
                        *b = rng.next() as u8;
                    }
                }
                // Interesting 32-bit value at an aligned header offset.
                2 => {
                    let at = rng.below(img.len().min(256) / 4) * 4;
                    if at + 4 <= img.len() {
                        let v = interesting[rng.below(interesting.len())];
                        put32(&mut img, at, v);
                    }
                }
                // Truncate.
                3 => {
                    let len = rng.below(img.len() + 1);
                    img.truncate(len);
                }
                // Grow with junk.
                _ => {
                    for _ in 0..rng.below(64) {
                        img.push(rng.next() as u8);
                    }
                }
            }
        }
        // Usually repair the checksum so the mutation reaches the loader.
        if rng.below(4) != 0 && img.len() >= header_offset + 12 {
            let flags = u32::from_le_bytes(
                img[header_offset + 4..header_offset + 8]
                    .try_into()
                    .unwrap(),
            );
            put32(&mut img, *header_offset, MULTIBOOT_HEADER_MAGIC);
            put32(
                &mut img,
                header_offset + 8,
                0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(flags)),
            );
        }
        let modules = [Module {
            data: &module,
            cmdline: "mod",
        }];
        let with_modules: &[Module<'_>] = if iteration % 2 == 0 { &modules } else { &[] };
        match load_multiboot(&m, &img, "fuzz", with_modules) {
            Ok(boot) => {
                ok += 1;
                // Whatever the image, the result is consistent.
                assert!(boot.image_start < boot.image_end);
                assert!(u64::from(boot.info_addr) >= boot.image_end);
                assert_eq!(boot.info_addr % 4096, 0);
                assert!(boot.boot_data_end <= RAM);
                assert!(u64::from(boot.entry) < RAM);
                assert_eq!(read_cstr(&m, u64::from(boot.cmdline_addr)), "fuzz");
                let flags = info_u32(&m, &boot, info_offsets::FLAGS);
                assert_ne!(flags & info_flags::MMAP, 0);
                assert_eq!(flags & info_flags::MODS != 0, !with_modules.is_empty());
            }
            Err(e) => {
                failed += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    eprintln!("fuzz: {ok} loaded, {failed} refused");
    // Both outcomes must be exercised for the test to mean anything.
    assert!(ok > 100, "only {ok} mutated images loaded");
    assert!(failed > 100, "only {failed} mutated images failed");
}
