"""The guest page-table walk (machine/pagewalk.py): translations and #PF error codes, every paging mode.

The page tables are plain dicts of entries; the walk over real guest memory
runs in tests/xen/test_privilege.py (the breakpoint trap) and under /dev/kvm
in guests/xen_userpriv.c and tests/kvm/test_machine.py (refused instructions).
"""
from __future__ import annotations

import pytest

from xenkvm.machine.pagewalk import (Access, Cr0, Cr4, Efer, Paging, PfError, Pte, canonical, cpuid_phys_bits,
                                     walk)

R, W, X = Access.READ, Access.WRITE, Access.FETCH
P_RW = Pte.P | Pte.RW
U, P, I, RSVD, WR = PfError.USER, PfError.PRESENT, PfError.FETCH, PfError.RSVD, PfError.WRITE


def fetch_error(p: Paging, va: int, cpl: int, read) -> int | None:
    """The fetch's #PF error code, or None when it translates (what the breakpoint trap asks)."""
    gpa, err = walk(read, p, va, X, cpl)
    return None if gpa is not None else err


# --- 4-level tables at PML4..PT, one kernel site -------------------------------------------
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
SITE = 0x200000 + 0x2000           # mapped by PT entry 2, to 0x5000
LONG = dict(cr0=int(Cr0.PE | Cr0.PG), cr3=PML4, cr4=int(Cr4.PAE), efer=int(Efer.LMA | Efer.LME))


class Tables:
    """Page-table entries by guest-physical address, for the walk's ``read``."""

    def __init__(self):
        self.entries: dict[int, int] = {}

    def set(self, table: int, index: int, value: int, size: int = 8) -> None:
        self.entries[table + index * size] = value

    def read(self, gpa: int, size: int):
        return self.entries.get(gpa)


def four_level(leaf_flags: int, *, upper: int = Pte.P | Pte.RW | Pte.US) -> Tables:
    t = Tables()
    t.set(PML4, 0, PDPT | upper)
    t.set(PDPT, 0, PD | upper)
    t.set(PD, 1, PT | upper)                     # VA 2 MiB..4 MiB
    t.set(PT, 2, 0x5000 | leaf_flags)
    return t


def paging(**kw) -> Paging:
    return Paging(**{**LONG, "phys_bits": 40, **kw})


@pytest.mark.parametrize("leaf, cpl, efer_nxe, want", [
    (P_RW, 3, False, P | U),                  # a user process fetching a kernel page
    (P_RW, 3, True, P | U | I),               # I/D is reported with EFER.NXE on 64-bit paging
    (0, 3, False, U),                         # not present
    (0, 3, True, U | I),
    (P_RW | Pte.US, 3, False, None),          # a user page: the fetch succeeds
    (P_RW | Pte.US | Pte.NX, 3, True, P | U | I),   # ... unless NX
    (P_RW | Pte.US | Pte.NX, 3, False, P | U | RSVD),  # NX without NXE is a reserved bit
    (P_RW, 1, False, None),                   # CPL 1 is a supervisor access
    (0, 1, True, I),                          # ... that still faults on a missing page
    (P_RW | Pte.NX, 0, True, P | I),
])
def test_fetch_fault_4_level(leaf, cpl, efer_nxe, want):
    efer = LONG["efer"] | (Efer.NXE if efer_nxe else 0)
    got = fetch_error(paging(efer=efer), SITE, cpl, four_level(leaf).read)
    assert got == (None if want is None else int(want))


