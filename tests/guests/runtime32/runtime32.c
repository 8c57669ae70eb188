/* Tandem test-guest runtime, 32-bit protected-mode flavour: TSS, IDT,
 * dispatcher (SDM vol. 3, chapter 6 "Interrupt and Exception Handling" and
 * chapter 8 "Task Management"). */
#include "runtime32.h"

struct tss32 tss __attribute__((aligned(128)));

void set_gdt_entry(unsigned sel, uint64_t desc)
{
    unsigned i = sel >> 3;
    if (i > 0 && i < GDT_ENTRIES)
        gdt[i] = desc;
}

static void tss_init(void)
{
    tss.ss0 = SEL_KERNEL_DATA;
    tss.esp0 = (uint32_t)(uintptr_t)esp0_stack_top;
    tss.iomap_base = (uint16_t)offsetof(struct tss32, io_bitmap);
    memset(tss.io_bitmap, 0xFF, sizeof(tss.io_bitmap));
    tss.io_bitmap_end = 0xFF;
    /* Type 9: available 32-bit TSS, P = 1, DPL 0, byte granular. */
    set_gdt_entry(SEL_TSS, TSS_DESC((uint32_t)(uintptr_t)&tss, sizeof(tss) - 1));
    __asm__ volatile("ltr %w0" ::"r"(SEL_TSS) : "memory");
}

struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t zero;
    uint8_t type_attr; /* P | DPL | 0 | type (0xE interrupt gate, 0xF trap gate) */
    uint16_t offset_high;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(8)));
static handler_fn handlers[256];
extern const uint32_t isr_stub_table[256];

static void idt_init(void)
{
    for (unsigned v = 0; v < 256; v++) {
        uint32_t a = isr_stub_table[v];
        idt[v].offset_low = (uint16_t)a;
        idt[v].selector = SEL_KERNEL_CODE;
        idt[v].zero = 0;
        idt[v].type_attr = 0x8E;
        idt[v].offset_high = (uint16_t)(a >> 16);
    }
    set_gate_dpl(RUN_USER_VECTOR, 3);
    struct {
        uint16_t pad;
        uint16_t limit;
        uint32_t base;
    } __attribute__((packed, aligned(4))) idtr = {0, sizeof(idt) - 1, (uint32_t)(uintptr_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr.limit) : "memory");
}

void set_handler(unsigned vec, handler_fn fn)
{
    if (vec < 256)
        handlers[vec] = fn;
}

void set_gate_dpl(unsigned vec, unsigned dpl)
{
    if (vec < 256)
        idt[vec].type_attr = (uint8_t)((idt[vec].type_attr & ~0x60) | ((dpl & 3) << 5));
}

void set_gate_trap(unsigned vec, int trap)
{
    if (vec < 256)
        idt[vec].type_attr = (uint8_t)((idt[vec].type_attr & ~0x0F) | (trap ? 0xF : 0xE));
}

void set_gate_present(unsigned vec, int present)
{
    if (vec < 256)
        idt[vec].type_attr = (uint8_t)((idt[vec].type_attr & ~0x80) | (present ? 0x80 : 0));
}

uint64_t idt_gate(unsigned vec)
{
    uint64_t d = 0;
    if (vec < 256)
        memcpy(&d, &idt[vec], sizeof(d));
    return d;
}

void set_idt_gate(unsigned vec, uint64_t desc)
{
    if (vec < 256)
        memcpy(&idt[vec], &desc, sizeof(desc));
}

extern char user_return_int[];
void user_return_kernel(void) __attribute__((noreturn));

void isr_dispatch(struct frame *f);
void isr_dispatch(struct frame *f)
{
    /* run_user's way back: the INT 0xFE of its trampoline at CPL 3. */
    if (f->vector == RUN_USER_VECTOR && (f->cs & 3) == 3 &&
        f->eip == (uint32_t)(uintptr_t)user_return_int + 2)
        user_return_kernel();
    handler_fn fn = f->vector < 256 ? handlers[f->vector] : 0;
    if (fn) {
        fn(f);
        return;
    }
    printf("UNEXPECTED EXCEPTION vec=%u err=0x%x eip=0x%x cs=0x%x", f->vector, f->error_code, f->eip, f->cs);
    if (f->vector == 14)
        printf(" cr2=0x%x", read_cr2());
    printf("\n");
    exit(1);
}

void runtime32_start(void) __attribute__((noreturn));
void runtime32_start(void)
{
    serial_init();
    tss_init();
    idt_init();
    int rc = main();
    int nfailed = summary();
    exit((nfailed || rc) ? 1 : 0);
}
