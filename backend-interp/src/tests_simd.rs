//! SSE / MMX / x87 tests: snippets assembled with iced-x86's `code_asm`,
//! run on a long-mode state with CR4.OSFXSR / OSXMMEXCPT, checked against
//! values worked out from the SDM and, for the floating-point arithmetic,
//! against what this host's processor computes for the same operation.

use std::arch::asm;
use std::sync::Arc;

use iced_x86::code_asm::*;
use tandem_core::cpu::{cr0, cr4, efer, DescriptorTable, Segment, Sregs};
use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Vcpu, VcpuExit};

use crate::flags::{CF, OF, PF, SF, ZF};
use crate::InterpVcpu;

const CODE: u64 = 0x10000;
const HANDLERS: u64 = 0x20000;
const STACK_TOP: u64 = 0x80000;
const RSP0: u64 = 0x70000;
/// A data page for memory operands.
const DATA: u64 = 0x30000;

/// A vCPU in 64-bit mode at CPL 0 with SSE enabled (CR4.OSFXSR,
/// CR4.OSXMMEXCPT, CR0.MP and NE): identity paging of the first GiB with
/// 2 MiB... (1 GiB page), and an IDT whose vector v handler is a HLT at
/// HANDLERS + 16 * v.
fn machine() -> InterpVcpu {
    let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
    mem.write_u64(0x1000, 0x2007).unwrap();
    mem.write_u64(0x2000, 0x87).unwrap();
    let gdt: [u64; 7] = [
        0,
        0x00AF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x00CF_F200_0000_FFFF,
        0x00AF_FA00_0000_FFFF,
        0x0000_8900_5000_0067,
        0,
    ];
    for (n, d) in gdt.iter().enumerate() {
        mem.write_u64(0x3000 + 8 * n as u64, *d).unwrap();
    }
    for v in 0..256u64 {
        let h = HANDLERS + 16 * v;
        let lo = (h & 0xffff) | (8 << 16) | (0xEEu64 << 40) | ((h >> 16) & 0xffff) << 48;
        mem.write_u64(0x4000 + 16 * v, lo).unwrap();
        mem.write_u64(0x4008 + 16 * v, h >> 32).unwrap();
        mem.write_u8(h, 0xf4).unwrap();
    }
    mem.write_u64(0x5004, RSP0).unwrap();
    let mut v = InterpVcpu::new(0, mem);
    let data = Segment::flat(0x10, 3, false);
    let sregs = Sregs {
        cs: Segment::flat(8, 0xb, true),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            selector: 0x28,
            base: 0x5000,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: 0x3000,
            limit: 0x37,
        },
        idt: DescriptorTable {
            base: 0x4000,
            limit: 0xfff,
        },
        cr0: cr0::PE | cr0::PG | cr0::WP | cr0::ET | cr0::MP | cr0::NE,
        cr3: 0x1000,
        cr4: cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT,
        efer: efer::LME | efer::LMA | efer::NXE | efer::SCE,
        ..Default::default()
    };
    v.set_sregs(&sregs).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rip = CODE;
    r.rsp = STACK_TOP;
    r.rflags = 2;
    v.set_regs(&r).unwrap();
    v
}

/// A machine running `f`'s code (then HLT) at CODE.
fn with(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> InterpVcpu {
    let v = machine();
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.hlt().unwrap();
    let bytes = a.assemble(CODE).unwrap();
    v.mem.write(CODE, &bytes).unwrap();
    v
}

fn xmm(v: &mut InterpVcpu, n: usize) -> u128 {
    let f = v.get_fpu().unwrap();
    u128::from_le_bytes(f.xsave[160 + 16 * n..176 + 16 * n].try_into().unwrap())
}

fn set_xmm(v: &mut InterpVcpu, n: usize, x: u128) {
    let mut f = v.get_fpu().unwrap();
    f.xsave[160 + 16 * n..176 + 16 * n].copy_from_slice(&x.to_le_bytes());
    v.set_fpu(&f).unwrap();
}

fn mxcsr(v: &mut InterpVcpu) -> u32 {
    let f = v.get_fpu().unwrap();
    u32::from_le_bytes(f.xsave[24..28].try_into().unwrap())
}

fn set_mxcsr(v: &mut InterpVcpu, x: u32) {
    let mut f = v.get_fpu().unwrap();
    f.xsave[24..28].copy_from_slice(&x.to_le_bytes());
    v.set_fpu(&f).unwrap();
}

fn set_gpr(v: &mut InterpVcpu, f: impl FnOnce(&mut tandem_core::cpu::Regs)) {
    let mut r = v.get_regs().unwrap();
    f(&mut r);
    v.set_regs(&r).unwrap();
}

/// Runs to the HLT; returns the vector of the exception taken, if any
/// (its handler's HLT is where the run stopped).
fn run(v: &mut InterpVcpu) -> Option<u8> {
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let rip = v.get_regs().unwrap().rip;
    if (HANDLERS..HANDLERS + 0x1000).contains(&rip) {
        Some(((rip - 1 - HANDLERS) / 16) as u8)
    } else {
        None
    }
}

fn f32x4(a: [f32; 4]) -> u128 {
    a.iter()
        .enumerate()
        .fold(0, |r, (k, x)| r | (u128::from(x.to_bits()) << (32 * k)))
}

fn f64x2(a: [f64; 2]) -> u128 {
    u128::from(a[0].to_bits()) | (u128::from(a[1].to_bits()) << 64)
}

/// Deterministic xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A float bit pattern biased to the interesting classes: zeros,
    /// denormals, infinities, NaNs, values near 1 and near the limits.
    fn f64_bits(&mut self) -> u64 {
        let r = self.next();
        let sign = r & (1 << 63);
        let frac = self.next() & 0x000f_ffff_ffff_ffff;
        let exp: u64 = match r % 10 {
            0 => 0,
            1 => 0x7ff,
            2 => 1 + (r >> 8) % 3,
            3 => 0x7fe - (r >> 8) % 3,
            4 => 0x3ff + (r >> 8) % 60 - 30,
            5 => 0x3ff,
            _ => (r >> 8) % 0x7ff,
        };
        let frac = if r % 13 == 0 { frac & 0xfff } else { frac };
        sign | (exp << 52) | frac
    }

    fn f32_bits(&mut self) -> u32 {
        let r = self.next();
        let sign = (r as u32) & (1 << 31);
        let frac = (self.next() as u32) & 0x007f_ffff;
        let exp: u32 = match r % 10 {
            0 => 0,
            1 => 0xff,
            2 => 1 + ((r >> 8) % 3) as u32,
            3 => 0xfe - ((r >> 8) % 3) as u32,
            4 => 0x7f + ((r >> 8) % 40) as u32 - 20,
            5 => 0x7f,
            _ => ((r >> 8) % 0xff) as u32,
        };
        sign | (exp << 23) | frac
    }
}

// ---- moves ----

#[test]
fn aligned_and_unaligned_moves() {
    let mut v = with(|a| {
        a.movaps(xmm1, xmmword_ptr(rax))?;
        a.movdqu(xmm2, xmmword_ptr(rax + 1))?;
        a.movaps(xmmword_ptr(rbx), xmm1)?;
        a.movups(xmmword_ptr(rbx + 0x21), xmm2)?;
        a.movdqa(xmm3, xmm2)
    });
    for k in 0..32u64 {
        v.mem.write_u8(DATA + k, k as u8 + 1).unwrap();
    }
    set_gpr(&mut v, |r| {
        r.rax = DATA;
        r.rbx = DATA + 0x100;
    });
    assert_eq!(run(&mut v), None);
    let want1 = u128::from_le_bytes(core::array::from_fn(|k| k as u8 + 1));
    let want2 = u128::from_le_bytes(core::array::from_fn(|k| k as u8 + 2));
    assert_eq!(xmm(&mut v, 1), want1);
    assert_eq!(xmm(&mut v, 2), want2);
    assert_eq!(xmm(&mut v, 3), want2);
    assert_eq!(v.mem.read_u64(DATA + 0x100).unwrap(), want1 as u64);
    assert_eq!(v.mem.read_u64(DATA + 0x108).unwrap(), (want1 >> 64) as u64);
    assert_eq!(v.mem.read_u64(DATA + 0x121).unwrap(), want2 as u64);
    assert_eq!(v.mem.read_u64(DATA + 0x129).unwrap(), (want2 >> 64) as u64);
    // XSTATE_BV[1]: SSE in use.
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xsave[512] & 2, 2);
}

#[test]
fn misaligned_movaps_is_gp_and_changes_nothing() {
    let mut v = with(|a| a.movaps(xmm1, xmmword_ptr(rax)));
    set_gpr(&mut v, |r| r.rax = DATA + 8);
    set_xmm(&mut v, 1, 0x1234);
    assert_eq!(run(&mut v), Some(13));
    assert_eq!(xmm(&mut v, 1), 0x1234);
    // The frame: error code 0, then the faulting RIP.
    let top = v.get_regs().unwrap().rsp;
    assert_eq!(v.mem.read_u64(top).unwrap(), 0);
    assert_eq!(v.mem.read_u64(top + 8).unwrap(), CODE);
}

#[test]
fn ts_is_nm_em_is_ud_and_no_osfxsr_is_ud() {
    for (cr0_set, cr4_clear, want) in [(cr0::TS, 0, 7u8), (cr0::EM, 0, 6), (0, cr4::OSFXSR, 6)] {
        let mut v = with(|a| a.addps(xmm0, xmm1));
        let mut s = v.get_sregs().unwrap();
        s.cr0 |= cr0_set;
        s.cr4 &= !cr4_clear;
        v.set_sregs(&s).unwrap();
        assert_eq!(
            run(&mut v),
            Some(want),
            "cr0 {cr0_set:#x} cr4 {cr4_clear:#x}"
        );
    }
}

#[test]
fn a_fault_on_the_second_half_of_a_store_writes_nothing() {
    // The store straddles the end of the 4 MiB of RAM? No: it straddles
    // into a non-present page. Map only the first 2 MiB... use a 4 KiB
    // page table instead: PD entry 0 -> PT at 0x6000 with pages 0..0x3f
    // present except 0x31.
    let mut v = with(|a| a.movups(xmmword_ptr(rax), xmm1));
    v.mem.write_u64(0x2000, 0x7007).unwrap(); // PDPT[0] -> PD 0x7000
    v.mem.write_u64(0x7000, 0x6007).unwrap(); // PD[0] -> PT 0x6000
    for p in 0..512u64 {
        let present = if p == 0x31 { 0 } else { 7 };
        v.mem
            .write_u64(0x6000 + 8 * p, (p << 12) | present)
            .unwrap();
    }
    v.mem.write_u64(0x7008, 0x200087).unwrap(); // PD[1]: 2 MiB page
    let mut s = v.get_sregs().unwrap();
    s.cr3 = 0x1000;
    v.set_sregs(&s).unwrap();
    set_gpr(&mut v, |r| r.rax = 0x30ff8);
    set_xmm(&mut v, 1, u128::MAX);
    v.mem.write_u64(0x30ff8, 0x5555).unwrap();
    assert_eq!(run(&mut v), Some(14));
    assert_eq!(v.mem.read_u64(0x30ff8).unwrap(), 0x5555);
    assert_eq!(v.get_sregs().unwrap().cr2, 0x31000);
}

#[test]
fn scalar_moves_movd_movq_and_halves() {
    let mut v = with(|a| {
        a.movss(xmm1, dword_ptr(rax))?; // zero-extends
        a.movss(xmm2, xmm1)?; // merges
        a.movsd_2(xmm3, qword_ptr(rax))?;
        a.movd(xmm4, ebx)?;
        a.movq(rcx, xmm3)?;
        a.movq(xmm5, xmm3)?;
        a.movhps(xmm6, qword_ptr(rax))?;
        a.movlhps(xmm7, xmm3)?;
        a.movhlps(xmm8, xmm7)?;
        a.movmskps(edx, xmm9)?;
        a.pmovmskb(esi, xmm9)?;
        a.movddup(xmm10, xmm3)?;
        a.movshdup(xmm11, xmm9)
    });
    v.mem.write_u64(DATA, 0x1122_3344_5566_7788).unwrap();
    set_gpr(&mut v, |r| {
        r.rax = DATA;
        r.rbx = 0xdead_beef_cafe_f00d;
    });
    for n in 1..12 {
        set_xmm(&mut v, n, u128::MAX);
    }
    set_xmm(&mut v, 9, 0x8000_0000_0000_0000_8000_0000_0000_0000);
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 1), 0x5566_7788);
    assert_eq!(xmm(&mut v, 2), (u128::MAX << 32) | 0x5566_7788);
    assert_eq!(xmm(&mut v, 3), 0x1122_3344_5566_7788);
    assert_eq!(xmm(&mut v, 4), 0xcafe_f00d);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rcx, 0x1122_3344_5566_7788);
    assert_eq!(xmm(&mut v, 5), 0x1122_3344_5566_7788);
    assert_eq!(
        xmm(&mut v, 6),
        (0x1122_3344_5566_7788u128 << 64) | u128::from(u64::MAX)
    );
    assert_eq!(
        xmm(&mut v, 7),
        (0x1122_3344_5566_7788u128 << 64) | u128::from(u64::MAX)
    );
    assert_eq!(
        xmm(&mut v, 8),
        (u128::from(u64::MAX) << 64) | 0x1122_3344_5566_7788
    );
    assert_eq!(r.rdx, 0b1010);
    assert_eq!(r.rsi, 0x8080);
    assert_eq!(xmm(&mut v, 10), 0x1122_3344_5566_7788_1122_3344_5566_7788);
    assert_eq!(xmm(&mut v, 11), 0x8000_0000_8000_0000_8000_0000_8000_0000);
}

// ---- integer ----

