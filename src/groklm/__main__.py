"""`python -m groklm`: the groklm command."""

import sys

from groklm.cli import main

sys.exit(main())
