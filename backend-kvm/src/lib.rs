//! tandem-kvm: the KVM processor.
//!
//! A VM with no in-kernel irqchip: Tandem's own PIT, PICs, IOAPIC and LAPIC
//! are what the guest talks to, and events are injected with KVM_INTERRUPT
//! and KVM_NMI when the injection ladder in core decides to. Port I/O, MMIO,
//! HLT and the MSRs the machine owns (x2APIC, TSC deadline, APIC base) exit
//! to userspace.

mod cpuid;
mod host;
mod kernel_irqchip;
mod kick;
mod probe;
mod state;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{
    kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_EXIT_ON_EMULATION_FAILURE,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_EXIT_IO_IN, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use tandem_core::cpu::{
    DebugRegs, Event, EventKind, FpuState, MpState, Msr, Regs, Sregs, VcpuEvents,
};
use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Kick, Readiness, Vcpu, VcpuError, VcpuExit, VcpuResult};
use thiserror::Error;

pub use host::{host_info, offered_cpuid, HostInfo, KvmFlavour};
pub use kernel_irqchip::{lapic_time_dependent, DeviceRegister, KernelIrqSink, LAPIC_COMPARED};
pub use kick::KvmKicker;

/// Where KVM puts the real-mode TSS and identity map on VMX hosts, as QEMU
/// does: just below the BIOS flash, inside the e820 reserved area.
const TSS_ADDRESS: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

#[derive(Debug, Error)]
pub enum KvmError {
    #[error("cannot open /dev/kvm: {0}")]
    Open(#[source] std::io::Error),
    #[error("KVM API version {0} is not 12")]
    ApiVersion(i32),
    #[error("{op}: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM lacks {0}")]
    MissingCap(&'static str),
    #[error("CPUID table rejected: {0}")]
    Cpuid(String),
    #[error("CPUID probe: {0}")]
    Probe(String),
}

fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Ioctl {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

fn vcpu_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |e| VcpuError::host(op, e.errno())
}

/// MSRs whose guest accesses must reach the machine although KVM would
/// handle them itself: the APIC base and the TSC deadline (Tandem's LAPIC
/// owns them). x2APIC MSRs 0x800-0x8FF exit anyway because there is no
/// in-kernel LAPIC (KVM_MSR_EXIT_REASON_INVAL); they are filtered too so a
/// KVM that would accept them still forwards them.
const FILTERED_MSRS: &[(u32, u32)] = &[(0x1b, 1), (0x6e0, 1), (0x800, 0x100)];

/// Options for creating the VM.
#[derive(Debug, Clone, Default)]
pub struct KvmVmOptions {
    /// Number of vCPUs the guest will see in CPUID.
    pub vcpus: u32,
    /// Use KVM's in-kernel PIC, IOAPIC, LAPIC and PIT instead of Tandem's
    /// (the reference mode, `--irqchip kernel`).
    pub kernel_irqchip: bool,
}

/// A KVM virtual machine over Tandem's guest memory.
pub struct KvmVm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    kernel_irqchip: bool,
    cpuid: tandem_core::cpuid::CpuidTable,
    /// What the guest sees: `cpuid`, or on PVM the probed answers.
    visible_cpuid: tandem_core::cpuid::CpuidTable,
    flavour: KvmFlavour,
    _mem: Arc<GuestMemory>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("flavour", &self.flavour)
            .finish_non_exhaustive()
    }
}

impl KvmVm {
    /// Creates the VM and maps `mem` as its memory slots.
    pub fn new(mem: Arc<GuestMemory>, opts: &KvmVmOptions) -> Result<KvmVm, KvmError> {
        let kvm =
            Kvm::new().map_err(|e| KvmError::Open(std::io::Error::from_raw_os_error(e.errno())))?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(KvmError::ApiVersion(api));
        }
        let flavour = host::detect_flavour();
        let vm = kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;

        // Only VMX needs these; SVM and PVM accept or ignore them.
        if let Err(e) = vm.set_tss_address(TSS_ADDRESS) {
            if flavour == KvmFlavour::Vmx {
                return Err(ioctl_err("KVM_SET_TSS_ADDR")(e));
            }
        }
        let _ = vm.set_identity_map_address(IDENTITY_MAP_ADDRESS);
        if opts.kernel_irqchip {
            kernel_irqchip::create(&vm)?;
        }

