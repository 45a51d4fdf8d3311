/*
 * guest.h - the freestanding runtime shared by every vsmtrace test guest.
 *
 * One header so a test kernel needs a single #include.  Everything here is
 * tiny on purpose: guest supervisor code may be emulated instruction by
 * instruction, so helpers avoid loops where they can and never use
 * instructions KVM's emulator lacks (cmpxchg16b, xsave/xrstor, int3, clac,
 * popcnt, fwait, endbr64).
 */
#ifndef VSMTRACE_GUEST_H
#define VSMTRACE_GUEST_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "layout.h"

/* Exit codes the runtime itself uses (host status is (code << 1) | 1). */
#define EXIT_EXCEPTION_BASE 0x40 /* + vector, for an unhandled exception 0..31 */
#define EXIT_UNHANDLED_IRQ 0x60  /* interrupt 32..254 with no registered handler */

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define NORETURN __attribute__((noreturn))

/* ---- port I/O ------------------------------------------------------- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint16_t inw(uint16_t port)
{
    uint16_t v;
    __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t inl(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* ---- MSRs, TSC, CPUID ----------------------------------------------- */
static inline uint64_t rdmsr(uint32_t msr)
{
    uint32_t lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((uint64_t)hi << 32) | lo;
}
static inline void wrmsr(uint32_t msr, uint64_t v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
/* rdmsr/wrmsr that return false instead of dying when the access raises #GP. */
bool rdmsr_safe(uint32_t msr, uint64_t *value);
bool wrmsr_safe(uint32_t msr, uint64_t value);

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
struct cpuid_regs {
    uint32_t eax, ebx, ecx, edx;
};
static inline struct cpuid_regs cpuid(uint32_t leaf, uint32_t subleaf)
{
    struct cpuid_regs r;
    __asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(subleaf));
    return r;
}

/* ---- CPU control ---------------------------------------------------- */
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }
/* sti; hlt back to back: the STI shadow makes "wake on the next interrupt" race free. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void cpu_pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline uint64_t read_cr0(void) { uint64_t v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr2(void) { uint64_t v; __asm__ volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline uint64_t read_rflags(void)
{
    uint64_t v;
    __asm__ volatile("pushfq; popq %0" : "=r"(v));
    return v;
}
/* Disable interrupts and return the old RFLAGS, for irq_restore(). */
static inline uint64_t irq_save(void)
{
    uint64_t f = read_rflags();
    cli();
    return f;
}
static inline void irq_restore(uint64_t flags)
{
    if (flags & (1u << 9))
        sti();
}
NORETURN void halt_forever(void);

/* ---- atomics (lock xadd / lock add / xchg only) ---------------------- */
static inline uint32_t atomic_fetch_add32(volatile uint32_t *p, uint32_t v)
{
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); /* lock xadd */
}
static inline void atomic_inc32(volatile uint32_t *p) { __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST); }
static inline uint32_t atomic_load32(const volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
static inline void atomic_store32(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }

typedef struct {
    volatile uint32_t locked;
} spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE)) /* xchg */
        while (l->locked)
            cpu_pause();
}
static inline void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* ---- serial console and exit ---------------------------------------- */
#define SERIAL_PORT 0x3F8
#define DEBUG_EXIT_PORT 0xF4
void serial_putc(char c);
void serial_puts(const char *s);
/* printf family: %d %i %u %x %X %p %s %c %% with l/ll/z length, width, '0' and '-' flags.
 * printf/vprintf hold a lock (interrupts off) so lines from several CPUs never interleave. */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
/* Write code to isa-debug-exit: the host process exits with (code << 1) | 1. */
NORETURN void qemu_exit(uint32_t code);

/* ---- interrupts ----------------------------------------------------- */
/* What the assembly stubs push: all GPRs, the vector, the error code (0 if
 * the CPU pushed none) and the CPU's own interrupt frame. */
struct int_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error_code;
    uint64_t rip, cs, rflags, rsp, ss;
};
/* Interrupt handler for vectors 32..255.  It must send its own EOI (apic_eoi()). */
typedef void (*irq_handler_t)(struct int_frame *frame);
/* Exception hook for vectors 0..31: return true if handled (it may change frame->rip);
 * false falls through to the default report-and-exit. */
typedef bool (*exception_handler_t)(struct int_frame *frame);
void set_irq_handler(uint8_t vector, irq_handler_t fn);
void set_exception_handler(uint8_t vector, exception_handler_t fn);
/* Load the IDT on this CPU (the runtime does it for the BSP and for each AP). */
void idt_load(void);

/* ---- strings and command line --------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
/* Parse an unsigned decimal or 0x-prefixed hexadecimal number; *end (if given) points past it. */
uint64_t parse_uint(const char *s, const char **end);
/* Kernel command line ("" when the loader gave none). */
const char *cmdline(void);
/* Copy the value of key=value from the command line into buf; false if absent. */
bool cmdline_get(const char *key, char *buf, size_t size);
uint64_t cmdline_get_uint(const char *key, uint64_t dflt);
/* True if the command line has key=<value> exactly. */
bool cmdline_is(const char *key, const char *value);

/* ---- boot ----------------------------------------------------------- */
/* Values of EAX/EBX at the multiboot entry (RDI/RSI for raw64 kernels). */
extern uint32_t boot_magic;
extern uint32_t boot_mbi;
/* Every guest provides this.  Its return value becomes the exit code. */
int kmain(uint32_t magic, uint32_t mbi_phys);

#endif
