/*
 * hv.h - guest-side Hyper-V (TLFS) helpers for the vsmtrace test guests.
 *
 * The numbers here are the guest's own copy of the TLFS constants (the VMM's
 * Python side has vmm/hyperv/hvdef.py); a guest that disagrees with the VMM is
 * exactly what the tests want to notice.
 *
 * Calling convention (TLFS, x64): RCX = hypercall input value, RDX = input GPA
 * (or fast input), R8 = output GPA (or fast input), XMM0-5 = XMM fast input and
 * output, result value in RAX.  The helpers call the hypercall page that
 * hv_init() installed.  C code is built with -mgeneral-regs-only, so the XMM
 * helper is plain assembly (movdqu) in hv.c.
 */
#ifndef VSMTRACE_HV_H
#define VSMTRACE_HV_H

#include "guest.h"

#define HV_PAGE_SIZE 4096

/* ---- CPUID ----------------------------------------------------------- */
#define HV_CPUID_VENDOR_AND_MAX 0x40000000u
#define HV_CPUID_INTERFACE 0x40000001u
#define HV_CPUID_VERSION 0x40000002u
#define HV_CPUID_FEATURES 0x40000003u
#define HV_CPUID_ENLIGHTENMENT_INFO 0x40000004u
#define HV_CPUID_IMPLEMENTATION_LIMITS 0x40000005u
#define HV_CPUID_LAST 0x4000000Au
#define HV_CPUID_SIGNATURE_HV1 0x31237648u /* "Hv#1" */
#define CPUID1_ECX_HYPERVISOR (1u << 31)

/* 0x40000003 EAX/EBX: partition privileges (EBX = bits 63:32). */
#define HV_PRIV_ACCESS_PARTITION_REFERENCE_COUNTER (1ull << 1)
#define HV_PRIV_ACCESS_SYNIC_REGS (1ull << 2)
#define HV_PRIV_ACCESS_SYNTHETIC_TIMER_REGS (1ull << 3)
#define HV_PRIV_ACCESS_INTR_CTRL_REGS (1ull << 4)
#define HV_PRIV_ACCESS_HYPERCALL_MSRS (1ull << 5)
#define HV_PRIV_ACCESS_VP_INDEX (1ull << 6)
#define HV_PRIV_ACCESS_PARTITION_REFERENCE_TSC (1ull << 9)
#define HV_PRIV_ACCESS_FREQUENCY_REGS (1ull << 11)
#define HV_PRIV_ACCESS_PARTITION_ID (1ull << 33)
#define HV_PRIV_POST_MESSAGES (1ull << 36)
#define HV_PRIV_SIGNAL_EVENTS (1ull << 37)
/* 0x40000003 EDX: features. */
#define HV_FEATURE_XMM_HYPERCALL_INPUT (1u << 4)
#define HV_FEATURE_GUEST_CRASH_MSRS (1u << 10)
#define HV_FEATURE_XMM_HYPERCALL_OUTPUT (1u << 15)
#define HV_FEATURE_DIRECT_SYNTHETIC_TIMERS (1u << 19)

/* ---- synthetic MSRs ------------------------------------------------- */
#define HV_MSR_GUEST_OS_ID 0x40000000u
#define HV_MSR_HYPERCALL 0x40000001u
#define HV_MSR_VP_INDEX 0x40000002u
#define HV_MSR_RESET 0x40000003u
#define HV_MSR_VP_RUNTIME 0x40000010u
#define HV_MSR_TIME_REF_COUNT 0x40000020u
#define HV_MSR_REFERENCE_TSC 0x40000021u
#define HV_MSR_TSC_FREQUENCY 0x40000022u
#define HV_MSR_APIC_FREQUENCY 0x40000023u
#define HV_MSR_EOI 0x40000070u
#define HV_MSR_ICR 0x40000071u
#define HV_MSR_TPR 0x40000072u
#define HV_MSR_VP_ASSIST_PAGE 0x40000073u
#define HV_MSR_SCONTROL 0x40000080u
#define HV_MSR_SVERSION 0x40000081u
#define HV_MSR_SIEFP 0x40000082u
#define HV_MSR_SIMP 0x40000083u
#define HV_MSR_EOM 0x40000084u
#define HV_MSR_SINT0 0x40000090u
#define HV_MSR_STIMER0_CONFIG 0x400000B0u
#define HV_MSR_STIMER0_COUNT 0x400000B1u
#define HV_MSR_GUEST_IDLE 0x400000F0u
#define HV_MSR_CRASH_P0 0x40000100u
#define HV_MSR_CRASH_CTL 0x40000105u

