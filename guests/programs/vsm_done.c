/*
 * vsm_done.c - issue 12 "done when": one guest doing what an independent VSM guest does on
 * its first day, on 2 VPs. VTL1 is enabled on every VP; the default protection mask is
 * R | W | 0x8 (the seed's execute bit); VTL1 protects pages of every kind (none, R, R+X,
 * R+W, R+W+X), VTL0's own page tables among them; VTL0 flushes (with garbage in the
 * undefined flag bits) on both VPs; PV IPIs go VTL0 -> VTL1 and VTL1 -> VTL0, across VPs;
 * read, write and execute intercepts are taken on both VPs; VTL1's APIC took interrupts
 * without ever being told to enable itself first. The pytest side records the run and
 * replays it bit for bit.
 */
#include "vsm_compat.h"

#define TEST_VA 0x100000000ull
#define PTE_PWAD (1ull | 2ull | (1ull << 5) | (1ull << 6))
#define VTL0_VEC 0x68
#define R HV_MAP_GPA_READ
#define W HV_MAP_GPA_WRITE
#define X HV_MAP_GPA_KX
#define UX HV_MAP_GPA_UX

static uint64_t pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_a[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_b[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t dpage[2][512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t cpage[2][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static volatile uint32_t vtl0_hits[2];
static volatile uint64_t vp1_value;
static volatile uint32_t vp1_intercepts;

static void on_vtl0_ipi(struct int_frame *f)
{
    (void)f;
    vtl0_hits[vsm_vp_index() & 1]++;
    apic_eoi();
}

static uint16_t protect(const void *page, uint32_t mask)
{
    return (uint16_t)vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, mask, HV_VTL_SELF, 0);
}

static uint16_t pv_ipi(uint32_t vector, uint8_t vtl, uint64_t mask)
{
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST,
                                          vector | ((uint64_t)vtl << 32), mask));
}

static uint16_t flush(uint64_t vp_mask)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = 0xC0FFEE0000000000ull | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    in[2] = vp_mask;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)in, 0));
}

static uint32_t run_code(int vp) { return ((uint32_t(*)(void))(uintptr_t)cpage[vp])(); }

/* The three intercept kinds on the calling VP's own pages (VTL1 restores the page each time). */
static uint32_t intercepts_here(int vp)
{
    uint32_t n = vsm_log[vp].intercepts;
    dpage[vp][0] = 0xD0D0;
    protect(dpage[vp], HV_MAP_GPA_NONE);
    uint64_t v = *(volatile uint64_t *)dpage[vp]; /* read intercept */
    protect(dpage[vp], R | X);
    *(volatile uint64_t *)dpage[vp] = v + 1; /* write intercept */
    protect(cpage[vp], HV_MAP_GPA_NONE);
    uint32_t r = run_code(vp); /* execute intercept */
    bool good = dpage[vp][0] == 0xD0D1 && r == 0xC0DE;
    return good ? vsm_log[vp].intercepts - n : 0;
}

