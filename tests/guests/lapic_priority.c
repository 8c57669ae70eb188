/* lapic_priority: interrupt priorities of the local APIC (Intel SDM vol. 3,
 * 11.8.3 "Task and Processor Priorities", 11.8.4 "Interrupt Acceptance",
 * 11.8.5 "Signaling Interrupt Servicing Completion", 11.9 "Spurious
 * Interrupt", 11.12 "Extended XAPIC (x2APIC)").
 *
 * The 8259As are masked; interrupts are self-IPIs. A pending interrupt is
 * given its chance with open_irq_window() (sti; out; cli, see hw.h): it is
 * taken then if and only if it is deliverable.
 *
 * Checks:
 *  - SVR: the spurious vector and the enable bit read back;
 *  - TPR: a self-IPI 0x40 stays in the IRR with TPR 0x50 and with TPR 0x40
 *    (same priority class: a vector is delivered only if its class is above
 *    the PPR's), and is delivered once TPR is 0x30; PPR follows the TPR when
 *    nothing is in service, and is the in-service class (0x40) inside the
 *    handler;
 *  - nesting: inside the handler of 0x80 (before its EOI), self-IPIs 0x90
 *    and 0x70: 0x90 (higher class) is taken as soon as the handler opens
 *    IF, 0x70 (lower class) waits in the IRR until 0x80's EOI; the ISR holds
 *    0x80 and 0x90 together while 0x90 is served, PPR is the in-service
 *    class; an EOI ends the highest in-service vector (0x90, then 0x80);
 *  - ICR: delivery status reads idle after a self-IPI;
 *  - x2APIC (CPUID.1:ECX[21]): IA32_APIC_BASE EXTD switches modes, the ID,
 *    version, SVR, derived LDR read through MSRs; SELF IPI MSR 0x83F, the
 *    ICR MSR 0x830 with a physical destination, with the self shorthand and
 *    with a logical (cluster) destination deliver their vectors; TPR MSR
 *    0x808 masks and PPR MSR 0x80A reflects it.
 */
#include "runtime.h"
#include "hw.h"

#define V_SPURIOUS 0xFF

static volatile int hits[256];
static volatile int log_len;
static volatile uint16_t event_log[16];
static volatile uint32_t ppr_in_40, ppr_in_80, ppr_in_90;
static volatile int isr80_in_80, isr80_in_90, isr90_in_90, isr90_after_eoi_in_90, isr80_after_eoi_in_90;
static volatile int irr70_in_80_before, irr70_in_80_after, irr90_in_80_before, isr90_in_80_after;

static void log_event(uint16_t e)
{
    if (log_len < 16)
        event_log[log_len] = e;
    log_len++;
}

static void generic_handler(struct frame *f)
{
    hits[f->vector & 0xFF]++;
    log_event((uint16_t)f->vector);
    if (f->vector == 0x40)
        ppr_in_40 = lapic_read(LAPIC_PPR);
    lapic_eoi();
}

static void spurious_handler(struct frame *f) { hits[f->vector & 0xFF]++; }

static void h80(struct frame *f)
{
    hits[0x80]++;
    log_event((uint16_t)f->vector);
    ppr_in_80 = lapic_read(LAPIC_PPR);
    isr80_in_80 = lapic_vec_bit(LAPIC_ISR, 0x80);
    lapic_self_ipi(0x90);
    lapic_self_ipi(0x70);
    irr90_in_80_before = lapic_vec_bit(LAPIC_IRR, 0x90);
    irr70_in_80_before = lapic_vec_bit(LAPIC_IRR, 0x70);
    open_irq_window(); /* 0x90 nests here; 0x70 must wait */
    irr70_in_80_after = lapic_vec_bit(LAPIC_IRR, 0x70);
    isr90_in_80_after = lapic_vec_bit(LAPIC_ISR, 0x90);
    log_event(0x100 | 0x80); /* "0x80 sends its EOI" */
    lapic_eoi();
}

static void h90(struct frame *f)
{
    hits[0x90]++;
    log_event((uint16_t)f->vector);
    ppr_in_90 = lapic_read(LAPIC_PPR);
    isr80_in_90 = lapic_vec_bit(LAPIC_ISR, 0x80);
    isr90_in_90 = lapic_vec_bit(LAPIC_ISR, 0x90);
    lapic_eoi();
    isr90_after_eoi_in_90 = lapic_vec_bit(LAPIC_ISR, 0x90);
    isr80_after_eoi_in_90 = lapic_vec_bit(LAPIC_ISR, 0x80);
}

