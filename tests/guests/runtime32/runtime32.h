/* Tandem test-guest runtime, 32-bit protected-mode flavour (gcc -m32).
 *
 * boot.S stays in 32-bit protected mode after the multiboot entry: our own
 * GDT (ring-0 and ring-3 flat code / data, a 32-bit TSS, spare slots), a
 * 32-bit TSS with SS0:ESP0 and an I/O permission bitmap, an IDT of 256
 * 32-bit interrupt gates, paging off, EFLAGS.IF = 0. Then main(); when it
 * returns, summary() and exit(failed || rc ? 1 : 0). The printing and
 * reporting API is legacy.h's (the same as the 64-bit runtime's). */
#ifndef TANDEM_GUEST_RUNTIME32_H
#define TANDEM_GUEST_RUNTIME32_H

#include "legacy.h"

/* ---- GDT ---------------------------------------------------------------- */
#define SEL_KERNEL_CODE 0x08 /* 32-bit code, DPL 0 */
#define SEL_KERNEL_DATA 0x10 /* data, DPL 0 */
#define SEL_USER_CODE 0x1b   /* 32-bit code, DPL 3 (0x18 | RPL 3) */
#define SEL_USER_DATA 0x23   /* data, DPL 3 (0x20 | RPL 3) */
#define SEL_TSS 0x28         /* 32-bit TSS */
#define SEL_SPARE0 0x30      /* 0x30..0x48: free for set_gdt_entry() */
#define SEL_SPARE1 0x38
#define SEL_SPARE2 0x40
#define SEL_SPARE3 0x48
#define GDT_ENTRIES 10       /* GDT limit 0x4f */

extern uint64_t gdt[GDT_ENTRIES];
/* Writes descriptor `desc` at selector `sel` (RPL / TI ignored). */
void set_gdt_entry(unsigned sel, uint64_t desc);
/* A code / data descriptor: base 0, limit 4 GiB (G = 1, D/B = 1),
 * `access` = the access byte (P | DPL | S | type). */
#define SEG_DESC_FLAT(access) (0x00CF00000000FFFFull | ((uint64_t)(access) << 40))

/* ---- TSS ----------------------------------------------------------------- */
/* The 32-bit TSS (SDM vol. 3, figure 8-2) followed by its I/O permission
 * bitmap (all ports denied at boot) and the terminating 0xFF byte. */
struct tss32 {
    uint16_t back_link, reserved0;
    uint32_t esp0;
    uint16_t ss0, reserved1;
    uint32_t esp1;
    uint16_t ss1, reserved2;
    uint32_t esp2;
    uint16_t ss2, reserved3;
    uint32_t cr3, eip, eflags, eax, ecx, edx, ebx, esp, ebp, esi, edi;
    uint16_t es, r_es, cs, r_cs, ss, r_ss, ds, r_ds, fs, r_fs, gs, r_gs, ldt, r_ldt;
    uint16_t trap;
    uint16_t iomap_base;
    uint8_t io_bitmap[8192]; /* bit set = port denied at CPL > IOPL */
    uint8_t io_bitmap_end;   /* 0xFF */
} __attribute__((packed));
extern struct tss32 tss;

/* ---- Interrupt frame ----------------------------------------------------- */
/* What the common entry leaves on the stack, lowest address first: the
 * segment registers and PUSHAL's GPRs it saved, the stub's vector and error
 * code (or a dummy 0), then what the CPU pushed: EIP, CS, EFLAGS, and ESP
 * and SS only on a privilege change (from CPL 3: then esp / ss are valid). */
struct frame {
    uint32_t gs, fs, es, ds;
    uint32_t edi, esi, ebp, esp_pushal, ebx, edx, ecx, eax;
    uint32_t vector, error_code;
    uint32_t eip, cs, eflags;
    uint32_t esp, ss; /* only when (cs & 3) != 0 or EFLAGS.VM */
    /* From virtual-8086 mode, ES DS FS GS follow (SDM vol. 3, figure 20-4). */
};
typedef void (*handler_fn)(struct frame *f);

