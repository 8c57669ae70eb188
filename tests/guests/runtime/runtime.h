/* Tandem test-guest runtime: the API a guest's main() can use.
 *
 * The runtime enters at the multiboot entry point (32-bit protected mode),
 * switches to 64-bit long mode with interrupts off, sets up a GDT, a TSS, an
 * IDT of 256 gates and COM1, then calls the guest's main(). When main()
 * returns, the runtime calls summary() and exit(failed ? 1 : 0).
 * The runtime never enables interrupts (RFLAGS.IF = 0 throughout); the
 * interrupt guests do it themselves with the helpers of hw.h.
 */
#ifndef TANDEM_GUEST_RUNTIME_H
#define TANDEM_GUEST_RUNTIME_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- GDT selectors ---------------------------------------------------- */
#define SEL_KERNEL_CODE 0x08 /* 64-bit code, DPL 0 */
#define SEL_KERNEL_DATA 0x10 /* data, DPL 0 */
#define SEL_USER_DATA 0x1b   /* data, DPL 3 (0x18 | RPL 3) */
#define SEL_USER_CODE 0x23   /* 64-bit code, DPL 3 (0x20 | RPL 3) */
#define SEL_TSS 0x28         /* 64-bit TSS (16-byte descriptor) */
#define SEL_KERNEL_CODE32 0x38 /* 32-bit code, used only by the boot stub */

/* ---- Multiboot v1 ----------------------------------------------------- */
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
#define MBI_FLAG_MEM (1u << 0)
#define MBI_FLAG_CMDLINE (1u << 2)
#define MBI_FLAG_MMAP (1u << 6)

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
} __attribute__((packed));

/* EAX and EBX as the boot loader left them at the entry point. */
extern uint32_t mb_magic;
extern uint32_t mb_info_addr;
/* The multiboot info structure (NULL if EBX was 0). */
const struct multiboot_info *multiboot_info(void);
/* The command line, or "" if the loader gave none. */
const char *multiboot_cmdline(void);

/* ---- Interrupt frame -------------------------------------------------- */
/* What the common entry leaves on the stack, lowest address first: the GPRs
 * it saved, then what the vector stub pushed (vector, error code or a dummy
 * 0), then what the CPU pushed (RIP, CS, RFLAGS, RSP, SS: in 64-bit mode SS
 * and RSP are pushed even without a privilege change). */
struct frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector;
    uint64_t error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};

typedef void (*handler_fn)(struct frame *f);

/* Install (or with NULL remove) the C handler for a vector. A handler may
 * modify the frame; the common exit reloads the GPRs from it and IRETQs. */
void set_handler(unsigned vec, handler_fn fn);
/* Set a gate's DPL (0..3) and IST index (0 = none, 1..7). */
void set_gate_dpl(unsigned vec, unsigned dpl);
void set_gate_ist(unsigned vec, unsigned ist);

/* The dispatcher the assembly common entry calls. */
void isr_dispatch(struct frame *f);

/* ---- Stacks (symbols from boot.S; *_top is the initial RSP) ---------- */
extern char kernel_stack_bottom[], kernel_stack_top[];
extern char rsp0_stack_bottom[], rsp0_stack_top[]; /* TSS.RSP0 */
extern char ist1_stack_bottom[], ist1_stack_top[]; /* TSS.IST1 */
extern char user_stack_bottom[], user_stack_top[]; /* ring-3 stack */

/* ---- Paging ----------------------------------------------------------- */
/* The boot page tables: one PML4, one PDPT, four page directories that
 * identity-map 0..4 GiB with 2 MiB pages (P | RW | US | PS). boot_pd[i]
 * maps [i * 2 MiB, (i + 1) * 2 MiB). */
extern uint64_t boot_pml4[512];
extern uint64_t boot_pdpt[512];
extern uint64_t boot_pd[4 * 512];

#define PTE_P (1ull << 0)
#define PTE_RW (1ull << 1)
#define PTE_US (1ull << 2)
#define PTE_PS (1ull << 7)
#define PTE_NX (1ull << 63)

/* ---- Serial and printing ---------------------------------------------- */
void serial_putc(char c);
void puts_raw(const char *s); /* no newline added */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);

/* ---- Test reporting ---------------------------------------------------- */
void report(const char *name, int ok); /* "PASS: name" / "FAIL: name" */
int summary(void); /* "SUMMARY: N passed, M failed"; returns M */
/* Write code to the isa-debug-exit port 0xF4 (status (code << 1) | 1), then
 * halt forever with interrupts off in case the port is absent. */
void exit(int code) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn)); /* cli; hlt loop */

/* ---- Ring 3 ------------------------------------------------------------ */
/* Run fn at CPL 3 on user_stack_top with RFLAGS = 0x2 (IF = 0, IOPL = 0),
 * CS = SEL_USER_CODE, SS = SEL_USER_DATA (entered with IRETQ). When fn
 * returns, the trampoline executes SYSCALL (EFER.SCE, IA32_STAR/LSTAR/FMASK
 * set by the runtime), whose entry switches back to the kernel stack and
 * run_user returns. No IDT gate is involved, so every vector is free; fn
 * must not execute SYSCALL itself. fn must not do port I/O or printf (IOPL 0:
 * that #GPs); it may touch any memory (every page is user-accessible unless
 * a test changes that). */
void run_user(void (*fn)(void));

/* ---- Small libc ---------------------------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

/* ---- CPU helpers ------------------------------------------------------- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}

static inline uint64_t read_cr0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr2(void) { uint64_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr3(uint64_t v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void invlpg(uint64_t addr) { __asm__ volatile("invlpg (%0)" ::"r"(addr) : "memory"); }
static inline uint64_t read_rflags(void) { uint64_t v; __asm__ volatile("pushfq; popq %0" : "=r"(v)); return v; }
static inline uint64_t read_rsp(void) { uint64_t v; __asm__ volatile("mov %%rsp, %0" : "=r"(v)); return v; }

static inline void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(subleaf));
}

static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }

/* The guest's entry point, called by the runtime in long mode. */
int main(void);

#endif
