//! `tandem diff`: one guest on the interpreter and on KVM, both on the
//! deterministic clock and with one CPUID, compared by what a guest does to
//! its machine: serial output, exit status, the ordered port and MMIO
//! writes, and the ordered event deliveries (kind, vector, error code and
//! the CS:RIP of the instruction boundary where each was delivered). The
//! first divergence is printed with the events around it on both sides and
//! a disassembly of the guest code there. Status 0: identical, 1: they
//! diverge, 2: an error.
//!
//! `--devices` is the device-state cross-check instead: the guest runs on
//! KVM twice, with Tandem's devices (`--irqchip user`) and with KVM's
//! in-kernel PIC, IOAPIC, LAPIC and PIT (`--irqchip kernel`), and the
//! device registers are compared one by one when the guest ends.
//!
//! The deterministic time of a diff counts exits only (see
//! `tandem_core::clock::GuestProgress::EXITS`): KVM cannot count
//! instructions without single-stepping, so both processors move the clock
//! by one quantum per port-I/O, MMIO or machine-MSR exit and jump to the
//! next timer deadline in HLT. Timers therefore fire at the same exit
//! boundaries on both.
//!
//! `--smp N`: both sides get N vCPUs. The interpreter's take turns on one
//! thread (deterministic); KVM's are threads, so the order of events across
//! vCPUs is the host scheduler's. Each vCPU's ordered writes and deliveries
//! are therefore compared on their own (trace events carry their vCPU), the
//! fixed IPIs it received from other vCPUs as a set, and the serial output
//! and end status as with one vCPU.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_core::clock::GuestProgress;
use tandem_core::cpu::{cr0, EventKind, Sregs, VcpuState};
use tandem_core::machine::{ExitStats, GuestContext, RunOutcome, Turn};
use tandem_core::pc::{ClockKind, IrqchipKind, LostTickPolicy, Pc, PcConfig};
use tandem_core::trace::{SharedBuf, TraceBuffer, TraceEvent, TraceRecord};
use tandem_core::vcpu::Vcpu;
use tandem_firmware::acpi::{write_acpi, AcpiConfig};
use tandem_firmware::mptable::{write_mptable, MPTABLE_ADDR};
use tandem_firmware::multiboot::{load_multiboot, multiboot_entry_state};
use tandem_kvm::{DeviceRegister, KvmVm, KvmVmOptions};

/// The environment variable that replaces the KVM side's command line
/// (tests plant a divergence with it).
pub const KVM_APPEND_ENV: &str = "TANDEM_DIFF_KVM_APPEND";

/// What `tandem diff` was given.
#[derive(Debug, Clone)]
pub struct DiffArgs {
    pub guest: PathBuf,
    pub append: String,
    pub mem: u64,
    /// Turns of the run loop (about one exit each) per side at most.
    pub max_steps: Option<u64>,
    /// Wall-clock limit per side (a guest spinning without exits on KVM
    /// would otherwise never return).
    pub timeout: Duration,
    /// Events shown before and after the divergence.
    pub context: usize,
    /// The device-state cross-check instead of the processor diff.
    pub devices: bool,
    /// Documented divergences count as divergences (status 1).
    pub strict: bool,
    /// vCPUs on each side (`--smp`): the BSP starts at the entry, the
    /// others wait for INIT / SIPI.
    pub smp: u32,
    /// Paced serial input for COM1 (`--input`).
    pub input: Option<String>,
}

/// Runs `tandem diff` and returns the process status: 0 identical, 1
/// diverged, 2 error (printed on stderr).
pub fn diff(args: &DiffArgs) -> i32 {
    let r = if args.devices {
        devices(args)
    } else {
        processors(args)
    };
    match r {
        Ok(status) => status,
        Err(e) => {
            eprintln!("tandem diff: {e:#}");
            2
        }
    }
}

// ----- one side ---------------------------------------------------------------

/// What a side did, in the order it did it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Obs {
    PortWrite {
        port: u16,
        size: u8,
        value: u64,
    },
    MmioWrite {
        addr: u64,
        len: u8,
        value: u64,
    },
    Delivery {
        kind: EventKind,
        vector: u8,
        error_code: Option<u32>,
        cs: u16,
        rip: u64,
    },
}

impl Obs {
    fn describe(&self) -> String {
        match self {
            Obs::PortWrite { port, size, value } => {
                let mut s = format!("port write {port:#06x}/{size} = {value:#x}");
                if *port == 0x3f8 {
                    if let Some(c) = char::from_u32(*value as u32).filter(|c| !c.is_control()) {
                        s.push_str(&format!(" ('{c}')"));
                    } else if *value == 0x0a {
                        s.push_str(" ('\\n')");
                    }
                }
                s
            }
            Obs::MmioWrite { addr, len, value } => {
                format!("MMIO write {addr:#x}/{len} = {value:#x}")
            }
            Obs::Delivery {
                kind,
                vector,
                error_code,
                cs,
                rip,
            } => {
                let mut s = format!("delivery of {kind:?} vector {vector:#04x}");
                if let Some(e) = error_code {
                    s.push_str(&format!(" error code {e:#x}"));
                }
                s.push_str(&format!(" at {cs:04x}:{rip:016x}"));
                s
            }
        }
    }
}

/// An observation with where it happened.
#[derive(Debug, Clone)]
struct Stamped {
    obs: Obs,
    /// The vCPU that made it.
    cpu: u32,
    /// Index of its trace record in the side's records.
    record: usize,
    ns: u64,
    /// The guest's registers after the turn it happened in.
    ctx: Option<GuestContext>,
}

/// How a side's run ended.
#[derive(Debug, Clone)]
enum End {
    Outcome(RunOutcome),
    Error(String),
    StepLimit(u64),
    Timeout(Duration),
}

impl End {
    fn describe(&self) -> String {
        match self {
            End::Outcome(o) => format!("{} (status {})", outcome_name(o), o.exit_status()),
            End::Error(e) => format!("error: {e}"),
            End::StepLimit(n) => format!("stopped after {n} steps (--max-steps)"),
            End::Timeout(d) => format!("stopped after {:.0} s (--timeout)", d.as_secs_f64()),
        }
    }

    fn status(&self) -> Option<i32> {
        match self {
            End::Outcome(o) => Some(o.exit_status()),
            _ => None,
        }
    }
}

fn outcome_name(o: &RunOutcome) -> String {
    match o {
        RunOutcome::Stop(r) => format!("{r:?}"),
        RunOutcome::TripleFault(c) => format!("triple fault at {}", c.cs_rip()),
        RunOutcome::DeadHalt(c) => format!("halt nothing can end at {}", c.cs_rip()),
    }
}

struct Side {
    name: &'static str,
    pc: Pc,
    serial: SharedBuf,
    records: Vec<TraceRecord>,
    obs: Vec<Stamped>,
    end: End,
    /// The registers when the run ended.
    last: Option<GuestContext>,
}

/// Which processor and devices a side runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Interp,
    Kvm { kernel_irqchip: bool },
}

/// Builds the machine for a side: deterministic clock counting exits, the
/// guest loaded as `tandem run` loads it, serial output captured.
fn build(
    args: &DiffArgs,
    append: &str,
    irqchip: IrqchipKind,
) -> Result<(Pc, SharedBuf, VcpuState)> {
    let image = std::fs::read(&args.guest)
        .with_context(|| format!("cannot read guest {}", args.guest.display()))?;
    if image.is_empty() {
        bail!("guest {} is empty", args.guest.display());
    }
    let serial = SharedBuf::default();
    let pc = Pc::new(PcConfig {
        mem_size: args.mem,
        vcpus: args.smp.max(1),
        clock: ClockKind::Virtual,
        irqchip,
        lost_ticks: LostTickPolicy::Discard,
        serial_out: Box::new(serial.clone()),
        devices: Vec::new(),
    })
    .context("cannot build the machine")?;
    if let Some(v) = &pc.virtual_clock {
        v.set_progress(GuestProgress::EXITS);
    }
    let mem = &pc.machine.mem;
    let n = args.smp.max(1);
    write_acpi(mem, &AcpiConfig::new(n)).context("cannot write the ACPI tables")?;
    write_mptable(mem, n, MPTABLE_ADDR).context("cannot write the MP table")?;
    let boot = load_multiboot(mem, &image, append, &[])
        .with_context(|| format!("cannot load {}", args.guest.display()))?;
    if let Some(text) = &args.input {
        let mut uart = pc.serial.lock().unwrap_or_else(|p| p.into_inner());
        uart.set_paced_input(true);
        let taken = uart.push_input(text.as_bytes());
        if taken < text.len() {
            bail!(
                "--input: {} bytes, the UART's input queue takes {taken}",
                text.len()
            );
        }
    }
    Ok((pc, serial, multiboot_entry_state(&boot)))
}

fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Runs one side to its end. `kvm_regs` receives KVM's in-kernel device
/// registers at the end (kernel irqchip only).
fn run_side(
    args: &DiffArgs,
    kind: Kind,
    append: &str,
    kvm_regs: Option<&mut Vec<DeviceRegister>>,
) -> Result<Side> {
    let irqchip = match kind {
        Kind::Kvm {
            kernel_irqchip: true,
        } => IrqchipKind::Kernel,
        _ => IrqchipKind::User,
    };
    let (pc, serial, state) = build(args, append, irqchip)?;
    let buf = if irqchip == IrqchipKind::User {
        Some(pc.tracer().start_memory())
    } else {
        None
    };
    let (name, records, obs, end, last) = match kind {
        Kind::Interp => {
            let n = args.smp.max(1);
            let cpuid = Arc::new(
                tandem_kvm::offered_cpuid(n)
                    .context("cannot read the CPUID KVM offers (the interpreter gets the same)")?,
            );
            let mut vcpus: Vec<tandem_interp::InterpVcpu> = (0..n)
                .map(|id| {
                    let mut v = tandem_interp::InterpVcpu::new(id, pc.machine.mem.clone());
                    v.set_cpuid(cpuid.clone());
                    v
                })
                .collect();
            // The BSP starts at the entry; the others wait for INIT / SIPI.
            vcpus[0]
                .set_state(&state)
                .context("cannot load the entry state into the interpreter")?;
            let (r, o, e, l) = if let [vcpu] = vcpus.as_mut_slice() {
                drive(&pc, vcpu, buf.as_ref(), args)
            } else {
                let mut refs: Vec<&mut dyn Vcpu> =
                    vcpus.iter_mut().map(|v| v as &mut dyn Vcpu).collect();
                drive_round_robin(&pc, &mut refs, buf.as_ref(), args)
            };
            ("interp", r, o, e, l)
        }
        Kind::Kvm { kernel_irqchip } => {
            let n = args.smp.max(1);
            let vm = KvmVm::new(
                pc.machine.mem.clone(),
                &KvmVmOptions {
                    vcpus: n,
                    kernel_irqchip,
                },
            )
            .context("cannot create the KVM VM")?;
            let mut vcpus = Vec::new();
            for id in 0..n {
                let mut v = vm
                    .create_vcpu(id)
                    .with_context(|| format!("cannot create vCPU {id}"))?;
                // The BSP starts at the entry; the others wait for INIT /
                // SIPI in the run loop.
                if id == 0 {
                    v.set_state(&state)
                        .context("cannot load the entry state into KVM")?;
                }
                if let Some(khz) = v.tsc_khz() {
                    pc.sync_tsc(&mut v, khz)
                        .context("cannot set the guest TSC")?;
                }
                vcpus.push(v);
            }
            if kernel_irqchip {
                pc.machine.isa_irqs.connect(vm.kernel_irq_sink());
            }
            let _ = pc
                .machine
                .fallback
                .set(Arc::new(tandem_interp::InterpFallback::with_cpuid(
                    Arc::new(vm.cpuid_table().clone()),
                )));
            let (r, o, e, l) = if let [vcpu] = vcpus.as_mut_slice() {
                drive(&pc, vcpu, buf.as_ref(), args)
            } else {
                drive_threads(&pc, &mut vcpus, buf.as_ref(), args)
            };
            if let Some(out) = kvm_regs {
                if kernel_irqchip {
                    out.extend(
                        vm.kernel_irqchip_registers()
                            .context("cannot read KVM's irqchip")?,
                    );
                    if let Some(vcpu) = vcpus.first() {
                        out.extend(
                            vcpu.kernel_lapic_registers()
                                .context("cannot read KVM's LAPIC")?,
                        );
                    }
                }
            }
            ("kvm", r, o, e, l)
        }
    };
    let _ = pc.finish_trace();
    Ok(Side {
        name,
        pc,
        serial,
        records,
        obs,
        end,
        last,
    })
}

/// The observations of a run, taken from the trace as it grows.
#[derive(Default)]
struct Collector {
    records: Vec<TraceRecord>,
    obs: Vec<Stamped>,
    /// Per vCPU, the injection whose delivery is not recorded yet.
    pending: std::collections::BTreeMap<u32, Obs>,
}

impl Collector {
    /// Takes the records `buf` gathered since the last call. `turned`: the
    /// vCPU whose turn made them, whose registers `ctx` reads (once, when
    /// it made an observation).
    fn take(
        &mut self,
        buf: &TraceBuffer,
        turned: Option<u32>,
        mut ctx: impl FnMut() -> Option<GuestContext>,
    ) {
        let fresh: Vec<TraceRecord> =
            std::mem::take(&mut *buf.lock().unwrap_or_else(|p| p.into_inner()));
        let mut regs: Option<Option<GuestContext>> = None;
        for rec in fresh {
            let cpu = rec.event.cpu().unwrap_or(0);
            let o = match &rec.event {
                TraceEvent::PortWrite {
                    port, size, value, ..
                } => Some(Obs::PortWrite {
                    port: *port,
                    size: *size,
                    value: *value,
                }),
                TraceEvent::MmioWrite {
                    addr, len, value, ..
                } => Some(Obs::MmioWrite {
                    addr: *addr,
                    len: *len,
                    value: *value,
                }),
                TraceEvent::Inject {
                    kind,
                    vector,
                    error_code,
                    cs,
                    rip,
                    ..
                } => {
                    self.pending.insert(
                        cpu,
                        Obs::Delivery {
                            kind: *kind,
                            vector: *vector,
                            error_code: *error_code,
                            cs: *cs,
                            rip: *rip,
                        },
                    );
                    None
                }
                // Delivered: the processor ran after the injection.
                TraceEvent::Deliver { .. } => self.pending.remove(&cpu),
                _ => None,
            };
            if let Some(o) = o {
                let ctx = if turned == Some(cpu) {
                    regs.get_or_insert_with(&mut ctx).clone()
                } else {
                    None
                };
                self.obs.push(Stamped {
                    obs: o,
                    cpu,
                    record: self.records.len(),
                    ns: rec.ns,
                    ctx,
                });
            }
            self.records.push(rec);
        }
    }
}

