//! tandem-decoder: x86 decoding with iced-x86, shared by the interpreter, the
//! debugger and error messages (the instruction at a fault).

pub mod cache;

pub use cache::{decode_at_zero, DecodeCache};
pub use iced_x86;

use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

/// One decoded instruction, formatted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disassembled {
    pub ip: u64,
    pub len: usize,
    pub bytes: Vec<u8>,
    pub text: String,
}

/// Bitness of the code at a CS: 16, 32 or 64.
pub fn bitness(long_mode: bool, cs_l: bool, cs_db: bool, protected: bool) -> u32 {
    if long_mode && cs_l {
        64
    } else if protected && cs_db {
        32
    } else {
        16
    }
}

/// Decodes up to `max` instructions from `bytes`, which start at `ip`.
/// Stops early at bytes that do not form a complete instruction.
pub fn disassemble(bytes: &[u8], ip: u64, bitness: u32, max: usize) -> Vec<Disassembled> {
    let bitness = match bitness {
        16 | 32 | 64 => bitness,
        _ => 64,
    };
    let mut d = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE);
    let mut f = IntelFormatter::new();
    f.options_mut().set_first_operand_char_index(0);
    let mut out = Vec::new();
    while d.can_decode() && out.len() < max {
        let start = d.position();
        let insn = d.decode();
        if insn.is_invalid() {
            break;
        }
        let mut text = String::new();
        f.format(&insn, &mut text);
        out.push(Disassembled {
            ip: insn.ip(),
            len: insn.len(),
            bytes: bytes[start..start + insn.len()].to_vec(),
            text,
        });
    }
    out
}

/// One instruction as "bytes  text", or a note that it did not decode.
pub fn describe_one(bytes: &[u8], ip: u64, bitness: u32) -> String {
    match disassemble(bytes, ip, bitness, 1).into_iter().next() {
        Some(d) => format!(
            "{} ({})",
            d.text,
            d.bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        None => "undecodable bytes".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_formats() {
        // mov eax, 1; out 0xf4, eax; hlt
        let code = [0xb8, 1, 0, 0, 0, 0xe7, 0xf4, 0xf4];
        let v = disassemble(&code, 0x1000, 32, 10);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].text, "mov eax,1");
        assert_eq!(v[1].ip, 0x1005);
        assert_eq!(v[2].text, "hlt");
        assert_eq!(describe_one(&[0x0f, 0x0b], 0, 64), "ud2 (0f 0b)");
        assert_eq!(describe_one(&[0x0f], 0, 64), "undecodable bytes");
        assert_eq!(bitness(true, true, false, true), 64);
        assert_eq!(bitness(false, false, true, true), 32);
        assert_eq!(bitness(false, false, false, false), 16);
    }
}
