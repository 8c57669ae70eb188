//! Instruction execution: one decoded iced-x86 instruction at a time.

use iced_x86::{Code, ConditionCode, Instruction, Mnemonic, OpKind, Register};
use tandem_core::cpu::{Event, EventKind};
use tandem_core::vcpu::VcpuExit;

use crate::flags::{self, mask, sext, sign, AF, CF, DF, IF, OF, PF, RF, SF, VM, ZF};
use crate::system::canonical;
use crate::{ExtKind, InterpVcpu, Stop, R};

const UD: Stop = Stop::Exc(6, None);
const DE: Stop = Stop::Exc(0, None);
const GP0: Stop = Stop::Exc(13, Some(0));

/// REP iterations executed before the instruction yields to an interrupt
/// check (it continues where it stopped, as the SDM allows).
const REP_CHUNK: u32 = 4096;

impl InterpVcpu {
    /// Fetches and executes the instruction at CS:RIP.
    pub(crate) fn exec_one(&mut self) -> R<()> {
        let rip = self.rip;
        let la = if self.bitness == 64 {
            if !canonical(rip) {
                return Err(GP0);
            }
            rip
        } else {
            self.sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
        };
        let mut i = Instruction::default();
        self.fetch(la, &mut i)?;
        let len = i.len() as u64;
        self.insn_rip = rip;
        self.insn_len = len;
        // The whole instruction must lie within the CS limit (#GP(0)).
        if self.bitness != 64
            && self.sregs.cs.limit != u32::MAX
            && rip.wrapping_add(len - 1) > u64::from(self.sregs.cs.limit)
        {
            return Err(GP0);
        }
        let next = rip.wrapping_add(len);
        self.next_rip = if self.bitness == 64 {
            next
        } else {
            next & 0xffff_ffff
        };
        self.rip = self.next_rip;
        self.exec_hot(&i)
    }

    /// The instructions guests execute most (MOV, the two-operand ALU
    /// group, INC / DEC, Jcc), dispatched here, inlined into the step loop;
    /// everything else goes to `exec`'s full match, which does not list
    /// them again.
    #[inline(always)]
    fn exec_hot(&mut self, i: &Instruction) -> R<()> {
        let m = i.mnemonic();
        match m {
            Mnemonic::Mov => {
                if self.exec_regs_fast(i, m) {
                    return Ok(());
                }
                self.exec_mov(i)
            }
            Mnemonic::Add
            | Mnemonic::Or
            | Mnemonic::Adc
            | Mnemonic::Sbb
            | Mnemonic::And
            | Mnemonic::Sub
            | Mnemonic::Xor
            | Mnemonic::Cmp
            | Mnemonic::Test => {
                if self.exec_regs_fast(i, m) {
                    return Ok(());
                }
                self.exec_alu(i, m)
            }
            Mnemonic::Inc | Mnemonic::Dec => self.exec_inc_dec(i, m),
            Mnemonic::Ja
            | Mnemonic::Jae
            | Mnemonic::Jb
            | Mnemonic::Jbe
            | Mnemonic::Je
            | Mnemonic::Jg
            | Mnemonic::Jge
            | Mnemonic::Jl
            | Mnemonic::Jle
            | Mnemonic::Jne
            | Mnemonic::Jno
            | Mnemonic::Jnp
            | Mnemonic::Jns
            | Mnemonic::Jo
            | Mnemonic::Jp
            | Mnemonic::Js => self.exec_jcc(i, m),
            _ => self.exec(i),
        }
    }

    /// Jcc (`m`): a near branch if the condition holds.
    #[inline(always)]
    fn exec_jcc(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        // The condition from the mnemonic: cheaper than iced's
        // `condition_code`, which searches the Code ranges.
        let cc = match m {
            Mnemonic::Jo => ConditionCode::o,
            Mnemonic::Jno => ConditionCode::no,
            Mnemonic::Jb => ConditionCode::b,
            Mnemonic::Jae => ConditionCode::ae,
            Mnemonic::Je => ConditionCode::e,
            Mnemonic::Jne => ConditionCode::ne,
            Mnemonic::Jbe => ConditionCode::be,
            Mnemonic::Ja => ConditionCode::a,
            Mnemonic::Js => ConditionCode::s,
            Mnemonic::Jns => ConditionCode::ns,
            Mnemonic::Jp => ConditionCode::p,
            Mnemonic::Jnp => ConditionCode::np,
            Mnemonic::Jl => ConditionCode::l,
            Mnemonic::Jge => ConditionCode::ge,
            Mnemonic::Jle => ConditionCode::le,
            Mnemonic::Jg => ConditionCode::g,
            _ => i.condition_code(),
        };
        if self.cond(cc) {
            let t = self.branch_target(i);
            self.jump(t)?;
        }
        Ok(())
    }

    /// INC / DEC: CF is kept.
    #[inline(always)]
    fn exec_inc_dec(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let a = self.read_op(i, 0, s)?;
        let (r, f) = if m == Mnemonic::Inc {
            let r = a.wrapping_add(1) & mask(s);
            (r, flags::add(a, 1, 0, r, s))
        } else {
            let r = a.wrapping_sub(1) & mask(s);
            (r, flags::sub(a, 1, 0, r, s))
        };
        self.write_op(i, 0, s, r)?;
        self.set_arith((f & !CF) | (self.rflags & CF));
        Ok(())
    }

    // ---- registers and operands ----

    #[inline(always)]
    pub(crate) fn reg_read(&self, r: Register) -> u64 {
        let n = r as usize;
        if r.is_gpr64() {
            self.gpr[n - Register::RAX as usize]
        } else if r.is_gpr32() {
            self.gpr[n - Register::EAX as usize] & 0xffff_ffff
        } else if r.is_gpr16() {
            self.gpr[n - Register::AX as usize] & 0xffff
        } else if r.is_gpr8() {
            let idx = n - Register::AL as usize;
            if (4..8).contains(&idx) {
                (self.gpr[idx - 4] >> 8) & 0xff
            } else if idx >= 8 {
                self.gpr[idx - 4] & 0xff
            } else {
                self.gpr[idx] & 0xff
            }
        } else if r.is_segment_register() {
            u64::from(self.seg(r).selector)
        } else {
            0
        }
    }

    #[inline(always)]
    pub(crate) fn reg_write(&mut self, r: Register, v: u64) {
        let n = r as usize;
        if r.is_gpr64() {
            self.gpr[n - Register::RAX as usize] = v;
        } else if r.is_gpr32() {
            self.gpr[n - Register::EAX as usize] = v & 0xffff_ffff;
        } else if r.is_gpr16() {
            let g = &mut self.gpr[n - Register::AX as usize];
            *g = (*g & !0xffff) | (v & 0xffff);
        } else if r.is_gpr8() {
            let idx = n - Register::AL as usize;
            if (4..8).contains(&idx) {
                let g = &mut self.gpr[idx - 4];
                *g = (*g & !0xff00) | ((v & 0xff) << 8);
            } else {
                let g = &mut self.gpr[if idx >= 8 { idx - 4 } else { idx }];
                *g = (*g & !0xff) | (v & 0xff);
            }
        }
    }

