/*
 * vtl.c - bench/vtl guest: n=N round trips of one VTL0 -> VTL1 -> VTL0 kind.
 *
 * cmdline: n=N, op=call|intercept|exit
 *   call:      VTL call that VTL1 answers at once with a fast VTL return (RAX/RCX not
 *              reloaded). Both sides are tight assembly loops around the hypercall-page
 *              stubs (VTL1 enters its loop through a VSM_OP_USER request), so one round
 *              trip is two traps, two VTL switches and ~16 guest instructions.
 *   intercept: a write to a page VTL1 made read-only for VTL0, resolved by VTL1 with
 *              VSM_ACT_SKIP (HvCallSetVpRegisters of VTL0's RIP past the write, then
 *              a VTL return). The page keeps its value.
 *   exit:      a bare `out` to port 0x80 after the same VSM set-up (reference only;
 *              bench/vtl takes its bare exit from bench/exits' guest).
 * Every kind does the full VSM set-up first, so N vs 0 cancels it.
 * Exit code 0, or 1 if a check failed (VSM set-up, protection, write not skipped).
 */
#include "vsm.h"

#define PATTERN 0x5A5A5A5A5A5A5A5Aull

static volatile uint64_t page[HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));

/* The counter lives on the (private) stack: a VTL switch copies every shared GPR, so
 * callee-saved registers are saved around the loops and nothing is kept in them. */
__asm__(".text\n"
        /* void vtl0_calls(uint64_t n): n VTL calls (n >= 1). */
        ".globl vtl0_calls\n"
        "vtl0_calls:\n"
        "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    pushq %rdi\n"
        "1:  xorl %ecx, %ecx\n"
        "    call *vsm_vtl0_call_addr(%rip)\n"
        "    decq (%rsp)\n"
        "    jnz 1b\n"
        "    addq $8, %rsp\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"
        "    ret\n"
        /* void vtl1_fast_returns(uint64_t n): n + 1 fast VTL returns, then back to the caller. */
        ".globl vtl1_fast_returns\n"
        "vtl1_fast_returns:\n"
        "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    pushq %rdi\n"
        "2:  movl $1, %ecx\n"
        "    call *vsm_vtl1_return_addr(%rip)\n"
        "    decq (%rsp)\n"
        "    jns 2b\n"
        "    addq $8, %rsp\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"
        "    ret\n");
void vtl0_calls(uint64_t n);
void vtl1_fast_returns(uint64_t n);

/* VTL1: VSM_OP_USER(n) acknowledges, then answers the next n VTL calls in vtl1_fast_returns. */
uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)vp;
    m->ret[0] = 0;
    vtl1_fast_returns(m->arg[0]);
    return 0;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t n = cmdline_get_uint("n", 0);
    if (!vsm_init(false))
        return 1;
    uint32_t vp = vsm_vp_index();
    if (cmdline_is("op", "call")) {
        if (n == 0)
            return vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0) == 0 ? 0 : 1;
        vtl1_op(VSM_OP_USER, n, 0, 0, 0, 0); /* VTL1 now in vtl1_fast_returns */
        vtl0_calls(n);
        /* The call that ends VTL1's loop: back in its service loop, it serves this NOP. */
        return vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0) == 0 ? 0 : 1;
    }
    if (cmdline_is("op", "intercept")) {
        uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
        if (vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0) != HV_STATUS_SUCCESS)
            return 1;
        page[0] = PATTERN;
        vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_SKIP, 0, 0, 0, 0);
        if (vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0) != HV_STATUS_SUCCESS)
            return 1;
        uint32_t before = vsm_log[vp].intercepts;
        for (uint64_t i = 0; i < n; i++)
            page[0] = i;
        uint32_t seen = vsm_log[vp].intercepts - before;
        if (seen != (uint32_t)n || page[0] != PATTERN) {
            printf("FAIL intercepts: %u of %lu, page 0x%lx\n", seen, n, page[0]);
            return 1;
        }
        return 0;
    }
    for (uint64_t i = 0; i < n; i++)
        outb(0x80, 0);
    return 0;
}
