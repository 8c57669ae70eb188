//! SSE, SSE2, SSE3, SSSE3, SSE4.1 and SSE4.2 (and the MMX forms of the
//! integer instructions), executed as the SDM (vol. 2) describes them.
//!
//! State: the architectural x87 / MMX / SSE state stays in the XSAVE-layout
//! image `FpuState::xsave` (XMM*i* at 160 + 16*i*, MXCSR at 24, ST(*i*) /
//! MM at 32 + 16*i*, FSW at 2, abridged FTW at 4); the accessors below read
//! and write it in place, so `get_fpu` / `set_fpu`, FXSAVE / XSAVE and the
//! KVM fallback see exactly what the instructions wrote. Every write of an
//! SSE register sets XSTATE_BV[1] in the image's header (and an x87 / MMX
//! write XSTATE_BV[0]), so that XSAVEC and KVM_SET_XSAVE take the component.
//!
//! Floating point: the arithmetic is IEEE 754 binary32 / binary64 through
//! `rustc_apfloat` (a port of LLVM's APFloat) in the rounding mode of
//! MXCSR.RC, which returns the IEEE status (invalid, divide by zero,
//! overflow, underflow, inexact). The x86-specific parts are done here:
//! NaN propagation (SDM vol. 1, table 4-7: the first source operand's NaN,
//! quieted, wins; an invalid operation returns the negative QNaN "real
//! indefinite"), MXCSR.DAZ (denormal sources read as signed zero, no DE),
//! the DE flag for a denormal source, MXCSR.FTZ (a tiny result with UE
//! masked becomes a signed zero with UE and PE), and unmasked exceptions
//! (the destination is left unchanged, the flags are set, #XM when
//! CR4.OSXMMEXCPT else #UD; SDM vol. 1, 11.5). Tininess is taken after
//! rounding, as Intel processors detect it, with one documented gap: a
//! result that rounds up to the smallest normal only because of the
//! denormal's lower precision is reported inexact but not UE (APFloat's
//! rule). APFloat does not flag the overflow of a directed rounding that
//! returns the largest finite value; it is found in binary128. Square roots
//! use Rust's correctly rounded `sqrt` and an exact residual to round in
//! the directed modes. RCPPS / RSQRTPS (whose exact values are each
//! processor's own table) return the correctly rounded value with the low
//! 11 fraction bits cleared. DPPS / DPPD add in the order processors are
//! seen to (which NaN propagates). The arithmetic, conversions, compares,
//! integer and string instructions were checked against this host's
//! processor on random operands, MXCSR modes included (`tests_simd.rs`).
//!
//! Checks: SSE forms #UD with CR0.EM or without CR4.OSFXSR and #NM with
//! CR0.TS; MMX forms #UD with CR0.EM, #NM with CR0.TS, #MF with an x87
//! exception pending, and set TOP = 0 and all tags valid (EMMS empties);
//! legacy 16-byte memory operands must be aligned (#GP(0)) except for
//! MOVUPS / MOVUPD / MOVDQU / LDDQU / PCMPxSTRx; 16-byte stores probe both
//! pages before writing; LOCK is #UD.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use rustc_apfloat::ieee::{Double, Quad, Single};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};
use tandem_core::cpu::{cr0, cr4};

use crate::flags::{AF, CF, OF, PF, SF, ZF};
use crate::{InterpVcpu, Stop, R};

const UD: Stop = Stop::Exc(6, None);
const NM: Stop = Stop::Exc(7, None);
const MF: Stop = Stop::Exc(16, None);
const XM: Stop = Stop::Exc(19, None);
const GP0: Stop = Stop::Exc(13, Some(0));

/// Offsets in the XSAVE image (SDM vol. 1, table 10-2).
pub(crate) const FSW_OFF: usize = 2;
pub(crate) const FTW_OFF: usize = 4;
pub(crate) const MXCSR_OFF: usize = 24;
pub(crate) const ST_OFF: usize = 32;
pub(crate) const XMM_OFF: usize = 160;
pub(crate) const HEADER_OFF: usize = 512;

/// MXCSR bits (SDM vol. 1, 10.2.3).
pub(crate) mod mx {
    pub const IE: u32 = 1 << 0;
    pub const DE: u32 = 1 << 1;
    pub const ZE: u32 = 1 << 2;
    pub const OE: u32 = 1 << 3;
    pub const UE: u32 = 1 << 4;
    pub const PE: u32 = 1 << 5;
    pub const DAZ: u32 = 1 << 6;
    pub const FTZ: u32 = 1 << 15;
    pub const FLAGS: u32 = 0x3f;
}

/// The IEEE rounding mode of a 2-bit x86 rounding-control field (MXCSR.RC,
/// FCW.RC, ROUNDPS imm8[1:0]).
pub(crate) fn rc_round(rc: u32) -> Round {
    match rc & 3 {
        0 => Round::NearestTiesToEven,
        1 => Round::TowardNegative,
        2 => Round::TowardPositive,
        _ => Round::TowardZero,
    }
}

/// Lane `k` of width `w` bytes.
#[inline]
fn lane(v: u128, w: usize, k: usize) -> u64 {
    // Byte-wise rather than with a u128 shift and mask: the shift-and-mask
    // form of `set_lane` gave wrong high lanes in release builds with
    // rustc 1.95 (correct in debug; not reduced further, see the test
    // `cvtsd2ss_keeps_the_high_lanes`).
    let b = v.to_le_bytes();
    let mut out = [0u8; 8];
    for (j, o) in out.iter_mut().enumerate().take(w.min(8)) {
        *o = b.get(w * k + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(out)
}

#[inline]
fn set_lane(v: u128, w: usize, k: usize, x: u64) -> u128 {
    let mut b = v.to_le_bytes();
    let xb = x.to_le_bytes();
    for j in 0..w.min(8) {
        if let (Some(d), Some(s)) = (b.get_mut(w * k + j), xb.get(j)) {
            *d = *s;
        }
    }
    u128::from_le_bytes(b)
}

#[inline]
fn sx(x: u64, w: usize) -> i64 {
    let sh = 64 - 8 * w as u32;
    ((x << sh) as i64) >> sh
}

fn sat_s(x: i64, w: usize) -> u64 {
    let max = (1i64 << (8 * w - 1)) - 1;
    x.clamp(-max - 1, max) as u64
}

fn sat_u(x: i64, w: usize) -> u64 {
    let max = (1i64 << (8 * w)) - 1;
    x.clamp(0, max) as u64
}

/// Element-wise `f` over `n` bytes (8 for MMX, 16 for XMM) of lanes of `w`
/// bytes.
fn map2(a: u128, b: u128, w: usize, n: usize, f: impl Fn(u64, u64) -> u64) -> u128 {
    let mut r = 0u128;
    for k in 0..n / w {
        r = set_lane(r, w, k, f(lane(a, w, k), lane(b, w, k)));
    }
    r
}

/// Binary32 or binary64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum P {
    S,
    D,
}

impl P {
    fn w(self) -> usize {
        match self {
            P::S => 4,
            P::D => 8,
        }
    }
    fn frac(self) -> u64 {
        match self {
            P::S => 0x007f_ffff,
            P::D => 0x000f_ffff_ffff_ffff,
        }
    }
    fn exp(self) -> u64 {
        match self {
            P::S => 0x7f80_0000,
            P::D => 0x7ff0_0000_0000_0000,
        }
    }
    fn sign(self) -> u64 {
        match self {
            P::S => 1 << 31,
            P::D => 1 << 63,
        }
    }
    fn quiet(self) -> u64 {
        (self.frac() + 1) >> 1
    }
    fn is_nan(self, x: u64) -> bool {
        x & self.exp() == self.exp() && x & self.frac() != 0
    }
    fn is_snan(self, x: u64) -> bool {
        self.is_nan(x) && x & self.quiet() == 0
    }
    fn is_denorm(self, x: u64) -> bool {
        x & self.exp() == 0 && x & self.frac() != 0
    }
    fn is_zero(self, x: u64) -> bool {
        x & !self.sign() == 0
    }
    fn neg(self, x: u64) -> bool {
        x & self.sign() != 0
    }
    /// The QNaN floating-point indefinite.
    fn indefinite(self) -> u64 {
        self.sign() | self.exp() | self.quiet()
    }
    fn to_f64(self, x: u64) -> f64 {
        match self {
            P::S => f64::from(f32::from_bits(x as u32)),
            P::D => f64::from_bits(x),
        }
    }
}

/// The binary operations done through APFloat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FOp {
    Add,
    Sub,
    Mul,
    Div,
}

fn ap_bin<F: Float>(op: FOp, a: u64, b: u64, rnd: Round) -> StatusAnd<u64> {
    let (x, y) = (F::from_bits(u128::from(a)), F::from_bits(u128::from(b)));
    let r = match op {
        FOp::Add => x.add_r(y, rnd),
        FOp::Sub => x.sub_r(y, rnd),
        FOp::Mul => x.mul_r(y, rnd),
        FOp::Div => x.div_r(y, rnd),
    };
    r.map(|v| v.to_bits() as u64)
}

/// Whether `a op b`, truncated toward zero in binary128, is at least
/// 2^(Emax+1) of `p` in magnitude.
fn ap_bin_wide(p: P, op: FOp, a: u64, b: u64) -> bool {
    let mut li = false;
    let wide = |x: u64| -> Quad {
        match p {
            P::S => {
                Single::from_bits(u128::from(x))
                    .convert_r(Round::TowardZero, &mut li.clone())
                    .value
            }
            P::D => {
                Double::from_bits(u128::from(x))
                    .convert_r(Round::TowardZero, &mut li.clone())
                    .value
            }
        }
    };
    let (x, y) = (wide(a), wide(b));
    let r = match op {
        FOp::Add => x.add_r(y, Round::TowardZero),
        FOp::Sub => x.sub_r(y, Round::TowardZero),
        FOp::Mul => x.mul_r(y, Round::TowardZero),
        FOp::Div => x.div_r(y, Round::TowardZero),
    }
    .value;
    li = false;
    let _ = li;
    let emax1 = match p {
        P::S => 128,
        P::D => 1024,
    };
    r.abs().ilogb() >= emax1 && r.is_finite()
}

