//! Real-address mode, big real mode and 16- / 32-bit protected mode: small
//! code sequences whose registers, memory, flags and delivered frames are
//! checked against the SDM.

use std::sync::Arc;

use iced_x86::code_asm::*;
use tandem_core::cpu::{cr0, cr4, efer, DescriptorTable, Segment, Sregs};
use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Vcpu, VcpuExit};

use crate::flags::{AF, CF, IF, PF, SF, TF, ZF};
use crate::InterpVcpu;

const RAM: u64 = 4 << 20;
/// Real-mode exception / interrupt handlers: vector n at 0x0100:n*16, a HLT.
const RM_HANDLER_SEG: u64 = 0x100;

fn assemble(
    bits: u32,
    ip: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// A processor in the reset state over fresh RAM, with an IVT whose
/// vector-n handler is a HLT at 0x0100:n*16.
fn reset_vcpu() -> InterpVcpu {
    let mem = Arc::new(GuestMemory::new(RAM).unwrap());
    for n in 0..256u64 {
        mem.write_u16(n * 4, (n * 16) as u16).unwrap();
        mem.write_u16(n * 4 + 2, RM_HANDLER_SEG as u16).unwrap();
        mem.write_u8(RM_HANDLER_SEG * 16 + n * 16, 0xf4).unwrap();
    }
    InterpVcpu::new(0, mem)
}

/// Real mode with CS = DS = ES = SS = `seg`, IP = `ip`, SP = 0xFFFE and
/// `code` (16-bit) loaded at seg:ip.
fn real_mode(
    seg: u16,
    ip: u16,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> InterpVcpu {
    let mut v = reset_vcpu();
    let base = u64::from(seg) << 4;
    let code = assemble(16, u64::from(ip), f);
    v.mem.write(base + u64::from(ip), &code).unwrap();
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::real_mode(seg, true);
    for d in [&mut s.ds, &mut s.es, &mut s.ss, &mut s.fs, &mut s.gs] {
        *d = Segment::real_mode(seg, false);
    }
    v.set_sregs(&s).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rip = u64::from(ip);
    r.rsp = 0xfffe;
    v.set_regs(&r).unwrap();
    v
}

fn run(v: &mut InterpVcpu) -> VcpuExit {
    v.run().unwrap()
}

/// Asserts the run stopped in the real-mode handler of `vector` and
/// returns the (IP, CS, FLAGS) frame it pushed.
fn rm_frame(v: &mut InterpVcpu, vector: u64) -> (u16, u16, u16) {
    assert_eq!(run(v), VcpuExit::Hlt);
    let s = v.get_sregs().unwrap();
    let r = v.get_regs().unwrap();
    assert_eq!(
        (s.cs.selector, r.rip),
        (RM_HANDLER_SEG as u16, vector * 16 + 1),
        "expected the handler of vector {vector}"
    );
    let top = s.ss.base + (r.rsp & 0xffff);
    (
        v.mem.read_u16(top).unwrap(),
        v.mem.read_u16(top + 2).unwrap(),
        v.mem.read_u16(top + 4).unwrap(),
    )
}

#[test]
fn reset_state_and_far_jump_from_the_reset_vector() {
    let mut v = reset_vcpu();
    let s = v.get_sregs().unwrap();
    assert_eq!(
        (s.cs.selector, s.cs.base, s.cs.limit),
        (0xf000, 0xffff_0000, 0xffff)
    );
    assert_eq!(v.get_regs().unwrap().rip, 0xfff0);
    assert_eq!(s.idt.limit, 0xffff);
    // JMP FAR 0x0000:0x7C00 at physical 0xFFFF0: the reset vector
    // 0xFFFFFFF0 reads the BIOS copy at the top of the first MiB.
    v.mem
        .write(0xffff0, &[0xea, 0x00, 0x7c, 0x00, 0x00])
        .unwrap();
    let code = assemble(16, 0x7c00, |a| {
        a.mov(ax, 0x1234)?;
        a.hlt()
    });
    v.mem.write(0x7c00, &code).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let s = v.get_sregs().unwrap();
    let r = v.get_regs().unwrap();
    assert_eq!((s.cs.selector, s.cs.base), (0, 0));
    assert_eq!(r.rip, 0x7c00 + code.len() as u64);
    assert_eq!(r.rax & 0xffff, 0x1234);
}

#[test]
fn real_mode_segment_arithmetic_and_offset_wrap() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(ax, 0x2345)?;
        a.mov(ds, ax)?;
        a.mov(bx, 0xffff)?;
        a.mov(si, 2)?;
        a.mov(ax, 0xbeef)?;
        // [BX+SI] = 0x10001 wraps to offset 1 with 16-bit addressing.
        a.mov(word_ptr(bx + si), ax)?;
        a.mov(byte_ptr(0x10), 0x5a)?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u16(0x23451).unwrap(), 0xbeef);
    assert_eq!(v.mem.read_u8(0x23460).unwrap(), 0x5a);
    assert_eq!(v.get_sregs().unwrap().ds.base, 0x23450);
}

#[test]
fn real_mode_limit_violations_fault() {
    // A word at offset 0xFFFF crosses the 64 KiB limit: #GP (vector 13).
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(bx, 0xffff)?;
        a.mov(ax, word_ptr(bx))?;
        a.hlt()
    });
    let (ip, csel, _) = rm_frame(&mut v, 13);
    assert_eq!((ip, csel), (0x103, 0x1000));
    // An address-size prefix with an offset above 0xFFFF: #GP.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(ebx, 0x10000)?;
        a.mov(al, byte_ptr(ebx))?;
        a.hlt()
    });
    let (ip, _, _) = rm_frame(&mut v, 13);
    assert_eq!(ip, 0x106);
    // A push with SP = 1 would straddle the SS limit: #SS (vector 12).
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(sp, 1)?;
        a.push(ax)?;
        a.hlt()
    });
    v.mem.write_u16(12 * 4, 12 * 16).unwrap();
    // The #SS frame itself cannot be pushed at SP = 1 either: #SS during
    // #SS is a double fault, and the #DF frame fails too: shutdown.
    assert_eq!(run(&mut v), VcpuExit::Shutdown);
}

#[test]
fn real_mode_int_iret_and_the_ivt() {
    // INT 0x21 to a handler that sets BX and IRETs.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.sti()?;
        a.int(0x21)?;
        a.hlt()
    });
    let h = assemble(16, 0x500, |a| {
        a.mov(bx, 0x4321)?;
        a.iret()
    });
    v.mem.write(0x500, &h).unwrap();
    v.mem.write_u32(0x21 * 4, 0x0000_0500).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rflags = 2 | TF | AF;
    // TF would trap: run with the handler doing it instead.
    r.rflags = 2 | AF;
    v.set_regs(&r).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rbx & 0xffff, 0x4321);
    assert_eq!(r.rip, 0x104);
    assert_eq!(r.rsp, 0xfffe);
    assert_ne!(r.rflags & IF, 0, "IRET restores IF");
    assert_ne!(r.rflags & AF, 0);

    // The frame: FLAGS, CS, IP of the next instruction; IF cleared.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.sti()?;
        a.int(0x40)?;
        a.hlt()
    });
    let (ip, csel, fl) = rm_frame(&mut v, 0x40);
    assert_eq!((ip, csel), (0x103, 0x1000));
    assert_ne!(u64::from(fl) & IF, 0);
    assert_eq!(v.get_regs().unwrap().rflags & (IF | TF), 0);
    assert_eq!(v.get_regs().unwrap().rsp, 0xfffe - 6);

    // INT3 and INTO (taken with OF = 1) push the next IP.
    let mut v = real_mode(0x1000, 0x100, |a| a.int3());
    assert_eq!(rm_frame(&mut v, 3).0, 0x101);
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(al, 0x7f)?;
        a.add(al, 1)?;
        a.into()
    });
    assert_eq!(rm_frame(&mut v, 4).0, 0x105);
}

#[test]
fn real_mode_divide_error_is_a_fault_at_the_div() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(ax, 100)?;
        a.mov(bl, 0)?;
        a.div(bl)?;
        a.hlt()
    });
    let (ip, csel, _) = rm_frame(&mut v, 0);
    assert_eq!((ip, csel), (0x105, 0x1000), "#DE returns to the DIV itself");
}

