//! The x87 FPU (SDM vol. 1, chapter 8; vol. 2 for each instruction).
//!
//! State: like SSE (see `sse.rs`), the x87 state stays in the XSAVE image:
//! FCW at 0, FSW at 2 (TOP in bits 13:11), the abridged tag word at 4 (bit
//! *i* set: physical register R*i* is not empty), FOP at 6, FIP at 8 and
//! FDP at 16 (64-bit format), and ST(*i*) in the 16-byte slot 32 + 16*i*.
//! The slots are in stack order, as FXSAVE stores them, so a push or pop
//! rotates them; MMX instructions set TOP to 0 first, which makes slot *i*
//! the physical register R*i* = MM*i*.
//!
//! Arithmetic: 80-bit extended precision through `rustc_apfloat`'s
//! `X87DoubleExtended` (LLVM's APFloat) in the rounding mode of FCW.RC,
//! with the IEEE status turned into FSW flags here, C1 telling whether
//! the significand was rounded up. Precision control (FCW.PC = single or
//! double) rounds to 24 / 53 bits from a 64-bit result truncated toward
//! zero plus a sticky bit (exact for those widths) and keeps the 15-bit
//! exponent range, as the x87 does. Square root is computed on the
//! integer significand. Unmasked exceptions set FSW.ES and B; an
//! invalid-operation, divide-by-zero or denormal one leaves the
//! destination unchanged, and the next waiting x87 instruction (or WAIT)
//! delivers #MF when CR0.NE is set. Unmasked overflow / underflow store the
//! masked response instead of the SDM's bias-adjusted value (a gap).
//! FNSTENV / FLDENV / FNSAVE / FRSTOR use the protected-mode layouts in
//! every mode (real-mode FNSTENV would store a 20-bit FIP), with FCS / FDS
//! stored as zero and the reserved halves as ones. FIP is recorded for
//! every non-control instruction, FOP and FDP only for one that raises an
//! unmasked exception (FOP compatibility mode off, FDP_EXCPTN_ONLY).
//! FPREM with an exponent difference d of 64 or more reduces by 2^(d - N),
//! N = 32 + d mod 32, per step (the SDM lets the processor choose N within
//! [32, 63]). The transcendental instructions (FSIN, FCOS, FSINCOS, FPTAN,
//! FPATAN, F2XM1, FYL2X, FYL2XP1) compute in binary64 on the host and are
//! not bit-exact; everything else here was checked against this host's
//! x87 on random operands in every rounding and precision mode (see
//! `tests_simd.rs`).

use iced_x86::{Instruction, MemorySize, Mnemonic, OpKind, Register};
use rustc_apfloat::ieee::{Double, Single, X87DoubleExtended as Ext};
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};
use tandem_core::cpu::cr0;

use crate::flags::{AF, CF, OF, PF, SF, ZF};
use crate::sse::{rc_round, FTW_OFF, ST_OFF};
use crate::{InterpVcpu, Stop, R};

const UD: Stop = Stop::Exc(6, None);
const NM: Stop = Stop::Exc(7, None);
const MF: Stop = Stop::Exc(16, None);

const FCW_OFF: usize = 0;
const FOP_OFF: usize = 6;
const FIP_OFF: usize = 8;
const FDP_OFF: usize = 16;

/// FSW bits (SDM vol. 1, 8.1.3).
pub(crate) mod fs {
    pub const IE: u16 = 1 << 0;
    pub const DE: u16 = 1 << 1;
    pub const ZE: u16 = 1 << 2;
    pub const OE: u16 = 1 << 3;
    pub const UE: u16 = 1 << 4;
    pub const PE: u16 = 1 << 5;
    pub const SF: u16 = 1 << 6;
    pub const ES: u16 = 1 << 7;
    pub const C0: u16 = 1 << 8;
    pub const C1: u16 = 1 << 9;
    pub const C2: u16 = 1 << 10;
    pub const C3: u16 = 1 << 14;
    pub const B: u16 = 1 << 15;
    pub const EXC: u16 = 0x3f;
    pub const CC: u16 = C0 | C1 | C2 | C3;
}

/// An 80-bit register value in the low bits.
type F80 = u128;

const MASK80: u128 = (1 << 80) - 1;

fn f80(neg: bool, exp: u16, sig: u64) -> F80 {
    (u128::from(neg) << 79) | (u128::from(exp & 0x7fff) << 64) | u128::from(sig)
}

fn parts(x: F80) -> (bool, u16, u64) {
    ((x >> 79) & 1 != 0, ((x >> 64) & 0x7fff) as u16, x as u64)
}

/// The QNaN floating-point indefinite.
const INDEFINITE: F80 = (0xffffu128 << 64) | (0xc000_0000_0000_0000u128);
const INT_BIT: u64 = 1 << 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Zero,
    Denormal,
    Normal,
    Inf,
    QNaN,
    SNaN,
    /// Pseudo-NaN, pseudo-infinity, unnormal: invalid operands.
    Unsupported,
}

fn class(x: F80) -> Class {
    let (_, e, s) = parts(x);
    match e {
        0 if s == 0 => Class::Zero,
        // Pseudo-denormals (integer bit set) are denormal operands too.
        0 => Class::Denormal,
        0x7fff if s & INT_BIT == 0 => Class::Unsupported,
        0x7fff if s << 1 == 0 => Class::Inf,
        0x7fff if s & (1 << 62) != 0 => Class::QNaN,
        0x7fff => Class::SNaN,
        _ if s & INT_BIT == 0 => Class::Unsupported,
        _ => Class::Normal,
    }
}

fn is_nan(c: Class) -> bool {
    matches!(c, Class::QNaN | Class::SNaN)
}

/// An f32 / f64 bit pattern as an exact 80-bit value; also whether it is
/// an SNaN and whether it is denormal.
fn ext_from(x: u64, double: bool) -> (F80, bool, bool) {
    let (fbits, ebits) = if double { (52, 11) } else { (23, 8) };
    let neg = (x >> (fbits + ebits)) & 1 != 0;
    let e = ((x >> fbits) & ((1 << ebits) - 1)) as i32;
    let f = x & ((1u64 << fbits) - 1);
    let bias = (1 << (ebits - 1)) - 1;
    let emax = (1 << ebits) - 1;
    if e == emax {
        if f == 0 {
            return (f80(neg, 0x7fff, INT_BIT), false, false);
        }
        let snan = f & (1 << (fbits - 1)) == 0;
        // The quiet bit moves with the fraction: an SNaN stays one.
        let sig = INT_BIT | (f << (63 - fbits));
        return (f80(neg, 0x7fff, sig), snan, false);
    }
    if e == 0 {
        if f == 0 {
            return (f80(neg, 0, 0), false, false);
        }
        // Normalize the denormal.
        let lz = f.leading_zeros() as i32;
        let sig = f << lz;
        let exp = 16383 - bias + 1 - (lz - (63 - fbits));
        return (f80(neg, exp as u16, sig), false, true);
    }
    let sig = INT_BIT | (f << (63 - fbits));
    (f80(neg, (e - bias + 16383) as u16, sig), false, false)
}

/// The result of rounding to a precision: value, inexact, significand
/// incremented, tiny, overflow.
struct Rounded {
    v: F80,
    inexact: bool,
    up: bool,
    tiny: bool,
    overflow: bool,
}

