/* pic_pit32: pic_pit in 32-bit protected mode (runtime32): the 8259A pair
 * driven by the 8254's counter 0 (ISA IRQ 0), delivered through 32-bit
 * interrupt gates. The checks are pic_pit's, plus one on the 32-bit frame
 * of a tick (SDM vol. 3, 6.12.1: EIP, CS, EFLAGS pushed on the current
 * stack, IF cleared by an interrupt gate).
 *
 * What follows is pic_pit's description.
 *
 * The PIC is re-initialized with vector bases 0x20 / 0x28 (ICW1-ICW4) and
 * only IRQ 0 unmasked; counter 0 runs in mode 2 (rate generator) at about
 * 1 kHz. The LAPIC stays as the firmware left it (LVT LINT0 = ExtINT, the
 * virtual-wire mode), so the master's INT reaches the processor.
 *
 * Checks (Intel 8259A datasheet, "Interrupt Sequence", OCW2 / OCW3, ICW4):
 *  - ticks arrive with vector ICW2 | 0 = 0x20, nothing else arrives;
 *  - inside the handler, before the EOI, OCW3 read-ISR shows bit 0; after a
 *    non-specific EOI it is clear;
 *  - while IRQ 0 is in service (no EOI), further IRQ 0 requests are held
 *    in the IRR and not delivered; the EOI releases the held one;
 *  - with IRQ 0 masked in the IMR the request is latched in the IRR (OCW3
 *    read-IRR) and not delivered; unmasking delivers it;
 *  - a specific EOI for another level leaves IR0 in service; the specific
 *    EOI for level 0 clears it;
 *  - automatic EOI mode (ICW4 AEOI): no EOI is needed, the ISR reads 0 in
 *    the handler and ticks keep coming.
 * "Waiting" for a number of PIT periods polls the PIT's count through the
 * counter latch command until it has reloaded: the device's own time.
 */
#include "runtime32.h"
#include "pic_pit.h"

#define VEC_BASE 0x20
#define PIT_1KHZ 1193 /* 1193182 / 1193 = 1000.15 Hz */

enum eoi_mode { EOI_NONSPECIFIC, EOI_SPECIFIC, EOI_NONE };

static volatile enum eoi_mode mode;
static volatile int ticks;     /* IRQ 0 handler runs */
static volatile int others;    /* any other vector in 0x20-0x2F */
static volatile uint32_t other_vec;
static volatile uint8_t isr_in, isr_after_eoi, isr_after_wrong_eoi;
static volatile int isr_in_bad, isr_after_bad; /* handler runs where the ISR was not as expected */

/* The frame of the last tick. */
static volatile uint32_t tick_eip, tick_cs, tick_eflags, tick_frame_addr, tick_handler_eflags;

static void irq0_handler(struct frame *f)
{
    ticks++;
    tick_eip = f->eip;
    tick_cs = f->cs;
    tick_eflags = f->eflags;
    tick_frame_addr = (uint32_t)(uintptr_t)&f->eip;
    tick_handler_eflags = read_eflags();
    uint8_t in = pic_read_isr(PIC1_CMD);
    isr_in = in;
    switch (mode) {
    case EOI_NONSPECIFIC:
        if (in != 0x01)
            isr_in_bad++;
        outb(PIC1_CMD, OCW2_EOI);
        isr_after_eoi = pic_read_isr(PIC1_CMD);
        if (isr_after_eoi != 0)
            isr_after_bad++;
        break;
    case EOI_SPECIFIC:
        if (in != 0x01)
            isr_in_bad++;
        outb(PIC1_CMD, OCW2_SEOI | 1); /* level 1 is not in service */
        isr_after_wrong_eoi = pic_read_isr(PIC1_CMD);
        outb(PIC1_CMD, OCW2_SEOI | 0);
        isr_after_eoi = pic_read_isr(PIC1_CMD);
        if (isr_after_wrong_eoi != 0x01 || isr_after_eoi != 0)
            isr_after_bad++;
        break;
    case EOI_NONE:
        break;
    }
}

static void other_handler(struct frame *f)
{
    others++;
    other_vec = f->vector;
    /* End whatever is in service so one stray IRQ cannot block the rest. */
    outb(PIC2_CMD, OCW2_EOI);
    outb(PIC1_CMD, OCW2_EOI);
}

