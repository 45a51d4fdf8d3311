/*
 * hv_refcount.c - TIME_REF_COUNT never runs behind the reference TSC page, and is
 * monotonic across VPs.  Every CPU loops: page time p0, MSR m, page time p1; it needs
 * p0 <= m <= p1 (the TLFS: both are the same partition reference time).  Each CPU also
 * publishes the largest MSR value it has read; a read that started after another CPU
 * published v must return at least v.  cmdline: cpus=N (default 2), rounds=R.
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

static uint8_t tsc_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
#define PAGE ((const struct hv_reference_tsc_page *)tsc_page)

static volatile uint64_t published[MAX_CPUS];
static volatile uint32_t behind_page[MAX_CPUS], ahead_of_page[MAX_CPUS], cross_vp_back[MAX_CPUS];
static volatile uint64_t worst_behind[MAX_CPUS], worst_ahead[MAX_CPUS];
static volatile uint64_t min_lead[MAX_CPUS], min_lag[MAX_CPUS]; /* min(m - p0), min(p1 - m) when ordered */
static volatile uint32_t done_count, go;
static uint32_t ncpus;
static uint64_t rounds;

static void loop(int cpu)
{
    min_lead[cpu] = min_lag[cpu] = ~0ull;
    while (!atomic_load32(&go))
        cpu_pause();
    for (uint64_t i = 0; i < rounds; i++) {
        uint64_t seen[MAX_CPUS];
        for (uint32_t c = 0; c < ncpus; c++)
            seen[c] = published[c];
        uint64_t p0, p1;
        hv_tsc_page_time(PAGE, &p0);
        uint64_t m = hv_ref_time();
        hv_tsc_page_time(PAGE, &p1);
        if (m >= p0 && m - p0 < min_lead[cpu])
            min_lead[cpu] = m - p0;
        if (p1 >= m && p1 - m < min_lag[cpu])
            min_lag[cpu] = p1 - m;
        if (m < p0) {
            behind_page[cpu]++;
            if (p0 - m > worst_behind[cpu])
                worst_behind[cpu] = p0 - m;
        }
        if (m > p1) {
            ahead_of_page[cpu]++;
            if (m - p1 > worst_ahead[cpu])
                worst_ahead[cpu] = m - p1;
        }
        for (uint32_t c = 0; c < ncpus; c++)
            if (m < seen[c])
                cross_vp_back[cpu]++;
        published[cpu] = m;
    }
    atomic_inc32(&done_count);
}

static void ap_main(int cpu)
{
    loop(cpu);
    for (;;)
        hlt();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    ncpus = (uint32_t)cmdline_get_uint("cpus", 2);
    rounds = cmdline_get_uint("rounds", 3000);
    if (!hv_init())
        return 2;
    apic_enable();
    wrmsr(HV_MSR_REFERENCE_TSC, (uint64_t)tsc_page | HV_OVERLAY_ENABLE);
    uint64_t t;
    hv_check_true("tsc_page_valid", hv_tsc_page_time(PAGE, &t));
    hv_check("cpus_up", (uint64_t)smp_start_aps((int)ncpus, ap_main), ncpus);
    atomic_store32(&go, 1);
    loop(0);
    uint64_t start = rdtsc();
    while (atomic_load32(&done_count) < ncpus && rdtsc() - start < 60 * smp_timeout_tsc)
        cpu_pause();
    hv_check("all_cpus_done", atomic_load32(&done_count), ncpus);
    uint32_t behind = 0, ahead = 0, back = 0;
    for (uint32_t c = 0; c < ncpus; c++) {
        printf("cpu %u: msr behind page %u (worst %lu ticks), ahead of page %u (worst %lu), cross-VP backwards %u; closest: msr-page0 %lu, page1-msr %lu ticks\n",
               c, behind_page[c], worst_behind[c], ahead_of_page[c], worst_ahead[c], cross_vp_back[c], min_lead[c], min_lag[c]);
        behind += behind_page[c];
        ahead += ahead_of_page[c];
        back += cross_vp_back[c];
    }
    hv_check("msr_never_behind_page", behind, 0);
    hv_check("msr_never_ahead_of_later_page", ahead, 0);
    hv_check("msr_monotonic_across_vps", back, 0);
    hv_finish();
    return 0;
}
