/*
 * vsm_protect.c - VTL protections against every access kind.
 *
 * VTL1 sets a mask (none, R, RW, RX, RWX) on a VTL0 data page or code page;
 * VTL0 reads (mov, rep movsb), writes (mov, push with RSP in the page, rep movsb),
 * does a read-modify-write (add [m], r) and executes (call into the page).  A denied
 * access must produce exactly one HvMessageTypeGpaIntercept in VTL1's SINT0 slot,
 * checked byte by byte against what VTL0 knows (access type, GPA, RIP of the
 * faulting instruction, its length and bytes, RFLAGS, segments and all GPRs as
 * they were before the instruction).  VTL1 then restores RWX and VTL0 re-executes:
 * the architectural result must be right.  Then the other resolutions: skip the
 * instruction, emulate a read, change RIP, inject #GP/#UD via PendingEvent0.
 */
#include "vsm.h"

static uint8_t dpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t cpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t buf[64];

/* Registers right before the access: message order rax rcx rdx rbx rsp rbp rsi rdi r8..r15, then RFLAGS. */
struct snap {
    uint64_t gprs[16];
    uint64_t rflags;
};
struct snap pre;

#define SNAPF "    pushfq\n    popq pre+128(%rip)\n"
#define SNAPR                                                                                          \
    "    movq %rax, pre+0(%rip)\n    movq %rcx, pre+8(%rip)\n    movq %rdx, pre+16(%rip)\n"            \
    "    movq %rbx, pre+24(%rip)\n    movq %rsp, pre+32(%rip)\n    movq %rbp, pre+40(%rip)\n"          \
    "    movq %rsi, pre+48(%rip)\n    movq %rdi, pre+56(%rip)\n    movq %r8, pre+64(%rip)\n"           \
    "    movq %r9, pre+72(%rip)\n    movq %r10, pre+80(%rip)\n    movq %r11, pre+88(%rip)\n"           \
    "    movq %r12, pre+96(%rip)\n    movq %r13, pre+104(%rip)\n    movq %r14, pre+112(%rip)\n"        \
    "    movq %r15, pre+120(%rip)\n"

/* Each accessor: rdi = address in the protected page, rsi = value / other buffer. */
__asm__(".text\n"
        ".globl acc_read, acc_read_i\n"
        "acc_read:\n" SNAPF SNAPR "acc_read_i:\n    movq (%rdi), %rax\n    ret\n"
        ".globl acc_write, acc_write_i\n"
        "acc_write:\n" SNAPF SNAPR "acc_write_i:\n    movq %rsi, (%rdi)\n    ret\n"
        ".globl acc_push, acc_push_i\n"
        "acc_push:\n" SNAPF "    movq %rsp, %r11\n    movq %rdi, %rsp\n" SNAPR
        "acc_push_i:\n    pushq %rsi\n    movq %r11, %rsp\n    ret\n"
        ".globl acc_movsb_w, acc_movsb_w_i\n"
        "acc_movsb_w:\n    movl $8, %ecx\n" SNAPF SNAPR
        "acc_movsb_w_i:\n    rep movsb\n    ret\n"
        ".globl acc_movsb_r, acc_movsb_r_i\n"
        "acc_movsb_r:\n    movl $8, %ecx\n    xchgq %rdi, %rsi\n" SNAPF SNAPR "acc_movsb_r_i:\n    rep movsb\n    ret\n"
        ".globl acc_add, acc_add_i\n"
        "acc_add:\n" SNAPF SNAPR "acc_add_i:\n    addq %rsi, (%rdi)\n    ret\n"
        ".globl acc_exec, acc_exec_i\n"
        "acc_exec:\n" SNAPF SNAPR "acc_exec_i:\n    call *%rdi\n    ret\n"
        ".globl ret_bad\n"
        "ret_bad:\n    movl $0xBAD, %eax\n    ret\n");

uint64_t acc_read(uint64_t a, uint64_t v);
uint64_t acc_write(uint64_t a, uint64_t v);
uint64_t acc_push(uint64_t a, uint64_t v);
uint64_t acc_movsb_w(uint64_t a, uint64_t v);
uint64_t acc_movsb_r(uint64_t a, uint64_t v);
uint64_t acc_add(uint64_t a, uint64_t v);
uint64_t acc_exec(uint64_t a, uint64_t v);
extern char acc_read_i[], acc_write_i[], acc_push_i[], acc_movsb_w_i[], acc_movsb_r_i[], acc_add_i[], acc_exec_i[];
extern char ret_bad[];

