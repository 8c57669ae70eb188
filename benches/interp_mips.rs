//! Guest instructions per second on the interpreter: a CPU-bound 64-bit
//! loop with register arithmetic, a memory store and a branch, run until
//! HLT. Throughput is in guest instructions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Vcpu, VcpuExit};
use tandem_decoder::iced_x86::code_asm::*;
use tandem_interp::InterpVcpu;
use tandem_tests::longmode::{long_mode_state, CODE_ADDR};

/// `loop: add eax, ebx; xor edx, eax; mov [rsp-8], rdx; dec ecx; jnz loop;
/// hlt` — five instructions per iteration.
fn code(iterations: u32) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut l = a.create_label();
    a.mov(ecx, iterations).expect("asm");
    a.set_label(&mut l).expect("asm");
    a.add(eax, ebx).expect("asm");
    a.xor(edx, eax).expect("asm");
    a.mov(qword_ptr(rsp - 8), rdx).expect("asm");
    a.dec(ecx).expect("asm");
    a.jnz(l).expect("asm");
    a.hlt().expect("asm");
    a.assemble(CODE_ADDR).expect("assemble")
}

fn run(iterations: u32) -> (Duration, u64) {
    let mem = Arc::new(GuestMemory::new(16 << 20).expect("mem"));
    mem.write(CODE_ADDR, &code(iterations)).expect("code");
    let state = long_mode_state(&mem, CODE_ADDR).expect("tables");
    let mut v = InterpVcpu::new(0, mem);
    v.set_state(&state).expect("state");
    let t = Instant::now();
    while v.run().expect("run") != VcpuExit::Hlt {}
    (t.elapsed(), v.retired())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("interp");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    // 5 instructions per iteration; criterion's iteration = one guest
    // instruction.
    g.throughput(Throughput::Elements(1));
    g.bench_function("register_memory_loop", |b| {
        b.iter_custom(|iters| {
            let (d, retired) = run((iters / 5).max(1) as u32);
            assert!(retired >= iters / 5 * 5);
            d
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
