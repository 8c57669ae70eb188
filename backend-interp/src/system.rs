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
/// IA32_PKRS: protection-key rights for supervisor-mode pages (SDM vol. 3,
/// 4.6.2).
const IA32_PKRS: u32 = 0x6e1;

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
pub(crate) fn null_segment(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        dpl,
        unusable: true,
        ..Default::default()
    }
}

pub(crate) fn is_code(s: &Segment) -> bool {
    s.type_ & 8 != 0
}
pub(crate) fn conforming(s: &Segment) -> bool {
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
    /// 4 GiB (A20 is always on). Limits and types are checked by
    /// `read_mem` / `write_mem` (`check_segment_access` in `legacy.rs`).
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

    #[inline]
    pub(crate) fn read_mem(&mut self, seg: Register, off: u64, size: usize) -> R<u64> {
        if self.bitness != 64 {
            self.check_segment_access(seg, off, size, false)?;
        }
        let la = self.linear(seg, off)?;
        let user = self.cpl() == 3;
        self.lin_read(la, size, user)
    }

    #[inline]
    pub(crate) fn write_mem(&mut self, seg: Register, off: u64, size: usize, v: u64) -> R<()> {
        if self.bitness != 64 {
            self.check_segment_access(seg, off, size, true)?;
        }
        let la = self.linear(seg, off)?;
        let user = self.cpl() == 3;
        self.lin_write(la, size, v, user)
    }

    /// Reads the GDT or LDT descriptor of `sel`,
    /// raising `#GP(sel)` (plus `ext`) beyond the GDT limit.
    pub(crate) fn descriptor(&mut self, sel: u16, ext: u32) -> R<u64> {
        let err = Some(u32::from(sel & 0xfffc) | ext);
        let (base, limit) = if sel & 4 != 0 {
            // TI=1: the LDT (a null LDTR faults).
            if self.sregs.ldt.unusable {
                return Err(Stop::Exc(GP, err));
            }
            (self.sregs.ldt.base, u64::from(self.sregs.ldt.limit))
        } else {
            (self.sregs.gdt.base, u64::from(self.sregs.gdt.limit))
        };
        let off = u64::from(sel & 0xfff8);
        if off + 7 > limit {
            return Err(Stop::Exc(GP, err));
        }
        let la = base.wrapping_add(off);
        self.system_read(la, 8)
    }

    /// A supervisor (implicit) read of a system structure. Structures must
    /// be in RAM: an IDT, GDT or TSS in MMIO ends the run.
    pub(crate) fn system_read(&mut self, la: u64, size: usize) -> R<u64> {
        match self.implicit_access(|me| me.lin_read(la, size, false)) {
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
        // Real mode, or a load by virtual-8086 code (CPL 3; the ring-0
        // stack of an interrupt from virtual-8086 mode is a protected-mode
        // load): no descriptor.
        if self.sregs.cr0 & cr0::PE == 0 || (self.rflags & VM != 0 && cpl == 3) {
            return Ok(self.real_mode_segment(reg, sel));
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
    pub(crate) fn mark_accessed(&mut self, sel: u16, raw: u64, s: &mut Segment) -> R<()> {
        if raw & (1 << 40) == 0 {
            let table = if sel & 4 != 0 {
                self.sregs.ldt.base
            } else {
                self.sregs.gdt.base
            };
            let la = table.wrapping_add(u64::from(sel & 0xfff8) + 5);
            self.implicit_access(|me| me.lin_write(la, 1, ((raw >> 40) & 0xff) | 1, false))
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
    pub(crate) fn check_code_seg(&mut self, sel: u16, cpl: u8, ext: u32) -> R<Segment> {
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

    /// JMP ptr16:16/32 / JMP m16:16/32/64: real mode, a code segment at the
    /// same privilege, or a call gate (see `legacy.rs`).
    pub(crate) fn far_jump(&mut self, sel: u16, off: u64) -> R<()> {
        if !self.protected() {
            // Real mode: the offset is checked against the cached limit
            // (SDM vol. 2, JMP: "IF tempEIP is beyond code segment limit").
            let cs = self.real_mode_segment(Register::CS, sel);
            if off > u64::from(cs.limit) {
                return Err(Stop::Exc(GP, Some(0)));
            }
            self.sregs.cs = cs;
            self.rip = off;
            self.mode_changed();
            return Ok(());
        }
        let rpl = (sel & 3) as u8;
        if sel & 0xfffc != 0 {
            let raw = self.descriptor(sel, 0)?;
            if raw & (1 << 44) == 0 {
                // A call gate, TSS or task gate.
                return self.far_to_system(sel, raw, false);
            }
            // A non-conforming target needs RPL <= CPL (SDM vol. 2, JMP).
            if !conforming(&parse_descriptor(sel, raw)) && rpl > self.cpl() {
                return Err(Stop::Exc(GP, Some(u32::from(sel & 0xfffc))));
            }
        }
        let cs = self.check_code_seg(sel, self.cpl(), 0)?;
        if !(self.sregs.long_mode() && cs.l) && off > u64::from(cs.limit) {
            return Err(Stop::Exc(GP, Some(0)));
        }
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
    pub(crate) fn tss_read(&mut self, off: u64, size: usize, ext: u32) -> R<u64> {
        let tr = self.sregs.tr;
        if tr.unusable || off + size as u64 - 1 > u64::from(tr.limit) {
            return Err(Stop::Exc(TS, Some(u32::from(tr.selector & 0xfffc) | ext)));
        }
        self.system_read(tr.base.wrapping_add(off), size)
    }

    /// Delivers `ev` (`deliver_event`) with the data breakpoint rules: the
    /// accesses of the delivery itself (IDT, GDT, TSS, stack frame) make no
    /// data breakpoint trap here, and a #DB exception (not INT 1) reports
    /// the hits a MOV SS shadow held in its DR6.B0-B3, as it is the #DB
    /// they were waiting for.
    pub(crate) fn deliver(&mut self, ev: &Event) -> R<()> {
        let mut held = self.db_hits;
        if held != 0
            && ev.vector == 1
            && matches!(
                ev.kind,
                EventKind::HardwareException | EventKind::PrivilegedSoftwareException
            )
        {
            self.dr.dr6 = (self.dr.dr6 & !0xf) | held;
            held = 0;
        }
        let r = self.deliver_event(ev);
        self.db_hits = held;
        r
    }

    /// Delivers `ev` through the IDT (SDM vol. 3, 6.12 and 6.14). The return
    /// address is the current RIP (plus the instruction length for an
    /// injected software event).
    fn deliver_event(&mut self, ev: &Event) -> R<()> {
        self.events_delivered = self.events_delivered.wrapping_add(1);
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
        let v86 = self.rflags & VM != 0;
        if v86
            && ev.kind == EventKind::SoftwareInterrupt
            && self.rflags & flags::IOPL != flags::IOPL
        {
            // INT n is IOPL-sensitive in virtual-8086 mode (no CR4.VME).
            return Err(Stop::Exc(GP, Some(0)));
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
        // Interrupt and trap gates: 64-bit ones in long mode, 16-bit (6, 7)
        // and 32-bit (14, 15) ones outside it, where a task gate (5) is
        // valid too.
        let valid = gtype == 0xe || gtype == 0xf || (!long && matches!(gtype, 5..=7));
        if !valid {
            return Err(Stop::Exc(GP, gate_err));
        }
        if soft && gdpl < cpl {
            return Err(Stop::Exc(GP, Some((ev.vector as u32) * 8 + 2)));
        }
        if lo & (1 << 47) == 0 {
            return Err(Stop::Exc(NP, gate_err));
        }
        if gtype == 5 {
            // A task gate: the handler is another task (SDM vol. 3, 6.12.2).
            let tss_sel = ((lo >> 16) & 0xffff) as u16;
            let raw = self.task_gate_target(tss_sel, ext)?;
            return self.task_switch(
                tss_sel,
                raw,
                crate::legacy::TaskSwitch::Interrupt,
                ret_rip,
                ev.error_code,
                ext,
            );
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

        if v86 && (conforming(&cs) || cs.dpl != 0 || gtype & 8 == 0) {
            // From virtual-8086 mode only to a 32-bit gate and a ring-0
            // non-conforming segment (SDM vol. 3, 20.3.1.1).
            return Err(Stop::Exc(GP, cerr));
        }
        // A fault-class exception pushes EFLAGS with RF set, so that the
        // restarted instruction does not take an instruction breakpoint
        // again (SDM vol. 3, 6.12.1 and 17.3.1.1); traps, interrupts and
        // #DB (whose instruction-breakpoint form is the exception to the
        // rule, and whose other forms are traps) push it as it is.
        let fault = ev.kind == EventKind::HardwareException
            && matches!(
                ev.vector,
                0 | 5 | 6 | 7 | 10 | 11 | 12 | 13 | 14 | 16 | 17 | 19 | 20 | 21
            );
        let old_rflags = if fault { self.rflags | RF } else { self.rflags };
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
            // 16-bit (types 6, 7) and 32-bit (14, 15) gates: the frame has
            // the gate's width; a switch to an inner level takes SS:ESP for
            // the new CPL from the TSS (SDM vol. 3, 6.12.1).
            let w: usize = if gtype & 8 != 0 { 4 } else { 2 };
            let (ss, mut sp, switch, err) = if new_cpl < cpl {
                let (ss_sel, sp) = self.tss_stack(new_cpl, ext)?;
                let ss = self.tss_stack_segment(ss_sel, new_cpl, ext)?;
                (ss, sp, true, u32::from(ss_sel & 0xfffc) | ext)
            } else {
                (self.sregs.ss, old_rsp, false, ext)
            };
            sp &= crate::legacy::stack_mask(&ss);
            let wm = flags::mask(w);
            let mut frame = [0u64; 10];
            let mut n = 0;
            if v86 {
                // GS, FS, DS, ES above the usual frame.
                for r in [Register::GS, Register::FS, Register::DS, Register::ES] {
                    frame[n] = u64::from(self.seg(r).selector);
                    n += 1;
                }
            }
            if switch {
                frame[n] = u64::from(old_ss);
                frame[n + 1] = old_rsp & wm;
                n += 2;
            }
            for v in [old_rflags & wm, u64::from(old_cs), ret_rip & wm] {
                frame[n] = v;
                n += 1;
            }
            if let Some(e) = ev.error_code {
                frame[n] = u64::from(e) & wm;
                n += 1;
            }
            for v in &frame[..n] {
                self.push_on(&ss, &mut sp, w, *v, err)
                    .map_err(|e| self.system_fault(e))?;
            }
            self.sregs.ss = ss;
            let m = crate::legacy::stack_mask(&ss);
            self.gpr[4] = (old_rsp & !m) | sp;
            if switch {
                self.gpr[4] = sp;
            }
            if w == 2 {
                offset &= 0xffff;
            }
            if v86 {
                for r in [Register::GS, Register::FS, Register::DS, Register::ES] {
                    *self.seg_mut(r) = null_segment(0, 0);
                }
            }
        }
        self.rflags &= !(TF | NT | RF | VM);
        if gtype & 7 == 6 {
            // An interrupt gate (16- or 32-bit, or 64-bit) clears IF.
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
    /// The IVT entry (offset, segment) must lie within the IDTR limit, else
    /// #GP; a second fault escalates to #DF and then shutdown through
    /// `raise` (SDM vol. 2, INT n: REAL-ADDRESS-MODE). The 6-byte frame
    /// (FLAGS, CS, IP) must fit in SS (#SS otherwise).
    fn deliver_real(&mut self, vector: u8, ret_rip: u64) -> R<()> {
        let off = u64::from(vector) * 4;
        if off + 3 > u64::from(self.sregs.idt.limit) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let ivt = self.sregs.idt.base.wrapping_add(off);
        let ent = self.system_read(ivt, 4)?;
        let ss = self.sregs.ss;
        let mut sp = self.gpr[4] & crate::legacy::stack_mask(&ss);
        for v in [
            self.rflags & 0xffff,
            u64::from(self.sregs.cs.selector),
            ret_rip & 0xffff,
        ] {
            self.push_on(&ss, &mut sp, 2, v, 0)?;
        }
        let m = crate::legacy::stack_mask(&ss);
        self.gpr[4] = (self.gpr[4] & !m) | sp;
        self.rflags &= !(IF | TF | flags::AC | RF);
        self.sregs.cs = self.real_mode_segment(Register::CS, (ent >> 16) as u16);
        self.rip = ent & 0xffff;
        self.mode_changed();
        Ok(())
    }

    /// IRET with operand size `size` (SDM vol. 2, IRET: protected and
    /// IA-32e mode returns without task switches or virtual-8086 mode).
    pub(crate) fn iret(&mut self, size: usize) -> R<()> {
        let cpl = self.cpl();
        let m = self.sp_mask();
        let sp = self.gpr[4] & m;
        // Reads go through SS with its limit (#SS(0)), as POP does.
        let pop = |me: &mut InterpVcpu, i: u64| -> R<u64> {
            let off = sp.wrapping_add(i * size as u64) & m;
            me.read_mem(Register::SS, off, size)
        };
        let new_rip = pop(self, 0)?;
        let new_cs = pop(self, 1)? as u16;
        let new_flags = pop(self, 2)?;
        let done_sp = (self.gpr[4] & !m) | (sp.wrapping_add(3 * size as u64) & m);
        if self.rflags & VM != 0 {
            // In virtual-8086 mode IRET is IOPL-sensitive; with IOPL 3 it
            // returns as in real mode, keeping VM and IOPL.
            if self.rflags & flags::IOPL != flags::IOPL {
                return Err(Stop::Exc(GP, Some(0)));
            }
            let cs = self.real_mode_segment(Register::CS, new_cs);
            if new_rip > u64::from(cs.limit) {
                return Err(Stop::Exc(GP, Some(0)));
            }
            self.sregs.cs = cs;
            self.rip = new_rip;
            self.set_rflags_from_pop(new_flags, size, 3);
            self.gpr[4] = done_sp;
            self.nmi_blocked = false;
            self.mode_changed();
            return Ok(());
        }
        if self.sregs.cr0 & cr0::PE == 0 {
            // Real mode (SDM vol. 2, IRET: REAL-ADDRESS-MODE).
            let cs = self.real_mode_segment(Register::CS, new_cs);
            if new_rip > u64::from(cs.limit) {
                return Err(Stop::Exc(GP, Some(0)));
            }
            self.sregs.cs = cs;
            self.rip = new_rip;
            self.set_rflags_from_pop(new_flags, size, 0);
            self.gpr[4] = done_sp;
            self.nmi_blocked = false;
            self.mode_changed();
            return Ok(());
        }
        let long = self.sregs.long_mode();
        if !long && self.rflags & NT != 0 {
            // A return to the task in the previous-task link (SDM vol. 2,
            // IRET: TASK-RETURN); the link must name a busy TSS in the GDT.
            let link = self.tss_read(0, 2, 0)? as u16;
            let ts = Stop::Exc(TS, Some(u32::from(link & 0xfffc)));
            let raw = self.task_gate_target(link, 0).map_err(|e| match e {
                Stop::Exc(_, _) => ts.clone(),
                other => other,
            })?;
            return self.task_switch(
                link,
                raw,
                crate::legacy::TaskSwitch::Iret,
                self.rip,
                None,
                0,
            );
        }
        if !long && size == 4 && cpl == 0 && new_flags & VM != 0 {
            // Return to virtual-8086 mode (SDM vol. 2, IRET:
            // RETURN-TO-VIRTUAL-8086-MODE): ESP, SS, ES, DS, FS, GS follow.
            let mut v = [0u64; 6];
            for (k, x) in v.iter_mut().enumerate() {
                *x = pop(self, 3 + k as u64)?;
            }
            self.rflags = (new_flags & flags::SETTABLE) | tandem_core::cpu::rflags::FIXED1;
            let regs = [
                Register::SS,
                Register::ES,
                Register::DS,
                Register::FS,
                Register::GS,
            ];
            for (k, r) in regs.iter().enumerate() {
                *self.seg_mut(*r) = self.real_mode_segment(*r, v[k + 1] as u16);
            }
            self.sregs.cs = self.real_mode_segment(Register::CS, new_cs);
            self.rip = new_rip & 0xffff;
            self.gpr[4] = v[0] & 0xffff_ffff;
            self.nmi_blocked = false;
            self.mode_changed();
            return Ok(());
        }
        let rpl = (new_cs & 3) as u8;
        if rpl < cpl {
            return Err(Stop::Exc(GP, Some(u32::from(new_cs & 0xfffc))));
        }
        let cs = self.check_code_seg(new_cs, rpl, 0)?;
        let long_target = long && cs.l;
        let outer = rpl > cpl || self.bitness == 64;
        let (new_rsp, ss) = if outer {
            let rsp = pop(self, 3)?;
            let ss_sel = pop(self, 4)? as u16;
            let ss = self.check_data_seg(Register::SS, ss_sel, rpl)?;
            (rsp, Some(ss))
        } else {
            (0, None)
        };
        if long_target && !canonical(new_rip) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        if !long_target && new_rip > u64::from(cs.limit) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        // Commit.
        self.set_rflags_from_pop(new_flags, size, cpl);
        self.sregs.cs = cs;
        self.gpr[4] = match ss {
            Some(ss) => {
                self.sregs.ss = ss;
                if self.bitness == 64 || long_target {
                    new_rsp
                } else {
                    let nm = crate::legacy::stack_mask(&ss);
                    (self.gpr[4] & !nm) | (new_rsp & nm)
                }
            }
            None => done_sp,
        };
        self.rip = if long_target {
            new_rip
        } else {
            new_rip & 0xffff_ffff
        };
        if rpl > cpl {
            self.null_inaccessible_data_segments(rpl);
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

    /// SYSCALL. Intel (SDM vol. 2): 64-bit mode only, #UD in
    /// compatibility mode and outside long mode. AMD (APM vol. 3,
    /// SYSCALL): in long mode from 64-bit mode (target LSTAR) and from
    /// compatibility mode (target CSTAR), always into 64-bit CS; in legacy
    /// protected mode into a flat 32-bit CS at STAR[31:0], clearing VM, IF
    /// and RF (RFLAGS is not saved and SFMASK not used). CS and SS are
    /// STAR[47:32] and STAR[47:32] + 8 with fixed attributes.
    pub(crate) fn syscall(&mut self) -> R<()> {
        if self.sregs.efer & efer::SCE == 0 {
            return Err(Stop::Exc(6, None));
        }
        let long = self.sregs.long_mode();
        if self.intel_vendor() {
            if self.bitness != 64 {
                return Err(Stop::Exc(6, None));
            }
        } else if self.sregs.cr0 & cr0::PE == 0 {
            // Legacy SYSCALL loads protected-mode selectors: not in real
            // mode.
            return Err(Stop::Exc(6, None));
        }
        let tf_before = self.rflags & TF != 0;
        let sel = ((self.msr.star >> 32) & 0xfffc) as u16;
        let (cs, ss);
        if long {
            self.gpr[1] = self.rip;
            self.gpr[11] = self.rflags & !RF;
            self.rflags &= !(self.msr.fmask | RF);
            cs = Segment::flat(sel, 0xb, true);
            ss = Segment::flat(sel.wrapping_add(8), 0x3, false);
            self.rip = if self.bitness == 64 {
                self.msr.lstar
            } else {
                self.msr.cstar
            };
        } else {
            self.gpr[1] = self.rip & 0xffff_ffff;
            self.rflags &= !(VM | IF | RF);
            cs = Segment::flat(sel, 0xb, false);
            ss = Segment::flat(sel.wrapping_add(8), 0x3, false);
            self.rip = self.msr.star & 0xffff_ffff;
        }
        self.rflags |= tandem_core::cpu::rflags::FIXED1;
        self.sregs.cs = cs;
        self.sregs.ss = ss;
        self.mode_changed();
        self.single_step_at_end(tf_before);
        Ok(())
    }

    /// SYSRET; `size` 8 returns to 64-bit mode, 4 to compatibility mode (or,
    /// on AMD outside long mode, to legacy protected mode). Intel (SDM vol.
    /// 2): 64-bit mode only (#UD otherwise), #GP(0) at CPL > 0 or for a
    /// non-canonical RCX, SS = (STAR[63:48] + 8) | 3 with fixed flat
    /// attributes. AMD (APM vol. 3, SYSRET): also from compatibility mode
    /// and legacy mode (#GP(0) in real mode or at CPL > 0), no RCX check
    /// (a non-canonical RIP faults at CPL 3 on the fetch), and only the SS
    /// selector changes: SS keeps its base, limit and attributes. In legacy
    /// mode RFLAGS is not loaded from R11, IF is set.
    pub(crate) fn sysret(&mut self, size: usize) -> R<()> {
        if self.sregs.efer & efer::SCE == 0 {
            return Err(Stop::Exc(6, None));
        }
        let intel = self.intel_vendor();
        if intel && self.bitness != 64 {
            return Err(Stop::Exc(6, None));
        }
        if self.sregs.cr0 & cr0::PE == 0 || self.cpl() != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let base = ((self.msr.star >> 48) & 0xffff) as u16;
        let rcx = self.gpr[1];
        if intel && size == 8 && !canonical(rcx) {
            return Err(Stop::Exc(GP, Some(0)));
        }
        let tf_before = self.rflags & TF != 0;
        let to64 = size == 8 && self.bitness == 64;
        let mut cs = if to64 {
            Segment::flat(base.wrapping_add(16) | 3, 0xb, true)
        } else {
            Segment::flat(base | 3, 0xb, false)
        };
        cs.dpl = 3;
        if self.sregs.long_mode() {
            self.rflags = (self.gpr[11] & 0x3c_7fd7) | tandem_core::cpu::rflags::FIXED1;
        } else {
            self.rflags = (self.rflags & !RF) | IF;
        }
        self.rip = if to64 { rcx } else { rcx & 0xffff_ffff };
        let ss_sel = base.wrapping_add(8) | 3;
        if intel {
            let mut ss = Segment::flat(ss_sel, 0x3, false);
            ss.dpl = 3;
            self.sregs.ss = ss;
        } else {
            self.sregs.ss.selector = ss_sel;
        }
        self.sregs.cs = cs;
        self.mode_changed();
        self.single_step_at_end(tf_before);
        Ok(())
    }

    /// SYSCALL and SYSRET single-step on TF as they leave it, not as they
    /// found it: a SYSCALL whose SFMASK clears TF makes no #DB in the
    /// kernel, and a SYSRET that loads TF = 1 traps right after itself, in
    /// user mode (as Linux's entry code and KVM's syscall test rely on).
    /// The trap goes through the data breakpoint path (`db_hits`, DR6.BS).
    fn single_step_at_end(&mut self, tf_before: bool) {
        if self.rflags & TF != 0 {
            self.db_hits |= crate::DR6_BS;
        }
        self.single_step_done = tf_before;
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
                // PAE paging outside long mode loads the PDPTEs when PG, CD
                // or NW change (SDM vol. 3, 4.4.1); a reserved bit is #GP(0).
                let pae_legacy = v & cr0::PG != 0 && self.sregs.cr4 & cr4::PAE != 0 && !lme;
                let pdptes =
                    if pae_legacy && (v ^ self.sregs.cr0) & (cr0::PG | cr0::CD | cr0::NW) != 0 {
                        Some(self.read_pdptes(self.sregs.cr3)?)
                    } else {
                        None
                    };
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
                if let Some(p) = pdptes {
                    self.set_pdptes(p);
                }
                self.mode_changed();
            }
            2 => self.sregs.cr2 = v,
            3 => {
                let long = self.sregs.long_mode();
                let v = if long { v } else { v & 0xffff_ffff };
                let pdptes =
                    if !long && self.sregs.cr0 & cr0::PG != 0 && self.sregs.cr4 & cr4::PAE != 0 {
                        Some(self.read_pdptes(v)?)
                    } else {
                        None
                    };
                self.sregs.cr3 = v;
                self.paging_changed();
                if let Some(p) = pdptes {
                    self.set_pdptes(p);
                }
            }
            4 => {
                if v & !self.cr4_allowed() != 0 {
                    return gp;
                }
                if self.sregs.long_mode() && v & cr4::PAE == 0 {
                    return gp;
                }
                let pdptes = if !self.sregs.long_mode()
                    && self.sregs.cr0 & cr0::PG != 0
                    && v & cr4::PAE != 0
                    && (v ^ self.sregs.cr4) & (cr4::PAE | cr4::PGE | cr4::PSE) != 0
                {
                    Some(self.read_pdptes(self.sregs.cr3)?)
                } else {
                    None
                };
                self.sregs.cr4 = v;
                self.paging_changed();
                if let Some(p) = pdptes {
                    self.set_pdptes(p);
                }
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
        self.tsc_source().wrapping_add(self.msr.tsc_offset)
    }

    /// The count the TSC runs from: the machine clock at the TSC rate when
    /// one is given (`set_tsc_clock`: the LAPIC's TSC-deadline timer compares
    /// with the same count, so deadlines the guest computes from RDTSC fire
    /// when it expects), else retired instructions.
    fn tsc_source(&self) -> u64 {
        match &self.tsc_clock {
            Some((clock, khz)) => {
                (u128::from(clock.now_ns()) * u128::from(*khz) / 1_000_000) as u64
            }
            None => self.retired,
        }
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
            // IA32_MCG_CAP: no error-reporting banks, no MCG_CTL; and
            // IA32_MCG_STATUS: no machine check in progress (SDM vol. 3, 16.3.1).
            0x179 | 0x17a => 0,
            0x8b => 0,
            0xfe => 0,
            // IA32_XSS: no supervisor state components (XSAVES saves none).
            0xda0 if self.xsaves_offered() => 0,
            IA32_PKRS if self.pks_offered() => u64::from(self.tlb.pkrs),
            0xc001_0000..=0xc001_0007 if !self.intel_vendor() => m.amd_perf[(index & 7) as usize],
            _ => return None,
        })
    }

    /// Writes one of the interpreter's MSRs; false raises #GP(0).
    pub(crate) fn own_msr_write(&mut self, index: u32, v: u64) -> bool {
        let addr_ok = canonical(v);
        match index {
            msr::IA32_TSC => self.msr.tsc_offset = v.wrapping_sub(self.tsc_source()),
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
            // IA32_BIOS_SIGN_ID: writing 0 before CPUID(1) asks for the
            // microcode revision, which reads 0 here (no microcode).
            0x8b => {}
            // IA32_MCG_STATUS: writable with 0 only (SDM vol. 3, 16.3.1.2);
            // IA32_MCG_CAP is read-only.
            0x17a if v == 0 => {}
            0xda0 if self.xsaves_offered() && v == 0 => {}
            // Bits 63:32 are reserved (SDM vol. 4, table 2-2).
            IA32_PKRS if self.pks_offered() && v >> 32 == 0 => self.tlb.pkrs = v as u32,
            // PerfCtr0-3 are 48 bits wide.
            0xc001_0004..=0xc001_0007 if !self.intel_vendor() => {
                self.msr.amd_perf[(index & 7) as usize] = v & ((1 << 48) - 1)
            }
            0xc001_0000..=0xc001_0003 if !self.intel_vendor() => {
                self.msr.amd_perf[(index & 7) as usize] = v
            }
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
            self.note_apic_base(index, v);
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
            self.note_apic_base(index, v);
            return Ok(());
        }
        if self.own_msr_write(index, v) {
            Ok(())
        } else {
            Err(Stop::Exc(GP, Some(0)))
        }
    }

    /// CR4 bits a MOV to CR4 may set: the always-present ones and those of
    /// features CPUID announces (SDM vol. 3, 2.5: setting a bit of a
    /// feature the processor lacks is #GP(0)).
    pub(crate) fn cr4_allowed(&self) -> u64 {
        let t = &self.cpuid;
        // TSD, PSE, PAE, PGE, PCE, OSFXSR, OSXMMEXCPT.
        let mut allowed: u64 =
            (1 << 2) | (1 << 4) | (1 << 5) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10);
        let feature = |leaf: u32, reg: usize, bit: u32, cr4_bits: u64| {
            if t.has(leaf, reg, bit) {
                cr4_bits
            } else {
                0
            }
        };
        allowed |= feature(1, 3, 1, 0b11); // VME: VME, PVI
        allowed |= feature(1, 3, 2, 1 << 3); // DE
        allowed |= feature(1, 3, 7, 1 << 6); // MCE
        allowed |= feature(1, 2, 26, cr4::OSXSAVE); // XSAVE
        allowed |= feature(1, 2, 17, 1 << 17); // PCID
        allowed |= feature(7, 1, 0, 1 << 16); // FSGSBASE
        allowed |= feature(7, 1, 7, 1 << 20); // SMEP
        allowed |= feature(7, 1, 20, 1 << 21); // SMAP
        allowed |= feature(7, 2, 2, 1 << 11); // UMIP
        allowed |= feature(7, 2, 3, 1 << 22); // PKU
        allowed |= feature(7, 2, 31, 1 << 24); // PKS
        allowed
    }

    /// CPUID.(EAX=07H,ECX=0):ECX[31]: PKS and IA32_PKRS.
    pub(crate) fn pks_offered(&self) -> bool {
        self.cpuid.raw(7, 0)[2] & (1 << 31) != 0
    }

    /// RDPKRU: EAX = PKRU, EDX = 0; ECX must be 0 (SDM vol. 2, RDPKRU).
    pub(crate) fn exec_rdpkru(&mut self) -> R<()> {
        if self.sregs.cr4 & crate::mmu::CR4_PKE == 0 {
            return Err(Stop::Exc(6, None));
        }
        if self.gpr[1] as u32 != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        self.gpr[0] = u64::from(self.pkru());
        self.gpr[2] = 0;
        Ok(())
    }

    /// WRPKRU: PKRU = EAX; ECX and EDX must be 0 (SDM vol. 2, WRPKRU). The
    /// TLB keeps no rights derived from PKRU, so nothing is flushed.
    pub(crate) fn exec_wrpkru(&mut self) -> R<()> {
        if self.sregs.cr4 & crate::mmu::CR4_PKE == 0 {
            return Err(Stop::Exc(6, None));
        }
        if self.gpr[1] as u32 != 0 || self.gpr[2] as u32 != 0 {
            return Err(Stop::Exc(GP, Some(0)));
        }
        self.set_pkru(self.gpr[0] as u32);
        Ok(())
    }

    /// CPUID.(EAX=0DH,ECX=1):EAX[3]: XSAVES / XRSTORS and IA32_XSS.
    pub(crate) fn xsaves_offered(&self) -> bool {
        self.cpuid.raw(0xd, 1)[0] & (1 << 3) != 0
    }

    /// CPUID from the processor's table (tandem_core::cpuid: Tandem's
    /// model, or KVM's supported list cut to it), with the run-time fields
    /// from this vCPU's state.
    pub(crate) fn cpuid(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let mut r = self
            .cpuid
            .lookup_cr4(leaf, sub, self.id, self.sregs.cr4, self.fpu.xcr0);
        if leaf == 1 && self.msr.apic_global_disabled {
            // CPUID.1:EDX.APIC[bit 9] reads 0 while IA32_APIC_BASE.EN is
            // clear (SDM vol. 3, 11.4.3).
            r[3] &= !(1 << 9);
        }
        r
    }

    /// The debug register a MOV DR names: DR4 and DR5 are DR6 and DR7 while
    /// CR4.DE is clear, and #UD while it is set (SDM vol. 3, 17.2.2). With
    /// DR7.GD set, any MOV DR is a general-detect #DB fault instead: DR6.BD
    /// set, GD cleared so the handler can use the registers (SDM vol. 3,
    /// 17.2.4 and 17.3.1.2).
    pub(crate) fn dr_alias(&mut self, r: Register) -> R<Register> {
        const GD: u64 = 1 << 13;
        const BD: u64 = 1 << 13;
        if self.dr.dr7 & GD != 0 {
            self.dr.dr7 &= !GD;
            self.dr.dr6 |= BD;
            return Err(Stop::Exc(1, None));
        }
        let de = self.sregs.cr4 & (1 << 3) != 0;
        match r {
            Register::DR4 | Register::DR5 if de => Err(Stop::Exc(6, None)),
            Register::DR4 => Ok(Register::DR6),
            Register::DR5 => Ok(Register::DR7),
            _ => Ok(r),
        }
    }

    /// The B0-B3 bits of the instruction breakpoints that match CS:RIP:
    /// DR0-DR3 enabled in DR7 (L or G) with R/W = 00 (execution), whose
    /// LEN must be 00 (SDM vol. 3, 17.2.4 and 17.3.1.1); `None` for none.
    pub(crate) fn instruction_breakpoints(&self) -> Option<u64> {
        let la = self.sregs.cs.base.wrapping_add(self.rip);
        let dr7 = self.dr.dr7;
        let hits = (0..4).fold(0u64, |hits, n| {
            let enabled = (dr7 >> (2 * n)) & 3 != 0;
            let rw_len = (dr7 >> (16 + 4 * n)) & 0xf;
            if enabled && rw_len == 0 && self.dr.db[n] == la {
                hits | (1 << n)
            } else {
                hits
            }
        });
        (hits != 0).then_some(hits)
    }

    /// DR7 changed: whether linear accesses must look for data
    /// breakpoints (some DRn enabled, L or G, with R/W = 01 or 11).
    pub(crate) fn dr7_changed(&mut self) {
        let dr7 = self.dr.dr7;
        self.data_bp_armed =
            (0..4).any(|n| (dr7 >> (2 * n)) & 3 != 0 && (dr7 >> (16 + 4 * n)) & 1 != 0);
    }

    /// B0-B3 of the enabled breakpoints among DR0-DR3 whose R/W field is
    /// one of `kinds` (a bit mask of R/W values) and whose range covers a
    /// byte of `addr..addr + size`. LEN 00, 01, 11, 10 cover 1, 2, 4 and 8
    /// bytes at DRn with its low bits ignored (SDM vol. 3, 18.2.5). DR6
    /// reports only enabled breakpoints, which the SDM permits (18.2.3).
    fn breakpoints_covering(&self, addr: u64, size: usize, kinds: u8) -> u64 {
        let dr7 = self.dr.dr7;
        (0..4).fold(0u64, |hits, n| {
            let enabled = (dr7 >> (2 * n)) & 3 != 0;
            let rw = (dr7 >> (16 + 4 * n)) & 3;
            let len: u64 = match (dr7 >> (18 + 4 * n)) & 3 {
                0 => 1,
                1 => 2,
                2 => 8,
                _ => 4,
            };
            let base = self.dr.db[n] & !(len - 1);
            // The two ranges overlap, with wrap-around at the top of the
            // address space.
            let overlap = addr.wrapping_sub(base) < len || base.wrapping_sub(addr) < size as u64;
            if enabled && kinds & (1 << rw) != 0 && overlap {
                hits | (1 << n)
            } else {
                hits
            }
        })
    }

    /// A data access to linear `la` while `data_bp_armed`: notes the data
    /// breakpoints it hits, R/W = 01 for writes and 11 for reads and writes
    /// (SDM vol. 3, 18.2.4), for the trap after the instruction.
    #[cold]
    #[inline(never)]
    pub(crate) fn data_breakpoints(&mut self, la: u64, size: usize, write: bool) {
        let kinds = if write { 0b1010 } else { 0b1000 };
        self.db_hits |= self.breakpoints_covering(la, size, kinds);
    }

    /// A port access (IN, OUT, INS, OUTS) of `size` bytes at `port`: with
    /// CR4.DE set, R/W = 10 makes DR0-DR3 I/O breakpoints (SDM vol. 3,
    /// 18.2.4), traps after the instruction as data breakpoints are.
    pub(crate) fn io_breakpoints(&mut self, port: u64, size: usize) {
        if self.dr.dr7 & 0xff != 0 && self.sregs.cr4 & (1 << 3) != 0 {
            self.db_hits |= self.breakpoints_covering(port, size, 0b0100);
        }
    }

    /// Whether an instruction that started with TF set traps after it
    /// (SDM vol. 3, 17.3.1.4): not when it delivered an event (INT n,
    /// INT3, INTO, INT1 clear TF on the way to their handler), nor when it
    /// was a MOV SS / POP SS, whose shadow suppresses debug exceptions
    /// until the next instruction has run (SDM vol. 3, 6.8.3). STI's shadow
    /// does not. TF set by the instruction itself (POPF, IRET) first traps
    /// after the next one, as the caller tests TF at the start; SYSCALL and
    /// SYSRET decide for themselves (`single_step_at_end`).
    pub(crate) fn single_step_trap(&mut self, events_before: u64) -> bool {
        !std::mem::take(&mut self.single_step_done)
            && self.events_delivered == events_before
            && !self.mov_ss_shadow
    }

    /// CPUID.0's vendor string is "GenuineIntel".
    pub(crate) fn intel_vendor(&self) -> bool {
        // EBX "Genu", EDX "ineI", ECX "ntel".
        let v = self.cpuid.raw(0, 0);
        v[1] == 0x756e_6547 && v[3] == 0x4965_6e69 && v[2] == 0x6c65_746e
    }

    /// Follows IA32_APIC_BASE.EN (bit 11) through the values the machine's
    /// LAPIC returned or accepted, for CPUID.1:EDX.APIC.
    fn note_apic_base(&mut self, index: u32, v: u64) {
        if index == msr::IA32_APIC_BASE {
            self.msr.apic_global_disabled = v & (1 << 11) == 0;
        }
    }
}
