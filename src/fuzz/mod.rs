//! `tandem fuzz`: random instruction sequences run in lockstep on two
//! processors, divergences shrunk to the fewest instructions and saved as
//! replayable cases (`tandem diff --replay FILE`).
//!
//! What each mode is compared against (the reference) depends on the host
//! (see [`reference_for`] and README, "tandem fuzz"): KVM where it can step
//! the mode, else the interpreter with its decoded-instruction cache
//! emptied before every instruction.

pub mod gen;
pub mod lockstep;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tandem_core::pc::{ClockKind, IrqchipKind, LostTickPolicy, Pc, PcConfig};
use tandem_core::trace::SharedBuf;
use tandem_decoder::iced_x86::Mnemonic;

pub use gen::{Case, Mode};
use lockstep::{Finish, Lockstep, Rule};

/// Virtual time of one instruction in a fuzz case, and of one exit.
const NS_PER_STEP: u64 = 100;
const NS_PER_EXIT: u64 = 1_000;

/// What a mode is compared against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    /// KVM, single-stepped (and on PVM, 64-bit ring 3 at native speed
    /// between breakpoints).
    Kvm,
    /// The interpreter itself, its decode cache off: a consistency fuzz,
    /// where this host's KVM cannot run the mode.
    InterpNoCache,
}

impl Reference {
    pub fn name(self) -> &'static str {
        match self {
            Reference::Kvm => "kvm",
            Reference::InterpNoCache => "interp (decode cache off)",
        }
    }
}

fn kvm_opens() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The reference of `mode` on this host: KVM wherever /dev/kvm opens,
/// except 32-bit protected mode on PVM (its emulator dies at the first IRET,
/// which every timer interrupt of a case ends with); the interpreter with
/// its decode cache off otherwise.
pub fn reference_for(mode: Mode) -> Reference {
    if !kvm_opens() {
        return Reference::InterpNoCache;
    }
    if mode == Mode::Prot32 && lockstep::host_is_pvm() {
        return Reference::InterpNoCache;
    }
    Reference::Kvm
}

fn small_pc() -> Result<Pc> {
    Pc::new(PcConfig {
        mem_size: 4 << 20,
        vcpus: 1,
        clock: ClockKind::Virtual,
        irqchip: IrqchipKind::User,
        lost_ticks: LostTickPolicy::Discard,
        serial_out: Box::new(SharedBuf::default()),
        devices: Vec::new(),
    })
    .context("cannot build the fuzz machine")
}

/// The two machines of one mode, reused from case to case (rebuilt after a
/// divergence, which may leave their devices apart).
pub struct Rig {
    pub mode: Mode,
    pub reference: Reference,
    pub ls: Lockstep,
}

impl Rig {
    pub fn new(mode: Mode, reference: Reference) -> Result<Rig> {
        let probe = Case::generate(mode, 0, 1);
        let state = gen::entry_state(&probe);
        let pa = small_pc()?;
        let pb = small_pc()?;
        gen::write_tables(&pa.machine.mem, mode)?;
        gen::write_tables(&pb.machine.mem, mode)?;
        let a = match reference {
            Reference::Kvm => lockstep::kvm_side("kvm", pa, &state, NS_PER_STEP, NS_PER_EXIT)?,
            Reference::InterpNoCache => {
                lockstep::interp_side("interp-nocache", pa, &state, true, NS_PER_STEP, NS_PER_EXIT)?
            }
        };
        let b = lockstep::interp_side("interp", pb, &state, false, NS_PER_STEP, NS_PER_EXIT)?;
        let mut a = a;
        a.ring3_native = true;
        let mut ls = Lockstep::new(a, b);
        // The sandbox and the stack (not the ring-0 stack, which PVM's ring-3
        // steps write exception frames to on KVM only).
        ls.compare_at_end = vec![(gen::SANDBOX, gen::STACK_TOP - gen::SANDBOX)];
        Ok(Rig {
            mode,
            reference,
            ls,
        })
    }

