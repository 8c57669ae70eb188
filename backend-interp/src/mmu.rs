//! Linear to guest-physical translation (SDM vol. 3, chapter 4), a small
//! TLB, and the memory accesses of instructions: RAM through the bounds-
//! checked `GuestMemory`, everything else as MMIO exits.

use tandem_core::cpu::{cr0, cr4, efer};

use crate::{ExtKind, InterpVcpu, Stop, R};

/// Entries of the direct-mapped TLB: 128 MiB of linear space, enough for a
/// guest sweeping a 100 MB buffer mapped with 4 KiB pages (kvm-unit-tests'
/// `sieve`) to keep its translations. 16 bytes an entry.
const TLB_ENTRIES: usize = 1 << 15;
/// MAXPHYADDR reported in CPUID 0x80000008 and used for reserved bits.
pub const MAXPHYADDR: u32 = 46;
const ADDR_MASK: u64 = ((1u64 << MAXPHYADDR) - 1) & !0xfff;

/// How an access uses memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acc {
    Read,
    Write,
    Exec,
}

/// Bits of a TLB entry's `data` below the page address.
const TE_WRITABLE: u64 = 1;
const TE_USER: u64 = 2;
const TE_NX: u64 = 4;
const TE_DIRTY: u64 = 8;
const TE_PKEY_SHIFT: u32 = 4;

/// A tag keeps bits 12-56 of a linear address (the bits 5-level paging
/// translates; 4-level paging uses fewer, and addresses that agree on them
/// translate alike), and the flush epoch above them.
const VPN_BITS: u32 = 45;
const VPN_MASK: u64 = (1 << VPN_BITS) - 1;
const EPOCH_MAX: u64 = (1 << (64 - VPN_BITS)) - 1;

#[derive(Debug, Clone, Copy, Default)]
struct TlbEntry {
    /// Linear page number | epoch << `VPN_BITS`; valid only in the current
    /// epoch (epochs start at 1, so an all-zero entry never matches).
    tag: u64,
    /// Guest-physical page base | `TE_*` bits: writable, user and
    /// executable through every level, leaf dirty, protection key.
    data: u64,
}

/// The access rights of a translation (a TLB hit or the end of a walk).
#[derive(Debug, Clone, Copy, Default)]
struct Rights {
    writable: bool,
    user: bool,
    nx: bool,
    /// The leaf's protection key (bits 62:59, IA-32e paging only).
    pkey: u8,
}

impl Rights {
    #[inline(always)]
    fn of(data: u64) -> Rights {
        Rights {
            writable: data & TE_WRITABLE != 0,
            user: data & TE_USER != 0,
            nx: data & TE_NX != 0,
            pkey: ((data >> TE_PKEY_SHIFT) & 0xf) as u8,
        }
    }

    fn bits(&self) -> u64 {
        let mut d = u64::from(self.pkey & 0xf) << TE_PKEY_SHIFT;
        if self.writable {
            d |= TE_WRITABLE;
        }
        if self.user {
            d |= TE_USER;
        }
        if self.nx {
            d |= TE_NX;
        }
        d
    }
}

/// CR4 bits of the access-rights rules beyond U/S, R/W and XD (SDM vol. 3,
/// 4.6): SMEP, SMAP, PKE (protection keys for user-mode pages) and PKS
/// (for supervisor-mode pages).
pub(crate) const CR4_SMEP: u64 = 1 << 20;
pub(crate) const CR4_SMAP: u64 = 1 << 21;
pub(crate) const CR4_PKE: u64 = 1 << 22;
pub(crate) const CR4_PKS: u64 = 1 << 24;
const CR4_RIGHTS: u64 = CR4_SMEP | CR4_SMAP | CR4_PKE | CR4_PKS;