/// Rounds (-1)^neg * sig * 2^(exp - 16383 - 63) (`sig` with bit 63 set,
/// `sticky` for non-zero bits below it) to `prec` significant bits in the
/// x87 exponent range (denormals at biased exponent 0).
fn round_x87(
    neg: bool,
    exp: i32,
    sig: u64,
    low: u64,
    sticky: bool,
    prec: u32,
    rnd: Round,
) -> Rounded {
    // `low` holds the bits below `sig` (its top bit is worth half an ulp
    // of a 64-bit result). Bits to drop: below the precision, plus the
    // denormal shift.
    let base = 64 - prec;
    let extra = if exp < 1 {
        (1 - exp).min(200) as u32
    } else {
        0
    };
    let drop = base + extra + 64;
    let full = (u128::from(sig) << 64) | u128::from(low);
    let (kept, half, rest) = if drop > 128 {
        (0u64, false, full != 0 || sticky)
    } else if drop == 128 {
        (0, full >> 127 != 0, (full << 1) != 0 || sticky)
    } else {
        let halfbit = 1u128 << (drop - 1);
        let lowbits = full & ((1u128 << drop) - 1);
        (
            (full >> drop) as u64,
            lowbits & halfbit != 0,
            lowbits & !halfbit != 0 || sticky,
        )
    };
    let inexact = half || rest;
    let inc = match rnd {
        Round::NearestTiesToEven => half && (rest || kept & 1 != 0),
        Round::TowardPositive => inexact && !neg,
        Round::TowardNegative => inexact && neg,
        _ => false,
    };
    let mut out = (u128::from(kept) + u128::from(inc)) << base;
    let mut e = exp.max(0);
    if exp >= 1 {
        if out >> 64 != 0 {
            out = u128::from(INT_BIT);
            e += 1;
        }
    } else {
        e = 0;
        if out & u128::from(INT_BIT) != 0 {
            // A denormal that rounded up into the normal range.
            e = 1;
        }
    }
    if e >= 0x7fff {
        let to_inf = match rnd {
            Round::NearestTiesToEven => true,
            Round::TowardPositive => !neg,
            Round::TowardNegative => neg,
            _ => false,
        };
        let v = if to_inf {
            f80(neg, 0x7fff, INT_BIT)
        } else {
            f80(neg, 0x7ffe, u64::MAX << base)
        };
        return Rounded {
            v,
            inexact: true,
            up: to_inf,
            tiny: false,
            overflow: true,
        };
    }
    Rounded {
        v: f80(neg, e as u16, out as u64),
        inexact,
        up: inc,
        tiny: exp < 1 && e == 0,
        overflow: false,
    }
}

/// The binary operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XOp {
    Add,
    Sub,
    Mul,
    Div,
}

fn ap(op: XOp, a: F80, b: F80, rnd: Round) -> StatusAnd<F80> {
    let (x, y) = (Ext::from_bits(a), Ext::from_bits(b));
    let r = match op {
        XOp::Add => x.add_r(y, rnd),
        XOp::Sub => x.sub_r(y, rnd),
        XOp::Mul => x.mul_r(y, rnd),
        XOp::Div => x.div_r(y, rnd),
    };
    r.map(|v| v.to_bits() & MASK80)
}

/// The x87 context of one instruction: FCW and what the operation raised.
struct Xc {
    fcw: u16,
    /// Exception flags, plus C1 (rounded up / stack overflow).
    flags: u16,
    /// The m32fp / m64fp source operand was denormal (it is normal as an
    /// 80-bit value, so `class` no longer shows it).
    src_denormal: bool,
}

impl Xc {
    fn rnd(&self) -> Round {
        rc_round(u32::from(self.fcw >> 10))
    }

    fn prec(&self) -> u32 {
        match (self.fcw >> 8) & 3 {
            0 => 24,
            2 => 53,
            _ => 64,
        }
    }

    fn masked(&self, f: u16) -> bool {
        self.fcw & f == f
    }

    /// The NaN rule of the x87 (SDM vol. 1, table 4-7): an SNaN is IE; the
    /// NaN with the larger significand (the QNaN over an SNaN) wins,
    /// quieted.
    fn nan2(&mut self, a: F80, b: F80) -> Option<F80> {
        let (ca, cb) = (class(a), class(b));
        if ca == Class::Unsupported || cb == Class::Unsupported {
            self.flags |= fs::IE;
            return Some(INDEFINITE);
        }
        if !is_nan(ca) && !is_nan(cb) {
            return None;
        }
        if ca == Class::SNaN || cb == Class::SNaN {
            self.flags |= fs::IE;
        }
        let q = |x: F80| x | (1u128 << 62);
        Some(match (is_nan(ca), is_nan(cb)) {
            (true, false) => q(a),
            (false, true) => q(b),
            _ if ca != cb => {
                if ca == Class::QNaN {
                    a
                } else {
                    b
                }
            }
            _ => {
                let (sa, sb) = (a as u64 | (1 << 62), b as u64 | (1 << 62));
                if sa >= sb {
                    q(a)
                } else {
                    q(b)
                }
            }
        })
    }

    fn denorm(&mut self, xs: &[F80]) {
        if self.src_denormal || xs.iter().any(|&x| class(x) == Class::Denormal) {
            self.flags |= fs::DE;
        }
    }

    /// IEEE status (and C1) from an extended-precision result.
    fn post(&mut self, st: Status, v: F80, up: bool) -> F80 {
        if st.contains(Status::INVALID_OP) {
            self.flags |= fs::IE;
            return INDEFINITE;
        }
        if st.contains(Status::DIV_BY_ZERO) {
            self.flags |= fs::ZE;
        }
        if st.contains(Status::OVERFLOW) {
            self.flags |= fs::OE;
        }
        let inexact = st.contains(Status::INEXACT);
        let tiny = class(v) == Class::Denormal || st.contains(Status::UNDERFLOW);
        if tiny && (inexact || !self.masked(fs::UE)) {
            self.flags |= fs::UE;
        }
        if inexact {
            self.flags |= fs::PE;
            if up {
                self.flags |= fs::C1;
            }
        }
        v
    }

    fn post_rounded(&mut self, r: Rounded) -> F80 {
        if r.overflow {
            self.flags |= fs::OE;
        }
        if r.tiny && (r.inexact || !self.masked(fs::UE)) {
            self.flags |= fs::UE;
        }
        if r.inexact {
            self.flags |= fs::PE;
            if r.up {
                self.flags |= fs::C1;
            }
        }
        r.v
    }

    fn arith(&mut self, op: XOp, a: F80, b: F80) -> F80 {
        if let Some(n) = self.nan2(a, b) {
            return n;
        }
        // Division by zero takes precedence over a denormal dividend.
        if !(op == XOp::Div && class(b) == Class::Zero) {
            self.denorm(&[a, b]);
        }
        let rnd = self.rnd();
        let prec = self.prec();
        let t = ap(op, a, b, Round::TowardZero);
        if t.status.contains(Status::INVALID_OP) || t.status.contains(Status::DIV_BY_ZERO) {
            return self.post(t.status, ap(op, a, b, rnd).value, false);
        }
        let (neg, e, s) = parts(t.value);
        if e == 0x7ffe
            && t.status.contains(Status::INEXACT)
            && s >> (64 - prec) == u64::MAX >> (64 - prec)
            && overflows(op, a, b)
        {
            // APFloat's directed-rounding overflow gives the largest finite
            // value without saying OVERFLOW; the x87 sets OE (and PE).
            let r = round_x87(neg, 0x7fff, INT_BIT, 0, true, prec, rnd);
            return self.post_rounded(r);
        }
        if prec < 64 && class(t.value) == Class::Zero && t.status.contains(Status::INEXACT) {
            // Below the smallest denormal: only the sticky bit is left.
            let r = round_x87(neg, -200, INT_BIT, 0, true, prec, rnd);
            return self.post_rounded(r);
        }
        if prec == 64 || !matches!(class(t.value), Class::Normal | Class::Denormal) {
            let r = ap(op, a, b, rnd);
            let up = parts(r.value).2 != s || parts(r.value).1 != e;
            return self.post(r.status, r.value, up);
        }
        // Truncated 64-bit result plus sticky, rounded to `prec`.
        let (exp, sig) = if e == 0 {
            // Denormal: normalize for round_x87.
            let lz = s.leading_zeros() as i32;
            (1 - lz, s << lz)
        } else {
            (i32::from(e), s)
        };
        let sticky = t.status.contains(Status::INEXACT);
        let r = round_x87(neg, exp, sig, 0, sticky, prec, rnd);
        self.post_rounded(r)
    }

    fn sqrt(&mut self, a: F80) -> F80 {
        let (neg, e, s) = parts(a);
        match class(a) {
            Class::Unsupported => {
                self.flags |= fs::IE;
                return INDEFINITE;
            }
            Class::SNaN => {
                self.flags |= fs::IE;
                return a | (1 << 62);
            }
            Class::QNaN | Class::Zero => return a,
            Class::Inf if !neg => return a,
            _ if neg => {
                self.flags |= fs::IE;
                return INDEFINITE;
            }
            Class::Denormal => self.flags |= fs::DE,
            _ => {}
        }
        // Normalize: value = sig * 2^(exp - 16383 - 63).
        let (mut exp, mut sig) = (i32::from(e), s);
        if e == 0 {
            let lz = sig.leading_zeros() as i32;
            sig <<= lz;
            exp = 1 - lz;
        }
        // Unbiased exponent of the top bit: u = exp - 16383. Make it even.
        let u = exp - 16383;
        let (radicand, ru) = if u.rem_euclid(2) == 0 {
            (u128::from(sig) << 63, u)
        } else {
            (u128::from(sig) << 64, u - 1)
        };
        // radicand = sig * 2^(63 or 64) so sqrt is in [2^63, 2^64).
        let root = isqrt(radicand);
        // sqrt = root + f, f in [0, 1): f >= 1/2 exactly when the remainder
        // exceeds root (f = 1/2 cannot happen).
        let rem = radicand - root * root;
        let low = if rem > root { 1u64 << 63 } else { 0 };
        let r = round_x87(
            false,
            ru / 2 + 16383,
            root as u64,
            low,
            rem != 0,
            self.prec(),
            self.rnd(),
        );
        self.post_rounded(r)
    }
}

