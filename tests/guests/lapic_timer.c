/* lapic_timer: the local APIC timer (Intel SDM vol. 3, 11.5.4 "APIC
 * Timer" and 11.5.4.1 "TSC-Deadline Mode").
 *
 * The 8259As are masked; the xAPIC is software-enabled with spurious vector
 * 0xFF. Interrupts are awaited with sti; hlt; cli. "Waiting without an
 * interrupt" polls the 8254's counter 0 (a reference clock in PIT time,
 * IRQ 0 masked) and opens an interrupt window between reads, so an
 * interrupt that should not come would be taken if it were pending.
 *
 * Checks:
 *  - the divide configuration register reads back each of its 8 values;
 *  - one-shot (divide by 16): the current count runs below the initial
 *    count, exactly one interrupt with the LVT's vector, then the current
 *    count is 0 and stays 0, no second interrupt;
 *  - periodic: several interrupts, each in service (ISR bit set) in its
 *    handler and EOI'd; the current count never reads 0 while running;
 *    writing 0 to the initial count stops it;
 *  - masked LVT timer: it still counts down to 0 but raises nothing; a later
 *    unmasked one-shot with another vector fires and the masked vector was
 *    never delivered nor left pending;
 *  - TSC-deadline mode (CPUID.1:ECX[24]): LVT bits 18:17 = 10b read back; a
 *    deadline of 0 disarms; a deadline at or before the timer's current TSC
 *    fires at once (IA32_TSC_DEADLINE reads 0 afterwards and exactly one
 *    interrupt comes per expired deadline) while a later one reads back as
 *    written; a deadline a little ahead of "now" fires with the LVT's vector
 *    and the MSR reads 0 after it.
 *
 * Finding "now" for TSC-deadline: the SDM compares the deadline with the
 * TSC; this guest does not assume RDTSC reads the same TSC the LAPIC
 * compares with (on a VMM the two can differ), it finds the timer's "now"
 * from the timer itself: a deadline fires at once exactly when it is not in
 * the future, so a binary search over deadlines brackets the current TSC.
 */
#include "runtime.h"
#include "hw.h"

#define V_ONESHOT 0x40
#define V_PERIODIC 0x41
#define V_PROBE 0x42
#define V_MASKED 0x43
#define V_LATER 0x44
#define V_DEADLINE 0x45
#define V_SPURIOUS 0xFF

#define DIV_16 0x3

static volatile int hits[256];
static volatile int total;
static volatile uint64_t last_vector;
static volatile int periodic_isr_bad;

static void timer_handler(struct frame *f)
{
    hits[f->vector & 0xFF]++;
    total++;
    last_vector = f->vector;
    if (f->vector == V_PERIODIC && !lapic_vec_bit(LAPIC_ISR, V_PERIODIC))
        periodic_isr_bad++;
    lapic_eoi();
}

static void spurious_handler(struct frame *f)
{
    /* No EOI for the spurious vector (SDM 11.9). */
    hits[f->vector & 0xFF]++;
}

static void clear_hits(void)
{
    for (int i = 0; i < 256; i++)
        hits[i] = 0;
    total = 0;
}

/* Takes interrupts until `vec` has been seen n times (at most 100 wake-ups). */
static void wait_for(uint8_t vec, int n)
{
    for (int i = 0; i < 100 && hits[vec] < n; i++)
        wait_irq();
}

static void check_divide(void)
{
    static const uint32_t values[8] = {0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB};
    int ok = 1;
    for (int i = 0; i < 8; i++) {
        lapic_write(LAPIC_TIMER_DIVIDE, values[i]);
        ok &= expect("divide configuration", lapic_read(LAPIC_TIMER_DIVIDE), values[i]);
    }
    report("divide configuration register: 0x0-0x3 and 0x8-0xB read back", ok);

    /* The current count runs down from the initial count (masked LVT, so
     * nothing is delivered; divide by 1, 2^32 - 1 counts: it cannot reach 0
     * between the reads). */
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | V_ONESHOT);
    lapic_write(LAPIC_TIMER_DIVIDE, 0xB);
    lapic_write(LAPIC_TIMER_INITIAL, 0xFFFFFFFF);
    uint32_t c1 = lapic_read(LAPIC_TIMER_CURRENT);
    pit_ref_wait(100, 0);
    uint32_t c2 = lapic_read(LAPIC_TIMER_CURRENT);
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    ok = expect_true("the first read is below the initial count", c1 < 0xFFFFFFFF);
    ok &= expect_true("the second read (100 PIT clocks later) is below the first", c2 < c1);
    ok &= expect("current count after writing initial count 0", lapic_read(LAPIC_TIMER_CURRENT), 0);
    report("current count register counts down from the initial count; initial count 0 stops it", ok);
}

