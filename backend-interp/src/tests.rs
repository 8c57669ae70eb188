//! Unit tests: small snippets assembled with iced-x86's `code_asm`, run on
//! a hand-built long-mode state, checked register by register and flag by
//! flag.

use std::sync::Arc;

use iced_x86::code_asm::*;
use tandem_core::cpu::{cr0, cr4, efer, DescriptorTable, Event, EventKind, Segment, Sregs};
use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Vcpu, VcpuExit};

use crate::flags::{AF, ARITH, CF, IF, OF, PF, SF, ZF};
use crate::InterpVcpu;

const CODE: u64 = 0x10000;
const HANDLERS: u64 = 0x20000;
const STACK_TOP: u64 = 0x80000;
const RSP0: u64 = 0x70000;
const LAPIC: u64 = 0xfee0_0000;

/// A vCPU in 64-bit mode at CPL 0: identity paging of the first GiB and of
/// 3-4 GiB (1 GiB pages, user-accessible), a GDT as the test runtime's, a
/// TSS, and an IDT whose vector v handler is a HLT at HANDLERS + 16 * v.
fn machine() -> InterpVcpu {
    let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
    mem.write_u64(0x1000, 0x2007).unwrap();
    mem.write_u64(0x2000, 0x87).unwrap();
    mem.write_u64(0x2018, 0xc000_0087).unwrap();
    let gdt: [u64; 7] = [
        0,
        0x00AF_9A00_0000_FFFF,
        0x00CF_9200_0000_FFFF,
        0x00CF_F200_0000_FFFF,
        0x00AF_FA00_0000_FFFF,
        // 0x28: 64-bit TSS at 0x5000, limit 0x67, available.
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
    mem.write_u64(0x5024, 0x60000).unwrap();
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
        cr0: cr0::PE | cr0::PG | cr0::WP | cr0::ET,
        cr3: 0x1000,
        cr4: cr4::PAE,
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

/// Assembles `f`'s code at CODE and loads it.
fn load(v: &InterpVcpu, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    let bytes = a.assemble(CODE).unwrap();
    v.mem.write(CODE, &bytes).unwrap();
}

fn with(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> InterpVcpu {
    let v = machine();
    load(&v, f);
    v
}

/// Runs one ALU snippet (then HLT) with RAX, RBX, RCX and the status flags
/// given; returns RAX and the status flags afterwards.
fn alu(
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    in_rax: u64,
    in_rbx: u64,
    in_rcx: u64,
    flags_in: u64,
) -> (u64, u64) {
    let mut v = with(|a| {
        f(a)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rax = in_rax;
    r.rbx = in_rbx;
    r.rcx = in_rcx;
    r.rflags = 2 | flags_in;
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    (r.rax, r.rflags & ARITH)
}

#[test]
fn add_adc_flags() {
    assert_eq!(
        alu(|a| a.add(eax, ebx), 0x7fff_ffff, 1, 0, 0),
        (0x8000_0000, OF | SF | AF | PF)
    );
    assert_eq!(
        alu(|a| a.add(al, bl), 0xff, 1, 0, 0),
        (0, CF | ZF | AF | PF)
    );
    assert_eq!(
        alu(|a| a.adc(eax, ebx), 0xffff_ffff, 0, 0, CF),
        (0, CF | ZF | AF | PF)
    );
    // ADC with CF=1: 0x7f + 0 + 1 overflows a byte signed.
    assert_eq!(alu(|a| a.adc(al, bl), 0x7f, 0, 0, CF), (0x80, OF | SF | AF));
    // 64-bit: the upper bits count.
    assert_eq!(alu(|a| a.add(rax, rbx), u64::MAX, 2, 0, 0), (1, CF | AF));
    // 32-bit destination zero-extends.
    assert_eq!(alu(|a| a.add(eax, ebx), u64::MAX, 1, 0, 0).0, 0);
}

#[test]
fn sub_sbb_cmp_flags() {
    assert_eq!(
        alu(|a| a.sub(eax, ebx), 0, 1, 0, 0),
        (0xffff_ffff, CF | SF | AF | PF)
    );
    assert_eq!(
        alu(|a| a.sub(eax, ebx), 0x8000_0000, 1, 0, 0),
        (0x7fff_ffff, OF | AF | PF)
    );
    assert_eq!(
        alu(|a| a.sbb(eax, ebx), 5, 5, 0, CF),
        (0xffff_ffff, CF | SF | AF | PF)
    );
    assert_eq!(alu(|a| a.sbb(eax, ebx), 5, 5, 0, 0), (0, ZF | PF));
    // CMP leaves the destination alone: 3 - 5 = 0xfffffffe (PF odd).
    assert_eq!(alu(|a| a.cmp(eax, ebx), 3, 5, 0, 0), (3, CF | SF | AF));
    assert_eq!(alu(|a| a.cmp(eax, 3), 3, 0, 0, CF), (3, ZF | PF));
}

#[test]
fn inc_dec_neg_flags() {
    // INC and DEC keep CF.
    assert_eq!(
        alu(|a| a.inc(eax), 0x7fff_ffff, 0, 0, CF),
        (0x8000_0000, CF | OF | SF | AF | PF)
    );
    assert_eq!(alu(|a| a.inc(al), 0xff, 0, 0, 0), (0, ZF | AF | PF));
    assert_eq!(
        alu(|a| a.dec(eax), 0x8000_0000, 0, 0, 0),
        (0x7fff_ffff, OF | AF | PF)
    );
    assert_eq!(alu(|a| a.dec(eax), 1, 0, 0, CF), (0, CF | ZF | PF));
    assert_eq!(alu(|a| a.neg(eax), 0, 0, 0, CF), (0, ZF | PF));
    assert_eq!(
        alu(|a| a.neg(eax), 0x8000_0000, 0, 0, 0),
        (0x8000_0000, CF | OF | SF | PF)
    );
    assert_eq!(
        alu(|a| a.neg(eax), 1, 0, 0, 0),
        (0xffff_ffff, CF | SF | AF | PF)
    );
}

#[test]
fn logic_flags() {
    // CF, OF and AF are cleared.
    assert_eq!(
        alu(|a| a.and(eax, ebx), 0xf0, 0x0f, 0, CF | OF | AF),
        (0, ZF | PF)
    );
    assert_eq!(alu(|a| a.or(al, bl), 0x80, 1, 0, 0), (0x81, SF | PF));
    assert_eq!(alu(|a| a.xor(eax, eax), 0x1234, 0, 0, CF), (0, ZF | PF));
    assert_eq!(
        alu(|a| a.test(eax, ebx), 0x8000_0000, 0x8000_0000, 0, 0),
        (0x8000_0000, SF | PF)
    );
    assert_eq!(alu(|a| a.xor(al, 1), 6, 0, 0, 0), (7, 0));
}

#[test]
fn shift_flags() {
    assert_eq!(alu(|a| a.shl(eax, 1), 0x8000_0001, 0, 0, 0), (2, CF | OF));
    // A zero count changes nothing, flags included.
    assert_eq!(alu(|a| a.shl(eax, cl), 5, 0, 0, CF | ZF), (5, CF | ZF));
    // The count is masked to 5 bits for 32-bit operands: 33 -> 1.
    assert_eq!(alu(|a| a.shl(eax, cl), 1, 0, 33, 0), (2, 0));
    assert_eq!(
        alu(|a| a.shr(eax, 1), 0x8000_0001, 0, 0, 0),
        (0x4000_0000, CF | OF | PF)
    );
    assert_eq!(
        alu(|a| a.sar(eax, 1), 0x8000_0001, 0, 0, 0),
        (0xc000_0000, CF | SF | PF)
    );
    assert_eq!(alu(|a| a.sar(al, 7), 0x80, 0, 0, 0), (0xff, SF | PF));
    // SHL by 8 of a byte: everything out, CF = the last bit out (bit 0).
    assert_eq!(alu(|a| a.shl(al, 8), 0x01, 0, 0, 0), (0, CF | ZF | PF | OF));
    let (out, f) = alu(|a| a.shr(rax, cl), 1 << 63, 0, 63, 0);
    assert_eq!((out, f & !OF), (1, 0));
}

#[test]
fn rotate_flags() {
    // ROL / ROR touch only CF and OF.
    assert_eq!(alu(|a| a.rol(al, 1), 0x81, 0, 0, ZF), (0x03, CF | OF | ZF));
    assert_eq!(alu(|a| a.ror(al, 1), 0x01, 0, 0, 0), (0x80, CF | OF));
    // OF is undefined for counts above 1: not compared.
    let (out, f) = alu(|a| a.rol(eax, 4), 0x1234_5678, 0, 0, 0);
    assert_eq!((out, f & !OF), (0x2345_6781, CF));
    assert_eq!(
        alu(|a| a.ror(rax, 8), 0x12, 0, 0, 0),
        (0x1200_0000_0000_0000, 0)
    );
    assert_eq!(alu(|a| a.rcl(al, 1), 0x80, 0, 0, 0), (0, CF | OF));
    assert_eq!(alu(|a| a.rcr(al, 1), 0x00, 0, 0, CF), (0x80, OF));
}

#[test]
fn mul_imul_flags() {
    // CF = OF = the high half is significant.
    let mut v = with(|a| {
        a.mul(ebx)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rax = 0x8000_0000;
    r.rbx = 2;
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rdx), (0, 1));
    assert_eq!(r.rflags & (CF | OF), CF | OF);

    assert_eq!(alu(|a| a.mul(bl), 0x10, 0x10, 0, 0).0, 0x100);
    assert_eq!(alu(|a| a.mul(bl), 0x10, 0x10, 0, 0).1 & (CF | OF), CF | OF);
    assert_eq!(alu(|a| a.mul(bl), 0x10, 0x02, 0, CF | OF).1 & (CF | OF), 0);
    // The undefined SF / ZF / AF / PF are left as they were.
    assert_eq!(alu(|a| a.mul(bl), 0, 0, 0, SF | AF).1, SF | AF);
    let (out, f) = alu(|a| a.imul_2(eax, ebx), 0x4000_0000, 4, 0, 0);
    assert_eq!((out, f & (CF | OF)), (0, CF | OF));
    let (out, f) = alu(|a| a.imul_2(eax, ebx), 0xffff_ffff, 0xffff_ffff, 0, CF | OF);
    assert_eq!((out, f & (CF | OF)), (1, 0));
    let (out, f) = alu(|a| a.imul_3(rax, rbx, -3), 0, 7, 0, 0);
    assert_eq!((out, f & (CF | OF)), ((-21i64) as u64, 0));
    // One-operand IMUL: AL * BL = -128 fits, -129 does not.
    let (out, f) = alu(|a| a.imul(bl), 0x40, 0xfe, 0, 0);
    assert_eq!((out & 0xffff, f & (CF | OF)), (0xff80, 0));
}

#[test]
fn div_idiv_results_and_faults() {
    let mut v = with(|a| {
        a.div(ebx)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rdx = 1;
    r.rax = 1;
    r.rbx = 2;
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rdx), (0x8000_0000, 1));

    let mut v = with(|a| {
        a.idiv(ebx)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rdx = 0xffff_ffff;
    r.rax = (-7i32) as u32 as u64;
    r.rbx = 2;
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rdx), ((-3i32) as u32 as u64, 0xffff_ffff));

    // Quotient overflow and division by zero are #DE, a fault: the frame's
    // RIP is the DIV.
    for (d, x, b) in [(2u64, 0u64, 2u64), (0, 5, 0)] {
        let mut v = with(|a| {
            a.div(ebx)?;
            a.hlt()
        });
        let mut r = v.get_regs().unwrap();
        (r.rdx, r.rax, r.rbx) = (d, x, b);
        v.set_regs(&r).unwrap();
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        assert_eq!(r.rip, HANDLERS + 1, "#DE handler");
        assert_eq!(v.mem.read_u64(r.rsp).unwrap(), CODE, "faulting RIP");
    }
    let mut v = with(|a| {
        a.idiv(ebx)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    (r.rdx, r.rax, r.rbx) = (0xffff_ffff, 0x8000_0000, 0xffff_ffff);
    v.set_regs(&r).unwrap();
    v.run().unwrap();
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 1);
}

#[test]
fn stack_call_ret_and_branches() {
    let mut v = with(|a| {
        let mut func = a.create_label();
        let mut done = a.create_label();
        a.mov(rax, 5u64)?;
        a.push(rax)?;
        a.call(func)?;
        a.pop(rbx)?;
        a.cmp(rax, 6)?;
        a.je(done)?;
        a.ud2()?;
        a.set_label(&mut func)?;
        a.inc(rax)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.setne(cl)?;
        a.cmovne(rdx, rbx)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rcx = 0xff;
    r.rdx = 0x1_0000_0001;
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rbx, r.rcx, r.rdx), (6, 5, 0, 0x1_0000_0001));
    assert_eq!(r.rsp, STACK_TOP);
}

#[test]
fn rep_stos_and_movs() {
    let mut v = with(|a| {
        a.cld()?;
        a.rep().stosd()?;
        a.mov(rsi, 0x30000u64)?;
        a.mov(rdi, 0x40000u64)?;
        a.mov(ecx, 3)?;
        a.rep().movsq()?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    (r.rax, r.rcx, r.rdi) = (0xdead_beef, 6, 0x30000);
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rcx, 0);
    assert_eq!(r.rdi, 0x40018);
    assert_eq!(v.mem.read_u32(0x30014).unwrap(), 0xdead_beef);
    assert_eq!(v.mem.read_u32(0x30018).unwrap(), 0);
    assert_eq!(v.mem.read_u64(0x40010).unwrap(), 0xdead_beef_dead_beef);
}

#[test]
fn port_io_exits_complete_on_the_next_run() {
    let mut v = with(|a| {
        a.in_(al, 0x60)?;
        a.mov(dx, 0x3f8u32)?;
        a.out(dx, eax)?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rax = 0x1234_5600;
    v.set_regs(&r).unwrap();
    assert_eq!(
        v.run().unwrap(),
        VcpuExit::IoIn {
            port: 0x60,
            size: 1,
            count: 1
        }
    );
    // Until answered, RIP stays at the IN.
    assert_eq!(v.get_regs().unwrap().rip, CODE);
    v.io_data()[0] = 0xab;
    assert_eq!(
        v.run().unwrap(),
        VcpuExit::IoOut {
            port: 0x3f8,
            size: 4,
            count: 1
        }
    );
    assert_eq!(v.io_data(), &[0xab, 0x56, 0x34, 0x12]);
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rax, 0x1234_56ab);
}

#[test]
fn mmio_read_modify_write_makes_a_read_then_a_write_exit() {
    let mut v = with(|a| {
        a.mov(rbx, LAPIC)?;
        a.add(dword_ptr(rbx + 0x80), 5)?;
        a.mov(ecx, dword_ptr(rbx + 0x20))?;
        a.hlt()
    });
    assert_eq!(
        v.run().unwrap(),
        VcpuExit::MmioRead {
            addr: LAPIC + 0x80,
            len: 4
        }
    );
    v.mmio_data().copy_from_slice(&0x10u32.to_le_bytes());
    assert_eq!(
        v.run().unwrap(),
        VcpuExit::MmioWrite {
            addr: LAPIC + 0x80,
            len: 4
        }
    );
    assert_eq!(v.mmio_data(), &0x15u32.to_le_bytes());
    assert_eq!(
        v.run().unwrap(),
        VcpuExit::MmioRead {
            addr: LAPIC + 0x20,
            len: 4
        }
    );
    v.mmio_data().copy_from_slice(&0x0500_0000u32.to_le_bytes());
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rcx, 0x0500_0000);
}

#[test]
fn machine_msrs_exit_and_a_refusal_is_gp() {
    let mut v = with(|a| {
        a.mov(ecx, 0x1b)?;
        a.rdmsr()?;
        a.mov(ecx, 0x808)?;
        a.wrmsr()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::RdMsr { index: 0x1b });
    v.complete_rdmsr(Some(0x1_fee0_0900));
    assert_eq!(
        v.run().unwrap(),
        VcpuExit::WrMsr {
            index: 0x808,
            value: 0x1_fee0_0900
        }
    );
    v.complete_wrmsr(false);
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rdx), (0xfee0_0900, 1));
    assert_eq!(r.rip, HANDLERS + 13 * 16 + 1, "#GP handler");
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 0, "error code 0");
}

#[test]
fn own_msrs_and_cpuid() {
    let mut v = with(|a| {
        a.mov(ecx, 0xc000_0082u32)?;
        a.mov(eax, 0x1234)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(v.msr.lstar, 0x1234);
    assert_ne!(r.rcx & (1 << 21), 0, "x2APIC");
    assert_ne!(r.rcx & (1 << 24), 0, "TSC deadline");
    assert_eq!(r.rbx >> 24, 0, "APIC ID");
}

#[test]
fn page_fault_error_code_and_cr2() {
    // Map 0x200000 through a 4 KiB table with one read-only, supervisor page.
    let mut v = with(|a| {
        a.mov(rbx, 0x4000_0000u64)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.hlt()
    });
    // PDPT[1] -> PD at 0x6000 -> PT at 0x7000, entry 0: P only (read-only).
    v.mem.write_u64(0x2008, 0x6007).unwrap();
    v.mem.write_u64(0x6000, 0x7007).unwrap();
    v.mem.write_u64(0x7000, 0x300001).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 14 * 16 + 1);
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 0x3, "P | W");
    assert_eq!(v.get_sregs().unwrap().cr2, 0x4000_0000);
    // The walk set the accessed bits of the tables it used.
    assert_ne!(v.mem.read_u64(0x6000).unwrap() & 0x20, 0);
}

/// A page fault drops the TLB entry of the faulting address (SDM vol. 3,
/// 4.10.4.1): after the OS makes the page writable without INVLPG, the
/// retried write walks again and succeeds (Linux's spurious-fault path; a
/// stale entry made a stock kernel fault forever at its first user write).
#[test]
fn page_fault_invalidates_the_tlb_entry_of_the_address() {
    let mut v = with(|a| {
        a.mov(rbx, 0x4000_0000u64)?;
        a.mov(eax, dword_ptr(rbx))?; // caches a read-only translation
        a.mov(dword_ptr(rbx), eax)?; // #PF: P | W
        a.hlt()
    });
    v.mem.write_u64(0x2008, 0x6007).unwrap();
    v.mem.write_u64(0x6000, 0x7007).unwrap();
    // Present, dirty, read-only: the cached entry needs no walk to set D.
    v.mem.write_u64(0x7000, 0x300041).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let mut r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 14 * 16 + 1, "the write faulted");
    // The "OS": writable now, no INVLPG; return to the faulting write.
    v.mem.write_u64(0x7000, 0x300043).unwrap();
    let write_rip = v.mem.read_u64(r.rsp + 8).unwrap();
    r.rip = write_rip;
    r.rsp += 8 * 6; // error code + the interrupt frame
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert!(
        r.rip < HANDLERS,
        "the retried write succeeded (stopped at {:#x})",
        r.rip
    );
}

/// MOV to CR3 flushes translations of kernel-half addresses too: the TLB
/// tags entries with a flush epoch, and the high bits a canonical kernel
/// address sets must not stand in for it. The guest remaps its page, and
/// only the reload of CR3 (or INVLPG) makes the new mapping visible.
#[test]
fn mov_cr3_flushes_kernel_half_translations() {
    const HIGH: u64 = 0xffff_ff80_0000_0000;
    let mut v = with(|a| {
        a.mov(rbx, HIGH)?;
        a.mov(eax, dword_ptr(rbx))?; // page 0x30_0000, cached
        a.mov(qword_ptr(0xe000u64), 0x31_0003)?; // remap to 0x31_0000
        a.mov(ecx, dword_ptr(rbx))?; // still the cached translation
        a.mov(rsi, cr3)?;
        a.mov(cr3, rsi)?;
        a.mov(edx, dword_ptr(rbx))?; // walks again: 0x31_0000
        a.mov(qword_ptr(0xe000u64), 0x30_0003)?; // back to 0x30_0000
        a.invlpg(byte_ptr(rbx))?;
        a.mov(edi, dword_ptr(rbx))?;
        a.hlt()
    });
    // PML4[511] -> PDPT 0xc000 -> PD 0xd000 -> PT 0xe000.
    v.mem.write_u64(0x1ff8, 0xc003).unwrap();
    v.mem.write_u64(0xc000, 0xd003).unwrap();
    v.mem.write_u64(0xd000, 0xe003).unwrap();
    v.mem.write_u64(0xe000, 0x30_0003).unwrap();
    v.mem.write_u32(0x30_0000, 0x1111).unwrap();
    v.mem.write_u32(0x31_0000, 0x2222).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(
        (r.rax, r.rcx, r.rdx, r.rdi),
        (0x1111, 0x1111, 0x2222, 0x1111)
    );
}

#[test]
fn non_canonical_is_gp_and_a_broken_idt_is_a_triple_fault() {
    let mut v = with(|a| {
        a.mov(rbx, 0x8000_0000_0000u64)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 13 * 16 + 1);

    let mut v = with(|a| a.ud2());
    let mut s = v.get_sregs().unwrap();
    s.idt.limit = 0;
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Shutdown);
}

#[test]
fn injected_interrupt_is_delivered_before_any_instruction() {
    let mut v = with(|a| {
        a.nop()?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rflags = 2 | IF;
    v.set_regs(&r).unwrap();
    assert!(v.readiness().unwrap().interrupt);
    v.inject(Event::external(0x30)).unwrap();
    assert!(!v.readiness().unwrap().interrupt, "an event is queued");
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 0x30 * 16 + 1);
    assert_eq!(r.rflags & IF, 0, "interrupt gate clears IF");
    // Frame: RIP, CS, RFLAGS, RSP, SS.
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), CODE);
    assert_eq!(v.mem.read_u64(r.rsp + 8).unwrap(), 8);
    assert_ne!(v.mem.read_u64(r.rsp + 16).unwrap() & IF, 0);
    assert_eq!(v.mem.read_u64(r.rsp + 24).unwrap(), STACK_TOP);
}

#[test]
fn interrupt_window_waits_for_the_sti_shadow() {
    let mut v = with(|a| {
        a.sti()?;
        a.nop()?;
        a.nop()?;
        a.hlt()
    });
    v.set_interrupt_window_exiting(true);
    assert_eq!(v.run().unwrap(), VcpuExit::InterruptWindow);
    // STI at CODE, the NOP it shadows at CODE+1: the window opens at CODE+2.
    assert_eq!(v.get_regs().unwrap().rip, CODE + 2);
    let ready = v.readiness().unwrap();
    assert!(ready.if_flag && ready.interrupt);
}

#[test]
fn pause_loop_exiting_ends_the_run_after_the_nth_pause() {
    let mut v = with(|a| {
        a.pause()?;
        a.nop()?;
        a.pause()?;
        a.pause()?;
        a.hlt()
    });
    v.set_pause_exiting(Some(2));
    assert_eq!(v.run().unwrap(), VcpuExit::Kicked);
    // PAUSE (2 bytes), NOP, PAUSE: the run ends right after the second.
    assert_eq!(v.get_regs().unwrap().rip, CODE + 5);
    v.set_pause_exiting(None);
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
}

#[test]
fn nmi_waits_for_the_sti_shadow() {
    let mut v = with(|a| {
        a.sti()?;
        a.nop()?;
        a.nop()?;
        a.hlt()
    });
    assert!(v.readiness().unwrap().nmi);
    // STI with IF=0 blocks NMIs for one instruction too (Intel, KVM's VMX
    // readiness, Bochs): no NMI may land at the shadowed NOP.
    assert!(v.step().is_none());
    assert_eq!(v.get_regs().unwrap().rip, CODE + 1);
    assert!(v.get_events().unwrap().interruptibility.sti);
    assert!(!v.readiness().unwrap().nmi);
    v.set_nmi_window_exiting(true);
    assert_eq!(v.run().unwrap(), VcpuExit::NmiWindow);
    // The window opens after the shadowed NOP.
    assert_eq!(v.get_regs().unwrap().rip, CODE + 2);
    assert!(v.readiness().unwrap().nmi);
}

#[test]
fn mov_ss_shadow_is_not_extended_by_a_second_mov_ss() {
    let mut v = with(|a| {
        a.mov(eax, 0x10)?;
        a.mov(ss, ax)?;
        a.mov(ss, ax)?;
        a.nop()?;
        a.hlt()
    });
    let mut r = v.get_regs().unwrap();
    r.rflags = 2 | IF;
    v.set_regs(&r).unwrap();
    v.set_interrupt_window_exiting(true);
    // At CODE (before anything) IF=1 and no shadow: the window is open.
    assert_eq!(v.run().unwrap(), VcpuExit::InterruptWindow);
    assert_eq!(v.get_regs().unwrap().rip, CODE);
    v.set_interrupt_window_exiting(false);
    v.set_nmi_window_exiting(true);
    assert_eq!(v.run().unwrap(), VcpuExit::NmiWindow);
    v.set_nmi_window_exiting(false);
    // Step to the first MOV SS, then through it.
    let first_mov_ss = CODE + 5;
    let mut n = 0;
    while v.get_regs().unwrap().rip != first_mov_ss + 3 && n < 10 {
        assert!(v.step().is_none());
        n += 1;
    }
    assert!(v.get_events().unwrap().interruptibility.mov_ss);
    assert!(!v.readiness().unwrap().nmi);
    // The second MOV SS runs in the shadow and does not set a new one.
    assert!(v.step().is_none());
    assert!(!v.get_events().unwrap().interruptibility.mov_ss);
    assert!(v.readiness().unwrap().interrupt);
}

#[test]
fn nmi_blocking_lasts_until_iret() {
    let mut v = with(|a| a.hlt());
    // Vector 2's handler: IRETQ instead of HLT.
    v.mem.write_u16(HANDLERS + 32, 0xcf48).unwrap();
    v.inject(Event::nmi()).unwrap();
    // Deliver the NMI and run its IRETQ, then the HLT at CODE.
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, CODE + 1);
    assert!(v.readiness().unwrap().nmi, "IRET ended NMI blocking");

    let mut v = with(|a| a.hlt());
    v.inject(Event::nmi()).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 2 * 16 + 1);
    assert!(v.get_events().unwrap().interruptibility.nmi);
    assert!(!v.readiness().unwrap().nmi);
}

#[test]
fn int_from_ring3_switches_to_rsp0_and_checks_the_gate_dpl() {
    let mut v = with(|a| {
        a.int(0x80)?;
        a.hlt()
    });
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::flat(0x23, 0xb, true);
    s.cs.dpl = 3;
    s.ss = Segment::flat(0x1b, 3, false);
    s.ss.dpl = 3;
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 0x80 * 16 + 1);
    assert_eq!(r.rsp, RSP0 - 40);
    assert_eq!(
        v.mem.read_u64(r.rsp).unwrap(),
        CODE + 2,
        "trap: RIP after INT"
    );
    assert_eq!(v.mem.read_u64(r.rsp + 8).unwrap(), 0x23);
    assert_eq!(v.mem.read_u64(r.rsp + 32).unwrap(), 0x1b);
    assert_eq!(v.get_sregs().unwrap().cs.dpl, 0);

    // A DPL 0 gate from ring 3: #GP(vector * 8 + 2).
    let mut v = with(|a| a.int(0x82));
    let gate = 0x4000 + 0x82 * 16 + 5;
    v.mem.write_u8(gate, 0x8e).unwrap();
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 13 * 16 + 1);
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 0x412);
}

