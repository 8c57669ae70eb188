/* irqbench: benchmark of interrupt delivery through the local APIC.
 *
 * The multiboot command line gives N (the first token made only of decimal
 * digits, as in outloop; default 10000) and a mode word, "ipi" (the
 * default) or "timer"; other tokens are ignored (QEMU passes the kernel path
 * first). The 8259As are re-initialized fully masked (vectors 0x20/0x28) so
 * that the PIT's IRQ 0 cannot come in through LINT0; the xAPIC is
 * software-enabled with spurious vector 0xFF (SVR 0x1FF).
 *
 *  - ipi: N times a fixed self-IPI, vector 0x40 (ICR low = 0x40 | shorthand
 *    self, SDM vol. 3, 11.6.1), then sti; hlt; cli: the HLT ends when the
 *    interrupt is taken (the STI shadow covers the HLT, so an interrupt
 *    already pending wakes it rather than being taken before it).
 *  - timer: LVT timer one-shot, vector 0x41, divide by 1 (divide
 *    configuration 1011b); N times: initial count 20000 (20 us at a 1 GHz
 *    APIC bus clock, SDM vol. 3, 11.5.4), then sti; hlt; cli.
 *
 * The handler counts and writes the EOI. At the end the guest prints
 * "irqbench: N interrupts (mode)" and exits 0 when the handler ran N times;
 * otherwise it prints "FAIL: irqbench: ..." and exits 1. No SUMMARY line.
 */
#include "runtime.h"
#include "hw.h"

#define DEFAULT_ITERATIONS 10000ull
#define V_IPI 0x40
#define V_TIMER 0x41
#define V_SPURIOUS 0xFF
#define TIMER_COUNT 20000u
#define DIV_1 0xB

static volatile uint64_t count, stray;

static void count_and_eoi(struct frame *f)
{
    (void)f;
    count++;
    lapic_eoi();
}

/* Any other vector: counted; EOI unless it is the spurious vector (which
 * sets no ISR bit, SDM 11.9). */
static void stray_handler(struct frame *f)
{
    stray++;
    if (f->vector != V_SPURIOUS)
        lapic_eoi();
}

static int token_is(const char *tok, size_t len, const char *word)
{
    return len == strlen(word) && memcmp(tok, word, len) == 0;
}

/* Reads N and the mode from the command line. */
static void parse_cmdline(const char *s, uint64_t *n, int *timer_mode)
{
    int have_n = 0;
    *n = DEFAULT_ITERATIONS;
    *timer_mode = 0;
    while (*s) {
        while (*s == ' ' || *s == '\t')
            s++;
        const char *tok = s;
        uint64_t v = 0;
        int digits = 1;
        while (*s && *s != ' ' && *s != '\t') {
            if (*s < '0' || *s > '9')
                digits = 0;
            else
                v = v * 10 + (uint64_t)(*s - '0');
            s++;
        }
        size_t len = (size_t)(s - tok);
        if (!len)
            break;
        if (digits && !have_n) {
            *n = v;
            have_n = 1;
        } else if (token_is(tok, len, "timer")) {
            *timer_mode = 1;
        } else if (token_is(tok, len, "ipi")) {
            *timer_mode = 0;
        }
    }
}

int main(void)
{
    uint64_t n;
    int timer_mode;
    parse_cmdline(multiboot_cmdline(), &n, &timer_mode);
    const char *mode = timer_mode ? "timer" : "ipi";

    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    for (unsigned v = 0x20; v < 256; v++)
        set_handler(v, stray_handler);
    set_handler(V_IPI, count_and_eoi);
    set_handler(V_TIMER, count_and_eoi);
    lapic_enable(V_SPURIOUS);

    if (timer_mode) {
        lapic_write(LAPIC_TIMER_DIVIDE, DIV_1);
        lapic_write(LAPIC_LVT_TIMER, V_TIMER); /* one-shot, unmasked */
        for (uint64_t i = 0; i < n; i++) {
            lapic_write(LAPIC_TIMER_INITIAL, TIMER_COUNT);
            wait_irq();
        }
        lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | V_TIMER);
    } else {
        for (uint64_t i = 0; i < n; i++) {
            lapic_write(LAPIC_ICR_LO, ICR_SELF | V_IPI);
            wait_irq();
        }
    }

    if (count == n && stray == 0) {
        printf("irqbench: %lu interrupts (%s)\n", n, mode);
        exit(0);
    }
    printf("FAIL: irqbench: %lu of %lu interrupts (%s), %lu on other vectors\n", count, n, mode, stray);
    exit(1);
}
