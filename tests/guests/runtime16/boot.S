/* Real-mode flavour: multiboot v1 entry, back to real mode, the IVT stubs.
 *
 * The multiboot loader enters in 32-bit protected mode (paging off, flat
 * segments) at 1 MiB. Real-mode code must run below 64 KiB here (CS = DS =
 * ES = SS = 0), so the image carries the real-mode part (.low: code, data,
 * rodata, linked at 0x1000) right after the entry stub and the stub copies
 * it down, zeroes .bss, stores EAX / EBX, then leaves protected mode the way
 * the SDM describes (vol. 3, 10.9.2 "Switching Back to Real-Address Mode"):
 * a far jump to a 16-bit code segment (base 0, limit 64 KiB), segment
 * registers loaded with a 16-bit data segment (limit 64 KiB, so real mode
 * starts with real-mode limits), CR0.PE cleared, a far jump to real-mode
 * code, segment registers reloaded with 0, an IVT at 0 (LIDT base 0, limit
 * 0x3FF). Then runtime16_start() (C compiled with gcc -m16).
 */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    mov     %eax, %ebp
    mov     %ebx, %edx
    lgdt    boot_gdt_ptr
    ljmp    $0x08, $1f
1:  mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs
    /* The real-mode part down to its link address. */
    mov     $__low_load, %esi
    mov     $__low_start, %edi
    mov     $__low_end, %ecx
    sub     %edi, %ecx
    rep movsb
    mov     $__bss_start, %edi
    mov     $__bss_end, %ecx
    sub     %edi, %ecx
    xor     %eax, %eax
    rep stosb
    mov     %ebp, mb_magic
    mov     %edx, mb_info_addr
    ljmp    $0x18, $pm16_entry

    .balign 8
boot_gdt:
    .quad 0x0000000000000000 /* 0x00 null */
    .quad 0x00CF9A000000FFFF /* 0x08 code32, flat */
    .quad 0x00CF92000000FFFF /* 0x10 data32, flat */
    .quad 0x00009A000000FFFF /* 0x18 code16: base 0, limit 0xFFFF, byte granular */
    .quad 0x000092000000FFFF /* 0x20 data16: base 0, limit 0xFFFF, byte granular */
boot_gdt_end:
    .balign 4
    .word 0
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt

/* ---- Real-mode part (copied to 0x1000) ---------------------------------- */
    .section .text16, "ax"
    .code16
pm16_entry:
    mov     $0x20, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs
    mov     %cr0, %eax
    and     $0xFFFFFFFE, %eax
    mov     %eax, %cr0
    ljmp    $0, $rm_entry
rm_entry:
    xor     %ax, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs
    movl    $stack_top, %esp
    lidt    ivt_ptr
    calll   runtime16_start
2:  cli
    hlt
    jmp     2b

/* ---- IVT stubs ----------------------------------------------------------- */
/* Real mode pushes FLAGS, CS, IP (16 bits each) and never an error code
 * (SDM vol. 3, 21.1.4 "Interrupt and Exception Handling"); each stub adds
 * the vector as a dword. */
    .macro VSTUB vec
    .balign 8
isr16_stub_\vec:
    pushl   $\vec
    jmp     isr16_common
    .endm
    .altmacro
    .set vec, 0
    .rept 256
    VSTUB %vec
    .set vec, vec + 1
    .endr

/* Frame (lowest address first): ES DS (words), PUSHAL's EDI..EAX, the
 * vector (dword), then the CPU's IP CS FLAGS (words). */
isr16_common:
    pushal
    pushw   %ds
    pushw   %es
    xor     %ax, %ax
    mov     %ax, %ds
    mov     %ax, %es
    cld
    movzwl  %sp, %eax
    pushl   %eax
    calll   isr_dispatch
    addl    $4, %esp
    popw    %es
    popw    %ds
    popal
    addl    $4, %esp
    iret

    .section .rodata
    .balign 4
    .globl isr16_stub_table
isr16_stub_table:
    .macro STUB_ADDR vec
    .long isr16_stub_\vec
    .endm
    .set vec, 0
    .rept 256
    STUB_ADDR %vec
    .set vec, vec + 1
    .endr

    .section .data
    .balign 4
    .globl mb_magic, mb_info_addr
mb_magic:
    .long 0
mb_info_addr:
    .long 0
    .word 0
ivt_ptr:
    .word 0x3FF
    .long 0

    .section .stack, "aw", @nobits
    .balign 16
    .globl stack_bottom, stack_top
stack_bottom:
    .skip 8192
stack_top:
