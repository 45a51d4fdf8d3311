/*
 * pvh.c - a PVH kernel (built with pvh_note.S and -DGUEST_NO_MULTIBOOT_HEADER):
 * prints what the loader's struct hvm_start_info says and walks the ACPI
 * tables from its rsdp_paddr, checking every checksum.
 *
 * Output:
 *   pvh magic=0x336ec578 version=1 flags=0x0 eax=0x0
 *   cmdline: <the command line, as given>
 *   modules: <n>
 *   module <i>: <size> bytes, cmdline '<string>', first bytes '<up to 16, non-printable as .>'
 *   memmap entries: <n>
 *   memmap <i>: addr=0x<hex> size=0x<hex> type=<E820 type>
 *   rsdp=0x<hex> (or "rsdp=0x0 (no ACPI)")
 *   acpi RSDP revision=<r> checksum ok|BAD extended ok|BAD
 *   acpi <SIG> length=<n> checksum ok|BAD            (XSDT, then each table it lists, then DSDT)
 *   madt lapic uid=<u> id=<id> flags=<f>             (one per Processor Local APIC entry)
 *   madt ioapic id=<id> address=0x<hex> gsi=<g>
 *   madt override bus=<b> irq=<i> gsi=<g> flags=0x<f>
 *   fadt flags=0x<hex> boot_arch=0x<hex> reset=<space>:0x<port> value=0x<v>
 *   pvh done
 * Exit 0.
 */
#include "guest.h"

struct hvm_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    uint32_t memmap_entries, reserved;
};
struct hvm_modlist_entry { uint64_t paddr, size, cmdline_paddr, reserved; };
struct hvm_memmap_entry { uint64_t addr, size; uint32_t type, reserved; };
struct acpi_header {
    char sig[4];
    uint32_t length;
    uint8_t revision, checksum;
    char oem[6], oem_table[8];
    uint32_t oem_rev, creator, creator_rev;
} __attribute__((packed));

static uint8_t sum(const void *p, uint32_t n)
{
    const uint8_t *b = p;
    uint8_t s = 0;
    for (uint32_t i = 0; i < n; i++)
        s += b[i];
    return s;
}

static const char *ok(uint8_t s) { return s ? "BAD" : "ok"; }

static const struct acpi_header *table(uint64_t addr)
{
    const struct acpi_header *h = (const void *)(uintptr_t)addr;
    printf("acpi %c%c%c%c length=%u checksum %s\n", h->sig[0], h->sig[1], h->sig[2], h->sig[3], h->length,
           ok(sum(h, h->length)));
    return h;
}

static void madt(const struct acpi_header *h)
{
    const uint8_t *p = (const uint8_t *)h + sizeof(*h) + 8, *end = (const uint8_t *)h + h->length;
    while (p + 2 <= end && p[1] >= 2) {
        if (p[0] == 0)
            printf("madt lapic uid=%u id=%u flags=%u\n", p[2], p[3], *(const uint32_t *)(p + 4));
        else if (p[0] == 1)
            printf("madt ioapic id=%u address=0x%x gsi=%u\n", p[2], *(const uint32_t *)(p + 4),
                   *(const uint32_t *)(p + 8));
        else if (p[0] == 2)
            printf("madt override bus=%u irq=%u gsi=%u flags=0x%x\n", p[2], p[3], *(const uint32_t *)(p + 4),
                   *(const uint16_t *)(p + 8));
        else
            printf("madt entry type=%u length=%u\n", p[0], p[1]);
        p += p[1];
    }
}

static void fadt(const struct acpi_header *h)
{
    const uint8_t *f = (const uint8_t *)h;
    printf("fadt flags=0x%x boot_arch=0x%x reset=%u:0x%lx value=0x%x\n", *(const uint32_t *)(f + 112),
           *(const uint16_t *)(f + 109), f[116], *(const uint64_t *)(f + 120), f[128]);
    table(*(const uint64_t *)(f + 140));
}

static void acpi(uint64_t rsdp_addr)
{
    const uint8_t *r = (const void *)(uintptr_t)rsdp_addr;
    if (memcmp(r, "RSD PTR ", 8)) {
        printf("acpi RSDP signature missing\n");
        return;
    }
    printf("acpi RSDP revision=%u checksum %s extended %s\n", r[15], ok(sum(r, 20)), ok(sum(r, 36)));
    const struct acpi_header *x = table(*(const uint64_t *)(r + 24));
    uint32_t n = (x->length - sizeof(*x)) / 8;
    const uint64_t *entries = (const void *)((const uint8_t *)x + sizeof(*x));
    for (uint32_t i = 0; i < n; i++) {
        const struct acpi_header *t = table(entries[i]);
        if (!memcmp(t->sig, "APIC", 4))
            madt(t);
        else if (!memcmp(t->sig, "FACP", 4))
            fadt(t);
    }
}

int kmain(uint32_t eax, uint32_t ebx)
{
    const struct hvm_start_info *si = (const void *)(uintptr_t)ebx;
    printf("pvh magic=0x%x version=%u flags=0x%x eax=0x%x\n", si->magic, si->version, si->flags, eax);
    printf("cmdline: %s\n", si->cmdline_paddr ? (const char *)(uintptr_t)si->cmdline_paddr : "");
    printf("modules: %u\n", si->nr_modules);
    const struct hvm_modlist_entry *mods = (const void *)(uintptr_t)si->modlist_paddr;
    for (uint32_t i = 0; i < si->nr_modules; i++) {
        char text[17];
        uint32_t n = mods[i].size < 16 ? (uint32_t)mods[i].size : 16;
        for (uint32_t j = 0; j < n; j++) {
            char c = ((const char *)(uintptr_t)mods[i].paddr)[j];
            text[j] = (c >= 0x20 && c < 0x7f) ? c : '.';
        }
        text[n] = '\0';
        const char *str = mods[i].cmdline_paddr ? (const char *)(uintptr_t)mods[i].cmdline_paddr : "";
        printf("module %u: %lu bytes, cmdline '%s', first bytes '%s'\n", i, mods[i].size, str, text);
    }
    printf("memmap entries: %u\n", si->memmap_entries);
    const struct hvm_memmap_entry *mm = (const void *)(uintptr_t)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++)
        printf("memmap %u: addr=0x%lx size=0x%lx type=%u\n", i, mm[i].addr, mm[i].size, mm[i].type);
    if (si->rsdp_paddr) {
        printf("rsdp=0x%lx\n", si->rsdp_paddr);
        acpi(si->rsdp_paddr);
    } else {
        printf("rsdp=0x0 (no ACPI)\n");
    }
    printf("pvh done\n");
    return 0;
}
