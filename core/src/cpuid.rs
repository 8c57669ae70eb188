//! The processor Tandem offers a guest: one CPUID table for both processors.
//!
//! A guest must see the same processor on the interpreter and on KVM, or a
//! differential run compares two different machines (a kernel that finds AVX
//! on KVM takes code paths the interpreter cannot follow). Tandem therefore
//! defines its processor model here, as the feature bits the interpreter
//! implements, and both backends use one table:
//!
//! - without KVM, [`CpuidTable::model`] is the whole table;
//! - with KVM, [`CpuidTable::restrict`] takes KVM_GET_SUPPORTED_CPUID and keeps
//!   its descriptive leaves (vendor, signature, caches, brand string) while
//!   cutting every feature word down to the model, so the interpreter given
//!   the same table (a fallback, a diff or a debugger switch) is the same
//!   processor.
//!
//! The per-vCPU and run-time fields (initial APIC ID, OSXSAVE, the XSAVE size
//! for the current XCR0) are filled in by [`CpuidTable::lookup`] from the
//! vCPU's state, as the hardware does.

/// One CPUID leaf / subleaf, shaped like `kvm_cpuid_entry2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// KVM_CPUID_FLAG_SIGNIFCANT_INDEX (1): the subleaf selects the entry.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `flags` bit: ECX (the subleaf) selects among entries of this leaf.
pub const SIGNIFICANT_INDEX: u32 = 1;

/// Feature bits of the model, by register. A bit is here when the
/// interpreter executes what it announces (SDM vol. 2A, CPUID, tables 3-8
/// to 3-11).
pub mod model {
    /// Leaf 1 EDX: FPU, DE (CR4.DE: DR4 / DR5 #UD), PSE, TSC, MSR, PAE,
    /// CX8, APIC, PGE, CMOV, PAT, CLFSH, MMX, FXSR, SSE, SSE2 (no SEP:
    /// SYSENTER is not implemented).
    pub const LEAF1_EDX: u32 = (1 << 0)
        | (1 << 2)
        | (1 << 3)
        | (1 << 4)
        | (1 << 5)
        | (1 << 6)
        | (1 << 8)
        | (1 << 9)
        | (1 << 13)
        | (1 << 15)
        | (1 << 16)
        | (1 << 19)
        | (1 << 23)
        | (1 << 24)
        | (1 << 25)
        | (1 << 26);
    /// Leaf 1 EDX HTT: set when there is more than one vCPU.
    pub const LEAF1_EDX_HTT: u32 = 1 << 28;
    /// Leaf 1 ECX: SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, x2APIC,
    /// POPCNT, TSC-deadline, XSAVE, (OSXSAVE, dynamic), hypervisor present.
    pub const LEAF1_ECX: u32 = (1 << 0)
        | (1 << 1)
        | (1 << 9)
        | (1 << 13)
        | (1 << 19)
        | (1 << 20)
        | (1 << 21)
        | (1 << 23)
        | (1 << 24)
        | (1 << 26)
        | (1 << 31);
    /// Leaf 1 ECX bits Tandem's platform provides itself (its LAPIC), so they
    /// are offered even where KVM's supported list lacks them.
    pub const LEAF1_ECX_PLATFORM: u32 = (1 << 21) | (1 << 24) | (1 << 31);
    pub const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
    /// Leaf 7.0 EBX: ERMS (a performance hint; REP MOVSB/STOSB behave the
    /// same either way).
    /// Also FDP_EXCPTN_ONLY (6) and FCS/FDS deprecated (13), which describe
    /// the x87 pointer behaviour the interpreter has.
    /// SMEP (7) and SMAP (20): supervisor-mode execution and access
    /// prevention (SDM vol. 3, 4.6.1).
    pub const LEAF7_EBX: u32 = (1 << 6) | (1 << 7) | (1 << 9) | (1 << 13) | (1 << 20);
    /// Leaf 7.0 ECX: PKU (3), protection keys for user-mode pages, and PKS
    /// (31), for supervisor-mode pages (SDM vol. 3, 4.6.2); (OSPKE, 4,
    /// dynamic).
    pub const LEAF7_ECX: u32 = (1 << 3) | (1 << 31);
    /// Leaf 7.0 ECX OSPKE: CR4.PKE, filled in by [`super::CpuidTable::lookup_cr4`].
    pub const LEAF7_ECX_OSPKE: u32 = 1 << 4;
    pub const LEAF7_EDX: u32 = 0;
    /// 0x8000_0001 ECX: LAHF/SAHF in 64-bit mode, PREFETCHW.
    pub const EXT1_ECX: u32 = (1 << 0) | (1 << 8);
    /// 0x8000_0001 EDX: SYSCALL, NX, 1 GiB pages, RDTSCP, long mode.
    pub const EXT1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
    /// XCR0 components: x87, SSE (no AVX execution) and PKRU (9).
    pub const XCR0: u64 = 0b11 | XCR0_PKRU;
    /// XCR0 bit 9: the PKRU state component (4 bytes at offset 2688 of
    /// the standard form, SDM vol. 1, 13.5.7).
    pub const XCR0_PKRU: u64 = 1 << 9;
    /// Standard-form offset and size of the PKRU component (CPUID.(0xD,9)).
    pub const PKRU_OFFSET: u32 = 2688;
    pub const PKRU_SIZE: u32 = 8;
    /// Leaf 0xD.1 EAX: XSAVEOPT, XSAVEC, XGETBV with ECX=1, XSAVES.
    pub const XSAVE_EXT: u32 = 0b1111;
    /// Physical address width (the interpreter's reserved-bit checks).
    pub const MAXPHYADDR: u32 = 46;
    /// Linear address width.
    pub const MAXLINADDR: u32 = 48;
}

