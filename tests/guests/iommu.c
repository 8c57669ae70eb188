/* iommu: a PCI bus master (QEMU's edu device) behind an Intel VT-d
 * remapping unit (Intel VT-d specification, chapters 3, 5, 6, 9, 10, 11),
 * run with `--device edu --device intel-iommu,intremap=on`.
 *
 * Checks:
 *  - PCI: edu (1234:11e8) on bus 0 with BAR 0 assigned (1 MiB, sized by
 *    writing all ones), INTA#, an interrupt line of 10 or 11 (SeaBIOS's
 *    PIRQ routing) and an MSI capability; its liveness and factorial
 *    registers;
 *  - DMA with translation off: RAM -> device buffer -> RAM;
 *  - the unit's VER / CAP / ECAP (39-bit SAGAW, queued invalidation,
 *    interrupt remapping);
 *  - DMA remapping: root and context entries and a 3-level second-level
 *    table; DMA through IOVAs reaches the mapped pages;
 *  - a write to a read-only IOVA is blocked and recorded (fault recording
 *    register: reason 5, the page, the requester's source ID, a write),
 *    and with FECTL unmasked a fault event interrupt arrives;
 *  - interrupt remapping: the IOAPIC entry of the edu's line in remappable
 *    format (index 5) and an MSI in remappable format (index 6) arrive as
 *    their IRTEs' vectors; an MSI whose IRTE demands another source ID is
 *    blocked; a compatibility-format MSI is blocked until CFI is set;
 *  - queued invalidation: an invalidation-wait descriptor writes its
 *    status; an invalid descriptor sets FSTS.IQE and stops the queue.
 */
#include "runtime.h"
#include "hw.h"

/* ---- PCI configuration mechanism #1 ------------------------------------- */
static uint32_t pci_read(unsigned dev, unsigned reg)
{
    outl(0xCF8, 0x80000000u | (dev << 11) | (reg & 0xFC));
    return inl(0xCFC);
}
static void pci_write(unsigned dev, unsigned reg, uint32_t v)
{
    outl(0xCF8, 0x80000000u | (dev << 11) | (reg & 0xFC));
    outl(0xCFC, v);
}

/* ---- edu ------------------------------------------------------------------ */
#define EDU_ID 0x00
#define EDU_LIVE 0x04
#define EDU_FACT 0x08
#define EDU_STATUS 0x20
#define EDU_INTR_STATUS 0x24
#define EDU_INTR_RAISE 0x60
#define EDU_INTR_ACK 0x64
#define EDU_DMA_SRC 0x80
#define EDU_DMA_DST 0x88
#define EDU_DMA_COUNT 0x90
#define EDU_DMA_CMD 0x98
#define EDU_BUF 0x40000ull

static uintptr_t edu;
static unsigned edu_dev;

static uint32_t edu_r(unsigned off) { return *(volatile uint32_t *)(edu + off); }
static void edu_w(unsigned off, uint32_t v) { *(volatile uint32_t *)(edu + off) = v; }
static void edu_wq(unsigned off, uint64_t v) { *(volatile uint64_t *)(edu + off) = v; }

/* One DMA: `to_ram` copies the buffer to device address `addr`. */
static void edu_dma(uint64_t addr, uint32_t len, int to_ram)
{
    edu_wq(EDU_DMA_SRC, to_ram ? EDU_BUF : addr);
    edu_wq(EDU_DMA_DST, to_ram ? addr : EDU_BUF);
    edu_wq(EDU_DMA_COUNT, len);
    edu_w(EDU_DMA_CMD, 1 | (to_ram ? 2 : 0));
    for (int i = 0; i < 1000000 && (edu_r(EDU_DMA_CMD) & 1); i++)
        __asm__ volatile("pause");
}

/* ---- VT-d registers --------------------------------------------------------- */
#define VTD 0xFED90000ull
#define VTD_VER 0x00
#define VTD_CAP 0x08
#define VTD_ECAP 0x10
#define VTD_GCMD 0x18
#define VTD_GSTS 0x1C
#define VTD_RTADDR 0x20
#define VTD_FSTS 0x34
#define VTD_FECTL 0x38
#define VTD_FEDATA 0x3C
#define VTD_FEADDR 0x40
#define VTD_IQH 0x80
#define VTD_IQT 0x88
#define VTD_IQA 0x90
#define VTD_IRTA 0xB8

