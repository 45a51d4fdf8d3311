/*
 * hv_synic.c - SynIC messages and events through vsmtrace's loopback connections:
 * HvCallPostMessage delivery into the SIM slot, MessagePending and redelivery after
 * EOM, the per-port buffer limit, auto-EOI and polling SINTs, HvCallSignalEvent into
 * the SIEF page, and the status codes of bad input.
 *
 * cmdline: privileges=off -> the VMM hides post-messages and signal-events: both calls
 * must return HV_STATUS_ACCESS_DENIED.
 */
#include "apic.h"
#include "hv.h"

#define SINT VSMTRACE_LOOPBACK_SINT
#define SINT_VECTOR 0x52
#define MSG_CONN VSMTRACE_LOOPBACK_MESSAGE_CONNECTION
#define EVT_CONN VSMTRACE_LOOPBACK_EVENT_CONNECTION

static uint8_t simp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t siefp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static struct hv_post_message_input post_in __attribute__((aligned(HV_PAGE_SIZE)));
static uint64_t event_in[1] __attribute__((aligned(8)));

static volatile uint32_t irq_count;
static volatile bool irq_consumes, irq_sends_eoi = true;
static uint32_t consumed_types[32];

static struct hv_message *slot(void) { return hv_sint_slot(simp, SINT); }

static void sint_irq(struct int_frame *f)
{
    (void)f;
    uint32_t i = irq_count;
    if (irq_consumes) {
        if (i < ARRAY_SIZE(consumed_types))
            consumed_types[i] = slot()->type;
        hv_message_done(slot());
    }
    irq_count = i + 1;
    if (irq_sends_eoi)
        apic_eoi();
}

/* Let pending interrupts in: exits with IF=1 give the VMM a chance to inject. */
static void let_interrupts_in(void)
{
    sti();
    for (int i = 0; i < 4; i++)
        (void)hv_ref_time();
    cli();
}

static uint16_t post(uint32_t conn, uint32_t type, uint32_t size, uint8_t fill)
{
    memset(&post_in, 0, sizeof(post_in));
    post_in.connection_id = conn;
    post_in.message_type = type;
    post_in.payload_size = size;
    memset(post_in.payload, fill, size > HV_MESSAGE_PAYLOAD_MAX ? HV_MESSAGE_PAYLOAD_MAX : size);
    uint16_t s = HV_RESULT_STATUS(hv_hypercall(HVCALL_POST_MESSAGE, (uint64_t)&post_in, 0));
    let_interrupts_in();
    return s;
}

static uint16_t signal_fast(uint32_t conn, uint32_t flag, uint32_t reserved)
{
    uint16_t s = HV_RESULT_STATUS(hv_fast(HVCALL_SIGNAL_EVENT, conn | ((uint64_t)flag << 32) | ((uint64_t)reserved << 48), 0));
    let_interrupts_in();
    return s;
}

static bool sief_bit(uint32_t flag) { return (siefp[SINT * 256 + flag / 8] >> (flag % 8)) & 1; }

static void delivery(void)
{
    irq_consumes = false;
    irq_count = 0;
    hv_check("post_status", post(MSG_CONN, 0x1234, 16, 0xAB), HV_STATUS_SUCCESS);
    hv_check("post_interrupt", irq_count, 1);
    struct hv_message *m = slot();
    hv_check("message_type", m->type, 0x1234);
    hv_check("message_payload_size", m->payload_size, 16);
    hv_check("message_origination_id", m->origination_id, MSG_CONN);
    hv_check("message_payload", m->payload[0] == 0xAB && m->payload[15] == 0xAB && m->payload[16] == 0, 1);
    hv_check("message_not_pending", m->flags & HV_MESSAGE_FLAG_PENDING, 0);

    /* Slot full: the next messages queue and the slot gets MessagePending. */
    hv_check("post_while_full_status", post(MSG_CONN, 0x2222, 8, 0x22), HV_STATUS_SUCCESS);
    hv_check("post_while_full_status_2", post(MSG_CONN, 0x3333, 8, 0x33), HV_STATUS_SUCCESS);
    hv_check("queued_no_interrupt", irq_count, 1);
    hv_check("slot_keeps_first", m->type, 0x1234);
    hv_check("message_pending_set", m->flags & HV_MESSAGE_FLAG_PENDING, HV_MESSAGE_FLAG_PENDING);
    /* Freeing the slot alone does nothing until EOM. */
    m->type = 0;
    let_interrupts_in();
    hv_check("no_redelivery_without_eom", m->type, 0);
    hv_eom();
    let_interrupts_in();
    hv_check("redelivery_after_eom", m->type, 0x2222);
    hv_check("redelivery_interrupt", irq_count, 2);
    hv_check("redelivered_pending_more", m->flags & HV_MESSAGE_FLAG_PENDING, HV_MESSAGE_FLAG_PENDING);
    hv_message_done(m);
    let_interrupts_in();
    hv_check("third_message", m->type, 0x3333);
    hv_check("third_interrupt", irq_count, 3);
    hv_check("third_not_pending", m->flags & HV_MESSAGE_FLAG_PENDING, 0);
    hv_message_done(m);
    let_interrupts_in();
    hv_check("queue_empty", m->type, 0);
}