enum kind { K_READ, K_WRITE, K_PUSH, K_MOVSB_W, K_MOVSB_R, K_ADD, K_EXEC };
static const struct access {
    const char *name;
    uint64_t (*fn)(uint64_t, uint64_t);
    const char *insn;
    uint8_t len;
    uint32_t need; /* HV_MAP_GPA bits that allow it */
    int type;      /* expected access type (-1: read or write) */
} accesses[] = {
    [K_READ] = {"read", acc_read, acc_read_i, 3, HV_MAP_GPA_READ, HV_INTERCEPT_READ},
    [K_WRITE] = {"write", acc_write, acc_write_i, 3, HV_MAP_GPA_WRITE, HV_INTERCEPT_WRITE},
    [K_PUSH] = {"push", acc_push, acc_push_i, 1, HV_MAP_GPA_WRITE, HV_INTERCEPT_WRITE},
    [K_MOVSB_W] = {"movsb_w", acc_movsb_w, acc_movsb_w_i, 2, HV_MAP_GPA_WRITE, HV_INTERCEPT_WRITE},
    [K_MOVSB_R] = {"movsb_r", acc_movsb_r, acc_movsb_r_i, 2, HV_MAP_GPA_READ, HV_INTERCEPT_READ},
    [K_ADD] = {"add", acc_add, acc_add_i, 3, HV_MAP_GPA_READ | HV_MAP_GPA_WRITE, -1},
    [K_EXEC] = {"exec", acc_exec, acc_exec_i, 0, HV_MAP_GPA_KX, HV_INTERCEPT_EXECUTE},
};
static const struct {
    const char *name;
    uint32_t mask;
} masks[] = {
    {"none", HV_MAP_GPA_NONE},
    {"r", HV_MAP_GPA_READ},
    {"rw", HV_MAP_GPA_READ | HV_MAP_GPA_WRITE},
    {"rx", HV_MAP_GPA_READ | HV_MAP_GPA_KX},
    {"rwx", HV_MAP_GPA_ALL},
};

#define PATTERN 0x1122334455667788ull
#define VALUE 0x0101010101010101ull
#define DATA_OFF 0x18
#define PUSH_TOP 0x100
#define MOVSB_OFF 0x40

static uint32_t vp;
static struct hv_seg cs_seg, ds_seg, ss_seg;

static void get_seg(uint32_t name, struct hv_seg *s)
{
    uint64_t lo = 0, hi = 0;
    hv_get_vp_register(HV_VTL_SELF, name, &lo, &hi);
    memcpy(s, &lo, 8);
    memcpy((uint8_t *)s + 8, &hi, 8);
}

static void protect(uint8_t *page, uint32_t mask)
{
    uint64_t st = vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, mask, HV_VTL_SELF, 0);
    if (st != HV_STATUS_SUCCESS) {
        printf("FAIL protect_%p_%x: status 0x%lx\n", (void *)page, mask, st);
        hv_failures++;
    }
}

static void set_action(enum vsm_action a, uint64_t arg) { vtl1_op(VSM_OP_INTERCEPT_MODE, a, arg, 0, 0, 0); }

static void fill(void)
{
    *(uint64_t *)(dpage + DATA_OFF) = PATTERN;
    *(uint64_t *)(dpage + PUSH_TOP - 8) = PATTERN;
    for (int i = 0; i < 8; i++) {
        dpage[MOVSB_OFF + i] = (uint8_t)(0xA0 + i);
        buf[i] = (uint8_t)(0x50 + i);
    }
    static const uint8_t code[] = {0xB8, 0xDE, 0xC0, 0x00, 0x00, 0xC3}; /* mov eax, 0xC0DE; ret */
    memcpy(cpage, code, sizeof(code));
}

/* Run access k against the page; returns the value and the address that faults. */
static uint64_t perform(enum kind k, uint64_t *fault_addr)
{
    uint64_t d = (uint64_t)dpage;
    switch (k) {
    case K_READ:
        *fault_addr = d + DATA_OFF;
        return acc_read(d + DATA_OFF, 0);
    case K_WRITE:
        *fault_addr = d + DATA_OFF;
        return acc_write(d + DATA_OFF, VALUE);
    case K_PUSH:
        *fault_addr = d + PUSH_TOP - 8;
        return acc_push(d + PUSH_TOP, VALUE);
    case K_MOVSB_W:
        *fault_addr = d + MOVSB_OFF;
        return acc_movsb_w(d + MOVSB_OFF, (uint64_t)buf);
    case K_MOVSB_R:
        *fault_addr = d + MOVSB_OFF;
        return acc_movsb_r(d + MOVSB_OFF, (uint64_t)(buf + 16));
    case K_ADD:
        *fault_addr = d + DATA_OFF;
        return acc_add(d + DATA_OFF, VALUE);
    case K_EXEC:
        *fault_addr = (uint64_t)cpage;
        return acc_exec((uint64_t)cpage, 0);
    }
    return 0;
}