#[test]
fn integer_arithmetic_saturation_and_compare() {
    let mut v = with(|a| {
        a.movdqa(xmm2, xmm0)?;
        a.paddb(xmm2, xmm1)?;
        a.movdqa(xmm3, xmm0)?;
        a.paddusb(xmm3, xmm1)?;
        a.movdqa(xmm4, xmm0)?;
        a.paddsw(xmm4, xmm1)?;
        a.movdqa(xmm5, xmm0)?;
        a.pcmpeqb(xmm5, xmm1)?;
        a.movdqa(xmm6, xmm0)?;
        a.pcmpgtd(xmm6, xmm1)?;
        a.movdqa(xmm7, xmm0)?;
        a.pminub(xmm7, xmm1)?;
        a.movdqa(xmm8, xmm0)?;
        a.psubusw(xmm8, xmm1)?;
        a.movdqa(xmm9, xmm0)?;
        a.pmulhw(xmm9, xmm1)?;
        a.movdqa(xmm10, xmm0)?;
        a.pmaddwd(xmm10, xmm1)?;
        a.movdqa(xmm11, xmm0)?;
        a.psadbw(xmm11, xmm1)?;
        a.movdqa(xmm12, xmm0)?;
        a.pxor(xmm12, xmm1)
    });
    let x0: u128 = 0x7fff_8000_0001_ffff_f0f0_0f0f_8081_7f7f;
    let x1: u128 = 0x0001_ffff_0001_0002_1010_f0f0_8081_0101;
    set_xmm(&mut v, 0, x0);
    set_xmm(&mut v, 1, x1);
    assert_eq!(run(&mut v), None);
    // Cross-check every result against the host's SSE2.
    use core::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86-64 baseline; the intrinsics only
    // compute on values.
    unsafe {
        let a = _mm_loadu_si128(&x0 as *const u128 as *const __m128i);
        let b = _mm_loadu_si128(&x1 as *const u128 as *const __m128i);
        let h = |r: __m128i| -> u128 { core::mem::transmute(r) };
        assert_eq!(xmm(&mut v, 2), h(_mm_add_epi8(a, b)));
        assert_eq!(xmm(&mut v, 3), h(_mm_adds_epu8(a, b)));
        assert_eq!(xmm(&mut v, 4), h(_mm_adds_epi16(a, b)));
        assert_eq!(xmm(&mut v, 5), h(_mm_cmpeq_epi8(a, b)));
        assert_eq!(xmm(&mut v, 6), h(_mm_cmpgt_epi32(a, b)));
        assert_eq!(xmm(&mut v, 7), h(_mm_min_epu8(a, b)));
        assert_eq!(xmm(&mut v, 8), h(_mm_subs_epu16(a, b)));
        assert_eq!(xmm(&mut v, 9), h(_mm_mulhi_epi16(a, b)));
        assert_eq!(xmm(&mut v, 10), h(_mm_madd_epi16(a, b)));
        assert_eq!(xmm(&mut v, 11), h(_mm_sad_epu8(a, b)));
        assert_eq!(xmm(&mut v, 12), x0 ^ x1);
    }
    // By hand: paddsw's top word 0x7fff + 0x0001 saturates to 0x7fff, and
    // the next 0x8000 + 0xffff (-32768 + -1) to 0x8000.
    assert_eq!(xmm(&mut v, 4) >> 96, 0x7fff_8000);
}

// ---- floating point, against the host ----

/// Defines `fn $name(a, b, mxcsr) -> (result, mxcsr after)` running
/// `$ins xmm_a, xmm_b` on this host's processor under `mxcsr`.
macro_rules! host {
    ($name:ident, $ins:literal) => {
        fn $name(a: u128, b: u128, mx: u32) -> (u128, u32) {
            use core::arch::x86_64::__m128i;
            let mut save = 0u32;
            let mut out = 0u32;
            // SAFETY: u128 and __m128i are both 16 plain bytes; the asm
            // block saves the host MXCSR, runs one SSE instruction under
            // `mx` (all exceptions masked by the callers, so it cannot
            // trap) and restores the saved MXCSR before leaving; it only
            // touches the three locals it is given.
            unsafe {
                let mut x: __m128i = core::mem::transmute::<u128, __m128i>(a);
                let y: __m128i = core::mem::transmute::<u128, __m128i>(b);
                asm!(
                    "stmxcsr [{save}]",
                    "ldmxcsr [{inp}]",
                    concat!($ins, " {x}, {y}"),
                    "stmxcsr [{out}]",
                    "ldmxcsr [{save}]",
                    save = in(reg) &mut save,
                    inp = in(reg) &mx,
                    out = in(reg) &mut out,
                    x = inout(xmm_reg) x,
                    y = in(xmm_reg) y,
                    options(nostack),
                );
                (core::mem::transmute::<__m128i, u128>(x), out)
            }
        }
    };
}

macro_rules! host_i {
    ($name:ident, $ins:literal) => {
        fn $name(a: u128, b: u128, mx: u32) -> (u128, u32) {
            use core::arch::x86_64::__m128i;
            let mut save = 0u32;
            let mut out = 0u32;
            // SAFETY: u128 and __m128i are both 16 plain bytes; the asm
            // block saves the host MXCSR, runs one SSE instruction under
            // `mx` (all exceptions masked by the callers, so it cannot
            // trap) and restores the saved MXCSR before leaving; it only
            // touches the three locals it is given.
            unsafe {
                let mut x: __m128i = core::mem::transmute::<u128, __m128i>(a);
                let y: __m128i = core::mem::transmute::<u128, __m128i>(b);
                asm!(
                    "stmxcsr [{save}]",
                    "ldmxcsr [{inp}]",
                    $ins,
                    "stmxcsr [{out}]",
                    "ldmxcsr [{save}]",
                    save = in(reg) &mut save,
                    inp = in(reg) &mx,
                    out = in(reg) &mut out,
                    x = inout(xmm_reg) x,
                    y = in(xmm_reg) y,
                    options(nostack),
                );
                (core::mem::transmute::<__m128i, u128>(x), out)
            }
        }
    };
}

host!(h_addss, "addss");
host!(h_addsd, "addsd");
host!(h_subps, "subps");
host!(h_subpd, "subpd");
host!(h_mulss, "mulss");
host!(h_mulpd, "mulpd");
host!(h_divps, "divps");
host!(h_divsd, "divsd");
host!(h_sqrtps, "sqrtps");
host!(h_sqrtsd, "sqrtsd");
host!(h_minps, "minps");
host!(h_maxsd, "maxsd");
host!(h_cmpleps, "cmpleps");
host!(h_cmpunordpd, "cmpunordpd");
host!(h_cvtsd2ss, "cvtsd2ss");
host!(h_cvtss2sd, "cvtss2sd");
host!(h_cvtps2dq, "cvtps2dq");
host!(h_cvttpd2dq, "cvttpd2dq");
host!(h_cvtdq2ps, "cvtdq2ps");
host!(h_cvtpd2ps, "cvtpd2ps");
host!(h_cvtps2pd, "cvtps2pd");
host!(h_haddps, "haddps");
host!(h_addsubpd, "addsubpd");

type HostFn = fn(u128, u128, u32) -> (u128, u32);
type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// Runs `asm` (an instruction on XMM0, XMM1) and `host` on the same
/// random operands and MXCSR (exceptions masked; random RC, DAZ, FTZ) and
/// requires the same result bits and the same MXCSR afterwards.
fn against_host(name: &str, asm: Asm, host: HostFn, doubles: bool, rounds: usize) {
    let mut v = with(asm);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
    for n in 0..rounds {
        let gen = |rng: &mut Rng| -> u128 {
            if doubles {
                u128::from(rng.f64_bits()) | (u128::from(rng.f64_bits()) << 64)
            } else {
                (0..4).fold(0, |r, k| r | (u128::from(rng.f32_bits()) << (32 * k)))
            }
        };
        let a = gen(&mut rng);
        let b = if n % 7 == 0 { a } else { gen(&mut rng) };
        let r = rng.next();
        let mx = 0x1f80
            | (((r & 3) as u32) << 13)
            | if r & 4 != 0 { 0x40 } else { 0 }
            | if r & 8 != 0 { 0x8000 } else { 0 };
        let (want, want_mx) = host(a, b, mx);
        set_gpr(&mut v, |r| r.rip = CODE);
        set_xmm(&mut v, 0, a);
        set_xmm(&mut v, 1, b);
        set_mxcsr(&mut v, mx);
        assert_eq!(run(&mut v), None);
        let got = xmm(&mut v, 0);
        let got_mx = mxcsr(&mut v);
        assert_eq!(
            (got, got_mx),
            (want, want_mx),
            "{name}: a {a:#034x} b {b:#034x} mxcsr {mx:#x}: got {got:#034x} {got_mx:#x}, host {want:#034x} {want_mx:#x}"
        );
    }
}

#[test]
fn fp_arithmetic_matches_the_host() {
    let cases: &[(&str, Asm, HostFn, bool)] = &[
        ("addss", |a| a.addss(xmm0, xmm1), h_addss, false),
        ("addsd", |a| a.addsd(xmm0, xmm1), h_addsd, true),
        ("subps", |a| a.subps(xmm0, xmm1), h_subps, false),
        ("subpd", |a| a.subpd(xmm0, xmm1), h_subpd, true),
        ("mulss", |a| a.mulss(xmm0, xmm1), h_mulss, false),
        ("mulpd", |a| a.mulpd(xmm0, xmm1), h_mulpd, true),
        ("divps", |a| a.divps(xmm0, xmm1), h_divps, false),
        ("divsd", |a| a.divsd(xmm0, xmm1), h_divsd, true),
        ("sqrtps", |a| a.sqrtps(xmm0, xmm1), h_sqrtps, false),
        ("sqrtsd", |a| a.sqrtsd(xmm0, xmm1), h_sqrtsd, true),
        ("minps", |a| a.minps(xmm0, xmm1), h_minps, false),
        ("maxsd", |a| a.maxsd(xmm0, xmm1), h_maxsd, true),
        ("cmpleps", |a| a.cmpps(xmm0, xmm1, 2), h_cmpleps, false),
        ("cmpunordpd", |a| a.cmppd(xmm0, xmm1, 3), h_cmpunordpd, true),
        ("cvtsd2ss", |a| a.cvtsd2ss(xmm0, xmm1), h_cvtsd2ss, true),
        ("cvtss2sd", |a| a.cvtss2sd(xmm0, xmm1), h_cvtss2sd, false),
        ("cvtps2dq", |a| a.cvtps2dq(xmm0, xmm1), h_cvtps2dq, false),
        ("cvttpd2dq", |a| a.cvttpd2dq(xmm0, xmm1), h_cvttpd2dq, true),
        ("cvtdq2ps", |a| a.cvtdq2ps(xmm0, xmm1), h_cvtdq2ps, false),
        ("cvtpd2ps", |a| a.cvtpd2ps(xmm0, xmm1), h_cvtpd2ps, true),
        ("cvtps2pd", |a| a.cvtps2pd(xmm0, xmm1), h_cvtps2pd, false),
        ("haddps", |a| a.haddps(xmm0, xmm1), h_haddps, false),
        ("addsubpd", |a| a.addsubpd(xmm0, xmm1), h_addsubpd, true),
        ("dpps", |a| a.dpps(xmm0, xmm1, 0xbf), h_dpps, false),
        ("dppd", |a| a.dppd(xmm0, xmm1, 0x33), h_dppd, true),
    ];
    for &(name, asm, host, doubles) in cases {
        against_host(name, asm, host, doubles, 2000);
    }
}

/// A scalar conversion keeps the destination's other lanes (a release
/// build once lost them, see `lane` in sse.rs).
#[test]
fn cvtsd2ss_keeps_the_high_lanes() {
    let mut v = with(|a| a.cvtsd2ss(xmm0, xmm1));
    set_xmm(&mut v, 0, 0xc02b8d9e0c6d0d7cffe2e689626ec27a);
    set_xmm(&mut v, 1, 0xc02b8d9e0c6d0d7cffe2e689626ec27a);
    set_mxcsr(&mut v, 0x5fc0);
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 0), 0xc02b8d9e0c6d0d7cffe2e689ff7fffff);
}

// ---- x87, against the host ----

const MASK80: u128 = (1 << 80) - 1;

/// Defines `fn $name(a, b, fcw) -> (ST(0) after, FSW)` running on this
/// host: FNINIT, FLDCW, FLD b, FLD a, `$op`, FSTP m80, FNSTSW.
macro_rules! host87 {
    ($name:ident, $op:literal) => {
        fn $name(a: u128, b: u128, cw: u16) -> (u128, u16) {
            let ab = a.to_le_bytes();
            let bb = b.to_le_bytes();
            let mut out = [0u8; 16];
            let mut sw = 0u16;
            // SAFETY: the block leaves the x87 as the ABI wants it (FNINIT:
            // empty stack, FCW 0x37F) and declares every x87 register
            // clobbered; it reads the two 10-byte operands and the control
            // word and writes the 10-byte result and the status word, all
            // locals of this function. All exceptions are masked by the
            // callers, so nothing traps.
            unsafe {
                asm!(
                    "fninit",
                    "fldcw word ptr [{cw}]",
                    "fld tbyte ptr [{b}]",
                    "fld tbyte ptr [{a}]",
                    $op,
                    "fstp tbyte ptr [{out}]",
                    "fnstsw word ptr [{sw}]",
                    "fninit",
                    cw = in(reg) &cw,
                    a = in(reg) ab.as_ptr(),
                    b = in(reg) bb.as_ptr(),
                    out = in(reg) out.as_mut_ptr(),
                    sw = in(reg) &mut sw,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                    options(nostack),
                );
            }
            (u128::from_le_bytes(out) & MASK80, sw)
        }
    };
}

