/*
 * fuzz.c - an adversarial two-VTL guest: random and near-valid hypercalls, MSR accesses and
 * VTL transitions from VTL0 (and from VTL1 on VTL0's behalf), on every VP at once, against
 * canaries VTL1 placed before the fuzzing starts.  See docs/fuzzing.md.
 *
 * Command line: seed=N iters=N (per VP) cpus=N report=N (progress line every N iterations)
 * spare=1 (VP number cpus exists and is never started: VTL1 loads random state into it)
 * start=N (first iteration number: every iteration's PRNG is seeded from (seed, vp, iteration),
 * so one iteration can be replayed alone with start=K iters=1).
 *
 * Serial lines (all start with "fuzz "):
 *   fuzz start seed=S iters=N cpus=C
 *   fuzz vp=V iter=I calls=H ud=U gp=G irqs=Q       progress, every report= iterations per VP
 *   fuzz vp=V done iters=N calls=H ud=U gp=G irqs=Q
 *   fuzz check <name> ok | fuzz check <name> FAIL <detail>   isolation probes after fuzzing
 *   fuzz finished failures=F                                 exit code 0 if F == 0, else 1
 *
 * Canaries (VTL1 places them, then protects them against VTL0; docs/fuzzing.md):
 *   canary_secret  no access for VTL0; holds secret words (see secret_word)
 *   canary_ro      read-only for VTL0; holds a known pattern
 *   canary_nx      no access for VTL0; holds "mov eax, 0xC0DE; ret": no fetch from it may ever
 *                  complete. (A *readable* no-execute page cannot deny execute on upstream KVM:
 *                  reads win there and vsmtrace reports the limitation, docs/vsm.md; so the
 *                  execute oracle uses a page whose every access VTL1 denied.)
 *   VTL1's LSTAR/CSTAR/KERNEL_GS_BASE/SYSENTER_EIP/SYSENTER_ESP hold secret words too
 *   (GetVpRegisters of VTL1 from VTL0 must never reveal them).
 *
 * Everything the fuzzer writes through the VMM goes to its arena pages, unbacked GPAs, MMIO,
 * the unused tail of its hypercall page or the canaries, never to its own code or data, so a
 * guest crash is always the VMM's doing.
 */
#include "apic.h"
#include "vsm.h"

#define ARENA_PAGES 8
#define SECRET_TAG 0x5ECu
#define NSECRET 512
#define PAGE 4096ull
#define EMULATED_READ 0x5EC0DEull
#define NX_CODE_RESULT 0xC0DEu
#define NX_RECOVERED 0xBADu
#define UNBACKED_GPA (1ull << 36) /* far above any RAM the campaign gives the guest */
#define HC_PAGE_TAIL 0x800        /* hypercall page offsets from here on hold no code */

/* ---- memory -------------------------------------------------------------------------- */
static uint8_t arena[ARENA_PAGES][PAGE] __attribute__((aligned(PAGE)));
static uint8_t v1arena[VSM_MAX_VPS][PAGE] __attribute__((aligned(PAGE))); /* VTL1's own buffers */
/* op_near_valid's input pages, one per VP, outside the arena: another VP's fill_random must not
   rewrite a register call between its building and its issue (bench/fuzz seed 1001 on 4 VPs:
   VP 1's harmless SetVpRegisters of its own VTL0 became one of RIP = 2) */
static uint8_t nv_in[VSM_MAX_VPS][PAGE] __attribute__((aligned(PAGE)));
static uint8_t canary_secret[PAGE] __attribute__((aligned(PAGE)));
static uint8_t canary_ro[PAGE] __attribute__((aligned(PAGE)));
static uint8_t canary_nx[PAGE] __attribute__((aligned(PAGE)));
static uint8_t vtl0_simp[VSM_MAX_VPS][PAGE] __attribute__((aligned(PAGE)));
static uint8_t vtl0_siefp[VSM_MAX_VPS][PAGE] __attribute__((aligned(PAGE)));
static uint8_t vtl0_assist[VSM_MAX_VPS][PAGE] __attribute__((aligned(PAGE)));

extern uint8_t vtl1_hypercall_page[HV_PAGE_SIZE];

/* ---- PRNG: splitmix64 seeded per (seed, vp, iteration) ------------------------------- */
static uint64_t mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

struct rng {
    uint64_t s;
};
static uint64_t rnd(struct rng *r)
{
    r->s += 0x9E3779B97F4A7C15ull;
    return mix64(r->s);
}
static uint64_t below(struct rng *r, uint64_t n) { return n ? rnd(r) % n : 0; }
static bool chance(struct rng *r, unsigned pct) { return below(r, 100) < pct; }

/* The secret: word i of canary_secret.  Low 32 bits carry a tag and the index, so a scan
 * recognises a leaked word without knowing the key; the harness computes the same words. */
static uint64_t secret_key;
static uint64_t secret_word(uint64_t key, uint32_t i)
{
    return (mix64(key + i) & 0xFFFFFFFF00000000ull) | ((uint64_t)SECRET_TAG << 20) | i;
}
static uint64_t ro_word(uint64_t key, uint32_t i) { return mix64(key ^ 0x520520520ull ^ i); }
/* The VTL1 private registers that hold secrets must be canonical: secret word & this mask. */
#define REG_SECRET_MASK 0x00007FFFFFFFFFF0ull
static const uint32_t secret_msrs[] = {0xC0000082, 0xC0000083, 0xC0000102, 0x176, 0x175};

/* ---- the hypercall stub: every shared register may change across it ------------------ */
struct fz_io {
    uint64_t rdx, r8;
    uint64_t xmm[12]; /* XMM0..XMM5, low qword first */
    uint64_t rax;     /* RAX at the call (the VTL call/return input) */
};
uint64_t fz_raw(uint64_t control, struct fz_io *io, uint64_t entry);
/* Trap instructions outside the hypercall page: outb/outw/outl/inb on the trap port. */
uint64_t fz_trap_out8(uint64_t control, struct fz_io *io);
uint64_t fz_trap_out16(uint64_t control, struct fz_io *io);
uint64_t fz_trap_out32(uint64_t control, struct fz_io *io);
uint64_t fz_trap_in8(uint64_t control, struct fz_io *io);
extern char fz_t8[], fz_t8e[], fz_t16[], fz_t16e[], fz_t32[], fz_t32e[], fz_ti8[], fz_ti8e[];
uint32_t fz_exec(uint64_t addr);
uint32_t fz_nx_recover(void);
uint64_t fz_read_probe(uint64_t addr);
void fz_write_probe(uint64_t addr, uint64_t value);
extern char fz_read_insn[], fz_write_insn[];

#define FZ_SAVE "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
#define FZ_REST "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"
#define FZ_LOAD                                                                                        \
    "    pushq %rsi\n    movq %rsi, %rbx\n"                                                            \
    "    movdqu 16(%rbx), %xmm0\n    movdqu 32(%rbx), %xmm1\n    movdqu 48(%rbx), %xmm2\n"             \
    "    movdqu 64(%rbx), %xmm3\n    movdqu 80(%rbx), %xmm4\n    movdqu 96(%rbx), %xmm5\n"             \
    "    movq %rdi, %rcx\n    movq 0(%rbx), %rdx\n    movq 8(%rbx), %r8\n    movq 112(%rbx), %rax\n"
#define FZ_STORE                                                                                       \
    "    movq 0(%rsp), %rbx\n    movq %rdx, 0(%rbx)\n    movq %r8, 8(%rbx)\n"                          \
    "    movdqu %xmm0, 16(%rbx)\n    movdqu %xmm1, 32(%rbx)\n    movdqu %xmm2, 48(%rbx)\n"             \
    "    movdqu %xmm3, 64(%rbx)\n    movdqu %xmm4, 80(%rbx)\n    movdqu %xmm5, 96(%rbx)\n"             \
    "    addq $8, %rsp\n"
