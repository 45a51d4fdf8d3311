/*
 * vsm.c - the two-VTL guest framework (see vsm.h).
 *
 * Linked into every guest (the build takes every runtime .c file) but inert unless a
 * guest calls vsm_init(): it only adds .bss pages and code.
 *
 * Shared registers: every GPR but RSP, and XMM, are shared between VTLs, so a
 * VTL call/return clobbers them from the C compiler's point of view.  The
 * assembly wrappers keep callee-saved registers on the (private) stack.
 */
#include "vsm.h"
#include "apic.h"

#define VSM_READY 0x56544C31ull /* "VTL1" */
#define VTL1_STACK_SIZE 16384

/* ---- memory: all page-aligned, in .bss ---------------------------------- */
uint8_t vtl1_hypercall_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t vtl1_assist[VSM_MAX_VPS][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t vtl1_simp[VSM_MAX_VPS][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t vtl1_siefp[VSM_MAX_VPS][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
/* [vtl][vp][0 = input, 1 = output] */
static uint8_t hc_pages[2][VSM_MAX_VPS][2][HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
uint8_t vtl1_stacks[VSM_MAX_VPS][VTL1_STACK_SIZE] __attribute__((aligned(16)));

struct vsm_mailbox vsm_mbox[VSM_MAX_VPS];
struct vsm_vp_log vsm_log[VSM_MAX_VPS];
struct vsm_regs vsm_vtl1_entry_regs[VSM_MAX_VPS];
struct vsm_regs vsm_vtl1_load[VSM_MAX_VPS];
static struct vsm_regs vtl1_restore[VSM_MAX_VPS];
uint64_t vsm_code_page_offsets;
uint64_t vsm_vtl1_code_page_offsets;
uint64_t vsm_vtl0_call_addr, vsm_vtl0_return_addr;
uint64_t vsm_vtl1_call_addr, vsm_vtl1_return_addr;

/* VTL1's own descriptor tables (same selectors as the runtime GDT). */
static uint64_t vtl1_gdt[4] __attribute__((aligned(16))) = {
    0, 0x00AF9A000000FFFFull, 0x00CF92000000FFFFull, 0x00CF9A000000FFFFull,
};
struct vtl1_gate {
    uint16_t off_lo, sel;
    uint8_t ist, type;
    uint16_t off_mid;
    uint32_t off_hi, zero;
} __attribute__((packed));
static struct vtl1_gate vtl1_idt[256] __attribute__((aligned(16)));
static irq_handler_t vtl1_irq_handlers[256];

extern char vtl1_isr_stubs[], vtl1_entry[], vsm_ap_entry64[];
extern char ap_stacks[];
extern char rdmsr_safe_insn[], wrmsr_safe_insn[], msr_fault_fixup[];

/* ---- assembly ----------------------------------------------------------- */
/* Loads every shared register but RAX/RCX from the struct in RAX (clobbers them). */
#define VSM_LOAD_REGS                                                                                  \
    "    movdqu 0x80(%rax), %xmm0\n    movdqu 0x90(%rax), %xmm1\n    movdqu 0xa0(%rax), %xmm2\n"       \
    "    movdqu 0xb0(%rax), %xmm3\n    movdqu 0xc0(%rax), %xmm4\n    movdqu 0xd0(%rax), %xmm5\n"       \
    "    movdqu 0xe0(%rax), %xmm6\n    movdqu 0xf0(%rax), %xmm7\n    movdqu 0x100(%rax), %xmm8\n"      \
    "    movdqu 0x110(%rax), %xmm9\n    movdqu 0x120(%rax), %xmm10\n    movdqu 0x130(%rax), %xmm11\n"  \
    "    movdqu 0x140(%rax), %xmm12\n    movdqu 0x150(%rax), %xmm13\n    movdqu 0x160(%rax), %xmm14\n" \
    "    movdqu 0x170(%rax), %xmm15\n"                                                                 \
    "    movq 0x08(%rax), %rbx\n    movq 0x18(%rax), %rdx\n    movq 0x28(%rax), %rdi\n"                \
    "    movq 0x30(%rax), %rbp\n    movq 0x38(%rax), %r8\n    movq 0x40(%rax), %r9\n"                  \
    "    movq 0x48(%rax), %r10\n    movq 0x50(%rax), %r11\n    movq 0x58(%rax), %r12\n"                \
    "    movq 0x60(%rax), %r13\n    movq 0x68(%rax), %r14\n    movq 0x70(%rax), %r15\n"                \
    "    movq 0x20(%rax), %rsi\n"

/* After the trap: store every shared register into the struct whose address is at 0(%rsp). */
#define VSM_CAPTURE_REGS                                                                               \
    "    pushq %rax\n    movq 8(%rsp), %rax\n"                                                         \
    "    movq %rbx, 0x08(%rax)\n    movq %rcx, 0x10(%rax)\n    movq %rdx, 0x18(%rax)\n"                \
    "    movq %rsi, 0x20(%rax)\n    movq %rdi, 0x28(%rax)\n    movq %rbp, 0x30(%rax)\n"                \
    "    movq %r8, 0x38(%rax)\n    movq %r9, 0x40(%rax)\n    movq %r10, 0x48(%rax)\n"                  \
    "    movq %r11, 0x50(%rax)\n    movq %r12, 0x58(%rax)\n    movq %r13, 0x60(%rax)\n"                \
    "    movq %r14, 0x68(%rax)\n    movq %r15, 0x70(%rax)\n"                                           \
    "    popq %rcx\n    movq %rcx, 0x00(%rax)\n"                                                       \
    "    movdqu %xmm0, 0x80(%rax)\n    movdqu %xmm1, 0x90(%rax)\n    movdqu %xmm2, 0xa0(%rax)\n"       \
    "    movdqu %xmm3, 0xb0(%rax)\n    movdqu %xmm4, 0xc0(%rax)\n    movdqu %xmm5, 0xd0(%rax)\n"       \
    "    movdqu %xmm6, 0xe0(%rax)\n    movdqu %xmm7, 0xf0(%rax)\n    movdqu %xmm8, 0x100(%rax)\n"      \
    "    movdqu %xmm9, 0x110(%rax)\n    movdqu %xmm10, 0x120(%rax)\n    movdqu %xmm11, 0x130(%rax)\n"  \
    "    movdqu %xmm12, 0x140(%rax)\n    movdqu %xmm13, 0x150(%rax)\n    movdqu %xmm14, 0x160(%rax)\n" \
    "    movdqu %xmm15, 0x170(%rax)\n"

#define PUSH_CALLEE "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
#define POP_CALLEE "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"

__asm__(".text\n"
        /* uint64_t vsm_call_entry(uint64_t addr, uint64_t control): RCX = control, call addr. */
        ".globl vsm_call_entry\n"
        "vsm_call_entry:\n" PUSH_CALLEE
        "    movq %rsi, %rcx\n"
        "    call *%rdi\n" POP_CALLEE "    ret\n"

        /* void vtl_call_regs(const struct vsm_regs *load, struct vsm_regs *capture) */
        ".globl vtl_call_regs\n"
        "vtl_call_regs:\n" PUSH_CALLEE "    pushq %rsi\n"
        "    movq %rdi, %rax\n" VSM_LOAD_REGS "    xorl %ecx, %ecx\n"
        "    call *vsm_vtl0_call_addr(%rip)\n" VSM_CAPTURE_REGS "    addq $8, %rsp\n" POP_CALLEE "    ret\n"

        /* void vtl1_return_regs(uint64_t control, const struct vsm_regs *load, struct vsm_regs *capture) */
        ".globl vtl1_return_regs\n"
        "vtl1_return_regs:\n" PUSH_CALLEE "    pushq %rdx\n"
        "    movq %rdi, %rcx\n"
        "    testq %rsi, %rsi\n"
        "    jz 1f\n"
        "    pushq %rcx\n"
        "    movq %rsi, %rax\n" VSM_LOAD_REGS "    popq %rcx\n"
        "1:  call *vsm_vtl1_return_addr(%rip)\n" VSM_CAPTURE_REGS "    addq $8, %rsp\n" POP_CALLEE "    ret\n"

        /* VTL1's first instruction on each VP (initial context RIP); RSP = its VTL1 stack. */
        ".globl vtl1_entry\n"
        "vtl1_entry:\n"
        "    xorl %ebp, %ebp\n"
        "    call vtl1_start\n"
        "2:  cli\n    hlt\n    jmp 2b\n"

        /* An AP started in VTL0 by HvCallStartVirtualProcessor. */
        ".globl vsm_ap_entry64\n"
        "vsm_ap_entry64:\n"
        "    xorl %ebp, %ebp\n"
        "    call vsm_ap_start\n"
        "3:  cli\n    hlt\n    jmp 3b\n"

        /* VTL1 interrupt stubs: 16 bytes each, same frame as the runtime's (struct int_frame). */
        ".balign 16\n"
        ".globl vtl1_isr_stubs\n"
        "vtl1_isr_stubs:\n"
        ".set vvec, 0\n"
        ".rept 256\n"
        ".balign 16\n"
        ".if (vvec == 8) || (vvec == 10) || (vvec == 11) || (vvec == 12) || (vvec == 13) || (vvec == 14) || "
        "(vvec == 17) || (vvec == 21) || (vvec == 29) || (vvec == 30)\n"
        ".else\n"
        "    pushq $0\n"
        ".endif\n"
        "    pushq $vvec\n"
        "    jmp vtl1_isr_common\n"
        ".set vvec, vvec + 1\n"
        ".endr\n"
        "vtl1_isr_common:\n"
        "    pushq %rax\n    pushq %rbx\n    pushq %rcx\n    pushq %rdx\n    pushq %rsi\n    pushq %rdi\n"
        "    pushq %rbp\n    pushq %r8\n    pushq %r9\n    pushq %r10\n    pushq %r11\n    pushq %r12\n"
        "    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    movq %rsp, %rdi\n"
        "    cld\n"
        "    call vtl1_isr_dispatch\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %r11\n    popq %r10\n"
        "    popq %r9\n    popq %r8\n    popq %rbp\n    popq %rdi\n    popq %rsi\n    popq %rdx\n"
        "    popq %rcx\n    popq %rbx\n    popq %rax\n"
        "    addq $16, %rsp\n"
        "    iretq\n");

uint64_t vsm_call_entry(uint64_t addr, uint64_t control);
void vtl1_start(void);
void vsm_ap_start(void);
void vtl1_isr_dispatch(struct int_frame *f);

/* ---- small helpers ------------------------------------------------------ */
bool vsm_in_vtl1(void)
{
    uint64_t sp;
    __asm__ volatile("movq %%rsp, %0" : "=r"(sp));
    return sp >= (uint64_t)vtl1_stacks && sp < (uint64_t)vtl1_stacks + sizeof(vtl1_stacks);
}

uint32_t vsm_vp_index(void) { return (uint32_t)rdmsr(HV_MSR_VP_INDEX); }

static uint32_t vp_slot(void)
{
    uint32_t vp = vsm_vp_index();
    return vp < VSM_MAX_VPS ? vp : VSM_MAX_VPS - 1;
}

void *vsm_in_page(void) { return hc_pages[vsm_in_vtl1()][vp_slot()][0]; }
void *vsm_out_page(void) { return hc_pages[vsm_in_vtl1()][vp_slot()][1]; }

uint64_t vsm_hypercall(uint64_t control, uint64_t in_gpa, uint64_t out_gpa)
{
    uint64_t page = vsm_in_vtl1() ? (uint64_t)vtl1_hypercall_page : (uint64_t)hv_hypercall_page;
    uint64_t result;
    register uint64_t r8 __asm__("r8") = out_gpa;
    __asm__ volatile("call *%[page]"
                     : "=a"(result), "+c"(control), "+d"(in_gpa), "+r"(r8)
                     : [page] "r"(page)
                     : "r9", "r10", "r11", "memory", "cc");
    return result;
}

struct vp_header {
    uint64_t partition;
    uint32_t vp;
    uint8_t vtl;
    uint8_t pad[3];
};

uint16_t hv_get_vp_register_of(uint32_t vp, uint8_t vtl, uint32_t name, uint64_t *lo, uint64_t *hi)
{
    uint8_t *in = vsm_in_page(), *out = vsm_out_page();
    struct vp_header *h = (struct vp_header *)in;
    memset(in, 0, 32);
    h->partition = HV_PARTITION_ID_SELF;
    h->vp = vp;
    h->vtl = vtl;
    *(uint32_t *)(in + 16) = name;
    memset(out, 0, 16);
    uint64_t r = vsm_hypercall(HVCALL_GET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1), (uint64_t)in, (uint64_t)out);
    if (lo)
        *lo = ((uint64_t *)out)[0];
    if (hi)
        *hi = ((uint64_t *)out)[1];
    return HV_RESULT_STATUS(r);
}

uint16_t hv_get_vp_register(uint8_t vtl, uint32_t name, uint64_t *lo, uint64_t *hi)
{
    return hv_get_vp_register_of(HV_VP_INDEX_SELF, vtl, name, lo, hi);
}

uint64_t hv_get_reg64(uint8_t vtl, uint32_t name)
{
    uint64_t lo = 0;
    return hv_get_vp_register(vtl, name, &lo, 0) == HV_STATUS_SUCCESS ? lo : ~0ull;
}

uint16_t hv_set_vp_register_of(uint32_t vp, uint8_t vtl, uint32_t name, uint64_t lo, uint64_t hi)
{
    uint8_t *in = vsm_in_page();
    struct vp_header *h = (struct vp_header *)in;
    memset(in, 0, 48);
    h->partition = HV_PARTITION_ID_SELF;
    h->vp = vp;
    h->vtl = vtl;
    *(uint32_t *)(in + 16) = name;
    ((uint64_t *)in)[4] = lo;
    ((uint64_t *)in)[5] = hi;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_SET_VP_REGISTERS | HV_CONTROL_REP_COUNT(1), (uint64_t)in, 0));
}

uint16_t hv_set_vp_register(uint8_t vtl, uint32_t name, uint64_t lo, uint64_t hi)
{
    return hv_set_vp_register_of(HV_VP_INDEX_SELF, vtl, name, lo, hi);
}

uint16_t hv_modify_vtl_protection(uint64_t gpa, int n, uint32_t mask, uint8_t vtl)
{
    uint8_t *in = vsm_in_page();
    memset(in, 0, 16);
    ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
    *(uint32_t *)(in + 8) = mask;
    in[12] = vtl;
    for (int i = 0; i < n; i++)
        ((uint64_t *)in)[2 + i] = (gpa >> 12) + (uint64_t)i;
    uint64_t r = vsm_hypercall(HVCALL_MODIFY_VTL_PROTECTION_MASK | HV_CONTROL_REP_COUNT(n), (uint64_t)in, 0);
    return HV_RESULT_STATUS(r);
}

uint16_t hv_translate_va(uint32_t vp, uint64_t gva, uint64_t flags, uint64_t *result, uint64_t *gpa_page)
{
    uint8_t *in = vsm_in_page(), *out = vsm_out_page();
    memset(in, 0, 32);
    ((uint64_t *)in)[0] = HV_PARTITION_ID_SELF;
    *(uint32_t *)(in + 8) = vp;
    ((uint64_t *)in)[2] = flags;
    ((uint64_t *)in)[3] = gva >> 12;
    memset(out, 0xEE, 16);
    uint64_t r = vsm_hypercall(HVCALL_TRANSLATE_VIRTUAL_ADDRESS, (uint64_t)in, (uint64_t)out);
    if (result)
        *result = ((uint64_t *)out)[0];
    if (gpa_page)
        *gpa_page = ((uint64_t *)out)[1];
    return HV_RESULT_STATUS(r);
}

uint16_t hv_enable_partition_vtl(uint64_t partition, uint8_t vtl, uint8_t flags)
{
    uint8_t *in = vsm_in_page();
    memset(in, 0, 16);
    ((uint64_t *)in)[0] = partition;
    in[8] = vtl;
    in[9] = flags;
    return HV_RESULT_STATUS(vsm_hypercall(HVCALL_ENABLE_PARTITION_VTL, (uint64_t)in, 0));
}

static uint16_t vp_context_call(uint16_t code, uint64_t partition, uint32_t vp, uint8_t vtl,
                                const struct hv_initial_vp_context *ctx)
{
    uint8_t *in = vsm_in_page();
    memset(in, 0, 16);
    ((uint64_t *)in)[0] = partition;
    *(uint32_t *)(in + 8) = vp;
    in[12] = vtl;
    memcpy(in + 16, ctx, sizeof(*ctx));
    return HV_RESULT_STATUS(vsm_hypercall(code, (uint64_t)in, 0));
}

uint16_t hv_enable_vp_vtl(uint64_t partition, uint32_t vp, uint8_t vtl, const struct hv_initial_vp_context *ctx)
{
    return vp_context_call(HVCALL_ENABLE_VP_VTL, partition, vp, vtl, ctx);
}

uint16_t hv_start_vp(uint32_t vp, uint8_t vtl, const struct hv_initial_vp_context *ctx)
{
    return vp_context_call(HVCALL_START_VIRTUAL_PROCESSOR, HV_PARTITION_ID_SELF, vp, vtl, ctx);
}

/* ---- initial contexts ---------------------------------------------------- */
void vsm_build_context(struct hv_initial_vp_context *ctx, uint64_t rip, uint64_t rsp, uint64_t idt_base,
                       uint16_t idt_limit, uint64_t gdt_base, uint16_t gdt_limit)
{
    memset(ctx, 0, sizeof(*ctx));
    ctx->rip = rip;
    ctx->rsp = rsp;
    ctx->rflags = 0x2;
    ctx->cs = (struct hv_seg){0, 0xFFFFFFFF, GDT_CODE64, 0xA09B};
    struct hv_seg data = {0, 0xFFFFFFFF, GDT_DATA, 0xC093};
    ctx->ds = ctx->es = ctx->fs = ctx->gs = ctx->ss = data;
    ctx->tr = (struct hv_seg){0, 0xFFFF, 0, 0x008B};
    ctx->ldtr = (struct hv_seg){0, 0, 0, 0};
    ctx->idtr.base = idt_base;
    ctx->idtr.limit = idt_limit;
    ctx->gdtr.base = gdt_base;
    ctx->gdtr.limit = gdt_limit;
    ctx->efer = rdmsr(MSR_EFER);
    ctx->cr0 = read_cr0();
    ctx->cr3 = read_cr3();
    ctx->cr4 = read_cr4();
    ctx->pat = rdmsr(0x277);
}

static void vtl1_tables_init(void)
{
    for (int v = 0; v < 256; v++) {
        uint64_t a = (uint64_t)(vtl1_isr_stubs + 16 * v);
        vtl1_idt[v] = (struct vtl1_gate){(uint16_t)a, GDT_CODE64, 0, 0x8E, (uint16_t)(a >> 16), (uint32_t)(a >> 32), 0};
    }
}

void vsm_vtl1_context(struct hv_initial_vp_context *ctx, uint32_t vp)
{
    vtl1_tables_init();
    uint64_t rsp = (uint64_t)vtl1_stacks[vp % VSM_MAX_VPS] + VTL1_STACK_SIZE;
    vsm_build_context(ctx, (uint64_t)vtl1_entry, rsp, (uint64_t)vtl1_idt, sizeof(vtl1_idt) - 1, (uint64_t)vtl1_gdt,
                      sizeof(vtl1_gdt) - 1);
}

/* ---- VTL0 side ------------------------------------------------------------- */
static volatile bool vsm_ud_seen;

static bool vsm_ud_handler(struct int_frame *f)
{
    uint64_t page = (uint64_t)hv_hypercall_page;
    if (f->rip < page || f->rip >= page + HV_PAGE_SIZE)
        return false;
    vsm_ud_seen = true;
    f->rip = *(uint64_t *)f->rsp;
    f->rsp += 8;
    f->rax = ~0ull;
    return true;
}

uint64_t vtl_call(void) { return vsm_call_entry(vsm_vtl0_call_addr, 0); }
uint64_t vtl_call_control(uint64_t control) { return vsm_call_entry(vsm_vtl0_call_addr, control); }

bool vtl0_try_vtl_call(uint64_t control)
{
    set_exception_handler(6, vsm_ud_handler);
    vsm_ud_seen = false;
    vsm_call_entry(vsm_vtl0_call_addr, control);
    set_exception_handler(6, 0);
    return vsm_ud_seen;
}

bool vtl0_try_vtl_return(void)
{
    set_exception_handler(6, vsm_ud_handler);
    vsm_ud_seen = false;
    vsm_call_entry(vsm_vtl0_return_addr, 0);
    set_exception_handler(6, 0);
    return vsm_ud_seen;
}

bool vsm_hv_setup(void)
{
    if (!hv_init())
        return false;
    struct cpuid_regs f = cpuid(HV_CPUID_FEATURES, 0);
    if (!(f.ebx & HV_EBX_ACCESS_VSM) || !(f.ebx & HV_EBX_ACCESS_VP_REGISTERS)) {
        printf("FAIL vsm_cpuid: AccessVsm/AccessVpRegisters missing (ebx=0x%x)\n", f.ebx);
        hv_failures++;
        return false;
    }
    uint64_t off = 0;
    uint16_t st = hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_CODE_PAGE_OFFSETS, &off, 0);
    if (st != HV_STATUS_SUCCESS) {
        printf("FAIL vsm_code_page_offsets: status 0x%x\n", st);
        hv_failures++;
        return false;
    }
    vsm_code_page_offsets = off;
    vsm_vtl0_call_addr = (uint64_t)hv_hypercall_page + (off & 0xFFF);
    vsm_vtl0_return_addr = (uint64_t)hv_hypercall_page + ((off >> 12) & 0xFFF);
    return true;
}

