/* Tandem test-guest runtime: TSS, IDT, dispatcher, COM1, printf, reporting. */
#include "runtime.h"

/* ---- Small libc (GCC may emit calls to these even when freestanding) ---- */
void *memset(void *d, int c, size_t n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    unsigned char *p = d;
    const unsigned char *q = s;
    if (p < q) {
        while (n--)
            *p++ = *q++;
    } else {
        while (n--)
            p[n] = q[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p - *q;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

/* ---- COM1 16550 ---------------------------------------------------------- */
#define COM1 0x3F8
#define UART_THR 0 /* transmit holding register (DLAB = 0) */
#define UART_DLL 0 /* divisor latch low (DLAB = 1) */
#define UART_IER 1 /* interrupt enable (DLAB = 0) */
#define UART_DLM 1 /* divisor latch high (DLAB = 1) */
#define UART_FCR 2 /* FIFO control */
#define UART_LCR 3 /* line control */
#define UART_MCR 4 /* modem control */
#define UART_LSR 5 /* line status */
#define LCR_DLAB 0x80
#define LCR_8N1 0x03
#define LSR_THRE 0x20

static void serial_init(void)
{
    outb(COM1 + UART_IER, 0x00);    /* no UART interrupts: we poll */
    outb(COM1 + UART_LCR, LCR_DLAB);
    outb(COM1 + UART_DLL, 0x01);    /* divisor 1: 115200 baud */
    outb(COM1 + UART_DLM, 0x00);
    outb(COM1 + UART_LCR, LCR_8N1); /* DLAB off, 8 data bits, no parity, 1 stop */
    outb(COM1 + UART_FCR, 0x07);    /* enable and clear both FIFOs */
    outb(COM1 + UART_MCR, 0x03);    /* DTR | RTS; OUT2 off (no IRQ to the PIC) */
}

void serial_putc(char c)
{
    while (!(inb(COM1 + UART_LSR) & LSR_THRE))
        ;
    outb(COM1 + UART_THR, (uint8_t)c);
}

void puts_raw(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/* ---- printf ------------------------------------------------------------- */
/* Supports %d %i %u %x %X %p %c %s %%, the length modifiers l and ll, the
 * flags '0' and '-', and a field width. Lines end with "\n" only. */
static int put_padded(const char *s, int len, int width, int left, char pad)
{
    int n = 0;
    if (!left)
        for (; width > len; width--, n++)
            serial_putc(pad);
    for (int i = 0; i < len; i++, n++)
        serial_putc(s[i]);
    if (left)
        for (; width > len; width--, n++)
            serial_putc(' ');
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    int out = 0;
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            out++;
            continue;
        }
        fmt++;
        int left = 0;
        char pad = ' ';
        for (;; fmt++) {
            if (*fmt == '-')
                left = 1;
            else if (*fmt == '0')
                pad = '0';
            else
                break;
        }
        int width = 0;
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        int lng = 0;
        while (*fmt == 'l') {
            lng++;
            fmt++;
        }
        char buf[24];
        int len = 0;
        uint64_t u;
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            int neg = v < 0;
            u = neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            char tmp[24];
            int t = 0;
            do {
                tmp[t++] = (char)('0' + u % 10);
                u /= 10;
            } while (u);
            if (neg)
                buf[len++] = '-';
            while (t)
                buf[len++] = tmp[--t];
            break;
        }
        case 'u':
        case 'x':
        case 'X':
        case 'p': {
            unsigned base = (*fmt == 'u') ? 10 : 16;
            const char *digits = (*fmt == 'X') ? "0123456789ABCDEF" : "0123456789abcdef";
            if (*fmt == 'p') {
                u = (uint64_t)(uintptr_t)va_arg(ap, void *);
                buf[len++] = '0';
                buf[len++] = 'x';
            } else {
                u = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            }
            char tmp[24];
            int t = 0;
            do {
                tmp[t++] = digits[u % base];
                u /= base;
            } while (u);
            while (t)
                buf[len++] = tmp[--t];
            break;
        }
        case 'c':
            buf[len++] = (char)va_arg(ap, int);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            out += put_padded(s, (int)strlen(s), width, left, ' ');
            continue;
        }
        case '%':
            buf[len++] = '%';
            break;
        case '\0':
            return out;
        default:
            buf[len++] = '%';
            buf[len++] = *fmt;
            break;
        }
        /* Zero padding goes after a sign or 0x prefix. */
        if (pad == '0' && !left && width > len && len > 0 && (buf[0] == '-' || (len > 1 && buf[1] == 'x'))) {
            int prefix = buf[0] == '-' ? 1 : 2;
            out += put_padded(buf, prefix, 0, 0, ' ');
            out += put_padded(buf + prefix, len - prefix, width - prefix, 0, '0');
        } else {
            out += put_padded(buf, len, width, left, pad);
        }
    }
    return out;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

