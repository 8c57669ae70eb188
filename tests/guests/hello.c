/* hello: the smallest guest. Prints a greeting and checks the multiboot
 * hand-off (EAX magic, and a memory map in the info structure). */
#include "runtime.h"

int main(void)
{
    printf("Hello from Tandem!\n");

    const struct multiboot_info *mbi = multiboot_info();
    int ok = mb_magic == MULTIBOOT_BOOTLOADER_MAGIC && mbi && (mbi->flags & MBI_FLAG_MMAP) && mbi->mmap_length != 0;
    if (!ok)
        printf("  magic=0x%x info=0x%x flags=0x%x\n", mb_magic, mb_info_addr, mbi ? mbi->flags : 0);
    report("multiboot magic and memory map", ok);
    return 0;
}
