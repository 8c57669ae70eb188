//! Architectural CPU state, shaped so that it maps one to one onto KVM's
//! structures (kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xsave) and onto the
//! interpreter's own state. Moving a vCPU between processors goes through
//! these types.

use std::fmt;

/// RFLAGS bits the event logic looks at.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const ZF: u64 = 1 << 6;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const IOPL: u64 = 3 << 12;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
}

/// CR0 bits.
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const PGE: u64 = 1 << 7;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const OSXSAVE: u64 = 1 << 18;
}

/// EFER bits.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
}

/// General-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B: default operand size 32 bits.
    pub db: bool,
    /// S: code or data (not a system segment).
    pub s: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// G: limit in 4 KiB units (the `limit` here is already scaled).
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// A flat 4 GiB segment of the given type (11 = code execute/read accessed,
    /// 3 = data read/write accessed), as a loader sets up.
    pub fn flat(selector: u16, type_: u8, code64: bool) -> Segment {
        Segment {
            selector,
            base: 0,
            limit: 0xffff_ffff,
            type_,
            present: true,
            dpl: 0,
            db: !code64,
            s: true,
            l: code64,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    /// A real-mode segment for `selector` (base = selector * 16, 64 KiB limit).
    pub fn real_mode(selector: u16, code: bool) -> Segment {
        Segment {
            selector,
            base: u64::from(selector) << 4,
            limit: 0xffff,
            type_: if code { 0xb } else { 0x3 },
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: false,
            g: false,
            avl: false,
            unusable: false,
        }
    }
}

/// GDTR or IDTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table and control registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

impl Sregs {
    /// The processor is in long mode (EFER.LMA).
    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }
    /// Current privilege level, from CS (SS.DPL in real mode is 0 too).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr0::PE == 0 {
            0
        } else {
            self.cs.dpl
        }
    }
    /// Human name of the operating mode.
    pub fn mode_name(&self) -> &'static str {
        if self.cr0 & cr0::PE == 0 {
            "real mode"
        } else if self.long_mode() {
            if self.cs.l {
                "64-bit mode"
            } else {
                "compatibility mode"
            }
        } else if self.cs.db {
            "32-bit protected mode"
        } else {
            "16-bit protected mode"
        }
    }
}

/// Debug registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
}

/// The x87 / SSE / AVX state as a standard-format XSAVE area (the legacy
/// 512-byte FXSAVE region, the XSAVE header, then the extended components),
/// plus XCR0. This is the layout of kvm_xsave, so it moves between
/// processors unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct FpuState {
    pub xsave: Vec<u8>,
    pub xcr0: u64,
}

impl Default for FpuState {
    /// The state after reset / FNINIT: FCW 0x37F, MXCSR 0x1F80, x87 only.
    fn default() -> Self {
        let mut xsave = vec![0u8; 4096];
        xsave[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        xsave[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
        FpuState { xsave, xcr0: 1 }
    }
}

impl fmt::Debug for FpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FpuState")
            .field("fcw", &u16::from_le_bytes([self.xsave[0], self.xsave[1]]))
            .field(
                "mxcsr",
                &u32::from_le_bytes([
                    self.xsave[24],
                    self.xsave[25],
                    self.xsave[26],
                    self.xsave[27],
                ]),
            )
            .field("xcr0", &self.xcr0)
            .finish()
    }
}

/// One model-specific register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

/// MSR indices the machine and the state transfer care about.
pub mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_APIC_BASE: u32 = 0x1b;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_PAT: u32 = 0x277;
    pub const IA32_TSC_DEADLINE: u32 = 0x6e0;
    pub const X2APIC_FIRST: u32 = 0x800;
    pub const X2APIC_LAST: u32 = 0x8ff;
    pub const IA32_EFER: u32 = 0xc000_0080;
    pub const IA32_STAR: u32 = 0xc000_0081;
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    pub const IA32_FMASK: u32 = 0xc000_0084;
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const IA32_TSC_AUX: u32 = 0xc000_0103;

    /// The MSRs carried when a vCPU moves between processors.
    pub const TRANSFERRED: &[u32] = &[
        IA32_TSC,
        IA32_SYSENTER_CS,
        IA32_SYSENTER_ESP,
        IA32_SYSENTER_EIP,
        IA32_PAT,
        IA32_STAR,
        IA32_LSTAR,
        IA32_CSTAR,
        IA32_FMASK,
        IA32_KERNEL_GS_BASE,
        IA32_TSC_AUX,
    ];
}

