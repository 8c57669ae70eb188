//! An Intel VT-d remapping hardware unit (the device QEMU calls
//! `intel-iommu`), after the Intel Virtualization Technology for Directed
//! I/O Architecture Specification ("the spec" below): DMA remapping in
//! legacy mode, register-based and queued invalidation, interrupt
//! remapping and primary fault recording.
//!
//! What it offers, and what it leaves out:
//! - legacy-mode translation: root table, context entries, second-level
//!   page tables of 3 or 4 levels (AGAW 39 / 48), 2 MiB and 1 GiB
//!   superpages, pass-through (ECAP.PT); no scalable mode, no PASID, no
//!   first-level tables, no device-TLB (ECAP.DT is clear; its invalidation
//!   descriptor is accepted and completes at once), no protected memory
//!   regions, no advanced fault logging;
//! - no caches: every request walks the tables in guest memory, so every
//!   invalidation (register-based or queued) completes when it is issued;
//! - one fault recording register (CAP.NFR = 0) at FRO 0x220, the
//!   IOTLB registers at IRO 0xF0, version 1.0: the values QEMU reports;
//! - interrupt remapping (ECAP.IR) and x2APIC mode (ECAP.EIM) as
//!   configured; no posted interrupts (an IRTE with IM set is reserved).
//!
//! Register access: 32- and 64-bit, naturally aligned (QEMU's limits, and
//! what Linux and kvm-unit-tests use). Other sizes and misaligned
//! accesses read as zero and are dropped; unimplemented registers read
//! zero. A 64-bit register written 32 bits at a time takes effect when the
//! half that carries the command is written: the upper half of CCMD and
//! IOTLB (ICC / IVT live there), the lower half of IQT.
//!
//! Where the spec leaves a choice, or QEMU differs from it, this unit
//! follows the spec: compatibility-format interrupts are blocked unless
//! GSTS.CFIS is set and IRTA.EIME clear (spec 5.1.4; older QEMU lets
//! them through); an IRTE's bus-range check (SVT 10b) reads the start bus
//! from SID bits 15:8 and the end bus from bits 7:0, as Linux programs it; a
//! second fault while the one record is in use sets PFO (QEMU drops faults
//! from a requester that already has one recorded); an invalidation wait
//! may set both SW and IF, or neither (QEMU takes exactly one); in xAPIC mode
//! the reserved DST bits of an IRTE are checked. PASID descriptors (types
//! 6, 7) are invalid without scalable mode. Interrupt-remapping faults are
//! recorded for every blocked request, with the interrupt index in
//! FI bits 63:48, as current QEMU does.
//!
//! The fault event and invalidation event messages put FEUADDR / IEUADDR
//! (only writable with EIM: x2APIC destination bits 31:8) in address bits
//! 63:32.
//!
//! Interrupts the unit itself sends (the fault event and the invalidation
//! completion event) are not subject to remapping (spec 5.1.6, "Remapping
//! Hardware - Interrupt Programming"); they go to the [`MsiSink`] given at
//! construction with no source id, and that sink must deliver them without
//! calling back into this unit (it is called with the unit's lock held).

use std::fmt::Write as _;
use std::sync::Arc;

use thiserror::Error;

use super::apic_bus::{decode_msi, ApicMessage, DeliveryMode, DestMode, Shorthand, TriggerMode};
use crate::bus::BusDevice;
use crate::irq::MsiSink;
use crate::memory::GuestMemory;

/// Guest-physical base of the register page (QEMU's q35 address).
pub const VTD_MMIO_BASE: u64 = 0xFED9_0000;
/// Size of the register page.
pub const VTD_MMIO_SIZE: u64 = 0x1000;

// Register offsets (spec chapter 10, "Register Descriptions").
const VER: u64 = 0x00;
const CAP: u64 = 0x08;
const ECAP: u64 = 0x10;
const GCMD: u64 = 0x18;
const GSTS: u64 = 0x1C;
const RTADDR: u64 = 0x20;
const CCMD: u64 = 0x28;
const FSTS: u64 = 0x34;
const FECTL: u64 = 0x38;
const FEDATA: u64 = 0x3C;
const FEADDR: u64 = 0x40;
const FEUADDR: u64 = 0x44;
const IQH: u64 = 0x80;
const IQT: u64 = 0x88;
const IQA: u64 = 0x90;
const ICS: u64 = 0x9C;
const IECTL: u64 = 0xA0;
const IEDATA: u64 = 0xA4;
const IEADDR: u64 = 0xA8;
const IEUADDR: u64 = 0xAC;
const IRTA: u64 = 0xB8;
/// IOTLB registers (ECAP.IRO): invalidate address, then IOTLB invalidate.
const IVA: u64 = 0xF0;
const IOTLB: u64 = 0xF8;
/// The fault recording register (CAP.FRO): 128 bits, two quadwords.
const FRCD_LO: u64 = 0x220;
const FRCD_HI: u64 = 0x228;

/// VER: major 1, minor 0.
const VERSION: u32 = 0x10;

// CAP fields.
/// ND = 6: 16-bit domain ids.
const CAP_ND: u64 = 6;
const CAP_SAGAW_SHIFT: u32 = 8;
/// SAGAW bit 1: 39-bit AGAW (3-level tables); bit 2: 48-bit (4-level).
const SAGAW_39: u64 = 1 << 1;
const SAGAW_48: u64 = 1 << 2;
const CAP_MGAW_SHIFT: u32 = 16;
/// FRO: offset of the fault recording register in 16-byte units.
const CAP_FRO: u64 = (FRCD_LO / 16) << 24;
/// SLLPS: 2 MiB and 1 GiB second-level pages.
const CAP_SLLPS: u64 = (1 << 34) | (1 << 35);
const CAP_PSI: u64 = 1 << 39;
/// MAMV: the largest address mask of a page-selective invalidation.
const MAMV: u64 = 18;
const CAP_MAMV: u64 = MAMV << 48;
/// DWD / DRD: write and read draining.
const CAP_DRAIN: u64 = (1 << 54) | (1 << 55);

// ECAP fields.
const ECAP_QI: u64 = 1 << 1;
const ECAP_IR: u64 = 1 << 3;
const ECAP_EIM: u64 = 1 << 4;
const ECAP_PT: u64 = 1 << 6;
/// IRO: offset of the IOTLB registers in 16-byte units.
const ECAP_IRO: u64 = (IVA / 16) << 8;
/// MHMV: the largest handle mask value (with IR).
const ECAP_MHMV: u64 = 15 << 20;

// GCMD / GSTS: a command bit and its status bit share a position.
const GCMD_TE: u32 = 1 << 31;
const GCMD_SRTP: u32 = 1 << 30;
const GCMD_SFL: u32 = 1 << 29;
const GCMD_WBF: u32 = 1 << 27;
const GCMD_QIE: u32 = 1 << 26;
const GCMD_IRE: u32 = 1 << 25;
const GCMD_SIRTP: u32 = 1 << 24;
const GCMD_CFI: u32 = 1 << 23;
const GSTS_TES: u32 = GCMD_TE;
const GSTS_RTPS: u32 = GCMD_SRTP;
const GSTS_FLS: u32 = GCMD_SFL;
const GSTS_QIES: u32 = GCMD_QIE;
const GSTS_IRES: u32 = GCMD_IRE;
const GSTS_IRTPS: u32 = GCMD_SIRTP;
const GSTS_CFIS: u32 = GCMD_CFI;
const GSTS_KNOWN: u32 =
    GSTS_TES | GSTS_RTPS | GSTS_FLS | GSTS_QIES | GSTS_IRES | GSTS_IRTPS | GSTS_CFIS;
const GSTS_IR_BITS: u32 = GSTS_IRES | GSTS_IRTPS | GSTS_CFIS;

/// RTADDR: the root table address; TTM (bits 11:10) is reserved without
/// scalable mode.
const RTADDR_WMASK: u64 = !0xFFF;

// CCMD.
const CCMD_ICC: u64 = 1 << 63;
const CCMD_CIRG_SHIFT: u32 = 61;
const CCMD_CAIG_SHIFT: u32 = 59;
const CCMD_CAIG_MASK: u64 = 3 << CCMD_CAIG_SHIFT;
/// ICC, CIRG, FM, SID, DID.
const CCMD_WMASK: u64 = 0xE000_0003_FFFF_FFFF;
/// SID and FM are write-only (read as 0).
const CCMD_WRITE_ONLY: u64 = 0x0000_0003_FFFF_0000;

// FSTS.
const FSTS_PFO: u32 = 1 << 0;
const FSTS_PPF: u32 = 1 << 1;
const FSTS_IQE: u32 = 1 << 4;
const FSTS_ICE: u32 = 1 << 5;
const FSTS_ITE: u32 = 1 << 6;
const FSTS_FRI_MASK: u32 = 0xFF << 8;
const FSTS_W1C: u32 = FSTS_PFO | FSTS_IQE | FSTS_ICE | FSTS_ITE;
/// The conditions that hold the fault event pending (spec 7.3).
const FSTS_PENDING: u32 = FSTS_PFO | FSTS_PPF | FSTS_IQE | FSTS_ICE | FSTS_ITE;

// FECTL / IECTL.
const CTL_IM: u32 = 1 << 31;
const CTL_IP: u32 = 1 << 30;
const MSI_ADDR_WMASK: u32 = 0xFFFF_FFFC;

// IQT / IQA / ICS.
const IQT_WMASK: u64 = 0x7_FFF0;
const IQA_DW: u64 = 1 << 11;
const IQA_WMASK: u64 = !0xFFF | IQA_DW | 7;
const ICS_IWC: u32 = 1;

// IRTA.
const IRTA_EIME: u64 = 1 << 11;
const IRTA_SIZE_MASK: u64 = 0xF;

// IOTLB invalidate registers.
const IOTLB_IVT: u64 = 1 << 63;
const IOTLB_IIRG_SHIFT: u32 = 60;
const IOTLB_IAIG_SHIFT: u32 = 57;
const IOTLB_IAIG_MASK: u64 = 3 << IOTLB_IAIG_SHIFT;
/// IVT, IIRG, DR, DW, DID.
const IOTLB_WMASK: u64 = 0xB003_FFFF_0000_0000;
/// ADDR, IH, AM.
const IVA_WMASK: u64 = 0xFFFF_FFFF_FFFF_F07F;

// Fault recording register, upper quadword.
const FRCD_F: u64 = 1 << 63;
/// T: set for a read request, clear for a write.
const FRCD_T: u64 = 1 << 62;
const FRCD_FR_SHIFT: u32 = 32;
/// Interrupt-remapping faults put the interrupt index in FI[63:48].
const FRCD_IR_INDEX_SHIFT: u32 = 48;
/// The source id QEMU records for a request without one.
const SID_NONE: u16 = 0xFFFF;

// Root and context entries (spec 9.1, 9.3), legacy mode.
const ENTRY_P: u64 = 1;
const CE_FPD: u64 = 1 << 1;
const CE_TT_SHIFT: u32 = 2;
const TT_MULTI_LEVEL: u64 = 0;
const TT_PASS_THROUGH: u64 = 2;
const CE_LO_RESERVED: u64 = 0xFF0;
/// Context entry, upper quadword: AW 2:0, AVAIL 6:3, DID 23:8.
const CE_HI_RESERVED: u64 = 0xFFFF_FFFF_FF00_0080;
const RE_LO_RESERVED: u64 = 0xFFE;

// Second-level paging entries (spec 9.8).
const SL_R: u64 = 1;
const SL_W: u64 = 1 << 1;
const SL_PS: u64 = 1 << 7;
/// Bit 11 is reserved without snoop control.
const SL_SNP: u64 = 1 << 11;
/// Bits hardware ignores: 63 and 61:52.
const SL_IGNORED: u64 = 0xBFF0_0000_0000_0000;

// Interrupt remapping table entries (spec 9.10), legacy (remapped) format.
const IRTE_P: u64 = 1;
const IRTE_FPD: u64 = 1 << 1;
const IRTE_DM: u64 = 1 << 2;
const IRTE_RH: u64 = 1 << 3;
const IRTE_TM: u64 = 1 << 4;
/// Bits 14:12 and 31:24, and IM (bit 15): no posted interrupts here.
const IRTE_LO_RESERVED: u64 = 0x7000 | 0x8000 | 0xFF00_0000;
/// In xAPIC mode only DST[15:8] holds the APIC id; DST[7:0] and
/// DST[31:16] are reserved.
const IRTE_LO_RESERVED_XAPIC: u64 = (0xFF << 32) | (0xFFFF << 48);
/// Bits 127:84.
const IRTE_HI_RESERVED: u64 = !0xF_FFFF;

// Interrupt requests (spec 5.1.2).
const MSI_FORMAT_REMAPPABLE: u64 = 1 << 4;
const MSI_SHV: u64 = 1 << 3;

// Invalidation descriptors (spec 6.5.2), 128 bits.
const DESC_CONTEXT: u64 = 1;
const DESC_IOTLB: u64 = 2;
const DESC_DEVICE_TLB: u64 = 3;
const DESC_IEC: u64 = 4;
const DESC_WAIT: u64 = 5;
const DESC_CC_RESERVED: u64 = 0xFFFC_0000_0000_FFC0;
const DESC_IOTLB_RESERVED_LO: u64 = 0xFFFF_FFFF_0000_FF00;
const DESC_IOTLB_RESERVED_HI: u64 = 0xF80;
/// Device-TLB: bits 8:4, 11:9, 31:21 and 51:48 (PFSID lives in 15:12 and
/// 63:52, MIP in 20:16).
const DESC_DTLB_RESERVED_LO: u64 = 0x1F0 | 0xE00 | 0xFFE0_0000 | (0xF << 48);
const DESC_DTLB_RESERVED_HI: u64 = 0xFFE;
/// Interrupt entry cache: bits 26:5 and 63:48.
const DESC_IEC_RESERVED: u64 = 0x07FF_FFE0 | (0xFFFF << 48);
const DESC_WAIT_IF: u64 = 1 << 4;
const DESC_WAIT_SW: u64 = 1 << 5;
const DESC_WAIT_RESERVED_LO: u64 = 0xFFFF_FF80;
const DESC_WAIT_RESERVED_HI: u64 = 3;

/// Construction-time configuration (QEMU's `intremap`, `eim`, `aw-bits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdConfig {
    /// Interrupt remapping (ECAP.IR).
    pub intremap: bool,
    /// Extended interrupt mode, x2APIC destinations (ECAP.EIM); needs
    /// `intremap`, as QEMU requires.
    pub eim: bool,
    /// The guest address width, 39 or 48 (CAP.MGAW + 1, and the widest
    /// AGAW in CAP.SAGAW).
    pub aw_bits: u8,
}

impl Default for VtdConfig {
    /// QEMU's defaults: no interrupt remapping, 39-bit addresses.
    fn default() -> Self {
        VtdConfig {
            intremap: false,
            eim: false,
            aw_bits: 39,
        }
    }
}

impl VtdConfig {
    /// The configuration the unit really implements: `aw_bits` is 48 when
    /// at least 48 was asked for and 39 otherwise; EIM needs IR.
    pub fn normalized(self) -> VtdConfig {
        VtdConfig {
            intremap: self.intremap,
            eim: self.eim && self.intremap,
            aw_bits: if self.aw_bits >= 48 { 48 } else { 39 },
        }
    }
}