#[test]
fn real_mode_idtr_limit_gives_gp_then_double_fault_then_shutdown() {
    // LIDT with limit 0x83: vector 0x21 (bytes 0x84-0x87) is outside it,
    // so INT 0x21 raises #GP, whose entry (0x34) is inside.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.lidt(word_ptr(0x200))?;
        a.int(0x21)?;
        a.hlt()
    });
    v.mem.write_u16(0x10200, 0x83).unwrap();
    v.mem.write_u32(0x10202, 0).unwrap();
    let (ip, _, _) = rm_frame(&mut v, 13);
    assert_eq!(ip, 0x105, "#GP points at the INT");

    // Limit 0x2F: #GP (entry 0x34) is outside too, #DF (entry 0x20) inside.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.lidt(word_ptr(0x200))?;
        a.int(0x21)?;
        a.hlt()
    });
    v.mem.write_u16(0x10200, 0x2f).unwrap();
    v.mem.write_u32(0x10202, 0).unwrap();
    rm_frame(&mut v, 8);

    // Limit 0: nothing can be delivered: a triple fault.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.lidt(word_ptr(0x200))?;
        a.int(0x21)?;
        a.hlt()
    });
    v.mem.write_u16(0x10200, 0).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Shutdown);
}

#[test]
fn real_mode_lgdt_16_bit_loads_a_24_bit_base() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.lgdt(word_ptr(0x200))?;
        a.sgdt(word_ptr(0x210))?;
        a.hlt()
    });
    v.mem.write_u16(0x10200, 0x17).unwrap();
    v.mem.write_u32(0x10202, 0xaa12_3456).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let s = v.get_sregs().unwrap();
    assert_eq!((s.gdt.base, s.gdt.limit), (0x12_3456, 0x17));
    assert_eq!(v.mem.read_u32(0x10212).unwrap(), 0x12_3456);
}

#[test]
fn real_mode_far_call_ret_and_jmp() {
    // CALL FAR 0x2000:0x0010; there: RETF 2 back.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.push(0x7777)?;
        a.db(&[0x9a, 0x10, 0x00, 0x00, 0x20])?;
        a.hlt()
    });
    v.mem.write(0x20010, &[0xca, 0x02, 0x00]).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, 0x100 + 3 + 5 + 1);
    assert_eq!(r.rsp, 0xfffe, "RETF 2 drops the pushed word");
    assert_eq!(v.get_sregs().unwrap().cs.selector, 0x1000);
    // The return address was pushed as CS then IP.
    assert_eq!(v.mem.read_u16(0x1fff8).unwrap(), 0x108);
    assert_eq!(v.mem.read_u16(0x1fffa).unwrap(), 0x1000);

    // JMP FAR through memory (m16:16).
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.jmp(dword_ptr(0x300))?;
        a.hlt()
    });
    v.mem.write_u32(0x10300, 0x3000_0040).unwrap();
    v.mem.write_u8(0x30040, 0xf4).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    assert_eq!(v.get_sregs().unwrap().cs.base, 0x30000);
    assert_eq!(v.get_regs().unwrap().rip, 0x41);
}

#[test]
fn real_mode_16_bit_near_call_ret_push_pop_and_leave() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        let mut f = a.create_label();
        a.call(f)?;
        a.hlt()?;
        a.set_label(&mut f)?;
        a.mov(ax, sp)?;
        a.enter(4, 0)?;
        a.mov(cx, sp)?;
        a.mov(dx, bp)?;
        a.leave()?;
        a.ret()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, 0x104);
    assert_eq!(r.rsp, 0xfffe);
    assert_eq!(r.rax & 0xffff, 0xfffc, "a 16-bit CALL pushes 2 bytes");
    assert_eq!(r.rdx & 0xffff, 0xfffa, "ENTER: BP = SP after pushing BP");
    assert_eq!(r.rcx & 0xffff, 0xfff6);
}

#[test]
fn enter_with_nesting_level_copies_frame_pointers() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(bp, 0x8000)?;
        a.mov(word_ptr(0x7ffe), 0x1111)?;
        a.enter(0, 2)?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    // push BP (0xFFFC), push [BP-2] (0xFFFA), push frame (0xFFF8).
    assert_eq!(r.rsp & 0xffff, 0xfff8);
    assert_eq!(r.rbp & 0xffff, 0xfffc);
    assert_eq!(v.mem.read_u16(0x1fffc).unwrap(), 0x8000);
    assert_eq!(v.mem.read_u16(0x1fffa).unwrap(), 0x1111);
    assert_eq!(v.mem.read_u16(0x1fff8).unwrap(), 0xfffc);
}

#[test]
fn pusha_popa_16_and_32() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(ax, 1)?;
        a.mov(cx, 2)?;
        a.mov(dx, 3)?;
        a.mov(bx, 4)?;
        a.mov(bp, 6)?;
        a.mov(si, 7)?;
        a.mov(di, 8)?;
        a.pusha()?;
        a.mov(ax, 0)?;
        a.mov(di, 0)?;
        a.mov(word_ptr(0xfff4), 0x99)?; // saved SP slot is ignored by POPA
        a.popa()?;
        a.mov(word_ptr(0x7000), sp)?;
        a.mov(esp, 0x8000)?;
        a.pushad()?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rdi & 0xffff, r.rbx & 0xffff), (1, 8, 4));
    // PUSHA stored AX at 0xFFFC .. DI at 0xFFEE, SP at 0xFFF4.
    assert_eq!(v.mem.read_u16(0x1fffc).unwrap(), 1);
    assert_eq!(v.mem.read_u16(0x1fff4).unwrap(), 0x99);
    assert_eq!(v.mem.read_u16(0x1ffee).unwrap(), 8);
    assert_eq!(
        v.mem.read_u16(0x17000).unwrap(),
        0xfffe,
        "POPA restores SP by adding 16"
    );
    // PUSHAD from ESP 0x8000: 32 bytes, EAX first, the original ESP fifth.
    assert_eq!(r.rsp, 0x8000 - 32);
    assert_eq!(v.mem.read_u32(0x18000 - 4).unwrap(), 1);
    assert_eq!(
        v.mem.read_u32(0x18000 - 20).unwrap(),
        0x8000,
        "ESP as before PUSHAD"
    );
    assert_eq!(v.mem.read_u32(0x18000 - 32).unwrap(), 8, "EDI last");
}

#[test]
fn string_ops_loop_and_jcxz_use_cx_si_di() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        let mut l = a.create_label();
        let mut z = a.create_label();
        a.mov(si, 0x400)?;
        a.mov(di, 0x500)?;
        a.mov(cx, 3)?;
        a.rep().movsw()?;
        a.mov(cx, 4)?;
        a.xor(dx, dx)?;
        a.set_label(&mut l)?;
        a.inc(dx)?;
        a.loop_(l)?;
        a.jcxz(z)?;
        a.mov(dx, 0xdead)?;
        a.set_label(&mut z)?;
        a.hlt()
    });
    v.mem.write(0x10400, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rsi = 0xabcd_0000;
    r.rcx = 0x5555_0000;
    v.set_regs(&r).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let mut b = [0u8; 8];
    v.mem.read(0x10500, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4, 5, 6, 0, 0]);
    assert_eq!(r.rsi, 0xabcd_0406, "only SI moves with 16-bit addressing");
    assert_eq!(r.rdi & 0xffff, 0x506);
    assert_eq!(r.rdx & 0xffff, 4);
    assert_eq!(r.rcx, 0x5555_0000, "LOOP counts in CX");
}

