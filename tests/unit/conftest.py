"""Fixtures for the boot-loader tests: guest memory and the image builders of ``bootimages``."""
from __future__ import annotations

import pytest

from bootimages import build_bzimage, build_elf, bz_get, note_bytes
from xenkvm.machine.memory import GuestMemory


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory(64 << 20)


@pytest.fixture(name="build_elf")
def _build_elf_fixture():
    """The ELF builder (fixtures keep the tests independent of import modes)."""
    return build_elf


@pytest.fixture(name="build_bzimage")
def _build_bzimage_fixture():
    return build_bzimage


@pytest.fixture(name="bz_get")
def _bz_get_fixture():
    return bz_get


@pytest.fixture(name="note_bytes")
def _note_bytes_fixture():
    return note_bytes