#[test]
fn syscall_and_sysret_round_trip() {
    let mut v = with(|a| {
        let mut entry = a.create_label();
        let mut back = a.create_label();
        a.mov(ecx, 0xc000_0081u32)?;
        a.xor(eax, eax)?;
        a.mov(edx, 0x0013_0008)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0082u32)?;
        a.lea(rax, ptr(entry))?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.lea(rcx, ptr(back))?;
        a.mov(r11, 0x202u64)?;
        a.sysretq()?;
        a.set_label(&mut back)?;
        a.syscall()?;
        a.set_label(&mut entry)?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let s = v.get_sregs().unwrap();
    assert_eq!((s.cs.selector, s.ss.selector, s.cs.dpl), (8, 0x10, 0));
    let r = v.get_regs().unwrap();
    // R11 holds user RFLAGS (IF set by SYSRET), RCX the return address.
    assert_ne!(r.r11 & IF, 0);
    assert_eq!(r.rcx, r.rip - 1);
}

#[test]
fn self_modifying_code_is_seen() {
    // Run a loop body twice; the first pass rewrites the immediate of
    // `mov eax, imm32` that the second pass executes.
    let mut v = with(|a| {
        let mut imm = a.create_label();
        a.set_label(&mut imm)?;
        a.mov(eax, 1)?;
        a.add(ebx, eax)?;
        a.lea(rdx, ptr(imm))?;
        a.mov(dword_ptr(rdx + 1), 100)?;
        a.inc(ecx)?;
        a.cmp(ecx, 2)?;
        a.jne(imm)?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rbx, 101);
}

#[test]
fn kick_and_budget_end_the_run() {
    let mut v = with(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.jmp(l)
    });
    v.kicker().kick();
    assert_eq!(v.run().unwrap(), VcpuExit::Kicked);
    assert_eq!(v.retired(), 0);
    assert_eq!(v.run().unwrap(), VcpuExit::Kicked);
    assert_eq!(v.retired(), crate::RUN_BUDGET);
    let (hits, misses) = v.cache_stats();
    assert_eq!(misses, 1);
    assert_eq!(hits, crate::RUN_BUDGET - 1);
}

#[test]
fn unimplemented_instruction_is_ud() {
    // AESENC: no AES-NI in this interpreter.
    let mut v = with(|a| a.aesenc(xmm0, xmm1));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 6 * 16 + 1);
}