/// A DMA remapping fault condition (the spec's table of non-recoverable
/// fault conditions, chapter 7); [`DmaFault::reason`] is the code a fault
/// record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DmaFault {
    #[error("root entry not present")]
    RootEntryNotPresent,
    #[error("context entry not present")]
    ContextEntryNotPresent,
    #[error("invalid programming of a context entry")]
    ContextEntryInvalid,
    #[error("input address above the address width")]
    AddressBeyondWidth,
    #[error("write without write permission")]
    WriteDenied,
    #[error("read without read permission")]
    ReadDenied,
    #[error("error accessing a second-level paging entry")]
    PagingEntryAccess,
    #[error("error accessing the root table")]
    RootTableAccess,
    #[error("error accessing the context table")]
    ContextTableAccess,
    #[error("non-zero reserved field in a present root entry")]
    RootEntryReserved,
    #[error("non-zero reserved field in a present context entry")]
    ContextEntryReserved,
    #[error("non-zero reserved field in a second-level paging entry")]
    PagingEntryReserved,
}

impl DmaFault {
    /// The fault reason code.
    pub fn reason(self) -> u8 {
        match self {
            DmaFault::RootEntryNotPresent => 0x1,
            DmaFault::ContextEntryNotPresent => 0x2,
            DmaFault::ContextEntryInvalid => 0x3,
            DmaFault::AddressBeyondWidth => 0x4,
            DmaFault::WriteDenied => 0x5,
            DmaFault::ReadDenied => 0x6,
            DmaFault::PagingEntryAccess => 0x7,
            DmaFault::RootTableAccess => 0x8,
            DmaFault::ContextTableAccess => 0x9,
            DmaFault::RootEntryReserved => 0xA,
            DmaFault::ContextEntryReserved => 0xB,
            DmaFault::PagingEntryReserved => 0xC,
        }
    }

    /// Whether the context entry's FPD can suppress recording: conditions
    /// met after the context entry was fetched (the spec's "qualified"
    /// faults; the split is QEMU's, including 0xB as unqualified).
    fn qualified(self) -> bool {
        !matches!(
            self,
            DmaFault::RootEntryNotPresent
                | DmaFault::RootTableAccess
                | DmaFault::ContextTableAccess
                | DmaFault::RootEntryReserved
                | DmaFault::ContextEntryReserved
        )
    }
}

/// Why an interrupt request was not delivered. All but
/// [`IrFault::NotInterruptAddress`] are interrupt-remapping fault
/// conditions (spec 5.1.4.1) with a reason code 0x20-0x26.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum IrFault {
    /// Remapping is off and the address is outside 0xFEEx_xxxx: not an
    /// interrupt at all (nothing is recorded).
    #[error("address outside the interrupt range")]
    NotInterruptAddress,
    #[error("reserved field set in the interrupt request")]
    RequestReserved,
    #[error("interrupt index beyond the remapping table")]
    IndexBeyondTable,
    #[error("IRTE not present")]
    EntryNotPresent,
    #[error("error accessing the interrupt remapping table")]
    TableAccess,
    #[error("non-zero reserved field in a present IRTE")]
    EntryReserved,
    #[error("compatibility-format interrupt blocked")]
    CompatibilityBlocked,
    #[error("source id does not match the IRTE")]
    SourceIdInvalid,
}

impl IrFault {
    /// The fault reason code, if this is a remapping fault.
    pub fn reason(self) -> Option<u8> {
        match self {
            IrFault::NotInterruptAddress => None,
            IrFault::RequestReserved => Some(0x20),
            IrFault::IndexBeyondTable => Some(0x21),
            IrFault::EntryNotPresent => Some(0x22),
            IrFault::TableAccess => Some(0x23),
            IrFault::EntryReserved => Some(0x24),
            IrFault::CompatibilityBlocked => Some(0x25),
            IrFault::SourceIdInvalid => Some(0x26),
        }
    }
}

/// A fault found by a walk, before deciding whether it is recorded.
struct IrFailure {
    fault: IrFault,
    index: u32,
    /// False when the IRTE's FPD suppresses the record.
    record: bool,
}

impl IrFailure {
    fn new(fault: IrFault, index: u32) -> Self {
        IrFailure {
            fault,
            index,
            record: true,
        }
    }
}

/// The unit's saveable state: the registers, and the values latched from
/// them by the commands that latch (SRTP, SIRTP, QIE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtdState {
    /// GSTS.
    pub gsts: u32,
    /// RTADDR as written.
    pub rtaddr: u64,
    /// The root table address latched by SRTP.
    pub root_table: u64,
    /// CCMD (including the write-only SID / FM as last written).
    pub ccmd: u64,
    /// FSTS without PPF, which follows the fault record's F bit.
    pub fsts: u32,
    pub fectl: u32,
    pub fedata: u32,
    pub feaddr: u32,
    pub feuaddr: u32,
    /// The fault recording register: [lower, upper] quadword.
    pub frcd: [u64; 2],
    /// IQH as a descriptor index.
    pub iqh: u32,
    /// IQT as written.
    pub iqt: u64,
    /// IQA as written.
    pub iqa: u64,
    /// The queue base, size in descriptors and DW bit latched when QIE was
    /// set.
    pub iq_base: u64,
    pub iq_size: u32,
    pub iq_dw: bool,
    pub ics: u32,
    pub iectl: u32,
    pub iedata: u32,
    pub ieaddr: u32,
    pub ieuaddr: u32,
    /// IRTA as written.
    pub irta: u64,
    /// The remapping table base, entries and EIME latched by SIRTP.
    pub irt_base: u64,
    pub irt_size: u32,
    pub irt_eime: bool,
    /// IVA (write-only).
    pub iva: u64,
    /// The IOTLB invalidate register.
    pub iotlb: u64,
}

impl VtdState {
    /// The state after reset: everything off, both event interrupts masked.
    pub fn power_on() -> Self {
        VtdState {
            gsts: 0,
            rtaddr: 0,
            root_table: 0,
            ccmd: 0,
            fsts: 0,
            fectl: CTL_IM,
            fedata: 0,
            feaddr: 0,
            feuaddr: 0,
            frcd: [0, 0],
            iqh: 0,
            iqt: 0,
            iqa: 0,
            iq_base: 0,
            iq_size: 256,
            iq_dw: false,
            ics: 0,
            iectl: CTL_IM,
            iedata: 0,
            ieaddr: 0,
            ieuaddr: 0,
            irta: 0,
            irt_base: 0,
            irt_size: 2,
            irt_eime: false,
            iva: 0,
            iotlb: 0,
        }
    }
}

/// Why a saved state cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VtdStateError {
    #[error("VT-d GSTS {0:#x} has bits this unit does not implement")]
    Gsts(u32),
    #[error("VT-d FSTS {0:#x} has bits this unit does not implement")]
    Fsts(u32),
    #[error("VT-d invalidation queue of {0} descriptors is not 256 << QS")]
    QueueSize(u32),
    #[error("VT-d invalidation queue head {head} beyond its {size} descriptors")]
    QueueHead { head: u32, size: u32 },
    #[error("VT-d interrupt remapping table of {0} entries is not 2 << S")]
    TableSize(u32),
    #[error("VT-d x2APIC mode without EIM")]
    EimeWithoutEim,
}

/// The remapping hardware unit. Map it at [`VTD_MMIO_BASE`] with length
/// [`VTD_MMIO_SIZE`]; send device DMA through [`Vtd::translate`] and
/// interrupt requests through [`Vtd::remap_interrupt`].
pub struct Vtd {
    config: VtdConfig,
    state: VtdState,
    mem: Arc<GuestMemory>,
    msi: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for Vtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtd")
            .field("config", &self.config)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Vtd {
    /// A unit after reset, walking tables in `mem` and sending its own
    /// event interrupts to `msi`. `config` is normalized (see
    /// [`VtdConfig::normalized`]).
    pub fn new(config: VtdConfig, mem: Arc<GuestMemory>, msi: Arc<dyn MsiSink>) -> Vtd {
        Vtd {
            config: config.normalized(),
            state: VtdState::power_on(),
            mem,
            msi,
        }
    }

    /// The configuration in effect.
    pub fn config(&self) -> VtdConfig {
        self.config
    }

    /// The DMAR table's HAW field: the host address width minus one.
    /// Remapped interrupts carry 32-bit x2APIC destinations (IRTA.EIME
    /// latched by SIRTP).
    pub fn x2apic_destinations(&self) -> bool {
        self.state.irt_eime
    }

    pub fn host_address_width(&self) -> u8 {
        self.config.aw_bits - 1
    }

    /// Back to the power-on state (translation and remapping off).
    pub fn reset(&mut self) {
        self.state = VtdState::power_on();
    }

    /// A copy of the whole state.
    pub fn save_state(&self) -> VtdState {
        self.state.clone()
    }

    /// Replaces the state with `state` after checking it; on error nothing
    /// changes. Nothing is sent.
    pub fn restore_state(&mut self, state: &VtdState) -> Result<(), VtdStateError> {
        let mut known = GSTS_KNOWN;
        if !self.config.intremap {
            known &= !GSTS_IR_BITS;
        }
        if state.gsts & !known != 0 {
            return Err(VtdStateError::Gsts(state.gsts));
        }
        if state.fsts & !(FSTS_W1C | FSTS_FRI_MASK) != 0 {
            return Err(VtdStateError::Fsts(state.fsts));
        }
        if !(0..8).any(|qs| 256u32 << qs == state.iq_size) {
            return Err(VtdStateError::QueueSize(state.iq_size));
        }
        if state.iqh >= state.iq_size {
            return Err(VtdStateError::QueueHead {
                head: state.iqh,
                size: state.iq_size,
            });
        }
        if !(0..16).any(|s| 2u32 << s == state.irt_size) {
            return Err(VtdStateError::TableSize(state.irt_size));
        }
        if state.irt_eime && !self.config.eim {
            return Err(VtdStateError::EimeWithoutEim);
        }
        self.state = state.clone();
        Ok(())
    }

    fn cap(&self) -> u64 {
        let sagaw = if self.config.aw_bits >= 48 {
            SAGAW_39 | SAGAW_48
        } else {
            SAGAW_39
        };
        CAP_ND
            | (sagaw << CAP_SAGAW_SHIFT)
            | (u64::from(self.config.aw_bits - 1) << CAP_MGAW_SHIFT)
            | CAP_FRO
            | CAP_SLLPS
            | CAP_PSI
            | CAP_MAMV
            | CAP_DRAIN
    }

    fn ecap(&self) -> u64 {
        let mut ecap = ECAP_QI | ECAP_PT | ECAP_IRO;
        if self.config.intremap {
            ecap |= ECAP_IR | ECAP_MHMV;
        }
        if self.config.eim {
            ecap |= ECAP_EIM;
        }
        ecap
    }

    /// Addresses the unit can reach: the guest address width (QEMU uses
    /// it as the host address width too).
    fn haw_mask(&self) -> u64 {
        (1u64 << self.config.aw_bits) - 1
    }

    /// Message data bits 31:16 (EIMD) exist only with EIM.
    fn msi_data_mask(&self) -> u32 {
        if self.config.eim {
            0xFFFF_FFFF
        } else {
            0xFFFF
        }
    }

    /// FEUADDR / IEUADDR are reserved without EIM.
    fn msi_upper_mask(&self) -> u32 {
        if self.config.eim {
            0xFFFF_FFFF
        } else {
            0
        }
    }

    fn irta_wmask(&self) -> u64 {
        let mut mask = !0xFFF | IRTA_SIZE_MASK;
        if self.config.eim {
            mask |= IRTA_EIME;
        }
        mask
    }

    /// FSTS as the guest reads it: PPF set while the record is.
    fn fsts(&self) -> u32 {
        let ppf = if self.state.frcd[1] & FRCD_F != 0 {
            FSTS_PPF
        } else {
            0
        };
        self.state.fsts | ppf
    }

    fn iq_tail(&self) -> u32 {
        ((self.state.iqt & IQT_WMASK) >> 4) as u32
    }

    /// Reads a 128-bit entry. Entry addresses are formed with wrapping
    /// adds: a restored state may hold any base, and an address that
    /// wraps is simply not RAM.
    fn read128(&self, gpa: u64) -> Option<(u64, u64)> {
        let mut b = [0u8; 16];
        self.mem.read(gpa, &mut b).ok()?;
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&b[..8]);
        hi.copy_from_slice(&b[8..]);
        Some((u64::from_le_bytes(lo), u64::from_le_bytes(hi)))
    }

    // ---- Fault recording and event interrupts (spec 7.2, 7.3) ----

    fn send_fault_event(&self) {
        let address = (u64::from(self.state.feuaddr) << 32) | u64::from(self.state.feaddr);
        self.msi.msi(None, address, self.state.fedata);
    }

    fn send_invalidation_event(&self) {
        let address = (u64::from(self.state.ieuaddr) << 32) | u64::from(self.state.ieaddr);
        self.msi.msi(None, address, self.state.iedata);
    }

    /// A status condition went from clear to set with nothing pending
    /// before: the fault event fires, or stays pending (IP) while masked.
    fn raise_fault_event(&mut self) {
        self.state.fectl |= CTL_IP;
        if self.state.fectl & CTL_IM == 0 {
            self.send_fault_event();
            self.state.fectl &= !CTL_IP;
        }
    }

    /// Software serviced every pending condition: IP clears (spec 10.4.10).
    fn update_fault_ip(&mut self) {
        if self.fsts() & FSTS_PENDING == 0 {
            self.state.fectl &= !CTL_IP;
        }
    }

    /// Records a fault in the (single) fault recording register. A fault
    /// while PFO is set is dropped; one while the record is still in use
    /// sets PFO instead (spec 7.2.1).
    fn record_fault(&mut self, lo: u64, hi: u64) {
        let before = self.fsts();
        if before & FSTS_PFO != 0 {
            return;
        }
        if self.state.frcd[1] & FRCD_F != 0 {
            // PPF is already pending, so no new event.
            self.state.fsts |= FSTS_PFO;
            return;
        }
        self.state.frcd = [lo, hi | FRCD_F];
        // FRI: the index of the record written, always 0 with NFR = 0.
        self.state.fsts &= !FSTS_FRI_MASK;
        if before & FSTS_PENDING == 0 {
            self.raise_fault_event();
        }
    }

    fn record_dma_fault(&mut self, source_id: u16, iova: u64, fault: DmaFault, write: bool) {
        let mut hi = u64::from(source_id) | (u64::from(fault.reason()) << FRCD_FR_SHIFT);
        if !write {
            hi |= FRCD_T;
        }
        self.record_fault(iova & !0xFFF, hi);
    }

    fn record_ir_fault(&mut self, source_id: Option<u16>, fault: IrFault, index: u32) {
        let Some(reason) = fault.reason() else {
            return;
        };
        let sid = source_id.unwrap_or(SID_NONE);
        let hi = u64::from(sid) | (u64::from(reason) << FRCD_FR_SHIFT);
        let lo = u64::from(index as u16) << FRCD_IR_INDEX_SHIFT;
        self.record_fault(lo, hi);
    }

