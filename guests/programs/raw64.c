/* raw64.c - built with build_raw64: entered by the VMM directly in long mode. */
#include "guest.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("raw64 hello\n");
    return 0;
}
