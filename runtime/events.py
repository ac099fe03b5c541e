"""``python -m runtime.events``: kept for the documented command line; the code is ``runtime.ops.events``."""

import sys

from runtime.ops.events import main

if __name__ == "__main__":
    sys.exit(main())
