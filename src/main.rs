//! `tandem`: run, compare and debug x86 guests on an interpreter or on KVM.

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
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a guest.
    Run(RunArgs),
    /// Run a guest on both processors and report the first divergence.
    Diff {
        guest: PathBuf,
        #[arg(long)]
        lockstep: bool,
        #[arg(long)]
        max_steps: Option<u64>,
        #[arg(long)]
        replay: Option<PathBuf>,
    },
    /// Fuzz random instruction streams on both processors.
    Fuzz {
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        iterations: Option<u64>,
        #[arg(long)]
        shard: Option<String>,
    },
    /// Debug a guest step by step.
    Debug {
        guest: PathBuf,
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        #[arg(long)]
        gdb: Option<String>,
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
        Command::Diff { .. } => Err(anyhow::anyhow!("`tandem diff` is not built yet")),
        Command::Fuzz { .. } => Err(anyhow::anyhow!("`tandem fuzz` is not built yet")),
        Command::Debug { .. } => Err(anyhow::anyhow!("`tandem debug` is not built yet")),
    };
    match result {
        Ok(status) => ExitCode::from(status.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(1)
        }
    }
}