/// Size of the standard-form XSAVE area for components `xcr0` (legacy 512 +
/// header 64, then the components the model knows).
pub fn xsave_size(xcr0: u64) -> u32 {
    // AVX state (component 2) ends at 576 + 256, PKRU (9) at 2688 + 8; x87
    // and SSE live in the legacy area.
    if xcr0 & model::XCR0_PKRU != 0 {
        model::PKRU_OFFSET + model::PKRU_SIZE
    } else if xcr0 & 0b100 != 0 {
        576 + 256
    } else {
        576
    }
}

/// Size of the compacted-form XSAVE area (XSAVEC / XSAVES) for components
/// `xcr0`: the legacy area and header, then the components packed in bit
/// order (none of the model's asks for 64-byte alignment).
pub fn xsave_compacted_size(xcr0: u64) -> u32 {
    let mut size = 576;
    if xcr0 & 0b100 != 0 {
        size += 256;
    }
    if xcr0 & model::XCR0_PKRU != 0 {
        size += model::PKRU_SIZE;
    }
    size
}

/// One processor's CPUID table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuidTable {
    pub entries: Vec<CpuidEntry>,
    /// What a leaf beyond the basic maximum answers when the processor
    /// does not follow Intel's highest-basic-leaf rule (PVM answers such
    /// leaves from the hardware); `None` follows the rule.
    pub beyond_max: Option<[u32; 4]>,
}

/// Leaves the table describes with a significant subleaf.
pub fn indexed(function: u32) -> bool {
    matches!(
        function,
        4 | 7
            | 0xb
            | 0xd
            | 0xf
            | 0x10
            | 0x12
            | 0x14
            | 0x17
            | 0x18
            | 0x1d
            | 0x1e
            | 0x1f
            | 0x8000_001d
    )
}

/// The XCR0 bits a host's leaf 0xD.0 announces.
fn host_xcr0(host: &[CpuidEntry]) -> u64 {
    host.iter()
        .find(|e| e.function == 0xd && e.index == 0)
        .map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32))
}

fn entry(function: u32, index: u32, r: [u32; 4]) -> CpuidEntry {
    CpuidEntry {
        function,
        index,
        flags: if indexed(function) {
            SIGNIFICANT_INDEX
        } else {
            0
        },
        eax: r[0],
        ebx: r[1],
        ecx: r[2],
        edx: r[3],
    }
}

