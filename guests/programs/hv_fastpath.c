/*
 * hv_fastpath.c - the hypercalls a machine that records nothing answers in C (HvCallNotifyLongSpinWait
 * as a fast call, HvCallGetVpIndexFromApicId as a memory call) beside the variants of the same calls
 * it must leave to the Python dispatcher, each checked against the TLFS result. The guest counts the
 * calls the fast path may answer and prints "eligible N"; the test compares that with the machine's
 * own count (docs/architecture.md, "Exit paths in C").
 *
 * cmdline: cpus=N (the machine's VP count; APIC ID == VP index), spins=K (default 50)
 */
#include "hv.h"

#define RAM_END_GUESS 0x40000000ull /* above the RAM the tests give the guest */
#define FILL 0xEEEEEEEEu

static uint8_t in_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t out_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t eligible;
static uint32_t cpus;
static volatile bool trap_ud;

static void apic_input(uint8_t *p, uint64_t partition, uint8_t vtl_byte, const uint32_t *ids, unsigned n)
{
    memset(p, 0, 16);
    *(uint64_t *)p = partition;
    p[8] = vtl_byte;
    memcpy(p + 16, ids, 4 * (size_t)n);
}

static void fill_out(uint8_t *p, unsigned words)
{
    for (unsigned i = 0; i < words; i++)
        ((uint32_t *)p)[i] = FILL;
}

static uint64_t apic_call(unsigned count, unsigned start, uint64_t in, uint64_t out)
{
    return hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(count) | HV_CONTROL_REP_START(start),
                        in, out);
}

/* What C answers: every rep count and rep start of a valid request, and the spin-wait hint. */
static void answered_in_c(void)
{
    uint64_t spins = cmdline_get_uint("spins", 50);
    bool all_zero = true;
    for (uint64_t i = 0; i < spins; i++)
        all_zero &= hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, i, 0) == 0;
    eligible += spins;
    hv_check_true("spin_result_zero", all_zero);

    uint32_t ids[8];
    for (unsigned i = 0; i < 8; i++)
        ids[i] = (i * 7 + 1) % cpus;
    bool results = true, outputs = true, untouched = true;
    for (unsigned count = 1; count <= 8; count++) {
        for (unsigned start = 0; start < count; start++) {
            apic_input(in_page, HV_PARTITION_ID_SELF, 0, ids, count);
            fill_out(out_page, 16);
            uint64_t r = apic_call(count, start, (uint64_t)in_page, (uint64_t)out_page);
            eligible++;
            results &= r == (uint64_t)count << 32; /* SUCCESS, every rep completed */
            for (unsigned i = 0; i < 16; i++) {
                uint32_t word = ((uint32_t *)out_page)[i];
                if (i >= start && i < count)
                    outputs &= word == ids[i];
                else
                    untouched &= word == FILL;
            }
        }
    }
    hv_check_true("apic_results", results);
    hv_check_true("apic_outputs_at_absolute_places", outputs);
    hv_check_true("apic_nothing_else_written", untouched);
    /* Blocks at the end of their pages, input after output. */
    uint32_t one = cpus - 1;
    apic_input(out_page + HV_PAGE_SIZE - 24, HV_PARTITION_ID_SELF, 0, &one, 1);
    fill_out(in_page, 1);
    uint64_t r = apic_call(1, 0, (uint64_t)out_page + HV_PAGE_SIZE - 24, (uint64_t)in_page);
    eligible++;
    hv_check("apic_page_end_result", r, 1ull << 32);
    hv_check("apic_page_end_output", *(uint32_t *)in_page, cpus - 1);
}

static bool raw_ud_handler(struct int_frame *f)
{
    trap_ud = true;
    f->rip += 2; /* over the `out 0x58, al` the VMM left RIP on */
    return true;
}

/* The hypercall trap without the hypercall page (`out 0x58, al`), for a VTL whose page is off. */
static uint64_t raw_trap(uint64_t control, uint64_t in, uint64_t out)
{
    uint64_t result = ~0ull;
    register uint64_t r8 __asm__("r8") = out;
    __asm__ volatile("outb %%al, $0x58" : "+a"(result), "+c"(control), "+d"(in), "+r"(r8) : : "memory", "cc");
    return result;
}