/* Takes n interrupts with sti; hlt; cli. Only IRQ 0 is unmasked, so each
 * wake-up is a tick (or a stray vector, which is counted separately). */
static void take_ticks(int n)
{
    int start = ticks + others;
    for (int i = 0; i < 100 && ticks + others < start + n; i++)
        wait_irq();
}

/* Reads the master's IRR until bit 0 shows the held-back request, waiting
 * one PIT reload (interrupt windows open) between reads, at most 100: the
 * request may reach the PIC later than the counter's reload is visible
 * (under QEMU the PIT's edge comes from a timer of the main loop, which a
 * loaded host runs milliseconds late, while the count is computed at the
 * read). Returns the last IRR read. */
static uint8_t wait_irr0(void)
{
    uint8_t irr = pic_read_irr(PIC1_CMD);
    for (int i = 0; i < 100 && !(irr & 1); i++) {
        pit_wait_reloads(0, 1, 1);
        irr = pic_read_irr(PIC1_CMD);
    }
    return irr;
}

static void reset_counts(enum eoi_mode m)
{
    mode = m;
    ticks = others = 0;
    isr_in_bad = isr_after_bad = 0;
}

/* sti; hlt (the STI shadow covers the HLT, so a tick already pending wakes
 * it), with ESP and EFLAGS stored just before (EFLAGS with IF = 0: the STI
 * sets it). */
volatile uint32_t tick_snap_esp, tick_snap_eflags;
__asm__(".text\ntick_wait:\n"
        "pushfl\npopl tick_snap_eflags\nmovl %esp, tick_snap_esp\n"
        "sti\n"
        "hlt\n"
        ".globl tick_wait_after\ntick_wait_after:\n"
        "cli\nret\n");
extern char tick_wait_after[];

