//! Messages on the APIC bus: what the IOAPIC, MSIs and IPIs send to the local
//! APICs (SDM vol. 3, 11.6 "Issuing Interprocessor Interrupts" and 11.11
//! "Message Signalled Interrupts"; 82093AA datasheet, redirection table).

/// Delivery mode field (ICR, redirection entry, MSI data bits 8-10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    /// Reserved encodings (3): a message with it is ignored.
    Reserved,
}

impl DeliveryMode {
    pub fn from_bits(bits: u32) -> DeliveryMode {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }
    pub fn bits(self) -> u32 {
        match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Reserved => 3,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::StartUp => 6,
            DeliveryMode::ExtInt => 7,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestMode {
    Physical,
    Logical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerMode {
    Edge,
    Level,
}

/// ICR destination shorthand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// One interrupt message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicMessage {
    pub vector: u8,
    pub delivery: DeliveryMode,
    pub dest_mode: DestMode,
    /// Destination field: 8 bits in xAPIC messages, 32 in x2APIC IPIs.
    pub dest: u32,
    pub trigger: TriggerMode,
    /// Level: assert (true) or de-assert (INIT level de-assert).
    pub level: bool,
    pub shorthand: Shorthand,
    /// APIC ID of the sender for IPIs (for the self / all-excluding-self
    /// shorthands); `None` for the IOAPIC and MSIs.
    pub source: Option<u32>,
}

/// Where messages go: the set of local APICs, and back to the IOAPICs for
/// EOIs of level-triggered vectors.
pub trait ApicBus: Send + Sync {
    /// Delivers `msg` to every LAPIC it addresses.
    fn deliver(&self, msg: &ApicMessage);
    /// A LAPIC EOI of a level-triggered `vector` (broadcast or directed):
    /// IOAPICs clear remote IRR for entries with that vector.
    fn eoi(&self, vector: u8);
    /// An IOAPIC's interrupt request, both as the message its redirection
    /// entry describes and as the upstream write (`address`, `data`) the
    /// IOAPIC sends, which an interrupt-remapping unit translates (VT-d
    /// 5.1.5.1: the entry's bits 63:48 become address bits 19:4). Without
    /// one, the message is delivered as it is.
    fn deliver_from_ioapic(&self, msg: &ApicMessage, address: u64, data: u32) {
        let _ = (address, data);
        self.deliver(msg)
    }
}

/// Decodes an MSI (address 0xFEEx_xxxx, data) as KVM's `kvm_set_msi` and the
/// SDM (vol. 3, 11.11.1 and 11.11.2) define it. `None` if the address is not
/// in the MSI window.
pub fn decode_msi(address: u64, data: u32) -> Option<ApicMessage> {
    if address >> 20 != 0xFEE {
        return None;
    }
    let dest = ((address >> 12) & 0xff) as u32;
    let dest_mode = if address & (1 << 2) != 0 {
        DestMode::Logical
    } else {
        DestMode::Physical
    };
    let redirection_hint = address & (1 << 3) != 0;
    let mut delivery = DeliveryMode::from_bits(data >> 8);
    // A redirection hint asks for lowest-priority arbitration among the
    // destinations (KVM treats RH=1 with fixed delivery the same way).
    if redirection_hint && delivery == DeliveryMode::Fixed {
        delivery = DeliveryMode::LowestPriority;
    }
    let trigger = if data & (1 << 15) != 0 {
        TriggerMode::Level
    } else {
        TriggerMode::Edge
    };
    Some(ApicMessage {
        vector: (data & 0xff) as u8,
        delivery,
        dest_mode,
        dest,
        trigger,
        // Edge messages always assert; level messages carry the level bit.
        level: trigger == TriggerMode::Edge || data & (1 << 14) != 0,
        shorthand: Shorthand::None,
        source: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_decode() {
        let m = decode_msi(0xFEE0_1000, 0x4031).unwrap();
        assert_eq!(m.vector, 0x31);
        assert_eq!(m.dest, 1);
        assert_eq!(m.dest_mode, DestMode::Physical);
        assert_eq!(m.delivery, DeliveryMode::Fixed);
        assert_eq!(m.trigger, TriggerMode::Edge);
        let m = decode_msi(0xFEE0_300C, 0xC441).unwrap();
        assert_eq!(m.dest, 3);
        assert_eq!(m.dest_mode, DestMode::Logical);
        assert_eq!(m.delivery, DeliveryMode::Nmi);
        assert_eq!(m.trigger, TriggerMode::Level);
        assert!(m.level);
        assert!(decode_msi(0xFED0_0000, 0).is_none());
        assert_eq!(DeliveryMode::from_bits(3), DeliveryMode::Reserved);
        for b in 0..8 {
            assert_eq!(DeliveryMode::from_bits(b).bits(), b);
        }
    }
}