static void buffer_limit(void)
{
    irq_consumes = false;
    irq_count = 0;
    uint16_t s = post(MSG_CONN, 0x100, 4, 0); /* fills the slot */
    int queued = 0;
    for (int i = 1; i <= 16; i++)
        queued += post(MSG_CONN, 0x100 + i, 4, (uint8_t)i) == HV_STATUS_SUCCESS;
    hv_check("sixteen_queued", s == HV_STATUS_SUCCESS && queued == 16, 1);
    hv_check("seventeenth_insufficient_buffers", post(MSG_CONN, 0x200, 4, 0), HV_STATUS_INSUFFICIENT_BUFFERS);
    /* Drain: every message arrives, in order (the loop consumes, the handler only counts). */
    int in_order = 0;
    for (int i = 0; i < 17; i++) {
        if (slot()->type == (uint32_t)(0x100 + i))
            in_order++;
        hv_message_done(slot());
        let_interrupts_in();
    }
    hv_check("drained_in_order", in_order, 17);
    hv_check("drained_empty", slot()->type, 0);
    hv_check("drained_interrupts", irq_count, 17);
}

static void sint_modes(void)
{
    /* Auto-EOI: the handler sends no EOI, yet the next message still interrupts. */
    irq_consumes = true;
    irq_sends_eoi = false;
    irq_count = 0;
    hv_sint_set(SINT, SINT_VECTOR, HV_SINT_AUTO_EOI);
    post(MSG_CONN, 0x41, 4, 0);
    post(MSG_CONN, 0x42, 4, 0);
    hv_check("auto_eoi_two_interrupts", irq_count, 2);
    hv_check("auto_eoi_types", consumed_types[0] == 0x41 && consumed_types[1] == 0x42, 1);
    irq_sends_eoi = true;

    /* Polling: the message lands, no interrupt. */
    irq_count = 0;
    hv_sint_set(SINT, SINT_VECTOR, HV_SINT_POLLING);
    post(MSG_CONN, 0x51, 4, 0);
    hv_check("polling_no_interrupt", irq_count, 0);
    hv_check("polling_message_in_slot", slot()->type, 0x51);
    hv_message_done(slot());
    hv_sint_set(SINT, SINT_VECTOR, 0);
}

