/* cpuid_bits.c - the CPUID feature words ring-0 guest code reads (no checks: the test compares).
 * Output: "leaf1 ecx=0x<hex> edx=0x<hex>", "leaf80000008 ebx=0x<hex>". Exit 0. */
#include "guest.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    struct cpuid_regs r = cpuid(1, 0);
    printf("leaf1 ecx=0x%x edx=0x%x\n", r.ecx, r.edx);
    r = cpuid(0x80000008, 0);
    printf("leaf80000008 ebx=0x%x\n", r.ebx);
    return 0;
}
