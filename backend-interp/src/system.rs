//! System architecture: segment loads, event delivery through the IDT,
//! IRET, SYSCALL / SYSRET, control registers, MSRs and CPUID.

use iced_x86::Register;
use tandem_core::cpu::{cr0, cr4, efer, msr, Event, EventKind, Segment};
use tandem_core::vcpu::VcpuExit;

use crate::flags::{self, IF, NT, RF, TF, VM};
use crate::{ExtKind, InterpVcpu, Stop, R};

const GP: u8 = 13;
const NP: u8 = 11;
const SS_FAULT: u8 = 12;
const TS: u8 = 10;

/// Whether `la` is canonical with 48-bit linear addresses.
#[inline]
pub fn canonical(la: u64) -> bool {
    ((la as i64) << 16 >> 16) as u64 == la
}

/// Decodes an 8-byte segment descriptor for `selector`.
pub fn parse_descriptor(selector: u16, raw: u64) -> Segment {
    let mut limit = ((raw & 0xffff) | ((raw >> 32) & 0xf_0000)) as u32;
    let g = raw & (1 << 55) != 0;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        selector,
        base: ((raw >> 16) & 0xff_ffff) | (((raw >> 56) & 0xff) << 24),
        limit,
        type_: ((raw >> 40) & 0xf) as u8,
        present: raw & (1 << 47) != 0,
        dpl: ((raw >> 45) & 3) as u8,
        db: raw & (1 << 54) != 0,
        s: raw & (1 << 44) != 0,
        l: raw & (1 << 53) != 0,
        g,
        avl: raw & (1 << 52) != 0,
        unusable: false,
    }
}

/// A null selector's unusable segment.
fn null_segment(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        dpl,
        unusable: true,
        ..Default::default()
    }
}

fn is_code(s: &Segment) -> bool {
    s.type_ & 8 != 0
}
fn conforming(s: &Segment) -> bool {
    s.type_ & 0xc == 0xc
}

impl InterpVcpu {
    pub(crate) fn seg(&self, r: Register) -> &Segment {
        match r {
            Register::ES => &self.sregs.es,
            Register::CS => &self.sregs.cs,
            Register::SS => &self.sregs.ss,
            Register::FS => &self.sregs.fs,
            Register::GS => &self.sregs.gs,
            _ => &self.sregs.ds,
        }
    }

    pub(crate) fn seg_mut(&mut self, r: Register) -> &mut Segment {
        match r {
            Register::ES => &mut self.sregs.es,
            Register::CS => &mut self.sregs.cs,
            Register::SS => &mut self.sregs.ss,
            Register::FS => &mut self.sregs.fs,
            Register::GS => &mut self.sregs.gs,
            _ => &mut self.sregs.ds,
        }
    }

    /// The linear address of `seg:off`. In 64-bit mode only FS and GS have a
    /// base and the address must be canonical (#SS(0) for the stack, #GP(0)
    /// otherwise, SDM vol. 3, 3.3.7.1). Elsewhere the address wraps at
    /// 4 GiB; limits are not checked in this milestone (the runtime's
    /// segments are flat).
    #[inline]
    pub(crate) fn linear(&self, seg: Register, off: u64) -> R<u64> {
        if self.bitness == 64 {
            let la = match seg {
                Register::FS => off.wrapping_add(self.sregs.fs.base),
                Register::GS => off.wrapping_add(self.sregs.gs.base),
                _ => off,
            };
            if !canonical(la) {
                return Err(Stop::Exc(
                    if seg == Register::SS { SS_FAULT } else { GP },
                    Some(0),
                ));
            }
            Ok(la)
        } else {
            Ok(self.seg(seg).base.wrapping_add(off) & 0xffff_ffff)
        }
    }

    pub(crate) fn read_mem(&mut self, seg: Register, off: u64, size: usize) -> R<u64> {
        let la = self.linear(seg, off)?;
        let user = self.cpl() == 3;
        self.lin_read(la, size, user)
    }

    pub(crate) fn write_mem(&mut self, seg: Register, off: u64, size: usize, v: u64) -> R<()> {
        let la = self.linear(seg, off)?;
        let user = self.cpl() == 3;
        self.lin_write(la, size, v, user)
    }

