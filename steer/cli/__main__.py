"""``python -m steer.cli``: the ``steer`` command."""

import sys

from steer.cli.main import main

sys.exit(main())