#define FZ_TRAP(name, label, insn)                                                                     \
    ".globl " name "\n" name ":\n" FZ_SAVE FZ_LOAD ".globl " label "\n" label ":\n    " insn "\n"      \
    ".globl " label "e\n" label "e:\n" FZ_STORE FZ_REST "    ret\n"

__asm__(".text\n"
        /* uint64_t fz_raw(control=rdi, io=rsi, entry=rdx) */
        ".globl fz_raw\n"
        "fz_raw:\n" FZ_SAVE "    movq %rdx, %r12\n" FZ_LOAD "    call *%r12\n" FZ_STORE FZ_REST "    ret\n"
        FZ_TRAP("fz_trap_out8", "fz_t8", "outb %al, $0x58")
        FZ_TRAP("fz_trap_out16", "fz_t16", "outw %ax, $0x58")
        FZ_TRAP("fz_trap_out32", "fz_t32", "outl %eax, $0x58")
        FZ_TRAP("fz_trap_in8", "fz_ti8", "inb $0x58, %al")
        /* uint32_t fz_exec(addr): call into addr (the no-execute canary). */
        ".globl fz_exec\n"
        "fz_exec:\n    xorl %eax, %eax\n    call *%rdi\n    ret\n"
        ".globl fz_nx_recover\n"
        "fz_nx_recover:\n    movl $0xBAD, %eax\n    ret\n"
        ".globl fz_read_probe, fz_read_insn\n"
        "fz_read_probe:\n    xorl %eax, %eax\nfz_read_insn:\n    movq (%rdi), %rax\n    ret\n"
        ".globl fz_write_probe, fz_write_insn\n"
        "fz_write_probe:\nfz_write_insn:\n    movq %rsi, (%rdi)\n    ret\n");

/* ---- per-VP counters and configuration ------------------------------------------------- */
struct vp_stats {
    volatile uint64_t calls, ud, gp, irqs, iters;
};
static struct vp_stats stats[VSM_MAX_VPS];
static struct vp_stats v1stats[VSM_MAX_VPS];
static uint64_t seed, iters, start, report_every;
static uint32_t ncpus;
static volatile uint32_t vps_done;
static volatile uint32_t ap_started[VSM_MAX_VPS];
static volatile uint32_t failures;

static uint32_t my_vp(void)
{
    uint32_t vp = vsm_vp_index();
    return vp < VSM_MAX_VPS ? vp : VSM_MAX_VPS - 1;
}

/* ---- VTL0 exception and interrupt handlers ------------------------------------------- */
struct trap_site {
    char *at, *after;
};
static struct trap_site trap_sites[4];

static bool vtl0_fault(struct int_frame *f)
{
    struct vp_stats *s = &stats[my_vp()];
    uint64_t page = (uint64_t)hv_hypercall_page;
    if (f->rip >= page && f->rip < page + HV_PAGE_SIZE) { /* #UD/#GP from a hypercall page stub */
        f->rip = *(uint64_t *)f->rsp;
        f->rsp += 8;
        f->rax = ~0ull;
    } else {
        bool known = false;
        for (unsigned i = 0; i < ARRAY_SIZE(trap_sites); i++)
            if (f->rip == (uint64_t)trap_sites[i].at) {
                f->rip = (uint64_t)trap_sites[i].after;
                f->rax = ~0ull;
                known = true;
            }
        if (!known)
            return false; /* rdmsr_safe/wrmsr_safe, or a real fault: the runtime decides */
    }
    if (f->vector == 6)
        s->ud++;
    else
        s->gp++;
    return true;
}

static void vtl0_irq(struct int_frame *f)
{
    (void)f;
    stats[my_vp()].irqs++;
    apic_eoi();
}

/* ---- VTL1 side ---------------------------------------------------------------------------- */
enum user_op { U_SETUP = 1, U_REGS, U_FUZZ, U_CHECK, U_KEY };

static bool vtl1_fault(struct int_frame *f)
{
    uint64_t page = (uint64_t)vtl1_hypercall_page;
    if (f->rip < page || f->rip >= page + HV_PAGE_SIZE)
        return false;
    f->rip = *(uint64_t *)f->rsp;
    f->rsp += 8;
    f->rax = ~0ull;
    struct vp_stats *s = &v1stats[my_vp()];
    if (f->vector == 6)
        s->ud++;
    else
        s->gp++;
    return true;
}

bool vtl1_exception_hook(struct int_frame *f) { return vtl1_fault(f); }

static void vtl1_irq(struct int_frame *f)
{
    (void)f;
    v1stats[my_vp()].irqs++;
    apic_eoi();
}

static uint16_t v1_protect(void *page, uint32_t mask)
{
    return hv_modify_vtl_protection((uint64_t)page, 1, mask, HV_VTL_SELF);
}

static void v1_set_secret_regs(void)
{
    for (uint32_t i = 0; i < ARRAY_SIZE(secret_msrs); i++)
        wrmsr(secret_msrs[i], secret_word(secret_key, i) & REG_SECRET_MASK);
}

static uint64_t v1_setup(uint64_t key)
{
    secret_key = key;
    for (uint32_t i = 0; i < NSECRET; i++) {
        ((uint64_t *)canary_secret)[i] = secret_word(key, i);
        ((uint64_t *)canary_ro)[i] = ro_word(key, i);
    }
    static const uint8_t code[] = {0xB8, 0xDE, 0xC0, 0x00, 0x00, 0xC3}; /* mov eax, 0xC0DE; ret */
    memset(canary_nx, 0xC3, PAGE);
    memcpy(canary_nx, code, sizeof(code));
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
    uint64_t bad = 0;
    if (hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, cfg, 0))
        bad |= 1;
    if (v1_protect(canary_secret, HV_MAP_GPA_NONE))
        bad |= 2;
    if (v1_protect(canary_ro, HV_MAP_GPA_READ))
        bad |= 4;
    if (v1_protect(canary_nx, HV_MAP_GPA_NONE))
        bad |= 8;
    for (int v = 0; v < VSM_MAX_VPS; v++)
        if (v1_protect(v1arena[v], HV_MAP_GPA_NONE))
            bad |= 16;
    return bad;
}

static uint64_t v1_check(void)
{
    uint64_t bad = 0;
    for (uint32_t i = 0; i < NSECRET; i++) {
        if (((uint64_t *)canary_secret)[i] != secret_word(secret_key, i))
            bad |= 1;
        if (((uint64_t *)canary_ro)[i] != ro_word(secret_key, i))
            bad |= 2;
    }
    for (uint32_t i = 0; i < ARRAY_SIZE(secret_msrs); i++)
        if (rdmsr(secret_msrs[i]) != (secret_word(secret_key, i) & REG_SECRET_MASK))
            bad |= 8;
    return bad;
}

