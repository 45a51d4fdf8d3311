/*
 * vsm_c2_nx.c - issue 12 item 2: a page VTL1 makes readable but not executable (R, or R+W)
 * stays readable for everything VTL0 does with it, on 2 VPs:
 *   - VTL0's own page tables (PML4, PDPT) protected R+W, and the PD/PT of a second mapping
 *     protected R: the CPU's page walks go on (no #PF/#DF/triple fault after the VtlReturn);
 *   - a GDT and an IDT on R pages: segment loads and interrupt delivery read them;
 *   - a hypercall input buffer on an R page: the VMM reads it (Success);
 *   - plain reads of an R page: no intercept; a write: the write intercept;
 *   - code on an R page: KVM cannot refuse the fetch (see docs/vsm.md), but when VTL0
 *     resumes on that page after an intercept, VTL1 gets the execute intercept.
 */
#include "vsm_compat.h"

#define TEST_VA 0x100000000ull
#define PTE_P 1ull
#define PTE_W 2ull
#define PTE_A (1ull << 5)
#define PTE_D (1ull << 6)
#define R HV_MAP_GPA_READ
#define RW (HV_MAP_GPA_READ | HV_MAP_GPA_WRITE)

static uint64_t pd[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t pt[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t target[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t gdt_copy[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t idt_copy[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t rpage[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t dpage[512] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t cpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static volatile uint32_t irq_hits;
static volatile uint64_t vp1_seen;

struct __attribute__((packed)) dtr {
    uint16_t limit;
    uint64_t base;
};

static void protect(const char *name, const void *page, uint32_t mask)
{
    hv_check(name, vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, mask, HV_VTL_SELF, 0), HV_STATUS_SUCCESS);
}

static void on_irq(struct int_frame *f)
{
    (void)f;
    irq_hits++;
    apic_eoi();
}

static void vp1_read(uint64_t unused)
{
    (void)unused;
    vp1_seen = *(volatile uint64_t *)TEST_VA;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c2_nx start\n");
    apic_enable();
    set_irq_handler(0x72, on_irq);
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    uint32_t vp = vsm_vp_index();
    hv_check("enable_protection", vtl1_op(VSM_OP_CONFIG, HV_VSM_CONFIG_ENABLE_VTL_PROTECTION |
                                                          HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL), 0, 0, 0, 0),
             HV_STATUS_SUCCESS);
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);

    /* VTL0's real page tables: R+W, no execute. */
    uint64_t *pml4 = (uint64_t *)(read_cr3() & ~0xFFFull);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & 0x000FFFFFFFFFF000ull);
    protect("protect_pml4_rw", pml4, RW);
    protect("protect_pdpt_rw", pdpt, RW);
    hv_check("vtl0_runs_on_rw_page_tables", vtl1_op(VSM_OP_ECHO, 7, 0, 0, 0, 0), 8);

    /* A second mapping whose PD and PT are read-only (accessed/dirty bits preset). */
    target[0] = 0x7A7A;
    pt[0] = (uint64_t)target | PTE_P | PTE_W | PTE_A | PTE_D;
    pd[0] = (uint64_t)pt | PTE_P | PTE_W | PTE_A;
    pdpt[4] = (uint64_t)pd | PTE_P | PTE_W | PTE_A;
    protect("protect_pd_r", pd, R);
    protect("protect_pt_r", pt, R);
    hv_check("walk_r_page_tables_vp0", *(volatile uint64_t *)TEST_VA, 0x7A7A);
    hv_check_true("vp1_runs", compat_vp1_run(vp1_read, 0));
    hv_check("walk_r_page_tables_vp1", vp1_seen, 0x7A7A);

    /* GDT and IDT copies on read-only pages (descriptor accessed bits preset). */
    struct dtr gdtr, idtr, g2, i2;
    __asm__ volatile("sgdt %0; sidt %1" : "=m"(gdtr), "=m"(idtr));
    memcpy(gdt_copy, (void *)gdtr.base, gdtr.limit + 1u);
    for (unsigned i = 1; i < (gdtr.limit + 1u) / 8; i++)
        if (gdt_copy[i] & (1ull << 44)) /* code/data descriptor: set its accessed bit */
            gdt_copy[i] |= 1ull << 40;
    memcpy(idt_copy, (void *)idtr.base, idtr.limit + 1u);
    protect("protect_gdt_r", gdt_copy, R);
    protect("protect_idt_r", idt_copy, R);
    g2 = (struct dtr){gdtr.limit, (uint64_t)gdt_copy};
    i2 = (struct dtr){idtr.limit, (uint64_t)idt_copy};
    uint16_t ds;
    __asm__ volatile("lgdt %1; lidt %2; mov %%ds, %0; mov %0, %%ds; mov %0, %%es" : "=&r"(ds) : "m"(g2), "m"(i2)
                     : "memory");
    apic_send_ipi(apic_id(), 0x72, APIC_DM_FIXED, APIC_DEST_NONE);
    hv_check_true("irq_through_r_idt", compat_wait(&irq_hits, 1));
    hv_check("vtl_call_with_r_tables", vtl1_op(VSM_OP_ECHO, 9, 0, 0, 0, 0), 10);
    __asm__ volatile("lgdt %0; lidt %1" : : "m"(gdtr), "m"(idtr) : "memory");

    /* Hypercall input on a read-only page: GetVpRegisters(RIP of VTL0). */
    uint8_t *in = vsm_in_page(), *out = vsm_out_page();
    memset(in, 0, 32);
    ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
    *(uint32_t *)(in + 8) = HV_VP_INDEX_SELF;
    *(uint32_t *)(in + 16) = HV_REG_RIP;
    protect("protect_hypercall_input_r", in, R);
    ((uint64_t *)out)[0] = 0;
    uint64_t res = vsm_hypercall(HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1), (uint64_t)in, (uint64_t)out);
    hv_check("hypercall_input_on_r_page", HV_RESULT_STATUS(res), HV_STATUS_SUCCESS);
    hv_check_true("hypercall_output_written", ((uint64_t *)out)[0] != 0);
    protect("unprotect_hypercall_input", in, HV_MAP_GPA_ALL);

    /* Reads of an R page are free; a write is intercepted. */
    rpage[3] = 0x3333;
    protect("protect_data_r", rpage, R);
    uint32_t n = vsm_log[vp].intercepts;
    hv_check("read_r_page", *(volatile uint64_t *)&rpage[3], 0x3333);
    hv_check("read_r_page_no_intercept", vsm_log[vp].intercepts - n, 0);
    *(volatile uint64_t *)&rpage[3] = 0x4444;
    hv_check("write_r_page_intercepted", vsm_log[vp].intercepts - n, 1);
    hv_check("write_r_page_access_type", vsm_log[vp].last_msg.access_type, HV_INTERCEPT_WRITE);
    hv_check("write_r_page_done_after_restore", rpage[3], 0x4444);

    /* Code on an R page writes a no-access page: after that intercept VTL0 resumes on the R page. */
    static const uint8_t code[] = {0x48, 0x89, 0x02, 0xB8, 0xDE, 0xC0, 0x00, 0x00, 0xC3}; /* mov %rax,(%rdx); mov $0xC0DE,%eax; ret */
    memcpy(cpage, code, sizeof(code));
    protect("protect_code_r", cpage, R);
    protect("protect_data_none", dpage, HV_MAP_GPA_NONE);
    n = vsm_log[vp].intercepts;
    uint64_t r = 0x5555;
    __asm__ volatile("call *%2" : "+a"(r) : "d"(dpage), "r"(cpage) : "memory", "rcx", "rsi", "rdi", "r8", "r9", "r10",
                     "r11");
    hv_check("exec_r_page_result", r & 0xFFFFFFFF, 0xC0DE);
    hv_check("exec_r_page_store_done", dpage[0], 0x5555);
    hv_check_true("exec_r_page_intercepted", vsm_log[vp].intercepts - n >= 1);
    hv_check("exec_r_page_last_access_type", vsm_log[vp].last_msg.access_type, HV_INTERCEPT_EXECUTE);
    hv_check("exec_r_page_last_gpa", vsm_log[vp].last_msg.gpa, (uint64_t)cpage);
    hv_check("exec_r_page_last_rip", vsm_log[vp].last_msg.rip, (uint64_t)cpage);
    hv_finish();
}
