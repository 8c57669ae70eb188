//! Booting a multiboot guest on KVM inside the test or benchmark process,
//! for measurements that must not include process start-up.

use tandem_core::machine::{ExitStats, RunOutcome};
use tandem_core::pc::{ClockKind, IrqchipKind, Pc, PcConfig};
use tandem_core::vcpu::Vcpu;
use tandem_firmware::multiboot::{load_multiboot, multiboot_entry_state};
use tandem_kvm::{KvmVcpu, KvmVm, KvmVmOptions};

/// A guest loaded and ready to run on KVM.
pub struct KvmGuest {
    pub pc: Pc,
    pub vm: KvmVm,
    pub vcpu: KvmVcpu,
}

impl KvmGuest {
    /// Loads `image` with `cmdline` into a 64 MiB `pc` machine whose
    /// interrupt controllers are Tandem's (`User`) or KVM's (`Kernel`).
    pub fn new(image: &[u8], cmdline: &str, irqchip: IrqchipKind) -> KvmGuest {
        let pc = Pc::new(PcConfig {
            mem_size: 64 << 20,
            vcpus: 1,
            clock: ClockKind::Host,
            irqchip,
            lost_ticks: Default::default(),
            serial_out: Box::new(std::io::sink()),
            devices: Vec::new(),
        })
        .expect("machine");
        let boot = load_multiboot(&pc.machine.mem, image, cmdline, &[]).expect("load");
        let kernel = irqchip == IrqchipKind::Kernel;
        let vm = KvmVm::new(
            pc.machine.mem.clone(),
            &KvmVmOptions {
                vcpus: 1,
                kernel_irqchip: kernel,
            },
        )
        .expect("vm");
        let mut vcpu = vm.create_vcpu(0).expect("vcpu");
        vcpu.set_state(&multiboot_entry_state(&boot))
            .expect("state");
        if let Some(khz) = vcpu.tsc_khz() {
            pc.sync_tsc(&mut vcpu, khz).expect("tsc");
        }
        if kernel {
            pc.machine.isa_irqs.connect(vm.kernel_irq_sink());
        }
        KvmGuest { pc, vm, vcpu }
    }

    /// Runs to the end with the host threads (timer watcher) started.
    pub fn run(&mut self) -> (RunOutcome, ExitStats) {
        self.pc.start_host_threads().expect("threads");
        let mut stats = ExitStats::default();
        let out = self
            .pc
            .machine
            .run_vcpu(&mut self.vcpu, &mut stats)
            .expect("run");
        self.pc.stop_host_threads();
        (out, stats)
    }
}
