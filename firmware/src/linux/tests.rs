//! bzImage loader tests. The kernels are synthetic: a zeroed setup area with
//! a hand-written setup header, followed by a payload of known bytes.

use super::*;
use crate::e820::usable_entry_containing;
use tandem_core::paging::translate;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const SETUP_SECTS: u8 = 4;
const PAYLOAD_LEN: usize = 0x3000;
const INIT_SIZE: u32 = 0x80_0000;

fn mem() -> GuestMemory {
    GuestMemory::new(RAM).unwrap()
}

fn put16(v: &mut [u8], at: usize, x: u16) {
    v[at..at + 2].copy_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut [u8], at: usize, x: u32) {
    v[at..at + 4].copy_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut [u8], at: usize, x: u64) {
    v[at..at + 8].copy_from_slice(&x.to_le_bytes());
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A protocol 2.15 bzImage: 4 setup sectors, relocatable, 2 MiB aligned,
/// preferring 16 MiB, 64-bit capable.
fn bzimage() -> Vec<u8> {
    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    let mut img = vec![0u8; setup_len];
    img[offsets::SETUP_SECTS] = SETUP_SECTS;
    put32(&mut img, offsets::SYSSIZE, (PAYLOAD_LEN / 16) as u32);
    put16(&mut img, offsets::BOOT_FLAG, BOOT_FLAG);
    // jmp short over the header: header ends at 0x202 + 0x6A = 0x26C.
    img[offsets::JUMP] = 0xEB;
    img[offsets::JUMP + 1] = 0x6A;
    put32(&mut img, offsets::HEADER, HDRS_MAGIC);
    put16(&mut img, offsets::VERSION, 0x020F);
    img[offsets::LOADFLAGS] = loadflags::LOADED_HIGH;
    put32(&mut img, offsets::CODE32_START, 0x10_0000);
    put32(&mut img, offsets::INITRD_ADDR_MAX, 0x7FFF_FFFF);
    put32(&mut img, offsets::KERNEL_ALIGNMENT, 0x20_0000);
    img[offsets::RELOCATABLE_KERNEL] = 1;
    put16(&mut img, offsets::XLOADFLAGS, xloadflags::XLF_KERNEL_64);
    put32(&mut img, offsets::CMDLINE_SIZE, 2048);
    put64(&mut img, offsets::PREF_ADDRESS, 0x100_0000);
    put32(&mut img, offsets::INIT_SIZE, INIT_SIZE);
    // Junk in fields the loader owns; it must not reach boot_params.
    put64(&mut img, offsets::SETUP_DATA, 0xDEAD_BEEF);
    put32(&mut img, offsets::HARDWARE_SUBARCH, 7);
    img.extend(pattern(PAYLOAD_LEN, 7));
    img
}

fn read_bytes(m: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.read(gpa, &mut b).unwrap();
    b
}

#[test]
fn loads_kernel_initrd_and_cmdline() {
    let m = mem();
    let img = bzimage();
    let initrd = pattern(0x5123, 99);
    let cmdline = "console=ttyS0 root=/dev/ram0";
    let boot = load_bzimage(&m, &img, Some(&initrd), cmdline).unwrap();

    assert_eq!(boot.load_addr, 0x100_0000);
    assert_eq!(boot.entry_64, 0x100_0200);
    assert_eq!(boot.boot_params, BOOT_PARAMS_ADDR);
    assert_eq!(boot.kernel_size, PAYLOAD_LEN as u64);
    assert_eq!(boot.kernel_end, 0x100_0000 + u64::from(INIT_SIZE));
    assert_eq!(boot.protocol_version, 0x020F);
    assert_eq!(
        read_bytes(&m, boot.load_addr, PAYLOAD_LEN),
        pattern(PAYLOAD_LEN, 7)
    );

    let bp = read_bytes(&m, BOOT_PARAMS_ADDR, BOOT_PARAMS_SIZE as usize);
    // Setup header copied (apart from the fields the loader fills in).
    assert_eq!(bp[offsets::SETUP_SECTS], SETUP_SECTS);
    assert_eq!(le16(&bp, offsets::BOOT_FLAG), BOOT_FLAG);
    assert_eq!(le32(&bp, offsets::HEADER), HDRS_MAGIC);
    assert_eq!(le16(&bp, offsets::VERSION), 0x020F);
    assert_eq!(le32(&bp, offsets::INIT_SIZE), INIT_SIZE);
    assert_eq!(le64(&bp, offsets::PREF_ADDRESS), 0x100_0000);
    assert_eq!(bp[offsets::TYPE_OF_LOADER], 0xFF);
    assert_eq!(le64(&bp, offsets::SETUP_DATA), 0);
    assert_eq!(le32(&bp, offsets::HARDWARE_SUBARCH), 0);
    assert_eq!(
        bp[offsets::LOADFLAGS],
        loadflags::LOADED_HIGH | loadflags::CAN_USE_HEAP
    );
    assert_eq!(le16(&bp, offsets::HEAP_END_PTR), HEAP_END_PTR);
    // Nothing outside the header was taken from the image.
    assert!(bp[..offsets::EXT_RAMDISK_IMAGE].iter().all(|&b| b == 0));

    // Command line.
    let cmd_ptr = u64::from(le32(&bp, offsets::CMD_LINE_PTR));
    assert_eq!(cmd_ptr, CMDLINE_ADDR);
    assert_eq!(
        read_bytes(&m, cmd_ptr, cmdline.len() + 1),
        [cmdline.as_bytes(), &[0]].concat()
    );

    // Initrd: page aligned, as high as possible, above the kernel.
    let rd = u64::from(le32(&bp, offsets::RAMDISK_IMAGE));
    let rd_size = u64::from(le32(&bp, offsets::RAMDISK_SIZE));
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(rd % 4096, 0);
    assert_eq!(rd, (RAM - initrd.len() as u64) & !0xFFF);
    assert!(rd >= boot.kernel_end);
    assert_eq!(boot.initrd, Some((rd, rd_size)));
    assert_eq!(read_bytes(&m, rd, initrd.len()), initrd);
    assert_eq!(le32(&bp, offsets::EXT_RAMDISK_IMAGE), 0);

    // e820.
    let map = e820_map(&m);
    assert_eq!(usize::from(bp[offsets::E820_ENTRIES]), map.len());
    for (i, e) in map.iter().enumerate() {
        let at = offsets::E820_TABLE + i * 20;
        assert_eq!(bp[at..at + 20], e.to_bytes(), "entry {i}");
    }
}

#[test]
fn entry_state_is_the_64_bit_protocol() {
    let m = mem();
    let initrd = pattern(0x2000, 3);
    let cmdline = "quiet";
    let boot = load_bzimage(&m, &bzimage(), Some(&initrd), cmdline).unwrap();
    let s = linux_entry_state(&boot, &m).unwrap();
    assert_eq!(s.regs.rip, boot.load_addr + 0x200);
    assert_eq!(s.regs.rsi, BOOT_PARAMS_ADDR);
    assert_eq!(s.regs.rflags & rflags::IF, 0);
    assert_eq!(s.sregs.cs.selector, 0x10);
    assert!(s.sregs.cs.l && !s.sregs.cs.db);
    for seg in [s.sregs.ds, s.sregs.es, s.sregs.ss] {
        assert_eq!(seg.selector, 0x18);
        assert_eq!((seg.base, seg.limit, seg.type_), (0, 0xFFFF_FFFF, 3));
    }
    assert_eq!(s.sregs.mode_name(), "64-bit mode");
    assert_eq!(s.sregs.cr0, cr0::PE | cr0::ET | cr0::NE | cr0::PG);
    assert_eq!(s.sregs.cr4, cr4::PAE);
    assert_eq!(s.sregs.efer, efer::LME | efer::LMA);
    assert_eq!(s.sregs.efer & efer::SCE, 0);
    assert_eq!((s.sregs.tr.selector, s.sregs.tr.type_), (0x20, 0xb));
    assert!(s.sregs.tr.present && !s.sregs.tr.s);
    assert_eq!(s.sregs.idt.limit, 0);

    // The GDT in memory matches the descriptor caches.
    let gdt = read_bytes(&m, s.sregs.gdt.base, usize::from(s.sregs.gdt.limit) + 1);
    assert_eq!(le64(&gdt, 0x10), 0x00AF_9B00_0000_FFFF);
    assert_eq!(le64(&gdt, 0x18), 0x00CF_9300_0000_FFFF);
    assert_eq!((le64(&gdt, 0x20) >> 40) & 0xF, 0xB);

    // Identity mapping of everything the kernel touches first.
    let (rd, rd_size) = boot.initrd.unwrap();
    for la in [
        boot.load_addr,
        boot.entry_64,
        boot.kernel_end - 1,
        BOOT_PARAMS_ADDR,
        BOOT_PARAMS_ADDR + 0xFFF,
        CMDLINE_ADDR,
        rd,
        rd + rd_size - 1,
        0xFFFF_F000,
    ] {
        assert_eq!(translate(&m, &s.sregs, la), Some(la), "{la:#x}");
    }
    assert_eq!(translate(&m, &s.sregs, FOUR_GIB), None);

    // Page tables did not overwrite boot_params or the command line.
    assert_eq!(
        read_bytes(&m, CMDLINE_ADDR, 6),
        [cmdline.as_bytes(), &[0]].concat()
    );
    let bp = read_bytes(&m, BOOT_PARAMS_ADDR, 0x1000);
    assert_eq!(le32(&bp, offsets::HEADER), HDRS_MAGIC);
    let map = e820_map(&m);
    assert!(usable_entry_containing(&map, PAGE_TABLES_ADDR, PAGE_TABLES_SIZE).is_some());
}

#[test]
fn falls_back_to_aligned_1mib_when_pref_address_does_not_fit() {
    // 16 MiB of RAM: pref_address 16 MiB is past the end.
    let m = GuestMemory::new(16 * MIB).unwrap();
    let boot = load_bzimage(&m, &bzimage(), None, "").unwrap();
    assert_eq!(boot.load_addr, 0x20_0000);
    assert_eq!(boot.initrd, None);
    assert_eq!(
        read_bytes(&m, 0x20_0000, PAYLOAD_LEN),
        pattern(PAYLOAD_LEN, 7)
    );
    let bp = read_bytes(&m, BOOT_PARAMS_ADDR, 0x1000);
    assert_eq!(le32(&bp, offsets::RAMDISK_IMAGE), 0);
    assert_eq!(le32(&bp, offsets::CODE32_START), 0x20_0000);
}

#[test]
fn non_relocatable_kernel_loads_at_1mib() {
    let m = mem();
    let mut img = bzimage();
    img[offsets::RELOCATABLE_KERNEL] = 0;
    let boot = load_bzimage(&m, &img, Some(&[1, 2, 3]), "").unwrap();
    assert_eq!(boot.load_addr, 0x10_0000);
    // It moves itself to pref_address and needs init_size there.
    assert_eq!(boot.kernel_end, 0x100_0000 + u64::from(INIT_SIZE));
    assert!(boot.initrd.unwrap().0 >= boot.kernel_end);
}

#[test]
fn setup_sects_zero_means_four() {
    let m = mem();
    let mut img = bzimage();
    img[offsets::SETUP_SECTS] = 0;
    let boot = load_bzimage(&m, &img, None, "").unwrap();
    assert_eq!(boot.kernel_size, PAYLOAD_LEN as u64);
    assert_eq!(read_bytes(&m, boot.load_addr, 16), pattern(16, 7));
}

#[test]
fn initrd_respects_initrd_addr_max() {
    let m = mem();
    let mut img = bzimage();
    put32(&mut img, offsets::INITRD_ADDR_MAX, 0x1FF_FFFF);
    let boot = load_bzimage(&m, &img, Some(&pattern(0x1800, 1)), "").unwrap();
    assert_eq!(boot.initrd, Some((0x200_0000 - 0x2000, 0x1800)));
}

#[test]
fn refuses_what_is_not_a_bzimage() {
    let m = mem();
    assert_eq!(
        load_bzimage(&m, &[0u8; 4096], None, ""),
        Err(LinuxError::NotBzImage)
    );
    assert_eq!(load_bzimage(&m, &[], None, ""), Err(LinuxError::NotBzImage));
    let mut img = bzimage();
    put32(&mut img, offsets::HEADER, 0x5372_6447);
    assert_eq!(
        load_bzimage(&m, &img, None, ""),
        Err(LinuxError::NotBzImage)
    );
    let mut img = bzimage();
    put16(&mut img, offsets::BOOT_FLAG, 0);
    assert_eq!(
        load_bzimage(&m, &img, None, ""),
        Err(LinuxError::NotBzImage)
    );
}

#[test]
fn refuses_old_protocol_naming_the_version() {
    let m = mem();
    let mut img = bzimage();
    put16(&mut img, offsets::VERSION, 0x0205);
    let err = load_bzimage(&m, &img, None, "").unwrap_err();
    assert_eq!(err, LinuxError::UnsupportedVersion(0x0205));
    assert!(err.to_string().contains("2.05"), "{err}");
    // 2.06..2.11 have no xloadflags, so no 64-bit entry.
    put16(&mut img, offsets::VERSION, 0x020B);
    assert_eq!(
        load_bzimage(&m, &img, None, ""),
        Err(LinuxError::NotKernel64)
    );
}

#[test]
fn refuses_kernel_without_64_bit_entry_or_loaded_high() {
    let m = mem();
    let mut img = bzimage();
    put16(&mut img, offsets::XLOADFLAGS, 0);
    assert_eq!(
        load_bzimage(&m, &img, None, ""),
        Err(LinuxError::NotKernel64)
    );
    let mut img = bzimage();
    img[offsets::LOADFLAGS] = 0;
    assert_eq!(
        load_bzimage(&m, &img, None, ""),
        Err(LinuxError::NotLoadedHigh)
    );
}

#[test]
fn refuses_truncated_images_without_writing() {
    let m = mem();
    let img = bzimage();
    let setup_len = (usize::from(SETUP_SECTS) + 1) * 512;
    for len in [0x220, 0x400, setup_len, setup_len + 1, img.len() - 1] {
        let err = load_bzimage(&m, &img[..len], None, "x").unwrap_err();
        assert!(
            matches!(err, LinuxError::Truncated { .. }),
            "len {len:#x}: {err}"
        );
    }
    // Header claiming to run past the file.
    let mut short = img[..0x210].to_vec();
    short[offsets::JUMP + 1] = 0x7F;
    assert!(matches!(
        load_bzimage(&m, &short, None, ""),
        Err(LinuxError::Truncated { .. })
    ));
    assert_eq!(read_bytes(&m, 0, 0x100), vec![0u8; 0x100]);
    assert_eq!(read_bytes(&m, BOOT_PARAMS_ADDR, 0x300), vec![0u8; 0x300]);
    assert_eq!(read_bytes(&m, 0x100_0000, 16), vec![0u8; 16]);
}

#[test]
fn refuses_initrd_too_big_for_ram() {
    let m = mem();
    let initrd = vec![0u8; 48 * MIB as usize];
    let err = load_bzimage(&m, &bzimage(), Some(&initrd), "").unwrap_err();
    assert!(
        matches!(err, LinuxError::InitrdTooLarge { size, .. } if size == 48 * MIB),
        "{err}"
    );
    assert_eq!(read_bytes(&m, 0x100_0000, 16), vec![0u8; 16]);
}

#[test]
fn refuses_kernel_too_big_for_ram() {
    let m = GuestMemory::new(4 * MIB).unwrap();
    let err = load_bzimage(&m, &bzimage(), None, "").unwrap_err();
    assert_eq!(
        err,
        LinuxError::KernelTooLarge {
            needed: u64::from(INIT_SIZE)
        }
    );
}

#[test]
fn refuses_long_or_nul_command_lines() {
    let m = mem();
    let long = "a".repeat(2049);
    assert_eq!(
        load_bzimage(&m, &bzimage(), None, &long),
        Err(LinuxError::CmdlineTooLong {
            len: 2049,
            max: 2048
        })
    );
    assert!(load_bzimage(&m, &bzimage(), None, &long[..2048]).is_ok());
    assert_eq!(
        load_bzimage(&m, &bzimage(), None, "a\0b"),
        Err(LinuxError::CmdlineHasNul)
    );
}

#[test]
fn refuses_bad_kernel_alignment() {
    let m = mem();
    let mut img = bzimage();
    put32(&mut img, offsets::KERNEL_ALIGNMENT, 0x30_0000);
    assert!(matches!(
        load_bzimage(&m, &img, None, ""),
        Err(LinuxError::BadHeader(_))
    ));
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
fn fuzz_mutated_headers_never_panic() {
    let m = GuestMemory::new(32 * MIB).unwrap();
    let base = bzimage();
    let fields: [(usize, usize); 14] = [
        (offsets::SETUP_SECTS, 1),
        (offsets::SYSSIZE, 4),
        (offsets::JUMP + 1, 1),
        (offsets::VERSION, 2),
        (offsets::LOADFLAGS, 1),
        (offsets::INITRD_ADDR_MAX, 4),
        (offsets::KERNEL_ALIGNMENT, 4),
        (offsets::RELOCATABLE_KERNEL, 1),
        (offsets::XLOADFLAGS, 2),
        (offsets::CMDLINE_SIZE, 4),
        (offsets::PREF_ADDRESS, 8),
        (offsets::PREF_ADDRESS + 4, 4),
        (offsets::INIT_SIZE, 4),
        (offsets::HEADER, 4),
    ];
    let interesting = [
        0u64,
        1,
        0xFF,
        0x1000,
        0x20_0000,
        0x100_0000,
        0x1FF_FFFF,
        0x7FFF_FFFF,
        0xFFFF_F000,
        0xFFFF_FFFF,
        u64::MAX,
    ];
    let initrd = pattern(0x1234, 5);
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let (mut ok, mut failed) = (0usize, 0usize);
    for _ in 0..5_000 {
        let mut img = base.clone();
        for _ in 0..1 + rng.below(4) {
            let (at, width) = fields[rng.below(fields.len())];
            let v = if rng.below(2) == 0 {
                interesting[rng.below(interesting.len())]
            } else {
                rng.next()
            };
            img[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
        }
        if rng.below(4) == 0 {
            let len = rng.below(img.len() + 1);
            img.truncate(len);
        }
        if rng.below(8) == 0 {
            let at = rng.below(img.len());
            if let Some(b) = img.get_mut(at) {
                *b = rng.next() as u8;
            }
        }
        let rd = (rng.below(2) == 0).then_some(&initrd[..]);
        let cmdline = "x".repeat(rng.below(3000));
        match load_bzimage(&m, &img, rd, &cmdline) {
            Ok(boot) => {
                ok += 1;
                assert_eq!(boot.entry_64, boot.load_addr + 0x200);
                assert!(boot.load_addr >= HIGH_MEMORY_START);
                assert!(boot.kernel_end <= 32 * MIB);
                if let Some((rd, size)) = boot.initrd {
                    assert!(rd >= boot.kernel_end && rd + size <= 32 * MIB);
                }
                let s = linux_entry_state(&boot, &m).unwrap();
                assert_eq!(translate(&m, &s.sregs, boot.entry_64), Some(boot.entry_64));
            }
            Err(e) => {
                failed += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    // Both outcomes were exercised.
    assert!(ok > 100 && failed > 100, "ok {ok}, failed {failed}");
}

/// A real kernel, if one was extracted to /tmp (not part of the repository):
/// `apt-get download linux-image-<version>-cloud-amd64`, `dpkg-deb -x`.
#[test]
fn real_kernel_if_present() {
    let dir = std::path::Path::new("/tmp/kpkg/ext/boot");
    let path = std::fs::read_dir(dir).ok().and_then(|entries| {
        entries.filter_map(Result::ok).map(|e| e.path()).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
    });
    let Some(path) = path else {
        println!("SKIP real_kernel_if_present: no /tmp/kpkg/ext/boot/vmlinuz-*");
        return;
    };
    let image = std::fs::read(&path).unwrap();
    let m = GuestMemory::new(256 * MIB).unwrap();
    let initrd = pattern(0x10_0000, 9);
    let boot = load_bzimage(&m, &image, Some(&initrd), "console=ttyS0").unwrap();
    println!("{}: {boot:x?}", path.display());
    assert!(boot.protocol_version >= 0x020C);
    assert_eq!(boot.load_addr % 0x20_0000, 0);
    let setup_len = (usize::from(match image[0x1F1] {
        0 => 4,
        n => n,
    }) + 1)
        * 512;
    assert_eq!(
        read_bytes(&m, boot.load_addr, 4096),
        image[setup_len..setup_len + 4096]
    );
    let (rd, _) = boot.initrd.unwrap();
    assert!(rd >= boot.kernel_end);
    let s = linux_entry_state(&boot, &m).unwrap();
    assert_eq!(translate(&m, &s.sregs, boot.entry_64), Some(boot.entry_64));
}
