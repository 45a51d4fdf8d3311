/*
 * vsm_c9_msg.c - issue 12 item 9: the secure memory intercept message as the seed builds it.
 * RFLAGS has RF = 1 (what hardware saves on an EPT-violation exit) for read, write and
 * execute intercepts; an execute intercept reports instruction length 2 and no instruction
 * bytes; a read/write reports the faulting instruction's length and bytes.
 */
#include "vsm.h"

#define RFLAGS_RF (1ull << 16)

static uint8_t dpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint8_t cpage[HV_PAGE_SIZE] __attribute__((aligned(HV_PAGE_SIZE)));
static uint32_t vp;

static void protect(void *page, uint32_t mask)
{
    uint64_t st = vtl1_op(VSM_OP_PROTECT, (uint64_t)page, 1, mask, HV_VTL_SELF, 0);
    if (st != HV_STATUS_SUCCESS) {
        printf("FAIL protect: status 0x%lx\n", st);
        hv_failures++;
    }
}

static const struct hv_gpa_intercept *last(void) { return (const struct hv_gpa_intercept *)&vsm_log[vp].last_msg; }

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("vsm_c9_msg start\n");
    if (!vsm_init(false))
        hv_finish();
    vp = vsm_vp_index();
    hv_check("enable_protection", vtl1_op(VSM_OP_CONFIG, HV_VSM_CONFIG_ENABLE_VTL_PROTECTION |
                                                          HV_VSM_CONFIG_DEFAULT_MASK(HV_MAP_GPA_ALL), 0, 0, 0, 0),
             HV_STATUS_SUCCESS);
    vtl1_op(VSM_OP_INTERCEPT_MODE, VSM_ACT_RESTORE, 0, 0, 0, 0);

    /* Read: mov (%rax), %rbx (3 bytes). */
    *(volatile uint64_t *)dpage = 0x1122;
    protect(dpage, HV_MAP_GPA_NONE);
    uint32_t n = vsm_log[vp].intercepts;
    uint64_t v;
    __asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(dpage) : "memory");
    hv_check("read_intercepted", vsm_log[vp].intercepts - n, 1);
    hv_check("read_value", v, 0x1122);
    hv_check("read_access_type", last()->access_type, HV_INTERCEPT_READ);
    hv_check("read_rflags_rf", last()->rflags & RFLAGS_RF, RFLAGS_RF);
    hv_check("read_insn_length", last()->insn_length, 3);
    hv_check_true("read_insn_bytes", last()->insn_byte_count >= 3 && last()->insn_bytes[0] == 0x48 &&
                                         last()->insn_bytes[1] == 0x8b);

    /* Write: movq %rax, (%rdx). */
    protect(dpage, HV_MAP_GPA_READ | HV_MAP_GPA_KX);
    n = vsm_log[vp].intercepts;
    __asm__ volatile("movq %0, (%1)" : : "a"(0x3344ull), "d"(dpage) : "memory");
    hv_check("write_intercepted", vsm_log[vp].intercepts - n, 1);
    hv_check("write_value", *(volatile uint64_t *)dpage, 0x3344);
    hv_check("write_access_type", last()->access_type, HV_INTERCEPT_WRITE);
    hv_check("write_rflags_rf", last()->rflags & RFLAGS_RF, RFLAGS_RF);
    hv_check("write_insn_length", last()->insn_length, 3);

    /* Execute from a page with no access: mov $0xC0DE, %eax; ret. */
    static const uint8_t code[] = {0xB8, 0xDE, 0xC0, 0x00, 0x00, 0xC3};
    memcpy(cpage, code, sizeof(code));
    protect(cpage, HV_MAP_GPA_NONE);
    n = vsm_log[vp].intercepts;
    uint32_t r = ((uint32_t(*)(void))(uintptr_t)cpage)();
    hv_check("exec_intercepted", vsm_log[vp].intercepts - n, 1);
    hv_check("exec_result", r, 0xC0DE);
    hv_check("exec_access_type", last()->access_type, HV_INTERCEPT_EXECUTE);
    hv_check("exec_rip", last()->rip, (uint64_t)cpage);
    hv_check("exec_rflags_rf", last()->rflags & RFLAGS_RF, RFLAGS_RF);
    hv_check("exec_insn_length", last()->insn_length, 2);
    hv_check("exec_insn_byte_count", last()->insn_byte_count, 0);
    uint8_t zero[16] = {0};
    vsm_check_bytes("exec_insn_bytes_zero", (const void *)last()->insn_bytes, zero, 16);
    hv_finish();
}