/// A 48-byte brand string as the three 0x8000_0002..4 leaves.
fn brand_leaves(brand: &str) -> [[u32; 4]; 3] {
    let mut b = [0u8; 48];
    for (d, s) in b.iter_mut().zip(brand.bytes().take(47)) {
        *d = s;
    }
    let mut out = [[0u32; 4]; 3];
    for (n, chunk) in b.chunks_exact(4).enumerate() {
        out[n / 4][n % 4] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    out
}

/// Leaf 0xB / 0x1F topology for `vcpus` cores of one thread each; EDX (the
/// x2APIC ID) is per vCPU.
fn topology(function: u32, vcpus: u32) -> [CpuidEntry; 3] {
    let core_bits = 32 - vcpus.max(1).saturating_sub(1).leading_zeros();
    [
        entry(function, 0, [0, 1, 0x100, 0]),
        entry(function, 1, [core_bits, vcpus.max(1), 0x201, 0]),
        entry(function, 2, [0, 0, 2, 0]),
    ]
}

impl CpuidTable {
    /// Tandem's processor without a host to borrow from: a GenuineIntel
    /// family-6 signature, the model's features, a Tandem brand string.
    pub fn model(vcpus: u32) -> CpuidTable {
        let mut e = vec![
            entry(0, 0, [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(
                1,
                0,
                [
                    0x0005_0654,
                    (vcpus.clamp(1, 255) << 16) | (8 << 8),
                    model::LEAF1_ECX,
                    model::LEAF1_EDX | if vcpus > 1 { model::LEAF1_EDX_HTT } else { 0 },
                ],
            ),
            entry(
                7,
                0,
                [0, model::LEAF7_EBX, model::LEAF7_ECX, model::LEAF7_EDX],
            ),
        ];
        e.extend(topology(0xb, vcpus));
        e.push(entry(
            0xd,
            0,
            [
                model::XCR0 as u32,
                xsave_size(model::XCR0),
                xsave_size(model::XCR0),
                0,
            ],
        ));
        e.push(entry(0xd, 1, [model::XSAVE_EXT, 0, 0, 0]));
        e.push(entry(0xd, 9, [model::PKRU_SIZE, model::PKRU_OFFSET, 0, 0]));
        e.push(entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]));
        e.push(entry(
            0x8000_0001,
            0,
            [0, 0, model::EXT1_ECX, model::EXT1_EDX],
        ));
        for (n, r) in brand_leaves("Tandem x86-64 processor").iter().enumerate() {
            e.push(entry(0x8000_0002 + n as u32, 0, *r));
        }
        e.push(entry(
            0x8000_0008,
            0,
            [model::MAXPHYADDR | (model::MAXLINADDR << 8), 0, 0, 0],
        ));
        CpuidTable {
            entries: e,
            beyond_max: None,
        }
    }

    /// The table for a KVM host: its supported list cut down to the model.
    /// Descriptive leaves (vendor, signature, caches, brand) stay the host's;
    /// feature words are intersected with the model; leaves the model does
    /// not describe and that announce features (PMU 0xA, SGX, PT, AMX, KVM's
    /// paravirtual 0x4000_0000 range) are dropped or zeroed.
    pub fn restrict(host: &[CpuidEntry], vcpus: u32) -> CpuidTable {
        let mut out: Vec<CpuidEntry> = Vec::new();
        for h in host {
            let mut e = *h;
            match e.function {
                0 => e.eax = e.eax.min(0x1f),
                1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (vcpus.clamp(1, 255) << 16);
                    e.ecx = (e.ecx & model::LEAF1_ECX) | model::LEAF1_ECX_PLATFORM;
                    e.edx &= model::LEAF1_EDX;
                    if vcpus > 1 {
                        e.edx |= model::LEAF1_EDX_HTT;
                    }
                }
                7 => {
                    if e.index == 0 {
                        e.eax = 0; // no subleaf 1 and beyond
                        e.ebx &= model::LEAF7_EBX;
                        e.ecx &= model::LEAF7_ECX;
                        e.edx &= model::LEAF7_EDX;
                    } else {
                        continue;
                    }
                }
                // PMU, PQM/PQE, SGX, PT, AMX, and friends: not modelled.
                0xa | 0xf | 0x10 | 0x12 | 0x14 | 0x1d | 0x1e => continue,
                0xb | 0x1f => continue, // replaced below
                0xd => match e.index {
                    0 => {
                        let xcr0 = u64::from(e.eax) & model::XCR0;
                        e.eax = xcr0 as u32;
                        e.edx = 0;
                        e.ebx = xsave_size(xcr0);
                        e.ecx = xsave_size(xcr0);
                    }
                    1 => {
                        e.eax &= model::XSAVE_EXT;
                        e.ebx = 0;
                        e.ecx = 0;
                        e.edx = 0;
                    }
                    // The PKRU component, where the host has it (its
                    // layout is architectural).
                    9 if host_xcr0(host) & model::XCR0_PKRU != 0 => {
                        (e.eax, e.ebx, e.ecx, e.edx) = (model::PKRU_SIZE, model::PKRU_OFFSET, 0, 0);
                    }
                    _ => continue,
                },
                0x4000_0000..=0x4fff_ffff => continue,
                0x8000_0000 => e.eax = e.eax.min(0x8000_0008),
                0x8000_0001 => {
                    e.ecx &= model::EXT1_ECX;
                    e.edx &= model::EXT1_EDX;
                }
                0x8000_0008 => {
                    let phys = (e.eax & 0xff).min(model::MAXPHYADDR);
                    let lin = ((e.eax >> 8) & 0xff).min(model::MAXLINADDR);
                    e.eax = phys | (lin << 8);
                    e.ebx = 0;
                }
                f if f > 0x8000_0008 => continue,
                _ => {}
            }
            out.push(e);
        }
        let max_basic = out.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
        if max_basic >= 0xb {
            out.extend(topology(0xb, vcpus));
        }
        if max_basic >= 0x1f {
            out.extend(topology(0x1f, vcpus));
        }
        CpuidTable {
            entries: out,
            beyond_max: None,
        }
    }

    fn find(&self, function: u32, index: u32) -> Option<&CpuidEntry> {
        self.entries.iter().find(|e| {
            e.function == function && (e.flags & SIGNIFICANT_INDEX == 0 || e.index == index)
        })
    }

    /// The raw entry for (`leaf`, `sub`) with Intel's rule for leaves
    /// beyond the reported maxima: the highest basic leaf answers (SDM vol.
    /// 2A, CPUID: "If a value entered for CPUID.EAX is higher than the
    /// maximum input value for basic or extended function ... the data for
    /// the highest basic information leaf is returned"). KVM does the same.
    pub fn raw(&self, leaf: u32, sub: u32) -> [u32; 4] {
        let max_basic = self.find(0, 0).map_or(0, |e| e.eax);
        let max_ext = self.find(0x8000_0000, 0).map_or(0, |e| e.eax);
        let in_range = if leaf & 0x8000_0000 != 0 {
            leaf <= max_ext
        } else if leaf & 0x4000_0000 != 0 {
            false
        } else {
            leaf <= max_basic
        };
        if !in_range && leaf & 0x4000_0000 == 0 {
            if let Some(r) = self.beyond_max {
                return r;
            }
            return self.raw(max_basic, sub);
        }
        match self.find(leaf, sub) {
            Some(e) => [e.eax, e.ebx, e.ecx, e.edx],
            None => [0; 4],
        }
    }

    /// CPUID as vCPU `apic_id` executes it, with the run-time fields: the
    /// initial APIC ID (leaf 1 EBX[31:24], leaves 0xB / 0x1F EDX), OSXSAVE
    /// from CR4.OSXSAVE, and the XSAVE area size for the current XCR0.
    pub fn lookup(&self, leaf: u32, sub: u32, apic_id: u32, osxsave: bool, xcr0: u64) -> [u32; 4] {
        let mut r = self.raw(leaf, sub);
        let max_basic = self.find(0, 0).map_or(0, |e| e.eax);
        let eff = if leaf & 0x8000_0000 == 0 && leaf > max_basic {
            max_basic
        } else {
            leaf
        };
        match eff {
            1 => {
                r[1] = (r[1] & 0x00ff_ffff) | ((apic_id & 0xff) << 24);
                if osxsave {
                    r[2] |= model::LEAF1_ECX_OSXSAVE;
                } else {
                    r[2] &= !model::LEAF1_ECX_OSXSAVE;
                }
            }
            0xb | 0x1f => r[3] = apic_id,
            // EBX of subleaf 0: the standard-form size for XCR0; of subleaf
            // 1 (with XSAVES): the compacted size for XCR0 | IA32_XSS (no
            // supervisor states here), which x87 / SSE make the same.
            0xd if sub == 0 => r[1] = xsave_size(xcr0),
            0xd if sub == 1 && r[0] & (1 << 3) != 0 => r[1] = xsave_compacted_size(xcr0),
            _ => {}
        }
        r
    }

    /// [`CpuidTable::lookup`] with the CR4-dependent bits taken from `cr4`:
    /// OSXSAVE (CR4 bit 18) in leaf 1 ECX and OSPKE (CR4.PKE, bit 22) in
    /// leaf 7.0 ECX, where the table offers PKU.
    pub fn lookup_cr4(&self, leaf: u32, sub: u32, apic_id: u32, cr4: u64, xcr0: u64) -> [u32; 4] {
        let mut r = self.lookup(leaf, sub, apic_id, cr4 & (1 << 18) != 0, xcr0);
        let max_basic = self.find(0, 0).map_or(0, |e| e.eax);
        let eff = if leaf & 0x8000_0000 == 0 && leaf > max_basic {
            max_basic
        } else {
            leaf
        };
        if eff == 7 && sub == 0 {
            r[2] &= !model::LEAF7_ECX_OSPKE;
            if cr4 & (1 << 22) != 0 && r[2] & (1 << 3) != 0 {
                r[2] |= model::LEAF7_ECX_OSPKE;
            }
        }
        r
    }

    /// MAXPHYADDR: CPUID 0x8000_0008 EAX[7:0], or 36 where the leaf is
    /// missing (SDM vol. 3, 4.1.4).
    pub fn phys_addr_bits(&self) -> u8 {
        let max_ext = self.find(0x8000_0000, 0).map_or(0, |e| e.eax);
        match self.find(0x8000_0008, 0) {
            Some(e) if max_ext >= 0x8000_0008 && e.eax & 0xff != 0 => (e.eax & 0xff) as u8,
            _ => 36,
        }
    }

    /// Whether leaf 1 / 0x8000_0001 announce `bit` of `reg` (0=EAX..3=EDX).
    pub fn has(&self, leaf: u32, reg: usize, bit: u32) -> bool {
        self.raw(leaf, 0)
            .get(reg)
            .is_some_and(|v| v & (1 << bit) != 0)
    }

    /// The table as KVM wants it for vCPU `apic_id` (leaf 1 / 0xB / 0x1F
    /// per-vCPU fields; KVM fills OSXSAVE and the XSAVE size itself).
    pub fn for_vcpu(&self, apic_id: u32) -> CpuidTable {
        let mut t = self.clone();
        for e in &mut t.entries {
            match e.function {
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | ((apic_id & 0xff) << 24),
                0xb | 0x1f => e.edx = apic_id,
                _ => {}
            }
        }
        t
    }
}

