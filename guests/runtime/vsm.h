/*
 * vsm.h - the two-VTL guest framework: one Multiboot image holds a VTL0 kernel
 * (the usual runtime, kmain) and a VTL1 kernel (vtl1_* code in vsm.c and the
 * guest's own VTL1 hooks) that share the identity page tables but have their
 * own GDT, IDT, stacks, hypercall page, VP assist page, SynIC and APIC.
 *
 * VTL0 calls vsm_init() (Hyper-V setup, VsmCodePageOffsets, EnablePartitionVtl,
 * EnableVpVtl with an initial context cloned from VTL0's own state, first VTL
 * call).  VTL1 then runs a service loop per VP: it returns to VTL0, and on each
 * re-entry (it resumes right after its VtlReturn trap) it reads the entry
 * reason from its VP assist page and either serves the request VTL0 left in
 * the per-VP mailbox (VTL call) or handles an interrupt/intercept (then it
 * restores VTL0's shared GPRs and returns non-fast with VtlReturnX64Rax/Rcx =
 * VTL0's RAX/RCX, so the asynchronous entry is invisible to VTL0).
 *
 * VTL call/return go through the hypercall page entry points at the offsets
 * HvRegisterVsmCodePageOffsets reports (read by each VTL for itself).
 *
 * VTL1 must not printf while handling an asynchronous entry (VTL0 of the same
 * VP may hold the printf lock; VTL preemption ignores RFLAGS.IF).
 */
#ifndef VSMTRACE_VSM_H
#define VSMTRACE_VSM_H

#include "hv.h"

#define VSM_MAX_VPS 4

/* ---- hypercall codes (TLFS appendix A) ------------------------------- */
#define HVCALL_MODIFY_VTL_PROTECTION_MASK 0x000C
#define HVCALL_ENABLE_PARTITION_VTL 0x000D
#define HVCALL_ENABLE_VP_VTL 0x000F
#define HVCALL_VTL_CALL 0x0011
#define HVCALL_VTL_RETURN 0x0012
#define HVCALL_GET_VP_REGISTERS 0x0050
#define HVCALL_SET_VP_REGISTERS 0x0051
#define HVCALL_TRANSLATE_VIRTUAL_ADDRESS 0x0052
#define HVCALL_START_VIRTUAL_PROCESSOR 0x0099

#define HV_STATUS_INVALID_PARTITION_STATE 0x0007
#define HV_STATUS_OPERATION_DENIED 0x0008
#define HV_STATUS_INVALID_VP_INDEX 0x000E
#define HV_STATUS_INVALID_VP_STATE 0x0015
#define HV_STATUS_INVALID_REGISTER_VALUE 0x0050
#define HV_STATUS_INVALID_VTL_STATE 0x0051

#define HV_VP_INDEX_SELF 0xFFFFFFFEu
#define HV_ANY_VP 0xFFFFFFFFu

/* HV_INPUT_VTL: bits 3:0 target VTL, bit 4 use it. */
#define HV_VTL_SELF 0x00
#define HV_VTL(n) ((uint8_t)(HV_INPUT_VTL_USE_TARGET | (n)))

/* CPUID 0x40000003 EBX privileges (as bits of EBX). */
#define HV_EBX_ACCESS_VSM (1u << 16)
#define HV_EBX_ACCESS_VP_REGISTERS (1u << 17)
#define HV_EBX_START_VIRTUAL_PROCESSOR (1u << 21)

