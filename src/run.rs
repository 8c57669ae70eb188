//! `tandem run` and `tandem info`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tandem_core::cpu::VcpuState;
use tandem_core::machine::{ExitStats, GuestContext, RunError, RunOutcome};
use tandem_core::pc::{ClockKind, IrqchipKind, Pc, PcConfig};
use tandem_core::trace::{TraceFormat, WriterSink};
use tandem_core::vcpu::Vcpu;
use tandem_core::StopRequest;
use tandem_firmware::acpi::{write_acpi, AcpiConfig, DmarConfig};
use tandem_firmware::linux::{linux_entry_state, load_bzimage};
use tandem_firmware::mptable::{write_mptable, MPTABLE_ADDR};
use tandem_firmware::multiboot::{load_multiboot, multiboot_entry_state, Module};
use tandem_firmware::pvh::{load_pvh, pvh_entry_state};
use tandem_kvm::{KvmFlavour, KvmVm, KvmVmOptions};

use crate::size::parse_size;
use crate::{Backend, CpuModel, CpuVendor, Irqchip, RunArgs};

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let data =
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    if data.is_empty() {
        bail!("{what} {} is empty", path.display());
    }
    Ok(data)
}

/// kvm where /dev/kvm opens, else interp.
fn default_backend() -> Backend {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Backend::Kvm,
        Err(_) => Backend::Interp,
    }
}

