//! `tandem run --kernel`: a synthetic bzImage whose 64-bit entry checks
//! that RSI points at boot_params (the "HdrS" magic of the copied setup
//! header, the command line pointer) and exits through port 0xF4, on both
//! processors. Real kernels are the Linux-boot issue's tests.

use tandem_tests::{kvm_or_skip, run_tandem};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn bzimage() -> Vec<u8> {
    let setup_sects = 4usize;
    let mut img = vec![0u8; (setup_sects + 1) * 512];
    img[0x1F1] = setup_sects as u8;
    img[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    img[0x200] = 0xEB;
    img[0x201] = 0x66; // header ends at 0x268
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020Fu16.to_le_bytes());
    img[0x211] = 1; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    img[0x22C..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
    img[0x234] = 1; // relocatable
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    img[0x238..0x23C].copy_from_slice(&2048u32.to_le_bytes());
    img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    img[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
    // The protected-mode kernel: 0x200 bytes of 32-bit entry we never use,
    // then the 64-bit entry.
    let mut kernel = vec![0xF4u8; 0x200];
    kernel.extend_from_slice(&[
        0x81, 0xBE, 0x02, 0x02, 0x00, 0x00, 0x48, 0x64, 0x72,
        0x53, // cmp dword [rsi+0x202], 'HdrS'
        0x75, 0x0F, // jne bad
        0x83, 0xBE, 0x28, 0x02, 0x00, 0x00, 0x00, // cmp dword [rsi+0x228], 0
        0x74, 0x08, // je bad
        0xB8, 0x21, 0x00, 0x00, 0x00, // mov eax, 0x21
        0xE7, 0xF4, // out 0xf4, eax
        0xF4, // hlt
        0xB8, 0x22, 0x00, 0x00, 0x00, // bad: mov eax, 0x22
        0xE7, 0xF4, // out 0xf4, eax
        0xF4, // hlt
    ]);
    kernel.resize(0x1000, 0);
    img.extend_from_slice(&kernel);
    img
}

fn write_bzimage() -> String {
    let dir = std::env::temp_dir().join(format!("tandem-linux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("bzImage");
    std::fs::write(&p, bzimage()).unwrap();
    p.to_string_lossy().into_owned()
}

fn boot(backend: &str) {
    let k = write_bzimage();
    let r = run_tandem(
        TANDEM,
        &[
            "run",
            "--kernel",
            &k,
            "--append",
            "console=ttyS0",
            "--backend",
            backend,
        ],
    );
    assert_eq!(r.status, (0x21 << 1) | 1, "{backend}: {r:?}");
}

#[test]
fn bzimage_entry_on_the_interpreter() {
    boot("interp");
}

#[test]
fn bzimage_entry_on_kvm() {
    if kvm_or_skip("bzimage_entry_on_kvm") {
        boot("kvm");
    }
}

#[test]
fn neither_bzimage_nor_vmlinux_is_one_line() {
    let dir = std::env::temp_dir().join(format!("tandem-linux-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("notakernel");
    std::fs::write(&p, vec![0x90u8; 4096]).unwrap();
    let r = run_tandem(TANDEM, &["run", "--kernel", p.to_str().unwrap()]);
    assert_ne!(r.status, 0);
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("neither a bzImage"), "{r:?}");
    // An old boot protocol is named.
    let mut old = bzimage();
    old[0x206..0x208].copy_from_slice(&0x0205u16.to_le_bytes());
    std::fs::write(&p, old).unwrap();
    let r = run_tandem(TANDEM, &["run", "--kernel", p.to_str().unwrap()]);
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("2.05"), "{r:?}");
}