@pytest.mark.parametrize("leaf, cpl, access, want", [
    (P_RW, 3, R, P | U),                      # a user process reading a kernel page
    (P_RW, 3, W, P | WR | U),
    (0, 3, R, U),                             # not present: no I/D bit for data accesses
    (0, 0, W, WR),
    (P_RW | Pte.US | Pte.NX, 3, R, None),     # NX does not stop reads or writes
    (P_RW | Pte.US | Pte.NX, 3, W, None),
    (P_RW, 1, W, None),                       # CPL 1 is a supervisor access
    (Pte.P | Pte.US, 3, W, P | WR | U),       # a read-only user page
])
def test_read_write_4_level(leaf, cpl, access, want):
    p = paging(efer=LONG["efer"] | Efer.NXE)
    got = walk(four_level(leaf).read, p, SITE + 0x123, access, cpl)
    assert got == ((0x5123, 0) if want is None else (None, int(want)))


def test_user_bit_must_be_set_at_every_level():
    t = four_level(P_RW | Pte.US, upper=Pte.P | Pte.RW)  # upper levels supervisor-only
    assert fetch_error(paging(), SITE, 3, t.read) == P | U
    assert fetch_error(paging(), SITE, 0, t.read) is None
    assert walk(t.read, paging(), SITE, R, 3) == (None, P | U)
    assert walk(t.read, paging(), SITE, W, 0) == (0x5000, 0)


def test_write_bit_must_be_set_at_every_level():
    t = four_level(P_RW | Pte.US, upper=Pte.P | Pte.US)  # upper levels read-only
    assert walk(t.read, paging(), SITE, R, 3) == (0x5000, 0)
    assert walk(t.read, paging(), SITE, W, 3) == (None, P | WR | U)
    assert walk(t.read, paging(cr0=LONG["cr0"] | Cr0.WP), SITE, W, 0) == (None, P | WR)
    assert walk(t.read, paging(), SITE, W, 0) == (0x5000, 0)      # CR0.WP off: the kernel may write
    assert walk(t.read, paging(cr0=LONG["cr0"] | Cr0.WP), SITE, X, 3) == (0x5000, 0)  # fetches need no R/W


def test_smep_faults_supervisor_fetch_from_user_page():
    t = four_level(P_RW | Pte.US)
    assert fetch_error(paging(cr4=Cr4.PAE | Cr4.SMEP), SITE, 1, t.read) == P | I
    assert fetch_error(paging(), SITE, 1, t.read) is None
    # SMEP reports I/D on a missing page too, without NXE; it does not restrict data accesses (no SMAP)
    assert walk(four_level(0).read, paging(cr4=Cr4.PAE | Cr4.SMEP), SITE, X, 0) == (None, I)
    assert walk(t.read, paging(cr4=Cr4.PAE | Cr4.SMEP), SITE, R, 1) == (0x5000, 0)
    assert walk(t.read, paging(cr4=Cr4.PAE | Cr4.SMEP), SITE, W, 0) == (0x5000, 0)


def test_large_pages_and_their_reserved_bits():
    t = Tables()
    t.set(PML4, 0, PDPT | P_RW | Pte.US)
    t.set(PDPT, 0, PD | P_RW | Pte.US)
    t.set(PD, 1, 0x200000 | P_RW | Pte.PS)      # a 2 MiB supervisor page
    assert fetch_error(paging(), SITE, 3, t.read) == P | U
    t.set(PD, 1, 0x200000 | P_RW | Pte.US | Pte.PS)
    assert fetch_error(paging(), SITE, 3, t.read) is None
    t.set(PD, 1, 0x200000 | (1 << 13) | P_RW | Pte.US | Pte.PS)  # bit 13 of a 2 MiB PDE is reserved
    assert fetch_error(paging(), SITE, 3, t.read) == P | U | RSVD
    assert walk(t.read, paging(), SITE, W, 0) == (None, P | WR | RSVD)
    t.set(PDPT, 0, P_RW | Pte.US | Pte.PS)      # a 1 GiB page
    assert fetch_error(paging(), SITE, 3, t.read) is None
    assert walk(t.read, paging(), SITE + 0x123, W, 3) == (SITE + 0x123, 0)
    t.set(PML4, 0, PDPT | P_RW | Pte.US | Pte.PS)  # PS is reserved in a PML4E
    assert fetch_error(paging(), SITE, 3, t.read) == P | U | RSVD