    /// Loads `case` into both machines.
    fn load(&mut self, case: &Case) -> Result<()> {
        let code = case.code();
        let sandbox = case.sandbox();
        let state = gen::entry_state(case);
        let t = self.ls.reference.now_ns().max(self.ls.subject.now_ns());
        for side in [&mut self.ls.reference, &mut self.ls.subject] {
            let m = side.pc.machine.clone();
            m.mem.write(gen::CODE, &code)?;
            m.mem.write(gen::SANDBOX, &sandbox)?;
            m.mem.zero(
                gen::SANDBOX + gen::SANDBOX_LEN,
                gen::STACK0_TOP - gen::SANDBOX - gen::SANDBOX_LEN,
            )?;
            if let Some(v) = &side.pc.virtual_clock {
                v.advance_to(t);
            }
            side.reset();
            if let lockstep::Cpu::Interp { vcpu, .. } = &mut side.cpu {
                vcpu.invalidate_page(gen::CODE);
            }
            side.v().set_state(&state)?;
            // The 8259A pair at 0x20 / 0xa0 (IRQ 0 only) and PIT counter 0
            // in mode 2 with the case's reload value.
            let out = |port: u64, v: u8| {
                m.pio.write(port, &[v]);
            };
            if case.timer != 0 {
                out(0x43, 0x34);
                out(0x40, case.timer as u8);
                out(0x40, (case.timer >> 8) as u8);
            } else {
                out(0x43, 0x30);
            }
            for (base, vec, icw3, mask) in [(0x20, 0x20, 0x04, 0xfe), (0xa0, 0x28, 0x02, 0xff)] {
                out(base, 0x11);
                out(base + 1, vec);
                out(base + 1, icw3);
                out(base + 1, 0x01);
                out(base + 1, if case.timer == 0 { 0xff } else { mask });
            }
            // Nothing an earlier case left pending (a request in the IRR,
            // an edge seen) reaches this one: a case depends on itself
            // alone, whichever shard and order runs it.
            if let Some(chip) = &side.pc.irqchip {
                let mut pic = chip.pic.lock().unwrap_or_else(|p| p.into_inner());
                let mut st = pic.save_state();
                for p in [&mut st.master, &mut st.slave] {
                    p.irr = 0;
                    p.isr = 0;
                }
                pic.restore_state(&st);
            }
        }
        self.ls.steps = 0;
        self.ls.deliveries = 0;
        Ok(())
    }

    /// Runs `case`; the lockstep's result.
    pub fn run(&mut self, case: &Case) -> Result<Finish> {
        self.load(case)?;
        let max = case.insns.len() as u64 * 8 + 200;
        self.ls
            .run(max, Some(case.end_la()))
            .with_context(|| format!("the case was:\n{}", case.to_text("")))
    }
}

/// What `tandem fuzz` was given.
#[derive(Debug, Clone)]
pub struct FuzzArgs {
    pub seed: u64,
    /// Cases to generate (before sharding).
    pub iterations: u64,
    /// This job's shard and the number of shards.
    pub shard: (u64, u64),
    /// Instructions per case.
    pub len: usize,
    pub modes: Vec<Mode>,
    /// Where divergent cases are saved.
    pub out_dir: PathBuf,
    /// Stop after this many divergences.
    pub max_divergences: usize,
    pub progress: bool,
}

/// Parses `I/N` (0 <= I < N).
pub fn parse_shard(s: &str) -> Result<(u64, u64)> {
    let (i, n) = s.split_once('/').context("--shard is I/N, e.g. 0/4")?;
    let i: u64 = i.trim().parse().context("--shard I is a number")?;
    let n: u64 = n.trim().parse().context("--shard N is a number")?;
    if n == 0 || i >= n {
        bail!("--shard I/N needs 0 <= I < N");
    }
    Ok((i, n))
}