static void init_check(bool verbose, const char *name, uint64_t got, uint64_t want)
{
    if (verbose || got != want)
        hv_check(name, got, want);
}

bool vsm_init(bool verbose)
{
    if (!vsm_hv_setup())
        return false;
    uint32_t vp = vsm_vp_index();
    uint16_t st = hv_enable_partition_vtl(HV_PARTITION_ID_SELF, 1, 0);
    init_check(verbose, "init_enable_partition_vtl", st, HV_STATUS_SUCCESS);
    if (st != HV_STATUS_SUCCESS)
        return false;
    struct hv_initial_vp_context ctx;
    vsm_vtl1_context(&ctx, vp);
    st = hv_enable_vp_vtl(HV_PARTITION_ID_SELF, vp, 1, &ctx);
    init_check(verbose, "init_enable_vp_vtl", st, HV_STATUS_SUCCESS);
    if (st != HV_STATUS_SUCCESS)
        return false;
    return vsm_init_ap();
}

bool vsm_init_ap(void)
{
    uint32_t vp = vsm_vp_index();
    uint64_t rax = vtl_call();
    bool ok = vsm_log[vp].ready == 1 && rax == VSM_READY;
    if (!ok) {
        printf("FAIL init_first_vtl_call: vp %u ready=%u rax=0x%lx\n", vp, vsm_log[vp].ready, rax);
        hv_failures++;
    }
    return ok;
}

