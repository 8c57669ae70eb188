//! The CPUID Tandem offers a guest on KVM: what the host's KVM supports,
//! filtered to the `pc` platform Tandem emulates (its own LAPIC with x2APIC
//! and TSC deadline, no KVM paravirtual interface, no nested VMX, no PMU).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_APIC: u32 = 1 << 9;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_SVM: u32 = 1 << 2;

/// Filters KVM_GET_SUPPORTED_CPUID to Tandem's platform with `vcpus` CPUs.
pub(crate) fn platform_cpuid(supported: &CpuId, vcpus: u32) -> CpuId {
    let mut out: Vec<kvm_cpuid_entry2> = Vec::new();
    for e in supported.as_slice() {
        let mut e = *e;
        match e.function {
            // KVM's paravirtual leaves describe kvmclock, PV EOI and friends,
            // which need KVM's in-kernel LAPIC and have no interpreter twin.
            0x4000_0000..=0x4fff_ffff => continue,
            1 => {
                e.ecx &= !(LEAF1_ECX_VMX | LEAF1_ECX_SMX);
                // Tandem's LAPIC implements x2APIC and the TSC-deadline timer.
                e.ecx |= LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE;
                e.edx |= LEAF1_EDX_APIC;
                if vcpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
                e.ebx = (e.ebx & 0x0000_ffff) | ((vcpus.min(255)) << 16);
            }
            // No architectural PMU is emulated.
            0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x8000_0001 => e.ecx &= !EXT1_ECX_SVM,
            _ => {}
        }
        out.push(e);
    }
    CpuId::from_entries(&out).unwrap_or_else(|_| supported.clone())
}

/// The per-vCPU view: initial APIC ID in leaf 1 and the x2APIC ID in leaves
/// 0xB and 0x1F.
pub(crate) fn for_vcpu(base: &CpuId, id: u32) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((id & 0xff) << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    c
}