/* The architectural result of a completed access. */
static bool result_ok(enum kind k, uint64_t r)
{
    switch (k) {
    case K_READ:
        return r == PATTERN;
    case K_WRITE:
        return *(uint64_t *)(dpage + DATA_OFF) == VALUE;
    case K_PUSH:
        return *(uint64_t *)(dpage + PUSH_TOP - 8) == VALUE;
    case K_MOVSB_W:
        return memcmp(dpage + MOVSB_OFF, buf, 8) == 0;
    case K_MOVSB_R:
        return memcmp(buf + 16, dpage + MOVSB_OFF, 8) == 0;
    case K_ADD:
        return *(uint64_t *)(dpage + DATA_OFF) == PATTERN + VALUE;
    case K_EXEC:
        return (uint32_t)r == 0xC0DE;
    }
    return false;
}

/* Expected intercept message for access k at fault_addr (built after the page is RWX again). */
static void expect(const struct hv_gpa_intercept *got, enum kind k, uint64_t fault_addr, struct hv_gpa_intercept *w)
{
    const struct access *a = &accesses[k];
    memset(w, 0, sizeof(*w));
    w->type = HV_MESSAGE_TYPE_GPA_INTERCEPT;
    w->payload_size = 240;
    w->vp_index = vp;
    w->insn_length = k == K_EXEC ? 2 : a->len; /* execute: length 2, no bytes (seed) */
    w->access_type = (uint8_t)(a->type >= 0 ? a->type : (got->access_type <= 1 ? got->access_type : 1));
    w->execution_state = (1 << 2) | (1 << 4); /* CPL0, CR0.PE, EFER.LMA, VTL0 */
    w->cs = cs_seg;
    w->rip = k == K_EXEC ? fault_addr : (uint64_t)a->insn;
    w->rflags = pre.rflags | (1ull << 16); /* RF, as hardware saves it on an EPT violation */
    if (k == K_ADD) /* KVM retires a read-modify-write before its denied store exits: arithmetic flags are the add's (docs/vsm.md, Limitations) */
        w->rflags = (w->rflags & ~0x8D5ull) | (got->rflags & 0x8D5ull);
    w->cache_type = 6;
    uint8_t count = got->insn_byte_count;
    if (count != a->len && count != 16)
        count = a->len;
    if (k == K_EXEC)
        count = 0;
    w->insn_byte_count = count;
    memcpy(w->insn_bytes, (const void *)w->rip, count);
    if (got->access_info & 1) {
        w->access_info = 1;
        w->gva = fault_addr;
    }
    w->gpa = fault_addr;
    w->ds = ds_seg;
    w->ss = ss_seg;
    memcpy(w->gprs, pre.gprs, sizeof(w->gprs));
    if (k == K_EXEC)
        w->gprs[4] -= 8; /* the call retired: the fetch of its target faults */
}

static void one(int mi, enum kind k)
{
    const struct access *a = &accesses[k];
    uint32_t mask = masks[mi].mask;
    uint8_t *page = k == K_EXEC ? cpage : dpage;
    char name[64];
    if (cmdline_is("skip", a->name)) /* local diagnosis only: leave one access kind out */
        return;
    fill();
    protect(page, mask);
    set_action(VSM_ACT_RESTORE, 0);
    uint32_t before = vsm_log[vp].intercepts;
    uint64_t fault = 0;
    uint64_t r = perform(k, &fault);
    uint32_t n = vsm_log[vp].intercepts - before;
    bool denied = (mask & a->need) != a->need;
    /* A fetch from a readable page is not refused by KVM (docs/vsm.md, "How protections reach
     * KVM"): it runs, and vsmtrace intercepts it only when VTL0 resumes on that page. */
    if (k == K_EXEC && (mask & HV_MAP_GPA_READ))
        denied = false;
    protect(page, HV_MAP_GPA_ALL);
    snprintf(name, sizeof(name), "%s_%s_intercepts", masks[mi].name, a->name);
    hv_check(name, n, denied ? 1 : 0);
    snprintf(name, sizeof(name), "%s_%s_result", masks[mi].name, a->name);
    hv_check_true(name, result_ok(k, r));
    if (denied && n == 1) {
        struct hv_gpa_intercept want;
        const struct hv_gpa_intercept *got = (const struct hv_gpa_intercept *)&vsm_log[vp].last_msg;
        expect(got, k, fault, &want);
        snprintf(name, sizeof(name), "%s_%s_message", masks[mi].name, a->name);
        int before_fail = hv_failures;
        vsm_check_bytes(name, got, &want, sizeof(want));
        if (hv_failures != before_fail)
            printf("  got: rip=0x%lx len=%u type=%u count=%u gpa=0x%lx rsp=0x%lx bytes=%02x %02x %02x; want rip=0x%lx "
                   "len=%u rsp=0x%lx\n",
                   got->rip, got->insn_length, got->access_type, got->insn_byte_count, got->gpa, got->gprs[4],
                   got->insn_bytes[0], got->insn_bytes[1], got->insn_bytes[2], want.rip, want.insn_length,
                   want.gprs[4]);
        snprintf(name, sizeof(name), "%s_%s_restore_status", masks[mi].name, a->name);
        hv_check(name, vsm_log[vp].action_status, HV_STATUS_SUCCESS);
    }
}

