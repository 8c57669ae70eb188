//! QEMU's firmware configuration device (fw_cfg), traditional I/O
//! interface only: selector at port 0x510, data at 0x511
//! (QEMU docs/specs/fw_cfg.rst).
//!
//! A 16-bit write to the selector picks an item and rewinds its read
//! offset; each byte read from the data port returns the next byte of the
//! item, and 0 past its end or for an absent item. As QEMU's combined I/O
//! region decodes, a byte read at either port reads data, a byte write
//! (the old write channel, read-only since QEMU 2.4) is ignored, and other
//! sizes do not decode. The DMA interface is absent, so FW_CFG_ID reports
//! only the traditional interface (bit 0).
//!
//! Named files (`etc/e820`, ...) get selectors from FW_CFG_FILE_FIRST in the
//! order they are added, and are listed in FW_CFG_FILE_DIR (big-endian
//! count, then 64-byte entries: size BE32, select BE16, reserved, name).
//! QEMU sorts that directory by name for current machine types; guests
//! look files up by name, so insertion order is kept and selectors returned
//! by [`FwCfg::add_file`] stay valid.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use thiserror::Error;

use crate::bus::BusDevice;

/// Selector port; the data port is at +1.
pub const FW_CFG_PORT: u64 = 0x510;
/// Ports decoded.
pub const FW_CFG_PORTS: u64 = 2;

// Selector keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h).
pub const FW_CFG_SIGNATURE: u16 = 0x0000;
pub const FW_CFG_ID: u16 = 0x0001;
pub const FW_CFG_UUID: u16 = 0x0002;
pub const FW_CFG_RAM_SIZE: u16 = 0x0003;
pub const FW_CFG_NOGRAPHIC: u16 = 0x0004;
pub const FW_CFG_NB_CPUS: u16 = 0x0005;
pub const FW_CFG_MAX_CPUS: u16 = 0x000F;
pub const FW_CFG_FILE_DIR: u16 = 0x0019;
pub const FW_CFG_FILE_FIRST: u16 = 0x0020;
/// Selector bit of the (removed) write channel: ignored when selecting.
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// Selector bit of architecture-specific items (0x8000 + n).
pub const FW_CFG_ARCH_LOCAL: u16 = 0x8000;
/// How many named files fit (QEMU's FW_CFG_FILE_SLOTS_DFLT).
pub const FW_CFG_FILE_SLOTS: u16 = 0x20;
/// Length of a file name in the directory, the terminating NUL included.
pub const FW_CFG_MAX_FILE_PATH: usize = 56;
/// FW_CFG_ID feature bit: the traditional I/O interface.
pub const FW_CFG_VERSION: u32 = 0x01;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FwCfgError {
    #[error("fw_cfg file name {0:?} is empty or longer than 55 bytes")]
    BadName(String),
    #[error("fw_cfg file {0:?} already exists")]
    Duplicate(String),
    #[error("fw_cfg has no free file slot for {0:?}")]
    NoSlot(String),
    #[error("fw_cfg item of {0} bytes is too large")]
    TooLarge(usize),
    #[error("fw_cfg key {0:#06x} is reserved for the file directory")]
    ReservedKey(u16),
}

/// One entry of the file directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgFile {
    pub name: String,
    pub select: u16,
    pub size: u32,
}

/// Everything fw_cfg holds: the items and the read position.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FwCfgState {
    /// The selected key (write-channel bit removed).
    pub selector: u16,
    /// Offset of the next data byte within the selected item.
    pub offset: u32,
    /// Every item by key, the file directory and the files included.
    pub items: BTreeMap<u16, Vec<u8>>,
    /// The named files in selector order.
    pub files: Vec<FwCfgFile>,
}

/// The fw_cfg device.
#[derive(Debug)]
pub struct FwCfg {
    st: FwCfgState,
}

impl FwCfg {
    /// fw_cfg with the items QEMU's `pc` machine always has: signature,
    /// ID, UUID (zero), RAM size, nographic, CPU counts and an empty file
    /// directory.
    pub fn new(ram_size: u64, vcpus: u16) -> Self {
        let mut items = BTreeMap::new();
        items.insert(FW_CFG_SIGNATURE, b"QEMU".to_vec());
        items.insert(FW_CFG_ID, FW_CFG_VERSION.to_le_bytes().to_vec());
        items.insert(FW_CFG_UUID, vec![0; 16]);
        items.insert(FW_CFG_RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(FW_CFG_NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        items.insert(FW_CFG_NB_CPUS, vcpus.to_le_bytes().to_vec());
        items.insert(FW_CFG_MAX_CPUS, vcpus.to_le_bytes().to_vec());
        let mut f = FwCfg {
            st: FwCfgState {
                items,
                ..FwCfgState::default()
            },
        };
        f.rebuild_dir();
        f
    }

    /// Adds the named file `name` with contents `data` and returns its
    /// selector.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() >= FW_CFG_MAX_FILE_PATH || name.contains('\0') {
            return Err(FwCfgError::BadName(name.to_string()));
        }
        if self.st.files.iter().any(|f| f.name == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        let index = u16::try_from(self.st.files.len()).unwrap_or(u16::MAX);
        if index >= FW_CFG_FILE_SLOTS {
            return Err(FwCfgError::NoSlot(name.to_string()));
        }
        let size = u32::try_from(data.len()).map_err(|_| FwCfgError::TooLarge(data.len()))?;
        let select = FW_CFG_FILE_FIRST + index;
        self.st.files.push(FwCfgFile {
            name: name.to_string(),
            select,
            size,
        });
        self.st.items.insert(select, data);
        self.rebuild_dir();
        Ok(select)
    }

    /// Sets a numbered item (for example an arch-local key 0x8000 + n).
    /// The file directory and file selectors are managed by
    /// [`Self::add_file`] and refused here.
    pub fn set_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        let key = key & !FW_CFG_WRITE_CHANNEL;
        if key == FW_CFG_FILE_DIR
            || (FW_CFG_FILE_FIRST..FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS).contains(&key)
        {
            return Err(FwCfgError::ReservedKey(key));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        self.st.items.insert(key, data);
        Ok(())
    }

    /// The contents of item `key`, if present.
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.st.items.get(&key).map(Vec::as_slice)
    }

