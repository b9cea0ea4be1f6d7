"""cffi API-mode build of the Xen public ABI (``xen/include/public`` as Debian's libxen-dev ships it).

The compiler reads the real headers (interface version 4.17, x86-64); every
struct below is declared partially (``...;``) so offsets and sizes are the
compiler's.  Guest handles (``XEN_GUEST_HANDLE(x)``: a struct holding one
pointer) are not declared as fields; their offsets are exported as
``XK_OFF_<struct>__<field>`` constants and read as 64-bit guest-virtual
addresses.

It also compiles the Xen layer's hot-path helpers (``HELPERS_SRC``: one C call
per event-delivery rule, and the grant frames' word atomics, on pointers from
``GuestMemory.cptr``);
they live here, past the usual ~400 lines, because they need these headers and
this module's build.
"""
from __future__ import annotations

from cffi import FFI

# (struct, handle field) pairs whose offsets are exported.
HANDLE_FIELDS = [
    ("xen_add_to_physmap_batch", "idxs"),
    ("xen_add_to_physmap_batch", "gpfns"),
    ("xen_add_to_physmap_batch", "errs"),
    ("xen_memory_map", "buffer"),
    ("vcpu_register_runstate_memory_area", "addr"),
    ("vcpu_register_time_memory_area", "addr"),
    ("sched_poll", "ports"),
    ("gnttab_setup_table", "frame_list"),
    ("gnttab_get_status_frames", "frame_list"),
    ("xen_memory_reservation", "extent_start"),
]