uint64_t vtl1_op(enum vsm_op op, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t ret[4])
{
    struct vsm_mailbox *m = &vsm_mbox[vp_slot()];
    m->op = op;
    m->arg[0] = a0;
    m->arg[1] = a1;
    m->arg[2] = a2;
    m->arg[3] = a3;
    m->ret[0] = m->ret[1] = m->ret[2] = m->ret[3] = 0xDEADDEADDEADDEADull;
    vtl_call();
    if (ret)
        for (int i = 0; i < 4; i++)
            ret[i] = m->ret[i];
    m->fast = 0;
    return m->ret[0];
}

/* ---- APs started with HvCallStartVirtualProcessor ----------------------------- */
static void (*ap_fn)(uint32_t vp);

void vsm_ap_start(void)
{
    idt_load();
    apic_follow_mode();
    apic_enable();
    ap_fn(vsm_vp_index());
}

uint16_t vsm_start_ap(uint32_t vp, void (*fn)(uint32_t vp))
{
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) gdtr, idtr;
    __asm__ volatile("sgdt %0; sidt %1" : "=m"(gdtr), "=m"(idtr));
    ap_fn = fn;
    struct hv_initial_vp_context ctx;
    uint64_t rsp = (uint64_t)ap_stacks + ((uint64_t)vp + 1) * AP_STACK_SIZE;
    vsm_build_context(&ctx, (uint64_t)vsm_ap_entry64, rsp, idtr.base, idtr.limit, gdtr.base, gdtr.limit);
    return hv_start_vp(vp, 0, &ctx);
}

