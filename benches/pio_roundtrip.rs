//! A port-I/O exit round trip through Tandem's KVM run loop (the ladder, the
//! doorbell, the bus dispatch) next to a minimal raw kvm-ioctls loop running
//! the same guest: `out 0x80, al` in a loop, `count` exits, then a debug
//! exit. Both run 64-bit ring-0 code from the same tables.
//!
//! Without /dev/kvm the benchmark prints one SKIP line and does nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use tandem_core::machine::{ExitStats, RunOutcome};
use tandem_core::memory::GuestMemory;
use tandem_core::pc::{ClockKind, IrqchipKind, Pc, PcConfig};
use tandem_core::vcpu::Vcpu;
use tandem_core::StopRequest;
use tandem_kvm::{KvmVm, KvmVmOptions};
use tandem_tests::longmode::{long_mode_state, out_loop_code, CODE_ADDR};

const MEM: u64 = 16 << 20;

fn tandem_loop(count: u64) -> Duration {
    let pc = Pc::new(PcConfig {
        mem_size: MEM,
        vcpus: 1,
        clock: ClockKind::Host,
        irqchip: IrqchipKind::User,
        lost_ticks: Default::default(),
        serial_out: Box::new(std::io::sink()),
        devices: Vec::new(),
    })
    .expect("machine");
    pc.machine
        .mem
        .write(CODE_ADDR, &out_loop_code())
        .expect("code");
    let mut state = long_mode_state(&pc.machine.mem, CODE_ADDR).expect("tables");
    state.regs.rcx = count;
    let vm = KvmVm::new(
        pc.machine.mem.clone(),
        &KvmVmOptions {
            vcpus: 1,
            kernel_irqchip: false,
        },
    )
    .expect("vm");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    vcpu.set_state(&state).expect("state");
    let mut stats = ExitStats::default();
    let t = Instant::now();
    let out = pc.machine.run_vcpu(&mut vcpu, &mut stats).expect("run");
    let d = t.elapsed();
    assert_eq!(out, RunOutcome::Stop(StopRequest::DebugExit(0)));
    assert_eq!(stats.io, count + 1);
    d
}

fn raw_loop(count: u64) -> Duration {
    let mem = Arc::new(GuestMemory::new(MEM).expect("mem"));
    mem.write(CODE_ADDR, &out_loop_code()).expect("code");
    let state = long_mode_state(&mem, CODE_ADDR).expect("tables");
    let kvm = Kvm::new().expect("kvm");
    let vm = kvm.create_vm().expect("vm");
    let _ = vm.set_tss_address(0xfffb_d000);
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: mem.host_base() as u64,
    };
    // SAFETY: the region is the whole anonymous mapping owned by `mem`,
    // which outlives the VM in this function.
    unsafe { vm.set_user_memory_region(region) }.expect("slot");
    let mut vcpu = vm.create_vcpu(0).expect("vcpu");
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .expect("cpuid");
    vcpu.set_cpuid2(&cpuid).expect("set cpuid");
    // Load the same entry state through Tandem's conversions, then drop
    // Tandem out of the loop.
    let mut s = vcpu.get_sregs().expect("sregs");
    let st = &state.sregs;
    let seg = |x: &tandem_core::cpu::Segment| kvm_bindings::kvm_segment {
        base: x.base,
        limit: x.limit,
        selector: x.selector,
        type_: x.type_,
        present: u8::from(x.present),
        dpl: x.dpl,
        db: u8::from(x.db),
        s: u8::from(x.s),
        l: u8::from(x.l),
        g: u8::from(x.g),
        avl: 0,
        unusable: u8::from(x.unusable),
        padding: 0,
    };
    s.cs = seg(&st.cs);
    s.ds = seg(&st.ds);
    s.es = seg(&st.es);
    s.fs = seg(&st.fs);
    s.gs = seg(&st.gs);
    s.ss = seg(&st.ss);
    s.tr = seg(&st.tr);
    s.ldt = seg(&st.ldt);
    s.gdt.base = st.gdt.base;
    s.gdt.limit = st.gdt.limit;
    s.cr0 = st.cr0;
    s.cr3 = st.cr3;
    s.cr4 = st.cr4;
    s.efer = st.efer;
    vcpu.set_sregs(&s).expect("set sregs");
    let regs = kvm_bindings::kvm_regs {
        rip: state.regs.rip,
        rsp: state.regs.rsp,
        rflags: 2,
        rcx: count,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("regs");
    let t = Instant::now();
    let mut n = 0u64;
    loop {
        match vcpu.run().expect("run") {
            VcpuExit::IoOut(0xf4, _) => break,
            VcpuExit::IoOut(_, _) => n += 1,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    let d = t.elapsed();
    assert_eq!(n, count);
    d
}

fn bench(c: &mut Criterion) {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIP (no /dev/kvm): pio_roundtrip");
        return;
    }
    let mut g = c.benchmark_group("pio_exit_roundtrip");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("tandem_run_loop", |b| {
        b.iter_custom(|iters| tandem_loop(iters.max(1)))
    });
    g.bench_function("raw_kvm_ioctls", |b| {
        b.iter_custom(|iters| raw_loop(iters.max(1)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
