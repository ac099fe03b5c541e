"""``python -m runtime.calibrate``: kept for the documented command line; the code is ``runtime.ops.calibrate``."""

import sys

from runtime.errors import command

if __name__ == "__main__":
    sys.exit(command("runtime.ops.calibrate"))