/// A thread that ends a run that is over its time: after the timeout (never
/// before, so it cannot change what the guest sees in a run that
/// finishes) it sets `expired` and calls `stop`.
fn watchdog(
    timeout: Duration,
    done: Arc<AtomicBool>,
    expired: Arc<AtomicBool>,
    stop: impl Fn() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tandem-diff-watchdog".into())
        .spawn(move || {
            let start = Instant::now();
            while !done.load(Ordering::SeqCst) {
                if start.elapsed() >= timeout {
                    expired.store(true, Ordering::SeqCst);
                    stop();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .ok()
}

/// The run loop, one turn at a time, collecting the trace as it goes.
fn drive(
    pc: &Pc,
    vcpu: &mut dyn Vcpu,
    buf: Option<&TraceBuffer>,
    args: &DiffArgs,
) -> (Vec<TraceRecord>, Vec<Stamped>, End, Option<GuestContext>) {
    let machine = &pc.machine;
    let mut col = Collector::default();
    let mut stats = ExitStats::default();
    let mut l = machine.vcpu_loop(vcpu);
    let done = Arc::new(AtomicBool::new(false));
    let expired = Arc::new(AtomicBool::new(false));
    let kicker = vcpu.kicker();
    let dog = watchdog(args.timeout, done.clone(), expired.clone(), move || {
        kicker.kick()
    });
    let max = args.max_steps.unwrap_or(u64::MAX);
    let mut steps = 0u64;
    let end = loop {
        if steps >= max {
            break End::StepLimit(steps);
        }
        if expired.load(Ordering::SeqCst) {
            break End::Timeout(args.timeout);
        }
        steps += 1;
        let turn = machine.turn(&mut l, vcpu, &mut stats, true);
        if let Some(b) = buf {
            let id = vcpu.id();
            col.take(b, Some(id), || guest_context(vcpu));
        }
        match turn {
            Ok(Turn::Done(o)) => break End::Outcome(o),
            Ok(_) => {}
            Err(e) => break End::Error(e.to_string()),
        }
    };
    done.store(true, Ordering::SeqCst);
    if let Some(w) = dog {
        let _ = w.join();
    }
    let last = guest_context(vcpu);
    (col.records, col.obs, end, last)
}

/// The interpreter with several vCPUs: on this thread, in index order, a
/// slice each as `Machine::run_round_robin` takes them (deterministic),
/// collecting the trace after every turn. The first vCPU whose run ends
/// ends it.
fn drive_round_robin(
    pc: &Pc,
    vcpus: &mut [&mut dyn Vcpu],
    buf: Option<&TraceBuffer>,
    args: &DiffArgs,
) -> (Vec<TraceRecord>, Vec<Stamped>, End, Option<GuestContext>) {
    let machine = &pc.machine;
    let mut col = Collector::default();
    let mut stats = ExitStats::default();
    let mut loops: Vec<_> = vcpus
        .iter_mut()
        .map(|v| machine.vcpu_loop(&mut **v))
        .collect();
    let deadline = Instant::now() + args.timeout;
    let max = args.max_steps.unwrap_or(u64::MAX);
    let mut steps = 0u64;
    let mut ended = 0usize;
    let end = 'run: loop {
        let mut all_idle = true;
        let mut earliest: Option<u64> = None;
        for (k, (l, v)) in loops.iter_mut().zip(vcpus.iter_mut()).enumerate() {
            for _ in 0..tandem_core::machine::ROUND_ROBIN_TURNS {
                if steps >= max {
                    break 'run End::StepLimit(steps);
                }
                if steps % 256 == 0 && Instant::now() >= deadline {
                    break 'run End::Timeout(args.timeout);
                }
                steps += 1;
                let turn = machine.turn(l, &mut **v, &mut stats, false);
                if let Some(b) = buf {
                    let id = v.id();
                    col.take(b, Some(id), || guest_context(&mut **v));
                }
                match turn {
                    Ok(Turn::Done(o)) => {
                        ended = k;
                        break 'run End::Outcome(o);
                    }
                    Ok(Turn::Idle { deadline }) => {
                        if let Some(d) = deadline {
                            earliest = Some(earliest.map_or(d, |e| e.min(d)));
                        }
                        break;
                    }
                    Ok(Turn::Ran) => {
                        all_idle = false;
                        if l.kicked() {
                            break;
                        }
                    }
                    Err(e) => {
                        ended = k;
                        break 'run End::Error(e.to_string());
                    }
                }
            }
        }
        if all_idle {
            // Every vCPU waits: the virtual clock jumps to the next timer
            // deadline; without one nothing can end the waits.
            match earliest {
                Some(d) if machine.clock.warp_to(d) => {}
                _ => {
                    let ctx = vcpus.first_mut().and_then(|v| guest_context(&mut **v));
                    match ctx {
                        Some(c) => break End::Outcome(RunOutcome::DeadHalt(Box::new(c))),
                        None => break End::Error("every vCPU waits for good".into()),
                    }
                }
            }
        }
    };
    let last = vcpus.get_mut(ended).and_then(|v| guest_context(&mut **v));
    (col.records, col.obs, end, last)
}

/// KVM with several vCPUs: a thread each (the BSP on this one), as `tandem
/// run` runs them, so the interleaving across vCPUs is the host
/// scheduler's; the trace is taken when the run is over. The first vCPU
/// whose run ends stops the others and decides the end.
fn drive_threads(
    pc: &Pc,
    vcpus: &mut [tandem_kvm::KvmVcpu],
    buf: Option<&TraceBuffer>,
    args: &DiffArgs,
) -> (Vec<TraceRecord>, Vec<Stamped>, End, Option<GuestContext>) {
    let machine = &pc.machine;
    let done = Arc::new(AtomicBool::new(false));
    let expired = Arc::new(AtomicBool::new(false));
    let dog = {
        let (control, bells) = (machine.control.clone(), machine.doorbells.clone());
        watchdog(args.timeout, done.clone(), expired.clone(), move || {
            control.request(tandem_core::StopRequest::Timeout);
            for b in &bells {
                b.ring();
            }
        })
    };
    let first: std::sync::Mutex<Option<(u32, End)>> = std::sync::Mutex::new(None);
    let max = args.max_steps.unwrap_or(u64::MAX);
    let run = |v: &mut tandem_kvm::KvmVcpu| {
        let mut stats = ExitStats::default();
        let mut l = machine.vcpu_loop(v);
        let mut steps = 0u64;
        let end = loop {
            if steps >= max {
                break End::StepLimit(steps);
            }
            steps += 1;
            match machine.turn(&mut l, v, &mut stats, true) {
                Ok(Turn::Done(o)) => break End::Outcome(o),
                Ok(_) => {}
                Err(e) => break End::Error(e.to_string()),
            }
        };
        let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some((v.id(), end));
        }
        drop(f);
        // The others stop at their next turn (a stop the guest requested
        // first stays the one reported).
        machine.control.request(tandem_core::StopRequest::Poweroff);
        for b in &machine.doorbells {
            b.ring();
        }
    };
    if let Some((bsp, aps)) = vcpus.split_first_mut() {
        std::thread::scope(|scope| {
            let run = &run;
            for v in aps.iter_mut() {
                scope.spawn(move || run(v));
            }
            run(bsp);
        });
    }
    done.store(true, Ordering::SeqCst);
    if let Some(w) = dog {
        let _ = w.join();
    }
    let (id, end) = first
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .unwrap_or((0, End::Error("no vCPU ran".into())));
    let end = if expired.load(Ordering::SeqCst) {
        End::Timeout(args.timeout)
    } else {
        end
    };
    let mut col = Collector::default();
    if let Some(b) = buf {
        col.take(b, None, || None);
    }
    let last = vcpus.get_mut(id as usize).and_then(|v| guest_context(v));
    (col.records, col.obs, end, last)
}

fn guest_context(vcpu: &mut dyn Vcpu) -> Option<GuestContext> {
    Some(GuestContext {
        regs: vcpu.get_regs().ok()?,
        sregs: vcpu.get_sregs().ok()?,
    })
}

// ----- the processor diff -----------------------------------------------------

/// A divergence a documented rule explains (README, "tandem diff").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// PVM answers `int n` at ring 3 with #UD, without an exit.
    PvmRing3Int,
    /// KVM's guest TSC counts host time, not the deterministic clock.
    KvmTsc,
    /// PVM's interrupt-window exits come late: KVM delivers at a later
    /// exit than the interpreter's window exit.
    PvmLateWindow,
    /// KVM queues an NMI handed over while NMIs are blocked and delivers
    /// it after the IRET, where the run loop cannot see it.
    KvmNmiQueued,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::PvmRing3Int => "pvm-ring3-int",
            Rule::KvmTsc => "kvm-tsc",
            Rule::PvmLateWindow => "pvm-late-window",
            Rule::KvmNmiQueued => "kvm-nmi-queued",
        }
    }

    fn why(self) -> &'static str {
        match self {
            Rule::PvmRing3Int => {
                "PVM answers `int n` at ring 3 with #UD in the guest, without an exit \
                 (DEVELOPERS.md); the guest's outputs differ from here on, so the comparison \
                 stops"
            }
            Rule::KvmTsc => {
                "KVM's guest TSC counts the host's time (PVM ignores KVM_SET_MSRS(IA32_TSC)), \
                 not the deterministic clock: a TSC deadline or a check against RDTSC falls \
                 at another point of the run on KVM"
            }
            Rule::PvmLateWindow => {
                "PVM's interrupt-window exits come late (DEVELOPERS.md): the interpreter \
                 delivered at its interrupt-window exit, KVM at a later exit"
            }
            Rule::KvmNmiQueued => {
                "KVM takes an NMI while NMIs are blocked and delivers it itself after the \
                 IRET; the run loop records it where it handed it over, the interpreter \
                 where it was delivered"
            }
        }
    }
}

fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// A rule for outputs that differ for good: the first check that failed on
/// KVM only (after the first differing serial line) is one the rules name.
fn explain_serial(interp: &str, kvm: &str) -> Option<Rule> {
    let a: Vec<&str> = interp.lines().collect();
    let b: Vec<&str> = kvm.lines().collect();
    let first = a.iter().zip(&b).position(|(x, y)| x != y)?;
    let fail = b
        .iter()
        .skip(first)
        .find_map(|l| l.strip_prefix("FAIL: "))?;
    let check = fail.split(':').next().unwrap_or(fail);
    let passed_on_interp = a.iter().any(|l| {
        l.strip_prefix("PASS: ")
            .is_some_and(|p| p.starts_with(check))
    });
    if !passed_on_interp {
        return None;
    }
    if host_is_pvm()
        && (fail.starts_with("int $0x80 from ring 3") || fail.starts_with("int $0x82 from ring 3"))
    {
        return Some(Rule::PvmRing3Int);
    }
    fail.contains("TSC").then_some(Rule::KvmTsc)
}

