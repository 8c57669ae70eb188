//! Random instruction sequences for `tandem fuzz`, and the small machine
//! they run in.
//!
//! An instruction is drawn by decoding random bytes with iced-x86 and
//! keeping it only if it is on the list of instructions the fuzzer
//! compares ([`ALLOWED`]): no branch, no fault the sandbox cannot rule
//! out (no DIV, no privileged instruction, no segment load but the MOV SS
//! shadow pair), general registers only. Its memory operand is rewritten to
//! `[BX/EBX/RBX + disp]` inside the sandbox and the instruction re-encoded
//! with iced-x86's encoder; RBX (the sandbox base) and RSP are never
//! operands.
//!
//! Memory (identity-mapped, the same in every mode):
//! IVT 0x0, page tables 0x1000-0x3fff, GDT 0x4000, TSS 0x4800, IDT 0x5000,
//! handlers 0x6000, code [`CODE`], sandbox [`SANDBOX`] (4 KiB, random
//! contents), the stack below [`STACK_TOP`], the ring-0 stack of ring-3
//! cases below [`STACK0_TOP`].

use tandem_core::cpu::{cr0, DescriptorTable, Regs, Segment, Sregs, VcpuState};
use tandem_decoder::iced_x86::{
    Decoder, DecoderOptions, Encoder, FlowControl, Instruction, Mnemonic, OpKind, Register,
};

pub const CODE: u64 = 0x10000;
pub const SANDBOX: u64 = 0x20000;
pub const SANDBOX_LEN: u64 = 0x1000;
pub const STACK_TOP: u64 = 0x22000;
pub const STACK0_TOP: u64 = 0x24000;
const GDT: u64 = 0x4000;
const TSS: u64 = 0x4800;
const IDT: u64 = 0x5000;
const HANDLER_TIMER: u64 = 0x6000;
const HANDLER_OTHER: u64 = 0x6100;
/// The PIC's vector base for IRQ 0 (the PIT).
pub const TIMER_VECTOR: u8 = 0x20;

/// The processor mode of a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    Real16,
    Prot32,
    Long64Ring0,
    Long64Ring3,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Real16,
        Mode::Prot32,
        Mode::Long64Ring0,
        Mode::Long64Ring3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Real16 => "real16",
            Mode::Prot32 => "prot32",
            Mode::Long64Ring0 => "long64-ring0",
            Mode::Long64Ring3 => "long64-ring3",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    pub fn bits(self) -> u32 {
        match self {
            Mode::Real16 => 16,
            Mode::Prot32 => 32,
            _ => 64,
        }
    }

    fn ring3(self) -> bool {
        self == Mode::Long64Ring3
    }
}