/// What `tandem run` boots.
enum Boot<'a> {
    Multiboot(&'a Path),
    Linux(&'a Path),
}

pub fn run(args: &RunArgs) -> Result<i32> {
    if let Some(addr) = &args.gdb {
        return crate::debug::run_with_gdb(args, addr);
    }
    let boot_kind = match (&args.guest, &args.kernel) {
        (Some(_), Some(_)) => {
            bail!("give either a multiboot GUEST or --kernel, not both")
        }
        (Some(g), None) => Boot::Multiboot(g),
        (None, Some(k)) => Boot::Linux(k),
        (None, None) => bail!("no guest given: tandem run GUEST.elf (or --kernel BZIMAGE)"),
    };
    let guest = match boot_kind {
        Boot::Multiboot(p) | Boot::Linux(p) => p,
    };
    let mem_size = parse_size(&args.mem).context("bad --mem")?;
    if args.smp == 0 {
        bail!("--smp must be at least 1");
    }
    if args.smp > 255 {
        bail!("--smp {}: at most 255 vCPUs (xAPIC IDs)", args.smp);
    }
    let trace_format = match &args.trace {
        Some(p) => Some(TraceFormat::from_path(p).with_context(|| {
            format!(
                "--trace {}: the extension picks the format: .txt (text), .jsonl (JSON lines) \
                 or .json (Chrome trace events)",
                p.display()
            )
        })?),
        None => None,
    };
    if trace_format.is_some() && args.irqchip == Irqchip::Kernel {
        bail!(
            "--trace follows Tandem's PIT, PIC, IOAPIC and LAPIC; with --irqchip kernel they \
             are KVM's and cannot be traced (use --irqchip user)"
        );
    }
    let image = read_file(guest, "guest")?;
    let initrd = match &args.initrd {
        Some(p) => Some(read_file(p, "initrd")?),
        None => None,
    };
    // --cpu-vendor picks the interpreter's model, so it implies the
    // interpreter when no backend is named.
    let backend = args.backend.unwrap_or_else(|| {
        if args.cpu_vendor.is_some() {
            Backend::Interp
        } else {
            default_backend()
        }
    });
    if let (Backend::Kvm, Some(v)) = (backend, args.cpu_vendor) {
        bail!(
            "--cpu-vendor {} is for the interpreter's processor model: on KVM the vendor is \
             the host's, and the host processor follows its own rules",
            cpu_vendor_name(v)
        );
    }
    if args.irqchip == Irqchip::Kernel && backend != Backend::Kvm {
        bail!("--irqchip kernel is KVM's in-kernel irqchip: it needs --backend kvm");
    }

    let pc = Pc::new(PcConfig {
        mem_size,
        vcpus: args.smp,
        clock: if args.deterministic {
            ClockKind::Virtual
        } else {
            ClockKind::Host
        },
        irqchip: match args.irqchip {
            Irqchip::User => IrqchipKind::User,
            Irqchip::Kernel => IrqchipKind::Kernel,
        },
        lost_ticks: match args.pit_lost_ticks {
            crate::LostTicks::Discard => tandem_core::pc::LostTickPolicy::Discard,
            crate::LostTicks::Catchup => tandem_core::pc::LostTickPolicy::Catchup,
        },
        serial_out: Box::new(std::io::stdout()),
        devices: args.devices.clone(),
    })
    .context("cannot build the machine")?;
    if let Some(v) = &pc.virtual_clock {
        v.set_progress(tandem_core::clock::GuestProgress::RUN);
    }

    // The tables a guest finds at the top of the first MiB (reserved in
    // the e820 map, so no loader places anything there).
    let mem = &pc.machine.mem;
    let acpi = AcpiConfig {
        dmar: pc.iommu.as_ref().map(|v| {
            let c = v.lock().unwrap_or_else(|p| p.into_inner()).config();
            DmarConfig {
                register_base: tandem_core::devices::vtd::VTD_MMIO_BASE,
                address_width: c.aw_bits,
                interrupt_remapping: c.intremap,
                x2apic_opt_out: !c.eim,
            }
        }),
        ..AcpiConfig::new(args.smp)
    };
    write_acpi(mem, &acpi).context("cannot write the ACPI tables")?;
    write_mptable(mem, args.smp, MPTABLE_ADDR).context("cannot write the MP table")?;

    let state = match boot_kind {
        Boot::Multiboot(_) => {
            let modules: Vec<Module<'_>> = initrd
                .as_deref()
                .map(|d| Module {
                    data: d,
                    cmdline: "initrd",
                })
                .into_iter()
                .collect();
            // The real-mode IVT and its stubs, as a BIOS leaves them
            // (written first: the loader's own structures take precedence).
            tandem_firmware::bios::write_bios_ivt(mem)
                .context("cannot write the real-mode interrupt vector table")?;
            let boot = load_multiboot(mem, &image, &args.append, &modules)
                .with_context(|| format!("cannot load {}", guest.display()))?;
            multiboot_entry_state(&boot)
        }
        Boot::Linux(_) => load_linux(mem, &image, initrd.as_deref(), &args.append)
            .with_context(|| format!("cannot boot {}", guest.display()))?,
    };

    if let (Some(path), Some(format)) = (&args.trace, trace_format) {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create the trace file {}", path.display()))?;
        let out = Box::new(std::io::BufWriter::new(file));
        pc.start_trace(Box::new(WriterSink::new(format, out)))
            .context("cannot start the trace")?;
    }
    let outcome = match backend {
        Backend::Kvm => run_kvm(&pc, &state, args),
        Backend::Interp => run_interp(&pc, &state, args),
    };
    // The trace is completed whatever the outcome: it shows how the run got
    // there.
    let traced = pc.finish_trace();
    let outcome = outcome?;
    if let (Err(e), Some(path)) = (traced, &args.trace) {
        bail!("cannot write the trace file {}: {e}", path.display());
    }
    Ok(report(&pc, &outcome))
}

/// A bzImage through the Linux x86 boot protocol, or an uncompressed
/// vmlinux through its PVH entry note.
fn load_linux(
    mem: &tandem_core::GuestMemory,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<VcpuState> {
    let is_bzimage = image.get(0x202..0x206) == Some(b"HdrS");
    let is_elf = image.starts_with(b"\x7fELF");
    if is_bzimage {
        let boot = load_bzimage(mem, image, initrd, cmdline)?;
        Ok(linux_entry_state(&boot, mem)?)
    } else if is_elf {
        let boot = load_pvh(mem, image, initrd, cmdline)?;
        Ok(pvh_entry_state(&boot, mem)?)
    } else {
        bail!("neither a bzImage (no HdrS setup header) nor an ELF vmlinux with a PVH entry note")
    }
}

fn run_kvm(pc: &Pc, state: &VcpuState, args: &RunArgs) -> Result<RunOutcome> {
    let flavour = tandem_kvm::host_info().map(|i| i.flavour).ok();
    let kernel_irqchip = args.irqchip == Irqchip::Kernel;
    if args.cpu == Some(CpuModel::Tandem) {
        bail!(
            "--cpu tandem is for the interpreter: on KVM the processor is KVM's supported \
             CPUID cut to Tandem's model (--cpu kvm); give the interpreter --cpu kvm to \
             compare the two"
        );
    }
    let vm = KvmVm::new(
        pc.machine.mem.clone(),
        &KvmVmOptions {
            vcpus: args.smp,
            kernel_irqchip,
        },
    )
    .map_err(|e| explain_kvm(e.into(), flavour))
    .context("cannot create the KVM VM")?;
    let mut vcpus = Vec::new();
    for id in 0..args.smp {
        let mut v = vm
            .create_vcpu(id)
            .map_err(|e| explain_kvm(e.into(), flavour))
            .with_context(|| format!("cannot create vCPU {id}"))?;
        // The BSP starts at the entry; application processors wait for
        // INIT / SIPI from the guest in Tandem's run loop.
        if id == 0 {
            v.set_state(state)
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
    // Instructions KVM cannot emulate (PVM: CMPXCHG16B, XRSTOR...) are
    // executed one at a time by the interpreter.
    let _ = pc.machine.fallback.set(std::sync::Arc::new(
        tandem_interp::InterpFallback::with_cpuid(std::sync::Arc::new(vm.cpuid_table().clone())),
    ));
    pc.set_phys_addr_bits(vm.cpuid_table().phys_addr_bits());
    start_threads(pc, args)?;
    start_timeout(pc, args.timeout);

    let (result, stats) = run_threads(pc, &mut vcpus);
    pc.stop_host_threads();
    if matches!(result, Ok(RunOutcome::Stop(StopRequest::Timeout))) {
        let mut refs: Vec<&mut dyn Vcpu> = vcpus.iter_mut().map(|v| v as &mut dyn Vcpu).collect();
        report_timeout(pc, &mut refs);
    }
    if args.stats {
        eprintln!("tandem: exits: {stats:?}");
    }
    if args.dump_devices {
        eprint!("{}", pc.dump_devices());
        if kernel_irqchip {
            eprint!("{}", vm.dump_kernel_irqchip());
            for v in &vcpus {
                eprint!("{}", v.dump_kernel_lapic());
            }
        }
    }
    match result {
        Ok(o) => Ok(o),
        Err(e) => Err(explain_run_error(pc, e, flavour)),
    }
}

fn cpu_vendor_name(v: CpuVendor) -> &'static str {
    match v {
        CpuVendor::Intel => "intel",
        CpuVendor::Amd => "amd",
    }
}

fn run_interp(pc: &Pc, state: &VcpuState, args: &RunArgs) -> Result<RunOutcome> {
    if let (Some(CpuModel::Kvm), Some(v)) = (args.cpu, args.cpu_vendor) {
        bail!(
            "--cpu-vendor {} applies to --cpu tandem: --cpu kvm is the host's processor, \
             vendor included",
            cpu_vendor_name(v)
        );
    }
    let cpuid = std::sync::Arc::new(match args.cpu {
        Some(CpuModel::Kvm) => tandem_kvm::offered_cpuid(args.smp)
            .context("--cpu kvm needs /dev/kvm to learn the CPUID KVM offers")?,
        Some(CpuModel::Tandem) | None => {
            let vendor = match args.cpu_vendor {
                Some(CpuVendor::Amd) => tandem_core::cpuid::Vendor::Amd,
                Some(CpuVendor::Intel) | None => tandem_core::cpuid::Vendor::Intel,
            };
            tandem_core::cpuid::CpuidTable::model_for(args.smp, vendor)
        }
    });
    pc.set_phys_addr_bits(cpuid.phys_addr_bits());
    let mut vcpus: Vec<tandem_interp::InterpVcpu> = (0..args.smp)
        .map(|id| {
            let mut v = tandem_interp::InterpVcpu::new(id, pc.machine.mem.clone());
            v.set_cpuid(cpuid.clone());
            // One TSC for the processor and the LAPIC's TSC-deadline timer.
            v.set_tsc_clock(pc.machine.clock.clone(), tandem_core::pc::DEFAULT_TSC_KHZ);
            v
        })
        .collect();
    // The BSP starts at the entry; application processors stay in their
    // reset state and wait for INIT / SIPI.
    vcpus[0]
        .set_state(state)
        .context("cannot load the entry state into the interpreter")?;
    for v in &mut vcpus {
        pc.sync_tsc(v, tandem_core::pc::DEFAULT_TSC_KHZ)
            .context("cannot set the guest TSC")?;
    }
    start_threads(pc, args)?;
    start_timeout(pc, args.timeout);

    let mut stats = ExitStats::default();
    let result = if let [vcpu] = vcpus.as_mut_slice() {
        pc.machine.run_vcpu(vcpu, &mut stats)
    } else {
        // One thread, the vCPUs in turn in index order: deterministic.
        let mut refs: Vec<&mut dyn Vcpu> = vcpus.iter_mut().map(|v| v as &mut dyn Vcpu).collect();
        pc.machine.run_round_robin(&mut refs, &mut stats)
    };
    pc.stop_host_threads();
    if matches!(result, Ok(RunOutcome::Stop(StopRequest::Timeout))) {
        let mut refs: Vec<&mut dyn Vcpu> = vcpus.iter_mut().map(|v| v as &mut dyn Vcpu).collect();
        report_timeout(pc, &mut refs);
    }
    if args.stats {
        eprintln!("tandem: exits: {stats:?}");
        for v in &vcpus {
            eprintln!(
                "tandem: interp vCPU {}: {} instructions retired, decode cache (hits, misses) {:?}",
                v.id(),
                v.retired(),
                v.cache_stats()
            );
        }
    }
    if args.dump_devices {
        eprint!("{}", pc.dump_devices());
    }
    match result {
        Ok(o) => Ok(o),
        Err(e) => Err(explain_run_error(pc, e, None)),
    }
}

/// Runs each vCPU on its own thread (the BSP on this one) until the first
/// of them ends; the others are then stopped. Returns the first vCPU's
/// outcome and the summed exit counts.
fn run_threads(
    pc: &Pc,
    vcpus: &mut [tandem_kvm::KvmVcpu],
) -> (Result<RunOutcome, RunError>, ExitStats) {
    let machine = &pc.machine;
    let first: std::sync::Mutex<Option<u32>> = std::sync::Mutex::new(None);
    // The first vCPU to end decides the outcome and stops the others (a
    // stop request the guest made first stays the one reported).
    let end = |id: u32| {
        let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(id);
        }
        drop(f);
        machine.control.request(StopRequest::Poweroff);
        for b in &machine.doorbells {
            b.ring();
        }
    };
    let Some((bsp, aps)) = vcpus.split_first_mut() else {
        return (
            Err(RunError::Unhandled("no vCPU".to_string())),
            ExitStats::default(),
        );
    };
    let mut results: Vec<(u32, Result<RunOutcome, RunError>, ExitStats)> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = aps
            .iter_mut()
            .map(|v| {
                let end = &end;
                scope.spawn(move || {
                    let mut st = ExitStats::default();
                    let r = machine.run_vcpu(v, &mut st);
                    end(v.id());
                    (v.id(), r, st)
                })
            })
            .collect();
        let mut st = ExitStats::default();
        let r = machine.run_vcpu(bsp, &mut st);
        end(0);
        results.push((0, r, st));
        for h in handles {
            if let Ok(done) = h.join() {
                results.push(done);
            }
        }
    });
    let mut total = ExitStats::default();
    for (_, _, st) in &results {
        total.io += st.io;
        total.mmio += st.mmio;
        total.msr += st.msr;
        total.hlt += st.hlt;
        total.windows += st.windows;
        total.kicks += st.kicks;
        total.injections += st.injections;
        total.fallbacks += st.fallbacks;
    }
    let winner = first.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(0);
    let pos = results
        .iter()
        .position(|(id, _, _)| *id == winner)
        .unwrap_or(0);
    let result = results.swap_remove(pos).1;
    (result, total)
}