/* What C must leave to the dispatcher, and the dispatcher's answer. */
static void answered_in_python(void)
{
    uint64_t in = (uint64_t)in_page, out = (uint64_t)out_page;
    uint32_t ids[4] = {0, cpus - 1, cpus, 0};
    apic_input(in_page, HV_PARTITION_ID_SELF, 0, ids, 4);
    fill_out(out_page, 4);
    uint64_t r = apic_call(4, 0, in, out);
    hv_check("py_unknown_apic_status", HV_RESULT_STATUS(r), HV_STATUS_INVALID_PARAMETER);
    hv_check("py_unknown_apic_reps", HV_RESULT_REPS(r), 2);
    hv_check("py_unknown_apic_outputs_before", ((uint32_t *)out_page)[1], cpus - 1);
    hv_check("py_unknown_apic_outputs_after", ((uint32_t *)out_page)[2], FILL);
    uint32_t big = 300;
    apic_input(in_page, HV_PARTITION_ID_SELF, 0, &big, 1);
    hv_check("py_apic_id_300", HV_RESULT_STATUS(apic_call(1, 0, in, out)), HV_STATUS_INVALID_PARAMETER);

    apic_input(in_page, 0x1234, 0, ids, 1);
    hv_check("py_other_partition", HV_RESULT_STATUS(apic_call(1, 0, in, out)), HV_STATUS_INVALID_PARTITION_ID);
    apic_input(in_page, HV_PARTITION_ID_SELF, HV_INPUT_VTL_USE_TARGET | 0, ids, 1);
    fill_out(out_page, 1);
    hv_check("py_explicit_own_vtl", apic_call(1, 0, in, out), 1ull << 32);
    hv_check("py_explicit_own_vtl_output", *(uint32_t *)out_page, 0);
    apic_input(in_page, HV_PARTITION_ID_SELF, HV_INPUT_VTL_USE_TARGET | 1, ids, 1);
    hv_check("py_higher_vtl", HV_RESULT_STATUS(apic_call(1, 0, in, out)), HV_STATUS_ACCESS_DENIED);

    apic_input(in_page, HV_PARTITION_ID_SELF, 0, ids, 1);
    hv_check("py_misaligned_input", HV_RESULT_STATUS(apic_call(1, 0, in + 4, out)), HV_STATUS_INVALID_ALIGNMENT);
    hv_check("py_output_crosses_page", HV_RESULT_STATUS(apic_call(4, 0, in, out + HV_PAGE_SIZE - 8)),
             HV_STATUS_INVALID_ALIGNMENT);
    hv_check("py_overlap", HV_RESULT_STATUS(apic_call(1, 0, in, in + 8)), HV_STATUS_INVALID_ALIGNMENT);
    hv_check("py_output_outside_ram", HV_RESULT_STATUS(apic_call(1, 0, in, RAM_END_GUESS)), HV_STATUS_INVALID_ALIGNMENT);
    hv_check("py_rep_count_zero", HV_RESULT_STATUS(apic_call(0, 0, in, out)), HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("py_rep_start_at_count", HV_RESULT_STATUS(apic_call(2, 2, in, out)), HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("py_apic_var_header",
             HV_RESULT_STATUS(hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1) | HV_CONTROL_VAR_HEADER(1),
                                           in, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("py_spin_reserved_bit",
             HV_RESULT_STATUS(hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_RESERVED_27, 1, 0)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("py_spin_rep_count", HV_RESULT_STATUS(hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_REP_COUNT(1), 1, 0)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    *(uint64_t *)in_page = 1;
    hv_check("py_spin_memory_call", HV_RESULT_STATUS(hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT, in, 0)), HV_STATUS_SUCCESS);

    /* The hypercall page off: the trap is #UD for every call, the fast path's too. */
    set_exception_handler(6, raw_ud_handler);
    hv_check("raw_trap_page_on", raw_trap(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 1, 0), 0);
    eligible++;
    uint64_t msr = rdmsr(HV_MSR_HYPERCALL);
    wrmsr(HV_MSR_HYPERCALL, msr & ~(uint64_t)HV_HYPERCALL_ENABLE);
    trap_ud = false;
    raw_trap(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 1, 0);
    hv_check_true("raw_trap_page_off_ud", trap_ud);
    trap_ud = false;
    apic_input(in_page, HV_PARTITION_ID_SELF, 0, ids, 1);
    raw_trap(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(1), in, out);
    hv_check_true("raw_trap_page_off_apic_ud", trap_ud);
    wrmsr(HV_MSR_HYPERCALL, msr);
    trap_ud = false;
    hv_check("raw_trap_page_on_again", raw_trap(HVCALL_NOTIFY_LONG_SPIN_WAIT | HV_CONTROL_FAST, 1, 0), 0);
    hv_check_true("raw_trap_page_on_again_no_ud", !trap_ud);
    eligible++;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    cpus = (uint32_t)cmdline_get_uint("cpus", 1);
    answered_in_c();
    answered_in_python();
    printf("eligible %lu\n", eligible);
    hv_finish();
}
