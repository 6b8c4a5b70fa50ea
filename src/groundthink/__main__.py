"""`python -m groundthink` runs the command line."""

import sys

from groundthink.cli import main

sys.exit(main())
