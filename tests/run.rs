//! The bundled guests on the KVM backend with Tandem's device model. Each
//! test runs whenever /dev/kvm opens and prints one SKIP line otherwise.

use tandem_tests::{guest, kvm_or_skip, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn run_kvm(name: &str, extra: &[&str]) -> Run {
    let g = guest(name);
    let mut args = vec!["run", g.to_str().unwrap(), "--backend", "kvm"];
    args.extend_from_slice(extra);
    run_tandem(TANDEM, &args)
}

#[test]
fn hello() {
    if !kvm_or_skip("hello") {
        return;
    }
    let r = run_kvm("hello", &[]);
    assert!(r.stdout.starts_with("Hello from Tandem!\n"), "{r:?}");
    assert!(r.stdout.contains("PASS: multiboot magic and memory map"));
    r.assert_all_passed();
}

#[test]
fn exit_code_status() {
    if !kvm_or_skip("exit_code_status") {
        return;
    }
    let r = run_kvm("exit_code", &[]);
    assert_eq!(r.stdout, "exit_code: exiting with 0x2a\n");
    assert_eq!(r.status, (0x2a << 1) | 1);
}

#[test]
fn triple_fault_is_status_2_with_cs_rip() {
    if !kvm_or_skip("triple_fault_is_status_2_with_cs_rip") {
        return;
    }
    let r = run_kvm("triple", &[]);
    assert_eq!(r.stdout, "triple: about to fault\n");
    assert_eq!(r.status, 2, "{r:?}");
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("triple fault"))
        .expect("message");
    // CS:RIP of the faulting UD2 in 64-bit mode, and the instruction.
    assert!(line.contains("triple fault at 0008:"), "{line}");
    assert!(line.contains("ud2"), "{line}");
}

#[test]
fn halt_with_interrupts_off_ends_the_run() {
    if !kvm_or_skip("halt_with_interrupts_off_ends_the_run") {
        return;
    }
    let r = run_kvm("halt_cli", &[]);
    assert_eq!(r.stdout, "halting with interrupts off\n");
    assert_eq!(r.status, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("halted with interrupts disabled at 0008:"),
        "{r:?}"
    );
}

#[test]
fn outloop_counts_port_exits() {
    if !kvm_or_skip("outloop_counts_port_exits") {
        return;
    }
    let r = run_kvm("outloop", &["--append", "2000", "--stats"]);
    assert_eq!(r.stdout, "outloop: 2000\n", "{r:?}");
    assert_eq!(r.status, 1);
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
    assert!(io >= 2000, "{stats}");
}

#[test]
fn dump_devices_at_exit() {
    if !kvm_or_skip("dump_devices_at_exit") {
        return;
    }
    let r = run_kvm("hello", &["--dump-devices"]);
    r.assert_all_passed();
    for section in ["== pic ==", "== pit ==", "== ioapic ==", "== lapic =="] {
        assert!(
            r.stderr.contains(section),
            "{section} missing:\n{}",
            r.stderr
        );
    }
}

#[test]
fn stdin_reaches_com1() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    if !kvm_or_skip("stdin_reaches_com1") {
        return;
    }
    let mut child = Command::new(TANDEM)
        .args(["run", guest("echo").to_str().unwrap(), "--backend", "kvm"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "echo: ready\n");
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
    assert!(rest.starts_with("echo: hello from the host\n"), "{rest}");
    assert!(rest.contains("SUMMARY: 1 passed, 0 failed"), "{rest}");
    assert_eq!(status.code(), Some(1));
}
