/*
 * hv_msr.c - synthetic MSRs seen from the guest: values, read-only and reserved-bit #GP,
 * unadvertised MSRs, and hypercall page installation only after a non-zero guest OS id.
 *
 * cmdline: cpus=N (expected VP count, default 1).
 */
#include "hv.h"

static uint8_t probe_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

static void check_gp_read(const char *name, uint32_t msr)
{
    uint64_t v;
    hv_check(name, rdmsr_safe(msr, &v), 0);
}

static void check_gp_write(const char *name, uint32_t msr, uint64_t value)
{
    hv_check(name, wrmsr_safe(msr, value), 0);
}

static void check_write_ok(const char *name, uint32_t msr, uint64_t value)
{
    hv_check(name, wrmsr_safe(msr, value), 1);
}

static void hypercall_page_install(void)
{
    uint64_t v;
    /* Before any OS id: the enable bit stays clear and the page is not written. */
    memset(probe_page, 0x5A, sizeof(probe_page));
    hv_check("guest_os_id_initially_zero", rdmsr(HV_MSR_GUEST_OS_ID), 0);
    check_write_ok("hypercall_write_without_os_id", HV_MSR_HYPERCALL, (uint64_t)probe_page | HV_HYPERCALL_ENABLE);
    v = rdmsr(HV_MSR_HYPERCALL);
    hv_check("hypercall_enable_stays_clear", v & HV_HYPERCALL_ENABLE, 0);
    hv_check("hypercall_gpa_kept", v & ~0xFFFull, (uint64_t)probe_page);
    hv_check("hypercall_page_untouched", probe_page[0], 0x5A);
    /* With an OS id the page appears: out 0x58, al ; ret. */
    wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_VSMTRACE);
    hv_check("guest_os_id_readback", rdmsr(HV_MSR_GUEST_OS_ID), HV_GUEST_OS_ID_VSMTRACE);
    wrmsr(HV_MSR_HYPERCALL, (uint64_t)probe_page | HV_HYPERCALL_ENABLE);
    hv_check("hypercall_enabled", rdmsr(HV_MSR_HYPERCALL), (uint64_t)probe_page | HV_HYPERCALL_ENABLE);
    hv_check("hypercall_page_written", probe_page[0] != 0x5A, 1);
    /* Zeroing the OS id disables the page again. */
    wrmsr(HV_MSR_GUEST_OS_ID, 0);
    hv_check("os_id_zero_disables_page", rdmsr(HV_MSR_HYPERCALL) & HV_HYPERCALL_ENABLE, 0);
    /* Now use hv_init's own page: a call through a disabled page must #UD. */
    wrmsr(HV_MSR_HYPERCALL, (uint64_t)hv_hypercall_page);
    memcpy(hv_hypercall_page, probe_page, 16); /* the trap bytes, but the MSR says disabled */
    uint64_t result;
    hv_check("call_disabled_page_ud", hv_hypercall_ud(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 0, 0, &result), 0);
    hv_check("ud_rip_at_trap_instruction", hv_last_ud_rip, 0);
    hv_check_true("hv_init", hv_init());
    hv_check("call_enabled_page_ok", hv_hypercall_ud(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 0, 0, &result), 1);
    hv_check("call_enabled_page_status", HV_RESULT_STATUS(result), HV_STATUS_SUCCESS);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t v;
    hypercall_page_install();

    /* Values. */
    hv_check("vp_index", rdmsr(HV_MSR_VP_INDEX), 0);
    hv_check_true("tsc_frequency_nonzero", rdmsr(HV_MSR_TSC_FREQUENCY) != 0);
    hv_check("apic_frequency", rdmsr(HV_MSR_APIC_FREQUENCY), 1000000000ull);
    uint64_t t0 = rdmsr(HV_MSR_TIME_REF_COUNT), t1 = rdmsr(HV_MSR_TIME_REF_COUNT);
    hv_check_true("time_ref_count_monotonic", t1 >= t0);
    hv_check("sversion", rdmsr(HV_MSR_SVERSION), 1);
    hv_check("sint0_reset_masked", rdmsr(HV_MSR_SINT0), HV_SINT_MASKED);
    hv_check("sint15_reset_masked", rdmsr(HV_MSR_SINT0 + 15), HV_SINT_MASKED);
    hv_check("scontrol_reset", rdmsr(HV_MSR_SCONTROL), 0);
    hv_check("stimer0_config_reset", rdmsr(HV_MSR_STIMER0_CONFIG), 0);
    hv_check("crash_ctl_caps", rdmsr(HV_MSR_CRASH_CTL), HV_CRASH_CTL_NOTIFY | HV_CRASH_CTL_MESSAGE);
    check_write_ok("crash_p0_write", HV_MSR_CRASH_P0, 0x1234);
    hv_check("crash_p0_readback", rdmsr(HV_MSR_CRASH_P0), 0x1234);
    check_write_ok("vp_assist_write", HV_MSR_VP_ASSIST_PAGE, 0);
    check_write_ok("tpr_write", HV_MSR_TPR, 0x20);
    hv_check("tpr_readback", rdmsr(HV_MSR_TPR), 0x20);
    wrmsr(HV_MSR_TPR, 0);

    /* Read-only MSRs: writes #GP. */
    check_gp_write("vp_index_readonly", HV_MSR_VP_INDEX, 1);
    check_gp_write("time_ref_count_readonly", HV_MSR_TIME_REF_COUNT, 0);
    check_gp_write("tsc_frequency_readonly", HV_MSR_TSC_FREQUENCY, 1);
    check_gp_write("apic_frequency_readonly", HV_MSR_APIC_FREQUENCY, 1);
    check_gp_write("sversion_readonly", HV_MSR_SVERSION, 2);
    check_gp_read("eoi_write_only", HV_MSR_EOI);

    /* Reserved bits. */
    check_gp_write("stimer_config_reserved", HV_MSR_STIMER0_CONFIG, 1ull << 13);
    check_gp_write("stimer_config_reserved_high", HV_MSR_STIMER0_CONFIG, 1ull << 40);
    check_gp_write("sint_vector_below_16", HV_MSR_SINT0 + 3, 0x0F);
    check_write_ok("sint_vector_below_16_masked", HV_MSR_SINT0 + 3, 0x0F | HV_SINT_MASKED);
    check_gp_write("eoi_reserved", HV_MSR_EOI, 1ull << 40);
    check_gp_write("tpr_reserved", HV_MSR_TPR, 0x100);
    check_gp_write("crash_ctl_reserved", HV_MSR_CRASH_CTL, 1);
    check_gp_write("reset_reserved", HV_MSR_RESET, 2);
    check_gp_write("hypercall_gpa_outside_ram", HV_MSR_HYPERCALL, ~HV_HYPERCALL_LOCKED);

    /* MSRs in the synthetic range this partition does not advertise. */
    check_gp_read("vp_runtime_unadvertised", HV_MSR_VP_RUNTIME);
    check_gp_read("guest_idle_unadvertised", HV_MSR_GUEST_IDLE);
    check_gp_read("unknown_0x40000050", 0x40000050);
    check_gp_read("unknown_0x400001ff", 0x400001FF);
    check_gp_write("unknown_write_0x40000050", 0x40000050, 0);

    /* Hypercall MSR lock: once locked, further writes #GP (do it last). */
    uint64_t hc = rdmsr(HV_MSR_HYPERCALL);
    check_write_ok("hypercall_lock", HV_MSR_HYPERCALL, hc | HV_HYPERCALL_LOCKED);
    check_gp_write("hypercall_locked_write", HV_MSR_HYPERCALL, hc);
    hv_check("still_enabled_after_lock", rdmsr_safe(HV_MSR_HYPERCALL, &v) && (v & HV_HYPERCALL_ENABLE), 1);
    hv_finish();
}