/// A direct-mapped TLB of 4 KiB translations (large pages are cached per
/// 4 KiB piece). Flushed on MOV to CR0 / CR3 / CR4, EFER writes and task
/// or mode changes; INVLPG drops one entry. A flush starts a new epoch
/// instead of clearing the entries (entries of older epochs never match),
/// so a guest that reloads CR3 often does not pay for the TLB's size.
#[derive(Debug)]
pub struct Tlb {
    entries: Box<[TlbEntry; TLB_ENTRIES]>,
    /// The epoch valid entries carry (1..=`EPOCH_MAX`), pre-shifted to
    /// its place in a tag.
    epoch: u64,
    /// Bumped by every flush: the code-fetch shortcut is valid only within
    /// one generation.
    generation: u64,
    /// The page instructions were last fetched from: (linear page number,
    /// physical page, CPL 3, generation).
    fetch: (u64, u64, bool, u64),
    /// PAE paging's four PDPTE registers (SDM vol. 3, 4.4.1), loaded by
    /// MOV to CR0 / CR3 / CR4. `None` after a flush for another reason (a
    /// state loaded with `set_sregs`): then read from CR3 at the next walk.
    pdpte: Option<[u64; 4]>,
    /// IA32_PKRS (MSR 0x6E1): the protection-key rights for supervisor-mode
    /// pages (SDM vol. 3, 4.6.2). Not cached in entries: the TLB keeps each
    /// translation's key and the rights are read at every access, so a
    /// WRMSR (like WRPKRU for PKRU, which lives in the XSAVE image) needs
    /// no flush. Kept across flushes.
    pub(crate) pkrs: u32,
    /// The access in progress is an implicit supervisor-mode access (a
    /// descriptor table or TSS, SDM vol. 3, 4.6): SMAP denies it a
    /// user-mode page whatever EFLAGS.AC says. Set by `implicit_access`.
    implicit: bool,
}

impl Default for Tlb {
    fn default() -> Self {
        // Built on the heap: the array is too large for a thread's stack.
        let entries: Box<[TlbEntry; TLB_ENTRIES]> = vec![TlbEntry::default(); TLB_ENTRIES]
            .into_boxed_slice()
            .try_into()
            .unwrap_or_else(|_| unreachable!("the vector has TLB_ENTRIES entries"));
        Tlb {
            entries,
            epoch: 1 << VPN_BITS,
            generation: 0,
            fetch: (u64::MAX, 0, false, u64::MAX),
            pdpte: None,
            pkrs: 0,
            implicit: false,
        }
    }
}

impl Tlb {
    /// The physical page instructions were last fetched from.
    pub(crate) fn last_fetch_page(&self) -> u64 {
        self.fetch.1
    }

    #[inline(always)]
    fn slot(vpn: u64) -> usize {
        (vpn as usize) % TLB_ENTRIES
    }

    /// The tag of linear page `vpn` in the current epoch. (Canonical
    /// addresses set bits 48-63 in kernel space: masked off, they cannot
    /// reach the epoch.)
    #[inline(always)]
    fn tag(&self, vpn: u64) -> u64 {
        (vpn & VPN_MASK) | self.epoch
    }

    /// The entry for linear page `vpn` in the current epoch: its `data`.
    #[inline(always)]
    fn lookup(&self, vpn: u64) -> Option<u64> {
        let e = &self.entries[Self::slot(vpn)];
        (e.tag == self.tag(vpn)).then_some(e.data)
    }

