//! PVH loader tests, with ELF images written byte by byte.

use super::*;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const LOAD_ADDR: u64 = 0x100_0000;
const ENTRY: u64 = 0x100_0040;

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

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect()
}

/// One note: namesz, descsz, type, name and desc padded to 4.
fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    push32(&mut n, name.len() as u32);
    push32(&mut n, desc.len() as u32);
    push32(&mut n, kind);
    n.extend_from_slice(name);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

/// The Xen notes of a Linux vmlinux: a GUEST_OS note, then PHYS32_ENTRY
/// with an 8-byte descriptor.
fn xen_notes(entry: u64) -> Vec<u8> {
    let mut notes = note(b"Xen\0", 6, b"linux\0");
    notes.extend(note(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]));
    notes.extend(note(
        b"Xen\0",
        XEN_ELFNOTE_PHYS32_ENTRY,
        &entry.to_le_bytes(),
    ));
    notes
}

/// An ELF64 x86-64 executable: a PT_NOTE segment with `notes`, and one
/// PT_LOAD of `data` at `paddr` (vaddr in the higher half) with `memsz`.
fn elf64(notes: &[u8], paddr: u64, data: &[u8], memsz: u64) -> Vec<u8> {
    let ehsize = 64u64;
    let phentsize = 56u64;
    let phoff = ehsize;
    let notes_off = phoff + 2 * phentsize;
    let data_off = (notes_off + notes.len() as u64).next_multiple_of(16);
    let mut v = Vec::new();
    v.extend_from_slice(&[0x7F, b'E', b'L', b'F', 2, 1, 1, 0]);
    v.extend_from_slice(&[0; 8]);
    push16(&mut v, 2); // ET_EXEC
    push16(&mut v, EM_X86_64);
    push32(&mut v, 1);
    push64(&mut v, 0xFFFF_FFFF_8100_0000); // e_entry: the 64-bit one, unused
    push64(&mut v, phoff);
    push64(&mut v, 0); // e_shoff
    push32(&mut v, 0);
    push16(&mut v, ehsize as u16);
    push16(&mut v, phentsize as u16);
    push16(&mut v, 2);
    push16(&mut v, 64);
    push16(&mut v, 0);
    push16(&mut v, 0);
    // PT_NOTE
    push32(&mut v, PT_NOTE);
    push32(&mut v, 4);
    push64(&mut v, notes_off);
    push64(&mut v, 0);
    push64(&mut v, 0);
    push64(&mut v, notes.len() as u64);
    push64(&mut v, notes.len() as u64);
    push64(&mut v, 4);
    // PT_LOAD
    push32(&mut v, PT_LOAD);
    push32(&mut v, 7);
    push64(&mut v, data_off);
    push64(&mut v, 0xFFFF_FFFF_8000_0000 + paddr);
    push64(&mut v, paddr);
    push64(&mut v, data.len() as u64);
    push64(&mut v, memsz);
    push64(&mut v, 0x20_0000);
    v.extend_from_slice(notes);
    v.resize(data_off as usize, 0);
    v.extend_from_slice(data);
    v
}

fn kernel() -> Vec<u8> {
    elf64(&xen_notes(ENTRY), LOAD_ADDR, &pattern(0x1000, 1), 0x3000)
}

fn read_bytes(m: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.read(gpa, &mut b).unwrap();
    b
}

#[test]
fn loads_segments_start_info_and_memmap() {
    let m = mem();
    // Dirty the bss to see it zeroed.
    m.write(LOAD_ADDR + 0x1000, &[0xAA; 0x100]).unwrap();
    let initrd = pattern(0x4321, 9);
    let cmdline = "console=ttyS0 earlyprintk=serial";
    let boot = load_pvh(&m, &kernel(), Some(&initrd), cmdline).unwrap();
    assert_eq!(boot.entry, ENTRY as u32);
    assert_eq!(boot.start_info, START_INFO_ADDR);
    assert_eq!(
        (boot.image_start, boot.image_end),
        (LOAD_ADDR, LOAD_ADDR + 0x3000)
    );
    assert_eq!(read_bytes(&m, LOAD_ADDR, 0x1000), pattern(0x1000, 1));
    assert_eq!(read_bytes(&m, LOAD_ADDR + 0x1000, 0x100), vec![0; 0x100]);

    let si = START_INFO_ADDR;
    assert_eq!(m.read_u32(si).unwrap(), 0x336E_C578);
    assert_eq!(m.read_u32(si + 4).unwrap(), 1);
    assert_eq!(m.read_u32(si + 8).unwrap(), 0);
    assert_eq!(m.read_u32(si + 0x0C).unwrap(), 1);
    let modlist = m.read_u64(si + 0x10).unwrap();
    let cmd = m.read_u64(si + 0x18).unwrap();
    assert_eq!(m.read_u64(si + 0x20).unwrap(), 0);
    let memmap = m.read_u64(si + 0x28).unwrap();
    let entries = m.read_u32(si + 0x30).unwrap();

    assert_eq!(
        read_bytes(&m, cmd, cmdline.len() + 1),
        [cmdline.as_bytes(), &[0]].concat()
    );
    let rd = m.read_u64(modlist).unwrap();
    assert_eq!(m.read_u64(modlist + 8).unwrap(), initrd.len() as u64);
    assert_eq!(m.read_u64(modlist + 16).unwrap(), 0);
    assert_eq!(rd % 4096, 0);
    assert!(rd >= boot.image_end);
    assert_eq!(rd, (RAM - initrd.len() as u64) & !0xFFF);
    assert_eq!(read_bytes(&m, rd, initrd.len()), initrd);
    assert_eq!(boot.initrd, Some((rd, initrd.len() as u64)));

    let map = e820_map(&m);
    assert_eq!(entries as usize, map.len());
    assert_eq!(boot.memmap_entries, entries);
    for (i, e) in map.iter().enumerate() {
        let at = memmap + 24 * i as u64;
        assert_eq!(m.read_u64(at).unwrap(), e.addr);
        assert_eq!(m.read_u64(at + 8).unwrap(), e.len);
        assert_eq!(m.read_u32(at + 16).unwrap(), e.kind.type_code());
        assert_eq!(m.read_u32(at + 20).unwrap(), 0);
    }
}

