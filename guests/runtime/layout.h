/* layout.h - constants shared by the assembly files (and guest.h mirrors MAX_CPUS). */
#ifndef VSMTRACE_LAYOUT_H
#define VSMTRACE_LAYOUT_H

#define MAX_CPUS 32
#define AP_STACK_SHIFT 13
#define AP_STACK_SIZE (1 << AP_STACK_SHIFT)
#define BOOT_STACK_SIZE 16384
#define AP_TRAMPOLINE_ADDR 0x8000

#define GDT_CODE64 0x08
#define GDT_DATA 0x10
#define GDT_CODE32 0x18

#define CR0_PE (1 << 0)
#define CR0_MP (1 << 1)
#define CR0_EM (1 << 2)
#define CR0_NE (1 << 5)
#define CR0_PG 0x80000000
#define CR4_PAE (1 << 5)
#define CR4_OSFXSR (1 << 9)
#define CR4_OSXMMEXCPT (1 << 10)
#define MSR_EFER 0xC0000080
#define EFER_LME (1 << 8)
#define EFER_NXE (1 << 11)

#define PTE_P 0x1
#define PTE_W 0x2
#define PTE_PS 0x80

#endif
