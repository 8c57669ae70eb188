/* cpuid: prints the processor the guest sees, leaf by leaf, so a test can
 * check that the interpreter and KVM offer the same one, and checks what
 * a 64-bit kernel needs from it (SDM vol. 2A, CPUID). */
#include "runtime.h"

static void cpuid4(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void show(uint32_t leaf, uint32_t sub)
{
    uint32_t r[4];
    cpuid4(leaf, sub, r);
    printf("cpuid %x.%x: %x %x %x %x\n", leaf, sub, r[0], r[1], r[2], r[3]);
}

int main(void)
{
    uint32_t r[4];
    cpuid4(0, 0, r);
    uint32_t max_basic = r[0];
    cpuid4(0x80000000, 0, r);
    uint32_t max_ext = r[0];
    for (uint32_t l = 0; l <= max_basic && l <= 0x20; l++) {
        if (l == 4 || l == 7 || l == 0xb || l == 0xd || l == 0x1f) {
            for (uint32_t s = 0; s < 3; s++)
                show(l, s);
        } else {
            show(l, 0);
        }
    }
    for (uint32_t l = 0x80000000; l <= max_ext && l <= 0x80000008; l++)
        show(l, 0);
    /* Beyond the maxima: the highest basic leaf answers on Intel. */
    show(max_basic + 1, 0);

    cpuid4(1, 0, r);
    uint32_t edx1 = r[3], ecx1 = r[2];
    report("FPU, PAE, CX8, APIC, CMOV, FXSR, SSE, SSE2", (edx1 & 0x0700a361) == 0x0700a361);
    report("x2APIC and TSC-deadline (Tandem's LAPIC)", (ecx1 & ((1u << 21) | (1u << 24))) == ((1u << 21) | (1u << 24)));
    report("initial APIC ID 0", (r[1] >> 24) == 0);
    cpuid4(0x80000001, 0, r);
    report("long mode, SYSCALL, NX", (r[3] & ((1u << 29) | (1u << 11) | (1u << 20))) == ((1u << 29) | (1u << 11) | (1u << 20)));
    report("no AVX: the interpreter does not execute it", (ecx1 & (1u << 28)) == 0);

    /* OSXSAVE follows CR4.OSXSAVE. */
    if (ecx1 & (1u << 26)) {
        uint64_t cr4;
        __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
        __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 | (1u << 18) | (1u << 9)));
        cpuid4(1, 0, r);
        report("OSXSAVE set with CR4.OSXSAVE", (r[2] & (1u << 27)) != 0);
        cpuid4(0xd, 0, r);
        report("XSAVE size for XCR0 = x87|SSE is 576", (r[0] & 3) == 3 && r[1] == 576);
    }
    return 0;
}
