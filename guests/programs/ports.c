/* ports.c - reads of an unclaimed port must return all ones; POST and PIC port writes must be harmless. */
#include "guest.h"

#define UNKNOWN_PORT 0x1234

int kmain(uint32_t magic, uint32_t mbi)
{
    (void)magic;
    (void)mbi;
    uint8_t b = inb(UNKNOWN_PORT);
    uint16_t w = inw(UNKNOWN_PORT);
    uint32_t l = inl(UNKNOWN_PORT);
    printf("inb(0x1234)=0x%02x\n", b);
    printf("inw(0x1234)=0x%04x\n", w);
    printf("inl(0x1234)=0x%08x\n", l);
    printf("unknown port reads all ones: %s\n", (b == 0xff && w == 0xffff && l == 0xffffffffu) ? "yes" : "no");
    outb(0x80, 0x42); /* POST code */
    /* 8259 PICs: ICW1..ICW4 remapping to 0x20/0x28, then mask every line */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 0x20);
    outb(0xA1, 0x28);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, 0xff);
    outb(0xA1, 0xff);
    printf("ports ok\n");
    return 0;
}
