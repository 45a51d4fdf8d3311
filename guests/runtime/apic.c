/* apic.c - xAPIC/x2APIC register access, IPIs and the timer. */
#include "apic.h"

static volatile uint32_t x2apic_mode;

bool apic_has_x2apic(void)
{
    return cpuid(1, 0).ecx & (1u << 21);
}

bool apic_has_tsc_deadline(void)
{
    return cpuid(1, 0).ecx & (1u << 24);
}

bool apic_x2apic_mode(void)
{
    return x2apic_mode;
}

uint32_t apic_read(uint32_t reg)
{
    if (x2apic_mode)
        return (uint32_t)rdmsr(MSR_X2APIC_BASE + (reg >> 4));
    return *(volatile uint32_t *)(uintptr_t)(APIC_MMIO_BASE + reg);
}

void apic_write(uint32_t reg, uint32_t value)
{
    if (x2apic_mode)
        wrmsr(MSR_X2APIC_BASE + (reg >> 4), value);
    else
        *(volatile uint32_t *)(uintptr_t)(APIC_MMIO_BASE + reg) = value;
}

static void switch_this_cpu(void)
{
    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    if (!(base & APIC_BASE_EN))
        wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_EN);
    wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
}

void apic_enable(void)
{
    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    if (!(base & APIC_BASE_EN))
        wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_EN);
    apic_write(APIC_SVR, APIC_SVR_ENABLE | APIC_SPURIOUS_VECTOR);
}

bool apic_enable_x2apic(void)
{
    if (!apic_has_x2apic())
        return false;
    switch_this_cpu();
    x2apic_mode = 1;
    return true;
}

void apic_follow_mode(void)
{
    if (x2apic_mode)
        switch_this_cpu();
}

uint32_t apic_id(void)
{
    uint32_t id = apic_read(APIC_ID);
    return x2apic_mode ? id : id >> 24;
}

void apic_send_ipi(uint32_t dest, uint8_t vector, uint32_t mode, uint32_t shorthand)
{
    uint32_t low = vector | ((mode & 7) << 8) | APIC_ICR_LEVEL_ASSERT | ((shorthand & 3) << 18);
    if (x2apic_mode) {
        wrmsr(MSR_X2APIC_BASE + (APIC_ICR >> 4), ((uint64_t)dest << 32) | low);
        return;
    }
    uint64_t flags = irq_save(); /* the two writes must not be split by a handler's IPI */
    apic_write(APIC_ICR_HIGH, dest << 24);
    apic_write(APIC_ICR, low);
    for (int i = 0; i < 1000 && (apic_read(APIC_ICR) & APIC_ICR_PENDING); i++)
        cpu_pause();
    irq_restore(flags);
}

void apic_eoi(void)
{
    apic_write(APIC_EOI, 0);
}

static uint32_t divide_bits(uint32_t divide)
{
    switch (divide) {
    case 2: return 0x0;
    case 4: return 0x1;
    case 8: return 0x2;
    case 16: return 0x3;
    case 32: return 0x8;
    case 64: return 0x9;
    case 128: return 0xA;
    default: return 0xB; /* divide by 1 */
    }
}

static void timer_start(uint32_t mode, uint8_t vector, uint32_t initial_count, uint32_t divide)
{
    apic_write(APIC_TIMER_DIVIDE, divide_bits(divide));
    apic_write(APIC_LVT_TIMER, mode | vector);
    apic_write(APIC_TIMER_INITIAL, initial_count);
}

void apic_timer_oneshot(uint8_t vector, uint32_t initial_count, uint32_t divide)
{
    timer_start(APIC_TIMER_ONESHOT, vector, initial_count, divide);
}

void apic_timer_periodic(uint8_t vector, uint32_t initial_count, uint32_t divide)
{
    timer_start(APIC_TIMER_PERIODIC, vector, initial_count, divide);
}

void apic_timer_deadline(uint8_t vector)
{
    apic_write(APIC_LVT_TIMER, APIC_TIMER_TSC_DEADLINE | vector);
}

void apic_set_tsc_deadline(uint64_t tsc)
{
    wrmsr(MSR_IA32_TSC_DEADLINE, tsc);
}

void apic_timer_stop(void)
{
    uint32_t lvt = apic_read(APIC_LVT_TIMER);
    apic_write(APIC_TIMER_INITIAL, 0);
    if ((lvt & (3u << 17)) == APIC_TIMER_TSC_DEADLINE)
        apic_set_tsc_deadline(0);
    apic_write(APIC_LVT_TIMER, lvt | APIC_LVT_MASKED);
}