/* ---- register names ------------------------------------------------ */
#define HV_REG_RAX 0x00020000u
#define HV_REG_RCX 0x00020001u
#define HV_REG_RDX 0x00020002u
#define HV_REG_RBX 0x00020003u
#define HV_REG_RSP 0x00020004u
#define HV_REG_RBP 0x00020005u
#define HV_REG_RSI 0x00020006u
#define HV_REG_RDI 0x00020007u
#define HV_REG_R8 0x00020008u
#define HV_REG_RIP 0x00020010u
#define HV_REG_RFLAGS 0x00020011u
#define HV_REG_XMM0 0x00030000u
#define HV_REG_CR0 0x00040000u
#define HV_REG_CR2 0x00040001u
#define HV_REG_CR3 0x00040002u
#define HV_REG_CR4 0x00040003u
#define HV_REG_CR8 0x00040004u
#define HV_REG_DR0 0x00050000u
#define HV_REG_DR7 0x00050005u
#define HV_REG_ES 0x00060000u
#define HV_REG_CS 0x00060001u
#define HV_REG_SS 0x00060002u
#define HV_REG_DS 0x00060003u
#define HV_REG_FS 0x00060004u
#define HV_REG_GS 0x00060005u
#define HV_REG_LDTR 0x00060006u
#define HV_REG_TR 0x00060007u
#define HV_REG_IDTR 0x00070000u
#define HV_REG_GDTR 0x00070001u
#define HV_REG_EFER 0x00080001u
#define HV_REG_KERNEL_GS_BASE 0x00080002u
#define HV_REG_APIC_BASE 0x00080003u
#define HV_REG_PAT 0x00080004u
#define HV_REG_SYSENTER_CS 0x00080005u
#define HV_REG_SYSENTER_EIP 0x00080006u
#define HV_REG_SYSENTER_ESP 0x00080007u
#define HV_REG_STAR 0x00080008u
#define HV_REG_LSTAR 0x00080009u
#define HV_REG_CSTAR 0x0008000Au
#define HV_REG_SFMASK 0x0008000Bu
#define HV_REG_TSC_AUX 0x0008007Bu
#define HV_REG_PENDING_EVENT0 0x00010004u
#define HV_REG_GUEST_OS_ID 0x00090002u
#define HV_REG_VP_INDEX 0x00090003u
#define HV_REG_VP_ASSIST_PAGE 0x00090013u
#define HV_REG_HYPERCALL 0x00090001u
#define HV_REG_SINT0 0x000A0000u
#define HV_REG_SCONTROL 0x000A0010u
#define HV_REG_SIMP 0x000A0013u
#define HV_REG_VSM_CODE_PAGE_OFFSETS 0x000D0002u
#define HV_REG_VSM_VP_STATUS 0x000D0003u
#define HV_REG_VSM_PARTITION_STATUS 0x000D0004u
#define HV_REG_VSM_CAPABILITIES 0x000D0006u
#define HV_REG_VSM_PARTITION_CONFIG 0x000D0007u
#define HV_REG_VSM_VP_SECURE_CONFIG_VTL0 0x000D0010u

/* VsmPartitionConfig bits. */
#define HV_VSM_CONFIG_ENABLE_VTL_PROTECTION (1ull << 0)
#define HV_VSM_CONFIG_DEFAULT_MASK(m) ((uint64_t)(m) << 1)
/* VsmVpSecureConfig bits. */
#define HV_VSM_SECURE_MBEC (1ull << 0)
#define HV_VSM_SECURE_TLB_LOCKED (1ull << 1)

/* HV_MAP_GPA_FLAGS */
#define HV_MAP_GPA_READ 0x1u
#define HV_MAP_GPA_WRITE 0x2u
#define HV_MAP_GPA_KX 0x4u
#define HV_MAP_GPA_UX 0x8u
#define HV_MAP_GPA_NONE 0x0u
#define HV_MAP_GPA_ALL 0xFu

/* HV_VP_VTL_CONTROL entry reasons. */
#define HV_ENTRY_RESERVED 0
#define HV_ENTRY_VTL_CALL 1
#define HV_ENTRY_INTERRUPT 2
#define HV_ENTRY_INTERCEPT 3

/* GPA intercept message. */
#define HV_MESSAGE_TYPE_GPA_INTERCEPT 0x80000001u
#define HV_INTERCEPT_READ 0
#define HV_INTERCEPT_WRITE 1
#define HV_INTERCEPT_EXECUTE 2

/* Translate flags / results. */
#define HV_XLATE_VALIDATE_READ 0x001ull
#define HV_XLATE_VALIDATE_WRITE 0x002ull
#define HV_XLATE_VALIDATE_EXECUTE 0x004ull
#define HV_XLATE_PRIVILEGE_EXEMPT 0x008ull
#define HV_XLATE_SET_PAGE_TABLE_BITS 0x010ull
#define HV_XLATE_TLB_FLUSH_INHIBIT 0x020ull
#define HV_XLATE_INPUT_VTL(v) ((uint64_t)(v) << 56)
#define HV_XLATE_SUCCESS 0
#define HV_XLATE_PAGE_NOT_PRESENT 1
#define HV_XLATE_PRIVILEGE_VIOLATION 2
#define HV_XLATE_INVALID_PT_FLAGS 3
#define HV_XLATE_GPA_UNMAPPED 4
#define HV_XLATE_GPA_NO_READ 5
#define HV_XLATE_GPA_NO_WRITE 6
#define HV_XLATE_GPA_ILLEGAL_OVERLAY 7
#define HV_XLATE_INTERCEPT 8

/* PendingEvent0, exception form. */
#define HV_PENDING_EXCEPTION(vector, has_err, err)                                                       \
    (1ull | ((has_err) ? (1ull << 8) : 0) | ((uint64_t)(vector) << 16) | ((uint64_t)(uint32_t)(err) << 32))

