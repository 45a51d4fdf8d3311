/*
 * apic.h - local APIC access with one API for xAPIC (MMIO at 0xFEE00000) and
 * x2APIC (MSR 0x800 + reg/16).  Registers are named by their xAPIC offset.
 * The mode is global: switch the BSP with apic_enable_x2apic() before
 * smp_start_aps() and every AP switches itself before running ap_main.
 */
#ifndef VSMTRACE_APIC_H
#define VSMTRACE_APIC_H

#include "guest.h"

#define APIC_MMIO_BASE 0xFEE00000ull
#define MSR_IA32_APIC_BASE 0x1B
#define APIC_BASE_BSP (1ull << 8)
#define APIC_BASE_EXTD (1ull << 10) /* x2APIC mode */
#define APIC_BASE_EN (1ull << 11)
#define MSR_IA32_TSC_DEADLINE 0x6E0
#define MSR_X2APIC_BASE 0x800

#define APIC_ID 0x20
#define APIC_VERSION 0x30
#define APIC_TPR 0x80
#define APIC_PPR 0xA0
#define APIC_EOI 0xB0
#define APIC_LDR 0xD0
#define APIC_SVR 0xF0
#define APIC_ISR 0x100 /* 8 registers, 0x10 apart */
#define APIC_TMR 0x180
#define APIC_IRR 0x200
#define APIC_ESR 0x280
#define APIC_ICR 0x300
#define APIC_ICR_HIGH 0x310 /* xAPIC only */
#define APIC_LVT_TIMER 0x320
#define APIC_LVT_LINT0 0x350
#define APIC_LVT_LINT1 0x360
#define APIC_LVT_ERROR 0x370
#define APIC_TIMER_INITIAL 0x380
#define APIC_TIMER_CURRENT 0x390
#define APIC_TIMER_DIVIDE 0x3E0

#define APIC_SVR_ENABLE (1u << 8)
#define APIC_SPURIOUS_VECTOR 0xFF
#define APIC_LVT_MASKED (1u << 16)
#define APIC_TIMER_ONESHOT (0u << 17)
#define APIC_TIMER_PERIODIC (1u << 17)
#define APIC_TIMER_TSC_DEADLINE (2u << 17)
#define APIC_ICR_PENDING (1u << 12) /* delivery status, xAPIC only */
#define APIC_ICR_LEVEL_ASSERT (1u << 14)

/* Delivery modes for apic_send_ipi (ICR bits 10:8). */
#define APIC_DM_FIXED 0
#define APIC_DM_LOWEST 1
#define APIC_DM_SMI 2
#define APIC_DM_NMI 4
#define APIC_DM_INIT 5
#define APIC_DM_STARTUP 6
/* Destination shorthands (ICR bits 19:18). */
#define APIC_DEST_NONE 0
#define APIC_DEST_SELF 1
#define APIC_DEST_ALL 2
#define APIC_DEST_ALL_BUT_SELF 3

bool apic_has_x2apic(void);       /* CPUID.1:ECX[21] */
bool apic_has_tsc_deadline(void); /* CPUID.1:ECX[24] */
bool apic_x2apic_mode(void);
/* Globally enable this CPU's APIC (IA32_APIC_BASE.EN) and software-enable it via SVR. */
void apic_enable(void);
/* Switch this CPU to x2APIC (IA32_APIC_BASE.EXTD) and make x2APIC the mode for
 * all later APIC calls and AP bring-up.  False if the CPU has no x2APIC. */
bool apic_enable_x2apic(void);
/* Switch only this CPU, following the global mode (used on APs). */
void apic_follow_mode(void);

uint32_t apic_read(uint32_t reg);
void apic_write(uint32_t reg, uint32_t value);
uint32_t apic_id(void); /* ID register, bits 31:24 in xAPIC mode, whole in x2APIC */
/* Send an IPI: dest is a physical APIC id (ignored with a shorthand). */
void apic_send_ipi(uint32_t dest, uint8_t vector, uint32_t mode, uint32_t shorthand);
void apic_eoi(void);

/* Timer: divide is 1, 2, 4, ... 128. */
void apic_timer_oneshot(uint8_t vector, uint32_t initial_count, uint32_t divide);
void apic_timer_periodic(uint8_t vector, uint32_t initial_count, uint32_t divide);
/* LVT in TSC-deadline mode; arm it with apic_set_tsc_deadline (0 disarms). */
void apic_timer_deadline(uint8_t vector);
void apic_set_tsc_deadline(uint64_t tsc);
void apic_timer_stop(void);

#endif
