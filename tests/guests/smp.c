/* smp: the BSP starts every application processor with INIT and start-up
 * IPIs (Intel SDM vol. 3, 9.4.4 "MP Initialization Example"), and each AP,
 * in real mode at the SIPI vector's page, switches its LAPIC to x2APIC mode,
 * reads its APIC ID, records it and sends a fixed IPI back to the BSP
 * through the x2APIC ICR, vector 0x50 + its ID (a vector per AP: IPIs
 * with one vector that arrive while the BSP is not taking interrupts
 * merge in its IRR). Then it spins on `mov $0, %dl` with CPUID (serializing)
 * in the loop until it runs the immediate 1 the BSP writes into that
 * instruction (cross-modifying code, SDM vol. 3, 8.1.3: the AP must see
 * the new code after a serializing instruction, although it has run, and
 * an interpreter has cached, the old one many times); then it halts with
 * interrupts off.
 *
 * The number of processors comes from CPUID leaf 0xB (the core level's
 * logical processor count). Run with `--smp N`; with one processor there
 * is nothing to start and the checks are trivially met.
 */
#include "runtime.h"
#include "hw.h"

#define TRAMPOLINE 0x8000u /* SIPI vector 0x08 */
#define AP_COUNT 0x8400u   /* dword: APs that ran */
#define AP_IDS 0x8480u     /* dword per APIC ID: the ID the AP read */
#define AP_PATCHED 0x8404u /* dword: APs that ran the patched instruction */
/* Dword per APIC ID: rounds of the patch loop, on another page than the
 * code (a write to the code's page would make an interpreter drop it). */
#define AP_SPINS 0x9000u
#define IPI_VECTOR 0x50

extern const uint8_t ap_trampoline[], ap_trampoline_end[], ap_patch_site[];

/* 16-bit code, copied to TRAMPOLINE: it uses only absolute low addresses. */
__asm__(".pushsection .rodata\n"
        ".code16\n"
        "ap_trampoline:\n"
        "  cli\n"
        "  xor %ax, %ax\n"
        "  mov %ax, %ds\n"
        "  mov $0x1b, %ecx\n" /* IA32_APIC_BASE: EN | EXTD */
        "  rdmsr\n"
        "  or $0xc00, %eax\n"
        "  wrmsr\n"
        "  mov $0x802, %ecx\n" /* x2APIC ID */
        "  rdmsr\n"
        "  mov %eax, %ebx\n"
        "  and $0x1f, %ebx\n"
        "  addr32 mov %eax, 0x8480(,%ebx,4)\n"
        "  lock incl 0x8400\n"
        "  mov $0x830, %ecx\n" /* ICR: fixed, vector 0x50 + ID, to APIC ID 0 */
        "  xor %edx, %edx\n"
        "  lea 0x50(%ebx), %eax\n"
        "  wrmsr\n"
        "  mov %ebx, %esi\n"
        "2: addr32 lock incl 0x9000(,%esi,4)\n"
        "  xor %eax, %eax\n"
        "  cpuid\n"
        "ap_patch_site:\n"
        "  mov $0, %dl\n" /* b2 00: the BSP makes the immediate 1 */
        "  cmp $1, %dl\n"
        "  jne 2b\n"
        "  lock incl 0x8404\n"
        "1: cli\n"
        "  hlt\n"
        "  jmp 1b\n"
        "ap_trampoline_end:\n"
        ".code64\n"
        ".popsection\n");

static volatile int ipis;

static void ipi_handler(struct frame *f)
{
    (void)f;
    ipis++;
    lapic_eoi();
}

static volatile int ticks;
static void timer_handler(struct frame *f)
{
    (void)f;
    ticks++;
    lapic_eoi();
}

static void icr(uint32_t dest, uint32_t lo)
{
    lapic_write(LAPIC_ICR_HI, dest << 24);
    lapic_write(LAPIC_ICR_LO, lo);
}