    /// Hints the processor to fetch the entry of linear page `vpn`.
    #[inline(always)]
    fn prefetch(&self, vpn: u64) {
        #[cfg(target_arch = "x86_64")]
        {
            let e: *const TlbEntry = &self.entries[Self::slot(vpn)];
            // SAFETY: the pointer comes from a reference into the array; a
            // prefetch reads nothing and cannot fault.
            unsafe {
                use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
                _mm_prefetch::<_MM_HINT_T0>(e.cast::<i8>());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = vpn;
    }

    fn insert(&mut self, vpn: u64, data: u64) {
        let tag = self.tag(vpn);
        self.entries[Self::slot(vpn)] = TlbEntry { tag, data };
    }

    pub fn flush(&mut self) {
        if self.epoch >> VPN_BITS == EPOCH_MAX {
            // Out of epochs (once in half a million flushes): clear for real.
            self.entries.fill(TlbEntry::default());
            self.epoch = 1 << VPN_BITS;
        } else {
            self.epoch += 1 << VPN_BITS;
        }
        self.generation = self.generation.wrapping_add(1);
        self.pdpte = None;
    }

    pub fn flush_page(&mut self, la: u64) {
        self.generation = self.generation.wrapping_add(1);
        let vpn = la >> 12;
        let tag = self.tag(vpn);
        let e = &mut self.entries[Self::slot(vpn)];
        if e.tag == tag {
            *e = TlbEntry::default();
        }
    }
}

/// #PF error code bits (SDM vol. 3, 4.7).
const PF_P: u32 = 1;
const PF_W: u32 = 2;
const PF_U: u32 = 4;
const PF_RSVD: u32 = 8;
const PF_I: u32 = 16;
/// The fault came from a protection key (PKRU or IA32_PKRS).
const PF_PK: u32 = 32;

/// The BIOS ROM window below 4 GiB: the last 128 KiB of the firmware image
/// appear both at 0xFFFE0000-0xFFFFFFFF and at 0xE0000-0xFFFFF, as on the
/// `pc` machine. Tandem's firmware lives in low RAM, so reads and code
/// fetches in the high window (the reset vector 0xFFFFFFF0 among them) are
/// served from the low copy; writes there are not RAM and leave as MMIO.
const BIOS_HIGH: u64 = 0xfffe_0000;
const BIOS_LOW: u64 = 0xe_0000;

/// Reserved bits of a present PAE PDPTE: 1-2, 5-8 and MAXPHYADDR-63
/// (SDM vol. 3, 4.4.1).
const PDPTE_RSVD: u64 = 0x1e6 | !((1u64 << MAXPHYADDR) - 1);

impl InterpVcpu {
    /// Raises #PF for `la` with `err`, setting CR2.
    fn page_fault(&mut self, la: u64, err: u32) -> Stop {
        self.sregs.cr2 = la;
        // A page fault invalidates the TLB entries for the faulting linear
        // address (SDM vol. 3, 4.10.4.1): an OS that made a page writable
        // or present without INVLPG (Linux's "spurious fault" path) relies
        // on the retried access walking the paging structures again.
        self.tlb.flush_page(la);
        Stop::Exc(14, Some(err))
    }

    fn pf_bits(&self, acc: Acc, user: bool) -> u32 {
        let mut e = 0;
        if acc == Acc::Write {
            e |= PF_W;
        }
        if user {
            e |= PF_U;
        }
        // I/D: an instruction fetch with CR4.SMEP, or with PAE paging /
        // 4-level paging and EFER.NXE (SDM vol. 3, 4.7).
        let cr4 = self.sregs.cr4;
        if acc == Acc::Exec
            && (cr4 & CR4_SMEP != 0 || (cr4 & cr4::PAE != 0 && self.sregs.efer & efer::NXE != 0))
        {
            e |= PF_I;
        }
        e
    }

    /// Translates linear `la` for an access of kind `acc`; `user` is a CPL 3
    /// access that is not an implicit supervisor access.
    #[inline(always)]
    pub(crate) fn translate(&mut self, la: u64, acc: Acc, user: bool) -> R<u64> {
        match self.translate_fast(la, acc, user) {
            Some(pa) => Ok(pa),
            None => self.translate_slow(la, acc, user),
        }
    }

    /// The common case of `translate`, kept small enough to inline at
    /// every access: paging off, or a TLB hit whose rights allow the access
    /// by U/S, R/W and XD alone (no CR4 rights rule in play, and for a write
    /// the entry's dirty bit already set). `None`: everything else, which
    /// `translate_slow` decides (walk, #PF, SMEP / SMAP / protection keys).
    #[inline(always)]
    fn translate_fast(&self, la: u64, acc: Acc, user: bool) -> Option<u64> {
        if self.sregs.cr0 & cr0::PG == 0 {
            return Some(la & 0xffff_ffff);
        }
        let la = if self.sregs.efer & efer::LMA != 0 {
            la
        } else {
            la & 0xffff_ffff
        };
        let data = self.tlb.lookup(la >> 12)?;
        let ok = (!user || data & TE_USER != 0)
            && match acc {
                Acc::Write => {
                    data & TE_DIRTY != 0
                        && (data & TE_WRITABLE != 0 || (!user && self.sregs.cr0 & cr0::WP == 0))
                }
                Acc::Exec => data & TE_NX == 0,
                Acc::Read => true,
            };
        let extra = if data & TE_USER != 0 {
            CR4_RIGHTS
        } else {
            CR4_PKS
        };
        (ok && self.sregs.cr4 & extra == 0).then_some((data & !0xfff) | (la & 0xfff))
    }

    /// `translate` beyond its fast path.
    #[inline(never)]
    fn translate_slow(&mut self, la: u64, acc: Acc, user: bool) -> R<u64> {
        if self.sregs.cr0 & cr0::PG == 0 {
            return Ok(la & 0xffff_ffff);
        }
        let long = self.sregs.efer & efer::LMA != 0;
        let la = if long { la } else { la & 0xffff_ffff };
        let vpn = la >> 12;
        if let Some(data) = self.tlb.lookup(vpn) {
            // A write through an entry whose dirty bit is clear walks again
            // to set it.
            if acc != Acc::Write || data & TE_DIRTY != 0 {
                self.check_access(la, Rights::of(data), acc, user)?;
                return Ok((data & !0xfff) | (la & 0xfff));
            }
        }
        if long {
            self.walk(la, acc, user)
        } else {
            self.walk_legacy(la, acc, user)
        }
    }

    /// The PAE PDPTEs from the table at `cr3`, checked as MOV to CR0 / CR3 /
    /// CR4 loads them: a reserved bit set in a present entry is #GP(0).
    pub(crate) fn read_pdptes(&mut self, cr3: u64) -> R<[u64; 4]> {
        let base = cr3 & 0xffff_ffe0;
        let mut p = [0u64; 4];
        for (n, e) in p.iter_mut().enumerate() {
            // A table outside RAM reads as not present.
            *e = self.mem.read_u64(base + 8 * n as u64).unwrap_or(0);
            if *e & 1 != 0 && *e & PDPTE_RSVD != 0 {
                return Err(Stop::Exc(13, Some(0)));
            }
        }
        Ok(p)
    }

    /// Installs PDPTEs loaded by `read_pdptes` (after the TLB flush of the
    /// control-register write).
    pub(crate) fn set_pdptes(&mut self, p: [u64; 4]) {
        self.tlb.pdpte = Some(p);
    }

    /// PDPTE `n`, loading the four from CR3 if a state was set without a
    /// MOV to CR3.
    fn pdpte(&mut self, n: usize) -> u64 {
        if self.tlb.pdpte.is_none() {
            let base = self.sregs.cr3 & 0xffff_ffe0;
            let mut p = [0u64; 4];
            for (k, e) in p.iter_mut().enumerate() {
                *e = self.mem.read_u64(base + 8 * k as u64).unwrap_or(0);
            }
            self.tlb.pdpte = Some(p);
        }
        self.tlb.pdpte.map_or(0, |p| p[n & 3])
    }

    /// 32-bit paging (4 KiB pages and, with CR4.PSE, 4 MiB pages with the
    /// PSE-36 address bits) and PAE paging (PDPTE registers, 2 MiB pages,
    /// XD with EFER.NXE), SDM vol. 3, 4.3 and 4.4, with accessed / dirty
    /// updates and the same TLB as the 4-level walk.
    fn walk_legacy(&mut self, la: u64, acc: Acc, user: bool) -> R<u64> {
        let pae = self.sregs.cr4 & cr4::PAE != 0;
        let pse = self.sregs.cr4 & cr4::PSE != 0;
        let nxe = pae && self.sregs.efer & efer::NXE != 0;
        let bits = self.pf_bits(acc, user);
        let (mut writable, mut us, mut nx) = (true, true, false);
        let mut table = if pae {
            let e = self.pdpte(((la >> 30) & 3) as usize);
            if e & 1 == 0 {
                return Err(self.page_fault(la, bits));
            }
            if e & PDPTE_RSVD != 0 {
                return Err(self.page_fault(la, PF_P | PF_RSVD | bits));
            }
            e & ADDR_MASK
        } else {
            self.sregs.cr3 & 0xffff_f000
        };
        // (shift, index bits) of the page directory then the page table.
        let levels: [(u32, u32); 2] = if pae {
            [(21, 9), (12, 9)]
        } else {
            [(22, 10), (12, 10)]
        };
        for (depth, (shift, idx_bits)) in levels.into_iter().enumerate() {
            let esize = if pae { 8 } else { 4 };
            let ea = table + ((la >> shift) & ((1 << idx_bits) - 1)) * esize;
            let read = if pae {
                self.mem.read_u64(ea)
            } else {
                self.mem.read_u32(ea).map(u64::from)
            };
            let Ok(entry) = read else {
                return Err(self.page_fault(la, bits));
            };
            if entry & 1 == 0 {
                return Err(self.page_fault(la, bits));
            }
            let large = depth == 0 && entry & 0x80 != 0 && (pae || pse);
            let rsvd = if pae {
                let mut r = entry & ((1u64 << 63) - 1) & !((1u64 << MAXPHYADDR) - 1) != 0
                    || (!nxe && entry & (1 << 63) != 0);
                if large {
                    // Bits 13-20 of a 2 MiB page's address are reserved.
                    r |= entry & 0x1f_e000 != 0;
                }
                r
            } else {
                // A 4 MiB page: bits 13-20 are physical address bits 32-39
                // (PSE-36), bit 21 is reserved.
                large && entry & (1 << 21) != 0
            };
            if rsvd {
                return Err(self.page_fault(la, PF_P | PF_RSVD | bits));
            }
            writable &= entry & 2 != 0;
            us &= entry & 4 != 0;
            nx |= nxe && entry & (1 << 63) != 0;
            let leaf = depth == 1 || large;
            let write_entry = |me: &mut InterpVcpu, v: u64| {
                let _ = if pae {
                    me.mem.write_u64(ea, v)
                } else {
                    me.mem.write_u32(ea, v as u32)
                };
            };
            if !leaf {
                if entry & 0x20 == 0 {
                    write_entry(self, entry | 0x20);
                }
                table = if pae {
                    entry & ADDR_MASK
                } else {
                    entry & 0xffff_f000
                };
                continue;
            }
            let rights = Rights {
                writable,
                user: us,
                nx,
                pkey: 0,
            };
            self.check_access(la, rights, acc, user)?;
            let mut set = 0x20;
            if acc == Acc::Write {
                set |= 0x40;
            }
            if entry & set != set {
                write_entry(self, entry | set);
            }
            let pa = match (pae, large) {
                (true, true) => (entry & ADDR_MASK & !0x1f_ffff) | (la & 0x1f_ffff),
                (false, true) => {
                    (((entry >> 13) & 0xff) << 32) | (entry & 0xffc0_0000) | (la & 0x3f_ffff)
                }
                (true, false) => (entry & ADDR_MASK) | (la & 0xfff),
                (false, false) => (entry & 0xffff_f000) | (la & 0xfff),
            };
            let dirty = if acc == Acc::Write || entry & 0x40 != 0 {
                TE_DIRTY
            } else {
                0
            };
            self.tlb
                .insert(la >> 12, (pa & !0xfff) | rights.bits() | dirty);
            return Ok(pa);
        }
        Err(self.page_fault(la, bits))
    }

    /// The guest-physical address an access to `pa` reads: the BIOS ROM
    /// window below 4 GiB is served from its low copy.
    #[inline]
    fn rom_alias(&self, pa: u64, len: u64) -> u64 {
        if (BIOS_HIGH..0x1_0000_0000).contains(&pa) && !self.mem.is_ram(pa, len) {
            pa - BIOS_HIGH + BIOS_LOW
        } else {
            pa
        }
    }

    fn permitted(&self, writable: bool, us: bool, nx: bool, acc: Acc, user: bool) -> bool {
        if user && !us {
            return false;
        }
        match acc {
            Acc::Write => writable || (!user && self.sregs.cr0 & cr0::WP == 0),
            Acc::Exec => !nx,
            Acc::Read => true,
        }
    }

    /// The access-rights check of a translation with `rights` (a TLB hit or
    /// the end of a walk). SMEP, SMAP and protection keys depend on CR4 and
    /// also on EFLAGS.AC, PKRU and IA32_PKRS, which change without a flush:
    /// they are checked at every access, off the common path (for a
    /// supervisor-mode page only PKS is in play).
    #[inline(always)]
    fn check_access(&mut self, la: u64, rights: Rights, acc: Acc, user: bool) -> R<()> {
        let extra = if rights.user { CR4_RIGHTS } else { CR4_PKS };
        if self.sregs.cr4 & extra != 0 {
            return self.check_rights(la, rights, acc, user);
        }
        if self.permitted(rights.writable, rights.user, rights.nx, acc, user) {
            Ok(())
        } else {
            Err(self.page_fault(la, PF_P | self.pf_bits(acc, user)))
        }
    }

    /// The access-rights check with SMEP, SMAP and protection keys (SDM
    /// vol. 3, 4.6), for a translation with `rights`: a protection #PF,
    /// with PK (bit 5) when a protection key denies the access (4.7).
    #[cold]
    #[inline(never)]
    fn check_rights(&mut self, la: u64, rights: Rights, acc: Acc, user: bool) -> R<()> {
        let cr4 = self.sregs.cr4;
        let mut denied = !self.permitted(rights.writable, rights.user, rights.nx, acc, user);
        // A supervisor-mode access (CPL < 3, or implicit) to a user-mode
        // address (U/S set at every level), 4.6.1.
        if !user && rights.user {
            denied |= match acc {
                Acc::Exec => cr4 & CR4_SMEP != 0,
                // SMAP: explicit accesses pass with EFLAGS.AC set,
                // implicit ones never do.
                Acc::Read | Acc::Write => {
                    cr4 & CR4_SMAP != 0
                        && (self.rflags & crate::flags::AC == 0 || self.tlb.implicit)
                }
            };
        }
        // Protection keys (4.6.2): data accesses with IA-32e paging; PKRU
        // for user-mode addresses (with CR4.PKE), IA32_PKRS for supervisor-
        // mode ones (with CR4.PKS). AD denies every data access, WD user-
        // mode writes and, with CR0.WP, supervisor-mode writes. PK is set
        // whenever the key denies the access (4.7), even where the other
        // rights deny it too.
        let mut pk = 0;
        if acc != Acc::Exec && self.sregs.efer & efer::LMA != 0 {
            let keys = if rights.user {
                (cr4 & CR4_PKE != 0).then(|| self.pkru())
            } else {
                (cr4 & CR4_PKS != 0).then_some(self.tlb.pkrs)
            };
            if let Some(keys) = keys {
                let shift = 2 * u32::from(rights.pkey & 0xf);
                let ad = (keys >> shift) & 1 != 0;
                let wd = (keys >> (shift + 1)) & 1 != 0;
                let wp = self.sregs.cr0 & cr0::WP != 0;
                if ad || (wd && acc == Acc::Write && (user || wp)) {
                    pk = PF_PK;
                    denied = true;
                }
            }
        }
        if !denied {
            return Ok(());
        }
        let bits = self.pf_bits(acc, user);
        Err(self.page_fault(la, PF_P | pk | bits))
    }

    /// Runs `f` with its linear accesses as implicit supervisor-mode
    /// accesses (descriptor tables, the TSS: SDM vol. 3, 4.6), which SMAP
    /// denies user-mode pages even with EFLAGS.AC set.
    pub(crate) fn implicit_access<T>(&mut self, f: impl FnOnce(&mut Self) -> R<T>) -> R<T> {
        let outer = self.tlb.implicit;
        self.tlb.implicit = true;
        let r = f(self);
        self.tlb.implicit = outer;
        r
    }

    /// The 4-level walk (SDM vol. 3, 4.5) with accessed / dirty updates.
    fn walk(&mut self, la: u64, acc: Acc, user: bool) -> R<u64> {
        // A non-canonical address never reaches here: segmentation raised
        // #GP / #SS first.
        let nxe = self.sregs.efer & efer::NXE != 0;
        let bits = self.pf_bits(acc, user);
        let mut table = self.sregs.cr3 & ADDR_MASK;
        let (mut writable, mut us, mut nx) = (true, true, false);
        let levels: u32 = if self.sregs.cr4 & (1 << 12) != 0 {
            5
        } else {
            4
        };
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let ea = table + ((la >> shift) & 0x1ff) * 8;
            let Ok(entry) = self.mem.read_u64(ea) else {
                // A paging structure outside RAM reads as not present.
                return Err(self.page_fault(la, bits));
            };
            if entry & 1 == 0 {
                return Err(self.page_fault(la, bits));
            }
            let large = entry & 0x80 != 0 && (level == 2 || level == 3);
            let mut rsvd = entry & ((1u64 << 52) - 1) & !((1u64 << MAXPHYADDR) - 1) != 0
                || (!nxe && entry & (1 << 63) != 0)
                || (entry & 0x80 != 0 && level >= 4);
            if large {
                let low = (1u64 << shift) - 1;
                // Bits 12 (PAT) .. shift-1 of a large page's address are reserved.
                rsvd |= entry & low & !0x1fff != 0;
            }
            if rsvd {
                return Err(self.page_fault(la, PF_P | PF_RSVD | bits));
            }
            writable &= entry & 2 != 0;
            us &= entry & 4 != 0;
            nx |= nxe && entry & (1 << 63) != 0;
            let leaf = level == 1 || large;
            if !leaf {
                if entry & 0x20 == 0 {
                    let _ = self.mem.write_u64(ea, entry | 0x20);
                }
                table = entry & ADDR_MASK;
                continue;
            }
            let rights = Rights {
                writable,
                user: us,
                nx,
                pkey: ((entry >> 59) & 0xf) as u8,
            };
            self.check_access(la, rights, acc, user)?;
            let mut set = 0x20;
            if acc == Acc::Write {
                set |= 0x40;
            }
            if entry & set != set {
                let _ = self.mem.write_u64(ea, entry | set);
            }
            let page_mask = (1u64 << shift) - 1;
            let base = entry & ADDR_MASK & !page_mask;
            let pa = base | (la & page_mask);
            let dirty = if acc == Acc::Write || entry & 0x40 != 0 {
                TE_DIRTY
            } else {
                0
            };
            self.tlb
                .insert(la >> 12, (pa & !0xfff) | rights.bits() | dirty);
            return Ok(pa);
        }
        Err(self.page_fault(la, bits))
    }

    /// Reads `buf.len()` (at most 8) bytes at guest-physical `pa`: RAM
    /// directly, anything else as an MMIO read exit.
    pub(crate) fn phys_read(&mut self, pa: u64, buf: &mut [u8]) -> R<()> {
        if self.mem.read(pa, buf).is_ok() {
            return Ok(());
        }
        let alias = self.rom_alias(pa, buf.len() as u64);
        if alias != pa && self.mem.read(alias, buf).is_ok() {
            return Ok(());
        }
        let n = buf.len().min(8);
        let (v, _) = self.external(ExtKind::MmioRead, pa, n as u8, 0)?;
        buf[..n].copy_from_slice(&v.to_le_bytes()[..n]);
        Ok(())
    }

    /// Writes `data` (at most 8 bytes, within one page) at guest-physical
    /// `pa`.
    pub(crate) fn phys_write(&mut self, pa: u64, data: &[u8]) -> R<()> {
        if self.mem.is_ram(pa, data.len() as u64) {
            let _ = self.mem.write(pa, data);
            // (`lin_write` splits at page boundaries: one page here.)
            self.ram_written(pa);
            return Ok(());
        }
        let n = data.len().min(8);
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&data[..n]);
        self.external(ExtKind::MmioWrite, pa, n as u8, u64::from_le_bytes(b))?;
        Ok(())
    }