    /// The effective address (offset in its segment) of the memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, i: &Instruction) -> u64 {
        let base = i.memory_base();
        let index = i.memory_index();
        let mut a = i.memory_displacement64();
        if base == Register::RIP || base == Register::EIP {
            // Decoded at IP 0: the displacement already holds len + disp.
            a = a.wrapping_add(self.insn_rip);
        } else if base != Register::None {
            a = a.wrapping_add(self.reg_read(base));
        }
        if index != Register::None {
            a = a.wrapping_add(
                self.reg_read(index)
                    .wrapping_mul(u64::from(i.memory_index_scale())),
            );
        }
        if base.is_gpr16() || index.is_gpr16() {
            a & 0xffff
        } else if self.bitness != 64 || base.is_gpr32() || index.is_gpr32() || base == Register::EIP
        {
            a & 0xffff_ffff
        } else {
            a
        }
    }

    /// Size in bytes of operand `n`.
    #[inline(always)]
    pub(crate) fn op_size(&self, i: &Instruction, n: u32) -> usize {
        match i.op_kind(n) {
            OpKind::Register => i.op_register(n).size(),
            OpKind::Memory => i.memory_size().size(),
            OpKind::Immediate8 => 1,
            OpKind::Immediate16 => 2,
            OpKind::Immediate32 => 4,
            _ => 8,
        }
    }

    /// Operand `n` of `size` bytes. Registers and immediates inline, the
    /// memory operand out of line (`read_op_mem`): small enough for every
    /// instruction to inline.
    #[inline(always)]
    pub(crate) fn read_op(&mut self, i: &Instruction, n: u32, size: usize) -> R<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.reg_read(i.op_register(n))),
            OpKind::Memory => self.read_op_mem(i, size),
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
            | OpKind::Immediate8_2nd => Ok(i.immediate(n) & mask(size)),
            _ => Err(UD),
        }
    }

    #[inline(always)]
    pub(crate) fn write_op(&mut self, i: &Instruction, n: u32, size: usize, v: u64) -> R<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.reg_write(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => self.write_op_mem(i, size, v & mask(size)),
            _ => Err(UD),
        }
    }

    /// The memory operand of `i` (`size` bytes).
    #[inline(never)]
    fn read_op_mem(&mut self, i: &Instruction, size: usize) -> R<u64> {
        let ea = self.ea(i);
        self.read_mem(i.memory_segment(), ea, size)
    }

    /// Writes the memory operand of `i` (`size` bytes).
    #[inline(never)]
    fn write_op_mem(&mut self, i: &Instruction, size: usize, v: u64) -> R<()> {
        let ea = self.ea(i);
        self.write_mem(i.memory_segment(), ea, size, v)
    }

    #[inline(always)]
    pub(crate) fn set_arith(&mut self, f: u64) {
        self.rflags = (self.rflags & !flags::ARITH) | f;
    }

    /// Stack-address mask: 64-bit mode, else SS.B.
    #[inline]
    pub(crate) fn sp_mask(&self) -> u64 {
        if self.bitness == 64 {
            u64::MAX
        } else if self.sregs.ss.db {
            0xffff_ffff
        } else {
            0xffff
        }
    }

    pub(crate) fn push(&mut self, v: u64, size: usize) -> R<()> {
        let m = self.sp_mask();
        let sp = self.gpr[4].wrapping_sub(size as u64) & m;
        self.write_mem(Register::SS, sp, size, v)?;
        self.gpr[4] = (self.gpr[4] & !m) | sp;
        Ok(())
    }

    pub(crate) fn pop(&mut self, size: usize) -> R<u64> {
        let m = self.sp_mask();
        let sp = self.gpr[4] & m;
        let v = self.read_mem(Register::SS, sp, size)?;
        self.gpr[4] = (self.gpr[4] & !m) | (sp.wrapping_add(size as u64) & m);
        Ok(v)
    }

    /// Near call / return / LEAVE operand size (16-bit forms in 16-bit
    /// code or with a 0x66 prefix).
    #[inline]
    fn near_size(&self, i: &Instruction) -> usize {
        match i.code() {
            Code::Call_rel16 | Code::Call_rm16 | Code::Retnw | Code::Retnw_imm16 | Code::Leavew => {
                2
            }
            Code::Call_rel32_32
            | Code::Call_rm32
            | Code::Retnd
            | Code::Retnd_imm16
            | Code::Leaved => 4,
            _ if self.bitness == 64 => 8,
            _ => 4,
        }
    }

    #[inline(always)]
    fn branch_target(&self, i: &Instruction) -> u64 {
        let t = self.insn_rip.wrapping_add(i.near_branch64());
        if self.bitness == 64 {
            t
        } else if i.op_kind(0) == OpKind::NearBranch16 {
            // 16-bit operand size: IP wraps at 64 KiB.
            t & 0xffff
        } else {
            t & 0xffff_ffff
        }
    }

    #[inline(always)]
    fn jump(&mut self, target: u64) -> R<()> {
        if self.bitness == 64 {
            if !canonical(target) {
                return Err(GP0);
            }
        } else if target > u64::from(self.sregs.cs.limit) {
            // A near branch beyond the CS limit faults at the branch.
            return Err(GP0);
        }
        self.rip = target;
        Ok(())
    }

    #[inline(always)]
    pub(crate) fn cond(&self, cc: ConditionCode) -> bool {
        let f = self.rflags;
        let cf = f & CF != 0;
        let zf = f & ZF != 0;
        let sf = f & SF != 0;
        let of = f & OF != 0;
        let pf = f & PF != 0;
        match cc {
            ConditionCode::None => true,
            ConditionCode::o => of,
            ConditionCode::no => !of,
            ConditionCode::b => cf,
            ConditionCode::ae => !cf,
            ConditionCode::e => zf,
            ConditionCode::ne => !zf,
            ConditionCode::be => cf || zf,
            ConditionCode::a => !cf && !zf,
            ConditionCode::s => sf,
            ConditionCode::ns => !sf,
            ConditionCode::p => pf,
            ConditionCode::np => !pf,
            ConditionCode::l => sf != of,
            ConditionCode::ge => sf == of,
            ConditionCode::le => zf || sf != of,
            ConditionCode::g => !zf && sf == of,
        }
    }

    pub(crate) fn iopl_ok(&self) -> bool {
        u64::from(self.cpl()) <= (self.rflags & flags::IOPL) >> 12
    }

    pub(crate) fn need_cpl0(&self) -> R<()> {
        if self.cpl() != 0 {
            Err(GP0)
        } else {
            Ok(())
        }
    }

    // ---- the instructions ----

    fn exec(&mut self, i: &Instruction) -> R<()> {
        let m = i.mnemonic();
        match m {
            Mnemonic::Pause => {
                self.count_pause();
                Ok(())
            }
            Mnemonic::Nop
            | Mnemonic::Lfence
            | Mnemonic::Mfence
            | Mnemonic::Sfence
            | Mnemonic::Endbr64
            | Mnemonic::Endbr32
            | Mnemonic::Prefetchnta
            | Mnemonic::Prefetcht0
            | Mnemonic::Prefetcht1
            | Mnemonic::Prefetcht2
            | Mnemonic::Prefetchw
            // Cache-line flushes: no cache is modelled; memory is coherent.
            | Mnemonic::Clflush
            | Mnemonic::Clflushopt
            | Mnemonic::Clwb => Ok(()),
            Mnemonic::Movzx => {
                let v = self.read_op(i, 1, self.op_size(i, 1))?;
                let s0 = self.op_size(i, 0);
                self.write_op(i, 0, s0, v)
            }
            Mnemonic::Movsx | Mnemonic::Movsxd => {
                let s1 = self.op_size(i, 1);
                let v = sext(self.read_op(i, 1, s1)?, s1);
                let s0 = self.op_size(i, 0);
                self.write_op(i, 0, s0, v & mask(s0))
            }
            Mnemonic::Lea => {
                let s0 = self.op_size(i, 0);
                let a = self.ea(i);
                self.write_op(i, 0, s0, a & mask(s0))
            }
            Mnemonic::Xchg => {
                let s = self.op_size(i, 0);
                let a = self.read_op(i, 0, s)?;
                let b = self.read_op(i, 1, s)?;
                // Memory (if any) first, so a fault leaves registers alone.
                if i.op_kind(0) == OpKind::Memory {
                    self.write_op(i, 0, s, b)?;
                    self.write_op(i, 1, s, a)
                } else {
                    self.write_op(i, 1, s, a)?;
                    self.write_op(i, 0, s, b)
                }
            }
            Mnemonic::Neg => {
                let s = self.op_size(i, 0);
                let a = self.read_op(i, 0, s)?;
                let r = 0u64.wrapping_sub(a) & mask(s);
                self.write_op(i, 0, s, r)?;
                self.set_arith(flags::sub(0, a, 0, r, s));
                Ok(())
            }
            Mnemonic::Not => {
                let s = self.op_size(i, 0);
                let a = self.read_op(i, 0, s)?;
                self.write_op(i, 0, s, !a & mask(s))
            }
            Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr => self.exec_shift(i, m),
            Mnemonic::Shld | Mnemonic::Shrd => self.exec_shxd(i, m),
            Mnemonic::Mul | Mnemonic::Imul if i.op_count() == 1 => self.exec_mul1(i, m),
            Mnemonic::Imul => {
                let s = self.op_size(i, 0);
                let (a, b) = if i.op_count() == 2 {
                    (self.read_op(i, 0, s)?, self.read_op(i, 1, s)?)
                } else {
                    (self.read_op(i, 1, s)?, self.read_op(i, 2, s)?)
                };
                let full = (sext(a, s) as i64 as i128) * (sext(b, s) as i64 as i128);
                let r = (full as u64) & mask(s);
                let fits = sext(r, s) as i64 as i128 == full;
                self.write_op(i, 0, s, r)?;
                self.set_mul_flags(!fits);
                Ok(())
            }
            Mnemonic::Div | Mnemonic::Idiv => self.exec_div(i, m),
            Mnemonic::Cbw => {
                let v = sext(self.gpr[0], 1) & 0xffff;
                self.reg_write(Register::AX, v);
                Ok(())
            }
            Mnemonic::Cwde => {
                self.gpr[0] = sext(self.gpr[0], 2) & 0xffff_ffff;
                Ok(())
            }
            Mnemonic::Cdqe => {
                self.gpr[0] = sext(self.gpr[0], 4);
                Ok(())
            }
            Mnemonic::Cwd => {
                let v = if self.gpr[0] & 0x8000 != 0 { 0xffff } else { 0 };
                self.reg_write(Register::DX, v);
                Ok(())
            }
            Mnemonic::Cdq => {
                self.gpr[2] = if self.gpr[0] & 0x8000_0000 != 0 {
                    0xffff_ffff
                } else {
                    0
                };
                Ok(())
            }
            Mnemonic::Cqo => {
                self.gpr[2] = if self.gpr[0] & (1 << 63) != 0 {
                    u64::MAX
                } else {
                    0
                };
                Ok(())
            }
            Mnemonic::Bswap => {
                let s = self.op_size(i, 0);
                let v = self.read_op(i, 0, s)?;
                let r = if s == 8 {
                    v.swap_bytes()
                } else {
                    u64::from((v as u32).swap_bytes())
                };
                self.write_op(i, 0, s, r)
            }
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => self.exec_bt(i, m),
            Mnemonic::Bsf | Mnemonic::Bsr => self.exec_bit_scan(i, m == Mnemonic::Bsf),
            // F3 0F BC / BD: TZCNT / LZCNT where CPUID offers BMI1 / LZCNT;
            // elsewhere the F3 prefix is ignored and they are BSF / BSR,
            // which kernels rely on (SDM vol. 2B, TZCNT and LZCNT).
            Mnemonic::Tzcnt | Mnemonic::Lzcnt => {
                let tz = m == Mnemonic::Tzcnt;
                let offered = if tz {
                    self.cpuid.has(7, 1, 3)
                } else {
                    self.cpuid.has(0x8000_0001, 2, 5)
                };
                if !offered {
                    return self.exec_bit_scan(i, tz);
                }
                let s = self.op_size(i, 0);
                let v = self.read_op(i, 1, s)? & mask(s);
                let bits = 8 * s as u32;
                let r = if v == 0 {
                    bits
                } else if tz {
                    v.trailing_zeros()
                } else {
                    v.leading_zeros() - (64 - bits)
                };
                self.write_op(i, 0, s, u64::from(r))?;
                // CF: the source was 0; ZF: the count is 0.
                self.rflags &= !(CF | ZF);
                if v == 0 {
                    self.rflags |= CF;
                }
                if r == 0 {
                    self.rflags |= ZF;
                }
                Ok(())
            }
            Mnemonic::Popcnt => {
                // ZF = (source == 0); OF, SF, AF, CF, PF cleared.
                let s = self.op_size(i, 0);
                let v = self.read_op(i, 1, s)? & mask(s);
                self.write_op(i, 0, s, u64::from(v.count_ones()))?;
                self.set_arith(if v == 0 { ZF } else { 0 });
                Ok(())
            }
            Mnemonic::Xadd => {
                let s = self.op_size(i, 0);
                let a = self.read_op(i, 0, s)?;
                let b = self.read_op(i, 1, s)?;
                let r = a.wrapping_add(b) & mask(s);
                if i.op0_kind() == OpKind::Register {
                    // SDM: SRC := DEST, then DEST := TEMP; `xadd r, r` with
                    // one register for both keeps the sum.
                    self.write_op(i, 1, s, a)?;
                    self.write_op(i, 0, s, r)?;
                } else {
                    // The memory write first: if it faults, no register
                    // has changed.
                    self.write_op(i, 0, s, r)?;
                    self.write_op(i, 1, s, a)?;
                }
                self.set_arith(flags::add(a, b, 0, r, s));
                Ok(())
            }
            Mnemonic::Cmpxchg => {
                let s = self.op_size(i, 0);
                let dest = self.read_op(i, 0, s)?;
                let acc = self.gpr[0] & mask(s);
                let r = acc.wrapping_sub(dest) & mask(s);
                let f = flags::sub(acc, dest, 0, r, s);
                if acc == dest {
                    let src = self.read_op(i, 1, s)?;
                    self.write_op(i, 0, s, src)?;
                } else {
                    // A memory destination is written back even when
                    // unequal; a register one is left alone (its upper half
                    // survives a 32-bit CMPXCHG: hardware, by `tandem fuzz`).
                    if i.op0_kind() == OpKind::Memory {
                        self.write_op(i, 0, s, dest)?;
                    }
                    let reg = match s {
                        1 => Register::AL,
                        2 => Register::AX,
                        4 => Register::EAX,
                        _ => Register::RAX,
                    };
                    self.reg_write(reg, dest);
                }
                self.set_arith(f);
                Ok(())
            }
            Mnemonic::Push => {
                let size = i.stack_pointer_increment().unsigned_abs() as usize;
                let v =
                    if i.op_kind(0) == OpKind::Register && i.op_register(0).is_segment_register() {
                        self.reg_read(i.op_register(0))
                    } else {
                        self.read_op(i, 0, size)?
                    };
                self.push(v, size)
            }
            Mnemonic::Pop => {
                let size = i.stack_pointer_increment().unsigned_abs() as usize;
                let m_sp = self.sp_mask();
                let sp = self.gpr[4] & m_sp;
                let v = self.read_mem(Register::SS, sp, size)?;
                if i.op_kind(0) == OpKind::Register && i.op_register(0).is_segment_register() {
                    let r = i.op_register(0);
                    self.load_data_seg(r, v as u16)?;
                    if r == Register::SS && !self.prev_mov_ss {
                        self.mov_ss_shadow = true;
                    }
                    self.gpr[4] = (self.gpr[4] & !m_sp) | (sp.wrapping_add(size as u64) & m_sp);
                    return Ok(());
                }
                // POP with an RSP-based memory operand uses the incremented RSP.
                let old = self.gpr[4];
                self.gpr[4] = (self.gpr[4] & !m_sp) | (sp.wrapping_add(size as u64) & m_sp);
                if let Err(e) = self.write_op(i, 0, size, v) {
                    self.gpr[4] = old;
                    return Err(e);
                }
                Ok(())
            }
            Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
                // IOPL-sensitive in virtual-8086 mode (no CR4.VME).
                if self.rflags & VM != 0 && !self.iopl_ok() {
                    return Err(GP0);
                }
                let size = i.stack_pointer_increment().unsigned_abs() as usize;
                self.push(self.rflags & !(VM | RF), size)
            }
            Mnemonic::Popf | Mnemonic::Popfd | Mnemonic::Popfq => {
                if self.rflags & VM != 0 && !self.iopl_ok() {
                    return Err(GP0);
                }
                let size = i.stack_pointer_increment().unsigned_abs() as usize;
                let v = self.pop(size)?;
                self.set_rflags_from_pop(v, size, self.cpl());
                self.rflags &= !RF;
                Ok(())
            }
            Mnemonic::Lahf => {
                let v = (self.rflags & 0xd5) | 2;
                self.reg_write(Register::AH, v);
                Ok(())
            }
            Mnemonic::Sahf => {
                let ah = self.reg_read(Register::AH);
                self.rflags = (self.rflags & !0xd5) | (ah & 0xd5);
                Ok(())
            }
            Mnemonic::Leave => {
                let m_sp = self.sp_mask();
                let old = self.gpr[4];
                self.gpr[4] = (self.gpr[4] & !m_sp) | (self.gpr[5] & m_sp);
                let size = self.near_size(i);
                match self.pop(size) {
                    Ok(v) => {
                        let bp = match size {
                            2 => Register::BP,
                            4 => Register::EBP,
                            _ => Register::RBP,
                        };
                        self.reg_write(bp, v);
                        Ok(())
                    }
                    Err(e) => {
                        self.gpr[4] = old;
                        Err(e)
                    }
                }
            }
            Mnemonic::Jmp => match i.op_kind(0) {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    let t = self.branch_target(i);
                    self.jump(t)
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let off = if i.op_kind(0) == OpKind::FarBranch16 {
                        u64::from(i.far_branch16())
                    } else {
                        u64::from(i.far_branch32())
                    };
                    self.far_jump(i.far_branch_selector(), off)
                }
                OpKind::Memory if i.is_jmp_far_indirect() => {
                    let size = i.memory_size().size() - 2;
                    let ea = self.ea(i);
                    let seg = i.memory_segment();
                    let off = self.read_mem(seg, ea, size)?;
                    let sel = self.read_mem(seg, ea.wrapping_add(size as u64), 2)? as u16;
                    self.far_jump(sel, off)
                }
                _ => {
                    let s = self.op_size(i, 0);
                    let t = self.read_op(i, 0, s)?;
                    self.jump(t)
                }
            },
            Mnemonic::Call => {
                let size = self.near_size(i);
                let t = match i.op_kind(0) {
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                        self.branch_target(i)
                    }
                    OpKind::Register | OpKind::Memory if !i.is_call_far_indirect() => {
                        let s = self.op_size(i, 0);
                        self.read_op(i, 0, s)?
                    }
                    _ => return self.far_call(i),
                };
                if self.bitness == 64 && !canonical(t) {
                    return Err(GP0);
                }
                if self.bitness != 64 && t > u64::from(self.sregs.cs.limit) {
                    return Err(GP0);
                }
                self.push(self.next_rip & mask(size), size)?;
                self.rip = t;
                Ok(())
            }
            Mnemonic::Ret => {
                let size = self.near_size(i);
                let old_sp = self.gpr[4];
                let t = self.pop(size)?;
                if i.op_count() == 1 {
                    let m_sp = self.sp_mask();
                    let sp = self.gpr[4].wrapping_add(u64::from(i.immediate16())) & m_sp;
                    self.gpr[4] = (self.gpr[4] & !m_sp) | sp;
                }
                // A target beyond the CS limit (or non-canonical) faults
                // with the stack pointer unchanged.
                self.jump(t).inspect_err(|_| self.gpr[4] = old_sp)
            }
            Mnemonic::Retf => self.far_return(i),
            Mnemonic::Loop
            | Mnemonic::Loope
            | Mnemonic::Loopne
            | Mnemonic::Jrcxz
            | Mnemonic::Jecxz
            | Mnemonic::Jcxz => {
                // The counter follows the address size: JCXZ / JECXZ / JRCXZ
                // name it (their Code's suffix is the operand size), LOOPcc's
                // Code name ends with it (LOOP is rare: formatting it costs
                // nothing that matters).
                let creg = match m {
                    Mnemonic::Jrcxz => Register::RCX,
                    Mnemonic::Jecxz => Register::ECX,
                    Mnemonic::Jcxz => Register::CX,
                    _ => {
                        let name = format!("{:?}", i.code());
                        if name.ends_with("RCX") {
                            Register::RCX
                        } else if name.ends_with("ECX") {
                            Register::ECX
                        } else {
                            Register::CX
                        }
                    }
                };
                let taken = if matches!(m, Mnemonic::Jrcxz | Mnemonic::Jecxz | Mnemonic::Jcxz) {
                    self.reg_read(creg) == 0
                } else {
                    let c = self.reg_read(creg).wrapping_sub(1) & mask(creg.size());
                    self.reg_write(creg, c);
                    let zf = self.rflags & ZF != 0;
                    c != 0
                        && match m {
                            Mnemonic::Loope => zf,
                            Mnemonic::Loopne => !zf,
                            _ => true,
                        }
                };
                if taken {
                    let t = self.branch_target(i);
                    self.jump(t)?;
                }
                Ok(())
            }
            Mnemonic::Seta
            | Mnemonic::Setae
            | Mnemonic::Setb
            | Mnemonic::Setbe
            | Mnemonic::Sete
            | Mnemonic::Setg
            | Mnemonic::Setge
            | Mnemonic::Setl
            | Mnemonic::Setle
            | Mnemonic::Setne
            | Mnemonic::Setno
            | Mnemonic::Setnp
            | Mnemonic::Setns
            | Mnemonic::Seto
            | Mnemonic::Setp
            | Mnemonic::Sets => {
                let v = u64::from(self.cond(i.condition_code()));
                self.write_op(i, 0, 1, v)
            }
            Mnemonic::Cmova
            | Mnemonic::Cmovae
            | Mnemonic::Cmovb
            | Mnemonic::Cmovbe
            | Mnemonic::Cmove
            | Mnemonic::Cmovg
            | Mnemonic::Cmovge
            | Mnemonic::Cmovl
            | Mnemonic::Cmovle
            | Mnemonic::Cmovne
            | Mnemonic::Cmovno
            | Mnemonic::Cmovnp
            | Mnemonic::Cmovns
            | Mnemonic::Cmovo
            | Mnemonic::Cmovp
            | Mnemonic::Cmovs => {
                let s = self.op_size(i, 0);
                // The source is read (and can fault) whatever the condition;
                // a 32-bit destination is zero-extended even when not moved.
                let v = self.read_op(i, 1, s)?;
                let v = if self.cond(i.condition_code()) {
                    v
                } else {
                    self.read_op(i, 0, s)?
                };
                self.write_op(i, 0, s, v)
            }
            Mnemonic::Clc => {
                self.rflags &= !CF;
                Ok(())
            }
            Mnemonic::Stc => {
                self.rflags |= CF;
                Ok(())
            }
            Mnemonic::Cmc => {
                self.rflags ^= CF;
                Ok(())
            }
            Mnemonic::Cld => {
                self.rflags &= !DF;
                Ok(())
            }
            Mnemonic::Std => {
                self.rflags |= DF;
                Ok(())
            }
            Mnemonic::Cli => {
                if !self.iopl_ok() {
                    return Err(GP0);
                }
                self.rflags &= !IF;
                Ok(())
            }
            Mnemonic::Sti => {
                if !self.iopl_ok() {
                    return Err(GP0);
                }
                // Blocking by STI only if IF was clear (SDM vol. 2, STI).
                if self.rflags & IF == 0 {
                    self.sti_shadow = true;
                }
                self.rflags |= IF;
                Ok(())
            }
            Mnemonic::Hlt => {
                self.need_cpl0()?;
                Err(Stop::Done(VcpuExit::Hlt))
            }
            Mnemonic::In | Mnemonic::Out => {
                let (port_op, data_op) = if m == Mnemonic::In { (1, 0) } else { (0, 1) };
                let port = if i.op_kind(port_op) == OpKind::Register {
                    self.reg_read(Register::DX) as u16
                } else {
                    i.immediate(port_op) as u16
                };
                let reg = i.op_register(data_op);
                let size = reg.size();
                // CPL > IOPL: the TSS I/O permission bitmap decides.
                self.check_io_permission(port, size)?;
                self.io_breakpoints(u64::from(port), size);
                if m == Mnemonic::In {
                    let (v, _) = self.external(ExtKind::PortIn, u64::from(port), size as u8, 0)?;
                    self.reg_write(reg, v & mask(size));
                } else {
                    let v = self.reg_read(reg);
                    self.external(ExtKind::PortOut, u64::from(port), size as u8, v)?;
                }
                Ok(())
            }
            Mnemonic::Movsb
            | Mnemonic::Movsw
            | Mnemonic::Movsd
            | Mnemonic::Movsq
            | Mnemonic::Stosb
            | Mnemonic::Stosw
            | Mnemonic::Stosd
            | Mnemonic::Stosq
            | Mnemonic::Lodsb
            | Mnemonic::Lodsw
            | Mnemonic::Lodsd
            | Mnemonic::Lodsq
            | Mnemonic::Cmpsb
            | Mnemonic::Cmpsw
            | Mnemonic::Cmpsd
            | Mnemonic::Cmpsq
            | Mnemonic::Scasb
            | Mnemonic::Scasw
            | Mnemonic::Scasd
            | Mnemonic::Scasq
            | Mnemonic::Insb
            | Mnemonic::Insw
            | Mnemonic::Insd
            | Mnemonic::Outsb
            | Mnemonic::Outsw
            | Mnemonic::Outsd => self.exec_string(i, m),
            Mnemonic::Lgdt | Mnemonic::Lidt => {
                self.need_cpl0()?;
                let ea = self.ea(i);
                let seg = i.memory_segment();
                let limit = self.read_mem(seg, ea, 2)? as u16;
                let base = if self.bitness == 64 {
                    self.read_mem(seg, ea.wrapping_add(2), 8)?
                } else if matches!(i.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
                    // 16-bit operand size: a 24-bit base (SDM vol. 2, LGDT).
                    self.read_mem(seg, ea.wrapping_add(2), 4)? & 0x00ff_ffff
                } else {
                    self.read_mem(seg, ea.wrapping_add(2), 4)?
                };
                if self.bitness == 64 && !canonical(base) {
                    return Err(GP0);
                }
                let t = tandem_core::cpu::DescriptorTable { base, limit };
                if m == Mnemonic::Lgdt {
                    self.sregs.gdt = t;
                } else {
                    self.sregs.idt = t;
                }
                Ok(())
            }
            Mnemonic::Sgdt | Mnemonic::Sidt => {
                let t = if m == Mnemonic::Sgdt {
                    self.sregs.gdt
                } else {
                    self.sregs.idt
                };
                let ea = self.ea(i);
                let seg = i.memory_segment();
                let bsize = if self.bitness == 64 { 8 } else { 4 };
                self.write_mem(seg, ea.wrapping_add(2), bsize, t.base)?;
                self.write_mem(seg, ea, 2, u64::from(t.limit))
            }
            Mnemonic::Ltr => {
                self.need_cpl0()?;
                let sel = self.read_op(i, 0, 2)? as u16;
                self.ltr(sel)
            }
            Mnemonic::Str => {
                let v = u64::from(self.sregs.tr.selector);
                let s = self.op_size(i, 0);
                self.write_op(i, 0, s, v)
            }
            Mnemonic::Sldt => {
                let v = u64::from(self.sregs.ldt.selector);
                let s = self.op_size(i, 0);
                self.write_op(i, 0, s, v)
            }
            Mnemonic::Lldt => {
                self.need_cpl0()?;
                let sel = self.read_op(i, 0, 2)? as u16;
                self.lldt(sel)
            }
            Mnemonic::Clts => {
                self.need_cpl0()?;
                self.sregs.cr0 &= !tandem_core::cpu::cr0::TS;
                Ok(())
            }
            Mnemonic::Wbinvd | Mnemonic::Invd => self.need_cpl0(),
            Mnemonic::Invlpg => {
                self.need_cpl0()?;
                let ea = self.ea(i);
                // INVLPG of a non-canonical address is a no-op.
                if let Ok(la) = self.linear(i.memory_segment(), ea) {
                    self.tlb.flush_page(la);
                }
                Ok(())
            }
            Mnemonic::Rdmsr => self.rdmsr(),
            Mnemonic::Wrmsr => self.wrmsr(),
            Mnemonic::Cpuid => {
                let r = self.cpuid(self.gpr[0] as u32, self.gpr[1] as u32);
                self.gpr[0] = u64::from(r[0]);
                self.gpr[3] = u64::from(r[1]);
                self.gpr[1] = u64::from(r[2]);
                self.gpr[2] = u64::from(r[3]);
                Ok(())
            }
            Mnemonic::Rdtsc | Mnemonic::Rdtscp => {
                if self.sregs.cr4 & 4 != 0 && self.cpl() != 0 {
                    return Err(GP0);
                }
                let t = self.tsc();
                self.gpr[0] = t & 0xffff_ffff;
                self.gpr[2] = t >> 32;
                if m == Mnemonic::Rdtscp {
                    self.gpr[1] = self.msr.tsc_aux & 0xffff_ffff;
                }
                Ok(())
            }
            Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => {
                let size = match m {
                    Mnemonic::Iretq => 8,
                    Mnemonic::Iretd => 4,
                    _ => 2,
                };
                self.iret(size)
            }
            Mnemonic::Int => self.deliver(&Event {
                kind: EventKind::SoftwareInterrupt,
                vector: i.immediate8(),
                error_code: None,
                instruction_len: 0,
            }),
            Mnemonic::Int3 => self.deliver(&Event {
                kind: EventKind::SoftwareException,
                vector: 3,
                error_code: None,
                instruction_len: 0,
            }),
            Mnemonic::Into => {
                if self.rflags & OF != 0 {
                    self.deliver(&Event {
                        kind: EventKind::SoftwareException,
                        vector: 4,
                        error_code: None,
                        instruction_len: 0,
                    })
                } else {
                    Ok(())
                }
            }
            Mnemonic::Int1 => self.deliver(&Event {
                kind: EventKind::PrivilegedSoftwareException,
                vector: 1,
                error_code: None,
                instruction_len: 0,
            }),
            Mnemonic::Syscall => self.syscall(),
            Mnemonic::Sysret | Mnemonic::Sysretq => {
                self.sysret(if i.code() == Code::Sysretq { 8 } else { 4 })
            }
            Mnemonic::Swapgs => {
                if self.bitness != 64 {
                    return Err(UD);
                }
                self.need_cpl0()?;
                std::mem::swap(&mut self.sregs.gs.base, &mut self.msr.kernel_gs_base);
                Ok(())
            }
            Mnemonic::Clac | Mnemonic::Stac => {
                // SMAP's RFLAGS.AC: #UD above CPL 0 (SDM vol. 2, CLAC / STAC).
                if self.cpl() != 0 {
                    return Err(UD);
                }
                if m == Mnemonic::Clac {
                    self.rflags &= !flags::AC;
                } else {
                    self.rflags |= flags::AC;
                }
                Ok(())
            }
            Mnemonic::Wait => self.exec_fwait(),
            Mnemonic::Ldmxcsr => self.exec_mxcsr(i, true),
            Mnemonic::Stmxcsr => self.exec_mxcsr(i, false),
            Mnemonic::Cmpxchg8b | Mnemonic::Cmpxchg16b => self.exec_cmpxchg8b16b(i, m),
            Mnemonic::Xgetbv => self.exec_xgetbv(),
            Mnemonic::Rdpkru => self.exec_rdpkru(),
            Mnemonic::Wrpkru => self.exec_wrpkru(),
            Mnemonic::Xsetbv => self.exec_xsetbv(),
            Mnemonic::Fxsave | Mnemonic::Fxsave64 => self.exec_fxsave(i),
            Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => self.exec_fxrstor(i),
            Mnemonic::Xsave | Mnemonic::Xsave64 | Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => {
                self.exec_xsave(i)
            }
            Mnemonic::Xrstor | Mnemonic::Xrstor64 => self.exec_xrstor(i, false),
            Mnemonic::Xrstors | Mnemonic::Xrstors64 => self.exec_xrstor(i, true),
            Mnemonic::Xsavec | Mnemonic::Xsavec64 => self.exec_xsavec(i, false),
            Mnemonic::Xsaves | Mnemonic::Xsaves64 => self.exec_xsavec(i, true),
            Mnemonic::Ud2 | Mnemonic::Ud0 | Mnemonic::Ud1 => Err(UD),
            // KVM's hypercall ABI (hypercall.rs); VMMCALL (AMD) stays #UD.
            Mnemonic::Vmcall => self.vmcall(),
            // Real-mode / legacy protected-mode instructions (legacy.rs).
            Mnemonic::Pusha
            | Mnemonic::Pushad
            | Mnemonic::Popa
            | Mnemonic::Popad
            | Mnemonic::Enter
            | Mnemonic::Daa
            | Mnemonic::Das
            | Mnemonic::Aaa
            | Mnemonic::Aas
            | Mnemonic::Aam
            | Mnemonic::Aad
            | Mnemonic::Salc
            | Mnemonic::Lds
            | Mnemonic::Les
            | Mnemonic::Lss
            | Mnemonic::Lfs
            | Mnemonic::Lgs
            | Mnemonic::Xlatb
            | Mnemonic::Bound
            | Mnemonic::Arpl
            | Mnemonic::Lar
            | Mnemonic::Lsl
            | Mnemonic::Verr
            | Mnemonic::Verw
            | Mnemonic::Smsw
            | Mnemonic::Lmsw => self.exec_legacy(i, m),
            _ => {
                // SSE / MMX / x87 (sse.rs, x87.rs).
                if let Some(r) = self.exec_simd(i, m) {
                    return r;
                }
                self.note_unimplemented(m);
                Err(UD)
            }
        }
    }

    /// BSF / BSR: the index of the lowest / highest set bit; with a zero
    /// source ZF is set and the destination kept (as Intel processors do).
    fn exec_bit_scan(&mut self, i: &Instruction, forward: bool) -> R<()> {
        let s = self.op_size(i, 0);
        let v = self.read_op(i, 1, s)? & mask(s);
        if v == 0 {
            self.rflags |= ZF;
            return Ok(());
        }
        let r = if forward {
            u64::from(v.trailing_zeros())
        } else {
            63 - u64::from(v.leading_zeros())
        };
        self.write_op(i, 0, s, r)?;
        self.rflags &= !ZF;
        Ok(())
    }

    /// MOV: between general-purpose registers, memory and immediates
    /// inline; control, debug, segment (and test) registers out of line.
    #[inline(always)]
    fn exec_mov(&mut self, i: &Instruction) -> R<()> {
        // AL..R15: iced numbers the general-purpose registers 1 to 68.
        let gpr = |r: Register| (1..=68).contains(&(r as u32));
        if (i.op0_kind() == OpKind::Register && !gpr(i.op0_register()))
            || (i.op1_kind() == OpKind::Register && !gpr(i.op1_register()))
        {
            return self.exec_mov_special(i);
        }
        let s = self.op_size(i, 0);
        let v = self.read_op(i, 1, s)?;
        self.write_op(i, 0, s, v)
    }

    #[inline(never)]
    fn exec_mov_special(&mut self, i: &Instruction) -> R<()> {
        if i.op_kind(0) == OpKind::Register {
            let r = i.op_register(0);
            if r.is_cr() {
                self.need_cpl0()?;
                let v = self.reg_read(i.op_register(1));
                return self.write_cr(r as u32 - Register::CR0 as u32, v);
            }
            if r.is_dr() {
                self.need_cpl0()?;
                let r = self.dr_alias(r)?;
                let v = self.reg_read(i.op_register(1));
                match r {
                    Register::DR0 | Register::DR1 | Register::DR2 | Register::DR3 => {
                        self.dr.db[r as usize - Register::DR0 as usize] = v
                    }
                    Register::DR6 => self.dr.dr6 = (v & 0xf00f) | 0xffff_0ff0,
                    Register::DR7 => {
                        self.dr.dr7 = (v & !0xd000) | 0x400;
                        self.dr7_changed();
                    }
                    _ => return Err(UD),
                }
                return Ok(());
            }
            if r.is_segment_register() {
                if r == Register::CS {
                    return Err(UD);
                }
                let sel = self.read_op(i, 1, 2)? as u16;
                self.load_data_seg(r, sel)?;
                // A MOV SS in the shadow of a MOV SS does not extend it.
                if r == Register::SS && !self.prev_mov_ss {
                    self.mov_ss_shadow = true;
                }
                return Ok(());
            }
        }
        if i.op_kind(1) == OpKind::Register {
            let r = i.op_register(1);
            if r.is_cr() {
                self.need_cpl0()?;
                let v = self.read_cr(r as u32 - Register::CR0 as u32)?;
                self.reg_write(i.op_register(0), v);
                return Ok(());
            }
            if r.is_dr() {
                self.need_cpl0()?;
                let r = self.dr_alias(r)?;
                let v = match r {
                    Register::DR0 | Register::DR1 | Register::DR2 | Register::DR3 => {
                        self.dr.db[r as usize - Register::DR0 as usize]
                    }
                    Register::DR6 => self.dr.dr6,
                    Register::DR7 => self.dr.dr7,
                    _ => return Err(UD),
                };
                self.reg_write(i.op_register(0), v);
                return Ok(());
            }
            if r.is_segment_register() {
                let v = self.reg_read(r);
                let s = if i.op_kind(0) == OpKind::Memory {
                    2
                } else {
                    self.op_size(i, 0)
                };
                return self.write_op(i, 0, s, v);
            }
        }
        let s = self.op_size(i, 0);
        let v = self.read_op(i, 1, s)?;
        self.write_op(i, 0, s, v)
    }

    #[inline(always)]
    fn exec_alu(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let a = self.read_op(i, 0, s)?;
        let b = self.read_op(i, 1, s)? & mask(s);
        let (r, f) = alu_op(m, a, b, self.rflags & CF, s);
        if !matches!(m, Mnemonic::Cmp | Mnemonic::Test) {
            self.write_op(i, 0, s, r)?;
        }
        self.set_arith(f);
        Ok(())
    }

    /// A 32- or 64-bit general-purpose register operand: its index in
    /// `gpr` and its size. iced numbers EAX..R15D 37 to 52, RAX..R15 53 to
    /// 68.
    #[inline(always)]
    fn gpr_wide(r: Register) -> Option<(usize, usize)> {
        let n = r as usize;
        if (53..=68).contains(&n) {
            Some((n - 53, 8))
        } else if (37..=52).contains(&n) {
            Some((n - 37, 4))
        } else {
            None
        }
    }

    /// The source of a register-only MOV or ALU instruction whose
    /// destination is a `s`-byte register: a register of that size or an
    /// immediate (as `read_op` reads them). `None`: another form.
    #[inline(always)]
    fn reg_or_imm_src(&self, i: &Instruction, s: usize) -> Option<u64> {
        match i.op1_kind() {
            OpKind::Register => match Self::gpr_wide(i.op1_register()) {
                Some((n, s1)) if s1 == s => Some(self.gpr[n] & mask(s)),
                _ => None,
            },
            OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32
            | OpKind::Immediate32to64
            | OpKind::Immediate64 => Some(i.immediate(1) & mask(s)),
            _ => None,
        }
    }

    /// MOV and the ALU instructions between 32- / 64-bit registers and
    /// immediates, the commonest forms, without the operand-kind dispatch
    /// of `read_op` / `write_op` (they cannot fault). Returns whether `i`
    /// was one of them (and executed).
    #[inline(always)]
    fn exec_regs_fast(&mut self, i: &Instruction, m: Mnemonic) -> bool {
        if i.op0_kind() != OpKind::Register {
            return false;
        }
        let Some((d, s)) = Self::gpr_wide(i.op0_register()) else {
            return false;
        };
        let Some(b) = self.reg_or_imm_src(i, s) else {
            return false;
        };
        // A 32-bit destination is zero-extended, as `reg_write` does.
        if m == Mnemonic::Mov {
            self.gpr[d] = b;
            return true;
        }
        let a = self.gpr[d] & mask(s);
        let c = self.rflags & CF;
        // Constant sizes let the flag helpers fold their tables.
        let (r, f) = if s == 8 {
            alu_op(m, a, b, c, 8)
        } else {
            alu_op(m, a, b, c, 4)
        };
        if !matches!(m, Mnemonic::Cmp | Mnemonic::Test) {
            self.gpr[d] = r & mask(s);
        }
        self.set_arith(f);
        true
    }
}

