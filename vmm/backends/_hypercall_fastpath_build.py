"""cffi source of the hypercall fast path: common hypercalls answered in C inside KVM_RUN.

``vsm_kvm_run_fast`` (vmm/kvm/_ffi_build.py) calls an I/O server on every port-I/O exit;
this module's ``vsm_hc_serve_io`` is that server for the hypercall trap port. It answers a
hypercall only when its whole effect is known without Python, and otherwise returns 0
having changed nothing, so the exit goes to the Python dispatcher (vmm/hyperv/hypercall.py)
exactly as without it. Python owns every decision about *which* calls may be answered here
(vmm/backends/hypercall_fastpath.py, from the dispatcher's own plans) and keeps the mirrored
state current; the rules are in docs/architecture.md ("Exit paths in C").

Served, when the caller is in 64-bit mode at CPL 0 and its VTL's hypercall page is enabled:

- the fast call whose input value is ``spin_control`` (HvCallNotifyLongSpinWait, advisory:
  SUCCESS in RAX, nothing else);
- HvCallGetVpIndexFromApicId as a memory call (input value matches ``apic_mask/value``),
  when the input and output blocks pass the dispatcher's alignment, page and overlap
  rules, lie in RAM, the caller's VTL has no page restricted by a higher VTL (checked
  under that view's guard, which protection changes take for writing), the header names
  this partition and the caller's own VTL, and every APIC ID in the mirrored table is
  known. The input is copied once; the VP indices go to their absolute places; RAX gets
  SUCCESS with every rep completed;
- HvCallVtlCall from VTL0 (input 0) and HvCallVtlReturn from VTL1 with Fast set, on a VP
  whose mirror says a switch between exactly these two VTLs is plain (``vsm_hc_vtls.ready``,
  kept by vmm/backends/vsm.py): the shared state moves with the KVM module's
  ``vsm_copy_shared``, a call writes VTL1's HV_VP_VTL_CONTROL (entry reason, the entry RAX/RCX)
  through VTL1's view, and the answer tells ``vsm_kvm_run_fast`` to go on with the other VTL's
  vCPU. CR2 that differs between the two VTLs, a return to a VTL0 view with pages KVM cannot
  keep from executing, or anything else makes it Python's switch.
"""

from __future__ import annotations

import cffi