/// xorshift64*: the fuzzer's only source of randomness.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// SplitMix64's finalizer: case seeds from the campaign seed and index.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Mnemonics the fuzzer generates (with the operand checks of `accept`).
pub const ALLOWED: &[Mnemonic] = &[
    Mnemonic::Add,
    Mnemonic::Or,
    Mnemonic::Adc,
    Mnemonic::Sbb,
    Mnemonic::And,
    Mnemonic::Sub,
    Mnemonic::Xor,
    Mnemonic::Cmp,
    Mnemonic::Inc,
    Mnemonic::Dec,
    Mnemonic::Neg,
    Mnemonic::Not,
    Mnemonic::Test,
    Mnemonic::Mul,
    Mnemonic::Imul,
    Mnemonic::Shl,
    Mnemonic::Shr,
    Mnemonic::Sar,
    Mnemonic::Sal,
    Mnemonic::Rol,
    Mnemonic::Ror,
    Mnemonic::Rcl,
    Mnemonic::Rcr,
    Mnemonic::Shld,
    Mnemonic::Shrd,
    Mnemonic::Bt,
    Mnemonic::Bts,
    Mnemonic::Btr,
    Mnemonic::Btc,
    Mnemonic::Bsf,
    Mnemonic::Bsr,
    Mnemonic::Bswap,
    Mnemonic::Mov,
    Mnemonic::Movzx,
    Mnemonic::Movsx,
    Mnemonic::Movsxd,
    Mnemonic::Lea,
    Mnemonic::Xchg,
    Mnemonic::Xadd,
    Mnemonic::Cmpxchg,
    Mnemonic::Cmovo,
    Mnemonic::Cmovno,
    Mnemonic::Cmovb,
    Mnemonic::Cmovae,
    Mnemonic::Cmove,
    Mnemonic::Cmovne,
    Mnemonic::Cmovbe,
    Mnemonic::Cmova,
    Mnemonic::Cmovs,
    Mnemonic::Cmovns,
    Mnemonic::Cmovp,
    Mnemonic::Cmovnp,
    Mnemonic::Cmovl,
    Mnemonic::Cmovge,
    Mnemonic::Cmovle,
    Mnemonic::Cmovg,
    Mnemonic::Seto,
    Mnemonic::Setno,
    Mnemonic::Setb,
    Mnemonic::Setae,
    Mnemonic::Sete,
    Mnemonic::Setne,
    Mnemonic::Setbe,
    Mnemonic::Seta,
    Mnemonic::Sets,
    Mnemonic::Setns,
    Mnemonic::Setp,
    Mnemonic::Setnp,
    Mnemonic::Setl,
    Mnemonic::Setge,
    Mnemonic::Setle,
    Mnemonic::Setg,
    Mnemonic::Cbw,
    Mnemonic::Cwde,
    Mnemonic::Cdqe,
    Mnemonic::Cwd,
    Mnemonic::Cdq,
    Mnemonic::Cqo,
    Mnemonic::Lahf,
    Mnemonic::Sahf,
    Mnemonic::Clc,
    Mnemonic::Stc,
    Mnemonic::Cmc,
    Mnemonic::Push,
    Mnemonic::Pop,
    Mnemonic::Nop,
    Mnemonic::Xlatb,
    Mnemonic::Aaa,
    Mnemonic::Aas,
    Mnemonic::Daa,
    Mnemonic::Das,
    Mnemonic::Aad,
];

/// Whether a decoded instruction can go into a case; its memory operand
/// still to be rewritten.
fn accept(i: &Instruction, mode: Mode) -> bool {
    if i.is_invalid() || i.flow_control() != FlowControl::Next || i.has_lock_prefix() {
        return false;
    }
    let m = i.mnemonic();
    if !ALLOWED.contains(&m) {
        return false;
    }
    if i.has_rep_prefix() || i.has_repne_prefix() {
        return false;
    }
    let mut has_mem = false;
    for k in 0..i.op_count() {
        match i.op_kind(k) {
            OpKind::Register => {
                let r = i.op_register(k);
                if !r.is_gpr() {
                    return false;
                }
                let f = r.full_register();
                if f == Register::RSP || f == Register::RBX || r == Register::BH {
                    return false;
                }
            }
            OpKind::Memory => has_mem = true,
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
            | OpKind::Immediate8_2nd => {}
            _ => return false,
        }
    }
    // BT* with a register bit offset address memory anywhere.
    if has_mem
        && matches!(
            m,
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        )
        && i.op1_kind() == OpKind::Register
    {
        return false;
    }
    // PUSH / POP of the stack pointer or through it.
    if matches!(m, Mnemonic::Push | Mnemonic::Pop) && has_mem && i.memory_base() == Register::None {
        return false;
    }
    // XLATB reads [BX + AL]: fine in the sandbox (it is rewritten with it).
    let _ = mode;
    true
}

/// Rewrites the memory operand of `i` to `[base + disp]` in the sandbox.
fn rewrite_memory(i: &mut Instruction, mode: Mode, disp: u64) {
    for k in 0..i.op_count() {
        if i.op_kind(k) != OpKind::Memory {
            continue;
        }
        let base = match mode.bits() {
            16 => Register::BX,
            32 => Register::EBX,
            _ => Register::RBX,
        };
        i.set_memory_base(base);
        i.set_memory_index(Register::None);
        i.set_memory_index_scale(1);
        i.set_memory_displacement64(disp);
        i.set_memory_displ_size(if disp < 0x80 {
            1
        } else if mode.bits() == 16 {
            2
        } else {
            4
        });
        i.set_segment_prefix(Register::None);
    }
}