    /// `phys_write` of the low `size` bytes of `v`, with RAM (the common
    /// case) written without a byte buffer.
    #[inline(always)]
    fn phys_write_le(&mut self, pa: u64, size: usize, v: u64) -> R<()> {
        if self.mem.write_le(pa, size, v) {
            self.ram_written(pa);
            return Ok(());
        }
        self.phys_write(pa, &v.to_le_bytes()[..size])
    }

    /// After this processor wrote RAM in the page of `pa`: its own cached
    /// code from the page goes now, other processors' at their next entry.
    #[inline(always)]
    fn ram_written(&mut self, pa: u64) {
        if self.cache.is_code_page(pa) {
            self.cache.invalidate_page(pa);
        }
        self.mem.code_watch().note_write(pa, self.code_writer);
    }

    /// Reads `size` (1..=8) bytes at linear `la`.
    #[inline]
    pub(crate) fn lin_read(&mut self, la: u64, size: usize, user: bool) -> R<u64> {
        if size > 8 {
            // Wider accesses belong to instructions not built yet.
            return Err(Stop::Exc(6, None));
        }
        if self.data_bp_armed {
            self.data_breakpoints(la, size, false);
        }
        let mut b = [0u8; 8];
        let first = (0x1000 - (la & 0xfff) as usize).min(size);
        let pa = self.translate(la, Acc::Read, user)?;
        if first == size {
            // RAM directly; the ROM alias and MMIO through `phys_read`.
            if let Some(v) = self.mem.read_le(pa, size) {
                return Ok(v);
            }
            self.phys_read(pa, &mut b[..size])?;
        } else {
            let la2 = la.wrapping_add(first as u64);
            let pa2 = self.translate(la2, Acc::Read, user)?;
            self.phys_read(pa, &mut b[..first])?;
            self.phys_read(pa2, &mut b[first..size])?;
        }
        Ok(u64::from_le_bytes(b))
    }

