/* exceptions: exception and software-interrupt delivery in 64-bit mode.
 *
 * Each check runs a small assembly snippet that records RSP and RFLAGS just
 * before the instruction under test (labels <name>_insn / <name>_after mark
 * it), lets the handler record the frame, and compares the frame with what
 * the SDM (vol. 3, "Interrupt and Exception Handling in 64-bit Mode")
 * prescribes:
 *  - SS:RSP are always pushed; the CPU first aligns RSP down to 16 bytes, so
 *    RIP is saved at (new_rsp & ~15) - 40, where new_rsp is the interrupted
 *    RSP (no stack switch), TSS.RSP0 (CPL 3 -> 0) or TSS.ISTn (IST gate);
 *  - the saved RFLAGS is the interrupted one (for faults the CPU may also set
 *    RF in the image, so RF is ignored there);
 *  - faults save the RIP of the faulting instruction, traps and INT n the
 *    RIP of the next one;
 *  - at CPL 0 with no privilege change the saved SS is the current SS
 *    (0x10 here); from CPL 3, CS and SS are the user selectors (RPL 3).
 * A failing check prints the mismatching fields before its FAIL line.
 */
#include "runtime.h"

#define STR_(x) #x
#define STR(x) STR_(x)

#define RFLAGS_IF (1ull << 9)
#define RFLAGS_RF (1ull << 16)
#define RUN_USER_RFLAGS 0x2ull /* what run_user enters CPL 3 with (IF = 0) */

/* ---- What the handlers record ------------------------------------------ */
static struct {
    int hits;
    struct frame f;       /* the frame as the handler saw it, before changes */
    uint64_t frame_addr;  /* address of the saved RIP (the CPU-pushed part) */
    uint64_t handler_rsp; /* the handler's own RSP */
    uint64_t cr2;
} rec;

static uint64_t resume_rip; /* if nonzero, handlers continue there */

/* Written by the snippets (also from CPL 3: every page is user-accessible). */
uint64_t snap_rsp, snap_rflags, snap_value;

static void record(struct frame *f)
{
    rec.hits++;
    rec.f = *f;
    rec.frame_addr = (uint64_t)(uintptr_t)&f->rip;
    rec.handler_rsp = read_rsp();
    rec.cr2 = read_cr2();
}

/* Record; resume at resume_rip (skips a faulting instruction; a no-op for
 * traps whose saved RIP already is the next instruction). */
static void record_and_resume(struct frame *f)
{
    record(f);
    if (resume_rip)
        f->rip = resume_rip;
}

/* The interrupted RFLAGS of a CPL 3 snippet: the snapshot, except IF, which
 * is run_user's (0). PVM runs CPL 3 code with the host's IF = 1 and PUSHFQ
 * there reads IF = 1, while the frame it delivers carries the guest's IF = 0
 * (measured); the frame is what is under test, so IF comes from what
 * run_user set, not from PUSHFQ. */
static uint64_t user_snap_rflags(void)
{
    return (snap_rflags & ~RFLAGS_IF) | (RUN_USER_RFLAGS & RFLAGS_IF);
}

static void reset(uint64_t resume)
{
    memset(&rec, 0, sizeof(rec));
    resume_rip = resume;
    snap_rsp = snap_rflags = snap_value = 0;
}

/* ---- Snippets ---------------------------------------------------------- */
/* name: <setup>; record RFLAGS and RSP; name_insn: <insn>; name_after:
 * <tail>; ret. PUSHFQ/POPQ/MOV leave the flags alone, so the recorded RFLAGS
 * are the ones at name_insn. */
