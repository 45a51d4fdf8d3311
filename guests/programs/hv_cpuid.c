/*
 * hv_cpuid.c - the Hyper-V CPUID leaves 0x40000000-0x4000000A as the guest sees them.
 *
 * Prints every leaf as "leaf 0x4000000N: eax=0x.. ebx=0x.. ecx=0x.. edx=0x.." (the test
 * compares them with the VMM's policy) and checks the fixed parts itself.
 * cmdline: expect=none  -> Hyper-V must be absent (--no-hyperv); cpus=N expected VP count;
 * xmm_input=0 / synic=0 -> those features are expected hidden (--hv-disable).
 */
#include "hv.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint32_t ecx1 = cpuid(1, 0).ecx;
    if (cmdline_is("expect", "none")) {
        hv_check("hypervisor_bit_clear", ecx1 & CPUID1_ECX_HYPERVISOR, 0);
        hv_check("hv_absent", hv_present(), 0);
        uint64_t v;
        hv_check("guest_os_id_gp", rdmsr_safe(HV_MSR_GUEST_OS_ID, &v), 0);
        hv_finish();
    }
    hv_check("hypervisor_bit", !!(ecx1 & CPUID1_ECX_HYPERVISOR), 1);
    for (uint32_t leaf = HV_CPUID_VENDOR_AND_MAX; leaf <= HV_CPUID_LAST; leaf++) {
        struct cpuid_regs r = cpuid(leaf, 0);
        printf("leaf 0x%x: eax=0x%x ebx=0x%x ecx=0x%x edx=0x%x\n", leaf, r.eax, r.ebx, r.ecx, r.edx);
    }
    struct cpuid_regs v = cpuid(HV_CPUID_VENDOR_AND_MAX, 0);
    hv_check("max_leaf", v.eax, HV_CPUID_LAST);
    hv_check("vendor", hv_present(), 1);
    hv_check("interface_hv1", cpuid(HV_CPUID_INTERFACE, 0).eax, HV_CPUID_SIGNATURE_HV1);
    struct cpuid_regs ver = cpuid(HV_CPUID_VERSION, 0);
    hv_check_true("version_build_nonzero", ver.eax != 0);
    struct cpuid_regs f = cpuid(HV_CPUID_FEATURES, 0);
    uint64_t priv = ((uint64_t)f.ebx << 32) | f.eax;
    hv_check_true("priv_hypercall_msrs", priv & HV_PRIV_ACCESS_HYPERCALL_MSRS);
    hv_check_true("priv_vp_index", priv & HV_PRIV_ACCESS_VP_INDEX);
    hv_check_true("priv_time_ref_count", priv & HV_PRIV_ACCESS_PARTITION_REFERENCE_COUNTER);
    hv_check("priv_synic", !!(priv & HV_PRIV_ACCESS_SYNIC_REGS), !cmdline_is("synic", "0"));
    hv_check_true("priv_partition_id", priv & HV_PRIV_ACCESS_PARTITION_ID);
    uint32_t expect_xmm_in = cmdline_is("xmm_input", "0") ? 0 : HV_FEATURE_XMM_HYPERCALL_INPUT;
    hv_check("feature_xmm_input", f.edx & HV_FEATURE_XMM_HYPERCALL_INPUT, expect_xmm_in);
    hv_check("feature_crash_msrs", f.edx & HV_FEATURE_GUEST_CRASH_MSRS, HV_FEATURE_GUEST_CRASH_MSRS);
    struct cpuid_regs lim = cpuid(HV_CPUID_IMPLEMENTATION_LIMITS, 0);
    hv_check("max_vps", lim.eax, cmdline_get_uint("cpus", 1));
    for (uint32_t leaf = 0x40000006; leaf <= HV_CPUID_LAST; leaf++) {
        struct cpuid_regs r = cpuid(leaf, 0);
        char name[32];
        snprintf(name, sizeof(name), "leaf_0x%x_zero", leaf);
        hv_check(name, (uint64_t)r.eax | r.ebx | r.ecx | r.edx, 0);
    }
    hv_finish();
}