/* ---- structures ---------------------------------------------------- */
struct hv_seg {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint16_t attributes;
};
struct hv_table {
    uint16_t pad[3];
    uint16_t limit;
    uint64_t base;
};
struct hv_initial_vp_context {
    uint64_t rip, rsp, rflags;
    struct hv_seg cs, ds, es, fs, gs, ss, tr, ldtr;
    struct hv_table idtr, gdtr;
    uint64_t efer, cr0, cr3, cr4, pat;
};
_Static_assert(sizeof(struct hv_initial_vp_context) == 224, "HV_INITIAL_VP_CONTEXT is 224 bytes");

struct hv_vp_vtl_control {
    uint32_t entry_reason;
    uint8_t vina_status;
    uint8_t reserved0;
    uint16_t reserved1;
    uint64_t vtl_return_rax;
    uint64_t vtl_return_rcx;
};
struct hv_vp_assist_page {
    uint32_t apic_assist;
    uint32_t reserved;
    struct hv_vp_vtl_control vtl_control; /* offset 8 */
};

/* Every shared register the framework moves around (offsets used by assembly). */
struct vsm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15; /* 0x00..0x70 */
    uint64_t pad;                                                                      /* 0x78 */
    uint64_t xmm[16][2];                                                               /* 0x80 */
};

/* The seed/vsmtrace GPA intercept message (slot layout, vsm-facts §3.4). */
struct hv_gpa_intercept {
    uint32_t type;
    uint8_t payload_size, flags;
    uint16_t reserved;
    uint64_t origination;
    uint32_t vp_index;           /* 0x10 */
    uint8_t insn_length;         /* 0x14 */
    uint8_t access_type;         /* 0x15 */
    uint16_t execution_state;    /* 0x16 */
    struct hv_seg cs;            /* 0x18 */
    uint64_t rip, rflags;        /* 0x28, 0x30 */
    uint32_t cache_type;         /* 0x38 */
    uint8_t insn_byte_count;     /* 0x3C */
    uint8_t access_info;         /* 0x3D */
    uint8_t tpr, reserved2;      /* 0x3E */
    uint64_t gva, gpa;           /* 0x40, 0x48 */
    uint8_t insn_bytes[16];      /* 0x50 */
    struct hv_seg ds, ss;        /* 0x60, 0x70 */
    uint64_t gprs[16];           /* 0x80: rax rcx rdx rbx rsp rbp rsi rdi r8..r15 */
};
_Static_assert(sizeof(struct hv_gpa_intercept) == 256, "GPA intercept message is one 256-byte slot");

/* ---- VTL0 <-> VTL1 requests (per-VP mailbox in shared memory) ------- */
enum vsm_op {
    VSM_OP_NOP = 0,
    VSM_OP_ECHO,         /* ret0 = arg0 + 1 */
    VSM_OP_GET_REG,      /* arg0 = vtl input, arg1 = name -> ret0 status, ret1/ret2 value lo/hi */
    VSM_OP_SET_REG,      /* arg0 = vtl input, arg1 = name, arg2 lo, arg3 hi -> ret0 status */
    VSM_OP_PROTECT,      /* arg0 = gpa, arg1 = pages, arg2 = mask, arg3 = target vtl input -> ret0 status */
    VSM_OP_CONFIG,       /* arg0 = VsmPartitionConfig value -> ret0 status */
    VSM_OP_TRANSLATE,    /* arg0 = gva, arg1 = flags, arg2 = vp -> ret0 status, ret1 result, ret2 gpa page */
    VSM_OP_HYPERCALL,    /* VTL1 makes hypercall: arg0 control, arg1 in-gpa, arg2 out-gpa -> ret0 result */
    VSM_OP_ENABLE_VP,    /* arg0 = vp index: VTL1 enables VTL1 on that VP -> ret0 status */
    VSM_OP_TIMER,        /* arg0 = APIC timer initial count (oneshot, VSM_VTL1_TIMER_VECTOR) */
    VSM_OP_SEND_IPI,     /* arg0 = dest APIC id, arg1 = vector: VTL1 sends an APIC fixed IPI */
    VSM_OP_PV_IPI,       /* arg0 = vector, arg1 = target vtl input, arg2 = processor mask -> ret0 status */
    VSM_OP_SET_RETURN,   /* arg0/arg1 = VtlReturnX64Rax/Rcx, arg2 = fast; load regs from vsm_vtl1_load */
    VSM_OP_READ,         /* arg0 = gpa -> ret0 = *(uint64_t *)gpa as VTL1 sees it */
    VSM_OP_WRITE,        /* arg0 = gpa, arg1 = value */
    VSM_OP_INTERCEPT_MODE, /* arg0 = action (enum vsm_action), arg1 = action argument */
    VSM_OP_TPR,          /* arg0 = VTL1 TPR value (xAPIC) */
    VSM_OP_USER,         /* guest-defined: handled by vtl1_user_op hook */
};

