//! Interrupt lines between devices and interrupt controllers.
//!
//! A device raises and lowers a line through [`IrqLine`]; it never knows what
//! is behind it. ISA IRQ n reaches 8259A input n and IOAPIC pin n, except
//! IRQ 0 (the PIT), which reaches IOAPIC pin 2, as with QEMU's interrupt
//! source override.

use std::sync::{Arc, Mutex};

/// An output line of a device.
pub trait IrqLine: Send + Sync {
    fn set_level(&self, level: bool);
    fn raise(&self) {
        self.set_level(true)
    }
    fn lower(&self) {
        self.set_level(false)
    }
}

/// Where a device's message-signalled interrupts go: a DWORD write of
/// `data` to `address` (0xFEEx_xxxx for the LAPICs, PCI Local Bus 3.0
/// §6.8). `source_id` is the requester's PCI bus/device/function
/// (bus << 8 | device << 3 | function), which an interrupt-remapping unit
/// may verify; `None` for a requester without one.
pub trait MsiSink: Send + Sync {
    fn msi(&self, source_id: Option<u16>, address: u64, data: u32);
}

/// Something that receives ISA interrupt lines (the PIC pair, the IOAPIC).
pub trait IsaIrqSink: Send + Sync {
    fn set_isa_irq(&self, irq: u8, level: bool);
}

/// Number of ISA IRQ lines.
pub const ISA_IRQS: usize = 16;

/// The ISA interrupt router: remembers each line's level and fans it out to
/// every connected controller.
#[derive(Default)]
pub struct IsaIrqRouter {
    inner: Mutex<RouterState>,
}

#[derive(Default)]
struct RouterState {
    levels: [bool; ISA_IRQS],
    sinks: Vec<Arc<dyn IsaIrqSink>>,
}

impl std::fmt::Debug for IsaIrqRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IsaIrqRouter")
            .field("levels", &self.levels())
            .finish()
    }
}

impl IsaIrqRouter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connects a controller; it sees every later change.
    pub fn connect(&self, sink: Arc<dyn IsaIrqSink>) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sinks
            .push(sink);
    }

    /// Sets ISA line `irq` (0..15) to `level`. Out-of-range lines are ignored.
    pub fn set(&self, irq: u8, level: bool) {
        let sinks = {
            let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let Some(l) = s.levels.get_mut(usize::from(irq)) else {
                return;
            };
            *l = level;
            s.sinks.clone()
        };
        // Outside the lock: a sink may ring a doorbell or take its own lock.
        for sink in sinks {
            sink.set_isa_irq(irq, level);
        }
    }

    /// The current level of every line.
    pub fn levels(&self) -> [bool; ISA_IRQS] {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).levels
    }

    /// A line handle for a device wired to ISA IRQ `irq`.
    pub fn line(self: &Arc<Self>, irq: u8) -> Arc<dyn IrqLine> {
        Arc::new(IsaLine {
            router: self.clone(),
            irq,
        })
    }
}

struct IsaLine {
    router: Arc<IsaIrqRouter>,
    irq: u8,
}

impl IrqLine for IsaLine {
    fn set_level(&self, level: bool) {
        self.router.set(self.irq, level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec(Mutex<Vec<(u8, bool)>>);
    impl IsaIrqSink for Rec {
        fn set_isa_irq(&self, irq: u8, level: bool) {
            self.0.lock().unwrap().push((irq, level));
        }
    }

    #[test]
    fn lines_reach_every_sink() {
        let r = Arc::new(IsaIrqRouter::new());
        let a = Arc::new(Rec::default());
        let b = Arc::new(Rec::default());
        r.connect(a.clone());
        r.connect(b.clone());
        let l4 = r.line(4);
        l4.raise();
        l4.lower();
        r.set(200, true);
        assert_eq!(*a.0.lock().unwrap(), vec![(4, true), (4, false)]);
        assert_eq!(*b.0.lock().unwrap(), vec![(4, true), (4, false)]);
        assert!(!r.levels()[4]);
    }
}
