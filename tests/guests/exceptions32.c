/* exceptions32: exception and interrupt delivery in 32-bit protected mode.
 *
 * Written from the SDM vol. 3, chapter 6 ("Interrupt and Exception
 * Handling": 6.12.1 exception- or interrupt-handler procedures, the stack
 * usage with and without a privilege change (figure 6-4), 6.13 error code,
 * 6.15 exception reference, table 6-5 double faults), chapter 8 (the TSS's
 * SS0:ESP0, task gates, task return with EFLAGS.NT), 5.8 (call gates),
 * 21.2 (16-bit code and 16-bit gates in protected mode),
 * chapter 20 (virtual-8086 mode), vol. 1 19.5.2 (the I/O permission bitmap) and
 * 4.3 / 4.7 (32-bit paging, page-fault error code). Each check runs a
 * snippet (file-scope asm below) that stores ESP and EFLAGS right before
 * the instruction under test; one recording handler stores what the CPU
 * delivered (vector, error code, EIP, CS, EFLAGS, ESP and SS on a
 * privilege change, the address of the saved EIP, the handler's own stack
 * and EFLAGS) and, for a fault, resumes after the instruction.
 *
 * What is compared with the SDM: the vector; the error code; the saved EIP
 * (faults: the faulting instruction; traps and INT n: the next one); CS; the
 * EFLAGS image (RF ignored: hardware may set it for faults); where the frame
 * is: without a privilege change the saved EIP lies 12 bytes below the
 * interrupted ESP (EIP, CS, EFLAGS pushed on the same stack), with one (CPL
 * 3 -> 0) 20 bytes below TSS.ESP0 (SS, ESP, EFLAGS, CS, EIP), and then SS:ESP
 * saved are the interrupted ones; and that exactly one event arrived.
 */
#include "runtime32.h"
#include "pic_pit.h"

static uint32_t a(const char *p) { return (uint32_t)(uintptr_t)p; }

/* ---- Recording handler ---------------------------------------------------- */
struct event {
    uint32_t count, vector, err, eip, cs, eflags, esp, ss;
    uint32_t frame_addr;  /* address of the saved EIP */
    uint32_t handler_esp; /* the handler's stack (the frame pointer) */
    uint32_t handler_ss, handler_eflags, cr2;
};
static volatile struct event ev;
static volatile uint32_t resume_eip; /* != 0: a fault, resume there */
volatile uint32_t snap_esp, snap_eflags; /* set by the snippets */

static void record(struct frame *f)
{
    uint32_t ss, fl;
    __asm__ volatile("mov %%ss, %0; pushfl; popl %1" : "=r"(ss), "=r"(fl));
    ev.count++;
    ev.vector = f->vector;
    ev.err = f->error_code;
    ev.eip = f->eip;
    ev.cs = f->cs;
    ev.eflags = f->eflags;
    /* ESP and SS are on the frame after a privilege change: from CPL 3 or
     * from virtual-8086 mode (EFLAGS.VM in the image; CS is a real-mode
     * segment there). */
    int outer = (f->cs & 3) || (f->eflags & EFLAGS_VM);
    ev.esp = outer ? f->esp : 0;
    ev.ss = outer ? f->ss : 0;
    ev.frame_addr = (uint32_t)(uintptr_t)&f->eip;
    ev.handler_esp = (uint32_t)(uintptr_t)f;
    ev.handler_ss = ss & 0xFFFF;
    ev.handler_eflags = fl;
    ev.cr2 = f->vector == 14 ? read_cr2() : 0;
    if (resume_eip)
        f->eip = resume_eip;
}

static void reset(uint32_t resume)
{
    memset((void *)&ev, 0, sizeof(ev));
    resume_eip = resume;
    snap_esp = snap_eflags = 0;
}

/* ---- Snippets ------------------------------------------------------------- */
/* name: save the callee-saved registers, run `setup`, store EFLAGS and ESP,
 * then name_insn: the instruction under test, name_after: return. */
#define SNIPPET(name, setup, insn)                                                               \
    __asm__(".text\n.globl " #name "\n" #name ":\n"                                              \
            "pushl %ebx\npushl %esi\npushl %edi\npushl %ebp\n" setup "\n"                        \
            "pushfl\npopl snap_eflags\nmovl %esp, snap_esp\n"                                    \
            ".globl " #name "_insn\n" #name "_insn:\n" insn "\n"                                 \
            ".globl " #name "_after\n" #name "_after:\n"                                         \
            "popl %ebp\npopl %edi\npopl %esi\npopl %ebx\nret\n");                                \
    extern char name[], name##_insn[], name##_after[];