CONSTANTS = """
__HYPERVISOR_set_trap_table __HYPERVISOR_mmu_update __HYPERVISOR_platform_op __HYPERVISOR_memory_op
__HYPERVISOR_multicall __HYPERVISOR_set_timer_op __HYPERVISOR_xen_version __HYPERVISOR_console_io
__HYPERVISOR_grant_table_op __HYPERVISOR_vm_assist __HYPERVISOR_vcpu_op __HYPERVISOR_sched_op
__HYPERVISOR_event_channel_op __HYPERVISOR_physdev_op __HYPERVISOR_hvm_op __HYPERVISOR_sysctl
__HYPERVISOR_domctl __HYPERVISOR_xenpmu_op __HYPERVISOR_dm_op __HYPERVISOR_hypfs_op
__HYPERVISOR_event_channel_op_compat __HYPERVISOR_sched_op_compat __HYPERVISOR_physdev_op_compat
__HYPERVISOR_callback_op __HYPERVISOR_nmi_op __HYPERVISOR_xsm_op __HYPERVISOR_kexec_op __HYPERVISOR_argo_op
DOMID_SELF DOMID_FIRST_RESERVED XEN_LEGACY_MAX_VCPUS
VIRQ_TIMER VIRQ_DEBUG VIRQ_CONSOLE VIRQ_DOM_EXC VIRQ_TBUF VIRQ_DEBUGGER VIRQ_XENOPROF VIRQ_CON_RING
VIRQ_PCPU_STATE VIRQ_MEM_EVENT VIRQ_ARGO VIRQ_ENOMEM VIRQ_XENPMU NR_VIRQS
VMASST_CMD_enable VMASST_CMD_disable VMASST_TYPE_4gb_segments VMASST_TYPE_writable_pagetables
VMASST_TYPE_pae_extended_cr3 VMASST_TYPE_runstate_update_flag VMASST_TYPE_m2p_strict
CONSOLEIO_write CONSOLEIO_read
XENVER_version XENVER_extraversion XENVER_compile_info XENVER_capabilities XENVER_changeset
XENVER_platform_parameters XENVER_get_features XENVER_pagesize XENVER_guest_handle XENVER_commandline
XENVER_build_id
XENFEAT_writable_page_tables XENFEAT_writable_descriptor_tables XENFEAT_auto_translated_physmap
XENFEAT_supervisor_mode_kernel XENFEAT_pae_pgdir_above_4gb XENFEAT_mmu_pt_update_preserve_ad
XENFEAT_highmem_assist XENFEAT_gnttab_map_avail_bits XENFEAT_hvm_callback_vector XENFEAT_hvm_safe_pvclock
XENFEAT_hvm_pirqs XENFEAT_dom0  XENFEAT_memory_op_vnode_supported
XENFEAT_ARM_SMCCC_supported XENFEAT_linux_rsdp_unrestricted XENFEAT_not_direct_mapped
XENFEAT_direct_mapped XENFEAT_NR_SUBMAPS
XENMEM_increase_reservation XENMEM_decrease_reservation XENMEM_populate_physmap XENMEM_maximum_ram_page
XENMEM_current_reservation XENMEM_maximum_reservation XENMEM_maximum_gpfn XENMEM_add_to_physmap
XENMEM_add_to_physmap_batch XENMEM_memory_map XENMEM_machine_memory_map XENMEM_remove_from_physmap
XENMEMF_populate_on_demand XENMEMF_exact_node_request XENMEMF_vnode
  
XENMAPSPACE_shared_info XENMAPSPACE_grant_table XENMAPSPACE_gmfn XENMAPSPACE_gmfn_range
XENMAPSPACE_gmfn_foreign XENMAPSPACE_dev_mmio XENMAPIDX_grant_table_status
HVMOP_set_param HVMOP_get_param  
 HVMOP_pagetable_dying HVMOP_get_time HVMOP_get_mem_type 
HVMOP_set_evtchn_upcall_vector HVMOP_flush_tlbs HVMOP_altp2m HVMOP_guest_request_vm_event 
HVM_PARAM_CALLBACK_IRQ HVM_PARAM_STORE_PFN HVM_PARAM_STORE_EVTCHN  HVM_PARAM_IOREQ_PFN
HVM_PARAM_BUFIOREQ_PFN HVM_PARAM_TIMER_MODE HVM_PARAM_HPET_ENABLED HVM_PARAM_IDENT_PT HVM_PARAM_ACPI_S_STATE
HVM_PARAM_VM86_TSS HVM_PARAM_VPT_ALIGN HVM_PARAM_CONSOLE_PFN HVM_PARAM_CONSOLE_EVTCHN HVM_PARAM_NR_IOREQ_SERVER_PAGES
HVM_PARAM_VM_GENERATION_ID_ADDR HVM_PARAM_PAGING_RING_PFN HVM_PARAM_MONITOR_RING_PFN HVM_PARAM_SHARING_RING_PFN
HVM_PARAM_TRIPLE_FAULT_REASON HVM_PARAM_IOREQ_SERVER_PFN HVM_PARAM_ALTP2M HVM_PARAM_X87_FIP_WIDTH
HVM_PARAM_VM86_TSS_SIZED HVM_PARAM_MCA_CAP HVM_NR_PARAMS
HVM_PARAM_CALLBACK_TYPE_GSI HVM_PARAM_CALLBACK_TYPE_PCI_INTX HVM_PARAM_CALLBACK_TYPE_VECTOR
  HVM_PARAM_CALLBACK_IRQ_TYPE_MASK
VCPUOP_initialise VCPUOP_up VCPUOP_down VCPUOP_is_up VCPUOP_get_runstate_info
VCPUOP_register_runstate_memory_area VCPUOP_set_periodic_timer VCPUOP_stop_periodic_timer
VCPUOP_set_singleshot_timer VCPUOP_stop_singleshot_timer VCPUOP_register_vcpu_info VCPUOP_send_nmi
VCPUOP_get_physid VCPUOP_register_vcpu_time_memory_area VCPU_SSHOTTMR_future
RUNSTATE_running RUNSTATE_runnable RUNSTATE_blocked RUNSTATE_offline
XEN_RUNSTATE_UPDATE
SCHEDOP_yield SCHEDOP_block SCHEDOP_shutdown SCHEDOP_poll SCHEDOP_remote_shutdown SCHEDOP_shutdown_code
SCHEDOP_watchdog SCHEDOP_pin_override
SHUTDOWN_poweroff SHUTDOWN_reboot SHUTDOWN_suspend SHUTDOWN_crash SHUTDOWN_watchdog SHUTDOWN_soft_reset
SHUTDOWN_MAX
EVTCHNOP_bind_interdomain EVTCHNOP_bind_virq EVTCHNOP_bind_pirq EVTCHNOP_close EVTCHNOP_send
EVTCHNOP_status EVTCHNOP_alloc_unbound EVTCHNOP_bind_ipi EVTCHNOP_bind_vcpu EVTCHNOP_unmask
EVTCHNOP_reset EVTCHNOP_init_control EVTCHNOP_expand_array EVTCHNOP_set_priority 
EVTCHNSTAT_closed EVTCHNSTAT_unbound EVTCHNSTAT_interdomain EVTCHNSTAT_pirq EVTCHNSTAT_virq EVTCHNSTAT_ipi
EVTCHN_FIFO_PRIORITY_MAX EVTCHN_FIFO_PRIORITY_DEFAULT EVTCHN_FIFO_PRIORITY_MIN EVTCHN_FIFO_MAX_QUEUES
EVTCHN_FIFO_LINK_BITS EVTCHN_FIFO_PENDING EVTCHN_FIFO_MASKED EVTCHN_FIFO_LINKED EVTCHN_FIFO_BUSY
EVTCHN_FIFO_LINK_MASK EVTCHN_FIFO_NR_CHANNELS
GNTTABOP_map_grant_ref GNTTABOP_unmap_grant_ref GNTTABOP_setup_table GNTTABOP_dump_table
GNTTABOP_transfer GNTTABOP_copy GNTTABOP_query_size GNTTABOP_unmap_and_replace GNTTABOP_set_version
GNTTABOP_get_status_frames GNTTABOP_get_version GNTTABOP_swap_grant_ref GNTTABOP_cache_flush
GTF_invalid GTF_permit_access GTF_accept_transfer GTF_transitive GTF_type_mask GTF_readonly GTF_reading
GTF_writing GTF_PWT GTF_PCD GTF_PAT GTF_sub_page GTF_transfer_committed GTF_transfer_completed
GNTMAP_device_map GNTMAP_host_map GNTMAP_readonly GNTMAP_application_map GNTMAP_contains_pte
GNTCOPY_source_gref GNTCOPY_dest_gref
GNTST_okay GNTST_general_error GNTST_bad_domain GNTST_bad_gntref GNTST_bad_handle GNTST_bad_virt_addr
GNTST_bad_dev_addr GNTST_no_device_space GNTST_permission_denied GNTST_bad_page GNTST_bad_copy_arg
GNTST_address_too_big GNTST_eagain GNTST_no_space
XENFEAT_gnttab_map_avail_bits
PHYSDEVOP_eoi PHYSDEVOP_pirq_eoi_gmfn_v1 PHYSDEVOP_pirq_eoi_gmfn_v2 PHYSDEVOP_irq_status_query
PHYSDEVOP_set_iopl PHYSDEVOP_set_iobitmap PHYSDEVOP_apic_read PHYSDEVOP_apic_write PHYSDEVOP_alloc_irq_vector
PHYSDEVOP_free_irq_vector PHYSDEVOP_map_pirq PHYSDEVOP_unmap_pirq PHYSDEVOP_manage_pci_add
PHYSDEVOP_restore_msi PHYSDEVOP_setup_gsi PHYSDEVOP_get_free_pirq PHYSDEVOP_pci_device_add
PHYSDEVOP_pci_device_remove PHYSDEVOP_prepare_msix PHYSDEVOP_release_msix PHYSDEVOP_dbgp_op
XEN_CPUID_FIRST_LEAF  XEN_CPUID_SIGNATURE_EBX XEN_CPUID_SIGNATURE_ECX XEN_CPUID_SIGNATURE_EDX
XEN_HVM_CPUID_APIC_ACCESS_VIRT XEN_HVM_CPUID_X2APIC_VIRT XEN_HVM_CPUID_IOMMU_MAPPINGS XEN_HVM_CPUID_VCPU_ID_PRESENT
XEN_HVM_CPUID_DOMID_PRESENT XEN_HVM_CPUID_EXT_DEST_ID XEN_HVM_CPUID_UPCALL_VECTOR
  

XEN_EPERM XEN_ENOENT XEN_ESRCH  XEN_EIO XEN_ENXIO XEN_E2BIG XEN_ENOEXEC XEN_EBADF XEN_ECHILD
XEN_EAGAIN XEN_ENOMEM XEN_EACCES XEN_EFAULT XEN_EBUSY XEN_EEXIST XEN_EXDEV XEN_ENODEV XEN_EISDIR XEN_EINVAL
XEN_ENFILE XEN_EMFILE XEN_ENOSPC XEN_EROFS XEN_EMLINK XEN_EDOM XEN_ERANGE XEN_EDEADLK XEN_ENAMETOOLONG
XEN_ENOLCK XEN_ENOSYS XEN_ENOTEMPTY XEN_ENODATA XEN_ETIME XEN_EBADMSG XEN_EOVERFLOW XEN_EILSEQ 
XEN_ENOTSOCK XEN_EMSGSIZE XEN_EOPNOTSUPP XEN_EADDRINUSE XEN_EADDRNOTAVAIL XEN_ENOBUFS XEN_EISCONN
XEN_ENOTCONN XEN_ETIMEDOUT XEN_ECONNREFUSED
XENSTORE_RING_SIZE XENSTORE_CONNECTED XENSTORE_RECONNECT XENSTORE_ERROR_NONE XENSTORE_ERROR_COMM
XENSTORE_ERROR_RINGIDX XENSTORE_ERROR_PROTO XENSTORE_SERVER_FEATURE_RECONNECTION XENSTORE_SERVER_FEATURE_ERROR
XEN_PAGE_SIZE
"""