/// `--timeout`: a watchdog thread that stops the machine after `secs` of
/// wall time (a host-time limit even in deterministic mode: it only ends
/// the run).
fn start_timeout(pc: &Pc, secs: Option<f64>) {
    let Some(secs) = secs.filter(|s| s.is_finite() && *s > 0.0) else {
        return;
    };
    let machine = pc.machine.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        machine.control.request(StopRequest::Timeout);
        for b in &machine.doorbells {
            b.ring();
        }
    });
}

/// Where each vCPU was when `--timeout` stopped the run.
fn report_timeout(pc: &Pc, vcpus: &mut [&mut dyn Vcpu]) {
    for v in vcpus {
        let ctx = GuestContext {
            regs: v.get_regs().unwrap_or_default(),
            sregs: v.get_sregs().unwrap_or_default(),
        };
        eprintln!(
            "tandem: --timeout: vCPU {} at {} ({})\n{}",
            v.id(),
            ctx.cs_rip(),
            describe_insn(pc, &ctx),
            register_dump(&ctx)
        );
    }
}

/// The timer watcher and the stdin reader, except in deterministic mode,
/// where no host thread may ring a vCPU.
fn start_threads(pc: &Pc, args: &RunArgs) -> Result<()> {
    if args.deterministic {
        return Ok(());
    }
    pc.start_host_threads()
        .context("cannot start the machine's threads")?;
    pc.start_stdin().context("cannot read stdin")
}

