/* smp.c - start cpus=N CPUs; every AP reports in, then the BSP exits 0 (1 if some never came up). */
#include "apic.h"
#include "guest.h"
#include "smp.h"

static volatile uint32_t reported;

static void ap_main(int cpu)
{
    printf("AP %d up, apic id %u\n", cpu, apic_id());
    atomic_inc32(&reported);
    halt_forever();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    int n = (int)cmdline_get_uint("cpus", 1);
    if (cmdline_is("x2apic", "1") && !apic_enable_x2apic()) {
        printf("x2apic not supported\n");
        return 2;
    }
    printf("BSP apic id %u, starting %d cpus\n", apic_id(), n);
    int up = smp_start_aps(n, ap_main);
    /* wait (bounded) until every AP has printed its line */
    uint64_t start = rdtsc();
    while (atomic_load32(&reported) < (uint32_t)(up - 1) && rdtsc() - start < smp_timeout_tsc)
        cpu_pause();
    if (up != n || atomic_load32(&reported) != (uint32_t)(n - 1)) {
        printf("only %d of %d cpus up\n", up, n);
        return 1;
    }
    printf("all %d cpus up\n", n);
    return 0;
}
