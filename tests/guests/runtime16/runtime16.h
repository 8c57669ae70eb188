/* Tandem test-guest runtime, real-mode flavour (gcc -m16).
 *
 * boot.S leaves the multiboot entry's protected mode for real mode (through
 * a 16-bit protected-mode segment) and runs everything with CS = DS = ES =
 * SS = 0 below 64 KiB: the image's real-mode part is linked at 0x1000. The
 * IVT is at 0 (IDTR base 0, limit 0x3FF) with all 256 vectors pointing at
 * the runtime's stubs (segment 0), EFLAGS.IF = 0. Then main(); when it
 * returns, summary() and exit(failed || rc ? 1 : 0). Printing and
 * reporting are legacy.h's; COM1 and port 0xF4 are reached with IN / OUT.
 * No BIOS is used (the IVT is ours). */
#ifndef TANDEM_GUEST_RUNTIME16_H
#define TANDEM_GUEST_RUNTIME16_H

#include "legacy.h"

/* What the common entry leaves on the stack, lowest address first: ES, DS,
 * PUSHAL's GPRs, the stub's vector, then what the CPU pushed: IP, CS,
 * FLAGS. A handler may change it (IP, CS, FLAGS, GPRs); the exit path
 * reloads the GPRs and IRETs. */
struct frame {
    uint16_t es, ds;
    uint32_t edi, esi, ebp, esp_pushal, ebx, edx, ecx, eax;
    uint32_t vector;
    uint16_t ip, cs, flags;
} __attribute__((packed));
typedef void (*handler_fn)(struct frame *f);

/* Install (or with NULL remove) the C handler for a vector. A vector
 * without one prints "UNEXPECTED INTERRUPT vec=.. ip=0x.. cs=0x.." and
 * exits 1. */
void set_handler(unsigned vec, handler_fn fn);
/* IVT entry `vec` (at IDTR.base 0) = seg:off. */
void ivt_set(unsigned vec, uint16_t seg, uint16_t off);
/* The runtime's stub for `vec` (an offset in segment 0). */
uint16_t ivt_stub(unsigned vec);

extern char stack_bottom[], stack_top[];

static inline uint16_t read_flags(void) { uint16_t v; __asm__ volatile("pushfw; popw %0" : "=r"(v)); return v; }
/* LIDT with a 16-bit operand: a 24-bit base. */
static inline void lidt16(uint32_t base, uint16_t limit)
{
    struct {
        uint16_t limit;
        uint32_t base;
    } __attribute__((packed)) d = {limit, base};
    __asm__ volatile("lidtw %0" ::"m"(d) : "memory");
}

#define FLAGS_CF (1u << 0)
#define FLAGS_ZF (1u << 6)
#define FLAGS_TF (1u << 8)
#define FLAGS_IF (1u << 9)
#define FLAGS_OF (1u << 11)

#endif
