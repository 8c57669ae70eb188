//! The bundled boot guests, written once and run on each backend: the
//! interpreter always, KVM whenever /dev/kvm opens (one SKIP line
//! otherwise). Both must give the same output and status.

use tandem_tests::{backends, guest, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn run_on(backend: &str, name: &str, extra: &[&str]) -> Run {
    let g = guest(name);
    let mut args = vec!["run", g.to_str().unwrap(), "--backend", backend];
    args.extend_from_slice(extra);
    let r = run_tandem(TANDEM, &args);
    if backend == "interp" {
        assert!(
            !r.stderr.contains("not implemented"),
            "{name} used an instruction the interpreter lacks: {}",
            r.stderr
        );
    }
    r
}

#[test]
fn hello() {
    for b in backends("hello") {
        let r = run_on(b, "hello", &[]);
        assert_eq!(
            r.stdout,
            "Hello from Tandem!\nPASS: multiboot magic and memory map\nSUMMARY: 1 passed, 0 failed\n",
            "{b}: {r:?}"
        );
        r.assert_all_passed();
    }
}

#[test]
fn exit_code_status() {
    for b in backends("exit_code_status") {
        let r = run_on(b, "exit_code", &[]);
        assert_eq!(r.stdout, "exit_code: exiting with 0x2a\n", "{b}");
        assert_eq!(r.status, (0x2a << 1) | 1, "{b}: {r:?}");
    }
}

#[test]
fn triple_fault_is_status_2_with_cs_rip() {
    for b in backends("triple_fault_is_status_2_with_cs_rip") {
        let r = run_on(b, "triple", &[]);
        assert_eq!(r.stdout, "triple: about to fault\n", "{b}");
        assert_eq!(r.status, 2, "{b}: {r:?}");
        let line = r
            .stderr
            .lines()
            .find(|l| l.contains("triple fault"))
            .expect("message");
        // CS:RIP of the faulting UD2 in 64-bit mode, and the instruction.
        assert!(line.contains("triple fault at 0008:"), "{b}: {line}");
        assert!(line.contains("ud2"), "{b}: {line}");
    }
}

#[test]
fn halt_with_interrupts_off_ends_the_run() {
    for b in backends("halt_with_interrupts_off_ends_the_run") {
        let r = run_on(b, "halt_cli", &[]);
        assert_eq!(r.stdout, "halting with interrupts off\n", "{b}");
        assert_eq!(r.status, 4, "{b}: {r:?}");
        assert!(
            r.stderr
                .contains("halted with interrupts disabled at 0008:"),
            "{b}: {r:?}"
        );
    }
}

#[test]
fn outloop_counts_port_exits() {
    for b in backends("outloop_counts_port_exits") {
        let r = run_on(b, "outloop", &["--append", "2000", "--stats"]);
        assert_eq!(r.stdout, "outloop: 2000\n", "{b}: {r:?}");
        assert_eq!(r.status, 1, "{b}");
        // 2000 OUTs to 0x80 plus the serial line and the exit.
        let stats = r
            .stderr
            .lines()
            .find(|l| l.contains("exits:"))
            .expect("stats");
        let io: u64 = stats
            .split("io: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .and_then(|s| s.trim().parse().ok())
            .expect("io count");
        assert!(io >= 2000, "{b}: {stats}");
    }
}

#[test]
fn dump_devices_at_exit() {
    for b in backends("dump_devices_at_exit") {
        let r = run_on(b, "hello", &["--dump-devices"]);
        r.assert_all_passed();
        for section in ["== pic ==", "== pit ==", "== ioapic ==", "== lapic =="] {
            assert!(
                r.stderr.contains(section),
                "{b}: {section} missing:\n{}",
                r.stderr
            );
        }
    }
}

#[test]
fn stdin_reaches_com1() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    for b in backends("stdin_reaches_com1") {
        let mut child = Command::new(TANDEM)
            .args(["run", guest("echo").to_str().unwrap(), "--backend", b])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line, "echo: ready\n", "{b}");
        // Typed after the guest said it is ready, as a person would.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello from the host\n").unwrap();
        drop(stdin);
        let mut rest = String::new();
        for l in out.lines() {
            rest.push_str(&l.unwrap());
            rest.push('\n');
        }
        let status = child.wait().unwrap();
        assert!(
            rest.starts_with("echo: hello from the host\n"),
            "{b}: {rest}"
        );
        assert!(rest.contains("SUMMARY: 1 passed, 0 failed"), "{b}: {rest}");
        assert_eq!(status.code(), Some(1), "{b}");
    }
}