/// The result and arithmetic flags of the ALU instruction `m` on `s`-byte
/// operands `a` and `b` (masked) with carry-in `c` (CF).
#[inline(always)]
fn alu_op(m: Mnemonic, a: u64, b: u64, c: u64, s: usize) -> (u64, u64) {
    match m {
        Mnemonic::Add => {
            let r = a.wrapping_add(b) & mask(s);
            (r, flags::add(a, b, 0, r, s))
        }
        Mnemonic::Adc => {
            let r = a.wrapping_add(b).wrapping_add(c) & mask(s);
            (r, flags::add(a, b, c, r, s) ^ flags::planted_adc_cf())
        }
        Mnemonic::Sub | Mnemonic::Cmp => {
            let r = a.wrapping_sub(b) & mask(s);
            (r, flags::sub(a, b, 0, r, s))
        }
        Mnemonic::Sbb => {
            let r = a.wrapping_sub(b).wrapping_sub(c) & mask(s);
            (r, flags::sub(a, b, c, r, s))
        }
        Mnemonic::And | Mnemonic::Test => {
            let r = a & b;
            (r, flags::logic(r, s))
        }
        Mnemonic::Or => {
            let r = a | b;
            (r, flags::logic(r, s))
        }
        _ => {
            let r = (a ^ b) & mask(s);
            (r, flags::logic(r, s))
        }
    }
}

