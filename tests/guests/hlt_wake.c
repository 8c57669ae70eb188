/* hlt_wake: HLT ends with an interrupt (Intel SDM vol. 2, HLT: "An enabled
 * interrupt (including NMI and SMI), a debug exception, the BINIT#, INIT#
 * or RESET# signal will resume execution"; the saved RIP is the instruction
 * after the HLT). Each check runs `sti; hlt; L: cli; ret` (the STI shadow
 * covers the HLT, so an interrupt cannot slip in before it) and the handler
 * records the saved RIP.
 *
 * Checks:
 *  - the PIT left as the firmware programs it (counter 0 at 18.2 Hz, count
 *    65536: the read-back status says mode 2 or 3, LSB then MSB, binary;
 *    SeaBIOS uses mode 2), the PIC
 *    remapped to 0x20 with only IRQ 0 unmasked, the LAPIC as at entry
 *    (virtual wire: LVT LINT0 ExtINT): HLT is woken by IRQ 0, vector 0x20,
 *    RIP after the HLT;
 *  - the LAPIC timer in one-shot mode (1 ms) wakes HLT: its vector, RIP
 *    after the HLT;
 *  - an interrupt already pending when `sti; hlt` runs wakes the HLT at
 *    once (taken with RIP after the HLT, not before it).
 */
#include "runtime.h"
#include "hw.h"

static volatile int hits[256];
static volatile uint64_t last_vector, last_rip;

static void pic_handler(struct frame *f)
{
    hits[f->vector & 0xFF]++;
    last_vector = f->vector;
    last_rip = f->rip;
    outb(PIC2_CMD, OCW2_EOI);
    outb(PIC1_CMD, OCW2_EOI);
}

static void apic_handler(struct frame *f)
{
    hits[f->vector & 0xFF]++;
    last_vector = f->vector;
    last_rip = f->rip;
    lapic_eoi();
}

__asm__(".text\n.globl sti_hlt\nsti_hlt:\n\tsti\n\thlt\n.globl sti_hlt_after\nsti_hlt_after:\n\tcli\n\tret\n");
void sti_hlt(void);
extern char sti_hlt_after[];

static int total(void)
{
    int n = 0;
    for (int i = 0; i < 256; i++)
        n += hits[i];
    return n;
}

static void clear(void)
{
    for (int i = 0; i < 256; i++)
        hits[i] = 0;
    last_vector = last_rip = ~0ull;
}

int main(void)
{
    for (unsigned v = 0x20; v < 0x30; v++)
        set_handler(v, pic_handler);
    for (unsigned v = 0x40; v < 0x50; v++)
        set_handler(v, apic_handler);
    set_handler(0xFF, apic_handler);

    /* 1. PIT at its firmware default, through the PIC in virtual-wire mode. */
    outb(PIT_CW, 0xE2); /* read-back: status of counter 0 */
    uint8_t st = inb(PIT_CH0);
    uint32_t lint0 = lapic_read(LAPIC_LVT_LINT0);
    pic_init(0x20, 0x28, ICW4_8086, 0xFE, 0xFF);
    clear();
    sti_hlt();
    /* Mode 2 or 3 (SeaBIOS programs mode 2), LSB then MSB, binary; LINT0
     * ExtINT and unmasked (SeaBIOS also sets the level bit, ExtINT is level
     * sensitive whatever it says). */
    int ok = expect_true("PIT counter 0 in mode 2 or 3, RW 3, binary", (st & 0x3F) == 0x34 || (st & 0x3F) == 0x36);
    ok &= expect("LVT LINT0 at entry (ExtINT, unmasked)", lint0 & 0x10700, LVT_DM_EXTINT);
    ok &= expect("interrupts", total(), 1);
    ok &= expect("vector", last_vector, 0x20);
    ok &= expect("saved RIP (after the HLT)", last_rip, (uint64_t)(uintptr_t)sti_hlt_after);
    report("HLT with IF=1, PIT at the 18.2 Hz default: woken by IRQ 0 (vector 0x20), RIP after the HLT", ok);
    outb(PIC1_DATA, 0xFF);

    /* 2. LAPIC one-shot timer. */
    lapic_enable(0xFF);
    lapic_write(LAPIC_TIMER_DIVIDE, 0x3);    /* divide by 16 */
    lapic_write(LAPIC_LVT_TIMER, 0x40);      /* one-shot, vector 0x40 */
    clear();
    lapic_write(LAPIC_TIMER_INITIAL, 62500); /* 1 ms */
    sti_hlt();
    ok = expect("interrupts", total(), 1);
    ok &= expect("vector", last_vector, 0x40);
    ok &= expect("saved RIP (after the HLT)", last_rip, (uint64_t)(uintptr_t)sti_hlt_after);
    ok &= expect("current count", lapic_read(LAPIC_TIMER_CURRENT), 0);
    report("HLT with IF=1 woken by the LAPIC one-shot timer: its vector, RIP after the HLT", ok);

    /* 3. Already pending. */
    clear();
    lapic_self_ipi(0x41);
    sti_hlt();
    ok = expect("interrupts", total(), 1);
    ok &= expect("vector", last_vector, 0x41);
    ok &= expect("saved RIP (after the HLT)", last_rip, (uint64_t)(uintptr_t)sti_hlt_after);
    report("sti; hlt with an interrupt already pending: the HLT ends at once, RIP after the HLT", ok);
    return 0;
}
