/* bench/floor_serve.c: the C floor's VMM side, run inside a vsmtrace machine on the very
 * guest a benchmark times (bench/floor_vmm loads it with cffi).
 *
 * vsmtrace boots the guest and serves everything around the timed loops (loader, Hyper-V
 * set-up, VSM set-up, printf on COM1) in Python as usual. When the guest's VTL0 traps
 * with one of the round trips the benchmarks time, floor_serve takes over: it answers
 * that exit and every following one of the same kinds in a C loop over KVM_RUN, and
 * hands the first other exit back to Python still pending. So a floor figure and the
 * vsmtrace figure it bounds come from the same guest binary, the same CPU mode and page
 * tables, the same loop, the same VM configuration (CPUID, MSR filter, sync regs, VTL
 * protections), timed by the same guest RDTSC; only the VMM side of the round trip
 * differs. Each round trip does only what the TLFS makes a VMM do:
 *
 *   - port 0x80 `out` (the bare exit): nothing;
 *   - null fast hypercall (HvCallNotifyLongSpinWait): CPL 0 and long mode checked from
 *     the exported sregs, status written to RAX through sync regs;
 *   - memory hypercall (HvCallGetVpIndexFromApicId, one rep): the same checks, input and
 *     output GPAs checked (8-byte aligned, inside RAM, no page crossing), the 24 input
 *     bytes read, the VP index written, RAX = reps completed;
 *   - VTL call + fast VTL return (the loops vtl0_calls / vtl1_fast_returns of
 *     bench/guests/vtl.c, recognised by the return address on the guest stack): the
 *     shared GPRs moved through sync regs (no ioctl), CR2 compared from the exported
 *     sregs, the source vCPU's XSAVE image and debug registers read (the guest changes
 *     both without exiting) and the target's written only when they differ from what it
 *     holds, the entry reason and the entry RAX/RCX written to VTL1's VP assist control
 *     area on a call; on a return to VTL0, when VTL1 protected a page readable but not
 *     executable, one KVM_TRANSLATE of the resume RIP (the execute-intercept check that
 *     KVM cannot make itself on this host, docs/vsm.md).
 *
 * Returns FLOOR_PENDING (VTL0 holds an exit for Python), FLOOR_KICKED (a kick arrived:
 * nothing pending), FLOOR_NOT_MINE (the current exit is not one of these round trips:
 * Python serves it), or -errno / FLOOR_PROTOCOL (VTL1 exited with something else). */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

#define FLOOR_PENDING 0
#define FLOOR_KICKED 1
#define FLOOR_NOT_MINE 2
#define FLOOR_PROTOCOL (-10000)

#define TRAP_PORT 0x58
#define BARE_PORT 0x80
#define CONTROL_FAST (1ull << 16)
#define CODE_NOTIFY_LONG_SPIN_WAIT 0x0008ull
#define CODE_GET_VP_INDEX_FROM_APIC_ID 0x009aull
#define REP_COUNT_1 (1ull << 32)
#define CODE_VTL_CALL 0x11ull
#define CODE_VTL_RETURN 0x12ull
#define VTL_RETURN_FAST 1ull
#define PARTITION_SELF 0xffffffffffffffffull
#define ENTRY_REASON_VTL_CALL 1u
#define EFER_LMA (1ull << 10)
#define PAGE 4096ull

struct floor_vcpu {
    int fd;
    struct kvm_run *run;
};

struct floor {
    struct floor_vcpu vcpu[2];
    int nvtl;
    unsigned char *ram;     /* guest RAM from GPA 0 (identity-mapped by the SDK guests) */
    uint64_t ram_size;
    uint32_t vp_count;
    uint64_t call_lo, call_hi;     /* VTL0 return addresses of the timed VTL call loop */
    uint64_t ret_lo, ret_hi;       /* VTL1 return addresses of its fast-return loop */
    uint64_t control_gpa;          /* VTL1's HV_VP_VTL_CONTROL, 0 without an assist page */
    int translate_on_return;       /* VTL1 made a page readable but not executable */
    uint64_t served;               /* round trips answered here (a VTL call + return counts 2) */
    int wrote_fpu_or_dbg;          /* a target's XSAVE/debug registers were written here */
    int held_valid;
    struct kvm_xsave held_xsave[2];
    struct kvm_debugregs held_dbg[2];
};

