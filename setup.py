"""setuptools shim: only here so cffi's API-mode extensions are compiled at install time."""
import sys

from setuptools import setup

sys.path.insert(0, ".")
from xenkvm._cffi_modules import CFFI_MODULES  # noqa: E402

setup(cffi_modules=CFFI_MODULES)