host87!(x_fadd, "fadd st(0), st(1)");
host87!(x_fsub, "fsub st(0), st(1)");
host87!(x_fsubr, "fsubr st(0), st(1)");
host87!(x_fmul, "fmul st(0), st(1)");
host87!(x_fdiv, "fdiv st(0), st(1)");
host87!(x_fdivr, "fdivr st(0), st(1)");
host87!(x_fsqrt, "fsqrt");
host87!(x_frndint, "frndint");
host87!(x_fscale, "fscale");
host87!(x_fprem, "fprem");
host87!(x_fprem1, "fprem1");
host87!(x_fcom, "fcom st(1)");
host87!(x_fucom, "fucom st(1)");
host87!(x_fxam, "fxam");
host87!(x_fchs, "fchs");
host87!(x_fxch, "fxch st(1)");

type Host87 = fn(u128, u128, u16) -> (u128, u16);

impl Rng {
    /// An 80-bit operand: mostly normals, and zeros, denormals, infinities,
    /// NaNs and the unsupported encodings.
    fn f80_bits(&mut self) -> u128 {
        let r = self.next();
        let sign = u128::from(r >> 63) << 79;
        let mut sig = self.next() | (1 << 63);
        if r % 11 == 0 {
            sig &= !0xffff_ffff;
        }
        let exp: u128 = match r % 16 {
            0 => {
                sig &= !(1 << 63);
                if r & 256 != 0 {
                    sig = 0;
                }
                0
            }
            1 => {
                if r & 256 != 0 {
                    sig = 1 << 63;
                }
                0x7fff
            }
            2 => 0x3fff + u128::from((r >> 8) % 130) - 65,
            3 => 0x3fff,
            4 => u128::from((r >> 8) % 0x7fff),
            // Near double / single limits and the extended ones.
            5 => 0x3fff + 1023 + u128::from((r >> 8) % 3),
            6 => 0x3fff - 1022 - u128::from((r >> 8) % 70),
            7 => 1 + u128::from((r >> 8) % 3),
            8 => 0x7ffe,
            9 if r & 512 != 0 => {
                sig &= !(1 << 63); // unnormal
                0x3fff
            }
            _ => 0x3fff + u128::from((r >> 8) % 16) - 8,
        };
        sign | (exp << 64) | u128::from(sig)
    }
}

/// The interpreter's side of `host87`: the same sequence.
fn interp87(v: &mut InterpVcpu, a: u128, b: u128, cw: u16) -> (u128, u16) {
    v.mem.write_u16(DATA, cw).unwrap();
    v.mem.write(DATA + 0x10, &a.to_le_bytes()[..10]).unwrap();
    v.mem.write(DATA + 0x20, &b.to_le_bytes()[..10]).unwrap();
    set_gpr(v, |r| r.rip = CODE);
    assert_eq!(run(v), None);
    let mut out = [0u8; 16];
    v.mem.read(DATA + 0x30, &mut out[..10]).unwrap();
    (
        u128::from_le_bytes(out),
        v.mem.read_u16(DATA + 0x40).unwrap(),
    )
}

fn x87_against_host(name: &str, op: Asm, host: Host87, rounds: usize) {
    let mut v = with(|a| {
        a.fninit()?;
        a.fldcw(word_ptr(DATA))?;
        a.fld(tword_ptr(DATA + 0x20))?;
        a.fld(tword_ptr(DATA + 0x10))?;
        op(a)?;
        a.fstp(tword_ptr(DATA + 0x30))?;
        a.fnstsw(word_ptr(DATA + 0x40))
    });
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ (name.len() as u64 * 77));
    for n in 0..rounds {
        let a = rng.f80_bits();
        let b = if n % 9 == 0 { a } else { rng.f80_bits() };
        let r = rng.next();
        let pc = [0u16, 2, 3, 3][(r & 3) as usize];
        let cw = 0x3f | 0x40 | (pc << 8) | ((((r >> 2) & 3) as u16) << 10);
        let want = host(a, b, cw);
        let got = interp87(&mut v, a, b, cw);
        assert_eq!(
            got, want,
            "{name}: a {a:#022x} b {b:#022x} fcw {cw:#x}: got ({:#022x}, {:#06x}) host ({:#022x}, {:#06x})",
            got.0, got.1, want.0, want.1
        );
    }
}

#[test]
fn x87_arithmetic_matches_the_host() {
    let cases: &[(&str, Asm, Host87)] = &[
        ("fadd", |a| a.fadd_2(st0, st1), x_fadd),
        ("fsub", |a| a.fsub_2(st0, st1), x_fsub),
        ("fsubr", |a| a.fsubr_2(st0, st1), x_fsubr),
        ("fmul", |a| a.fmul_2(st0, st1), x_fmul),
        ("fdiv", |a| a.fdiv_2(st0, st1), x_fdiv),
        ("fdivr", |a| a.fdivr_2(st0, st1), x_fdivr),
        ("fsqrt", |a| a.fsqrt(), x_fsqrt),
        ("frndint", |a| a.frndint(), x_frndint),
        ("fscale", |a| a.fscale(), x_fscale),
        ("fprem", |a| a.fprem(), x_fprem),
        ("fprem1", |a| a.fprem1(), x_fprem1),
        ("fcom", |a| a.fcom_2(st0, st1), x_fcom),
        ("fucom", |a| a.fucom(st0, st1), x_fucom),
        ("fxam", |a| a.fxam(), x_fxam),
        ("fchs", |a| a.fchs(), x_fchs),
        ("fxch", |a| a.fxch(st0, st1), x_fxch),
    ];
    for &(name, op, host) in cases {
        x87_against_host(name, op, host, 1500);
    }
}

// ---- SIMD exceptions, flags, conversions ----

#[test]
fn unmasked_simd_exception_is_xm_or_ud_and_keeps_the_destination() {
    for (osxmmexcpt, want) in [(true, 19u8), (false, 6)] {
        let mut v = with(|a| a.divsd(xmm0, xmm1));
        if !osxmmexcpt {
            let mut s = v.get_sregs().unwrap();
            s.cr4 &= !cr4::OSXMMEXCPT;
            v.set_sregs(&s).unwrap();
        }
        set_xmm(&mut v, 0, f64x2([1.0, 5.0]));
        set_xmm(&mut v, 1, f64x2([0.0, 7.0]));
        // ZE unmasked (MXCSR bit 9 clear).
        set_mxcsr(&mut v, 0x1f80 & !(1 << 9));
        assert_eq!(run(&mut v), Some(want));
        assert_eq!(xmm(&mut v, 0), f64x2([1.0, 5.0]), "destination unchanged");
        assert_eq!(mxcsr(&mut v) & 0x3f, 0x4, "ZE set");
    }
    // Masked: infinity and the ZE flag.
    let mut v = with(|a| a.divsd(xmm0, xmm1));
    set_xmm(&mut v, 0, f64x2([-1.0, 5.0]));
    set_xmm(&mut v, 1, f64x2([0.0, 7.0]));
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 0), f64x2([f64::NEG_INFINITY, 5.0]));
    assert_eq!(mxcsr(&mut v), 0x1f84);
}

#[test]
fn comisd_and_ucomisd_flags() {
    let cases = [
        (1.0f64, 2.0f64, CF),
        (2.0, 1.0, 0),
        (3.0, 3.0, ZF),
        (f64::NAN, 1.0, ZF | PF | CF),
    ];
    for (x, y, want) in cases {
        let mut v = with(|a| a.comisd(xmm0, xmm1));
        set_xmm(&mut v, 0, f64x2([x, 0.0]));
        set_xmm(&mut v, 1, f64x2([y, 0.0]));
        set_gpr(&mut v, |r| r.rflags = 2 | OF | SF);
        assert_eq!(run(&mut v), None);
        let f = v.get_regs().unwrap().rflags;
        assert_eq!(f & (ZF | PF | CF | OF | SF), want, "comisd {x} {y}");
        // COMISD signals IE for a QNaN; UCOMISD does not.
        assert_eq!(mxcsr(&mut v) & 1, u32::from(x.is_nan()));
        let mut v = with(|a| a.ucomisd(xmm0, xmm1));
        set_xmm(&mut v, 0, f64x2([x, 0.0]));
        set_xmm(&mut v, 1, f64x2([y, 0.0]));
        assert_eq!(run(&mut v), None);
        assert_eq!(mxcsr(&mut v) & 1, 0);
    }
}

#[test]
fn integer_conversions_round_by_mxcsr_and_saturate_to_indefinite() {
    let mut v = with(|a| {
        a.cvtsd2si(rax, xmm0)?;
        a.cvttsd2si(ebx, xmm0)?;
        a.cvtsi2sd(xmm2, rcx)?;
        a.cvtsi2ss(xmm3, edx)?;
        a.cvttsd2si(esi, xmm1)
    });
    set_xmm(&mut v, 0, f64x2([-2.5, 0.0]));
    set_xmm(&mut v, 1, f64x2([3e10, 0.0]));
    set_xmm(&mut v, 2, u128::MAX);
    set_gpr(&mut v, |r| {
        r.rcx = (-3i64) as u64;
        r.rdx = 16_777_217; // 2^24 + 1: not a binary32.
    });
    assert_eq!(run(&mut v), None);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rax, (-2i64) as u64, "round to nearest even");
    assert_eq!(r.rbx, 0xffff_fffe, "truncation, 32-bit zero-extended");
    assert_eq!(r.rsi, 0x8000_0000, "out of range: integer indefinite");
    assert_eq!(
        xmm(&mut v, 2),
        (u128::MAX << 64) | u128::from((-3.0f64).to_bits())
    );
    assert_eq!(xmm(&mut v, 3) as u32, 16_777_216f32.to_bits());
    // PE from -2.5, 2^24+1 and 3e10; IE from 3e10.
    assert_eq!(mxcsr(&mut v) & 0x3f, 0x21);
}

#[test]
fn mxcsr_rounding_control_and_daz_ftz() {
    // 1 / 3 in binary32 under each RC.
    let third = [0x3eaa_aaab_u32, 0x3eaa_aaaa, 0x3eaa_aaab, 0x3eaa_aaaa];
    for (rc, want) in third.iter().enumerate() {
        let mut v = with(|a| a.divss(xmm0, xmm1));
        set_xmm(&mut v, 0, f32x4([1.0, 0.0, 0.0, 0.0]));
        set_xmm(&mut v, 1, f32x4([3.0, 0.0, 0.0, 0.0]));
        set_mxcsr(&mut v, 0x1f80 | ((rc as u32) << 13));
        assert_eq!(run(&mut v), None);
        assert_eq!(xmm(&mut v, 0) as u32, *want, "rc {rc}");
    }
    // FTZ: a tiny product becomes +0 with UE and PE.
    let mut v = with(|a| a.mulss(xmm0, xmm1));
    set_xmm(&mut v, 0, f32x4([1e-20, 0.0, 0.0, 0.0]));
    set_xmm(&mut v, 1, f32x4([1e-20, 0.0, 0.0, 0.0]));
    set_mxcsr(&mut v, 0x9f80);
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 0) as u32, 0);
    assert_eq!(mxcsr(&mut v), 0x9f80 | 0x30);
    // DAZ: a denormal source reads as zero, without DE.
    let mut v = with(|a| a.addss(xmm0, xmm1));
    set_xmm(&mut v, 0, 1);
    set_xmm(&mut v, 1, 0);
    set_mxcsr(&mut v, 0x1fc0);
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 0) as u32, 0);
    assert_eq!(mxcsr(&mut v), 0x1fc0);
    // Without DAZ the same addition is DE.
    let mut v = with(|a| a.addss(xmm0, xmm1));
    set_xmm(&mut v, 0, 1);
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 0) as u32, 1);
    assert_eq!(mxcsr(&mut v), 0x1f82);
}

// ---- more integer, shuffles, strings, CRC32 ----

#[test]
fn shuffles_shifts_and_packs_match_the_host() {
    let mut v = with(|a| {
        a.pshufd(xmm2, xmm0, 0x1b)?;
        a.movdqa(xmm3, xmm0)?;
        a.pshufb(xmm3, xmm1)?;
        a.movdqa(xmm4, xmm0)?;
        a.palignr(xmm4, xmm1, 5)?;
        a.movdqa(xmm5, xmm0)?;
        a.psraw(xmm5, 3)?;
        a.movdqa(xmm6, xmm0)?;
        a.psrldq(xmm6, 3)?;
        a.movdqa(xmm7, xmm0)?;
        a.packsswb(xmm7, xmm1)?;
        a.movdqa(xmm8, xmm0)?;
        a.punpckhbw(xmm8, xmm1)?;
        a.movdqa(xmm9, xmm0)?;
        a.pslld(xmm9, xmm10)?;
        a.movdqa(xmm11, xmm0)?;
        a.shufps(xmm11, xmm1, 0x4e)?;
        a.pmovsxbw(xmm12, xmm1)?;
        a.movdqa(xmm13, xmm0)?;
        a.packusdw(xmm13, xmm1)
    });
    let x0: u128 = 0x8899_aabb_ccdd_eeff_0011_2233_4455_6677;
    let x1: u128 = 0x0f0e_8d0c_0b0a_0908_0706_8504_0302_0100;
    set_xmm(&mut v, 0, x0);
    set_xmm(&mut v, 1, x1);
    set_xmm(&mut v, 10, 5);
    assert_eq!(run(&mut v), None);
    use core::arch::x86_64::*;
    // SAFETY: SSE2, SSSE3 and SSE4.1 are present on this host (the test
    // module's premise); the intrinsics only compute on values.
    unsafe {
        let a = _mm_loadu_si128(&x0 as *const u128 as *const __m128i);
        let b = _mm_loadu_si128(&x1 as *const u128 as *const __m128i);
        let h = |r: __m128i| -> u128 { core::mem::transmute(r) };
        assert_eq!(xmm(&mut v, 2), h(_mm_shuffle_epi32(a, 0x1b)));
        assert_eq!(xmm(&mut v, 3), h(ssse3_shuffle(a, b)));
        assert_eq!(xmm(&mut v, 4), h(ssse3_alignr5(a, b)));
        assert_eq!(xmm(&mut v, 5), h(_mm_srai_epi16(a, 3)));
        assert_eq!(xmm(&mut v, 6), h(_mm_srli_si128(a, 3)));
        assert_eq!(xmm(&mut v, 7), h(_mm_packs_epi16(a, b)));
        assert_eq!(xmm(&mut v, 8), h(_mm_unpackhi_epi8(a, b)));
        assert_eq!(xmm(&mut v, 9), h(_mm_slli_epi32(a, 5)));
        assert_eq!(xmm(&mut v, 13), h(sse41_packus(a, b)));
    }
    // By hand: SHUFPS 0x4e = lanes (2, 3) of the destination, (0, 1) of
    // the source.
    assert_eq!(xmm(&mut v, 11), (x0 >> 64) | (x1 << 64));
    // PMOVSXBW: the low eight bytes sign-extended.
    assert_eq!(xmm(&mut v, 12), 0x0007_0006_ff85_0004_0003_0002_0001_0000);
}

