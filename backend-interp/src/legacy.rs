//! Real-address mode and legacy (16- and 32-bit) protected mode: segment
//! limit and type checks, real-mode segment loads that keep the descriptor
//! cache (big real mode), far CALL / RET through call gates with stack
//! switches, the I/O permission bitmap, and the instructions that exist
//! only outside 64-bit mode (PUSHA, BCD arithmetic, BOUND, ARPL, ...).
//!
//! A20 is always enabled: linear addresses above 1 MiB do not wrap (the
//! `pc` machine's port 0x92 / i8042 A20 gate is not modelled). Task
//! switches (JMP / CALL to a TSS or task gate, a task gate in the IDT, IRET
//! with NT=1) are built for 16- and 32-bit TSSs. Virtual-8086 mode is
//! built without CR4.VME / PVI: IRETD to VM=1, interrupts from it to ring 0
//! through 32-bit gates, the IOPL-sensitive CLI / STI / PUSHF / POPF /
//! INT n / IRET, and I/O through the TSS bitmap; a task switch to a VM=1
//! task ends the run with a message.

use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};
use tandem_core::cpu::{cr0, Segment};
use tandem_core::vcpu::VcpuExit;

use crate::flags::{self, mask, sext, AF, CF, VM, ZF};
use crate::system::{conforming, is_code, null_segment, parse_descriptor};
use crate::{InterpVcpu, Stop, R};

const DE: u8 = 0;
const BR: u8 = 5;
const UD: u8 = 6;
const TS: u8 = 10;
const NP: u8 = 11;
const SS_FAULT: u8 = 12;
const GP: u8 = 13;

fn gp(sel: u16) -> Stop {
    Stop::Exc(GP, Some(u32::from(sel & 0xfffc)))
}

/// The offset mask of a stack segment (its B flag).
pub(crate) fn stack_mask(ss: &Segment) -> u64 {
    if ss.db {
        0xffff_ffff
    } else {
        0xffff
    }
}

/// Whether `size` bytes at `off` lie inside segment `s` (expand-up or
/// expand-down, SDM vol. 3, 3.4.5.1 and 5.3).
pub(crate) fn within_limit(s: &Segment, off: u64, size: usize) -> bool {
    let last = off.wrapping_add(size as u64 - 1);
    if last < off {
        return false;
    }
    if s.s && s.type_ & 0xc == 0x4 {
        // Expand-down data: valid offsets are limit+1 ..= 0xFFFF or 0xFFFFFFFF.
        let upper = if s.db { 0xffff_ffff } else { 0xffff };
        off > u64::from(s.limit) && last <= upper
    } else {
        last <= u64::from(s.limit)
    }
}

/// What starts a task switch (SDM vol. 3, 7.3, table 7-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskSwitch {
    Jmp,
    Call,
    Iret,
    Interrupt,
}

/// An end-of-run exit for a feature the interpreter does not build.
fn not_built(what: &str, rip: u64) -> Stop {
    Stop::Exit(VcpuExit::Unhandled(format!(
        "the interpreter does not implement {what} (at {rip:#x})"
    )))
}

impl InterpVcpu {
    /// Protected mode (CR0.PE) and not virtual-8086 mode.
    #[inline]
    pub(crate) fn protected(&self) -> bool {
        self.sregs.cr0 & cr0::PE != 0 && self.rflags & VM == 0
    }

    /// Checks a data access of `size` bytes at `reg:off` outside 64-bit
    /// mode: a null segment, the type (no writes to code or read-only data,
    /// no reads of execute-only code) and the limit. #SS(0) for SS, #GP(0)
    /// otherwise (SDM vol. 3, 6.15 and vol. 2 "Real-Address Mode
    /// Exceptions": an offset beyond the limit is #GP / #SS in real mode
    /// too, with the limit the descriptor cache holds).
    #[inline]
    pub(crate) fn check_segment_access(
        &self,
        reg: Register,
        off: u64,
        size: usize,
        write: bool,
    ) -> R<()> {
        let s = self.seg(reg);
        let fault = Stop::Exc(if reg == Register::SS { SS_FAULT } else { GP }, Some(0));
        if self.protected() {
            if s.unusable {
                return Err(fault);
            }
            let code = s.type_ & 8 != 0;
            let ok = if write {
                !code && s.type_ & 2 != 0
            } else {
                !code || s.type_ & 2 != 0
            };
            if !ok {
                return Err(fault);
            }
        }
        // Flat expand-up segments cover every 32-bit offset.
        if s.limit == u32::MAX && s.type_ & 0xc != 0x4 {
            return Ok(());
        }
        if within_limit(s, off, size) {
            Ok(())
        } else {
            Err(fault)
        }
    }

    /// The segment a real-mode load of `sel` into `reg` gives: the base is
    /// `sel << 4`, the limit and the D/B and G flags stay what the cache
    /// held (so a limit loaded in protected mode survives: "big real mode",
    /// as on Intel processors and in Bochs), the type becomes read/write
    /// data (execute/read code for CS), DPL 0. A cache that held a null
    /// segment gets the reset limit 0xFFFF. In virtual-8086 mode the
    /// segment is always 64 KiB, 16-bit, DPL 3 (SDM vol. 3, 20.2.1).
    pub(crate) fn real_mode_segment(&self, reg: Register, sel: u16) -> Segment {
        let old = *self.seg(reg);
        let mut s = Segment::real_mode(sel, reg == Register::CS);
        if self.rflags & VM != 0 {
            // Virtual-8086 mode: 64 KiB segments at privilege 3.
            s.dpl = 3;
        } else if !old.unusable && old.present {
            s.limit = old.limit;
            s.g = old.g;
            s.db = old.db;
        }
        s
    }

    /// Writes `v` (`size` bytes) below `*sp` on stack segment `ss` (not
    /// necessarily the current one), checking its limit: #SS(`err`).
    pub(crate) fn push_on(
        &mut self,
        ss: &Segment,
        sp: &mut u64,
        size: usize,
        v: u64,
        err: u32,
    ) -> R<()> {
        let m = stack_mask(ss);
        let nsp = sp.wrapping_sub(size as u64) & m;
        if ss.limit != u32::MAX && !within_limit(ss, nsp, size) {
            return Err(Stop::Exc(SS_FAULT, Some(err)));
        }
        let la = ss.base.wrapping_add(nsp) & 0xffff_ffff;
        self.lin_write(la, size, v, ss.dpl == 3)?;
        *sp = nsp;
        Ok(())
    }