#define SNIPPET(name, setup, insn, tail)                                          \
    __asm__(".text\n"                                                             \
            ".globl " #name ", " #name "_insn, " #name "_after\n" #name ":\n\t" setup \
            "\n\tpushfq\n\tpopq snap_rflags(%rip)\n\tmovq %rsp, snap_rsp(%rip)\n" #name \
            "_insn:\n\t" insn "\n" #name "_after:\n\t" tail "\n\tret\n");         \
    void name(void);                                                              \
    extern char name##_insn[], name##_after[];

/* Pages in [2 MiB, 4 MiB), which this test remaps with 4 KiB pages. */
#define PF_REGION 0x200000
#define PG_NP_READ 0x201000
#define PG_NP_WRITE 0x202000
#define PG_RO_WRITE 0x203000
#define PG_NX_FETCH 0x204000
#define PG_USER_NP_READ 0x205000
#define PG_USER_SUPERVISOR 0x206000
#define PG_USER_RO_WRITE 0x207000

#define MAGIC_READ 0x1122334455667788ull
#define MAGIC_WRITE 0x5a5a5a5a5a5a5a5aull

SNIPPET(s_div0, "xor %ecx, %ecx\n\tmov $1, %eax\n\txor %edx, %edx", "divl %ecx", "")
SNIPPET(s_ud2, "", "ud2", "")
SNIPPET(s_gp_sel, "mov $0x103, %eax", "mov %ax, %ds", "")
SNIPPET(s_gp_noncanon, "movabs $0x0000800000000000, %rcx", "movq (%rcx), %rax", "")
SNIPPET(s_int3, "", "int3", "")
SNIPPET(s_int80, "", "int $0x80", "")
SNIPPET(s_int83_ist, "", "int $0x83", "")
SNIPPET(s_pf_np_read, "mov $" STR(PG_NP_READ) ", %ecx", "movq (%rcx), %rax", "movq %rax, snap_value(%rip)")
SNIPPET(s_pf_np_write, "mov $" STR(PG_NP_WRITE) ", %ecx\n\tmovabs $" STR(MAGIC_WRITE) ", %rax",
        "movq %rax, (%rcx)", "")
SNIPPET(s_pf_ro_write, "mov $" STR(PG_RO_WRITE) ", %ecx\n\tmovabs $" STR(MAGIC_WRITE) ", %rax",
        "movq %rax, (%rcx)", "")
SNIPPET(s_pf_nx_fetch, "mov $" STR(PG_NX_FETCH) ", %ecx", "call *%rcx", "")
/* Run at CPL 3 through run_user. */
SNIPPET(u_int80, "", "int $0x80", "")
SNIPPET(u_int82_dpl0, "", "int $0x82", "")
SNIPPET(u_pf_np_read, "mov $" STR(PG_USER_NP_READ) ", %ecx", "movq (%rcx), %rax", "movq %rax, snap_value(%rip)")
SNIPPET(u_pf_supervisor_read, "mov $" STR(PG_USER_SUPERVISOR) ", %ecx", "movq (%rcx), %rax",
        "movq %rax, snap_value(%rip)")
SNIPPET(u_pf_ro_write, "mov $" STR(PG_USER_RO_WRITE) ", %ecx\n\tmovabs $" STR(MAGIC_WRITE) ", %rax",
        "movq %rax, (%rcx)", "")

/* ---- Frame checks ---------------------------------------------------------- */
static int expect(const char *what, uint64_t got, uint64_t want)
{
    if (got == want)
        return 1;
    printf("  %s: got 0x%lx, expected 0x%lx\n", what, got, want);
    return 0;
}

struct expected {
    uint64_t vector, error_code, rip, cs, ss, rsp, rflags;
    int fault; /* ignore RFLAGS.RF in the saved image */
    /* The stack the CPU switched to, or 0 for none (frame on the interrupted
     * stack, below rsp). */
    const char *stack_bottom, *stack_top;
};

static int check_frame(const struct expected *e)
{
    int ok = expect("handler calls", (uint64_t)rec.hits, 1);
    if (!ok)
        return 0;
    const struct frame *f = &rec.f;
    ok &= expect("vector", f->vector, e->vector);
    ok &= expect("error code", f->error_code, e->error_code);
    ok &= expect("RIP", f->rip, e->rip);
    ok &= expect("CS", f->cs, e->cs);
    ok &= expect("SS", f->ss, e->ss);
    ok &= expect("RSP", f->rsp, e->rsp);
    uint64_t mask = e->fault ? ~RFLAGS_RF : ~0ull;
    ok &= expect("RFLAGS", f->rflags & mask, e->rflags & mask);
    uint64_t new_rsp = e->stack_top ? (uint64_t)(uintptr_t)e->stack_top : e->rsp;
    ok &= expect("saved-RIP address", rec.frame_addr, (new_rsp & ~15ull) - 40);
    if (e->stack_top) {
        uint64_t lo = (uint64_t)(uintptr_t)e->stack_bottom, hi = (uint64_t)(uintptr_t)e->stack_top;
        int on = rec.handler_rsp >= lo && rec.handler_rsp < hi;
        if (!on)
            printf("  handler RSP 0x%lx not on the stack [0x%lx, 0x%lx)\n", rec.handler_rsp, lo, hi);
        ok &= on;
    }
    return ok;
}

/* ---- #PF: a 4 KiB page table for [2 MiB, 4 MiB) ------------------------------ */
static uint64_t pf_pt[512] __attribute__((aligned(4096)));
#define PTE_FULL (PTE_P | PTE_RW | PTE_US)

static void set_pte(uint64_t addr, uint64_t flags)
{
    pf_pt[(addr - PF_REGION) >> 12] = (addr & ~0xFFFull) | flags;
    invlpg(addr);
}

static void split_pf_region(void)
{
    for (unsigned i = 0; i < 512; i++)
        pf_pt[i] = (PF_REGION + ((uint64_t)i << 12)) | PTE_FULL;
    boot_pd[PF_REGION >> 21] = (uint64_t)(uintptr_t)pf_pt | PTE_FULL;
    write_cr3(read_cr3()); /* drop the 2 MiB translation */
}

/* Record, then map the page fully (P | RW | US, executable) and return to
 * the faulting instruction, which then completes. */
static void pf_map_and_retry(struct frame *f)
{
    record(f);
    uint64_t a = rec.cr2;
    if (a < PF_REGION || a >= PF_REGION + 0x200000 || rec.hits > 2) {
        printf("UNEXPECTED #PF err=0x%lx rip=0x%lx cr2=0x%lx\n", f->error_code, f->rip, a);
        exit(1);
    }
    set_pte(a, PTE_FULL);
}

/* One #PF check: page `page` gets PTE flags `flags`, then `run` executes the
 * snippet (directly or through run_user). */
static void pf_check(const char *name, uint64_t page, uint64_t flags, void (*snippet)(void), int user,
                     const char *insn, uint64_t want_err, int is_write)
{
    uint64_t *p = (uint64_t *)(uintptr_t)page;
    set_pte(page, PTE_FULL);
    *p = MAGIC_READ;
    set_pte(page, flags);
    reset(0);
    if (user)
        run_user(snippet);
    else
        snippet();
    struct expected e = {
        .vector = 14,
        .error_code = want_err,
        .rip = (uint64_t)(uintptr_t)insn,
        .cs = user ? SEL_USER_CODE : SEL_KERNEL_CODE,
        .ss = user ? SEL_USER_DATA : SEL_KERNEL_DATA,
        .rsp = snap_rsp,
        .rflags = user ? user_snap_rflags() : snap_rflags,
        .fault = 1,
        .stack_bottom = user ? rsp0_stack_bottom : 0,
        .stack_top = user ? rsp0_stack_top : 0,
    };
    int ok = check_frame(&e);
    ok &= expect("CR2", rec.cr2, page);
    if (is_write)
        ok &= expect("memory after the retried write", *p, MAGIC_WRITE);
    else
        ok &= expect("value of the retried read", snap_value, MAGIC_READ);
    report(name, ok);
}

/* The NX fetch: CALL completes (return address pushed, RIP = target), then
 * the fetch at the target faults. The page holds a RET. */
static void pf_nx_check(void)
{
    uint8_t *code = (uint8_t *)(uintptr_t)PG_NX_FETCH;
    set_pte(PG_NX_FETCH, PTE_FULL);
    code[0] = 0xC3; /* ret */
    set_pte(PG_NX_FETCH, PTE_FULL | PTE_NX);
    reset(0);
    s_pf_nx_fetch();
    struct expected e = {
        .vector = 14,
        .error_code = 0x11, /* P | I/D */
        .rip = PG_NX_FETCH,
        .cs = SEL_KERNEL_CODE,
        .ss = SEL_KERNEL_DATA,
        .rsp = snap_rsp - 8,
        .rflags = snap_rflags,
        .fault = 1,
    };
    int ok = check_frame(&e);
    ok &= expect("CR2", rec.cr2, PG_NX_FETCH);
    report("#PF instruction fetch from an NX page (ring 0): err=0x11, CR2", ok);
}

/* ---- Ring-0 checks ------------------------------------------------------------ */
static void check_simple(const char *name, void (*snippet)(void), uint64_t vec, uint64_t err, const char *rip,
                         const char *resume, int fault)
{
    set_handler((unsigned)vec, record_and_resume);
    reset((uint64_t)(uintptr_t)resume);
    snippet();
    struct expected e = {
        .vector = vec,
        .error_code = err,
        .rip = (uint64_t)(uintptr_t)rip,
        .cs = SEL_KERNEL_CODE,
        .ss = SEL_KERNEL_DATA,
        .rsp = snap_rsp,
        .rflags = snap_rflags,
        .fault = fault,
    };
    report(name, check_frame(&e));
    set_handler((unsigned)vec, 0);
}

static void check_ist(void)
{
    set_handler(0x83, record_and_resume);
    set_gate_ist(0x83, 1);
    reset(0);
    s_int83_ist();
    struct expected e = {
        .vector = 0x83,
        .rip = (uint64_t)(uintptr_t)s_int83_ist_after,
        .cs = SEL_KERNEL_CODE,
        .ss = SEL_KERNEL_DATA,
        .rsp = snap_rsp,
        .rflags = snap_rflags,
        .stack_bottom = ist1_stack_bottom,
        .stack_top = ist1_stack_top,
    };
    report("IST1 gate from ring 0: frame on the IST1 stack, RSP/SS of the interrupted code", check_frame(&e));
    set_gate_ist(0x83, 0);
    set_handler(0x83, 0);
}

/* ---- Ring-3 checks ---------------------------------------------------------- */
/* The two INT n checks at CPL 3 catch whatever arrives instead of the
 * expected event, on every vector, and resume after the INT: some KVM hosts
 * (PVM) answer INT n at CPL 3 with a #UD at the INT. The check then fails
 * with one line naming what came, and the run goes on. */
static const char *const exception_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", 0, "#TS",
    "#NP", "#SS", "#GP", "#PF", 0, "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

/* The CPU pushes an error code for these vectors (see runtime/isr.S). */
static int has_error_code(uint64_t v)
{
    return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30;
}

static void catch_all(handler_fn fn)
{
    for (unsigned v = 0; v < 256; v++)
        set_handler(v, fn);
}

static void print_vector(uint64_t v)
{
    if (v < 32 && exception_names[v])
        printf("%s (vector %lu)", exception_names[v], v);
    else
        printf("vector %lu (0x%lx)", v, v);
}

/* If exactly one event arrived and it is not the expected vector, print
 * "  got <name> (vector N)[, err=0x..] at/after the INT instruction ..." and
 * fail; otherwise compare the whole frame. */
static int check_user_int_frame(const struct expected *e, const char *insn, const char *after)
{
    if (rec.hits == 0) {
        printf("  nothing arrived: the INT instruction completed without an event\n");
        return 0;
    }
    if (rec.hits == 1 && rec.f.vector != e->vector) {
        const struct frame *f = &rec.f;
        printf("  got ");
        print_vector(f->vector);
        if (has_error_code(f->vector))
            printf(", err=0x%lx,", f->error_code);
        if (f->rip == (uint64_t)(uintptr_t)insn)
            printf(" at the INT instruction");
        else if (f->rip == (uint64_t)(uintptr_t)after)
            printf(" after the INT instruction");
        else
            printf(" at RIP 0x%lx (the INT is at 0x%lx)", f->rip, (uint64_t)(uintptr_t)insn);
        printf(" (CS 0x%lx), expected ", f->cs);
        print_vector(e->vector);
        printf("\n");
        return 0;
    }
    return check_frame(e);
}

static void check_user_int80(void)
{
    catch_all(record_and_resume);
    set_gate_dpl(0x80, 3);
    /* INT n is a trap: the expected frame already returns after it; the
     * resume address only matters for a fault at the INT. */
    reset((uint64_t)(uintptr_t)u_int80_after);
    run_user(u_int80);
    struct expected e = {
        .vector = 0x80,
        .rip = (uint64_t)(uintptr_t)u_int80_after,
        .cs = SEL_USER_CODE,
        .ss = SEL_USER_DATA,
        .rsp = snap_rsp,
        .rflags = user_snap_rflags(),
        .stack_bottom = rsp0_stack_bottom,
        .stack_top = rsp0_stack_top,
    };
    int ok = check_user_int_frame(&e, u_int80_insn, u_int80_after);
    ok &= expect("user RSP inside the user stack",
                 snap_rsp > (uint64_t)(uintptr_t)user_stack_bottom && snap_rsp <= (uint64_t)(uintptr_t)user_stack_top, 1);
    report("int $0x80 from ring 3, DPL3 gate: stack switch to RSP0, user SS:RSP and CS saved", ok);
    set_gate_dpl(0x80, 0);
    catch_all(0);
}

/* QEMU's TCG announces itself with this CPUID hypervisor signature. */
static int is_qemu_tcg(void)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1u << 31)))
        return 0;
    cpuid(0x40000000, 0, &a, &b, &c, &d);
    return b == 0x54474354 && c == 0x43544743 && d == 0x47435447; /* "TCGTCGTCGTCG" */
}