/// Whether `a op b` (finite, non-zero operands), rounded toward zero with
/// an unbounded exponent, reaches 2^16384: computed on the operands scaled
/// to [1, 2).
fn overflows(op: XOp, a: F80, b: F80) -> bool {
    let (x, y) = (Ext::from_bits(a), Ext::from_bits(b));
    if !x.is_finite_non_zero() || !y.is_finite_non_zero() {
        return false;
    }
    let (ea, eb) = (x.ilogb(), y.ilogb());
    let (e, r) = match op {
        XOp::Mul => (
            ea + eb,
            x.scalbn(-ea).mul_r(y.scalbn(-eb), Round::TowardZero),
        ),
        XOp::Div => (
            ea - eb,
            x.scalbn(-ea).div_r(y.scalbn(-eb), Round::TowardZero),
        ),
        XOp::Add | XOp::Sub => {
            let m = ea.max(eb);
            let (xs, ys) = (x.scalbn(-m), y.scalbn(-m));
            let r = if op == XOp::Add {
                xs.add_r(ys, Round::TowardZero)
            } else {
                xs.sub_r(ys, Round::TowardZero)
            };
            (m, r)
        }
    };
    let r = r.value;
    r.is_finite_non_zero() && e + r.ilogb() >= 16384
}

/// floor(sqrt(x)) for x < 2^128.
fn isqrt(x: u128) -> u128 {
    if x == 0 {
        return 0;
    }
    let mut r = ((x as f64).sqrt() as u128).min(u128::from(u64::MAX));
    while r.checked_mul(r).is_none_or(|s| s > x) {
        r -= 1;
    }
    while (r + 1).checked_mul(r + 1).is_some_and(|s| s <= x) {
        r += 1;
    }
    r
}

/// The constants of FLD1... (SDM vol. 1, 8.3.7), rounded to nearest; the
/// rounding-control adjustments are applied by the caller.
fn constant(m: Mnemonic) -> Option<(F80, bool)> {
    // (value, whether the true value lies above the rounded-to-nearest one)
    Some(match m {
        Mnemonic::Fld1 => (f80(false, 0x3fff, INT_BIT), false),
        Mnemonic::Fldz => (0, false),
        Mnemonic::Fldpi => (f80(false, 0x4000, 0xc90f_daa2_2168_c235), false),
        Mnemonic::Fldl2e => (f80(false, 0x3fff, 0xb8aa_3b29_5c17_f0bc), false),
        Mnemonic::Fldl2t => (f80(false, 0x4000, 0xd49a_784b_cd1b_8afe), true),
        Mnemonic::Fldlg2 => (f80(false, 0x3ffd, 0x9a20_9a84_fbcf_f799), false),
        Mnemonic::Fldln2 => (f80(false, 0x3ffe, 0xb172_17f7_d1cf_79ac), false),
        _ => return None,
    })
}

fn to_f64(x: F80) -> f64 {
    let mut li = false;
    let r: StatusAnd<Double> = Ext::from_bits(x).convert_r(Round::NearestTiesToEven, &mut li);
    f64::from_bits(r.value.to_bits() as u64)
}

fn from_f64(x: f64) -> F80 {
    ext_from(x.to_bits(), true).0
}

fn is_x87(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Fld | Fst
            | Fstp
            | Fild
            | Fist
            | Fistp
            | Fisttp
            | Fld1
            | Fldz
            | Fldpi
            | Fldl2e
            | Fldl2t
            | Fldlg2
            | Fldln2
            | Fxch
            | Fadd
            | Faddp
            | Fiadd
            | Fsub
            | Fsubp
            | Fisub
            | Fsubr
            | Fsubrp
            | Fisubr
            | Fmul
            | Fmulp
            | Fimul
            | Fdiv
            | Fdivp
            | Fidiv
            | Fdivr
            | Fdivrp
            | Fidivr
            | Fcom
            | Fcomp
            | Fcompp
            | Ficom
            | Ficomp
            | Fucom
            | Fucomp
            | Fucompp
            | Fcomi
            | Fcomip
            | Fucomi
            | Fucomip
            | Ftst
            | Fxam
            | Fchs
            | Fabs
            | Fsqrt
            | Frndint
            | Fscale
            | Fprem
            | Fprem1
            | Fxtract
            | Ffree
            | Ffreep
            | Fincstp
            | Fdecstp
            | Fninit
            | Finit
            | Fnclex
            | Fclex
            | Fnstcw
            | Fstcw
            | Fldcw
            | Fnstsw
            | Fstsw
            | Fnstenv
            | Fstenv
            | Fldenv
            | Fnsave
            | Fsave
            | Frstor
            | Fcmovb
            | Fcmove
            | Fcmovbe
            | Fcmovu
            | Fcmovnb
            | Fcmovne
            | Fcmovnbe
            | Fcmovnu
            | Fnop
            | F2xm1
            | Fyl2x
            | Fyl2xp1
            | Fptan
            | Fpatan
            | Fsin
            | Fcos
            | Fsincos
            | Fbld
            | Fbstp
            | Fneni
            | Fndisi
            | Fnsetpm
            | Feni
            | Fdisi
            | Fsetpm
            | Fstpnce
    )
}

/// Instructions that do not check for a pending unmasked exception
/// (SDM vol. 1, 8.6: the non-waiting forms).
fn no_wait(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Fninit | Fnclex | Fnstcw | Fnstsw | Fnstenv | Fnsave | Fneni | Fndisi | Fnsetpm
    )
}

/// Control instructions leave FIP / FDP / FOP alone (SDM vol. 1, 8.1.8).
fn control(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Fninit
            | Finit
            | Fnclex
            | Fclex
            | Fnstcw
            | Fstcw
            | Fldcw
            | Fnstsw
            | Fstsw
            | Fnstenv
            | Fstenv
            | Fldenv
            | Fnsave
            | Fsave
            | Frstor
            | Fneni
            | Fndisi
            | Fnsetpm
            | Feni
            | Fdisi
            | Fsetpm
    )
}

impl InterpVcpu {
    // ---- register file ----

    fn x_get(&self, off: usize, n: usize) -> u128 {
        let mut b = [0u8; 16];
        if let (Some(s), Some(d)) = (self.fpu.xsave.get(off..off + n), b.get_mut(..n)) {
            d.copy_from_slice(s);
        }
        u128::from_le_bytes(b)
    }

    fn x_set(&mut self, off: usize, n: usize, v: u128) {
        if self.fpu.xsave.len() < 4096 {
            self.fpu.xsave.resize(4096, 0);
        }
        let b = v.to_le_bytes();
        if let (Some(d), Some(s)) = (self.fpu.xsave.get_mut(off..off + n), b.get(..n)) {
            d.copy_from_slice(s);
        }
    }

    fn fcw(&self) -> u16 {
        self.x_get(FCW_OFF, 2) as u16
    }

    fn top(&self) -> usize {
        usize::from((self.fsw() >> 11) & 7)
    }

    fn set_top(&mut self, t: usize) {
        let f = (self.fsw() & !(7 << 11)) | ((t as u16 & 7) << 11);
        self.set_fsw(f);
    }

    fn ftw(&self) -> u8 {
        self.x_get(FTW_OFF, 1) as u8
    }

    fn set_ftw(&mut self, t: u8) {
        self.x_set(FTW_OFF, 1, u128::from(t));
    }

    /// Whether ST(i) is empty.
    fn st_empty(&self, i: usize) -> bool {
        self.ftw() & (1 << ((self.top() + i) & 7)) == 0
    }

    fn st(&self, i: usize) -> F80 {
        self.x_get(ST_OFF + 16 * (i & 7), 10)
    }