    /// Reads `size` bytes at `i` slots of `size` above the stack pointer.
    fn stack_peek(&mut self, i: u64, size: usize, extra: u64) -> R<u64> {
        let m = self.sp_mask();
        let off = self.gpr[4].wrapping_add(i * size as u64 + extra) & m;
        self.read_mem(Register::SS, off, size)
    }

    /// Sets the stack pointer to `v` with the width of stack segment `ss`.
    fn set_sp(&mut self, ss: &Segment, v: u64) {
        let m = if self.bitness == 64 {
            u64::MAX
        } else {
            stack_mask(ss)
        };
        self.gpr[4] = (self.gpr[4] & !m) | (v & m);
    }

    /// Data segment registers the new (outer) CPL may not use become null
    /// (SDM vol. 2, RET and IRET: "FOR each SegReg in (ES, FS, GS, DS)").
    pub(crate) fn null_inaccessible_data_segments(&mut self, new_cpl: u8) {
        for r in [Register::ES, Register::DS, Register::FS, Register::GS] {
            let s = *self.seg(r);
            if !s.unusable && (!is_code(&s) || !conforming(&s)) && s.dpl < new_cpl {
                let mut n = null_segment(s.selector & 3, 0);
                if matches!(r, Register::FS | Register::GS) {
                    n.base = s.base;
                }
                *self.seg_mut(r) = n;
            }
        }
    }

    /// SS:ESP for privilege level `pl` from the current TSS: a 32-bit TSS
    /// (type 9 / 11) holds ESPn at 4 + 8n and SSn at 8 + 8n, a 16-bit one
    /// (type 1 / 3) SPn at 2 + 4n and SSn at 4 + 4n (SDM vol. 3, 7.2.1, 7.6).
    pub(crate) fn tss_stack(&mut self, pl: u8, ext: u32) -> R<(u16, u64)> {
        let pl = u64::from(pl);
        if self.sregs.tr.type_ & 8 != 0 {
            let esp = self.tss_read(4 + 8 * pl, 4, ext)?;
            let ss = self.tss_read(8 + 8 * pl, 2, ext)? as u16;
            Ok((ss, esp))
        } else {
            let sp = self.tss_read(2 + 4 * pl, 2, ext)?;
            let ss = self.tss_read(4 + 4 * pl, 2, ext)? as u16;
            Ok((ss, sp))
        }
    }

    /// Checks the stack segment `ss_sel` read from the TSS for privilege
    /// `pl`: any fault is #TS(selector) (SDM vol. 3, table 7-? / CALL).
    pub(crate) fn tss_stack_segment(&mut self, ss_sel: u16, pl: u8, ext: u32) -> R<Segment> {
        self.check_data_seg(Register::SS, ss_sel, pl)
            .map_err(|e| match e {
                Stop::Exc(_, _) => Stop::Exc(TS, Some(u32::from(ss_sel & 0xfffc) | ext)),
                other => other,
            })
    }

    /// CALL ptr16:16/32, CALL m16:16/32/64 (SDM vol. 2, CALL: far calls in
    /// real mode, to a code segment, and through a call gate).
    pub(crate) fn far_call(&mut self, i: &Instruction) -> R<()> {
        let (sel, off, size) = match i.op_kind(0) {
            OpKind::FarBranch16 => (i.far_branch_selector(), u64::from(i.far_branch16()), 2),
            OpKind::FarBranch32 => (i.far_branch_selector(), u64::from(i.far_branch32()), 4),
            OpKind::Memory => {
                let size = i.memory_size().size().saturating_sub(2).max(2);
                let ea = self.ea(i);
                let seg = i.memory_segment();
                let off = self.read_mem(seg, ea, size)?;
                let sel = self.read_mem(seg, ea.wrapping_add(size as u64), 2)? as u16;
                (sel, off, size)
            }
            _ => return Err(Stop::Exc(UD, None)),
        };
        let ret_cs = u64::from(self.sregs.cs.selector);
        let ret_ip = self.next_rip & mask(size);
        if !self.protected() {
            let cs = self.real_mode_segment(Register::CS, sel);
            if off > u64::from(cs.limit) {
                return Err(Stop::Exc(GP, Some(0)));
            }
            let old_sp = self.gpr[4];
            let r = self
                .push(ret_cs, size)
                .and_then(|_| self.push(ret_ip, size));
            if let Err(e) = r {
                self.gpr[4] = old_sp;
                return Err(e);
            }
            self.sregs.cs = cs;
            self.rip = off;
            self.mode_changed();
            return Ok(());
        }
        if sel & 0xfffc == 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let raw = self.descriptor(sel, 0)?;
        let d = parse_descriptor(sel, raw);
        if d.s {
            if !is_code(&d) || (!conforming(&d) && (sel & 3) as u8 > self.cpl()) {
                return Err(gp(sel));
            }
            let cs = self.check_code_seg(sel, self.cpl(), 0)?;
            let long_target = self.sregs.long_mode() && cs.l;
            if !long_target && off > u64::from(cs.limit) {
                return Err(Stop::Exc(GP, Some(0)));
            }
            let old_sp = self.gpr[4];
            let r = self
                .push(ret_cs, size)
                .and_then(|_| self.push(ret_ip, size));
            if let Err(e) = r {
                self.gpr[4] = old_sp;
                return Err(e);
            }
            self.sregs.cs = cs;
            self.rip = off;
            self.mode_changed();
            return Ok(());
        }
        self.far_to_system(sel, raw, true)
    }

