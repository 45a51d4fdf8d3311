/*
 * lib.c - freestanding string functions (gcc may call memset/memcpy even
 * with -fno-builtin), command-line parsing, and the C side of boot.
 */
#include "guest.h"
#include "multiboot.h"

void *memset(void *d, int c, size_t n)
{
    unsigned char *p = d;
    while (n--)
        *p++ = (unsigned char)c;
    return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *dp = d;
    const unsigned char *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memmove(void *d, const void *s, size_t n)
{
    unsigned char *dp = d;
    const unsigned char *sp = s;
    if (dp < sp) {
        while (n--)
            *dp++ = *sp++;
    } else {
        while (n--)
            dp[n] = sp[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *x = a, *y = b;
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] - y[i];
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i] || !a[i])
            return (unsigned char)a[i] - (unsigned char)b[i];
    }
    return 0;
}

uint64_t parse_uint(const char *s, const char **end)
{
    uint64_t v = 0;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (;; s++) {
            char c = *s;
            if (c >= '0' && c <= '9')
                v = v * 16 + (uint64_t)(c - '0');
            else if (c >= 'a' && c <= 'f')
                v = v * 16 + (uint64_t)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v = v * 16 + (uint64_t)(c - 'A' + 10);
            else
                break;
        }
    } else {
        while (*s >= '0' && *s <= '9')
            v = v * 10 + (uint64_t)(*s++ - '0');
    }
    if (end)
        *end = s;
    return v;
}

const char *cmdline(void)
{
    const char *c = mb_cmdline();
    return c ? c : "";
}

/* Find "key=" at the start of a space-separated word; return the value start. */
static const char *cmdline_find(const char *key)
{
    const char *p = cmdline();
    size_t klen = strlen(key);
    while (*p) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, klen) && p[klen] == '=')
            return p + klen + 1;
        while (*p && *p != ' ')
            p++;
    }
    return NULL;
}

bool cmdline_get(const char *key, char *buf, size_t size)
{
    const char *v = cmdline_find(key);
    if (!v)
        return false;
    size_t n = 0;
    while (v[n] && v[n] != ' ' && n + 1 < size) {
        buf[n] = v[n];
        n++;
    }
    if (size)
        buf[n] = '\0';
    return true;
}

uint64_t cmdline_get_uint(const char *key, uint64_t dflt)
{
    const char *v = cmdline_find(key);
    if (!v || !(*v >= '0' && *v <= '9'))
        return dflt;
    return parse_uint(v, NULL);
}

bool cmdline_is(const char *key, const char *value)
{
    char buf[64];
    return cmdline_get(key, buf, sizeof(buf)) && !strcmp(buf, value);
}

void halt_forever(void)
{
    for (;;) {
        cli();
        hlt();
    }
}

/* Called by bsp_start64 (common.S) on the boot stack, in long mode. */
NORETURN void runtime_start(void);
void runtime_start(void)
{
    idt_load();
    /* Mask both 8259 PICs: under QEMU the BIOS left IRQ0 (PIT) routed as vector 8,
     * which would look like a #DF as soon as a test enables interrupts. */
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    int rc = kmain(boot_magic, boot_mbi);
    qemu_exit((uint32_t)rc);
}
