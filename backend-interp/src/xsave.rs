//! CMPXCHG8B / CMPXCHG16B, XGETBV / XSETBV and the state-save instructions
//! (FXSAVE, FXRSTOR, XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS).
//!
//! IA32_XSS is taken as 0 (no supervisor state components): XSAVES and
//! XRSTORS are XSAVEC and compacted-form XRSTOR restricted to CPL 0.
//!
//! The x87 / MMX / SSE state lives in `FpuState::xsave` itself, in the
//! standard XSAVE layout: `sse.rs` and `x87.rs` execute their instructions
//! on it in place, so it round-trips to KVM unchanged; these instructions
//! move it between the buffer and guest memory exactly as the SDM
//! describes (vol. 1, chapter 13).

use iced_x86::{Instruction, Mnemonic, Register};
use tandem_core::cpu::{cr0, cr4};
use tandem_core::vcpu::VcpuExit;

use crate::flags::ZF;
use crate::{InterpVcpu, Stop, R};

const UD: Stop = Stop::Exc(6, None);
const NM: Stop = Stop::Exc(7, None);
const GP0: Stop = Stop::Exc(13, Some(0));

/// Offset of the XSAVE header (XSTATE_BV, XCOMP_BV) in the standard form.
const HEADER: usize = 512;
/// Offset of the PKRU component in the standard form (SDM vol. 1, 13.5.7).
const PKRU: usize = 2688;
/// Offset and size of the MXCSR and MXCSR_MASK pair.
const MXCSR: usize = 24;
/// MXCSR_MASK when the image leaves it 0: every MXCSR bit, DAZ included
/// (`sse.rs` implements DAZ), as current processors report (SDM vol. 1,
/// 11.6.6).
const DEFAULT_MXCSR_MASK: u32 = 0xffff;

/// Standard-form components beyond x87 and SSE: (bit, offset, size), as
/// CPUID leaf 0xD reports them on Intel processors: AVX, the MPX pair,
/// AVX-512's opmask / ZMM_Hi256 / Hi16_ZMM, PKRU.
const EXTENDED: &[(u32, usize, usize)] = &[
    (2, 576, 256),
    (3, 960, 64),
    (4, 1024, 64),
    (5, 1088, 64),
    (6, 1152, 512),
    (7, 1664, 1024),
    (9, 2688, 8),
];

/// XCOMP_BV[63]: the image is in the compacted form.
const COMPACTED: u64 = 1 << 63;

/// Where the extended components of `bv` lie in a compacted-form image:
/// (bit, offset in the image, offset in the standard form, size), packed
/// from 576 in bit order (none of these components asks for 64-byte
/// alignment, CPUID.(0xD,i):ECX[1]). `None` when `bv` names a component
/// this table does not know.
fn compacted_layout(bv: u64) -> Option<Vec<(u32, usize, usize, usize)>> {
    let known = EXTENDED.iter().fold(3u64, |m, &(b, _, _)| m | (1 << b));
    if bv & !known & !COMPACTED != 0 {
        return None;
    }
    let mut off = 576;
    let mut out = Vec::new();
    for &(bit, std_off, size) in EXTENDED {
        if bv & (1 << bit) != 0 {
            out.push((bit, off, std_off, size));
            off += size;
        }
    }
    Some(out)
}

fn unknown_component(bv: u64) -> Stop {
    Stop::Exit(VcpuExit::Unhandled(format!(
        "the interpreter does not know the XSAVE layout of state components {bv:#x}"
    )))
}

/// XCR0 bits XSETBV accepts.
const XCR0_SUPPORTED: u64 = 0x2ff;

/// The byte ranges of the legacy region component `bit` (0: x87, 1: SSE)
/// occupies, excluding MXCSR; XMM8-15 only in 64-bit mode.
fn legacy_ranges(bit: u32, long: bool) -> &'static [(usize, usize)] {
    match (bit, long) {
        // FCW FSW FTW FOP FIP FDP, then ST0-7.
        (0, _) => &[(0, 24), (32, 160)],
        (_, true) => &[(160, 416)],
        (_, false) => &[(160, 288)],
    }
}

/// Whether `xcr0` is a value XSETBV accepts (SDM vol. 2, XSETBV): x87
/// always on, AVX needs SSE, the MPX pair together, the three AVX-512
/// components together and with AVX.
pub(crate) fn valid_xcr0(xcr0: u64) -> bool {
    let bit = |n: u32| xcr0 & (1 << n) != 0;
    xcr0 & !XCR0_SUPPORTED == 0
        && bit(0)
        && (!bit(2) || bit(1))
        && (bit(3) == bit(4))
        && (xcr0 & 0xe0 == 0 || (xcr0 & 0xe0 == 0xe0 && bit(2)))
}