/* Register names VTL1 may set on VTL0 without breaking VTL0's control flow. */
static const uint32_t harmless_regs[] = {
    HV_REG_TSC_AUX, HV_REG_KERNEL_GS_BASE, HV_REG_STAR, HV_REG_CSTAR, HV_REG_SFMASK, HV_REG_SYSENTER_CS,
    HV_REG_SYSENTER_EIP, HV_REG_SYSENTER_ESP, HV_REG_DR0, 0x00050001u, 0x00050002u, 0x00050003u,
};
/* Register names to read (any VTL, any VP): a spread over every class, plus random ones. */
static const uint32_t read_regs[] = {
    HV_REG_RAX, HV_REG_RIP, HV_REG_RSP, HV_REG_RFLAGS, HV_REG_CR0, HV_REG_CR3, HV_REG_CR4, HV_REG_CR8,
    HV_REG_DR7, HV_REG_CS, HV_REG_SS, HV_REG_TR, HV_REG_LDTR, HV_REG_GDTR, HV_REG_IDTR, HV_REG_EFER,
    HV_REG_KERNEL_GS_BASE, HV_REG_LSTAR, HV_REG_CSTAR, HV_REG_SYSENTER_EIP, HV_REG_SYSENTER_ESP, HV_REG_PAT,
    HV_REG_APIC_BASE, HV_REG_TSC_AUX, HV_REG_PENDING_EVENT0, HV_REG_GUEST_OS_ID, HV_REG_VP_INDEX,
    HV_REG_VP_ASSIST_PAGE, HV_REG_HYPERCALL, HV_REG_SINT0, HV_REG_SCONTROL, HV_REG_SIMP,
    HV_REG_VSM_CODE_PAGE_OFFSETS, HV_REG_VSM_VP_STATUS, HV_REG_VSM_PARTITION_STATUS, HV_REG_VSM_CAPABILITIES,
    HV_REG_VSM_PARTITION_CONFIG, HV_REG_VSM_VP_SECURE_CONFIG_VTL0, 0x000D0011u, 0x000D0005u, HV_REG_XMM0,
    0x00090004u, 0x000B0000u, 0x000B0001u, 0x00010005u,
};

static void random_context(struct rng *r, struct hv_initial_vp_context *ctx);
static uint32_t spare_vp; /* a VP that is never started (spare=1): its state may be anything */

extern char __image_start[], __image_end[];

/* A page of this image outside VTL0's arena: VTL1's own code and data, its buffers and the
   canaries. VTL1's random protection changes must leave those alone: VTL1 unprotecting its
   own canaries is its right, and would only make the isolation oracle meaningless. */
static uint64_t v1_spare_pfn(struct rng *r, uint64_t pfn)
{
    uint64_t first = (uint64_t)__image_start >> 12, last = ((uint64_t)__image_end - 1) >> 12;
    uint64_t a0 = (uint64_t)arena[0] >> 12, a1 = (uint64_t)arena[ARENA_PAGES - 1] >> 12;
    if (pfn >= first && pfn <= last && (pfn < a0 || pfn > a1))
        return (uint64_t)arena[below(r, ARENA_PAGES)] >> 12;
    return pfn;
}

static uint64_t v1_fuzz(uint32_t vp, uint64_t s)
{
    struct rng r = {s};
    struct fz_io io;
    uint8_t *buf = v1arena[vp];
    uint64_t res = 0;
    memset(&io, 0, sizeof(io));
    switch (below(&r, spare_vp ? 10 : 8)) {
    case 8: { /* the spare VP (never started): any register of its VTL0, any value, loaded into KVM */
        uint32_t name = chance(&r, 85) ? read_regs[below(&r, ARRAY_SIZE(read_regs))] : (uint32_t)rnd(&r);
        /* not the registers a VTL shares across its VPs (the hypercall page, the guest OS ID):
           VTL1 moving VTL0's hypercall overlay onto VTL0's own code is VTL1's right, and it
           would wreck the running VPs' harness rather than test the VMM */
        if (name == HV_REG_HYPERCALL || name == HV_REG_GUEST_OS_ID)
            name = HV_REG_RAX;
        /* nor the TLB lock: a VP that never runs never returns to VTL0, so a lock set on it
           would block every flush of the running VPs for good (TLFS: released only by clearing
           it or by that VP's VTL return) - a hang VTL1 chose, not one the VMM caused */
        if (name == HV_REG_VSM_VP_SECURE_CONFIG_VTL0)
            name = HV_REG_RAX;
        uint64_t v = chance(&r, 50) ? rnd(&r) : 1ull << below(&r, 64);
        res = hv_set_vp_register_of(spare_vp, chance(&r, 80) ? HV_VTL(0) : HV_VTL(1), name, v, chance(&r, 80) ? 0 : rnd(&r));
        break;
    }
    case 9: { /* the spare VP: enable VTL1 with a random initial context (it never runs) */
        struct hv_initial_vp_context ctx;
        random_context(&r, &ctx);
        res = hv_enable_vp_vtl(HV_PARTITION_ID_SELF, spare_vp, 1, &ctx);
        break;
    }
    case 0: { /* random protections on VTL0's arena (and pages that are not RAM) */
        int n = (int)below(&r, 4) + 1;
        uint64_t *in = (uint64_t *)buf;
        in[0] = chance(&r, 90) ? HV_PARTITION_ID_SELF : rnd(&r);
        ((uint32_t *)buf)[2] = chance(&r, 80) ? (uint32_t)below(&r, 16) : (uint32_t)rnd(&r);
        buf[12] = chance(&r, 70) ? HV_VTL_SELF : (uint8_t)rnd(&r);
        buf[13] = buf[14] = buf[15] = chance(&r, 90) ? 0 : (uint8_t)rnd(&r);
        for (int i = 0; i < n; i++) {
            uint64_t pfn = ((uint64_t)arena[below(&r, ARENA_PAGES)] >> 12);
            if (chance(&r, 10))
                pfn = v1_spare_pfn(&r, rnd(&r) >> (12 + below(&r, 40)));
            in[2 + i] = pfn;
        }
        uint64_t ctl = HVCALL_MODIFY_VTL_PROTECTION_MASK | HV_CONTROL_REP_COUNT(n);
        if (chance(&r, 10))
            ctl |= HV_CONTROL_REP_START(below(&r, (uint64_t)n + 1));
        res = fz_raw(ctl, &(struct fz_io){.rdx = (uint64_t)buf}, (uint64_t)vtl1_hypercall_page);
        break;
    }
    case 1: { /* translate VTL0 addresses, random flags */
        uint64_t gva = chance(&r, 50) ? (uint64_t)arena[below(&r, ARENA_PAGES)] + below(&r, PAGE) : rnd(&r);
        if (chance(&r, 20))
            gva = (uint64_t)canary_secret + below(&r, PAGE);
        uint64_t flags = below(&r, 0x40) | (chance(&r, 70) ? HV_XLATE_INPUT_VTL(HV_VTL(0)) : 0);
        uint64_t lo, hi;
        uint32_t target = chance(&r, 90) ? HV_VP_INDEX_SELF : (uint32_t)below(&r, 6);
        /* TLB_FLUSH_INHIBIT only on this VP: a lock taken on another VP is released by *that*
           VP's return to VTL0 (TLFS; the KVM VSM series does the same), so a lock on the spare VP,
           or on a VP that flushes itself before its next VTL call, suspends flushing VPs for good -
           a deadlock VTL1 chose (vsmtrace stops such a run as a guest deadlock), not a VMM defect */
        if (target != HV_VP_INDEX_SELF)
            flags &= ~(uint64_t)HV_XLATE_TLB_FLUSH_INHIBIT;
        res = hv_translate_va(target, gva, flags, &lo, &hi);
        break;
    }
    case 2: { /* read VTL0's registers */
        uint32_t name = chance(&r, 85) ? read_regs[below(&r, ARRAY_SIZE(read_regs))] : (uint32_t)rnd(&r);
        uint64_t lo, hi;
        res = hv_get_vp_register_of(chance(&r, 80) ? HV_VP_INDEX_SELF : (uint32_t)below(&r, 6),
                                    chance(&r, 50) ? HV_VTL(0) : (uint8_t)below(&r, 0x20), name, &lo, &hi);
        break;
    }
    case 3: { /* set harmless VTL0 registers */
        uint32_t name = harmless_regs[below(&r, ARRAY_SIZE(harmless_regs))];
        res = hv_set_vp_register(HV_VTL(0), name, rnd(&r) & REG_SECRET_MASK, chance(&r, 90) ? 0 : rnd(&r));
        break;
    }
    case 4: /* VTL call from VTL1 (no higher VTL: #UD) and bad VTL returns (#UD) */
        io.rax = chance(&r, 50) ? 0 : rnd(&r);
        res = fz_raw(chance(&r, 50) ? HVCALL_VTL_CALL : (HVCALL_VTL_CALL | (rnd(&r) << 16)), &io,
                     (uint64_t)vtl1_hypercall_page);
        break;
    case 5: { /* a random hypercall with buffers in VTL1's own page */
        io.rdx = (uint64_t)buf + (below(&r, 4) * 8);
        io.r8 = (uint64_t)buf + 2048 + (below(&r, 4) * 8);
        for (int i = 0; i < 16; i++)
            ((uint64_t *)buf)[i] = chance(&r, 30) ? HV_PARTITION_ID_SELF : rnd(&r) & 0xFFFF;
        uint64_t control = below(&r, 0x100) | (chance(&r, 30) ? HV_CONTROL_REP_COUNT(below(&r, 4)) : 0) |
                           (chance(&r, 20) ? HV_CONTROL_FAST : 0);
        if (control == HVCALL_VTL_RETURN)
            control |= HV_CONTROL_REP_COUNT(1); /* a real VTL return would leave this request half served */
        if ((control & 0xFFFF) == HVCALL_MODIFY_VTL_PROTECTION_MASK)
            for (int i = 2; i < 16; i++) /* the page list (entries from 2 on, wherever the input starts) */
                ((uint64_t *)buf)[i] = v1_spare_pfn(&r, ((uint64_t *)buf)[i]);
        res = fz_raw(control, &io, (uint64_t)vtl1_hypercall_page);
        break;
    }
    case 6: { /* VTL1 MSR reads of its own synthetic state */
        uint64_t v;
        uint32_t msr = 0x40000000u + (uint32_t)below(&r, 0x120);
        if (msr != 0x400000F0u) /* GUEST_IDLE waits for an interrupt */
            res = rdmsr_safe(msr, &v);
        break;
    }
    default: /* VSM partition config rewrites (write-once protection bit, reserved bits) */
        res = hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG,
                                 HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(below(&r, 16)) |
                                     (chance(&r, 30) ? rnd(&r) << 5 : 0),
                                 0);
        /* whatever happened, VTL0's arena defaults stay RWX for the pages it touches */
        break;
    }
    v1stats[vp].calls++;
    return res;
}

