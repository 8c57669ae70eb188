//! Guest physical memory: one anonymous mapping shared by both processors.
//!
//! The KVM backend registers the mapping as memory slots; the interpreter and
//! the device model read and write it through the bounds-checked accessors
//! here. RAM starts at guest-physical 0. Like QEMU's `pc` machine, RAM that
//! would overlap the 32-bit PCI / APIC hole is placed above 4 GiB instead.

use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Mutex;

use memmap2::MmapMut;
use thiserror::Error;

/// Start of the hole below 4 GiB (LAPIC, IOAPIC, PCI, BIOS flash live there).
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// Where RAM that does not fit below the hole continues.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MemoryError {
    #[error("guest memory size must be at least 1 MiB and a multiple of 4 KiB, got {0} bytes")]
    BadSize(u64),
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map { size: u64, reason: String },
    #[error("guest-physical range {gpa:#x}+{len:#x} is not RAM")]
    OutOfRange { gpa: u64, len: u64 },
}

/// One contiguous piece of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the region inside the host mapping.
    pub offset: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

/// Guest RAM. Cheap to share behind an `Arc`; every access is bounds-checked
/// against the RAM regions, so no guest address reaches host memory outside
/// the mapping.
pub struct GuestMemory {
    map: MmapMut,
    ptr: *mut u8,
    size: u64,
    regions: Vec<RamRegion>,
    /// End of the first region, which starts at guest-physical 0 at offset
    /// 0 of the mapping: most accesses are below it and need no search.
    low_end: u64,
    code: CodeWatch,
}

// SAFETY: the mapping is owned for the lifetime of `GuestMemory` and never
// remapped; all accesses go through raw copies that tolerate concurrent
// modification (the guest may write RAM at any time anyway), so sharing the
// pointer between threads cannot create a dangling or out-of-bounds access.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`; no method hands out a Rust reference into the mapping
// that could alias a concurrent write.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("size", &self.size)
            .field("regions", &self.regions)
            .finish()
    }
}

