/*
 * stop.c - guests that can only end by the VMM stopping them (never by isa-debug-exit).
 *
 * cmdline how=triple|cli_hlt|int3|popcnt|spin|idle (required), cpus=N (cli_hlt: also park N-1 APs):
 *   triple   load an empty IDT and raise #UD: no handler for #UD, #DF or the
 *            resulting fault, so the CPU shuts down (triple fault).
 *   cli_hlt  every CPU halts with interrupts disabled; nothing can ever wake it.
 *   int3     a breakpoint in supervisor code, with a handler installed, so under
 *            hardware it would be handled; KVM's emulator on this backend lacks it.
 *   popcnt   popcnt in supervisor code (encoded by hand: -march=x86-64 has no popcnt).
 *   spin     loop forever with interrupts off (for --timeout and Ctrl-C).
 *   idle     sti; hlt forever with nothing to wake it (an idle OS; for Ctrl-C).
 * Each prints "stop test: <how>" first. If a case returns, the guest prints
 * "still running after <how>" and exits 1, which makes the test fail.
 *
 * The instructions above are deliberately ones tests/test_guest_build.py forbids
 * in ordinary guests; this guest is not in its list.
 */
#include "guest.h"
#include "smp.h"

static volatile uint32_t int3_seen;

static bool skip_int3(struct int_frame *f)
{
    (void)f; /* int3 is a trap: rip already points past it */
    int3_seen++;
    return true;
}

static void park_ap(int cpu)
{
    (void)cpu;
    cli();
    for (;;)
        hlt();
}

static void triple_fault(void)
{
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } empty = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(empty) : "memory");
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    char how[16] = "";
    cmdline_get("how", how, sizeof(how));
    printf("stop test: %s\n", how);
    if (!strcmp(how, "triple")) {
        triple_fault();
    } else if (!strcmp(how, "cli_hlt")) {
        int cpus = (int)cmdline_get_uint("cpus", 1);
        if (cpus > 1) {
            int up = smp_start_aps(cpus, park_ap);
            printf("cpus up: %d\n", up);
        }
        cli();
        for (;;)
            hlt();
    } else if (!strcmp(how, "int3")) {
        set_exception_handler(3, skip_int3);
        __asm__ volatile("int3" ::: "memory");
        printf("int3 handled: %u\n", int3_seen);
    } else if (!strcmp(how, "popcnt")) {
        uint64_t in = 0xF0F0, out = 0;
        /* popcnt %rcx, %rax */
        __asm__ volatile(".byte 0xf3, 0x48, 0x0f, 0xb8, 0xc1" : "=a"(out) : "c"(in));
        printf("popcnt result: %lu\n", out);
    } else if (!strcmp(how, "idle")) {
        for (;;)
            sti_hlt();
    } else if (!strcmp(how, "spin")) {
        cli();
        for (;;)
            cpu_pause();
    }
    printf("still running after %s\n", how);
    return 1;
}