STRUCTS = r"""
typedef uint16_t domid_t;
typedef uint32_t evtchn_port_t;
typedef uint32_t grant_ref_t;
typedef uint32_t grant_handle_t;
typedef uint64_t xen_pfn_t;
typedef uint64_t xen_ulong_t;

struct vcpu_time_info {
    uint32_t version; uint32_t tsc_to_system_mul; int8_t tsc_shift; uint8_t flags;
    uint64_t tsc_timestamp; uint64_t system_time; ...;
};
struct arch_vcpu_info { unsigned long cr2; ...; };
struct vcpu_info {
    uint8_t evtchn_upcall_pending; uint8_t evtchn_upcall_mask; xen_ulong_t evtchn_pending_sel;
    struct arch_vcpu_info arch; struct vcpu_time_info time; ...;
};
struct arch_shared_info { unsigned long max_pfn; unsigned long nmi_reason; ...; };
struct shared_info {
    struct vcpu_info vcpu_info[...];
    xen_ulong_t evtchn_pending[...]; xen_ulong_t evtchn_mask[...];
    uint32_t wc_version; uint32_t wc_sec; uint32_t wc_nsec; uint32_t wc_sec_hi;
    struct arch_shared_info arch; ...;
};

struct xen_feature_info { unsigned int submap_idx; uint32_t submap; ...; };

struct xen_add_to_physmap { domid_t domid; uint16_t size; unsigned int space; xen_ulong_t idx; xen_pfn_t gpfn; ...; };
struct xen_add_to_physmap_batch { domid_t domid; uint16_t space; uint16_t size; ...; };
struct xen_memory_map { unsigned int nr_entries; ...; };
struct xen_remove_from_physmap { domid_t domid; xen_pfn_t gpfn; ...; };
struct xen_memory_reservation { xen_ulong_t nr_extents; unsigned int extent_order; unsigned int mem_flags; domid_t domid; ...; };

struct xen_hvm_param { domid_t domid; uint32_t index; uint64_t value; ...; };
struct xen_hvm_evtchn_upcall_vector { uint32_t vcpu; uint8_t vector; ...; };
struct xen_hvm_pagetable_dying { domid_t domid; uint64_t gpa; ...; };
struct xen_hvm_get_mem_type { domid_t domid; uint16_t mem_type; uint64_t pfn; ...; };

struct vcpu_runstate_info { int state; uint64_t state_entry_time; uint64_t time[4]; ...; };
struct vcpu_register_runstate_memory_area { ...; };
struct vcpu_register_time_memory_area { ...; };
struct vcpu_set_periodic_timer { uint64_t period_ns; ...; };
struct vcpu_set_singleshot_timer { uint64_t timeout_abs_ns; uint32_t flags; ...; };
struct vcpu_register_vcpu_info { uint64_t mfn; uint32_t offset; uint32_t rsvd; ...; };

struct sched_shutdown { unsigned int reason; ...; };
struct sched_poll { unsigned int nr_ports; uint64_t timeout; ...; };
struct sched_remote_shutdown { domid_t domain_id; unsigned int reason; ...; };

struct evtchn_alloc_unbound { domid_t dom; domid_t remote_dom; evtchn_port_t port; ...; };
struct evtchn_bind_interdomain { domid_t remote_dom; evtchn_port_t remote_port; evtchn_port_t local_port; ...; };
struct evtchn_bind_virq { uint32_t virq; uint32_t vcpu; evtchn_port_t port; ...; };
struct evtchn_bind_ipi { uint32_t vcpu; evtchn_port_t port; ...; };
struct evtchn_close { evtchn_port_t port; ...; };
struct evtchn_send { evtchn_port_t port; ...; };
typedef struct { domid_t dom; ...; } xk_evtchn_unbound_status;
typedef struct { domid_t dom; evtchn_port_t port; ...; } xk_evtchn_interdomain_status;
struct evtchn_status { domid_t dom; evtchn_port_t port; uint32_t status; uint32_t vcpu; ...; };
struct evtchn_bind_vcpu { evtchn_port_t port; uint32_t vcpu; ...; };
struct evtchn_unmask { evtchn_port_t port; ...; };
struct evtchn_reset { domid_t dom; ...; };
struct evtchn_init_control { uint64_t control_gfn; uint32_t offset; uint32_t vcpu; uint8_t link_bits; ...; };
struct evtchn_expand_array { uint64_t array_gfn; ...; };
struct evtchn_set_priority { evtchn_port_t port; uint32_t priority; ...; };
struct evtchn_fifo_control_block { uint32_t ready; uint32_t head[...]; ...; };

struct grant_entry_v1 { uint16_t flags; domid_t domid; uint32_t frame; ...; };
struct grant_entry_header { uint16_t flags; domid_t domid; ...; };
typedef struct { struct grant_entry_header hdr; uint32_t pad0; uint64_t frame; ...; } xk_gnt_v2_full_page;
typedef struct { struct grant_entry_header hdr; uint16_t page_off; uint16_t length; uint64_t frame; ...; } xk_gnt_v2_sub_page;
typedef struct { struct grant_entry_header hdr; domid_t trans_domid; uint16_t pad0; grant_ref_t gref; ...; } xk_gnt_v2_transitive;
struct gnttab_setup_table { domid_t dom; uint32_t nr_frames; int16_t status; ...; };
struct gnttab_query_size { domid_t dom; uint32_t nr_frames; uint32_t max_nr_frames; int16_t status; ...; };
struct gnttab_set_version { uint32_t version; ...; };
struct gnttab_get_version { domid_t dom; uint16_t pad; uint32_t version; ...; };
struct gnttab_get_status_frames { uint32_t nr_frames; domid_t dom; int16_t status; ...; };
typedef struct { xen_pfn_t gmfn; domid_t domid; uint16_t offset; ...; } xk_gnttab_copy_ptr;
struct gnttab_copy { uint16_t len; uint16_t flags; int16_t status; ...; };
struct gnttab_map_grant_ref { uint64_t host_addr; uint32_t flags; grant_ref_t ref; domid_t dom; int16_t status; grant_handle_t handle; uint64_t dev_bus_addr; ...; };
struct gnttab_unmap_grant_ref { uint64_t host_addr; uint64_t dev_bus_addr; grant_handle_t handle; int16_t status; ...; };

struct xencons_interface { char in[...]; char out[...]; uint32_t in_cons; uint32_t in_prod; uint32_t out_cons; uint32_t out_prod; ...; };
struct xenstore_domain_interface {
    char req[...]; char rsp[...]; uint32_t req_cons; uint32_t req_prod; uint32_t rsp_cons; uint32_t rsp_prod;
    uint32_t server_features; uint32_t connection; uint32_t error; ...;
};
"""