SNIPPET(s_de, "xorl %edx, %edx\nmovl $1, %eax\nxorl %ecx, %ecx", "divl %ecx")
SNIPPET(s_ud, "", "ud2")
SNIPPET(s_gp_sel, "movw $0x103, %ax", "movw %ax, %ds")
SNIPPET(s_np_ds, "movw $0x30, %ax", "movw %ax, %ds")
SNIPPET(s_ss_ss, "movw $0x30, %ax", "movw %ax, %ss")
SNIPPET(s_np_gate, "", "int $0x41")
SNIPPET(s_ts_iret, "pushfl\norl $0x4000, (%esp)\npopfl", "iret")
SNIPPET(s_bp, "", "int3")
SNIPPET(s_into_of, "movl $0x7fffffff, %eax\naddl $1, %eax", "into")
SNIPPET(s_into_nof, "xorl %eax, %eax", "into")
SNIPPET(s_int80, "", "int $0x80")
/* BOUND r32, m32&32: bounds [10, 20]. */
volatile int32_t bound_pair[2] = {10, 20};
SNIPPET(s_bound_out, "movl $21, %eax", "boundl %eax, bound_pair")
SNIPPET(s_bound_in, "movl $20, %eax", "boundl %eax, bound_pair")
SNIPPET(s_int80_if, "sti", "int $0x80")
SNIPPET(s_int81_if, "sti", "int $0x81")
SNIPPET(s_df, "movw $0x103, %ax", "movw %ax, %ds")
/* Paging: EAX = value read, ECX = address. */
volatile uint32_t pf_addr, pf_value;
SNIPPET(s_pf_read, "movl pf_addr, %ecx", "movl (%ecx), %eax\nmovl %eax, pf_value")
SNIPPET(s_pf_write, "movl pf_addr, %ecx\nmovl pf_value, %eax", "movl %eax, (%ecx)")
/* Ring 3: after the INT, record what IRET restored. */
volatile uint32_t after_cs, after_ss, after_esp, after_eflags;
SNIPPET(u_int80, "", "int $0x80\nmovw %cs, after_cs\nmovw %ss, after_ss\nmovl %esp, after_esp\n"
                     "pushfl\npopl after_eflags")
SNIPPET(u_int82, "", "int $0x82")
SNIPPET(u_cli, "", "cli")
SNIPPET(u_hlt, "", "hlt")
SNIPPET(u_pf_read, "movl pf_addr, %ecx", "movl (%ecx), %eax\nmovl %eax, pf_value")
SNIPPET(u_io, "movb $0x5a, %al\noutb %al, $0x80\nmovl $1, pf_value", "outb %al, $0x81")

/* Call gate: the ring-0 end records the frame the far CALL built on the
 * ESP0 stack (SDM vol. 3, 5.8.5, figure 5-13: from high to low SS, ESP, the
 * copied parameter, CS, EIP) and returns with RET 4, which releases the
 * parameter on both stacks. */
volatile uint32_t cg_eip, cg_cs, cg_param, cg_esp, cg_ss, cg_handler_esp, cg_handler_cs, cg_handler_ss;
__asm__(".text\ncg_entry:\n"
        "movl %esp, cg_handler_esp\n"
        "movw %cs, cg_handler_cs\nmovw %ss, cg_handler_ss\n"
        "pushl %eax\n"
        "movl 4(%esp), %eax\nmovl %eax, cg_eip\n"
        "movl 8(%esp), %eax\nmovl %eax, cg_cs\n"
        "movl 12(%esp), %eax\nmovl %eax, cg_param\n"
        "movl 16(%esp), %eax\nmovl %eax, cg_esp\n"
        "movl 20(%esp), %eax\nmovl %eax, cg_ss\n"
        "popl %eax\n"
        "lret $4\n");
extern char cg_entry[];
/* After the far call, ESP is restored from the snapshot whatever RET did. */
SNIPPET(u_callgate, "pushl $0x1234abcd",
        "lcall $0x43, $0\nmovl %esp, after_esp\nmovw %cs, after_cs\nmovw %ss, after_ss\n"
        "movl snap_esp, %esp\naddl $4, %esp")

/* #DF through a task gate: the double-fault task records its error code
 * (pushed on its own stack), EFLAGS.NT and TR, points the interrupted
 * task's saved EIP past the faulting instruction and IRETs: with NT = 1 a
 * task return to TSS.back_link (SDM vol. 3, 8.3 and 8.4). */