static void check_user_int_dpl0(void)
{
    /* Gate 0x82 stays DPL 0: INT 0x82 at CPL 3 -> #GP((0x82 << 3) | IDT).
     * Vector 0x82 itself (or any other) must not arrive. */
    catch_all(record_and_resume);
    reset((uint64_t)(uintptr_t)u_int82_dpl0_after);
    run_user(u_int82_dpl0);
    /* SDM: the error code's index field (bits 15:3) holds the vector and
     * bit 1 (IDT) is set: (0x82 << 3) | 2 = 0x412, in 64-bit mode too. QEMU
     * TCG (7.2) scales by the 16-byte gate size instead: (0x82 << 4) | 2. */
    uint64_t want_err = (0x82 << 3) | 2;
    if (rec.hits == 1 && rec.f.vector == 13 && rec.f.error_code == ((0x82 << 4) | 2) && is_qemu_tcg()) {
        printf("  note: QEMU TCG error code 0x822 accepted (the SDM value is 0x412)\n");
        want_err = rec.f.error_code;
    }
    struct expected e = {
        .vector = 13,
        .error_code = want_err,
        .rip = (uint64_t)(uintptr_t)u_int82_dpl0_insn,
        .cs = SEL_USER_CODE,
        .ss = SEL_USER_DATA,
        .rsp = snap_rsp,
        .rflags = user_snap_rflags(),
        .fault = 1,
        .stack_bottom = rsp0_stack_bottom,
        .stack_top = rsp0_stack_top,
    };
    report("int $0x82 from ring 3 into a DPL0 gate: #GP, err=0x412",
           check_user_int_frame(&e, u_int82_dpl0_insn, u_int82_dpl0_after));
    catch_all(0);
}