    fn queue_error(&mut self) {
        let before = self.fsts();
        self.state.fsts |= FSTS_IQE;
        if before & FSTS_PENDING == 0 {
            self.raise_fault_event();
        }
    }

    /// An invalidation wait with IF completed: IWC, and the completion
    /// event unless one is already pending (QEMU's rule).
    fn invalidation_complete_event(&mut self) {
        if self.state.ics & ICS_IWC != 0 {
            return;
        }
        self.state.ics |= ICS_IWC;
        self.state.iectl |= CTL_IP;
        if self.state.iectl & CTL_IM == 0 {
            self.send_invalidation_event();
            self.state.iectl &= !CTL_IP;
        }
    }

    // ---- DMA remapping (spec chapter 3, legacy mode) ----

    /// Translates a DMA request from `source_id` (bus << 8 | devfn) to
    /// `iova`. Only the page holding `iova` is translated: the result is
    /// valid to the end of its 4 KiB page, and a caller whose `len`-byte
    /// access crosses it splits the access. With translation off the
    /// address is used as is. A fault is recorded (unless the context
    /// entry's FPD suppresses it) and reported through the fault event.
    /// Interrupt requests (writes to 0xFEEx_xxxx) are not DMA: they go to
    /// [`Vtd::remap_interrupt`].
    pub fn translate(
        &mut self,
        source_id: u16,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<u64, DmaFault> {
        // Only the page of `iova` is looked at, whatever the length.
        let _ = len;
        if self.state.gsts & GSTS_TES == 0 {
            return Ok(iova);
        }
        self.walk(source_id, iova, write).map_err(|(fault, fpd)| {
            if !(fpd && fault.qualified()) {
                self.record_dma_fault(source_id, iova, fault, write);
            }
            fault
        })
    }

    /// The table walk; on a fault also returns the context entry's FPD
    /// (false when no context entry was read).
    fn walk(&self, source_id: u16, iova: u64, write: bool) -> Result<u64, (DmaFault, bool)> {
        let haw = self.haw_mask();
        let bus = u64::from(source_id >> 8);
        let devfn = u64::from(source_id & 0xFF);
        let (re_lo, re_hi) = self
            .read128(self.state.root_table.wrapping_add(bus * 16))
            .ok_or((DmaFault::RootTableAccess, false))?;
        if re_lo & ENTRY_P == 0 {
            return Err((DmaFault::RootEntryNotPresent, false));
        }
        // Legacy mode: the upper quadword is reserved.
        if re_hi != 0 || re_lo & (RE_LO_RESERVED | !haw) != 0 {
            return Err((DmaFault::RootEntryReserved, false));
        }
        let context_table = re_lo & !0xFFF;
        let (ce_lo, ce_hi) = self
            .read128(context_table.wrapping_add(devfn * 16))
            .ok_or((DmaFault::ContextTableAccess, false))?;
        // FPD counts even in a context entry that is not present (spec 9.3).
        let fpd = ce_lo & CE_FPD != 0;
        if ce_lo & ENTRY_P == 0 {
            return Err((DmaFault::ContextEntryNotPresent, fpd));
        }
        if ce_hi & CE_HI_RESERVED != 0 || ce_lo & (CE_LO_RESERVED | !haw) != 0 {
            return Err((DmaFault::ContextEntryReserved, fpd));
        }
        let aw = ce_hi & 7;
        let sagaw = (self.cap() >> CAP_SAGAW_SHIFT) & 0x1F;
        if sagaw & (1 << aw) == 0 {
            return Err((DmaFault::ContextEntryInvalid, fpd));
        }
        match (ce_lo >> CE_TT_SHIFT) & 3 {
            TT_MULTI_LEVEL => {}
            // ECAP.PT is set: untranslated requests go through as is.
            TT_PASS_THROUGH => return Ok(iova),
            // 01b needs ECAP.DT (device-TLBs), 11b is reserved.
            _ => return Err((DmaFault::ContextEntryInvalid, fpd)),
        }
        let levels = 2 + aw as u32;
        // The input address is checked against min(AGAW, MGAW).
        let width = (30 + 9 * aw as u32).min(u32::from(self.config.aw_bits));
        if iova >> width != 0 {
            return Err((DmaFault::AddressBeyondWidth, fpd));
        }
        let needed = if write { SL_W } else { SL_R };
        let mut table = ce_lo & !0xFFF;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let index = (iova >> shift) & 0x1FF;
            let Ok(pte) = self.mem.read_u64(table.wrapping_add(index * 8)) else {
                // A bad SLPTPTR is bad programming of the context entry.
                let fault = if level == levels {
                    DmaFault::ContextEntryInvalid
                } else {
                    DmaFault::PagingEntryAccess
                };
                return Err((fault, fpd));
            };
            // Permissions are the AND over the levels; R = W = 0 is
            // "not present", which faults as missing permission.
            if pte & needed == 0 {
                let fault = if write {
                    DmaFault::WriteDenied
                } else {
                    DmaFault::ReadDenied
                };
                return Err((fault, fpd));
            }
            let large = pte & SL_PS != 0 && (level == 2 || level == 3);
            if pte & self.slpte_reserved(level, large) != 0 {
                return Err((DmaFault::PagingEntryReserved, fpd));
            }
            if level == 1 || large {
                let offset_mask = (1u64 << shift) - 1;
                return Ok((pte & haw & !offset_mask) | (iova & offset_mask));
            }
            table = pte & haw & !0xFFF;
        }
        // Unreachable: level 1 always ends the walk.
        Err((DmaFault::PagingEntryAccess, fpd))
    }

    /// Reserved bits of a second-level entry at `level` (spec 9.8): bit 11
    /// (no snoop control), the address bits above the width, PS in a
    /// PML4E, and the address bits below a superpage's size.
    fn slpte_reserved(&self, level: u32, large: bool) -> u64 {
        let mut mask = SL_SNP | !(self.haw_mask() | SL_IGNORED);
        if level == 4 {
            mask |= SL_PS;
        }
        if large {
            mask |= ((1u64 << (12 + 9 * (level - 1))) - 1) & !0xFFF;
        }
        mask
    }

    // ---- Interrupt remapping (spec 5.1) ----

    /// Remaps an interrupt request: a DWORD write of `data` to `address`
    /// from `source_id`. With remapping off the request is decoded as a
    /// compatibility-format MSI. A fault is recorded (unless the IRTE's FPD
    /// suppresses it) and the interrupt is dropped.
    ///
    /// `source_id` `None` is a requester without a PCI id: QEMU's IOAPIC
    /// (and HPET) send their messages without one, and QEMU then skips the
    /// IRTE's source-id validation (kvm-unit-tests' `intel_iommu` relies
    /// on it: its IOAPIC IRTE asks to verify the PCI device's id). We do
    /// the same, and record such a request's faults with source id 0xFFFF
    /// as QEMU does.
    pub fn remap_interrupt(
        &mut self,
        source_id: Option<u16>,
        address: u64,
        data: u32,
    ) -> Result<ApicMessage, IrFault> {
        if self.state.gsts & GSTS_IRES == 0 {
            return decode_msi(address, data).ok_or(IrFault::NotInterruptAddress);
        }
        self.remap(source_id, address, data).map_err(|f| {
            if f.record {
                self.record_ir_fault(source_id, f.fault, f.index);
            }
            f.fault
        })
    }

