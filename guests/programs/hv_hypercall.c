/*
 * hv_hypercall.c - the hypercall ABI from the guest: status codes for bad input
 * (unknown code, reserved bits, rep fields, variable header, alignment, page
 * crossing, overlap, GPAs outside RAM), memory and fast calls, rep calls with a
 * non-zero rep start and their continuation, XMM fast input and output.
 *
 * cmdline: xmm=off -> the VMM runs with --hv-disable xmm-input: XMM fast calls must #UD.
 */
#include "hv.h"

#define RAM_END_GUESS 0x40000000ull /* above the 256 MiB the tests give the guest */

static uint8_t in_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t out_page[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));

static uint16_t status_of(uint64_t r) { return HV_RESULT_STATUS(r); }

/* GetVpIndexFromApicId input at p: header (partition id, vtl) then APIC ids. */
static void apic_id_input(void *p, uint64_t partition, uint8_t vtl, const uint32_t *ids, int n)
{
    uint64_t *q = p;
    q[0] = partition;
    q[1] = vtl;
    memcpy((uint8_t *)p + 16, ids, 4 * (size_t)n);
}

static uint64_t vp_index_call(uint64_t control_extra, uint64_t in, uint64_t out)
{
    return hv_hypercall(HVCALL_GET_VP_INDEX_FROM_APIC_ID | control_extra, in, out);
}