    /// A far JMP or CALL whose selector names a system descriptor: a call
    /// gate, a TSS or a task gate (a task switch).
    pub(crate) fn far_to_system(&mut self, sel: u16, raw: u64, call: bool) -> R<()> {
        let type_ = ((raw >> 40) & 0xf) as u8;
        let long = self.sregs.long_mode();
        match type_ {
            4 if !long => self.through_call_gate(sel, raw, call),
            0xc if !long => self.through_call_gate(sel, raw, call),
            0xc => self.through_call_gate64(sel, raw, call),
            1 | 9 | 5 if !long => {
                // A TSS or a task gate: its DPL must be >= CPL and RPL.
                let dpl = ((raw >> 45) & 3) as u8;
                if dpl < self.cpl() || dpl < (sel & 3) as u8 {
                    return Err(gp(sel));
                }
                let (tss_sel, tss_raw) = if type_ == 5 {
                    if raw & (1 << 47) == 0 {
                        return Err(Stop::Exc(NP, Some(u32::from(sel & 0xfffc))));
                    }
                    let tss_sel = ((raw >> 16) & 0xffff) as u16;
                    (tss_sel, self.task_gate_target(tss_sel, 0)?)
                } else {
                    (sel, raw)
                };
                let source = if call {
                    TaskSwitch::Call
                } else {
                    TaskSwitch::Jmp
                };
                self.task_switch(tss_sel, tss_raw, source, self.rip, None, 0)
            }
            _ => Err(gp(sel)),
        }
    }

    /// The TSS descriptor a task gate names: it must be in the GDT and be
    /// a TSS (#GP(selector) otherwise, with `ext`).
    pub(crate) fn task_gate_target(&mut self, tss_sel: u16, ext: u32) -> R<u64> {
        let err = Some(u32::from(tss_sel & 0xfffc) | ext);
        if tss_sel & 4 != 0 || tss_sel & 0xfffc == 0 {
            return Err(Stop::Exc(GP, err));
        }
        let raw = self.descriptor(tss_sel, ext)?;
        if raw & (1 << 44) != 0 || !matches!((raw >> 40) & 0xf, 1 | 3 | 9 | 0xb) {
            return Err(Stop::Exc(GP, err));
        }
        Ok(raw)
    }

    /// Sets or clears the busy bit (type bit 1) of the TSS descriptor of
    /// `sel` in the GDT.
    fn set_tss_busy(&mut self, sel: u16, busy: bool) -> R<()> {
        let la = self
            .sregs
            .gdt
            .base
            .wrapping_add(u64::from(sel & 0xfff8) + 5);
        let b = self.system_read(la, 1)?;
        let nb = if busy { b | 2 } else { b & !2 };
        self.lin_write(la, 1, nb, false)
    }