void vtl1_user_init(uint32_t vp)
{
    (void)vp;
    for (int v = 32; v < 255; v++)
        if (v != VSM_SINT0_VECTOR && v != VSM_VTL1_TIMER_VECTOR && (v < VSM_VTL1_IPI_VECTOR || v > VSM_VTL1_IPI_VECTOR + 3))
            vtl1_set_irq_handler((uint8_t)v, vtl1_irq);
}

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    switch (m->arg[0]) {
    case U_SETUP:
        return v1_setup(m->arg[1]);
    case U_REGS:
        v1_set_secret_regs();
        return 0;
    case U_FUZZ:
        return v1_fuzz(vp, m->arg[1]);
    case U_CHECK:
        return v1_check();
    case U_KEY:
        return secret_key;
    default:
        return ~0ull;
    }
}

/* ---- VTL0: targets -------------------------------------------------------------------------- */
/* A GPA for hypercall input (write = false) or output (write = true) buffers. */
static uint64_t pick_gpa(struct rng *r, bool write)
{
    uint64_t base, off;
    switch (below(r, 14)) {
    case 0: case 1: case 2: case 3: case 4: case 5:
        base = (uint64_t)arena[below(r, ARENA_PAGES)];
        break;
    case 6:
        return UNBACKED_GPA + (below(r, 0x1000) << 12) + below(r, 64) * 8;
    case 7:
        return chance(r, 50) ? APIC_MMIO_BASE + below(r, 0x100) * 8 : 0xFEC00000ull + below(r, 8) * 8;
    case 8:
        base = (uint64_t)hv_hypercall_page;
        if (write)
            return base + HC_PAGE_TAIL + below(r, (PAGE - HC_PAGE_TAIL) / 8) * 8;
        break;
    case 9: case 10:
        base = (uint64_t)canary_secret;
        break;
    case 11:
        base = (uint64_t)canary_ro;
        break;
    case 12:
        base = (uint64_t)canary_nx;
        break;
    default:
        return chance(r, 50) ? rnd(r) : (rnd(r) & ~7ull) >> below(r, 64);
    }
    switch (below(r, 6)) {
    case 0: off = 0; break;
    case 1: off = below(r, 256) * 8; break;
    case 2: off = below(r, PAGE); break;            /* mostly unaligned */
    case 3: off = PAGE - 8 * (below(r, 4) + 1); break; /* near the end: straddles for bigger blocks */
    case 4: off = PAGE - 1 - below(r, 7); break;
    default: off = 2048 + below(r, 128) * 8; break;
    }
    return base + off;
}

static void fill_random(struct rng *r, uint64_t gpa, unsigned bytes)
{
    /* Only the arena is ever filled: other targets are read-only to us or not memory. The
       register-call header it shapes names only harmless registers: the arena is shared, and a
       real VTL0 register name there (RIP, CR3, ...) could meet another VP's VTL0 target and a
       random value. op_near_valid reads and writes every register class from private pages. */
    uint64_t a = (uint64_t)arena[0], end = a + sizeof(arena);
    if (gpa < a || gpa >= end)
        return;
    if (gpa + bytes > end)
        bytes = (unsigned)(end - gpa);
    uint8_t *p = (uint8_t *)gpa;
    uint64_t hdr[4] = {HV_PARTITION_ID_SELF, below(r, 6) | (chance(r, 50) ? 0 : (uint64_t)HV_VTL(below(r, 2)) << 32),
                       (uint64_t)harmless_regs[below(r, ARRAY_SIZE(harmless_regs))], rnd(r)};
    for (unsigned i = 0; i < bytes; i++) {
        if (i < sizeof(hdr) && chance(r, 70))
            p[i] = ((uint8_t *)hdr)[i];
        else
            p[i] = chance(r, 50) ? 0 : (uint8_t)rnd(r);
    }
}

static const uint16_t known_codes[] = {
    0x0001, 0x0002, 0x0003, 0x0004, 0x0008, 0x0009, 0x000B, 0x000C, 0x000D, 0x000E, 0x000F, 0x0010,
    0x0011, 0x0012, 0x0013, 0x0014, 0x0015, 0x0044, 0x0046, 0x0048, 0x004B, 0x004E, 0x0050, 0x0051,
    0x0052, 0x0053, 0x0054, 0x0056, 0x005C, 0x005D, 0x0069, 0x0071, 0x007B, 0x007E, 0x0094, 0x0099, 0x009A,
};

static uint64_t pick_code(struct rng *r)
{
    uint64_t code;
    if (chance(r, 60))
        code = known_codes[below(r, ARRAY_SIZE(known_codes))];
    else if (chance(r, 60))
        code = below(r, 0x100);
    else
        code = rnd(r) & 0xFFFF;
    return code;
}

