/*
 * isr.S - the 256 interrupt entry stubs and the fault-tolerant MSR helpers.
 *
 * Each stub is 16 bytes (isr_stubs + 16 * vector) and pushes a dummy error
 * code when the CPU pushes none, then the vector; isr_common saves every GPR
 * in struct int_frame order (guest.h) and calls isr_dispatch(frame).
 */
    .section .text
    .code64
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi               /* 5 + 2 + 15 quadwords: RSP stays 16-byte aligned */
    cld
    call isr_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                /* vector and error code */
    iretq

/* bool rdmsr_safe(uint32_t msr, uint64_t *value): false if RDMSR faulted. */
    .globl rdmsr_safe, rdmsr_safe_insn, wrmsr_safe, wrmsr_safe_insn, msr_fault_fixup
rdmsr_safe:
    movl %edi, %ecx
rdmsr_safe_insn:
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    movq %rax, (%rsi)
    movl $1, %eax
    ret

/* bool wrmsr_safe(uint32_t msr, uint64_t value): false if WRMSR faulted. */
wrmsr_safe:
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
wrmsr_safe_insn:
    wrmsr
    movl $1, %eax
    ret

/* The exception handler resumes a faulting rdmsr_safe/wrmsr_safe here. */
msr_fault_fixup:
    xorl %eax, %eax
    ret

    .section .note.GNU-stack, "", @progbits
