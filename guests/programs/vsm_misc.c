/*
 * vsm_misc.c - HvCallTranslateVirtualAddress results, confused-deputy attempts through
 * hypercall buffers, and the TLB lock on one VP.
 *
 * Translation: VTL0 gets a private 4 KiB page-table branch at GVA 0x8000000000 (PML4
 * entry 1) whose leaves cover every result code (present/not present, supervisor vs
 * user, read-only, NX, a GPA outside RAM, VTL-protected pages, the hypercall overlay);
 * VTL1 translates those GVAs in VTL0's context, and the identity map's 2 MiB pages cover
 * large pages.  VTL0 translating in VTL1's context gets ACCESS_DENIED (docs/vsm.md).
 *
 * Confused deputy: VTL1 protects a "secret" page (no access) and a read-only page; VTL0
 * hands their GPAs to hypercalls as input or output buffers and must get
 * ACCESS_DENIED with nothing read (no message posted, output untouched) and nothing
 * written (VTL1 compares the pages with their pattern).
 *
 * TLB lock: VTL1 sets VsmVpSecureConfigVtl0.TlbLocked (directly or with the translate
 * TLB_FLUSH_INHIBIT flag); it reads back while VTL1 runs and is released by VtlReturn,
 * after which VTL0's own flush completes.
 */
#include "vsm.h"
#include "apic.h"

#define HV_XLATE_SUPERVISOR 0x040ull
#define HV_XLATE_USER 0x080ull
#define XLATE_VTL0 HV_XLATE_INPUT_VTL(HV_VTL(0))
#define RESULT_CODE(r) ((uint32_t)(r))
#define RESULT_OVERLAY(r) (((r) >> 40) & 1)
#define RESULT_CACHE(r) (((r) >> 32) & 0xFF)
#define HV_CACHE_WB 6

#define PTE_P 0x1ull
#define PTE_RW 0x2ull
#define PTE_US 0x4ull
#define PTE_A 0x20ull
#define PTE_D 0x40ull
#define PTE_XD (1ull << 63)
#define BRANCH 0x8000000000ull /* PML4 index 1 */
#define GVA(i) (BRANCH + (uint64_t)(i) * HV_PAGE_SIZE)
#define UNMAPPED_GPA 0xC00000000ull /* 48 GiB: beyond guest RAM */

enum { L_SUP_RW, L_ABSENT, L_USER_RO, L_NX, L_UNMAPPED, L_SECRET, L_RO, L_HCALL, L_COUNT };

static uint64_t pdpt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t data0[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t data1[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t secret[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t ro[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t vtl0_simp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t vtl0_siefp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t plain[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

#define SECRET_SEED 0x5EC2E75EC2E70000ull
#define RO_SEED 0x0A0A0A0A0A0A0000ull
#define SINT2_VECTOR 0x52
#define RO_PTE 3 /* qword of the read-only page used as a PTE */

static uint64_t pattern(uint64_t seed, int i) { return seed ^ ((uint64_t)i * 0x0101010101010101ull); }

static void fill(uint8_t *page, uint64_t seed)
{
    for (int i = 0; i < HV_PAGE_SIZE / 8; i++)
        ((uint64_t *)page)[i] = pattern(seed, i);
}

/* ---- VTL1 side: guest-defined operations (arg0 = which) ---------------------------- */
enum { U_COMPARE = 1, U_LOCK, U_READ_LOCK, U_INHIBIT };

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)vp;
    uint64_t lo = 0, res = 0, page = 0;
    uint16_t st;
    switch (m->arg[0]) {
    case U_COMPARE: { /* arg1 = page, arg2 = VTL0's copy of it -> number of qwords that differ */
        const volatile uint64_t *p = (const volatile uint64_t *)m->arg[1], *c = (const uint64_t *)m->arg[2];
        uint64_t bad = 0;
        for (int i = 0; i < HV_PAGE_SIZE / 8; i++)
            bad += p[i] != c[i];
        return bad;
    }
    case U_LOCK: /* set TlbLocked for VTL0, read it back while still in VTL1 */
        st = hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, HV_VSM_SECURE_TLB_LOCKED, 0);
        hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, &lo, 0);
        m->ret[1] = lo;
        return st;
    case U_READ_LOCK:
        st = hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, &lo, 0);
        m->ret[1] = lo;
        return st;
    case U_INHIBIT: /* translate with TLB_FLUSH_INHIBIT, then read the lock */
        st = hv_translate_va(HV_VP_INDEX_SELF, m->arg[1],
                             HV_XLATE_VALIDATE_READ | HV_XLATE_TLB_FLUSH_INHIBIT | XLATE_VTL0, &res, &page);
        hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, &lo, 0);
        m->ret[1] = lo;
        m->ret[2] = res;
        return st;
    default:
        return ~0ull;
    }
}