int main(void)
{
    /* #DE: fault, no error code. */
    check_simple("#DE divide by zero: fault at the DIV, no error code", s_div0, 0, 0, s_div0_insn, s_div0_after, 1);
    /* #UD: fault at UD2. */
    check_simple("#UD ud2: fault at the UD2", s_ud2, 6, 0, s_ud2_insn, s_ud2_after, 1);
    /* #GP(selector): index 0x20 is beyond the GDT limit; the error code is
     * the selector without its RPL (TI = 0, IDT = 0, EXT = 0). */
    check_simple("#GP loading selector 0x103 (beyond the GDT limit) into DS: err=0x100", s_gp_sel, 13, 0x100,
                 s_gp_sel_insn, s_gp_sel_after, 1);
    /* #GP(0): non-canonical address through DS. */
    check_simple("#GP non-canonical access: err=0", s_gp_noncanon, 13, 0, s_gp_noncanon_insn, s_gp_noncanon_after, 1);
    /* #BP: trap, saved RIP after the INT3. */
    check_simple("#BP int3: trap, RIP after the INT3", s_int3, 3, 0, s_int3_after, 0, 0);
    /* INT 0x80 at CPL 0, DPL 0 gate: no stack switch. */
    check_simple("int $0x80 from ring 0, DPL0 gate: RIP after, no stack switch", s_int80, 0x80, 0, s_int80_after, 0, 0);
    check_ist();

    /* #PF under 4-level paging: error code P(0) W(1) U(2) I(4), CR2. */
    split_pf_region();
    set_handler(14, pf_map_and_retry);
    pf_check("#PF not-present read (ring 0): err=0x0, CR2", PG_NP_READ, 0, s_pf_np_read, 0, s_pf_np_read_insn, 0x0, 0);
    pf_check("#PF not-present write (ring 0): err=0x2, CR2", PG_NP_WRITE, 0, s_pf_np_write, 0, s_pf_np_write_insn,
             0x2, 1);
    pf_check("#PF write to a read-only page (ring 0, CR0.WP=1): err=0x3, CR2", PG_RO_WRITE, PTE_P | PTE_US,
             s_pf_ro_write, 0, s_pf_ro_write_insn, 0x3, 1);
    pf_nx_check();
    pf_check("#PF not-present read (ring 3): err=0x4, CR2", PG_USER_NP_READ, 0, u_pf_np_read, 1, u_pf_np_read_insn,
             0x4, 0);
    pf_check("#PF read of a supervisor page (ring 3): err=0x5, CR2", PG_USER_SUPERVISOR, PTE_P | PTE_RW,
             u_pf_supervisor_read, 1, u_pf_supervisor_read_insn, 0x5, 0);
    pf_check("#PF write to a read-only page (ring 3): err=0x7, CR2", PG_USER_RO_WRITE, PTE_P | PTE_US, u_pf_ro_write,
             1, u_pf_ro_write_insn, 0x7, 1);
    set_handler(14, 0);

    check_user_int80();
    check_user_int_dpl0();
    return 0;
}
