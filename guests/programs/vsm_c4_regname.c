/*
 * vsm_c4_regname.c - issue 12 item 4: HvGetVpRegisters / HvSetVpRegisters with a register
 * name that does not exist (0xacacacac) is HV_STATUS_INVALID_PARAMETER (TLFS return tables,
 * seed), not OpenVMM's 0x87, from VTL0 and VTL1, memory and fast forms; the element before
 * it still completes (reps completed = its index).
 */
#include "vsm.h"

#define BAD_NAME 0xacacacacu

static void vtl1_checks(void)
{
    uint64_t r[4];
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, BAD_NAME, 0, 0, r);
    hv_check("vtl1_get_unknown_name", r[0], HV_STATUS_INVALID_PARAMETER);
    hv_check("vtl1_set_unknown_name", vtl1_op(VSM_OP_SET_REG, HV_VTL_SELF, BAD_NAME, 1, 0, 0),
             HV_STATUS_INVALID_PARAMETER);
    vtl1_op(VSM_OP_GET_REG, HV_VTL(0), BAD_NAME, 0, 0, r);
    hv_check("vtl1_get_vtl0_unknown_name", r[0], HV_STATUS_INVALID_PARAMETER);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c4_regname start\n");
    if (!vsm_init(false))
        hv_finish();
    uint64_t lo = 0;
    hv_check("vtl0_get_unknown_name", hv_get_vp_register(HV_VTL_SELF, BAD_NAME, &lo, 0), HV_STATUS_INVALID_PARAMETER);
    hv_check("vtl0_set_unknown_name", hv_set_vp_register(HV_VTL_SELF, BAD_NAME, 1, 0), HV_STATUS_INVALID_PARAMETER);

    /* A rep call: RIP then the bad name; one rep completed. */
    uint8_t *in = vsm_in_page(), *out = vsm_out_page();
    memset(in, 0, 32);
    ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
    *(uint32_t *)(in + 8) = HV_VP_INDEX_SELF;
    *(uint32_t *)(in + 16) = HV_REG_RIP;
    *(uint32_t *)(in + 20) = BAD_NAME;
    uint64_t res = vsm_hypercall(HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(2), (uint64_t)in, (uint64_t)out);
    hv_check("vtl0_get_rep_unknown_status", HV_RESULT_STATUS(res), HV_STATUS_INVALID_PARAMETER);
    hv_check("vtl0_get_rep_unknown_reps_done", (res >> 32) & 0xFFF, 1);

    /* Fast form: RDX = partition, R8 = VP index | input VTL << 32, names in XMM0. */
    uint64_t regs[HV_XMM_REGS] = {HV_PARTITION_ID_SELF, HV_VP_INDEX_SELF, BAD_NAME};
    res = hv_xmm_call(HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1), regs);
    hv_check("vtl0_get_fast_unknown_name", HV_RESULT_STATUS(res), HV_STATUS_INVALID_PARAMETER);

    vtl1_checks();
    hv_finish();
}