static uint64_t pick_control(struct rng *r, uint64_t code)
{
    uint64_t c = code;
    if (chance(r, 35)) {
        uint64_t reps = chance(r, 70) ? below(r, 8) : rnd(r) & 0xFFF;
        c |= HV_CONTROL_REP_COUNT(reps);
        if (chance(r, 30))
            c |= HV_CONTROL_REP_START(chance(r, 70) ? below(r, reps + 2) : rnd(r) & 0xFFF);
    }
    if (chance(r, 15))
        c |= HV_CONTROL_VAR_HEADER(below(r, 8));
    if (chance(r, 8))
        c |= 1ull << (27 + below(r, 5)); /* reserved 27..30, nested 31 */
    if (chance(r, 5))
        c |= 1ull << (44 + below(r, 4));
    if (chance(r, 5))
        c |= 1ull << (60 + below(r, 4));
    if (chance(r, 5))
        c = rnd(r);
    /* never the VTL call/return code with control exactly right from random bytes: those
     * have their own ops, which set the mailbox first */
    if ((c & 0xFFFF) == HVCALL_VTL_CALL || (c & 0xFFFF) == HVCALL_VTL_RETURN)
        vsm_mbox[my_vp()].op = VSM_OP_NOP;
    return c;
}

static void random_xmm(struct rng *r, struct fz_io *io)
{
    for (int i = 0; i < 12; i++)
        io->xmm[i] = chance(r, 30) ? 0 : (chance(r, 50) ? pick_gpa(r, false) : rnd(r));
}

/* ---- VTL0: operations -------------------------------------------------------------------------- */
static uint64_t hc(uint64_t control, struct fz_io *io)
{
    stats[my_vp()].calls++;
    return fz_raw(control, io, (uint64_t)hv_hypercall_page);
}

static void op_memory_call(struct rng *r)
{
    struct fz_io io = {0};
    io.rdx = pick_gpa(r, false);
    io.r8 = chance(r, 15) ? io.rdx + below(r, 8) * 8 : pick_gpa(r, true); /* sometimes overlapping */
    fill_random(r, io.rdx, (unsigned)below(r, 256));
    uint64_t control = pick_control(r, pick_code(r)) & ~HV_CONTROL_FAST;
    /* Belt and braces: a random SetVpRegisters whose header a mutation turned into a real VTL0
       register of a running VP would let VTL0 wreck its own harness - its right, not a VMM
       defect; random Set calls aim at VTL1, which must refuse them. */
    uint64_t a = (uint64_t)arena[0];
    if ((control & 0xFFFF) == HVCALL_SET_VP_REGISTERS && io.rdx >= a && io.rdx + 16 <= a + sizeof(arena))
        ((uint8_t *)io.rdx)[12] = HV_VTL(1);
    hc(control, &io);
}

static void op_fast_call(struct rng *r, bool xmm)
{
    struct fz_io io = {0};
    io.rdx = chance(r, 40) ? HV_PARTITION_ID_SELF : (chance(r, 50) ? pick_gpa(r, false) : rnd(r));
    io.r8 = chance(r, 50) ? below(r, 8) : rnd(r);
    if (xmm)
        random_xmm(r, &io);
    hc(pick_control(r, pick_code(r)) | HV_CONTROL_FAST, &io);
}

static void random_context(struct rng *r, struct hv_initial_vp_context *ctx)
{
    vsm_build_context(ctx, (uint64_t)fz_nx_recover, (uint64_t)arena[1] + PAGE, 0, 0xFFF, 0, 0xFFF);
    uint64_t *q = (uint64_t *)ctx;
    for (unsigned i = 0; i < sizeof(*ctx) / 8; i++)
        if (chance(r, 20))
            q[i] = chance(r, 50) ? rnd(r) : q[i] ^ (1ull << below(r, 64));
    if (chance(r, 20))
        ctx->rip = 0x0000800000000000ull | rnd(r); /* non-canonical */
    if (chance(r, 30)) { /* one control register, EFER or CS attribute bit flipped */
        uint64_t *f[] = {&ctx->cr0, &ctx->cr3, &ctx->cr4, &ctx->efer};
        if (chance(r, 80))
            *f[below(r, 4)] ^= 1ull << below(r, 64);
        else
            ctx->cs.attributes ^= (uint16_t)(1u << below(r, 16));
    }
}

static void op_near_valid(struct rng *r, uint32_t vp)
{
    uint8_t *in = nv_in[vp % VSM_MAX_VPS];
    uint8_t *out = arena[(vp * 2 + 1) % ARENA_PAGES];
    uint64_t *q = (uint64_t *)in;
    struct fz_io io = {.rdx = (uint64_t)in, .r8 = (uint64_t)out};
    if (chance(r, 20))
        io.r8 = pick_gpa(r, true);
    memset(in, 0, 64);
    q[0] = chance(r, 90) ? HV_PARTITION_ID_SELF : rnd(r);
    uint32_t target_vp = chance(r, 70) ? HV_VP_INDEX_SELF : (uint32_t)below(r, ncpus + 2);
    uint8_t vtl = chance(r, 40) ? HV_VTL(1) : (chance(r, 50) ? HV_VTL_SELF : (uint8_t)rnd(r));
    uint64_t control;
    switch (below(r, 10)) {
    case 0: /* GetVpRegisters: every class of name, any VTL (VTL1's secrets must stay hidden) */
    case 1: {
        unsigned n = (unsigned)below(r, 4) + 1;
        ((uint32_t *)in)[2] = target_vp;
        in[12] = vtl;
        for (unsigned i = 0; i < n; i++)
            ((uint32_t *)in)[4 + i] = chance(r, 85) ? read_regs[below(r, ARRAY_SIZE(read_regs))] : (uint32_t)rnd(r);
        if (chance(r, 25))
            ((uint32_t *)in)[4] = secret_msrs[0] == 0xC0000082 ? HV_REG_LSTAR : HV_REG_CSTAR;
        control = HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(n);
        break;
    }
    case 2: { /* SetVpRegisters: anything on VTL1 (must be refused), harmless names on VTL0 */
        bool on_vtl1 = chance(r, 70);
        ((uint32_t *)in)[2] = target_vp;
        in[12] = on_vtl1 ? HV_VTL(1) : (chance(r, 50) ? HV_VTL_SELF : HV_VTL(0));
        ((uint32_t *)in)[4] = on_vtl1 ? (chance(r, 80) ? read_regs[below(r, ARRAY_SIZE(read_regs))] : (uint32_t)rnd(r))
                                      : harmless_regs[below(r, ARRAY_SIZE(harmless_regs))];
        q[4] = rnd(r) & REG_SECRET_MASK;
        q[5] = chance(r, 90) ? 0 : rnd(r);
        control = HVCALL_SET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1);
        break;
    }
    case 3: { /* TranslateVirtualAddress: random addresses and flags, canaries, other VTLs */
        ((uint32_t *)in)[2] = target_vp;
        q[2] = below(r, 0x40) | (chance(r, 30) ? HV_XLATE_INPUT_VTL(rnd(r) & 0x1F) : 0);
        uint64_t gva = chance(r, 40) ? (uint64_t)canary_secret + below(r, PAGE) : pick_gpa(r, false);
        q[3] = gva >> 12;
        control = HVCALL_TRANSLATE_VIRTUAL_ADDRESS;
        break;
    }
    case 4: { /* ModifyVtlProtectionMask from VTL0: never allowed to touch the canaries */
        unsigned n = (unsigned)below(r, 4) + 1;
        ((uint32_t *)in)[2] = (uint32_t)below(r, 16);
        in[12] = vtl;
        uint64_t pages[3] = {(uint64_t)canary_secret, (uint64_t)canary_ro, (uint64_t)canary_nx};
        for (unsigned i = 0; i < n; i++)
            q[2 + i] = pages[below(r, 3)] >> 12;
        control = HVCALL_MODIFY_VTL_PROTECTION_MASK | HV_CONTROL_REP_COUNT(n);
        break;
    }
    case 5: /* EnableVpVtl / StartVirtualProcessor with random contexts on running VPs */
    case 6: {
        struct hv_initial_vp_context ctx;
        random_context(r, &ctx);
        ((uint32_t *)in)[2] = chance(r, 60) ? (uint32_t)below(r, ncpus) : (uint32_t)rnd(r);
        in[12] = chance(r, 50) ? 1 : (uint8_t)below(r, 4);
        memcpy(in + 16, &ctx, sizeof(ctx));
        control = chance(r, 50) ? HVCALL_ENABLE_VP_VTL : HVCALL_START_VIRTUAL_PROCESSOR;
        break;
    }
    case 7: /* EnablePartitionVtl again, with junk flags */
        in[8] = (uint8_t)below(r, 3);
        in[9] = (uint8_t)rnd(r);
        control = HVCALL_ENABLE_PARTITION_VTL;
        break;
    case 8: { /* PostMessage / SignalEvent to loopback and random connections */
        ((uint32_t *)in)[0] = chance(r, 60) ? VSMTRACE_LOOPBACK_MESSAGE_CONNECTION : (uint32_t)rnd(r);
        ((uint32_t *)in)[2] = chance(r, 80) ? 1 + (uint32_t)below(r, 4) : (uint32_t)rnd(r);
        ((uint32_t *)in)[3] = chance(r, 80) ? (uint32_t)below(r, 241) : (uint32_t)rnd(r);
        if (chance(r, 50)) {
            control = HVCALL_POST_MESSAGE;
        } else {
            io.rdx = (chance(r, 60) ? VSMTRACE_LOOPBACK_EVENT_CONNECTION : rnd(r) & 0xFFFFFFFF) |
                     (below(r, 20) << 32);
            control = HVCALL_SIGNAL_EVENT | HV_CONTROL_FAST;
        }
        break;
    }
    default: /* VTL0 SynIC setup on its own pages, so messages and events have somewhere to go */
        wrmsr_safe(HV_MSR_SIMP, (uint64_t)vtl0_simp[vp] | 1);
        wrmsr_safe(HV_MSR_SIEFP, (uint64_t)vtl0_siefp[vp] | 1);
        wrmsr_safe(HV_MSR_SCONTROL, 1);
        wrmsr_safe(HV_MSR_SINT0 + VSMTRACE_LOOPBACK_SINT, 0x40 + below(r, 0xB0));
        return;
    }
    hc(control, &io);
}