/// The cases of a shard: global indices `k` with `k % N == I`, each with
/// its mode (round robin over `modes` by global index, so every shard
/// covers every mode) and seed (from the campaign seed and `k` alone).
pub fn shard_cases(
    seed: u64,
    iterations: u64,
    shard: (u64, u64),
    modes: &[Mode],
) -> impl Iterator<Item = (u64, Mode, u64)> + '_ {
    (0..iterations)
        .filter(move |k| k % shard.1 == shard.0)
        .map(move |k| {
            let mode = modes[(k % modes.len() as u64) as usize];
            (k, mode, gen::splitmix(seed ^ gen::splitmix(k)))
        })
}

/// One divergence found (after shrinking).
#[derive(Debug, Clone)]
pub struct Found {
    pub case: Case,
    pub report: String,
    pub file: Option<PathBuf>,
    pub original_len: usize,
}

/// The campaign's totals.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub cases: u64,
    pub instructions: u64,
    pub deliveries: u64,
    /// Cases that ended in the catch-all handler (an exception).
    pub ended_early: u64,
    pub per_mode: BTreeMap<Mode, (u64, u64)>,
    pub masked: BTreeMap<Rule, u64>,
    pub found: Vec<Found>,
    pub elapsed: Duration,
}

fn rig_for(rigs: &mut BTreeMap<Mode, Rig>, mode: Mode) -> Result<&mut Rig> {
    if let std::collections::btree_map::Entry::Vacant(e) = rigs.entry(mode) {
        e.insert(Rig::new(mode, reference_for(mode))?);
    }
    rigs.get_mut(&mode).context("rig")
}

/// Runs `case` on a fresh rig: the divergence's mnemonic and report, if it
/// diverges.
fn diverges(case: &Case) -> Result<Option<(Option<Mnemonic>, String)>> {
    let mut rig = Rig::new(case.mode, reference_for(case.mode))?;
    Ok(match rig.run(case)? {
        Finish::Diverged(d) => Some((
            d.mnemonic,
            d.report(&rig.ls.reference.name, &rig.ls.subject.name),
        )),
        _ => None,
    })
}

/// Removes instructions while the case still diverges at the same kind of
/// instruction (greedy, one at a time, until nothing more can go).
pub fn shrink(case: &Case, mnemonic: Option<Mnemonic>) -> Result<(Case, String)> {
    let mut best = case.clone();
    let mut report = match diverges(&best)? {
        Some((_, r)) => r,
        None => {
            return Ok((
                best,
                String::from("(no longer diverges on a fresh machine)"),
            ))
        }
    };
    loop {
        let mut changed = false;
        let mut i = 0;
        while i < best.insns.len() {
            let mut t = best.clone();
            t.insns.remove(i);
            match diverges(&t)? {
                Some((m, r)) if m == mnemonic => {
                    best = t;
                    report = r;
                    changed = true;
                }
                _ => i += 1,
            }
        }
        if !changed {
            break;
        }
    }
    Ok((best, report))
}

fn rig_ref_name(mode: Mode) -> String {
    match reference_for(mode) {
        Reference::Kvm => "kvm".into(),
        Reference::InterpNoCache => "interp-nocache".into(),
    }
}

