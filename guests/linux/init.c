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
 *   init: interrupts <every line of /proc/interrupts but its header>
 *   init: done, rebooting
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
#define O_RDONLY 0
#define O_WRONLY 1
#define SYSLOG_READ_ALL 3
#define TCSBRK 0x5409 /* with a non-zero argument: tcdrain(), wait until the output is sent */
#define REBOOT_MAGIC1 0xfee1dead
#define REBOOT_MAGIC2 672274793
#define REBOOT_CMD_RESTART 0x01234567

static long sys6(long n, long a, long b, long c, long d, long e)
{
    long ret;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8) : "rcx", "r11", "memory");
    return ret;
}
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0)

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

static void count_cpuinfo(void)
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
    sys6(SYS_mount, (long)"proc", (long)"/proc", (long)"proc", 0, 0);
    sys6(SYS_mount, (long)"sysfs", (long)"/sys", (long)"sysfs", 0, 0);
    banner();
    count_cpuinfo();
    clocks();
    kernel_log();
    put("init: done, rebooting");
    end_line();
    sys3(SYS_ioctl, out_fd, TCSBRK, 1); /* the console's output reaches the UART before the reset */
    sys6(SYS_reboot, REBOOT_MAGIC1, REBOOT_MAGIC2, REBOOT_CMD_RESTART, 0, 0);
    sys3(SYS_exit, 1, 0, 0); /* only if reboot failed: the kernel panics when init exits */
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n\thlt\n");