fn ap_from_int<F: Float>(v: i64, rnd: Round) -> StatusAnd<u64> {
    F::from_i128_r(i128::from(v), rnd).map(|f| f.to_bits() as u64)
}

fn ap_to_int<F: Float>(x: u64, width: usize, rnd: Round) -> (Status, bool, i128) {
    let mut exact = false;
    let r = F::from_bits(u128::from(x)).to_i128_r(width, rnd, &mut exact);
    (r.status, exact, r.value)
}

fn ap_round_int<F: Float>(x: u64, rnd: Round) -> StatusAnd<u64> {
    F::from_bits(u128::from(x))
        .round_to_integral(rnd)
        .map(|v| v.to_bits() as u64)
}

/// The SIMD floating-point context of one instruction: MXCSR and the
/// exception flags its elements raise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fx {
    pub mxcsr: u32,
    pub flags: u32,
}

impl Fx {
    pub(crate) fn new(mxcsr: u32) -> Fx {
        Fx { mxcsr, flags: 0 }
    }

    fn round(&self) -> Round {
        rc_round(self.mxcsr >> 13)
    }

    fn masked(&self, f: u32) -> bool {
        (self.mxcsr >> 7) & f == f
    }

    /// A source operand as the operation sees it: DAZ makes a denormal a
    /// signed zero.
    fn daz(&self, p: P, x: u64) -> u64 {
        if self.mxcsr & mx::DAZ != 0 && p.is_denorm(x) {
            x & p.sign()
        } else {
            x
        }
    }

    /// NaN sources (SDM vol. 1, table 4-7): IE for an SNaN; the first NaN
    /// operand, quieted, is the result.
    fn nan2(&mut self, p: P, a: u64, b: u64) -> Option<u64> {
        if !p.is_nan(a) && !p.is_nan(b) {
            return None;
        }
        if p.is_snan(a) || p.is_snan(b) {
            self.flags |= mx::IE;
        }
        Some(if p.is_nan(a) { a } else { b } | p.quiet())
    }

    fn denorm2(&mut self, p: P, a: u64, b: u64) {
        if p.is_denorm(a) || p.is_denorm(b) {
            self.flags |= mx::DE;
        }
    }

    /// Turns APFloat's status into MXCSR flags and applies FTZ.
    fn post(&mut self, p: P, r: StatusAnd<u64>) -> u64 {
        let st = r.status;
        let mut v = r.value;
        if st.contains(Status::INVALID_OP) {
            self.flags |= mx::IE;
            return p.indefinite();
        }
        if st.contains(Status::DIV_BY_ZERO) {
            self.flags |= mx::ZE;
        }
        if st.contains(Status::OVERFLOW) {
            self.flags |= mx::OE;
        }
        let inexact = st.contains(Status::INEXACT);
        let tiny = p.is_denorm(v) || st.contains(Status::UNDERFLOW);
        if tiny {
            if self.masked(mx::UE) {
                if self.mxcsr & mx::FTZ != 0 {
                    self.flags |= mx::UE | mx::PE;
                    v &= p.sign();
                    return v;
                }
                if inexact {
                    self.flags |= mx::UE;
                }
            } else {
                // Unmasked: tininess alone raises UE (SDM vol. 1, 4.9.1.5).
                self.flags |= mx::UE;
            }
        }
        if inexact {
            self.flags |= mx::PE;
        }
        v
    }

    pub(crate) fn arith(&mut self, p: P, op: FOp, a: u64, b: u64) -> u64 {
        let (a, b) = (self.daz(p, a), self.daz(p, b));
        if let Some(n) = self.nan2(p, a, b) {
            return n;
        }
        self.denorm2(p, a, b);
        let rnd = self.round();
        let mut r = match p {
            P::S => ap_bin::<Single>(op, a, b, rnd),
            P::D => ap_bin::<Double>(op, a, b, rnd),
        };
        if r.value & !p.sign() == p.exp() - 1 && r.status.contains(Status::INEXACT) {
            // The largest finite result of a directed rounding: APFloat does
            // not say whether it overflowed (SDM vol. 1, 4.9.1.4: the result
            // rounded with an unbounded exponent exceeds the largest
            // finite one). Truncated in binary128 it reaches 2^(Emax+1)
            // exactly when the true value does.
            let q = ap_bin_wide(p, op, a, b);
            if q {
                r.status |= Status::OVERFLOW;
            }
        }
        self.post(p, r)
    }

    pub(crate) fn sqrt(&mut self, p: P, a: u64) -> u64 {
        let a = self.daz(p, a);
        if p.is_nan(a) {
            if p.is_snan(a) {
                self.flags |= mx::IE;
            }
            return a | p.quiet();
        }
        if p.is_zero(a) {
            return a;
        }
        if p.neg(a) {
            self.flags |= mx::IE;
            return p.indefinite();
        }
        if p.is_denorm(a) {
            self.flags |= mx::DE;
        }
        if a == p.exp() {
            return a;
        }
        let (r, inexact) = sqrt_round(p, a, self.round());
        if inexact {
            self.flags |= mx::PE;
        }
        r
    }

    /// MINPS / MAXPS and friends: any NaN or two zeros give the second
    /// operand (SDM vol. 2, MINPS).
    pub(crate) fn minmax(&mut self, p: P, a: u64, b: u64, max: bool) -> u64 {
        let (a, b) = (self.daz(p, a), self.daz(p, b));
        if p.is_nan(a) || p.is_nan(b) {
            self.flags |= mx::IE;
            return b;
        }
        self.denorm2(p, a, b);
        let (x, y) = (p.to_f64(a), p.to_f64(b));
        let first = if max { x > y } else { x < y };
        if first {
            a
        } else {
            b
        }
    }

    /// CMPPS predicate `pred` (imm8[2:0]): all ones or zero.
    pub(crate) fn cmp(&mut self, p: P, a: u64, b: u64, pred: u8) -> u64 {
        let (a, b) = (self.daz(p, a), self.daz(p, b));
        let unord = p.is_nan(a) || p.is_nan(b);
        let signaling = matches!(pred & 7, 1 | 2 | 5 | 6);
        if (unord && signaling) || p.is_snan(a) || p.is_snan(b) {
            self.flags |= mx::IE;
        }
        if !unord {
            self.denorm2(p, a, b);
        }
        let (x, y) = (p.to_f64(a), p.to_f64(b));
        let t = match pred & 7 {
            0 => x == y,
            1 => x < y,
            2 => x <= y,
            3 => unord,
            4 => x != y || unord,
            5 => !matches!(x.partial_cmp(&y), Some(std::cmp::Ordering::Less)),
            6 => !matches!(
                x.partial_cmp(&y),
                Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
            ),
            _ => !unord,
        };
        if t {
            u64::MAX >> (64 - 8 * p.w())
        } else {
            0
        }
    }

    /// COMISS / UCOMISS: the ZF, PF, CF triple (SDM vol. 2, COMISS).
    pub(crate) fn comi(&mut self, p: P, a: u64, b: u64, signaling: bool) -> u64 {
        let (a, b) = (self.daz(p, a), self.daz(p, b));
        let unord = p.is_nan(a) || p.is_nan(b);
        if (unord && signaling) || p.is_snan(a) || p.is_snan(b) {
            self.flags |= mx::IE;
        }
        if unord {
            return ZF | PF | CF;
        }
        self.denorm2(p, a, b);
        let (x, y) = (p.to_f64(a), p.to_f64(b));
        if x == y {
            ZF
        } else if x < y {
            CF
        } else {
            0
        }
    }

    /// A signed integer of `width` bits to `p` (CVTSI2SS, CVTDQ2PS...).
    pub(crate) fn int_to_fp(&mut self, p: P, v: i64) -> u64 {
        let rnd = self.round();
        let r = match p {
            P::S => ap_from_int::<Single>(v, rnd),
            P::D => ap_from_int::<Double>(v, rnd),
        };
        self.post(p, r)
    }

    /// `p` to a signed integer of `width` bits (CVTSS2SI, CVTTPD2DQ...):
    /// NaN or out of range gives IE and the integer indefinite.
    pub(crate) fn fp_to_int(&mut self, p: P, x: u64, width: usize, truncate: bool) -> u64 {
        let x = self.daz(p, x);
        let indefinite = 1u64 << (width - 1);
        if p.is_nan(x) {
            self.flags |= mx::IE;
            return indefinite;
        }
        let rnd = if truncate {
            Round::TowardZero
        } else {
            self.round()
        };
        let (st, exact, v) = match p {
            P::S => ap_to_int::<Single>(x, width, rnd),
            P::D => ap_to_int::<Double>(x, width, rnd),
        };
        if st.contains(Status::INVALID_OP) {
            self.flags |= mx::IE;
            return indefinite;
        }
        if !exact {
            self.flags |= mx::PE;
        }
        (v as u64) & (u64::MAX >> (64 - width))
    }

    /// CVTSS2SD / CVTSD2SS.
    pub(crate) fn convert(&mut self, from: P, to: P, x: u64) -> u64 {
        let x = self.daz(from, x);
        if from.is_nan(x) {
            if from.is_snan(x) {
                self.flags |= mx::IE;
            }
            let neg = from.neg(x);
            let r = match (from, to) {
                (P::S, P::D) => (x & from.frac()) << 29,
                (P::D, P::S) => (x & from.frac()) >> 29,
                _ => x & from.frac(),
            };
            return (if neg { to.sign() } else { 0 }) | to.exp() | to.quiet() | r;
        }
        if from.is_denorm(x) {
            self.flags |= mx::DE;
        }
        let rnd = self.round();
        let mut li = false;
        let r = match (from, to) {
            (P::S, P::D) => {
                let v: StatusAnd<Double> = Single::from_bits(u128::from(x)).convert_r(rnd, &mut li);
                v.map(|f| f.to_bits() as u64)
            }
            (P::D, P::S) => {
                let v: StatusAnd<Single> = Double::from_bits(u128::from(x)).convert_r(rnd, &mut li);
                v.map(|f| f.to_bits() as u64)
            }
            _ => Status::OK.and(x),
        };
        let mut r = r;
        if from == P::D && to == P::S {
            // Overflow by the same definition as in `arith`: |x| >= 2^128.
            if (x >> 52) & 0x7ff >= 1023 + 128 && x & P::D.exp() != P::D.exp() {
                r.status |= Status::OVERFLOW;
            }
        }
        self.post(to, r)
    }