#[test]
fn soft_event_injection_returns_past_the_instruction() {
    let mut v = with(|a| a.hlt());
    v.inject(Event {
        kind: EventKind::SoftwareInterrupt,
        vector: 0x40,
        error_code: None,
        instruction_len: 2,
    })
    .unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), CODE + 2);
}

#[test]
fn mode_switch_from_protected_mode_to_long_mode() {
    // 32-bit flat protected mode, paging off, as multiboot leaves it.
    let mut v = machine();
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::flat(0x38, 0xb, false);
    s.cr0 = cr0::PE | cr0::ET;
    s.cr4 = 0;
    s.efer = 0;
    // GDT entry 0x38: 32-bit code.
    v.mem.write_u64(0x3038, 0x00CF_9A00_0000_FFFF).unwrap();
    s.gdt.limit = 0x3f;
    v.set_sregs(&s).unwrap();
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(eax, cr4).unwrap();
    a.or(eax, 0x20).unwrap();
    a.mov(cr4, eax).unwrap();
    a.mov(eax, 0x1000).unwrap();
    a.mov(cr3, eax).unwrap();
    a.mov(ecx, 0xc000_0080u32).unwrap();
    a.rdmsr().unwrap();
    a.or(eax, 0x900).unwrap();
    a.wrmsr().unwrap();
    a.mov(eax, cr0).unwrap();
    a.or(eax, 0x8001_0000u32 as i32).unwrap();
    a.mov(cr0, eax).unwrap();
    let mut code = a.assemble(CODE).unwrap();
    // JMP FAR 0x08:target (EA ptr16:32), target = the HLT after it.
    let target = CODE as u32 + code.len() as u32 + 7;
    code.push(0xea);
    code.extend_from_slice(&target.to_le_bytes());
    code.extend_from_slice(&8u16.to_le_bytes());
    code.push(0xf4);
    v.mem.write(CODE, &code).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let s = v.get_sregs().unwrap();
    assert_eq!(s.mode_name(), "64-bit mode");
    assert_ne!(s.efer & efer::LMA, 0);
    assert_eq!(v.get_regs().unwrap().rip, u64::from(target) + 1);
}

/// 32-bit protected mode, paging off, as the multiboot entry leaves it, with
/// 8-byte interrupt gates to the 32-bit code segment 0x38.
fn machine32() -> InterpVcpu {
    let mut v = machine();
    v.mem.write_u64(0x3038, 0x00CF_9A00_0000_FFFF).unwrap();
    for vec in 0..256u64 {
        let h = HANDLERS + 16 * vec;
        let gate = (h & 0xffff) | (0x38 << 16) | (0x8Eu64 << 40) | ((h >> 16) & 0xffff) << 48;
        v.mem.write_u64(0x4000 + 8 * vec, gate).unwrap();
    }
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::flat(0x38, 0xb, false);
    s.cr0 = cr0::PE | cr0::ET;
    s.cr4 = 0;
    s.efer = 0;
    s.gdt.limit = 0x3f;
    s.idt.limit = 0x7ff;
    v.set_sregs(&s).unwrap();
    v
}

#[test]
fn protected_mode_int_and_iretd() {
    let mut v = machine32();
    let mut a = CodeAssembler::new(32).unwrap();
    a.int(0x21).unwrap();
    a.hlt().unwrap();
    v.mem.write(CODE, &a.assemble(CODE).unwrap()).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 0x21 * 16 + 1);
    assert_eq!(r.rsp, STACK_TOP - 12);
    assert_eq!(v.mem.read_u32(r.rsp).unwrap() as u64, CODE + 2);
    assert_eq!(v.mem.read_u32(r.rsp + 4).unwrap(), 0x38);

    // Now with an IRETD handler: back after the INT, IF restored.
    let mut v = machine32();
    v.mem.write_u8(HANDLERS + 0x21 * 16, 0xcf).unwrap();
    v.mem.write(CODE, &a.assemble(CODE).unwrap()).unwrap();
    let mut r = v.get_regs().unwrap();
    r.rflags = 2 | IF;
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rip, r.rsp), (CODE + 3, STACK_TOP));
    assert_ne!(r.rflags & IF, 0);

    // A #GP with its error code: loading selector 0x103 into DS.
    let mut v = machine32();
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(eax, 0x103).unwrap();
    a.mov(ds, ax).unwrap();
    v.mem.write(CODE, &a.assemble(CODE).unwrap()).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 13 * 16 + 1);
    assert_eq!(v.mem.read_u32(r.rsp).unwrap(), 0x100);
    assert_eq!(v.mem.read_u32(r.rsp + 4).unwrap() as u64, CODE + 5);
}

#[test]
fn segment_loads_set_the_accessed_bit() {
    let mut v = with(|a| {
        a.mov(eax, 0x18)?;
        a.mov(es, ax)?;
        a.hlt()
    });
    assert_eq!(v.mem.read_u8(0x3018 + 5).unwrap(), 0xf2);
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u8(0x3018 + 5).unwrap(), 0xf3);
    assert_eq!(v.get_sregs().unwrap().es.type_, 3);
}

#[test]
fn fault_during_delivery_becomes_double_fault() {
    // #GP whose gate is not present: #NP (contributory) during a
    // contributory exception is #DF(0).
    let mut v = with(|a| {
        a.mov(rbx, 0x8000_0000_0000u64)?;
        a.mov(eax, dword_ptr(rbx))
    });
    v.mem.write_u8(0x4000 + 13 * 16 + 5, 0x0e).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 8 * 16 + 1);
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 0);

    // #UD (benign) whose gate is not present: the #NP is delivered alone,
    // with the IDT error code (vector * 8 + 2 + EXT).
    let mut v = with(|a| a.ud2());
    v.mem.write_u8(0x4000 + 6 * 16 + 5, 0x0e).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 11 * 16 + 1);
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 6 * 8 + 3);
}

/// Random instruction streams at CPL 0 and CPL 3 with random registers:
/// whatever they do, the interpreter never panics, every exit can be
/// completed, and guest memory outside RAM is never touched directly.
#[test]
fn random_code_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut exits = 0u32;
    for round in 0..300 {
        let mut v = machine();
        let mut code = [0u8; 64];
        for chunk in code.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        v.mem.write(CODE, &code).unwrap();
        let mut r = v.get_regs().unwrap();
        for reg in [
            &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rbp,
        ] {
            // Small values keep many memory operands inside RAM.
            *reg = next() % if round % 2 == 0 { 0x40_0000 } else { u64::MAX };
        }
        v.set_regs(&r).unwrap();
        if round % 3 == 0 {
            let mut s = v.get_sregs().unwrap();
            s.cs = Segment::flat(0x23, 0xb, true);
            s.cs.dpl = 3;
            s.ss = Segment::flat(0x1b, 3, false);
            s.ss.dpl = 3;
            v.set_sregs(&s).unwrap();
        }
        for _ in 0..8 {
            match v.run().unwrap() {
                VcpuExit::IoIn { .. } => v.io_data().fill(0xff),
                VcpuExit::MmioRead { .. } => v.mmio_data().fill(0),
                VcpuExit::RdMsr { .. } => v.complete_rdmsr(None),
                VcpuExit::WrMsr { .. } => v.complete_wrmsr(false),
                VcpuExit::IoOut { .. } | VcpuExit::MmioWrite { .. } => {}
                _ => break,
            }
            exits += 1;
        }
        // The state is still readable and consistent.
        let r = v.get_regs().unwrap();
        assert_ne!(r.rflags & 2, 0, "RFLAGS bit 1 is fixed");
    }
    assert!(exits > 0, "some random code must make an exit");
}

/// CMPXCHG16B at `addr` with RDX:RAX = `expect`, RCX:RBX = new; returns the
/// vCPU after the HLT (or the #GP handler's HLT).
fn cmpxchg16b_at(addr: u64, mem_val: (u64, u64), expect: (u64, u64)) -> InterpVcpu {
    let mut v = with(|a| {
        a.mov(rsi, addr)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.hlt()
    });
    v.mem.write_u64(addr, mem_val.0).unwrap();
    v.mem.write_u64(addr + 8, mem_val.1).unwrap();
    let mut r = v.get_regs().unwrap();
    (r.rax, r.rdx) = expect;
    (r.rbx, r.rcx) = (0x1111_2222_3333_4444, 0x5555_6666_7777_8888);
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    v
}

#[test]
fn cmpxchg16b_equal_stores_rcx_rbx_and_sets_zf() {
    let mut v = cmpxchg16b_at(0x9000, (1, 2), (1, 2));
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, CODE + 16, "retired, and the HLT after it");
    assert_ne!(r.rflags & ZF, 0);
    assert_eq!(v.mem.read_u64(0x9000).unwrap(), 0x1111_2222_3333_4444);
    assert_eq!(v.mem.read_u64(0x9008).unwrap(), 0x5555_6666_7777_8888);
    assert_eq!((r.rax, r.rdx), (1, 2), "RDX:RAX unchanged");
}

#[test]
fn cmpxchg16b_unequal_loads_rdx_rax_and_clears_zf() {
    let mut v = cmpxchg16b_at(0x9000, (7, 9), (1, 9));
    let r = v.get_regs().unwrap();
    assert_eq!(r.rflags & ZF, 0);
    assert_eq!((r.rax, r.rdx), (7, 9));
    assert_eq!(v.mem.read_u64(0x9000).unwrap(), 7, "memory unchanged");
    assert_eq!(v.mem.read_u64(0x9008).unwrap(), 9);
}

#[test]
fn cmpxchg16b_misaligned_is_gp0() {
    let mut v = cmpxchg16b_at(0x9008, (1, 2), (1, 2));
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 13 * 16 + 1, "#GP handler");
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 0, "error code 0");
    assert_eq!(
        v.mem.read_u64(r.rsp + 8).unwrap(),
        CODE + 10,
        "faulting RIP"
    );
    assert_eq!(v.mem.read_u64(0x9008).unwrap(), 1, "memory untouched");
}

#[test]
fn cmpxchg8b_compares_edx_eax() {
    let mut v = with(|a| {
        a.mov(rsi, 0x9004u64)?;
        a.lock().cmpxchg8b(qword_ptr(rsi))?;
        a.hlt()
    });
    v.mem.write_u64(0x9004, 0x0000_0005_0000_0006).unwrap();
    let mut r = v.get_regs().unwrap();
    (r.rax, r.rdx) = (0xffff_ffff_0000_0006, 0xffff_ffff_0000_0004);
    v.set_regs(&r).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rflags & ZF, 0);
    assert_eq!((r.rax, r.rdx), (6, 5), "loaded, zero-extended");
}

/// A vCPU with CR4.OSXSAVE and XCR0 = x87 | SSE | AVX and a recognisable
/// state in the XSAVE buffer.
fn xsave_vcpu(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> InterpVcpu {
    let mut v = with(f);
    let mut s = v.get_sregs().unwrap();
    s.cr4 |= cr4::OSXSAVE;
    v.set_sregs(&s).unwrap();
    let mut fpu = v.get_fpu().unwrap();
    fpu.xcr0 = 7;
    for (n, b) in fpu.xsave[32..416].iter_mut().enumerate() {
        *b = n as u8;
    }
    for (n, b) in fpu.xsave[576..832].iter_mut().enumerate() {
        *b = !(n as u8);
    }
    fpu.xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    fpu.xsave[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    fpu.xsave[512..520].copy_from_slice(&7u64.to_le_bytes());
    v.set_fpu(&fpu).unwrap();
    v
}

#[test]
fn xsave_then_xrstor_round_trips_and_xgetbv_reads_xcr0() {
    // XSAVE to 0x9000, clobber the buffer by XRSTOR of an all-init image
    // at 0xa000 (XSTATE_BV 0), then XRSTOR the saved one.
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.mov(rsi, 0x9000u64)?;
        a.xsave(ptr(rsi))?;
        a.mov(rsi, 0xa000u64)?;
        a.xrstor(ptr(rsi))?;
        a.hlt()?;
        a.mov(rsi, 0x9000u64)?;
        a.xrstor(ptr(rsi))?;
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        a.hlt()
    });
    let saved = v.get_fpu().unwrap();
    // The init image still needs a valid MXCSR.
    v.mem.write_u32(0xa018, 0x1f80).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u64(0x9000 + 512).unwrap(), 7, "XSTATE_BV saved");
    assert_eq!(v.mem.read_u64(0x9000 + 576).unwrap(), 0xf8f9_fafb_fcfd_feff);
    let init = v.get_fpu().unwrap();
    assert_eq!(
        &init.xsave[0..2],
        &[0x7f, 0x03],
        "x87 initialised: FCW 0x37F"
    );
    assert!(init.xsave[32..416].iter().all(|&b| b == 0), "ST / XMM zero");
    assert!(init.xsave[576..832].iter().all(|&b| b == 0), "YMM_Hi zero");
    assert_eq!(init.xsave[512] & 7, 0, "XINUSE cleared");
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let back = v.get_fpu().unwrap();
    assert_eq!(back.xsave[32..416], saved.xsave[32..416]);
    assert_eq!(back.xsave[576..832], saved.xsave[576..832]);
    assert_eq!(back.xsave[512..520], saved.xsave[512..520]);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rax, r.rdx), (7, 0), "XGETBV(0) = XCR0");
}

