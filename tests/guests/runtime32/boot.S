/* 32-bit protected-mode flavour: multiboot v1 entry, GDT, vector stubs, the
 * common interrupt entry and the ring-3 round trip (run_user).
 *
 * Entered as the multiboot spec says (32-bit protected mode, paging off,
 * EAX = 0x2BADB002, EBX = the multiboot info, interrupts off). We load our
 * own GDT, far-jump to our own 32-bit code segment, reload the data segment
 * registers, zero .bss and call runtime32_start() in C, which builds the TSS
 * and the IDT. Paging stays off (a guest may turn it on); interrupts stay
 * off (EFLAGS.IF = 0) unless a guest enables them.
 */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-align modules, memory info */

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------------ */
    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    mov     %eax, %esi
    mov     %ebx, %ebp
    lgdt    gdt_ptr
    ljmp    $0x08, $1f
1:  mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs
    mov     $kernel_stack_top, %esp
    /* Zero .bss. */
    mov     $__bss_start, %edi
    mov     $__bss_end, %ecx
    sub     %edi, %ecx
    shr     $2, %ecx
    xor     %eax, %eax
    rep stosl
    mov     %esi, mb_magic
    mov     %ebp, mb_info_addr
    xor     %ebp, %ebp
    call    runtime32_start
2:  cli
    hlt
    jmp     2b

/* ---- Vector stubs -------------------------------------------------------- */
/* The CPU pushes an error code for #DF(8), #TS(10), #NP(11), #SS(12),
 * #GP(13), #PF(14), #AC(17), #CP(21), #VC(29), #SX(30) (SDM vol. 3, table
 * 6-1); every other stub pushes a dummy 0 so struct frame has one layout. */
    .text
    .macro VECTOR_STUB vec
    .balign 16
isr_stub_\vec:
    .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushl   $0
    .endif
    pushl   $\vec
    jmp     isr_common
    .endm

    .altmacro
    .set vec, 0
    .rept 256
    VECTOR_STUB %vec
    .set vec, vec + 1
    .endr

/* Frame (lowest address first): GS FS ES DS, PUSHAL's EDI..EAX, vector,
 * error code, then the CPU's EIP CS EFLAGS [ESP SS on a privilege change]. */
isr_common:
    pushal
    pushl   %ds
    pushl   %es
    pushl   %fs
    pushl   %gs
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    cld
    pushl   %esp
    call    isr_dispatch
    addl    $4, %esp
    popl    %gs
    popl    %fs
    popl    %es
    popl    %ds
    popal
    addl    $8, %esp /* vector, error code */
    iret

/* ---- run_user ------------------------------------------------------------ */
/* void run_user(void (*fn)(void)): IRET to CPL 3 (CS 0x1b, SS 0x23, ESP
 * user_stack_top, EFLAGS 0x2), call fn there, then INT 0xFE (a DPL 3 gate
 * the dispatcher reserves) back to CPL 0, where user_return_kernel drops the
 * INT's frame and returns from run_user. */
    .globl run_user, user_return_int, user_return_kernel
run_user:
    pushl   %ebp
    pushl   %ebx
    pushl   %esi
    pushl   %edi
    mov     20(%esp), %eax
    mov     %eax, run_user_fn
    mov     %esp, run_user_saved_esp
    pushl   $0x23
    pushl   $user_stack_top
    pushl   $0x2
    pushl   $0x1b
    pushl   $user_trampoline
    iret
user_trampoline:
    /* The IRET to CPL 3 nulled DS / ES (DPL 0 data): load the user data. */
    mov     $0x23, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %fs
    mov     %ax, %gs
    call    *run_user_fn
user_return_int:
    int     $0xFE
    ud2
user_return_kernel:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %fs
    mov     %ax, %gs
    mov     %ax, %ss
    mov     run_user_saved_esp, %esp
    popl    %edi
    popl    %esi
    popl    %ebx
    popl    %ebp
    ret

/* ---- Tables -------------------------------------------------------------- */
    .section .rodata
    .balign 4
    .globl isr_stub_table
isr_stub_table:
    .macro STUB_ADDR vec
    .long isr_stub_\vec
    .endm
    .set vec, 0
    .rept 256
    STUB_ADDR %vec
    .set vec, vec + 1
    .endr

    .section .data
    .balign 16
    .globl gdt
gdt:
    .quad 0x0000000000000000 /* 0x00 null */
    .quad 0x00CF9A000000FFFF /* 0x08 kernel code32: P, DPL0, exec/read, D, 4 GiB */
    .quad 0x00CF92000000FFFF /* 0x10 kernel data: P, DPL0, read/write, B, 4 GiB */
    .quad 0x00CFFA000000FFFF /* 0x18 user code32: P, DPL3 (use 0x1b) */
    .quad 0x00CFF2000000FFFF /* 0x20 user data: P, DPL3 (use 0x23) */
    .quad 0                  /* 0x28 32-bit TSS (runtime32_start) */
    .quad 0                  /* 0x30 spare: set_gdt_entry() */
    .quad 0                  /* 0x38 spare */
    .quad 0                  /* 0x40 spare */
    .quad 0                  /* 0x48 spare */
gdt_end:
    .balign 4
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .balign 4
    .globl mb_magic, mb_info_addr, run_user_fn, run_user_saved_esp
mb_magic:
    .long 0
mb_info_addr:
    .long 0
run_user_fn:
    .long 0
run_user_saved_esp:
    .long 0

    .section .stack, "aw", @nobits
    .balign 4096
    .globl kernel_stack_bottom, kernel_stack_top, esp0_stack_bottom, esp0_stack_top
    .globl user_stack_bottom, user_stack_top
kernel_stack_bottom:
    .skip 16384
kernel_stack_top:
esp0_stack_bottom:
    .skip 8192
esp0_stack_top:
user_stack_bottom:
    .skip 8192
user_stack_top:
