//! `tandem debug` driven from command files, the gdb stub driven by
//! Debian's gdb, and the move of a running guest between KVM and the
//! interpreter. Each test runs on the interpreter and, where /dev/kvm
//! opens, on KVM (else one `SKIP (no /dev/kvm)` line).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use tandem_tests::{backends, guest, kvm_or_skip, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// The address of `name` in the guest's symbol table (binutils' nm, which
/// builds the guests too).
fn symbol(elf: &Path, name: &str) -> u64 {
    let o = Command::new("nm")
        .arg(elf)
        .output()
        .expect("cannot run nm (binutils)");
    let text = String::from_utf8_lossy(&o.stdout);
    text.lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let (addr, _, sym) = (w.next()?, w.next()?, w.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("no symbol {name} in {}", elf.display()))
}

/// Runs `tandem debug GUEST --backend B -x FILE` with `commands`.
fn debug_script(name: &str, backend: &str, commands: &str) -> Run {
    let g = guest(name);
    let dir = std::env::temp_dir().join(format!("tandem-debug-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}-{backend}-{}.cmd", commands.len()));
    std::fs::write(&file, commands).unwrap();
    let r = run_tandem(
        TANDEM,
        &[
            "debug",
            g.to_str().unwrap(),
            "--backend",
            backend,
            "-x",
            file.to_str().unwrap(),
        ],
    );
    let _ = std::fs::remove_file(&file);
    r
}

/// Asserts that `needles` occur in `hay` in this order; returns the text
/// after the last.
fn in_order<'a>(hay: &'a str, needles: &[&str], ctx: &str) -> &'a str {
    let mut rest = hay;
    for n in needles {
        match rest.find(n) {
            Some(i) => rest = &rest[i + n.len()..],
            None => panic!("{ctx}: expected {n:?} (in this order) in:\n{hay}"),
        }
    }
    rest
}

/// The serial output's result lines (what a plain run prints).
fn results(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL") || l.starts_with("SUMMARY"))
        .collect()
}

#[test]
fn pic_pit_tick_from_irq0_to_eoi() {
    for b in backends("pic_pit_tick_from_irq0_to_eoi") {
        let r = debug_script(
            "pic_pit",
            b,
            "# one PIT tick: IRQ 0 rises, the 8259A requests, vector 0x20 is\n\
             # delivered, the handler's EOI ends it\n\
             break irq 0\n\
             continue\n\
             info pic\n\
             delete 1\n\
             break vector 0x20\n\
             continue\n\
             info pic\n\
             info events\n\
             break eoi 0x20\n\
             continue\n\
             info pic\n\
             info breakpoints\n\
             delete\n\
             continue\n",
        );
        let ctx = format!("pic_pit on {b} (stderr: {})", r.stderr);
        let out = &r.stdout;
        in_order(
            out,
            &[
                "(tandem) break irq 0",
                "breakpoint 1: IRQ 0 rising",
                "(tandem) continue",
                "ISA IRQ 0 rose: 8259A IRR bit 0 set",
                &format!("stopped ({b}): breakpoint 1, IRQ 0 rose"),
                "(tandem) info pic",
                "pic0: irr=01",
                "(tandem) delete 1",
                "(tandem) break vector 0x20",
                "(tandem) continue",
                "vector 0x20 (external interrupt) from the 8259A master IR0",
                "delivered to its handler at",
                &format!("stopped ({b}): breakpoint 2, delivery of vector 0x20"),
                "(tandem) info pic",
                "isr=01",
                "(tandem) info events",
                "RFLAGS.IF=0",
                "last injected: vector 0x20",
                "(tandem) break eoi 0x20",
                "(tandem) continue",
                "EOI of vector 0x20: the 8259A master in-service bit cleared",
                // The interrupt trace's chain of that tick, source to EOI.
                "trace: #",
                "IRQ0 raised by PIT",
                "INTA: IRQ0 in service, vector 0x20",
                "v=20 ",
                "cause: PIT IRQ0 -> PIC master IR0 -> INTA 0x20",
                "delivered v=20: handler entry",
                "master EOI: ISR bit 0 cleared (IRQ0)",
                &format!("stopped ({b}): breakpoint 3, EOI of vector 0x20 (8259A master)"),
                "(tandem) info pic",
                "isr=00",
                "(tandem) delete",
                "deleted 2 breakpoint(s)",
                "SUMMARY: 7 passed, 0 failed",
                "the guest's run ended",
            ],
            &ctx,
        );
        assert_eq!(r.status, 1, "{ctx}");
    }
}