fn explain_kvm(e: anyhow::Error, flavour: Option<KvmFlavour>) -> anyhow::Error {
    match flavour.and_then(|f| f.caveat()) {
        Some(c) => e.context(c.to_string()),
        None => e,
    }
}

fn explain_run_error(pc: &Pc, e: RunError, flavour: Option<KvmFlavour>) -> anyhow::Error {
    let ctx = match &e {
        RunError::EmulationFailure { context, .. }
        | RunError::Internal { context, .. }
        | RunError::FailEntry { context, .. } => Some(context.clone()),
        _ => None,
    };
    let mut msg = e.to_string();
    if let Some(c) = &ctx {
        msg.push_str(&format!(": {}", describe_insn(pc, c)));
    }
    if let (RunError::EmulationFailure { .. }, Some(c)) = (&e, flavour.and_then(|f| f.caveat())) {
        msg.push_str(&format!(" ({c})"));
    }
    if let Some(c) = &ctx {
        msg.push('\n');
        msg.push_str(&register_dump(c));
    }
    anyhow::anyhow!(msg)
}

/// The guest's registers, indented, for fatal exits.
fn register_dump(ctx: &GuestContext) -> String {
    format!("{}\n{}", ctx.regs, ctx.sregs)
        .lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// "mode: instruction (bytes)" at the context's CS:RIP.
fn describe_insn(pc: &Pc, ctx: &GuestContext) -> String {
    let s = &ctx.sregs;
    let la = s.cs.base.wrapping_add(ctx.regs.rip);
    let mut bytes = [0u8; 15];
    let n = tandem_core::paging::read_linear(&pc.machine.mem, s, la, &mut bytes);
    let bits = tandem_decoder::bitness(
        s.long_mode(),
        s.cs.l,
        s.cs.db,
        s.cr0 & tandem_core::cpu::cr0::PE != 0,
    );
    let text = if n == 0 {
        "code not readable".to_string()
    } else {
        tandem_decoder::describe_one(&bytes[..n], ctx.regs.rip, bits)
    };
    format!("{}, {}", s.mode_name(), text)
}

/// Prints how the run ended and returns the process status.
fn report(pc: &Pc, outcome: &RunOutcome) -> i32 {
    match outcome {
        RunOutcome::Stop(StopRequest::DebugExit(_)) => {}
        RunOutcome::Stop(StopRequest::Reset) => eprintln!("tandem: the guest reset the machine"),
        RunOutcome::Stop(StopRequest::Poweroff) => eprintln!("tandem: the guest powered off"),
        RunOutcome::Stop(StopRequest::Timeout) => eprintln!("tandem: --timeout ran out"),
        RunOutcome::TripleFault(ctx) => eprintln!(
            "tandem: triple fault at {} ({})\n{}",
            ctx.cs_rip(),
            describe_insn(pc, ctx),
            register_dump(ctx)
        ),
        RunOutcome::DeadHalt(ctx) if ctx.regs.rflags & tandem_core::cpu::rflags::IF != 0 => {
            // Only in deterministic mode: no timer armed, no host input.
            eprintln!(
                "tandem: the guest halted at {} with no timer armed; with --deterministic \
                 nothing else can wake it",
                ctx.cs_rip()
            )
        }
        RunOutcome::DeadHalt(ctx) => eprintln!(
            "tandem: the guest halted with interrupts disabled at {} and nothing can wake it",
            ctx.cs_rip()
        ),
    }
    outcome.exit_status()
}

pub fn info() -> Result<()> {
    match tandem_kvm::host_info() {
        Ok(i) => {
            println!("KVM: {}", i.flavour);
            println!(
                "  API version {}, vCPU mmap size {}, max vCPUs {}",
                i.api_version, i.vcpu_mmap_size, i.max_vcpus
            );
            if let Some(c) = i.flavour.caveat() {
                println!("  note: {c}");
            }
            println!("Capabilities:");
            for (name, has) in &i.caps {
                println!("  [{}] {name}", if *has { "x" } else { " " });
            }
            println!("CPUID offered to guests (leaf.subleaf: eax ebx ecx edx):");
            for (f, idx, a, b, c, d) in &i.cpuid {
                println!("  {f:08x}.{idx:02x}: {a:08x} {b:08x} {c:08x} {d:08x}");
            }
        }
        Err(e) => {
            println!("KVM: not available ({e}); `tandem run` uses --backend interp");
        }
    }
    println!(
        "Backends: kvm{}, interp",
        if std::path::Path::new("/dev/kvm").exists() {
            ""
        } else {
            " (no /dev/kvm)"
        }
    );
    Ok(())
}