#define HV_HYPERCALL_ENABLE (1ull << 0)
#define HV_HYPERCALL_LOCKED (1ull << 1)
#define HV_OVERLAY_ENABLE (1ull << 0) /* SIMP, SIEFP, REFERENCE_TSC, VP_ASSIST */
#define HV_SCONTROL_ENABLE (1ull << 0)
#define HV_SINT_MASKED (1ull << 16)
#define HV_SINT_AUTO_EOI (1ull << 17)
#define HV_SINT_POLLING (1ull << 18)
#define HV_STIMER_ENABLE (1ull << 0)
#define HV_STIMER_PERIODIC (1ull << 1)
#define HV_STIMER_LAZY (1ull << 2)
#define HV_STIMER_AUTO_ENABLE (1ull << 3)
#define HV_STIMER_VECTOR(v) ((uint64_t)(v) << 4)
#define HV_STIMER_DIRECT (1ull << 12)
#define HV_STIMER_SINT(s) ((uint64_t)(s) << 16)
#define HV_CRASH_CTL_NOTIFY (1ull << 63)
#define HV_CRASH_CTL_MESSAGE (1ull << 62)

/* A guest OS id in the TLFS "open source" format: bit 63 set, OS type 0x7F (vsmtrace tests). */
#define HV_GUEST_OS_ID_VSMTRACE ((1ull << 63) | (0x7Full << 56) | 0x0001ull)

/* ---- hypercalls ----------------------------------------------------- */
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE 0x0002
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST 0x0003
#define HVCALL_NOTIFY_LONG_SPIN_WAIT 0x0008
#define HVCALL_SEND_SYNTHETIC_CLUSTER_IPI 0x000B
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX 0x0013
#define HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST_EX 0x0014
#define HVCALL_SEND_SYNTHETIC_CLUSTER_IPI_EX 0x0015
#define HVCALL_CREATE_PARTITION 0x0040
#define HVCALL_GET_PARTITION_ID 0x0046
#define HVCALL_POST_MESSAGE 0x005C
#define HVCALL_SIGNAL_EVENT 0x005D
#define HVCALL_GET_VP_INDEX_FROM_APIC_ID 0x009A

/* Input value (control) fields. */
#define HV_CONTROL_FAST (1ull << 16)
#define HV_CONTROL_VAR_HEADER(qwords) ((uint64_t)(qwords) << 17)
#define HV_CONTROL_NESTED (1ull << 31)
#define HV_CONTROL_REP_COUNT(n) ((uint64_t)(n) << 32)
#define HV_CONTROL_REP_START(n) ((uint64_t)(n) << 48)
#define HV_CONTROL_RESERVED_27 (1ull << 27)
#define HV_CONTROL_RESERVED_44 (1ull << 44)
#define HV_CONTROL_RESERVED_60 (1ull << 60)

/* Result value fields. */
#define HV_RESULT_STATUS(r) ((uint16_t)((r) & 0xFFFF))
#define HV_RESULT_REPS(r) ((uint32_t)(((r) >> 32) & 0xFFF))

#define HV_STATUS_SUCCESS 0x0000
#define HV_STATUS_INVALID_HYPERCALL_CODE 0x0002
#define HV_STATUS_INVALID_HYPERCALL_INPUT 0x0003
#define HV_STATUS_INVALID_ALIGNMENT 0x0004
#define HV_STATUS_INVALID_PARAMETER 0x0005
#define HV_STATUS_ACCESS_DENIED 0x0006
#define HV_STATUS_INVALID_PARTITION_ID 0x000D
#define HV_STATUS_INVALID_PORT_ID 0x0011
#define HV_STATUS_INVALID_CONNECTION_ID 0x0012
#define HV_STATUS_INSUFFICIENT_BUFFERS 0x0013
#define HV_STATUS_INVALID_SYNIC_STATE 0x0018

#define HV_PARTITION_ID_SELF 0xFFFFFFFFFFFFFFFFull
#define HV_INPUT_VTL_USE_TARGET (1u << 4)
#define HV_FLUSH_ALL_PROCESSORS (1ull << 0)
#define HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES (1ull << 1)
#define HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY (1ull << 2)
#define HV_GENERIC_SET_SPARSE_4K 0
#define HV_GENERIC_SET_ALL 1

/* vsmtrace's loopback connections (vmm/hyperv/connections.py): deliver to the caller's SINT 2. */
#define VSMTRACE_LOOPBACK_MESSAGE_CONNECTION 0x00F00001u
#define VSMTRACE_LOOPBACK_EVENT_CONNECTION 0x00F00002u
#define VSMTRACE_LOOPBACK_SINT 2

/* ---- SynIC layouts -------------------------------------------------- */
#define HV_MESSAGE_TYPE_NONE 0x00000000u
#define HV_MESSAGE_TYPE_TIMER_EXPIRED 0x80000010u
#define HV_MESSAGE_FLAG_PENDING 0x01
#define HV_MESSAGE_PAYLOAD_MAX 240

struct hv_message {
    volatile uint32_t type;
    uint8_t payload_size;
    volatile uint8_t flags;
    uint16_t reserved;
    uint64_t origination_id;
    uint8_t payload[HV_MESSAGE_PAYLOAD_MAX];
};

struct hv_timer_message_payload {
    uint32_t timer_index;
    uint32_t reserved;
    uint64_t expiration_time;
    uint64_t delivery_time;
};

struct hv_post_message_input {
    uint32_t connection_id;
    uint32_t reserved;
    uint32_t message_type;
    uint32_t payload_size;
    uint8_t payload[HV_MESSAGE_PAYLOAD_MAX];
};

