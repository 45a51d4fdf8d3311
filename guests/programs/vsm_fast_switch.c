/*
 * vsm_fast_switch.c - n VTL calls from VTL0, each answered by VTL1 with a fast VTL return, with
 * what crosses the switch logged on both sides: the shared registers VTL0 sets before a call
 * as VTL1 sees them at its entry, the shared registers VTL1 sets before its return as VTL0
 * sees them after the call, and VTL1's HV_VP_VTL_CONTROL at each entry (entry reason, the
 * entry RAX/RCX). vsmtrace answers these switches in C (recording or not: a recording records
 * them from C), and in Python with --no-fast-paths or a sink that cannot take what C records:
 * the guest's checks hold for all (docs/architecture.md, "Exit paths in C").
 *
 * cmdline: n=N (default 200), protect=1 (VTL1 makes a data page read-only for VTL0 first,
 * so every return checks where VTL0 resumes against the pages KVM cannot keep from executing;
 * then one fast return resumes VTL0 on a page VTL1 made readable but not executable: that
 * return is the execute intercept, which VTL1 resolves by restoring the page)
 *
 * Last, VTL1 sends VTL0 of its own VP an interrupt and answers with a fast return: VTL0 must
 * take it as soon as it runs with interrupts open, in a loop that makes no exit of its own
 * (a return answered in C while VTL0 had an interrupt pending would run VTL0 without it).
 */
#include "apic.h"
#include "vsm.h"

#define LOG_QWORDS 12 /* per call: rbx rdx r8 r15 xmm0(lo, hi) reason ctl_rax ctl_rcx scratch(2) pad */
#define MAX_CALLS 1000

static uint64_t log0[MAX_CALLS][LOG_QWORDS] __attribute__((aligned(16)));
static uint64_t log1[MAX_CALLS][LOG_QWORDS] __attribute__((aligned(16)));
static volatile uint64_t data_page[HV_PAGE_SIZE / 8] __attribute__((aligned(HV_PAGE_SIZE)));

/* Loop state lives on each VTL's private stack: every GPR but RSP is shared across a switch. */
__asm__(".text\n"
        /* void vtl0_logged_calls(uint64_t n, uint64_t (*log)[12]) */
        ".globl vtl0_logged_calls\n"
        "vtl0_logged_calls:\n"
        "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    pushq %rsi\n    pushq %rdi\n    pushq $0\n" /* [rsp] = i, 8 = n, 16 = log */
        "1:  movq (%rsp), %rax\n"
        "    imulq $96, %rax, %r9\n"
        "    addq 16(%rsp), %r9\n"               /* r9 = &log[i] */
        "    movq %rax, %rbx\n"
        "    movq %rax, %rdx\n    notq %rdx\n"
        "    leaq (%rax,%rax,2), %r8\n"
        "    movq %rax, %r15\n    xorq $0x5555, %r15\n"
        "    movq %rax, 32(%r9)\n    movq %rdx, 40(%r9)\n"
        "    movdqu 32(%r9), %xmm0\n"
        "    xorl %ecx, %ecx\n"
        "    call *vsm_vtl0_call_addr(%rip)\n"
        "    movq (%rsp), %rax\n"
        "    imulq $96, %rax, %r9\n"
        "    addq 16(%rsp), %r9\n"
        "    movq %rbx, 0(%r9)\n    movq %rdx, 8(%r9)\n    movq %r8, 16(%r9)\n    movq %r15, 24(%r9)\n"
        "    movdqu %xmm0, 32(%r9)\n"
        "    incq (%rsp)\n"
        "    movq (%rsp), %rax\n"
        "    cmpq 8(%rsp), %rax\n"
        "    jb 1b\n"
        "    addq $24, %rsp\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"
        "    ret\n"
        /* void vtl1_logged_returns(uint64_t n, uint64_t (*log)[12], const void *control):
           a fast return (the acknowledgement of VSM_OP_USER), then n calls logged and each
           answered by a fast return with new shared values; the next call leaves the loop. */
        ".globl vtl1_logged_returns\n"
        "vtl1_logged_returns:\n"
        "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    pushq %rdx\n    pushq %rsi\n    pushq %rdi\n    pushq $0\n" /* [rsp] = k, 8 = n, 16 = log, 24 = control */
        "2:  movl $1, %ecx\n"
        "    call *vsm_vtl1_return_addr(%rip)\n"
        "    movq %rbx, %r10\n"                  /* entry values, before anything is computed */
        "    movq %rdx, %r11\n"
        "    movq (%rsp), %rax\n"                /* k = the index of this call */
        "    cmpq 8(%rsp), %rax\n"
        "    jae 3f\n"
        "    imulq $96, %rax, %r9\n"
        "    addq 16(%rsp), %r9\n"
        "    movq %r10, 0(%r9)\n    movq %r11, 8(%r9)\n    movq %r8, 16(%r9)\n    movq %r15, 24(%r9)\n"
        "    movdqu %xmm0, 32(%r9)\n"
        "    movq 24(%rsp), %rcx\n"
        "    movl 0(%rcx), %edx\n    movq %rdx, 48(%r9)\n"
        "    movq 8(%rcx), %rdx\n    movq %rdx, 56(%r9)\n"
        "    movq 16(%rcx), %rdx\n    movq %rdx, 64(%r9)\n"
        "    leaq 1000(%r10), %rbx\n"
        "    movq %r11, %rdx\n    xorq $0xff, %rdx\n"
        "    addq $7, %r8\n"
        "    notq %r15\n"
        "    leaq 11(%rax), %rcx\n    movq %rcx, 72(%r9)\n"
        "    leaq 13(%rax), %rcx\n    movq %rcx, 80(%r9)\n"
        "    movdqu 72(%r9), %xmm0\n"
        "    incq (%rsp)\n"
        "    jmp 2b\n"
        "3:  addq $32, %rsp\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"
        "    ret\n");
