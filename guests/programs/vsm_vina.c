/*
 * vsm_vina.c - VINA (virtual interrupt notification assist): while VTL1 runs, an
 * interrupt that becomes ready for VTL0 makes the hypervisor set VinaAsserted in
 * VTL1's VP assist page and raise VTL1's VINA vector, once, until VTL1 returns.
 *
 * VTL1 (in a VSM_OP_USER request) enables VINA with auto-reset, sends VTL0 a PV IPI
 * and spins briefly: its VINA handler must run exactly once and see VinaAsserted.
 * Back in VTL0 the IPI arrives; on the next call VinaAsserted must be clear again
 * (auto-reset). Then the same with VINA disabled: no notification.
 */
#include "guest.h"
#include "apic.h"
#include "vsm.h"

#define VTL0_VECTOR 0x55
#define VINA_VECTOR 0x56
#define VINA_ENABLED (1u << 8)
#define VINA_AUTO_RESET (1u << 9)
#define HV_REG_VSM_VINA 0x000D0005u
#define SPIN 2000

enum { OP_ARM = 1, OP_READ_STATUS = 2 };

static volatile uint32_t vtl0_hits;
static volatile uint32_t vina_hits;
static volatile uint32_t vina_status_in_handler;

static void vtl0_irq(struct int_frame *f)
{
    (void)f;
    vtl0_hits++;
    apic_eoi();
}

static void vina_irq(struct int_frame *f)
{
    (void)f;
    vina_hits++;
    vina_status_in_handler = vsm_vtl1_assist(vsm_vp_index())->vtl_control.vina_status;
    apic_eoi();
}

void vtl1_user_init(uint32_t vp)
{
    (void)vp;
    vtl1_set_irq_handler(VINA_VECTOR, vina_irq);
}

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    if (m->arg[0] == OP_READ_STATUS)
        return vsm_vtl1_assist(vp)->vtl_control.vina_status;
    uint64_t vina = m->arg[1] ? (VINA_VECTOR | VINA_ENABLED | VINA_AUTO_RESET) : 0;
    uint16_t st = hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_VINA, vina, 0);
    if (st)
        return 0x10000 | st;
    vina_hits = 0;
    uint64_t r = vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST,
                               VTL0_VECTOR | ((uint64_t)HV_VTL(0) << 32), 1ull << vp);
    if (r & 0xFFFF)
        return 0x20000 | (r & 0xFFFF);
    sti();
    for (int i = 0; i < SPIN && vina_hits == 0; i++)
        cpu_pause();
    return vina_hits;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_vina start\n");
    set_irq_handler(VTL0_VECTOR, vtl0_irq);
    apic_enable();
    if (!vsm_init(false)) {
        printf("FAIL vsm_init\n");
        return 1;
    }
    sti();

    uint64_t hits = vtl1_op(VSM_OP_USER, OP_ARM, 1, 0, 0, 0);
    hv_check("vina_notified_once", hits, 1);
    hv_check("vina_asserted_seen_by_handler", vina_status_in_handler & 1, 1);
    for (int i = 0; i < SPIN && vtl0_hits == 0; i++)
        cpu_pause();
    hv_check("vtl0_interrupt_after_return", vtl0_hits, 1);
    hv_check("vina_auto_reset", vtl1_op(VSM_OP_USER, OP_READ_STATUS, 0, 0, 0, 0) & 1, 0);

    hits = vtl1_op(VSM_OP_USER, OP_ARM, 0, 0, 0, 0);
    hv_check("vina_disabled_no_notification", hits, 0);
    for (int i = 0; i < SPIN && vtl0_hits < 2; i++)
        cpu_pause();
    hv_check("vtl0_interrupt_without_vina", vtl0_hits, 2);

    if (hv_failures) {
        printf("FAILED: %d failed\n", hv_failures);
        return 1;
    }
    printf("PASSED: 0 failed\n");
    return 0;
}
