//! `tandem diff` and the deterministic mode: every guest of the
//! conformance table (tests/guests.rs) is identical on the interpreter and
//! on KVM, or differs only where a documented rule (README, "tandem diff")
//! says it does; a planted divergence is found and reported with its first
//! event; two deterministic interpreter runs give the same trace; and the
//! device cross-check against KVM's in-kernel irqchip explains every
//! register that differs. KVM halves run whenever /dev/kvm opens.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use tandem_tests::{guest, kvm_or_skip, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn diff(name: &str, extra: &[&str]) -> Run {
    let g = guest(name);
    let mut args = vec!["diff", g.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    run_tandem(TANDEM, &args)
}

/// `tandem diff` on guest `name`: status 0, and either identical or every
/// divergence named with its rule and nothing unexplained.
fn identical_or_documented(name: &str, extra: &[&str]) {
    if !kvm_or_skip(&format!("diff {name}")) {
        return;
    }
    let r = diff(name, extra);
    assert_eq!(r.status, 0, "{name}: {}\n{}", r.stdout, r.stderr);
    let first = r.stdout.lines().next().unwrap_or("");
    assert!(
        first.contains(": identical: ") || first.contains(": identical but for "),
        "{name}: {}",
        r.stdout
    );
    assert!(
        !r.stdout.contains("no documented rule"),
        "{name}: {}",
        r.stdout
    );
    if first.contains("identical but for") {
        let rules = [
            "pvm-ring3-int",
            "kvm-tsc",
            "pvm-late-window",
            "kvm-nmi-queued",
        ];
        for l in r
            .stdout
            .lines()
            .filter(|l| l.starts_with("known divergence"))
        {
            assert!(rules.iter().any(|rule| l.contains(rule)), "{name}: {l}");
        }
        assert!(r.stdout.contains("known divergence (rule "), "{}", r.stdout);
    }
    // The strict reading counts documented divergences too.
    if first.contains("identical but for") {
        let strict = diff(name, &[extra, &["--strict"]].concat());
        assert_eq!(strict.status, 1, "{name} --strict: {}", strict.stdout);
    }
}

#[test]
fn diff_hello() {
    identical_or_documented("hello", &[]);
}
#[test]
fn diff_exceptions() {
    identical_or_documented("exceptions", &[]);
}
#[test]
fn diff_pic_pit() {
    identical_or_documented("pic_pit", &[]);
}
#[test]
fn diff_pit_modes() {
    identical_or_documented("pit_modes", &[]);
}
#[test]
fn diff_lapic_timer() {
    identical_or_documented("lapic_timer", &[]);
}
#[test]
fn diff_lapic_priority() {
    identical_or_documented("lapic_priority", &[]);
}
#[test]
fn diff_lapic_cpu() {
    identical_or_documented("lapic_cpu", &[]);
}
#[test]
fn diff_nmi() {
    identical_or_documented("nmi", &[]);
}
#[test]
fn diff_ioapic() {
    identical_or_documented("ioapic", &[]);
}
#[test]
fn diff_extint() {
    identical_or_documented("extint", &[]);
}
#[test]
fn diff_shadows() {
    identical_or_documented("shadows", &[]);
}
#[test]
fn diff_shadows_movss_mmio() {
    identical_or_documented("shadows", &["--append", "movss-mmio"]);
}
#[test]
fn diff_hlt_wake() {
    identical_or_documented("hlt_wake", &[]);
}

/// The guests whose runs have no documented divergence at all are
/// identical without exceptions (the rules are not a blanket).
#[test]
fn diff_is_exactly_identical_for_timer_and_pic_guests() {
    if !kvm_or_skip("diff_is_exactly_identical_for_timer_and_pic_guests") {
        return;
    }
    for name in ["hello", "pic_pit", "pit_modes", "extint", "hlt_wake"] {
        let r = diff(name, &[]);
        assert_eq!(r.status, 0, "{name}: {}", r.stdout);
        assert!(
            r.stdout
                .lines()
                .next()
                .unwrap_or("")
                .contains(": identical: "),
            "{name}: {}",
            r.stdout
        );
        assert!(!r.stdout.contains("known divergence"), "{}", r.stdout);
    }
}

