//! The emulation-failure fallback: the `fallback` guest executes LOCK
//! CMPXCHG16B (both outcomes and a misaligned #GP), CMPXCHG8B and, when
//! CPUID offers XSAVE, XGETBV / XSETBV and an XRSTOR / XSAVE round trip.
//! On KVM every check must pass whether KVM executes the instruction or
//! gives up on it and Tandem's interpreter executes it; on a PVM host (which
//! gives up on them at ring 0) the once-per-instruction notes show that the
//! interpreter did. The interpreter backend runs the same guest.

use tandem_tests::{guest, host_is_pvm, kvm_or_skip, run_tandem};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn run(backend: &str) -> tandem_tests::Run {
    let g = guest("fallback");
    run_tandem(
        TANDEM,
        &["run", g.to_str().unwrap(), "--backend", backend, "--stats"],
    )
}

#[test]
fn fallback_guest_on_kvm() {
    if !kvm_or_skip("fallback_guest_on_kvm") {
        return;
    }
    let r = run("kvm");
    r.assert_all_passed();
    for needed in [
        "PASS: cmpxchg16b equal",
        "PASS: cmpxchg16b unequal",
        "PASS: cmpxchg16b misaligned",
    ] {
        assert!(r.stdout.contains(needed), "{needed}:\n{}", r.stdout);
    }
    if host_is_pvm() {
        let note = "tandem: kvm could not execute lock cmpxchg16b; \
                    Tandem's interpreter executed it";
        let notes = r.stderr.lines().filter(|l| *l == note).count();
        assert_eq!(notes, 1, "one note per distinct instruction:\n{}", r.stderr);
        assert!(
            !r.stderr.contains("fallbacks: 0 }"),
            "the fallback ran:\n{}",
            r.stderr
        );
    }
}

#[test]
fn fallback_guest_on_interp() {
    let r = run("interp");
    r.assert_all_passed();
    assert!(
        r.stdout.contains("PASS: cmpxchg16b misaligned"),
        "{}",
        r.stdout
    );
    assert!(
        !r.stderr.contains("could not execute"),
        "no fallback on the interpreter:\n{}",
        r.stderr
    );
}
