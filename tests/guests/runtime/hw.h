/* Tandem test-guest runtime: the PC's interrupt hardware, for the interrupt
 * guests. Header-only helpers for the 8259A pair, the 8254 PIT and port
 * 0x61, the xAPIC / x2APIC local APIC, the IOAPIC, and waiting for
 * interrupts. Everything is written from the datasheets / the SDM:
 *  - Intel 8259A datasheet (ICW1-ICW4, OCW1-OCW3);
 *  - Intel 8254 datasheet (control word, counter latch, read-back);
 *  - Intel SDM vol. 3, chapter "Advanced Programmable Interrupt Controller"
 *    (xAPIC page at 0xFEE00000, x2APIC MSRs 0x800 + (offset >> 4));
 *  - Intel 82093AA IOAPIC datasheet (IOREGSEL / IOWIN, redirection table).
 *
 * Waiting: on a KVM host that emulates ring-0 code (PVM) a spinning vCPU
 * takes an interrupt late, so the guests wait with `sti; hlt; cli`
 * (wait_irq): the STI shadow covers the HLT, so an interrupt that is already
 * pending wakes the HLT instead of being taken before it.
 */
#ifndef TANDEM_GUEST_HW_H
#define TANDEM_GUEST_HW_H

#include "runtime.h"

/* ---- Checks -------------------------------------------------------------- */
/* Prints "  what: got 0x.., expected 0x.." when they differ; returns got ==
 * want. A check combines several expect()s and then report()s. */
int expect(const char *what, uint64_t got, uint64_t want);
/* The same for a condition: prints "  what" when it does not hold. */
int expect_true(const char *what, int cond);

/* ---- Waiting for interrupts ---------------------------------------------- */
/* sti; hlt; cli: sleeps until one interrupt has been taken (the handler runs
 * at the HLT's next RIP), then returns with IF = 0 again. */
static inline void wait_irq(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }
/* sti; out %al, $0x80; cli: lets in an interrupt that is pending and
 * deliverable now, without waiting for a new one; one that is held back
 * (masked, TPR, in-service priority) stays pending. The OUT to the ignored
 * POST port sits in the STI shadow and ends in an exit, at which IF = 1 and
 * no shadow is left, so a VMM injects there even when its interrupt-window
 * exits come late (PVM); the handler then runs with the saved RIP at the
 * CLI. A NOP in the shadow instead would usually reach the CLI first on
 * such a host. */
static inline void open_irq_window(void) { __asm__ volatile("sti; outb %%al, $0x80; cli" ::: "memory"); }

/* ---- 8259A pair ------------------------------------------------------------ */
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xA0
#define PIC2_DATA 0xA1
#define ELCR1 0x4D0
#define ELCR2 0x4D1

#define ICW1_INIT 0x10 /* D4 = 1: ICW1 */
#define ICW1_IC4 0x01  /* an ICW4 follows */
#define ICW4_8086 0x01 /* uPM: 8086/8088 mode */
#define ICW4_AEOI 0x02 /* automatic EOI */
#define OCW2_EOI 0x20  /* non-specific EOI */
#define OCW2_SEOI 0x60 /* specific EOI, L2-L0 = level */
#define OCW3_READ_IRR 0x0A
#define OCW3_READ_ISR 0x0B

/* Initializes both chips (ICW1-ICW4, cascade on IR2, slave ID 2) with the
 * given vector bases and ICW4 (ICW4_8086, optionally | ICW4_AEOI), then
 * writes the masks (OCW1). */
static inline void pic_init(uint8_t master_base, uint8_t slave_base, uint8_t icw4, uint8_t mask1, uint8_t mask2)
{
    outb(PIC1_CMD, ICW1_INIT | ICW1_IC4);
    outb(PIC2_CMD, ICW1_INIT | ICW1_IC4);
    outb(PIC1_DATA, master_base);
    outb(PIC2_DATA, slave_base);
    outb(PIC1_DATA, 1 << 2); /* ICW3 master: a slave on IR2 */
    outb(PIC2_DATA, 2);      /* ICW3 slave: ID 2 */
    outb(PIC1_DATA, icw4);
    outb(PIC2_DATA, icw4);
    outb(PIC1_DATA, mask1);
    outb(PIC2_DATA, mask2);
}
static inline void pic_mask_all(void)
{
    outb(PIC1_DATA, 0xFF);
    outb(PIC2_DATA, 0xFF);
}
static inline uint8_t pic_read_irr(uint16_t cmd)
{
    outb(cmd, OCW3_READ_IRR);
    return inb(cmd);
}
static inline uint8_t pic_read_isr(uint16_t cmd)
{
    outb(cmd, OCW3_READ_ISR);
    uint8_t v = inb(cmd);
    outb(cmd, OCW3_READ_IRR); /* back to the power-on read selection */
    return v;
}

/* ---- 8254 PIT and port 0x61 ------------------------------------------------ */
#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_CW 0x43
#define PORT61 0x61
#define P61_GATE2 0x01
#define P61_SPEAKER 0x02
#define P61_OUT2 0x20
#define PIT_HZ 1193182u