/// The KVM side gets another command line (`movss-mmio` makes the shadows
/// guest run one more check, which starts by writing the TPR): the diff
/// finds that write as the first divergence, with status 1, the events
/// around it and the code there.
#[test]
fn planted_divergence_is_reported_with_its_first_event() {
    if !kvm_or_skip("planted_divergence_is_reported_with_its_first_event") {
        return;
    }
    let g = guest("shadows");
    let o = Command::new(TANDEM)
        .args(["diff", g.to_str().expect("utf-8 path")])
        .env("TANDEM_DIFF_KVM_APPEND", "movss-mmio")
        .stdin(Stdio::null())
        .output()
        .expect("cannot start tandem");
    let r = Run::from_output(o);
    assert_eq!(r.status, 1, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("the processors diverge"), "{}", r.stdout);
    let kvm_line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("  kvm   : "))
        .unwrap_or_else(|| panic!("no first event on kvm: {}", r.stdout));
    assert!(
        kvm_line.contains("MMIO write 0xfee00080/4 = 0x10"),
        "the first divergent event is the TPR write: {kvm_line}"
    );
    let interp_line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("  interp: "))
        .expect("first event on interp");
    assert!(interp_line.contains("port write 0x03f8/1"), "{interp_line}");
    assert!(
        r.stdout.contains("events around it on kvm:"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("=> #"), "{}", r.stdout);
    assert!(r.stdout.contains("code around 0008:"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("no documented rule explains this divergence"),
        "{}",
        r.stdout
    );
}

fn trace_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-diff-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Two interpreter runs with `--deterministic` give the same trace: the
/// same events at the same virtual times (the virtual clock counts
/// instructions and exits, and timers fire at the instruction where their
/// deadline falls).
#[test]
fn deterministic_interpreter_runs_are_reproducible() {
    for name in ["pic_pit", "lapic_timer"] {
        let g = guest(name);
        let mut traces = Vec::new();
        for n in 0..2 {
            let path = trace_path(&format!("{name}-{n}.jsonl"));
            let _ = std::fs::remove_file(&path);
            let r = run_tandem(
                TANDEM,
                &[
                    "run",
                    g.to_str().expect("utf-8 path"),
                    "--backend",
                    "interp",
                    "--deterministic",
                    "--trace",
                    path.to_str().expect("utf-8 path"),
                ],
            );
            r.assert_all_passed();
            traces.push(std::fs::read_to_string(&path).expect("trace written"));
        }
        let deliveries = traces[0].matches("\"Deliver\"").count();
        assert!(deliveries > 5, "{name}: {deliveries} deliveries");
        assert!(traces[0].contains("\"PortWrite\""), "{name}");
        assert_eq!(
            traces[0].lines().count(),
            traces[1].lines().count(),
            "{name}: event counts"
        );
        for (n, (x, y)) in traces[0].lines().zip(traces[1].lines()).enumerate() {
            assert_eq!(x, y, "{name}: record {n} differs");
        }
    }
}

/// KVM's in-kernel PIC, IOAPIC, LAPIC and PIT against Tandem's at the end
/// of a run: every register that differs has a recorded explanation, and
/// the table shows them.
#[test]
fn device_cross_check_explains_every_difference() {
    if !kvm_or_skip("device_cross_check_explains_every_difference") {
        return;
    }
    let r = diff("pic_pit", &["--devices"]);
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("register"), "{}", r.stdout);
    assert!(!r.stdout.contains("unexplained\n"), "{}", r.stdout);
    assert!(r.stdout.contains("(0 unexplained)"), "{}", r.stdout);
    // The entry-state differences of the in-kernel LAPIC are shown, not
    // hidden.
    assert!(r.stdout.contains("lapic.lvt_lint1"), "{}", r.stdout);
    let strict = diff("pic_pit", &["--devices", "--strict"]);
    assert_eq!(strict.status, 1, "{}", strict.stdout);
}