    /// Reads the GDT descriptor of `sel` (no LDT: a TI=1 selector faults),
    /// raising `#GP(sel)` (plus `ext`) beyond the GDT limit.
    fn descriptor(&mut self, sel: u16, ext: u32) -> R<u64> {
        let err = Some(u32::from(sel & 0xfffc) | ext);
        if sel & 4 != 0 {
            return Err(Stop::Exc(GP, err));
        }
        let off = u64::from(sel & 0xfff8);
        if off + 7 > u64::from(self.sregs.gdt.limit) {
            return Err(Stop::Exc(GP, err));
        }
        let la = self.sregs.gdt.base.wrapping_add(off);
        self.system_read(la, 8)
    }

    /// A supervisor (implicit) read of a system structure. Structures must
    /// be in RAM: an IDT, GDT or TSS in MMIO ends the run.
    pub(crate) fn system_read(&mut self, la: u64, size: usize) -> R<u64> {
        match self.lin_read(la, size, false) {
            Err(Stop::Exit(_)) => Err(Stop::Exit(VcpuExit::Unhandled(format!(
                "a descriptor table or TSS at linear {la:#x} is not in RAM"
            )))),
            r => r,
        }
    }

    /// Checks a data / stack segment load of `sel` into `reg` at privilege
    /// `cpl` (SDM vol. 2, MOV: "Operation" for protected mode) and returns
    /// the segment to load.
    pub(crate) fn check_data_seg(&mut self, reg: Register, sel: u16, cpl: u8) -> R<Segment> {
        if self.sregs.cr0 & cr0::PE == 0 {
            return Ok(Segment::real_mode(sel, false));
        }
        let rpl = (sel & 3) as u8;
        let err = Some(u32::from(sel & 0xfffc));
        if sel & 0xfffc == 0 {
            if reg == Register::SS {
                // A null SS is allowed in 64-bit mode below CPL 3 with RPL = CPL.
                if self.sregs.long_mode() && cpl != 3 && rpl == cpl {
                    return Ok(null_segment(sel, cpl));
                }
                return Err(Stop::Exc(GP, Some(0)));
            }
            return Ok(null_segment(sel, 0));
        }
        let raw = self.descriptor(sel, 0)?;
        let s = parse_descriptor(sel, raw);
        if reg == Register::SS {
            let writable_data = s.s && !is_code(&s) && s.type_ & 2 != 0;
            if !writable_data || rpl != cpl || s.dpl != cpl {
                return Err(Stop::Exc(GP, err));
            }
            if !s.present {
                return Err(Stop::Exc(SS_FAULT, err));
            }
        } else {
            let readable = s.s && (!is_code(&s) || s.type_ & 2 != 0);
            if !readable || (!conforming(&s) && (s.dpl < cpl || s.dpl < rpl)) {
                return Err(Stop::Exc(GP, err));
            }
            if !s.present {
                return Err(Stop::Exc(NP, err));
            }
        }
        let mut s = s;
        self.mark_accessed(sel, raw, &mut s)?;
        Ok(s)
    }

    /// Sets the accessed bit of a code or data descriptor being loaded, as
    /// the processor does (SDM vol. 3, 3.4.5.1), so that guest memory stays
    /// the same as on hardware.
    fn mark_accessed(&mut self, sel: u16, raw: u64, s: &mut Segment) -> R<()> {
        if raw & (1 << 40) == 0 {
            let la = self
                .sregs
                .gdt
                .base
                .wrapping_add(u64::from(sel & 0xfff8) + 5);
            self.lin_write(la, 1, ((raw >> 40) & 0xff) | 1, false)
                .map_err(|e| self.system_fault(e))?;
            s.type_ |= 1;
        }
        Ok(())
    }

    /// MOV / POP to a data or stack segment register.
    pub(crate) fn load_data_seg(&mut self, reg: Register, sel: u16) -> R<()> {
        let s = self.check_data_seg(reg, sel, self.cpl())?;
        *self.seg_mut(reg) = s;
        Ok(())
    }