    /// ROUNDPS-family: imm8[1:0] rounding unless imm8[2] (MXCSR.RC);
    /// imm8[3] suppresses PE.
    pub(crate) fn round_int(&mut self, p: P, x: u64, imm: u8) -> u64 {
        let x = self.daz(p, x);
        if p.is_nan(x) {
            if p.is_snan(x) {
                self.flags |= mx::IE;
            }
            return x | p.quiet();
        }
        let rnd = if imm & 4 != 0 {
            self.round()
        } else {
            rc_round(u32::from(imm))
        };
        let r = match p {
            P::S => ap_round_int::<Single>(x, rnd),
            P::D => ap_round_int::<Double>(x, rnd),
        };
        if r.status.contains(Status::INEXACT) && imm & 8 == 0 {
            self.flags |= mx::PE;
        }
        r.value
    }
}

/// A correctly rounded square root of the positive finite non-zero `a` in
/// rounding mode `rnd`; also whether it is inexact. The host's `sqrt` is
/// correctly rounded to nearest (IEEE 754); the residual r*r - a, exact
/// for binary32 in binary64 and through a fused multiply-add for binary64,
/// tells on which side of the root r lies, for the directed modes.
fn sqrt_round(p: P, a: u64, rnd: Round) -> (u64, bool) {
    match p {
        P::S => {
            let x = f64::from(f32::from_bits(a as u32));
            let mut r = x.sqrt() as f32;
            let sq = f64::from(r) * f64::from(r);
            let (below, above) = (sq < x, sq > x);
            match rnd {
                Round::TowardPositive if below => r = f32_next(r, true),
                Round::TowardNegative | Round::TowardZero if above => r = f32_next(r, false),
                _ => {}
            }
            (u64::from(r.to_bits()), below || above)
        }
        P::D => {
            let mut x = f64::from_bits(a);
            // Scale tiny inputs so that the residual cannot underflow.
            let scaled = x < f64::from_bits(0x0c00_0000_0000_0000);
            if scaled {
                x *= f64::from_bits(0x7e70_0000_0000_0000); // 2^1000
            }
            let mut r = x.sqrt();
            let res = r.mul_add(r, -x);
            let (below, above) = (res < 0.0, res > 0.0);
            match rnd {
                Round::TowardPositive if below => r = f64_next(r, true),
                Round::TowardNegative | Round::TowardZero if above => r = f64_next(r, false),
                _ => {}
            }
            if scaled {
                r *= f64::from_bits(0x20b0_0000_0000_0000); // 2^-500
            }
            (r.to_bits(), below || above)
        }
    }
}

fn f32_next(r: f32, up: bool) -> f32 {
    let b = r.to_bits();
    f32::from_bits(if up { b + 1 } else { b - 1 })
}

fn f64_next(r: f64, up: bool) -> f64 {
    let b = r.to_bits();
    f64::from_bits(if up { b + 1 } else { b - 1 })
}

