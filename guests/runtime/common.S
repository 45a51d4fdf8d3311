/*
 * common.S - pieces shared by both entry flavours (multiboot boot.S and
 * raw64.S): the GDT, the identity page tables, the stacks, the 32-bit to
 * 64-bit switch and the SMP trampoline that brings APs from real mode to
 * long mode on the same page tables.
 */
#include "layout.h"

/* ------------------------------------------------------------------ data */
    .section .data
    .balign 16
    .globl gdt, gdt_ptr
gdt:
    .quad 0                       /* 0x00 null */
    .quad 0x00AF9A000000FFFF      /* 0x08 64-bit code, DPL 0 */
    .quad 0x00CF92000000FFFF      /* 0x10 flat data */
    .quad 0x00CF9A000000FFFF      /* 0x18 flat 32-bit code (boot and AP path) */
gdt_end:
    .balign 8
    .word 0, 0, 0                 /* so the base below is 8-byte aligned */
gdt_ptr:                          /* 32-bit lgdt reads 6 bytes, 64-bit 10 */
    .word gdt_end - gdt - 1
    .quad gdt

    .globl boot_magic, boot_mbi, boot_efer_extra
    .balign 4
boot_magic:      .long 0
boot_mbi:        .long 0
boot_efer_extra: .long 0          /* EFER.NXE if the CPU has NX, for the APs */

/* ------------------------------------------------------------------- bss */
/* Not cleared by the guest: the loader must zero-fill BSS. */
    .section .bss
    .balign 4096
    .globl pml4, pdpt, pd
pml4:  .skip 4096
pdpt:  .skip 4096
pd:    .skip 4 * 4096             /* four page directories: 4 GiB of 2 MiB pages */
    .balign 16
    .globl boot_stack_top
boot_stack:
    .skip BOOT_STACK_SIZE
boot_stack_top:
    .globl ap_stacks
    .balign 16
ap_stacks:
    .skip MAX_CPUS * AP_STACK_SIZE

/* ------------------------------------------------ 32-bit to long mode */
    .section .text
    .code32
/*
 * enter_long_mode32: protected mode, flat segments, paging off, page tables
 * built.  EDI = 64-bit address to continue at.  Clobbers EAX, ECX, EDX.
 */
    .globl enter_long_mode32
enter_long_mode32:
    movl %cr4, %eax
    orl $(CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT), %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    orl boot_efer_extra, %eax
    wrmsr
    movl %cr0, %eax
    andl $~CR0_EM, %eax
    orl $(CR0_PG | CR0_PE | CR0_MP | CR0_NE), %eax
    movl %eax, %cr0
    ljmp $GDT_CODE64, $1f
    .code64
1:  movl $GDT_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl %edi, %edi               /* upper halves are undefined after the switch */
    jmp *%rdi

/* BSP, now in long mode with the runtime's page tables and GDT. */
    .globl bsp_start64
bsp_start64:
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    call runtime_start            /* never returns */
2:  cli
    hlt
    jmp 2b

/* ------------------------------------------------------------ SMP path */
/*
 * Real-mode trampoline, copied to AP_TRAMPOLINE_ADDR (0x8000) by
 * smp_start_aps; SIPI vector 0x08 starts the AP at CS=0x0800, IP=0.
 */
    .section .rodata
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdtr - ap_trampoline_start
    movl %cr0, %eax
    orl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $GDT_CODE32, $ap_start32
    .balign 4
ap_tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

    .section .text
    .code32
ap_start32:
    movl $GDT_DATA, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $ap_start64, %edi
    jmp enter_long_mode32

    .code64
ap_start64:
    movl $1, %eax                 /* initial APIC id = VP index = CPU index */
    cpuid
    shrl $24, %ebx
    cmpl $MAX_CPUS, %ebx
    jae 3f
    leal 1(%ebx), %eax
    shlq $AP_STACK_SHIFT, %rax
    addq $ap_stacks, %rax
    movq %rax, %rsp
    xorl %ebp, %ebp
    movl %ebx, %edi
    call smp_ap_entry             /* never returns */
3:  cli
    hlt
    jmp 3b

    .section .note.GNU-stack, "", @progbits
