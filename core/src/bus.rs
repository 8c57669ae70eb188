//! Port-I/O and MMIO buses: address ranges mapped to devices.
//!
//! A device is a plain state machine behind [`BusDevice`]; the bus hands it
//! the offset from the start of its range, as crosvm's `Bus` does. Ranges may
//! not overlap. An access that hits no device reads as all ones (a floating
//! ISA bus) and drops writes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus: byte-addressed register reads and writes by offset.
pub trait BusDevice: Send {
    /// Short name for dumps, traces and errors ("uart", "pit", ...).
    fn name(&self) -> &'static str;
    /// A read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Registers in readable form, for `--dump-devices` and the debugger.
    fn dump(&self) -> String {
        String::new()
    }
}

/// A device shared between the buses and the machine.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{name} at {base:#x}+{len:#x} overlaps {other} at {other_base:#x}+{other_len:#x}")]
    Overlap {
        name: &'static str,
        base: u64,
        len: u64,
        other: &'static str,
        other_base: u64,
        other_len: u64,
    },
    #[error("{name}: empty or wrapping range {base:#x}+{len:#x}")]
    BadRange {
        name: &'static str,
        base: u64,
        len: u64,
    },
}

struct Entry {
    len: u64,
    name: &'static str,
    dev: SharedDevice,
}

/// Which address space a bus decodes (only used in messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Pio,
    Mmio,
}

/// One address space of devices.
pub struct Bus {
    kind: BusKind,
    entries: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for (base, e) in &self.entries {
            l.entry(&format_args!("{}@{:#x}+{:#x}", e.name, base, e.len));
        }
        l.finish()
    }
}

impl Bus {
    pub fn new(kind: BusKind) -> Self {
        Bus {
            kind,
            entries: BTreeMap::new(),
        }
    }

    pub fn kind(&self) -> BusKind {
        self.kind
    }

    /// Maps `dev` at `[base, base+len)`, refusing any overlap.
    pub fn insert(&mut self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let name = dev.lock().map(|d| d.name()).unwrap_or("device");
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { name, base, len });
        }
        let end = base + len;
        // The only candidates are the last range starting below `end`.
        if let Some((&ob, e)) = self.entries.range(..end).next_back() {
            if ob + e.len > base {
                return Err(BusError::Overlap {
                    name,
                    base,
                    len,
                    other: e.name,
                    other_base: ob,
                    other_len: e.len,
                });
            }
        }
        self.entries.insert(base, Entry { len, name, dev });
        Ok(())
    }

    fn find(&self, addr: u64, len: u64) -> Option<(u64, &Entry)> {
        let (&base, e) = self.entries.range(..=addr).next_back()?;
        let end = addr.checked_add(len)?;
        (end <= base + e.len).then_some((base, e))
    }

    /// Name of the device at `addr`, if any.
    pub fn device_at(&self, addr: u64) -> Option<&'static str> {
        self.find(addr, 1).map(|(_, e)| e.name)
    }

    /// Reads from the device at `addr`. Returns false (and all-ones data) when
    /// no device decodes the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len() as u64) {
            Some((base, e)) => {
                // A poisoned lock means another vCPU thread panicked inside a
                // device; the state is still a plain struct, keep using it.
                let mut d = e.dev.lock().unwrap_or_else(|p| p.into_inner());
                d.read(addr - base, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`. Returns false when no device decodes it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len() as u64) {
            Some((base, e)) => {
                let mut d = e.dev.lock().unwrap_or_else(|p| p.into_inner());
                d.write(addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Every device once, in address order, with its base.
    pub fn devices(&self) -> Vec<(u64, u64, SharedDevice)> {
        let mut seen: Vec<(u64, u64, SharedDevice)> = Vec::new();
        for (base, e) in &self.entries {
            if !seen.iter().any(|(_, _, d)| Arc::ptr_eq(d, &e.dev)) {
                seen.push((*base, e.len, e.dev.clone()));
            }
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn name(&self) -> &'static str {
            "reg"
        }
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Reg>> {
        Arc::new(Mutex::new(Reg { last: vec![] }))
    }

    #[test]
    fn refuses_overlap() {
        let mut b = Bus::new(BusKind::Pio);
        b.insert(dev(), 0x40, 4).unwrap();
        assert!(matches!(
            b.insert(dev(), 0x43, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            b.insert(dev(), 0x3c, 5),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            b.insert(dev(), 0x30, 0x20),
            Err(BusError::Overlap { .. })
        ));
        b.insert(dev(), 0x44, 1).unwrap();
        b.insert(dev(), 0x3c, 4).unwrap();
        assert!(matches!(
            b.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            b.insert(dev(), 0x100, 0),
            Err(BusError::BadRange { .. })
        ));
    }

    #[test]
    fn dispatches_by_offset_and_floats_unmapped() {
        let mut b = Bus::new(BusKind::Mmio);
        let d = dev();
        b.insert(d.clone(), 0x1000, 0x10).unwrap();
        let mut buf = [0u8; 2];
        assert!(b.read(0x1004, &mut buf));
        assert_eq!(buf, [4, 4]);
        assert!(b.write(0x100f, &[9]));
        assert_eq!(d.lock().unwrap().last, vec![(0xf, vec![9])]);
        // Straddling the end of a device decodes nowhere.
        assert!(!b.read(0x100f, &mut buf));
        assert_eq!(buf, [0xff, 0xff]);
        assert!(!b.write(0x2000, &[1]));
        assert_eq!(b.device_at(0x1000), Some("reg"));
    }
}
