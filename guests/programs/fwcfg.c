/* fwcfg.c - print the fw_cfg signature and file directory; exit 1 if the signature is not "QEMU". */
#include "fwcfg.h"
#include "guest.h"

static struct fw_cfg_file files[64];

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    char sig[5];
    fw_cfg_signature(sig);
    for (int i = 0; i < 4; i++)
        if (sig[i] < 0x20 || sig[i] >= 0x7f)
            sig[i] = '.';
    printf("fw_cfg signature: %s\n", sig);
    if (memcmp(sig, "QEMU", 4)) {
        printf("fw_cfg missing\n");
        return 1;
    }
    uint32_t total = fw_cfg_file_count();
    uint32_t n = fw_cfg_read_dir(files, ARRAY_SIZE(files));
    printf("fw_cfg files: %u\n", total);
    for (uint32_t i = 0; i < n; i++)
        printf("file 0x%04x %u %s\n", files[i].select, files[i].size, files[i].name);
    printf("fw_cfg done\n");
    return 0;
}
