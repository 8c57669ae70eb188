/* 64-bit interrupt entry: 256 vector stubs, the common entry, and the
 * ring-3 round trip (run_user: IRETQ down to CPL 3, SYSCALL back up).
 *
 * The CPU pushes an error code for #DF(8), #TS(10), #NP(11), #SS(12),
 * #GP(13), #PF(14), #AC(17), #CP(21), #VC(29) and #SX(30) (SDM vol. 3,
 * table "Protected-Mode Exceptions and Interrupts"). Every other stub pushes
 * a dummy 0 so that struct frame has one layout. (A software INT n to one of
 * those vectors pushes no error code; the guests here never do that.)
 */

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

/* Stub addresses, in vector order, for the C code that builds the IDT. */
    .macro STUB_ADDR vec
    .quad isr_stub_\vec
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
 * leaves fn with the ABI's stack alignment. The way back is SYSCALL, not
 * INT n through a DPL 3 gate: PVM answers INT n at CPL 3 with a #UD instead
 * of delivering it through the gate. */
    .globl user_trampoline
user_trampoline:
    call    *%rdi
    syscall
    ud2                             /* not reached */

/* IA32_LSTAR. SYSCALL (SDM vol. 2B, SYSCALL) leaves us at CPL 0 with
 * CS = STAR[47:32] = 0x08, SS = STAR[47:32] + 8 = 0x10, RCX = the user RIP,
 * R11 = the user RFLAGS, RFLAGS &= ~IA32_FMASK (IF, TF, DF, AC, NT clear),
 * and RSP still on the user stack, so nothing here touches the stack before
 * RSP is the kernel one again.
 *
 * PVM (measured) runs SYSCALL at CPL 3 differently: it jumps to LSTAR with
 * RCX and R11 set but stays at CPL 3 (CS reads the host's user selector
 * 0x33, privileged instructions #GP, IF = 1). So the entry first checks that
 * CS is the kernel's; if not, it raises a #UD at user_return_fault, which
 * reaches CPL 0 through the IDT like any ring-3 exception, and isr_dispatch
 * turns that one #UD into a jump to user_return_kernel. */
    .globl user_return_entry
user_return_entry:
    mov     %cs, %eax
    cmp     $0x08, %ax
    jne     user_return_fault

/* void user_return_kernel(void): back in run_user's context at CPL 0 (from
 * the SYSCALL entry above or from isr_dispatch): switch to the kernel stack
 * saved by run_user (a RIP-relative load), restore DS/ES (the IRETQ to CPL 3
 * nulled them: DPL 0 data segments) and SS, and return from run_user. */
    .globl user_return_kernel
user_return_kernel:
    mov     run_user_saved_rsp(%rip), %rsp
    mov     $0x10, %ax
    mov     %ax, %ds
    mov     %ax, %es
    mov     %ax, %ss
    popq    %r15
    popq    %r14
    popq    %r13
    popq    %r12
    popq    %rbp
    popq    %rbx
    ret

/* Reached only at CPL 3 (a SYSCALL that did not change the privilege level):
 * the #UD here is the way back, see isr_dispatch. */
    .globl user_return_fault
user_return_fault:
    ud2

    .section .bss
    .balign 8
run_user_saved_rsp:
    .quad 0
