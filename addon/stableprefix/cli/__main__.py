"""`python -m stableprefix.cli`: the same as the `stableprefix` command."""

import sys

from stableprefix.cli.main import main

sys.exit(main())
