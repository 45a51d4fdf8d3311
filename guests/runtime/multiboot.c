/* multiboot.c - Multiboot v1 information accessors (identity-mapped, so phys == virt). */
#include "multiboot.h"

const struct multiboot_info *mb_info(void)
{
    if (boot_magic != MULTIBOOT_BOOTLOADER_MAGIC || !boot_mbi)
        return NULL;
    return (const struct multiboot_info *)(uintptr_t)boot_mbi;
}

bool mb_mem(uint32_t *lower_kib, uint32_t *upper_kib)
{
    const struct multiboot_info *mi = mb_info();
    if (!mi || !(mi->flags & MBI_FLAG_MEM))
        return false;
    *lower_kib = mi->mem_lower;
    *upper_kib = mi->mem_upper;
    return true;
}

const char *mb_cmdline(void)
{
    const struct multiboot_info *mi = mb_info();
    if (!mi || !(mi->flags & MBI_FLAG_CMDLINE) || !mi->cmdline)
        return NULL;
    return (const char *)(uintptr_t)mi->cmdline;
}

const char *mb_loader_name(void)
{
    const struct multiboot_info *mi = mb_info();
    if (!mi || !(mi->flags & MBI_FLAG_LOADER_NAME) || !mi->boot_loader_name)
        return NULL;
    return (const char *)(uintptr_t)mi->boot_loader_name;
}

uint32_t mb_module_count(void)
{
    const struct multiboot_info *mi = mb_info();
    if (!mi || !(mi->flags & MBI_FLAG_MODS))
        return 0;
    return mi->mods_count;
}

const struct multiboot_module *mb_module(uint32_t index)
{
    if (index >= mb_module_count())
        return NULL;
    return (const struct multiboot_module *)(uintptr_t)mb_info()->mods_addr + index;
}

/* Entries are variable-sized: each starts with its own size field. */
static const struct multiboot_mmap_entry *mmap_walk(uint32_t want, uint32_t *count)
{
    const struct multiboot_info *mi = mb_info();
    uint32_t n = 0;
    if (mi && (mi->flags & MBI_FLAG_MMAP)) {
        uintptr_t p = mi->mmap_addr, end = (uintptr_t)mi->mmap_addr + mi->mmap_length;
        while (p + sizeof(uint32_t) <= end) {
            const struct multiboot_mmap_entry *e = (const struct multiboot_mmap_entry *)p;
            if (n == want)
                return e;
            n++;
            p += e->size + sizeof(uint32_t);
        }
    }
    if (count)
        *count = n;
    return NULL;
}

uint32_t mb_mmap_count(void)
{
    uint32_t n = 0;
    mmap_walk(UINT32_MAX, &n);
    return n;
}

const struct multiboot_mmap_entry *mb_mmap_entry(uint32_t index)
{
    return mmap_walk(index, NULL);
}
