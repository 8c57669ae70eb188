//! Arithmetic flags, computed eagerly as the SDM defines them per
//! instruction (vol. 2, each instruction's "Flags Affected").

pub const CF: u64 = 1 << 0;
pub const PF: u64 = 1 << 2;
pub const AF: u64 = 1 << 4;
pub const ZF: u64 = 1 << 6;
pub const SF: u64 = 1 << 7;
pub const TF: u64 = 1 << 8;
pub const IF: u64 = 1 << 9;
pub const DF: u64 = 1 << 10;
pub const OF: u64 = 1 << 11;
pub const IOPL: u64 = 3 << 12;
pub const NT: u64 = 1 << 14;
pub const RF: u64 = 1 << 16;
pub const VM: u64 = 1 << 17;
pub const AC: u64 = 1 << 18;
pub const VIF: u64 = 1 << 19;
pub const VIP: u64 = 1 << 20;
pub const ID: u64 = 1 << 21;
/// The six status flags.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// Bits software can hold in RFLAGS.
pub const SETTABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;

/// All-ones mask of an operand of `size` bytes.
#[inline(always)]
pub fn mask(size: usize) -> u64 {
    // A table rather than a `match`: sizes are run-time values here.
    const M: [u64; 9] = [
        u64::MAX,
        0xff,
        0xffff,
        u64::MAX,
        0xffff_ffff,
        u64::MAX,
        u64::MAX,
        u64::MAX,
        u64::MAX,
    ];
    M.get(size).copied().unwrap_or(u64::MAX)
}

/// The sign bit of an operand of `size` bytes.
#[inline(always)]
pub fn sign(size: usize) -> u64 {
    const S: [u64; 9] = [
        1 << 63,
        0x80,
        0x8000,
        1 << 63,
        0x8000_0000,
        1 << 63,
        1 << 63,
        1 << 63,
        1 << 63,
    ];
    S.get(size).copied().unwrap_or(1 << 63)
}

/// Sign-extends the low `size` bytes of `v`.
#[inline(always)]
pub fn sext(v: u64, size: usize) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

/// PF, ZF and SF of result `r` (already masked to `size`).
#[inline(always)]
pub fn szp(r: u64, size: usize) -> u64 {
    // PF: an even number of ones in the low byte. 0x9669 has bit n set for
    // each 4-bit n with even parity; the byte's halves fold into one nibble.
    let b = r as u8;
    let mut f = if (0x9669u16 >> ((b ^ (b >> 4)) & 0xf)) & 1 != 0 {
        PF
    } else {
        0
    };
    if r & mask(size) == 0 {
        f |= ZF;
    }
    if r & sign(size) != 0 {
        f |= SF;
    }
    f
}

/// Flags of `a + b + carry` = `r` (ADD, ADC, INC without CF).
#[inline(always)]
pub fn add(a: u64, b: u64, carry: u64, r: u64, size: usize) -> u64 {
    let m = mask(size);
    let (a, b, r) = (a & m, b & m, r & m);
    let mut f = szp(r, size);
    if r < a || (carry != 0 && r == a) {
        f |= CF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    if (a ^ r) & (b ^ r) & sign(size) != 0 {
        f |= OF;
    }
    f
}

/// Flags of `a - b - borrow` = `r` (SUB, SBB, CMP, NEG, DEC without CF).
#[inline(always)]
pub fn sub(a: u64, b: u64, borrow: u64, r: u64, size: usize) -> u64 {
    let m = mask(size);
    let (a, b, r) = (a & m, b & m, r & m);
    let mut f = szp(r, size);
    if a < b || (borrow != 0 && a == b) {
        f |= CF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    if (a ^ b) & (a ^ r) & sign(size) != 0 {
        f |= OF;
    }
    f
}

/// Flags of AND, OR, XOR, TEST: CF = OF = 0, SF ZF PF from the result. AF is
/// undefined; Intel processors clear it, and so does this.
#[inline(always)]
pub fn logic(r: u64, size: usize) -> u64 {
    szp(r & mask(size), size)
}

/// The environment variable of the test-only planted bug.
pub const PLANTED_BUG_ENV: &str = "TANDEM_INTERP_PLANTED_BUG";

/// Test-only: with `TANDEM_INTERP_PLANTED_BUG=adc-carry-flag` (that exact
/// value) ADC computes an inverted CF, so that tests/fuzz.rs can show that
/// `tandem diff --lockstep` and `tandem fuzz` find a wrong flag result and
/// name that instruction first. Read once per process; unset or any other
/// value leaves the interpreter correct, and when it is on it says so on
/// stderr.
pub fn planted_adc_cf() -> u64 {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| {
        let on = std::env::var(PLANTED_BUG_ENV).as_deref() == Ok("adc-carry-flag");
        if on {
            eprintln!(
                "tandem-interp: {PLANTED_BUG_ENV}=adc-carry-flag: ADC's CF is wrong on purpose"
            );
        }
        on
    });
    if on {
        CF
    } else {
        0
    }
}