    /// Writes the low `size` (1..=8) bytes of `v` at linear `la`. Both pages
    /// are translated before anything is written, so a #PF on the second
    /// leaves memory unchanged.
    #[inline]
    pub(crate) fn lin_write(&mut self, la: u64, size: usize, v: u64, user: bool) -> R<()> {
        if size > 8 {
            return Err(Stop::Exc(6, None));
        }
        if self.data_bp_armed {
            self.data_breakpoints(la, size, true);
        }
        let first = (0x1000 - (la & 0xfff) as usize).min(size);
        let pa = self.translate(la, Acc::Write, user)?;
        if first == size {
            self.phys_write_le(pa, size, v)?;
            self.prefetch_stores(la, user);
            Ok(())
        } else {
            let b = v.to_le_bytes();
            let la2 = la.wrapping_add(first as u64);
            let pa2 = self.translate(la2, Acc::Write, user)?;
            self.phys_write(pa, &b[..first])?;
            self.phys_write(pa2, &b[first..size])
        }
    }

    /// A stream of stores with a constant stride (a loop stepping through
    /// an array) has the line of a coming store and the TLB entry of the
    /// one after prefetched, as a processor's stride prefetcher would: an
    /// interpreter makes so many stores of its own that a store missing the
    /// cache soon stalls it. Only hints: nothing architectural changes (a
    /// TLB miss does not walk).
    #[inline(always)]
    fn prefetch_stores(&mut self, la: u64, user: bool) {
        let stride = la.wrapping_sub(self.store_la);
        self.store_la = la;
        if stride != self.store_stride {
            self.store_stride = stride;
            return;
        }
        // Within the line the store itself brought in: nothing to do.
        if stride.wrapping_add(63) < 127 {
            return;
        }
        // Four stores ahead: an interpreted loop iteration is much shorter
        // than a miss to memory (measured: 1 ahead 140 s, 2 ahead 128 s,
        // 4 ahead 126 s on kvm-unit-tests' sieve). The TLB entry goes one
        // further, so that the lookup here finds it cached.
        let ahead = la.wrapping_add(stride.wrapping_mul(4));
        self.tlb.prefetch(ahead.wrapping_add(stride) >> 12);
        if let Some(pa) = self.translate_fast(ahead, Acc::Write, user) {
            self.mem.prefetch(pa);
        }
    }