static void check_svr(void)
{
    lapic_write(LAPIC_SVR, SVR_ENABLE | 0xEF);
    int ok = expect("SVR after writing 0x1EF", lapic_read(LAPIC_SVR), 0x1EF);
    lapic_enable(V_SPURIOUS);
    ok &= expect("SVR after writing 0x1FF", lapic_read(LAPIC_SVR), 0x1FF);
    report("SVR: APIC enable bit and spurious vector read back", ok);
}

static void check_tpr(void)
{
    lapic_write(LAPIC_TPR, 0x50);
    int ok = expect("TPR", lapic_read(LAPIC_TPR), 0x50);
    ok &= expect("PPR with TPR 0x50 and nothing in service", lapic_read(LAPIC_PPR), 0x50);
    lapic_self_ipi(0x40);
    ok &= expect("IRR bit 0x40 after the self-IPI", lapic_vec_bit(LAPIC_IRR, 0x40), 1);
    open_irq_window();
    int with50 = hits[0x40];
    lapic_write(LAPIC_TPR, 0x40);
    ok &= expect("PPR with TPR 0x40", lapic_read(LAPIC_PPR), 0x40);
    open_irq_window();
    int with40 = hits[0x40];
    ok &= expect("IRR bit 0x40 still set", lapic_vec_bit(LAPIC_IRR, 0x40), 1);
    lapic_write(LAPIC_TPR, 0x30);
    open_irq_window();
    int with30 = hits[0x40];
    ok &= expect("delivered with TPR 0x50", with50, 0);
    ok &= expect("delivered with TPR 0x40 (same class)", with40, 0);
    ok &= expect("delivered with TPR 0x30", with30, 1);
    ok &= expect("PPR in the handler (in-service class 4 above TPR class 3)", ppr_in_40, 0x40);
    ok &= expect("PPR after the EOI", lapic_read(LAPIC_PPR), 0x30);
    ok &= expect("IRR bit 0x40 after delivery", lapic_vec_bit(LAPIC_IRR, 0x40), 0);
    ok &= expect_true("ISR empty after the EOI", lapic_vec_none(LAPIC_ISR));
    report("TPR 0x50 and 0x40 hold self-IPI 0x40 in the IRR (IF=1); TPR 0x30 releases it; PPR follows TPR and ISR", ok);
    lapic_write(LAPIC_TPR, 0);
}

static void check_nesting(void)
{
    log_len = 0;
    lapic_self_ipi(0x80);
    open_irq_window();
    int taken_in_window = log_len;
    for (int i = 0; i < 3 && hits[0x70] == 0; i++)
        open_irq_window();

    int ok = expect("events after the first window (0x80, 0x90, 0x80's EOI, maybe 0x70)", taken_in_window >= 3, 1);
    ok &= expect("events in all", log_len, 4);
    ok &= expect("event 0", event_log[0], 0x80);
    ok &= expect("event 1 (0x90 nests inside 0x80)", event_log[1], 0x90);
    ok &= expect("event 2 (0x80 sends its EOI)", event_log[2], 0x180);
    ok &= expect("event 3 (0x70 only after 0x80's EOI)", event_log[3], 0x70);
    ok &= expect("0x90 pending in the 0x80 handler before IF=1", irr90_in_80_before, 1);
    ok &= expect("0x70 pending in the 0x80 handler before IF=1", irr70_in_80_before, 1);
    ok &= expect("0x70 still pending after 0x90 was served", irr70_in_80_after, 1);
    report("nesting: 0x90 (higher class) interrupts the 0x80 handler at once, 0x70 (lower) waits for 0x80's EOI", ok);

    ok = expect("0x80 in service in its handler", isr80_in_80, 1);
    ok &= expect("0x80 in service in the 0x90 handler", isr80_in_90, 1);
    ok &= expect("0x90 in service in its handler", isr90_in_90, 1);
    ok &= expect("PPR in the 0x80 handler", ppr_in_80, 0x80);
    ok &= expect("PPR in the 0x90 handler", ppr_in_90, 0x90);
    report("ISR: both 0x80 and 0x90 in service while 0x90 nests; PPR is the highest in-service class", ok);

    ok = expect("0x90 in service after the 0x90 handler's EOI", isr90_after_eoi_in_90, 0);
    ok &= expect("0x80 in service after the 0x90 handler's EOI", isr80_after_eoi_in_90, 1);
    ok &= expect("0x90 in service back in the 0x80 handler", isr90_in_80_after, 0);
    ok &= expect_true("ISR empty at the end", lapic_vec_none(LAPIC_ISR));
    ok &= expect_true("IRR empty at the end", lapic_vec_none(LAPIC_IRR));
    report("EOI ends the highest-priority vector in service: 0x90 first, then 0x80", ok);
}

