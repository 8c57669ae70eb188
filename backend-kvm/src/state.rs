//! Conversions between Tandem's CPU state types and KVM's structures, and
//! the ioctls kvm-ioctls does not wrap.

use kvm_bindings::{
    kvm_dtable, kvm_fpu, kvm_interrupt, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xsave, Msrs, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR, KVM_VCPUEVENT_VALID_SMM,
};
use kvm_ioctls::VcpuFd;
use std::os::fd::AsRawFd;
use tandem_core::cpu::{
    DescriptorTable, FpuState, InjectedInterrupt, Interruptibility, Msr, PendingException, Regs,
    Segment, Sregs, VcpuEvents,
};
use tandem_core::vcpu::{VcpuError, VcpuResult};

/// KVM_INTERRUPT = _IOW(KVMIO, 0x86, struct kvm_interrupt). kvm-ioctls has no
/// wrapper for it. It queues an external interrupt for the next entry and
/// does not look at RFLAGS.IF: the ladder checks readiness first.
fn kvm_interrupt_nr() -> libc::c_ulong {
    const IOC_WRITE: libc::c_ulong = 1;
    (IOC_WRITE << 30)
        | ((std::mem::size_of::<kvm_interrupt>() as libc::c_ulong) << 16)
        | (0xAE << 8)
        | 0x86
}