/// The kind of an event delivered through the IDT, in VMX's terms
/// (SDM vol. 3, 25.8.3 "VM-Entry Controls for Event Injection").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// External interrupt (from the PIC or the LAPIC).
    External,
    /// Non-maskable interrupt (vector 2).
    Nmi,
    /// Hardware exception (#DE, #PF, ...), possibly with an error code.
    HardwareException,
    /// INT n.
    SoftwareInterrupt,
    /// INT1 (ICEBP).
    PrivilegedSoftwareException,
    /// INT3, INTO.
    SoftwareException,
}

/// An event to deliver at VM entry, or one whose delivery an exit cut short
/// (IDT-vectoring information).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub vector: u8,
    pub error_code: Option<u32>,
    /// Length of the instruction for software interrupts / exceptions, so
    /// the return address points past it.
    pub instruction_len: u8,
}

impl Event {
    pub fn external(vector: u8) -> Event {
        Event {
            kind: EventKind::External,
            vector,
            error_code: None,
            instruction_len: 0,
        }
    }
    pub fn nmi() -> Event {
        Event {
            kind: EventKind::Nmi,
            vector: 2,
            error_code: None,
            instruction_len: 0,
        }
    }
    pub fn exception(vector: u8, error_code: Option<u32>) -> Event {
        Event {
            kind: EventKind::HardwareException,
            vector,
            error_code,
            instruction_len: 0,
        }
    }
}

/// Blocking state at an instruction boundary (SDM vol. 3, 25.4.2
/// "Guest Non-Register State", interruptibility state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Interruptibility {
    /// Blocking by STI: the instruction after STI runs before any interrupt.
    pub sti: bool,
    /// Blocking by MOV SS / POP SS: also holds off NMIs and debug traps.
    pub mov_ss: bool,
    /// NMI blocking: an NMI was delivered and no IRET has run since.
    pub nmi: bool,
}

impl Interruptibility {
    /// Either interrupt shadow.
    pub fn shadow(&self) -> bool {
        self.sti || self.mov_ss
    }
}

/// Pending and injected events, shaped like kvm_vcpu_events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuEvents {
    /// An exception being delivered (injected) or raised and not yet
    /// delivered (pending).
    pub exception: Option<PendingException>,
    /// An external or software interrupt being delivered.
    pub interrupt: Option<InjectedInterrupt>,
    /// An NMI being delivered.
    pub nmi_injected: bool,
    /// An NMI raised and not yet delivered.
    pub nmi_pending: bool,
    /// SMI raised and not yet delivered.
    pub smi_pending: bool,
    /// The processor is in SMM.
    pub smm: bool,
    /// STI / MOV SS shadows and NMI blocking.
    pub interruptibility: Interruptibility,
    /// The vector of a SIPI waiting to start an application processor.
    pub sipi_vector: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingException {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// True: delivery has started (reinject it); false: raised, not yet.
    pub injected: bool,
    /// CR2 or DR6 payload for #PF / #DB that has not been written yet.
    pub payload: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedInterrupt {
    pub vector: u8,
    /// INT n rather than an external interrupt.
    pub soft: bool,
}

/// Activity state of a vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MpState {
    #[default]
    Runnable,
    /// Halted until an interrupt or NMI.
    Halted,
    /// Waiting for SIPI (an application processor after INIT).
    WaitForSipi,
}

/// Everything that defines a vCPU at an instruction boundary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuState {
    pub regs: Regs,
    pub sregs: Sregs,
    pub debug: DebugRegs,
    pub fpu: FpuState,
    pub msrs: Vec<Msr>,
    pub events: VcpuEvents,
    pub mp_state: MpState,
}

impl VcpuState {
    /// The processor state after INIT (SDM vol. 3, table 9-1): real mode
    /// at F000:FFF0 with CS.base FFFF0000, segments with limit FFFF, CR0
    /// 60000010, EFER 0, DR6 / DR7 at their reset values, x87 / SSE state
    /// reset, RDX the processor signature `signature`. `apic_base` is the
    /// IA32_APIC_BASE the LAPIC keeps across INIT. An application processor
    /// starts in wait-for-SIPI (`mp_state`).
    pub fn after_init(bsp: bool, apic_base: u64, signature: u32) -> VcpuState {
        let data = |sel: u16| Segment::real_mode(sel, false);
        let mut cs = Segment::real_mode(0xf000, true);
        cs.base = 0xffff_0000;
        let mut ldt = data(0);
        ldt.type_ = 2;
        ldt.s = false;
        let mut tr = data(0);
        tr.type_ = 3;
        tr.s = false;
        VcpuState {
            regs: Regs {
                rip: 0xfff0,
                rflags: rflags::FIXED1,
                rdx: u64::from(signature),
                ..Default::default()
            },
            sregs: Sregs {
                cs,
                ds: data(0),
                es: data(0),
                fs: data(0),
                gs: data(0),
                ss: data(0),
                tr,
                ldt,
                gdt: DescriptorTable {
                    base: 0,
                    limit: 0xffff,
                },
                idt: DescriptorTable {
                    base: 0,
                    limit: 0xffff,
                },
                cr0: 0x6000_0010,
                apic_base,
                ..Default::default()
            },
            debug: DebugRegs {
                dr6: 0xffff_0ff0,
                dr7: 0x400,
                ..Default::default()
            },
            fpu: FpuState::default(),
            msrs: Vec::new(),
            events: VcpuEvents::default(),
            mp_state: if bsp {
                MpState::Runnable
            } else {
                MpState::WaitForSipi
            },
        }
    }