impl InterpVcpu {
    /// Shifts and rotates (SDM vol. 2, SAL/SAR/SHL/SHR and RCL/RCR/ROL/ROR).
    /// A masked count of 0 changes nothing. OF is defined for 1-bit counts
    /// only; for larger counts it is computed by the 1-bit formula (an
    /// undefined value: the differential runs against KVM will pin what the
    /// hardware gives). AF is undefined for shifts and left unchanged.
    fn exec_shift(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let bits = (s * 8) as u32;
        let a = self.read_op(i, 0, s)? & mask(s);
        let cmask = if s == 8 { 0x3f } else { 0x1f };
        let count = (self.read_op(i, 1, 1)? & cmask) as u32;
        if count == 0 {
            // A 32-bit register destination is still written
            // (zero-extended), as on hardware (`tandem fuzz`).
            if s == 4 && i.op0_kind() == OpKind::Register {
                self.write_op(i, 0, s, a)?;
            }
            return Ok(());
        }
        let msb = |v: u64| v & sign(s) != 0;
        let f0 = self.rflags;
        let (r, f) = match m {
            Mnemonic::Shl | Mnemonic::Sal => {
                let wide = (a as u128) << count;
                let r = (wide as u64) & mask(s);
                let cf = (wide >> bits) & 1 != 0;
                let mut f = flags::szp(r, s) | (f0 & AF);
                if cf {
                    f |= CF;
                }
                if msb(r) != cf {
                    f |= OF;
                }
                (r, f)
            }
            Mnemonic::Shr => {
                let r = if count >= bits { 0 } else { a >> count };
                let cf = if count > bits {
                    false
                } else {
                    (a >> (count - 1)) & 1 != 0
                };
                let mut f = flags::szp(r, s) | (f0 & AF);
                if cf {
                    f |= CF;
                }
                if msb(a) {
                    f |= OF;
                }
                (r, f)
            }
            Mnemonic::Sar => {
                let sa = sext(a, s) as i64;
                let r = (sa >> count.min(63)) as u64 & mask(s);
                let cf = (sa >> (count - 1).min(63)) & 1 != 0;
                let mut f = flags::szp(r, s) | (f0 & AF);
                if cf {
                    f |= CF;
                }
                (r, f)
            }
            Mnemonic::Rol | Mnemonic::Ror => {
                let n = count % bits;
                let r = if n == 0 {
                    a
                } else if m == Mnemonic::Rol {
                    ((a << n) | (a >> (bits - n))) & mask(s)
                } else {
                    ((a >> n) | (a << (bits - n))) & mask(s)
                };
                let mut f = f0 & (PF | AF | ZF | SF);
                if m == Mnemonic::Rol {
                    let cf = r & 1 != 0;
                    if cf {
                        f |= CF;
                    }
                    if msb(r) != cf {
                        f |= OF;
                    }
                } else {
                    if msb(r) {
                        f |= CF;
                    }
                    if msb(r) != (r & (sign(s) >> 1) != 0) {
                        f |= OF;
                    }
                }
                (r, f)
            }
            _ => {
                // RCL / RCR through CF, count modulo size + 1.
                let n = count % (bits + 1);
                let mut r = a;
                let mut cf = f0 & CF != 0;
                for _ in 0..n {
                    if m == Mnemonic::Rcl {
                        let out = msb(r);
                        r = ((r << 1) | u64::from(cf)) & mask(s);
                        cf = out;
                    } else {
                        let out = r & 1 != 0;
                        r = (r >> 1) | if cf { sign(s) } else { 0 };
                        cf = out;
                    }
                }
                let mut f = f0 & (PF | AF | ZF | SF);
                if cf {
                    f |= CF;
                }
                let of = if m == Mnemonic::Rcl {
                    msb(r) != cf
                } else {
                    msb(r) != (r & (sign(s) >> 1) != 0)
                };
                if of {
                    f |= OF;
                }
                (r, f)
            }
        };
        self.write_op(i, 0, s, r)?;
        self.set_arith(f);
        Ok(())
    }