#[test]
fn xsave_family_faults() {
    // Misaligned XSAVE: #GP(0).
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.mov(rsi, 0x9010u64)?;
        a.xsave(ptr(rsi))?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
    // XRSTOR of an image with XCOMP_BV / reserved header bits: #GP(0).
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.mov(rsi, 0x9000u64)?;
        a.xrstor(ptr(rsi))?;
        a.hlt()
    });
    v.mem.write_u32(0x9018, 0x1f80).unwrap();
    v.mem.write_u64(0x9000 + 528, 1).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
    // XSETBV with AVX but not SSE: #GP(0); without CR4.OSXSAVE XGETBV: #UD.
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 5)?;
        a.xor(edx, edx)?;
        a.xor(ecx, ecx)?;
        a.xsetbv()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
    assert_eq!(v.get_fpu().unwrap().xcr0, 7, "XCR0 unchanged");
    let mut v = with(|a| {
        a.xor(ecx, ecx)?;
        a.xgetbv()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 6 * 16 + 1);
}

#[test]
fn xsetbv_accepts_valid_xcr0() {
    assert!(crate::xsave::valid_xcr0(1));
    assert!(crate::xsave::valid_xcr0(7));
    assert!(crate::xsave::valid_xcr0(0xe7));
    assert!(!crate::xsave::valid_xcr0(0));
    assert!(!crate::xsave::valid_xcr0(5));
    assert!(!crate::xsave::valid_xcr0(0x27));
    assert!(!crate::xsave::valid_xcr0(0x400));
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 3)?;
        a.xor(edx, edx)?;
        a.xor(ecx, ecx)?;
        a.xsetbv()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_fpu().unwrap().xcr0, 3);
}

#[test]
fn fxsave_fxrstor_round_trip_marks_x87_sse_in_use() {
    let mut v = xsave_vcpu(|a| {
        a.mov(rsi, 0x9000u64)?;
        a.fxsave64(ptr(rsi))?;
        a.mov(rsi, 0xa000u64)?;
        a.fxrstor64(ptr(rsi))?;
        a.hlt()
    });
    let mut fpu = v.get_fpu().unwrap();
    fpu.xsave[512] = 0;
    v.set_fpu(&fpu).unwrap();
    for n in 0..52u64 {
        v.mem
            .write_u64(0xa000 + 8 * n, 0x0101_0101_0101_0101 * n)
            .unwrap();
    }
    v.mem.write_u32(0xa018, 0x1f80).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u64(0x9000 + 32).unwrap(), 0x0706_0504_0302_0100);
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xsave[40], 5, "ST0 high bytes from the image");
    assert_eq!(f.xsave[512] & 3, 3, "XSTATE_BV x87 | SSE");
    assert_eq!(
        &f.xsave[28..32],
        &0xffffu32.to_le_bytes(),
        "MXCSR_MASK kept"
    );
}

#[test]
fn xsavec_then_compacted_xrstor_round_trips() {
    // XSAVEC with RFBM = x87 | AVX (SSE left out) packs AVX right after the
    // header; XRSTOR of an all-init compacted image then of the saved one.
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 5)?;
        a.xor(edx, edx)?;
        a.mov(rsi, 0x9000u64)?;
        a.xsavec(ptr(rsi))?;
        a.mov(rsi, 0xa000u64)?;
        a.xrstor(ptr(rsi))?;
        a.hlt()?;
        a.mov(rsi, 0x9000u64)?;
        a.xrstor(ptr(rsi))?;
        a.hlt()
    });
    let saved = v.get_fpu().unwrap();
    v.mem.write_u64(0xa000 + 520, (1 << 63) | 5).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u64(0x9000 + 512).unwrap(), 5, "XSTATE_BV");
    assert_eq!(
        v.mem.read_u64(0x9000 + 520).unwrap(),
        (1 << 63) | 5,
        "XCOMP_BV"
    );
    assert_eq!(v.mem.read_u64(0x9000 + 576).unwrap(), 0xf8f9_fafb_fcfd_feff);
    assert_eq!(v.mem.read_u64(0x9000 + 160).unwrap(), 0, "XMM not saved");
    let init = v.get_fpu().unwrap();
    assert!(
        init.xsave[576..832].iter().all(|&b| b == 0),
        "AVX initialised"
    );
    assert_eq!(
        init.xsave[160], saved.xsave[160],
        "SSE untouched (not in RFBM)"
    );
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let back = v.get_fpu().unwrap();
    assert_eq!(back.xsave[32..160], saved.xsave[32..160]);
    assert_eq!(back.xsave[576..832], saved.xsave[576..832]);
}

#[test]
fn compacted_xrstor_header_checks() {
    // XSTATE_BV naming a component XCOMP_BV does not: #GP(0).
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.mov(rsi, 0x9000u64)?;
        a.xrstors(ptr(rsi))?;
        a.hlt()
    });
    v.mem.write_u64(0x9000 + 512, 4).unwrap();
    v.mem.write_u64(0x9000 + 520, (1 << 63) | 1).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
    // XRSTORS of a standard-form image: #GP(0).
    let mut v = xsave_vcpu(|a| {
        a.mov(eax, 7)?;
        a.xor(edx, edx)?;
        a.mov(rsi, 0x9000u64)?;
        a.xrstors(ptr(rsi))?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
}

#[test]
fn popcnt_counts_and_sets_zf_only_for_zero() {
    let (out, f) = alu(|a| a.popcnt(rax, rbx), 0, 0xf0f0, 0, CF | OF | SF);
    assert_eq!((out, f), (8, 0));
    let (out, f) = alu(|a| a.popcnt(eax, ebx), 5, 0, 0, CF);
    assert_eq!((out, f), (0, ZF));
}

#[test]
fn stac_clac_move_rflags_ac() {
    let mut v = with(|a| {
        a.stac()?;
        a.pushfq()?;
        a.clac()?;
        a.pushfq()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    let ac = 1u64 << 18;
    assert_eq!(r.rflags & ac, 0, "CLAC cleared AC");
    assert_ne!(v.mem.read_u64(r.rsp + 8).unwrap() & ac, 0, "STAC set AC");
}

#[test]
fn fwait_is_nm_only_with_mp_and_ts() {
    let mut v = with(|a| {
        a.wait()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(
        v.get_regs().unwrap().rip,
        CODE + 2,
        "no pending x87 exception"
    );
    let mut v = with(|a| {
        a.wait()?;
        a.hlt()
    });
    let mut s = v.get_sregs().unwrap();
    s.cr0 |= cr0::MP | cr0::TS;
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 7 * 16 + 1, "#NM");
}

#[test]
fn ldmxcsr_stmxcsr_carry_mxcsr_and_check_reserved_bits() {
    let mut v = xsave_vcpu(|a| {
        a.mov(rsi, 0x9000u64)?;
        a.ldmxcsr(dword_ptr(rsi))?;
        a.stmxcsr(dword_ptr(rsi + 4))?;
        a.ldmxcsr(dword_ptr(rsi + 8))?;
        a.hlt()
    });
    let mut s = v.get_sregs().unwrap();
    s.cr4 |= cr4::OSFXSR;
    v.set_sregs(&s).unwrap();
    v.mem.write_u32(0x9000, 0x9f80).unwrap();
    v.mem.write_u32(0x9008, 0x1_0000).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.mem.read_u32(0x9004).unwrap(), 0x9f80);
    let f = v.get_fpu().unwrap();
    assert_eq!(&f.xsave[24..28], &0x9f80u32.to_le_bytes());
    assert_eq!(f.xsave[512] & 2, 2, "SSE marked in use");
    assert_eq!(
        v.get_regs().unwrap().rip,
        HANDLERS + 13 * 16 + 1,
        "bit 16: #GP"
    );
}

/// The RFLAGS image a 64-bit handler entered without an error code finds
/// at RSP + 16 (RIP, CS, RFLAGS, RSP, SS).
fn pushed_rflags(v: &mut InterpVcpu, error_code: bool) -> u64 {
    let top = v.get_regs().unwrap().rsp;
    v.mem
        .read_u64(top + if error_code { 24 } else { 16 })
        .unwrap()
}

#[test]
fn jecxz_and_jrcxz_test_ecx_and_rcx_not_cx() {
    // SDM vol. 2, Jcc: JECXZ tests ECX, JRCXZ RCX (64-bit mode has no JCXZ).
    // JECXZ needs the 67h prefix in 64-bit mode, which code_asm does not
    // emit: the branches are written as bytes (rel8 3 skips one OR).
    let mut v = with(|a| {
        a.xor(eax, eax)?;
        a.mov(rcx, 0x1_0000u64)?; // CX = 0, ECX != 0
        a.db(&[0x67, 0xe3, 0x03])?; // jecxz +3
        a.or(eax, 1)?;
        a.db(&[0xe3, 0x03])?; // jrcxz +3
        a.or(eax, 2)?;
        a.mov(rcx, 0x1_0000_0000u64)?; // ECX = 0, RCX != 0
        a.db(&[0x67, 0xe3, 0x03])?; // jecxz +3
        a.or(eax, 4)?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(
        v.get_regs().unwrap().rax,
        3,
        "only the ECX = 0 JECXZ is taken"
    );
}

/// KVM_HC_SEND_IPI (10): RBX/RCX the APIC-ID bitmap from RDX, RSI the
/// ICR; each processor present gets one ICR write through the machine.
#[test]
fn vmcall_send_ipi_writes_the_icr_of_each_destination() {
    let code = |a: &mut CodeAssembler| {
        a.mov(rax, 10u64)?;
        a.mov(rbx, 0b1011u64)?; // APIC IDs 1, 2, 4 (from RDX = 1)
        a.mov(rcx, 0u64)?;
        a.mov(rdx, 1u64)?;
        a.mov(rsi, 0x1_4840u64)?; // vector 0x40, fixed, assert; logical (bit 11) and bit 16 dropped
        a.vmcall()?;
        a.hlt()
    };
    // x2APIC mode, four processors (APIC IDs 0-3): IDs 1 and 2 get it.
    let mut v = with(code);
    v.set_cpuid(std::sync::Arc::new(tandem_core::cpuid::CpuidTable::model(
        4,
    )));
    assert_eq!(v.run().unwrap(), VcpuExit::RdMsr { index: 0x1b });
    v.complete_rdmsr(Some(0xfee0_0000 | (1 << 11) | (1 << 10)));
    let mut writes = Vec::new();
    loop {
        match v.run().unwrap() {
            VcpuExit::WrMsr { index, value } => {
                writes.push((index, value));
                v.complete_wrmsr(true);
            }
            VcpuExit::RdMsr { .. } => v.complete_rdmsr(Some(0xfee0_0000 | (3 << 10))),
            VcpuExit::Hlt => break,
            e => panic!("unexpected exit {e:?}"),
        }
    }
    assert_eq!(
        writes,
        vec![(0x830, (1 << 32) | 0x4040), (0x830, (2 << 32) | 0x4040)]
    );
    assert_eq!(v.get_regs().unwrap().rax, 2, "two IPIs sent");

    // xAPIC mode: ICR high then ICR low in the APIC page, per destination.
    let mut v = with(code);
    v.set_cpuid(std::sync::Arc::new(tandem_core::cpuid::CpuidTable::model(
        2,
    )));
    let mut mmio = Vec::new();
    loop {
        match v.run().unwrap() {
            VcpuExit::RdMsr { .. } => v.complete_rdmsr(Some(0xfee0_0000 | (1 << 11))),
            VcpuExit::MmioWrite { addr, len } => {
                mmio.push((addr, len, v.mmio_data().to_vec()));
            }
            VcpuExit::Hlt => break,
            e => panic!("unexpected exit {e:?}"),
        }
    }
    assert_eq!(
        mmio,
        vec![
            (0xfee0_0310, 4, (1u32 << 24).to_le_bytes().to_vec()),
            (0xfee0_0300, 4, 0x4040u32.to_le_bytes().to_vec()),
        ]
    );
    assert_eq!(v.get_regs().unwrap().rax, 1);
}

#[test]
fn vmcall_returns_kvm_enosys_at_cpl0_and_eperm_above() {
    let mut v = with(|a| {
        a.mov(rax, 1234u64)?;
        a.vmcall()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rax, -1000i64 as u64, "-KVM_ENOSYS");

    // CPL 3: -KVM_EPERM; the UD2 after it reaches the #UD handler (ring 0).
    let mut v = with(|a| {
        a.vmcall()?;
        a.ud2()
    });
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::flat(0x23, 0xb, true);
    s.cs.dpl = 3;
    s.ss = Segment::flat(0x1b, 3, false);
    s.ss.dpl = 3;
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rax, u64::MAX, "-KVM_EPERM");
    assert_eq!(r.rip, HANDLERS + 6 * 16 + 1);

    // VMMCALL is AMD's: #UD on this Intel-vendor processor.
    let mut v = with(|a| a.vmmcall());
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 6 * 16 + 1);
}

#[test]
fn mcg_cap_and_mcg_status_read_zero() {
    let mut v = with(|a| {
        a.mov(eax, 0x5555u32)?;
        a.mov(edx, 0x5555u32)?;
        a.mov(ecx, 0x179u32)?;
        a.rdmsr()?;
        a.mov(ebx, eax)?;
        a.or(ebx, edx)?;
        a.mov(ecx, 0x17au32)?;
        a.rdmsr()?;
        a.or(ebx, eax)?;
        a.or(ebx, edx)?;
        // MCG_STATUS accepts 0.
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(esi, 1u32)?;
        // A non-zero MCG_STATUS is #GP(0).
        a.mov(eax, 1u32)?;
        a.wrmsr()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rbx, 0, "both read 0");
    assert_eq!(r.rsi, 1, "writing 0 to MCG_STATUS did not fault");
    assert_eq!(r.rip, HANDLERS + 13 * 16 + 1, "writing 1 is #GP");
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), 0);

    // MCG_CAP is read-only.
    let mut v = with(|a| {
        a.mov(ecx, 0x179u32)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
}

#[test]
fn faults_push_rf_set_and_traps_do_not() {
    // SDM vol. 3, 6.12.1: a fault's EFLAGS image has RF set.
    let mut v = with(|a| a.ud2());
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 6 * 16 + 1);
    assert_ne!(pushed_rflags(&mut v, false) & crate::flags::RF, 0, "#UD");
    assert_eq!(
        v.get_regs().unwrap().rflags & crate::flags::RF,
        0,
        "cleared in the handler"
    );

    // #GP with an error code.
    let mut v = with(|a| {
        a.mov(rbx, 0x8000_0000_0000u64)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_ne!(pushed_rflags(&mut v, true) & crate::flags::RF, 0, "#GP");

    // INT3 is a trap: RF as it was (clear).
    let mut v = with(|a| a.int3());
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 3 * 16 + 1);
    assert_eq!(pushed_rflags(&mut v, false) & crate::flags::RF, 0, "#BP");
}

#[test]
fn ltr_and_lldt_reject_a_non_canonical_base() {
    // 0x38: an available 64-bit TSS, 0x48: an LDT, both with base bits
    // 63:32 = 0x8000 (non-canonical): #GP(selector) (SDM vol. 2, LTR / LLDT).
    for (sel, type_) in [(0x38u16, 0x89u64), (0x48, 0x82)] {
        let mut v = with(|a| {
            a.mov(eax, u32::from(sel))?;
            if sel == 0x38 {
                a.ltr(ax)?;
            } else {
                a.lldt(ax)?;
            }
            a.hlt()
        });
        let lo = 0x67 | (0x6000u64 << 16) | (type_ << 40);
        v.mem.write_u64(0x3000 + u64::from(sel), lo).unwrap();
        v.mem.write_u64(0x3008 + u64::from(sel), 0x8000).unwrap();
        let mut s = v.get_sregs().unwrap();
        s.gdt.limit = 0x57;
        v.set_sregs(&s).unwrap();
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        assert_eq!(r.rip, HANDLERS + 13 * 16 + 1, "selector {sel:#x}");
        assert_eq!(v.mem.read_u64(r.rsp).unwrap(), u64::from(sel));
        // Nothing was loaded, and the TSS descriptor was not marked busy.
        let s = v.get_sregs().unwrap();
        assert_ne!(s.tr.selector, sel);
        assert_ne!(s.ldt.selector, sel);
        assert_eq!(v.mem.read_u64(0x3000 + u64::from(sel)).unwrap(), lo);

        // The same descriptor with a canonical base loads.
        let mut v2 = with(|a| {
            a.mov(eax, u32::from(sel))?;
            if sel == 0x38 {
                a.ltr(ax)?;
            } else {
                a.lldt(ax)?;
            }
            a.hlt()
        });
        v2.mem.write_u64(0x3000 + u64::from(sel), lo).unwrap();
        v2.mem.write_u64(0x3008 + u64::from(sel), 0).unwrap();
        v2.set_sregs(&s).unwrap();
        assert_eq!(v2.run().unwrap(), VcpuExit::Hlt);
        let rip = v2.get_regs().unwrap().rip;
        assert!((CODE..CODE + 16).contains(&rip), "ran to its own HLT");
        assert_eq!(v2.mem.read_u8(rip - 1).unwrap(), 0xf4);
    }
}

#[test]
fn cpuid_apic_bit_follows_apic_base_enable() {
    // SDM vol. 3, 11.4.3: with IA32_APIC_BASE.EN clear, CPUID.1:EDX[9] is 0.
    let mut v = with(|a| {
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(esi, edx)?;
        a.mov(ecx, 0x1bu32)?;
        a.mov(eax, 0xfee0_0000u32)?; // EN (bit 11) clear
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.mov(edi, edx)?;
        a.mov(ecx, 0x1bu32)?;
        a.rdmsr()?;
        a.mov(eax, 1u32)?;
        a.cpuid()?;
        a.hlt()
    });
    assert!(matches!(
        v.run().unwrap(),
        VcpuExit::WrMsr { index: 0x1b, .. }
    ));
    v.complete_wrmsr(true);
    assert_eq!(v.run().unwrap(), VcpuExit::RdMsr { index: 0x1b });
    // The LAPIC says it is enabled again (e.g. after a restore).
    v.complete_rdmsr(Some(0xfee0_0900));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_ne!(r.rsi & (1 << 9), 0, "APIC present at reset");
    assert_eq!(r.rdi & (1 << 9), 0, "EN clear: APIC bit 0");
    assert_ne!(r.rdx & (1 << 9), 0, "EN set again");
}

#[test]
fn syscall_in_compatibility_mode_is_ud_on_intel() {
    // SDM vol. 2, SYSCALL: #UD if not in 64-bit mode (Intel processors).
    let v = machine();
    let mut a = CodeAssembler::new(32).unwrap();
    a.syscall().unwrap();
    v.mem.write(CODE, &a.assemble(CODE).unwrap()).unwrap();
    let mut v = v;
    let mut s = v.get_sregs().unwrap();
    s.cs = Segment::flat(0x18, 0xb, false);
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 6 * 16 + 1);
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), CODE, "#UD at the SYSCALL");
}

/// Runs `v` to HLT completing MMIO exits from a byte array standing for
/// pc-testdev's iomem at 0xFF000000; returns the exits seen.
fn run_with_iomem(v: &mut InterpVcpu, iomem: &mut [u8]) -> Vec<VcpuExit> {
    let mut seen = Vec::new();
    loop {
        let e = v.run().unwrap();
        match e {
            VcpuExit::MmioRead { addr, len } => {
                let off = (addr - 0xff00_0000) as usize;
                v.mmio_data()
                    .copy_from_slice(&iomem[off..off + usize::from(len)]);
            }
            VcpuExit::MmioWrite { addr, len } => {
                let off = (addr - 0xff00_0000) as usize;
                iomem[off..off + usize::from(len)].copy_from_slice(v.mmio_data());
            }
            VcpuExit::Hlt => return seen,
            other => panic!("unexpected exit {other:?}"),
        }
        seen.push(e);
    }
}

#[test]
fn sse_string_and_state_save_instructions_complete_on_mmio() {
    let mut iomem = vec![0u8; 0x1000];
    let mut v = with(|a| {
        a.mov(rbx, 0xff00_0000u64)?;
        // A 16-byte SSE store and load across an 8-byte boundary.
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.movq(xmm0, rax)?;
        a.pinsrq(xmm0, rax, 1)?;
        a.movdqu(xmmword_ptr(rbx + 4), xmm0)?;
        a.movdqu(xmm1, xmmword_ptr(rbx + 4))?;
        a.movq(rsi, xmm1)?;
        // REP STOSB of 40 bytes (one access per iteration).
        a.lea(rdi, qword_ptr(rbx + 0x100))?;
        a.mov(ecx, 40u32)?;
        a.mov(al, 0x5a)?;
        a.rep().stosb()?;
        // FXSAVE: 512 bytes, far more accesses than one register write.
        a.fxsave(ptr(rbx + 0x200))?;
        a.hlt()
    });
    let mut s = v.get_sregs().unwrap();
    s.cr4 |= cr4::OSFXSR;
    v.set_sregs(&s).unwrap();
    let exits = run_with_iomem(&mut v, &mut iomem);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rsi, 0x1122_3344_5566_7788);
    assert_eq!(iomem[4..12], 0x1122_3344_5566_7788u64.to_le_bytes());
    assert_eq!(iomem[12..20], 0x1122_3344_5566_7788u64.to_le_bytes());
    assert!(iomem[0x100..0x128].iter().all(|&b| b == 0x5a));
    assert_eq!(iomem[0x128], 0);
    // FXSAVE stored FCW 0x37F and MXCSR 0x1F80 (their reset values).
    assert_eq!(iomem[0x200..0x202], [0x7f, 0x03]);
    assert_eq!(iomem[0x218..0x21c], 0x1f80u32.to_le_bytes());
    assert!(exits.len() > 64, "{} exits", exits.len());
}

#[test]
fn dr4_and_dr5_alias_dr6_and_dr7_unless_cr4_de() {
    // SDM vol. 3, 17.2.2: with CR4.DE = 0, DR4 / DR5 are DR6 / DR7.
    let code = |a: &mut CodeAssembler| {
        a.mov(rax, 0x1u64)?;
        a.mov(dr5, rax)?; // DR7.L0
        a.mov(rbx, dr7)?;
        a.mov(rcx, dr4)?; // DR6
        a.hlt()
    };
    let mut v = with(code);
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rbx, 0x401, "DR5 wrote DR7");
    assert_eq!(r.rcx, v.dr.dr6, "DR4 read DR6");
    assert_eq!(r.rcx & 0xffff_0ff0, 0xffff_0ff0);

    // CR4.DE = 1: #UD.
    let mut v = with(code);
    let mut s = v.get_sregs().unwrap();
    s.cr4 |= 1 << 3;
    v.set_sregs(&s).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, HANDLERS + 6 * 16 + 1);
    assert_eq!(v.mem.read_u64(r.rsp).unwrap(), CODE + 10, "#UD at MOV DR5");
    assert_eq!(v.dr.dr7 & 1, 0);
}