static void control_word_checks(void)
{
    uint64_t out = (uint64_t)out_page, in = (uint64_t)in_page;
    hv_check("unknown_code_0xfe", status_of(hv_hypercall(0x00FE, in, out)), HV_STATUS_INVALID_HYPERCALL_CODE);
    hv_check("unknown_code_0x7fff", status_of(hv_hypercall(0x7FFF, in, out)), HV_STATUS_INVALID_HYPERCALL_CODE);
    hv_check("unknown_code_fast", status_of(hv_fast(0x00FE, 0, 0)), HV_STATUS_INVALID_HYPERCALL_CODE);
    hv_check("unimplemented_create_partition", status_of(hv_hypercall(HVCALL_CREATE_PARTITION, in, out)),
             HV_STATUS_INVALID_HYPERCALL_CODE);
    hv_check("reserved_bit_27", status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_RESERVED_27, 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("reserved_bit_44", status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_RESERVED_44, 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("reserved_bit_60", status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_RESERVED_60, 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("nested_bit", status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_NESTED, 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("rep_count_on_simple_call",
             status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_REP_COUNT(1), 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("rep_start_on_simple_call",
             status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_REP_START(1), 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("var_header_on_fixed_call",
             status_of(hv_hypercall(HVCALL_GET_PARTITION_ID | HV_CONTROL_VAR_HEADER(1), 0, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    uint32_t ids[1] = {0};
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0, ids, 1);
    hv_check("rep_call_zero_count", status_of(vp_index_call(0, in, out)), HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("rep_start_equals_count",
             status_of(vp_index_call(HV_CONTROL_REP_COUNT(1) | HV_CONTROL_REP_START(1), in, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_check("rep_start_beyond_count",
             status_of(vp_index_call(HV_CONTROL_REP_COUNT(2) | HV_CONTROL_REP_START(5), in, out)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
}

static void simple_calls(void)
{
    uint64_t out = (uint64_t)out_page;
    memset(out_page, 0xEE, 16);
    uint64_t r = hv_hypercall(HVCALL_GET_PARTITION_ID, 0, out);
    hv_check("get_partition_id_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("get_partition_id_value", *(uint64_t *)out_page, 1);
    hv_check("get_partition_id_output_size", *(uint64_t *)(out_page + 8), 0xEEEEEEEEEEEEEEEEull);
    uint64_t rdx = 0, r8 = 0;
    r = hv_fast_out(HVCALL_GET_PARTITION_ID, &rdx, &r8);
    hv_check("get_partition_id_fast_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("get_partition_id_fast_rdx", rdx, 1);

    *(uint64_t *)in_page = 100; /* spin count */
    hv_check("spin_wait_memory", status_of(hv_hypercall(HVCALL_NOTIFY_LONG_SPIN_WAIT, (uint64_t)in_page, 0)),
             HV_STATUS_SUCCESS);
    hv_check("spin_wait_fast", status_of(hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, 100, 0)), HV_STATUS_SUCCESS);
    hv_check("spin_wait_result_reps", HV_RESULT_REPS(hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, 1, 0)), 0);
}

static void memory_checks(void)
{
    uint64_t in = (uint64_t)in_page, out = (uint64_t)out_page;
    uint32_t ids[2] = {0, 0};
    hv_check("output_misaligned", status_of(hv_hypercall(HVCALL_GET_PARTITION_ID, 0, out + 4)),
             HV_STATUS_INVALID_ALIGNMENT);
    apic_id_input(in_page + 8, HV_PARTITION_ID_SELF, 0, ids, 1);
    hv_check("input_misaligned", status_of(vp_index_call(HV_CONTROL_REP_COUNT(1), in + 4, out)),
             HV_STATUS_INVALID_ALIGNMENT);
    /* 16 + 2 * 4 = 24 bytes starting 16 bytes before the end of in_page: crosses into out_page. */
    apic_id_input(in_page + HV_PAGE_SIZE - 16, HV_PARTITION_ID_SELF, 0, ids, 0);
    hv_check("input_crosses_page", status_of(vp_index_call(HV_CONTROL_REP_COUNT(2), in + HV_PAGE_SIZE - 16, out)),
             HV_STATUS_INVALID_ALIGNMENT);
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0, ids, 2);
    hv_check("output_ends_at_page_end", status_of(vp_index_call(HV_CONTROL_REP_COUNT(2), in, out + HV_PAGE_SIZE - 8)),
             HV_STATUS_SUCCESS); /* 2 x 4 bytes in the last 8: fits exactly */
    hv_check("output_crosses_page_by_4",
             status_of(vp_index_call(HV_CONTROL_REP_COUNT(4), in, out + HV_PAGE_SIZE - 8)),
             HV_STATUS_INVALID_ALIGNMENT);
    hv_check("input_output_overlap", status_of(vp_index_call(HV_CONTROL_REP_COUNT(2), in, in + 16)),
             HV_STATUS_INVALID_ALIGNMENT);
    hv_check("input_output_same", status_of(vp_index_call(HV_CONTROL_REP_COUNT(2), in, in)),
             HV_STATUS_INVALID_ALIGNMENT);
    hv_check("output_outside_ram", status_of(hv_hypercall(HVCALL_GET_PARTITION_ID, 0, RAM_END_GUESS)),
             HV_STATUS_INVALID_ALIGNMENT);
    hv_check("input_outside_ram", status_of(vp_index_call(HV_CONTROL_REP_COUNT(1), RAM_END_GUESS, out)),
             HV_STATUS_INVALID_ALIGNMENT);
}

static void rep_checks(void)
{
    uint64_t in = (uint64_t)in_page, out = (uint64_t)out_page;
    uint32_t *res = (uint32_t *)out_page;
    uint32_t one[1] = {0};
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0, one, 1);
    memset(out_page, 0xEE, 64);
    uint64_t r = vp_index_call(HV_CONTROL_REP_COUNT(1), in, out);
    hv_check("vp_index_from_apic_id_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("vp_index_from_apic_id_reps", HV_RESULT_REPS(r), 1);
    hv_check("vp_index_from_apic_id_value", res[0], 0);
    hv_check("vp_index_from_apic_id_output_size", res[1], 0xEEEEEEEE);

    apic_id_input(in_page, 5, 0, one, 1);
    hv_check("bad_partition_id", status_of(vp_index_call(HV_CONTROL_REP_COUNT(1), in, out)),
             HV_STATUS_INVALID_PARTITION_ID);
    apic_id_input(in_page, 1, 0, one, 1);
    hv_check("own_partition_id", status_of(vp_index_call(HV_CONTROL_REP_COUNT(1), in, out)), HV_STATUS_SUCCESS);
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0xE0, one, 1);
    hv_check("input_vtl_reserved_bits", status_of(vp_index_call(HV_CONTROL_REP_COUNT(1), in, out)),
             HV_STATUS_INVALID_PARAMETER);
    apic_id_input(in_page, HV_PARTITION_ID_SELF, HV_INPUT_VTL_USE_TARGET | 1, one, 1);
    hv_check("input_vtl_higher_than_caller", status_of(vp_index_call(HV_CONTROL_REP_COUNT(1), in, out)),
             HV_STATUS_ACCESS_DENIED);

    /* A bad element stops the call: reps completed says how far it got. */
    uint32_t four[4] = {0, 0, 77, 0};
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0, four, 4);
    memset(out_page, 0xEE, 64);
    r = vp_index_call(HV_CONTROL_REP_COUNT(4), in, out);
    hv_check("bad_apic_id_status", status_of(r), HV_STATUS_INVALID_PARAMETER);
    hv_check("bad_apic_id_reps_completed", HV_RESULT_REPS(r), 2);
    hv_check("bad_apic_id_outputs_before", res[0] | res[1], 0);
    hv_check("bad_apic_id_output_not_written", res[2], 0xEEEEEEEE);
    /* Continue it the TLFS way: fix the element, re-issue with rep start = reps completed. */
    four[2] = 0;
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0, four, 4);
    r = vp_index_call(HV_CONTROL_REP_COUNT(4) | HV_CONTROL_REP_START(HV_RESULT_REPS(r)), in, out);
    hv_check("continuation_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("continuation_reps", HV_RESULT_REPS(r), 4);
    hv_check("continuation_outputs", res[2] | res[3], 0);

    /* Rep start 1: element 0 is neither read nor written. */
    uint32_t three[3] = {99, 0, 0};
    apic_id_input(in_page, HV_PARTITION_ID_SELF, 0, three, 3);
    memset(out_page, 0xEE, 64);
    r = vp_index_call(HV_CONTROL_REP_COUNT(3) | HV_CONTROL_REP_START(1), in, out);
    hv_check("rep_start_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("rep_start_reps", HV_RESULT_REPS(r), 3);
    hv_check("rep_start_element0_untouched", res[0], 0xEEEEEEEE);
    hv_check("rep_start_outputs", res[1] | res[2], 0);

    /* Flush list: a rep call whose elements are GVAs. */
    uint64_t *q = (uint64_t *)in_page;
    q[0] = 0;
    q[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    q[2] = 1;
    q[3] = 0x200000;
    q[4] = 0x201000;
    r = hv_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | HV_CONTROL_REP_COUNT(2), in, 0);
    hv_check("flush_list_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("flush_list_reps", HV_RESULT_REPS(r), 2);
    q[1] = HV_FLUSH_NON_GLOBAL_MAPPINGS_ONLY;
    hv_check("flush_list_non_global_invalid",
             status_of(hv_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_LIST | HV_CONTROL_REP_COUNT(2), in, 0)),
             HV_STATUS_INVALID_PARAMETER);
    q[1] = 1ull << 7; /* an undefined flag bit: ignored, as KVM does (docs/vsm.md, compatibility table) */
    hv_check("flush_space_undefined_flag_ignored",
             status_of(hv_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, in, 0)), HV_STATUS_SUCCESS);
    q[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    hv_check("flush_space_memory", status_of(hv_hypercall(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE, in, 0)),
             HV_STATUS_SUCCESS);
}

static void xmm_checks(bool xmm_enabled)
{
    uint64_t regs[HV_XMM_REGS];
    uint64_t r;
    bool returned;

    /* GetVpIndexFromApicId, 2 reps: 24 bytes of input (RDX, R8, XMM0 low), 8 bytes of output
     * in the pair after the input (XMM1 low). */
    memset(regs, 0xEE, sizeof(regs));
    regs[0] = HV_PARTITION_ID_SELF;
    regs[1] = 0;
    regs[2] = 0; /* APIC ids 0, 0 */
    returned = hv_xmm_call_ud(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(2), regs, &r);
    if (!xmm_enabled) {
        hv_check("xmm_input_disabled_ud", returned, 0);
        hv_check("xmm_input_disabled_ud_rip", hv_last_ud_rip, 0);
        /* FlushVirtualAddressSpaceEx with a sparse set: 32 bytes, needs XMM0. */
        regs[0] = 0;
        regs[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
        regs[2] = HV_GENERIC_SET_SPARSE_4K;
        regs[3] = 1;
        regs[4] = 1;
        returned = hv_xmm_call_ud(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX | HV_CONTROL_VAR_HEADER(1), regs, &r);
        hv_check("xmm_input_disabled_flush_ex_ud", returned, 0);
        hv_check("register_fast_call_still_ok", status_of(hv_fast(HVCALL_NOTIFY_LONG_SPIN_WAIT, 1, 0)),
                 HV_STATUS_SUCCESS);
        return;
    }
    hv_check("xmm_vp_index_returned", returned, 1);
    hv_check("xmm_vp_index_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("xmm_vp_index_reps", HV_RESULT_REPS(r), 2);
    hv_check("xmm_output_in_xmm1", regs[4], 0);
    hv_check("xmm_unused_registers_preserved", regs[6] & regs[13], 0xEEEEEEEEEEEEEEEEull);
    hv_check("xmm_input_preserved_xmm0", regs[2], 0);

    /* Rep start 1 with fast output: element 1's output lands at its absolute place. */
    memset(regs, 0xEE, sizeof(regs));
    regs[0] = HV_PARTITION_ID_SELF;
    regs[1] = 0;
    regs[2] = 99; /* APIC ids 99 (skipped), 0 */
    r = hv_xmm_call(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(2) | HV_CONTROL_REP_START(1), regs);
    hv_check("xmm_rep_start_status", status_of(r), HV_STATUS_SUCCESS);
    hv_check("xmm_rep_start_output", regs[4], 0x00000000EEEEEEEEull);

    /* Too much input for registers. */
    memset(regs, 0, sizeof(regs));
    regs[0] = HV_PARTITION_ID_SELF;
    r = hv_xmm_call(HVCALL_GET_VP_INDEX_FROM_APIC_ID | HV_CONTROL_REP_COUNT(30), regs);
    hv_check("xmm_input_too_large", status_of(r), HV_STATUS_INVALID_HYPERCALL_INPUT);
    r = hv_xmm_call(HVCALL_POST_MESSAGE, regs);
    hv_check("xmm_post_message_too_large", status_of(r), HV_STATUS_INVALID_HYPERCALL_INPUT);

    /* XMM input only: FlushVirtualAddressSpaceEx with one sparse bank (32 bytes). */
    memset(regs, 0, sizeof(regs));
    regs[0] = 0;
    regs[1] = HV_FLUSH_ALL_VIRTUAL_ADDRESS_SPACES;
    regs[2] = HV_GENERIC_SET_SPARSE_4K;
    regs[3] = 1;
    regs[4] = 1;
    r = hv_xmm_call(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX | HV_CONTROL_VAR_HEADER(1), regs);
    hv_check("xmm_flush_ex_status", status_of(r), HV_STATUS_SUCCESS);
    regs[2] = 7; /* unknown set format */
    r = hv_xmm_call(HVCALL_FLUSH_VIRTUAL_ADDRESS_SPACE_EX | HV_CONTROL_VAR_HEADER(1), regs);
    hv_check("xmm_flush_ex_bad_format", status_of(r), HV_STATUS_INVALID_PARAMETER);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    bool xmm = !cmdline_is("xmm", "off");
    printf("hypercall test xmm=%s\n", xmm ? "on" : "off");
    control_word_checks();
    simple_calls();
    memory_checks();
    rep_checks();
    xmm_checks(xmm);
    hv_finish();
}
