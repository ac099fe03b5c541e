"""``python -m runtime.status``: kept for the documented command line; the code is ``runtime.ops.status``."""

import sys

from runtime.errors import command

if __name__ == "__main__":
    sys.exit(command("runtime.ops.status"))
