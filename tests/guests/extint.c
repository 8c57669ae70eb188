/* extint: the 8259A through the local APIC in virtual-wire mode (Intel SDM
 * vol. 3, 11.5.1 "Local Vector Table": LVT LINT0 delivery mode 111b ExtINT;
 * 11.8.4 step 2 / 11.8.5: ExtINT goes to the processor directly, without
 * the IRR/ISR, and its handler must not EOI the local APIC; MultiProcessor
 * Specification 1.4, 3.6.2.2 "Virtual Wire Mode").
 *
 * The xAPIC is enabled with LVT LINT0 = ExtINT (0x700), every IOAPIC entry
 * masked, the PIC remapped to 0x20 / 0x28 with only IRQ 0 unmasked, the PIT
 * counter 0 in mode 2 at ~1 kHz. The handler ends each tick with a
 * non-specific EOI to the PIC only.
 *
 * Checks:
 *  - PIT ticks arrive through the PIC with vector 0x20; the LAPIC has
 *    nothing in service in the handler nor after (no LAPIC EOI needed);
 *  - ExtINT is not subject to the LAPIC's task priority: ticks arrive with
 *    TPR = 0xF0;
 *  - masking LVT LINT0 (bit 16) stops them while the PIT keeps reloading
 *    (the request waits in the PIC's IRR); unmasking delivers it.
 */
#include "runtime.h"
#include "hw.h"

#define VEC_BASE 0x20
#define PIT_1KHZ 1193

static volatile int ticks, others;
static volatile int lapic_isr_busy, pic_isr_bad;

static void irq0_handler(struct frame *f)
{
    (void)f;
    ticks++;
    if (!lapic_vec_none(LAPIC_ISR))
        lapic_isr_busy++;
    if (pic_read_isr(PIC1_CMD) != 0x01)
        pic_isr_bad++;
    outb(PIC1_CMD, OCW2_EOI);
}

static void other_handler(struct frame *f)
{
    (void)f;
    others++;
    outb(PIC2_CMD, OCW2_EOI);
    outb(PIC1_CMD, OCW2_EOI);
}

static void take_ticks(int n)
{
    int start = ticks + others;
    for (int i = 0; i < 100 && ticks + others < start + n; i++)
        wait_irq();
}

int main(void)
{
    for (unsigned v = VEC_BASE; v < VEC_BASE + 16; v++)
        set_handler(v, other_handler);
    set_handler(VEC_BASE, irq0_handler);

    ioapic_mask_all();
    pic_init(VEC_BASE, VEC_BASE + 8, ICW4_8086, 0xFF, 0xFF);
    lapic_enable(0xFF);
    lapic_write(LAPIC_LVT_LINT0, LVT_DM_EXTINT);
    int ok = expect("LVT LINT0", lapic_read(LAPIC_LVT_LINT0), LVT_DM_EXTINT);
    outb(PIC1_DATA, 0xFE);
    pit_program(0, 2, PIT_1KHZ);

    take_ticks(5);
    ok &= expect("ticks with vector 0x20", ticks >= 5, 1);
    ok &= expect("other vectors", others, 0);
    ok &= expect("PIC ISR not 0x01 in the handler", pic_isr_bad, 0);
    ok &= expect("LAPIC ISR not empty in the handler", lapic_isr_busy, 0);
    ok &= expect_true("LAPIC ISR empty after the ticks", lapic_vec_none(LAPIC_ISR));
    ok &= expect("PPR", lapic_read(LAPIC_PPR), 0);
    report("virtual wire: PIT ticks arrive through the PIC and LVT LINT0 (ExtINT) as 0x20, PIC EOI only", ok);

    lapic_write(LAPIC_TPR, 0xF0);
    int before = ticks;
    take_ticks(3);
    lapic_write(LAPIC_TPR, 0);
    ok = expect("ticks with TPR 0xF0", ticks - before >= 3, 1);
    ok &= expect("other vectors", others, 0);
    report("ExtINT is not held back by the TPR (0xF0)", ok);

    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED | LVT_DM_EXTINT);
    open_irq_window();
    before = ticks;
    int reloads = pit_wait_reloads(0, 3, 1);
    int masked = ticks - before;
    uint8_t irr = pic_read_irr(PIC1_CMD);
    lapic_write(LAPIC_LVT_LINT0, LVT_DM_EXTINT);
    open_irq_window();
    int unmasked = ticks - before;
    ok = expect("PIT reloads seen", reloads, 3);
    ok &= expect("ticks with LINT0 masked", masked, 0);
    ok &= expect("PIC IRR bit 0 while LINT0 is masked", irr & 1, 1);
    ok &= expect("delivered right after unmasking LINT0", unmasked >= 1, 1);
    ok &= expect("other vectors", others, 0);
    report("LVT LINT0 masked (bit 16): no ticks, the request waits in the PIC; unmasking delivers it", ok);

    outb(PIC1_DATA, 0xFF);
    return 0;
}
