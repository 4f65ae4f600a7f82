"""``python -m fstqcodec.cli``: the ``fstq`` command."""

import sys

from .app import main

sys.exit(main())