static void check_icr_idle(void)
{
    lapic_self_ipi(0x41);
    int idle = 0;
    for (int i = 0; i < 100 && !idle; i++)
        idle = !(lapic_read(LAPIC_ICR_LO) & ICR_DELIVERY_STATUS);
    open_irq_window();
    int ok = expect("ICR delivery status idle", idle, 1);
    ok &= expect("vector 0x41 delivered", hits[0x41], 1);
    report("ICR: the delivery status bit reads idle after a self-IPI", ok);
}

static void check_x2apic(void)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!expect("CPUID.1:ECX bit 21 (x2APIC)", (c >> 21) & 1, 1)) {
        report("x2APIC mode", 0);
        return;
    }
    uint32_t version = lapic_read(LAPIC_VERSION);
    uint64_t base = rdmsr(MSR_APIC_BASE);
    int ok = expect("IA32_APIC_BASE (base, EN, BSP)", base & ~0xFFull, LAPIC_BASE | APIC_BASE_EN | (1u << 8));
    wrmsr(MSR_APIC_BASE, base | APIC_BASE_EXTD);
    lapic_x2apic_mode = 1;
    ok &= expect("IA32_APIC_BASE EXTD", (rdmsr(MSR_APIC_BASE) >> 10) & 1, 1);
    uint32_t id = (uint32_t)rdmsr(MSR_X2APIC(LAPIC_ID));
    ok &= expect("x2APIC ID of the BSP", id, 0);
    ok &= expect("version MSR", rdmsr(MSR_X2APIC(LAPIC_VERSION)), version);
    ok &= expect("SVR MSR", rdmsr(MSR_X2APIC(LAPIC_SVR)), 0x1FF);
    uint32_t ldr = ((id >> 4) << 16) | (1u << (id & 0xF));
    ok &= expect("LDR MSR (derived from the ID)", rdmsr(MSR_X2APIC(LAPIC_LDR)), ldr);
    report("x2APIC: IA32_APIC_BASE bit 10 switches modes; ID, version, SVR and LDR read through MSRs", ok);

    wrmsr(MSR_X2APIC_SELF_IPI, 0x50);
    open_irq_window();
    report("x2APIC SELF IPI MSR 0x83F delivers its vector", expect("vector 0x50", hits[0x50], 1));

    wrmsr(MSR_X2APIC(LAPIC_ICR_LO), ((uint64_t)id << 32) | ICR_ASSERT | ICR_DM_FIXED | 0x51);
    open_irq_window();
    wrmsr(MSR_X2APIC(LAPIC_ICR_LO), ICR_SELF | ICR_ASSERT | ICR_DM_FIXED | 0x52);
    open_irq_window();
    wrmsr(MSR_X2APIC(LAPIC_ICR_LO), ((uint64_t)ldr << 32) | ICR_DEST_LOGICAL | ICR_ASSERT | ICR_DM_FIXED | 0x53);
    open_irq_window();
    ok = expect("physical destination = own x2APIC ID, vector 0x51", hits[0x51], 1);
    ok &= expect("self shorthand, vector 0x52", hits[0x52], 1);
    ok &= expect("logical destination = own LDR, vector 0x53", hits[0x53], 1);
    report("x2APIC ICR MSR 0x830: physical, self-shorthand and logical destinations deliver", ok);

    wrmsr(MSR_X2APIC(LAPIC_TPR), 0x60);
    wrmsr(MSR_X2APIC_SELF_IPI, 0x55);
    open_irq_window();
    int held = hits[0x55];
    uint64_t ppr = rdmsr(MSR_X2APIC(LAPIC_PPR));
    wrmsr(MSR_X2APIC(LAPIC_TPR), 0);
    open_irq_window();
    ok = expect("delivered with TPR 0x60", held, 0);
    ok &= expect("PPR MSR with TPR 0x60", ppr, 0x60);
    ok &= expect("delivered with TPR 0", hits[0x55], 1);
    report("x2APIC TPR MSR 0x808 holds a self-IPI below its class; PPR MSR 0x80A reflects it", ok);
}

int main(void)
{
    for (unsigned v = 0x30; v < 0xF0; v++)
        set_handler(v, generic_handler);
    set_handler(0x80, h80);
    set_handler(0x90, h90);
    set_handler(V_SPURIOUS, spurious_handler);
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    lapic_enable(V_SPURIOUS);

    check_svr();
    check_tpr();
    check_nesting();
    check_icr_idle();
    check_x2apic();

    int others = 0;
    for (unsigned v = 0; v < 256; v++)
        if (v != 0x40 && v != 0x41 && v != 0x50 && v != 0x51 && v != 0x52 && v != 0x53 && v != 0x55 &&
            v != 0x70 && v != 0x80 && v != 0x90)
            others += hits[v];
    report("no other vector and no spurious interrupt", expect("other interrupts", others, 0));
    return 0;
}