/// One random instruction for `mode`, encoded; `None`: this draw was
/// rejected (draw again).
fn draw(rng: &mut Rng, mode: Mode, ring0: bool) -> Option<Vec<u8>> {
    // Special forms the random bytes rarely give: the STI shadow and the
    // MOV SS shadow with the timer running.
    match rng.below(40) {
        0 if ring0 => return Some(vec![0xfb]), // sti
        1 if ring0 && rng.below(4) == 0 => return Some(vec![0xfa]), // cli
        2 if mode.bits() != 64 => return Some(vec![0x16, 0x17]), // push ss; pop ss
        _ => {}
    }
    let bits = mode.bits();
    let mut b = [0u8; 15];
    for x in b.iter_mut() {
        *x = rng.next() as u8;
    }
    let mut k = 0;
    if rng.below(4) == 0 {
        b[k] = 0x66;
        k += 1;
    }
    if bits == 64 && rng.below(2) == 0 {
        b[k] = 0x40 | (rng.below(16) as u8);
        k += 1;
    }
    if rng.below(3) == 0 {
        b[k] = 0x0f;
    }
    let mut d = Decoder::with_ip(bits, &b, CODE, DecoderOptions::NONE);
    let mut i = d.decode();
    if !accept(&i, mode) {
        return None;
    }
    let disp = rng.below(SANDBOX_LEN - 64);
    rewrite_memory(&mut i, mode, disp);
    let mut enc = Encoder::new(bits);
    enc.encode(&i, CODE).ok()?;
    let bytes = enc.take_buffer();
    // The re-encoded instruction must decode to what was meant.
    let mut d = Decoder::with_ip(bits, &bytes, CODE, DecoderOptions::NONE);
    let j = d.decode();
    if j.mnemonic() != i.mnemonic() || j.len() != bytes.len() || !accept(&j, mode) {
        return None;
    }
    Some(bytes)
}

/// A fuzz case: everything needed to run it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub mode: Mode,
    /// The case's own seed (registers, sandbox contents).
    pub seed: u64,
    /// PIT channel 0 reload value; 0: no timer.
    pub timer: u16,
    /// The instructions, encoded.
    pub insns: Vec<Vec<u8>>,
}

impl Case {
    /// A random case of `len` instructions.
    pub fn generate(mode: Mode, seed: u64, len: usize) -> Case {
        let mut rng = Rng::new(seed);
        let timer = if rng.below(8) == 0 {
            0
        } else {
            4 + rng.below(40) as u16
        };
        let ring0 = !mode.ring3();
        let mut insns = Vec::with_capacity(len);
        while insns.len() < len {
            if let Some(b) = draw(&mut rng, mode, ring0) {
                insns.push(b);
            }
        }
        Case {
            mode,
            seed,
            timer,
            insns,
        }
    }

    pub fn code(&self) -> Vec<u8> {
        let mut c: Vec<u8> = self.insns.concat();
        // The stop address: HLT (a #GP into the catch-all handler at ring
        // 3), then jmp $.
        c.extend_from_slice(&[0xf4, 0xeb, 0xfe]);
        c
    }

    /// Linear address of the end of the sequence.
    pub fn end_la(&self) -> u64 {
        CODE + self.insns.iter().map(|i| i.len() as u64).sum::<u64>()
    }

    /// The replay file (see README, "tandem fuzz").
    pub fn to_text(&self, note: &str) -> String {
        let mut s = String::from("# tandem fuzz case; replay with `tandem diff --replay FILE`\n");
        for l in note.lines() {
            s.push_str(&format!("# {l}\n"));
        }
        s.push_str(&format!("mode {}\n", self.mode.name()));
        s.push_str(&format!("seed {:#x}\n", self.seed));
        s.push_str(&format!("timer {}\n", self.timer));
        for i in &self.insns {
            let hex: Vec<String> = i.iter().map(|b| format!("{b:02x}")).collect();
            let mut d = Decoder::with_ip(self.mode.bits(), i, CODE, DecoderOptions::NONE);
            let insn = d.decode();
            s.push_str(&format!("insn {:<30} # {insn}\n", hex.join(" ")));
        }
        s
    }

