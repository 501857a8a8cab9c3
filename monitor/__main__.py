"""`python -m monitor` runs the same CLI as the `energy-monitor` script."""

import sys

from monitor.app.cli import main

sys.exit(main())
