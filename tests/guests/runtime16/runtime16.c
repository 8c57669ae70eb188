/* Tandem test-guest runtime, real-mode flavour: the IVT and the dispatcher
 * (SDM vol. 3, 21.1.4 "Interrupt and Exception Handling" in real-address
 * mode: the IVT at IDTR.base, 4-byte entries offset:segment). */
#include "runtime16.h"

static handler_fn handlers[256];
extern const uint32_t isr16_stub_table[256];

/* The IVT at linear 0, reached through a pointer the compiler cannot see
 * is null. */
static volatile uint32_t *ivt(void)
{
    uint32_t p;
    __asm__("xorl %0, %0" : "=r"(p));
    return (volatile uint32_t *)(uintptr_t)p;
}

void ivt_set(unsigned vec, uint16_t seg, uint16_t off)
{
    if (vec < 256)
        ivt()[vec] = ((uint32_t)seg << 16) | off;
}

uint16_t ivt_stub(unsigned vec) { return vec < 256 ? (uint16_t)isr16_stub_table[vec] : 0; }

void set_handler(unsigned vec, handler_fn fn)
{
    if (vec < 256)
        handlers[vec] = fn;
}

void isr_dispatch(struct frame *f);
void isr_dispatch(struct frame *f)
{
    handler_fn fn = f->vector < 256 ? handlers[f->vector] : 0;
    if (fn) {
        fn(f);
        return;
    }
    printf("UNEXPECTED INTERRUPT vec=%u ip=0x%x cs=0x%x\n", f->vector, f->ip, f->cs);
    exit(1);
}

void runtime16_start(void) __attribute__((noreturn));
void runtime16_start(void)
{
    serial_init();
    for (unsigned v = 0; v < 256; v++)
        ivt_set(v, 0, ivt_stub(v));
    int rc = main();
    int nfailed = summary();
    exit((nfailed || rc) ? 1 : 0);
}