    pub fn parse(text: &str) -> Result<Case, String> {
        let mut mode = None;
        let mut seed = None;
        let mut timer = 0u16;
        let mut insns = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            let rest = rest.trim();
            let bad = |what: &str| format!("line {}: {what}: {line}", n + 1);
            match key {
                "mode" => mode = Some(Mode::parse(rest).ok_or_else(|| bad("unknown mode"))?),
                "seed" => {
                    let v = rest.strip_prefix("0x").map_or_else(
                        || rest.parse::<u64>().ok(),
                        |h| u64::from_str_radix(h, 16).ok(),
                    );
                    seed = Some(v.ok_or_else(|| bad("bad seed"))?);
                }
                "timer" => timer = rest.parse().map_err(|_| bad("bad timer"))?,
                "insn" => {
                    let bytes: Result<Vec<u8>, _> = rest
                        .split_whitespace()
                        .map(|h| u8::from_str_radix(h, 16))
                        .collect();
                    let bytes = bytes.map_err(|_| bad("bad instruction bytes"))?;
                    if bytes.is_empty() || bytes.len() > 15 {
                        return Err(bad("an instruction is 1 to 15 bytes"));
                    }
                    insns.push(bytes);
                }
                _ => return Err(bad("unknown key")),
            }
        }
        Ok(Case {
            mode: mode.ok_or("no `mode` line")?,
            seed: seed.ok_or("no `seed` line")?,
            timer,
            insns,
        })
    }

    /// Initial general registers and flags.
    pub fn regs(&self) -> Regs {
        let mut rng = Rng::new(self.seed ^ 0x0005_eed0_f7e6);
        let narrow = self.mode.bits() != 64;
        let mut v = || {
            let x = match rng.below(6) {
                0 => 0,
                1 => u64::MAX,
                2 => 1 << rng.below(64),
                3 => rng.below(256),
                _ => rng.next(),
            };
            if narrow {
                x & 0xffff_ffff
            } else {
                x
            }
        };
        let mut r = Regs {
            rax: v(),
            rcx: v(),
            rdx: v(),
            rsi: v(),
            rdi: v(),
            rbp: v(),
            r8: v(),
            r9: v(),
            r10: v(),
            r11: v(),
            r12: v(),
            r13: v(),
            r14: v(),
            r15: v(),
            ..Default::default()
        };
        if narrow {
            for x in [
                &mut r.r8, &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13, &mut r.r14,
                &mut r.r15,
            ] {
                *x = 0;
            }
        }
        let flags = v() & 0x8d5; // OF SF ZF AF PF CF
        r.rflags = 0x202 | flags;
        match self.mode {
            Mode::Real16 => {
                r.rip = 0;
                r.rbx = 0;
                r.rsp = STACK_TOP - SANDBOX;
            }
            _ => {
                r.rip = CODE;
                r.rbx = SANDBOX;
                r.rsp = STACK_TOP;
            }
        }
        r
    }

    /// The sandbox's initial contents.
    pub fn sandbox(&self) -> Vec<u8> {
        let mut rng = Rng::new(self.seed ^ 0xda7a);
        (0..SANDBOX_LEN).map(|_| rng.next() as u8).collect()
    }
}

fn seg(
    selector: u16,
    base: u64,
    limit: u32,
    type_: u8,
    dpl: u8,
    code64: bool,
    db: bool,
) -> Segment {
    Segment {
        selector,
        base,
        limit,
        type_,
        present: true,
        dpl,
        db,
        s: true,
        l: code64,
        g: limit > 0xfffff,
        avl: false,
        unusable: false,
    }
}