static struct tss32 df_tss __attribute__((aligned(128)));
static char df_stack[4096] __attribute__((aligned(16)));
volatile uint32_t df_ran, df_err, df_eflags, df_tr;
SNIPPET(s_dftask, "movw $0x103, %ax", "movw %ax, %ds")
__asm__(".text\ndf_task_entry:\n"
        "popl df_err\n"
        "pushfl\npopl df_eflags\n"
        "str %ax\nmovw %ax, df_tr\n"
        "incl df_ran\n"
        "movl $s_dftask_after, tss + 0x20\n" /* TSS.EIP */
        "iret\n"
        "jmp df_task_entry\n");
extern char df_task_entry[];

/* Virtual-8086 mode: v86_enter(eflags) IRETs from ring 0 into V86 code at
 * 0600:0000 (linear 0x6000) with SS:SP 0700:0FF0 and ES/DS/FS/GS 0x1111 /
 * 0x2222 / 0x3333 / 0x4444; the handler of what the V86 code raises ends
 * V86 mode with v86_leave(), which drops the ring-0 frame and returns from
 * v86_enter. SDM vol. 3, 20.2 and 20.3 (interrupt and exception handling
 * in virtual-8086 mode, figure 20-4: the ring-0 stack frame). */
volatile uint32_t v86_saved_esp;
__asm__(".text\nv86_enter:\n"
        "pushl %ebp\npushl %ebx\npushl %esi\npushl %edi\n"
        "movl 20(%esp), %eax\n"
        "movl %esp, v86_saved_esp\n"
        "pushl $0x4444\npushl $0x3333\npushl $0x2222\npushl $0x1111\n" /* GS FS DS ES */
        "pushl $0x0700\npushl $0x0ff0\n"                                  /* SS ESP */
        "pushl %eax\npushl $0x0600\npushl $0\n"                          /* EFLAGS CS EIP */
        "iret\n"
        "v86_leave:\n"
        "movw $0x10, %ax\nmovw %ax, %ds\nmovw %ax, %es\nmovw %ax, %fs\nmovw %ax, %gs\n"
        "movl v86_saved_esp, %esp\n"
        "popl %edi\npopl %esi\npopl %ebx\npopl %ebp\nret\n");
void v86_enter(uint32_t eflags);
void v86_leave(void) __attribute__((noreturn));
/* mov $0x1234, %ax; int $0x31; hlt; jmp $ (16-bit code). */
static const uint8_t v86_code[] = {0xB8, 0x34, 0x12, 0xCD, 0x31, 0xF4, 0xEB, 0xFE};
#define V86_CODE 0x6000u
volatile uint32_t v86_es, v86_ds, v86_fs, v86_gs, v86_eax, v86_handler_segs;

static void v86_handler(struct frame *f)
{
    record(f);
    const uint32_t *v86_segs = &f->ss + 1; /* ES, DS, FS, GS above SS */
    v86_es = v86_segs[0];
    v86_ds = v86_segs[1];
    v86_fs = v86_segs[2];
    v86_gs = v86_segs[3];
    v86_eax = f->eax;
    v86_handler_segs = (f->ds & 0xFFFF) | (f->es & 0xFFFF) | (f->fs & 0xFFFF) | (f->gs & 0xFFFF);
    v86_leave();
}

static int expect_v86_event(uint32_t vector, uint32_t err, uint32_t eip, uint32_t eflags)
{
    int ok = expect("events", ev.count, 1);
    ok &= expect("vector", ev.vector, vector);
    ok &= expect("error code", ev.err, err);
    ok &= expect("EIP", ev.eip, eip);
    ok &= expect("CS", ev.cs & 0xFFFF, 0x0600);
    ok &= expect("EFLAGS image", ev.eflags & ~EFLAGS_RF, eflags);
    ok &= expect("ESP", ev.esp, 0x0ff0);
    ok &= expect("SS", ev.ss & 0xFFFF, 0x0700);
    ok &= expect("ES", v86_es & 0xFFFF, 0x1111);
    ok &= expect("DS", v86_ds & 0xFFFF, 0x2222);
    ok &= expect("FS", v86_fs & 0xFFFF, 0x3333);
    ok &= expect("GS", v86_gs & 0xFFFF, 0x4444);
    ok &= expect("saved EIP at (TSS.ESP0 - 36)", ev.frame_addr, a(esp0_stack_top) - 36);
    ok &= expect("DS | ES | FS | GS in the handler (null)", v86_handler_segs, 0);
    ok &= expect("AX set by the V86 code", v86_eax & 0xFFFF, 0x1234);
    return ok;
}

