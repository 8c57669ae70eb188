/* Tandem test-guest runtime, legacy flavours: COM1, printf, reporting, exit.
 * Compiled once with -m32 (runtime32) and once with -m16 (runtime16). */
#include "legacy.h"

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

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* ---- COM1 16550 ---------------------------------------------------------- */
#define COM1 0x3F8

void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* IER: no UART interrupts, we poll */
    outb(COM1 + 3, 0x80); /* LCR: DLAB */
    outb(COM1 + 0, 0x01); /* DLL: divisor 1, 115200 baud */
    outb(COM1 + 1, 0x00); /* DLM */
    outb(COM1 + 3, 0x03); /* LCR: 8N1, DLAB off */
    outb(COM1 + 2, 0x07); /* FCR: enable and clear the FIFOs */
    outb(COM1 + 4, 0x03); /* MCR: DTR | RTS, OUT2 off (no IRQ 4) */
}

void serial_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE */
        ;
    outb(COM1, (uint8_t)c);
}

void puts_raw(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

/* ---- printf ------------------------------------------------------------- */
/* 64-bit division by a small base without libgcc's __udivdi3: long division
 * on the two 32-bit halves. */
static uint32_t divmod64(uint64_t *v, uint32_t base)
{
    uint32_t hi = (uint32_t)(*v >> 32), lo = (uint32_t)*v;
    uint32_t qhi = hi / base, r = hi % base;
    uint32_t qlo = 0;
    for (int bit = 31; bit >= 0; bit--) {
        r = (r << 1) | ((lo >> bit) & 1);
        if (r >= base) {
            r -= base;
            qlo |= 1u << bit;
        }
    }
    *v = ((uint64_t)qhi << 32) | qlo;
    return r;
}

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
        char buf[24], tmp[24];
        int len = 0, t = 0;
        uint64_t u;
        switch (*fmt) {
        case 'd':
        case 'i': {
            int64_t v = lng >= 2 ? va_arg(ap, int64_t) : va_arg(ap, int);
            int neg = v < 0;
            u = neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            do
                tmp[t++] = (char)('0' + divmod64(&u, 10));
            while (u);
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
            uint32_t base = (*fmt == 'u') ? 10 : 16;
            const char *digits = (*fmt == 'X') ? "0123456789ABCDEF" : "0123456789abcdef";
            if (*fmt == 'p') {
                u = (uint32_t)(uintptr_t)va_arg(ap, void *);
                buf[len++] = '0';
                buf[len++] = 'x';
            } else {
                u = lng >= 2 ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            }
            do
                tmp[t++] = digits[divmod64(&u, base)];
            while (u);
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

int expect(const char *what, uint32_t got, uint32_t want)
{
    if (got == want)
        return 1;
    printf("  %s: got 0x%x, expected 0x%x\n", what, got, want);
    return 0;
}

int expect_true(const char *what, int cond)
{
    if (!cond)
        printf("  %s\n", what);
    return cond != 0;
}