int main(void)
{
    uint32_t a, b, c, d;
    cpuid(0xb, 1, &a, &b, &c, &d);
    uint32_t ncpu = b & 0xffff;
    if (ncpu == 0 || ncpu > 32)
        ncpu = 1;
    printf("processors (CPUID 0xB): %u\n", ncpu);

    volatile uint8_t *dst = (volatile uint8_t *)(uintptr_t)TRAMPOLINE;
    for (const uint8_t *p = ap_trampoline; p < ap_trampoline_end; p++)
        *dst++ = *p;
    *(volatile uint32_t *)(uintptr_t)AP_COUNT = 0;
    *(volatile uint32_t *)(uintptr_t)AP_PATCHED = 0;
    for (uint32_t i = 0; i < 32; i++) {
        ((volatile uint32_t *)(uintptr_t)AP_IDS)[i] = 0xffffffff;
        ((volatile uint32_t *)(uintptr_t)AP_SPINS)[i] = 0;
    }

    pic_mask_all();
    for (uint32_t i = 1; i < ncpu; i++)
        set_handler(IPI_VECTOR + i, ipi_handler);
    set_handler(0x41, timer_handler);
    lapic_enable(0xff);
    /* A watchdog: the LAPIC timer bounds the wait if an AP never answers. */
    lapic_write(LAPIC_TIMER_DIVIDE, 0xb);
    lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | 0x41);
    lapic_write(LAPIC_TIMER_INITIAL, 1000000);

    for (uint32_t id = 1; id < ncpu; id++) {
        icr(id, ICR_DM_INIT | ICR_ASSERT | (1u << 15) /* level */);
        icr(id, ICR_DM_INIT | (1u << 15)); /* de-assert */
        icr(id, ICR_DM_STARTUP | (TRAMPOLINE >> 12));
        icr(id, ICR_DM_STARTUP | (TRAMPOLINE >> 12)); /* the second SIPI is ignored */
    }
    while (ipis < (int)ncpu - 1 && ticks < 2000)
        wait_irq();

    /* Once every AP has run the loop a few times, patch it. The BSP
     * polls with PAUSE instead of waiting for timer ticks: the APs spin
     * without exits, so under a clock that only exits move (`tandem diff`
     * on KVM) no tick would come; the bound is a count of polls. */
    volatile uint32_t *spins = (volatile uint32_t *)(uintptr_t)AP_SPINS;
    for (uint32_t id = 1; id < ncpu; id++)
        for (uint32_t n = 0; spins[id] < 3 && n < 50000000u; n++)
            __asm__ volatile("pause");
    uint32_t patch = TRAMPOLINE + (uint32_t)(ap_patch_site - ap_trampoline) + 1;
    *(volatile uint8_t *)(uintptr_t)patch = 1;
    volatile uint32_t *patched = (volatile uint32_t *)(uintptr_t)AP_PATCHED;
    for (uint32_t n = 0; *patched < ncpu - 1 && n < 50000000u; n++)
        __asm__ volatile("pause");
    lapic_write(LAPIC_TIMER_INITIAL, 0);

    uint32_t ran = *(volatile uint32_t *)(uintptr_t)AP_COUNT;
    int ok = expect("APs that ran the trampoline", ran, ncpu - 1);
    report("INIT, SIPI: every AP starts in real mode at the SIPI page, once", ok);

    ok = 1;
    for (uint32_t id = 1; id < ncpu; id++)
        ok &= expect("x2APIC ID read by the AP", ((volatile uint32_t *)(uintptr_t)AP_IDS)[id], id);
    report("each AP reads its own APIC ID (x2APIC, enabled in real mode)", ok);

    ok = expect("IPIs from the APs", ipis, ncpu - 1);
    report("fixed IPIs AP -> BSP arrive, one per AP", ok);

    ok = expect("APs that ran the patched instruction", *patched, ncpu - 1);
    report("cross-modifying code: each AP runs the instruction the BSP rewrote", ok);
    return 0;
}
