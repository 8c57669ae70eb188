//! tandem-firmware: the boot protocols and the platform tables a guest reads.
//!
//! - [`e820`]: the PC memory map as SeaBIOS reports it on QEMU's `pc` machine,
//!   shared by every boot protocol.
//! - [`multiboot`]: multiboot v1 kernels (ELF32, ELF64 or the a.out kludge),
//!   their modules, the information structure and the entry CPU state.

pub mod e820;
pub mod multiboot;

pub use e820::{e820_map, E820Entry, E820Kind};
pub use multiboot::{
    load_multiboot, multiboot_entry_state, LoadedModule, Module, MultibootBoot, MultibootError,
};
pub mod linux;
pub mod pvh;
pub use linux::{linux_entry_state, load_bzimage, LinuxBoot, LinuxError};
pub use pvh::{load_pvh, pvh_entry_state, PvhBoot, PvhError};
pub mod acpi;
pub mod mptable;
pub use acpi::{build_acpi, write_acpi, AcpiConfig, AcpiError, AcpiLayout, AcpiTables, DmarConfig};
pub use mptable::{build_mptable, write_mptable, MpTableError, MpTableLayout};
pub mod bios;
pub use bios::{build_bios_ivt, write_bios_ivt, BiosIvt};
