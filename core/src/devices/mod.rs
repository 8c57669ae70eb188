//! Device models: plain state machines driven through their registers.
pub mod apic_bus;
pub mod apic_router;
pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod serial;
