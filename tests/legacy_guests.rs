//! The legacy-mode flavours of the exception and interrupt guests: 32-bit
//! protected mode (`exceptions32`, `pic_pit32`, runtime32/) and real mode
//! (`exceptions16`, `pic_pit16`, runtime16/). On `--backend interp` every
//! check passes (an exact count); the same image under
//! `qemu-system-x86_64 -accel tcg` prints the same PASS / FAIL lines and
//! SUMMARY, and so does `--backend kvm` (the KVM on the project's hosts,
//! PVM, runs all but `exceptions32`, whose 32-bit IRET its emulator cannot
//! do).
//!
//! QEMU comes from Debian's `qemu-system-x86`: when `qemu-system-x86_64` is
//! missing the test installs it with apt-get if it runs as root, and
//! otherwise prints one `SKIP (no qemu-system-x86_64): <test>` line and
//! checks the interpreter half only.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_tests::{guest, host_is_pvm, kvm_or_skip, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const QEMU: &str = "qemu-system-x86_64";
/// A QEMU run of these guests takes well under a second (SeaBIOS included).
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);

/// The check lines of a serial log: everything from `PASS: ` / `FAIL: ` /
/// `SUMMARY: ` on. Under QEMU the first guest line shares its line with
/// SeaBIOS's `Booting from ROM..`, so the marker is searched, not required at
/// the start of the line.
fn check_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            ["PASS: ", "FAIL: ", "SUMMARY: "]
                .iter()
                .filter_map(|m| l.find(m))
                .min()
                .map(|i| l[i..].trim_end().to_string())
        })
        .collect()
}

fn summary(r: &Run) -> (u32, u32) {
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("SUMMARY:"))
        .unwrap_or_else(|| panic!("no SUMMARY line:\n{}\n{}", r.stdout, r.stderr));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    (nums[0], nums[1])
}

fn on_path(exe: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(exe).is_file()))
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Whether QEMU is there, installing Debian's qemu-system-x86 once if it is
/// missing and this process is root.
fn qemu_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if on_path(QEMU) {
            return true;
        }
        if !running_as_root() {
            return false;
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = apt(&["update", "-qq"]);
        apt(&["install", "-y", "-qq", "qemu-system-x86"]) && on_path(QEMU)
    })
}

/// Runs `elf` under QEMU TCG with the isa-debug-exit device and COM1 on
/// stdout. `-monitor none`: with `-nographic` alone the monitor is
/// multiplexed onto stdio, and QEMU then refuses `-serial stdio` ("cannot use
/// stdio by multiple character devices").
fn run_qemu(elf: &Path) -> Run {
    let mut child = Command::new(QEMU)
        .args(["-accel", "tcg", "-kernel"])
        .arg(elf)
        .args([
            "-nographic",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-display",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-no-reboot",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if start.elapsed() < QEMU_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "QEMU did not finish {} within {QEMU_TIMEOUT:?}",
                    elf.display()
                );
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Run {
        status: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// `name` on the interpreter: all `checks` checks pass, no instruction is
/// missing; then under QEMU TCG and on KVM: the same check lines.
fn interp_and_qemu(name: &str, checks: u32) {
    let elf = guest(name);
    let elf_str = elf.to_str().expect("UTF-8 path");
    let r = run_tandem(TANDEM, &["run", elf_str, "--backend", "interp"]);
    r.assert_all_passed();
    assert_eq!(summary(&r), (checks, 0), "{name} on interp: {}", r.stdout);
    assert!(
        !r.stderr.contains("not implemented"),
        "{name} used an instruction the interpreter lacks: {}",
        r.stderr
    );
    let tandem_lines = check_lines(&r.stdout);
    assert_eq!(tandem_lines.len(), checks as usize + 1, "{}", r.stdout);

    if !qemu_available() {
        println!("SKIP (no qemu-system-x86_64): {name} (QEMU TCG reference)");
        return;
    }
    let q = run_qemu(&elf);
    let qemu_lines = check_lines(&q.stdout);
    assert_eq!(
        tandem_lines, qemu_lines,
        "{name}: Tandem's check lines (left) differ from QEMU TCG's (right)\n\
         QEMU stdout:\n{}\nQEMU stderr:\n{}",
        q.stdout, q.stderr
    );
    assert_eq!(q.status, 1, "{name} under QEMU: {q:?}");

    // KVM: the same check lines, where the host runs the mode. PVM emulates
    // real mode and 32-bit code in its own instruction emulator, which dies
    // at the first 32-bit IRET (DEVELOPERS.md): exceptions32 IRETs, so it
    // runs on KVM only on VMX / SVM hosts.
    if !kvm_or_skip(&format!("{name} (kvm)")) {
        return;
    }
    if name == "exceptions32" && host_is_pvm() {
        println!("SKIP (PVM dies at the first 32-bit IRET): {name} (kvm)");
        return;
    }
    let k = run_tandem(TANDEM, &["run", elf_str, "--backend", "kvm"]);
    assert_eq!(
        check_lines(&k.stdout),
        tandem_lines,
        "{name}: KVM's check lines (left) differ from the interpreter's (right)\n{}",
        k.stderr
    );
    assert_eq!(k.status, 1, "{name} on kvm: {k:?}");
}

#[test]
fn check_lines_finds_markers_after_firmware_text() {
    let log =
        "SeaBIOS\r\nBooting from ROM..PASS: a\r\n  detail\nFAIL: b\nSUMMARY: 1 passed, 1 failed\n";
    assert_eq!(
        check_lines(log),
        ["PASS: a", "FAIL: b", "SUMMARY: 1 passed, 1 failed"]
    );
}

#[test]
fn exceptions32() {
    interp_and_qemu("exceptions32", 26);
}

#[test]
fn pic_pit32() {
    interp_and_qemu("pic_pit32", 8);
}

#[test]
fn exceptions16() {
    interp_and_qemu("exceptions16", 11);
}

#[test]
fn pic_pit16() {
    interp_and_qemu("pic_pit16", 8);
}
