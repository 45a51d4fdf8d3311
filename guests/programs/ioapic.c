/*
 * ioapic.c - the I/O APIC at 0xFEC00000, driven through QEMU's pc-testdev IRQ lines
 * (port 0x2000 + pin) and the UART's IRQ 4: registers, edge and level delivery, remote
 * IRR, masking, EOI through the local APIC's broadcast and through the EOI register,
 * delivery to another CPU.  Needs 2 CPUs (cpus=2).  Runs unchanged on QEMU
 * (-device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=4).
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define IOAPIC ((volatile uint32_t *)0xFEC00000ull)
#define IOREGSEL 0
#define IOWIN 4   /* in uint32_t units: offset 0x10 */
#define IOEOI 16  /* offset 0x40 */
#define RTE_MASKED (1u << 16)
#define RTE_LEVEL (1u << 15)
#define RTE_REMOTE_IRR (1u << 14)
#define RTE_DELIVERY_STATUS (1u << 12)
#define TESTDEV_IRQ 0x2000

#define V_EDGE 0x60
#define V_LEVEL 0x61
#define V_UART 0x62
#define V_EOIREG 0x63
#define PIN_EDGE 14
#define PIN_LEVEL 15
#define PIN_UART 4
#define PIN_EOIREG 10

static volatile uint32_t count[MAX_CPUS][4];
static volatile uint32_t level_remote_irr_in_handler;
static volatile uint32_t uart_iir;

static uint32_t ioapic_read(uint32_t reg)
{
    IOAPIC[IOREGSEL] = reg;
    return IOAPIC[IOWIN];
}
static void ioapic_write(uint32_t reg, uint32_t value)
{
    IOAPIC[IOREGSEL] = reg;
    IOAPIC[IOWIN] = value;
}
static uint32_t rte_low(int pin) { return ioapic_read(0x10 + 2 * pin); }
static void set_rte(int pin, uint32_t low, uint8_t dest)
{
    ioapic_write(0x11 + 2 * pin, (uint32_t)dest << 24);
    ioapic_write(0x10 + 2 * pin, low);
}
static void set_line(int pin, int level) { outb(TESTDEV_IRQ + pin, (uint8_t)level); }

static void edge_irq(struct int_frame *f)
{
    (void)f;
    atomic_inc32(&count[smp_cpu_id()][0]);
    apic_eoi();
}

static void level_irq(struct int_frame *f)
{
    (void)f;
    uint32_t n = atomic_fetch_add32(&count[smp_cpu_id()][1], 1) + 1;
    if (n == 1)
        level_remote_irr_in_handler = rte_low(PIN_LEVEL) & RTE_REMOTE_IRR;
    else
        set_line(PIN_LEVEL, 0); /* the second time round the device lets go */
    apic_eoi();                 /* still asserted after the first: delivered again */
}

static void uart_irq(struct int_frame *f)
{
    (void)f;
    uart_iir = inb(SERIAL_PORT + 2);
    outb(SERIAL_PORT + 1, 0); /* IER off before anything prints again */
    atomic_inc32(&count[smp_cpu_id()][2]);
    apic_eoi();
}

static void eoireg_irq(struct int_frame *f)
{
    (void)f;
    atomic_inc32(&count[smp_cpu_id()][3]);
    apic_eoi();
}

static void ap_main(int cpu)
{
    (void)cpu;
    for (;;)
        sti_hlt();
}

static void settle(void)
{
    uint64_t t = rdtsc();
    while (rdtsc() - t < 20000000ull) /* a few ms: long enough for any stray interrupt */
        cpu_pause();
}

