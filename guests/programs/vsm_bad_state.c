/*
 * vsm_bad_state.c - register state no CPU can hold, from the guest (found by the fuzz campaign,
 * docs/fuzzing.md): HvCallSetVpRegisters of CR0/CR3/CR4/EFER and the initial contexts of
 * HvCallEnableVpVtl / HvCallStartVirtualProcessor are refused with a status (KVM_SET_SREGS
 * used to fail inside the handler: a VMM internal error), and leave the VP as it was.
 *
 * Run with --smp 2.  Output: "ok <check>" / "FAIL <check>: ..." lines, then hv_finish().
 */
#include "vsm.h"

#define BAD_CASES 5
static const char *const names[BAD_CASES] = {"pg_without_pe", "cr0_high_bits", "cr4_reserved", "cs_long_outside_long_mode",
                                             "cr3_beyond_ram"};
static volatile uint32_t ap_ran;
static uint8_t ctx_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

static void spoil(struct hv_initial_vp_context *c, int k)
{
    switch (k) {
    case 0: c->cr0 = (c->cr0 | 0x80000000ull) & ~1ull; break;
    case 1: c->cr0 |= 1ull << 40; break;
    case 2: c->cr4 |= 1ull << 28; break;
    case 3: c->efer &= ~((1ull << 8) | (1ull << 10)); break; /* CS.L stays set */
    default: c->cr3 = 1ull << 40; break;
    }
}

static void ap_fn(uint32_t vp)
{
    (void)vp;
    atomic_store32(&ap_ran, 1);
    cli();
    for (;;)
        hlt();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!vsm_init(false))
        hv_finish();
    char n[96];
    uint64_t r[4];
    /* SetVpRegisters (VTL1 on VTL0 of this VP): each bad value refused, the register unchanged */
    const uint32_t regs[BAD_CASES] = {HV_REG_CR0, HV_REG_CR0, HV_REG_CR4, HV_REG_EFER, HV_REG_CR3};
    for (int k = 0; k < BAD_CASES; k++) {
        struct hv_initial_vp_context now;
        vsm_build_context(&now, 0, 0, 0, 0, 0, 0);
        struct hv_initial_vp_context bad = now;
        spoil(&bad, k);
        uint64_t value = regs[k] == HV_REG_CR0 ? bad.cr0 : regs[k] == HV_REG_CR4 ? bad.cr4
                         : regs[k] == HV_REG_EFER ? bad.efer : bad.cr3;
        uint64_t was = regs[k] == HV_REG_CR0 ? now.cr0 : regs[k] == HV_REG_CR4 ? now.cr4
                       : regs[k] == HV_REG_EFER ? now.efer : now.cr3;
        snprintf(n, sizeof(n), "set_%s_refused", names[k]);
        hv_check(n, vtl1_op(VSM_OP_SET_REG, HV_VTL(0), regs[k], value, 0, r), HV_STATUS_INVALID_REGISTER_VALUE);
        vtl1_op(VSM_OP_GET_REG, HV_VTL(0), regs[k], 0, 0, r);
        snprintf(n, sizeof(n), "set_%s_unchanged", names[k]);
        hv_check(n, r[1], was);
    }
    /* MSR-backed registers: a value WRMSR would refuse (non-canonical LSTAR, the fuzz campaign's
       seed 1010) is INVALID_REGISTER_VALUE and leaves the register as it was, never a VMM error */
    vtl1_op(VSM_OP_GET_REG, HV_VTL(0), HV_REG_LSTAR, 0, 0, r);
    uint64_t lstar = r[1];
    hv_check("set_lstar_noncanonical_refused",
             vtl1_op(VSM_OP_SET_REG, HV_VTL(0), HV_REG_LSTAR, 0x06B25A1B00000003ull, 0, r), HV_STATUS_INVALID_REGISTER_VALUE);
    vtl1_op(VSM_OP_GET_REG, HV_VTL(0), HV_REG_LSTAR, 0, 0, r);
    hv_check("set_lstar_noncanonical_unchanged", r[1], lstar);
    hv_check("set_lstar_canonical_ok",
             vtl1_op(VSM_OP_SET_REG, HV_VTL(0), HV_REG_LSTAR, 0xFFFF800000001000ull, 0, r), HV_STATUS_SUCCESS);
    vtl1_op(VSM_OP_GET_REG, HV_VTL(0), HV_REG_LSTAR, 0, 0, r);
    hv_check("set_lstar_canonical_readback", r[1], 0xFFFF800000001000ull);
    /* EnableVpVtl (VTL1 enables VP1) and StartVirtualProcessor (VP1 in VTL0) with bad contexts */
    for (int k = 0; k < BAD_CASES; k++) {
        struct hv_initial_vp_context ctx;
        vsm_vtl1_context(&ctx, 1);
        spoil(&ctx, k);
        memset(ctx_page, 0, 16);
        ((uint64_t *)ctx_page)[0] = HV_PARTITION_ID_SELF;
        *(uint32_t *)(ctx_page + 8) = 1;
        ctx_page[12] = 1;
        memcpy(ctx_page + 16, &ctx, sizeof(ctx));
        snprintf(n, sizeof(n), "enable_vp_vtl_%s_refused", names[k]);
        hv_check(n, vtl1_op(VSM_OP_HYPERCALL, HVCALL_ENABLE_VP_VTL, (uint64_t)ctx_page, 0, 0, 0) & 0xFFFF,
                 HV_STATUS_INVALID_PARAMETER);
    }
    hv_check("enable_vp_vtl_good", vtl1_op(VSM_OP_ENABLE_VP, 1, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    for (int k = 0; k < BAD_CASES; k++) {
        struct hv_initial_vp_context ctx;
        vsm_build_context(&ctx, (uint64_t)ap_fn, 0, 0, 0, 0, 0);
        spoil(&ctx, k);
        snprintf(n, sizeof(n), "start_vp_%s_refused", names[k]);
        hv_check(n, hv_start_vp(1, 0, &ctx), HV_STATUS_INVALID_PARAMETER);
    }
    hv_check("start_vp_good_after_refusals", vsm_start_ap(1, ap_fn), HV_STATUS_SUCCESS);
    uint64_t end = hv_ref_time() + 50000000ull;
    while (!atomic_load32(&ap_ran) && hv_ref_time() < end)
        cpu_pause();
    hv_check("started_vp_runs", atomic_load32(&ap_ran), 1);
    hv_finish();
}