static volatile uint64_t exc_vector, exc_err, exc_rip;
static bool on_exception(struct int_frame *f)
{
    uint64_t base;
    if (f->rip - (uint64_t)acc_write_i < 3)
        base = (uint64_t)acc_write_i;
    else if (f->rip - (uint64_t)acc_read_i < 3)
        base = (uint64_t)acc_read_i;
    else
        return false;
    exc_vector = f->vector;
    exc_err = f->error_code;
    exc_rip = f->rip; /* checked against the instruction start */
    f->rip = base + 3;
    return true;
}

static void resolutions(void)
{
    uint64_t fault;
    /* Skip: the write never happens, execution goes on after it. */
    fill();
    protect(dpage, HV_MAP_GPA_READ);
    set_action(VSM_ACT_SKIP, 0);
    uint32_t before = vsm_log[vp].intercepts;
    perform(K_WRITE, &fault);
    hv_check("skip_write_intercepts", vsm_log[vp].intercepts - before, 1);
    hv_check("skip_write_no_effect", *(uint64_t *)(dpage + DATA_OFF), PATTERN);
    hv_check("skip_set_rip_status", vsm_log[vp].action_status, HV_STATUS_SUCCESS);
    protect(dpage, HV_MAP_GPA_ALL);

    /* Emulated read: VTL1 skips the load and supplies RAX itself. */
    protect(dpage, HV_MAP_GPA_NONE);
    set_action(VSM_ACT_EMULATE_READ, 0 /* rax */);
    hv_check("emulate_read_value", perform(K_READ, &fault), 0x5EC0DE);
    protect(dpage, HV_MAP_GPA_ALL);

    /* PendingEvent0: #GP with an error code into VTL0 at the faulting write. */
    set_exception_handler(13, on_exception);
    set_exception_handler(6, on_exception);
    fill();
    protect(dpage, HV_MAP_GPA_READ);
    set_action(VSM_ACT_INJECT, HV_PENDING_EXCEPTION(13, 1, 0x10));
    exc_vector = exc_rip = ~0ull;
    perform(K_WRITE, &fault);
    hv_check("inject_status", vsm_log[vp].action_status, HV_STATUS_SUCCESS);
    hv_check("inject_gp_seen", exc_rip, (uint64_t)acc_write_i);
    hv_check("inject_gp_vector", exc_vector, 13);
    hv_check("inject_gp_error_code", exc_err, 0x10);
    hv_check("inject_gp_no_write", *(uint64_t *)(dpage + DATA_OFF), PATTERN);
    protect(dpage, HV_MAP_GPA_NONE);
    set_action(VSM_ACT_INJECT, HV_PENDING_EXCEPTION(6, 0, 0));
    exc_vector = exc_rip = ~0ull;
    perform(K_READ, &fault);
    hv_check("inject_ud_seen", exc_rip, (uint64_t)acc_read_i);
    hv_check("inject_ud_vector", exc_vector, 6);
    protect(dpage, HV_MAP_GPA_ALL);
    set_exception_handler(13, 0);
    set_exception_handler(6, 0);

    /* A fetch from a no-execute page resolved by moving RIP to a stub that returns. */
    fill();
    protect(cpage, HV_MAP_GPA_NONE);
    set_action(VSM_ACT_SET_RIP, (uint64_t)ret_bad);
    hv_check("set_rip_exec_recovers", (uint32_t)perform(K_EXEC, &fault), 0xBAD);
    protect(cpage, HV_MAP_GPA_ALL);
    set_action(VSM_ACT_RESTORE, 0);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_protect start\n");
    if (!vsm_init(false))
        hv_finish();
    vp = vsm_vp_index();
    get_seg(HV_REG_CS, &cs_seg);
    get_seg(HV_REG_DS, &ds_seg);
    get_seg(HV_REG_SS, &ss_seg);
    uint64_t cfg = HV_VSM_CONFIG_ENABLE_VTL_PROTECTION | HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL);
    hv_check("enable_vtl_protection", vtl1_op(VSM_OP_CONFIG, cfg, 0, 0, 0, 0), HV_STATUS_SUCCESS);
    for (int mi = 0; mi < (int)ARRAY_SIZE(masks); mi++)
        for (int k = 0; k < (int)ARRAY_SIZE(accesses); k++)
            one(mi, (enum kind)k);
    resolutions();
    hv_check("no_stray_interrupt_entries", vsm_log[vp].entries[HV_ENTRY_INTERRUPT], vsm_log[vp].intercepts);
    hv_finish();
}