static bool wait_count(int cpu, int kind, uint32_t want)
{
    uint64_t start = rdtsc();
    while (atomic_load32(&count[cpu][kind]) < want) {
        if (rdtsc() - start > smp_timeout_tsc)
            return false;
        cpu_pause();
    }
    return true;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    apic_enable();
    set_irq_handler(V_EDGE, edge_irq);
    set_irq_handler(V_LEVEL, level_irq);
    set_irq_handler(V_UART, uart_irq);
    set_irq_handler(V_EOIREG, eoireg_irq);
    int up = smp_start_aps(2, ap_main);
    hv_check("two_cpus_up", (uint64_t)up, 2);

    /* registers */
    uint32_t ver = ioapic_read(1);
    hv_check("version_0x20", ver & 0xFF, 0x20);
    hv_check("max_redirection_entry_23", (ver >> 16) & 0xFF, 23);
    hv_check("entries_reset_masked", rte_low(PIN_EDGE) & RTE_MASKED, RTE_MASKED);
    ioapic_write(0, 5u << 24);
    hv_check("id_writable", (ioapic_read(0) >> 24) & 0xF, 5);
    ioapic_write(0, 0);
    set_rte(PIN_EOIREG, RTE_MASKED | RTE_REMOTE_IRR | RTE_DELIVERY_STATUS | 0x44, 0);
    hv_check("read_only_bits_ignored", rte_low(PIN_EOIREG), RTE_MASKED | 0x44);
    ioapic_write(0x10 + 2 * PIN_EOIREG + 1, 0xAB000000u);
    hv_check("rte_high_readback", ioapic_read(0x11 + 2 * PIN_EOIREG), 0xAB000000u);

    sti();
    /* edge, physical destination CPU 1 */
    set_rte(PIN_EDGE, V_EDGE, 1);
    set_line(PIN_EDGE, 1);
    set_line(PIN_EDGE, 0);
    hv_check_true("edge_delivered_to_cpu1", wait_count(1, 0, 1));
    settle();
    hv_check("edge_once", count[1][0], 1);
    hv_check("edge_not_on_cpu0", count[0][0], 0);
    /* masked edge: lost, also after unmasking */
    set_rte(PIN_EDGE, RTE_MASKED | V_EDGE, 1);
    set_line(PIN_EDGE, 1);
    set_line(PIN_EDGE, 0);
    set_rte(PIN_EDGE, V_EDGE, 1);
    settle();
    hv_check("masked_edge_lost", count[1][0], 1);
    set_rte(PIN_EDGE, RTE_MASKED, 0);

    /* level, to the BSP: redelivered while asserted after the EOI broadcast */
    set_rte(PIN_LEVEL, RTE_LEVEL | V_LEVEL, 0);
    set_line(PIN_LEVEL, 1);
    hv_check_true("level_delivered", wait_count(0, 1, 2));
    hv_check("level_remote_irr_while_in_service", level_remote_irr_in_handler, RTE_REMOTE_IRR);
    settle();
    hv_check("level_redelivered_once_while_asserted", count[0][1], 2);
    hv_check("level_remote_irr_cleared_by_eoi", rte_low(PIN_LEVEL) & RTE_REMOTE_IRR, 0);
    /* an asserted level pin stays pending while masked and fires on unmask */
    count[0][1] = 1; /* the handler lowers the line on its next call */
    set_rte(PIN_LEVEL, RTE_MASKED | RTE_LEVEL | V_LEVEL, 0);
    set_line(PIN_LEVEL, 1);
    settle();
    hv_check("masked_level_held", count[0][1], 1);
    set_rte(PIN_LEVEL, RTE_LEVEL | V_LEVEL, 0);
    hv_check_true("level_fires_on_unmask", wait_count(0, 1, 2));
    settle();
    hv_check("level_fires_once_on_unmask", count[0][1], 2);
    set_rte(PIN_LEVEL, RTE_MASKED, 0);

    /* remote IRR cleared by the EOI register (offset 0x40), not by the line going down */
    cli();
    set_rte(PIN_EOIREG, RTE_LEVEL | V_EOIREG, 0);
    set_line(PIN_EOIREG, 1);
    hv_check("eoireg_remote_irr_set", rte_low(PIN_EOIREG) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
    set_line(PIN_EOIREG, 0);
    hv_check("eoireg_remote_irr_survives_line_drop", rte_low(PIN_EOIREG) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
    IOAPIC[IOEOI] = V_EOIREG;
    hv_check("eoireg_clears_remote_irr", rte_low(PIN_EOIREG) & RTE_REMOTE_IRR, 0);
    sti();
    hv_check_true("eoireg_interrupt_taken", wait_count(0, 3, 1));
    settle();
    hv_check("eoireg_interrupt_once", count[0][3], 1);
    /* switching an entry to edge clears a stuck remote IRR */
    cli();
    set_rte(PIN_EOIREG, RTE_MASKED | RTE_LEVEL | V_EOIREG, 0);
    set_line(PIN_EOIREG, 1);
    set_rte(PIN_EOIREG, RTE_LEVEL | V_EOIREG, 0);
    hv_check("unmasked_level_sets_remote_irr", rte_low(PIN_EOIREG) & RTE_REMOTE_IRR, RTE_REMOTE_IRR);
    set_line(PIN_EOIREG, 0);
    set_rte(PIN_EOIREG, RTE_MASKED | V_EOIREG, 0);
    hv_check("edge_clears_remote_irr", rte_low(PIN_EOIREG) & RTE_REMOTE_IRR, 0);
    sti();
    settle();
    hv_check("eoireg_second_interrupt", count[0][3], 2);

    /* the UART's "THR empty" interrupt on ISA IRQ 4 */
    set_rte(PIN_UART, V_UART, 0);
    outb(SERIAL_PORT + 1, 0x02);
    hv_check_true("uart_thr_empty_interrupt", wait_count(0, 2, 1));
    hv_check("uart_iir_thr_empty", uart_iir & 0x0F, 0x02);
    settle();
    hv_check("uart_interrupt_once", count[0][2], 1);
    set_rte(PIN_UART, RTE_MASKED, 0);
    hv_finish();
    return 0;
}