    fn remap(
        &self,
        source_id: Option<u16>,
        address: u64,
        data: u32,
    ) -> Result<ApicMessage, IrFailure> {
        // The upper address is reserved, and only 0xFEEx_xxxx is an
        // interrupt request.
        if address >> 20 != 0xFEE {
            return Err(IrFailure::new(IrFault::RequestReserved, 0));
        }
        if address & MSI_FORMAT_REMAPPABLE == 0 {
            // Compatibility format passes through only while CFIS is set
            // and not in x2APIC mode (spec 5.1.4).
            if self.state.gsts & GSTS_CFIS != 0 && !self.state.irt_eime {
                return decode_msi(address, data)
                    .ok_or(IrFailure::new(IrFault::RequestReserved, 0));
            }
            return Err(IrFailure::new(IrFault::CompatibilityBlocked, 0));
        }
        // Handle: address bits 19:5, and bit 2 as handle[15] (spec 5.1.2.2).
        let handle = (((address >> 5) & 0x7FFF) | (((address >> 2) & 1) << 15)) as u32;
        let index = if address & MSI_SHV != 0 {
            // Data bits 15:0 are the subhandle, 31:16 reserved.
            if data & 0xFFFF_0000 != 0 {
                return Err(IrFailure::new(IrFault::RequestReserved, handle));
            }
            handle + (data & 0xFFFF)
        } else {
            handle
        };
        if index >= self.state.irt_size {
            return Err(IrFailure::new(IrFault::IndexBeyondTable, index));
        }
        let (lo, hi) = self
            .read128(self.state.irt_base.wrapping_add(u64::from(index) * 16))
            .ok_or(IrFailure::new(IrFault::TableAccess, index))?;
        // From here on faults are qualified by the IRTE's FPD, even the
        // entry not being present (spec 9.10).
        let fail = |fault| IrFailure {
            fault,
            index,
            record: lo & IRTE_FPD == 0,
        };
        if lo & IRTE_P == 0 {
            return Err(fail(IrFault::EntryNotPresent));
        }
        let mut reserved = IRTE_LO_RESERVED;
        if !self.state.irt_eime {
            reserved |= IRTE_LO_RESERVED_XAPIC;
        }
        if lo & reserved != 0 || hi & IRTE_HI_RESERVED != 0 {
            return Err(fail(IrFault::EntryReserved));
        }
        if let Some(sid) = source_id {
            if !source_id_matches(hi, sid) {
                return Err(fail(IrFault::SourceIdInvalid));
            }
        }
        let dst = (lo >> 32) as u32;
        let mut delivery = DeliveryMode::from_bits(((lo >> 5) & 7) as u32);
        // The redirection hint asks for lowest-priority arbitration, as
        // `decode_msi` treats RH in a compatibility-format MSI.
        if lo & IRTE_RH != 0 && delivery == DeliveryMode::Fixed {
            delivery = DeliveryMode::LowestPriority;
        }
        Ok(ApicMessage {
            vector: (lo >> 16) as u8,
            delivery,
            dest_mode: if lo & IRTE_DM != 0 {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            dest: if self.state.irt_eime {
                dst
            } else {
                (dst >> 8) & 0xFF
            },
            trigger: if lo & IRTE_TM != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            level: true,
            shorthand: Shorthand::None,
            source: None,
        })
    }

    // ---- Queued invalidation (spec 6.5.2) ----

    /// Runs the descriptors from IQH to IQT. Stops at a bad one with IQE
    /// set and IQH left on it. At most one pass over the queue.
    fn process_queue(&mut self) {
        if self.state.gsts & GSTS_QIES == 0 || self.state.fsts & FSTS_IQE != 0 {
            return;
        }
        let size = self.state.iq_size;
        let tail = self.iq_tail();
        // 256-bit descriptors need scalable mode; a tail beyond the queue
        // cannot be reached.
        if self.state.iq_dw || tail >= size {
            self.queue_error();
            return;
        }
        for _ in 0..size {
            if self.state.iqh == tail {
                return;
            }
            let gpa = self
                .state
                .iq_base
                .wrapping_add(u64::from(self.state.iqh) * 16);
            let ok = match self.read128(gpa) {
                Some((lo, hi)) => self.run_descriptor(lo, hi),
                None => false,
            };
            if !ok {
                self.queue_error();
                return;
            }
            self.state.iqh = (self.state.iqh + 1) % size;
        }
    }

    /// Carries out one descriptor; false if it is invalid.
    fn run_descriptor(&mut self, lo: u64, hi: u64) -> bool {
        match lo & 0xF {
            DESC_CONTEXT => {
                // Granularity 0 is reserved; nothing is cached.
                lo & DESC_CC_RESERVED == 0 && hi == 0 && (lo >> 4) & 3 != 0
            }
            DESC_IOTLB => {
                let granularity = (lo >> 4) & 3;
                lo & DESC_IOTLB_RESERVED_LO == 0
                    && hi & DESC_IOTLB_RESERVED_HI == 0
                    && granularity != 0
                    && (granularity != 3 || hi & 0x3F <= MAMV)
            }
            DESC_DEVICE_TLB => lo & DESC_DTLB_RESERVED_LO == 0 && hi & DESC_DTLB_RESERVED_HI == 0,
            DESC_IEC => lo & DESC_IEC_RESERVED == 0 && hi == 0,
            DESC_WAIT => {
                if lo & DESC_WAIT_RESERVED_LO != 0 || hi & DESC_WAIT_RESERVED_HI != 0 {
                    return false;
                }
                // Everything before has completed; SW and IF may both be
                // set (status write first), neither makes it a fence.
                if lo & DESC_WAIT_SW != 0 {
                    let status_address = hi & !3;
                    let status = ((lo >> 32) as u32).to_le_bytes();
                    if self.mem.write(status_address, &status).is_err() {
                        return false;
                    }
                    // Processors caching decoded code from that page see it.
                    self.mem.code_watch().note_write(status_address, u64::MAX);
                }
                if lo & DESC_WAIT_IF != 0 {
                    self.invalidation_complete_event();
                }
                true
            }
            // PASID descriptors need scalable mode; the rest are reserved.
            _ => false,
        }
    }

    // ---- Register interface ----

    /// Global command (spec 10.4.4). Software writes its enables with the
    /// one command it changes, often as GSTS | command (kvm-unit-tests),
    /// so one-shot bits may come back set: each such write runs them again.
    fn write_gcmd(&mut self, value: u32) {
        // WBF: there is no write buffer; the flush is complete at once and
        // WBFS, set only while one runs, reads clear.
        let value = value & !GCMD_WBF;
        let changed = value ^ self.state.gsts;
        if changed & GCMD_TE != 0 {
            self.state.gsts ^= GSTS_TES;
        }
        if value & GCMD_SRTP != 0 {
            self.state.root_table = self.state.rtaddr & self.haw_mask() & !0xFFF;
            self.state.gsts |= GSTS_RTPS;
        }
        if value & GCMD_SFL != 0 {
            // No advanced fault log to point at: latched at once.
            self.state.gsts |= GSTS_FLS;
        }
        if changed & GCMD_QIE != 0 {
            if value & GCMD_QIE != 0 {
                self.enable_queue();
            } else if self.state.iqh == self.iq_tail() {
                // Disabling is honoured only with the queue empty (spec
                // 6.5.2: software must wait for IQH == IQT).
                self.state.gsts &= !GSTS_QIES;
                self.state.iqh = 0;
            }
        }
        if self.config.intremap {
            if value & GCMD_SIRTP != 0 {
                let irta = self.state.irta;
                self.state.irt_base = irta & self.haw_mask() & !0xFFF;
                self.state.irt_size = 2 << (irta & IRTA_SIZE_MASK);
                self.state.irt_eime = irta & IRTA_EIME != 0 && self.config.eim;
                self.state.gsts |= GSTS_IRTPS;
            }
            if changed & GCMD_IRE != 0 {
                self.state.gsts ^= GSTS_IRES;
            }
            if changed & GCMD_CFI != 0 {
                self.state.gsts ^= GSTS_CFIS;
            }
        }
    }

    fn enable_queue(&mut self) {
        let iqa = self.state.iqa;
        self.state.iq_base = iqa & self.haw_mask() & !0xFFF;
        self.state.iq_size = 256 << (iqa & 7);
        self.state.iq_dw = iqa & IQA_DW != 0;
        self.state.iqh = 0;
        self.state.gsts |= GSTS_QIES;
        // The spec wants IQT zeroed first; Windows enables with work queued
        // and QEMU runs it, so do we.
        if self.iq_tail() != 0 {
            self.process_queue();
        }
    }

    /// Register-based context-cache invalidation (spec 10.4.7): nothing is
    /// cached, so it completes at once with the requested granularity.
    /// Ignored while queued invalidation is on (ICC stays set, as QEMU).
    fn context_command(&mut self) {
        if self.state.ccmd & CCMD_ICC == 0 || self.state.gsts & GSTS_QIES != 0 {
            return;
        }
        let caig = (self.state.ccmd >> CCMD_CIRG_SHIFT) & 3;
        self.state.ccmd =
            (self.state.ccmd & !(CCMD_ICC | CCMD_CAIG_MASK)) | (caig << CCMD_CAIG_SHIFT);
    }

    /// Register-based IOTLB invalidation (spec 10.4.8): IAIG reports the
    /// granularity done, 0 for a reserved one or a mask above MAMV.
    fn iotlb_command(&mut self) {
        if self.state.iotlb & IOTLB_IVT == 0 || self.state.gsts & GSTS_QIES != 0 {
            return;
        }
        let iaig = match (self.state.iotlb >> IOTLB_IIRG_SHIFT) & 3 {
            3 if self.state.iva & 0x3F > MAMV => 0,
            g => g,
        };
        self.state.iotlb =
            (self.state.iotlb & !(IOTLB_IVT | IOTLB_IAIG_MASK)) | (iaig << IOTLB_IAIG_SHIFT);
    }

    fn is_reg64(base: u64) -> bool {
        matches!(
            base,
            CAP | ECAP | RTADDR | CCMD | IQH | IQT | IQA | IRTA | IVA | IOTLB | FRCD_LO | FRCD_HI
        )
    }

    fn read64(&self, base: u64) -> u64 {
        let s = &self.state;
        match base {
            CAP => self.cap(),
            ECAP => self.ecap(),
            RTADDR => s.rtaddr,
            CCMD => s.ccmd & !CCMD_WRITE_ONLY,
            IQH => u64::from(s.iqh) << 4,
            IQT => s.iqt,
            IQA => s.iqa,
            IRTA => s.irta,
            IOTLB => s.iotlb,
            FRCD_LO => s.frcd[0],
            FRCD_HI => s.frcd[1],
            // IVA is write-only.
            _ => 0,
        }
    }

    /// Writes the bytes of 64-bit register `base` selected by `lanes`.
    fn write64(&mut self, base: u64, value: u64, lanes: u64) {
        let put = |old: u64, wmask: u64| (old & !(wmask & lanes)) | (value & wmask & lanes);
        let low = lanes & 0xFFFF_FFFF != 0;
        let high = lanes >> 32 != 0;
        match base {
            RTADDR => self.state.rtaddr = put(self.state.rtaddr, RTADDR_WMASK),
            CCMD => {
                self.state.ccmd = put(self.state.ccmd, CCMD_WMASK);
                if high {
                    self.context_command();
                }
            }
            IQT => {
                self.state.iqt = put(self.state.iqt, IQT_WMASK);
                if low {
                    self.process_queue();
                }
            }
            IQA => self.state.iqa = put(self.state.iqa, IQA_WMASK),
            IRTA => self.state.irta = put(self.state.irta, self.irta_wmask()),
            IVA => self.state.iva = put(self.state.iva, IVA_WMASK),
            IOTLB => {
                self.state.iotlb = put(self.state.iotlb, IOTLB_WMASK);
                if high {
                    self.iotlb_command();
                }
            }
            // F is write-1-to-clear; the rest is read-only.
            FRCD_HI if value & lanes & FRCD_F != 0 => {
                self.state.frcd[1] &= !FRCD_F;
                self.update_fault_ip();
            }
            // CAP, ECAP, IQH and the fault information are read-only.
            _ => {}
        }
    }

    fn read32_reg(&self, offset: u64) -> u32 {
        let s = &self.state;
        match offset {
            VER => VERSION,
            GSTS => s.gsts,
            FSTS => self.fsts(),
            FECTL => s.fectl,
            FEDATA => s.fedata,
            FEADDR => s.feaddr,
            FEUADDR => s.feuaddr,
            ICS => s.ics,
            IECTL => s.iectl,
            IEDATA => s.iedata,
            IEADDR => s.ieaddr,
            IEUADDR => s.ieuaddr,
            // GCMD is write-only; the rest is reserved or unimplemented.
            _ => 0,
        }
    }

    fn write32_reg(&mut self, offset: u64, value: u32) {
        match offset {
            GCMD => self.write_gcmd(value),
            FSTS => {
                self.state.fsts &= !(value & FSTS_W1C);
                self.update_fault_ip();
            }
            FECTL => {
                self.state.fectl = (self.state.fectl & !CTL_IM) | (value & CTL_IM);
                // Unmasking with an event pending sends it.
                if self.state.fectl & (CTL_IM | CTL_IP) == CTL_IP {
                    self.send_fault_event();
                    self.state.fectl &= !CTL_IP;
                }
            }
            FEDATA => self.state.fedata = value & self.msi_data_mask(),
            FEADDR => self.state.feaddr = value & MSI_ADDR_WMASK,
            FEUADDR => self.state.feuaddr = value & self.msi_upper_mask(),
            ICS => {
                self.state.ics &= !(value & ICS_IWC);
                if self.state.ics & ICS_IWC == 0 {
                    self.state.iectl &= !CTL_IP;
                }
            }
            IECTL => {
                self.state.iectl = (self.state.iectl & !CTL_IM) | (value & CTL_IM);
                if self.state.iectl & (CTL_IM | CTL_IP) == CTL_IP {
                    self.send_invalidation_event();
                    self.state.iectl &= !CTL_IP;
                }
            }
            IEDATA => self.state.iedata = value & self.msi_data_mask(),
            IEADDR => self.state.ieaddr = value & MSI_ADDR_WMASK,
            IEUADDR => self.state.ieuaddr = value & self.msi_upper_mask(),
            _ => {}
        }
    }

    /// A 32-bit read at a 4-byte aligned offset.
    fn read32(&self, offset: u64) -> u32 {
        let base = offset & !7;
        if Self::is_reg64(base) {
            (self.read64(base) >> (8 * (offset & 4))) as u32
        } else {
            self.read32_reg(offset)
        }
    }

    /// A 32-bit write at a 4-byte aligned offset.
    fn write32(&mut self, offset: u64, value: u32) {
        let base = offset & !7;
        if Self::is_reg64(base) {
            let shift = 8 * (offset & 4);
            self.write64(base, u64::from(value) << shift, 0xFFFF_FFFF << shift);
        } else {
            self.write32_reg(offset, value);
        }
    }

    /// The registers in readable form.
    pub fn dump(&self) -> String {
        let s = &self.state;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "vtd: ver=1.0 cap={:#018x} ecap={:#018x} aw={} intremap={} eim={}",
            self.cap(),
            self.ecap(),
            self.config.aw_bits,
            self.config.intremap,
            self.config.eim
        );
        let mut flags = String::new();
        for (bit, name) in [
            (GSTS_TES, "TES"),
            (GSTS_RTPS, "RTPS"),
            (GSTS_FLS, "FLS"),
            (GSTS_QIES, "QIES"),
            (GSTS_IRES, "IRES"),
            (GSTS_IRTPS, "IRTPS"),
            (GSTS_CFIS, "CFIS"),
        ] {
            if s.gsts & bit != 0 {
                flags.push(' ');
                flags.push_str(name);
            }
        }
        let _ = writeln!(out, "  gsts={:#010x}{}", s.gsts, flags);
        let _ = writeln!(
            out,
            "  root table={:#x} (rtaddr={:#x}) ccmd={:#018x}",
            s.root_table, s.rtaddr, s.ccmd
        );
        let _ = writeln!(
            out,
            "  irta={:#x} table={:#x} entries={} mode={}",
            s.irta,
            s.irt_base,
            s.irt_size,
            if s.irt_eime { "x2apic" } else { "xapic" }
        );
        let _ = writeln!(
            out,
            "  iq: iqa={:#x} base={:#x} entries={} head={} tail={} ics={:#x} iectl={:#010x} \
             ie msi={:#x}:{:#x}/{:#x}",
            s.iqa,
            s.iq_base,
            s.iq_size,
            s.iqh,
            self.iq_tail(),
            s.ics,
            s.iectl,
            s.ieuaddr,
            s.ieaddr,
            s.iedata
        );
        let fsts = self.fsts();
        let mut faults = String::new();
        for (bit, name) in [
            (FSTS_PFO, "PFO"),
            (FSTS_PPF, "PPF"),
            (FSTS_IQE, "IQE"),
            (FSTS_ICE, "ICE"),
            (FSTS_ITE, "ITE"),
        ] {
            if fsts & bit != 0 {
                faults.push(' ');
                faults.push_str(name);
            }
        }
        let _ = writeln!(
            out,
            "  fault status: fsts={:#010x}{} fectl={:#010x} fe msi={:#x}:{:#x}/{:#x}",
            fsts, faults, s.fectl, s.feuaddr, s.feaddr, s.fedata
        );
        let hi = s.frcd[1];
        let _ = writeln!(
            out,
            "  frcd[0]: {:#018x}_{:016x} F={} reason={:#04x} sid={:#06x} {}",
            hi,
            s.frcd[0],
            u8::from(hi & FRCD_F != 0),
            (hi >> FRCD_FR_SHIFT) as u8,
            hi as u16,
            if hi & FRCD_T != 0 { "read" } else { "write" }
        );
        out
    }
}

/// IRTE source validation (spec 9.10, SVT / SQ / SID).
fn source_id_matches(irte_hi: u64, sid: u16) -> bool {
    let irte_sid = irte_hi as u16;
    match (irte_hi >> 18) & 3 {
        0 => true,
        1 => {
            // SQ: which function-number bits to ignore.
            let mask: u16 = match (irte_hi >> 16) & 3 {
                0 => 0xFFFF,
                1 => 0xFFFB,
                2 => 0xFFF9,
                _ => 0xFFF8,
            };
            irte_sid & mask == sid & mask
        }
        2 => {
            // The bus must lie in [SID[15:8], SID[7:0]]: start bus in the
            // upper byte, end bus in the lower, as the spec and Linux's
            // set_irte_verify_bus have it (QEMU reads them swapped).
            let bus = sid >> 8;
            bus >= irte_sid >> 8 && bus <= irte_sid & 0xFF
        }
        // 11b is reserved: nothing verifies.
        _ => false,
    }
}

