/* fwcfg.h - QEMU fw_cfg over the legacy I/O ports (selector 0x510, data 0x511). */
#ifndef VSMTRACE_FWCFG_H
#define VSMTRACE_FWCFG_H

#include "guest.h"

#define FW_CFG_PORT_SEL 0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_SIGNATURE 0x00
#define FW_CFG_ID 0x01
#define FW_CFG_FILE_DIR 0x19

struct fw_cfg_file {
    uint32_t size;   /* host byte order (the directory is big-endian) */
    uint16_t select;
    char name[56];
};

void fw_cfg_select(uint16_t key);
void fw_cfg_read(void *buf, size_t n);
/* Read the 4-byte signature of selector 0 into sig[0..3] plus a NUL. */
void fw_cfg_signature(char sig[5]);
/* True if the signature is "QEMU". */
bool fw_cfg_present(void);
/* Number of files in the directory (selector 0x19). */
uint32_t fw_cfg_file_count(void);
/* Read up to max directory entries; returns how many were read. */
uint32_t fw_cfg_read_dir(struct fw_cfg_file *out, uint32_t max);
bool fw_cfg_find(const char *name, struct fw_cfg_file *out);
/* Copy up to size bytes of the named file; returns the file's size, or -1 if absent. */
int64_t fw_cfg_read_file(const char *name, void *buf, size_t size);

#endif
