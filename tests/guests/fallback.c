/* fallback: instructions some KVMs cannot emulate at ring 0 (PVM: LOCK
 * CMPXCHG16B, XSAVE / XRSTOR / XGETBV), which Tandem then executes with its
 * interpreter. Each check gives an answer that can only be right if the
 * instruction was executed as the SDM says: CMPXCHG16B's store, load and
 * ZF in both outcomes and its #GP on a misaligned operand, CMPXCHG8B, and
 * (when CPUID offers XSAVE) XGETBV and an XRSTOR / XSAVE round trip of
 * MXCSR. */
#include "runtime.h"

#define CR4_OSFXSR (1ull << 9)
#define CR4_OSXSAVE (1ull << 18)

static uint64_t pair[4] __attribute__((aligned(16)));
static uint8_t area[2][4096] __attribute__((aligned(64)));
static int gp_hits;
static uint64_t gp_error;

static void on_gp(struct frame *f)
{
    gp_hits++;
    gp_error = f->error_code;
    f->rip += 5; /* lock cmpxchg16b (%rsi) */
}

/* lock cmpxchg16b (%rsi): returns ZF; *rax / *rdx get RAX / RDX after. */
static int cmpxchg16b(uint64_t *m, uint64_t *rax, uint64_t *rdx, uint64_t rbx, uint64_t rcx)
{
    uint8_t zf;
    __asm__ volatile(".byte 0xf0, 0x48, 0x0f, 0xc7, 0x0e\n\tsetz %0"
                     : "=q"(zf), "+a"(*rax), "+d"(*rdx)
                     : "S"(m), "b"(rbx), "c"(rcx)
                     : "memory", "cc");
    return zf;
}

static void check_cmpxchg16b(void)
{
    uint64_t rax = 1, rdx = 2;
    pair[0] = 1;
    pair[1] = 2;
    int zf = cmpxchg16b(pair, &rax, &rdx, 0x1111222233334444ull, 0x5555666677778888ull);
    report("cmpxchg16b equal: ZF set, RCX:RBX stored",
           zf && pair[0] == 0x1111222233334444ull && pair[1] == 0x5555666677778888ull &&
               rax == 1 && rdx == 2);

    rax = 3;
    rdx = 0x5555666677778888ull;
    zf = cmpxchg16b(pair, &rax, &rdx, 0xaa, 0xbb);
    report("cmpxchg16b unequal: ZF clear, RDX:RAX loaded, memory kept",
           !zf && rax == 0x1111222233334444ull && rdx == 0x5555666677778888ull &&
               pair[0] == 0x1111222233334444ull && pair[1] == 0x5555666677778888ull);

    set_handler(13, on_gp);
    rax = pair[1];
    rdx = pair[2];
    cmpxchg16b(&pair[1], &rax, &rdx, 0, 0);
    set_handler(13, 0);
    printf("misaligned: %d #GP, error code %x\n", gp_hits, (unsigned)gp_error);
    report("cmpxchg16b misaligned: #GP(0), memory kept",
           gp_hits == 1 && gp_error == 0 && pair[1] == 0x5555666677778888ull);
}

static void check_cmpxchg8b(void)
{
    uint64_t m = 0x0000000500000006ull;
    uint32_t eax = 6, edx = 5;
    uint8_t zf;
    __asm__ volatile("lock cmpxchg8b %1\n\tsetz %0"
                     : "=q"(zf), "+m"(m), "+a"(eax), "+d"(edx)
                     : "b"(0x77u), "c"(0x88u)
                     : "cc");
    report("cmpxchg8b equal: ZF set, ECX:EBX stored", zf && m == 0x0000008800000077ull);
}

static uint32_t mxcsr_of(const uint8_t *a)
{
    return (uint32_t)a[24] | (uint32_t)a[25] << 8 | (uint32_t)a[26] << 16 | (uint32_t)a[27] << 24;
}

static void check_xsave(void)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1u << 26))) {
        printf("NOTE: CPUID.1:ECX does not offer XSAVE; XGETBV / XSAVE / XRSTOR not checked\n");
        return;
    }
    uint64_t cr4 = read_cr4() | CR4_OSFXSR | CR4_OSXSAVE;
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4) : "memory");

    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    printf("XCR0 = %x:%x\n", hi, lo);
    report("xgetbv: XCR0 has x87", (lo & 1) != 0);

    /* Enable SSE state in XCR0 when leaf 0xD offers it: MXCSR is saved and
     * restored only when XCR0 & EDX:EAX has bit 1 or 2. */
    cpuid(0xd, 0, &a, &b, &c, &d);
    if (!(a & 2)) {
        printf("NOTE: CPUID.(0xD,0):EAX does not offer SSE state; XSAVE of MXCSR not checked\n");
        return;
    }
    __asm__ volatile("xsetbv" ::"a"(lo | 3u), "d"(hi), "c"(0));
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    printf("XCR0 after xsetbv = %x:%x\n", hi, lo);
    report("xsetbv / xgetbv: XCR0 has x87 | SSE", (lo & 3) == 3);

    /* XRSTOR an image with MXCSR = 0x9f80 (FZ), XSAVE it back. */
    memset(area, 0, sizeof(area));
    area[0][24] = 0x80;
    area[0][25] = 0x9f;
    __asm__ volatile("xrstor %0" ::"m"(area[0]), "a"(3u), "d"(0u) : "memory");
    __asm__ volatile("xsave %0" : "=m"(area[1]) : "a"(3u), "d"(0u) : "memory");
    uint32_t saved = mxcsr_of(area[1]);
    printf("MXCSR after xrstor / xsave: %x\n", saved);
    report("xrstor / xsave round trip of MXCSR", saved == 0x9f80);

    /* Back to the initial MXCSR. */
    area[0][25] = 0x1f;
    __asm__ volatile("xrstor %0" ::"m"(area[0]), "a"(3u), "d"(0u) : "memory");
}

int main(void)
{
    printf("fallback: instructions KVM may hand to the interpreter\n");
    check_cmpxchg16b();
    check_cmpxchg8b();
    check_xsave();
    return 0;
}