        for (slot, r) in mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: mem.host_base() as u64 + r.offset,
            };
            // SAFETY: the host range [host_base + offset, + len) lies inside
            // the anonymous mapping owned by `mem` (GuestMemory builds its
            // regions inside the mapping), and `mem` is kept alive in
            // `self._mem` for as long as the VM exists, so KVM never maps
            // freed memory.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        if kvm.check_extension_raw(u64::from(KVM_CAP_X86_USER_SPACE_MSR)) <= 0 {
            return Err(KvmError::MissingCap("KVM_CAP_X86_USER_SPACE_MSR"));
        }
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(
            KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN,
        );
        vm.enable_cap(&cap)
            .map_err(ioctl_err("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))?;
        // A clear bit in a filter bitmap denies the access in the kernel and
        // sends it to userspace.
        let zeros = [0u8; 0x100 / 8];
        // With the in-kernel irqchip, KVM's LAPIC owns these MSRs.
        let filtered: &[(u32, u32)] = if opts.kernel_irqchip {
            &[]
        } else {
            FILTERED_MSRS
        };
        let ranges: Vec<MsrFilterRange<'_>> = filtered
            .iter()
            .map(|&(base, count)| MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base,
                msr_count: count,
                bitmap: &zeros,
            })
            .collect();
        if ranges.is_empty() {
            // Nothing to filter.
        } else if let Err(e) = vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges) {
            // PVM has no MSR filter; its x2APIC MSRs still exit as INVAL.
            if flavour != KvmFlavour::Pvm {
                return Err(ioctl_err("KVM_X86_SET_MSR_FILTER")(e));
            }
        }
        if kvm.check_extension_raw(u64::from(KVM_CAP_EXIT_ON_EMULATION_FAILURE)) > 0 {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
                args: [1, 0, 0, 0],
                ..Default::default()
            };
            let _ = vm.enable_cap(&cap);
        }

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        let cpuid = cpuid::platform_table(&supported, opts.vcpus.max(1));
        let visible_cpuid = visible_cpuid(&kvm, flavour, &cpuid)?;
        Ok(KvmVm {
            kvm,
            vm: Arc::new(vm),
            kernel_irqchip: opts.kernel_irqchip,
            cpuid,
            visible_cpuid,
            flavour,
            _mem: mem,
        })
    }

    pub fn flavour(&self) -> KvmFlavour {
        self.flavour
    }

    /// The CPUID this VM's guest sees: the table every vCPU gets (KVM's
    /// supported list cut to Tandem's processor model) or, on PVM, which
    /// answers some leaves from the hardware, what a probe saw. Give it to
    /// an interpreter that runs this VM's guest, so both are one processor.
    pub fn cpuid_table(&self) -> &tandem_core::cpuid::CpuidTable {
        &self.visible_cpuid
    }

    /// The table KVM_SET_CPUID2 gives every vCPU (differs from
    /// `cpuid_table` on PVM only).
    pub fn requested_cpuid(&self) -> &tandem_core::cpuid::CpuidTable {
        &self.cpuid
    }

    /// The raw VM fd, for the in-kernel irqchip reference mode and tests.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Whether KVM's in-kernel irqchip and PIT are in use.
    pub fn kernel_irqchip(&self) -> bool {
        self.kernel_irqchip
    }

    /// Where Tandem's devices' ISA lines go with the in-kernel irqchip.
    pub fn kernel_irq_sink(&self) -> Arc<KernelIrqSink> {
        Arc::new(KernelIrqSink {
            vm: self.vm.clone(),
        })
    }

    /// KVM's PIC, IOAPIC and PIT registers (in-kernel irqchip only).
    pub fn dump_kernel_irqchip(&self) -> String {
        if self.kernel_irqchip {
            kernel_irqchip::dump(&self.vm)
        } else {
            String::new()
        }
    }

    /// KVM's PIC pair, IOAPIC and PIT as named registers (in-kernel
    /// irqchip only), for `tandem diff --devices`.
    pub fn kernel_irqchip_registers(&self) -> Result<Vec<DeviceRegister>, KvmError> {
        let mut out = kernel_irqchip::pic_registers(&self.vm)?;
        out.extend(kernel_irqchip::ioapic_registers(&self.vm)?);
        out.extend(kernel_irqchip::pit_registers(&self.vm)?);
        Ok(out)
    }

    /// Creates vCPU `id` with Tandem's CPUID.
    pub fn create_vcpu(&self, id: u32) -> Result<KvmVcpu, KvmError> {
        let mut fd = self
            .vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let cpuid = cpuid::for_vcpu(&self.cpuid, id).map_err(KvmError::Cpuid)?;
        fd.set_cpuid2(&cpuid).map_err(ioctl_err("KVM_SET_CPUID2"))?;
        let kicker = KvmKicker::new(&mut fd);
        Ok(KvmVcpu {
            fd,
            id,
            kicker,
            exit: PendingExit::None,
            window: false,
        })
    }
}