pub(crate) fn kvm_interrupt(fd: &VcpuFd, vector: u8) -> VcpuResult<()> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt` from the pointer,
    // which points at a live local of that type.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), kvm_interrupt_nr(), &irq) };
    if ret < 0 {
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Err(VcpuError::host("KVM_INTERRUPT", e));
    }
    Ok(())
}

pub(crate) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(crate) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

pub(crate) fn sregs_from_kvm(s: &kvm_sregs) -> Sregs {
    Sregs {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Writes `s` into `k`, keeping KVM's interrupt bitmap as it is.
pub(crate) fn sregs_to_kvm(s: &Sregs, k: &mut kvm_sregs) {
    k.cs = seg_to_kvm(&s.cs);
    k.ds = seg_to_kvm(&s.ds);
    k.es = seg_to_kvm(&s.es);
    k.fs = seg_to_kvm(&s.fs);
    k.gs = seg_to_kvm(&s.gs);
    k.ss = seg_to_kvm(&s.ss);
    k.tr = seg_to_kvm(&s.tr);
    k.ldt = seg_to_kvm(&s.ldt);
    k.gdt = kvm_dtable {
        base: s.gdt.base,
        limit: s.gdt.limit,
        padding: [0; 3],
    };
    k.idt = kvm_dtable {
        base: s.idt.base,
        limit: s.idt.limit,
        padding: [0; 3],
    };
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

const SHADOW_MOV_SS: u8 = 1;
const SHADOW_STI: u8 = 2;

pub(crate) fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    let exception =
        (e.exception.injected != 0 || e.exception.pending != 0).then(|| PendingException {
            vector: e.exception.nr,
            error_code: (e.exception.has_error_code != 0).then_some(e.exception.error_code),
            injected: e.exception.injected != 0,
            payload: (e.exception_has_payload != 0).then_some(e.exception_payload),
        });
    VcpuEvents {
        exception,
        interrupt: (e.interrupt.injected != 0).then_some(InjectedInterrupt {
            vector: e.interrupt.nr,
            soft: e.interrupt.soft != 0,
        }),
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        smi_pending: e.smi.pending != 0,
        smm: e.smi.smm != 0,
        interruptibility: Interruptibility {
            sti: e.interrupt.shadow & SHADOW_STI != 0,
            mov_ss: e.interrupt.shadow & SHADOW_MOV_SS != 0,
            nmi: e.nmi.masked != 0,
        },
        sipi_vector: None,
    }
}

pub(crate) fn events_to_kvm(ev: &VcpuEvents) -> kvm_vcpu_events {
    let mut e = kvm_vcpu_events::default();
    if let Some(x) = ev.exception {
        e.exception.injected = u8::from(x.injected);
        e.exception.pending = u8::from(!x.injected);
        e.exception.nr = x.vector;
        e.exception.has_error_code = u8::from(x.error_code.is_some());
        e.exception.error_code = x.error_code.unwrap_or(0);
    }
    if let Some(i) = ev.interrupt {
        e.interrupt.injected = 1;
        e.interrupt.nr = i.vector;
        e.interrupt.soft = u8::from(i.soft);
    }
    e.interrupt.shadow = (if ev.interruptibility.sti {
        SHADOW_STI
    } else {
        0
    }) | (if ev.interruptibility.mov_ss {
        SHADOW_MOV_SS
    } else {
        0
    });
    e.nmi.injected = u8::from(ev.nmi_injected);
    e.nmi.pending = u8::from(ev.nmi_pending);
    e.nmi.masked = u8::from(ev.interruptibility.nmi);
    e.smi.smm = u8::from(ev.smm);
    e.smi.pending = u8::from(ev.smi_pending);
    e.sipi_vector = u32::from(ev.sipi_vector.unwrap_or(0));
    e.flags = KVM_VCPUEVENT_VALID_NMI_PENDING
        | KVM_VCPUEVENT_VALID_SHADOW
        | KVM_VCPUEVENT_VALID_SMM
        | if ev.sipi_vector.is_some() {
            KVM_VCPUEVENT_VALID_SIPI_VECTOR
        } else {
            0
        };
    e
}

pub(crate) fn get_fpu(fd: &VcpuFd) -> VcpuResult<FpuState> {
    match fd.get_xsave() {
        Ok(x) => {
            let mut xsave = Vec::with_capacity(4096);
            for w in x.region.iter() {
                xsave.extend_from_slice(&w.to_le_bytes());
            }
            let xcr0 = fd
                .get_xcrs()
                .ok()
                .and_then(|x| {
                    x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
                        .iter()
                        .find(|c| c.xcr == 0)
                        .map(|c| c.value)
                })
                .unwrap_or(1);
            Ok(FpuState { xsave, xcr0 })
        }
        Err(_) => {
            // No XSAVE on this host: build the legacy region from KVM_GET_FPU.
            let f = fd
                .get_fpu()
                .map_err(|e| VcpuError::host("KVM_GET_FPU", e.errno()))?;
            let mut st = FpuState::default();
            fxsave_from_kvm(&f, &mut st.xsave);
            Ok(st)
        }
    }
}

fn fxsave_from_kvm(f: &kvm_fpu, out: &mut [u8]) {
    out[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    out[2..4].copy_from_slice(&f.fsw.to_le_bytes());
    out[4] = f.ftwx;
    out[6..8].copy_from_slice(&f.last_opcode.to_le_bytes());
    out[8..16].copy_from_slice(&f.last_ip.to_le_bytes());
    out[16..24].copy_from_slice(&f.last_dp.to_le_bytes());
    out[24..28].copy_from_slice(&f.mxcsr.to_le_bytes());
    for (i, r) in f.fpr.iter().enumerate() {
        out[32 + i * 16..48 + i * 16].copy_from_slice(r);
    }
    for (i, r) in f.xmm.iter().enumerate() {
        out[160 + i * 16..176 + i * 16].copy_from_slice(r);
    }
}

pub(crate) fn set_fpu(fd: &VcpuFd, st: &FpuState) -> VcpuResult<()> {
    let mut x = kvm_xsave::default();
    for (w, c) in x.region.iter_mut().zip(st.xsave.chunks(4)) {
        let mut b = [0u8; 4];
        b[..c.len()].copy_from_slice(c);
        *w = u32::from_le_bytes(b);
    }
    // SAFETY: `x` is a complete kvm_xsave of the legacy 4 KiB size; KVM
    // reads no more than that for a VM that did not enable larger XSAVE
    // areas (KVM_CAP_XSAVE2 is not enabled here).
    match unsafe { fd.set_xsave(&x) } {
        Ok(()) => {}
        Err(e) => return Err(VcpuError::host("KVM_SET_XSAVE", e.errno())),
    }
    let mut xcrs = kvm_bindings::kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = st.xcr0;
    let _ = fd.set_xcrs(&xcrs);
    Ok(())
}

pub(crate) fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> VcpuResult<Vec<Msr>> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|_| VcpuError::Unsupported("too many MSRs".into()))?;
    let n = fd
        .get_msrs(&mut msrs)
        .map_err(|e| VcpuError::host("KVM_GET_MSRS", e.errno()))?;
    Ok(msrs.as_slice()[..n]
        .iter()
        .map(|e| Msr {
            index: e.index,
            value: e.data,
        })
        .collect())
}

pub(crate) fn set_msrs(fd: &VcpuFd, msrs: &[Msr]) -> VcpuResult<()> {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.value,
            ..Default::default()
        })
        .collect();
    let k =
        Msrs::from_entries(&entries).map_err(|_| VcpuError::Unsupported("too many MSRs".into()))?;
    let n = fd
        .set_msrs(&k)
        .map_err(|e| VcpuError::host("KVM_SET_MSRS", e.errno()))?;
    if n != msrs.len() {
        let bad = msrs.get(n).map(|m| m.index).unwrap_or(0);
        return Err(VcpuError::Unsupported(format!("KVM refused MSR {bad:#x}")));
    }
    Ok(())
}