/// A vCPU whose #DB handler (vector 1) records the RIP and DR6 of each #DB
/// in a table at 0x7_8000 (count first), clears TF in the frame after
/// `max` of them, sets RF in the frame (as a debugger handler does) and
/// returns with IRETQ.
fn with_db_recorder(
    max: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> InterpVcpu {
    let v = with(f);
    let mut a = CodeAssembler::new(64).unwrap();
    let mut keep = a.create_label();
    let table = 0x7_8000u64;
    a.push(rax).unwrap();
    a.push(rbx).unwrap();
    a.mov(rbx, table).unwrap();
    a.mov(rax, qword_ptr(rbx)).unwrap();
    a.inc(qword_ptr(rbx)).unwrap();
    a.shl(rax, 4).unwrap();
    a.add(rbx, rax).unwrap();
    a.mov(rax, qword_ptr(rsp + 16)).unwrap(); // RIP
    a.mov(qword_ptr(rbx + 8), rax).unwrap();
    a.mov(rax, dr6).unwrap();
    a.mov(qword_ptr(rbx + 16), rax).unwrap();
    a.mov(rax, 0xffff_0ff0u64).unwrap();
    a.mov(dr6, rax).unwrap();
    a.mov(rbx, table).unwrap();
    a.cmp(qword_ptr(rbx), max as i32).unwrap();
    a.jb(keep).unwrap();
    a.and(qword_ptr(rsp + 32), !0x100i32).unwrap(); // TF
    a.set_label(&mut keep).unwrap();
    a.or(qword_ptr(rsp + 32), 0x1_0000).unwrap(); // RF
    a.pop(rbx).unwrap();
    a.pop(rax).unwrap();
    a.iretq().unwrap();
    let h = HANDLERS + 0x800;
    v.mem.write(h, &a.assemble(h).unwrap()).unwrap();
    // Gate 1 -> h (interrupt gate, DPL 3).
    let lo = (h & 0xffff) | (8 << 16) | (0xEEu64 << 40) | ((h >> 16) & 0xffff) << 48;
    v.mem.write_u64(0x4000 + 16, lo).unwrap();
    v.mem.write_u64(0x4008 + 16, h >> 32).unwrap();
    v
}

/// The (RIP, DR6) pairs the recorder saw.
fn db_records(v: &InterpVcpu) -> Vec<(u64, u64)> {
    let n = v.mem.read_u64(0x7_8000).unwrap();
    (0..n)
        .map(|k| {
            let e = 0x7_8000 + 16 * k;
            (
                v.mem.read_u64(e + 8).unwrap(),
                v.mem.read_u64(e + 16).unwrap(),
            )
        })
        .collect()
}

#[test]
fn single_step_traps_after_each_instruction_that_started_with_tf() {
    // SDM vol. 3, 17.3.1.4: POPF setting TF does not trap; the next
    // instructions do (the POPF clearing TF too), with DR6.BS.
    let mut v = with_db_recorder(100, |a| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.nop()?;
        a.pushfq()?;
        a.and(qword_ptr(rsp), !0x100i32)?;
        a.popfq()?;
        a.nop()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let recs = db_records(&v);
    let rips: Vec<u64> = recs.iter().map(|r| r.0 - CODE).collect();
    // PUSHFQ @0, OR @1, POPFQ @9 (sets TF), NOP @10, PUSHFQ @11, AND @12,
    // POPFQ @20 (clears TF, still traps), NOP @21.
    assert_eq!(rips, vec![11, 12, 20, 21]);
    for (_, status) in recs {
        assert_eq!(status, 0xffff_0ff0 | (1 << 14), "BS");
    }
}

#[test]
fn single_step_is_suppressed_by_mov_ss_but_not_by_sti() {
    let mut v = with_db_recorder(100, |a| {
        a.mov(eax, 0x10)?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.mov(ss, ax)?;
        a.nop()?;
        a.sti()?; // traps despite the STI shadow
        a.pushfq()?;
        a.and(qword_ptr(rsp), !0x100i32)?;
        a.popfq()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let rips: Vec<u64> = db_records(&v).iter().map(|r| r.0 - CODE).collect();
    // POPFQ @14 sets TF; MOV SS (66 8E D0) @15: no trap; NOP @18 -> 19;
    // STI @19 -> 20; PUSHFQ @20 -> 21; AND @21 -> 29; POPFQ @29 -> 30.
    assert_eq!(rips, vec![19, 20, 21, 29, 30]);
}

#[test]
fn instruction_breakpoint_faults_before_the_instruction_and_rf_suppresses_it() {
    // DR0 = CODE + 0x10, DR7.L0, R/W0 = LEN0 = 00: #DB with RIP at the
    // instruction, DR6.B0; the handler's RF lets it run once.
    let mut v = with_db_recorder(100, |a| a.hlt());
    // DR0 = the XOR at CODE + 0x15, then DR7.L0.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, CODE + 0x15).unwrap();
    a.mov(dr0, rax).unwrap();
    a.mov(eax, 0x401u32).unwrap();
    a.mov(dr7, rax).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    // MOV RAX, imm64 (10), MOV DR0 (3), MOV EAX, imm32 (5), MOV DR7 (3);
    // XOR (2), HLT (1).
    assert_eq!(code.len(), 0x15 + 3);
    v.mem.write(CODE, &code).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let recs = db_records(&v);
    assert_eq!(recs, vec![(CODE + 0x15, 0xffff_0ff0 | 1)]);
    assert_eq!(
        v.get_regs().unwrap().rip,
        CODE + 0x18,
        "the XOR and HLT then ran"
    );
    assert_eq!(
        v.get_regs().unwrap().rflags & crate::flags::RF,
        0,
        "RF cleared"
    );
}

#[test]
fn icebp_delivers_db_without_touching_dr6() {
    let mut v = with_db_recorder(100, |a| {
        a.db(&[0xf1])?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(CODE + 1, 0xffff_0ff0)]);
}

#[test]
fn dr7_gd_makes_mov_dr_a_general_detect_fault() {
    // SDM vol. 3, 17.3.1.2: #DB fault at the MOV DR, DR6.BD, GD cleared.
    let mut v = with_db_recorder(100, |a| {
        a.mov(eax, 0x2400u32)?; // GD
        a.mov(dr7, rax)?; // CODE + 5
        a.mov(rbx, dr6)?; // CODE + 8: faults once, then runs
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let recs = db_records(&v);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0, CODE + 8);
    assert_ne!(recs[0].1 & (1 << 13), 0, "DR6.BD");
    assert_eq!(v.dr.dr7 & (1 << 13), 0, "GD cleared");
}

#[test]
fn instruction_breakpoint_in_a_mov_ss_shadow_is_inhibited() {
    // SDM vol. 3, 6.8.3: debug exceptions are inhibited for the instruction
    // after MOV SS (an Intel processor loses the code breakpoint).
    let mut v = with_db_recorder(100, |a| a.hlt());
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, CODE + 0x1d).unwrap(); // 10
    a.mov(dr0, rax).unwrap(); // 3
    a.mov(eax, 0x401u32).unwrap(); // 5
    a.mov(dr7, rax).unwrap(); // 3
    a.mov(eax, 0x10u32).unwrap(); // 5 -> 0x1a
    a.mov(ss, ax).unwrap(); // 3 (66 8E D0) -> 0x1d
    a.xor(ecx, ecx).unwrap(); // the breakpoint
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    assert_eq!(code.len(), 0x1d + 3);
    v.mem.write(CODE, &code).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert!(db_records(&v).is_empty());
    assert_eq!(v.get_regs().unwrap().rip, CODE + 0x20, "XOR and HLT ran");
}

/// Data the debug-register tests watch (below the stacks, user-accessible).
const WATCHED: u64 = 0x5_0000;

/// DR7 with breakpoint `n` enabled (L`n`) with R/W `rw` and LEN `len`
/// (SDM vol. 3, 18.2.4).
fn dr7_bp(n: u64, rw: u64, len: u64) -> u64 {
    0x400 | (1 << (2 * n)) | (rw << (16 + 4 * n)) | (len << (18 + 4 * n))
}

/// Sets DR`n` to `addr` and DR7 to `dr7`, as a debugger (the VMM) would.
fn set_breakpoint(v: &mut InterpVcpu, n: usize, addr: u64, control: u64) {
    let mut d = v.get_debug_regs().unwrap();
    d.db[n] = addr;
    d.dr7 = control;
    v.set_debug_regs(&d).unwrap();
}

/// Assembles `f`'s code at CODE over what is there and returns the
/// addresses of the labels `f` returns.
fn load_labelled(
    v: &InterpVcpu,
    f: impl FnOnce(&mut CodeAssembler) -> Result<Vec<CodeLabel>, IcedError>,
) -> Vec<u64> {
    let mut a = CodeAssembler::new(64).unwrap();
    let labels = f(&mut a).unwrap();
    let r = a
        .assemble_options(
            CODE,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    v.mem.write(CODE, &r.inner.code_buffer).unwrap();
    labels.iter().map(|l| r.label_ip(l).unwrap()).collect()
}

const B: [u64; 4] = [1, 2, 4, 8];
const DR6_RESET: u64 = 0xffff_0ff0;
const DR6_BS: u64 = 1 << 14;

#[test]
fn data_write_breakpoint_traps_after_the_writing_instruction() {
    // SDM vol. 3, 18.2.4 and 18.3.1.2: R/W = 01 breaks on data writes only,
    // LEN = 11 watches 4 bytes; a data breakpoint is a trap: the #DB comes
    // after the instruction, RIP past it, DR6.B1 set.
    let mut v = with_db_recorder(100, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut after = a.create_label();
        a.mov(eax, dword_ptr(WATCHED + 0x100))?; // a read: no break
        a.mov(byte_ptr(WATCHED + 0x104), al)?; // past the 4 bytes
        a.mov(byte_ptr(WATCHED + 0xff), al)?; // before them
        a.mov(byte_ptr(WATCHED + 0x103), al)?; // their last byte
        a.set_label(&mut after)?;
        a.nop()?;
        a.hlt()?;
        Ok(vec![after])
    });
    set_breakpoint(&mut v, 1, WATCHED + 0x100, dr7_bp(1, 0b01, 0b11));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | B[1])]);
    assert_eq!(v.get_regs().unwrap().rip, l[0] + 2, "NOP and HLT ran");
}

#[test]
fn read_write_breakpoint_of_8_bytes_sees_overlapping_reads_and_writes() {
    // R/W = 11: reads and writes (not fetches); LEN = 10: 8 bytes. An
    // access that covers any watched byte hits (SDM vol. 3, 18.2.5).
    let mut v = with_db_recorder(100, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut read = a.create_label();
        let mut rmw = a.create_label();
        a.mov(rax, qword_ptr(WATCHED + 0x200))?; // 0x200..0x207: no
        a.mov(rax, qword_ptr(WATCHED + 0x204))?; // 0x204..0x20b: yes
        a.set_label(&mut read)?;
        a.add(byte_ptr(WATCHED + 0x20f), al)?; // the last byte: yes
        a.set_label(&mut rmw)?;
        a.mov(rax, qword_ptr(WATCHED + 0x210))?; // past it: no
        a.hlt()?;
        Ok(vec![read, rmw])
    });
    set_breakpoint(&mut v, 2, WATCHED + 0x208, dr7_bp(2, 0b11, 0b10));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(
        db_records(&v),
        vec![(l[0], DR6_RESET | B[2]), (l[1], DR6_RESET | B[2])]
    );
}