/* MSRs whose value is a GPA: only ever pointed at targets pick_gpa returns. */
static bool gpa_msr(uint32_t msr)
{
    return msr == HV_MSR_HYPERCALL || msr == HV_MSR_VP_ASSIST_PAGE || msr == HV_MSR_SIMP || msr == HV_MSR_SIEFP ||
           msr == 0x40000021u /* REFERENCE_TSC */;
}

static void op_msr(struct rng *r, uint32_t vp)
{
    uint32_t msr;
    switch (below(r, 4)) {
    case 0: msr = 0x40000000u + (uint32_t)below(r, 0x200); break;
    case 1: msr = 0x40000080u + (uint32_t)below(r, 0x40); break; /* SynIC, SINTs, stimers */
    case 2: {
        static const uint32_t arch[] = {0x1B, 0x10, 0x174, 0x175, 0x176, 0x277, 0xC0000080, 0xC0000081,
                                        0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102, 0xC0000103, 0x6E0,
                                        0x802, 0x803, 0x808, 0x80B, 0x830, 0x838, 0x3A, 0x48, 0x49};
        msr = arch[below(r, ARRAY_SIZE(arch))];
        break;
    }
    default: msr = (uint32_t)rnd(r); break;
    }
    uint64_t old = 0;
    bool readable = msr != 0x400000F0u && rdmsr_safe(msr, &old); /* GUEST_IDLE waits for an interrupt */
    if (!readable && msr != 0x400000F0u)
        stats[vp].gp++;
    if (chance(r, 40))
        return;
    /* Writes: values that cannot take the guest down with them, restored afterwards where needed. */
    uint64_t v = rnd(r);
    bool restore = false;
    if (gpa_msr(msr)) {
        v = (pick_gpa(r, true) & ~0xFFFull) | below(r, 2) | (chance(r, 10) ? rnd(r) & 0xFFE : 0);
        restore = true;
    } else if (msr == 0x40000003u || msr == 0x400000F0u || msr == 0x40000105u) {
        return; /* RESET, GUEST_IDLE, CRASH_CTL end the run by design */
    } else if (msr == 0x40000000u) {
        v = chance(r, 50) ? 0 : rnd(r); /* GUEST_OS_ID: 0 disables every VP's hypercall page */
        restore = true;
    } else if (msr == 0x40000071u || msr == 0x830) {
        v = (0x40 + below(r, 0xB0)) | (below(r, 4) << 18) | ((uint64_t)below(r, ncpus) << 32); /* fixed IPIs */
    } else if (msr == 0x40000072u || msr == 0x808) {
        v = chance(r, 80) ? 0 : rnd(r); /* TPR */
        restore = true;
    } else if (msr >= 0x400000B0u && msr <= 0x400000B7u) {
        v = (msr & 1) ? 50000 + below(r, 1000000) : (rnd(r) & ~(0xFull << 16)) | (below(r, 4) << 16);
        if (!(msr & 1) && chance(r, 50))
            v = (v & ~(0xFFull << 4)) | ((0x40 + below(r, 0xB0)) << 4); /* direct-mode vector */
    } else if (msr >= 0x40000090u && msr <= 0x4000009Fu) {
        v = chance(r, 70) ? (0x40 + below(r, 0xB0)) | (below(r, 4) << 16) : rnd(r);
    } else if (msr == 0x1B || (msr >= 0xC0000080u && msr <= 0xC0000081u) || msr == 0x10 || msr == 0x6E0) {
        v = old ^ (1ull << (12 + below(r, 52))); /* APIC base, EFER, STAR, TSC, TSC deadline: one reserved-ish bit */
        if (msr == 0xC0000080u && (v & ((1ull << 8) | (1ull << 10))) != (old & ((1ull << 8) | (1ull << 10))))
            return;
        restore = true;
    } else if (msr == 0xC0000082u || msr == 0xC0000084u || msr == 0x277) {
        restore = true;
    } else if (msr >= 0x800 && msr < 0x900) {
        v &= 0xFF;
    }
    bool ok = wrmsr_safe(msr, v);
    if (!ok)
        stats[vp].gp++;
    if (restore && readable)
        wrmsr_safe(msr, old);
    if (msr == 0x40000000u || msr == HV_MSR_HYPERCALL) { /* the partition-wide pair: put it back in order */
        wrmsr_safe(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_VSMTRACE);
        wrmsr_safe(HV_MSR_HYPERCALL, (uint64_t)hv_hypercall_page | 1);
    }
}

