/*
 * msr_latency.c - round trips of RDMSR(HV_X64_MSR_VP_INDEX), a synthetic MSR the VMM
 * serves in userspace, timed by the guest with RDTSC around each one, on several VPs at
 * once.  cmdline: cpus=N (default 2), n=samples per CPU (default 2000), others=msr|spin
 * (msr: every CPU measures; spin: CPU 0 measures while the others spin without exits),
 * raw=1 prints every sample.
 *
 * Prints "tsc_khz=K", per measuring CPU "cpu C: n=.. max=.. over1ms=.." (cycles) and, with
 * raw=1, the samples as "s C v v v ..." lines (hex, 16 per line).  The rounds are timed
 * with the guest's own TSC, so no figure can be negative.
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define MAX_SAMPLES 20000
static uint32_t samples[MAX_CPUS][MAX_SAMPLES];
static volatile uint64_t max_cycles[MAX_CPUS];
static volatile uint32_t over_1ms[MAX_CPUS], wrong_index[MAX_CPUS];
static volatile uint32_t done_count, go, stop_spin;
static uint32_t ncpus, nsamples;
static bool spin_others;
static uint64_t cycles_per_ms;

static void measure(int cpu)
{
    while (!atomic_load32(&go))
        cpu_pause();
    uint64_t worst = 0;
    for (uint32_t i = 0; i < nsamples; i++) {
        uint64_t t0 = rdtsc();
        uint64_t index = rdmsr(HV_MSR_VP_INDEX);
        uint64_t t1 = rdtsc();
        if (index != (uint64_t)cpu)
            wrong_index[cpu]++;
        uint64_t d = t1 > t0 ? t1 - t0 : 0;
        samples[cpu][i] = d > 0xFFFFFFFFull ? 0xFFFFFFFFu : (uint32_t)d;
        if (d > worst)
            worst = d;
        if (d > cycles_per_ms)
            over_1ms[cpu]++;
    }
    max_cycles[cpu] = worst;
    atomic_inc32(&done_count);
}

static void ap_main(int cpu)
{
    if (spin_others) {
        while (!atomic_load32(&stop_spin))
            cpu_pause();
        atomic_inc32(&done_count);
    } else {
        measure(cpu);
    }
    for (;;)
        hlt();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    ncpus = (uint32_t)cmdline_get_uint("cpus", 2);
    nsamples = (uint32_t)cmdline_get_uint("n", 2000);
    if (nsamples > MAX_SAMPLES)
        nsamples = MAX_SAMPLES;
    spin_others = cmdline_is("others", "spin");
    uint64_t tsc_khz = rdmsr(HV_MSR_TSC_FREQUENCY) / 1000;
    cycles_per_ms = tsc_khz;
    printf("tsc_khz=%lu\n", tsc_khz);
    apic_enable();
    if (ncpus > 1 && (uint32_t)smp_start_aps((int)ncpus, ap_main) != ncpus) {
        printf("FAIL cpus_up\n");
        return 1;
    }
    atomic_store32(&go, 1);
    measure(0);
    atomic_store32(&stop_spin, 1);
    uint64_t start = rdtsc();
    while (atomic_load32(&done_count) < ncpus && rdtsc() - start < 120 * smp_timeout_tsc)
        cpu_pause();
    uint32_t measured = spin_others ? 1 : ncpus;
    bool raw = cmdline_is("raw", "1");
    for (uint32_t c = 0; c < measured; c++) {
        printf("cpu %u: n=%u max=%lu over1ms=%u\n", c, nsamples, max_cycles[c], over_1ms[c]);
        if (wrong_index[c])
            printf("FAIL vp_index: cpu %u read another VP's index %u times\n", c, wrong_index[c]);
        if (!raw)
            continue;
        for (uint32_t i = 0; i < nsamples; i += 16) {
            char line[16 * 9 + 16];
            int len = snprintf(line, sizeof(line), "s %u", c);
            for (uint32_t j = i; j < nsamples && j < i + 16; j++)
                len += snprintf(line + len, sizeof(line) - (size_t)len, " %x", samples[c][j]);
            printf("%s\n", line);
        }
    }
    printf("done\n");
    return 0;
}