#[test]
fn disabled_and_execution_breakpoints_do_not_watch_data() {
    // DR0: R/W = 01 but neither L0 nor G0; DR3: enabled, R/W = 00 (an
    // instruction breakpoint on a data address). Writing there is no #DB.
    let mut v = with_db_recorder(100, |a| {
        a.mov(byte_ptr(WATCHED), al)?;
        a.mov(qword_ptr(WATCHED + 0x40), rax)?;
        a.hlt()
    });
    let mut d = v.get_debug_regs().unwrap();
    d.db[0] = WATCHED;
    d.db[3] = WATCHED + 0x40;
    d.dr7 = 0x400 | (0b01 << 16) | (0b11 << 18) | (1 << 6);
    v.set_debug_regs(&d).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert!(db_records(&v).is_empty());
}

#[test]
fn mov_to_dr7_arms_a_data_breakpoint() {
    // The guest sets the breakpoint itself (MOV DR1, MOV DR7): the store
    // after it traps.
    let mut v = with_db_recorder(100, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut after = a.create_label();
        a.mov(rax, WATCHED + 0x300)?;
        a.mov(dr1, rax)?;
        a.mov(eax, dr7_bp(1, 0b01, 0b01) as u32)?;
        a.mov(dr7, rax)?;
        a.mov(word_ptr(WATCHED + 0x301), ax)?;
        a.set_label(&mut after)?;
        a.hlt()?;
        Ok(vec![after])
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | B[1])]);
}

#[test]
fn rep_string_traps_after_the_iteration_that_hit() {
    // SDM vol. 3, 18.3.1.2: a data breakpoint on a repeated string
    // instruction traps after the iteration that accessed it: RIP is the
    // REP STOSB itself, which finishes after the handler returns.
    let mut v = with_db_recorder(100, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut rep = a.create_label();
        a.mov(edi, WATCHED as u32)?;
        a.mov(ecx, 16)?;
        a.mov(eax, 0xaa)?;
        a.set_label(&mut rep)?;
        a.rep().stosb()?;
        a.hlt()?;
        Ok(vec![rep])
    });
    set_breakpoint(&mut v, 0, WATCHED + 8, dr7_bp(0, 0b01, 0b00));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | B[0])]);
    let r = v.get_regs().unwrap();
    assert_eq!((r.rcx, r.rdi), (0, WATCHED + 16), "the rest of the REP ran");
    assert_eq!(v.mem.read_u8(WATCHED + 15).unwrap(), 0xaa);
}

#[test]
fn mov_ss_holds_a_data_breakpoint_until_after_the_next_instruction() {
    // SDM vol. 3, 6.8.3: a MOV SS that hits a data breakpoint has its #DB
    // delivered after the following instruction.
    let mut v = with_db_recorder(100, |a| a.hlt());
    v.mem.write_u64(WATCHED, 0x10).unwrap();
    let l = load_labelled(&v, |a| {
        let mut after_nop = a.create_label();
        a.mov(ss, word_ptr(WATCHED))?;
        a.nop()?;
        a.set_label(&mut after_nop)?;
        a.nop()?;
        a.hlt()?;
        Ok(vec![after_nop])
    });
    set_breakpoint(&mut v, 0, WATCHED, dr7_bp(0, 0b11, 0b01));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | B[0])]);
}

#[test]
fn a_db_delivered_in_the_mov_ss_shadow_reports_the_held_breakpoint() {
    // MOV SS hits DR0, then INT1 (ICEBP) in its shadow: one #DB, which
    // carries DR6.B0 (the held trap is not delivered a second time).
    let mut v = with_db_recorder(100, |a| a.hlt());
    v.mem.write_u64(WATCHED, 0x10).unwrap();
    let l = load_labelled(&v, |a| {
        let mut after = a.create_label();
        a.mov(ss, word_ptr(WATCHED))?;
        a.db(&[0xf1])?;
        a.set_label(&mut after)?;
        a.hlt()?;
        Ok(vec![after])
    });
    set_breakpoint(&mut v, 0, WATCHED, dr7_bp(0, 0b11, 0b01));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | B[0])]);
}

#[test]
fn a_held_data_breakpoint_follows_int_n_into_its_handler() {
    // MOV SS hits DR0, then INT 0x30 in its shadow: the #DB comes when INT
    // has completed, at the handler's first instruction.
    let mut v = with_db_recorder(100, |a| a.hlt());
    v.mem.write_u64(WATCHED, 0x10).unwrap();
    load_labelled(&v, |a| {
        a.mov(ss, word_ptr(WATCHED))?;
        a.int(0x30)?;
        a.hlt()?;
        Ok(vec![])
    });
    set_breakpoint(&mut v, 0, WATCHED, dr7_bp(0, 0b11, 0b01));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let handler = HANDLERS + 16 * 0x30;
    assert_eq!(db_records(&v), vec![(handler, DR6_RESET | B[0])]);
    assert_eq!(v.get_regs().unwrap().rip, handler + 1, "its HLT ran");
}

#[test]
fn io_breakpoints_need_cr4_de() {
    // SDM vol. 3, 18.2.4: R/W = 10 breaks on I/O to the port in DRn when
    // CR4.DE is set (undefined otherwise: no break here); a trap after the
    // IN / OUT.
    for de in [false, true] {
        let mut v = with_db_recorder(100, |a| a.hlt());
        let l = load_labelled(&v, |a| {
            let mut after = a.create_label();
            a.out(0x80, al)?;
            a.set_label(&mut after)?;
            a.hlt()?;
            Ok(vec![after])
        });
        let mut s = v.get_sregs().unwrap();
        if de {
            s.cr4 |= 1 << 3;
        }
        v.set_sregs(&s).unwrap();
        set_breakpoint(&mut v, 3, 0x80, dr7_bp(3, 0b10, 0b00));
        assert!(matches!(
            v.run().unwrap(),
            VcpuExit::IoOut { port: 0x80, .. }
        ));
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let want = if de {
            vec![(l[0], DR6_RESET | B[3])]
        } else {
            vec![]
        };
        assert_eq!(db_records(&v), want, "CR4.DE = {de}");
    }
}

#[test]
fn single_step_and_a_data_breakpoint_make_one_db() {
    // Both trap conditions of one instruction are reported together: DR6.BS
    // and DR6.B0 in a single #DB.
    let mut v = with_db_recorder(1, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut after = a.create_label();
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.mov(byte_ptr(WATCHED), al)?;
        a.set_label(&mut after)?;
        a.hlt()?;
        Ok(vec![after])
    });
    set_breakpoint(&mut v, 0, WATCHED, dr7_bp(0, 0b01, 0b00));
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | DR6_BS | B[0])]);
}

#[test]
fn single_step_trap_of_hlt_comes_before_the_waking_interrupt() {
    // A HLT that started with TF set: its single-step trap waits in the
    // halt state and is taken when an interrupt wakes the processor, with
    // RIP after the HLT (a trap of the previous instruction comes before an
    // external interrupt, SDM vol. 3, 6.9).
    let mut v = with_db_recorder(1, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut after = a.create_label();
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x300)?; // TF, IF
        a.popfq()?;
        a.hlt()?;
        a.set_label(&mut after)?;
        a.hlt()?;
        Ok(vec![after])
    });
    // Vector 0x30's handler returns at once.
    v.mem.write(HANDLERS + 16 * 0x30, &[0x48, 0xcf]).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert!(db_records(&v).is_empty(), "nothing while halted");
    v.inject(Event::external(0x30)).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(db_records(&v), vec![(l[0], DR6_RESET | DR6_BS)]);
    assert_eq!(v.get_regs().unwrap().rip, l[0] + 1);
}

/// The STAR value of the SYSCALL tests: SYSCALL CS 0x08 (SS 0x10); SYSRET
/// base 0x10: CS 0x13 (compatibility mode), SS 0x1b, CS 0x23 (64-bit).
const STAR: u64 = (0x10 << 48) | (0x08 << 32);

fn set_vendor(v: &mut InterpVcpu, vendor: tandem_core::cpuid::Vendor) {
    v.set_cpuid(Arc::new(tandem_core::cpuid::CpuidTable::model_for(
        1, vendor,
    )));
}

