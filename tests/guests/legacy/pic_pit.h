/* Tandem test-guest runtime, legacy flavours: the 8259A pair, the 8254 PIT
 * and waiting for interrupts (the subset of runtime/hw.h the 32-bit and
 * real-mode interrupt guests use; the same semantics, 32-bit types).
 * Intel 8259A datasheet (ICW1-ICW4, OCW1-OCW3), Intel 8254 datasheet. */
#ifndef TANDEM_GUEST_LEGACY_PIC_PIT_H
#define TANDEM_GUEST_LEGACY_PIC_PIT_H

#include "legacy.h"

/* sti; hlt; cli: sleeps until one interrupt has been taken (the STI shadow
 * covers the HLT, so an interrupt already pending wakes it). */
static inline void wait_irq(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }
/* sti; out %al, $0x80; cli: lets in an interrupt that is pending and
 * deliverable now; one held back (IMR, ISR priority) stays pending. */
static inline void open_irq_window(void) { __asm__ volatile("sti; outb %%al, $0x80; cli" ::: "memory"); }

#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xA0
#define PIC2_DATA 0xA1
#define ICW1_INIT 0x10
#define ICW1_IC4 0x01
#define ICW4_8086 0x01
#define ICW4_AEOI 0x02
#define OCW2_EOI 0x20
#define OCW2_SEOI 0x60
#define OCW3_READ_IRR 0x0A
#define OCW3_READ_ISR 0x0B

/* ICW1-ICW4 on both chips (cascade on IR2, slave ID 2), then OCW1. */
static inline void pic_init(uint8_t master_base, uint8_t slave_base, uint8_t icw4, uint8_t mask1, uint8_t mask2)
{
    outb(PIC1_CMD, ICW1_INIT | ICW1_IC4);
    outb(PIC2_CMD, ICW1_INIT | ICW1_IC4);
    outb(PIC1_DATA, master_base);
    outb(PIC2_DATA, slave_base);
    outb(PIC1_DATA, 1 << 2);
    outb(PIC2_DATA, 2);
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
    outb(cmd, OCW3_READ_IRR);
    return v;
}

#define PIT_CH0 0x40
#define PIT_CW 0x43

/* Counter ch in `mode`, LSB then MSB of a 16-bit count. */
static inline void pit_program(unsigned ch, unsigned mode, uint16_t count)
{
    outb(PIT_CW, (uint8_t)((ch << 6) | (3 << 4) | (mode << 1)));
    outb((uint16_t)(PIT_CH0 + ch), (uint8_t)count);
    outb((uint16_t)(PIT_CH0 + ch), (uint8_t)(count >> 8));
}
/* Counter latch command, then the latched count (LSB, MSB). */
static inline uint16_t pit_latch_read(unsigned ch)
{
    outb(PIT_CW, (uint8_t)(ch << 6));
    uint8_t lo = inb((uint16_t)(PIT_CH0 + ch));
    uint8_t hi = inb((uint16_t)(PIT_CH0 + ch));
    return (uint16_t)(lo | (hi << 8));
}
/* Polls a periodic counter until it reloaded `reloads` times (optionally
 * opening an interrupt window between reads): waiting in PIT time, bounded
 * by (reloads + 2) * 65536 counted clocks or 10^6 reads without movement. */
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

#endif
