"""``python -m runtime.supervisor``: the documented command line; the code is ``runtime.ops.supervisor``.

Importing the runtime takes a moment (llama.cpp, ZeroMQ, LMDB, Qdrant's client …). A SIGINT or SIGTERM
in that moment stops the process quietly with one line, before anything was opened or created; once
the supervisor's loop runs it handles both itself (and stops cleanly, writing its summary).
"""

import sys

from runtime.errors import command

if __name__ == "__main__":
    sys.exit(command("runtime.ops.supervisor", quiet_until_loop=True))