    /// A task switch (SDM vol. 3, 7.3): saves the current task's state in
    /// its TSS, loads the new task's from the TSS `sel` (descriptor `raw`,
    /// 16-bit type 1/3 or 32-bit type 9/11), maintains the busy bits, NT
    /// and the previous-task link, sets CR0.TS, and pushes `error_code` on
    /// the new task's stack. `ret_eip` is the EIP saved for the old task;
    /// `ext` is the EXT bit of error codes (a hardware event).
    /// Faults before the commit point belong to the old task, those while
    /// loading the new task's segments to the new one (as the SDM says).
    /// The debug trap (T) bit and virtual-8086 tasks are not supported.
    pub(crate) fn task_switch(
        &mut self,
        sel: u16,
        raw: u64,
        source: TaskSwitch,
        ret_eip: u64,
        error_code: Option<u32>,
        ext: u32,
    ) -> R<()> {
        let serr = Some(u32::from(sel & 0xfffc) | ext);
        let mut new = parse_descriptor(sel, raw);
        let new32 = new.type_ & 8 != 0;
        let busy = new.type_ & 2 != 0;
        if source == TaskSwitch::Iret {
            if !busy {
                return Err(Stop::Exc(TS, serr));
            }
        } else if busy {
            return Err(Stop::Exc(GP, serr));
        }
        if !new.present {
            return Err(Stop::Exc(NP, serr));
        }
        if new.limit < if new32 { 0x67 } else { 0x2b } {
            return Err(Stop::Exc(TS, serr));
        }
        let old = self.sregs.tr;
        if old.unusable || old.s {
            return Err(Stop::Exc(TS, serr));
        }
        let old32 = old.type_ & 8 != 0;
        if old.limit < if old32 { 0x5f } else { 0x29 } {
            return Err(Stop::Exc(TS, Some(u32::from(old.selector & 0xfffc) | ext)));
        }

        // Read the whole new state first: a #PF here leaves the old task
        // untouched.
        let nb = new.base;
        let rd = |me: &mut InterpVcpu, off: u64, size: usize| -> R<u64> {
            me.system_read(nb.wrapping_add(off) & 0xffff_ffff, size)
        };
        let mut regs = [0u64; 8];
        // ES, CS, SS, DS, FS, GS, LDT.
        let mut sels = [0u16; 7];
        let (cr3, eip, eflags) = if new32 {
            for (k, r) in regs.iter_mut().enumerate() {
                *r = rd(self, 0x28 + 4 * k as u64, 4)?;
            }
            for (k, s) in sels.iter_mut().enumerate().take(6) {
                *s = rd(self, 0x48 + 4 * k as u64, 2)? as u16;
            }
            sels[6] = rd(self, 0x60, 2)? as u16;
            (
                Some(rd(self, 0x1c, 4)?),
                rd(self, 0x20, 4)?,
                rd(self, 0x24, 4)?,
            )
        } else {
            for (k, r) in regs.iter_mut().enumerate() {
                *r = (self.gpr[k] & !0xffff) | rd(self, 0x12 + 2 * k as u64, 2)?;
            }
            for (k, s) in sels.iter_mut().enumerate().take(4) {
                let off = [0x22u64, 0x24, 0x26, 0x28][k];
                *s = rd(self, off, 2)? as u16;
            }
            // A 16-bit TSS has no FS / GS: they are loaded null.
            sels[6] = rd(self, 0x2a, 2)? as u16;
            (
                None,
                rd(self, 0xe, 2)?,
                (self.rflags & !0xffff) | rd(self, 0x10, 2)?,
            )
        };
        if eflags & VM != 0 {
            return Err(not_built("virtual-8086 tasks", self.insn_rip));
        }

        // Save the old task.
        let ob = old.base;
        let mut saved_flags = self.rflags & 0xffff_ffff;
        if source == TaskSwitch::Iret {
            saved_flags &= !flags::NT;
        }
        let seg_sels = [
            self.sregs.es.selector,
            self.sregs.cs.selector,
            self.sregs.ss.selector,
            self.sregs.ds.selector,
            self.sregs.fs.selector,
            self.sregs.gs.selector,
        ];
        let wr = |me: &mut InterpVcpu, off: u64, size: usize, v: u64| -> R<()> {
            me.lin_write(ob.wrapping_add(off) & 0xffff_ffff, size, v, false)
        };
        if old32 {
            wr(self, 0x20, 4, ret_eip & 0xffff_ffff)?;
            wr(self, 0x24, 4, saved_flags)?;
            for k in 0..8 {
                wr(self, 0x28 + 4 * k as u64, 4, self.gpr[k] & 0xffff_ffff)?;
            }
            for (k, s) in seg_sels.iter().enumerate() {
                wr(self, 0x48 + 4 * k as u64, 2, u64::from(*s))?;
            }
        } else {
            wr(self, 0xe, 2, ret_eip & 0xffff)?;
            wr(self, 0x10, 2, saved_flags & 0xffff)?;
            for k in 0..8 {
                wr(self, 0x12 + 2 * k as u64, 2, self.gpr[k] & 0xffff)?;
            }
            for (k, s) in seg_sels.iter().take(4).enumerate() {
                wr(self, 0x22 + 2 * k as u64, 2, u64::from(*s))?;
            }
        }
        if matches!(source, TaskSwitch::Jmp | TaskSwitch::Iret) {
            self.set_tss_busy(old.selector, false)?;
        }
        let mut new_flags = eflags;
        if matches!(source, TaskSwitch::Call | TaskSwitch::Interrupt) {
            new_flags |= flags::NT;
            self.lin_write(nb & 0xffff_ffff, 2, u64::from(old.selector), false)?;
        }
        if source != TaskSwitch::Iret {
            self.set_tss_busy(sel, true)?;
        }
        new.type_ |= 2;

        // Commit point: from here on, faults belong to the new task.
        self.sregs.tr = new;
        self.sregs.cr0 |= cr0::TS;
        if let Some(cr3) = cr3 {
            if self.sregs.cr0 & cr0::PG != 0 {
                self.write_cr(3, cr3)?;
            }
        }
        self.rflags = (new_flags & flags::SETTABLE) | tandem_core::cpu::rflags::FIXED1;
        self.rip = eip;
        for (k, r) in regs.iter().enumerate() {
            self.gpr[k] = *r;
        }
        // Selectors first (with unusable caches), then the checked loads.
        let regs_order = [
            Register::ES,
            Register::CS,
            Register::SS,
            Register::DS,
            Register::FS,
            Register::GS,
        ];
        for (k, r) in regs_order.iter().enumerate() {
            *self.seg_mut(*r) = null_segment(sels[k], 0);
        }
        self.sregs.ldt = null_segment(sels[6], 0);
        let ts = |s: u16| Stop::Exc(TS, Some(u32::from(s & 0xfffc) | ext));
        // LDT (from the GDT).
        let ldt_sel = sels[6];
        if ldt_sel & 0xfffc != 0 {
            if ldt_sel & 4 != 0 {
                return Err(ts(ldt_sel));
            }
            let lraw = self.descriptor(ldt_sel, ext).map_err(|_| ts(ldt_sel))?;
            let l = parse_descriptor(ldt_sel, lraw);
            if l.s || l.type_ != 2 || !l.present {
                return Err(ts(ldt_sel));
            }
            self.sregs.ldt = l;
        }
        // CS: the new CPL is its RPL.
        let cs_sel = sels[1];
        let cpl = (cs_sel & 3) as u8;
        if cs_sel & 0xfffc == 0 {
            return Err(ts(cs_sel));
        }
        let craw = self.descriptor(cs_sel, ext).map_err(|_| ts(cs_sel))?;
        let mut cs = parse_descriptor(cs_sel, craw);
        let cs_ok = cs.s
            && is_code(&cs)
            && if conforming(&cs) {
                cs.dpl <= cpl
            } else {
                cs.dpl == cpl
            };
        if !cs_ok {
            return Err(ts(cs_sel));
        }
        if !cs.present {
            return Err(Stop::Exc(NP, Some(u32::from(cs_sel & 0xfffc) | ext)));
        }
        self.mark_accessed(cs_sel, craw, &mut cs)?;
        cs.dpl = cpl;
        self.sregs.cs = cs;
        self.mode_changed();
        // SS and the data segments at the new CPL; a not-present SS is #SS.
        for (k, r) in regs_order.iter().enumerate() {
            if *r == Register::CS || (!new32 && matches!(r, Register::FS | Register::GS)) {
                continue;
            }
            let s = sels[k];
            let loaded = self.check_data_seg(*r, s, cpl).map_err(|e| match e {
                Stop::Exc(NP, c) | Stop::Exc(SS_FAULT, c) => Stop::Exc(
                    if *r == Register::SS { SS_FAULT } else { NP },
                    c.map(|c| c | ext),
                ),
                Stop::Exc(_, _) => ts(s),
                other => other,
            })?;
            *self.seg_mut(*r) = loaded;
        }
        if let Some(e) = error_code {
            let ss = self.sregs.ss;
            let mut sp = self.gpr[4] & stack_mask(&ss);
            let w = if new32 { 4 } else { 2 };
            self.push_on(&ss, &mut sp, w, u64::from(e), ext)?;
            self.set_sp(&ss, sp);
        }
        Ok(())
    }

