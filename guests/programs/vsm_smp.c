/*
 * vsm_smp.c - VSM on 2 VPs (run with --smp 2).
 *
 * VP0 enables VTL1 (vsm_init); VTL1 enables VTL1 on VP1 (VSM_OP_ENABLE_VP) and VP1 is
 * started in VTL0 with HvCallStartVirtualProcessor (vsm_start_ap).  VP1's VTL0 then
 * serves commands from VP0 through shared memory while both VPs:
 *   - make VTL calls at the same time (per-VP counters; VTL1 checks on each entry that it
 *     runs on its own stack, VP index, VP assist page and sees its VP's shared registers);
 *   - take secure memory intercepts at the same time (each VP's VTL1 gets its own VP's);
 *   - send APIC IPIs to the other VP, which stay in the sender's VTL;
 *   - send PV IPIs across VPs and VTLs (VTL0 -> higher VTL delivered, as the seed does);
 *   - TLB lock: VTL1 on VP1 sets VsmVpSecureConfigVtl0.TlbLocked and stays in VTL1; VP0's
 *     VTL0 flushes VP1 and must not complete before VP1's VTL1 returns (sequence numbers
 *     and reference times); a flush of VP0 alone is not held up;
 *   - protections set by VTL1 on VP1 stop VTL0's writes on VP0 before the hypercall returns.
 */
#include "vsm.h"
#include "apic.h"

#define NVP 2
#define CALLS 64
#define VTL0_VEC_A 0x64 /* PV IPI VTL1 -> VTL0 of the other VP */
#define VTL0_VEC_B 0x65 /* PV IPI VTL0 -> VTL0 */
#define VTL0_VEC_C 0x66 /* PV IPI VTL1 -> VTL0 of both VPs */
#define VTL0_VEC_D 0x67 /* APIC IPI VTL0 -> VTL0 */
#define WAIT_100NS 50000000ull /* 5 s in reference-time units */
#define HOLD_100NS 1000000ull  /* VTL1 holds the TLB lock 100 ms after the flush was issued */

extern uint8_t vtl1_stacks[VSM_MAX_VPS][16384];

/* ---- shared state ------------------------------------------------------------------- */
static volatile uint32_t cmd, cmd_done;
static volatile uint64_t cmd_arg;
static volatile uint32_t ap_up, ap_ok;
static volatile uint32_t vtl0_hits[NVP][256];
static volatile uint32_t go;

/* VTL1 per-VP bookkeeping. */
static volatile uint32_t vtl1_calls[NVP], bad_stack[NVP], bad_index[NVP], bad_assist[NVP], bad_regs[NVP];
static volatile uint32_t in_vtl1, max_in_vtl1;

/* TLB lock handshake. */
static volatile uint32_t seq;
static volatile uint32_t lock_held, flush_issued, flush_done, done_seen_while_held;
static volatile uint32_t seq_issue, seq_release, seq_done;
static volatile uint64_t t_issue, t_release, t_done;
static volatile uint64_t lock_set_status, lock_value;

