"""`python -m interlace <command>`: see `python -m interlace --help`."""

import sys

from interlace.cli import main

sys.exit(main())
