/*
 * vsm_c10_flushflags.c - issue 12 item 10: flush hypercalls whose flags word has garbage in
 * the undefined bits (63:32, as from an uninitialised struct) are accepted and the bits
 * ignored (KVM does; guests in the wild rely on it): HvCallFlushVirtualAddressSpace, List
 * and the Ex forms, from VTL0 and from VTL1, on 2 VPs. The flush still works: VP1 sees a
 * remapped page after VP0 flushed it with such a flags word. The pytest side finds the
 * garbage in the HYPERCALL events' input column of the trace.
 */
#include "vsm_compat.h"

#define GARBAGE 0xA5A5A5A500000000ull
#define TEST_VA 0x100000000ull
#define PTE_P 1ull
#define PTE_W 2ull

static uint64_t pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_a[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t page_b[512] __attribute__((aligned(HV_PAGE_SIZE)));

static uint16_t flush_space(uint64_t flags, uint64_t mask)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = flags;
    in[2] = mask;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)in, 0));
}

static uint16_t flush_list(uint64_t flags, uint64_t mask)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = flags;
    in[2] = mask;
    in[3] = TEST_VA; /* one page */
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | HV_CONTROL_REP_COUNT(1), (uint64_t)in, 0));
}

static uint16_t flush_space_ex(uint64_t flags, uint64_t mask)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = flags;
    in[2] = 0; /* sparse VP set */
    in[3] = 1; /* bank 0 */
    in[4] = mask;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX | HV_CONTROL_VAR_HEADER(1), (uint64_t)in, 0));
}

static uint16_t flush_list_ex(uint64_t flags, uint64_t mask)
{
    uint64_t *in = vsm_in_page();
    in[0] = 0;
    in[1] = flags;
    in[2] = 0;
    in[3] = 1;
    in[4] = mask;
    in[5] = TEST_VA;
    return HV_RESULT_STATUS(vsm_hypercall(
        HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX | HV_CONTROL_VAR_HEADER(1) | HV_CONTROL_REP_COUNT(1), (uint64_t)in, 0));
}

static volatile uint64_t vp1_seen;
static void vp1_read(uint64_t unused)
{
    (void)unused;
    vp1_seen = *(volatile uint64_t *)TEST_VA;
}

static void map_to(uint64_t *page) { pt[0] = (uint64_t)page | PTE_P | PTE_W; }

static uint64_t vtl1_user_flush(uint64_t flags)
{
    return flush_space(flags, 3);
}

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)vp;
    return vtl1_user_flush(m->arg[0]);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c10_flushflags start\n");
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    /* VA 4 GiB -> our PD/PT (PDPT entry 4 of the runtime's page tables). */
    page_a[0] = 0xAAAA;
    page_b[0] = 0xBBBB;
    uint64_t *pml4 = (uint64_t *)(read_cr3() & ~0xFFFull);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & 0x000FFFFFFFFFF000ull);
    pd[0] = (uint64_t)pt | PTE_P | PTE_W;
    map_to(page_a);
    pdpt[4] = (uint64_t)pd | PTE_P | PTE_W;
    compat_vp1_run(vp1_read, 0);
    hv_check("vp1_reads_a", vp1_seen, 0xAAAA);

    const uint64_t vp1 = 1ull << 1;
    map_to(page_b);
    hv_check("flush_space_garbage", flush_space(GARBAGE, vp1), HV_STATUS_SUCCESS);
    compat_vp1_run(vp1_read, 0);
    hv_check("flush_space_garbage_flushed", vp1_seen, 0xBBBB);
    map_to(page_a);
    hv_check("flush_list_garbage", flush_list(GARBAGE | HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES, vp1), HV_STATUS_SUCCESS);
    compat_vp1_run(vp1_read, 0);
    hv_check("flush_list_garbage_flushed", vp1_seen, 0xAAAA);
    map_to(page_b);
    hv_check("flush_space_ex_garbage", flush_space_ex(GARBAGE, vp1), HV_STATUS_SUCCESS);
    compat_vp1_run(vp1_read, 0);
    hv_check("flush_space_ex_garbage_flushed", vp1_seen, 0xBBBB);
    map_to(page_a);
    hv_check("flush_list_ex_garbage", flush_list_ex(GARBAGE, vp1), HV_STATUS_SUCCESS);
    compat_vp1_run(vp1_read, 0);
    hv_check("flush_list_ex_garbage_flushed", vp1_seen, 0xAAAA);
    /* Every undefined bit at once (bits 31:10 and 7:5 too), and from VTL1. */
    hv_check("flush_all_undefined_bits", flush_space(~0x31Full & ~0x8ull, 3), HV_STATUS_SUCCESS);
    hv_check("vtl1_flush_garbage", vtl1_op(VSM_OP_USER, GARBAGE | HV_FLUSH_ALL_PROCESSORS, 0, 0, 0, 0),
             HV_STATUS_SUCCESS);
    hv_finish();
}
