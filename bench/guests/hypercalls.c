/*
 * hypercalls.c - bench/hypercalls guest: n=N round trips of one kind of hypercall.
 *
 * cmdline: n=N, call=fast|mem|exit
 *   fast: HvCallNotifyLongSpinWait as a fast call (RDX = spin count): the cheapest
 *         call that goes through the whole dispatcher and a handler;
 *   mem:  HvCallGetVpIndexFromApicId, memory based, one rep (16 + 4 bytes in, 4 out);
 *   exit: a bare `out` to an unclaimed port (the same exit without Hyper-V work).
 */
#include "hv.h"

static uint64_t in[4] __attribute__((aligned(64)));
static uint32_t out[2] __attribute__((aligned(64)));

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t n = cmdline_get_uint("n", 0);
    if (!hv_init())
        return 2;
    in[0] = HV_PARTITION_ID_SELF;
    in[1] = 0;
    in[2] = 0; /* APIC id 0 */
    uint64_t bad = 0;
    if (cmdline_is("call", "fast")) {
        for (uint64_t i = 0; i < n; i++)
            bad |= hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, 1, 0) & 0xFFFF;
    } else if (cmdline_is("call", "mem")) {
        for (uint64_t i = 0; i < n; i++)
            bad |= hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1), (uint64_t)in,
                                (uint64_t)out) & 0xFFFF;
    } else {
        for (uint64_t i = 0; i < n; i++)
            outb(0x80, 0);
    }
    return bad ? 1 : 0;
}