impl GuestMemory {
    /// Maps `size` bytes of zeroed anonymous memory as guest RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < (1 << 20) || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let mut map = MmapMut::map_anon(len).map_err(|e| MemoryError::Map {
            size,
            reason: e.to_string(),
        })?;
        // Transparent huge pages where the host gives them on request
        // (`madvise` mode): a guest's page tables scatter its working set
        // over guest RAM, and with 4 KiB host pages nearly every access of
        // the interpreter to a new guest page missed the host TLB too.
        // Only a hint: without THP the mapping stays as it is.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let ptr = map.as_mut_ptr();
        let mut regions = vec![RamRegion {
            gpa: 0,
            len: size.min(LOW_RAM_END),
            offset: 0,
        }];
        if size > LOW_RAM_END {
            regions.push(RamRegion {
                gpa: HIGH_RAM_START,
                len: size - LOW_RAM_END,
                offset: LOW_RAM_END,
            });
        }
        let end = regions.last().map_or(0, RamRegion::end);
        let low_end = regions[0].end();
        Ok(GuestMemory {
            map,
            ptr,
            size,
            regions,
            low_end,
            code: CodeWatch::new(end),
        })
    }

    /// Which pages processors cache decoded instructions from, and the
    /// writes to them other processors must see (cross-modifying code).
    pub fn code_watch(&self) -> &CodeWatch {
        &self.code
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The RAM regions, in ascending guest-physical order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Host address of the start of the mapping, for KVM memory slots.
    pub fn host_base(&self) -> *mut u8 {
        self.ptr
    }

    /// Whether `[gpa, gpa+len)` lies entirely in one RAM region.
    pub fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.offset_of(gpa, len).is_some()
    }

    /// Offset into the mapping of `[gpa, gpa+len)`, if it is all RAM.
    #[inline]
    fn offset_of(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
        if end <= self.low_end {
            return Some(gpa as usize);
        }
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.end())
            .map(|r| (r.offset + (gpa - r.gpa)) as usize)
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self
            .offset_of(gpa, buf.len() as u64)
            .ok_or(MemoryError::OutOfRange {
                gpa,
                len: buf.len() as u64,
            })?;
        fence(Ordering::Acquire);
        // SAFETY: `offset_of` checked that `off..off+len` lies inside the
        // mapping, and `buf` is a distinct host buffer, so the copy stays in
        // bounds and the regions do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self
            .offset_of(gpa, data.len() as u64)
            .ok_or(MemoryError::OutOfRange {
                gpa,
                len: data.len() as u64,
            })?;
        // SAFETY: bounds checked by `offset_of`; `data` is a host buffer that
        // cannot overlap the anonymous guest mapping's checked range unless a
        // caller passed a slice of guest memory, which this API never hands out.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
        fence(Ordering::Release);
        Ok(())
    }

    /// Reads `len` (1 to 8) bytes at `gpa` as a little-endian number, if
    /// they are all RAM: the interpreter's loads, without a byte buffer.
    #[inline]
    pub fn read_le(&self, gpa: u64, len: usize) -> Option<u64> {
        let off = self.offset_of(gpa, len as u64)?;
        fence(Ordering::Acquire);
        // SAFETY: `offset_of` checked that `off..off+len` lies inside the
        // mapping; unaligned reads of plain integers need no alignment.
        let v = unsafe {
            let p = self.ptr.add(off);
            match len {
                1 => u64::from(p.read()),
                2 => u64::from(u16::from_le(p.cast::<u16>().read_unaligned())),
                4 => u64::from(u32::from_le(p.cast::<u32>().read_unaligned())),
                8 => u64::from_le(p.cast::<u64>().read_unaligned()),
                _ => {
                    let mut b = [0u8; 8];
                    std::ptr::copy_nonoverlapping(p, b.as_mut_ptr(), len.min(8));
                    u64::from_le_bytes(b)
                }
            }
        };
        Some(v)
    }

    /// Writes the low `len` (1 to 8) bytes of `v` at `gpa` if they are all
    /// RAM (returns whether they were): the interpreter's stores.
    #[inline]
    pub fn write_le(&self, gpa: u64, len: usize, v: u64) -> bool {
        let Some(off) = self.offset_of(gpa, len as u64) else {
            return false;
        };
        // SAFETY: `offset_of` checked that `off..off+len` lies inside the
        // mapping; unaligned writes of plain integers need no alignment.
        unsafe {
            let p = self.ptr.add(off);
            match len {
                1 => p.write(v as u8),
                2 => p.cast::<u16>().write_unaligned((v as u16).to_le()),
                4 => p.cast::<u32>().write_unaligned((v as u32).to_le()),
                8 => p.cast::<u64>().write_unaligned(v.to_le()),
                _ => std::ptr::copy_nonoverlapping(v.to_le_bytes().as_ptr(), p, len.min(8)),
            }
        }
        fence(Ordering::Release);
        true
    }

    /// Hints the processor to fetch the cache line of RAM at `gpa`, which is
    /// about to be accessed. No effect on anything else.
    #[inline]
    pub fn prefetch(&self, gpa: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(off) = self.offset_of(gpa, 1) {
            // SAFETY: `offset_of` checked that `off` lies inside the mapping;
            // a prefetch reads nothing and cannot fault.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(self.ptr.add(off).cast::<i8>());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = gpa;
    }

    /// Fills `[gpa, gpa+len)` with zeroes.
    pub fn zero(&self, gpa: u64, len: u64) -> Result<(), MemoryError> {
        let off = self
            .offset_of(gpa, len)
            .ok_or(MemoryError::OutOfRange { gpa, len })?;
        // SAFETY: bounds checked by `offset_of`.
        unsafe { std::ptr::write_bytes(self.ptr.add(off), 0, len as usize) };
        Ok(())
    }

    pub fn read_u8(&self, gpa: u64) -> Result<u8, MemoryError> {
        let mut b = [0u8; 1];
        self.read(gpa, &mut b)?;
        Ok(b[0])
    }
    pub fn read_u16(&self, gpa: u64) -> Result<u16, MemoryError> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    pub fn read_u32(&self, gpa: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    pub fn write_u8(&self, gpa: u64, v: u8) -> Result<(), MemoryError> {
        self.write(gpa, &[v])
    }
    pub fn write_u16(&self, gpa: u64, v: u16) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Keeps the mapping type visible for callers that need its length.
    pub fn mapping_len(&self) -> usize {
        self.map.len()
    }
}

/// Writes [`CodeWatch`] remembers; a processor that falls further behind
/// drops all its cached code.
const CODE_LOG_LEN: u64 = 64;

/// Cross-modifying code (SDM vol. 3, 8.1.3) for processors that cache
/// decoded instructions (the interpreter, one cache per vCPU). A processor
/// notes each page it caches code from; a write by any processor to such a
/// page is logged, and every other processor drops its copies of that page
/// when it next enters the guest (`changes_since`), so code another vCPU
/// patched is seen at the latest after the interrupt or exit that follows —
/// what Linux's `text_poke_bp` relies on (INT3, IPI to serialize, new
/// bytes, IPI): a vCPU that kept the INT3 cached would take it forever.
///
/// Logging clears the page's bit: the next processor to decode from it
/// sets it again. In deterministic mode the vCPUs take turns on one thread
/// and this is exact; with one thread per vCPU a decode racing a write by
/// nanoseconds can miss it (no fence on the write path, which every guest
/// store takes).
pub struct CodeWatch {
    /// One bit per 4 KiB guest-physical page below the end of RAM.
    pages: Vec<AtomicU64>,
    /// Writes logged so far.
    seq: AtomicU64,
    /// The last `CODE_LOG_LEN` writes: (page number, writer), at
    /// `seq % CODE_LOG_LEN`.
    log: Mutex<[(u64, u64); CODE_LOG_LEN as usize]>,
}

impl std::fmt::Debug for CodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeWatch")
            .field("seq", &self.seq.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl CodeWatch {
    fn new(end: u64) -> Self {
        let pages = end.div_ceil(4096).div_ceil(64) as usize;
        CodeWatch {
            pages: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            seq: AtomicU64::new(0),
            log: Mutex::new([(0, 0); CODE_LOG_LEN as usize]),
        }
    }

    /// The word and bit of the page holding `gpa`, if it is tracked.
    #[inline]
    fn bit(&self, gpa: u64) -> Option<(&AtomicU64, u64)> {
        let page = gpa >> 12;
        let word = self.pages.get(usize::try_from(page / 64).ok()?)?;
        Some((word, 1 << (page % 64)))
    }

    /// A processor is about to cache instructions decoded from the page
    /// holding `gpa` (call before reading the bytes).
    pub fn note_code(&self, gpa: u64) {
        if let Some((w, b)) = self.bit(gpa) {
            if w.load(Ordering::Relaxed) & b == 0 {
                w.fetch_or(b, Ordering::SeqCst);
            }
        }
    }

    /// Processor `writer` wrote guest memory at `gpa` (after the write):
    /// logs it if some processor caches code from that page. Returns
    /// whether it did.
    #[inline]
    pub fn note_write(&self, gpa: u64, writer: u64) -> bool {
        let Some((w, b)) = self.bit(gpa) else {
            return false;
        };
        if w.load(Ordering::Relaxed) & b == 0 {
            return false;
        }
        self.log_write(w, b, gpa, writer)
    }

    /// `note_write` for a page some processor caches code from.
    #[cold]
    #[inline(never)]
    fn log_write(&self, w: &AtomicU64, b: u64, gpa: u64, writer: u64) -> bool {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        w.fetch_and(!b, Ordering::SeqCst);
        let n = self.seq.load(Ordering::Relaxed);
        log[(n % CODE_LOG_LEN) as usize] = (gpa >> 12, writer);
        self.seq.store(n + 1, Ordering::Release);
        true
    }

    /// The number of writes logged so far: where a new processor starts.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Calls `drop` with the address of each page processors other than
    /// `me` wrote since `*seen` (`None`: more than the log holds, drop
    /// everything), and moves `*seen` to now.
    pub fn changes_since(&self, seen: &mut u64, me: u64, mut drop: impl FnMut(Option<u64>)) {
        if self.seq.load(Ordering::Acquire) == *seen {
            return;
        }
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.seq.load(Ordering::Relaxed);
        if now.wrapping_sub(*seen) > CODE_LOG_LEN {
            drop(None);
        } else {
            for i in *seen..now {
                let (page, writer) = log[(i % CODE_LOG_LEN) as usize];
                if writer != me {
                    drop(Some(page << 12));
                }
            }
        }
        *seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_watch_logs_writes_to_code_pages_for_the_other_processors() {
        let m = GuestMemory::new(1 << 20).unwrap();
        let w = m.code_watch();
        let (mut seen_a, mut seen_b) = (w.seq(), w.seq());
        // A page nobody decoded from: nothing logged.
        assert!(!w.note_write(0x3000, 1));
        w.note_code(0x5123);
        assert!(w.note_write(0x5ff8, 1));
        // Logged once: the bit is clear until someone decodes again.
        assert!(!w.note_write(0x5000, 1));
        let mut dropped = Vec::new();
        w.changes_since(&mut seen_b, 2, |p| dropped.push(p));
        assert_eq!(dropped, vec![Some(0x5000)]);
        dropped.clear();
        // The writer skips its own write; nothing new later.
        w.changes_since(&mut seen_a, 1, |p| dropped.push(p));
        w.changes_since(&mut seen_b, 2, |p| dropped.push(p));
        assert!(dropped.is_empty());
        assert_eq!((seen_a, seen_b), (1, 1));
        // A processor that falls behind the log drops everything.
        for page in 0..=CODE_LOG_LEN {
            w.note_code(page << 12);
            assert!(w.note_write(page << 12, 1));
        }
        w.changes_since(&mut seen_b, 2, |p| dropped.push(p));
        assert_eq!(dropped, vec![None]);
        // Outside RAM is not tracked (and no panic).
        w.note_code(u64::MAX);
        assert!(!w.note_write(u64::MAX, 1));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(GuestMemory::new(0).unwrap_err(), MemoryError::BadSize(0));
        assert!(GuestMemory::new((1 << 20) + 1).is_err());
    }

    #[test]
    fn read_write_round_trip_and_bounds() {
        let m = GuestMemory::new(2 << 20).unwrap();
        m.write_u32(0x1000, 0xdead_beef).unwrap();
        assert_eq!(m.read_u32(0x1000).unwrap(), 0xdead_beef);
        assert_eq!(m.read_u8(0x1000).unwrap(), 0xef);
        assert!(m.write_u32((2 << 20) - 2, 1).is_err());
        assert!(m.read_u64(u64::MAX - 3).is_err());
        assert!(m.is_ram(0, 2 << 20));
        assert!(!m.is_ram(0, (2 << 20) + 1));
    }

    #[test]
    fn large_ram_skips_the_hole() {
        let m = GuestMemory::new(LOW_RAM_END + (16 << 20)).unwrap();
        assert_eq!(m.regions().len(), 2);
        assert!(!m.is_ram(0xFEE0_0000, 4));
        m.write_u64(HIGH_RAM_START, 7).unwrap();
        assert_eq!(m.read_u64(HIGH_RAM_START).unwrap(), 7);
        assert!(m.read_u8(HIGH_RAM_START + (16 << 20)).is_err());
    }
}