/// Writes the tables and handlers of `mode` into `mem` (once per machine).
pub fn write_tables(mem: &tandem_core::memory::GuestMemory, mode: Mode) -> anyhow::Result<()> {
    // Page tables: identity map of the first GiB with 2 MiB pages, user
    // accessible (ring-3 cases).
    mem.write_u64(0x1000, 0x2000 | 0x7)?;
    mem.write_u64(0x2000, 0x3000 | 0x7)?;
    for k in 0..512u64 {
        mem.write_u64(0x3000 + 8 * k, (k << 21) | 0x87)?;
    }
    let gdt: [u64; 6] = [
        0,
        0x00af_9a00_0000_ffff, // 0x08 code64 DPL0
        0x00cf_9200_0000_ffff, // 0x10 data DPL0
        0x00cf_9a00_0000_ffff, // 0x18 code32 DPL0
        0x00af_fa00_0000_ffff, // 0x20 code64 DPL3 (0x23)
        0x00cf_f200_0000_ffff, // 0x28 data DPL3 (0x2b)
    ];
    for (k, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT + 8 * k as u64, *d)?;
    }
    // 0x30: the TSS (type 9, available; 16 bytes in long mode).
    let tss_desc = 0x67u64 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40);
    mem.write_u64(GDT + 0x30, tss_desc)?;
    mem.write_u64(GDT + 0x38, 0)?;
    mem.zero(TSS, 0x68)?;
    if mode == Mode::Prot32 {
        mem.write_u32(TSS + 4, STACK0_TOP as u32)?;
        mem.write_u32(TSS + 8, 0x10)?;
    } else {
        mem.write_u64(TSS + 4, STACK0_TOP)?;
    }
    // Handlers: the timer's (EOI to the PIC, IRET) and one for everything
    // else (CLI; HLT: the case ends with a halt nothing can end).
    let timer: &[u8] = match mode {
        // push rax; mov al, 0x20; out 0x20, al; pop rax; iretq
        Mode::Long64Ring0 | Mode::Long64Ring3 => &[0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0x48, 0xcf],
        _ => &[0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf],
    };
    mem.write(HANDLER_TIMER, timer)?;
    mem.write(HANDLER_OTHER, &[0xfa, 0xf4, 0xeb, 0xfd])?;
    for v in 0..256u64 {
        let h = if v == u64::from(TIMER_VECTOR) {
            HANDLER_TIMER
        } else {
            HANDLER_OTHER
        };
        match mode {
            Mode::Real16 => mem.write_u32(4 * v, h as u32)?, // 0000:h
            Mode::Prot32 => {
                let lo = (h & 0xffff) | (0x18 << 16) | (0x8e00u64 << 32) | ((h >> 16) << 48);
                mem.write_u64(IDT + 8 * v, lo)?;
            }
            _ => {
                let lo =
                    (h & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((h >> 16 & 0xffff) << 48);
                mem.write_u64(IDT + 16 * v, lo)?;
                mem.write_u64(IDT + 16 * v + 8, h >> 32)?;
            }
        }
    }
    Ok(())
}

