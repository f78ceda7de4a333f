"""``python -m cli``: the ``svdfarm`` command, as the farm starts its own children."""

import sys

from cli import main

sys.exit(main())
