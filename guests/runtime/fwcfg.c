/* fwcfg.c - fw_cfg access, one byte per data-port read (no DMA). */
#include "fwcfg.h"

void fw_cfg_select(uint16_t key)
{
    outw(FW_CFG_PORT_SEL, key);
}

void fw_cfg_read(void *buf, size_t n)
{
    uint8_t *p = buf;
    for (size_t i = 0; i < n; i++)
        p[i] = inb(FW_CFG_PORT_DATA);
}

static uint32_t be32(const uint8_t *b)
{
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
}

void fw_cfg_signature(char sig[5])
{
    fw_cfg_select(FW_CFG_SIGNATURE);
    fw_cfg_read(sig, 4);
    sig[4] = '\0';
}

bool fw_cfg_present(void)
{
    char sig[5];
    fw_cfg_signature(sig);
    return !memcmp(sig, "QEMU", 4);
}

uint32_t fw_cfg_file_count(void)
{
    uint8_t b[4];
    fw_cfg_select(FW_CFG_FILE_DIR);
    fw_cfg_read(b, 4);
    return be32(b);
}

/* Next 64-byte directory entry (the caller has selected the directory). */
static void read_entry(struct fw_cfg_file *f)
{
    uint8_t raw[8];
    fw_cfg_read(raw, 8); /* size (BE32), select (BE16), reserved */
    f->size = be32(raw);
    f->select = (uint16_t)((raw[4] << 8) | raw[5]);
    fw_cfg_read(f->name, sizeof(f->name));
    f->name[sizeof(f->name) - 1] = '\0';
}

uint32_t fw_cfg_read_dir(struct fw_cfg_file *out, uint32_t max)
{
    uint32_t n = fw_cfg_file_count(); /* leaves the data offset after the count */
    if (n > max)
        n = max;
    for (uint32_t i = 0; i < n; i++)
        read_entry(&out[i]);
    return n;
}

bool fw_cfg_find(const char *name, struct fw_cfg_file *out)
{
    uint32_t n = fw_cfg_file_count();
    for (uint32_t i = 0; i < n; i++) {
        read_entry(out);
        if (!strcmp(out->name, name))
            return true;
    }
    return false;
}

int64_t fw_cfg_read_file(const char *name, void *buf, size_t size)
{
    struct fw_cfg_file f;
    if (!fw_cfg_find(name, &f))
        return -1;
    fw_cfg_select(f.select);
    fw_cfg_read(buf, size < f.size ? size : f.size);
    return f.size;
}
