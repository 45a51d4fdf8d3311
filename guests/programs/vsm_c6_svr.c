/*
 * vsm_c6_svr.c - issue 12 item 6: after HvEnableVpVtl(VTL1) the VTL1 local APIC starts
 * software-enabled, SVR = 0x1FF (seed: Windows Server 2019's secure kernel expects it), on
 * both VPs; a fixed IPI from VTL1 of VP0 to VTL1 of VP1 is then taken.
 */
#include "vsm_compat.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c6_svr start\n");
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    hv_check("vtl1_vp0_initial_svr", vsm_log[0].initial_svr, 0x1FF);
    hv_check("vtl1_vp1_initial_svr", vsm_log[1].initial_svr, 0x1FF);
    /* VTL1 (VP0) -> VTL1 (VP1), APIC fixed IPI: VP1's VTL1 is entered to take it. */
    uint32_t before = vsm_log[1].ipi_irqs[1];
    vtl1_op(VSM_OP_SEND_IPI, 1, VSM_VTL1_IPI_VECTOR + 1, 0, 0, 0);
    hv_check_true("vtl1_fixed_ipi_vp1_taken", compat_spin(&vsm_log[1].ipi_irqs[1], before + 1));
    hv_finish();
}
