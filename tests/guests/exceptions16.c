/* exceptions16: interrupt and exception delivery in real-address mode.
 *
 * Written from the SDM vol. 3, 21.1.4 ("Interrupt and Exception Handling"
 * in real-address mode): the vector indexes the IVT at IDTR.base (4-byte
 * entries, offset then segment); the processor pushes FLAGS, CS and IP (16
 * bits each, no error code ever), clears IF, TF and AC, and loads CS:IP from
 * the entry; IRET pops IP, CS and FLAGS. And vol. 2 (INT n / INTO / INT3,
 * DIV, UD2, IRET): a fault saves the IP of the faulting instruction, a trap
 * or INT n the IP of the next one.
 *
 * Each check runs a snippet (file-scope asm below) that stores SP and FLAGS
 * right before the instruction under test; one recording handler stores
 * what arrived (vector, IP, CS, FLAGS image, where the frame is, the
 * handler's own FLAGS) and, for a fault, resumes after the instruction.
 * The saved IP must lie 6 bytes below the interrupted SP (FLAGS, CS, IP).
 */
#include "runtime16.h"
#include "pic_pit.h"

struct event {
    uint32_t count, vector, ip, cs, flags, frame_addr, handler_flags;
};
static volatile struct event ev;
static volatile uint32_t resume_ip;     /* != 0: a fault, resume there */
static volatile uint32_t set_image;     /* FLAGS bits the handler sets in the image */
volatile uint16_t snap_flags;           /* set by the snippets */
volatile uint32_t snap_sp;

static void record(struct frame *f)
{
    ev.count++;
    ev.vector = f->vector;
    ev.ip = f->ip;
    ev.cs = f->cs;
    ev.flags = f->flags;
    ev.frame_addr = (uint32_t)(uintptr_t)f + offsetof(struct frame, ip);
    ev.handler_flags = read_flags();
    if (resume_ip)
        f->ip = (uint16_t)resume_ip;
    f->flags = (uint16_t)(f->flags | set_image);
}

static void reset(uint32_t resume)
{
    memset((void *)&ev, 0, sizeof(ev));
    resume_ip = resume;
    set_image = 0;
    snap_sp = snap_flags = 0;
}

#define SNIPPET(name, setup, insn)                                                               \
    __asm__(".text\n.globl " #name "\n" #name ":\n"                                              \
            "pushl %ebx\npushl %esi\npushl %edi\npushl %ebp\n" setup "\n"                        \
            "pushfw\npopw snap_flags\nmovl %esp, snap_sp\n"                                      \
            ".globl " #name "_insn\n" #name "_insn:\n" insn "\n"                                 \
            ".globl " #name "_after\n" #name "_after:\n"                                         \
            "popl %ebp\npopl %edi\npopl %esi\npopl %ebx\nretl\n");                               \
    extern char name[], name##_insn[], name##_after[];

/* After the instruction: SP and FLAGS as the IRET left them. */
volatile uint32_t after_sp;
volatile uint16_t after_flags;
#define RECORD_AFTER "\nmovl %esp, after_sp\npushfw\npopw after_flags"

SNIPPET(s_de, "xorl %edx, %edx\nmovl $1, %eax\nxorl %ecx, %ecx", "divl %ecx")
SNIPPET(s_ud, "", "ud2")
SNIPPET(s_int40, "sti", "int $0x40")
SNIPPET(s_bp, "", "int3")
SNIPPET(s_into_of, "movw $0x7fff, %ax\naddw $1, %ax", "into")
SNIPPET(s_into_nof, "xorl %eax, %eax", "into")
SNIPPET(s_iret_flags, "xorl %eax, %eax\naddl $1, %eax", "int $0x42" RECORD_AFTER)
SNIPPET(s_int43, "", "int $0x43")
/* BOUND r16, m16&16: bounds [10, 20]. */
volatile int16_t bound_pair[2] = {10, 20};
SNIPPET(s_bound_out, "movw $9, %ax", "boundw %ax, bound_pair")
SNIPPET(s_bound_in, "movw $10, %ax", "boundw %ax, bound_pair")
SNIPPET(s_int0d, "", "int $0x0d" RECORD_AFTER)
SNIPPET(s_int45, "", "int $0x45" RECORD_AFTER)