/* ---- VTL0 helpers ------------------------------------------------------------------- */
static uint32_t vp;

/* VTL1 translates gva in VTL0's context (flags get the VTL0 target). */
static uint16_t xl(uint64_t gva, uint64_t flags, uint64_t *res, uint64_t *page)
{
    uint64_t r[4];
    uint16_t st = (uint16_t)vtl1_op(VSM_OP_TRANSLATE, gva, flags | XLATE_VTL0, HV_VP_INDEX_SELF, 0, r);
    *res = r[1];
    *page = r[2];
    return st;
}

static void check_xl(const char *name, uint64_t gva, uint64_t flags, uint32_t want_code, uint64_t want_page)
{
    uint64_t res = 0, page = 0;
    uint16_t st = xl(gva, flags, &res, &page);
    bool ok = st == HV_STATUS_SUCCESS && RESULT_CODE(res) == want_code;
    if (ok && want_code == HV_XLATE_SUCCESS)
        ok = page == want_page && RESULT_CACHE(res) == HV_CACHE_WB;
    if (ok) {
        printf("ok %s\n", name);
    } else {
        printf("FAIL %s: status 0x%x result 0x%lx page 0x%lx, want code %u page 0x%lx\n", name, st, res, page,
               want_code, want_page);
        hv_failures++;
    }
}

static uint64_t overlay_of(uint64_t gva, uint64_t flags, uint32_t *code)
{
    uint64_t res = 0, page = 0;
    xl(gva, flags, &res, &page);
    *code = RESULT_CODE(res);
    return RESULT_OVERLAY(res);
}

static void protect(const char *name, void *page, uint32_t mask)
{
    hv_check(name, vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, mask, HV_VTL_SELF, 0), HV_STATUS_SUCCESS);
}

static uint8_t secret_copy[HV_PAGE_SIZE], ro_copy[HV_PAGE_SIZE]; /* taken before protecting */
static uint64_t vtl1_compare(void *page, void *copy)
{
    return vtl1_op(VSM_OP_USER, U_COMPARE, (uint64_t)page, (uint64_t)copy, 0, 0);
}

static volatile uint32_t sint2_irqs;
static void sint2_irq(struct int_frame *f)
{
    (void)f;
    sint2_irqs++;
    apic_eoi();
}

static void let_interrupts_in(void)
{
    sti();
    for (int i = 0; i < 4; i++)
        (void)hv_ref_time();
    cli();
}

static uint16_t flush_self(uint64_t flags)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = flags;
    in[2] = 1ull << vp;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)in, 0));
}

/* GetVpRegisters(self, VTL0, RIP) with explicit buffers. */
static uint16_t get_rip_via(void *in_buf, void *out_buf)
{
    uint64_t *in = in_buf;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1), (uint64_t)in,
                                          (uint64_t)out_buf));
}

static void write_get_rip_input(uint8_t *in)
{
    memset(in, 0, 24);
    ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
    *(uint32_t *)(in + 8) = HV_VP_INDEX_SELF;
    in[12] = HV_VTL_SELF;
    *(uint32_t *)(in + 16) = HV_REG_RIP;
}

static void write_post_input(uint8_t *at, uint32_t size)
{
    struct hv_post_message_input *p = (struct hv_post_message_input *)at;
    p->connection_id = VSMTRACE_LOOPBACK_MESSAGE_CONNECTION;
    p->reserved = 0;
    p->message_type = 1;
    p->payload_size = size;
}

static bool all_bytes(const uint8_t *p, uint8_t v, int n)
{
    for (int i = 0; i < n; i++)
        if (p[i] != v)
            return false;
    return true;
}