/* ---- VTL1 side -------------------------------------------------------------- */
struct hv_vp_assist_page *vsm_vtl1_assist(uint32_t vp) { return (struct hv_vp_assist_page *)vtl1_assist[vp]; }
void *vsm_vtl1_simp(uint32_t vp) { return vtl1_simp[vp]; }
void vtl1_set_irq_handler(uint8_t vector, irq_handler_t fn) { vtl1_irq_handlers[vector] = fn; }

void vtl_return(bool fast) { vtl1_return_regs(fast ? 1 : 0, 0, &vsm_vtl1_entry_regs[vp_slot()]); }

__attribute__((weak)) void vtl1_user_init(uint32_t vp) { (void)vp; }
__attribute__((weak)) uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    (void)vp;
    (void)m;
    return ~0ull;
}

__attribute__((weak)) bool vtl1_exception_hook(struct int_frame *f)
{
    (void)f;
    return false;
}

static void vtl1_report(const char *fmt, uint64_t a, uint64_t b)
{
    char buf[120];
    snprintf(buf, sizeof(buf), fmt, a, b);
    serial_puts(buf); /* unlocked: VTL0 of this VP may hold the printf lock */
}

void vtl1_isr_dispatch(struct int_frame *f)
{
    uint64_t v = f->vector;
    if (v < 32) {
        if (vtl1_exception_hook(f))
            return;
        if (f->rip == (uint64_t)rdmsr_safe_insn || f->rip == (uint64_t)wrmsr_safe_insn) {
            f->rip = (uint64_t)msr_fault_fixup; /* rdmsr_safe/wrmsr_safe work in VTL1 too */
            return;
        }
        vtl1_report("VTL1 EXCEPTION %lu rip=0x%lx\n", v, f->rip);
        qemu_exit(EXIT_EXCEPTION_BASE + (uint32_t)v);
    }
    if (vtl1_irq_handlers[v]) {
        vtl1_irq_handlers[v](f);
        return;
    }
    if (v == 0xFF)
        return;
    vtl1_report("VTL1 UNHANDLED INTERRUPT %lu rip=0x%lx\n", v, f->rip);
    qemu_exit(EXIT_UNHANDLED_IRQ);
}