/* 16-bit protected mode: t16_run() far-jumps to 16-bit code (GDT 0x48: a
 * 16-bit code segment whose base is t16_start) that executes int $0x32
 * through a 16-bit interrupt gate (type 6) to a 16-bit handler in the same
 * segment, then far-jumps back to 32-bit code. SS stays the 32-bit kernel
 * stack (B = 1: ESP is used). SDM vol. 3, 6.12.1 and figure 6-4 with a
 * 16-bit gate: FLAGS, CS and IP are pushed as words; 21.2 (16-bit code in
 * protected mode). Data is reached through DS (flat) with 32-bit addresses. */
volatile uint32_t t16_saved_esp, t16_snap_esp, t16_after_esp, t16_h_esp, t16_h_count;
volatile uint16_t t16_snap_flags, t16_h_ip, t16_h_cs, t16_h_flags;
__asm__(".text\n"
        "t16_run:\n"
        "pushl %ebx\npushl %esi\npushl %edi\npushl %ebp\n"
        "movl %esp, t16_saved_esp\n"
        "ljmpl *t16_farptr\n"
        "t32_back:\n"
        "movl t16_saved_esp, %esp\n"
        "popl %ebp\npopl %edi\npopl %esi\npopl %ebx\nret\n"
        ".balign 16\n.code16\n"
        "t16_start:\n"
        "pushfw\naddr32 popw t16_snap_flags\n"
        "addr32 movl %esp, t16_snap_esp\n"
        "t16_int:\n"
        "int $0x32\n"
        "addr32 movl %esp, t16_after_esp\n"
        "ljmpl $0x08, $t32_back\n"
        "t16_handler:\n"
        "addr32 movl %esp, t16_h_esp\n"
        "pushw %ax\n"
        "movw 2(%esp), %ax\naddr32 movw %ax, t16_h_ip\n"
        "movw 4(%esp), %ax\naddr32 movw %ax, t16_h_cs\n"
        "movw 6(%esp), %ax\naddr32 movw %ax, t16_h_flags\n"
        "addr32 incl t16_h_count\n"
        "popw %ax\n"
        "iret\n"
        ".code32\n"
        ".data\n.balign 4\nt16_farptr:\n.long 0\n.word 0x48\n.text\n");
extern char t16_start[], t16_int[], t16_handler[];
void t16_run(void);

static void run(const char *snippet) { ((void (*)(void))(uintptr_t)snippet)(); }


/* The frame checks shared by every same-privilege event. */
static int expect_event(uint32_t vector, uint32_t err, uint32_t eip, int fault)
{
    int ok = expect("events", ev.count, 1);
    ok &= expect("vector", ev.vector, vector);
    ok &= expect("error code", ev.err, err);
    ok &= expect("EIP", ev.eip, eip);
    ok &= expect("CS", ev.cs, SEL_KERNEL_CODE);
    uint32_t mask = fault ? ~EFLAGS_RF : ~0u;
    ok &= expect("EFLAGS image", ev.eflags & mask, snap_eflags & mask);
    ok &= expect("saved EIP at (interrupted ESP - 12)", ev.frame_addr, snap_esp - 12);
    return ok;
}

/* The same for an event from CPL 3 (through TSS.SS0:ESP0). */
static int expect_event_ring3(uint32_t vector, uint32_t err, uint32_t eip, int fault)
{
    int ok = expect("events", ev.count, 1);
    ok &= expect("vector", ev.vector, vector);
    ok &= expect("error code", ev.err, err);
    ok &= expect("EIP", ev.eip, eip);
    ok &= expect("CS", ev.cs, SEL_USER_CODE);
    uint32_t mask = fault ? ~EFLAGS_RF : ~0u;
    ok &= expect("EFLAGS image", ev.eflags & mask, snap_eflags & mask);
    ok &= expect("saved ESP", ev.esp, snap_esp);
    ok &= expect("saved SS", ev.ss, SEL_USER_DATA);
    ok &= expect("saved EIP at (TSS.ESP0 - 20)", ev.frame_addr, a(esp0_stack_top) - 20);
    ok &= expect("handler SS = TSS.SS0", ev.handler_ss, SEL_KERNEL_DATA);
    ok &= expect_true("handler stack inside the ESP0 stack",
                      ev.handler_esp > a(esp0_stack_bottom) && ev.handler_esp < a(esp0_stack_top));
    return ok;
}

/* ---- Paging ----------------------------------------------------------------- */
static uint32_t page_dir[1024] __attribute__((aligned(4096)));
static uint32_t page_table0[1024] __attribute__((aligned(4096))); /* 0-4 MiB identity */
static uint32_t page_table1[1024] __attribute__((aligned(4096))); /* 4-8 MiB: test pages */
#define PTE_P 1u
#define PTE_RW 2u
#define PTE_US 4u
#define PAGE_NP 0x400000u   /* not present */
#define PAGE_RO 0x401000u   /* read-only */
#define PAGE_SUP 0x402000u  /* supervisor */