/* A VTL call trapping from a page of its own (VTL0 resumes there after the return). */
__asm__(".text\n"
        ".balign 4096\n"
        ".globl nx_page_call\n"
        "nx_page_call:\n"
        "    pushq %rbx\n    pushq %rbp\n    pushq %r12\n    pushq %r13\n    pushq %r14\n    pushq %r15\n"
        "    xorl %eax, %eax\n"           /* the hypercall page's VTL call stub, inline: input 0, */
        "    movl $0x11, %ecx\n"          /* HvCallVtlCall, and the trap, all on this page */
        "    outb %al, $0x58\n"
        "    popq %r15\n    popq %r14\n    popq %r13\n    popq %r12\n    popq %rbp\n    popq %rbx\n"
        "    ret\n"
        ".balign 4096\n");
void nx_page_call(void);
void vtl0_logged_calls(uint64_t n, uint64_t (*log)[LOG_QWORDS]);
void vtl1_logged_returns(uint64_t n, uint64_t (*log)[LOG_QWORDS], const void *control);

#define VTL0_VECTOR 0x67
static volatile uint32_t vtl0_interrupts;

static void vtl0_irq(struct int_frame *f)
{
    (void)f;
    vtl0_interrupts++;
    apic_eoi();
}

/* Interrupts open, no exits: PAUSEs until the count moves or ~max iterations pass. */
static uint64_t spin_for_interrupt(uint64_t max)
{
    uint64_t i = 0;
    sti();
    while (vtl0_interrupts == 0 && i < max) {
        cpu_pause();
        i++;
    }
    cli();
    return i;
}

uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m)
{
    m->ret[0] = 0;
    vtl1_logged_returns(m->arg[0], log1, &vsm_vtl1_assist(vp)->vtl_control);
    return 0;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t n = cmdline_get_uint("n", 200);
    if (n == 0 || n > MAX_CALLS)
        n = 200;
    if (!vsm_init(false))
        return 1;
    if (cmdline_is("protect", "1")) {
        uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
        hv_check("protect_config", vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0), HV_STATUS_SUCCESS);
        hv_check("protect_data_page", vtl1_op(VSM_OP_PROTECT, (uint64_t)data_page, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0),
                 HV_STATUS_SUCCESS);
    }
    vtl1_op(VSM_OP_USER, n, 0, 0, 0, 0); /* VTL1 now waits in vtl1_logged_returns */
    vtl0_logged_calls(n, log0);
    hv_check("leave_loop_nop", vtl1_op(VSM_OP_NOP, 0, 0, 0, 0, 0), 0);

    uint64_t seen_by_vtl1 = 0, seen_by_vtl0 = 0, control = 0;
    for (uint64_t i = 0; i < n; i++) {
        const uint64_t *a = log1[i], *b = log0[i];
        seen_by_vtl1 += a[0] == i && a[1] == ~i && a[2] == 3 * i && a[3] == (i ^ 0x5555) && a[4] == i && a[5] == ~i;
        control += a[6] == 1 && a[7] == 0 && a[8] == 0x11; /* EntryReason VTL_CALL; RAX 0, RCX = the call code */
        seen_by_vtl0 += b[0] == i + 1000 && b[1] == (~i ^ 0xff) && b[2] == 3 * i + 7 && b[3] == ~(i ^ 0x5555) &&
                        b[4] == i + 11 && b[5] == i + 13;
        if (i < 2 || (a[0] != i) || b[0] != i + 1000)
            printf("call %lu: vtl1 saw rbx=%lx rdx=%lx r8=%lx xmm0=%lx:%lx reason=%lx rax=%lx rcx=%lx; vtl0 got rbx=%lx\n",
                   i, a[0], a[1], a[2], a[4], a[5], a[6], a[7], a[8], b[0]);
    }
    hv_check("shared_registers_into_vtl1", seen_by_vtl1, n);
    hv_check("shared_registers_back_to_vtl0", seen_by_vtl0, n);
    hv_check("vtl1_control_area_each_entry", control, n);
    hv_check("protected_page_kept", data_page[0], 0);

    apic_enable();
    set_irq_handler(VTL0_VECTOR, vtl0_irq);
    struct vsm_mailbox *mb = &vsm_mbox[vsm_vp_index()];
    mb->fast = 1; /* VTL1's service loop answers the PV IPI with a fast return */
    uint64_t ipi = vtl1_op(VSM_OP_PV_IPI, VTL0_VECTOR, HV_VTL(0), 1ull << vsm_vp_index(), 0, 0);
    uint64_t spins = spin_for_interrupt(2000000); /* before anything that exits (printf) */
    hv_check("pv_ipi_to_own_vtl0_status", ipi, HV_STATUS_SUCCESS);
    printf("vtl0 interrupt after %lu pauses\n", spins);
    hv_check("interrupt_pending_at_fast_return_taken", vtl0_interrupts, 1);

    if (cmdline_is("protect", "1")) {
        uint32_t vp = vsm_vp_index();
        uint64_t code = (uint64_t)nx_page_call;
        uint32_t before = vsm_log[vp].intercepts;
        vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);
        hv_check("nx_protect_code_page", vtl1_op(VSM_OP_PROTECT, code, 1, HV_MAP_GPA_READ, HV_VTL_SELF, 0),
                 HV_STATUS_SUCCESS);
        struct vsm_mailbox *m = &vsm_mbox[vp];
        m->op = VSM_OP_NOP;
        m->fast = 1; /* VTL1's service loop answers with a fast return */
        nx_page_call(); /* which resumes VTL0 on the readable, non-executable page */
        m->fast = 0;
        hv_check("resume_on_nx_page_intercepted", vsm_log[vp].intercepts - before, 1);
        hv_check("resume_intercept_is_execute", vsm_log[vp].last_msg.access_type, HV_INTERCEPT_EXECUTE);
        hv_check("resume_intercept_gpa_page", vsm_log[vp].last_msg.gpa >> 12, code >> 12);
    }
    printf("calls %lu\n", n);
    hv_finish();
}