    /// JMP / CALL through a 16-byte IA-32e call gate (SDM vol. 3, 5.8.3.1
    /// and vol. 2, CALL): the target is a 64-bit code segment; a CALL to an
    /// inner level takes RSP from the 64-bit TSS, loads a null SS with the
    /// new RPL and pushes SS, RSP, CS and RIP as quadwords (no parameters).
    fn through_call_gate64(&mut self, gsel: u16, raw: u64, call: bool) -> R<()> {
        let cpl = self.cpl();
        let gerr = Some(u32::from(gsel & 0xfffc));
        let gdpl = ((raw >> 45) & 3) as u8;
        if gdpl < cpl || gdpl < (gsel & 3) as u8 {
            return Err(gp(gsel));
        }
        if raw & (1 << 47) == 0 {
            return Err(Stop::Exc(NP, gerr));
        }
        // The upper half: within the table, with a zero type field.
        if gsel & 4 == 0 && u64::from(gsel & 0xfff8) + 15 > u64::from(self.sregs.gdt.limit) {
            return Err(gp(gsel));
        }
        let table = if gsel & 4 != 0 {
            self.sregs.ldt.base
        } else {
            self.sregs.gdt.base
        };
        let hi = self.system_read(table.wrapping_add(u64::from(gsel & 0xfff8) + 8), 8)?;
        if (hi >> 40) & 0x1f != 0 {
            return Err(gp(gsel));
        }
        let off = (raw & 0xffff) | (((raw >> 48) & 0xffff) << 16) | ((hi & 0xffff_ffff) << 32);
        let tsel = ((raw >> 16) & 0xffff) as u16;
        if tsel & 0xfffc == 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let traw = self.descriptor(tsel, 0)?;
        let mut cs = parse_descriptor(tsel, traw);
        if !cs.s || !is_code(&cs) || !cs.l || cs.db || cs.dpl > cpl {
            return Err(gp(tsel));
        }
        if !call && !conforming(&cs) && cs.dpl != cpl {
            return Err(gp(tsel));
        }
        if !cs.present {
            return Err(Stop::Exc(NP, Some(u32::from(tsel & 0xfffc))));
        }
        if !crate::system::canonical(off) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let new_cpl = if conforming(&cs) { cpl } else { cs.dpl };
        self.mark_accessed(tsel, traw, &mut cs)?;
        cs.selector = (tsel & 0xfffc) | u16::from(new_cpl);
        cs.dpl = new_cpl;
        if call {
            let ret_cs = u64::from(self.sregs.cs.selector);
            let ret_ip = self.next_rip;
            if new_cpl < cpl {
                let rsp = self.tss_read(4 + 8 * u64::from(new_cpl), 8, 0)?;
                let frame = [
                    u64::from(self.sregs.ss.selector),
                    self.gpr[4],
                    ret_cs,
                    ret_ip,
                ];
                let top = rsp.wrapping_sub(32);
                if !crate::system::canonical(top) || !crate::system::canonical(rsp.wrapping_sub(1))
                {
                    return Err(Stop::Exc(SS_FAULT, Some(0)));
                }
                for (k, v) in frame.iter().enumerate() {
                    let la = rsp.wrapping_sub(8 * (k as u64 + 1));
                    self.lin_write(la, 8, *v, false)?;
                }
                self.sregs.ss = null_segment(u16::from(new_cpl), new_cpl);
                self.gpr[4] = top;
            } else {
                let old_sp = self.gpr[4];
                let r = self.push(ret_cs, 8).and_then(|_| self.push(ret_ip, 8));
                if let Err(e) = r {
                    self.gpr[4] = old_sp;
                    return Err(e);
                }
            }
        }
        self.sregs.cs = cs;
        self.rip = off;
        self.mode_changed();
        Ok(())
    }

    /// JMP / CALL through a 16-bit (type 4) or 32-bit (type 12) call gate
    /// (SDM vol. 3, 5.8.4-5.8.6). A CALL to a more privileged non-conforming
    /// segment switches to the stack the TSS gives for the new CPL and
    /// copies the gate's parameter count of words / doublewords.
    fn through_call_gate(&mut self, gsel: u16, raw: u64, call: bool) -> R<()> {
        let cpl = self.cpl();
        let rpl = (gsel & 3) as u8;
        let gdpl = ((raw >> 45) & 3) as u8;
        if gdpl < cpl || gdpl < rpl {
            return Err(gp(gsel));
        }
        if raw & (1 << 47) == 0 {
            return Err(Stop::Exc(NP, Some(u32::from(gsel & 0xfffc))));
        }
        let gate32 = (raw >> 40) & 0xf == 0xc;
        let gsize: usize = if gate32 { 4 } else { 2 };
        let tsel = ((raw >> 16) & 0xffff) as u16;
        let mut off = raw & 0xffff;
        if gate32 {
            off |= ((raw >> 48) & 0xffff) << 16;
        }
        let params = ((raw >> 32) & 0x1f) as usize;
        if tsel & 0xfffc == 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let traw = self.descriptor(tsel, 0)?;
        let mut cs = parse_descriptor(tsel, traw);
        if !cs.s || !is_code(&cs) || cs.dpl > cpl {
            return Err(gp(tsel));
        }
        if !call && !conforming(&cs) && cs.dpl != cpl {
            return Err(gp(tsel));
        }
        if !cs.present {
            return Err(Stop::Exc(NP, Some(u32::from(tsel & 0xfffc))));
        }
        if off > u64::from(cs.limit) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let new_cpl = if conforming(&cs) { cpl } else { cs.dpl };
        self.mark_accessed(tsel, traw, &mut cs)?;
        cs.selector = (tsel & 0xfffc) | u16::from(new_cpl);
        cs.dpl = new_cpl;
        if !call {
            self.sregs.cs = cs;
            self.rip = off;
            self.mode_changed();
            return Ok(());
        }
        let ret_cs = u64::from(self.sregs.cs.selector);
        let ret_ip = self.next_rip & mask(gsize);
        if new_cpl < cpl {
            let (ss_sel, new_sp) = self.tss_stack(new_cpl, 0)?;
            let ss = self.tss_stack_segment(ss_sel, new_cpl, 0)?;
            let old_ss = u64::from(self.sregs.ss.selector);
            let old_sp = self.gpr[4] & self.sp_mask();
            let mut p = [0u64; 32];
            for (k, slot) in p.iter_mut().enumerate().take(params) {
                *slot = self.stack_peek(k as u64, gsize, 0)?;
            }
            let err = u32::from(ss_sel & 0xfffc);
            let mut sp = new_sp & stack_mask(&ss);
            self.push_on(&ss, &mut sp, gsize, old_ss, err)?;
            self.push_on(&ss, &mut sp, gsize, old_sp & mask(gsize), err)?;
            for k in (0..params).rev() {
                self.push_on(&ss, &mut sp, gsize, p[k], err)?;
            }
            self.push_on(&ss, &mut sp, gsize, ret_cs, err)?;
            self.push_on(&ss, &mut sp, gsize, ret_ip, err)?;
            self.sregs.ss = ss;
            self.set_sp(&ss, sp);
        } else {
            let old_sp = self.gpr[4];
            let r = self
                .push(ret_cs, gsize)
                .and_then(|_| self.push(ret_ip, gsize));
            if let Err(e) = r {
                self.gpr[4] = old_sp;
                return Err(e);
            }
        }
        self.sregs.cs = cs;
        self.rip = off;
        self.mode_changed();
        Ok(())
    }