static void check_one_shot(void)
{
    clear_hits();
    lapic_write(LAPIC_TIMER_DIVIDE, DIV_16);
    lapic_write(LAPIC_LVT_TIMER, V_ONESHOT);
    int ok = expect("LVT timer", lapic_read(LAPIC_LVT_TIMER), V_ONESHOT);
    lapic_write(LAPIC_TIMER_INITIAL, 312500); /* 5 ms with a 1 GHz bus clock */
    uint32_t running = lapic_read(LAPIC_TIMER_CURRENT);
    wait_for(V_ONESHOT, 1);
    uint32_t after = lapic_read(LAPIC_TIMER_CURRENT);
    pit_ref_wait(3000, 1); /* 2.5 ms of PIT time, interrupts open */
    uint32_t later = lapic_read(LAPIC_TIMER_CURRENT);
    ok &= expect_true("current count right after the start at most the initial count", running <= 312500);
    ok &= expect("interrupts with the LVT vector", hits[V_ONESHOT], 1);
    ok &= expect("interrupts in all", total, 1);
    ok &= expect("current count after the interrupt", after, 0);
    ok &= expect("current count 2.5 ms later", later, 0);
    ok &= expect("initial count register", lapic_read(LAPIC_TIMER_INITIAL), 312500);
    report("one-shot, divide by 16: one interrupt with the LVT vector, current count reaches 0 and stays", ok);
}

static void check_periodic(void)
{
    clear_hits();
    periodic_isr_bad = 0;
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | V_PERIODIC);
    int ok = expect("LVT timer", lapic_read(LAPIC_LVT_TIMER), LVT_TIMER_PERIODIC | V_PERIODIC);
    lapic_write(LAPIC_TIMER_INITIAL, 62500); /* 1 ms */
    int zero_reads = 0;
    for (int i = 0; i < 100 && hits[V_PERIODIC] < 5; i++) {
        if (lapic_read(LAPIC_TIMER_CURRENT) == 0)
            zero_reads++;
        wait_irq();
    }
    int taken = hits[V_PERIODIC];
    lapic_write(LAPIC_TIMER_INITIAL, 0); /* stops the timer */
    open_irq_window();                   /* one may have been on its way */
    int at_stop = hits[V_PERIODIC];
    pit_ref_wait(5000, 1);               /* 4.2 ms: 4 periods */
    ok &= expect("interrupts taken", taken >= 5, 1);
    ok &= expect("other vectors", total - hits[V_PERIODIC], 0);
    ok &= expect("handler runs without its ISR bit", periodic_isr_bad, 0);
    ok &= expect("current count reads of 0 while running", zero_reads, 0);
    ok &= expect("interrupts after writing initial count 0", hits[V_PERIODIC] - at_stop, 0);
    ok &= expect("current count after the stop", lapic_read(LAPIC_TIMER_CURRENT), 0);
    ok &= expect_true("ISR empty", lapic_vec_none(LAPIC_ISR));
    report("periodic: interrupts keep coming, each in service in its handler and EOI'd; initial count 0 stops it", ok);
}

static void check_masked(void)
{
    clear_hits();
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | V_MASKED);
    int ok = expect("LVT timer", lapic_read(LAPIC_LVT_TIMER), LVT_MASKED | V_MASKED);
    lapic_write(LAPIC_TIMER_INITIAL, 6250); /* 100 us */
    int counted_down = 0;
    uint64_t t0 = pit_ref_clocks();
    while (!counted_down && pit_ref_clocks() - t0 < 12000) { /* 10 ms of PIT time at most */
        open_irq_window();
        counted_down = lapic_read(LAPIC_TIMER_CURRENT) == 0;
    }
    pit_ref_wait(500, 1);
    int masked_pending = lapic_vec_bit(LAPIC_IRR, V_MASKED);
    /* A later unmasked one-shot with another vector. */
    lapic_write(LAPIC_LVT_TIMER, V_LATER);
    lapic_write(LAPIC_TIMER_INITIAL, 6250);
    wait_for(V_LATER, 1);
    ok &= expect("masked timer counted down to 0", counted_down, 1);
    ok &= expect("masked vector in the IRR", masked_pending, 0);
    ok &= expect("later one-shot interrupts", hits[V_LATER], 1);
    ok &= expect("masked vector interrupts", hits[V_MASKED], 0);
    ok &= expect("masked vector in the IRR at the end", lapic_vec_bit(LAPIC_IRR, V_MASKED), 0);
    report("masked LVT timer: counts to 0 without an interrupt; a later unmasked one-shot fires, the masked one never did", ok);
}

