"""``python -m runtime.admin``: kept for the documented command line; the code is ``runtime.ops.admin``."""

import sys

from runtime.ops.admin import main

if __name__ == "__main__":
    sys.exit(main())
