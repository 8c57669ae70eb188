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
        vcpus: 1,
        clock: ClockKind::Virtual,
        irqchip,
        lost_ticks: LostTickPolicy::Discard,
        serial_out: Box::new(serial.clone()),
    })
    .context("cannot build the machine")?;
    if let Some(v) = &pc.virtual_clock {
        v.set_progress(GuestProgress::EXITS);
    }
    let mem = &pc.machine.mem;
    write_acpi(mem, &AcpiConfig::new(1)).context("cannot write the ACPI tables")?;
    write_mptable(mem, 1, MPTABLE_ADDR).context("cannot write the MP table")?;
    let boot = load_multiboot(mem, &image, append, &[])
        .with_context(|| format!("cannot load {}", args.guest.display()))?;
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
            let cpuid = tandem_kvm::offered_cpuid(1)
                .context("cannot read the CPUID KVM offers (the interpreter gets the same)")?;
            let mut vcpu = tandem_interp::InterpVcpu::new(0, pc.machine.mem.clone());
            vcpu.set_cpuid(Arc::new(cpuid));
            vcpu.set_state(&state)
                .context("cannot load the entry state into the interpreter")?;
            let (r, o, e, l) = drive(&pc, &mut vcpu, buf.as_ref(), args);
            ("interp", r, o, e, l)
        }
        Kind::Kvm { kernel_irqchip } => {
            let vm = KvmVm::new(
                pc.machine.mem.clone(),
                &KvmVmOptions {
                    vcpus: 1,
                    kernel_irqchip,
                },
            )
            .context("cannot create the KVM VM")?;
            let mut vcpu = vm.create_vcpu(0).context("cannot create vCPU 0")?;
            vcpu.set_state(&state)
                .context("cannot load the entry state into KVM")?;
            if let Some(khz) = vcpu.tsc_khz() {
                pc.sync_tsc(&mut vcpu, khz)
                    .context("cannot set the guest TSC")?;
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
            let (r, o, e, l) = drive(&pc, &mut vcpu, buf.as_ref(), args);
            if let Some(out) = kvm_regs {
                if kernel_irqchip {
                    out.extend(
                        vm.kernel_irqchip_registers()
                            .context("cannot read KVM's irqchip")?,
                    );
                    out.extend(
                        vcpu.kernel_lapic_registers()
                            .context("cannot read KVM's LAPIC")?,
                    );
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

/// The run loop, one turn at a time, collecting the trace as it goes.
fn drive(
    pc: &Pc,
    vcpu: &mut dyn Vcpu,
    buf: Option<&TraceBuffer>,
    args: &DiffArgs,
) -> (Vec<TraceRecord>, Vec<Stamped>, End, Option<GuestContext>) {
    let machine = &pc.machine;
    let mut records = Vec::new();
    let mut obs = Vec::new();
    let mut stats = ExitStats::default();
    let mut l = machine.vcpu_loop(vcpu);
    let mut pending_inject: Option<Obs> = None;
    // The watchdog only ends a run that is over its time: it kicks the
    // vCPU after the timeout, never before, so it cannot change what the
    // guest sees in a run that finishes.
    let done = Arc::new(AtomicBool::new(false));
    let expired = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (done, expired, kicker, timeout) =
            (done.clone(), expired.clone(), vcpu.kicker(), args.timeout);
        std::thread::Builder::new()
            .name("tandem-diff-watchdog".into())
            .spawn(move || {
                let start = Instant::now();
                while !done.load(Ordering::SeqCst) {
                    if start.elapsed() >= timeout {
                        expired.store(true, Ordering::SeqCst);
                        kicker.kick();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .ok()
    };
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
            let fresh: Vec<TraceRecord> =
                std::mem::take(&mut *b.lock().unwrap_or_else(|p| p.into_inner()));
            let mut ctx = None;
            for rec in fresh {
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
                        pending_inject = Some(Obs::Delivery {
                            kind: *kind,
                            vector: *vector,
                            error_code: *error_code,
                            cs: *cs,
                            rip: *rip,
                        });
                        None
                    }
                    // Delivered: the processor ran after the injection.
                    TraceEvent::Deliver { .. } => pending_inject.take(),
                    _ => None,
                };
                if let Some(o) = o {
                    if ctx.is_none() {
                        ctx = guest_context(vcpu);
                    }
                    obs.push(Stamped {
                        obs: o,
                        record: records.len(),
                        ns: rec.ns,
                        ctx: ctx.clone(),
                    });
                }
                records.push(rec);
            }
        }
        match turn {
            Ok(Turn::Done(o)) => break End::Outcome(o),
            Ok(_) => {}
            Err(e) => break End::Error(e.to_string()),
        }
    };
    done.store(true, Ordering::SeqCst);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    let last = guest_context(vcpu);
    (records, obs, end, last)
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
    let cmp = compare(&a, &b);
    let (known, unexplained, stopped) = (&cmp.known, &cmp.unexplained, cmp.stopped);
    let status_same = a.end.status() == b.end.status() && a.end.status().is_some();
    let serial_same = sa == sb;
    let clean = unexplained.is_none() && (stopped || (serial_same && status_same));
    if known.is_empty() && clean {
        println!(
            "tandem diff: {guest}: identical: {} port / MMIO writes and deliveries, {} bytes of \
             serial output, {} on both",
            a.obs.len(),
            sa.len(),
            a.end.describe()
        );
        return Ok(0);
    }
    if clean {
        println!(
            "tandem diff: {guest}: identical but for {} documented divergence(s)",
            known.len()
        );
    } else {
        println!("tandem diff: {guest}: the processors diverge");
    }
    let mut rules_seen = Vec::new();
    for d in known {
        let rule = d.rule.unwrap_or(Rule::KvmTsc);
        println!(
            "known divergence (rule {}): interp #{}: {}; kvm #{}: {}",
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
            "  next to those: {} writes to the POST port 0x80 (ignored by the machine) of the \
             guest's wait loops on one side only, from the same late deliveries",
            cmp.absorbed_post_writes
        );
    }
    for r in &rules_seen {
        println!("  rule {}: {}", r.name(), r.why());
    }
    if stopped {
        println!("  the guest's outputs differ from the last one on: the comparison stops there");
    }
    if let Some(d) = unexplained {
        report_observation(&a, &b, d.i, d.j, args.context);
        println!("no documented rule explains this divergence");
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
    use crate::fuzz::lockstep::{interp_side, kvm_side, masked_text, Finish, Lockstep};
    if !kvm_opens() {
        bail!("/dev/kvm does not open: the lockstep's reference is KVM");
    }
    let (pa, serial_a, state) = build(args, &args.append, IrqchipKind::User)?;
    let (pb, serial_b, _) = build(args, &args.append, IrqchipKind::User)?;
    // 1 ns an instruction and 1 us an exit, as `tandem run --deterministic`.
    let kvm = kvm_side("kvm", pa, &state, 1, 1_000)?;
    let interp = interp_side("interp", pb, &state, false, 1, 1_000)?;
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
    Ok(match finish {
        Finish::Diverged(d) => {
            println!(
                "tandem diff --lockstep {guest}: the processors diverge at instruction {}",
                d.step
            );
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
                 events delivered, ended: {end}; masked: {}; kvm fallbacks {}; {rate:.0} \
                 instructions/s",
                ls.deliveries,
                masked_text(&ls.masked),
                ls.reference.fallbacks,
            );
            0
        }
        Finish::Stopped { steps } => {
            println!(
                "tandem diff --lockstep {guest}: identical for {steps} steps (--max-steps), {} \
                 events delivered; masked: {}; {rate:.0} instructions/s",
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