/* ---- the checks ----------------------------------------------------------------------- */
static void translations(void)
{
    uint64_t *pml4 = (uint64_t *)(read_cr3() & ~0xFFFull);
    bool nxe = (rdmsr(MSR_EFER) >> 11) & 1;
    pml4[1] = (uint64_t)pdpt | PTE_P | PTE_RW | PTE_US;
    pdpt[0] = (uint64_t)pd | PTE_P | PTE_RW | PTE_US;
    pd[0] = (uint64_t)pt | PTE_P | PTE_RW | PTE_US;
    pt[L_SUP_RW] = (uint64_t)data0 | PTE_P | PTE_RW;
    pt[L_ABSENT] = (uint64_t)data1; /* P clear */
    pt[L_USER_RO] = (uint64_t)data1 | PTE_P | PTE_US;
    pt[L_NX] = (uint64_t)data1 | PTE_P | PTE_RW | PTE_US | (nxe ? PTE_XD : 0);
    pt[L_UNMAPPED] = UNMAPPED_GPA | PTE_P | PTE_RW;
    pt[L_SECRET] = (uint64_t)secret | PTE_P | PTE_RW;
    pt[L_RO] = (uint64_t)ro | PTE_P | PTE_RW;
    pt[L_HCALL] = (uint64_t)hv_hypercall_page | PTE_P | PTE_RW;

    const uint64_t R = HV_XLATE_VALIDATE_READ, W = HV_XLATE_VALIDATE_WRITE, X = HV_XLATE_VALIDATE_EXECUTE;
    check_xl("xl_success_4k", GVA(L_SUP_RW) + 0x123, R | W, HV_XLATE_SUCCESS, (uint64_t)data0 >> 12);
    check_xl("xl_no_validation", GVA(L_SUP_RW), 0, HV_XLATE_SUCCESS, (uint64_t)data0 >> 12);
    check_xl("xl_page_not_present", GVA(L_ABSENT), R, HV_XLATE_PAGE_NOT_PRESENT, 0);
    check_xl("xl_page_not_present_unvalidated", GVA(L_ABSENT), 0, HV_XLATE_PAGE_NOT_PRESENT, 0);
    check_xl("xl_pml4e_not_present", 2 * BRANCH, R, HV_XLATE_PAGE_NOT_PRESENT, 0);
    check_xl("xl_non_canonical", 0x0000800000000000ull, R, HV_XLATE_PAGE_NOT_PRESENT, 0);
    check_xl("xl_user_on_supervisor_page", GVA(L_SUP_RW), R | HV_XLATE_USER, HV_XLATE_PRIVILEGE_VIOLATION, 0);
    check_xl("xl_user_on_supervisor_exempt", GVA(L_SUP_RW), R | HV_XLATE_USER | HV_XLATE_PRIVILEGE_EXEMPT,
             HV_XLATE_SUCCESS, (uint64_t)data0 >> 12);
    check_xl("xl_supervisor_on_user_page", GVA(L_USER_RO), R | HV_XLATE_SUPERVISOR, HV_XLATE_SUCCESS,
             (uint64_t)data1 >> 12);
    check_xl("xl_user_read_ro", GVA(L_USER_RO), R | HV_XLATE_USER, HV_XLATE_SUCCESS, (uint64_t)data1 >> 12);
    check_xl("xl_user_write_ro", GVA(L_USER_RO), W | HV_XLATE_USER, HV_XLATE_PRIVILEGE_VIOLATION, 0);
    /* CR0.WP is clear in this runtime: a supervisor write to a read-only page is allowed. */
    hv_check("vtl0_cr0_wp_clear", (read_cr0() >> 16) & 1, 0);
    check_xl("xl_supervisor_write_ro_wp0", GVA(L_USER_RO), W | HV_XLATE_SUPERVISOR, HV_XLATE_SUCCESS,
             (uint64_t)data1 >> 12);
    hv_check_true("vtl0_efer_nxe", nxe);
    if (nxe) {
        check_xl("xl_nx_execute", GVA(L_NX), X, HV_XLATE_PRIVILEGE_VIOLATION, 0);
        check_xl("xl_nx_read", GVA(L_NX), R | W, HV_XLATE_SUCCESS, (uint64_t)data1 >> 12);
        check_xl("xl_execute_ok", GVA(L_SUP_RW), X, HV_XLATE_SUCCESS, (uint64_t)data0 >> 12);
    }
    {
        uint64_t res = 0, page = 0;
        uint16_t st = xl(GVA(L_SUP_RW), R | HV_XLATE_USER | HV_XLATE_SUPERVISOR, &res, &page);
        hv_check("xl_user_and_supervisor_rejected", st, HV_STATUS_INVALID_PARAMETER);
    }
    /* 2 MiB pages of the runtime's identity map. */
    static uint64_t big_var = 1;
    uint64_t gva = (uint64_t)&big_var;
    check_xl("xl_large_page", gva, R | W | X, HV_XLATE_SUCCESS, gva >> 12);
    check_xl("xl_large_page_second_2m", 0x3FF000 + 0x2A8, R, HV_XLATE_SUCCESS, 0x3FF);
    check_xl("xl_gpa_unmapped", GVA(L_UNMAPPED), R, HV_XLATE_GPA_UNMAPPED, 0);
    check_xl("xl_gpa_unmapped_unvalidated", GVA(L_UNMAPPED), 0, HV_XLATE_GPA_UNMAPPED, 0);

    /* Accessed/dirty bits. */
    volatile uint64_t *vpt = pt, *vpd = pd;
    vpt[L_SUP_RW] &= ~(PTE_A | PTE_D);
    vpd[0] &= ~PTE_A;
    check_xl("xl_no_set_bits", GVA(L_SUP_RW), W, HV_XLATE_SUCCESS, (uint64_t)data0 >> 12);
    hv_check("xl_no_set_bits_leaves_ad", vpt[L_SUP_RW] & (PTE_A | PTE_D), 0);
    check_xl("xl_set_bits", GVA(L_SUP_RW), W | HV_XLATE_SET_PAGE_TABLE_BITS, HV_XLATE_SUCCESS, (uint64_t)data0 >> 12);
    hv_check("xl_set_bits_accessed_dirty", vpt[L_SUP_RW] & (PTE_A | PTE_D), PTE_A | PTE_D);
    hv_check("xl_set_bits_upper_accessed", vpd[0] & PTE_A, PTE_A);

    /* Overlay pages: VTL0's hypercall page, VTL1's own VP assist page. */
    uint32_t code = 99;
    hv_check("xl_overlay_hypercall_page", overlay_of(GVA(L_HCALL), R, &code), 1);
    hv_check("xl_overlay_hypercall_page_code", code, HV_XLATE_SUCCESS);
    hv_check("xl_overlay_hypercall_page_identity", overlay_of((uint64_t)hv_hypercall_page, X, &code), 1);
    hv_check("xl_overlay_hypercall_write", overlay_of(GVA(L_HCALL), W, &code), 1);
    hv_check("xl_overlay_hypercall_write_code", code, HV_XLATE_SUCCESS);
    hv_check("xl_plain_page_not_overlay", overlay_of(GVA(L_SUP_RW), R, &code), 0);
    {
        uint64_t r[4];
        vtl1_op(VSM_OP_TRANSLATE, (uint64_t)vsm_vtl1_assist(vp), HV_XLATE_VALIDATE_READ, HV_VP_INDEX_SELF, 0, r);
        hv_check("xl_vtl1_overlay_assist_page_status", r[0], HV_STATUS_SUCCESS);
        hv_check("xl_vtl1_overlay_assist_page", RESULT_OVERLAY(r[1]), 1);
        hv_check("xl_vtl1_overlay_assist_page_gpa", r[2], (uint64_t)vsm_vtl1_assist(vp) >> 12);
        /* VTL0 has no assist page at that GPA: not an overlay for VTL0. */
        hv_check("xl_vtl0_assist_gpa_not_overlay", overlay_of((uint64_t)vsm_vtl1_assist(vp), R, &code), 0);
    }

    /* VTL0 translating for itself, and in VTL1's context (above the caller). */
    uint64_t res = 0, page = 0;
    hv_check("xl_vtl0_self_status", hv_translate_va(HV_VP_INDEX_SELF, GVA(L_SUP_RW), R, &res, &page), 0);
    hv_check("xl_vtl0_self_code", RESULT_CODE(res), HV_XLATE_SUCCESS);
    hv_check("xl_vtl0_self_page", page, (uint64_t)data0 >> 12);
    uint16_t st = hv_translate_va(HV_VP_INDEX_SELF, GVA(L_SUP_RW), R | HV_XLATE_INPUT_VTL(HV_VTL(1)), &res, &page);
    hv_check("xl_vtl0_target_vtl1_denied", st, HV_STATUS_ACCESS_DENIED);
    hv_check("xl_vtl0_target_vtl1_no_output", res, 0xEEEEEEEEEEEEEEEEull);
    hv_check("xl_vtl0_any_vp", hv_translate_va(HV_ANY_VP, GVA(L_SUP_RW), R, &res, &page), HV_STATUS_INVALID_VP_INDEX);
}

