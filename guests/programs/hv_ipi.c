/*
 * hv_ipi.c - PV IPIs (HvCallSendSyntheticClusterIpi / Ex) to single and multiple VPs,
 * VP_INDEX and GetVpIndexFromApicId on every VP, hypercalls made by APs.
 *
 * cmdline: cpus=N (3..8, default 4).
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define MAX 8
#define V_ONE 0x60
#define V_MANY 0x61
#define V_EX 0x62
#define V_ALL 0x63
#define NV 4

static volatile uint32_t got[MAX][NV];
static volatile uint64_t ap_vp_index[MAX];
static volatile uint64_t ap_call_result[MAX];
static volatile uint32_t ap_ready;

static void ipi_irq(struct int_frame *f)
{
    int cpu = smp_cpu_id();
    if (cpu < MAX)
        atomic_inc32(&got[cpu][f->vector - V_ONE]);
    apic_eoi();
}

static void ap_main(int cpu)
{
    ap_vp_index[cpu] = rdmsr(HV_MSR_VP_INDEX);
    ap_call_result[cpu] = hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, 1, 0);
    atomic_inc32(&ap_ready);
    for (;;)
        sti_hlt();
}

static void settle(void)
{
    uint64_t start = rdtsc();
    sti();
    while (rdtsc() - start < 30000000)
        (void)hv_ref_time(); /* exits with IF=1 let the BSP's own IPIs in */
    cli();
}

static uint64_t ipi(uint8_t vector, uint8_t vtl, uint64_t mask)
{
    uint64_t r = hv_fast(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI, vector | ((uint64_t)vtl << 32), mask);
    settle();
    return HV_RESULT_STATUS(r);
}

/* Got exactly want[cpu] of vector v on every CPU? */
static void check_counts(const char *name, int n, int v, const uint32_t *want)
{
    int good = 0;
    for (int cpu = 0; cpu < n; cpu++) {
        uint32_t g = atomic_load32(&got[cpu][v]);
        if (g == want[cpu])
            good++;
        else
            printf("%s: cpu %d got %u want %u\n", name, cpu, g, want[cpu]);
    }
    hv_check(name, good, n);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    int n = (int)cmdline_get_uint("cpus", 4);
    if (n < 3 || n > MAX) {
        printf("hv_ipi needs 3 <= cpus <= %d\n", MAX);
        return 1;
    }
    if (!hv_init())
        qemu_exit(2);
    apic_enable();
    for (int v = V_ONE; v < V_ONE + NV; v++)
        set_irq_handler((uint8_t)v, ipi_irq);
    hv_check("cpus_up", smp_start_aps(n, ap_main), n);
    uint64_t start = rdtsc();
    while (atomic_load32(&ap_ready) < (uint32_t)n - 1 && rdtsc() - start < smp_timeout_tsc)
        cpu_pause();
    int idx_ok = 0, call_ok = 0;
    for (int cpu = 1; cpu < n; cpu++) {
        idx_ok += ap_vp_index[cpu] == (uint64_t)cpu;
        call_ok += HV_RESULT_STATUS(ap_call_result[cpu]) == HV_STATUS_SUCCESS;
    }
    hv_check("ap_vp_index", idx_ok, n - 1);
    hv_check("ap_hypercalls", call_ok, n - 1);
    hv_check("bsp_vp_index", rdmsr(HV_MSR_VP_INDEX), 0);

    /* GetVpIndexFromApicId for every APIC id. */
    static uint64_t in[8] __attribute__((aligned(64)));
    static uint32_t out[MAX] __attribute__((aligned(64)));
    in[0] = HV_PARTITION_ID_SELF;
    in[1] = 0;
    uint32_t *ids = (uint32_t *)&in[2];
    for (int i = 0; i < n; i++)
        ids[i] = (uint32_t)i;
    uint64_t r = hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(n), (uint64_t)in, (uint64_t)out);
    int map_ok = 0;
    for (int i = 0; i < n; i++)
        map_ok += out[i] == (uint32_t)i;
    hv_check("apic_id_to_vp_index_status", HV_RESULT_STATUS(r), HV_STATUS_SUCCESS);
    hv_check("apic_id_to_vp_index_all", map_ok, n);
    ids[0] = (uint32_t)n; /* no such VP */
    r = hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1), (uint64_t)in, (uint64_t)out);
    hv_check("apic_id_beyond_vps", HV_RESULT_STATUS(r), HV_STATUS_INVALID_PARAMETER);

    uint32_t want[MAX] = {0};
    /* Single VP. */
    hv_check("ipi_single_status", ipi(V_ONE, 0, 1ull << 1), HV_STATUS_SUCCESS);
    want[1] = 1;
    check_counts("ipi_single_vp1", n, 0, want);
    /* Several VPs, the caller among them; bits beyond the partition are ignored. */
    uint64_t mask = (1ull << 0) | (1ull << (n - 1)) | (1ull << (n - 2)) | (1ull << 40);
    hv_check("ipi_multi_status", ipi(V_MANY, 0, mask), HV_STATUS_SUCCESS);
    memset(want, 0, sizeof(want));
    want[0] = want[n - 1] = want[n - 2] = 1;
    check_counts("ipi_multi_vps", n, 1, want);

    /* Ex form, XMM input: a sparse VP set of every AP (bank 0). */
    uint64_t regs[HV_XMM_REGS] = {0};
    regs[0] = V_EX;                                  /* vector, target vtl 0 */
    regs[1] = HV_GENERIC_SET_SPARSE_4K;              /* format */
    regs[2] = 1;                                     /* valid banks */
    regs[3] = ((1ull << n) - 1) & ~1ull;             /* bank 0: APs */
    r = hv_xmm_call(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX | HV_CONTROL_VAR_HEADER(1), regs);
    settle();
    hv_check("ipi_ex_sparse_status", HV_RESULT_STATUS(r), HV_STATUS_SUCCESS);
    for (int cpu = 0; cpu < n; cpu++)
        want[cpu] = cpu ? 1 : 0;
    check_counts("ipi_ex_sparse_vps", n, 2, want);
    /* Ex form with the ALL format: every VP, the caller included. */
    memset(regs, 0, sizeof(regs));
    regs[0] = V_ALL;
    regs[1] = HV_GENERIC_SET_ALL;
    r = hv_xmm_call(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX, regs);
    settle();
    hv_check("ipi_ex_all_status", HV_RESULT_STATUS(r), HV_STATUS_SUCCESS);
    for (int cpu = 0; cpu < n; cpu++)
        want[cpu] = 1;
    check_counts("ipi_ex_all_vps", n, 3, want);

    /* Bad input. */
    hv_check("ipi_vector_too_low", ipi(0x0F, 0, 2), HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("ipi_target_vtl_reserved", ipi(V_ONE, 0xE0, 2), HV_STATUS_INVALID_PARAMETER);
    /* VTL1 is not enabled for this partition (a PV IPI may target an enabled higher VTL). */
    hv_check("ipi_target_vtl_higher", ipi(V_ONE, HV_INPUT_VTL_USE_TARGET | 1, 2), HV_STATUS_INVALID_PARAMETER);
    memset(regs, 0, sizeof(regs));
    regs[0] = V_EX;
    regs[1] = 5; /* unknown set format */
    hv_check("ipi_ex_bad_format", HV_RESULT_STATUS(hv_xmm_call(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX, regs)),
             HV_STATUS_INVALID_PARAMETER);
    hv_check("ipi_single_not_repeated", atomic_load32(&got[1][0]), 1);
    hv_finish();
}
