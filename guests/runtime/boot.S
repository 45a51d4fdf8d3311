/*
 * boot.S - Multiboot v1 entry.  The loader (vsmtrace, or QEMU -kernel after
 * objcopy to ELF32) enters _start in 32-bit protected mode with flat
 * segments, paging off, IF=0, EAX=0x2BADB002 and EBX=the info structure.
 * We build identity page tables for the first 4 GiB with 2 MiB pages, switch
 * to long mode and call kmain via runtime_start.  BSS is NOT cleared here:
 * the loader must have zero-filled it (tests check that it did).
 */
#include "layout.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003      /* bit 0: page-align modules, bit 1: memory info */

#ifndef GUEST_NO_MULTIBOOT_HEADER  /* defined by guests that boot by another protocol (PVH) */
    .section .multiboot, "a"
    .balign 4
    .globl multiboot_header
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#endif

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    cld
    movl %eax, boot_magic
    movl %ebx, boot_mbi
    lgdt gdt_ptr
    ljmp $GDT_CODE32, $1f
1:  movl $GDT_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs

    /* PML4[0] -> PDPT, PDPT[0..3] -> PD0..PD3 */
    movl $(pdpt + PTE_P + PTE_W), pml4
    movl $(pd + PTE_P + PTE_W), pdpt
    movl $(pd + 0x1000 + PTE_P + PTE_W), pdpt + 8
    movl $(pd + 0x2000 + PTE_P + PTE_W), pdpt + 16
    movl $(pd + 0x3000 + PTE_P + PTE_W), pdpt + 24
    /* 2048 PDEs of 2 MiB: entry i maps i * 2 MiB (high dwords stay 0) */
    movl $pd, %edi
    movl $(PTE_P + PTE_W + PTE_PS), %eax
    movl $2048, %ecx
2:  movl %eax, (%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 2b

    /* EFER.NXE only if CPUID says NX exists */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 3f
    movl $0x80000001, %eax
    cpuid
    testl $(1 << 20), %edx
    jz 3f
    movl $EFER_NXE, boot_efer_extra
3:  movl $bsp_start64, %edi
    jmp enter_long_mode32

    .section .note.GNU-stack, "", @progbits