static void protected_translations(void)
{
    const uint64_t R = HV_XLATE_VALIDATE_READ, W = HV_XLATE_VALIDATE_WRITE, X = HV_XLATE_VALIDATE_EXECUTE;
    check_xl("xl_gpa_no_read", GVA(L_SECRET), R, HV_XLATE_GPA_NO_READ, 0);
    check_xl("xl_gpa_no_read_large_page", (uint64_t)secret, R, HV_XLATE_GPA_NO_READ, 0);
    check_xl("xl_gpa_no_read_unvalidated", GVA(L_SECRET), 0, HV_XLATE_SUCCESS, (uint64_t)secret >> 12);
    check_xl("xl_gpa_no_write", GVA(L_RO), W, HV_XLATE_GPA_NO_WRITE, 0);
    check_xl("xl_gpa_ro_read_ok", GVA(L_RO), R, HV_XLATE_SUCCESS, (uint64_t)ro >> 12);
    check_xl("xl_gpa_no_execute", GVA(L_RO), X, HV_XLATE_INTERCEPT, 0);
    uint64_t res = 0, page = 0;
    hv_translate_va(HV_VP_INDEX_SELF, (uint64_t)secret, R, &res, &page);
    hv_check("xl_vtl0_self_gpa_no_read", RESULT_CODE(res), HV_XLATE_GPA_NO_READ);
    /* Page tables inside the no-access page: the walk itself must not read it (the
     * PTE would be a secret qword, and its frame bits would come back as GpaPage). */
    volatile uint64_t *vpd = pd;
    vpd[1] = (uint64_t)secret | PTE_P | PTE_RW | PTE_US; /* PT for BRANCH + 2 MiB = the secret page */
    uint64_t leak_gva = BRANCH + 0x200000 + 5 * HV_PAGE_SIZE;
    hv_translate_va(HV_VP_INDEX_SELF, leak_gva, 0, &res, &page);
    hv_check("xl_vtl0_walk_through_secret", RESULT_CODE(res), HV_XLATE_GPA_NO_READ);
    hv_check("xl_vtl0_walk_through_secret_no_gpa", page, 0);
    hv_translate_va(HV_VP_INDEX_SELF, leak_gva, HV_XLATE_SET_PAGE_TABLE_BITS, &res, &page);
    hv_check("xl_vtl0_set_bits_through_secret", RESULT_CODE(res), HV_XLATE_GPA_NO_READ);
    check_xl("xl_vtl1_for_vtl0_walk_through_secret", leak_gva, 0, HV_XLATE_GPA_NO_READ, 0);
    vpd[2] = (uint64_t)ro | PTE_P | PTE_RW | PTE_US; /* PT in the read-only page: readable, A/D not writable */
    hv_translate_va(HV_VP_INDEX_SELF, BRANCH + 0x400000 + RO_PTE * HV_PAGE_SIZE,
                    HV_XLATE_VALIDATE_WRITE | HV_XLATE_SET_PAGE_TABLE_BITS, &res, &page);
    hv_check("xl_vtl0_set_bits_ro_page_table", RESULT_CODE(res), HV_XLATE_GPA_NO_WRITE);
    hv_check("xl_vtl0_set_bits_ro_page_table_unchanged", vtl1_compare(ro, ro_copy), 0);
    vpd[1] = vpd[2] = 0;
    /* VTL1 translating for itself: its own view is not restricted. */
    uint64_t r[4];
    vtl1_op(VSM_OP_TRANSLATE, (uint64_t)secret, R | W, HV_VP_INDEX_SELF, 0, r);
    hv_check("xl_vtl1_self_unrestricted", RESULT_CODE(r[1]), HV_XLATE_SUCCESS);
}

