/*
 * vbs_demo.c - the bundled demo guest: a miniature VBS boot on 2 VPs.
 *
 * What it models (and what the trace then shows):
 *   1. The VTL0 kernel enables VTL1 for the partition and for VP0 with an initial
 *      context, and enters the "secure kernel" by VTL call (vsm_init).
 *   2. The secure kernel (VTL1) enables VTL protections with a default mask,
 *      hides its own secrets page from VTL0 (no access), makes the VTL0 kernel's
 *      core code read+execute only (an HVCI-like policy), routes intercepts to
 *      SINT0, starts its own periodic timer, enables VTL1 on VP1, and returns.
 *   3. VTL0 keeps booting: VP1 is started with HvCallStartVirtualProcessor; both
 *      VPs issue secure calls with a service code in RDX (several services, at
 *      different frequencies); VTL0 takes its own timer interrupts while VTL1's
 *      timer keeps pulling the VP up to VTL1.
 *   4. A "driver" tries to read the secure kernel's secret and to patch protected
 *      kernel code: both accesses are intercepted, and the secure kernel refuses
 *      them by injecting #GP into VTL0, which reports it and carries on.
 *   5. The kernel prints a summary and exits with status 0.
 *
 * Built by vsmtrace (`vsmtrace demo`) with the guest SDK runtime (guests/runtime).
 */
#include "guest.h"
#include "apic.h"
#include "vsm.h"

#define DEMO_VPS 2
#define VTL0_TIMER_VECTOR 0x40
#define VTL0_TIMER_COUNT 2000000u  /* 2 ms at the 1 GHz APIC timer clock */
#define VTL1_TIMER_COUNT 5000000u  /* 5 ms */
#define X86_GP 13

/* Secure services (the value in RDX at the VTL call). */
#define SVC_GET_RANDOM 0x1001
#define SVC_SEAL_KEY 0x1002
#define SVC_VERIFY_IMAGE 0x1003
#define SVC_ATTEST 0x1004
#define SVC_POLICY 0x10FF

/* How many of each service VP0 and VP1 call (the report's secure-call counts). */
#define VP0_GET_RANDOM 24
#define VP0_SEAL_KEY 12
#define VP0_VERIFY_IMAGE 6
#define VP1_ATTEST 8

/* The VTL0 kernel's "core" code: its own page(s), made read+execute by VTL1. */
__asm__(".section .text.kcore, \"ax\"\n"
        ".balign 4096\n"
        ".globl kcore_start\n"
        "kcore_start:\n"
        ".globl kcore_checksum\n"
        "kcore_checksum:\n" /* rdi = buffer, rsi = length -> eax = byte sum */
        "    xor %eax, %eax\n"
        "1:  test %rsi, %rsi\n"
        "    jz 2f\n"
        "    movzbl (%rdi), %ecx\n"
        "    add %ecx, %eax\n"
        "    inc %rdi\n"
        "    dec %rsi\n"
        "    jmp 1b\n"
        "2:  ret\n"
        ".globl driver_patch\n"
        "driver_patch:\n" /* rdi = code address: the 'driver' overwrites one byte */
        "    movb $0x90, (%rdi)\n"
        ".globl driver_patch_done\n"
        "driver_patch_done:\n"
        "    ret\n"
        ".globl driver_peek\n"
        "driver_peek:\n" /* rdi = address: the 'driver' reads a qword */
        "    mov (%rdi), %rax\n"
        ".globl driver_peek_done\n"
        "driver_peek_done:\n"
        "    ret\n"
        ".balign 4096\n"
        ".globl kcore_end\n"
        "kcore_end:\n"
        ".text\n");

extern uint8_t kcore_start[], kcore_end[];
uint32_t kcore_checksum(const void *buf, uint64_t len);
void driver_patch(void *code);
uint64_t driver_peek(const void *addr);
extern uint8_t driver_patch_done[], driver_peek_done[];

/* The secure kernel's secret: VTL1 fills it, then hides the page from VTL0. */
static uint8_t secure_secret[4096] __attribute__((aligned(4096)));

