/* echo: prints "echo: ready", then reads one line from COM1 (polling
 * LSR.DR) and prints it back, to show that the host's stdin reaches the
 * guest's UART. Input sent before "ready" may be lost, as on hardware: the
 * runtime's UART init clears the receive FIFO. A line longer than 126 bytes
 * is cut. */
#include "runtime.h"

int main(void)
{
    char line[128];
    unsigned n = 0;
    printf("echo: ready\n");
    for (;;) {
        while (!(inb(0x3f8 + 5) & 1))
            ;
        char c = (char)inb(0x3f8);
        if (c == '\n' || c == '\r')
            break;
        if (n < sizeof(line) - 1)
            line[n++] = c;
    }
    line[n] = 0;
    printf("echo: %s\n", line);
    report("a line typed on the host's stdin arrived through COM1", n > 0);
    return 0;
}