/* Arms IA32_TSC_DEADLINE with d and reads it back; 0 means it fired at once
 * (d was not in the future). Fired probes deliver V_PROBE, taken here;
 * the others are disarmed again. */
static int probe_fired(uint64_t d)
{
    wrmsr(MSR_TSC_DEADLINE, d);
    int fired = rdmsr(MSR_TSC_DEADLINE) == 0;
    if (fired)
        open_irq_window();
    else
        wrmsr(MSR_TSC_DEADLINE, 0);
    return fired;
}

static void check_tsc_deadline(void)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!expect("CPUID.1:ECX bit 24 (TSC-deadline)", (c >> 24) & 1, 1)) {
        report("TSC-deadline mode", 0);
        return;
    }
    clear_hits();
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | V_PROBE);
    int ok = expect("LVT timer", lapic_read(LAPIC_LVT_TIMER), LVT_TIMER_TSC_DEADLINE | V_PROBE);
    wrmsr(MSR_TSC_DEADLINE, 0);
    ok &= expect("IA32_TSC_DEADLINE after writing 0", rdmsr(MSR_TSC_DEADLINE), 0);
    ok &= expect("current count in TSC-deadline mode", lapic_read(LAPIC_TIMER_CURRENT), 0);
    report("TSC-deadline mode: LVT timer mode 10b reads back; deadline 0 disarms", ok);

    /* Binary search: lo fires at once, hi does not. */
    uint64_t lo = 1, hi = 1ull << 62;
    int fired_probes = 0, far_fired = 0;
    far_fired = probe_fired(hi);
    fired_probes += probe_fired(lo);
    int bad_lo = fired_probes != 1;
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (probe_fired(mid)) {
            fired_probes++;
            lo = mid;
        } else {
            hi = mid;
        }
    }
    open_irq_window();
    ok = expect("deadline 1 fired at once", bad_lo, 0);
    ok &= expect("deadline 2^62 fired at once", far_fired, 0);
    ok &= expect("interrupts for the expired deadlines", hits[V_PROBE], fired_probes);
    ok &= expect("other vectors", total - hits[V_PROBE], 0);
    report("TSC-deadline: a deadline not in the future fires at once (MSR reads 0, one interrupt each), a later one reads back", ok);

    /* Arm a deadline 5 ms (at 1 GHz) past the "now" just found. */
    clear_hits();
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | V_DEADLINE);
    uint64_t deadline = lo + 5000000;
    wrmsr(MSR_TSC_DEADLINE, deadline);
    wait_for(V_DEADLINE, 1);
    ok = expect("interrupts with the LVT vector", hits[V_DEADLINE], 1);
    ok &= expect("interrupts in all", total, 1);
    ok &= expect("IA32_TSC_DEADLINE after the interrupt", rdmsr(MSR_TSC_DEADLINE), 0);
    report("TSC-deadline: a deadline ahead of now fires with the LVT vector, then IA32_TSC_DEADLINE reads 0", ok);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | V_ONESHOT);
}

int main(void)
{
    for (unsigned v = 0x40; v <= 0x45; v++)
        set_handler(v, timer_handler);
    set_handler(V_SPURIOUS, spurious_handler);
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    pit_ref_start();
    lapic_enable(V_SPURIOUS);
    report("SVR: software enable with spurious vector 0xFF reads back 0x1FF",
           expect("SVR", lapic_read(LAPIC_SVR), 0x1FF));

    check_tsc_deadline();
    check_divide();
    check_one_shot();
    check_periodic();
    check_masked();
    report("no spurious-vector interrupt", expect("spurious interrupts", hits[V_SPURIOUS], 0));
    return 0;
}