/// The CPUID a guest of `flavour` sees when its vCPUs get `table`: the
/// table itself, except on PVM, whose answers a scratch VM measures
/// (probe.rs).
pub(crate) fn visible_cpuid(
    kvm: &Kvm,
    flavour: KvmFlavour,
    table: &tandem_core::cpuid::CpuidTable,
) -> Result<tandem_core::cpuid::CpuidTable, KvmError> {
    if flavour == KvmFlavour::Pvm {
        probe::guest_visible_cpuid(kvm, table)
    } else {
        Ok(table.clone())
    }
}

/// What the last exit left to complete before the next KVM_RUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingExit {
    None,
    Io {
        offset: usize,
        len: usize,
    },
    Mmio,
    Msr,
    /// The VMM changed registers or events since the last exit: the
    /// kvm_run fields `readiness` reads (IF, ready_for_interrupt_injection)
    /// are stale until a KVM_RUN refreshes them.
    Refresh,
}

/// One KVM vCPU behind Tandem's `Vcpu` interface.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
    kicker: Arc<KvmKicker>,
    exit: PendingExit,
    window: bool,
}

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu").field("id", &self.id).finish()
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        self.kicker.detach();
    }
}

impl KvmVcpu {
    /// The guest TSC frequency in kHz (KVM_GET_TSC_KHZ).
    pub fn tsc_khz(&self) -> Option<u64> {
        self.fd.get_tsc_khz().ok().map(u64::from)
    }