/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) over the low
/// `n` bytes of `data`, the CRC32 instruction's definition.
pub(crate) fn crc32c(mut crc: u32, data: u64, n: usize) -> u32 {
    for k in 0..n {
        crc ^= u32::from((data >> (8 * k)) as u8);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Legacy-SSE instructions whose 16-byte memory operand need not be
/// aligned (everything else faults with #GP(0), SDM vol. 1, 11.6.8 / 12.10.3).
fn unaligned_ok(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Movups
            | Mnemonic::Movupd
            | Mnemonic::Movdqu
            | Mnemonic::Lddqu
            | Mnemonic::Pcmpestri
            | Mnemonic::Pcmpestri64
            | Mnemonic::Pcmpestrm
            | Mnemonic::Pcmpestrm64
            | Mnemonic::Pcmpistri
            | Mnemonic::Pcmpistrm
    )
}

impl InterpVcpu {
    // ---- state in the XSAVE image ----

    fn img_get(&self, off: usize, n: usize) -> u128 {
        let mut b = [0u8; 16];
        if let (Some(s), Some(d)) = (self.fpu.xsave.get(off..off + n), b.get_mut(..n)) {
            d.copy_from_slice(s);
        }
        u128::from_le_bytes(b)
    }

    fn img_set(&mut self, off: usize, n: usize, v: u128) {
        if self.fpu.xsave.len() < 4096 {
            self.fpu.xsave.resize(4096, 0);
        }
        let b = v.to_le_bytes();
        if let (Some(d), Some(s)) = (self.fpu.xsave.get_mut(off..off + n), b.get(..n)) {
            d.copy_from_slice(s);
        }
    }

    /// Marks state component `bit` (0 x87, 1 SSE) in use in XSTATE_BV.
    pub(crate) fn xinuse(&mut self, bit: u32) {
        let bv = self.img_get(HEADER_OFF, 8) | (1 << bit);
        self.img_set(HEADER_OFF, 8, bv);
    }

    pub(crate) fn xmm(&self, n: usize) -> u128 {
        self.img_get(XMM_OFF + 16 * (n & 15), 16)
    }

    pub(crate) fn set_xmm(&mut self, n: usize, v: u128) {
        self.img_set(XMM_OFF + 16 * (n & 15), 16, v);
        self.xinuse(1);
    }

    pub(crate) fn mxcsr(&self) -> u32 {
        self.img_get(MXCSR_OFF, 4) as u32
    }

    pub(crate) fn set_mxcsr(&mut self, v: u32) {
        self.img_set(MXCSR_OFF, 4, u128::from(v));
        if v != 0x1f80 {
            // KVM_SET_XSAVE takes MXCSR only with SSE in use (xsave.rs).
            self.xinuse(1);
        }
    }

    pub(crate) fn fsw(&self) -> u16 {
        self.img_get(FSW_OFF, 2) as u16
    }

    pub(crate) fn set_fsw(&mut self, v: u16) {
        self.img_set(FSW_OFF, 2, u128::from(v));
    }

    /// Makes the x87 stack top 0 and all registers valid, as every MMX
    /// instruction does (SDM vol. 1, 9.5.1): the image keeps ST(i) in
    /// slot i, so the slots rotate to physical order first.
    fn mmx_enter(&mut self) {
        let top = usize::from((self.fsw() >> 11) & 7);
        if top != 0 {
            let regs: [u128; 8] = core::array::from_fn(|k| self.img_get(ST_OFF + 16 * k, 16));
            for (k, r) in regs.iter().enumerate() {
                // Slot k holds physical register (top + k) & 7.
                self.img_set(ST_OFF + 16 * ((top + k) & 7), 16, *r);
            }
            let fsw = self.fsw() & !(7 << 11);
            self.set_fsw(fsw);
        }
        self.img_set(FTW_OFF, 1, 0xff);
        self.xinuse(0);
    }

    fn mm(&self, n: usize) -> u64 {
        self.img_get(ST_OFF + 16 * (n & 7), 8) as u64
    }

    /// An MMX register write: bits 79:64 of the x87 register become all
    /// ones (SDM vol. 1, 9.5.1).
    fn set_mm(&mut self, n: usize, v: u64) {
        let r = u128::from(v) | (0xffffu128 << 64);
        self.img_set(ST_OFF + 16 * (n & 7), 16, r);
        self.xinuse(0);
    }

    /// A vector or general register's value.
    fn vreg(&self, r: Register) -> u128 {
        if r.is_xmm() {
            self.xmm(r.number())
        } else if r.is_mm() {
            u128::from(self.mm(r.number()))
        } else {
            u128::from(self.reg_read(r))
        }
    }

    fn set_vreg(&mut self, r: Register, v: u128) {
        if r.is_xmm() {
            self.set_xmm(r.number(), v);
        } else if r.is_mm() {
            self.set_mm(r.number(), v as u64);
        } else {
            self.reg_write(r, v as u64);
        }
    }

    // ---- memory ----

    /// Reads `size` (1..=16) bytes at `seg:ea`, as two halves past 8.
    pub(crate) fn mem_read_v(&mut self, seg: Register, ea: u64, size: usize) -> R<u128> {
        if size <= 8 {
            return Ok(u128::from(self.read_mem(seg, ea, size)?));
        }
        let lo = self.read_mem(seg, ea, 8)?;
        let hi = self.read_mem(seg, ea.wrapping_add(8), size - 8)?;
        Ok(u128::from(lo) | (u128::from(hi) << 64))
    }

    /// Writes `size` (1..=16) bytes at `seg:ea`. Both ends are probed first,
    /// so that a fault on the second half leaves memory unchanged.
    pub(crate) fn mem_write_v(&mut self, seg: Register, ea: u64, size: usize, v: u128) -> R<()> {
        if size <= 8 {
            return self.write_mem(seg, ea, size, v as u64);
        }
        let user = self.cpl() == 3;
        let la = self.linear(seg, ea)?;
        let la2 = self.linear(seg, ea.wrapping_add(size as u64 - 1))?;
        self.probe_write(la, user)?;
        if la2 & !0xfff != la & !0xfff {
            // CR2 names the first byte of the second page.
            self.probe_write(la2 & !0xfff, user)?;
        }
        self.write_mem(seg, ea, 8, v as u64)?;
        self.write_mem(seg, ea.wrapping_add(8), size - 8, (v >> 64) as u64)
    }

    /// Operand `n`: a register, or `size` bytes of memory (16-byte operands
    /// of aligned forms must be 16-byte aligned), or an immediate.
    fn src(&mut self, i: &Instruction, n: u32, size: usize) -> R<u128> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.vreg(i.op_register(n))),
            OpKind::Memory => {
                let seg = i.memory_segment();
                let ea = self.ea(i);
                let size = match i.memory_size().size() {
                    s @ 1..=16 => s,
                    _ => size,
                };
                if size == 16 && !unaligned_ok(i.mnemonic()) {
                    let la = self.linear(seg, ea)?;
                    if la % 16 != 0 {
                        return Err(GP0);
                    }
                }
                self.mem_read_v(seg, ea, size)
            }
            _ => Ok(u128::from(i.immediate(n))),
        }
    }

    /// Writes operand `n`: a whole register (the caller merged what the
    /// instruction keeps), or `size` bytes of memory.
    fn dst(&mut self, i: &Instruction, n: u32, size: usize, v: u128) -> R<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.set_vreg(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let seg = i.memory_segment();
                let ea = self.ea(i);
                let size = match i.memory_size().size() {
                    s @ 1..=16 => s,
                    _ => size,
                };
                if size == 16 && !unaligned_ok(i.mnemonic()) {
                    let la = self.linear(seg, ea)?;
                    if la % 16 != 0 {
                        return Err(GP0);
                    }
                }
                self.mem_write_v(seg, ea, size, v)
            }
            _ => Err(UD),
        }
    }

    /// The register number of operand `n` (an XMM or MM register).
    fn rn(i: &Instruction, n: u32) -> usize {
        i.op_register(n).number()
    }

    // ---- checks ----

    /// SSE instructions: #UD with CR0.EM or without CR4.OSFXSR, #NM with
    /// CR0.TS (SDM vol. 2, 2.5, exception class 1-4 tables; vol. 3, 2.5 on
    /// CR0.EM / TS).
    pub(crate) fn sse_avail(&self) -> R<()> {
        let c0 = self.sregs.cr0;
        if c0 & cr0::EM != 0 || self.sregs.cr4 & cr4::OSFXSR == 0 {
            return Err(UD);
        }
        if c0 & cr0::TS != 0 {
            return Err(NM);
        }
        Ok(())
    }

    /// MMX instructions: #UD with CR0.EM, #NM with CR0.TS, #MF with an
    /// x87 exception pending and CR0.NE (SDM vol. 2, 2.5, "Exceptions Type
    /// for legacy MMX instructions").
    fn mmx_avail(&self) -> R<()> {
        let c0 = self.sregs.cr0;
        if c0 & cr0::EM != 0 {
            return Err(UD);
        }
        if c0 & cr0::TS != 0 {
            return Err(NM);
        }
        if self.fsw() & 0x80 != 0 && c0 & cr0::NE != 0 {
            return Err(MF);
        }
        Ok(())
    }

    /// Sets the MXCSR flags `fx` raised; an unmasked one is #XM (or #UD
    /// without CR4.OSXMMEXCPT) and the destination must stay unchanged.
    pub(crate) fn fp_commit(&mut self, fx: &Fx) -> R<()> {
        let unmasked = fx.flags & !(fx.mxcsr >> 7) & mx::FLAGS;
        let mut flags = fx.flags;
        if unmasked & (mx::IE | mx::DE | mx::ZE) != 0 {
            // Pre-computation exceptions are reported without the
            // post-computation ones (SDM vol. 1, 11.5.2.1).
            flags &= mx::IE | mx::DE | mx::ZE;
        }
        self.set_mxcsr(fx.mxcsr | flags);
        if unmasked != 0 {
            return Err(if self.sregs.cr4 & cr4::OSXMMEXCPT != 0 {
                XM
            } else {
                UD
            });
        }
        Ok(())
    }

    /// Executes `m` when it is an SSE / MMX instruction; `None` otherwise.
    pub(crate) fn exec_simd(&mut self, i: &Instruction, m: Mnemonic) -> Option<R<()>> {
        if let Some(r) = self.exec_x87(i, m) {
            return Some(r);
        }
        if !is_simd(m) {
            return None;
        }
        if i.has_lock_prefix() {
            // LOCK with an SSE / MMX instruction is #UD (SDM vol. 2, 2.5).
            return Some(Err(UD));
        }
        match m {
            // General-purpose instructions of the SSE families.
            Mnemonic::Crc32 => return Some(self.exec_crc32(i)),
            Mnemonic::Movnti => {
                let s = i.op_register(1).size();
                return Some(self.src(i, 1, s).and_then(|v| self.dst(i, 0, s, v)));
            }
            _ => {}
        }
        let mmx =
            (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && i.op_register(n).is_mm());
        let check = if mmx || m == Mnemonic::Emms {
            self.mmx_avail()
        } else {
            self.sse_avail()
        };
        if let Err(e) = check {
            return Some(Err(e));
        }
        if m == Mnemonic::Emms {
            // All x87 registers empty (SDM vol. 2, EMMS).
            self.img_set(FTW_OFF, 1, 0);
            return Some(Ok(()));
        }
        if mmx {
            self.mmx_enter();
        }
        let width = if mmx { 8 } else { 16 };
        Some(
            self.exec_sse_move(i, m, width)
                .or_else(|| self.exec_sse_int(i, m, width))
                .or_else(|| self.exec_sse_fp(i, m))
                .unwrap_or(Err(UD)),
        )
    }

    fn exec_crc32(&mut self, i: &Instruction) -> R<()> {
        let s = match i.op_kind(1) {
            OpKind::Register => i.op_register(1).size(),
            _ => i.memory_size().size(),
        };
        let data = self.src(i, 1, s)? as u64;
        let crc = self.reg_read(i.op_register(0)) as u32;
        let r = crc32c(crc, data, s);
        self.reg_write(i.op_register(0), u64::from(r));
        Ok(())
    }

    // ---- moves ----

    fn exec_sse_move(&mut self, i: &Instruction, m: Mnemonic, width: usize) -> Option<R<()>> {
        if !is_move(m) {
            return None;
        }
        Some(self.sse_move(i, m, width))
    }

    fn sse_move(&mut self, i: &Instruction, m: Mnemonic, width: usize) -> R<()> {
        let k0 = i.op_kind(0);
        let k1 = i.op_kind(1);
        match m {
            Mnemonic::Movaps
            | Mnemonic::Movapd
            | Mnemonic::Movdqa
            | Mnemonic::Movups
            | Mnemonic::Movupd
            | Mnemonic::Movdqu
            | Mnemonic::Lddqu
            | Mnemonic::Movntps
            | Mnemonic::Movntpd
            | Mnemonic::Movntdq
            | Mnemonic::Movntdqa => {
                let v = self.src(i, 1, 16)?;
                self.dst(i, 0, 16, v)
            }
            Mnemonic::Movntq => {
                let v = self.src(i, 1, 8)?;
                self.dst(i, 0, 8, v)
            }
            Mnemonic::Movss | Mnemonic::Movsd => {
                let w = if m == Mnemonic::Movss { 4 } else { 8 };
                let lm = (1u128 << (8 * w)) - 1;
                if k0 == OpKind::Memory {
                    let v = self.xmm(Self::rn(i, 1));
                    self.dst(i, 0, w, v & lm)
                } else if k1 == OpKind::Memory {
                    let v = self.src(i, 1, w)?;
                    self.set_xmm(Self::rn(i, 0), v & lm);
                    Ok(())
                } else {
                    let d = Self::rn(i, 0);
                    let v = (self.xmm(d) & !lm) | (self.xmm(Self::rn(i, 1)) & lm);
                    self.set_xmm(d, v);
                    Ok(())
                }
            }
            Mnemonic::Movd | Mnemonic::Movq => {
                // The size: the general register's, the memory operand's, or
                // 8 between two vector registers (MOVQ xmm, xmm).
                let mut s = 8;
                for n in 0..2 {
                    match i.op_kind(n) {
                        OpKind::Memory => s = i.memory_size().size(),
                        OpKind::Register if i.op_register(n).is_gpr() => {
                            s = i.op_register(n).size()
                        }
                        _ => {}
                    }
                }
                let v = self.src(i, 1, s)? & ((1u128 << (8 * s)) - 1);
                self.dst(i, 0, s, v)
            }
            Mnemonic::Movq2dq => {
                let v = self.mm(Self::rn(i, 1));
                self.set_xmm(Self::rn(i, 0), u128::from(v));
                Ok(())
            }
            Mnemonic::Movdq2q => {
                let v = self.xmm(Self::rn(i, 1)) as u64;
                self.set_mm(Self::rn(i, 0), v);
                Ok(())
            }
            Mnemonic::Movhps | Mnemonic::Movhpd | Mnemonic::Movlps | Mnemonic::Movlpd => {
                let high = matches!(m, Mnemonic::Movhps | Mnemonic::Movhpd);
                let sh = if high { 64 } else { 0 };
                if k0 == OpKind::Memory {
                    let v = (self.xmm(Self::rn(i, 1)) >> sh) as u64;
                    self.dst(i, 0, 8, u128::from(v))
                } else {
                    let v = self.src(i, 1, 8)? & u128::from(u64::MAX);
                    let d = Self::rn(i, 0);
                    let keep = !(u128::from(u64::MAX) << sh);
                    let r = (self.xmm(d) & keep) | (v << sh);
                    self.set_xmm(d, r);
                    Ok(())
                }
            }
            Mnemonic::Movhlps | Mnemonic::Movlhps => {
                let d = Self::rn(i, 0);
                let (a, b) = (self.xmm(d), self.xmm(Self::rn(i, 1)));
                let lo64 = u128::from(u64::MAX);
                let r = if m == Mnemonic::Movhlps {
                    (a & !lo64) | (b >> 64)
                } else {
                    (a & lo64) | (b << 64)
                };
                self.set_xmm(d, r);
                Ok(())
            }
            Mnemonic::Movmskps | Mnemonic::Movmskpd | Mnemonic::Pmovmskb => {
                let v = self.vreg(i.op_register(1));
                let (w, n) = match m {
                    Mnemonic::Movmskps => (4, 4),
                    Mnemonic::Movmskpd => (8, 2),
                    _ => (1, width),
                };
                let mut r = 0u64;
                for k in 0..n {
                    r |= (lane(v, w, k) >> (8 * w - 1)) << k;
                }
                self.reg_write(i.op_register(0), r);
                Ok(())
            }
            Mnemonic::Movddup => {
                let v = self.src(i, 1, 8)? as u64;
                self.set_xmm(Self::rn(i, 0), u128::from(v) | (u128::from(v) << 64));
                Ok(())
            }
            Mnemonic::Movshdup | Mnemonic::Movsldup => {
                let v = self.src(i, 1, 16)?;
                let o = usize::from(m == Mnemonic::Movshdup);
                let mut r = 0;
                for k in 0..4 {
                    r = set_lane(r, 4, k, lane(v, 4, (k & !1) + o));
                }
                self.set_xmm(Self::rn(i, 0), r);
                Ok(())
            }
            Mnemonic::Maskmovdqu | Mnemonic::Maskmovq => {
                // Operands: the implicit [rDI], the data, the byte mask.
                let n = i.op_count();
                let v = self.vreg(i.op_register(n - 2));
                let mask = self.vreg(i.op_register(n - 1));
                let a = self.gpr[7];
                let rdi = match i.op_kind(0) {
                    OpKind::MemorySegDI => a & 0xffff,
                    OpKind::MemorySegEDI => a & 0xffff_ffff,
                    _ => a,
                };
                let seg = i.memory_segment();
                for k in 0..width {
                    if lane(mask, 1, k) & 0x80 != 0 {
                        self.write_mem(seg, rdi.wrapping_add(k as u64), 1, lane(v, 1, k))?;
                    }
                }
                Ok(())
            }
            _ => Err(UD),
        }
    }
}

