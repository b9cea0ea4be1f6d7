#!/bin/sh
# check-insns.sh ELF... - fail if a guest image contains instructions that the
# CI host's ring-0 emulator refuses: SSE/AVX/x87 register use, int3, xsave*,
# cmpxchg16b (but in faults.c's fault_cases); and vmcall/vmmcall anywhere but the two direct-trap functions.
# Only code sections are disassembled (the AP trampoline is data).
set -eu
status=0
for elf in "$@"; do
    # (faults.c's fault_cases executes some on purpose, to check the exception the guest gets)
    bad=$(objdump -d --no-show-raw-insn "$elf" \
        | awk '/^[0-9a-f]+ <.*>:$/ { fn = $2 } fn != "<fault_cases>:"' \
        | grep -Ei '%[xyz]mm[0-9]|%st(\(|\b)|%mm[0-9]|\bint3\b|\bxsave|\bxrstor|cmpxchg16b|\bf(ld|st|x?save|x?rstor)' \
        || true)
    if [ -n "$bad" ]; then
        echo "$elf: forbidden instructions:" >&2
        echo "$bad" >&2
        status=1
    fi
    # vmcall/vmmcall only as the whole of xen_hypercall_intel/_amd (the VMM traps
    # exactly those; anywhere else an untrapped one hangs the vCPU or raises #UD)
    stray=$(objdump -d --no-show-raw-insn "$elf" | awk '
        /^[0-9a-f]+ <.*>:$/ { fn = $2 }
        /\tvmm?call/ && fn != "<xen_hypercall_intel>:" && fn != "<xen_hypercall_amd>:" { print fn, $0 }')
    if [ -n "$stray" ]; then
        echo "$elf: vmcall/vmmcall outside xen_hypercall_intel/_amd:" >&2
        echo "$stray" >&2
        status=1
    fi
done
exit $status