#[test]
fn syscall_from_compatibility_mode_is_amd_only() {
    // AMD APM vol. 3, SYSCALL: from compatibility mode the target is CSTAR,
    // in 64-bit mode; SYSRET with 32-bit operand size returns to
    // compatibility mode and changes only SS's selector (its base, limit and
    // attributes stay). Intel (SDM vol. 2, SYSCALL): #UD in compatibility
    // mode, and SYSRET loads flat DPL 3 SS attributes.
    use tandem_core::cpuid::Vendor;
    for vendor in [Vendor::Amd, Vendor::Intel] {
        let mut v = machine();
        set_vendor(&mut v, vendor);
        let l = load_labelled(&v, |a| {
            let mut user32 = a.create_label();
            let mut cstar = a.create_label();
            let mut after = a.create_label();
            a.mov(ecx, 0xc000_0081u32)?;
            a.mov(eax, STAR as u32)?;
            a.mov(edx, (STAR >> 32) as u32)?;
            a.wrmsr()?;
            a.mov(ecx, 0xc000_0083u32)?; // CSTAR
            a.lea(rax, ptr(cstar))?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            a.lea(rcx, ptr(user32))?;
            a.mov(r11, 0x202u64)?;
            a.sysret()?; // 32-bit operand size: to compatibility mode
            a.set_label(&mut user32)?;
            a.syscall()?; // 0F 05 in compatibility mode too
            a.set_label(&mut after)?;
            a.hlt()?;
            a.set_label(&mut cstar)?;
            a.hlt()?;
            Ok(vec![after, cstar])
        });
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        let s = v.get_sregs().unwrap();
        if vendor == Vendor::Amd {
            assert_eq!(r.rip, l[1] + 1, "entered at CSTAR");
            assert_eq!((s.cs.selector, s.cs.l, s.ss.selector), (8, true, 0x10));
            assert_eq!((r.rcx, r.r11), (l[0], 0x202));
        } else {
            assert_eq!(r.rip, HANDLERS + 16 * 6 + 1, "#UD");
            let frame_rip = v.mem.read_u64(r.rsp).unwrap();
            assert_eq!(frame_rip, l[0] - 2, "at the SYSCALL");
        }
    }
    // The SS that SYSRET leaves: AMD keeps the attributes of the kernel's
    // SS (DPL 0 here) and changes the selector, Intel loads flat DPL 3.
    for (vendor, dpl) in [(Vendor::Amd, 0), (Vendor::Intel, 3)] {
        let mut v = machine();
        set_vendor(&mut v, vendor);
        let l = load_labelled(&v, |a| {
            let mut user = a.create_label();
            a.mov(ecx, 0xc000_0081u32)?;
            a.mov(eax, STAR as u32)?;
            a.mov(edx, (STAR >> 32) as u32)?;
            a.wrmsr()?;
            a.lea(rcx, ptr(user))?;
            a.mov(r11, 0x2u64)?;
            a.sysretq()?;
            a.set_label(&mut user)?;
            a.nop()?;
            Ok(vec![user])
        });
        for _ in 0..7 {
            assert_eq!(v.step_one().unwrap(), None);
        }
        let s = v.get_sregs().unwrap();
        assert_eq!(v.get_regs().unwrap().rip, l[0], "{vendor:?}");
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x23, 3, true));
        assert_eq!((s.ss.selector, s.ss.dpl), (0x1b, dpl), "{vendor:?}");
    }
}

#[test]
fn syscall_and_sysret_single_step_on_tf_as_they_leave_it() {
    // SYSRET loading TF = 1 from R11 traps right after itself, in user
    // mode; SYSCALL whose SFMASK clears TF makes no #DB in the kernel (KVM's
    // syscall test, Linux's entry code).
    let mut v = with_db_recorder(100, |a| a.hlt());
    let l = load_labelled(&v, |a| {
        let mut user = a.create_label();
        let mut lstar = a.create_label();
        a.mov(ecx, 0xc000_0081u32)?;
        a.mov(eax, STAR as u32)?;
        a.mov(edx, (STAR >> 32) as u32)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0082u32)?; // LSTAR
        a.lea(rax, ptr(lstar))?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0084u32)?; // SFMASK: TF
        a.mov(eax, 0x100)?;
        a.wrmsr()?;
        a.lea(rcx, ptr(user))?;
        a.mov(r11, 0x302u64)?; // TF, IF
        a.sysretq()?;
        a.set_label(&mut user)?;
        a.nop()?;
        a.syscall()?;
        a.set_label(&mut lstar)?;
        a.hlt()?;
        Ok(vec![user, lstar])
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(
        db_records(&v),
        vec![(l[0], DR6_RESET | DR6_BS), (l[0] + 1, DR6_RESET | DR6_BS)],
        "after SYSRET and after the NOP; none after SYSCALL"
    );
    let r = v.get_regs().unwrap();
    assert_eq!(r.rip, l[1] + 1);
    assert_ne!(r.r11 & 0x100, 0, "R11 has the user's TF");
}

#[test]
fn amd_legacy_performance_counters_are_amd_only() {
    // AMD APM vol. 2, 13.2.1: PerfEvtSel0-3 at C001_0000h, PerfCtr0-3 (48
    // bits) at C001_0004h; an Intel processor has no such MSRs (#GP).
    use tandem_core::cpuid::Vendor;
    for vendor in [Vendor::Amd, Vendor::Intel] {
        let mut v = with(|a| {
            a.mov(ecx, 0xc001_0004u32)?;
            a.mov(eax, 0x1234_5678u32)?;
            a.mov(edx, 0xffff_ffffu32)?;
            a.wrmsr()?;
            a.rdmsr()?;
            a.hlt()
        });
        set_vendor(&mut v, vendor);
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        if vendor == Vendor::Amd {
            assert_eq!((r.rax, r.rdx), (0x1234_5678, 0xffff), "48 bits kept");
        } else {
            assert_eq!(r.rip, HANDLERS + 16 * 13 + 1, "#GP");
        }
    }
}