#[test]
fn bcd_adjustments() {
    fn bcd(
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
        ax_in: u64,
        fl: u64,
    ) -> (u64, u64) {
        let mut v = real_mode(0x1000, 0x100, |a| {
            f(a)?;
            a.hlt()
        });
        let mut r = v.get_regs().unwrap();
        r.rax = ax_in;
        r.rflags = 2 | fl;
        v.set_regs(&r).unwrap();
        let exit = run(&mut v);
        let r = v.get_regs().unwrap();
        assert_eq!(exit, VcpuExit::Hlt);
        (r.rax & 0xffff, r.rflags & (CF | AF | ZF | SF | PF))
    }
    // 0x79 + 0x35 = 0xAE; DAA -> 0x14, CF=1, AF=1.
    assert_eq!(
        bcd(
            |a| {
                a.add(al, 0x35)?;
                a.daa()
            },
            0x79,
            0
        ),
        (0x14, CF | AF | PF)
    );
    // 0x35 - 0x47 = 0xEE; DAS -> 0x88, CF=1, AF=1.
    assert_eq!(
        bcd(
            |a| {
                a.sub(al, 0x47)?;
                a.das()
            },
            0x35,
            0
        ),
        (0x88, CF | AF | SF | PF)
    );
    // AAA: AL=0x0B -> AX = 0x0101, AF=CF=1.
    assert_eq!(bcd(|a| a.aaa(), 0x000b, 0).0, 0x0101);
    assert_eq!(bcd(|a| a.aaa(), 0x000b, 0).1 & (CF | AF), CF | AF);
    // AAS: AX=0x0203 with AF: AX-6 = 0x01FD borrows from AH, then AH-1
    // and AL &= 0xF give 0x000D (SDM vol. 2, AAS).
    assert_eq!(bcd(|a| a.aas(), 0x0203, AF).0, 0x000d);
    // AAM: 0x4F (79) -> AH=7, AL=9.
    assert_eq!(bcd(|a| a.aam(10), 0x004f, 0).0, 0x0709);
    // AAD: AH=7, AL=9 -> AX = 79.
    assert_eq!(bcd(|a| a.aad(10), 0x0709, 0).0, 79);
    // AAM 0 is #DE.
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.db(&[0xd4, 0x00])?;
        a.hlt()
    });
    assert_eq!(rm_frame(&mut v, 0).0, 0x100);
}

#[test]
fn lds_les_lss_xlat_and_bound() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.lds(si, dword_ptr(0x600))?;
        a.les(di, dword_ptr(0x604).es())?;
        a.mov(bx, 0x10)?;
        a.mov(al, 3)?;
        a.xlatb()?;
        a.mov(cx, 5)?;
        a.bound(cx, dword_ptr(0x620).es())?;
        a.mov(cx, 9)?;
        a.bound(cx, dword_ptr(0x620).es())?;
        a.hlt()
    });
    v.mem.write_u32(0x10600, 0x2000_0100).unwrap(); // DS = 0x2000, SI = 0x100
    v.mem.write_u32(0x10604, 0x1000_0620).unwrap(); // ES = 0x1000, DI = 0x620
    v.mem.write(0x20010, &[10, 11, 12, 13]).unwrap();
    v.mem.write_u16(0x10620, 1).unwrap();
    v.mem.write_u16(0x10622, 8).unwrap();
    let (ip, _, _) = rm_frame(&mut v, 5);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!((s.ds.selector, r.rsi & 0xffff), (0x2000, 0x100));
    assert_eq!((s.es.selector, r.rdi & 0xffff), (0x1000, 0x620));
    assert_eq!(r.rax & 0xff, 13, "XLAT reads DS:[BX+AL]");
    // The second BOUND (9 > 8) is #BR at the BOUND.
    assert_eq!(ip, 0x100 + 4 + 5 + 3 + 2 + 1 + 3 + 5 + 3);
}

/// GDT used by the protected-mode tests, at 0x800:
/// 0x08 code32 DPL0, 0x10 data32 DPL0, 0x18 code16 DPL0 (limit 0xFFFF),
/// 0x20 data flat 4 GiB (for big real mode), 0x2B code32 DPL3, 0x33 data32
/// DPL3, 0x38 TSS32 at 0x3000 (limit 0x2067: I/O bitmap at 0x68), 0x40
/// 32-bit call gate DPL3 -> 0x08:0x9000 with 2 parameters, 0x48 a 16-bit
/// data segment with limit 0xFFF, 0x50 an expand-down 32-bit data segment
/// with limit 0xFFF.
fn write_gdt(mem: &GuestMemory) {
    fn gate_descriptor(off: u64, sel: u64, params: u64, access: u64) -> u64 {
        (off & 0xffff) | (sel << 16) | (params << 32) | (access << 40) | ((off >> 16) << 48)
    }
    let tss = 0x3000u64;
    let tss_desc = 0x2067 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40);
    let gate = gate_descriptor(0x9000, 0x08, 2, 0xEC);
    let gdt: [u64; 16] = [
        0,
        0x00CF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x0000_9A00_0000_FFFF,
        0x008F_9200_0000_FFFF,
        0x00CF_FA00_0000_FFFF,
        0x00CF_F200_0000_FFFF,
        tss_desc,
        gate,
        0x0000_9200_0000_0FFF,
        0x0040_9600_0000_0FFF,
        // 0x58: 16-bit call gate DPL 3 -> 0x18:0x0200, 1 word parameter.
        gate_descriptor(0x0200, 0x18, 1, 0xE4),
        // 0x60: an LDT at 0x4000 (limit 0xF).
        0x0000_8200_4000_000F,
        // 0x68: 32-bit call gate DPL 0 -> 0x08:0x9100, no parameters.
        gate_descriptor(0x9100, 0x08, 0, 0x8C),
        // 0x70: a second 32-bit TSS at 0x5800 (limit 0x67), available.
        0x0000_8900_5800_0067,
        // 0x78: a task gate to it, DPL 0.
        gate_descriptor(0, 0x70, 0, 0x85),
    ];
    for (n, d) in gdt.iter().enumerate() {
        mem.write_u64(0x800 + 8 * n as u64, *d).unwrap();
    }
}

const PM_HANDLERS: u64 = 0x20000;

