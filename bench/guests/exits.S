/* bench/exits guest: COUNT port-I/O exits (out to port 0x80), then isa-debug-exit(0).
 * Multiboot v1, 32-bit protected mode, no paging: the smallest possible loop,
 * so the benchmark measures the exit path and nothing else. */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x0

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    mov $COUNT, %ecx
    jecxz 2f
1:  out %al, $0x80
    dec %ecx
    jnz 1b
2:
    xor %eax, %eax
    out %eax, $0xf4
    hlt
