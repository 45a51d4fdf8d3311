/*
 * hv_testdev.c - QEMU's Hyper-V test device at port 0x3000 (conn_id << 24 | cmd << 16 |
 * vp << 8 | sint): SINT routes asserted from the device (masked, auto-EOI, no message),
 * a message connection to another VP (delivery, the busy-slot case: SUCCESS, then
 * pending until the slot is freed and EOM written, a third post refused), an event
 * connection (flag conn_id set, interrupt only when it was clear), and destroyed routes
 * and connections.  The BSP drives; CPU 1 owns the SynIC under test.  Needs 2 CPUs.
 */
#include "apic.h"
#include "hv.h"
#include "smp.h"

#define TESTDEV 0x3000
#define CMD(conn, cmd, vp, sint) (((uint32_t)(conn) << 24) | ((uint32_t)(cmd) << 16) | ((uint32_t)(vp) << 8) | (sint))
#define ROUTE_CREATE 1
#define ROUTE_DESTROY 2
#define ROUTE_SET 3
#define MSG_CREATE 4
#define MSG_DESTROY 5
#define EVT_CREATE 6
#define EVT_DESTROY 7

#define TARGET 1
#define SINT_ROUTE 5
#define SINT_MASKED 3
#define SINT_AUTOEOI 4
#define SINT_MSG 6
#define SINT_EVT 7
#define V_ROUTE 0x70
#define V_MASKED 0x73
#define V_AUTOEOI 0x74
#define V_MSG 0x76
#define V_EVT 0x77
#define V_CONSUME 0x7A /* IPI: CPU 1 frees its message slot */
#define MSG_CONN 7
#define EVT_CONN 9

