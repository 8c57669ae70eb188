/* nmi: non-maskable interrupts from the local APIC (Intel SDM vol. 3,
 * 6.7 "Nonmaskable Interrupt (NMI)", 6.7.1 "Handling Multiple NMIs",
 * 11.6.1 "Interrupt Command Register": delivery mode 100b NMI, the vector
 * field is ignored).
 *
 * NMIs are self-IPIs with the ICR's "self" shorthand and delivery mode NMI
 * (LVT LINT1 has no NMI source on this machine). Interrupts stay disabled
 * (IF = 0) throughout. We never HLT while waiting for an NMI: a VMM may hold
 * a queued NMI where its HLT handling cannot see it; instead we make exits
 * (port writes to the ignored POST port 0x80), at which pending events are
 * injected.
 *
 * Checks:
 *  - an NMI self-IPI is taken with IF = 0 (vector 2; the saved RFLAGS has
 *    IF clear), and with the TPR at 0xF0 (the TPR does not apply to NMIs);
 *  - NMI blocking: a second NMI sent from inside the NMI handler is not
 *    delivered while the handler runs (the handler never nests: nesting
 *    depth stays 1, the count seen inside stays 1); it is delivered after
 *    the handler's IRETQ (the total becomes 2);
 *  - no LAPIC ISR bit is set by an NMI (it bypasses the IRR/ISR: no EOI).
 */
#include "runtime.h"
#include "hw.h"

#define ICR_NMI_SELF (ICR_SELF | ICR_ASSERT | ICR_DM_NMI)

static volatile int nmis, depth, max_depth;
static volatile int resend_in_handler;
static volatile int count_at_handler_end;
static volatile uint64_t nmi_rflags;
static volatile int isr_empty_in_handler;

static void nmi_handler(struct frame *f)
{
    depth++;
    if (depth > max_depth)
        max_depth = depth;
    nmis++;
    nmi_rflags = f->rflags;
    isr_empty_in_handler = lapic_vec_none(LAPIC_ISR);
    if (resend_in_handler) {
        resend_in_handler = 0;
        lapic_write(LAPIC_ICR_LO, ICR_NMI_SELF);
        /* Exits at which a VMM could inject the second NMI (it must not:
         * NMIs are blocked until the IRET). */
        for (int i = 0; i < 50; i++)
            outb(0x80, 0);
        count_at_handler_end = nmis;
    }
    depth--;
}

/* Makes exits until `n` NMIs have been seen (or 1000 exits went by). */
static void exits_until(int n)
{
    for (int i = 0; i < 1000 && nmis < n; i++)
        outb(0x80, 0);
}

int main(void)
{
    set_handler(2, nmi_handler);
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    lapic_enable(0xFF);

    /* 1. With IF = 0. */
    lapic_write(LAPIC_ICR_LO, ICR_NMI_SELF);
    exits_until(1);
    int ok = expect("NMIs", nmis, 1);
    ok &= expect("saved RFLAGS.IF", (nmi_rflags >> 9) & 1, 0);
    ok &= expect("IF now", (read_rflags() >> 9) & 1, 0);
    ok &= expect("LAPIC ISR empty in the handler", isr_empty_in_handler, 1);
    report("NMI self-IPI (ICR delivery mode NMI): vector 2 runs with IF=0, no ISR bit", ok);

    /* 2. With the TPR at its highest class. */
    nmis = 0;
    lapic_write(LAPIC_TPR, 0xF0);
    lapic_write(LAPIC_ICR_LO, ICR_NMI_SELF);
    exits_until(1);
    lapic_write(LAPIC_TPR, 0);
    report("NMI is delivered with TPR 0xF0 (the TPR does not apply to NMIs)", expect("NMIs", nmis, 1));

    /* 3. NMI blocking until IRET. */
    nmis = depth = max_depth = 0;
    count_at_handler_end = -1;
    resend_in_handler = 1;
    lapic_write(LAPIC_ICR_LO, ICR_NMI_SELF);
    exits_until(2);
    ok = expect("NMIs seen by the end of the first handler", count_at_handler_end, 1);
    ok &= expect("maximum nesting depth", max_depth, 1);
    ok &= expect("NMIs in all (the second after the IRETQ)", nmis, 2);
    report("NMI blocking: an NMI sent inside the NMI handler waits for its IRETQ, then is delivered", ok);

    outb(0x80, 0);
    report("no further NMI", expect("NMIs", nmis, 2));
    return 0;
}
