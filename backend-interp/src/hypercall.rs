//! VMCALL: KVM's hypercall ABI (Linux Documentation/virt/kvm/x86/
//! hypercalls.rst), which guests written for KVM use whatever the
//! processor under them: the number in RAX, arguments in RBX, RCX, RDX,
//! RSI, the result in RAX (truncated to 32 bits outside 64-bit mode);
//! -KVM_EPERM above CPL 0, -KVM_ENOSYS for a hypercall not implemented.
//!
//! KVM_HC_SEND_IPI is implemented the way a guest's own ICR writes would
//! do it, so it goes through the machine's LAPIC like any IPI: each
//! destination becomes a WRMSR to the x2APIC ICR, or in xAPIC mode a write
//! of ICR high then ICR low in the APIC page, each an exit the machine
//! completes (the instruction re-executes from its log, as WRMSR does).

use crate::{ExtKind, InterpVcpu, Stop};
use tandem_core::cpu::msr;

type R<T> = Result<T, Stop>;

const KVM_HC_SEND_IPI: u64 = 10;
const KVM_ENOSYS: i64 = -1000;
const KVM_EPERM: i64 = -1;

/// x2APIC ICR (MSR 0x830); xAPIC ICR low / high offsets in the APIC page.
const X2APIC_ICR: u64 = 0x830;
const XAPIC_ICR_LOW: u64 = 0x300;
const XAPIC_ICR_HIGH: u64 = 0x310;
/// The ICR bits a PV IPI keeps from its argument: vector, delivery mode,
/// level, trigger mode (physical destination, no shorthand).
const PV_ICR_BITS: u64 = 0xc7ff;

impl InterpVcpu {
    pub(crate) fn vmcall(&mut self) -> R<()> {
        let long = self.bitness == 64;
        let arg = |v: u64| if long { v } else { v & 0xffff_ffff };
        let nr = arg(self.gpr[0]);
        let ret: i64 = if self.cpl() != 0 {
            KVM_EPERM
        } else if nr == KVM_HC_SEND_IPI {
            let (low, high, min, icr) = (
                arg(self.gpr[3]),
                arg(self.gpr[1]),
                arg(self.gpr[2]),
                arg(self.gpr[6]),
            );
            self.pv_send_ipi(low, high, min, icr, if long { 64 } else { 32 })? as i64
        } else {
            KVM_ENOSYS
        };
        self.gpr[0] = if long {
            ret as u64
        } else {
            u64::from(ret as u32)
        };
        Ok(())
    }

    /// The logical processors CPUID announces (leaf 0xB level 1, else leaf
    /// 1 EBX[23:16]); Tandem numbers their APIC IDs from 0.
    fn logical_processors(&self) -> u64 {
        let max_basic = self.cpuid.raw(0, 0)[0];
        let n = if max_basic >= 0xb {
            self.cpuid.raw(0xb, 1)[1] & 0xffff
        } else {
            (self.cpuid.raw(1, 0)[1] >> 16) & 0xff
        };
        u64::from(n.max(1))
    }

    /// KVM_HC_SEND_IPI: bit i of `low` is APIC ID `min + i`, bit i of
    /// `high` APIC ID `min + bits + i`. Returns the IPIs sent (APIC IDs
    /// with no processor are skipped, as KVM skips them).
    fn pv_send_ipi(&mut self, low: u64, high: u64, min: u64, icr: u64, bits: u64) -> R<u64> {
        let (base, ok) = self.external(ExtKind::RdMsr, u64::from(msr::IA32_APIC_BASE), 8, 0)?;
        if !ok || base & (1 << 11) == 0 {
            return Ok(0);
        }
        let x2apic = base & (1 << 10) != 0;
        let page = base & !0xfff & ((1 << 52) - 1);
        let icr = icr & PV_ICR_BITS;
        let present = self.logical_processors();
        let mut sent = 0;
        for (word, first) in [(low, Some(min)), (high, min.checked_add(bits))] {
            let Some(first) = first else { continue };
            for i in 0..bits {
                if (word >> i) & 1 == 0 {
                    continue;
                }
                let Some(id) = first.checked_add(i).filter(|&id| id < present) else {
                    continue;
                };
                if x2apic {
                    self.external(ExtKind::WrMsr, X2APIC_ICR, 8, (id << 32) | icr)?;
                } else if id <= 0xff {
                    self.external(ExtKind::MmioWrite, page + XAPIC_ICR_HIGH, 4, id << 24)?;
                    self.external(ExtKind::MmioWrite, page + XAPIC_ICR_LOW, 4, icr)?;
                } else {
                    continue;
                }
                sent += 1;
            }
        }
        Ok(sent)
    }
}