    /// Checks a code segment `sel` as the target of a far JMP / RET at CPL
    /// `cpl` (no call gates or task switches) and returns it with its RPL
    /// and DPL set to the new CPL.
    fn check_code_seg(&mut self, sel: u16, cpl: u8, ext: u32) -> R<Segment> {
        if sel & 0xfffc == 0 {
            return Err(Stop::Exc(GP, Some(ext)));
        }
        let err = Some(u32::from(sel & 0xfffc) | ext);
        let raw = self.descriptor(sel, ext)?;
        let mut s = parse_descriptor(sel, raw);
        if !s.s || !is_code(&s) {
            return Err(Stop::Exc(GP, err));
        }
        if conforming(&s) {
            if s.dpl > cpl {
                return Err(Stop::Exc(GP, err));
            }
        } else if s.dpl != cpl {
            return Err(Stop::Exc(GP, err));
        }
        if self.sregs.long_mode() && s.l && s.db {
            return Err(Stop::Exc(GP, err));
        }
        if !s.present {
            return Err(Stop::Exc(NP, err));
        }
        self.mark_accessed(sel, raw, &mut s)?;
        s.selector = (sel & 0xfffc) | u16::from(cpl);
        s.dpl = cpl;
        Ok(s)
    }

    /// JMP ptr16:32 / JMP m16:32 to a code segment at the same privilege.
    pub(crate) fn far_jump(&mut self, sel: u16, off: u64) -> R<()> {
        if self.sregs.cr0 & cr0::PE == 0 {
            self.sregs.cs = Segment::real_mode(sel, true);
            self.rip = off & 0xffff;
            self.mode_changed();
            return Ok(());
        }
        let rpl = (sel & 3) as u8;
        if rpl > self.cpl() {
            return Err(Stop::Exc(GP, Some(u32::from(sel & 0xfffc))));
        }
        let cs = self.check_code_seg(sel, self.cpl(), 0)?;
        self.sregs.cs = cs;
        self.mode_changed();
        self.rip = if self.bitness == 64 {
            off
        } else {
            off & 0xffff_ffff
        };
        Ok(())
    }

    /// A TSS field (`off` bytes into the TSS).
    fn tss_read(&mut self, off: u64, size: usize, ext: u32) -> R<u64> {
        let tr = self.sregs.tr;
        if tr.unusable || off + size as u64 - 1 > u64::from(tr.limit) {
            return Err(Stop::Exc(TS, Some(u32::from(tr.selector & 0xfffc) | ext)));
        }
        self.system_read(tr.base.wrapping_add(off), size)
    }