/// The vendor a processor model announces (CPUID.0 and CPUID.8000_0000h
/// EBX, EDX, ECX). The interpreter follows the vendor's rules where Intel
/// and AMD differ (SYSCALL / SYSRET outside 64-bit mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Vendor {
    /// "GenuineIntel": Tandem's model by default.
    #[default]
    Intel,
    /// "AuthenticAMD".
    Amd,
}

impl Vendor {
    /// The 12-byte vendor string as CPUID returns it in EBX, EDX, ECX.
    pub fn id_words(self) -> [u32; 3] {
        let id: &[u8; 12] = match self {
            Vendor::Intel => b"GenuineIntel",
            Vendor::Amd => b"AuthenticAMD",
        };
        let w = |n: usize| u32::from_le_bytes([id[n], id[n + 1], id[n + 2], id[n + 3]]);
        [w(0), w(4), w(8)]
    }
}

/// Leaf 1 EDX bits that AMD processors repeat in CPUID.8000_0001h:EDX
/// (AMD APM vol. 3, appendix E.4.2): FPU..APIC (0-9), MTRR, PGE, MCA,
/// CMOV, PAT, PSE36 (12-17), MMX (23), FXSR (24).
const AMD_EXT1_EDX_MIRROR: u32 = 0x0183_f3ff;