/// The processor state a case of `mode` starts in (registers from the case).
pub fn entry_state(case: &Case) -> VcpuState {
    let mode = case.mode;
    let mut s = VcpuState::default();
    let mut sr = Sregs {
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    let tr = Segment {
        selector: 0x30,
        base: TSS,
        limit: 0x67,
        type_: 11,
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
    match mode {
        Mode::Real16 => {
            sr.cs = Segment::real_mode((CODE >> 4) as u16, true);
            let data = Segment::real_mode((SANDBOX >> 4) as u16, false);
            sr.ds = data;
            sr.es = data;
            sr.ss = data;
            sr.fs = Segment::real_mode(0, false);
            sr.gs = Segment::real_mode(0, false);
            sr.tr = Segment {
                type_: 11,
                present: true,
                limit: 0xffff,
                s: false,
                ..Default::default()
            };
            sr.ldt = ldt;
            sr.cr0 = cr0::ET;
            sr.idt = DescriptorTable {
                base: 0,
                limit: 0x3ff,
            };
            sr.gdt = DescriptorTable {
                base: GDT,
                limit: 0x3f,
            };
        }
        Mode::Prot32 => {
            sr.cs = seg(0x18, 0, 0xffff_ffff, 0xb, 0, false, true);
            let data = seg(0x10, 0, 0xffff_ffff, 0x3, 0, false, true);
            sr.ds = data;
            sr.es = data;
            sr.ss = data;
            sr.fs = data;
            sr.gs = data;
            sr.tr = tr;
            sr.ldt = ldt;
            sr.cr0 = cr0::PE | cr0::ET | 0x20;
            sr.idt = DescriptorTable {
                base: IDT,
                limit: 0x7ff,
            };
            sr.gdt = DescriptorTable {
                base: GDT,
                limit: 0x3f,
            };
        }
        Mode::Long64Ring0 | Mode::Long64Ring3 => {
            let (cs, data) = if mode == Mode::Long64Ring3 {
                (
                    seg(0x23, 0, 0xffff_ffff, 0xb, 3, true, false),
                    seg(0x2b, 0, 0xffff_ffff, 0x3, 3, false, true),
                )
            } else {
                (
                    seg(0x08, 0, 0xffff_ffff, 0xb, 0, true, false),
                    seg(0x10, 0, 0xffff_ffff, 0x3, 0, false, true),
                )
            };
            sr.cs = cs;
            sr.ds = data;
            sr.es = data;
            sr.ss = data;
            sr.fs = data;
            sr.gs = data;
            sr.tr = tr;
            sr.ldt = ldt;
            sr.cr0 = cr0::PE | cr0::ET | 0x20 | cr0::PG;
            sr.cr3 = 0x1000;
            sr.cr4 = 0x20; // PAE
            sr.efer = 0x500; // LME | LMA
            sr.idt = DescriptorTable {
                base: IDT,
                limit: 0xfff,
            };
            sr.gdt = DescriptorTable {
                base: GDT,
                limit: 0x3f,
            };
        }
    }
    s.sregs = sr;
    s.regs = case.regs();
    s.debug.dr6 = 0xffff_0ff0;
    s.debug.dr7 = 0x400;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_instructions_decode_and_stay_off_rbx_and_rsp() {
        for mode in Mode::ALL {
            let c = Case::generate(mode, 7, 200);
            assert_eq!(c.insns.len(), 200);
            for b in &c.insns {
                // One instruction, or the `push ss; pop ss` pair.
                let mut d = Decoder::with_ip(mode.bits(), b, CODE, DecoderOptions::NONE);
                let i = d.decode();
                assert!(!i.is_invalid(), "{mode:?} {b:02x?}");
                if b[..] == [0x16, 0x17] {
                    assert_eq!(i.mnemonic(), Mnemonic::Push);
                    continue;
                }
                assert_eq!(i.len(), b.len());
                for k in 0..i.op_count() {
                    if i.op_kind(k) == OpKind::Register {
                        let f = i.op_register(k).full_register();
                        assert!(f != Register::RBX && f != Register::RSP, "{i}");
                    }
                    if i.op_kind(k) == OpKind::Memory {
                        assert!(i.memory_displacement64() < SANDBOX_LEN, "{i}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_case_survives_its_text_form() {
        let c = Case::generate(Mode::Prot32, 99, 30);
        let back = Case::parse(&c.to_text("note\nline two")).unwrap();
        assert_eq!(back, c);
        assert!(Case::parse("mode nowhere\nseed 1\n").is_err());
        assert!(Case::parse("mode real16\n").is_err());
        assert!(Case::parse("mode real16\nseed 1\ninsn zz\n").is_err());
    }

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(
            Case::generate(Mode::Long64Ring3, 5, 40),
            Case::generate(Mode::Long64Ring3, 5, 40)
        );
        assert_ne!(
            Case::generate(Mode::Long64Ring3, 5, 40),
            Case::generate(Mode::Long64Ring3, 6, 40)
        );
    }
}