    /// Delivers `ev` through the IDT (SDM vol. 3, 6.12 and 6.14). The return
    /// address is the current RIP (plus the instruction length for an
    /// injected software event).
    pub(crate) fn deliver(&mut self, ev: &Event) -> R<()> {
        let soft = matches!(
            ev.kind,
            EventKind::SoftwareInterrupt | EventKind::SoftwareException
        );
        let ext: u32 = u32::from(!soft && ev.kind != EventKind::PrivilegedSoftwareException);
        let ret_rip = if matches!(
            ev.kind,
            EventKind::SoftwareInterrupt
                | EventKind::SoftwareException
                | EventKind::PrivilegedSoftwareException
        ) {
            self.rip.wrapping_add(u64::from(ev.instruction_len))
        } else {
            self.rip
        };
        if ev.kind == EventKind::Nmi {
            self.nmi_blocked = true;
        }
        if self.sregs.cr0 & cr0::PE == 0 {
            return self.deliver_real(ev.vector, ret_rip);
        }
        let vec = u64::from(ev.vector);
        let gate_err = Some((ev.vector as u32) * 8 + 2 + ext);
        let long = self.sregs.long_mode();
        let gate_size = if long { 16 } else { 8 };
        if vec * gate_size + gate_size - 1 > u64::from(self.sregs.idt.limit) {
            return Err(Stop::Exc(GP, gate_err));
        }
        let gla = self.sregs.idt.base.wrapping_add(vec * gate_size);
        let lo = self.system_read(gla, 8)?;
        let hi = if long {
            self.system_read(gla.wrapping_add(8), 8)?
        } else {
            0
        };
        let gtype = ((lo >> 40) & 0xf) as u8;
        let gdpl = ((lo >> 45) & 3) as u8;
        let cpl = self.cpl();
        // Interrupt and trap gates only (32-bit ones outside long mode, 64-bit
        // ones in it); task gates are not built.
        let valid = gtype == 0xe || gtype == 0xf;
        if !valid {
            return Err(Stop::Exc(GP, gate_err));
        }
        if soft && gdpl < cpl {
            return Err(Stop::Exc(GP, Some((ev.vector as u32) * 8 + 2)));
        }
        if lo & (1 << 47) == 0 {
            return Err(Stop::Exc(NP, gate_err));
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let mut offset = (lo & 0xffff) | (((lo >> 48) & 0xffff) << 16);
        if long {
            offset |= (hi & 0xffff_ffff) << 32;
        }
        let ist = if long { (lo >> 32) & 7 } else { 0 };

        // Target code segment (SDM vol. 3, 6.12.1.1).
        if sel & 0xfffc == 0 {
            return Err(Stop::Exc(GP, Some(ext)));
        }
        let cerr = Some(u32::from(sel & 0xfffc) | ext);
        let raw = self.descriptor(sel, ext)?;
        let mut cs = parse_descriptor(sel, raw);
        if !cs.s || !is_code(&cs) || cs.dpl > cpl || (long && (!cs.l || cs.db)) {
            return Err(Stop::Exc(GP, cerr));
        }
        if !cs.present {
            return Err(Stop::Exc(NP, cerr));
        }
        self.mark_accessed(sel, raw, &mut cs)?;
        let new_cpl = if conforming(&cs) { cpl } else { cs.dpl };
        cs.selector = (sel & 0xfffc) | u16::from(new_cpl);
        cs.dpl = new_cpl;

        let old_rflags = self.rflags;
        let old_cs = self.sregs.cs.selector;
        let old_ss = self.sregs.ss.selector;
        let old_rsp = self.gpr[4];
        let user = new_cpl == 3;

        if long {
            let mut rsp = if ist != 0 {
                self.tss_read(0x24 + (ist - 1) * 8, 8, ext)?
            } else if new_cpl < cpl {
                self.tss_read(4 + u64::from(new_cpl) * 8, 8, ext)?
            } else {
                old_rsp
            };
            rsp &= !0xf;
            let mut frame = [0u64; 6];
            let mut n = 0;
            if let Some(e) = ev.error_code {
                frame[n] = u64::from(e);
                n += 1;
            }
            for v in [
                ret_rip,
                u64::from(old_cs),
                old_rflags,
                old_rsp,
                u64::from(old_ss),
            ] {
                frame[n] = v;
                n += 1;
            }
            let top = rsp.wrapping_sub(8 * n as u64);
            if !canonical(top) || !canonical(rsp.wrapping_sub(1)) {
                return Err(Stop::Exc(SS_FAULT, Some(ext)));
            }
            for (i, v) in frame[..n].iter().enumerate() {
                self.lin_write(top.wrapping_add(8 * i as u64), 8, *v, user)
                    .map_err(|e| self.system_fault(e))?;
            }
            if new_cpl != cpl {
                self.sregs.ss = null_segment(u16::from(new_cpl), new_cpl);
            }
            self.gpr[4] = top;
        } else {
            // 32-bit gates: the stack switch reads SS0:ESP0 from a 32-bit TSS.
            let (ss, mut esp, switch) = if new_cpl < cpl {
                let esp = self.tss_read(4 + u64::from(new_cpl) * 8, 4, ext)?;
                let ss_sel = self.tss_read(8 + u64::from(new_cpl) * 8, 2, ext)? as u16;
                let ss =
                    self.check_data_seg(Register::SS, ss_sel, new_cpl)
                        .map_err(|e| match e {
                            Stop::Exc(_, _) => {
                                Stop::Exc(TS, Some(u32::from(ss_sel & 0xfffc) | ext))
                            }
                            other => other,
                        })?;
                (ss, esp, true)
            } else {
                (self.sregs.ss, old_rsp & 0xffff_ffff, false)
            };
            let mut push = |me: &mut InterpVcpu, v: u64| -> R<()> {
                esp = esp.wrapping_sub(4) & 0xffff_ffff;
                let la = ss.base.wrapping_add(esp) & 0xffff_ffff;
                me.lin_write(la, 4, v, user)
            };
            if switch {
                push(self, u64::from(old_ss))?;
                push(self, old_rsp & 0xffff_ffff)?;
            }
            push(self, old_rflags & 0xffff_ffff)?;
            push(self, u64::from(old_cs))?;
            push(self, ret_rip & 0xffff_ffff)?;
            if let Some(e) = ev.error_code {
                push(self, u64::from(e))?;
            }
            self.sregs.ss = ss;
            self.gpr[4] = (old_rsp & !0xffff_ffff) | esp;
            if switch {
                self.gpr[4] = esp;
            }
        }
        self.rflags &= !(TF | NT | RF | VM);
        if gtype == 0xe {
            self.rflags &= !IF;
        }
        self.sregs.cs = cs;
        self.mode_changed();
        self.rip = if long { offset } else { offset & 0xffff_ffff };
        Ok(())
    }

    /// Faults while pushing a frame keep their vector; an exit becomes an
    /// end of the run (a stack outside RAM during delivery).
    fn system_fault(&self, e: Stop) -> Stop {
        match e {
            Stop::Exit(_) => Stop::Exit(VcpuExit::Unhandled(
                "a system write (exception frame, descriptor) would go outside RAM".to_string(),
            )),
            other => other,
        }
    }

    /// Real-mode delivery through the IVT (SDM vol. 3, 20.1.4).
    fn deliver_real(&mut self, vector: u8, ret_rip: u64) -> R<()> {
        let ivt = self.sregs.idt.base.wrapping_add(u64::from(vector) * 4);
        let ent = self.system_read(ivt, 4)?;
        let mut sp = self.gpr[4] & 0xffff;
        let ss_base = self.sregs.ss.base;
        for v in [
            self.rflags & 0xffff,
            u64::from(self.sregs.cs.selector),
            ret_rip & 0xffff,
        ] {
            sp = sp.wrapping_sub(2) & 0xffff;
            self.lin_write(ss_base.wrapping_add(sp), 2, v, false)?;
        }
        self.gpr[4] = (self.gpr[4] & !0xffff) | sp;
        self.rflags &= !(IF | TF | flags::AC | RF);
        self.sregs.cs = Segment::real_mode((ent >> 16) as u16, true);
        self.rip = ent & 0xffff;
        self.mode_changed();
        Ok(())
    }

    /// IRET with operand size `size` (SDM vol. 2, IRET: protected and
    /// IA-32e mode returns without task switches or virtual-8086 mode).
    pub(crate) fn iret(&mut self, size: usize) -> R<()> {
        let cpl = self.cpl();
        let sp = self.gpr[4];
        let stack_addr = |me: &InterpVcpu, i: u64| -> R<u64> {
            let off = sp.wrapping_add(i * size as u64);
            let off = if me.bitness == 64 {
                off
            } else {
                off & 0xffff_ffff
            };
            me.linear(Register::SS, off)
        };
        let user = cpl == 3;
        let pop = |me: &mut InterpVcpu, i: u64| -> R<u64> {
            let la = stack_addr(me, i)?;
            me.lin_read(la, size, user)
        };
        let new_rip = pop(self, 0)?;
        let new_cs = pop(self, 1)? as u16;
        let new_flags = pop(self, 2)?;
        if self.sregs.cr0 & cr0::PE == 0 {
            self.sregs.cs = Segment::real_mode(new_cs, true);
            self.rip = new_rip & 0xffff;
            self.set_rflags_from_pop(new_flags, size, 0);
            self.gpr[4] = sp.wrapping_add(3 * size as u64) & 0xffff | (sp & !0xffff);
            self.nmi_blocked = false;
            self.mode_changed();
            return Ok(());
        }
        let rpl = (new_cs & 3) as u8;
        if rpl < cpl {
            return Err(Stop::Exc(GP, Some(u32::from(new_cs & 0xfffc))));
        }
        let cs = self.check_code_seg(new_cs, rpl, 0)?;
        let long_target = self.sregs.long_mode() && cs.l;
        let outer = rpl > cpl || self.bitness == 64;
        let (new_rsp, ss) = if outer {
            let rsp = pop(self, 3)?;
            let ss_sel = pop(self, 4)? as u16;
            let ss = self.check_data_seg(Register::SS, ss_sel, rpl)?;
            (rsp, Some(ss))
        } else {
            (sp.wrapping_add(3 * size as u64), None)
        };
        if long_target && !canonical(new_rip) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        // Commit.
        self.set_rflags_from_pop(new_flags, size, cpl);
        self.sregs.cs = cs;
        if let Some(ss) = ss {
            self.sregs.ss = ss;
        }
        self.gpr[4] = if size == 4 && !long_target && ss.is_none() {
            (self.gpr[4] & !0xffff_ffff) | (new_rsp & 0xffff_ffff)
        } else {
            new_rsp
        };
        self.rip = if long_target {
            new_rip
        } else {
            new_rip & 0xffff_ffff
        };
        if rpl > cpl {
            // Data segments the new CPL may not use become null (SDM IRET).
            for r in [Register::ES, Register::DS, Register::FS, Register::GS] {
                let s = *self.seg(r);
                if !s.unusable && (!is_code(&s) || !conforming(&s)) && s.dpl < rpl {
                    let sel = s.selector;
                    let base = s.base;
                    let mut n = null_segment(sel & 3, 0);
                    if matches!(r, Register::FS | Register::GS) {
                        n.base = base;
                    }
                    *self.seg_mut(r) = n;
                }
            }
        }
        self.nmi_blocked = false;
        self.mode_changed();
        Ok(())
    }

    /// Loads RFLAGS from a POPF / IRET image, keeping what `cpl` may not
    /// change (IOPL below CPL 0, IF above IOPL; VM, VIP, VIF untouched).
    pub(crate) fn set_rflags_from_pop(&mut self, v: u64, size: usize, cpl: u8) {
        let iopl = ((self.rflags & flags::IOPL) >> 12) as u8;
        let mut changeable =
            flags::ARITH | TF | IF | flags::DF | flags::IOPL | NT | flags::AC | flags::ID | RF;
        if cpl > 0 {
            changeable &= !flags::IOPL;
        }
        if cpl > iopl {
            changeable &= !IF;
        }
        changeable &= flags::mask(size);
        self.rflags =
            (self.rflags & !changeable) | (v & changeable) | tandem_core::cpu::rflags::FIXED1;
    }

    /// SYSCALL (SDM vol. 2): 64-bit mode only in this milestone.
    pub(crate) fn syscall(&mut self) -> R<()> {
        if self.sregs.efer & efer::SCE == 0 || !self.sregs.long_mode() {
            return Err(Stop::Exc(6, None));
        }
        let sel = ((self.msr.star >> 32) & 0xfffc) as u16;
        self.gpr[1] = self.rip;
        self.gpr[11] = self.rflags & !RF;
        self.rflags &= !(self.msr.fmask | RF);
        self.rflags |= tandem_core::cpu::rflags::FIXED1;
        let mut cs = Segment::flat(sel, 0xb, true);
        cs.dpl = 0;
        let ss = Segment::flat(sel + 8, 0x3, false);
        self.sregs.cs = cs;
        self.sregs.ss = ss;
        self.rip = if self.bitness == 64 || self.sregs.long_mode() {
            self.msr.lstar
        } else {
            self.msr.cstar
        };
        self.mode_changed();
        Ok(())
    }

    /// SYSRET (SDM vol. 2); `size` 8 returns to 64-bit mode, 4 to
    /// compatibility mode.
    pub(crate) fn sysret(&mut self, size: usize) -> R<()> {
        if self.sregs.efer & efer::SCE == 0 || !self.sregs.long_mode() {
            return Err(Stop::Exc(6, None));
        }
        if self.cpl() != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let base = ((self.msr.star >> 48) & 0xffff) as u16;
        let rcx = self.gpr[1];
        if size == 8 && !canonical(rcx) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let mut cs = if size == 8 {
            Segment::flat(base.wrapping_add(16) | 3, 0xb, true)
        } else {
            Segment::flat(base | 3, 0xb, false)
        };
        cs.dpl = 3;
        let mut ss = Segment::flat(base.wrapping_add(8) | 3, 0x3, false);
        ss.dpl = 3;
        self.rflags = (self.gpr[11] & 0x3c_7fd7) | tandem_core::cpu::rflags::FIXED1;
        self.rip = if size == 8 { rcx } else { rcx & 0xffff_ffff };
        self.sregs.cs = cs;
        self.sregs.ss = ss;
        self.mode_changed();
        Ok(())
    }

    /// MOV to CR0 / CR2 / CR3 / CR4 / CR8 (SDM vol. 3, 2.5 and the MOV CR
    /// reserved-bit rules).
    pub(crate) fn write_cr(&mut self, n: u32, v: u64) -> R<()> {
        let gp = Err(Stop::Exc(GP, Some(0)));
        match n {
            0 => {
                if v >> 32 != 0 {
                    return gp;
                }
                let v = v | cr0::ET;
                if v & cr0::PG != 0 && v & cr0::PE == 0 {
                    return gp;
                }
                if v & cr0::NW != 0 && v & cr0::CD == 0 {
                    return gp;
                }
                let lme = self.sregs.efer & efer::LME != 0;
                if v & cr0::PG != 0 && self.sregs.cr0 & cr0::PG == 0 && lme {
                    if self.sregs.cr4 & cr4::PAE == 0 {
                        return gp;
                    }
                    self.sregs.efer |= efer::LMA;
                }
                if v & cr0::PG == 0 {
                    if self.bitness == 64 {
                        return gp;
                    }
                    self.sregs.efer &= !efer::LMA;
                }
                self.sregs.cr0 = v;
                self.paging_changed();
                self.mode_changed();
            }
            2 => self.sregs.cr2 = v,
            3 => {
                self.sregs.cr3 = if self.sregs.long_mode() {
                    v
                } else {
                    v & 0xffff_ffff
                };
                self.paging_changed();
            }
            4 => {
                // VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT
                // UMIP FSGSBASE.
                let allowed = 0x7ff | (1 << 11) | (1 << 16);
                if v & !allowed != 0 {
                    return gp;
                }
                if self.sregs.long_mode() && v & cr4::PAE == 0 {
                    return gp;
                }
                self.sregs.cr4 = v;
                self.paging_changed();
            }
            8 => {
                if v & !0xf != 0 {
                    return gp;
                }
                self.cr8 = v;
            }
            _ => return Err(Stop::Exc(6, None)),
        }
        Ok(())
    }

    pub(crate) fn read_cr(&self, n: u32) -> R<u64> {
        Ok(match n {
            0 => self.sregs.cr0,
            2 => self.sregs.cr2,
            3 => self.sregs.cr3,
            4 => self.sregs.cr4,
            8 => self.cr8,
            _ => return Err(Stop::Exc(6, None)),
        })
    }

    /// The TSC: instructions retired plus the offset a WRMSR to IA32_TSC
    /// set. Counting instructions (not host time) makes a run reproducible.
    pub(crate) fn tsc(&self) -> u64 {
        self.retired.wrapping_add(self.msr.tsc_offset)
    }

    /// MSRs the machine owns (the LAPIC's): they leave the processor.
    fn machine_msr(index: u32) -> bool {
        index == msr::IA32_APIC_BASE
            || index == msr::IA32_TSC_DEADLINE
            || (msr::X2APIC_FIRST..=msr::X2APIC_LAST).contains(&index)
    }

    /// The interpreter's own MSRs; `None` for one it does not have.
    pub(crate) fn own_msr_read(&self, index: u32) -> Option<u64> {
        let m = &self.msr;
        Some(match index {
            msr::IA32_TSC => self.tsc(),
            msr::IA32_SYSENTER_CS => m.sysenter_cs,
            msr::IA32_SYSENTER_ESP => m.sysenter_esp,
            msr::IA32_SYSENTER_EIP => m.sysenter_eip,
            msr::IA32_PAT => m.pat,
            msr::IA32_EFER => self.sregs.efer,
            msr::IA32_STAR => m.star,
            msr::IA32_LSTAR => m.lstar,
            msr::IA32_CSTAR => m.cstar,
            msr::IA32_FMASK => m.fmask,
            msr::IA32_FS_BASE => self.sregs.fs.base,
            msr::IA32_GS_BASE => self.sregs.gs.base,
            msr::IA32_KERNEL_GS_BASE => m.kernel_gs_base,
            msr::IA32_TSC_AUX => m.tsc_aux,
            0x1a0 => m.misc_enable,
            0x8b => 0,
            0xfe => 0,
            _ => return None,
        })
    }

    /// Writes one of the interpreter's MSRs; false raises #GP(0).
    pub(crate) fn own_msr_write(&mut self, index: u32, v: u64) -> bool {
        let addr_ok = canonical(v);
        match index {
            msr::IA32_TSC => self.msr.tsc_offset = v.wrapping_sub(self.retired),
            msr::IA32_SYSENTER_CS => self.msr.sysenter_cs = v & 0xffff,
            msr::IA32_SYSENTER_ESP if addr_ok => self.msr.sysenter_esp = v,
            msr::IA32_SYSENTER_EIP if addr_ok => self.msr.sysenter_eip = v,
            msr::IA32_PAT => self.msr.pat = v,
            msr::IA32_EFER => {
                let allowed = efer::SCE | efer::LME | efer::LMA | efer::NXE;
                if v & !allowed != 0 {
                    return false;
                }
                let lme_change = (v ^ self.sregs.efer) & efer::LME != 0;
                if lme_change && self.sregs.cr0 & cr0::PG != 0 {
                    return false;
                }
                // LMA is the processor's: a write cannot change it.
                self.sregs.efer = (v & !efer::LMA) | (self.sregs.efer & efer::LMA);
                self.paging_changed();
            }
            msr::IA32_STAR => self.msr.star = v,
            msr::IA32_LSTAR if addr_ok => self.msr.lstar = v,
            msr::IA32_CSTAR if addr_ok => self.msr.cstar = v,
            msr::IA32_FMASK => self.msr.fmask = v & 0xffff_ffff,
            msr::IA32_FS_BASE if addr_ok => self.sregs.fs.base = v,
            msr::IA32_GS_BASE if addr_ok => self.sregs.gs.base = v,
            msr::IA32_KERNEL_GS_BASE if addr_ok => self.msr.kernel_gs_base = v,
            msr::IA32_TSC_AUX => self.msr.tsc_aux = v & 0xffff_ffff,
            0x1a0 => self.msr.misc_enable = v,
            _ => return false,
        }
        true
    }

    /// RDMSR: ECX selects, EDX:EAX receives.
    pub(crate) fn rdmsr(&mut self) -> R<()> {
        if self.cpl() != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let index = self.gpr[1] as u32;
        let v = if Self::machine_msr(index) {
            let (v, ok) = self.external(ExtKind::RdMsr, u64::from(index), 8, 0)?;
            if !ok {
                return Err(Stop::Exc(GP, Some(0)));
            }
            v
        } else {
            self.own_msr_read(index).ok_or(Stop::Exc(GP, Some(0)))?
        };
        self.gpr[0] = v & 0xffff_ffff;
        self.gpr[2] = v >> 32;
        Ok(())
    }

    /// WRMSR: ECX selects, EDX:EAX is the value.
    pub(crate) fn wrmsr(&mut self) -> R<()> {
        if self.cpl() != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let index = self.gpr[1] as u32;
        let v = (self.gpr[0] & 0xffff_ffff) | (self.gpr[2] << 32);
        if Self::machine_msr(index) {
            let (_, ok) = self.external(ExtKind::WrMsr, u64::from(index), 8, v)?;
            if !ok {
                return Err(Stop::Exc(GP, Some(0)));
            }
            return Ok(());
        }
        if self.own_msr_write(index, v) {
            Ok(())
        } else {
            Err(Stop::Exc(GP, Some(0)))
        }
    }

    /// CPUID as a modern Intel processor limited to what the interpreter
    /// implements: no x87 / SSE state (so no FXSR / XSAVE), no SYSENTER;
    /// CMPXCHG8B / CMPXCHG16B; x2APIC
    /// and TSC-deadline because Tandem's LAPIC has them.
    pub(crate) fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let _ = sub;
        match leaf {
            0 => [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            1 => {
                // Family 6, model 0x55-like signature; TSC(4) MSR(5) PAE(6)
                // CX8(8) APIC(9) PGE(13) CMOV(15) PAT(16) PSE(3).
                let edx = (1 << 3)
                    | (1 << 4)
                    | (1 << 5)
                    | (1 << 6)
                    | (1 << 8)
                    | (1 << 9)
                    | (1 << 13)
                    | (1 << 15)
                    | (1 << 16);
                // CX16(13) x2APIC(21) TSC-deadline(24).
                let ecx = (1 << 13) | (1 << 21) | (1 << 24);
                let ebx = (self.id << 24) | (1 << 16) | (8 << 8);
                [0x0005_0654, ebx, ecx, edx]
            }
            0x8000_0000 => [0x8000_0008, 0, 0, 0],
            // SYSCALL(11) NX(20) 1 GiB pages(26) LM(29).
            0x8000_0001 => [0, 0, 0, (1 << 11) | (1 << 20) | (1 << 26) | (1 << 29)],
            0x8000_0008 => [0x3000 | crate::mmu::MAXPHYADDR, 0, 0, 0],
            _ => [0; 4],
        }
    }
}
