/*
 * vtl.c - bench/vtl guest: rounds of VTL0 -> VTL1 -> VTL0 round trips, timed by the guest.
 *
 * cmdline: n=N (VTL calls per round), ni=M (intercepts per round), ne=K (bare exits per
 * round), rounds=R. After the VSM set-up (done once, outside every timing) each round
 * prints "T <kind> <RDTSC ticks>" for:
 *   exit:      K bare `out`s to port 0x80 from VTL0 (the exit path alone, VSM enabled);
 *   call:      N VTL calls that VTL1 answers at once with a fast VTL return (RAX/RCX not
 *              reloaded). Both sides are tight assembly loops around the hypercall-page
 *              stubs (VTL1 enters its loop through a VSM_OP_USER request), so one round
 *              trip is two traps, two VTL switches and ~16 guest instructions;
 *   intercept: M writes to a page VTL1 made read-only for VTL0, each resolved by VTL1
 *              with VSM_ACT_SKIP (HvCallSetVpRegisters of VTL0's RIP past the write, then
 *              a VTL return). The page keeps its value.
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
    uint64_t ni = cmdline_get_uint("ni", 0);
    uint64_t ne = cmdline_get_uint("ne", 0);
    uint64_t rounds = cmdline_get_uint("rounds", 1);
    if (!vsm_init(false))
        return 1;
    uint32_t vp = vsm_vp_index();
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
    if (vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0) != HV_STATUS_SUCCESS)
        return 1;
    page[0] = PATTERN;
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_SKIP, 0, 0, 0, 0);
    if (vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0) != HV_STATUS_SUCCESS)
        return 1;
    for (uint64_t r = 0; r < rounds; r++) {
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; i < ne; i++)
            outb(0x80, 0);
        uint64_t t1 = rdtsc();
        uint64_t ne_ticks = t1 - t0;
        uint64_t t2 = t1;
        if (n) {
            vtl1_op(VSM_OP_USER, n, 0, 0, 0, 0); /* VTL1 now in vtl1_fast_returns */
            t1 = rdtsc();
            vtl0_calls(n);
            t2 = rdtsc();
            /* The call that ends VTL1's loop: back in its service loop, it serves this NOP. */
            if (vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0) != 0)
                return 1;
        }
        uint32_t before = vsm_log[vp].intercepts;
        uint64_t t3 = rdtsc();
        for (uint64_t i = 0; i < ni; i++)
            page[0] = i;
        uint64_t t4 = rdtsc();
        uint32_t seen = vsm_log[vp].intercepts - before;
        if (seen != (uint32_t)ni || page[0] != PATTERN) {
            printf("FAIL intercepts: %u of %lu, page 0x%lx\n", seen, ni, page[0]);
            return 1;
        }
        printf("T exit %lu\nT call %lu\nT intercept %lu\n", ne_ticks, t2 - t1, t4 - t3);
    }
    return 0;
}