/* Protection race. */
static uint8_t wpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t ipage[NVP][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static volatile uint32_t writer_stop;
static volatile uint64_t watch_v1, watch_v2, watch_status;

enum { U_COUNT = 1, U_TLB_HOLD, U_PROTECT_WATCH };

static uint64_t regs_tag(uint32_t vp, uint64_t i) { return 0x5A5A000000000000ull | ((uint64_t)vp << 32) | i; }

static uint64_t ref_time(void) { return rdmsr(HV_MSR_TIME_REF_COUNT); }

static bool wait_flag(volatile uint32_t *p, uint32_t want)
{
    uint64_t end = ref_time() + WAIT_100NS;
    while (atomic_load32(p) != want)
        if (ref_time() > end)
            return false;
    return true;
}

/* ---- VTL1 ------------------------------------------------------------------------------- */
static void update_max(uint32_t v)
{
    uint32_t m = max_in_vtl1;
    if (v > m)
        max_in_vtl1 = v;
}

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    switch (m->arg[0]) {
    case U_COUNT: { /* arg1 = call number */
        uint32_t now = atomic_fetch_add32(&in_vtl1, 1) + 1;
        update_max(now);
        uint64_t sp;
        __asm__ volatile("movq %%rsp, %0" : "=r"(sp));
        if (sp < (uint64_t)vtl1_stacks[vp] || sp >= (uint64_t)vtl1_stacks[vp] + sizeof(vtl1_stacks[vp]))
            bad_stack[vp]++;
        if ((uint32_t)rdmsr(HV_MSR_VP_INDEX) != vp)
            bad_index[vp]++;
        if ((rdmsr(HV_MSR_VP_ASSIST_PAGE) & ~0xFFFull) != (uint64_t)vsm_vtl1_assist(vp))
            bad_assist[vp]++;
        const struct vsm_regs *r = &vsm_vtl1_entry_regs[vp];
        if (r->rbx != regs_tag(vp, m->arg[1]) || r->r12 != ~regs_tag(vp, m->arg[1]))
            bad_regs[vp]++;
        vtl1_calls[vp]++;
        for (int i = 0; i < 16; i++)
            cpu_pause(); /* widen the window in which both VPs are in VTL1 */
        atomic_fetch_add32(&in_vtl1, (uint32_t)-1);
        return m->arg[1] * 2 + vp;
    }
    case U_TLB_HOLD: {
        uint64_t lo = 0;
        lock_set_status = hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, HV_VSM_SECURE_TLB_LOCKED, 0);
        hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, &lo, 0);
        lock_value = lo;
        atomic_store32(&lock_held, 1);
        if (wait_flag(&flush_issued, 1)) {
            uint64_t end = ref_time() + HOLD_100NS;
            while (ref_time() < end)
                cpu_pause();
        }
        done_seen_while_held = atomic_load32(&flush_done);
        seq_release = atomic_fetch_add32(&seq, 1);
        t_release = ref_time();
        return 0; /* the VTL return releases the lock */
    }
    case U_PROTECT_WATCH: { /* arg1 = page: make it read-only for VTL0, watch it */
        volatile uint64_t *p = (volatile uint64_t *)m->arg[1];
        watch_status = hv_modify_vtl_protection(m->arg[1], 1, HV_MAP_GPA_READ, HV_VTL_SELF);
        watch_v1 = *p;
        uint64_t end = ref_time() + 200000; /* 20 ms */
        while (ref_time() < end)
            cpu_pause();
        watch_v2 = *p;
        writer_stop = 1;
        return watch_status;
    }
    default:
        return ~0ull;
    }
}

/* ---- VTL0 --------------------------------------------------------------------------- */
static void vtl0_irq(struct int_frame *f)
{
    vtl0_hits[vsm_vp_index() & 1][f->vector & 0xFF]++;
    apic_eoi();
}

static uint16_t pv_ipi(uint32_t vector, uint8_t vtl, uint64_t mask)
{
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST,
                                          vector | ((uint64_t)vtl << 32), mask));
}

static uint16_t flush_vps(uint64_t mask)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = 0;
    in[2] = mask;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)in, 0));
}

static uint64_t user_call(uint32_t vp, uint64_t i)
{
    struct vsm_regs load, capture;
    memset(&load, 0, sizeof(load));
    load.rbx = regs_tag(vp, i);
    load.r12 = ~regs_tag(vp, i);
    struct vsm_mailbox *m = &vsm_mbox[vp];
    m->op = VSM_OP_USER;
    m->arg[0] = U_COUNT;
    m->arg[1] = i;
    m->ret[0] = ~0ull;
    vtl_call_regs(&load, &capture);
    return m->ret[0];
}