static void op_vtl(struct rng *r, uint32_t vp)
{
    struct fz_io io = {0};
    switch (below(r, 6)) {
    case 0: { /* a real VTL call: VTL1 must answer the echo */
        uint64_t x = rnd(r);
        uint64_t got = vtl1_op(VSM_OP_ECHO, x, 0, 0, 0, 0);
        if (got != x + 1) {
            printf("fuzz vp=%u FAIL echo: got 0x%lx want 0x%lx\n", vp, got, x + 1);
            atomic_inc32(&failures);
        }
        break;
    }
    case 1: /* VTL call with a bad control word or input: #UD */
        vsm_mbox[vp].op = VSM_OP_NOP;
        io.rax = chance(r, 50) ? rnd(r) : 0;
        stats[vp].calls++;
        fz_raw(chance(r, 50) ? rnd(r) << 16 : 0, &io, vsm_vtl0_call_addr);
        break;
    case 2: /* VTL return from VTL0: #UD */
        io.rax = chance(r, 50) ? 0 : rnd(r);
        stats[vp].calls++;
        fz_raw(chance(r, 70) ? 0 : rnd(r), &io, vsm_vtl0_return_addr);
        break;
    case 3: { /* VTL call with a VTL0 interrupt pending (self IPI while IF = 0) */
        uint64_t f = irq_save();
        apic_send_ipi(0, (uint8_t)(0x40 + below(r, 0xB0)), APIC_DM_FIXED, APIC_DEST_SELF);
        vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0);
        irq_restore(f);
        break;
    }
    case 4: { /* VTL call with VTL1's VP assist page scribbled (not its return registers) */
        struct hv_vp_assist_page *a = vsm_vtl1_assist(vp);
        a->apic_assist = (uint32_t)rnd(r);
        a->reserved = (uint32_t)rnd(r);
        a->vtl_control.vina_status = (uint8_t)rnd(r);
        a->vtl_control.reserved0 = (uint8_t)rnd(r);
        a->vtl_control.reserved1 = (uint16_t)rnd(r);
        a->vtl_control.entry_reason = (uint32_t)rnd(r);
        uint64_t x = rnd(r);
        uint64_t got = vtl1_op(VSM_OP_ECHO, x, 0, 0, 0, 0);
        if (got != x + 1) {
            printf("fuzz vp=%u FAIL echo_scribbled: got 0x%lx want 0x%lx\n", vp, got, x + 1);
            atomic_inc32(&failures);
        }
        break;
    }
    default: /* VTL1 does something random on VTL0's behalf */
        vtl1_op(VSM_OP_USER, U_FUZZ, rnd(r), 0, 0, 0);
        break;
    }
}

static void op_trap(struct rng *r)
{
    struct fz_io io = {0};
    io.rdx = pick_gpa(r, false);
    io.r8 = pick_gpa(r, true);
    uint64_t control = pick_control(r, pick_code(r));
    stats[my_vp()].calls++;
    switch (below(r, 4)) {
    case 0: fz_trap_out8(control, &io); break;
    case 1: fz_trap_out16(control, &io); break;
    case 2: fz_trap_out32(control, &io); break;
    default: fz_trap_in8(control, &io); break;
    }
}

/* Confused-deputy probes: calls that succeed with ordinary buffers, aimed at canaries (output
 * into pages VTL0 may not write, input from the page VTL0 may not read).  None may succeed. */
static void op_deputy(struct rng *r, uint32_t vp)
{
    uint8_t *in = arena[(vp * 2) % ARENA_PAGES];
    uint64_t *q = (uint64_t *)in;
    uint64_t out = (chance(r, 50) ? (uint64_t)canary_ro : (uint64_t)canary_secret) + below(r, 256) * 8;
    struct fz_io io = {.rdx = (uint64_t)in, .r8 = out};
    memset(in, 0, 32);
    q[0] = HV_PARTITION_ID_SELF;
    ((uint32_t *)in)[2] = HV_VP_INDEX_SELF;
    uint64_t control;
    const char *what;
    switch (below(r, 4)) {
    case 0:
        control = HVCALL_GET_PARTITION_ID;
        what = "get_partition_id_output";
        break;
    case 1:
        ((uint32_t *)in)[4] = chance(r, 50) ? HV_REG_VP_INDEX : HV_REG_RIP;
        control = HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1);
        what = "get_vp_registers_output";
        break;
    case 2:
        q[2] = HV_XLATE_VALIDATE_READ;
        q[3] = (uint64_t)arena[0] >> 12;
        control = HVCALL_TRANSLATE_VIRTUAL_ADDRESS;
        what = "translate_output";
        break;
    default:
        io.rdx = (uint64_t)canary_secret + below(r, 256) * 8;
        io.r8 = (uint64_t)arena[(vp * 2 + 1) % ARENA_PAGES];
        control = HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1);
        what = "get_vp_registers_input";
        break;
    }
    uint64_t res = hc(control, &io);
    if (HV_RESULT_STATUS(res) == HV_STATUS_SUCCESS) {
        printf("fuzz vp=%u FAIL deputy_%s: succeeded with in=0x%lx out=0x%lx\n", vp, what, io.rdx, io.r8);
        atomic_inc32(&failures);
    }
}

static void set_action(enum vsm_action a, uint64_t arg) { vtl1_op(VSM_OP_INTERCEPT_MODE, a, arg, 0, 0, 0); }

static void check(const char *name, bool ok, uint64_t detail)
{
    if (ok) {
        printf("fuzz check %s ok\n", name);
    } else {
        printf("fuzz check %s FAIL 0x%lx\n", name, detail);
        atomic_inc32(&failures);
    }
}

/* Direct accesses to the canaries: each must be intercepted, none may complete. */
static void op_probe(struct rng *r, uint32_t vp, bool report, int kind)
{
    uint32_t before = vsm_log[vp].intercepts;
    switch (kind >= 0 ? (uint64_t)kind : below(r, 3)) {
    case 0: { /* read the secret: VTL1 emulates the read with a dummy value */
        set_action(VSM_ACT_EMULATE_READ, 0 /* rax */);
        uint64_t v = fz_read_probe((uint64_t)canary_secret + below(r, NSECRET) * 8);
        set_action(VSM_ACT_SKIP, 0); /* idle mode: see fuzz_loop */
        bool ok = v == EMULATED_READ && vsm_log[vp].intercepts > before;
        if (report || !ok)
            check("secret_read_intercepted", ok, v);
        break;
    }
    case 1: { /* write the read-only canary: VTL1 skips the instruction */
        uint32_t i = (uint32_t)below(r, NSECRET);
        uint64_t was = ((volatile uint64_t *)canary_ro)[i];
        set_action(VSM_ACT_SKIP, 0);
        fz_write_probe((uint64_t)canary_ro + i * 8, ~was);
        set_action(VSM_ACT_SKIP, 0); /* idle mode: see fuzz_loop */
        bool ok = ((volatile uint64_t *)canary_ro)[i] == was && vsm_log[vp].intercepts > before;
        if (report || !ok)
            check("ro_write_intercepted", ok, i);
        break;
    }
    default: { /* execute the no-execute canary: VTL1 moves RIP to a stub that returns 0xBAD */
        set_action(VSM_ACT_SET_RIP, (uint64_t)fz_nx_recover);
        uint32_t v = fz_exec((uint64_t)canary_nx);
        set_action(VSM_ACT_SKIP, 0); /* idle mode: see fuzz_loop */
        bool ok = v == NX_RECOVERED && vsm_log[vp].intercepts > before;
        if (report || !ok)
            check("nx_exec_intercepted", ok, v);
        break;
    }
    }
}

static void one_op(uint32_t vp, uint64_t iter)
{
    struct rng r = {mix64(seed ^ mix64(((uint64_t)vp << 48) ^ iter))};
    uint64_t w = below(&r, 100);
    if (w < 30)
        op_memory_call(&r);
    else if (w < 40)
        op_fast_call(&r, false);
    else if (w < 50)
        op_fast_call(&r, true);
    else if (w < 64)
        op_near_valid(&r, vp);
    else if (w < 78)
        op_msr(&r, vp);
    else if (w < 88)
        op_vtl(&r, vp);
    else if (w < 92)
        op_trap(&r);
    else if (w < 96)
        op_deputy(&r, vp);
    else
        op_probe(&r, vp, false, -1);
}

static void progress(uint32_t vp, const char *what, uint64_t iter)
{
    struct vp_stats *s = &stats[vp];
    printf("fuzz vp=%u %s=%lu calls=%lu ud=%lu gp=%lu irqs=%lu\n", vp, what, iter, s->calls, s->ud, s->gp, s->irqs);
}