/// How far ahead the same delivery is looked for on the other side.
const SHIFT_WINDOW: usize = 64;

/// A delivery at observation `ei` of side `early` that the other side (`late`) made
/// at a later boundary, at its observation `k`, with a rule that explains
/// it; `None` if there is no such delivery or no rule.
fn explain_shift(
    early: &Side,
    ei: usize,
    late: &Side,
    lj: usize,
    skip_late: &std::collections::HashSet<usize>,
) -> Option<(usize, Rule)> {
    let Obs::Delivery { kind, vector, .. } = early.obs.get(ei)?.obs else {
        return None;
    };
    let k = (lj..(lj + SHIFT_WINDOW).min(late.obs.len()))
        .filter(|k| !skip_late.contains(k))
        .find(|&k| matches!(late.obs[k].obs, Obs::Delivery { kind: k2, vector: v2, .. } if k2 == kind && v2 == vector))?;
    let interp_early = early.name == "interp";
    // The record before the delivery's injection on the early side.
    let rec = early.obs[ei].record;
    let window_exit = early.records[..rec]
        .iter()
        .rev()
        .find_map(|r| match &r.event {
            TraceEvent::Exit { reason, .. } => Some(reason.as_str()),
            _ => None,
        })
        == Some("interrupt window");
    let kvm = if interp_early { late } else { early };
    let kvm_upto = if interp_early {
        late.obs[k].record
    } else {
        rec
    };
    let tsc_deadline_armed = kvm.records[..kvm_upto].iter().any(|r| {
        matches!(&r.event, TraceEvent::Exit { reason, .. } if reason.starts_with("wrmsr 0x6e0"))
    });
    let timer_vector = early.records[..rec].iter().rev().take(64).any(|r| {
        matches!(r.event, TraceEvent::LapicLvt { lvt: tandem_core::trace::Lvt::Timer, vector: v, .. } if v == vector)
    }) || late.records[..late.obs[k].record].iter().rev().take(64).any(|r| {
        matches!(r.event, TraceEvent::LapicLvt { lvt: tandem_core::trace::Lvt::Timer, vector: v, .. } if v == vector)
    });
    let rule = if kind == EventKind::Nmi && !interp_early {
        Rule::KvmNmiQueued
    } else if tsc_deadline_armed && timer_vector {
        Rule::KvmTsc
    } else if interp_early && window_exit && kind == EventKind::External && host_is_pvm() {
        Rule::PvmLateWindow
    } else {
        return None;
    };
    Some((k, rule))
}

/// One place where the sides differ.
struct Divergence {
    /// Observation indexes on the interpreter and on KVM.
    i: usize,
    j: usize,
    rule: Option<Rule>,
}

/// Whether the KVM side had armed a TSC-deadline timer (WRMSR
/// IA32_TSC_DEADLINE with a deadline) before its observation `j`.
fn tsc_deadline_armed(kvm: &Side, j: usize) -> bool {
    let upto = kvm.obs.get(j).map_or(kvm.records.len(), |o| o.record);
    kvm.records[..upto].iter().any(|r| {
        matches!(&r.event, TraceEvent::Exit { reason, .. }
            if reason.starts_with("wrmsr 0x6e0") && !reason.ends_with("= 0x0"))
    })
}

/// The outcome of [`compare`].
struct Comparison {
    known: Vec<Divergence>,
    /// Writes to the POST port (0x80, ignored by the machine) of the
    /// guest's wait loops that one side made more often next to a known
    /// late delivery.
    absorbed_post_writes: usize,
    unexplained: Option<Divergence>,
    /// The comparison stopped at a known divergence after which the
    /// guest's outputs differ for good.
    stopped: bool,
}

/// Walks both observation streams. A delivery one side made at a later
/// boundary for a documented reason is noted and the streams are
/// re-aligned (the interrupted code's writes and the handler's swap
/// places); the comparison goes on.
fn compare(a: &Side, b: &Side) -> Comparison {
    let mut c = Comparison {
        known: Vec::new(),
        absorbed_post_writes: 0,
        unexplained: None,
        stopped: false,
    };
    let mut skip_a = std::collections::HashSet::new();
    let mut skip_b = std::collections::HashSet::new();
    let (mut i, mut j) = (0, 0);
    // Observation indexes of the last known late delivery.
    let mut last_shift: Option<(usize, usize)> = None;
    let is_post = |s: &Side, k: usize| {
        matches!(
            s.obs.get(k).map(|o| &o.obs),
            Some(Obs::PortWrite { port: 0x80, .. })
        )
    };
    let same = |x: usize, y: usize| match (a.obs.get(x), b.obs.get(y)) {
        (Some(p), Some(q)) => p.obs == q.obs,
        _ => false,
    };
    loop {
        while skip_a.contains(&i) {
            i += 1;
        }
        while skip_b.contains(&j) {
            j += 1;
        }
        if a.obs.get(i).is_none() && b.obs.get(j).is_none() {
            return c;
        }
        if same(i, j) {
            i += 1;
            j += 1;
            continue;
        }
        if let Some((k, rule)) = explain_shift(a, i, b, j, &skip_b) {
            c.known.push(Divergence {
                i,
                j: k,
                rule: Some(rule),
            });
            last_shift = Some((i, k));
            // interp: [D, H.., P..]; kvm: [P.., D, H..]: find H's length.
            let p = k - j;
            let h = (0..SHIFT_WINDOW).find(|&h| {
                (0..h).all(|n| same(i + 1 + n, k + 1 + n))
                    && (0..p).all(|n| same(i + 1 + h + n, j + n))
            });
            match h {
                Some(h) if (j..k).all(|n| !skip_b.contains(&n)) => {
                    i += 1 + h + p;
                    j = k + 1 + h;
                }
                _ => {
                    skip_b.insert(k);
                    i += 1;
                }
            }
            continue;
        }
        if let Some((k, rule)) = explain_shift(b, j, a, i, &skip_a) {
            c.known.push(Divergence {
                i: k,
                j,
                rule: Some(rule),
            });
            last_shift = Some((k, j));
            skip_a.insert(k);
            j += 1;
            continue;
        }
        // A wait loop that went round once more or less next to a late
        // delivery (the guests wait with `sti; out 0x80; cli`).
        if let Some((si, sj)) = last_shift {
            if is_post(a, i) && i.abs_diff(si) <= SHIFT_WINDOW {
                c.absorbed_post_writes += 1;
                i += 1;
                continue;
            }
            if is_post(b, j) && j.abs_diff(sj) <= SHIFT_WINDOW {
                c.absorbed_post_writes += 1;
                j += 1;
                continue;
            }
        }
        let writes = |s: &Side, k: usize| {
            matches!(
                s.obs.get(k).map(|o| &o.obs),
                Some(Obs::PortWrite { .. } | Obs::MmioWrite { .. })
            )
        };
        let serial = if writes(a, i) && writes(b, j) {
            explain_serial(&a.serial.text(), &b.serial.text())
        } else {
            None
        };
        let rule = serial.or_else(|| tsc_deadline_armed(b, j).then_some(Rule::KvmTsc));
        let d = Divergence { i, j, rule };
        if rule.is_some() {
            c.known.push(d);
            c.stopped = true;
        } else {
            c.unexplained = Some(d);
        }
        return c;
    }
}

