/*
 * hv.c - Hyper-V guest helpers (see hv.h): setup, the XMM fast-call stub,
 * #UD-tolerant calls, SynIC and TSC page helpers, and check reporting.
 */
#include "hv.h"

uint8_t hv_hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
int hv_failures;
volatile uint64_t hv_last_ud_rip;
static volatile bool ud_caught;

/*
 * hv_xmm_call(control=rdi, regs=rsi): RDX, R8, XMM0..XMM5 from regs[], call the
 * page, store them back.  Plain assembly: the C side is -mgeneral-regs-only.
 */
__asm__(".text\n"
        ".globl hv_xmm_call\n"
        ".type hv_xmm_call, @function\n"
        "hv_xmm_call:\n"
        "    pushq %rbx\n"
        "    movq %rsi, %rbx\n"
        "    movq %rdi, %rcx\n"
        "    orq $0x10000, %rcx\n" /* HV_CONTROL_FAST */
        "    movq 0(%rbx), %rdx\n"
        "    movq 8(%rbx), %r8\n"
        "    movdqu 16(%rbx), %xmm0\n"
        "    movdqu 32(%rbx), %xmm1\n"
        "    movdqu 48(%rbx), %xmm2\n"
        "    movdqu 64(%rbx), %xmm3\n"
        "    movdqu 80(%rbx), %xmm4\n"
        "    movdqu 96(%rbx), %xmm5\n"
        "    leaq hv_hypercall_page(%rip), %rax\n"
        "    call *%rax\n"
        "    movq %rdx, 0(%rbx)\n"
        "    movq %r8, 8(%rbx)\n"
        "    movdqu %xmm0, 16(%rbx)\n"
        "    movdqu %xmm1, 32(%rbx)\n"
        "    movdqu %xmm2, 48(%rbx)\n"
        "    movdqu %xmm3, 64(%rbx)\n"
        "    movdqu %xmm4, 80(%rbx)\n"
        "    movdqu %xmm5, 96(%rbx)\n"
        "    popq %rbx\n"
        "    ret\n"
        ".size hv_xmm_call, . - hv_xmm_call\n");

bool hv_present(void)
{
    if (!(cpuid(1, 0).ecx & CPUID1_ECX_HYPERVISOR))
        return false;
    struct cpuid_regs v = cpuid(HV_CPUID_VENDOR_AND_MAX, 0);
    /* "Microsoft Hv" in EBX, ECX, EDX */
    if (v.ebx != 0x7263694D || v.ecx != 0x666F736F || v.edx != 0x76482074)
        return false;
    return cpuid(HV_CPUID_INTERFACE, 0).eax == HV_CPUID_SIGNATURE_HV1;
}

bool hv_init(void)
{
    if (!hv_present()) {
        printf("hv_init: no Hyper-V interface in CPUID\n");
        return false;
    }
    uint64_t features = cpuid(HV_CPUID_FEATURES, 0).eax;
    if (!(features & HV_PRIV_ACCESS_HYPERCALL_MSRS)) {
        printf("hv_init: hypercall MSRs not offered\n");
        return false;
    }
    wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_VSMTRACE);
    wrmsr(HV_MSR_HYPERCALL, (uint64_t)hv_hypercall_page | HV_HYPERCALL_ENABLE);
    if (!(rdmsr(HV_MSR_HYPERCALL) & HV_HYPERCALL_ENABLE)) {
        printf("hv_init: the hypercall page did not enable\n");
        return false;
    }
    return true;
}

/* #UD inside the hypercall page: note where, then return to the caller as `ret` would. */
static bool hv_ud_handler(struct int_frame *f)
{
    uint64_t page = (uint64_t)hv_hypercall_page;
    if (f->rip < page || f->rip >= page + HV_PAGE_SIZE)
        return false;
    hv_last_ud_rip = f->rip - page;
    ud_caught = true;
    f->rip = *(uint64_t *)f->rsp;
    f->rsp += 8;
    f->rax = ~0ull;
    return true;
}

bool hv_hypercall_ud(uint64_t control, uint64_t in_gpa, uint64_t out_gpa, uint64_t *result)
{
    set_exception_handler(6, hv_ud_handler);
    ud_caught = false;
    *result = hv_hypercall(control, in_gpa, out_gpa);
    return !ud_caught;
}

bool hv_xmm_call_ud(uint64_t control, uint64_t regs[14], uint64_t *result)
{
    set_exception_handler(6, hv_ud_handler);
    ud_caught = false;
    *result = hv_xmm_call(control, regs);
    return !ud_caught;
}

void hv_synic_enable(void *simp, void *siefp)
{
    wrmsr(HV_MSR_SIMP, (uint64_t)simp | HV_OVERLAY_ENABLE);
    wrmsr(HV_MSR_SIEFP, (uint64_t)siefp | HV_OVERLAY_ENABLE);
    wrmsr(HV_MSR_SCONTROL, HV_SCONTROL_ENABLE);
}

void hv_synic_disable(void)
{
    wrmsr(HV_MSR_SCONTROL, 0);
    wrmsr(HV_MSR_SIMP, 0);
    wrmsr(HV_MSR_SIEFP, 0);
}

void hv_sint_set(int sint, uint8_t vector, uint64_t flags) { wrmsr(HV_MSR_SINT0 + sint, vector | flags); }

void hv_message_done(struct hv_message *m)
{
    m->type = HV_MESSAGE_TYPE_NONE;
    barrier();
    if (m->flags & HV_MESSAGE_FLAG_PENDING)
        hv_eom();
}

bool hv_tsc_page_time(const struct hv_reference_tsc_page *page, uint64_t *time)
{
    uint32_t seq;
    uint64_t value;
    do {
        seq = page->sequence;
        barrier();
        if (seq == 0)
            return false;
        uint64_t scale = page->scale;
        int64_t offset = page->offset;
        uint64_t tsc = rdtsc();
        value = (uint64_t)(((unsigned __int128)tsc * scale) >> 64) + (uint64_t)offset;
        barrier();
    } while (page->sequence != seq);
    *time = value;
    return true;
}

void hv_check(const char *name, uint64_t got, uint64_t want)
{
    if (got == want) {
        printf("ok %s\n", name);
    } else {
        printf("FAIL %s: got 0x%lx want 0x%lx\n", name, got, want);
        hv_failures++;
    }
}

void hv_check_true(const char *name, bool cond)
{
    if (cond) {
        printf("ok %s\n", name);
    } else {
        printf("FAIL %s: got false want true\n", name);
        hv_failures++;
    }
}

void hv_finish(void)
{
    printf("%s: %d failed\n", hv_failures ? "FAILED" : "PASSED", hv_failures);
    qemu_exit(hv_failures ? 1 : 0);
}
