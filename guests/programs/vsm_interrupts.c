/*
 * vsm_interrupts.c - interrupts and VTLs on one VP: a VTL1 APIC timer fires while VTL0
 * sits in hlt with IF=0 (VTL1 is entered with reason Interrupt, VTL0's registers survive);
 * PV IPIs (HvCallSendSyntheticClusterIpi): VTL1 -> VTL0, VTL1 -> itself and VTL0 -> VTL1; VTL1's TPR holds
 * its interrupt pending without a switch; APIC self-IPIs stay in the sender's VTL.
 */
#include "vsm.h"
#include "apic.h"

static volatile uint32_t vtl0_hits[256];
static void vtl0_irq(struct int_frame *f)
{
    vtl0_hits[f->vector & 0xFF]++;
    apic_eoi();
}

static void open_window(void)
{
    sti_hlt(); /* the expected interrupt wakes the hlt (a missing one ends in --timeout) */
    cli();
}

static uint16_t pv_ipi(uint32_t vector, uint8_t vtl, uint64_t mask)
{
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST,
                                          vector | ((uint64_t)vtl << 32), mask));
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_interrupts start\n");
    apic_enable();
    set_irq_handler(0x62, vtl0_irq);
    apic_send_ipi(apic_id(), 0x62, APIC_DM_FIXED, APIC_DEST_NONE);
    open_window();
    hv_check("vtl0_self_ipi_before_vsm", vtl0_hits[0x62], 1);
    if (!vsm_init(false))
        hv_finish();
    uint32_t vp = vsm_vp_index();
    struct vsm_vp_log *l = &vsm_log[vp];

    /* VTL1 timer while VTL0 halts with interrupts off. */
    vtl1_op(VSM_OP_TIMER, 50000000, 0, 0, 0, 0); /* long enough to outlive the VTL call */
    printf("vtl1 timer armed (ticks so far %u), VTL0 halts with IF=0\n", l->timer_irqs);
    uint64_t a = 0xA0A0, b = 0xB0B0, c = 0xC0C0, d = 0xD0D0, s = 0x5151, di = 0xD1D1;
    register uint64_t r12 __asm__("r12") = 0x1212;
    register uint64_t r15 __asm__("r15") = 0x1515;
    __asm__ volatile("cli; hlt" : "+a"(a), "+b"(b), "+c"(c), "+d"(d), "+S"(s), "+D"(di), "+r"(r12), "+r"(r15)
                     : : "memory");
    hv_check("timer_hlt_if0_fired", l->timer_irqs, 1);
    hv_check("timer_hlt_if0_entry_reason", l->last_reason, HV_ENTRY_INTERRUPT);
    hv_check_true("timer_hlt_if0_regs_intact", a == 0xA0A0 && b == 0xB0B0 && c == 0xC0C0 && d == 0xD0D0 &&
                                                   s == 0x5151 && di == 0xD1D1 && r12 == 0x1212 && r15 == 0x1515);
    hv_check_true("timer_hlt_if0_vtl0_still_if0", !(read_rflags() & (1u << 9)));

    /* PV IPI from VTL0 to VTL1: delivered to VTL1's APIC (seed; docs/vsm.md), VTL1 entered at once. */
    hv_check("pv_ipi_vtl0_to_vtl1_status", pv_ipi(VSM_VTL1_IPI_VECTOR + 1, HV_VTL(1), 1ull << vp), HV_STATUS_SUCCESS);
    hv_check("pv_ipi_vtl0_to_vtl1_delivered", l->ipi_irqs[1], 1);
    /* PV IPI from VTL1 to its own VTL: taken in VTL1 during the call. */
    hv_check("pv_ipi_vtl1_self_status", vtl1_op(VSM_OP_PV_IPI, VSM_VTL1_IPI_VECTOR + 1, HV_VTL_SELF, 1ull << vp, 0, 0),
             HV_STATUS_SUCCESS);
    hv_check("pv_ipi_vtl1_self_delivered", l->ipi_irqs[1], 2);

    /* PV IPI from VTL1 to VTL0: waits until VTL0 runs with IF=1. */
    set_irq_handler(0x61, vtl0_irq);
    hv_check("pv_ipi_to_vtl0_status", vtl1_op(VSM_OP_PV_IPI, 0x61, HV_VTL(0), 1ull << vp, 0, 0), HV_STATUS_SUCCESS);
    open_window();
    hv_check("pv_ipi_to_vtl0_delivered", vtl0_hits[0x61], 1);
    uint16_t st = pv_ipi(0x05, HV_VTL(1), 1ull << vp);
    if (st != HV_STATUS_SUCCESS)
        printf("ok pv_ipi_bad_vector (status 0x%x)\n", st);
    else {
        printf("FAIL pv_ipi_bad_vector: accepted vector 5\n");
        hv_failures++;
    }

    /* VTL1's TPR masks the vector: no switch, it stays pending until VTL1 lowers TPR. */
    vtl1_op(VSM_OP_TPR, 0xF0, 0, 0, 0, 0);
    uint32_t entries = l->entries[HV_ENTRY_INTERRUPT];
    vtl1_op(VSM_OP_SEND_IPI, apic_id(), VSM_VTL1_IPI_VECTOR + 2, 0, 0, 0);
    hv_check("vtl1_tpr_holds_interrupt", l->ipi_irqs[2], 0);
    vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0);
    hv_check("vtl1_tpr_held_across_return", l->ipi_irqs[2], 0);
    hv_check("vtl1_tpr_no_switch", l->entries[HV_ENTRY_INTERRUPT], entries);
    vtl1_op(VSM_OP_TPR, 0, 0, 0, 0, 0);
    hv_check("vtl1_tpr_release_delivers", l->ipi_irqs[2], 1);

    /* APIC IPIs never cross VTLs. */
    set_irq_handler(VSM_VTL1_IPI_VECTOR + 3, vtl0_irq);
    vtl1_op(VSM_OP_SEND_IPI, apic_id(), VSM_VTL1_IPI_VECTOR + 3, 0, 0, 0);
    hv_check("apic_self_ipi_vtl1_delivered", l->ipi_irqs[3], 1);
    apic_send_ipi(apic_id(), VSM_VTL1_IPI_VECTOR + 3, APIC_DM_FIXED, APIC_DEST_NONE);
    open_window(); /* wakes on VTL0's own IPI; VTL1's must not have arrived here too */
    hv_check("apic_self_ipi_stays_in_vtl1", vtl0_hits[VSM_VTL1_IPI_VECTOR + 3], 1);
    hv_check("apic_self_ipi_stays_in_vtl0", l->ipi_irqs[3], 1);
    hv_finish();
}
