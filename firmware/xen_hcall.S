/*
 * xen_hcall.S - the two direct-trap hypercall functions (xk.trap=direct).
 *
 * Each is a whole function, exactly "vmcall; ret" / "vmmcall; ret", named
 * as in Linux 6.1, so the VMM can find it by ELF symbol or byte pattern and
 * put a hardware breakpoint on its first instruction. Arguments are already
 * in RAX, RDI, RSI, RDX, R10, R8; the result comes back in RAX.
 *
 * These are the only vmcall/vmmcall instructions in a guest image: an
 * untrapped one hangs the vCPU (vmcall) or raises #UD (vmmcall) on KVM
 * without Xen support.
 */
        /* a page of their own (guest.ld), so tests can change its U/P bits */
        .section .text.hcall, "ax"
        /* Linux's layout: _amd 16-byte aligned, _intel 16 bytes after it, nops between,
           so the patch trap can put its send stub over the pair (xen/sendstub.py) */
        .p2align 5
        .globl  xen_hypercall_amd
        .type   xen_hypercall_amd, @function
xen_hypercall_amd:
        vmmcall
        ret
        .size   xen_hypercall_amd, . - xen_hypercall_amd

        .p2align 4, 0x90
        .globl  xen_hypercall_intel
        .type   xen_hypercall_intel, @function
xen_hypercall_intel:
        vmcall
        ret
        .size   xen_hypercall_intel, . - xen_hypercall_intel
        .p2align 4, 0x90

        .section .note.GNU-stack, "", @progbits
