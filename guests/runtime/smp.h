/*
 * smp.h - AP bring-up.  APIC ids equal VP indices equal CPU indices; the
 * trampoline goes to physical 0x8000 (SIPI vector 0x08).  Each AP runs on its
 * own 8 KiB stack with the BSP's IDT and page tables, its APIC enabled (in
 * x2APIC mode if the BSP switched first) and IF=0 when ap_main starts.
 */
#ifndef VSMTRACE_SMP_H
#define VSMTRACE_SMP_H

#include "guest.h"

#define SIPI_VECTOR 0x08

/* Start CPUs 1..ncpus-1 with INIT + SIPI (a second SIPI only to those that
 * have not checked in after a timeout).  Returns how many CPUs run, BSP
 * included.  ap_main(cpu) must not return (the runtime halts the AP if it does). */
int smp_start_aps(int ncpus, void (*ap_main)(int cpu));
/* CPUs that have started, BSP included (an atomic counter APs increment). */
uint32_t smp_cpus_started(void);
/* This CPU's index (its APIC id). */
int smp_cpu_id(void);
/* TSC cycles to wait for APs before giving up (default 4e9). */
extern uint64_t smp_timeout_tsc;

#endif
