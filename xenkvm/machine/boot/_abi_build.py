"""cffi API-mode build of the boot ABIs: Linux's zero page, Xen's PVH start info, ELF.

The layouts come from the system headers, never from hand-counted offsets:
``<asm/bootparam.h>`` (struct boot_params, setup_header, boot_e820_entry),
``<xen/arch-x86/hvm/start_info.h>`` (hvm_start_info and friends, from
libxen-dev), ``<xen/elfnote.h>`` and ``<elf.h>``.  Every struct is declared
*partially* (``...;``) so the compiler decides offsets and sizes and cffi
checks our field types against them.

Build in place with ``python3 xenkvm/machine/boot/_abi_build.py``, or through
setuptools' ``cffi_modules`` when the package is installed.
"""
from __future__ import annotations

from cffi import FFI

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

/* ---- Linux x86 boot protocol (asm/bootparam.h) ---- */
#define LOADED_HIGH ...
#define KASLR_FLAG ...
#define QUIET_FLAG ...
#define KEEP_SEGMENTS ...
#define CAN_USE_HEAP ...
#define XLF_KERNEL_64 ...
#define XLF_CAN_BE_LOADED_ABOVE_4G ...
#define E820_MAX_ENTRIES_ZEROPAGE ...

struct setup_header {
    __u8 setup_sects; __u16 root_flags; __u32 syssize; __u16 ram_size;
    __u16 vid_mode; __u16 root_dev; __u16 boot_flag; __u16 jump;
    __u32 header; __u16 version; __u32 realmode_swtch; __u16 start_sys_seg;
    __u16 kernel_version; __u8 type_of_loader; __u8 loadflags;
    __u16 setup_move_size; __u32 code32_start; __u32 ramdisk_image;
    __u32 ramdisk_size; __u32 bootsect_kludge; __u16 heap_end_ptr;
    __u8 ext_loader_ver; __u8 ext_loader_type; __u32 cmd_line_ptr;
    __u32 initrd_addr_max; __u32 kernel_alignment; __u8 relocatable_kernel;
    __u8 min_alignment; __u16 xloadflags; __u32 cmdline_size;
    __u32 hardware_subarch; __u64 hardware_subarch_data;
    __u32 payload_offset; __u32 payload_length; __u64 setup_data;
    __u64 pref_address; __u32 init_size; __u32 handover_offset;
    __u32 kernel_info_offset;
    ...;
};
struct boot_e820_entry { __u64 addr; __u64 size; __u32 type; ...; };
struct boot_params {
    __u64 acpi_rsdp_addr;
    __u32 ext_ramdisk_image; __u32 ext_ramdisk_size; __u32 ext_cmd_line_ptr;
    __u8 e820_entries; __u8 sentinel;
    struct setup_header hdr;
    struct boot_e820_entry e820_table[...];
    ...;
};

/* ---- Xen PVH (xen/arch-x86/hvm/start_info.h, xen/elfnote.h) ---- */
#define XEN_HVM_START_MAGIC_VALUE ...
struct hvm_start_info {
    uint32_t magic; uint32_t version; uint32_t flags; uint32_t nr_modules;
    uint64_t modlist_paddr; uint64_t cmdline_paddr; uint64_t rsdp_paddr;
    uint64_t memmap_paddr; uint32_t memmap_entries; uint32_t reserved;
    ...;
};
struct hvm_modlist_entry {
    uint64_t paddr; uint64_t size; uint64_t cmdline_paddr; uint64_t reserved; ...;
};
struct hvm_memmap_table_entry {
    uint64_t addr; uint64_t size; uint32_t type; uint32_t reserved; ...;
};

#define XEN_ELFNOTE_INFO ...
#define XEN_ELFNOTE_ENTRY ...
#define XEN_ELFNOTE_HYPERCALL_PAGE ...
#define XEN_ELFNOTE_VIRT_BASE ...
#define XEN_ELFNOTE_PADDR_OFFSET ...
#define XEN_ELFNOTE_XEN_VERSION ...
#define XEN_ELFNOTE_GUEST_OS ...
#define XEN_ELFNOTE_GUEST_VERSION ...
#define XEN_ELFNOTE_LOADER ...
#define XEN_ELFNOTE_PAE_MODE ...
#define XEN_ELFNOTE_FEATURES ...
#define XEN_ELFNOTE_BSD_SYMTAB ...
#define XEN_ELFNOTE_HV_START_LOW ...
#define XEN_ELFNOTE_L1_MFN_VALID ...
#define XEN_ELFNOTE_SUSPEND_CANCEL ...
#define XEN_ELFNOTE_INIT_P2M ...
#define XEN_ELFNOTE_MOD_START_PFN ...
#define XEN_ELFNOTE_SUPPORTED_FEATURES ...
#define XEN_ELFNOTE_PHYS32_ENTRY ...

/* ---- ELF (elf.h) ---- */
#define EI_NIDENT ...
#define EI_CLASS ...
#define EI_DATA ...
#define EI_VERSION ...
#define ELFCLASS32 ...
#define ELFCLASS64 ...
#define ELFDATA2LSB ...
#define EV_CURRENT ...
#define ET_EXEC ...
#define ET_DYN ...
#define EM_386 ...
#define EM_X86_64 ...
#define PT_NULL ...
#define PT_LOAD ...
#define PT_NOTE ...

typedef struct {
    unsigned char e_ident[...]; uint16_t e_type; uint16_t e_machine;
    uint32_t e_version; uint32_t e_entry; uint32_t e_phoff; uint32_t e_shoff;
    uint32_t e_flags; uint16_t e_ehsize; uint16_t e_phentsize; uint16_t e_phnum;
    uint16_t e_shentsize; uint16_t e_shnum; uint16_t e_shstrndx; ...;
} Elf32_Ehdr;
typedef struct {
    unsigned char e_ident[...]; uint16_t e_type; uint16_t e_machine;
    uint32_t e_version; uint64_t e_entry; uint64_t e_phoff; uint64_t e_shoff;
    uint32_t e_flags; uint16_t e_ehsize; uint16_t e_phentsize; uint16_t e_phnum;
    uint16_t e_shentsize; uint16_t e_shnum; uint16_t e_shstrndx; ...;
} Elf64_Ehdr;
typedef struct {
    uint32_t p_type; uint32_t p_offset; uint32_t p_vaddr; uint32_t p_paddr;
    uint32_t p_filesz; uint32_t p_memsz; uint32_t p_flags; uint32_t p_align; ...;
} Elf32_Phdr;
typedef struct {
    uint32_t p_type; uint32_t p_flags; uint64_t p_offset; uint64_t p_vaddr;
    uint64_t p_paddr; uint64_t p_filesz; uint64_t p_memsz; uint64_t p_align; ...;
} Elf64_Phdr;
typedef struct { uint32_t n_namesz; uint32_t n_descsz; uint32_t n_type; ...; } Elf32_Nhdr;
typedef struct { uint32_t n_namesz; uint32_t n_descsz; uint32_t n_type; ...; } Elf64_Nhdr;
"""

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <elf.h>
#include <asm/bootparam.h>
#include <xen/elfnote.h>
#include <xen/arch-x86/hvm/start_info.h>
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("xenkvm.machine.boot._abi_cffi", SOURCE, extra_compile_args=["-O2", "-Wall"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