    /// Writes ST(i) and tags it valid.
    fn set_st(&mut self, i: usize, v: F80) {
        self.x_set(ST_OFF + 16 * (i & 7), 16, v & MASK80);
        let t = self.ftw() | (1 << ((self.top() + i) & 7));
        self.set_ftw(t);
    }

    /// Rotates the slots so that slot k holds what slot k + by held.
    fn rotate(&mut self, by: usize) {
        let regs: [u128; 8] = core::array::from_fn(|k| self.x_get(ST_OFF + 16 * k, 16));
        for k in 0..8 {
            let v = regs.get((k + by) & 7).copied().unwrap_or(0);
            self.x_set(ST_OFF + 16 * k, 16, v);
        }
    }

    /// TOP - 1 and ST(0) = v (the caller checked for overflow).
    fn fpush(&mut self, v: F80) {
        self.rotate(7);
        let t = (self.top() + 7) & 7;
        self.set_top(t);
        self.set_st(0, v);
    }

    /// Marks ST(0) empty and TOP + 1.
    fn fpop(&mut self) {
        let t = self.top();
        self.set_ftw(self.ftw() & !(1 << t));
        self.rotate(1);
        self.set_top((t + 1) & 7);
    }

    // ---- exceptions ----

    /// Merges `x`'s flags into FSW (C1 replaced when `c1` says it is the
    /// instruction's). Returns whether an unmasked exception occurred (the
    /// caller then leaves the destination as it was).
    fn x_flags(&mut self, x: &Xc) -> bool {
        let exc = x.flags & fs::EXC;
        let mut fsw = self.fsw() & !fs::C1;
        fsw |= exc | (x.flags & (fs::C1 | fs::SF));
        let unmasked = exc & !x.fcw & fs::EXC != 0;
        if unmasked {
            fsw |= fs::ES | fs::B;
        }
        self.set_fsw(fsw);
        self.xinuse(0);
        unmasked && exc & !x.fcw & (fs::IE | fs::ZE | fs::DE) != 0
    }

    /// A stack fault (SDM vol. 1, 8.5.1.1): IE and SF, C1 = overflow.
    /// Returns true when the masked response (store the indefinite) applies.
    fn stack_fault(&mut self, x: &mut Xc, overflow: bool) -> bool {
        x.flags |= fs::IE | fs::SF;
        if overflow {
            x.flags |= fs::C1;
        }
        x.masked(fs::IE)
    }

    fn xc(&self) -> Xc {
        Xc {
            fcw: self.fcw(),
            flags: 0,
            src_denormal: false,
        }
    }

    /// Reads ST(i) for an operation; an empty register is a stack
    /// underflow (None).
    fn st_read(&mut self, x: &mut Xc, i: usize) -> Option<F80> {
        if self.st_empty(i) {
            x.flags |= fs::IE | fs::SF;
            None
        } else {
            Some(self.st(i))
        }
    }

    // ---- memory operands ----

    /// The memory operand as an 80-bit value: m32fp, m64fp, m80fp, or
    /// m16int / m32int / m64int; an SNaN of the short formats is IE, a
    /// denormal DE.
    fn x_load(&mut self, i: &Instruction, x: &mut Xc) -> R<F80> {
        let seg = i.memory_segment();
        let ea = self.ea(i);
        let ms = i.memory_size();
        Ok(match ms {
            MemorySize::Float32 | MemorySize::Float64 => {
                let d = ms == MemorySize::Float64;
                let raw = self.read_mem(seg, ea, if d { 8 } else { 4 })?;
                let (v, snan, den) = ext_from(raw, d);
                // IE / DE are the operation's to raise: a NaN operand
                // takes precedence over a denormal one.
                let _ = snan;
                x.src_denormal = den;
                v
            }
            MemorySize::Float80 => self.mem_read_v(seg, ea, 10)? & MASK80,
            MemorySize::Int16 | MemorySize::Int32 | MemorySize::Int64 => {
                let n = ms.size();
                let raw = self.read_mem(seg, ea, n)?;
                let sh = 64 - 8 * n as u32;
                let v = ((raw << sh) as i64) >> sh;
                Ext::from_i128(i128::from(v)).value.to_bits() & MASK80
            }
            _ => return Err(UD),
        })
    }