    /// SHLD / SHRD (count masked to 5 or 6 bits; counts above the operand
    /// size leave the result undefined: computed from the double-width value).
    fn exec_shxd(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let bits = (s * 8) as u32;
        let a = self.read_op(i, 0, s)? & mask(s);
        let b = self.read_op(i, 1, s)? & mask(s);
        let cmask = if s == 8 { 0x3f } else { 0x1f };
        let count = (self.read_op(i, 2, 1)? & cmask) as u32;
        if count == 0 {
            // The destination is still written: a 32-bit register is
            // zero-extended as by every 32-bit operation in 64-bit mode
            // (measured on hardware by `tandem fuzz`); flags unchanged.
            if s == 4 && i.op0_kind() == OpKind::Register {
                self.write_op(i, 0, s, a)?;
            }
            return Ok(());
        }
        let (r, cf) = if m == Mnemonic::Shld {
            let wide = ((a as u128) << bits) | b as u128;
            let sh = wide << count;
            (
                ((sh >> bits) as u64) & mask(s),
                // The last bit out of the destination: bit 2 * bits - count
                // of the double-width value (2 * bits itself is past a u128).
                (wide >> (2 * bits - count)) & 1 != 0,
            )
        } else {
            let wide = ((b as u128) << bits) | a as u128;
            (
                (wide >> count) as u64 & mask(s),
                (wide >> (count - 1)) & 1 != 0,
            )
        };
        let mut f = flags::szp(r, s) | (self.rflags & AF);
        if cf {
            f |= CF;
        }
        if (r ^ a) & sign(s) != 0 {
            f |= OF;
        }
        self.write_op(i, 0, s, r)?;
        self.set_arith(f);
        Ok(())
    }

