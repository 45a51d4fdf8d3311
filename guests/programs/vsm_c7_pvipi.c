/*
 * vsm_c7_pvipi.c - issue 12 item 7: a PV IPI from VTL0 with UseTargetVtl=1, TargetVtl=1
 * (HvCallSendSyntheticClusterIpi, fast and memory forms, and the Ex form) is delivered to the
 * target VP's VTL1 APIC (seed; the TLFS is silent and an interrupt is not a memory access):
 * to VP1 while VP0 sends, to VP0 itself, and from VP1 to VP0. Exactly one interrupt each.
 */
#include "vsm_compat.h"

static uint16_t pv_ipi_fast(uint32_t vector, uint8_t vtl, uint64_t mask)
{
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST,
                                          vector | ((uint64_t)vtl << 32), mask));
}

static uint16_t pv_ipi_mem(uint32_t vector, uint8_t vtl, uint64_t mask)
{
    uint8_t *in = vsm_in_page();
    memset(in, 0, 16);
    *(uint32_t *)in = vector;
    in[4] = vtl;
    ((uint64_t *)in)[1] = mask;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, (uint64_t)in, 0));
}

/* Ex form, sparse VP set with bank 0 = mask (one variable-header qword). */
static uint16_t pv_ipi_ex(uint32_t vector, uint8_t vtl, uint64_t mask)
{
    uint8_t *in = vsm_in_page();
    memset(in, 0, 32);
    *(uint32_t *)in = vector;
    in[4] = vtl;
    ((uint64_t *)in)[1] = 0; /* HV_GENERIC_SET_SPARSE_4K */
    ((uint64_t *)in)[2] = 1; /* ValidBanksMask: bank 0 */
    ((uint64_t *)in)[3] = mask;
    return HV_RESULT_STATUS(
        vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX | HV_CONTROL_VAR_HEADER(1), (uint64_t)in, 0));
}

static volatile uint16_t vp1_status;
static void vp1_sends(uint64_t vector)
{
    vp1_status = pv_ipi_fast((uint32_t)vector, HV_VTL(1), 1ull << 0);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c7_pvipi start\n");
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    volatile uint32_t *vp1_hits = &vsm_log[1].ipi_irqs[0], *vp0_hits = &vsm_log[0].ipi_irqs[1];

    hv_check("vtl0_to_vp1_vtl1_fast_status", pv_ipi_fast(VSM_VTL1_IPI_VECTOR + 0, HV_VTL(1), 1ull << 1),
             HV_STATUS_SUCCESS);
    hv_check_true("vtl0_to_vp1_vtl1_fast_delivered", compat_spin(vp1_hits, 1));
    hv_check("vtl0_to_vp1_vtl1_mem_status", pv_ipi_mem(VSM_VTL1_IPI_VECTOR + 0, HV_VTL(1), 1ull << 1),
             HV_STATUS_SUCCESS);
    hv_check_true("vtl0_to_vp1_vtl1_mem_delivered", compat_spin(vp1_hits, 2));
    hv_check("vtl0_to_vp1_vtl1_ex_status", pv_ipi_ex(VSM_VTL1_IPI_VECTOR + 0, HV_VTL(1), 1ull << 1),
             HV_STATUS_SUCCESS);
    hv_check_true("vtl0_to_vp1_vtl1_ex_delivered", compat_spin(vp1_hits, 3));

    /* To the sender's own VTL1: VP0 switches up to take it (RFLAGS.IF of VTL0 is irrelevant). */
    hv_check("vtl0_to_self_vtl1_status", pv_ipi_fast(VSM_VTL1_IPI_VECTOR + 1, HV_VTL(1), 1ull << 0),
             HV_STATUS_SUCCESS);
    hv_check_true("vtl0_to_self_vtl1_delivered", compat_wait(vp0_hits, 1));

    /* VP1's VTL0 -> VP0's VTL1. */
    hv_check_true("vp1_ran", compat_vp1_run(vp1_sends, VSM_VTL1_IPI_VECTOR + 1));
    hv_check("vp1_vtl0_to_vp0_vtl1_status", vp1_status, HV_STATUS_SUCCESS);
    hv_check_true("vp1_vtl0_to_vp0_vtl1_delivered", compat_wait(vp0_hits, 2));

    compat_settle();
    hv_check("vp1_vtl1_exactly_three", *vp1_hits, 3);
    hv_check("vp0_vtl1_exactly_two", *vp0_hits, 2);
    hv_finish();
}