static void post_errors(void)
{
    irq_consumes = true;
    hv_check("unknown_connection", post(0x123, 1, 4, 0), HV_STATUS_INVALID_CONNECTION_ID);
    hv_check("event_connection_for_message", post(EVT_CONN, 1, 4, 0), HV_STATUS_INVALID_PORT_ID);
    hv_check("message_type_zero", post(MSG_CONN, 0, 4, 0), HV_STATUS_INVALID_PARAMETER);
    hv_check("message_type_hypervisor", post(MSG_CONN, 0x80000001u, 4, 0), HV_STATUS_INVALID_PARAMETER);
    hv_check("payload_too_large", post(MSG_CONN, 1, 241, 0), HV_STATUS_INVALID_PARAMETER);
    hv_check("payload_max_ok", post(MSG_CONN, 1, 240, 0x77), HV_STATUS_SUCCESS);
    hv_message_done(slot());
    hv_check("post_misaligned_input",
             HV_RESULT_STATUS(hv_hypercall(HVCALL_POST_MESSAGE, (uint64_t)&post_in + 4, 0)), HV_STATUS_INVALID_ALIGNMENT);
    hv_check("post_fast_too_large", HV_RESULT_STATUS(hv_fast(HVCALL_POST_MESSAGE, MSG_CONN, 0)),
             HV_STATUS_INVALID_HYPERCALL_INPUT);
    wrmsr(HV_MSR_SIMP, (uint64_t)simp); /* message page off */
    hv_check("post_simp_disabled", post(MSG_CONN, 1, 4, 0), HV_STATUS_INVALID_SYNIC_STATE);
    wrmsr(HV_MSR_SIMP, (uint64_t)simp | HV_OVERLAY_ENABLE);
    wrmsr(HV_MSR_SCONTROL, 0);
    hv_check("post_synic_disabled", post(MSG_CONN, 1, 4, 0), HV_STATUS_INVALID_SYNIC_STATE);
    wrmsr(HV_MSR_SCONTROL, HV_SCONTROL_ENABLE);
}

static void events(void)
{
    irq_consumes = false;
    irq_count = 0;
    hv_check("signal_fast_status", signal_fast(EVT_CONN, 3, 0), HV_STATUS_SUCCESS);
    hv_check("signal_flag_set", sief_bit(3), 1);
    hv_check("signal_interrupt", irq_count, 1);
    hv_check("signal_again_status", signal_fast(EVT_CONN, 3, 0), HV_STATUS_SUCCESS);
    hv_check("signal_again_no_interrupt", irq_count, 1);
    siefp[SINT * 256 + 0] = 0;
    event_in[0] = EVT_CONN | (3ull << 32);
    uint16_t s = HV_RESULT_STATUS(hv_hypercall(HVCALL_SIGNAL_EVENT, (uint64_t)event_in, 0));
    let_interrupts_in();
    hv_check("signal_memory_status", s, HV_STATUS_SUCCESS);
    hv_check("signal_after_clear_interrupts", irq_count, 2);
    hv_check("signal_high_flag", signal_fast(EVT_CONN, 2047, 0), HV_STATUS_SUCCESS);
    hv_check("signal_high_flag_set", sief_bit(2047), 1);
    hv_check("signal_flag_out_of_range", signal_fast(EVT_CONN, 2048, 0), HV_STATUS_INVALID_PARAMETER);
    hv_check("signal_unknown_connection", signal_fast(0x123, 0, 0), HV_STATUS_INVALID_CONNECTION_ID);
    hv_check("signal_message_connection", signal_fast(MSG_CONN, 0, 0), HV_STATUS_INVALID_PORT_ID);
    hv_check("signal_reserved_nonzero", signal_fast(EVT_CONN, 0, 1), HV_STATUS_INVALID_HYPERCALL_INPUT);
    hv_sint_mask(SINT);
    hv_check("signal_masked_sint", signal_fast(EVT_CONN, 5, 0), HV_STATUS_INVALID_SYNIC_STATE);
    hv_sint_set(SINT, SINT_VECTOR, 0);
    wrmsr(HV_MSR_SIEFP, (uint64_t)siefp);
    hv_check("signal_siefp_disabled", signal_fast(EVT_CONN, 5, 0), HV_STATUS_INVALID_SYNIC_STATE);
    wrmsr(HV_MSR_SIEFP, (uint64_t)siefp | HV_OVERLAY_ENABLE);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        qemu_exit(2);
    apic_enable();
    set_irq_handler(SINT_VECTOR, sint_irq);
    hv_synic_enable(simp, siefp);
    hv_sint_set(SINT, SINT_VECTOR, 0);
    hv_check("sint_readback", rdmsr(HV_MSR_SINT0 + SINT), SINT_VECTOR);
    if (cmdline_is("privileges", "off")) {
        hv_check("post_message_denied", post(MSG_CONN, 1, 4, 0), HV_STATUS_ACCESS_DENIED);
        hv_check("signal_event_denied", signal_fast(EVT_CONN, 0, 0), HV_STATUS_ACCESS_DENIED);
        hv_finish();
    }
    delivery();
    buffer_limit();
    sint_modes();
    post_errors();
    events();
    hv_finish();
}
