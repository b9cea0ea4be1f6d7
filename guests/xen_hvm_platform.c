/*
 * xen_hvm_platform - what an HVM-mode Linux does with the platform before its
 * PV drivers start: PCI configuration mechanism #1 (0xCF8/0xCFC), the host
 * bridge, the Xen platform device 5853:0001 (ids, class, BAR sizing, moving
 * BAR0/BAR1, decode enables), a grant-table frame placed in BAR1 (as
 * platform-pci.c's alloc_xen_mmio + gnttab_setup_auto_xlat_frames do), and
 * the emulated-device unplug protocol on ports 0x10/0x12 (magic, version,
 * product, build, blacklist check, unplug mask, log characters).
 *
 * Needs `xen.platform_pci: true` (booted as PVH). Command line: xk.trap=page|direct.
 */
#include "xen_guest.h"

#define PCI_ADDR 0xCF8
#define PCI_DATA 0xCFC
#define XEN_VENDOR 0x5853
#define XEN_DEVICE 0x0001
#define BAR1_NEW 0xE8000000u            /* 16 MiB aligned, inside the memory window */
#define BAR0_NEW 0xD400u                /* 256 aligned, inside the I/O window 0xD000..0xDFFF */
#define UNPLUG_MAGIC 0x49D2

static uint32_t cfg_addr(unsigned slot, unsigned reg)
{
    return 0x80000000u | (slot << 11) | (reg & 0xFC);
}

static uint32_t cfg_read32(unsigned slot, unsigned reg)
{
    outl(PCI_ADDR, cfg_addr(slot, reg));
    return inl(PCI_DATA);
}

static uint16_t cfg_read16(unsigned slot, unsigned reg)
{
    outl(PCI_ADDR, cfg_addr(slot, reg));
    return inw((uint16_t)(PCI_DATA + (reg & 2)));
}

static uint8_t cfg_read8(unsigned slot, unsigned reg)
{
    outl(PCI_ADDR, cfg_addr(slot, reg));
    return inb((uint16_t)(PCI_DATA + (reg & 3)));
}

static void cfg_write32(unsigned slot, unsigned reg, uint32_t v)
{
    outl(PCI_ADDR, cfg_addr(slot, reg));
    outl(PCI_DATA, v);
}

static void cfg_write16(unsigned slot, unsigned reg, uint16_t v)
{
    outl(PCI_ADDR, cfg_addr(slot, reg));
    outw((uint16_t)(PCI_DATA + (reg & 2)), v);
}

static uint32_t bar_size(unsigned slot, unsigned bar, uint32_t *raw)
{
    unsigned reg = 0x10 + 4 * bar;
    uint32_t old = cfg_read32(slot, reg);
    cfg_write32(slot, reg, 0xFFFFFFFFu);
    *raw = cfg_read32(slot, reg);
    cfg_write32(slot, reg, old);
    uint32_t mask = (*raw & 1) ? (*raw & ~3u) : (*raw & ~0xFu);
    return mask ? ~mask + 1 : 0;
}

static int scan(void)
{
    outl(PCI_ADDR, 0x80000000u);
    check(inl(PCI_ADDR) == 0x80000000u, "pci.conf1_address_readback", "read %#x", inl(PCI_ADDR));
    uint32_t id0 = cfg_read32(0, 0);
    check((cfg_read32(0, 8) >> 16) == 0x0600, "pci.host_bridge", "00:00.0 %08x class %#x", id0,
          cfg_read32(0, 8) >> 16);
    int found = -1, present = 0;
    for (unsigned slot = 0; slot < 32; slot++) {
        uint32_t id = cfg_read32(slot, 0);
        if (id == 0xFFFFFFFFu)
            continue;
        present++;
        printf("pci 00:%02x.0 %04x:%04x class %06x\n", slot, id & 0xFFFF, id >> 16, cfg_read32(slot, 8) >> 8);
        if ((id & 0xFFFF) == XEN_VENDOR && (id >> 16) == XEN_DEVICE)
            found = (int)slot;
    }
    outl(PCI_ADDR, 0x80000000u | (1u << 8));                 /* 00:00.1: absent */
    check(inl(PCI_DATA) == 0xFFFFFFFFu, "pci.absent_function_ones", "read %#x", inl(PCI_DATA));
    outl(PCI_ADDR, 0x00000000u);                             /* enable bit clear */
    check(inl(PCI_DATA) == 0xFFFFFFFFu, "pci.disabled_reads_ones", "read %#x", inl(PCI_DATA));
    check(present == 2, "pci.two_functions", "%d present", present);
    return found;
}