static void confused_deputy(void)
{
    struct hv_message *slot = hv_sint_slot(vtl0_simp, VSMTRACE_LOOPBACK_SINT);
    /* Positive controls first: the same requests from plain pages work. */
    write_get_rip_input(plain);
    memset(plain + 0x800, 0xEE, 16);
    hv_check("cd_control_get_regs", get_rip_via(plain, plain + 0x800), HV_STATUS_SUCCESS);
    hv_check_true("cd_control_get_regs_written", !all_bytes(plain + 0x800, 0xEE, 8));
    write_post_input(plain + 0x400, 16);
    memcpy(plain + 0x410, "control-message", 16);
    hv_check("cd_control_post", HV_RESULT_STATUS(vsm_hypercall(HVCALL_POST_MESSAGE, (uint64_t)plain + 0x400, 0)),
             HV_STATUS_SUCCESS);
    let_interrupts_in();
    hv_check("cd_control_post_delivered", slot->type, 1);
    hv_check_true("cd_control_post_payload", memcmp(slot->payload, "control-message", 16) == 0);
    hv_message_done(slot);

    /* Output into a page VTL1 made read-only / no-access. */
    memset(plain + 0x800, 0xEE, 16);
    write_get_rip_input(plain);
    hv_check("cd_get_regs_output_ro", get_rip_via(plain, ro + 0x100), HV_STATUS_ACCESS_DENIED);
    hv_check("cd_get_regs_output_ro_unchanged", vtl1_compare(ro, ro_copy), 0);
    hv_check("cd_get_regs_output_secret", get_rip_via(plain, secret + 0x100), HV_STATUS_ACCESS_DENIED);
    hv_check("cd_get_regs_output_secret_unchanged", vtl1_compare(secret, secret_copy), 0);
    {
        uint8_t *in = vsm_in_page();
        memset(in, 0, 32);
        ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
        *(uint32_t *)(in + 8) = HV_VP_INDEX_SELF;
        ((uint64_t *)in)[2] = HV_XLATE_VALIDATE_READ;
        ((uint64_t *)in)[3] = (uint64_t)plain >> 12;
        uint16_t st = HV_RESULT_STATUS(vsm_hypercall(HVCALL_TRANSLATE_VIRTUAL_ADDRESS, (uint64_t)in, (uint64_t)ro + 0x200));
        hv_check("cd_translate_output_ro", st, HV_STATUS_ACCESS_DENIED);
        hv_check("cd_translate_output_ro_unchanged", vtl1_compare(ro, ro_copy), 0);
    }
    /* HvCallGetVpIndexFromApicId, which a machine that records nothing answers in C: the same
       rules while VTL1 restricts pages of VTL0's view (docs/architecture.md, "Exit paths in C"). */
    {
        uint64_t *q = (uint64_t *)(plain + 0x600);
        uint64_t control = HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1);
        q[0] = HV_PARTITION_ID_SELF;
        q[1] = 0;
        q[2] = 0; /* APIC ID 0 */
        memset(plain + 0xA00, 0xEE, 8);
        hv_check("cd_apic_control", HV_RESULT_STATUS(vsm_hypercall(control, (uint64_t)plain + 0x600, (uint64_t)plain + 0xA00)),
                 HV_STATUS_SUCCESS);
        hv_check("cd_apic_control_output", *(uint32_t *)(plain + 0xA00), 0);
        hv_check("cd_apic_output_ro", HV_RESULT_STATUS(vsm_hypercall(control, (uint64_t)plain + 0x600, (uint64_t)ro + 0x300)),
                 HV_STATUS_ACCESS_DENIED);
        hv_check("cd_apic_output_ro_unchanged", vtl1_compare(ro, ro_copy), 0);
        hv_check("cd_apic_output_secret",
                 HV_RESULT_STATUS(vsm_hypercall(control, (uint64_t)plain + 0x600, (uint64_t)secret + 0x300)),
                 HV_STATUS_ACCESS_DENIED);
        hv_check("cd_apic_output_secret_unchanged", vtl1_compare(secret, secret_copy), 0);
        memset(plain + 0xA00, 0xEE, 8);
        hv_check("cd_apic_input_secret",
                 HV_RESULT_STATUS(vsm_hypercall(control, (uint64_t)secret + 0x600, (uint64_t)plain + 0xA00)),
                 HV_STATUS_ACCESS_DENIED);
        hv_check_true("cd_apic_input_secret_no_output", all_bytes(plain + 0xA00, 0xEE, 8));
    }
    /* Input read from the no-access page (a valid request sits there). */
    hv_check("cd_get_regs_input_secret", get_rip_via(secret + 0x40, plain + 0x800), HV_STATUS_ACCESS_DENIED);
    hv_check_true("cd_get_regs_input_secret_no_output", all_bytes(plain + 0x800, 0xEE, 16));
    hv_check("cd_post_input_secret", HV_RESULT_STATUS(vsm_hypercall(HVCALL_POST_MESSAGE, (uint64_t)secret + 0x400, 0)),
             HV_STATUS_ACCESS_DENIED);
    let_interrupts_in();
    hv_check("cd_post_input_secret_nothing_posted", slot->type, HV_MESSAGE_TYPE_NONE);
    /* Input from the read-only page is fine (reading is allowed there). */
    hv_check("cd_get_regs_input_ro_allowed", get_rip_via(ro + 0x40, plain + 0x800), HV_STATUS_SUCCESS);
    hv_check("cd_secret_unchanged", vtl1_compare(secret, secret_copy), 0);
}

