/* bench/floor driver: the least any VMM on this host must spend on each round trip
 * that bench/exits, bench/hypercalls and bench/vtl time, with no Python at all.
 *
 *   floor GUEST.elf MODE N [ROUNDS]   prints "tsc_khz K", then per round "T <mode> <ticks>"
 *
 * Each round runs N round trips on fresh vCPUs (set-up outside the timing) and is
 * timed with the host's RDTSC, the clock the benchmarks' guests time themselves with,
 * so a floor row and the vsmtrace figure it bounds are in one unit.
 *
 * MODE:
 *   bare           N port-I/O exits (bench/exits' loop)
 *   ioctl          the same, plus one KVM_GET_REGS per exit: what one vCPU ioctl adds
 *   hypercall      N null fast hypercalls through a hypercall page; the handler only
 *                  writes the status into RAX through the sync-regs area
 *   hypercall_min  N bare `call page` round trips (no argument set-up in the guest)
 *   hypercall_mem  N memory hypercalls as GetVpIndexFromApicId makes them: the handler
 *                  reads the 24-byte input from guest RAM and writes the 4-byte output
 *   vtl            N VTL call + fast VTL return round trips between two VMs that share
 *                  guest RAM (one per VTL, as vsmtrace does), each switch doing only
 *                  what the TLFS makes unavoidable: shared GPRs moved through sync
 *                  regs (no ioctl), and the source vCPU's XSAVE image and debug
 *                  registers read (the guest changes both without exiting), the
 *                  target's written only when they differ from what it holds.
 *
 * The guest is bench/guests/floor.S; each routine sits at a fixed offset from its
 * entry point and runs ESI iterations. */
#include <elf.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MEM_SIZE (16u << 20)
#define TRAP_PORT 0x58
#define EXIT_PORT 0xf4
#define VTL_CALL_CODE 0x11
#define VTL_RETURN_CODE 0x12
#define VTL0_STACK 0x200000
#define VTL1_STACK 0x1f0000

/* Offsets of the routines in floor.S. */
#define OFF_BARE 0x000
#define OFF_HYPERCALL 0x100
#define OFF_HYPERCALL_MIN 0x180
#define OFF_HYPERCALL_MEM 0x1c0
#define OFF_VTL0 0x200
#define OFF_VTL1 0x300

static int kvm;
static unsigned char *mem;
static unsigned long entry;

struct vcpu {
    int vm;
    int fd;
    struct kvm_run *run;
    int run_size;
};

static void die(const char *what) { perror(what); exit(1); }

static inline unsigned long long ticks(void) {
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
}

static void load(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die("open guest");
    struct stat st;
    fstat(fd, &st);
    unsigned char *img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    Elf32_Ehdr *eh = (Elf32_Ehdr *)img;
    mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf32_Phdr *ph = (Elf32_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type == PT_LOAD) memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
    }
    entry = eh->e_entry;
}