int main(void)
{
    for (unsigned v = VEC_BASE; v < VEC_BASE + 16; v++)
        set_handler(v, other_handler);
    set_handler(VEC_BASE, irq0_handler);

    /* The IOAPIC stays masked (its reset state); LINT0 as the firmware left
     * it: ExtINT, so the master's INT is the processor's INTR. */
    pic_init(VEC_BASE, VEC_BASE + 8, ICW4_8086, 0xFF, 0xFF);
    int ok = expect("IMR master", inb(PIC1_DATA), 0xFF);
    ok &= expect("IMR slave", inb(PIC2_DATA), 0xFF);
    outb(PIC1_DATA, 0xFE);
    ok &= expect("IMR master after OCW1 0xFE", inb(PIC1_DATA), 0xFE);
    report("ICW1-ICW4 then OCW1: the IMR reads back", ok);

    pit_program(0, 2, PIT_1KHZ);

    /* 1. Ticks arrive as vector 0x20. */
    reset_counts(EOI_NONSPECIFIC);
    take_ticks(5);
    ok = expect("IRQ 0 handler runs", ticks >= 5, 1);
    ok &= expect("other vectors", others, 0);
    if (others)
        printf("  stray vector 0x%x\n", other_vec);
    report("PIT mode 2 at 1 kHz: IRQ 0 arrives with vector 0x20 (ICW2 base | 0)", ok);

    /* 2. ISR during and after service. */
    ok = expect("runs with ISR != 0x01 before the EOI", isr_in_bad, 0);
    ok &= expect("runs with ISR != 0 after the EOI", isr_after_bad, 0);
    ok &= expect("ticks", ticks >= 1, 1);
    report("OCW3 read-ISR: bit 0 set in the handler before the EOI, clear after a non-specific EOI", ok);

    /* 2b. The 32-bit frame of a tick taken at a HLT. */
    tick_eip = 0;
    int before = ticks;
    __asm__ volatile("call tick_wait" ::: "memory", "eax");
    /* At least one: a second tick may come between the handler's IRET and
     * the CLI on a slow host; its frame is the same (EIP = the CLI). */
    ok = expect("ticks", ticks - before >= 1, 1);
    ok &= expect("EIP (after the HLT)", tick_eip, (uint32_t)(uintptr_t)tick_wait_after);
    ok &= expect("CS", tick_cs, SEL_KERNEL_CODE);
    ok &= expect("EFLAGS image", tick_eflags, tick_snap_eflags | EFLAGS_IF);
    ok &= expect("IF in the handler", tick_handler_eflags & EFLAGS_IF, 0);
    ok &= expect("saved EIP at (interrupted ESP - 12)", tick_frame_addr, tick_snap_esp - 12);
    report("32-bit interrupt gate: EIP after the HLT, CS, EFLAGS image with IF=1 on the same stack; IF=0 in the handler", ok);

    /* 3. An IRQ in service holds back the next request of its level. */
    reset_counts(EOI_NONE);
    take_ticks(1);
    int first = ticks;
    uint8_t isr_held = pic_read_isr(PIC1_CMD);
    int reloads = pit_wait_reloads(0, 3, 1);
    uint8_t irr_held = wait_irr0();
    int held_ticks = ticks;
    outb(PIC1_CMD, OCW2_EOI);
    open_irq_window();
    int after_eoi = ticks;
    ok = expect("ticks before", first, 1);
    ok &= expect("ISR while held", isr_held, 0x01);
    ok &= expect("PIT reloads seen", reloads, 3);
    ok &= expect("ticks while IR0 in service", held_ticks, 1);
    ok &= expect("IRR bit 0 while in service", irr_held & 1, 1);
    ok &= expect("ticks after the EOI", after_eoi >= 2, 1);
    report("IR0 in service (no EOI): the next IRQ 0 waits in the IRR, the EOI releases it", ok);
    /* The released tick is in service now: end it. */
    outb(PIC1_CMD, OCW2_EOI);

    /* 4. Masked in the IMR: latched in the IRR, not delivered. */
    reset_counts(EOI_NONSPECIFIC);
    outb(PIC1_DATA, 0xFF);
    open_irq_window(); /* take a tick that was already on its way */
    int before_mask = ticks;
    reloads = pit_wait_reloads(0, 3, 1);
    uint8_t irr_masked = wait_irr0();
    int masked_ticks = ticks - before_mask;
    uint8_t isr_masked = pic_read_isr(PIC1_CMD);
    outb(PIC1_DATA, 0xFE);
    open_irq_window();
    int unmasked_ticks = ticks - before_mask;
    ok = expect("PIT reloads seen", reloads, 3);
    ok &= expect("ticks while masked", masked_ticks, 0);
    ok &= expect("IRR bit 0 while masked", irr_masked & 1, 1);
    ok &= expect("ISR while masked", isr_masked, 0);
    ok &= expect("delivered right after unmasking", unmasked_ticks >= 1, 1);
    ok &= expect("other vectors", others, 0);
    report("IMR bit 0 set: IRQ 0 latched in the IRR (OCW3 read-IRR), not delivered; unmasking delivers it", ok);

    /* 5. Specific EOI. */
    reset_counts(EOI_SPECIFIC);
    take_ticks(3);
    ok = expect("ticks", ticks >= 3, 1);
    ok &= expect("runs with ISR != 0x01 in the handler", isr_in_bad, 0);
    ok &= expect("runs with a wrong ISR after the specific EOIs", isr_after_bad, 0);
    ok &= expect("ISR after a specific EOI for level 1", isr_after_wrong_eoi, 0x01);
    ok &= expect("ISR after a specific EOI for level 0", isr_after_eoi, 0);
    report("specific EOI (OCW2 0x60 | L): level 1 leaves IR0 in service, level 0 ends it", ok);

    /* 6. Automatic EOI. ICW1 clears the IMR and the ISR; the masks are
     * written again after ICW4. */
    pic_init(VEC_BASE, VEC_BASE + 8, ICW4_8086 | ICW4_AEOI, 0xFE, 0xFF);
    reset_counts(EOI_NONE);
    isr_in = 0xAA;
    take_ticks(5);
    uint8_t isr_after_aeoi = pic_read_isr(PIC1_CMD);
    ok = expect("ticks without any EOI", ticks >= 5, 1);
    ok &= expect("ISR in the handler", isr_in, 0);
    ok &= expect("ISR after the ticks", isr_after_aeoi, 0);
    ok &= expect("other vectors", others, 0);
    report("ICW4 AEOI: ticks keep coming without an EOI, the ISR stays 0", ok);

    /* Leave IRQ 0 masked and the PIC in normal EOI mode. */
    pic_init(VEC_BASE, VEC_BASE + 8, ICW4_8086, 0xFF, 0xFF);
    return 0;
}