static void vtl1_sint0_irq(struct int_frame *f)
{
    (void)f;
    vsm_log[vp_slot()].sint0_irqs++;
    apic_eoi();
}

static void vtl1_timer_irq(struct int_frame *f)
{
    struct vsm_vp_log *l = &vsm_log[vp_slot()];
    l->timer_irq_rip = f->rip;
    l->timer_irqs++;
    apic_eoi();
}

static void vtl1_ipi_irq(struct int_frame *f)
{
    vsm_log[vp_slot()].ipi_irqs[(f->vector - VSM_VTL1_IPI_VECTOR) & 3]++;
    apic_eoi();
}

/* Handle a GPA intercept in SINT0's slot, if there is one (asynchronous entry). */
static void vtl1_async(uint32_t vp, struct vsm_regs *restore)
{
    struct hv_message *slot = hv_sint_slot(vtl1_simp[vp], 0);
    struct vsm_vp_log *l = &vsm_log[vp];
    if (slot->type == HV_MESSAGE_TYPE_NONE)
        return;
    memcpy((void *)&l->last_msg, slot, sizeof(l->last_msg));
    hv_message_done(slot);
    if (l->last_msg.type != HV_MESSAGE_TYPE_GPA_INTERCEPT)
        return;
    l->intercepts++;
    const struct hv_gpa_intercept *m = &l->last_msg;
    uint16_t st = 0;
    switch (l->action) {
    case VSM_ACT_RESTORE:
        st = hv_modify_vtl_protection(m->gpa & ~0xFFFull, 1, HV_MAP_GPA_ALL, HV_VTL_SELF);
        break;
    case VSM_ACT_SKIP:
        st = hv_set_vp_register(HV_VTL(0), HV_REG_RIP, m->rip + m->insn_length, 0);
        break;
    case VSM_ACT_SET_RIP:
        st = hv_set_vp_register(HV_VTL(0), HV_REG_RIP, l->action_arg, 0);
        break;
    case VSM_ACT_INJECT:
        st = hv_set_vp_register(HV_VTL(0), HV_REG_PENDING_EVENT0, l->action_arg, 0);
        break;
    case VSM_ACT_EMULATE_READ:
        st = hv_set_vp_register(HV_VTL(0), HV_REG_RIP, m->rip + m->insn_length, 0);
        ((uint64_t *)restore)[l->action_arg & 15] = 0x5EC0DEull;
        break;
    }
    l->action_status = st;
}