/* Control word: SC (counter) in 7:6, RW in 5:4 (1 LSB, 2 MSB, 3 LSB then
 * MSB, 0 latch), mode in 3:1, BCD in 0. */
#define PIT_CWORD(ch, rw, mode, bcd) ((uint8_t)(((ch) << 6) | ((rw) << 4) | ((mode) << 1) | (bcd)))
#define PIT_RW_LSB 1
#define PIT_RW_MSB 2
#define PIT_RW_BOTH 3

/* Programs counter ch (0-2) in mode with a 16-bit count, LSB then MSB. */
static inline void pit_program(unsigned ch, unsigned mode, uint16_t count)
{
    outb(PIT_CW, PIT_CWORD(ch, PIT_RW_BOTH, mode, 0));
    outb((uint16_t)(PIT_CH0 + ch), (uint8_t)count);
    outb((uint16_t)(PIT_CH0 + ch), (uint8_t)(count >> 8));
}
/* Counter latch command, then the latched count (LSB, MSB): for counters
 * in the LSB-then-MSB access mode. */
static inline uint16_t pit_latch_read(unsigned ch)
{
    outb(PIT_CW, (uint8_t)(ch << 6));
    uint8_t lo = inb((uint16_t)(PIT_CH0 + ch));
    uint8_t hi = inb((uint16_t)(PIT_CH0 + ch));
    return (uint16_t)(lo | (hi << 8));
}

/* Polls counter `ch` (in a periodic mode, LSB-then-MSB access) with the
 * counter latch command until it has reloaded `reloads` times (a latched
 * count larger than the previous one), calling open_irq_window() between
 * reads if `windows` (so a deliverable interrupt would be taken meanwhile).
 * Returns the reloads seen. This waits on the PIT's own time, however fast
 * or slow the processor runs: it gives up only once the counter has counted
 * down more than (reloads + 2) * 65536 clocks (which a reloading counter
 * never does without `reloads` reloads) or has not moved in 10^6 reads. */
static inline int pit_wait_reloads(unsigned ch, int reloads, int windows)
{
    int seen = 0;
    uint32_t counted = 0, stalled = 0;
    uint32_t limit = (uint32_t)(reloads + 2) * 65536u;
    uint16_t prev = pit_latch_read(ch);
    while (seen < reloads && counted < limit && stalled < 1000000) {
        if (windows)
            open_irq_window();
        uint16_t c = pit_latch_read(ch);
        if (c > prev) {
            seen++;
            counted += prev;
        } else {
            counted += (uint32_t)(prev - c);
        }
        stalled = c == prev ? stalled + 1 : 0;
        prev = c;
    }
    return seen;
}

/* Counter 0 as a reference clock: mode 2, count 65536 (a reload every
 * 55 ms). Its OUT is ISA IRQ 0: keep that masked in the PIC and the
 * IOAPIC while it runs. */
static uint16_t pit_ref_last;
static uint64_t pit_ref_total;
static inline void pit_ref_start(void)
{
    pit_program(0, 2, 0);
    pit_ref_last = pit_latch_read(0);
    pit_ref_total = 0;
}
/* PIT clocks since pit_ref_start(). Counter 0 counts down by one per clock
 * and reloads at 65536, so the difference of two samples modulo 65536 is
 * the number of clocks between them: call this at least every 55 ms. */
static inline uint64_t pit_ref_clocks(void)
{
    uint16_t c = pit_latch_read(0);
    pit_ref_total += (uint16_t)(pit_ref_last - c);
    pit_ref_last = c;
    return pit_ref_total;
}
/* Waits until at least `clocks` PIT clocks have passed, calling
 * open_irq_window() between reads if `windows`. Gives up if counter 0 does
 * not move in 10^6 reads. */
static inline void pit_ref_wait(uint32_t clocks, int windows)
{
    uint64_t now = pit_ref_clocks(), end = now + clocks;
    uint32_t stalled = 0;
    while (now < end && stalled < 1000000) {
        if (windows)
            open_irq_window();
        uint64_t t = pit_ref_clocks();
        stalled = t == now ? stalled + 1 : 0;
        now = t;
    }
}

/* ---- Local APIC ---------------------------------------------------------- */
#define LAPIC_BASE 0xFEE00000ull
#define LAPIC_ID 0x020
#define LAPIC_VERSION 0x030
#define LAPIC_TPR 0x080
#define LAPIC_PPR 0x0A0
#define LAPIC_EOI 0x0B0
#define LAPIC_LDR 0x0D0
#define LAPIC_DFR 0x0E0
#define LAPIC_SVR 0x0F0
#define LAPIC_ISR 0x100 /* 8 registers, 0x10 apart: vectors 32n..32n+31 */
#define LAPIC_TMR 0x180
#define LAPIC_IRR 0x200
#define LAPIC_ESR 0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_CURRENT 0x390
#define LAPIC_TIMER_DIVIDE 0x3E0

