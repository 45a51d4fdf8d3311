/*
 * hv_time.c - partition reference time: TIME_REF_COUNT against the TSC over ~100 ms of
 * TSC time (10 MHz expected), and the reference TSC page (sequence, scale, consistency
 * with the MSR).
 *
 * Prints "ref_ratio_ppm=<n>" (1000000 = exactly 10 MHz by the TSC's clock).
 */
#include "hv.h"

static uint8_t tsc_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t tsc_page2[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

static uint64_t ratio_ppm(uint64_t ref_delta, uint64_t tsc_delta, uint64_t tsc_hz)
{
    /* ref ticks per expected ticks, in ppm; 64-bit is enough for deltas of seconds */
    uint64_t expected = tsc_delta * 10000000u / tsc_hz;
    return expected ? ref_delta * 1000000u / expected : 0;
}

static void reference_counter(uint64_t tsc_hz)
{
    uint64_t span = tsc_hz / 10; /* 100 ms */
    uint64_t a0 = rdtsc();
    uint64_t r0 = hv_ref_time();
    uint64_t a1 = rdtsc();
    while (rdtsc() - a1 < span)
        cpu_pause();
    uint64_t b0 = rdtsc();
    uint64_t r1 = hv_ref_time();
    uint64_t b1 = rdtsc();
    /* The MSR read happened somewhere inside [a0,a1] and [b0,b1]: take the midpoints. */
    uint64_t tsc_delta = (b0 / 2 + b1 / 2) - (a0 / 2 + a1 / 2);
    uint64_t ppm = ratio_ppm(r1 - r0, tsc_delta, tsc_hz);
    printf("tsc_hz=%lu tsc_delta=%lu ref_delta=%lu\n", tsc_hz, tsc_delta, r1 - r0);
    printf("ref_ratio_ppm=%lu\n", ppm);
    hv_check_true("ref_time_10mhz_within_1pct", ppm >= 990000 && ppm <= 1010000);
}

static void tsc_page_checks(uint64_t tsc_hz)
{
    struct hv_reference_tsc_page *p = (struct hv_reference_tsc_page *)tsc_page;
    memset(tsc_page, 0xFF, sizeof(tsc_page));
    wrmsr(HV_MSR_REFERENCE_TSC, (uint64_t)tsc_page | HV_OVERLAY_ENABLE);
    hv_check("reference_tsc_msr_readback", rdmsr(HV_MSR_REFERENCE_TSC), (uint64_t)tsc_page | HV_OVERLAY_ENABLE);
    uint32_t seq = p->sequence;
    printf("tsc page: sequence=%u scale=0x%lx offset=%ld\n", seq, p->scale, (long)p->offset);
    hv_check_true("tsc_page_sequence_valid", seq != 0 && seq != 0xFFFFFFFF);
    /* scale = 10 MHz / tsc_hz in 64.64 fixed point: scale * tsc_hz >> 64 is ~10^7 */
    uint64_t per_second = (uint64_t)(((unsigned __int128)p->scale * tsc_hz) >> 64);
    printf("tsc page scale * tsc_hz >> 64 = %lu\n", per_second);
    hv_check_true("tsc_page_scale_matches_frequency", per_second >= 9999990 && per_second <= 10000000);

    /* MSR, page, MSR: the page time lies between the two MSR reads. */
    int ordered = 0;
    for (int i = 0; i < 20; i++) {
        uint64_t m1 = hv_ref_time(), t = 0;
        bool valid = hv_tsc_page_time(p, &t);
        uint64_t m2 = hv_ref_time();
        if (valid && m1 <= t && t <= m2)
            ordered++;
        else if (i < 3 || !valid)
            printf("tsc page sample %d: msr %lu page %lu msr %lu valid %d\n", i, m1, t, m2, valid);
    }
    hv_check("tsc_page_between_msr_reads", ordered, 20);

    /* Page time over ~20 ms follows the TSC at 10 MHz too. */
    uint64_t t0 = 0, t1 = 0, c0 = rdtsc();
    hv_tsc_page_time(p, &t0);
    while (rdtsc() - c0 < tsc_hz / 50)
        cpu_pause();
    uint64_t c1 = rdtsc();
    hv_tsc_page_time(p, &t1);
    uint64_t ppm = ratio_ppm(t1 - t0, c1 - c0, tsc_hz);
    printf("tsc_page_ratio_ppm=%lu\n", ppm);
    hv_check_true("tsc_page_10mhz_within_1pct", ppm >= 990000 && ppm <= 1010000);

    /* Moving the page: the new one is valid, with a new sequence number. */
    struct hv_reference_tsc_page *p2 = (struct hv_reference_tsc_page *)tsc_page2;
    wrmsr(HV_MSR_REFERENCE_TSC, (uint64_t)tsc_page2 | HV_OVERLAY_ENABLE);
    hv_check_true("moved_tsc_page_valid", p2->sequence != 0);
    hv_check_true("moved_tsc_page_new_sequence", p2->sequence != seq);
    hv_check("moved_tsc_page_same_scale", p2->scale, p->scale);
    wrmsr(HV_MSR_REFERENCE_TSC, 0);
    hv_check("reference_tsc_disable", rdmsr(HV_MSR_REFERENCE_TSC), 0);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    uint64_t tsc_hz = rdmsr(HV_MSR_TSC_FREQUENCY);
    hv_check_true("tsc_frequency_plausible", tsc_hz > 100000000ull && tsc_hz < 10000000000ull);
    if (tsc_hz == 0)
        hv_finish();
    reference_counter(tsc_hz);
    tsc_page_checks(tsc_hz);
    hv_finish();
}