SOURCE_PRELUDE = r"""
#define __XEN_INTERFACE_VERSION__ 0x00040e00
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/version.h>
#include <xen/features.h>
#include <xen/memory.h>
#include <xen/vcpu.h>
#include <xen/sched.h>
#include <xen/event_channel.h>
#include <xen/grant_table.h>
#include <xen/physdev.h>
#include <xen/errno.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/params.h>
#include <xen/arch-x86/cpuid.h>
#include <xen/io/console.h>
#include <xen/io/xs_wire.h>

#ifndef XEN_PAGE_SIZE
#define XEN_PAGE_SIZE 4096
#endif
typedef __typeof__(((struct evtchn_status *)0)->u.unbound) xk_evtchn_unbound_status;
typedef __typeof__(((struct evtchn_status *)0)->u.interdomain) xk_evtchn_interdomain_status;
typedef __typeof__(((union grant_entry_v2 *)0)->full_page) xk_gnt_v2_full_page;
typedef __typeof__(((union grant_entry_v2 *)0)->sub_page) xk_gnt_v2_sub_page;
typedef __typeof__(((union grant_entry_v2 *)0)->transitive) xk_gnt_v2_transitive;
typedef __typeof__(((struct gnttab_copy *)0)->source.u) xk_gnttab_copy_ptr_u;
typedef struct { xen_pfn_t gmfn; domid_t domid; uint16_t offset; } xk_gnttab_copy_ptr;
"""


