/*
 * echo.c - serial input: reads one line from the 16550 (polling LSR "data ready"),
 * prints "echo: <line>" and exits 0. Used by tests of `vsmtrace run --serial-input`.
 */
#include "guest.h"

#define UART_RBR 0
#define UART_LSR 5
#define LSR_DATA_READY 0x01
#define MAX_LINE 120

static int serial_getc(void)
{
    while (!(inb(SERIAL_PORT + UART_LSR) & LSR_DATA_READY))
        cpu_pause();
    return inb(SERIAL_PORT + UART_RBR);
}

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    char line[MAX_LINE + 1];
    int n = 0;
    printf("type a line:\n");
    for (;;) {
        int c = serial_getc();
        if (c == '\n' || c == '\r' || n == MAX_LINE)
            break;
        line[n++] = (char)c;
    }
    line[n] = 0;
    printf("echo: %s\n", line);
    return 0;
}