    /// CF = OF = `overflow`. SF, ZF, AF and PF are undefined after
    /// MUL / IMUL (SDM vol. 2); with no hardware value pinned down yet they
    /// are left unchanged.
    fn set_mul_flags(&mut self, overflow: bool) {
        self.rflags &= !(CF | OF);
        if overflow {
            self.rflags |= CF | OF;
        }
    }

    fn exec_mul1(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let b = self.read_op(i, 0, s)? & mask(s);
        let a = self.gpr[0] & mask(s);
        let (lo, hi, overflow) = if m == Mnemonic::Mul {
            let p = (a as u128) * (b as u128);
            let lo = (p as u64) & mask(s);
            let hi = ((p >> (s * 8)) as u64) & mask(s);
            (lo, hi, hi != 0)
        } else {
            let p = (sext(a, s) as i64 as i128) * (sext(b, s) as i64 as i128);
            let lo = (p as u64) & mask(s);
            let hi = ((p >> (s * 8)) as u64) & mask(s);
            (lo, hi, sext(lo, s) as i64 as i128 != p)
        };
        match s {
            1 => self.reg_write(Register::AX, (hi << 8) | lo),
            2 => {
                self.reg_write(Register::AX, lo);
                self.reg_write(Register::DX, hi);
            }
            4 => {
                self.gpr[0] = lo;
                self.gpr[2] = hi;
            }
            _ => {
                self.gpr[0] = lo;
                self.gpr[2] = hi;
            }
        }
        self.set_mul_flags(overflow);
        Ok(())
    }

