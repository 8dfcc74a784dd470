"""``python -m attention_dispatch``: the same as the ``attention-dispatch`` command."""

import sys

from .cli import main

sys.exit(main())