#[target_feature(enable = "ssse3")]
fn ssse3_shuffle(
    a: core::arch::x86_64::__m128i,
    b: core::arch::x86_64::__m128i,
) -> core::arch::x86_64::__m128i {
    core::arch::x86_64::_mm_shuffle_epi8(a, b)
}

#[target_feature(enable = "ssse3")]
fn ssse3_alignr5(
    a: core::arch::x86_64::__m128i,
    b: core::arch::x86_64::__m128i,
) -> core::arch::x86_64::__m128i {
    core::arch::x86_64::_mm_alignr_epi8(a, b, 5)
}

#[target_feature(enable = "sse4.1")]
fn sse41_packus(
    a: core::arch::x86_64::__m128i,
    b: core::arch::x86_64::__m128i,
) -> core::arch::x86_64::__m128i {
    core::arch::x86_64::_mm_packus_epi32(a, b)
}

#[target_feature(enable = "sse4.2")]
fn sse42_cmpistri<const IMM: i32>(
    a: core::arch::x86_64::__m128i,
    b: core::arch::x86_64::__m128i,
) -> (i32, i32, i32) {
    use core::arch::x86_64::*;
    (
        _mm_cmpistri::<IMM>(a, b),
        _mm_cmpistrz::<IMM>(a, b),
        _mm_cmpistrc::<IMM>(a, b),
    )
}

#[test]
fn pcmpistri_finds_what_strcspn_and_strstr_look_for() {
    // "set" chars "od", string "hello world" (equal any, unsigned bytes):
    // the first 'o' is at 4.
    let set = u128::from_le_bytes(*b"od\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    let s = u128::from_le_bytes(*b"hello world\0\0\0\0\0");
    let sub = u128::from_le_bytes(*b"wor\0\0\0\0\0\0\0\0\0\0\0\0\0");
    for (needle, imm, want) in [(set, 0x00u8, 4u64), (sub, 0x0c, 6)] {
        let mut v = with(|a| a.pcmpistri(xmm0, xmm1, imm as u32));
        set_xmm(&mut v, 0, needle);
        set_xmm(&mut v, 1, s);
        assert_eq!(run(&mut v), None);
        let r = v.get_regs().unwrap();
        assert_eq!(r.rcx, want);
        // ZF: the string has a terminator; CF: a match; SF: the needle has
        // one.
        assert_eq!(r.rflags & (ZF | CF | SF), ZF | CF | SF);
        use core::arch::x86_64::*;
        // SAFETY: SSE4.2 is present on this host; values only.
        let host = unsafe {
            let a = _mm_loadu_si128(&needle as *const u128 as *const __m128i);
            let b = _mm_loadu_si128(&s as *const u128 as *const __m128i);
            if imm == 0 {
                sse42_cmpistri::<0x00>(a, b)
            } else {
                sse42_cmpistri::<0x0c>(a, b)
            }
        };
        assert_eq!(host, (want as i32, 1, 1));
    }
}

#[test]
fn crc32c_matches_the_check_value_and_the_host() {
    // CRC-32C of "123456789" is 0xE3069283 (with the usual pre- and
    // post-inversion, done here by hand around the instructions).
    let mut v = with(|a| {
        a.crc32(rax, qword_ptr(rsi))?;
        a.crc32(eax, byte_ptr(rsi + 8))
    });
    v.mem.write(DATA, b"123456789").unwrap();
    set_gpr(&mut v, |r| {
        r.rsi = DATA;
        r.rax = 0xffff_ffff;
    });
    assert_eq!(run(&mut v), None);
    assert_eq!(v.get_regs().unwrap().rax ^ 0xffff_ffff, 0xe306_9283);
    assert_eq!(
        crate::sse::crc32c(0xffff_ffff, u64::from_le_bytes(*b"12345678"), 8),
        {
            // SAFETY: SSE4.2 on this host; values only.
            unsafe { host_crc32(0xffff_ffff, u64::from_le_bytes(*b"12345678")) }
        }
    );
}

#[target_feature(enable = "sse4.2")]
fn host_crc32(crc: u32, v: u64) -> u32 {
    core::arch::x86_64::_mm_crc32_u64(u64::from(crc), v) as u32
}

// ---- MMX ----

#[test]
fn mmx_ops_set_top_zero_tags_valid_and_emms_empties() {
    let mut v = with(|a| {
        a.fninit()?;
        a.fld1()?; // TOP = 7
        a.movq(mm0, qword_ptr(rax))?;
        a.movq(mm1, qword_ptr(rax + 8))?;
        a.paddusb(mm0, mm1)?;
        a.movq(qword_ptr(rax + 16), mm0)?;
        a.fnstsw(word_ptr(rax + 24))?;
        a.emms()
    });
    v.mem.write_u64(DATA, 0x80ff_0102_0304_0506).unwrap();
    v.mem.write_u64(DATA + 8, 0x8001_0101_0101_0101).unwrap();
    set_gpr(&mut v, |r| r.rax = DATA);
    assert_eq!(run(&mut v), None);
    assert_eq!(v.mem.read_u64(DATA + 16).unwrap(), 0xffff_0203_0405_0607);
    // TOP 0 after the MMX instructions.
    assert_eq!(v.mem.read_u16(DATA + 24).unwrap() & 0x3800, 0);
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xsave[4], 0, "EMMS: all empty");
    // MM0's exponent bits are all ones.
    assert_eq!(&f.xsave[32 + 8..32 + 10], &[0xff, 0xff]);
}

// ---- x87 state and exceptions ----

fn fpu_word(v: &mut InterpVcpu, off: usize) -> u16 {
    let f = v.get_fpu().unwrap();
    u16::from_le_bytes([f.xsave[off], f.xsave[off + 1]])
}

#[test]
fn x87_push_pop_tags_overflow_and_underflow() {
    let mut v = with(|a| {
        a.fninit()?;
        for _ in 0..8 {
            a.fld1()?;
        }
        a.fldz()?; // overflow: IE | SF | C1, indefinite (masked)
        Ok(())
    });
    assert_eq!(run(&mut v), None);
    let fsw = fpu_word(&mut v, 2);
    assert_eq!(fsw & 0x3800, 7 << 11, "TOP 7");
    assert_eq!(fsw & 0x7f, 0x41, "IE | SF");
    assert_eq!(fsw & 0x200, 0x200, "C1: overflow");
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xsave[4], 0xff, "abridged FTW: all valid");
    // ST(0) is the QNaN indefinite.
    assert_eq!(&f.xsave[32..42], &[0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff]);

    // Underflow: FADD on an empty stack.
    let mut v = with(|a| {
        a.fninit()?;
        a.fadd_2(st0, st1)
    });
    assert_eq!(run(&mut v), None);
    let fsw = fpu_word(&mut v, 2);
    assert_eq!(fsw & 0x7f, 0x41);
    assert_eq!(fsw & 0x200, 0, "C1: underflow");
}

#[test]
fn x87_unmasked_exception_is_mf_at_the_next_waiting_instruction() {
    let mut v = with(|a| {
        a.fninit()?;
        a.fldcw(word_ptr(rax))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?; // 1 / 0 with ZE unmasked: ES set, no #MF yet
        a.fnstsw(ax)?; // no-wait: no #MF
        a.mov(rbx, rax)?;
        a.fld1() // waiting: #MF
    });
    v.mem.write_u16(DATA, 0x037b).unwrap();
    set_gpr(&mut v, |r| r.rax = DATA);
    assert_eq!(run(&mut v), Some(16));
    let r = v.get_regs().unwrap();
    assert_eq!(r.rbx & 0x80, 0x80, "ES");
    assert_eq!(r.rbx & 0x4, 0x4, "ZE");
    // The destination kept 1.0 and the pop did not happen (TOP 6).
    assert_eq!(r.rbx & 0x3800, 6 << 11);
}

#[test]
fn x87_with_ts_or_em_is_nm() {
    for bit in [cr0::TS, cr0::EM] {
        let mut v = with(|a| a.fld1());
        let mut s = v.get_sregs().unwrap();
        s.cr0 |= bit;
        v.set_sregs(&s).unwrap();
        assert_eq!(run(&mut v), Some(7));
    }
}

#[test]
fn x87_loads_stores_and_integer_conversions() {
    let mut v = with(|a| {
        a.fninit()?;
        a.fld(qword_ptr(rax))?; // 2.5
        a.fist(dword_ptr(rax + 8))?; // 2 (nearest even)
        a.fisttp(dword_ptr(rax + 12))?; // 2 (truncate), pops
        a.fild(word_ptr(rax + 16))?; // -7
        a.fld(dword_ptr(rax + 20))?; // 0.1f
        a.fmulp(st1, st0)?; // -0.7...
        a.fstp(qword_ptr(rax + 24))?;
        a.fldpi()?;
        a.fstp(dword_ptr(rax + 32))?;
        a.fnstcw(word_ptr(rax + 36))?;
        a.fnstsw(word_ptr(rax + 38))
    });
    v.mem.write_u64(DATA, 2.5f64.to_bits()).unwrap();
    v.mem.write_u16(DATA + 16, (-7i16) as u16).unwrap();
    v.mem.write_u32(DATA + 20, 0.1f32.to_bits()).unwrap();
    set_gpr(&mut v, |r| r.rax = DATA);
    assert_eq!(run(&mut v), None);
    assert_eq!(v.mem.read_u32(DATA + 8).unwrap(), 2);
    assert_eq!(v.mem.read_u32(DATA + 12).unwrap(), 2);
    // -7 * 0.1f exactly, then rounded once to binary64.
    let want = -7.0 * f64::from(0.1f32);
    assert_eq!(f64::from_bits(v.mem.read_u64(DATA + 24).unwrap()), want);
    assert_eq!(
        f32::from_bits(v.mem.read_u32(DATA + 32).unwrap()),
        std::f32::consts::PI
    );
    assert_eq!(v.mem.read_u16(DATA + 36).unwrap(), 0x037f);
    // Empty stack again, PE from the inexact stores.
    let fsw = v.mem.read_u16(DATA + 38).unwrap();
    assert_eq!(fsw & 0x3800, 0);
    assert_eq!(fsw & 0x20, 0x20);
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xsave[4], 0);
}

#[test]
fn fnstenv_fldenv_and_fnsave_frstor_round_trip() {
    let mut v = with(|a| {
        a.fninit()?;
        a.fld1()?;
        a.fldz()?;
        a.fnstenv(ptr(rax))?;
        a.fnsave(ptr(rax + 0x40))?; // and FNINIT
        a.frstor(ptr(rax + 0x40))?;
        a.fldenv(ptr(rax))
    });
    set_gpr(&mut v, |r| r.rax = DATA);
    assert_eq!(run(&mut v), None);
    // The environment: FCW, FSW (TOP 6), tag word: R7 valid (1.0: 00),
    // R6 zero (01), the rest empty (11).
    assert_eq!(v.mem.read_u16(DATA).unwrap(), 0x037f);
    assert_eq!(v.mem.read_u16(DATA + 4).unwrap() & 0x3800, 6 << 11);
    assert_eq!(v.mem.read_u16(DATA + 8).unwrap(), 0x1fff);
    // FNSAVE's registers in stack order: ST(0) = 0.0, ST(1) = 1.0.
    let second = v.mem.read_u64(DATA + 0x40 + 28 + 10).unwrap();
    assert_eq!(second, 1 << 63);
    // After FRSTOR and FLDENV the stack is back.
    assert_eq!(fpu_word(&mut v, 2) & 0x3800, 6 << 11);
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xsave[4], 0xc0);
    assert_eq!(
        u64::from_le_bytes(f.xsave[48..56].try_into().unwrap()),
        1 << 63
    );
}

#[test]
fn fcomi_sets_eflags_and_fcmov_moves() {
    let mut v = with(|a| {
        a.fninit()?;
        a.fld1()?; // ST1 after the next
        a.fldz()?; // ST0 = 0
        a.fcomi(st0, st1)?; // 0 < 1: CF
        a.fcmovb(st0, st1)?; // ST0 = 1
        a.fistp(dword_ptr(rax))
    });
    set_gpr(&mut v, |r| r.rax = DATA);
    assert_eq!(run(&mut v), None);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rflags & (ZF | PF | CF), CF);
    assert_eq!(v.mem.read_u32(DATA).unwrap(), 1);
}

// ---- FXSAVE round trip ----

