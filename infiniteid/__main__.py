"""``python -m infiniteid``: the same as the ``infiniteid`` command."""
import sys

from infiniteid.cli import main

sys.exit(main())
