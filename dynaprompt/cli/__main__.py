"""``python -m dynaprompt.cli``: the ``dynaprompt`` command without the console script."""

import sys

from dynaprompt.cli import main

sys.exit(main())