    /// The file directory.
    pub fn files(&self) -> &[FwCfgFile] {
        &self.st.files
    }

    /// What the guest does with a 16-bit write to the selector.
    pub fn select(&mut self, key: u16) {
        self.st.selector = key & !FW_CFG_WRITE_CHANNEL;
        self.st.offset = 0;
    }

    /// What the guest does with a byte read from the data port.
    pub fn read_data(&mut self) -> u8 {
        let Some(item) = self.st.items.get(&self.st.selector) else {
            return 0;
        };
        match usize::try_from(self.st.offset)
            .ok()
            .and_then(|o| item.get(o))
        {
            Some(&b) => {
                self.st.offset = self.st.offset.saturating_add(1);
                b
            }
            None => 0,
        }
    }

    pub fn save_state(&self) -> FwCfgState {
        self.st.clone()
    }

    pub fn restore_state(&mut self, state: FwCfgState) {
        self.st = state;
        self.st.selector &= !FW_CFG_WRITE_CHANNEL;
    }

    fn rebuild_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + 64 * self.st.files.len());
        let count = u32::try_from(self.st.files.len()).unwrap_or(u32::MAX);
        dir.extend_from_slice(&count.to_be_bytes());
        for f in &self.st.files {
            dir.extend_from_slice(&f.size.to_be_bytes());
            dir.extend_from_slice(&f.select.to_be_bytes());
            dir.extend_from_slice(&0u16.to_be_bytes());
            let mut name = [0u8; FW_CFG_MAX_FILE_PATH];
            for (d, s) in name.iter_mut().zip(f.name.bytes()) {
                *d = s;
            }
            dir.extend_from_slice(&name);
        }
        self.st.items.insert(FW_CFG_FILE_DIR, dir);
    }
}

