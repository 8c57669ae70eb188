//! Interrupts delivered per second on KVM: a guest that EOIs and waits with
//! HLT for the next self-IPI (or LAPIC timer one-shot), with Tandem's device
//! model (`--irqchip user`) next to KVM's in-kernel irqchip
//! (`--irqchip kernel`). Only the run is timed, not the VM's creation.
//!
//! Without /dev/kvm the benchmark prints one SKIP line and does nothing.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tandem_core::machine::RunOutcome;
use tandem_core::pc::IrqchipKind;
use tandem_core::StopRequest;
use tandem_tests::inproc::KvmGuest;

fn run(image: &[u8], n: u64, mode: &str, chip: IrqchipKind) -> Duration {
    let mut g = KvmGuest::new(image, &format!("{n} {mode}"), chip);
    let t = Instant::now();
    let (out, _) = g.run();
    let d = t.elapsed();
    assert_eq!(out, RunOutcome::Stop(StopRequest::DebugExit(0)), "{mode}");
    d
}

fn bench(c: &mut Criterion) {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("SKIP (no /dev/kvm): irq_rate");
        return;
    }
    let image = std::fs::read(tandem_tests::guest("irqbench")).expect("irqbench guest");
    for mode in ["ipi", "timer"] {
        let mut g = c.benchmark_group(format!("irq_rate_{mode}"));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(8));
        g.throughput(Throughput::Elements(1));
        for (name, chip) in [("user", IrqchipKind::User), ("kernel", IrqchipKind::Kernel)] {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| run(&image, iters.max(1), mode, chip))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