#define SVR_ENABLE (1u << 8)
#define LVT_MASKED (1u << 16)
#define LVT_TIMER_PERIODIC (1u << 17)
#define LVT_TIMER_TSC_DEADLINE (2u << 17)
#define LVT_DM_EXTINT (7u << 8)
#define LVT_DM_NMI (4u << 8)
#define ICR_DM_FIXED (0u << 8)
#define ICR_DM_NMI (4u << 8)
#define ICR_DM_INIT (5u << 8)
#define ICR_DM_STARTUP (6u << 8)
#define ICR_DEST_LOGICAL (1u << 11)
#define ICR_DELIVERY_STATUS (1u << 12)
#define ICR_ASSERT (1u << 14)
#define ICR_SELF (1u << 18) /* destination shorthand 01: self */

#define MSR_APIC_BASE 0x1B
#define APIC_BASE_EXTD (1ull << 10)
#define APIC_BASE_EN (1ull << 11)
#define MSR_TSC_DEADLINE 0x6E0
#define MSR_X2APIC(off) (0x800u + ((off) >> 4))
#define MSR_X2APIC_SELF_IPI 0x83F

static inline uint32_t lapic_read(uint32_t off)
{
    return *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + off);
}
static inline void lapic_write(uint32_t off, uint32_t v)
{
    *(volatile uint32_t *)(uintptr_t)(LAPIC_BASE + off) = v;
}
/* Set by a guest once it has switched its LAPIC to x2APIC mode (the xAPIC
 * page is no longer decoded then): lapic_eoi() writes the EOI MSR. */
static int lapic_x2apic_mode;
static inline void lapic_eoi(void)
{
    if (lapic_x2apic_mode)
        wrmsr(MSR_X2APIC(LAPIC_EOI), 0);
    else
        lapic_write(LAPIC_EOI, 0);
}
/* Software-enables the xAPIC with spurious vector `spurious`. */
static inline void lapic_enable(uint8_t spurious) { lapic_write(LAPIC_SVR, SVR_ENABLE | spurious); }
/* A fixed, edge self-IPI through the ICR's "self" shorthand. */
static inline void lapic_self_ipi(uint8_t vec)
{
    lapic_write(LAPIC_ICR_LO, ICR_SELF | ICR_ASSERT | ICR_DM_FIXED | vec);
}
/* Bit `vec` of the 256-bit ISR / IRR / TMR register group at `base`. */
static inline int lapic_vec_bit(uint32_t base, uint8_t vec)
{
    return (lapic_read(base + 0x10 * (vec >> 5)) >> (vec & 31)) & 1;
}
/* The 256-bit group at `base` has no bit set. */
static inline int lapic_vec_none(uint32_t base)
{
    uint32_t any = 0;
    for (uint32_t i = 0; i < 8; i++)
        any |= lapic_read(base + 0x10 * i);
    return any == 0;
}

/* ---- IOAPIC ---------------------------------------------------------------- */
#define IOAPIC_BASE 0xFEC00000ull
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WIN 0x10
#define IOAPIC_EOI_REG 0x40
#define IOAPIC_REG_ID 0x00
#define IOAPIC_REG_VER 0x01
#define IOAPIC_REG_RTE(pin) (0x10 + 2 * (pin))

#define RTE_DEST_LOGICAL (1ull << 11)
#define RTE_DELIVERY_STATUS (1ull << 12)
#define RTE_ACTIVE_LOW (1ull << 13)
#define RTE_REMOTE_IRR (1ull << 14)
#define RTE_LEVEL (1ull << 15)
#define RTE_MASKED (1ull << 16)
#define RTE_DEST(id) ((uint64_t)(id) << 56)

static inline uint32_t ioapic_read(uint8_t reg)
{
    *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_REGSEL) = reg;
    return *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_WIN);
}
static inline void ioapic_write(uint8_t reg, uint32_t v)
{
    *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_REGSEL) = reg;
    *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_WIN) = v;
}
static inline uint64_t ioapic_read_rte(unsigned pin)
{
    uint64_t lo = ioapic_read((uint8_t)IOAPIC_REG_RTE(pin));
    uint64_t hi = ioapic_read((uint8_t)(IOAPIC_REG_RTE(pin) + 1));
    return lo | (hi << 32);
}
/* Writes the high dword (destination) first, then the low one, so the entry
 * never is unmasked with a stale destination. */
static inline void ioapic_write_rte(unsigned pin, uint64_t v)
{
    ioapic_write((uint8_t)(IOAPIC_REG_RTE(pin) + 1), (uint32_t)(v >> 32));
    ioapic_write((uint8_t)IOAPIC_REG_RTE(pin), (uint32_t)v);
}
static inline void ioapic_mask_all(void)
{
    for (unsigned pin = 0; pin < 24; pin++)
        ioapic_write_rte(pin, RTE_MASKED);
}

/* ---- COM1 registers (for the UART interrupt) ------------------------------ */
#define COM1_BASE 0x3F8
#define UART_IER 1
#define UART_IIR 2
#define UART_MCR 4
#define UART_LSR 5
#define UART_IER_ETBEI 0x02
#define UART_MCR_OUT2 0x08

#endif
