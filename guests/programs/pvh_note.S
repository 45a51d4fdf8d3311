/*
 * pvh_note.S - makes a runtime guest a PVH kernel: the Xen ELF note
 * XEN_ELFNOTE_PHYS32_ENTRY (type 0x12) naming the runtime's 32-bit _start.
 * Build with -DGUEST_NO_MULTIBOOT_HEADER so the loader cannot pick Multiboot.
 * _start then sees EAX = 0 (no Multiboot magic) and EBX = struct hvm_start_info.
 */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4            /* namesz: "Xen\0" */
    .long 4            /* descsz */
    .long 0x12         /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long _start
