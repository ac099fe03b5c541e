"""``python -m runtime.events``: kept for the documented command line; the code is ``runtime.ops.events``."""

import sys

from runtime.errors import command

if __name__ == "__main__":
    sys.exit(command("runtime.ops.events"))
