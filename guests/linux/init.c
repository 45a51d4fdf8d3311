/*
 * init.c - the vsmtrace Linux guest's first (and only) user program.
 *
 * Freestanding (raw system calls, no libc): a static binary a few KiB big whose
 * every instruction is ours, so a recorded boot holds nothing from a C library.
 * It prints what the kernel detected, one "init: ..." line each, then reboots:
 *
 *   init: Linux <release> userspace reached
 *   init: cpus online <list>, <n> processors in /proc/cpuinfo
 *   init: hypervisor flag yes|no
 *   init: clocksource <current> (available: <list>)
 *   init: clockevent <name of clockevent0..n> ...   (one line per device)
 *   init: dmesg <every kernel log line that mentions Hyper-V or hyperv>
 *   init: remote tlb flush: the other cpu sees the new page   (2+ CPUs only)
 *   init: interrupts <every line of /proc/interrupts but its header>
 *   init: done, rebooting
 *
 * On 2+ CPUs it also makes the kernel flush another CPU's TLB for a user address
 * space, which a boot alone never does (docs/linux-guest.md, "PV TLB flush"): a
 * child sharing init's memory (CLONE_VM) reads a page on CPU 1 while init, on
 * CPU 0, maps a new page over it; the child must then read the new page's value.
 * The child then exits, which runs the kernel's task-exit path (fpu__drop).
 *
 * With "vsmtrace_init_out=kmsg" on the kernel command line (the kernel hands
 * unknown key=value words to init as environment) the lines go to /dev/kmsg
 * instead of the console, for kernels whose serial interrupt does not work.
 */
typedef unsigned long size_t;
typedef long ssize_t;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_ioctl 16
#define SYS_syslog 103
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_uname 63
#define SYS_exit 60
#define SYS_mmap 9
#define SYS_clone 56
#define SYS_sched_yield 24
#define SYS_wait4 61
#define SYS_sched_setaffinity 203
#define PROT_READ_WRITE 3
#define MAP_PRIVATE 0x02
#define MAP_FIXED 0x10
#define MAP_ANONYMOUS 0x20
#define CLONE_VM 0x100
#define SIGCHLD 17
#define SHARED_PAGE 0x40000000UL /* a fixed, otherwise unused user address */
#define O_RDONLY 0
#define O_WRONLY 1
#define SYSLOG_READ_ALL 3
#define TCSBRK 0x5409 /* with a non-zero argument: tcdrain(), wait until the output is sent */
#define REBOOT_MAGIC1 0xfee1dead
#define REBOOT_MAGIC2 672274793
#define REBOOT_CMD_RESTART 0x01234567

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)

static int out_fd = 1;
static char buf[1 << 17];
static char line[1024];
static size_t line_len;

static size_t slen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static int has(const char *hay, size_t n, const char *needle)
{
    size_t k = slen(needle);
    for (size_t i = 0; i + k <= n; i++) {
        size_t j = 0;
        while (j < k && hay[i + j] == needle[j])
            j++;
        if (j == k)
            return 1;
    }
    return 0;
}

static void put(const char *s)
{
    size_t n = slen(s);
    for (size_t i = 0; i < n && line_len < sizeof(line) - 1; i++)
        line[line_len++] = s[i];
}

static void put_n(const char *s, size_t n)
{
    for (size_t i = 0; i < n && line_len < sizeof(line) - 1; i++)
        line[line_len++] = s[i] == '\n' ? ' ' : s[i];
}