#[test]
fn diff_errors_are_status_2() {
    let r = run_tandem(TANDEM, &["diff", "/nonexistent/guest.elf"]);
    assert_eq!(r.status, 2, "{r:?}");
    assert!(r.stderr.starts_with("tandem diff: "), "{}", r.stderr);
    // Neither a guest nor --replay; a replay file that is not there.
    let r = run_tandem(TANDEM, &["diff"]);
    assert_eq!(r.status, 2, "{r:?}");
    let r = run_tandem(TANDEM, &["diff", "--replay", "/nonexistent/case"]);
    assert_eq!(r.status, 2, "{r:?}");
    assert!(r.stderr.starts_with("tandem diff: "), "{}", r.stderr);
}

// ----- --lockstep ----------------------------------------------------------

/// `tandem diff --lockstep` on guest `name`: identical instruction by
/// instruction (masked rules listed, never a divergence).
fn lockstep_identical(name: &str, extra: &[&str]) {
    lockstep_identical_ending(name, extra, "ended: DebugExit(");
}

/// The lockstep on guest `name` is identical and ends with `end`.
fn lockstep_identical_ending(name: &str, extra: &[&str], end: &str) {
    if !kvm_or_skip(&format!("diff --lockstep {name}")) {
        return;
    }
    let r = diff(name, &[&["--lockstep", "--timeout", "900"], extra].concat());
    assert_eq!(r.status, 0, "{name}: {}\n{}", r.stdout, r.stderr);
    let first = r.stdout.lines().next().unwrap_or("");
    assert!(first.contains(": identical: "), "{name}: {}", r.stdout);
    assert!(first.contains(end), "{name}: {first}");
}

// The guests outside the conformance table: the CPUID listing and the
// fallback's instructions (identical on PVM since the interpreter takes the
// CPUID a probe measured), an exit status, a dead HLT, a triple fault and
// 100 000 port writes.

#[test]
fn diff_cpuid() {
    identical_or_documented("cpuid", &[]);
}

#[test]
fn diff_fallback() {
    identical_or_documented("fallback", &[]);
}

#[test]
fn diff_exit_code() {
    identical_or_documented("exit_code", &[]);
}

#[test]
fn diff_halt_cli() {
    identical_or_documented("halt_cli", &[]);
}

#[test]
fn diff_triple() {
    identical_or_documented("triple", &[]);
}

#[test]
fn diff_outloop() {
    identical_or_documented("outloop", &[]);
}

#[test]
fn lockstep_cpuid() {
    lockstep_identical("cpuid", &[]);
}

#[test]
fn lockstep_fallback() {
    lockstep_identical("fallback", &[]);
}

#[test]
fn lockstep_exit_code() {
    lockstep_identical_ending("exit_code", &[], "ended: DebugExit(42)");
}

#[test]
fn lockstep_halt_cli() {
    lockstep_identical_ending("halt_cli", &[], "ended: halt nothing can end");
}

#[test]
fn lockstep_triple() {
    lockstep_identical_ending("triple", &[], "ended: triple fault");
}

#[test]
fn lockstep_hello() {
    lockstep_identical("hello", &[]);
}
#[test]
fn lockstep_exceptions() {
    lockstep_identical("exceptions", &[]);
}
#[test]
fn lockstep_pic_pit() {
    lockstep_identical("pic_pit", &[]);
}
#[test]
fn lockstep_pit_modes() {
    lockstep_identical("pit_modes", &[]);
}
#[test]
fn lockstep_lapic_timer() {
    lockstep_identical("lapic_timer", &[]);
}
#[test]
fn lockstep_lapic_priority() {
    lockstep_identical("lapic_priority", &[]);
}
#[test]
fn lockstep_lapic_cpu() {
    lockstep_identical("lapic_cpu", &[]);
}
#[test]
fn lockstep_nmi() {
    lockstep_identical("nmi", &[]);
}
#[test]
fn lockstep_ioapic() {
    lockstep_identical("ioapic", &[]);
}
#[test]
fn lockstep_extint() {
    lockstep_identical("extint", &[]);
}
#[test]
fn lockstep_shadows() {
    lockstep_identical("shadows", &[]);
}
#[test]
fn lockstep_shadows_movss_mmio() {
    lockstep_identical("shadows", &["--append", "movss-mmio"]);
}
#[test]
fn lockstep_hlt_wake() {
    lockstep_identical("hlt_wake", &[]);
}