impl CpuidTable {
    /// Tandem's processor model for `vcpus` vCPUs as `vendor` announces it:
    /// the same features; for AMD the vendor string in leaves 0 and
    /// 8000_0000h, a family 17h signature in leaves 1 and 8000_0001h (AMD
    /// reports the signature in both), the leaf 1 EDX features AMD repeats
    /// in 8000_0001h:EDX, and the core count in 8000_0008h:ECX.
    pub fn model_for(vcpus: u32, vendor: Vendor) -> CpuidTable {
        let mut t = CpuidTable::model(vcpus);
        if vendor == Vendor::Intel {
            return t;
        }
        let [b, d, c] = vendor.id_words();
        // Family 0Fh + extended family 08h = 17h, model 01h, stepping 2.
        let signature = 0x0080_0f12;
        for e in &mut t.entries {
            match e.function {
                0 | 0x8000_0000 => (e.ebx, e.edx, e.ecx) = (b, d, c),
                1 => e.eax = signature,
                0x8000_0001 => {
                    e.eax = signature;
                    e.edx |= model::LEAF1_EDX & AMD_EXT1_EDX_MIRROR;
                }
                0x8000_0008 => e.ecx = vcpus.clamp(1, 256) - 1,
                _ => {}
            }
        }
        t
    }