static volatile uint32_t vtl0_ticks;
static volatile uint32_t ap_done;
static volatile uint32_t gp_blocked;
static volatile uint64_t calls[DEMO_VPS][8];

/* ---- VTL1: the secure kernel ------------------------------------------------------ */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t vtl1_random(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

void vtl1_user_init(uint32_t vp)
{
    if (vp == 0)
        apic_timer_periodic(VSM_VTL1_TIMER_VECTOR, VTL1_TIMER_COUNT, 1);
}

static uint64_t vtl1_apply_policy(uint32_t vp)
{
    /* VTL protections on, default: everything allowed. */
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
    uint16_t st = hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, cfg, 0);
    if (st)
        return st;
    for (int i = 0; i < 64; i++)
        secure_secret[i] = (uint8_t)(0xA5 ^ i);
    /* Hide the secret from VTL0. */
    st = hv_modify_vtl_protection((uint64_t)secure_secret, 1, HV_MAP_GPA_NONE, HV_VTL_SELF);
    if (st)
        return st;
    /* HVCI-like: VTL0's core kernel code may be read and executed, never written. */
    int pages = (int)(((uint64_t)kcore_end - (uint64_t)kcore_start) >> 12);
    st = hv_modify_vtl_protection((uint64_t)kcore_start, pages, HV_MAP_GPA_READ | HV_MAP_GPA_KX, HV_VTL_SELF);
    if (st)
        return st;
    /* Intercepts from VTL0 are refused with #GP(0) in VTL0. */
    for (uint32_t i = 0; i < DEMO_VPS; i++) {
        vsm_log[i].action = VSM_ACT_INJECT;
        vsm_log[i].action_arg = HV_PENDING_EXCEPTION(X86_GP, 1, 0);
    }
    printf("[vtl1] secure kernel on VP%u: VTL protection enabled (default RWX), secret page %p hidden,\n", vp,
           secure_secret);
    printf("[vtl1]   kernel core %p..%p made R+X (HVCI-like), intercepts routed to SINT0, timer running\n",
           kcore_start, kcore_end);
    return 0;
}

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)m;
    const struct vsm_regs *r = &vsm_vtl1_entry_regs[vp];
    switch (r->rdx) {
    case SVC_POLICY:
        return vtl1_apply_policy(vp);
    case SVC_GET_RANDOM:
        return vtl1_random();
    case SVC_SEAL_KEY:
#ifdef DEMO_REGRESSION
        /* A planted regression (built with -DDEMO_REGRESSION=N; notebooks/fleet.ipynb): sealing
         * re-reads a VP register N times, so each seal_key call makes N more hypercalls in VTL1. */
        for (int i = 0; i < DEMO_REGRESSION; i++) {
            uint64_t lo, hi;
            hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, &lo, &hi);
        }
#endif
        return (r->r8 * 0x100000001B3ull) ^ secure_secret[r->r8 & 63];
    case SVC_VERIFY_IMAGE:
        return kcore_checksum(kcore_start, 64) == (uint32_t)r->r8;
    case SVC_ATTEST:
        return 0xA77E5700ull | vp;
    default:
        return ~0ull;
    }
}

/* ---- VTL0: the normal kernel -------------------------------------------------------- */
static uint64_t secure_call(uint32_t vp, uint64_t service, uint64_t arg)
{
    struct vsm_regs load, capture;
    memset(&load, 0, sizeof(load));
    load.rdx = service;
    load.r8 = arg;
    vsm_mbox[vp].op = VSM_OP_USER;
    vtl_call_regs(&load, &capture);
    calls[vp][service & 7]++;
    return vsm_mbox[vp].ret[0];
}

static void vtl0_tick(struct int_frame *f)
{
    (void)f;
    vtl0_ticks++;
    apic_eoi();
}

static bool vtl0_gp(struct int_frame *f)
{
    if (f->rip == (uint64_t)driver_patch) {
        f->rip = (uint64_t)driver_patch_done;
    } else if (f->rip == (uint64_t)driver_peek) {
        f->rip = (uint64_t)driver_peek_done;
        f->rax = 0;
    } else {
        return false;
    }
    gp_blocked++;
    return true;
}

