/* completions.c - instructions KVM's emulator lacks and the VMM completes itself
 * (vmm/emulation_completions.py): int3 and fwait, in supervisor code.
 *
 * Checks, one `ok <name>` / `FAIL <name>: ...` line each, then PASSED/FAILED:
 *   int3_once        the #BP handler ran exactly once
 *   int3_trap_rip    its frame's RIP is the instruction after int3 (trap class)
 *   fwait_clean      fwait with no x87 exception flagged: no #MF, execution goes on
 *   fwait_masked     fwait with ZE flagged but masked in FCW: no #MF
 *   fwait_mf_once    ZE flagged and unmasked: exactly one #MF
 *   fwait_mf_rip     #MF's frame RIP is the fwait itself (fault class)
 *   fwait_after      fwait after the handler's fninit: no further #MF
 * The FPU state is set with fxsave/fxrstor, which KVM does emulate.
 * Exit 0 if all passed, 1 otherwise.  Deliberately uses int3/fwait (not in test_guest_build's list).
 */
#include "guest.h"
#include "hv.h"

#define FCW_ZM (1u << 2)
#define FSW_ZE (1u << 2)
#define FSW_ES (1u << 7)

static volatile uint32_t bp_count, mf_count;
static volatile uint64_t bp_rip, mf_rip;
static uint8_t fx_area[512] __attribute__((aligned(16)));

extern char after_int3[], the_fwait[];

static bool on_bp(struct int_frame *f)
{
    bp_count++;
    bp_rip = f->rip;
    return true; /* trap: RIP is already past the int3 */
}

static bool on_mf(struct int_frame *f)
{
    mf_count++;
    mf_rip = f->rip;
    __asm__ volatile("fninit" ::: "memory"); /* clear the pending exception */
    f->rip += 1;                               /* skip the 1-byte fwait that faulted */
    return true;
}

/* Load FCW/FSW into the x87 unit through fxsave/fxrstor. */
static void set_x87(uint16_t fcw, uint16_t fsw)
{
    __asm__ volatile("fninit\n\tfxsave %0" : "=m"(fx_area) :: "memory");
    fx_area[0] = (uint8_t)fcw;
    fx_area[1] = (uint8_t)(fcw >> 8);
    fx_area[2] = (uint8_t)fsw;
    fx_area[3] = (uint8_t)(fsw >> 8);
    __asm__ volatile("fxrstor %0" :: "m"(fx_area) : "memory");
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    set_exception_handler(3, on_bp);
    set_exception_handler(16, on_mf);

    __asm__ volatile("int3\n\t.globl after_int3\nafter_int3:" ::: "memory");
    hv_check("int3_once", bp_count, 1);
    hv_check("int3_trap_rip", bp_rip, (uint64_t)after_int3);

    set_x87(0x037F, 0);
    __asm__ volatile("fwait" ::: "memory");
    hv_check("fwait_clean", mf_count, 0);

    set_x87(0x037F, FSW_ZE | FSW_ES);
    __asm__ volatile("fwait" ::: "memory");
    hv_check("fwait_masked", mf_count, 0);

    set_x87(0x037F & ~FCW_ZM, FSW_ZE | FSW_ES);
    __asm__ volatile(".globl the_fwait\nthe_fwait: fwait" ::: "memory");
    hv_check("fwait_mf_once", mf_count, 1);
    hv_check("fwait_mf_rip", mf_rip, (uint64_t)the_fwait);

    __asm__ volatile("fwait" ::: "memory");
    hv_check("fwait_after", mf_count, 1);
    hv_finish();
}