static void pf_handler(struct frame *f)
{
    record(f);
    uint32_t i = (read_cr2() - 0x400000u) >> 12;
    if (i < 1024) {
        /* Grant what was missing, then retry the instruction. */
        page_table1[i] |= PTE_P | PTE_RW | PTE_US;
        invlpg(read_cr2());
    }
}

static void paging_on(void)
{
    for (uint32_t i = 0; i < 1024; i++) {
        page_table0[i] = (i << 12) | PTE_P | PTE_RW | PTE_US;
        page_table1[i] = (0x400000u + (i << 12)) | PTE_P | PTE_RW | PTE_US;
    }
    page_dir[0] = (uint32_t)(uintptr_t)page_table0 | PTE_P | PTE_RW | PTE_US;
    page_dir[1] = (uint32_t)(uintptr_t)page_table1 | PTE_P | PTE_RW | PTE_US;
    page_table1[0] &= ~PTE_P;
    page_table1[1] &= ~PTE_RW;
    page_table1[2] &= ~PTE_US;
    /* Paging is still off: these are physical writes. */
    *(volatile uint32_t *)PAGE_NP = 0x11111111;
    *(volatile uint32_t *)PAGE_RO = 0x22222222;
    *(volatile uint32_t *)PAGE_SUP = 0x33333333;
    write_cr3((uint32_t)(uintptr_t)page_dir);
    write_cr0(read_cr0() | (1u << 31) | (1u << 16)); /* PG | WP */
}

