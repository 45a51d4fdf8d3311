/*
 * det_timer.c - an APIC-timer workload that never reads the TSC, for --deterministic
 * recording and re-execution (tests/test_reexecute.py). Every value it prints comes
 * through an exit (APIC registers, interrupts at exits), so a re-execution must
 * reproduce its output, registers and memory exactly.
 *
 * cmdline: mode=periodic|oneshot (default periodic), x2apic=0|1 (default 0),
 * count=N (initial count, divide by 1, default 200000), ticks=N (periodic, default 10).
 * Work between ticks: an LCG fills a 2 KiB buffer and sums it (the RAM hash then
 * depends on every tick). Exit 0 on success, 1 on failure, 2 if x2APIC is missing.
 */
#include "apic.h"
#include "guest.h"

#define TIMER_VECTOR 0x41
#define WATCHDOG_VECTOR 0x42
#define MAX_TICKS 64
#define WORK_WORDS 512

static volatile uint32_t ticks, watchdog;
static volatile uint32_t tick_ccr[MAX_TICKS];
static uint32_t work[WORK_WORDS];
static uint32_t lcg = 12345;

static void timer_irq(struct int_frame *f)
{
    (void)f;
    uint32_t i = ticks;
    if (i < MAX_TICKS)
        tick_ccr[i] = apic_read(APIC_TIMER_CURRENT);
    ticks = i + 1;
    apic_eoi();
}

static uint32_t churn(uint32_t round)
{
    uint32_t sum = 0;
    for (int i = 0; i < WORK_WORDS; i++) {
        lcg = lcg * 1103515245u + 12345u + round;
        work[i] ^= lcg;
        sum += work[i];
    }
    return sum;
}

static int periodic(uint32_t count, uint32_t n)
{
    if (n > MAX_TICKS)
        n = MAX_TICKS;
    apic_timer_periodic(TIMER_VECTOR, count, 1);
    for (uint32_t seen = 0; seen < n;) {
        while (ticks == seen)
            sti_hlt();
        cli();
        uint32_t now = ticks;
        for (; seen < now && seen < n; seen++)
            printf("tick %u ccr=%u sum=0x%x\n", seen, tick_ccr[seen], churn(seen));
    }
    apic_timer_stop();
    printf("periodic done: %u ticks\n", n);
    return 0;
}

static int oneshot(uint32_t count)
{
    apic_timer_oneshot(TIMER_VECTOR, count, 1);
    uint32_t spins = 0;
    sti();
    while (ticks == 0) { /* poll through an exit: virtual time only moves at exits */
        churn(spins++);
        (void)apic_read(APIC_TIMER_CURRENT);
    }
    cli();
    printf("oneshot fired after %u rounds, ccr=%u\n", spins, apic_read(APIC_TIMER_CURRENT));
    /* must not fire again: wait for a second timer far past the first one's period */
    set_irq_handler(WATCHDOG_VECTOR, timer_irq);
    uint32_t before = ticks;
    apic_timer_oneshot(WATCHDOG_VECTOR, count * 3, 1);
    while (ticks == before)
        sti_hlt();
    cli();
    printf("oneshot then watchdog: ticks=%u sum=0x%x\n", ticks, churn(99));
    return ticks == 2 ? 0 : 1;
}

int kmain(uint32_t magic, uint32_t mbi_phys)
{
    (void)magic;
    (void)mbi_phys;
    bool x2 = cmdline_get_uint("x2apic", 0) != 0;
    uint32_t count = (uint32_t)cmdline_get_uint("count", 200000);
    printf("det_timer mode=%s x2apic=%d\n", cmdline_is("mode", "oneshot") ? "oneshot" : "periodic", x2);
    if (x2 && !apic_has_x2apic()) {
        printf("x2apic not supported\n");
        return 2;
    }
    if (x2)
        apic_enable_x2apic();
    apic_enable();
    set_irq_handler(TIMER_VECTOR, timer_irq);
    int rc = cmdline_is("mode", "oneshot") ? oneshot(count) : periodic(count, (uint32_t)cmdline_get_uint("ticks", 10));
    printf("det_timer %s\n", rc ? "FAILED" : "ok");
    return rc;
}