static void tlb_lock(void)
{
    uint64_t r[4];
    uint64_t lo = 0;
    hv_check_true("tlb_vtl0_secure_config_denied",
                  hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, &lo, 0) != HV_STATUS_SUCCESS);
    hv_check("tlb_vtl0_flush_unlocked", flush_self(0), HV_STATUS_SUCCESS);
    hv_check("tlb_lock_status", vtl1_op(VSM_OP_USER, U_LOCK, 0, 0, 0, r), HV_STATUS_SUCCESS);
    hv_check("tlb_lock_read_back_in_vtl1", r[1] & HV_VSM_SECURE_TLB_LOCKED, HV_VSM_SECURE_TLB_LOCKED);
    hv_check("tlb_lock_released_by_return", vtl1_op(VSM_OP_USER, U_READ_LOCK, 0, 0, 0, r), HV_STATUS_SUCCESS);
    hv_check("tlb_lock_released_value", r[1] & HV_VSM_SECURE_TLB_LOCKED, 0);
    hv_check("tlb_vtl0_flush_after_release", flush_self(0), HV_STATUS_SUCCESS);
    hv_check("tlb_vtl0_flush_all_after_release", flush_self(HV_FLUSH_ALL_PROCESSORS | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES),
             HV_STATUS_SUCCESS);
    hv_check("tlb_inhibit_status", vtl1_op(VSM_OP_USER, U_INHIBIT, GVA(L_SUP_RW), 0, 0, r), HV_STATUS_SUCCESS);
    hv_check("tlb_inhibit_sets_lock", r[1] & HV_VSM_SECURE_TLB_LOCKED, HV_VSM_SECURE_TLB_LOCKED);
    hv_check("tlb_inhibit_translation", RESULT_CODE(r[2]), HV_XLATE_SUCCESS);
    vtl1_op(VSM_OP_USER, U_READ_LOCK, 0, 0, 0, r);
    hv_check("tlb_inhibit_released_by_return", r[1] & HV_VSM_SECURE_TLB_LOCKED, 0);
    hv_check("tlb_vtl0_flush_after_inhibit", flush_self(0), HV_STATUS_SUCCESS);
    /* Reserved bits of the secure config register are refused. */
    hv_check_true("tlb_secure_config_reserved_rejected",
                  vtl1_op(VSM_OP_SET_REG, HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, 1ull << 5, 0, 0) !=
                      HV_STATUS_SUCCESS);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_misc start\n");
    apic_enable();
    if (!vsm_init(false))
        hv_finish();
    vp = vsm_vp_index();
    set_irq_handler(SINT2_VECTOR, sint2_irq);
    hv_synic_enable(vtl0_simp, vtl0_siefp);
    hv_sint_set(VSMTRACE_LOOPBACK_SINT, SINT2_VECTOR, 0);

    translations();

    /* VTL1 protects the secret (no access) and the read-only page. */
    fill(secret, SECRET_SEED);
    fill(ro, RO_SEED);
    write_get_rip_input(secret + 0x40);
    write_get_rip_input(ro + 0x40);
    write_post_input(secret + 0x400, 64);
    ((uint64_t *)ro)[RO_PTE] = (uint64_t)data0 | PTE_P | PTE_RW; /* a PTE with A/D clear */
    memcpy(secret_copy, secret, HV_PAGE_SIZE);
    memcpy(ro_copy, ro, HV_PAGE_SIZE);
    hv_check("config_enable_protection",
             vtl1_op(VSM_OP_CONFIG, HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL), 0, 0,
                     0, 0),
             HV_STATUS_SUCCESS);
    protect("protect_secret_none", secret, HV_MAP_GPA_NONE);
    protect("protect_ro_read_only", ro, HV_MAP_GPA_READ);
    protected_translations();
    confused_deputy();
    tlb_lock();
    hv_finish();
}