fn processors(args: &DiffArgs) -> Result<i32> {
    if !kvm_opens() {
        bail!(
            "/dev/kvm does not open: `tandem diff` runs the guest on KVM and on the \
             interpreter and needs both"
        );
    }
    let kvm_append = std::env::var(KVM_APPEND_ENV).unwrap_or_else(|_| args.append.clone());
    let a = run_side(args, Kind::Interp, &args.append, None)?;
    let b = run_side(
        args,
        Kind::Kvm {
            kernel_irqchip: false,
        },
        &kvm_append,
        None,
    )?;
    let guest = args.guest.display();
    let (sa, sb) = (a.serial.text(), b.serial.text());
    let smp = args.smp > 1;
    // Several vCPUs: each one's stream on its own (KVM's vCPUs are
    // threads, so the interleaving across vCPUs is the host scheduler's).
    let (mut a, mut b) = (a, b);
    let all_a = (std::mem::take(&mut a.records), std::mem::take(&mut a.obs));
    let all_b = (std::mem::take(&mut b.records), std::mem::take(&mut b.obs));
    let cpus: Vec<u32> = if smp {
        (0..args.smp).collect()
    } else {
        vec![0]
    };
    // Returns the IPIs from other vCPUs that were delivered, set aside.
    let view = |a: &mut Side, b: &mut Side, cpu: u32| {
        if smp {
            let ia;
            let ib;
            (a.records, a.obs, ia) = select_cpu(&all_a.0, &all_a.1, cpu);
            (b.records, b.obs, ib) = select_cpu(&all_b.0, &all_b.1, cpu);
            (ia, ib)
        } else {
            (a.records, a.obs) = all_a.clone();
            (b.records, b.obs) = all_b.clone();
            Default::default()
        }
    };
    let mut cmps = Vec::new();
    let mut counts = Vec::new();
    let mut ipis = Vec::new();
    for &cpu in &cpus {
        let (ia, ib) = view(&mut a, &mut b, cpu);
        cmps.push(compare(&a, &b));
        ipis.push((ia, ib));
        let deliveries = a
            .obs
            .iter()
            .filter(|o| matches!(o.obs, Obs::Delivery { .. }))
            .count();
        counts.push((a.obs.len() - deliveries, deliveries));
    }
    let known: usize = cmps.iter().map(|c| c.known.len()).sum();
    let unexplained = cmps
        .iter()
        .zip(&ipis)
        .position(|(c, (ia, ib))| c.unexplained.is_some() || ia != ib);
    let stopped = cmps.iter().any(|c| c.stopped);
    let status_same = a.end.status() == b.end.status() && a.end.status().is_some();
    let serial_same = sa == sb;
    let clean = unexplained.is_none() && (stopped || (serial_same && status_same));
    let per_cpu = || {
        cpus.iter()
            .zip(&counts)
            .zip(&ipis)
            .map(|((cpu, (w, d)), (ia, _))| {
                let i: u64 = ia.values().sum();
                format!(
                    "vCPU {cpu}: {w} writes, {} deliveries ({i} of them IPIs from other vCPUs)",
                    *d as u64 + i
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    if known == 0 && clean {
        if smp {
            println!(
                "tandem diff: {guest}: identical: {} vCPUs, each compared on its own ({}), {} \
                 bytes of serial output, {} on both",
                cpus.len(),
                per_cpu(),
                sa.len(),
                a.end.describe()
            );
        } else {
            println!(
                "tandem diff: {guest}: identical: {} port / MMIO writes and deliveries, {} bytes \
                 of serial output, {} on both",
                all_a.1.len(),
                sa.len(),
                a.end.describe()
            );
        }
        return Ok(0);
    }
    if clean {
        println!("tandem diff: {guest}: identical but for {known} documented divergence(s)");
    } else if let (true, Some(k)) = (smp, unexplained) {
        println!("tandem diff: {guest}: the processors diverge (vCPU {k} first)");
    } else {
        println!("tandem diff: {guest}: the processors diverge");
    }
    if smp {
        println!("per vCPU on interp: {}", per_cpu());
    }
    let mut rules_seen = Vec::new();
    for (&cpu, cmp) in cpus.iter().zip(&cmps) {
        if cmp.known.is_empty() && cmp.unexplained.is_none() {
            continue;
        }
        view(&mut a, &mut b, cpu);
        let on = if smp {
            format!(" on vCPU {cpu}")
        } else {
            String::new()
        };
        for d in &cmp.known {
            let rule = d.rule.unwrap_or(Rule::KvmTsc);
            println!(
                "known divergence (rule {}){on}: interp #{}: {}; kvm #{}: {}",
                rule.name(),
                d.i,
                a.obs
                    .get(d.i)
                    .map_or("nothing".into(), |o| o.obs.describe()),
                d.j,
                b.obs
                    .get(d.j)
                    .map_or("nothing".into(), |o| o.obs.describe()),
            );
            if !rules_seen.contains(&rule) {
                rules_seen.push(rule);
            }
        }
        if cmp.absorbed_post_writes > 0 {
            println!(
                "  next to those{on}: {} writes to the POST port 0x80 (ignored by the machine) \
                 of the guest's wait loops on one side only, from the same late deliveries",
                cmp.absorbed_post_writes
            );
        }
    }
    for r in &rules_seen {
        println!("  rule {}: {}", r.name(), r.why());
    }
    for ((&cpu, cmp), (ia, ib)) in cpus.iter().zip(&cmps).zip(&ipis) {
        let on = if smp {
            format!(" on vCPU {cpu}")
        } else {
            String::new()
        };
        if ia != ib {
            let set = |m: &std::collections::BTreeMap<u8, u64>| {
                m.iter()
                    .map(|(v, n)| format!("{v:#04x} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "vCPU {cpu} diverges: the IPIs from other vCPUs it took differ: interp [{}]; kvm \
                 [{}]",
                set(ia),
                set(ib)
            );
        }
        if cmp.stopped {
            println!(
                "  the guest's outputs differ from the last one on{on}: the comparison stops there"
            );
        }
        if let Some(d) = &cmp.unexplained {
            view(&mut a, &mut b, cpu);
            if smp {
                println!("vCPU {cpu} diverges:");
            }
            report_observation(&a, &b, d.i, d.j, args.context);
            println!("no documented rule explains this divergence");
        }
    }
    if !serial_same {
        let at = sa
            .bytes()
            .zip(sb.bytes())
            .position(|(x, y)| x != y)
            .unwrap_or(sa.len().min(sb.len()));
        // Bytes, not `str` slicing: `at` need not be a character boundary.
        let line = |s: &str| {
            let b = s.as_bytes();
            let head = b.get(..at.min(b.len())).unwrap_or(&[]);
            let start = head.iter().rposition(|&c| c == b'\n').map_or(0, |p| p + 1);
            let rest = b.get(start..).unwrap_or(&[]);
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            String::from_utf8_lossy(rest.get(..end).unwrap_or(&[])).into_owned()
        };
        println!("serial output: the same for {at} bytes; then");
        println!("  interp: {:?}", line(&sa));
        println!("  kvm:    {:?}", line(&sb));
    } else {
        println!("serial output: identical ({} bytes)", sa.len());
    }
    println!("end: interp {}; kvm {}", a.end.describe(), b.end.describe());
    Ok(if clean && !args.strict { 0 } else { 1 })
}

/// IPIs from other vCPUs delivered to one vCPU: vector, count.
type IpiSet = std::collections::BTreeMap<u8, u64>;

/// The trace of vCPU `cpu` alone: its records and those of no vCPU (the
/// devices'), and its observations, renumbered to those records. The
/// deliveries of fixed IPIs other vCPUs sent (by vector) are set aside
/// and counted: when another vCPU gets to its ICR write is the host
/// scheduler's choice on KVM, so where and in which order they arrive is
/// not compared, only which arrived how often.
fn select_cpu(
    records: &[TraceRecord],
    obs: &[Stamped],
    cpu: u32,
) -> (Vec<TraceRecord>, Vec<Stamped>, IpiSet) {
    let sent: std::collections::BTreeSet<u8> = records
        .iter()
        .filter_map(|r| match r.event {
            TraceEvent::Ipi {
                from,
                vector,
                mode: tandem_core::devices::apic_bus::DeliveryMode::Fixed,
                ..
            } if from != cpu => Some(vector),
            _ => None,
        })
        .collect();
    let mut ipis = IpiSet::new();
    let mut renumbered = vec![usize::MAX; records.len()];
    let mut mine = Vec::new();
    for (k, r) in records.iter().enumerate() {
        if r.event.cpu().is_none_or(|c| c == cpu) {
            renumbered[k] = mine.len();
            mine.push(r.clone());
        }
    }
    let n = mine.len();
    let obs = obs
        .iter()
        .filter(|o| o.cpu == cpu)
        .filter(|o| match o.obs {
            Obs::Delivery {
                kind: EventKind::External,
                vector,
                ..
            } if sent.contains(&vector) => {
                *ipis.entry(vector).or_default() += 1;
                false
            }
            _ => true,
        })
        .map(|o| Stamped {
            record: renumbered.get(o.record).copied().unwrap_or(n).min(n),
            ..o.clone()
        })
        .collect();
    (mine, obs, ipis)
}

fn report_observation(a: &Side, b: &Side, i: usize, j: usize, context: usize) {
    println!("first divergence: write / delivery #{i} on interp, #{j} on kvm");
    for (s, k) in [(a, i), (b, j)] {
        match s.obs.get(k) {
            Some(o) => println!(
                "  {:6}: {} (t={} ns, trace #{})",
                s.name,
                o.obs.describe(),
                o.ns,
                o.record
            ),
            None => println!("  {:6}: nothing more ({})", s.name, s.end.describe()),
        }
    }
    for (s, k) in [(a, i), (b, j)] {
        let at = s.obs.get(k).map(|o| o.record).unwrap_or(s.records.len());
        println!("events around it on {}:", s.name);
        let from = at.saturating_sub(context);
        let to = (at + context / 2 + 1).min(s.records.len());
        for (n, rec) in s.records.iter().enumerate().take(to).skip(from) {
            println!(
                "  {} #{n:<6} {:>12} ns  {}",
                if n == at { "=>" } else { "  " },
                rec.ns,
                rec.event.describe()
            );
        }
        if at >= s.records.len() {
            println!("  => (end of the run: {})", s.end.describe());
        }
    }
    for (s, k) in [(a, i), (b, j)] {
        let (ctx, rip) = match s.obs.get(k) {
            Some(Stamped {
                obs: Obs::Delivery { cs, rip, .. },
                ctx: Some(c),
                ..
            }) => (Some(c), Some((*cs, *rip))),
            Some(Stamped { ctx: Some(c), .. }) => (Some(c), None),
            _ => (s.last.as_ref(), None),
        };
        if let Some(c) = ctx {
            let (cs, rip) = rip.unwrap_or((c.sregs.cs.selector, c.regs.rip));
            println!(
                "code around {cs:04x}:{rip:016x} on {} ({}):",
                s.name,
                if rip == c.regs.rip {
                    "where the guest was after that exit"
                } else {
                    "the delivery boundary"
                }
            );
            for line in disassemble_around(&s.pc, &c.sregs, rip, 5) {
                println!("  {line}");
            }
        }
    }
}

/// The instructions before and after `rip`, decoded from guest memory with
/// iced-x86's Intel formatter; `=>` marks the one at `rip`.
fn disassemble_around(pc: &Pc, sregs: &Sregs, rip: u64, n: usize) -> Vec<String> {
    const BACK: u64 = 48;
    let base = sregs.cs.base;
    let start = rip.saturating_sub(BACK);
    let mut bytes = vec![0u8; (BACK + 64) as usize];
    let got = tandem_core::paging::read_linear(
        &pc.machine.mem,
        sregs,
        base.wrapping_add(start),
        &mut bytes,
    );
    bytes.truncate(got);
    if bytes.is_empty() {
        return vec!["(code not readable)".into()];
    }
    let bits = tandem_decoder::bitness(
        sregs.long_mode(),
        sregs.cs.l,
        sregs.cs.db,
        sregs.cr0 & cr0::PE != 0,
    );
    // The first start offset whose decoding lands on `rip` is taken (x86
    // cannot be decoded backwards; a wrong start re-synchronizes within a
    // few instructions or misses `rip`).
    let back = (rip - start) as usize;
    for off in 0..back {
        let Some(slice) = bytes.get(off..) else { break };
        let insns = tandem_decoder::disassemble(slice, start + off as u64, bits, 64);
        if let Some(k) = insns.iter().position(|d| d.ip == rip) {
            return insns
                .iter()
                .enumerate()
                .skip(k.saturating_sub(n))
                .take(2 * n + 1)
                .map(|(j, d)| {
                    format!(
                        "{} {:016x}  {:<24} {}",
                        if j == k { "=>" } else { "  " },
                        d.ip,
                        d.bytes
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        d.text
                    )
                })
                .collect();
        }
    }
    let tail = bytes.get(back..).unwrap_or(&[]);
    tandem_decoder::disassemble(tail, rip, bits, n + 1)
        .iter()
        .enumerate()
        .map(|(j, d)| {
            format!(
                "{} {:016x}  {}",
                if j == 0 { "=>" } else { "  " },
                d.ip,
                d.text
            )
        })
        .collect()
}

// ----- lockstep -----------------------------------------------------------------

/// `tandem diff --lockstep`: the guest on KVM (the reference) and on the
/// interpreter, one instruction at a time, the architectural state compared
/// after each (`crate::fuzz::lockstep`). Status 0 identical (masked rules
/// listed), 1 diverged, 2 error.
pub fn lockstep(args: &DiffArgs) -> i32 {
    match lockstep_run(args) {
        Ok(status) => status,
        Err(e) => {
            eprintln!("tandem diff --lockstep: {e:#}");
            2
        }
    }
}

fn lockstep_run(args: &DiffArgs) -> Result<i32> {
    use crate::fuzz::lockstep::{interp_side_smp, kvm_side_smp, masked_text, Finish, Lockstep};
    if !kvm_opens() {
        bail!("/dev/kvm does not open: the lockstep's reference is KVM");
    }
    let (pa, serial_a, state) = build(args, &args.append, IrqchipKind::User)?;
    let (pb, serial_b, _) = build(args, &args.append, IrqchipKind::User)?;
    // 1 ns an instruction and 1 us an exit, as `tandem run --deterministic`.
    let n = args.smp.max(1);
    let kvm = kvm_side_smp("kvm", pa, &state, n, 1, 1_000)?;
    let interp = interp_side_smp("interp", pb, &state, n, false, 1, 1_000)?;
    let mut ls = Lockstep::new(kvm, interp);
    // The guest reads KVM's TSC (rule `tsc` gives the interpreter the same
    // values): both LAPICs compare TSC deadlines against it.
    if let crate::fuzz::lockstep::Cpu::Kvm { vcpu, .. } = &mut ls.reference.cpu {
        if let Some(khz) = vcpu.tsc_khz() {
            let tsc = vcpu
                .get_msrs(&[tandem_core::cpu::msr::IA32_TSC])?
                .first()
                .map(|m| m.value)
                .unwrap_or(0);
            for pc in [&ls.reference.pc, &ls.subject.pc] {
                if let Some(chip) = &pc.irqchip {
                    chip.router.set_tsc(khz, tsc);
                }
            }
        }
    }
    ls.compare_at_end = vec![(0, args.mem.min(pc_ram_below_4g(&ls.reference.pc)))];
    ls.deadline = Some(Instant::now() + args.timeout);
    let start = Instant::now();
    let finish = ls.run(args.max_steps.unwrap_or(u64::MAX), None)?;
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    let guest = args.guest.display();
    let rate = ls.steps as f64 / secs;
    let serial = |b: &SharedBuf| b.text();
    // Several vCPUs: what each did, in the round robin's order.
    let per_vcpu = if n > 1 {
        let each: Vec<String> = ls
            .per_vcpu
            .iter()
            .enumerate()
            .map(|(k, (st, d))| format!("vCPU {k}: {st} steps, {d} delivered"))
            .collect();
        format!(" ({n} vCPUs in round robin: {})", each.join(", "))
    } else {
        String::new()
    };
    Ok(match finish {
        Finish::Diverged(d) => {
            match d.vcpu {
                Some(k) => println!(
                    "tandem diff --lockstep {guest}: vCPU {k} diverges at step {}{per_vcpu}",
                    d.step
                ),
                None => println!(
                    "tandem diff --lockstep {guest}: the processors diverge at instruction {}",
                    d.step
                ),
            }
            print!("{}", d.report(&ls.reference.name, &ls.subject.name));
            1
        }
        Finish::Identical { steps, end } => {
            let (sa, sb) = (serial(&serial_a), serial(&serial_b));
            if sa != sb {
                println!(
                    "tandem diff --lockstep {guest}: the serial output differs after {steps} \
                     identical steps\n  kvm   : {sa:?}\n  interp: {sb:?}"
                );
                return Ok(1);
            }
            println!(
                "tandem diff --lockstep {guest}: identical: {steps} instructions and events, {} \
                 events delivered{per_vcpu}, ended: {end}; masked: {}; kvm fallbacks {}; \
                 {rate:.0} instructions/s",
                ls.deliveries,
                masked_text(&ls.masked),
                ls.reference.fallbacks,
            );
            0
        }
        Finish::Stopped { steps } => {
            println!(
                "tandem diff --lockstep {guest}: identical for {steps} steps (--max-steps), {} \
                 events delivered{per_vcpu}; masked: {}; {rate:.0} instructions/s",
                ls.deliveries,
                masked_text(&ls.masked)
            );
            0
        }
    })
}

/// RAM compared at the end of a lockstep: the first region's size.
fn pc_ram_below_4g(pc: &Pc) -> u64 {
    pc.machine
        .mem
        .regions()
        .first()
        .map(|r| r.end())
        .unwrap_or(0)
}

// ----- the device cross-check -------------------------------------------------

/// Registers where KVM's in-kernel devices are known to differ from
/// Tandem's (and the datasheets) at the end of a run, with why; the same
/// deviations as `KERNEL_DEVIATIONS` in tests/guests.rs.
const DEVICE_DEVIATIONS: &[(&str, &str)] = &[
    (
        "lapic.version",
        "KVM's LAPIC has 5 LVT entries and no EOI-broadcast suppression bit (24); \
         Tandem's version register 0x01050014 offers it",
    ),
    (
        "lapic.svr",
        "entry state: KVM's in-kernel LAPIC is left in KVM's reset state (SVR 0xff, \
         software-disabled), Tandem's as SeaBIOS leaves it (SVR 0x1ff)",
    ),
    (
        "lapic.lvt_lint0",
        "entry state: KVM's reset LINT0 is ExtINT edge (0x700), SeaBIOS's virtual wire \
         ExtINT level (0x8700)",
    ),
    (
        "lapic.lvt_lint1",
        "entry state: KVM's reset LINT1 is masked (0x10000), SeaBIOS's NMI level (0x8400)",
    ),
    (
        "pit.ch1.",
        "KVM's PIT marks a counter never programmed with mode 0xff and access 0; Tandem's \
         powers up in mode 3, LSB/MSB (the 8254's power-up state is undefined)",
    ),
    (
        "pit.ch2.",
        "KVM's PIT marks a counter never programmed with mode 0xff and access 0; Tandem's \
         powers up in mode 3, LSB/MSB (the 8254's power-up state is undefined)",
    ),
    (
        "pic.master.irr",
        "KVM's PIT runs on the host's time, so IRQ 0 requests are pending at other times",
    ),
    (
        "pic.slave.irr",
        "KVM's devices run on the host's time, so requests are pending at other times",
    ),
    (
        "lapic.irr",
        "KVM's LAPIC timer and PIT run on the host's time, so requests are pending at other \
         times",
    ),
];

fn known_deviation(name: &str) -> Option<&'static str> {
    DEVICE_DEVIATIONS
        .iter()
        .find(|(n, _)| name.starts_with(n))
        .map(|(_, why)| *why)
}

/// Tandem's PIC, IOAPIC, PIT and LAPIC as named registers, in the names of
/// [`tandem_kvm::DeviceRegister`].
fn tandem_registers(pc: &Pc) -> Vec<DeviceRegister> {
    let mut out = Vec::new();
    let Some(chip) = &pc.irqchip else {
        return out;
    };
    let pic = chip
        .pic
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .save_state();
    for (name, p) in [("master", &pic.master), ("slave", &pic.slave)] {
        let r = |reg: &str, v: u8| DeviceRegister::new(format!("pic.{name}.{reg}"), v.into());
        out.extend([
            r("irr", p.irr),
            r("isr", p.isr),
            r("imr", p.imr),
            r("vector_base", p.vector_base),
            r("lowest_priority", p.lowest_priority),
            r("elcr", p.elcr),
            r("auto_eoi", p.auto_eoi.into()),
            r("special_fully_nested", p.special_fully_nested.into()),
            r("special_mask", p.special_mask.into()),
            r("read_isr", p.read_isr.into()),
            r("poll", p.poll.into()),
            r("rotate_on_aeoi", p.rotate_on_aeoi.into()),
        ]);
    }
    let io = chip
        .ioapic
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .save_state();
    out.push(DeviceRegister::new("ioapic.id", io.id.into()));
    out.push(DeviceRegister::new("ioapic.ioregsel", io.ioregsel.into()));
    for (pin, e) in io.redirection_table.iter().enumerate() {
        out.push(DeviceRegister::new(format!("ioapic.redir{pin:02}"), *e));
    }
    let pit = chip
        .pit
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .save_state();
    for (i, c) in pit.counters.iter().enumerate() {
        let r = |reg: &str, v: u64| DeviceRegister::new(format!("pit.ch{i}.{reg}"), v);
        let access = match c.access {
            tandem_core::devices::pit::AccessMode::Lsb => 1,
            tandem_core::devices::pit::AccessMode::Msb => 2,
            tandem_core::devices::pit::AccessMode::LsbMsb => 3,
        };
        out.extend([
            r("mode", c.mode.into()),
            r("access", access),
            r("bcd", c.bcd.into()),
            r("gate", c.gate.into()),
            r("reload", if c.cr == 0 { 0x10000 } else { c.cr.into() }),
        ]);
    }
    // Read through the register interface of the LAPIC's mode: the xAPIC
    // page, or the x2APIC MSRs (where the 64-bit ICR is one MSR and the DFR
    // does not exist).
    let lapic = chip.router.lapic(0);
    for &(name, off) in tandem_kvm::LAPIC_COMPARED {
        let Some(l) = lapic else { break };
        let mut l = l.lock().unwrap_or_else(|p| p.into_inner());
        let v = if l.is_x2apic() {
            match off {
                0x300 => l.read_msr(0x830).map(|v| v & 0xffff_ffff),
                0x310 => l.read_msr(0x830).map(|v| v >> 32),
                _ => l.read_msr(0x800 + u32::from(off >> 4)),
            }
        } else {
            let mut b = [0u8; 4];
            l.read_mmio(u64::from(off), &mut b);
            Some(u64::from(u32::from_le_bytes(b)))
        };
        let Some(v) = v else { continue };
        out.push(if tandem_kvm::lapic_time_dependent(off) {
            DeviceRegister::timed(format!("lapic.{name}"), v)
        } else {
            DeviceRegister::new(format!("lapic.{name}"), v)
        });
    }
    out
}

fn devices(args: &DiffArgs) -> Result<i32> {
    if !kvm_opens() {
        bail!(
            "/dev/kvm does not open: `tandem diff --devices` compares KVM's in-kernel \
             devices with Tandem's and needs KVM"
        );
    }
    let user = run_side(
        args,
        Kind::Kvm {
            kernel_irqchip: false,
        },
        &args.append,
        None,
    )?;
    let mut kvm_regs = Vec::new();
    let kernel = run_side(
        args,
        Kind::Kvm {
            kernel_irqchip: true,
        },
        &args.append,
        Some(&mut kvm_regs),
    )?;
    let ours = tandem_registers(&user.pc);
    let guest = args.guest.display();
    println!(
        "tandem diff --devices: {guest}: --irqchip user {}; --irqchip kernel {}",
        user.end.describe(),
        kernel.end.describe()
    );
    let mut unexplained = 0;
    let mut differing = 0;
    let mut timed = Vec::new();
    println!(
        "{:<28} {:>18} {:>18}  note",
        "register", "tandem (user)", "kvm (kernel)"
    );
    for k in &kvm_regs {
        let Some(t) = ours.iter().find(|t| t.name == k.name) else {
            continue;
        };
        if k.time_dependent || t.time_dependent {
            timed.push(k.name.clone());
            continue;
        }
        if t.value == k.value {
            continue;
        }
        differing += 1;
        let note = match known_deviation(&k.name) {
            Some(why) => format!("known: {why}"),
            None => {
                unexplained += 1;
                "unexplained".to_string()
            }
        };
        println!("{:<28} {:>#18x} {:>#18x}  {note}", k.name, t.value, k.value);
    }
    let compared = kvm_regs.len() - timed.len();
    println!(
        "{compared} registers compared, {differing} differ ({unexplained} unexplained); not \
         compared (they depend on the host's time under KVM's devices): {}",
        timed.join(", ")
    );
    Ok(if unexplained == 0 && (differing == 0 || !args.strict) {
        0
    } else {
        1
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::trace::Lvt;

    fn pc() -> Pc {
        Pc::new(PcConfig {
            mem_size: 1 << 20,
            vcpus: 1,
            clock: ClockKind::Virtual,
            irqchip: IrqchipKind::User,
            lost_ticks: LostTickPolicy::Discard,
            serial_out: Box::new(std::io::sink()),
            devices: Vec::new(),
        })
        .unwrap()
    }

    fn out(v: u64) -> Obs {
        Obs::PortWrite {
            port: 0x3f8,
            size: 1,
            value: v,
        }
    }

    fn ext(vector: u8, rip: u64) -> Obs {
        Obs::Delivery {
            kind: EventKind::External,
            vector,
            error_code: None,
            cs: 8,
            rip,
        }
    }

    fn nmi(rip: u64) -> Obs {
        Obs::Delivery {
            kind: EventKind::Nmi,
            vector: 2,
            error_code: None,
            cs: 8,
            rip,
        }
    }

    fn record(event: TraceEvent) -> TraceRecord {
        TraceRecord {
            seq: 0,
            ns: 0,
            event,
            flow: None,
        }
    }

    /// A side whose records are `before` and then one record per
    /// observation.
    fn side(name: &'static str, before: Vec<TraceEvent>, obs: Vec<Obs>) -> Side {
        let mut records: Vec<TraceRecord> = before.into_iter().map(record).collect();
        let mut stamped = Vec::new();
        for o in obs {
            stamped.push(Stamped {
                obs: o,
                cpu: 0,
                record: records.len(),
                ns: 0,
                ctx: None,
            });
            records.push(record(TraceEvent::Exit {
                cpu: 0,
                reason: "io out 0x3f8/1".into(),
            }));
        }
        Side {
            name,
            pc: pc(),
            serial: SharedBuf::default(),
            records,
            obs: stamped,
            end: End::StepLimit(0),
            last: None,
        }
    }

    /// One vCPU's view: its records and the devices', its observations
    /// renumbered, and the IPIs other vCPUs sent it set aside by vector.
    #[test]
    fn a_vcpu_view_sets_other_vcpus_ipis_aside() {
        use tandem_core::devices::apic_bus::DeliveryMode;
        let ipi = |from: u32, vector: u8| TraceEvent::Ipi {
            from,
            vector,
            dest: 0,
            mode: DeliveryMode::Fixed,
            shorthand: tandem_core::devices::apic_bus::Shorthand::None,
        };
        let write = |cpu: u32| TraceEvent::PortWrite {
            cpu,
            port: 0x3f8,
            size: 1,
            value: 0x41,
        };
        let records: Vec<TraceRecord> = [
            write(0),
            write(1),
            ipi(1, 0x51),
            TraceEvent::PicInt { level: true },
            write(0),
            write(0),
        ]
        .into_iter()
        .map(record)
        .collect();
        let stamp = |cpu: u32, obs: Obs, record: usize| Stamped {
            obs,
            cpu,
            record,
            ns: 0,
            ctx: None,
        };
        let obs = vec![
            stamp(0, out(0x41), 0),
            stamp(1, out(0x41), 1),
            stamp(0, ext(0x51, 0x10), 4),
            stamp(0, out(0x41), 5),
        ];
        let (recs, mine, ipis) = select_cpu(&records, &obs, 0);
        // vCPU 0's writes and the PIC's record; not vCPU 1's write or IPI.
        assert_eq!(recs.len(), 4);
        assert_eq!(mine.len(), 2, "{mine:?}");
        assert_eq!((mine[0].record, mine[1].record), (0, 3));
        assert_eq!(ipis.get(&0x51), Some(&1));
        let (recs, mine, ipis) = select_cpu(&records, &obs, 1);
        assert_eq!(recs.len(), 3);
        assert_eq!(mine.len(), 1);
        assert!(ipis.is_empty());
    }

    #[test]
    fn identical_streams_have_no_divergence() {
        let a = side("interp", vec![], vec![out(1), ext(0x20, 0x10), out(2)]);
        let b = side("kvm", vec![], vec![out(1), ext(0x20, 0x10), out(2)]);
        let c = compare(&a, &b);
        assert!(c.known.is_empty() && c.unexplained.is_none() && !c.stopped);
    }

    #[test]
    fn another_write_is_the_first_unexplained_divergence() {
        let a = side("interp", vec![], vec![out(1), out(2), out(3)]);
        let b = side("kvm", vec![], vec![out(1), out(9), out(3)]);
        let c = compare(&a, &b);
        let d = c.unexplained.expect("a divergence");
        assert_eq!((d.i, d.j), (1, 1));
        assert!(c.known.is_empty());
    }

    #[test]
    fn a_delivery_at_another_boundary_without_a_rule_is_unexplained() {
        let a = side("interp", vec![], vec![out(1), ext(0x30, 0x10), out(2)]);
        let b = side("kvm", vec![], vec![out(1), out(2), ext(0x30, 0x20)]);
        let c = compare(&a, &b);
        assert!(c.known.is_empty());
        assert_eq!(c.unexplained.map(|d| (d.i, d.j)), Some((1, 1)));
    }

    /// KVM records a queued NMI where it was handed over; the interpreter
    /// where it was delivered: noted, taken out, the rest compared.
    #[test]
    fn a_queued_nmi_on_kvm_is_known_and_the_rest_is_compared() {
        let a = side("interp", vec![], vec![out(1), out(2), nmi(0x50), out(3)]);
        let b = side("kvm", vec![], vec![out(1), nmi(0x40), out(2), out(3)]);
        let c = compare(&a, &b);
        assert_eq!(c.known.len(), 1);
        assert_eq!(c.known[0].rule, Some(Rule::KvmNmiQueued));
        assert_eq!((c.known[0].i, c.known[0].j), (2, 1));
        assert!(c.unexplained.is_none());

        let b = side("kvm", vec![], vec![out(1), nmi(0x40), out(2), out(4)]);
        let c = compare(&a, &b);
        assert_eq!(c.unexplained.map(|d| (d.i, d.j)), Some((3, 3)));
    }

    /// A TSC-deadline timer that fired earlier on the interpreter: the
    /// interrupted code's write (P) and the handler's (H) swap places.
    #[test]
    fn a_late_timer_delivery_is_realigned_around_the_handler() {
        let timer = TraceEvent::LapicLvt {
            cpu: 0,
            lvt: Lvt::Timer,
            vector: 0x42,
            mode: tandem_core::devices::apic_bus::DeliveryMode::Fixed,
        };
        let armed = TraceEvent::Exit {
            cpu: 0,
            reason: "wrmsr 0x6e0 = 0x1234".into(),
        };
        let a = side(
            "interp",
            vec![timer.clone()],
            vec![out(1), ext(0x42, 0x10), out(0xe0), out(7), out(8)],
        );
        let b = side(
            "kvm",
            vec![armed, timer],
            vec![out(1), out(7), ext(0x42, 0x20), out(0xe0), out(8)],
        );
        let c = compare(&a, &b);
        assert_eq!(c.known.len(), 1, "{:?}", c.unexplained.map(|d| (d.i, d.j)));
        assert_eq!(c.known[0].rule, Some(Rule::KvmTsc));
        assert!(c.unexplained.is_none() && !c.stopped);
    }

    #[test]
    fn a_tsc_check_failing_on_kvm_only_is_explained_by_its_rule() {
        let interp = "hello\nPASS: TSC-deadline fires: ok\nSUMMARY\n";
        let kvm = "hello\n  got 0, expected 1\nFAIL: TSC-deadline fires: ok\nSUMMARY\n";
        assert_eq!(explain_serial(interp, kvm), Some(Rule::KvmTsc));
        let kvm = "hello\nFAIL: PIC IRR: ok\n";
        let interp = "hello\nPASS: PIC IRR: ok\n";
        assert_eq!(explain_serial(interp, kvm), None);
        // A check that fails on both is no KVM-only rule.
        assert_eq!(
            explain_serial("a\nFAIL: TSC x\n", "a\n  detail\nFAIL: TSC x\n"),
            None
        );
    }

    #[test]
    fn disassembly_marks_the_instruction_at_rip() {
        let pc = pc();
        // mov eax, 1; nop; hlt; jmp $ in 32-bit code at 0x1000.
        let code = [0xb8, 1, 0, 0, 0, 0x90, 0xf4, 0xeb, 0xfe];
        pc.machine.mem.write(0x1000, &code).unwrap();
        let mut sregs = Sregs {
            cr0: cr0::PE,
            ..Default::default()
        };
        sregs.cs = tandem_core::cpu::Segment::flat(8, 0xb, false);
        let lines = disassemble_around(&pc, &sregs, 0x1006, 3);
        let marked: Vec<_> = lines.iter().filter(|l| l.starts_with("=>")).collect();
        assert_eq!(marked.len(), 1, "{lines:#?}");
        assert!(marked[0].contains("hlt"), "{lines:#?}");
        assert!(lines.iter().any(|l| l.contains("mov eax,1")), "{lines:#?}");
    }
}