// ----- several vCPUs -------------------------------------------------------

/// The numbers after "vCPU k: " in a report line, one entry per vCPU.
fn per_vcpu_mentions(line: &str) -> usize {
    (0..8)
        .filter(|k| line.contains(&format!("vCPU {k}: ")))
        .count()
}

/// `--smp 4`: the BSP starts three APs with INIT / SIPI and each sends it
/// an IPI. KVM runs the vCPUs as threads, so each vCPU's writes and
/// deliveries are compared on their own, the IPIs from other vCPUs as a
/// set; the run is identical, every vCPU is reported, and the BSP took the
/// three IPIs.
#[test]
fn diff_smp() {
    if !kvm_or_skip("diff_smp") {
        return;
    }
    let r = diff("smp", &["--smp", "4"]);
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    let first = r.stdout.lines().next().unwrap_or("");
    assert!(first.contains(": identical: 4 vCPUs"), "{}", r.stdout);
    assert_eq!(per_vcpu_mentions(first), 4, "{first}");
    assert!(
        first.contains("vCPU 0: ") && first.contains("3 deliveries (3 of them IPIs"),
        "{first}"
    );
    assert!(first.contains("DebugExit(0)"), "{first}");
}

/// `--lockstep --smp 4`: both sides hold four vCPUs, stepped in one
/// round-robin order; identical instruction by instruction, the APs ran
/// (their real-mode trampoline) and the BSP took their IPIs.
#[test]
fn lockstep_smp() {
    if !kvm_or_skip("lockstep_smp") {
        return;
    }
    let r = diff("smp", &["--lockstep", "--smp", "4", "--timeout", "900"]);
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    let first = r.stdout.lines().next().unwrap_or("");
    assert!(first.contains(": identical: "), "{}", r.stdout);
    assert!(first.contains("ended: DebugExit("), "{first}");
    assert!(first.contains("4 vCPUs in round robin"), "{first}");
    assert_eq!(per_vcpu_mentions(first), 4, "{first}");
    assert!(first.contains(" 3 events delivered"), "{first}");
    for k in 1..4 {
        let ap = first
            .split(&format!("vCPU {k}: "))
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(ap > 0, "vCPU {k} took no step: {first}");
    }
}

#[test]
fn diff_smp_rejects_zero_vcpus() {
    let g = guest("smp");
    let r = run_tandem(
        TANDEM,
        &["diff", g.to_str().expect("utf-8 path"), "--smp", "0"],
    );
    assert_eq!(r.status, 2, "{r:?}");
    assert!(r.stderr.starts_with("tandem diff: "), "{}", r.stderr);
}

/// `echo` reads a line from COM1: `--input` feeds the same bytes to both
/// sides, one each time the guest polls an empty receiver, so the line
/// arrives whole (no byte lost to the driver's FIFO reset) at the same
/// point of both runs.
#[test]
fn diff_echo_with_paced_input() {
    if !kvm_or_skip("diff echo --input") {
        return;
    }
    let short = diff("echo", &["--input", "hi\n"]);
    let long = diff("echo", &["--input", "hello from diff\n"]);
    for r in [&short, &long] {
        assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
        assert!(r.stdout.contains(": identical: "), "{}", r.stdout);
    }
    let bytes = |r: &Run| -> usize {
        let s = r
            .stdout
            .split(" bytes of serial output")
            .next()
            .unwrap_or("");
        s.rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    // Every byte of the longer line came back in the echo.
    assert_eq!(
        bytes(&long) - bytes(&short),
        "hello from diff".len() - "hi".len()
    );
}

#[test]
fn lockstep_echo_with_paced_input() {
    lockstep_identical("echo", &["--input", "typed\n"]);
}