static struct kvm_xsave scratch_xsave;
static struct kvm_debugregs scratch_dbg;

static uint64_t rsp_word(struct floor *f, struct kvm_regs *r) {
    uint64_t a = r->rsp;
    if (a > f->ram_size - 8)
        return 0;
    uint64_t v;
    memcpy(&v, f->ram + a, 8);
    return v;
}

static int supervisor_long_mode(struct kvm_run *run) {
    if (!(run->kvm_valid_regs & KVM_SYNC_X86_SREGS))
        return 1; /* nothing exported: the benchmark guests are CPL 0, long mode */
    return run->s.regs.sregs.cs.dpl == 0 && (run->s.regs.sregs.efer & EFER_LMA);
}

static int gpa_ok(struct floor *f, uint64_t gpa, uint64_t len) {
    return !(gpa & 7) && gpa < f->ram_size && len <= f->ram_size - gpa && (gpa & (PAGE - 1)) + len <= PAGE;
}

static int trap_out(struct kvm_run *run, int port) {
    return run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.count == 1 &&
           run->io.port == port;
}

static int shared_state(struct floor *f, int from, int to) {
    struct kvm_run *a = f->vcpu[from].run, *b = f->vcpu[to].run;
    struct kvm_regs *s = &a->s.regs.regs, *d = &b->s.regs.regs;
    uint64_t rsp = d->rsp, rip = d->rip, rflags = d->rflags;
    *d = *s;
    d->rsp = rsp;
    d->rip = rip;
    d->rflags = rflags;
    b->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    if ((a->kvm_valid_regs & b->kvm_valid_regs & KVM_SYNC_X86_SREGS) && a->s.regs.sregs.cr2 != b->s.regs.sregs.cr2) {
        struct kvm_sregs sr;
        if (ioctl(f->vcpu[to].fd, KVM_GET_SREGS, &sr) < 0) return -errno;
        sr.cr2 = a->s.regs.sregs.cr2;
        if (ioctl(f->vcpu[to].fd, KVM_SET_SREGS, &sr) < 0) return -errno;
    }
    if (ioctl(f->vcpu[from].fd, KVM_GET_DEBUGREGS, &scratch_dbg) < 0) return -errno;
    f->held_dbg[from] = scratch_dbg;
    if (memcmp(scratch_dbg.db, f->held_dbg[to].db, sizeof scratch_dbg.db) || scratch_dbg.dr6 != f->held_dbg[to].dr6) {
        struct kvm_debugregs t = f->held_dbg[to];
        memcpy(t.db, scratch_dbg.db, sizeof t.db);
        t.dr6 = scratch_dbg.dr6;
        if (ioctl(f->vcpu[to].fd, KVM_SET_DEBUGREGS, &t) < 0) return -errno;
        f->held_dbg[to] = t;
        f->wrote_fpu_or_dbg = 1;
    }
    if (ioctl(f->vcpu[from].fd, KVM_GET_XSAVE, &scratch_xsave) < 0) return -errno;
    f->held_xsave[from] = scratch_xsave;
    if (memcmp(&scratch_xsave, &f->held_xsave[to], sizeof scratch_xsave)) {
        if (ioctl(f->vcpu[to].fd, KVM_SET_XSAVE, &scratch_xsave) < 0) return -errno;
        f->held_xsave[to] = scratch_xsave;
        f->wrote_fpu_or_dbg = 1;
    }
    return 0;
}

static int vtl_call(struct floor *f) {
    int r = shared_state(f, 0, 1);
    if (r) return r;
    if (f->control_gpa && f->control_gpa <= f->ram_size - 24) {
        struct kvm_regs *d = &f->vcpu[1].run->s.regs.regs;
        uint32_t reason = ENTRY_REASON_VTL_CALL;
        unsigned char *c = f->ram + f->control_gpa;
        memcpy(c, &reason, 4);
        memcpy(c + 8, &d->rax, 8);
        memcpy(c + 16, &d->rcx, 8);
    }
    return 0;
}

