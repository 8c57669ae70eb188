//! `tandem run --trace`: the project's `pic_pit` and `lapic_timer` guests
//! traced on the interpreter and on KVM (whenever /dev/kvm opens), checking
//! that one tick's chain appears in order — the source, the controller, the
//! injection, the delivery at the handler, the EOI — with the same vector
//! and handler address on both processors; and the three file formats.

use std::path::PathBuf;

use tandem_tests::{backends, guest, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// A fresh path for a trace file of this test process.
fn trace_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tandem-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

/// Runs `guest_name` on `backend` with `--trace` into `file`; returns the
/// run and the trace's text.
fn traced_run(guest_name: &str, backend: &str, file: &str) -> (Run, String) {
    let g = guest(guest_name);
    let path = trace_path(file);
    let _ = std::fs::remove_file(&path);
    let run = run_tandem(
        TANDEM,
        &[
            "run",
            g.to_str().expect("utf-8 path"),
            "--backend",
            backend,
            "--trace",
            path.to_str().expect("utf-8 path"),
        ],
    );
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("no trace written ({e}): {}", run.stderr));
    (run, text)
}

/// The raw value of `key` in a JSON-lines object written by the tracer
/// (strings without their quotes). The writer puts no spaces and escapes
/// quotes, so the next unescaped `,` or `}` ends a non-string value.
fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat)? + pat.len();
    let rest = &line[start..];
    if let Some(s) = rest.strip_prefix('"') {
        let mut out = String::new();
        let mut esc = false;
        for c in s.chars() {
            match (esc, c) {
                (true, c) => {
                    out.push(c);
                    esc = false;
                }
                (false, '\\') => esc = true,
                (false, '"') => return Some(out),
                (false, c) => out.push(c),
            }
        }
        None
    } else {
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    }
}

fn is(line: &str, event: &str, fields: &[(&str, &str)]) -> bool {
    field(line, "event").as_deref() == Some(event)
        && fields
            .iter()
            .all(|(k, v)| field(line, k).as_deref() == Some(*v))
}

/// Finds, in order, events matching each step of one flow (the tracer's
/// link from the source to the handler); returns the vector and the
/// handler's CS:RIP of the first complete chain. `source` picks the start;
/// `controller` the step that must come between it and the injection (if
/// any); `eoi` (given the vector) the end.
fn find_chain(
    lines: &[&str],
    source: &dyn Fn(&str) -> bool,
    controller: Option<&dyn Fn(&str) -> bool>,
    eoi: &dyn Fn(&str, &str) -> bool,
) -> Option<(String, String)> {
    let chain_from = |i: usize| -> Option<(String, String)> {
        let flow = field(lines[i], "flow")?;
        let in_flow = |l: &str| field(l, "flow").as_deref() == Some(flow.as_str());
        let rest = &lines[i + 1..];
        let mut at = 0;
        if let Some(c) = controller {
            at = rest.iter().position(|l| c(l) && in_flow(l))? + 1;
        }
        let inj = at
            + rest[at..]
                .iter()
                .position(|l| is(l, "Inject", &[]) && in_flow(l))?;
        let vector = field(rest[inj], "vector")?;
        let del = inj
            + rest[inj..]
                .iter()
                .position(|l| is(l, "Deliver", &[("vector", &vector)]) && in_flow(l))?;
        if field(rest[del], "flow_phase").as_deref() != Some("end") {
            return None;
        }
        let handler = format!("{}:{}", field(rest[del], "cs")?, field(rest[del], "rip")?);
        rest[del..].iter().position(|l| eoi(l, &vector))?;
        Some((vector, handler))
    };
    (0..lines.len())
        .filter(|&i| source(lines[i]))
        .find_map(chain_from)
}

/// pic_pit: IRQ 0 raised by the PIT -> PIC IRR bit 0 -> injection -> the
/// handler -> the master's EOI.
fn pic_pit_chain(text: &str) -> (String, String) {
    let lines: Vec<&str> = text.lines().collect();
    find_chain(
        &lines,
        &|l| {
            is(
                l,
                "IrqLine",
                &[("source", "PIT"), ("line", "0"), ("level", "true")],
            )
        },
        Some(&|l| {
            is(
                l,
                "PicIrr",
                &[("chip", "PIC master"), ("irq", "0"), ("set", "true")],
            )
        }),
        &|l, _| is(l, "PicEoi", &[("chip", "PIC master"), ("irq", "0")]),
    )
    .unwrap_or_else(|| panic!("no complete IRQ 0 chain in the trace:\n{}", head(text)))
}

/// lapic_timer: the LAPIC timer fires -> injection -> the handler -> the
/// LAPIC EOI of that vector.
fn lapic_timer_chain(text: &str) -> (String, String) {
    let lines: Vec<&str> = text.lines().collect();
    find_chain(
        &lines,
        &|l| is(l, "LapicLvt", &[("lvt", "timer")]),
        None,
        &|l, v| is(l, "Eoi", &[("vector", v)]),
    )
    .unwrap_or_else(|| {
        panic!(
            "no complete LAPIC timer chain in the trace:\n{}",
            head(text)
        )
    })
}

