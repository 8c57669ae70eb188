//! Guest physical memory: one anonymous mapping shared by both processors.
//!
//! The KVM backend registers the mapping as memory slots; the interpreter and
//! the device model read and write it through the bounds-checked accessors
//! here. RAM starts at guest-physical 0. Like QEMU's `pc` machine, RAM that
//! would overlap the 32-bit PCI / APIC hole is placed above 4 GiB instead.

use std::sync::atomic::{fence, Ordering};

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
        Ok(GuestMemory {
            map,
            ptr,
            size,
            regions,
        })
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
    fn offset_of(&self, gpa: u64, len: u64) -> Option<usize> {
        let end = gpa.checked_add(len)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