    /// Checks that `la` can be written (translation and rights) without
    /// writing it: a stack frame is probed before it is built.
    pub(crate) fn probe_write(&mut self, la: u64, user: bool) -> R<()> {
        self.translate(la, Acc::Write, user).map(|_| ())
    }

    /// Fetches the instruction at linear `la`: from the decoded-instruction
    /// cache, or decoded from guest memory (and cached).
    /// The instruction goes to `out` rather than through the `Result`,
    /// which keeps the hot path free of large moves.
    #[inline]
    pub(crate) fn fetch(&mut self, la: u64, out: &mut iced_x86::Instruction) -> R<()> {
        let user = self.cpl() == 3;
        let vpn = la >> 12;
        let (fvpn, fpage, fuser, fgen) = self.tlb.fetch;
        let pa = if fvpn == vpn && fuser == user && fgen == self.tlb.generation {
            fpage | (la & 0xfff)
        } else {
            let pa = self.translate(la, Acc::Exec, user)?;
            let pa = self.rom_alias(pa, 1);
            self.tlb.fetch = (vpn, pa & !0xfff, user, self.tlb.generation);
            pa
        };
        if let Some(i) = self.cache.lookup(pa, self.bitness) {
            *out = *i;
            return Ok(());
        }
        self.fetch_slow(la, pa, user, out)
    }

