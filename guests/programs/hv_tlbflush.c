/*
 * hv_tlbflush.c - a PTE change on VP 0 made visible on VP 1 by the flush hypercalls.
 *
 * VA 4 GiB is mapped through our own PD/PT (PDPT entry 4, beside the runtime's 0-4 GiB
 * identity map) to page A or page B. VP 1 keeps reading the VA (so its TLB holds the
 * translation); VP 0 rewrites the PTE, flushes VP 1 with HvCallFlushVirtualAddressSpace,
 * ...List and ...SpaceEx, and VP 1 must then read the new page.
 */
#include "hv.h"
#include "smp.h"

#define TEST_VA 0x100000000ull
#define PTE_P 1ull
#define PTE_W 2ull

static uint64_t pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_a[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_b[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t hc_in[64] __attribute__((aligned(HV_PAGE_SIZE)));

static volatile uint32_t cmd, ack;
static volatile uint64_t ap_seen;

static inline uint64_t read_va(void) { return *(volatile uint64_t *)TEST_VA; }
static inline void invlpg(uint64_t va) { __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory"); }

static void ap_main(int cpu)
{
    (void)cpu;
    uint32_t seen_cmd = 0;
    for (;;) {
        uint64_t v = read_va(); /* keep the translation hot */
        uint32_t c = atomic_load32(&cmd);
        if (c != seen_cmd) {
            seen_cmd = c;
            ap_seen = read_va();
            atomic_store32(&ack, c);
        }
        (void)v;
        cpu_pause();
    }
}

/* Ask VP 1 to read the VA now; returns what it saw. */
static uint64_t ap_read(void)
{
    uint32_t c = atomic_load32(&cmd) + 1;
    atomic_store32(&cmd, c);
    uint64_t start = rdtsc();
    while (atomic_load32(&ack) != c)
        if (rdtsc() - start > smp_timeout_tsc) {
            printf("VP 1 did not answer\n");
            return 0;
        }
    return ap_seen;
}

static void map_to(uint64_t *page)
{
    pt[0] = (uint64_t)page | PTE_P | PTE_W;
    invlpg(TEST_VA); /* this VP only */
}

static const char *which(uint64_t v)
{
    return v == page_a[0] ? "A" : v == page_b[0] ? "B" : "?";
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    page_a[0] = 0xAAAAAAAA00000001ull;
    page_b[0] = 0xBBBBBBBB00000002ull;
    uint64_t *pml4 = (uint64_t *)(read_cr3() & ~0xFFFull);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & 0x000FFFFFFFFFF000ull);
    pd[0] = (uint64_t)pt | PTE_P | PTE_W;
    pt[0] = (uint64_t)page_a | PTE_P | PTE_W;
    pdpt[4] = (uint64_t)pd | PTE_P | PTE_W;
    hv_check("bsp_reads_a", read_va(), page_a[0]);
    hv_check("cpus_up", smp_start_aps(2, ap_main), 2);
    hv_check("vp1_reads_a", ap_read(), page_a[0]);

    /* 1. FlushVirtualAddressSpace, processor mask = VP 1. */
    map_to(page_b);
    hc_in[0] = 0;
    hc_in[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    hc_in[2] = 1ull << 1;
    hv_check("flush_space_status",
             HV_RESULT_STATUS(hv_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)hc_in, 0)), HV_STATUS_SUCCESS);
    uint64_t v = ap_read();
    printf("after flush space VP 1 reads %s\n", which(v));
    hv_check("flush_space_vp1_sees_b", v, page_b[0]);

    /* 2. FlushVirtualAddressList with the VA, all processors. */
    map_to(page_a);
    hc_in[0] = 0;
    hc_in[1] = HV_FLUSH_ALL_PROCESSORS;
    hc_in[2] = 0;
    hc_in[3] = TEST_VA; /* one page */
    uint64_t r = hv_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | HV_CONTROL_REP_COUNT(1), (uint64_t)hc_in, 0);
    hv_check("flush_list_status", HV_RESULT_STATUS(r), HV_STATUS_SUCCESS);
    hv_check("flush_list_reps", HV_RESULT_REPS(r), 1);
    v = ap_read();
    printf("after flush list VP 1 reads %s\n", which(v));
    hv_check("flush_list_vp1_sees_a", v, page_a[0]);

    /* 3. FlushVirtualAddressSpaceEx, sparse VP set {1}, fast with XMM input. */
    map_to(page_b);
    uint64_t regs[HV_XMM_REGS] = {0};
    regs[0] = 0;
    regs[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    regs[2] = HV_GENERIC_SET_SPARSE_4K;
    regs[3] = 1;
    regs[4] = 1ull << 1;
    r = hv_xmm_call(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX | HV_CONTROL_VAR_HEADER(1), regs);
    hv_check("flush_space_ex_status", HV_RESULT_STATUS(r), HV_STATUS_SUCCESS);
    v = ap_read();
    printf("after flush space ex VP 1 reads %s\n", which(v));
    hv_check("flush_space_ex_vp1_sees_b", v, page_b[0]);

    /* 4. Fast FlushVirtualAddressSpace with the mask in registers is 24 bytes: XMM input. */
    map_to(page_a);
    memset(regs, 0, sizeof(regs));
    regs[0] = 0;
    regs[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    regs[2] = 1ull << 1;
    r = hv_xmm_call(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, regs);
    hv_check("flush_space_fast_status", HV_RESULT_STATUS(r), HV_STATUS_SUCCESS);
    v = ap_read();
    hv_check("flush_space_fast_vp1_sees_a", v, page_a[0]);

    /* Informational: without any flush VP 1 may keep the old translation. */
    map_to(page_b);
    printf("without a flush VP 1 reads %s\n", which(ap_read()));
    hv_finish();
}