#define GCMD_TE (1u << 31)
#define GCMD_SRTP (1u << 30)
#define GCMD_QIE (1u << 26)
#define GCMD_IRE (1u << 25)
#define GCMD_SIRTP (1u << 24)
#define GCMD_CFI (1u << 23)
/* The persistent enables a GCMD write must repeat (VT-d 10.4.4). */
#define GSTS_KEEP (GCMD_TE | GCMD_QIE | GCMD_IRE | GCMD_CFI)

#define FSTS_PFO (1u << 0)
#define FSTS_PPF (1u << 1)
#define FSTS_IQE (1u << 4)

static uint32_t vtd_r(unsigned off) { return *(volatile uint32_t *)(uintptr_t)(VTD + off); }
static uint64_t vtd_rq(unsigned off) { return *(volatile uint64_t *)(uintptr_t)(VTD + off); }
static void vtd_w(unsigned off, uint32_t v) { *(volatile uint32_t *)(uintptr_t)(VTD + off) = v; }
static void vtd_wq(unsigned off, uint64_t v) { *(volatile uint64_t *)(uintptr_t)(VTD + off) = v; }

/* Issues one GCMD command and waits for its status bit. */
static int vtd_command(uint32_t bit)
{
    vtd_w(VTD_GCMD, (vtd_r(VTD_GSTS) & GSTS_KEEP) | bit);
    for (int i = 0; i < 100000; i++)
        if (vtd_r(VTD_GSTS) & bit)
            return 1;
    return 0;
}

static unsigned fault_record_offset(void) { return (unsigned)((vtd_rq(VTD_CAP) >> 24) & 0x3FF) * 16; }

/* ---- Tables ----------------------------------------------------------------- */
static uint64_t root_table[512] __attribute__((aligned(4096)));
static uint64_t context_table[512] __attribute__((aligned(4096)));
static uint64_t sl_l3[512] __attribute__((aligned(4096)));
static uint64_t sl_l2[512] __attribute__((aligned(4096)));
static uint64_t sl_l1[512] __attribute__((aligned(4096)));
static uint64_t irt[512] __attribute__((aligned(4096))); /* 256 IRTEs */
static uint64_t iq[512] __attribute__((aligned(4096)));  /* 256 descriptors */
static uint8_t page_a[4096] __attribute__((aligned(4096)));
static uint8_t page_b[4096] __attribute__((aligned(4096)));
static uint8_t page_c[4096] __attribute__((aligned(4096)));
static volatile uint32_t wait_status __attribute__((aligned(8)));

#define SL_R 1ull
#define SL_W 2ull

static void fill(uint8_t *p, uint8_t seed)
{
    for (int i = 0; i < 4096; i++)
        p[i] = (uint8_t)(seed + i * 7);
}
static int same(const uint8_t *a, const uint8_t *b, int n)
{
    for (int i = 0; i < n; i++)
        if (a[i] != b[i])
            return 0;
    return 1;
}

/* ---- Interrupts -------------------------------------------------------------- */
#define V_FAULT 0x55
#define V_IOAPIC 0x50
#define V_MSI 0x51
#define V_MSI_BADSID 0x52
#define V_COMPAT 0x53
static volatile int hits[256];

static void edu_handler(struct frame *f)
{
    hits[f->vector & 0xFF]++;
    edu_w(EDU_INTR_ACK, edu_r(EDU_INTR_STATUS));
    lapic_eoi();
}
static void fault_handler(struct frame *f)
{
    hits[f->vector & 0xFF]++;
    lapic_eoi();
}

/* Lets pending interrupts in. */
static void take_interrupts(void)
{
    for (int i = 0; i < 4; i++)
        open_irq_window();
}