/* ---- Reporting and exit ------------------------------------------------- */
static int passed, failed;

void report(const char *name, int ok)
{
    if (ok)
        passed++;
    else
        failed++;
    printf("%s: %s\n", ok ? "PASS" : "FAIL", name);
}

int summary(void)
{
    printf("SUMMARY: %d passed, %d failed\n", passed, failed);
    return failed;
}

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt" ::: "memory");
}

void exit(int code)
{
    outl(0xF4, (uint32_t)code);
    halt_forever();
}

/* ---- Multiboot ------------------------------------------------------------ */
const struct multiboot_info *multiboot_info(void)
{
    return (const struct multiboot_info *)(uintptr_t)mb_info_addr;
}

const char *multiboot_cmdline(void)
{
    const struct multiboot_info *mbi = multiboot_info();
    if (mb_magic != MULTIBOOT_BOOTLOADER_MAGIC || !mbi || !(mbi->flags & MBI_FLAG_CMDLINE) || !mbi->cmdline)
        return "";
    return (const char *)(uintptr_t)mbi->cmdline;
}

/* ---- TSS ------------------------------------------------------------------ */
/* The 64-bit TSS (SDM vol. 3, "Task Management in 64-bit Mode"). */
struct tss64 {
    uint32_t reserved0;
    uint64_t rsp[3];
    uint64_t reserved1;
    uint64_t ist[7];
    uint64_t reserved2;
    uint16_t reserved3;
    uint16_t iomap_base;
} __attribute__((packed));

static struct tss64 tss __attribute__((aligned(16)));
extern uint64_t gdt_tss_desc[2];

static void tss_init(void)
{
    tss.rsp[0] = (uint64_t)(uintptr_t)rsp0_stack_top;
    tss.ist[0] = (uint64_t)(uintptr_t)ist1_stack_top;
    /* No I/O permission bitmap: the offset points at the TSS limit, so with
     * IOPL 0 every port access from CPL 3 raises #GP. */
    tss.iomap_base = sizeof(tss);

    uint64_t base = (uint64_t)(uintptr_t)&tss;
    uint64_t limit = sizeof(tss) - 1;
    /* Type 9 = available 64-bit TSS, P = 1, DPL 0. */
    gdt_tss_desc[0] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ull << 40) |
                      (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    gdt_tss_desc[1] = base >> 32;
    __asm__ volatile("ltr %w0" ::"r"(SEL_TSS) : "memory");
}

/* ---- IDT ------------------------------------------------------------------ */
struct idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;       /* bits 2:0 */
    uint8_t type_attr; /* P | DPL | 0 | type (0xE = 64-bit interrupt gate) */
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static handler_fn handlers[256];
extern const uint64_t isr_stub_table[256];