/* What VTL1 does with a GPA intercept (set with VSM_OP_INTERCEPT_MODE). */
enum vsm_action {
    VSM_ACT_RESTORE = 0, /* make the page RWX again: VTL0 re-executes */
    VSM_ACT_SKIP,        /* set VTL0 RIP = rip + instruction length (no effect) */
    VSM_ACT_SET_RIP,     /* set VTL0 RIP = argument */
    VSM_ACT_INJECT,      /* PendingEvent0 = argument (protection stays) */
    VSM_ACT_EMULATE_READ, /* skip the instruction and set the destination register (arg = HV reg name) to 0x5EC0 */
};

struct vsm_mailbox {
    volatile uint32_t op;
    volatile uint32_t fast;
    volatile uint64_t arg[6];
    volatile uint64_t ret[4];
};

/* Per-VP record of what VTL1 saw (shared memory, read by VTL0 checks). */
struct vsm_vp_log {
    volatile uint32_t entries[4];        /* count per entry reason */
    volatile uint32_t last_reason;
    volatile uint32_t intercepts;        /* GPA intercept messages handled */
    volatile uint32_t sint0_irqs;        /* SINT0 interrupts taken */
    volatile uint32_t timer_irqs;        /* VTL1 APIC timer interrupts */
    volatile uint32_t ipi_irqs[4];       /* VTL1 IPI vectors 0xA0..0xA3 */
    volatile uint32_t action;            /* enum vsm_action */
    volatile uint64_t action_arg;
    volatile uint64_t action_status;     /* status of the hypercall the action made */
    struct hv_gpa_intercept last_msg;    /* copy of the last intercept message */
    volatile uint32_t ready;
    volatile uint64_t timer_irq_rip;     /* VTL1 RIP interrupted by the timer */
    volatile uint32_t initial_svr;       /* VTL1's APIC SVR as it first ran (before it touched it) */
};

extern struct vsm_mailbox vsm_mbox[VSM_MAX_VPS];
extern struct vsm_vp_log vsm_log[VSM_MAX_VPS];
extern struct vsm_regs vsm_vtl1_entry_regs[VSM_MAX_VPS]; /* VTL1: GPRs/XMM at its last entry */
extern struct vsm_regs vsm_vtl1_load[VSM_MAX_VPS];       /* VTL1: GPRs/XMM to load before VSM_OP_SET_RETURN's return */
extern uint64_t vsm_code_page_offsets;                   /* as VTL0 read it */
extern uint64_t vsm_vtl1_code_page_offsets;              /* as VTL1 read it */

#define VSM_SINT0_VECTOR 0x30
#define VSM_VTL1_TIMER_VECTOR 0x31
#define VSM_VTL1_IPI_VECTOR 0xA0 /* 0xA0..0xA3 counted in vsm_log.ipi_irqs */

/* ---- hypercalls from either VTL (the current VTL's own hypercall page) -- */
bool vsm_in_vtl1(void);
uint64_t vsm_hypercall(uint64_t control, uint64_t in_gpa, uint64_t out_gpa);
/* Per-(VTL, VP) page-aligned hypercall input/output pages. */
void *vsm_in_page(void);
void *vsm_out_page(void);
uint32_t vsm_vp_index(void);

/* HvCallGetVpRegisters / SetVpRegisters for one register of VP_INDEX_SELF. Return status. */
uint16_t hv_get_vp_register(uint8_t vtl, uint32_t name, uint64_t *lo, uint64_t *hi);
uint16_t hv_get_vp_register_of(uint32_t vp, uint8_t vtl, uint32_t name, uint64_t *lo, uint64_t *hi);
uint16_t hv_set_vp_register(uint8_t vtl, uint32_t name, uint64_t lo, uint64_t hi);
uint16_t hv_set_vp_register_of(uint32_t vp, uint8_t vtl, uint32_t name, uint64_t lo, uint64_t hi);
/* Shorthand: the low 64 bits, ~0 on failure. */
uint64_t hv_get_reg64(uint8_t vtl, uint32_t name);
/* HvCallModifyVtlProtectionMask over n pages starting at gpa (target VTL input vtl). */
uint16_t hv_modify_vtl_protection(uint64_t gpa, int n, uint32_t mask, uint8_t vtl);
/* HvCallTranslateVirtualAddress: returns status; *result and *gpa_page set on success. */
uint16_t hv_translate_va(uint32_t vp, uint64_t gva, uint64_t flags, uint64_t *result, uint64_t *gpa_page);
uint16_t hv_enable_partition_vtl(uint64_t partition, uint8_t vtl, uint8_t flags);
uint16_t hv_enable_vp_vtl(uint64_t partition, uint32_t vp, uint8_t vtl, const struct hv_initial_vp_context *ctx);
uint16_t hv_start_vp(uint32_t vp, uint8_t vtl, const struct hv_initial_vp_context *ctx);