static uint64_t vtl1_serve(uint32_t vp, struct vsm_mailbox *m)
{
    uint64_t lo = 0, hi = 0, r = 0;
    struct hv_initial_vp_context ctx;
    switch (m->op) {
    case VSM_OP_NOP:
        return 0;
    case VSM_OP_ECHO:
        return m->arg[0] + 1;
    case VSM_OP_GET_REG:
        r = hv_get_vp_register_of((uint32_t)(m->arg[2] ? m->arg[3] : HV_VP_INDEX_SELF), (uint8_t)m->arg[0],
                                  (uint32_t)m->arg[1], &lo, &hi);
        m->ret[1] = lo;
        m->ret[2] = hi;
        return r;
    case VSM_OP_SET_REG:
        return hv_set_vp_register((uint8_t)m->arg[0], (uint32_t)m->arg[1], m->arg[2], m->arg[3]);
    case VSM_OP_PROTECT:
        return hv_modify_vtl_protection(m->arg[0], (int)m->arg[1], (uint32_t)m->arg[2], (uint8_t)m->arg[3]);
    case VSM_OP_CONFIG:
        return hv_set_vp_register(HV_VTL_SELF, HV_REG_VSM_PARTITION_CONFIG, m->arg[0], 0);
    case VSM_OP_TRANSLATE:
        r = hv_translate_va((uint32_t)m->arg[2], m->arg[0], m->arg[1], &lo, &hi);
        m->ret[1] = lo;
        m->ret[2] = hi;
        return r;
    case VSM_OP_HYPERCALL:
        return vsm_hypercall(m->arg[0], m->arg[1], m->arg[2]);
    case VSM_OP_ENABLE_VP:
        vsm_vtl1_context(&ctx, (uint32_t)m->arg[0]);
        return hv_enable_vp_vtl(HV_PARTITION_ID_SELF, (uint32_t)m->arg[0], 1, &ctx);
    case VSM_OP_TIMER:
        apic_timer_oneshot(VSM_VTL1_TIMER_VECTOR, (uint32_t)m->arg[0], 1);
        return 0;
    case VSM_OP_SEND_IPI:
        apic_send_ipi((uint32_t)m->arg[0], (uint8_t)m->arg[1], APIC_DM_FIXED, APIC_DEST_NONE);
        return 0;
    case VSM_OP_PV_IPI:
        return vsm_hypercall(HVCALL_SEND_SYNTHETIC_CLUSTER_IPI | HV_CONTROL_FAST, m->arg[0] | (m->arg[1] << 32),
                             m->arg[2]);
    case VSM_OP_READ:
        return *(volatile uint64_t *)m->arg[0];
    case VSM_OP_WRITE:
        *(volatile uint64_t *)m->arg[0] = m->arg[1];
        return 0;
    case VSM_OP_INTERCEPT_MODE:
        vsm_log[vp].action = (uint32_t)m->arg[0];
        vsm_log[vp].action_arg = m->arg[1];
        return 0;
    case VSM_OP_TPR:
        apic_write(APIC_TPR, (uint32_t)m->arg[0]);
        return 0;
    case VSM_OP_USER:
        return vtl1_user_op(vp, m);
    default:
        return ~0ull;
    }
}