    /// Records the pointers after a non-control instruction (SDM vol. 1,
    /// 8.1.8-8.1.9): FIP always; FOP and FDP only when the instruction
    /// raised an unmasked exception, as processors do with FOP
    /// compatibility mode off and CPUID.(7,0):EBX[6] (FDP_EXCPTN_ONLY).
    fn x_pointers(&mut self, i: &Instruction, fsw_before: u16) {
        self.x_set(FIP_OFF, 8, u128::from(self.insn_rip));
        let raised = self.fsw() & !fsw_before & fs::EXC & !self.fcw();
        if raised == 0 {
            return;
        }
        // FOP: the low 3 bits of the first opcode byte and the ModR/M byte.
        let la = self.insn_rip;
        let mut op = [0u8; 16];
        let n = (self.insn_len as usize).min(15);
        for (k, b) in op.iter_mut().enumerate().take(n) {
            if let Ok(v) = self.linear(Register::CS, la.wrapping_add(k as u64)) {
                if let Ok(x) = self.lin_read(v, 1, false) {
                    *b = x as u8;
                }
            }
        }
        let pos = op
            .iter()
            .take(n)
            .position(|&b| (0xd8..=0xdf).contains(&b))
            .unwrap_or(0);
        let fop = (u16::from(op[pos] & 7) << 8) | u16::from(op.get(pos + 1).copied().unwrap_or(0));
        self.x_set(FOP_OFF, 2, u128::from(fop));
        if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
            self.x_set(FDP_OFF, 8, u128::from(self.ea(i)));
        }
    }

    // ---- execution ----

    /// Executes `m` when it is an x87 instruction; `None` otherwise.
    pub(crate) fn exec_x87(&mut self, i: &Instruction, m: Mnemonic) -> Option<R<()>> {
        if !is_x87(m) {
            return None;
        }
        if i.has_lock_prefix() {
            return Some(Err(UD));
        }
        let before = self.fsw();
        let r = self.x87(i, m);
        if r.is_ok() {
            if !control(m) {
                self.x_pointers(i, before);
            }
            // XINUSE[0] may be set for a component in its initial state
            // (SDM vol. 1, 13.6); KVM loads x87 state only when it is.
            self.xinuse(0);
        }
        Some(r)
    }

    fn x87(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        use Mnemonic::*;
        let c0 = self.sregs.cr0;
        if c0 & (cr0::EM | cr0::TS) != 0 {
            return Err(NM);
        }
        if !no_wait(m) && self.fsw() & fs::ES != 0 && c0 & cr0::NE != 0 {
            return Err(MF);
        }
        let mut x = self.xc();
        match m {
            Fninit | Finit => {
                self.x_set(FCW_OFF, 2, 0x037f);
                self.set_fsw(0);
                self.set_ftw(0);
                self.x_set(FOP_OFF, 2, 0);
                self.x_set(FIP_OFF, 8, 0);
                self.x_set(FDP_OFF, 8, 0);
                Ok(())
            }
            Fnclex | Fclex => {
                let f = self.fsw() & !(fs::EXC | fs::SF | fs::ES | fs::B);
                self.set_fsw(f);
                Ok(())
            }
            Fnstcw | Fstcw => {
                let v = self.fcw();
                self.write_mem(i.memory_segment(), self.ea(i), 2, u64::from(v))
            }
            Fldcw => {
                let v = self.read_mem(i.memory_segment(), self.ea(i), 2)? as u16;
                self.x_set(FCW_OFF, 2, u128::from(v));
                self.update_es();
                Ok(())
            }
            Fnstsw | Fstsw => {
                let v = u64::from(self.fsw());
                if i.op_kind(0) == OpKind::Register {
                    self.reg_write(Register::AX, v);
                    Ok(())
                } else {
                    self.write_mem(i.memory_segment(), self.ea(i), 2, v)
                }
            }
            Fnstenv | Fstenv => {
                self.store_env(i)?;
                // All exceptions masked afterwards (SDM vol. 2, FSTENV).
                let c = self.fcw() | 0x3f;
                self.x_set(FCW_OFF, 2, u128::from(c));
                Ok(())
            }
            Fldenv => self.load_env(i, false),
            Fnsave | Fsave => {
                self.store_env(i)?;
                let env = self.env_size(i);
                let seg = i.memory_segment();
                let ea = self.ea(i);
                for k in 0..8 {
                    let v = self.st(k);
                    let a = ea.wrapping_add((env + 10 * k) as u64);
                    self.write_mem(seg, a, 8, v as u64)?;
                    self.write_mem(seg, a.wrapping_add(8), 2, (v >> 64) as u64)?;
                }
                self.x87(i, Fninit)
            }
            Frstor => self.load_env(i, true),
            // The 8087 / 287 controls are FNOPs from the 387 on.
            Fnop | Fneni | Fndisi | Fnsetpm | Feni | Fdisi | Fsetpm => Ok(()),
            // D9 D8+i: FSTP ST(i) (an alias encoding).
            Fstpnce => self.x_store(i, Fstp, &mut x),
            Fincstp | Fdecstp => {
                let t = self.top();
                let nt = if m == Fincstp { t + 1 } else { t + 7 } & 7;
                // The slots follow TOP without changing contents.
                self.rotate(if m == Fincstp { 1 } else { 7 });
                self.set_top(nt);
                let f = self.fsw() & !fs::C1;
                self.set_fsw(f);
                Ok(())
            }
            Ffree | Ffreep => {
                let n = i.op_register(0).number();
                let p = (self.top() + n) & 7;
                self.set_ftw(self.ftw() & !(1 << p));
                if m == Ffreep {
                    self.fpop();
                }
                Ok(())
            }
            Fld | Fild | Fld1 | Fldz | Fldpi | Fldl2e | Fldl2t | Fldlg2 | Fldln2 | Fbld => {
                let v = if let Some((c, above)) = constant(m) {
                    // Directed rounding moves the constant one ulp where
                    // the true value lies below / above (SDM vol. 1, 8.3.8).
                    let (_, e, s) = parts(c);
                    let exact = matches!(m, Fld1 | Fldz);
                    let s = match x.rnd() {
                        Round::TowardPositive if above => s + 1,
                        Round::TowardNegative | Round::TowardZero if !above && !exact => s - 1,
                        _ => s,
                    };
                    f80(false, e, s)
                } else if i.op_kind(0) == OpKind::Register {
                    match self.st_read(&mut x, i.op_register(0).number()) {
                        Some(v) => v,
                        None => INDEFINITE,
                    }
                } else if m == Fbld {
                    // 18 packed BCD digits, the sign in bit 79 (SDM vol. 1,
                    // 4.7); invalid digits give an undefined value (here:
                    // their binary weight).
                    let raw = self.mem_read_v(i.memory_segment(), self.ea(i), 10)?;
                    let mut n: u64 = 0;
                    for k in (0..18).rev() {
                        let digit = ((raw >> (4 * k)) & 0xf) as u64;
                        n = n.wrapping_mul(10).wrapping_add(digit);
                    }
                    let mag = Ext::from_u128(u128::from(n)).value.to_bits() & MASK80;
                    mag | (((raw >> 79) & 1) << 79)
                } else {
                    self.x_load(i, &mut x)?
                };
                // FLD m32fp / m64fp: an SNaN is IE and loads quieted, a
                // denormal is DE; FLD m80fp / ST(i) raise neither.
                let short = i.op_kind(0) == OpKind::Memory
                    && matches!(i.memory_size(), MemorySize::Float32 | MemorySize::Float64);
                let v = if short && class(v) == Class::SNaN {
                    x.flags |= fs::IE;
                    v | (1 << 62)
                } else {
                    v
                };
                if short && x.src_denormal {
                    x.flags |= fs::DE;
                }
                if !self.st_empty(7) {
                    if !self.stack_fault(&mut x, true) {
                        self.x_flags(&x);
                        return Ok(());
                    }
                    self.x_flags(&x);
                    self.fpush(INDEFINITE);
                    return Ok(());
                }
                if self.x_flags(&x) {
                    return Ok(());
                }
                self.fpush(v);
                Ok(())
            }
            Fst | Fstp | Fist | Fistp | Fisttp | Fbstp => self.x_store(i, m, &mut x),
            Fxch => {
                let n = if i.op_count() > 1 {
                    i.op_register(1).number()
                } else {
                    1
                };
                let (e0, en) = (self.st_empty(0), self.st_empty(n));
                if e0 || en {
                    if !self.stack_fault(&mut x, false) {
                        self.x_flags(&x);
                        return Ok(());
                    }
                    let (a, b) = (
                        if e0 { INDEFINITE } else { self.st(0) },
                        if en { INDEFINITE } else { self.st(n) },
                    );
                    self.set_st(0, b);
                    self.set_st(n, a);
                    self.x_flags(&x);
                    return Ok(());
                }
                let (a, b) = (self.st(0), self.st(n));
                self.set_st(0, b);
                self.set_st(n, a);
                self.x_flags(&x);
                Ok(())
            }
            Fadd | Faddp | Fiadd | Fsub | Fsubp | Fisub | Fsubr | Fsubrp | Fisubr | Fmul
            | Fmulp | Fimul | Fdiv | Fdivp | Fidiv | Fdivr | Fdivrp | Fidivr => {
                self.x_arith(i, m, &mut x)
            }
            Fcom | Fcomp | Fcompp | Ficom | Ficomp | Fucom | Fucomp | Fucompp | Ftst | Fcomi
            | Fcomip | Fucomi | Fucomip => self.x_compare(i, m, &mut x),
            Fxam => {
                let v = self.st(0);
                let (neg, _, _) = parts(v);
                let c = if self.st_empty(0) {
                    fs::C3 | fs::C0
                } else {
                    match class(v) {
                        Class::Unsupported => 0,
                        Class::QNaN | Class::SNaN => fs::C0,
                        Class::Normal => fs::C2,
                        Class::Inf => fs::C2 | fs::C0,
                        Class::Zero => fs::C3,
                        Class::Denormal => fs::C3 | fs::C2,
                    }
                };
                let f = (self.fsw() & !fs::CC) | c | if neg { fs::C1 } else { 0 };
                self.set_fsw(f);
                Ok(())
            }
            Fchs | Fabs | Fsqrt | Frndint | F2xm1 | Fsin | Fcos => {
                let Some(v) = self.st_read(&mut x, 0) else {
                    if self.stack_fault(&mut x, false) {
                        self.set_st(0, INDEFINITE);
                    }
                    self.x_flags(&x);
                    return Ok(());
                };
                let r = match m {
                    Fchs => v ^ (1 << 79),
                    Fabs => v & !(1 << 79),
                    Fsqrt => x.sqrt(v),
                    Frndint => {
                        if let Some(n) = x.nan2(v, v) {
                            n
                        } else {
                            x.denorm(&[v]);
                            let r = Ext::from_bits(v).round_to_integral(x.rnd());
                            let rv = r.value.to_bits() & MASK80;
                            let up = rv & !(1 << 79) > v & !(1 << 79);
                            x.post(r.status, rv, up)
                        }
                    }
                    _ => self.x_transcendental1(m, v, &mut x),
                };
                if !self.x_flags(&x) {
                    self.set_st(0, r);
                }
                Ok(())
            }
            Fscale | Fprem | Fprem1 | Fyl2x | Fyl2xp1 | Fpatan => {
                let (a, b) = (self.st_read(&mut x, 0), self.st_read(&mut x, 1));
                let (Some(a), Some(b)) = (a, b) else {
                    let masked = self.stack_fault(&mut x, false);
                    self.x_flags(&x);
                    if masked {
                        if matches!(m, Fyl2x | Fyl2xp1 | Fpatan) {
                            self.set_st(1, INDEFINITE);
                            self.fpop();
                        } else {
                            self.set_st(0, INDEFINITE);
                        }
                    }
                    return Ok(());
                };
                let (r, cc) = match m {
                    Fscale => (self.x_scale(a, b, &mut x), None),
                    Fprem | Fprem1 => {
                        let (r, cc) = x_prem(a, b, m == Fprem1, &mut x);
                        (r, Some(cc))
                    }
                    _ => (self.x_transcendental2(m, a, b, &mut x), None),
                };
                if self.x_flags(&x) {
                    return Ok(());
                }
                if let Some(cc) = cc {
                    let f = (self.fsw() & !fs::CC) | cc;
                    self.set_fsw(f);
                }
                if matches!(m, Fyl2x | Fyl2xp1 | Fpatan) {
                    self.set_st(1, r);
                    self.fpop();
                } else {
                    self.set_st(0, r);
                }
                Ok(())
            }
            Fxtract | Fptan | Fsincos => {
                let Some(v) = self.st_read(&mut x, 0) else {
                    self.stack_fault(&mut x, false);
                    self.x_flags(&x);
                    return Ok(());
                };
                if !self.st_empty(7) {
                    self.stack_fault(&mut x, true);
                    self.x_flags(&x);
                    return Ok(());
                }
                let (lo, hi) = match m {
                    Fxtract => {
                        let (neg, e, s) = parts(v);
                        match class(v) {
                            Class::Zero => {
                                x.flags |= fs::ZE;
                                (f80(true, 0x7fff, INT_BIT), v)
                            }
                            Class::Normal | Class::Denormal => {
                                let (exp, sig) = if e == 0 {
                                    x.flags |= fs::DE;
                                    let lz = s.leading_zeros() as i32;
                                    (1 - lz, s << lz)
                                } else {
                                    (i32::from(e), s)
                                };
                                let ev = Ext::from_i128(i128::from(exp - 16383)).value.to_bits();
                                (ev & MASK80, f80(neg, 0x3fff, sig))
                            }
                            Class::Inf => (f80(false, 0x7fff, INT_BIT), v),
                            _ => {
                                let n = x.nan2(v, v).unwrap_or(INDEFINITE);
                                (n, n)
                            }
                        }
                    }
                    Fptan => {
                        let r = from_f64(to_f64(v).tan());
                        x.flags |= fs::PE;
                        (r, f80(false, 0x3fff, INT_BIT))
                    }
                    _ => {
                        let f = to_f64(v);
                        x.flags |= fs::PE;
                        (from_f64(f.sin()), from_f64(f.cos()))
                    }
                };
                if self.x_flags(&x) {
                    return Ok(());
                }
                // ST(0) <- lo, then push hi (FXTRACT: exponent then
                // significand; FPTAN: tan then 1.0; FSINCOS: sin then cos).
                self.set_st(0, lo);
                self.fpush(hi);
                let f = self.fsw() & !fs::C2;
                self.set_fsw(f);
                Ok(())
            }
            Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe | Fcmovnu => {
                let n = i.op_register(1).number();
                let f = self.rflags;
                let c = match m {
                    Fcmovb => f & CF != 0,
                    Fcmove => f & ZF != 0,
                    Fcmovbe => f & (CF | ZF) != 0,
                    Fcmovu => f & PF != 0,
                    Fcmovnb => f & CF == 0,
                    Fcmovne => f & ZF == 0,
                    Fcmovnbe => f & (CF | ZF) == 0,
                    _ => f & PF == 0,
                };
                if self.st_empty(0) || self.st_empty(n) {
                    if self.stack_fault(&mut x, false) {
                        self.set_st(0, INDEFINITE);
                    }
                    self.x_flags(&x);
                    return Ok(());
                }
                if c {
                    let v = self.st(n);
                    self.set_st(0, v);
                }
                self.x_flags(&x);
                Ok(())
            }
            _ => Err(UD),
        }
    }

    /// FSW.ES (and B) follow the unmasked exceptions after FLDCW / FLDENV.
    fn update_es(&mut self) {
        let f = self.fsw();
        let pending = f & fs::EXC & !self.fcw() != 0;
        let f = if pending {
            f | fs::ES | fs::B
        } else {
            f & !(fs::ES | fs::B)
        };
        self.set_fsw(f);
    }

    fn x_arith(&mut self, i: &Instruction, m: Mnemonic, x: &mut Xc) -> R<()> {
        use Mnemonic::*;
        let op = match m {
            Fadd | Faddp | Fiadd => XOp::Add,
            Fsub | Fsubp | Fisub | Fsubr | Fsubrp | Fisubr => XOp::Sub,
            Fmul | Fmulp | Fimul => XOp::Mul,
            _ => XOp::Div,
        };
        let reverse = matches!(m, Fsubr | Fsubrp | Fisubr | Fdivr | Fdivrp | Fidivr);
        let pop = matches!(m, Faddp | Fsubp | Fsubrp | Fmulp | Fdivp | Fdivrp);
        // (destination index, destination value, source value)
        let (d, a, b) = if i.op_count() >= 1 && i.op_kind(0) == OpKind::Memory {
            let b = self.x_load(i, x)?;
            (0, self.st_read(x, 0), Some(b))
        } else {
            let (d, s) = if i.op_count() >= 2 {
                (i.op_register(0).number(), i.op_register(1).number())
            } else {
                (1, 0)
            };
            (d, self.st_read(x, d), self.st_read(x, s))
        };
        let (Some(a), Some(b)) = (a, b) else {
            if self.stack_fault(x, false) {
                self.set_st(d, INDEFINITE);
                if pop {
                    self.fpop();
                }
            }
            self.x_flags(x);
            return Ok(());
        };
        let r = if reverse {
            x.arith(op, b, a)
        } else {
            x.arith(op, a, b)
        };
        if self.x_flags(x) {
            return Ok(());
        }
        self.set_st(d, r);
        if pop {
            self.fpop();
        }
        Ok(())
    }

    fn x_compare(&mut self, i: &Instruction, m: Mnemonic, x: &mut Xc) -> R<()> {
        use Mnemonic::*;
        let unordered_ok = matches!(m, Fucom | Fucomp | Fucompp | Fucomi | Fucomip);
        let pops = match m {
            Fcomp | Ficomp | Fucomp | Fcomip | Fucomip => 1,
            Fcompp | Fucompp => 2,
            _ => 0,
        };
        let eflags = matches!(m, Fcomi | Fcomip | Fucomi | Fucomip);
        let a = self.st_read(x, 0);
        let b = if m == Ftst {
            Some(0)
        } else if i.op_count() >= 1 && i.op_kind(0) == OpKind::Memory {
            Some(self.x_load(i, x)?)
        } else {
            let n = match i.op_count() {
                0 => 1,
                1 => i.op_register(0).number(),
                _ => i.op_register(1).number(),
            };
            self.st_read(x, n)
        };
        // C3 C2 C0 (or ZF PF CF): 111 unordered, 100 equal, 001 less.
        let rel = match (a, b) {
            (Some(a), Some(b)) => {
                let (ca, cb) = (class(a), class(b));
                if ca == Class::Unsupported || cb == Class::Unsupported || is_nan(ca) || is_nan(cb)
                {
                    if !unordered_ok
                        || ca == Class::SNaN
                        || cb == Class::SNaN
                        || ca == Class::Unsupported
                        || cb == Class::Unsupported
                    {
                        x.flags |= fs::IE;
                    }
                    3
                } else {
                    x.denorm(&[a, b]);
                    match Ext::from_bits(a).partial_cmp(&Ext::from_bits(b)) {
                        Some(std::cmp::Ordering::Less) => 1,
                        Some(std::cmp::Ordering::Equal) => 0,
                        Some(std::cmp::Ordering::Greater) => 2,
                        None => 3,
                    }
                }
            }
            _ => {
                self.stack_fault(x, false);
                3
            }
        };
        let unmasked = self.x_flags(x);
        if unmasked {
            return Ok(());
        }
        if eflags {
            let f = match rel {
                0 => ZF,
                1 => CF,
                2 => 0,
                _ => ZF | PF | CF,
            };
            self.rflags = (self.rflags & !(CF | PF | AF | ZF | SF | OF)) | f;
        } else {
            let c = match rel {
                0 => fs::C3,
                1 => fs::C0,
                2 => 0,
                _ => fs::C3 | fs::C2 | fs::C0,
            };
            let f = (self.fsw() & !(fs::C0 | fs::C2 | fs::C3 | fs::C1)) | c;
            self.set_fsw(f);
        }
        for _ in 0..pops {
            self.fpop();
        }
        Ok(())
    }

    /// FST / FSTP / FIST / FISTP / FISTTP.
    fn x_store(&mut self, i: &Instruction, m: Mnemonic, x: &mut Xc) -> R<()> {
        use Mnemonic::*;
        let pop = matches!(m, Fstp | Fistp | Fisttp | Fbstp);
        let v = self.st_read(x, 0);
        if m == Fbstp {
            return self.x_fbstp(i, v, x);
        }
        if i.op_kind(0) == OpKind::Register {
            let n = i.op_register(0).number();
            let v = match v {
                Some(v) => v,
                None => {
                    if !self.stack_fault(x, false) {
                        self.x_flags(x);
                        return Ok(());
                    }
                    INDEFINITE
                }
            };
            self.x_flags(x);
            self.set_st(n, v);
            if pop {
                self.fpop();
            }
            return Ok(());
        }
        let seg = i.memory_segment();
        let ea = self.ea(i);
        let ms = i.memory_size();
        let size = ms.size();
        let (raw, n) = match v {
            None => {
                if !self.stack_fault(x, false) {
                    self.x_flags(x);
                    return Ok(());
                }
                let r = match ms {
                    MemorySize::Float32 => 0xffc0_0000,
                    MemorySize::Float64 => 0xfff8_0000_0000_0000,
                    MemorySize::Float80 => INDEFINITE,
                    _ => 1u128 << (8 * size - 1),
                };
                (r, size)
            }
            Some(v) => match ms {
                MemorySize::Float80 => (v, 10),
                MemorySize::Float32 | MemorySize::Float64 => (
                    u128::from(x_to_float(v, ms == MemorySize::Float64, x)),
                    size,
                ),
                _ => {
                    let trunc = m == Fisttp;
                    (u128::from(x_to_int(v, 8 * size, trunc, x)), size)
                }
            },
        };
        // An unmasked IE / OE / UE stores nothing; otherwise the store comes
        // first, so that a fault on it leaves FSW as it was.
        let blocking = fs::IE | fs::DE | fs::ZE | fs::OE | fs::UE;
        if x.flags & !x.fcw & blocking != 0 {
            self.x_flags(x);
            return Ok(());
        }
        self.mem_write_v(seg, ea, n, raw)?;
        self.x_flags(x);
        if pop {
            self.fpop();
        }
        Ok(())
    }

    /// FBSTP: ST(0) rounded by FCW.RC to 18 packed BCD digits; NaN,
    /// infinity or a magnitude of 10^18 or more is IE with the packed BCD
    /// indefinite (SDM vol. 2, FBSTP).
    fn x_fbstp(&mut self, i: &Instruction, v: Option<F80>, x: &mut Xc) -> R<()> {
        const BCD_INDEFINITE: u128 = 0xffff_c000_0000_0000_0000;
        let raw = match v {
            None => {
                if !self.stack_fault(x, false) {
                    self.x_flags(x);
                    return Ok(());
                }
                BCD_INDEFINITE
            }
            Some(v) => {
                let c = class(v);
                let (neg, _, _) = parts(v);
                let mut exact = false;
                let r = Ext::from_bits(v).to_i128_r(64, x.rnd(), &mut exact);
                let mag = r.value.unsigned_abs();
                if matches!(
                    c,
                    Class::QNaN | Class::SNaN | Class::Inf | Class::Unsupported
                ) || r.status.contains(Status::INVALID_OP)
                    || mag >= 1_000_000_000_000_000_000
                {
                    x.flags |= fs::IE;
                    BCD_INDEFINITE
                } else {
                    if !exact {
                        x.flags |= fs::PE;
                        let mut e2 = false;
                        let t = Ext::from_bits(v).to_i128_r(64, Round::TowardZero, &mut e2);
                        if mag > t.value.unsigned_abs() {
                            x.flags |= fs::C1;
                        }
                    }
                    let mut out = u128::from(neg) << 79;
                    let mut n = mag;
                    for k in 0..18 {
                        out |= (n % 10) << (4 * k);
                        n /= 10;
                    }
                    out
                }
            }
        };
        if x.flags & !x.fcw & (fs::IE | fs::DE) != 0 {
            self.x_flags(x);
            return Ok(());
        }
        self.mem_write_v(i.memory_segment(), self.ea(i), 10, raw)?;
        self.x_flags(x);
        self.fpop();
        Ok(())
    }

    fn x_scale(&mut self, a: F80, b: F80, x: &mut Xc) -> F80 {
        if let Some(n) = x.nan2(a, b) {
            return n;
        }
        let (ca, cb) = (class(a), class(b));
        x.denorm(&[a, b]);
        let (bneg, _, _) = parts(b);
        match (ca, cb) {
            (Class::Zero, Class::Inf) if !bneg => {
                x.flags |= fs::IE;
                return INDEFINITE;
            }
            (Class::Inf, Class::Inf) if bneg => {
                x.flags |= fs::IE;
                return INDEFINITE;
            }
            (Class::Zero | Class::Inf, _) => return a,
            (_, Class::Inf) => {
                let (neg, _, _) = parts(a);
                return if bneg {
                    f80(neg, 0, 0)
                } else {
                    f80(neg, 0x7fff, INT_BIT)
                };
            }
            _ => {}
        }
        // The scale: ST(1) truncated toward zero, clamped (beyond +-2^16 the
        // result over- or underflows anyway).
        let mut exact = false;
        let n = Ext::from_bits(b)
            .to_i128_r(32, Round::TowardZero, &mut exact)
            .value
            .clamp(-70000, 70000) as i32;
        let (neg, e, s) = parts(a);
        let (exp, sig) = if e == 0 {
            let lz = s.leading_zeros() as i32;
            (1 - lz, s << lz)
        } else {
            (i32::from(e), s)
        };
        let r = round_x87(neg, exp + n, sig, 0, false, 64, x.rnd());
        x.post_rounded(r)
    }

    fn x_transcendental1(&mut self, m: Mnemonic, v: F80, x: &mut Xc) -> F80 {
        if let Some(n) = x.nan2(v, v) {
            return n;
        }
        let f = to_f64(v);
        let r = match m {
            Mnemonic::F2xm1 => f.exp2() - 1.0,
            Mnemonic::Fsin => f.sin(),
            _ => f.cos(),
        };
        if r.is_nan() {
            x.flags |= fs::IE;
            return INDEFINITE;
        }
        x.flags |= fs::PE;
        from_f64(r)
    }

    fn x_transcendental2(&mut self, m: Mnemonic, a: F80, b: F80, x: &mut Xc) -> F80 {
        if let Some(n) = x.nan2(a, b) {
            return n;
        }
        let (fa, fb) = (to_f64(a), to_f64(b));
        let r = match m {
            // ST(1) * log2(ST(0)).
            Mnemonic::Fyl2x => fb * fa.log2(),
            Mnemonic::Fyl2xp1 => fb * fa.ln_1p() / std::f64::consts::LN_2,
            // atan(ST(1) / ST(0)).
            _ => fb.atan2(fa),
        };
        if r.is_nan() {
            x.flags |= fs::IE;
            return INDEFINITE;
        }
        x.flags |= fs::PE;
        from_f64(r)
    }

    // ---- environment ----

    fn env_size(&self, i: &Instruction) -> usize {
        match i.memory_size() {
            MemorySize::FpuEnv14 | MemorySize::FpuState94 => 14,
            _ => 28,
        }
    }

    /// The full 16-bit tag word (SDM vol. 1, 8.1.7) from the abridged one
    /// and the register contents.
    fn full_tag(&self) -> u16 {
        let (ftw, top) = (self.ftw(), self.top());
        let mut t = 0u16;
        for p in 0..8 {
            let tag = if ftw & (1 << p) == 0 {
                3
            } else {
                match class(self.st((p + 8 - top) & 7)) {
                    Class::Zero => 1,
                    Class::Normal => 0,
                    _ => 2,
                }
            };
            t |= tag << (2 * p);
        }
        t
    }

    fn store_env(&mut self, i: &Instruction) -> R<()> {
        let seg = i.memory_segment();
        let ea = self.ea(i);
        let fip = self.x_get(FIP_OFF, 8) as u64;
        let fdp = self.x_get(FDP_OFF, 8) as u64;
        let fop = self.x_get(FOP_OFF, 2) as u64 & 0x7ff;
        let (fcw, fsw, ftw) = (
            u64::from(self.fcw()),
            u64::from(self.fsw()),
            u64::from(self.full_tag()),
        );
        // FCS and FDS are deprecated and stored as zero, as processors with
        // CPUID.(7,0):EBX[13] do (SDM vol. 1, 8.1.8).
        let (cs, ds) = (0u64, 0u64);
        if self.env_size(i) == 14 {
            let words = [fcw, fsw, ftw, fip & 0xffff, cs, fdp & 0xffff, ds];
            let a = self.linear(seg, ea)?;
            self.probe_write(a, self.cpl() == 3)?;
            for (k, w) in words.iter().enumerate() {
                self.write_mem(seg, ea.wrapping_add(2 * k as u64), 2, *w)?;
            }
        } else {
            // Reserved upper halves read as ones on Intel processors.
            let hi = 0xffff_0000u64;
            let dwords = [
                hi | fcw,
                hi | fsw,
                hi | ftw,
                fip & 0xffff_ffff,
                cs | (fop << 16),
                fdp & 0xffff_ffff,
                hi | ds,
            ];
            for (k, d) in dwords.iter().enumerate() {
                self.write_mem(seg, ea.wrapping_add(4 * k as u64), 4, *d)?;
            }
        }
        Ok(())
    }

    fn load_env(&mut self, i: &Instruction, regs: bool) -> R<()> {
        let seg = i.memory_segment();
        let ea = self.ea(i);
        let env = self.env_size(i);
        let unit = if env == 14 { 2 } else { 4 };
        let rd = |v: &mut Self, k: u64| v.read_mem(seg, ea.wrapping_add(unit * k), unit as usize);
        let fcw = rd(self, 0)? as u16;
        let fsw = rd(self, 1)? as u16;
        let ftw = rd(self, 2)? as u16;
        let fip = rd(self, 3)?;
        let fop = (rd(self, 4)? >> 16) as u16 & 0x7ff;
        let fdp = rd(self, 5)?;
        let mut st = [0u128; 8];
        if regs {
            for (k, s) in st.iter_mut().enumerate() {
                *s = self.mem_read_v(seg, ea.wrapping_add((env + 10 * k) as u64), 10)? & MASK80;
            }
        }
        self.x_set(FCW_OFF, 2, u128::from(fcw));
        self.set_fsw(fsw);
        let mut abridged = 0u8;
        for p in 0..8 {
            if (ftw >> (2 * p)) & 3 != 3 {
                abridged |= 1 << p;
            }
        }
        self.set_ftw(abridged);
        self.x_set(FIP_OFF, 8, u128::from(fip));
        self.x_set(FDP_OFF, 8, u128::from(fdp));
        if env == 28 {
            self.x_set(FOP_OFF, 2, u128::from(fop));
        }
        if regs {
            for (k, s) in st.iter().enumerate() {
                self.x_set(ST_OFF + 16 * k, 16, *s);
            }
        }
        self.update_es();
        self.xinuse(0);
        Ok(())
    }
}