impl BusDevice for FwCfg {
    fn name(&self) -> &'static str {
        "fw_cfg"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] if offset < FW_CFG_PORTS => *b = self.read_data(),
            _ => data.fill(0xFF),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The data port is read-only (the write channel was removed in
        // QEMU 2.4); only a 16-bit selector write has an effect.
        if let (0, &[lo, hi]) = (offset, data) {
            self.select(u16::from_le_bytes([lo, hi]));
        }
    }

    fn dump(&self) -> String {
        let mut out = String::new();
        let len = self.st.items.get(&self.st.selector).map_or(0, |i| i.len());
        let _ = writeln!(
            out,
            "fw_cfg @{FW_CFG_PORT:#x}: selector {:#06x} offset {} of {} bytes; {} items",
            self.st.selector,
            self.st.offset,
            len,
            self.st.items.len()
        );
        for f in &self.st.files {
            let _ = writeln!(out, "  {:#06x} {:>8} {}", f.select, f.size, f.name);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest's access sequence: outw selector, inb data n times.
    fn read_item(f: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        f.write(0, &key.to_le_bytes());
        (0..n)
            .map(|_| {
                let mut b = [0u8; 1];
                f.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn signature_id_ram_size_and_cpus() {
        let mut f = FwCfg::new(128 << 20, 4);
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut f, FW_CFG_ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_UUID, 16), [0; 16]);
        let ram = read_item(&mut f, FW_CFG_RAM_SIZE, 8);
        assert_eq!(u64::from_le_bytes(ram.try_into().unwrap()), 128 << 20);
        assert_eq!(read_item(&mut f, FW_CFG_NOGRAPHIC, 2), [1, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_NB_CPUS, 2), [4, 0]);
        assert_eq!(read_item(&mut f, FW_CFG_MAX_CPUS, 2), [4, 0]);
        // Past the end and unknown keys read as 0.
        assert_eq!(read_item(&mut f, FW_CFG_SIGNATURE, 6), b"QEMU\0\0");
        assert_eq!(read_item(&mut f, 0x0042, 3), [0, 0, 0]);
        // Reselecting rewinds; a byte read at the selector port reads data.
        f.write(0, &FW_CFG_SIGNATURE.to_le_bytes());
        let mut b = [0u8; 1];
        f.read(0, &mut b);
        assert_eq!(b[0], b'Q');
        f.read(1, &mut b);
        assert_eq!(b[0], b'E');
    }

    #[test]
    fn file_directory_lists_added_files() {
        let mut f = FwCfg::new(1 << 30, 1);
        assert_eq!(read_item(&mut f, FW_CFG_FILE_DIR, 4), [0, 0, 0, 0]);
        let e820 = vec![0xAB; 40];
        let key = f.add_file("etc/e820", e820.clone()).unwrap();
        assert_eq!(key, FW_CFG_FILE_FIRST);
        let key2 = f.add_file("etc/boot-fail-wait", vec![5, 0, 0, 0]).unwrap();
        assert_eq!(key2, FW_CFG_FILE_FIRST + 1);
        // As a guest does: count, then 64-byte entries.
        let dir = read_item(&mut f, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(u32::from_be_bytes(dir[0..4].try_into().unwrap()), 2);
        let e = &dir[4..68];
        assert_eq!(u32::from_be_bytes(e[0..4].try_into().unwrap()), 40);
        assert_eq!(u16::from_be_bytes(e[4..6].try_into().unwrap()), key);
        assert_eq!(&e[8..16], b"etc/e820");
        assert!(e[16..].iter().all(|&b| b == 0));
        let e = &dir[68..132];
        assert_eq!(u16::from_be_bytes(e[4..6].try_into().unwrap()), key2);
        assert_eq!(&e[8..26], b"etc/boot-fail-wait");
        assert_eq!(read_item(&mut f, key, 41)[..40], e820[..]);
        assert_eq!(f.files().len(), 2);
        assert!(f.dump().contains("etc/e820"));
    }

    #[test]
    fn bad_files_and_reserved_keys_are_refused() {
        let mut f = FwCfg::new(0, 1);
        assert!(matches!(
            f.add_file("", vec![]),
            Err(FwCfgError::BadName(_))
        ));
        let long = "x".repeat(56);
        assert!(matches!(
            f.add_file(&long, vec![]),
            Err(FwCfgError::BadName(_))
        ));
        f.add_file(&"y".repeat(55), vec![]).unwrap();
        assert!(matches!(
            f.add_file(&"y".repeat(55), vec![]),
            Err(FwCfgError::Duplicate(_))
        ));
        for i in 1..FW_CFG_FILE_SLOTS {
            f.add_file(&format!("f{i}"), vec![]).unwrap();
        }
        assert!(matches!(
            f.add_file("one-too-many", vec![]),
            Err(FwCfgError::NoSlot(_))
        ));
        assert_eq!(
            f.set_item(FW_CFG_FILE_DIR, vec![]),
            Err(FwCfgError::ReservedKey(FW_CFG_FILE_DIR))
        );
        assert!(f.set_item(FW_CFG_FILE_FIRST + 3, vec![]).is_err());
        f.set_item(FW_CFG_ARCH_LOCAL | 3, vec![9]).unwrap();
        assert_eq!(read_item(&mut f, 0x8003, 1), [9]);
    }

    #[test]
    fn writes_to_data_are_ignored_and_state_round_trips() {
        let mut f = FwCfg::new(4096, 2);
        f.write(0, &FW_CFG_NB_CPUS.to_le_bytes());
        f.write(1, &[0x55]);
        f.write(0, &[0x55]);
        let mut b = [0u8; 1];
        f.read(1, &mut b);
        assert_eq!(b[0], 2);
        // Word reads do not decode.
        let mut w = [0u8; 2];
        f.read(0, &mut w);
        assert_eq!(w, [0xFF, 0xFF]);
        // Selecting with the write-channel bit selects the same item.
        f.write(0, &(FW_CFG_SIGNATURE | FW_CFG_WRITE_CHANNEL).to_le_bytes());
        f.read(1, &mut b);
        assert_eq!(b[0], b'Q');
        let saved = f.save_state();
        let mut g = FwCfg::new(0, 1);
        g.restore_state(saved.clone());
        assert_eq!(g.save_state(), saved);
        g.read(1, &mut b);
        assert_eq!(b[0], b'E');
    }

    #[test]
    fn fuzz_no_panic() {
        let mut f = FwCfg::new(64 << 20, 2);
        f.add_file("etc/e820", vec![1; 20]).unwrap();
        let items_before = f.save_state().items.len();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 5) as usize;
            let off = (x >> 8) % 3;
            let bytes = (x >> 16).to_le_bytes();
            if x & (1 << 40) != 0 {
                f.write(off, &bytes[..len]);
            } else {
                let mut b = [0u8; 4];
                f.read(off, &mut b[..len]);
            }
            let st = f.save_state();
            assert_eq!(st.items.len(), items_before);
            let max = st.items.get(&st.selector).map_or(0, |i| i.len());
            assert!(st.offset as usize <= max);
        }
    }
}
