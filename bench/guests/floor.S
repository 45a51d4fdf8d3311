/* bench/floor guest: the guest side of each round trip bench/floor times, at fixed
 * offsets so the C driver can start a vCPU at any of them. 32-bit protected mode, no
 * paging. ESI holds the iteration count on entry; each routine ends with
 * isa-debug-exit (out to 0xf4). The hypercall-page stubs at 0x400.. have the same
 * instructions as the page vsmtrace writes (vmm/hyperv/hypercall_page.py). */
#define TRAP_PORT 0x58
#define EXIT_PORT 0xf4
#define CALL_CODE 0x11
#define RETURN_CODE 0x12

    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002
    .long 0
    .long -0x1BADB002

    .text
    .code32
    .globl _start
_start:
base:
/* 0x000 bare: the loop of bench/exits */
    .org base + 0x000
bare:
1:  out %al, $0x80
    dec %esi
    jnz 1b
    out %eax, $EXIT_PORT

/* 0x100 null fast hypercall, as a C guest issues it: control, two input registers,
 * call into the hypercall page, keep the status. */
    .org base + 0x100
hypercall:
1:  mov $0x10008, %ecx
    mov $1, %edx
    xor %ebx, %ebx
    call page_hypercall
    and $0xffff, %eax
    or %eax, %edi
    dec %esi
    jnz 1b
    out %eax, $EXIT_PORT

/* 0x180 the least a hypercall can be: call into the page and back. */
    .org base + 0x180
hypercall_min:
1:  call page_hypercall
    dec %esi
    jnz 1b
    out %eax, $EXIT_PORT

/* 0x1c0 a memory hypercall as a C guest makes GetVpIndexFromApicId (32-bit ABI:
 * EDX:EAX control with rep count 1, EBX:ECX input GPA, EDI:ESI output GPA). */
    .org base + 0x1c0
hypercall_mem:
    push %esi
1:  mov $0x009a, %eax
    mov $1, %edx
    mov $mem_in, %ebx
    xor %ecx, %ecx
    mov $mem_out, %esi
    xor %edi, %edi
    call page_hypercall
    decl (%esp)
    jnz 1b
    out %eax, $EXIT_PORT

/* 0x200 VTL0 side of bench/vtl's call loop (bench/guests/vtl.c, vtl0_calls) */
    .org base + 0x200
vtl0_calls:
    push %esi
1:  xor %ecx, %ecx
    call page_vtl_call
    decl (%esp)
    jnz 1b
    out %eax, $EXIT_PORT

/* 0x300 VTL1 side (vtl1_fast_returns): answers every call with a fast VTL return */
    .org base + 0x300
vtl1_returns:
    push %esi
2:  mov $1, %ecx
    call page_vtl_return
    decl (%esp)
    jns 2b
    out %eax, $EXIT_PORT

/* 0x400 the hypercall page */
    .org base + 0x400
page_hypercall:
    out %al, $TRAP_PORT
    ret
    .org base + 0x410
page_vtl_call:
    mov %ecx, %eax
    mov $CALL_CODE, %ecx
    out %al, $TRAP_PORT
    ret
    .org base + 0x420
page_vtl_return:
    mov %ecx, %eax
    mov $RETURN_CODE, %ecx
    out %al, $TRAP_PORT
    ret

/* input and output of hypercall_mem */
    .org base + 0x800
mem_in:
    .long 0xffffffff, 0xffffffff, 0, 0, 0, 0
    .org base + 0x840
mem_out:
    .long 0