static void test_device(unsigned slot)
{
    check(cfg_read8(slot, 0x08) == 1, "platform.revision", "%u", cfg_read8(slot, 0x08));
    check((cfg_read32(slot, 0x08) >> 8) == 0xFF8000, "platform.class", "%#x", cfg_read32(slot, 0x08) >> 8);
    check(cfg_read32(slot, 0x2C) == 0x00015853u, "platform.subsystem", "%#x", cfg_read32(slot, 0x2C));
    check(cfg_read8(slot, 0x3D) == 1, "platform.interrupt_pin_a", "%u", cfg_read8(slot, 0x3D));

    uint16_t cmd = cfg_read16(slot, 0x04);
    cfg_write16(slot, 0x04, (uint16_t)(cmd & ~3u));          /* decoders off while sizing */
    uint32_t raw0, raw1;
    uint32_t s0 = bar_size(slot, 0, &raw0), s1 = bar_size(slot, 1, &raw1);
    check(s0 == 0x100 && (raw0 & 1), "platform.bar0_io_256", "size %#x raw %#x", s0, raw0);
    check(s1 == 16u << 20 && (raw1 & 0xF) == 0x8, "platform.bar1_prefetch_16m", "size %#x raw %#x", s1, raw1);
    cfg_write32(slot, 0x10, BAR0_NEW);
    cfg_write32(slot, 0x14, BAR1_NEW);
    cfg_write16(slot, 0x04, (uint16_t)(cmd | 3u));           /* I/O + memory decode on */
    check((cfg_read32(slot, 0x14) & ~0xFu) == BAR1_NEW, "platform.bar1_programmed", "%#x", cfg_read32(slot, 0x14));
    check((cfg_read32(slot, 0x10) & ~3u) == BAR0_NEW, "platform.bar0_programmed", "%#x", cfg_read32(slot, 0x10));
    check((cfg_read16(slot, 0x04) & 3) == 3, "platform.decode_enabled", "command %#x", cfg_read16(slot, 0x04));

    outb(BAR0_NEW, 1);                                       /* platform flags through BAR0 */
    check(inb(BAR0_NEW) == 1, "platform.bar0_decodes", "read %#x", inb(BAR0_NEW));
    outb(BAR0_NEW, 0);

    /* A grant frame in BAR1, as Linux's platform-pci driver puts them. */
    volatile uint32_t *page = (volatile uint32_t *)(uintptr_t)BAR1_NEW;
    long rc = xen_add_to_physmap(XENMAPSPACE_grant_table, 0, BAR1_NEW >> 12);
    check(rc == 0, "platform.grant_frame_in_bar1", "rc %ld", rc);
    if (rc == 0) {
        page[100] = 0x5A5A1234u;
        check(page[100] == 0x5A5A1234u, "platform.bar1_page_backed", "read %#x", page[100]);
    }
}

static void test_unplug(void)
{
    uint16_t magic = inw(0x10);
    if (!check(magic == UNPLUG_MAGIC, "unplug.magic", "read %#x", magic))
        return;
    uint8_t version = inb(0x12);
    check(version == 1, "unplug.protocol_version", "%u", version);
    outw(0x12, 3);                                           /* product: Linux */
    outl(0x10, 0x00060100u);                                 /* driver build */
    check(inw(0x10) == UNPLUG_MAGIC, "unplug.not_blacklisted", "read %#x", inw(0x10));
    outw(0x10, 7);                                           /* IDE disks, NICs, aux IDE disks */
    const char *msg = "XENKVM-PLATFORM-LOG hello from the guest\n";
    for (const char *p = msg; *p; p++)
        outb(0x12, (uint8_t)*p);
    pass("unplug.requested");
}

int main(const struct hvm_start_info *si)
{
    (void)si;
    puts("xenkvm xen_hvm_platform guest");
    if (!xen_init())
        return 1;
    int slot = scan();
    if (check(slot >= 0, "platform.found", "no 5853:0001 on bus 0 (xen.platform_pci: true?)"))
        test_device((unsigned)slot);
    test_unplug();
    return 0;
}
