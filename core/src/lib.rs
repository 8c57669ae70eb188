//! tandem-core: the machine both of Tandem's processors share — guest
//! memory, the buses, the devices, interrupt routing, the event-injection
//! ladder, clocks, CPU state types and the `Vcpu` interface with the run loop
//! on top of it. It depends on no backend.

pub mod bus;
pub mod clock;
pub mod control;
pub mod cpu;
pub mod cpuid;
pub mod devices;
pub mod fallback;
pub mod irq;
pub mod ladder;
pub mod machine;
pub mod memory;
pub mod paging;
pub mod pc;
pub mod pc_devices;
pub mod testing;
pub mod timer;
pub mod trace;
pub mod vcpu;

pub use bus::{Bus, BusDevice, BusError, BusKind, SharedDevice};
pub use clock::{Clock, HostClock, SharedClock, VirtualClock};
pub use control::{MachineControl, StopRequest};
pub use machine::{ExitStats, GuestContext, Machine, RunError, RunOutcome};
pub use memory::{GuestMemory, MemoryError};
pub use vcpu::{Doorbell, Kick, Readiness, Vcpu, VcpuError, VcpuExit, VcpuResult};
