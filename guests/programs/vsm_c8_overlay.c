/*
 * vsm_c8_overlay.c - issue 12 item 8: VTL1 translates VTL0's hypercall page (a VTL0 address)
 * with VALIDATE_READ|WRITE|EXECUTE|PRIVILEGE_EXEMPT: Success with OverlayPage = 1 and the
 * overlay's GPA (seed; the TLFS never says which overlay access is illegal). Validate-write
 * alone and validate-read alone give the same; VTL0 asking for itself too.
 */
#include "vsm.h"

#define RESULT_CODE(r) ((r) & 0xFFFFFFFFull)
#define OVERLAY(r) (((r) >> 40) & 1)

static void check_xlate(const char *name, uint64_t flags)
{
    uint64_t r[4];
    char buf[96];
    uint64_t gva = (uint64_t)hv_hypercall_page;
    uint64_t st = vtl1_op(VSM_OP_TRANSLATE, gva, flags | HV_XLATE_INPUT_VTL(HV_VTL(0)), HV_VP_INDEX_SELF, 0, r);
    snprintf(buf, sizeof(buf), "%s_status", name);
    hv_check(buf, st, HV_STATUS_SUCCESS);
    snprintf(buf, sizeof(buf), "%s_result", name);
    hv_check(buf, RESULT_CODE(r[1]), HV_XLATE_SUCCESS);
    snprintf(buf, sizeof(buf), "%s_overlay", name);
    hv_check(buf, OVERLAY(r[1]), 1);
    snprintf(buf, sizeof(buf), "%s_gpa", name);
    hv_check(buf, r[2], gva >> 12);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c8_overlay start\n");
    if (!vsm_init(false))
        hv_finish();
    const uint64_t X = HV_XLATE_VALIDATE_EXECUTE, R = HV_XLATE_VALIDATE_READ, W = HV_XLATE_VALIDATE_WRITE;
    check_xlate("vtl1_rwx_exempt", R | W | X | HV_XLATE_PRIVILEGE_EXEMPT);
    check_xlate("vtl1_write", W);
    check_xlate("vtl1_read_only", R);
    uint64_t result = 0, page = 0;
    hv_check("vtl0_self_rwx_status",
             hv_translate_va(HV_VP_INDEX_SELF, (uint64_t)hv_hypercall_page, R | W | X | HV_XLATE_PRIVILEGE_EXEMPT,
                             &result, &page),
             HV_STATUS_SUCCESS);
    hv_check("vtl0_self_rwx_result", RESULT_CODE(result), HV_XLATE_SUCCESS);
    hv_check("vtl0_self_rwx_overlay", OVERLAY(result), 1);
    hv_check("vtl0_self_rwx_gpa", page, (uint64_t)hv_hypercall_page >> 12);
    hv_finish();
}