/* Each VP: CALLS VTL calls; returns how many came back with the wrong value. */
static uint32_t call_burst(uint32_t vp)
{
    uint32_t wrong = 0;
    for (uint64_t i = 0; i < CALLS; i++)
        if (user_call(vp, i) != i * 2 + vp)
            wrong++;
    return wrong;
}

static volatile uint32_t wrong_calls[NVP];

/* Writes to ipage[vp] (read-only for VTL0): each is intercepted and skipped by VTL1. */
static void intercept_burst(uint32_t vp)
{
    volatile uint64_t *p = (volatile uint64_t *)ipage[vp];
    for (int i = 0; i < 3; i++)
        *p = 0xBAD0 + (uint64_t)i;
}

/* The writer: rdi = page, rsi = stop flag; returns the value it was writing when stopped. */
__asm__(".text\n"
        ".globl writer_loop, writer_out\n"
        "writer_loop:\n"
        "    xorl %eax, %eax\n"
        "1:  incq %rax\n"
        "    movq %rax, (%rdi)\n"
        "    cmpl $0, (%rsi)\n"
        "    je 1b\n"
        "writer_out:\n"
        "    ret\n");
uint64_t writer_loop(volatile void *page, volatile uint32_t *stop);
extern char writer_out[];

enum { C_NONE, C_CALLS, C_INTERCEPT_SETUP, C_INTERCEPT, C_IPI_FROM_VTL1, C_TLB_HOLD, C_PROTECT_WATCH, C_OPEN };

static void ap_command(uint32_t vp, uint32_t c)
{
    switch (c) {
    case C_CALLS:
        while (!go)
            cpu_pause();
        wrong_calls[vp] = call_burst(vp);
        break;
    case C_INTERCEPT_SETUP:
        vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_SKIP, 0, 0, 0, 0);
        break;
    case C_INTERCEPT:
        while (!go)
            cpu_pause();
        intercept_burst(vp);
        break;
    case C_IPI_FROM_VTL1: /* VTL1 on VP1 sends an APIC IPI to VP0 */
        vtl1_op(VSM_OP_SEND_IPI, (uint32_t)cmd_arg, VSM_VTL1_IPI_VECTOR + 3, 0, 0, 0);
        break;
    case C_TLB_HOLD:
        vtl1_op(VSM_OP_USER, U_TLB_HOLD, 0, 0, 0, 0);
        break;
    case C_PROTECT_WATCH:
        while (*(volatile uint64_t *)wpage < 1000)
            cpu_pause();
        vtl1_op(VSM_OP_USER, U_PROTECT_WATCH, (uint64_t)wpage, 0, 0, 0);
        break;
    default:
        break;
    }
}

static void ap_main(uint32_t vp)
{
    ap_ok = vsm_init_ap();
    atomic_store32(&ap_up, 1);
    sti();
    for (;;) {
        uint32_t c = atomic_load32(&cmd);
        if (c == C_NONE) {
            cpu_pause();
            continue;
        }
        ap_command(vp, c);
        atomic_store32(&cmd, C_NONE);
        atomic_inc32(&cmd_done);
    }
}

static uint32_t ap_post(uint32_t c, uint64_t arg)
{
    uint32_t before = atomic_load32(&cmd_done);
    cmd_arg = arg;
    atomic_store32(&cmd, c);
    return before;
}

static bool ap_wait(uint32_t before)
{
    uint64_t end = ref_time() + WAIT_100NS;
    while (atomic_load32(&cmd_done) == before)
        if (ref_time() > end)
            return false;
    return true;
}

static void ap_do(const char *name, uint32_t c, uint64_t arg)
{
    bool ok = ap_wait(ap_post(c, arg));
    if (!ok) {
        printf("FAIL %s: VP1 did not finish command %u\n", name, c);
        hv_failures++;
        hv_finish();
    }
}

/* Let VTL0 interrupts of this VP in until *p reaches want (or time runs out). Interrupts stay
   open for a stretch of PAUSEs, not one instruction boundary: a KVM that emulates guest
   supervisor code (PVM) opens a requested interrupt window only when it looks, which it may
   not do at a single boundary between STI's shadow and the CLI (docs/vsm.md, "Limitations"). */
