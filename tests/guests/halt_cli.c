/* halt_cli: HLT with RFLAGS.IF = 0. Only NMI, SMI, INIT or reset could wake
 * the CPU; the VMM must report that nothing can. */
#include "runtime.h"

int main(void)
{
    printf("halting with interrupts off\n");
    __asm__ volatile("cli\n\thlt" ::: "memory");
    printf("halt_cli: woke up from cli; hlt\n");
    return 1;
}