    /// Finishes the instruction of the last port-I/O, MMIO or MSR exit
    /// without running further: KVM completes it at the next KVM_RUN, which
    /// returns at once with `immediate_exit` set (the KVM API's way to make
    /// guest state consistent). Until then RIP, RFLAGS and the interrupt
    /// shadow describe the middle of the instruction, and an event injected
    /// there could land inside a MOV SS or STI shadow the instruction
    /// creates.
    fn finish_instruction(&mut self) -> VcpuResult<()> {
        if !matches!(
            self.exit,
            PendingExit::Io { .. } | PendingExit::Mmio | PendingExit::Msr | PendingExit::Refresh
        ) {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        // SAFETY: KVM_RUN on our own vCPU fd, as in `run`.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), kvm_run_ioctl(), 0) };
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        self.fd.set_kvm_immediate_exit(0);
        self.exit = PendingExit::None;
        if ret < 0 && errno != libc::EINTR && errno != libc::EAGAIN {
            return Err(VcpuError::host("KVM_RUN (completion)", errno));
        }
        Ok(())
    }

    /// RFLAGS.IF or the interrupt shadow may have changed from outside
    /// (KVM_SET_REGS / KVM_SET_VCPU_EVENTS): `readiness` refreshes kvm_run
    /// first with an immediate-exit KVM_RUN (KVM stores IF and
    /// ready_for_interrupt_injection on every return to userspace).
    fn stale_run_fields(&mut self) {
        if self.exit == PendingExit::None {
            self.exit = PendingExit::Refresh;
        }
    }

    /// KVM's LAPIC registers of this vCPU (in-kernel irqchip only).
    pub fn dump_kernel_lapic(&self) -> String {
        kernel_irqchip::dump_lapic(&self.fd, self.id)
    }

    /// KVM's LAPIC registers of this vCPU as named registers (in-kernel
    /// irqchip only), for `tandem diff --devices`.
    pub fn kernel_lapic_registers(&self) -> Result<Vec<DeviceRegister>, KvmError> {
        kernel_irqchip::lapic_registers(&self.fd)
    }

    /// The raw vCPU fd (single-step, guest debug, tests).
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn decode_exit(&mut self) -> VcpuExit {
        let run = self.fd.get_kvm_run();
        self.exit = PendingExit::None;
        match run.exit_reason {
            kvm_bindings::KVM_EXIT_IO => {
                // SAFETY: exit_reason says the `io` member of the union is valid.
                let io = unsafe { run.__bindgen_anon_1.io };
                let len = usize::from(io.size) * io.count as usize;
                self.exit = PendingExit::Io {
                    offset: io.data_offset as usize,
                    len,
                };
                if u32::from(io.direction) == KVM_EXIT_IO_IN {
                    VcpuExit::IoIn {
                        port: io.port,
                        size: io.size,
                        count: io.count,
                    }
                } else {
                    VcpuExit::IoOut {
                        port: io.port,
                        size: io.size,
                        count: io.count,
                    }
                }
            }
            kvm_bindings::KVM_EXIT_MMIO => {
                // SAFETY: exit_reason says the `mmio` member is valid.
                let mmio = unsafe { run.__bindgen_anon_1.mmio };
                self.exit = PendingExit::Mmio;
                let len = mmio.len.min(8) as u8;
                if mmio.is_write != 0 {
                    VcpuExit::MmioWrite {
                        addr: mmio.phys_addr,
                        len,
                    }
                } else {
                    VcpuExit::MmioRead {
                        addr: mmio.phys_addr,
                        len,
                    }
                }
            }
            kvm_bindings::KVM_EXIT_X86_RDMSR => {
                // SAFETY: exit_reason says the `msr` member is valid.
                let msr = unsafe { run.__bindgen_anon_1.msr };
                self.exit = PendingExit::Msr;
                VcpuExit::RdMsr { index: msr.index }
            }
            kvm_bindings::KVM_EXIT_X86_WRMSR => {
                // SAFETY: exit_reason says the `msr` member is valid.
                let msr = unsafe { run.__bindgen_anon_1.msr };
                self.exit = PendingExit::Msr;
                VcpuExit::WrMsr {
                    index: msr.index,
                    value: msr.data,
                }
            }
            kvm_bindings::KVM_EXIT_HLT => VcpuExit::Hlt,
            kvm_bindings::KVM_EXIT_IRQ_WINDOW_OPEN => VcpuExit::InterruptWindow,
            kvm_bindings::KVM_EXIT_SHUTDOWN => VcpuExit::Shutdown,
            kvm_bindings::KVM_EXIT_INTR => VcpuExit::Kicked,
            kvm_bindings::KVM_EXIT_SET_TPR => VcpuExit::TprLowered,
            kvm_bindings::KVM_EXIT_DEBUG => {
                // SAFETY: exit_reason says the `debug` member is valid.
                let d = unsafe { run.__bindgen_anon_1.debug }.arch;
                VcpuExit::Debug {
                    exception: d.exception as u8,
                    dr6: d.dr6,
                    rip: d.pc,
                }
            }
            kvm_bindings::KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason says the `fail_entry` member is valid.
                let f = unsafe { run.__bindgen_anon_1.fail_entry };
                VcpuExit::FailEntry {
                    reason: f.hardware_entry_failure_reason,
                }
            }
            kvm_bindings::KVM_EXIT_INTERNAL_ERROR => {
                // SAFETY: exit_reason says the `internal` member is valid; the
                // emulation_failure view shares its first fields.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
                    // SAFETY: as above; `flags` tells whether the bytes are there.
                    let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
                    let mut insn = Vec::new();
                    if ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
                        != 0
                    {
                        // SAFETY: the flag says insn_size / insn_bytes are valid.
                        let b = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
                        let n = usize::from(b.insn_size).min(b.insn_bytes.len());
                        insn.extend_from_slice(&b.insn_bytes[..n]);
                    }
                    VcpuExit::EmulationFailure { insn }
                } else {
                    let n = (internal.ndata as usize).min(internal.data.len());
                    VcpuExit::InternalError {
                        suberror: internal.suberror,
                        data: internal.data[..n].to_vec(),
                    }
                }
            }
            other => VcpuExit::Unhandled(format!("KVM exit reason {other}")),
        }
    }
}