/* A context like the caller's own (CR0/3/4, EFER, PAT, flat segments, runtime GDT)
 * with the given RIP/RSP/IDT. */
void vsm_build_context(struct hv_initial_vp_context *ctx, uint64_t rip, uint64_t rsp, uint64_t idt_base,
                       uint16_t idt_limit, uint64_t gdt_base, uint16_t gdt_limit);
/* The context vsm_init uses to enable VTL1 on a VP (entry stub, VTL1 stack/GDT/IDT). */
void vsm_vtl1_context(struct hv_initial_vp_context *ctx, uint32_t vp);

/* ---- VTL0 side --------------------------------------------------------- */
/* Hyper-V setup + enable VTL1 on the partition and this VP + the first VTL call.
 * verbose: print "ok"/"FAIL" check lines for each step. Returns true on success. */
bool vsm_init(bool verbose);
/* Just the Hyper-V part (hv_init + VsmCodePageOffsets); vsm_init calls it. */
bool vsm_hv_setup(void);
/* For an AP (already in VTL0 with VTL1 enabled on it): the first VTL call. */
bool vsm_init_ap(void);
/* VTL call with control 0; returns RAX as VTL0 sees it after the return. */
uint64_t vtl_call(void);
/* VTL call with arbitrary control in RCX (negative tests). */
uint64_t vtl_call_control(uint64_t control);
/* VTL call that loads every shared register from load (RAX/RCX excepted: the stub
 * uses them) and captures them all after the return. */
void vtl_call_regs(const struct vsm_regs *load, struct vsm_regs *capture);
/* VTL return issued from VTL0 (must #UD): true if it raised #UD. */
bool vtl0_try_vtl_return(void);
/* VTL call that must #UD (e.g. before VTL1 exists): true if it raised #UD. */
bool vtl0_try_vtl_call(uint64_t control);
/* Request to VTL1 on this VP; returns ret[0].  *ret (if given) gets ret[0..3]. */
uint64_t vtl1_op(enum vsm_op op, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t ret[4]);
/* Start VP vp in VTL0 with HvCallStartVirtualProcessor on an AP stack; it runs fn(vp)
 * with the runtime IDT and its APIC enabled.  Returns the hypercall status. */
uint16_t vsm_start_ap(uint32_t vp, void (*fn)(uint32_t vp));
/* Address of the entry points (hypercall page + offsets) VTL0 uses. */
extern uint64_t vsm_vtl0_call_addr, vsm_vtl0_return_addr;

/* ---- VTL1 side --------------------------------------------------------- */
/* VTL return (control: bit 0 = fast). load (may be NULL) is loaded into the shared
 * registers first; on the next entry every shared register is stored in capture. */
void vtl1_return_regs(uint64_t control, const struct vsm_regs *load, struct vsm_regs *capture);
void vtl_return(bool fast);
struct hv_vp_assist_page *vsm_vtl1_assist(uint32_t vp);
void *vsm_vtl1_simp(uint32_t vp);
/* Optional guest hooks (weak): VTL1 per-VP init, VSM_OP_USER handler. */
void vtl1_user_init(uint32_t vp);
uint64_t vtl1_user_op(uint32_t vp, struct vsm_mailbox *m);
/* Optional guest hook (weak) for VTL1 exceptions 0..31: return true if handled (it may change
 * f->rip); false falls through to the default (rdmsr_safe/wrmsr_safe fixups, else report and exit). */
bool vtl1_exception_hook(struct int_frame *f);
/* VTL1-side IRQ handler table (its own IDT). */
void vtl1_set_irq_handler(uint8_t vector, irq_handler_t fn);

/* ---- checks ---------------------------------------------------------- */
/* hv_check with "got in {a, b}" (for codes where sources disagree). */
void vsm_check_either(const char *name, uint64_t got, uint64_t a, uint64_t b);
/* Compare 256-byte messages; prints the first difference. */
void vsm_check_bytes(const char *name, const void *got, const void *want, size_t n);

#endif