#[test]
fn no_initrd_means_no_modules() {
    let m = mem();
    let boot = load_pvh(&m, &kernel(), None, "").unwrap();
    assert_eq!(boot.initrd, None);
    assert_eq!(m.read_u32(START_INFO_ADDR + 0x0C).unwrap(), 0);
    assert_eq!(m.read_u64(START_INFO_ADDR + 0x10).unwrap(), 0);
    assert_eq!(m.read_u8(CMDLINE_ADDR).unwrap(), 0);
}

#[test]
fn four_byte_entry_descriptor_is_accepted() {
    let m = mem();
    let notes = note(
        b"Xen\0",
        XEN_ELFNOTE_PHYS32_ENTRY,
        &(ENTRY as u32).to_le_bytes(),
    );
    let img = elf64(&notes, LOAD_ADDR, &[0x90; 0x100], 0x100);
    assert_eq!(load_pvh(&m, &img, None, "").unwrap().entry, ENTRY as u32);
}

#[test]
fn entry_state_is_32_bit_protected_mode() {
    let m = mem();
    let boot = load_pvh(&m, &kernel(), None, "").unwrap();
    let s = pvh_entry_state(&boot, &m).unwrap();
    assert_eq!(s.regs.rip, ENTRY);
    assert_eq!(s.regs.rbx, START_INFO_ADDR);
    assert_eq!(s.regs.rflags & (rflags::IF | rflags::TF | rflags::VM), 0);
    assert_eq!(s.sregs.cr0, cr0::PE | cr0::ET);
    assert_eq!((s.sregs.cr4, s.sregs.efer), (0, 0));
    assert_eq!(s.sregs.mode_name(), "32-bit protected mode");
    assert_eq!(s.sregs.cs.selector, CODE_SELECTOR);
    assert_eq!((s.sregs.cs.base, s.sregs.cs.limit), (0, 0xFFFF_FFFF));
    for seg in [s.sregs.ds, s.sregs.es, s.sregs.ss] {
        assert_eq!(
            (seg.selector, seg.type_, seg.limit),
            (DATA_SELECTOR, 3, 0xFFFF_FFFF)
        );
    }
    assert_eq!(
        (
            s.sregs.tr.selector,
            s.sregs.tr.base,
            s.sregs.tr.limit,
            s.sregs.tr.type_
        ),
        (TSS_SELECTOR, 0, 0x67, 0xb)
    );
    // The GDT in memory matches the caches.
    let gdt = read_bytes(&m, s.sregs.gdt.base, usize::from(s.sregs.gdt.limit) + 1);
    let desc = |sel: u16| {
        let at = usize::from(sel);
        u64::from_le_bytes(gdt[at..at + 8].try_into().unwrap())
    };
    assert_eq!(desc(CODE_SELECTOR), 0x00CF_9B00_0000_FFFF);
    assert_eq!(desc(DATA_SELECTOR), 0x00CF_9300_0000_FFFF);
    assert_eq!((desc(TSS_SELECTOR) >> 40) & 0xF, 0xB);
    assert_eq!(s.sregs.idt.limit, 0);
}

