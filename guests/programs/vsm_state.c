/*
 * vsm_state.c - shared and private state across VTL call/return.
 *
 * Shared (TLFS "Shared registers"): RBX RDX RSI RDI RBP R8-R15 and XMM0-15 both ways
 * (RAX/RCX are the VTL call/return stubs' own registers), CR2, DR0-DR3, VP_INDEX.
 * Private: RSP/RIP (implicitly: both stacks survive), IDTR, syscall/sysenter MSRs,
 * KERNEL_GS_BASE, TSC_AUX, CR8, SIMP, VP assist page, HYPERCALL MSR.
 * Non-fast return reloads RAX/RCX from VtlReturnX64Rax/Rcx; fast return does not.
 */
#include "vsm.h"

#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_CSTAR 0xC0000083u
#define MSR_SFMASK 0xC0000084u
#define MSR_KERNEL_GS_BASE 0xC0000102u
#define MSR_TSC_AUX 0xC0000103u
#define MSR_SYSENTER_ESP 0x175u

static const char *const gpr_names[15] = {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8",
                                          "r9",  "r10", "r11", "r12", "r13", "r14", "r15"};
static const uint32_t private_msrs[] = {MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_KERNEL_GS_BASE,
                                        MSR_SYSENTER_ESP}; /* TSC_AUX: #GP on hosts without RDTSCP */
static const char *const private_msr_names[] = {"star", "lstar", "cstar", "sfmask", "kernel_gs_base",
                                                "sysenter_esp"};

enum { U_RDMSR = 1, U_WRMSR, U_READ_CR2, U_WRITE_CR2, U_READ_DR0, U_WRITE_DR1, U_READ_CR8, U_WRITE_CR8, U_SIDT };

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)vp;
    uint64_t v = 0;
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) t;
    switch (m->arg[0]) {
    case U_RDMSR:
        return rdmsr((uint32_t)m->arg[1]);
    case U_WRMSR:
        return wrmsr_safe((uint32_t)m->arg[1], m->arg[2]) ? 0 : 1;
    case U_READ_CR2:
        return read_cr2();
    case U_WRITE_CR2:
        __asm__ volatile("movq %0, %%cr2" : : "r"(m->arg[1]));
        return 0;
    case U_READ_DR0:
        __asm__ volatile("movq %%dr0, %0" : "=r"(v));
        return v;
    case U_WRITE_DR1:
        __asm__ volatile("movq %0, %%dr1" : : "r"(m->arg[1]));
        return 0;
    case U_READ_CR8:
        __asm__ volatile("movq %%cr8, %0" : "=r"(v));
        return v;
    case U_WRITE_CR8:
        __asm__ volatile("movq %0, %%cr8" : : "r"(m->arg[1]));
        return 0;
    case U_SIDT:
        __asm__ volatile("sidt %0" : "=m"(t));
        return t.base;
    }
    return ~0ull;
}

static uint64_t user(uint64_t sub, uint64_t a, uint64_t b) { return vtl1_op(VSM_OP_USER, sub, a, b, 0, 0); }

static void fill_regs(struct vsm_regs *r, uint64_t seed)
{
    uint64_t *q = (uint64_t *)r;
    for (int i = 0; i < 15; i++)
        q[i] = seed + 0x0101010101010101ull * (uint64_t)(i + 1);
    for (int i = 0; i < 16; i++) {
        r->xmm[i][0] = seed ^ (0x1000ull * (uint64_t)(i + 1));
        r->xmm[i][1] = ~seed ^ (uint64_t)i;
    }
}

static void compare_regs(const char *prefix, const struct vsm_regs *got, const struct vsm_regs *want, bool skip_rax_rcx)
{
    char name[48];
    const uint64_t *g = (const uint64_t *)got, *w = (const uint64_t *)want;
    for (int i = 0; i < 15; i++) {
        if (skip_rax_rcx && (i == 0 || i == 2))
            continue;
        snprintf(name, sizeof(name), "%s_%s", prefix, gpr_names[i]);
        hv_check(name, g[i], w[i]);
    }
    for (int i = 0; i < 16; i++) {
        snprintf(name, sizeof(name), "%s_xmm%d", prefix, i);
        hv_check_true(name, got->xmm[i][0] == want->xmm[i][0] && got->xmm[i][1] == want->xmm[i][1]);
    }
}