static uint8_t ap_simp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t ap_siefp[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static struct hv_post_message_input post_in __attribute__((aligned(HV_PAGE_SIZE)));

static volatile uint32_t count[256];
static volatile uint32_t isr_bit_seen[256];
static volatile uint32_t msg_type_seen[8], msg_size_seen[8];
static volatile uint64_t msg_payload_seen[8], msg_origin_seen[8];
static volatile bool consume_messages = true;
static volatile uint32_t ap_ready;

static struct hv_message *ap_slot(int sint) { return hv_sint_slot(ap_simp, sint); }
static bool in_service(uint8_t v) { return (apic_read(APIC_ISR + 0x10 * (v / 32)) >> (v % 32)) & 1; }

static void ap_irq(struct int_frame *f)
{
    uint8_t v = (uint8_t)f->vector;
    isr_bit_seen[v] = in_service(v);
    if (v == V_MSG) {
        struct hv_message *m = ap_slot(SINT_MSG);
        uint32_t i = count[v];
        if (i < 8) {
            msg_type_seen[i] = m->type;
            msg_size_seen[i] = m->payload_size;
            msg_payload_seen[i] = *(volatile uint64_t *)m->payload;
            msg_origin_seen[i] = m->origination_id;
        }
        if (consume_messages)
            hv_message_done(m);
    }
    if (v == V_CONSUME)
        hv_message_done(ap_slot(SINT_MSG));
    atomic_inc32(&count[v]);
    if (v != V_AUTOEOI)
        apic_eoi();
}

static void ap_main(int cpu)
{
    (void)cpu;
    hv_synic_enable(ap_simp, ap_siefp);
    hv_sint_set(SINT_ROUTE, V_ROUTE, 0);
    hv_sint_set(SINT_MASKED, V_MASKED, HV_SINT_MASKED);
    hv_sint_set(SINT_AUTOEOI, V_AUTOEOI, HV_SINT_AUTO_EOI);
    hv_sint_set(SINT_MSG, V_MSG, 0);
    hv_sint_set(SINT_EVT, V_EVT, 0);
    atomic_store32(&ap_ready, 1);
    for (;;)
        sti_hlt();
}

static void settle(void)
{
    uint64_t t = rdtsc();
    while (rdtsc() - t < 20000000ull)
        cpu_pause();
}

static bool wait_count(uint8_t v, uint32_t want)
{
    uint64_t t = rdtsc();
    while (atomic_load32(&count[v]) < want) {
        if (rdtsc() - t > smp_timeout_tsc)
            return false;
        cpu_pause();
    }
    settle();
    return atomic_load32(&count[v]) == want;
}

static uint16_t post(uint32_t conn, uint32_t type, uint64_t payload)
{
    memset(&post_in, 0, sizeof(post_in));
    post_in.connection_id = conn;
    post_in.message_type = type;
    post_in.payload_size = 8;
    memcpy(post_in.payload, &payload, 8);
    return HV_RESULT_STATUS(hv_hypercall(HVCALL_POST_MESSAGE, (uint64_t)&post_in, 0));
}

static uint16_t signal(uint32_t conn) { return HV_RESULT_STATUS(hv_fast(HVCALL_SIGNAL_EVENT, conn, 0)); }

static bool evt_flag(uint32_t flag) { return (ap_siefp[SINT_EVT * 256 + flag / 8] >> (flag % 8)) & 1; }

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    if (!hv_init())
        return 2;
    apic_enable();
    uint8_t vectors[] = {V_ROUTE, V_MASKED, V_AUTOEOI, V_MSG, V_EVT, V_CONSUME};
    for (unsigned i = 0; i < sizeof(vectors); i++)
        set_irq_handler(vectors[i], ap_irq);
    hv_check("two_cpus_up", (uint64_t)smp_start_aps(2, ap_main), 2);
    uint64_t t = rdtsc();
    while (!atomic_load32(&ap_ready) && rdtsc() - t < smp_timeout_tsc)
        cpu_pause();

    /* SINT routes */
    outl(TESTDEV, CMD(0, ROUTE_CREATE, TARGET, SINT_ROUTE));
    outl(TESTDEV, CMD(0, ROUTE_SET, TARGET, SINT_ROUTE));
    hv_check_true("route_interrupt", wait_count(V_ROUTE, 1));
    hv_check("route_in_service", isr_bit_seen[V_ROUTE], 1);
    hv_check("route_no_message", ap_slot(SINT_ROUTE)->type, 0);
    outl(TESTDEV, CMD(0, ROUTE_CREATE, TARGET, SINT_MASKED));
    outl(TESTDEV, CMD(0, ROUTE_SET, TARGET, SINT_MASKED));
    settle();
    hv_check("masked_sint_no_interrupt", count[V_MASKED], 0);
    outl(TESTDEV, CMD(0, ROUTE_CREATE, TARGET, SINT_AUTOEOI));
    outl(TESTDEV, CMD(0, ROUTE_SET, TARGET, SINT_AUTOEOI));
    hv_check_true("auto_eoi_interrupt", wait_count(V_AUTOEOI, 1));
    hv_check("auto_eoi_not_in_service", isr_bit_seen[V_AUTOEOI], 0);
    outl(TESTDEV, CMD(0, ROUTE_SET, TARGET, SINT_AUTOEOI));
    hv_check_true("auto_eoi_second_interrupt", wait_count(V_AUTOEOI, 2));
    outl(TESTDEV, CMD(0, ROUTE_DESTROY, TARGET, SINT_ROUTE));
    outl(TESTDEV, CMD(0, ROUTE_SET, TARGET, SINT_ROUTE));
    settle();
    hv_check("destroyed_route_no_interrupt", count[V_ROUTE], 1);

    /* message connection */
    hv_check("post_before_create", post(MSG_CONN, 0x41, 1), HV_STATUS_INVALID_CONNECTION_ID);
    outl(TESTDEV, CMD(MSG_CONN, MSG_CREATE, TARGET, SINT_MSG));
    hv_check("post_status", post(MSG_CONN, 0x42, 0x1122334455667788ull), HV_STATUS_SUCCESS);
    hv_check_true("post_interrupt", wait_count(V_MSG, 1));
    hv_check("post_message_type", msg_type_seen[0], 0x42);
    hv_check("post_payload_size", msg_size_seen[0], 8);
    hv_check("post_payload", msg_payload_seen[0], 0x1122334455667788ull);
    hv_check("post_origination_zero", msg_origin_seen[0], 0);
    hv_check("slot_freed", ap_slot(SINT_MSG)->type, 0);
    consume_messages = false;
    hv_check("busy_first_post", post(MSG_CONN, 0x43, 3), HV_STATUS_SUCCESS);
    hv_check_true("busy_first_delivered", wait_count(V_MSG, 2));
    hv_check("busy_slot_holds_first", ap_slot(SINT_MSG)->type, 0x43);
    hv_check("busy_second_post_success", post(MSG_CONN, 0x44, 4), HV_STATUS_SUCCESS);
    settle();
    hv_check("busy_second_not_delivered", count[V_MSG], 2);
    hv_check("busy_slot_message_pending", ap_slot(SINT_MSG)->flags & HV_MESSAGE_FLAG_PENDING, HV_MESSAGE_FLAG_PENDING);
    hv_check("busy_third_post_refused", post(MSG_CONN, 0x45, 5), HV_STATUS_INSUFFICIENT_BUFFERS);
    consume_messages = true;
    apic_send_ipi(TARGET, V_CONSUME, APIC_DM_FIXED, APIC_DEST_NONE); /* CPU 1: type = 0, EOM */
    hv_check_true("pending_delivered_after_eom", wait_count(V_MSG, 3));
    hv_check("pending_message_type", msg_type_seen[2], 0x44);
    hv_check("pending_payload", msg_payload_seen[2], 4);
    outl(TESTDEV, CMD(MSG_CONN, MSG_DESTROY, TARGET, SINT_MSG));
    hv_check("post_after_destroy", post(MSG_CONN, 0x46, 6), HV_STATUS_INVALID_CONNECTION_ID);

    /* event connection */
    hv_check("signal_before_create", signal(EVT_CONN), HV_STATUS_INVALID_CONNECTION_ID);
    outl(TESTDEV, CMD(EVT_CONN, EVT_CREATE, TARGET, SINT_EVT));
    hv_check("signal_status", signal(EVT_CONN), HV_STATUS_SUCCESS);
    hv_check_true("signal_interrupt", wait_count(V_EVT, 1));
    hv_check("signal_sets_flag_conn_id", evt_flag(EVT_CONN), 1);
    hv_check("signal_only_that_flag", evt_flag(EVT_CONN - 1) | evt_flag(EVT_CONN + 1) | evt_flag(0), 0);
    hv_check("signal_again_status", signal(EVT_CONN), HV_STATUS_SUCCESS);
    settle();
    hv_check("signal_again_no_interrupt", count[V_EVT], 1);
    ap_siefp[SINT_EVT * 256 + EVT_CONN / 8] = 0;
    hv_check("signal_cleared_status", signal(EVT_CONN), HV_STATUS_SUCCESS);
    hv_check_true("signal_cleared_interrupts", wait_count(V_EVT, 2));
    hv_check("post_to_event_connection", post(EVT_CONN, 0x47, 7), HV_STATUS_INVALID_PORT_ID);
    outl(TESTDEV, CMD(EVT_CONN, EVT_DESTROY, TARGET, SINT_EVT));
    hv_check("signal_after_destroy", signal(EVT_CONN), HV_STATUS_INVALID_CONNECTION_ID);
    hv_finish();
    return 0;
}