/// Mnemonics this module executes (the x87 ones are in `x87.rs`).
fn is_simd(m: Mnemonic) -> bool {
    is_move(m) || is_int(m) || is_fp(m) || matches!(m, Mnemonic::Crc32 | Mnemonic::Emms)
}

fn is_move(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Movaps
            | Movapd
            | Movdqa
            | Movups
            | Movupd
            | Movdqu
            | Lddqu
            | Movntps
            | Movntpd
            | Movntdq
            | Movntdqa
            | Movntq
            | Movnti
            | Movss
            | Movsd
            | Movd
            | Movq
            | Movq2dq
            | Movdq2q
            | Movhps
            | Movhpd
            | Movlps
            | Movlpd
            | Movhlps
            | Movlhps
            | Movmskps
            | Movmskpd
            | Pmovmskb
            | Movddup
            | Movshdup
            | Movsldup
            | Maskmovdqu
            | Maskmovq
    )
}

fn is_int(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Paddb
            | Paddw
            | Paddd
            | Paddq
            | Psubb
            | Psubw
            | Psubd
            | Psubq
            | Paddsb
            | Paddsw
            | Paddusb
            | Paddusw
            | Psubsb
            | Psubsw
            | Psubusb
            | Psubusw
            | Pcmpeqb
            | Pcmpeqw
            | Pcmpeqd
            | Pcmpeqq
            | Pcmpgtb
            | Pcmpgtw
            | Pcmpgtd
            | Pcmpgtq
            | Pminub
            | Pmaxub
            | Pminsw
            | Pmaxsw
            | Pminsb
            | Pmaxsb
            | Pminsd
            | Pmaxsd
            | Pminuw
            | Pmaxuw
            | Pminud
            | Pmaxud
            | Pavgb
            | Pavgw
            | Pmullw
            | Pmulhw
            | Pmulhuw
            | Pmulld
            | Pmulhrsw
            | Pmuludq
            | Pmuldq
            | Pmaddwd
            | Pmaddubsw
            | Psadbw
            | Pabsb
            | Pabsw
            | Pabsd
            | Psignb
            | Psignw
            | Psignd
            | Pand
            | Pandn
            | Por
            | Pxor
            | Andps
            | Andpd
            | Andnps
            | Andnpd
            | Orps
            | Orpd
            | Xorps
            | Xorpd
            | Punpcklbw
            | Punpcklwd
            | Punpckldq
            | Punpcklqdq
            | Punpckhbw
            | Punpckhwd
            | Punpckhdq
            | Punpckhqdq
            | Unpcklps
            | Unpckhps
            | Unpcklpd
            | Unpckhpd
            | Packsswb
            | Packssdw
            | Packuswb
            | Packusdw
            | Phaddw
            | Phaddd
            | Phsubw
            | Phsubd
            | Phaddsw
            | Phsubsw
            | Pshufb
            | Palignr
            | Pblendw
            | Blendps
            | Blendpd
            | Pblendvb
            | Blendvps
            | Blendvpd
            | Shufps
            | Shufpd
            | Pshufd
            | Pshuflw
            | Pshufhw
            | Pshufw
            | Psllw
            | Pslld
            | Psllq
            | Psrlw
            | Psrld
            | Psrlq
            | Psraw
            | Psrad
            | Pslldq
            | Psrldq
            | Pextrw
            | Pextrb
            | Pextrd
            | Pextrq
            | Extractps
            | Pinsrw
            | Pinsrb
            | Pinsrd
            | Pinsrq
            | Insertps
            | Pmovzxbw
            | Pmovzxbd
            | Pmovzxbq
            | Pmovzxwd
            | Pmovzxwq
            | Pmovzxdq
            | Pmovsxbw
            | Pmovsxbd
            | Pmovsxbq
            | Pmovsxwd
            | Pmovsxwq
            | Pmovsxdq
            | Ptest
            | Phminposuw
            | Pcmpestri
            | Pcmpestri64
            | Pcmpestrm
            | Pcmpestrm64
            | Pcmpistri
            | Pcmpistrm
            | Pclmulqdq
            | Mpsadbw
    )
}

fn bytes(v: u128) -> [u8; 16] {
    v.to_le_bytes()
}

impl InterpVcpu {
    fn exec_sse_int(&mut self, i: &Instruction, m: Mnemonic, n: usize) -> Option<R<()>> {
        if !is_int(m) {
            return None;
        }
        Some(self.sse_int(i, m, n))
    }

