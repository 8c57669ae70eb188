//! What kind of KVM this host has, for `tandem info` and for errors that
//! explain a host's limits.

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

use crate::KvmError;

/// The kind of KVM behind /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavour {
    /// Intel VT-x (kvm_intel).
    Vmx,
    /// AMD-V (kvm_amd).
    Svm,
    /// PVM (kvm_pvm): a software KVM without VMX or SVM. It runs 64-bit CPL3
    /// code natively and emulates everything else.
    Pvm,
    /// A KVM module Tandem does not recognise.
    Unknown,
}

impl fmt::Display for KvmFlavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavour::Vmx => "VMX (kvm_intel)",
            KvmFlavour::Svm => "SVM (kvm_amd)",
            KvmFlavour::Pvm => "PVM (kvm_pvm, software KVM without VMX/SVM)",
            KvmFlavour::Unknown => "unknown KVM module",
        })
    }
}

impl KvmFlavour {
    /// What the user should know about this host when a guest fails on it.
    pub fn caveat(&self) -> Option<&'static str> {
        match self {
            KvmFlavour::Pvm => Some(
                "this host's KVM is PVM: only 64-bit ring-3 code runs natively; ring-0, \
                 32-bit and real-mode code is emulated, and its emulator stops at the first \
                 IRET in 32-bit protected mode and on some instructions (lock cmpxchg16b, \
                 xrstor, int3); use --backend interp for such guests",
            ),
            _ => None,
        }
    }
}

/// Detects the KVM module from sysfs, falling back to the CPU flags.
pub fn detect_flavour() -> KvmFlavour {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return KvmFlavour::Pvm;
    }
    if Path::new("/sys/module/kvm_intel").exists() {
        return KvmFlavour::Vmx;
    }
    if Path::new("/sys/module/kvm_amd").exists() {
        return KvmFlavour::Svm;
    }
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| {
        flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|w| w == f))
    };
    if has("vmx") {
        KvmFlavour::Vmx
    } else if has("svm") {
        KvmFlavour::Svm
    } else {
        KvmFlavour::Unknown
    }
}

/// The host's KVM as `tandem info` shows it.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub flavour: KvmFlavour,
    pub api_version: i32,
    pub vcpu_mmap_size: usize,
    pub max_vcpus: usize,
    /// Capabilities that matter to Tandem, with whether the host has them.
    pub caps: Vec<(&'static str, bool)>,
    /// CPUID leaves Tandem offers a guest (leaf, subleaf, eax, ebx, ecx, edx).
    pub cpuid: Vec<(u32, u32, u32, u32, u32, u32)>,
}

/// The CPUID a guest of a VM with `vcpus` vCPUs sees on this host (KVM's
/// supported list cut to Tandem's model; on PVM what a probe measured),
/// without creating the guest's VM.
pub fn offered_cpuid(vcpus: u32) -> Result<tandem_core::cpuid::CpuidTable, KvmError> {
    let kvm =
        Kvm::new().map_err(|e| KvmError::Open(std::io::Error::from_raw_os_error(e.errno())))?;
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(crate::ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
    let table = crate::cpuid::platform_table(&supported, vcpus.max(1));
    crate::visible_cpuid(&kvm, detect_flavour(), &table)
}

/// Opens /dev/kvm and reads what Tandem needs to know.
pub fn host_info() -> Result<HostInfo, KvmError> {
    let kvm =
        Kvm::new().map_err(|e| KvmError::Open(std::io::Error::from_raw_os_error(e.errno())))?;
    let raw = |c: u32| kvm.check_extension_raw(u64::from(c)) > 0;
    let caps = vec![
        (
            "KVM_CAP_IRQCHIP (in-kernel irqchip, reference mode)",
            kvm.check_extension(Cap::Irqchip),
        ),
        (
            "KVM_CAP_PIT2 (in-kernel PIT, reference mode)",
            kvm.check_extension(Cap::Pit2),
        ),
        (
            "KVM_CAP_IMMEDIATE_EXIT (kicks)",
            kvm.check_extension(Cap::ImmediateExit),
        ),
        ("KVM_CAP_VCPU_EVENTS", kvm.check_extension(Cap::VcpuEvents)),
        ("KVM_CAP_XSAVE", kvm.check_extension(Cap::Xsave)),
        ("KVM_CAP_XCRS", kvm.check_extension(Cap::Xcrs)),
        ("KVM_CAP_DEBUGREGS", kvm.check_extension(Cap::Debugregs)),
        (
            "KVM_CAP_SET_GUEST_DEBUG (single-step)",
            kvm.check_extension(Cap::SetGuestDebug),
        ),
        (
            "KVM_CAP_TSC_DEADLINE_TIMER",
            kvm.check_extension(Cap::TscDeadlineTimer),
        ),
        (
            "KVM_CAP_X86_USER_SPACE_MSR",
            raw(kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR),
        ),
        (
            "KVM_CAP_X86_MSR_FILTER",
            raw(kvm_bindings::KVM_CAP_X86_MSR_FILTER),
        ),
        (
            "KVM_CAP_EXIT_ON_EMULATION_FAILURE",
            raw(kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE),
        ),
    ];
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(crate::ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
    let offered = crate::cpuid::platform_table(&supported, 1);
    let cpuid = offered
        .entries
        .iter()
        .map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx))
        .collect();
    Ok(HostInfo {
        flavour: detect_flavour(),
        api_version: kvm.get_api_version(),
        vcpu_mmap_size: kvm.get_vcpu_mmap_size().unwrap_or(0),
        max_vcpus: kvm.get_max_vcpus(),
        caps,
        cpuid,
    })
}