def test_large_page_translation_drops_the_pat_bit():
    t = four_level(0)
    t.set(PD, 1, 0x4000_0000 | (1 << 12) | P_RW | Pte.PS)  # bit 12 of a 2 MiB PDE is PAT, not address
    assert walk(t.read, paging(), SITE + 0x123, R, 0) == (0x4000_0000 + 0x2123, 0)
    assert walk(t.read, paging(), SITE + 0x123, X, 0) == (0x4000_0000 + 0x2123, 0)


def test_address_bits_beyond_maxphyaddr_are_reserved():
    t = four_level(P_RW | Pte.US)
    t.set(PT, 2, (1 << 45) | 0x5000 | P_RW | Pte.US)
    assert fetch_error(paging(phys_bits=40), SITE, 3, t.read) == P | U | RSVD
    assert fetch_error(paging(phys_bits=46), SITE, 3, t.read) is None
    assert walk(t.read, paging(phys_bits=40), SITE, R, 0) == (None, P | RSVD)
    assert walk(t.read, paging(phys_bits=46), SITE, W, 3) == ((1 << 45) | 0x5000, 0)


def test_five_level_pae_and_32_bit_paging():
    pml5 = 0x14000
    t = four_level(P_RW)
    t.set(pml5, 0, PML4 | P_RW | Pte.US)
    assert fetch_error(paging(cr3=pml5, cr4=Cr4.PAE | Cr4.LA57), SITE, 3, t.read) == P | U
    t.set(pml5, 0, PML4 | P_RW)                 # supervisor at the top level only
    t.set(PT, 2, 0x5000 | P_RW | Pte.US)
    assert fetch_error(paging(cr3=pml5, cr4=Cr4.PAE | Cr4.LA57), SITE, 3, t.read) == P | U
    assert fetch_error(paging(), SITE, 3, t.read) is None  # 4-level: the PML5E is not walked

    pae = Tables()
    pae.set(PDPT, 0, PD | Pte.P)                 # PDPTEs have no U/S bit
    pae.set(PD, 1, PT | P_RW | Pte.US)
    pae.set(PT, 2, 0x5000 | P_RW)
    regs = dict(cr0=Cr0.PE | Cr0.PG, cr3=PDPT, cr4=Cr4.PAE, efer=Efer.NXE)
    assert fetch_error(Paging(**regs), SITE, 3, pae.read) == P | U | I
    pae.set(PDPT, 0, PD | Pte.P | Pte.RW)        # R/W is reserved in a PAE PDPTE
    assert fetch_error(Paging(**regs), SITE, 3, pae.read) == P | U | I | RSVD

    flat = Tables()
    flat.set(PD, 0, PT | P_RW | Pte.US, size=4)
    flat.set(PT, 0x202, 0x5000 | P_RW, size=4)
    regs = dict(cr0=Cr0.PE | Cr0.PG, cr3=PD, cr4=0, efer=Efer.NXE)  # no PAE: no I/D, no NX
    assert fetch_error(Paging(**regs), SITE, 3, flat.read) == P | U
    flat.set(PD, 0, 0x0 | P_RW | Pte.US | Pte.PS, size=4)  # a 4 MiB page, with CR4.PSE
    assert fetch_error(Paging(**{**regs, "cr4": Cr4.PSE}), SITE, 3, flat.read) is None


def test_five_level_reads_and_writes():
    pml5 = 0x14000
    t = four_level(P_RW | Pte.US)
    t.set(pml5, 0, PML4 | Pte.P | Pte.US)       # read-only at the top level only
    p = paging(cr3=pml5, cr4=Cr4.PAE | Cr4.LA57)
    assert walk(t.read, p, SITE, R, 3) == (0x5000, 0)
    assert walk(t.read, p, SITE, W, 3) == (None, P | WR | U)
    t.set(pml5, 0, PML4 | P_RW | Pte.US | Pte.PS)  # PS is reserved in a PML5E
    assert walk(t.read, p, SITE, R, 0) == (None, P | RSVD)