static void ap_main(uint32_t vp)
{
    if (!vsm_init_ap()) {
        printf("[vtl0] VP%u: first VTL call failed\n", vp);
        qemu_exit(1);
    }
    printf("[vtl0] VP%u online in VTL0, secure kernel reachable\n", vp);
    for (int i = 0; i < VP1_ATTEST; i++)
        secure_call(vp, SVC_ATTEST, (uint64_t)i);
    atomic_inc32(&ap_done);
    for (;;)
        sti_hlt();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("[vtl0] vsmtrace VBS demo: booting the VTL0 kernel on VP0 (%d VPs)\n", DEMO_VPS);
    set_exception_handler(X86_GP, vtl0_gp);
    set_irq_handler(VTL0_TIMER_VECTOR, vtl0_tick);
    apic_enable();

    printf("[vtl0] enabling VTL1 for the partition and VP0, entering the secure kernel by VTL call\n");
    if (!vsm_init(false)) {
        printf("[vtl0] VSM setup failed\n");
        return 1;
    }
    if (secure_call(0, SVC_POLICY, 0) != 0) {
        printf("[vtl0] the secure kernel refused to apply its policy\n");
        return 1;
    }
    uint64_t st = vtl1_op(VSM_OP_ENABLE_VP, 1, 0, 0, 0, 0);
    printf("[vtl0] secure kernel enabled VTL1 on VP1 (status 0x%lx); starting VP1\n", st);
    if (st != 0 || vsm_start_ap(1, ap_main) != 0) {
        printf("[vtl0] could not start VP1\n");
        return 1;
    }

    apic_timer_periodic(VTL0_TIMER_VECTOR, VTL0_TIMER_COUNT, 1);
    sti();
    printf("[vtl0] kernel boot continues: drivers call secure services\n");
    uint32_t expected = kcore_checksum(kcore_start, 64);
    uint64_t verified = 0;
    for (int i = 0; i < VP0_GET_RANDOM; i++) {
        secure_call(0, SVC_GET_RANDOM, 0);
        if (i % 2 == 0)
            secure_call(0, SVC_SEAL_KEY, (uint64_t)i);
        if (i % 4 == 0)
            verified += secure_call(0, SVC_VERIFY_IMAGE, expected);
    }
    printf("[vtl0] %u of %d image verifications passed\n", (uint32_t)verified, VP0_VERIFY_IMAGE);

    printf("[vtl0] driver: reading the secure kernel's secret at %p\n", secure_secret);
    uint64_t peeked = driver_peek(secure_secret);
    printf("[vtl0] driver: patching kernel code at %p\n", (void *)kcore_checksum);
    driver_patch((void *)kcore_checksum);
    printf("[vtl0] both attempts were blocked by the secure kernel (#GP x%u, read returned 0x%lx); still running\n",
           gp_blocked, peeked);
    if (kcore_checksum(kcore_start, 64) != expected)
        printf("[vtl0] kernel code changed!\n");

    while (atomic_load32(&ap_done) == 0 || vtl0_ticks < 10)
        sti_hlt();
    apic_timer_stop();
    cli();
    printf("[vtl0] summary: secure calls VP0 get_random=%lu seal_key=%lu verify_image=%lu, VP1 attest=%lu\n",
           calls[0][SVC_GET_RANDOM & 7], calls[0][SVC_SEAL_KEY & 7], calls[0][SVC_VERIFY_IMAGE & 7],
           calls[1][SVC_ATTEST & 7]);
    printf("[vtl0] summary: VTL0 timer ticks=%u, VTL1 timer interrupts=%u, intercepts handled by VTL1=%u\n",
           vtl0_ticks, vsm_log[0].timer_irqs, vsm_log[0].intercepts);
    bool ok = gp_blocked == 2 && vsm_log[0].intercepts == 2 && verified == VP0_VERIFY_IMAGE;
    printf("[vtl0] demo %s\n", ok ? "complete" : "FAILED");
    return ok ? 0 : 1;
}
