"""setuptools shim: only here so cffi's API-mode extensions are compiled at install time."""
from setuptools import setup

setup(cffi_modules=[
    "xenkvm/kvm/_build.py:ffibuilder",
    "xenkvm/machine/boot/_abi_build.py:ffibuilder",
])