    fn sse_int(&mut self, i: &Instruction, m: Mnemonic, n: usize) -> R<()> {
        use Mnemonic::*;
        let imm = i.immediate8();
        match m {
            Pshufd | Pshuflw | Pshufhw | Pshufw => {
                let v = self.src(i, 1, n)?;
                let r = match m {
                    Pshufd => {
                        let mut r = 0;
                        for k in 0..4 {
                            r = set_lane(r, 4, k, lane(v, 4, usize::from(imm >> (2 * k)) & 3));
                        }
                        r
                    }
                    _ => {
                        // Four words at `base` shuffled, the rest copied.
                        let base = if m == Pshufhw { 4 } else { 0 };
                        let mut r = v;
                        for k in 0..4 {
                            let s = base + (usize::from(imm >> (2 * k)) & 3);
                            r = set_lane(r, 2, base + k, lane(v, 2, s));
                        }
                        r
                    }
                };
                return self.dst(i, 0, n, r);
            }
            Psllw | Pslld | Psllq | Psrlw | Psrld | Psrlq | Psraw | Psrad => {
                let d = i.op_register(0);
                let a = self.vreg(d);
                let count = if i.op_kind(1) == OpKind::Register || i.op_kind(1) == OpKind::Memory {
                    self.src(i, 1, n)? as u64
                } else {
                    u64::from(imm)
                };
                let w = match m {
                    Psllw | Psrlw | Psraw => 2,
                    Pslld | Psrld | Psrad => 4,
                    _ => 8,
                };
                let bits = 8 * w as u64;
                let r = map2(a, 0, w, n, |x, _| match m {
                    Psllw | Pslld | Psllq if count < bits => x << count,
                    Psrlw | Psrld | Psrlq if count < bits => x >> count,
                    Psraw | Psrad => (sx(x, w) >> count.min(bits - 1)) as u64,
                    _ => 0,
                });
                self.set_vreg(d, r);
                return Ok(());
            }
            Pslldq | Psrldq => {
                let d = i.op_register(0);
                let a = self.vreg(d);
                let c = u32::from(imm);
                let r = match (m, c) {
                    (_, 16..) => 0,
                    (Pslldq, _) => a << (8 * c),
                    _ => a >> (8 * c),
                };
                self.set_vreg(d, r);
                return Ok(());
            }
            Pextrw | Pextrb | Pextrd | Pextrq | Extractps => {
                let v = self.vreg(i.op_register(1));
                let (w, idx) = match m {
                    Pextrw => (2, usize::from(imm) & (n / 2 - 1)),
                    Pextrb => (1, usize::from(imm) & 15),
                    Pextrq => (8, usize::from(imm) & 1),
                    _ => (4, usize::from(imm) & 3),
                };
                let x = lane(v, w, idx);
                return match i.op_kind(0) {
                    OpKind::Register => {
                        // A 32-bit destination zero-extends; r64 forms too.
                        let r = i.op_register(0);
                        self.reg_write(if r.is_gpr64() { r } else { r.full_register32() }, x);
                        Ok(())
                    }
                    _ => self.dst(i, 0, w, u128::from(x)),
                };
            }
            Pinsrw | Pinsrb | Pinsrd | Pinsrq => {
                let d = i.op_register(0);
                let (w, idx) = match m {
                    Pinsrw => (2, usize::from(imm) & (n / 2 - 1)),
                    Pinsrb => (1, usize::from(imm) & 15),
                    Pinsrq => (8, usize::from(imm) & 1),
                    _ => (4, usize::from(imm) & 3),
                };
                let x = self.src(i, 1, w)? as u64;
                let r = set_lane(self.vreg(d), w, idx, x);
                self.set_vreg(d, r);
                return Ok(());
            }
            Insertps => {
                let d = Self::rn(i, 0);
                let x = if i.op_kind(1) == OpKind::Memory {
                    self.src(i, 1, 4)? as u64
                } else {
                    lane(self.xmm(Self::rn(i, 1)), 4, usize::from(imm >> 6))
                };
                let mut r = set_lane(self.xmm(d), 4, usize::from(imm >> 4) & 3, x);
                for k in 0..4 {
                    if imm & (1 << k) != 0 {
                        r = set_lane(r, 4, k, 0);
                    }
                }
                self.set_xmm(d, r);
                return Ok(());
            }
            Pmovzxbw | Pmovzxbd | Pmovzxbq | Pmovzxwd | Pmovzxwq | Pmovzxdq | Pmovsxbw
            | Pmovsxbd | Pmovsxbq | Pmovsxwd | Pmovsxwq | Pmovsxdq => {
                let (from, to) = match m {
                    Pmovzxbw | Pmovsxbw => (1, 2),
                    Pmovzxbd | Pmovsxbd => (1, 4),
                    Pmovzxbq | Pmovsxbq => (1, 8),
                    Pmovzxwd | Pmovsxwd => (2, 4),
                    Pmovzxwq | Pmovsxwq => (2, 8),
                    _ => (4, 8),
                };
                let signed = matches!(
                    m,
                    Pmovsxbw | Pmovsxbd | Pmovsxbq | Pmovsxwd | Pmovsxwq | Pmovsxdq
                );
                let v = self.src(i, 1, 16 * from / to)?;
                let mut r = 0;
                for k in 0..16 / to {
                    let x = lane(v, from, k);
                    r = set_lane(r, to, k, if signed { sx(x, from) as u64 } else { x });
                }
                self.set_xmm(Self::rn(i, 0), r);
                return Ok(());
            }
            Ptest => {
                let a = self.xmm(Self::rn(i, 0));
                let b = self.src(i, 1, 16)?;
                let mut f = 0;
                if a & b == 0 {
                    f |= ZF;
                }
                if !a & b == 0 {
                    f |= CF;
                }
                self.rflags = (self.rflags & !(CF | PF | AF | ZF | SF | OF)) | f;
                return Ok(());
            }
            Phminposuw => {
                let v = self.src(i, 1, 16)?;
                let (mut min, mut idx) = (lane(v, 2, 0), 0);
                for k in 1..8 {
                    if lane(v, 2, k) < min {
                        min = lane(v, 2, k);
                        idx = k as u64;
                    }
                }
                self.set_xmm(Self::rn(i, 0), u128::from(min | (idx << 16)));
                return Ok(());
            }
            Pcmpestri | Pcmpestri64 | Pcmpestrm | Pcmpestrm64 | Pcmpistri | Pcmpistrm => {
                return self.pcmpstr(i, m);
            }
            Mpsadbw => {
                // Eight sums of absolute differences of 4-byte groups: the
                // destination's bytes from offset imm8[2]*4 + k against the
                // source's 4 bytes at imm8[1:0]*4 (SDM vol. 2, MPSADBW).
                let d = Self::rn(i, 0);
                let a = bytes(self.xmm(d));
                let b = bytes(self.src(i, 1, 16)?);
                let o1 = usize::from((imm >> 2) & 1) * 4;
                let o2 = usize::from(imm & 3) * 4;
                let mut r = 0;
                for k in 0..8 {
                    let sum: u64 = (0..4)
                        .map(|j| {
                            let x = a.get(o1 + k + j).copied().unwrap_or(0);
                            let y = b.get(o2 + j).copied().unwrap_or(0);
                            u64::from(x.abs_diff(y))
                        })
                        .sum();
                    r = set_lane(r, 2, k, sum);
                }
                self.set_xmm(d, r);
                return Ok(());
            }
            Pclmulqdq => {
                // Carry-less product of the quadwords imm8[0] and imm8[4]
                // select (SDM vol. 2, PCLMULQDQ).
                let d = Self::rn(i, 0);
                let a = lane(self.xmm(d), 8, usize::from(imm & 1));
                let b = lane(self.src(i, 1, 16)?, 8, usize::from((imm >> 4) & 1));
                let mut r = 0u128;
                for k in 0..64 {
                    if b & (1 << k) != 0 {
                        r ^= u128::from(a) << k;
                    }
                }
                self.set_xmm(d, r);
                return Ok(());
            }
            _ => {}
        }
        let d = i.op_register(0);
        let a = self.vreg(d);
        let b = self.src(i, 1, n)?;
        let r = match m {
            Paddb | Paddw | Paddd | Paddq | Psubb | Psubw | Psubd | Psubq => {
                let w = match m {
                    Paddb | Psubb => 1,
                    Paddw | Psubw => 2,
                    Paddd | Psubd => 4,
                    _ => 8,
                };
                let sub = matches!(m, Psubb | Psubw | Psubd | Psubq);
                map2(a, b, w, n, |x, y| {
                    if sub {
                        x.wrapping_sub(y)
                    } else {
                        x.wrapping_add(y)
                    }
                })
            }
            Paddsb | Paddsw | Psubsb | Psubsw => {
                let w = if matches!(m, Paddsb | Psubsb) { 1 } else { 2 };
                let sub = matches!(m, Psubsb | Psubsw);
                map2(a, b, w, n, |x, y| {
                    let (x, y) = (sx(x, w), sx(y, w));
                    sat_s(if sub { x - y } else { x + y }, w)
                })
            }
            Paddusb | Paddusw | Psubusb | Psubusw => {
                let w = if matches!(m, Paddusb | Psubusb) { 1 } else { 2 };
                let sub = matches!(m, Psubusb | Psubusw);
                map2(a, b, w, n, |x, y| {
                    let (x, y) = (x as i64, y as i64);
                    sat_u(if sub { x - y } else { x + y }, w)
                })
            }
            Pcmpeqb | Pcmpeqw | Pcmpeqd | Pcmpeqq | Pcmpgtb | Pcmpgtw | Pcmpgtd | Pcmpgtq => {
                let w = match m {
                    Pcmpeqb | Pcmpgtb => 1,
                    Pcmpeqw | Pcmpgtw => 2,
                    Pcmpeqd | Pcmpgtd => 4,
                    _ => 8,
                };
                let eq = matches!(m, Pcmpeqb | Pcmpeqw | Pcmpeqd | Pcmpeqq);
                map2(a, b, w, n, |x, y| {
                    let t = if eq { x == y } else { sx(x, w) > sx(y, w) };
                    if t {
                        u64::MAX
                    } else {
                        0
                    }
                })
            }
            Pminub | Pmaxub | Pminuw | Pmaxuw | Pminud | Pmaxud => {
                let w = match m {
                    Pminub | Pmaxub => 1,
                    Pminuw | Pmaxuw => 2,
                    _ => 4,
                };
                let max = matches!(m, Pmaxub | Pmaxuw | Pmaxud);
                map2(a, b, w, n, |x, y| if max { x.max(y) } else { x.min(y) })
            }
            Pminsb | Pmaxsb | Pminsw | Pmaxsw | Pminsd | Pmaxsd => {
                let w = match m {
                    Pminsb | Pmaxsb => 1,
                    Pminsw | Pmaxsw => 2,
                    _ => 4,
                };
                let max = matches!(m, Pmaxsb | Pmaxsw | Pmaxsd);
                map2(a, b, w, n, |x, y| {
                    let (p, q) = (sx(x, w), sx(y, w));
                    (if max { p.max(q) } else { p.min(q) }) as u64
                })
            }
            Pavgb => map2(a, b, 1, n, |x, y| (x + y + 1) >> 1),
            Pavgw => map2(a, b, 2, n, |x, y| (x + y + 1) >> 1),
            Pmullw => map2(a, b, 2, n, |x, y| x.wrapping_mul(y)),
            Pmulhw => map2(a, b, 2, n, |x, y| ((sx(x, 2) * sx(y, 2)) >> 16) as u64),
            Pmulhuw => map2(a, b, 2, n, |x, y| (x * y) >> 16),
            Pmulld => map2(a, b, 4, n, |x, y| x.wrapping_mul(y)),
            Pmulhrsw => map2(a, b, 2, n, |x, y| {
                ((((sx(x, 2) * sx(y, 2)) >> 14) + 1) >> 1) as u64
            }),
            Pmuludq => map2(a, b, 8, n, |x, y| (x & 0xffff_ffff) * (y & 0xffff_ffff)),
            Pmuldq => map2(a, b, 8, n, |x, y| (sx(x, 4) * sx(y, 4)) as u64),
            Pmaddwd => map2(a, b, 4, n, |x, y| {
                let lo = sx(x & 0xffff, 2) * sx(y & 0xffff, 2);
                let hi = sx(x >> 16, 2) * sx(y >> 16, 2);
                lo.wrapping_add(hi) as u64
            }),
            Pmaddubsw => map2(a, b, 2, n, |x, y| {
                let p0 = (x & 0xff) as i64 * sx(y & 0xff, 1);
                let p1 = (x >> 8) as i64 * sx(y >> 8, 1);
                sat_s(p0 + p1, 2)
            }),
            Psadbw => map2(a, b, 8, n, |x, y| {
                (0..8)
                    .map(|k| ((x >> (8 * k)) & 0xff).abs_diff((y >> (8 * k)) & 0xff))
                    .sum()
            }),
            Pabsb | Pabsw | Pabsd => {
                let w = match m {
                    Pabsb => 1,
                    Pabsw => 2,
                    _ => 4,
                };
                map2(b, 0, w, n, |y, _| sx(y, w).unsigned_abs())
            }
            Psignb | Psignw | Psignd => {
                let w = match m {
                    Psignb => 1,
                    Psignw => 2,
                    _ => 4,
                };
                map2(a, b, w, n, |x, y| match sx(y, w) {
                    0 => 0,
                    s if s < 0 => x.wrapping_neg(),
                    _ => x,
                })
            }
            Pand | Andps | Andpd => a & b,
            Pandn | Andnps | Andnpd => !a & b,
            Por | Orps | Orpd => a | b,
            Pxor | Xorps | Xorpd => a ^ b,
            Punpcklbw | Punpcklwd | Punpckldq | Punpcklqdq | Punpckhbw | Punpckhwd | Punpckhdq
            | Punpckhqdq | Unpcklps | Unpckhps | Unpcklpd | Unpckhpd => {
                let w = match m {
                    Punpcklbw | Punpckhbw => 1,
                    Punpcklwd | Punpckhwd => 2,
                    Punpckldq | Punpckhdq | Unpcklps | Unpckhps => 4,
                    _ => 8,
                };
                let high = matches!(
                    m,
                    Punpckhbw | Punpckhwd | Punpckhdq | Punpckhqdq | Unpckhps | Unpckhpd
                );
                let half = n / w / 2;
                let base = if high { half } else { 0 };
                let mut r = 0;
                for k in 0..half {
                    r = set_lane(r, w, 2 * k, lane(a, w, base + k));
                    r = set_lane(r, w, 2 * k + 1, lane(b, w, base + k));
                }
                r
            }
            Packsswb | Packssdw | Packuswb | Packusdw => {
                let w = if matches!(m, Packsswb | Packuswb) {
                    2
                } else {
                    4
                };
                let unsigned = matches!(m, Packuswb | Packusdw);
                let per = n / w;
                let mut r = 0;
                for (s, v) in [a, b].iter().enumerate() {
                    for k in 0..per {
                        let x = sx(lane(*v, w, k), w);
                        let y = if unsigned {
                            sat_u(x, w / 2)
                        } else {
                            sat_s(x, w / 2)
                        };
                        r = set_lane(r, w / 2, s * per + k, y);
                    }
                }
                r
            }
            Phaddw | Phaddd | Phsubw | Phsubd | Phaddsw | Phsubsw => {
                let w = if matches!(m, Phaddd | Phsubd) { 4 } else { 2 };
                let per = n / w / 2;
                let mut r = 0;
                for (s, v) in [a, b].iter().enumerate() {
                    for k in 0..per {
                        let (x, y) = (lane(*v, w, 2 * k), lane(*v, w, 2 * k + 1));
                        let z = match m {
                            Phaddw | Phaddd => x.wrapping_add(y),
                            Phsubw | Phsubd => x.wrapping_sub(y),
                            Phaddsw => sat_s(sx(x, 2) + sx(y, 2), 2),
                            _ => sat_s(sx(x, 2) - sx(y, 2), 2),
                        };
                        r = set_lane(r, w, s * per + k, z);
                    }
                }
                r
            }
            Pshufb => {
                let mut r = 0;
                for k in 0..n {
                    let c = lane(b, 1, k);
                    if c & 0x80 == 0 {
                        r = set_lane(r, 1, k, lane(a, 1, c as usize & (n - 1)));
                    }
                }
                r
            }
            Palignr => {
                // (a:b) >> 8*imm, the low n bytes.
                let mut cat = [0u8; 32];
                cat[..n].copy_from_slice(&bytes(b)[..n]);
                cat[n..2 * n].copy_from_slice(&bytes(a)[..n]);
                let mut out = [0u8; 16];
                for (k, o) in out.iter_mut().enumerate().take(n) {
                    *o = cat.get(k + usize::from(imm)).copied().unwrap_or(0);
                }
                let mut r = u128::from_le_bytes(out);
                if n == 8 {
                    r &= u128::from(u64::MAX);
                }
                r
            }
            Pblendw => map_sel(a, b, 2, |k| imm & (1 << k) != 0),
            Blendps => map_sel(a, b, 4, |k| imm & (1 << k) != 0),
            Blendpd => map_sel(a, b, 8, |k| imm & (1 << k) != 0),
            Pblendvb | Blendvps | Blendvpd => {
                let w = match m {
                    Pblendvb => 1,
                    Blendvps => 4,
                    _ => 8,
                };
                let x0 = self.xmm(0);
                map_sel(a, b, w, |k| lane(x0, w, k) >> (8 * w - 1) != 0)
            }
            Shufps => {
                let mut r = 0;
                for k in 0..4 {
                    let v = if k < 2 { a } else { b };
                    r = set_lane(r, 4, k, lane(v, 4, usize::from(imm >> (2 * k)) & 3));
                }
                r
            }
            Shufpd => {
                let lo = lane(a, 8, usize::from(imm & 1));
                let hi = lane(b, 8, usize::from((imm >> 1) & 1));
                u128::from(lo) | (u128::from(hi) << 64)
            }
            _ => return Err(UD),
        };
        self.set_vreg(d, r);
        Ok(())
    }

