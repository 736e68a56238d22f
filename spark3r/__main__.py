"""``python -m spark3r`` = the ``spark3r`` command."""
import sys

from spark3r.cli import main

sys.exit(main())
