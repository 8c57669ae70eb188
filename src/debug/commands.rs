//! The commands of `tandem debug` (and of gdb's `monitor`).

use anyhow::{bail, Context, Result};

use super::engine::{parse_num, BpKind, Resume, Session, Stop};
use crate::Backend;

/// Every command word, for completion and `help`.
pub const COMMANDS: &[(&str, &str)] = &[
    (
        "step",
        "step [N]: run N instructions (an injected event stops at its handler)",
    ),
    ("stepi", "stepi [N]: the same as step"),
    ("next", "next: step over a CALL (or one instruction)"),
    ("continue", "continue: run until a breakpoint or the end"),
    ("until", "until ADDR: run until the instruction at ADDR"),
    (
        "break",
        "break ADDR | break vector V | break irq N | break eoi V",
    ),
    ("delete", "delete [ID]: delete a breakpoint, or all"),
    (
        "info",
        "info regs|pic|pit|ioapic|lapic [CPU]|idt|events|breakpoints|backend|trace [N]",
    ),
    (
        "x",
        "x ADDR [N]: N bytes of guest memory at linear ADDR (xp: physical)",
    ),
    ("xp", "xp ADDR [N]: N bytes of guest-physical memory"),
    (
        "disas",
        "disas [ADDR] [N]: N instructions at ADDR (default: CS:RIP)",
    ),
    (
        "switch",
        "switch kvm|interp: move the vCPU to the other processor",
    ),
    ("help", "help: this list"),
    ("quit", "quit: end the session"),
];

pub const INFO_WORDS: &[&str] = &[
    "regs",
    "pic",
    "pit",
    "ioapic",
    "lapic",
    "idt",
    "events",
    "breakpoints",
    "backend",
    "trace",
];

/// What the prompt does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    Go,
    Quit,
}