static void put_u(unsigned long v)
{
    char d[24];
    int i = 0;
    do {
        d[i++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (i)
        line[line_len < sizeof(line) - 1 ? line_len++ : line_len] = d[--i];
}

static void end_line(void)
{
    line[line_len++] = '\n';
    sys3(SYS_write, out_fd, line, line_len);
    line_len = 0;
}

static ssize_t read_file(const char *path)
{
    long fd = sys3(SYS_open, path, O_RDONLY, 0);
    if (fd < 0)
        return -1;
    ssize_t total = 0, n;
    while (total < (ssize_t)sizeof(buf) - 1 && (n = sys3(SYS_read, fd, buf + total, sizeof(buf) - 1 - total)) > 0)
        total += n;
    sys3(SYS_close, fd, 0, 0);
    buf[total < 0 ? 0 : total] = 0;
    while (total > 0 && buf[total - 1] == '\n')
        buf[--total] = 0;
    return total;
}

/* Every line of buf (n bytes) containing one of the needles, prefixed. */
static void grep_lines(const char *prefix, size_t n, const char *const *needles)
{
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && buf[i] != '\n')
            continue;
        for (const char *const *w = needles; *w; w++) {
            if (has(buf + start, i - start, *w)) {
                put(prefix);
                put_n(buf + start, i - start);
                end_line();
                break;
            }
        }
        start = i + 1;
    }
}

static unsigned long count_cpuinfo(void)
{
    ssize_t n = read_file("/proc/cpuinfo");
    unsigned long processors = 0;
    int hypervisor = 0;
    for (ssize_t i = 0; i < n; i++) {
        /* a line that starts with "processor" (a window of exactly its length: a blank line before
           it must not count it twice) */
        if ((i == 0 || buf[i - 1] == '\n') && has(buf + i, 9 < n - i ? 9 : (size_t)(n - i), "processor"))
            processors++;
    }
    hypervisor = n > 0 && has(buf, (size_t)n, " hypervisor");
    ssize_t m;
    char online[64];
    m = read_file("/sys/devices/system/cpu/online");
    size_t k = 0;
    for (; m > 0 && k < (size_t)m && k < sizeof(online) - 1; k++)
        online[k] = buf[k];
    online[k] = 0;
    put("init: cpus online ");
    put(m > 0 ? online : "?");
    put(", ");
    put_u(processors);
    put(" processors in /proc/cpuinfo");
    end_line();
    put("init: hypervisor flag ");
    put(hypervisor ? "yes" : "no");
    end_line();
    return processors;
}

static void clocks(void)
{
    char current[64];
    ssize_t n = read_file("/sys/devices/system/clocksource/clocksource0/current_clocksource");
    size_t k = 0;
    for (; n > 0 && k < (size_t)n && k < sizeof(current) - 1; k++)
        current[k] = buf[k];
    current[k] = 0;
    n = read_file("/sys/devices/system/clocksource/clocksource0/available_clocksource");
    put("init: clocksource ");
    put(current);
    put(" (available: ");
    put_n(buf, n > 0 ? (size_t)n : 0);
    put(")");
    end_line();
    char path[] = "/sys/devices/system/clockevents/clockevent0/current_device";
    for (int cpu = 0; cpu < 10; cpu++) {
        path[sizeof("/sys/devices/system/clockevents/clockevent") - 1] = (char)('0' + cpu);
        n = read_file(path);
        if (n < 0)
            break;
        put("init: clockevent");
        put_u((unsigned long)cpu);
        put(" ");
        put_n(buf, (size_t)n);
        end_line();
    }
}

static void kernel_log(void)
{
    static const char *const hyperv[] = {"Hyper-V", "hyperv", "HyperV", 0};
    static const char *const vectors[] = {":", 0}; /* every line but the CPU header */
    long n = sys3(SYS_syslog, SYSLOG_READ_ALL, buf, sizeof(buf) - 1);
    if (n > 0)
        grep_lines("init: dmesg ", (size_t)n, hyperv);
    n = read_file("/proc/interrupts");
    if (n > 0)
        grep_lines("init: interrupts ", (size_t)n, vectors);
}

/* -- a remote TLB flush of a user address space ------------------------------------------- */

static volatile long step; /* init and its child share this (CLONE_VM) */
static volatile long child_saw;
static char child_stack[16384] __attribute__((aligned(16)));