    /// DIV / IDIV: #DE on a zero divisor or a quotient that does not fit.
    /// The flags are undefined: left unchanged.
    fn exec_div(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let d = self.read_op(i, 0, s)? & mask(s);
        if d == 0 {
            return Err(DE);
        }
        let bits = s * 8;
        let dividend: u128 = if s == 1 {
            u128::from(self.gpr[0] & 0xffff)
        } else {
            (u128::from(self.gpr[2] & mask(s)) << bits) | u128::from(self.gpr[0] & mask(s))
        };
        let (q, r) = if m == Mnemonic::Div {
            let q = dividend / u128::from(d);
            if q > u128::from(mask(s)) {
                return Err(DE);
            }
            (q as u64, (dividend % u128::from(d)) as u64)
        } else {
            // Sign-extend the 2*bits dividend.
            let sh = 128 - 2 * bits as u32;
            let n = ((dividend << sh) as i128) >> sh;
            let dv = sext(d, s) as i64 as i128;
            let q = n / dv;
            let half = 1i128 << (bits - 1);
            if q >= half || q < -half {
                return Err(DE);
            }
            (q as u64 & mask(s), (n % dv) as u64 & mask(s))
        };
        match s {
            1 => self.reg_write(Register::AX, (r << 8) | q),
            2 => {
                self.reg_write(Register::AX, q);
                self.reg_write(Register::DX, r);
            }
            _ => {
                self.gpr[0] = q;
                self.gpr[2] = r;
            }
        }
        Ok(())
    }

