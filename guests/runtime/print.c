/*
 * print.c - serial output, a small printf, and isa-debug-exit.
 *
 * serial_putc writes THR directly: each port access is a VM exit, and both
 * QEMU's and vsmtrace's UART accept bytes at any time, so polling LSR would
 * only double the exits.
 */
#include "guest.h"

static spinlock_t print_lock;

void serial_putc(char c)
{
    outb(SERIAL_PORT, (uint8_t)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

struct sink {
    char *buf;
    size_t size;
    size_t len; /* characters produced, even past size */
};

static void put(struct sink *s, char c)
{
    if (s->len + 1 < s->size)
        s->buf[s->len] = c;
    s->len++;
}

static void put_padded(struct sink *s, const char *str, size_t n, int width, bool left, char pad)
{
    int fill = width > (int)n ? width - (int)n : 0;
    if (!left) {
        /* a leading '-' goes before zero padding */
        if (pad == '0' && n && str[0] == '-') {
            put(s, '-');
            str++;
            n--;
        }
        while (fill-- > 0)
            put(s, pad);
    }
    for (size_t i = 0; i < n; i++)
        put(s, str[i]);
    if (left)
        while (fill-- > 0)
            put(s, ' ');
}

static size_t utoa(char *out, uint64_t v, unsigned base, bool upper)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    size_t n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct sink s = {buf, size, 0};
    while (*fmt) {
        char c = *fmt++;
        if (c != '%') {
            put(&s, c);
            continue;
        }
        bool left = false;
        char pad = ' ';
        int width = 0;
        int lng = 0;
        for (;; fmt++) {
            if (*fmt == '-')
                left = true;
            else if (*fmt == '0')
                pad = '0';
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }
        char num[24];
        size_t n;
        char conv = *fmt ? *fmt++ : '\0';
        switch (conv) {
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            n = 0;
            if (v < 0)
                num[n++] = '-';
            n += utoa(num + n, mag, 10, false);
            put_padded(&s, num, n, width, left, pad);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned int);
            n = utoa(num, v, conv == 'u' ? 10 : 16, conv == 'X');
            put_padded(&s, num, n, width, left, pad);
            break;
        }
        case 'p': {
            uint64_t v = (uint64_t)va_arg(ap, void *);
            num[0] = '0';
            num[1] = 'x';
            n = 2 + utoa(num + 2, v, 16, false);
            put_padded(&s, num, n, width, left, ' ');
            break;
        }
        case 's': {
            const char *str = va_arg(ap, const char *);
            if (!str)
                str = "(null)";
            put_padded(&s, str, strlen(str), width, left, ' ');
            break;
        }
        case 'c':
            num[0] = (char)va_arg(ap, int);
            put_padded(&s, num, 1, width, left, ' ');
            break;
        case '%':
            put(&s, '%');
            break;
        default: /* unknown conversion: print it verbatim */
            put(&s, '%');
            if (conv)
                put(&s, conv);
            break;
        }
    }
    if (size)
        buf[s.len < size ? s.len : size - 1] = '\0';
    return (int)s.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    char buf[512]; /* longer output is truncated */
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    uint64_t flags = irq_save();
    spin_lock(&print_lock);
    serial_puts(buf);
    spin_unlock(&print_lock);
    irq_restore(flags);
    return n;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

void qemu_exit(uint32_t code)
{
    outl(DEBUG_EXIT_PORT, code);
    /* Still running: there is no isa-debug-exit device. */
    serial_puts("qemu_exit: no isa-debug-exit device, halting\n");
    halt_forever();
}