impl InterpVcpu {
    fn fpu_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        if let Some(s) = self.fpu.xsave.get(off..off + 8) {
            b.copy_from_slice(s);
        }
        u64::from_le_bytes(b)
    }

    fn set_fpu_u64(&mut self, off: usize, v: u64) {
        if let Some(s) = self.fpu.xsave.get_mut(off..off + 8) {
            s.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// PKRU: it lives in its XSAVE state component (9) of the image, so
    /// XSAVE / XRSTOR move it and it round-trips to KVM's XSAVE area.
    pub(crate) fn pkru(&self) -> u32 {
        self.fpu_u64(PKRU) as u32
    }

    /// Sets PKRU, and XINUSE[9] unless the value is the initial 0.
    pub(crate) fn set_pkru(&mut self, v: u32) {
        self.fpu_area();
        self.set_fpu_u64(PKRU, u64::from(v));
        let inuse = self.fpu_u64(HEADER);
        let bv = if v != 0 {
            inuse | (1 << 9)
        } else {
            inuse & !(1 << 9)
        };
        self.set_fpu_u64(HEADER, bv);
    }

    fn mxcsr_mask(&self) -> u32 {
        let m = (self.fpu_u64(MXCSR) >> 32) as u32;
        if m == 0 {
            DEFAULT_MXCSR_MASK
        } else {
            m
        }
    }

    /// Makes the buffer the full 4 KiB standard area, with the MXCSR_MASK
    /// the processor has (FXSAVE and XSAVE store it).
    fn fpu_area(&mut self) {
        if self.fpu.xsave.len() < 4096 {
            self.fpu.xsave.resize(4096, 0);
        }
        if self.fpu.xsave[28..32] == [0; 4] {
            self.fpu.xsave[28..32].copy_from_slice(&DEFAULT_MXCSR_MASK.to_le_bytes());
        }
    }

    /// Copies `[a, b)` of the buffer to guest memory at `seg:base + a`.
    fn save_range(&mut self, seg: Register, base: u64, a: usize, b: usize) -> R<()> {
        for off in (a..b).step_by(8) {
            let v = self.fpu_u64(off);
            self.write_mem(seg, base.wrapping_add(off as u64), 8, v)?;
        }
        Ok(())
    }

    /// Reads `[a, b)` of the image at `seg:base` into `img`.
    fn load_range(
        &mut self,
        img: &mut [u8],
        seg: Register,
        base: u64,
        a: usize,
        b: usize,
    ) -> R<()> {
        for off in (a..b).step_by(8) {
            let v = self.read_mem(seg, base.wrapping_add(off as u64), 8)?;
            if let Some(s) = img.get_mut(off..off + 8) {
                s.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(())
    }

    /// The checks every XSAVE-family instruction makes first.
    fn xsave_checks(&self) -> R<()> {
        if self.sregs.cr4 & cr4::OSXSAVE == 0 {
            return Err(UD);
        }
        if self.sregs.cr0 & cr0::TS != 0 {
            return Err(NM);
        }
        Ok(())
    }

    /// The memory operand's offset, which must be aligned to `align`.
    fn aligned_ea(&self, i: &Instruction, align: u64) -> R<u64> {
        let ea = self.ea(i);
        let la = self.linear(i.memory_segment(), ea)?;
        if la % align != 0 {
            return Err(GP0);
        }
        Ok(ea)
    }

    pub(crate) fn exec_cmpxchg8b16b(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let wide = m == Mnemonic::Cmpxchg16b;
        let seg = i.memory_segment();
        let ea = self.ea(i);
        let half = if wide { 8 } else { 4 };
        if wide {
            // SDM vol. 2, CMPXCHG16B: #GP(0) if m128 is not 16-byte aligned.
            let la = self.linear(seg, ea)?;
            if la % 16 != 0 {
                return Err(GP0);
            }
        }
        let lo = self.read_mem(seg, ea, half)?;
        let hi = self.read_mem(seg, ea.wrapping_add(half as u64), half)?;
        let m = crate::flags::mask(half);
        let (rax, rdx) = (self.gpr[0] & m, self.gpr[2] & m);
        if lo == rax && hi == rdx {
            let (rbx, rcx) = (self.gpr[3] & m, self.gpr[1] & m);
            self.write_mem(seg, ea, half, rbx)?;
            self.write_mem(seg, ea.wrapping_add(half as u64), half, rcx)?;
            self.rflags |= ZF;
        } else {
            // The destination is written back with its own value: the
            // processor always writes (SDM: "the destination operand is
            // written back if the comparison fails").
            self.write_mem(seg, ea, half, lo)?;
            self.write_mem(seg, ea.wrapping_add(half as u64), half, hi)?;
            // 32-bit writes zero-extend in 64-bit mode.
            self.gpr[0] = lo;
            self.gpr[2] = hi;
            self.rflags &= !ZF;
        }
        Ok(())
    }

    /// WAIT / FWAIT: #NM when CR0.MP and CR0.TS are set, #MF when the
    /// x87 status word has an unmasked exception pending (FSW.ES) and
    /// CR0.NE is set (SDM vol. 2, WAIT/FWAIT; vol. 1, 8.7).
    pub(crate) fn exec_fwait(&mut self) -> R<()> {
        let c = self.sregs.cr0;
        if c & cr0::MP != 0 && c & cr0::TS != 0 {
            return Err(NM);
        }
        if self.fpu_u64(0) & (1 << 23) != 0 && c & cr0::NE != 0 {
            return Err(Stop::Exc(16, None));
        }
        Ok(())
    }

    /// LDMXCSR / STMXCSR (SDM vol. 2): #UD without CR4.OSFXSR or with
    /// CR0.EM, #NM with CR0.TS, #GP(0) for reserved MXCSR bits.
    pub(crate) fn exec_mxcsr(&mut self, i: &Instruction, load: bool) -> R<()> {
        if self.sregs.cr4 & cr4::OSFXSR == 0 || self.sregs.cr0 & cr0::EM != 0 {
            return Err(UD);
        }
        if self.sregs.cr0 & cr0::TS != 0 {
            return Err(NM);
        }
        self.fpu_area();
        let seg = i.memory_segment();
        let ea = self.ea(i);
        if load {
            let v = self.read_mem(seg, ea, 4)? as u32;
            if v & !self.mxcsr_mask() != 0 {
                return Err(GP0);
            }
            self.fpu.xsave[24..28].copy_from_slice(&v.to_le_bytes());
            if v != 0x1f80 {
                // Keep KVM_SET_XSAVE taking MXCSR (see `exec_xrstor`).
                let bv = self.fpu_u64(HEADER) | 0b10;
                self.set_fpu_u64(HEADER, bv);
            }
            Ok(())
        } else {
            let v = self.fpu_u64(MXCSR) & 0xffff_ffff;
            self.write_mem(seg, ea, 4, v)
        }
    }

    pub(crate) fn exec_xgetbv(&mut self) -> R<()> {
        if self.sregs.cr4 & cr4::OSXSAVE == 0 {
            return Err(UD);
        }
        let v = match self.gpr[1] as u32 {
            0 => self.fpu.xcr0,
            // XINUSE & XCR0 (CPUID.(EAX=0DH,ECX=1):EAX[2]).
            1 => self.fpu_u64(HEADER) & self.fpu.xcr0,
            _ => return Err(GP0),
        };
        self.gpr[0] = v & 0xffff_ffff;
        self.gpr[2] = v >> 32;
        Ok(())
    }

    pub(crate) fn exec_xsetbv(&mut self) -> R<()> {
        if self.sregs.cr4 & cr4::OSXSAVE == 0 {
            return Err(UD);
        }
        if self.cpl() != 0 || self.gpr[1] as u32 != 0 {
            return Err(GP0);
        }
        let v = (self.gpr[2] << 32) | (self.gpr[0] & 0xffff_ffff);
        // Only components the processor's CPUID.(EAX=0DH,ECX=0) announces.
        let d = self.cpuid.raw(0xd, 0);
        let offered = u64::from(d[0]) | (u64::from(d[3]) << 32);
        if !valid_xcr0(v) || v & !offered != 0 {
            return Err(GP0);
        }
        self.fpu.xcr0 = v;
        Ok(())
    }

    pub(crate) fn exec_fxsave(&mut self, i: &Instruction) -> R<()> {
        if self.sregs.cr0 & (cr0::TS | cr0::EM) != 0 {
            return Err(NM);
        }
        let ea = self.aligned_ea(i, 16)?;
        self.fpu_area();
        let seg = i.memory_segment();
        let long = self.bitness == 64;
        self.save_range(seg, ea, 0, 160)?;
        let (_, end) = legacy_ranges(1, long)[0];
        self.save_range(seg, ea, 160, end)
    }

    pub(crate) fn exec_fxrstor(&mut self, i: &Instruction) -> R<()> {
        if self.sregs.cr0 & (cr0::TS | cr0::EM) != 0 {
            return Err(NM);
        }
        let ea = self.aligned_ea(i, 16)?;
        self.fpu_area();
        let seg = i.memory_segment();
        let long = self.bitness == 64;
        let mut img = self.fpu.xsave.clone();
        let (_, end) = legacy_ranges(1, long)[0];
        self.load_range(&mut img, seg, ea, 0, end)?;
        let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
        if mxcsr & !self.mxcsr_mask() != 0 {
            return Err(GP0);
        }
        // MXCSR_MASK is not loaded.
        img[28..32].copy_from_slice(&self.fpu.xsave[28..32]);
        self.fpu.xsave = img;
        // x87 and SSE state are now in use: a later XSAVE (and KVM, which
        // loads only components whose XSTATE_BV bit is set) takes them from
        // the area.
        let bv = self.fpu_u64(HEADER) | 3;
        self.set_fpu_u64(HEADER, bv);
        Ok(())
    }

    /// XSAVE and XSAVEOPT (which may skip unmodified components; saving
    /// them all is allowed) in the standard form.
    pub(crate) fn exec_xsave(&mut self, i: &Instruction) -> R<()> {
        self.xsave_checks()?;
        let ea = self.aligned_ea(i, 64)?;
        self.fpu_area();
        let seg = i.memory_segment();
        let rfbm = self.fpu.xcr0 & ((self.gpr[2] << 32) | (self.gpr[0] & 0xffff_ffff));
        let long = self.bitness == 64;
        let inuse = self.fpu_u64(HEADER);
        // Read the header first, so that a fault leaves nothing half done
        // in the header word.
        let old_bv = self.read_mem(seg, ea.wrapping_add(HEADER as u64), 8)?;
        for bit in 0..2 {
            if rfbm & (1 << bit) != 0 {
                for &(a, b) in legacy_ranges(bit, long) {
                    self.save_range(seg, ea, a, b)?;
                }
            }
        }
        if rfbm & 0b110 != 0 {
            self.save_range(seg, ea, MXCSR, MXCSR + 8)?;
        }
        for &(bit, off, size) in EXTENDED {
            if rfbm & (1 << bit) != 0 {
                self.save_range(seg, ea, off, off + size)?;
            }
        }
        let bv = (old_bv & !rfbm) | (inuse & rfbm);
        self.write_mem(seg, ea.wrapping_add(HEADER as u64), 8, bv)
    }

    /// XRSTOR (standard or compacted form) and, with `supervisor`, XRSTORS
    /// (compacted only, CPL 0), SDM vol. 1, 13.8 and 13.12.
    pub(crate) fn exec_xrstor(&mut self, i: &Instruction, supervisor: bool) -> R<()> {
        self.xsave_checks()?;
        if supervisor && self.cpl() != 0 {
            return Err(GP0);
        }
        let ea = self.aligned_ea(i, 64)?;
        self.fpu_area();
        let seg = i.memory_segment();
        let rfbm = self.fpu.xcr0 & ((self.gpr[2] << 32) | (self.gpr[0] & 0xffff_ffff));
        let long = self.bitness == 64;
        let hdr = ea.wrapping_add(HEADER as u64);
        let xstate_bv = self.read_mem(seg, hdr, 8)?;
        let xcomp_bv = self.read_mem(seg, hdr.wrapping_add(8), 8)?;
        let compacted = xcomp_bv & COMPACTED != 0;
        let layout = if compacted {
            // XCOMP_BV[62:0] within XCR0 (| IA32_XSS, 0 here), XSTATE_BV
            // within XCOMP_BV, header bytes 63:16 zero.
            if xcomp_bv & !COMPACTED & !self.fpu.xcr0 != 0 || xstate_bv & !xcomp_bv != 0 {
                return Err(GP0);
            }
            for q in 2..8u64 {
                if self.read_mem(seg, hdr.wrapping_add(8 * q), 8)? != 0 {
                    return Err(GP0);
                }
            }
            compacted_layout(xcomp_bv).ok_or_else(|| unknown_component(xcomp_bv))?
        } else {
            // Standard form: XCOMP_BV and the next 8 bytes zero, XSTATE_BV
            // within XCR0; XRSTORS takes only the compacted form.
            let reserved = self.read_mem(seg, hdr.wrapping_add(16), 8)?;
            if supervisor || xcomp_bv != 0 || reserved != 0 || xstate_bv & !self.fpu.xcr0 != 0 {
                return Err(GP0);
            }
            EXTENDED
                .iter()
                .map(|&(bit, off, size)| (bit, off, off, size))
                .collect()
        };
        let mut img = self.fpu.xsave.clone();
        // MXCSR: the standard form loads it whenever RFBM has SSE or AVX;
        // the compacted form only with their XSTATE_BV bit, else it is
        // initialised.
        let load_mxcsr = if compacted {
            rfbm & xstate_bv & 0b110 != 0
        } else {
            rfbm & 0b110 != 0
        };
        if load_mxcsr {
            self.load_range(&mut img, seg, ea, MXCSR, MXCSR + 8)?;
            let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
            if mxcsr & !self.mxcsr_mask() != 0 {
                return Err(GP0);
            }
            img[28..32].copy_from_slice(&self.fpu.xsave[28..32]);
        } else if rfbm & 0b110 != 0 {
            img[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        }
        for bit in 0..2u32 {
            if rfbm & (1 << bit) == 0 {
                continue;
            }
            let ranges = legacy_ranges(bit, long);
            if xstate_bv & (1 << bit) != 0 {
                for &(a, b) in ranges {
                    self.load_range(&mut img, seg, ea, a, b)?;
                }
            } else {
                // The initial configuration: all zero, but FCW 0x37F.
                for &(a, b) in ranges {
                    img[a..b].fill(0);
                }
                if bit == 0 {
                    img[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
                }
            }
        }
        for &(bit, from, to, size) in &layout {
            if rfbm & (1 << bit) == 0 {
                continue;
            }
            if xstate_bv & (1 << bit) != 0 {
                let mut comp = vec![0u8; size];
                self.load_range(&mut comp, seg, ea.wrapping_add(from as u64), 0, size)?;
                img[to..to + size].copy_from_slice(&comp);
            } else {
                img[to..to + size].fill(0);
            }
        }
        let mxcsr = u32::from_le_bytes([img[24], img[25], img[26], img[27]]);
        self.fpu.xsave = img;
        let inuse = self.fpu_u64(HEADER);
        let mut bv = (inuse & !rfbm) | (xstate_bv & rfbm);
        // MXCSR is loaded whatever XSTATE_BV[1] says, but KVM_SET_XSAVE
        // (like the kernel's XSAVE image parsing) takes MXCSR only when the
        // header has SSE or AVX in use. Reporting SSE in use with its
        // registers in their initial state is allowed (XINUSE[i] may be 1
        // for a component in its initial configuration, SDM vol. 1, 13.6).
        if rfbm & 0b110 != 0 && mxcsr != 0x1f80 {
            bv |= 0b10;
        }
        self.set_fpu_u64(HEADER, bv);
        Ok(())
    }

    /// XSAVEC and, with `supervisor`, XSAVES (CPL 0): the compacted form
    /// with only the components in use (SDM vol. 1, 13.10 and 13.11).
    pub(crate) fn exec_xsavec(&mut self, i: &Instruction, supervisor: bool) -> R<()> {
        self.xsave_checks()?;
        if supervisor && self.cpl() != 0 {
            return Err(GP0);
        }
        let ea = self.aligned_ea(i, 64)?;
        self.fpu_area();
        let seg = i.memory_segment();
        let rfbm = self.fpu.xcr0 & ((self.gpr[2] << 32) | (self.gpr[0] & 0xffff_ffff));
        let layout = compacted_layout(rfbm).ok_or_else(|| unknown_component(rfbm))?;
        let long = self.bitness == 64;
        let saved = self.fpu_u64(HEADER) & rfbm;
        for bit in 0..2 {
            if saved & (1 << bit) != 0 {
                for &(a, b) in legacy_ranges(bit, long) {
                    self.save_range(seg, ea, a, b)?;
                }
            }
        }
        if rfbm & 0b110 != 0 {
            self.save_range(seg, ea, MXCSR, MXCSR + 8)?;
        }
        for &(bit, to, from, size) in &layout {
            if saved & (1 << bit) != 0 {
                for k in (0..size).step_by(8) {
                    let v = self.fpu_u64(from + k);
                    self.write_mem(seg, ea.wrapping_add((to + k) as u64), 8, v)?;
                }
            }
        }
        let hdr = ea.wrapping_add(HEADER as u64);
        self.write_mem(seg, hdr, 8, saved)?;
        self.write_mem(seg, hdr.wrapping_add(8), 8, rfbm | COMPACTED)
    }
}
