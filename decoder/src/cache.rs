//! The interpreter's decoded-instruction cache.
//!
//! Entries are keyed by the guest-physical address of an instruction's first
//! byte and the code bitness (16 / 32 / 64), so one cache serves every
//! linear mapping of the same code. Instructions are decoded at IP 0: the
//! interpreter adds the instruction's own RIP to iced-x86's branch targets and
//! RIP-relative displacements, which keeps an entry valid wherever the page is
//! mapped.
//!
//! The cache is direct-mapped on the low bits of the address, so the entries
//! of one 4 KiB page sit in one contiguous run of slots and a page is dropped
//! by clearing that run. Pages that hold cached code are tracked in a bitmap;
//! the interpreter asks [`DecodeCache::is_code_page`] before writing guest
//! memory and calls [`DecodeCache::invalidate_page`] when it writes one (self-
//! and cross-modifying code). Instructions that cross a page boundary are
//! never cached, so an entry depends on one page only.

use iced_x86::{Decoder, DecoderOptions, Instruction};

/// Number of slots: a 64 KiB window of code addresses (16 pages).
const SLOTS: usize = 1 << 16;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Pages tracked individually in the code-page bitmap (64 GiB of
/// guest-physical space); pages above count as code pages, which only costs
/// an extra invalidation.
const TRACKED_PAGES: u64 = 1 << 24;

#[derive(Clone, Copy)]
struct Slot {
    /// gpa + 1, so that 0 means empty.
    tag: u64,
    bitness: u32,
    insn: Instruction,
}

/// Decoded instructions by (guest-physical address, bitness).
pub struct DecodeCache {
    slots: Vec<Slot>,
    code_pages: Vec<u64>,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to decode.
    pub misses: u64,
}

impl std::fmt::Debug for DecodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodeCache")
            .field("hits", &self.hits)
            .field("misses", &self.misses)
            .finish_non_exhaustive()
    }
}

impl Default for DecodeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DecodeCache {
    pub fn new() -> Self {
        DecodeCache {
            slots: vec![
                Slot {
                    tag: 0,
                    bitness: 0,
                    insn: Instruction::default(),
                };
                SLOTS
            ],
            code_pages: vec![0; (TRACKED_PAGES / 64) as usize],
            hits: 0,
            misses: 0,
        }
    }

    /// The cached instruction at `gpa` for `bitness`, if any.
    #[inline]
    pub fn lookup(&mut self, gpa: u64, bitness: u32) -> Option<&Instruction> {
        let slot = &self.slots[(gpa & SLOT_MASK) as usize];
        if slot.tag == gpa.wrapping_add(1) && slot.bitness == bitness {
            self.hits += 1;
            Some(&slot.insn)
        } else {
            self.misses += 1;
            None
        }
    }

    /// Caches `insn` (decoded at IP 0 from the bytes at `gpa`). Instructions
    /// that cross a page boundary are not cached.
    pub fn insert(&mut self, gpa: u64, bitness: u32, insn: &Instruction) {
        if (gpa & 0xfff) + insn.len() as u64 > 0x1000 {
            return;
        }
        self.slots[(gpa & SLOT_MASK) as usize] = Slot {
            tag: gpa.wrapping_add(1),
            bitness,
            insn: *insn,
        };
        let page = gpa >> 12;
        if page < TRACKED_PAGES {
            self.code_pages[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Whether the page holding `gpa` may have cached instructions.
    #[inline]
    pub fn is_code_page(&self, gpa: u64) -> bool {
        let page = gpa >> 12;
        page >= TRACKED_PAGES || self.code_pages[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Drops every cached instruction of the 4 KiB page holding `gpa`.
    pub fn invalidate_page(&mut self, gpa: u64) {
        let page = gpa >> 12;
        if page < TRACKED_PAGES {
            self.code_pages[(page / 64) as usize] &= !(1 << (page % 64));
        }
        let first = ((page << 12) & SLOT_MASK) as usize;
        for s in &mut self.slots[first..first + 0x1000] {
            if (s.tag.wrapping_sub(1)) >> 12 == page && s.tag != 0 {
                s.tag = 0;
            }
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.tag = 0;
        }
        for w in &mut self.code_pages {
            *w = 0;
        }
    }
}

/// Decodes one instruction from `bytes` at IP 0, or `None` when the bytes do
/// not form a valid instruction (too short or invalid encoding).
pub fn decode_at_zero(bytes: &[u8], bitness: u32) -> Option<Instruction> {
    let bitness = match bitness {
        16 | 32 | 64 => bitness,
        _ => 64,
    };
    let mut d = Decoder::with_ip(bitness, bytes, 0, DecoderOptions::NONE);
    let insn = d.decode();
    if insn.is_invalid() {
        None
    } else {
        Some(insn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_and_invalidate() {
        let mut c = DecodeCache::new();
        let i = decode_at_zero(&[0x90], 64).unwrap();
        assert!(!c.is_code_page(0x1234));
        c.insert(0x1234, 64, &i);
        assert!(c.is_code_page(0x1000));
        assert!(c.lookup(0x1234, 64).is_some());
        assert!(c.lookup(0x1234, 32).is_none());
        // Same slot, other page: a miss.
        assert!(c.lookup(0x1234 + (1 << 16), 64).is_none());
        c.invalidate_page(0x1fff);
        assert!(c.lookup(0x1234, 64).is_none());
        assert!(!c.is_code_page(0x1000));
        assert_eq!((c.hits, c.misses), (1, 3));
    }

    #[test]
    fn page_crossing_instructions_are_not_cached() {
        let mut c = DecodeCache::new();
        // mov eax, imm32: 5 bytes starting 2 bytes before a page end.
        let i = decode_at_zero(&[0xb8, 1, 2, 3, 4], 32).unwrap();
        c.insert(0x1ffe, 32, &i);
        assert!(c.lookup(0x1ffe, 32).is_none());
        assert!(decode_at_zero(&[0x0f], 64).is_none());
        assert!(decode_at_zero(&[0xb8, 1, 2], 32).is_none());
    }

    #[test]
    fn invalidation_keeps_other_pages_sharing_the_window() {
        let mut c = DecodeCache::new();
        let i = decode_at_zero(&[0x90], 64).unwrap();
        c.insert(0x1010, 64, &i);
        c.insert(0x2010, 64, &i);
        c.invalidate_page(0x2000);
        assert!(c.lookup(0x1010, 64).is_some());
        c.clear();
        assert!(c.lookup(0x1010, 64).is_none());
    }
}
