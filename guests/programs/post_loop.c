/*
 * post_loop.c - n writes of POST codes to port 0x80, the I/O-delay port a PC guest writes and
 * no device answers: a machine that records nothing completes them in C, a recording one
 * records each as a PIO event.
 *
 * cmdline: n=N (default 1000)
 */
#include "guest.h"

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint64_t n = cmdline_get_uint("n", 1000);
    for (uint64_t i = 0; i < n; i++)
        outb(0x80, (uint8_t)i);
    printf("posted %lu\n", n);
    return 0;
}