/* ---- Stray interrupts --------------------------------------------------------- */
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
    /* The 8259As at 0x20 / 0x28, all masked: the checks that run with
     * IF = 1 must see only their own INT n. */
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    for (unsigned v = 0x20; v < 0x30; v++)
        set_handler(v, stray_handler);
    for (unsigned v = 0; v < 20; v++)
        set_handler(v, record);
    set_handler(0x80, record);
    set_handler(0x81, record);
    set_gate_trap(0x81, 1);
    set_handler(0x82, record);
    set_handler(0x41, record);

    int ok;
    reset(a(s_de_after));
    run(s_de);
    report("#DE divide error: fault at the DIV, no error code", expect_event(0, 0, a(s_de_insn), 1));

    reset(a(s_ud_after));
    run(s_ud);
    report("#UD ud2: fault at the UD2", expect_event(6, 0, a(s_ud_insn), 1));

    reset(a(s_gp_sel_after));
    run(s_gp_sel);
    report("#GP loading selector 0x103 (beyond the GDT limit) into DS: err=0x100",
           expect_event(13, 0x100, a(s_gp_sel_insn), 1));

    /* A data segment with P = 0 (access byte 0x12: DPL 0, read/write). */
    set_gdt_entry(SEL_SPARE0, SEG_DESC_FLAT(0x12));
    reset(a(s_np_ds_after));
    run(s_np_ds);
    report("#NP loading a not-present data segment into DS: err=0x30 (the selector)",
           expect_event(11, 0x30, a(s_np_ds_insn), 1));

    reset(a(s_ss_ss_after));
    run(s_ss_ss);
    report("#SS loading a not-present data segment into SS: err=0x30 (the selector)",
           expect_event(12, 0x30, a(s_ss_ss_insn), 1));

    set_gate_present(0x41, 0);
    reset(a(s_np_gate_after));
    run(s_np_gate);
    set_gate_present(0x41, 1);
    report("#NP int $0x41 through a not-present gate: err=0x20a (IDT bit), fault at the INT",
           expect_event(11, 0x41 * 8 + 2, a(s_np_gate_insn), 1));

    /* IRET with NT = 1 is a task return to TSS.back_link (SDM IRET, 8.3):
     * a back link that is no busy TSS (here the data segment 0x10) #TSes. */
    tss.back_link = SEL_KERNEL_DATA;
    reset(a(s_ts_iret_after));
    set_handler(10, record);
    run(s_ts_iret);
    tss.back_link = 0;
    ok = expect_event(10, SEL_KERNEL_DATA, a(s_ts_iret_insn), 1);
    ok &= expect("EFLAGS.NT in the image", ev.eflags & EFLAGS_NT, EFLAGS_NT);
    ok &= expect("EFLAGS.NT in the handler (cleared by the gate)", ev.handler_eflags & EFLAGS_NT, 0);
    report("#TS IRET with EFLAGS.NT = 1 and a back link that is not a TSS: err=0x10", ok);
    /* The handler returned with the image's NT = 1: the snippet clears it. */
    __asm__ volatile("pushfl; andl $~0x4000, (%%esp); popfl" ::: "memory", "cc");

    reset(0);
    run(s_bp);
    report("#BP int3: trap, EIP after the INT3", expect_event(3, 0, a(s_bp_after), 0));

    reset(0);
    run(s_into_of);
    ok = expect_event(4, 0, a(s_into_of_after), 0);
    reset(0);
    run(s_into_nof);
    ok &= expect("events for INTO with OF = 0", ev.count, 0);
    report("INTO: #OF (vector 4) as a trap with OF = 1, nothing with OF = 0", ok);

    reset(a(s_bound_out_after));
    run(s_bound_out);
    ok = expect_event(5, 0, a(s_bound_out_insn), 1);
    reset(a(s_bound_in_after));
    run(s_bound_in);
    ok &= expect("events for BOUND within the bounds", ev.count, 0);
    report("#BR bound: 21 outside [10, 20] faults at the BOUND (vector 5), 20 inside does not", ok);

    reset(0);
    run(s_int80);
    ok = expect_event(0x80, 0, a(s_int80_after), 0);
    ok &= expect("handler SS", ev.handler_ss, SEL_KERNEL_DATA);
    report("int $0x80 from ring 0, DPL0 gate: EIP after, no stack switch", ok);

    reset(0);
    run(s_int80_if);
    cli();
    ok = expect_event(0x80, 0, a(s_int80_if_after), 0);
    ok &= expect("interrupt gate: IF in the image", ev.eflags & EFLAGS_IF, EFLAGS_IF);
    ok &= expect("interrupt gate: IF in the handler", ev.handler_eflags & EFLAGS_IF, 0);
    reset(0);
    run(s_int81_if);
    cli();
    ok &= expect_event(0x81, 0, a(s_int81_if_after), 0);
    ok &= expect("trap gate: IF in the handler", ev.handler_eflags & EFLAGS_IF, EFLAGS_IF);
    ok &= expect("stray interrupts", strays, 0);
    report("interrupt gate clears IF in the handler, trap gate keeps IF = 1; IRET restores it", ok);

    /* ---- 32-bit paging ---- */
    paging_on();
    set_handler(14, pf_handler);

    pf_addr = PAGE_NP;
    reset(0);
    run(s_pf_read);
    ok = expect_event(14, 0x0, a(s_pf_read_insn), 1);
    ok &= expect("CR2", ev.cr2, PAGE_NP);
    ok &= expect("value read after the handler mapped the page", pf_value, 0x11111111);
    report("#PF not-present read (ring 0): err=0x0, CR2", ok);

    pf_addr = PAGE_RO;
    pf_value = 0x44444444;
    reset(0);
    run(s_pf_write);
    ok = expect_event(14, 0x3, a(s_pf_write_insn), 1);
    ok &= expect("CR2", ev.cr2, PAGE_RO);
    ok &= expect("memory after the write completed", *(volatile uint32_t *)PAGE_RO, 0x44444444);
    report("#PF write to a read-only page (ring 0, CR0.WP=1): err=0x3, CR2", ok);

    pf_addr = PAGE_SUP;
    pf_value = 0;
    reset(0);
    run_user((void (*)(void))(uintptr_t)u_pf_read);
    ok = expect_event_ring3(14, 0x5, a(u_pf_read_insn), 1);
    ok &= expect("CR2", ev.cr2, PAGE_SUP);
    ok &= expect("value read after the handler allowed CPL 3", pf_value, 0x33333333);
    report("#PF read of a supervisor page (ring 3): err=0x5, CR2", ok);

    /* ---- Ring 3 -> ring 0 through the TSS ---- */
    set_gate_dpl(0x80, 3);
    reset(0);
    after_cs = after_ss = after_esp = after_eflags = 0;
    run_user((void (*)(void))(uintptr_t)u_int80);
    report("int $0x80 from ring 3, DPL3 gate: stack switch to TSS.SS0:ESP0, user SS:ESP and CS saved",
           expect_event_ring3(0x80, 0, a(u_int80_insn) + 2, 0)); /* INT imm8: 2 bytes */
    ok = expect("CS after IRET", after_cs & 0xFFFF, SEL_USER_CODE);
    ok &= expect("SS after IRET", after_ss & 0xFFFF, SEL_USER_DATA);
    ok &= expect("ESP after IRET", after_esp, snap_esp);
    ok &= expect("EFLAGS after IRET", after_eflags, snap_eflags);
    report("IRET back to ring 3: CS 0x1b, SS 0x23, ESP and EFLAGS as before the INT", ok);
    set_gate_dpl(0x80, 0);

    reset(a(u_int82_after));
    run_user((void (*)(void))(uintptr_t)u_int82);
    report("int $0x82 from ring 3 into a DPL0 gate: #GP, err=0x412",
           expect_event_ring3(13, 0x82 * 8 + 2, a(u_int82_insn), 1));

    /* IOPL 0 at CPL 3: CLI and HLT are #GP(0) faults (SDM vol. 2 CLI,
     * HLT; vol. 3, 2.8 / 6.15). */
    reset(a(u_cli_after));
    run_user((void (*)(void))(uintptr_t)u_cli);
    ok = expect_event_ring3(13, 0, a(u_cli_insn), 1);
    reset(a(u_hlt_after));
    run_user((void (*)(void))(uintptr_t)u_hlt);
    ok &= expect_event_ring3(13, 0, a(u_hlt_insn), 1);
    report("CLI (IOPL 0) and HLT at CPL 3: #GP, err=0, fault at the instruction", ok);

    /* I/O permission bitmap: port 0x80 allowed, 0x81 denied (IOPL 0). */
    tss.io_bitmap[0x80 / 8] &= (uint8_t)~(1u << (0x80 % 8));
    pf_value = 0;
    reset(a(u_io_after));
    run_user((void (*)(void))(uintptr_t)u_io);
    ok = expect("OUT to port 0x80 ran (the instruction after it did)", pf_value, 1);
    ok &= expect_event_ring3(13, 0, a(u_io_insn), 1);
    report("I/O bitmap at CPL 3, IOPL 0: OUT to port 0x80 (bit clear) runs, port 0x81 (bit set) #GPs with err=0",
           ok);

    /* Call gate at 0x40 (DPL 3, one parameter) to cg_entry in ring 0. */
    set_gdt_entry(SEL_SPARE2, CALL_GATE(SEL_KERNEL_CODE, a(cg_entry), 3, 1));
    reset(0);
    after_cs = after_ss = after_esp = 0;
    cg_cs = cg_ss = cg_handler_cs = cg_handler_ss = 0;
    run_user((void (*)(void))(uintptr_t)u_callgate);
    ok = expect("events", ev.count, 0);
    ok &= expect("saved EIP (after the 7-byte CALL FAR)", cg_eip, a(u_callgate_insn) + 7);
    ok &= expect("saved CS", cg_cs & 0xFFFF, SEL_USER_CODE);
    ok &= expect("copied parameter", cg_param, 0x1234abcd);
    ok &= expect("saved ESP", cg_esp, snap_esp);
    ok &= expect("saved SS", cg_ss & 0xFFFF, SEL_USER_DATA);
    ok &= expect("ring-0 ESP (TSS.ESP0 - 20)", cg_handler_esp, a(esp0_stack_top) - 20);
    ok &= expect("ring-0 CS", cg_handler_cs & 0xFFFF, SEL_KERNEL_CODE);
    ok &= expect("ring-0 SS (TSS.SS0)", cg_handler_ss & 0xFFFF, SEL_KERNEL_DATA);
    ok &= expect("CS after RET 4", after_cs & 0xFFFF, SEL_USER_CODE);
    ok &= expect("SS after RET 4", after_ss & 0xFFFF, SEL_USER_DATA);
    ok &= expect("ESP after RET 4 (parameter released)", after_esp, snap_esp + 4);
    report("call gate from ring 3 (1 parameter): ring 0 on TSS.SS0:ESP0 with SS, ESP, the copied parameter, CS, "
           "EIP; RET 4 back to ring 3",
           ok);

    /* Virtual-8086 mode, IOPL 3: INT n goes through the IDT (gate DPL 3)
     * to ring 0 with the V86 segment registers on the ESP0 stack. */
    memcpy((void *)V86_CODE, v86_code, sizeof(v86_code));
    set_handler(0x31, v86_handler);
    set_gate_dpl(0x31, 3);
    reset(0);
    v86_eax = 0;
    v86_enter(0x20000 | 0x3000 | 0x2); /* VM, IOPL 3 */
    report("V86 mode, IOPL 3: int $0x31 through a DPL3 gate to ring 0 on TSS.ESP0 with GS, FS, DS, ES, SS, ESP, "
           "EFLAGS (VM=1), CS, EIP; null DS/ES/FS/GS in the handler",
           expect_v86_event(0x31, 0, 5, 0x23002));

    /* IOPL 0: INT n in V86 mode is a #GP(0) to the ring-0 monitor. */
    set_handler(13, v86_handler);
    reset(0);
    v86_eax = 0;
    v86_enter(0x20000 | 0x2); /* VM, IOPL 0 */
    set_handler(13, record);
    report("V86 mode, IOPL 0: int $0x31 is a #GP(0) to ring 0, EIP at the INT",
           expect_v86_event(13, 0, 3, 0x20002));

    /* 16-bit protected mode, 16-bit interrupt gate. */
    uint32_t base16 = a(t16_start);
    set_gdt_entry(SEL_SPARE3, 0x00009A000000FFFFull | ((uint64_t)(base16 & 0xFFFFFF) << 16) |
                                  ((uint64_t)(base16 >> 24) << 56)); /* 16-bit code, limit 64 KiB */
    uint32_t h16 = a(t16_handler) - base16;
    set_idt_gate(0x32, (h16 & 0xFFFF) | ((uint64_t)SEL_SPARE3 << 16) | (0x86ull << 40)); /* type 6 */
    t16_h_count = 0;
    t16_run();
    ok = expect("handler runs", t16_h_count, 1);
    ok &= expect("saved IP (after the INT, segment-relative)", t16_h_ip, a(t16_int) + 2 - base16);
    ok &= expect("saved CS", t16_h_cs, SEL_SPARE3);
    ok &= expect("saved FLAGS", t16_h_flags, t16_snap_flags);
    ok &= expect("frame: 3 words below the interrupted ESP", t16_h_esp, t16_snap_esp - 6);
    ok &= expect("ESP after the 16-bit IRET", t16_after_esp, t16_snap_esp);
    report("16-bit protected mode: int $0x32 through a 16-bit interrupt gate pushes FLAGS, CS, IP as words; a "
           "16-bit IRET returns",
           ok);

    /* #DF: the #GP of the selector load finds gate 13 not present, so its
     * delivery raises #NP: a contributory exception while delivering a
     * contributory one is a double fault (SDM table 6-5), error code 0. */
    set_gate_present(13, 0);
    reset(a(s_df_after));
    run(s_df);
    set_gate_present(13, 1);
    ok = expect("events", ev.count, 1);
    ok &= expect("vector", ev.vector, 8);
    ok &= expect("error code", ev.err, 0);
    ok &= expect("CS", ev.cs, SEL_KERNEL_CODE);
    report("#DF: #GP through a not-present gate 13 raises #NP, a double fault: vector 8, err=0", ok);

    /* The same double fault through a task gate to df_tss. */
    df_tss.eip = a(df_task_entry);
    df_tss.esp = a(df_stack) + sizeof(df_stack);
    df_tss.eflags = 0x2;
    df_tss.cs = SEL_KERNEL_CODE;
    df_tss.ss = df_tss.ds = df_tss.es = df_tss.fs = df_tss.gs = SEL_KERNEL_DATA;
    df_tss.cr3 = read_cr3();
    df_tss.iomap_base = 0x68; /* beyond the limit: no I/O bitmap */
    tss.cr3 = read_cr3();     /* loaded again by the task return */
    set_gdt_entry(SEL_SPARE1, TSS_DESC(a((const char *)&df_tss), 0x67));
    uint64_t gate8 = idt_gate(8);
    set_idt_gate(8, TASK_GATE(SEL_SPARE1));
    set_gate_present(13, 0);
    reset(0);
    run(s_dftask);
    set_gate_present(13, 1);
    set_idt_gate(8, gate8);
    uint16_t tr;
    __asm__ volatile("str %0" : "=r"(tr));
    ok = expect("double-fault task ran", df_ran, 1);
    ok &= expect("events through the IDT handlers", ev.count, 0);
    ok &= expect("error code on the new task's stack", df_err, 0);
    ok &= expect("TR in the double-fault task", df_tr & 0xFFFF, SEL_SPARE1);
    ok &= expect("EFLAGS.NT in the double-fault task", df_eflags & EFLAGS_NT, EFLAGS_NT);
    ok &= expect("back link", df_tss.back_link, SEL_TSS);
    ok &= expect("TR after the task return", tr, SEL_TSS);
    ok &= expect("double-fault TSS type after the return (available)", (uint32_t)(gdt[SEL_SPARE1 >> 3] >> 40) & 0xF, 0x9);
    ok &= expect("our TSS type (busy)", (uint32_t)(gdt[SEL_TSS >> 3] >> 40) & 0xF, 0xB);
    report("#DF through a task gate: task switch to the double-fault TSS (NT, back link, err=0 on its stack), "
           "IRET returns to the interrupted task",
           ok);
    return 0;
}
