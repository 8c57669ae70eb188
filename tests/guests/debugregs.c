/* debugregs: data and I/O breakpoints (SDM vol. 3, 18.2 and 18.3.1.2).
 *
 * Each check loads DR0-DR3 / DR7, runs a small assembly snippet and lets the
 * #DB handler record every debug exception: the saved RIP, DR6 and RCX. The
 * SDM's rules under test:
 *  - a data breakpoint (DR7 R/W = 01 writes, 11 reads and writes) is a trap:
 *    the #DB comes after the instruction that accessed a watched byte, RIP
 *    past it, DR6.Bn set for the breakpoint;
 *  - LEN = 00, 01, 11, 10 watch 1, 2, 4, 8 bytes at the aligned DRn, and
 *    any access overlapping them matches;
 *  - a breakpoint enabled by neither Ln nor Gn does not break;
 *  - in a repeated string instruction the trap comes after the iteration
 *    that hit (fast-string operation may group iterations: RCX then counts
 *    what is left, and the instruction completes after the handler);
 *  - a MOV SS that hits a breakpoint has its #DB held until the following
 *    instruction has completed (SDM vol. 3, 6.8.3);
 *  - R/W = 10 with CR4.DE set is an I/O breakpoint on the port in DRn.
 * A failing check prints what the handler saw before its FAIL line.
 */
#include "runtime.h"

#define DR6_RESET 0xffff0ff0ull
#define DR6_BS (1ull << 14)
#define CR4_DE (1ull << 3)

/* DR7 with breakpoint n enabled locally (Ln), R/W rw and LEN len. */
#define DR7_BP(n, rw, len) \
    ((1ull << (2 * (n))) | ((uint64_t)(rw) << (16 + 4 * (n))) | ((uint64_t)(len) << (18 + 4 * (n))))

static inline void write_dr(int n, uint64_t v)
{
    switch (n) {
    case 0: __asm__ volatile("mov %0, %%dr0" ::"r"(v)); break;
    case 1: __asm__ volatile("mov %0, %%dr1" ::"r"(v)); break;
    case 2: __asm__ volatile("mov %0, %%dr2" ::"r"(v)); break;
    case 3: __asm__ volatile("mov %0, %%dr3" ::"r"(v)); break;
    case 6: __asm__ volatile("mov %0, %%dr6" ::"r"(v)); break;
    default: __asm__ volatile("mov %0, %%dr7" ::"r"(v)); break;
    }
}

static inline uint64_t read_dr6(void)
{
    uint64_t v;
    __asm__ volatile("mov %%dr6, %0" : "=r"(v));
    return v;
}

static inline void write_cr4(uint64_t v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }

#define MAX_DB 4
static struct {
    int hits;
    uint64_t rip[MAX_DB], dr6[MAX_DB], rcx[MAX_DB];
} rec;

static void db_handler(struct frame *f)
{
    if (rec.hits < MAX_DB) {
        rec.rip[rec.hits] = f->rip;
        rec.dr6[rec.hits] = read_dr6();
        rec.rcx[rec.hits] = f->rcx;
    }
    rec.hits++;
    write_dr(6, DR6_RESET);
}

/* What the snippets watch, away from anything the handler writes. */
uint64_t watched[4] __attribute__((aligned(64)));
uint8_t rep_buf[16] __attribute__((aligned(16)));
uint16_t ss_image;

/* name: <body>; ret, with the labels the checks name inside <body>. */
#define SNIPPET(name, body) \
    __asm__(".text\n.globl " #name "\n" #name ":\n\t" body "\n\tret\n"); \
    void name(void);

SNIPPET(s_write,
        "movl watched+8(%rip), %eax\n\t"  /* a read: no break */
        "movb %al, watched+12(%rip)\n\t" /* past the 4 watched bytes */
        "movb %al, watched+7(%rip)\n\t"  /* before them */
        "movb %al, watched+11(%rip)\n"    /* their last byte */
        "s_write_after:\n\tnop")
SNIPPET(s_read8,
        "movq watched(%rip), %rax\n\t" /* watched+0..7: not the 8 at +8 */
        "movq watched+4(%rip), %rax\n" /* +4..+11: overlaps */
        "s_read8_after:\n\t"
        "movq watched+16(%rip), %rax")
SNIPPET(s_disabled, "movq %rax, watched(%rip)")
SNIPPET(s_rep,
        "push %rdi\n\t"
        "lea rep_buf(%rip), %rdi\n\t"
        "mov $16, %ecx\n\t"
        "mov $0xaa, %eax\n"
        "s_rep_insn:\n\t"
        "rep stosb\n"
        "s_rep_after:\n\t"
        "pop %rdi")
SNIPPET(s_movss,
        "mov ss_image(%rip), %ss\n\t"
        "nop\n"
        "s_movss_after_nop:\n\t"
        "nop")
SNIPPET(s_io,
        "mov $0, %al\n\t"
        "outb %al, $0x80\n"
        "s_io_after:\n\t"
        "nop")
extern char s_write_after[], s_read8_after[], s_rep_insn[], s_rep_after[], s_movss_after_nop[],
    s_io_after[];

/* Runs `snippet` with DRn = addr and DR7 = dr7, then clears DR7. */
static void run_with(int n, uint64_t addr, uint64_t dr7, void (*snippet)(void))
{
    memset(&rec, 0, sizeof(rec));
    write_dr(6, DR6_RESET);
    write_dr(n, addr);
    write_dr(7, dr7 | 0x400);
    snippet();
    write_dr(7, 0x400);
}

static void show(void)
{
    printf("  %d #DB:", rec.hits);
    for (int i = 0; i < rec.hits && i < MAX_DB; i++)
        printf(" [rip 0x%lx dr6 0x%lx rcx 0x%lx]", rec.rip[i], rec.dr6[i], rec.rcx[i]);
    printf("\n");
}

/* Exactly one #DB, at `rip`, whose DR6 B0-B3 / BD / BS / BT are `cause`. */
static int one_db(uint64_t rip, uint64_t cause)
{
    int ok = rec.hits == 1 && rec.rip[0] == rip && (rec.dr6[0] & 0xe00f) == cause;
    if (!ok)
        show();
    return ok;
}

int main(void)
{
    set_handler(1, db_handler);
    uint64_t w = (uint64_t)(uintptr_t)watched;

    run_with(1, w + 8, DR7_BP(1, 1, 3), s_write);
    report("write breakpoint (4 bytes): #DB after the store, DR6.B1",
           one_db((uint64_t)(uintptr_t)s_write_after, 1 << 1));

    run_with(2, w + 8, DR7_BP(2, 3, 2), s_read8);
    report("read/write breakpoint (8 bytes): #DB after an overlapping read, DR6.B2",
           one_db((uint64_t)(uintptr_t)s_read8_after, 1 << 2));

    run_with(0, w, DR7_BP(0, 1, 3) & ~3ull, s_disabled);
    if (rec.hits)
        show();
    report("a breakpoint with L0 = G0 = 0 does not break", rec.hits == 0);

    run_with(0, (uint64_t)(uintptr_t)rep_buf + 8, DR7_BP(0, 1, 0), s_rep);
    {
        uint64_t rep = (uint64_t)(uintptr_t)s_rep_insn, after = (uint64_t)(uintptr_t)s_rep_after;
        int ok = rec.hits == 1 && (rec.dr6[0] & 0xe00f) == 1 && rec.rcx[0] <= 7 &&
                 rec.rip[0] == (rec.rcx[0] ? rep : after) && rep_buf[15] == 0xaa;
        if (!ok)
            show();
        report("REP STOSB: #DB after the iteration that wrote the watched byte", ok);
    }

    ss_image = SEL_KERNEL_DATA;
    run_with(0, (uint64_t)(uintptr_t)&ss_image, DR7_BP(0, 3, 1), s_movss);
    report("MOV SS hitting a breakpoint: #DB after the next instruction",
           one_db((uint64_t)(uintptr_t)s_movss_after_nop, 1 << 0));

    write_cr4(read_cr4() | CR4_DE);
    run_with(3, 0x80, DR7_BP(3, 2, 0), s_io);
    write_cr4(read_cr4() & ~CR4_DE);
    report("I/O breakpoint (CR4.DE): #DB after the OUT, DR6.B3",
           one_db((uint64_t)(uintptr_t)s_io_after, 1 << 3));
    return 0;
}
