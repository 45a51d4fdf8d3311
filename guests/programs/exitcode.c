/* exitcode.c - exit with the status given as exit=N on the command line (default 0). */
#include "guest.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint32_t code = (uint32_t)cmdline_get_uint("exit", 0);
    printf("exiting with %u\n", code);
    qemu_exit(code);
}
