/* hello.c - the smallest guest: one line on serial, exit 0. */
#include "guest.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    printf("hello from vsmtrace guest\n");
    return 0;
}
