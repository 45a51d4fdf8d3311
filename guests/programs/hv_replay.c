/*
 * hv_replay.c - values the guest gets from the hypervisor, printed, for the replayer's
 * state checks (tests/test_replay.py), and a hypercall/MSR loop for bench/replay.
 *
 * cmdline: cpus=N (1..8, default 1), loop=N (default 0)
 *   Prints, in this order (each line right after the values were read back):
 *     guest_os_id=0x<hex> hypercall=0x<hex>
 *     partition_id=0x<hex>                      (fast HvCallGetPartitionId, RDX output)
 *     cpu <c> vp_index=<n> scontrol=0x<hex> simp=0x<hex> siefp=0x<hex> sint2=0x<hex>
 *                                               (one line per CPU, BSP first, then each AP)
 *     stimer0 config=0x<hex> count=<n>           (BSP, armed far in the future, never fires)
 *     loop <n> bad=<n>                           (loop=N round trips of a fast and a memory
 *                                                 hypercall and two synthetic MSR reads)
 *     hv_replay done
 *   Exit code 0 (1 if a loop call failed, 2 if Hyper-V is missing).
 */
#include "hv.h"
#include "apic.h"
#include "smp.h"

#define MAX_CPUS_HERE 8

static uint8_t simp[MAX_CPUS_HERE][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t siefp[MAX_CPUS_HERE][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static volatile uint32_t turn;

static void synic_line(int cpu)
{
    hv_synic_enable(simp[cpu], siefp[cpu]);
    hv_sint_set(2, (uint8_t)(0x40 + cpu), 0);
    printf("cpu %d vp_index=%lu scontrol=0x%lx simp=0x%lx siefp=0x%lx sint2=0x%lx\n", cpu, rdmsr(HV_MSR_VP_INDEX),
           rdmsr(HV_MSR_SCONTROL), rdmsr(HV_MSR_SIMP), rdmsr(HV_MSR_SIEFP), rdmsr(HV_MSR_SINT0 + 2));
}

static void ap_main(int cpu)
{
    while (atomic_load32(&turn) != (uint32_t)cpu)
        cpu_pause();
    synic_line(cpu);
    atomic_store32(&turn, (uint32_t)cpu + 1);
    halt_forever();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    int n = (int)cmdline_get_uint("cpus", 1);
    uint64_t loops = cmdline_get_uint("loop", 0);
    if (n < 1 || n > MAX_CPUS_HERE)
        return 1;
    if (!hv_init())
        return 2;
    printf("guest_os_id=0x%lx hypercall=0x%lx\n", rdmsr(HV_MSR_GUEST_OS_ID), rdmsr(HV_MSR_HYPERCALL));
    uint64_t rdx = 0, r8 = 0;
    hv_fast_out(HVCALL_GET_PARTITION_ID, &rdx, &r8);
    printf("partition_id=0x%lx\n", rdx);

    synic_line(0);
    atomic_store32(&turn, 1);
    if (n > 1) {
        apic_enable();
        smp_start_aps(n, ap_main);
        uint64_t start = rdtsc();
        while (atomic_load32(&turn) < (uint32_t)n && rdtsc() - start < smp_timeout_tsc)
            cpu_pause();
    }

    hv_stimer_config(0, HV_STIMER_SINT(2));
    hv_stimer_count(0, 100000000000ull); /* 10000 s of 100 ns units */
    hv_stimer_config(0, HV_STIMER_SINT(2) | HV_STIMER_ENABLE);
    printf("stimer0 config=0x%lx count=%lu\n", rdmsr(HV_MSR_STIMER0_CONFIG), rdmsr(HV_MSR_STIMER0_COUNT));

    static uint64_t in[4] __attribute__((aligned(64)));
    static uint32_t out[2] __attribute__((aligned(64)));
    in[0] = HV_PARTITION_ID_SELF;
    uint64_t bad = 0;
    for (uint64_t i = 0; i < loops; i++) {
        uint64_t d = 0, e = 0;
        bad |= hv_fast_out(HVCALL_GET_PARTITION_ID, &d, &e) & 0xFFFF;
        bad |= hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1), (uint64_t)in, (uint64_t)out) &
               0xFFFF;
        bad |= rdmsr(HV_MSR_VP_INDEX) | (rdmsr(HV_MSR_SCONTROL) ^ HV_SCONTROL_ENABLE);
    }
    if (loops)
        printf("loop %lu bad=%lu\n", loops, bad);
    hv_stimer_config(0, 0);
    printf("hv_replay done\n");
    return bad ? 1 : 0;
}
