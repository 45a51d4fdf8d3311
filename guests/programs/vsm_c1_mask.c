/*
 * vsm_c1_mask.c - issue 12 item 1: the execute bit of a protection mask. VTL1 enables
 * protections with DefaultVtlProtectionMask = R | W | 0x8 (the seed's "execute"; the
 * markdown TLFS calls bit 3 user-execute, the PDF kernel-execute). With MBEC off either
 * execute bit grants execute, so VTL0 keeps running everywhere (no intercepts, no triple
 * fault after the VtlReturn), on both VPs. Then explicit masks R|0x8 and R|0x4 on a code page:
 * both executable, no intercept; R alone is not (the translation says Intercept).
 */
#include "vsm_compat.h"

static uint8_t cpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static volatile uint32_t vp1_result;

static uint32_t run_cpage(void) { return ((uint32_t(*)(void))(uintptr_t)cpage)(); }
static void vp1_exec(uint64_t unused)
{
    (void)unused;
    vp1_result = run_cpage();
}

static uint64_t xlate_exec(void *gva)
{
    uint64_t r[4];
    vtl1_op(VSM_OP_TRANSLATE, (uint64_t)gva, HV_XLATE_VALIDATE_EXECUTE | HV_XLATE_INPUT_VTL(HV_VTL(0)),
            HV_VP_INDEX_SELF, 0, r);
    return r[1] & 0xFFFFFFFF;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c1_mask start\n");
    static const uint8_t code[] = {0xB8, 0xDE, 0xC0, 0x00, 0x00, 0xC3}; /* mov $0xC0DE, %eax; ret */
    memcpy(cpage, code, sizeof(code));
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    /* VTL1 stops on any intercept it did not expect: skip the instruction and count it. */
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION |
                   HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_READ | HV_MAP_GPA_WRITE | HV_MAP_GPA_UX);
    hv_check("default_mask_rw_umx_status", vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    /* VTL0 runs on after the VtlReturn: code, stack, page tables, IDT all on default-mask pages. */
    hv_check("vtl0_runs_after_return", vtl1_op(VSM_OP_ECHO, 41, 0, 0, 0, 0), 42);
    hv_check("default_mask_exec", run_cpage(), 0xC0DE);
    hv_check_true("vp1_runs", compat_vp1_run(vp1_exec, 0));
    hv_check("vp1_default_mask_exec", vp1_result, 0xC0DE);
    hv_check("default_mask_no_intercepts_vp0", vsm_log[0].intercepts, 0);
    hv_check("default_mask_no_intercepts_vp1", vsm_log[1].intercepts, 0);
    hv_check("default_mask_translate_exec", xlate_exec(cpage), HV_XLATE_SUCCESS);
    uint64_t r[4];
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, 0, 0, r);
    hv_check("default_mask_read_back", (r[1] >> 1) & 0xF, HV_MAP_GPA_READ | HV_MAP_GPA_WRITE | HV_MAP_GPA_UX);

    /* Explicit masks on the code page. */
    hv_check("protect_r_umx", vtl1_op(VSM_OP_PROTECT, (uint64_t)cpage, 1, HV_MAP_GPA_READ | HV_MAP_GPA_UX,
                                      HV_VTL_SELF, 0), HV_STATUS_SUCCESS);
    hv_check("r_umx_exec", run_cpage(), 0xC0DE);
    hv_check("r_umx_translate_exec", xlate_exec(cpage), HV_XLATE_SUCCESS);
    hv_check("protect_r_kmx", vtl1_op(VSM_OP_PROTECT, (uint64_t)cpage, 1, HV_MAP_GPA_READ | HV_MAP_GPA_KX,
                                      HV_VTL_SELF, 0), HV_STATUS_SUCCESS);
    hv_check("r_kmx_exec", run_cpage(), 0xC0DE);
    hv_check("r_kmx_translate_exec", xlate_exec(cpage), HV_XLATE_SUCCESS);
    hv_check("explicit_masks_no_intercepts", vsm_log[0].intercepts, 0);
    hv_check("protect_r", vtl1_op(VSM_OP_PROTECT, (uint64_t)cpage, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0),
             HV_STATUS_SUCCESS);
    hv_check("r_translate_exec_intercept", xlate_exec(cpage), HV_XLATE_INTERCEPT);
    hv_finish();
}