#[test]
fn lapic_timer_interrupt_from_lvt_to_eoi() {
    for b in backends("lapic_timer_interrupt_from_lvt_to_eoi") {
        let r = debug_script(
            "lapic_timer",
            b,
            "break vector 0x40\n\
             continue\n\
             info lapic\n\
             info events\n\
             break eoi 0x40\n\
             continue\n\
             info lapic 0\n\
             delete\n\
             continue\n",
        );
        let ctx = format!("lapic_timer on {b} (stderr: {})", r.stderr);
        in_order(
            &r.stdout,
            &[
                "(tandem) break vector 0x40",
                "(tandem) continue",
                "vector 0x40 (external interrupt) from the LAPIC (LVT timer",
                &format!("stopped ({b}): breakpoint 1, delivery of vector 0x40"),
                "(tandem) info lapic",
                "LVTT    0x00000040",
                "ISR     0x40",
                "(tandem) info events",
                "highest ISR 0x40",
                "(tandem) break eoi 0x40",
                "(tandem) continue",
                "EOI of vector 0x40: the LAPIC in-service bit cleared",
                "trace: #",
                "LAPIC 0 LVT timer fired: vector 0x40",
                "cause: LAPIC 0 timer vector 0x40",
                "delivered v=40: handler entry",
                "LAPIC 0 EOI vector 0x40",
                &format!("stopped ({b}): breakpoint 2, EOI of vector 0x40 (LAPIC)"),
                "(tandem) info lapic 0",
                "ISR     (none)",
                "SUMMARY: 10 passed, 0 failed",
            ],
            &ctx,
        );
        assert_eq!(r.status, 1, "{ctx}");
    }
}

#[test]
fn step_next_until_examine_and_disassemble() {
    let g = guest("pic_pit");
    let handler = symbol(&g, "irq0_handler");
    // The interrupt stubs' common entry: the next tick reaches it.
    let common = symbol(&g, "isr_common");
    for b in backends("step_next_until_examine_and_disassemble") {
        let r = debug_script(
            "pic_pit",
            b,
            &format!(
                "break {handler:#x}\n\
                 continue\n\
                 info regs\n\
                 step\n\
                 stepi 2\n\
                 x {handler:#x} 8\n\
                 disas {handler:#x} 2\n\
                 until {common:#x}\n\
                 info idt\n\
                 delete\n\
                 continue\n"
            ),
        );
        let ctx = format!("stepping on {b} (stderr: {})", r.stderr);
        let after = in_order(
            &r.stdout,
            &[
                &format!("stopped ({b}): breakpoint 1 at {handler:#x}"),
                "(tandem) info regs",
                &format!("backend {b} (64-bit mode)"),
                "(tandem) step",
                &format!("stopped ({b}): step"),
                "(tandem) stepi 2",
                &format!("stopped ({b}): step"),
                &format!("stopped ({b}): step"),
                "(tandem) x",
                &format!("{handler:#018x}: "),
                "(tandem) disas",
                &format!("{handler:#018x}:  "),
                "(tandem) until",
            ],
            &ctx,
        );
        // `until` stops at the address given.
        in_order(
            after,
            &[
                &format!("stopped ({b}): reached {common:#x}"),
                &format!("{common:#018x}:"),
                "(tandem) info idt",
                "0x20: 0008:",
                "interrupt gate",
                "SUMMARY: 7 passed, 0 failed",
            ],
            &ctx,
        );
        // The three steps moved RIP forward instruction by instruction.
        let steps: Vec<&str> = r
            .stdout
            .lines()
            .skip_while(|l| !l.starts_with("(tandem) step"))
            .filter(|l| l.trim_start().starts_with("0x0000"))
            .take(3)
            .collect();
        assert_eq!(steps.len(), 3, "{ctx}\n{}", r.stdout);
        assert!(steps.windows(2).all(|w| w[0] != w[1]), "{ctx}: {steps:?}");
        assert_eq!(r.status, 1, "{ctx}");
    }
}

/// The address of the first `sti; hlt` pair in the guest (binutils'
/// objdump).
fn sti_hlt(elf: &Path) -> u64 {
    let o = Command::new("objdump")
        .arg("-d")
        .arg(elf)
        .output()
        .expect("cannot run objdump (binutils)");
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().collect();
    lines
        .windows(2)
        .find(|w| w[0].trim_end().ends_with("sti") && w[1].trim_end().ends_with("hlt"))
        .and_then(|w| {
            let addr = w[0].split(':').next()?.trim();
            u64::from_str_radix(addr, 16).ok()
        })
        .unwrap_or_else(|| panic!("no sti; hlt in {}", elf.display()))
}