# -- hot-path helpers: one C call per Xen delivery/pin rule ---------------------------
# They work on C pointers GuestMemory.cptr() hands out once (shared_info, a vcpu_info,
# FIFO pages, grant frames), so an event costs one or two calls instead of one
# GuestMemory lookup per guest word.  All atomics are seq_cst (lock-prefixed on x86),
# like Xen's guest_test_and_set_bit & co.
HELPERS_CDEF = """
#define XK_2L_WAS_PENDING ...
#define XK_2L_MASKED ...
#define XK_2L_NO_VCPU_INFO ...
#define XK_2L_SEL_WAS_SET ...
#define XK_UPCALL_WAS_PENDING ...
#define XK_UPCALL ...
#define XK_FIFO_WAS_PENDING ...
#define XK_FIFO_QUEUE ...
#define XK_FIFO_LINKED ...
#define XK_FIFO_EMPTY ...
#define XK_FIFO_GAVE_UP ...
int xk_evtchn_2l_set_pending(void *shinfo, void *vcpu_info, unsigned port);
int xk_evtchn_2l_set_sel(void *vcpu_info, unsigned word);
int xk_evtchn_mark_upcall(void *vcpu_info);
int xk_evtchn_fifo_set_pending(void *page, unsigned idx, int queue);
int xk_evtchn_fifo_set_link(void *page, unsigned idx, uint32_t port, int retries);
uint32_t xk_or32_at(void *base, size_t off, uint32_t bits);
uint32_t xk_and32_at(void *base, size_t off, uint32_t bits);
uint64_t xk_cmpxchg32_at(void *base, size_t off, uint32_t expected, uint32_t desired);
"""

