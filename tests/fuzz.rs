//! `tandem fuzz` and `tandem diff --replay`: a planted wrong flag result
//! (TANDEM_INTERP_PLANTED_BUG) is found by the fuzzer and by the lockstep
//! and named first; a saved case replays; shards split a campaign
//! deterministically; a small campaign over every mode finds nothing
//! unexplained; and the interpreter bugs the fuzzer found stay fixed. KVM
//! halves run whenever /dev/kvm opens.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use tandem_core::memory::GuestMemory;
use tandem_core::vcpu::{Vcpu, VcpuExit};
use tandem_interp::InterpVcpu;
use tandem_tests::longmode::{long_mode_state, CODE_ADDR};
use tandem_tests::{kvm_or_skip, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");
const PLANTED: (&str, &str) = ("TANDEM_INTERP_PLANTED_BUG", "adc-carry-flag");

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tandem-fuzz-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

fn tandem_with(args: &[&str], env: Option<(&str, &str)>) -> Run {
    let mut c = Command::new(TANDEM);
    c.args(args);
    if let Some((k, v)) = env {
        c.env(k, v);
    }
    Run::from_output(c.output().expect("cannot start tandem"))
}

/// A summary line's number before `what` ("... 1234 instructions compared").
fn number_before(text: &str, what: &str) -> u64 {
    let at = text
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} in {text}"));
    text[..at]
        .split_whitespace()
        .last()
        .and_then(|w| w.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no number before {what:?} in {text}"))
}

#[test]
fn the_planted_adc_bug_is_found_by_the_fuzzer_and_the_lockstep_first() {
    if !kvm_or_skip("the_planted_adc_bug_is_found_by_the_fuzzer_and_the_lockstep_first") {
        return;
    }
    let dir = temp_dir("planted");
    let out = dir.to_str().expect("utf-8 path");
    let r = tandem_with(
        &[
            "fuzz",
            "--seed",
            "11",
            "--iterations",
            "40",
            "--len",
            "16",
            "--modes",
            "long64-ring0",
            "--out",
            out,
            "--max-divergences",
            "1",
            "--quiet",
        ],
        Some(PLANTED),
    );
    assert_eq!(r.status, 1, "{}\n{}", r.stdout, r.stderr);
    // The report names the wrong instruction first, and the flag.
    let first = r
        .stdout
        .lines()
        .find(|l| l.starts_with("first divergent instruction:"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(first.contains(" adc "), "{first}");
    assert!(r.stdout.contains("differing bits CF"), "{}", r.stdout);
    // Shrunk to the ADC and what it needs at most.
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("divergence in case"))
        .expect("divergence line");
    assert!(line.contains("shrunk to"), "{line}");
    let shrunk = number_before(line.split("shrunk to").nth(1).map_or("", |t| t), ")");
    assert!(shrunk <= 16, "{line}");
    // The saved case replays in lockstep: the planted bug diverges at the
    // ADC, the correct interpreter is identical.
    let file = std::fs::read_dir(&dir)
        .expect("case dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "case"))
        .expect("a saved case");
    let f = file.to_str().expect("utf-8 path");
    let text = std::fs::read_to_string(&file).expect("case text");
    assert!(text.contains("\nmode long64-ring0\n"), "{text}");
    let bad = tandem_with(&["diff", "--replay", f], Some(PLANTED));
    assert_eq!(bad.status, 1, "{}\n{}", bad.stdout, bad.stderr);
    let mut lines = bad.stdout.lines();
    assert!(
        lines.next().is_some_and(|l| l.contains("diverge")),
        "{}",
        bad.stdout
    );
    let first = lines.next().unwrap_or("");
    assert!(
        first.starts_with("first divergent instruction:") && first.contains(" adc "),
        "{}",
        bad.stdout
    );
    let good = tandem_with(&["diff", "--replay", f], None);
    assert_eq!(good.status, 0, "{}\n{}", good.stdout, good.stderr);
    assert!(good.stdout.contains(": identical: "), "{}", good.stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_saved_case_replays() {
    let dir = temp_dir("replay");
    let file = dir.join("hand.case");
    // add eax, ecx; adc edx, [rbx + 0x10]; shld rsi, rdi, 1; xadd r14d, r14d
    std::fs::write(
        &file,
        "# written by hand\nmode long64-ring0\nseed 0x1234\ntimer 0\n\
         insn 01 c8\ninsn 13 53 10\ninsn 48 0f a4 fe 01\ninsn 45 0f c1 f6\n",
    )
    .expect("write case");
    let f = file.to_str().expect("utf-8 path");
    let r = run_tandem(TANDEM, &["diff", "--replay", f]);
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("long64-ring0 case, 4 instructions"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains(": identical: 4 steps"), "{}", r.stdout);
    // A broken file is an error (status 2), not a divergence.
    std::fs::write(&file, "mode long64-ring0\nseed 1\ninsn zz\n").expect("write");
    let r = run_tandem(TANDEM, &["diff", "--replay", f]);
    assert_eq!(r.status, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("bad instruction bytes"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shards_split_a_campaign_deterministically() {
    let dir = temp_dir("shards");
    let out = dir.to_str().expect("utf-8 path");
    let run = |shard: &str| {
        let r = run_tandem(
            TANDEM,
            &[
                "fuzz",
                "--seed",
                "7",
                "--iterations",
                "12",
                "--len",
                "8",
                "--modes",
                "prot32",
                "--shard",
                shard,
                "--out",
                out,
                "--quiet",
            ],
        );
        assert_eq!(r.status, 0, "{shard}: {}\n{}", r.stdout, r.stderr);
        (
            number_before(&r.stdout, "cases,"),
            number_before(&r.stdout, "instructions compared"),
        )
    };
    let whole = run("0/1");
    let a = run("0/2");
    let b = run("1/2");
    assert_eq!(whole.0, 12);
    assert_eq!((a.0, b.0), (6, 6));
    assert_eq!(
        a.1 + b.1,
        whole.1,
        "the shards' instructions add up to the whole"
    );
    assert_eq!(run("1/2"), b, "a shard is the same every time");
    let bad = run_tandem(TANDEM, &["fuzz", "--shard", "2/2", "--iterations", "1"]);
    assert_ne!(bad.status, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every mode, a few hundred instructions each: nothing unexplained.
#[test]
fn a_small_campaign_over_every_mode_is_identical() {
    let dir = temp_dir("small");
    let out = dir.to_str().expect("utf-8 path");
    let r = run_tandem(
        TANDEM,
        &[
            "fuzz",
            "--seed",
            "2024",
            "--iterations",
            "24",
            "--len",
            "24",
            "--out",
            out,
            "--quiet",
        ],
    );
    assert_eq!(r.status, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("; 0 divergences"), "{}", r.stdout);
    for mode in ["real16", "prot32", "long64-ring0", "long64-ring3"] {
        assert!(
            r.stdout.contains(&format!("  {mode}")),
            "{mode}: {}",
            r.stdout
        );
    }
    assert!(number_before(&r.stdout, "instructions compared") >= 24 * 20);
    let _ = std::fs::remove_dir_all(&dir);
}

// ----- interpreter bugs the fuzzer found (each diverged from KVM) ---------

/// Runs `code` (64-bit ring 0, then HLT) on the interpreter from `regs`.
fn interp_run(
    code: &[u8],
    setup: impl FnOnce(&mut tandem_core::cpu::Regs),
) -> tandem_core::cpu::Regs {
    let mem = Arc::new(GuestMemory::new(8 << 20).expect("memory"));
    let state = long_mode_state(&mem, CODE_ADDR).expect("long mode");
    let mut all = code.to_vec();
    all.push(0xf4);
    mem.write(CODE_ADDR, &all).expect("code");
    let mut v = InterpVcpu::new(0, mem);
    v.set_state(&state).expect("state");
    let mut r = v.get_regs().expect("regs");
    setup(&mut r);
    v.set_regs(&r).expect("regs");
    assert_eq!(v.run().expect("run"), VcpuExit::Hlt);
    v.get_regs().expect("regs")
}

/// `shld rsi, rdi, 1` (64-bit): CF is bit 63 of the destination; the
/// interpreter shifted a u128 by 128 to find it (a panic in debug builds).
#[test]
fn shld_64_bit_carry_is_the_last_bit_out() {
    let r = interp_run(&[0x48, 0x0f, 0xa4, 0xfe, 0x01], |r| {
        r.rsi = 0x8000_0000_0000_0001;
        r.rdi = 0x8000_0000_0000_0000;
    });
    assert_eq!(r.rsi, 0x0000_0000_0000_0003);
    assert_eq!(r.rflags & 1, 1, "CF = the old bit 63");
    let r = interp_run(&[0x48, 0x0f, 0xa4, 0xfe, 0x01], |r| {
        r.rsi = 0x4000_0000_0000_0000;
        r.rdi = 0;
    });
    assert_eq!(r.rflags & 1, 0);
}

/// `xadd r14d, r14d`: SRC := DEST, then DEST := sum; one register keeps
/// the sum (KVM: 0xb8, the interpreter had 0x5c).
#[test]
fn xadd_with_one_register_keeps_the_sum() {
    let r = interp_run(&[0x45, 0x0f, 0xc1, 0xf6], |r| r.r14 = 0x5c);
    assert_eq!(r.r14, 0xb8);
}

/// A 32-bit shift, rotate or double shift by a masked count of 0 still
/// writes its register: the upper half is cleared, as on hardware (64-bit
/// ring 3 run natively on KVM).
#[test]
fn a_32_bit_shift_by_zero_zero_extends() {
    // ror esi, cl
    let r = interp_run(&[0xd3, 0xce], |r| {
        r.rsi = 0x84ea_42a9_8c7d_d91f;
        r.rcx = 0x20;
    });
    assert_eq!(r.rsi, 0x8c7d_d91f);
    // shrd r14d, r8d, cl
    let r = interp_run(&[0x45, 0x0f, 0xad, 0xc6], |r| {
        r.r14 = 0x1b2d_2a13_24c3_6153;
        r.rcx = 0;
    });
    assert_eq!(r.r14, 0x24c3_6153);
    // The 64-bit form by 0 changes nothing.
    let r = interp_run(&[0x48, 0xd3, 0xce], |r| {
        r.rsi = 0x84ea_42a9_8c7d_d91f;
        r.rcx = 0x40;
    });
    assert_eq!(r.rsi, 0x84ea_42a9_8c7d_d91f);
}

/// `cmpxchg r12d, eax` with EAX unequal: EAX takes the destination and the
/// destination register is not written (its upper half stays; the
/// interpreter wrote it back, zero-extended).
#[test]
fn cmpxchg_32_bit_register_unequal_leaves_the_destination() {
    let r = interp_run(&[0x41, 0x0f, 0xb1, 0xc4], |r| {
        r.r12 = 0x7df7_2366_fccf_14ae;
        r.rax = 0x1234;
    });
    assert_eq!(r.r12, 0x7df7_2366_fccf_14ae);
    assert_eq!(r.rax, 0xfccf_14ae);
    assert_eq!(r.rflags & 0x40, 0, "ZF clear: unequal");
}