/// The length of a 32-bit code sequence.
fn len32(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> u64 {
    assemble(32, 0x10000, f).len() as u64
}

/// 32-bit protected mode at CPL 0, paging off, with the GDT above, a TSS
/// (ESP0 = 0x70000, SS0 = 0x10) and 32-bit interrupt gates whose vector-n
/// handler is a HLT at PM_HANDLERS + 16n; code at 0x10000.
fn pm32(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> InterpVcpu {
    let mut v = reset_vcpu();
    write_gdt(&v.mem);
    v.mem.write_u32(0x3004, 0x70000).unwrap();
    v.mem.write_u16(0x3008, 0x10).unwrap();
    v.mem.write_u16(0x3066, 0x68).unwrap();
    for n in 0..256u64 {
        let h = PM_HANDLERS + 16 * n;
        let gate = (h & 0xffff) | (0x08 << 16) | (0x8Eu64 << 40) | ((h >> 16) << 48);
        v.mem.write_u64(0x1000 + 8 * n, gate).unwrap();
        v.mem.write_u8(h, 0xf4).unwrap();
    }
    let code = assemble(32, 0x10000, f);
    v.mem.write(0x10000, &code).unwrap();
    let code_seg = Segment::flat(0x08, 0xb, false);
    let data = Segment::flat(0x10, 3, false);
    let s = Sregs {
        cs: code_seg,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: Segment {
            selector: 0x38,
            base: 0x3000,
            limit: 0x2067,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        ldt: Segment {
            unusable: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: 0x800,
            limit: 0x7f,
        },
        idt: DescriptorTable {
            base: 0x1000,
            limit: 0x7ff,
        },
        cr0: cr0::PE | cr0::ET,
        ..Default::default()
    };
    v.set_sregs(&s).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rip = 0x10000;
    r.rsp = 0x80000;
    r.rflags = 2;
    v.set_regs(&r).unwrap();
    v
}

/// Drops `v` to CPL 3 (CS 0x2B, SS = DS = 0x33, ESP 0x90000), keeping DS
/// = ES = the DPL-0 data segment so the return path must null them.
fn to_ring3(v: &mut InterpVcpu) {
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::flat(0x2b, 0xb, false);
    s.cs.dpl = 3;
    s.ss = Segment::flat(0x33, 3, false);
    s.ss.dpl = 3;
    s.fs = s.ss;
    s.gs = s.ss;
    v.set_sregs(&s).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rsp = 0x90000;
    v.set_regs(&r).unwrap();
}

/// Asserts the run stopped in the protected-mode handler of `vector`.
fn pm_handler(v: &mut InterpVcpu, vector: u64) -> u64 {
    assert_eq!(run(v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(
        r.rip,
        PM_HANDLERS + 16 * vector + 1,
        "expected vector {vector}"
    );
    r.rsp
}

#[test]
fn enter_protected_mode_and_return_to_big_real_mode() {
    // Real mode: LGDT, CR0.PE=1, far JMP to the 16-bit code segment, load
    // DS with the flat 4 GiB segment, clear PE, far JMP back to real mode,
    // load DS = 0 (base 0, cached 4 GiB limit kept), read above 1 MiB.
    let mut v = reset_vcpu();
    write_gdt(&v.mem);
    v.mem.write_u16(0x7000, 0x7f).unwrap();
    v.mem.write_u32(0x7002, 0x800).unwrap();
    v.mem.write_u32(0x20_0000, 0xcafe_f00d).unwrap();
    let pm = assemble(16, 0x7c20, |a| {
        a.mov(ax, 0x20)?;
        a.mov(ds, ax)?;
        a.mov(eax, cr0)?;
        a.and(eax, !1u32 as i32)?;
        a.mov(cr0, eax)?;
        a.db(&[0xea, 0x40, 0x7c, 0x00, 0x00])
    });
    let rm = assemble(16, 0x7c40, |a| {
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ebx, 0x20_0000)?;
        a.mov(ecx, dword_ptr(ebx))?;
        a.hlt()
    });
    let start = assemble(16, 0x7c00, |a| {
        a.lgdt(word_ptr(0x7000))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        a.db(&[0xea, 0x20, 0x7c, 0x18, 0x00])
    });
    v.mem.write(0x7c00, &start).unwrap();
    v.mem.write(0x7c20, &pm).unwrap();
    v.mem.write(0x7c40, &rm).unwrap();
    v.mem
        .write(0xffff0, &[0xea, 0x00, 0x7c, 0x00, 0x00])
        .unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!(r.rcx, 0xcafe_f00d, "big real mode reads above 1 MiB");
    assert_eq!(s.cr0 & cr0::PE, 0);
    assert_eq!((s.ds.selector, s.ds.base, s.ds.limit), (0, 0, 0xffff_ffff));
    assert_eq!((s.cs.selector, s.cs.base, s.cs.limit), (0, 0, 0xffff));

    // Without the protected-mode detour the same read is #GP.
    let mut v = real_mode(0, 0x7c40, |a| {
        a.mov(ebx, 0x20_0000)?;
        a.mov(ecx, dword_ptr(ebx))?;
        a.hlt()
    });
    rm_frame(&mut v, 13);
}

#[test]
fn protected_mode_segment_limits_and_types() {
    // DS = 0x48 (limit 0xFFF): offset 0xFFE word is fine, 0xFFF is #GP(0).
    let mut v = pm32(|a| {
        a.mov(ax, 0x48)?;
        a.mov(ds, ax)?;
        a.mov(word_ptr(0xffe), ax)?;
        a.mov(word_ptr(0xfff), ax)?;
        a.hlt()
    });
    let top = pm_handler(&mut v, 13);
    assert_eq!(v.mem.read_u32(top).unwrap(), 0);
    let at = 0x10000
        + len32(|a| {
            a.mov(ax, 0x48)?;
            a.mov(ds, ax)?;
            a.mov(word_ptr(0xffe), ax)
        });
    assert_eq!(u64::from(v.mem.read_u32(top + 4).unwrap()), at);
    assert_eq!(v.mem.read_u16(0xffe).unwrap(), 0x48);
    // Expand-down SS (0x50, limit 0xFFF, B=1): ESP 0x1000 -> push at 0xFFC
    // is below the limit: #SS(0).
    let mut v = pm32(|a| {
        a.mov(ax, 0x50)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x2000)?;
        a.push(eax)?;
        a.mov(esp, 0x1000)?;
        a.push(eax)?;
        a.hlt()
    });
    // The #SS is delivered at CPL 0 on the same (faulting) stack: its
    // frame does not fit either (#SS during #SS is #DF), and neither does
    // the #DF frame: shutdown.
    assert_eq!(run(&mut v), VcpuExit::Shutdown);
    assert_eq!(
        v.mem.read_u32(0x1ffc).unwrap(),
        0x50,
        "the first push went to 0x1FFC"
    );
    // A write through a code segment override is #GP(0).
    let mut v = pm32(|a| {
        a.mov(dword_ptr(0x100).cs(), eax)?;
        a.hlt()
    });
    pm_handler(&mut v, 13);
}

#[test]
fn call_gate_from_ring3_switches_stacks_and_copies_parameters() {
    let mut v = pm32(|a| {
        a.push(0x1111_1111)?;
        a.push(0x2222_2222)?;
        // CALL FAR 0x43:0 (the gate, RPL 3; the offset is ignored).
        a.db(&[0x9a, 0, 0, 0, 0, 0x43, 0x00])?;
        a.hlt()
    });
    to_ring3(&mut v);
    // The ring-0 target: HLT.
    v.mem.write_u8(0x9000, 0xf4).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!(r.rip, 0x9001);
    assert_eq!((s.cs.selector, s.cs.dpl), (0x08, 0));
    assert_eq!(s.ss.selector, 0x10);
    // New stack from TSS.ESP0: SS, ESP, param 1, param 0, CS, EIP.
    assert_eq!(r.rsp, 0x70000 - 24);
    let w = |o: u64| v.mem.read_u32(0x70000 - 24 + o).unwrap();
    assert_eq!(w(0), 0x10000 + 5 + 5 + 7, "return EIP");
    assert_eq!(w(4), 0x2b, "return CS");
    assert_eq!(w(8), 0x2222_2222, "parameters keep their order");
    assert_eq!(w(12), 0x1111_1111);
    assert_eq!(w(16), 0x90000 - 8, "caller ESP");
    assert_eq!(w(20), 0x33, "caller SS");
}

#[test]
fn far_ret_to_ring3_pops_ss_esp_and_nulls_data_segments() {
    // Ring 0 builds a RETF frame to ring 3 (SS 0x33:0x8FFF0, CS 0x2B) with
    // 8 bytes of parameters, with DS = 0x10 (DPL 0) and FS = 0x33 (DPL 3).
    let mut v = pm32(|a| {
        a.push(0x33)?;
        a.push(0x8fff0)?;
        a.push(0xaaaa)?;
        a.push(0xbbbb)?;
        a.push(0x2b)?;
        a.push(0x12000)?;
        a.mov(ax, 0x33)?;
        a.mov(fs, ax)?;
        a.retf_1(8)
    });
    // Ring 3 at 0x12000: HLT is privileged: #GP(0) from ring 3 goes
    // through the IDT with a stack switch to TSS.ESP0.
    v.mem.write_u8(0x12000, 0xf4).unwrap();
    let top = pm_handler(&mut v, 13);
    assert_eq!(top, 0x70000 - 24);
    let w = |o: u64| v.mem.read_u32(top + o).unwrap();
    assert_eq!(w(0), 0, "error code");
    assert_eq!(w(4), 0x12000, "faulting EIP at ring 3");
    assert_eq!(w(8), 0x2b);
    assert_eq!(
        w(16),
        0x8fff0 + 8,
        "RETF imm16 also pops the outer parameters"
    );
    assert_eq!(w(20), 0x33);
    let s = v.get_sregs().unwrap();
    assert!(
        s.ds.unusable && s.es.unusable,
        "DPL-0 data segments become null"
    );
    assert!(!s.fs.unusable, "a DPL-3 segment stays");
    assert_eq!(s.ds.selector & 0xfffc, 0);
}

#[test]
fn iret_to_ring3_and_interrupt_back_through_tss_esp0() {
    let mut v = pm32(|a| {
        a.push(0x33)?;
        a.push(0x8fff0)?;
        a.push(0x202)?;
        a.push(0x2b)?;
        a.push(0x12000)?;
        a.iretd()
    });
    let ring3 = assemble(32, 0x12000, |a| {
        a.mov(eax, 0x55)?;
        a.int(0x80)
    });
    v.mem.write(0x12000, &ring3).unwrap();
    // Gate 0x80 with DPL 3 so that INT from ring 3 is allowed.
    let h = PM_HANDLERS + 16 * 0x80;
    let gate = (h & 0xffff) | (0x08 << 16) | (0xEEu64 << 40) | ((h >> 16) << 48);
    v.mem.write_u64(0x1000 + 8 * 0x80, gate).unwrap();
    let top = pm_handler(&mut v, 0x80);
    let w = |o: u64| v.mem.read_u32(top + o).unwrap();
    assert_eq!((w(0), w(4)), (0x12000 + 7, 0x2b));
    assert_ne!(w(8) & IF as u32, 0);
    assert_eq!((w(12), w(16)), (0x8fff0, 0x33));
    assert_eq!(
        v.get_regs().unwrap().rflags & IF,
        0,
        "an interrupt gate clears IF"
    );
}

#[test]
fn io_permission_bitmap_decides_at_cpl3() {
    // Bitmap at TSS+0x68: port 0x80 allowed, 0x81 denied.
    let prog = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.out(0x80, al)?;
        a.out(0x81, al)?;
        a.hlt()
    };
    let mut v = pm32(prog);
    v.mem.write_u8(0x3068 + 0x10, 0x02).unwrap();
    to_ring3(&mut v);
    match run(&mut v) {
        VcpuExit::IoOut { port: 0x80, .. } => {}
        e => panic!("expected the OUT to port 0x80, got {e:?}"),
    }
    let top = pm_handler(&mut v, 13);
    assert_eq!(v.mem.read_u32(top).unwrap(), 0, "#GP(0)");
    assert_eq!(
        v.mem.read_u32(top + 4).unwrap(),
        0x10002,
        "at the second OUT"
    );

    // A 16-bit access needs both bits clear: port 0x87 with 0x88 denied.
    let mut v = pm32(|a| {
        a.mov(dx, 0x87)?;
        a.out(dx, ax)
    });
    v.mem.write_u8(0x3068 + 0x11, 0x01).unwrap();
    to_ring3(&mut v);
    pm_handler(&mut v, 13);

    // With IOPL = 3 the bitmap is not consulted.
    let mut v = pm32(prog);
    v.mem.write_u8(0x3068 + 0x10, 0xff).unwrap();
    to_ring3(&mut v);
    let mut r = v.get_regs().unwrap();
    r.rflags = 2 | (3 << 12);
    v.set_regs(&r).unwrap();
    assert!(matches!(run(&mut v), VcpuExit::IoOut { port: 0x80, .. }));
    assert!(matches!(run(&mut v), VcpuExit::IoOut { port: 0x81, .. }));

    // A port whose bitmap byte lies beyond the TSS limit is denied.
    let mut v = pm32(|a| {
        a.mov(dx, 0xfff8)?;
        a.in_(al, dx)
    });
    let mut s = v.get_sregs().unwrap();
    s.tr.limit = 0x100;
    v.set_sregs(&s).unwrap();
    to_ring3(&mut v);
    pm_handler(&mut v, 13);
}

#[test]
fn sixteen_bit_interrupt_gate_pushes_a_16_bit_frame() {
    let mut v = pm32(|a| {
        a.int(0x30)?;
        a.hlt()
    });
    // A 16-bit interrupt gate (type 6) to 0x18 (16-bit code) : 0x0100.
    v.mem
        .write_u64(0x1000 + 8 * 0x30, 0x0100 | (0x18 << 16) | (0x86u64 << 40))
        .unwrap();
    v.mem.write_u8(0x100, 0xf4).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, 0x101);
    assert_eq!(r.rsp, 0x80000 - 6);
    assert_eq!(v.mem.read_u16(0x80000 - 6).unwrap(), 2, "IP (16 bits)");
    assert_eq!(v.mem.read_u16(0x80000 - 4).unwrap(), 0x08);
    assert_eq!(v.get_sregs().unwrap().cs.selector, 0x18);
}

#[test]
fn double_fault_in_32_bit_protected_mode() {
    // #GP whose gate is not present: #NP during #GP is #DF(0).
    let mut v = pm32(|a| {
        a.mov(ax, 0x100)?;
        a.mov(ds, ax)
    });
    v.mem.write_u8(0x1000 + 8 * 13 + 5, 0x0e).unwrap();
    let top = pm_handler(&mut v, 8);
    assert_eq!(v.mem.read_u32(top).unwrap(), 0);
    // #DF's gate not present too: shutdown.
    let mut v = pm32(|a| {
        a.mov(ax, 0x100)?;
        a.mov(ds, ax)
    });
    v.mem.write_u8(0x1000 + 8 * 13 + 5, 0x0e).unwrap();
    v.mem.write_u8(0x1000 + 8 * 8 + 5, 0x0e).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Shutdown);
}