static void idt_init(void)
{
    for (unsigned v = 0; v < 256; v++) {
        uint64_t a = isr_stub_table[v];
        idt[v].offset_low = (uint16_t)a;
        idt[v].selector = SEL_KERNEL_CODE;
        idt[v].ist = 0;
        idt[v].type_attr = 0x8E; /* present, DPL 0, interrupt gate */
        idt[v].offset_mid = (uint16_t)(a >> 16);
        idt[v].offset_high = (uint32_t)(a >> 32);
        idt[v].reserved = 0;
    }

    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uint64_t)(uintptr_t)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr) : "memory");
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

void set_gate_ist(unsigned vec, unsigned ist)
{
    if (vec < 256)
        idt[vec].ist = (uint8_t)(ist & 7);
}

extern char user_return_fault[];
void user_return_kernel(void) __attribute__((noreturn));

void isr_dispatch(struct frame *f)
{
    /* run_user's way back when SYSCALL did not reach CPL 0 (PVM): the #UD
     * of user_return_fault at CPL 3. The frame on the RSP0 stack is simply
     * dropped. */
    if (f->vector == 6 && f->rip == (uint64_t)(uintptr_t)user_return_fault && (f->cs & 3) == 3)
        user_return_kernel();
    handler_fn fn = f->vector < 256 ? handlers[f->vector] : 0;
    if (fn) {
        fn(f);
        return;
    }
    printf("UNEXPECTED EXCEPTION vec=%lu err=0x%lx rip=0x%lx cs=0x%lx", f->vector, f->error_code, f->rip, f->cs);
    if (f->vector == 14)
        printf(" cr2=0x%lx", read_cr2());
    printf("\n");
    exit(1);
}

/* ---- SYSCALL: the way back from run_user's CPL 3 code ------------------- */
/* SDM vol. 2B SYSCALL / SYSRET and vol. 3 5.8.8 "Fast System Calls in 64-Bit
 * Mode". SYSCALL loads CS = STAR[47:32] (0x08) and SS = STAR[47:32] + 8
 * (0x10). SYSRET (not used: run_user enters CPL 3 with IRETQ) would load
 * CS = STAR[63:48] + 16 and SS = STAR[63:48] + 8, both with RPL 3: with
 * STAR[63:48] = 0x13 that is 0x23 and 0x1b, which the GDT's order (user
 * data 0x18 before user code64 0x20) already fits. */
#define MSR_EFER 0xC0000080u
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_FMASK 0xC0000084u
#define EFER_SCE (1ull << 0)
#define RFLAGS_TF (1ull << 8)
#define RFLAGS_IF (1ull << 9)
#define RFLAGS_DF (1ull << 10)
#define RFLAGS_NT (1ull << 14)
#define RFLAGS_AC (1ull << 18)

extern char user_return_entry[];

static void syscall_init(void)
{
    wrmsr(MSR_STAR, ((uint64_t)(SEL_USER_DATA - 8) << 48) | ((uint64_t)SEL_KERNEL_CODE << 32));
    wrmsr(MSR_LSTAR, (uint64_t)(uintptr_t)user_return_entry);
    /* The entry runs with interrupts off, no single-step, DF = 0 (the C
     * ABI), AC = 0 and NT = 0. */
    wrmsr(MSR_FMASK, RFLAGS_IF | RFLAGS_TF | RFLAGS_DF | RFLAGS_NT | RFLAGS_AC);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SCE);
}

/* ---- Entry from boot.S ------------------------------------------------------ */
void runtime_start(void) __attribute__((noreturn));
void runtime_start(void)
{
    serial_init();
    tss_init();
    idt_init();
    syscall_init();
    int rc = main();
    int nfailed = summary();
    exit((nfailed || rc) ? 1 : 0);
}

/* ---- Check helpers (declared in hw.h) ------------------------------------- */
int expect(const char *what, uint64_t got, uint64_t want)
{
    if (got == want)
        return 1;
    printf("  %s: got 0x%lx, expected 0x%lx\n", what, got, want);
    return 0;
}

int expect_true(const char *what, int cond)
{
    if (!cond)
        printf("  %s\n", what);
    return cond != 0;
}