/// Runs one command line, writing what it prints to `out`.
pub fn execute(s: &mut Session, line: &str, out: &mut String) -> Result<Flow> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(Flow::Go);
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let (cmd, args) = (words[0], &words[1..]);
    // x/N ADDR as gdb writes it.
    let (cmd, slash) = match cmd.split_once('/') {
        Some((c, n)) => (c, Some(n)),
        None => (cmd, None),
    };
    match cmd {
        "s" | "step" | "si" | "stepi" => {
            let n = match args.first() {
                Some(a) => parse_num(a)?,
                None => 1,
            };
            for _ in 0..n.max(1) {
                let stop = s.resume(Resume::Step)?;
                let done = !matches!(stop, Stop::Step);
                report_stop(s, &stop, out)?;
                if done {
                    break;
                }
            }
        }
        "n" | "next" => {
            let r = s.regs()?;
            let la = s.linear_rip()?;
            let insn = {
                let mut bytes = [0u8; 15];
                let n = s.read_linear(la, &mut bytes)?;
                let sr = s.sregs()?;
                tandem_decoder::decode_at_zero(&bytes[..n], super::engine::bitness(&sr))
            };
            let call = insn.as_ref().is_some_and(|i| {
                matches!(
                    i.flow_control(),
                    tandem_decoder::iced_x86::FlowControl::Call
                        | tandem_decoder::iced_x86::FlowControl::IndirectCall
                )
            });
            let stop = if let (true, Some(i)) = (call, insn) {
                let _ = r;
                s.add_breakpoint(BpKind::Addr(la + i.len() as u64), true)?;
                s.resume(Resume::Continue)?
            } else {
                s.resume(Resume::Step)?
            };
            report_stop(s, &stop, out)?;
        }
        "c" | "cont" | "continue" => {
            let stop = s.resume(Resume::Continue)?;
            report_stop(s, &stop, out)?;
        }
        "u" | "until" | "advance" => {
            let a = args.first().context("until ADDR")?;
            s.add_breakpoint(BpKind::Addr(parse_num(a)?), true)?;
            let stop = s.resume(Resume::Continue)?;
            report_stop(s, &stop, out)?;
        }
        "b" | "break" | "tbreak" => {
            let kind = match args {
                [a] => BpKind::Addr(parse_num(a)?),
                ["vector", v] | ["vec", v] => BpKind::Vector(byte(v)?),
                ["irq", n] => {
                    let n = byte(n)?;
                    if n > 15 {
                        bail!("ISA IRQ lines are 0-15");
                    }
                    BpKind::IrqRise(n)
                }
                ["eoi", v] => BpKind::Eoi(byte(v)?),
                _ => bail!("break ADDR | break vector V | break irq N | break eoi V"),
            };
            let id = s.add_breakpoint(kind, cmd == "tbreak")?;
            out.push_str(&format!("breakpoint {id}: {kind}\n"));
        }
        "d" | "delete" => {
            let id = match args.first() {
                Some(a) => Some(parse_num(a)? as u32),
                None => None,
            };
            let n = s.delete_breakpoint(id);
            out.push_str(&format!("deleted {n} breakpoint(s)\n"));
        }
        "i" | "info" => info(s, args, out)?,
        "x" | "xp" => {
            let count = match (slash, args.get(1)) {
                (_, Some(n)) => parse_num(n)?,
                (Some(n), None) => {
                    parse_num(n.trim_end_matches(|c: char| c.is_alphabetic())).unwrap_or(16)
                }
                _ => 16,
            }
            .clamp(1, 4096) as usize;
            let addr = parse_num(args.first().context("x ADDR [N]")?)?;
            let mut buf = vec![0u8; count];
            let n = if cmd == "xp" {
                match s.pc.machine.mem.read(addr, &mut buf) {
                    Ok(()) => count,
                    Err(_) => 0,
                }
            } else {
                s.read_linear(addr, &mut buf)?
            };
            if n == 0 {
                bail!("cannot read guest memory at {addr:#x}");
            }
            for (i, chunk) in buf[..n].chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let text: String = chunk
                    .iter()
                    .map(|&b| {
                        if (0x20..0x7f).contains(&b) {
                            b as char
                        } else {
                            '.'
                        }
                    })
                    .collect();
                out.push_str(&format!(
                    "{:#018x}: {:<48} {text}\n",
                    addr + 16 * i as u64,
                    hex.join(" ")
                ));
            }
        }
        "disas" | "disassemble" | "u16" => {
            let addr = match args.first() {
                Some(a) => parse_num(a)?,
                None => s.linear_rip()?,
            };
            let n = match args.get(1) {
                Some(a) => parse_num(a)? as usize,
                None => 8,
            };
            for l in s.disassemble(addr, n.clamp(1, 256))? {
                out.push_str(&l);
                out.push('\n');
            }
        }
        "switch" => {
            let target = match args.first().copied() {
                Some("kvm") => Backend::Kvm,
                Some("interp") => Backend::Interp,
                None => match s.backend() {
                    Backend::Kvm => Backend::Interp,
                    Backend::Interp => Backend::Kvm,
                },
                Some(o) => bail!("switch kvm|interp, not {o}"),
            };
            let from = s.backend_name();
            s.switch_to(target)?;
            let la = s.linear_rip()?;
            out.push_str(&format!(
                "switched from {from} to {} at {la:#x}\n",
                s.backend_name()
            ));
        }
        "h" | "help" => {
            for (_, h) in COMMANDS {
                out.push_str(&format!("  {h}\n"));
            }
        }
        "q" | "quit" | "exit" => return Ok(Flow::Quit),
        other => bail!("unknown command {other:?} (help lists them)"),
    }
    Ok(Flow::Go)
}

fn byte(s: &str) -> Result<u8> {
    let v = parse_num(s)?;
    u8::try_from(v).map_err(|_| anyhow::anyhow!("{s} is not a vector (0-255)"))
}

