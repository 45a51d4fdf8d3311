/*
 * cpuid_apic.c - CPUID.01H:EDX.APIC (bit 9) follows IA32_APIC_BASE.EN on each CPU:
 * clear after the CPU globally disables its APIC, set again after it re-enables it,
 * from xAPIC and from x2APIC mode, without touching the other CPU's view.  cmdline
 * cpus=N (default 2; 1 skips the second CPU's checks, for --deterministic re-execution).
 * On QEMU with TCG (its userspace APIC cannot be re-enabled) the "back" checks fail;
 * on KVM the bit follows EN both ways, as here.
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define CPUID1_EDX_APIC (1u << 9)

static volatile uint32_t ap_stage;
static volatile uint32_t ap_bit_before, ap_bit_disabled, ap_bit_after, ap_bit_bsp_off;

static uint32_t apic_bit(void) { return cpuid(1, 0).edx & CPUID1_EDX_APIC; }

static void wait_stage(uint32_t stage)
{
    uint64_t t = rdtsc();
    while (atomic_load32(&ap_stage) < stage && rdtsc() - t < smp_timeout_tsc)
        cpu_pause();
}

static void ap_main(int cpu)
{
    (void)cpu;
    ap_bit_before = apic_bit();
    atomic_store32(&ap_stage, 1);
    while (atomic_load32(&ap_stage) != 2) /* the BSP has disabled its own APIC */
        cpu_pause();
    ap_bit_bsp_off = apic_bit();
    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    wrmsr(MSR_IA32_APIC_BASE, base & ~(APIC_BASE_EN | APIC_BASE_EXTD));
    ap_bit_disabled = apic_bit();
    wrmsr(MSR_IA32_APIC_BASE, (base & ~APIC_BASE_EXTD) | APIC_BASE_EN);
    ap_bit_after = apic_bit();
    atomic_store32(&ap_stage, 3);
    for (;;)
        hlt();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    apic_enable();
    int n = (int)cmdline_get_uint("cpus", 2);
    hv_check("bsp_apic_bit_at_boot", apic_bit(), CPUID1_EDX_APIC);
    if (n > 1) {
        hv_check("two_cpus_up", (uint64_t)smp_start_aps(2, ap_main), 2);
        wait_stage(1);
        hv_check("ap_apic_bit_at_boot", ap_bit_before, CPUID1_EDX_APIC);
    }

    uint64_t base = rdmsr(MSR_IA32_APIC_BASE);
    wrmsr(MSR_IA32_APIC_BASE, base & ~APIC_BASE_EN);
    hv_check("apic_base_en_clear", rdmsr(MSR_IA32_APIC_BASE) & APIC_BASE_EN, 0);
    hv_check("bsp_apic_bit_clear_when_disabled", apic_bit(), 0);
    hv_check("leaf1_other_bits_kept", cpuid(1, 0).edx & 1, 1); /* FPU */
    if (n > 1) {
        atomic_store32(&ap_stage, 2);
        wait_stage(3);
        hv_check("ap_bit_unaffected_by_bsp", ap_bit_bsp_off, CPUID1_EDX_APIC);
        hv_check("ap_apic_bit_clear_when_disabled", ap_bit_disabled, 0);
        hv_check("ap_apic_bit_back_when_enabled", ap_bit_after, CPUID1_EDX_APIC);
    }

    wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_EN);
    hv_check("bsp_apic_bit_back_when_enabled", apic_bit(), CPUID1_EDX_APIC);
    if (apic_has_x2apic()) {
        wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
        hv_check("x2apic_mode_bit_set", apic_bit(), CPUID1_EDX_APIC);
        wrmsr(MSR_IA32_APIC_BASE, base & ~(APIC_BASE_EN | APIC_BASE_EXTD));
        hv_check("bit_clear_disabled_from_x2apic", apic_bit(), 0);
        wrmsr(MSR_IA32_APIC_BASE, base | APIC_BASE_EN);
        hv_check("bit_back_after_x2apic_disable", apic_bit(), CPUID1_EDX_APIC);
    }
    hv_finish();
    return 0;
}