#[test]
fn lar_lsl_verr_verw_arpl() {
    let mut v = pm32(|a| {
        a.mov(ecx, 0x2b)?;
        a.lar(eax, ecx)?;
        a.lsl(ebx, ecx)?;
        a.setz(dl)?;
        a.mov(cx, 0x48)?;
        a.lsl(esi, ecx)?;
        a.verw(cx)?;
        a.setz(dh)?;
        a.mov(cx, 0x08)?;
        a.verw(cx)?;
        a.setnz(byte_ptr(0x500))?;
        a.verr(cx)?;
        a.setz(byte_ptr(0x501))?;
        a.mov(cx, 0x500)?; // beyond the GDT limit
        a.lar(edi, ecx)?;
        a.setnz(byte_ptr(0x502))?;
        a.mov(ax, 0x10)?;
        a.mov(cx, 0x2b)?;
        a.arpl(ax, cx)?;
        a.setz(byte_ptr(0x503))?;
        a.mov(word_ptr(0x504), ax)?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rbx, 0xffff_ffff, "LSL scales a page-granular limit");
    assert_eq!(r.rdx & 0xffff, 0x0101);
    assert_eq!(r.rsi, 0xfff);
    for (off, what) in [
        (0x500, "VERW code"),
        (0x501, "VERR code"),
        (0x502, "LAR beyond limit"),
    ] {
        assert_eq!(v.mem.read_u8(off).unwrap(), 1, "{what}");
    }
    assert_eq!(v.mem.read_u8(0x503).unwrap(), 1, "ARPL raised the RPL");
    assert_eq!(v.mem.read_u16(0x504).unwrap(), 0x13);
    // LAR after ARPL changed EAX: check the access rights through a fresh run.
    let mut v = pm32(|a| {
        a.mov(ecx, 0x2b)?;
        a.lar(eax, ecx)?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    // Bits 8-15 and 20-23 of the descriptor's high doubleword.
    assert_eq!(v.get_regs().unwrap().rax, 0x00c0_fa00);
}

#[test]
fn smsw_lmsw_clts_str_sldt_sgdt() {
    let mut v = pm32(|a| {
        a.smsw(ax)?;
        a.mov(ebx, cr0)?;
        a.or(ebx, 8)?; // TS
        a.mov(cr0, ebx)?;
        a.clts()?;
        a.smsw(cx)?;
        a.mov(dx, 0x6)?; // MP | EM, PE omitted: LMSW cannot clear PE
        a.lmsw(dx)?;
        a.str(si)?;
        a.sldt(di)?;
        a.sgdt(ptr(0x600))?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!(r.rax & 0xffff, (cr0::PE | cr0::ET) & 0xffff);
    assert_eq!(r.rcx & 8, 0, "CLTS cleared TS");
    assert_eq!(s.cr0 & 0xf, cr0::PE | 6);
    assert_eq!(r.rsi & 0xffff, 0x38);
    assert_eq!(r.rdi & 0xffff, 0);
    assert_eq!(v.mem.read_u16(0x600).unwrap(), 0x7f);
    assert_eq!(v.mem.read_u32(0x602).unwrap(), 0x800);
}

#[test]
fn thirty_two_bit_paging_with_4m_pages_and_accessed_dirty_bits() {
    // PD at 0x100000: PDE 0 = 4 MiB page at 0 (PS), PDE 1 -> PT at
    // 0x101000 whose entry 0 maps 0x400000 to 0x5000, read-only.
    let mut v = pm32(|a| {
        a.mov(eax, 0x100000)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, cr4::PSE as i32)?;
        a.mov(cr4, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8001_0000u32 as i32)?; // PG | WP
        a.mov(cr0, eax)?;
        a.mov(ebx, dword_ptr(0x400010))?;
        a.mov(dword_ptr(0x6000), ebx)?;
        a.mov(dword_ptr(0x400010), ebx)?;
        a.hlt()
    });
    v.mem.write_u32(0x100000, 0x83).unwrap();
    v.mem.write_u32(0x100004, 0x101003).unwrap();
    v.mem.write_u32(0x101000, 0x5001).unwrap();
    v.mem.write_u32(0x5010, 0x1234_5678).unwrap();
    let top = pm_handler(&mut v, 14);
    assert_eq!(v.get_regs().unwrap().rbx, 0x1234_5678);
    assert_eq!(v.mem.read_u32(0x6000).unwrap(), 0x1234_5678);
    // The write to the read-only page: #PF with P | W.
    assert_eq!(v.mem.read_u32(top).unwrap(), 3);
    assert_eq!(v.get_sregs().unwrap().cr2, 0x400010);
    // Accessed on the PDEs and PTE, dirty on the written 4 MiB page.
    assert_eq!(v.mem.read_u32(0x100000).unwrap() & 0x60, 0x60);
    assert_eq!(v.mem.read_u32(0x100004).unwrap() & 0x20, 0x20);
    assert_eq!(v.mem.read_u32(0x101000).unwrap() & 0x60, 0x20);
}

#[test]
fn pae_paging_in_32_bit_mode_and_pdpte_checks() {
    // PDPT at 0x100000 (32-byte aligned), PDPTE 0 -> PD 0x101000: PDE 0 =
    // 2 MiB page at 0, PDE 2 -> PT 0x102000 whose entry 0 maps 0x400000 to
    // 0x7000 with XD set.
    let mut v = pm32(|a| {
        a.mov(eax, 0x100000)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, cr4::PAE as i32)?;
        a.mov(cr4, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        a.mov(ebx, dword_ptr(0x400008))?;
        a.mov(eax, 0x400000)?;
        a.call(eax)
    });
    v.mem.write_u64(0x100000, 0x101001).unwrap();
    v.mem.write_u64(0x101000, 0x83).unwrap();
    v.mem.write_u64(0x101010, 0x102003).unwrap();
    v.mem.write_u64(0x102000, 0x8000_0000_0000_7003).unwrap();
    v.mem.write_u32(0x7008, 0xfeed_beef).unwrap();
    let mut s = v.get_sregs().unwrap();
    s.efer = efer::NXE;
    v.set_sregs(&s).unwrap();
    let top = pm_handler(&mut v, 14);
    assert_eq!(v.get_regs().unwrap().rbx, 0xfeed_beef);
    // Executing the XD page: #PF with P | I.
    assert_eq!(v.mem.read_u32(top).unwrap(), 0x11);
    assert_eq!(v.get_sregs().unwrap().cr2, 0x400000);

    // A PDPTE with a reserved bit makes the MOV to CR3 #GP(0).
    let mut v = pm32(|a| {
        a.mov(eax, 0x100000)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr4)?;
        a.or(eax, cr4::PAE as i32)?;
        a.mov(cr4, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        a.mov(eax, 0x100000)?;
        a.mov(dword_ptr(0x100008), 0x2007)?; // bits 1-2 reserved
        a.mov(cr3, eax)?;
        a.hlt()
    });
    v.mem.write_u64(0x100000, 0x101001).unwrap();
    v.mem.write_u64(0x101000, 0x83).unwrap();
    let top = pm_handler(&mut v, 13);
    assert_eq!(v.mem.read_u32(top).unwrap(), 0);
    let at = 0x10000
        + len32(|a| {
            a.mov(eax, 0x100000)?;
            a.mov(cr3, eax)?;
            a.mov(eax, cr4)?;
            a.or(eax, cr4::PAE as i32)?;
            a.mov(cr4, eax)?;
            a.mov(eax, cr0)?;
            a.or(eax, 0x8000_0000u32 as i32)?;
            a.mov(cr0, eax)?;
            a.mov(eax, 0x100000)?;
            a.mov(dword_ptr(0x100008), 0x2007)
        });
    assert_eq!(u64::from(v.mem.read_u32(top + 4).unwrap()), at);
}

/// The second task's TSS at 0x5800: EIP `eip`, ESP 0x60000, EAX 0xA5,
/// CS 0x08, the data segments 0x10, no LDT.
fn write_task2(v: &InterpVcpu, eip: u32) {
    let t = 0x5800u64;
    v.mem.write_u32(t + 0x20, eip).unwrap();
    v.mem.write_u32(t + 0x24, 2).unwrap();
    v.mem.write_u32(t + 0x28, 0xa5).unwrap();
    v.mem.write_u32(t + 0x38, 0x60000).unwrap();
    for (k, sel) in [0x10u32, 0x08, 0x10, 0x10, 0x10, 0x10].iter().enumerate() {
        v.mem.write_u32(t + 0x48 + 4 * k as u64, *sel).unwrap();
    }
}

#[test]
fn jmp_to_a_tss_switches_tasks() {
    let mut v = pm32(|a| {
        a.mov(eax, 0x77)?;
        a.db(&[0xea, 0, 0, 0, 0, 0x70, 0x00])
    });
    write_task2(&v, 0x11000);
    v.mem.write_u8(0x11000, 0xf4).unwrap();
    // The running task's descriptor is busy, as LTR leaves it.
    v.mem.write_u8(0x838 + 5, 0x8b).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!((r.rip, r.rax, r.rsp), (0x11001, 0xa5, 0x60000));
    assert_eq!((s.tr.selector, s.tr.base, s.tr.type_), (0x70, 0x5800, 0xb));
    assert_ne!(s.cr0 & cr0::TS, 0, "a task switch sets CR0.TS");
    assert_eq!(r.rflags & crate::flags::NT, 0, "JMP does not nest");
    // The old task's state went to its TSS.
    assert_eq!(v.mem.read_u32(0x3020).unwrap(), 0x10000 + 5 + 7);
    assert_eq!(v.mem.read_u32(0x3028).unwrap(), 0x77);
    assert_eq!(v.mem.read_u32(0x3038).unwrap(), 0x80000);
    assert_eq!(v.mem.read_u16(0x304c).unwrap(), 0x08);
    // Busy bits: the old one cleared, the new one set.
    assert_eq!(v.mem.read_u8(0x838 + 5).unwrap(), 0x89);
    assert_eq!(v.mem.read_u8(0x870 + 5).unwrap(), 0x8b);
}

#[test]
fn call_through_a_task_gate_nests_and_iret_returns() {
    let mut v = pm32(|a| {
        a.mov(eax, 0x77)?;
        a.db(&[0x9a, 0, 0, 0, 0, 0x78, 0x00])?;
        a.hlt()
    });
    write_task2(&v, 0x11000);
    let t2 = assemble(32, 0x11000, |a| {
        a.mov(dword_ptr(0x700), eax)?;
        a.pushfd()?;
        a.pop(dword_ptr(0x704))?;
        a.iretd()
    });
    v.mem.write(0x11000, &t2).unwrap();
    v.mem.write_u8(0x838 + 5, 0x8b).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!(v.mem.read_u32(0x700).unwrap(), 0xa5, "the new task ran");
    assert_ne!(
        u64::from(v.mem.read_u32(0x704).unwrap()) & crate::flags::NT,
        0,
        "CALL sets NT in the nested task"
    );
    assert_eq!(v.mem.read_u16(0x5800).unwrap(), 0x38, "previous-task link");
    assert_eq!((r.rip, r.rax), (0x10000 + 5 + 7 + 1, 0x77));
    assert_eq!(s.tr.selector, 0x38);
    assert_eq!(
        v.mem.read_u8(0x870 + 5).unwrap(),
        0x89,
        "IRET frees the nested task"
    );
    assert_eq!(v.mem.read_u8(0x838 + 5).unwrap(), 0x8b);
}

#[test]
fn double_fault_through_a_task_gate_gets_a_fresh_stack() {
    // #GP's gate is not present: #DF, whose IDT entry is a task gate.
    let mut v = pm32(|a| {
        a.mov(esp, 0x1234)?;
        a.mov(ax, 0x100)?;
        a.mov(ds, ax)
    });
    v.mem.write_u8(0x1000 + 8 * 13 + 5, 0x0e).unwrap();
    v.mem
        .write_u64(0x1000 + 8 * 8, 0x70 << 16 | (0x85u64 << 40))
        .unwrap();
    write_task2(&v, 0x11000);
    v.mem.write_u8(0x11000, 0xf4).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, 0x11001);
    assert_eq!(
        r.rsp,
        0x60000 - 4,
        "the error code is pushed on the new stack"
    );
    assert_eq!(v.mem.read_u32(0x60000 - 4).unwrap(), 0);
    assert_eq!(
        v.mem.read_u32(0x3038).unwrap(),
        0x1234,
        "the faulting task's ESP"
    );
    assert_eq!(
        v.mem.read_u32(0x3020).unwrap(),
        0x10000 + 5 + 4,
        "EIP of the faulting MOV"
    );
}

#[test]
fn random_16_bit_code_never_panics() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut retired = 0;
    for round in 0..400 {
        let mut v = real_mode(0x1000, 0x100, |a| a.nop());
        let mut code = [0u8; 64];
        for c in code.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        v.mem.write(0x10100, &code).unwrap();
        let mut r = v.get_regs().unwrap();
        for g in [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rbp,
        ] {
            *g = next()
                & if round % 2 == 0 {
                    0xffff
                } else {
                    u64::MAX >> 32
                };
        }
        v.set_regs(&r).unwrap();
        if round % 3 == 0 {
            // Some rounds in 16-bit protected mode over the test GDT.
            write_gdt(&v.mem);
            let mut s = v.get_sregs().unwrap();
            s.gdt = DescriptorTable {
                base: 0x800,
                limit: 0x7f,
            };
            s.cr0 |= cr0::PE;
            v.set_sregs(&s).unwrap();
        }
        // Single steps bound the work of a round (random code loops).
        for _ in 0..256 {
            match v.step_one().unwrap() {
                None => {}
                Some(VcpuExit::IoIn { .. }) => v.io_data().fill(0xff),
                Some(VcpuExit::MmioRead { .. }) => v.mmio_data().fill(0),
                Some(VcpuExit::RdMsr { .. }) => v.complete_rdmsr(None),
                Some(VcpuExit::WrMsr { .. }) => v.complete_wrmsr(false),
                Some(VcpuExit::IoOut { .. } | VcpuExit::MmioWrite { .. }) => {}
                Some(_) => break,
            }
        }
        retired += v.retired();
        let r = v.get_regs().unwrap();
        assert_ne!(r.rflags & 2, 0);
    }
    assert!(retired > 400, "random code must retire instructions");
}

#[test]
fn sixteen_bit_call_gate_copies_words_and_pushes_a_16_bit_frame() {
    let mut v = pm32(|a| {
        a.push(0x1234)?;
        // CALL FAR 0x5B:0 (the 16-bit gate, RPL 3).
        a.db(&[0x9a, 0, 0, 0, 0, 0x5b, 0x00])?;
        a.hlt()
    });
    to_ring3(&mut v);
    v.mem.write_u8(0x200, 0xf4).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!((s.cs.selector, r.rip), (0x18, 0x201));
    assert_eq!(r.rsp, 0x70000 - 10);
    let w = |o: u64| v.mem.read_u16(0x70000 - 10 + o).unwrap();
    assert_eq!(w(0), 0x0007 + 5, "IP: the low 16 bits of the return EIP");
    assert_eq!(w(2), 0x2b);
    assert_eq!(w(4), 0x1234, "one word copied");
    assert_eq!(w(6), 0xfffc, "caller SP (16 bits)");
    assert_eq!(w(8), 0x33);
}

#[test]
fn call_gate_checks_privileges_and_jmp_through_a_gate() {
    // Gate 0x68 has DPL 0: a CALL from ring 3 is #GP(0x68).
    let mut v = pm32(|a| a.db(&[0x9a, 0, 0, 0, 0, 0x6b, 0x00]));
    to_ring3(&mut v);
    let top = pm_handler(&mut v, 13);
    assert_eq!(v.mem.read_u32(top).unwrap(), 0x68);
    // From ring 0 a JMP through it goes to 0x08:0x9100 without pushing.
    let mut v = pm32(|a| a.db(&[0xea, 0, 0, 0, 0, 0x68, 0x00]));
    v.mem.write_u8(0x9100, 0xf4).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rip, r.rsp), (0x9101, 0x80000));
    // A same-privilege far CALL and RETF to a code segment.
    let mut v = pm32(|a| {
        a.db(&[0x9a, 0x00, 0x91, 0, 0, 0x08, 0x00])?;
        a.hlt()
    });
    v.mem.write_u8(0x9100, 0xcb).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rip, r.rsp), (0x10008, 0x80000));
    assert_eq!(v.mem.read_u32(0x80000 - 8).unwrap(), 0x10007);
    assert_eq!(v.mem.read_u32(0x80000 - 4).unwrap(), 0x08);
}