#[test]
fn amd_syscall_and_sysret_in_legacy_protected_mode() {
    // AMD APM vol. 3, SYSCALL / SYSRET outside long mode: SYSRET enters CPL
    // 3 at ECX with CS = STAR[63:48] | 3 (flat 32-bit) and sets IF; SYSCALL
    // saves the return EIP in ECX, enters CS = STAR[47:32] at STAR[31:0]
    // and clears IF, VM and RF. Intel: both #UD outside 64-bit mode.
    use tandem_core::cpuid::Vendor;
    for vendor in [Vendor::Amd, Vendor::Intel] {
        let mut v = machine32();
        set_vendor(&mut v, vendor);
        let mut s = v.get_sregs().unwrap();
        s.efer = efer::SCE;
        v.set_sregs(&s).unwrap();
        let mut a = CodeAssembler::new(32).unwrap();
        let mut user = a.create_label();
        let mut after = a.create_label();
        let mut target = a.create_label();
        a.mov(ecx, 0xc000_0081u32).unwrap();
        a.mov(eax, 0u32).unwrap(); // patched below: the target EIP
        a.mov(edx, 0x0010_0038u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0u32).unwrap(); // patched below: the user EIP
        a.sysret().unwrap();
        a.set_label(&mut user).unwrap();
        a.syscall().unwrap();
        a.set_label(&mut after).unwrap();
        a.hlt().unwrap();
        a.set_label(&mut target).unwrap();
        a.hlt().unwrap();
        let r = a
            .assemble_options(
                CODE,
                iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .unwrap();
        let (user, after, target) = (
            r.label_ip(&user).unwrap(),
            r.label_ip(&after).unwrap(),
            r.label_ip(&target).unwrap(),
        );
        let mut code = r.inner.code_buffer.clone();
        // MOV ECX, imm32 (B9, 5 bytes); MOV EAX, imm32 at 5; MOV EDX at 10;
        // WRMSR (2) at 15; MOV ECX, imm32 at 17.
        assert_eq!((code[5], code[17]), (0xb8, 0xb9));
        code[6..10].copy_from_slice(&(target as u32).to_le_bytes());
        code[18..22].copy_from_slice(&(user as u32).to_le_bytes());
        v.mem.write(CODE, &code).unwrap();
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        let s = v.get_sregs().unwrap();
        if vendor == Vendor::Amd {
            assert_eq!(r.rip, target + 1);
            assert_eq!((s.cs.selector, s.cs.dpl, s.cs.db), (0x38, 0, true));
            assert_eq!(s.ss.selector, 0x40);
            assert_eq!(r.rcx, after, "ECX: the return EIP");
            assert_eq!(r.rflags & IF, 0, "IF cleared (SYSRET had set it)");
        } else {
            assert_eq!(r.rip, HANDLERS + 16 * 6 + 1, "#UD");
            assert_eq!(u64::from(v.mem.read_u32(r.rsp).unwrap()), user - 2);
        }
    }
}

// SMEP, SMAP and protection keys (SDM vol. 3, 4.6; error code 4.7).

const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const CR4_PKE: u64 = 1 << 22;
const CR4_PKS: u64 = 1 << 24;
const PF_VECTOR_RIP: u64 = HANDLERS + 14 * 16 + 1;
/// The linear page the rights tests access, mapped by a 4 KiB PTE.
const RIGHTS_PAGE: u64 = 0x4000_0000;

/// A vCPU running `f` at CPL 0 with `cr4_bits` set by MOV to CR4 first
/// (so the CR4 check against CPUID runs), the first GiB a supervisor-mode
/// page when `supervisor_low` (code, stack and tables), and RIGHTS_PAGE
/// mapped to physical 0x300000 with leaf PTE bits `pte` (the upper
/// levels P | W | U).
fn rights_vcpu(
    cr4_bits: u64,
    supervisor_low: bool,
    pte: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> InterpVcpu {
    let v = with(|a| {
        a.mov(rax, cr4)?;
        a.mov(rcx, cr4_bits)?;
        a.or(rax, rcx)?;
        a.mov(cr4, rax)?;
        f(a)
    });
    if supervisor_low {
        v.mem.write_u64(0x2000, 0x83).unwrap();
    }
    v.mem.write_u64(0x2008, 0x6007).unwrap();
    v.mem.write_u64(0x6000, 0x7007).unwrap();
    v.mem.write_u64(0x7000, 0x30_0000 | pte).unwrap();
    v.mem.write_u32(0x30_0000, 0x1234_5678).unwrap();
    v
}

/// Runs to HLT; returns the #PF error code and CR2, or None when no #PF
/// was taken.
fn run_for_pf(v: &mut InterpVcpu) -> Option<(u64, u64)> {
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    if r.rip != PF_VECTOR_RIP {
        return None;
    }
    Some((v.mem.read_u64(r.rsp).unwrap(), v.get_sregs().unwrap().cr2))
}

#[test]
fn cpuid_offers_smep_smap_pku_pks_and_ospke_follows_cr4() {
    let mut v = with(|a| {
        a.mov(eax, 7)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(esi, ecx)?;
        a.mov(rax, cr4)?;
        a.mov(rcx, CR4_PKE)?;
        a.or(rax, rcx)?;
        a.mov(cr4, rax)?;
        a.mov(eax, 7)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rbx & (1 << 7 | 1 << 20), 1 << 7 | 1 << 20, "SMEP, SMAP");
    assert_eq!(r.rsi & (1 << 3 | 1 << 31), 1 << 3 | 1 << 31, "PKU, PKS");
    assert_eq!(r.rsi & (1 << 4), 0, "OSPKE clear before CR4.PKE");
    assert_ne!(r.rcx & (1 << 4), 0, "OSPKE set with CR4.PKE");
}

#[test]
fn cr4_rights_bits_are_gp_without_the_cpuid_feature() {
    for bit in [CR4_SMEP, CR4_SMAP, CR4_PKE, CR4_PKS] {
        let mut v = rights_vcpu(bit, true, 7, |a| a.hlt());
        let mut t = tandem_core::cpuid::CpuidTable::model(1);
        for e in &mut t.entries {
            if e.function == 7 {
                e.ebx = 0;
                e.ecx = 0;
            }
        }
        v.set_cpuid(Arc::new(t));
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        assert_eq!(r.rip, HANDLERS + 13 * 16 + 1, "CR4 bit {bit:#x}: #GP");
        assert_eq!(v.get_sregs().unwrap().cr4 & bit, 0);
        // With the model's CPUID the same write is accepted.
        let mut v = rights_vcpu(bit, true, 7, |a| a.hlt());
        assert_eq!(run_for_pf(&mut v), None);
        assert!(v.get_regs().unwrap().rip < HANDLERS, "no fault");
        assert_ne!(v.get_sregs().unwrap().cr4 & bit, 0);
    }
}

#[test]
fn smep_faults_a_supervisor_fetch_from_a_user_page() {
    for (cr4_bits, faults) in [(0, false), (CR4_SMEP, true)] {
        let mut v = rights_vcpu(cr4_bits, true, 7, |a| {
            a.mov(rax, RIGHTS_PAGE)?;
            a.jmp(rax)
        });
        v.mem.write_u8(0x30_0000, 0xf4).unwrap(); // HLT on the user page
        let pf = run_for_pf(&mut v);
        if faults {
            // P | I/D (EFER.NXE is set), supervisor, CR2 the target.
            assert_eq!(pf, Some((0x11, RIGHTS_PAGE)));
        } else {
            assert_eq!(pf, None);
            assert_eq!(v.get_regs().unwrap().rip, RIGHTS_PAGE + 1);
        }
    }
    // I/D is set for a SMEP fault even without EFER.NXE (SDM vol. 3, 4.7).
    let mut v = rights_vcpu(CR4_SMEP, true, 7, |a| {
        a.mov(rax, RIGHTS_PAGE)?;
        a.jmp(rax)
    });
    let mut s = v.get_sregs().unwrap();
    s.efer &= !efer::NXE;
    v.set_sregs(&s).unwrap();
    assert_eq!(run_for_pf(&mut v), Some((0x11, RIGHTS_PAGE)));
    // A user-mode page is still readable at CPL 0 with SMEP alone.
    let mut v = rights_vcpu(CR4_SMEP, true, 7, |a| {
        a.mov(rbx, RIGHTS_PAGE)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.hlt()
    });
    assert_eq!(run_for_pf(&mut v), None);
    assert_eq!(v.get_regs().unwrap().rax, 0x1234_5678);
}

#[test]
fn smap_faults_supervisor_data_accesses_to_user_pages_unless_ac() {
    // STAC: the read and the write pass (and leave a cached translation);
    // CLAC: the same read faults without any flush.
    let mut v = rights_vcpu(CR4_SMAP, true, 7, |a| {
        a.mov(rbx, RIGHTS_PAGE)?;
        a.stac()?;
        a.mov(eax, dword_ptr(rbx))?;
        a.mov(dword_ptr(rbx + 4), eax)?;
        a.clac()?;
        a.mov(esi, dword_ptr(rbx))?;
        a.hlt()
    });
    assert_eq!(run_for_pf(&mut v), Some((0x1, RIGHTS_PAGE)), "read: P");
    assert_eq!(v.get_regs().unwrap().rax, 0x1234_5678);
    assert_eq!(v.mem.read_u32(0x30_0004).unwrap(), 0x1234_5678);
    // A write with AC clear: P | W.
    let mut v = rights_vcpu(CR4_SMAP, true, 7, |a| {
        a.mov(rbx, RIGHTS_PAGE)?;
        a.mov(dword_ptr(rbx + 8), ebx)?;
        a.hlt()
    });
    assert_eq!(run_for_pf(&mut v), Some((0x3, RIGHTS_PAGE + 8)));
    assert_eq!(v.mem.read_u32(0x30_0008).unwrap(), 0, "nothing written");
    // With AC set, a read-only user page: CR0.WP decides as without SMAP.
    for (wp, faults) in [(true, true), (false, false)] {
        let mut v = rights_vcpu(CR4_SMAP, true, 5, |a| {
            a.mov(rbx, RIGHTS_PAGE)?;
            a.stac()?;
            a.mov(dword_ptr(rbx + 8), ebx)?;
            a.hlt()
        });
        if !wp {
            let mut s = v.get_sregs().unwrap();
            s.cr0 &= !cr0::WP;
            v.set_sregs(&s).unwrap();
        }
        let pf = run_for_pf(&mut v);
        assert_eq!(pf.is_some(), faults, "WP {wp}");
    }
    // Supervisor pages and instruction fetches from user pages are not
    // SMAP's business.
    let mut v = rights_vcpu(CR4_SMAP, true, 7, |a| {
        a.mov(rbx, RIGHTS_PAGE)?;
        a.jmp(rbx)
    });
    v.mem.write_u8(0x30_0000, 0xf4).unwrap();
    assert_eq!(run_for_pf(&mut v), None);
    assert_eq!(v.get_regs().unwrap().rip, RIGHTS_PAGE + 1);
}

#[test]
fn smap_faults_an_implicit_supervisor_access_even_with_ac() {
    // The LDT lives on the user page; loading DS from it reads the
    // descriptor with an implicit supervisor-mode access.
    for (cr4_bits, faults) in [(0, false), (CR4_SMAP, true)] {
        let mut v = rights_vcpu(cr4_bits, true, 7, |a| {
            a.stac()?;
            a.mov(eax, 4)?; // LDT entry 0, RPL 0
            a.mov(ds, ax)?;
            a.hlt()
        });
        v.mem.write_u64(0x30_0000, 0x00CF_9300_0000_FFFF).unwrap();
        let mut s = v.get_sregs().unwrap();
        s.ldt = Segment {
            selector: 0x30,
            base: RIGHTS_PAGE,
            limit: 0xf,
            type_: 2,
            present: true,
            ..Default::default()
        };
        v.set_sregs(&s).unwrap();
        let pf = run_for_pf(&mut v);
        if faults {
            assert_eq!(pf, Some((0x1, RIGHTS_PAGE)), "P, supervisor read");
        } else {
            assert_eq!(pf, None);
            assert_eq!(v.get_sregs().unwrap().ds.selector, 4);
        }
    }
}

/// Error code with PK (bit 5).
const PF_PK: u64 = 0x20;

#[test]
fn pkru_access_disable_blocks_supervisor_data_accesses_to_user_pages() {
    // Key 2 on the user page; PKRU.AD2 = bit 4. A first read caches the
    // translation; WRPKRU then takes effect without a flush.
    let mut v = rights_vcpu(CR4_PKE, false, 7 | (2 << 59), |a| {
        a.mov(rbx, RIGHTS_PAGE)?;
        a.mov(edi, dword_ptr(rbx))?;
        a.xor(ecx, ecx)?;
        a.xor(edx, edx)?;
        a.mov(eax, 0x10)?;
        a.wrpkru()?;
        a.rdpkru()?;
        a.mov(esi, eax)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.hlt()
    });
    assert_eq!(run_for_pf(&mut v), Some((0x1 | PF_PK, RIGHTS_PAGE)));
    let r = v.get_regs().unwrap();
    assert_eq!((r.rdi, r.rsi), (0x1234_5678, 0x10), "read, then RDPKRU");
    // AD for another key, and PKRU on a supervisor page: no effect.
    for pte in [7 | (3 << 59), 3 | (2 << 59)] {
        let mut v = rights_vcpu(CR4_PKE, false, pte, |a| {
            a.mov(rbx, RIGHTS_PAGE)?;
            a.xor(ecx, ecx)?;
            a.xor(edx, edx)?;
            a.mov(eax, 0x10)?;
            a.wrpkru()?;
            a.mov(dword_ptr(rbx), eax)?;
            a.hlt()
        });
        assert_eq!(run_for_pf(&mut v), None, "PTE {pte:#x}");
        assert_eq!(v.mem.read_u32(0x30_0000).unwrap(), 0x10);
    }
    // Instruction fetches are not subject to protection keys.
    let mut v = rights_vcpu(CR4_PKE, false, 7 | (2 << 59), |a| {
        a.xor(ecx, ecx)?;
        a.xor(edx, edx)?;
        a.mov(eax, 0x10)?;
        a.wrpkru()?;
        a.mov(rbx, RIGHTS_PAGE)?;
        a.jmp(rbx)
    });
    v.mem.write_u8(0x30_0000, 0xf4).unwrap();
    assert_eq!(run_for_pf(&mut v), None);
    assert_eq!(v.get_regs().unwrap().rip, RIGHTS_PAGE + 1);
}

#[test]
fn pkru_write_disable_blocks_supervisor_writes_only_with_wp() {
    for (wp, faults) in [(true, true), (false, false)] {
        let mut v = rights_vcpu(CR4_PKE, false, 7 | (2 << 59), |a| {
            a.mov(rbx, RIGHTS_PAGE)?;
            a.xor(ecx, ecx)?;
            a.xor(edx, edx)?;
            a.mov(eax, 0x20)?; // WD2
            a.wrpkru()?;
            a.mov(esi, dword_ptr(rbx))?; // reads pass
            a.mov(dword_ptr(rbx), eax)?;
            a.hlt()
        });
        if !wp {
            let mut s = v.get_sregs().unwrap();
            s.cr0 &= !cr0::WP;
            v.set_sregs(&s).unwrap();
        }
        let pf = run_for_pf(&mut v);
        assert_eq!(v.get_regs().unwrap().rsi, 0x1234_5678);
        if faults {
            assert_eq!(pf, Some((0x3 | PF_PK, RIGHTS_PAGE)), "P | W | PK");
        } else {
            assert_eq!(pf, None);
            assert_eq!(v.mem.read_u32(0x30_0000).unwrap(), 0x20);
        }
    }
}

#[test]
fn pkru_write_disable_blocks_user_writes_even_without_wp() {
    // CPL 3 code (WRPKRU works at any CPL); CR4.PKE set beforehand.
    let mut v = with(|a| {
        a.mov(rbx, RIGHTS_PAGE)?;
        a.xor(ecx, ecx)?;
        a.xor(edx, edx)?;
        a.mov(eax, 0x20)?;
        a.wrpkru()?;
        a.mov(esi, dword_ptr(rbx))?;
        a.mov(dword_ptr(rbx), eax)?;
        a.hlt()
    });
    v.mem.write_u64(0x2008, 0x6007).unwrap();
    v.mem.write_u64(0x6000, 0x7007).unwrap();
    v.mem.write_u64(0x7000, 0x30_0000 | 7 | (2 << 59)).unwrap();
    v.mem.write_u32(0x30_0000, 0x1234_5678).unwrap();
    let mut s = v.get_sregs().unwrap();
    s.cr4 |= CR4_PKE;
    s.cr0 &= !cr0::WP;
    s.cs = Segment::flat(0x23, 0xb, true);
    s.cs.dpl = 3;
    s.ss = Segment::flat(0x1b, 3, false);
    s.ss.dpl = 3;
    v.set_sregs(&s).unwrap();
    assert_eq!(run_for_pf(&mut v), Some((0x7 | PF_PK, RIGHTS_PAGE)));
    assert_eq!(v.get_regs().unwrap().rsi, 0x1234_5678, "the read passed");
}

#[test]
fn rdpkru_wrpkru_fault_without_cr4_pke_or_with_ecx_edx_set() {
    let ud = HANDLERS + 6 * 16 + 1;
    let gp = HANDLERS + 13 * 16 + 1;
    let cases: [(u64, u64, u64, bool, u64); 5] = [
        // (CR4 bits, ECX, EDX, RDPKRU rather than WRPKRU, handler)
        (0, 0, 0, true, ud),
        (0, 0, 0, false, ud),
        (CR4_PKE, 1, 0, true, gp),
        (CR4_PKE, 1, 0, false, gp),
        (CR4_PKE, 0, 1, false, gp),
    ];
    for (bits, ecx_v, edx_v, read, handler) in cases {
        let mut v = rights_vcpu(bits, false, 7, |a| {
            a.mov(ecx, ecx_v as u32)?;
            a.mov(edx, edx_v as u32)?;
            a.mov(eax, 0xc)?;
            if read {
                a.rdpkru()?;
            } else {
                a.wrpkru()?;
            }
            a.hlt()
        });
        assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
        let r = v.get_regs().unwrap();
        assert_eq!(r.rip, handler, "{bits:#x} {ecx_v} {edx_v} {read}");
    }
}

#[test]
fn pks_keys_guard_supervisor_pages_through_ia32_pkrs() {
    // (IA32_PKRS, CR0.WP, write, expected error code)
    let cases: [(u32, bool, bool, Option<u64>); 5] = [
        (0x10, true, false, Some(0x1 | PF_PK)),
        (0x10, false, true, Some(0x3 | PF_PK)),
        (0x20, true, true, Some(0x3 | PF_PK)),
        (0x20, false, true, None),
        (0x20, true, false, None),
    ];
    for (pkrs, wp, write, expect) in cases {
        let mut v = rights_vcpu(CR4_PKS, false, 3 | (2 << 59), |a| {
            a.mov(rbx, RIGHTS_PAGE)?;
            a.mov(esi, dword_ptr(rbx))?; // cached with PKRS = 0
            a.mov(ecx, 0x6e1)?;
            a.xor(edx, edx)?;
            a.mov(eax, pkrs)?;
            a.wrmsr()?;
            a.xor(eax, eax)?;
            a.rdmsr()?;
            a.mov(edi, eax)?;
            if write {
                a.mov(dword_ptr(rbx), eax)?;
            } else {
                a.mov(eax, dword_ptr(rbx))?;
            }
            a.hlt()
        });
        if !wp {
            let mut s = v.get_sregs().unwrap();
            s.cr0 &= !cr0::WP;
            v.set_sregs(&s).unwrap();
        }
        let pf = run_for_pf(&mut v);
        let r = v.get_regs().unwrap();
        assert_eq!(r.rdi, u64::from(pkrs), "RDMSR reads IA32_PKRS back");
        assert_eq!(r.rsi, 0x1234_5678);
        assert_eq!(pf.map(|p| p.0), expect, "{pkrs:#x} WP {wp} write {write}");
    }
    // IA32_PKRS does not guard user pages, nor without CR4.PKS.
    for (bits, pte) in [(CR4_PKS, 7 | (2 << 59)), (0, 3 | (2 << 59))] {
        let mut v = rights_vcpu(bits, false, pte, |a| {
            a.mov(ecx, 0x6e1)?;
            a.xor(edx, edx)?;
            a.mov(eax, 0x30)?;
            a.wrmsr()?;
            a.mov(rbx, RIGHTS_PAGE)?;
            a.mov(dword_ptr(rbx), eax)?;
            a.hlt()
        });
        assert_eq!(run_for_pf(&mut v), None, "CR4 {bits:#x} PTE {pte:#x}");
        assert_eq!(v.mem.read_u32(0x30_0000).unwrap(), 0x30);
    }
    // Reserved bits 63:32 of IA32_PKRS: #GP(0).
    let mut v = rights_vcpu(CR4_PKS, false, 3, |a| {
        a.mov(ecx, 0x6e1)?;
        a.mov(edx, 1)?;
        a.xor(eax, eax)?;
        a.wrmsr()?;
        a.hlt()
    });
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    assert_eq!(v.get_regs().unwrap().rip, HANDLERS + 13 * 16 + 1);
}

#[test]
fn pkru_is_xsave_state_component_9() {
    let mut v = xsave_vcpu(|a| {
        a.mov(rax, cr4)?;
        a.mov(rcx, CR4_PKE)?;
        a.or(rax, rcx)?;
        a.mov(cr4, rax)?;
        a.xor(ecx, ecx)?;
        a.xor(edx, edx)?;
        // AD2 | AD3 (key 0, the test's own pages, stays open).
        a.mov(eax, 0x50)?;
        a.wrpkru()?;
        a.mov(eax, 0x203)?;
        a.xsetbv()?;
        a.mov(eax, 0xffff_ffffu32)?;
        a.mov(edx, eax)?;
        a.mov(rsi, 0x9000u64)?;
        a.xsave64(ptr(rsi))?;
        // Restore PKRU = 0xc from a second image.
        a.mov(rsi, 0xc000u64)?;
        a.mov(eax, 0x200)?;
        a.xor(edx, edx)?;
        a.xrstor64(ptr(rsi))?;
        a.xor(ecx, ecx)?;
        a.rdpkru()?;
        a.hlt()
    });
    v.mem.write_u64(0xc000 + 512, 0x200).unwrap();
    v.mem.write_u32(0xc000 + 2688, 0xc).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
    let r = v.get_regs().unwrap();
    assert_eq!(r.rax, 0xc, "XRSTOR loaded PKRU");
    assert_eq!(
        v.mem.read_u32(0x9000 + 2688).unwrap(),
        0x50,
        "XSAVE stored PKRU"
    );
    assert_ne!(
        v.mem.read_u64(0x9000 + 512).unwrap() & 0x200,
        0,
        "XSTATE_BV[9]"
    );
    let f = v.get_fpu().unwrap();
    assert_eq!(f.xcr0, 0x203);
    assert_eq!(&f.xsave[2688..2692], &0xcu32.to_le_bytes());
}
