/* smp.c - INIT/SIPI bring-up of application processors. */
#include "smp.h"
#include "apic.h"

extern char ap_trampoline_start[], ap_trampoline_end[];

uint64_t smp_timeout_tsc = 4000000000ull;
static void (*ap_entry_fn)(int cpu);
static volatile uint32_t ap_count; /* APs that checked in */
static volatile uint32_t ap_up[MAX_CPUS];

uint32_t smp_cpus_started(void)
{
    return 1 + atomic_load32(&ap_count);
}

int smp_cpu_id(void)
{
    return (int)apic_id();
}

/* Jumped to from ap_start64 (common.S) on the AP's own stack. */
NORETURN void smp_ap_entry(int cpu);
void smp_ap_entry(int cpu)
{
    idt_load();
    apic_follow_mode();
    apic_enable();
    atomic_store32(&ap_up[cpu], 1);
    atomic_inc32(&ap_count); /* lock add */
    ap_entry_fn(cpu);
    halt_forever();
}

static bool wait_for_aps(uint32_t want)
{
    uint64_t start = rdtsc();
    while (atomic_load32(&ap_count) < want) {
        if (rdtsc() - start > smp_timeout_tsc)
            return false;
        cpu_pause();
    }
    return true;
}

int smp_start_aps(int ncpus, void (*ap_main)(int cpu))
{
    if (ncpus > MAX_CPUS)
        ncpus = MAX_CPUS;
    if (ncpus < 2)
        return 1;
    ap_entry_fn = ap_main;
    memcpy((void *)(uintptr_t)AP_TRAMPOLINE_ADDR, ap_trampoline_start,
           (size_t)(ap_trampoline_end - ap_trampoline_start));
    apic_enable();
    uint32_t want = (uint32_t)ncpus - 1;
    for (int cpu = 1; cpu < ncpus; cpu++)
        apic_send_ipi((uint32_t)cpu, 0, APIC_DM_INIT, APIC_DEST_NONE);
    for (int cpu = 1; cpu < ncpus; cpu++)
        apic_send_ipi((uint32_t)cpu, SIPI_VECTOR, APIC_DM_STARTUP, APIC_DEST_NONE);
    if (!wait_for_aps(want)) {
        for (int cpu = 1; cpu < ncpus; cpu++)
            if (!atomic_load32(&ap_up[cpu]))
                apic_send_ipi((uint32_t)cpu, SIPI_VECTOR, APIC_DM_STARTUP, APIC_DEST_NONE);
        wait_for_aps(want);
    }
    return (int)smp_cpus_started();
}