#[test]
fn lldt_and_a_segment_load_through_the_ldt() {
    let mut v = pm32(|a| {
        a.mov(ax, 0x60)?;
        a.lldt(ax)?;
        a.mov(ax, 0x0c)?;
        a.mov(es, ax)?;
        a.mov(ax, 0x14)?; // LDT index 2: beyond the LDT limit
        a.mov(fs, ax)?;
        a.hlt()
    });
    // LDT entry 1: data, base 0x123000, limit 0xFFFF.
    v.mem.write_u64(0x4008, 0x0000_9212_3000_FFFF).unwrap();
    let top = pm_handler(&mut v, 13);
    let s = v.get_sregs().unwrap();
    assert_eq!(
        (s.ldt.selector, s.ldt.base, s.ldt.limit),
        (0x60, 0x4000, 0xf)
    );
    assert_eq!(
        (s.es.selector, s.es.base, s.es.limit),
        (0x0c, 0x12_3000, 0xffff)
    );
    assert_eq!(v.mem.read_u32(top).unwrap(), 0x14, "#GP(selector)");
    // The accessed bit went to the LDT entry, not to the GDT.
    assert_eq!(v.mem.read_u8(0x4008 + 5).unwrap(), 0x93);
    assert_eq!(
        v.mem.read_u8(0x808 + 5).unwrap(),
        0x9b,
        "GDT entry 1 is still code"
    );
}

