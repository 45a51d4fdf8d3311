/*
 * ipi.c - fixed, self, all-but-self and all-including-self IPIs.
 *
 * cmdline: cpus=N (N >= 2), x2apic=0|1.  Every CPU counts each vector it
 * receives; the BSP checks every expected interrupt arrived exactly once
 * and no unexpected one did.  Exit 0 on success, 1 on failure, 2 if x2APIC
 * was requested but is missing.
 */
#include "apic.h"
#include "guest.h"
#include "smp.h"

#define V_FIXED 0x50
#define V_SELF 0x51
#define V_ALL_BUT_SELF 0x52
#define V_ALL 0x53
#define NKINDS 4

static volatile uint32_t got[MAX_CPUS][NKINDS];

static void ipi_irq(struct int_frame *f)
{
    int cpu = smp_cpu_id();
    uint32_t v = (uint32_t)f->vector;
    if (cpu)
        printf("AP %d got IPI vector 0x%x\n", cpu, v);
    else
        printf("BSP got IPI vector 0x%x\n", v);
    /* counted after the line is out: the BSP's summary (and its exit) waits for the count, so
       a line can never be cut off by the exit when the host is slow to run this VP */
    if (cpu < MAX_CPUS)
        atomic_inc32(&got[cpu][v - V_FIXED]);
    apic_eoi();
}

static void ap_main(int cpu)
{
    (void)cpu;
    for (;;)
        sti_hlt();
}

/* Wait until got[cpu][kind] reaches want; false on timeout. */
static bool wait_got(int cpu, int kind, uint32_t want)
{
    uint64_t start = rdtsc();
    while (atomic_load32(&got[cpu][kind]) < want) {
        if (rdtsc() - start > smp_timeout_tsc)
            return false;
        cpu_pause();
    }
    return true;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    int n = (int)cmdline_get_uint("cpus", 2);
    if (n < 2 || n > MAX_CPUS) {
        printf("ipi needs 2 <= cpus <= %d\n", MAX_CPUS);
        return 1;
    }
    bool x2 = cmdline_is("x2apic", "1");
    if (x2 && !apic_enable_x2apic()) {
        printf("x2apic not supported\n");
        return 2;
    }
    apic_enable();
    for (int v = V_FIXED; v < V_FIXED + NKINDS; v++)
        set_irq_handler((uint8_t)v, ipi_irq);
    printf("ipi test cpus=%d x2apic=%d\n", n, x2 ? 1 : 0);
    int up = smp_start_aps(n, ap_main);
    if (up != n) {
        printf("only %d of %d cpus up\n", up, n);
        return 1;
    }
    sti();
    for (int cpu = 1; cpu < n; cpu++) {
        apic_send_ipi((uint32_t)cpu, V_FIXED, APIC_DM_FIXED, APIC_DEST_NONE);
        wait_got(cpu, 0, 1);
    }
    apic_send_ipi(0, V_SELF, APIC_DM_FIXED, APIC_DEST_SELF);
    wait_got(0, 1, 1);
    apic_send_ipi(0, V_ALL_BUT_SELF, APIC_DM_FIXED, APIC_DEST_ALL_BUT_SELF);
    for (int cpu = 1; cpu < n; cpu++)
        wait_got(cpu, 2, 1);
    apic_send_ipi(0, V_ALL, APIC_DM_FIXED, APIC_DEST_ALL);
    for (int cpu = 0; cpu < n; cpu++)
        wait_got(cpu, 3, 1);
    /* give stray duplicates a moment to show up */
    uint64_t start = rdtsc();
    while (rdtsc() - start < 20000000)
        cpu_pause();
    cli();

    /* expected[kind] for the BSP and for each AP */
    static const uint32_t bsp_expect[NKINDS] = {0, 1, 0, 1};
    static const uint32_t ap_expect[NKINDS] = {1, 0, 1, 1};
    uint32_t ok_count[NKINDS] = {0}, want[NKINDS] = {0};
    bool ok = true;
    for (int cpu = 0; cpu < n; cpu++) {
        const uint32_t *exp = cpu ? ap_expect : bsp_expect;
        for (int k = 0; k < NKINDS; k++) {
            uint32_t g = atomic_load32(&got[cpu][k]);
            want[k] += exp[k];
            if (exp[k] && g == exp[k])
                ok_count[k]++;
            if (g != exp[k]) {
                printf("cpu %d vector 0x%x: got %u, expected %u\n", cpu, V_FIXED + k, g, exp[k]);
                ok = false;
            }
        }
    }
    printf("summary: fixed %u/%u self %u/%u all-but-self %u/%u all %u/%u\n", ok_count[0], want[0], ok_count[1],
           want[1], ok_count[2], want[2], ok_count[3], want[3]);
    printf("ipi test %s\n", ok ? "passed" : "FAILED");
    return ok ? 0 : 1;
}
