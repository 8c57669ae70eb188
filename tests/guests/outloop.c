/* outloop: benchmark of port-I/O exits. Reads an iteration count N from the
 * multiboot command line (the first token made only of decimal digits;
 * default 100000), executes N "outb %al, $0x80" (POST port, ignored by the
 * machine), prints "outloop: N" and exits 0. */
#include "runtime.h"

#define DEFAULT_ITERATIONS 100000ull

static uint64_t parse_count(const char *s)
{
    while (*s) {
        while (*s == ' ' || *s == '\t')
            s++;
        const char *tok = s;
        uint64_t v = 0;
        int digits = 1;
        while (*s && *s != ' ' && *s != '\t') {
            if (*s < '0' || *s > '9')
                digits = 0;
            else
                v = v * 10 + (uint64_t)(*s - '0');
            s++;
        }
        if (digits && s != tok)
            return v;
    }
    return DEFAULT_ITERATIONS;
}

int main(void)
{
    uint64_t n = parse_count(multiboot_cmdline());
    if (n) {
        /* The loop: OUT, DEC, JNZ. Nothing else. */
        uint64_t count = n;
        __asm__ volatile("xor %%eax, %%eax\n"
                         "1:\n\t"
                         "outb %%al, $0x80\n\t"
                         "dec %0\n\t"
                         "jnz 1b"
                         : "+r"(count)
                         :
                         : "rax", "cc", "memory");
    }
    printf("outloop: %lu\n", n);
    exit(0);
}
