//! Every user mistake is one clear line on stderr and a non-zero status,
//! never a panic. None of these reach a processor, so they run everywhere.

use tandem_tests::{guest, run_tandem, Run};

const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

fn tmp(name: &str, data: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("tandem-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.to_string_lossy().into_owned()
}

fn assert_one_line_error(r: &Run, mentions: &str) {
    assert_ne!(r.status, 0, "status must be non-zero: {r:?}");
    assert!(!r.stderr.contains("panicked"), "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {r:?}");
    assert!(
        lines[0].contains(mentions),
        "'{}' should mention '{mentions}'",
        lines[0]
    );
}

#[test]
fn missing_file() {
    let r = run_tandem(TANDEM, &["run", "/nonexistent/guest.elf"]);
    assert_one_line_error(&r, "No such file");
}

#[test]
fn text_file() {
    let p = tmp("text.elf", b"this is not a kernel\njust text\n");
    let r = run_tandem(TANDEM, &["run", &p]);
    assert_one_line_error(&r, "multiboot header");
}

#[test]
fn empty_file() {
    let p = tmp("empty.elf", b"");
    let r = run_tandem(TANDEM, &["run", &p]);
    assert_one_line_error(&r, "empty");
}

#[test]
fn truncated_elf() {
    let full = std::fs::read(guest("hello")).unwrap();
    // Keep the headers and the multiboot header, cut the segment short.
    let p = tmp("truncated.elf", &full[..full.len().min(0x1100)]);
    let r = run_tandem(TANDEM, &["run", &p]);
    assert_one_line_error(&r, "cannot load");
}

#[test]
fn segment_beyond_ram() {
    // The guests load at 1 MiB; 1 MiB of RAM has no room for them.
    let g = guest("hello");
    let r = run_tandem(TANDEM, &["run", g.to_str().unwrap(), "--mem", "1M"]);
    assert_one_line_error(&r, "outside usable guest RAM");
}

#[test]
fn zero_and_malformed_memory_sizes() {
    let g = guest("hello");
    for (size, says) in [("0", "zero"), ("12Q", "not a number"), ("100K", "1 MiB")] {
        let r = run_tandem(TANDEM, &["run", g.to_str().unwrap(), "--mem", size]);
        assert_one_line_error(&r, says);
    }
}

#[test]
fn unknown_option_is_a_usage_error() {
    let r = run_tandem(TANDEM, &["run", "x.elf", "--no-such-option"]);
    assert_eq!(r.status, 2);
    assert!(r.stderr.contains("--no-such-option"));
}

#[test]
fn no_guest_given() {
    let r = run_tandem(TANDEM, &["run"]);
    assert_one_line_error(&r, "no guest given");
}