    /// BT / BTS / BTR / BTC. With a register bit offset and a memory operand
    /// the offset selects bits outside the operand (SDM vol. 2, BT).
    fn exec_bt(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        let s = self.op_size(i, 0);
        let bits = (s * 8) as u64;
        let off = self.read_op(
            i,
            1,
            if i.op_kind(1) == OpKind::Register {
                s
            } else {
                1
            },
        )?;
        let (v, bit, addr) = if i.op_kind(0) == OpKind::Memory && i.op_kind(1) == OpKind::Register {
            let soff = sext(off, s) as i64;
            let ea = self
                .ea(i)
                .wrapping_add((soff.div_euclid(bits as i64) * s as i64) as u64);
            let v = self.read_mem(i.memory_segment(), ea, s)?;
            (v, (soff.rem_euclid(bits as i64)) as u64, Some(ea))
        } else {
            (self.read_op(i, 0, s)?, off % bits, None)
        };
        let cf = (v >> bit) & 1 != 0;
        let r = match m {
            Mnemonic::Bts => Some(v | (1 << bit)),
            Mnemonic::Btr => Some(v & !(1 << bit)),
            Mnemonic::Btc => Some(v ^ (1 << bit)),
            _ => None,
        };
        if let Some(r) = r {
            match addr {
                Some(ea) => self.write_mem(i.memory_segment(), ea, s, r)?,
                None => self.write_op(i, 0, s, r)?,
            }
        }
        if cf {
            self.rflags |= CF;
        } else {
            self.rflags &= !CF;
        }
        Ok(())
    }

    fn ltr(&mut self, sel: u16) -> R<()> {
        if sel & 0xfffc == 0 {
            return Err(GP0);
        }
        let err = Some(u32::from(sel & 0xfffc));
        if sel & 4 != 0 || u64::from(sel & 0xfff8) + 7 > u64::from(self.sregs.gdt.limit) {
            return Err(Stop::Exc(13, err));
        }
        let la = self.sregs.gdt.base.wrapping_add(u64::from(sel & 0xfff8));
        let raw = self.system_read(la, 8)?;
        let mut s = crate::system::parse_descriptor(sel, raw);
        let long = self.sregs.long_mode();
        // An available 64-bit TSS (type 9), or a 16-bit one (type 1) outside
        // long mode.
        let available = s.type_ == 9 || (s.type_ == 1 && !long);
        if s.s || !available {
            return Err(Stop::Exc(13, err));
        }
        if !s.present {
            return Err(Stop::Exc(11, err));
        }
        if long {
            if u64::from(sel & 0xfff8) + 15 > u64::from(self.sregs.gdt.limit) {
                return Err(Stop::Exc(13, err));
            }
            let hi = self.system_read(la.wrapping_add(8), 8)?;
            s.base |= (hi & 0xffff_ffff) << 32;
            // SDM vol. 2, LTR: a non-canonical 64-bit base is #GP(selector).
            if !canonical(s.base) {
                return Err(Stop::Exc(13, err));
            }
        }
        // Mark the descriptor busy (SDM vol. 2, LTR).
        self.lin_write(la.wrapping_add(5), 1, ((raw >> 40) & 0xff) | 2, false)?;
        s.type_ |= 2;
        self.sregs.tr = s;
        Ok(())
    }

    /// The string instructions, with REP / REPE / REPNE. Each iteration
    /// commits RSI / RDI / RCX, so an exit or fault in the middle resumes
    /// where it stopped.
    fn exec_string(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        // MOVSD / CMPSD are also SSE2 mnemonics (XMM operands): sse.rs.
        if (0..i.op_count()).any(|n| {
            i.op_kind(n) == OpKind::Memory
                || (i.op_kind(n) == OpKind::Register && i.op_register(n).is_xmm())
        }) {
            if let Some(r) = self.exec_simd(i, m) {
                return r;
            }
            self.note_unimplemented(m);
            return Err(UD);
        }
        let size = match m {
            Mnemonic::Movsb
            | Mnemonic::Stosb
            | Mnemonic::Lodsb
            | Mnemonic::Cmpsb
            | Mnemonic::Scasb
            | Mnemonic::Insb
            | Mnemonic::Outsb => 1,
            Mnemonic::Movsw
            | Mnemonic::Stosw
            | Mnemonic::Lodsw
            | Mnemonic::Cmpsw
            | Mnemonic::Scasw
            | Mnemonic::Insw
            | Mnemonic::Outsw => 2,
            Mnemonic::Movsq
            | Mnemonic::Stosq
            | Mnemonic::Lodsq
            | Mnemonic::Cmpsq
            | Mnemonic::Scasq => 8,
            _ => 4,
        };
        let mut amask = u64::MAX;
        for n in 0..i.op_count() {
            match i.op_kind(n) {
                OpKind::MemoryESEDI | OpKind::MemorySegESI => amask = 0xffff_ffff,
                OpKind::MemoryESDI | OpKind::MemorySegSI => amask = 0xffff,
                _ => {}
            }
        }
        let is_io = matches!(
            m,
            Mnemonic::Insb
                | Mnemonic::Insw
                | Mnemonic::Insd
                | Mnemonic::Outsb
                | Mnemonic::Outsw
                | Mnemonic::Outsd
        );
        if is_io {
            self.check_io_permission(self.gpr[2] as u16, size)?;
        }
        let src_seg = i.memory_segment();
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let step = if self.rflags & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let upd = |v: u64| -> u64 { (v & !amask) | (v.wrapping_add(step) & amask) };
        let mut done = 0u32;
        loop {
            if rep && self.gpr[1] & amask == 0 {
                break;
            }
            let si = self.gpr[6] & amask;
            let di = self.gpr[7] & amask;
            let mut cmp_flags = None;
            match m {
                Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                    let v = self.read_mem(src_seg, si, size)?;
                    self.write_mem(Register::ES, di, size, v)?;
                    self.gpr[6] = upd(self.gpr[6]);
                    self.gpr[7] = upd(self.gpr[7]);
                }
                Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                    self.write_mem(Register::ES, di, size, self.gpr[0] & mask(size))?;
                    self.gpr[7] = upd(self.gpr[7]);
                }
                Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
                    let v = self.read_mem(src_seg, si, size)?;
                    let reg = match size {
                        1 => Register::AL,
                        2 => Register::AX,
                        4 => Register::EAX,
                        _ => Register::RAX,
                    };
                    self.reg_write(reg, v);
                    self.gpr[6] = upd(self.gpr[6]);
                }
                Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => {
                    let a = self.read_mem(src_seg, si, size)?;
                    let b = self.read_mem(Register::ES, di, size)?;
                    let r = a.wrapping_sub(b) & mask(size);
                    cmp_flags = Some(flags::sub(a, b, 0, r, size));
                    self.gpr[6] = upd(self.gpr[6]);
                    self.gpr[7] = upd(self.gpr[7]);
                }
                Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => {
                    let a = self.gpr[0] & mask(size);
                    let b = self.read_mem(Register::ES, di, size)?;
                    let r = a.wrapping_sub(b) & mask(size);
                    cmp_flags = Some(flags::sub(a, b, 0, r, size));
                    self.gpr[7] = upd(self.gpr[7]);
                }
                Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => {
                    let port = self.gpr[2] & 0xffff;
                    // Probe the destination before the port is read, so a
                    // #PF (or a segment fault) does not lose the data.
                    if self.bitness != 64 {
                        self.check_segment_access(Register::ES, di, size, true)?;
                    }
                    let la = self.linear(Register::ES, di)?;
                    self.probe_write(la, self.cpl() == 3)?;
                    self.io_breakpoints(port, size);
                    let (v, _) = self.external(ExtKind::PortIn, port, size as u8, 0)?;
                    self.write_mem(Register::ES, di, size, v)?;
                    self.gpr[7] = upd(self.gpr[7]);
                }
                _ => {
                    let port = self.gpr[2] & 0xffff;
                    let v = self.read_mem(src_seg, si, size)?;
                    self.io_breakpoints(port, size);
                    self.external(ExtKind::PortOut, port, size as u8, v)?;
                    self.gpr[6] = upd(self.gpr[6]);
                }
            }
            if let Some(f) = cmp_flags {
                self.set_arith(f);
            }
            if !rep {
                break;
            }
            self.gpr[1] = (self.gpr[1] & !amask) | (self.gpr[1].wrapping_sub(1) & amask);
            // This iteration is architectural now.
            self.replay_len = 0;
            self.replay_pos = 0;
            if cmp_flags.is_some() {
                let zf = self.rflags & ZF != 0;
                if (i.has_repe_prefix() && !zf) || (i.has_repne_prefix() && zf) {
                    break;
                }
            }
            done += 1;
            // A data or I/O breakpoint traps after the iteration that hit it
            // (SDM vol. 3, 18.3.1.2); the instruction continues after the
            // #DB.
            if (done >= REP_CHUNK || self.db_hits != 0) && self.gpr[1] & amask != 0 {
                // Yield; the instruction continues at the next step.
                self.rip = self.insn_rip;
                break;
            }
        }
        Ok(())
    }
}