/* A handler in another segment: entered through IVT entry 0x45 as
 * 0x0100:(far_handler - 0x1000). It only touches data through DS (= 0), so
 * it runs at any CS. */
volatile uint16_t far_count, far_cs, far_ret_ip, far_ret_cs;
__asm__(".text\n.globl far_handler\nfar_handler:\n"
        "pushw %bp\nmovw %sp, %bp\n"
        "pushw %ax\n"
        "movw %cs, %ax\nmovw %ax, far_cs\n"
        "movw 2(%bp), %ax\nmovw %ax, far_ret_ip\n"
        "movw 4(%bp), %ax\nmovw %ax, far_ret_cs\n"
        "incw far_count\n"
        "popw %ax\npopw %bp\n"
        "iretw\n");
extern char far_handler[];

/* Big real mode: FS loaded with a 4 GiB data segment in protected mode
 * keeps that limit in its descriptor cache after CR0.PE is cleared (SDM
 * vol. 3, 10.9.2 / 21.1.1: real mode uses the cached limit; FS is not
 * reloaded here), so FS:EBX reaches 2 MiB from real mode. A fault there
 * (#GP, vector 13) is recorded and skipped. */
volatile uint32_t unreal_read;
__asm__(".data\n.balign 8\nunreal_gdt:\n"
        ".quad 0\n.quad 0x00CF92000000FFFF\n" /* 0x08: data, base 0, 4 GiB */
        "unreal_gdt_ptr:\n.word 15\n.long unreal_gdt\n.text\n");
SNIPPET(s_unreal,
        "lgdtl unreal_gdt_ptr\n"
        "movl %cr0, %eax\norl $1, %eax\nmovl %eax, %cr0\njmp 1f\n1:\n"
        "movw $0x08, %bx\nmovw %bx, %fs\n"
        "andl $0xFFFFFFFE, %eax\nmovl %eax, %cr0\njmp 2f\n2:\n"
        "movl $0x200000, %ebx\nmovl $0x5aa5c33c, %eax",
        "movl %eax, %fs:(%ebx)\nmovl %fs:(%ebx), %ecx\nmovl %ecx, unreal_read")

static void run(const char *snippet) { ((void (*)(void))(uintptr_t)snippet)(); }
static uint32_t a(const char *p) { return (uint32_t)(uintptr_t)p; }

static int expect_event(uint32_t vector, uint32_t ip, int sti)
{
    int ok = expect("events", ev.count, 1);
    ok &= expect("vector", ev.vector, vector);
    ok &= expect("IP", ev.ip, ip);
    ok &= expect("CS", ev.cs, 0);
    ok &= expect("FLAGS image", ev.flags, snap_flags);
    ok &= expect("IF in the image", ev.flags & FLAGS_IF, sti ? FLAGS_IF : 0);
    ok &= expect("saved IP at (interrupted SP - 6)", ev.frame_addr, snap_sp - 6);
    ok &= expect("IF and TF in the handler", ev.handler_flags & (FLAGS_IF | FLAGS_TF), 0);
    return ok;
}

/* A copy of the IVT elsewhere, for IDTR.base. */
static uint32_t ivt_copy[256] __attribute__((aligned(16)));

static volatile int strays;
static void stray_handler(struct frame *f)
{
    (void)f;
    strays++;
    outb(PIC2_CMD, OCW2_EOI);
    outb(PIC1_CMD, OCW2_EOI);
}

