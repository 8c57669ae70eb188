//! tandem-tests: what the integration tests share — building the project's
//! test guests, running the `tandem` binary, and the KVM availability check
//! that turns a missing /dev/kvm into one `SKIP` line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub mod inproc;
pub mod longmode;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the test guests (once per process) with the system toolchain and
/// returns the directory that holds `<name>.elf`.
pub fn guests_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        let out = root.join("target").join("guests");
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(root.join("tests").join("guests"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("cannot run make: the test guests need make, gcc and binutils");
        assert!(status.success(), "building the test guests failed");
        out
    })
}

/// Path of guest `name` (without `.elf`), building the guests if needed.
pub fn guest(name: &str) -> PathBuf {
    let p = guests_dir().join(format!("{name}.elf"));
    assert!(p.exists(), "guest {} was not built", p.display());
    p
}

/// Whether /dev/kvm opens. When it does not, prints the one SKIP line the
/// project's tests print and returns false.
pub fn kvm_or_skip(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("SKIP (no /dev/kvm): {test}");
    }
    ok
}

/// A KVM that emulates ring 0 in software (see DEVELOPERS.md).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The backends a test written once runs against: the interpreter always,
/// KVM whenever /dev/kvm opens (otherwise one SKIP line for `test`'s KVM
/// half).
pub fn backends(test: &str) -> Vec<&'static str> {
    let mut b = vec!["interp"];
    if kvm_or_skip(&format!("{test} (kvm)")) {
        b.push("kvm");
    }
    b
}

/// The result of one `tandem` run.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(o: Output) -> Run {
        Run {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Asserts the serial output has `SUMMARY: N passed, 0 failed` with N > 0
    /// and no FAIL line, and the status is the debug-exit status for 0.
    pub fn assert_all_passed(&self) {
        assert!(
            !self.stdout.lines().any(|l| l.starts_with("FAIL")),
            "a check failed:\n{}\n{}",
            self.stdout,
            self.stderr
        );
        let summary = self
            .stdout
            .lines()
            .find(|l| l.starts_with("SUMMARY:"))
            .unwrap_or_else(|| panic!("no SUMMARY line:\n{}\n{}", self.stdout, self.stderr));
        assert!(summary.ends_with(", 0 failed"), "{summary}");
        assert!(!summary.starts_with("SUMMARY: 0 passed"), "{summary}");
        assert_eq!(self.status, 1, "status (stderr: {})", self.stderr);
    }
}

/// Runs the `tandem` binary at `exe` with `args` and stdin closed.
pub fn run_tandem(exe: &str, args: &[&str]) -> Run {
    let o = Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot start tandem");
    Run::from_output(o)
}