/* A VM over the shared RAM with one vCPU in flat 32-bit protected mode at RIP, ESI = n. */
static struct vcpu new_vcpu(unsigned long rip, unsigned long esp, unsigned long n) {
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    struct kvm_userspace_memory_region region = {0, 0, 0, MEM_SIZE, (unsigned long)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    struct vcpu v;
    v.vm = vm;
    v.fd = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (v.fd < 0) die("KVM_CREATE_VCPU");
    v.run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v.run = mmap(NULL, v.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
    struct kvm_sregs s;
    if (ioctl(v.fd, KVM_GET_SREGS, &s) < 0) die("KVM_GET_SREGS");
    struct kvm_segment flat = {.base = 0, .limit = 0xffffffff, .present = 1, .s = 1, .g = 1, .db = 1};
    s.cs = flat;
    s.cs.type = 11;
    s.cs.selector = 8;
    flat.type = 3;
    flat.selector = 16;
    s.ds = s.es = s.fs = s.gs = s.ss = flat;
    s.cr0 = 0x31; /* PE, ET, NE */
    if (ioctl(v.fd, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = rip, .rsp = esp, .rsi = n, .rflags = 2};
    if (ioctl(v.fd, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");
    v.run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    v.run->s.regs.regs = r; /* the sync area is filled only by an exit: seed it for vtl_switch */
    return v;
}

static void drop_vcpu(struct vcpu *v) {
    munmap(v->run, v->run_size);
    close(v->fd);
    close(v->vm);
}

static void run(struct vcpu *v) {
    if (ioctl(v->fd, KVM_RUN, 0) < 0) die("KVM_RUN");
    if (v->run->exit_reason != KVM_EXIT_IO) {
        fprintf(stderr, "unexpected exit %u\n", v->run->exit_reason);
        exit(1);
    }
}

static int exited(struct vcpu *v) { return v->run->io.port == EXIT_PORT; }

/* A memory hypercall's unavoidable work: read the input page range, write the output. */
static void memory_call(struct kvm_regs *r) {
    unsigned char in[24];
    unsigned int out = 0;
    memcpy(in, mem + (r->rbx & (MEM_SIZE - 1)), sizeof in);
    out = in[16]; /* VP index of APIC id in[16..19]: identity here */
    memcpy(mem + (r->rsi & (MEM_SIZE - 1)), &out, sizeof out);
    r->rax = 0;
    r->rdx = 1; /* reps complete */
}

/* One vCPU; on each exit optionally one ioctl, and for a hypercall trap the status.
 * Returns the ticks of the run loop alone. */
static unsigned long long single(unsigned long offset, unsigned long n, int extra_ioctl, int mem_call) {
    struct vcpu v = new_vcpu(entry + offset, VTL0_STACK, n);
    struct kvm_regs regs;
    unsigned long long t0 = ticks();
    for (;;) {
        run(&v);
        if (exited(&v)) break;
        if (extra_ioctl && ioctl(v.fd, KVM_GET_REGS, &regs) < 0) die("KVM_GET_REGS");
        if (v.run->io.port == TRAP_PORT) {
            if (mem_call)
                memory_call(&v.run->s.regs.regs);
            else
                v.run->s.regs.regs.rax = 0; /* HV_STATUS_SUCCESS */
            v.run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
        }
    }
    unsigned long long dt = ticks() - t0;
    drop_vcpu(&v);
    return dt;
}

struct shared_cache {
    struct kvm_xsave xsave;
    struct kvm_debugregs dbg;
};

/* Move the VP from vCPU a to vCPU b: the TLFS's shared state only. */
static void vtl_switch(struct vcpu *a, struct vcpu *b, struct shared_cache *held_by_b) {
    static struct kvm_xsave xsave;
    static struct kvm_debugregs dbg;
    struct kvm_regs *s = &a->run->s.regs.regs, *d = &b->run->s.regs.regs;
    unsigned long rsp = d->rsp, rip = d->rip, rflags = d->rflags;
    *d = *s; /* every GPR but RSP, with the target's private RIP/RFLAGS */
    d->rsp = rsp;
    d->rip = rip;
    d->rflags = rflags;
    b->run->kvm_dirty_regs = KVM_SYNC_X86_REGS;
    if (ioctl(a->fd, KVM_GET_XSAVE, &xsave) < 0) die("KVM_GET_XSAVE");
    if (memcmp(&xsave, &held_by_b->xsave, sizeof xsave)) {
        if (ioctl(b->fd, KVM_SET_XSAVE, &xsave) < 0) die("KVM_SET_XSAVE");
        held_by_b->xsave = xsave;
    }
    if (ioctl(a->fd, KVM_GET_DEBUGREGS, &dbg) < 0) die("KVM_GET_DEBUGREGS");
    if (memcmp(dbg.db, held_by_b->dbg.db, sizeof dbg.db) || dbg.dr6 != held_by_b->dbg.dr6) {
        if (ioctl(b->fd, KVM_SET_DEBUGREGS, &dbg) < 0) die("KVM_SET_DEBUGREGS");
        held_by_b->dbg = dbg;
    }
}

static unsigned long long vtl(unsigned long n) {
    struct vcpu v[2] = {new_vcpu(entry + OFF_VTL0, VTL0_STACK, n), new_vcpu(entry + OFF_VTL1, VTL1_STACK, n)};
    static struct shared_cache held[2];
    memset(held, 0, sizeof held);
    int cur = 0;
    unsigned long long t0 = ticks();
    for (;;) {
        run(&v[cur]);
        if (exited(&v[cur])) break;
        unsigned long code = v[cur].run->s.regs.regs.rcx;
        int to = code == VTL_CALL_CODE ? 1 : code == VTL_RETURN_CODE ? 0 : cur;
        if (to != cur) {
            vtl_switch(&v[cur], &v[to], &held[to]);
            cur = to;
        }
    }
    unsigned long long dt = ticks() - t0;
    drop_vcpu(&v[0]);
    drop_vcpu(&v[1]);
    return dt;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s guest.elf bare|ioctl|hypercall|hypercall_min|hypercall_mem|vtl N [ROUNDS]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[2];
    unsigned long n = strtoul(argv[3], NULL, 0);
    unsigned long rounds = argc == 5 ? strtoul(argv[4], NULL, 0) : 1;
    kvm = open("/dev/kvm", O_RDWR);
    if (kvm < 0) die("/dev/kvm");
    load(argv[1]);
    {
        struct vcpu probe = new_vcpu(entry, VTL0_STACK, 0);
        printf("tsc_khz %d\n", ioctl(probe.fd, KVM_GET_TSC_KHZ, 0));
        drop_vcpu(&probe);
    }
    for (unsigned long r = 0; r < rounds; r++) {
        unsigned long long dt;
        if (!strcmp(mode, "bare")) dt = single(OFF_BARE, n, 0, 0);
        else if (!strcmp(mode, "ioctl")) dt = single(OFF_BARE, n, 1, 0);
        else if (!strcmp(mode, "hypercall")) dt = single(OFF_HYPERCALL, n, 0, 0);
        else if (!strcmp(mode, "hypercall_min")) dt = single(OFF_HYPERCALL_MIN, n, 0, 0);
        else if (!strcmp(mode, "hypercall_mem")) dt = single(OFF_HYPERCALL_MEM, n, 0, 1);
        else if (!strcmp(mode, "vtl")) dt = vtl(n);
        else {
            fprintf(stderr, "unknown mode %s\n", mode);
            return 2;
        }
        printf("T %s %llu\n", mode, dt);
    }
    return 0;
}