int main(void)
{
    /* The 8259As at their real-mode bases 0x08 / 0x70, all masked: the
     * checks with IF = 1 must see only their own INT n. */
    pic_init(0x08, 0x70, ICW4_8086, 0xFF, 0xFF);
    for (unsigned v = 0; v < 0x50; v++)
        set_handler(v, record);
    for (unsigned v = 0x70; v < 0x78; v++)
        set_handler(v, stray_handler);

    int ok;
    reset(a(s_de_after));
    run(s_de);
    report("#DE via the IVT: vector 0, IP at the DIV, CS 0, FLAGS image; IF and TF clear in the handler",
           expect_event(0, a(s_de_insn), 0));

    reset(a(s_ud_after));
    run(s_ud);
    report("#UD ud2 via the IVT: vector 6, IP at the UD2", expect_event(6, a(s_ud_insn), 0));

    reset(0);
    run(s_int40);
    cli();
    ok = expect_event(0x40, a(s_int40_after), 1);
    ok &= expect("stray interrupts", strays, 0);
    report("int $0x40 via IVT entry 0x40: IP after the INT, FLAGS image with IF=1, IF=0 in the handler", ok);

    reset(0);
    run(s_bp);
    report("INT3: vector 3, IP after the INT3", expect_event(3, a(s_bp_after), 0));

    reset(0);
    run(s_into_of);
    ok = expect_event(4, a(s_into_of_after), 0);
    reset(0);
    run(s_into_nof);
    ok &= expect("events for INTO with OF = 0", ev.count, 0);
    report("INTO: vector 4 as a trap with OF = 1, nothing with OF = 0", ok);

    reset(a(s_bound_out_after));
    run(s_bound_out);
    ok = expect_event(5, a(s_bound_out_insn), 0);
    reset(a(s_bound_in_after));
    run(s_bound_in);
    ok &= expect("events for BOUND within the bounds", ev.count, 0);
    report("BOUND: 9 outside [10, 20] faults through IVT entry 5 at the BOUND, 10 inside does not", ok);

    /* The handler sets CF and ZF in the FLAGS image; the interrupted code
     * must see them after the IRET (1 + 0 leaves CF = ZF = 0 before). */
    reset(0);
    set_image = FLAGS_CF | FLAGS_ZF;
    after_flags = 0;
    run(s_iret_flags);
    ok = expect_event(0x42, a(s_iret_flags_insn) + 2, 0);
    ok &= expect("CF | ZF before the INT", snap_flags & (FLAGS_CF | FLAGS_ZF), 0);
    ok &= expect("FLAGS after the IRET", after_flags, (uint16_t)(snap_flags | FLAGS_CF | FLAGS_ZF));
    ok &= expect("SP after the IRET", after_sp, snap_sp);
    report("IRET pops IP, CS and FLAGS: CF and ZF set in the image by the handler are seen after it", ok);

    /* int $0x0d: the #GP vector. Real mode never pushes an error code. */
    reset(0);
    after_sp = 0;
    run(s_int0d);
    ok = expect_event(0x0d, a(s_int0d_insn) + 2, 0);
    ok &= expect("SP after the IRET", after_sp, snap_sp);
    report("int $0x0d (an error-code vector in protected mode): no error code in real mode, SP restored", ok);

    /* IDTR.base moved: LIDT base = ivt_copy, whose entry 0x43 points at the
     * runtime's stub of vector 0x44. */
    for (unsigned v = 0; v < 256; v++)
        ivt_copy[v] = ivt_stub(v);
    ivt_copy[0x43] = ivt_stub(0x44);
    reset(0);
    lidt16(a((const char *)ivt_copy), 0x3FF);
    run(s_int43);
    lidt16(0, 0x3FF);
    ok = expect("events", ev.count, 1);
    ok &= expect("vector (the stub IVT entry 0x43 of the moved table points at)", ev.vector, 0x44);
    ok &= expect("IP", ev.ip, a(s_int43_after));
    report("real mode honours IDTR.base: int $0x43 uses the entry at base + 4 * 0x43", ok);

    /* A far IVT entry: CS:IP = 0x0100:(far_handler - 0x1000). */
    ivt_set(0x45, 0x0100, (uint16_t)(a(far_handler) - 0x1000));
    reset(0);
    after_sp = 0;
    run(s_int45);
    ok = expect("far handler runs", far_count, 1);
    ok &= expect("CS in the handler", far_cs, 0x0100);
    ok &= expect("saved CS", far_ret_cs, 0);
    ok &= expect("saved IP", far_ret_ip, a(s_int45_insn) + 2);
    ok &= expect("SP after the IRET", after_sp, snap_sp);
    report("IVT entry 0x45 = 0100:xxxx: the handler runs with CS 0x0100, IRET returns to CS 0", ok);

    reset(a(s_unreal_after));
    unreal_read = 0;
    run(s_unreal);
    __asm__ volatile("movw %w0, %%fs" ::"r"(0) : "memory");
    ok = expect("events (a #GP would be vector 13)", ev.count, 0);
    ok &= expect("value read back through FS at 2 MiB", unreal_read, 0x5aa5c33c);
    report("big real mode: a 4 GiB FS limit loaded in protected mode stays after CR0.PE=0; FS:EBX reaches 2 MiB", ok);
    return 0;
}
