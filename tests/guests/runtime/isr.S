/* 64-bit interrupt entry: 256 vector stubs, the common entry, and the
 * ring-3 round trip (run_user / the USER_RETURN_VECTOR gate).
 *
 * The CPU pushes an error code for #DF(8), #TS(10), #NP(11), #SS(12),
 * #GP(13), #PF(14), #AC(17), #CP(21), #VC(29) and #SX(30) (SDM vol. 3,
 * table "Protected-Mode Exceptions and Interrupts"). Every other stub pushes
 * a dummy 0 so that struct frame has one layout. (A software INT n to one of
 * those vectors pushes no error code; the guests here never do that.)
 */

#define USER_RETURN_VECTOR 0x81

    .text
    .code64

    .macro VECTOR_STUB vec
    .balign 16
isr_stub_\vec:
    .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    pushq   $0
    .endif
    pushq   $\vec
    jmp     isr_common
    .endm

    .altmacro
    .set vec, 0
    .rept 256
    VECTOR_STUB %vec
    .set vec, vec + 1
    .endr

/* The frame at entry to isr_common: vector, error code, RIP, CS, RFLAGS,
 * RSP, SS (7 quadwords). The CPU aligned RSP to 16 before pushing its 5
 * quadwords, so after 15 more GPR pushes (22 quadwords = 176 bytes) RSP is
 * 16-byte aligned again, as the C ABI wants at the call. */
isr_common:
    pushq   %rax
    pushq   %rbx
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %rbp
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    cld
    mov     %rsp, %rdi
    call    isr_dispatch
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rbp
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rbx
    popq    %rax
    add     $16, %rsp /* vector, error code */
    iretq

/* Stub addresses, in vector order, for the C code that builds the IDT.
 * USER_RETURN_VECTOR gets user_return_entry instead of its stub. */
    .macro STUB_ADDR vec
    .if \vec == USER_RETURN_VECTOR
    .quad user_return_entry
    .else
    .quad isr_stub_\vec
    .endif
    .endm

    .section .rodata
    .balign 8
    .globl isr_stub_table
isr_stub_table:
    .set vec, 0
    .rept 256
    STUB_ADDR %vec
    .set vec, vec + 1
    .endr
    .noaltmacro

/* ------------------------------------------------------------------------ */
/* void run_user(void (*fn)(void))
 * Save the callee-saved registers and RSP, then IRETQ to user_trampoline at
 * CPL 3 with RDI = fn. */
    .text
    .globl run_user
run_user:
    pushq   %rbx
    pushq   %rbp
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    mov     %rsp, run_user_saved_rsp(%rip)
    pushq   $0x1b                   /* SS: user data, RPL 3 */
    lea     user_stack_top(%rip), %rax
    pushq   %rax                    /* RSP */
    pushq   $0x2                    /* RFLAGS: IF = 0, IOPL = 0 */
    pushq   $0x23                   /* CS: user code64, RPL 3 */
    lea     user_trampoline(%rip), %rax
    pushq   %rax                    /* RIP */
    iretq

/* Runs at CPL 3. RSP = user_stack_top (16-byte aligned), so the call below
 * leaves fn with the ABI's stack alignment. */
    .globl user_trampoline
user_trampoline:
    call    *%rdi
    int     $USER_RETURN_VECTOR
    ud2                             /* not reached */

/* Gate USER_RETURN_VECTOR (DPL 3). We arrive at CPL 0 on the RSP0 stack;
 * drop that frame, restore the kernel segment registers (a return to CPL 3
 * nulled DS/ES, and the switch to CPL 0 loaded SS with a null selector) and
 * return from run_user. */
    .globl user_return_entry
user_return_entry:
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    mov     run_user_saved_rsp(%rip), %rsp
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %rbp
    popq    %rbx
    ret

    .section .bss
    .balign 8
run_user_saved_rsp:
    .quad 0
