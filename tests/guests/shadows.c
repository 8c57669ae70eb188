/* shadows: the STI and MOV SS interrupt shadows (Intel SDM vol. 3, 6.8.3
 * "Masking Exceptions and Interrupts When Switching Stacks"; vol. 2, STI:
 * "If IF = 0, maskable hardware interrupts remain inhibited on the
 * instruction boundary following an execution of STI"; and, in the STI
 * page of earlier editions: "in a sequence of instructions that
 * individually delay interrupts past the following instruction, only the
 * first instruction in the sequence is guaranteed to delay the interrupt",
 * with the example STI; MOV SS, AX; MOV ESP, EBP where "interrupts may be
 * recognized before MOV ESP, EBP executes").
 *
 * Each check makes a self-IPI (vector 0x40) pending while IF = 0, then runs
 * a snippet (file-scope asm, labels mark its instructions) that makes the
 * interrupt deliverable; the handler records the saved RIP and a marker
 * the snippet increments after the instructions under test. The vector is
 * the only thing pending, nothing else can interrupt.
 *
 * Only what the SDM guarantees is asserted. An interrupt that is pending
 * and enabled is recognized at an instruction boundary, but the SDM puts no
 * bound on how many boundaries later; on a VMM it comes at an exit or an
 * interrupt-window exit, and on PVM the window exits come late while port
 * I/O exits come at once. So:
 *  - where the snippet asserts an exact boundary, the instruction before
 *    it is an OUT to the ignored POST port 0x80: its exit ends the
 *    instruction, the VMM sees IF = 1 and no shadow and injects right there
 *    (on VMX/SVM the window exit comes at that boundary anyway);
 *  - elsewhere the snippet accepts any boundary outside the shadow and
 *    checks the interrupt came before the marker.
 *
 * Checks:
 *  1. sti; out; L: -> taken at L (after the one instruction of the shadow,
 *     not before it), marker not yet incremented;
 *  2. sti; cli -> nothing (the STI shadow covers the CLI);
 *  3. sti; sti; in; L: -> taken before or after the IN but before the
 *     marker: the second STI (IF already 1) starts no new shadow, so the
 *     shadow does not extend over the IN. (The IN's exit leaves the IN
 *     unfinished: a VMM that saw a shadow there would wait for a window,
 *     which on PVM comes well after the marker.)
 *  4. sti; mov ss; out; L: -> taken after the MOV SS: at the OUT (the
 *     MOV SS shadow after an STI is not guaranteed, the SDM's own example)
 *     or at L, never at the MOV SS (the STI shadow);
 *  5. IF=1 by POPFQ; M: mov ss; out; L: -> never at the OUT (inside the
 *     MOV SS shadow): at M (recognized right after POPFQ, where it became
 *     deliverable) or at L;
 *  6. IF=1 by POPFQ; M1: mov ss; M2: mov ss; out; L: -> never at M2 (inside
 *     the first MOV SS's shadow); at M1, at the OUT (the second MOV SS's
 *     shadow is not guaranteed) or at L.
 *
 * Not checked by default: a MOV SS whose operand is in MMIO (SS loaded from
 * the LAPIC's TPR register, set to 0x10), entered with the interrupt
 * already deliverable. KVM exits for the MMIO read before the MOV SS
 * completes, with IF = 1 and no shadow yet; a VMM that injects at that exit
 * (KVM_INTERRUPT) gets the interrupt delivered after the MOV SS completes,
 * inside its shadow. Run with `--append movss-mmio` to include this check
 * (7); it fails on Tandem's KVM backend today (the handler sees RIP at the
 * instruction after the MOV SS).
 *
 * MOV SS under IF = 1 with the interrupt made deliverable *by* the MOV SS
 * itself cannot be set up deterministically: nothing an ordinary MOV SS
 * does makes an interrupt pending, and on KVM pending work is only looked
 * at on exits, which MOV SS from a register does not cause. Check 5 is the
 * closest: the interrupt is deliverable from the boundary right before the
 * MOV SS.
 */
#include "runtime.h"
#include "hw.h"

#define VEC 0x40

uint64_t marker;
static volatile int hits;
static volatile uint64_t irq_rip, irq_marker;

static void handler(struct frame *f)
{
    hits++;
    irq_rip = f->rip;
    irq_marker = marker;
    lapic_eoi();
}

/* name: <body>; cli; ret. The body starts with IF = 0. */
#define SNIPPET(name, body)                                                   \
    __asm__(".text\n.globl " #name "\n" #name ":\n\t" body "\n\tcli\n\tret\n"); \
    void name(void);

#define LABEL(l) ".globl " #l "\n" #l ":\n\t"
#define MARK "incq marker(%rip)\n\t"
#define IF_ON_BY_POPF "pushfq\n\torq $0x200, (%rsp)\n\tpopfq\n\t"

SNIPPET(s_sti_out, "sti\n\t" LABEL(s_sti_out_i1) "outb %al, $0x80\n\t" LABEL(s_sti_out_l) MARK)
SNIPPET(s_sti_cli, "sti\n\tcli\n\toutb %al, $0x80\n\t" MARK)
SNIPPET(s_sti_sti, "sti\n\tsti\n\t" LABEL(s_sti_sti_in) "inb $0x80, %al\n\t" LABEL(s_sti_sti_l) MARK)
SNIPPET(s_sti_movss, "mov %ss, %ecx\n\tsti\n\t" LABEL(s_sti_movss_m) "mov %cx, %ss\n\t" LABEL(
                         s_sti_movss_out) "outb %al, $0x80\n\t" LABEL(s_sti_movss_l) MARK)
SNIPPET(s_popf_movss, "mov %ss, %ecx\n\t" IF_ON_BY_POPF LABEL(s_popf_movss_m) "mov %cx, %ss\n\t" LABEL(
                          s_popf_movss_out) "outb %al, $0x80\n\t" LABEL(s_popf_movss_l) MARK)
SNIPPET(s_movss2, "mov %ss, %ecx\n\t" IF_ON_BY_POPF LABEL(s_movss2_m1) "mov %cx, %ss\n\t" LABEL(
                      s_movss2_m2) "mov %cx, %ss\n\t" LABEL(s_movss2_out) "outb %al, $0x80\n\t" LABEL(s_movss2_l) MARK)
/* SS from the LAPIC TPR register (0xFEE00080), which holds 0x10. */
SNIPPET(s_movss_mmio, "mov $0xfee00080, %ecx\n\t" IF_ON_BY_POPF LABEL(s_movss_mmio_m) "mov (%rcx), %ss\n\t" LABEL(
                          s_movss_mmio_i1) MARK LABEL(s_movss_mmio_out) "outb %al, $0x80\n\t" LABEL(s_movss_mmio_l) MARK)

extern char s_sti_out_i1[], s_sti_out_l[];
extern char s_sti_sti_in[], s_sti_sti_l[];
extern char s_sti_movss_m[], s_sti_movss_out[], s_sti_movss_l[];
extern char s_popf_movss_m[], s_popf_movss_out[], s_popf_movss_l[];
extern char s_movss2_m1[], s_movss2_m2[], s_movss2_out[], s_movss2_l[];
extern char s_movss_mmio_m[], s_movss_mmio_i1[], s_movss_mmio_out[], s_movss_mmio_l[];

#define A(p) ((uint64_t)(uintptr_t)(p))

/* Makes VEC pending with IF = 0, runs the snippet, and returns the number
 * of interrupts taken inside it; takes a still-pending one afterwards. */
static int run(void (*snippet)(void))
{
    hits = 0;
    marker = 0;
    irq_rip = irq_marker = ~0ull;
    lapic_self_ipi(VEC);
    if (!lapic_vec_bit(LAPIC_IRR, VEC))
        printf("  vector 0x%x not pending before the snippet\n", VEC);
    snippet();
    int in_snippet = hits;
    for (int i = 0; i < 10 && hits == 0; i++)
        wait_irq();
    return in_snippet;
}

static void where(const char *what, uint64_t rip)
{
    printf("  %s: interrupt taken at RIP 0x%lx\n", what, rip);
}

static int rip_in(uint64_t rip, const uint64_t *allowed, int n)
{
    for (int i = 0; i < n; i++)
        if (rip == allowed[i])
            return 1;
    return 0;
}

int main(void)
{
    set_handler(VEC, handler);
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    lapic_enable(0xFF);

    /* 1. */
    int in = run(s_sti_out);
    int ok = expect("interrupts inside the snippet", in, 1);
    ok &= expect("saved RIP (the instruction after the one in the shadow)", irq_rip, A(s_sti_out_l));
    ok &= expect("marker when taken", irq_marker, 0);
    report("STI shadow: sti; out; L: the pending interrupt is taken at L, after exactly one instruction", ok);

    /* 2. */
    in = run(s_sti_cli);
    ok = expect("interrupts inside sti; cli", in, 0);
    ok &= expect("interrupts afterwards", hits, 1);
    report("STI shadow: sti; cli: no interrupt is recognized", ok);

    /* 3. */
    in = run(s_sti_sti);
    uint64_t allowed3[] = {A(s_sti_sti_in), A(s_sti_sti_l)};
    ok = expect("interrupts inside the snippet", in, 1);
    ok &= expect("marker when taken", irq_marker, 0);
    ok &= expect_true("taken at the IN or right after it", rip_in(irq_rip, allowed3, 2));
    if (!ok)
        where("sti; sti; in", irq_rip);
    report("sti; sti: the second STI does not extend the shadow over the next instruction", ok);

    /* 4. */
    in = run(s_sti_movss);
    uint64_t allowed4[] = {A(s_sti_movss_out), A(s_sti_movss_l)};
    ok = expect("interrupts inside the snippet", in, 1);
    ok &= expect("marker when taken", irq_marker, 0);
    ok &= expect_true("taken after the MOV SS, by L", rip_in(irq_rip, allowed4, 2));
    if (!ok)
        where("sti; mov ss; out", irq_rip);
    report("sti; mov ss: not taken between STI and MOV SS (STI shadow); taken at the OUT or after it", ok);

    /* 5. */
    in = run(s_popf_movss);
    uint64_t allowed5[] = {A(s_popf_movss_m), A(s_popf_movss_l)};
    ok = expect("interrupts inside the snippet", in, 1);
    ok &= expect("marker when taken", irq_marker, 0);
    ok &= expect_true("taken before the MOV SS or after the OUT, never inside the MOV SS shadow",
                      rip_in(irq_rip, allowed5, 2));
    if (!ok)
        where("popf; mov ss; out", irq_rip);
    report("MOV SS shadow (IF=1 by POPFQ): never taken between MOV SS and the next instruction", ok);

    /* 6. */
    in = run(s_movss2);
    uint64_t allowed6[] = {A(s_movss2_m1), A(s_movss2_out), A(s_movss2_l)};
    ok = expect("interrupts inside the snippet", in, 1);
    ok &= expect("marker when taken", irq_marker, 0);
    ok &= expect_true("not taken between the two MOV SS", rip_in(irq_rip, allowed6, 3));
    if (!ok)
        where("popf; mov ss; mov ss; out", irq_rip);
    report("mov ss; mov ss: the first MOV SS's shadow holds; the second's is not guaranteed (not asserted)", ok);

    /* 7. Opt-in. */
    const char *cmd = multiboot_cmdline();
    int want_mmio = 0;
    for (const char *p = cmd; *p; p++)
        if (memcmp(p, "movss-mmio", 10) == 0)
            want_mmio = 1;
    if (want_mmio) {
        lapic_write(LAPIC_TPR, 0x10); /* the selector MOV SS reads; class 1 masks no vector >= 0x20 */
        in = run(s_movss_mmio);
        lapic_write(LAPIC_TPR, 0);
        uint64_t allowed7[] = {A(s_movss_mmio_m), A(s_movss_mmio_out), A(s_movss_mmio_l)};
        ok = expect("interrupts inside the snippet", in, 1);
        ok &= expect_true("not taken between MOV SS (from MMIO) and the next instruction",
                          rip_in(irq_rip, allowed7, 3));
        if (!ok)
            where("popf; mov (mmio), ss", irq_rip);
        report("MOV SS from MMIO (IF=1 by POPFQ): never taken inside the MOV SS shadow", ok);
    }
    return 0;
}