static void pin(unsigned long cpu)
{
    unsigned long mask = 1UL << cpu;
    sys3(SYS_sched_setaffinity, 0, sizeof(mask), &mask);
}

static long map_page(long value)
{
    long addr = sys6(SYS_mmap, (long)SHARED_PAGE, 4096, PROT_READ_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    if (addr == (long)SHARED_PAGE)
        *(volatile long *)SHARED_PAGE = value;
    return addr;
}

/* The child, on CPU 1: keeps the page's translation in use until init replaced the page. */
static void __attribute__((noreturn, used)) child_main(void)
{
    volatile long *page = (volatile long *)SHARED_PAGE;
    pin(1);
    long v = page[0];
    step = 1;
    while (step == 1)
        v += page[0];
    child_saw = page[0];
    step = 3;
    sys3(SYS_exit, v == 0, 0, 0); /* a task exit: the kernel's fpu__drop runs fwait */
    for (;;)
        ;
}

/* clone(CLONE_VM | SIGCHLD) onto child_stack; the child calls child_main and never returns here. */
static long spawn_child(void)
{
    long ret;
    register long r10 __asm__("r10") = 0;
    register long r8 __asm__("r8") = 0;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "call child_main\n"
                     "1:"
                     : "=a"(ret)
                     : "a"(SYS_clone), "D"(CLONE_VM | SIGCHLD), "S"(child_stack + sizeof(child_stack)), "d"(0),
                       "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    return ret;
}

static void remote_tlb_flush(void)
{
    put("init: remote tlb flush: ");
    pin(0);
    if (map_page(1) != (long)SHARED_PAGE) {
        put("mmap failed");
        end_line();
        return;
    }
    long pid = spawn_child();
    if (pid < 0) {
        put("clone failed");
        end_line();
        return;
    }
    while (step != 1)
        sys3(SYS_sched_yield, 0, 0, 0); /* the child starts on CPU 0 (it inherits init's affinity) */
    map_page(2); /* unmaps the page CPU 1 is reading: the kernel must flush CPU 1's TLB */
    step = 2;
    while (step != 3)
        ;
    int status = -1;
    sys6(SYS_wait4, pid, (long)&status, 0, 0, 0, 0);
    if (child_saw == 2)
        put("the other cpu sees the new page");
    else if (child_saw == 1)
        put("STALE: the other cpu still sees the old page");
    else
        put("unexpected value");
    if (status != 0)
        put(" (child exit status not 0)");
    end_line();
}

static void banner(void)
{
    static char uts[6 * 65];
    put("init: Linux ");
    if (sys3(SYS_uname, uts, 0, 0) == 0)
        put(uts + 2 * 65);
    put(" userspace reached");
    end_line();
}

void start_c(long *sp)
{
    long argc = sp[0];
    char **envp = (char **)(sp + 1 + argc + 1);
    for (char **e = envp; *e; e++)
        if (has(*e, slen(*e), "vsmtrace_init_out=kmsg")) {
            long fd = sys3(SYS_open, "/dev/kmsg", O_WRONLY, 0);
            if (fd >= 0)
                out_fd = (int)fd;
        }
    sys6(SYS_mount, (long)"proc", (long)"/proc", (long)"proc", 0, 0, 0);
    sys6(SYS_mount, (long)"sysfs", (long)"/sys", (long)"sysfs", 0, 0, 0);
    banner();
    unsigned long cpus = count_cpuinfo();
    clocks();
    if (cpus > 1)
        remote_tlb_flush();
    kernel_log();
    put("init: done, rebooting");
    end_line();
    sys3(SYS_ioctl, out_fd, TCSBRK, 1); /* the console's output reaches the UART before the reset */
    sys6(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_RESTART, 0, 0, 0);
    sys3(SYS_exit, 1, 0, 0); /* only if reboot failed: the kernel panics when init exits */
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n\thlt\n");
