//! `tandem`: run, compare and debug x86 guests on an interpreter or on KVM.

mod debug;
mod diff;
mod fuzz;
mod run;
mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "An x86 system emulator with two processors: an interpreter and Linux KVM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Tandem's own instruction interpreter.
    Interp,
    /// Linux KVM through /dev/kvm.
    Kvm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Irqchip {
    /// Tandem's PIT, PICs, IOAPIC and LAPIC (the default).
    User,
    /// KVM's in-kernel irqchip and PIT, as a reference.
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LostTicks {
    /// Missed PIT periods are dropped: one tick is delivered (QEMU).
    Discard,
    /// Missed PIT periods are delivered one after another as the guest
    /// takes them (KVM's in-kernel PIT with reinjection).
    Catchup,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuModel {
    /// Tandem's processor model: every feature the interpreter implements
    /// (the interpreter's default; the same on every host).
    Tandem,
    /// What the KVM backend offers on this host: KVM's supported CPUID cut
    /// to Tandem's model (KVM's only choice; on the interpreter it needs
    /// /dev/kvm, and makes it the same processor as KVM here).
    Kvm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuVendor {
    /// GenuineIntel (the default).
    Intel,
    /// AuthenticAMD: AMD's SYSCALL / SYSRET in compatibility and legacy mode.
    Amd,
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A multiboot ELF guest (ELF32 or ELF64).
    pub guest: Option<PathBuf>,
    /// Which processor runs the guest (default: kvm where /dev/kvm opens, else interp).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Whose interrupt controllers the guest talks to.
    #[arg(long, value_enum, default_value = "user")]
    pub irqchip: Irqchip,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub smp: u32,
    /// The processor's CPUID (default: tandem on the interpreter, kvm on KVM).
    #[arg(long, value_enum)]
    pub cpu: Option<CpuModel>,
    /// The vendor Tandem's processor model announces, and whose rules the
    /// interpreter follows where Intel and AMD differ (SYSCALL / SYSRET
    /// outside 64-bit mode); interpreter only.
    #[arg(long, value_enum)]
    pub cpu_vendor: Option<CpuVendor>,
    /// Guest RAM: a number of MiB, or with a K, M, G or T suffix.
    #[arg(long, default_value = "128M")]
    pub mem: String,
    /// Write an interrupt trace here (.txt, .jsonl or .json by extension).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// A Linux bzImage to boot instead of a multiboot guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initrd for --kernel, or a multiboot module for a multiboot guest.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The kernel or multiboot command line.
    #[arg(long, default_value = "")]
    pub append: String,
    /// What the PIT does with ticks the guest did not take in time: drop
    /// them as QEMU does, or deliver them later as KVM's PIT does.
    #[arg(long, value_enum, default_value = "discard")]
    pub pit_lost_ticks: LostTicks,
    /// Print every device's registers when the run ends.
    #[arg(long)]
    pub dump_devices: bool,
    /// Print exit counts when the run ends.
    #[arg(long)]
    pub stats: bool,
    /// Stop the run after this many seconds of wall time and print where
    /// each vCPU was (status 5).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Reproducible time: a virtual clock moved only by guest progress
    /// (instructions on the interpreter, exits on both, jumps while halted);
    /// no host thread and no stdin.
    #[arg(long)]
    pub deterministic: bool,
    /// Wait for gdb on this address (HOST:PORT) before the guest starts.
    #[arg(long, value_name = "ADDR")]
    pub gdb: Option<String>,
    /// Add a device, as QEMU's -device (repeatable): `edu` (QEMU's
    /// educational PCI device) or `intel-iommu[,intremap=on|off]
    /// [,eim=on|off][,aw-bits=39|48]` (a VT-d unit at 0xFED90000 with a
    /// DMAR table; needs --irqchip user).
    #[arg(long = "device", value_name = "SPEC", value_parser = parse_device)]
    pub devices: Vec<tandem_core::pc::PcDevice>,
}

/// Parses a `--device` specification.
pub fn parse_device(spec: &str) -> Result<tandem_core::pc::PcDevice, String> {
    use tandem_core::devices::vtd::VtdConfig;
    use tandem_core::pc::PcDevice;
    let mut parts = spec.split(',');
    let name = parts.next().unwrap_or_default();
    let on_off = |key: &str, v: &str| match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{name}: {key} must be on or off, not `{v}`")),
    };
    match name {
        "edu" => match parts.next() {
            None => Ok(PcDevice::Edu),
            Some(p) => Err(format!("edu takes no options (got `{p}`)")),
        },
        "intel-iommu" => {
            let mut c = VtdConfig::default();
            for p in parts {
                let (k, v) = p.split_once('=').unwrap_or((p, "on"));
                match k {
                    "intremap" => c.intremap = on_off(k, v)?,
                    "eim" => c.eim = on_off(k, v)?,
                    "aw-bits" => {
                        c.aw_bits = match v {
                            "39" => 39,
                            "48" => 48,
                            _ => {
                                return Err(format!("intel-iommu: aw-bits is 39 or 48, not `{v}`"))
                            }
                        }
                    }
                    _ => {
                        return Err(format!(
                            "intel-iommu: unknown option `{k}` (intremap, eim, aw-bits)"
                        ))
                    }
                }
            }
            if c.eim && !c.intremap {
                return Err("intel-iommu: eim=on needs intremap=on".into());
            }
            Ok(PcDevice::IntelIommu(c))
        }
        _ => Err(format!("unknown device `{name}` (edu, intel-iommu)")),
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest.
    Run(RunArgs),
    /// Run a guest on both processors and report the first divergence.
    Diff {
        /// The guest (not with --replay).
        guest: Option<PathBuf>,
        /// Step both processors one instruction at a time and compare the
        /// architectural state after each.
        #[arg(long)]
        lockstep: bool,
        /// Turns of the run loop (about one exit each) per processor at most.
        #[arg(long)]
        max_steps: Option<u64>,
        /// Run a case `tandem fuzz` saved, in lockstep.
        #[arg(long, value_name = "FILE")]
        replay: Option<PathBuf>,
        /// The multiboot command line.
        #[arg(long, default_value = "")]
        append: String,
        /// Guest RAM: a number of MiB, or with a K, M, G or T suffix.
        #[arg(long, default_value = "128M")]
        mem: String,
        /// Wall-clock limit of each run, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Trace events shown before the divergence.
        #[arg(long, default_value_t = 8)]
        context: usize,
        /// Compare KVM's in-kernel PIC, IOAPIC, LAPIC and PIT with Tandem's
        /// (the guest on KVM with --irqchip kernel and --irqchip user)
        /// instead of the two processors.
        #[arg(long)]
        devices: bool,
        /// Status 1 for divergences a documented rule explains too.
        #[arg(long)]
        strict: bool,
        /// vCPUs on both sides (the BSP starts at the entry, the others wait
        /// for INIT / SIPI). On KVM the vCPUs are threads, so the order of
        /// events across vCPUs is the host scheduler's: the diff compares
        /// each vCPU's ordered writes and deliveries on their own (plus the
        /// serial output and the end status). --lockstep steps the vCPUs in
        /// one round-robin order (0, 1, ..., skipping halted vCPUs and those
        /// waiting for a SIPI), the same vCPU on both sides each step.
        #[arg(long, default_value_t = 1)]
        smp: u32,
        /// Serial input for COM1, the same bytes on both sides, paced: a byte
        /// arrives each time the guest polls an empty receiver (reads LSR)
        /// or enables its receive interrupt, so it arrives at the same point
        /// of the run on both processors whatever the host's timing.
        #[arg(long, value_name = "TEXT")]
        input: Option<String>,
    },
    /// Fuzz random instruction streams on both processors.
    Fuzz {
        /// The campaign's seed (every case follows from it and its index).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Cases to generate, before sharding.
        #[arg(long, default_value_t = 1000)]
        iterations: u64,
        /// Run only shard I of N (cases whose index is I modulo N).
        #[arg(long, value_name = "I/N", default_value = "0/1")]
        shard: String,
        /// Instructions per case.
        #[arg(long, default_value_t = 64)]
        len: usize,
        /// Modes to fuzz (comma-separated: real16, prot32, long64-ring0,
        /// long64-ring3).
        #[arg(long, default_value = "real16,prot32,long64-ring0,long64-ring3")]
        modes: String,
        /// Directory for divergent cases.
        #[arg(long, default_value = "fuzz-cases")]
        out: PathBuf,
        /// Stop after this many divergences.
        #[arg(long, default_value_t = 10)]
        max_divergences: usize,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Debug a guest step by step.
    Debug {
        guest: PathBuf,
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        /// Serve gdb on this address (HOST:PORT) instead of the prompt.
        #[arg(long, value_name = "ADDR")]
        gdb: Option<String>,
        /// Run the commands of this file first (one a line, # comments).
        #[arg(long, short = 'x', value_name = "FILE")]
        commands: Option<PathBuf>,
        /// Guest RAM: a number of MiB, or with a K, M, G or T suffix.
        #[arg(long, default_value = "128M")]
        mem: String,
        /// The multiboot command line.
        #[arg(long, default_value = "")]
        append: String,
    },
    /// Show the host's KVM flavour and capabilities and the CPUID offered.
    Info,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with status 0; mistakes are one
            // line with status 2, as clap does.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Info => run::info().map(|()| 0),
        Command::Diff {
            guest,
            lockstep,
            max_steps,
            replay,
            append,
            mem,
            timeout,
            context,
            devices,
            strict,
            smp,
            input,
        } => {
            // Errors of `tandem diff` are status 2 (1 means "diverged").
            if let Some(file) = replay {
                return ExitCode::from(fuzz::replay(&file).clamp(0, 255) as u8);
            }
            let Some(guest) = guest else {
                eprintln!("tandem diff: a GUEST (or --replay FILE) is needed");
                return ExitCode::from(2);
            };
            let mem = match size::parse_size(&mem) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("tandem diff: bad --mem: {e}");
                    return ExitCode::from(2);
                }
            };
            let args = diff::DiffArgs {
                guest,
                append,
                mem,
                max_steps,
                timeout: std::time::Duration::from_secs(timeout),
                context,
                devices,
                strict,
                smp,
                input,
            };
            if !(1..=255).contains(&smp) {
                eprintln!("tandem diff: --smp {smp}: from 1 to 255 vCPUs");
                return ExitCode::from(2);
            }
            Ok(if lockstep {
                diff::lockstep(&args)
            } else {
                diff::diff(&args)
            })
        }
        Command::Fuzz {
            seed,
            iterations,
            shard,
            len,
            modes,
            out,
            max_divergences,
            quiet,
        } => fuzz::parse_shard(&shard).and_then(|shard| {
            let modes = modes
                .split(',')
                .map(|m| {
                    fuzz::Mode::parse(m.trim())
                        .ok_or_else(|| anyhow::anyhow!("unknown mode {m:?} in --modes"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            if modes.is_empty() || len == 0 {
                anyhow::bail!("--modes and --len need at least one");
            }
            Ok(fuzz::fuzz(&fuzz::FuzzArgs {
                seed,
                iterations,
                shard,
                len,
                modes,
                out_dir: out,
                max_divergences: max_divergences.max(1),
                progress: !quiet,
            }))
        }),
        Command::Debug {
            guest,
            backend,
            gdb,
            commands,
            mem,
            append,
        } => size::parse_size(&mem)
            .map_err(|e| anyhow::anyhow!("bad --mem: {e}"))
            .and_then(|mem| {
                debug::debug(&debug::DebugArgs {
                    guest,
                    backend,
                    gdb,
                    commands,
                    mem,
                    append,
                })
            }),
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(1)
        }
    }
}