#[test]
fn stepping_a_hlt_waits_and_stops_at_the_handler() {
    let g = guest("pic_pit");
    let sti = sti_hlt(&g);
    let handler = symbol(&g, "isr_stub_32");
    for b in backends("stepping_a_hlt_waits_and_stops_at_the_handler") {
        // After the PIC is set up (the first PASS line), the wait loop's
        // STI; HLT is stepped: the HLT waits for the next tick, which is
        // delivered (the STI shadow has ended) and the step stops at the
        // handler's first instruction, on both processors.
        let r = debug_script(
            "pic_pit",
            b,
            &format!(
                "break 0x{sti:x}\ncontinue\ndelete\nstep\nstep\ninfo events\ndelete\ncontinue\n"
            ),
        );
        let ctx = format!("hlt step on {b} (stderr: {})", r.stderr);
        in_order(
            &r.stdout,
            &[
                &format!("stopped ({b}): breakpoint 1 at {sti:#x}"),
                "sti",
                &format!("stopped ({b}): step"),
                "hlt",
                "delivered v=20",
                &format!("stopped ({b}): delivery of vector 0x20: handler at {handler:#x}"),
                "(tandem) info events",
                "RFLAGS.IF=0",
                "next event:",
                "SUMMARY: 7 passed, 0 failed",
            ],
            &ctx,
        );
        assert_eq!(r.status, 1, "{ctx}");
    }
}

/// A plain run's result lines.
fn plain(name: &str, backend: &str) -> Vec<String> {
    let g = guest(name);
    let r = run_tandem(TANDEM, &["run", g.to_str().unwrap(), "--backend", backend]);
    r.assert_all_passed();
    results(&r.stdout).iter().map(|s| s.to_string()).collect()
}

#[test]
fn switch_kvm_to_interp_and_back_matches_a_plain_run() {
    if !kvm_or_skip("switch_kvm_to_interp_and_back_matches_a_plain_run") {
        return;
    }
    let g = guest("pic_pit");
    let handler = symbol(&g, "irq0_handler");
    let expected = plain("pic_pit", "kvm");
    for (start, other) in [("kvm", "interp"), ("interp", "kvm")] {
        let r = debug_script(
            "pic_pit",
            start,
            &format!(
                "break {handler:#x}\n\
                 continue\n\
                 step 3\n\
                 switch {other}\n\
                 info backend\n\
                 step 10\n\
                 continue\n\
                 switch {start}\n\
                 step 5\n\
                 switch {other}\n\
                 delete\n\
                 continue\n\
                 switch {start}\n"
            ),
        );
        let ctx = format!("switch from {start} (stderr: {})", r.stderr);
        in_order(
            &r.stdout,
            &[
                &format!("stopped ({start}): breakpoint 1"),
                &format!("switched from {start} to {other} at"),
                &format!("(tandem) info backend\n{other}"),
                &format!("stopped ({other}): step"),
                &format!("stopped ({other}): breakpoint 1 at {handler:#x}"),
                &format!("switched from {other} to {start} at {handler:#x}"),
                &format!("stopped ({start}): step"),
                &format!("switched from {start} to {other}"),
                "the guest's run ended",
            ],
            &ctx,
        );
        assert_eq!(results(&r.stdout), expected, "{ctx}\n{}", r.stdout);
        assert_eq!(r.status, 1, "{ctx}");
    }
}

