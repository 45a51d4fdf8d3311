/*
 * hv_trap.c - the hypercall trap port used from outside the hypercall page (found by the fuzz
 * campaign, docs/fuzzing.md): a trap that fails with #UD reports the #UD at the trapping OUT
 * itself, whatever its width or encoding; an IN from the trap port is an ordinary port read
 * (all ones) and makes no hypercall.
 *
 * Output: "ok <check>" / "FAIL <check>: ..." lines, then hv_finish() (exit 0 all passed).
 */
#include "hv.h"

#define TRAP_PORT 0x58

/* Each stub: RCX = control (rdi), then the trap; a label right at the trap instruction. */
__asm__(".text\n"
        ".globl t_out8, t_out8_at\n"
        "t_out8:\n    movq %rdi, %rcx\n    xorl %eax, %eax\nt_out8_at:\n    outb %al, $0x58\n    ret\n"
        ".globl t_out16, t_out16_at\n"
        "t_out16:\n    movq %rdi, %rcx\n    xorl %eax, %eax\nt_out16_at:\n    outw %ax, $0x58\n    ret\n"
        ".globl t_out32, t_out32_at\n"
        "t_out32:\n    movq %rdi, %rcx\n    xorl %eax, %eax\nt_out32_at:\n    outl %eax, $0x58\n    ret\n"
        ".globl t_outdx, t_outdx_at\n"
        "t_outdx:\n    movq %rdi, %rcx\n    xorl %eax, %eax\n    movl $0x58, %edx\nt_outdx_at:\n    outb %al, %dx\n    ret\n"
        ".globl t_in8\n"
        "t_in8:\n    movq %rdi, %rcx\n    movq $0x1122334455667700, %rax\n    inb $0x58, %al\n    ret\n");
uint64_t t_out8(uint64_t control);
uint64_t t_out16(uint64_t control);
uint64_t t_out32(uint64_t control);
uint64_t t_outdx(uint64_t control);
uint64_t t_in8(uint64_t control);
extern char t_out8_at[], t_out16_at[], t_out32_at[], t_outdx_at[];

static volatile uint64_t ud_rip;
static volatile int ud_count;
static uint64_t skip_to;

static bool on_ud(struct int_frame *f)
{
    ud_rip = f->rip;
    ud_count++;
    f->rip = skip_to;
    return true;
}

static void ud_at(const char *name, uint64_t (*stub)(uint64_t), char *at, unsigned len)
{
    ud_rip = 0;
    ud_count = 0;
    skip_to = (uint64_t)at + len;
    /* A VTL return from VTL0 is always #UD (VSM is not even enabled here). */
    stub(0x0012);
    char n[64];
    snprintf(n, sizeof(n), "%s_ud_at_trap", name);
    hv_check(n, ud_rip, (uint64_t)at);
    snprintf(n, sizeof(n), "%s_ud_once", name);
    hv_check(n, ud_count, 1);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        return 2;
    set_exception_handler(6, on_ud);
    ud_at("out8", t_out8, t_out8_at, 2);
    ud_at("out16", t_out16, t_out16_at, 3);
    ud_at("out32", t_out32, t_out32_at, 2);
    ud_at("outdx", t_outdx, t_outdx_at, 1);
    /* A good call from outside the page works like one through it. */
    ud_count = 0;
    hv_check("out8_unknown_code_status", t_out8(0x7FFF) & 0xFFFF, HV_STATUS_INVALID_HYPERCALL_CODE);
    hv_check("out32_unknown_code_status", t_out32(0x7FFF) & 0xFFFF, HV_STATUS_INVALID_HYPERCALL_CODE);
    uint64_t rax = t_in8(HVCALL_GET_PARTITION_ID);
    hv_check("in8_reads_all_ones", rax, 0x11223344556677FFull);
    hv_check("no_ud_for_good_traps", ud_count, 0);
    hv_finish();
}
