/*
 * hv_stimer.c - synthetic timers: one-shot and periodic in message mode (SINT 3),
 * direct mode (APIC vector), auto-enable, a deadline in the past, and the TLFS rule
 * that a message-mode timer on SINT 0 disables itself. Every expiry is checked
 * against the programmed reference time: never early, and not later than LATE_MAX.
 */
#include "apic.h"
#include "hv.h"

#define TIMER_SINT 3
#define SINT_VECTOR 0x53
#define DIRECT_VECTOR 0x54
#define WATCHDOG_VECTOR 0x4F
#define MS 10000ull                  /* reference ticks per millisecond */
#define LATE_MAX (50 * MS)           /* generous: the guest and the VMM are slow */
#define MAX_TICKS 8

static uint8_t simp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t siefp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

static volatile uint32_t msg_count, direct_count, watchdog_fired;
static volatile uint64_t msg_seen_at[MAX_TICKS], direct_seen_at[MAX_TICKS];
static struct hv_timer_message_payload msg_payload[MAX_TICKS];
static volatile uint32_t msg_type[MAX_TICKS];

static void sint_irq(struct int_frame *f)
{
    (void)f;
    uint64_t now = hv_ref_time();
    struct hv_message *m = hv_sint_slot(simp, TIMER_SINT);
    uint32_t i = msg_count;
    if (i < MAX_TICKS) {
        msg_seen_at[i] = now;
        msg_type[i] = m->type;
        memcpy(&msg_payload[i], m->payload, sizeof(msg_payload[i]));
    }
    msg_count = i + 1;
    hv_message_done(m);
    apic_eoi();
}

static void direct_irq(struct int_frame *f)
{
    (void)f;
    uint32_t i = direct_count;
    if (i < MAX_TICKS)
        direct_seen_at[i] = hv_ref_time();
    direct_count = i + 1;
    apic_eoi();
}

static void watchdog_irq(struct int_frame *f)
{
    (void)f;
    watchdog_fired = 1;
    apic_eoi();
}

/* hlt until *counter >= n or ms milliseconds pass (APIC timer watchdog). */
static bool wait_count(volatile uint32_t *counter, uint32_t n, uint32_t ms)
{
    watchdog_fired = 0;
    apic_timer_oneshot(WATCHDOG_VECTOR, ms * 1000000u, 1);
    while (*counter < n && !watchdog_fired)
        sti_hlt();
    cli();
    apic_timer_stop();
    return *counter >= n;
}

static void check_time(const char *name, uint64_t seen, uint64_t deadline)
{
    char buf[64];
    printf("%s: deadline=%lu seen=%lu late_by=%ld\n", name, deadline, seen, (long)(seen - deadline));
    snprintf(buf, sizeof(buf), "%s_not_early", name);
    hv_check_true(buf, seen >= deadline);
    snprintf(buf, sizeof(buf), "%s_on_time", name);
    hv_check_true(buf, seen < deadline + LATE_MAX);
}

static void oneshot_message(void)
{
    msg_count = 0;
    uint64_t deadline = hv_ref_time() + 10 * MS;
    hv_stimer_count(0, deadline);
    hv_stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_SINT(TIMER_SINT));
    hv_check("oneshot_fired", wait_count(&msg_count, 1, 500), 1);
    hv_check("oneshot_message_type", msg_type[0], HV_MESSAGE_TYPE_TIMER_EXPIRED);
    hv_check("oneshot_timer_index", msg_payload[0].timer_index, 0);
    hv_check("oneshot_expiration_time", msg_payload[0].expiration_time, deadline);
    hv_check_true("oneshot_delivery_after_expiration", msg_payload[0].delivery_time >= deadline);
    check_time("oneshot", msg_seen_at[0], deadline);
    hv_check("oneshot_enable_cleared", rdmsr(HV_MSR_STIMER0_CONFIG) & HV_STIMER_ENABLE, 0);
    wait_count(&msg_count, 2, 30);
    hv_check("oneshot_fired_once", msg_count, 1);
}

static void periodic_message(void)
{
    const uint64_t period = 5 * MS;
    msg_count = 0;
    uint64_t start = hv_ref_time();
    hv_stimer_count(1, period);
    hv_stimer_config(1, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_SINT(TIMER_SINT));
    bool got = wait_count(&msg_count, 5, 1000);
    hv_stimer_config(1, 0);
    uint64_t stopped = hv_ref_time();
    hv_check("periodic_5_ticks", got, 1);
    int exact = 0, multiples = 0;
    for (int i = 0; i < 5; i++) {
        uint64_t exp = msg_payload[i].expiration_time;
        printf("periodic tick %d: expiration=%lu (+%lu) seen=%lu timer=%u\n", i, exp, exp - start, msg_seen_at[i],
               msg_payload[i].timer_index);
        if (i > 0) {
            uint64_t d = exp - msg_payload[i - 1].expiration_time;
            exact += d == period;
            multiples += d != 0 && d % period == 0;
        }
    }
    hv_check_true("periodic_first_after_one_period", msg_payload[0].expiration_time >= start + period);
    check_time("periodic_tick0", msg_seen_at[0], msg_payload[0].expiration_time);
    check_time("periodic_tick4", msg_seen_at[4], msg_payload[4].expiration_time);
    hv_check("periodic_intervals_are_periods", multiples, 4);
    hv_check_true("periodic_mostly_exact", exact >= 3);
    hv_check("periodic_timer_index", msg_payload[2].timer_index, 1);
    /* No expiration after the stop. A message for one due before it may still arrive (it was
       posted, or queued behind a full slot, before the write): on a loaded host that is
       normal, and counting it failed good runs. */
    uint32_t before = msg_count;
    wait_count(&msg_count, before + 1, 20);
    uint32_t late = 0;
    for (uint32_t i = before; i < msg_count && i < MAX_TICKS; i++)
        late += msg_payload[i].expiration_time > stopped;
    hv_check("periodic_stopped", late, 0);
}