static NORETURN void vtl1_loop(uint32_t vp)
{
    struct hv_vp_assist_page *a = vsm_vtl1_assist(vp);
    struct vsm_vp_log *l = &vsm_log[vp];
    uint64_t control = 0;
    const struct vsm_regs *load = 0;
    a->vtl_control.vtl_return_rax = VSM_READY;
    a->vtl_control.vtl_return_rcx = 0;
    for (;;) {
        vtl1_return_regs(control, load, &vsm_vtl1_entry_regs[vp]);
        uint32_t reason = a->vtl_control.entry_reason;
        l->last_reason = reason;
        l->entries[reason & 3]++;
        if (reason == HV_ENTRY_VTL_CALL) {
            struct vsm_mailbox *m = &vsm_mbox[vp];
            uint64_t r = vtl1_serve(vp, m);
            m->ret[0] = r;
            load = 0;
            control = m->fast ? 1 : 0;
            if (m->op == VSM_OP_SET_RETURN) {
                a->vtl_control.vtl_return_rax = m->arg[0];
                a->vtl_control.vtl_return_rcx = m->arg[1];
                control = m->arg[2] & 1;
                load = &vsm_vtl1_load[vp];
            } else {
                a->vtl_control.vtl_return_rax = r;
                a->vtl_control.vtl_return_rcx = m->ret[1];
            }
        } else {
            /* Asynchronous entry: put VTL0's shared registers back exactly. */
            struct vsm_regs *restore = &vtl1_restore[vp];
            memcpy(restore, &vsm_vtl1_entry_regs[vp], sizeof(*restore));
            vtl1_async(vp, restore);
            a->vtl_control.vtl_return_rax = restore->rax;
            a->vtl_control.vtl_return_rcx = restore->rcx;
            control = 0;
            load = restore;
        }
    }
}