impl BusDevice for Vtd {
    fn name(&self) -> &'static str {
        "vtd"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match data.len() {
            4 if offset % 4 == 0 => data.copy_from_slice(&self.read32(offset).to_le_bytes()),
            8 if offset % 8 == 0 => {
                let value = if Self::is_reg64(offset) {
                    self.read64(offset)
                } else {
                    u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
                };
                data.copy_from_slice(&value.to_le_bytes());
            }
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match data.len() {
            4 if offset % 4 == 0 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.write32(offset, u32::from_le_bytes(b));
            }
            8 if offset % 8 == 0 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                let value = u64::from_le_bytes(b);
                if Self::is_reg64(offset) {
                    self.write64(offset, value, u64::MAX);
                } else {
                    // Two 32-bit registers (e.g. FEADDR / FEUADDR, which
                    // some guests write as one quadword), low one first.
                    self.write32(offset, value as u32);
                    self.write32(offset + 4, (value >> 32) as u32);
                }
            }
            _ => {}
        }
    }

    fn dump(&self) -> String {
        Vtd::dump(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the unit's own event interrupts.
    #[derive(Default)]
    struct Msis(Mutex<Vec<(Option<u16>, u64, u32)>>);
    impl MsiSink for Msis {
        fn msi(&self, source_id: Option<u16>, address: u64, data: u32) {
            self.0.lock().unwrap().push((source_id, address, data));
        }
    }
    impl Msis {
        fn take(&self) -> Vec<(Option<u16>, u64, u32)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const MEM_SIZE: u64 = 8 << 20;
    const ROOT: u64 = 0x1_0000;
    const IRT: u64 = 0x2_0000;
    const IQ: u64 = 0x3_0000;
    const STATUS: u64 = 0x4_0000;
    /// An address inside the 39-bit width but outside the 8 MiB of RAM.
    const NOT_RAM: u64 = 0x7F00_0000;
    /// The edu device of kvm-unit-tests at 00:03.0.
    const EDU: u16 = 0x18;
    const ONE_SHOT: u32 = GCMD_SRTP | GCMD_SIRTP | GCMD_SFL | GCMD_WBF;
    const FE_ADDR: u32 = 0xFEE0_0000;

    struct Rig {
        vtd: Vtd,
        mem: Arc<GuestMemory>,
        msis: Arc<Msis>,
        next_page: u64,
    }

    fn ir() -> VtdConfig {
        VtdConfig {
            intremap: true,
            ..VtdConfig::default()
        }
    }

    impl Rig {
        fn new(config: VtdConfig) -> Rig {
            let mem = Arc::new(GuestMemory::new(MEM_SIZE).unwrap());
            let msis = Arc::new(Msis::default());
            Rig {
                vtd: Vtd::new(config, mem.clone(), msis.clone()),
                mem,
                msis,
                next_page: 0x10_0000,
            }
        }
        fn r32(&mut self, offset: u64) -> u32 {
            let mut b = [0u8; 4];
            BusDevice::read(&mut self.vtd, offset, &mut b);
            u32::from_le_bytes(b)
        }
        fn w32(&mut self, offset: u64, value: u32) {
            BusDevice::write(&mut self.vtd, offset, &value.to_le_bytes());
        }
        fn r64(&mut self, offset: u64) -> u64 {
            let mut b = [0u8; 8];
            BusDevice::read(&mut self.vtd, offset, &mut b);
            u64::from_le_bytes(b)
        }
        fn w64(&mut self, offset: u64, value: u64) {
            BusDevice::write(&mut self.vtd, offset, &value.to_le_bytes());
        }
        /// kvm-unit-tests' vtd_gcmd_or: GSTS | command, then wait.
        fn gcmd_or(&mut self, cmd: u32) {
            let status = self.r32(GSTS);
            self.w32(GCMD, status | cmd);
            if cmd & ONE_SHOT == 0 {
                assert_ne!(self.r32(GSTS) & cmd, 0, "command {cmd:#x} not done");
            }
        }
        /// lib/x86/intel-iommu.c's vtd_init, step by step.
        fn kut_init(&mut self) {
            let version = self.r32(VER);
            assert!((version >> 3) & 0xF >= 1);
            self.r64(CAP);
            self.r64(ECAP);
            self.gcmd_or(GCMD_QIE);
            self.w64(RTADDR, ROOT);
            self.gcmd_or(GCMD_SRTP);
            self.w64(IRTA, IRT | 0xF);
            self.gcmd_or(GCMD_SIRTP);
            self.gcmd_or(GCMD_TE);
            self.gcmd_or(GCMD_IRE);
        }
        /// Translation on with the root table at ROOT (no IR, no QI).
        fn enable_translation(&mut self) {
            self.w64(RTADDR, ROOT);
            self.w32(GCMD, GCMD_SRTP);
            self.w32(GCMD, GCMD_TE);
            assert_eq!(self.r32(GSTS), GSTS_TES | GSTS_RTPS);
        }
        fn unmask_fault_event(&mut self, data: u32) {
            self.w32(FEDATA, data);
            self.w32(FEADDR, FE_ADDR);
            self.w32(FECTL, 0);
        }
        fn alloc(&mut self) -> u64 {
            let page = self.next_page;
            self.next_page += 0x1000;
            self.mem.zero(page, 0x1000).unwrap();
            page
        }
        /// Points the root entry of `sid`'s bus at a context table (made
        /// on first use) and writes `sid`'s context entry.
        fn set_context(&mut self, sid: u16, lo: u64, hi: u64) {
            let re = ROOT + u64::from(sid >> 8) * 16;
            let mut ctp = self.mem.read_u64(re).unwrap();
            if ctp & 1 == 0 {
                ctp = self.alloc() | 1;
                self.mem.write_u64(re, ctp).unwrap();
            }
            let ce = (ctp & !0xFFF) + u64::from(sid & 0xFF) * 16;
            self.mem.write_u64(ce, lo).unwrap();
            self.mem.write_u64(ce + 8, hi).unwrap();
        }
        /// A context entry for `sid`: multi-level, 3-level tables (AW 1) or
        /// 4-level (AW 2), domain `sid`. Returns SLPTPTR.
        fn domain(&mut self, sid: u16, aw: u64, fpd: bool) -> u64 {
            let slptptr = self.alloc();
            let lo = slptptr | if fpd { CE_FPD } else { 0 } | ENTRY_P;
            self.set_context(sid, lo, aw | (u64::from(sid) << 8));
            slptptr
        }
        /// kvm-unit-tests' vtd_install_pte, with any leaf level and flags.
        fn map(&mut self, slptptr: u64, levels: u32, iova: u64, pa: u64, flags: u64, leaf: u32) {
            let mut table = slptptr;
            let index = |level: u32| (iova >> (12 + 9 * (level - 1))) & 0x1FF;
            for level in (leaf + 1..=levels).rev() {
                let slot = table + index(level) * 8;
                let entry = self.mem.read_u64(slot).unwrap();
                if entry & 3 == 0 {
                    let page = self.alloc();
                    self.mem.write_u64(slot, page | 3).unwrap();
                    table = page;
                } else {
                    table = entry & 0xF_FFFF_FFFF_F000;
                }
            }
            let ps = if leaf > 1 { SL_PS } else { 0 };
            self.mem
                .write_u64(table + index(leaf) * 8, pa | flags | ps)
                .unwrap();
        }
        fn irte(&mut self, index: u64, lo: u64, hi: u64) {
            self.mem.write_u64(IRT + index * 16, lo).unwrap();
            self.mem.write_u64(IRT + index * 16 + 8, hi).unwrap();
        }
        fn frcd(&mut self) -> (u64, u64) {
            (self.r64(FRCD_LO), self.r64(FRCD_HI))
        }
        fn clear_frcd(&mut self) {
            // Linux clears F with a 32-bit write to the top dword.
            self.w32(FRCD_HI + 4, 1 << 31);
        }
        fn descriptor(&mut self, index: u64, lo: u64, hi: u64) {
            self.mem.write_u64(IQ + index * 16, lo).unwrap();
            self.mem.write_u64(IQ + index * 16 + 8, hi).unwrap();
        }
        fn enable_queue(&mut self, qs: u64) {
            self.w32(IQT, 0);
            self.w64(IQA, IQ | qs);
            self.w32(GCMD, GCMD_QIE);
            assert_ne!(self.r32(GSTS) & GSTS_QIES, 0);
        }
    }

    fn reason(hi: u64) -> u8 {
        (hi >> 32) as u8
    }

    /// A remappable-format MSI address for `handle`.
    fn remappable(handle: u32) -> u64 {
        0xFEE0_0000
            | (u64::from(handle & 0x7FFF) << 5)
            | (u64::from(handle >> 15) << 2)
            | MSI_FORMAT_REMAPPABLE
    }

    /// An IRTE's lower quadword from its fields (xAPIC or x2APIC DST).
    fn irte_lo(vector: u8, dlm: u64, dm: bool, tm: bool, dst: u32) -> u64 {
        IRTE_P
            | (u64::from(dm) << 2)
            | (u64::from(tm) << 4)
            | (dlm << 5)
            | (u64::from(vector) << 16)
            | (u64::from(dst) << 32)
    }

    fn irte_hi(sid: u16, sq: u64, svt: u64) -> u64 {
        u64::from(sid) | (sq << 16) | (svt << 18)
    }

    #[test]
    fn capability_registers_match_qemu() {
        let mut r = Rig::new(VtdConfig::default());
        assert_eq!(r.r32(VER), 0x10);
        // QEMU's intel-iommu with aw-bits=39: ND 6, SAGAW 39-bit, MGAW 38,
        // FRO 0x220, SLLPS 2M+1G, PSI, NFR 0, MAMV 18, DRD, DWD.
        assert_eq!(r.r64(CAP), 0x00D2_008C_2226_0206);
        assert_eq!(r.r32(CAP), 0x2226_0206);
        assert_eq!(r.r32(CAP + 4), 0x00D2_008C);
        // QI, PT, IRO 0xF0; no IR without intremap.
        assert_eq!(r.r64(ECAP), 0xF42);
        assert_eq!(r.r32(GSTS), 0);
        assert_eq!(r.r32(FSTS), 0);
        assert_eq!(r.r32(FECTL), CTL_IM);
        assert_eq!(r.r32(IECTL), CTL_IM);
        assert_eq!(r.vtd.host_address_width(), 38);

        let mut r = Rig::new(ir());
        assert_eq!(r.r64(ECAP), 0xF0_0F4A);
        let mut r = Rig::new(VtdConfig {
            intremap: true,
            eim: true,
            aw_bits: 48,
        });
        assert_eq!(r.r64(ECAP), 0xF0_0F5A);
        let cap = r.r64(CAP);
        assert_eq!((cap >> 8) & 0x1F, 0b110, "SAGAW 39 and 48");
        assert_eq!((cap >> 16) & 0x3F, 47, "MGAW");
        assert_eq!(r.vtd.host_address_width(), 47);
        // Normalization: EIM needs IR, widths are 39 or 48.
        let c = VtdConfig {
            intremap: false,
            eim: true,
            aw_bits: 40,
        }
        .normalized();
        assert_eq!((c.eim, c.aw_bits), (false, 39));
        let r = Rig::new(VtdConfig {
            aw_bits: 64,
            ..VtdConfig::default()
        });
        assert_eq!(r.vtd.config().aw_bits, 48);
    }

    #[test]
    fn kvm_unit_tests_init_sequence() {
        let mut r = Rig::new(ir());
        r.kut_init();
        // What x86/intel-iommu.c's "vtd_init" checks report.
        assert_eq!(r.r32(FSTS), 0, "fault status check");
        let gsts = r.r32(GSTS);
        for (bit, what) in [
            (GSTS_QIES, "QI enablement"),
            (GSTS_RTPS, "DMAR table setup"),
            (GSTS_IRTPS, "IR table setup"),
            (GSTS_TES, "DMAR enablement"),
            (GSTS_IRES, "IR enablement"),
        ] {
            assert_ne!(gsts & bit, 0, "{what}");
        }
        assert_eq!(gsts & (GSTS_CFIS | GSTS_FLS), 0);
        assert_ne!(r.r64(CAP) & (SAGAW_39 << 8), 0);
        assert_eq!(r.r64(CAP) & CAP_SLLPS, CAP_SLLPS);
        assert_eq!(r.r64(RTADDR) & !0xFFF, ROOT);
        assert_eq!(r.r64(IRTA), IRT | 0xF);
        assert_eq!(r.vtd.save_state().irt_size, 65536);
        assert!(r.msis.take().is_empty());

        // vtd_test_dmar: IOVA 0 mapped to a page, 4 bytes each way; the
        // context entry has FPD set, as vtd_map_range makes it.
        let page = 0x50_0000;
        let slptptr = r.domain(EDU, 1, true);
        r.map(slptptr, 3, 0, page, SL_R | SL_W, 1);
        assert_eq!(r.vtd.translate(EDU, 0, 4, false), Ok(page));
        assert_eq!(r.vtd.translate(EDU, 4, 4, true), Ok(page + 4));

        // vtd_test_ir: the IOAPIC entry uses IRTE 1, the MSI IRTE 2, both
        // full-SID verified against the edu device.
        let lo = irte_lo(0xED, 0, false, false, 0) | IRTE_FPD;
        r.irte(1, lo, irte_hi(EDU, 0, 1));
        let lo = irte_lo(0xEE, 0, false, false, 0) | IRTE_FPD;
        r.irte(2, lo, irte_hi(EDU, 0, 1));
        let m = r.vtd.remap_interrupt(None, remappable(1), 0xED).unwrap();
        assert_eq!((m.vector, m.dest, m.trigger), (0xED, 0, TriggerMode::Edge));
        let m = r.vtd.remap_interrupt(Some(EDU), remappable(2), 0).unwrap();
        assert_eq!(m.vector, 0xEE);
        assert_eq!(m.delivery, DeliveryMode::Fixed);
        assert_eq!(m.dest_mode, DestMode::Physical);
        assert_eq!(r.r32(FSTS), 0);
    }

    #[test]
    fn translates_4k_2m_and_1g_pages() {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        let slptptr = r.domain(EDU, 1, false);
        r.map(slptptr, 3, 0x5000, 0x30_0000, SL_R | SL_W, 1);
        r.map(slptptr, 3, 0x4000_0000, 0x60_0000, SL_R | SL_W, 2);
        r.map(slptptr, 3, 0x40_0000_0000, 0x4000_0000, SL_R, 3);
        assert_eq!(r.vtd.translate(EDU, 0x5ABC, 8, true), Ok(0x30_0ABC));
        assert_eq!(r.vtd.translate(EDU, 0x401F_1234, 4, false), Ok(0x7F_1234));
        assert_eq!(
            r.vtd.translate(EDU, 0x40_2345_6789, 4, false),
            Ok(0x6345_6789)
        );
        // The 1 GiB page is read-only.
        assert_eq!(
            r.vtd.translate(EDU, 0x40_0000_0000, 4, true),
            Err(DmaFault::WriteDenied)
        );
        // Another device on another bus is not mapped.
        assert_eq!(
            r.vtd.translate(0x0100, 0x5000, 4, false),
            Err(DmaFault::RootEntryNotPresent)
        );

        // 48-bit: 4-level tables (AW 2) reach the top of the width.
        let mut r = Rig::new(VtdConfig {
            aw_bits: 48,
            ..VtdConfig::default()
        });
        r.enable_translation();
        let slptptr = r.domain(EDU, 2, false);
        r.map(slptptr, 4, 0xFFFF_FFFF_F000, 0x7000, SL_R | SL_W, 1);
        r.map(slptptr, 4, 0x8000_0020_0000, 0x20_0000, SL_R | SL_W, 2);
        assert_eq!(r.vtd.translate(EDU, 0xFFFF_FFFF_F123, 1, false), Ok(0x7123));
        assert_eq!(
            r.vtd.translate(EDU, 0x8000_0021_0000, 1, true),
            Ok(0x21_0000)
        );
        assert_eq!(
            r.vtd.translate(EDU, 1 << 48, 1, false),
            Err(DmaFault::AddressBeyondWidth)
        );
        // A 3-level context on the same unit is fine too; its width is 39.
        let slptptr = r.domain(0x20, 1, false);
        r.map(slptptr, 3, 0x1000, 0x9000, SL_R, 1);
        assert_eq!(r.vtd.translate(0x20, 0x1004, 4, false), Ok(0x9004));
        assert_eq!(
            r.vtd.translate(0x20, 1 << 39, 4, false),
            Err(DmaFault::AddressBeyondWidth)
        );

        // A 39-bit unit does not do 4-level tables.
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        r.domain(EDU, 2, false);
        assert_eq!(
            r.vtd.translate(EDU, 0, 4, false),
            Err(DmaFault::ContextEntryInvalid)
        );
    }

    #[test]
    fn translation_off_is_identity() {
        let mut r = Rig::new(ir());
        for (sid, iova) in [(0u16, 0u64), (EDU, 0x1234_5678), (0xFFFF, u64::MAX)] {
            assert_eq!(r.vtd.translate(sid, iova, 1, true), Ok(iova));
        }
        // A root pointer alone does not turn translation on.
        r.w64(RTADDR, ROOT);
        r.w32(GCMD, GCMD_SRTP);
        assert_eq!(r.vtd.translate(EDU, 0x5000, 4, false), Ok(0x5000));
        // Nor does it after TE goes off again.
        r.w32(GCMD, GCMD_TE);
        assert!(r.vtd.translate(EDU, 0x5000, 4, false).is_err());
        r.w32(GCMD, 0);
        assert_eq!(r.r32(GSTS), GSTS_RTPS);
        assert_eq!(r.vtd.translate(EDU, 0x5000, 4, false), Ok(0x5000));
    }

    #[test]
    fn permission_faults_are_recorded_and_signalled() {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        r.unmask_fault_event(0x41);
        let slptptr = r.domain(EDU, 1, false);
        r.map(slptptr, 3, 0x5000, 0x30_0000, SL_R, 1);
        r.map(slptptr, 3, 0x6000, 0x31_0000, SL_W, 1);
        assert_eq!(r.vtd.translate(EDU, 0x5123, 4, false), Ok(0x30_0123));

        assert_eq!(
            r.vtd.translate(EDU, 0x5123, 4, true),
            Err(DmaFault::WriteDenied)
        );
        let (lo, hi) = r.frcd();
        assert_eq!(lo, 0x5000, "FI: the page address");
        assert_eq!(hi & FRCD_F, FRCD_F);
        assert_eq!(hi & FRCD_T, 0, "T clear: a write");
        assert_eq!(reason(hi), 0x05);
        assert_eq!(hi as u16, EDU);
        // Linux reads the record as dwords: +12 (F, T, FR), +8 (SID).
        assert_eq!(r.r32(FRCD_HI + 4), (1 << 31) | 0x05);
        assert_eq!(r.r32(FRCD_HI), u32::from(EDU));
        assert_eq!(r.r32(FRCD_LO), 0x5000);
        assert_eq!(r.r32(FSTS), FSTS_PPF, "PPF, FRI 0");
        assert_eq!(r.msis.take(), vec![(None, u64::from(FE_ADDR), 0x41)]);
        assert_eq!(r.r32(FECTL) & CTL_IP, 0);

        r.clear_frcd();
        assert_eq!(r.r32(FSTS), 0);
        assert_eq!(r.frcd().1 & FRCD_F, 0);

        assert_eq!(
            r.vtd.translate(EDU, 0x6FFF, 1, false),
            Err(DmaFault::ReadDenied)
        );
        let (lo, hi) = r.frcd();
        assert_eq!((lo, reason(hi)), (0x6000, 0x06));
        assert_eq!(hi & FRCD_T, FRCD_T, "T set: a read");
        assert_eq!(r.msis.take().len(), 1);
        // Write-only is fine for writes.
        r.clear_frcd();
        assert_eq!(r.vtd.translate(EDU, 0x6008, 8, true), Ok(0x31_0008));
        // A non-leaf entry's permissions count too.
        let pde = r.mem.read_u64(slptptr).unwrap();
        r.mem.write_u64(slptptr, pde & !SL_W).unwrap();
        assert_eq!(
            r.vtd.translate(EDU, 0x6008, 8, true),
            Err(DmaFault::WriteDenied)
        );
    }

    #[test]
    fn masked_fault_event_stays_pending() {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        r.w32(FEDATA, 0x52);
        r.w32(FEADDR, FE_ADDR | 0x3);
        assert_eq!(r.r32(FEADDR), FE_ADDR, "bits 1:0 reserved");
        r.domain(EDU, 1, false);
        assert!(r.vtd.translate(EDU, 0, 4, false).is_err());
        assert_eq!(r.r32(FECTL), CTL_IM | CTL_IP);
        assert!(r.msis.take().is_empty());
        // Unmasking sends the pending event.
        r.w32(FECTL, 0);
        assert_eq!(r.msis.take(), vec![(None, u64::from(FE_ADDR), 0x52)]);
        assert_eq!(r.r32(FECTL), 0);

        // Servicing the fault while masked clears IP: nothing to send.
        r.clear_frcd();
        r.w32(FECTL, CTL_IM);
        assert!(r.vtd.translate(EDU, 0, 4, false).is_err());
        assert_eq!(r.r32(FECTL), CTL_IM | CTL_IP);
        r.clear_frcd();
        assert_eq!(r.r32(FECTL), CTL_IM);
        r.w32(FECTL, 0);
        assert!(r.msis.take().is_empty());
    }

    #[test]
    fn second_fault_overflows() {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        r.unmask_fault_event(0x41);
        r.domain(EDU, 1, false);
        assert!(r.vtd.translate(EDU, 0x1000, 4, false).is_err());
        assert!(r.vtd.translate(EDU, 0x2000, 4, true).is_err());
        assert_eq!(r.r32(FSTS), FSTS_PPF | FSTS_PFO);
        assert_eq!(r.msis.take().len(), 1, "one event for both");
        assert_eq!(r.frcd().0, 0x1000, "the first record is kept");
        // With PFO set nothing is recorded, even with the record free.
        r.clear_frcd();
        assert_eq!(r.r32(FSTS), FSTS_PFO);
        assert!(r.vtd.translate(EDU, 0x3000, 4, false).is_err());
        assert_eq!(r.frcd().1 & FRCD_F, 0);
        // PFO is write-1-to-clear; PPF is read-only.
        r.w32(FSTS, FSTS_PFO | FSTS_PPF);
        assert_eq!(r.r32(FSTS), 0);
        assert!(r.vtd.translate(EDU, 0x3000, 4, false).is_err());
        assert_eq!(r.frcd().0, 0x3000);
        assert_eq!(r.msis.take().len(), 1);
    }

    #[test]
    fn fpd_suppresses_qualified_faults_only() {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        r.unmask_fault_event(0x41);
        let slptptr = r.domain(EDU, 1, true);
        r.map(slptptr, 3, 0x5000, 0x30_0000, SL_R, 1);
        assert_eq!(
            r.vtd.translate(EDU, 0x5000, 4, true),
            Err(DmaFault::WriteDenied)
        );
        assert_eq!(
            r.vtd.translate(EDU, 1 << 39, 4, true),
            Err(DmaFault::AddressBeyondWidth)
        );
        // FPD in a context entry that is not present counts too.
        r.set_context(0x19, CE_FPD, 0);
        assert_eq!(
            r.vtd.translate(0x19, 0, 4, false),
            Err(DmaFault::ContextEntryNotPresent)
        );
        assert_eq!(r.r32(FSTS), 0);
        assert!(r.msis.take().is_empty());
        // No context entry, no FPD: a missing root entry is recorded.
        assert_eq!(
            r.vtd.translate(0x0200, 0, 4, false),
            Err(DmaFault::RootEntryNotPresent)
        );
        assert_eq!(reason(r.frcd().1), 0x01);
        assert_eq!(r.frcd().1 as u16, 0x0200);
        assert_eq!(r.msis.take().len(), 1);
    }

    #[test]
    fn pass_through_and_reserved_translation_types() {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        r.set_context(EDU, (TT_PASS_THROUGH << CE_TT_SHIFT) | ENTRY_P, 1);
        assert_eq!(r.vtd.translate(EDU, 0x1234_5678, 4, true), Ok(0x1234_5678));
        assert_eq!(r.r32(FSTS), 0);
        for tt in [1, 3] {
            let mut r = Rig::new(VtdConfig::default());
            r.enable_translation();
            r.set_context(EDU, (tt << CE_TT_SHIFT) | ENTRY_P, 1);
            assert_eq!(
                r.vtd.translate(EDU, 0, 4, false),
                Err(DmaFault::ContextEntryInvalid)
            );
            assert_eq!(reason(r.frcd().1), 0x03, "TT {tt}");
        }
    }

    /// Runs `setup` on a fresh unit with translation on, then the request
    /// it returns; gives the fault and the record's upper quadword.
    fn first_fault(setup: impl FnOnce(&mut Rig) -> (u16, u64, bool)) -> (DmaFault, u64, u64) {
        let mut r = Rig::new(VtdConfig::default());
        r.enable_translation();
        let (sid, iova, write) = setup(&mut r);
        let fault = r.vtd.translate(sid, iova, 4, write).unwrap_err();
        let (lo, hi) = r.frcd();
        assert_eq!(reason(hi), fault.reason(), "{fault}");
        (fault, lo, hi)
    }

    #[test]
    fn table_faults_have_their_reasons() {
        type Setup = Box<dyn FnOnce(&mut Rig) -> (u16, u64, bool)>;
        let cases: Vec<(DmaFault, Setup)> = vec![
            (
                DmaFault::ContextEntryNotPresent,
                Box::new(|r| {
                    r.domain(EDU, 1, false);
                    (EDU + 1, 0, false)
                }),
            ),
            (
                DmaFault::RootEntryReserved,
                Box::new(|r| {
                    r.domain(EDU, 1, false);
                    let re = r.mem.read_u64(ROOT).unwrap();
                    r.mem.write_u64(ROOT, re | 2).unwrap();
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::RootEntryReserved,
                Box::new(|r| {
                    r.domain(EDU, 1, false);
                    r.mem.write_u64(ROOT + 8, 1).unwrap();
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::ContextEntryReserved,
                Box::new(|r| {
                    let p = r.alloc();
                    r.set_context(EDU, p | 0x10 | ENTRY_P, 1);
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::ContextEntryReserved,
                Box::new(|r| {
                    let p = r.alloc();
                    r.set_context(EDU, p | ENTRY_P, 1 | 0x80);
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::PagingEntryReserved,
                Box::new(|r| {
                    let s = r.domain(EDU, 1, false);
                    r.map(s, 3, 0x3000, 0x3000 | SL_SNP, SL_R, 1);
                    (EDU, 0x3000, false)
                }),
            ),
            (
                DmaFault::PagingEntryReserved,
                Box::new(|r| {
                    // A 2 MiB page whose address is not 2 MiB aligned.
                    let s = r.domain(EDU, 1, false);
                    r.map(s, 3, 0x20_0000, 0x20_1000, SL_R, 2);
                    (EDU, 0x20_0000, false)
                }),
            ),
            (
                DmaFault::PagingEntryReserved,
                Box::new(|r| {
                    // Address bits above the 39-bit width.
                    let s = r.domain(EDU, 1, false);
                    r.map(s, 3, 0x3000, 1 << 40, SL_R, 1);
                    (EDU, 0x3000, false)
                }),
            ),
            (
                DmaFault::ReadDenied,
                Box::new(|r| {
                    r.domain(EDU, 1, false);
                    (EDU, 0x3000, false)
                }),
            ),
            (
                DmaFault::AddressBeyondWidth,
                Box::new(|r| {
                    r.domain(EDU, 1, false);
                    (EDU, 1 << 39, true)
                }),
            ),
            (
                DmaFault::RootTableAccess,
                Box::new(|r| {
                    r.w64(RTADDR, 0x1_0000_0000);
                    r.w32(GCMD, GCMD_TE | GCMD_SRTP);
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::ContextTableAccess,
                Box::new(|r| {
                    r.mem.write_u64(ROOT, NOT_RAM | 1).unwrap();
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::ContextEntryInvalid,
                Box::new(|r| {
                    r.set_context(EDU, NOT_RAM | ENTRY_P, 1);
                    (EDU, 0, false)
                }),
            ),
            (
                DmaFault::PagingEntryAccess,
                Box::new(|r| {
                    let s = r.domain(EDU, 1, false);
                    r.mem.write_u64(s, NOT_RAM | 3).unwrap();
                    (EDU, 0, false)
                }),
            ),
        ];
        for (expected, setup) in cases {
            let (fault, lo, hi) = first_fault(setup);
            assert_eq!(fault, expected);
            assert_eq!(hi & FRCD_F, FRCD_F, "{fault}");
            assert_eq!(lo & 0xFFF, 0);
        }
        // Root entry not present: reason 1, on an empty root table.
        let (fault, lo, _) = first_fault(|_| (0x0300, 0x7777, false));
        assert_eq!((fault, lo), (DmaFault::RootEntryNotPresent, 0x7000));
    }

    #[test]
    fn remaps_through_an_xapic_irte() {
        let mut r = Rig::new(ir());
        r.kut_init();
        r.unmask_fault_event(0x41);
        // Logical, level, lowest priority, vector 0x61, APIC id 3 in
        // DST[15:8].
        r.irte(5, irte_lo(0x61, 1, true, true, 0x0300), 0);
        let m = r.vtd.remap_interrupt(Some(EDU), remappable(5), 0).unwrap();
        assert_eq!(
            m,
            ApicMessage {
                vector: 0x61,
                delivery: DeliveryMode::LowestPriority,
                dest_mode: DestMode::Logical,
                dest: 3,
                trigger: TriggerMode::Level,
                level: true,
                shorthand: Shorthand::None,
                source: None,
            }
        );
        // Fixed with the redirection hint arbitrates, as decode_msi does.
        r.irte(6, irte_lo(0x62, 0, false, false, 0xFF00) | IRTE_RH, 0);
        let m = r.vtd.remap_interrupt(None, remappable(6), 0).unwrap();
        assert_eq!(m.delivery, DeliveryMode::LowestPriority);
        assert_eq!(m.dest, 0xFF);
        // NMI and ExtINT delivery modes.
        r.irte(7, irte_lo(0, 4, false, false, 0x100), 0);
        let m = r.vtd.remap_interrupt(None, remappable(7), 0).unwrap();
        assert_eq!((m.delivery, m.dest), (DeliveryMode::Nmi, 1));
        // Handle bit 15 lives in address bit 2.
        r.irte(0x8001, irte_lo(0x77, 7, false, false, 0x200), 0);
        let m = r.vtd.remap_interrupt(None, remappable(0x8001), 0).unwrap();
        assert_eq!((m.vector, m.delivery), (0x77, DeliveryMode::ExtInt));
        // In xAPIC mode DST[7:0] and DST[31:16] are reserved.
        r.irte(8, irte_lo(0x63, 0, false, false, 0x0301), 0);
        assert_eq!(
            r.vtd.remap_interrupt(None, remappable(8), 0),
            Err(IrFault::EntryReserved)
        );
        assert_eq!(reason(r.frcd().1), 0x24);
        assert_eq!(r.frcd().0, 8 << 48, "FI[63:48]: the index");
        assert_eq!(r.frcd().1 as u16, 0xFFFF, "no requester id");
        assert_eq!(r.msis.take().len(), 1);
    }

    #[test]
    fn remaps_through_an_x2apic_irte() {
        let mut r = Rig::new(VtdConfig {
            intremap: true,
            eim: true,
            aw_bits: 39,
        });
        r.w64(IRTA, IRT | IRTA_EIME | 7);
        r.w32(GCMD, GCMD_SIRTP);
        r.w32(GCMD, GCMD_IRE | GCMD_CFI);
        assert_eq!(r.r32(GSTS), GSTS_IRTPS | GSTS_IRES | GSTS_CFIS);
        r.irte(3, irte_lo(0x40, 0, false, true, 0x1234_5678), 0);
        let m = r.vtd.remap_interrupt(Some(EDU), remappable(3), 0).unwrap();
        assert_eq!((m.vector, m.dest), (0x40, 0x1234_5678));
        assert_eq!(m.trigger, TriggerMode::Level);
        // x2APIC mode blocks compatibility format even with CFI set.
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), 0xFEE0_1000, 0x31),
            Err(IrFault::CompatibilityBlocked)
        );
        assert_eq!(reason(r.frcd().1), 0x25);
        // The table is 256 entries (S = 7).
        assert_eq!(r.vtd.save_state().irt_size, 256);
        assert_eq!(r.r64(IRTA), IRT | IRTA_EIME | 7);
        // Without EIM, EIME cannot be set: xAPIC destinations.
        let mut r = Rig::new(ir());
        r.w64(IRTA, IRT | IRTA_EIME | 7);
        assert_eq!(r.r64(IRTA), IRT | 7);
        r.w32(GCMD, GCMD_SIRTP | GCMD_IRE);
        r.irte(3, irte_lo(0x40, 0, false, false, 0x0200), 0);
        let m = r.vtd.remap_interrupt(None, remappable(3), 0).unwrap();
        assert_eq!(m.dest, 2);
    }

    #[test]
    fn source_id_validation() {
        let mut r = Rig::new(ir());
        r.kut_init();
        let lo = irte_lo(0x50, 0, false, false, 0);
        // Full SID.
        r.irte(1, lo, irte_hi(EDU, 0, 1));
        assert!(r.vtd.remap_interrupt(Some(EDU), remappable(1), 0).is_ok());
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU + 1), remappable(1), 0),
            Err(IrFault::SourceIdInvalid)
        );
        let (lo_rec, hi) = r.frcd();
        assert_eq!((reason(hi), hi as u16, lo_rec), (0x26, EDU + 1, 1 << 48));
        r.clear_frcd();
        // No requester id (the IOAPIC): not verified.
        assert!(r.vtd.remap_interrupt(None, remappable(1), 0).is_ok());
        // SQ 3 ignores the function number.
        r.irte(2, lo, irte_hi(EDU, 3, 1));
        assert!(r
            .vtd
            .remap_interrupt(Some(EDU | 7), remappable(2), 0)
            .is_ok());
        assert!(r
            .vtd
            .remap_interrupt(Some(EDU + 8), remappable(2), 0)
            .is_err());
        r.clear_frcd();
        // SQ 1 ignores bit 2 only.
        r.irte(3, lo, irte_hi(EDU, 1, 1));
        assert!(r
            .vtd
            .remap_interrupt(Some(EDU | 4), remappable(3), 0)
            .is_ok());
        assert!(r
            .vtd
            .remap_interrupt(Some(EDU | 1), remappable(3), 0)
            .is_err());
        r.clear_frcd();
        // Bus range: buses 1 to 3 (start in SID[15:8], end in SID[7:0]).
        r.irte(4, lo, irte_hi(0x0103, 0, 2));
        for (sid, ok) in [
            (0x0100, true),
            (0x0318, true),
            (0x0000, false),
            (0x0400, false),
        ] {
            let res = r.vtd.remap_interrupt(Some(sid), remappable(4), 0);
            assert_eq!(res.is_ok(), ok, "sid {sid:#x}");
            r.clear_frcd();
        }
        // SVT 11b is reserved: nothing passes.
        r.irte(5, lo, irte_hi(EDU, 0, 3));
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), remappable(5), 0),
            Err(IrFault::SourceIdInvalid)
        );
        // FPD suppresses the record.
        r.clear_frcd();
        r.irte(6, lo | IRTE_FPD, irte_hi(EDU, 0, 1));
        assert!(r.vtd.remap_interrupt(Some(0x20), remappable(6), 0).is_err());
        assert_eq!(r.r32(FSTS), 0);
    }

    #[test]
    fn subhandles_and_request_reserved_fields() {
        let mut r = Rig::new(ir());
        r.kut_init();
        r.irte(11, irte_lo(0x5B, 0, false, false, 0), 0);
        let address = remappable(8) | MSI_SHV;
        let m = r.vtd.remap_interrupt(Some(EDU), address, 3).unwrap();
        assert_eq!(m.vector, 0x5B);
        // Without SHV the data is not an index.
        r.irte(8, irte_lo(0x58, 0, false, false, 0), 0);
        let m = r.vtd.remap_interrupt(Some(EDU), remappable(8), 3).unwrap();
        assert_eq!(m.vector, 0x58);
        // Data bits 31:16 are reserved with SHV.
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), address, 0x1_0003),
            Err(IrFault::RequestReserved)
        );
        assert_eq!(reason(r.frcd().1), 0x20);
        r.clear_frcd();
        // So is the upper address.
        assert_eq!(
            r.vtd
                .remap_interrupt(Some(EDU), remappable(8) | (1 << 32), 0),
            Err(IrFault::RequestReserved)
        );
        // A subhandle past the end of the table.
        r.clear_frcd();
        assert_eq!(
            r.vtd
                .remap_interrupt(Some(EDU), remappable(0xFFFF) | MSI_SHV, 1),
            Err(IrFault::IndexBeyondTable)
        );
    }

    #[test]
    fn irte_faults_have_their_reasons() {
        let mut r = Rig::new(ir());
        r.w64(IRTA, IRT | 3);
        r.w32(GCMD, GCMD_SIRTP | GCMD_IRE);
        let cases = [
            (16u32, 0u64, 0u64, IrFault::IndexBeyondTable),
            (1, 0, 0, IrFault::EntryNotPresent),
            (
                2,
                irte_lo(0x40, 0, false, false, 0) | (1 << 12),
                0,
                IrFault::EntryReserved,
            ),
            (
                3,
                irte_lo(0x40, 0, false, false, 0) | (1 << 15),
                0,
                IrFault::EntryReserved,
            ),
            (
                4,
                irte_lo(0x40, 0, false, false, 0),
                1 << (84 - 64),
                IrFault::EntryReserved,
            ),
        ];
        for (index, lo, hi, expected) in cases {
            if index < 16 {
                r.irte(u64::from(index), lo, hi);
            }
            assert_eq!(
                r.vtd.remap_interrupt(Some(EDU), remappable(index), 0),
                Err(expected)
            );
            let (fi, frcd_hi) = r.frcd();
            assert_eq!(reason(frcd_hi), expected.reason().unwrap());
            assert_eq!(fi >> 48, u64::from(index));
            r.clear_frcd();
        }
        // FPD even in an entry that is not present.
        r.irte(9, IRTE_FPD, 0);
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), remappable(9), 0),
            Err(IrFault::EntryNotPresent)
        );
        assert_eq!(r.r32(FSTS), 0);
        // A table outside RAM.
        r.w64(IRTA, NOT_RAM | 3);
        r.w32(GCMD, GCMD_SIRTP | GCMD_IRE);
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), remappable(1), 0),
            Err(IrFault::TableAccess)
        );
        assert_eq!(reason(r.frcd().1), 0x23);
    }

    #[test]
    fn compatibility_format_needs_cfi() {
        let mut r = Rig::new(ir());
        // Remapping off: decoded as today.
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), 0xFEE0_1000, 0x4031),
            Ok(decode_msi(0xFEE0_1000, 0x4031).unwrap())
        );
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), 0xFED0_0000, 0),
            Err(IrFault::NotInterruptAddress)
        );
        r.kut_init();
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), 0xFEE0_1000, 0x4031),
            Err(IrFault::CompatibilityBlocked)
        );
        assert_eq!(reason(r.frcd().1), 0x25);
        assert_eq!(r.frcd().1 as u16, EDU);
        r.gcmd_or(GCMD_CFI);
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), 0xFEE0_1000, 0x4031),
            Ok(decode_msi(0xFEE0_1000, 0x4031).unwrap())
        );
        // Not an interrupt address at all.
        assert_eq!(
            r.vtd.remap_interrupt(Some(EDU), 0xFED0_0000, 0),
            Err(IrFault::RequestReserved)
        );
        // Without IR support the IR commands are ignored.
        let mut r = Rig::new(VtdConfig::default());
        r.w32(GCMD, GCMD_IRE | GCMD_SIRTP | GCMD_CFI);
        assert_eq!(r.r32(GSTS), 0);
        assert!(r.vtd.remap_interrupt(None, 0xFEE0_1000, 0x31).is_ok());
    }

    #[test]
    fn invalidation_wait_writes_status_and_signals() {
        let mut r = Rig::new(ir());
        r.enable_queue(0);
        r.w32(IEDATA, 0x42);
        r.w32(IEADDR, FE_ADDR);
        r.w32(IECTL, 0);
        r.descriptor(0, DESC_IOTLB | (1 << 4), 0);
        r.descriptor(1, DESC_CONTEXT | (1 << 4), 0);
        r.descriptor(2, DESC_IEC, 0);
        r.descriptor(3, DESC_DEVICE_TLB | (0x18 << 32), 0x1000);
        r.descriptor(4, DESC_WAIT | DESC_WAIT_SW | (0xCAFE << 32), STATUS);
        r.descriptor(5, DESC_WAIT | DESC_WAIT_IF, 0);
        r.w64(IQT, 6 << 4);
        assert_eq!(r.r64(IQH), 6 << 4);
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 0xCAFE);
        assert_eq!(r.r32(ICS), ICS_IWC);
        assert_eq!(r.msis.take(), vec![(None, u64::from(FE_ADDR), 0x42)]);
        assert_eq!(r.r32(FSTS), 0);
        // IWC still set: no new event.
        r.descriptor(
            6,
            DESC_WAIT | DESC_WAIT_IF | DESC_WAIT_SW | (7 << 32),
            STATUS,
        );
        r.w32(IQT, 7 << 4);
        assert!(r.msis.take().is_empty());
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 7);
        r.w32(ICS, ICS_IWC);
        assert_eq!(r.r32(ICS), 0);
        // Masked: pending until unmasked.
        r.w32(IECTL, CTL_IM);
        r.descriptor(7, DESC_WAIT | DESC_WAIT_IF, 0);
        r.w32(IQT, 8 << 4);
        assert_eq!(r.r32(IECTL), CTL_IM | CTL_IP);
        assert!(r.msis.take().is_empty());
        r.w32(IECTL, 0);
        assert_eq!(r.msis.take().len(), 1);
        assert_eq!(r.r32(IECTL), 0);
        // Nothing happens with the queue off: IQT is just stored.
        let mut r = Rig::new(ir());
        r.descriptor(0, DESC_WAIT | DESC_WAIT_SW | (9 << 32), STATUS);
        r.w32(IQT, 1 << 4);
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 0);
        assert_eq!(r.r64(IQT), 1 << 4);
        // Enabling with work queued runs it (as QEMU does for Windows).
        r.w64(IQA, IQ);
        r.w32(GCMD, GCMD_QIE);
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 9);
        assert_eq!(r.r64(IQH), 1 << 4);
    }

    #[test]
    fn bad_descriptor_sets_iqe_and_stops() {
        let mut r = Rig::new(ir());
        r.enable_queue(0);
        r.unmask_fault_event(0x43);
        r.descriptor(0, DESC_IEC, 0);
        r.descriptor(1, 9, 0);
        r.descriptor(2, DESC_WAIT | DESC_WAIT_SW | (1 << 32), STATUS);
        r.w64(IQT, 3 << 4);
        assert_eq!(r.r64(IQH), 1 << 4, "IQH on the bad descriptor");
        assert_eq!(r.r32(FSTS), FSTS_IQE);
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 0);
        assert_eq!(r.msis.take(), vec![(None, u64::from(FE_ADDR), 0x43)]);
        // Stopped until IQE is cleared.
        r.descriptor(1, DESC_IOTLB | (2 << 4) | (5 << 16), 0);
        r.w64(IQT, 3 << 4);
        assert_eq!(r.r64(IQH), 1 << 4);
        r.w32(FSTS, FSTS_IQE);
        assert_eq!(r.r32(FSTS), 0);
        r.w64(IQT, 3 << 4);
        assert_eq!(r.r64(IQH), 3 << 4);
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 1);
        // Reserved bits, a reserved granularity, a mask above MAMV, a
        // status address outside RAM, 256-bit descriptors: all IQE.
        let bad = [
            (DESC_WAIT | (1 << 7), STATUS),
            (DESC_WAIT, 1),
            (DESC_CONTEXT, 0),
            (DESC_CONTEXT | (1 << 4), 1),
            (DESC_IOTLB, 0),
            (DESC_IOTLB | (3 << 4), 19),
            (DESC_IEC | (1 << 8), 0),
            (DESC_WAIT | DESC_WAIT_SW, NOT_RAM),
            (DESC_IEC | (1 << 9), 0),
            (DESC_DEVICE_TLB, 2),
            (6, 0),
        ];
        for (i, (lo, hi)) in bad.into_iter().enumerate() {
            let head = 3 + i as u64;
            r.descriptor(head, lo, hi);
            r.w64(IQT, (head + 1) << 4);
            assert_eq!(r.r32(FSTS), FSTS_IQE, "descriptor {lo:#x} {hi:#x}");
            assert_eq!(r.r64(IQH), head << 4);
            // Make it valid and go on.
            r.descriptor(head, DESC_IEC, 0);
            r.w32(FSTS, FSTS_IQE);
            r.w64(IQT, (head + 1) << 4);
            assert_eq!(r.r64(IQH), (head + 1) << 4);
        }
        let mut r = Rig::new(ir());
        r.w64(IQA, IQ | IQA_DW);
        r.w32(GCMD, GCMD_QIE);
        r.descriptor(0, DESC_IEC, 0);
        r.w64(IQT, 2 << 4);
        assert_eq!(r.r32(FSTS), FSTS_IQE);
    }

    #[test]
    fn invalidation_queue_wraps() {
        let mut r = Rig::new(ir());
        r.enable_queue(0);
        for i in 0..256 {
            r.descriptor(i, DESC_IEC, 0);
        }
        r.w64(IQT, 250 << 4);
        assert_eq!(r.r64(IQH), 250 << 4);
        r.descriptor(255, DESC_WAIT | DESC_WAIT_SW | (0x55 << 32), STATUS);
        r.descriptor(2, DESC_WAIT | DESC_WAIT_SW | (0x66 << 32), STATUS + 4);
        r.w64(IQT, 4 << 4);
        assert_eq!(r.r64(IQH), 4 << 4);
        assert_eq!(r.mem.read_u32(STATUS).unwrap(), 0x55);
        assert_eq!(r.mem.read_u32(STATUS + 4).unwrap(), 0x66);
        // A tail beyond the 256-entry queue is an error.
        r.w64(IQT, 300 << 4);
        assert_eq!(r.r32(FSTS), FSTS_IQE);
        assert_eq!(r.r64(IQH), 4 << 4);
        // A bigger queue (QS = 1) takes it.
        let mut r = Rig::new(ir());
        r.enable_queue(1);
        r.mem.zero(IQ, 0x2000).unwrap();
        for i in 0..300 {
            r.descriptor(i, DESC_IEC, 0);
        }
        r.w64(IQT, 300 << 4);
        assert_eq!(r.r64(IQH), 300 << 4);
        assert_eq!(r.r32(FSTS), 0);
    }

    #[test]
    fn queue_disable_waits_for_an_empty_queue() {
        let mut r = Rig::new(ir());
        r.enable_queue(0);
        r.descriptor(0, 0, 0);
        r.w64(IQT, 1 << 4);
        assert_eq!(r.r32(FSTS), FSTS_IQE);
        r.w32(GCMD, 0);
        assert_ne!(r.r32(GSTS) & GSTS_QIES, 0, "IQH != IQT: still on");
        r.descriptor(0, DESC_WAIT | DESC_WAIT_SW | (3 << 32), STATUS);
        r.w32(FSTS, FSTS_IQE);
        r.w64(IQT, 1 << 4);
        assert_eq!(r.r64(IQH), 1 << 4);
        r.w32(GCMD, 0);
        assert_eq!(r.r32(GSTS) & GSTS_QIES, 0);
        assert_eq!(r.r64(IQH), 0);
        // Enabling again starts from IQH 0.
        r.w32(IQT, 0);
        r.w32(GCMD, GCMD_QIE);
        assert_eq!(r.r64(IQH), 0);
    }

    #[test]
    fn register_invalidation_completes_at_once() {
        let mut r = Rig::new(VtdConfig::default());
        // Global context invalidation as one quadword.
        r.w64(CCMD, CCMD_ICC | (1 << 61));
        assert_eq!(r.r64(CCMD), (1 << 61) | (1 << 59));
        // Device-selective as two dwords: nothing happens until the high
        // one; SID and FM are write-only.
        r.w32(CCMD, 0x0018_0005);
        assert_eq!(r.r64(CCMD) & CCMD_ICC, 0);
        r.w32(CCMD + 4, ((CCMD_ICC | (3 << 61) | (1 << 32)) >> 32) as u32);
        assert_eq!(r.r64(CCMD), (3 << 61) | (3 << 59) | 5);
        // Reserved granularity: CAIG 0.
        r.w64(CCMD, CCMD_ICC);
        assert_eq!(r.r64(CCMD) & (CCMD_ICC | CCMD_CAIG_MASK), 0);

        // IOTLB: global, then page-selective with a good and a bad mask.
        r.w64(IOTLB, IOTLB_IVT | (1 << 60));
        assert_eq!(r.r64(IOTLB), (1 << 60) | (1 << 57));
        r.w64(IVA, 0x1234_5000 | 3);
        assert_eq!(r.r64(IVA), 0, "IVA is write-only");
        r.w64(IOTLB, IOTLB_IVT | (3 << 60) | (7 << 32));
        assert_eq!(r.r64(IOTLB), (3 << 60) | (3 << 57) | (7 << 32));
        r.w64(IVA, 0x1234_5000 | 19);
        r.w32(IOTLB + 4, ((IOTLB_IVT | (3 << 60)) >> 32) as u32);
        assert_eq!(r.r64(IOTLB) & (IOTLB_IVT | IOTLB_IAIG_MASK), 0);

        // With queued invalidation on, the registers do nothing.
        r.enable_queue(0);
        r.w64(CCMD, CCMD_ICC | (1 << 61));
        assert_ne!(r.r64(CCMD) & CCMD_ICC, 0);
        r.w64(IOTLB, IOTLB_IVT | (1 << 60));
        assert_ne!(r.r64(IOTLB) & IOTLB_IVT, 0);
    }

    #[test]
    fn access_sizes_and_reserved_registers() {
        let mut r = Rig::new(VtdConfig {
            intremap: true,
            eim: true,
            aw_bits: 48,
        });
        let mut b1 = [0xEEu8; 1];
        BusDevice::read(&mut r.vtd, VER, &mut b1);
        assert_eq!(b1, [0]);
        let mut b2 = [0xEEu8; 2];
        BusDevice::read(&mut r.vtd, VER, &mut b2);
        assert_eq!(b2, [0, 0]);
        // Misaligned reads return 0, misaligned writes are dropped.
        let mut b4 = [0xEEu8; 4];
        BusDevice::read(&mut r.vtd, CAP + 2, &mut b4);
        assert_eq!(b4, [0; 4]);
        BusDevice::write(&mut r.vtd, RTADDR + 4, &[0u8; 8]);
        BusDevice::write(&mut r.vtd, FEDATA, &[0x12]);
        BusDevice::write(&mut r.vtd, FEDATA + 1, &[0x12, 0, 0, 0]);
        assert_eq!(r.r32(FEDATA), 0);
        // A quadword read at VER gets VER and the reserved dword.
        assert_eq!(r.r64(VER), 0x10);
        // GCMD is write-only: a quadword at 0x18 has GSTS on top.
        r.w32(GCMD, GCMD_QIE);
        assert_eq!(r.r64(GCMD), u64::from(GSTS_QIES) << 32);
        assert_eq!(r.r32(GCMD), 0);
        // Halves of a 64-bit register.
        r.w32(RTADDR, 0x1234_5FFF);
        r.w32(RTADDR + 4, 0xAB);
        assert_eq!(r.r64(RTADDR), 0xAB_1234_5000);
        assert_eq!(r.r32(RTADDR + 4), 0xAB);
        // Read-only registers.
        let cap = r.r64(CAP);
        r.w64(CAP, 0);
        r.w32(ECAP, 0);
        r.w32(GSTS, u32::MAX);
        assert_eq!(r.r64(CAP), cap);
        assert_ne!(r.r64(ECAP), 0);
        assert_eq!(r.r32(GSTS), GSTS_QIES);
        r.w64(IQH, 0x100);
        assert_eq!(r.r64(IQH), 0);
        // Reserved offsets.
        for offset in [0x04, 0x30, 0x58, 0x64, 0x70, 0xC0, 0x200, 0x230, 0xFF8] {
            r.w64(offset, u64::MAX);
            assert_eq!(r.r64(offset), 0, "{offset:#x}");
        }
        // FEADDR and FEUADDR in one quadword (Xen does it); EIM makes
        // FEUADDR and the upper data bits exist.
        r.w64(FEADDR, 0x0000_0012_FEE0_0003);
        assert_eq!(r.r32(FEADDR), 0xFEE0_0000);
        assert_eq!(r.r32(FEUADDR), 0x12);
        r.w32(FEDATA, 0xABCD_1234);
        assert_eq!(r.r32(FEDATA), 0xABCD_1234);
        let mut r = Rig::new(ir());
        r.w64(FEADDR, 0x0000_0012_FEE0_0000);
        r.w32(FEDATA, 0xABCD_1234);
        r.w32(IEUADDR, 1);
        assert_eq!(r.r32(FEUADDR), 0);
        assert_eq!(r.r32(IEUADDR), 0);
        assert_eq!(r.r32(FEDATA), 0x1234);
        // IRTA, IQA and RTADDR keep only their fields.
        r.w64(IRTA, u64::MAX);
        assert_eq!(r.r64(IRTA), !0xFF0, "no EIME without EIM");
        r.w64(IQA, u64::MAX);
        assert_eq!(r.r64(IQA), !0x7F8);
    }

    #[test]
    fn one_shot_commands_and_status() {
        let mut r = Rig::new(ir());
        r.w64(RTADDR, ROOT);
        r.w32(GCMD, GCMD_SRTP | GCMD_WBF | GCMD_SFL);
        // WBF completes at once (WBFS reads clear); RTPS and FLS latched.
        assert_eq!(r.r32(GSTS), GSTS_RTPS | GSTS_FLS);
        // A later root table takes effect only with SRTP again.
        r.w32(GCMD, GCMD_TE);
        r.w64(RTADDR, 0x9000);
        assert_eq!(r.vtd.save_state().root_table, ROOT);
        r.w32(GCMD, GCMD_TE | GCMD_SRTP);
        assert_eq!(r.vtd.save_state().root_table, 0x9000);
        assert_eq!(r.r32(GSTS), GSTS_TES | GSTS_RTPS | GSTS_FLS);
        // Disabling by writing the enables without TE.
        r.w32(GCMD, 0);
        assert_eq!(r.r32(GSTS) & GSTS_TES, 0);
        // The root address is limited to the width.
        r.w64(RTADDR, 0xFF_0000_1000);
        r.w32(GCMD, GCMD_SRTP);
        assert_eq!(r.vtd.save_state().root_table, 0x7F_0000_1000);
    }

    #[test]
    fn save_restore_reset_and_dump() {
        let mut r = Rig::new(ir());
        r.kut_init();
        r.unmask_fault_event(0x41);
        let slptptr = r.domain(EDU, 1, false);
        r.map(slptptr, 3, 0x1000, 0x30_0000, SL_R, 1);
        assert!(r.vtd.translate(EDU, 0x1000, 4, true).is_err());
        r.msis.take();
        let saved = r.vtd.save_state();

        let msis = Arc::new(Msis::default());
        let mut other = Vtd::new(ir(), r.mem.clone(), msis.clone());
        other.restore_state(&saved).unwrap();
        assert_eq!(other.save_state(), saved);
        assert!(msis.take().is_empty());
        assert_eq!(other.translate(EDU, 0x1004, 4, false), Ok(0x30_0004));
        assert_eq!(other.dump(), r.vtd.dump());

        type Corrupt = fn(&mut VtdState);
        let checks: [(Corrupt, VtdStateError); 6] = [
            (|s| s.gsts |= 1, VtdStateError::Gsts(0)),
            (|s| s.fsts |= FSTS_PPF, VtdStateError::Fsts(0)),
            (|s| s.iq_size = 300, VtdStateError::QueueSize(300)),
            (
                |s| s.iqh = 256,
                VtdStateError::QueueHead {
                    head: 256,
                    size: 256,
                },
            ),
            (|s| s.irt_size = 3, VtdStateError::TableSize(3)),
            (|s| s.irt_eime = true, VtdStateError::EimeWithoutEim),
        ];
        for (corrupt, expected) in checks {
            let mut bad = saved.clone();
            corrupt(&mut bad);
            let err = other.restore_state(&bad).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&err),
                std::mem::discriminant(&expected),
                "{err}"
            );
            assert_eq!(other.save_state(), saved, "unchanged on error");
        }
        // IR status bits cannot be restored into a unit without IR.
        let mut plain = Vtd::new(VtdConfig::default(), r.mem.clone(), msis.clone());
        assert!(plain.restore_state(&saved).is_err());

        let dump = r.vtd.dump();
        for needle in [
            "TES",
            "RTPS",
            "QIES",
            "IRES",
            "IRTPS",
            "root table=0x10000",
            "table=0x20000 entries=65536 mode=xapic",
            "head=0 tail=0",
            "PPF",
            "reason=0x05",
            "sid=0x0018",
        ] {
            assert!(dump.contains(needle), "{needle} missing in\n{dump}");
        }
        assert_eq!(BusDevice::dump(&r.vtd), dump);

        r.vtd.reset();
        assert_eq!(r.vtd.save_state(), VtdState::power_on());
        assert_eq!(r.vtd.translate(EDU, 0x1000, 4, true), Ok(0x1000));
    }

    /// xorshift64: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Counts event interrupts without keeping them.
    #[derive(Default)]
    struct CountingMsis(Mutex<u64>);
    impl MsiSink for CountingMsis {
        fn msi(&self, _: Option<u16>, _: u64, _: u32) {
            *self.0.lock().unwrap() += 1;
        }
    }

    /// Writes a valid root entry, context entry and page-table path for
    /// `sid` and `iova` at random pages of the first MiB.
    fn plant_mapping(mem: &GuestMemory, root: u64, sid: u16, iova: u64, rng: &mut Rng) {
        let mut page = || rng.next() & 0xF_F000;
        let context_table = page();
        let mut table = page();
        let aw = 1 + (table >> 12) % 2;
        let entries = [
            (root + u64::from(sid >> 8) * 16, context_table | 1, 0),
            (context_table + u64::from(sid & 0xFF) * 16, table | 1, aw),
        ];
        for (gpa, lo, hi) in entries {
            // Outside RAM (a random root pointer): nothing to plant.
            let _ = mem.write_u64(gpa, lo);
            let _ = mem.write_u64(gpa + 8, hi);
        }
        for level in (1..=2 + aw as u32).rev() {
            let next = page();
            let slot = table + ((iova >> (12 + 9 * (level - 1))) & 0x1FF) * 8;
            let _ = mem.write_u64(slot, next | 3);
            table = next;
        }
    }

    #[test]
    fn fuzz_no_panic_bounded_state() {
        // 1 MiB of RAM; tables and queue at random places in it, entries
        // pointing mostly inside it.
        let mem = Arc::new(GuestMemory::new(1 << 20).unwrap());
        let msis = Arc::new(CountingMsis::default());
        let config = VtdConfig {
            intremap: true,
            eim: true,
            aw_bits: 48,
        };
        let mut vtd = Vtd::new(config, mem.clone(), msis.clone());
        let offsets = [
            VER, CAP, ECAP, GCMD, GSTS, RTADDR, CCMD, FSTS, FECTL, FEDATA, FEADDR, FEUADDR, IQH,
            IQT, IQA, ICS, IECTL, IEDATA, IEADDR, IEUADDR, IRTA, IVA, IOTLB, FRCD_LO, FRCD_HI,
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut translated, mut remapped, mut faults) = (0u64, 0u64, 0u64);
        for step in 0..100_000u32 {
            let r = rng.next();
            match r % 10 {
                0..=3 => {
                    let len = [1usize, 2, 4, 8, 4, 8][(r >> 8) as usize % 6];
                    let base = offsets[(r >> 16) as usize % offsets.len()];
                    let offset = match (r >> 24) % 8 {
                        0 => (r >> 32) % 0x1000,
                        1 => base + 4,
                        _ => base,
                    };
                    let mut value = rng.next();
                    if base == GCMD && r & (1 << 40) != 0 {
                        // Mostly the enables, with a command or two.
                        value = u64::from(vtd.state.gsts) | (value & 0xFF80_0000);
                    }
                    if matches!(base, RTADDR | IRTA | IQA) && r & (1 << 41) != 0 {
                        value &= 0xF_FFFF;
                    }
                    if base == IQT && r & (1 << 42) != 0 {
                        value &= 0xFFF0;
                    }
                    if r & (1 << 43) != 0 {
                        BusDevice::write(&mut vtd, offset, &value.to_le_bytes()[..len]);
                    } else {
                        let mut buf = vec![0u8; len];
                        BusDevice::read(&mut vtd, offset, &mut buf);
                    }
                }
                4 | 5 => {
                    // Random table contents, biased to look like entries.
                    let gpa = ((r >> 8) % (1 << 20)) & !7;
                    let mut value = rng.next();
                    if r & (1 << 50) != 0 {
                        // A page in RAM with P / R / W / PS, or AW 1-2.
                        value = (value & 0xF_F000) | ((value >> 20) & 0x83);
                    }
                    mem.write_u64(gpa, value).unwrap();
                }
                6 | 7 => {
                    let sid = (r >> 8) as u16;
                    let iova = if r & (1 << 30) != 0 {
                        rng.next()
                    } else {
                        rng.next() & 0x7F_FFFF_FFFF
                    };
                    if r & (1 << 32) != 0 {
                        plant_mapping(&mem, vtd.state.root_table, sid, iova, &mut rng);
                    }
                    let on = vtd.state.gsts & GSTS_TES != 0;
                    match vtd.translate(sid, iova, 1 + (r >> 40) % 4096, r & (1 << 31) != 0) {
                        Ok(_) if on => translated += 1,
                        Ok(_) => {}
                        Err(_) => faults += 1,
                    }
                }
                _ => {
                    let source = (r & (1 << 8) != 0).then_some((r >> 16) as u16);
                    let address = if r & (1 << 9) != 0 {
                        rng.next()
                    } else {
                        0xFEE0_0000 | (rng.next() & 0xF_FFFF)
                    };
                    if r & (1 << 10) != 0 {
                        // A valid IRTE for the handle, no SID check.
                        let handle = ((address >> 5) & 0x7FFF) | (((address >> 2) & 1) << 15);
                        let lo = (rng.next() & 0xFFFF_FFFF_00FF_0FFE) | 1;
                        let irte = vtd.state.irt_base + handle * 16;
                        let _ = mem.write_u64(irte, lo & !(IRTE_LO_RESERVED | IRTE_FPD));
                        let _ = mem.write_u64(irte + 8, 0);
                    }
                    let on = vtd.state.gsts & GSTS_IRES != 0;
                    match vtd.remap_interrupt(source, address, rng.next() as u32) {
                        Ok(_) if on => remapped += 1,
                        Ok(_) => {}
                        Err(_) => faults += 1,
                    }
                }
            }
            let s = vtd.save_state();
            assert!(s.iqh < s.iq_size, "step {step}");
            assert_eq!(s.fsts & !(FSTS_W1C | FSTS_FRI_MASK), 0, "step {step}");
            assert_eq!(s.gsts & !GSTS_KNOWN, 0, "step {step}");
            if step % 1000 == 0 {
                let mut other = Vtd::new(config, mem.clone(), msis.clone());
                other.restore_state(&s).unwrap();
                assert_eq!(other.save_state(), s);
                assert_eq!(other.dump(), vtd.dump());
            }
            // Now and then start over so that enables keep coming.
            if step % 20_000 == 19_999 {
                vtd.reset();
            }
        }
        let events = *msis.0.lock().unwrap();
        assert!(
            translated > 100 && remapped > 100 && faults > 1000,
            "{translated} translated, {remapped} remapped, {faults} faults"
        );
        assert!(events > 0);
    }
}