static void fuzz_loop(uint32_t vp)
{
    /* Between probes an intercept on a canary (a random store that hit one) is skipped, never
       answered by making the page RWX again (the framework's default action): VTL1 unprotecting
       its own canaries on VTL0's behalf would end the isolation oracle, not test it. */
    set_action(VSM_ACT_SKIP, 0);
    sti();
    for (uint64_t i = start; i < start + iters; i++) {
        one_op(vp, i);
        stats[vp].iters++;
        if ((i + 1 - start) % report_every == 0)
            progress(vp, "iter", i + 1);
    }
    /* quiesce this VP's timers and SynIC so the checks run undisturbed */
    for (int t = 0; t < 4; t++)
        wrmsr_safe(HV_MSR_STIMER0_CONFIG + 2 * t, 0);
    wrmsr_safe(0x40000072u, 0);
    progress(vp, "done iters", stats[vp].iters);
    atomic_inc32(&vps_done);
}

static void install_vtl0_handlers(void)
{
    set_exception_handler(6, vtl0_fault);
    set_exception_handler(13, vtl0_fault);
    for (int v = 32; v < 255; v++)
        set_irq_handler((uint8_t)v, vtl0_irq);
}

static void ap_main(uint32_t vp)
{
    if (!vsm_init_ap()) {
        printf("fuzz vp=%u FAIL vsm_init_ap\n", vp);
        atomic_store32(&ap_started[vp], 2);
        return;
    }
    wrmsr(HV_MSR_VP_ASSIST_PAGE, (uint64_t)vtl0_assist[vp] | 1);
    vtl1_op(VSM_OP_USER, U_REGS, 0, 0, 0, 0);
    atomic_store32(&ap_started[vp], 1);
    fuzz_loop(vp);
    cli();
    for (;;)
        hlt();
}

static void final_checks(void)
{
    cli();
    uint32_t vp = my_vp();
    struct rng r = {seed};
    for (int k = 0; k < 3; k++)
        op_probe(&r, vp, true, k);
    uint64_t bad = vtl1_op(VSM_OP_USER, U_CHECK, 0, 0, 0, 0);
    check("vtl1_canaries_intact", bad == 0, bad);
    uint64_t key = vtl1_op(VSM_OP_USER, U_KEY, 0, 0, 0, 0);
    /* nothing VTL0 can read may hold a secret word */
    uint32_t leaked = 0;
    const uint64_t *spaces[] = {(uint64_t *)arena, (uint64_t *)vtl0_simp, (uint64_t *)vtl0_siefp,
                                (uint64_t *)vtl0_assist, (uint64_t *)canary_ro, (uint64_t *)canary_nx,
                                (uint64_t *)hv_hypercall_page};
    const uint64_t sizes[] = {sizeof(arena), sizeof(vtl0_simp), sizeof(vtl0_siefp), sizeof(vtl0_assist), PAGE, PAGE,
                              PAGE};
    for (unsigned s = 0; s < ARRAY_SIZE(spaces); s++)
        for (uint64_t i = 0; i < sizes[s] / 8; i++) {
            uint64_t w = spaces[s][i];
            if (((w >> 20) & 0xFFF) == SECRET_TAG && (w & 0xFFFFF) < NSECRET && w == secret_word(key, w & 0xFFFFF))
                leaked++;
        }
    check("no_secret_in_vtl0_memory", leaked == 0, leaked);
    uint32_t ro_bad = 0;
    for (uint32_t i = 0; i < NSECRET; i++)
        if (((volatile uint64_t *)canary_ro)[i] != ro_word(key, i))
            ro_bad++;
    check("ro_canary_unchanged_from_vtl0", ro_bad == 0, ro_bad);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    seed = cmdline_get_uint("seed", 1);
    iters = cmdline_get_uint("iters", 200);
    start = cmdline_get_uint("start", 0);
    report_every = cmdline_get_uint("report", 50);
    if (report_every == 0)
        report_every = 1;
    ncpus = (uint32_t)cmdline_get_uint("cpus", 1);
    if (cmdline_get_uint("spare", 0) && ncpus < VSM_MAX_VPS)
        spare_vp = ncpus; /* the harness gives the guest one VP more than cpus= */
    if (ncpus < 1)
        ncpus = 1;
    if (ncpus > VSM_MAX_VPS)
        ncpus = VSM_MAX_VPS;
    trap_sites[0] = (struct trap_site){fz_t8, fz_t8e};
    trap_sites[1] = (struct trap_site){fz_t16, fz_t16e};
    trap_sites[2] = (struct trap_site){fz_t32, fz_t32e};
    trap_sites[3] = (struct trap_site){fz_ti8, fz_ti8e};
    printf("fuzz start seed=%lu iters=%lu cpus=%u start=%lu\n", seed, iters, ncpus, start);
    install_vtl0_handlers();
    apic_enable();

    /* Before VSM exists: VTL call/return are #UD, VSM calls fail. */
    struct rng pre = {mix64(seed ^ 0xB00Bull)};
    if (!hv_init())
        return 2;
    for (int i = 0; i < 8; i++) {
        struct fz_io io = {0};
        stats[0].calls++;
        fz_raw(i & 1 ? HVCALL_VTL_RETURN : HVCALL_VTL_CALL, &io, (uint64_t)hv_hypercall_page);
        op_fast_call(&pre, i & 1);
    }
    if (!vsm_init(false)) {
        printf("fuzz FAIL vsm_init\n");
        return 1;
    }
    wrmsr(HV_MSR_VP_ASSIST_PAGE, (uint64_t)vtl0_assist[0] | 1);
    uint64_t key = mix64(seed ^ 0x5EC2E75EC2E7ull);
    uint64_t bad = vtl1_op(VSM_OP_USER, U_SETUP, key, 0, 0, 0);
    vtl1_op(VSM_OP_USER, U_REGS, 0, 0, 0, 0);
    check("canaries_placed", bad == 0, bad);
    if (bad)
        return 1;
    for (uint32_t v = 1; v < ncpus; v++) {
        uint64_t st = vtl1_op(VSM_OP_ENABLE_VP, v, 0, 0, 0, 0);
        uint16_t s2 = st == 0 ? vsm_start_ap(v, ap_main) : 0xFFFF;
        uint64_t end = hv_ref_time() + 50000000ull; /* 5 s */
        while (s2 == 0 && atomic_load32(&ap_started[v]) == 0 && hv_ref_time() < end)
            cpu_pause();
        if (st != 0 || s2 != 0 || atomic_load32(&ap_started[v]) != 1) {
            printf("fuzz FAIL start vp %u: enable 0x%lx start 0x%x\n", v, st, s2);
            return 1;
        }
    }
    fuzz_loop(0);
    /* Wait for the other VPs as long as they make progress: on a loaded host an intercept
       storm can slow one VP to a few iterations a second, and a fixed deadline then failed a
       good run. A VP that stops for 60 s is a hang (the campaign's watchdog also sees it). */
    uint64_t last = 0, end = hv_ref_time() + 600000000ull;
    while (atomic_load32(&vps_done) < ncpus && hv_ref_time() < end) {
        uint64_t now = 0;
        for (uint32_t v = 0; v < ncpus; v++)
            now += stats[v].iters + stats[v].calls;
        if (now != last) {
            last = now;
            end = hv_ref_time() + 600000000ull;
        }
        sti();
        cpu_pause();
    }
    if (atomic_load32(&vps_done) < ncpus) {
        printf("fuzz FAIL only %u of %u VPs finished\n", atomic_load32(&vps_done), ncpus);
        atomic_inc32(&failures);
    }
    final_checks();
    printf("fuzz finished failures=%u\n", failures);
    return failures ? 1 : 0;
}