#[test]
fn injected_external_interrupt_in_real_mode_uses_the_ivt() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.nop()?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rflags = 2 | IF;
    v.set_regs(&r).unwrap();
    v.inject(tandem_core::cpu::Event::external(0x08)).unwrap();
    let (ip, csel, fl) = rm_frame(&mut v, 8);
    assert_eq!(
        (ip, csel),
        (0x100, 0x1000),
        "delivered before any instruction"
    );
    assert_ne!(u64::from(fl) & IF, 0);
    assert_eq!(v.get_regs().unwrap().rflags & IF, 0);
}

#[test]
fn near_ret_beyond_the_cs_limit_faults_with_sp_unchanged() {
    // A code segment with limit 0x10FFF: RET to 0x11000 is beyond it.
    let mut v = pm32(|a| {
        a.push(0x1_1000)?;
        a.ret()
    });
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment {
        selector: 0x08,
        limit: 0x1_0fff,
        g: false,
        ..s.cs
    };
    v.set_sregs(&s).unwrap();
    let top = pm_handler(&mut v, 13);
    assert_eq!(v.mem.read_u32(top + 4).unwrap(), 0x10005, "the RET faulted");
    assert_eq!(
        top,
        0x80000 - 4 - 16,
        "the pushed word is still on the stack"
    );
}

#[test]
fn iretd_to_virtual_8086_mode_and_a_fault_back_to_ring0() {
    // Ring 0 IRETDs to V86 (IOPL 0) at 0x1000:0x0100 with SS:SP =
    // 0x2000:0xFFF0 and DS = 0x3000.
    let mut v = pm32(|a| {
        for x in [0x4000u32, 0x3500, 0x3000, 0x3100, 0x2000, 0xfff0] {
            a.push(x)?;
        }
        a.push(0x2_0002)?; // VM | bit 1
        a.push(0x1000)?;
        a.push(0x0100)?;
        a.iretd()
    });
    let v86 = assemble(16, 0x100, |a| {
        a.mov(ax, word_ptr(0x10))?;
        a.push(ax)?;
        a.out(0x80, al)?;
        a.cli()
    });
    v.mem.write(0x10100, &v86).unwrap();
    v.mem.write_u16(0x30010, 0x4242).unwrap();
    // Run to the OUT: the bitmap (all clear) allows it even at IOPL 0.
    match run(&mut v) {
        VcpuExit::IoOut { port: 0x80, .. } => {}
        e => panic!("expected the OUT, got {e:?}"),
    }
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_ne!(r.rflags & crate::flags::VM, 0);
    assert_eq!(r.rax & 0xffff, 0x4242, "DS base = 0x3000 << 4");
    assert_eq!((s.cs.base, s.cs.dpl, s.cs.limit), (0x10000, 3, 0xffff));
    assert_eq!(
        v.mem.read_u16(0x2ffee).unwrap(),
        0x4242,
        "pushed at SS:SP-2"
    );
    // CLI with IOPL 0 is #GP(0): delivered to ring 0 with the V86 frame.
    let top = pm_handler(&mut v, 13);
    assert_eq!(top, 0x70000 - 40);
    let w = |o: u64| v.mem.read_u32(top + o).unwrap();
    assert_eq!(w(0), 0, "error code");
    assert_eq!(w(4), 0x100 + v86.len() as u32 - 1, "EIP of the CLI");
    assert_eq!(w(8), 0x1000);
    assert_ne!(u64::from(w(12)) & crate::flags::VM, 0);
    assert_eq!((w(16), w(20)), (0xffee, 0x2000));
    assert_eq!(
        (w(24), w(28), w(32), w(36)),
        (0x3100, 0x3000, 0x3500, 0x4000)
    );
    let s = v.get_sregs().unwrap();
    let r = v.get_regs().unwrap();
    assert_eq!(r.rflags & crate::flags::VM, 0);
    assert!(s.ds.unusable && s.es.unusable && s.fs.unusable && s.gs.unusable);
    assert_eq!(s.cs.selector, 0x08);
}

