//! Guest page-table walks for the VMM's own use (error messages, the
//! debugger): linear address to guest-physical under the current CR0, CR3,
//! CR4 and EFER, without setting accessed or dirty bits.

use crate::cpu::{cr0, cr4, efer, Sregs};
use crate::memory::GuestMemory;

/// Translates linear address `la` to guest-physical, or `None` when it is
/// not mapped (or a table lies outside RAM).
pub fn translate(mem: &GuestMemory, sregs: &Sregs, la: u64) -> Option<u64> {
    if sregs.cr0 & cr0::PG == 0 {
        return Some(la & 0xffff_ffff);
    }
    let present = |e: u64| e & 1 != 0;
    if sregs.efer & efer::LMA != 0 {
        let levels = if sregs.cr4 & (1 << 12) != 0 { 5 } else { 4 };
        let mut table = sregs.cr3 & 0x000f_ffff_ffff_f000;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let idx = (la >> shift) & 0x1ff;
            let e = mem.read_u64(table + idx * 8).ok()?;
            if !present(e) {
                return None;
            }
            let addr = e & 0x000f_ffff_ffff_f000;
            if level == 1 {
                return Some(addr | (la & 0xfff));
            }
            if (level == 2 || level == 3) && e & 0x80 != 0 {
                let mask = (1u64 << shift) - 1;
                return Some((addr & !mask) | (la & mask));
            }
            table = addr;
        }
        None
    } else if sregs.cr4 & cr4::PAE != 0 {
        let pdpte = mem
            .read_u64((sregs.cr3 & 0xffff_ffe0) + ((la >> 30) & 3) * 8)
            .ok()?;
        if !present(pdpte) {
            return None;
        }
        let pde = mem
            .read_u64((pdpte & 0x000f_ffff_ffff_f000) + ((la >> 21) & 0x1ff) * 8)
            .ok()?;
        if !present(pde) {
            return None;
        }
        if pde & 0x80 != 0 {
            return Some((pde & 0x000f_ffff_ffe0_0000) | (la & 0x1f_ffff));
        }
        let pte = mem
            .read_u64((pde & 0x000f_ffff_ffff_f000) + ((la >> 12) & 0x1ff) * 8)
            .ok()?;
        present(pte).then_some((pte & 0x000f_ffff_ffff_f000) | (la & 0xfff))
    } else {
        let la = la & 0xffff_ffff;
        let pde = u64::from(
            mem.read_u32((sregs.cr3 & 0xffff_f000) + (la >> 22) * 4)
                .ok()?,
        );
        if !present(pde) {
            return None;
        }
        if pde & 0x80 != 0 && sregs.cr4 & cr4::PSE != 0 {
            // 4 MiB page; bits 13-20 extend the address above 4 GiB (PSE-36).
            let high = ((pde >> 13) & 0xff) << 32;
            return Some(high | (pde & 0xffc0_0000) | (la & 0x3f_ffff));
        }
        let pte = u64::from(
            mem.read_u32((pde & 0xffff_f000) + ((la >> 12) & 0x3ff) * 4)
                .ok()?,
        );
        present(pte).then_some((pte & 0xffff_f000) | (la & 0xfff))
    }
}

/// Reads up to `buf.len()` bytes at linear address `la`, page by page;
/// returns how many were readable.
pub fn read_linear(mem: &GuestMemory, sregs: &Sregs, la: u64, buf: &mut [u8]) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let addr = la.wrapping_add(done as u64);
        let Some(pa) = translate(mem, sregs, addr) else {
            break;
        };
        let in_page = (4096 - (addr & 0xfff)) as usize;
        let n = in_page.min(buf.len() - done);
        if mem.read(pa, &mut buf[done..done + n]).is_err() {
            break;
        }
        done += n;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_level_walk_with_2m_and_4k_pages() {
        let m = GuestMemory::new(4 << 20).unwrap();
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[0] = 2 MiB page at 0,
        // PD[1] -> PT 0x4000 whose entry 5 maps 0x205000 to 0x10000.
        m.write_u64(0x1000, 0x2003).unwrap();
        m.write_u64(0x2000, 0x3003).unwrap();
        m.write_u64(0x3000, 0x83).unwrap();
        m.write_u64(0x3008, 0x4003).unwrap();
        m.write_u64(0x4000 + 5 * 8, 0x10003).unwrap();
        let s = Sregs {
            cr0: cr0::PE | cr0::PG,
            cr4: cr4::PAE,
            cr3: 0x1000,
            efer: efer::LME | efer::LMA,
            ..Default::default()
        };
        assert_eq!(translate(&m, &s, 0x1234), Some(0x1234));
        assert_eq!(translate(&m, &s, 0x205678), Some(0x10678));
        assert_eq!(translate(&m, &s, 0x206000), None);
        assert_eq!(translate(&m, &s, 0x4000_0000), None);
        let mut b = [0u8; 8];
        m.write_u64(0x10ff8, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(read_linear(&m, &s, 0x205ff8, &mut b), 8);
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        // The next page is unmapped: only the first 4 bytes are readable.
        assert_eq!(read_linear(&m, &s, 0x205ffc, &mut b), 4);
    }

    #[test]
    fn paging_off_and_32bit() {
        let m = GuestMemory::new(4 << 20).unwrap();
        let mut s = Sregs::default();
        assert_eq!(translate(&m, &s, 0x1_0000_1234), Some(0x1234));
        s.cr0 = cr0::PE | cr0::PG;
        s.cr3 = 0x1000;
        s.cr4 = cr4::PSE;
        m.write_u32(0x1000, 0x0040_0083).unwrap();
        m.write_u32(0x1004, 0x2003).unwrap();
        m.write_u32(0x2000 + 4, 0x7003).unwrap();
        assert_eq!(translate(&m, &s, 0x12345), Some(0x412345));
        assert_eq!(translate(&m, &s, 0x401234), Some(0x7234));
        assert_eq!(translate(&m, &s, 0x800000), None);
    }
}