    #[inline(never)]
    fn fetch_slow(
        &mut self,
        la: u64,
        pa: u64,
        user: bool,
        out: &mut iced_x86::Instruction,
    ) -> R<()> {
        let mut bytes = [0u8; 15];
        let in_page = (0x1000 - (pa & 0xfff) as usize).min(15);
        // Before reading the bytes: a write by another processor from now
        // on is logged for this one (cross-modifying code).
        self.mem.code_watch().note_code(pa);
        if self.mem.read(pa, &mut bytes[..in_page]).is_err() {
            return Err(Stop::Exit(tandem_core::vcpu::VcpuExit::Unhandled(format!(
                "the interpreter cannot execute code outside RAM (linear {la:#x}, physical {pa:#x})"
            ))));
        }
        let mut n = in_page;
        let mut insn = tandem_decoder::decode_at_zero(&bytes[..n], self.bitness);
        if insn.is_none() && n < 15 {
            let la2 = la.wrapping_add(n as u64);
            let pa2 = self.translate(la2, Acc::Exec, user)?;
            let pa2 = self.rom_alias(pa2, 1);
            if self.mem.read(pa2, &mut bytes[n..15]).is_ok() {
                n = 15;
                insn = tandem_decoder::decode_at_zero(&bytes[..n], self.bitness);
            }
        }
        match insn {
            Some(i) => {
                self.cache.insert(pa, self.bitness, &i);
                *out = i;
                Ok(())
            }
            None => Err(Stop::Exc(6, None)),
        }
    }

    /// CR0 / CR3 / CR4 / EFER changed: the TLB caches translations and
    /// rights computed under them.
    pub(crate) fn paging_changed(&mut self) {
        // The PDPTE registers survive writes that do not reload them.
        let pdpte = self.tlb.pdpte;
        self.tlb.flush();
        self.tlb.pdpte = pdpte;
    }
}
