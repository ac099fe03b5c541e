"""``python -m runtime.supervisor``: the documented command line; the code is ``runtime.ops.supervisor``.

Importing the runtime takes a moment (llama.cpp, ZeroMQ, LMDB, Qdrant's client …). A SIGINT or SIGTERM
in that moment stops the process quietly with one line, before anything was opened or created; once
the supervisor's loop runs it handles both itself (and stops cleanly, writing its summary).
"""

import signal
import sys
from types import FrameType


def _stop_starting(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    print(f"error: stopped by {name} while starting (nothing was opened)", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the supervisor (``runtime.ops.supervisor.main``), quiet about a signal while it loads."""
    from runtime.ops.supervisor import main as run

    return run(argv)


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_starting)
    sys.exit(main())