#[test]
fn fxsave_after_sse_and_x87_writes_matches_the_image() {
    let mut v = with(|a| {
        a.movaps(xmm3, xmmword_ptr(rax))?;
        a.paddd(xmm3, xmm3)?;
        a.fninit()?;
        a.fldpi()?;
        a.ldmxcsr(dword_ptr(rax + 16))?;
        a.fxsave(ptr(rbx))
    });
    v.mem.write_u64(DATA, 0x0000_0001_0000_0002).unwrap();
    v.mem.write_u64(DATA + 8, 0x0000_0003_0000_0004).unwrap();
    v.mem.write_u32(DATA + 16, 0x3f80).unwrap();
    set_gpr(&mut v, |r| {
        r.rax = DATA;
        r.rbx = DATA + 0x1000;
    });
    assert_eq!(run(&mut v), None);
    let f = v.get_fpu().unwrap();
    let mut saved = [0u8; 416];
    v.mem.read(DATA + 0x1000, &mut saved).unwrap();
    // FCW/FSW/FTW/FOP, FIP, FDP, MXCSR and the registers.
    assert_eq!(&saved[..], &f.xsave[..416]);
    assert_eq!(xmm(&mut v, 3), 0x0000_0006_0000_0008_0000_0002_0000_0004);
    assert_eq!(
        u32::from_le_bytes(saved[24..28].try_into().unwrap()),
        0x3f80
    );
    assert_eq!(saved[4], 0x80, "R7 valid");
    assert_eq!(
        &saved[32..42],
        &[0x35, 0xc2, 0x68, 0x21, 0xa2, 0xda, 0x0f, 0xc9, 0x00, 0x40]
    );
    // XSTATE_BV: x87 and SSE in use.
    assert_eq!(f.xsave[512] & 3, 3);
}

// ---- integer SSE / SSSE3 / SSE4, against the host ----

host!(h_pavgb, "pavgb");
host!(h_pavgw, "pavgw");
host!(h_pmaddwd, "pmaddwd");
host!(h_pmulhuw, "pmulhuw");
host!(h_pmullw, "pmullw");
host!(h_pmuludq, "pmuludq");
host!(h_psubsb, "psubsb");
host!(h_psubusb, "psubusb");
host!(h_paddsw, "paddsw");
host!(h_paddq, "paddq");
host!(h_psubd, "psubd");
host!(h_pcmpgtb, "pcmpgtb");
host!(h_pcmpgtw, "pcmpgtw");
host!(h_pcmpeqd, "pcmpeqd");
host!(h_pminsw, "pminsw");
host!(h_pmaxub, "pmaxub");
host!(h_pandn, "pandn");
host!(h_punpcklbw, "punpcklbw");
host!(h_punpcklwd, "punpcklwd");
host!(h_punpckhdq, "punpckhdq");
host!(h_punpcklqdq, "punpcklqdq");
host!(h_punpckhqdq, "punpckhqdq");
host!(h_packssdw, "packssdw");
host!(h_packuswb, "packuswb");
host!(h_psllw, "psllw");
host!(h_psrad, "psrad");
host!(h_psrlq, "psrlq");
host!(h_psadbw, "psadbw");
host!(h_unpcklps, "unpcklps");
host!(h_unpckhpd, "unpckhpd");
host!(h_pshufb, "pshufb");
host!(h_phaddw, "phaddw");
host!(h_phsubsw, "phsubsw");
host!(h_phaddd, "phaddd");
host!(h_pmaddubsw, "pmaddubsw");
host!(h_pmulhrsw, "pmulhrsw");
host!(h_psignb, "psignb");
host!(h_psignd, "psignd");
host!(h_pabsw, "pabsw");
host!(h_pminsb, "pminsb");
host!(h_pmaxud, "pmaxud");
host!(h_pminuw, "pminuw");
host!(h_pmaxsd, "pmaxsd");
host!(h_pmulld, "pmulld");
host!(h_pmuldq, "pmuldq");
host!(h_pcmpeqq, "pcmpeqq");
host!(h_pcmpgtq, "pcmpgtq");
host!(h_packusdw, "packusdw");
host!(h_pmovzxbd, "pmovzxbd");
host!(h_pmovsxwq, "pmovsxwq");
host!(h_phminposuw, "phminposuw");
host_i!(h_pshufd, "pshufd {x}, {y}, 0x93");
host_i!(h_pshufhw, "pshufhw {x}, {y}, 0x2d");
host_i!(h_shufps, "shufps {x}, {y}, 0xb1");
host_i!(h_shufpd, "shufpd {x}, {y}, 2");
host_i!(h_palignr, "palignr {x}, {y}, 13");
host_i!(h_pblendw, "pblendw {x}, {y}, 0xa5");
host_i!(h_blendps, "blendps {x}, {y}, 6");
host_i!(h_insertps, "insertps {x}, {y}, 0x99");
host_i!(h_pclmul, "pclmulqdq {x}, {y}, 0x10");
host_i!(h_mpsadbw, "mpsadbw {x}, {y}, 6");
host_i!(h_dpps, "dpps {x}, {y}, 0xbf");
host_i!(h_dppd, "dppd {x}, {y}, 0x33");
host_i!(h_pslldq, "pslldq {x}, 7 /* {y} */");
host_i!(h_psraw_i, "psraw {x}, 9 /* {y} */");
host_i!(h_psrld_i, "psrld {x}, 33 /* {y} */");

impl Rng {
    /// 128 bits whose bytes lean to the edge values (0, 1, 0x7f, 0x80,
    /// 0xff) that saturation and comparisons care about.
    fn edgy(&mut self) -> u128 {
        let mut b = (u128::from(self.next()) << 64 | u128::from(self.next())).to_le_bytes();
        let m = self.next();
        for (k, x) in b.iter_mut().enumerate() {
            match (m >> (4 * (k % 16))) & 15 {
                0 => *x = 0,
                1 => *x = 0xff,
                2 => *x = 0x80,
                3 => *x = 0x7f,
                4 => *x = 1,
                _ => {}
            }
        }
        u128::from_le_bytes(b)
    }
}

#[test]
fn integer_ops_match_the_host() {
    let cases: &[(&str, Asm, HostFn)] = &[
        ("pavgb", |a| a.pavgb(xmm0, xmm1), h_pavgb),
        ("pavgw", |a| a.pavgw(xmm0, xmm1), h_pavgw),
        ("pmaddwd", |a| a.pmaddwd(xmm0, xmm1), h_pmaddwd),
        ("pmulhuw", |a| a.pmulhuw(xmm0, xmm1), h_pmulhuw),
        ("pmullw", |a| a.pmullw(xmm0, xmm1), h_pmullw),
        ("pmuludq", |a| a.pmuludq(xmm0, xmm1), h_pmuludq),
        ("psubsb", |a| a.psubsb(xmm0, xmm1), h_psubsb),
        ("psubusb", |a| a.psubusb(xmm0, xmm1), h_psubusb),
        ("paddsw", |a| a.paddsw(xmm0, xmm1), h_paddsw),
        ("paddq", |a| a.paddq(xmm0, xmm1), h_paddq),
        ("psubd", |a| a.psubd(xmm0, xmm1), h_psubd),
        ("pcmpgtb", |a| a.pcmpgtb(xmm0, xmm1), h_pcmpgtb),
        ("pcmpgtw", |a| a.pcmpgtw(xmm0, xmm1), h_pcmpgtw),
        ("pcmpeqd", |a| a.pcmpeqd(xmm0, xmm1), h_pcmpeqd),
        ("pminsw", |a| a.pminsw(xmm0, xmm1), h_pminsw),
        ("pmaxub", |a| a.pmaxub(xmm0, xmm1), h_pmaxub),
        ("pandn", |a| a.pandn(xmm0, xmm1), h_pandn),
        ("punpcklbw", |a| a.punpcklbw(xmm0, xmm1), h_punpcklbw),
        ("punpcklwd", |a| a.punpcklwd(xmm0, xmm1), h_punpcklwd),
        ("punpckhdq", |a| a.punpckhdq(xmm0, xmm1), h_punpckhdq),
        ("punpcklqdq", |a| a.punpcklqdq(xmm0, xmm1), h_punpcklqdq),
        ("punpckhqdq", |a| a.punpckhqdq(xmm0, xmm1), h_punpckhqdq),
        ("packssdw", |a| a.packssdw(xmm0, xmm1), h_packssdw),
        ("packuswb", |a| a.packuswb(xmm0, xmm1), h_packuswb),
        ("psllw", |a| a.psllw(xmm0, xmm1), h_psllw),
        ("psrad", |a| a.psrad(xmm0, xmm1), h_psrad),
        ("psrlq", |a| a.psrlq(xmm0, xmm1), h_psrlq),
        ("psadbw", |a| a.psadbw(xmm0, xmm1), h_psadbw),
        ("unpcklps", |a| a.unpcklps(xmm0, xmm1), h_unpcklps),
        ("unpckhpd", |a| a.unpckhpd(xmm0, xmm1), h_unpckhpd),
        ("pshufb", |a| a.pshufb(xmm0, xmm1), h_pshufb),
        ("phaddw", |a| a.phaddw(xmm0, xmm1), h_phaddw),
        ("phsubsw", |a| a.phsubsw(xmm0, xmm1), h_phsubsw),
        ("phaddd", |a| a.phaddd(xmm0, xmm1), h_phaddd),
        ("pmaddubsw", |a| a.pmaddubsw(xmm0, xmm1), h_pmaddubsw),
        ("pmulhrsw", |a| a.pmulhrsw(xmm0, xmm1), h_pmulhrsw),
        ("psignb", |a| a.psignb(xmm0, xmm1), h_psignb),
        ("psignd", |a| a.psignd(xmm0, xmm1), h_psignd),
        ("pabsw", |a| a.pabsw(xmm0, xmm1), h_pabsw),
        ("pminsb", |a| a.pminsb(xmm0, xmm1), h_pminsb),
        ("pmaxud", |a| a.pmaxud(xmm0, xmm1), h_pmaxud),
        ("pminuw", |a| a.pminuw(xmm0, xmm1), h_pminuw),
        ("pmaxsd", |a| a.pmaxsd(xmm0, xmm1), h_pmaxsd),
        ("pmulld", |a| a.pmulld(xmm0, xmm1), h_pmulld),
        ("pmuldq", |a| a.pmuldq(xmm0, xmm1), h_pmuldq),
        ("pcmpeqq", |a| a.pcmpeqq(xmm0, xmm1), h_pcmpeqq),
        ("pcmpgtq", |a| a.pcmpgtq(xmm0, xmm1), h_pcmpgtq),
        ("packusdw", |a| a.packusdw(xmm0, xmm1), h_packusdw),
        ("pmovzxbd", |a| a.pmovzxbd(xmm0, xmm1), h_pmovzxbd),
        ("pmovsxwq", |a| a.pmovsxwq(xmm0, xmm1), h_pmovsxwq),
        ("phminposuw", |a| a.phminposuw(xmm0, xmm1), h_phminposuw),
        ("pshufd", |a| a.pshufd(xmm0, xmm1, 0x93), h_pshufd),
        ("pshufhw", |a| a.pshufhw(xmm0, xmm1, 0x2d), h_pshufhw),
        ("shufps", |a| a.shufps(xmm0, xmm1, 0xb1), h_shufps),
        ("shufpd", |a| a.shufpd(xmm0, xmm1, 2), h_shufpd),
        ("palignr", |a| a.palignr(xmm0, xmm1, 13), h_palignr),
        ("pblendw", |a| a.pblendw(xmm0, xmm1, 0xa5), h_pblendw),
        ("blendps", |a| a.blendps(xmm0, xmm1, 6), h_blendps),
        ("insertps", |a| a.insertps(xmm0, xmm1, 0x99), h_insertps),
        ("pslldq", |a| a.pslldq(xmm0, 7), h_pslldq),
        ("pclmulqdq", |a| a.pclmulqdq(xmm0, xmm1, 0x10), h_pclmul),
        ("mpsadbw", |a| a.mpsadbw(xmm0, xmm1, 6), h_mpsadbw),
        ("psraw imm", |a| a.psraw(xmm0, 9), h_psraw_i),
        ("psrld imm", |a| a.psrld(xmm0, 33), h_psrld_i),
    ];
    for &(name, asm, host) in cases {
        int_against_host(name, asm, host, 300);
    }
}

/// Like `against_host` for the integer instructions: edge-leaning random
/// operands, MXCSR left at its default.
fn int_against_host(name: &str, asm: Asm, host: HostFn, rounds: usize) {
    let mut v = with(asm);
    let mut rng = Rng(0x1234_5678_9abc_def1 ^ (name.len() as u64 * 31));
    for n in 0..rounds {
        let a = rng.edgy();
        let b = if n % 5 == 0 { a } else { rng.edgy() };
        // Shift counts: small ones as often as large ones.
        let b = if name.starts_with("ps") && n % 2 == 0 {
            b % 80
        } else {
            b
        };
        let (want, _) = host(a, b, 0x1f80);
        set_gpr(&mut v, |r| r.rip = CODE);
        set_xmm(&mut v, 0, a);
        set_xmm(&mut v, 1, b);
        assert_eq!(run(&mut v), None);
        let got = xmm(&mut v, 0);
        assert_eq!(
            got, want,
            "{name}: a {a:#034x} b {b:#034x}: got {got:#034x} host {want:#034x}"
        );
    }
}

// ---- conversions to and from general registers, ROUND*, COMI*, against the host ----

