/*
 * hv_crash.c - a guest that reports a crash through the Hyper-V crash MSRs.
 *
 * Writes P0-P2 (bugcheck code and parameters), P3/P4 = GPA/length of a message, then
 * CRASH_CTL = CrashNotify | CrashMessage. vsmtrace must stop the guest there with its
 * guest-fault status and show the parameters and the message.
 * cmdline: message=0 -> CrashNotify only (no message).
 */
#include "hv.h"

static const char crash_text[] = "hv_crash: deliberate test crash";

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    hv_check("crash_ctl_capabilities", rdmsr(HV_MSR_CRASH_CTL), HV_CRASH_CTL_NOTIFY | HV_CRASH_CTL_MESSAGE);
    hv_check("crash_ctl_reserved_gp", wrmsr_safe(HV_MSR_CRASH_CTL, 1ull << 0), 0);
    bool with_message = !cmdline_is("message", "0");
    wrmsr(HV_MSR_CRASH_P0, 0xDEAD0001);
    wrmsr(HV_MSR_CRASH_P0 + 1, 0x1111);
    wrmsr(HV_MSR_CRASH_P0 + 2, 0x2222);
    wrmsr(HV_MSR_CRASH_P0 + 3, with_message ? (uint64_t)crash_text : 0x3333);
    wrmsr(HV_MSR_CRASH_P0 + 4, with_message ? sizeof(crash_text) - 1 : 0x4444);
    printf("crashing now (message=%d)\n", with_message);
    wrmsr(HV_MSR_CRASH_CTL, HV_CRASH_CTL_NOTIFY | (with_message ? HV_CRASH_CTL_MESSAGE : 0));
    printf("FAIL still running after CRASH_CTL\n");
    qemu_exit(1);
}