CDEF = r"""
#define VSM_HC_VTLS ...
#define VSM_HC_APIC_IDS ...
#define VSM_HC_RAM_RANGES ...
#define VSM_HC_NO_VP ...
#define VSM_HC_TRAP_PORT ...
#define VSM_HC_REP_COUNT_SHIFT ...
#define VSM_HC_REP_START_SHIFT ...
#define VSM_HC_REP_MASK ...
#define VSM_HC_APIC_HEADER_SIZE ...
#define VSM_HC_APIC_ELEMENT_SIZE ...
#define VSM_HC_VP_ELEMENT_SIZE ...
#define VSM_HC_PARTITION_SELF ...

struct vsm_view_guard {
    uint64_t restricted;
    uint64_t unenforced;
    uint8_t *nx;
    uint64_t nx_pages;
    ...;
};
void vsm_view_guard_init(struct vsm_view_guard *g);
void vsm_view_guard_begin(struct vsm_view_guard *g);
void vsm_view_guard_end(struct vsm_view_guard *g, uint64_t restricted, uint64_t unenforced);

struct vsm_ram_range { uint64_t gpa; uint64_t size; uint8_t *host; };

struct vsm_hc_partition {
    uint64_t spin_control;
    uint64_t apic_mask;
    uint64_t apic_value;
    uint64_t partition_id;
    uint32_t page_enabled[4];
    uint32_t vp_of_apic[256];
    uint32_t nram;
    struct vsm_ram_range ram[2];
    struct vsm_view_guard *views[4];
};

typedef int (*vsm_hc_copy_fn)(void *pair, int sregs_exported);
typedef int (*vsm_hc_record_fn)(void *store, uint32_t events, uint32_t orders, const uint64_t *words);
struct vsm_hc_vtls {
    uint32_t ready;
    uint32_t trap_retired;
    int fd[2];
    void *run[2];
    void *pair[2];
    vsm_hc_copy_fn copy;
    uint8_t *control;
    uint32_t entry_reason_call;
    struct vsm_view_guard *guard[2];
    uint64_t calls;
    uint64_t returns;
    vsm_hc_record_fn record;
    void *store;
    uint32_t vp;
    uint64_t control_gpa;
    uint32_t late;
};

#define VSM_HC_RECORD_LATE ...
#define VSM_HC_RECORD_CALL ...
#define VSM_HC_RECORD_RETURN ...
#define VSM_HC_RECORD_WORDS ...
#define VSM_HC_NO_CONTROL ...

struct vsm_hc_caller {
    struct vsm_hc_partition *partition;
    uint32_t vtl;
    uint64_t served;
    struct vsm_hc_vtls *vtls;
};

#define VSM_HC_CODE_VTL_CALL ...
#define VSM_HC_CODE_VTL_RETURN ...
#define VSM_HC_VTL_RETURN_FAST ...
#define VSM_HC_CONTROL_AREA_SIZE ...
#define VSM_HC_SWITCH ...

int vsm_hc_serve_io(void *caller, void *run);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <pthread.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

#define VSM_HC_VTLS 4
#define VSM_HC_APIC_IDS 256
#define VSM_HC_RAM_RANGES 2
#define VSM_HC_NO_VP 0xffffffffu
#define VSM_HC_TRAP_PORT 0x58
/* The TLFS hypercall input value's rep fields (Python checks them against hvdef). */
#define VSM_HC_REP_COUNT_SHIFT 32
#define VSM_HC_REP_START_SHIFT 48
#define VSM_HC_REP_MASK 0xfffull
/* HvCallGetVpIndexFromApicId: header (partition id u64, target VTL u8, 7 pad), u32 in, u32 out. */
#define VSM_HC_APIC_HEADER_SIZE 16
#define VSM_HC_APIC_ELEMENT_SIZE 4
#define VSM_HC_VP_ELEMENT_SIZE 4
#define VSM_HC_PARTITION_SELF 0xffffffffffffffffull
#define HC_ALIGN 8ull
#define HC_PAGE 4096ull
#define HC_CR0_PE 1ull
#define HC_EFER_LMA (1ull << 10)

/* A VTL view's protections as the fast path sees them: ``restricted`` is the number of pages
   a higher VTL restricted, ``unenforced`` how many of them are readable but not executable
   (KVM cannot deny their fetches; vmm/memory_view.py), and ``nx`` has a bit set for each of
   those pages (page numbers below ``nx_pages``); the counts are all ones while a change is
   under way. Readers hold the lock for reading while they check them and touch guest
   memory, so a protection change (begin) waits for every access already past the check:
   none can land after the change returns. */
struct vsm_view_guard {
    uint64_t restricted;
    uint64_t unenforced;
    uint8_t *nx;
    uint64_t nx_pages;
    pthread_rwlock_t lock;
};

void vsm_view_guard_init(struct vsm_view_guard *g) {
    pthread_rwlock_init(&g->lock, NULL);
    g->restricted = 0;
    g->unenforced = 0;
}

void vsm_view_guard_begin(struct vsm_view_guard *g) {
    pthread_rwlock_wrlock(&g->lock);
    __atomic_store_n(&g->restricted, ~0ull, __ATOMIC_RELEASE);
    __atomic_store_n(&g->unenforced, ~0ull, __ATOMIC_RELEASE);
    pthread_rwlock_unlock(&g->lock);
}

void vsm_view_guard_end(struct vsm_view_guard *g, uint64_t restricted, uint64_t unenforced) {
    __atomic_store_n(&g->unenforced, unenforced, __ATOMIC_RELEASE);
    __atomic_store_n(&g->restricted, restricted, __ATOMIC_RELEASE);
}

struct vsm_ram_range { uint64_t gpa; uint64_t size; uint8_t *host; };

struct vsm_hc_partition {
    uint64_t spin_control;       /* NotifyLongSpinWait's fast input value, 0: not served here */
    uint64_t apic_mask;          /* GetVpIndexFromApicId: (value & mask) == apic_value; 0: not served */
    uint64_t apic_value;
    uint64_t partition_id;
    uint32_t page_enabled[VSM_HC_VTLS];   /* HV_X64_MSR_HYPERCALL.Enable of each VTL */
    uint32_t vp_of_apic[VSM_HC_APIC_IDS]; /* VSM_HC_NO_VP: not a VP of this partition */
    uint32_t nram;
    struct vsm_ram_range ram[VSM_HC_RAM_RANGES];
    struct vsm_view_guard *views[VSM_HC_VTLS];
};

/* VTL call / fast return between VTL0 and VTL1 of one VP. Python (vmm/backends/vsm.py) sets
   ``ready`` only while such a switch has no effect beyond the ones done here: both VTLs
   enabled on the VP and no other, VTL1's VINA register 0 and no TLB lock of VTL1's, no VINA
   notification outstanding, both vCPUs' sregs exported with every exit, no interrupt
   deliverable in either VTL's APIC; and clears it
   before any of that changes. */
#define VSM_HC_CODE_VTL_CALL 0x11ull
#define VSM_HC_CODE_VTL_RETURN 0x12ull
#define VSM_HC_VTL_RETURN_FAST 1ull
#define VSM_HC_CONTROL_AREA_SIZE 24   /* HV_VP_VTL_CONTROL: reason u32, VINA u8, 3 pad, RAX, RCX */
#define VSM_HC_SWITCH 16              /* vsm_kvm_run_fast's VSM_IO_SWITCH: go on with VTL (answer - 16) */

typedef int (*vsm_hc_copy_fn)(void *pair, int sregs_exported);
/* The recorder's vsmt_native_record (recorder/_store_build.py). */
typedef int (*vsm_hc_record_fn)(void *store, uint32_t events, uint32_t orders, const uint64_t *words);

/* What a switch answered here while recording leaves in the trace: one native record whose
   words are, in order: the tag, the VP, the VTL it left, RIP and RCX, RAX, RDX, R8, R9, R10 as
   the exit left them (before anything else ran), the GPA of VTL1's control area (VSM_HC_NO_CONTROL:
   none), for a call the 24 bytes that area held before the call wrote it, the time the switch
   took (ns), and RIP once the trapping OUT is complete (where the caller resumes). The writer
   expands it into the events and entries the Python switch records
   (vmm/backends/recorded_switch.py). */
#define VSM_HC_RECORD_CALL 1
#define VSM_HC_RECORD_RETURN 2
/* The recorder's VSMT_LATE: events are old or many, the recording thread must flush and wait. The
   next switch is then Python's, whose event does that (backpressure: C never outruns the writer). */
#define VSM_HC_RECORD_LATE 2
#define VSM_HC_RECORD_WORDS 16
#define VSM_HC_NO_CONTROL 0xffffffffffffffffull
/* Events and emulation entries each stands for: a call is the entry notification's EMULATION,
   VTL_SWITCH, HYPERCALL and the hypercall's EMULATION (two entries); a return, the last three. */
#define VSM_HC_CALL_EVENTS 4
#define VSM_HC_CALL_ENTRIES 2
#define VSM_HC_RETURN_EVENTS 3
#define VSM_HC_RETURN_ENTRIES 1

struct vsm_hc_vtls {
    uint32_t ready;
    uint32_t trap_retired;       /* KVM steps over the trapping OUT before it exits (PVM) */
    int fd[2];
    void *run[2];                /* struct kvm_run * of each VTL's vCPU */
    void *pair[2];               /* struct vsm_shared_pair * from VTL i to the other (KVM module) */
    vsm_hc_copy_fn copy;         /* the KVM module's vsm_copy_shared */
    uint8_t *control;            /* VTL1's HV_VP_VTL_CONTROL in host memory, NULL: no assist page */
    uint32_t entry_reason_call;  /* EntryReason.VTL_CALL */
    struct vsm_view_guard *guard[2];
    uint64_t calls;              /* VTL calls answered here */
    uint64_t returns;            /* fast VTL returns answered here */
    vsm_hc_record_fn record;     /* recording: how each switch answered here is recorded (NULL: not recording) */
    void *store;
    uint32_t vp;                 /* this VP's index (for the record) */
    uint64_t control_gpa;        /* GPA of ``control`` (for the record) */
    uint32_t late;               /* the last record's status was VSM_HC_RECORD_LATE */
};

static int64_t hc_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct vsm_hc_caller {
    struct vsm_hc_partition *partition;
    uint32_t vtl;
    uint64_t served;             /* hypercalls answered here for this vCPU (VTL switches not counted) */
    struct vsm_hc_vtls *vtls;    /* this VP's VTL switch mirror, NULL: none */
};

/* Host address of [gpa, gpa + size) when it lies in one RAM range, else NULL. */
static uint8_t *hc_host(const struct vsm_hc_partition *p, uint64_t gpa, uint64_t size) {
    for (uint32_t i = 0; i < p->nram; i++) {
        const struct vsm_ram_range *r = &p->ram[i];
        if (gpa >= r->gpa && gpa + size <= r->gpa + r->size)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static int hc_block_ok(uint64_t gpa, uint64_t size) {
    return gpa % HC_ALIGN == 0 && (gpa % HC_PAGE) + size <= HC_PAGE;
}

static int hc_apic_ids(struct vsm_hc_caller *c, struct kvm_regs *r, uint64_t control) {
    struct vsm_hc_partition *p = c->partition;
    uint64_t count = (control >> VSM_HC_REP_COUNT_SHIFT) & VSM_HC_REP_MASK;
    uint64_t start = (control >> VSM_HC_REP_START_SHIFT) & VSM_HC_REP_MASK;
    if (count == 0 || start >= count)
        return 0;
    uint64_t in_size = VSM_HC_APIC_HEADER_SIZE + count * VSM_HC_APIC_ELEMENT_SIZE;
    uint64_t out_size = count * VSM_HC_VP_ELEMENT_SIZE;
    uint64_t in = r->rdx, out = r->r8;
    if (!hc_block_ok(in, in_size) || !hc_block_ok(out, out_size))
        return 0;
    if (in < out + out_size && out < in + in_size)
        return 0;
    uint8_t *hin = hc_host(p, in, in_size), *hout = hc_host(p, out, out_size);
    if (!hin || !hout)
        return 0;
    struct vsm_view_guard *g = p->views[c->vtl];
    if (!g)
        return 0;
    uint8_t copy[HC_PAGE];
    uint32_t vps[HC_PAGE / VSM_HC_APIC_ELEMENT_SIZE];
    int ok = 1;
    pthread_rwlock_rdlock(&g->lock);
    if (__atomic_load_n(&g->restricted, __ATOMIC_ACQUIRE) != 0) {
        pthread_rwlock_unlock(&g->lock);
        return 0;
    }
    memcpy(copy, hin, in_size);  /* read once: another VP may change the input meanwhile */
    uint64_t partition_id;
    memcpy(&partition_id, copy, sizeof partition_id);
    if ((partition_id != VSM_HC_PARTITION_SELF && partition_id != p->partition_id) || copy[8] != 0)
        ok = 0;  /* another partition, or an explicit target VTL: Python decides */
    for (uint64_t i = start; ok && i < count; i++) {
        uint32_t apic;
        memcpy(&apic, copy + VSM_HC_APIC_HEADER_SIZE + i * VSM_HC_APIC_ELEMENT_SIZE, sizeof apic);
        if (apic >= VSM_HC_APIC_IDS || p->vp_of_apic[apic] == VSM_HC_NO_VP)
            ok = 0;  /* a failure status with partial output: Python writes it */
        else
            vps[i] = p->vp_of_apic[apic];
    }
    if (ok)
        memcpy(hout + start * VSM_HC_VP_ELEMENT_SIZE, vps + start, (count - start) * VSM_HC_VP_ELEMENT_SIZE);
    pthread_rwlock_unlock(&g->lock);
    if (!ok)
        return 0;
    r->rax = count << VSM_HC_REP_COUNT_SHIFT;  /* HV_STATUS_SUCCESS, every rep completed */
    return 1;
}

/* Whether the lower VTL's vCPU resumes outside every readable, non-executable page of its view
   (guard held for reading): one KVM_TRANSLATE of CS.base + RIP when there are such pages. */
static int hc_resumes_executable(const struct vsm_view_guard *g, int fd, const struct kvm_run *run) {
    uint64_t unenforced = __atomic_load_n(&g->unenforced, __ATOMIC_ACQUIRE);
    if (unenforced == 0)
        return 1;
    if (unenforced == ~0ull || !g->nx)
        return 0;
    struct kvm_translation t;
    memset(&t, 0, sizeof t);
    t.linear_address = run->s.regs.sregs.cs.base + run->s.regs.regs.rip;
    if (ioctl(fd, KVM_TRANSLATE, &t) < 0)
        return 0;
    if (!t.valid)
        return 1;  /* not mapped: the fetch faults in the guest, no intercept (as Python) */
    uint64_t page = t.physical_address >> 12;
    return page >= g->nx_pages || !(g->nx[page >> 3] & (1u << (page & 7)));
}

/* A VTL call from VTL0 or a fast VTL return from VTL1, answered: VSM_HC_SWITCH + the target VTL;
   0 when Python must do it (nothing changed), -errno when moving the shared state failed. */
static int hc_vtl_switch(struct vsm_hc_caller *c, struct kvm_run *run, const struct kvm_regs *r) {
    struct vsm_hc_vtls *v = c->vtls;
    uint32_t from = c->vtl;
    if (!v || from > 1 || !__atomic_load_n(&v->ready, __ATOMIC_ACQUIRE))
        return 0;
    if (v->late) {
        v->late = 0;
        return 0;  /* Python's switch records this one, and its event makes the flush wait (see VSM_HC_RECORD_LATE) */
    }
    if (from == 0 ? (r->rcx != VSM_HC_CODE_VTL_CALL || r->rax != 0)
                  : (r->rcx != VSM_HC_CODE_VTL_RETURN || r->rax != VSM_HC_VTL_RETURN_FAST))
        return 0;
    uint32_t to = 1 - from;
    struct kvm_run *dst = v->run[to];
    if (run->s.regs.sregs.cr2 != dst->s.regs.sregs.cr2)
        return 0;  /* CR2 moves with KVM_SET_SREGS: Python's */
    uint64_t words[VSM_HC_RECORD_WORDS] = {0};
    int64_t started = 0;
    if (v->record) {
        started = hc_now_ns();
        words[0] = from == 0 ? VSM_HC_RECORD_CALL : VSM_HC_RECORD_RETURN;
        words[1] = v->vp;
        words[2] = from;
        words[3] = r->rip;
        words[4] = r->rcx;
        words[5] = r->rax;
        words[6] = r->rdx;
        words[7] = r->r8;
        words[8] = r->r9;
        words[9] = r->r10;
        words[10] = v->control ? v->control_gpa : VSM_HC_NO_CONTROL;
    }
    struct vsm_view_guard *g = v->guard[to];
    pthread_rwlock_rdlock(&g->lock);
    /* A call writes VTL1's control area through VTL1's view; a return resumes VTL0, and a
       resume on a readable, non-executable page is the execute intercept (Python's switch
       raises it: KVM would fetch from the page without exiting). */
    int plain = to == 1 ? __atomic_load_n(&g->restricted, __ATOMIC_ACQUIRE) == 0
                        : hc_resumes_executable(g, v->fd[0], dst);
    if (!plain) {
        pthread_rwlock_unlock(&g->lock);
        return 0;
    }
    if (!v->trap_retired) {
        /* Stock KVM completes the OUT (steps RIP over it) in the next KVM_RUN: do that now,
           without running guest code, before the other vCPU takes over (as Python does). */
        run->immediate_exit = 1;
        int rr = ioctl(v->fd[from], KVM_RUN, 0);
        int err = errno;
        run->immediate_exit = 0;
        if (rr < 0 && err != EINTR) {
            pthread_rwlock_unlock(&g->lock);
            return -err;
        }
    }
    if (v->record)
        words[15] = r->rip;  /* where the caller resumes, the OUT now complete */
    int wrote = v->copy(v->pair[from], 1);
    if (wrote >= 0 && from == 0 && v->control) {
        const struct kvm_regs *d = &dst->s.regs.regs;
        if (v->record)
            memcpy(&words[11], v->control, VSM_HC_CONTROL_AREA_SIZE);
        uint32_t reason = v->entry_reason_call;
        memcpy(v->control, &reason, sizeof reason);
        memcpy(v->control + 8, &d->rax, sizeof d->rax);
        memcpy(v->control + 16, &d->rcx, sizeof d->rcx);
    }
    pthread_rwlock_unlock(&g->lock);
    if (wrote < 0)
        return wrote;
    if (from == 0)
        v->calls++;
    else
        v->returns++;
    if (v->record) {
        words[14] = (uint64_t)(hc_now_ns() - started);
        /* A flush that is only due is the writer's background flusher's: this thread stays in the guest. */
        int status = from == 0 ? v->record(v->store, VSM_HC_CALL_EVENTS, VSM_HC_CALL_ENTRIES, words)
                               : v->record(v->store, VSM_HC_RETURN_EVENTS, VSM_HC_RETURN_ENTRIES, words);
        v->late = status == VSM_HC_RECORD_LATE;
    }
    return VSM_HC_SWITCH + (int)to;
}

/* 1: the exit was a hypercall answered here (registers written through sync regs, the
   guest may resume); VSM_HC_SWITCH + n: a VTL switch, go on with VTL n's vCPU; 0: not
   answered, nothing changed; -errno: the switch failed in KVM. */
int vsm_hc_serve_io(void *caller, void *kvm_run) {
    struct vsm_hc_caller *c = caller;
    struct kvm_run *run = kvm_run;
    struct vsm_hc_partition *p = c->partition;
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT || run->io.port != VSM_HC_TRAP_PORT
        || run->io.size != 1 || run->io.count != 1)
        return 0;
    if ((run->kvm_valid_regs & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)) != (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS))
        return 0;
    const struct kvm_sregs *s = &run->s.regs.sregs;
    if (!(s->cr0 & HC_CR0_PE) || !(s->efer & HC_EFER_LMA) || !s->cs.l || s->cs.dpl != 0)
        return 0;  /* another mode or CPL: #UD or the x86 convention, Python's */
    if (c->vtl >= VSM_HC_VTLS || !__atomic_load_n(&p->page_enabled[c->vtl], __ATOMIC_ACQUIRE))
        return 0;
    struct kvm_regs *r = &run->s.regs.regs;
    uint64_t control = r->rcx;
    if (control == VSM_HC_CODE_VTL_CALL || control == VSM_HC_CODE_VTL_RETURN)
        return hc_vtl_switch(c, run, r);
    int served = 0;
    if (p->spin_control && control == p->spin_control) {
        r->rax = 0;  /* HV_STATUS_SUCCESS */
        served = 1;
    } else if (p->apic_mask && (control & p->apic_mask) == p->apic_value) {
        served = hc_apic_ids(c, r, control);
    }
    if (served) {
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        c->served++;
    }
    return served;
}
"""


def make_ffi(module_name: str = "_vsmtrace_hypercalls") -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(module_name, SOURCE, libraries=["pthread"])
    return ffi
