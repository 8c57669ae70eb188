/* Tandem test-guest runtime, legacy flavours: what the 32-bit protected-mode
 * (runtime32/, gcc -m32) and the real-mode (runtime16/, gcc -m16) runtimes
 * share. The same API as the 64-bit runtime's printf / report / summary /
 * exit / expect, written for 32-bit arithmetic (no libgcc: there is no
 * 32-bit libgcc on the build machines, so no 64-bit division is used).
 *
 * In both flavours `int`, `long` and pointers are 32 bits wide (gcc -m16
 * emits 32-bit code with operand / address size prefixes). */
#ifndef TANDEM_GUEST_LEGACY_H
#define TANDEM_GUEST_LEGACY_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Multiboot v1 ----------------------------------------------------- */
#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
extern uint32_t mb_magic;     /* EAX at the multiboot entry */
extern uint32_t mb_info_addr; /* EBX at the multiboot entry */

/* ---- Serial and printing ---------------------------------------------- */
/* %d %i %u %x %X %p %c %s %%, flags '0' '-', a width, l (32 bits, as int)
 * and ll (64 bits). Lines end with "\n" only. */
void serial_init(void);
void serial_putc(char c);
void puts_raw(const char *s);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);

/* ---- Test reporting ---------------------------------------------------- */
void report(const char *name, int ok); /* "PASS: name" / "FAIL: name" */
int summary(void);                     /* "SUMMARY: N passed, M failed"; returns M */
/* outl(0xF4, code) (isa-debug-exit: status (code << 1) | 1), then cli; hlt. */
void exit(int code) __attribute__((noreturn));
void halt_forever(void) __attribute__((noreturn));
/* "  what: got 0x.., expected 0x.." on a mismatch; returns got == want. */
int expect(const char *what, uint32_t got, uint32_t want);
/* "  what" when cond is false; returns cond != 0. */
int expect_true(const char *what, int cond);

/* ---- Small libc ---------------------------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);

/* ---- CPU helpers ------------------------------------------------------- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) { uint8_t v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }

/* The guest's entry point. When it returns, the runtime calls summary()
 * and exit(failed || rc ? 1 : 0). */
int main(void);

#endif
