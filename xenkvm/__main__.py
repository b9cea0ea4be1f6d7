"""``python -m xenkvm`` is the ``xenkvm`` command."""
import sys

from xenkvm.cli import main

sys.exit(main())