/// Defines `fn $name(a, b, g, mxcsr) -> (xmm a after, g after, mxcsr after)`
/// running `$ins` with `{x}` = XMM a, `{y}` = XMM b, `{g}` = a 64-bit
/// general register holding g.
macro_rules! host_g {
    ($name:ident, $ins:literal) => {
        fn $name(a: u128, b: u128, g: u64, mx: u32) -> (u128, u64, u32) {
            use core::arch::x86_64::__m128i;
            let mut save = 0u32;
            let mut out = 0u32;
            let mut g = g;
            // SAFETY: as in `host!`; the block may also push and pop one
            // quadword (PUSHFQ / POP) on the stack, which it leaves as it
            // found it.
            unsafe {
                let mut x: __m128i = core::mem::transmute::<u128, __m128i>(a);
                let y: __m128i = core::mem::transmute::<u128, __m128i>(b);
                asm!(
                    "stmxcsr [{save}]",
                    "ldmxcsr [{inp}]",
                    $ins,
                    "stmxcsr [{out}]",
                    "ldmxcsr [{save}]",
                    save = in(reg) &mut save,
                    inp = in(reg) &mx,
                    out = in(reg) &mut out,
                    x = inout(xmm_reg) x,
                    y = in(xmm_reg) y,
                    g = inout(reg) g,
                );
                (core::mem::transmute::<__m128i, u128>(x), g, out)
            }
        }
    };
}

host_g!(g_cvtsd2si, "cvtsd2si {g}, {y} /* {x} */");
host_g!(g_cvttss2si32, "cvttss2si {g:e}, {y} /* {x} */");
host_g!(g_cvtss2si32, "cvtss2si {g:e}, {y} /* {x} */");
host_g!(g_cvttsd2si, "cvttsd2si {g}, {y} /* {x} */");
host_g!(g_cvtsi2sd, "cvtsi2sd {x}, {g} /* {y} */");
host_g!(g_cvtsi2ss32, "cvtsi2ss {x}, {g:e} /* {y} */");
host_g!(g_cvtsi2ss, "cvtsi2ss {x}, {g} /* {y} */");
host_g!(g_roundsd, "roundsd {x}, {y}, 4 /* {g} */");
host_g!(g_roundps, "roundps {x}, {y}, 3 /* {g} */");
host_g!(g_roundpd9, "roundpd {x}, {y}, 9 /* {g} */");
host_g!(g_comisd, "comisd {x}, {y}\npushfq\npop {g}");
host_g!(g_ucomiss, "ucomiss {x}, {y}\npushfq\npop {g}");
host_g!(g_cmpnltps, "cmpps {x}, {y}, 5 /* {g} */");
host_g!(g_cmpeqsd, "cmpsd {x}, {y}, 0 /* {g} */");
host_g!(g_cvtpd2dq, "cvtpd2dq {x}, {y} /* {g} */");
host_g!(g_cvttps2dq, "cvttps2dq {x}, {y} /* {g} */");
host_g!(g_maxps, "maxps {x}, {y} /* {g} */");
host_g!(g_minsd, "minsd {x}, {y} /* {g} */");
host_g!(g_sqrtss, "sqrtss {x}, {y} /* {g} */");
host_g!(g_mulsd, "mulsd {x}, {y} /* {g} */");
host_g!(g_hsubpd, "hsubpd {x}, {y} /* {g} */");

type HostG = fn(u128, u128, u64, u32) -> (u128, u64, u32);

#[test]
fn conversions_round_and_compares_match_the_host() {
    let cases: &[(&str, Asm, HostG, bool)] = &[
        ("cvtsd2si", |a| a.cvtsd2si(rax, xmm1), g_cvtsd2si, true),
        (
            "cvttss2si",
            |a| a.cvttss2si(eax, xmm1),
            g_cvttss2si32,
            false,
        ),
        ("cvtss2si", |a| a.cvtss2si(eax, xmm1), g_cvtss2si32, false),
        ("cvttsd2si", |a| a.cvttsd2si(rax, xmm1), g_cvttsd2si, true),
        ("cvtsi2sd", |a| a.cvtsi2sd(xmm0, rax), g_cvtsi2sd, true),
        ("cvtsi2ss32", |a| a.cvtsi2ss(xmm0, eax), g_cvtsi2ss32, false),
        ("cvtsi2ss", |a| a.cvtsi2ss(xmm0, rax), g_cvtsi2ss, false),
        ("roundsd", |a| a.roundsd(xmm0, xmm1, 4), g_roundsd, true),
        ("roundps", |a| a.roundps(xmm0, xmm1, 3), g_roundps, false),
        ("roundpd", |a| a.roundpd(xmm0, xmm1, 9), g_roundpd9, true),
        (
            "comisd",
            |a| {
                a.comisd(xmm0, xmm1)?;
                a.pushfq()?;
                a.pop(rax)
            },
            g_comisd,
            true,
        ),
        (
            "ucomiss",
            |a| {
                a.ucomiss(xmm0, xmm1)?;
                a.pushfq()?;
                a.pop(rax)
            },
            g_ucomiss,
            false,
        ),
        ("cmpnltps", |a| a.cmpps(xmm0, xmm1, 5), g_cmpnltps, false),
        ("cmpeqsd", |a| a.cmpsd_3(xmm0, xmm1, 0), g_cmpeqsd, true),
        ("cvtpd2dq", |a| a.cvtpd2dq(xmm0, xmm1), g_cvtpd2dq, true),
        ("cvttps2dq", |a| a.cvttps2dq(xmm0, xmm1), g_cvttps2dq, false),
        ("maxps", |a| a.maxps(xmm0, xmm1), g_maxps, false),
        ("minsd", |a| a.minsd(xmm0, xmm1), g_minsd, true),
        ("sqrtss", |a| a.sqrtss(xmm0, xmm1), g_sqrtss, false),
        ("mulsd", |a| a.mulsd(xmm0, xmm1), g_mulsd, true),
        ("hsubpd", |a| a.hsubpd(xmm0, xmm1), g_hsubpd, true),
    ];
    for &(name, asm, host, doubles) in cases {
        let mut v = with(asm);
        let mut rng = Rng(0x5151_7e57_0bad_cafe ^ (name.len() as u64 * 1009));
        for n in 0..800 {
            let gen = |rng: &mut Rng| -> u128 {
                if doubles {
                    u128::from(rng.f64_bits()) | (u128::from(rng.f64_bits()) << 64)
                } else {
                    (0..4).fold(0, |r, k| r | (u128::from(rng.f32_bits()) << (32 * k)))
                }
            };
            let a = gen(&mut rng);
            let b = if n % 7 == 0 { a } else { gen(&mut rng) };
            let r = rng.next();
            let g = match n % 4 {
                0 => r,
                1 => r >> (r % 64),
                2 => (r as i64 >> (r % 64)) as u64,
                _ => 1 << (r % 64),
            };
            let mx = 0x1f80
                | (((r & 3) as u32) << 13)
                | if r & 4 != 0 { 0x40 } else { 0 }
                | if r & 8 != 0 { 0x8000 } else { 0 };
            let (want, want_g, want_mx) = host(a, b, g, mx);
            set_gpr(&mut v, |r| {
                r.rip = CODE;
                r.rax = g;
                r.rflags = 2;
            });
            set_xmm(&mut v, 0, a);
            set_xmm(&mut v, 1, b);
            set_mxcsr(&mut v, mx);
            assert_eq!(run(&mut v), None);
            let got = (xmm(&mut v, 0), v.get_regs().unwrap().rax, mxcsr(&mut v));
            // Only the arithmetic flags of a pushed RFLAGS are compared.
            let mask = if name.contains("comis") {
                0x8d5
            } else {
                u64::MAX
            };
            assert_eq!(
                (got.0, got.1 & mask, got.2),
                (want, want_g & mask, want_mx),
                "{name}: a {a:#034x} b {b:#034x} g {g:#x} mxcsr {mx:#x}"
            );
        }
    }
}

/// As `host87`, with `{m}` a scratch quadword (holding `mem` before `$op`)
/// that `$op` may load or store; also returns the scratch afterwards.
macro_rules! host87m {
    ($name:ident, $op:literal) => {
        fn $name(a: u128, b: u128, cw: u16, mem: u64) -> (u128, u16, u128) {
            let ab = a.to_le_bytes();
            let bb = b.to_le_bytes();
            let mut out = [0u8; 16];
            let mut sw = 0u16;
            // 16 bytes: FBSTP writes 10.
            let mut m = [mem, 0u64];
            // SAFETY: as in `host87`; `$op` reads or writes only the local
            // 16-byte `m`.
            unsafe {
                asm!(
                    "fninit",
                    "fldcw word ptr [{cw}]",
                    "fld tbyte ptr [{b}]",
                    "fld tbyte ptr [{a}]",
                    $op,
                    "fstp tbyte ptr [{out}]",
                    "fnstsw word ptr [{sw}]",
                    "fninit",
                    cw = in(reg) &cw,
                    a = in(reg) ab.as_ptr(),
                    b = in(reg) bb.as_ptr(),
                    out = in(reg) out.as_mut_ptr(),
                    sw = in(reg) &mut sw,
                    m = in(reg) m.as_mut_ptr(),
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                    options(nostack),
                );
            }
            (u128::from_le_bytes(out) & MASK80, sw, u128::from(m[0]) | (u128::from(m[1]) << 64))
        }
    };
}

host87m!(m_fst32, "fst dword ptr [{m}]");
host87m!(m_fst64, "fst qword ptr [{m}]");
host87m!(m_fist16, "fist word ptr [{m}]");
host87m!(m_fist32, "fist dword ptr [{m}]");
host87m!(m_fistp64, "fistp qword ptr [{m}]");
host87m!(m_fisttp32, "fisttp dword ptr [{m}]");
host87m!(m_fld32, "fld dword ptr [{m}]");
host87m!(m_fld64, "fld qword ptr [{m}]");
host87m!(m_fadd64, "fadd qword ptr [{m}]");
host87m!(m_fidivr32, "fidivr dword ptr [{m}]");
host87m!(m_fcomp32, "fcomp dword ptr [{m}]");
host87m!(m_fbstp, "fbstp tbyte ptr [{m}]\nfld st(0)");
host87m!(m_fbld, "fbld tbyte ptr [{m}]");
host87m!(m_fxtract, "fxtract /* {m} */");
host87m!(m_ftst, "ftst /* {m} */");
host87m!(m_fsubrp, "fsubrp st(1), st /* {m} */");

type Host87m = fn(u128, u128, u16, u64) -> (u128, u16, u128);

#[test]
fn x87_memory_forms_match_the_host() {
    let cases: &[(&str, Asm, Host87m, u32)] = &[
        ("fst m32", |a| a.fst(dword_ptr(DATA + 0x50)), m_fst32, 0),
        ("fst m64", |a| a.fst(qword_ptr(DATA + 0x50)), m_fst64, 0),
        ("fist m16", |a| a.fist(word_ptr(DATA + 0x50)), m_fist16, 0),
        ("fist m32", |a| a.fist(dword_ptr(DATA + 0x50)), m_fist32, 0),
        (
            "fistp m64",
            |a| a.fistp(qword_ptr(DATA + 0x50)),
            m_fistp64,
            0,
        ),
        (
            "fisttp m32",
            |a| a.fisttp(dword_ptr(DATA + 0x50)),
            m_fisttp32,
            0,
        ),
        ("fld m32", |a| a.fld(dword_ptr(DATA + 0x50)), m_fld32, 32),
        ("fld m64", |a| a.fld(qword_ptr(DATA + 0x50)), m_fld64, 64),
        ("fadd m64", |a| a.fadd(qword_ptr(DATA + 0x50)), m_fadd64, 64),
        (
            "fidivr m32",
            |a| a.fidivr(dword_ptr(DATA + 0x50)),
            m_fidivr32,
            1,
        ),
        (
            "fcomp m32",
            |a| a.fcomp(dword_ptr(DATA + 0x50)),
            m_fcomp32,
            32,
        ),
        ("fxtract", |a| a.fxtract(), m_fxtract, 0),
        ("fbld", |a| a.fbld(tword_ptr(DATA + 0x50)), m_fbld, 10),
        (
            "fbstp",
            |a| {
                a.fbstp(tword_ptr(DATA + 0x50))?;
                a.fld(st0)
            },
            m_fbstp,
            0,
        ),
        ("ftst", |a| a.ftst(), m_ftst, 0),
        ("fsubrp", |a| a.fsubrp(st1, st0), m_fsubrp, 0),
    ];
    for &(name, op, host, mem_kind) in cases {
        let mut v = with(|a| {
            a.fninit()?;
            a.fldcw(word_ptr(DATA))?;
            a.fld(tword_ptr(DATA + 0x20))?;
            a.fld(tword_ptr(DATA + 0x10))?;
            op(a)?;
            a.fstp(tword_ptr(DATA + 0x30))?;
            a.fnstsw(word_ptr(DATA + 0x40))
        });
        let mut rng = Rng(0x0ddb_a11c_afe5_eed5 ^ (name.len() as u64 * 7919));
        for n in 0..800 {
            let a = rng.f80_bits();
            let b = rng.f80_bits();
            let r = rng.next();
            let pc = [0u16, 2, 3, 3][(r & 3) as usize];
            let cw = 0x7f | (pc << 8) | ((((r >> 2) & 3) as u16) << 10);
            let mem = match mem_kind {
                32 => u64::from(rng.f32_bits()),
                64 => rng.f64_bits(),
                1 => rng.next() >> (n % 64),
                // Packed BCD: mostly valid digits.
                10 => {
                    let r = rng.next();
                    (0..16).fold(0u64, |acc, k| {
                        let d = (r >> (4 * k)) & 0xf;
                        acc | (if n % 5 == 0 { d } else { d % 10 }) << (4 * k)
                    })
                }
                _ => 0x5a5a_5a5a_5a5a_5a5a,
            };
            let want = host(a, b, cw, mem);
            v.mem.write_u64(DATA + 0x50, mem).unwrap();
            v.mem.write_u64(DATA + 0x58, 0).unwrap();
            let (st, fsw) = interp87(&mut v, a, b, cw);
            let got = (
                st,
                fsw,
                u128::from(v.mem.read_u64(DATA + 0x50).unwrap())
                    | (u128::from(v.mem.read_u64(DATA + 0x58).unwrap()) << 64),
            );
            assert_eq!(
                got, want,
                "{name}: a {a:#022x} b {b:#022x} fcw {cw:#x} mem {mem:#x}: got ({:#022x}, {:#06x}, {:#x}) host ({:#022x}, {:#06x}, {:#x})",
                got.0, got.1, got.2, want.0, want.1, want.2
            );
        }
    }
}