/// FST m32fp / m64fp: rounds with FCW.RC to the memory format.
fn x_to_float(v: F80, double: bool, x: &mut Xc) -> u64 {
    let c = class(v);
    let (neg, _, s) = parts(v);
    if c == Class::Unsupported {
        x.flags |= fs::IE;
        return if double {
            0xfff8_0000_0000_0000
        } else {
            0xffc0_0000
        };
    }
    if is_nan(c) {
        if c == Class::SNaN {
            x.flags |= fs::IE;
        }
        let sign = u64::from(neg);
        return if double {
            (sign << 63) | 0x7ff8_0000_0000_0000 | ((s >> 11) & 0x000f_ffff_ffff_ffff)
        } else {
            (sign << 31) | 0x7fc0_0000 | ((s >> 40) & 0x007f_ffff)
        };
    }
    // No DE: FST does not report denormal operands (SDM vol. 2, FST).
    let rnd = x.rnd();
    let mut li = false;
    let (r, t) = if double {
        let r: StatusAnd<Double> = Ext::from_bits(v).convert_r(rnd, &mut li);
        let t: StatusAnd<Double> = Ext::from_bits(v).convert_r(Round::TowardZero, &mut li);
        (r.map(|f| f.to_bits() as u64), t.value.to_bits() as u64)
    } else {
        let r: StatusAnd<Single> = Ext::from_bits(v).convert_r(rnd, &mut li);
        let t: StatusAnd<Single> = Ext::from_bits(v).convert_r(Round::TowardZero, &mut li);
        (r.map(|f| f.to_bits() as u64), t.value.to_bits() as u64)
    };
    let sign = if double { 1u64 << 63 } else { 1 << 31 };
    let up = (r.value & !sign) > (t & !sign);
    let st = r.status;
    let emax1 = if double { 1024 } else { 128 };
    if st.contains(Status::OVERFLOW)
        || (Ext::from_bits(v).is_finite_non_zero() && Ext::from_bits(v).ilogb() >= emax1)
    {
        x.flags |= fs::OE;
    }
    let den = if double {
        r.value & 0x7ff0_0000_0000_0000 == 0 && r.value & 0x000f_ffff_ffff_ffff != 0
    } else {
        r.value & 0x7f80_0000 == 0 && r.value & 0x007f_ffff != 0
    };
    let inexact = st.contains(Status::INEXACT);
    if (den || st.contains(Status::UNDERFLOW)) && (inexact || !x.masked(fs::UE)) {
        x.flags |= fs::UE;
    }
    if inexact {
        x.flags |= fs::PE;
        if up {
            x.flags |= fs::C1;
        }
    }
    r.value
}