impl Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn backend(&self) -> &'static str {
        "kvm"
    }

    fn run(&mut self) -> VcpuResult<VcpuExit> {
        let window = self.window;
        let run = self.fd.get_kvm_run();
        run.request_interrupt_window = u8::from(window);
        // SAFETY: KVM_RUN on our own vCPU fd; the kvm_run page it writes is
        // the mapping owned by `self.fd`.
        self.kicker.enter_run();
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), kvm_run_ioctl(), 0) };
        let errno = if ret < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        // A kick may have set immediate_exit; it has done its job now.
        self.kicker.leave_run(&mut self.fd);
        if ret < 0 {
            self.exit = PendingExit::None;
            return match errno {
                libc::EINTR | libc::EAGAIN => Ok(VcpuExit::Kicked),
                e => Err(VcpuError::host("KVM_RUN", e)),
            };
        }
        Ok(self.decode_exit())
    }

    fn io_data(&mut self) -> &mut [u8] {
        let PendingExit::Io { offset, len } = self.exit else {
            return &mut [];
        };
        let run = self.fd.get_kvm_run() as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: KVM places the data at `data_offset` inside the kvm_run
        // mapping (which spans the vCPU mmap size, larger than a page) and
        // `len` = size * count bytes of it belong to this exit; the slice
        // lives as long as `&mut self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts_mut(run.add(offset), len) }
    }

    fn mmio_data(&mut self) -> &mut [u8] {
        if self.exit != PendingExit::Mmio {
            return &mut [];
        }
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_MMIO, so `mmio` is the valid member.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        let len = (mmio.len as usize).min(mmio.data.len());
        &mut mmio.data[..len]
    }

    fn complete_rdmsr(&mut self, value: Option<u64>) {
        if self.exit != PendingExit::Msr {
            return;
        }
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was an MSR exit, so `msr` is the valid member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        match value {
            Some(v) => {
                msr.data = v;
                msr.error = 0;
            }
            None => msr.error = 1,
        }
    }

    fn complete_wrmsr(&mut self, ok: bool) {
        if self.exit != PendingExit::Msr {
            return;
        }
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was an MSR exit, so `msr` is the valid member.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        msr.error = u8::from(!ok);
    }

    fn cr8(&mut self) -> u64 {
        self.fd.get_kvm_run().cr8
    }

    fn set_cr8(&mut self, cr8: u64) {
        // Without an in-kernel LAPIC, KVM loads CR8 from kvm_run at every
        // KVM_RUN and stores it back at every exit.
        self.fd.get_kvm_run().cr8 = cr8;
    }

    fn readiness(&mut self) -> VcpuResult<Readiness> {
        self.finish_instruction()?;
        let run = self.fd.get_kvm_run();
        Ok(Readiness {
            if_flag: run.if_flag != 0,
            interrupt: run.ready_for_interrupt_injection != 0 && run.if_flag != 0,
            // KVM queues NMIs itself and opens its own NMI window.
            nmi: true,
        })
    }

    fn inject(&mut self, event: Event) -> VcpuResult<()> {
        match event.kind {
            EventKind::External => state::kvm_interrupt(&self.fd, event.vector),
            EventKind::Nmi => self.fd.nmi().map_err(vcpu_err("KVM_NMI")),
            EventKind::HardwareException => {
                let mut ev = self
                    .fd
                    .get_vcpu_events()
                    .map_err(vcpu_err("KVM_GET_VCPU_EVENTS"))?;
                ev.exception.injected = 1;
                ev.exception.pending = 0;
                ev.exception.nr = event.vector;
                ev.exception.has_error_code = u8::from(event.error_code.is_some());
                ev.exception.error_code = event.error_code.unwrap_or(0);
                self.fd
                    .set_vcpu_events(&ev)
                    .map_err(vcpu_err("KVM_SET_VCPU_EVENTS"))
            }
            EventKind::SoftwareInterrupt
            | EventKind::SoftwareException
            | EventKind::PrivilegedSoftwareException => {
                // KVM's API cannot give the instruction length of a soft
                // event it did not see exit (VMX takes it from the last
                // exit). Advancing RIP past the instruction and injecting
                // the vector as an already-injected external-type event
                // pushes the same frame a trap-like INT n does; the gate
                // checks that differ (DPL) were made by the caller. An
                // injected event is delivered whatever RFLAGS.IF says, as
                // INT n is.
                let mut regs = self.fd.get_regs().map_err(vcpu_err("KVM_GET_REGS"))?;
                regs.rip = regs.rip.wrapping_add(u64::from(event.instruction_len));
                self.fd.set_regs(&regs).map_err(vcpu_err("KVM_SET_REGS"))?;
                let mut ev = self
                    .fd
                    .get_vcpu_events()
                    .map_err(vcpu_err("KVM_GET_VCPU_EVENTS"))?;
                ev.interrupt.injected = 1;
                ev.interrupt.nr = event.vector;
                ev.interrupt.soft = 0;
                self.fd
                    .set_vcpu_events(&ev)
                    .map_err(vcpu_err("KVM_SET_VCPU_EVENTS"))
            }
        }
    }

    fn set_interrupt_window_exiting(&mut self, on: bool) {
        self.window = on;
    }

    fn set_nmi_window_exiting(&mut self, _on: bool) {
        // KVM opens NMI windows by itself for the NMIs it has queued.
    }

    fn idt_vectoring(&mut self) -> Option<Event> {
        // KVM re-injects an interrupted delivery by itself.
        None
    }

    fn get_regs(&mut self) -> VcpuResult<Regs> {
        let r = self.fd.get_regs().map_err(vcpu_err("KVM_GET_REGS"))?;
        Ok(state::regs_from_kvm(&r))
    }
    fn set_regs(&mut self, regs: &Regs) -> VcpuResult<()> {
        self.fd
            .set_regs(&state::regs_to_kvm(regs))
            .map_err(vcpu_err("KVM_SET_REGS"))?;
        self.stale_run_fields();
        Ok(())
    }
    fn get_sregs(&mut self) -> VcpuResult<Sregs> {
        let s = self.fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
        Ok(state::sregs_from_kvm(&s))
    }
    fn set_sregs(&mut self, sregs: &Sregs) -> VcpuResult<()> {
        let mut s = self.fd.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
        state::sregs_to_kvm(sregs, &mut s);
        self.fd.set_sregs(&s).map_err(vcpu_err("KVM_SET_SREGS"))
    }
    fn get_debug_regs(&mut self) -> VcpuResult<DebugRegs> {
        let d = self
            .fd
            .get_debug_regs()
            .map_err(vcpu_err("KVM_GET_DEBUGREGS"))?;
        Ok(DebugRegs {
            db: d.db,
            dr6: d.dr6,
            dr7: d.dr7,
        })
    }
    fn set_debug_regs(&mut self, dr: &DebugRegs) -> VcpuResult<()> {
        let d = kvm_bindings::kvm_debugregs {
            db: dr.db,
            dr6: dr.dr6,
            dr7: dr.dr7,
            ..Default::default()
        };
        self.fd
            .set_debug_regs(&d)
            .map_err(vcpu_err("KVM_SET_DEBUGREGS"))
    }
    fn get_fpu(&mut self) -> VcpuResult<FpuState> {
        state::get_fpu(&self.fd)
    }
    fn set_fpu(&mut self, fpu: &FpuState) -> VcpuResult<()> {
        state::set_fpu(&self.fd, fpu)
    }
    fn get_msrs(&mut self, indices: &[u32]) -> VcpuResult<Vec<Msr>> {
        state::get_msrs(&self.fd, indices)
    }
    fn set_msrs(&mut self, msrs: &[Msr]) -> VcpuResult<()> {
        state::set_msrs(&self.fd, msrs)
    }
    fn get_events(&mut self) -> VcpuResult<VcpuEvents> {
        let e = self
            .fd
            .get_vcpu_events()
            .map_err(vcpu_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(state::events_from_kvm(&e))
    }
    fn set_events(&mut self, events: &VcpuEvents) -> VcpuResult<()> {
        let e = state::events_to_kvm(events);
        self.fd
            .set_vcpu_events(&e)
            .map_err(vcpu_err("KVM_SET_VCPU_EVENTS"))?;
        self.stale_run_fields();
        Ok(())
    }
    fn get_mp_state(&mut self) -> VcpuResult<MpState> {
        // Without an in-kernel LAPIC, HLT and INIT / SIPI are handled in
        // userspace; KVM's own mp_state stays RUNNABLE.
        Ok(MpState::Runnable)
    }
    fn set_mp_state(&mut self, _state: MpState) -> VcpuResult<()> {
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn Kick> {
        self.kicker.clone()
    }

    fn set_guest_debug(&mut self, single_step: bool, hw_breakpoints: &[u64]) -> VcpuResult<()> {
        let dbg = guest_debug(single_step, hw_breakpoints)?;
        self.fd
            .set_guest_debug(&dbg)
            .map_err(vcpu_err("KVM_SET_GUEST_DEBUG"))
    }
}

/// The KVM_SET_GUEST_DEBUG argument: single-step (RFLAGS.TF under KVM's
/// control) and up to four instruction breakpoints in DR0-DR3, enabled in
/// DR7 as execution breakpoints of length 1 (R/W = 00, LEN = 00; SDM
/// vol. 3, 18.2.4). KVM keeps these apart from the guest's own debug
/// registers.
fn guest_debug(
    single_step: bool,
    hw_breakpoints: &[u64],
) -> VcpuResult<kvm_bindings::kvm_guest_debug> {
    if hw_breakpoints.len() > 4 {
        return Err(VcpuError::Unsupported(format!(
            "KVM has 4 hardware breakpoints (DR0-DR3); {} were asked for",
            hw_breakpoints.len()
        )));
    }
    let mut dbg = kvm_bindings::kvm_guest_debug::default();
    if !single_step && hw_breakpoints.is_empty() {
        return Ok(dbg);
    }
    dbg.control = kvm_bindings::KVM_GUESTDBG_ENABLE;
    if single_step {
        dbg.control |= kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
    }
    if !hw_breakpoints.is_empty() {
        dbg.control |= kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
        // GE (bit 9) and the reserved bit 10, which reads as 1.
        let mut dr7: u64 = 0x600;
        for (i, &addr) in hw_breakpoints.iter().enumerate() {
            dbg.arch.debugreg[i] = addr;
            // Gn: a global enable survives the guest's task switches.
            dr7 |= 2 << (2 * i);
        }
        dbg.arch.debugreg[7] = dr7;
    }
    Ok(dbg)
}

fn kvm_run_ioctl() -> libc::c_ulong {
    // KVM_RUN = _IO(KVMIO, 0x80)
    (0xAE << 8) | 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_debug_encodes_dr0_to_dr3_and_dr7() {
        let d = guest_debug(true, &[0x1000, 0x2000]).unwrap();
        assert_eq!(
            d.control,
            kvm_bindings::KVM_GUESTDBG_ENABLE
                | kvm_bindings::KVM_GUESTDBG_SINGLESTEP
                | kvm_bindings::KVM_GUESTDBG_USE_HW_BP
        );
        assert_eq!(&d.arch.debugreg[..4], &[0x1000, 0x2000, 0, 0]);
        // G0 and G1 enabled, R/W and LEN 00 (execution), GE and bit 10.
        assert_eq!(d.arch.debugreg[7], 0x600 | 0b1010);
    }

    #[test]
    fn guest_debug_off_and_too_many_breakpoints() {
        let d = guest_debug(false, &[]).unwrap();
        assert_eq!(d.control, 0);
        let d = guest_debug(true, &[]).unwrap();
        assert_eq!(
            d.control,
            kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP
        );
        assert_eq!(d.arch.debugreg[7], 0);
        let e = guest_debug(false, &[1, 2, 3, 4, 5]).unwrap_err();
        assert!(e.to_string().contains("4 hardware breakpoints"), "{e}");
    }
}
