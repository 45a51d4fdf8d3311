/*
 * vsm_deadlock.c - a guest that deadlocks itself on a TLB lock (run with --smp 2).
 *
 * VP1 is never started. VTL1 on VP0 enables VTL1 on VP1 and translates a VTL0 address in
 * VP1's context with TLB_FLUSH_INHIBIT: that locks VP1's VTL0 TLB until VP1 returns from
 * VTL1, which it never will. VTL0 on VP0 then flushes every processor: the TLFS suspends
 * the caller until the lock is released, so no VP can ever run again. vsmtrace must see
 * that and stop the run with a guest-deadlock report instead of waiting for --timeout.
 * Reaching the line after the flush is a failure (the flush ignored the lock).
 */
#include "vsm.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t r[4];
    printf("vsm_deadlock start\n");
    if (!vsm_init(false))
        hv_finish();
    hv_check("enable_vp1_vtl1", vtl1_op(VSM_OP_ENABLE_VP, 1, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    hv_check("inhibit_on_vp1",
             vtl1_op(VSM_OP_TRANSLATE, (uint64_t)r, HV_XLATE_VALIDATE_READ | HV_XLATE_TLB_FLUSH_INHIBIT |
                                                       HV_XLATE_INPUT_VTL(HV_VTL(0)), 1, 0, r),
             HV_STATUS_SUCCESS);
    printf("flushing every processor\n");
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = HV_FLUSH_ALL_PROCESSORS | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    in[2] = 0;
    uint16_t st = HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)in, 0));
    printf("FAIL flush_returned_while_locked: status 0x%x\n", st);
    hv_failures++;
    hv_finish();
}
