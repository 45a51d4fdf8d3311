/* Baseline for bench/exits: the same guest driven by a minimal C loop over KVM_RUN.
 * It loads the ELF32 program headers, enters 32-bit protected mode like the
 * Multiboot loader does, copies what the guest writes to COM1 (its own timings) to
 * stdout, and stops at isa-debug-exit. The first line is "tsc_khz N" (KVM_GET_TSC_KHZ),
 * which converts the guest's RDTSC ticks to time. */
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

static void die(const char *what) { perror(what); exit(1); }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s guest.elf\n", argv[0]); return 2; }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) die("open guest");
    struct stat st; fstat(fd, &st);
    unsigned char *img = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    Elf32_Ehdr *eh = (Elf32_Ehdr *)img;

    int kvm = open("/dev/kvm", O_RDWR);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    unsigned char *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region region = {0, 0, 0, MEM_SIZE, (unsigned long)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("memory region");
    for (int i = 0; i < eh->e_phnum; i++) {
        Elf32_Phdr *ph = (Elf32_Phdr *)(img + eh->e_phoff + i * eh->e_phentsize);
        if (ph->p_type != PT_LOAD) continue;
        memcpy(mem + ph->p_paddr, img + ph->p_offset, ph->p_filesz);
    }
    int cpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (cpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    struct kvm_sregs s;
    ioctl(cpu, KVM_GET_SREGS, &s);
    struct kvm_segment flat = {.base = 0, .limit = 0xffffffff, .present = 1, .s = 1, .g = 1, .db = 1};
    s.cs = flat; s.cs.type = 11; s.cs.selector = 8;
    flat.type = 3; flat.selector = 16;
    s.ds = s.es = s.fs = s.gs = s.ss = flat;
    s.cr0 = 0x31;
    if (ioctl(cpu, KVM_SET_SREGS, &s) < 0) die("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = eh->e_entry, .rflags = 2};
    if (ioctl(cpu, KVM_SET_REGS, &r) < 0) die("KVM_SET_REGS");

    int khz = ioctl(cpu, KVM_GET_TSC_KHZ, 0);
    printf("tsc_khz %d\n", khz);
    for (;;) {
        if (ioctl(cpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        if (run->exit_reason != KVM_EXIT_IO) { fprintf(stderr, "unexpected exit %u\n", run->exit_reason); return 1; }
        if (run->io.port == 0xf4) break;
        if (run->io.port == 0x3f8 && run->io.direction == KVM_EXIT_IO_OUT)
            putchar(*((unsigned char *)run + run->io.data_offset));
    }
    return 0;
}
