//! Device models: plain state machines driven through their registers.
pub mod acpi_pm;
pub mod apic_bus;
pub mod apic_router;
pub mod cmos;
pub mod debug_exit;
pub mod edu;
pub mod fw_cfg;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pci;
pub mod pci_device;
pub mod pic;
pub mod pit;
pub mod serial;
pub mod testdev;
pub mod vtd;
