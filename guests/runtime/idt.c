/*
 * idt.c - the IDT, exception reporting and interrupt dispatch.
 *
 * Unhandled exceptions print "EXCEPTION <vector> rip=0x.. err=0x.." (plus
 * " cr2=0x.." for #PF) and exit with EXIT_EXCEPTION_BASE + vector, so a VMM
 * test sees at once which fault killed the guest.
 */
#include "guest.h"

struct idt_gate {
    uint16_t offset_lo;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_hi;
    uint32_t zero;
} __attribute__((packed));

struct idt_ptr {
    uint16_t limit;
    uint64_t base;
} __attribute__((packed));

extern char isr_stubs[];
extern char rdmsr_safe_insn[], wrmsr_safe_insn[], msr_fault_fixup[];

static struct idt_gate idt[256] __attribute__((aligned(16)));
static volatile uint32_t idt_built;
static irq_handler_t irq_handlers[256];
static exception_handler_t exception_handlers[32];

static void idt_build(void)
{
    for (int v = 0; v < 256; v++) {
        uint64_t a = (uint64_t)(isr_stubs + 16 * v);
        idt[v].offset_lo = (uint16_t)a;
        idt[v].selector = 0x08;
        idt[v].ist = 0;
        idt[v].type_attr = 0x8E; /* present, DPL 0, 64-bit interrupt gate */
        idt[v].offset_mid = (uint16_t)(a >> 16);
        idt[v].offset_hi = (uint32_t)(a >> 32);
        idt[v].zero = 0;
    }
}

void idt_load(void)
{
    /* The BSP builds the table before any AP exists, so no lock is needed. */
    if (!idt_built) {
        idt_build();
        idt_built = 1;
    }
    struct idt_ptr p = {sizeof(idt) - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" : : "m"(p));
}

void set_irq_handler(uint8_t vector, irq_handler_t fn)
{
    irq_handlers[vector] = fn;
}

void set_exception_handler(uint8_t vector, exception_handler_t fn)
{
    if (vector < 32)
        exception_handlers[vector] = fn;
}

static void report(const char *fmt, ...)
{
    /* Unlocked: the fault may have hit while this CPU held the printf lock. */
    char buf[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    serial_puts(buf);
}

void isr_dispatch(struct int_frame *f);
void isr_dispatch(struct int_frame *f)
{
    uint64_t v = f->vector;
    if (v < 32) {
        if (exception_handlers[v] && exception_handlers[v](f))
            return;
        if (f->rip == (uint64_t)rdmsr_safe_insn || f->rip == (uint64_t)wrmsr_safe_insn) {
            f->rip = (uint64_t)msr_fault_fixup;
            return;
        }
        if (v == 14)
            report("EXCEPTION %lu rip=0x%lx err=0x%lx cr2=0x%lx\n", v, f->rip, f->error_code, read_cr2());
        else
            report("EXCEPTION %lu rip=0x%lx err=0x%lx\n", v, f->rip, f->error_code);
        qemu_exit(EXIT_EXCEPTION_BASE + (uint32_t)v);
    }
    if (irq_handlers[v]) {
        irq_handlers[v](f);
        return;
    }
    if (v == 0xFF) /* spurious-interrupt vector: no EOI, nothing to do */
        return;
    report("UNHANDLED INTERRUPT %lu rip=0x%lx\n", v, f->rip);
    qemu_exit(EXIT_UNHANDLED_IRQ);
}