def test_pae_reads_and_writes():
    pae = Tables()
    pae.set(PDPT, 0, PD | Pte.P)
    pae.set(PD, 1, PT | P_RW | Pte.US)
    pae.set(PT, 2, 0x5000 | Pte.P | Pte.US | Pte.NX)   # a read-only, non-executable user page
    p = Paging(cr0=Cr0.PE | Cr0.PG | Cr0.WP, cr3=PDPT, cr4=Cr4.PAE, efer=Efer.NXE)
    assert walk(pae.read, p, SITE + 0x10, R, 3) == (0x5010, 0)
    assert walk(pae.read, p, SITE, W, 3) == (None, P | WR | U)
    assert walk(pae.read, p, SITE, X, 3) == (None, P | U | I)
    pae.set(PD, 1, 0x40_0000 | P_RW | Pte.US | Pte.PS)   # a 2 MiB page
    assert walk(pae.read, p, SITE + 0x10, W, 3) == (0x40_0000 + 0x2010, 0)
    pae.set(PDPT, 0, PD | Pte.P | Pte.US)        # U/S is reserved in a PAE PDPTE
    assert walk(pae.read, p, SITE, R, 0) == (None, P | RSVD)


def test_32_bit_paging_reads_writes_and_fetches():
    flat = Tables()
    flat.set(PD, 0, PT | P_RW | Pte.US, size=4)
    flat.set(PT, 0x202, 0x5000 | Pte.P | Pte.US, size=4)   # a read-only user page
    regs = dict(cr0=Cr0.PE | Cr0.PG | Cr0.WP, cr3=PD, cr4=0, efer=Efer.NXE)
    assert walk(flat.read, Paging(**regs), SITE + 0x10, R, 3) == (0x5010, 0)
    assert walk(flat.read, Paging(**regs), SITE, W, 3) == (None, P | WR | U)
    assert walk(flat.read, Paging(**regs), SITE, W, 0) == (None, P | WR)   # CR0.WP
    assert walk(flat.read, Paging(**{**regs, "cr0": Cr0.PE | Cr0.PG}), SITE, W, 0) == (0x5000, 0)
    assert walk(flat.read, Paging(**regs), SITE, X, 3) == (0x5000, 0)
    assert walk(flat.read, Paging(**regs), SITE + (1 << 22), W, 0) == (None, WR)  # PDE 1 not present
    # a 4 MiB page holding physical bits 39:32 in its bits 20:13 (PSE-36)
    flat.set(PD, 0, 0x80_0000 | (0x3 << 13) | P_RW | Pte.US | Pte.PS, size=4)
    assert walk(flat.read, Paging(**{**regs, "cr4": Cr4.PSE}), SITE, W, 3) == ((3 << 32) | 0x80_0000 | SITE, 0)


def test_no_paging_no_fault():
    assert fetch_error(paging(cr0=Cr0.PE), SITE, 3, Tables().read) is None
    assert walk(Tables().read, paging(cr0=Cr0.PE), SITE, W, 3) == (SITE, 0)


