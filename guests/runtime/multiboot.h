/* multiboot.h - accessors for the Multiboot v1 information structure. */
#ifndef VSMTRACE_MULTIBOOT_H
#define VSMTRACE_MULTIBOOT_H

#include "guest.h"

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002
#define MBI_FLAG_MEM (1u << 0)
#define MBI_FLAG_CMDLINE (1u << 2)
#define MBI_FLAG_MODS (1u << 3)
#define MBI_FLAG_MMAP (1u << 6)
#define MBI_FLAG_LOADER_NAME (1u << 9)

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper; /* KiB below 1 MiB / above 1 MiB */
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
    uint32_t drives_length, drives_addr;
    uint32_t config_table;
    uint32_t boot_loader_name;
} __attribute__((packed));

struct multiboot_module {
    uint32_t mod_start, mod_end;
    uint32_t string;
    uint32_t reserved;
} __attribute__((packed));

struct multiboot_mmap_entry {
    uint32_t size; /* of the rest of the entry, not counting this field */
    uint64_t base, length;
    uint32_t type; /* 1 = available RAM */
} __attribute__((packed));

/* NULL unless the boot magic was 0x2BADB002 and an info pointer was given. */
const struct multiboot_info *mb_info(void);
/* false when the info has no memory fields (flag bit 0). */
bool mb_mem(uint32_t *lower_kib, uint32_t *upper_kib);
/* NULL if no command line was passed (flag bit 2). */
const char *mb_cmdline(void);
const char *mb_loader_name(void);
uint32_t mb_module_count(void);
const struct multiboot_module *mb_module(uint32_t index);
uint32_t mb_mmap_count(void);
const struct multiboot_mmap_entry *mb_mmap_entry(uint32_t index);

#endif