static struct vsm_regs load, cap;

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_state start\n");
    if (!vsm_init(false))
        hv_finish();
    uint32_t vp = vsm_vp_index();

    /* VTL0 -> VTL1: every shared register VTL1 sees at entry. */
    fill_regs(&load, 0x1111000000000000ull);
    vsm_mbox[vp].op = VSM_OP_NOP;
    vtl_call_regs(&load, &cap);
    compare_regs("shared_to_vtl1", &vsm_vtl1_entry_regs[vp], &load, true);
    if (vsm_vtl1_entry_regs[vp].xmm[0][0] != load.xmm[0][0])
        printf("  vtl1 saw xmm0=%lx:%lx xmm1=%lx want %lx:%lx; vtl0 after call xmm0=%lx\n",
               vsm_vtl1_entry_regs[vp].xmm[0][0], vsm_vtl1_entry_regs[vp].xmm[0][1],
               vsm_vtl1_entry_regs[vp].xmm[1][0], load.xmm[0][0], load.xmm[0][1], cap.xmm[0][0]);

    /* VTL1 -> VTL0, non-fast: RAX/RCX from VtlReturnX64Rax/Rcx, the rest as VTL1 left them. */
    fill_regs(&vsm_vtl1_load[vp], 0x2222000000000000ull);
    vsm_mbox[vp].op = VSM_OP_SET_RETURN;
    vsm_mbox[vp].arg[0] = 0xAAAA0000AAAA0001ull;
    vsm_mbox[vp].arg[1] = 0xCCCC0000CCCC0002ull;
    vsm_mbox[vp].arg[2] = 0;
    fill_regs(&load, 0x3333000000000000ull);
    vtl_call_regs(&load, &cap);
    compare_regs("shared_to_vtl0", &cap, &vsm_vtl1_load[vp], true);
    hv_check("nonfast_return_rax", cap.rax, 0xAAAA0000AAAA0001ull);
    hv_check("nonfast_return_rcx", cap.rcx, 0xCCCC0000CCCC0002ull);
    hv_check("entry_reason_call", vsm_log[vp].last_reason, HV_ENTRY_VTL_CALL);

    /* Fast return: RAX/RCX are not reloaded; shared registers still travel. */
    fill_regs(&vsm_vtl1_load[vp], 0x4444000000000000ull);
    vsm_mbox[vp].op = VSM_OP_SET_RETURN;
    vsm_mbox[vp].arg[2] = 1;
    vtl_call_regs(&load, &cap);
    hv_check_true("fast_return_rax_not_reloaded", cap.rax != 0xAAAA0000AAAA0001ull);
    hv_check_true("fast_return_rcx_not_reloaded", cap.rcx != 0xCCCC0000CCCC0002ull);
    hv_check("fast_return_shared_r12", cap.r12, vsm_vtl1_load[vp].r12);
    hv_check_true("fast_return_shared_xmm7", cap.xmm[7][0] == vsm_vtl1_load[vp].xmm[7][0]);
    printf("fast return left rax=0x%lx rcx=0x%lx\n", cap.rax, cap.rcx);

    /* Private MSRs: each VTL keeps its own value. */
    for (unsigned i = 0; i < ARRAY_SIZE(private_msrs); i++) {
        uint64_t v0 = 0x10 + i, v1 = 0x20 + i;
        if (private_msrs[i] != MSR_TSC_AUX && private_msrs[i] != MSR_SFMASK) {
            v0 = 0xFFFF800000001000ull + 0x100 * i;
            v1 = 0xFFFF800000002000ull + 0x100 * i;
        }
        char name[48];
        snprintf(name, sizeof(name), "private_msr_%s_write_vtl0", private_msr_names[i]);
        hv_check_true(name, wrmsr_safe(private_msrs[i], v0));
        snprintf(name, sizeof(name), "private_msr_%s_write_vtl1", private_msr_names[i]);
        hv_check(name, user(U_WRMSR, private_msrs[i], v1), 0);
        snprintf(name, sizeof(name), "private_msr_%s_vtl0", private_msr_names[i]);
        hv_check(name, rdmsr(private_msrs[i]), v0);
        snprintf(name, sizeof(name), "private_msr_%s_vtl1", private_msr_names[i]);
        hv_check(name, user(U_RDMSR, private_msrs[i], 0), v1);
        snprintf(name, sizeof(name), "private_msr_%s_vtl1_sees_vtl0", private_msr_names[i]);
        uint64_t ret[4];
        uint32_t hvname = 0;
        switch (private_msrs[i]) {
        case MSR_STAR: hvname = HV_REG_STAR; break;
        case MSR_LSTAR: hvname = HV_REG_LSTAR; break;
        case MSR_CSTAR: hvname = HV_REG_CSTAR; break;
        case MSR_SFMASK: hvname = HV_REG_SFMASK; break;
        case MSR_KERNEL_GS_BASE: hvname = HV_REG_KERNEL_GS_BASE; break;
        case MSR_TSC_AUX: hvname = HV_REG_TSC_AUX; break;
        default: hvname = HV_REG_SYSENTER_ESP; break;
        }
        vtl1_op(VSM_OP_GET_REG, HV_VTL(0), hvname, 0, 0, ret);
        hv_check(name, ret[1], v0);
    }
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr;
    __asm__ volatile("sidt %0" : "=m"(idtr));
    hv_check_true("private_idtr", user(U_SIDT, 0, 0) != idtr.base);
    uint64_t ret[4];
    vtl1_op(VSM_OP_GET_REG, HV_VTL(0), HV_REG_IDTR, 0, 0, ret);
    hv_check("private_idtr_vtl1_sees_vtl0", ret[2], idtr.base);
    vtl1_op(VSM_OP_GET_REG, HV_VTL(0), HV_REG_RSP, 0, 0, ret);
    hv_check_true("vtl1_reads_vtl0_rsp", ret[0] == 0 && ret[1] > (uint64_t)&idtr - 0x4000 && ret[1] < (uint64_t)&idtr + 0x4000);

    /* CR2 and DR0-3 are shared. */
    __asm__ volatile("movq %0, %%cr2" : : "r"(0xC2C2C2C2ull));
    hv_check("shared_cr2_to_vtl1", user(U_READ_CR2, 0, 0), 0xC2C2C2C2ull);
    user(U_WRITE_CR2, 0xD2D2D2D2ull, 0);
    hv_check("shared_cr2_to_vtl0", read_cr2(), 0xD2D2D2D2ull);
    __asm__ volatile("movq %0, %%dr0" : : "r"(0xD0D0ull));
    hv_check("shared_dr0_to_vtl1", user(U_READ_DR0, 0, 0), 0xD0D0ull);
    user(U_WRITE_DR1, 0xD1D1ull, 0);
    uint64_t dr1;
    __asm__ volatile("movq %%dr1, %0" : "=r"(dr1));
    hv_check("shared_dr1_to_vtl0", dr1, 0xD1D1ull);

    /* CR8/TPR is private (each VTL has its own APIC). */
    user(U_WRITE_CR8, 2, 0);
    uint64_t cr8;
    __asm__ volatile("movq %%cr8, %0" : "=r"(cr8));
    hv_check("private_cr8", cr8, 0);
    hv_check("private_cr8_vtl1", user(U_READ_CR8, 0, 0), 2);
    user(U_WRITE_CR8, 0, 0);

    /* Synthetic MSRs: SynIC, assist page and hypercall page are per VTL; VP index is shared. */
    hv_check("private_simp", rdmsr(HV_MSR_SIMP), 0);
    hv_check_true("private_simp_vtl1", user(U_RDMSR, HV_MSR_SIMP, 0) == ((uint64_t)vsm_vtl1_simp(vp) | 1));
    hv_check("private_vp_assist", rdmsr(HV_MSR_VP_ASSIST_PAGE), 0);
    hv_check("private_hypercall_msr", rdmsr(HV_MSR_HYPERCALL) & ~0xFFFull, (uint64_t)hv_hypercall_page);
    hv_check_true("private_hypercall_msr_vtl1",
                  (user(U_RDMSR, HV_MSR_HYPERCALL, 0) & ~0xFFFull) != (uint64_t)hv_hypercall_page);
    hv_check("shared_vp_index", user(U_RDMSR, HV_MSR_VP_INDEX, 0), rdmsr(HV_MSR_VP_INDEX));
    hv_check("entries_only_calls", vsm_log[vp].entries[HV_ENTRY_INTERRUPT], 0);
    hv_finish();
}