# --- tables at 0x1000..0x4000 (the refused-instruction probe's walks) -------------------
class Memory:
    """Guest page tables in a dict of physical memory (absent entries read as 0: not present)."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}

    def read(self, gpa: int, size: int) -> int | None:
        return self.mem.get(gpa, 0)

    def map4k(self, va: int, pa: int, flags: int, top: int = 0x7) -> None:
        tables = [0x1000, 0x2000, 0x3000, 0x4000]
        for level, table in enumerate(tables[:3]):
            shift = 39 - 9 * level
            self.mem[table + 8 * ((va >> shift) & 0x1FF)] = tables[level + 1] | top
        self.mem[0x4000 + 8 * ((va >> 12) & 0x1FF)] = pa | flags


def lm(cr0: int = 0x8000_0033 | Cr0.WP, efer: int = 0x500 | Efer.NXE) -> Paging:
    return Paging(cr0=cr0, cr3=0x1000, cr4=0x20, efer=efer, phys_bits=40)


def test_canonical() -> None:
    assert canonical(0x7FFF_FFFF_FFFF) and canonical(0xFFFF_8000_0000_0000)
    assert not canonical(0x8000_0000_0000_0000) and not canonical(0x0000_8000_0000_0000)
    assert canonical(0x00FF_FFFF_FFFF_FFFF, la57=True)


def test_walk_translates_and_reports_not_present() -> None:
    t = Memory()
    t.map4k(0x40_0000, 0x9000, 0x3)
    assert walk(t.read, lm(), 0x40_0123, W, 0) == (0x9123, 0)
    assert walk(t.read, lm(), 0x40_1000, R, 0) == (None, 0)
    assert walk(t.read, lm(), 0x80_0000_0000, W, 3) == (None, WR | U)
    assert walk(t.read, lm(), 0x40_0123, X, 0) == (0x9123, 0)
    assert walk(t.read, lm(), 0x40_1000, X, 0) == (None, I)


def test_walk_permissions() -> None:
    t = Memory()
    t.map4k(0x40_0000, 0x9000, 0x1)                    # present, read-only, supervisor
    assert walk(t.read, lm(), 0x40_0000, W, 0) == (None, P | WR)
    assert walk(t.read, lm(cr0=0x8000_0033), 0x40_0000, W, 0) == (0x9000, 0)   # WP off
    assert walk(t.read, lm(), 0x40_0000, R, 3) == (None, P | U)
    assert walk(t.read, lm(), 0x40_0000, X, 3) == (None, P | U | I)
    t.map4k(0x40_0000, 0x9000, 0x7 | (1 << 63))         # user, NX
    assert walk(t.read, lm(), 0x40_0000, X, 0) == (None, P | I)
    assert walk(t.read, lm(efer=0x500), 0x40_0000, R, 0) == (None, P | RSVD)
    assert walk(t.read, lm(efer=0x500), 0x40_0000, X, 0) == (None, P | RSVD)   # no NXE: no I/D


def test_walk_large_pages() -> None:
    t = Memory()
    t.mem[0x1000] = 0x2003
    t.mem[0x2000] = 0x3003
    t.mem[0x3000 + 8] = 0x20_0000 | 0x83                # 2 MiB page at 2 MiB
    assert walk(t.read, lm(), 0x2F_1234, W, 0) == (0x2F_1234, 0)
    assert walk(t.read, lm(), 0x2F_1234, X, 0) == (0x2F_1234, 0)
    t.mem[0x1000] = 0x2083                             # PS in a PML4 entry is reserved
    assert walk(t.read, lm(), 0x2F_1234, R, 0) == (None, P | RSVD)
    assert walk(t.read, lm(), 0x2F_1234, X, 0) == (None, P | RSVD | I)


def test_walk_unreadable_entry_is_not_present() -> None:
    assert walk(lambda gpa, size: None, lm(), 0x1000, R, 0) == (None, 0)
    assert walk(lambda gpa, size: None, lm(), 0x1000, X, 3) == (None, U | I)


def test_phys_bits_from_cpuid() -> None:
    assert cpuid_phys_bits([(0x1, 0, 0, 0, 0, 0, 0), (0x80000008, 0, 0, 0x3028, 0, 0, 0)]) == 40
    assert cpuid_phys_bits([(0x80000008, 0, 0, 0x3000, 0, 0, 0)]) == 36   # EAX[7:0] zero: the SDM default
    assert cpuid_phys_bits([]) == 36
