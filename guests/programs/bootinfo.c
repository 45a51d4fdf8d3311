/*
 * bootinfo.c - print what the loader handed over: BSS zeroing, command line,
 * memory sizes, modules and the memory map.
 */
#include "guest.h"
#include "multiboot.h"

/* volatile: the compiler may not assume a never-written static array is zero. */
static volatile uint64_t big_bss[65536 / sizeof(uint64_t)];

static bool bss_is_zero(void)
{
    for (size_t i = 0; i < ARRAY_SIZE(big_bss); i++)
        if (big_bss[i])
            return false;
    return true;
}

int kmain(uint32_t magic, uint32_t mbi)
{
    printf("magic=0x%x mbi=0x%x\n", magic, mbi);
    printf("bss zero: %s\n", bss_is_zero() ? "yes" : "no");
    printf("cmdline: %s\n", cmdline());
    uint32_t lower, upper;
    if (mb_mem(&lower, &upper))
        printf("mem_lower=%u mem_upper=%u\n", lower, upper);
    else
        printf("mem_lower=? mem_upper=? (no memory info)\n");
    uint32_t nmods = mb_module_count();
    printf("modules: %u\n", nmods);
    for (uint32_t i = 0; i < nmods; i++) {
        const struct multiboot_module *m = mb_module(i);
        uint32_t size = m->mod_end - m->mod_start;
        char text[17];
        uint32_t n = size < 16 ? size : 16;
        for (uint32_t j = 0; j < n; j++) {
            char c = ((const char *)(uintptr_t)m->mod_start)[j];
            text[j] = (c >= 0x20 && c < 0x7f) ? c : '.';
        }
        text[n] = '\0';
        const char *str = m->string ? (const char *)(uintptr_t)m->string : "";
        printf("module %u: %u bytes, string '%s', first bytes '%s'\n", i, size, str, text);
    }
    uint32_t nmap = mb_mmap_count();
    printf("mmap entries: %u\n", nmap);
    for (uint32_t i = 0; i < nmap; i++) {
        const struct multiboot_mmap_entry *e = mb_mmap_entry(i);
        printf("mmap %u: base=0x%lx length=0x%lx type=%u\n", i, e->base, e->length, e->type);
    }
    printf("bootinfo done\n");
    return 0;
}