static int vtl_return(struct floor *f) {
    int r = shared_state(f, 1, 0);
    if (r) return r;
    if (f->translate_on_return) {
        struct kvm_translation t = {.linear_address = f->vcpu[0].run->s.regs.regs.rip};
        if (ioctl(f->vcpu[0].fd, KVM_TRANSLATE, &t) < 0) return -errno;
    }
    return 0;
}

/* Answer VTL0's current exit if it is one of the timed round trips: 1 served, 2 switched
 * to VTL1, 0 not one of them. */
static int serve_vtl0(struct floor *f) {
    struct kvm_run *run = f->vcpu[0].run;
    if (trap_out(run, BARE_PORT))
        return 1;
    if (!trap_out(run, TRAP_PORT) || !supervisor_long_mode(run))
        return 0;
    struct kvm_regs *r = &run->s.regs.regs;
    if (r->rcx == (CODE_NOTIFY_LONG_SPIN_WAIT | CONTROL_FAST)) {
        r->rax = 0;
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return 1;
    }
    if (r->rcx == (CODE_GET_VP_INDEX_FROM_APIC_ID | REP_COUNT_1)) {
        if (!gpa_ok(f, r->rdx, 24) || !gpa_ok(f, r->r8, 4))
            return 0;
        uint64_t partition;
        uint32_t apic;
        memcpy(&partition, f->ram + r->rdx, 8);
        memcpy(&apic, f->ram + r->rdx + 16, 4);
        if (partition != PARTITION_SELF || apic >= f->vp_count)
            return 0;
        memcpy(f->ram + r->r8, &apic, 4); /* APIC ID == VP index here */
        r->rax = REP_COUNT_1;             /* HV_STATUS_SUCCESS, one rep completed */
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return 1;
    }
    if (f->nvtl == 2 && r->rcx == CODE_VTL_CALL && r->rax == 0) {
        uint64_t back = rsp_word(f, r);
        if (back >= f->call_lo && back < f->call_hi)
            return 2;
    }
    return 0;
}

static int serve_vtl1(struct floor *f) {
    struct kvm_run *run = f->vcpu[1].run;
    if (!trap_out(run, TRAP_PORT) || !supervisor_long_mode(run))
        return 0;
    struct kvm_regs *r = &run->s.regs.regs;
    if (r->rcx != CODE_VTL_RETURN || r->rax != VTL_RETURN_FAST)
        return 0;
    uint64_t back = rsp_word(f, r);
    return back >= f->ret_lo && back < f->ret_hi;
}

static int load_held(struct floor *f) {
    for (int v = 0; v < f->nvtl; v++) {
        if (ioctl(f->vcpu[v].fd, KVM_GET_XSAVE, &f->held_xsave[v]) < 0) return -errno;
        if (ioctl(f->vcpu[v].fd, KVM_GET_DEBUGREGS, &f->held_dbg[v]) < 0) return -errno;
    }
    f->held_valid = 1;
    return 0;
}

int floor_serve(struct floor *f) {
    int how = serve_vtl0(f);
    if (!how)
        return FLOOR_NOT_MINE;
    if (how == 2 && !f->held_valid) {
        int r = load_held(f);
        if (r) return r;
    }
    int cur = 0, kicked = 0;
    for (;;) {
        if (cur == 0) {
            if (how == 2) {
                int r = vtl_call(f);
                if (r) return r;
                cur = 1;
            }
            f->served++;
        } else {
            int r = vtl_return(f);
            if (r) return r;
            f->served++;
            cur = 0;
        }
        if (cur == 0 && kicked)
            return FLOOR_KICKED;
        struct floor_vcpu *v = &f->vcpu[cur];
        while (ioctl(v->fd, KVM_RUN, 0) < 0) {
            if (errno != EINTR && errno != EAGAIN)
                return -errno;
            if (cur == 0)
                return FLOOR_KICKED;
            kicked = 1; /* in VTL1: finish the round trip first, then let Python see the kick */
            v->run->immediate_exit = 0;
        }
        if (v->run->immediate_exit) {
            v->run->immediate_exit = 0;
            kicked = 1;
        }
        if (cur == 0) {
            how = serve_vtl0(f);
            if (!how)
                return FLOOR_PENDING;
        } else if (!serve_vtl1(f)) {
            return FLOOR_PROTOCOL;
        }
    }
}