    /// A start-up IPI with vector `vector` on a processor in wait-for-SIPI:
    /// it starts in real mode at `vector << 12` (CS = vector << 8, IP = 0;
    /// SDM vol. 3, 9.4.4).
    pub fn start_at_sipi(&mut self, vector: u8) {
        self.sregs.cs = Segment::real_mode(u16::from(vector) << 8, true);
        self.regs.rip = 0;
        self.mp_state = MpState::Runnable;
    }
}

impl fmt::Display for Regs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            self.rax, self.rbx, self.rcx, self.rdx
        )?;
        writeln!(
            f,
            "RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}",
            self.rsi, self.rdi, self.rbp, self.rsp
        )?;
        writeln!(
            f,
            "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
            self.r8, self.r9, self.r10, self.r11
        )?;
        writeln!(
            f,
            "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
            self.r12, self.r13, self.r14, self.r15
        )?;
        write!(f, "RIP={:016x} RFL={:08x}", self.rip, self.rflags)
    }
}

impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x} base={:016x} limit={:08x} type={:x} dpl={} p={} db={} l={} g={}",
            self.selector,
            self.base,
            self.limit,
            self.type_,
            self.dpl,
            u8::from(self.present),
            u8::from(self.db),
            u8::from(self.l),
            u8::from(self.g)
        )
    }
}

impl fmt::Display for Sregs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, s) in [
            ("ES", &self.es),
            ("CS", &self.cs),
            ("SS", &self.ss),
            ("DS", &self.ds),
            ("FS", &self.fs),
            ("GS", &self.gs),
            ("LDT", &self.ldt),
            ("TR", &self.tr),
        ] {
            writeln!(f, "{n:<3}={s}")?;
        }
        writeln!(f, "GDT={:016x} {:04x}", self.gdt.base, self.gdt.limit)?;
        writeln!(f, "IDT={:016x} {:04x}", self.idt.base, self.idt.limit)?;
        write!(
            f,
            "CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:x}",
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_names() {
        let mut s = Sregs::default();
        assert_eq!(s.mode_name(), "real mode");
        s.cr0 = cr0::PE;
        s.cs = Segment::flat(8, 0xb, false);
        assert_eq!(s.mode_name(), "32-bit protected mode");
        s.efer = efer::LME | efer::LMA;
        s.cs = Segment::flat(8, 0xb, true);
        assert_eq!(s.mode_name(), "64-bit mode");
        s.cs.dpl = 3;
        assert_eq!(s.cpl(), 3);
    }

    #[test]
    fn init_and_sipi_states() {
        let mut s = VcpuState::after_init(false, 0xfee0_0800, 0x600);
        assert_eq!(s.mp_state, MpState::WaitForSipi);
        assert_eq!(s.sregs.cs.base + s.regs.rip, 0xffff_fff0);
        assert_eq!(s.sregs.cr0, 0x6000_0010);
        assert_eq!(s.regs.rdx, 0x600);
        s.start_at_sipi(0x9a);
        assert_eq!(s.sregs.cs.selector, 0x9a00);
        assert_eq!(s.sregs.cs.base, 0x9_a000);
        assert_eq!(s.regs.rip, 0);
        assert_eq!(s.mp_state, MpState::Runnable);
        assert_eq!(
            VcpuState::after_init(true, 0xfee0_0900, 0x600).mp_state,
            MpState::Runnable
        );
    }

    #[test]
    fn reset_fpu_state() {
        let f = FpuState::default();
        assert_eq!(&f.xsave[0..2], &[0x7f, 0x03]);
        assert_eq!(f.xcr0, 1);
    }
}