/// FIST / FISTTP: NaN, infinity or out of range is IE with the integer
/// indefinite (masked response).
fn x_to_int(v: F80, width: usize, trunc: bool, x: &mut Xc) -> u64 {
    let indefinite = 1u64 << (width - 1);
    let c = class(v);
    if matches!(
        c,
        Class::Unsupported | Class::QNaN | Class::SNaN | Class::Inf
    ) {
        x.flags |= fs::IE;
        return indefinite;
    }
    let rnd = if trunc { Round::TowardZero } else { x.rnd() };
    let mut exact = false;
    let r = Ext::from_bits(v).to_i128_r(width, rnd, &mut exact);
    if r.status.contains(Status::INVALID_OP) {
        x.flags |= fs::IE;
        return indefinite;
    }
    if !exact {
        x.flags |= fs::PE;
        let mut e2 = false;
        let t = Ext::from_bits(v).to_i128_r(width, Round::TowardZero, &mut e2);
        if r.value.unsigned_abs() > t.value.unsigned_abs() {
            x.flags |= fs::C1;
        }
    }
    (r.value as u64) & (u64::MAX >> (64 - width))
}

/// FPREM / FPREM1: ST(0) rem ST(1), with the condition codes: C2 set for
/// an incomplete reduction, else C0 C3 C1 = quotient bits 2, 1, 0.
fn x_prem(a: F80, b: F80, ieee: bool, x: &mut Xc) -> (F80, u16) {
    if let Some(n) = x.nan2(a, b) {
        return (n, 0);
    }
    let (ca, cb) = (class(a), class(b));
    if ca == Class::Inf || cb == Class::Zero {
        x.flags |= fs::IE;
        return (INDEFINITE, 0);
    }
    x.denorm(&[a, b]);
    if ca == Class::Zero || cb == Class::Inf {
        return (a, 0);
    }
    let ea = Ext::from_bits(a).ilogb();
    let eb = Ext::from_bits(b).ilogb();
    let d = ea - eb;
    if d >= 64 {
        // Partial: reduce by b * 2^(d - N), N = 32 + d mod 32 (what Intel
        // processors are seen to do; the SDM allows N in [32, 63]).
        let n = 32 + d % 32;
        let bs = Ext::from_bits(b).scalbn(d - n);
        let r = Ext::from_bits(a).c_fmod(bs).value;
        return (r.to_bits() & MASK80, fs::C2);
    }
    let (fa, fb) = (Ext::from_bits(a), Ext::from_bits(b));
    let r = if ieee {
        fa.ieee_rem(fb).value
    } else {
        fa.c_fmod(fb).value
    };
    // The quotient's low bits from the integer significands:
    // |a| / |b| = ma * 2^d / mb.
    let norm = |x: F80| -> u64 {
        let (_, e, s) = parts(x);
        if e == 0 {
            s << s.leading_zeros()
        } else {
            s
        }
    };
    let (ma, mb) = (norm(a), norm(b));
    let qi: u128 = if d < -1 {
        0
    } else {
        // num / den = ma * 2^d / mb, both scaled by 2 so that d = -1 fits.
        let num = u128::from(ma) << (d + 1);
        let den = u128::from(mb) << 1;
        let q = num / den;
        let rem = num - q * den;
        if ieee && (2 * rem > den || (2 * rem == den && q & 1 != 0)) {
            q + 1
        } else {
            q
        }
    };
    let mut cc = 0;
    if qi & 4 != 0 {
        cc |= fs::C0;
    }
    if qi & 2 != 0 {
        cc |= fs::C3;
    }
    if qi & 1 != 0 {
        cc |= fs::C1;
    }
    (r.to_bits() & MASK80, cc)
}
