//! The CPUID Tandem offers a guest on KVM: what the host's KVM supports,
//! cut down to Tandem's processor model (tandem_core::cpuid), so the guest
//! sees the processor the interpreter also implements.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use tandem_core::cpuid::{CpuidEntry, CpuidTable};

fn from_kvm(e: &kvm_cpuid_entry2) -> CpuidEntry {
    CpuidEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

fn to_kvm(e: &CpuidEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

/// KVM_GET_SUPPORTED_CPUID restricted to Tandem's model for `vcpus` CPUs.
pub(crate) fn platform_table(supported: &CpuId, vcpus: u32) -> CpuidTable {
    let host: Vec<CpuidEntry> = supported.as_slice().iter().map(from_kvm).collect();
    CpuidTable::restrict(&host, vcpus)
}

/// The table in KVM's form for vCPU `id` (its APIC ID fields filled in).
pub(crate) fn for_vcpu(table: &CpuidTable, id: u32) -> Result<CpuId, String> {
    let entries: Vec<kvm_cpuid_entry2> = table.for_vcpu(id).entries.iter().map(to_kvm).collect();
    CpuId::from_entries(&entries).map_err(|e| format!("{e:?}"))
}
