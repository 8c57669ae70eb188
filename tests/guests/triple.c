/* triple: load an IDT with limit 0, then UD2. #UD cannot be delivered (the
 * gate is beyond the IDT limit -> #GP), neither can #GP (-> #DF), nor #DF:
 * a triple fault, which the VMM must report (shutdown). */
#include "runtime.h"

int main(void)
{
    printf("triple: about to fault\n");
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = {0, 0};
    __asm__ volatile("lidt %0\n\tud2" ::"m"(idtr) : "memory");
    printf("triple: still running after the fault\n");
    return 1;
}
