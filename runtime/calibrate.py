"""``python -m runtime.calibrate``: kept for the documented command line; the code is ``runtime.ops.calibrate``."""

import sys

from runtime.ops.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