static void direct_mode(void)
{
    direct_count = 0;
    uint64_t deadline = hv_ref_time() + 10 * MS;
    hv_stimer_count(2, deadline);
    hv_stimer_config(2, HV_STIMER_ENABLE | HV_STIMER_DIRECT | HV_STIMER_VECTOR(DIRECT_VECTOR));
    hv_check("direct_oneshot_fired", wait_count(&direct_count, 1, 500), 1);
    check_time("direct_oneshot", direct_seen_at[0], deadline);
    wait_count(&direct_count, 2, 30);
    hv_check("direct_oneshot_fired_once", direct_count, 1);

    const uint64_t period = 5 * MS;
    direct_count = 0;
    uint64_t start = hv_ref_time();
    hv_stimer_count(2, period);
    hv_stimer_config(2, HV_STIMER_ENABLE | HV_STIMER_PERIODIC | HV_STIMER_DIRECT | HV_STIMER_VECTOR(DIRECT_VECTOR));
    bool got = wait_count(&direct_count, 4, 1000);
    hv_stimer_config(2, 0);
    hv_check("direct_periodic_4_ticks", got, 1);
    int on_schedule = 0;
    for (int i = 0; i < 4; i++) {
        printf("direct tick %d: +%lu\n", i, direct_seen_at[i] - start);
        on_schedule += direct_seen_at[i] >= start + (uint64_t)(i + 1) * period;
    }
    hv_check("direct_periodic_never_early", on_schedule, 4);
}

static void config_rules(void)
{
    /* Message mode on SINT 0 is not allowed: the enable bit clears at once. */
    hv_stimer_count(3, hv_ref_time() + 1000 * MS);
    hv_stimer_config(3, HV_STIMER_ENABLE | HV_STIMER_SINT(0));
    hv_check("sint0_message_timer_disabled", rdmsr(HV_MSR_STIMER0_CONFIG + 6) & HV_STIMER_ENABLE, 0);

    /* Auto-enable: writing a count sets the enable bit. */
    msg_count = 0;
    hv_stimer_config(3, HV_STIMER_AUTO_ENABLE | HV_STIMER_SINT(TIMER_SINT));
    uint64_t deadline = hv_ref_time() + 5 * MS;
    hv_stimer_count(3, deadline);
    hv_check("auto_enable_sets_enable", rdmsr(HV_MSR_STIMER0_CONFIG + 6) & HV_STIMER_ENABLE, HV_STIMER_ENABLE);
    hv_check("auto_enable_fired", wait_count(&msg_count, 1, 500), 1);
    hv_check("auto_enable_timer_index", msg_payload[0].timer_index, 3);
    check_time("auto_enable", msg_seen_at[0], deadline);

    /* A one-shot deadline in the past expires immediately. */
    msg_count = 0;
    uint64_t past = hv_ref_time() - 1;
    hv_stimer_count(0, past);
    uint64_t armed = hv_ref_time();
    hv_stimer_config(0, HV_STIMER_ENABLE | HV_STIMER_SINT(TIMER_SINT));
    hv_check("past_deadline_fired", wait_count(&msg_count, 1, 500), 1);
    check_time("past_deadline", msg_seen_at[0], armed);
    hv_check("past_deadline_expiration", msg_payload[0].expiration_time, past);

    /* Count 0 disables. */
    hv_stimer_config(3, HV_STIMER_ENABLE | HV_STIMER_SINT(TIMER_SINT));
    hv_stimer_count(3, 0);
    hv_check("count_zero_disables", rdmsr(HV_MSR_STIMER0_CONFIG + 6) & HV_STIMER_ENABLE, 0);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    apic_enable();
    set_irq_handler(SINT_VECTOR, sint_irq);
    set_irq_handler(DIRECT_VECTOR, direct_irq);
    set_irq_handler(WATCHDOG_VECTOR, watchdog_irq);
    hv_synic_enable(simp, siefp);
    hv_sint_set(TIMER_SINT, SINT_VECTOR, 0);
    oneshot_message();
    periodic_message();
    direct_mode();
    config_rules();
    hv_finish();
}
