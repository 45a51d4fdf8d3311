/* bench/exits guest: ROUNDS rounds of COUNT port-I/O exits (out to port 0x80), each
 * round timed by the guest itself with RDTSC and reported on COM1 as a line
 * "T <ticks, 16 hex digits>"; then isa-debug-exit(0).
 * Multiboot v1, 32-bit protected mode, no paging: the smallest possible loop, so the
 * figure is the exit path and nothing else, and every VMM (vsmtrace, the C loop of
 * bench/exits_driver.c, QEMU) runs the very same guest and is timed the same way. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x0
#define COM1 0x3f8

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    mov $0x80000, %esp
    mov $ROUNDS, %ebp
round:
    rdtsc
    mov %eax, %esi              /* start, low */
    mov %edx, %edi              /* start, high */
    mov $COUNT, %ecx
    jecxz 2f
1:  out %al, $0x80
    dec %ecx
    jnz 1b
2:  rdtsc
    sub %esi, %eax
    sbb %edi, %edx
    mov %eax, %esi              /* ticks, low */
    mov $'T', %al
    call putc
    mov $' ', %al
    call putc
    mov %edx, %eax
    call puthex32
    mov %esi, %eax
    call puthex32
    mov $'\n', %al
    call putc
    dec %ebp
    jnz round
    xor %eax, %eax
    out %eax, $0xf4
    hlt

/* putc: AL to COM1's transmit register (every VMM here takes it without polling) */
putc:
    push %edx
    mov $COM1, %dx
    out %al, %dx
    pop %edx
    ret

/* puthex32: EAX as 8 hex digits; clobbers EAX, EBX, ECX */
puthex32:
    mov %eax, %ebx
    mov $8, %ecx
3:  rol $4, %ebx
    mov %ebx, %eax
    and $0xf, %eax
    add $'0', %al
    cmp $'9', %al
    jbe 4f
    add $('a' - '0' - 10), %al
4:  call putc
    dec %ecx
    jnz 3b
    ret
