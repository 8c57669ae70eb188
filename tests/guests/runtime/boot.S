/* Multiboot v1 entry: 32-bit protected mode -> 64-bit long mode.
 *
 * Entered as the multiboot spec says: paging off, EAX = 0x2BADB002,
 * EBX = physical address of the multiboot info, interrupts off. We load our
 * own GDT, identity-map 0..4 GiB with 2 MiB pages (4-level paging), turn on
 * CR4.PAE, EFER.LME | EFER.NXE, CR0.PG | CR0.WP and far-jump to 64-bit code.
 * Interrupts stay off throughout (the IDT is only set up in 64-bit mode).
 */

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* bit 0: page-align modules, bit 1: memory info */

#define MSR_EFER 0xC0000080
#define EFER_LME (1 << 8)
#define EFER_NXE (1 << 11)
#define CR0_WP (1 << 16)
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)

/* P | RW | US for table pointers; P | RW | US | PS for 2 MiB leaves. */
#define PT_PTR 0x7
#define PT_LEAF2M 0x87

    .section .multiboot, "a"
    .balign 4
multiboot_header:
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
    /* Keep EAX/EBX in registers the .bss clear does not use. */
    mov     %eax, %esi
    mov     %ebx, %ebp

    /* Our own GDT; a 32-bit code segment of ours for the rest of this stub. */
    lgdt    gdt_ptr
    ljmp    $0x38, $1f
1:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     %ax, %fs
    mov     %ax, %gs
    mov     $kernel_stack_top, %esp

    /* Zero .bss (page tables and small variables only: a few pages). */
    mov     $__bss_start, %edi
    mov     $__bss_end, %ecx
    sub     %edi, %ecx
    shr     $2, %ecx
    xor     %eax, %eax
    rep stosl

    mov     %esi, mb_magic
    mov     %ebp, mb_info_addr

    /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3. */
    movl    $boot_pdpt + PT_PTR, boot_pml4
    mov     $boot_pd + PT_PTR, %eax
    mov     $boot_pdpt, %edi
    mov     $4, %ecx
2:  mov     %eax, (%edi)
    add     $4096, %eax
    add     $8, %edi
    dec     %ecx
    jnz     2b

    /* 2048 2 MiB leaves: entry i maps i * 2 MiB (high dwords already 0). */
    mov     $boot_pd, %edi
    mov     $PT_LEAF2M, %eax
    mov     $2048, %ecx
3:  mov     %eax, (%edi)
    add     $0x200000, %eax
    add     $8, %edi
    dec     %ecx
    jnz     3b

    mov     %cr4, %eax
    or      $CR4_PAE, %eax
    mov     %eax, %cr4

    mov     $boot_pml4, %eax
    mov     %eax, %cr3

    mov     $MSR_EFER, %ecx
    rdmsr
    or      $(EFER_LME | EFER_NXE), %eax
    wrmsr

    mov     %cr0, %eax
    or      $(CR0_PG | CR0_WP), %eax
    mov     %eax, %cr0

    ljmp    $0x08, $long_mode_entry

/* ------------------------------------------------------------------------ */
    .code64
long_mode_entry:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    xor     %ax, %ax
    mov     %ax, %fs
    mov     %ax, %gs
    /* Reload the GDTR with the 64-bit form (same table, 8-byte base). */
    lgdt    gdt_ptr(%rip)
    lea     kernel_stack_top(%rip), %rsp
    xor     %ebp, %ebp
    call    runtime_start
4:  cli
    hlt
    jmp     4b

/* ------------------------------------------------------------------------ */
    .section .data
    .balign 16
    .globl gdt, gdt_tss_desc
gdt:
    .quad 0x0000000000000000 /* 0x00 null */
    .quad 0x00AF9A000000FFFF /* 0x08 kernel code64: P, DPL0, exec/read, L */
    .quad 0x00CF92000000FFFF /* 0x10 kernel data: P, DPL0, read/write, 4 GiB */
    .quad 0x00CFF2000000FFFF /* 0x18 user data: P, DPL3, read/write, 4 GiB */
    .quad 0x00AFFA000000FFFF /* 0x20 user code64: P, DPL3, exec/read, L */
gdt_tss_desc:
    .quad 0 /* 0x28 64-bit TSS, low half (filled in by runtime_start) */
    .quad 0 /* 0x30 64-bit TSS, high half */
    .quad 0x00CF9A000000FFFF /* 0x38 kernel code32: boot stub only */
gdt_end:

    .balign 8
    .globl gdt_ptr
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .balign 4
    .globl mb_magic, mb_info_addr
mb_magic:
    .long 0
mb_info_addr:
    .long 0

/* ------------------------------------------------------------------------ */
    .section .bss
    .balign 4096
    .globl boot_pml4, boot_pdpt, boot_pd
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096

/* Stacks are not zeroed (section .stack is NOLOAD, outside .bss). */
    .section .stack, "aw", @nobits
    .balign 4096
    .globl kernel_stack_bottom, kernel_stack_top
kernel_stack_bottom:
    .skip 16384
kernel_stack_top:
    .globl rsp0_stack_bottom, rsp0_stack_top
rsp0_stack_bottom:
    .skip 8192
rsp0_stack_top:
    .globl ist1_stack_bottom, ist1_stack_top
ist1_stack_bottom:
    .skip 8192
ist1_stack_top:
    .globl user_stack_bottom, user_stack_top
user_stack_bottom:
    .skip 8192
user_stack_top:
