/*
 * fault.c - exercise the runtime's exception paths.
 *
 * cmdline fault=ud|gp|pf|de|safe (default safe):
 *   ud/gp/pf/de raise #UD (ud2), #GP (wrmsr to a nonexistent MSR), #PF (read
 *   above the 4 GiB identity map) or #DE; the runtime prints
 *   "EXCEPTION <v> rip=0x.. err=0x.." and exits with 0x40 + vector.
 *   safe: rdmsr_safe/wrmsr_safe on a nonexistent MSR report a fault, a handled
 *   #UD resumes after ud2, and the guest exits 0.  (QEMU TCG does not #GP on
 *   unknown MSRs, so there gp/safe fail; KVM and vsmtrace do.)
 */
#include "guest.h"

#define BOGUS_MSR 0x4B564D99u /* nothing implements this */

static volatile uint32_t ud_seen;

static bool skip_ud2(struct int_frame *f)
{
    ud_seen++;
    f->rip += 2; /* ud2 is 0F 0B */
    return true;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    char kind[8] = "safe";
    cmdline_get("fault", kind, sizeof(kind));
    printf("fault test: %s\n", kind);
    if (!strcmp(kind, "ud"))
        __asm__ volatile("ud2");
    if (!strcmp(kind, "gp"))
        wrmsr(BOGUS_MSR, 0);
    if (!strcmp(kind, "pf"))
        (void)*(volatile uint64_t *)0x100000000ull;
    if (!strcmp(kind, "de")) {
        uint32_t eax = 1, edx = 0;
        __asm__ volatile("divl %2" : "+a"(eax), "+d"(edx) : "r"(0u)); /* gcc would fold a C division */
    }
    if (strcmp(kind, "safe")) {
        printf("no exception raised\n");
        return 1;
    }
    uint64_t v = 0;
    bool r = rdmsr_safe(BOGUS_MSR, &v);
    bool w = wrmsr_safe(BOGUS_MSR, 1);
    printf("rdmsr_safe: %s\n", r ? "ok" : "fault");
    printf("wrmsr_safe: %s\n", w ? "ok" : "fault");
    bool tsc_ok = rdmsr_safe(0x10, &v); /* IA32_TSC exists everywhere */
    printf("rdmsr_safe(IA32_TSC): %s\n", tsc_ok ? "ok" : "fault");
    set_exception_handler(6, skip_ud2);
    __asm__ volatile("ud2");
    printf("handled #UD: %u\n", ud_seen);
    bool ok = !r && !w && tsc_ok && ud_seen == 1;
    printf("fault test %s\n", ok ? "passed" : "FAILED");
    return ok ? 0 : 1;
}