/* Install (or with NULL remove) the C handler for a vector. A handler may
 * change the frame (e.g. f->eip); the exit path reloads the GPRs and the
 * segment registers from it and IRETs. A vector without a handler prints
 * "UNEXPECTED EXCEPTION vec=.. err=0x.. eip=0x.. cs=0x.." and exits 1. */
void set_handler(unsigned vec, handler_fn fn);
void set_gate_dpl(unsigned vec, unsigned dpl);
/* trap = 1: 32-bit trap gate (type 0xF, IF unchanged); 0: interrupt gate
 * (type 0xE, IF cleared), the default. */
void set_gate_trap(unsigned vec, int trap);
void set_gate_present(unsigned vec, int present);
/* The raw 8-byte IDT descriptor of a vector (e.g. to install a task gate or
 * to put a gate back as it was). */
uint64_t idt_gate(unsigned vec);
void set_idt_gate(unsigned vec, uint64_t desc);
/* A task gate (type 5, P = 1, DPL 0) for TSS selector `tss_sel`. */
#define TASK_GATE(tss_sel) (((uint64_t)(tss_sel) << 16) | (0x85ull << 40))
/* A 32-bit call gate (type 0xC) to `sel`:`off`, `dpl`, `params` dwords. */
#define CALL_GATE(sel, off, dpl, params)                                                        \
    (((uint64_t)(off) & 0xFFFF) | ((uint64_t)(sel) << 16) | ((uint64_t)((params) & 0x1F) << 32) | \
     ((uint64_t)(0x8C | ((dpl) << 5)) << 40) | ((uint64_t)((off) >> 16) << 48))
/* A 32-bit TSS descriptor (type 9, available), byte-granular limit. */
#define TSS_DESC(base, limit)                                                                     \
    (((uint64_t)(limit) & 0xFFFF) | (((uint64_t)(base) & 0xFFFFFF) << 16) | (0x89ull << 40) |    \
     ((((uint64_t)(limit) >> 16) & 0xF) << 48) | (((uint64_t)(base) >> 24) << 56))

/* Vector 0xFE (a DPL 3 gate) is reserved: run_user's way back to CPL 0. */
#define RUN_USER_VECTOR 0xFE
/* Run fn at CPL 3 (entered with IRET: CS 0x1b, SS 0x23, ESP user_stack_top,
 * EFLAGS 0x2 (IF = 0, IOPL 0)); returns when fn returns. fn may not print
 * (port I/O at CPL 3 #GPs unless the I/O bitmap allows the port). */
void run_user(void (*fn)(void));

extern char kernel_stack_bottom[], kernel_stack_top[];
extern char esp0_stack_bottom[], esp0_stack_top[]; /* TSS.ESP0, SS0 = 0x10 */
extern char user_stack_bottom[], user_stack_top[];

/* ---- CPU helpers ----------------------------------------------------------- */
static inline uint32_t read_cr0(void) { uint32_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint32_t read_cr2(void) { uint32_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint32_t read_cr3(void) { uint32_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint32_t read_cr4(void) { uint32_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr0(uint32_t v) { __asm__ volatile("mov %0, %%cr0" ::"r"(v) : "memory"); }
static inline void write_cr3(uint32_t v) { __asm__ volatile("mov %0, %%cr3" ::"r"(v) : "memory"); }
static inline void write_cr4(uint32_t v) { __asm__ volatile("mov %0, %%cr4" ::"r"(v) : "memory"); }
static inline void invlpg(uint32_t addr) { __asm__ volatile("invlpg (%0)" ::"r"(addr) : "memory"); }
static inline uint32_t read_eflags(void) { uint32_t v; __asm__ volatile("pushfl; popl %0" : "=r"(v)); return v; }

#define EFLAGS_CF (1u << 0)
#define EFLAGS_TF (1u << 8)
#define EFLAGS_IF (1u << 9)
#define EFLAGS_OF (1u << 11)
#define EFLAGS_NT (1u << 14)
#define EFLAGS_RF (1u << 16)
#define EFLAGS_VM (1u << 17)

#endif
