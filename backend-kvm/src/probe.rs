//! What CPUID a guest really sees on this host.
//!
//! On VMX and SVM hosts KVM answers CPUID from the table KVM_SET_CPUID2
//! gave it, so the guest sees Tandem's table. PVM (kvm_pvm) answers leaves
//! 1, 7, 0xD and leaves beyond the maxima from the hardware and ignores
//! the table there (measured; DEVELOPERS.md). A table the interpreter
//! takes from KVM to be "the same processor" must then be the one the
//! guest sees, not the one Tandem asked for: this module runs CPUID in a
//! scratch VM in 64-bit ring 0 (the mode Tandem's guests run in) for every
//! leaf the guest could ask about and returns the answers.

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit};
use tandem_core::cpuid::{self, CpuidEntry, CpuidTable};
use tandem_core::memory::GuestMemory;

use crate::{ioctl_err, KvmError};

/// Guest-physical layout of the scratch VM.
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const CODE: u64 = 0x8000;
/// The port the probe's OUT uses to hand back each answer.
const PROBE_PORT: u16 = 0x80;

/// `cpuid; out 0x80, al; jmp $-4`: each KVM_RUN answers the leaf in
/// EAX/ECX and stops at the OUT.
const PROBE_CODE: [u8; 6] = [0x0f, 0xa2, 0xe6, PROBE_PORT as u8, 0xeb, 0xfa];

fn flat(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The leaves a guest can tell apart: every basic leaf up to the maximum
/// (subleaves 0..3 of the indexed ones), every extended leaf up to its
/// maximum, and the first leaf beyond the basic maximum.
fn leaves(max_basic: u32, max_ext: u32) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for l in 0..=max_basic.min(0x20) {
        let subs = if cpuid::indexed(l) { 4 } else { 1 };
        out.extend((0..subs).map(|s| (l, s)));
    }
    out.push((max_basic.min(0x20) + 1, 0));
    for l in 0x8000_0000..=max_ext.clamp(0x8000_0000, 0x8000_0020) {
        out.push((l, 0));
    }
    out
}

/// Runs CPUID for the leaves `table` describes in a one-vCPU scratch VM
/// whose CPUID is `table`, and returns what the guest saw, as a table with
/// the same run-time conventions as `table` (APIC ID 0, CR4.OSXSAVE clear,
/// XCR0 = x87). Leaves beyond the basic maximum that the host answers
/// differently from Intel's highest-basic-leaf rule are recorded in
/// `beyond_max`.
pub(crate) fn guest_visible_cpuid(kvm: &Kvm, table: &CpuidTable) -> Result<CpuidTable, KvmError> {
    let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
    let mem =
        GuestMemory::new(2 << 20).map_err(|e| KvmError::Probe(format!("scratch memory: {e}")))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.host_base() as u64,
    };
    // SAFETY: the region is exactly `mem`'s anonymous mapping, and the VM
    // is dropped (explicitly, below) before `mem` unmaps it; if this call
    // fails nothing was mapped.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
    let result = probe_in(&vm, &mem, table);
    drop(vm);
    drop(mem);
    result
}

fn probe_in(
    vm: &kvm_ioctls::VmFd,
    mem: &GuestMemory,
    table: &CpuidTable,
) -> Result<CpuidTable, KvmError> {
    let w = |gpa: u64, v: u64| {
        mem.write_u64(gpa, v)
            .map_err(|e| KvmError::Probe(format!("scratch memory: {e}")))
    };
    // Identity map of the first 2 MiB with one large page.
    w(PML4, PDPT | 3)?;
    w(PDPT, PD | 3)?;
    w(PD, 0x83)?;
    mem.write(CODE, &PROBE_CODE)
        .map_err(|e| KvmError::Probe(format!("scratch memory: {e}")))?;

    let mut vcpu = vm.create_vcpu(0).map_err(ioctl_err("KVM_CREATE_VCPU"))?;
    let cpuid = crate::cpuid::for_vcpu(table, 0).map_err(KvmError::Cpuid)?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(ioctl_err("KVM_SET_CPUID2"))?;
    let mut sregs = vcpu.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
    sregs.cs = flat(8, 0xb, true);
    sregs.ds = flat(0x10, 3, false);
    sregs.es = sregs.ds;
    sregs.ss = sregs.ds;
    sregs.fs = sregs.ds;
    sregs.gs = sregs.ds;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0031; // PG, NE, ET, PE
    sregs.efer = 0x500; // LMA, LME
    vcpu.set_sregs(&sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;

    let mut ask = |leaf: u32, sub: u32| -> Result<[u32; 4], KvmError> {
        let mut regs = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        regs.rax = u64::from(leaf);
        regs.rcx = u64::from(sub);
        regs.rip = CODE;
        regs.rflags = 2;
        vcpu.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))?;
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PROBE_PORT, _)) => {}
            Ok(other) => {
                return Err(KvmError::Probe(format!(
                    "CPUID {leaf:#x}.{sub}: unexpected exit {other:?}"
                )))
            }
            Err(e) => return Err(ioctl_err("KVM_RUN")(e)),
        }
        let r = vcpu.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        // Complete the OUT (KVM finishes it at the next KVM_RUN, which
        // returns at once with immediate_exit) before the registers are
        // set for the next leaf.
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
        Ok([r.rax as u32, r.rbx as u32, r.rcx as u32, r.rdx as u32])
    };

    let l0 = ask(0, 0)?;
    let le = ask(0x8000_0000, 0)?;
    let mut entries = Vec::new();
    let mut beyond = None;
    for (leaf, sub) in leaves(l0[0], le[0]) {
        let r = ask(leaf, sub)?;
        if leaf & 0x8000_0000 == 0 && leaf > l0[0] {
            beyond = Some(r);
            continue;
        }
        entries.push(CpuidEntry {
            function: leaf,
            index: sub,
            flags: if cpuid::indexed(leaf) {
                cpuid::SIGNIFICANT_INDEX
            } else {
                0
            },
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
        });
    }
    let mut out = CpuidTable {
        entries,
        ..CpuidTable::default()
    };
    // Intel's rule gives the highest basic leaf's answer beyond the
    // maximum; record a different answer only.
    if let Some(r) = beyond {
        if r != out.raw(l0[0], 0) {
            out.beyond_max = Some(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leaf_list_covers_maxima_subleaves_and_one_beyond() {
        let l = leaves(0xd, 0x8000_0008);
        assert!(l.contains(&(0xd, 3)));
        assert!(l.contains(&(7, 1)));
        assert!(!l.contains(&(1, 1)));
        assert!(l.contains(&(0xe, 0)));
        assert!(l.contains(&(0x8000_0008, 0)));
        assert!(!l.contains(&(0x8000_0009, 0)));
        // A nonsense maximum is clamped, not trusted.
        assert!(leaves(u32::MAX, u32::MAX).len() < 200);
    }
}
