//! Memory sizes on the command line: "128" (MiB, as QEMU's -m), "512K",
//! "128M", "1G", "1T", with optional "iB"/"B".

use anyhow::{bail, Context, Result};

pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    if t.is_empty() {
        bail!("empty memory size");
    }
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 10),
        Some('m') => (&body[..body.len() - 1], 20),
        Some('g') => (&body[..body.len() - 1], 30),
        Some('t') => (&body[..body.len() - 1], 40),
        _ => (body, 20),
    };
    let n: u64 = digits.trim().parse().with_context(|| {
        format!("memory size '{s}' is not a number with an optional K/M/G/T suffix")
    })?;
    if n == 0 {
        bail!("memory size '{s}' is zero");
    }
    let bytes = n
        .checked_mul(1u64 << shift)
        .with_context(|| format!("memory size '{s}' is too large"))?;
    if bytes < (1 << 20) {
        bail!("memory size '{s}' is below the 1 MiB minimum");
    }
    if bytes % 4096 != 0 {
        bail!("memory size '{s}' is not a multiple of 4 KiB");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("128").unwrap(), 128 << 20);
        assert_eq!(parse_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096k").unwrap(), 4 << 20);
        for bad in ["0", "", "abc", "12Q", "99999999999999T", "512K", "1025k"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
