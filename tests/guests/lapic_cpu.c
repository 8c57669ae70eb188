/* lapic_cpu: the two places where the processor and its local APIC share
 * state: CR8 and the TSC.
 *
 *  - CR8 is the task-priority register (Intel SDM vol. 3, 11.8.6 "Task
 *    Priority in IA-32e Mode": "MOV CR8 ... CR8[3:0] = TPR[7:4]"): a MOV to
 *    CR8 sets the TPR's priority class, a TPR write shows in CR8, and CR8
 *    holds back interrupts like the TPR does.
 *  - TSC-deadline mode (11.5.4.1) compares IA32_TSC_DEADLINE with the TSC,
 *    the one RDTSC reads: a deadline at or before the current TSC fires at
 *    once (the MSR then reads 0), one far beyond it does not.
 *  - IA32_APIC_BASE (11.4.4) holds a base below MAXPHYADDR: a WRMSR with
 *    bit MAXPHYADDR (CPUID 0x80000008 EAX[7:0]) set raises #GP and leaves
 *    the MSR alone.
 *
 * The 8259As are masked; self-IPI 0x40 is the test interrupt, given its
 * chance with open_irq_window() (see hw.h).
 */
#include "runtime.h"
#include "hw.h"

static volatile int hits;

static void handler(struct frame *f)
{
    (void)f;
    hits++;
    lapic_eoi();
}

static inline uint64_t read_cr8(void)
{
    uint64_t v;
    __asm__ volatile("mov %%cr8, %0" : "=r"(v));
    return v;
}
static inline void write_cr8(uint64_t v) { __asm__ volatile("mov %0, %%cr8" ::"r"(v) : "memory"); }
static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static void check_cr8(void)
{
    write_cr8(5);
    uint32_t tpr = lapic_read(LAPIC_TPR);
    write_cr8(0);
    lapic_write(LAPIC_TPR, 0x30);
    uint64_t cr8 = read_cr8();
    lapic_write(LAPIC_TPR, 0);
    int ok = expect("TPR after MOV CR8 = 5", tpr, 0x50);
    ok &= expect("CR8 after the TPR write 0x30", cr8, 3);
    report("CR8 is TPR[7:4]: a MOV to CR8 shows in the TPR, a TPR write shows in CR8", ok);

    hits = 0;
    write_cr8(5);
    lapic_self_ipi(0x40);
    open_irq_window();
    int held = hits;
    write_cr8(0);
    open_irq_window();
    ok = expect("delivered with CR8 = 5", held, 0);
    ok &= expect("delivered after CR8 = 0", hits, 1);
    report("CR8 = 5 holds self-IPI 0x40 (class 4) back; CR8 = 0 releases it", ok);
}

/* 1: a deadline of d, written now, had already passed (fired at once). */
static int fires_at_once(uint64_t d)
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
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_TSC_DEADLINE | 0x41);
    hits = 0;
    uint64_t t = rdtsc();
    int past = fires_at_once(t);
    int far = fires_at_once(rdtsc() + (1ull << 40));
    int ok = expect("deadline = RDTSC fired at once", past, 1);
    ok &= expect("deadline = RDTSC + 2^40 fired at once", far, 0);
    ok &= expect("interrupts", hits, past + far);
    if (!ok) {
        /* Where the timer's own TSC is: the largest deadline that fires
         * at once. */
        uint64_t lo = 0, hi = 1ull << 62;
        while (hi - lo > 1) {
            uint64_t mid = lo + (hi - lo) / 2;
            if (fires_at_once(mid))
                lo = mid;
            else
                hi = mid;
        }
        printf("  RDTSC 0x%lx, the TSC-deadline timer's TSC 0x%lx\n", rdtsc(), lo);
    }
    report("TSC-deadline compares with the TSC RDTSC reads: RDTSC fires at once, RDTSC + 2^40 does not", ok);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | 0x41);
}

static volatile int gp_hits;

static void gp_handler(struct frame *f)
{
    gp_hits++;
    f->rip += 2; /* past the WRMSR (0F 30) */
}

static void check_apic_base_reserved(void)
{
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x80000008u), "c"(0));
    unsigned maxphyaddr = a & 0xff;
    uint64_t base = rdmsr(0x1b);
    set_handler(13, gp_handler);
    wrmsr(0x1b, base | (1ull << maxphyaddr));
    set_handler(13, 0);
    report("IA32_APIC_BASE: bit MAXPHYADDR set is #GP, the MSR unchanged",
           gp_hits == 1 && rdmsr(0x1b) == base);
}

int main(void)
{
    set_handler(0x40, handler);
    set_handler(0x41, handler);
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    lapic_enable(0xFF);
    check_cr8();
    check_tsc_deadline();
    check_apic_base_reserved();
    return 0;
}