fn head(text: &str) -> String {
    text.lines().take(80).collect::<Vec<_>>().join("\n")
}

#[test]
fn pic_pit_tick_chain_is_the_same_on_both_processors() {
    let mut seen = Vec::new();
    for b in backends("trace pic_pit") {
        let (run, text) = traced_run("pic_pit", b, &format!("pic_pit_{b}.jsonl"));
        run.assert_all_passed();
        let (vector, handler) = pic_pit_chain(&text);
        assert_eq!(vector, "0x20", "{b}: ICW2 base 0x20 | IR0");
        seen.push((b, vector, handler));
    }
    for w in seen.windows(2) {
        assert_eq!(
            (&w[0].1, &w[0].2),
            (&w[1].1, &w[1].2),
            "{} and {} disagree",
            w[0].0,
            w[1].0
        );
    }
}

#[test]
fn lapic_timer_tick_chain_is_the_same_on_both_processors() {
    let mut seen = Vec::new();
    for b in backends("trace lapic_timer") {
        let (run, text) = traced_run("lapic_timer", b, &format!("lapic_timer_{b}.jsonl"));
        run.assert_all_passed();
        let (vector, handler) = lapic_timer_chain(&text);
        seen.push((b, vector, handler));
    }
    for w in seen.windows(2) {
        assert_eq!(
            (&w[0].1, &w[0].2),
            (&w[1].1, &w[1].2),
            "{} and {} disagree",
            w[0].0,
            w[1].0
        );
    }
}

#[test]
fn text_trace_reads_like_qemu_d_int_with_causes() {
    for b in backends("trace text") {
        let (run, text) = traced_run("pic_pit", b, &format!("pic_pit_{b}.txt"));
        run.assert_all_passed();
        let inj = text
            .lines()
            .find(|l| l.contains("v=20 e=0000 i=0 IP=0008:"))
            .unwrap_or_else(|| panic!("{b}: no injection line:\n{}", head(&text)));
        assert!(
            inj.contains("cause: PIT IRQ0 -> PIC master IR0 -> INTA 0x20"),
            "{b}: {inj}"
        );
        assert!(text.contains("handler entry 0008:"), "{b}");
        assert!(text.contains("IRQ0 raised by PIT"), "{b}");
    }
}

#[test]
fn chrome_trace_has_tracks_and_flows() {
    for b in backends("trace chrome") {
        let (run, text) = traced_run("lapic_timer", b, &format!("lapic_timer_{b}.json"));
        run.assert_all_passed();
        let t = text.trim_end();
        assert!(t.starts_with("{\"traceEvents\":["), "{b}: {}", head(&text));
        assert!(t.ends_with('}'), "{b}: unterminated");
        for track in ["\"LAPIC 0\"", "\"vCPU 0\""] {
            assert!(text.contains(track), "{b}: no track {track}");
        }
        // Every flow that ends at a handler began somewhere.
        let ids = |dir: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.contains(dir))
                .filter_map(|l| field(l, "bind_id"))
                .collect()
        };
        let outs = ids("\"flow_out\":true");
        let ins = ids("\"flow_in\":true");
        assert!(!ins.is_empty(), "{b}: no flows");
        assert!(ins.iter().all(|i| outs.contains(i)), "{b}: unmatched flow");
        assert!(text.contains("\"ph\":\"M\"") && text.contains("\"ts\":"));
    }
}

#[test]
fn trace_is_refused_with_the_kernel_irqchip_and_an_unknown_extension() {
    let g = guest("pic_pit");
    let g = g.to_str().expect("utf-8 path");
    let bad = trace_path("out.bin");
    let r = run_tandem(
        TANDEM,
        &[
            "run",
            g,
            "--backend",
            "interp",
            "--trace",
            bad.to_str().expect("utf-8"),
        ],
    );
    // Refused before the guest runs (status 1 is also Tandem's error
    // status): no serial output.
    assert!(!r.stdout.contains("SUMMARY"), "{}", r.stdout);
    assert!(r.stderr.contains(".jsonl"), "{}", r.stderr);
    let out = trace_path("kernel.txt");
    let r = run_tandem(
        TANDEM,
        &[
            "run",
            g,
            "--backend",
            "kvm",
            "--irqchip",
            "kernel",
            "--trace",
            out.to_str().expect("utf-8"),
        ],
    );
    assert!(!r.stdout.contains("SUMMARY"), "{}", r.stdout);
    assert!(r.stderr.contains("--irqchip kernel"), "{}", r.stderr);
    assert!(!out.exists(), "nothing is written when refused");
}
