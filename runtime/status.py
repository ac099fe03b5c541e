"""``python -m runtime.status``: kept for the documented command line; the code is ``runtime.ops.status``."""

import sys

from runtime.ops.status import main

if __name__ == "__main__":
    sys.exit(main())