/// Runs a campaign; prints progress (stderr) and the summary (stdout).
pub fn campaign(args: &FuzzArgs) -> Result<Summary> {
    let start = Instant::now();
    let mut sum = Summary::default();
    let mut rigs: BTreeMap<Mode, Rig> = BTreeMap::new();
    let total = (args.iterations + args.shard.1 - 1 - args.shard.0) / args.shard.1;
    let tty = std::io::stderr().is_terminal();
    let mut last_print = Instant::now();
    for (k, mode, seed) in shard_cases(args.seed, args.iterations, args.shard, &args.modes) {
        let case = Case::generate(mode, seed, args.len);
        let rig = rig_for(&mut rigs, mode)?;
        let finish = rig.run(&case)?;
        let steps = rig.ls.steps;
        let deliveries = rig.ls.deliveries;
        for (r, n) in std::mem::take(&mut rig.ls.masked) {
            *sum.masked.entry(r).or_default() += n;
        }
        sum.cases += 1;
        sum.instructions += steps;
        sum.deliveries += deliveries;
        let e = sum.per_mode.entry(mode).or_default();
        e.0 += 1;
        e.1 += steps;
        match finish {
            Finish::Diverged(d) => {
                rigs.remove(&mode);
                let first = d.report(&rig_ref_name(mode), "interp");
                let (small, mut report) = shrink(&case, d.mnemonic)?;
                if small == case && !report.starts_with("first") {
                    report = format!("{first}(it does not diverge on a fresh machine: state left by an earlier case)\n");
                }
                let note = format!(
                    "campaign seed {:#x}, case {k}, mode {}, reference {}\n{}",
                    args.seed,
                    mode.name(),
                    reference_for(mode).name(),
                    report
                );
                let file = args
                    .out_dir
                    .join(format!("divergence-{}-{seed:016x}.case", mode.name()));
                let saved = std::fs::create_dir_all(&args.out_dir)
                    .and_then(|()| std::fs::write(&file, small.to_text(&note)))
                    .is_ok();
                if tty && args.progress {
                    eprintln!();
                }
                println!(
                    "divergence in case {k} ({}, {} instructions, shrunk to {}){}",
                    mode.name(),
                    case.insns.len(),
                    small.insns.len(),
                    if saved {
                        format!(": saved to {}", file.display())
                    } else {
                        String::new()
                    }
                );
                print!("{report}");
                sum.found.push(Found {
                    case: small,
                    report,
                    file: saved.then_some(file),
                    original_len: case.insns.len(),
                });
                if sum.found.len() >= args.max_divergences {
                    break;
                }
            }
            Finish::Identical { .. } => sum.ended_early += 1,
            Finish::Stopped { .. } => {}
        }
        if args.progress
            && last_print.elapsed() >= Duration::from_millis(if tty { 200 } else { 10_000 })
        {
            last_print = Instant::now();
            progress_line(&sum, total, start.elapsed(), tty);
        }
    }
    if args.progress {
        progress_line(&sum, total, start.elapsed(), tty);
        if tty {
            eprintln!();
        }
    }
    sum.elapsed = start.elapsed();
    Ok(sum)
}

fn progress_line(sum: &Summary, total: u64, elapsed: Duration, tty: bool) {
    let frac = if total == 0 {
        1.0
    } else {
        sum.cases as f64 / total as f64
    };
    let width = 30;
    let filled = ((frac * width as f64) as usize).min(width);
    let rate = sum.instructions as f64 / elapsed.as_secs_f64().max(1e-6);
    let line = format!(
        "fuzz [{}{}] {:>3.0}% {}/{} cases, {} instructions, {:.0} insn/s, {} divergences",
        "#".repeat(filled),
        " ".repeat(width - filled),
        frac * 100.0,
        sum.cases,
        total,
        sum.instructions,
        rate,
        sum.found.len()
    );
    let mut e = std::io::stderr();
    if tty {
        let _ = write!(e, "\r{line}");
    } else {
        let _ = writeln!(e, "{line}");
    }
    let _ = e.flush();
}