static bool wait_count(volatile uint32_t *p, uint32_t want)
{
    uint64_t end = ref_time() + WAIT_100NS;
    while (*p < want) {
        sti();
        for (int i = 0; i < 64 && *p < want; i++)
            cpu_pause();
        cli();
        if (ref_time() > end)
            return false;
    }
    return true;
}

static void settle(void)
{
    uint64_t end = ref_time() + 200000; /* 20 ms */
    sti();
    while (ref_time() < end)
        cpu_pause();
    cli();
}

/* ---- the checks -------------------------------------------------------------------- */
static void startup(void)
{
    uint64_t r[4];
    hv_check("vtl1_enable_vp1", vtl1_op(VSM_OP_ENABLE_VP, 1, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    hv_check("vtl1_enable_vp1_again", vtl1_op(VSM_OP_ENABLE_VP, 1, 0, 0, 0, 0), HV_STATUS_INVALID_PARAMETER);
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_VP_STATUS, 1, 1, r);
    hv_check("vp1_status_from_vp0_vtl1", (r[1] >> 16) & 0xFFFF, 3);
    hv_check("start_vp1", vsm_start_ap(1, ap_main), HV_STATUS_SUCCESS);
    hv_check_true("vp1_up", wait_flag(&ap_up, 1));
    hv_check("vp1_first_vtl_call", ap_ok, 1);
    hv_check("vp1_vtl1_ready", vsm_log[1].ready, 1);
    struct hv_initial_vp_context ctx;
    vsm_build_context(&ctx, 0, 0, 0, 0, 0, 0);
    hv_check("start_vp1_again", hv_start_vp(1, 0, &ctx), HV_STATUS_INVALID_VP_STATE);
}

static void concurrent_calls(void)
{
    uint32_t before_entries[NVP];
    for (int v = 0; v < NVP; v++)
        before_entries[v] = vsm_log[v].entries[HV_ENTRY_VTL_CALL];
    go = 0;
    uint32_t b = ap_post(C_CALLS, 0);
    go = 1;
    wrong_calls[0] = call_burst(0);
    hv_check_true("calls_vp1_done", ap_wait(b));
    hv_check("calls_vp0_results", wrong_calls[0], 0);
    hv_check("calls_vp1_results", wrong_calls[1], 0);
    hv_check("calls_vp0_count", vtl1_calls[0], CALLS);
    hv_check("calls_vp1_count", vtl1_calls[1], CALLS);
    hv_check("calls_vp0_entries", vsm_log[0].entries[HV_ENTRY_VTL_CALL] - before_entries[0], CALLS);
    hv_check("calls_vp1_entries", vsm_log[1].entries[HV_ENTRY_VTL_CALL] - before_entries[1], CALLS);
    hv_check("calls_vtl1_private_stack", bad_stack[0] + bad_stack[1], 0);
    hv_check("calls_vtl1_vp_index", bad_index[0] + bad_index[1], 0);
    hv_check("calls_vtl1_private_assist_page", bad_assist[0] + bad_assist[1], 0);
    hv_check("calls_shared_regs_per_vp", bad_regs[0] + bad_regs[1], 0);
    printf("both VPs in VTL1 at once: up to %u\n", max_in_vtl1);
}

static void concurrent_intercepts(void)
{
    hv_check("config_enable_protection",
             vtl1_op(VSM_OP_CONFIG, HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL), 0, 0,
                     0, 0),
             HV_STATUS_SUCCESS);
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_SKIP, 0, 0, 0, 0);
    ap_do("intercept_setup", C_INTERCEPT_SETUP, 0);
    for (int v = 0; v < NVP; v++) {
        *(volatile uint64_t *)ipage[v] = 0x600D0 + (uint64_t)v;
        hv_check("protect_intercept_page", vtl1_op(VSM_OP_PROTECT, (uint64_t)ipage[v], 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0),
                 HV_STATUS_SUCCESS);
    }
    uint32_t before[NVP] = {vsm_log[0].intercepts, vsm_log[1].intercepts};
    go = 0;
    uint32_t b = ap_post(C_INTERCEPT, 0);
    go = 1;
    intercept_burst(0);
    hv_check_true("intercepts_vp1_done", ap_wait(b));
    for (int v = 0; v < NVP; v++) {
        const struct hv_gpa_intercept *m = (const struct hv_gpa_intercept *)&vsm_log[v].last_msg;
        char name[48];
        snprintf(name, sizeof(name), "intercepts_vp%d_count", v);
        hv_check(name, vsm_log[v].intercepts - before[v], 3);
        snprintf(name, sizeof(name), "intercepts_vp%d_msg_vp_index", v);
        hv_check(name, m->vp_index, (uint64_t)v);
        snprintf(name, sizeof(name), "intercepts_vp%d_msg_gpa", v);
        hv_check(name, m->gpa & ~0xFFFull, (uint64_t)ipage[v]);
        snprintf(name, sizeof(name), "intercepts_vp%d_msg_write", v);
        hv_check(name, m->access_type, HV_INTERCEPT_WRITE);
        snprintf(name, sizeof(name), "intercepts_vp%d_no_effect", v);
        hv_check(name, *(volatile uint64_t *)ipage[v], 0x600D0 + (uint64_t)v);
    }
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);
}

