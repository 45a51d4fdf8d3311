/*
 * vsm_compat.h - shared helpers of the vsm_c*.c guests (one guest per VSM fidelity item of
 * issue 12, written against the KVM VSM RFC's behaviour; see docs/vsm.md).
 *
 * Two-VP bring-up: VP0 enables VTL1 (vsm_init), VTL1 enables VTL1 on VP1, VP1 is started in
 * VTL0 and runs functions VP0 posts to it (vp1_run).
 */
#ifndef VSM_COMPAT_H
#define VSM_COMPAT_H

#include "vsm.h"
#include "apic.h"


static volatile uint32_t compat_vp1_up, compat_vp1_ok;
static void (*volatile compat_fn)(uint64_t);
static volatile uint64_t compat_arg;
static volatile uint32_t compat_posted, compat_done;

static inline uint64_t compat_ref_time(void) { return rdmsr(HV_MSR_TIME_REF_COUNT); }

/* Spin (interrupts off) until another VP sets *p to want, or 5 s of reference time pass. */
static inline bool compat_spin(volatile uint32_t *p, uint32_t want)
{
    uint64_t end = compat_ref_time() + 50000000ull;
    while (atomic_load32(p) < want)
        if (compat_ref_time() > end)
            return false;
    return true;
}

/* For an interrupt this VP takes (in VTL0 or VTL1): halt with interrupts on until *p reaches want; interrupts are off again afterwards. An
 * interrupt that never comes ends the run at vsmtrace's --timeout (the test then fails).
 * (sti; hlt: the STI shadow covers the hlt, so a vector already pending wakes it at once.) */
static inline bool compat_wait(volatile uint32_t *p, uint32_t want)
{
    while (atomic_load32(p) < want) {
        sti_hlt();
        cli();
    }
    return true;
}

/* Interrupts on for about 20 ms (lets anything still in flight arrive). */
static inline void compat_settle(void)
{
    uint64_t end = compat_ref_time() + 200000;
    sti();
    while (compat_ref_time() < end)
        cpu_pause();
    cli();
}

static void compat_vp1_main(uint32_t vp)
{
    (void)vp;
    compat_vp1_ok = vsm_init_ap();
    atomic_store32(&compat_vp1_up, 1);
    uint32_t seen = 0;
    for (;;) {
        sti();
        uint32_t n = atomic_load32(&compat_posted);
        if (n == seen) {
            cpu_pause();
            continue;
        }
        cli();
        seen = n;
        compat_fn(compat_arg);
        atomic_store32(&compat_done, n);
    }
}

/* VP0: enable VTL1 on VP1 and start VP1 in VTL0 (prints ok/FAIL lines). */
static inline bool compat_two_vps(void)
{
    hv_check("compat_enable_vtl1_vp1", vtl1_op(VSM_OP_ENABLE_VP, 1, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    hv_check("compat_start_vp1", vsm_start_ap(1, compat_vp1_main), HV_STATUS_SUCCESS);
    bool up = compat_spin(&compat_vp1_up, 1);
    hv_check_true("compat_vp1_up", up && compat_vp1_ok);
    return up && compat_vp1_ok;
}

/* VP0: run fn(arg) on VP1 (interrupts off there) and wait for it. */
static inline bool compat_vp1_run(void (*fn)(uint64_t), uint64_t arg)
{
    compat_fn = fn;
    compat_arg = arg;
    uint32_t n = atomic_load32(&compat_posted) + 1;
    atomic_store32(&compat_posted, n);
    return compat_spin(&compat_done, n);
}

#endif
