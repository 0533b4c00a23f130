"""`python -m lite.server [serve] ...`: the serve command before (and besides) the main CLI."""

import sys

from lite.cli.serve import main

sys.exit(main())