#[test]
fn int_n_in_virtual_8086_mode_is_iopl_sensitive() {
    let run_int = |iopl: u32| {
        let mut v = pm32(|a| {
            for x in [0u32, 0, 0x3000, 0x3000, 0x2000, 0xfff0] {
                a.push(x)?;
            }
            a.push(0x2_0002 | (iopl << 12))?;
            a.push(0x1000)?;
            a.push(0x0100)?;
            a.iretd()
        });
        v.mem.write(0x10100, &[0xcd, 0x21]).unwrap();
        let h = PM_HANDLERS + 16 * 0x21;
        let gate = (h & 0xffff) | (0x08 << 16) | (0xEEu64 << 40) | ((h >> 16) << 48);
        v.mem.write_u64(0x1000 + 8 * 0x21, gate).unwrap();
        assert_eq!(run(&mut v), VcpuExit::Hlt);
        v.get_regs().unwrap().rip
    };
    assert_eq!(run_int(0), PM_HANDLERS + 16 * 13 + 1, "IOPL 0: #GP(0)");
    assert_eq!(
        run_int(3),
        PM_HANDLERS + 16 * 0x21 + 1,
        "IOPL 3: the ring-0 handler"
    );
}

#[test]
fn lss_lfs_lgs_in_protected_mode_check_the_selector() {
    let mut v = pm32(|a| {
        a.lss(esp, fword_ptr(0x600))?;
        a.lfs(ebx, fword_ptr(0x606))?;
        a.lgs(ecx, fword_ptr(0x60c))?;
        a.hlt()
    });
    v.mem.write_u32(0x600, 0x5000).unwrap();
    v.mem.write_u16(0x604, 0x48).unwrap();
    v.mem.write_u32(0x606, 0x1111).unwrap();
    v.mem.write_u16(0x60a, 0x10).unwrap();
    v.mem.write_u32(0x60c, 0x2222).unwrap();
    v.mem.write_u16(0x610, 0x08).unwrap(); // a code segment: readable, allowed
                                           // SS = 0x48 has limit 0xFFF: ESP 0x5000 is beyond it, so the #GP
                                           // delivery on the same stack is #SS -> ... the HLT is never reached;
                                           // check the loads before any push instead.
    let mut steps = 0;
    while steps < 3 {
        assert_eq!(v.step_one().unwrap(), None);
        steps += 1;
    }
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!((s.ss.selector, r.rsp), (0x48, 0x5000));
    assert_eq!((s.fs.selector, r.rbx), (0x10, 0x1111));
    assert_eq!((s.gs.selector, r.rcx), (0x08, 0x2222));
    // LSS with a read-only / code selector is #GP(selector).
    let mut v = pm32(|a| {
        a.lss(esp, fword_ptr(0x600))?;
        a.hlt()
    });
    v.mem.write_u32(0x600, 0x5000).unwrap();
    v.mem.write_u16(0x604, 0x08).unwrap();
    let top = pm_handler(&mut v, 13);
    assert_eq!(v.mem.read_u32(top).unwrap(), 0x08);
}

#[test]
fn real_mode_bp_addressing_defaults_to_ss() {
    let mut v = real_mode(0x1000, 0x100, |a| {
        a.mov(ax, 0x2000)?;
        a.mov(ss, ax)?;
        a.mov(bp, 0x10)?;
        a.mov(word_ptr(bp + 2), 0x5151)?;
        a.hlt()
    });
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u16(0x20012).unwrap(), 0x5151);
    assert_eq!(v.mem.read_u16(0x10012).unwrap(), 0);
}

#[test]
fn sixty_four_bit_call_gate_from_ring3() {
    let mem = Arc::new(GuestMemory::new(RAM).unwrap());
    // Identity map the first GiB with one user-accessible 1 GiB page.
    mem.write_u64(0x1000, 0x2007).unwrap();
    mem.write_u64(0x2000, 0x87).unwrap();
    let gate_lo = 0x9000u64 | (0x08 << 16) | (0xECu64 << 40);
    let gdt: [u64; 9] = [
        0,
        0x00AF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x00CF_F200_0000_FFFF,
        0x00AF_FA00_0000_FFFF,
        0x0000_8900_3000_0067,
        0,
        gate_lo,
        0,
    ];
    for (n, d) in gdt.iter().enumerate() {
        mem.write_u64(0x800 + 8 * n as u64, *d).unwrap();
    }
    mem.write_u64(0x3004, 0x70000).unwrap();
    mem.write_u32(0x600, 0).unwrap();
    mem.write_u16(0x604, 0x3b).unwrap();
    mem.write_u8(0x9000, 0xf4).unwrap();
    let code = assemble(64, 0x10000, |a| {
        a.call(fword_ptr(0x600))?;
        a.hlt()
    });
    mem.write(0x10000, &code).unwrap();
    let mut v = InterpVcpu::new(0, mem);
    let mut user_cs = Segment::flat(0x23, 0xb, true);
    user_cs.dpl = 3;
    let mut user_ss = Segment::flat(0x1b, 3, false);
    user_ss.dpl = 3;
    let s = Sregs {
        cs: user_cs,
        ss: user_ss,
        ds: user_ss,
        es: user_ss,
        fs: user_ss,
        gs: user_ss,
        tr: Segment {
            selector: 0x28,
            base: 0x3000,
            limit: 0x67,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: 0x800,
            limit: 0x47,
        },
        cr0: cr0::PE | cr0::PG | cr0::ET,
        cr3: 0x1000,
        cr4: cr4::PAE,
        efer: efer::LME | efer::LMA,
        ..Default::default()
    };
    v.set_sregs(&s).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rip = 0x10000;
    r.rsp = 0x90000;
    r.rflags = 2;
    v.set_regs(&r).unwrap();
    assert_eq!(run(&mut v), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let s = v.get_sregs().unwrap();
    assert_eq!(r.rip, 0x9001);
    assert_eq!((s.cs.selector, s.cs.dpl), (0x08, 0));
    assert_eq!(s.ss.selector, 0, "a null SS with RPL 0");
    assert_eq!(r.rsp, 0x70000 - 32);
    let q = |o: u64| v.mem.read_u64(0x70000 - 32 + o).unwrap();
    assert_eq!(q(0), 0x10000 + 7, "return RIP");
    assert_eq!((q(8), q(16), q(24)), (0x23, 0x90000, 0x1b));
}

#[test]
fn random_32_bit_code_at_ring3_never_panics() {
    // Random code at CPL 3 over the test GDT (call gates, TSSs, a task
    // gate, an LDT): whatever it reaches, no panic, and the state stays
    // readable.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut retired = 0;
    for round in 0..300 {
        let mut v = pm32(|a| a.nop());
        let mut code = [0u8; 64];
        for c in code.chunks_mut(8) {
            c.copy_from_slice(&next().to_le_bytes());
        }
        v.mem.write(0x10000, &code).unwrap();
        if round % 2 == 0 {
            to_ring3(&mut v);
        }
        let mut r = v.get_regs().unwrap();
        for g in [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi,
        ] {
            *g = next() & 0x3f_ffff;
        }
        v.set_regs(&r).unwrap();
        for _ in 0..256 {
            match v.step_one().unwrap() {
                None => {}
                Some(VcpuExit::IoIn { .. }) => v.io_data().fill(0xff),
                Some(VcpuExit::MmioRead { .. }) => v.mmio_data().fill(0),
                Some(VcpuExit::RdMsr { .. }) => v.complete_rdmsr(None),
                Some(VcpuExit::WrMsr { .. }) => v.complete_wrmsr(false),
                Some(VcpuExit::IoOut { .. } | VcpuExit::MmioWrite { .. }) => {}
                Some(_) => break,
            }
        }
        retired += v.retired();
        let s = v.get_sregs().unwrap();
        assert!(s.cs.dpl <= 3);
    }
    assert!(retired > 300, "random code must retire instructions");
}