static void apic_ipis(void)
{
    for (int v = VTL0_VEC_A; v <= VTL0_VEC_D; v++)
        set_irq_handler((uint8_t)v, vtl0_irq);
    for (int v = 0; v < 4; v++)
        set_irq_handler(VSM_VTL1_IPI_VECTOR + v, vtl0_irq); /* would count a VTL1 vector leaking into VTL0 */
    uint32_t vp1_apic = 1;
    /* VTL1 on VP0 -> VTL1 on VP1 (VP1 is spinning in VTL0 with IF=1). */
    vtl1_op(VSM_OP_SEND_IPI, vp1_apic, VSM_VTL1_IPI_VECTOR + 1, 0, 0, 0);
    hv_check_true("apic_ipi_vtl1_cross_vp_delivered", wait_count(&vsm_log[1].ipi_irqs[1], 1));
    hv_check("apic_ipi_vtl1_cross_vp_entry_reason", vsm_log[1].last_reason, HV_ENTRY_INTERRUPT);
    /* VTL0 on VP0 -> VTL0 on VP1. */
    apic_send_ipi(vp1_apic, VTL0_VEC_D, APIC_DM_FIXED, APIC_DEST_NONE);
    hv_check_true("apic_ipi_vtl0_cross_vp_delivered", wait_count(&vtl0_hits[1][VTL0_VEC_D], 1));
    /* VTL1 on VP1 -> VTL1 on VP0 (VP0 sits in VTL0). */
    ap_do("apic_ipi_vtl1_from_vp1", C_IPI_FROM_VTL1, 0);
    hv_check_true("apic_ipi_vtl1_vp1_to_vp0_delivered", wait_count(&vsm_log[0].ipi_irqs[3], 1));
    /* VTL0 on VP0 sends VTL1's vector number to VP1: VTL0's handler, not VTL1's. */
    apic_send_ipi(vp1_apic, VSM_VTL1_IPI_VECTOR + 2, APIC_DM_FIXED, APIC_DEST_NONE);
    hv_check_true("apic_ipi_vtl0_vector_a2_delivered", wait_count(&vtl0_hits[1][VSM_VTL1_IPI_VECTOR + 2], 1));
    settle();
    hv_check("apic_ipi_vtl1_stays_in_vtl1", vtl0_hits[1][VSM_VTL1_IPI_VECTOR + 1], 0);
    hv_check("apic_ipi_vtl1_stays_in_vtl1_vp0", vtl0_hits[0][VSM_VTL1_IPI_VECTOR + 3], 0);
    hv_check("apic_ipi_vtl0_stays_in_vtl0", vsm_log[1].ipi_irqs[2], 0);
    hv_check("apic_ipi_vtl1_exactly_once", vsm_log[1].ipi_irqs[1], 1);
    hv_check("apic_ipi_vtl0_exactly_once", vtl0_hits[1][VTL0_VEC_D], 1);
}