#[test]
fn errors() {
    let m = mem();
    assert_eq!(load_pvh(&m, b"MZ\0\0", None, ""), Err(PvhError::NotElf));
    assert_eq!(load_pvh(&m, &[], None, ""), Err(PvhError::NotElf));
    // No PVH note (only a GUEST_OS note).
    let img = elf64(&note(b"Xen\0", 6, b"linux\0"), LOAD_ADDR, &[0; 16], 16);
    assert_eq!(load_pvh(&m, &img, None, ""), Err(PvhError::NoPvhNote));
    // Entry outside the loaded segment, or above 4 GiB.
    let img = elf64(&xen_notes(0x200_0000), LOAD_ADDR, &[0; 16], 16);
    assert_eq!(
        load_pvh(&m, &img, None, ""),
        Err(PvhError::EntryOutOfRange(0x200_0000))
    );
    let img = elf64(&xen_notes(1 << 32), LOAD_ADDR, &[0; 16], 16);
    assert_eq!(
        load_pvh(&m, &img, None, ""),
        Err(PvhError::EntryOutOfRange(1 << 32))
    );
    // Segment outside RAM / over the loader's data.
    let img = elf64(&xen_notes(RAM - 8), RAM - 8, &[0; 16], 16);
    assert!(matches!(
        load_pvh(&m, &img, None, ""),
        Err(PvhError::SegmentOutsideRam { index: 1, .. })
    ));
    let img = elf64(&xen_notes(0x7010), 0x7000, &[0; 16], 16);
    assert!(matches!(
        load_pvh(&m, &img, None, ""),
        Err(PvhError::SegmentOverlapsBootData { .. })
    ));
    // Bad descriptor size.
    let img = elf64(
        &note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 2]),
        LOAD_ADDR,
        &[0; 16],
        16,
    );
    assert_eq!(load_pvh(&m, &img, None, ""), Err(PvhError::BadPvhNote(2)));
    // Truncated file.
    let img = kernel();
    assert!(matches!(
        load_pvh(&m, &img[..img.len() - 1], None, ""),
        Err(PvhError::Truncated { .. })
    ));
    // Initrd too big, command line too long or with a NUL.
    let big = vec![0u8; 63 * MIB as usize];
    assert!(matches!(
        load_pvh(&m, &kernel(), Some(&big), ""),
        Err(PvhError::InitrdTooLarge { .. })
    ));
    assert!(matches!(
        load_pvh(&m, &kernel(), None, &"x".repeat(0x80000)),
        Err(PvhError::CmdlineTooLong { .. })
    ));
    assert_eq!(
        load_pvh(&m, &kernel(), None, "a\0"),
        Err(PvhError::CmdlineHasNul)
    );
    // Nothing was written by any failed load.
    assert_eq!(read_bytes(&m, LOAD_ADDR, 16), vec![0; 16]);
    assert_eq!(m.read_u32(START_INFO_ADDR).unwrap(), 0);
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
    let m = GuestMemory::new(32 * MIB).unwrap();
    let base = kernel();
    let interesting = [0u64, 1, 4, 8, 18, 0x7000, 0x100_0000, 0xFFFF_FFFF, u64::MAX];
    let initrd = pattern(0x800, 3);
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    let (mut ok, mut failed) = (0usize, 0usize);
    for _ in 0..10_000 {
        let mut img = base.clone();
        for _ in 0..1 + rng.below(3) {
            // Mostly mutate the headers and notes (the first 0x140 bytes).
            let at = rng.below(0x140.min(img.len()));
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let v = if rng.below(2) == 0 {
                interesting[rng.below(interesting.len())]
            } else {
                rng.next()
            };
            let end = (at + width).min(img.len());
            img[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
        }
        if rng.below(5) == 0 {
            let len = rng.below(img.len() + 1);
            img.truncate(len);
        }
        let rd = (rng.below(2) == 0).then_some(&initrd[..]);
        match load_pvh(&m, &img, rd, "fuzz") {
            Ok(boot) => {
                ok += 1;
                assert!(boot.image_start < boot.image_end && boot.image_end <= 32 * MIB);
                assert!(u64::from(boot.entry) >= boot.image_start);
                assert!(u64::from(boot.entry) < boot.image_end);
                let s = pvh_entry_state(&boot, &m).unwrap();
                assert_eq!(s.regs.rbx, START_INFO_ADDR);
            }
            Err(e) => {
                failed += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    assert!(ok > 100 && failed > 100, "ok {ok}, failed {failed}");
}

/// A real vmlinux, if one was extracted to /tmp (not part of the
/// repository): the LZ4 payload of a Debian cloud kernel's bzImage
/// (`payload_offset`/`payload_length`), decompressed with `lz4 -d`.
#[test]
fn real_vmlinux_if_present() {
    let Ok(image) = std::fs::read("/tmp/kpkg/vmlinux") else {
        println!("SKIP real_vmlinux_if_present: no /tmp/kpkg/vmlinux");
        return;
    };
    let m = GuestMemory::new(256 * MIB).unwrap();
    let initrd = pattern(0x10_0000, 4);
    let boot = load_pvh(&m, &image, Some(&initrd), "console=ttyS0").unwrap();
    println!("{boot:x?}");
    assert!(u64::from(boot.entry) >= boot.image_start && u64::from(boot.entry) < boot.image_end);
    let (rd, _) = boot.initrd.unwrap();
    assert!(rd >= boot.image_end);
    let s = pvh_entry_state(&boot, &m).unwrap();
    assert_eq!(s.regs.rip, u64::from(boot.entry));
}