    /// PCMPESTRI / PCMPESTRM / PCMPISTRI / PCMPISTRM (SDM vol. 2, 4.1).
    fn pcmpstr(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        use Mnemonic::*;
        let imm = i.immediate8();
        let a = self.xmm(Self::rn(i, 0));
        let b = self.src(i, 1, 16)?;
        let words = imm & 1 != 0;
        let signed = imm & 2 != 0;
        let n: usize = if words { 8 } else { 16 };
        let w = if words { 2 } else { 1 };
        let elem = |v: u128, k: usize| -> i64 {
            let x = lane(v, w, k);
            if signed {
                sx(x, w)
            } else {
                x as i64
            }
        };
        let explicit = matches!(m, Pcmpestri | Pcmpestri64 | Pcmpestrm | Pcmpestrm64);
        let (la, lb) = if explicit {
            let wide = matches!(m, Pcmpestri64 | Pcmpestrm64);
            let len = |r: u64| -> usize {
                let v = if wide { r as i64 } else { r as i32 as i64 };
                v.unsigned_abs().min(n as u64) as usize
            };
            (len(self.gpr[0]), len(self.gpr[2]))
        } else {
            let len = |v: u128| (0..n).find(|&k| lane(v, w, k) == 0).unwrap_or(n);
            (len(a), len(b))
        };
        let mut res1: u32 = 0;
        for j in 0..n {
            let bit = match (imm >> 2) & 3 {
                // Equal any.
                0 => j < lb && (0..la).any(|k| elem(a, k) == elem(b, j)),
                // Ranges: pairs of a as [lo, hi].
                1 => {
                    j < lb
                        && (0..la / 2).any(|k| {
                            elem(a, 2 * k) <= elem(b, j) && elem(b, j) <= elem(a, 2 * k + 1)
                        })
                }
                // Equal each.
                2 => match (j < la, j < lb) {
                    (true, true) => elem(a, j) == elem(b, j),
                    (false, false) => true,
                    _ => false,
                },
                // Equal ordered: a as a substring of b starting at j.
                _ => (0..n - j).all(|k| {
                    if k >= la {
                        true
                    } else if j + k >= lb {
                        false
                    } else {
                        elem(a, k) == elem(b, j + k)
                    }
                }),
            };
            if bit {
                res1 |= 1 << j;
            }
        }
        let all = (1u32 << n) - 1;
        let res2 = match (imm >> 4) & 3 {
            1 => !res1 & all,
            3 => res1 ^ ((1u32 << lb) - 1),
            _ => res1,
        };
        let mut f = 0;
        if res2 != 0 {
            f |= CF;
        }
        if lb < n {
            f |= ZF;
        }
        if la < n {
            f |= SF;
        }
        if res2 & 1 != 0 {
            f |= OF;
        }
        if matches!(m, Pcmpestri | Pcmpestri64 | Pcmpistri) {
            let idx = if res2 == 0 {
                n as u32
            } else if imm & 0x40 != 0 {
                31 - res2.leading_zeros()
            } else {
                res2.trailing_zeros()
            };
            self.gpr[1] = u64::from(idx);
        } else {
            let r = if imm & 0x40 != 0 {
                let mut r = 0;
                for k in 0..n {
                    if res2 & (1 << k) != 0 {
                        r = set_lane(r, w, k, u64::MAX);
                    }
                }
                r
            } else {
                u128::from(res2)
            };
            self.set_xmm(0, r);
        }
        self.rflags = (self.rflags & !(CF | PF | AF | ZF | SF | OF)) | f;
        Ok(())
    }
}

/// Lane-wise select: `b`'s lane where `pick(k)`, else `a`'s.
fn map_sel(a: u128, b: u128, w: usize, pick: impl Fn(usize) -> bool) -> u128 {
    let mut r = a;
    for k in 0..16 / w {
        if pick(k) {
            r = set_lane(r, w, k, lane(b, w, k));
        }
    }
    r
}

/// The operation of an SSE floating-point arithmetic mnemonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FpOp {
    Bin(FOp),
    Sqrt,
    Min,
    Max,
    Cmp,
    Round,
    Rcp,
    Rsqrt,
}

/// (operation, format, scalar) of the element-wise arithmetic mnemonics.
fn fp_arith_kind(m: Mnemonic) -> Option<(FpOp, P, bool)> {
    use Mnemonic::*;
    let (op, rest) = match m {
        Addps | Addpd | Addss | Addsd => (FpOp::Bin(FOp::Add), m),
        Subps | Subpd | Subss | Subsd => (FpOp::Bin(FOp::Sub), m),
        Mulps | Mulpd | Mulss | Mulsd => (FpOp::Bin(FOp::Mul), m),
        Divps | Divpd | Divss | Divsd => (FpOp::Bin(FOp::Div), m),
        Sqrtps | Sqrtpd | Sqrtss | Sqrtsd => (FpOp::Sqrt, m),
        Minps | Minpd | Minss | Minsd => (FpOp::Min, m),
        Maxps | Maxpd | Maxss | Maxsd => (FpOp::Max, m),
        Cmpps | Cmppd | Cmpss | Cmpsd => (FpOp::Cmp, m),
        Roundps | Roundpd | Roundss | Roundsd => (FpOp::Round, m),
        Rcpps | Rcpss => (FpOp::Rcp, m),
        Rsqrtps | Rsqrtss => (FpOp::Rsqrt, m),
        _ => return None,
    };
    let (p, scalar) = match rest {
        Addps | Subps | Mulps | Divps | Sqrtps | Minps | Maxps | Cmpps | Roundps | Rcpps
        | Rsqrtps => (P::S, false),
        Addpd | Subpd | Mulpd | Divpd | Sqrtpd | Minpd | Maxpd | Cmppd | Roundpd => (P::D, false),
        Addss | Subss | Mulss | Divss | Sqrtss | Minss | Maxss | Cmpss | Roundss | Rcpss
        | Rsqrtss => (P::S, true),
        _ => (P::D, true),
    };
    Some((op, p, scalar))
}

fn is_fp(m: Mnemonic) -> bool {
    use Mnemonic::*;
    fp_arith_kind(m).is_some()
        || matches!(
            m,
            Comiss
                | Ucomiss
                | Comisd
                | Ucomisd
                | Cvtsi2ss
                | Cvtsi2sd
                | Cvtss2si
                | Cvttss2si
                | Cvtsd2si
                | Cvttsd2si
                | Cvtss2sd
                | Cvtsd2ss
                | Cvtdq2ps
                | Cvtps2dq
                | Cvttps2dq
                | Cvtdq2pd
                | Cvtpd2dq
                | Cvttpd2dq
                | Cvtps2pd
                | Cvtpd2ps
                | Cvtpi2ps
                | Cvtps2pi
                | Cvttps2pi
                | Cvtpi2pd
                | Cvtpd2pi
                | Cvttpd2pi
                | Haddps
                | Haddpd
                | Hsubps
                | Hsubpd
                | Addsubps
                | Addsubpd
                | Dpps
                | Dppd
        )
}

impl InterpVcpu {
    fn exec_sse_fp(&mut self, i: &Instruction, m: Mnemonic) -> Option<R<()>> {
        if !is_fp(m) {
            return None;
        }
        Some(self.sse_fp(i, m))
    }

