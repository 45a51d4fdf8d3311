/*
 * vsm_c3_flush.c - issue 12 item 3: no old interrupt is delivered again when special
 * registers are written back. After an IPI was taken, a VP flushes its own TLB
 * (HvFlushVirtualAddressSpace/List and the Ex forms) with RFLAGS.IF = 0, then with IF = 1;
 * VTL1 writes CR2 (shared: copied at the VTL return) and sets VTL0's CR2 with
 * HvSetVpRegisters; a handler that flushes runs once. The IPI counts must not move.
 * 2 VPs: the IPIs come from VP1 (PV IPI) and from the VP itself (APIC self-IPI).
 */
#include "vsm_compat.h"

#define VEC_A 0x70 /* counted only */
#define VEC_B 0x71 /* handler flushes the TLB */

static volatile uint32_t hits_a, hits_b, depth_b, max_depth_b;
static volatile int flush_form;

static uint16_t flush_self(int form)
{
    uint64_t *in = vsm_in_page();
    uint64_t mask = 1ull << vsm_vp_index();
    memset(in, 0, 64);
    in[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    switch (form) {
    case 0:
        in[2] = mask;
        return HV_RESULT_STATUS(vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, (uint64_t)in, 0));
    case 1:
        in[2] = mask;
        in[3] = 0x200000;
        return HV_RESULT_STATUS(
            vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | HV_CONTROL_REP_COUNT(1), (uint64_t)in, 0));
    case 2:
        in[3] = 1;
        in[4] = mask;
        return HV_RESULT_STATUS(
            vsm_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX | HV_CONTROL_VAR_HEADER(1), (uint64_t)in, 0));
    default:
        in[3] = 1;
        in[4] = mask;
        in[5] = 0x200000;
        return HV_RESULT_STATUS(vsm_hypercall(
            HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX | HV_CONTROL_VAR_HEADER(1) | HV_CONTROL_REP_COUNT(1), (uint64_t)in, 0));
    }
}

static void on_a(struct int_frame *f)
{
    (void)f;
    hits_a++;
    apic_eoi();
}

static void on_b(struct int_frame *f)
{
    (void)f;
    depth_b++;
    if (depth_b > max_depth_b)
        max_depth_b = depth_b;
    hits_b++;
    if (depth_b < 8)
        flush_self(flush_form); /* before the EOI, in the run that delivered B: a re-delivered B nests here */
    apic_eoi();
    depth_b--;
}

static void vp1_pv_ipi(uint64_t vector)
{
    vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST, vector, 1ull << 0);
}

/* VTL1 user ops: 1 = write CR2 (shared with VTL0), 2 = SetVpRegisters(VTL0 CR4) (private). */
uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)vp;
    if (m->arg[0] == 1) {
        __asm__ volatile("mov %0, %%cr2" : : "r"(m->arg[1]));
        return 0;
    }
    return hv_set_vp_register(HV_VTL(0), HV_REG_CR4, m->arg[1], 0);
}

static void check_quiet(const char *name, uint32_t a, uint32_t b)
{
    char buf[96];
    snprintf(buf, sizeof(buf), "%s_no_redelivery_if0", name);
    hv_check_true(buf, hits_a == a && hits_b == b);
    compat_settle();
    snprintf(buf, sizeof(buf), "%s_no_redelivery_if1", name);
    hv_check_true(buf, hits_a == a && hits_b == b);
    if (hits_a != a || hits_b != b)
        printf("  hits_a %u (want %u) hits_b %u (want %u)\n", hits_a, a, hits_b, b);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c3_flush start\n");
    apic_enable();
    set_irq_handler(VEC_A, on_a);
    set_irq_handler(VEC_B, on_b);
    if (!vsm_init(false) || !compat_two_vps())
        hv_finish();
    cli();
    const char *forms[] = {"space", "list", "space_ex", "list_ex"};
    for (int form = 0; form < 4; form++) {
        char buf[64];
        uint32_t a = hits_a;
        compat_vp1_run(vp1_pv_ipi, VEC_A); /* VP1 -> VP0 PV IPI, taken in the window below */
        snprintf(buf, sizeof(buf), "pv_ipi_taken_%s", forms[form]);
        hv_check_true(buf, compat_wait(&hits_a, a + 1));
        snprintf(buf, sizeof(buf), "flush_%s_status", forms[form]);
        hv_check(buf, flush_self(form), HV_STATUS_SUCCESS);
        flush_self(form);
        snprintf(buf, sizeof(buf), "flush_%s", forms[form]);
        check_quiet(buf, a + 1, hits_b);
    }
    /* APIC self-IPI, then the flush. */
    uint32_t a = hits_a;
    apic_send_ipi(apic_id(), VEC_A, APIC_DM_FIXED, APIC_DEST_NONE);
    hv_check_true("self_ipi_taken", compat_wait(&hits_a, a + 1));
    flush_self(0);
    check_quiet("self_ipi_flush", a + 1, hits_b);
    /* A handler that flushes its own TLB (each form) runs exactly once per IPI: no recursion. */
    for (int form = 0; form < 4; form++) {
        char buf[64];
        flush_form = form;
        uint32_t b = hits_b;
        compat_vp1_run(vp1_pv_ipi, VEC_B);
        snprintf(buf, sizeof(buf), "flushing_handler_%s", forms[form]);
        hv_check_true(buf, compat_wait(&hits_b, b + 1));
        check_quiet(buf, hits_a, b + 1);
    }
    apic_send_ipi(apic_id(), VEC_B, APIC_DM_FIXED, APIC_DEST_NONE);
    hv_check_true("flushing_handler_taken", compat_wait(&hits_b, 5));
    check_quiet("flushing_handler", hits_a, 5);
    hv_check("flushing_handler_depth", max_depth_b, 1);
    /* VTL switch with a CR2 change (the CR2 copy writes VTL0's special registers). */
    a = hits_a;
    apic_send_ipi(apic_id(), VEC_A, APIC_DM_FIXED, APIC_DEST_NONE);
    compat_wait(&hits_a, a + 1);
    vtl1_op(VSM_OP_USER, 1, 0x5A5A000, 0, 0, 0);
    hv_check("cr2_shared_from_vtl1", read_cr2(), 0x5A5A000);
    check_quiet("cr2_copy", a + 1, 5);
    /* HvSetVpRegisters of VTL0's CR4 (same value) from VTL1 (the register file's set-many). */
    apic_send_ipi(apic_id(), VEC_A, APIC_DM_FIXED, APIC_DEST_NONE);
    compat_wait(&hits_a, a + 2);
    uint64_t cr4 = read_cr4();
    hv_check("set_vtl0_cr4_status", vtl1_op(VSM_OP_USER, 2, cr4, 0, 0, 0), HV_STATUS_SUCCESS);
    hv_check("set_vtl0_cr4_value", read_cr4(), cr4);
    check_quiet("set_registers", a + 2, 5);
    hv_finish();
}