    /// The vendor the table's leaf 0 announces (Intel for any other
    /// string: the rules the interpreter follows by default).
    pub fn vendor(&self) -> Vendor {
        let r = self.raw(0, 0);
        if [r[1], r[3], r[2]] == Vendor::Amd.id_words() {
            Vendor::Amd
        } else {
            Vendor::Intel
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxphyaddr_comes_from_leaf_0x80000008_or_defaults_to_36() {
        assert_eq!(
            CpuidTable::model(1).phys_addr_bits(),
            model::MAXPHYADDR as u8
        );
        let mut t = CpuidTable::model(1);
        t.entries.retain(|e| e.function != 0x8000_0008);
        assert_eq!(t.phys_addr_bits(), 36);
    }

    fn host_like() -> Vec<CpuidEntry> {
        vec![
            entry(0, 0, [0x24, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(
                1,
                0,
                [
                    0x000a_0671,
                    0x0001_0800,
                    0x8120_2000 | (1 << 28),
                    0x0f8b_fbff,
                ],
            ),
            entry(4, 0, [0x0400_0121, 0x02c0_003f, 0x3f, 0]),
            entry(
                7,
                0,
                [
                    2,
                    0x0180_2852 | (1 << 5) | (1 << 16),
                    0x1a01_0104,
                    0x2001_0000,
                ],
            ),
            entry(7, 1, [0x1c00, 0, 0, 0]),
            entry(0xa, 0, [0x0804_3404, 0, 0, 0]),
            entry(0xd, 0, [0xe7, 0xa80, 0xa80, 0]),
            entry(0xd, 1, [0xf, 0, 0, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0x4000_0001, 0, [0xffff, 0, 0, 0]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            entry(0x8000_0008, 0, [0x3027, 0, 0, 0]),
        ]
    }

    #[test]
    fn restriction_keeps_the_host_signature_and_cuts_features_to_the_model() {
        let t = CpuidTable::restrict(&host_like(), 2);
        assert_eq!(t.raw(1, 0)[0], 0x000a_0671, "host signature kept");
        // AVX (leaf 1 ECX 28) and AVX2 / AVX-512F (leaf 7 EBX 5 / 16) gone.
        assert!(!t.has(1, 2, 28));
        assert_eq!(t.raw(7, 0)[1] & ((1 << 5) | (1 << 16)), 0);
        assert_eq!(t.raw(7, 0)[0], 0, "no leaf 7 subleaves announced");
        // x2APIC and TSC deadline come from Tandem's LAPIC.
        assert!(t.has(1, 2, 21) && t.has(1, 2, 24));
        assert!(t.has(1, 3, 28), "HTT with two vCPUs");
        assert_eq!(t.raw(1, 0)[1] >> 16 & 0xff, 2);
        // XSAVE: x87 | SSE only, legacy-area size.
        assert_eq!(t.raw(0xd, 0), [3, 576, 576, 0]);
        assert_eq!(t.raw(0xd, 2), [0; 4]);
        // No PMU, no KVM paravirtual leaves.
        assert_eq!(t.raw(0xa, 0), [0; 4]);
        assert!(t.entries.iter().all(|e| e.function & 0x4000_0000 == 0));
        assert_eq!(t.raw(0x8000_0008, 0)[0], 0x3027);
        // Topology for two cores.
        assert_eq!(t.raw(0xb, 1)[1], 2);
    }

    #[test]
    fn lookup_fills_the_run_time_fields() {
        let t = CpuidTable::model(4);
        let r = t.lookup(1, 0, 3, true, 3);
        assert_eq!(r[1] >> 24, 3);
        assert!(r[2] & model::LEAF1_ECX_OSXSAVE != 0);
        assert_eq!(t.lookup(1, 0, 0, false, 3)[2] & model::LEAF1_ECX_OSXSAVE, 0);
        assert_eq!(t.lookup(0xb, 0, 3, false, 3)[3], 3);
        assert_eq!(t.lookup(0xd, 0, 0, true, 1)[1], 576);
        assert_eq!(t.lookup(0xd, 1, 0, true, 3)[0], model::XSAVE_EXT);
        assert_eq!(t.lookup(0xd, 1, 0, true, 3)[1], 576, "XSAVES size");
    }

    #[test]
    fn access_rights_features_and_ospke() {
        let t = CpuidTable::model(1);
        let r = t.lookup_cr4(7, 0, 0, 0, 3);
        assert_eq!(r[1] & (1 << 7 | 1 << 20), 1 << 7 | 1 << 20, "SMEP, SMAP");
        assert_eq!(r[2] & (1 << 3 | 1 << 31), 1 << 3 | 1 << 31, "PKU, PKS");
        assert_eq!(r[2] & model::LEAF7_ECX_OSPKE, 0);
        let pke = t.lookup_cr4(7, 0, 0, 1 << 22, 3);
        assert_ne!(pke[2] & model::LEAF7_ECX_OSPKE, 0, "OSPKE follows CR4.PKE");
        assert_ne!(
            t.lookup_cr4(1, 0, 0, 1 << 18, 3)[2] & model::LEAF1_ECX_OSXSAVE,
            0
        );
        // PKRU: XCR0 bit 9, 8 bytes at 2688; sizes for XCR0 with it.
        assert_eq!(t.raw(0xd, 0)[0], 0x203);
        assert_eq!(t.raw(0xd, 9), [8, 2688, 0, 0]);
        assert_eq!(t.lookup(0xd, 0, 0, true, 0x203)[1], 2696);
        assert_eq!(t.lookup(0xd, 1, 0, true, 0x203)[1], 584, "compacted");
        // A host with SMEP / SMAP / PKU keeps them, without PKS loses PKS;
        // the host's OSPKE is not copied.
        let mut host = host_like();
        for e in &mut host {
            if e.function == 7 && e.index == 0 {
                e.ebx |= 1 << 7 | 1 << 20;
                e.ecx = 1 << 3 | 1 << 4;
            }
            if e.function == 0xd && e.index == 0 {
                e.eax |= 1 << 9;
            }
        }
        host.push(entry(0xd, 9, [8, 2688, 0, 0]));
        let k = CpuidTable::restrict(&host, 1);
        assert_eq!(k.raw(7, 0)[1] & (1 << 7 | 1 << 20), 1 << 7 | 1 << 20);
        assert_eq!(k.raw(7, 0)[2], 1 << 3);
        assert_eq!(k.raw(0xd, 0)[0], 0x203);
        assert_eq!(k.raw(0xd, 9), [8, 2688, 0, 0]);
        // Without PKRU on the host, no component 9 either.
        let k = CpuidTable::restrict(&host_like(), 1);
        assert_eq!(k.raw(0xd, 9), [0; 4]);
        assert_eq!(k.raw(7, 0)[2] & (1 << 3), 0);
    }

    #[test]
    fn leaves_beyond_the_maximum_answer_like_intel() {
        let t = CpuidTable::model(1);
        assert_eq!(t.raw(0x20, 0), t.raw(0xd, 0), "highest basic leaf");
        assert_eq!(t.raw(0x8000_0009, 0), t.raw(0xd, 0));
        assert_eq!(t.raw(0x4000_0000, 0), [0; 4], "no hypervisor leaves");
        let brand: Vec<u8> = (0..3)
            .flat_map(|n| t.raw(0x8000_0002 + n, 0))
            .flat_map(u32::to_le_bytes)
            .collect();
        assert!(brand.starts_with(b"Tandem x86-64 processor\0"));
    }

    #[test]
    fn model_is_a_fixed_point_of_restriction() {
        let m = CpuidTable::model(1);
        let r = CpuidTable::restrict(&m.entries, 1);
        for leaf in [1u32, 7, 0xd, 0x8000_0001, 0x8000_0008] {
            assert_eq!(r.raw(leaf, 0), m.raw(leaf, 0), "leaf {leaf:#x}");
        }
    }
    #[test]
    fn amd_model_announces_authentic_amd_with_the_same_features() {
        let intel = CpuidTable::model(2);
        let amd = CpuidTable::model_for(2, Vendor::Amd);
        assert_eq!(intel.vendor(), Vendor::Intel);
        assert_eq!(amd.vendor(), Vendor::Amd);
        assert_eq!(CpuidTable::model_for(2, Vendor::Intel), intel);
        // "Auth" "enti" "cAMD" in EBX, EDX, ECX of leaves 0 and 8000_0000h.
        let l0 = amd.raw(0, 0);
        assert_eq!(
            [l0[1], l0[3], l0[2]],
            [0x6874_7541, 0x6974_6e65, 0x444d_4163]
        );
        assert_eq!(l0[0], intel.raw(0, 0)[0], "same highest basic leaf");
        let e0 = amd.raw(0x8000_0000, 0);
        assert_eq!(
            [e0[1], e0[3], e0[2]],
            [0x6874_7541, 0x6974_6e65, 0x444d_4163]
        );
        assert_eq!(e0[0], 0x8000_0008);
        // Family 17h in leaf 1 and 8000_0001h.
        let sig = amd.raw(1, 0)[0];
        assert_eq!(((sig >> 8) & 0xf) + ((sig >> 20) & 0xff), 0x17);
        assert_eq!(amd.raw(0x8000_0001, 0)[0], sig);
        // Features: leaf 1 and 7 unchanged; SYSCALL and LM kept, FPU / CMOV
        // mirrored into 8000_0001h:EDX.
        for leaf in [1u32, 7, 0xd] {
            assert_eq!(
                &amd.raw(leaf, 0)[1..],
                &intel.raw(leaf, 0)[1..],
                "{leaf:#x}"
            );
        }
        let ext = amd.raw(0x8000_0001, 0)[3];
        assert_eq!(ext & model::EXT1_EDX, model::EXT1_EDX);
        assert!(ext & 1 != 0 && ext & (1 << 15) != 0);
        assert_eq!(amd.raw(0x8000_0008, 0)[2] & 0xff, 1, "two cores");
    }
}