/* An IRTE (VT-d 9.10): present, fixed, physical destination `apic_id`
 * (xAPIC mode: destination ID bits 15:8), edge; `sid` checked when
 * `svt` is 1. */
static void set_irte(unsigned index, uint8_t vector, unsigned svt, uint16_t sid)
{
    irt[2 * index] = 1ull | ((uint64_t)vector << 16) | ((uint64_t)(0 << 8) << 32);
    irt[2 * index + 1] = (uint64_t)sid | ((uint64_t)svt << 18);
}

/* The MSI address of remappable-format handle `index` (VT-d 5.1.5.2). */
static uint32_t remappable_msi(unsigned index)
{
    return 0xFEE00000u | ((index & 0x7FFF) << 5) | (1u << 4) | (((index >> 15) & 1) << 2);
}

static void set_msi(unsigned at, uint32_t address, uint16_t data, int enable)
{
    pci_write(edu_dev, at + 4, address);
    pci_write(edu_dev, at + 8, 0);
    pci_write(edu_dev, at + 12, data);
    uint32_t ctl = pci_read(edu_dev, at);
    pci_write(edu_dev, at, (ctl & 0xFFFF) | ((enable ? 1u : 0u) << 16));
}

int main(void)
{
    pic_mask_all();
    ioapic_mask_all();
    lapic_enable(0xFF);
    set_handler(V_FAULT, fault_handler);
    for (int v = V_IOAPIC; v <= V_COMPAT; v++)
        set_handler((unsigned)v, edu_handler);

    /* ---- PCI ---- */
    int found = 0;
    for (unsigned d = 0; d < 32 && !found; d++)
        if (pci_read(d, 0) == 0x11E81234u) {
            edu_dev = d;
            found = 1;
        }
    uint32_t bar = found ? pci_read(edu_dev, 0x10) : 0;
    pci_write(edu_dev, 0x10, 0xFFFFFFFFu);
    uint32_t sized = pci_read(edu_dev, 0x10);
    pci_write(edu_dev, 0x10, bar);
    uint32_t intr = pci_read(edu_dev, 0x3C);
    unsigned line = intr & 0xFF;
    unsigned cap = pci_read(edu_dev, 0x34) & 0xFF;
    int ok = expect_true("edu found on bus 0", found);
    ok &= expect("BAR 0 size mask", sized, 0xFFF00000u);
    ok &= expect_true("BAR 0 assigned, 1 MiB aligned", bar != 0 && (bar & 0xFFFFF) == 0);
    ok &= expect("interrupt pin", (intr >> 8) & 0xFF, 1);
    ok &= expect_true("interrupt line 10 or 11", line == 10 || line == 11);
    ok &= expect("MSI capability ID", found ? pci_read(edu_dev, cap) & 0xFF : 0, 5);
    report("edu on PCI bus 0: BAR 0, INTA#, MSI capability", ok);
    if (!found)
        return 0;
    edu = bar & ~0xFu;
    /* Memory space (firmware's) and bus master. */
    pci_write(edu_dev, 4, pci_read(edu_dev, 4) | 0x6);

    edu_w(EDU_LIVE, 0x12345678);
    edu_w(EDU_FACT, 5);
    for (int i = 0; i < 1000000 && (edu_r(EDU_STATUS) & 1); i++)
        __asm__ volatile("pause");
    ok = expect("identification", edu_r(EDU_ID), 0x010000ED);
    ok &= expect("liveness", edu_r(EDU_LIVE), ~0x12345678u);
    ok &= expect("5!", edu_r(EDU_FACT), 120);
    report("edu registers: identification, liveness, factorial", ok);

    fill(page_a, 1);
    memset(page_b, 0, 4096);
    edu_dma((uintptr_t)page_a, 256, 0);
    edu_dma((uintptr_t)page_b, 256, 1);
    report("DMA without translation: RAM -> buffer -> RAM", same(page_a, page_b, 256));

    /* ---- The remapping unit ---- */
    uint64_t capr = vtd_rq(VTD_CAP), ecap = vtd_rq(VTD_ECAP);
    ok = expect_true("VER major >= 1", ((vtd_r(VTD_VER) >> 4) & 0xF) >= 1);
    ok &= expect_true("CAP.SAGAW 39-bit", (capr >> 8) & 2);
    ok &= expect_true("ECAP.QI", (ecap >> 1) & 1);
    ok &= expect_true("ECAP.IR", (ecap >> 3) & 1);
    ok &= expect("GSTS at reset", vtd_r(VTD_GSTS), 0);
    report("VT-d VER, CAP, ECAP", ok);

    /* ---- DMA remapping ---- */
    uint16_t sid = (uint16_t)(edu_dev << 3);
    root_table[0] = (uintptr_t)context_table | 1;
    context_table[2 * (sid & 0xFF)] = (uintptr_t)sl_l3 | 1;   /* P, TT 00 */
    context_table[2 * (sid & 0xFF) + 1] = 1 | (1 << 8);        /* AW 39-bit, DID 1 */
    sl_l3[0] = (uintptr_t)sl_l2 | SL_R | SL_W;
    sl_l2[0] = (uintptr_t)sl_l1 | SL_R | SL_W;
    sl_l1[0] = (uintptr_t)page_a | SL_R | SL_W;             /* IOVA 0x0000 */
    sl_l1[1] = (uintptr_t)page_b | SL_R | SL_W;             /* IOVA 0x1000 */
    sl_l1[2] = (uintptr_t)page_c | SL_R;                    /* IOVA 0x2000, read-only */
    vtd_wq(VTD_RTADDR, (uintptr_t)root_table);
    ok = expect_true("SRTP: RTPS", vtd_command(GCMD_SRTP));
    ok &= expect_true("TE: TES", vtd_command(GCMD_TE));
    fill(page_a, 9);
    memset(page_b, 0, 4096);
    edu_dma(0x0000, 512, 0);
    edu_dma(0x1000, 512, 1);
    ok &= expect_true("IOVA 0x1000 holds what IOVA 0 held", same(page_a, page_b, 512));
    ok &= expect("FSTS", vtd_r(VTD_FSTS), 0);
    report("DMA through root, context and second-level tables", ok);

    memset(page_c, 0xEE, 4096);
    edu_dma(0x2000, 64, 1);
    unsigned fro = fault_record_offset();
    uint64_t rec_lo = vtd_rq(fro), rec_hi = vtd_rq(fro + 8);
    ok = expect("read-only page unchanged", page_c[0], 0xEE);
    ok &= expect_true("FSTS.PPF", vtd_r(VTD_FSTS) & FSTS_PPF);
    ok &= expect_true("record: F", rec_hi >> 63);
    ok &= expect("record: reason", (rec_hi >> 32) & 0xFF, 5);
    ok &= expect("record: fault info", rec_lo & ~0xFFFull, 0x2000);
    ok &= expect("record: source ID", rec_hi & 0xFFFF, sid);
    ok &= expect("record: T (0 = write)", (rec_hi >> 62) & 1, 0);
    vtd_w(fro + 12, 1u << 31); /* F is RW1C */
    ok &= expect("FSTS after clearing F", vtd_r(VTD_FSTS) & FSTS_PPF, 0);
    report("write to a read-only IOVA: blocked and recorded", ok);

    vtd_w(VTD_FEDATA, V_FAULT);
    vtd_w(VTD_FEADDR, 0xFEE00000u);
    vtd_w(VTD_FECTL, 0); /* IM clear */
    edu_dma(0x2000, 4, 1);
    take_interrupts();
    ok = expect("fault event interrupts", hits[V_FAULT], 1);
    vtd_w(fro + 12, 1u << 31);
    report("fault event interrupt (FEDATA / FEADDR)", ok);

    /* ---- Interrupt remapping ---- */
    set_irte(5, V_IOAPIC, 0, 0);
    set_irte(6, V_MSI, 1, sid);
    set_irte(7, V_MSI_BADSID, 1, (uint16_t)(sid + 1));
    vtd_wq(VTD_IRTA, (uintptr_t)irt | 7); /* 2^(7+1) entries */
    ok = expect_true("SIRTP: IRTPS", vtd_command(GCMD_SIRTP));
    ok &= expect_true("IRE: IRES", vtd_command(GCMD_IRE));
    report("interrupt remapping table and enable", ok);

    /* IOAPIC entry in remappable format (VT-d 5.1.5.1): index 5, the
     * vector repeated for the EOI. INTx is on while MSI is off. */
    ioapic_write_rte(line, (1ull << 48) | ((uint64_t)5 << 49) | V_IOAPIC);
    edu_w(EDU_INTR_RAISE, 1);
    take_interrupts();
    ok = expect("IOAPIC interrupt as IRTE 5's vector", hits[V_IOAPIC], 1);
    ioapic_write_rte(line, RTE_MASKED);
    report("IOAPIC entry in remappable format", ok);

    unsigned msi = cap;
    set_msi(msi, remappable_msi(6), 0, 1);
    edu_w(EDU_INTR_RAISE, 1);
    take_interrupts();
    ok = expect("MSI as IRTE 6's vector", hits[V_MSI], 1);
    report("MSI in remappable format", ok);

    set_msi(msi, remappable_msi(7), 0, 1);
    edu_w(EDU_INTR_RAISE, 1);
    take_interrupts();
    ok = expect("IRTE 7 (another source ID) delivers", hits[V_MSI_BADSID], 0);
    ok &= expect_true("FSTS.PPF", vtd_r(VTD_FSTS) & FSTS_PPF);
    ok &= expect("record: reason (SID verification)", (vtd_rq(fro + 8) >> 32) & 0xFF, 0x26);
    vtd_w(fro + 12, 1u << 31);
    edu_w(EDU_INTR_ACK, ~0u);
    report("IRTE source-ID verification blocks another requester", ok);

    int before = hits[V_FAULT];
    set_msi(msi, 0xFEE00000u, V_COMPAT, 1);
    edu_w(EDU_INTR_RAISE, 1);
    take_interrupts();
    ok = expect("compatibility format without CFI", hits[V_COMPAT], 0);
    ok &= expect("record: reason (compatibility format blocked)", (vtd_rq(fro + 8) >> 32) & 0xFF, 0x25);
    ok &= expect("fault event", hits[V_FAULT], before + 1);
    vtd_w(fro + 12, 1u << 31);
    edu_w(EDU_INTR_ACK, ~0u);
    ok &= expect_true("CFI: CFIS", vtd_command(GCMD_CFI));
    edu_w(EDU_INTR_RAISE, 1);
    take_interrupts();
    ok &= expect("compatibility format with CFI", hits[V_COMPAT], 1);
    report("compatibility-format MSI: blocked, then passed with CFI", ok);

    /* ---- Queued invalidation ---- */
    vtd_wq(VTD_IQA, (uintptr_t)iq); /* QS 0: 256 descriptors of 128 bits */
    ok = expect_true("QIE: QIES", vtd_command(GCMD_QIE));
    ok &= expect("IQH after enable", vtd_rq(VTD_IQH), 0);
    wait_status = 0;
    iq[0] = 4 | 0;                                          /* IEC, global */
    iq[1] = 0;
    iq[2] = 5 | (1 << 5) | ((uint64_t)0xCAFE << 32);          /* wait, SW */
    iq[3] = (uintptr_t)&wait_status;
    vtd_wq(VTD_IQT, 2 << 4);
    for (int i = 0; i < 100000 && wait_status != 0xCAFE; i++)
        __asm__ volatile("pause");
    ok &= expect("invalidation wait status", wait_status, 0xCAFE);
    ok &= expect("IQH", vtd_rq(VTD_IQH), 2 << 4);
    iq[4] = 0xF; /* no such descriptor type */
    iq[5] = 0;
    vtd_wq(VTD_IQT, 3 << 4);
    ok &= expect_true("FSTS.IQE", vtd_r(VTD_FSTS) & FSTS_IQE);
    ok &= expect("IQH at the bad descriptor", vtd_rq(VTD_IQH), 2 << 4);
    report("queued invalidation: wait descriptor, invalid descriptor", ok);
    return 0;
}
