/*
 * apic_timer.c - local APIC timer in one-shot, periodic or TSC-deadline mode.
 *
 * cmdline: mode=oneshot|periodic|deadline (default periodic), x2apic=0|1,
 * count=N (initial count, divide by 1, default 1000000),
 * delta=N (TSC cycles to the deadline, default 2000000).
 * Exit 0 on success, 1 on failure, 2 if the CPU lacks x2APIC/TSC-deadline.
 */
#include "apic.h"
#include "guest.h"

#define TIMER_VECTOR 0x40
#define MAX_TICKS 16
#define PERIODIC_TICKS 10

static volatile uint32_t ticks;
static volatile uint64_t tick_tsc[MAX_TICKS];

static void timer_irq(struct int_frame *f)
{
    (void)f;
    uint32_t i = ticks;
    if (i < MAX_TICKS)
        tick_tsc[i] = rdtsc();
    ticks = i + 1;
    apic_eoi();
}

/* Run with interrupts on for at least cycles TSC cycles. */
static void spin_tsc(uint64_t cycles)
{
    uint64_t start = rdtsc();
    sti();
    while (rdtsc() - start < cycles)
        cpu_pause();
    cli();
}

static void wait_ticks(uint32_t n)
{
    while (ticks < n)
        sti_hlt();
    cli();
}

static int oneshot(uint32_t count)
{
    uint64_t t0 = rdtsc();
    apic_timer_oneshot(TIMER_VECTOR, count, 1);
    wait_ticks(1);
    uint64_t delta = tick_tsc[0] - t0;
    printf("oneshot fired tsc_delta=%lu\n", delta);
    uint32_t current = apic_read(APIC_TIMER_CURRENT);
    printf("current count after fire: %u\n", current);
    spin_tsc(3 * delta + 100000);
    if (ticks != 1) {
        printf("oneshot fired again: %u ticks\n", ticks);
        return 1;
    }
    printf("oneshot did not fire again\n");
    if (current != 0)
        return 1;
    printf("oneshot ok\n");
    return 0;
}

static int periodic(uint32_t count)
{
    uint64_t t0 = rdtsc();
    apic_timer_periodic(TIMER_VECTOR, count, 1);
    wait_ticks(PERIODIC_TICKS);
    apic_timer_stop();
    bool ok = true;
    for (int i = 0; i < PERIODIC_TICKS; i++) {
        uint64_t prev = i ? tick_tsc[i - 1] : t0;
        uint64_t delta = tick_tsc[i] - prev;
        printf("tick %d tsc_delta=%lu\n", i, delta);
        if (tick_tsc[i] <= prev)
            ok = false;
    }
    printf("periodic %s: %d ticks\n", ok ? "ok" : "FAILED", PERIODIC_TICKS);
    return ok ? 0 : 1;
}

static int deadline(uint64_t delta)
{
    if (!apic_has_tsc_deadline()) {
        printf("tsc-deadline not supported\n");
        return 2;
    }
    apic_timer_deadline(TIMER_VECTOR);
    uint64_t when = rdtsc() + delta;
    apic_set_tsc_deadline(when);
    wait_ticks(1);
    int64_t late = (int64_t)(tick_tsc[0] - when);
    uint64_t msr = rdmsr(MSR_IA32_TSC_DEADLINE);
    printf("deadline fired late_by=%ld\n", late);
    printf("deadline msr after fire=0x%lx\n", msr);
    spin_tsc(3 * delta);
    bool ok = late >= 0 && msr == 0 && ticks == 1;
    if (ticks != 1)
        printf("deadline fired again: %u ticks\n", ticks);
    printf("deadline %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    char mode[16] = "periodic";
    cmdline_get("mode", mode, sizeof(mode));
    bool x2 = cmdline_is("x2apic", "1");
    if (x2 && !apic_enable_x2apic()) {
        printf("x2apic not supported\n");
        return 2;
    }
    apic_enable();
    set_irq_handler(TIMER_VECTOR, timer_irq);
    uint32_t count = (uint32_t)cmdline_get_uint("count", 1000000);
    printf("apic timer mode=%s x2apic=%d\n", mode, x2 ? 1 : 0);
    if (!strcmp(mode, "oneshot"))
        return oneshot(count);
    if (!strcmp(mode, "periodic"))
        return periodic(count);
    if (!strcmp(mode, "deadline"))
        return deadline(cmdline_get_uint("delta", 2000000));
    printf("unknown mode %s\n", mode);
    return 1;
}