struct hv_reference_tsc_page {
    volatile uint32_t sequence;
    uint32_t reserved1;
    volatile uint64_t scale;
    volatile int64_t offset;
};

/* ---- setup ---------------------------------------------------------- */
/* CPUID says "Microsoft Hv" / "Hv#1" (and the hypervisor bit is set). */
bool hv_present(void);
/* hv_present(), write GUEST_OS_ID, enable the hypercall page (a .bss page) via the
 * HYPERCALL MSR.  Returns false (after printing why) if anything is missing. */
bool hv_init(void);
/* The hypercall page hv_init() installed (its physical = virtual address). */
extern uint8_t hv_hypercall_page[HV_PAGE_SIZE];

/* ---- hypercalls ----------------------------------------------------- */
/* Memory-based (or any) call: RCX=control, RDX=input GPA, R8=output GPA. Returns RAX. */
static inline uint64_t hv_hypercall(uint64_t control, uint64_t in_gpa, uint64_t out_gpa)
{
    uint64_t result;
    register uint64_t r8 __asm__("r8") = out_gpa;
    __asm__ volatile("call *%[page]"
                     : "=a"(result), "+c"(control), "+d"(in_gpa), "+r"(r8)
                     : [page] "r"((uint64_t)hv_hypercall_page)
                     : "r9", "r10", "r11", "memory", "cc");
    return result;
}

/* Fast call with register input RDX:R8 (control gets HV_CONTROL_FAST). */
static inline uint64_t hv_fast(uint64_t control, uint64_t rdx, uint64_t r8)
{
    return hv_hypercall(control | HV_CONTROL_FAST, rdx, r8);
}

/* Fast call that also returns RDX/R8 as the VMM left them (fast output in pair 0). */
static inline uint64_t hv_fast_out(uint64_t control, uint64_t *rdx, uint64_t *r8)
{
    uint64_t result;
    uint64_t c = control | HV_CONTROL_FAST;
    register uint64_t r8r __asm__("r8") = *r8;
    uint64_t d = *rdx;
    __asm__ volatile("call *%[page]"
                     : "=a"(result), "+c"(c), "+d"(d), "+r"(r8r)
                     : [page] "r"((uint64_t)hv_hypercall_page)
                     : "r9", "r10", "r11", "memory", "cc");
    *rdx = d;
    *r8 = r8r;
    return result;
}

/* XMM fast call.  regs[0..13] (112 bytes) are RDX, R8, XMM0 lo/hi .. XMM5 lo/hi:
 * loaded before the call, stored back after it (fast output lands there too).
 * Control gets HV_CONTROL_FAST. */
uint64_t hv_xmm_call(uint64_t control, uint64_t regs[14]);
#define HV_XMM_REGS 14

/* Whole-call wrapper that reports a #UD instead of dying: returns true and sets *result
 * if the call returned, false if it raised #UD (the handler resumes after the call). */
bool hv_hypercall_ud(uint64_t control, uint64_t in_gpa, uint64_t out_gpa, uint64_t *result);
bool hv_xmm_call_ud(uint64_t control, uint64_t regs[14], uint64_t *result);
/* RIP offset inside the hypercall page of the last #UD caught by the *_ud helpers. */
extern volatile uint64_t hv_last_ud_rip;

/* ---- SynIC ---------------------------------------------------------- */
/* Enable the SynIC with message page simp and event flags page siefp (page aligned). */
void hv_synic_enable(void *simp, void *siefp);
void hv_synic_disable(void);
void hv_sint_set(int sint, uint8_t vector, uint64_t flags);
static inline void hv_sint_mask(int sint) { wrmsr(HV_MSR_SINT0 + sint, HV_SINT_MASKED); }
static inline void hv_eom(void) { wrmsr(HV_MSR_EOM, 0); }
static inline struct hv_message *hv_sint_slot(void *simp, int sint) { return (struct hv_message *)simp + sint; }
/* Consume a message slot: type = 0, then EOM if MessagePending was set. */
void hv_message_done(struct hv_message *m);

/* ---- synthetic timers ----------------------------------------------- */
static inline void hv_stimer_config(int index, uint64_t config) { wrmsr(HV_MSR_STIMER0_CONFIG + 2 * index, config); }
static inline void hv_stimer_count(int index, uint64_t count) { wrmsr(HV_MSR_STIMER0_COUNT + 2 * index, count); }

/* ---- time ----------------------------------------------------------- */
static inline uint64_t hv_ref_time(void) { return rdmsr(HV_MSR_TIME_REF_COUNT); }
/* Reference time from a TSC page (rdtsc, scale, offset with the sequence protocol).
 * Returns false if the page is invalid (sequence 0). */
bool hv_tsc_page_time(const struct hv_reference_tsc_page *page, uint64_t *time);

/* ---- checks --------------------------------------------------------- */
/* Print "ok <name>" or "FAIL <name>: got 0x.. want 0x.." and count failures. */
extern int hv_failures;
void hv_check(const char *name, uint64_t got, uint64_t want);
void hv_check_true(const char *name, bool cond);
/* Exit via isa-debug-exit: 0 if no check failed, else 1. */
NORETURN void hv_finish(void);

#endif