void vtl1_start(void)
{
    uint32_t vp = vp_slot();
    wrmsr(HV_MSR_GUEST_OS_ID, HV_GUEST_OS_ID_VSMTRACE);
    wrmsr(HV_MSR_HYPERCALL, (uint64_t)vtl1_hypercall_page | HV_HYPERCALL_ENABLE);
    uint64_t off = 0;
    if (hv_get_vp_register(HV_VTL_SELF, HV_REG_VSM_CODE_PAGE_OFFSETS, &off, 0) != HV_STATUS_SUCCESS) {
        vtl1_report("VTL1 vp %lu: cannot read VsmCodePageOffsets%lu\n", vp, 0);
        qemu_exit(0x3E);
    }
    vsm_vtl1_code_page_offsets = off;
    vsm_vtl1_call_addr = (uint64_t)vtl1_hypercall_page + (off & 0xFFF);
    vsm_vtl1_return_addr = (uint64_t)vtl1_hypercall_page + ((off >> 12) & 0xFFF);
    wrmsr(HV_MSR_VP_ASSIST_PAGE, (uint64_t)vtl1_assist[vp] | HV_OVERLAY_ENABLE);
    vtl1_irq_handlers[VSM_SINT0_VECTOR] = vtl1_sint0_irq;
    vtl1_irq_handlers[VSM_VTL1_TIMER_VECTOR] = vtl1_timer_irq;
    for (int i = 0; i < 4; i++)
        vtl1_irq_handlers[VSM_VTL1_IPI_VECTOR + i] = vtl1_ipi_irq;
    apic_follow_mode();
    vsm_log[vp].initial_svr = apic_read(APIC_SVR);
    apic_enable();
    hv_synic_enable(vtl1_simp[vp], vtl1_siefp[vp]);
    hv_sint_set(0, VSM_SINT0_VECTOR, 0);
    vtl1_user_init(vp);
    vsm_log[vp].ready = 1;
    sti();
    vtl1_loop(vp);
}

/* ---- checks ---------------------------------------------------------------------- */
void vsm_check_either(const char *name, uint64_t got, uint64_t a, uint64_t b)
{
    if (got == a || got == b) {
        printf("ok %s\n", name);
    } else {
        printf("FAIL %s: got 0x%lx want 0x%lx or 0x%lx\n", name, got, a, b);
        hv_failures++;
    }
}

void vsm_check_bytes(const char *name, const void *got, const void *want, size_t n)
{
    const uint8_t *g = got, *w = want;
    for (size_t i = 0; i < n; i++) {
        if (g[i] != w[i]) {
            printf("FAIL %s: byte 0x%lx got 0x%x want 0x%x\n", name, (uint64_t)i, g[i], w[i]);
            hv_failures++;
            return;
        }
    }
    printf("ok %s\n", name);
}