#[test]
fn inserts_extracts_masked_and_non_temporal_stores() {
    let mut v = with(|a| {
        a.pextrw(eax, xmm0, 5)?;
        a.pinsrw(xmm1, ebx, 2)?;
        a.pextrd(dword_ptr(rsi), xmm0, 3)?;
        a.pinsrq(xmm2, qword_ptr(rsi + 8), 1)?;
        a.pextrb(ecx, xmm0, 15)?;
        a.movnti(qword_ptr(rsi + 16), rdx)?;
        a.maskmovdqu(xmm0, xmm3)?;
        a.ptest(xmm0, xmm3)
    });
    let x0: u128 = 0xfedc_ba98_7654_3210_0123_4567_89ab_cdef;
    set_xmm(&mut v, 0, x0);
    set_xmm(&mut v, 3, 0x80 << 8 | 0x80 << 120);
    v.mem.write_u64(DATA + 8, 0x1111_2222_3333_4444).unwrap();
    set_gpr(&mut v, |r| {
        r.rbx = 0xffff_abcd;
        r.rsi = DATA;
        r.rdx = 0x5555_6666_7777_8888;
        r.rdi = DATA + 0x100;
    });
    assert_eq!(run(&mut v), None);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rax, 0x7654);
    assert_eq!(xmm(&mut v, 1) >> 32 & 0xffff, 0xabcd);
    assert_eq!(v.mem.read_u32(DATA).unwrap(), 0xfedc_ba98);
    assert_eq!(xmm(&mut v, 2) >> 64, 0x1111_2222_3333_4444);
    assert_eq!(r.rcx, 0xfe);
    assert_eq!(v.mem.read_u64(DATA + 16).unwrap(), 0x5555_6666_7777_8888);
    // MASKMOVDQU wrote bytes 1 and 15 only.
    assert_eq!(v.mem.read_u8(DATA + 0x100).unwrap(), 0);
    assert_eq!(v.mem.read_u8(DATA + 0x101).unwrap(), 0xcd);
    assert_eq!(v.mem.read_u8(DATA + 0x10f).unwrap(), 0xfe);
    // PTEST: x0 & mask != 0 (ZF clear); !x0 & mask: byte 1 0xcd has bit 7
    // set and byte 15 0xfe too, so CF set.
    assert_eq!(r.rflags & (ZF | CF), CF);

    // MOVNTDQ to a misaligned address: #GP(0).
    let mut v = with(|a| a.movntdq(xmmword_ptr(rsi), xmm0));
    set_gpr(&mut v, |r| r.rsi = DATA + 4);
    assert_eq!(run(&mut v), Some(13));
}

#[test]
fn pcmpestri_explicit_lengths_and_pcmpistrm_mask() {
    // Ranges 'a'-'z' (unsigned bytes, ranges, negative polarity): the
    // first byte that is not lower case in "abcD" is at 3.
    let ranges = u128::from_le_bytes(*b"az\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    let s = u128::from_le_bytes(*b"abcDefgh\0\0\0\0\0\0\0\0");
    let mut v = with(|a| a.pcmpestri(xmm0, xmm1, 0x14));
    set_xmm(&mut v, 0, ranges);
    set_xmm(&mut v, 1, s);
    set_gpr(&mut v, |r| {
        r.rax = 2;
        r.rdx = 6;
    });
    assert_eq!(run(&mut v), None);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rcx, 3);
    // CF (a match), ZF (length 6 < 16), SF (length 2 < 16).
    assert_eq!(r.rflags & (CF | ZF | SF | OF), CF | ZF | SF);
    // PCMPISTRM equal each, byte mask: bytes equal up to the terminator.
    let mut v = with(|a| a.pcmpistrm(xmm0, xmm1, 0x48));
    set_xmm(
        &mut v,
        0,
        u128::from_le_bytes(*b"abXd\0\0\0\0\0\0\0\0\0\0\0\0"),
    );
    set_xmm(
        &mut v,
        1,
        u128::from_le_bytes(*b"abcd\0\0\0\0\0\0\0\0\0\0\0\0"),
    );
    assert_eq!(run(&mut v), None);
    // Equal each: 0, 1 and 3 match, 2 differs, 4.. both invalid (true).
    let want: u128 = !(0xff << 16);
    assert_eq!(xmm(&mut v, 0), want);
}

/// Defines `fn $name(a, b, rax, rdx) -> (XMM0, RCX, RFLAGS)` running
/// `$ins` (an SSE4.2 string instruction on XMM0, XMM1) on this host.
macro_rules! host_str {
    ($name:ident, $ins:literal) => {
        fn $name(a: u128, b: u128, la: u64, lb: u64) -> (u128, u64, u64) {
            use core::arch::x86_64::__m128i;
            let mut idx = 0x5a5a_5a5a_5a5a_5a5au64;
            let fl: u64;
            // SAFETY: one SSE4.2 instruction on the named registers (all
            // declared), then PUSHFQ / POP, which leaves the stack as it
            // was; u128 and __m128i are both 16 plain bytes.
            unsafe {
                let mut x: __m128i = core::mem::transmute::<u128, __m128i>(a);
                let y: __m128i = core::mem::transmute::<u128, __m128i>(b);
                asm!(
                    $ins,
                    "pushfq",
                    "pop {f}",
                    f = out(reg) fl,
                    inout("xmm0") x,
                    in("xmm1") y,
                    in("rax") la,
                    in("rdx") lb,
                    inout("rcx") idx,
                );
                (core::mem::transmute::<__m128i, u128>(x), idx, fl)
            }
        }
    };
}

host_str!(s_istri_00, "pcmpistri xmm0, xmm1, 0x00");
host_str!(s_istri_04, "pcmpistri xmm0, xmm1, 0x04");
host_str!(s_istri_08, "pcmpistri xmm0, xmm1, 0x08");
host_str!(s_istri_0c, "pcmpistri xmm0, xmm1, 0x0c");
host_str!(s_istri_14, "pcmpistri xmm0, xmm1, 0x14");
host_str!(s_istri_1a, "pcmpistri xmm0, xmm1, 0x1a");
host_str!(s_istri_3a, "pcmpistri xmm0, xmm1, 0x3a");
host_str!(s_istri_45, "pcmpistri xmm0, xmm1, 0x45");
host_str!(s_istri_0d, "pcmpistri xmm0, xmm1, 0x0d");
host_str!(s_istri_7e, "pcmpistri xmm0, xmm1, 0x7e");
host_str!(s_estri_00, "pcmpestri xmm0, xmm1, 0x00");
host_str!(s_estri_0c, "pcmpestri xmm0, xmm1, 0x0c");
host_str!(s_estri_38, "pcmpestri xmm0, xmm1, 0x38");
host_str!(s_estri_47, "pcmpestri xmm0, xmm1, 0x47");
host_str!(s_istrm_40, "pcmpistrm xmm0, xmm1, 0x40");
host_str!(s_istrm_18, "pcmpistrm xmm0, xmm1, 0x18");
host_str!(s_istrm_4d, "pcmpistrm xmm0, xmm1, 0x4d");
host_str!(s_estrm_04, "pcmpestrm xmm0, xmm1, 0x04");
host_str!(s_estrm_6a, "pcmpestrm xmm0, xmm1, 0x6a");

type HostStr = fn(u128, u128, u64, u64) -> (u128, u64, u64);

#[test]
fn string_compares_match_the_host() {
    let cases: &[(&str, Asm, HostStr)] = &[
        ("istri 00", |a| a.pcmpistri(xmm0, xmm1, 0x00), s_istri_00),
        ("istri 04", |a| a.pcmpistri(xmm0, xmm1, 0x04), s_istri_04),
        ("istri 08", |a| a.pcmpistri(xmm0, xmm1, 0x08), s_istri_08),
        ("istri 0c", |a| a.pcmpistri(xmm0, xmm1, 0x0c), s_istri_0c),
        ("istri 14", |a| a.pcmpistri(xmm0, xmm1, 0x14), s_istri_14),
        ("istri 1a", |a| a.pcmpistri(xmm0, xmm1, 0x1a), s_istri_1a),
        ("istri 3a", |a| a.pcmpistri(xmm0, xmm1, 0x3a), s_istri_3a),
        ("istri 45", |a| a.pcmpistri(xmm0, xmm1, 0x45), s_istri_45),
        ("istri 0d", |a| a.pcmpistri(xmm0, xmm1, 0x0d), s_istri_0d),
        ("istri 7e", |a| a.pcmpistri(xmm0, xmm1, 0x7e), s_istri_7e),
        ("estri 00", |a| a.pcmpestri(xmm0, xmm1, 0x00), s_estri_00),
        ("estri 0c", |a| a.pcmpestri(xmm0, xmm1, 0x0c), s_estri_0c),
        ("estri 38", |a| a.pcmpestri(xmm0, xmm1, 0x38), s_estri_38),
        ("estri 47", |a| a.pcmpestri(xmm0, xmm1, 0x47), s_estri_47),
        ("istrm 40", |a| a.pcmpistrm(xmm0, xmm1, 0x40), s_istrm_40),
        ("istrm 18", |a| a.pcmpistrm(xmm0, xmm1, 0x18), s_istrm_18),
        ("istrm 4d", |a| a.pcmpistrm(xmm0, xmm1, 0x4d), s_istrm_4d),
        ("estrm 04", |a| a.pcmpestrm(xmm0, xmm1, 0x04), s_estrm_04),
        ("estrm 6a", |a| a.pcmpestrm(xmm0, xmm1, 0x6a), s_estrm_6a),
    ];
    const ALPHABET: [u8; 8] = [0, b'a', b'b', b'c', b'z', 0xff, 0x80, 1];
    for &(name, asm, host) in cases {
        let mut v = with(asm);
        let mut rng =
            Rng(0x7777_1234_aaaa_5555 ^ (name.len() as u64 * 4099) ^ name.as_bytes()[6] as u64);
        for n in 0..600 {
            let gen = |rng: &mut Rng| -> u128 {
                let r = rng.next();
                let zeros = r % 3 != 0;
                let mut b = [0u8; 16];
                for (k, x) in b.iter_mut().enumerate() {
                    let c = ALPHABET[((rng.next() >> (k % 8)) % 8) as usize];
                    *x = if c == 0 && !zeros { b'a' } else { c };
                }
                u128::from_le_bytes(b)
            };
            let a = gen(&mut rng);
            let b = if n % 6 == 0 { a } else { gen(&mut rng) };
            let r = rng.next();
            let la = ((r % 41) as i64 - 20) as u64;
            let lb = (((r >> 8) % 41) as i64 - 20) as u64;
            let want = host(a, b, la, lb);
            set_gpr(&mut v, |g| {
                g.rip = CODE;
                g.rax = la;
                g.rdx = lb;
                g.rcx = 0x5a5a_5a5a_5a5a_5a5a;
                g.rflags = 2;
            });
            set_xmm(&mut v, 0, a);
            set_xmm(&mut v, 1, b);
            assert_eq!(run(&mut v), None);
            let g = v.get_regs().unwrap();
            let got = (xmm(&mut v, 0), g.rcx, g.rflags & 0x8d5);
            assert_eq!(
                got,
                (want.0, want.1, want.2 & 0x8d5),
                "{name}: a {a:#034x} b {b:#034x} rax {la:#x} rdx {lb:#x}"
            );
        }
    }
}

// ---- MMX, against the host ----

/// Defines `fn $name(a, b) -> MM0 after` running `$op` (on MM0, MM1) on
/// this host between MOVQ loads / store and EMMS.
macro_rules! host_mmx {
    ($name:ident, $op:literal) => {
        fn $name(a: u64, b: u64) -> u64 {
            let mut out = 0u64;
            // SAFETY: the block uses MM0 / MM1 (declared clobbered, with
            // the x87 registers they alias) and ends with EMMS, leaving the
            // x87 stack empty as the ABI wants; it reads `a`, `b` and
            // writes `out`, locals of this function.
            unsafe {
                asm!(
                    "movq mm0, qword ptr [{a}]",
                    "movq mm1, qword ptr [{b}]",
                    $op,
                    "movq qword ptr [{o}], mm0",
                    "emms",
                    a = in(reg) &a,
                    b = in(reg) &b,
                    o = in(reg) &mut out,
                    out("mm0") _, out("mm1") _,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                    options(nostack),
                );
            }
            out
        }
    };
}

type HostMmx = fn(u64, u64) -> u64;

host_mmx!(mm_paddusb, "paddusb mm0, mm1");
host_mmx!(mm_pmulhw, "pmulhw mm0, mm1");
host_mmx!(mm_psllq, "psllq mm0, mm1");
host_mmx!(mm_psraw, "psraw mm0, mm1");
host_mmx!(mm_pshufw, "pshufw mm0, mm1, 0x4e");
host_mmx!(mm_pshufb, "pshufb mm0, mm1");
host_mmx!(mm_palignr, "palignr mm0, mm1, 3");
host_mmx!(mm_punpckhbw, "punpckhbw mm0, mm1");
host_mmx!(mm_packsswb, "packsswb mm0, mm1");
host_mmx!(mm_psadbw, "psadbw mm0, mm1");
host_mmx!(mm_pmuludq, "pmuludq mm0, mm1");
host_mmx!(mm_phaddw, "phaddw mm0, mm1");
host_mmx!(mm_pavgb, "pavgb mm0, mm1");

