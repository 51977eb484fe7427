"""``python -m oracle`` is the ``dfc-oracle`` command."""

import sys

from oracle.cli import main

sys.exit(main())
