/*
 * vsm_enable.c - the VSM enable sequence step by step, with its negative cases:
 * CPUID privileges, VsmCodePageOffsets, VSM status registers before/after,
 * VTL call/return #UD while VTL1 does not exist (and VtlReturn from VTL0),
 * HvCallEnablePartitionVtl / HvCallEnableVpVtl bad inputs and repeats, the first
 * VTL call into the initial context, VsmPartitionConfig (write-once protection
 * enable, lower VTL may not write it), and who may modify protections.
 */
#include "vsm.h"

static void check_fails(const char *name, uint16_t st)
{
    if (st != HV_STATUS_SUCCESS) {
        printf("ok %s (status 0x%x)\n", name, st);
    } else {
        printf("FAIL %s: got SUCCESS want an error status\n", name);
        hv_failures++;
    }
}

static uint8_t probe_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_enable start\n");
    struct cpuid_regs f = cpuid(HV_CPUID_FEATURES, 0);
    hv_check_true("cpuid_access_vsm", f.ebx & HV_EBX_ACCESS_VSM);
    hv_check_true("cpuid_access_vp_registers", f.ebx & HV_EBX_ACCESS_VP_REGISTERS);
    hv_check_true("cpuid_access_synic_regs", f.eax & HV_PRIV_ACCESS_SYNIC_REGS);
    if (!vsm_hv_setup()) {
        printf("FAIL hv_setup\n");
        hv_failures++;
        hv_finish();
    }
    uint64_t off = vsm_code_page_offsets;
    uint64_t call_off = off & 0xFFF, ret_off = (off >> 12) & 0xFFF;
    printf("VsmCodePageOffsets=0x%lx\n", off);
    hv_check_true("code_page_offsets_distinct_nonzero", call_off && ret_off && call_off != ret_off);
    hv_check("code_page_offsets_reserved_zero", off >> 24, 0);
    hv_check_true("code_page_offsets_point_at_code",
                  hv_hypercall_page[call_off] != 0xCC && hv_hypercall_page[ret_off] != 0xCC);

    uint64_t ps = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_PARTITION_STATUS);
    hv_check("partition_status_before_enabled_set", ps & 0xFFFF, 1);
    hv_check_true("partition_status_maximum_vtl_ge_1", ((ps >> 16) & 0xF) >= 1);
    uint64_t vs = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_VP_STATUS);
    hv_check("vp_status_before_active_vtl", vs & 0xF, 0);
    hv_check("vp_status_before_enabled_set", (vs >> 16) & 0xFFFF, 1);

    hv_check_true("vtl_call_before_enable_ud", vtl0_try_vtl_call(0));
    hv_check_true("vtl_return_from_vtl0_ud", vtl0_try_vtl_return());

    uint32_t vp = vsm_vp_index();
    struct hv_initial_vp_context ctx;
    vsm_vtl1_context(&ctx, vp);
    check_fails("enable_vp_vtl_before_partition_vtl", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 1, &ctx));
    hv_check("enable_partition_vtl_bad_partition", hv_enable_partition_vtl(0x1234, 1, 0),
             HV_STATUS_INVALID_PARTITION_ID);
    check_fails("enable_partition_vtl_vtl2", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 2, 0));
    check_fails("enable_partition_vtl_vtl0", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 0, 0));
    check_fails("enable_partition_vtl_reserved_flags", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 1, 0x80));
    bool reserved_ok;
    {
        uint8_t *in = vsm_in_page();
        memset(in, 0, 16);
        ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
        in[8] = 1;
        in[12] = 1; /* RsvdZ byte */
        uint16_t st = HV_RESULT_STATUS(vsm_hypercall(HVCALL_ENABLE_PARTITION_VTL, (uint64_t)in, 0));
        check_fails("enable_partition_vtl_reserved_bytes", st);
        reserved_ok = st == HV_STATUS_SUCCESS;
    }
    if (!reserved_ok) { /* otherwise VTL1 is already enabled: the next two checks would only cascade */
        ps = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_PARTITION_STATUS);
        hv_check("partition_status_after_failures", ps & 0xFFFF, 1);
        hv_check("enable_partition_vtl", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 1, 0), HV_STATUS_SUCCESS);
    }
    check_fails("enable_partition_vtl_again", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 1, 0));
    ps = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_PARTITION_STATUS);
    hv_check("partition_status_enabled_set", ps & 0xFFFF, 3);
    vs = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_VP_STATUS);
    hv_check("vp_status_before_vp_enable", (vs >> 16) & 0xFFFF, 1);
    hv_check_true("vtl_call_before_vp_enable_ud", vtl0_try_vtl_call(0));

    hv_check("enable_vp_vtl_bad_vp", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, 7, 1, &ctx), HV_STATUS_INVALID_VP_INDEX);
    hv_check("enable_vp_vtl_bad_partition", hv_enable_vp_vtl(0x1234, vp, 1, &ctx), HV_STATUS_INVALID_PARTITION_ID);
    check_fails("enable_vp_vtl_vtl2", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 2, &ctx));
    check_fails("enable_vp_vtl_fast",
                HV_RESULT_STATUS(vsm_hypercall(HVCALL_ENABLE_VP_VTL | HV_CONTROL_FAST, HV_PARTITION_ID_SELF,
                                               vp | (1ull << 32))));
    vs = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_VP_STATUS);
    hv_check("vp_status_after_vp_failures", (vs >> 16) & 0xFFFF, 1);

    hv_check("enable_vp_vtl", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 1, &ctx), HV_STATUS_SUCCESS);
    check_fails("enable_vp_vtl_again", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 1, &ctx));
    vs = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_VP_STATUS);
    hv_check("vp_status_enabled_set", (vs >> 16) & 0xFFFF, 3);
    hv_check("vp_status_still_vtl0", vs & 0xF, 0);

    hv_check_true("vtl_call_reserved_control_ud", vtl0_try_vtl_call(1));
    hv_check("vtl1_not_entered_by_bad_call", vsm_log[vp].ready, 0);

    bool up = vsm_init_ap();
    hv_check_true("first_vtl_call_reaches_vtl1", up);
    if (!up)
        hv_finish();
    uint64_t ret[4];
    hv_check("vtl1_echo", vtl1_op(VSM_OP_ECHO, 41, 0, 0, 0, 0), 42);
    hv_check("entry_reason_vtl_call", vsm_log[vp].last_reason, HV_ENTRY_VTL_CALL);
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_VP_STATUS, 0, 0, ret);
    hv_check("vtl1_get_vp_status", ret[0], HV_STATUS_SUCCESS);
    hv_check("vtl1_vp_status_active_vtl", ret[1] & 0xF, 1);
    vs = hv_get_reg64(HV_VTL_SELF, HV_REG_VSM_VP_STATUS);
    hv_check("vp_status_active_vtl_back_to_0", vs & 0xF, 0);
    uint64_t v1off = vsm_vtl1_code_page_offsets;
    hv_check_true("vtl1_code_page_offsets_valid", (v1off & 0xFFF) && ((v1off >> 12) & 0xFFF) && !(v1off >> 24));
    memset(probe_page, 0, 16);
    ((uint64_t *)probe_page)[0] = HV_PARTITION_ID_SELF;
    probe_page[8] = 1;
    check_fails("vtl1_enable_partition_vtl1_again",
                HV_RESULT_STATUS(vtl1_op(VSM_OP_HYPERCALL, HVCALL_ENABLE_PARTITION_VTL, (uint64_t)probe_page, 0, 0, 0)));

    /* Private register isolation through hypercalls. */
    uint64_t lo = 0;
    hv_check("vtl0_get_vtl1_register_denied", hv_get_vp_register(HV_VTL(1), HV_REG_RIP, &lo, 0),
             HV_STATUS_ACCESS_DENIED);
    hv_check("vtl0_set_vtl1_register_denied", hv_set_vp_register(HV_VTL(1), HV_REG_RIP, 0x1000, 0),
             HV_STATUS_ACCESS_DENIED);
    check_fails("vtl0_modify_protection_denied",
                hv_modify_vtl_protection((uint64_t)probe_page, 1, HV_MAP_GPA_NONE, HV_VTL_SELF));
    check_fails("vtl0_write_partition_config_denied",
                hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, HV_VSM_CONFIG_ENABLE_VTL_PROTECTION, 0));

    /* Protections need EnableVtlProtection first. */
    check_fails("vtl1_protect_before_enable_protection",
                (uint16_t)vtl1_op(VSM_OP_PROTECT, (uint64_t)probe_page, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0));
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
    hv_check("vtl1_set_partition_config", vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, 0, 0, ret);
    hv_check("vtl1_read_partition_config", ret[1], cfg);
    vtl1_op(VSM_OP_CONFIG, 0, 0, 0, 0, 0);
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, 0, 0, ret);
    hv_check("partition_config_protection_write_once", ret[1] & HV_VSM_CONFIG_ENABLE_VTL_PROTECTION, 1);
    hv_check("vtl1_protect_after_enable",
             vtl1_op(VSM_OP_PROTECT, (uint64_t)probe_page, 1, HV_MAP_GPA_ALL, HV_VTL_SELF, 0), HV_STATUS_SUCCESS);
    hv_check("vtl1_protect_non_ram", vtl1_op(VSM_OP_PROTECT, 0xFEC00000ull, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0),
             HV_STATUS_INVALID_PARAMETER);
    check_fails("vtl1_protect_higher_vtl",
                (uint16_t)vtl1_op(VSM_OP_PROTECT, (uint64_t)probe_page, 1, HV_MAP_GPA_READ, HV_VTL(2), 0));
    check_fails("vtl1_enable_vp_vtl_again", (uint16_t)vtl1_op(VSM_OP_ENABLE_VP, vp, 0, 0, 0, 0));
    hv_check("vtl1_entries_all_calls", vsm_log[vp].entries[HV_ENTRY_INTERRUPT], 0);
    hv_finish();
}
