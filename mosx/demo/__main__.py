"""`python -m mosx.demo`: the same as `mosx demo`."""

import sys

from .cli import main

sys.exit(main())