/// The summary printed at the end of a campaign.
pub fn summary_text(args: &FuzzArgs, sum: &Summary) -> String {
    let secs = sum.elapsed.as_secs_f64().max(1e-6);
    let mut s = format!(
        "tandem fuzz: seed {:#x}, shard {}/{}: {} cases, {} instructions compared, {} events \
         delivered, {} cases ended in an exception handler, {:.1} s, {:.0} instructions/s; {} \
         divergences\n",
        args.seed,
        args.shard.0,
        args.shard.1,
        sum.cases,
        sum.instructions,
        sum.deliveries,
        sum.ended_early,
        secs,
        sum.instructions as f64 / secs,
        sum.found.len()
    );
    for (mode, (cases, insns)) in &sum.per_mode {
        s.push_str(&format!(
            "  {:<13} {cases} cases, {insns} instructions, reference: {}\n",
            mode.name(),
            reference_for(*mode).name()
        ));
    }
    s.push_str(&format!(
        "  masked by rule: {}\n",
        lockstep::masked_text(&sum.masked)
    ));
    for f in &sum.found {
        s.push_str(&format!(
            "  divergence: {} case of {} instructions, shrunk to {}: {}\n",
            f.case.mode.name(),
            f.original_len,
            f.case.insns.len(),
            f.file
                .as_ref()
                .map_or_else(|| "(not saved)".to_string(), |p| p.display().to_string())
        ));
        if let Some(first) = f.report.lines().next() {
            s.push_str(&format!("    {first}\n"));
        }
    }
    s
}

/// `tandem fuzz`: status 0 no divergence, 1 divergences, 2 error.
pub fn fuzz(args: &FuzzArgs) -> i32 {
    match campaign(args) {
        Ok(sum) => {
            print!("{}", summary_text(args, &sum));
            i32::from(!sum.found.is_empty())
        }
        Err(e) => {
            eprintln!("tandem fuzz: {e:#}");
            2
        }
    }
}

/// `tandem diff --replay FILE`: runs a saved case in lockstep. Status 0
/// identical, 1 diverged, 2 error.
pub fn replay(file: &std::path::Path) -> i32 {
    let r = (|| -> Result<i32> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let case = Case::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let mut rig = Rig::new(case.mode, reference_for(case.mode))?;
        let start = Instant::now();
        let finish = rig.run(&case)?;
        let head = format!(
            "tandem diff --replay {}: {} case, {} instructions, {} against {}",
            file.display(),
            rig.mode.name(),
            case.insns.len(),
            rig.ls.subject.name,
            rig.reference.name()
        );
        Ok(match finish {
            Finish::Diverged(d) => {
                println!("{head}: the processors diverge");
                print!("{}", d.report(&rig.ls.reference.name, &rig.ls.subject.name));
                1
            }
            Finish::Identical { steps, end } => {
                println!(
                    "{head}: identical: {steps} steps, ended ({end}); masked: {}; {:.0} ms",
                    lockstep::masked_text(&rig.ls.masked),
                    start.elapsed().as_secs_f64() * 1e3
                );
                0
            }
            Finish::Stopped { steps } => {
                println!(
                    "{head}: identical: {steps} steps, {} events delivered; masked: {}; {:.0} ms",
                    rig.ls.deliveries,
                    lockstep::masked_text(&rig.ls.masked),
                    start.elapsed().as_secs_f64() * 1e3
                );
                0
            }
        })
    })();
    r.unwrap_or_else(|e| {
        eprintln!("tandem diff: {e:#}");
        2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_cases_exactly_once() {
        let modes = Mode::ALL.to_vec();
        let all: Vec<_> = shard_cases(42, 100, (0, 1), &modes).collect();
        let mut joined: Vec<_> = (0..3)
            .flat_map(|i| shard_cases(42, 100, (i, 3), &modes).collect::<Vec<_>>())
            .collect();
        joined.sort();
        assert_eq!(joined, all);
        // A case is the same whichever shard runs it.
        let s1: Vec<_> = shard_cases(42, 100, (1, 3), &modes).collect();
        assert!(s1.iter().all(|c| all.contains(c)));
        assert_eq!(s1.len(), 33);
    }

    #[test]
    fn shard_syntax() {
        assert_eq!(parse_shard("2/5").unwrap(), (2, 5));
        assert!(parse_shard("5/5").is_err());
        assert!(parse_shard("1/0").is_err());
        assert!(parse_shard("x").is_err());
    }
}