HELPERS_SRC = r"""
/* How far a delivery went; from XK_2L_NO_VCPU_INFO up the vCPU is to be told. */
enum { XK_2L_WAS_PENDING, XK_2L_MASKED, XK_2L_SEL_WAS_SET, XK_2L_NO_VCPU_INFO,
       XK_UPCALL_WAS_PENDING, XK_UPCALL };
enum { XK_FIFO_WAS_PENDING = 1, XK_FIFO_QUEUE = 2 };
enum { XK_FIFO_EMPTY, XK_FIFO_LINKED, XK_FIFO_GAVE_UP };

#define XK_NR_2L (sizeof(((struct shared_info *)0)->evtchn_pending) * 8)
#define XK_ULONG_BITS (sizeof(xen_ulong_t) * 8)

static int xk_tas(xen_ulong_t *map, unsigned nr)
{
    xen_ulong_t m = (xen_ulong_t)1 << (nr % XK_ULONG_BITS);
    return (__atomic_fetch_or(&map[nr / XK_ULONG_BITS], m, __ATOMIC_SEQ_CST) & m) != 0;
}

static int xk_test(xen_ulong_t *map, unsigned nr)
{
    return (__atomic_load_n(&map[nr / XK_ULONG_BITS], __ATOMIC_SEQ_CST) >> (nr % XK_ULONG_BITS)) & 1;
}

/* Xen's vcpu_mark_events_pending (common/event_channel.c): set bit 0 of
 * evtchn_upcall_pending; only a 0 -> 1 change interrupts the vCPU. */
int xk_evtchn_mark_upcall(void *vcpu_info)
{
    uint8_t *up = &((struct vcpu_info *)vcpu_info)->evtchn_upcall_pending;
    return (__atomic_fetch_or(up, 1, __ATOMIC_SEQ_CST) & 1) ? XK_UPCALL_WAS_PENDING : XK_UPCALL;
}

/* The second half of the 2-level rule: a newly set bit `word` of the vCPU's
 * evtchn_pending_sel marks the upcall pending; an already set one does nothing. */
int xk_evtchn_2l_set_sel(void *vcpu_info, unsigned word)
{
    struct vcpu_info *vi = vcpu_info;
    if (word >= XK_ULONG_BITS || xk_tas(&vi->evtchn_pending_sel, word))
        return XK_2L_SEL_WAS_SET;
    return xk_evtchn_mark_upcall(vi);
}

/* Xen's evtchn_2l_set_pending (common/event_2l.c), restated: test-and-set the
 * port's bit of shared_info.evtchn_pending; if it was already set, stop.  If
 * the port's evtchn_mask bit is clear, test-and-set bit port / BITS_PER_LONG of
 * the target vCPU's evtchn_pending_sel and, when that bit is new, mark the
 * upcall pending (vcpu_mark_events_pending).  vcpu_info may be NULL (the vCPU
 * has none yet): the caller then waits for resend. */
int xk_evtchn_2l_set_pending(void *shinfo, void *vcpu_info, unsigned port)
{
    struct shared_info *s = shinfo;
    if (port >= XK_NR_2L || xk_tas(s->evtchn_pending, port))
        return XK_2L_WAS_PENDING;
    if (xk_test(s->evtchn_mask, port))
        return XK_2L_MASKED;
    if (!vcpu_info)
        return XK_2L_NO_VCPU_INFO;
    return xk_evtchn_2l_set_sel(vcpu_info, port / XK_ULONG_BITS);
}

#define XK_FIFO_BIT(b) ((uint32_t)1 << (b))

/* Xen's evtchn_fifo_set_pending (common/event_fifo.c), first half: test-and-set
 * PENDING of the port's event word; then, if `queue` (its vCPU has a control
 * block), unless MASKED, test-and-set LINKED: a new LINKED means the port must
 * be appended to its queue.  idx indexes the page's 32-bit words. */
int xk_evtchn_fifo_set_pending(void *page, unsigned idx, int queue)
{
    uint32_t *w = (uint32_t *)page + idx % (XEN_PAGE_SIZE / 4);
    uint32_t bit = XK_FIFO_BIT(EVTCHN_FIFO_PENDING);
    int ret = (__atomic_fetch_or(w, bit, __ATOMIC_SEQ_CST) & bit) ? XK_FIFO_WAS_PENDING : 0;
    if (!queue || (__atomic_load_n(w, __ATOMIC_SEQ_CST) & XK_FIFO_BIT(EVTCHN_FIFO_MASKED)))
        return ret;
    bit = XK_FIFO_BIT(EVTCHN_FIFO_LINKED);
    if (!(__atomic_fetch_or(w, bit, __ATOMIC_SEQ_CST) & bit))
        ret |= XK_FIFO_QUEUE;
    return ret;
}

/* Xen's evtchn_fifo_set_link + the tail handling of evtchn_fifo_set_pending:
 * point the tail's LINK at `port` with a compare-and-swap that only succeeds
 * while the tail is still LINKED (else the guest consumed it: the queue is
 * empty).  When the guest changes the word under us, set BUSY (the guest does
 * not unmask a BUSY word) and retry at most `retries` times; the stored value
 * has BUSY clear.  Gives up (BUSY cleared) if the guest keeps changing it. */
int xk_evtchn_fifo_set_link(void *page, unsigned idx, uint32_t port, int retries)
{
    uint32_t *w = (uint32_t *)page + idx % (XEN_PAGE_SIZE / 4);
    uint32_t linked = XK_FIFO_BIT(EVTCHN_FIFO_LINKED), busy = XK_FIFO_BIT(EVTCHN_FIFO_BUSY);
    uint32_t keep = ~(busy | EVTCHN_FIFO_LINK_MASK);
    uint32_t old = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    if (!(old & linked))
        return XK_FIFO_EMPTY;
    if (__atomic_compare_exchange_n(w, &old, (old & keep) | port, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
        return XK_FIFO_LINKED;
    __atomic_fetch_or(w, busy, __ATOMIC_SEQ_CST);
    old = __atomic_load_n(w, __ATOMIC_SEQ_CST);
    for (int i = 0; i < retries; i++) {
        if (!(old & linked)) {
            __atomic_fetch_and(w, ~busy, __ATOMIC_SEQ_CST);
            return XK_FIFO_EMPTY;
        }
        if (__atomic_compare_exchange_n(w, &old, (old & keep) | port, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return XK_FIFO_LINKED;
    }
    __atomic_fetch_and(w, ~busy, __ATOMIC_SEQ_CST);
    return XK_FIFO_GAVE_UP;
}

uint32_t xk_or32_at(void *base, size_t off, uint32_t bits)
{
    return __atomic_fetch_or((uint32_t *)((char *)base + off), bits, __ATOMIC_SEQ_CST);
}

uint32_t xk_and32_at(void *base, size_t off, uint32_t bits)
{
    return __atomic_fetch_and((uint32_t *)((char *)base + off), bits, __ATOMIC_SEQ_CST);
}

/* Compare-and-swap of the aligned u32 at base + off: (swapped << 32) | value found. */
uint64_t xk_cmpxchg32_at(void *base, size_t off, uint32_t expected, uint32_t desired)
{
    uint32_t *w = (uint32_t *)((char *)base + off);
    int ok = __atomic_compare_exchange_n(w, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return (uint64_t)ok << 32 | expected;
}
"""


