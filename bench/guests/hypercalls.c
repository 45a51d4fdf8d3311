/*
 * hypercalls.c - bench/hypercalls guest: rounds of hypercall round trips, timed by the guest.
 *
 * cmdline: n=N rounds=R [only=exit|fast|mem]. Each round runs N round trips of each kind
 * (or of the one kind named by only=; the others run 0 times) and prints
 * "T <kind> <RDTSC ticks>" for it:
 *   exit: a bare `out` to an unclaimed port (the exit without Hyper-V work);
 *   fast: HvCallNotifyLongSpinWait as a fast call (RDX = spin count): the cheapest
 *         call that goes through the whole dispatcher and a handler;
 *   mem:  HvCallGetVpIndexFromApicId, memory based, one rep (16 + 4 bytes in, 4 out).
 * Exit code 0, or 1 if a hypercall failed.
 */
#include "hv.h"

static uint64_t in[4] __attribute__((aligned(64)));
static uint32_t out[2] __attribute__((aligned(64)));

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t n = cmdline_get_uint("n", 0);
    uint64_t rounds = cmdline_get_uint("rounds", 1);
    char only[8] = "";
    cmdline_get("only", only, sizeof(only));
    uint64_t n_exit = !only[0] || !strcmp(only, "exit") ? n : 0;
    uint64_t n_fast = !only[0] || !strcmp(only, "fast") ? n : 0;
    uint64_t n_mem = !only[0] || !strcmp(only, "mem") ? n : 0;
    if (!hv_init())
        return 2;
    in[0] = HV_PARTITION_ID_SELF;
    in[1] = 0;
    in[2] = 0; /* APIC id 0 */
    uint64_t bad = 0;
    for (uint64_t r = 0; r < rounds; r++) {
        uint64_t t0 = rdtsc();
        for (uint64_t i = 0; i < n_exit; i++)
            outb(0x80, 0);
        uint64_t t1 = rdtsc();
        for (uint64_t i = 0; i < n_fast; i++)
            bad |= hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, 1, 0) & 0xFFFF;
        uint64_t t2 = rdtsc();
        for (uint64_t i = 0; i < n_mem; i++)
            bad |= hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1), (uint64_t)in,
                                (uint64_t)out) & 0xFFFF;
        uint64_t t3 = rdtsc();
        printf("T exit %lu\nT fast %lu\nT mem %lu\n", t1 - t0, t2 - t1, t3 - t2);
    }
    return bad ? 1 : 0;
}