static void vp1_work(uint64_t what)
{
    switch (what) {
    case 0: /* read through the R page tables, after VP0's flush */
        vp1_value = *(volatile uint64_t *)TEST_VA;
        break;
    case 1:
        vp1_intercepts = intercepts_here(1);
        break;
    case 2: /* VP1 VTL0 -> VP0 VTL1 */
        vp1_value = pv_ipi(VSM_VTL1_IPI_VECTOR + 2, HV_VTL(1), 1ull << 0);
        break;
    case 3: /* VP1 VTL1 -> VP0 VTL0 */
        vp1_value = vtl1_op(VSM_OP_PV_IPI, VTL0_VEC, HV_VTL(0), 1ull << 0, 0, 0);
        break;
    case 4:
        vp1_value = run_code(1);
        break;
    }
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_done start\n");
    static const uint8_t code[] = {0xB8, 0xDE, 0xC0, 0x00, 0x00, 0xC3}; /* mov $0xC0DE, %eax; ret */
    memcpy(cpage[0], code, sizeof(code));
    memcpy(cpage[1], code, sizeof(code));
    apic_enable();
    set_irq_handler(VTL0_VEC, on_vtl0_ipi);
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    hv_check("vtl1_apics_sw_enabled", vsm_log[0].initial_svr & vsm_log[1].initial_svr & 0x100, 0x100);
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);

    /* Default mask R | W | UMX: everything stays executable on both VPs. */
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(R | W | UX);
    hv_check("default_mask_status", vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    hv_check("vp0_runs_code", run_code(0), 0xC0DE);
    compat_vp1_run(vp1_work, 4);
    hv_check("vp1_runs_code", vp1_value, 0xC0DE);

    /* Page tables: VTL0's own PML4/PDPT R+W (no execute); a second mapping's PD/PT R. */
    uint64_t *pml4 = (uint64_t *)(read_cr3() & ~0xFFFull);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & 0x000FFFFFFFFFF000ull);
    page_a[0] = 0xAAAA;
    page_b[0] = 0xBBBB;
    pt[0] = (uint64_t)page_a | PTE_PWAD;
    pd[0] = (uint64_t)pt | PTE_PWAD;
    pdpt[4] = (uint64_t)pd | PTE_PWAD;
    hv_check("protect_pml4_rw", protect(pml4, R | W), HV_STATUS_SUCCESS);
    hv_check("protect_pdpt_rw_umx", protect(pdpt, R | W | UX), HV_STATUS_SUCCESS);
    hv_check("protect_pd_r", protect(pd, R), HV_STATUS_SUCCESS);
    hv_check("protect_pt_rx", protect(pt, R | X), HV_STATUS_SUCCESS);
    hv_check("walk_vp0", *(volatile uint64_t *)TEST_VA, 0xAAAA);
    compat_vp1_run(vp1_work, 0);
    hv_check("walk_vp1", vp1_value, 0xAAAA);

    /* Flush with garbage in the undefined flag bits: VP1 sees the new mapping. */
    hv_check("unprotect_pt", protect(pt, HV_MAP_GPA_ALL), HV_STATUS_SUCCESS);
    pt[0] = (uint64_t)page_b | PTE_PWAD;
    hv_check("protect_pt_r_again", protect(pt, R), HV_STATUS_SUCCESS);
    hv_check("flush_vp1_status", flush(1ull << 1), HV_STATUS_SUCCESS);
    compat_vp1_run(vp1_work, 0);
    hv_check("flush_vp1_seen", vp1_value, 0xBBBB);
    hv_check("flush_self_status", flush(1ull << 0), HV_STATUS_SUCCESS);
    hv_check("walk_vp0_after_flush", *(volatile uint64_t *)TEST_VA, 0xBBBB);

    /* Read, write and execute intercepts on both VPs. */
    hv_check("intercepts_vp0", intercepts_here(0), 3);
    compat_vp1_run(vp1_work, 1);
    hv_check("intercepts_vp1", vp1_intercepts, 3);
    hv_check("vp0_exec_message", vsm_log[0].last_msg.access_type, HV_INTERCEPT_EXECUTE);
    hv_check("vp1_exec_message_vp", vsm_log[1].last_msg.vp_index, 1);

    /* IPIs across VTLs, both directions, across VPs. */
    uint32_t before = vsm_log[1].ipi_irqs[1];
    hv_check("pv_ipi_vtl0_vp0_to_vtl1_vp1", pv_ipi(VSM_VTL1_IPI_VECTOR + 1, HV_VTL(1), 1ull << 1), HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl0_vp0_to_vtl1_vp1_taken", compat_spin(&vsm_log[1].ipi_irqs[1], before + 1));
    hv_check("pv_ipi_vtl1_vp0_to_vtl0_vp1", vtl1_op(VSM_OP_PV_IPI, VTL0_VEC, HV_VTL(0), 1ull << 1, 0, 0),
             HV_STATUS_SUCCESS);
    compat_spin(&vtl0_hits[1], 1);
    hv_check("pv_ipi_vtl1_vp0_to_vtl0_vp1_taken", vtl0_hits[1], 1);
    before = vsm_log[0].ipi_irqs[2];
    compat_vp1_run(vp1_work, 2);
    hv_check("pv_ipi_vtl0_vp1_to_vtl1_vp0", vp1_value, HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl0_vp1_to_vtl1_vp0_taken", compat_wait(&vsm_log[0].ipi_irqs[2], before + 1));
    compat_vp1_run(vp1_work, 3);
    hv_check("pv_ipi_vtl1_vp1_to_vtl0_vp0", vp1_value, HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl1_vp1_to_vtl0_vp0_taken", compat_wait(&vtl0_hits[0], 1));
    compat_settle();
    hv_check("vtl0_ipis_exactly_once", vtl0_hits[0] + vtl0_hits[1], 2);
    hv_check("vp0_still_runs_code", run_code(0), 0xC0DE);
    hv_finish();
}
