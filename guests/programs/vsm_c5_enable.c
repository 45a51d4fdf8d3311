/*
 * vsm_c5_enable.c - issue 12 item 5: enabling a VTL that is already enabled is
 * HV_STATUS_INVALID_PARAMETER (TLFS return tables, seed), not OpenVMM's 0x86:
 * HvEnablePartitionVtl(VTL0) and HvEnableVpVtl(VTL0) before VSM exists, and the same calls
 * for VTL1 once it is enabled, from VTL0 and from VTL1.
 */
#include "vsm.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c5_enable start\n");
    if (!vsm_hv_setup())
        hv_finish();
    uint32_t vp = vsm_vp_index();
    struct hv_initial_vp_context ctx;
    vsm_vtl1_context(&ctx, vp);
    hv_check("enable_partition_vtl0", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 0, 0), HV_STATUS_INVALID_PARAMETER);
    hv_check("enable_vp_vtl0", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 0, &ctx), HV_STATUS_INVALID_PARAMETER);
    if (!vsm_init(false))
        hv_finish();
    hv_check("enable_partition_vtl0_after_vsm", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 0, 0),
             HV_STATUS_INVALID_PARAMETER);
    hv_check("enable_vp_vtl0_after_vsm", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 0, &ctx),
             HV_STATUS_INVALID_PARAMETER);
    hv_check("enable_partition_vtl1_again", hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 1, 0),
             HV_STATUS_INVALID_PARAMETER);
    hv_check("enable_vp_vtl1_again", hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 1, &ctx), HV_STATUS_INVALID_PARAMETER);
    /* From VTL1: its own VTL and VTL0 are both enabled already. */
    hv_check("vtl1_enable_vp_vtl1_again", vtl1_op(VSM_OP_ENABLE_VP, vp, 0, 0, 0, 0), HV_STATUS_INVALID_PARAMETER);
    /* VTL1 makes the fast HvEnablePartitionVtl(VTL0): RDX = partition, R8 = target VTL. */
    hv_check("vtl1_enable_partition_vtl0",
             HV_RESULT_STATUS(vtl1_op(VSM_OP_HYPERCALL, HVCALL_ENABLE_PARTITION_VTL | HV_CONTROL_FAST,
                                      HV_PARTITION_ID_SELF, 0, 0, 0)),
             HV_STATUS_INVALID_PARAMETER);
    hv_check("vtl1_enable_partition_vtl1_again",
             HV_RESULT_STATUS(vtl1_op(VSM_OP_HYPERCALL, HVCALL_ENABLE_PARTITION_VTL | HV_CONTROL_FAST,
                                      HV_PARTITION_ID_SELF, 1, 0, 0)),
             HV_STATUS_INVALID_PARAMETER);
    hv_finish();
}