#[test]
fn mmx_ops_match_the_host() {
    let cases: &[(&str, Asm, HostMmx)] = &[
        ("paddusb", |a| a.paddusb(mm0, mm1), mm_paddusb),
        ("pmulhw", |a| a.pmulhw(mm0, mm1), mm_pmulhw),
        ("psllq", |a| a.psllq(mm0, mm1), mm_psllq),
        ("psraw", |a| a.psraw(mm0, mm1), mm_psraw),
        ("pshufw", |a| a.pshufw(mm0, mm1, 0x4e), mm_pshufw),
        ("pshufb", |a| a.pshufb(mm0, mm1), mm_pshufb),
        ("palignr", |a| a.palignr(mm0, mm1, 3), mm_palignr),
        ("punpckhbw", |a| a.punpckhbw(mm0, mm1), mm_punpckhbw),
        ("packsswb", |a| a.packsswb(mm0, mm1), mm_packsswb),
        ("psadbw", |a| a.psadbw(mm0, mm1), mm_psadbw),
        ("pmuludq", |a| a.pmuludq(mm0, mm1), mm_pmuludq),
        ("phaddw", |a| a.phaddw(mm0, mm1), mm_phaddw),
        ("pavgb", |a| a.pavgb(mm0, mm1), mm_pavgb),
    ];
    for &(name, op, host) in cases {
        let mut v = with(|a| {
            a.movq(mm0, qword_ptr(rax))?;
            a.movq(mm1, qword_ptr(rax + 8))?;
            op(a)?;
            a.movq(qword_ptr(rax + 16), mm0)?;
            a.emms()
        });
        let mut rng = Rng(0x6d6d_7878 ^ (name.len() as u64 * 131) ^ u64::from(name.as_bytes()[1]));
        for n in 0..300 {
            let a = rng.edgy() as u64;
            let b = rng.edgy() as u64;
            let b = if name.starts_with("ps") && n % 2 == 0 {
                b % 70
            } else {
                b
            };
            v.mem.write_u64(DATA, a).unwrap();
            v.mem.write_u64(DATA + 8, b).unwrap();
            set_gpr(&mut v, |r| {
                r.rip = CODE;
                r.rax = DATA;
            });
            assert_eq!(run(&mut v), None);
            let got = v.mem.read_u64(DATA + 16).unwrap();
            let want = host(a, b);
            assert_eq!(got, want, "{name}: a {a:#018x} b {b:#018x}");
        }
    }
}

#[test]
fn fnstenv_layout_matches_the_host() {
    let mut host_env = [0u32; 7];
    // SAFETY: the block leaves the x87 empty with FCW 0x37F (FNINIT) and
    // declares the x87 registers clobbered; it writes only `host_env`
    // (28 bytes).
    unsafe {
        asm!(
            "fninit",
            "fld1",
            "fldz",
            "fdivr st(0), st(1)",
            "fnstenv [{e}]",
            "fninit",
            e = in(reg) host_env.as_mut_ptr(),
            out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
            out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
            options(nostack),
        );
    }
    let mut v = with(|a| {
        a.fninit()?;
        a.fld1()?;
        a.fldz()?;
        a.fdivr_2(st0, st1)?;
        a.fnstenv(ptr(rax))
    });
    set_gpr(&mut v, |r| r.rax = DATA);
    assert_eq!(run(&mut v), None);
    let got: Vec<u32> = (0..7)
        .map(|k| v.mem.read_u32(DATA + 4 * k).unwrap())
        .collect();
    // FCW, FSW, FTW (with their upper halves), the FOP / FCS dword and
    // FDS; FIP and FDP are addresses, which differ.
    for k in [0usize, 1, 2, 4, 6] {
        assert_eq!(
            got[k], host_env[k],
            "dword {k}: got {:#x} host {:#x}",
            got[k], host_env[k]
        );
    }
}

// ---- robustness ----

/// Thousands of random SSE / MMX / x87 encodings (with random prefixes,
/// ModR/M bytes, immediates, register contents, MXCSR and FCW) run without
/// a panic, and every run ends at the HLT after the instruction or at an
/// exception handler's HLT; the state image keeps its size.
#[test]
fn random_simd_and_x87_encodings_never_panic() {
    use iced_x86::{CpuidFeature, Decoder, DecoderOptions};
    let mut rng = Rng(0xfeed_f00d_dead_beef);
    let mut v = machine();
    let mut ran = 0;
    for _ in 0..20000 {
        let r = rng.next();
        let mut code = Vec::new();
        match r % 4 {
            0 => code.push(0x66),
            1 => code.push(0xf2),
            2 => code.push(0xf3),
            _ => {}
        }
        if (r >> 2) % 3 == 0 {
            code.push(0xd8 + ((r >> 4) & 7) as u8);
        } else {
            code.push(0x0f);
            if (r >> 8) % 4 == 0 {
                code.push(if r & (1 << 12) != 0 { 0x38 } else { 0x3a });
            }
        }
        let tail = rng.next().to_le_bytes();
        code.extend_from_slice(&tail);
        let mut d = Decoder::with_ip(64, &code, CODE, DecoderOptions::NONE);
        let i = d.decode();
        let ours = i.cpuid_features().iter().any(|f| {
            matches!(
                f,
                CpuidFeature::FPU
                    | CpuidFeature::MMX
                    | CpuidFeature::SSE
                    | CpuidFeature::SSE2
                    | CpuidFeature::SSE3
                    | CpuidFeature::SSSE3
                    | CpuidFeature::SSE4_1
                    | CpuidFeature::SSE4_2
                    | CpuidFeature::PCLMULQDQ
                    | CpuidFeature::CMOV
            )
        });
        if i.is_invalid() || !ours || i.flow_control() != iced_x86::FlowControl::Next {
            continue;
        }
        let len = i.len();
        let mut bytes = code[..len].to_vec();
        bytes.push(0xf4);
        v.mem.write(CODE, &bytes).unwrap();
        v.invalidate_page(CODE);
        set_gpr(&mut v, |g| {
            let base = DATA + (r >> 20) % 0x400;
            (g.rax, g.rbx, g.rcx, g.rdx) = (base, base + 16, r & 0x1f, base);
            (g.rsi, g.rdi, g.rbp) = (base + 32, base + 64, base);
            (g.r8, g.r9, g.r10, g.r11) = (base, base, base, base);
            (g.r12, g.r13, g.r14, g.r15) = (base, base, base, base);
            g.rsp = STACK_TOP;
            g.rip = CODE;
            g.rflags = 2;
        });
        for n in 0..16 {
            set_xmm(
                &mut v,
                n,
                u128::from(rng.f64_bits()) | u128::from(rng.next()) << 64,
            );
        }
        let mut f = v.get_fpu().unwrap();
        let fr = rng.next();
        f.xsave[0..2].copy_from_slice(&((fr as u16) & 0x0f3f | 0x40).to_le_bytes());
        f.xsave[2..4].copy_from_slice(&((fr >> 16) as u16 & 0x3f7f).to_le_bytes());
        f.xsave[4] = (fr >> 32) as u8;
        for k in 0..8 {
            let x = rng.f80_bits().to_le_bytes();
            f.xsave[32 + 16 * k..42 + 16 * k].copy_from_slice(&x[..10]);
        }
        let mx = (0x1f80 & (fr >> 40) as u32)
            | ((fr >> 56) as u32 & 0x7f)
            | (0x8000 * ((fr >> 63) as u32));
        f.xsave[24..28].copy_from_slice(&mx.to_le_bytes());
        v.set_fpu(&f).unwrap();
        // A displacement can point outside RAM: answer the MMIO exits (with
        // zeros) and let the instruction run again from its replay log.
        let mut exit = v.run().unwrap();
        let mut rounds = 0;
        while matches!(exit, VcpuExit::MmioRead { .. } | VcpuExit::MmioWrite { .. }) && rounds < 600
        {
            exit = v.run().unwrap();
            rounds += 1;
        }
        if let VcpuExit::Unhandled(msg) = &exit {
            // FNSAVE / FRSTOR on MMIO: more accesses than one instruction
            // may make (the crate's replay limit), a clean stop.
            assert!(msg.contains("more than"), "{i}: {msg}");
            continue;
        }
        assert_eq!(exit, VcpuExit::Hlt, "{i} ({:02x?})", &code[..len]);
        let rip = v.get_regs().unwrap().rip;
        assert!(
            rip == CODE + len as u64 + 1 || (HANDLERS..HANDLERS + 0x1000).contains(&rip),
            "{i}: ended at {rip:#x}"
        );
        assert_eq!(v.get_fpu().unwrap().xsave.len(), 4096);
        ran += 1;
    }
    assert!(ran > 5000, "only {ran} instructions ran");
}

/// PBLENDVB / BLENDVPS / BLENDVPD with their implicit XMM0 mask, against
/// the host.
#[test]
fn variable_blends_match_the_host() {
    fn host(which: u8, mask: u128, a: u128, b: u128) -> u128 {
        use core::arch::x86_64::__m128i;
        // SAFETY: one SSE4.1 instruction on the three named registers,
        // all declared; u128 and __m128i are both 16 plain bytes.
        unsafe {
            let m: __m128i = core::mem::transmute::<u128, __m128i>(mask);
            let mut x: __m128i = core::mem::transmute::<u128, __m128i>(a);
            let y: __m128i = core::mem::transmute::<u128, __m128i>(b);
            match which {
                0 => {
                    asm!("pblendvb xmm1, xmm2", in("xmm0") m, inout("xmm1") x, in("xmm2") y, options(nostack))
                }
                1 => {
                    asm!("blendvps xmm1, xmm2", in("xmm0") m, inout("xmm1") x, in("xmm2") y, options(nostack))
                }
                _ => {
                    asm!("blendvpd xmm1, xmm2", in("xmm0") m, inout("xmm1") x, in("xmm2") y, options(nostack))
                }
            }
            core::mem::transmute::<__m128i, u128>(x)
        }
    }
    let asms: [Asm; 3] = [
        |a| a.pblendvb(xmm1, xmm2),
        |a| a.blendvps(xmm1, xmm2),
        |a| a.blendvpd(xmm1, xmm2),
    ];
    let mut rng = Rng(0xb1e4_d5b1_e4d5_0001);
    for (which, asm) in asms.iter().enumerate() {
        let mut v = with(asm);
        for _ in 0..300 {
            let (m, a, b) = (rng.edgy(), rng.edgy(), rng.edgy());
            set_gpr(&mut v, |r| r.rip = CODE);
            set_xmm(&mut v, 0, m);
            set_xmm(&mut v, 1, a);
            set_xmm(&mut v, 2, b);
            assert_eq!(run(&mut v), None);
            assert_eq!(xmm(&mut v, 1), host(which as u8, m, a, b), "blend {which}");
        }
    }
}

#[test]
fn remaining_moves_and_conversions_by_hand() {
    let mut v = with(|a| {
        a.movsldup(xmm1, xmm0)?;
        a.cvtdq2pd(xmm2, xmm3)?;
        a.extractps(eax, xmm4, 2)?;
        a.lddqu(xmm5, xmmword_ptr(rsi + 3))?;
        a.movntdqa(xmm6, xmmword_ptr(rsi + 16))?;
        a.movlps(qword_ptr(rsi + 48), xmm0)?;
        a.cvtpd2ps(xmm7, xmm2)
    });
    set_xmm(&mut v, 0, 0x4444_4444_3333_3333_2222_2222_1111_1111);
    set_xmm(&mut v, 3, u128::from((-7i32) as u32) | (5u128 << 32));
    set_xmm(&mut v, 4, f32x4([1.0, 2.0, 3.5, 4.0]));
    set_xmm(&mut v, 7, u128::MAX);
    for k in 0..48u64 {
        v.mem.write_u8(DATA + k, k as u8).unwrap();
    }
    set_gpr(&mut v, |r| r.rsi = DATA);
    assert_eq!(run(&mut v), None);
    assert_eq!(xmm(&mut v, 1), 0x3333_3333_3333_3333_1111_1111_1111_1111);
    assert_eq!(xmm(&mut v, 2), f64x2([-7.0, 5.0]));
    assert_eq!(v.get_regs().unwrap().rax, u64::from(3.5f32.to_bits()));
    assert_eq!(
        xmm(&mut v, 5),
        u128::from_le_bytes(core::array::from_fn(|k| k as u8 + 3))
    );
    assert_eq!(
        xmm(&mut v, 6),
        u128::from_le_bytes(core::array::from_fn(|k| k as u8 + 16))
    );
    assert_eq!(v.mem.read_u64(DATA + 48).unwrap(), 0x2222_2222_1111_1111);
    // CVTPD2PS zeroes the high quadword.
    assert_eq!(xmm(&mut v, 7), f32x4([-7.0, 5.0, 0.0, 0.0]));
}

#[test]
fn mxcsr_mask_offers_daz_and_ldmxcsr_takes_it() {
    let mut v = with(|a| {
        a.ldmxcsr(dword_ptr(rax))?;
        a.fxsave(ptr(rbx))?;
        a.ldmxcsr(dword_ptr(rax + 4))
    });
    v.mem.write_u32(DATA, 0x1fc0).unwrap();
    v.mem.write_u32(DATA + 4, 0x1_0000).unwrap();
    set_gpr(&mut v, |r| {
        r.rax = DATA;
        r.rbx = DATA + 0x200;
    });
    // The second LDMXCSR sets a reserved bit: #GP(0).
    assert_eq!(run(&mut v), Some(13));
    assert_eq!(v.mem.read_u32(DATA + 0x200 + 24).unwrap(), 0x1fc0);
    assert_eq!(v.mem.read_u32(DATA + 0x200 + 28).unwrap(), 0xffff);
    assert_eq!(mxcsr(&mut v), 0x1fc0);
}
