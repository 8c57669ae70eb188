//! `tandem debug`: the interactive debugger, its command files, the gdb
//! remote stub (`--gdb ADDR`) and the move of a running vCPU between KVM
//! and the interpreter.

pub mod commands;
pub mod engine;
pub mod gdb;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tandem_core::cpu::VcpuState;
use tandem_core::pc::{ClockKind, IrqchipKind, Pc, PcConfig};
use tandem_firmware::acpi::{write_acpi, AcpiConfig};
use tandem_firmware::mptable::{write_mptable, MPTABLE_ADDR};
use tandem_firmware::multiboot::{load_multiboot, multiboot_entry_state};

use crate::Backend;
use commands::{execute, Flow, COMMANDS, INFO_WORDS};
use engine::Session;

/// What `tandem debug` was given.
#[derive(Debug, Clone)]
pub struct DebugArgs {
    pub guest: PathBuf,
    pub backend: Option<Backend>,
    pub gdb: Option<String>,
    pub commands: Option<PathBuf>,
    pub mem: u64,
    pub append: String,
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

/// Builds the `pc` machine with a multiboot guest loaded, as `tandem run`
/// does.
fn build(guest: &Path, mem_size: u64, append: &str) -> Result<(Pc, VcpuState)> {
    let image =
        std::fs::read(guest).with_context(|| format!("cannot read guest {}", guest.display()))?;
    if image.is_empty() {
        bail!("guest {} is empty", guest.display());
    }
    let pc = Pc::new(PcConfig {
        mem_size,
        vcpus: 1,
        clock: ClockKind::Host,
        irqchip: IrqchipKind::User,
        lost_ticks: Default::default(),
        serial_out: Box::new(std::io::stdout()),
        devices: Vec::new(),
    })
    .context("cannot build the machine")?;
    let mem = &pc.machine.mem;
    write_acpi(mem, &AcpiConfig::new(1)).context("cannot write the ACPI tables")?;
    write_mptable(mem, 1, MPTABLE_ADDR).context("cannot write the MP table")?;
    let boot = load_multiboot(mem, &image, append, &[])
        .with_context(|| format!("cannot load {}", guest.display()))?;
    let state = multiboot_entry_state(&boot);
    Ok((pc, state))
}

/// Opens a session on the guest.
pub fn session(args: &DebugArgs) -> Result<Session> {
    let (pc, state) = build(&args.guest, args.mem, &args.append)?;
    let backend = args.backend.unwrap_or_else(default_backend);
    Session::new(pc, &state, backend)
}

/// `tandem debug GUEST`: the prompt (after the command file, if any), or
/// the gdb stub with `--gdb`.
pub fn debug(args: &DebugArgs) -> Result<i32> {
    let mut s = session(args)?;
    if let Some(addr) = &args.gdb {
        return gdb::serve(&mut s, addr);
    }
    let mut out = std::io::stdout();
    if let Some(file) = &args.commands {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the command file {}", file.display()))?;
        for line in text.lines() {
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let _ = writeln!(out, "(tandem) {}", line.trim());
            match run_line(&mut s, line) {
                Ok(Flow::Quit) => return Ok(status(&s)),
                Ok(Flow::Go) => {}
                Err(e) => {
                    // A script stops at its first failing command.
                    let _ = out.flush();
                    return Err(e.context(format!("command {:?}", line.trim())));
                }
            }
        }
    }
    if std::io::stdin().is_terminal() {
        interactive(&mut s)?;
    } else {
        // Commands from a pipe, one a line.
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line.context("cannot read stdin")?;
            let _ = writeln!(out, "(tandem) {}", line.trim());
            match run_line(&mut s, &line) {
                Ok(Flow::Quit) => break,
                Ok(Flow::Go) => {}
                Err(e) => eprintln!("error: {e:#}"),
            }
        }
    }
    Ok(status(&s))
}

/// `tandem run GUEST --gdb ADDR`: the guest waits for gdb before its first
/// instruction.
pub fn run_with_gdb(args: &crate::RunArgs, addr: &str) -> Result<i32> {
    let Some(guest) = &args.guest else {
        bail!("--gdb needs a multiboot GUEST");
    };
    if !args.devices.is_empty() {
        bail!("--gdb does not take --device yet");
    }
    if args.kernel.is_some() || args.smp != 1 || args.irqchip != crate::Irqchip::User {
        bail!("--gdb supports a multiboot guest with one vCPU and --irqchip user");
    }
    let mem = crate::size::parse_size(&args.mem).context("bad --mem")?;
    let d = DebugArgs {
        guest: guest.clone(),
        backend: args.backend,
        gdb: Some(addr.to_string()),
        commands: None,
        mem,
        append: args.append.clone(),
    };
    debug(&d)
}

/// The process status: the guest's, when its run ended.
fn status(s: &Session) -> i32 {
    s.finished().map_or(0, |o| o.exit_status())
}

fn run_line(s: &mut Session, line: &str) -> Result<Flow> {
    let mut text = String::new();
    let r = execute(s, line, &mut text);
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    r
}

/// The prompt with history and completion.
fn interactive(s: &mut Session) -> Result<()> {
    use rustyline::error::ReadlineError;
    let mut rl: rustyline::Editor<Completion, rustyline::history::DefaultHistory> =
        rustyline::Editor::new().context("cannot open the terminal")?;
    rl.set_helper(Some(Completion));
    let mut last = String::new();
    loop {
        match rl.readline("(tandem) ") {
            Ok(line) => {
                // An empty line repeats the last command, as in gdb.
                let line = if line.trim().is_empty() {
                    last.clone()
                } else {
                    let _ = rl.add_history_entry(line.as_str());
                    line
                };
                last = line.clone();
                match run_line(s, &line) {
                    Ok(Flow::Quit) => break,
                    Ok(Flow::Go) => {}
                    Err(e) => eprintln!("error: {e:#}"),
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e).context("cannot read the prompt"),
        }
    }
    Ok(())
}

/// Tab completion of command words and `info` topics.
struct Completion;

impl rustyline::completion::Completer for Completion {
    type Candidate = String;
    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &rustyline::Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        let head = &line[..pos.min(line.len())];
        let start = head.rfind(' ').map_or(0, |i| i + 1);
        let word = &head[start..];
        let first = head[..start].split_whitespace().next();
        let pool: Vec<&str> = match first {
            None => COMMANDS.iter().map(|(c, _)| *c).collect(),
            Some("info") | Some("i") => INFO_WORDS.to_vec(),
            Some("break") | Some("b") => vec!["vector", "irq", "eoi"],
            Some("switch") => vec!["kvm", "interp"],
            _ => Vec::new(),
        };
        Ok((
            start,
            pool.into_iter()
                .filter(|c| c.starts_with(word))
                .map(String::from)
                .collect(),
        ))
    }
}

impl rustyline::hint::Hinter for Completion {
    type Hint = String;
}
impl rustyline::highlight::Highlighter for Completion {}
impl rustyline::validate::Validator for Completion {}
impl rustyline::Helper for Completion {}
