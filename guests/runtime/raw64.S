/*
 * raw64.S - entry for kernels without a Multiboot header, which the VMM
 * enters already in 64-bit long mode.
 *
 * Assumptions about the VMM (vsmtrace's load_raw64): paging on with an
 * identity map covering this image, a flat 64-bit code segment, IF=0,
 * RSP = a valid stack (0x80000), RDI = 0x2BADB002 and RSI = a Multiboot-style
 * info structure (both passed on to kmain unchanged; they may be 0).
 * We do not rely on the VMM's stack, GDT or page tables beyond the first
 * few instructions: we switch to our own stack, GDT and 4 GiB identity map,
 * so APs (whose trampoline loads CR3 in 32-bit mode) and the local APIC at
 * 0xFEE00000 work exactly as in the multiboot flavour.
 */
#include "layout.h"

    .section .text.boot, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    movl %edi, boot_magic
    movl %esi, boot_mbi
    movq $boot_stack_top, %rsp

    movq $(pdpt + PTE_P + PTE_W), %rax
    movq %rax, pml4
    movq $(pd + PTE_P + PTE_W), %rax
    movq %rax, pdpt
    addq $0x1000, %rax
    movq %rax, pdpt + 8
    addq $0x1000, %rax
    movq %rax, pdpt + 16
    addq $0x1000, %rax
    movq %rax, pdpt + 24
    movq $pd, %rdi
    movq $(PTE_P + PTE_W + PTE_PS), %rax
    movl $2048, %ecx
1:  movq %rax, (%rdi)
    addq $0x200000, %rax
    addq $8, %rdi
    decl %ecx
    jnz 1b

    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 2f
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 20), %edx
    jz 2f
    movl $EFER_NXE, boot_efer_extra
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_NXE, %eax
    wrmsr
2:
    lgdt gdt_ptr
    pushq $GDT_CODE64
    pushq $3f
    lretq
3:  movl $GDT_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movq $pml4, %rax
    movq %rax, %cr3
    movq %cr4, %rax
    orq $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %rax
    movq %rax, %cr4
    movq %cr0, %rax
    andq $~CR0_EM, %rax
    orq $(CR0_MP | CR0_NE), %rax
    movq %rax, %cr0
    jmp bsp_start64

    .section .note.GNU-stack, "", @progbits
