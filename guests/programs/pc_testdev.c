/*
 * pc_testdev.c - QEMU's pc-testdev: the scratch register at 0xE0 (and its byte alias
 * at 0xE8), the flush-page port 0xE4, the IRQ lines at 0x2000 (ISA IRQ n -> I/O APIC
 * pin n, IRQ 0 -> pin 2) and the MMIO RAM at 0xFF000000 written by one CPU and read
 * by the other.  Needs 2 CPUs.  Runs unchanged on QEMU 7.2
 * (-device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=4).
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define IOAPIC ((volatile uint32_t *)0xFEC00000ull)
#define IOMEM ((volatile uint8_t *)0xFF000000ull)
#define V_BASE 0x40

static volatile uint32_t got[24];
static volatile uint32_t ap_stage;
static volatile uint64_t ap_read;

static void irq(struct int_frame *f)
{
    got[f->vector - V_BASE]++;
    apic_eoi();
}

static void rte(int pin, uint32_t low)
{
    IOAPIC[0] = 0x11 + 2 * pin;
    IOAPIC[4] = 0;
    IOAPIC[0] = 0x10 + 2 * pin;
    IOAPIC[4] = low;
}

static void ap_main(int cpu)
{
    (void)cpu;
    while (atomic_load32(&ap_stage) != 1)
        cpu_pause();
    ap_read = *(volatile uint64_t *)(IOMEM + 0x800);
    *(volatile uint32_t *)(IOMEM + 0x900) = 0xC0FFEE01;
    atomic_store32(&ap_stage, 2);
    for (;;)
        sti_hlt();
}

static void settle(void)
{
    uint64_t t = rdtsc();
    while (rdtsc() - t < 10000000ull)
        cpu_pause();
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    apic_enable();
    hv_check("two_cpus_up", (uint64_t)smp_start_aps(2, ap_main), 2);

    outl(0xE0, 0x11223344);
    hv_check("scratch_dword", inl(0xE0), 0x11223344);
    hv_check("scratch_bytes", (uint64_t)inb(0xE0) | (uint64_t)inb(0xE3) << 8, 0x1144);
    hv_check("scratch_word_high", inw(0xE2), 0x1122);
    hv_check("scratch_byte_alias", inl(0xE8), 0x11223344);
    outb(0xE2, 0xAA);
    outb(0xE9, 0xBB);
    hv_check("scratch_partial_writes", inl(0xE0), 0x11AABB44);
    outw(0xE1, 0xCCDD);
    hv_check("unaligned_ignored", inl(0xE0), 0x11AABB44);
    hv_check("unaligned_reads_0", (uint64_t)inw(0xE1) | inl(0xE2), 0);
    outl(0xE4, 0x200000);
    hv_check("flush_page_reads_0", inl(0xE4), 0);
    hv_check("irq_line_reads_0", inb(0x2000), 0);

    for (int p = 0; p < 16; p++) {
        set_irq_handler((uint8_t)(V_BASE + p), irq);
        rte(p, V_BASE + p);
    }
    sti();
    int wrong = 0;
    for (int line = 0; line < 16; line++) {
        outb(0x2000 + line, 1);
        outb(0x2000 + line, 0);
        settle();
        int want = line == 0 ? 2 : line == 2 ? -1 : line; /* line 2 (the 8259 cascade) reaches pin 2 */
        for (int p = 0; p < 16; p++) {
            uint32_t n = got[p];
            got[p] = 0;
            if (n != (p == want ? 1u : 0u)) {
                printf("line %d: pin %d fired %u times\n", line, p, n);
                wrong++;
            }
        }
        if (line == 0) {
            hv_check("irq0_is_pin2", (uint64_t)wrong, 0);
            rte(2, 0x10000 | (V_BASE + 2)); /* on QEMU the PIT ticks on pin 2 too: keep it quiet */
        }
    }
    hv_check("isa_lines_to_pins", (uint64_t)wrong, 0);
    outb(0x2000 + 14, 5); /* any non-zero value asserts */
    outb(0x2000 + 14, 0);
    settle();
    hv_check("nonzero_asserts", got[14], 1);

    hv_check("iomem_zero_at_reset", *(volatile uint32_t *)(IOMEM + 0x100), 0);
    *(volatile uint64_t *)(IOMEM + 8) = 0x0102030405060708ull;
    hv_check("iomem_qword", *(volatile uint64_t *)(IOMEM + 8), 0x0102030405060708ull);
    hv_check("iomem_unaligned", *(volatile uint32_t *)(IOMEM + 9), 0x04050607);
    hv_check("iomem_byte", IOMEM[15], 0x01);
    *(volatile uint64_t *)(IOMEM + 0x800) = 0xFEEDFACE12345678ull;
    atomic_store32(&ap_stage, 1);
    uint64_t t = rdtsc();
    while (atomic_load32(&ap_stage) != 2 && rdtsc() - t < smp_timeout_tsc)
        cpu_pause();
    hv_check("iomem_from_other_cpu", ap_read, 0xFEEDFACE12345678ull);
    hv_check("iomem_to_other_cpu", *(volatile uint32_t *)(IOMEM + 0x900), 0xC0FFEE01);
    hv_finish();
    return 0;
}