def _handle_offsets() -> tuple[str, str]:
    cdef, src = [], []
    for struct, field in HANDLE_FIELDS:
        name = f"XK_OFF_{struct}__{field}"
        cdef.append(f"static const size_t {name};")
        src.append(f"static const size_t {name} = offsetof(struct {struct}, {field});")
    return "\n".join(cdef), "\n".join(src)


def _layout_constants() -> tuple[str, str]:
    """Offsets of nested union members that cffi cannot see through."""
    items = {
        "XK_OFF_evtchn_status__u": "offsetof(struct evtchn_status, u)",
        "XK_OFF_gnttab_copy__source": "offsetof(struct gnttab_copy, source)",
        "XK_OFF_gnttab_copy__dest": "offsetof(struct gnttab_copy, dest)",
        "XK_OFF_gnttab_copy_ptr__u": "offsetof(struct gnttab_copy_ptr, u)",
        "XK_OFF_gnttab_copy_ptr__domid": "offsetof(struct gnttab_copy_ptr, domid)",
        "XK_OFF_gnttab_copy_ptr__offset": "offsetof(struct gnttab_copy_ptr, offset)",
        "XK_SIZEOF_gnttab_copy_ptr": "sizeof(struct gnttab_copy_ptr)",
        "XK_SIZEOF_grant_entry_v2": "sizeof(union grant_entry_v2)",
        "XK_SIZEOF_grant_status": "sizeof(grant_status_t)",
    }
    cdef = "\n".join(f"static const size_t {k};" for k in items)
    src = "\n".join(f"static const size_t {k} = {v};" for k, v in items.items())
    return cdef, src


def _cdef() -> str:
    consts = "\n".join(f"#define {name} ..." for name in dict.fromkeys(CONSTANTS.split()))
    h_cdef, _ = _handle_offsets()
    l_cdef, _ = _layout_constants()
    return "\n".join([consts, STRUCTS, h_cdef, l_cdef, HELPERS_CDEF])


def _source() -> str:
    _, h_src = _handle_offsets()
    _, l_src = _layout_constants()
    return "\n".join([SOURCE_PRELUDE, h_src, l_src, HELPERS_SRC])


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source("xenkvm.xen._xen_cffi", _source(), extra_compile_args=["-Wall"])


if __name__ == "__main__":
    from xenkvm._cffi_modules import build_inplace

    print(build_inplace(ffibuilder))