fn info(s: &mut Session, args: &[&str], out: &mut String) -> Result<()> {
    let what = args.first().copied().unwrap_or("");
    let chip = |s: &Session| {
        s.pc.irqchip.as_ref().map(|c| {
            (
                c.pic.clone(),
                c.pit.clone(),
                c.ioapic.clone(),
                c.router.clone(),
            )
        })
    };
    match what {
        "r" | "regs" | "registers" => {
            let r = s.regs()?;
            let sr = s.sregs()?;
            out.push_str(&format!(
                "backend {} ({})\n{r}\n{sr}\n",
                s.backend_name(),
                sr.mode_name()
            ));
            let dr = s.vcpu().get_debug_regs()?;
            out.push_str(&format!(
                "DR0-3 {:#x} {:#x} {:#x} {:#x} DR6 {:#x} DR7 {:#x}\n",
                dr.db[0], dr.db[1], dr.db[2], dr.db[3], dr.dr6, dr.dr7
            ));
        }
        "pic" => {
            let (pic, ..) = chip(s).context("no PIC (in-kernel irqchip)")?;
            let d = pic.lock().unwrap_or_else(|p| p.into_inner()).dump();
            out.push_str(&d);
        }
        "pit" => {
            let (_, pit, ..) = chip(s).context("no PIT")?;
            let d = pit.lock().unwrap_or_else(|p| p.into_inner()).dump();
            out.push_str(&d);
        }
        "ioapic" => {
            let (_, _, io, _) = chip(s).context("no IOAPIC")?;
            let d = io.lock().unwrap_or_else(|p| p.into_inner()).dump();
            out.push_str(&d);
        }
        "lapic" => {
            let (.., router) = chip(s).context("no LAPIC")?;
            let cpu = match args.get(1) {
                Some(c) => parse_num(c)? as u32,
                None => 0,
            };
            let l = router.lapic(cpu).with_context(|| format!("no CPU {cpu}"))?;
            let d = l.lock().unwrap_or_else(|p| p.into_inner()).dump();
            out.push_str(&format!("CPU {cpu}\n{d}"));
        }
        "idt" => out.push_str(&s.idt_report()?),
        "events" => out.push_str(&s.events_report()?),
        "b" | "break" | "breakpoints" => {
            if s.breakpoints().is_empty() {
                out.push_str("no breakpoints\n");
            }
            for b in s.breakpoints() {
                out.push_str(&format!("  {}: {}\n", b.id, b.kind));
            }
        }
        "backend" => out.push_str(&format!("{}\n", s.backend_name())),
        "trace" => {
            let n = match args.get(1) {
                Some(a) => parse_num(a)? as usize,
                None => 20,
            };
            for l in s.trace_lines(n) {
                out.push_str(&format!("  {l}\n"));
            }
        }
        _ => bail!("info {}", INFO_WORDS.join("|")),
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(())
}

/// Prints a stop as "stopped: ..." with the chain notes and where the
/// guest stands.
pub fn report_stop(s: &mut Session, stop: &Stop, out: &mut String) -> Result<()> {
    for n in &s.notes {
        out.push_str(&format!("  {n}\n"));
    }
    let what = match stop {
        Stop::Step => "step".to_string(),
        Stop::Breakpoint {
            temporary: true,
            addr,
            ..
        } => format!("reached {addr:#x}"),
        Stop::Breakpoint { id, addr, .. } => format!("breakpoint {id} at {addr:#x}"),
        Stop::Delivered {
            vector,
            handler,
            id,
        } => format!(
            "{}delivery of vector {vector:#04x}: handler at {handler:#x}",
            id.map_or(String::new(), |i| format!("breakpoint {i}, "))
        ),
        Stop::IrqRaised { irq, id } => format!("breakpoint {id}, IRQ {irq} rose"),
        Stop::Eoi {
            vector,
            controller,
            id,
        } => format!("breakpoint {id}, EOI of vector {vector:#04x} ({controller})"),
        Stop::Finished(o) => {
            out.push_str(&format!(
                "the guest's run ended: {o:?} (status {})\n",
                o.exit_status()
            ));
            return Ok(());
        }
        Stop::Interrupted => "interrupted".to_string(),
    };
    let la = s.linear_rip()?;
    let insn = s.disassemble(la, 1)?.into_iter().next().unwrap_or_default();
    out.push_str(&format!(
        "stopped ({}): {what}\n  {}\n",
        s.backend_name(),
        insn.trim()
    ));
    Ok(())
}
