/* exit_code: write 0x2A to the isa-debug-exit port directly; the process
 * status must be (0x2A << 1) | 1 = 85. */
#include "runtime.h"

int main(void)
{
    printf("exit_code: exiting with 0x2a\n");
    outl(0xF4, 0x2A);
    halt_forever();
}