    /// RETF [imm16] (SDM vol. 2, RET: real mode, same privilege, and a
    /// return to an outer privilege level that pops SS:ESP and nulls the
    /// data segments the outer level may not use).
    pub(crate) fn far_return(&mut self, i: &Instruction) -> R<()> {
        let size = match i.code() {
            Code::Retfq | Code::Retfq_imm16 => 8,
            Code::Retfw | Code::Retfw_imm16 => 2,
            _ => 4,
        };
        let imm = if i.op_count() == 1 {
            u64::from(i.immediate16())
        } else {
            0
        };
        let off = self.stack_peek(0, size, 0)?;
        let sel = self.stack_peek(1, size, 0)? as u16;
        let m = self.sp_mask();
        let sp = self.gpr[4] & m;
        if !self.protected() {
            let cs = self.real_mode_segment(Register::CS, sel);
            if off > u64::from(cs.limit) {
                return Err(Stop::Exc(GP, Some(0)));
            }
            self.sregs.cs = cs;
            self.rip = off;
            self.gpr[4] = (self.gpr[4] & !m) | (sp.wrapping_add(2 * size as u64 + imm) & m);
            self.mode_changed();
            return Ok(());
        }
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        if rpl < cpl {
            return Err(gp(sel));
        }
        let cs = self.check_code_seg(sel, rpl, 0)?;
        let long_target = self.sregs.long_mode() && cs.l;
        if !long_target && off > u64::from(cs.limit) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        if rpl == cpl {
            self.sregs.cs = cs;
            self.rip = off;
            self.gpr[4] = (self.gpr[4] & !m) | (sp.wrapping_add(2 * size as u64 + imm) & m);
            self.mode_changed();
            return Ok(());
        }
        let new_sp = self.stack_peek(2, size, imm)?;
        let ss_sel = self.stack_peek(3, size, imm)? as u16;
        let ss = self.check_data_seg(Register::SS, ss_sel, rpl)?;
        self.sregs.cs = cs;
        self.sregs.ss = ss;
        self.rip = off;
        self.mode_changed();
        self.set_sp(&ss, new_sp.wrapping_add(imm));
        self.null_inaccessible_data_segments(rpl);
        Ok(())
    }

    /// The I/O permission check of IN, OUT, INS and OUTS (SDM vol. 1,
    /// 19.5): in protected mode with CPL > IOPL (or in virtual-8086 mode)
    /// every bit of the TSS I/O permission bitmap covering the `size` ports
    /// from `port` must be clear; the bitmap starts at the 16-bit offset at
    /// TSS+0x66, and a bit beyond the TSS limit counts as set. #GP(0)
    /// otherwise; a 16-bit TSS has no bitmap.
    pub(crate) fn check_io_permission(&mut self, port: u16, size: usize) -> R<()> {
        if self.sregs.cr0 & cr0::PE == 0 {
            return Ok(());
        }
        if self.rflags & VM == 0 && self.iopl_ok() {
            return Ok(());
        }
        let tr = self.sregs.tr;
        // An available or busy 32-bit / 64-bit TSS (types 9 and 11).
        if tr.unusable || tr.s || tr.type_ & 0xd != 9 || tr.limit < 0x67 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let map = self.system_read(tr.base.wrapping_add(0x66), 2)?;
        let byte = map + u64::from(port / 8);
        if byte + 1 > u64::from(tr.limit) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let bits = self.system_read(tr.base.wrapping_add(byte) & 0xffff_ffff, 2)?;
        let want = ((1u64 << size) - 1) << (port & 7);
        if bits & want != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        Ok(())
    }

    /// LLDT (SDM vol. 2): a null selector leaves the LDTR unusable; otherwise
    /// a present LDT descriptor (type 2) from the GDT.
    pub(crate) fn lldt(&mut self, sel: u16) -> R<()> {
        if !self.protected() {
            return Err(Stop::Exc(UD, None));
        }
        if sel & 0xfffc == 0 {
            self.sregs.ldt = null_segment(sel, 0);
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(gp(sel));
        }
        let raw = self.descriptor(sel, 0)?;
        let mut s = parse_descriptor(sel, raw);
        if s.s || s.type_ != 2 {
            return Err(gp(sel));
        }
        if !s.present {
            return Err(Stop::Exc(NP, Some(u32::from(sel & 0xfffc))));
        }
        if self.sregs.long_mode() {
            let la = self
                .sregs
                .gdt
                .base
                .wrapping_add(u64::from(sel & 0xfff8) + 8);
            let hi = self.system_read(la, 8)?;
            s.base |= (hi & 0xffff_ffff) << 32;
            // SDM vol. 2, LLDT: a non-canonical 64-bit base is #GP(selector).
            if !crate::system::canonical(s.base) {
                return Err(gp(sel));
            }
        }
        self.sregs.ldt = s;
        Ok(())
    }

    /// The descriptor of `sel` for LAR / LSL / VERR / VERW, or `None` when
    /// the selector is null or beyond its table's limit (these instructions
    /// clear ZF instead of faulting).
    fn peek_descriptor(&mut self, sel: u16) -> R<Option<u64>> {
        if sel & 0xfffc == 0 {
            return Ok(None);
        }
        let table = if sel & 4 != 0 {
            if self.sregs.ldt.unusable {
                return Ok(None);
            }
            (self.sregs.ldt.base, self.sregs.ldt.limit)
        } else {
            (self.sregs.gdt.base, u32::from(self.sregs.gdt.limit))
        };
        let off = u64::from(sel & 0xfff8);
        if off + 7 > u64::from(table.1) {
            return Ok(None);
        }
        Ok(Some(self.system_read(table.0.wrapping_add(off), 8)?))
    }