static void pv_ipis(void)
{
    /* VTL1 on VP0 -> VTL0 on VP1. */
    hv_check("pv_ipi_vtl1_to_vp1_vtl0_status", vtl1_op(VSM_OP_PV_IPI, VTL0_VEC_A, HV_VTL(0), 1ull << 1, 0, 0),
             HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl1_to_vp1_vtl0_delivered", wait_count(&vtl0_hits[1][VTL0_VEC_A], 1));
    /* VTL1 on VP0 -> VTL1 on VP1. */
    hv_check("pv_ipi_vtl1_to_vp1_vtl1_status",
             vtl1_op(VSM_OP_PV_IPI, VSM_VTL1_IPI_VECTOR + 0, HV_VTL_SELF, 1ull << 1, 0, 0), HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl1_to_vp1_vtl1_delivered", wait_count(&vsm_log[1].ipi_irqs[0], 1));
    /* VTL0 on VP0 -> VTL1 on VP1: delivered (seed; docs/vsm.md). */
    hv_check("pv_ipi_vtl0_to_vp1_vtl1_status", pv_ipi(VSM_VTL1_IPI_VECTOR + 0, HV_VTL(1), 1ull << 1),
             HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl0_to_vp1_vtl1_delivered", wait_count(&vsm_log[1].ipi_irqs[0], 2));
    /* VTL0 on VP0 -> VTL0 on VP1. */
    hv_check("pv_ipi_vtl0_to_vp1_status", pv_ipi(VTL0_VEC_B, HV_VTL_SELF, 1ull << 1), HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl0_to_vp1_delivered", wait_count(&vtl0_hits[1][VTL0_VEC_B], 1));
    /* VTL1 on VP0 -> VTL0 on both VPs. */
    hv_check("pv_ipi_vtl1_to_all_vtl0_status", vtl1_op(VSM_OP_PV_IPI, VTL0_VEC_C, HV_VTL(0), 3, 0, 0),
             HV_STATUS_SUCCESS);
    hv_check_true("pv_ipi_vtl1_to_all_vtl0_vp0", wait_count(&vtl0_hits[0][VTL0_VEC_C], 1));
    hv_check_true("pv_ipi_vtl1_to_all_vtl0_vp1", wait_count(&vtl0_hits[1][VTL0_VEC_C], 1));
    settle();
    hv_check("pv_ipi_vtl1_exactly_twice", vsm_log[1].ipi_irqs[0], 2);
    hv_check("pv_ipi_vtl1_to_vtl0_not_in_vtl1", vtl0_hits[1][VSM_VTL1_IPI_VECTOR + 0], 0);
    hv_check("pv_ipi_exactly_once", vtl0_hits[1][VTL0_VEC_A] + vtl0_hits[1][VTL0_VEC_B] + vtl0_hits[1][VTL0_VEC_C], 3);
}

static void tlb_lock(void)
{
    uint64_t r[4];
    lock_held = flush_issued = flush_done = 0;
    uint32_t b = ap_post(C_TLB_HOLD, 0);
    hv_check_true("tlb_vp1_vtl1_holds_lock", wait_flag(&lock_held, 1));
    hv_check("tlb_vp1_lock_set_status", lock_set_status, HV_STATUS_SUCCESS);
    hv_check("tlb_vp1_lock_read_back", lock_value & HV_VSM_SECURE_TLB_LOCKED, HV_VSM_SECURE_TLB_LOCKED);
    /* VP0's VTL1 sees VP1's lock (GetVpRegisters of VP1, VTL1). */
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, 1, 1, r);
    hv_check("tlb_vp0_vtl1_sees_vp1_lock", r[1] & HV_VSM_SECURE_TLB_LOCKED, HV_VSM_SECURE_TLB_LOCKED);
    /* A flush of VP0 alone is not held up by VP1's lock. */
    hv_check("tlb_flush_other_vp_status", flush_vps(1ull << 0), HV_STATUS_SUCCESS);
    hv_check("tlb_flush_other_vp_not_blocked", atomic_load32(&seq), 0);
    /* The flush of VP1 waits for VP1's VTL1 to return. */
    seq_issue = atomic_fetch_add32(&seq, 1);
    t_issue = ref_time();
    atomic_store32(&flush_issued, 1);
    uint16_t st = flush_vps(1ull << 1);
    seq_done = atomic_fetch_add32(&seq, 1);
    t_done = ref_time();
    atomic_store32(&flush_done, 1);
    hv_check_true("tlb_vp1_command_done", ap_wait(b));
    hv_check("tlb_flush_locked_vp_status", st, HV_STATUS_SUCCESS);
    hv_check("tlb_flush_not_done_while_locked", done_seen_while_held, 0);
    hv_check_true("tlb_flush_order_issue_release_done", seq_issue < seq_release && seq_release < seq_done);
    hv_check_true("tlb_flush_done_after_release_time", t_done >= t_release);
    hv_check_true("tlb_flush_waited", t_done - t_issue >= HOLD_100NS / 2);
    printf("flush of the locked VP took %lu us (VTL1 held the lock %lu us after it was issued)\n",
           (t_done - t_issue) / 10, (t_release - t_issue) / 10);
    vtl1_op(VSM_OP_GET_REG, HV_VTL_SELF, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, 1, 1, r);
    hv_check("tlb_vp1_lock_released", r[1] & HV_VSM_SECURE_TLB_LOCKED, 0);
    hv_check("tlb_flush_vp1_after_release", flush_vps(1ull << 1), HV_STATUS_SUCCESS);
}

static void protection_race(void)
{
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_SET_RIP, (uint64_t)writer_out, 0, 0, 0);
    uint32_t before = vsm_log[0].intercepts;
    writer_stop = 0;
    *(volatile uint64_t *)wpage = 0;
    uint32_t b = ap_post(C_PROTECT_WATCH, 0);
    uint64_t last = writer_loop(wpage, &writer_stop);
    hv_check_true("protect_vp1_command_done", ap_wait(b));
    hv_check("protect_cross_vp_status", watch_status, HV_STATUS_SUCCESS);
    hv_check_true("protect_cross_vp_writer_was_running", watch_v1 >= 1000);
    hv_check("protect_cross_vp_no_write_after_return", watch_v2, watch_v1);
    hv_check("protect_cross_vp_intercepted", vsm_log[0].intercepts - before, 1);
    const struct hv_gpa_intercept *m = (const struct hv_gpa_intercept *)&vsm_log[0].last_msg;
    hv_check("protect_cross_vp_msg_gpa", m->gpa, (uint64_t)wpage);
    hv_check("protect_cross_vp_msg_vp", m->vp_index, 0);
    hv_check("protect_cross_vp_denied_value", last, watch_v1 + 1);
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);
    hv_check("protect_cross_vp_restore",
             vtl1_op(VSM_OP_PROTECT, (uint64_t)wpage, 1, HV_MAP_GPA_ALL, HV_VTL_SELF, 0), HV_STATUS_SUCCESS);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_smp start\n");
    apic_enable();
    if (!vsm_init(false))
        hv_finish();
    startup();
    if (!ap_up)
        hv_finish();
    concurrent_calls();
    concurrent_intercepts();
    apic_ipis();
    pv_ipis();
    tlb_lock();
    protection_race();
    hv_finish();
}
