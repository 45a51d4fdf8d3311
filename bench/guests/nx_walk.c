/*
 * nx_walk.c - bench/nx_walk guest: the cost of page tables on pages VTL1 made readable but
 * not executable (issue 12 item 2), timed by the guest.
 *
 * cmdline: n=N (pages walked per phase), c=C (VTL calls per phase), rounds=R.
 * VA 4 GiB maps N pages through our own PD and PTs. Each round prints "T <kind> <ticks>":
 *   walk_rwx / walk_rw / walk_r: N times `invlpg` + a read of the next page, so the CPU
 *       walks the page tables each time, with the PD/PTs unprotected (RWX), R+W (RAM memslot)
 *       and R (read-only memslot);
 *   call_plain / call_nx: C VTL calls (VTL1 returns at once) with no readable-non-executable
 *       page in VTL0's view, then with the PD/PTs R: the second pays vsmtrace's look at the
 *       resume RIP after each return (docs/vsm.md, "How protections reach KVM").
 * Exit code 0, or 1 if a set-up call failed or a read returned the wrong value.
 */
#include "vsm.h"

#define TEST_VA 0x100000000ull
#define MAX_PAGES 4096
#define PTE_P 1ull
#define PTE_W 2ull
#define PTE_A (1ull << 5)
#define PTE_D (1ull << 6)

static uint64_t pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pts[MAX_PAGES / 512][512] __attribute__((aligned(HV_PAGE_SIZE)));
static volatile uint64_t data[512] __attribute__((aligned(HV_PAGE_SIZE)));

static bool protect_tables(uint64_t npt, uint32_t mask)
{
    if (vtl1_op(VSM_OP_PROTECT, (uint64_t)pd, 1, mask, HV_VTL_SELF, 0) != HV_STATUS_SUCCESS)
        return false;
    return vtl1_op(VSM_OP_PROTECT, (uint64_t)pts, (int)npt, mask, HV_VTL_SELF, 0) == HV_STATUS_SUCCESS;
}

static uint64_t walk(uint64_t n, bool *ok)
{
    uint64_t sum = 0, t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++) {
        uint64_t va = TEST_VA + i * HV_PAGE_SIZE;
        __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
        sum += *(volatile uint64_t *)va;
    }
    uint64_t t = rdtsc() - t0;
    if (sum != n * 0x1111)
        *ok = false;
    return t;
}

static uint64_t calls(uint64_t c)
{
    vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0); /* the mailbox keeps this op: each call below is a NOP */
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < c; i++)
        vtl_call();
    return rdtsc() - t0;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t n = cmdline_get_uint("n", 512), c = cmdline_get_uint("c", 200), rounds = cmdline_get_uint("rounds", 1);
    if (n < 1 || n > MAX_PAGES)
        return 1;
    uint64_t npt = (n + 511) / 512;
    if (!vsm_init(false))
        return 1;
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
    if (vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0) != HV_STATUS_SUCCESS)
        return 1;
    data[0] = 0x1111;
    for (uint64_t i = 0; i < n; i++)
        pts[i / 512][i % 512] = (uint64_t)data | PTE_P | PTE_W | PTE_A | PTE_D;
    for (uint64_t j = 0; j < npt; j++)
        pd[j] = (uint64_t)pts[j] | PTE_P | PTE_W | PTE_A;
    uint64_t *pml4 = (uint64_t *)(read_cr3() & ~0xFFFull);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & 0x000FFFFFFFFFF000ull);
    pdpt[4] = (uint64_t)pd | PTE_P | PTE_W | PTE_A;
    bool ok = true;
    for (uint64_t r = 0; r < rounds && ok; r++) {
        ok = protect_tables(npt, HV_MAP_GPA_ALL);
        uint64_t rwx = walk(n, &ok), plain = calls(c);
        ok = ok && protect_tables(npt, HV_MAP_GPA_READ | HV_MAP_GPA_WRITE);
        uint64_t rw = walk(n, &ok);
        ok = ok && protect_tables(npt, HV_MAP_GPA_READ);
        uint64_t ro = walk(n, &ok), nx = calls(c);
        if (ok)
            printf("T walk_rwx %lu\nT walk_rw %lu\nT walk_r %lu\nT call_plain %lu\nT call_nx %lu\n", rwx, rw, ro, plain,
                   nx);
    }
    if (!ok)
        printf("FAIL nx_walk: set-up or read failed\n");
    return ok ? 0 : 1;
}