    fn set_zf(&mut self, on: bool) {
        if on {
            self.rflags |= ZF;
        } else {
            self.rflags &= !ZF;
        }
    }

    /// The instructions that exist only outside 64-bit mode or only matter
    /// there, and the system instructions of legacy protected mode.
    pub(crate) fn exec_legacy(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        match m {
            Mnemonic::Pusha | Mnemonic::Pushad => {
                let size = if m == Mnemonic::Pushad { 4 } else { 2 };
                let old_sp = self.gpr[4];
                let regs = [0usize, 1, 2, 3, 4, 5, 6, 7];
                for r in regs {
                    let v = if r == 4 { old_sp } else { self.gpr[r] };
                    if let Err(e) = self.push(v & mask(size), size) {
                        self.gpr[4] = old_sp;
                        return Err(e);
                    }
                }
                Ok(())
            }
            Mnemonic::Popa | Mnemonic::Popad => {
                let size = if m == Mnemonic::Popad { 4 } else { 2 };
                let mut vals = [0u64; 8];
                for (k, v) in vals.iter_mut().enumerate() {
                    *v = self.stack_peek(k as u64, size, 0)?;
                }
                // DI, SI, BP, (SP skipped), BX, DX, CX, AX.
                for (k, r) in [7usize, 6, 5, 4, 3, 2, 1, 0].iter().enumerate() {
                    if *r != 4 {
                        let g = &mut self.gpr[*r];
                        *g = (*g & !mask(size)) | vals[k];
                        if size == 4 {
                            *g &= 0xffff_ffff;
                        }
                    }
                }
                let sm = self.sp_mask();
                let sp = self.gpr[4].wrapping_add(8 * size as u64) & sm;
                self.gpr[4] = (self.gpr[4] & !sm) | sp;
                Ok(())
            }
            Mnemonic::Enter => self.enter(i),
            Mnemonic::Daa | Mnemonic::Das => {
                let al = self.gpr[0] & 0xff;
                let (old_cf, af) = (self.rflags & CF != 0, self.rflags & AF != 0);
                let mut r = al;
                let mut cf = false;
                let mut new_af = false;
                if al & 0xf > 9 || af {
                    if m == Mnemonic::Daa {
                        cf = old_cf || al + 6 > 0xff;
                        r = (al + 6) & 0xff;
                    } else {
                        cf = old_cf || al < 6;
                        r = al.wrapping_sub(6) & 0xff;
                    }
                    new_af = true;
                }
                if al > 0x99 || old_cf {
                    r = if m == Mnemonic::Daa {
                        (r + 0x60) & 0xff
                    } else {
                        r.wrapping_sub(0x60) & 0xff
                    };
                    cf = true;
                }
                self.reg_write(Register::AL, r);
                // OF is undefined: cleared.
                let mut f = flags::szp(r, 1);
                if cf {
                    f |= CF;
                }
                if new_af {
                    f |= AF;
                }
                self.set_arith(f);
                Ok(())
            }
            Mnemonic::Aaa | Mnemonic::Aas => {
                let ax = self.gpr[0] & 0xffff;
                let adjust = ax & 0xf > 9 || self.rflags & AF != 0;
                let r = if !adjust {
                    ax
                } else if m == Mnemonic::Aaa {
                    ax.wrapping_add(0x106)
                } else {
                    ax.wrapping_sub(6).wrapping_sub(0x100)
                } & 0xff0f;
                self.reg_write(Register::AX, r);
                // OF, SF, ZF and PF are undefined: from AL.
                let mut f = flags::szp(r & 0xff, 1);
                if adjust {
                    f |= AF | CF;
                }
                self.set_arith(f);
                Ok(())
            }
            Mnemonic::Aam => {
                let base = i.immediate8() as u64;
                if base == 0 {
                    return Err(Stop::Exc(DE, None));
                }
                let al = self.gpr[0] & 0xff;
                let r = ((al / base) << 8) | (al % base);
                self.reg_write(Register::AX, r);
                self.set_arith(flags::szp(r & 0xff, 1));
                Ok(())
            }
            Mnemonic::Aad => {
                let base = i.immediate8() as u64;
                let al = self.gpr[0] & 0xff;
                let ah = (self.gpr[0] >> 8) & 0xff;
                let r = (al + ah * base) & 0xff;
                self.reg_write(Register::AX, r);
                self.set_arith(flags::szp(r, 1));
                Ok(())
            }
            Mnemonic::Salc => {
                let v = if self.rflags & CF != 0 { 0xff } else { 0 };
                self.reg_write(Register::AL, v);
                Ok(())
            }
            Mnemonic::Lds | Mnemonic::Les | Mnemonic::Lss | Mnemonic::Lfs | Mnemonic::Lgs => {
                if i.op_kind(1) != OpKind::Memory {
                    return Err(Stop::Exc(UD, None));
                }
                let size = self.op_size(i, 0);
                let ea = self.ea(i);
                let seg = i.memory_segment();
                let off = self.read_mem(seg, ea, size)?;
                let sel = self.read_mem(seg, ea.wrapping_add(size as u64), 2)? as u16;
                let sreg = match m {
                    Mnemonic::Lds => Register::DS,
                    Mnemonic::Les => Register::ES,
                    Mnemonic::Lss => Register::SS,
                    Mnemonic::Lfs => Register::FS,
                    _ => Register::GS,
                };
                self.load_data_seg(sreg, sel)?;
                self.reg_write(i.op_register(0), off);
                Ok(())
            }
            Mnemonic::Xlatb => {
                let ea = self.ea(i);
                let v = self.read_mem(i.memory_segment(), ea, 1)?;
                self.reg_write(Register::AL, v);
                Ok(())
            }
            Mnemonic::Bound => {
                if i.op_kind(1) != OpKind::Memory {
                    return Err(Stop::Exc(UD, None));
                }
                let size = self.op_size(i, 0);
                let ea = self.ea(i);
                let seg = i.memory_segment();
                let lo = sext(self.read_mem(seg, ea, size)?, size) as i64;
                let hi = sext(
                    self.read_mem(seg, ea.wrapping_add(size as u64), size)?,
                    size,
                ) as i64;
                let v = sext(self.reg_read(i.op_register(0)), size) as i64;
                if v < lo || v > hi {
                    return Err(Stop::Exc(BR, None));
                }
                Ok(())
            }
            Mnemonic::Arpl => {
                if !self.protected() {
                    return Err(Stop::Exc(UD, None));
                }
                let d = self.read_op(i, 0, 2)?;
                let s = self.reg_read(i.op_register(1));
                if d & 3 < s & 3 {
                    self.write_op(i, 0, 2, (d & !3) | (s & 3))?;
                    self.rflags |= ZF;
                } else {
                    self.rflags &= !ZF;
                }
                Ok(())
            }
            Mnemonic::Lar | Mnemonic::Lsl | Mnemonic::Verr | Mnemonic::Verw => {
                self.access_check_insn(i, m)
            }
            Mnemonic::Smsw => {
                let s = self.op_size(i, 0);
                let v = self.sregs.cr0 & mask(s.min(4));
                self.write_op(i, 0, s, v)
            }
            Mnemonic::Lmsw => {
                self.need_cpl0()?;
                let v = self.read_op(i, 0, 2)? & 0xf;
                // LMSW sets PE but cannot clear it (SDM vol. 2, LMSW).
                let cr0v = self.sregs.cr0;
                let new = (cr0v & !0xe) | v | (cr0v & cr0::PE);
                self.write_cr(0, new)
            }
            Mnemonic::Lldt => {
                self.need_cpl0()?;
                let sel = self.read_op(i, 0, 2)? as u16;
                self.lldt(sel)
            }
            _ => {
                self.note_unimplemented(m);
                Err(Stop::Exc(UD, None))
            }
        }
    }

