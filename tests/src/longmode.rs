//! A minimal 64-bit environment built directly in guest memory, for tests
//! and benchmarks that start a vCPU on a few bytes of code without a boot
//! loader: identity-mapped first GiB with 2 MiB pages, a GDT with a flat
//! 64-bit code segment (0x08) and data segment (0x10).

use tandem_core::cpu::{cr0, cr4, efer, DescriptorTable, Regs, Segment, Sregs, VcpuState};
use tandem_core::memory::{GuestMemory, MemoryError};

pub const GDT_ADDR: u64 = 0x8000;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Where tests usually put their code.
pub const CODE_ADDR: u64 = 0x10_0000;
/// Top of the stack tests get.
pub const STACK_TOP: u64 = 0x8_0000;

/// Writes the tables and returns the state of a vCPU about to run 64-bit
/// ring-0 code at `rip` with interrupts disabled.
pub fn long_mode_state(mem: &GuestMemory, rip: u64) -> Result<VcpuState, MemoryError> {
    // GDT: null, code64 (P, DPL0, S, type 0xb, L), data (P, S, type 3).
    mem.write_u64(GDT_ADDR, 0)?;
    mem.write_u64(GDT_ADDR + 8, 0x00af_9b00_0000_ffff)?;
    mem.write_u64(GDT_ADDR + 16, 0x00cf_9300_0000_ffff)?;
    mem.write_u64(PML4_ADDR, PDPT_ADDR | 3)?;
    mem.write_u64(PDPT_ADDR, PD_ADDR | 3)?;
    for i in 0..512u64 {
        mem.write_u64(PD_ADDR + i * 8, (i << 21) | 0x83)?;
    }
    let code = Segment::flat(0x08, 0xb, true);
    let data = Segment::flat(0x10, 0x3, false);
    let tr = Segment {
        selector: 0,
        base: 0,
        limit: 0x67,
        type_: 0xb,
        present: true,
        s: false,
        ..Default::default()
    };
    let ldt = Segment {
        type_: 2,
        present: true,
        unusable: true,
        ..Default::default()
    };
    let sregs = Sregs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr,
        ldt,
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: 23,
        },
        idt: DescriptorTable { base: 0, limit: 0 },
        cr0: cr0::PE | cr0::ET | cr0::NE | cr0::PG,
        cr3: PML4_ADDR,
        cr4: cr4::PAE,
        efer: efer::LME | efer::LMA,
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    Ok(VcpuState {
        regs: Regs {
            rip,
            rsp: STACK_TOP,
            rflags: 2,
            ..Default::default()
        },
        sregs,
        ..Default::default()
    })
}

/// `mov rcx, <count already in rcx>; 1: out 0x80, al; dec rcx; jnz 1b;
/// mov eax, 0; out 0xf4, eax` — `count` OUT exits, then a debug exit.
pub fn out_loop_code() -> Vec<u8> {
    vec![
        0xe6, 0x80, // out 0x80, al
        0x48, 0xff, 0xc9, // dec rcx
        0x75, 0xf9, // jnz -7
        0x31, 0xc0, // xor eax, eax
        0xe7, 0xf4, // out 0xf4, eax
        0xf4, // hlt
    ]
}
