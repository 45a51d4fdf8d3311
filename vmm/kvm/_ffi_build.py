"""cffi definitions for the parts of <linux/kvm.h> vsmtrace uses.

API mode: cffi checks every declared field against the real kernel header, so a
layout mistake fails the build instead of corrupting a vCPU. ``...`` marks
structures and constants whose rest comes from the header.
"""

from __future__ import annotations

import cffi

CDEF = r"""
typedef unsigned char __u8; typedef unsigned short __u16; typedef unsigned int __u32; typedef unsigned long long __u64;

#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_ENABLE_CAP ...
#define KVM_X86_SET_MSR_FILTER ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_XSAVE ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_SET_CPUID2 ...
#define KVM_INTERRUPT ...
#define KVM_NMI ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_TSC_KHZ ...
#define KVM_TRANSLATE ...
#define KVM_HAS_DEVICE_ATTR ...
#define KVM_GET_DEVICE_ATTR ...
#define KVM_SET_DEVICE_ATTR ...
#define KVM_VCPU_TSC_CTRL ...
#define KVM_VCPU_TSC_OFFSET ...
#define KVM_CAP_VCPU_ATTRIBUTES ...

#define KVM_CAP_SYNC_REGS ...
#define KVM_CAP_X86_USER_SPACE_MSR ...
#define KVM_CAP_X86_MSR_FILTER ...
#define KVM_CAP_HYPERV ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_EXT_CPUID ...

#define KVM_SYNC_X86_REGS ...
#define KVM_SYNC_X86_SREGS ...
#define KVM_SYNC_X86_EVENTS ...

#define KVM_MEM_READONLY ...

#define KVM_MSR_EXIT_REASON_INVAL ...
#define KVM_MSR_EXIT_REASON_UNKNOWN ...
#define KVM_MSR_EXIT_REASON_FILTER ...
#define KVM_MSR_FILTER_READ ...
#define KVM_MSR_FILTER_WRITE ...
#define KVM_MSR_FILTER_DEFAULT_ALLOW ...
#define KVM_MSR_FILTER_DEFAULT_DENY ...
#define KVM_MSR_FILTER_MAX_RANGES ...

#define KVM_VCPUEVENT_VALID_NMI_PENDING ...
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR ...
#define KVM_VCPUEVENT_VALID_SHADOW ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_SET_TPR ...
#define KVM_EXIT_TPR_ACCESS ...
#define KVM_EXIT_NMI ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_INTERNAL_ERROR_SIMUL_EX ...
#define KVM_INTERNAL_ERROR_DELIVERY_EV ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8  type;
    __u8  present, dpl, db, s, l, g, avl;
    __u8  unusable;
    __u8  padding;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    __u16 padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};

struct kvm_fpu {
    __u8  fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8  ftwx;
    __u8  pad1;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8  xmm[16][16];
    __u32 mxcsr;
    __u32 pad2;
};

struct kvm_xsave {
    __u32 region[1024];
    __u32 extra[];
};

struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[16]; __u64 padding[16]; };

struct kvm_debugregs {
    __u64 db[4];
    __u64 dr6;
    __u64 dr7;
    __u64 flags;
    __u64 reserved[9];
};

struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    struct { __u8 pending; } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};

struct kvm_sync_regs {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
};

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u8 padding1[6];
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        struct { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; } msr;
        char padding[256];
    };
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    union { struct kvm_sync_regs regs; char padding[2048]; } s;
};

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    __u32 padding[3];
};

struct kvm_cpuid2 {
    __u32 nent;
    __u32 padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };

struct kvm_msr_filter_range {
    __u32 flags;
    __u32 nmsrs;
    __u32 base;
    __u8 *bitmap;
};
struct kvm_msr_filter {
    __u32 flags;
    struct kvm_msr_filter_range ranges[16];
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    __u8  pad[64];
};

struct kvm_interrupt { __u32 irq; };

struct kvm_device_attr { __u32 flags; __u32 group; __u64 attr; __u64 addr; };

struct kvm_translation {
    __u64 linear_address;
    __u64 physical_address;
    __u8  valid;
    __u8  writeable;
    __u8  usermode;
    __u8  pad[5];
};

int ioctl(int fd, unsigned long request, ...);
int open(const char *path, int flags, ...);
int close(int fd);
int memfd_create(const char *name, unsigned int flags);
int ftruncate(int fd, long length);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);

/* helpers defined in the C source below */
int vsm_kvm_run(int vcpu_fd);

typedef int (*vsm_io_sink)(void *store, int kind, uint32_t vp, uint32_t vtl, uint64_t rip, uint64_t address,
                           uint32_t size, int is_write, uint64_t data);
struct vsm_exit_recorder {
    struct kvm_run *run;
    vsm_io_sink record;
    void *store;
    int kind;
    uint32_t vp;
    uint32_t vtl;
    const uint8_t *ports;
    const uint8_t *idle_out;
    uint64_t outs_served;
};
#define VSM_RUN_RECORDED ...
int vsm_kvm_run_recorded(int vcpu_fd, struct vsm_exit_recorder *rec);
#define VSM_FAST_MSRS ...
struct vsm_refclock {
    int64_t tsc_offset;
    uint64_t scale;
    int64_t offset;
    uint64_t last;
};
uint64_t vsm_reference_time(struct vsm_refclock *clock);
typedef int (*vsm_io_server)(void *ctx, void *run);
#define VSM_IO_SWITCH ...
#define VSM_VP_VTLS ...
#define VSM_RUN_NO_VCPU ...
struct vsm_fastpath;
struct vsm_vp_run {
    struct vsm_fastpath *vtl[4];
    uint32_t current;
    uint64_t cr8;
};
struct vsm_fastpath {
    int fd;
    uint32_t vtl;
    struct kvm_run *run;
    uint32_t n;
    uint32_t index[8];
    uint64_t value[8];
    uint32_t time_msr;
    struct vsm_refclock *clock;
    uint64_t msrs_served;
    vsm_io_server serve_io;
    void *io_ctx;
    struct vsm_vp_run *vp;
    const uint8_t *idle_out;
    uint64_t outs_served;
    struct vsm_exit_recorder *rec;
};
int vsm_kvm_run_fast(struct vsm_fastpath *fp);
struct vsm_vcpu_writes { uint64_t dbg; uint64_t xsave; };
struct vsm_held {  /* laid out in the C source below; Python only invalidates records */
    int dbg_valid;
    int fpu_valid;
    ...;
};
struct vsm_shared_pair {
    int src_fd;
    int dst_fd;
    struct kvm_run *src_run;
    struct kvm_run *dst_run;
    struct vsm_held *src_held;
    struct vsm_held *dst_held;
    struct vsm_vcpu_writes *src_writes;
    struct vsm_vcpu_writes *dst_writes;
};
#define VSM_COPY_WROTE_DBG ...
#define VSM_COPY_WROTE_FPU ...
#define VSM_COPY_CR2 ...
int vsm_copy_shared(struct vsm_shared_pair *p, int sregs_exported);
int vsm_install_kick_handler(void);
int vsm_kick_signal(void);
unsigned long vsm_thread_self(void);
int vsm_kick_thread(unsigned long thread);
int vsm_errno(void);
uint64_t vsm_rdtsc(void);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>

#define VSM_KICK_SIGNAL (SIGRTMIN + 3)

/* The handler does nothing: its only job is to make KVM_RUN return -EINTR. */
static void vsm_kick_handler(int sig) { (void)sig; }

int vsm_install_kick_handler(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = vsm_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(VSM_KICK_SIGNAL, &sa, NULL);
}

int vsm_kick_signal(void) { return VSM_KICK_SIGNAL; }
unsigned long vsm_thread_self(void) { return (unsigned long)pthread_self(); }
int vsm_kick_thread(unsigned long thread) { return pthread_kill((pthread_t)thread, VSM_KICK_SIGNAL); }
int vsm_errno(void) { return errno; }
uint64_t vsm_rdtsc(void) { unsigned int lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }

/* KVM_RUN returning 0 or -errno, so Python never reads a stale errno. */
int vsm_kvm_run(int vcpu_fd) {
    int r = ioctl(vcpu_fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

/* The recorder's append function for port-I/O/MMIO events (recorder/store.py, vsmt_io). */
typedef int (*vsm_io_sink)(void *store, int kind, uint32_t vp, uint32_t vtl, uint64_t rip, uint64_t address,
                           uint32_t size, int is_write, uint64_t data);

/* What vsm_kvm_run_recorded needs to record an exit without Python: one per vCPU. */
struct vsm_exit_recorder {
    struct kvm_run *run;
    vsm_io_sink record;
    void *store;
    int kind;              /* EventKind.PIO */
    uint32_t vp;
    uint32_t vtl;
    const uint8_t *ports;  /* bitmap: OUT to these ports is recorded here (device ports, not traps) */
    const uint8_t *idle_out;  /* of those, the ports whose OUT has no effect: completed here too (or NULL) */
    uint64_t outs_served;     /* such OUTs recorded and completed here */
};

/* Whether a port is set in a bitmap of 65536 ports (one bit each). */
static int vsm_port_set(const uint8_t *bitmap, uint16_t port) {
    return bitmap[port >> 3] & (1u << (port & 7));
}

/* Whether a loop that answers exits in C must hand the one it holds to Python: a kick came
   (immediate_exit), the guest changed CR8, or Python waits to inject an interrupt and the
   guest can now take it (a backend may not exit for the window by itself while the guest
   keeps exiting here). */
static int vsm_python_wanted(const struct kvm_run *run, uint64_t cr8) {
    return run->immediate_exit || run->cr8 != cr8 ||
           (run->request_interrupt_window && run->if_flag && run->ready_for_interrupt_injection);
}

/* vsm_kvm_run_recorded returns VSM_RUN_RECORDED + the recorder's status when it recorded the exit. */
#define VSM_RUN_RECORDED 16

/* KVM_RUN, then, for a single OUT to a port in rec->ports, the PIO event appended straight
   from kvm_run (port, size, data, and RIP from the synced registers): the hottest event
   costs no Python. An OUT to a port in rec->idle_out (its device's writes change nothing)
   is then complete: the guest goes on at once, unless the recorder wants a flush, a kick
   came (immediate_exit), CR8 changed or Python waits for an interrupt window the guest
   has opened. Returns -errno, 0 (the exit is not recorded) or VSM_RUN_RECORDED + status
   (the exit Python gets was recorded). */
/* Whether the exit in ``run`` is a single OUT to a port ``rec`` records. */
static int vsm_recorded_out(const struct vsm_exit_recorder *rec, const struct kvm_run *run) {
    return run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT && run->io.count == 1 &&
           vsm_port_set(rec->ports, run->io.port);
}

/* Record such an OUT; 1 when the guest may go on at once (an OUT without effect, no flush wanted,
   nothing for Python), else 0 with *status the recorder's status. */
static int vsm_record_out(struct vsm_exit_recorder *rec, const struct kvm_run *run, uint64_t cr8, int *status) {
    uint16_t port = run->io.port;
    uint64_t data = 0;
    memcpy(&data, (const char *)run + run->io.data_offset, run->io.size < sizeof(data) ? run->io.size : sizeof(data));
    *status = rec->record(rec->store, rec->kind, rec->vp, rec->vtl, run->s.regs.regs.rip, port, run->io.size, 1, data);
    if (*status != 0 || !rec->idle_out || !vsm_port_set(rec->idle_out, port) || vsm_python_wanted(run, cr8))
        return 0;
    rec->outs_served++;
    return 1;
}

int vsm_kvm_run_recorded(int vcpu_fd, struct vsm_exit_recorder *rec) {
    struct kvm_run *run = rec->run;
    uint64_t cr8 = run->cr8;
    for (;;) {
        int r = ioctl(vcpu_fd, KVM_RUN, 0);
        if (r < 0)
            return -errno;
        if (!vsm_recorded_out(rec, run))
            return 0;
        int status;
        if (!vsm_record_out(rec, run, cr8, &status))
            return VSM_RUN_RECORDED + status;
    }
}

/* vsm_kvm_run_fast: synthetic MSRs whose reads have a fixed answer on this vCPU (VP_INDEX, the TSC and APIC
   frequencies), answered here so the guest's RDMSR never waits for Python's GIL, which
   another VP's thread may hold (or hold while the host has preempted it). Python fills the
   table. An OUT to a port in ``idle_out`` (a device whose writes change nothing) completes
   here; other port-I/O exits are offered to the I/O server (the hypercall fast path) when
   one is attached. Any other exit, an exit neither answers, a kick (immediate_exit) or a CR8
   change returns to Python. Returns like vsm_kvm_run. */
#define VSM_FAST_MSRS 8

/* The partition reference counter (TIME_REF_COUNT, 100 ns units) from the guest TSC with
   the reference TSC page's formula, never going back: one clock shared by the Python side
   (the emulation reads it through the machine) and the C fast path below. */
struct vsm_refclock {
    int64_t tsc_offset;  /* KVM's guest TSC offset */
    uint64_t scale;      /* the TSC page's 64.64 scale */
    int64_t offset;      /* the TSC page's offset */
    uint64_t last;       /* the largest value handed out */
};

uint64_t vsm_reference_time(struct vsm_refclock *clock) {
    uint64_t tsc = vsm_rdtsc() + (uint64_t)clock->tsc_offset;
    uint64_t now = (uint64_t)(((unsigned __int128)tsc * clock->scale) >> 64) + (uint64_t)clock->offset;
    uint64_t last = __atomic_load_n(&clock->last, __ATOMIC_ACQUIRE);
    while (now > last) {
        if (__atomic_compare_exchange_n(&clock->last, &last, now, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return now;
    }
    return last;
}

/* An I/O exit server another module provides (vmm/backends/_hypercall_fastpath_build.py):
   returns 1 when it answered the exit in kvm_run (the guest may resume), 0 when Python must. */
typedef int (*vsm_io_server)(void *ctx, void *run);

/* An I/O server's answer that moves the VP: continue on VTL (answer - VSM_IO_SWITCH)'s vCPU. */
#define VSM_IO_SWITCH 16
#define VSM_VP_VTLS 4
/* vsm_kvm_run_fast's status when a server switched to a VTL whose vCPU has no fast path. */
#define VSM_RUN_NO_VCPU (-100000)

struct vsm_fastpath;

/* The vCPUs of one VP (one per VTL) as the fast path moves between them: ``current`` is the VTL
   whose vCPU holds the exit when vsm_kvm_run_fast returns, ``cr8`` that vCPU's CR8 when the
   fast path switched to it (Python compares later values with it). */
struct vsm_vp_run {
    struct vsm_fastpath *vtl[VSM_VP_VTLS];
    uint32_t current;
    uint64_t cr8;
};

struct vsm_fastpath {
    int fd;
    uint32_t vtl;
    struct kvm_run *run;
    uint32_t n;
    uint32_t index[VSM_FAST_MSRS];
    uint64_t value[VSM_FAST_MSRS];
    uint32_t time_msr;            /* TIME_REF_COUNT's index when answered here from clock, else 0 */
    struct vsm_refclock *clock;
    uint64_t msrs_served;         /* reads answered here */
    vsm_io_server serve_io;       /* port-I/O exits offered to this server first (NULL: none) */
    void *io_ctx;
    struct vsm_vp_run *vp;        /* the VP's other vCPUs, for servers that switch VTLs (NULL: none) */
    const uint8_t *idle_out;      /* bitmap of ports whose OUT has no effect (answered here), or NULL */
    uint64_t outs_served;         /* such OUTs answered here */
    /* While recording: OUTs to device ports are recorded as in vsm_kvm_run_recorded (returning
       VSM_RUN_RECORDED + status as it does), and only servers that record what they answer are
       attached (no MSRs, no idle_out: those are the recorder's). NULL: nothing records. */
    struct vsm_exit_recorder *rec;
};

/* A VTL switch's shared state (vsm-facts §4.1) moved from one VTL's vCPU to another's in
   one call (vmm/backends/vtl_switch.py, SharedStateCopier; the hypercall fast path's VTL
   call and return): the GPRs but RSP/RIP/RFLAGS through the sync-regs areas, then DR0-3/DR6
   and the XSAVE image read from the source (the guest changes both without exiting) and
   written to the target only when they differ from what it held when it last stopped.
   ``vsm_held`` is that record per vCPU, valid while the vCPU's write counters
   (``vsm_vcpu_writes``: KVM_SET_DEBUGREGS / KVM_SET_XSAVE calls made by anyone, counted
   here and by Python's Vcpu) are unchanged. Returns -errno, or VSM_COPY_WROTE_* flags for
   the target writes done here, plus VSM_COPY_CR2 when the caller must move CR2 itself: it
   differs between the two exported sregs copies, or the caller says they are not both
   current (sregs_exported 0). */
#define VSM_COPY_WROTE_DBG 1
#define VSM_COPY_WROTE_FPU 2
#define VSM_COPY_CR2 4

struct vsm_vcpu_writes { uint64_t dbg; uint64_t xsave; };

struct vsm_held {
    uint64_t dbg_writes;
    int dbg_valid;
    uint64_t db[4];
    uint64_t dr6;
    uint64_t fpu_writes;
    int fpu_valid;
    __u32 xsave[1024];  /* a struct kvm_xsave image */
};

struct vsm_shared_pair {
    int src_fd;
    int dst_fd;
    struct kvm_run *src_run;
    struct kvm_run *dst_run;
    struct vsm_held *src_held;
    struct vsm_held *dst_held;
    struct vsm_vcpu_writes *src_writes;
    struct vsm_vcpu_writes *dst_writes;
};

int vsm_copy_shared(struct vsm_shared_pair *p, int sregs_exported) {
    struct kvm_regs *s = &p->src_run->s.regs.regs, *d = &p->dst_run->s.regs.regs;
    uint64_t rsp = d->rsp, rip = d->rip, rflags = d->rflags;
    *d = *s;
    d->rsp = rsp;
    d->rip = rip;
    d->rflags = rflags;
    p->dst_run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;

    int wrote = 0;
    if (!sregs_exported || p->src_run->s.regs.sregs.cr2 != p->dst_run->s.regs.sregs.cr2)
        wrote |= VSM_COPY_CR2;
    struct vsm_held *src = p->src_held, *dst = p->dst_held;
    struct vsm_vcpu_writes *sw = p->src_writes, *dw = p->dst_writes;
    struct kvm_debugregs dbg;
    if (ioctl(p->src_fd, KVM_GET_DEBUGREGS, &dbg) < 0)
        return -errno;
    memcpy(src->db, dbg.db, sizeof src->db);
    src->dr6 = dbg.dr6;
    src->dbg_writes = sw->dbg;
    src->dbg_valid = 1;
    if (!dst->dbg_valid || dst->dbg_writes != dw->dbg || memcmp(dst->db, dbg.db, sizeof dbg.db) || dst->dr6 != dbg.dr6) {
        struct kvm_debugregs t;
        if (ioctl(p->dst_fd, KVM_GET_DEBUGREGS, &t) < 0)
            return -errno;
        if (memcmp(t.db, dbg.db, sizeof dbg.db) || t.dr6 != dbg.dr6) {
            memcpy(t.db, dbg.db, sizeof t.db);
            t.dr6 = dbg.dr6;
            if (ioctl(p->dst_fd, KVM_SET_DEBUGREGS, &t) < 0)
                return -errno;
            wrote |= VSM_COPY_WROTE_DBG;
            dw->dbg++;
        }
        memcpy(dst->db, dbg.db, sizeof dst->db);
        dst->dr6 = dbg.dr6;
        dst->dbg_writes = dw->dbg;
        dst->dbg_valid = 1;
    }

    _Static_assert(sizeof src->xsave == sizeof(struct kvm_xsave), "struct kvm_xsave size");
    if (ioctl(p->src_fd, KVM_GET_XSAVE, src->xsave) < 0) {
        src->fpu_valid = 0;
        return -errno;
    }
    src->fpu_writes = sw->xsave;
    src->fpu_valid = 1;
    if (!dst->fpu_valid || dst->fpu_writes != dw->xsave || memcmp(dst->xsave, src->xsave, sizeof src->xsave)) {
        if (ioctl(p->dst_fd, KVM_SET_XSAVE, src->xsave) < 0) {
            dst->fpu_valid = 0;
            return -errno;
        }
        wrote |= VSM_COPY_WROTE_FPU;
        dw->xsave++;
        memcpy(dst->xsave, src->xsave, sizeof src->xsave);
        dst->fpu_writes = dw->xsave;
        dst->fpu_valid = 1;
    }
    return wrote;
}

int vsm_kvm_run_fast(struct vsm_fastpath *fp) {
    struct kvm_run *run = fp->run;
    uint64_t cr8 = run->cr8;
    if (fp->vp)
        fp->vp->current = fp->vtl;
    for (;;) {
        int r = ioctl(fp->fd, KVM_RUN, 0);
        if (r < 0)
            return -errno;
        if (vsm_python_wanted(run, cr8))
            return 0;
        if (run->exit_reason == KVM_EXIT_IO) {
            if (fp->rec && vsm_recorded_out(fp->rec, run)) {
                int status;
                if (vsm_record_out(fp->rec, run, cr8, &status))
                    continue;
                return VSM_RUN_RECORDED + status;
            }
            if (fp->idle_out && run->io.direction == KVM_EXIT_IO_OUT && vsm_port_set(fp->idle_out, run->io.port)) {
                fp->outs_served++;
                continue;
            }
            int answer = fp->serve_io ? fp->serve_io(fp->io_ctx, run) : 0;
            if (answer < 0)
                return answer;
            if (answer >= VSM_IO_SWITCH) {  /* a VTL switch: go on with the other vCPU */
                uint32_t to = (uint32_t)(answer - VSM_IO_SWITCH);
                if (!fp->vp || to >= VSM_VP_VTLS || !fp->vp->vtl[to])
                    return VSM_RUN_NO_VCPU;
                fp = fp->vp->vtl[to];
                run = fp->run;
                cr8 = run->cr8;
                fp->vp->current = to;
                fp->vp->cr8 = cr8;
                continue;
            }
            if (answer)
                continue;
            return 0;
        }
        if (run->exit_reason != KVM_EXIT_X86_RDMSR)
            return 0;
        uint32_t i = 0;
        while (i < fp->n && fp->index[i] != run->msr.index)
            i++;
        if (i < fp->n)
            run->msr.data = fp->value[i];
        else if (fp->time_msr && run->msr.index == fp->time_msr)
            run->msr.data = vsm_reference_time(fp->clock);
        else
            return 0;
        run->msr.error = 0;
        fp->msrs_served++;
    }
}
"""


def make_ffi(module_name: str = "_vsmtrace_kvm") -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(module_name, SOURCE, libraries=["pthread"])
    return ffi


if __name__ == "__main__":
    # Only here: parsing CDEF takes ~45 ms, and every vsmtrace command imports this module for its sources.
    make_ffi("vsmtrace.vmm.kvm._vsmtrace_kvm").compile(verbose=True)