    /// ENTER imm16, imm8 (SDM vol. 2, ENTER) with 16-, 32- or 64-bit
    /// operand size.
    fn enter(&mut self, i: &Instruction) -> R<()> {
        let size = match i.code() {
            Code::Enterw_imm16_imm8 => 2,
            Code::Enterq_imm16_imm8 => 8,
            _ => 4,
        };
        let alloc = u64::from(i.immediate16());
        let level = u64::from(i.immediate8_2nd()) % 32;
        let sm = self.sp_mask();
        let (old_sp, old_bp) = (self.gpr[4], self.gpr[5]);
        let r = (|| -> R<()> {
            self.push(old_bp & mask(size), size)?;
            let frame = self.gpr[4] & sm;
            if level > 0 {
                let mut bp = old_bp & sm;
                for _ in 1..level {
                    bp = bp.wrapping_sub(size as u64) & sm;
                    let v = self.read_mem(Register::SS, bp, size)?;
                    self.push(v, size)?;
                }
                self.push(frame & mask(size), size)?;
            }
            let reg = match size {
                2 => Register::BP,
                4 => Register::EBP,
                _ => Register::RBP,
            };
            self.reg_write(reg, frame);
            let sp = self.gpr[4].wrapping_sub(alloc) & sm;
            // The allocated frame must fit in SS (#SS(0) otherwise).
            if self.bitness != 64 && sp != self.gpr[4] & sm {
                self.check_segment_access(Register::SS, sp, 1, true)?;
            }
            self.gpr[4] = (self.gpr[4] & !sm) | sp;
            Ok(())
        })();
        if r.is_err() {
            self.gpr[4] = old_sp;
            self.gpr[5] = old_bp;
        }
        r
    }

    /// LAR, LSL, VERR and VERW: ZF says whether the descriptor is visible
    /// at CPL / RPL and of a type the instruction accepts (SDM vol. 2).
    fn access_check_insn(&mut self, i: &Instruction, m: Mnemonic) -> R<()> {
        if !self.protected() {
            return Err(Stop::Exc(UD, None));
        }
        let src = if matches!(m, Mnemonic::Verr | Mnemonic::Verw) {
            0
        } else {
            1
        };
        let sel = self.read_op(i, src, 2)? as u16;
        let Some(raw) = self.peek_descriptor(sel)? else {
            self.rflags &= !ZF;
            return Ok(());
        };
        let d = parse_descriptor(sel, raw);
        let cpl = self.cpl();
        let rpl = (sel & 3) as u8;
        let privileged_ok = d.dpl >= cpl && d.dpl >= rpl;
        let long = self.sregs.long_mode();
        let ok = match m {
            Mnemonic::Lar | Mnemonic::Lsl => {
                let type_ok = if d.s {
                    true
                } else if m == Mnemonic::Lar {
                    if long {
                        matches!(d.type_, 2 | 9 | 0xb | 0xc)
                    } else {
                        matches!(d.type_, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc)
                    }
                } else if long {
                    matches!(d.type_, 2 | 9 | 0xb)
                } else {
                    matches!(d.type_, 1 | 2 | 3 | 9 | 0xb)
                };
                type_ok && ((d.s && conforming(&d)) || privileged_ok)
            }
            Mnemonic::Verr => {
                d.s && (!is_code(&d) || d.type_ & 2 != 0) && (conforming(&d) || privileged_ok)
            }
            _ => d.s && !is_code(&d) && d.type_ & 2 != 0 && privileged_ok,
        };
        self.set_zf(ok);
        if ok && matches!(m, Mnemonic::Lar | Mnemonic::Lsl) {
            let s = self.op_size(i, 0);
            let v = if m == Mnemonic::Lar {
                (raw >> 32) & 0x00f0_ff00 & mask(s)
            } else {
                u64::from(d.limit) & mask(s)
            };
            let reg = i.op_register(0);
            if s == 2 {
                self.reg_write(reg, v);
            } else {
                // A 32-bit (or 64-bit) destination is written whole.
                self.gpr[reg.full_register() as usize - Register::RAX as usize] = v;
            }
        }
        Ok(())
    }
}