#[test]
fn a_switch_that_cannot_happen_is_refused_with_the_reason() {
    // Switching to the processor already running is refused, and a script
    // stops at the refusal.
    let r = debug_script("hello", "interp", "switch interp\ninfo regs\n");
    assert_eq!(r.status, 1, "{r:?}");
    assert!(
        r.stderr.contains("the guest already runs on interp"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("(tandem) info regs"), "{}", r.stdout);

    // Five address breakpoints do not fit in KVM's four debug registers:
    // the switch is refused before anything moves, and the guest goes on
    // on the interpreter (commands from a pipe go on after an error).
    let g = guest("hello");
    let mut child = Command::new(TANDEM)
        .args(["debug", g.to_str().unwrap(), "--backend", "interp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start tandem");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"break 0x1\nbreak 0x2\nbreak 0x3\nbreak 0x4\nbreak 0x5\n\
                  switch kvm\ninfo backend\ndelete\ncontinue\n",
            )
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let r = Run::from_output(o);
    assert!(
        r.stderr
            .contains("refused: more than 4 address / vector breakpoints"),
        "{r:?}"
    );
    in_order(
        &r.stdout,
        &[
            "(tandem) switch kvm",
            "(tandem) info backend\ninterp",
            "deleted 5 breakpoint(s)",
            "the guest's run ended",
        ],
        "refused switch",
    );
    assert_eq!(r.status, 1, "{r:?}");
}

#[test]
fn gdb_breaks_in_the_interrupt_handler_steps_and_reads_registers() {
    let g = guest("pic_pit");
    let handler = symbol(&g, "irq0_handler");
    if Command::new("gdb").arg("--version").output().is_err() {
        panic!("gdb is not installed (Debian: apt-get install gdb); this test needs it");
    }
    for b in backends("gdb_breaks_in_the_interrupt_handler_steps_and_reads_registers") {
        let mut child = Command::new(TANDEM)
            .args([
                "run",
                g.to_str().unwrap(),
                "--backend",
                b,
                "--gdb",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start tandem");
        // "tandem: waiting for gdb on 127.0.0.1:PORT (...)"
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr = line
            .split_whitespace()
            .nth(5)
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        let o = Command::new("gdb")
            .args(["-batch", "-nx"])
            .args(["-ex", &format!("target remote {addr}")])
            .args(["-ex", &format!("break *{handler:#x}")])
            .args(["-ex", "continue"])
            .args(["-ex", "continue"])
            .args(["-ex", "stepi"])
            .args(["-ex", "info registers rip eflags cs ss"])
            .args(["-ex", "info registers cr0 cr3 efer"])
            .args(["-ex", "x/2i $pc"])
            .args(["-ex", "monitor info pic"])
            .args(["-ex", "delete"])
            .args(["-ex", "continue"])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run gdb");
        let gdb_out = String::from_utf8_lossy(&o.stdout).into_owned();
        let gdb_err = String::from_utf8_lossy(&o.stderr).into_owned();
        let status = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
        let mut stdout = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
        let ctx = format!("gdb on {b}:\n{gdb_out}\n{gdb_err}\ntandem stderr: {line}{rest}");
        let hex = format!("{handler:#018x}");
        in_order(
            &gdb_out,
            &[
                &format!("Breakpoint 1, {hex}"),
                &format!("Breakpoint 1, {hex}"),
                "rip ",
                "eflags",
                "cs             0x8",
                "ss             0x10",
                "cr0            0x8",
                "cr3",
                "efer",
                "=> ",
                "exited with code 01",
            ],
            &ctx,
        );
        // `monitor` output (gdb prints it on stderr): in service in the
        // handler.
        in_order(&gdb_err, &["pic0: irr=", "isr=01"], &ctx);
        // stepi moved off the breakpoint.
        let rip_line = gdb_out
            .lines()
            .find(|l| l.starts_with("rip "))
            .unwrap_or_else(|| panic!("{ctx}"));
        assert!(!rip_line.contains(&format!("{handler:#x} ")), "{ctx}");
        assert!(
            stdout.contains("SUMMARY: 7 passed, 0 failed"),
            "{ctx}\n{stdout}"
        );
        assert_eq!(status.code(), Some(1), "{ctx}");
    }
}

#[test]
fn interpreter_guest_debug_steps_and_breaks() {
    use std::sync::Arc;
    use tandem_core::cpu::{Regs, Segment, Sregs, VcpuState};
    use tandem_core::memory::GuestMemory;
    use tandem_core::vcpu::{Vcpu, VcpuExit};

    // 32-bit flat code at 0x1000: inc eax; inc eax; inc eax; hlt.
    let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
    mem.write(0x1000, &[0x40, 0x40, 0x40, 0xf4]).unwrap();
    let mut v = tandem_interp::InterpVcpu::new(0, mem);
    let mut st = VcpuState {
        regs: Regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        },
        sregs: Sregs {
            cr0: 1,
            cs: Segment::flat(8, 0xb, false),
            ds: Segment::flat(0x10, 3, false),
            ss: Segment::flat(0x10, 3, false),
            es: Segment::flat(0x10, 3, false),
            ..Default::default()
        },
        ..Default::default()
    };
    st.sregs.cs.db = true;
    st.sregs.ss.db = true;
    v.set_state(&st).unwrap();
    v.set_guest_debug(true, &[]).unwrap();
    match v.run().unwrap() {
        VcpuExit::Debug { rip, dr6, .. } => {
            assert_eq!(rip, 0x1001);
            assert_ne!(dr6 & (1 << 14), 0, "DR6.BS");
        }
        e => panic!("{e:?}"),
    }
    v.set_guest_debug(false, &[0x1003]).unwrap();
    match v.run().unwrap() {
        VcpuExit::Debug { rip, dr6, .. } => {
            assert_eq!(rip, 0x1003);
            assert_eq!(dr6 & 0xf, 1, "DR6.B0");
        }
        e => panic!("{e:?}"),
    }
    assert_eq!(v.get_regs().unwrap().rax, 3);
    v.set_guest_debug(false, &[]).unwrap();
    assert_eq!(v.run().unwrap(), VcpuExit::Hlt);
}