    fn sse_fp(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        use Mnemonic::*;
        let mut fx = Fx::new(self.mxcsr());
        if let Some((op, p, scalar)) = fp_arith_kind(m) {
            let w = p.w();
            let d = i.op_register(0);
            let a = self.vreg(d);
            let b = self.src(i, 1, if scalar { w } else { 16 })?;
            let imm = i.immediate8();
            let lanes = if scalar { 1 } else { 16 / w };
            let mut r = a;
            for k in 0..lanes {
                let (x, y) = (lane(a, w, k), lane(b, w, k));
                let z = match op {
                    FpOp::Bin(o) => fx.arith(p, o, x, y),
                    FpOp::Sqrt => fx.sqrt(p, y),
                    FpOp::Min => fx.minmax(p, x, y, false),
                    FpOp::Max => fx.minmax(p, x, y, true),
                    FpOp::Cmp => fx.cmp(p, x, y, imm),
                    FpOp::Round => fx.round_int(p, y, imm),
                    FpOp::Rcp | FpOp::Rsqrt => approx(p, y, op == FpOp::Rsqrt, fx.mxcsr),
                };
                r = set_lane(r, w, k, z);
            }
            self.fp_commit(&fx)?;
            self.set_vreg(d, r);
            return Ok(());
        }
        match m {
            Comiss | Ucomiss | Comisd | Ucomisd => {
                let p = if matches!(m, Comiss | Ucomiss) {
                    P::S
                } else {
                    P::D
                };
                let a = lane(self.xmm(Self::rn(i, 0)), p.w(), 0);
                let b = lane(self.src(i, 1, p.w())?, p.w(), 0);
                let f = fx.comi(p, a, b, matches!(m, Comiss | Comisd));
                self.fp_commit(&fx)?;
                self.rflags = (self.rflags & !(CF | PF | AF | ZF | SF | OF)) | f;
                Ok(())
            }
            Cvtsi2ss | Cvtsi2sd => {
                let p = if m == Cvtsi2ss { P::S } else { P::D };
                let s = match i.op_kind(1) {
                    OpKind::Register => i.op_register(1).size(),
                    _ => i.memory_size().size(),
                };
                let v = sx(self.src(i, 1, s)? as u64, s);
                let d = Self::rn(i, 0);
                let z = fx.int_to_fp(p, v);
                self.fp_commit(&fx)?;
                let r = set_lane(self.xmm(d), p.w(), 0, z);
                self.set_xmm(d, r);
                Ok(())
            }
            Cvtss2si | Cvttss2si | Cvtsd2si | Cvttsd2si => {
                let p = if matches!(m, Cvtss2si | Cvttss2si) {
                    P::S
                } else {
                    P::D
                };
                let x = lane(self.src(i, 1, p.w())?, p.w(), 0);
                let dr = i.op_register(0);
                let width = 8 * dr.size();
                let z = fx.fp_to_int(p, x, width, matches!(m, Cvttss2si | Cvttsd2si));
                self.fp_commit(&fx)?;
                self.reg_write(dr, z);
                Ok(())
            }
            Cvtss2sd | Cvtsd2ss => {
                let (from, to) = if m == Cvtss2sd {
                    (P::S, P::D)
                } else {
                    (P::D, P::S)
                };
                let x = lane(self.src(i, 1, from.w())?, from.w(), 0);
                let d = Self::rn(i, 0);
                let z = fx.convert(from, to, x);
                self.fp_commit(&fx)?;
                let r = set_lane(self.xmm(d), to.w(), 0, z);
                self.set_xmm(d, r);
                Ok(())
            }
            Cvtps2pd | Cvtpd2ps => {
                let (from, to) = if m == Cvtps2pd {
                    (P::S, P::D)
                } else {
                    (P::D, P::S)
                };
                let b = self.src(i, 1, if m == Cvtps2pd { 8 } else { 16 })?;
                let mut r = 0;
                for k in 0..2 {
                    r = set_lane(r, to.w(), k, fx.convert(from, to, lane(b, from.w(), k)));
                }
                self.fp_commit(&fx)?;
                self.set_xmm(Self::rn(i, 0), r);
                Ok(())
            }
            Cvtdq2ps | Cvtdq2pd | Cvtpi2ps | Cvtpi2pd => {
                let p = if matches!(m, Cvtdq2ps | Cvtpi2ps) {
                    P::S
                } else {
                    P::D
                };
                let count = if m == Cvtdq2ps { 4 } else { 2 };
                let b = self.src(i, 1, if m == Cvtdq2ps { 16 } else { 8 })?;
                let d = Self::rn(i, 0);
                // CVTPI2PS keeps the destination's high quadword.
                let mut r = if m == Cvtpi2ps { self.xmm(d) } else { 0 };
                for k in 0..count {
                    let z = fx.int_to_fp(p, sx(lane(b, 4, k), 4));
                    r = set_lane(r, p.w(), k, z);
                }
                self.fp_commit(&fx)?;
                self.set_xmm(d, r);
                Ok(())
            }
            Cvtps2dq | Cvttps2dq | Cvtpd2dq | Cvttpd2dq | Cvtps2pi | Cvttps2pi | Cvtpd2pi
            | Cvttpd2pi => {
                let p = if matches!(m, Cvtps2dq | Cvttps2dq | Cvtps2pi | Cvttps2pi) {
                    P::S
                } else {
                    P::D
                };
                let trunc = matches!(m, Cvttps2dq | Cvttpd2dq | Cvttps2pi | Cvttpd2pi);
                let count = if matches!(m, Cvtps2dq | Cvttps2dq) {
                    4
                } else {
                    2
                };
                let b = self.src(
                    i,
                    1,
                    if matches!(m, Cvtps2pi | Cvttps2pi) {
                        8
                    } else {
                        16
                    },
                )?;
                let mut r = 0;
                for k in 0..count {
                    r = set_lane(r, 4, k, fx.fp_to_int(p, lane(b, p.w(), k), 32, trunc));
                }
                self.fp_commit(&fx)?;
                self.set_vreg(i.op_register(0), r);
                Ok(())
            }
            Haddps | Haddpd | Hsubps | Hsubpd | Addsubps | Addsubpd => {
                let p = if matches!(m, Haddps | Hsubps | Addsubps) {
                    P::S
                } else {
                    P::D
                };
                let w = p.w();
                let d = Self::rn(i, 0);
                let a = self.xmm(d);
                let b = self.src(i, 1, 16)?;
                let per = 16 / w;
                let mut r = 0;
                for k in 0..per {
                    let z = match m {
                        Addsubps | Addsubpd => {
                            let o = if k % 2 == 0 { FOp::Sub } else { FOp::Add };
                            fx.arith(p, o, lane(a, w, k), lane(b, w, k))
                        }
                        _ => {
                            let half = per / 2;
                            let v = if k < half { a } else { b };
                            let j = 2 * (k % half.max(1));
                            let o = if matches!(m, Haddps | Haddpd) {
                                FOp::Add
                            } else {
                                FOp::Sub
                            };
                            fx.arith(p, o, lane(v, w, j), lane(v, w, j + 1))
                        }
                    };
                    r = set_lane(r, w, k, z);
                }
                self.fp_commit(&fx)?;
                self.set_xmm(d, r);
                Ok(())
            }
            Dpps | Dppd => {
                let p = if m == Dpps { P::S } else { P::D };
                let w = p.w();
                let per = 16 / w;
                let d = Self::rn(i, 0);
                let a = self.xmm(d);
                let b = self.src(i, 1, 16)?;
                let imm = i.immediate8();
                // Products of the lanes imm8[7:4] selects, summed as a
                // tree in every lane k: pairs, then DPPS adds pair k^2.
                // The SDM's pseudocode gives the same value; the operand
                // order (which NaN propagates) is what processors are seen
                // to do. Broadcast to the lanes imm8[3:0] selects.
                let mut t = [0u64; 4];
                for (k, tk) in t.iter_mut().enumerate().take(per) {
                    *tk = if imm & (0x10 << k) != 0 {
                        fx.arith(p, FOp::Mul, lane(a, w, k), lane(b, w, k))
                    } else {
                        0
                    };
                }
                let mut pair = [0u64; 4];
                for (k, pk) in pair.iter_mut().enumerate().take(per) {
                    // DPPS adds the odd-even neighbour first, DPPD its own.
                    let (x, y) = if per == 4 {
                        (t[k ^ 1], t[k])
                    } else {
                        (t[k], t[k ^ 1])
                    };
                    *pk = fx.arith(p, FOp::Add, x, y);
                }
                let mut r = 0;
                for k in 0..per {
                    let sum = if per == 4 {
                        fx.arith(p, FOp::Add, pair[k], pair[k ^ 2])
                    } else {
                        pair[k]
                    };
                    if imm & (1 << k) != 0 {
                        r = set_lane(r, w, k, sum);
                    }
                }
                self.fp_commit(&fx)?;
                self.set_xmm(d, r);
                Ok(())
            }
            _ => Err(UD),
        }
    }
}

/// RCPPS / RSQRTPS: the SDM only bounds their relative error (1.5 * 2^-12);
/// the value here is the correctly rounded 1/x or 1/sqrt(x) with the low
/// 11 fraction bits cleared, which is within that bound but not
/// necessarily the value a given processor's table gives.
fn approx(p: P, x: u64, rsqrt: bool, mxcsr: u32) -> u64 {
    let f = f32::from_bits(x as u32);
    let f = if mxcsr & mx::DAZ != 0 && p.is_denorm(x) {
        0.0f32.copysign(f)
    } else {
        f
    };
    let r = if rsqrt {
        if f < 0.0 {
            return P::S.indefinite();
        }
        1.0 / f.sqrt()
    } else {
        1.0 / f
    };
    if r.is_nan() {
        return u64::from(r.to_bits() | 0x0040_0000);
    }
    let b = r.to_bits();
    if r.is_infinite() || b & 0x7f80_0000 == 0 {
        // Tiny results flush to signed zero, as processors do.
        return u64::from(if r.is_infinite() { b } else { b & 0x8000_0000 });
    }
    u64::from(b & !0x7ff)
}
