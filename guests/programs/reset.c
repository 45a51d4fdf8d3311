/*
 * reset.c - resetting the machine.  cmdline how=cf9|cf9full|port92|kbd|triple|hvmsr
 * (default cf9), cpus=N (default 2: the APs are started before the reset, so a reboot
 * must bring them back waiting for SIPI).
 *
 * Every boot prints one "boot:" line with state a reset must restore (a data variable
 * back at its initial value, a .bss variable zero, IA32_APIC_BASE, an I/O APIC entry,
 * the pc-testdev scratch register), then dirties that state and resets.  If the reset
 * did nothing the guest says so and exits with 1.
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define IOAPIC ((volatile uint32_t *)0xFEC00000ull)

static volatile uint32_t initialised = 0x5EED;
static volatile uint32_t zeroed;

static void ap_main(int cpu)
{
    (void)cpu;
    for (;;)
        sti_hlt();
}

static uint32_t ioapic_rte10(void)
{
    IOAPIC[0] = 0x10 + 2 * 10;
    return IOAPIC[4];
}

static void triple_fault(void)
{
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) empty = {0, 0};
    __asm__ volatile("lidt %0; ud2" : : "m"(empty) : "memory"); /* no IDT: #UD -> #DF -> shutdown */
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    char how[16] = "cf9";
    cmdline_get("how", how, sizeof(how));
    int n = (int)cmdline_get_uint("cpus", 2);
    int up = n > 1 ? smp_start_aps(n, ap_main) : 1;
    printf("boot: how=%s cpus=%d/%d initialised=0x%x zeroed=%u apic_base=0x%lx rte10=0x%x scratch=0x%x\n", how, up, n,
           initialised, zeroed, rdmsr(MSR_IA32_APIC_BASE), ioapic_rte10(), inl(0xE0));
    initialised = 0xD1D;
    zeroed = 7;
    IOAPIC[0] = 0x10 + 2 * 10;
    IOAPIC[4] = 0x55;
    outl(0xE0, 0xABCD);
    wrmsr(MSR_IA32_APIC_BASE, rdmsr(MSR_IA32_APIC_BASE) & ~APIC_BASE_EN);
    if (!strcmp(how, "cf9")) {
        outb(0xCF9, 0x02);
        outb(0xCF9, 0x06);
    } else if (!strcmp(how, "cf9full")) {
        outb(0xCF9, 0x0E);
    } else if (!strcmp(how, "port92")) {
        outb(0x92, inb(0x92) | 1);
    } else if (!strcmp(how, "kbd")) {
        while (inb(0x64) & 0x02)
            cpu_pause();
        outb(0x64, 0xFE);
    } else if (!strcmp(how, "triple")) {
        triple_fault();
    } else if (!strcmp(how, "hvmsr")) {
        if (hv_init())
            wrmsr(HV_MSR_RESET, 1);
    }
    for (int i = 0; i < 1000; i++)
        cpu_pause();
    printf("reset did not happen\n");
    return 1;
}
